//! One queue's thread: consumes its ring and answers every request (see the engine's docs for
//! the ring protocol it follows).

use std::{
    collections::HashSet,
    sync::{
        atomic::{fence, Ordering},
        Arc,
    },
};

use super::{
    blocking::{run_blocking, Answer},
    exec::{Executed, Executor, Scratch},
    grants::KeptGrants,
    split::split_parts,
    Shared,
};
use crate::{
    blkif::{
        abi::{
            BlkifRequest, BlkifResponse, EntryBytes, RingIdx, BLKIF_OP_WRITE_BARRIER,
            BLKIF_RSP_OKAY,
        },
        event::poll_readable,
        request::Limits,
        ring::{need_notify, SharedRing},
        transport::{EventChannel, Transport},
    },
    disk::Disk,
    ratelimit::RateLimit,
};

/// One queue's state: the backend's private ring indexes and reusable buffers.
pub(super) struct Queue<T: Transport> {
    pub(super) index: usize,
    ring: SharedRing,
    event: T::Event,
    exec: Executor<T>,
    shared: Arc<Shared>,
    pub(super) size: u32,
    /// Next request to consume (private: never read back from the ring).
    pub(super) req_cons: RingIdx,
    /// Next response slot.
    pub(super) rsp_prod_pvt: RingIdx,
    /// The `rsp_prod` value last published.
    pub(super) rsp_published: RingIdx,
    batch: Vec<EntryBytes>,
    in_flight: HashSet<u64>,
    /// Buffers of this thread (the first) and of the I/O threads working for this queue.
    scratch: Vec<Scratch>,
    /// The round's answers, by position in the batch.
    answers: Vec<Option<Answer>>,
    /// Positions in the batch of requests that must wait for a device.
    waiting: Vec<usize>,
    log: RateLimit,
}

impl<T: Transport> Queue<T> {
    pub(super) fn new(
        index: usize,
        transport: Arc<T>,
        ring: SharedRing,
        event: T::Event,
        disk: Arc<dyn Disk>,
        limits: Limits,
        shared: Arc<Shared>,
    ) -> Self {
        let size = ring.size();
        Queue {
            index,
            ring,
            event,
            exec: Executor {
                transport,
                disk,
                limits,
                parts: split_parts(),
                kept: None,
                shared: shared.clone(),
            },
            shared,
            size,
            req_cons: 0,
            rsp_prod_pvt: 0,
            rsp_published: 0,
            batch: Vec::with_capacity(size as usize),
            in_flight: HashSet::with_capacity(size as usize),
            scratch: vec![Scratch::default()],
            answers: Vec::with_capacity(size as usize),
            waiting: Vec::new(),
            log: RateLimit::default(),
        }
    }

    /// Keeps the grants of requests mapped (persistent grants were negotiated).
    pub(super) fn keep_grants(&mut self) {
        self.exec.kept = Some(KeptGrants::new());
    }

    pub(super) fn run(mut self) {
        let span = tracing::info_span!("blkif", device = %self.shared.name, queue = self.index);
        let _enter = span.enter();
        if let Err(why) = self.serve_loop() {
            self.shared.set_fault(why);
            return;
        }
        // Graceful stop: answer what the guest had posted (one ring's worth at most), so no
        // request seen before the stop is left without a response.
        if let Err(why) = self.round() {
            self.shared.set_fault(why);
        }
        tracing::debug!("queue stopped");
    }

    /// Serves until asked to stop. `Err` is a fault that shuts the device down.
    fn serve_loop(&mut self) -> Result<(), String> {
        loop {
            self.serve_until_idle()?;
            if self.shared.stop.is_set() {
                return Ok(());
            }
            let ready = poll_readable(&[self.event.fd(), self.shared.stop.fd()], None)
                .map_err(|e| format!("waiting for the event channel: {e}"))?;
            if ready[1] {
                return Ok(());
            }
            if ready[0] {
                self.shared.stats.kicks.fetch_add(1, Ordering::Relaxed);
                self.event
                    .clear()
                    .map_err(|e| format!("event channel: {e}"))?;
            }
        }
    }

    /// Rounds of at most one ring each until the ring is empty and `req_event` is re-armed.
    fn serve_until_idle(&mut self) -> Result<(), String> {
        loop {
            if self.shared.stop.is_set() {
                return Ok(());
            }
            if self.round()? > 0 {
                continue;
            }
            // RING_FINAL_CHECK_FOR_REQUESTS: ask for a kick at the next request, then look
            // again in case it arrived before the request for a kick was visible.
            self.ring.set_req_event(self.req_cons.wrapping_add(1));
            fence(Ordering::SeqCst);
            if self.ring.req_prod() == self.req_cons {
                return Ok(());
            }
        }
    }

