//! The Istio example in examples/istio/ works as shipped. The WasmPlugin's
//! `pluginConfig`, turned into the JSON that Istio hands the filter, runs
//! both of its rules in a real Envoy whose target clusters carry Istio's
//! names (`outbound|PORT||HOST`). The filter's metrics survive Istio's stats
//! settings.
//!
//! What comes from Istio's source rather than a running Istio (read in
//! istio/istio, not executed):
//! - pilot/pkg/model/extensions.go: `pluginConfig` is a
//!   google.protobuf.Struct that Istio encodes with protojson into the Wasm
//!   filter's `configuration` StringValue, with the plugin name
//!   `<namespace>.<name>`, `root_id` from `pluginName`, and
//!   `failure_policy: FAIL_OPEN` for `failStrategy: FAIL_OPEN` (Istio 1.25+).
//! - tools/packaging/common/envoy_bootstrap.json and pkg/bootstrap/config.go:
//!   the sidecar's `stats_config` (Istio's tag extractors with
//!   `use_all_default_tags: false`, and an inclusion list that always has
//!   the prefix `wasm`).
//! - pkg/envoy/proxy.go: the agent passes a bootstrap override file to
//!   Envoy as `--config-yaml`.

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use support::{free_port, send, wasm_path, Behaviour, Envoy, Proto, Request, Upstream};

const WAIT: Duration = Duration::from_secs(15);
const NAMESPACE: &str = "shop";

fn example_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples/istio")
        .join(name)
}

/// Parses every YAML document in examples/istio/`name`.
fn yaml_documents(name: &str) -> Vec<Value> {
    let path = example_path(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {} failed: {e}", path.display()));
    serde_norway::Deserializer::from_str(&text)
        .map(|document| {
            Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
        })
        .collect()
}

fn wasm_plugin() -> Value {
    let documents = yaml_documents("wasmplugin.yaml");
    assert_eq!(documents.len(), 1, "wasmplugin.yaml holds one document");
    documents.into_iter().next().unwrap()
}

/// Re-encodes a YAML-decoded value as Istio does. `pluginConfig` is a
/// google.protobuf.Struct, whose numbers are doubles, and protojson writes a
/// whole double without a fraction: 2000, not 2000.0.
fn as_struct_json(value: Value) -> Value {
    match value {
        Value::Number(number) => {
            let double = number.as_f64().expect("a YAML number fits in a double");
            // Below 2^53 every whole double is exact as an integer.
            if double.fract() == 0.0 && double.abs() < 9_007_199_254_740_992.0 {
                Value::from(double as i64)
            } else {
                Value::from(double)
            }
        }
        Value::Array(items) => Value::Array(items.into_iter().map(as_struct_json).collect()),
        Value::Object(fields) => Value::Object(
            fields
                .into_iter()
                .map(|(key, value)| (key, as_struct_json(value)))
                .collect(),
        ),
        other => other,
    }
}

/// Returns the plugin configuration JSON that Istio hands the filter.
fn plugin_config_json() -> String {
    let plugin_config = wasm_plugin()["spec"]["pluginConfig"].clone();
    assert!(
        plugin_config.is_object(),
        "wasmplugin.yaml has no spec.pluginConfig mapping"
    );
    as_struct_json(plugin_config).to_string()
}

/// An Istio outbound cluster name, `outbound|PORT|SUBSET|HOST`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct OutboundCluster {
    name: String,
    host: String,
}

fn parse_outbound_cluster(name: &str) -> OutboundCluster {
    let parts: Vec<&str> = name.split('|').collect();
    let [direction, port, _subset, host] = parts[..] else {
        panic!("cluster {name:?} is not of the form outbound|PORT|SUBSET|HOST");
    };
    assert_eq!(direction, "outbound", "cluster {name:?}");
    assert!(port.parse::<u16>().is_ok(), "cluster {name:?}: bad port");
    assert!(
        host.ends_with(&format!(".{NAMESPACE}.svc.cluster.local")),
        "cluster {name:?}: host is not a service of namespace {NAMESPACE}"
    );
    OutboundCluster {
        name: name.to_owned(),
        host: host.to_owned(),
    }
}

fn target_clusters(plugin_config: &Value) -> BTreeSet<OutboundCluster> {
    let mut clusters = BTreeSet::new();
    for rule in plugin_config["rules"].as_array().expect("rules is a list") {
        for target in rule["targets"].as_array().expect("targets is a list") {
            let name = target["cluster"].as_str().expect("cluster is a string");
            clusters.insert(parse_outbound_cluster(name));
        }
    }
    clusters
}

/// Returns the `custom_bootstrap.json` of examples/istio/bootstrap-override.yaml.
fn bootstrap_override() -> String {
    let documents = yaml_documents("bootstrap-override.yaml");
    let text = documents[0]["data"]["custom_bootstrap.json"]
        .as_str()
        .expect("bootstrap-override.yaml has data.custom_bootstrap.json")
        .to_owned();
    serde_json::from_str::<Value>(&text).expect("custom_bootstrap.json is valid JSON");
    text
}

