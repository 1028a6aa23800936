//! The results: JSON for tools, a Markdown page and an SVG plot for people,
//! and the PASS/FAIL checks of the performance targets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use super::envoy::StartupTimes;
use super::load::ClientResult;
use super::process::{self, Memory};
use super::scenario::{
    self, Scenario, Setup, FANOUT_PRIMARY_DELAY_US, FANOUT_SIDE_DELAY_US, SLOW_SIDE_DELAY_US,
};
use super::Options;

mod markdown;
mod svg;

/// Largest .wasm that meets the size target: 300 kB.
const WASM_SIZE_LIMIT_BYTES: u64 = 300_000;
/// Bumped when a field changes meaning or goes away.
const SCHEMA_VERSION: u32 = 1;

#[derive(Serialize)]
pub struct Report {
    pub schema_version: u32,
    /// UTC, `YYYY-MM-DD HH:MM:SS`.
    pub started_at_utc: String,
    /// Markdown: the command in backticks, with the `make` target if any.
    pub command: String,
    pub smoke: bool,
    pub envoy_version: String,
    pub oha_version: String,
    /// `git rev-parse --short HEAD` of the repository, with " (uncommitted
    /// changes in src/)" when `git status` lists files under src/.
    pub git_commit: String,
    pub machine: Machine,
    pub settings: Settings,
    pub wasm: Wasm,
    /// Fixed rate of each group, in requests per second.
    pub fixed_rates: BTreeMap<String, f64>,
    pub scenarios: Vec<ScenarioResult>,
    pub targets: Vec<Target>,
    /// Closed-loop throughput of "1-again" relative to "1", minus 1: how far
    /// the machine drifted during the closed-loop runs.
    pub drift_no_filter: Option<f64>,
}

#[derive(Serialize)]
pub struct Machine {
    /// Online CPUs, as `nproc --all` counts them.
    pub nproc: usize,
    pub cpu_model: String,
    pub memory_kib: Option<u64>,
    pub kernel: String,
    /// 1, 5 and 15 minute load averages when the run started and ended.
    pub load_average_start: [f64; 3],
    pub load_average_end: [f64; 3],
    pub envoy_cpu: Option<usize>,
    pub load_cpu: Option<usize>,
}

#[derive(Serialize)]
pub struct Settings {
    pub duration_s: f64,
    pub rate_runs: usize,
    pub rate_duration_s: f64,
    pub warmup_s: f64,
    pub connections: usize,
    pub rate_fraction: f64,
    pub fanout_primary_delay_us: u64,
    pub fanout_side_delay_us: u64,
    pub slow_side_delay_us: u64,
}

#[derive(Serialize)]
pub struct Wasm {
    pub path: String,
    pub bytes: u64,
    /// Medians over the Envoy starts with the filter; see `StartupTimes`.
    pub main_vm_start_ms: Option<f64>,
    pub worker_vm_start_ms: Option<f64>,
    /// Medians of the listener setup time with and without the filter.
    pub listeners_with_filter_ms: Option<f64>,
    pub listeners_without_filter_ms: Option<f64>,
    /// Medians from the spawn to admin `/ready` with and without the filter.
    pub ready_with_filter_ms: Option<f64>,
    pub ready_without_filter_ms: Option<f64>,
}

#[derive(Serialize)]
pub struct ScenarioResult {
    pub id: String,
    pub title: String,
    pub setup: String,
    pub group: String,
    pub method: String,
    pub body_bytes: usize,
    pub closed_loop: Option<RunResult>,
    pub fixed_rate: Option<RunResult>,
    pub ratios: Option<Ratios>,
}

impl ScenarioResult {
    pub fn new(scenario: &Scenario) -> ScenarioResult {
        ScenarioResult {
            id: scenario.id.to_owned(),
            title: scenario.title.to_owned(),
            setup: scenario.setup.describe().to_owned(),
            group: scenario.group.name().to_owned(),
            method: scenario.method.to_owned(),
            body_bytes: scenario.body_bytes,
            closed_loop: None,
            fixed_rate: None,
            ratios: None,
        }
    }
}

