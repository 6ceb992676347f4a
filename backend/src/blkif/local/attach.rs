//! Attaching a local frontend to a VDI of a running daemon, over the control socket.
//!
//! The exchange mirrors the xenbus handshake (`InitWait` → `Initialised` → `Connected`):
//!
//! ```text
//!  shim                                          daemon (serve_attach, on its own thread)
//!  {"op":"ring-attach","name":N,"read_only":b}\n ──►  (read by the control dispatcher)
//!                                               ◄──  {"ok":true,"size":..,"read_only":..,
//!                                                      "features":{..},"max_table_pages":..}\n
//!  {"ring_order":K,"ring_refs":[[..],..]}\n     ──►  + SCM_RIGHTS [memfd, kick0, notify0, kick1, ..]
//!                                               ◄──  {"ok":true}\n         (device running)
//!  ... ring traffic over shared memory and eventfds ...
//!  {"op":"detach"}\n  or close the socket       ──►  device stops (answers what it saw)
//!                                               ◄──  {"event":"closed","reason":..}\n, close
//! ```
//!
//! Any failure is answered with `{"ok":false,"error":..}` and the connection closed. When the
//! daemon stops ([`RingRegistry::shutdown_all`]) or the device faults, the daemon sends the
//! `closed` event and closes. The frontend only sends its descriptors after reading the offer,
//! so the control dispatcher, which reads just the first line, cannot swallow them.

use std::{
    collections::HashMap,
    io::{self, Write},
    os::{
        fd::{AsFd, OwnedFd},
        unix::net::UnixStream,
    },
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use super::{recv_with_fds, LocalEvent, LocalGrantTable, LocalTransport, MAX_FDS, MAX_TABLE_PAGES};
use crate::{
    blkif::{
        abi::GrantRef,
        engine::{start_device, DeviceEnd, DeviceParams, EngineError, QueueParams},
        event::{poll_readable, EventFd, StopSignal},
        features::Features,
    },
    disk::{DiskProvider, OpenError},
};

/// The control-socket operation that starts a ring attach.
pub const ATTACH_OP: &str = "ring-attach";
/// The `event` of the daemon's last message on an attach connection.
pub const CLOSED_EVENT: &str = "closed";
/// How long the daemon waits for the frontend's connect message.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest JSON line accepted on an attach connection.
const MAX_LINE: usize = 1 << 20;

/// The first line, read by the control dispatcher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachRequest {
    pub op: String,
    /// Export name: a VDI, or `NAME@SNAP` for a snapshot (read-only).
    pub name: String,
    /// Ask for a read-only attach.
    #[serde(default)]
    pub read_only: bool,
}

/// The daemon's answer: the device and what it offers (the backend's xenstore nodes).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachOffer {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Disk size in bytes.
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub features: Features,
    /// Largest grant table (memfd pages) the daemon accepts.
    #[serde(default)]
    pub max_table_pages: usize,
}

/// The frontend's transport parameters; sent with the descriptors
/// `[memfd, kick_0, notify_0, kick_1, notify_1, ..]` (kick: frontend → backend).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectRequest {
    pub ring_order: u32,
    /// Ring page grant references (page indexes in the memfd), one list per queue.
    pub ring_refs: Vec<Vec<GrantRef>>,
    #[serde(default)]
    pub protocol: Option<String>,
}

