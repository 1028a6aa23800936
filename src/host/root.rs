//! The root context: one per worker VM. It owns the configuration, and it
//! dispatches every side call so that their responses reach it however
//! long after the request they arrive. It also runs the filter's own
//! retries and dead letters, which outlive any request.

use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use log::{debug, error, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType};

use crate::core::config::{self, Target};
use crate::core::fanout::TargetResult;
use crate::core::outcome::Outcome;
use crate::core::retry;
use crate::core::side_request::{self, Failure};

use super::abi;
use super::body::HeldBody;
use super::dispatch;
use super::fanout;
use super::metrics::Metrics;
use super::response;
use super::stream::Stream;
use super::time;
use super::worker::{Active, CallKind, SideCall, Worker};

/// How often the root checks for retries whose backoff has passed. Backoff
/// delays are at least a few milliseconds, so 5 ms keeps them close to
/// schedule without waking the worker needlessly.
const RETRY_TICK: Duration = Duration::from_millis(5);

/// A dispatched call waiting for its response. The call keeps its headers
/// and body only when a retry or dead letter may need them.
struct InFlight {
    call: SideCall,
    started_ns: Option<u64>,
}

/// A retry waiting for its backoff to pass.
struct ScheduledRetry {
    due_ns: u64,
    call: SideCall,
}

/// The end of one attempt.
struct AttemptEnd {
    outcome: Outcome,
    status: Option<u16>,
    latency_ms: Option<u64>,
    /// False for calls Envoy refused to start.
    was_in_flight: bool,
    /// Envoy's reason for rejecting the call at dispatch; `None` for a call
    /// that ran, whose log line shows the status instead.
    rejection: Option<String>,
}

impl AttemptEnd {
    /// Formats the failure detail for a log line. Only log lines need it,
    /// so the common path never builds the string.
    fn detail(&self) -> String {
        match (&self.rejection, self.status) {
            // Quoted, so the line stays a list of key=value pairs.
            (Some(rejection), _) => format!("error={rejection:?}"),
            (None, Some(status)) => format!("status={status}"),
            (None, None) => "status=-".to_owned(),
        }
    }
}

pub struct Root {
    context_id: u32,
    worker: Rc<Worker>,
    active: Option<Rc<Active>>,
    in_flight: HashMap<u32, InFlight>,
    retries: Vec<ScheduledRetry>,
    /// Envoy is retiring this plugin (a config push or shutdown) and waits
    /// for `proxy_done` until the last call has its outcome.
    draining: bool,
}

fn target_of(call: &SideCall) -> Option<&Target> {
    call.active
        .config
        .rules
        .get(call.rule)
        .and_then(|rule| rule.targets.get(call.target))
}

impl Root {
    pub fn new(context_id: u32) -> Root {
        let seed = time::now_ns().unwrap_or(0) ^ u64::from(context_id);
        Root {
            context_id,
            worker: Rc::new(Worker::new(seed)),
            active: None,
            in_flight: HashMap::new(),
            retries: Vec::new(),
            draining: false,
        }
    }

    /// Dispatches queued calls and retries that are due, then sets the
    /// timer for the retries still waiting.
    fn run(&mut self) {
        let now = time::now_ns();
        for call in self.worker.take_queued() {
            if let (Some(now), Some(enqueued)) = (now, call.enqueued_ns) {
                call.active
                    .metrics
                    .handoff_delay(now.saturating_sub(enqueued) / 1_000);
            }
            self.dispatch(call, now);
        }

        let now_ns = now.unwrap_or(u64::MAX);
        let (due, waiting): (Vec<ScheduledRetry>, Vec<ScheduledRetry>) =
            std::mem::take(&mut self.retries)
                .into_iter()
                .partition(|r| r.due_ns <= now_ns);
        self.retries = waiting;
        for retry in due {
            self.dispatch(retry.call, now);
        }

        if self.retries.is_empty() {
            self.worker.disarm_tick();
        } else {
            self.worker.arm_tick(RETRY_TICK);
        }
        self.finish_draining();
    }