#[derive(Serialize)]
pub struct RunResult {
    /// "closed-loop" or "fixed-rate".
    pub kind: String,
    /// Requests per second of a fixed-rate run.
    pub rate: Option<f64>,
    pub oha_command: String,
    pub client: ClientResult,
    /// Requests that Envoy's connection manager completed during the run.
    pub envoy_requests: u64,
    /// User plus system CPU time of Envoy during the run.
    pub envoy_cpu_seconds: f64,
    pub envoy_cpu_us_per_request: f64,
    /// Envoy's CPU time over the run's wall time, in percent of one CPU.
    pub envoy_cpu_busy_percent: f64,
    /// Envoy's memory right after the run.
    pub memory: Memory,
    pub side_calls: Option<SideCalls>,
    pub startup: StartupTimes,
    /// From Envoy's spawn to admin `/ready` returning 200.
    pub ready_ms: f64,
    /// 1, 5 and 15 minute load averages once Envoy was ready, before the warm-up.
    pub load_average: [f64; 3],
}

#[derive(Serialize)]
pub struct SideCalls {
    /// The stat that `completed` comes from.
    pub source: String,
    /// Requests that matched the filter's rule; None for the built-in mirror.
    pub matched: Option<u64>,
    /// Side calls with an outcome (not skipped).
    pub completed: u64,
    /// Of those, `success` outcomes (filter) or 2xx responses (mirror).
    pub success: u64,
    pub skipped: u64,
    /// Counts by outcome, and by "skipped REASON".
    pub outcomes: BTreeMap<String, u64>,
}

/// Ratios to the no-filter and built-in mirror scenarios with the same request.
#[derive(Serialize)]
pub struct Ratios {
    pub no_filter: String,
    pub mirror: String,
    pub throughput_vs_no_filter: Option<f64>,
    pub throughput_vs_mirror: Option<f64>,
    pub p99_vs_no_filter: Option<f64>,
    pub p99_vs_mirror: Option<f64>,
    pub cpu_per_request_vs_no_filter: Option<f64>,
    pub cpu_per_request_vs_mirror: Option<f64>,
}

#[derive(Serialize)]
pub struct Target {
    pub name: String,
    /// None when a scenario it needs did not run.
    pub pass: Option<bool>,
    pub detail: String,
}

impl Target {
    pub fn verdict(&self) -> &'static str {
        match self.pass {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "N/A",
        }
    }
}

impl Report {
    pub fn new(
        repo: &Path,
        options: &Options,
        args: &[String],
        envoy_bin: &Path,
        oha: &Path,
        wasm: &Path,
        nproc: usize,
    ) -> Result<Report, String> {
        let bytes = std::fs::metadata(wasm)
            .map_err(|e| format!("reading the size of {} failed: {e}", wasm.display()))?
            .len();
        let program = std::env::args()
            .next()
            .unwrap_or_else(|| "bench".to_owned());
        let invocation = command_line(&program, args);
        let command = match &options.invoked_as {
            Some(label) => format!("`{label}`, which runs `{invocation}`"),
            None => format!("`{invocation}`"),
        };
        Ok(Report {
            schema_version: SCHEMA_VERSION,
            started_at_utc: utc_now(),
            command,
            smoke: options.smoke,
            envoy_version: envoy_version(envoy_bin),
            oha_version: version_line(oha),
            git_commit: git_commit(repo),
            machine: Machine {
                nproc,
                cpu_model: process::cpu_model(),
                memory_kib: memory_kib(),
                kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                    .map(|text| text.trim().to_owned())
                    .unwrap_or_else(|_| "unknown".to_owned()),
                load_average_start: process::load_average()?,
                load_average_end: [0.0; 3],
                envoy_cpu: None,
                load_cpu: None,
            },
            settings: Settings {
                duration_s: options.duration.as_secs_f64(),
                rate_runs: options.rate_runs,
                rate_duration_s: options.rate_duration.as_secs_f64(),
                warmup_s: options.warmup.as_secs_f64(),
                connections: options.connections,
                rate_fraction: options.rate_fraction,
                fanout_primary_delay_us: FANOUT_PRIMARY_DELAY_US,
                fanout_side_delay_us: FANOUT_SIDE_DELAY_US,
                slow_side_delay_us: SLOW_SIDE_DELAY_US,
            },
            wasm: Wasm {
                path: wasm.display().to_string(),
                bytes,
                main_vm_start_ms: None,
                worker_vm_start_ms: None,
                listeners_with_filter_ms: None,
                listeners_without_filter_ms: None,
                ready_with_filter_ms: None,
                ready_without_filter_ms: None,
            },
            fixed_rates: BTreeMap::new(),
            scenarios: Vec::new(),
            targets: Vec::new(),
            drift_no_filter: None,
        })
    }

