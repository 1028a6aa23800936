//! Minimal HTTP/1.1 upstream for `make bench`.
//!
//! Unlike examples/support/upstream.rs, it keeps nothing per request: it
//! reads and drops the body, waits for the delay that the request header
//! sets, and returns `200 ok`. One process serves several ports on one thread, so
//! the benchmark can pin it to one core.
//!
//! ```text
//! cargo run --release --example bench_upstream -- --listeners 2
//! ```
//!
//! It prints `listening 127.0.0.1:PORT ...` once every port is bound, then
//! serves until it is killed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Request header that sets the wait before the response, in microseconds.
/// Missing or invalid values mean no wait.
const DELAY_HEADER: &str = "x-bench-delay-us";
/// Longest accepted delay, so a typo cannot hold connections for hours.
const MAX_DELAY: Duration = Duration::from_secs(10);
const MAX_LISTENERS: usize = 16;

const USAGE: &str = "\
usage: bench_upstream [--listeners N] [--slow-listener-delay-us US]

Serves HTTP/1.1 on N ports of 127.0.0.1 (default 1, at most 16) chosen by the
OS, prints `listening 127.0.0.1:PORT ...` and serves until killed. Every
response is `200 ok`, sent after the delay in the request header
x-bench-delay-us (microseconds, at most 10 s; none when missing).

--slow-listener-delay-us adds one more port, printed last, whose responses
wait US microseconds when the request sets no delay. Envoy's built-in mirror
copies the client's headers and cannot add one, so this is its slow side.";

struct Options {
    listeners: usize,
    slow_listener_delay: Option<Duration>,
}

fn parse_options(mut args: impl Iterator<Item = String>) -> Result<Option<Options>, String> {
    let mut listeners = 1;
    let mut slow_listener_delay = None;
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--slow-listener-delay-us" => {
                let value = args
                    .next()
                    .ok_or("missing value for --slow-listener-delay-us")?;
                let delay = value
                    .parse::<u64>()
                    .ok()
                    .map(Duration::from_micros)
                    .filter(|delay| !delay.is_zero() && *delay <= MAX_DELAY)
                    .ok_or_else(|| {
                        format!("invalid value {value:?} for --slow-listener-delay-us; use 1 to 10000000")
                    })?;
                slow_listener_delay = Some(delay);
            }
            "--listeners" => {
                let value = args.next().ok_or("missing value for --listeners")?;
                listeners = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LISTENERS).contains(n))
                    .ok_or_else(|| {
                        format!("invalid value {value:?} for --listeners; use 1 to {MAX_LISTENERS}")
                    })?;
            }
            _ => return Err(format!("unknown option {flag:?}")),
        }
    }
    Ok(Some(Options {
        listeners,
        slow_listener_delay,
    }))
}

fn main() -> ExitCode {
    let options = match parse_options(std::env::args().skip(1)) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("error: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // One thread: the benchmark gives this process a single core.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the tokio runtime failed: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(options: Options) -> Result<(), String> {
    let delays = std::iter::repeat_n(Duration::ZERO, options.listeners)
        .chain(options.slow_listener_delay)
        .collect::<Vec<_>>();
    let mut addresses = Vec::with_capacity(delays.len());
    let mut accept_tasks = Vec::with_capacity(delays.len());
    for default_delay in delays {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("binding 127.0.0.1:0 failed: {e}"))?;
        let address = listener
            .local_addr()
            .map_err(|e| format!("reading the bound address failed: {e}"))?;
        addresses.push(address.to_string());
        accept_tasks.push(tokio::spawn(accept_loop(listener, address, default_delay)));
    }
    println!("listening {}", addresses.join(" "));

    for task in accept_tasks {
        task.await.map_err(|e| format!("accept task failed: {e}"))?;
    }
    Ok(())
}

async fn accept_loop(listener: TcpListener, address: SocketAddr, default_delay: Duration) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                eprintln!("bench_upstream {address}: accept failed: {error}");
                // Back off so a persistent error (EMFILE) does not spin the core.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if let Err(error) = stream.set_nodelay(true) {
            eprintln!("bench_upstream {address}: setting TCP_NODELAY failed: {error}");
        }
        tokio::spawn(async move {
            // Errors here are peers hanging up, which Envoy does when it drains.
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(
                    TokioIo::new(stream),
                    service_fn(move |request| respond(request, default_delay)),
                )
                .await;
        });
    }
}

async fn respond(
    request: hyper::Request<Incoming>,
    default_delay: Duration,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let delay = request
        .headers()
        .get(DELAY_HEADER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok())
        .map_or(default_delay, |us| Duration::from_micros(us).min(MAX_DELAY));

    // Read the body to the end and drop each frame, so a 64 KiB upload costs
    // no allocation beyond hyper's read buffer.
    let mut body = request.into_body();
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            break;
        }
    }

    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    Ok(hyper::Response::new(Full::new(Bytes::from_static(b"ok"))))
}
