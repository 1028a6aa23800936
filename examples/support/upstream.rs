//! In-process HTTP upstream for tests and demos.
//!
//! Serves HTTP/1.1 and h2c (prior knowledge) on one 127.0.0.1 port and
//! records every request it receives. Include it with
//! `#[path = "..."] mod upstream;` because it is not a cargo target itself.

// Each including crate uses a different subset of this module.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// Response behaviour of an upstream, fixed when it starts.
#[derive(Clone, Debug)]
pub struct Behaviour {
    /// Response status, except for requests that `fail_every` selects.
    pub status: u16,
    /// Wait after the full request body has arrived, before responding or resetting.
    pub delay: Duration,
    /// Respond with 503 to requests number N, 2N, 3N, ... (1-based, counted in
    /// order of header arrival). 0 disables this.
    pub fail_every: u64,
    /// Response body, also sent with the 503 responses of `fail_every`.
    pub body: Bytes,
    /// Send no response: HTTP/1.1 closes the connection and HTTP/2 resets the
    /// stream with INTERNAL_ERROR. The request is still recorded.
    pub reset: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            status: 200,
            delay: Duration::ZERO,
            fail_every: 0,
            body: Bytes::new(),
            reset: false,
        }
    }
}

/// One request as the upstream received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: Method,
    /// Path with query, for example `/a/b?x=1`.
    pub path: String,
    pub version: Version,
    /// Lowercase name and raw value bytes, repeats included.
    ///
    /// NOTE: hyper stores headers in a `HeaderMap`, which keeps the order of
    /// values under one name but groups each name at its first appearance.
    /// So `a: 1, b: 2, a: 3` is recorded as `a: 1, a: 3, b: 2`.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Bytes,
    /// False when the client aborted the body, so `body` contains only what arrived.
    pub body_complete: bool,
    /// When the request headers arrived.
    pub arrived: Instant,
}

impl RecordedRequest {
    /// Returns the values of header `name` (lowercase) in arrival order.
    pub fn header_values(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
            .collect()
    }

    /// Returns the first value of header `name` (lowercase) as lossy UTF-8.
    pub fn header(&self, name: &str) -> Option<String> {
        self.header_values(name)
            .first()
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

struct State {
    behaviour: Behaviour,
    /// `behaviour.status`, validated at start.
    status: StatusCode,
    /// Number of requests whose headers have arrived, which drives `fail_every`.
    arrivals: AtomicU64,
    requests: Mutex<Vec<RecordedRequest>>,
    /// Number of recorded requests, so waiters wake without polling.
    recorded: watch::Sender<usize>,
}

/// A running upstream. Dropping it stops the server and its connections.
pub struct Upstream {
    port: u16,
    state: Arc<State>,
    accept_task: JoinHandle<()>,
}

impl Upstream {
    /// Starts an upstream on an OS-chosen port of 127.0.0.1.
    ///
    /// Panics if binding fails or `behaviour.status` is invalid.
    pub async fn start(behaviour: Behaviour) -> Upstream {
        Self::start_on(0, behaviour)
            .await
            .expect("starting the upstream on 127.0.0.1:0 failed")
    }

    /// Starts an upstream on 127.0.0.1:`port` (0 lets the OS choose).
    pub async fn start_on(port: u16, behaviour: Behaviour) -> std::io::Result<Upstream> {
        let status = StatusCode::from_u16(behaviour.status).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("invalid status {}: expected 100..=999", behaviour.status),
            )
        })?;
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(State {
            behaviour,
            status,
            arrivals: AtomicU64::new(0),
            requests: Mutex::new(Vec::new()),
            recorded: watch::channel(0).0,
        });
        let accept_task = tokio::spawn(accept_loop(listener, state.clone()));
        Ok(Upstream {
            port,
            state,
            accept_task,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Returns a copy of all recorded requests in the order they completed.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.requests.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    /// Waits until at least `n` requests are recorded, or fails after `timeout`.
    pub async fn wait_for_count(&self, n: usize, timeout: Duration) -> Result<(), String> {
        let mut recorded = self.state.recorded.subscribe();
        let waited = tokio::time::timeout(timeout, recorded.wait_for(|&count| count >= n))
            .await
            .map(|result| result.is_ok());
        match waited {
            Ok(true) => Ok(()),
            // The sender lives in `self.state`, so the channel cannot close here.
            Ok(false) => unreachable!("upstream state dropped while borrowed"),
            Err(_) => Err(format!(
                "upstream on port {} recorded {} requests, expected at least {n} within {timeout:?}; \
                 recorded: {:?}",
                self.port,
                self.count(),
                self.requests()
                    .iter()
                    .map(|r| format!("{} {}", r.method, r.path))
                    .collect::<Vec<_>>(),
            )),
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every connection.
        self.accept_task.abort();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        eprintln!("upstream: accept failed: {error}");
                        continue;
                    }
                };
                let state = state.clone();
                connections.spawn(async move {
                    let service = service_fn(move |request| handle(request, state.clone()));
                    // Errors here are expected: clients hang up and `reset` mode aborts.
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            // Reap finished connections so the set does not grow without bound.
            Some(_) = connections.join_next() => {}
        }
    }
}

/// Error returned by the service in `reset` mode so hyper drops the exchange.
#[derive(Debug)]
struct ResetRequested;

impl std::fmt::Display for ResetRequested {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("reset requested by upstream behaviour")
    }
}

impl std::error::Error for ResetRequested {}

async fn handle(
    request: hyper::Request<Incoming>,
    state: Arc<State>,
) -> Result<hyper::Response<Full<Bytes>>, ResetRequested> {
    let arrived = Instant::now();
    let number = state.arrivals.fetch_add(1, Ordering::SeqCst) + 1;
    let (parts, mut incoming) = request.into_parts();

    let mut body = BytesMut::new();
    let mut body_complete = true;
    while let Some(frame) = incoming.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    body.extend_from_slice(data);
                }
            }
            Err(_) => {
                body_complete = false;
                break;
            }
        }
    }

    let recorded = RecordedRequest {
        method: parts.method,
        path: parts
            .uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned()),
        version: parts.version,
        headers: parts
            .headers
            .iter()
            .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
            .collect(),
        body: body.freeze(),
        body_complete,
        arrived,
    };
    {
        let mut requests = state.requests.lock().unwrap();
        requests.push(recorded);
        state.recorded.send_replace(requests.len());
    }

    let behaviour = &state.behaviour;
    if !behaviour.delay.is_zero() {
        tokio::time::sleep(behaviour.delay).await;
    }
    if behaviour.reset {
        return Err(ResetRequested);
    }
    let status = if behaviour.fail_every != 0 && number % behaviour.fail_every == 0 {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        state.status
    };
    let response = hyper::Response::builder()
        .status(status)
        .body(Full::new(behaviour.body.clone()))
        .expect("response parts are valid");
    Ok(response)
}
