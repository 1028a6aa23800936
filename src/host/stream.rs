//! The per-request context. It never pauses the request: every callback
//! returns `Continue`, and the body is copied as it streams past.

use std::cell::RefCell;
use std::rc::Rc;

use log::{debug, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, MapType};

use crate::core::config::Rule;
use crate::core::fanout::{FanoutState, TargetResult};
use crate::core::headers::{self, HeaderList};
use crate::core::outcome::Skip;
use crate::core::sampling;
use crate::core::side_request;

use super::abi;
use super::body::HeldBody;
use super::fanout::{self, Verdict};
use super::time;
use super::worker::{Active, CallKind, Phase, SideCall, Waiter, Worker};

pub struct Stream {
    context_id: u32,
    active: Option<Rc<Active>>,
    worker: Rc<Worker>,
    state: State,
    /// Set when the request matched a fan-out rule that awaits a target.
    fanout: Option<FanoutLink>,
}

struct FanoutLink {
    active: Rc<Active>,
    rule: usize,
    waiter: Rc<RefCell<Waiter>>,
}

enum State {
    /// No decision yet, or the request needs nothing more from the filter.
    Idle,
    /// Matched; waiting for the end of the request to dispatch.
    Collecting(Pending),
}

struct Pending {
    active: Rc<Active>,
    rule: usize,
    /// Targets that passed sampling, in configured order.
    targets: Vec<PendingTarget>,
    headers: HeaderList,
    body: HeldBody,
    /// Bytes seen so far, including those not kept once no target wanted
    /// more.
    body_len: usize,
    request_id: Rc<str>,
    waiter: Option<Rc<RefCell<Waiter>>>,
}

struct PendingTarget {
    index: usize,
    wants_body: bool,
    max_body_bytes: usize,
    /// Set once the target can no longer be called for this request.
    skip: Option<Skip>,
}

impl PendingTarget {
    fn needs_body(&self) -> bool {
        self.wants_body && self.skip.is_none()
    }
}

impl Stream {
    pub fn new(context_id: u32, active: Option<Rc<Active>>, worker: Rc<Worker>) -> Stream {
        Stream {
            context_id,
            active,
            worker,
            state: State::Idle,
            fanout: None,
        }
    }

