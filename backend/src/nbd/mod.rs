//! The NBD server: fixed-newstyle handshake, structured replies, `base:allocation` block
//! status, and every VDI (read-write) and snapshot (`NAME@SNAP`, read-only) of a
//! [`DiskProvider`](crate::disk::DiskProvider) as an export.
//!
//! ```text
//!   proto         wire constants, headers, encoders/decoders            (pure)
//!   handshake     option haggling state machine: bytes in, replies out  (pure)
//!   meta          metadata contexts: base:allocation, parallax:hash:0..5 (pure)
//!   transmission  request checks (decide) and reply encoding            (pure)
//!   exec          a checked request against a Disk → reply bytes        (worker threads)
//!   conn, pool    per-connection buffers and backpressure; worker pool
//!   tls           STARTTLS credentials (x509, PSK) and the client's identity
//!   access        which identity may see, read or write which export
//!   uri, client   NBD URIs, and a blocking client for another server's export
//!   remote        the store's way to remote-backed VDIs' exports: a client per URI, reconnected
//!   config        limits, sizes and counters
//!   server        the mio event loops, listeners, shutdown
//! ```
//!
//! The daemon builds an [`NbdServer`], adds listeners, keeps an [`NbdShutdown`] and an
//! [`NbdStatsHandle`], and calls [`NbdServer::run`] on a thread of its own.
//!
//! # What clients see
//!
//! - Options: `EXPORT_NAME`, `ABORT`, `LIST` (with descriptions), `INFO`/`GO` (`NBD_INFO_EXPORT`,
//!   `NAME` and `DESCRIPTION` when asked, `BLOCK_SIZE` always), `STRUCTURED_REPLY`,
//!   `LIST_META_CONTEXT`/`SET_META_CONTEXT`, and `STARTTLS` when the server has TLS
//!   credentials ([`tls`]; with `require`, every other option but `ABORT` gets
//!   `NBD_REP_ERR_TLS_REQD` until the client upgrades, and `EXPORT_NAME` ends the connection).
//!   Everything else (extended headers) is `NBD_REP_ERR_UNSUP`. Options longer than 64 KiB
//!   are skipped and refused with `NBD_REP_ERR_TOO_BIG`; more than [`NbdConfig::max_options`] options end the connection.
//! - Meta contexts: `base:allocation` (context ID 1) and the block hashes
//!   `parallax:hash:0` … `:5` (IDs 2–7, docs/NBD-HASH.md, [`meta`]). `LIST_META_CONTEXT` with
//!   no query lists all; `base:` or `parallax:` a namespace; `SET_META_CONTEXT` selects each
//!   only by its full name, and a block status reply has one chunk per selected context.
//!   Other namespaces are ignored. Extents: hole → `HOLE|ZERO`, zeroed → `ZERO`, data → 0.
//! - Block sizes: minimum 1 (sub-block requests are read-modify-write), preferred 4096,
//!   maximum [`NbdConfig::max_request_bytes`].
//!   Misaligned requests are refused only if the client asked for `NBD_INFO_BLOCK_SIZE` in
//!   `NBD_OPT_GO`; otherwise any byte range works. READ, WRITE, CACHE and WRITE_ZEROES
//!   (without `FAST_ZERO`) longer than the maximum get `EINVAL` (`EOVERFLOW` for a READ with
//!   `DF`); a refused WRITE's payload is read and dropped, never buffered.
//! - Transmission flags: `HAS_FLAGS`, `SEND_FLUSH`, `SEND_FUA`, `SEND_CACHE`, `CAN_MULTI_CONN`
//!   (a disk flush covers every handle), `SEND_DF` with structured replies, and either
//!   `READ_ONLY` or `SEND_TRIM`, `SEND_WRITE_ZEROES`, `SEND_FAST_ZERO` (zeroing never writes
//!   zeros for whole blocks, so it is always fast).
//! - Errors: writes, trims and zeroing on a read-only export `EPERM`; writes and zeroing past
//!   the end `ENOSPC`, other requests past the end `EINVAL`; unknown commands and flags, or
//!   flags that do not apply to the command, `EINVAL`; disk failures `EIO`/`ENOSPC`.
//!   Structured-reply clients get every error as an `NBD_REPLY_TYPE_ERROR` chunk with a
//!   message. A bad request magic ends the connection (the stream cannot be resynchronised).
//! - Reads are answered with one `OFFSET_DATA` chunk (no hole chunks).
//! - Limits: [`NbdConfig::max_connections`] (more are closed at accept), a handshake deadline,
//!   and per connection at most [`NbdConfig::max_inflight_requests`] requests and
//!   [`NbdConfig::max_inflight_bytes`] payload between header and sent reply before the
//!   server stops reading from it.
//! - Shutdown closes connections still in the handshake, stops reading requests, sends the
//!   replies of what is in flight, then closes.
//!
//! Fuzz targets call [`handshake::fuzz_handshake`] and [`transmission::fuzz_requests`] (or the
//! parsers they use) with arbitrary bytes; none of them panics.

pub mod access;
mod buffers;
pub mod client;
mod config;
mod conn;
pub mod exec;
pub mod handshake;
pub mod meta;
mod pool;
pub mod proto;
pub mod remote;
mod server;
pub mod tls;
pub mod transmission;
pub mod uri;

pub use access::{Access, AccessPolicy, AccessRule};
pub use config::{NbdConfig, NbdStats, NbdStatsHandle};
pub use server::{NbdServer, NbdShutdown};
pub use tls::{TlsMode, TlsServer, TlsSettings};
