//! The filter's metrics as Prometheus reads them from Envoy's
//! `/stats/prometheus`, with the `stats_tags` that envoy/demo.yaml uses:
//! exact exposition lines for the counters, the `in_flight` gauge and the
//! side-call latency histogram.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::{send, Behaviour, Envoy, EnvoyConfig, Proto, Request, Upstream};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(15);
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// The target's response delay. Each side call then takes between 1500 ms
/// and 2500 ms (a full second of slack), so every sample falls in the
/// default histogram's (1000, 2500] bucket.
const TARGET_DELAY: Duration = Duration::from_millis(1500);
const REQUESTS: u64 = 3;

const SHADOW_RULE: &str = r#"{"rules": [{"name": "signup", "match": {"path": {"prefix": "/signup"}},
    "targets": [{"name": "slow", "cluster": "slow", "timeout_ms": 5000}]}]}"#;

/// The bucket boundaries of Envoy's default histogram settings
/// (`le` labels, in milliseconds for `side_call_ms`), as Envoy 1.40 and
/// 1.36 print them.
const DEFAULT_BUCKETS: [&str; 19] = [
    "0.5", "1", "5", "10", "25", "50", "100", "250", "500", "1000", "2500", "5000", "10000",
    "30000", "60000", "300000", "600000", "1800000", "3600000",
];

/// `histogram_bucket_settings` proposed for the filter's histograms: finer
/// steps from 1 ms to 3 s, where side calls and their timeouts fall, and
/// microsecond steps for `handoff_delay_us`. The two matches never overlap:
/// every millisecond histogram is named `wasmcustom.mesh_fanout.rule.…`.
const PROPOSED_BUCKET_SETTINGS: &str = r#"  histogram_bucket_settings:
  - match: { exact: wasmcustom.mesh_fanout.handoff_delay_us }
    buckets: [25, 50, 100, 200, 400, 800, 1500, 3000, 6000, 12500, 25000, 100000]
  - match: { prefix: wasmcustom.mesh_fanout.rule. }
    buckets: [1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 250, 400, 600, 800, 1000, 1500, 2000, 3000, 5000, 10000, 60000]
"#;

/// Renders `config` with Envoy's stats flush every 100 ms, so histograms
/// show new samples soon, plus `extra_stats_config` under `stats_config`.
fn bootstrap(config: &EnvoyConfig, extra_stats_config: &str) -> String {
    let yaml = config.to_yaml();
    assert!(
        yaml.contains("\nstats_config:\n"),
        "the test bootstrap no longer has a stats_config block:\n{yaml}"
    );
    let yaml = yaml.replacen(
        "\nstats_config:\n",
        &format!("\nstats_config:\n{extra_stats_config}"),
        1,
    );
    format!("stats_flush_interval: 0.1s\n{yaml}")
}

async fn start(config: EnvoyConfig, extra_stats_config: &str) -> Envoy {
    Envoy::start_from_yaml(
        &bootstrap(&config, extra_stats_config),
        config.port(),
        config.admin_port(),
    )
    .await
    .unwrap_or_else(|message| panic!("{message}"))
}

