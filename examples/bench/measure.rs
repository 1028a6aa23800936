//! One measured run of a scenario: Envoy, warm-up, load, and what the run
//! cost Envoy.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;

use super::envoy::{self, BenchEnvoy, StartupTimes};
use super::load::{self, ClientResult, LoadSpec};
use super::process::{self, Memory, Pinned};
use super::report::{RunResult, ScenarioResult, SideCalls};
use super::scenario::{self, Ports, Scenario, Setup};
use super::support::envoy::free_port;
use super::{scenario_by_id, Options};

/// Limit for side calls still in flight after a run to finish.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
const SETTLE_POLL: Duration = Duration::from_millis(50);

/// Counter of requests that the listener's connection manager completed.
const DOWNSTREAM_COMPLETED: &str = "http.bench.downstream_rq_completed";
/// The filter's stats for target "side" of rule "bench" in bench/plugins/.
const TARGET_STATS: &str = "wasmcustom.mesh_fanout.rule.bench.target.side.";
const RULE_MATCHED: &str = "wasmcustom.mesh_fanout.rule.bench.matched";

/// Everything that stays the same across scenarios.
pub struct Bench {
    pub options: Options,
    pub envoy_bin: PathBuf,
    pub oha: PathBuf,
    pub wasm: PathBuf,
    /// Module of the 0 scenarios.
    pub floor_wasm: PathBuf,
    pub repo: PathBuf,
    /// Temp dir for bootstraps, logs, oha output and body files.
    pub work_dir: PathBuf,
    /// None when the machine has a single CPU and nothing is pinned.
    pub envoy_cpu: Option<usize>,
    pub load_cpu: Option<usize>,
    pub primary_port: u16,
    pub side_port: u16,
    pub slow_side_port: u16,
    pub dead_port: u16,
    /// Request body files by size.
    pub bodies: BTreeMap<usize, PathBuf>,
    /// Envoy starts so far, which names each run's temp dir.
    pub starts: usize,
}

/// Prints a one-line summary of a finished run.
pub fn print_run(scenario: &Scenario, run: &RunResult) {
    let side = run.side_calls.as_ref().map_or(String::new(), |side| {
        format!(", side calls {}", side.completed)
    });
    println!(
        "{:<9} {:<11} {:>8.0} req/s  p50 {:>7.3} ms  p99 {:>7.3} ms  CPU {:>6.1} us/req  RSS {:>6.1} MiB{side}{}",
        scenario.id,
        run.kind,
        run.client.requests_per_s,
        run.client.percentile("p50"),
        run.client.percentile("p99"),
        run.envoy_cpu_us_per_request,
        run.memory.rss_kib as f64 / 1024.0,
        if run.client.failed() > 0 {
            format!(", failures {:?}", run.client.failures)
        } else {
            String::new()
        }
    );
}

impl Bench {
    pub async fn run_closed_loops(
        &mut self,
        results: &mut [ScenarioResult],
        upstream: &mut Pinned,
    ) -> Result<(), String> {
        for result in results.iter_mut() {
            let scenario = scenario_by_id(&result.id)?;
            if !scenario.closed_loop {
                continue;
            }
            upstream.ensure_running()?;
            let run = self.measure(scenario, None).await?;
            print_run(scenario, &run);
            result.closed_loop = Some(run);
        }
        Ok(())
    }

    pub async fn run_fixed_rates(
        &mut self,
        results: &mut [ScenarioResult],
        rates: &BTreeMap<String, f64>,
        upstream: &mut Pinned,
    ) -> Result<(), String> {
        for result in results.iter_mut() {
            let scenario = scenario_by_id(&result.id)?;
            if !scenario.fixed_rate {
                continue;
            }
            let Some(&rate) = rates.get(scenario.group.name()) else {
                println!(
                    "{:<9} fixed rate skipped: no closed-loop run in group {}",
                    scenario.id,
                    scenario.group.name()
                );
                continue;
            };
            upstream.ensure_running()?;
            let run = self.measure(scenario, Some(rate)).await?;
            print_run(scenario, &run);
            result.fixed_rate = Some(run);
        }
        Ok(())
    }

