//! Rate limiting for log lines a client or guest can trigger: one that sends garbage in a loop
//! must not be able to flood the host's logs. One type for every front end and the store.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Allows `burst` lines per `window`; counts what it suppresses.
#[derive(Debug)]
pub struct RateLimit {
    window: Duration,
    burst: u32,
    start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl RateLimit {
    pub const fn new(burst: u32, window: Duration) -> Self {
        RateLimit {
            window,
            burst,
            start: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// Whether to log now. On `Some(n)`, `n` lines were suppressed since the last one logged
    /// (say so in the line).
    pub fn check(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.start {
            Some(s) if now.duration_since(s) < self.window => {}
            _ => {
                self.start = Some(now);
                self.used = 0;
            }
        }
        if self.used < self.burst {
            self.used += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }

    /// Whether to log now; a line about what was suppressed since is logged first.
    pub fn allow(&mut self) -> bool {
        match self.check() {
            Some(0) => true,
            Some(n) => {
                tracing::warn!(suppressed = n, "similar warnings suppressed");
                true
            }
            None => false,
        }
    }
}

impl Default for RateLimit {
    /// Ten lines per ten seconds.
    fn default() -> Self {
        RateLimit::new(10, Duration::from_secs(10))
    }
}

/// A [`RateLimit`] shared between threads (for paths without an owner to hold one).
#[derive(Debug)]
pub struct SharedRateLimit(Mutex<RateLimit>);

impl SharedRateLimit {
    pub const fn new(burst: u32, window: Duration) -> Self {
        SharedRateLimit(Mutex::new(RateLimit::new(burst, window)))
    }

    pub fn check(&self) -> Option<u64> {
        self.0.lock().check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_bursts_and_counts_what_it_suppressed() {
        let mut r = RateLimit::new(2, Duration::from_secs(3600));
        assert_eq!(r.check(), Some(0));
        assert_eq!(r.check(), Some(0));
        assert_eq!(r.check(), None);
        assert!(!r.allow());
        let mut r = RateLimit::new(1, Duration::ZERO);
        assert_eq!(r.check(), Some(0));
        assert_eq!(r.check(), Some(0));
        let mut r = RateLimit::new(1, Duration::from_millis(20));
        assert_eq!(r.check(), Some(0));
        assert_eq!(r.check(), None);
        assert_eq!(r.check(), None);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(r.check(), Some(2), "the next line says two were suppressed");
        let s = SharedRateLimit::new(1, Duration::from_secs(3600));
        assert_eq!(s.check(), Some(0));
        assert_eq!(s.check(), None);
    }
}
