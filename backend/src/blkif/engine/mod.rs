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
//! between rounds; queues are independent. Within a round, the queue thread runs every
//! request that needs no device wait (page-cache reads, writes, discards) in ring order, and
//! the ones that would wait (reads of data not in memory, flushes) side by side on a pool of
//! I/O threads, so a device sees the guest's queue depth rather than one request at a time.
//! A write barrier splits the round: what comes before it completes first. The round's
//! responses are published together.
//!
//! A large READ or WRITE (at least [`SPLIT_BYTES`]) is split at block boundaries between the
//! queue thread and a shared pool (rayon's, threads named `blkif-split-N`), since one thread
//! reading a 1 MiB request (store read, every block's checksum verified) leaves the other CPUs
//! idle when the guest has only a few large requests in flight. The request completes when
//! every part has. (Starting a thread per part instead cost as much as it saved.)
//!
//! ```text
//!   mod.rs    the device: parameters, start_device (map, bind, start queue threads), stop
//!   queue.rs  one queue's thread: consume the ring, respond, publish, notify
//!   exec.rs   one request: decode, map the guest's pages, run it against the disk
//!   blocking.rs  the requests of a round that wait for a device, run side by side
//!   grants.rs    persistent grants: the frontend's pages kept mapped for the ring's life
//!   split.rs  large requests cut at block boundaries and run on several threads
//! ```

mod blocking;
mod exec;
mod grants;
mod queue;
mod split;

use std::{
    collections::BTreeMap,
    sync::{atomic::AtomicU64, atomic::Ordering, Arc, Weak},
    thread::JoinHandle,
};

use parking_lot::Mutex;
use xen_sys::evtchn_port_t;

use super::{
    abi::{GrantRef, MAX_RING_PAGE_ORDER, PROTOCOL_X86_64, SECTOR},
    event::StopSignal,
    features::Features,
    request::Limits,
    ring::SharedRing,
    transport::{Transport, TransportError},
};
use crate::disk::Disk;
use queue::Queue;
pub use split::SPLIT_BYTES;

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
    /// Persistent grants: the backend offered `feature-persistent` and the frontend asked for
    /// them, so the grants of requests stay mapped (see `grants.rs`).
    pub persistent: bool,
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
    /// Data segments (pages) of the requests executed.
    pub segments: AtomicU64,
    /// Requests answered with an error status.
    pub errors: AtomicU64,
    /// Kicks received.
    pub kicks: AtomicU64,
    /// Notifications sent.
    pub notifies: AtomicU64,
    /// Grants mapped for requests (not counting the rings; with persistent grants, each
    /// kept grant once).
    pub grant_maps: AtomicU64,
}

impl DeviceStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            segments: self.segments.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            kicks: self.kicks.load(Ordering::Relaxed),
            notifies: self.notifies.load(Ordering::Relaxed),
            grant_maps: self.grant_maps.load(Ordering::Relaxed),
        }
    }
}

/// The counters of every device this process started, by device name, for
/// [`device_totals`] (the metrics endpoint). Locked when a device starts and when the totals
/// are read, never per request.
static DEVICES: Mutex<Devices> = Mutex::new(Devices {
    running: Vec::new(),
    gone: BTreeMap::new(),
});

struct Devices {
    running: Vec<(String, Weak<Shared>, Arc<DeviceStats>)>,
    /// Counters of devices that have ended, summed by name (one entry per name ever served).
    gone: BTreeMap<String, StatsSnapshot>,
}

impl Devices {
    /// Folds the devices that have ended into `gone`.
    fn prune(&mut self) {
        let gone = &mut self.gone;
        self.running.retain(|(name, shared, stats)| {
            let alive = shared.strong_count() > 0;
            if !alive {
                gone.entry(name.clone()).or_default().add(&stats.snapshot());
            }
            alive
        });
    }
}

/// Counters summed by device name over every device this process has run (Xen guests' rings
/// and local attaches alike), and how many devices run now.
pub fn device_totals() -> (BTreeMap<String, StatsSnapshot>, usize) {
    let mut d = DEVICES.lock();
    d.prune();
    let mut totals = d.gone.clone();
    for (name, _, stats) in &d.running {
        totals
            .entry(name.clone())
            .or_default()
            .add(&stats.snapshot());
    }
    (totals, d.running.len())
}

/// A plain copy of [`DeviceStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub requests: u64,
    pub segments: u64,
    pub errors: u64,
    pub kicks: u64,
    pub notifies: u64,
    pub grant_maps: u64,
}

impl StatsSnapshot {
    fn add(&mut self, o: &StatsSnapshot) {
        self.requests += o.requests;
        self.segments += o.segments;
        self.errors += o.errors;
        self.kicks += o.kicks;
        self.notifies += o.notifies;
        self.grant_maps += o.grant_maps;
    }
}

/// How a device ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceEnd {
    /// Stopped on request; requests seen before the stop were answered.
    Stopped,
    /// Shut down because the frontend broke the protocol, or the transport failed.
    Fault(String),
}

pub(super) struct Shared {
    name: String,
    stop: StopSignal,
    fault: Mutex<Option<String>>,
    stats: Arc<DeviceStats>,
}

impl Shared {
    pub(super) fn set_fault(&self, why: String) {
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
        self.shared.stats.snapshot()
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
        stats: Arc::default(),
    });
    {
        let mut devices = DEVICES.lock();
        devices.prune();
        devices.running.push((
            params.name.clone(),
            Arc::downgrade(&shared),
            shared.stats.clone(),
        ));
    }
    // Map and bind everything before starting any thread, so a bad parameter fails the start.
    let mut workers = Vec::with_capacity(nq);
    let persistent = params.persistent && features.persistent;
    for (i, q) in params.queues.iter().enumerate() {
        let ring_pages = transport.map(&q.ring_refs, true)?;
        let ring = SharedRing::new(Box::new(ring_pages), params.ring_order)?;
        let event = transport.bind(q.event_channel)?;
        let mut queue = Queue::new(
            i,
            transport.clone(),
            ring,
            event,
            disk.clone(),
            limits.clone(),
            shared.clone(),
        );
        if persistent {
            queue.keep_grants();
        }
        workers.push(queue);
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
    tracing::info!(device = %params.name, queues = nq, order = params.ring_order, read_only = limits.read_only, persistent, "blkif device connected");
    Ok(device)
}
