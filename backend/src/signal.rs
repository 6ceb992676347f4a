//! [`Signal`]: how the daemon tells a background thread (the snapshot scheduler, background
//! hydration) to look again now, or to end; [`Worker`]: such a thread.

use std::{
    sync::Arc,
    thread::JoinHandle,
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

/// A named background thread that runs until told to stop through its [`Signal`].
pub struct Worker {
    signal: Signal,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts thread `name` running `body` with the signal that wakes or stops it.
    pub fn spawn(
        name: &str,
        body: impl FnOnce(&Signal) + Send + 'static,
    ) -> std::io::Result<Worker> {
        let signal = Signal::default();
        let sig = signal.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || body(&sig))?;
        Ok(Worker {
            signal,
            thread: Some(thread),
        })
    }

    /// What wakes the thread (cheap to clone and keep).
    pub fn waker(&self) -> Signal {
        self.signal.clone()
    }

    /// Stops the thread and waits for it (it ends at its next wait).
    pub fn stop(mut self) {
        self.signal.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
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
