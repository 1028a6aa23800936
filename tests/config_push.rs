//! Plugin configuration pushed to a running Envoy through file-based LDS,
//! while side calls are in flight, and a push of a configuration of
//! several MB.
//!
//! An LDS update that changes only the filter chain's contents is applied
//! in place: new connections get the new chain at once, and Envoy drains
//! the old chain, with its plugin, for `--drain-time-s`. The tests set it
//! to 1 s, so the old plugin retires while its side calls still run.

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use support::{send, send_concurrent, Behaviour, Envoy, EnvoyConfig, Proto, Request, Upstream};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(15);
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Envoy's `--drain-time-s` in these tests.
const DRAIN_TIME_S: u64 = 1;

/// Logged by the filter's root context each time it loads a configuration.
const CONFIGURED_LOG: &str = "mesh-fanout configured";
const RETIRING_LOG: &str = "plugin retiring with ";
const RETIRED_LOG: &str = "last side call finished; plugin retired";

const LDS_UPDATES: &str = "listener_manager.lds.update_success";
const LDS_REJECTED: &str = "listener_manager.lds.update_rejected";
const CHAINS_DRAINING: &str = "listener_manager.total_filter_chains_draining";

/// A directory under the system temp dir, removed on drop unless the test
/// panicked.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = std::env::temp_dir().join(format!(
            "mesh-fanout-{label}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating {} failed: {e}", path.display()));
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("LDS files kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn created() -> Behaviour {
    Behaviour {
        status: 201,
        body: Bytes::from_static(b"created"),
        ..Behaviour::default()
    }
}

fn stat(rule: &str, tail: &str) -> String {
    format!("wasmcustom.mesh_fanout.rule.{rule}.{tail}")
}

/// Sums the outcomes and skips of one target; once all its calls are done
/// this equals the rule's matched requests.
async fn settled(envoy: &Envoy, rule: &str, target: &str) -> u64 {
    envoy
        .counters_matching(&stat(rule, &format!("target.{target}.")))
        .await
        .iter()
        .filter(|(name, _)| name.ends_with(".side_calls") || name.ends_with(".skipped"))
        .map(|(_, value)| value)
        .sum()
}

async fn wait_settled(envoy: &Envoy, rule: &str, target: &str, expected: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = settled(envoy, rule, target).await;
        if now == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{rule}/{target}: {now} outcomes and skips, expected {expected}; counters: {:#?}",
            envoy.counters_matching("wasmcustom.").await
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

async fn gauge(envoy: &Envoy, name: &str) -> Option<u64> {
    envoy.gauges().await.get(name).copied()
}

/// Reads one counter or gauge with a filtered admin `/stats` request, which
/// stays fast with hundreds of thousands of stats. Returns `None` while the
/// stat does not exist or the admin request fails.
async fn admin_stat(envoy: &Envoy, name: &str) -> Option<u64> {
    let escaped = name.replace('.', "\\.");
    let (status, text) = envoy
        .admin_get(&format!("/stats?filter=^{escaped}$"))
        .await
        .ok()?;
    if status != 200 {
        return None;
    }
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name}: ")))
        .and_then(|value| value.trim().parse().ok())
}

/// Returns the side call counts of every "plugin retiring with N side
/// calls in flight" line.
fn retiring_counts(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|line| line.split(RETIRING_LOG).nth(1))
        .map(|rest| {
            rest.split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("unparsable retiring line: {rest}"))
        })
        .collect()
}

