//! Harness shared by the demo and the integration tests: Envoy process
//! handling, HTTP/1.1 and h2c clients, stats readers and an in-process
//! upstream.
//!
//! examples/demo.rs includes it with `mod support;`. tests/support/mod.rs
//! includes the same files one by one with `#[path]` and adds the tests'
//! bootstrap builder, so both see these modules under the same names.

// The demo uses a subset of the harness.
#![allow(dead_code)]

pub mod client;
pub mod envoy;
pub mod stats;
pub mod upstream;
