//! Fan-out mode end to end: the client's response waits for awaited
//! targets, in real Envoy with two workers, real upstreams and clients.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use support::{send, Behaviour, Envoy, EnvoyConfig, Proto, Request, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(15);

/// Builds a plugin configuration with one fan-out rule, "orders", for
/// requests under /orders.
fn orders_rule(on_failure: &str, targets: &str) -> String {
    format!(
        r#"{{"rules": [{{"name": "orders", "match": {{"path": {{"prefix": "/orders"}}}}, "mode": "fanout",
            "on_failure": "{on_failure}", "result_header": "x-mesh-fanout-result", "targets": [{targets}]}}]}}"#
    )
}

fn outcome_stat(target: &str, outcome: &str) -> String {
    format!("wasmcustom.mesh_fanout.rule.orders.target.{target}.outcome.{outcome}.side_calls")
}

const HELD: &str = "wasmcustom.mesh_fanout.rule.orders.held_responses";
const FAILED: &str = "wasmcustom.mesh_fanout.rule.orders.failed_responses";

fn delayed(status: u16, millis: u64, body: &'static [u8]) -> Behaviour {
    Behaviour {
        status,
        delay: Duration::from_millis(millis),
        body: Bytes::from_static(body),
        ..Behaviour::default()
    }
}