/// Polls `/stats/prometheus` until it has every line of `expected`, then
/// returns its text. Fails after `WAIT` with the filter's lines.
async fn wait_for_lines(envoy: &Envoy, expected: &[String]) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = envoy.prometheus_text().await;
        let lines: BTreeSet<&str> = text.lines().collect();
        let missing: Vec<&String> = expected
            .iter()
            .filter(|line| !lines.contains(line.as_str()))
            .collect();
        if missing.is_empty() {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "missing from /stats/prometheus after {WAIT:?}: {missing:#?}\nfilter lines:\n{}",
            filter_lines(&text)
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn filter_lines(text: &str) -> String {
    text.lines()
        .filter(|line| line.contains("mesh_fanout"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Returns the `le` labels of `metric`'s bucket lines, in output order.
fn bucket_bounds(text: &str, metric: &str) -> Vec<String> {
    let prefix = format!("{metric}_bucket{{");
    text.lines()
        .filter(|line| line.starts_with(&prefix))
        .filter_map(|line| {
            // `le` is the last label, and "rule=" also contains "le=", so search from the end.
            let start = line.rfind("le=\"")? + 4;
            let end = start + line[start..].find('"')?;
            Some(line[start..end].to_owned())
        })
        .collect()
}

fn labels(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(name, value)| format!("{name}=\"{value}\""))
        .collect::<Vec<_>>()
        .join(",")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposition_lines_exact() {
    let primary = Upstream::start(Behaviour::default()).await;
    let slow = Upstream::start(Behaviour {
        delay: TARGET_DELAY,
        ..Behaviour::default()
    })
    .await;
    let envoy = start(
        EnvoyConfig::new(primary.port())
            .target("slow", slow.port(), Proto::Http1)
            .plugin_config(SHADOW_RULE),
        "",
    )
    .await;

    for i in 0..REQUESTS {
        let response = send(
            Proto::Http1,
            envoy.port(),
            Request::post(&format!("/signup/{i}"), "{}"),
        )
        .await
        .unwrap();
        assert_eq!(response.status, 200);
    }

    // All three copies wait at the target for 1.5 s, far longer than the
    // poll needs to see them.
    let target = labels(&[("rule", "signup"), ("target", "slow")]);
    wait_for_lines(
        &envoy,
        &[format!("mesh_fanout_in_flight{{{target}}} {REQUESTS}")],
    )
    .await;

    let mut expected = vec![
        "# TYPE mesh_fanout_matched counter".to_owned(),
        format!("mesh_fanout_matched{{rule=\"signup\"}} {REQUESTS}"),
        "# TYPE mesh_fanout_dispatched counter".to_owned(),
        format!("mesh_fanout_dispatched{{{target}}} {REQUESTS}"),
        "# TYPE mesh_fanout_in_flight gauge".to_owned(),
        format!("mesh_fanout_in_flight{{{target}}} 0"),
        "# TYPE mesh_fanout_side_calls counter".to_owned(),
        "# TYPE mesh_fanout_skipped counter".to_owned(),
        "# TYPE mesh_fanout_side_call_ms histogram".to_owned(),
        format!("mesh_fanout_side_call_ms_count{{{target}}} {REQUESTS}"),
    ];
    for outcome in [
        "success",
        "4xx",
        "5xx",
        "timeout",
        "reset",
        "overflow",
        "dispatch_error",
    ] {
        let count = if outcome == "success" { REQUESTS } else { 0 };
        let series = labels(&[("rule", "signup"), ("target", "slow"), ("outcome", outcome)]);
        expected.push(format!("mesh_fanout_side_calls{{{series}}} {count}"));
    }
    for reason in [
        "sampled_out",
        "body_too_large",
        "loop",
        "aborted",
        "unsupported",
        "in_flight_limit",
        "buffer_limit",
    ] {
        let series = labels(&[("rule", "signup"), ("target", "slow"), ("reason", reason)]);
        expected.push(format!("mesh_fanout_skipped{{{series}}} 0"));
    }
    // Every sample took between 1000 and 2500 ms.
    for bound in DEFAULT_BUCKETS.iter().copied().chain(["+Inf"]) {
        let count = match bound.parse::<f64>() {
            Ok(value) if value < 2500.0 => 0,
            _ => REQUESTS,
        };
        let series = labels(&[("rule", "signup"), ("target", "slow"), ("le", bound)]);
        expected.push(format!(
            "mesh_fanout_side_call_ms_bucket{{{series}}} {count}"
        ));
    }
    let text = wait_for_lines(&envoy, &expected).await;

    assert_eq!(
        bucket_bounds(&text, "mesh_fanout_side_call_ms"),
        DEFAULT_BUCKETS
            .iter()
            .copied()
            .chain(["+Inf"])
            .collect::<Vec<_>>(),
        "Envoy's default bucket boundaries changed"
    );
    let sum_line = text
        .lines()
        .find(|line| line.starts_with(&format!("mesh_fanout_side_call_ms_sum{{{target}}} ")))
        .unwrap_or_else(|| panic!("no side_call_ms_sum line:\n{}", filter_lines(&text)));
    let sum: f64 = sum_line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(
        (1500.0 * REQUESTS as f64..2500.0 * REQUESTS as f64).contains(&sum),
        "{sum_line}"
    );
    assert_eq!(slow.count() as u64, REQUESTS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposed_buckets_apply() {
    let primary = Upstream::start(Behaviour::default()).await;
    let fast = Upstream::start(Behaviour::default()).await;
    let envoy = start(
        EnvoyConfig::new(primary.port())
            .target("slow", fast.port(), Proto::Http1)
            .plugin_config(SHADOW_RULE),
        PROPOSED_BUCKET_SETTINGS,
    )
    .await;
    let response = send(Proto::Http1, envoy.port(), Request::post("/signup", "{}"))
        .await
        .unwrap();
    assert_eq!(response.status, 200);

    let target = labels(&[("rule", "signup"), ("target", "slow")]);
    let text = wait_for_lines(
        &envoy,
        &[
            format!("mesh_fanout_side_call_ms_count{{{target}}} 1"),
            "mesh_fanout_handoff_delay_us_count{} 1".to_owned(),
        ],
    )
    .await;

    let side_call_bounds: Vec<String> = [
        "1", "2", "5", "10", "20", "30", "50", "75", "100", "150", "250", "400", "600", "800",
        "1000", "1500", "2000", "3000", "5000", "10000", "60000", "+Inf",
    ]
    .map(str::to_owned)
    .to_vec();
    assert_eq!(
        bucket_bounds(&text, "mesh_fanout_side_call_ms"),
        side_call_bounds
    );
    let handoff_bounds: Vec<String> = [
        "25", "50", "100", "200", "400", "800", "1500", "3000", "6000", "12500", "25000", "100000",
        "+Inf",
    ]
    .map(str::to_owned)
    .to_vec();
    assert_eq!(
        bucket_bounds(&text, "mesh_fanout_handoff_delay_us"),
        handoff_bounds
    );
}

/// Collects the PromQL of every panel target and template variable.
fn dashboard_queries(value: &serde_json::Value, queries: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(fields) => {
            for (key, field) in fields {
                match (key.as_str(), field) {
                    ("expr" | "definition", serde_json::Value::String(query)) => {
                        queries.push(query.clone())
                    }
                    _ => dashboard_queries(field, queries),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                dashboard_queries(item, queries);
            }
        }
        _ => {}
    }
}

/// Splits PromQL into identifiers, skipping quoted strings, so
/// `rate(x{a="b"}[5m])` gives rate, x, a, m.
fn promql_identifiers(query: &str) -> Vec<String> {
    let mut identifiers = Vec::new();
    let mut current = String::new();
    let mut quote = None;
    for c in query.chars() {
        if let Some(q) = quote {
            if c == q {
                quote = None;
            }
            continue;
        }
        if c == '"' || c == '\'' || c == '`' {
            quote = Some(c);
        } else if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            current.push(c);
            continue;
        }
        if !current.is_empty() {
            identifiers.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        identifiers.push(current);
    }
    identifiers
        .into_iter()
        .filter(|token| !token.starts_with(|c: char| c.is_ascii_digit()))
        .collect()
}

/// Returns the label names used in `by (...)` clauses, `{name op "value"}` matchers and
/// `label_values(metric, name)`.
fn promql_label_names(query: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = query;
    while let Some(start) = rest.find("by (") {
        let inner = &rest[start + 4..];
        let end = inner.find(')').expect("unclosed by (");
        names.extend(inner[..end].split(',').map(|name| name.trim().to_owned()));
        rest = &inner[end..];
    }
    let mut rest = query;
    while let Some(start) = rest.find('{') {
        let inner = &rest[start + 1..];
        let end = inner.find('}').expect("unclosed {");
        for matcher in inner[..end].split(',') {
            let name = matcher.split(['=', '!', '~']).next().unwrap().trim();
            names.insert(name.to_owned());
        }
        rest = &inner[end..];
    }
    if let Some(args) = query.strip_prefix("label_values(") {
        let label = args.trim_end_matches(')').rsplit(',').next().unwrap();
        names.insert(label.trim().to_owned());
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_dashboard_metrics_exist() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/grafana/mesh-fanout.json");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {} failed: {e}", path.display())),
    )
    .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()));
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);

    // One shadow and one fan-out rule, so Envoy defines every metric the
    // filter has, and one request each, so every histogram has a sample.
    let primary = Upstream::start(Behaviour::default()).await;
    let side = Upstream::start(Behaviour::default()).await;
    let envoy = start(
        EnvoyConfig::new(primary.port())
            .target("side", side.port(), Proto::Http1)
            .plugin_config(
                r#"{"rules": [
                    {"name": "signup", "match": {"path": {"prefix": "/signup"}},
                     "targets": [{"name": "a", "cluster": "side"}]},
                    {"name": "orders", "match": {"path": {"prefix": "/orders"}}, "mode": "fanout",
                     "targets": [{"name": "b", "cluster": "side"}]}]}"#,
            ),
        "",
    )
    .await;
    for path in ["/signup", "/orders"] {
        let response = send(Proto::Http1, envoy.port(), Request::post(path, "{}"))
            .await
            .unwrap();
        assert_eq!(response.status, 200, "{path}");
    }
    let text = wait_for_lines(
        &envoy,
        &[
            r#"mesh_fanout_side_call_ms_count{rule="signup",target="a"} 1"#.to_owned(),
            r#"mesh_fanout_side_call_ms_count{rule="orders",target="b"} 1"#.to_owned(),
            r#"mesh_fanout_held_ms_count{rule="orders"} 1"#.to_owned(),
        ],
    )
    .await;

    let mut metrics = BTreeSet::new();
    let mut label_names = BTreeSet::new();
    for line in text.lines().filter(|line| line.starts_with("mesh_fanout")) {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        metrics.insert(line[..name_end].to_owned());
        if let Some(labels) = line.get(name_end..).and_then(|rest| rest.strip_prefix('{')) {
            let labels = &labels[..labels.find('}').unwrap()];
            for pair in labels.split(',').filter(|pair| !pair.is_empty()) {
                label_names.insert(pair.split('=').next().unwrap().to_owned());
            }
        }
    }

    let mut referenced = BTreeSet::new();
    for query in &queries {
        for identifier in promql_identifiers(query) {
            if identifier.starts_with("mesh_fanout") {
                assert!(
                    metrics.contains(&identifier),
                    "the dashboard queries {identifier}, which Envoy does not export; \
                     query: {query}\nexported: {metrics:#?}"
                );
                referenced.insert(identifier);
            }
        }
        for label in promql_label_names(query) {
            assert!(
                label_names.contains(&label),
                "the dashboard uses label {label:?}, which the filter's metrics lack; \
                 query: {query}\nlabels: {label_names:?}"
            );
        }
    }
    for required in [
        "mesh_fanout_side_calls",
        "mesh_fanout_side_call_ms_bucket",
        "mesh_fanout_held_ms_bucket",
        "mesh_fanout_skipped",
        "mesh_fanout_in_flight",
    ] {
        assert!(
            referenced.contains(required),
            "the dashboard has no panel on {required}; it queries {referenced:?}"
        );
    }
}
