//! Runs the two scenarios of envoy/demo.yaml end to end: user registration,
//! shadowed by the "signup" rule, and orders, fanned out by the "orders"
//! rule.
//!
//! The demo starts the six services of that file in process and runs real
//! Envoy on the file itself, with free ports. It sends `POST
//! /api/v1/register` and `POST /api/v1/orders` at the same time, over
//! HTTP/1.1 and HTTP/2, and waits until every side call has an outcome.
//! Then it prints client latency and responses, per-target outcomes, the
//! fan-out counters, Envoy's histograms and example Prometheus lines.
//!
//! ```text
//! make demo
//! ENVOY_BIN=/path/to/envoy cargo run --release --example demo
//! ```
//!
//! Exits with status 1 and a message if Envoy fails or the stats do not add
//! up within their deadlines. It also fails when a registration returns
//! anything but 201, an order returns anything but 201 or a 502 with the
//! fan-out failure body, or the number of 502s differs from inventory's 5xx
//! outcomes.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use mesh_fanout::core::outcome::{Outcome, Skip};
use tokio::time::Instant;

use support::client::{send_concurrent_timed, Proto, Request, Response, TimedResult};
use support::envoy::{free_port, try_wasm_path, Envoy};
use support::stats::Histogram;
use support::upstream::{Behaviour, Upstream};

const SHIPPED_CONFIG: &str = "envoy/demo.yaml";
/// The filter's path in envoy/demo.yaml, relative to the repository root.
const SHIPPED_WASM_FILENAME: &str = "target/wasm32-wasip1/release/mesh_fanout.wasm";
/// The `port_value`s of envoy/demo.yaml, each replaced with a free port.
const SHIPPED_LISTENER_PORT: u16 = 10000;
const SHIPPED_ADMIN_PORT: u16 = 9901;
const SHIPPED_USERS_PORT: u16 = 8081;
const SHIPPED_ANALYTICS_PORT: u16 = 8082;
const SHIPPED_MARKETING_PORT: u16 = 8083;
const SHIPPED_ORDERS_PORT: u16 = 8084;
const SHIPPED_INVENTORY_PORT: u16 = 8085;
const SHIPPED_AUDIT_PORT: u16 = 8086;

/// A rule of envoy/demo.yaml with its targets in the order of the file.
struct RuleSpec {
    name: &'static str,
    mode: &'static str,
    /// The path prefix that the rule matches, which is also the path the demo sends.
    path: &'static str,
    /// The service that the route sends the matched requests to.
    primary: &'static str,
    targets: &'static [TargetSpec],
}

struct TargetSpec {
    name: &'static str,
    /// The target's `"await"`. Shadow targets are never awaited.
    awaited: bool,
}

const SIGNUP: RuleSpec = RuleSpec {
    name: "signup",
    mode: "shadow",
    path: "/api/v1/register",
    primary: "users",
    targets: &[
        TargetSpec {
            name: "analytics",
            awaited: false,
        },
        TargetSpec {
            name: "marketing",
            awaited: false,
        },
    ],
};

const ORDERS: RuleSpec = RuleSpec {
    name: "orders",
    mode: "fanout",
    path: "/api/v1/orders",
    primary: "orders",
    targets: &[
        TargetSpec {
            name: "inventory",
            awaited: true,
        },
        TargetSpec {
            name: "audit",
            awaited: false,
        },
    ],
};

const RULES: [&RuleSpec; 2] = [&SIGNUP, &ORDERS];

/// The `result_header` of the orders rule.
const RESULT_HEADER: &str = "x-mesh-fanout-result";
/// The 502 body that replaces an orders response when inventory returns
/// 503, the only failure that the demo's inventory service produces.
const INVENTORY_FAILURE_BODY: &str = r#"{"error":"fanout_failed","rule":"orders","failed":[{"target":"inventory","outcome":"5xx","status":503}]}"#;

/// Requests to one rule's path, sent over several connections at once.
struct LoadPlan {
    rule: &'static RuleSpec,
    http1_connections: usize,
    http2_connections: usize,
    requests_per_connection: usize,
    /// Builds request number `n`, counted from 0 over all connections.
    build: fn(usize) -> Request,
}

impl LoadPlan {
    const fn total(&self) -> usize {
        (self.http1_connections + self.http2_connections) * self.requests_per_connection
    }
}

const REGISTRATIONS: LoadPlan = LoadPlan {
    rule: &SIGNUP,
    http1_connections: 8,
    http2_connections: 2,
    requests_per_connection: 40,
    build: registration,
};

/// Fewer connections than for registrations, because each order waits
/// about 60 ms for inventory. 200 orders over 5 connections take about 2.5 s.
const ORDER_LOAD: LoadPlan = LoadPlan {
    rule: &ORDERS,
    http1_connections: 3,
    http2_connections: 2,
    requests_per_connection: 40,
    build: order,
};

