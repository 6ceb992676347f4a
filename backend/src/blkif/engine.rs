//! The ring engine: one thread per queue, each consuming its ring and answering every request.
//!
//! ```text
//!            kick (event channel)                        notify if rsp_event asks
//!  guest ──────────────────────────► queue thread ─────────────────────────────► guest
//!            req_prod ─► copy ≤ one ring of entries ─► decode/validate ─► Disk ─► response
//!                                                           │ (reject) ─────────► error response
//!                               req_prod > a ring ahead, duplicate id ─► device shut down
//! ```
//!
//! The loop follows ring.h exactly: read `req_prod` (Acquire = `rmb`), copy the entries out,
//! answer each (write the response, publish `rsp_prod` with Release = `wmb`, full fence, then
//! notify only if `(new - rsp_event) < (new - old)`), and when the ring looks empty re-arm
//! `req_event = req_cons + 1`, fence, and look again (`RING_FINAL_CHECK_FOR_REQUESTS`).
//! Each round takes at most one ring's worth of requests and checks for a stop request
//! between rounds. Requests of one queue are served in order; queues are independent.
//!
//! A large READ or WRITE (at least [`SPLIT_BYTES`]) is split at block boundaries between the
//! queue thread and a shared pool (rayon's, threads named `blkif-split-N`), since one thread
//! reading a 1 MiB request (store read, every block's checksum verified) leaves the other CPUs
//! idle when the guest has only a few large requests in flight. The request completes when
//! every part has. (Starting a thread per part instead cost as much as it saved.)

use std::{
    collections::HashSet,
    sync::{
        atomic::{fence, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
};

use parking_lot::Mutex;
use xen_sys::evtchn_port_t;

use super::{
    abi::{
        BlkifRequestSegment, BlkifResponse, EntryBytes, GrantRef, RingIdx, BLKIF_RSP_EOPNOTSUPP,
        BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, MAX_RING_PAGE_ORDER, PAGE_SIZE, PROTOCOL_X86_64, SECTOR,
        SEGMENTS_PER_INDIRECT_PAGE,
    },
    event::{poll_readable, StopSignal},
    features::Features,
    mem::{coalesce, copy_from_guest, with_guest_slice_mut, GuestPages, GuestRange},
    request::{self, DataOp, Limits, Request},
    ring::{need_notify, SharedRing},
    transport::{EventChannel, Transport, TransportError},
};
use crate::{
    disk::{Disk, DiskError},
    ratelimit::RateLimit,
};

/// One queue's negotiated transport parameters (xenstore `ring-ref*`, `event-channel`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueParams {
    /// Grant references of the ring pages, `2^ring_order` of them, in page order.
    pub ring_refs: Vec<GrantRef>,
    /// The frontend's event channel port for this queue.
    pub event_channel: evtchn_port_t,
}

/// Everything negotiated for one device, as the xenbus backend (or the local attach) learned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceParams {
    /// A name for logs (VDI name, or `vbd-<domid>-<devid>`).
    pub name: String,
    /// `ring-page-order` (0 when the frontend wrote none).
    pub ring_order: u32,
    /// One entry per queue (`multi-queue-num-queues`, or one).
    pub queues: Vec<QueueParams>,
    /// The frontend's `protocol` node; `None` means native. Only the x86_64 ABI is served.
    pub protocol: Option<String>,
    /// Serve read-only (also implied by a read-only disk).
    pub read_only: bool,
    /// What the backend advertised; requests beyond it are refused.
    pub features: Features,
}

/// Why a device could not be started.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("invalid parameters: {0}")]
    Params(String),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Ring(#[from] super::ring::RingError),
    #[error("starting a queue thread: {0}")]
    Io(#[from] std::io::Error),
}

/// Counters of a running device (all queues).
#[derive(Debug, Default)]
pub struct DeviceStats {
    pub requests: AtomicU64,
    /// Requests answered with an error status.
    pub errors: AtomicU64,
    /// Kicks received.
    pub kicks: AtomicU64,
    /// Notifications sent.
    pub notifies: AtomicU64,
}

/// A plain copy of [`DeviceStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub requests: u64,
    pub errors: u64,
    pub kicks: u64,
    pub notifies: u64,
}

/// How a device ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceEnd {
    /// Stopped on request; requests seen before the stop were answered.
    Stopped,
    /// Shut down because the frontend broke the protocol, or the transport failed.
    Fault(String),
}

