//! A proxy-wasm HTTP filter that does nothing: Envoy creates its context
//! and calls it for every request, and every callback returns `Continue`.
//!
//! `make bench` loads it as scenario 0 to measure what any Rust proxy-wasm
//! filter costs in Envoy's V8 runtime before it does any work, which is the
//! floor under every mesh-fanout figure. Build it with
//! `cargo build --release --target wasm32-wasip1 --example empty_filter`.

// Native builds (`cargo test --all-targets`) see an empty library.
#![cfg(target_arch = "wasm32")]

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::LogLevel;

struct Empty;

impl Context for Empty {}

impl HttpContext for Empty {}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Empty) });
}}
