//! Runs the user-registration scenario of envoy/shadow.yaml end to end.
//!
//! The demo starts the three services of that file in process and runs
//! real Envoy on the file itself, with free ports. It sends
//! `POST /api/v1/register` over HTTP/1.1 and HTTP/2 and waits until every
//! side call has an outcome. Then it prints client latency, per-target
//! outcomes, Envoy's side-call histograms and example Prometheus lines.
//!
//! ```text
//! make demo
//! ENVOY_BIN=/path/to/envoy cargo run --release --example demo
//! ```
//!
//! Exits with status 1 and a message if Envoy fails, a response is not 201,
//! or the stats do not add up within their deadlines.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use mesh_fanout::core::outcome::{Outcome, Skip};
use tokio::time::Instant;

use support::client::{send_concurrent_timed, Proto, Request, TimedResult};
use support::envoy::{free_port, try_wasm_path, Envoy};
use support::stats::Histogram;
use support::upstream::{Behaviour, Upstream};

const SHIPPED_CONFIG: &str = "envoy/shadow.yaml";
/// The filter's path in envoy/shadow.yaml, relative to the repository root.
const SHIPPED_WASM_FILENAME: &str = "target/wasm32-wasip1/release/mesh_fanout.wasm";
/// The `port_value`s of envoy/shadow.yaml, each replaced with a free port.
const SHIPPED_LISTENER_PORT: u16 = 10000;
const SHIPPED_ADMIN_PORT: u16 = 9901;
const SHIPPED_USERS_PORT: u16 = 8081;
const SHIPPED_ANALYTICS_PORT: u16 = 8082;
const SHIPPED_MARKETING_PORT: u16 = 8083;

/// The rule and targets of envoy/shadow.yaml, in the order of the file.
const RULE: &str = "signup";
const TARGETS: [&str; 2] = ["analytics", "marketing"];
const REGISTER_PATH: &str = "/api/v1/register";

const HTTP1_CONNECTIONS: usize = 8;
const HTTP2_CONNECTIONS: usize = 2;
const REQUESTS_PER_CONNECTION: usize = 40;
const TOTAL_REQUESTS: usize = (HTTP1_CONNECTIONS + HTTP2_CONNECTIONS) * REQUESTS_PER_CONNECTION;
/// Limit for sending every request and reading every response.
const LOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// Limit for every side call to reach an outcome after the last response.
/// The maximum side call duration is analytics' `timeout_ms` of 2 s.
const OUTCOME_TIMEOUT: Duration = Duration::from_secs(15);
/// Limit for Envoy's histograms to hold every sample. They update at each
/// stats flush, every 1 s with the `stats_flush_interval` of envoy/shadow.yaml.
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
    let load = send_registrations(envoy.port()).await;
    check_responses(&load)?;

    let counters = wait_for_outcomes(envoy, TOTAL_REQUESTS as u64).await?;
    let targets: Vec<TargetCounts> = TARGETS
        .iter()
        .map(|target| TargetCounts::read(&counters, target))
        .collect();
    let histograms = wait_for_histograms(envoy, &targets).await?;
    let prometheus_examples = read_prometheus_examples(envoy).await?;

    print_header(envoy, &version);
    print_client(&load);
    print_targets(&counters, &targets, services);
    print_histograms(&targets, &histograms);
    print_prometheus(envoy, &prometheus_examples);
    Ok(())
}