    fn start(&mut self, end_of_stream: bool) {
        let Some(active) = self.active.clone() else {
            return;
        };
        if active.config.method_path_prefilter
            && !active.config.strip_incoming_marker
            && !could_match(&active)
        {
            return;
        }
        let request_headers = match hostcalls::get_map_bytes(MapType::HttpRequestHeaders) {
            Ok(h) => h,
            Err(status) => {
                warn!(
                    "[{}] reading request headers failed: {status:?}; request passes through",
                    self.context_id
                );
                return;
            }
        };
        let mut request_headers = request_headers;
        if active.config.strip_incoming_marker {
            self.strip_marker(&active.config.marker_header, &mut request_headers);
        }
        let Some((rule_index, rule)) = active.config.first_match(&request_headers) else {
            return;
        };
        active.metrics.matched(rule_index);

        let skip_reason =
            if headers::first(&request_headers, &active.config.marker_header).is_some() {
                Some(Skip::Loop)
            } else if !side_request::is_copyable(&request_headers) {
                Some(Skip::Unsupported)
            } else {
                None
            };
        if let Some(reason) = skip_reason {
            for index in 0..rule.targets.len() {
                active.metrics.skipped(rule_index, index, reason);
            }
            return;
        }

        let waiter = if rule.awaits_any() {
            let waiter = Rc::new(RefCell::new(Waiter {
                context_id: self.context_id,
                state: FanoutState::new(rule),
                phase: Phase::Waiting,
            }));
            self.fanout = Some(FanoutLink {
                active: Rc::clone(&active),
                rule: rule_index,
                waiter: Rc::clone(&waiter),
            });
            Some(waiter)
        } else {
            None
        };

        let targets = self.sample(
            &active,
            rule_index,
            rule,
            &request_headers,
            waiter.as_deref(),
        );
        if targets.is_empty() {
            return;
        }

        let request_id: Rc<str> = headers::first(&request_headers, "x-request-id")
            .map(|v| String::from_utf8_lossy(v).into())
            .unwrap_or_else(|| "-".into());
        let mut body = HeldBody::new(Rc::clone(&self.worker));
        if !end_of_stream {
            let largest = targets
                .iter()
                .filter(|t| t.wants_body)
                .map(|t| t.max_body_bytes)
                .max();
            let declared = headers::first(&request_headers, "content-length")
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| v.trim().parse::<usize>().ok());
            if let (Some(largest), Some(declared)) = (largest, declared) {
                if declared <= largest {
                    body.reserve_expected(declared, active.config.limits.max_body_bytes);
                }
            }
        }
        let pending = Pending {
            active: Rc::clone(&active),
            rule: rule_index,
            targets,
            headers: request_headers,
            body,
            body_len: 0,
            request_id,
            waiter,
        };
        if end_of_stream {
            self.finish(pending, false);
        } else {
            self.state = State::Collecting(pending);
        }
    }

    fn sample(
        &self,
        active: &Active,
        rule_index: usize,
        rule: &Rule,
        request_headers: &[(String, Vec<u8>)],
        waiter: Option<&RefCell<Waiter>>,
    ) -> Vec<PendingTarget> {
        let mut kept = Vec::with_capacity(rule.targets.len());
        for (index, target) in rule.targets.iter().enumerate() {
            let key = headers::first(request_headers, &target.sample_key);
            if sampling::sampled_in(target.sample_rate, key, || self.worker.random()) {
                kept.push(PendingTarget {
                    index,
                    wants_body: target.body,
                    max_body_bytes: target.max_body_bytes,
                    skip: None,
                });
            } else {
                active.metrics.skipped(rule_index, index, Skip::SampledOut);
                if let Some(waiter) = waiter {
                    waiter
                        .borrow_mut()
                        .state
                        .set(index, TargetResult::Skipped(Skip::SampledOut));
                }
            }
        }
        kept
    }

    fn copy_body_chunk(&mut self, body_size: usize) {
        let context_id = self.context_id;
        let State::Collecting(pending) = &mut self.state else {
            return;
        };
        if body_size == 0 {
            return;
        }
        pending.body_len = pending.body_len.saturating_add(body_size);
        for target in pending.targets.iter_mut().filter(|t| t.needs_body()) {
            if pending.body_len > target.max_body_bytes {
                target.skip = Some(Skip::BodyTooLarge);
            }
        }
        if !pending.targets.iter().any(PendingTarget::needs_body) {
            // Free what was copied; no target can use a partial body.
            pending.body.clear();
            return;
        }
        // Each callback sees only the new chunk because the filter returns
        // `Continue` and so never asks Envoy to buffer.
        match hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size) {
            Ok(Some(chunk)) => {
                let worker_limit = pending.active.config.limits.max_body_bytes;
                if !pending.body.try_extend(&chunk, worker_limit) {
                    for target in pending.targets.iter_mut().filter(|t| t.needs_body()) {
                        target.skip = Some(Skip::BufferLimit);
                    }
                    pending.body.clear();
                }
            }
            Ok(None) => {}
            Err(status) => {
                warn!("[{context_id}] reading a request body chunk failed: {status:?}; side calls for this request are skipped");
                let abandoned = std::mem::replace(&mut self.state, State::Idle);
                if let State::Collecting(pending) = abandoned {
                    skip_all(&pending, Skip::Aborted);
                }
            }
        }
    }

    /// Hands every target that is still eligible to the root for dispatch.
    fn finish(&mut self, mut pending: Pending, had_body: bool) {
        let enqueued_ns = time::now_ns();
        let body: Option<Rc<HeldBody>> =
            if had_body && pending.targets.iter().any(PendingTarget::needs_body) {
                let empty = HeldBody::new(Rc::clone(&self.worker));
                Some(Rc::new(std::mem::replace(&mut pending.body, empty)))
            } else {
                None
            };
        let max_in_flight = pending.active.config.limits.max_in_flight;
        let mut room = max_in_flight.saturating_sub(self.worker.in_flight());
        for target in pending.targets.iter_mut().filter(|t| t.skip.is_none()) {
            if room == 0 {
                target.skip = Some(Skip::InFlightLimit);
            } else {
                room -= 1;
            }
        }
        let rule = pending.active.config.rules.get(pending.rule);
        for target in &pending.targets {
            match (target.skip, rule) {
                (Some(reason), _) => skip(&pending, target.index, reason),
                (None, None) => skip(&pending, target.index, Skip::Aborted),
                (None, Some(_)) => {}
            }
        }
        let Some(rule) = rule else {
            return;
        };
        let last = pending.targets.iter().rposition(|t| t.skip.is_none());
        for position in 0..pending.targets.len() {
            let Some(&PendingTarget {
                index, skip: None, ..
            }) = pending.targets.get(position)
            else {
                continue;
            };
            let Some(config) = rule.targets.get(index) else {
                skip(&pending, index, Skip::Aborted);
                continue;
            };
            let side_body = if config.body { body.clone() } else { None };
            let body_len = side_body.as_ref().map(|b| b.len());
            let marker_header = &pending.active.config.marker_header;
            // The last call takes the request's headers instead of a copy.
            let side_headers = if Some(position) == last {
                side_request::build_headers_from(
                    std::mem::take(&mut pending.headers),
                    config,
                    marker_header,
                    &config.marker_value,
                    body_len,
                )
            } else {
                side_request::build_headers(
                    &pending.headers,
                    config,
                    marker_header,
                    &config.marker_value,
                    body_len,
                )
            };
            self.worker.hand_off(SideCall {
                active: Rc::clone(&pending.active),
                rule: pending.rule,
                target: index,
                headers: side_headers,
                body: side_body,
                request_id: Rc::clone(&pending.request_id),
                enqueued_ns,
                waiter: pending.waiter.clone(),
                attempt: 1,
                kind: CallKind::Side,
            });
        }
    }

    /// Removes a client-supplied marker header from the request, so the
    /// client cannot opt out of side calls.
    fn strip_marker(&self, marker_header: &str, request_headers: &mut HeaderList) {
        if headers::first(request_headers, marker_header).is_none() {
            return;
        }
        request_headers.retain(|(name, _)| name != marker_header);
        if let Err(e) = abi::remove_request_header(marker_header) {
            warn!(
                "[{}] removing the incoming {marker_header} header failed: {e:?}",
                self.context_id
            );
        }
    }

    /// Ends the request's part in the filter. A request still collecting
    /// here never completed, so its side calls are skipped as aborted.
    fn close(&mut self) {
        if let State::Collecting(pending) = std::mem::replace(&mut self.state, State::Idle) {
            skip_all(&pending, Skip::Aborted);
        }
        // Outcomes that arrive later are still counted, but there is no
        // response left to release.
        if let Some(link) = self.fanout.take() {
            link.waiter.borrow_mut().phase = Phase::Done;
        }
    }

    /// Decides whether the primary's response goes now, waits, or is
    /// replaced, for a request that matched a fan-out rule.
    fn on_fanout_response(&mut self) -> Action {
        let Some(link) = &self.fanout else {
            return Action::Continue;
        };
        if matches!(self.state, State::Collecting(_)) {
            // The response arrived before the request ended, so its side
            // calls have not started; holding could wait on a client that
            // waits on the response.
            debug!(
                "[{}] response arrived before the request ended; not holding it",
                self.context_id
            );
            link.waiter.borrow_mut().state.stop_awaiting();
        }
        match fanout::on_response_headers(&link.waiter, &link.active, link.rule) {
            Verdict::Continue => Action::Continue,
            Verdict::Pause => Action::Pause,
        }
    }

    /// Keeps body and trailers back while the headers are held; returning
    /// `Continue` from these callbacks would release the headers too.
    fn held(&self) -> bool {
        self.fanout
            .as_ref()
            .is_some_and(|link| matches!(link.waiter.borrow().phase, Phase::Held { .. }))
    }

    fn complete(&mut self) {
        if let State::Collecting(pending) = std::mem::replace(&mut self.state, State::Idle) {
            self.finish(pending, true);
        }
    }
}

