//! HTTP/1.1 and h2c clients that send test and demo requests to 127.0.0.1.
//!
//! Built on hyper's connection API so one `Connection` is exactly one TCP
//! connection, which a pooling client does not promise.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper::header::{HeaderName, HeaderValue, HOST};
use hyper::{HeaderMap, Method};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// HTTP version spoken on a connection. `Http2` is h2c with prior knowledge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Http1,
    Http2,
}

/// Limit for one `send`, well above the 10 s route timeout of the test bootstrap.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Upper bound on requests in one `send_concurrent` call.
pub const MAX_CONCURRENT_REQUESTS: usize = 100_000;

/// Request body.
#[derive(Clone, Debug, Default)]
pub enum Body {
    #[default]
    Empty,
    /// Sent with `content-length` on HTTP/1.1.
    Full(Bytes),
    /// Sent as one frame per chunk, with `transfer-encoding: chunked` on
    /// HTTP/1.1. The chunks are written back to back, so Envoy may still
    /// read several of them at once.
    Chunks(Vec<Bytes>),
}

/// A test request. Header values are raw bytes, so non-UTF-8 values such as
/// `b"caf\xe9"` go out unchanged.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: Method,
    /// Path with optional query, starting with `/`.
    pub path: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Body,
}

impl Request {
    /// Panics if `method` is not a valid HTTP method token.
    pub fn new(method: &str, path: &str) -> Self {
        Request {
            method: Method::from_bytes(method.as_bytes())
                .unwrap_or_else(|_| panic!("invalid HTTP method {method:?}")),
            path: path.to_owned(),
            headers: Vec::new(),
            body: Body::Empty,
        }
    }

    pub fn get(path: &str) -> Self {
        Self::new("GET", path)
    }

    pub fn post(path: &str, body: impl Into<Bytes>) -> Self {
        Self::new("POST", path).body(body)
    }

    /// Appends a header. Repeated names are sent as repeated fields.
    ///
    /// Panics if the name is not a valid token or the value contains
    /// bytes that HTTP forbids (NUL, CR, LF and other control bytes).
    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        let value = value.as_ref();
        let name = HeaderName::from_bytes(name.as_bytes())
            .unwrap_or_else(|_| panic!("invalid header name {name:?}"));
        let value = HeaderValue::from_bytes(value)
            .unwrap_or_else(|_| panic!("invalid value {value:?} for header {name}"));
        self.headers.push((name, value));
        self
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = Body::Full(body.into());
        self
    }

    /// Sends the body as these chunks, in order.
    pub fn chunked<C: Into<Bytes>>(mut self, chunks: impl IntoIterator<Item = C>) -> Self {
        self.body = Body::Chunks(chunks.into_iter().map(Into::into).collect());
        self
    }
}

/// A fully read response.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Response {
    /// Returns the first value of header `name` as lossy UTF-8.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }
}

/// Body made of prepared frames. An unknown size makes hyper use chunked
/// encoding on HTTP/1.1.
struct OutgoingBody {
    frames: VecDeque<Bytes>,
    exact_len: Option<u64>,
}

impl From<Body> for OutgoingBody {
    fn from(body: Body) -> Self {
        match body {
            Body::Empty => OutgoingBody {
                frames: VecDeque::new(),
                exact_len: Some(0),
            },
            Body::Full(bytes) => OutgoingBody {
                exact_len: Some(bytes.len() as u64),
                frames: VecDeque::from([bytes]),
            },
            Body::Chunks(chunks) => OutgoingBody {
                frames: chunks.into(),
                exact_len: None,
            },
        }
    }
}

impl hyper::body::Body for OutgoingBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(
            self.get_mut()
                .frames
                .pop_front()
                .map(|data| Ok(Frame::data(data))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        match self.exact_len {
            Some(len) => SizeHint::with_exact(len),
            None => SizeHint::default(),
        }
    }
}

enum Sender {
    Http1(http1::SendRequest<OutgoingBody>),
    Http2(http2::SendRequest<OutgoingBody>),
}

