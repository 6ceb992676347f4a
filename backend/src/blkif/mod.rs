//! The Xen block-ring (blkif) backend: the ring ABI, the ring engine, and the transports that
//! carry it (Xen grant tables and event channels, or a local shared-memory stand-in).
//!
//! ```text
//!   crate::xen (xenbus) ────┐                         ┌─ xen::XenTransport   (/dev/xen/gntdev, evtchn)
//!   local::serve_attach ────┼─► engine::start_device ─┤
//!   tests / frontend-shim ──┘     │ one thread/queue  └─ local::LocalTransport (memfd + eventfds)
//!                                 ▼
//!            ring (shared indexes, entries) ─► request (decode, validate) ─► disk::Disk
//! ```
//!
//! * [`abi`]: `#[repr(C)]` wire structs, constants, encode/decode (pure).
//! * [`request`]: turns a copied ring entry into a checked request or an error response (pure).
//! * [`mem`], [`ring`]: the only code touching guest memory (volatile copies, atomics).
//! * [`engine`]: the per-queue loop that follows ring.h's protocol.
//! * [`transport`]: the grant-mapping and event-channel traits; [`local`] and [`xen`] implement
//!   them. [`local`] also holds the daemon side of `frontend-shim`'s attach protocol.
//! * [`features`]: what the backend advertises (xenstore feature nodes).

pub mod abi;
pub mod engine;
pub mod event;
pub mod features;
pub mod local;
pub mod mem;
pub mod request;
pub mod ring;
pub mod transport;
pub mod xen;

#[cfg(test)]
mod cprobe;

pub use self::{
    engine::{
        start_device, Device, DeviceEnd, DeviceParams, EngineError, QueueParams, StatsSnapshot,
    },
    features::Features,
    transport::{EventChannel, Transport, TransportError},
};
