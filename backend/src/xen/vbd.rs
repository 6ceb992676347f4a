//! One vbd's xenbus state machine, pure: node reads and events in, xenstore writes and
//! actions out. The driver ([`super::backend`]) executes the actions and feeds results back.
//!
//! ```text
//!  toolstack writes backend/<kind>/<dom>/<dev> (state 1, params, script, online=1 ...)
//!    New ──claim (script) + OpenDisk(params)──► DiskOpened ──► features, parallax-status,
//!                                                              InitWait (2)
//!  frontend Initialised/Connected ──► read rings ──► Start ──► Started: sectors, info, ...,
//!                                                                Connected (4)
//!  frontend Closing ──► Stop, Closing (5)     frontend Closed ──► Closed (6)
//!  frontend Initialising after a close ──► InitWait again (reconnect)
//!  online=0 or toolstack Closing ──► wait for the frontend to close, Closed, CloseDisk, Done
//!  backend directory removed ──► Stop, CloseDisk, Forget
//! ```
//!
//! The machine is level-triggered: on every change it re-reads the nodes it needs, so
//! coalesced or spurious watch events do no harm, and it never trusts the frontend's nodes.

use std::sync::Arc;

use super::frontend::read_rings;
use crate::blkif::{
    abi::{VDISK_CDROM, VDISK_READONLY, VDISK_REMOVABLE},
    features::{device_nodes, Features},
    DeviceParams,
};

/// Node the daemon writes when it has opened the VDI (`ready`) or failed to (`error`, with
/// `hotplug-error` saying why). The `block-parallax` hotplug script waits for it.
pub const STATUS_NODE: &str = "parallax-status";
/// Node naming the VDI the daemon serves for this device.
pub const VDI_NODE: &str = "parallax-vdi";
/// Where toolstacks look for a hotplug failure's reason.
pub const HOTPLUG_ERROR_NODE: &str = "hotplug-error";

/// `enum xenbus_state` (`xen/io/xenbus.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XenbusState {
    Unknown = 0,
    Initialising = 1,
    InitWait = 2,
    Initialised = 3,
    Connected = 4,
    Closing = 5,
    Closed = 6,
    Reconfiguring = 7,
    Reconfigured = 8,
}

impl XenbusState {
    pub fn parse(s: &str) -> Option<XenbusState> {
        use XenbusState::*;
        Some(match s.trim().parse::<u32>().ok()? {
            0 => Unknown,
            1 => Initialising,
            2 => InitWait,
            3 => Initialised,
            4 => Connected,
            5 => Closing,
            6 => Closed,
            7 => Reconfiguring,
            8 => Reconfigured,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        ["0", "1", "2", "3", "4", "5", "6", "7", "8"][self as usize]
    }
}

/// A device: `backend/<kind>/<frontend domid>/<devid>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VbdId {
    pub kind: String,
    pub frontend: u32,
    pub devid: u32,
}

impl std::fmt::Display for VbdId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}-{}", self.kind, self.frontend, self.devid)
    }
}

/// What every device of one backend shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VbdConfig {
    /// This (the backend) domain's id.
    pub backend_domid: u32,
    /// What to offer frontends.
    pub features: Features,
    /// Serve devices whose `script` node names one of these scripts (file name); empty:
    /// every device.
    pub scripts: Vec<String>,
}

/// The opened VDI, as the machine needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskInfo {
    pub size: u64,
    pub read_only: bool,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A watch fired on the device (either directory), or the driver wants a re-check.
    Changed,
    /// Answer to [`Action::OpenDisk`].
    DiskOpened(Result<DiskInfo, String>),
    /// Answer to [`Action::Start`].
    Started(Result<(), String>),
    /// The running device shut itself down (the frontend broke the ring protocol, or the
    /// transport failed).
    DeviceEnded(String),
    /// The daemon is stopping.
    Shutdown,
}

/// What to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Write(String, String),
    Remove(String),
    WatchFrontend(String),
    UnwatchFrontend(String),
    /// Open the VDI (answer with [`Input::DiskOpened`]).
    OpenDisk {
        vdi: String,
        writable: bool,
    },
    /// Let go of the VDI (after any running device has stopped).
    CloseDisk,
    /// Map the rings and serve them (answer with [`Input::Started`]).
    Start(DeviceParams),
    /// Stop the running device: answer what it has seen, unmap, unbind.
    Stop,
    /// A line for the log; `guest` lines are something a guest can trigger (rate-limit them).
    Log {
        warn: bool,
        guest: bool,
        msg: String,
    },
    /// The device is gone: drop the machine.
    Forget,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum DiskSlot {
    None,
    Opening,
    Open(DiskInfo),
    Failed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not looked at yet (or reset by the toolstack).
    New,
    /// Not ours (another script); only its removal matters.
    Ignored,
    Active,
    /// Removed (`online=0`) and closed; waiting for the directory to go.
    Done,
}

