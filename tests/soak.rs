//! Soak: sustained load at a fixed rate on one shadow rule in real Envoy,
//! in two phases: the side target responds slowly, then its port is closed.
//!
//! It reports Envoy's resident memory and the Wasm instances' linear memory
//! at the start, once warm and at the end of each phase, and checks exact
//! accounting: every request sent gets a response, and every matched
//! request ends in exactly one outcome or skip.
//!
//! Ignored by `cargo test`; run it with `make soak`, or:
//!
//! ```text
//! SOAK_SECONDS=180 SOAK_RATE=300 cargo test --release --test soak -- --ignored --nocapture
//! ```
//!
//! `SOAK_SECONDS` (default 180) is split evenly between the phases, and
//! `SOAK_RATE` (default 300) is requests per second.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::client::Connection;
use support::envoy::WasmMemory;
use support::{Behaviour, Envoy, EnvoyConfig, Proto, Request, Upstream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, MissedTickBehavior};

const DEFAULT_SECONDS: u64 = 180;
const DEFAULT_RATE: u64 = 300;
/// Side target delay in the slow phase.
const SLOW_DELAY: Duration = Duration::from_millis(400);
const SIDE_TIMEOUT_MS: u64 = 1000;
/// Requests in flight at once from the client. A tick that finds this many
/// in flight sends nothing and is counted as `not_sent`.
const MAX_CLIENT_IN_FLIGHT: usize = 512;
/// Time after a phase starts at which its "warm" memory is read.
const WARM_FRACTION: f64 = 0.25;
const SAMPLE_INTERVAL: Duration = Duration::from_secs(10);
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

const RULE_PREFIX: &str = "wasmcustom.mesh_fanout.rule.soak.";
const MATCHED: &str = "wasmcustom.mesh_fanout.rule.soak.matched";
const IN_FLIGHT: &str = "wasmcustom.mesh_fanout.rule.soak.target.side.in_flight";

fn plugin() -> String {
    format!(
        r#"{{"rules": [{{"name": "soak", "match": {{"path": {{"prefix": "/soak"}}}},
            "targets": [{{"name": "side", "cluster": "side", "timeout_ms": {SIDE_TIMEOUT_MS}}}]}}]}}"#
    )
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a whole number")),
        Err(_) => default,
    }
}

/// Client-side counts of one phase.
#[derive(Default)]
struct ClientCounts {
    sent: AtomicU64,
    responses_2xx: AtomicU64,
    responses_other: AtomicU64,
    errors: AtomicU64,
    not_sent: AtomicU64,
    latencies: Mutex<Vec<Duration>>,
}

/// Envoy's and the OS's view of memory at one moment.
#[derive(Clone, Copy, Debug)]
struct MemorySample {
    elapsed: Duration,
    rss_kib: u64,
    wasm: WasmMemory,
    /// `server.memory_allocated`: bytes tcmalloc has handed out.
    allocated: u64,
    /// `server.memory_heap_size`: bytes tcmalloc has reserved.
    heap_size: u64,
    vms: u64,
    /// The filter's `in_flight` gauge: side calls dispatched and not ended.
    side_calls_in_flight: u64,
}

async fn sample_memory(envoy: &Envoy, started: Instant) -> MemorySample {
    let gauges = envoy.gauges().await;
    let gauge = |name: &str| gauges.get(name).copied().unwrap_or(0);
    MemorySample {
        elapsed: started.elapsed(),
        rss_kib: envoy.rss_kib().unwrap(),
        wasm: envoy.wasm_memory().unwrap(),
        allocated: gauge("server.memory_allocated"),
        heap_size: gauge("server.memory_heap_size"),
        vms: gauge("wasm.envoy.wasm.runtime.v8.active"),
        side_calls_in_flight: gauge(IN_FLIGHT),
    }
}

fn describe(label: &str, sample: &MemorySample) -> String {
    format!(
        "{label:>5} t={:>5.1}s  RSS {:>7} KiB  Wasm linear memory {} KiB ({} KiB resident, \
         {} instances)  tcmalloc allocated {} KiB, heap {} KiB  V8 VMs {}  side calls in flight {}",
        sample.elapsed.as_secs_f64(),
        sample.rss_kib,
        sample.wasm.size_kib,
        sample.wasm.rss_kib,
        sample.wasm.instances,
        sample.allocated / 1024,
        sample.heap_size / 1024,
        sample.vms,
        sample.side_calls_in_flight
    )
}

