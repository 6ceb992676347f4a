//! The Xen control plane: a xenbus backend for vbd devices, so that a guest's `xl` disk line
//! can name a Parallax VDI.
//!
//! ```text
//!   toolstack (libxl) ──► xenstore ◄── xsrs::XsRsStore (xenstore-rs, watches) ◄─┐
//!                            ▲                                                  │
//!   guest blkfront ──────────┘                    backend::Driver ── per device ─┤
//!        │ grant refs, event channel                 │  vbd::Vbd (pure machine:  │
//!        ▼                                           │   nodes in, actions out)  │
//!   connect::Connector ◄── Start(DeviceParams) ──────┘                           │
//!     XenConnector (gntdev/evtchn) | LocalDomains (memfd/eventfd, tests)         │
//!        └─► blkif::start_device ─► disk::Disk (DiskProvider, ring writer rule) ─┘
//! ```
//!
//! * [`vbd`]: the per-device state machine (pure); [`frontend`]: reading blkfront's nodes.
//! * [`store`]: the xenstore trait and an in-memory xenstore; [`xsrs`] (the daemon's, over
//!   `xenstore-rs`) and [`conn`] (blocking, with permissions and transactions) implement it
//!   over the [`wire`] protocol.
//! * [`connect`]: grant tables and event channels, real or local.
//! * [`backend`]: the driver and its thread; [`config`]: the daemon's `xen` section.
//!
//! The toolstack side (hotplug script `block-parallax`, example guest configs) lives in
//! `xen-configs/` at the top of the repository.

pub mod backend;
pub mod config;
pub mod conn;
pub mod connect;
pub mod frontend;
pub mod store;
pub mod vbd;
pub mod wire;
pub mod xsrs;

#[cfg(test)]
mod tests;

pub use self::{
    backend::{BackendSettings, DeviceStatus, Driver, XenBackend},
    config::XenConfig,
    conn::XsConn,
    connect::{Connector, LocalDomains, XenConnector},
    store::{MemStore, WatchEvent, XenStore, XsError},
    vbd::{Vbd, VbdConfig, VbdId, XenbusState},
};