    /// Stores the results and derives the ratios, startup medians and targets.
    pub fn finish(
        &mut self,
        mut results: Vec<ScenarioResult>,
        rates: BTreeMap<String, f64>,
    ) -> Result<(), String> {
        let ratios: Vec<Option<Ratios>> = results
            .iter()
            .map(|result| ratios(result, &results))
            .collect();
        for (result, ratios) in results.iter_mut().zip(ratios) {
            result.ratios = ratios;
        }
        self.scenarios = results;
        self.fixed_rates = rates;
        self.machine.load_average_end = process::load_average()?;
        self.summarize_startup();
        self.drift_no_filter = match (self.closed("1"), self.closed("1-again")) {
            (Some(first), Some(again)) if first.client.requests_per_s > 0.0 => {
                Some(again.client.requests_per_s / first.client.requests_per_s - 1.0)
            }
            _ => None,
        };
        self.targets = self.check_targets();
        Ok(())
    }

    fn scenario(&self, id: &str) -> Option<&ScenarioResult> {
        self.scenarios.iter().find(|s| s.id == id)
    }

    fn closed(&self, id: &str) -> Option<&RunResult> {
        self.scenario(id).and_then(|s| s.closed_loop.as_ref())
    }

    fn fixed(&self, id: &str) -> Option<&RunResult> {
        self.scenario(id).and_then(|s| s.fixed_rate.as_ref())
    }

    fn summarize_startup(&mut self) {
        let mut with_filter = Vec::new();
        let mut without_filter = Vec::new();
        for result in &self.scenarios {
            let setup = scenario::find(&result.id).map(|s| s.setup);
            if matches!(setup, Some(Setup::Floor { .. })) {
                // Another module, so its start time is not mesh-fanout's.
                continue;
            }
            let is_filter = matches!(setup, Some(Setup::Filter { .. }));
            for run in [&result.closed_loop, &result.fixed_rate]
                .into_iter()
                .flatten()
            {
                if is_filter {
                    with_filter.push(run);
                } else {
                    without_filter.push(run);
                }
            }
        }
        let median_of = |runs: &[&RunResult], field: fn(&RunResult) -> Option<f64>| {
            median(runs.iter().filter_map(|run| field(run)).collect())
        };
        self.wasm.main_vm_start_ms = median_of(&with_filter, |r| r.startup.main_vm_ms);
        self.wasm.worker_vm_start_ms = median_of(&with_filter, |r| r.startup.worker_vm_ms);
        self.wasm.listeners_with_filter_ms = median_of(&with_filter, |r| r.startup.listeners_ms);
        self.wasm.listeners_without_filter_ms =
            median_of(&without_filter, |r| r.startup.listeners_ms);
        self.wasm.ready_with_filter_ms = median_of(&with_filter, |r| Some(r.ready_ms));
        self.wasm.ready_without_filter_ms = median_of(&without_filter, |r| Some(r.ready_ms));
    }

