//! Rate limiting for log lines a guest can trigger: a guest that sends garbage in a loop must
//! not be able to flood the host's logs.

use std::time::{Duration, Instant};

/// Allows `burst` events per `window`; counts what it suppresses.
#[derive(Debug)]
pub struct RateLimit {
    window: Duration,
    burst: u32,
    start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl RateLimit {
    pub fn new(burst: u32, window: Duration) -> Self {
        RateLimit {
            window,
            burst,
            start: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// Whether to log now. On `Some(n)`, `n` lines were suppressed since the last one logged.
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
}

impl Default for RateLimit {
    /// Ten lines per ten seconds.
    fn default() -> Self {
        RateLimit::new(10, Duration::from_secs(10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_bursts() {
        let mut r = RateLimit::new(2, Duration::from_secs(3600));
        assert_eq!(r.check(), Some(0));
        assert_eq!(r.check(), Some(0));
        assert_eq!(r.check(), None);
        assert_eq!(r.check(), None);
        let mut r = RateLimit::new(1, Duration::ZERO);
        assert_eq!(r.check(), Some(0));
        assert_eq!(r.check(), Some(0));
    }
}
