//! Worker threads that run blocking disk and catalogue calls off the event loop. Each job
//! carries the connection it belongs to; its completion goes back through a channel, and the
//! loop is woken through a [`mio::Waker`] (at most one wake-up per drain).
//!
//! Jobs wait in a queue under a mutex. Waking a sleeping worker costs a context switch, which
//! for a 4 KiB read from the page cache is more than the read itself, so the pool wakes as few
//! as it can: a submit wakes a worker only if none is already on its way, and a worker that
//! takes a job while more are queued wakes the next one (so slow disk calls still run in
//! parallel). Idle workers sleep at once instead of spinning.

use std::{
    collections::VecDeque,
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex, MutexGuard,
    },
    thread::JoinHandle,
};

use crossbeam_channel::Receiver;

/// A connection slot plus the generation that was in it when the job was made: slab keys are
/// reused, so a completion whose generation no longer matches is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnId {
    pub key: usize,
    pub gen: u64,
}

/// A unit of blocking work. `fallback` is delivered instead of the result if `work` panics,
/// so the connection still gets an answer.
pub struct Job<T> {
    pub conn: ConnId,
    pub work: Box<dyn FnOnce() -> T + Send>,
    pub fallback: T,
}

/// Tells the event loop that completions are waiting.
struct Notifier {
    waker: Arc<mio::Waker>,
    pending: AtomicBool,
}

/// Jobs not yet taken by a worker, and who is asleep.
struct State<T> {
    jobs: VecDeque<Job<T>>,
    /// No more jobs will come: workers finish the queue, then exit.
    closed: bool,
    /// Workers waiting on [`Queue::ready`].
    sleeping: usize,
    /// A worker has been woken and has not looked at the queue yet.
    waking: bool,
}

struct Queue<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
}

impl<T> Queue<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Jobs run outside the lock and panics are caught, so poisoning cannot leave the
        // state half-changed; carry on with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes one sleeping worker unless one is already on its way (called with the lock held).
    fn wake_one(&self, st: &mut State<T>) {
        if !st.waking && st.sleeping > 0 {
            st.waking = true;
            self.ready.notify_one();
        }
    }

    /// The next job for a worker; `None` once the pool is closed and the queue is empty.
    fn take(&self) -> Option<Job<T>> {
        let mut st = self.lock();
        loop {
            if let Some(job) = st.jobs.pop_front() {
                if !st.jobs.is_empty() {
                    self.wake_one(&mut st);
                }
                return Some(job);
            }
            if st.closed {
                return None;
            }
            st.sleeping += 1;
            st = self.ready.wait(st).unwrap_or_else(|e| e.into_inner());
            st.sleeping -= 1;
            // Whoever woke us (or a spurious wake-up) is handled now: let the next submit wake
            // another worker if this one finds nothing.
            st.waking = false;
        }
    }
}

/// The pool: submit jobs, drain completions.
pub struct Pool<T: Send + 'static> {
    queue: Arc<Queue<T>>,
    done: Receiver<(ConnId, T)>,
    notifier: Arc<Notifier>,
    threads: Vec<JoinHandle<()>>,
}

impl<T: Send + 'static> Pool<T> {
    pub fn new(workers: usize, waker: Arc<mio::Waker>) -> std::io::Result<Self> {
        let queue = Arc::new(Queue {
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                closed: false,
                sleeping: 0,
                waking: false,
            }),
            ready: Condvar::new(),
        });
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let notifier = Arc::new(Notifier {
            waker,
            pending: AtomicBool::new(false),
        });
        let mut threads = Vec::new();
        for i in 0..workers.max(1) {
            let q = queue.clone();
            let done = done_tx.clone();
            let notifier = notifier.clone();
            let t = std::thread::Builder::new()
                .name(format!("nbd-worker-{i}"))
                .spawn(move || {
                    while let Some(job) = q.take() {
                        let Job {
                            conn,
                            work,
                            fallback,
                        } = job;
                        let result = catch_unwind(AssertUnwindSafe(work)).unwrap_or(fallback);
                        if done.send((conn, result)).is_err() {
                            return;
                        }
                        // Wake the loop unless a wake-up is already pending; the loop clears the
                        // flag before it drains, so no completion is left behind.
                        if !notifier.pending.swap(true, Ordering::AcqRel) {
                            let _ = notifier.waker.wake();
                        }
                    }
                });
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    close(&queue);
                    return Err(e);
                }
            }
        }
        Ok(Pool {
            queue,
            done: done_rx,
            notifier,
            threads,
        })
    }

    pub fn submit(&self, job: Job<T>) {
        let mut st = self.queue.lock();
        if st.closed {
            return;
        }
        st.jobs.push_back(job);
        self.queue.wake_one(&mut st);
    }

    /// Takes every completion that has arrived.
    pub fn drain(&self, mut f: impl FnMut(ConnId, T)) {
        self.notifier.pending.store(false, Ordering::Release);
        while let Ok((conn, result)) = self.done.try_recv() {
            f(conn, result);
        }
    }

    /// Lets the workers finish the queued jobs, then joins them.
    pub fn join(mut self) {
        close(&self.queue);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// No more jobs: wakes every worker so that each finishes the queue and exits.
fn close<T>(queue: &Queue<T>) {
    queue.lock().closed = true;
    queue.ready.notify_all();
}

impl<T: Send + 'static> Drop for Pool<T> {
    /// Without [`Pool::join`], workers are left to finish their current job and exit on
    /// their own: a disk call that hangs must not hang the caller too.
    fn drop(&mut self) {
        close(&self.queue);
    }
}
