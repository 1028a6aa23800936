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
//! With `{"side_cluster": "NAME", "handoff": true}`, the request's context
//! moves the header copy to a per-worker queue and wakes the root through
//! a proxy-wasm shared queue. The root then dispatches the call (scenario
//! 0-handoff). The SDK delivers a response to the context that was running
//! when the call was dispatched, whatever the host's effective context, so
//! this is the cheapest side call whose outcome survives the request. It is
//! the route mesh-fanout takes.
//!
//! With `{"clock_reads": N}`, each request reads the
//! host clock N times (scenario 0-calls), which prices one host call.
//!
//! Build it with
//! `cargo build --release --target wasm32-wasip1 --example floor_filter`.

// Native builds (`cargo test --all-targets`) see an empty library.
#![cfg(target_arch = "wasm32")]

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

type Headers = Vec<(String, Vec<u8>)>;

/// The per-worker queue of scenario 0-handoff, shared by the root and the
/// request contexts of one VM.
#[derive(Default)]
struct Handoff {
    queue_id: Cell<Option<u32>>,
    pending: RefCell<Vec<Headers>>,
    wake_pending: Cell<bool>,
}

struct FloorRoot {
    context_id: u32,
    side_cluster: Option<Rc<str>>,
    clock_reads: u64,
    handoff: Option<Rc<Handoff>>,
}

impl FloorRoot {
    fn register_handoff(&mut self) {
        // Queue names are global to the Envoy process, and a second
        // registration of a name takes its wake-ups from the first, so
        // each root picks its own.
        let nanos = hostcalls::get_current_time()
            .ok()
            .and_then(|now| now.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |since| since.as_nanos());
        let name = format!("floor_filter.handoff.{}.{nanos}", self.context_id);
        match hostcalls::register_shared_queue(&name) {
            Ok(queue_id) => {
                let handoff = Handoff::default();
                handoff.queue_id.set(Some(queue_id));
                self.handoff = Some(Rc::new(handoff));
            }
            Err(status) => log::warn!("floor_filter: registering {name} failed: {status:?}"),
        }
    }
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
        let handoff = value.get("handoff").and_then(serde_json::Value::as_bool);
        if handoff == Some(true) && self.handoff.is_none() {
            self.register_handoff();
        }
        true
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        let (Some(handoff), Some(cluster)) = (&self.handoff, &self.side_cluster) else {
            return;
        };
        // One message per wake-up, as the streams enqueue one only when
        // none is pending.
        if let Err(status) = hostcalls::dequeue_shared_queue(queue_id) {
            log::warn!("floor_filter: dequeuing from {queue_id} failed: {status:?}");
        }
        handoff.wake_pending.set(false);
        let pending = std::mem::take(&mut *handoff.pending.borrow_mut());
        // This runs as the root, so the SDK delivers each response here.
        for headers in &pending {
            dispatch(cluster, headers);
        }
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
            handoff: self.handoff.clone(),
        }))
    }
}

struct FloorStream {
    context_id: u32,
    root_id: u32,
    side_cluster: Option<Rc<str>>,
    clock_reads: u64,
    handoff: Option<Rc<Handoff>>,
}

impl FloorStream {
    fn hand_off(handoff: &Handoff, headers: Headers) {
        handoff.pending.borrow_mut().push(headers);
        if handoff.wake_pending.get() {
            return;
        }
        let Some(queue_id) = handoff.queue_id.get() else {
            return;
        };
        match hostcalls::enqueue_shared_queue(queue_id, None) {
            Ok(()) => handoff.wake_pending.set(true),
            Err(status) => log::warn!("floor_filter: waking the root failed: {status:?}"),
        }
    }

    fn dispatch_as_root(&self, cluster: &str, headers: &Headers) {
        if let Err(status) = hostcalls::set_effective_context(self.root_id) {
            log::warn!("floor_filter: switching to the root context failed: {status:?}");
            return;
        }
        dispatch(cluster, headers);
        if let Err(status) = hostcalls::set_effective_context(self.context_id) {
            log::warn!("floor_filter: switching back to the request's context failed: {status:?}");
        }
    }
}

fn dispatch(cluster: &str, headers: &Headers) {
    // The benchmark's headers are ASCII; others would go out empty.
    let pairs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(name, value)| (name.as_str(), std::str::from_utf8(value).unwrap_or("")))
        .collect();
    let sent =
        hostcalls::dispatch_http_call(cluster, pairs, None, Vec::new(), Duration::from_secs(1));
    if let Err(status) = sent {
        log::warn!("floor_filter: dispatch to {cluster} failed: {status:?}");
    }
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
        let headers = self.get_http_request_headers_bytes();
        match &self.handoff {
            Some(handoff) => Self::hand_off(handoff, headers),
            None => self.dispatch_as_root(cluster, &headers),
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
            handoff: None,
        })
    });
}}
