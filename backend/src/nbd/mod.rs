//! The NBD server: fixed-newstyle handshake, structured replies, `base:allocation` block
//! status, and every VDI (read-write) and snapshot (`NAME@SNAP`, read-only) of a
//! [`DiskProvider`](crate::disk::DiskProvider) as an export.
//!
//! ```text
//!   proto         wire constants, headers, encoders/decoders            (pure)
//!   handshake     option haggling state machine: bytes in, replies out  (pure)
//!   transmission  request checks (decide) and reply encoding            (pure)
//!   exec          a checked request against a Disk → reply bytes        (worker threads)
//!   conn, pool    per-connection buffers and backpressure; worker pool
//!   server        the mio event loop, listeners, shutdown, stats
//! ```
//!
//! The daemon builds an [`NbdServer`], adds listeners, keeps an [`NbdShutdown`] and an
//! [`NbdStatsHandle`], and calls [`NbdServer::run`] on a thread of its own.
//!
//! Fuzz targets call [`handshake::fuzz_handshake`] and [`transmission::fuzz_requests`] (or the
//! parsers they use) with arbitrary bytes; none of them panics.

mod conn;
pub mod exec;
pub mod handshake;
mod pool;
pub mod proto;
mod ratelimit;
mod server;
pub mod transmission;

pub use server::{NbdConfig, NbdServer, NbdShutdown, NbdStats, NbdStatsHandle};
