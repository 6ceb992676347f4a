//! A log rate limiter for messages a client can trigger: a burst per window, then silence,
//! then one line saying how many were dropped.

use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct RateLimit {
    window: Duration,
    burst: u32,
    start: Instant,
    used: u32,
    suppressed: u64,
}

impl RateLimit {
    pub fn new(window: Duration, burst: u32) -> Self {
        RateLimit {
            window,
            burst,
            start: Instant::now(),
            used: 0,
            suppressed: 0,
        }
    }

    /// True if a message may be logged now.
    pub fn allow(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.start) >= self.window {
            if self.suppressed > 0 {
                tracing::warn!(
                    suppressed = self.suppressed,
                    "nbd: client warnings suppressed"
                );
            }
            self.start = now;
            self.used = 0;
            self.suppressed = 0;
        }
        if self.used < self.burst {
            self.used += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit::new(Duration::from_secs(10), 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_suppresses() {
        let mut r = RateLimit::new(Duration::from_secs(3600), 3);
        assert_eq!((0..5).filter(|_| r.allow()).count(), 3);
        assert_eq!(r.suppressed, 2);
        let mut r = RateLimit::new(Duration::ZERO, 1);
        assert!(r.allow() && r.allow());
    }
}
