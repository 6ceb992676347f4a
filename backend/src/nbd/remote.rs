//! The store's way to the network ([`Remote`]): one NBD client per backing URI, reconnected
//! when it fails.
//!
//! ```text
//!  read(uri) ─► connection of uri (one request at a time) ─ error ─► drop it, reconnect with
//!              backoff until `reconnect_delay` has passed since the first failure ─► EIO
//! ```
//!
//! While a backing is unreachable, its uncached reads wait (like QEMU's `reconnect-delay`)
//! and then fail; the next read tries again, so a remote that comes back is used at once.
//! Cached reads and every write never come here.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use tracing::{info, warn};

use super::{
    client::{BlockInfo, NbdClient},
    meta::HASH_BLOCK,
    uri::NbdUri,
};
use crate::store::{Remote, RemoteBlock, StoreError, StoreResult};

/// How long a connection attempt or a request may take before it counts as a failure.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The default wait for an unreachable backing, as QEMU's `reconnect-delay` suggests.
pub const DEFAULT_RECONNECT_DELAY: Duration = Duration::from_secs(30);

/// One backing's connection (one request at a time), and what became of it (kept apart,
/// so that `vdi info` does not wait behind a reconnect).
#[derive(Default)]
struct Link {
    client: Mutex<Option<NbdClient>>,
    status: Mutex<Status>,
}

#[derive(Default)]
struct Status {
    /// When it started failing, and why (cleared by the next success).
    failing: Option<(Instant, String)>,
    /// Bytes fetched over it since this process started.
    fetched: u64,
}

/// [`Remote`] over NBD: what the daemon and the CLI give the store.
pub struct NbdRemote {
    reconnect_delay: Duration,
    links: Mutex<HashMap<String, Arc<Link>>>,
}

impl NbdRemote {
    pub fn new(reconnect_delay: Duration) -> NbdRemote {
        NbdRemote {
            reconnect_delay,
            links: Mutex::default(),
        }
    }

    fn link(&self, uri: &str) -> Arc<Link> {
        self.links
            .lock()
            .entry(uri.to_string())
            .or_default()
            .clone()
    }

    /// Runs `op` on the connection to `uri`, connecting (again) as needed, until it works or
    /// (`patient`) the reconnect delay has passed since the backing started failing.
    fn with_client<R>(
        &self,
        uri: &str,
        patient: bool,
        mut op: impl FnMut(&mut NbdClient) -> std::io::Result<R>,
    ) -> StoreResult<R> {
        let parsed = NbdUri::parse(uri).map_err(StoreError::Invalid)?;
        let link = self.link(uri);
        let mut client = link.client.lock();
        let mut backoff = Duration::from_millis(100);
        loop {
            let attempt = match client.as_mut() {
                Some(c) => op(c),
                None => NbdClient::connect_with(&parsed, IO_TIMEOUT, true).and_then(|mut c| {
                    let r = op(&mut c);
                    *client = Some(c);
                    r
                }),
            };
            let e = match attempt {
                Ok(r) => {
                    if let Some((since, _)) = link.status.lock().failing.take() {
                        info!(
                            "backing {uri}: reachable again after {:.1}s",
                            since.elapsed().as_secs_f64()
                        );
                    }
                    return Ok(r);
                }
                Err(e) => e,
            };
            *client = None;
            if !patient {
                return Err(StoreError::Remote(format!("{uri}: {e}")));
            }
            let since = {
                let mut st = link.status.lock();
                let since = match &st.failing {
                    Some((since, _)) => *since,
                    None => {
                        warn!("backing {uri}: {e}; reconnecting");
                        Instant::now()
                    }
                };
                st.failing = Some((since, e.to_string()));
                since
            };
            let waited = since.elapsed();
            if waited >= self.reconnect_delay {
                return Err(StoreError::Remote(format!(
                    "{uri}: {e} (unreachable for {:.0}s)",
                    waited.as_secs_f64()
                )));
            }
            std::thread::sleep(backoff.min(self.reconnect_delay - waited));
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

impl Remote for NbdRemote {
    fn size(&self, uri: &str) -> StoreResult<u64> {
        // Asked when a VDI is made: an operator wants to hear at once that it is unreachable.
        self.with_client(uri, false, |c| Ok(c.size()))
    }

    fn blocks(&self, uri: &str, offset: u64, len: u64) -> StoreResult<Option<Vec<RemoteBlock>>> {
        let len = len.min(u64::from(u32::MAX) & !(HASH_BLOCK - 1)) as u32;
        self.with_client(uri, true, |c| {
            if !c.has_hashes() {
                return Ok(None);
            }
            let blocks = c.blocks(offset, len)?;
            Ok(Some(
                blocks
                    .into_iter()
                    .map(|b| match b {
                        BlockInfo::Zero => RemoteBlock::Zero,
                        BlockInfo::Hash(h) => RemoteBlock::Hash(h),
                        BlockInfo::Unknown => RemoteBlock::Unknown,
                    })
                    .collect(),
            ))
        })
    }

    fn read(&self, uri: &str, buf: &mut [u8], offset: u64) -> StoreResult<()> {
        self.with_client(uri, true, |c| c.read(buf, offset))?;
        self.link(uri).status.lock().fetched += buf.len() as u64;
        Ok(())
    }

    fn state(&self, uri: &str) -> String {
        let Some(link) = self.links.lock().get(uri).cloned() else {
            return "not connected (this process has fetched nothing)".into();
        };
        let st = link.status.lock();
        let fetched = crate::util::format_size(st.fetched);
        match &st.failing {
            Some((since, why)) => format!(
                "unreachable for {:.0}s ({why}); {fetched} fetched",
                since.elapsed().as_secs_f64()
            ),
            None => format!("reachable; {fetched} fetched by this process"),
        }
    }
}
