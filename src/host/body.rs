//! Request body bytes copied for side calls, counted against the worker's
//! `max_body_bytes_per_worker` for as long as they are held.
//!
//! The budget counts allocated capacity, not length, so a growing buffer
//! cannot hold twice what the budget allows. Allocation goes through
//! `try_reserve`, because a failed allocation would otherwise abort the VM.

use std::rc::Rc;

use super::worker::Worker;

pub struct HeldBody {
    bytes: Vec<u8>,
    worker: Rc<Worker>,
}

impl HeldBody {
    pub fn new(worker: Rc<Worker>) -> HeldBody {
        HeldBody {
            bytes: Vec::new(),
            worker,
        }
    }

    /// Allocates `expected` bytes up front, typically from `content-length`,
    /// so the copy never reallocates. Does nothing when the budget or the
    /// allocator refuses; [`Self::try_extend`] then decides.
    pub fn reserve_expected(&mut self, expected: usize, worker_limit: usize) {
        self.grow_to(expected, worker_limit);
    }

    /// Appends `chunk` if the worker's budget and the allocator allow it;
    /// returns false and keeps nothing new otherwise.
    pub fn try_extend(&mut self, chunk: &[u8], worker_limit: usize) -> bool {
        let needed = self.bytes.len().saturating_add(chunk.len());
        if needed > self.bytes.capacity() && !self.grow_to(needed, worker_limit) {
            return false;
        }
        self.bytes.extend_from_slice(chunk);
        true
    }

    /// Frees the copied bytes early, for a body that no target can use.
    pub fn clear(&mut self) {
        self.worker.release_body_bytes(self.bytes.capacity());
        self.bytes = Vec::new();
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.bytes
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Grows the capacity to at least `capacity`, doubling for chunked
    /// bodies of unknown size, within the budget.
    fn grow_to(&mut self, capacity: usize, worker_limit: usize) -> bool {
        let old = self.bytes.capacity();
        if capacity <= old {
            return true;
        }
        let doubled = old.saturating_mul(2).max(capacity);
        for target in [doubled, capacity] {
            if !self.worker.reserve_body_bytes(target - old, worker_limit) {
                continue;
            }
            if self
                .bytes
                .try_reserve_exact(target - self.bytes.len())
                .is_ok()
            {
                let actual = self.bytes.capacity();
                // The allocator may round up; count what it gave.
                self.worker
                    .reserve_body_bytes_unchecked(actual.saturating_sub(target));
                return true;
            }
            self.worker.release_body_bytes(target - old);
        }
        false
    }
}

impl Drop for HeldBody {
    fn drop(&mut self) {
        self.worker.release_body_bytes(self.bytes.capacity());
    }
}
