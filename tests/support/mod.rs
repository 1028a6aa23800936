//! Shared harness for integration tests that run the filter in a real Envoy.
//!
//! Each test file includes it with `mod support;`.

// Each test crate uses a different subset of the harness and its re-exports.
#![allow(dead_code, unused_imports)]

pub mod client;
pub mod config;
pub mod envoy;
pub mod stats;
#[path = "../../examples/support/upstream.rs"]
pub mod upstream;

use std::net::TcpListener;
use std::path::PathBuf;

pub use client::{send, send_concurrent, Body, Request, Response};
pub use config::{EnvoyConfig, STATS_TAGS_YAML};
pub use envoy::Envoy;
pub use upstream::{Behaviour, RecordedRequest, Upstream};

/// HTTP version spoken on a connection. `Http2` is h2c with prior knowledge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Http1,
    Http2,
}

/// Returns a 127.0.0.1 port that was free when this function returned.
///
/// NOTE: another process can take the port before the caller binds it.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("binding 127.0.0.1:0 failed")
        .port()
}

/// Returns the Envoy binary: `$ENVOY_BIN`, else `<crate>/.venv/bin/envoy`.
pub fn envoy_bin() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/envoy");
    if let Some(path) = std::env::var_os("ENVOY_BIN") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "ENVOY_BIN is set to {}, but no file exists there. Point it at an Envoy \
             binary, or unset it to use {} (installed by `make envoy`)",
            path.display(),
            venv.display()
        );
        return path;
    }
    assert!(
        venv.is_file(),
        "Envoy not found: ENVOY_BIN is not set and {} does not exist; \
         run `make envoy` or set ENVOY_BIN to an Envoy binary",
        venv.display()
    );
    venv
}

/// Returns the release build of the filter, which `make build` produces.
pub fn wasm_path() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/wasm32-wasip1/release/mesh_fanout.wasm");
    assert!(
        path.is_file(),
        "filter module {} not found; run `make build` first",
        path.display()
    );
    path
}
