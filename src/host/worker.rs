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
use crate::core::fanout::FanoutState;
use crate::core::headers::HeaderList;
use crate::core::log_limit::{LogLimiter, Verdict};
use crate::core::sampling::Xorshift64;

use super::abi;
use super::body::HeldBody;
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
    pub body: Option<Rc<HeldBody>>,
    pub request_id: Rc<str>,
    pub enqueued_ns: Option<u64>,
    /// Set for fan-out requests, so the outcome reaches the held response.
    pub waiter: Option<Rc<RefCell<Waiter>>>,
    /// 1 for the first attempt; retries count up from there.
    pub attempt: u32,
    pub kind: CallKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// A call to the target itself.
    Side,
    /// The one post of a finally failed side call to its dead-letter target.
    DeadLetter,
}

/// A fan-out request's link between its context and the root, which
/// records the outcomes of the request's side calls.
pub struct Waiter {
    pub context_id: u32,
    pub state: FanoutState,
    pub phase: Phase,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The primary's response headers have not arrived.
    Waiting,
    /// The response headers arrived and are paused until awaited targets end.
    Held { since_ns: Option<u64> },
    /// The response was released or replaced, or the request is gone.
    Done,
}

/// Fallback wake-up when the shared queue is unavailable. Envoy's timers
/// count in milliseconds, so 1 ms is the shortest delay a tick can give.
const TICK_PERIOD: Duration = Duration::from_millis(1);

/// At most this many failure lines per worker per window; the next line
/// after a quiet spell reports how many were dropped.
const LOG_WINDOW_MS: u64 = 10_000;
const LOG_LINES_PER_WINDOW: u32 = 20;

pub struct Worker {
    queue: RefCell<VecDeque<SideCall>>,
    /// A proxy-wasm shared queue registered by this worker's root. An
    /// enqueue makes Envoy post `on_queue_ready` to the root on this
    /// worker's event loop, which runs sooner than a 1 ms timer.
    wake_queue: Cell<Option<u32>>,
    wake_pending: Cell<bool>,
    tick_armed: Cell<bool>,
    /// Side calls queued or dispatched and not yet finished.
    in_flight: Cell<usize>,
    /// Body bytes held by [`HeldBody`] values.
    body_bytes: Cell<usize>,
    /// Retry attempts waiting for their backoff or running.
    retries_in_flight: Cell<usize>,
    log_limiter: RefCell<LogLimiter>,
    rng: RefCell<Xorshift64>,
}

impl Worker {
    pub fn new(seed: u64) -> Worker {
        Worker {
            queue: RefCell::new(VecDeque::new()),
            wake_queue: Cell::new(None),
            wake_pending: Cell::new(false),
            tick_armed: Cell::new(false),
            in_flight: Cell::new(0),
            body_bytes: Cell::new(0),
            retries_in_flight: Cell::new(0),
            log_limiter: RefCell::new(LogLimiter::new(LOG_WINDOW_MS, LOG_LINES_PER_WINDOW)),
            rng: RefCell::new(Xorshift64::new(seed)),
        }
    }

    /// Registers the wake-up queue; the root calls this once. Queue names
    /// are global to the Envoy process, so each worker's name is random.
    pub fn register_wake_queue(&self, context_id: u32) {
        let name = format!("mesh_fanout.handoff.{:016x}", self.random());
        match abi::register_shared_queue(&name) {
            Ok(id) => self.wake_queue.set(Some(id)),
            Err(e) => warn!("[{context_id}] registering shared queue {name} failed: {e:?}; side calls start on a 1 ms timer instead"),
        }
    }

    pub fn wake_queue(&self) -> Option<u32> {
        self.wake_queue.get()
    }

    /// Queues a call for the root context and makes sure the root runs soon.
    /// The call counts as in flight until the root calls [`Self::call_finished`].
    pub fn hand_off(&self, call: SideCall) {
        self.in_flight.set(self.in_flight.get().saturating_add(1));
        self.queue.borrow_mut().push_back(call);
        self.wake_root();
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    pub fn call_finished(&self) {
        self.in_flight.set(self.in_flight.get().saturating_sub(1));
    }

    /// Counts a call the root starts itself (a dead letter) as in flight.
    pub fn call_started(&self) {
        self.in_flight.set(self.in_flight.get().saturating_add(1));
    }

    pub fn retries_in_flight(&self) -> usize {
        self.retries_in_flight.get()
    }

    pub fn retry_started(&self) {
        self.retries_in_flight
            .set(self.retries_in_flight.get().saturating_add(1));
    }

    pub fn retry_finished(&self) {
        self.retries_in_flight
            .set(self.retries_in_flight.get().saturating_sub(1));
    }

    /// Runs the root's `on_tick` every `period` until [`Self::disarm_tick`];
    /// a timer that already runs keeps its period.
    pub fn arm_tick(&self, period: Duration) {
        if self.tick_armed.get() {
            return;
        }
        match hostcalls::set_tick_period(period) {
            Ok(()) => self.tick_armed.set(true),
            Err(status) => warn!("arming the root's timer failed: {status:?}"),
        }
    }

    /// Takes `len` bytes from the worker's body budget, if they fit.
    pub fn reserve_body_bytes(&self, len: usize, limit: usize) -> bool {
        let held = self.body_bytes.get().saturating_add(len);
        if held > limit {
            return false;
        }
        self.body_bytes.set(held);
        true
    }

    /// Counts bytes the allocator added beyond a reservation.
    pub fn reserve_body_bytes_unchecked(&self, len: usize) {
        self.body_bytes
            .set(self.body_bytes.get().saturating_add(len));
    }

    pub fn release_body_bytes(&self, len: usize) {
        self.body_bytes
            .set(self.body_bytes.get().saturating_sub(len));
    }

    fn wake_root(&self) {
        // One wake-up is enough for every call queued before it runs.
        if self.wake_pending.get() || self.tick_armed.get() {
            return;
        }
        if let Some(id) = self.wake_queue.get() {
            match hostcalls::enqueue_shared_queue(id, None) {
                Ok(()) => {
                    self.wake_pending.set(true);
                    return;
                }
                Err(status) => warn!(
                    "waking the root through shared queue {id} failed: {status:?}; using the timer"
                ),
            }
        }
        // The host applies a tick period set from any context to that
        // context's root, so a request context can arm it.
        match hostcalls::set_tick_period(TICK_PERIOD) {
            Ok(()) => self.tick_armed.set(true),
            Err(status) => warn!(
                "arming the handoff timer failed: {status:?}; calls wait for the next wake-up"
            ),
        }
    }

    pub fn has_queued(&self) -> bool {
        !self.queue.borrow().is_empty()
    }

    /// Takes every queued call. The root calls this whenever it runs.
    pub fn take_queued(&self) -> VecDeque<SideCall> {
        self.wake_pending.set(false);
        std::mem::take(&mut *self.queue.borrow_mut())
    }

    /// Stops the fallback timer once the queue is empty.
    pub fn disarm_tick(&self) {
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
