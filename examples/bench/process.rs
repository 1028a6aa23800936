//! Child processes pinned to one CPU, and readers of /proc for their CPU
//! time and memory and for the machine (Linux only).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

/// PIDs of the running children, which the panic hook kills. The release
/// profile sets `panic = "abort"`, so no Drop runs after a panic.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Makes a panic kill every running child before the process aborts.
pub fn install_panic_hook() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let pids = match CHILDREN.lock() {
            Ok(mut pids) => std::mem::take(&mut *pids),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        for pid in pids {
            if let Ok(pid) = i32::try_from(pid) {
                // SAFETY: kill(2) takes no pointers. The PID belongs to a
                // child that `Pinned` has not reaped yet, because Drop
                // removes it from CHILDREN before it waits.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        default_hook(info);
    }));
}

/// A child process started through `taskset -c CPU`, which execs the
/// program, so `pid()` is the program's own PID. Dropping it kills that PID
/// and reaps it.
pub struct Pinned {
    child: Child,
    name: String,
}

impl Pinned {
    /// Starts `program` with `args` on `cpu`, or unpinned when `cpu` is None.
    pub fn spawn(
        name: &str,
        cpu: Option<usize>,
        program: &Path,
        args: &[String],
        stdout: Stdio,
        stderr: Stdio,
    ) -> Result<Pinned, String> {
        let mut command = match cpu {
            Some(cpu) => {
                let mut command = Command::new("taskset");
                command.arg("-c").arg(cpu.to_string()).arg(program);
                command
            }
            None => Command::new(program),
        };
        let child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("starting {name} ({}) failed: {e}", program.display()))?;
        lock_children().push(child.id());
        Ok(Pinned {
            child,
            name: name.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Returns an error naming the exit status if the process has exited.
    pub fn ensure_running(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!("{} exited with {status}", self.name)),
            Err(e) => Err(format!("polling {} failed: {e}", self.name)),
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let pid = self.child.id();
        lock_children().retain(|&p| p != pid);
        // Child::kill sends SIGKILL to this PID only; an error means it has exited.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lock_children() -> std::sync::MutexGuard<'static, Vec<u32>> {
    CHILDREN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Pins the calling process, and so every child it starts without
/// `taskset`, to `cpu`.
pub fn pin_self(cpu: usize) -> Result<(), String> {
    // SAFETY: cpu_set_t is plain data, so all zeroes is a valid empty set,
    // and sched_setaffinity only reads the set for its given size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(format!(
                "pinning the bench process to CPU {cpu} failed: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// Returns the number of online CPUs, which `nproc --all` prints.
pub fn online_cpus() -> usize {
    // SAFETY: sysconf takes no pointers.
    let count = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(count).unwrap_or(1).max(1)
}

/// Returns the user plus system CPU time of `pid` in seconds, from fields
/// 14 and 15 (utime, stime) of /proc/PID/stat.
pub fn cpu_seconds(pid: u32) -> Result<f64, String> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| format!("reading {path} failed: {e}"))?;
    // The command name in field 2 may contain spaces, so count fields after its ")".
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| format!("{path} has no \")\" after the command name"))?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // `fields[0]` is field 3 (state), so utime (14) is index 11 and stime (15) index 12.
    let parse = |index: usize, name: &str| -> Result<u64, String> {
        fields
            .get(index)
            .and_then(|value| value.parse().ok())
            .ok_or_else(|| format!("{path}: field {name} is missing or not a number"))
    };
    let ticks = parse(11, "utime")? + parse(12, "stime")?;
    // SAFETY: sysconf takes no pointers.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks_per_second <= 0 {
        return Err("sysconf(_SC_CLK_TCK) failed".to_owned());
    }
    Ok(ticks as f64 / ticks_per_second as f64)
}

/// Resident set size now and at its peak, in KiB.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Memory {
    pub rss_kib: u64,
    pub peak_rss_kib: u64,
}

/// Reads the `VmRSS` and `VmHWM` lines of /proc/PID/status.
pub fn memory(pid: u32) -> Result<Memory, String> {
    let path = format!("/proc/{pid}/status");
    let status =
        std::fs::read_to_string(&path).map_err(|e| format!("reading {path} failed: {e}"))?;
    let field = |name: &str| -> Result<u64, String> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|value| value.trim().strip_suffix("kB"))
            .and_then(|kib| kib.trim().parse().ok())
            .ok_or_else(|| format!("{path} has no {name} line in kB"))
    };
    Ok(Memory {
        rss_kib: field("VmRSS:")?,
        peak_rss_kib: field("VmHWM:")?,
    })
}

/// Returns the 1, 5 and 15 minute load averages from /proc/loadavg.
pub fn load_average() -> Result<[f64; 3], String> {
    let text = std::fs::read_to_string("/proc/loadavg")
        .map_err(|e| format!("reading /proc/loadavg failed: {e}"))?;
    let values: Vec<f64> = text
        .split_whitespace()
        .take(3)
        .filter_map(|value| value.parse().ok())
        .collect();
    match values[..] {
        [one, five, fifteen] => Ok([one, five, fifteen]),
        _ => Err(format!(
            "/proc/loadavg has no three load averages: {text:?}"
        )),
    }
}

/// Returns the first `model name` of /proc/cpuinfo, or "unknown".
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}
