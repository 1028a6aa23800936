//! Runs one Envoy process per test or demo and talks to its admin endpoint.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::client::{send, Proto, Request};

/// Limit for Envoy to load the bootstrap and the wasm module and report ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Limit for one admin request, so a hung admin endpoint cannot stall a poll loop.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Log lines shown when Envoy fails to start.
const LOG_TAIL_LINES: usize = 60;

/// A running Envoy. Dropping it kills the process and waits for it, also
/// while a test panics. Its temp dir (bootstrap and `envoy.log`) is removed
/// after a passing test and kept, with its path printed, after a panic, a
/// failed start or a call to `keep_files`.
///
/// The integration tests start it from an `EnvoyConfig` with `Envoy::start`
/// (tests/support/config.rs).
///
/// NOTE: Drop does not run when a binary built with `panic = "abort"`
/// panics. This crate's release profile sets it, so an example run with
/// `--release` must kill `pid()` from a panic hook.
pub struct Envoy {
    child: Child,
    dir: PathBuf,
    port: u16,
    admin_port: u16,
    keep_files: bool,
}

impl Envoy {
    /// Writes the bootstrap `yaml` to a new temp dir, starts Envoy on it with
    /// `--concurrency 2 --disable-hot-restart` and waits until admin
    /// `/ready` returns 200.
    ///
    /// `port` and `admin_port` must be the listener and admin ports that
    /// `yaml` configures, because they are not read back from Envoy.
    ///
    /// Returns an error with the tail of the Envoy log if Envoy exits or is
    /// not ready within 20 s. The temp dir is then kept and its path printed.
    pub async fn start_from_yaml(yaml: &str, port: u16, admin_port: u16) -> Result<Envoy, String> {
        Envoy::start_from_yaml_with_args(yaml, port, admin_port, &[]).await
    }

    /// Works like `start_from_yaml`, and passes `extra_args` to Envoy after
    /// the fixed ones, for example `["--drain-time-s", "1"]`.
    pub async fn start_from_yaml_with_args(
        yaml: &str,
        port: u16,
        admin_port: u16,
        extra_args: &[String],
    ) -> Result<Envoy, String> {
        let bin = try_envoy_bin()?;

        let dir = unique_temp_dir();
        std::fs::create_dir_all(&dir)
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
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&config_path)
            .args(["--concurrency", "2", "--disable-hot-restart", "-l", "info"])
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(log_for_stdout)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {} failed: {e}", bin.display()))?;

