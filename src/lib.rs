//! mesh-fanout: a proxy-wasm HTTP filter that shadows matched requests to
//! extra Envoy clusters.
//!
//! The crate has two halves, and the split is deliberate:
//! - [`core`] is plain Rust with no proxy-wasm calls: configuration parsing
//!   and validation, request matching, sampling, side request building,
//!   outcome classification and log rate limiting. It builds and is tested
//!   natively.
//! - `host` (compiled for `wasm32` only) is the thin adapter that reads
//!   headers and bodies from Envoy, dispatches side calls and records
//!   metrics. It is the only place that talks to the proxy-wasm SDK.
//!
//! A panic inside the filter kills the worker's Wasm VM, so non-test code
//! must not unwrap, expect, panic or index without a bounds check.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::unreachable,
        clippy::todo,
        clippy::unimplemented
    )
)]
#![deny(unsafe_code)]

pub mod core;

#[cfg(target_arch = "wasm32")]
mod host;
