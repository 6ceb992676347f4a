//! Remote-backed VDIs (format 5): a VDI whose record names an NBD export (its *backing*),
//! and whose map's holes mean "not here yet" rather than zeros.
//!
//! ```text
//!  read of a hole ─► cache VDI `.cache:<hash of the URI>` ─ hole ─► Remote::read (the network)
//!                        │ (one per backing, shared by every      │
//!                        │  VDI, snapshot and fork backed by it)  ▼
//!                        └───────────── fetched blocks written here, durable like any write
//!  write           ─► the VDI itself (copy-on-write over the remote); zeros kept as ZERO
//!  hydrate         ─► every hole filled from the cache/remote, then the backing dropped
//! ```
//!
//! The cache is an ordinary VDI under a hidden name, so what was fetched is crash-safe
//! through the same log and checkpoints as everything else and survives restarts: each remote
//! block crosses the network once per store. In the cache, too, a hole means "not fetched"
//! and fetched zeros are recorded as zeros. Talking to the network is not the store's job:
//! whoever opens the store hands it a [`Remote`] (the daemon and the CLI use the NBD client).
//! A backing is assumed not to change (export a snapshot), as with any copy-on-write backing
//! file.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{
    error::{StoreError, StoreResult},
    format::{hash24, BLOCK_SIZE_U64},
    io::StoreDisk,
    registry::{name_key, validate_name, Kind},
    store::Store,
};
use crate::disk::ExtentState;

/// What a cache VDI's name starts with.
pub const CACHE_PREFIX: &str = ".cache:";

/// Bytes fetched at least per trip to the remote (aligned), so a sequential reader does not
/// pay one round trip per block.
const FETCH_ALIGN: u64 = 256 * 1024;
/// Bytes per step of `hydrate` (one conditional write each).
const HYDRATE_STEP: u64 = 1 << 20;

/// What a remote says of one 4 KiB block before it is read ([`Remote::blocks`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteBlock {
    /// Reads as zeros: nothing to fetch.
    Zero,
    /// Data with this hash (blake3, 24 bytes, as this store keeps them): a block here with
    /// the same hash need not be fetched, and one fetched must match it.
    Hash([u8; 24]),
    /// Data, hash unknown.
    Unknown,
}

/// Reads NBD exports (the store's only way to the network).
pub trait Remote: Send + Sync {
    /// What the export says of each 4 KiB block of `offset..offset + len` (block aligned),
    /// if it tells (a Parallax server's `parallax:hash`, docs/NBD-HASH.md); it may describe
    /// fewer blocks than asked. `None`: it does not.
    fn blocks(&self, uri: &str, offset: u64, len: u64) -> StoreResult<Option<Vec<RemoteBlock>>> {
        let _ = (uri, offset, len);
        Ok(None)
    }
    /// The size of the export at `uri`, in bytes.
    fn size(&self, uri: &str) -> StoreResult<u64>;
    /// Fills `buf` from `offset` of the export at `uri` (the range is inside its size).
    fn read(&self, uri: &str, buf: &mut [u8], offset: u64) -> StoreResult<()>;
    /// One line on the connection to `uri` ("connected", "reconnecting since …"), for
    /// `vdi info`.
    fn state(&self, uri: &str) -> String;
    /// Keeps what `uri` names from going away while this store reads through it (a snapshot
    /// in another store of a cluster: a hold in etcd). Called before a VDI backed by it is
    /// made; holding twice is holding once.
    fn hold(&self, uri: &str) -> StoreResult<()> {
        let _ = uri;
        Ok(())
    }
    /// This store no longer reads through `uri` (nothing is backed by it any more).
    fn release(&self, uri: &str) -> StoreResult<()> {
        let _ = uri;
        Ok(())
    }
    /// Releases this store's holds on everything but `in_use` (what a crash between a hold
    /// and its VDI, or between the last VDI's delete and its release, left). How many went.
    fn release_unused(&self, in_use: &[String]) -> StoreResult<usize> {
        let _ = in_use;
        Ok(0)
    }
}

/// The cache VDI of a backing.
pub fn cache_name(uri: &str) -> String {
    let h = blake3::hash(uri.as_bytes());
    let hex: String = h.as_bytes()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{CACHE_PREFIX}{hex}")
}