/// One client connection to 127.0.0.1:`port`. Requests on it run one at a time.
pub struct Connection {
    port: u16,
    sender: Sender,
}

impl Connection {
    /// Opens a connection with Nagle's algorithm on.
    ///
    /// NOTE: hyper writes HTTP/2 HEADERS and DATA frames separately, so on
    /// such a connection DATA waits for Envoy's delayed ACK, about 40 ms on
    /// Linux, in every HTTP/2 request with a body.
    pub async fn open(proto: Proto, port: u16) -> Result<Connection, String> {
        Self::connect(proto, port, false).await
    }

    /// Opens a connection with `TCP_NODELAY` set, so no request waits for
    /// a delayed ACK.
    pub async fn open_nodelay(proto: Proto, port: u16) -> Result<Connection, String> {
        Self::connect(proto, port, true).await
    }

    async fn connect(proto: Proto, port: u16, nodelay: bool) -> Result<Connection, String> {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connecting to 127.0.0.1:{port} failed: {e}"))?;
        stream.set_nodelay(nodelay).map_err(|e| {
            format!("setting TCP_NODELAY to {nodelay} on the connection to port {port} failed: {e}")
        })?;
        let io = TokioIo::new(stream);
        let sender = match proto {
            Proto::Http1 => {
                let (sender, connection) = http1::handshake(io)
                    .await
                    .map_err(|e| format!("HTTP/1.1 handshake with port {port} failed: {e}"))?;
                // The task ends when the sender is dropped or the peer closes.
                tokio::spawn(connection);
                Sender::Http1(sender)
            }
            Proto::Http2 => {
                let (sender, connection) = http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| format!("HTTP/2 handshake with port {port} failed: {e}"))?;
                tokio::spawn(connection);
                Sender::Http2(sender)
            }
        };
        Ok(Connection { port, sender })
    }

    /// Sends `request` and reads the whole response body.
    pub async fn send(&mut self, request: Request) -> Result<Response, String> {
        let port = self.port;
        let description = format!("{} {} to port {port}", request.method, request.path);
        let has_host = request.headers.iter().any(|(name, _)| name == HOST);

        // HTTP/2 takes :scheme and :authority from an absolute URI, while
        // HTTP/1.1 expects the origin form and a Host header.
        let uri = match self.sender {
            Sender::Http1(_) => request.path.clone(),
            Sender::Http2(_) => format!("http://127.0.0.1:{port}{}", request.path),
        };
        let mut builder = hyper::Request::builder().method(request.method).uri(uri);
        if matches!(self.sender, Sender::Http1(_)) && !has_host {
            builder = builder.header(HOST, format!("127.0.0.1:{port}"));
        }
        for (name, value) in request.headers {
            builder = builder.header(name, value);
        }
        let outgoing = builder
            .body(OutgoingBody::from(request.body))
            .map_err(|e| format!("building {description} failed: {e}"))?;

        let response = match &mut self.sender {
            Sender::Http1(sender) => {
                sender
                    .ready()
                    .await
                    .map_err(|e| format!("connection closed before {description}: {e}"))?;
                sender.send_request(outgoing).await
            }
            Sender::Http2(sender) => {
                sender
                    .ready()
                    .await
                    .map_err(|e| format!("connection closed before {description}: {e}"))?;
                sender.send_request(outgoing).await
            }
        }
        .map_err(|e| format!("{description} failed: {e}"))?;

        let (parts, incoming) = response.into_parts();
        let body = incoming
            .collect()
            .await
            .map_err(|e| format!("reading the response body of {description} failed: {e}"))?
            .to_bytes();
        Ok(Response {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    }
}

/// Sends one request on a new connection, failing after `REQUEST_TIMEOUT`.
pub async fn send(proto: Proto, port: u16, request: Request) -> Result<Response, String> {
    let description = format!("{proto:?} {} {}", request.method, request.path);
    let exchange = async {
        let mut connection = Connection::open(proto, port).await?;
        connection.send(request).await
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("{description} timed out after {REQUEST_TIMEOUT:?}")))
}

