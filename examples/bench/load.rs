//! Load runs with oha (https://github.com/hatoo/oha), read from its JSON output.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use super::process::Pinned;
use super::scenario::{Scenario, DELAY_HEADER, REQUEST_PATH};

/// Time that oha may take beyond its `-z` duration (finishing the requests
/// in flight, writing JSON) before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(30);

/// One oha run.
pub struct LoadSpec<'a> {
    pub oha: &'a Path,
    pub cpu: Option<usize>,
    pub port: u16,
    pub scenario: &'a Scenario,
    /// Request body file, for scenarios with a body.
    pub body_file: Option<&'a Path>,
    pub connections: usize,
    pub duration: Duration,
    /// Requests per second for a fixed-rate run; None runs a closed loop.
    pub rate: Option<f64>,
    /// Path of oha's JSON output.
    pub output: PathBuf,
}

/// Client-side results of one run.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ClientResult {
    /// Responses with status 200.
    pub ok: u64,
    /// Responses with another status, and failed requests, by status or
    /// oha's error text.
    pub failures: BTreeMap<String, u64>,
    /// oha's total run time in seconds, the `-z` duration plus the wait
    /// for requests still in flight at its end.
    pub seconds: f64,
    /// `ok` divided by `seconds`.
    pub requests_per_s: f64,
    /// Latency percentiles in milliseconds; keys p50, p90, p99, p99.9.
    /// For several runs, the median of each percentile over the runs.
    pub latency_ms: BTreeMap<String, f64>,
    /// `latency_ms` of each oha run, in run order.
    pub latency_ms_per_run: Vec<BTreeMap<String, f64>>,
}

impl ClientResult {
    pub fn percentile(&self, key: &str) -> f64 {
        self.latency_ms.get(key).copied().unwrap_or(f64::NAN)
    }

    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }
}

/// The oha percentiles kept, as oha names them in its JSON.
const PERCENTILES: [&str; 4] = ["p50", "p90", "p99", "p99.9"];

/// Builds oha's arguments for `spec`.
fn oha_args(spec: &LoadSpec) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--no-tui".into(),
        "--output-format".into(),
        "json".into(),
        "--output".into(),
        spec.output.display().to_string(),
        // One runtime thread: oha gets one CPU, shared with the upstream.
        "--worker-threads".into(),
        "1".into(),
        "-z".into(),
        format!("{}ms", spec.duration.as_millis()),
        // Finish the requests in flight at the deadline instead of counting
        // them as aborted, so every request that Envoy saw has a response.
        "--wait-ongoing-requests-after-deadline".into(),
        "-c".into(),
        spec.connections.to_string(),
    ];
    if let Some(rate) = spec.rate {
        // oha sends at a fixed rate and measures each request from its
        // scheduled start, so a stalled request does not hide the ones
        // queued behind it (coordinated omission).
        args.extend([
            "-q".into(),
            format!("{rate:.0}"),
            "--latency-correction".into(),
        ]);
    }
    args.extend(["-m".into(), spec.scenario.method.into()]);
    if let Some(body_file) = spec.body_file {
        args.extend([
            "-D".into(),
            body_file.display().to_string(),
            "-T".into(),
            "application/octet-stream".into(),
        ]);
    }
    if spec.scenario.client_delay_us > 0 {
        args.extend([
            "-H".into(),
            format!("{DELAY_HEADER}: {}", spec.scenario.client_delay_us),
        ]);
    }
    args.push(format!("http://127.0.0.1:{}{REQUEST_PATH}", spec.port));
    args
}

/// Returns the command line that `run` executes, for the report.
pub fn command_line(spec: &LoadSpec) -> String {
    let mut words = Vec::new();
    if let Some(cpu) = spec.cpu {
        words.extend(["taskset".to_owned(), "-c".to_owned(), cpu.to_string()]);
    }
    words.push("oha".to_owned());
    words.extend(oha_args(spec).into_iter().map(|arg| {
        if arg.contains(' ') {
            format!("'{arg}'")
        } else {
            arg
        }
    }));
    words.join(" ")
}