/// Sends POST /soak/<n> at `rate` per second for `duration`, on a pool of
/// keep-alive HTTP/1.1 connections, and waits for every sent request to end.
/// Prints a memory sample every `SAMPLE_INTERVAL` and returns the one read
/// at `WARM_FRACTION` of the phase.
async fn run_load(
    envoy: &Envoy,
    rate: u64,
    duration: Duration,
    counts: Arc<ClientCounts>,
    started: Instant,
) -> MemorySample {
    let port = envoy.port();
    let pool: Arc<Mutex<Vec<Connection>>> = Arc::new(Mutex::new(Vec::new()));
    let permits = Arc::new(Semaphore::new(MAX_CLIENT_IN_FLIGHT));
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let phase_start = Instant::now();
    let end = phase_start + duration;
    let warm_at = phase_start + duration.mul_f64(WARM_FRACTION);
    let mut warm = None;
    let mut next_sample = phase_start + SAMPLE_INTERVAL;
    let max_requests = rate * duration.as_secs() + rate;
    let mut ticks: u64 = 0;

    while Instant::now() < end && ticks < max_requests {
        ticker.tick().await;
        ticks += 1;
        if warm.is_none() && Instant::now() >= warm_at {
            let sample = sample_memory(envoy, started).await;
            println!("{}", describe("warm", &sample));
            warm = Some(sample);
        }
        if Instant::now() >= next_sample {
            next_sample += SAMPLE_INTERVAL;
            println!(
                "{}  sent {}",
                describe("", &sample_memory(envoy, started).await),
                counts.sent.load(Ordering::Relaxed)
            );
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            counts.not_sent.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let pool = pool.clone();
        let counts = counts.clone();
        let number = ticks;
        tokio::spawn(async move {
            let _permit = permit;
            let pooled = pool.lock().unwrap().pop();
            let mut connection = match pooled {
                Some(connection) => connection,
                None => match Connection::open_nodelay(Proto::Http1, port).await {
                    Ok(connection) => connection,
                    Err(error) => {
                        eprintln!("connecting failed: {error}");
                        counts.errors.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                },
            };
            counts.sent.fetch_add(1, Ordering::Relaxed);
            let sent_at = Instant::now();
            let request = Request::post(&format!("/soak/{number}"), "{\"soak\":true}");
            let result = tokio::time::timeout(Duration::from_secs(10), connection.send(request))
                .await
                .unwrap_or_else(|_| Err("timed out after 10 s".to_owned()));
            let latency = sent_at.elapsed();
            match result {
                Ok(response) if (200..300).contains(&response.status) => {
                    counts.responses_2xx.fetch_add(1, Ordering::Relaxed);
                    counts.latencies.lock().unwrap().push(latency);
                    pool.lock().unwrap().push(connection);
                }
                Ok(response) => {
                    eprintln!("request {number}: status {}", response.status);
                    counts.responses_other.fetch_add(1, Ordering::Relaxed);
                }
                Err(error) => {
                    eprintln!("request {number} failed: {error}");
                    counts.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }

    // Every permit back means every spawned request has ended.
    let all = u32::try_from(MAX_CLIENT_IN_FLIGHT).unwrap();
    tokio::time::timeout(Duration::from_secs(30), permits.acquire_many(all))
        .await
        .expect("timed out: client requests still running 30 s after the phase ended")
        .unwrap()
        .forget();
    match warm {
        Some(sample) => sample,
        None => sample_memory(envoy, started).await,
    }
}

/// Sums every outcome and skip of the rule's targets.
fn settled(counters: &BTreeMap<String, u64>) -> u64 {
    counters
        .iter()
        .filter(|(name, _)| name.starts_with(RULE_PREFIX))
        .filter(|(name, _)| name.ends_with(".side_calls") || name.ends_with(".skipped"))
        .map(|(_, value)| value)
        .sum()
}

/// Waits until outcomes and skips equal matched requests (one target), and
/// returns the counters of the rule at that moment.
async fn wait_settled(envoy: &Envoy) -> BTreeMap<String, u64> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let counters = envoy.counters_matching(RULE_PREFIX).await;
        let matched = counters.get(MATCHED).copied().unwrap_or(0);
        if settled(&counters) == matched {
            return counters;
        }
        assert!(
            Instant::now() < deadline,
            "{matched} matched but {} outcomes and skips after {SETTLE_TIMEOUT:?}: {counters:#?}",
            settled(&counters)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Prints the non-zero differences between two counter snapshots.
fn print_deltas(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) {
    for (name, value) in after {
        let delta = value - before.get(name).copied().unwrap_or(0);
        if delta > 0 {
            println!("      {} +{delta}", name.trim_start_matches(RULE_PREFIX));
        }
    }
}

/// Returns Envoy's counters that explain failed primary requests: the
/// listener's 5xx and connections closed with requests active, and the
/// `primary` cluster's timeouts, overflows, resets and connection failures.
async fn primary_failure_counters(envoy: &Envoy) -> BTreeMap<String, u64> {
    const CAUSES: [&str; 6] = ["timeout", "overflow", "reset", "fail", "5xx", "active_rq"];
    let mut counters = envoy.counters().await;
    counters.retain(|name, _| {
        let scoped = name.starts_with("cluster.primary.") || name.starts_with("http.ingress_http.");
        scoped && CAUSES.iter().any(|cause| name.contains(cause))
    });
    counters
}

struct PhaseReport {
    name: &'static str,
    start: MemorySample,
    warm: MemorySample,
    end: MemorySample,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: minutes long; run with `make soak`"]
async fn soak_slow_then_dead_side() {
    let seconds = env_u64("SOAK_SECONDS", DEFAULT_SECONDS);
    let rate = env_u64("SOAK_RATE", DEFAULT_RATE);
    assert!(
        seconds >= 2 && rate >= 1,
        "use SOAK_SECONDS >= 2 and SOAK_RATE >= 1"
    );
    let phase_duration = Duration::from_secs(seconds / 2);

    let primary = Upstream::start(Behaviour {
        status: 201,
        ..Behaviour::default()
    })
    .await;
    let side = Upstream::start(Behaviour {
        delay: SLOW_DELAY,
        ..Behaviour::default()
    })
    .await;
    let mut envoy = Envoy::start(
        EnvoyConfig::new(primary.port())
            .target("side", side.port(), Proto::Http1)
            .plugin_config(plugin()),
    )
    .await;
    let (_, version) = envoy.admin_get("/server_info").await.unwrap();
    let version = serde_json::from_str::<serde_json::Value>(&version)
        .ok()
        .and_then(|info| info["version"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned());
    println!(
        "soak: {seconds} s at {rate} req/s; Envoy {version} (pid {}, --concurrency 2); \
         side delay {SLOW_DELAY:?}, timeout {SIDE_TIMEOUT_MS} ms",
        envoy.pid()
    );
    println!(
        "machine: {} CPUs, load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );

    let started = Instant::now();
    let mut side = Some(side);
    let mut reports = Vec::new();
    let mut total_sent = 0;
    let mut before = envoy.counters_matching(RULE_PREFIX).await;
    let mut failures_before = primary_failure_counters(&envoy).await;
    for name in ["slow", "dead"] {
        if name == "dead" {
            // Dropping the upstream closes its port, so every later call
            // has its connection refused.
            let port = side.as_ref().map(Upstream::port);
            drop(side.take());
            println!("side upstream on port {port:?} stopped");
        }
        let start = sample_memory(&envoy, started).await;
        println!("phase {name}: {} s", phase_duration.as_secs());
        println!("{}", describe("start", &start));

        let counts = Arc::new(ClientCounts::default());
        let warm = run_load(&envoy, rate, phase_duration, counts.clone(), started).await;
        let after = wait_settled(&envoy).await;
        let end = sample_memory(&envoy, started).await;
        println!("{}", describe("end", &end));

        let sent = counts.sent.load(Ordering::Relaxed);
        let ok = counts.responses_2xx.load(Ordering::Relaxed);
        let other = counts.responses_other.load(Ordering::Relaxed);
        let errors = counts.errors.load(Ordering::Relaxed);
        let not_sent = counts.not_sent.load(Ordering::Relaxed);
        let mut latencies = counts.latencies.lock().unwrap().clone();
        latencies.sort();
        let matched =
            after.get(MATCHED).copied().unwrap_or(0) - before.get(MATCHED).copied().unwrap_or(0);
        let ended = settled(&after) - settled(&before);
        println!(
            "  client: sent {sent}, 2xx {ok}, other status {other}, errors {errors}, \
             not sent (client saturated) {not_sent}; achieved {:.1} req/s; latency p50 {:?}, \
             p99 {:?}, max {:?}",
            sent as f64 / phase_duration.as_secs_f64(),
            percentile(&latencies, 50.0),
            percentile(&latencies, 99.0),
            latencies.last().copied().unwrap_or_default()
        );
        println!("  envoy: matched {matched}, outcomes and skips {ended}");
        print_deltas(&before, &after);
        let failures = primary_failure_counters(&envoy).await;
        println!("  envoy counters that explain failed primary requests:");
        print_deltas(&failures_before, &failures);

        assert_eq!(errors, 0, "phase {name}: failed requests");
        assert_eq!(ok + other, sent, "phase {name}: requests sent == responses");
        assert_eq!(other, 0, "phase {name}: non-2xx responses");
        assert_eq!(matched, sent, "phase {name}: matched == requests sent");
        assert_eq!(
            ended, matched,
            "phase {name}: matched x 1 target == outcomes + skips"
        );
        total_sent += sent;
        before = after;
        failures_before = failures;
        reports.push(PhaseReport {
            name,
            start,
            warm,
            end,
        });
    }

    assert_eq!(
        primary.count() as u64,
        total_sent,
        "the primary got every request"
    );
    let gauges = envoy.gauges().await;
    assert_eq!(gauges.get(IN_FLIGHT).copied(), Some(0));
    assert_eq!(envoy.exit_status().unwrap(), None, "Envoy is still running");

    println!("summary (KiB):");
    println!("| phase | RSS start | RSS warm | RSS end | end - warm | Wasm memory warm | Wasm memory end |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for report in &reports {
        println!(
            "| {} | {} | {} | {} | {:+} | {} | {} |",
            report.name,
            report.start.rss_kib,
            report.warm.rss_kib,
            report.end.rss_kib,
            report.end.rss_kib as i64 - report.warm.rss_kib as i64,
            report.warm.wasm.size_kib,
            report.end.wasm.size_kib
        );
    }
    println!(
        "load average at the end: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
}
