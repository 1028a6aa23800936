//! Request body bytes copied for side calls, counted against the worker's
//! `max_body_bytes_per_worker` for as long as they are held.

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

    /// Appends `chunk` if the worker's budget allows it; returns false and
    /// keeps nothing new otherwise.
    pub fn try_extend(&mut self, chunk: &[u8], worker_limit: usize) -> bool {
        if !self.worker.reserve_body_bytes(chunk.len(), worker_limit) {
            return false;
        }
        self.bytes.extend_from_slice(chunk);
        true
    }

    /// Frees the copied bytes early, for a body that no target can use.
    pub fn clear(&mut self) {
        self.worker.release_body_bytes(self.bytes.len());
        self.bytes = Vec::new();
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.bytes
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }
}

impl Drop for HeldBody {
    fn drop(&mut self) {
        self.worker.release_body_bytes(self.bytes.len());
    }
}
