//! The mesh's settings on a target cluster apply to side calls with no
//! change to the filter: mutual TLS, circuit breakers, outlier detection,
//! and retries through an internal listener (envoy/mesh-retries.yaml).
//! Real Envoy with two workers, real upstreams and real clients.
//!
//! The Envoy counters asserted here are those of Envoy 1.40.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use support::client::send_concurrent_timed;
use support::{
    free_port, send, send_concurrent, wasm_path, Behaviour, Envoy, EnvoyConfig, Proto, Request,
    Upstream,
};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const WAIT: Duration = Duration::from_secs(15);
const POLL_INTERVAL: Duration = Duration::from_millis(20);

fn created() -> Behaviour {
    Behaviour {
        status: 201,
        body: Bytes::from_static(b"created"),
        ..Behaviour::default()
    }
}

/// Builds a plugin configuration with one shadow rule, "signup", for
/// requests under /api.
fn signup_rule(targets: &str) -> String {
    format!(
        r#"{{"rules": [{{"name": "signup", "match": {{"path": {{"prefix": "/api"}}}}, "targets": [{targets}]}}]}}"#
    )
}

fn stat(rule: &str, target: &str, tail: &str) -> String {
    format!("wasmcustom.mesh_fanout.rule.{rule}.target.{target}.{tail}")
}

fn outcome(rule: &str, target: &str, outcome: &str) -> String {
    stat(rule, target, &format!("outcome.{outcome}.side_calls"))
}

/// Returns counter `name` from a `counters()` snapshot, 0 if absent.
fn counter(counters: &BTreeMap<String, u64>, name: &str) -> u64 {
    counters.get(name).copied().unwrap_or(0)
}

/// Sums every outcome and skip of one target, which equals the number of
/// matched requests once all side calls have ended.
async fn settled(envoy: &Envoy, rule: &str, target: &str) -> u64 {
    envoy
        .counters_matching(&stat(rule, target, ""))
        .await
        .iter()
        .filter(|(name, _)| name.ends_with(".side_calls") || name.ends_with(".skipped"))
        .map(|(_, value)| value)
        .sum()
}

async fn wait_settled(envoy: &Envoy, rule: &str, target: &str, expected: u64) {
    wait_until(
        &format!("{expected} outcomes of target {target}"),
        || async {
            let now = settled(envoy, rule, target).await;
            if now == expected {
                return Ok(());
            }
            Err(format!(
                "{now} outcomes and skips; counters: {:#?}",
                envoy.counters_matching("wasmcustom.").await
            ))
        },
    )
    .await;
}

/// Polls `check` until it returns `Ok`, and panics with `what` and the
/// last error after `WAIT`.
async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        let last = match check().await {
            Ok(()) => return,
            Err(last) => last,
        };
        assert!(
            Instant::now() < deadline,
            "waiting for {what} timed out after {WAIT:?}: {last}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Returns the counters of Envoy cluster `cluster` that are not zero, by
/// name without the `cluster.<cluster>.` prefix.
async fn cluster_counters(envoy: &Envoy, cluster: &str) -> BTreeMap<String, u64> {
    let prefix = format!("cluster.{cluster}.");
    envoy
        .counters_matching(&prefix)
        .await
        .into_iter()
        .filter(|(_, value)| *value != 0)
        .map(|(name, value)| (name[prefix.len()..].to_owned(), value))
        .collect()
}

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

/// Renders `path` as a YAML double-quoted scalar. A JSON string literal is
/// valid YAML, so JSON escaping is enough.
fn yaml_path(path: &Path) -> String {
    serde_json::to_string(&path.to_string_lossy()).expect("a string serializes")
}

/// Renders the `load_assignment` of cluster `name` with one endpoint per
/// 127.0.0.1 port, indented for a top-level cluster field.
fn load_assignment(name: &str, ports: &[u16]) -> String {
    let mut endpoints = String::new();
    for port in ports {
        endpoints.push_str(&format!(
            "    - endpoint:\n        address:\n          socket_address: {{ address: 127.0.0.1, port_value: {port} }}\n"
        ));
    }
    format!(
        "load_assignment:\n  cluster_name: {name}\n  endpoints:\n  - lb_endpoints:\n{endpoints}"
    )
}

// ---------------------------------------------------------------------------
// Mutual TLS

/// DNS name in the side upstream's certificate. Envoy sends it as SNI and
/// checks the certificate against it.
const SIDE_DNS_NAME: &str = "side.mesh.test";
const CLIENT_COMMON_NAME: &str = "mesh-fanout-client";

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "mesh-fanout-{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating {} failed: {e}", path.display()));
        TempDir(path)
    }

    /// Writes `contents` to `name` in this directory and returns its path.
    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents)
            .unwrap_or_else(|e| panic!("writing {} failed: {e}", path.display()));
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A certificate authority made at test time.
struct Authority {
    certificate: rcgen::Certificate,
    issuer: Issuer<'static, KeyPair>,
}

impl Authority {
    fn new(common_name: &str) -> Authority {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let certificate = params.self_signed(&key).unwrap();
        Authority {
            certificate,
            issuer: Issuer::new(params, key),
        }
    }