    fn dispatch(&mut self, mut call: SideCall, now: Option<u64>) {
        let Some(target) = target_of(&call) else {
            self.worker.call_finished();
            return;
        };
        let (cluster, timeout_ms) = match (call.kind, &target.dead_letter) {
            (CallKind::DeadLetter, Some(dead_letter)) => {
                (dead_letter.cluster.as_str(), dead_letter.timeout_ms)
            }
            _ => (target.cluster.as_str(), target.timeout_ms),
        };
        let body = call.body.as_deref().map(HeldBody::as_slice);
        match dispatch::http_call(
            cluster,
            &call.headers,
            body,
            Duration::from_millis(timeout_ms),
        ) {
            Ok(token) => {
                match (call.kind, call.attempt) {
                    (CallKind::Side, 1) => call.active.metrics.dispatched(call.rule, call.target),
                    (CallKind::Side, _) => call.active.metrics.retried(call.rule, call.target),
                    (CallKind::DeadLetter, _) => {}
                }
                let keep_request = call.kind == CallKind::Side
                    && (target.retry.is_some() || target.dead_letter.is_some());
                if !keep_request {
                    // Free the copy now; nothing will send it again.
                    call.headers = Vec::new();
                    call.body = None;
                }
                self.in_flight.insert(
                    token,
                    InFlight {
                        call,
                        started_ns: now,
                    },
                );
            }
            Err(status) => {
                let end = AttemptEnd {
                    outcome: dispatch::refusal_outcome(status),
                    status: None,
                    latency_ms: None,
                    was_in_flight: false,
                    rejection: Some(dispatch::refusal_hint(status, cluster)),
                };
                self.attempt_ended(call, end, now);
            }
        }
    }

