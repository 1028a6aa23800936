//! The minimum work a proxy-wasm HTTP filter can do, for `make bench` to
//! measure as the floor under mesh-fanout's figures.
//!
//! With an empty configuration, every callback returns `Continue`
//! (scenario 0): the cost of a Rust proxy-wasm filter in Envoy's V8 runtime
//! before it does any work.
//!
//! With `{"side_cluster": "NAME"}`, each request's headers are copied once
//! and sent as a side call to that cluster from the request's callback
//! (scenario 0-dispatch). There is no matching, no handoff, no stats, and
//! nothing is read from the response, so this is the cheapest side call
//! proxy-wasm offers. The call is made as the root context, so Envoy does
//! not cancel it when the request ends first. The SDK then delivers the
//! response to the request's context only while that context exists, so
//! this is no usable shadow: it loses the outcome of every call that
//! outlives its request.
//!
//! With `{"clock_reads": N}`, each request reads the
//! host clock N times (scenario 0-calls), which prices one host call.
//!
//! Build it with
//! `cargo build --release --target wasm32-wasip1 --example floor_filter`.

// Native builds (`cargo test --all-targets`) see an empty library.
#![cfg(target_arch = "wasm32")]

use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

struct FloorRoot {
    context_id: u32,
    side_cluster: Option<Rc<str>>,
    clock_reads: u64,
}

impl Context for FloorRoot {}

impl RootContext for FloorRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(&config) else {
            log::error!("floor_filter: the configuration is not JSON");
            return false;
        };
        self.side_cluster = value
            .get("side_cluster")
            .and_then(|cluster| cluster.as_str())
            .map(Rc::from);
        self.clock_reads = value
            .get("clock_reads")
            .and_then(|reads| reads.as_u64())
            .unwrap_or(0);
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(FloorStream {
            context_id,
            root_id: self.context_id,
            side_cluster: self.side_cluster.clone(),
            clock_reads: self.clock_reads,
        }))
    }
}

struct FloorStream {
    context_id: u32,
    root_id: u32,
    side_cluster: Option<Rc<str>>,
    clock_reads: u64,
}

impl Context for FloorStream {}

impl HttpContext for FloorStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        for _ in 0..self.clock_reads {
            if hostcalls::get_current_time().is_err() {
                break;
            }
        }
        let Some(cluster) = &self.side_cluster else {
            return Action::Continue;
        };
        // The benchmark's headers are ASCII; others would go out empty.
        let headers = self.get_http_request_headers_bytes();
        let pairs: Vec<(&str, &str)> = headers
            .iter()
            .map(|(name, value)| (name.as_str(), std::str::from_utf8(value).unwrap_or("")))
            .collect();
        if let Err(status) = hostcalls::set_effective_context(self.root_id) {
            log::warn!("floor_filter: switching to the root context failed: {status:?}");
            return Action::Continue;
        }
        let sent =
            hostcalls::dispatch_http_call(cluster, pairs, None, Vec::new(), Duration::from_secs(1));
        if let Err(status) = sent {
            log::warn!("floor_filter: dispatch to {cluster} failed: {status:?}");
        }
        if let Err(status) = hostcalls::set_effective_context(self.context_id) {
            log::warn!("floor_filter: switching back to the request's context failed: {status:?}");
        }
        Action::Continue
    }
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(FloorRoot {
            context_id,
            side_cluster: None,
            clock_reads: 0,
        })
    });
}}
