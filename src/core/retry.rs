//! The filter's own retries for side calls: which outcomes to retry, the
//! backoff schedule, the per-worker budget, and idempotency keys.
//!
//! These are opt-in and bounded. Retries by the mesh (a retry policy on a
//! route the side call passes through) are the first choice. These exist
//! because a dispatched call does not pass through a route.

use super::outcome::Outcome;

/// Upper bound on `retry.attempts`, first attempt included.
pub const MAX_ATTEMPTS: u32 = 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts, the first one included; at least 2.
    pub attempts: u32,
    pub base_ms: u64,
    pub max_ms: u64,
    /// Outcomes that start another attempt.
    pub on: Vec<Outcome>,
}

impl RetryPolicy {
    /// Reports whether `outcome` of attempt number `attempt` (1-based)
    /// calls for another attempt.
    pub fn should_retry(&self, outcome: Outcome, attempt: u32) -> bool {
        attempt < self.attempts && self.on.contains(&outcome)
    }

    /// Returns the delay before attempt `attempt + 1` with full jitter: a
    /// uniform draw from 0 to min(max, base × 2^(attempt − 1)) inclusive,
    /// using `random` as the draw.
    pub fn backoff_ms(&self, attempt: u32, random: u64) -> u64 {
        let exponent = attempt.saturating_sub(1).min(32);
        let ceiling = self
            .base_ms
            .saturating_mul(1u64 << exponent)
            .min(self.max_ms);
        random % ceiling.saturating_add(1)
    }
}

/// Reports whether one more retry may start. Retries in flight may be at
/// most `percent` of all side calls in flight on the worker, but
/// `min_concurrency` retries are always allowed, so a quiet worker can
/// still retry. This keeps retries from multiplying load during an outage.
pub fn budget_allows(
    retries_in_flight: usize,
    calls_in_flight: usize,
    percent: u32,
    min_concurrency: usize,
) -> bool {
    let share = calls_in_flight.saturating_mul(percent as usize) / 100;
    retries_in_flight < share.max(min_concurrency)
}

/// Derives the idempotency key for one side call: the same request id,
/// rule and target give the same key on every attempt and every hop, so a
/// receiver can drop duplicates. Two FNV-1a 64 hashes with different
/// offsets give a 128-bit hex key; it is not a secret.
pub fn idempotency_key(request_id: &[u8], rule: &str, target: &str) -> String {
    let mut input = Vec::with_capacity(request_id.len() + rule.len() + target.len() + 2);
    input.extend_from_slice(request_id);
    input.push(0);
    input.extend_from_slice(rule.as_bytes());
    input.push(0);
    input.extend_from_slice(target.as_bytes());
    format!(
        "{:016x}{:016x}",
        fnv1a64(0xcbf2_9ce4_8422_2325, &input),
        fnv1a64(0x6c62_272e_07bb_0142, &input)
    )
}

fn fnv1a64(offset: u64, bytes: &[u8]) -> u64 {
    let mut hash = offset;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            attempts: 3,
            base_ms: 50,
            max_ms: 1000,
            on: vec![Outcome::Status5xx, Outcome::Reset],
        }
    }

    #[test]
    fn retries_listed_outcomes_until_attempts_used() {
        let p = policy();
        assert!(p.should_retry(Outcome::Status5xx, 1));
        assert!(p.should_retry(Outcome::Reset, 2));
        assert!(
            !p.should_retry(Outcome::Status5xx, 3),
            "three attempts in all"
        );
        assert!(
            !p.should_retry(Outcome::Timeout, 1),
            "timeout is not listed"
        );
        assert!(!p.should_retry(Outcome::Success, 1));
    }

    #[test]
    fn backoff_is_full_jitter_capped() {
        let p = policy();
        assert_eq!(p.backoff_ms(1, 0), 0);
        assert_eq!(p.backoff_ms(1, 50), 50);
        assert_eq!(p.backoff_ms(1, 51), 0, "the draw wraps within 0..=50");
        assert_eq!(p.backoff_ms(2, 100), 100);
        assert_eq!(p.backoff_ms(3, 200), 200);
        assert_eq!(p.backoff_ms(10, 1000), 1000, "capped at max");
        assert_eq!(p.backoff_ms(10, 1001), 0);
        assert_eq!(
            p.backoff_ms(40, u64::MAX),
            u64::MAX % 1001,
            "no overflow for large attempts"
        );
        for random in [3u64, 999, 123_456_789] {
            assert!(p.backoff_ms(2, random) <= 100);
        }
    }

    #[test]
    fn budget_caps_share_of_retries() {
        assert!(budget_allows(0, 0, 20, 3));
        assert!(budget_allows(2, 0, 20, 3));
        assert!(!budget_allows(3, 0, 20, 3));
        assert!(budget_allows(19, 100, 20, 3));
        assert!(!budget_allows(20, 100, 20, 3));
        assert!(
            !budget_allows(5, 10, 0, 0),
            "percent 0 and no minimum allows nothing"
        );
    }

    #[test]
    fn idempotency_key_stable_and_distinct() {
        let key = idempotency_key(b"req-1", "orders", "inventory");
        assert_eq!(key.len(), 32);
        assert_eq!(key, idempotency_key(b"req-1", "orders", "inventory"));
        assert_ne!(key, idempotency_key(b"req-2", "orders", "inventory"));
        assert_ne!(key, idempotency_key(b"req-1", "orders", "audit"));
        // The separators keep ("ab", "c") and ("a", "bc") apart.
        assert_ne!(
            idempotency_key(b"x", "ab", "c"),
            idempotency_key(b"x", "a", "bc")
        );
    }
}