/// The daemon's answer to [`ConnectRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectReply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Why an attach failed or ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("bad attach request: {0}")]
    BadRequest(String),
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("frontend protocol error: {0}")]
    Protocol(String),
    #[error("starting the ring: {0}")]
    Engine(#[from] EngineError),
    #[error("attach connection: {0}")]
    Io(#[from] io::Error),
}

#[derive(Default)]
struct RegState {
    closed: bool,
    next: u64,
    attached: HashMap<u64, (String, StopSignal)>,
}

struct RegInner {
    features: Features,
    state: Mutex<RegState>,
    changed: Condvar,
}

/// The daemon's list of attached local rings, to stop them all on shutdown. Cheap to clone.
///
/// Wiring in the daemon:
/// ```ignore
/// let rings = RingRegistry::new(Features::default());
/// // control dispatcher, for {"op":"ring-attach",..}:
/// let (p, r) = (provider.clone(), rings.clone());
/// std::thread::spawn(move || parallax::blkif::local::serve_attach(request, stream, p, r));
/// // on SIGTERM, before closing the store:
/// rings.shutdown_all(Duration::from_secs(10));
/// ```
#[derive(Clone)]
pub struct RingRegistry {
    inner: Arc<RegInner>,
}

impl Default for RingRegistry {
    fn default() -> Self {
        RingRegistry::new(Features::default())
    }
}

impl RingRegistry {
    /// A registry whose devices advertise `features`.
    pub fn new(features: Features) -> RingRegistry {
        RingRegistry {
            inner: Arc::new(RegInner {
                features: features.clamped(),
                state: Mutex::new(RegState::default()),
                changed: Condvar::new(),
            }),
        }
    }

    pub fn features(&self) -> &Features {
        &self.inner.features
    }

    /// Names of the exports attached (or attaching) now.
    pub fn attached(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .inner
            .state
            .lock()
            .attached
            .values()
            .map(|(n, _)| n.clone())
            .collect();
        v.sort();
        v
    }

    /// Refuses new attaches, asks every attached device to stop (each answers the requests it
    /// has seen, then detaches and tells its frontend), and waits up to `timeout` for all of
    /// them to finish. Returns how many were still attached at the deadline (0 when clean).
    pub fn shutdown_all(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut st = self.inner.state.lock();
        st.closed = true;
        for (_, stop) in st.attached.values() {
            stop.signal();
        }
        while !st.attached.is_empty() {
            if self.inner.changed.wait_until(&mut st, deadline).timed_out() {
                break;
            }
        }
        st.attached.len()
    }

    fn register(&self, name: &str) -> Result<Registration, AttachError> {
        let mut st = self.inner.state.lock();
        if st.closed {
            return Err(AttachError::ShuttingDown);
        }
        let stop = StopSignal::new()?;
        let id = st.next;
        st.next += 1;
        st.attached.insert(id, (name.to_string(), stop.clone()));
        Ok(Registration {
            registry: self.clone(),
            id,
            stop,
        })
    }
}

struct Registration {
    registry: RingRegistry,
    id: u64,
    stop: StopSignal,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.inner.state.lock().attached.remove(&self.id);
        self.registry.inner.changed.notify_all();
    }
}