    /// Issues a leaf certificate for `purpose` with subject common name
    /// `common_name` and the DNS names `dns_names`.
    fn issue(
        &self,
        common_name: &str,
        dns_names: &[&str],
        purpose: ExtendedKeyUsagePurpose,
    ) -> Leaf {
        let names: Vec<String> = dns_names.iter().map(|name| (*name).to_owned()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![purpose];
        let key = KeyPair::generate().unwrap();
        let certificate = params.signed_by(&key, &self.issuer).unwrap();
        Leaf { certificate, key }
    }
}

/// A certificate and its private key.
struct Leaf {
    certificate: rcgen::Certificate,
    key: KeyPair,
}

/// PEM files of one client identity, for an `UpstreamTlsContext`.
struct ClientFiles {
    certificate: PathBuf,
    key: PathBuf,
}

impl Leaf {
    fn der(&self) -> Vec<u8> {
        self.certificate.der().to_vec()
    }

    fn write_pem(&self, dir: &TempDir, name: &str) -> ClientFiles {
        ClientFiles {
            certificate: dir.write(&format!("{name}.pem"), &self.certificate.pem()),
            key: dir.write(&format!("{name}-key.pem"), &self.key.serialize_pem()),
        }
    }
}

/// The result of one TLS handshake at the mutual-TLS upstream.
#[derive(Clone, Debug)]
enum Handshake {
    /// The client's leaf certificate, in DER, passed verification.
    Verified(Vec<u8>),
    /// The handshake failed with this rustls error.
    Failed(String),
}

/// State shared by the mutual-TLS upstream's connections.
#[derive(Default)]
struct MtlsRecord {
    handshakes: Mutex<Vec<Handshake>>,
    /// The client's leaf certificate (DER) of each request, in arrival order.
    requests: Mutex<Vec<Vec<u8>>>,
}

/// An HTTP/1.1 upstream behind TLS that requires a client certificate
/// issued by one CA. It records every handshake and request, and responds
/// to every request with 200.
struct MtlsUpstream {
    port: u16,
    record: Arc<MtlsRecord>,
    accept_task: JoinHandle<()>,
}

impl MtlsUpstream {
    async fn start(server: &Leaf, client_ca: &Authority) -> MtlsUpstream {
        // rustls 0.23.48 deprecates the ring provider because it lacks
        // post-quantum key exchange. These tests need none, and ring spares
        // them the C build of aws-lc.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(client_ca.certificate.der().clone()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            provider.clone(),
        )
        .build()
        .unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server.key.serialize_der()));
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![CertificateDer::from(server.der())], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let record = Arc::new(MtlsRecord::default());
        let accept_task = tokio::spawn(accept_mtls(listener, acceptor, record.clone()));
        MtlsUpstream {
            port,
            record,
            accept_task,
        }
    }

    fn handshakes(&self) -> Vec<Handshake> {
        self.record.handshakes.lock().unwrap().clone()
    }

    fn requests(&self) -> Vec<Vec<u8>> {
        self.record.requests.lock().unwrap().clone()
    }
}

impl Drop for MtlsUpstream {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every connection.
        self.accept_task.abort();
    }
}

async fn accept_mtls(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    record: Arc<MtlsRecord>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                connections.spawn(serve_mtls(acceptor.clone(), stream, record.clone()));
            }
            // Reap finished connections so the set does not grow without bound.
            Some(_) = connections.join_next() => {}
        }
    }
}

async fn serve_mtls(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: tokio::net::TcpStream,
    record: Arc<MtlsRecord>,
) {
    let tls = match acceptor.accept(stream).await {
        Ok(tls) => tls,
        Err(error) => {
            let failed = Handshake::Failed(error.to_string());
            record.handshakes.lock().unwrap().push(failed);
            return;
        }
    };
    // The verifier requires a client certificate, so a passed handshake has one.
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| leaf.to_vec())
        .unwrap_or_default();
    let verified = Handshake::Verified(peer.clone());
    record.handshakes.lock().unwrap().push(verified);

    let service = service_fn(move |request: hyper::Request<Incoming>| {
        let record = record.clone();
        let peer = peer.clone();
        async move {
            let _ = request.into_body().collect().await;
            record.requests.lock().unwrap().push(peer);
            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"ok"))))
        }
    });
    // Errors here are expected: Envoy closes idle connections at shutdown.
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tls), service)
        .await;
}

/// Renders a cluster that sends HTTP/1.1 over TLS `version` (Envoy's
/// `TLSv1_2` or `TLSv1_3`) to 127.0.0.1:`port`. It verifies the server
/// against `ca` and SIDE_DNS_NAME, and presents `client` as its identity.
fn mtls_cluster(name: &str, port: u16, version: &str, ca: &Path, client: &ClientFiles) -> String {
    format!(
        r#"name: {name}
type: STATIC
connect_timeout: 1s
{load_assignment}transport_socket:
  name: envoy.transport_sockets.tls
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
    sni: {SIDE_DNS_NAME}
    common_tls_context:
      tls_params:
        tls_minimum_protocol_version: {version}
        tls_maximum_protocol_version: {version}
      tls_certificates:
      - certificate_chain: {{ filename: {certificate} }}
        private_key: {{ filename: {key} }}
      validation_context:
        trusted_ca: {{ filename: {ca} }}
        match_typed_subject_alt_names:
        - san_type: DNS
          matcher: {{ exact: {SIDE_DNS_NAME} }}
"#,
        load_assignment = load_assignment(name, &[port]),
        ca = yaml_path(ca),
        certificate = yaml_path(&client.certificate),
        key = yaml_path(&client.key),
    )
}