/// A backed VDI's backing, as `vdi info` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackingInfo {
    pub uri: String,
    /// The connection to it, if this process has one ("not connected" if it never needed
    /// it).
    pub state: String,
    /// Bytes the VDI wrote itself (or hydrated): never read from the remote.
    pub local_bytes: u64,
    /// Bytes of the VDI still at the remote that this store holds in its cache.
    pub cached_bytes: u64,
    /// Bytes of the VDI still at the remote and not in the cache: what a read may fetch.
    pub remote_bytes: u64,
}

/// One remote-backed VDI or snapshot in `df`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackedUsage {
    pub name: String,
    pub uri: String,
    pub local_bytes: u64,
    pub cached_bytes: u64,
    pub remote_bytes: u64,
}

/// What `vdi hydrate` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HydrateReport {
    pub name: String,
    pub uri: String,
    /// Bytes copied into the VDI from its cache or the remote.
    pub hydrated_bytes: u64,
    /// Whether the cache was deleted (nothing else was backed by it).
    pub cache_deleted: bool,
}

/// Adds up extents of one state.
fn sum(extents: &[(u64, u64, ExtentState)], state: ExtentState) -> u64 {
    extents.iter().filter(|e| e.2 == state).map(|e| e.1).sum()
}

impl Store {
    /// Gives the store its way to remote exports (without one, a backed VDI's holes fail
    /// to read, saying so).
    pub fn set_remote(&self, remote: Arc<dyn Remote>) {
        *self.remote.write() = Some(remote);
    }

    fn remote(&self, uri: &str) -> StoreResult<Arc<dyn Remote>> {
        self.remote.read().clone().ok_or_else(|| {
            StoreError::Remote(format!(
                "{uri}: this process has no way to reach remote exports"
            ))
        })
    }

    fn require_backings(&self) -> StoreResult<()> {
        let version = self.format_version();
        if version < 5 {
            return Err(StoreError::Invalid(format!(
                "remote-backed VDIs need store format 5 (this store is format {version}); run \
                 `parallax upgrade` first (older Parallax versions cannot open it after that)"
            )));
        }
        Ok(())
    }

    /// Creates VDI `name`, `size` bytes (`None`: the export's size), reading through the
    /// NBD export `uri` wherever it was not written; durable on return.
    pub fn create_backed(
        self: &Arc<Self>,
        name: &str,
        size: Option<u64>,
        uri: &str,
    ) -> StoreResult<u64> {
        self.require_backings()?;
        validate_name(name, "VDI")?;
        if uri.is_empty() || uri.len() > u16::MAX as usize / 2 {
            return Err(StoreError::Invalid(
                "a backing URI must be 1 to 32767 bytes".into(),
            ));
        }
        let remote = self.remote(uri)?;
        let remote_size = remote.size(uri)?;
        // Until the VDI is there: a release (of the last other VDI backed by `uri`, or of
        // holds `gc` finds unused) must not come between the hold and the VDI.
        let _holds = self.holds.lock();
        remote.hold(uri)?;
        let size = size.unwrap_or(remote_size);
        let staged = self.create_staged(name, size)?;
        let marked = self.ensure_cache(uri, remote_size).and_then(|()| {
            let _change = self.change();
            let mut cat = self.catalog.lock();
            let id = cat.resolve(&*self.dev, staged.staging_name())?;
            self.apply_backing(&mut cat, id, Some(uri.to_string()))
        });
        let result = match marked {
            Ok(()) => staged.publish(),
            Err(e) => {
                drop(staged);
                Err(e)
            }
        };
        if result.is_err() {
            // Nothing is left of the VDI; nor of a cache made for it alone.
            let _ = self.drop_cache_unlocked(uri);
        }
        result.map(|()| size)
    }

    /// Makes the cache of `uri` if there is none (a backed cache: holes are "not fetched").
    fn ensure_cache(&self, uri: &str, size: u64) -> StoreResult<()> {
        let name = cache_name(uri);
        {
            let _change = self.change();
            let mut cat = self.catalog.lock();
            let id = match cat.resolve(&*self.dev, &name) {
                Ok(id) => id,
                Err(StoreError::NotFound(_)) => {
                    let id = cat.allocate_id();
                    self.apply_create(&mut cat, id, &name, size.max(512), super::store::now_ns())?;
                    id
                }
                Err(e) => return Err(e),
            };
            // Created and marked in one change; a crash between the two log entries leaves it
            // unmarked, and this marks it.
            if self.record_of(&mut cat, id)?.backing.is_none() {
                self.apply_backing(&mut cat, id, Some(uri.to_string()))?;
            }
        }
        self.flush()
    }