/// Opens `connections` connections at once and sends `per_connection`
/// requests on each, one after another. `make_request(connection, index)`
/// builds each request.
///
/// Returns one result per request, ordered by connection and then index.
/// Requests still unsent when `timeout` expires fail without being sent.
/// Panics if the total exceeds `MAX_CONCURRENT_REQUESTS`.
pub async fn send_concurrent<F>(
    proto: Proto,
    port: u16,
    connections: usize,
    per_connection: usize,
    timeout: Duration,
    make_request: F,
) -> Vec<Result<Response, String>>
where
    F: Fn(usize, usize) -> Request + Send + Sync + 'static,
{
    send_on_connections(
        proto,
        port,
        connections,
        per_connection,
        timeout,
        false,
        make_request,
    )
    .await
    .into_iter()
    .map(|timed| timed.result)
    .collect()
}

/// The result of one request from `send_concurrent_timed`.
#[derive(Clone, Debug)]
pub struct TimedResult {
    pub result: Result<Response, String>,
    /// From handing the request to the connection until the whole response
    /// body arrived or the request failed. Zero for requests never sent.
    pub latency: Duration,
}

/// Works like `send_concurrent`, but measures each request's latency and
/// opens its connections with `Connection::open_nodelay`, so a delayed ACK
/// does not add to the latency.
pub async fn send_concurrent_timed<F>(
    proto: Proto,
    port: u16,
    connections: usize,
    per_connection: usize,
    timeout: Duration,
    make_request: F,
) -> Vec<TimedResult>
where
    F: Fn(usize, usize) -> Request + Send + Sync + 'static,
{
    send_on_connections(
        proto,
        port,
        connections,
        per_connection,
        timeout,
        true,
        make_request,
    )
    .await
}

async fn send_on_connections<F>(
    proto: Proto,
    port: u16,
    connections: usize,
    per_connection: usize,
    timeout: Duration,
    nodelay: bool,
    make_request: F,
) -> Vec<TimedResult>
where
    F: Fn(usize, usize) -> Request + Send + Sync + 'static,
{
    let total = connections.saturating_mul(per_connection);
    assert!(
        total <= MAX_CONCURRENT_REQUESTS,
        "{connections} connections x {per_connection} requests exceeds {MAX_CONCURRENT_REQUESTS}"
    );
    let deadline = Instant::now() + timeout;
    let make_request = Arc::new(make_request);
    let unsent = |error: String| TimedResult {
        result: Err(error),
        latency: Duration::ZERO,
    };

    let tasks: Vec<_> = (0..connections)
        .map(|connection_index| {
            let make_request = make_request.clone();
            tokio::spawn(async move {
                let mut results = Vec::with_capacity(per_connection);
                let opened =
                    tokio::time::timeout_at(deadline, Connection::connect(proto, port, nodelay))
                        .await;
                let mut connection = match opened {
                    Ok(Ok(connection)) => connection,
                    Ok(Err(error)) => {
                        results.resize(per_connection, unsent(error));
                        return results;
                    }
                    Err(_) => {
                        let error = format!("opening connection {connection_index} timed out");
                        results.resize(per_connection, unsent(error));
                        return results;
                    }
                };
                for index in 0..per_connection {
                    // `timeout_at` polls its future once even after the
                    // deadline, which could still send a request.
                    if Instant::now() >= deadline {
                        results.push(unsent(format!(
                            "request {index} on connection {connection_index} not sent: \
                             {timeout:?} expired"
                        )));
                        continue;
                    }
                    let request = make_request(connection_index, index);
                    let started = Instant::now();
                    let result =
                        match tokio::time::timeout_at(deadline, connection.send(request)).await {
                            Ok(result) => result,
                            Err(_) => Err(format!(
                                "request {index} on connection {connection_index} \
                                 timed out after {timeout:?}"
                            )),
                        };
                    results.push(TimedResult {
                        result,
                        latency: started.elapsed(),
                    });
                }
                results
            })
        })
        .collect();

    let mut results = Vec::with_capacity(total);
    for task in tasks {
        results.extend(task.await.expect("client task panicked"));
    }
    results
}