/// Side calls reach an upstream that requires client certificates once the
/// target cluster has an `UpstreamTlsContext`, over TLS 1.2 and TLS 1.3.
/// A client certificate from another CA fails every call as `reset`, and
/// the primary is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_side_calls() {
    let dir = TempDir::new("mtls");
    let mesh_ca = Authority::new("mesh test CA");
    let rogue_ca = Authority::new("rogue test CA");
    let server = mesh_ca.issue(
        "side",
        &[SIDE_DNS_NAME],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    // Same subject, other issuer: only the issuer and the signature differ.
    let client = mesh_ca.issue(CLIENT_COMMON_NAME, &[], ExtendedKeyUsagePurpose::ClientAuth);
    let rogue = rogue_ca.issue(CLIENT_COMMON_NAME, &[], ExtendedKeyUsagePurpose::ClientAuth);
    let ca_file = dir.write("mesh-ca.pem", &mesh_ca.certificate.pem());
    let client_files = client.write_pem(&dir, "client");
    let rogue_files = rogue.write_pem(&dir, "rogue-client");

    let primary = Upstream::start(created()).await;
    let side = MtlsUpstream::start(&server, &mesh_ca).await;
    // (cluster and target name, TLS version, client identity)
    let targets = [
        ("mesh_tls12", "TLSv1_2", &client_files),
        ("mesh_tls13", "TLSv1_3", &client_files),
        ("rogue_tls12", "TLSv1_2", &rogue_files),
        ("rogue_tls13", "TLSv1_3", &rogue_files),
    ];
    let mut config = EnvoyConfig::new(primary.port());
    let mut target_json = Vec::new();
    for (name, version, identity) in targets {
        config = config.raw_cluster(mtls_cluster(name, side.port, version, &ca_file, identity));
        target_json.push(format!(r#"{{"name": "{name}", "cluster": "{name}"}}"#));
    }
    let envoy = Envoy::start(config.plugin_config(signup_rule(&target_json.join(", ")))).await;

    const REQUESTS: u64 = 6;
    for i in 0..REQUESTS {
        let proto = if i % 2 == 0 {
            Proto::Http1
        } else {
            Proto::Http2
        };
        let request = Request::post(&format!("/api/signup/{i}"), "x");
        let response = send(proto, envoy.port(), request).await.unwrap();
        assert_eq!(response.status, 201, "request {i}");
        assert_eq!(response.body.as_ref(), b"created", "request {i}");
    }
    for (name, _, _) in targets {
        wait_settled(&envoy, "signup", name, REQUESTS).await;
    }

    let counters = envoy.counters().await;
    for name in ["mesh_tls12", "mesh_tls13"] {
        assert_eq!(
            counter(&counters, &outcome("signup", name, "success")),
            REQUESTS,
            "{name}"
        );
    }
    // The upstream rejects the rogue certificate in the handshake, so no
    // request reaches it. Envoy ends the call with its own 503 local reply
    // "upstream connect error or disconnect/reset before headers", which
    // the filter classifies as reset.
    for name in ["rogue_tls12", "rogue_tls13"] {
        assert_eq!(
            counter(&counters, &outcome("signup", name, "reset")),
            REQUESTS,
            "{name}"
        );
    }

    // Only the mesh CA's client certificate got through, on every request.
    let requests = side.requests();
    assert_eq!(requests.len() as u64, 2 * REQUESTS);
    assert!(
        requests.iter().all(|peer| *peer == client.der()),
        "a request arrived with a client certificate other than the mesh CA's"
    );
    wait_until("the rogue handshakes at the upstream", || async {
        let failed = side
            .handshakes()
            .iter()
            .filter(|h| matches!(h, Handshake::Failed(_)))
            .count() as u64;
        if failed == 2 * REQUESTS {
            Ok(())
        } else {
            Err(format!(
                "{failed} failed handshakes, expected {}",
                2 * REQUESTS
            ))
        }
    })
    .await;
    for handshake in side.handshakes() {
        match handshake {
            Handshake::Verified(peer) => assert_eq!(peer, client.der()),
            Handshake::Failed(error) => assert!(
                error.contains("UnknownIssuer"),
                "handshake failed for another reason: {error}"
            ),
        }
    }

    for (name, version) in [("mesh_tls12", "TLSv1.2"), ("mesh_tls13", "TLSv1.3")] {
        let stats = cluster_counters(&envoy, name).await;
        let handshakes = counter(&stats, "ssl.handshake");
        assert!(handshakes >= 1, "{name}: {stats:#?}");
        assert_eq!(
            counter(&stats, &format!("ssl.versions.{version}")),
            handshakes,
            "{name}: {stats:#?}"
        );
        assert_eq!(
            counter(&stats, "ssl.connection_error"),
            0,
            "{name}: {stats:#?}"
        );
    }
    // TLS 1.2 fails while Envoy connects. Under TLS 1.3 the client finishes
    // its side of the handshake before the server checks the certificate,
    // so Envoy counts a handshake, sends the request, and then reads the
    // server's alert on a connection with an active request.
    let rogue12 = cluster_counters(&envoy, "rogue_tls12").await;
    assert_eq!(
        counter(&rogue12, "ssl.connection_error"),
        REQUESTS,
        "{rogue12:#?}"
    );
    assert_eq!(
        counter(&rogue12, "upstream_cx_connect_fail"),
        REQUESTS,
        "{rogue12:#?}"
    );
    assert_eq!(counter(&rogue12, "ssl.handshake"), 0, "{rogue12:#?}");
    let rogue13 = cluster_counters(&envoy, "rogue_tls13").await;
    assert_eq!(
        counter(&rogue13, "ssl.connection_error"),
        REQUESTS,
        "{rogue13:#?}"
    );
    assert_eq!(
        counter(&rogue13, "upstream_cx_destroy_remote_with_active_rq"),
        REQUESTS,
        "{rogue13:#?}"
    );
    assert_eq!(counter(&rogue13, "ssl.handshake"), REQUESTS, "{rogue13:#?}");

    assert_eq!(primary.count() as u64, REQUESTS);
}

// ---------------------------------------------------------------------------
// Circuit breaking

/// How long the side upstream of the circuit-breaker test takes to respond.
const SLOW_SIDE_DELAY: Duration = Duration::from_millis(500);

/// Renders cluster `name` to 127.0.0.1:`port` whose circuit breakers admit
/// one connection, one pending request and one active request.
fn tight_breaker_cluster(name: &str, port: u16, proto: Proto) -> String {
    let protocol_options = match proto {
        Proto::Http1 => "",
        Proto::Http2 => {
            r#"typed_extension_protocol_options:
  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
    "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
    explicit_http_config:
      http2_protocol_options: {}
"#
        }
    };
    format!(
        "name: {name}
type: STATIC
connect_timeout: 1s
circuit_breakers:
  thresholds:
  - max_connections: 1
    max_pending_requests: 1
    max_requests: 1
{load_assignment}{protocol_options}",
        load_assignment = load_assignment(name, &[port]),
    )
}

/// Under a burst against tight circuit breakers, Envoy rejects the excess
/// side calls at once. The filter counts each rejection as `overflow`, the
/// count equals Envoy's own overflow counters, and the primary never waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaker_rejections_are_overflow() {
    let primary = Upstream::start(created()).await;
    let slow = Behaviour {
        delay: SLOW_SIDE_DELAY,
        ..Behaviour::default()
    };
    let side_h1 = Upstream::start(slow.clone()).await;
    let side_h2 = Upstream::start(slow).await;
    let envoy = Envoy::start(
        EnvoyConfig::new(primary.port())
            .raw_cluster(tight_breaker_cluster(
                "slow_h1",
                side_h1.port(),
                Proto::Http1,
            ))
            .raw_cluster(tight_breaker_cluster(
                "slow_h2",
                side_h2.port(),
                Proto::Http2,
            ))
            // A timeout 10 times the upstream delay, so an admitted call
            // never ends as timeout.
            .plugin_config(signup_rule(
                r#"{"name": "slow_h1", "cluster": "slow_h1", "timeout_ms": 5000},
                   {"name": "slow_h2", "cluster": "slow_h2", "timeout_ms": 5000}"#,
            )),
    )
    .await;

    // One HTTP/1.1 connection, so one worker dispatches every side call.
    const BURST: u64 = 20;
    let started = Instant::now();
    let results = send_concurrent_timed(
        Proto::Http1,
        envoy.port(),
        1,
        BURST as usize,
        WAIT,
        |_, i| Request::post(&format!("/api/burst/{i}"), "x"),
    )
    .await;
    let burst = started.elapsed();
    assert!(
        burst < SLOW_SIDE_DELAY,
        "the burst took {burst:?}, so the first side call may have finished during it"
    );
    for (i, timed) in results.iter().enumerate() {
        let response = timed.result.as_ref().unwrap();
        assert_eq!(response.status, 201, "request {i}");
        assert!(
            timed.latency < SLOW_SIDE_DELAY / 2,
            "request {i} took {:?}: the primary waited for a side call",
            timed.latency
        );
    }

    // A call is either dispatched or rejected at dispatch, so this sum
    // reaches BURST only when every rejection is counted. That happens
    // before any admitted call could finish, and so long before the 5 s
    // timeout, which shows that no rejection waited for anything.
    wait_until("every side call dispatched or rejected", || async {
        let counters = envoy.counters().await;
        for target in ["slow_h1", "slow_h2"] {
            let dispatched = counter(&counters, &stat("signup", target, "dispatched"));
            let overflow = counter(&counters, &outcome("signup", target, "overflow"));
            if dispatched + overflow != BURST {
                return Err(format!(
                    "{target}: {dispatched} dispatched, {overflow} overflow"
                ));
            }
        }
        Ok(())
    })
    .await;
    let rejections_final = started.elapsed();
    assert!(
        rejections_final < SLOW_SIDE_DELAY,
        "the overflow counts were final only {rejections_final:?} after the burst started"
    );
    let early = envoy.counters().await;

    wait_settled(&envoy, "signup", "slow_h1", BURST).await;
    wait_settled(&envoy, "signup", "slow_h2", BURST).await;
    let counters = envoy.counters().await;

    // HTTP/1.1: the first call takes the only connection and the next
    // waits in the pending queue. The queue is then full, so the rest
    // overflow it.
    let overflow_h1 = counter(&counters, &outcome("signup", "slow_h1", "overflow"));
    assert_eq!(
        overflow_h1,
        counter(&early, &outcome("signup", "slow_h1", "overflow")),
        "an overflow of slow_h1 was counted after the admitted calls finished"
    );
    assert_eq!(
        counter(&counters, &stat("signup", "slow_h1", "dispatched")),
        2
    );
    assert_eq!(
        counter(&counters, &outcome("signup", "slow_h1", "success")),
        2
    );
    assert_eq!(overflow_h1, BURST - 2);
    assert_eq!(side_h1.count(), 2);
    let envoy_h1 = cluster_counters(&envoy, "slow_h1").await;
    assert_eq!(
        counter(&envoy_h1, "upstream_rq_pending_overflow"),
        overflow_h1,
        "{envoy_h1:#?}"
    );
    assert_eq!(
        counter(&envoy_h1, "upstream_rq_active_overflow"),
        0,
        "{envoy_h1:#?}"
    );

    // HTTP/2: the one connection could carry them all, so max_requests
    // rejects every call while the first is active. A call that arrives
    // while the connection is still being set up waits in the pending
    // queue instead, and a second one then overflows that queue.
    let overflow_h2 = counter(&counters, &outcome("signup", "slow_h2", "overflow"));
    assert_eq!(
        overflow_h2,
        counter(&early, &outcome("signup", "slow_h2", "overflow")),
        "an overflow of slow_h2 was counted after the admitted calls finished"
    );
    let dispatched_h2 = counter(&counters, &stat("signup", "slow_h2", "dispatched"));
    assert_eq!(
        counter(&counters, &outcome("signup", "slow_h2", "success")),
        dispatched_h2
    );
    assert_eq!(overflow_h2, BURST - dispatched_h2);
    assert_eq!(side_h2.count() as u64, dispatched_h2);
    let envoy_h2 = cluster_counters(&envoy, "slow_h2").await;
    let active_overflow = counter(&envoy_h2, "upstream_rq_active_overflow");
    let pending_overflow = counter(&envoy_h2, "upstream_rq_pending_overflow");
    assert_eq!(
        active_overflow + pending_overflow,
        overflow_h2,
        "{envoy_h2:#?}"
    );
    // Envoy 1.40 counts this burst as active overflow and 1.36 as pending
    // overflow; the filter's count matches their sum on both.

    assert_eq!(primary.count() as u64, BURST);
}

// ---------------------------------------------------------------------------
// Outlier detection

/// Envoy ejects the target cluster's host that returns 5xx, after 3 in a
/// row, and later side calls all go to the healthy host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_failing_host() {
    let primary = Upstream::start(created()).await;
    let healthy = Upstream::start(Behaviour::default()).await;
    let failing = Upstream::start(Behaviour {
        status: 503,
        ..Behaviour::default()
    })
    .await;
    // max_ejection_percent 50 allows one of the two hosts out. The long
    // base_ejection_time keeps it out for the whole test.
    let cluster = format!(
        "name: pool
type: STATIC
connect_timeout: 1s
outlier_detection:
  consecutive_5xx: 3
  interval: 0.1s
  base_ejection_time: 300s
  max_ejection_percent: 50
{}",
        load_assignment("pool", &[healthy.port(), failing.port()])
    );
    let envoy = Envoy::start(
        EnvoyConfig::new(primary.port())
            .raw_cluster(cluster)
            .plugin_config(signup_rule(r#"{"name": "pool", "cluster": "pool"}"#)),
    )
    .await;

    // One side call at a time until the failing host has received 3. Round
    // robin alternates the hosts, so that takes about 6 calls.
    let mut sent = 0;
    while failing.count() < 3 {
        assert!(
            sent < 20,
            "the failing host got {} of {sent} calls",
            failing.count()
        );
        let response = send(Proto::Http1, envoy.port(), Request::post("/api/warm", "x"))
            .await
            .unwrap();
        assert_eq!(response.status, 201);
        sent += 1;
        wait_settled(&envoy, "signup", "pool", sent).await;
    }
    envoy
        .wait_for_counter(
            "cluster.pool.outlier_detection.ejections_enforced_total",
            1,
            WAIT,
        )
        .await
        .unwrap();
    let failing_host = format!("pool::127.0.0.1:{}::health_flags::", failing.port());
    let (_, clusters) = envoy.admin_get("/clusters").await.unwrap();
    let flags = clusters
        .lines()
        .find_map(|line| line.strip_prefix(&failing_host))
        .unwrap_or_else(|| panic!("no {failing_host} in admin /clusters:\n{clusters}"));
    assert_eq!(flags, "/failed_outlier_check");
    assert_eq!(
        gauge(&envoy, "cluster.pool.outlier_detection.ejections_active").await,
        Some(1)
    );

    // After the ejection: 20 calls from both workers, all to the healthy host.
    let healthy_before = healthy.count();
    let results = send_concurrent(Proto::Http1, envoy.port(), 4, 5, WAIT, |c, i| {
        Request::post(&format!("/api/after/{c}/{i}"), "x")
    })
    .await;
    assert!(results
        .iter()
        .all(|r| r.as_ref().is_ok_and(|r| r.status == 201)));
    wait_settled(&envoy, "signup", "pool", sent + 20).await;
    assert_eq!(failing.count(), 3);
    assert_eq!(healthy.count(), healthy_before + 20);

    let counters = envoy.counters().await;
    assert_eq!(counter(&counters, &outcome("signup", "pool", "5xx")), 3);
    assert_eq!(
        counter(&counters, &outcome("signup", "pool", "success")),
        healthy.count() as u64
    );
    let stats = cluster_counters(&envoy, "pool").await;
    assert_eq!(
        counter(
            &stats,
            "outlier_detection.ejections_enforced_consecutive_5xx"
        ),
        1,
        "{stats:#?}"
    );
    assert_eq!(counter(&stats, "upstream_rq_503"), 3, "{stats:#?}");
}

// ---------------------------------------------------------------------------
// Mesh retries through an internal listener

const MESH_RETRIES_CONFIG: &str = "envoy/mesh-retries.yaml";

/// Attempts of one side call at the flaky upstream: the
/// `x-envoy-attempt-count` of each, in arrival order.
type Attempts = Vec<Option<String>>;

/// A side upstream that responds to the first `failures` attempts of each
/// request with 503, and to later ones with 200 at once. Retries of one
/// request share its x-request-id, which keys the count.
struct FlakyUpstream {
    port: u16,
    attempts: Arc<Mutex<BTreeMap<String, Attempts>>>,
    accept_task: JoinHandle<()>,
}

impl FlakyUpstream {
    /// Starts the upstream. It responds to each failing attempt `delay` after
    /// its body has arrived.
    async fn start(failures: usize, delay: Duration) -> FlakyUpstream {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let attempts = Arc::new(Mutex::new(BTreeMap::new()));
        let accept_task = tokio::spawn(accept_flaky(listener, attempts.clone(), failures, delay));
        FlakyUpstream {
            port,
            attempts,
            accept_task,
        }
    }

    fn attempts(&self) -> BTreeMap<String, Attempts> {
        self.attempts.lock().unwrap().clone()
    }
}

impl Drop for FlakyUpstream {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

async fn accept_flaky(
    listener: TcpListener,
    attempts: Arc<Mutex<BTreeMap<String, Attempts>>>,
    failures: usize,
    delay: Duration,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let attempts = attempts.clone();
                let service = service_fn(move |request: hyper::Request<Incoming>| {
                    respond_flaky(request, attempts.clone(), failures, delay)
                });
                connections.spawn(async move {
                    // Errors here are expected: Envoy resets cancelled attempts.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next() => {}
        }
    }
}

async fn respond_flaky(
    request: hyper::Request<Incoming>,
    attempts: Arc<Mutex<BTreeMap<String, Attempts>>>,
    failures: usize,
    delay: Duration,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
    };
    let request_id = header("x-request-id").unwrap_or_default();
    let attempt_count = header("x-envoy-attempt-count");
    let attempt = {
        let mut attempts = attempts.lock().unwrap();
        let seen = attempts.entry(request_id).or_default();
        seen.push(attempt_count);
        seen.len()
    };
    let _ = request.into_body().collect().await;
    let failing = attempt <= failures;
    if failing && !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let status = if failing { 503 } else { 200 };
    let response = hyper::Response::builder()
        .status(status)
        .body(Full::new(Bytes::new()))
        .expect("response parts are valid");
    Ok(response)
}

/// Ports that replace the fixed ones of envoy/mesh-retries.yaml.
struct MeshRetriesPorts {
    listener: u16,
    admin: u16,
    orders: u16,
    ledger: u16,
}

/// Returns envoy/mesh-retries.yaml with free ports and the absolute path
/// of the filter, so it runs beside other Envoys and from any directory.
fn render_mesh_retries(ports: &MeshRetriesPorts) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(MESH_RETRIES_CONFIG);
    let mut yaml = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {} failed: {e}", path.display()));
    for (shipped, port) in [
        (10000, ports.listener),
        (9901, ports.admin),
        (8081, ports.orders),
        (8082, ports.ledger),
    ] {
        // The trailing space keeps 8081 from matching 80810.
        yaml = replace_once(
            &yaml,
            &format!("port_value: {shipped} "),
            &format!("port_value: {port} "),
        );
    }
    replace_once(
        &yaml,
        "filename: target/wasm32-wasip1/release/mesh_fanout.wasm",
        &format!("filename: {}", yaml_path(&wasm_path())),
    )
}

/// Replaces the one occurrence of `needle` in the rendered config.
///
/// Panics if `needle` does not occur exactly once.
fn replace_once(text: &str, needle: &str, replacement: &str) -> String {
    let found = text.matches(needle).count();
    assert_eq!(
        found, 1,
        "{MESH_RETRIES_CONFIG} contains `{needle}` {found} times, expected once; \
         update tests/mesh.rs to match the file"
    );
    text.replacen(needle, replacement, 1)
}

/// Starts Envoy on envoy/mesh-retries.yaml, with `edit` applied to the
/// rendered text, for the primary `orders` and the side upstream `ledger`.
async fn start_mesh_retries(orders: u16, ledger: u16, edit: impl Fn(String) -> String) -> Envoy {
    let ports = MeshRetriesPorts {
        listener: free_port(),
        admin: free_port(),
        orders,
        ledger,
    };
    let yaml = edit(render_mesh_retries(&ports));
    Envoy::start_from_yaml(&yaml, ports.listener, ports.admin)
        .await
        .unwrap_or_else(|message| panic!("{message}"))
}

/// The route of the internal listener retries each side call on 5xx, so
/// every call ends as `success` after 3 attempts at the side upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_retries_via_internal_listener() {
    let primary = Upstream::start(created()).await;
    let ledger = FlakyUpstream::start(2, Duration::ZERO).await;
    let envoy = start_mesh_retries(primary.port(), ledger.port, |yaml| yaml).await;

    const REQUESTS: u64 = 10;
    let results = send_concurrent(Proto::Http1, envoy.port(), 2, 5, WAIT, |c, i| {
        Request::post(&format!("/api/v1/orders/{c}/{i}"), "x")
    })
    .await;
    assert!(results
        .iter()
        .all(|r| r.as_ref().is_ok_and(|r| r.status == 201)));
    wait_settled(&envoy, "orders", "ledger", REQUESTS).await;
    assert_eq!(
        envoy.counter(&outcome("orders", "ledger", "success")).await,
        REQUESTS
    );

    // Each side call kept the primary's x-request-id through the internal
    // listener, and the route made exactly 3 attempts of it.
    let attempts = ledger.attempts();
    let primary_ids: BTreeSet<String> = primary
        .requests()
        .iter()
        .map(|r| r.header("x-request-id").unwrap())
        .collect();
    let side_ids: BTreeSet<String> = attempts.keys().cloned().collect();
    assert_eq!(side_ids, primary_ids);
    let expected_counts = vec![
        Some("1".to_owned()),
        Some("2".to_owned()),
        Some("3".to_owned()),
    ];
    for (request_id, counts) in &attempts {
        assert_eq!(counts, &expected_counts, "attempts of {request_id}");
    }

    let ledger_stats = cluster_counters(&envoy, "ledger").await;
    assert_eq!(
        counter(&ledger_stats, "upstream_rq_total"),
        3 * REQUESTS,
        "{ledger_stats:#?}"
    );
    assert_eq!(
        counter(&ledger_stats, "upstream_rq_retry"),
        2 * REQUESTS,
        "{ledger_stats:#?}"
    );
    assert_eq!(
        counter(&ledger_stats, "upstream_rq_retry_success"),
        REQUESTS,
        "{ledger_stats:#?}"
    );
    let hop_stats = cluster_counters(&envoy, "ledger_with_retries").await;
    assert_eq!(
        counter(&hop_stats, "upstream_rq_total"),
        REQUESTS,
        "one request per side call through the internal listener: {hop_stats:#?}"
    );
    assert_eq!(
        counter(&hop_stats, "upstream_rq_retry"),
        0,
        "{hop_stats:#?}"
    );
}

