//! The xenbus backend: watches the backend directories in xenstore, keeps one [`Vbd`] machine
//! per device and does what they ask (xenstore writes, opening VDIs, starting and stopping
//! ring devices). It runs on one thread of its own ("parallax-xenbus").
//!
//! ```text
//!   watch <base>/<kind> (token "backend:<kind>") ──┐
//!   watch <frontend dir>  (token "frontend:<id>") ──┼─► Driver::handle ─► Vbd::step ─► actions
//!   every TICK: has a ring device shut itself down? ┘        ▲                 │
//!                                                            └── results ◄─────┘
//!        OpenDisk ─► DiskProvider (ring writer rule)   Start ─► Connector ─► blkif engine
//! ```

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use parking_lot::Mutex;
use tracing::{info, warn};

use super::{
    connect::Connector,
    store::{Waker, WatchEvent, XenStore, XsError},
    vbd::{Action, DiskInfo, Input, Vbd, VbdConfig, VbdId},
};
use crate::{
    blkif::{Device, DeviceEnd},
    disk::{Disk, DiskProvider, OpenError},
    ratelimit::RateLimit,
};

/// How often the driver checks whether a ring device shut itself down.
const TICK: Duration = Duration::from_millis(250);

const BACKEND_TOKEN: &str = "backend:";
const FRONTEND_TOKEN: &str = "frontend:";

/// What the backend serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSettings {
    /// The machine configuration shared by all devices (domid, features, scripts).
    pub vbd: VbdConfig,
    /// Backend kinds to watch (directories under `backend/`): `vbd`, `vbd3`.
    pub kinds: Vec<String>,
}

/// A device as the backend sees it (for status output and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStatus {
    pub id: VbdId,
    pub vdi: String,
    pub active: bool,
    pub running: bool,
}

struct Slot {
    vbd: Vbd,
    disk: Option<Arc<dyn Disk>>,
    device: Option<Device>,
}

/// The single-threaded core of the backend, over any [`XenStore`]. [`XenBackend`] runs it on
/// a thread; unit tests drive it step by step over a [`super::store::MemStore`].
pub struct Driver<S: XenStore> {
    store: S,
    cfg: Arc<VbdConfig>,
    kinds: Vec<String>,
    base: String,
    provider: Arc<dyn DiskProvider>,
    connector: Arc<dyn Connector>,
    devices: BTreeMap<VbdId, Slot>,
    guest_log: RateLimit,
}

fn open_message(e: &OpenError) -> String {
    match e {
        OpenError::NotFound(n) => {
            format!("no VDI or snapshot named {n:?} in this store (`parallax vdi list` shows them)")
        }
        OpenError::Busy { name, why } => format!("VDI {name:?} is busy: {why}"),
        OpenError::ReadOnly(n) => format!("{n:?} is read-only (attach it with mode r)"),
        OpenError::Other(m) | OpenError::Denied(m) => m.clone(),
    }
}