/// Returns the sidecar's stats settings from Istio's bootstrap template
/// (tools/packaging/common/envoy_bootstrap.json) with the default inclusion
/// list of pkg/bootstrap/config.go.
fn istio_stats_config() -> Value {
    json!({
        "use_all_default_tags": false,
        "stats_tags": [
            {"tag_name": "cluster_name", "regex": "^cluster\\.((.+?(\\..+?\\.svc\\.cluster\\.local)?)\\.)"},
            {"tag_name": "tcp_prefix", "regex": "^tcp\\.((.*?)\\.)\\w+?$"},
            {"tag_name": "response_code", "regex": "_rq(_(\\d{3}))$"},
            {"tag_name": "response_code_class", "regex": "_rq(_(\\dxx))$"},
            {"tag_name": "http_conn_manager_listener_prefix", "regex": "^listener(?=\\.).*?\\.http\\.(((?:[_.[:digit:]]*|[_\\[\\]aAbBcCdDeEfF[:digit:]]*))\\.)"},
            {"tag_name": "http_conn_manager_prefix", "regex": "^http\\.(((?:[_.[:digit:]]*|[_\\[\\]aAbBcCdDeEfF[:digit:]]*))\\.)"},
            {"tag_name": "listener_address", "regex": "^listener\\.(((?:[_.[:digit:]]*|[_\\[\\]aAbBcCdDeEfF[:digit:]]*))\\.)"},
            {"tag_name": "mongo_prefix", "regex": "^mongo\\.(.+?)\\.(collection|cmd|cx_|op_|delays_|decoding_)(.*?)$"},
            {"tag_name": "cache", "regex": "(cache\\.(.+?)\\.)"},
            {"tag_name": "component", "regex": "(component\\.(.+?)\\.)"},
            {"tag_name": "tag", "regex": "(tag\\.(.+?);\\.)"},
            {"tag_name": "wasm_filter", "regex": "(wasm_filter\\.(.+?)\\.)"},
            {"tag_name": "authz_enforce_result", "regex": "rbac(\\.(allowed|denied))"},
            {"tag_name": "authz_dry_run_action", "regex": "(\\.istio_dry_run_(allow|deny)_)"},
            {"tag_name": "authz_dry_run_result", "regex": "(\\.shadow_(allowed|denied))"}
        ],
        "stats_matcher": {"inclusion_list": {"patterns": [
            {"prefix": "reporter="},
            {"prefix": "cluster_manager"},
            {"prefix": "listener_manager"},
            {"prefix": "server"},
            {"prefix": "cluster.xds-grpc"},
            {"prefix": "wasm"},
            {"suffix": "rbac.allowed"},
            {"suffix": "rbac.denied"},
            {"suffix": "shadow_allowed"},
            {"suffix": "shadow_denied"},
            {"safe_regex": {"regex": "vhost\\..*\\.route\\..*"}},
            {"prefix": "component"},
            {"prefix": "istio"}
        ]}}
    })
}

fn static_cluster(name: &str, port: u16) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "127.0.0.1", "port_value": port}
            }}}]}]
        }
    })
}

/// Renders a bootstrap shaped like a sidecar's inbound path. The listener
/// routes to `inbound|8080||`, and the Wasm filter is configured as Istio
/// configures a WasmPlugin named mesh-fanout in namespace shop.
fn sidecar_bootstrap(
    port: u16,
    admin_port: u16,
    plugin_json: &str,
    inbound_port: u16,
    targets: &[(String, u16)],
) -> String {
    let plugin_name = format!("{NAMESPACE}.mesh-fanout");
    let wasm = json!({
        "name": plugin_name,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": plugin_name,
                "root_id": wasm_plugin()["spec"]["pluginName"],
                "failure_policy": "FAIL_OPEN",
                "vm_config": {
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": wasm_path()}}
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": plugin_json
                }
            }
        }
    });
    let mut clusters = vec![static_cluster("inbound|8080||", inbound_port)];
    clusters.extend(
        targets
            .iter()
            .map(|(name, port)| static_cluster(name, *port)),
    );
    let bootstrap = json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "stats_config": istio_stats_config(),
        "static_resources": {
            "listeners": [{
                "name": "virtualInbound",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "inbound_0.0.0.0_8080",
                        "generate_request_id": true,
                        "route_config": {"virtual_hosts": [{
                            "name": "inbound|http|8080",
                            "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "inbound|8080||", "timeout": "10s"}}]
                        }]},
                        "http_filters": [
                            wasm,
                            {"name": "envoy.filters.http.router", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                            }}
                        ]
                    }
                }]}]
            }],
            "clusters": clusters
        }
    });
    // JSON is YAML, so Envoy reads this as a YAML bootstrap.
    bootstrap.to_string()
}