/// One device's state.
#[derive(Debug)]
pub struct Vbd {
    id: VbdId,
    cfg: Arc<VbdConfig>,
    be: String,
    fe: Option<String>,
    phase: Phase,
    /// Our last write to `state`.
    written: Option<XenbusState>,
    disk: DiskSlot,
    vdi: String,
    running: bool,
    /// The toolstack asked to close (wrote `Closing` to our state).
    close_requested: bool,
    /// A frontend was connected to an earlier backend: once it has closed, offer InitWait.
    reconnect_after_close: bool,
    /// We refused the frontend's rings; wait for it to close or restart before trying again.
    refused: bool,
    /// `info` bits besides read-only (`device-type = cdrom`, `removable = 1`).
    info_extra: u32,
    features: Features,
}

/// Reads a node by absolute path (`None`: missing or unreadable).
pub type Read<'a> = &'a mut dyn FnMut(&str) -> Option<String>;

/// The VDI a `params` node names, without the toolstack's format prefix.
pub fn vdi_from_params(params: &str) -> Result<String, String> {
    let p = params.trim();
    let (prefix, rest) = match p.split_once(':') {
        Some((pre, rest)) if !pre.contains('@') && !pre.contains('/') => (Some(pre), rest),
        _ => (None, p),
    };
    let name = match prefix {
        None => p,
        Some("parallax" | "raw" | "aio") => rest,
        Some(other) => {
            return Err(format!(
                "disk format {other:?} in params {p:?}: Parallax serves raw VDIs (use format=raw)"
            ))
        }
    };
    if name.is_empty() {
        return Err("the disk names no VDI (params is empty): set target=VDI-NAME".into());
    }
    Ok(name.to_string())
}

impl Vbd {
    /// A device found at `backend_dir` (`/local/domain/<be>/backend/<kind>/<dom>/<dev>`).
    pub fn new(id: VbdId, backend_dir: String, cfg: Arc<VbdConfig>) -> Vbd {
        let features = cfg.features.clamped();
        Vbd {
            id,
            cfg,
            be: backend_dir,
            fe: None,
            phase: Phase::New,
            written: None,
            disk: DiskSlot::None,
            vdi: String::new(),
            running: false,
            close_requested: false,
            reconnect_after_close: false,
            refused: false,
            info_extra: 0,
            features,
        }
    }

    pub fn id(&self) -> &VbdId {
        &self.id
    }

    pub fn backend_dir(&self) -> &str {
        &self.be
    }

    /// The frontend directory, once validated.
    pub fn frontend_dir(&self) -> Option<&str> {
        self.fe.as_deref()
    }

    /// Whether the ring is being served.
    pub fn running(&self) -> bool {
        self.running
    }

    /// Whether this device is ours (claimed and not yet removed).
    pub fn active(&self) -> bool {
        self.phase == Phase::Active
    }

    /// The VDI served (empty before the claim).
    pub fn vdi(&self) -> &str {
        &self.vdi
    }

    fn node(&self, key: &str) -> String {
        format!("{}/{key}", self.be)
    }

    fn write(&self, out: &mut Vec<Action>, key: &str, value: impl Into<String>) {
        out.push(Action::Write(self.node(key), value.into()));
    }

    fn log(&self, out: &mut Vec<Action>, warn: bool, guest: bool, msg: String) {
        out.push(Action::Log {
            warn,
            guest,
            msg: format!("{} ({}): {msg}", self.id, self.vdi),
        });
    }

    fn set_state(&mut self, out: &mut Vec<Action>, observed: Option<XenbusState>, s: XenbusState) {
        if observed != Some(s) {
            self.write(out, "state", s.as_str());
        }
        self.written = Some(s);
    }

    fn stop(&mut self, out: &mut Vec<Action>) {
        if self.running {
            out.push(Action::Stop);
            self.running = false;
        }
    }

