//! [`Signal`]: how the daemon tells a background thread (the snapshot scheduler, background
//! hydration) to look again now, or to end.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::{Condvar, Mutex};

#[derive(Default)]
struct State {
    stop: bool,
    wake: bool,
}

/// A stop-or-wake flag a thread waits on; clones share it.
#[derive(Clone, Default)]
pub struct Signal(Arc<(Mutex<State>, Condvar)>);

impl Signal {
    /// Ends the current (or next) [`Signal::wait`] early.
    pub fn wake(&self) {
        let (m, cv) = &*self.0;
        m.lock().wake = true;
        cv.notify_all();
    }

    /// Ends every wait, now and later.
    pub fn stop(&self) {
        let (m, cv) = &*self.0;
        m.lock().stop = true;
        cv.notify_all();
    }

    pub fn is_stopped(&self) -> bool {
        self.0 .0.lock().stop
    }

    /// Waits up to `d`, less if woken (which uses the wake up) or stopped; false once
    /// stopped.
    pub fn wait(&self, d: Duration) -> bool {
        let (m, cv) = &*self.0;
        let mut s = m.lock();
        if !s.stop && !s.wake {
            cv.wait_for(&mut s, d);
        }
        s.wake = false;
        !s.stop
    }

    /// Waits until `until`, ending early only if stopped; false once stopped.
    pub fn sleep_until(&self, until: Instant) -> bool {
        let (m, cv) = &*self.0;
        let mut s = m.lock();
        while !s.stop {
            let now = Instant::now();
            if now >= until {
                return true;
            }
            cv.wait_for(&mut s, until - now);
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wakes_and_stops() {
        let s = Signal::default();
        s.wake();
        let t = Instant::now();
        assert!(s.wait(Duration::from_secs(10)), "a wake ends the wait");
        assert!(t.elapsed() < Duration::from_secs(5));
        let c = s.clone();
        let h = std::thread::spawn(move || c.sleep_until(Instant::now() + Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(50));
        s.stop();
        assert!(!h.join().unwrap(), "a stop ends a sleep");
        assert!(s.is_stopped() && !s.wait(Duration::from_secs(10)));
    }
}