    /// Starts Envoy for `scenario`, warms it up, runs the load (a closed
    /// loop, or `rate` requests per second) and reads what it cost.
    async fn measure(
        &mut self,
        scenario: &Scenario,
        rate: Option<f64>,
    ) -> Result<RunResult, String> {
        self.starts += 1;
        let kind = if rate.is_some() {
            "fixed-rate"
        } else {
            "closed-loop"
        };
        let dir = self
            .work_dir
            .join(format!("{:02}-{}-{kind}", self.starts, scenario.id));
        let ports = Ports {
            listener: free_port(),
            admin: free_port(),
            primary: self.primary_port,
            side: self.side_port,
            slow_side: self.slow_side_port,
            dead: self.dead_port,
        };
        let yaml = scenario::render_bootstrap(
            &self.repo.join("bench"),
            scenario,
            &ports,
            &self.wasm,
            &self.floor_wasm,
        )?;
        let mut envoy =
            BenchEnvoy::start(&self.envoy_bin, &yaml, &dir, ports.admin, self.envoy_cpu).await?;
        let startup: StartupTimes = envoy::startup_times(&envoy.log_text());
        let load_average = process::load_average()?;

        let body_file = match scenario.body_bytes {
            0 => None,
            size => Some(
                self.bodies
                    .get(&size)
                    .ok_or_else(|| format!("no body file of {size} bytes"))?
                    .as_path(),
            ),
        };
        let spec = |duration: Duration, rate: Option<f64>, name: &str| LoadSpec {
            oha: &self.oha,
            cpu: self.load_cpu,
            port: ports.listener,
            scenario,
            body_file,
            connections: self.options.connections,
            duration,
            rate,
            output: dir.join(format!("oha-{name}.json")),
        };

        let warmup = load::run(&spec(self.options.warmup, None, "warmup")).await?;
        if warmup.ok == 0 {
            return Err(format!(
                "scenario {}: no request succeeded during the warm-up: {:?}",
                scenario.id, warmup.failures
            ));
        }
        settle(&envoy).await?;
        let before = envoy.stats().await?;
        let cpu_before = process::cpu_seconds(envoy.pid())?;
        let started = Instant::now();

        let (runs, duration) = match rate {
            Some(_) => (self.options.rate_runs, self.options.rate_duration),
            None => (1, self.options.duration),
        };
        let mut clients = Vec::with_capacity(runs);
        for index in 0..runs {
            clients.push(load::run(&spec(duration, rate, &format!("run-{index}"))).await?);
        }
        let client: ClientResult = load::combine(&clients);
        let cpu_after = process::cpu_seconds(envoy.pid())?;
        let wall = started.elapsed().as_secs_f64();
        let memory: Memory = process::memory(envoy.pid())?;
        envoy.ensure_running()?;

        settle(&envoy).await?;
        let after = envoy.stats().await?;
        let delta = |name: &str| {
            after
                .get(name)
                .copied()
                .unwrap_or(0)
                .saturating_sub(before.get(name).copied().unwrap_or(0))
        };
        let envoy_requests = delta(DOWNSTREAM_COMPLETED);
        let envoy_cpu_seconds = cpu_after - cpu_before;
        let side_calls = side_calls(scenario, &before, &after);

        Ok(RunResult {
            kind: kind.to_owned(),
            rate,
            oha_command: load::command_line(&spec(duration, rate, "run-N")),
            client,
            envoy_requests,
            envoy_cpu_seconds,
            envoy_cpu_us_per_request: if envoy_requests > 0 {
                envoy_cpu_seconds * 1e6 / envoy_requests as f64
            } else {
                f64::NAN
            },
            envoy_cpu_busy_percent: envoy_cpu_seconds / wall * 100.0,
            memory,
            side_calls,
            startup,
            ready_ms: envoy.ready_after.as_secs_f64() * 1000.0,
            load_average,
        })
        // Dropping `envoy` kills it.
    }
}

/// Waits until no side call or mirror request is queued or running, so the
/// counters read next include every outcome of the run.
async fn settle(envoy: &BenchEnvoy) -> Result<(), String> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let stats = envoy.stats().await?;
        let busy: Vec<String> = stats
            .iter()
            .filter(|(name, &value)| value > 0 && is_in_flight_gauge(name))
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        if busy.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "side calls still in flight {SETTLE_TIMEOUT:?} after the run: {}",
                busy.join(", ")
            ));
        }
        tokio::time::sleep(SETTLE_POLL).await;
    }
}

fn is_in_flight_gauge(name: &str) -> bool {
    let cluster_gauge = ["cluster.side.", "cluster.side_slow.", "cluster.side_dead."]
        .iter()
        .any(|prefix| name.starts_with(prefix))
        && (name.ends_with(".upstream_rq_active") || name.ends_with(".upstream_rq_pending_active"));
    cluster_gauge || (name.starts_with(TARGET_STATS) && name.ends_with(".in_flight"))
}

/// Reads the run's side calls from the filter's stats, or from the side
/// cluster's stats for the built-in mirror. None for scenarios without one.
fn side_calls(
    scenario: &Scenario,
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> Option<SideCalls> {
    let delta = |name: &str| {
        after
            .get(name)
            .copied()
            .unwrap_or(0)
            .saturating_sub(before.get(name).copied().unwrap_or(0))
    };
    match scenario.setup {
        Setup::NoFilter
        | Setup::Floor {
            side_cluster: None, ..
        } => None,
        Setup::Mirror { cluster }
        | Setup::Floor {
            side_cluster: Some(cluster),
            ..
        } => {
            let source = format!("cluster.{cluster}.upstream_rq_completed");
            let completed = delta(&source);
            let success = delta(&format!("cluster.{cluster}.upstream_rq_2xx"));
            Some(SideCalls {
                source,
                matched: None,
                completed,
                success,
                skipped: 0,
                outcomes: BTreeMap::from([
                    ("2xx".to_owned(), success),
                    ("other".to_owned(), completed.saturating_sub(success)),
                ]),
            })
        }
        Setup::Filter { .. } => {
            let mut outcomes = BTreeMap::new();
            let mut skipped = 0;
            for name in after.keys() {
                let Some(rest) = name.strip_prefix(TARGET_STATS) else {
                    continue;
                };
                if let Some(outcome) = rest
                    .strip_prefix("outcome.")
                    .and_then(|r| r.strip_suffix(".side_calls"))
                {
                    let count = delta(name);
                    if count > 0 {
                        outcomes.insert(outcome.to_owned(), count);
                    }
                } else if let Some(reason) = rest
                    .strip_prefix("reason.")
                    .and_then(|r| r.strip_suffix(".skipped"))
                {
                    let count = delta(name);
                    if count > 0 {
                        outcomes.insert(format!("skipped {reason}"), count);
                        skipped += count;
                    }
                }
            }
            let completed = outcomes
                .iter()
                .filter(|(name, _)| !name.starts_with("skipped "))
                .map(|(_, count)| count)
                .sum();
            Some(SideCalls {
                source: format!("{TARGET_STATS}outcome.*.side_calls"),
                matched: Some(delta(RULE_MATCHED)),
                completed,
                success: outcomes.get("success").copied().unwrap_or(0),
                skipped,
                outcomes,
            })
        }
    }
}