/// Matches on `:path` and `:method` alone, read with small host calls,
/// so a request that no rule can match never copies the whole header map.
/// `:path` comes first: each read costs a call from Envoy into the VM to
/// allocate the value, and a path that no rule accepts saves the second.
fn could_match(active: &Active) -> bool {
    let read = |name: &str| {
        hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
            .ok()
            .flatten()
            .unwrap_or_default()
    };
    let path = read(":path");
    let rules = &active.config.rules;
    if !rules.iter().any(|rule| rule.matcher.path_allows(&path)) {
        return false;
    }
    let probe = vec![
        (":method".to_string(), read(":method")),
        (":path".to_string(), path),
    ];
    active.config.first_match(&probe).is_some()
}

fn skip_all(pending: &Pending, reason: Skip) {
    for target in &pending.targets {
        skip(pending, target.index, reason);
    }
}

/// Counts a skip and, for a fan-out request, resolves the target so the
/// response never waits for a call that will not be made.
fn skip(pending: &Pending, target: usize, reason: Skip) {
    pending.active.metrics.skipped(pending.rule, target, reason);
    if let Some(waiter) = &pending.waiter {
        waiter
            .borrow_mut()
            .state
            .set(target, TargetResult::Skipped(reason));
    }
}

impl Context for Stream {
    fn on_done(&mut self) -> bool {
        self.close();
        true
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        #[cfg(feature = "fault-injection")]
        inject_fault();
        self.start(end_of_stream);
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.copy_body_chunk(body_size);
        if end_of_stream {
            self.complete();
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.on_fanout_response()
    }

    fn on_http_response_body(&mut self, _body_size: usize, _end_of_stream: bool) -> Action {
        if self.held() {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        if self.held() {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        self.complete();
        Action::Continue
    }

    fn on_log(&mut self) {
        self.close();
    }
}

/// Panics when the request asks for it, to exercise Envoy's VM failure
/// handling in tests. Only built with the `fault-injection` feature.
#[cfg(feature = "fault-injection")]
#[allow(clippy::panic)]
fn inject_fault() {
    let header = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "x-mesh-fanout-fault");
    if let Ok(Some(value)) = header {
        if value == b"panic" {
            panic!("x-mesh-fanout-fault: panic");
        }
    }
}
