//! Shared harness for integration tests that run the filter in a real Envoy.
//!
//! Each test file includes it with `mod support;`. The Envoy process
//! handling, the clients, the stats readers and the upstream live in
//! examples/support/, because `make demo` (examples/demo.rs) uses them too.

// Each test crate uses a different subset of the harness and its re-exports.
#![allow(dead_code, unused_imports)]

#[path = "../../examples/support/client.rs"]
pub mod client;
pub mod config;
#[path = "../../examples/support/envoy.rs"]
pub mod envoy;
pub mod fault;
pub mod plugin;
#[path = "../../examples/support/stats.rs"]
pub mod stats;
#[path = "../../examples/support/upstream.rs"]
pub mod upstream;

pub use client::{send, send_concurrent, Body, Proto, Request, Response};
pub use config::{EnvoyConfig, FailurePolicy, STATS_TAGS_YAML};
pub use envoy::{envoy_bin, free_port, wasm_path, Envoy};
pub use fault::{fault_wasm_path, FAULT_HEADER, FAULT_PANIC};
pub use upstream::{Behaviour, RecordedRequest, Upstream};