async fn timed_send(proto: Proto, port: u16, request: Request) -> (support::Response, Duration) {
    let started = Instant::now();
    let response = send(proto, port, request).await.unwrap();
    (response, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_is_max_not_sum() {
    // (primary delay, awaited target delay): the slower one sets the pace.
    for (primary_ms, side_ms) in [(300, 500), (500, 300)] {
        let primary = Upstream::start(delayed(200, primary_ms, b"primary")).await;
        let inventory = Upstream::start(delayed(200, side_ms, b"")).await;
        let envoy = Envoy::start(
            EnvoyConfig::new(primary.port())
                .target("inventory", inventory.port(), Proto::Http1)
                .plugin_config(orders_rule(
                    "fail",
                    r#"{"name": "inventory", "cluster": "inventory", "timeout_ms": 2000}"#,
                )),
        )
        .await;

        for proto in [Proto::Http1, Proto::Http2] {
            let (response, elapsed) =
                timed_send(proto, envoy.port(), Request::post("/orders", "{}")).await;
            assert_eq!(response.status, 200, "{proto:?}");
            assert_eq!(response.body.as_ref(), b"primary");
            assert_eq!(
                response.header("x-mesh-fanout-result").as_deref(),
                Some("inventory=success")
            );
            assert!(
                (Duration::from_millis(450)..Duration::from_millis(700)).contains(&elapsed),
                "primary {primary_ms} ms, side {side_ms} ms, {proto:?}: client waited {elapsed:?}"
            );
        }
        assert_eq!(
            envoy.counter(&outcome_stat("inventory", "success")).await,
            2
        );
        // Only a primary faster than the side call has to wait.
        let expected_held = if primary_ms < side_ms { 2 } else { 0 };
        assert_eq!(envoy.counter(HELD).await, expected_held);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_fail_replies_502() {
    let primary = Upstream::start(delayed(201, 0, b"created")).await;
    let failing = Upstream::start(delayed(500, 0, b"")).await;
    let slow = Upstream::start(delayed(200, 2000, b"")).await;
    let cases = [
        (
            r#"{"name": "inventory", "cluster": "failing"}"#,
            r#"{"error":"fanout_failed","rule":"orders","failed":[{"target":"inventory","outcome":"5xx","status":500}]}"#,
            "5xx",
        ),
        (
            r#"{"name": "inventory", "cluster": "slow", "timeout_ms": 200}"#,
            r#"{"error":"fanout_failed","rule":"orders","failed":[{"target":"inventory","outcome":"timeout","status":504}]}"#,
            "timeout",
        ),
        (
            r#"{"name": "inventory", "cluster": "down"}"#,
            r#"{"error":"fanout_failed","rule":"orders","failed":[{"target":"inventory","outcome":"reset","status":503}]}"#,
            "reset",
        ),
    ];
    for (target, expected_body, outcome) in cases {
        let base = EnvoyConfig::new(primary.port())
            .target("failing", failing.port(), Proto::Http1)
            .target("slow", slow.port(), Proto::Http1)
            .down_target("down");

        let failing_envoy =
            Envoy::start(base.clone().plugin_config(orders_rule("fail", target))).await;
        for proto in [Proto::Http1, Proto::Http2] {
            let response = send(proto, failing_envoy.port(), Request::post("/orders", "{}"))
                .await
                .unwrap();
            assert_eq!(response.status, 502, "{outcome} {proto:?}");
            assert_eq!(
                std::str::from_utf8(&response.body).unwrap(),
                expected_body,
                "{outcome} {proto:?}"
            );
            assert_eq!(
                response.header("content-type").as_deref(),
                Some("application/json")
            );
            assert_eq!(
                response.header("x-mesh-fanout-result").as_deref(),
                Some(format!("inventory={outcome}").as_str())
            );
        }
        assert_eq!(
            failing_envoy
                .counter(&outcome_stat("inventory", outcome))
                .await,
            2
        );
        assert_eq!(failing_envoy.counter(FAILED).await, 2);
        drop(failing_envoy);

        let ignoring_envoy = Envoy::start(base.plugin_config(orders_rule("ignore", target))).await;
        let response = send(
            Proto::Http1,
            ignoring_envoy.port(),
            Request::post("/orders", "{}"),
        )
        .await
        .unwrap();
        assert_eq!(response.status, 201, "{outcome} with ignore");
        assert_eq!(response.body.as_ref(), b"created");
        assert_eq!(
            ignoring_envoy
                .counter(&outcome_stat("inventory", outcome))
                .await,
            1
        );
        assert_eq!(ignoring_envoy.counter(FAILED).await, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unawaited_target_not_waited() {
    let primary = Upstream::start(delayed(200, 0, b"primary")).await;
    let inventory = Upstream::start(delayed(200, 100, b"")).await;
    let audit = Upstream::start(delayed(200, 1500, b"")).await;
    let envoy = Envoy::start(
        EnvoyConfig::new(primary.port())
            .target("inventory", inventory.port(), Proto::Http1)
            .target("audit", audit.port(), Proto::Http2)
            .plugin_config(orders_rule(
                "fail",
                r#"{"name": "inventory", "cluster": "inventory", "timeout_ms": 800, "await": true},
                   {"name": "audit", "cluster": "audit", "timeout_ms": 3000, "await": false}"#,
            )),
    )
    .await;

    let (response, elapsed) =
        timed_send(Proto::Http1, envoy.port(), Request::post("/orders", "{}")).await;
    assert_eq!(response.status, 200);
    assert_eq!(
        response.header("x-mesh-fanout-result").as_deref(),
        Some("inventory=success;audit=pending")
    );
    assert!(
        elapsed < Duration::from_millis(1000),
        "client waited {elapsed:?} for an unawaited target"
    );
    assert_eq!(envoy.counter(&outcome_stat("audit", "success")).await, 0);
    envoy
        .wait_for_counter(&outcome_stat("audit", "success"), 1, WAIT)
        .await
        .unwrap();
    assert_eq!(
        envoy.counter(&outcome_stat("inventory", "success")).await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awaited_targets_any_order_with_body() {
    let primary = Upstream::start(delayed(200, 0, b"primary")).await;
    let first = Upstream::start(delayed(200, 300, b"")).await;
    let second = Upstream::start(delayed(200, 100, b"")).await;
    let third = Upstream::start(delayed(200, 200, b"")).await;
    let envoy = Envoy::start(
        EnvoyConfig::new(primary.port())
            .target("first", first.port(), Proto::Http1)
            .target("second", second.port(), Proto::Http2)
            .target("third", third.port(), Proto::Http1)
            .plugin_config(orders_rule(
                "fail",
                r#"{"name": "first", "cluster": "first"}, {"name": "second", "cluster": "second"},
                   {"name": "third", "cluster": "third"}"#,
            )),
    )
    .await;

    let body: Vec<u8> = (0..5000).map(|i| (i % 251) as u8).collect();
    let chunks: Vec<Bytes> = body.chunks(512).map(Bytes::copy_from_slice).collect();
    let requests = [
        (
            Proto::Http1,
            Request::post("/orders/1", Bytes::new()).chunked(chunks),
        ),
        (Proto::Http2, Request::post("/orders/2", body.clone())),
    ];
    for (proto, request) in requests {
        let (response, elapsed) = timed_send(proto, envoy.port(), request).await;
        assert_eq!(response.status, 200, "{proto:?}");
        assert_eq!(
            response.header("x-mesh-fanout-result").as_deref(),
            Some("first=success;second=success;third=success")
        );
        assert!(
            (Duration::from_millis(280)..Duration::from_millis(700)).contains(&elapsed),
            "{proto:?}: client waited {elapsed:?}, expected about the slowest target's 300 ms"
        );
    }
    for upstream in [&primary, &first, &second, &third] {
        let recorded = upstream.requests();
        assert_eq!(recorded.len(), 2);
        assert!(recorded.iter().all(|r| r.body.as_ref() == body.as_slice()));
    }
    assert_eq!(envoy.counter(HELD).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_while_held() {
    let primary = Upstream::start(delayed(200, 0, b"primary")).await;
    let inventory = Upstream::start(delayed(200, 1000, b"")).await;
    let envoy = Envoy::start(
        EnvoyConfig::new(primary.port())
            .target("inventory", inventory.port(), Proto::Http1)
            .plugin_config(orders_rule(
                "fail",
                r#"{"name": "inventory", "cluster": "inventory", "timeout_ms": 3000}"#,
            )),
    )
    .await;

    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", envoy.port()))
        .await
        .unwrap();
    stream
        .write_all(b"POST /orders HTTP/1.1\r\nhost: shop\r\ncontent-length: 2\r\n\r\n{}")
        .await
        .unwrap();
    // Held: the primary responded, and the side call is still running.
    envoy.wait_for_counter(HELD, 1, WAIT).await.unwrap();
    let mut buffer = [0u8; 64];
    let nothing_yet =
        tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buffer)).await;
    assert!(
        nothing_yet.is_err(),
        "the held response reached the client early"
    );
    drop(stream);

    envoy
        .wait_for_counter(&outcome_stat("inventory", "success"), 1, WAIT)
        .await
        .unwrap();
    assert_eq!(envoy.counter(FAILED).await, 0);
    let settled: u64 = envoy
        .counters_matching("wasmcustom.mesh_fanout.rule.orders.target.inventory.outcome.")
        .await
        .values()
        .sum();
    assert_eq!(settled, 1, "counted once");

    // Both workers keep serving.
    for proto in [Proto::Http1, Proto::Http2] {
        let response = send(proto, envoy.port(), Request::post("/orders", "{}"))
            .await
            .unwrap();
        assert_eq!(response.status, 200);
    }
    assert_eq!(
        envoy.counter(&outcome_stat("inventory", "success")).await,
        3
    );
    assert!(
        !envoy.log_text().contains("panicked"),
        "{}",
        envoy.log_tail(40)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_failure_does_not_hang() {
    let inventory = Upstream::start(delayed(200, 200, b"")).await;
    let config = EnvoyConfig::new(support::free_port())
        .target("inventory", inventory.port(), Proto::Http1)
        .plugin_config(orders_rule(
            "ignore",
            r#"{"name": "inventory", "cluster": "inventory"}"#,
        ));
    let envoy = Envoy::start(config).await;

    // Nothing listens on the primary's port, so Envoy replies 503 itself;
    // that response waits for the awaited target like any other.
    let (response, elapsed) =
        timed_send(Proto::Http1, envoy.port(), Request::post("/orders", "{}")).await;
    assert_eq!(response.status, 503);
    assert!(
        elapsed < Duration::from_millis(1500),
        "client waited {elapsed:?}"
    );
    assert_eq!(
        envoy.counter(&outcome_stat("inventory", "success")).await,
        1
    );
}
