//! One Envoy process per measured run: `--concurrency 1`, pinned to one
//! CPU, with its admin endpoint and its log.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::time::Instant;

use super::process::Pinned;
use super::support::envoy::{admin_get, last_lines};

/// Limit for Envoy to load the bootstrap and the .wasm and report ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const POLL_INTERVAL: Duration = Duration::from_millis(20);
const LOG_TAIL_LINES: usize = 30;
/// Envoy's default log format with microseconds (`%f`) instead of
/// milliseconds, so the VM start time has sub-millisecond resolution.
const LOG_FORMAT: &str = "[%Y-%m-%d %T.%f][%t][%l][%n] %v";

pub struct BenchEnvoy {
    process: Pinned,
    dir: PathBuf,
    admin_port: u16,
    /// From the spawn until admin `/ready` returned 200.
    pub ready_after: Duration,
}

impl BenchEnvoy {
    /// Writes `yaml` to `dir/envoy.yaml`, starts Envoy on it with one worker
    /// on `cpu` and waits until admin `/ready` returns 200.
    pub async fn start(
        bin: &Path,
        yaml: &str,
        dir: &Path,
        admin_port: u16,
        cpu: Option<usize>,
    ) -> Result<BenchEnvoy, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("creating {} failed: {e}", dir.display()))?;
        let config_path = dir.join("envoy.yaml");
        std::fs::write(&config_path, yaml)
            .map_err(|e| format!("writing {} failed: {e}", config_path.display()))?;
        let log_path = dir.join("envoy.log");
        let log = File::create(&log_path)
            .map_err(|e| format!("creating {} failed: {e}", log_path.display()))?;
        let log_for_stdout = log
            .try_clone()
            .map_err(|e| format!("cloning the handle of {} failed: {e}", log_path.display()))?;
        let args: Vec<String> = [
            "-c",
            &config_path.display().to_string(),
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "-l",
            "info",
            "--log-format",
            LOG_FORMAT,
        ]
        .iter()
        .map(|arg| arg.to_string())
        .collect();

        let spawned = Instant::now();
        let process = Pinned::spawn(
            "Envoy",
            cpu,
            bin,
            &args,
            Stdio::from(log_for_stdout),
            Stdio::from(log),
        )?;
        let mut envoy = BenchEnvoy {
            process,
            dir: dir.to_owned(),
            admin_port,
            ready_after: Duration::ZERO,
        };
        envoy.wait_until_ready(spawned).await?;
        Ok(envoy)
    }

    async fn wait_until_ready(&mut self, spawned: Instant) -> Result<(), String> {
        let deadline = spawned + READY_TIMEOUT;
        loop {
            if let Err(error) = self.process.ensure_running() {
                return Err(format!(
                    "{error} before it was ready; files in {}. Last log lines:\n{}",
                    self.dir.display(),
                    self.log_tail()
                ));
            }
            if matches!(self.admin_get("/ready").await, Ok((200, _))) {
                self.ready_after = spawned.elapsed();
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "Envoy was not ready within {READY_TIMEOUT:?}; files in {}. Last log lines:\n{}",
                    self.dir.display(),
                    self.log_tail()
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn ensure_running(&mut self) -> Result<(), String> {
        self.process.ensure_running().map_err(|error| {
            format!(
                "{error}; files in {}. Last log lines:\n{}",
                self.dir.display(),
                self.log_tail()
            )
        })
    }

    pub fn log_text(&self) -> String {
        std::fs::read(self.dir.join("envoy.log"))
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        last_lines(&self.log_text(), LOG_TAIL_LINES)
    }

    /// Sends `GET path` to the admin endpoint and returns status and body.
    pub async fn admin_get(&self, path: &str) -> Result<(u16, String), String> {
        admin_get(self.admin_port, path).await
    }

    /// Returns every counter and gauge by its full dotted name.
    pub async fn stats(&self) -> Result<BTreeMap<String, u64>, String> {
        let mut stats = BTreeMap::new();
        for path in ["/stats?type=Counters", "/stats?type=Gauges"] {
            let (status, body) = self.admin_get(path).await?;
            if status != 200 {
                return Err(format!("admin {path} returned {status}: {body}"));
            }
            stats.extend(body.lines().filter_map(|line| {
                let (name, value) = line.rsplit_once(": ")?;
                Some((name.to_owned(), value.trim().parse().ok()?))
            }));
        }
        Ok(stats)
    }
}

/// Startup times read from one Envoy log, in milliseconds.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct StartupTimes {
    /// From "loading N listener(s)" to the first "mesh-fanout configured"
    /// line: the main thread creates the V8 VM, compiles the module, and
    /// runs `on_vm_start` and `on_configure`. None without the filter.
    pub main_vm_ms: Option<f64>,
    /// From "starting workers" to the next "mesh-fanout configured" line:
    /// the worker's copy of the VM. None without the filter.
    pub worker_vm_ms: Option<f64>,
    /// From "loading N listener(s)" to "loading stats configuration", the
    /// whole listener setup, with or without the filter.
    pub listeners_ms: Option<f64>,
}

/// Reads the startup times from a log written with `LOG_FORMAT`.
pub fn startup_times(log: &str) -> StartupTimes {
    let mut listeners_start = None;
    let mut listeners_end = None;
    let mut workers_start = None;
    let mut configured = Vec::new();
    for line in log.lines() {
        let Some(seconds) = seconds_of_day(line) else {
            continue;
        };
        if line.contains("[config] loading ") && line.contains(" listener(s)") {
            listeners_start.get_or_insert(seconds);
        } else if line.contains("[config] loading stats configuration") {
            listeners_end.get_or_insert(seconds);
        } else if line.contains("starting workers") {
            workers_start.get_or_insert(seconds);
        } else if line.contains("mesh-fanout configured") {
            configured.push(seconds);
        }
    }
    let millis = |from: Option<f64>, to: Option<f64>| match (from, to) {
        (Some(from), Some(to)) if to >= from => Some((to - from) * 1000.0),
        _ => None,
    };
    let worker_configured =
        workers_start.and_then(|start| configured.iter().copied().find(|&time| time >= start));
    StartupTimes {
        main_vm_ms: millis(listeners_start, configured.first().copied()),
        worker_vm_ms: millis(workers_start, worker_configured),
        listeners_ms: millis(listeners_start, listeners_end),
    }
}

/// Parses the `HH:MM:SS.ffffff` of a `[YYYY-MM-DD HH:MM:SS.ffffff]` prefix
/// into seconds since midnight.
fn seconds_of_day(line: &str) -> Option<f64> {
    let stamp = line.strip_prefix('[')?.split(']').next()?;
    let time = stamp.split(' ').nth(1)?;
    let mut parts = time.split(':');
    let hours: f64 = parts.next()?.parse().ok()?;
    let minutes: f64 = parts.next()?.parse().ok()?;
    let seconds: f64 = parts.next()?.parse().ok()?;
    Some(hours * 3600.0 + minutes * 60.0 + seconds)
}
