//! Shadow mode end to end: the release .wasm in real Envoy (two workers),
//! real upstreams and real HTTP/1.1 and HTTP/2 clients.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mesh_fanout::core::sampling;
use support::{
    send, send_concurrent, Behaviour, Envoy, EnvoyConfig, Proto, RecordedRequest, Request, Upstream,
};
use tokio::io::AsyncWriteExt;

const WAIT: Duration = Duration::from_secs(15);

/// Builds a plugin configuration with one rule, "signup", that shadows every
/// request under /api to `targets` (a JSON array body).
fn signup_rule(targets: &str) -> String {
    format!(
        r#"{{"rules": [{{"name": "signup", "match": {{"path": {{"prefix": "/api"}}}}, "targets": [{targets}]}}]}}"#
    )
}

fn outcome_stat(target: &str, outcome: &str) -> String {
    format!("wasmcustom.mesh_fanout.rule.signup.target.{target}.outcome.{outcome}.side_calls")
}

fn skip_stat(target: &str, reason: &str) -> String {
    format!("wasmcustom.mesh_fanout.rule.signup.target.{target}.reason.{reason}.skipped")
}

fn dispatched_stat(target: &str) -> String {
    format!("wasmcustom.mesh_fanout.rule.signup.target.{target}.dispatched")
}

const MATCHED: &str = "wasmcustom.mesh_fanout.rule.signup.matched";

/// Sums every outcome and skip of one target: once all calls are done it
/// equals the number of matched requests.
async fn settled(envoy: &Envoy, target: &str) -> u64 {
    let prefix = format!("wasmcustom.mesh_fanout.rule.signup.target.{target}.");
    envoy
        .counters_matching(&prefix)
        .await
        .iter()
        .filter(|(name, _)| name.ends_with(".side_calls") || name.ends_with(".skipped"))
        .map(|(_, value)| value)
        .sum()
}

async fn wait_settled(envoy: &Envoy, target: &str, expected: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = settled(envoy, target).await;
        if now == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "target {target}: {now} outcomes and skips, expected {expected}; counters: {:#?}",
            envoy.counters_matching("wasmcustom.").await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn created() -> Behaviour {
    Behaviour {
        status: 201,
        body: Bytes::from_static(b"created"),
        ..Behaviour::default()
    }
}

fn binary_body(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 256) as u8).collect()
}

