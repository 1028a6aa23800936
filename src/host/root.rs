//! The root context: one per worker VM. It owns the configuration, and it
//! dispatches every side call so that their responses reach it however
//! long after the request they arrive.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use log::{error, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, MapType};

use crate::core::config;
use crate::core::fanout::TargetResult;
use crate::core::outcome::{self, Outcome, ResponseSummary};

use super::abi;
use super::body::HeldBody;
use super::dispatch;
use super::fanout;
use super::metrics::Metrics;
use super::stream::Stream;
use super::time;
use super::worker::{Active, SideCall, Waiter, Worker};

/// A dispatched call waiting for its response.
struct InFlight {
    active: Rc<Active>,
    rule: usize,
    target: usize,
    request_id: Rc<str>,
    started_ns: Option<u64>,
    waiter: Option<Rc<RefCell<Waiter>>>,
}

pub struct Root {
    context_id: u32,
    worker: Rc<Worker>,
    active: Option<Rc<Active>>,
    in_flight: HashMap<u32, InFlight>,
    /// Envoy is retiring this plugin (a config push or shutdown) and waits
    /// for `proxy_done` until the last in-flight call has its outcome.
    draining: bool,
}

impl Root {
    pub fn new(context_id: u32) -> Root {
        let seed = time::now_ns().unwrap_or(0) ^ u64::from(context_id);
        Root {
            context_id,
            worker: Rc::new(Worker::new(seed)),
            active: None,
            in_flight: HashMap::new(),
            draining: false,
        }
    }

    fn dispatch_queued(&mut self) {
        let queued = self.worker.take_queued();
        if queued.is_empty() {
            self.worker.disarm_tick();
            return;
        }
        let now = time::now_ns();
        for call in queued {
            if let (Some(now), Some(enqueued)) = (now, call.enqueued_ns) {
                call.active
                    .metrics
                    .handoff_delay(now.saturating_sub(enqueued) / 1_000);
            }
            self.dispatch(call, now);
        }
    }

    fn dispatch(&mut self, call: SideCall, now: Option<u64>) {
        let Some(target) = call
            .active
            .config
            .rules
            .get(call.rule)
            .and_then(|rule| rule.targets.get(call.target))
        else {
            self.worker.call_finished();
            return;
        };
        let timeout = Duration::from_millis(target.timeout_ms);
        match dispatch::http_call(
            &target.cluster,
            &call.headers,
            call.body.as_deref().map(HeldBody::as_slice),
            timeout,
        ) {
            Ok(token) => {
                call.active.metrics.dispatched(call.rule, call.target);
                self.in_flight.insert(
                    token,
                    InFlight {
                        active: call.active,
                        rule: call.rule,
                        target: call.target,
                        request_id: call.request_id,
                        started_ns: now,
                        waiter: call.waiter,
                    },
                );
            }
            Err(status) => {
                self.worker.call_finished();
                let outcome = dispatch::refusal_outcome(status);
                call.active
                    .metrics
                    .outcome(call.rule, call.target, outcome, None, false);
                self.log_failure(
                    &call.active,
                    call.rule,
                    call.target,
                    outcome,
                    &dispatch::refusal_hint(status, &target.cluster),
                    &call.request_id,
                );
                // Counted first, so the stats agree by the time the client
                // sees the released response.
                if let Some(waiter) = &call.waiter {
                    let result = TargetResult::Done {
                        outcome,
                        status: None,
                    };
                    fanout::record(
                        waiter,
                        &call.active,
                        call.rule,
                        call.target,
                        result,
                        self.context_id,
                    );
                }
            }
        }
    }

    fn log_failure(
        &self,
        active: &Active,
        rule: usize,
        target: usize,
        outcome: Outcome,
        detail: &str,
        request_id: &str,
    ) {
        let Some(suppressed) = self.worker.allow_log() else {
            return;
        };
        let rule_name = active
            .config
            .rules
            .get(rule)
            .map_or("?", |r| r.name.as_str());
        let target_name = active
            .config
            .rules
            .get(rule)
            .and_then(|r| r.targets.get(target))
            .map_or("?", |t| t.name.as_str());
        let dropped = if suppressed > 0 {
            format!(" ({suppressed} earlier failure lines suppressed)")
        } else {
            String::new()
        };
        warn!(
            "[{}] side call failed: rule={rule_name} target={target_name} outcome={} {detail} request_id={request_id}{dropped}",
            self.context_id,
            outcome.as_str()
        );
    }
}