/// Pushes `config` through LDS and waits until Envoy accepted it and every
/// worker serves new connections with the new filter chain, for at most
/// `timeout`.
///
/// Envoy starts draining the old chain only after all workers run the new
/// one, so the drain gauge, or the old plugin's retirement after the drain,
/// shows that the switch is complete. Admin requests that fail are retried:
/// the main thread, which serves them, also loads the new plugin.
async fn push(envoy: &Envoy, config: &EnvoyConfig, updates_before: u64, timeout: Duration) {
    let retiring_before = envoy.log_text().matches(RETIRING_LOG).count();
    config.write_lds().unwrap();
    let deadline = Instant::now() + timeout;
    loop {
        let rejected = admin_stat(envoy, LDS_REJECTED).await;
        assert!(
            rejected.unwrap_or(0) == 0,
            "Envoy rejected the LDS update; last log lines:\n{}",
            envoy.log_tail(20)
        );
        let updates = admin_stat(envoy, LDS_UPDATES).await;
        let draining = admin_stat(envoy, CHAINS_DRAINING).await.unwrap_or(0);
        let retiring = envoy.log_text().matches(RETIRING_LOG).count();
        let accepted = updates.unwrap_or(0) > updates_before;
        if accepted && (draining > 0 || retiring > retiring_before) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the workers did not switch to the new filter chain within {timeout:?} \
             ({LDS_UPDATES}: {updates:?}); last log lines:\n{}",
            envoy.log_tail(20)
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_while_side_calls_in_flight() {
    const BEFORE: u64 = 20;
    const AFTER: u64 = 20;
    let lds = TempDir::new("lds");
    let primary = Upstream::start(created()).await;
    // Slower than the drain, so the old plugin retires with all of its
    // calls in flight.
    let slow = Upstream::start(Behaviour {
        delay: Duration::from_millis(3000),
        ..Behaviour::default()
    })
    .await;
    let fast = Upstream::start(Behaviour::default()).await;
    let base = EnvoyConfig::new(primary.port())
        .target("slow", slow.port(), Proto::Http1)
        .target("fast", fast.port(), Proto::Http2)
        .listener_via_lds(lds.path())
        .drain_time_s(DRAIN_TIME_S);
    let old = base.clone().plugin_config(
        r#"{"rules": [{"name": "signup", "match": {"path": {"prefix": "/api"}},
            "targets": [{"name": "slow", "cluster": "slow", "timeout_ms": 10000}]}]}"#,
    );
    let new = base.plugin_config(
        r#"{"rules": [
            {"name": "orders", "match": {"path": {"prefix": "/orders"}},
             "targets": [{"name": "fast", "cluster": "fast"}]},
            {"name": "signup_v2", "match": {"path": {"prefix": "/api"}},
             "targets": [{"name": "slow", "cluster": "slow", "timeout_ms": 10000},
                         {"name": "fast", "cluster": "fast"}]}]}"#,
    );
    let mut envoy = Envoy::start(old).await;

    let results = send_concurrent(Proto::Http1, envoy.port(), 4, 5, WAIT, |c, i| {
        Request::post(&format!("/api/before/{c}/{i}"), "x")
    })
    .await;
    assert_eq!(results.len() as u64, BEFORE);
    for result in &results {
        assert_eq!(result.as_ref().map(|r| r.status), Ok(201));
    }
    envoy
        .wait_for_counter(&stat("signup", "target.slow.dispatched"), BEFORE, WAIT)
        .await
        .unwrap();
    assert_eq!(
        gauge(&envoy, &stat("signup", "target.slow.in_flight")).await,
        Some(BEFORE),
        "all calls are in flight at the push"
    );

    push(&envoy, &new, 1, WAIT).await;
    let results = send_concurrent(Proto::Http2, envoy.port(), 4, 5, WAIT, |c, i| {
        Request::post(&format!("/api/after/{c}/{i}"), "y")
    })
    .await;
    assert_eq!(results.len() as u64, AFTER);
    for result in &results {
        assert_eq!(result.as_ref().map(|r| r.status), Ok(201));
    }
    let orders = send(Proto::Http1, envoy.port(), Request::post("/orders/1", "z"))
        .await
        .unwrap();
    assert_eq!(orders.status, 201);

    // The calls started before the push finish in the retired plugin and
    // keep their rule's names.
    wait_settled(&envoy, "signup", "slow", BEFORE).await;
    wait_settled(&envoy, "signup_v2", "slow", AFTER).await;
    wait_settled(&envoy, "signup_v2", "fast", AFTER).await;
    wait_settled(&envoy, "orders", "fast", 1).await;
    let counters = envoy.counters().await;
    let count = |name: String| counters.get(&name).copied().unwrap_or(0);
    assert_eq!(count(stat("signup", "matched")), BEFORE);
    assert_eq!(
        count(stat("signup", "target.slow.outcome.success.side_calls")),
        BEFORE
    );
    assert_eq!(count(stat("signup_v2", "matched")), AFTER);
    assert_eq!(
        count(stat("signup_v2", "target.slow.outcome.success.side_calls")),
        AFTER
    );
    assert_eq!(
        count(stat("signup_v2", "target.fast.outcome.success.side_calls")),
        AFTER
    );
    assert_eq!(count(stat("orders", "matched")), 1);
    assert_eq!(count(LDS_REJECTED.to_owned()), 0);
    for (rule, target) in [
        ("signup", "slow"),
        ("signup_v2", "slow"),
        ("signup_v2", "fast"),
        ("orders", "fast"),
    ] {
        assert_eq!(
            gauge(&envoy, &stat(rule, &format!("target.{target}.in_flight"))).await,
            Some(0),
            "{rule}/{target}"
        );
    }
    assert_eq!(slow.count() as u64, BEFORE + AFTER);
    assert_eq!(fast.count() as u64, AFTER + 1);
    assert_eq!(primary.count() as u64, BEFORE + AFTER + 1);

    // Each old root context with calls in flight logs once when Envoy
    // retires it and once when its last call ends.
    let log = envoy.log_text();
    let retiring = retiring_counts(&log);
    assert_eq!(
        retiring.iter().sum::<u64>(),
        BEFORE,
        "in-flight calls in the retiring lines: {retiring:?}"
    );
    assert_eq!(log.matches(RETIRED_LOG).count(), retiring.len());
    assert!(
        !log.contains("response for unknown side call token"),
        "a response reached a root context that did not dispatch it"
    );
    assert_eq!(envoy.exit_status().unwrap(), None, "Envoy is still running");
    assert_eq!(envoy.admin_get("/ready").await.unwrap().0, 200);
}

