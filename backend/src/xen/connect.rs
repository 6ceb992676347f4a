//! How the xenbus backend reaches a frontend's memory and event channels: the seam between
//! the control plane and the ring engine.
//!
//! ```text
//!   xenbus backend ── Connector::connect(domid, DeviceParams, disk) ──► blkif::start_device
//!        XenConnector:   /dev/xen/gntdev + /dev/xen/evtchn (dom0 or a storage domain)
//!        LocalDomains:   grant tables and event channels that local "guests" registered
//!                        (tests, frontend-shim): ring-ref = page of the guest's memfd,
//!                        event-channel = a port the guest allocated here
//! ```

use std::{collections::HashMap, sync::Arc};

use parking_lot::Mutex;
use xen_sys::{domid_t, evtchn_port_t};

use crate::{
    blkif::{
        abi::GrantRef,
        local::{LocalEvent, LocalGrantTable, LocalPages},
        start_device,
        xen::XenTransport,
        Device, DeviceParams, EngineError, Transport, TransportError,
    },
    disk::Disk,
};

/// Starts a device for a frontend domain over some transport.
pub trait Connector: Send + Sync {
    fn connect(
        &self,
        frontend: u32,
        params: DeviceParams,
        disk: Arc<dyn Disk>,
    ) -> Result<Device, EngineError>;
}

/// The real thing: grant mapping and event channels through the Xen devices.
#[derive(Debug, Default)]
pub struct XenConnector;

fn domid(frontend: u32) -> Result<domid_t, EngineError> {
    domid_t::try_from(frontend)
        .map_err(|_| EngineError::Params(format!("domain id {frontend} out of range")))
}

impl Connector for XenConnector {
    fn connect(
        &self,
        frontend: u32,
        params: DeviceParams,
        disk: Arc<dyn Disk>,
    ) -> Result<Device, EngineError> {
        let t = XenTransport::open(domid(frontend)?)?;
        start_device(Arc::new(t), params, disk)
    }
}

#[derive(Default)]
struct LocalDomain {
    table: Option<Arc<LocalGrantTable>>,
    ports: HashMap<evtchn_port_t, LocalEvent>,
    next_port: evtchn_port_t,
}

/// Local stand-ins for guest domains: each has a grant table (a sealed memfd) and event
/// channel ports, registered by whoever plays the guest. Cheap to clone.
#[derive(Clone, Default)]
pub struct LocalDomains {
    domains: Arc<Mutex<HashMap<u32, LocalDomain>>>,
}

impl LocalDomains {
    pub fn new() -> LocalDomains {
        LocalDomains::default()
    }

    /// Sets domain `domid`'s grant table (the backend's own mapping of the guest's memfd, as
    /// [`LocalGrantTable::open`] makes it). Replaces an earlier one; mappings made from it
    /// stay valid.
    pub fn set_grant_table(&self, domid: u32, table: Arc<LocalGrantTable>) {
        self.domains.lock().entry(domid).or_default().table = Some(table);
    }

    /// Allocates an unbound port of `domid` whose backend end is `backend_end` (like
    /// `EVTCHNOP_alloc_unbound`): the guest writes the port to xenstore, the backend binds it.
    pub fn alloc_port(&self, domid: u32, backend_end: LocalEvent) -> evtchn_port_t {
        let mut d = self.domains.lock();
        let dom = d.entry(domid).or_default();
        // Port 0 is never valid in Xen; start at 1.
        dom.next_port = dom.next_port.max(1);
        let port = dom.next_port;
        dom.next_port += 1;
        dom.ports.insert(port, backend_end);
        port
    }

    /// Forgets a domain (its ports and table; existing mappings stay valid).
    pub fn remove(&self, domid: u32) {
        self.domains.lock().remove(&domid);
    }
}

/// One local domain as a [`Transport`].
struct LocalDomainTransport {
    domid: u32,
    table: Arc<LocalGrantTable>,
    domains: LocalDomains,
}

impl Transport for LocalDomainTransport {
    type Pages = LocalPages;
    type Event = LocalEvent;

    fn map(&self, refs: &[GrantRef], writable: bool) -> Result<LocalPages, TransportError> {
        self.table.pages_for(refs, writable)
    }

    fn bind(&self, port: evtchn_port_t) -> Result<LocalEvent, TransportError> {
        self.domains
            .domains
            .lock()
            .get_mut(&self.domid)
            .and_then(|d| d.ports.remove(&port))
            .ok_or(TransportError::BadPort(port))
    }
}

impl Connector for LocalDomains {
    fn connect(
        &self,
        frontend: u32,
        params: DeviceParams,
        disk: Arc<dyn Disk>,
    ) -> Result<Device, EngineError> {
        let table = self
            .domains
            .lock()
            .get(&frontend)
            .and_then(|d| d.table.clone())
            .ok_or_else(|| {
                EngineError::Params(format!("local domain {frontend} has no grant table"))
            })?;
        let t = LocalDomainTransport {
            domid: frontend,
            table,
            domains: self.clone(),
        };
        start_device(Arc::new(t), params, disk)
    }
}