impl<S: XenStore> Driver<S> {
    pub fn new(
        store: S,
        settings: BackendSettings,
        provider: Arc<dyn DiskProvider>,
        connector: Arc<dyn Connector>,
    ) -> Driver<S> {
        let base = format!("/local/domain/{}/backend", settings.vbd.backend_domid);
        Driver {
            store,
            cfg: Arc::new(settings.vbd),
            kinds: settings.kinds,
            base,
            provider,
            connector,
            devices: BTreeMap::new(),
            guest_log: RateLimit::new(20, Duration::from_secs(10)),
        }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// Watches the backend directories (each watch fires once at once, which scans them).
    pub fn watch(&mut self) -> Result<(), XsError> {
        for k in &self.kinds {
            self.store.watch(
                &format!("{}/{k}", self.base),
                &format!("{BACKEND_TOKEN}{k}"),
            )?;
        }
        Ok(())
    }

    pub fn devices(&self) -> Vec<DeviceStatus> {
        self.devices
            .values()
            .map(|s| DeviceStatus {
                id: s.vbd.id().clone(),
                vdi: s.vbd.vdi().to_string(),
                active: s.vbd.active(),
                running: s.device.is_some(),
            })
            .collect()
    }

    /// Handles one watch event.
    pub fn handle(&mut self, ev: &WatchEvent) -> Result<(), XsError> {
        if let Some(kind) = ev.token.strip_prefix(BACKEND_TOKEN) {
            let dir = format!("{}/{kind}", self.base);
            let Some(rest) = ev.path.strip_prefix(&dir) else {
                return Ok(());
            };
            let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
            match parts.as_slice() {
                [] => self.rescan(kind, None),
                [fe] => match fe.parse::<u32>() {
                    Ok(fe) => self.rescan(kind, Some(fe)),
                    Err(_) => Ok(()),
                },
                [fe, dev, ..] => match (fe.parse::<u32>(), dev.parse::<u32>()) {
                    (Ok(frontend), Ok(devid)) => {
                        let id = VbdId {
                            kind: kind.to_string(),
                            frontend,
                            devid,
                        };
                        self.touch(id)
                    }
                    _ => Ok(()),
                },
            }
        } else if let Some(key) = ev.token.strip_prefix(FRONTEND_TOKEN) {
            let id = self
                .devices
                .keys()
                .find(|id| id.to_string() == key)
                .cloned();
            match id {
                Some(id) => self.run(&id, Input::Changed),
                None => Ok(()),
            }
        } else {
            Ok(())
        }
    }

    /// Looks at every device of `kind` (of one frontend domain, if given).
    fn rescan(&mut self, kind: &str, frontend: Option<u32>) -> Result<(), XsError> {
        let dir = format!("{}/{kind}", self.base);
        let domains: Vec<u32> = match frontend {
            Some(f) => vec![f],
            None => self
                .store
                .directory(&dir)?
                .iter()
                .filter_map(|d| d.parse().ok())
                .collect(),
        };
        let mut seen = Vec::new();
        for fe in domains {
            for dev in self.store.directory(&format!("{dir}/{fe}"))? {
                if let Ok(devid) = dev.parse::<u32>() {
                    seen.push(VbdId {
                        kind: kind.to_string(),
                        frontend: fe,
                        devid,
                    });
                }
            }
        }
        // Known devices that vanished find out on their own re-check.
        let known: Vec<VbdId> = self
            .devices
            .keys()
            .filter(|id| id.kind == kind && frontend.is_none_or(|f| id.frontend == f))
            .cloned()
            .collect();
        for id in known.into_iter().chain(seen) {
            self.touch(id)?;
        }
        Ok(())
    }

    /// Re-checks a device, creating its machine if it is new.
    fn touch(&mut self, id: VbdId) -> Result<(), XsError> {
        if !self.devices.contains_key(&id) {
            let dir = format!("{}/{}/{}/{}", self.base, id.kind, id.frontend, id.devid);
            if self.store.read(&dir)?.is_none() {
                return Ok(());
            }
            let vbd = Vbd::new(id.clone(), dir, self.cfg.clone());
            self.devices.insert(
                id.clone(),
                Slot {
                    vbd,
                    disk: None,
                    device: None,
                },
            );
        }
        self.run(&id, Input::Changed)
    }

    /// Notices ring devices that shut themselves down.
    pub fn check_devices(&mut self) -> Result<(), XsError> {
        let ended: Vec<VbdId> = self
            .devices
            .iter()
            .filter(|(_, s)| s.device.as_ref().is_some_and(Device::is_stopping))
            .map(|(id, _)| id.clone())
            .collect();
        for id in ended {
            let why = match self.devices.get_mut(&id).and_then(|s| s.device.take()) {
                Some(d) => match d.join() {
                    DeviceEnd::Fault(f) => f,
                    DeviceEnd::Stopped => "stopped".to_string(),
                },
                None => continue,
            };
            self.run(&id, Input::DeviceEnded(why))?;
        }
        Ok(())
    }

    /// Stops every device (answering what each has seen) and tells the frontends.
    pub fn shutdown(&mut self) {
        let ids: Vec<VbdId> = self.devices.keys().cloned().collect();
        for id in ids {
            if let Err(e) = self.run(&id, Input::Shutdown) {
                warn!("xenbus: shutting down {id}: {e}");
                if let Some(s) = self.devices.remove(&id) {
                    drop(s.device);
                }
            }
        }
    }

    /// Processes every event already queued (never blocks on a [`super::store::MemStore`]).
    pub fn run_pending(&mut self) -> Result<(), XsError> {
        while let Some(ev) = self.store.next_event(Some(Duration::ZERO))? {
            self.handle(&ev)?;
        }
        self.check_devices()
    }

    /// Feeds `input` to a device's machine and executes what it asks, feeding results back.
    fn run(&mut self, id: &VbdId, input: Input) -> Result<(), XsError> {
        let token = format!("{FRONTEND_TOKEN}{id}");
        let mut inputs = VecDeque::from([input]);
        let mut forget = false;
        while let Some(input) = inputs.pop_front() {
            let Some(slot) = self.devices.get_mut(id) else {
                return Ok(());
            };
            let store = &self.store;
            let mut fatal = None;
            let actions = slot.vbd.step(input, &mut |p: &str| match store.read(p) {
                Ok(v) => v,
                Err(e) => {
                    if e.is_fatal() {
                        fatal = Some(e);
                    }
                    None
                }
            });
            if let Some(e) = fatal {
                return Err(e);
            }
            // Consecutive writes into the backend directory go in one transaction that
            // checks the directory still exists.
            let be_dir = slot.vbd.backend_dir().to_string();
            let be_prefix = format!("{be_dir}/");
            let mut batch: Vec<(String, String)> = Vec::new();
            let flush = |batch: &mut Vec<(String, String)>| -> Result<(), XsError> {
                if batch.is_empty() {
                    return Ok(());
                }
                let r = store.write_if_exists(&be_dir, batch).map(|_| ());
                batch.clear();
                soft(r, "write", &be_dir)
            };
            for a in actions {
                if let Action::Write(p, v) = &a {
                    if p.starts_with(&be_prefix) {
                        batch.push((p.clone(), v.clone()));
                        continue;
                    }
                }
                flush(&mut batch)?;
                match a {
                    Action::Write(p, v) => soft(store.write(&p, &v), "write", &p)?,
                    Action::Remove(p) => soft(store.rm(&p), "remove", &p)?,
                    Action::WatchFrontend(fe) => soft(store.watch(&fe, &token), "watch", &fe)?,
                    Action::UnwatchFrontend(fe) => {
                        let _ = store.unwatch(&fe, &token);
                    }
                    Action::OpenDisk { vdi, writable } => {
                        let r = match self.provider.open_export(&vdi, writable) {
                            Ok(d) => {
                                let info = DiskInfo {
                                    size: d.size(),
                                    read_only: !writable || d.read_only(),
                                };
                                slot.disk = Some(d);
                                Ok(info)
                            }
                            Err(e) => Err(open_message(&e)),
                        };
                        inputs.push_back(Input::DiskOpened(r));
                    }
                    Action::CloseDisk => {
                        debug_assert!(slot.device.is_none());
                        slot.disk = None;
                    }
                    Action::Start(params) => {
                        let r = match &slot.disk {
                            Some(d) => self
                                .connector
                                .connect(id.frontend, params, d.clone())
                                .map(|dev| slot.device = Some(dev))
                                .map_err(|e| e.to_string()),
                            None => Err("no disk open".to_string()),
                        };
                        inputs.push_back(Input::Started(r));
                    }
                    Action::Stop => {
                        if let Some(d) = slot.device.take() {
                            d.stop();
                            if let DeviceEnd::Fault(f) = d.join() {
                                info!("xenbus: {id}: ring had shut down: {f}");
                            }
                        }
                    }
                    Action::Log {
                        warn: w,
                        guest,
                        msg,
                    } => {
                        if guest {
                            match self.guest_log.check() {
                                Some(0) => {}
                                Some(n) => warn!("xenbus: {n} lines about guests suppressed"),
                                None => continue,
                            }
                        }
                        if w {
                            warn!("xenbus: {msg}");
                        } else {
                            info!("xenbus: {msg}");
                        }
                    }
                    Action::Forget => forget = true,
                }
            }
            flush(&mut batch)?;
        }
        if forget {
            if let Some(s) = self.devices.remove(id) {
                drop(s.device);
            }
        }
        Ok(())
    }
}

/// A failed write on a live connection is logged and survived (e.g. the toolstack removed
/// the directory meanwhile); a dead connection is an error.
fn soft(r: Result<(), XsError>, what: &str, path: &str) -> Result<(), XsError> {
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.is_fatal() => Err(e),
        Err(e) => {
            info!("xenbus: {what} {path}: {e}");
            Ok(())
        }
    }
}