    /// Consumes and answers up to one ring's worth of requests; returns how many.
    fn round(&mut self) -> Result<usize, String> {
        let prod = self.ring.req_prod();
        // Every request consumed earlier has been answered, so req_cons == rsp_prod_pvt and
        // the guest may have at most one ring of requests outstanding
        // (RING_REQUEST_PROD_OVERFLOW).
        let pending = prod.wrapping_sub(self.rsp_prod_pvt);
        if pending > self.size {
            return Err(format!(
                "req_prod {prod} runs {pending} entries ahead of the responses ({}), more than the ring's {}",
                self.rsp_prod_pvt, self.size
            ));
        }
        if pending == 0 {
            return Ok(0);
        }
        self.batch.clear();
        self.in_flight.clear();
        for i in 0..pending {
            let entry = self.ring.read_entry(self.req_cons.wrapping_add(i));
            let id = BlkifRequest::decode(&entry).id;
            if !self.in_flight.insert(id) {
                return Err(format!("request id {id:#x} is already in flight"));
            }
            self.batch.push(entry);
        }
        self.req_cons = prod;
        let batch = std::mem::take(&mut self.batch);
        self.answer(&batch);
        let mut answers = std::mem::take(&mut self.answers);
        for (rsp, failure) in answers.drain(..).flatten() {
            if let Some((op, why)) = failure {
                self.warn(rsp.id, op, &why);
            }
            self.respond(&rsp);
        }
        self.answers = answers;
        self.batch = batch;
        // One publish (and at most one notification) per round, like
        // RING_PUSH_RESPONSES_AND_CHECK_NOTIFY after a batch: publishing each response on its
        // own woke the frontend once per request.
        self.publish()?;
        Ok(pending as usize)
    }

    /// Runs the round's requests and leaves an answer for each in `self.answers`.
    ///
    /// Requests that can complete without waiting for a device run here, in ring order; the
    /// others wait for each other only, side by side (`blocking.rs`). A write barrier orders
    /// the requests around it: everything before it completes first, and nothing after it
    /// starts until it has. Other requests in flight together have no order among themselves
    /// (as for any block device), so a read and a write of the same sector may pass each other.
    fn answer(&mut self, batch: &[EntryBytes]) {
        self.answers.clear();
        self.answers.resize_with(batch.len(), || None);
        let mut start = 0;
        while start < batch.len() {
            let end = batch[start..]
                .iter()
                .position(|e| BlkifRequest::decode(e).operation == BLKIF_OP_WRITE_BARRIER)
                .map_or(batch.len(), |p| start + p);
            self.waiting.clear();
            for (i, entry) in batch.iter().enumerate().take(end).skip(start) {
                match self.exec.execute(&mut self.scratch[0], entry, true) {
                    Executed::Done(rsp, failure) => self.answers[i] = Some((rsp, failure)),
                    Executed::WouldBlock => self.waiting.push(i),
                }
            }
            let waiting = &self.waiting;
            run_blocking(
                &self.exec,
                &mut self.scratch,
                batch,
                waiting,
                &mut self.answers,
            );
            if end < batch.len() {
                // The barrier, once everything before it is done.
                run_blocking(
                    &self.exec,
                    &mut self.scratch,
                    batch,
                    &[end],
                    &mut self.answers,
                );
            }
            start = end + 1;
        }
    }

    /// Writes a response into the ring, unpublished until [`Self::publish`].
    pub(super) fn respond(&mut self, rsp: &BlkifResponse) {
        self.shared.stats.requests.fetch_add(1, Ordering::Relaxed);
        if rsp.status != BLKIF_RSP_OKAY {
            self.shared.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.ring.write_response(self.rsp_prod_pvt, rsp);
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
    }

    /// Publishes the responses written so far; notifies the guest if it asked.
    fn publish(&mut self) -> Result<(), String> {
        let old = self.rsp_published;
        let new = self.rsp_prod_pvt;
        if new == old {
            return Ok(());
        }
        // Release store: the response is visible before the new producer index.
        self.ring.set_rsp_prod(new);
        self.rsp_published = new;
        // Full barrier: the guest sees the new rsp_prod before we read its rsp_event.
        fence(Ordering::SeqCst);
        if need_notify(new, old, self.ring.rsp_event()) {
            self.shared.stats.notifies.fetch_add(1, Ordering::Relaxed);
            self.event
                .notify()
                .map_err(|e| format!("notifying the frontend: {e}"))?;
        }
        Ok(())
    }

    fn warn(&mut self, id: u64, op: u8, why: &str) {
        if let Some(suppressed) = self.log.check() {
            tracing::warn!(
                id,
                op = crate::blkif::abi::op_name(op),
                suppressed,
                "blkif request failed: {why}"
            );
        }
    }
}
