//! Host clock readings in nanoseconds since the Unix epoch.

use std::time::UNIX_EPOCH;

use proxy_wasm::hostcalls;

/// Returns `None` when the host clock cannot be read, so callers skip a
/// latency sample instead of recording a wrong one.
pub fn now_ns() -> Option<u64> {
    let now = hostcalls::get_current_time().ok()?;
    let since_epoch = now.duration_since(UNIX_EPOCH).ok()?;
    u64::try_from(since_epoch.as_nanos()).ok()
}
