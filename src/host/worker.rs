//! State one Envoy worker's VM shares between its root context and its
//! request contexts. A VM runs on one thread, so `Rc` and `RefCell` are
//! enough; no borrow is held across a host call that could re-enter.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Duration;

use log::warn;
use proxy_wasm::hostcalls;

use crate::core::config::Config;
use crate::core::headers::HeaderList;
use crate::core::log_limit::{LogLimiter, Verdict};
use crate::core::sampling::Xorshift64;

use super::metrics::Metrics;
use super::time;

/// One configuration and the stats defined for it. Requests keep the
/// `Rc` they started with, so a configuration push never changes the rules
/// under a request in progress.
pub struct Active {
    pub config: Config,
    pub metrics: Metrics,
}

/// A side call that is ready to dispatch, moved from the request's context
/// to the root context.
pub struct SideCall {
    pub active: Rc<Active>,
    pub rule: usize,
    pub target: usize,
    pub headers: HeaderList,
    /// Shared by all targets of one request, so the body is copied once.
    pub body: Option<Rc<[u8]>>,
    pub request_id: Rc<str>,
    pub enqueued_ns: Option<u64>,
}

/// How often the root drains the queue while it is not empty. Envoy's
/// timers count in milliseconds, so 1 ms is the smallest delay a handoff
/// can add; the `handoff_delay_us` histogram records the delay observed.
const TICK_PERIOD: Duration = Duration::from_millis(1);

/// At most this many failure lines per worker per window; the next line
/// after a quiet spell reports how many were dropped.
const LOG_WINDOW_MS: u64 = 10_000;
const LOG_LINES_PER_WINDOW: u32 = 20;

pub struct Worker {
    queue: RefCell<VecDeque<SideCall>>,
    tick_armed: Cell<bool>,
    log_limiter: RefCell<LogLimiter>,
    rng: RefCell<Xorshift64>,
}

impl Worker {
    pub fn new(seed: u64) -> Worker {
        Worker {
            queue: RefCell::new(VecDeque::new()),
            tick_armed: Cell::new(false),
            log_limiter: RefCell::new(LogLimiter::new(LOG_WINDOW_MS, LOG_LINES_PER_WINDOW)),
            rng: RefCell::new(Xorshift64::new(seed)),
        }
    }

    /// Queues a call for the root context and makes sure its timer runs.
    pub fn hand_off(&self, call: SideCall) {
        self.queue.borrow_mut().push_back(call);
        if !self.tick_armed.get() {
            // The host applies a tick period set from any context to that
            // context's root, so a request context can arm it.
            match hostcalls::set_tick_period(TICK_PERIOD) {
                Ok(()) => self.tick_armed.set(true),
                Err(status) => warn!(
                    "arming the handoff timer failed: {status:?}; calls wait for the next tick"
                ),
            }
        }
    }

    /// Takes every queued call. The root calls this from `on_tick`.
    pub fn take_queued(&self) -> VecDeque<SideCall> {
        std::mem::take(&mut *self.queue.borrow_mut())
    }

    /// Stops the timer; called by the root once the queue is empty.
    pub fn disarm(&self) {
        if self.tick_armed.get() {
            match hostcalls::set_tick_period(Duration::ZERO) {
                Ok(()) => self.tick_armed.set(false),
                Err(status) => warn!("stopping the handoff timer failed: {status:?}"),
            }
        }
    }

    pub fn random(&self) -> u64 {
        self.rng.borrow_mut().next_u64()
    }

    /// Returns the number of lines dropped before this one, or `None` when
    /// this line should be dropped too.
    pub fn allow_log(&self) -> Option<u64> {
        let now_ms = time::now_ns().unwrap_or(0) / 1_000_000;
        match self.log_limiter.borrow_mut().check(now_ms) {
            Verdict::Emit { suppressed_before } => Some(suppressed_before),
            Verdict::Suppress => None,
        }
    }
}
