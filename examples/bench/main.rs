//! `make bench`: throughput, latency and cost of mesh-fanout against Envoy
//! without a filter and Envoy's built-in `request_mirror_policies`.
//!
//! Every scenario runs on its own Envoy (`--concurrency 1`, pinned to one
//! CPU with taskset) in front of the same examples/bench_upstream.rs
//! process. oha (https://github.com/hatoo/oha) sends the load from the
//! other CPU, which the upstream and this program share with it. The
//! bootstraps come from the templates in bench/ (see scenario.rs).
//!
//! Each scenario has up to two phases, each on a new Envoy after a
//! closed-loop warm-up:
//!
//! - closed loop: `--connections` connections send back to back for
//!   `--duration`, which gives the maximum throughput;
//! - fixed rate: `--rate-runs` runs of `--rate-duration` each, in which the
//!   same connections send `--rate-fraction` times the lowest closed-loop
//!   throughput of the scenario's group, with oha's latency correction.
//!   Each latency percentile is the median over the runs, so one burst of
//!   background load moves it less.
//!
//! ```text
//! make bench                       # the full run, about 4 minutes
//! make bench-smoke                 # a subset with 0.3 s runs, into target/bench-smoke/
//! target/release/examples/bench --help
//! ```
//!
//! `make bench` writes bench/results.json, docs/benchmarks.md and
//! docs/benchmarks.svg.

#[path = "../support/mod.rs"]
mod support;

mod envoy;
mod load;
mod measure;
mod process;
mod report;
mod scenario;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

use measure::Bench;
use process::Pinned;
use report::{Report, ScenarioResult};
use scenario::{Scenario, SCENARIOS, SLOW_SIDE_DELAY_US};
use support::envoy::{free_port, try_envoy_bin, try_wasm_path};

const USAGE: &str = "\
usage: bench [OPTIONS]

Runs every scenario of examples/bench/scenario.rs and writes the results as
JSON, a Markdown page and an SVG plot. Needs Linux, taskset, oha, Envoy
($ENVOY_BIN or .venv/bin/envoy) and the release .wasm (make build).

options:
  --smoke               a subset of the scenarios with runs of 0.3 s or less and
                        4 connections
  --duration SECONDS    length of each closed-loop run (default 5; smoke 0.3)
  --rate-runs N         fixed-rate runs per scenario (default 3; smoke 2)
  --rate-duration SECONDS
                        length of each fixed-rate run (default 5; smoke 0.2)
  --warmup SECONDS      closed-loop warm-up before each phase (default 1; smoke 0.1)
  --connections N       client connections (default 32; smoke 4)
  --rate-fraction F     fixed rate as a share of the group's lowest closed-loop
                        throughput, above 0 and at most 1 (default 0.3)
  --envoy-cpu N         CPU for Envoy (default 0)
  --load-cpu N          CPU for oha, the upstream and this program (default 1)
  --oha PATH            oha binary (default: $OHA, else oha on PATH)
  --wasm PATH           filter module to load (default: the release build of
                        make build); its size and VM start go into the report
  --floor-wasm PATH     module of the 0 scenarios (default: the
                        release build of examples/floor_filter.rs)
  --json PATH           results (default bench/results.json)
  --markdown PATH       report (default docs/benchmarks.md); the plot goes
                        beside it with the extension .svg
  --only ID,ID,...      run only these scenarios; a fixed-rate run needs a
                        closed-loop run in its group (for example --only 1,3)
  --invoked-as TEXT     command to print in the report (default: this command line)
  -h, --help            print this help";

/// Most fixed-rate runs per scenario, so a typo cannot make the bench run for hours.
const MAX_RATE_RUNS: usize = 20;
/// Lowest fixed rate, in requests per second.
const MIN_RATE: f64 = 10.0;
/// Limit for the upstream to print its ports.
const UPSTREAM_START_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct Options {
    pub smoke: bool,
    pub duration: Duration,
    pub rate_runs: usize,
    pub rate_duration: Duration,
    pub warmup: Duration,
    pub connections: usize,
    pub rate_fraction: f64,
    pub envoy_cpu: usize,
    pub load_cpu: usize,
    pub oha: Option<PathBuf>,
    /// Module to load instead of the release build.
    pub wasm: Option<PathBuf>,
    /// Module for the 0 scenarios instead of the release build
    /// of the example.
    pub floor_wasm: Option<PathBuf>,
    pub json: PathBuf,
    pub markdown: PathBuf,
    pub invoked_as: Option<String>,
    /// Scenario ids of `--only`.
    pub only: Option<Vec<String>>,
}

