//! `frontend-shim`: plays the guest (blkfront) side of the Xen block ring on any Linux host,
//! over the local transport (a memfd "grant table" and eventfds), so the Parallax ring backend
//! can be driven, tested and benchmarked without a hypervisor.
//!
//! ```text
//!   Frontend ── queues[i]: FrontQueue (ring pages + request slots in the grant table)
//!      │
//!      ├─ Frontend::in_process(disk, ..)   backend engine on threads of this process
//!      └─ Frontend::attach_store(store, ..) a running `parallax serve`, via its control socket
//! ```
//!
//! [`verify`] runs random I/O checked against a model; [`mod@bench`] measures IOPS and latency.

pub mod bench;
pub mod front;
pub mod verify;

use std::{
    io::{Read, Write},
    os::{fd::AsFd, unix::net::UnixStream},
    path::Path,
    sync::Arc,
};

pub use front::{Completion, FrontError, FrontQueue, IoKind, IoRequest, QueueLayout};
use parallax::{
    blkif::{
        abi::{ring_size, GrantRef, PROTOCOL_X86_64, SEGMENTS_PER_INDIRECT_PAGE},
        event::StopSignal,
        local::{
            send_with_fds, AttachOffer, AttachRequest, ConnectReply, ConnectRequest, LocalEvent,
            LocalGrantTable, LocalTransport, ATTACH_OP, CLOSED_EVENT, MAX_TABLE_PAGES,
        },
        start_device, Device, DeviceParams, Features, QueueParams,
    },
    daemon::addr::ControlAddr,
    disk::Disk,
};

/// How the frontend sets up its rings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendConfig {
    /// `ring-page-order` (0..=4); clamped to what the backend offers.
    pub ring_order: u32,
    /// Number of queues; clamped to what the backend offers.
    pub queues: usize,
    /// Most segments per indirect request (0: no indirect requests); clamped likewise.
    pub indirect_segments: usize,
    /// Request slots per queue (default: the ring size, at most 64).
    pub depth: Option<usize>,
    /// Attach read-only.
    pub read_only: bool,
    /// Ask for persistent grants (in-process frontends only): the slots' grants never change,
    /// so the backend may keep them mapped.
    pub persistent: bool,
}

impl Default for FrontendConfig {
    fn default() -> Self {
        FrontendConfig {
            ring_order: 0,
            queues: 1,
            indirect_segments: 0,
            depth: None,
            read_only: false,
            persistent: false,
        }
    }
}

