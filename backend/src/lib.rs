//! Parallax: a block store for the disks of very many virtual machines.
//!
//! ```text
//!  Xen blkfront / frontend-shim ──► blkif (ring engine) ─┐
//!  NBD clients ─────────────────► nbd (server) ──────────┼─► disk::Disk ─► store (VDIs, CoW radix maps,
//!  parallax CLI ──► daemon (control socket) ─────────────┘                  refcounts, registry, commits)
//!                                                                                 │
//!                                                                          store::device (file / block device)
//! ```
//!
//! Each layer is a module: [`store`] is the crash-safe copy-on-write block store, [`disk`] the
//! interface the protocol front ends use to reach a VDI, [`nbd`] the NBD server, [`blkif`] the
//! Xen block-ring backend, [`xen`] its xenbus control plane (the vbd handshake in xenstore),
//! [`daemon`] the long-running `parallax serve`, and [`cli`] the `parallax` command;
//! [`ratelimit`] keeps what clients and guests can make us log in bounds, [`metrics`] counts
//! what the daemon serves for Prometheus, [`schedule`] takes and prunes the snapshots of
//! snapshot schedules, [`signal`] is how the daemon wakes or stops its background threads,
//! and [`malloc`] is what it asks of the C allocator.

pub mod blkif;
pub mod cli;
pub mod cluster;
pub mod daemon;
pub mod disk;
pub mod malloc;
pub mod metrics;
pub mod nbd;
pub mod ratelimit;
pub mod schedule;
pub mod signal;
pub mod store;
pub mod stream;
pub mod transfer;
pub mod util;
pub mod xen;