fn parse_options(args: &[String]) -> Result<Option<Options>, String> {
    let smoke = args.iter().any(|arg| arg == "--smoke");
    let mut options = Options {
        smoke,
        duration: Duration::from_millis(if smoke { 300 } else { 5000 }),
        rate_runs: if smoke { 2 } else { 3 },
        rate_duration: Duration::from_millis(if smoke { 200 } else { 5000 }),
        warmup: Duration::from_millis(if smoke { 100 } else { 1000 }),
        connections: if smoke { 4 } else { 32 },
        // At a fixed rate Envoy spends 1.5 to 1.8 times the closed loop's CPU
        // per request. Half the lowest closed-loop throughput therefore kept
        // the costliest scenario (side down) 92 % busy, and there p99
        // measures queueing collapse rather than the cost of a request.
        rate_fraction: 0.3,
        envoy_cpu: 0,
        load_cpu: 1,
        oha: None,
        wasm: None,
        floor_wasm: None,
        json: PathBuf::from("bench/results.json"),
        markdown: PathBuf::from("docs/benchmarks.md"),
        invoked_as: None,
        only: None,
    };
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .cloned()
                .ok_or_else(|| format!("missing value for {flag}"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--smoke" => {}
            "--duration" => options.duration = parse_seconds(flag, &value()?)?,
            "--warmup" => options.warmup = parse_seconds(flag, &value()?)?,
            "--rate-duration" => options.rate_duration = parse_seconds(flag, &value()?)?,
            "--rate-runs" => {
                options.rate_runs = parse_number(flag, &value()?)?;
                if !(1..=MAX_RATE_RUNS).contains(&options.rate_runs) {
                    return Err(format!(
                        "--rate-runs {} is out of range; use 1 to {MAX_RATE_RUNS}",
                        options.rate_runs
                    ));
                }
            }
            "--connections" => {
                options.connections = parse_number(flag, &value()?)?;
                if options.connections == 0 {
                    return Err("--connections must be at least 1".to_owned());
                }
            }
            "--rate-fraction" => {
                let fraction: f64 = parse_number(flag, &value()?)?;
                if !(fraction > 0.0 && fraction <= 1.0) {
                    return Err(format!(
                        "--rate-fraction {fraction} is out of range; use a value above 0 and at most 1"
                    ));
                }
                options.rate_fraction = fraction;
            }
            "--envoy-cpu" => options.envoy_cpu = parse_number(flag, &value()?)?,
            "--load-cpu" => options.load_cpu = parse_number(flag, &value()?)?,
            "--oha" => options.oha = Some(PathBuf::from(value()?)),
            "--wasm" => options.wasm = Some(PathBuf::from(value()?)),
            "--floor-wasm" => options.floor_wasm = Some(PathBuf::from(value()?)),
            "--json" => options.json = PathBuf::from(value()?),
            "--markdown" => options.markdown = PathBuf::from(value()?),
            "--invoked-as" => options.invoked_as = Some(value()?),
            "--only" => {
                options.only = Some(value()?.split(',').map(|id| id.trim().to_owned()).collect())
            }
            _ => return Err(format!("unknown option {flag:?}")),
        }
    }
    Ok(Some(options))
}

fn parse_number<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("invalid value {value:?} for {flag}"))
}