    /// Settles one attempt: retries it, or records the final outcome and
    /// posts a dead letter for a final failure.
    fn attempt_ended(&mut self, mut call: SideCall, end: AttemptEnd, now: Option<u64>) {
        if call.kind == CallKind::DeadLetter {
            self.dead_letter_ended(&call, &end);
            return;
        }
        let metrics = &call.active.metrics;
        metrics.attempt_ended(
            call.rule,
            call.target,
            end.outcome,
            end.latency_ms,
            end.was_in_flight,
        );
        if call.attempt > 1 {
            self.worker.retry_finished();
        }

        let limits = call.active.config.limits;
        let retry_delay_ms = target_of(&call)
            .and_then(|t| t.retry.as_ref())
            .filter(|policy| policy.should_retry(end.outcome, call.attempt))
            .map(|policy| policy.backoff_ms(call.attempt, self.worker.random()));
        if let Some(delay_ms) = retry_delay_ms {
            let allowed = retry::budget_allows(
                self.worker.retries_in_flight(),
                self.worker.in_flight(),
                limits.retry_budget_percent,
                limits.min_retry_concurrency,
            );
            if allowed {
                debug!(
                    "[{}] retrying after {} ({}) in {delay_ms} ms, attempt {} request_id={}",
                    self.context_id,
                    end.outcome.as_str(),
                    end.detail(),
                    call.attempt + 1,
                    call.request_id
                );
                call.attempt += 1;
                self.worker.retry_started();
                let due_ns = now
                    .unwrap_or(0)
                    .saturating_add(delay_ms.saturating_mul(1_000_000));
                self.retries.push(ScheduledRetry { due_ns, call });
                self.worker.arm_tick(RETRY_TICK);
                return;
            }
            call.active
                .metrics
                .retry_budget_exhausted(call.rule, call.target);
        }

        self.worker.call_finished();
        call.active
            .metrics
            .outcome(call.rule, call.target, end.outcome);
        if !end.outcome.is_success() {
            self.log_failure(&call, &end, "side call failed");
        }
        // Counted first, so the stats agree by the time the client sees
        // a released fan-out response.
        if let Some(waiter) = &call.waiter {
            let result = TargetResult::Done {
                outcome: end.outcome,
                status: end.status,
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
        if !end.outcome.is_success() {
            self.send_dead_letter(call, &end, now);
        }
    }

    /// Posts a finally failed side call to its target's dead-letter
    /// cluster, once; a failed dead letter is counted and logged, never
    /// retried.
    fn send_dead_letter(&mut self, call: SideCall, end: &AttemptEnd, now: Option<u64>) {
        let Some(target) = target_of(&call) else {
            return;
        };
        let Some(dead_letter) = &target.dead_letter else {
            return;
        };
        let Some(rule) = call.active.config.rules.get(call.rule) else {
            return;
        };
        let failure = Failure {
            outcome: end.outcome,
            status: end.status,
            attempts: call.attempt,
        };
        let headers = side_request::build_dead_letter_headers(
            &call.headers,
            dead_letter,
            &rule.name,
            &target.name,
            failure,
            call.body.as_ref().map(|b| b.len()),
        );
        self.worker.call_started();
        let letter = SideCall {
            headers,
            kind: CallKind::DeadLetter,
            waiter: None,
            ..call
        };
        self.dispatch(letter, now);
    }

    fn dead_letter_ended(&mut self, call: &SideCall, end: &AttemptEnd) {
        self.worker.call_finished();
        call.active
            .metrics
            .dead_letter(call.rule, call.target, end.outcome);
        if !end.outcome.is_success() {
            self.log_failure(call, end, "dead letter failed");
        }
    }

    fn log_failure(&self, call: &SideCall, end: &AttemptEnd, what: &str) {
        let Some(suppressed) = self.worker.allow_log() else {
            return;
        };
        let rule_name = call
            .active
            .config
            .rules
            .get(call.rule)
            .map_or("?", |r| r.name.as_str());
        let target_name = target_of(call).map_or("?", |t| t.name.as_str());
        let dropped = if suppressed > 0 {
            format!(" ({suppressed} earlier failure lines suppressed)")
        } else {
            String::new()
        };
        warn!(
            "[{}] {what}: rule={rule_name} target={target_name} outcome={} {} attempts={} request_id={}{dropped}",
            self.context_id,
            end.outcome.as_str(),
            end.detail(),
            call.attempt,
            call.request_id
        );
    }

    /// Reports the plugin done once a retiring root has nothing left.
    fn finish_draining(&mut self) {
        if self.draining && self.in_flight.is_empty() && self.retries.is_empty() {
            self.draining = false;
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

impl Context for Root {
    fn on_done(&mut self) -> bool {
        // Retries still waiting go out now rather than being dropped.
        for retry in &mut self.retries {
            retry.due_ns = 0;
        }
        self.run();
        if self.in_flight.is_empty() && self.retries.is_empty() {
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
        let Some(InFlight { call, started_ns }) = self.in_flight.remove(&token_id) else {
            // Not ours, so not counted in the worker's in-flight total.
            warn!(
                "[{}] response for unknown side call token {token_id}",
                self.context_id
            );
            return;
        };
        let now = time::now_ns();
        let latency_ms = match (now, started_ns) {
            (Some(now), Some(started)) => Some(now.saturating_sub(started) / 1_000_000),
            _ => None,
        };
        let (outcome, status) = response::classify_current(num_headers, body_size);
        let end = AttemptEnd {
            outcome,
            status,
            latency_ms,
            was_in_flight: true,
            rejection: None,
        };
        self.attempt_ended(call, end, now);

        // This callback runs as the root, so queued calls and due retries
        // can go out now instead of waiting for the next wake-up. With
        // nothing waiting, skipping `run` saves its clock read.
        if self.worker.has_queued() || !self.retries.is_empty() || self.draining {
            self.run();
        }
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
        self.run();
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        if Some(queue_id) == self.worker.wake_queue() {
            // The messages are empty wake-ups, and the worker enqueues one
            // only when none is pending, so Envoy posts one `on_queue_ready`
            // per message. Taking one message per call keeps the host's
            // queue from growing without a second, empty, dequeue.
            if let Err(status) = hostcalls::dequeue_shared_queue(queue_id) {
                warn!(
                    "[{}] dequeuing a wake-up from shared queue {queue_id} failed: {status:?}",
                    self.context_id
                );
            }
        }
        self.run();
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