/// Starts Envoy on `sidecar_bootstrap` with the example's target clusters,
/// each pointing at 127.0.0.1:`target_port(service)`. With `with_override`,
/// Envoy also gets bootstrap-override.yaml as `--config-yaml`, as Istio's
/// agent passes it.
async fn start_sidecar(
    plugin_json: &str,
    shop_api_port: u16,
    with_override: bool,
    target_port: impl Fn(&str) -> u16,
) -> Envoy {
    let plugin_config: Value = serde_json::from_str(plugin_json).unwrap();
    let targets: Vec<(String, u16)> = target_clusters(&plugin_config)
        .into_iter()
        .map(|cluster| {
            let service = cluster.host.split('.').next().unwrap().to_owned();
            (cluster.name, target_port(&service))
        })
        .collect();
    assert_eq!(targets.len(), 3, "{targets:?}");

    let port = free_port();
    let admin_port = free_port();
    let bootstrap = sidecar_bootstrap(port, admin_port, plugin_json, shop_api_port, &targets);
    let mut args = Vec::new();
    if with_override {
        args.extend(["--config-yaml".to_owned(), bootstrap_override()]);
    }
    Envoy::start_from_yaml_with_args(&bootstrap, port, admin_port, &args)
        .await
        .unwrap_or_else(|message| panic!("{message}"))
}

fn delayed(status: u16, millis: u64) -> Behaviour {
    Behaviour {
        status,
        delay: Duration::from_millis(millis),
        ..Behaviour::default()
    }
}

#[test]
fn plugin_config_passes_validation() {
    let json = plugin_config_json();
    let parsed = mesh_fanout::core::config::parse(json.as_bytes())
        .unwrap_or_else(|e| panic!("the filter rejects pluginConfig {json}: {e}"));
    assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
    let modes: Vec<_> = parsed
        .config
        .rules
        .iter()
        .map(|rule| (rule.name.as_str(), rule.mode))
        .collect();
    use mesh_fanout::core::config::Mode;
    assert_eq!(
        modes,
        [("signup", Mode::Shadow), ("orders", Mode::Fanout)],
        "the example keeps one shadow and one fan-out rule"
    );
}