fn parse_seconds(flag: &str, value: &str) -> Result<Duration, String> {
    let seconds: f64 = parse_number(flag, value)?;
    if !(seconds > 0.0 && seconds <= 600.0) {
        return Err(format!(
            "{flag} {seconds} is out of range; use more than 0 and at most 600 seconds"
        ));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    process::install_panic_hook();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match parse_options(&args) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("error: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = tokio::select! {
        result = run(options, &args) => result,
        _ = tokio::signal::ctrl_c() => Err("interrupted".to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("bench failed: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(options: Options, args: &[String]) -> Result<(), String> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let work_dir = std::env::temp_dir().join(format!("mesh-fanout-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work_dir)
        .map_err(|e| format!("creating {} failed: {e}", work_dir.display()))?;
    let mut bodies = BTreeMap::new();
    for size in [1024_usize, 65536] {
        let path = work_dir.join(format!("body-{size}.bin"));
        // Printable bytes, so a captured request reads as text.
        let body: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
        std::fs::write(&path, body)
            .map_err(|e| format!("writing {} failed: {e}", path.display()))?;
        bodies.insert(size, path);
    }

    let result = execute(&options, args, &repo, &work_dir, bodies).await;
    match result {
        Ok(()) => {
            let _ = std::fs::remove_dir_all(&work_dir);
            Ok(())
        }
        Err(message) => Err(format!(
            "{message}\nbootstraps, logs and oha output kept in {}",
            work_dir.display()
        )),
    }
}

/// Runs every selected scenario and writes the report.
async fn execute(
    options: &Options,
    args: &[String],
    repo: &Path,
    work_dir: &Path,
    bodies: BTreeMap<usize, PathBuf>,
) -> Result<(), String> {
    let scenarios = select_scenarios(options)?;
    let envoy_bin = try_envoy_bin()?;
    let wasm = match &options.wasm {
        Some(path) if path.is_file() => std::fs::canonicalize(path)
            .map_err(|e| format!("resolving --wasm {} failed: {e}", path.display()))?,
        Some(path) => return Err(format!("--wasm {} not found", path.display())),
        None => try_wasm_path()?,
    };
    let floor_wasm = find_floor_wasm(repo, options.floor_wasm.as_deref())?;
    let oha = find_oha(options.oha.as_deref())?;
    let online_cpus = process::online_cpus();
    let (envoy_cpu, load_cpu) = choose_cpus(options, online_cpus)?;
    if let Some(cpu) = load_cpu {
        process::pin_self(cpu)?;
    }

    let (mut upstream, upstream_ports) = start_upstream().await?;
    let [primary_port, side_port, slow_side_port] = upstream_ports[..] else {
        return Err(format!(
            "bench_upstream printed {} ports, expected 3",
            upstream_ports.len()
        ));
    };
    let mut report = Report::new(repo, options, args, &envoy_bin, &oha, &wasm, online_cpus)?;
    report.machine.envoy_cpu = envoy_cpu;
    report.machine.load_cpu = load_cpu;
    let mut bench = Bench {
        options: options.clone(),
        envoy_bin,
        oha,
        wasm,
        floor_wasm,
        repo: repo.to_owned(),
        work_dir: work_dir.to_owned(),
        envoy_cpu,
        load_cpu,
        primary_port,
        side_port,
        slow_side_port,
        dead_port: free_port(),
        bodies,
        starts: 0,
    };

    println!(
        "mesh-fanout bench: {} scenarios; closed loop {:?}, fixed rate {} × {:?}, \
         each after a {:?} warm-up; {} connections; Envoy on CPU {}, load on CPU {}",
        scenarios.len(),
        options.duration,
        options.rate_runs,
        options.rate_duration,
        options.warmup,
        options.connections,
        describe_cpu(envoy_cpu),
        describe_cpu(load_cpu)
    );
    let mut results: Vec<ScenarioResult> =
        scenarios.iter().map(|s| ScenarioResult::new(s)).collect();
    bench.run_closed_loops(&mut results, &mut upstream).await?;
    let rates = fixed_rates(&results, options.rate_fraction);
    bench
        .run_fixed_rates(&mut results, &rates, &mut upstream)
        .await?;

    report.finish(results, rates)?;
    report.write(options, repo)?;
    println!(
        "wrote {} and {}",
        options.json.display(),
        options.markdown.display()
    );
    if options.smoke {
        // A smoke run's figures measure nothing, so its verdicts would mislead.
        println!("smoke run: the runs are too short to measure; targets not evaluated");
        return Ok(());
    }
    println!("targets are reported, not enforced: make bench exits 0 whatever they show");
    for target in &report.targets {
        println!("{:<5} {}: {}", target.verdict(), target.name, target.detail);
    }
    Ok(())
}

/// Returns the scenarios of `--only`, else the smoke subset or all of them.
fn select_scenarios(options: &Options) -> Result<Vec<&'static Scenario>, String> {
    let Some(ids) = &options.only else {
        return Ok(SCENARIOS
            .iter()
            .filter(|s| !options.smoke || s.in_smoke)
            .collect());
    };
    let mut selected = Vec::new();
    for id in ids {
        let scenario = scenario::find(id).ok_or_else(|| {
            let known: Vec<&str> = SCENARIOS.iter().map(|s| s.id).collect();
            format!(
                "--only: unknown scenario {id:?}; use ids from {}",
                known.join(", ")
            )
        })?;
        selected.push(scenario);
    }
    // Keep the run order of SCENARIOS whatever order --only lists them in.
    selected.sort_by_key(|s| SCENARIOS.iter().position(|known| known.id == s.id));
    selected.dedup_by_key(|s| s.id);
    Ok(selected)
}

fn scenario_by_id(id: &str) -> Result<&'static Scenario, String> {
    scenario::find(id).ok_or_else(|| format!("unknown scenario {id}"))
}

fn describe_cpu(cpu: Option<usize>) -> String {
    cpu.map_or("any".to_owned(), |cpu| cpu.to_string())
}

/// Returns the CPUs for Envoy and the load, or none on a single-CPU machine.
fn choose_cpus(options: &Options, online: usize) -> Result<(Option<usize>, Option<usize>), String> {
    if online < 2 {
        eprintln!("warning: 1 CPU online, so Envoy and the load share it unpinned");
        return Ok((None, None));
    }
    for (flag, cpu) in [
        ("--envoy-cpu", options.envoy_cpu),
        ("--load-cpu", options.load_cpu),
    ] {
        if cpu >= online {
            return Err(format!(
                "{flag} {cpu} does not exist; this machine has CPUs 0 to {}",
                online - 1
            ));
        }
    }
    if options.envoy_cpu == options.load_cpu {
        return Err(format!(
            "--envoy-cpu and --load-cpu are both {}; give Envoy its own CPU",
            options.envoy_cpu
        ));
    }
    Ok((Some(options.envoy_cpu), Some(options.load_cpu)))
}

/// Returns `--oha`, else `$OHA`, else `oha` from PATH.
fn find_oha(flag: Option<&Path>) -> Result<PathBuf, String> {
    let hint = "install it with `cargo install oha --locked` (make bench does) or pass --oha PATH";
    if let Some(path) = flag
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("OHA").map(PathBuf::from))
    {
        if path.is_file() {
            return Ok(path);
        }
        return Err(format!("oha not found at {}; {hint}", path.display()));
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .map(|dir| dir.join("oha"))
        .find(|path| path.is_file())
        .ok_or_else(|| format!("oha not found on PATH; {hint}"))
}

/// Starts examples/bench_upstream.rs, built beside this program, with three
/// listeners (primary, side and slow side) and returns their ports.
async fn start_upstream() -> Result<(Pinned, Vec<u16>), String> {
    let exe =
        std::env::current_exe().map_err(|e| format!("finding this program's path failed: {e}"))?;
    let upstream_bin = exe.with_file_name("bench_upstream");
    if !upstream_bin.is_file() {
        return Err(format!(
            "{} not found; build it with `cargo build --release --example bench_upstream`",
            upstream_bin.display()
        ));
    }

    // Not pinned here: it inherits this process's CPU.
    let mut upstream = Pinned::spawn(
        "bench_upstream",
        None,
        &upstream_bin,
        &[
            "--listeners".to_owned(),
            "2".to_owned(),
            "--slow-listener-delay-us".to_owned(),
            SLOW_SIDE_DELAY_US.to_string(),
        ],
        Stdio::piped(),
        Stdio::inherit(),
    )?;
    let stdout = upstream
        .child_mut()
        .stdout
        .take()
        .ok_or("bench_upstream has no stdout pipe")?;
    let stdout = tokio::process::ChildStdout::from_std(stdout)
        .map_err(|e| format!("reading bench_upstream's stdout failed: {e}"))?;

    let mut line = String::new();
    tokio::time::timeout(
        UPSTREAM_START_TIMEOUT,
        BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .map_err(|_| format!("bench_upstream printed no ports within {UPSTREAM_START_TIMEOUT:?}"))?
    .map_err(|e| format!("reading bench_upstream's stdout failed: {e}"))?;
    Ok((upstream, parse_listening_line(&line)?))
}

/// Returns the ports of bench_upstream's `listening 127.0.0.1:PORT ...` line.
fn parse_listening_line(line: &str) -> Result<Vec<u16>, String> {
    line.trim()
        .strip_prefix("listening ")
        .ok_or_else(|| format!("unexpected first line from bench_upstream: {line:?}"))?
        .split(' ')
        .map(|address| {
            address
                .rsplit_once(':')
                .and_then(|(_, port)| port.parse().ok())
                .ok_or_else(|| format!("invalid address {address:?} from bench_upstream"))
        })
        .collect()
}

/// Returns each group's fixed rate: `fraction` times the lowest
/// closed-loop throughput in the group, by group name.
fn fixed_rates(results: &[ScenarioResult], fraction: f64) -> BTreeMap<String, f64> {
    let mut lowest: BTreeMap<String, f64> = BTreeMap::new();
    for result in results {
        let Some(run) = &result.closed_loop else {
            continue;
        };
        // "1-again" only measures drift.
        if result.id == "1-again" {
            continue;
        }
        let rps = run.client.requests_per_s;
        lowest
            .entry(result.group.clone())
            .and_modify(|value| *value = value.min(rps))
            .or_insert(rps);
    }
    lowest
        .into_iter()
        .map(|(group, rps)| (group, (rps * fraction).floor().max(MIN_RATE)))
        .collect()
}

/// Finds the module of the 0 scenarios, which `make bench-tools`
/// builds.
fn find_floor_wasm(repo: &Path, option: Option<&Path>) -> Result<PathBuf, String> {
    let path = match option {
        Some(path) => path.to_owned(),
        None => repo.join("target/wasm32-wasip1/release/examples/floor_filter.wasm"),
    };
    if !path.is_file() {
        return Err(format!(
            "floor filter module {} not found; build it with \
             `cargo build --release --target wasm32-wasip1 --example floor_filter`",
            path.display()
        ));
    }
    std::fs::canonicalize(&path).map_err(|e| format!("resolving {} failed: {e}", path.display()))
}