/// Errors setting up or tearing down a frontend.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("{0}")]
    Front(#[from] FrontError),
    #[error("backend refused: {0}")]
    Refused(String),
    #[error("attach protocol: {0}")]
    Protocol(String),
    #[error("{0}")]
    Transport(#[from] parallax::blkif::TransportError),
    #[error("starting the in-process backend: {0}")]
    Engine(#[from] parallax::blkif::EngineError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

enum Backend {
    InProcess(Option<Device>),
    Daemon(Arc<UnixStream>),
    /// Connected by the caller (e.g. through xenstore): see [`Frontend::external`].
    External,
}

/// The backend's half of a frontend made by [`Frontend::external`]: what a control plane
/// (xenbus) hands to the backend.
pub struct ExternalRings {
    /// The frontend's grant table; the backend maps its memfd ([`LocalGrantTable::open`]).
    pub table: Arc<LocalGrantTable>,
    pub ring_order: u32,
    /// Per queue: the ring pages' grant references and the backend's end of its event
    /// channel.
    pub queues: Vec<(Vec<GrantRef>, LocalEvent)>,
}

/// A connected frontend: a grant table, its queues, and the backend it talks to.
pub struct Frontend {
    table: Arc<LocalGrantTable>,
    queues: Vec<FrontQueue>,
    size: u64,
    read_only: bool,
    features: Features,
    backend: Backend,
}

/// Negotiated parameters and the table layout.
struct Plan {
    order: u32,
    queues: usize,
    indirect: usize,
    table_pages: usize,
    layouts: Vec<QueueLayout>,
}

fn plan(cfg: &FrontendConfig, features: &Features) -> Result<Plan, ShimError> {
    let order = cfg.ring_order.min(features.max_ring_page_order);
    let queues = cfg.queues.clamp(1, features.max_queues.max(1) as usize);
    let indirect = cfg
        .indirect_segments
        .min(features.max_indirect_segments as usize);
    let rsize = ring_size(order) as usize;
    let depth = cfg.depth.unwrap_or(rsize.min(64)).clamp(1, rsize);
    let data_pages = indirect.max(11);
    let ind_pages = indirect.div_ceil(SEGMENTS_PER_INDIRECT_PAGE);
    let per_queue = (1 << order) + depth * (data_pages + ind_pages);
    let table_pages = per_queue * queues;
    if table_pages > MAX_TABLE_PAGES {
        return Err(ShimError::Protocol(format!(
            "{table_pages} grant pages needed (max {MAX_TABLE_PAGES}): lower depth, queues or indirect segments"
        )));
    }
    let mut next: GrantRef = 0;
    let mut take = |n: usize| -> Vec<GrantRef> {
        let v = (next..next + n as GrantRef).collect();
        next += n as GrantRef;
        v
    };
    let layouts = (0..queues)
        .map(|_| QueueLayout {
            ring_refs: take(1 << order),
            slots: (0..depth)
                .map(|_| (take(data_pages), take(ind_pages)))
                .collect(),
        })
        .collect();
    Ok(Plan {
        order,
        queues,
        indirect,
        table_pages,
        layouts,
    })
}

impl Frontend {
    /// Starts a backend engine in this process over `disk` (advertising `features`) and
    /// connects a frontend to it through a fresh grant table, as a separate process would.
    pub fn in_process(
        disk: Arc<dyn Disk>,
        features: Features,
        cfg: &FrontendConfig,
    ) -> Result<Frontend, ShimError> {
        let features = features.clamped();
        let p = plan(cfg, &features)?;
        let table = Arc::new(LocalGrantTable::create(p.table_pages)?);
        // The backend maps the memfd on its own, exactly as the daemon does.
        let back_table = LocalGrantTable::open(table.fd().try_clone_to_owned()?, MAX_TABLE_PAGES)?;
        let mut back_events = Vec::new();
        let mut front_events = Vec::new();
        for _ in 0..p.queues {
            let (b, f) = LocalEvent::pair()?;
            back_events.push(b);
            front_events.push(f);
        }
        let read_only = cfg.read_only || disk.read_only();
        let params = DeviceParams {
            name: "in-process".into(),
            ring_order: p.order,
            queues: p
                .layouts
                .iter()
                .enumerate()
                .map(|(i, l)| QueueParams {
                    ring_refs: l.ring_refs.clone(),
                    event_channel: i as u32,
                })
                .collect(),
            protocol: Some(PROTOCOL_X86_64.into()),
            read_only,
            features: features.clone(),
            persistent: cfg.persistent,
        };
        // Rings are initialised by the frontend before the backend looks at them.
        let stop_placeholder = StopSignal::new()?;
        let mut queues =
            Self::make_queues(&table, &p, front_events, Arc::new(stop_placeholder.clone()))?;
        let size = disk.size();
        let device = start_device(
            Arc::new(LocalTransport::new(Arc::new(back_table), back_events)),
            params,
            disk,
        )?;
        // Frontend queues watch the device's stop signal for "backend gone".
        let gone: Arc<dyn AsFd + Send + Sync> = Arc::new(device.stop_signal());
        for q in &mut queues {
            q.set_gone(gone.clone());
        }
        Ok(Frontend {
            table,
            queues,
            size,
            read_only,
            features,
            backend: Backend::InProcess(Some(device)),
        })
    }

    /// A frontend whose backend the caller connects (the xenbus handshake does it through
    /// xenstore): lays out the grant table and initialises the rings for what the backend
    /// offered, and returns the backend's half. Queues treat `gone` becoming readable as
    /// "backend gone". Call [`Frontend::set_disk`] once the backend has said the disk's size.
    pub fn external(
        features: &Features,
        cfg: &FrontendConfig,
        gone: Arc<dyn AsFd + Send + Sync>,
    ) -> Result<(Frontend, ExternalRings), ShimError> {
        let features = features.clamped();
        let p = plan(cfg, &features)?;
        let table = Arc::new(LocalGrantTable::create(p.table_pages)?);
        let mut front_events = Vec::new();
        let mut back_events = Vec::new();
        for _ in 0..p.queues {
            let (b, f) = LocalEvent::pair()?;
            back_events.push(b);
            front_events.push(f);
        }
        let queues = Self::make_queues(&table, &p, front_events, gone)?;
        let rings = ExternalRings {
            table: table.clone(),
            ring_order: p.order,
            queues: p
                .layouts
                .iter()
                .map(|l| l.ring_refs.clone())
                .zip(back_events)
                .collect(),
        };
        Ok((
            Frontend {
                table,
                queues,
                size: 0,
                read_only: cfg.read_only,
                features,
                backend: Backend::External,
            },
            rings,
        ))
    }

    /// Sets the disk's size and mode as the backend published them (external frontends).
    pub fn set_disk(&mut self, size: u64, read_only: bool) {
        self.size = size;
        self.read_only = read_only;
    }

    /// Attaches to VDI `name` of the daemon holding the store at `store`.
    pub fn attach_store(
        store: &Path,
        name: &str,
        cfg: &FrontendConfig,
    ) -> Result<Frontend, ShimError> {
        let addr = ControlAddr::for_client(store)?;
        let stream = addr.connect().map_err(|e| {
            ShimError::Protocol(format!(
                "cannot reach the daemon at {addr}: {e} (is `parallax serve` running?)"
            ))
        })?;
        Self::attach(stream, name, cfg)
    }

    /// Attaches to export `name` over an open control connection.
    pub fn attach(
        stream: UnixStream,
        name: &str,
        cfg: &FrontendConfig,
    ) -> Result<Frontend, ShimError> {
        let req = AttachRequest {
            op: ATTACH_OP.into(),
            name: name.into(),
            read_only: cfg.read_only,
        };
        send_line(
            &stream,
            &serde_json::to_value(&req).map_err(std::io::Error::other)?,
        )?;
        let reply: serde_json::Value = serde_json::from_slice(&read_line(&stream)?)
            .map_err(|e| ShimError::Protocol(format!("offer: {e}")))?;
        if reply["ok"] != true {
            // The attach code answers {"ok":false,"error":..}; a daemon that serves no rings
            // answers with its control protocol's {"message":..}.
            let why = reply["error"]
                .as_str()
                .or(reply["message"].as_str())
                .unwrap_or("attach refused");
            return Err(ShimError::Refused(why.to_string()));
        }
        let offer: AttachOffer = serde_json::from_value(reply)
            .map_err(|e| ShimError::Protocol(format!("offer: {e}")))?;
        let features = offer.features.clamped();
        let p = plan(cfg, &features)?;
        if p.table_pages > offer.max_table_pages {
            return Err(ShimError::Protocol(format!(
                "daemon accepts {} grant pages, {} needed",
                offer.max_table_pages, p.table_pages
            )));
        }
        let table = Arc::new(LocalGrantTable::create(p.table_pages)?);
        let mut front_events = Vec::new();
        let mut sent = Vec::new();
        for _ in 0..p.queues {
            let (b, f) = LocalEvent::pair()?;
            front_events.push(f);
            sent.push(b);
        }
        let stream = Arc::new(stream);
        let queues = Self::make_queues(&table, &p, front_events, stream.clone())?;
        let connect = ConnectRequest {
            ring_order: p.order,
            ring_refs: p.layouts.iter().map(|l| l.ring_refs.clone()).collect(),
            protocol: Some(PROTOCOL_X86_64.into()),
        };
        let mut line = serde_json::to_vec(&connect).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut fds = vec![table.fd()];
        for b in &sent {
            fds.push(b.incoming().as_fd());
            fds.push(b.outgoing().as_fd());
        }
        send_with_fds(&stream, &line, &fds)?;
        drop(sent);
        let reply: ConnectReply = serde_json::from_slice(&read_line(&stream)?)
            .map_err(|e| ShimError::Protocol(format!("connect reply: {e}")))?;
        if !reply.ok {
            return Err(ShimError::Refused(reply.error.unwrap_or_default()));
        }
        Ok(Frontend {
            table,
            queues,
            size: offer.size,
            read_only: offer.read_only,
            features,
            backend: Backend::Daemon(stream),
        })
    }

    fn make_queues(
        table: &Arc<LocalGrantTable>,
        p: &Plan,
        events: Vec<LocalEvent>,
        gone: Arc<dyn AsFd + Send + Sync>,
    ) -> Result<Vec<FrontQueue>, FrontError> {
        events
            .into_iter()
            .enumerate()
            .map(|(i, ev)| {
                FrontQueue::new(
                    i,
                    table,
                    &p.layouts[i],
                    p.order,
                    ev,
                    gone.clone(),
                    p.indirect,
                )
            })
            .collect()
    }

    /// Disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// What the backend offered (after clamping).
    pub fn features(&self) -> &Features {
        &self.features
    }

    pub fn queues(&self) -> &[FrontQueue] {
        &self.queues
    }

    pub fn queues_mut(&mut self) -> &mut [FrontQueue] {
        &mut self.queues
    }

    pub fn queue(&mut self, i: usize) -> &mut FrontQueue {
        &mut self.queues[i]
    }

    /// The grant table (raw access for tests: write anything into any page).
    pub fn table(&self) -> &Arc<LocalGrantTable> {
        &self.table
    }

    /// The in-process backend device, if that is what we talk to.
    pub fn device(&self) -> Option<&Device> {
        match &self.backend {
            Backend::InProcess(d) => d.as_ref(),
            Backend::Daemon(_) | Backend::External => None,
        }
    }

    /// Detaches: the backend answers what it has seen and lets go. Returns its reason.
    pub fn detach(mut self) -> Result<String, ShimError> {
        match &mut self.backend {
            Backend::InProcess(d) => {
                let dev = d.take().expect("device present until detach");
                dev.stop();
                Ok(match dev.join() {
                    parallax::blkif::DeviceEnd::Stopped => "stopped".into(),
                    parallax::blkif::DeviceEnd::Fault(f) => f,
                })
            }
            Backend::External => Ok("detached by the caller".into()),
            Backend::Daemon(stream) => {
                // The daemon may have closed already (shutdown, fault): then only its last
                // message is left to read.
                let _ = send_line(stream, &serde_json::json!({"op": "detach"}));
                loop {
                    let line = match read_line(stream) {
                        Ok(l) => l,
                        Err(ShimError::Protocol(_)) => return Ok("connection closed".into()),
                        Err(e) => return Err(e),
                    };
                    let v: serde_json::Value = serde_json::from_slice(&line).unwrap_or_default();
                    if v["event"] == CLOSED_EVENT {
                        return Ok(v["reason"].as_str().unwrap_or("").to_string());
                    }
                }
            }
        }
    }
}

fn send_line(mut stream: &UnixStream, v: &serde_json::Value) -> Result<(), ShimError> {
    let mut line = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    Ok(())
}

/// Reads one line, a byte at a time (so nothing after it is consumed).
fn read_line(mut stream: &UnixStream) -> Result<Vec<u8>, ShimError> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        if stream.read(&mut b)? == 0 {
            return Err(ShimError::Protocol("connection closed".into()));
        }
        if b[0] == b'\n' {
            return Ok(line);
        }
        line.push(b[0]);
        if line.len() > 1 << 20 {
            return Err(ShimError::Protocol("line too long".into()));
        }
    }
}