    /// Reads `buf` from `offset` of the backing `uri`: from its cache where fetched, else
    /// from the remote, writing what comes back into the cache. Past the export's end reads
    /// as zeros (a backed VDI may be larger than its backing).
    pub(super) fn read_remote(
        self: &Arc<Self>,
        uri: &str,
        buf: &mut [u8],
        offset: u64,
    ) -> StoreResult<()> {
        let cache = match self.open_disk(&cache_name(uri), true, false) {
            // Deleted by hand (`vdi delete .cache:…`): what it held is fetched again.
            Err(StoreError::NotFound(_)) => {
                self.ensure_cache(uri, self.remote(uri)?.size(uri)?)?;
                self.open_disk(&cache_name(uri), true, false)?
            }
            r => r?,
        };
        let size = cache.size();
        let end = (offset + buf.len() as u64).min(size);
        if offset >= end {
            buf.fill(0);
            return Ok(());
        }
        buf[(end - offset) as usize..].fill(0);
        let lo = offset - offset % FETCH_ALIGN;
        let hi = end.next_multiple_of(FETCH_ALIGN).min(size);
        let mut pos = lo;
        while pos < hi {
            for e in cache.map_extents(pos, hi - pos, 64)? {
                let (a, b) = (pos, pos + e.len);
                pos = b;
                let (want_lo, want_hi) = (a.max(offset), b.min(end));
                if e.state == ExtentState::Hole {
                    let data = self.fetch(uri, a, b)?;
                    cache.write(&data, a, false)?;
                    if want_lo < want_hi {
                        buf[(want_lo - offset) as usize..(want_hi - offset) as usize]
                            .copy_from_slice(&data[(want_lo - a) as usize..(want_hi - a) as usize]);
                    }
                } else if want_lo < want_hi {
                    cache.read(
                        &mut buf[(want_lo - offset) as usize..(want_hi - offset) as usize],
                        want_lo,
                    )?;
                }
            }
        }
        Ok(())
    }

