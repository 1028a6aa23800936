//! Holding, releasing and replacing fan-out responses.
//!
//! The decision comes from [`crate::core::fanout`]; this module carries it
//! out on the request's stream, either from the stream's own callback or
//! from the root context when the last awaited outcome arrives there.

use std::cell::RefCell;
use std::rc::Rc;

use log::{debug, warn};

use crate::core::fanout::{Decision, TargetResult};

use super::abi;
use super::time;
use super::worker::{Active, Phase, Waiter};

const FAILURE_STATUS: u32 = 502;

/// The return value for the stream's response callback.
pub enum Verdict {
    Continue,
    Pause,
}

/// Decides for a response whose headers just arrived on this stream, and
/// carries the decision out in the stream's own context.
pub fn on_response_headers(waiter: &RefCell<Waiter>, active: &Active, rule: usize) -> Verdict {
    let Some(rule_config) = active.config.rules.get(rule) else {
        return Verdict::Continue;
    };
    let (decision, result_header) = {
        let w = waiter.borrow();
        (
            w.state.decide(rule_config),
            w.state.result_header(rule_config),
        )
    };
    if decision == Decision::Hold {
        waiter.borrow_mut().phase = Phase::Held {
            since_ns: time::now_ns(),
        };
        active.metrics.held(rule);
        return Verdict::Pause;
    }
    waiter.borrow_mut().phase = Phase::Done;
    active.metrics.held_ms(rule, 0);
    let context_id = waiter.borrow().context_id;
    // Returning `Continue` lets the response go; resuming here would
    // continue it twice.
    // A local reply replaces the primary's response, which must not go on.
    let verdict = match decision {
        Decision::Fail { .. } => Verdict::Pause,
        _ => Verdict::Continue,
    };
    carry_out(context_id, active, rule, decision, &result_header, false);
    verdict
}

/// Records one awaited target's result. When it was the last result a held
/// response waited for, releases or replaces that response from the root.
pub fn record(
    waiter: &Rc<RefCell<Waiter>>,
    active: &Active,
    rule: usize,
    target: usize,
    result: TargetResult,
    root_id: u32,
) {
    let Some(rule_config) = active.config.rules.get(rule) else {
        return;
    };
    let ready = {
        let mut w = waiter.borrow_mut();
        w.state.set(target, result);
        match w.phase {
            Phase::Held { since_ns } if !w.state.awaiting() => {
                w.phase = Phase::Done;
                Some((
                    w.context_id,
                    since_ns,
                    w.state.decide(rule_config),
                    w.state.result_header(rule_config),
                ))
            }
            _ => None,
        }
    };
    let Some((context_id, since_ns, decision, result_header)) = ready else {
        return;
    };

    if let (Some(now), Some(since)) = (time::now_ns(), since_ns) {
        active
            .metrics
            .held_ms(rule, now.saturating_sub(since) / 1_000_000);
    }
    // The borrow is released above: the host may call back into the
    // stream while the response is resumed.
    match abi::set_effective_context(context_id) {
        Ok(()) => carry_out(context_id, active, rule, decision, &result_header, true),
        Err(e) => {
            debug!("[{root_id}] stream {context_id} ended before its response was released: {e:?}")
        }
    }
    if let Err(e) = abi::set_effective_context(root_id) {
        warn!("[{root_id}] switching back to the root context failed: {e:?}");
    }
}

/// Releases or replaces the response of the current effective context.
/// `resume` is false when the caller is the stream's own headers callback,
/// whose return value releases the response.
fn carry_out(
    context_id: u32,
    active: &Active,
    rule: usize,
    decision: Decision,
    result_header: &str,
    resume: bool,
) {
    let Some(rule_config) = active.config.rules.get(rule) else {
        return;
    };
    let header_name = rule_config.result_header.as_deref();
    match decision {
        Decision::Hold => {}
        Decision::Release => {
            if let Some(name) = header_name {
                if let Err(e) = abi::set_response_header(name, result_header.as_bytes()) {
                    warn!("[{context_id}] setting response header {name} failed: {e:?}");
                }
            }
            if resume {
                if let Err(e) = abi::resume_http_response() {
                    warn!("[{context_id}] resuming the held response failed: {e:?}");
                }
            }
        }
        Decision::Fail { body } => {
            active.metrics.failed(rule);
            let mut headers: Vec<(&str, &[u8])> = vec![("content-type", b"application/json")];
            if let Some(name) = header_name {
                headers.push((name, result_header.as_bytes()));
            }
            if let Err(e) = abi::send_http_response(FAILURE_STATUS, &headers, &body) {
                warn!("[{context_id}] replacing the response with a 502 failed: {e:?}");
            }
        }
    }
}