/// The filter's timeout_ms covers all attempts of the internal listener's
/// route. When it fires, the call ends as `timeout`, and Envoy cancels the
/// attempt in flight and the retry still to come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_timeout_bounds_mesh_retries() {
    let primary = Upstream::start(created()).await;
    // Every attempt fails after 500 ms, and the first retry back-off is 0 to
    // 25 ms. So the second attempt starts at 500 to 525 ms, and the 750 ms
    // filter timeout cuts it off. A third would start at 1000 ms at the
    // earliest.
    let ledger = FlakyUpstream::start(usize::MAX, Duration::from_millis(500)).await;
    let envoy = start_mesh_retries(primary.port(), ledger.port, |yaml| {
        replace_once(&yaml, r#""timeout_ms": 2000"#, r#""timeout_ms": 750"#)
    })
    .await;

    const REQUESTS: u64 = 3;
    for i in 0..REQUESTS {
        let request = Request::post(&format!("/api/v1/orders/{i}"), "x");
        let response = send(Proto::Http1, envoy.port(), request).await.unwrap();
        assert_eq!(response.status, 201);
    }
    wait_settled(&envoy, "orders", "ledger", REQUESTS).await;
    assert_eq!(
        envoy.counter(&outcome("orders", "ledger", "timeout")).await,
        REQUESTS
    );

    // Once the internal listener has no request left, no attempt can follow.
    wait_until("the internal listener to finish its requests", || async {
        let downstream = gauge(&envoy, "http.ledger_retries.downstream_rq_active").await;
        let upstream = gauge(&envoy, "cluster.ledger.upstream_rq_active").await;
        if downstream == Some(0) && upstream == Some(0) {
            Ok(())
        } else {
            Err(format!(
                "downstream_rq_active {downstream:?}, ledger upstream_rq_active {upstream:?}"
            ))
        }
    })
    .await;
    let attempts = ledger.attempts();
    assert_eq!(attempts.len() as u64, REQUESTS);
    let expected_counts = vec![Some("1".to_owned()), Some("2".to_owned())];
    for (request_id, counts) in &attempts {
        assert_eq!(counts, &expected_counts, "attempts of {request_id}");
    }
    let ledger_stats = cluster_counters(&envoy, "ledger").await;
    assert_eq!(
        counter(&ledger_stats, "upstream_rq_retry"),
        REQUESTS,
        "{ledger_stats:#?}"
    );
    assert_eq!(
        counter(&ledger_stats, "upstream_rq_total"),
        2 * REQUESTS,
        "{ledger_stats:#?}"
    );
    // HTTP/1.1 can cancel an attempt only by closing its connection.
    assert_eq!(
        counter(&ledger_stats, "upstream_cx_destroy_local_with_active_rq"),
        REQUESTS,
        "{ledger_stats:#?}"
    );
    // Envoy counts the filter's timeout on the cluster it called, and the
    // internal listener counts the call as reset by its downstream.
    let hop_stats = cluster_counters(&envoy, "ledger_with_retries").await;
    assert_eq!(
        counter(&hop_stats, "upstream_rq_timeout"),
        REQUESTS,
        "{hop_stats:#?}"
    );
    assert_eq!(
        envoy
            .counter("http.ledger_retries.downstream_rq_rx_reset")
            .await,
        REQUESTS
    );
}