fn send_json(mut stream: &UnixStream, v: &impl Serialize) -> io::Result<()> {
    let mut line = serde_json::to_vec(v).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

/// Serves one ring attach on `stream` until the frontend detaches, the device faults, or
/// the registry shuts down. `request` is the first line the control dispatcher read.
/// Blocks; run it on a thread of its own. All resources (mappings, descriptors, threads) are
/// released before it returns.
pub fn serve_attach(
    request: serde_json::Value,
    stream: UnixStream,
    provider: Arc<dyn DiskProvider>,
    registry: RingRegistry,
) -> Result<(), AttachError> {
    match attach(request, &stream, provider, &registry) {
        Ok(()) => Ok(()),
        Err(e) => {
            tracing::info!("ring attach failed: {e}");
            // Best effort: the frontend may already be gone.
            let _ = send_json(
                &stream,
                &ConnectReply {
                    ok: false,
                    error: Some(e.to_string()),
                },
            );
            Err(e)
        }
    }
}

fn attach(
    request: serde_json::Value,
    stream: &UnixStream,
    provider: Arc<dyn DiskProvider>,
    registry: &RingRegistry,
) -> Result<(), AttachError> {
    let req: AttachRequest =
        serde_json::from_value(request).map_err(|e| AttachError::BadRequest(e.to_string()))?;
    if req.op != ATTACH_OP {
        return Err(AttachError::BadRequest(format!(
            "operation {:?} is not {ATTACH_OP}",
            req.op
        )));
    }
    let reg = registry.register(&req.name)?;
    let disk = provider.open_export(&req.name, !req.read_only)?;
    let features = registry.features().clone();
    let read_only = req.read_only || disk.read_only();
    send_json(
        stream,
        &AttachOffer {
            ok: true,
            error: None,
            size: disk.size(),
            read_only,
            features: features.clone(),
            max_table_pages: MAX_TABLE_PAGES,
        },
    )?;

    let mut pending = Vec::new();
    let (line, fds) = read_connect(stream, &reg.stop, &mut pending)?;
    let connect: ConnectRequest = serde_json::from_slice(&line)
        .map_err(|e| AttachError::Protocol(format!("connect message: {e}")))?;
    let nq = connect.ring_refs.len();
    if nq == 0 || nq > features.max_queues as usize {
        return Err(AttachError::Protocol(format!(
            "{nq} queues (1..={} offered)",
            features.max_queues
        )));
    }
    if fds.len() != 1 + 2 * nq {
        return Err(AttachError::Protocol(format!(
            "{} descriptors for {nq} queues",
            fds.len()
        )));
    }
    let mut fds = fds.into_iter();
    let table = LocalGrantTable::open(fds.next().expect("length checked"), MAX_TABLE_PAGES)
        .map_err(|e| AttachError::Protocol(e.to_string()))?;
    let mut events = Vec::with_capacity(nq);
    while let (Some(kick), Some(notify)) = (fds.next(), fds.next()) {
        events.push(LocalEvent::new(
            EventFd::from_owned(kick),
            EventFd::from_owned(notify),
        ));
    }
    let params = DeviceParams {
        name: req.name.clone(),
        ring_order: connect.ring_order,
        queues: connect
            .ring_refs
            .into_iter()
            .enumerate()
            .map(|(i, ring_refs)| QueueParams {
                ring_refs,
                event_channel: i as u32,
            })
            .collect(),
        protocol: connect.protocol,
        read_only,
        features,
        // The local attach request has no way to ask for them (frontend-shim's in-process
        // frontend can: FrontendConfig::persistent).
        persistent: false,
    };
    let transport = Arc::new(LocalTransport::new(Arc::new(table), events));
    let device = start_device(transport, params, disk)?;
    send_json(
        stream,
        &ConnectReply {
            ok: true,
            error: None,
        },
    )?;

    // Serve until the frontend goes, the daemon stops us, or the device shuts itself down.
    let mut detach_reason = "frontend detached".to_string();
    let dev_stop = device.stop_signal();
    loop {
        if take_detach(&mut pending) {
            break;
        }
        let ready = poll_readable(&[stream.as_fd(), reg.stop.fd(), dev_stop.fd()], None)?;
        if ready[1] {
            detach_reason = "daemon shutting down".to_string();
            break;
        }
        if ready[2] {
            break;
        }
        if ready[0] {
            let mut buf = [0u8; 4096];
            match recv_with_fds(stream, &mut buf) {
                // Stray descriptors are dropped (closed) at once.
                Ok((0, _)) | Err(_) => break,
                Ok((n, _)) => pending.extend_from_slice(&buf[..n]),
            }
        }
    }
    device.stop();
    let reason = match device.join() {
        DeviceEnd::Stopped => detach_reason,
        DeviceEnd::Fault(f) => f,
    };
    tracing::info!(export = %req.name, "ring detached: {reason}");
    let _ = send_json(
        stream,
        &serde_json::json!({ "event": CLOSED_EVENT, "reason": reason }),
    );
    Ok(())
}

/// Consumes the complete lines in `pending`; true if one of them is `{"op":"detach"}`.
/// Other lines are ignored; an overlong partial line is dropped.
fn take_detach(pending: &mut Vec<u8>) -> bool {
    while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = pending.drain(..=nl).collect();
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap_or_default();
        if v["op"] == "detach" {
            return true;
        }
    }
    if pending.len() > MAX_LINE {
        pending.clear();
    }
    false
}

/// Reads the connect line and its descriptors, giving up on a stop request or after
/// [`CONNECT_TIMEOUT`]. Bytes after the line are left in `rest`.
fn read_connect(
    stream: &UnixStream,
    stop: &StopSignal,
    rest: &mut Vec<u8>,
) -> Result<(Vec<u8>, Vec<OwnedFd>), AttachError> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Some(nl) = line.iter().position(|&b| b == b'\n') {
            rest.extend_from_slice(&line[nl + 1..]);
            line.truncate(nl);
            return Ok((line, fds));
        }
        if line.len() > MAX_LINE {
            return Err(AttachError::Protocol("connect message too long".into()));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(AttachError::Protocol("no connect message in time".into()));
        }
        let ready = poll_readable(&[stream.as_fd(), stop.fd()], Some(left))?;
        if ready[1] {
            return Err(AttachError::ShuttingDown);
        }
        if !ready[0] {
            continue;
        }
        let (n, got) = recv_with_fds(stream, &mut buf)?;
        if n == 0 {
            return Err(AttachError::Protocol(
                "frontend closed the connection".into(),
            ));
        }
        fds.extend(got);
        if fds.len() > MAX_FDS {
            return Err(AttachError::Protocol("too many descriptors".into()));
        }
        line.extend_from_slice(&buf[..n]);
    }
}