struct Shared {
    name: String,
    stop: StopSignal,
    fault: Mutex<Option<String>>,
    stats: DeviceStats,
}

impl Shared {
    fn set_fault(&self, why: String) {
        let mut f = self.fault.lock();
        if f.is_none() {
            tracing::warn!(device = %self.name, "blkif device shut down: {why}");
            *f = Some(why);
        }
        drop(f);
        self.stop.signal();
    }
}

/// A running device: its queue threads. Dropping it stops the device and waits for the threads.
pub struct Device {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Device {
    /// The signal that stops the device (e.g. to keep in a registry). Once signalled — by a
    /// stop request or by a fault — its descriptor stays readable.
    pub fn stop_signal(&self) -> StopSignal {
        self.shared.stop.clone()
    }

    /// Asks every queue to answer what it has seen and exit.
    pub fn stop(&self) {
        self.shared.stop.signal();
    }

    /// Whether the device stopped or was asked to.
    pub fn is_stopping(&self) -> bool {
        self.shared.stop.is_set()
    }

    /// The reason the device was shut down, if it was.
    pub fn fault(&self) -> Option<String> {
        self.shared.fault.lock().clone()
    }

    pub fn stats(&self) -> StatsSnapshot {
        let s = &self.shared.stats;
        StatsSnapshot {
            requests: s.requests.load(Ordering::Relaxed),
            errors: s.errors.load(Ordering::Relaxed),
            kicks: s.kicks.load(Ordering::Relaxed),
            notifies: s.notifies.load(Ordering::Relaxed),
        }
    }

    /// Waits for every queue thread to exit (call [`Device::stop`] first, or wait for a fault).
    pub fn join(mut self) -> DeviceEnd {
        self.join_threads();
        match self.fault() {
            Some(f) => DeviceEnd::Fault(f),
            None => DeviceEnd::Stopped,
        }
    }

    fn join_threads(&mut self) {
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                self.shared.set_fault("a queue thread panicked".to_string());
            }
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.shared.stop.signal();
        self.join_threads();
    }
}

/// Starts serving a connected frontend: maps each queue's ring, binds its event channel, and
/// starts one thread per queue over `disk`.
///
/// This is the entry point for the xenbus backend (with [`super::xen::XenTransport`]) and the
/// local attach (with [`super::local::LocalTransport`]).
pub fn start_device<T: Transport>(
    transport: Arc<T>,
    params: DeviceParams,
    disk: Arc<dyn Disk>,
) -> Result<Device, EngineError> {
    // Name the pool that large requests are split on, for `top -H` and profiles. Fails
    // harmlessly if the pool already exists.
    let _ = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("blkif-split-{i}"))
        .build_global();
    let features = params.features.clamped();
    if params.ring_order > features.max_ring_page_order || params.ring_order > MAX_RING_PAGE_ORDER {
        return Err(EngineError::Params(format!(
            "ring-page-order {} exceeds max-ring-page-order {}",
            params.ring_order, features.max_ring_page_order
        )));
    }
    let nq = params.queues.len();
    if nq == 0 || nq > features.max_queues as usize {
        return Err(EngineError::Params(format!(
            "{nq} queues requested, between 1 and {} supported",
            features.max_queues
        )));
    }
    match params.protocol.as_deref() {
        None | Some("") | Some(PROTOCOL_X86_64) => {}
        Some(other) => {
            return Err(EngineError::Params(format!(
                "ring protocol {other:?} is not supported"
            )))
        }
    }
    let pages = 1usize << params.ring_order;
    for (i, q) in params.queues.iter().enumerate() {
        if q.ring_refs.len() != pages {
            return Err(EngineError::Params(format!(
                "queue {i}: {} ring refs for a ring of {pages} pages",
                q.ring_refs.len()
            )));
        }
    }
    let limits = Limits {
        disk_bytes: disk.size() / SECTOR * SECTOR,
        read_only: params.read_only || disk.read_only(),
        flush: features.flush,
        barrier: features.barrier,
        discard: features.discard,
        discard_secure: features.discard_secure,
        max_indirect_segments: features.max_indirect_segments as usize,
    };
    let shared = Arc::new(Shared {
        name: params.name.clone(),
        stop: StopSignal::new()?,
        fault: Mutex::new(None),
        stats: DeviceStats::default(),
    });
    // Map and bind everything before starting any thread, so a bad parameter fails the start.
    let mut workers = Vec::with_capacity(nq);
    for (i, q) in params.queues.iter().enumerate() {
        let ring_pages = transport.map(&q.ring_refs, true)?;
        let ring = SharedRing::new(Box::new(ring_pages), params.ring_order)?;
        let event = transport.bind(q.event_channel)?;
        workers.push(Queue::new(
            i,
            transport.clone(),
            ring,
            event,
            disk.clone(),
            limits.clone(),
            shared.clone(),
        ));
    }
    let mut device = Device {
        shared,
        threads: Vec::with_capacity(nq),
    };
    for w in workers {
        let name = format!("blkif-q{}", w.index);
        // On a spawn failure, `device`'s Drop stops and joins the queues already started.
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || w.run())?;
        device.threads.push(handle);
    }
    tracing::info!(device = %params.name, queues = nq, order = params.ring_order, read_only = limits.read_only, "blkif device connected");
    Ok(device)
}