/// The route's per_try_timeout ends an attempt that hangs and starts a
/// retry, well within the filter's timeout_ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_retries_hanging_attempt() {
    let primary = Upstream::start(created()).await;
    // The first attempt would get its response after 1500 ms, past the 600 ms
    // per_try_timeout of envoy/mesh-retries.yaml, and the second at once.
    let ledger = FlakyUpstream::start(1, Duration::from_millis(1500)).await;
    let envoy = start_mesh_retries(primary.port(), ledger.port, |yaml| yaml).await;

    const REQUESTS: u64 = 3;
    let results = send_concurrent(
        Proto::Http1,
        envoy.port(),
        1,
        REQUESTS as usize,
        WAIT,
        |_, i| Request::post(&format!("/api/v1/orders/{i}"), "x"),
    )
    .await;
    assert!(results
        .iter()
        .all(|r| r.as_ref().is_ok_and(|r| r.status == 201)));
    wait_settled(&envoy, "orders", "ledger", REQUESTS).await;
    assert_eq!(
        envoy.counter(&outcome("orders", "ledger", "success")).await,
        REQUESTS
    );

    let attempts = ledger.attempts();
    assert_eq!(attempts.len() as u64, REQUESTS);
    let expected_counts = vec![Some("1".to_owned()), Some("2".to_owned())];
    for (request_id, counts) in &attempts {
        assert_eq!(counts, &expected_counts, "attempts of {request_id}");
    }
    let ledger_stats = cluster_counters(&envoy, "ledger").await;
    assert_eq!(
        counter(&ledger_stats, "upstream_rq_per_try_timeout"),
        REQUESTS,
        "{ledger_stats:#?}"
    );
    assert_eq!(
        counter(&ledger_stats, "upstream_rq_retry_success"),
        REQUESTS,
        "{ledger_stats:#?}"
    );
}