    /// Stops the device and lets go of everything (but keeps the machine).
    fn release(&mut self, out: &mut Vec<Action>) {
        self.stop(out);
        if matches!(self.disk, DiskSlot::Open(_) | DiskSlot::Opening) {
            out.push(Action::CloseDisk);
        }
        self.disk = DiskSlot::None;
        if let Some(fe) = self.fe.take() {
            out.push(Action::UnwatchFrontend(fe));
        }
    }

    /// Linux's `xenbus_dev_fatal` place for a reason: `/local/domain/<be>/error/<nodename>`.
    fn error_dir(&self) -> String {
        let prefix = format!("/local/domain/{}/", self.cfg.backend_domid);
        let rel = self.be.strip_prefix(&prefix).unwrap_or(&self.be);
        format!("{prefix}error/{}", rel.trim_start_matches('/'))
    }

    /// Feeds one input; returns what to do.
    pub fn step(&mut self, input: Input, read: Read<'_>) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Changed => {}
            Input::DiskOpened(Ok(info)) => {
                self.disk = DiskSlot::Open(info);
                if info.read_only {
                    self.features.discard = false;
                }
                self.write(&mut out, VDI_NODE, self.vdi.clone());
                self.write(&mut out, STATUS_NODE, "ready");
                self.log(
                    &mut out,
                    false,
                    false,
                    format!(
                        "serving VDI {:?}{}",
                        self.vdi,
                        if info.read_only { " read-only" } else { "" }
                    ),
                );
            }
            Input::DiskOpened(Err(msg)) => self.disk_failed(&mut out, &msg),
            Input::Started(Ok(())) => {
                if let DiskSlot::Open(info) = self.disk {
                    self.running = true;
                    for (k, v) in device_nodes(info.size, info.read_only) {
                        if k == "info" {
                            let ro = if info.read_only { VDISK_READONLY } else { 0 };
                            self.write(&mut out, k, (ro | self.info_extra).to_string());
                        } else {
                            self.write(&mut out, k, v);
                        }
                    }
                    let observed = read(&self.node("state")).and_then(|s| XenbusState::parse(&s));
                    self.set_state(&mut out, observed, XenbusState::Connected);
                    self.log(&mut out, false, true, "connected".into());
                } else {
                    // Cannot happen (Start is only asked with the disk open); stop to be safe.
                    out.push(Action::Stop);
                }
            }
            Input::Started(Err(msg)) => {
                self.refuse(&mut out, read, &format!("cannot connect the ring: {msg}"));
            }
            Input::DeviceEnded(why) => {
                if self.running {
                    self.running = false;
                    self.log(&mut out, true, true, format!("ring shut down: {why}"));
                    let observed = read(&self.node("state")).and_then(|s| XenbusState::parse(&s));
                    self.set_state(&mut out, observed, XenbusState::Closing);
                }
            }
            Input::Shutdown => {
                let was_running = self.running;
                self.release(&mut out);
                if was_running {
                    // Tell the frontend its backend went away; a restarted daemon offers
                    // InitWait again once the frontend has closed.
                    let observed = read(&self.node("state")).and_then(|s| XenbusState::parse(&s));
                    self.set_state(&mut out, observed, XenbusState::Closing);
                }
                out.push(Action::Forget);
                return out;
            }
        }
        self.reconcile(read, &mut out, 0);
        out
    }

    /// The VDI cannot be served: tell the toolstack (the hotplug script reports it).
    fn disk_failed(&mut self, out: &mut Vec<Action>, msg: &str) {
        let msg = format!("parallax: {msg}");
        self.write(out, HOTPLUG_ERROR_NODE, msg.clone());
        self.write(out, STATUS_NODE, "error");
        self.log(out, true, false, msg.clone());
        self.disk = DiskSlot::Failed(msg);
    }

    /// A frontend that cannot be served: say why and move to Closing.
    fn refuse(&mut self, out: &mut Vec<Action>, read: Read<'_>, why: &str) {
        self.refused = true;
        self.stop(out);
        self.log(out, true, true, why.to_string());
        out.push(Action::Write(
            format!("{}/error", self.error_dir()),
            why.to_string(),
        ));
        let observed = read(&self.node("state")).and_then(|s| XenbusState::parse(&s));
        self.set_state(out, observed, XenbusState::Closing);
    }

    fn reconcile(&mut self, read: Read<'_>, out: &mut Vec<Action>, depth: u32) {
        if read(&self.be).is_none() {
            // The toolstack removed the device.
            self.release(out);
            if self.phase == Phase::Active || self.phase == Phase::Done {
                out.push(Action::Remove(self.error_dir()));
            }
            out.push(Action::Forget);
            return;
        }
        if self.phase == Phase::Ignored {
            return;
        }
        let observed = read(&self.node("state")).and_then(|s| XenbusState::parse(&s));
        // The toolstack set the device up anew over our old state: start over.
        if observed == Some(XenbusState::Initialising)
            && self.written.is_some_and(|w| w != XenbusState::Initialising)
            && depth == 0
        {
            self.log(out, false, false, "re-created by the toolstack".into());
            self.release(out);
            *self = Vbd::new(self.id.clone(), self.be.clone(), self.cfg.clone());
            return self.reconcile(read, out, depth + 1);
        }
        match self.phase {
            Phase::Ignored | Phase::Done => return,
            Phase::New => {
                self.claim(read, out, observed);
                // A claim that failed at once goes on to InitWait (so the hotplug script
                // runs and reports it); one that opens the VDI continues on DiskOpened.
                if self.phase == Phase::Active && matches!(self.disk, DiskSlot::Failed(_)) {
                    self.reconcile(read, out, depth + 1);
                }
                return;
            }
            Phase::Active => {}
        }
        if matches!(self.disk, DiskSlot::Opening | DiskSlot::None) {
            return;
        }
        let online = read(&self.node("online")).is_some_and(|v| v.trim() == "1");
        if self.written.is_none() {
            self.publish(read, out, observed);
        }
        if observed == Some(XenbusState::Closing) && self.written != Some(XenbusState::Closing) {
            self.close_requested = true;
        }
        let fe_state = self
            .fe
            .as_ref()
            .and_then(|fe| read(&format!("{fe}/state")))
            .and_then(|s| XenbusState::parse(&s));
        if self.close_requested || !online {
            return self.close(out, observed, fe_state, online);
        }
        use XenbusState::*;
        if !matches!(fe_state, Some(Initialised | Connected)) {
            self.refused = false;
        }
        match fe_state {
            None | Some(Unknown) => {
                if self.running || matches!(self.written, Some(Connected | Closing)) {
                    self.stop(out);
                    self.log(out, true, true, "frontend disappeared".into());
                    self.set_state(out, observed, Closed);
                }
            }
            Some(Initialising | InitWait) => {
                if self.running {
                    self.stop(out);
                    self.log(out, false, true, "frontend restarted".into());
                }
                if matches!(self.written, Some(Connected | Closing | Closed)) {
                    self.log(out, false, true, "frontend reconnecting".into());
                    self.reconnect_after_close = false;
                    self.set_state(out, observed, InitWait);
                }
            }
            Some(Initialised | Connected) => {
                if self.running
                    || self.refused
                    || (self.reconnect_after_close
                        && matches!(self.written, Some(Closing | Closed)))
                {
                    return;
                }
                if let DiskSlot::Failed(msg) = &self.disk {
                    let msg = msg.clone();
                    self.refuse(out, read, &msg);
                    return;
                }
                self.connect(read, out);
            }
            Some(Closing) => {
                self.stop(out);
                self.set_state(out, observed, Closing);
            }
            Some(Closed) => {
                self.stop(out);
                // From InitWait (offered after a close, or on a restart) we wait for the
                // frontend to come back; from Connected/Closing we follow it down.
                if !matches!(self.written, Some(Connected | Closing)) {
                    return;
                }
                self.set_state(out, observed, Closed);
                if self.reconnect_after_close {
                    self.reconnect_after_close = false;
                    self.log(
                        out,
                        false,
                        true,
                        "offering the frontend a new connection".into(),
                    );
                    self.set_state(out, Some(Closed), InitWait);
                }
            }
            Some(Reconfiguring | Reconfigured) => {}
        }
    }

    /// Removal (`online=0`) or a toolstack `Closing`: follow the frontend down, then finish.
    fn close(
        &mut self,
        out: &mut Vec<Action>,
        observed: Option<XenbusState>,
        fe_state: Option<XenbusState>,
        online: bool,
    ) {
        use XenbusState::*;
        match fe_state {
            Some(Initialised | Connected | Closing) => {
                // The frontend must let go first (it may refuse while the disk is in use;
                // then the toolstack gives up or forces the removal).
                if fe_state == Some(Closing) {
                    self.stop(out);
                }
                if observed != Some(Closing) {
                    self.set_state(out, observed, Closing);
                }
            }
            _ => {
                self.stop(out);
                self.set_state(out, observed, Closed);
                if !online {
                    self.log(out, false, false, "removed".into());
                    self.release(out);
                    self.phase = Phase::Done;
                }
            }
        }
    }

    fn claim(&mut self, read: Read<'_>, out: &mut Vec<Action>, observed: Option<XenbusState>) {
        if observed.is_none() {
            // The toolstack is still writing the directory.
            return;
        }
        let script = read(&self.node("script")).unwrap_or_default();
        let script_name = script.rsplit('/').next().unwrap_or("").trim().to_string();
        if !self.cfg.scripts.is_empty() && !self.cfg.scripts.contains(&script_name) {
            self.phase = Phase::Ignored;
            out.push(Action::Log {
                warn: false,
                guest: false,
                msg: format!(
                    "{}: not a Parallax disk (hotplug script {script:?}); leaving it alone",
                    self.id
                ),
            });
            return;
        }
        self.phase = Phase::Active;
        let fe_id = read(&self.node("frontend-id")).and_then(|v| v.trim().parse::<u32>().ok());
        let fe = read(&self.node("frontend")).unwrap_or_default();
        let fe_ok = fe_id == Some(self.id.frontend)
            && fe.starts_with(&format!("/local/domain/{}/", self.id.frontend))
            && !fe.contains("/../");
        let mode = read(&self.node("mode")).unwrap_or_default();
        if read(&self.node("device-type")).as_deref() == Some("cdrom") {
            self.info_extra |= VDISK_CDROM;
        }
        if read(&self.node("removable")).as_deref() == Some("1") {
            self.info_extra |= VDISK_REMOVABLE;
        }
        if read(&self.node("discard-enable")).as_deref() == Some("0") {
            self.features.discard = false;
        }
        let params = read(&self.node("params")).unwrap_or_default();
        if fe_ok {
            out.push(Action::WatchFrontend(fe.clone()));
            self.fe = Some(fe.clone());
        }
        let vdi = if fe_ok {
            vdi_from_params(&params)
        } else {
            Err(format!(
                "backend nodes frontend={fe:?} frontend-id={fe_id:?} do not match device {}",
                self.id
            ))
        };
        match vdi {
            Ok(vdi) => {
                self.vdi = vdi.clone();
                let writable = !mode.trim().starts_with('r') && !vdi.contains('@');
                self.disk = DiskSlot::Opening;
                out.push(Action::OpenDisk { vdi, writable });
            }
            // Reported through the hotplug script like an unknown VDI.
            Err(msg) => self.disk_failed(out, &msg),
        }
    }

    /// First time after the disk is settled: features and InitWait.
    fn publish(&mut self, read: Read<'_>, out: &mut Vec<Action>, observed: Option<XenbusState>) {
        for (k, v) in self.features.xenstore_nodes() {
            self.write(out, k, v);
        }
        let fe_state = self
            .fe
            .as_ref()
            .and_then(|fe| read(&format!("{fe}/state")))
            .and_then(|s| XenbusState::parse(&s));
        if fe_state == Some(XenbusState::Connected) {
            // Connected to an earlier instance of the daemon: that ring cannot be resumed.
            self.log(
                out,
                true,
                false,
                "frontend is connected to an earlier backend instance; asking it to close and reconnect"
                    .into(),
            );
            self.reconnect_after_close = true;
            self.set_state(out, observed, XenbusState::Closing);
        } else {
            self.set_state(out, observed, XenbusState::InitWait);
        }
    }

    fn connect(&mut self, read: Read<'_>, out: &mut Vec<Action>) {
        let (Some(fe), DiskSlot::Open(info)) = (self.fe.clone(), &self.disk) else {
            return;
        };
        let read_only = info.read_only;
        let rings = read_rings(&mut |k| read(&format!("{fe}/{k}")), &self.features);
        match rings {
            Ok(r) => out.push(Action::Start(DeviceParams {
                name: if self.vdi.is_empty() {
                    self.id.to_string()
                } else {
                    self.vdi.clone()
                },
                ring_order: r.ring_order,
                queues: r.queues,
                protocol: r.protocol,
                read_only,
                features: self.features.clone(),
                persistent: r.persistent,
            })),
            Err(msg) => self.refuse(out, read, &msg),
        }
    }
}