    /// The bytes `a..b` (`a` block aligned) of backing `uri`. Where the remote gives block
    /// hashes, blocks that read as zeros are not fetched, a block another cache holds at the
    /// same offset with the same hash is copied from there (a template derived from one
    /// already cached costs only what differs), and every block fetched must match its hash.
    fn fetch(self: &Arc<Self>, uri: &str, a: u64, b: u64) -> StoreResult<Vec<u8>> {
        let remote = self.remote(uri)?;
        let mut data = vec![0u8; (b - a) as usize];
        let Some(blocks) = remote.blocks(uri, a, b - a)? else {
            remote.read(uri, &mut data, a)?;
            return Ok(data);
        };
        let n = (b - a).div_ceil(BLOCK_SIZE_U64) as usize;
        let whole = |i: usize| a + (i as u64 + 1) * BLOCK_SIZE_U64 <= b;
        let mut need = vec![true; n];
        let others = self.other_caches(uri)?;
        for (i, blk) in blocks.iter().enumerate().take(n) {
            let at = a + i as u64 * BLOCK_SIZE_U64;
            match blk {
                RemoteBlock::Zero => need[i] = false,
                RemoteBlock::Hash(h) if whole(i) => {
                    for o in others.iter().filter(|o| at + BLOCK_SIZE_U64 <= o.size()) {
                        if o.hash_at(at / BLOCK_SIZE_U64)? == Some(*h) {
                            let at_buf = i * BLOCK_SIZE_U64 as usize;
                            o.read(&mut data[at_buf..at_buf + BLOCK_SIZE_U64 as usize], at)?;
                            need[i] = false;
                            break;
                        }
                    }
                }
                _ => {}
            }
        }
        let mut i = 0;
        while i < n {
            if !need[i] {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < n && need[j] {
                j += 1;
            }
            let lo = i * BLOCK_SIZE_U64 as usize;
            let hi = (j * BLOCK_SIZE_U64 as usize).min(data.len());
            remote.read(uri, &mut data[lo..hi], a + lo as u64)?;
            i = j;
        }
        for (i, blk) in blocks.iter().enumerate().take(n) {
            let at = i * BLOCK_SIZE_U64 as usize;
            if let (RemoteBlock::Hash(h), true) = (blk, whole(i)) {
                if hash24(&data[at..at + BLOCK_SIZE_U64 as usize]) != *h {
                    return Err(StoreError::Remote(format!(
                        "{uri}: the block at byte {} does not match the hash the server gave",
                        a + at as u64
                    )));
                }
            }
        }
        Ok(data)
    }

    /// Read-only handles on the caches of every other backing.
    fn other_caches(self: &Arc<Self>, uri: &str) -> StoreResult<Vec<StoreDisk>> {
        let mine = cache_name(uri);
        let names = self
            .catalog
            .lock()
            .scan_names(&*self.dev, &name_key(CACHE_PREFIX))?;
        let mut out = Vec::new();
        for (key, _) in names {
            let name = String::from_utf8_lossy(&key[1..]).into_owned();
            if name != mine {
                match self.open_disk(&name, false, false) {
                    Ok(d) => out.push(d),
                    Err(StoreError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(out)
    }

    /// `vdi info`'s backing part: `None` if `full` is not remote-backed.
    pub fn backing_info(self: &Arc<Self>, full: &str) -> StoreResult<Option<BackingInfo>> {
        let Some(uri) = self.stat(full)?.backing else {
            return Ok(None);
        };
        let state = self
            .remote
            .read()
            .as_ref()
            .map_or_else(|| "not connected".to_string(), |r| r.state(&uri));
        let u = self.backing_usage(full, &uri)?;
        Ok(Some(BackingInfo {
            uri,
            state,
            local_bytes: u.local_bytes,
            cached_bytes: u.cached_bytes,
            remote_bytes: u.remote_bytes,
        }))
    }

    /// Where the bytes of `full` (backed by `uri`) are: written locally, cached, or still
    /// only at the remote.
    pub(super) fn backing_usage(
        self: &Arc<Self>,
        full: &str,
        uri: &str,
    ) -> StoreResult<BackedUsage> {
        let disk = self.open_disk(full, false, false)?;
        let holes = extents_of(&disk)?;
        let cache = self.open_disk(&cache_name(uri), false, false)?;
        let (mut cached, mut remote) = (0, 0);
        for &(at, len, _) in holes.iter().filter(|e| e.2 == ExtentState::Hole) {
            let end = (at + len).min(cache.size());
            let mut pos = at;
            while pos < end {
                for e in cache.map_extents(pos, end - pos, 1024)? {
                    if e.state == ExtentState::Hole {
                        remote += e.len;
                    } else {
                        cached += e.len;
                    }
                    pos += e.len;
                }
            }
            // Past the export's end: zeros, nothing to fetch.
            cached += at + len - end.max(at);
        }
        Ok(BackedUsage {
            name: full.to_string(),
            uri: uri.to_string(),
            local_bytes: disk.size() - sum(&holes, ExtentState::Hole),
            cached_bytes: cached,
            remote_bytes: remote,
        })
    }

    /// Copies everything VDI `name` still reads through its backing into the VDI, then cuts
    /// it loose from the backing (and deletes the cache if nothing else uses it). Clients may
    /// read and write the VDI meanwhile: a block they write is never overwritten. `progress`
    /// gets (bytes done, bytes to do); an error from it stops the work (what was copied
    /// stays, and a later run goes on from there).
    pub fn hydrate(
        self: &Arc<Self>,
        name: &str,
        progress: &mut dyn FnMut(u64, u64) -> StoreResult<()>,
    ) -> StoreResult<HydrateReport> {
        let summary = self.stat(name)?;
        let Some(uri) = summary.backing else {
            return Err(StoreError::Invalid(format!(
                "{name} is not backed by a remote export"
            )));
        };
        if summary.kind == Kind::Snapshot {
            return Err(StoreError::Invalid(format!(
                "{name} is a snapshot and cannot change; fork it and hydrate the fork"
            )));
        }
        let disk = self.open_disk(name, true, false)?;
        let mut done = 0u64;
        // A rollback meanwhile can bring holes back: go over it again (rarely more than once).
        for _ in 0..8 {
            let holes: Vec<(u64, u64)> = extents_of(&disk)?
                .into_iter()
                .filter(|e| e.2 == ExtentState::Hole)
                .map(|e| (e.0, e.1))
                .collect();
            let total = done + holes.iter().map(|h| h.1).sum::<u64>();
            progress(done, total)?;
            for (at, len) in holes {
                let mut pos = at;
                while pos < at + len {
                    let n = (at + len - pos).min(HYDRATE_STEP);
                    // Whole blocks: a VDI's last block may run past its size.
                    let mut data = vec![0u8; n.next_multiple_of(BLOCK_SIZE_U64) as usize];
                    let real = n.min(disk.size().saturating_sub(pos)) as usize;
                    self.read_remote(&uri, &mut data[..real], pos)?;
                    disk.fill_holes(pos / BLOCK_SIZE_U64, &data)?;
                    pos += n;
                    done += n;
                    progress(done, total)?;
                }
            }
            if self.clear_backing(&disk)? {
                disk.store().flush()?;
                drop(disk);
                // Done and durable; a cache left over is only space (see `delete`).
                let cache_deleted = self.drop_cache_if_unused(&uri).unwrap_or_else(|e| {
                    tracing::warn!("the cache of {uri} stays for now: {e}");
                    false
                });
                return Ok(HydrateReport {
                    name: name.to_string(),
                    uri,
                    hydrated_bytes: done,
                    cache_deleted,
                });
            }
        }
        Err(StoreError::Busy(format!(
            "{name} kept getting holes back while hydrating (rolled back repeatedly?); run it again"
        )))
    }

    /// Drops the backing of `disk`'s VDI if its map has no holes left; false if it has.
    fn clear_backing(&self, disk: &StoreDisk) -> StoreResult<bool> {
        let _change = self.change();
        let mut cat = self.catalog.lock();
        // Under the catalog lock nothing brings holes back (writes to a backed VDI never
        // make them; a rollback needs this lock).
        if extents_of(disk)?.iter().any(|e| e.2 == ExtentState::Hole) {
            return Ok(false);
        }
        self.apply_backing(&mut cat, disk.id(), None)?;
        Ok(true)
    }

    /// Deletes the cache of `uri` if no VDI or snapshot is backed by it any more.
    pub(super) fn drop_cache_if_unused(&self, uri: &str) -> StoreResult<bool> {
        let _holds = self.holds.lock();
        self.drop_cache_unlocked(uri)
    }

    /// [`Store::drop_cache_if_unused`] with `holds` locked.
    fn drop_cache_unlocked(&self, uri: &str) -> StoreResult<bool> {
        let name = cache_name(uri);
        let in_use = {
            let mut cat = self.catalog.lock();
            self.all_records(&mut cat)?
                .iter()
                .any(|r| r.name != name && r.backing.as_deref() == Some(uri))
        };
        if in_use {
            return Ok(false);
        }
        let dropped = match self.delete(&name, true) {
            Ok(_) => true,
            Err(StoreError::NotFound(_)) => false,
            Err(e) => return Err(e),
        };
        // Nothing here reads through it any more (a release that fails leaves a hold for
        // `gc` to release).
        let remote = self.remote.read().clone();
        if let Some(r) = remote {
            r.release(uri)?;
        }
        Ok(dropped)
    }

    /// Releases every hold this store has on something nothing here is backed by any more.
    pub(super) fn release_unused_holds(&self) -> StoreResult<usize> {
        let Some(remote) = self.remote.read().clone() else {
            return Ok(0);
        };
        let _holds = self.holds.lock();
        let in_use: Vec<String> = {
            let mut cat = self.catalog.lock();
            let mut v: Vec<String> = self
                .all_records(&mut cat)?
                .into_iter()
                .filter_map(|r| r.backing)
                .collect();
            v.sort();
            v.dedup();
            v
        };
        remote.release_unused(&in_use)
    }
}

/// Every extent of `disk`'s map as (offset, length, state).
fn extents_of(disk: &StoreDisk) -> StoreResult<Vec<(u64, u64, ExtentState)>> {
    let mut out = Vec::new();
    let mut pos = 0;
    let size = disk.size();
    while pos < size {
        for e in disk.map_extents(pos, size - pos, 4096)? {
            match out.last_mut() {
                Some((_, l, s)) if *s == e.state => *l += e.len,
                _ => out.push((pos, e.len, e.state)),
            }
            pos += e.len;
        }
    }
    Ok(out)
}
