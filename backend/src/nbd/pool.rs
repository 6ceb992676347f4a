//! Worker threads that run blocking disk and catalogue calls off the event loop. Each job
//! carries the connection it belongs to; its completion goes back through a channel, and the
//! loop is woken through a [`mio::Waker`] (at most one wake-up per drain).

use std::{
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
};

use crossbeam_channel::{Receiver, Sender};

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

/// The pool: submit jobs, drain completions.
pub struct Pool<T: Send + 'static> {
    jobs: Option<Sender<Job<T>>>,
    done: Receiver<(ConnId, T)>,
    notifier: Arc<Notifier>,
    threads: Vec<JoinHandle<()>>,
}

impl<T: Send + 'static> Pool<T> {
    pub fn new(workers: usize, waker: Arc<mio::Waker>) -> std::io::Result<Self> {
        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded::<Job<T>>();
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let notifier = Arc::new(Notifier {
            waker,
            pending: AtomicBool::new(false),
        });
        let mut threads = Vec::new();
        for i in 0..workers.max(1) {
            let jobs = jobs_rx.clone();
            let done = done_tx.clone();
            let notifier = notifier.clone();
            let t = std::thread::Builder::new()
                .name(format!("nbd-worker-{i}"))
                .spawn(move || {
                    for job in jobs.iter() {
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
                })?;
            threads.push(t);
        }
        Ok(Pool {
            jobs: Some(jobs_tx),
            done: done_rx,
            notifier,
            threads,
        })
    }

    pub fn submit(&self, job: Job<T>) {
        if let Some(tx) = &self.jobs {
            // The receivers live as long as the threads, which outlive `jobs`.
            let _ = tx.send(job);
        }
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
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl<T: Send + 'static> Drop for Pool<T> {
    /// Without [`Pool::join`], workers are left to finish their current job and exit on
    /// their own: a disk call that hangs must not hang the caller too.
    fn drop(&mut self) {
        self.jobs = None;
    }
}
