//! Runs one Envoy process per test and talks to its admin endpoint.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::client::{send, Request};
use super::{envoy_bin, EnvoyConfig, Proto};

/// Limit for Envoy to load the bootstrap and the wasm module and report ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Limit for one admin request, so a hung admin endpoint cannot stall a poll loop.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Log lines shown when Envoy fails to start.
const LOG_TAIL_LINES: usize = 60;

/// A running Envoy. Dropping it kills the process and waits for it, also
/// while a test panics. Its temp dir (bootstrap and `envoy.log`) is removed
/// after a passing test and kept, with its path printed, after a panic.
pub struct Envoy {
    child: Child,
    dir: PathBuf,
    port: u16,
    admin_port: u16,
}

impl Envoy {
    /// Writes `config` to a new temp dir, starts Envoy on it and waits until
    /// admin `/ready` returns 200.
    ///
    /// Panics with the tail of the Envoy log if Envoy exits or is not ready
    /// within 20 s.
    pub async fn start(config: EnvoyConfig) -> Envoy {
        // Both panic on a missing binary or module, before any file is written.
        let bin = envoy_bin();
        let yaml = config.to_yaml();

        let dir = unique_temp_dir();
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("creating {} failed: {e}", dir.display()));
        let config_path = dir.join("envoy.yaml");
        std::fs::write(&config_path, yaml)
            .unwrap_or_else(|e| panic!("writing {} failed: {e}", config_path.display()));

        let log_path = dir.join("envoy.log");
        let log = File::create(&log_path)
            .unwrap_or_else(|e| panic!("creating {} failed: {e}", log_path.display()));
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&config_path)
            .args(["--concurrency", "2", "--disable-hot-restart", "-l", "info"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning the log file handle failed"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} failed: {e}", bin.display()));

        // From here on, Drop kills the process if waiting panics.
        let mut envoy = Envoy {
            child,
            dir,
            port: config.port(),
            admin_port: config.admin_port(),
        };
        envoy.wait_until_ready().await;
        envoy
    }

    async fn wait_until_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .expect("polling the Envoy process failed")
            {
                panic!(
                    "Envoy exited with {status} before it was ready. Last log lines:\n{}",
                    self.log_tail(LOG_TAIL_LINES)
                );
            }
            if let Ok((200, _)) = self.admin_get("/ready").await {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "Envoy was not ready within {READY_TIMEOUT:?} (admin port {}). \
                     Last log lines:\n{}",
                    self.admin_port,
                    self.log_tail(LOG_TAIL_LINES)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Listener port for client traffic.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Temp dir with `envoy.yaml` and `envoy.log`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Returns Envoy's stdout and stderr so far.
    pub fn log_text(&self) -> String {
        let path = self.dir.join("envoy.log");
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {} failed: {e}", path.display()))
    }

    /// Returns the last `lines` lines of `log_text()`.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Sends `GET path` to the admin endpoint and returns status and body.
    pub async fn admin_get(&self, path: &str) -> Result<(u16, String), String> {
        let exchange = send(Proto::Http1, self.admin_port, Request::get(path));
        let response = tokio::time::timeout(ADMIN_TIMEOUT, exchange)
            .await
            .map_err(|_| format!("admin GET {path} timed out after {ADMIN_TIMEOUT:?}"))??;
        let body = String::from_utf8_lossy(&response.body).into_owned();
        Ok((response.status, body))
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        // Child::kill sends SIGKILL to this PID only. Errors mean the process is already gone.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("Envoy files kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn unique_temp_dir() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let name = format!(
        "mesh-fanout-envoy-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    std::env::temp_dir().join(name)
}
