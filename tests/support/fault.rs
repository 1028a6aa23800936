//! The test-only build of the filter with the `fault-injection` feature,
//! in which a request with header `x-mesh-fanout-fault: panic` panics the VM.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The request header that makes the fault build panic, and its value.
pub const FAULT_HEADER: &str = "x-mesh-fanout-fault";
pub const FAULT_PANIC: &str = "panic";

/// Cargo's target dir for the fault build, kept apart from the release
/// build so the two never overwrite each other.
const FAULT_TARGET_DIR: &str = "target/fault";

/// Builds the fault module once per test process and returns its path.
///
/// Runs the same cargo command as `make build-fault`, which is a no-op when
/// the module is up to date, so the tests never load a stale module.
///
/// Panics with the cargo output and the `make build-fault` fix if the build
/// fails or produces no module.
pub fn fault_wasm_path() -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(build_fault_module)
        .clone()
        .unwrap_or_else(|message| panic!("{message}"))
}

fn build_fault_module() -> Result<PathBuf, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let path = root
        .join(FAULT_TARGET_DIR)
        .join("wasm32-wasip1/release/mesh_fanout.wasm");
    let fix = "run `make build-fault` (it needs the wasm32-wasip1 target: `make toolchain`)";
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(&cargo)
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip1",
            "--features",
            "fault-injection",
            "--target-dir",
            FAULT_TARGET_DIR,
        ])
        .output()
        .map_err(|e| format!("starting {cargo:?} to build the fault module failed: {e}; {fix}"))?;
    if !output.status.success() {
        return Err(format!(
            "building the fault module failed ({}); {fix}. Cargo output:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    if !path.is_file() {
        return Err(format!(
            "the fault build finished but {} does not exist; {fix}",
            path.display()
        ));
    }
    Ok(path)
}