/// Requests of at least this many bytes are split between threads (see the module docs).
pub const SPLIT_BYTES: usize = 256 * 1024;
/// Alignment of the split points on the disk: whole store blocks, so that no block is read
/// or written by two parts.
const SPLIT_ALIGN: u64 = 4096;

/// How many threads a large request is split between: the CPUs, up to 4.
fn split_parts() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// Whether a request of `len` bytes is split between `parts` threads. Callers check this
/// first, so that small requests (the common case) allocate nothing for the split.
fn worth_splitting(len: usize, parts: usize) -> bool {
    parts > 1 && len >= SPLIT_BYTES
}

/// Where to cut `len` bytes that start at disk offset `start` into about `parts` pieces:
/// the lengths of the pieces, each ending on a [`SPLIT_ALIGN`] boundary except the last.
fn split_lengths(start: u64, len: usize, parts: usize) -> Vec<usize> {
    if !worth_splitting(len, parts) {
        return vec![len];
    }
    let want = (len / parts).max(1) as u64;
    let end = start + len as u64;
    let mut cuts = Vec::with_capacity(parts);
    let mut at = start;
    while at < end {
        let mut next = (at + want).div_ceil(SPLIT_ALIGN) * SPLIT_ALIGN;
        if next >= end || cuts.len() + 1 == parts {
            next = end;
        }
        cuts.push((next - at) as usize);
        at = next;
    }
    cuts
}

/// Reads disk bytes from `offset` on into the guest `runs` (from [`coalesce`]), split between
/// threads when large.
fn read_into_guest(
    disk: &dyn Disk,
    pages: &dyn GuestPages,
    runs: &[GuestRange],
    offset: u64,
    parts: usize,
) -> Result<(), DiskError> {
    // Straight into the granted pages (see `mem` for why this is the one place a reference
    // to guest memory is formed). Pieces cover disjoint guest bytes.
    let read = |range: GuestRange, at: u64| {
        with_guest_slice_mut(pages, range, |buf| disk.read_at(buf, at))
    };
    let total: usize = runs.iter().map(|r| r.len).sum();
    if !worth_splitting(total, parts) {
        let mut at = offset;
        for &run in runs {
            read(run, at)?;
            at += run.len as u64;
        }
        return Ok(());
    }
    let lengths = split_lengths(offset, total, parts);
    // The pieces as (guest range, disk offset) lists: cut the runs at the lengths above.
    let mut pieces: Vec<Vec<(GuestRange, u64)>> = Vec::with_capacity(lengths.len());
    let mut runs = runs.iter().copied();
    let mut cur: Option<GuestRange> = None;
    let mut disk_at = offset;
    for want in lengths {
        let mut piece = Vec::new();
        let mut left = want;
        while left > 0 {
            let Some(r) = cur.take().or_else(|| runs.next()) else {
                break;
            };
            let take = r.len.min(left);
            piece.push((
                GuestRange {
                    page: r.page,
                    offset: r.offset,
                    len: take,
                },
                disk_at,
            ));
            if take < r.len {
                // The rest of the run continues in the adjacent pages of the same mapping.
                let rest = r.offset + take;
                cur = Some(GuestRange {
                    page: r.page + rest / PAGE_SIZE,
                    offset: rest % PAGE_SIZE,
                    len: r.len - take,
                });
            }
            disk_at += take as u64;
            left -= take;
        }
        pieces.push(piece);
    }
    let read_piece = |piece: &Vec<(GuestRange, u64)>| -> Result<(), DiskError> {
        piece.iter().try_for_each(|&(range, at)| read(range, at))
    };
    run_parts(&pieces, read_piece)
}