/// Builds a configuration of `rules` rules, each matching one exact path
/// and shadowing it to cluster `fast`. A long header value set on each
/// target makes 1,000 rules (the most targets the filter accepts) weigh over 3 MB.
fn bulk_config(rules: usize) -> String {
    let padding = "p".repeat(3000);
    let mut json = String::from(r#"{"rules": ["#);
    for i in 0..rules {
        if i > 0 {
            json.push(',');
        }
        json.push_str(&format!(
            r#"{{"name": "bulk_{i:04}", "match": {{"methods": ["POST"], "path": {{"exact": "/bulk/{i}"}},
                "headers": [{{"name": "x-skip-shadow", "present": false}}]}},
               "targets": [{{"name": "fast", "cluster": "fast", "timeout_ms": 2000,
                             "headers": {{"set": {{"x-pad": "{padding}"}}}}}}]}}"#
        ));
    }
    json.push_str("]}");
    json
}

/// One request sent during a push.
struct ProbeSample {
    /// When the request was sent, counted from the probe's start.
    sent_after: Duration,
    latency: Duration,
    status: u16,
}

/// Sends requests one at a time, each on a new connection so that the
/// drain of the old filter chain closes none of them, every 10 ms, until
/// `stop` is set or `max_requests` are sent.
async fn probe_latency(port: u16, stop: Arc<AtomicBool>, max_requests: usize) -> Vec<ProbeSample> {
    let probe_started = Instant::now();
    let mut samples = Vec::new();
    while !stop.load(Ordering::Relaxed) && samples.len() < max_requests {
        let started = Instant::now();
        let response = send(Proto::Http1, port, Request::get("/unmatched"))
            .await
            .unwrap_or_else(|e| panic!("a request during the push failed: {e}"));
        samples.push(ProbeSample {
            sent_after: started - probe_started,
            latency: started.elapsed(),
            status: response.status,
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_config_push_loads() {
    const RULES: usize = 1_000;
    let lds = TempDir::new("lds");
    let primary = Upstream::start(created()).await;
    let fast = Upstream::start(Behaviour::default()).await;
    // Envoy's default drain time of 600 s keeps the old chain draining, and
    // the drain gauge that `push` polls raised, for the whole test.
    let base = EnvoyConfig::new(primary.port())
        .target("fast", fast.port(), Proto::Http1)
        .listener_via_lds(lds.path());
    let small = base.clone().plugin_config(bulk_config(1));
    let plugin = bulk_config(RULES);
    assert!(plugin.len() > 3_000_000, "{} bytes", plugin.len());
    let large = base.plugin_config(plugin.clone());
    let envoy = Envoy::start(small).await;
    // One line per root context: each worker's, and the main thread's.
    let root_contexts = envoy.log_text().matches(CONFIGURED_LOG).count();
    let rss_before = envoy.rss_kib().unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let probe = tokio::spawn(probe_latency(envoy.port(), stop.clone(), 20_000));
    let started = Instant::now();
    push(&envoy, &large, 1, Duration::from_secs(120)).await;
    let switched = started.elapsed();
    let loaded_line = format!("{CONFIGURED_LOG}: {RULES} rules, {RULES} targets");
    let deadline = Instant::now() + Duration::from_secs(120);
    while envoy.log_text().matches(&loaded_line).count() < root_contexts {
        assert!(
            Instant::now() < deadline,
            "the {RULES}-rule config was not configured in every root context within 120 s"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    let loaded = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let samples = probe.await.unwrap();

    let last = RULES - 1;
    let response = send(
        Proto::Http1,
        envoy.port(),
        Request::post(&format!("/bulk/{last}"), "x"),
    )
    .await
    .unwrap();
    assert_eq!(response.status, 201);
    let rule = format!("bulk_{last:04}");
    wait_settled(&envoy, &rule, "fast", 1).await;
    assert_eq!(envoy.counter(&stat(&rule, "matched")).await, 1);
    assert_eq!(fast.count(), 1);
    assert!(
        samples.iter().all(|sample| sample.status == 201),
        "every request during the push is served"
    );

    // NOTE: each root context defines 17 stats per target and one per
    // rule while it loads the configuration, on its thread's event loop,
    // so that thread serves nothing meanwhile. The printed max latency
    // shows it.
    let slowest = samples
        .iter()
        .max_by_key(|sample| sample.latency)
        .map(|sample| {
            format!(
                "{:?}, sent {:?} after the push",
                sample.latency, sample.sent_after
            )
        });
    eprintln!(
        "large config: {} bytes, {RULES} rules; accepted by every worker after {switched:?}, \
         configured in all {root_contexts} root contexts after {loaded:?}; \
         {} requests during the push, max latency {}; \
         Envoy RSS {rss_before} KiB before, {} KiB after",
        plugin.len(),
        samples.len(),
        slowest.unwrap_or_else(|| "none".to_owned()),
        envoy.rss_kib().unwrap()
    );
    // Envoy's timestamps show where the time went: the main thread's root
    // contexts load first, then each worker's.
    for line in envoy.log_text().lines() {
        if line.contains(&loaded_line) || line.contains("add/update listener") {
            eprintln!("{line}");
        }
    }
}