#[test]
fn numbers_survive_struct_encoding() {
    let json = plugin_config_json();
    assert!(json.contains(r#""timeout_ms":2000"#), "{json}");
    assert!(json.contains(r#""max_body_bytes":1048576"#), "{json}");
    assert!(
        !json.contains(".0,"),
        "whole numbers must not gain a fraction: {json}"
    );
}

#[test]
fn destination_rules_cover_targets() {
    let plugin = wasm_plugin();
    let target_hosts: BTreeSet<String> = target_clusters(&plugin["spec"]["pluginConfig"])
        .into_iter()
        .map(|cluster| cluster.host)
        .collect();
    let rules = yaml_documents("destinationrule.yaml");
    assert!(!rules.is_empty(), "destinationrule.yaml is empty");
    for rule in &rules {
        let name = rule["metadata"]["name"].as_str().unwrap_or("?");
        assert_eq!(rule["kind"], "DestinationRule", "{name}");
        assert_eq!(rule["metadata"]["namespace"], NAMESPACE, "{name}");
        let host = rule["spec"]["host"].as_str().expect("spec.host");
        assert!(
            target_hosts.contains(host),
            "DestinationRule {name} is for {host}, which no target calls; targets: {target_hosts:?}"
        );
        let policy = &rule["spec"]["trafficPolicy"];
        assert_eq!(policy["tls"]["mode"], "ISTIO_MUTUAL", "{name}");
        assert!(
            policy["connectionPool"].is_object(),
            "{name}: no connectionPool"
        );
        assert!(
            policy["outlierDetection"].is_object(),
            "{name}: no outlierDetection"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_runs_in_envoy() {
    let plugin_json = plugin_config_json();
    let shop_api = Upstream::start(delayed(201, 0)).await;
    let analytics = Upstream::start(delayed(200, 0)).await;
    // Every second inventory call fails, so the second order gets a 502.
    let inventory = Upstream::start(Behaviour {
        fail_every: 2,
        ..delayed(200, 150)
    })
    .await;
    // Slower than the orders responses, so they always report audit as pending.
    let audit = Upstream::start(delayed(200, 300)).await;

    let envoy = start_sidecar(
        &plugin_json,
        shop_api.port(),
        true,
        |service| match service {
            "analytics" => analytics.port(),
            "inventory" => inventory.port(),
            "audit" => audit.port(),
            other => panic!("no local upstream for target service {other}"),
        },
    )
    .await;
    let port = envoy.port();

    // Shadow rule: the client gets shop-api's response, and analytics gets a copy.
    let response = send(
        Proto::Http1,
        port,
        Request::post("/api/v1/register", r#"{"email":"a@example.com"}"#)
            .header("host", "shop-api.shop.svc.cluster.local"),
    )
    .await
    .unwrap();
    assert_eq!(response.status, 201);
    analytics.wait_for_count(1, WAIT).await.unwrap();
    let copy = &analytics.requests()[0];
    assert_eq!(copy.path, "/ingest");
    assert_eq!(
        copy.header("host").as_deref(),
        Some("analytics.shop.svc.cluster.local")
    );
    assert_eq!(copy.header("x-source").as_deref(), Some("mesh-fanout"));
    assert_eq!(
        copy.header("x-mesh-fanout").as_deref(),
        Some("signup/analytics")
    );
    assert_eq!(
        copy.body,
        Bytes::from_static(br#"{"email":"a@example.com"}"#)
    );

    // Fan-out rule: the first order succeeds, the second meets inventory's 503.
    let first = send(Proto::Http1, port, Request::post("/api/v1/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(first.status, 201);
    assert_eq!(
        first.header("x-mesh-fanout-result").as_deref(),
        Some("inventory=success;audit=pending")
    );
    let second = send(Proto::Http2, port, Request::post("/api/v1/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(second.status, 502);
    assert_eq!(
        second.body.as_ref(),
        br#"{"error":"fanout_failed","rule":"orders","failed":[{"target":"inventory","outcome":"5xx","status":503}]}"#
    );

    envoy
        .wait_for_counter(
            "wasmcustom.mesh_fanout.rule.orders.target.audit.outcome.success.side_calls",
            2,
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(shop_api.count(), 3);
    assert_eq!(analytics.count(), 1);
    assert_eq!(inventory.count(), 2);
    assert_eq!(audit.count(), 2);

    // Istio's stats matcher keeps the filter's stats (prefix `wasm`), and the
    // override's tags turn them into labels next to Istio's tags.
    let text = envoy.prometheus_text().await;
    let lines: BTreeSet<&str> = text.lines().collect();
    for expected in [
        r#"mesh_fanout_matched{rule="signup"} 1"#,
        r#"mesh_fanout_matched{rule="orders"} 2"#,
        r#"mesh_fanout_side_calls{rule="signup",target="analytics",outcome="success"} 1"#,
        r#"mesh_fanout_side_calls{rule="orders",target="inventory",outcome="success"} 1"#,
        r#"mesh_fanout_side_calls{rule="orders",target="inventory",outcome="5xx"} 1"#,
        r#"mesh_fanout_side_calls{rule="orders",target="audit",outcome="success"} 2"#,
        r#"mesh_fanout_skipped{rule="orders",target="inventory",reason="sampled_out"} 0"#,
        r#"mesh_fanout_held_responses{rule="orders"} 2"#,
        r#"mesh_fanout_failed_responses{rule="orders"} 1"#,
        r#"mesh_fanout_in_flight{rule="orders",target="audit"} 0"#,
    ] {
        assert!(
            lines.contains(expected),
            "no line {expected:?} in /stats/prometheus:\n{}",
            mesh_fanout_lines(&text)
        );
    }
    assert!(
        !text.contains("envoy_cluster_upstream_rq"),
        "Istio's stats matcher should drop cluster stats"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_without_override_keep_long_names() {
    let shop_api = Upstream::start(delayed(201, 0)).await;
    let analytics = Upstream::start(delayed(200, 0)).await;
    // Only the shadow rule runs here, so every target may share one upstream.
    let envoy = start_sidecar(&plugin_config_json(), shop_api.port(), false, |_| {
        analytics.port()
    })
    .await;

    let response = send(
        Proto::Http1,
        envoy.port(),
        Request::post("/api/v1/register", "{}"),
    )
    .await
    .unwrap();
    assert_eq!(response.status, 201);
    envoy
        .wait_for_counter(
            "wasmcustom.mesh_fanout.rule.signup.target.analytics.outcome.success.side_calls",
            1,
            WAIT,
        )
        .await
        .unwrap();

    let text = envoy.prometheus_text().await;
    let lines: BTreeSet<&str> = text.lines().collect();
    for expected in [
        "mesh_fanout_rule_signup_matched{} 1",
        "mesh_fanout_rule_signup_target_analytics_outcome_success_side_calls{} 1",
    ] {
        assert!(
            lines.contains(expected),
            "no line {expected:?} in /stats/prometheus:\n{}",
            mesh_fanout_lines(&text)
        );
    }
}

/// Returns the exposition lines of the filter's metrics, for failure messages.
fn mesh_fanout_lines(text: &str) -> String {
    text.lines()
        .filter(|line| line.contains("mesh_fanout"))
        .collect::<Vec<_>>()
        .join("\n")
}