impl Context for Root {
    fn on_done(&mut self) -> bool {
        self.dispatch_queued();
        if self.in_flight.is_empty() {
            return true;
        }
        info!(
            "[{}] plugin retiring with {} side calls in flight; waiting for their outcomes",
            self.context_id,
            self.in_flight.len()
        );
        self.draining = true;
        false
    }

    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let Some(call) = self.in_flight.remove(&token_id) else {
            // Not ours, so not counted in the worker's in-flight total.
            warn!(
                "[{}] response for unknown side call token {token_id}",
                self.context_id
            );
            return;
        };
        self.worker.call_finished();
        let latency_ms = match (time::now_ns(), call.started_ns) {
            (Some(now), Some(started)) => Some(now.saturating_sub(started) / 1_000_000),
            _ => None,
        };

        let summary_parts = if num_headers == 0 {
            None
        } else {
            Some(read_response(body_size))
        };
        let status = summary_parts.as_ref().and_then(|p| p.status);
        let outcome = match &summary_parts {
            None => outcome::classify(None),
            Some(parts) => outcome::classify(Some(&ResponseSummary {
                status: parts.status,
                overloaded: parts.overloaded,
                from_upstream: parts.from_upstream,
                body_prefix: &parts.body_prefix,
            })),
        };

        call.active
            .metrics
            .outcome(call.rule, call.target, outcome, latency_ms, true);
        if !outcome.is_success() {
            let status_text = status.map_or("-".to_string(), |s| s.to_string());
            self.log_failure(
                &call.active,
                call.rule,
                call.target,
                outcome,
                &format!("status={status_text}"),
                &call.request_id,
            );
        }

        if let Some(waiter) = &call.waiter {
            let result = TargetResult::Done { outcome, status };
            fanout::record(
                waiter,
                &call.active,
                call.rule,
                call.target,
                result,
                self.context_id,
            );
        }

        // This callback runs as the root, so queued calls can go out now
        // instead of waiting for the next wake-up.
        self.dispatch_queued();

        if self.draining && self.in_flight.is_empty() {
            info!(
                "[{}] last side call finished; plugin retired",
                self.context_id
            );
            if let Err(e) = abi::done() {
                warn!(
                    "[{}] reporting the plugin done failed: {e:?}",
                    self.context_id
                );
            }
        }
    }
}

/// The parts of a side call response that classification reads.
struct ResponseParts {
    status: Option<u16>,
    overloaded: bool,
    from_upstream: bool,
    body_prefix: Vec<u8>,
}

/// Reads the status, two headers and at most [`outcome::BODY_PREFIX_BYTES`]
/// of the body, however large the response is.
fn read_response(body_size: usize) -> ResponseParts {
    let header = |name: &str| {
        hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, name)
            .ok()
            .flatten()
    };
    let status = header(":status").and_then(|v| {
        std::str::from_utf8(&v)
            .ok()
            .and_then(|s| s.parse::<u16>().ok())
    });
    let body_prefix = if body_size == 0 {
        Vec::new()
    } else {
        hostcalls::get_buffer(
            BufferType::HttpCallResponseBody,
            0,
            body_size.min(outcome::BODY_PREFIX_BYTES),
        )
        .ok()
        .flatten()
        .unwrap_or_default()
    };
    ResponseParts {
        status,
        overloaded: header("x-envoy-overloaded").is_some(),
        from_upstream: header("x-envoy-upstream-service-time").is_some(),
        body_prefix,
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(bytes) => bytes.unwrap_or_default(),
            Err(status) => {
                error!("mesh-fanout: reading the plugin configuration failed: {status:?}");
                return false;
            }
        };
        let parsed = match config::parse(&bytes) {
            Ok(parsed) => parsed,
            Err(e) => {
                error!("mesh-fanout: invalid configuration: {e}");
                return false;
            }
        };
        for warning in &parsed.warnings {
            warn!("mesh-fanout: configuration: {warning}");
        }
        let metrics = match Metrics::define(&parsed.config) {
            Ok(metrics) => metrics,
            Err((name, status)) => {
                error!("mesh-fanout: defining stat {name} failed: {status:?}");
                return false;
            }
        };
        if self.worker.wake_queue().is_none() {
            self.worker.register_wake_queue(self.context_id);
        }
        let rules = parsed.config.rules.len();
        let targets: usize = parsed.config.rules.iter().map(|r| r.targets.len()).sum();
        self.active = Some(Rc::new(Active {
            config: parsed.config,
            metrics,
        }));
        info!(
            "[{}] mesh-fanout configured: {rules} rules, {targets} targets",
            self.context_id
        );
        true
    }

    fn on_tick(&mut self) {
        self.dispatch_queued();
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        if Some(queue_id) == self.worker.wake_queue() {
            // The messages are empty wake-ups; drain them so the host's
            // queue does not grow.
            while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(queue_id) {}
        }
        self.dispatch_queued();
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream::new(
            context_id,
            self.active.clone(),
            Rc::clone(&self.worker),
        )))
    }
}