/// The in-process services that envoy/shadow.yaml routes to.
struct Services {
    users: Upstream,
    analytics: Upstream,
    marketing: Upstream,
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
        Ok(Services {
            users: start_service("users", users).await?,
            analytics: start_service("analytics", analytics).await?,
            marketing: start_service("marketing", marketing).await?,
        })
    }

    fn by_target(&self, target: &str) -> Option<&Upstream> {
        match target {
            "analytics" => Some(&self.analytics),
            "marketing" => Some(&self.marketing),
            _ => None,
        }
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

/// Client-side results of the load.
struct Load {
    /// Latency of every request that received a response, sorted.
    latencies: Vec<Duration>,
    statuses: BTreeMap<u16, usize>,
    /// Requests that failed without a response.
    errors: Vec<String>,
    elapsed: Duration,
}

/// Sends `TOTAL_REQUESTS` registrations over HTTP/1.1 and HTTP/2 connections at once.
async fn send_registrations(port: u16) -> Load {
    let started = Instant::now();
    let http1 = send_concurrent_timed(
        Proto::Http1,
        port,
        HTTP1_CONNECTIONS,
        REQUESTS_PER_CONNECTION,
        LOAD_TIMEOUT,
        |connection, index| registration(connection * REQUESTS_PER_CONNECTION + index),
    );
    let http2 = send_concurrent_timed(
        Proto::Http2,
        port,
        HTTP2_CONNECTIONS,
        REQUESTS_PER_CONNECTION,
        LOAD_TIMEOUT,
        |connection, index| {
            let first = HTTP1_CONNECTIONS * REQUESTS_PER_CONNECTION;
            registration(first + connection * REQUESTS_PER_CONNECTION + index)
        },
    );
    let (http1, http2) = tokio::join!(http1, http2);
    let elapsed = started.elapsed();

    let mut load = Load {
        latencies: Vec::with_capacity(TOTAL_REQUESTS),
        statuses: BTreeMap::new(),
        errors: Vec::new(),
        elapsed,
    };
    for TimedResult { result, latency } in http1.into_iter().chain(http2) {
        match result {
            Ok(response) => {
                *load.statuses.entry(response.status).or_default() += 1;
                load.latencies.push(latency);
            }
            Err(error) => load.errors.push(error),
        }
    }
    load.latencies.sort();
    load
}

fn registration(number: usize) -> Request {
    let body = format!(r#"{{"email":"user{number}@example.com","plan":"free"}}"#);
    Request::post(REGISTER_PATH, body).header("content-type", "application/json")
}

fn check_responses(load: &Load) -> Result<(), String> {
    let created = load.statuses.get(&201).copied().unwrap_or(0);
    if created == TOTAL_REQUESTS {
        return Ok(());
    }
    let first_error = load
        .errors
        .first()
        .map_or(String::new(), |error| format!(" First error: {error}"));
    Err(format!(
        "{created} of {TOTAL_REQUESTS} requests returned 201, expected all. \
         Responses by status: {}. {} requests failed without a response.{first_error}",
        format_statuses(&load.statuses),
        load.errors.len(),
    ))
}

/// The filter's counters for one target.
struct TargetCounts {
    name: &'static str,
    dispatched: u64,
    /// Side calls by outcome, in the order of `Outcome::ALL`.
    outcomes: Vec<(&'static str, u64)>,
    /// Matched requests without a side call, by reason, in the order of `Skip::ALL`.
    skips: Vec<(&'static str, u64)>,
}

impl TargetCounts {
    fn read(counters: &BTreeMap<String, u64>, name: &'static str) -> TargetCounts {
        let prefix = format!("wasmcustom.mesh_fanout.rule.{RULE}.target.{name}");
        let counter = |suffix: String| {
            counters
                .get(&format!("{prefix}.{suffix}"))
                .copied()
                .unwrap_or(0)
        };
        TargetCounts {
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

fn matched_counter_name() -> String {
    format!("wasmcustom.mesh_fanout.rule.{RULE}.matched")
}

/// Polls until the rule matched `expected_matched` requests and every target
/// accounts for each of them with an outcome or a skip reason. Returns the
/// filter's counters.
async fn wait_for_outcomes(
    envoy: &mut Envoy,
    expected_matched: u64,
) -> Result<BTreeMap<String, u64>, String> {
    let matched_name = matched_counter_name();
    let deadline = Instant::now() + OUTCOME_TIMEOUT;
    loop {
        ensure_running(envoy)?;
        let mut counters = envoy
            .try_counters()
            .await
            .map_err(|e| with_log_tail(envoy, e))?;
        counters.retain(|name, _| name.starts_with("wasmcustom.mesh_fanout."));

        let matched = counters.get(&matched_name).copied().unwrap_or(0);
        let settled: Vec<(&str, u64)> = TARGETS
            .iter()
            .map(|target| (*target, TargetCounts::read(&counters, target).settled()))
            .collect();
        if matched == expected_matched && settled.iter().all(|(_, count)| *count == matched) {
            return Ok(counters);
        }

        if Instant::now() >= deadline {
            let settled: Vec<String> = settled
                .iter()
                .map(|(target, count)| format!("{target} {count}"))
                .collect();
            let non_zero: Vec<String> = counters
                .iter()
                .filter(|(_, value)| **value != 0)
                .map(|(name, value)| format!("  {name}: {value}"))
                .collect();
            return Err(format!(
                "side call counts did not add up within {OUTCOME_TIMEOUT:?}: {matched_name} \
                 is {matched}, expected {expected_matched} (one per 201 response), and \
                 outcomes plus skips per target are {}, expected {matched} each. \
                 Non-zero filter counters:\n{}",
                settled.join(", "),
                non_zero.join("\n")
            ));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn side_call_histogram_name(target: &str) -> String {
    format!("wasmcustom.mesh_fanout.rule.{RULE}.target.{target}.side_call_ms")
}

const HANDOFF_HISTOGRAM: &str = "wasmcustom.mesh_fanout.handoff_delay_us";

/// Polls until Envoy's histograms hold a sample for every side call of the
/// run: one `side_call_ms` per dispatched call, and one `handoff_delay_us`
/// per call handed to the root context, whether Envoy dispatched or
/// rejected it.
async fn wait_for_histograms(
    envoy: &mut Envoy,
    targets: &[TargetCounts],
) -> Result<BTreeMap<String, Histogram>, String> {
    let mut expected: Vec<(String, u64)> = targets
        .iter()
        .map(|t| (side_call_histogram_name(t.name), t.dispatched))
        .collect();
    let handed_off = targets
        .iter()
        .map(|t| t.dispatched + t.outcome(Outcome::DispatchError.as_str()))
        .sum();
    expected.push((HANDOFF_HISTOGRAM.to_owned(), handed_off));

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

/// Returns two non-zero filter counters from `/stats/prometheus`: a side
/// call outcome and a skip reason.
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
    ["mesh_fanout_side_calls", "mesh_fanout_skipped"]
        .iter()
        .map(|metric| {
            first_non_zero(metric).ok_or_else(|| {
                format!(
                    "/stats/prometheus has no non-zero {metric} line. The stats_tags in \
                     {SHIPPED_CONFIG} should produce one per rule, target and outcome or reason"
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
    println!();
}

fn print_client(load: &Load) {
    println!(
        "Client: {TOTAL_REQUESTS} x POST {REGISTER_PATH} in {:.2} s over {HTTP1_CONNECTIONS} \
         HTTP/1.1 and {HTTP2_CONNECTIONS} HTTP/2 connections, {REQUESTS_PER_CONNECTION} \
         requests each, one at a time per connection",
        load.elapsed.as_secs_f64()
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

fn print_targets(counters: &BTreeMap<String, u64>, targets: &[TargetCounts], services: &Services) {
    let matched = counters.get(&matched_counter_name()).copied().unwrap_or(0);
    println!("Side calls: rule {RULE:?} matched {matched} requests");
    println!(
        "  {:<11} {:>10} {:>9}  {:<30} skipped",
        "target", "dispatched", "received", "outcomes"
    );
    for target in targets {
        let received = services
            .by_target(target.name)
            .map_or("?".to_owned(), |service| service.count().to_string());
        println!(
            "  {:<11} {:>10} {:>9}  {:<30} {}",
            target.name,
            target.dispatched,
            received,
            format_non_zero(&target.outcomes),
            format_non_zero(&target.skips)
        );
    }
    println!("  (received: requests that the in-process service recorded)");
    println!();
}

fn print_histograms(targets: &[TargetCounts], histograms: &BTreeMap<String, Histogram>) {
    println!("Envoy histograms (Envoy's estimates from its buckets)");
    println!("  side_call_ms holds whole milliseconds, so a call under 1 ms records 0");
    let labels: Vec<String> = PERCENTILES
        .iter()
        .map(|(label, _)| format!("{label:>8}"))
        .collect();
    println!("  {:<32} {:>7} {}", "histogram", "samples", labels.join(""));
    let rows = targets
        .iter()
        .map(|t| {
            (
                format!("side_call_ms {}", t.name),
                side_call_histogram_name(t.name),
            )
        })
        .chain(std::iter::once((
            "handoff_delay_us".to_owned(),
            HANDOFF_HISTOGRAM.to_owned(),
        )));
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
