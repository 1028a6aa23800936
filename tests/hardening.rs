//! Bad input, protocol corners, misbehaving targets and per-worker limits,
//! in real Envoy: the primary is never harmed and every side call is
//! counted once.

mod support;

use std::time::Duration;

use bytes::Bytes;
use support::plugin::{created, signup_rule, stat};
use support::{send, send_concurrent, Behaviour, Envoy, EnvoyConfig, Proto, Request, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(15);

/// Reads one gauge from admin `/stats`, which the counter helpers skip.
async fn gauge(envoy: &Envoy, name: &str) -> Option<u64> {
    let (_, text) = envoy
        .admin_get(&format!("/stats?filter=^{name}$"))
        .await
        .ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name}: ")))
        .and_then(|value| value.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes_untouched() {
    let primary = Upstream::start(created()).await;
    let side = Upstream::start(Behaviour::default()).await;
    let envoy = Envoy::start(
        EnvoyConfig::new(primary.port())
            .target("side", side.port(), Proto::Http1)
            .plugin_config(signup_rule("", r#"{"name": "side", "cluster": "side"}"#)),
    )
    .await;

    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", envoy.port()))
        .await
        .unwrap();
    stream
        .write_all(
            b"GET /api/socket HTTP/1.1\r\nhost: users\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
              sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n",
        )
        .await
        .unwrap();
    primary.wait_for_count(1, WAIT).await.unwrap();
    envoy
        .wait_for_counter(&stat("side", "reason.unsupported.skipped"), 1, WAIT)
        .await
        .unwrap();
    drop(stream);

    let upgrade = primary.requests()[0].header("upgrade");
    assert_eq!(
        upgrade.as_deref(),
        Some("websocket"),
        "the upgrade reached the primary untouched"
    );
    assert_eq!(envoy.counter(&stat("side", "dispatched")).await, 0);
    assert_eq!(side.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_marker_stripped_only_when_configured() {
    let primary = Upstream::start(created()).await;
    let side = Upstream::start(Behaviour::default()).await;
    let targets = r#"{"name": "side", "cluster": "side"}"#;
    let base = EnvoyConfig::new(primary.port()).target("side", side.port(), Proto::Http1);
    let opting_out = || Request::post("/api/v1/register", "x").header("x-mesh-fanout", "opt-out");

    // By default a client-supplied marker looks like a loop and wins.
    let trusting = Envoy::start(base.clone().plugin_config(signup_rule("", targets))).await;
    assert_eq!(
        send(Proto::Http1, trusting.port(), opting_out())
            .await
            .unwrap()
            .status,
        201
    );
    trusting
        .wait_for_counter(&stat("side", "reason.loop.skipped"), 1, WAIT)
        .await
        .unwrap();
    assert_eq!(side.count(), 0);
    drop(trusting);

    let edge = Envoy::start(
        base.plugin_config(signup_rule(r#""strip_incoming_marker": true, "#, targets)),
    )
    .await;
    assert_eq!(
        send(Proto::Http2, edge.port(), opting_out())
            .await
            .unwrap()
            .status,
        201
    );
    edge.wait_for_counter(&stat("side", "outcome.success.side_calls"), 1, WAIT)
        .await
        .unwrap();
    assert_eq!(
        side.requests()[0].header("x-mesh-fanout").as_deref(),
        Some("signup/side")
    );
    let last_primary = primary.requests().pop().unwrap();
    assert_eq!(
        last_primary.header("x-mesh-fanout"),
        None,
        "the primary does not see the stripped marker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_cap_skips_excess() {
    let primary = Upstream::start(created()).await;
    let slow = Upstream::start(Behaviour {
        delay: Duration::from_millis(1500),
        ..Behaviour::default()
    })
    .await;
    let envoy = Envoy::start(
        EnvoyConfig::new(primary.port())
            .target("slow", slow.port(), Proto::Http1)
            .plugin_config(signup_rule(
                r#""limits": {"max_in_flight_per_worker": 2}, "#,
                r#"{"name": "slow", "cluster": "slow", "timeout_ms": 5000}"#,
            )),
    )
    .await;

    // One connection stays on one worker, so its cap of 2 applies to all six.
    let results = send_concurrent(Proto::Http1, envoy.port(), 1, 6, WAIT, |_, i| {
        Request::post(&format!("/api/{i}"), "x")
    })
    .await;
    assert!(results
        .iter()
        .all(|r| r.as_ref().is_ok_and(|r| r.status == 201)));
    assert_eq!(envoy.counter(&stat("slow", "dispatched")).await, 2);
    assert_eq!(
        envoy
            .counter(&stat("slow", "reason.in_flight_limit.skipped"))
            .await,
        4
    );

    envoy
        .wait_for_counter(&stat("slow", "outcome.success.side_calls"), 2, WAIT)
        .await
        .unwrap();
    assert_eq!(gauge(&envoy, &stat("slow", "in_flight")).await, Some(0));
    // Room again once the first calls have finished.
    assert_eq!(
        send(Proto::Http1, envoy.port(), Request::post("/api/again", "x"))
            .await
            .unwrap()
            .status,
        201
    );
    envoy
        .wait_for_counter(&stat("slow", "dispatched"), 3, WAIT)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_body_budget_skips_large_bodies() {
    let primary = Upstream::start(created()).await;
    let with_body = Upstream::start(Behaviour::default()).await;
    let headers_only = Upstream::start(Behaviour::default()).await;
    let envoy = Envoy::start(
        EnvoyConfig::new(primary.port())
            .target("with_body", with_body.port(), Proto::Http1)
            .target("headers_only", headers_only.port(), Proto::Http1)
            .plugin_config(signup_rule(
                r#""limits": {"max_body_bytes_per_worker": 1000}, "#,
                r#"{"name": "with_body", "cluster": "with_body"},
                   {"name": "headers_only", "cluster": "headers_only", "body": false}"#,
            )),
    )
    .await;

    let small = vec![b'a'; 900];
    let large = vec![b'b'; 1500];
    for body in [small.clone(), large.clone()] {
        let response = send(
            Proto::Http1,
            envoy.port(),
            Request::post("/api/upload", body),
        )
        .await
        .unwrap();
        assert_eq!(response.status, 201);
    }
    envoy
        .wait_for_counter(&stat("headers_only", "outcome.success.side_calls"), 2, WAIT)
        .await
        .unwrap();
    envoy
        .wait_for_counter(&stat("with_body", "outcome.success.side_calls"), 1, WAIT)
        .await
        .unwrap();
    assert_eq!(
        envoy
            .counter(&stat("with_body", "reason.buffer_limit.skipped"))
            .await,
        1
    );
    assert_eq!(with_body.requests()[0].body.as_ref(), small.as_slice());
    let primary_bodies: Vec<Bytes> = primary.requests().into_iter().map(|r| r.body).collect();
    assert_eq!(primary_bodies, vec![Bytes::from(small), Bytes::from(large)]);
}

/// Serves raw bytes to every connection, then closes it.
async fn raw_server(reply: &'static [u8]) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 65536];
                let _ = socket.read(&mut buffer).await;
                let _ = socket.write_all(reply).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_targets_classified() {
    let primary = Upstream::start(created()).await;
    let huge = Upstream::start(Behaviour {
        body: Bytes::from(vec![b'z'; 8 * 1024 * 1024]),
        ..Behaviour::default()
    })
    .await;
    let garbage = raw_server(b"SSH-2.0-OpenSSH_9.0\r\n\r\nnot http at all").await;
    let cut_short =
        raw_server(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly a few bytes").await;
    let envoy = Envoy::start(
        EnvoyConfig::new(primary.port())
            .target("huge", huge.port(), Proto::Http1)
            .target("garbage", garbage, Proto::Http1)
            .target("cut_short", cut_short, Proto::Http1)
            .plugin_config(signup_rule(
                "",
                r#"{"name": "huge", "cluster": "huge", "timeout_ms": 5000},
                   {"name": "garbage", "cluster": "garbage"},
                   {"name": "cut_short", "cluster": "cut_short"}"#,
            )),
    )
    .await;

    for proto in [Proto::Http1, Proto::Http2, Proto::Http1] {
        let response = send(proto, envoy.port(), Request::post("/api/v1/register", "x"))
            .await
            .unwrap();
        assert_eq!(response.status, 201);
        assert_eq!(response.body.as_ref(), b"created");
    }
    envoy
        .wait_for_counter(&stat("huge", "outcome.success.side_calls"), 3, WAIT)
        .await
        .unwrap();
    envoy
        .wait_for_counter(&stat("garbage", "outcome.reset.side_calls"), 3, WAIT)
        .await
        .unwrap();
    envoy
        .wait_for_counter(&stat("cut_short", "outcome.reset.side_calls"), 3, WAIT)
        .await
        .unwrap();
    for target in ["huge", "garbage", "cut_short"] {
        assert_eq!(
            gauge(&envoy, &stat(target, "in_flight")).await,
            Some(0),
            "{target}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_headers_path_and_methods() {
    let primary = Upstream::start(created()).await;
    let side = Upstream::start(Behaviour::default()).await;
    let envoy = Envoy::start(
        EnvoyConfig::new(primary.port())
            .target("side", side.port(), Proto::Http1)
            .plugin_config(signup_rule("", r#"{"name": "side", "cluster": "side"}"#)),
    )
    .await;

    let long_path = format!("/api/{}?q={}", "p".repeat(2000), "v".repeat(2000));
    // hyper, the test upstream, accepts at most 100 headers per request.
    let big_value = "x".repeat(30 * 1024);
    let mut request = Request::post(&long_path, "payload")
        .header("x-big", &big_value)
        .header("x-empty", "")
        .header("x-repeat", "one")
        .header("x-repeat", "two");
    for i in 0..60 {
        request = request.header(&format!("x-many-{i}"), format!("value-{i}"));
    }
    assert_eq!(
        send(Proto::Http1, envoy.port(), request)
            .await
            .unwrap()
            .status,
        201
    );
    side.wait_for_count(1, WAIT).await.unwrap();
    let copy = &side.requests()[0];
    assert_eq!(copy.path, long_path);
    assert_eq!(copy.header("x-big").as_deref(), Some(big_value.as_str()));
    assert_eq!(copy.header("x-empty").as_deref(), Some(""));
    assert_eq!(
        copy.header_values("x-repeat"),
        vec![b"one".as_slice(), b"two".as_slice()]
    );
    for i in 0..60 {
        assert_eq!(
            copy.header(&format!("x-many-{i}")),
            Some(format!("value-{i}"))
        );
    }
    assert_eq!(copy.body.as_ref(), b"payload");

    for method in ["HEAD", "OPTIONS", "DELETE"] {
        let response = send(
            Proto::Http2,
            envoy.port(),
            Request::new(method, "/api/resource"),
        )
        .await
        .unwrap();
        assert_eq!(response.status, 201, "{method}");
    }
    let expect_continue =
        Request::post("/api/continue", "after continue").header("expect", "100-continue");
    assert_eq!(
        send(Proto::Http1, envoy.port(), expect_continue)
            .await
            .unwrap()
            .status,
        201
    );

    side.wait_for_count(5, WAIT).await.unwrap();
    // Shadows are fire-and-forget, and with two workers they can reach the
    // side upstream in any order.
    let mut methods: Vec<String> = side
        .requests()
        .iter()
        .map(|r| r.method.to_string())
        .collect();
    methods.sort();
    assert_eq!(methods, vec!["DELETE", "HEAD", "OPTIONS", "POST", "POST"]);
    let continued: Vec<bool> = side
        .requests()
        .iter()
        .map(|r| r.body.as_ref() == b"after continue")
        .collect();
    assert_eq!(continued.iter().filter(|&&c| c).count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_large_bodies_stay_bounded() {
    let primary = Upstream::start(created()).await;
    let side = Upstream::start(Behaviour::default()).await;
    let envoy = Envoy::start(
        EnvoyConfig::new(primary.port())
            .target("side", side.port(), Proto::Http1)
            .plugin_config(signup_rule(
                r#""limits": {"max_body_bytes_per_worker": 8388608}, "#,
                r#"{"name": "side", "cluster": "side", "max_body_bytes": 4194304, "timeout_ms": 10000}"#,
            )),
    )
    .await;

    // Twelve 3 MiB uploads on six connections: more than the 8 MiB budget
    // of a worker if they overlap, so some may be skipped, but none may
    // crash the VM or go uncounted.
    const LEN: usize = 3 * 1024 * 1024;
    let results = send_concurrent(Proto::Http1, envoy.port(), 6, 2, WAIT, |c, i| {
        let body: Vec<u8> = (0..LEN).map(|n| ((n + c * 7 + i) % 256) as u8).collect();
        let chunks: Vec<Bytes> = body.chunks(64 * 1024).map(Bytes::copy_from_slice).collect();
        Request::post(&format!("/api/upload/{c}/{i}"), Bytes::new()).chunked(chunks)
    })
    .await;
    assert!(results
        .iter()
        .all(|r| r.as_ref().is_ok_and(|r| r.status == 201)));

    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let counters = envoy
            .counters_matching("wasmcustom.mesh_fanout.rule.signup.target.side.")
            .await;
        let settled: u64 = counters
            .iter()
            .filter(|(name, _)| name.ends_with(".side_calls") || name.ends_with(".skipped"))
            .map(|(_, value)| value)
            .sum();
        if settled == 12 {
            let sent = counters
                .get(&stat("side", "outcome.success.side_calls"))
                .copied()
                .unwrap_or(0);
            let skipped = counters
                .get(&stat("side", "reason.buffer_limit.skipped"))
                .copied()
                .unwrap_or(0);
            assert_eq!(sent + skipped, 12, "{counters:#?}");
            assert_eq!(side.count() as u64, sent);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{counters:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for copy in side.requests() {
        assert_eq!(copy.body.len(), LEN, "{}", copy.path);
    }
    for original in primary.requests() {
        assert_eq!(original.body.len(), LEN, "{}", original.path);
    }

    // The VMs survived and keep copying.
    let before = side.count();
    let response = send(
        Proto::Http2,
        envoy.port(),
        Request::post("/api/after", "small"),
    )
    .await
    .unwrap();
    assert_eq!(response.status, 201);
    side.wait_for_count(before + 1, WAIT).await.unwrap();
    assert!(
        !envoy.log_text().contains("memory allocation"),
        "{}",
        envoy.log_tail(40)
    );
}

/// A request body that ends with trailers, as gRPC clients send.
struct TrailingBody {
    frames: std::collections::VecDeque<hyper::body::Frame<Bytes>>,
}

impl hyper::body::Body for TrailingBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.frames.pop_front().map(Ok))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_request_with_trailers_copied_at_end() {
    let primary = Upstream::start(created()).await;
    let side = Upstream::start(Behaviour::default()).await;
    let envoy = Envoy::start(
        EnvoyConfig::new(primary.port())
            .primary_proto(Proto::Http2)
            .target("side", side.port(), Proto::Http2)
            .plugin_config(signup_rule("", r#"{"name": "side", "cluster": "side"}"#)),
    )
    .await;

    // A gRPC-style message: a 5-byte length prefix, then the payload.
    let payload = b"\x00\x00\x00\x00\x05hello".to_vec();
    let mut trailers = hyper::HeaderMap::new();
    trailers.insert("x-checksum", "abc".parse().unwrap());
    let body = TrailingBody {
        frames: [
            hyper::body::Frame::data(Bytes::copy_from_slice(&payload[..4])),
            hyper::body::Frame::data(Bytes::copy_from_slice(&payload[4..])),
            hyper::body::Frame::trailers(trailers),
        ]
        .into_iter()
        .collect(),
    };
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", envoy.port()))
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let request = hyper::Request::post(format!(
        "http://127.0.0.1:{}/api/pkg.Service/Call",
        envoy.port()
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(body)
    .unwrap();
    let response = tokio::time::timeout(WAIT, sender.send_request(request))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 201);

    envoy
        .wait_for_counter(&stat("side", "outcome.success.side_calls"), 1, WAIT)
        .await
        .unwrap();
    let copy = &side.requests()[0];
    assert_eq!(
        copy.body.as_ref(),
        payload.as_slice(),
        "the side call has the whole body"
    );
    assert_eq!(
        copy.header("content-type").as_deref(),
        Some("application/grpc")
    );
    assert_eq!(
        copy.header("te").as_deref(),
        Some("trailers"),
        "gRPC servers require te: trailers"
    );
    assert_eq!(primary.requests()[0].body.as_ref(), payload.as_slice());
}
