//! Sampling decisions that agree across hops, workers and restarts.
//!
//! A request is sampled in when `bucket(key) < percent × 10_000`, where
//! `bucket` is the FNV-1a 64-bit hash of the key's bytes, passed through the
//! splitmix64 finalizer and reduced modulo 1,000,000. Any proxy that uses
//! the same key and percentage takes the same decision for the same request.

/// One million buckets give sampling percentages four decimal places.
pub const BUCKETS: u64 = 1_000_000;

/// A sampling rate in parts per million, so 100 % is `BUCKETS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate(u32);

impl Rate {
    /// Converts a percentage that the caller has checked to be within 0..=100.
    pub fn from_percent(percent: f64) -> Rate {
        let parts = (percent * 10_000.0).round().clamp(0.0, BUCKETS as f64);
        Rate(parts as u32)
    }

    /// Returns the percentage this rate samples, a multiple of 0.0001.
    pub fn percent(self) -> f64 {
        f64::from(self.0) / 10_000.0
    }

    pub fn always(self) -> bool {
        u64::from(self.0) >= BUCKETS
    }

    pub fn never(self) -> bool {
        self.0 == 0
    }
}

/// Decides from the key when there is one, otherwise from `random`.
pub fn sampled_in(rate: Rate, key: Option<&[u8]>, random: impl FnOnce() -> u64) -> bool {
    if rate.always() {
        return true;
    }
    if rate.never() {
        return false;
    }
    let bucket = match key {
        Some(key) => bucket(key),
        None => random() % BUCKETS,
    };
    bucket < u64::from(rate.0)
}

/// Maps a key to a bucket in 0..BUCKETS.
pub fn bucket(key: &[u8]) -> u64 {
    splitmix64_finalize(fnv1a64(key)) % BUCKETS
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Spreads FNV's weak low bits before the modulo.
fn splitmix64_finalize(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A xorshift64* generator for requests without a sampling key. It only
/// needs to spread decisions evenly, not to be unpredictable.
#[derive(Debug, Clone)]
pub struct Xorshift64 {
    state: u64,
}

impl Xorshift64 {
    pub fn new(seed: u64) -> Xorshift64 {
        // The all-zero state would stay zero forever.
        Xorshift64 {
            state: splitmix64_finalize(seed) | 1,
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_same_decision() {
        let rate = Rate::from_percent(37.5);
        for i in 0..1000 {
            let key = format!("req-{i}");
            let first = sampled_in(rate, Some(key.as_bytes()), || 0);
            let again = sampled_in(rate, Some(key.as_bytes()), || u64::MAX);
            assert_eq!(first, again, "key {key}");
        }
    }

    #[test]
    fn known_buckets_are_stable() {
        // Pinned so a change to the hash, which would break agreement with
        // proxies still running the old version, fails here.
        assert_eq!(
            bucket(b""),
            splitmix64_finalize(0xcbf2_9ce4_8422_2325) % BUCKETS
        );
        assert_eq!(
            bucket(b"a"),
            splitmix64_finalize(0xaf63_dc4c_8601_ec8c) % BUCKETS
        );
    }

    #[test]
    fn rate_fraction_is_close() {
        let rate = Rate::from_percent(25.0);
        let hits = (0..100_000)
            .filter(|i| sampled_in(rate, Some(format!("id-{i}").as_bytes()), || 0))
            .count();
        assert!((24_000..26_000).contains(&hits), "hits {hits}");
    }

    #[test]
    fn bounds_and_rounding() {
        assert!(sampled_in(Rate::from_percent(100.0), Some(b"x"), || 0));
        assert!(!sampled_in(Rate::from_percent(0.0), Some(b"x"), || 0));
        assert_eq!(Rate::from_percent(0.00004), Rate(0));
        assert_eq!(Rate::from_percent(0.00005), Rate(1));
        assert_eq!(Rate::from_percent(100.0), Rate(1_000_000));
    }

    #[test]
    fn random_used_without_key() {
        let rate = Rate::from_percent(50.0);
        assert!(sampled_in(rate, None, || 10));
        assert!(!sampled_in(rate, None, || 999_999));
    }

    #[test]
    fn xorshift_spreads() {
        let mut rng = Xorshift64::new(0);
        let rate = Rate::from_percent(10.0);
        let hits = (0..100_000)
            .filter(|_| sampled_in(rate, None, || rng.next_u64()))
            .count();
        assert!((9_000..11_000).contains(&hits), "hits {hits}");
    }
}
