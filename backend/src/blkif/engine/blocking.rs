//! Requests that wait for a device, run side by side.
//!
//! A queue thread answers what it can without waiting (reads the page cache holds, writes,
//! discards). The rest of a round — reads of data not in memory, flushes — would each hold up
//! every request behind it if the queue ran them one after the other: with 32 reads in flight
//! on a cold disk, the device would see one at a time. They run here instead, on the queue
//! thread and up to [`IO_THREADS`] threads of a pool shared by every device, each thread
//! taking the next request as it finishes one.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    OnceLock,
};

use super::exec::{Executed, Executor, Scratch};
use crate::blkif::{
    abi::{BlkifResponse, EntryBytes},
    transport::Transport,
};

/// Threads that run waiting requests besides the queue threads (they mostly sleep in the
/// kernel, so there are more of them than CPUs: they are what keeps a device busy).
pub(super) const IO_THREADS: usize = 16;

/// A request's response, and what to log if it failed (its operation and why).
pub(super) type Answer = (BlkifResponse, Option<(u8, String)>);

/// The shared pool; `None` if its threads could not be started (then requests run in turn).
fn io_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(IO_THREADS)
            .thread_name(|i| format!("blkif-io-{i}"))
            .build()
            .map_err(|e| tracing::warn!("blkif: no I/O threads ({e}); requests run in turn"))
            .ok()
    })
    .as_ref()
}

/// Runs the requests `which` (indexes into `batch`) to completion, side by side, and puts
/// each one's answer at its index in `answers`. `scratch` grows to one per thread used.
pub(super) fn run_blocking<T: Transport>(
    exec: &Executor<T>,
    scratch: &mut Vec<Scratch>,
    batch: &[EntryBytes],
    which: &[usize],
    answers: &mut [Option<Answer>],
) {
    let threads = which.len().min(IO_THREADS + 1);
    let pool = if threads > 1 { io_pool() } else { None };
    if scratch.len() < threads.max(1) {
        scratch.resize_with(threads.max(1), Scratch::default);
    }
    let Some(pool) = pool else {
        for &i in which {
            answers[i] = Some(complete(exec, &mut scratch[0], &batch[i]));
        }
        return;
    };
    let next = AtomicUsize::new(0);
    let work = |sc: &mut Scratch, out: &mut Vec<(usize, Answer)>| {
        while let Some(&i) = which.get(next.fetch_add(1, Ordering::Relaxed)) {
            out.push((i, complete(exec, sc, &batch[i])));
        }
    };
    let mut outs: Vec<Vec<(usize, Answer)>> = (0..threads).map(|_| Vec::new()).collect();
    let (first_sc, other_sc) = scratch.split_first_mut().expect("scratch for this thread");
    let (first_out, other_outs) = outs.split_first_mut().expect("one output per thread");
    pool.in_place_scope(|s| {
        let work = &work;
        for (sc, out) in other_sc.iter_mut().zip(other_outs.iter_mut()) {
            s.spawn(move |_| work(sc, out));
        }
        work(first_sc, first_out);
    });
    for (i, a) in outs.into_iter().flatten() {
        answers[i] = Some(a);
    }
}

/// Runs one request, waiting for the device as long as it takes.
fn complete<T: Transport>(exec: &Executor<T>, sc: &mut Scratch, entry: &EntryBytes) -> Answer {
    match exec.execute(sc, entry, false) {
        Executed::Done(rsp, failure) => (rsp, failure),
        Executed::WouldBlock => unreachable!("a request run without nowait always completes"),
    }
}
