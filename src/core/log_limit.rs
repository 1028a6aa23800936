//! Rate limiting for repeated log lines: a failing target can fail every
//! request, and one log line per request would flood Envoy's log.

/// Allows at most `max_per_window` lines per window, per worker. The caller
/// supplies the clock so the limiter stays testable.
#[derive(Debug)]
pub struct LogLimiter {
    window_ms: u64,
    max_per_window: u32,
    window_start_ms: u64,
    emitted: u32,
    suppressed: u64,
}

/// What the caller should do with one log line.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed_before` lines were dropped since the last one
    /// that was logged, and the line should say so.
    Emit {
        suppressed_before: u64,
    },
    Suppress,
}

impl LogLimiter {
    pub fn new(window_ms: u64, max_per_window: u32) -> LogLimiter {
        LogLimiter {
            window_ms,
            max_per_window,
            window_start_ms: 0,
            emitted: 0,
            suppressed: 0,
        }
    }

    pub fn check(&mut self, now_ms: u64) -> Verdict {
        if now_ms.saturating_sub(self.window_start_ms) >= self.window_ms {
            self.window_start_ms = now_ms;
            self.emitted = 0;
        }
        if self.emitted >= self.max_per_window {
            self.suppressed = self.suppressed.saturating_add(1);
            return Verdict::Suppress;
        }
        self.emitted += 1;
        let suppressed_before = std::mem::take(&mut self.suppressed);
        Verdict::Emit { suppressed_before }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_within_window() {
        let mut limiter = LogLimiter::new(1000, 2);
        assert_eq!(
            limiter.check(5000),
            Verdict::Emit {
                suppressed_before: 0
            }
        );
        assert_eq!(
            limiter.check(5001),
            Verdict::Emit {
                suppressed_before: 0
            }
        );
        assert_eq!(limiter.check(5002), Verdict::Suppress);
        assert_eq!(limiter.check(5999), Verdict::Suppress);
        assert_eq!(
            limiter.check(6000),
            Verdict::Emit {
                suppressed_before: 2
            }
        );
        assert_eq!(
            limiter.check(6001),
            Verdict::Emit {
                suppressed_before: 0
            }
        );
    }

    #[test]
    fn clock_going_backwards_is_harmless() {
        let mut limiter = LogLimiter::new(1000, 1);
        assert_eq!(
            limiter.check(5000),
            Verdict::Emit {
                suppressed_before: 0
            }
        );
        assert_eq!(limiter.check(10), Verdict::Suppress);
    }
}