/// Runs oha and reads its JSON output.
pub async fn run(spec: &LoadSpec<'_>) -> Result<ClientResult, String> {
    let stderr_path = spec.output.with_extension("stderr");
    let stderr = std::fs::File::create(&stderr_path)
        .map_err(|e| format!("creating {} failed: {e}", stderr_path.display()))?;
    let mut process = Pinned::spawn(
        "oha",
        spec.cpu,
        spec.oha,
        &oha_args(spec),
        Stdio::null(),
        Stdio::from(stderr),
    )?;
    let deadline = tokio::time::Instant::now() + spec.duration + EXIT_GRACE;
    let status = loop {
        match process.child_mut().try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(format!("polling oha failed: {e}")),
        }
        if tokio::time::Instant::now() >= deadline {
            // Dropping `process` kills it.
            return Err(format!(
                "oha did not exit within {:?} of its {:?} run",
                EXIT_GRACE, spec.duration
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if !status.success() {
        let stderr_text = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        return Err(format!(
            "oha exited with {status}: {}\ncommand: {}",
            stderr_text.trim(),
            command_line(spec)
        ));
    }
    let text = std::fs::read_to_string(&spec.output)
        .map_err(|e| format!("reading oha's output {} failed: {e}", spec.output.display()))?;
    parse(&text).map_err(|e| format!("{}: {e}", spec.output.display()))
}

/// Reads oha's `--output-format json` (oha 1.16): `summary.total` in
/// seconds, `latencyPercentiles` in seconds, `statusCodeDistribution` and
/// `errorDistribution` as counts.
pub fn parse(text: &str) -> Result<ClientResult, String> {
    let json: Value =
        serde_json::from_str(text).map_err(|e| format!("invalid JSON from oha: {e}"))?;
    let seconds = json
        .pointer("/summary/total")
        .and_then(Value::as_f64)
        .ok_or("oha JSON has no summary.total")?;

    let mut ok = 0;
    let mut failures = BTreeMap::new();
    let statuses = json
        .get("statusCodeDistribution")
        .and_then(Value::as_object)
        .ok_or("oha JSON has no statusCodeDistribution")?;
    for (status, count) in statuses {
        let count = count.as_u64().unwrap_or(0);
        if status == "200" {
            ok += count;
        } else {
            *failures.entry(format!("status {status}")).or_insert(0) += count;
        }
    }
    if let Some(errors) = json.get("errorDistribution").and_then(Value::as_object) {
        for (error, count) in errors {
            *failures.entry(error.clone()).or_insert(0) += count.as_u64().unwrap_or(0);
        }
    }

    let mut latency_ms = BTreeMap::new();
    for key in PERCENTILES {
        // oha writes null when it has no successful response.
        if let Some(value) = json
            .get("latencyPercentiles")
            .and_then(|p| p.get(key))
            .and_then(Value::as_f64)
        {
            latency_ms.insert(key.to_owned(), value * 1000.0);
        }
    }
    Ok(ClientResult {
        ok,
        failures,
        seconds,
        requests_per_s: if seconds > 0.0 {
            ok as f64 / seconds
        } else {
            0.0
        },
        latency_ms_per_run: vec![latency_ms.clone()],
        latency_ms,
    })
}

/// Adds up the counts of several runs and takes the median of each
/// latency percentile over them (the upper middle value for an even count).
pub fn combine(runs: &[ClientResult]) -> ClientResult {
    let mut combined = ClientResult::default();
    for run in runs {
        combined.ok += run.ok;
        combined.seconds += run.seconds;
        for (failure, count) in &run.failures {
            *combined.failures.entry(failure.clone()).or_insert(0) += count;
        }
        combined
            .latency_ms_per_run
            .extend(run.latency_ms_per_run.iter().cloned());
    }
    if combined.seconds > 0.0 {
        combined.requests_per_s = combined.ok as f64 / combined.seconds;
    }
    for key in PERCENTILES {
        let mut values: Vec<f64> = combined
            .latency_ms_per_run
            .iter()
            .filter_map(|percentiles| percentiles.get(key).copied())
            .collect();
        if values.is_empty() {
            continue;
        }
        values.sort_by(f64::total_cmp);
        combined
            .latency_ms
            .insert(key.to_owned(), values[values.len() / 2]);
    }
    combined
}
