//! Checks the test harness itself: Envoy without the wasm filter, the
//! recording upstream, both clients and the stats readers.

mod support;

use std::time::Duration;

use bytes::Bytes;
use hyper::Version;
use support::{send, send_concurrent, Behaviour, Envoy, EnvoyConfig, Proto, Request, Upstream};

const WAIT: Duration = Duration::from_secs(10);

async fn start_pair(behaviour: Behaviour, primary_proto: Proto) -> (Upstream, Envoy) {
    let upstream = Upstream::start(behaviour).await;
    let shadow = Upstream::start(Behaviour::default()).await;
    // Nothing routes to the extra clusters, which only prove that such bootstraps load.
    let config = EnvoyConfig::new(upstream.port())
        .primary_proto(primary_proto)
        .target("shadow_h1", shadow.port(), Proto::Http1)
        .target("shadow_h2", shadow.port(), Proto::Http2)
        .down_target("gone")
        .without_wasm();
    let envoy = Envoy::start(config).await;
    (upstream, envoy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_and_headers_pass_unchanged() {
    for proto in [Proto::Http1, Proto::Http2] {
        let (upstream, envoy) = start_pair(Behaviour::default(), Proto::Http1).await;
        let all_bytes: Vec<u8> = (0..=255u8).collect();
        let chunks: Vec<Bytes> = all_bytes.chunks(100).map(Bytes::copy_from_slice).collect();

        let full = Request::post("/full?x=1&y=%20", "hello")
            .header("x-repeat", "one")
            .header("x-repeat", "two")
            .header("x-latin1", b"caf\xe9");
        let chunked = Request::new("PUT", "/chunked").chunked(chunks);
        let get = Request::get("/get");

        for request in [full, chunked, get] {
            let response = send(proto, envoy.port(), request).await.unwrap();
            assert_eq!(response.status, 200, "{proto:?}");
        }
        upstream.wait_for_count(3, WAIT).await.unwrap();
        envoy
            .wait_for_counter("cluster.primary.upstream_rq_completed", 3, WAIT)
            .await
            .unwrap();

        let recorded = upstream.requests();
        assert_eq!(recorded.len(), 3, "{proto:?}");
        let by_path = |path: &str| {
            recorded
                .iter()
                .find(|r| r.path == path)
                .unwrap_or_else(|| panic!("{proto:?}: no request to {path}"))
        };

        let full = by_path("/full?x=1&y=%20");
        assert_eq!(full.method, "POST");
        assert_eq!(
            full.version,
            Version::HTTP_11,
            "Envoy speaks HTTP/1.1 upstream"
        );
        assert_eq!(&full.body[..], b"hello");
        assert!(full.body_complete);
        assert_eq!(full.header_values("x-repeat"), [b"one", b"two"]);
        assert_eq!(full.header_values("x-latin1"), [b"caf\xe9"]);
        assert!(
            full.header("x-request-id").is_some(),
            "Envoy adds x-request-id"
        );

        let chunked = by_path("/chunked");
        assert_eq!(chunked.method, "PUT");
        assert_eq!(&chunked.body[..], &all_bytes[..], "{proto:?}");
        // Without a length from the client, Envoy also streams upstream.
        assert_eq!(
            chunked.header("transfer-encoding").as_deref(),
            Some("chunked")
        );
        assert_eq!(chunked.header("content-length"), None);
        assert_eq!(full.header("content-length").as_deref(), Some("5"));

        let get = by_path("/get");
        assert!(get.body.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_upstream_cluster() {
    let (upstream, envoy) = start_pair(Behaviour::default(), Proto::Http2).await;

    let response = send(Proto::Http1, envoy.port(), Request::post("/h2", "body"))
        .await
        .unwrap();

    assert_eq!(response.status, 200);
    let recorded = upstream.requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].version, Version::HTTP_2);
    assert_eq!(&recorded[0].body[..], b"body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connections_are_counted() {
    let (upstream, envoy) = start_pair(Behaviour::default(), Proto::Http1).await;

    for proto in [Proto::Http1, Proto::Http2] {
        let results = send_concurrent(proto, envoy.port(), 4, 25, WAIT, |c, i| {
            Request::get(&format!("/c{c}/r{i}"))
        })
        .await;
        assert_eq!(results.len(), 100);
        for result in results {
            assert_eq!(result.unwrap().status, 200, "{proto:?}");
        }
    }

    upstream.wait_for_count(200, WAIT).await.unwrap();
    envoy
        .wait_for_counter("cluster.primary.upstream_rq_completed", 200, WAIT)
        .await
        .unwrap();
    // Each client connection carries all of its requests.
    assert_eq!(
        envoy.counter("http.ingress_http.downstream_cx_total").await,
        8
    );
    assert_eq!(
        envoy
            .counter("http.ingress_http.downstream_cx_http1_total")
            .await,
        4
    );
    assert_eq!(
        envoy
            .counter("http.ingress_http.downstream_cx_http2_total")
            .await,
        4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_behaviours_through_envoy() {
    let failing = Behaviour {
        status: 201,
        fail_every: 3,
        body: Bytes::from_static(b"made"),
        ..Behaviour::default()
    };
    let (upstream, envoy) = start_pair(failing, Proto::Http1).await;
    let mut statuses = Vec::new();
    for i in 0..6 {
        let response = send(Proto::Http1, envoy.port(), Request::get(&format!("/{i}")))
            .await
            .unwrap();
        statuses.push(response.status);
        if response.status == 201 {
            assert_eq!(&response.body[..], b"made");
        }
    }
    assert_eq!(statuses, [201, 201, 503, 201, 201, 503]);
    assert_eq!(upstream.count(), 6);

    let reset = Behaviour {
        reset: true,
        ..Behaviour::default()
    };
    let (upstream, envoy) = start_pair(reset, Proto::Http1).await;
    let response = send(Proto::Http2, envoy.port(), Request::post("/reset", "x"))
        .await
        .unwrap();
    assert_eq!(
        response.status, 503,
        "Envoy answers an upstream reset with 503"
    );
    assert_eq!(upstream.count(), 1, "the reset request is still recorded");
    assert_eq!(&upstream.requests()[0].body[..], b"x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_primary_yields_503() {
    let config = EnvoyConfig::new(support::free_port()).without_wasm();
    let envoy = Envoy::start(config).await;

    let response = send(Proto::Http1, envoy.port(), Request::get("/"))
        .await
        .unwrap();

    assert_eq!(response.status, 503);
    envoy
        .wait_for_counter("cluster.primary.upstream_cx_connect_fail", 1, WAIT)
        .await
        .unwrap();
}
