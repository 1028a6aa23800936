//! The filter's own retries, idempotency keys, retry budget and dead
//! letters, in real Envoy with real upstreams.

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request as HyperRequest, Response as HyperResponse};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use mesh_fanout::core::retry::idempotency_key;
use support::plugin::{created, signup_rule, stat};
use support::{send, send_concurrent, Behaviour, Envoy, EnvoyConfig, Proto, Request, Upstream};
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(15);

/// One attempt as the flaky upstream saw it.
#[derive(Clone, Debug)]
struct Attempt {
    idempotency_key: Option<String>,
    body: Bytes,
}

type Attempts = Arc<Mutex<HashMap<String, Vec<Attempt>>>>;

/// Starts an upstream that responds 503 to the first `failures` attempts of
/// each `x-request-id` and 200 after that, recording every attempt.
async fn flaky_upstream(failures: usize) -> (u16, Attempts) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let attempts: Attempts = Arc::default();
    let recorded = Arc::clone(&attempts);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let attempts = Arc::clone(&recorded);
            tokio::spawn(async move {
                let service = service_fn(move |request: HyperRequest<Incoming>| {
                    let attempts = Arc::clone(&attempts);
                    async move {
                        let header = |name: &str| {
                            request
                                .headers()
                                .get(name)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string)
                        };
                        let id = header("x-request-id").unwrap_or_default();
                        let key = header("idempotency-key");
                        let body = request
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let seen = {
                            let mut map = attempts.lock().unwrap();
                            let list = map.entry(id).or_default();
                            list.push(Attempt {
                                idempotency_key: key,
                                body,
                            });
                            list.len()
                        };
                        let status = if seen <= failures { 503 } else { 200 };
                        let response = HyperResponse::builder()
                            .status(status)
                            .body(Full::new(Bytes::new()))
                            .unwrap();
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (port, attempts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_succeeds_on_third_attempt() {
    let primary = Upstream::start(created()).await;
    let (flaky_port, attempts) = flaky_upstream(2).await;
    let envoy = Envoy::start(
        EnvoyConfig::new(primary.port())
            .target("flaky", flaky_port, Proto::Http1)
            .plugin_config(signup_rule(
                // All five calls may wait for a retry at once; the budget is
                // tested on its own below.
                r#""limits": {"min_retry_concurrency": 10}, "#,
                r#"{"name": "flaky", "cluster": "flaky", "idempotency_header": "idempotency-key",
                    "retry": {"attempts": 3, "backoff_ms": {"base": 10, "max": 50}, "on": ["5xx"]}}"#,
            )),
    )
    .await;

    const REQUESTS: u64 = 5;
    for i in 0..REQUESTS {
        let proto = if i % 2 == 0 {
            Proto::Http1
        } else {
            Proto::Http2
        };
        let request = Request::post("/api/v1/register", format!("body-{i}"))
            .header("x-request-id", format!("req-{i}"));
        let response = send(proto, envoy.port(), request).await.unwrap();
        assert_eq!(response.status, 201, "the client never waits for retries");
    }

    envoy
        .wait_for_counter(&stat("flaky", "outcome.success.side_calls"), REQUESTS, WAIT)
        .await
        .unwrap();
    assert_eq!(
        envoy
            .counter(&stat("flaky", "outcome.5xx.side_calls"))
            .await,
        0
    );
    assert_eq!(
        envoy.counter(&stat("flaky", "outcome.5xx.attempts")).await,
        2 * REQUESTS
    );
    assert_eq!(
        envoy
            .counter(&stat("flaky", "outcome.success.attempts"))
            .await,
        REQUESTS
    );
    assert_eq!(envoy.counter(&stat("flaky", "retries")).await, 2 * REQUESTS);
    assert_eq!(envoy.counter(&stat("flaky", "dispatched")).await, REQUESTS);

    let attempts = attempts.lock().unwrap().clone();
    assert_eq!(attempts.len(), REQUESTS as usize);
    for i in 0..REQUESTS {
        let id = format!("req-{i}");
        let list = &attempts[&id];
        assert_eq!(list.len(), 3, "{id}");
        let expected_key = idempotency_key(id.as_bytes(), "signup", "flaky");
        for attempt in list {
            assert_eq!(
                attempt.idempotency_key.as_deref(),
                Some(expected_key.as_str()),
                "{id}"
            );
            assert_eq!(
                attempt.body.as_ref(),
                format!("body-{i}").as_bytes(),
                "{id}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_go_to_dead_letter() {
    let primary = Upstream::start(created()).await;
    let broken = Upstream::start(Behaviour {
        status: 500,
        ..Behaviour::default()
    })
    .await;
    let dlq = Upstream::start(Behaviour::default()).await;
    let envoy = Envoy::start(
        EnvoyConfig::new(primary.port())
            .target("broken", broken.port(), Proto::Http1)
            .target("dlq", dlq.port(), Proto::Http2)
            .plugin_config(signup_rule(
                "",
                r#"{"name": "broken", "cluster": "broken", "path": "/ingest",
                    "retry": {"attempts": 2, "backoff_ms": {"base": 5, "max": 20}},
                    "dead_letter": {"cluster": "dlq", "path": "/dead-letters"}}"#,
            )),
    )
    .await;

    let body: Vec<u8> = (0..3000).map(|i| (i % 256) as u8).collect();
    for i in 0..3 {
        let request = Request::post("/api/v1/register?x=1", body.clone())
            .header("x-request-id", format!("dl-{i}"));
        assert_eq!(
            send(Proto::Http1, envoy.port(), request)
                .await
                .unwrap()
                .status,
            201
        );
    }
    envoy
        .wait_for_counter(&stat("broken", "outcome.success.dead_letters"), 3, WAIT)
        .await
        .unwrap();
    assert_eq!(
        envoy
            .counter(&stat("broken", "outcome.5xx.side_calls"))
            .await,
        3
    );
    assert_eq!(
        envoy.counter(&stat("broken", "outcome.5xx.attempts")).await,
        6
    );
    assert_eq!(broken.count(), 6);

    let letters = dlq.requests();
    assert_eq!(letters.len(), 3, "one dead letter per failed side call");
    for letter in &letters {
        assert_eq!(letter.method, "POST");
        assert_eq!(letter.path, "/dead-letters");
        assert_eq!(letter.body.as_ref(), body.as_slice());
        let header = |name: &str| letter.header(name);
        assert_eq!(
            header("x-mesh-fanout-original-method").as_deref(),
            Some("POST")
        );
        assert_eq!(
            header("x-mesh-fanout-original-path").as_deref(),
            Some("/ingest")
        );
        assert_eq!(
            header("x-mesh-fanout-failure-outcome").as_deref(),
            Some("5xx")
        );
        assert_eq!(
            header("x-mesh-fanout-failure-status").as_deref(),
            Some("500")
        );
        assert_eq!(header("x-mesh-fanout-attempts").as_deref(), Some("2"));
        assert_eq!(header("x-mesh-fanout-rule").as_deref(), Some("signup"));
        assert_eq!(header("x-mesh-fanout-target").as_deref(), Some("broken"));
        assert!(header("x-request-id").is_some_and(|id| id.starts_with("dl-")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_dead_letter_counted_once() {
    let primary = Upstream::start(created()).await;
    let broken = Upstream::start(Behaviour {
        status: 503,
        ..Behaviour::default()
    })
    .await;
    let envoy = Envoy::start(
        EnvoyConfig::new(primary.port())
            .target("broken", broken.port(), Proto::Http1)
            .down_target("dlq")
            .plugin_config(signup_rule(
                "",
                r#"{"name": "broken", "cluster": "broken", "dead_letter": {"cluster": "dlq"}}"#,
            )),
    )
    .await;

    for _ in 0..4 {
        assert_eq!(
            send(Proto::Http1, envoy.port(), Request::post("/api/x", "x"))
                .await
                .unwrap()
                .status,
            201
        );
    }
    envoy
        .wait_for_counter(&stat("broken", "outcome.reset.dead_letters"), 4, WAIT)
        .await
        .unwrap();
    assert_eq!(
        envoy
            .counter(&stat("broken", "outcome.5xx.side_calls"))
            .await,
        4
    );
    assert_eq!(broken.count(), 4, "no retry without a retry policy");
    let dead_letter_total: u64 = envoy
        .counters_matching("wasmcustom.mesh_fanout.rule.signup.target.broken.outcome.")
        .await
        .iter()
        .filter(|(name, _)| name.ends_with(".dead_letters"))
        .map(|(_, value)| value)
        .sum();
    assert_eq!(
        dead_letter_total, 4,
        "each dead letter counted once, never retried"
    );
    assert!(envoy
        .log_text()
        .contains("dead letter failed: rule=signup target=broken outcome=reset"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_caps_retries_in_outage() {
    let primary = Upstream::start(created()).await;
    let envoy = Envoy::start(
        EnvoyConfig::new(primary.port()).down_target("down").plugin_config(signup_rule(
            r#""limits": {"retry_budget_percent": 20, "min_retry_concurrency": 1}, "#,
            r#"{"name": "down", "cluster": "down", "retry": {"attempts": 5, "backoff_ms": {"base": 300, "max": 300}, "on": ["reset"]}}"#,
        )),
    )
    .await;

    // One connection keeps all requests on one worker and its budget.
    const REQUESTS: u64 = 20;
    let results = send_concurrent(
        Proto::Http1,
        envoy.port(),
        1,
        REQUESTS as usize,
        WAIT,
        |_, i| Request::post(&format!("/api/{i}"), "x"),
    )
    .await;
    assert!(results
        .iter()
        .all(|r| r.as_ref().is_ok_and(|r| r.status == 201)));

    envoy
        .wait_for_counter(&stat("down", "outcome.reset.side_calls"), REQUESTS, WAIT)
        .await
        .unwrap();
    let retries = envoy.counter(&stat("down", "retries")).await;
    let denied = envoy.counter(&stat("down", "retry_budget_exhausted")).await;
    let attempts = envoy.counter(&stat("down", "outcome.reset.attempts")).await;
    assert_eq!(attempts, REQUESTS + retries, "every attempt counted once");
    assert!(denied > 0, "the budget denied no retry; retries {retries}");
    // Without a budget the outage would cost 4 retries per request.
    assert!(
        retries < 4 * REQUESTS / 2,
        "{retries} retries for {REQUESTS} requests"
    );
    // A call ends when the budget denies its retry or its attempts run out.
    assert!(denied <= REQUESTS);
}