/// Runs `f` on every piece, the first on this thread and the others on rayon's pool (kept
/// warm, so a part costs a wake-up rather than a thread start); the first error wins.
fn run_parts<P: Sync>(
    pieces: &[P],
    f: impl Fn(&P) -> Result<(), DiskError> + Sync,
) -> Result<(), DiskError> {
    let Some((first, rest)) = pieces.split_first() else {
        return Ok(());
    };
    if rest.is_empty() {
        return f(first);
    }
    let mut results: Vec<Result<(), DiskError>> = vec![Ok(()); rest.len()];
    let mut result = Ok(());
    rayon::in_place_scope(|s| {
        let f = &f;
        for (p, r) in rest.iter().zip(results.iter_mut()) {
            s.spawn(move |_| *r = f(p));
        }
        result = f(first);
    });
    result.and(results.into_iter().collect())
}

/// How a request failed: the status to answer, and what to log.
struct Failure {
    status: i16,
    why: String,
}

impl Failure {
    fn error(why: impl ToString) -> Failure {
        Failure {
            status: BLKIF_RSP_ERROR,
            why: why.to_string(),
        }
    }
}

impl From<DiskError> for Failure {
    fn from(e: DiskError) -> Failure {
        let status = if e == DiskError::NotSupported {
            BLKIF_RSP_EOPNOTSUPP
        } else {
            BLKIF_RSP_ERROR
        };
        Failure {
            status,
            why: format!("disk: {e}"),
        }
    }
}

impl From<TransportError> for Failure {
    fn from(e: TransportError) -> Failure {
        Failure::error(e)
    }
}

impl From<request::Reason> for Failure {
    fn from(e: request::Reason) -> Failure {
        Failure::error(e)
    }
}

/// One queue's state: the backend's private ring indexes and reusable buffers.
struct Queue<T: Transport> {
    index: usize,
    transport: Arc<T>,
    ring: SharedRing,
    event: T::Event,
    disk: Arc<dyn Disk>,
    limits: Limits,
    shared: Arc<Shared>,
    size: u32,
    /// Next request to consume (private: never read back from the ring).
    req_cons: RingIdx,
    /// Next response slot.
    rsp_prod_pvt: RingIdx,
    /// The `rsp_prod` value last published.
    rsp_published: RingIdx,
    batch: Vec<EntryBytes>,
    in_flight: HashSet<u64>,
    segments: Vec<BlkifRequestSegment>,
    grefs: Vec<GrantRef>,
    ranges: Vec<GuestRange>,
    runs: Vec<GuestRange>,
    bounce: Vec<u8>,
    /// Threads a large request is split between.
    parts: usize,
    log: RateLimit,
}