/// The running backend: the xenbus thread and how to stop it.
pub struct XenBackend {
    thread: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    waker: Waker,
    status: Arc<Mutex<Vec<DeviceStatus>>>,
}

impl XenBackend {
    /// Starts the xenbus thread over `store` (already connected): sets the watches first, so
    /// a failure is reported here.
    pub fn start<S: XenStore + 'static>(
        store: S,
        settings: BackendSettings,
        provider: Arc<dyn DiskProvider>,
        connector: Arc<dyn Connector>,
    ) -> Result<XenBackend, XsError> {
        let waker = store.waker();
        let what = format!(
            "/local/domain/{}/backend/{{{}}}",
            settings.vbd.backend_domid,
            settings.kinds.join(",")
        );
        let mut driver = Driver::new(store, settings, provider, connector);
        driver.watch()?;
        let stop = Arc::new(AtomicBool::new(false));
        let status = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let stop = stop.clone();
            let status = status.clone();
            std::thread::Builder::new()
                .name("parallax-xenbus".into())
                .spawn(move || xenbus_loop(driver, &stop, &status))?
        };
        info!("xenbus backend watching {what}");
        Ok(XenBackend {
            thread: Some(thread),
            stop,
            waker,
            status,
        })
    }

    /// The devices as of the last event handled.
    pub fn devices(&self) -> Vec<DeviceStatus> {
        self.status.lock().clone()
    }

    /// Stops every device (each answers what it has seen; frontends see `Closing`), and the
    /// thread.
    pub fn stop(mut self) {
        self.stop_thread();
    }

    fn stop_thread(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        (self.waker)();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                warn!("xenbus thread panicked");
            }
        }
    }
}

impl Drop for XenBackend {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

fn xenbus_loop<S: XenStore>(
    mut driver: Driver<S>,
    stop: &AtomicBool,
    status: &Mutex<Vec<DeviceStatus>>,
) {
    let mut result = Ok(());
    while !stop.load(Ordering::SeqCst) {
        result = (|| {
            if let Some(ev) = driver.store.next_event(Some(TICK))? {
                driver.handle(&ev)?;
                // Take whatever else is queued before publishing the status.
                for _ in 0..1024 {
                    match driver.store.next_event(Some(Duration::ZERO))? {
                        Some(ev) => driver.handle(&ev)?,
                        None => break,
                    }
                }
            }
            driver.check_devices()
        })();
        *status.lock() = driver.devices();
        if result.is_err() {
            break;
        }
    }
    if let Err(e) = result {
        warn!("xenbus: lost xenstore ({e}); connected Xen devices keep running until the daemon stops, new ones are not served");
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(TICK);
        }
    }
    driver.shutdown();
    status.lock().clear();
}
