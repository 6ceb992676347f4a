//! The NBD server's configuration (limits and sizes) and its counters, shared by the event
//! loops and the connections they own.

use std::{
    io,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use super::handshake::PREFERRED_BLOCK;

/// Limits and sizes of the NBD server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdConfig {
    /// Connections served at once; more are accepted and closed at once.
    pub max_connections: usize,
    /// Largest READ/WRITE (and CACHE, WRITE_ZEROES) length, advertised as the maximum block
    /// size: a multiple of 512, at least 4096, below 4 GiB.
    pub max_request_bytes: u32,
    /// Worker threads running disk calls that may wait for a device (shared out among the
    /// loops).
    pub workers: usize,
    /// Event-loop threads; connections are spread over them and each runs its connections'
    /// requests that need not wait for a device itself. 0: one per CPU.
    pub loops: usize,
    /// A client must finish the handshake within this time.
    pub handshake_timeout: Duration,
    /// Options allowed in one handshake.
    pub max_options: u32,
    /// Requests per connection between header and sent reply before reading pauses.
    pub max_inflight_requests: usize,
    /// Payload bytes per connection in flight before reading pauses (one request is always
    /// admitted, however large).
    pub max_inflight_bytes: u64,
    /// On shutdown, how long to wait for in-flight replies before closing anyway.
    pub shutdown_timeout: Duration,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            max_connections: 1024,
            max_request_bytes: 64 << 20,
            workers: 8,
            loops: 0,
            handshake_timeout: Duration::from_secs(30),
            max_options: 256,
            max_inflight_requests: 128,
            max_inflight_bytes: 128 << 20,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

impl NbdConfig {
    pub fn validate(&self) -> io::Result<()> {
        let bad = |what: &str| {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                what.to_string(),
            ))
        };
        if self.max_request_bytes % 512 != 0
            || self.max_request_bytes < PREFERRED_BLOCK
            || self.max_request_bytes > 0xffff_fe00
        {
            return bad("nbd: max_request_bytes must be a multiple of 512 between 4096 and 4 GiB");
        }
        if self.max_connections == 0 || self.workers == 0 || self.max_inflight_requests == 0 {
            return bad("nbd: max_connections, workers and max_inflight_requests must be > 0");
        }
        if self.max_options == 0 {
            return bad("nbd: max_options must be > 0");
        }
        Ok(())
    }
}

/// Counters for the daemon's status output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NbdStats {
    /// Connections open now.
    pub connections: u64,
    /// Connections accepted since start (including refused ones).
    pub connections_total: u64,
    /// Requests executed.
    pub requests: u64,
    /// Requests refused or failed.
    pub request_errors: u64,
    /// Bytes read by clients.
    pub bytes_read: u64,
    /// Bytes written by clients.
    pub bytes_written: u64,
}

#[derive(Debug, Default)]
pub struct StatsInner {
    pub connections: AtomicU64,
    pub connections_total: AtomicU64,
    pub requests: AtomicU64,
    pub request_errors: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
}

/// A live view of a server's counters; cheap to clone and usable from any thread.
#[derive(Debug, Clone)]
pub struct NbdStatsHandle(Arc<StatsInner>);

impl NbdStatsHandle {
    pub(super) fn new(inner: Arc<StatsInner>) -> Self {
        NbdStatsHandle(inner)
    }
}

impl NbdStatsHandle {
    pub fn get(&self) -> NbdStats {
        let s = &self.0;
        NbdStats {
            connections: s.connections.load(Ordering::Relaxed),
            connections_total: s.connections_total.load(Ordering::Relaxed),
            requests: s.requests.load(Ordering::Relaxed),
            request_errors: s.request_errors.load(Ordering::Relaxed),
            bytes_read: s.bytes_read.load(Ordering::Relaxed),
            bytes_written: s.bytes_written.load(Ordering::Relaxed),
        }
    }
}