impl<T: Transport> Queue<T> {
    fn new(
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
            transport,
            ring,
            event,
            disk,
            limits,
            shared,
            size,
            req_cons: 0,
            rsp_prod_pvt: 0,
            rsp_published: 0,
            batch: Vec::with_capacity(size as usize),
            in_flight: HashSet::with_capacity(size as usize),
            segments: Vec::new(),
            grefs: Vec::new(),
            ranges: Vec::new(),
            runs: Vec::new(),
            bounce: Vec::new(),
            parts: split_parts(),
            log: RateLimit::default(),
        }
    }

    fn run(mut self) {
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
            let id = super::abi::BlkifRequest::decode(&entry).id;
            if !self.in_flight.insert(id) {
                return Err(format!("request id {id:#x} is already in flight"));
            }
            self.batch.push(entry);
        }
        self.req_cons = prod;
        let batch = std::mem::take(&mut self.batch);
        for entry in &batch {
            let rsp = self.execute(entry);
            self.respond(&rsp);
        }
        self.batch = batch;
        // One publish (and at most one notification) per round, like
        // RING_PUSH_RESPONSES_AND_CHECK_NOTIFY after a batch: publishing each response on its
        // own woke the frontend once per request.
        self.publish()?;
        Ok(pending as usize)
    }

    /// Writes a response into the ring, unpublished until [`Self::publish`].
    fn respond(&mut self, rsp: &BlkifResponse) {
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
                op = super::abi::op_name(op),
                suppressed,
                "blkif request failed: {why}"
            );
        }
    }

    /// Runs one request and builds its response. Never fails: errors become a status.
    fn execute(&mut self, entry: &EntryBytes) -> BlkifResponse {
        let req = match request::decode(entry, &self.limits) {
            Ok(r) => r,
            Err(rej) => {
                self.warn(rej.id, rej.echo, &rej.reason.to_string());
                return BlkifResponse {
                    id: rej.id,
                    operation: rej.echo,
                    status: rej.status,
                };
            }
        };
        let (id, echo) = (req.id(), req.echo());
        let result = match req {
            Request::Discard {
                sector, nr_sectors, ..
            } => self
                .disk
                .discard(sector * SECTOR, nr_sectors * SECTOR)
                .map_err(Failure::from),
            Request::Direct {
                op,
                sector,
                segments,
                ..
            } => self.data(op, sector, &segments),
            Request::Indirect {
                op,
                sector,
                nr_segments,
                pages,
                ..
            } => match self.fetch_indirect(&pages, nr_segments) {
                Ok(segs) => {
                    let r = self.data(op, sector, &segs);
                    self.segments = segs;
                    r
                }
                Err(f) => Err(f),
            },
        };
        let status = match result {
            Ok(()) => BLKIF_RSP_OKAY,
            Err(f) => {
                self.warn(id, echo, &f.why);
                f.status
            }
        };
        BlkifResponse {
            id,
            operation: echo,
            status,
        }
    }

    /// Copies an indirect request's segment list out of its (read-only mapped) pages.
    fn fetch_indirect(
        &mut self,
        pages: &[GrantRef],
        n: usize,
    ) -> Result<Vec<BlkifRequestSegment>, Failure> {
        let map = self.transport.map(pages, false)?;
        let mut segs = std::mem::take(&mut self.segments);
        segs.clear();
        let mut buf = [0u8; PAGE_SIZE];
        for p in 0..pages.len() {
            let here = (n - p * SEGMENTS_PER_INDIRECT_PAGE).min(SEGMENTS_PER_INDIRECT_PAGE);
            let bytes = &mut buf[..here * BlkifRequestSegment::SIZE];
            copy_from_guest(&map, p, 0, bytes);
            for chunk in bytes.chunks_exact(BlkifRequestSegment::SIZE) {
                let mut s = [0u8; 8];
                s.copy_from_slice(chunk);
                segs.push(BlkifRequestSegment::decode(&s));
            }
        }
        Ok(segs)
    }

    /// Read, write, flush or barrier over `segs` starting at `sector`.
    fn data(
        &mut self,
        op: DataOp,
        sector: u64,
        segs: &[BlkifRequestSegment],
    ) -> Result<(), Failure> {
        let total = request::plan(&self.limits, sector, segs)?;
        if matches!(op, DataOp::Flush | DataOp::Barrier) {
            // Everything acknowledged before this request becomes durable first.
            self.disk.flush()?;
        }
        if segs.is_empty() {
            return Ok(());
        }
        self.grefs.clear();
        self.grefs.extend(segs.iter().map(|s| s.gref));
        self.ranges.clear();
        self.ranges
            .extend(segs.iter().enumerate().map(|(i, s)| GuestRange {
                page: i,
                offset: usize::from(s.first_sect) * SECTOR as usize,
                len: usize::from(s.last_sect - s.first_sect + 1) * SECTOR as usize,
            }));
        let offset = sector * SECTOR;
        if op == DataOp::Read {
            let pages = self.transport.map(&self.grefs, true)?;
            coalesce(&pages, &self.ranges, &mut self.runs);
            read_into_guest(&*self.disk, &pages, &self.runs, offset, self.parts)?;
            return Ok(());
        }
        // WRITE data is copied out of guest memory before the store sees it: the store hashes
        // each block, and a guest changing the page between hashing and writing would leave a
        // block that fails its checksum. What we copied is what the guest wrote.
        let pages = self.transport.map(&self.grefs, false)?;
        let len = (total * SECTOR) as usize;
        self.bounce.resize(len, 0);
        let mut pos = 0;
        for r in &self.ranges {
            copy_from_guest(&pages, r.page, r.offset, &mut self.bounce[pos..pos + r.len]);
            pos += r.len;
        }
        drop(pages);
        let fua = matches!(op, DataOp::Flush | DataOp::Barrier);
        if !worth_splitting(len, self.parts) {
            self.disk.write_at(&self.bounce[..len], offset, fua)?;
            return Ok(());
        }
        let mut pieces = Vec::new();
        let mut rest = &self.bounce[..len];
        let mut at = offset;
        for n in split_lengths(offset, len, self.parts) {
            let (piece, tail) = rest.split_at(n);
            pieces.push((piece, at));
            rest = tail;
            at += n as u64;
        }
        let disk = &*self.disk;
        run_parts(&pieces, |&(data, at)| disk.write_at(data, at, fua))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{blkif::mem::HeapPages, disk::MemDisk};

    #[test]
    fn split_lengths_cut_on_block_boundaries() {
        for start in [0u64, 512, 4096, 7 * 512, 1 << 30] {
            for len in [
                0usize,
                4096,
                SPLIT_BYTES - 512,
                SPLIT_BYTES,
                1 << 20,
                (1 << 20) + 1536,
            ] {
                for parts in 1..=4 {
                    let l = split_lengths(start, len, parts);
                    assert_eq!(l.iter().sum::<usize>(), len, "{start} {len} {parts}");
                    assert!(l.len() <= parts.max(1));
                    if len < SPLIT_BYTES || parts == 1 {
                        assert_eq!(l, vec![len]);
                    }
                    let mut at = start;
                    for (i, n) in l.iter().enumerate() {
                        at += *n as u64;
                        assert!(*n > 0 || len == 0);
                        if i + 1 < l.len() {
                            assert_eq!(at % SPLIT_ALIGN, 0, "{start} {len} {parts}: {l:?}");
                        }
                    }
                }
            }
        }
        // A 1 MiB request on 2 CPUs: two halves.
        assert_eq!(split_lengths(0, 1 << 20, 2), vec![1 << 19, 1 << 19]);
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8 | 1).collect()
    }

    #[test]
    fn split_reads_fill_the_guest_pages_like_one_read() {
        let disk = MemDisk::new(8 << 20);
        disk.write_at(&pattern(8 << 20), 0, false).unwrap();
        let pages = HeapPages::new(600);
        // A request starting half-way into its first page, then whole pages, some adjacent
        // (coalesced into one run) and some not, as a guest's scattered buffers would be.
        let mut ranges = vec![GuestRange {
            page: 0,
            offset: 1024,
            len: 3072,
        }];
        let mut page = 1;
        for i in 0..300 {
            ranges.push(GuestRange {
                page,
                offset: 0,
                len: PAGE_SIZE,
            });
            page += if i % 7 == 0 { 2 } else { 1 };
        }
        let total: usize = ranges.iter().map(|r| r.len).sum();
        let disk_offset = 3 * 4096 + 1024;
        let mut runs = Vec::new();
        coalesce(&pages, &ranges, &mut runs);
        for parts in [1, 2, 3, 4] {
            read_into_guest(&disk, &pages, &runs, disk_offset, parts).unwrap();
            let mut got = vec![0u8; total];
            let mut pos = 0;
            for r in &ranges {
                copy_from_guest(&pages, r.page, r.offset, &mut got[pos..pos + r.len]);
                pos += r.len;
            }
            let mut want = vec![0u8; total];
            disk.read_at(&mut want, disk_offset).unwrap();
            assert!(got == want, "{parts} parts");
            // Clear the pages for the next round.
            let zeros = vec![0u8; PAGE_SIZE];
            for p in 0..pages.count() {
                crate::blkif::mem::copy_to_guest(&pages, p, 0, &zeros);
            }
        }
    }

    #[test]
    fn a_failing_part_fails_the_request() {
        let disk = MemDisk::new(1 << 20);
        let pages = HeapPages::new(300);
        let ranges: Vec<GuestRange> = (0..256)
            .map(|p| GuestRange {
                page: p,
                offset: 0,
                len: PAGE_SIZE,
            })
            .collect();
        let mut runs = Vec::new();
        coalesce(&pages, &ranges, &mut runs);
        // The second half runs past the end of the disk.
        assert_eq!(
            read_into_guest(&disk, &pages, &runs, 512 << 10, 2),
            Err(DiskError::OutOfRange)
        );
    }
}
