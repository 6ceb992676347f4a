//! Background workers: threads that run a task every so often and when woken, until
//! stopped. The store runs two (store.rs): one checkpoints, one writes the intent log ahead of
//! flushes. Each task returns `false` when it has nothing left to work for (its store is
//! gone), which ends its thread.

use std::{sync::Arc, thread::JoinHandle, time::Duration};

use parking_lot::{Condvar, Mutex};

#[derive(Default)]
struct Signal {
    stop: bool,
    wake: bool,
}

struct Worker {
    signal: Arc<(Mutex<Signal>, Condvar)>,
    thread: JoinHandle<()>,
}

/// A set of background workers, stopped together.
#[derive(Default)]
pub(super) struct Background {
    workers: Mutex<Vec<Worker>>,
}

/// Which worker to wake.
pub(super) type WorkerId = usize;

impl Background {
    /// Starts a thread named `name` running `task` every `every` and when woken. Returns its
    /// id, or `None` if no thread could be started (the caller says what that costs).
    pub fn start(
        &self,
        name: &str,
        every: Duration,
        task: impl Fn() -> bool + Send + 'static,
    ) -> std::io::Result<WorkerId> {
        let signal: Arc<(Mutex<Signal>, Condvar)> = Arc::default();
        let sig = signal.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let (m, cv) = &*sig;
                loop {
                    {
                        let mut s = m.lock();
                        if !s.stop && !s.wake {
                            cv.wait_for(&mut s, every);
                        }
                        if s.stop {
                            return;
                        }
                        s.wake = false;
                    }
                    if !task() {
                        return;
                    }
                }
            })?;
        let mut workers = self.workers.lock();
        workers.push(Worker { signal, thread });
        Ok(workers.len() - 1)
    }

    /// Whether worker `id` was started (and not stopped).
    pub fn running(&self, id: WorkerId) -> bool {
        self.workers
            .lock()
            .get(id)
            .is_some_and(|w| !w.thread.is_finished())
    }

    /// Has worker `id` run its task soon.
    pub fn wake(&self, id: WorkerId) {
        if let Some(w) = self.workers.lock().get(id) {
            let (m, cv) = &*w.signal;
            m.lock().wake = true;
            cv.notify_one();
        }
    }

    /// Stops every worker after the task it may be running, and waits for them (except a
    /// worker calling this itself, which ends when it returns).
    pub fn stop(&self) {
        let workers = std::mem::take(&mut *self.workers.lock());
        for w in &workers {
            let (m, cv) = &*w.signal;
            m.lock().stop = true;
            cv.notify_one();
        }
        for w in workers {
            if w.thread.thread().id() != std::thread::current().id() {
                let _ = w.thread.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn runs_when_woken_and_stops() {
        let bg = Background::default();
        let n = Arc::new(AtomicUsize::new(0));
        let n2 = n.clone();
        let id = bg
            .start("test-bg", Duration::from_secs(3600), move || {
                n2.fetch_add(1, Ordering::SeqCst);
                true
            })
            .unwrap();
        assert!(bg.running(id));
        bg.wake(id);
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while n.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < until, "the wake-up was lost");
            std::thread::yield_now();
        }
        bg.stop();
        assert!(!bg.running(id));
        let done = Background::default();
        let id = done.start("test-bg2", Duration::ZERO, || false).unwrap();
        done.stop();
        assert!(!done.running(id));
    }
}