fn header<'a>(request: &'a RecordedRequest, name: &str) -> Option<&'a [u8]> {
    request.header_values(name).first().copied()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_bytes_exact_both_protocols() {
    let primary = Upstream::start(created()).await;
    let analytics = Upstream::start(Behaviour::default()).await;
    let audit = Upstream::start(Behaviour::default()).await;
    let plugin = signup_rule(
        r#"{"name": "analytics", "cluster": "analytics", "authority": "analytics.internal", "path": "/ingest",
            "headers": {"set": {"x-source": "mesh-fanout"}, "remove": ["authorization"]}},
           {"name": "audit", "cluster": "audit", "strip_credentials": false}"#,
    );
    let envoy = Envoy::start(
        EnvoyConfig::new(primary.port())
            .target("analytics", analytics.port(), Proto::Http1)
            .target("audit", audit.port(), Proto::Http2)
            .plugin_config(plugin),
    )
    .await;

    let body = binary_body(10 * 1024);
    let chunks: Vec<Bytes> = body.chunks(100).map(Bytes::copy_from_slice).collect();
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let requests = [
        (
            Proto::Http1,
            Request::post("/api/v1/register?ref=1", Bytes::new()).chunked(chunks.clone()),
        ),
        (
            Proto::Http2,
            Request::post("/api/v1/register?ref=2", body.clone()),
        ),
        (
            Proto::Http2,
            Request::post("/api/v1/register?ref=3", Bytes::new()).chunked(chunks),
        ),
    ];
    for (proto, request) in requests {
        let request = request
            .header("authorization", "Bearer secret")
            .header("traceparent", traceparent)
            .header("cookie", "session=1");
        let response = send(proto, envoy.port(), request).await.unwrap();
        assert_eq!(response.status, 201, "{proto:?}");
        assert_eq!(response.body.as_ref(), b"created", "{proto:?}");
    }

    analytics.wait_for_count(3, WAIT).await.unwrap();
    audit.wait_for_count(3, WAIT).await.unwrap();
    envoy
        .wait_for_counter(&outcome_stat("analytics", "success"), 3, WAIT)
        .await
        .unwrap();
    envoy
        .wait_for_counter(&outcome_stat("audit", "success"), 3, WAIT)
        .await
        .unwrap();

    for original in primary.requests() {
        assert_eq!(
            original.body.as_ref(),
            body.as_slice(),
            "primary body for {}",
            original.path
        );
        assert_eq!(
            header(&original, "authorization"),
            Some(b"Bearer secret".as_slice())
        );
        assert_eq!(
            header(&original, "x-mesh-fanout"),
            None,
            "the primary request is unchanged"
        );
    }
    let primary_ids: BTreeSet<Vec<u8>> = primary
        .requests()
        .iter()
        .map(|r| header(r, "x-request-id").unwrap().to_vec())
        .collect();
    assert_eq!(primary_ids.len(), 3);

    for side in analytics.requests() {
        assert_eq!(side.method, "POST");
        assert_eq!(side.path, "/ingest");
        assert_eq!(side.body.as_ref(), body.as_slice());
        assert_eq!(
            header(&side, "host"),
            Some(b"analytics.internal".as_slice())
        );
        assert_eq!(header(&side, "x-source"), Some(b"mesh-fanout".as_slice()));
        assert_eq!(header(&side, "authorization"), None);
        assert_eq!(
            header(&side, "cookie"),
            None,
            "credentials are stripped by default"
        );
        assert_eq!(
            header(&side, "x-mesh-fanout"),
            Some(b"signup/analytics".as_slice())
        );
        assert_eq!(header(&side, "content-length"), Some(b"10240".as_slice()));
        assert_eq!(header(&side, "transfer-encoding"), None);
        assert_eq!(header(&side, "traceparent"), Some(traceparent.as_bytes()));
        assert!(primary_ids.contains(header(&side, "x-request-id").unwrap()));
    }
    let mut audit_paths: Vec<String> = audit.requests().iter().map(|r| r.path.clone()).collect();
    audit_paths.sort();
    assert_eq!(
        audit_paths,
        vec![
            "/api/v1/register?ref=1",
            "/api/v1/register?ref=2",
            "/api/v1/register?ref=3"
        ]
    );
    for side in audit.requests() {
        assert_eq!(side.body.as_ref(), body.as_slice());
        assert_eq!(
            header(&side, "authorization"),
            Some(b"Bearer secret".as_slice())
        );
        assert_eq!(header(&side, "cookie"), Some(b"session=1".as_slice()));
        assert_eq!(
            header(&side, "x-mesh-fanout"),
            Some(b"signup/audit".as_slice())
        );
    }
    assert_eq!(envoy.counter(MATCHED).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_target_does_not_delay_client() {
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
                r#"{"name": "slow", "cluster": "slow", "timeout_ms": 5000}"#,
            )),
    )
    .await;

    for proto in [Proto::Http1, Proto::Http2] {
        let started = Instant::now();
        let response = send(proto, envoy.port(), Request::post("/api/v1/register", "{}"))
            .await
            .unwrap();
        let elapsed = started.elapsed();
        assert_eq!(response.status, 201);
        assert!(
            elapsed < Duration::from_millis(1000),
            "{proto:?} client waited {elapsed:?}"
        );
    }
    // The client already has both responses while the side calls are
    // still running, and their outcomes arrive afterwards.
    assert_eq!(envoy.counter(&outcome_stat("slow", "success")).await, 0);
    envoy
        .wait_for_counter(&outcome_stat("slow", "success"), 2, WAIT)
        .await
        .unwrap();
    assert_eq!(slow.count(), 2);
    assert_eq!(settled(&envoy, "slow").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_targets_classified() {
    let primary = Upstream::start(created()).await;
    let slow = Upstream::start(Behaviour {
        delay: Duration::from_millis(2000),
        ..Behaviour::default()
    })
    .await;
    let resetting = Upstream::start(Behaviour {
        reset: true,
        ..Behaviour::default()
    })
    .await;
    let failing = Upstream::start(Behaviour {
        status: 500,
        ..Behaviour::default()
    })
    .await;
    let missing = Upstream::start(Behaviour {
        status: 404,
        ..Behaviour::default()
    })
    .await;
    let plugin = signup_rule(
        r#"{"name": "down", "cluster": "down"},
           {"name": "ghost", "cluster": "no_such_cluster"},
           {"name": "slow", "cluster": "slow", "timeout_ms": 100},
           {"name": "resetting", "cluster": "resetting"},
           {"name": "failing", "cluster": "failing"},
           {"name": "missing", "cluster": "missing"}"#,
    );
    let envoy = Envoy::start(
        EnvoyConfig::new(primary.port())
            .down_target("down")
            .target("slow", slow.port(), Proto::Http1)
            .target("resetting", resetting.port(), Proto::Http1)
            .target("failing", failing.port(), Proto::Http2)
            .target("missing", missing.port(), Proto::Http1)
            .plugin_config(plugin),
    )
    .await;

    const REQUESTS: u64 = 10;
    for i in 0..REQUESTS {
        let proto = if i % 2 == 0 {
            Proto::Http1
        } else {
            Proto::Http2
        };
        let response = send(proto, envoy.port(), Request::post("/api/orders", "x"))
            .await
            .unwrap();
        assert_eq!(response.status, 201, "the primary is never harmed");
        assert_eq!(response.body.as_ref(), b"created");
    }

    let expected = [
        ("down", "reset"),
        ("ghost", "dispatch_error"),
        ("slow", "timeout"),
        ("resetting", "reset"),
        ("failing", "5xx"),
        ("missing", "4xx"),
    ];
    for (target, outcome) in expected {
        envoy
            .wait_for_counter(&outcome_stat(target, outcome), REQUESTS, WAIT)
            .await
            .unwrap();
        wait_settled(&envoy, target, REQUESTS).await;
    }
    assert_eq!(envoy.counter(&dispatched_stat("ghost")).await, 0);
    assert_eq!(envoy.counter(&dispatched_stat("down")).await, REQUESTS);
    assert_eq!(primary.count(), REQUESTS as usize);

    let prometheus = envoy.prometheus_text().await;
    let line = format!(
        "mesh_fanout_side_calls{{rule=\"signup\",target=\"failing\",outcome=\"5xx\"}} {REQUESTS}"
    );
    assert!(
        prometheus.lines().any(|l| l == line),
        "missing `{line}` in:\n{prometheus}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_limit_skipped() {
    let primary = Upstream::start(created()).await;
    let with_body = Upstream::start(Behaviour::default()).await;
    let headers_only = Upstream::start(Behaviour::default()).await;
    let plugin = signup_rule(
        r#"{"name": "with_body", "cluster": "with_body", "max_body_bytes": 1000},
           {"name": "headers_only", "cluster": "headers_only", "body": false, "max_body_bytes": 10}"#,
    );
    let envoy = Envoy::start(
        EnvoyConfig::new(primary.port())
            .target("with_body", with_body.port(), Proto::Http1)
            .target("headers_only", headers_only.port(), Proto::Http1)
            .plugin_config(plugin),
    )
    .await;

    let at_limit = binary_body(1000);
    let over_limit = binary_body(1001);
    let small_chunks: Vec<Bytes> = over_limit.chunks(7).map(Bytes::copy_from_slice).collect();
    let requests = [
        (
            Proto::Http1,
            Request::post("/api/at-limit", at_limit.clone()),
        ),
        (
            Proto::Http2,
            Request::post("/api/over-limit", over_limit.clone()),
        ),
        (
            Proto::Http1,
            Request::post("/api/over-limit-chunked", Bytes::new()).chunked(small_chunks),
        ),
    ];
    for (proto, request) in requests {
        assert_eq!(
            send(proto, envoy.port(), request).await.unwrap().status,
            201
        );
    }

    wait_settled(&envoy, "with_body", 3).await;
    wait_settled(&envoy, "headers_only", 3).await;
    assert_eq!(
        envoy.counter(&outcome_stat("with_body", "success")).await,
        1
    );
    assert_eq!(
        envoy
            .counter(&skip_stat("with_body", "body_too_large"))
            .await,
        2
    );
    assert_eq!(
        envoy
            .counter(&outcome_stat("headers_only", "success"))
            .await,
        3
    );

    let sent = with_body.requests();
    assert_eq!(sent.len(), 1, "a truncated body is never sent");
    assert_eq!(sent[0].path, "/api/at-limit");
    assert_eq!(sent[0].body.as_ref(), at_limit.as_slice());

    for side in headers_only.requests() {
        assert!(side.body.is_empty(), "{} carried a body", side.path);
        assert_eq!(header(&side, "content-length").unwrap_or(b"0"), b"0");
    }
    for original in primary.requests() {
        let expected = if original.path == "/api/at-limit" {
            &at_limit
        } else {
            &over_limit
        };
        assert_eq!(
            original.body.as_ref(),
            expected.as_slice(),
            "{}",
            original.path
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_into_same_listener_stops() {
    let primary = Upstream::start(created()).await;
    let config = EnvoyConfig::new(primary.port());
    let own_port = config.port();
    // The target cluster points back at this Envoy's own listener, so the
    // side call comes back through the filter and matches the rule again.
    let config = config
        .target("itself", own_port, Proto::Http1)
        .plugin_config(signup_rule(r#"{"name": "itself", "cluster": "itself"}"#));
    let envoy = Envoy::start(config).await;

    let response = send(
        Proto::Http1,
        envoy.port(),
        Request::post("/api/v1/register", "once"),
    )
    .await
    .unwrap();
    assert_eq!(response.status, 201);

    envoy
        .wait_for_counter(&outcome_stat("itself", "success"), 1, WAIT)
        .await
        .unwrap();
    envoy
        .wait_for_counter(&skip_stat("itself", "loop"), 1, WAIT)
        .await
        .unwrap();
    assert_eq!(envoy.counter(MATCHED).await, 2);
    assert_eq!(envoy.counter(&dispatched_stat("itself")).await, 1);
    let arrivals = primary.requests();
    assert_eq!(arrivals.len(), 2, "the original and one looped side call");
    let marked = arrivals
        .iter()
        .filter(|r| header(r, "x-mesh-fanout").is_some())
        .count();
    assert_eq!(marked, 1);
    assert!(arrivals.iter().all(|r| r.body.as_ref() == b"once"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_consistent_across_targets_and_workers() {
    let primary = Upstream::start(created()).await;
    let first = Upstream::start(Behaviour::default()).await;
    let second = Upstream::start(Behaviour::default()).await;
    let plugin = signup_rule(
        r#"{"name": "first", "cluster": "first", "sample_percent": 30},
           {"name": "second", "cluster": "second", "sample_percent": 30, "sample_key": "x-request-id"}"#,
    );
    let envoy = Envoy::start(
        EnvoyConfig::new(primary.port())
            .target("first", first.port(), Proto::Http1)
            .target("second", second.port(), Proto::Http2)
            .plugin_config(plugin),
    )
    .await;

    const CONNECTIONS: usize = 4;
    const PER_CONNECTION: usize = 50;
    let mut expected = BTreeSet::new();
    for proto in [Proto::Http1, Proto::Http2] {
        let results = send_concurrent(
            proto,
            envoy.port(),
            CONNECTIONS,
            PER_CONNECTION,
            WAIT,
            move |c, i| {
                Request::post("/api/v1/register", "{}")
                    .header("x-request-id", format!("{proto:?}-{c}-{i}"))
            },
        )
        .await;
        assert!(results
            .iter()
            .all(|r| r.as_ref().is_ok_and(|r| r.status == 201)));
        for c in 0..CONNECTIONS {
            for i in 0..PER_CONNECTION {
                let id = format!("{proto:?}-{c}-{i}");
                if sampling::bucket(id.as_bytes()) < 300_000 {
                    expected.insert(id);
                }
            }
        }
    }
    let total = (2 * CONNECTIONS * PER_CONNECTION) as u64;
    wait_settled(&envoy, "first", total).await;
    wait_settled(&envoy, "second", total).await;

    let ids = |upstream: &Upstream| -> BTreeSet<String> {
        upstream
            .requests()
            .iter()
            .map(|r| r.header("x-request-id").unwrap())
            .collect()
    };
    assert!(!expected.is_empty());
    assert_eq!(ids(&first), expected);
    assert_eq!(ids(&second), expected);
    let sampled_out = total - expected.len() as u64;
    assert_eq!(
        envoy.counter(&skip_stat("first", "sampled_out")).await,
        sampled_out
    );
    assert_eq!(
        envoy.counter(&skip_stat("second", "sampled_out")).await,
        sampled_out
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_header_value_survives() {
    let primary = Upstream::start(created()).await;
    let side = Upstream::start(Behaviour::default()).await;
    let plugin = r#"{"rules": [{"name": "signup",
        "match": {"path": {"prefix": "/api"}, "headers": [{"name": "x-name", "regex": "caf.*"}]},
        "targets": [{"name": "side", "cluster": "side"}]},
        {"name": "fallback", "match": {"path": {"prefix": "/api"}}, "targets": [{"name": "side", "cluster": "side"}]}]}"#;
    let envoy = Envoy::start(
        EnvoyConfig::new(primary.port())
            .target("side", side.port(), Proto::Http1)
            .plugin_config(plugin),
    )
    .await;

    for proto in [Proto::Http1, Proto::Http2] {
        let request = Request::post("/api/v1/register", "x").header("x-name", b"caf\xe9\xff");
        let response = send(proto, envoy.port(), request).await.unwrap();
        assert_eq!(response.status, 201);
    }
    side.wait_for_count(2, WAIT).await.unwrap();
    for recorded in side.requests() {
        assert_eq!(header(&recorded, "x-name"), Some(b"caf\xe9\xff".as_slice()));
        // A regex cannot match bytes that are not UTF-8, so the second rule
        // took these requests.
        assert_eq!(
            header(&recorded, "x-mesh-fanout"),
            Some(b"fallback/side".as_slice())
        );
    }

    // The VMs on both workers are still alive and keep serving.
    let results = send_concurrent(Proto::Http1, envoy.port(), 4, 10, WAIT, |_, _| {
        Request::post("/api/v1/register", "y").header("x-name", "cafe")
    })
    .await;
    assert!(results
        .iter()
        .all(|r| r.as_ref().is_ok_and(|r| r.status == 201)));
    side.wait_for_count(42, WAIT).await.unwrap();
    assert_eq!(
        envoy
            .counter("wasmcustom.mesh_fanout.rule.signup.matched")
            .await,
        40
    );
    assert_eq!(
        envoy
            .counter("wasmcustom.mesh_fanout.rule.fallback.matched")
            .await,
        2
    );
    assert!(
        !envoy.log_text().contains("panicked"),
        "{}",
        envoy.log_tail(40)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_add_up_under_load() {
    let primary = Upstream::start(created()).await;
    let flaky = Upstream::start(Behaviour {
        fail_every: 3,
        ..Behaviour::default()
    })
    .await;
    let sampled = Upstream::start(Behaviour::default()).await;
    let plugin = signup_rule(
        r#"{"name": "flaky", "cluster": "flaky"},
           {"name": "sampled", "cluster": "sampled", "sample_percent": 50, "sample_key": "x-no-such-header"}"#,
    );
    let envoy = Envoy::start(
        EnvoyConfig::new(primary.port())
            .target("flaky", flaky.port(), Proto::Http2)
            .target("sampled", sampled.port(), Proto::Http1)
            .plugin_config(plugin),
    )
    .await;

    let mut responses = send_concurrent(Proto::Http1, envoy.port(), 4, 40, WAIT, |c, i| {
        Request::post(&format!("/api/h1/{c}/{i}"), format!("body-{c}-{i}"))
    })
    .await;
    responses.extend(
        send_concurrent(Proto::Http2, envoy.port(), 4, 35, WAIT, |c, i| {
            Request::post(&format!("/api/h2/{c}/{i}"), format!("body-{c}-{i}"))
        })
        .await,
    );
    assert_eq!(responses.len(), 300);
    for response in &responses {
        let response = response.as_ref().unwrap();
        assert_eq!(response.status, 201);
        assert_eq!(response.body.as_ref(), b"created");
    }

    wait_settled(&envoy, "flaky", 300).await;
    wait_settled(&envoy, "sampled", 300).await;
    assert_eq!(envoy.counter(MATCHED).await, 300);
    assert_eq!(primary.count(), 300);

    assert_eq!(envoy.counter(&dispatched_stat("flaky")).await, 300);
    assert_eq!(envoy.counter(&outcome_stat("flaky", "success")).await, 200);
    assert_eq!(envoy.counter(&outcome_stat("flaky", "5xx")).await, 100);
    assert_eq!(flaky.count(), 300);

    // Without the sampling key, each worker decides at random.
    let dispatched = envoy.counter(&dispatched_stat("sampled")).await;
    let sampled_out = envoy.counter(&skip_stat("sampled", "sampled_out")).await;
    assert_eq!(dispatched + sampled_out, 300);
    assert!(
        (90..=210).contains(&dispatched),
        "{dispatched} of 300 sampled at 50 %"
    );
    assert_eq!(
        envoy.counter(&outcome_stat("sampled", "success")).await,
        dispatched
    );
    assert_eq!(sampled.count() as u64, dispatched);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_request_never_sent() {
    let primary = Upstream::start(created()).await;
    let side = Upstream::start(Behaviour::default()).await;
    let envoy = Envoy::start(
        EnvoyConfig::new(primary.port())
            .target("side", side.port(), Proto::Http1)
            .plugin_config(signup_rule(r#"{"name": "side", "cluster": "side"}"#)),
    )
    .await;

    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", envoy.port()))
        .await
        .unwrap();
    stream
        .write_all(b"POST /api/v1/register HTTP/1.1\r\nhost: users\r\ncontent-length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    stream.flush().await.unwrap();
    envoy.wait_for_counter(MATCHED, 1, WAIT).await.unwrap();
    drop(stream);

    envoy
        .wait_for_counter(&skip_stat("side", "aborted"), 1, WAIT)
        .await
        .unwrap();
    assert_eq!(settled(&envoy, "side").await, 1);
    assert_eq!(envoy.counter(&dispatched_stat("side")).await, 0);
    assert_eq!(side.count(), 0);

    // The next complete request on a new connection is shadowed as usual.
    let response = send(
        Proto::Http1,
        envoy.port(),
        Request::post("/api/v1/register", "0123456789"),
    )
    .await
    .unwrap();
    assert_eq!(response.status, 201);
    envoy
        .wait_for_counter(&outcome_stat("side", "success"), 1, WAIT)
        .await
        .unwrap();
    assert_eq!(side.requests()[0].body.as_ref(), b"0123456789");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_log_lines_rate_limited() {
    let primary = Upstream::start(created()).await;
    let envoy = Envoy::start(
        EnvoyConfig::new(primary.port())
            .down_target("down")
            .plugin_config(signup_rule(r#"{"name": "down", "cluster": "down"}"#)),
    )
    .await;

    // One connection keeps every request on one worker, whose limiter
    // allows 20 failure lines per 10 s.
    const REQUESTS: usize = 30;
    let results = send_concurrent(Proto::Http1, envoy.port(), 1, REQUESTS, WAIT, |_, i| {
        Request::post("/api/v1/register", "x").header("x-request-id", format!("log-test-{i}"))
    })
    .await;
    assert!(results
        .iter()
        .all(|r| r.as_ref().is_ok_and(|r| r.status == 201)));
    envoy
        .wait_for_counter(&outcome_stat("down", "reset"), REQUESTS as u64, WAIT)
        .await
        .unwrap();

    let log = envoy.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("side call failed:"))
        .collect();
    assert_eq!(lines.len(), 20, "{}", lines.join("\n"));
    for line in &lines {
        assert!(
            line.contains(
                "rule=signup target=down outcome=reset status=503 attempts=1 request_id=log-test-"
            ),
            "{line}"
        );
    }
}