    fn check_targets(&self) -> Vec<Target> {
        let throughput = |id: &str| self.closed(id).map(|run| run.client.requests_per_s);
        let percentile = |id: &str, key: &str| self.fixed(id).map(|run| run.client.percentile(key));
        let mut targets = vec![
            ratio_target(
                "shadow (3) throughput ≥ 0.97 × built-in mirror (2)",
                throughput("3"),
                throughput("2"),
                0.97,
                true,
                "req/s",
            ),
            ratio_target(
                "shadow (3) p99 ≤ 1.05 × built-in mirror (2)",
                percentile("3", "p99"),
                percentile("2", "p99"),
                1.05,
                false,
                "ms",
            ),
            ratio_target(
                "no rule matches (7) throughput ≥ 0.99 × no filter (1)",
                throughput("7"),
                throughput("1"),
                0.99,
                true,
                "req/s",
            ),
            ratio_target(
                "slow side (6-slow) p99 ≤ 1.05 × shadow (3)",
                percentile("6-slow", "p99"),
                percentile("3", "p99"),
                1.05,
                false,
                "ms",
            ),
            ratio_target(
                "side down (6-dead) p99 ≤ 1.05 × shadow (3)",
                percentile("6-dead", "p99"),
                percentile("3", "p99"),
                1.05,
                false,
                "ms",
            ),
        ];
        targets.push(self.fanout_target());
        targets.push(Target {
            name: "mesh_fanout.wasm ≤ 300 kB (300,000 bytes)".to_owned(),
            pass: Some(self.wasm.bytes <= WASM_SIZE_LIMIT_BYTES),
            detail: format!("{} bytes", group_digits(self.wasm.bytes)),
        });
        targets
    }

    /// Fan-out p50 against max(primary alone, side alone) + 1 ms, where each
    /// "alone" is a no-filter run whose upstream waits that target's delay.
    fn fanout_target(&self) -> Target {
        let name = "fan-out (5) p50 < max(primary, side) p50 + 1 ms".to_owned();
        let p50 = |id: &str| self.fixed(id).map(|run| run.client.percentile("p50"));
        match (p50("5"), p50("5-primary"), p50("5-side")) {
            (Some(fanout), Some(primary), Some(side)) => {
                let slower = primary.max(side);
                Target {
                    name,
                    pass: Some(fanout < slower + 1.0),
                    detail: format!(
                        "{fanout:.3} ms against max({primary:.3}, {side:.3}) = {slower:.3} ms; \
                         {:+.3} ms (the sum would be {:.3} ms)",
                        fanout - slower,
                        primary + side
                    ),
                }
            }
            _ => Target {
                name,
                pass: None,
                detail: "scenario 5, 5-primary or 5-side has no fixed-rate run".to_owned(),
            },
        }
    }

    /// Writes the JSON, the Markdown page and the SVG beside it.
    pub fn write(&self, options: &Options, repo: &Path) -> Result<(), String> {
        let json_path = resolve(repo, &options.json);
        let markdown_path = resolve(repo, &options.markdown);
        let svg_path = markdown_path.with_extension("svg");
        let json = serde_json::to_string_pretty(self)
            .map_err(|e| format!("serializing the results failed: {e}"))?;
        write_file(&json_path, &(json + "\n"))?;
        let svg_name = svg_path
            .file_name()
            .map_or("benchmarks.svg".into(), |name| name.to_string_lossy());
        let json_shown = options.json.display().to_string();
        write_file(&markdown_path, &self.markdown(&svg_name, &json_shown))?;
        write_file(&svg_path, &self.svg())?;
        Ok(())
    }
}

fn ratio_target(
    name: &str,
    value: Option<f64>,
    baseline: Option<f64>,
    factor: f64,
    at_least: bool,
    unit: &str,
) -> Target {
    let (Some(value), Some(baseline)) = (value, baseline) else {
        return Target {
            name: name.to_owned(),
            pass: None,
            detail: "a scenario it compares did not run".to_owned(),
        };
    };
    let ratio = value / baseline;
    let pass = if at_least {
        ratio >= factor
    } else {
        ratio <= factor
    };
    let digits = if unit == "ms" { 3 } else { 0 };
    Target {
        name: name.to_owned(),
        pass: Some(pass),
        detail: format!("{value:.digits$} against {baseline:.digits$} {unit}: ×{ratio:.3}"),
    }
}