        // From here on, Drop kills the process, also if waiting fails.
        let mut envoy = Envoy {
            child,
            dir,
            port,
            admin_port,
            keep_files: false,
        };
        if let Err(error) = envoy.wait_until_ready().await {
            envoy.keep_files();
            return Err(error);
        }
        Ok(envoy)
    }

    async fn wait_until_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.exit_status()? {
                return Err(format!(
                    "Envoy exited with {status} before it was ready. Last log lines:\n{}",
                    self.log_tail(LOG_TAIL_LINES)
                ));
            }
            if let Ok((200, _)) = self.admin_get("/ready").await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "Envoy was not ready within {READY_TIMEOUT:?} (admin port {}). \
                     Last log lines:\n{}",
                    self.admin_port,
                    self.log_tail(LOG_TAIL_LINES)
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Returns how Envoy exited, or `None` while it runs.
    pub fn exit_status(&mut self) -> Result<Option<ExitStatus>, String> {
        self.child
            .try_wait()
            .map_err(|e| format!("polling Envoy (pid {}) failed: {e}", self.child.id()))
    }

    /// Keeps the temp dir after Drop, which then prints its path.
    pub fn keep_files(&mut self) {
        self.keep_files = true;
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

    /// Returns Envoy's resident set size in KiB, the `VmRSS` line of
    /// `/proc/<pid>/status` (Linux only).
    pub fn rss_kib(&self) -> Result<u64, String> {
        let path = format!("/proc/{}/status", self.child.id());
        let status =
            std::fs::read_to_string(&path).map_err(|e| format!("reading {path} failed: {e}"))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().strip_suffix("kB"))
            .and_then(|kib| kib.trim().parse().ok())
            .ok_or_else(|| format!("{path} has no VmRSS line in kB"))
    }

    /// Estimates the linear memory of Envoy's V8 Wasm instances from
    /// `/proc/<pid>/smaps` (Linux only), because Envoy 1.40 has no stat for it.
    ///
    /// NOTE: this relies on how V8 lays out a Wasm memory on 64-bit Linux.
    /// It reserves several GiB of address space for each memory. The
    /// accessible pages at the start form their own `rw-p` mapping, and the
    /// rest stays `---p`. So each `---p` mapping of at least 4 GiB counts as
    /// one instance's guard region, and the `rw-p` mapping that ends where it
    /// starts as that instance's memory. Other runtimes or V8 versions may
    /// lay memory out differently.
    pub fn wasm_memory(&self) -> Result<WasmMemory, String> {
        let path = format!("/proc/{}/smaps", self.child.id());
        let smaps =
            std::fs::read_to_string(&path).map_err(|e| format!("reading {path} failed: {e}"))?;
        Ok(parse_wasm_memory(&smaps))
    }

    /// Temp dir with `envoy.yaml` and `envoy.log`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Returns Envoy's stdout and stderr so far. Bytes that are not UTF-8,
    /// which Envoy's crash backtrace can contain, become U+FFFD.
    pub fn log_text(&self) -> String {
        let path = self.dir.join("envoy.log");
        let bytes = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("reading {} failed: {e}", path.display()));
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Returns the last `lines` lines of `log_text()`.
    pub fn log_tail(&self, lines: usize) -> String {
        last_lines(&self.log_text(), lines)
    }

    /// Sends `GET path` to the admin endpoint and returns status and body.
    pub async fn admin_get(&self, path: &str) -> Result<(u16, String), String> {
        admin_get(self.admin_port, path).await
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        // Child::kill sends SIGKILL to this PID only. Errors mean the process is already gone.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.keep_files || std::thread::panicking() {
            eprintln!("Envoy files kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Linear memory of the Wasm instances in one Envoy process, as estimated
/// by `Envoy::wasm_memory`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WasmMemory {
    /// Number of instances (VMs) found.
    pub instances: usize,
    /// Total accessible linear memory, in KiB. Wasm memory only grows, so
    /// this never drops while the instances live.
    pub size_kib: u64,
    /// The part of `size_kib` that is resident, in KiB.
    pub rss_kib: u64,
}

/// One mapping of `/proc/<pid>/smaps`, with the fields `wasm_memory` reads.
struct Mapping {
    start: u64,
    end: u64,
    permissions: String,
    size_kib: u64,
    rss_kib: u64,
}

fn parse_wasm_memory(smaps: &str) -> WasmMemory {
    const GUARD_MIN_KIB: u64 = 4 * 1024 * 1024;
    let mut mappings: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
            {
                mappings.push(Mapping {
                    start,
                    end,
                    permissions: fields.next().unwrap_or_default().to_owned(),
                    size_kib: 0,
                    rss_kib: 0,
                });
                continue;
            }
        }
        let value = || {
            fields
                .clone()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        if let Some(mapping) = mappings.last_mut() {
            match first {
                "Size:" => mapping.size_kib = value(),
                "Rss:" => mapping.rss_kib = value(),
                _ => {}
            }
        }
    }

    let mut memory = WasmMemory::default();
    for guard in mappings
        .iter()
        .filter(|m| m.permissions == "---p" && m.size_kib >= GUARD_MIN_KIB)
    {
        let accessible = mappings
            .iter()
            .find(|m| m.end == guard.start && m.permissions == "rw-p");
        if let Some(accessible) = accessible {
            memory.instances += 1;
            memory.size_kib += accessible.size_kib;
            memory.rss_kib += accessible.rss_kib;
        }
    }
    memory
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

/// Returns the last `lines` lines of `text`.
pub fn last_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Sends `GET path` to the Envoy admin endpoint on `admin_port` and
/// returns status and body.
pub async fn admin_get(admin_port: u16, path: &str) -> Result<(u16, String), String> {
    let exchange = send(Proto::Http1, admin_port, Request::get(path));
    let response = tokio::time::timeout(ADMIN_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("admin GET {path} timed out after {ADMIN_TIMEOUT:?}"))??;
    let body = String::from_utf8_lossy(&response.body).into_owned();
    Ok((response.status, body))
}

/// Returns a 127.0.0.1 port that was free when this function returned and
/// that no earlier call in this process returned.
///
/// The kernel may hand the same ephemeral port to two calls once the first
/// listener is closed. Two Envoys of concurrent tests would then both bind
/// it, because Envoy listeners set SO_REUSEPORT, and split each other's
/// connections. So the ports handed out are remembered.
///
/// The port comes from below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`). Any outgoing connection or bind to
/// port 0 takes its port from that range, so none can take this port before
/// the caller binds it. With a port from the range, Envoy can fail to
/// start with "Address already in use".
///
/// NOTE: a process that binds a fixed port below the range can still take it.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<BTreeSet<u16>> = std::sync::Mutex::new(BTreeSet::new());
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let (first, end) = fixed_port_range();
    let span = u32::from(end - first);
    // Concurrent test processes start their scans at different ports.
    let seed = std::process::id().wrapping_mul(2_654_435_761) % span;
    for offset in 0..span {
        let port = first + u16::try_from((seed + offset) % span).unwrap_or(0);
        if handed_out.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.insert(port);
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 from {first} to {end}; stop what holds those ports");
}

/// Ports from 10000 up to the start of the kernel's ephemeral range.
fn fixed_port_range() -> (u16, u16) {
    const FIRST: u16 = 10_000;
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    assert!(
        ephemeral_start > FIRST + 1_000,
        "the ephemeral port range starts at {ephemeral_start}; free_port needs it above {}",
        FIRST + 1_000
    );
    (FIRST, ephemeral_start)
}

/// Returns the Envoy binary: `$ENVOY_BIN`, else `<crate>/.venv/bin/envoy`.
///
/// Panics with the fix if the file does not exist.
pub fn envoy_bin() -> PathBuf {
    try_envoy_bin().unwrap_or_else(|message| panic!("{message}"))
}

/// Works like `envoy_bin` but returns the error.
pub fn try_envoy_bin() -> Result<PathBuf, String> {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/envoy");
    if let Some(path) = std::env::var_os("ENVOY_BIN") {
        let path = PathBuf::from(path);
        if !path.is_file() {
            return Err(format!(
                "ENVOY_BIN is set to {}, but no file exists there. Point it at an Envoy \
                 binary, or unset it to use {} (installed by `make envoy`)",
                path.display(),
                venv.display()
            ));
        }
        return Ok(path);
    }
    if !venv.is_file() {
        return Err(format!(
            "Envoy not found: ENVOY_BIN is not set and {} does not exist; \
             run `make envoy` or set ENVOY_BIN to an Envoy binary",
            venv.display()
        ));
    }
    Ok(venv)
}

/// Returns the release build of the filter, which `make build` produces.
///
/// Panics with the fix if the file does not exist.
pub fn wasm_path() -> PathBuf {
    try_wasm_path().unwrap_or_else(|message| panic!("{message}"))
}

/// Works like `wasm_path` but returns the error.
pub fn try_wasm_path() -> Result<PathBuf, String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/wasm32-wasip1/release/mesh_fanout.wasm");
    if !path.is_file() {
        return Err(format!(
            "filter module {} not found; run `make build` first",
            path.display()
        ));
    }
    Ok(path)
}
