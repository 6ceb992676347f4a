//! What the ring engine needs from its environment: mapping the guest's grant references and
//! signalling over event channels. Two implementations: [`super::local`] (a memfd of pages
//! shared between processes, eventfds) and [`super::xen`] (`/dev/xen/gntdev`,
//! `/dev/xen/evtchn`).

use std::{io, os::fd::BorrowedFd};

use xen_sys::evtchn_port_t;

use super::{abi::GrantRef, mem::GuestPages};

/// Why a mapping or an event channel operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("grant reference {0} is not granted to us")]
    BadGrant(GrantRef),
    #[error("cannot map {0} grants at once")]
    TooMany(usize),
    #[error("event channel port {0} is unknown or already bound")]
    BadPort(evtchn_port_t),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl TransportError {
    pub fn io(what: &'static str, source: io::Error) -> Self {
        TransportError::Io { what, source }
    }
}

/// One bound event channel: the other end kicks us through [`EventChannel::fd`], we kick it
/// with [`EventChannel::notify`].
pub trait EventChannel: Send {
    /// Readable (for `poll`) while a kick from the other end is pending.
    fn fd(&self) -> BorrowedFd<'_>;
    /// Consumes pending kicks and re-enables delivery.
    fn clear(&self) -> Result<(), TransportError>;
    /// Kicks the other end.
    fn notify(&self) -> Result<(), TransportError>;
}

/// Grant mapping and event channels for one frontend domain (or local peer).
pub trait Transport: Send + Sync + 'static {
    type Pages: GuestPages + 'static;
    type Event: EventChannel + 'static;

    /// Maps the granted pages `refs` (in order), writable or read-only. Unmapped on drop.
    fn map(&self, refs: &[GrantRef], writable: bool) -> Result<Self::Pages, TransportError>;

    /// Binds the frontend's event channel `port`. Unbound on drop.
    fn bind(&self, port: evtchn_port_t) -> Result<Self::Event, TransportError>;
}