/// Limit for sending every request and reading every response.
const LOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// Limit for every side call to reach an outcome after the last response.
/// The maximum side call duration is audit's `timeout_ms` of 3 s.
const OUTCOME_TIMEOUT: Duration = Duration::from_secs(15);
/// Limit for Envoy's histograms to hold every sample. They update at each
/// stats flush, every 1 s with the `stats_flush_interval` of envoy/demo.yaml.
const HISTOGRAM_TIMEOUT: Duration = Duration::from_secs(15);
const POLL_INTERVAL: Duration = Duration::from_millis(50);
const LOG_TAIL_LINES: usize = 40;

/// The percentiles printed for client latency and Envoy's histograms.
const PERCENTILES: [(&str, f64); 4] = [("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("max", 100.0)];

#[tokio::main]
async fn main() -> ExitCode {
    install_panic_hook();
    let result = tokio::select! {
        result = run() => result,
        _ = tokio::signal::ctrl_c() => Err("interrupted".to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("demo failed: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), String> {
    let services = Services::start().await?;
    let wasm = try_wasm_path()?;
    let ports = Ports {
        listener: free_port(),
        admin: free_port(),
        users: services.users.port(),
        analytics: services.analytics.port(),
        marketing: services.marketing.port(),
        orders: services.orders.port(),
        inventory: services.inventory.port(),
        audit: services.audit.port(),
    };
    let shipped_path = Path::new(env!("CARGO_MANIFEST_DIR")).join(SHIPPED_CONFIG);
    let shipped = std::fs::read_to_string(&shipped_path)
        .map_err(|e| format!("reading {} failed: {e}", shipped_path.display()))?;
    let yaml = render_shipped_config(&shipped, &ports, &wasm)?;

    let mut envoy = Envoy::start_from_yaml(&yaml, ports.listener, ports.admin).await?;
    // Declared after `envoy`, so it drops first and hides the PID from the
    // panic hook before Envoy's Drop reaps the process and frees the PID.
    let _kill_on_panic = KillOnPanic::arm(envoy.pid());
    let result = exercise(&mut envoy, &services).await;
    if result.is_err() {
        envoy.keep_files();
    }
    result
}

/// Sends the load, waits for every outcome and histogram sample, and prints the report.
async fn exercise(envoy: &mut Envoy, services: &Services) -> Result<(), String> {
    let version = envoy_version(envoy).await?;
    let (registrations, orders) = tokio::join!(
        send_load(envoy.port(), &REGISTRATIONS),
        send_load(envoy.port(), &ORDER_LOAD)
    );
    check_registrations(&registrations)?;
    check_orders(&orders)?;

    let counters = wait_for_outcomes(envoy, &[&registrations, &orders]).await?;
    let targets: Vec<TargetCounts> = RULES
        .iter()
        .flat_map(|rule| rule.targets.iter().map(|t| (rule.name, t.name)))
        .map(|(rule, target)| TargetCounts::read(&counters, rule, target))
        .collect();
    let fanout = FanoutCounts::read(&counters, ORDERS.name);
    check_failed_orders(&orders, &targets, &fanout)?;
    let histograms = wait_for_histograms(envoy, &targets, &fanout).await?;
    let prometheus_examples = read_prometheus_examples(envoy).await?;

    print_header(envoy, &version);
    print_client(&registrations, services);
    print_targets(&SIGNUP, &counters, &targets, services);
    print_client(&orders, services);
    print_result_headers(&orders);
    print_targets(&ORDERS, &counters, &targets, services);
    print_fanout(&fanout, &orders, &targets, services);
    print_histograms(&targets, &histograms);
    print_prometheus(envoy, &prometheus_examples);
    Ok(())
}

/// The in-process services that envoy/demo.yaml routes to.
struct Services {
    users: Upstream,
    analytics: Upstream,
    marketing: Upstream,
    orders: Upstream,
    inventory: Upstream,
    audit: Upstream,
    /// Response behaviour of each service by name, which the report describes.
    behaviours: BTreeMap<&'static str, Behaviour>,
}

impl Services {
    async fn start() -> Result<Services, String> {
        let users = Behaviour {
            status: 201,
            ..Behaviour::default()
        };
        // One call in five fails, so the outcome table shows 5xx beside success.
        let analytics = Behaviour {
            fail_every: 5,
            ..Behaviour::default()
        };
        // Slow, but under the 500 ms `timeout_ms` of the marketing target.
        let marketing = Behaviour {
            delay: Duration::from_millis(150),
            ..Behaviour::default()
        };

        // Faster than inventory, so most orders responses wait for it.
        let orders = Behaviour {
            status: 201,
            delay: Duration::from_millis(20),
            ..Behaviour::default()
        };
        // One call in ten fails, and each failure turns an orders response
        // into a 502 because the rule sets "on_failure": "fail".
        let inventory = Behaviour {
            delay: Duration::from_millis(60),
            fail_every: 10,
            ..Behaviour::default()
        };
        // Far slower than the orders responses but under the 3000 ms
        // `timeout_ms` of the audit target. Audit is not awaited, so it
        // delays no response.
        let audit = Behaviour {
            delay: Duration::from_millis(400),
            ..Behaviour::default()
        };

        let behaviours = BTreeMap::from([
            ("users", users.clone()),
            ("analytics", analytics.clone()),
            ("marketing", marketing.clone()),
            ("orders", orders.clone()),
            ("inventory", inventory.clone()),
            ("audit", audit.clone()),
        ]);

        Ok(Services {
            users: start_service("users", users).await?,
            analytics: start_service("analytics", analytics).await?,
            marketing: start_service("marketing", marketing).await?,
            orders: start_service("orders", orders).await?,
            inventory: start_service("inventory", inventory).await?,
            audit: start_service("audit", audit).await?,
            behaviours,
        })
    }

    fn by_name(&self, name: &str) -> Option<&Upstream> {
        match name {
            "users" => Some(&self.users),
            "analytics" => Some(&self.analytics),
            "marketing" => Some(&self.marketing),
            "orders" => Some(&self.orders),
            "inventory" => Some(&self.inventory),
            "audit" => Some(&self.audit),
            _ => None,
        }
    }

    /// Describes how service `name` responds, for example
    /// `200 after 60 ms, 503 for 1 call in 10`.
    fn describe(&self, name: &str) -> String {
        let Some(behaviour) = self.behaviours.get(name) else {
            return "?".to_owned();
        };
        let mut text = if behaviour.delay.is_zero() {
            format!("{} at once", behaviour.status)
        } else {
            format!(
                "{} after {} ms",
                behaviour.status,
                behaviour.delay.as_millis()
            )
        };
        if behaviour.fail_every != 0 {
            text.push_str(&format!(", 503 for 1 call in {}", behaviour.fail_every));
        }
        text
    }
}

async fn start_service(name: &str, behaviour: Behaviour) -> Result<Upstream, String> {
    Upstream::start_on(0, behaviour)
        .await
        .map_err(|e| format!("starting the {name} service on 127.0.0.1 failed: {e}"))
}

struct Ports {
    listener: u16,
    admin: u16,
    users: u16,
    analytics: u16,
    marketing: u16,
    orders: u16,
    inventory: u16,
    audit: u16,
}

/// Returns the shipped bootstrap with free ports and the absolute path of
/// the filter, so the demo runs from any working directory and beside
/// other Envoys on this host.
fn render_shipped_config(shipped: &str, ports: &Ports, wasm: &Path) -> Result<String, String> {
    let replacements = [
        ("listener", SHIPPED_LISTENER_PORT, ports.listener),
        ("admin", SHIPPED_ADMIN_PORT, ports.admin),
        ("users cluster", SHIPPED_USERS_PORT, ports.users),
        ("analytics cluster", SHIPPED_ANALYTICS_PORT, ports.analytics),
        ("marketing cluster", SHIPPED_MARKETING_PORT, ports.marketing),
        ("orders cluster", SHIPPED_ORDERS_PORT, ports.orders),
        ("inventory cluster", SHIPPED_INVENTORY_PORT, ports.inventory),
        ("audit cluster", SHIPPED_AUDIT_PORT, ports.audit),
    ];
    let mut yaml = shipped.to_owned();
    for (role, shipped_port, port) in replacements {
        yaml = replace_once(
            &yaml,
            &format!("port_value: {shipped_port}"),
            &format!("port_value: {port}"),
            &format!("the {role} port"),
        )?;
    }

    // A JSON string literal is also a valid YAML double-quoted scalar, so
    // serde_json escapes any character the path contains.
    let quoted_wasm = serde_json::to_string(&wasm.to_string_lossy())
        .map_err(|e| format!("quoting {} failed: {e}", wasm.display()))?;
    replace_once(
        &yaml,
        &format!("filename: {SHIPPED_WASM_FILENAME}"),
        &format!("filename: {quoted_wasm}"),
        "the filter's filename",
    )
}

/// Replaces the one occurrence of `needle` that is not followed by a digit,
/// so `port_value: 8081` does not also match `port_value: 80810`.
fn replace_once(
    text: &str,
    needle: &str,
    replacement: &str,
    description: &str,
) -> Result<String, String> {
    let starts: Vec<usize> = text
        .match_indices(needle)
        .map(|(start, _)| start)
        .filter(|&start| !text[start + needle.len()..].starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    let [start] = starts[..] else {
        return Err(format!(
            "{SHIPPED_CONFIG} contains `{needle}` ({description}) {} times, expected once. \
             Update the shipped values in examples/demo.rs to match the file",
            starts.len()
        ));
    };
    Ok(format!(
        "{}{replacement}{}",
        &text[..start],
        &text[start + needle.len()..]
    ))
}

/// Returns the release from admin `/server_info`, for example `1.40.0`.
async fn envoy_version(envoy: &Envoy) -> Result<String, String> {
    let (status, body) = envoy.admin_get("/server_info").await?;
    if status != 200 {
        return Err(format!("admin /server_info returned {status}: {body}"));
    }
    let info: serde_json::Value = serde_json::from_str(&body)
        .map_err(|e| format!("parsing the JSON from admin /server_info failed: {e}"))?;
    // The version reads `<commit>/<release>/<status>/<build type>/<TLS library>`.
    let version = info["version"].as_str().unwrap_or("unknown");
    Ok(version.split('/').nth(1).unwrap_or(version).to_owned())
}

/// Client-side results of one load plan.
struct Load {
    plan: &'static LoadPlan,
    /// Latency of every request that received a response, sorted.
    latencies: Vec<Duration>,
    statuses: BTreeMap<u16, usize>,
    /// Every response received, in the order of connection and then request.
    responses: Vec<Response>,
    /// Requests that failed without a response.
    errors: Vec<String>,
    elapsed: Duration,
}

impl Load {
    fn status_count(&self, status: u16) -> usize {
        self.statuses.get(&status).copied().unwrap_or(0)
    }
}

/// Sends the plan's requests over its HTTP/1.1 and HTTP/2 connections at once.
async fn send_load(port: u16, plan: &'static LoadPlan) -> Load {
    let per_connection = plan.requests_per_connection;
    let started = Instant::now();
    let http1 = send_concurrent_timed(
        Proto::Http1,
        port,
        plan.http1_connections,
        per_connection,
        LOAD_TIMEOUT,
        move |connection, index| (plan.build)(connection * per_connection + index),
    );
    let http2 = send_concurrent_timed(
        Proto::Http2,
        port,
        plan.http2_connections,
        per_connection,
        LOAD_TIMEOUT,
        move |connection, index| {
            let first = plan.http1_connections * per_connection;
            (plan.build)(first + connection * per_connection + index)
        },
    );
    let (http1, http2) = tokio::join!(http1, http2);
    let elapsed = started.elapsed();

    let mut load = Load {
        plan,
        latencies: Vec::with_capacity(plan.total()),
        statuses: BTreeMap::new(),
        responses: Vec::with_capacity(plan.total()),
        errors: Vec::new(),
        elapsed,
    };
    for TimedResult { result, latency } in http1.into_iter().chain(http2) {
        match result {
            Ok(response) => {
                *load.statuses.entry(response.status).or_default() += 1;
                load.latencies.push(latency);
                load.responses.push(response);
            }
            Err(error) => load.errors.push(error),
        }
    }
    load.latencies.sort();
    load
}

fn registration(number: usize) -> Request {
    let body = format!(r#"{{"email":"user{number}@example.com","plan":"free"}}"#);
    Request::post(SIGNUP.path, body).header("content-type", "application/json")
}

fn order(number: usize) -> Request {
    let body = format!(
        r#"{{"order":{number},"sku":"A-{}","quantity":1}}"#,
        number % 7
    );
    Request::post(ORDERS.path, body).header("content-type", "application/json")
}

fn check_registrations(load: &Load) -> Result<(), String> {
    let total = load.plan.total();
    let created = load.status_count(201);
    if created == total {
        return Ok(());
    }
    Err(format!(
        "{created} of {total} registrations returned 201, expected all. \
         Responses by status: {}. {}",
        format_statuses(&load.statuses),
        describe_errors(load)
    ))
}

/// Checks that every order returned 201, or 502 with the fan-out failure
/// body, and that every response carries the result header.
fn check_orders(load: &Load) -> Result<(), String> {
    let total = load.plan.total();
    if load.responses.len() != total {
        return Err(format!(
            "{} of {total} orders received a response, expected all. {}",
            load.responses.len(),
            describe_errors(load)
        ));
    }
    for response in &load.responses {
        let body = String::from_utf8_lossy(&response.body);
        match response.status {
            201 => {}
            502 => {
                let content_type = response.header("content-type");
                if body != INVENTORY_FAILURE_BODY
                    || content_type.as_deref() != Some("application/json")
                {
                    return Err(format!(
                        "an order returned 502 with content-type {content_type:?} and body \
                         {body:?}, expected application/json and {INVENTORY_FAILURE_BODY}"
                    ));
                }
            }
            status => {
                return Err(format!(
                    "an order returned {status} with body {body:?}, expected 201, or 502 \
                     when inventory failed. Responses by status: {}",
                    format_statuses(&load.statuses)
                ));
            }
        }
        if response.header(RESULT_HEADER).is_none() {
            return Err(format!(
                "an order response with status {} has no {RESULT_HEADER} header, which the \
                 orders rule in {SHIPPED_CONFIG} adds to every response",
                response.status
            ));
        }
    }
    Ok(())
}

fn describe_errors(load: &Load) -> String {
    let first_error = load
        .errors
        .first()
        .map_or(String::new(), |error| format!(" First error: {error}"));
    format!(
        "{} requests failed without a response.{first_error}",
        load.errors.len()
    )
}

/// Checks that each failed inventory call replaced exactly one orders
/// response with a 502, as seen by the client and by the filter.
fn check_failed_orders(
    load: &Load,
    targets: &[TargetCounts],
    fanout: &FanoutCounts,
) -> Result<(), String> {
    let replaced = load.status_count(502) as u64;
    let inventory_5xx = inventory_5xx(targets);
    if replaced != inventory_5xx {
        return Err(format!(
            "the client received {replaced} responses with status 502 for orders, but \
             inventory has {inventory_5xx} 5xx outcomes; with \"on_failure\": \"fail\" \
             each failed inventory call should turn one response into a 502"
        ));
    }
    if fanout.failed_responses != replaced {
        return Err(format!(
            "{} is {}, but the client received {replaced} responses with status 502",
            fanout_counter_name(ORDERS.name, "failed_responses"),
            fanout.failed_responses
        ));
    }
    Ok(())
}

fn inventory_5xx(targets: &[TargetCounts]) -> u64 {
    targets
        .iter()
        .find(|t| t.rule == ORDERS.name && t.name == "inventory")
        .map_or(0, |t| t.outcome(Outcome::Status5xx.as_str()))
}

/// The filter's counters for one target.
struct TargetCounts {
    rule: &'static str,
    name: &'static str,
    dispatched: u64,
    /// Side calls by outcome, in the order of `Outcome::ALL`.
    outcomes: Vec<(&'static str, u64)>,
    /// Matched requests without a side call, by reason, in the order of `Skip::ALL`.
    skips: Vec<(&'static str, u64)>,
}

impl TargetCounts {
    fn read(
        counters: &BTreeMap<String, u64>,
        rule: &'static str,
        name: &'static str,
    ) -> TargetCounts {
        let prefix = format!("wasmcustom.mesh_fanout.rule.{rule}.target.{name}");
        let counter = |suffix: String| {
            counters
                .get(&format!("{prefix}.{suffix}"))
                .copied()
                .unwrap_or(0)
        };
        TargetCounts {
            rule,
            name,
            dispatched: counter("dispatched".to_owned()),
            outcomes: Outcome::ALL
                .iter()
                .map(|o| {
                    (
                        o.as_str(),
                        counter(format!("outcome.{}.side_calls", o.as_str())),
                    )
                })
                .collect(),
            skips: Skip::ALL
                .iter()
                .map(|s| {
                    (
                        s.as_str(),
                        counter(format!("reason.{}.skipped", s.as_str())),
                    )
                })
                .collect(),
        }
    }

    /// Returns the number of matched requests that reached an outcome or a skip reason.
    fn settled(&self) -> u64 {
        let outcomes: u64 = self.outcomes.iter().map(|(_, count)| count).sum();
        let skips: u64 = self.skips.iter().map(|(_, count)| count).sum();
        outcomes + skips
    }

    fn outcome(&self, name: &str) -> u64 {
        self.outcomes
            .iter()
            .find(|(outcome, _)| *outcome == name)
            .map_or(0, |(_, count)| *count)
    }
}

/// The counters that only fan-out rules have.
struct FanoutCounts {
    rule: &'static str,
    /// Responses that waited for an awaited target after the primary responded.
    held_responses: u64,
    /// Responses replaced with a 502 because an awaited target failed.
    failed_responses: u64,
}

impl FanoutCounts {
    fn read(counters: &BTreeMap<String, u64>, rule: &'static str) -> FanoutCounts {
        let counter = |suffix: &str| {
            counters
                .get(&fanout_counter_name(rule, suffix))
                .copied()
                .unwrap_or(0)
        };
        FanoutCounts {
            rule,
            held_responses: counter("held_responses"),
            failed_responses: counter("failed_responses"),
        }
    }
}

fn fanout_counter_name(rule: &str, suffix: &str) -> String {
    format!("wasmcustom.mesh_fanout.rule.{rule}.{suffix}")
}

fn matched_counter_name(rule: &str) -> String {
    format!("wasmcustom.mesh_fanout.rule.{rule}.matched")
}

/// Polls until each load's rule matched one request per response and every
/// target accounts for each of them with an outcome or a skip reason.
/// Returns the filter's counters.
async fn wait_for_outcomes(
    envoy: &mut Envoy,
    loads: &[&Load],
) -> Result<BTreeMap<String, u64>, String> {
    let deadline = Instant::now() + OUTCOME_TIMEOUT;
    loop {
        ensure_running(envoy)?;
        let mut counters = envoy
            .try_counters()
            .await
            .map_err(|e| with_log_tail(envoy, e))?;
        counters.retain(|name, _| name.starts_with("wasmcustom.mesh_fanout."));

        let mut problems = Vec::new();
        for load in loads {
            let rule = load.plan.rule;
            let matched_name = matched_counter_name(rule.name);
            let matched = counters.get(&matched_name).copied().unwrap_or(0);
            let expected = load.responses.len() as u64;
            if matched != expected {
                problems.push(format!(
                    "{matched_name} is {matched}, expected {expected} (one per response)"
                ));
            }
            for target in rule.targets {
                let settled = TargetCounts::read(&counters, rule.name, target.name).settled();
                if settled != matched {
                    problems.push(format!(
                        "rule {} target {} has {settled} outcomes plus skips, expected \
                         {matched}",
                        rule.name, target.name
                    ));
                }
            }
        }
        if problems.is_empty() {
            return Ok(counters);
        }

        if Instant::now() >= deadline {
            let non_zero: Vec<String> = counters
                .iter()
                .filter(|(_, value)| **value != 0)
                .map(|(name, value)| format!("  {name}: {value}"))
                .collect();
            return Err(format!(
                "side call counts did not add up within {OUTCOME_TIMEOUT:?}: {}. \
                 Non-zero filter counters:\n{}",
                problems.join("; "),
                non_zero.join("\n")
            ));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn side_call_histogram_name(rule: &str, target: &str) -> String {
    format!("wasmcustom.mesh_fanout.rule.{rule}.target.{target}.side_call_ms")
}

fn held_histogram_name(rule: &str) -> String {
    format!("wasmcustom.mesh_fanout.rule.{rule}.held_ms")
}

const HANDOFF_HISTOGRAM: &str = "wasmcustom.mesh_fanout.handoff_delay_us";

/// Polls until Envoy's histograms hold a sample for every side call and
/// fan-out response of the run. That is one `side_call_ms` per dispatched
/// call, one `handoff_delay_us` per call handed to the root context
/// (dispatched or rejected by Envoy), and one `held_ms` per response of the
/// fan-out rule, held or not.
async fn wait_for_histograms(
    envoy: &mut Envoy,
    targets: &[TargetCounts],
    fanout: &FanoutCounts,
) -> Result<BTreeMap<String, Histogram>, String> {
    let mut expected: Vec<(String, u64)> = targets
        .iter()
        .map(|t| (side_call_histogram_name(t.rule, t.name), t.dispatched))
        .collect();
    let handed_off = targets
        .iter()
        .map(|t| t.dispatched + t.outcome(Outcome::DispatchError.as_str()))
        .sum();
    expected.push((HANDOFF_HISTOGRAM.to_owned(), handed_off));
    expected.push((held_histogram_name(fanout.rule), ORDER_LOAD.total() as u64));

    let deadline = Instant::now() + HISTOGRAM_TIMEOUT;
    loop {
        ensure_running(envoy)?;
        let histograms = envoy
            .histograms(r"^wasmcustom\.mesh_fanout\.")
            .await
            .map_err(|e| with_log_tail(envoy, e))?;
        let samples = |name: &str| histograms.get(name).map_or(0, |h| h.samples);
        let missing: Vec<String> = expected
            .iter()
            .filter(|(name, count)| samples(name) < *count)
            .map(|(name, count)| format!("{name} has {} of {count} samples", samples(name)))
            .collect();
        if missing.is_empty() {
            return Ok(histograms);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "Envoy's histograms did not receive every sample within {HISTOGRAM_TIMEOUT:?}: \
                 {}. Envoy merges histograms at each stats flush, so check \
                 stats_flush_interval in {SHIPPED_CONFIG}",
                missing.join(", ")
            ));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Prometheus metrics of which the report shows one non-zero line each.
const PROMETHEUS_EXAMPLES: [&str; 3] = [
    "mesh_fanout_side_calls",
    "mesh_fanout_skipped",
    "mesh_fanout_held_responses",
];

/// Returns a non-zero line of each of `PROMETHEUS_EXAMPLES` from
/// `/stats/prometheus`.
async fn read_prometheus_examples(envoy: &mut Envoy) -> Result<Vec<String>, String> {
    ensure_running(envoy)?;
    let text = envoy
        .try_prometheus_text()
        .await
        .map_err(|e| with_log_tail(envoy, e))?;
    let first_non_zero = |metric: &str| {
        text.lines()
            .find(|line| {
                line.starts_with(&format!("{metric}{{"))
                    && line.rsplit_once(' ').is_some_and(|(_, value)| value != "0")
            })
            .map(str::to_owned)
    };
    PROMETHEUS_EXAMPLES
        .iter()
        .map(|metric| {
            first_non_zero(metric).ok_or_else(|| {
                format!(
                    "/stats/prometheus has no non-zero {metric} line. The stats_tags in \
                     {SHIPPED_CONFIG} should produce one per rule, and per target and \
                     outcome or reason where the stat has them"
                )
            })
        })
        .collect()
}

fn ensure_running(envoy: &mut Envoy) -> Result<(), String> {
    match envoy.exit_status()? {
        None => Ok(()),
        Some(status) => {
            // `exit_status` has reaped the process, so the system may reuse its PID.
            ENVOY_PID.store(0, Ordering::SeqCst);
            Err(format!(
                "Envoy (pid {}) exited with {status}. Last log lines:\n{}",
                envoy.pid(),
                envoy.log_tail(LOG_TAIL_LINES)
            ))
        }
    }
}

fn with_log_tail(envoy: &Envoy, error: String) -> String {
    format!(
        "{error}. Last Envoy log lines:\n{}",
        envoy.log_tail(LOG_TAIL_LINES)
    )
}

fn print_header(envoy: &Envoy, version: &str) {
    println!(
        "mesh-fanout demo: {SHIPPED_CONFIG} on Envoy {version} (pid {}, --concurrency 2), \
         listener 127.0.0.1:{}",
        envoy.pid(),
        envoy.port()
    );
    println!(
        "The registrations and the orders are sent at the same time, each request \
         waiting for the previous response on its connection."
    );
    println!();
}

fn print_client(load: &Load, services: &Services) {
    let plan = load.plan;
    let rule = plan.rule;
    println!(
        "Client: {} x POST {} in {:.2} s over {} HTTP/1.1 and {} HTTP/2 connections, {} \
         requests each ({} rule {:?})",
        plan.total(),
        rule.path,
        load.elapsed.as_secs_f64(),
        plan.http1_connections,
        plan.http2_connections,
        plan.requests_per_connection,
        rule.mode,
        rule.name
    );
    let targets: Vec<String> = rule
        .targets
        .iter()
        .map(|t| {
            let awaited = if t.awaited { ", awaited" } else { "" };
            format!("{} ({}{awaited})", t.name, services.describe(t.name))
        })
        .collect();
    println!(
        "  services      {} {}; targets {}",
        rule.primary,
        services.describe(rule.primary),
        targets.join(", ")
    );
    println!("  responses     {}", format_statuses(&load.statuses));
    let latencies: Vec<String> = PERCENTILES
        .iter()
        .map(|(label, p)| {
            let ms = nearest_rank(&load.latencies, *p).as_secs_f64() * 1000.0;
            format!("{label} {ms:.2}")
        })
        .collect();
    println!("  latency (ms)  {}", latencies.join("   "));
    println!();
}

/// Prints the count of each distinct status and result header value, and
/// the body of a 502 if there was one.
fn print_result_headers(load: &Load) {
    let mut values: BTreeMap<(u16, String), usize> = BTreeMap::new();
    for response in &load.responses {
        let value = response
            .header(RESULT_HEADER)
            .unwrap_or_else(|| "(missing)".to_owned());
        *values.entry((response.status, value)).or_default() += 1;
    }
    println!(
        "Responses to POST {} by status and {RESULT_HEADER}:",
        load.plan.rule.path
    );
    for ((status, value), count) in &values {
        println!("  {count:>5} x {status}  {value}");
    }
    if let Some(failed) = load.responses.iter().find(|r| r.status == 502) {
        println!("  502 body: {}", String::from_utf8_lossy(&failed.body));
    }
    println!();
}

fn print_targets(
    rule: &RuleSpec,
    counters: &BTreeMap<String, u64>,
    targets: &[TargetCounts],
    services: &Services,
) {
    let matched = counters
        .get(&matched_counter_name(rule.name))
        .copied()
        .unwrap_or(0);
    println!(
        "Side calls: rule {:?} matched {matched} requests",
        rule.name
    );
    println!(
        "  {:<11} {:>7} {:>10} {:>9}  {:<30} skipped",
        "target", "awaited", "dispatched", "received", "outcomes"
    );
    for spec in rule.targets {
        let Some(target) = targets
            .iter()
            .find(|t| t.rule == rule.name && t.name == spec.name)
        else {
            continue;
        };
        let received = services
            .by_name(target.name)
            .map_or("?".to_owned(), |service| service.count().to_string());
        println!(
            "  {:<11} {:>7} {:>10} {:>9}  {:<30} {}",
            target.name,
            if spec.awaited { "yes" } else { "no" },
            target.dispatched,
            received,
            format_non_zero(&target.outcomes),
            format_non_zero(&target.skips)
        );
    }
    println!("  (received: requests that the in-process service recorded)");
    println!();
}

fn print_fanout(fanout: &FanoutCounts, load: &Load, targets: &[TargetCounts], services: &Services) {
    let inventory_5xx = inventory_5xx(targets);
    println!("Fan-out: rule {:?}", fanout.rule);
    println!(
        "  held_responses    {:>5}  responses that waited for inventory after the orders service responded",
        fanout.held_responses
    );
    println!(
        "  failed_responses  {:>5}  responses replaced with a 502; the client received {} \
         502s, and inventory had {inventory_5xx} 5xx outcomes",
        fanout.failed_responses,
        load.status_count(502)
    );
    // A 502 does not undo the primary request, which a reader of the
    // status counts alone could assume.
    println!(
        "  The {} service received {} requests and responded to each, so the orders \
         behind the 502s were still created.",
        ORDERS.primary,
        services.orders.count()
    );
    println!();
}

fn print_histograms(targets: &[TargetCounts], histograms: &BTreeMap<String, Histogram>) {
    println!("Envoy histograms (Envoy's estimates from its buckets)");
    println!("  side_call_ms and held_ms hold whole milliseconds, so a value under 1 ms records 0");
    println!(
        "  held_ms: time each orders response waited after the orders service responded, 0 when not held"
    );
    let labels: Vec<String> = PERCENTILES
        .iter()
        .map(|(label, _)| format!("{label:>8}"))
        .collect();
    println!("  {:<32} {:>7} {}", "histogram", "samples", labels.join(""));
    let rows = targets
        .iter()
        .map(|t| {
            (
                format!("side_call_ms {}/{}", t.rule, t.name),
                side_call_histogram_name(t.rule, t.name),
            )
        })
        .chain([
            (
                format!("held_ms {}", ORDERS.name),
                held_histogram_name(ORDERS.name),
            ),
            ("handoff_delay_us".to_owned(), HANDOFF_HISTOGRAM.to_owned()),
        ]);
    for (label, name) in rows {
        let histogram = histograms.get(&name);
        let values: Vec<String> = PERCENTILES
            .iter()
            .map(|(_, p)| match histogram.and_then(|h| h.percentile(*p)) {
                Some(value) => format!("{value:>8.1}"),
                None => format!("{:>8}", "-"),
            })
            .collect();
        let samples = histogram.map_or(0, |h| h.samples);
        println!("  {label:<32} {samples:>7} {}", values.join(""));
    }
    println!();
}

fn print_prometheus(envoy: &Envoy, examples: &[String]) {
    println!(
        "Prometheus: GET /stats/prometheus on the admin port (127.0.0.1:{SHIPPED_ADMIN_PORT} \
         with {SHIPPED_CONFIG} as shipped, 127.0.0.1:{} in this run). Lines from this run:",
        envoy.admin_port()
    );
    for line in examples {
        println!("  {line}");
    }
}

/// Returns the nearest-rank percentile of `sorted`, or zero when it is empty.
fn nearest_rank(sorted: &[Duration], percentile: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (percentile / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn format_statuses(statuses: &BTreeMap<u16, usize>) -> String {
    if statuses.is_empty() {
        return "none".to_owned();
    }
    statuses
        .iter()
        .map(|(status, count)| format!("{status}: {count}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn format_non_zero(counts: &[(&str, u64)]) -> String {
    let non_zero: Vec<String> = counts
        .iter()
        .filter(|(_, count)| *count != 0)
        .map(|(name, count)| format!("{name} {count}"))
        .collect();
    if non_zero.is_empty() {
        "-".to_owned()
    } else {
        non_zero.join(", ")
    }
}

/// PID of the running Envoy for the panic hook, or 0 when there is none.
static ENVOY_PID: AtomicI32 = AtomicI32::new(0);

/// Makes a panic kill Envoy before the process aborts. The release profile
/// sets `panic = "abort"`, so no Drop runs after a panic, and Envoy would
/// otherwise keep running and holding its ports.
fn install_panic_hook() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let pid = ENVOY_PID.swap(0, Ordering::SeqCst);
        if pid > 0 {
            // SAFETY: kill(2) takes no pointers. The PID is our own child,
            // not yet reaped, because `KillOnPanic` clears it before Envoy's
            // Drop waits for the process, and `ensure_running` clears it
            // once `exit_status` has reaped the process.
            // NOTE: a panic on another thread could still read the PID just
            // before it is cleared and signal it after the reap.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        default_hook(info);
    }));
}

/// Lets the panic hook kill Envoy while this guard lives.
struct KillOnPanic;

impl KillOnPanic {
    fn arm(pid: u32) -> KillOnPanic {
        // `Child::id` widens a pid_t, which is i32 on Linux, so this never
        // falls back to 0 for a PID that `Child::id` returned.
        ENVOY_PID.store(i32::try_from(pid).unwrap_or(0), Ordering::SeqCst);
        KillOnPanic
    }
}

impl Drop for KillOnPanic {
    fn drop(&mut self) {
        ENVOY_PID.store(0, Ordering::SeqCst);
    }
}