/// Returns the value at `percentile` (0 to 100) of sorted `samples`.
fn percentile(sorted: &[Duration], percentile: f64) -> Duration {
    let index = ((sorted.len() - 1) as f64 * percentile / 100.0).round() as usize;
    sorted[index]
}

/// Measures what the internal listener hop adds to a side call, and prints
/// it. Two Envoys run envoy/mesh-retries.yaml with the rule switched to
/// fan-out, so each client response waits for its side call: one calls
/// the ledger directly, the other through the internal listener. Ignored
/// by default because it only reports numbers; run it with
/// `cargo test --release --test mesh -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn internal_listener_hop_latency() {
    let primary = Upstream::start(created()).await;
    let ledger = FlakyUpstream::start(0, Duration::ZERO).await;
    let fanout = |yaml: String| replace_once(&yaml, r#""mode": "shadow""#, r#""mode": "fanout""#);
    let direct = start_mesh_retries(primary.port(), ledger.port, |yaml| {
        let yaml = fanout(yaml);
        replace_once(
            &yaml,
            r#""cluster": "ledger_with_retries""#,
            r#""cluster": "ledger""#,
        )
    })
    .await;
    let hop = start_mesh_retries(primary.port(), ledger.port, fanout).await;

    // Alternating rounds, so a slow spell of the machine hits both alike.
    const ROUNDS: usize = 10;
    const PER_ROUND: usize = 100;
    let mut latencies = [Vec::new(), Vec::new()];
    for _ in 0..ROUNDS {
        for (envoy, samples) in [&direct, &hop].into_iter().zip(latencies.iter_mut()) {
            let results =
                send_concurrent_timed(Proto::Http1, envoy.port(), 1, PER_ROUND, WAIT, |_, i| {
                    Request::post(&format!("/api/v1/orders/{i}"), "x")
                })
                .await;
            for timed in results {
                assert_eq!(timed.result.unwrap().status, 201);
                samples.push(timed.latency);
            }
        }
    }
    for (name, samples) in ["direct", "internal listener"].iter().zip(&mut latencies) {
        samples.sort();
        println!(
            "{name}: {} fan-out requests, p50 {:?}, p90 {:?}, p99 {:?}",
            samples.len(),
            percentile(samples, 50.0),
            percentile(samples, 90.0),
            percentile(samples, 99.0)
        );
    }
}