fn ratios(result: &ScenarioResult, all: &[ScenarioResult]) -> Option<Ratios> {
    let group = scenario::find(&result.id)?.group;
    let (no_filter_id, mirror_id) = group.baselines()?;
    let find = |id: &str| all.iter().find(|s| s.id == id);
    let no_filter = find(no_filter_id);
    let mirror = find(mirror_id);
    let divide = |value: Option<f64>, baseline: Option<f64>| match (value, baseline) {
        (Some(value), Some(baseline)) if baseline > 0.0 && value.is_finite() => {
            Some(value / baseline)
        }
        _ => None,
    };
    let rps = |s: Option<&ScenarioResult>| {
        s.and_then(|s| s.closed_loop.as_ref())
            .map(|run| run.client.requests_per_s)
    };
    let p99 = |s: Option<&ScenarioResult>| {
        s.and_then(|s| s.fixed_rate.as_ref())
            .map(|run| run.client.percentile("p99"))
    };
    let cpu = |s: Option<&ScenarioResult>| {
        s.and_then(|s| s.closed_loop.as_ref())
            .map(|run| run.envoy_cpu_us_per_request)
    };
    Some(Ratios {
        no_filter: no_filter_id.to_owned(),
        mirror: mirror_id.to_owned(),
        throughput_vs_no_filter: divide(rps(Some(result)), rps(no_filter)),
        throughput_vs_mirror: divide(rps(Some(result)), rps(mirror)),
        p99_vs_no_filter: divide(p99(Some(result)), p99(no_filter)),
        p99_vs_mirror: divide(p99(Some(result)), p99(mirror)),
        cpu_per_request_vs_no_filter: divide(cpu(Some(result)), cpu(no_filter)),
        cpu_per_request_vs_mirror: divide(cpu(Some(result)), cpu(mirror)),
    })
}

fn group_digits(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    Some(if values.len() % 2 == 0 {
        (values[middle - 1] + values[middle]) / 2.0
    } else {
        values[middle]
    })
}

/// Returns the text after "version: " in `envoy --version`, for example
/// `9e55…/1.40.0/Clean/RELEASE/BoringSSL`.
fn envoy_version(envoy_bin: &Path) -> String {
    let line = version_line(envoy_bin);
    match line.split_once("version: ") {
        Some((_, version)) => version.trim().to_owned(),
        None => line,
    }
}

/// Runs `program --version` and returns its first non-empty line.
fn version_line(program: &Path) -> String {
    Command::new(program)
        .arg("--version")
        .output()
        .ok()
        .and_then(|output| {
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .map(str::trim)
                .find(|line| !line.is_empty())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| format!("unknown ({} --version failed)", program.display()))
}

/// Returns `program` and `args` as a shell command line, without
/// `--invoked-as` and its value, which only label the report.
fn command_line(program: &str, args: &[String]) -> String {
    let mut words = vec![program.to_owned()];
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == "--invoked-as" {
            args.next();
            continue;
        }
        if arg.contains(' ') {
            words.push(format!("'{arg}'"));
        } else {
            words.push(arg.clone());
        }
    }
    words.join(" ")
}

fn git_commit(repo: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(args)
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    };
    let Some(commit) = git(&["rev-parse", "--short", "HEAD"]) else {
        return "unknown (not a git checkout)".to_owned();
    };
    match git(&["status", "--porcelain", "--", "src"]) {
        Some(changes) if !changes.is_empty() => format!("{commit} (uncommitted changes in src/)"),
        _ => commit,
    }
}

fn memory_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|value| value.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse().ok())
}

fn resolve(repo: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_owned()
    } else {
        repo.join(path)
    }
}

fn write_file(path: &Path, text: &str) -> Result<(), String> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("creating {} failed: {e}", parent.display()))?;
    }
    std::fs::write(path, text).map_err(|e| format!("writing {} failed: {e}", path.display()))
}

/// Returns the current UTC time as `YYYY-MM-DD HH:MM:SS`.
fn utc_now() -> String {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (seconds / 86_400) as i64;
    let time = seconds % 86_400;
    // Howard Hinnant's days-to-civil algorithm for the proleptic Gregorian calendar.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        time / 3600,
        time % 3600 / 60,
        time % 60
    )
}
