//! The data path: [`StoreDisk`], a VDI or snapshot opened for I/O, implementing [`Disk`].
//!
//! ```text
//!  read:   VDI read lock → resolve blocks → unlock → pread runs of adjacent blocks → verify
//!  write:  hash + zero-detect (no lock) → take reserved blocks (the VDI's batch) → pwrite
//!          → load the path's nodes and refcount pages (no lock)
//!          → gate shared + VDI write lock + space lock: point the map at the new blocks,
//!            claim them, drop the old references → unlock
//!  partial block: read old (verified), patch, write as above, and only if the map entry is
//!          still the one read (else retry): concurrent sub-block writes never lose each other
//! ```
//!
//! Data never moves under a lock. A reader holds a reader-epoch guard from lookup to the end
//! of its pread, so a block freed meanwhile is not reused under it.

use std::{sync::Arc, time::Duration};

use tracing::error;

use super::{
    blockhash::hash24_each,
    error::{StoreError, StoreResult},
    format::{hash24, is_zero, Ptr, PtrKind, BLOCK_SIZE, BLOCK_SIZE_U64},
    nodes::retry_evicted,
    radix::{resolve, resolve_cached, Extents},
    registry::Kind,
    space::Space,
    store::Store,
    vdi::{Vdi, VdiState, MAX_BATCH},
};
use crate::{
    disk::{check_range, BlockHashes, Disk, DiskError, Extent, ExtentState},
    ratelimit::SharedRateLimit,
};

/// Runs of blocks (first, count).
type Runs = Vec<(u64, u64)>;

/// Whole blocks placed for a write: new ones written to reserved blocks, or found already
/// in the store (dedup).
struct Placed {
    /// The map entries to set.
    new: Vec<Ptr>,
    /// Which entries point at blocks already in use.
    shared: Vec<bool>,
    /// The blocks reserved (to give back if the change fails).
    runs: Runs,
    /// [`RcTable::releases`](super::refcount::RcTable::releases) when the index was asked.
    seen: u64,
}

/// Whole blocks hashed and placed per round of the locks.
const WRITE_BATCH: usize = 256;
/// Leaf entries a block-status call looks at before answering with what it has.
const STATUS_BUDGET: usize = 1 << 20;

/// A VDI or snapshot open for I/O. Dropping it releases the handle.
pub struct StoreDisk {
    store: Arc<Store>,
    vdi: Arc<Vdi>,
    name: String,
    read_only: bool,
    /// The VDI's detach count when this handle opened (see [`StoreDisk::attached`]).
    attached_at: u64,
    /// Holes of a remote-backed VDI read through its backing (`store::backing`). Off only
    /// for the store's own handles on a cache, whose holes are "not fetched yet".
    read_through: bool,
}

/// Data-path errors a client can trigger: at most one line a second, with a count of the rest.
static ERROR_LOG: SharedRateLimit = SharedRateLimit::new(1, Duration::from_secs(1));

/// The tracing target of data-path error lines. They are for a server's operator, whose
/// clients only see an errno; a one-shot command returns the error itself and silences them.
pub const DATA_ERROR_TARGET: &str = "parallax::data_errors";

fn log_limited(msg: std::fmt::Arguments) {
    match ERROR_LOG.check() {
        Some(0) => error!(target: DATA_ERROR_TARGET, "{msg}"),
        Some(n) => error!(target: DATA_ERROR_TARGET, "{msg} ({n} similar errors suppressed)"),
        None => {}
    }
}

impl Store {
    /// Opens a VDI (`NAME`) or snapshot (`NAME@SNAP`) for I/O; `write` asks for a writable
    /// handle, which a snapshot refuses.
    pub fn open_vdi(self: &Arc<Self>, name: &str, write: bool) -> StoreResult<StoreDisk> {
        self.open_disk(name, write, true)
    }

    /// [`Store::open_vdi`], choosing whether holes read through a backing.
    pub(super) fn open_disk(
        self: &Arc<Self>,
        name: &str,
        write: bool,
        read_through: bool,
    ) -> StoreResult<StoreDisk> {
        let vdi = self.vdi_named(name)?;
        let (snapshot, attached_at) = {
            let st = vdi.state.read();
            (st.rec.kind == Kind::Snapshot, st.detached)
        };
        if write && snapshot {
            return Err(StoreError::ReadOnly(format!("snapshot {name}")));
        }
        vdi.open_handle();
        Ok(StoreDisk {
            store: self.clone(),
            vdi,
            name: name.to_string(),
            read_only: snapshot || !write,
            attached_at,
            read_through,
        })
    }

    /// Returns every VDI's reserved-but-unused data blocks to the allocator (when the store
    /// runs short).
    fn reclaim_batches(&self) {
        let mut runs = Vec::new();
        for v in self.vdis.all() {
            runs.extend(v.batch.lock().drain());
        }
        self.space.lock().unreserve(&*self.dev, &runs);
    }
}

impl Drop for StoreDisk {
    fn drop(&mut self) {
        if self.vdi.close_handle() == 0 {
            let runs = self.vdi.batch.lock().drain();
            if !runs.is_empty() {
                self.store.space.lock().unreserve(&*self.store.dev, &runs);
            }
        }
    }
}

fn block_range(offset: u64, len: u64) -> (u64, u64) {
    let first = offset / BLOCK_SIZE_U64;
    let end = (offset + len).div_ceil(BLOCK_SIZE_U64);
    (first, end - first)
}

impl StoreDisk {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn id(&self) -> u64 {
        self.vdi.id
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Refuses I/O through a handle whose VDI was rolled back since it opened: what it
    /// cached (size, contents) no longer holds.
    fn attached(&self, st: &VdiState) -> StoreResult<()> {
        if st.detached != self.attached_at {
            return Err(StoreError::Detached(self.name.clone()));
        }
        Ok(())
    }

    fn check(&self, st: &VdiState, offset: u64, len: u64) -> StoreResult<()> {
        self.attached(st)?;
        let size = st.rec.size;
        check_range(size, offset, len).map_err(|_| {
            StoreError::Invalid(format!(
                "range {offset}+{len} is outside {} ({size} bytes)",
                self.name
            ))
        })
    }

    /// The export this handle's holes read through, if any (`st` is the VDI's state).
    fn remote_of(&self, st: &VdiState) -> Option<String> {
        st.rec.backing.clone().filter(|_| self.read_through)
    }

    fn range(&self, offset: u64, len: u64) -> StoreResult<()> {
        self.check(&self.vdi.state.read(), offset, len)
    }

    fn writable(&self) -> StoreResult<()> {
        if self.read_only {
            return Err(StoreError::ReadOnly(self.name.clone()));
        }
        self.store.check_writable()
    }

    /// The pointers mapping `count` blocks from `lba`.
    pub(super) fn lookup(&self, lba: u64, count: u64, out: &mut Vec<Ptr>) -> StoreResult<()> {
        self.resolve_locked(&self.vdi.state.read(), lba, count, out)
    }

    /// [`StoreDisk::lookup`] with the VDI's state already locked (`st`).
    fn resolve_locked(
        &self,
        st: &VdiState,
        lba: u64,
        count: u64,
        out: &mut Vec<Ptr>,
    ) -> StoreResult<()> {
        resolve(
            &self.store.nodes,
            &*self.store.dev,
            st.rec.root,
            st.rec.height,
            lba,
            count,
            out,
        )
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> StoreResult<()> {
        self.read_into(buf, offset, false)
            .expect("a blocking read always completes")
    }

    /// Like [`StoreDisk::read`], but only if nothing it needs has to come from the disk: map
    /// nodes in memory, data in the page cache. `None`: it would have had to wait; the caller
    /// reads again on a thread that may block.
    pub fn read_nowait(&self, buf: &mut [u8], offset: u64) -> Option<StoreResult<()>> {
        self.read_into(buf, offset, true)
    }

    fn read_into(&self, buf: &mut [u8], offset: u64, nowait: bool) -> Option<StoreResult<()>> {
        let epoch = self.store.epoch.enter();
        let (first, n) = block_range(offset, buf.len() as u64);
        let mut ptrs = Vec::with_capacity(n as usize);
        let remote;
        {
            let st = self.vdi.state.read();
            if let Err(e) = self.check(&st, offset, buf.len() as u64) {
                return Some(Err(e));
            }
            if buf.is_empty() {
                return Some(Ok(()));
            }
            remote = self.remote_of(&st);
            let (nodes, dev) = (&self.store.nodes, &*self.store.dev);
            let (root, height) = (st.rec.root, st.rec.height);
            let found = if nowait {
                resolve_cached(nodes, root, height, first, n, &mut ptrs)
            } else {
                resolve(nodes, dev, root, height, first, n, &mut ptrs).map(|()| true)
            };
            match found {
                Ok(true) => {}
                Ok(false) => return None,
                Err(e) => return Some(Err(e)),
            }
        }
        let remote = remote.filter(|_| ptrs.iter().any(|p| p.is_hole()));
        if remote.is_some() && nowait {
            // Holes come from the network.
            return None;
        }
        // (offset in buf, length) of holes to read through the backing.
        let mut remote_runs: Vec<(usize, usize)> = Vec::new();
        let dev = &*self.store.dev;
        let read = |b: &mut [u8], at: u64| -> Option<StoreResult<()>> {
            if !nowait {
                return Some(dev.read_at(b, at).map_err(Into::into));
            }
            match dev.read_nowait(b, at) {
                Ok(true) => Some(Ok(())),
                Ok(false) => None,
                Err(e) => Some(Err(e.into())),
            }
        };
        let end = offset + buf.len() as u64;
        let whole = |k: usize| {
            let s = (first + k as u64) * BLOCK_SIZE_U64;
            s >= offset && s + BLOCK_SIZE_U64 <= end
        };
        // (offset in buf, index in ptrs) of whole blocks read but not yet verified.
        let mut unverified: Vec<(usize, usize)> = Vec::new();
        let mut k = 0usize;
        while k < ptrs.len() {
            let bstart = (first + k as u64) * BLOCK_SIZE_U64;
            let lo = offset.max(bstart);
            let hi = end.min(bstart + BLOCK_SIZE_U64);
            let p = ptrs[k];
            if p.is_hole() && remote.is_some() {
                let at = (lo - offset) as usize;
                match remote_runs.last_mut() {
                    Some((a, l)) if *a + *l == at => *l += (hi - lo) as usize,
                    _ => remote_runs.push((at, (hi - lo) as usize)),
                }
                k += 1;
                continue;
            }
            if !p.is_block() {
                buf[(lo - offset) as usize..(hi - offset) as usize].fill(0);
                k += 1;
                continue;
            }
            if !whole(k) {
                let mut tmp = [0u8; BLOCK_SIZE];
                if let Err(e) = read(&mut tmp, p.addr() * BLOCK_SIZE_U64)? {
                    return Some(Err(e));
                }
                if let Err(e) = self.verify(&tmp, p, first + k as u64) {
                    return Some(Err(e));
                }
                let within = (lo - bstart) as usize;
                buf[(lo - offset) as usize..(hi - offset) as usize]
                    .copy_from_slice(&tmp[within..within + (hi - lo) as usize]);
                k += 1;
                continue;
            }
            let mut j = k + 1;
            while j < ptrs.len()
                && whole(j)
                && ptrs[j].is_block()
                && ptrs[j].addr() == p.addr() + (j - k) as u64
            {
                j += 1;
            }
            let at = (lo - offset) as usize;
            let run = &mut buf[at..at + (j - k) * BLOCK_SIZE];
            if let Err(e) = read(run, p.addr() * BLOCK_SIZE_U64)? {
                return Some(Err(e));
            }
            unverified.extend((k..j).map(|i| (at + (i - k) * BLOCK_SIZE, i)));
            k = j;
        }
        // Whole blocks are verified together, which hashes them side by side.
        let blocks: Vec<&[u8]> = unverified
            .iter()
            .map(|&(at, _)| &buf[at..at + BLOCK_SIZE])
            .collect();
        let mut bad = None;
        hash24_each(&blocks, |n, h| {
            let k = unverified[n].1;
            if bad.is_none() && h != ptrs[k].hash {
                bad = Some(k);
            }
        });
        if let Some(k) = bad {
            return Some(Err(self.mismatch(ptrs[k], first + k as u64)));
        }
        // The network may take long: hold no reader epoch (it would keep freed blocks from
        // being reused) while it does.
        drop(epoch);
        if let Some(uri) = remote {
            for (at, len) in remote_runs {
                let r = self
                    .store
                    .read_remote(&uri, &mut buf[at..at + len], offset + at as u64);
                if let Err(e) = r {
                    log_limited(format_args!(
                        "{}: {e}; answering with an I/O error",
                        self.name
                    ));
                    return Some(Err(e));
                }
            }
        }
        Some(Ok(()))
    }

    fn verify(&self, data: &[u8], p: Ptr, lba: u64) -> StoreResult<()> {
        if hash24(data) != p.hash {
            return Err(self.mismatch(p, lba));
        }
        Ok(())
    }

    /// Logs a checksum mismatch and returns the error the client gets.
    fn mismatch(&self, p: Ptr, lba: u64) -> StoreError {
        log_limited(format_args!(
            "checksum mismatch: {} block {lba} (store block {}); answering with an I/O error",
            self.name,
            p.addr()
        ));
        StoreError::Checksum(format!(
            "{} block {lba} (store block {})",
            self.name,
            p.addr()
        ))
    }

    /// Writes `buf` at `offset`; with `fua`, durable on return.
    pub fn write(&self, buf: &[u8], offset: u64, fua: bool) -> StoreResult<()> {
        self.writable()?;
        self.store.note_client_write();
        self.range(offset, buf.len() as u64)?;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let bstart = pos - pos % BLOCK_SIZE_U64;
            if pos != bstart || end - pos < BLOCK_SIZE_U64 {
                let chunk_end = end.min(bstart + BLOCK_SIZE_U64);
                let data = &buf[(pos - offset) as usize..(chunk_end - offset) as usize];
                self.patch_block(
                    pos / BLOCK_SIZE_U64,
                    (pos - bstart) as usize,
                    Some(data),
                    false,
                )?;
                pos = chunk_end;
            } else {
                let run_end = end - end % BLOCK_SIZE_U64;
                let whole = &buf[(pos - offset) as usize..(run_end - offset) as usize];
                for (b, batch) in whole.chunks(WRITE_BATCH * BLOCK_SIZE).enumerate() {
                    self.write_blocks(pos / BLOCK_SIZE_U64 + (b * WRITE_BATCH) as u64, batch)?;
                }
                pos = run_end;
            }
        }
        self.after_write(fua)
    }

    fn after_write(&self, fua: bool) -> StoreResult<()> {
        if fua {
            return self.store.flush();
        }
        self.store.after_change()
    }

    /// Writes whole blocks from `lba` (at most [`WRITE_BATCH`]): blocks the dedup index
    /// finds are shared, the rest written.
    fn write_blocks(&self, lba: u64, data: &[u8]) -> StoreResult<()> {
        let mut dedup = self.store.inline_dedup();
        loop {
            // (A backed VDI's map records zeros instead: `Store::set_map`.)
            let placed = self.place_dedup(data, Ptr::HOLE, dedup)?;
            match self.set_placed(lba, &placed) {
                Ok(true) => return Ok(()),
                // A block found could not be confirmed as still the one compared: write
                // them all.
                Ok(false) => {
                    self.give_back(&placed.runs);
                    dedup = false;
                }
                Err(e) => {
                    self.give_back(&placed.runs);
                    return Err(e);
                }
            }
        }
    }

    /// Writes whole blocks from `lba` (at most [`WRITE_BATCH`]) only where the map still has
    /// holes: what `hydrate` uses, so a block a client writes meanwhile is never overwritten
    /// with the remote's older contents. Zeros are recorded as zeros. Returns the blocks
    /// filled.
    pub(super) fn fill_holes(&self, lba: u64, data: &[u8]) -> StoreResult<u64> {
        self.writable()?;
        debug_assert!(data.len() <= WRITE_BATCH * BLOCK_SIZE && data.len() % BLOCK_SIZE == 0);
        let (new, runs) = self.place(data, Ptr::ZERO)?;
        if let Err(e) = self.prepare(lba, new.len() as u64) {
            self.give_back(&runs);
            return Err(e);
        }
        let change = self.store.change();
        let mut st = self.vdi.state.write();
        let mut claimed = vec![false; new.len()];
        let result = (|| {
            self.attached(&st)?;
            let mut cur = Vec::with_capacity(new.len());
            self.resolve_locked(&st, lba, new.len() as u64, &mut cur)?;
            let mut space = self.store.space.lock();
            let mut tx = self.store.tx(&mut space, change.gen);
            let mut filled = 0u64;
            let mut i = 0;
            while i < new.len() {
                if !cur[i].is_hole() {
                    i += 1;
                    continue;
                }
                let mut j = i + 1;
                while j < new.len() && cur[j].is_hole() {
                    j += 1;
                }
                self.store.set_map(
                    &self.vdi,
                    &mut st,
                    &mut tx,
                    lba + i as u64,
                    &new[i..j],
                    false,
                )?;
                claimed[i..j].fill(true);
                filled += (j - i) as u64;
                i = j;
            }
            Ok(filled)
        })();
        drop(st);
        drop(change);
        // Blocks written for entries that were no longer holes (or not set, on an error).
        let unused: Vec<(u64, u64)> = (0..new.len())
            .filter(|&i| new[i].is_block() && !claimed[i])
            .map(|i| (new[i].addr(), 1))
            .collect();
        self.give_back(&unused);
        result
    }

    /// Hashes whole blocks, reserves room for those that are not all zeros and writes them
    /// there: the map entries to set (`zero` for zero blocks) and the blocks reserved (to give
    /// back if the change fails).
    fn place(&self, data: &[u8], zero: Ptr) -> StoreResult<(Vec<Ptr>, Runs)> {
        let p = self.place_dedup(data, zero, false)?;
        Ok((p.new, p.runs))
    }

    /// [`StoreDisk::place`], and with `dedup`, blocks whose data the store already holds
    /// (found by the index, then compared byte for byte unless the store trusts the hash)
    /// point at that block instead of being written.
    fn place_dedup(&self, data: &[u8], zero: Ptr, dedup: bool) -> StoreResult<Placed> {
        let blocks: Vec<&[u8]> = data.chunks(BLOCK_SIZE).collect();
        let mut new: Vec<Ptr> = vec![zero; blocks.len()];
        let nonzero: Vec<usize> = (0..blocks.len()).filter(|&i| !is_zero(blocks[i])).collect();
        let to_hash: Vec<&[u8]> = nonzero.iter().map(|&i| blocks[i]).collect();
        hash24_each(&to_hash, |n, h| new[nonzero[n]] = Ptr::block(1, h));
        let mut shared = vec![false; blocks.len()];
        let mut seen = 0;
        if dedup && !nonzero.is_empty() {
            let hashes: Vec<_> = nonzero.iter().map(|&i| new[i].hash).collect();
            let (found, releases) = self.store.dedup_candidates(&hashes)?;
            seen = releases;
            let cands: Vec<(usize, u64)> = nonzero
                .iter()
                .zip(found)
                .filter_map(|(&i, cand)| cand.map(|addr| (i, addr)))
                .collect();
            let pairs: Vec<(u64, &[u8])> = cands.iter().map(|&(i, a)| (a, blocks[i])).collect();
            for (&(i, addr), same) in cands.iter().zip(self.store.same_data(&pairs)?) {
                if same {
                    new[i] = new[i].with_addr(addr);
                    shared[i] = true;
                }
            }
            #[cfg(test)]
            test_hooks::pause_after_dedup_lookup();
        }
        let to_write = nonzero.iter().filter(|&&i| !shared[i]).count() as u64;
        let runs = self.take_blocks(to_write)?;
        let mut addrs = runs.iter().flat_map(|&(a, n)| a..a + n);
        for (p, _) in new
            .iter_mut()
            .zip(&shared)
            .filter(|(p, s)| p.is_block() && !**s)
        {
            *p = p.with_addr(addrs.next().expect("took enough"));
        }
        let written: Vec<Ptr> = new
            .iter()
            .zip(&shared)
            .map(|(p, s)| if *s { Ptr::HOLE } else { *p })
            .collect();
        if let Err(e) = self.write_data(&written, &blocks) {
            self.give_back(&runs);
            self.store.poison(&e);
            return Err(e);
        }
        Ok(Placed {
            new,
            shared,
            runs,
            seen,
        })
    }

    /// Writes data blocks to their (reserved) addresses, adjacent ones in one vectored write.
    fn write_data(&self, ptrs: &[Ptr], blocks: &[&[u8]]) -> StoreResult<()> {
        let dev = &*self.store.dev;
        let placed: Vec<(u64, &[u8])> = ptrs
            .iter()
            .zip(blocks)
            .filter(|(p, _)| p.is_block())
            .map(|(p, b)| (p.addr(), *b))
            .collect();
        let mut i = 0;
        while i < placed.len() {
            let mut j = i + 1;
            while j < placed.len() && placed[j].0 == placed[i].0 + (j - i) as u64 {
                j += 1;
            }
            let bufs: Vec<&[u8]> = placed[i..j].iter().map(|(_, b)| *b).collect();
            dev.write_vectored_at(&bufs, placed[i].0 * BLOCK_SIZE_U64)?;
            i = j;
        }
        Ok(())
    }

    /// Takes `want` reserved blocks from the VDI's batch, refilling it from the allocator.
    /// When the store looks full but holds blocks that a checkpoint would make reusable
    /// (freed by overwrites, or queued orphans), or that other VDIs reserved and have not
    /// used, gets them back and tries again before answering "no space".
    fn take_blocks(&self, want: u64) -> StoreResult<Vec<(u64, u64)>> {
        if want == 0 {
            return Ok(Vec::new());
        }
        let dev = &*self.store.dev;
        let mut attempts = 0;
        loop {
            {
                let mut batch = self.vdi.batch.lock();
                let have = batch.available();
                if have >= want {
                    return Ok(batch.take(want));
                }
                let need = want - have;
                let extra = batch.next_refill.clamp(16, MAX_BATCH).saturating_sub(need);
                let mut cursor = batch.cursor;
                let got = self
                    .store
                    .space
                    .lock()
                    .reserve_data(dev, &mut cursor, need, extra)?;
                if let Some(runs) = got {
                    batch.cursor = cursor;
                    batch.add(runs);
                    batch.next_refill = ((need + extra) * 2).min(MAX_BATCH);
                    continue;
                }
                // Full: this VDI's own reservation too small; hand it back with the others.
                let mine = batch.drain();
                self.store.space.lock().unreserve(dev, &mine);
            }
            if attempts >= 3 {
                return Err(StoreError::NoSpace);
            }
            attempts += 1;
            self.store.reclaim_batches();
            let reclaimable = {
                let s = self.store.space.lock();
                s.rc.freed_since_cut() > 0 || !s.orphans.list.is_empty()
            };
            if reclaimable {
                // Two checkpoints: the first frees what this generation freed, the second
                // takes apart orphans the first queued.
                self.store.checkpoint()?;
            } else if attempts > 1 {
                return Err(StoreError::NoSpace);
            }
        }
    }

    /// Returns reserved blocks that were not used.
    fn give_back(&self, runs: &[(u64, u64)]) {
        self.store.space.lock().unreserve(&*self.store.dev, runs);
    }

    /// Loads, without locks, what a change to blocks `lba..lba+count` will need: the nodes
    /// on the path and the refcount pages of the nodes and data blocks it may touch.
    fn prepare(&self, lba: u64, count: u64) -> StoreResult<()> {
        let mut ptrs = Vec::with_capacity(count as usize);
        self.lookup(lba, count, &mut ptrs)?;
        let st = self.vdi.state.read();
        let mut addrs: Vec<u64> = ptrs
            .iter()
            .filter(|p| p.is_block())
            .map(|p| p.addr())
            .collect();
        let mut p = st.rec.root;
        let gen = self.store.open_generation();
        // Nodes on the path of the first block (the others of the run share it, or are
        // loaded now by the lookup).
        for level in (1..=st.rec.height).rev() {
            if !p.is_block() {
                break;
            }
            addrs.push(p.addr());
            let node = match self.store.nodes.fetch(&*self.store.dev, p) {
                Ok(n) => n,
                // Only a preload: the change itself walks the map again.
                Err(StoreError::Evicted(_)) => break,
                Err(e) => return Err(e),
            };
            if level == 1 {
                // A leaf copied for this write may add a reference to each of its blocks.
                if self.store.nodes.state(p.addr(), gen) != super::nodes::State::Open {
                    addrs.extend(node.entries().filter(|e| e.is_block()).map(|e| e.addr()));
                }
                break;
            }
            let idx = ((lba >> (super::format::FANOUT_BITS * (level as u32 - 1))) & 127) as usize;
            p = node.get(idx);
        }
        drop(st);
        Space::load_pages(&self.store.space, &*self.store.dev, addrs)
    }

    /// Points blocks from `lba` at `new` (reserved blocks, holes or zeros).
    fn set(&self, lba: u64, new: &[Ptr]) -> StoreResult<()> {
        self.prepare(lba, new.len() as u64)?;
        let change = self.store.change();
        let mut st = self.vdi.state.write();
        self.attached(&st)?;
        let mut space = self.store.space.lock();
        let mut tx = self.store.tx(&mut space, change.gen);
        self.store
            .set_map(&self.vdi, &mut st, &mut tx, lba, new, false)
    }

    /// Points blocks from `lba` at what [`StoreDisk::place_dedup`] placed. Returns false,
    /// changing nothing, if a block it found cannot be shared after all: no longer in use,
    /// possibly reused since it was compared, or one this very write drops.
    fn set_placed(&self, lba: u64, p: &Placed) -> StoreResult<bool> {
        if !p.shared.contains(&true) {
            self.set(lba, &p.new)?;
            return Ok(true);
        }
        let n = p.new.len() as u64;
        self.prepare(lba, n)?;
        let found = || {
            p.new
                .iter()
                .zip(&p.shared)
                .filter(|(_, s)| **s)
                .map(|(q, _)| q.addr())
        };
        Space::load_pages(&self.store.space, &*self.store.dev, found())?;
        let change = self.store.change();
        let mut st = self.vdi.state.write();
        self.attached(&st)?;
        let mut old = Vec::with_capacity(p.new.len());
        self.resolve_locked(&st, lba, n, &mut old)?;
        // Runs of entries alike (shared or not), each one `set_map`; a run drops the blocks it
        // replaced when it is done, so a block shared in a run must not be one that an
        // earlier run replaced (it could be freed before the run adds its reference).
        let mut runs = Vec::new();
        let mut i = 0;
        while i < p.new.len() {
            let mut j = i + 1;
            while j < p.new.len() && p.shared[j] == p.shared[i] {
                j += 1;
            }
            runs.push((i, j));
            i = j;
        }
        let mut space = self.store.space.lock();
        if space.rc.releases() != p.seen {
            return Ok(false);
        }
        for &(i, j) in runs.iter().filter(|(i, _)| p.shared[*i]) {
            for q in &p.new[i..j] {
                let dropped_before = old[..i]
                    .iter()
                    .any(|o| o.is_block() && o.addr() == q.addr());
                if dropped_before || space.rc.get(&*self.store.dev, q.addr())? == 0 {
                    return Ok(false);
                }
            }
        }
        let mut tx = self.store.tx(&mut space, change.gen);
        for (i, j) in runs {
            self.store.set_map(
                &self.vdi,
                &mut st,
                &mut tx,
                lba + i as u64,
                &p.new[i..j],
                p.shared[i],
            )?;
        }
        Ok(true)
    }

    /// Read-modify-write of one block: `data` (or zeros, if `None`) at byte `within`.
    /// With `keep_zero` a block that ends up all zeros is recorded as zeros, not a hole.
    fn patch_block(
        &self,
        lba: u64,
        within: usize,
        data: Option<&[u8]>,
        keep_zero: bool,
    ) -> StoreResult<()> {
        let len = data.map_or(BLOCK_SIZE - within, |d| d.len());
        loop {
            let mut block = [0u8; BLOCK_SIZE];
            let (old, remote, backed) = {
                let _epoch = self.store.epoch.enter();
                let st = self.vdi.state.read();
                let mut out = Vec::with_capacity(1);
                self.resolve_locked(&st, lba, 1, &mut out)?;
                let old = out[0];
                if old.is_block() {
                    self.store
                        .dev
                        .read_at(&mut block, old.addr() * BLOCK_SIZE_U64)?;
                    self.verify(&block, old, lba)?;
                }
                (old, self.remote_of(&st), st.rec.backing.is_some())
            };
            // A hole here would read the remote's bytes again, not zeros.
            let keep_zero = keep_zero || backed;
            if let (true, Some(uri)) = (old.is_hole(), &remote) {
                // The rest of the block is the remote's.
                self.store
                    .read_remote(uri, &mut block, lba * BLOCK_SIZE_U64)?;
            }
            match data {
                Some(d) => block[within..within + d.len()].copy_from_slice(d),
                None => block[within..within + len].fill(0),
            }
            let new = if is_zero(&block) {
                if keep_zero || old.kind()? == PtrKind::Zero {
                    Ptr::ZERO
                } else {
                    Ptr::HOLE
                }
            } else {
                Ptr::block(1, hash24(&block))
            };
            if new == old {
                return Ok(());
            }
            let runs = if new.is_block() {
                self.take_blocks(1)?
            } else {
                Vec::new()
            };
            let new = match runs.first() {
                Some(&(a, _)) => {
                    if let Err(e) = self.store.dev.write_at(&block, a * BLOCK_SIZE_U64) {
                        self.give_back(&runs);
                        self.store.poison(&e);
                        return Err(e.into());
                    }
                    new.with_addr(a)
                }
                None => new,
            };
            self.prepare(lba, 1)?;
            let change = self.store.change();
            let mut st = self.vdi.state.write();
            if let Err(e) = self.attached(&st) {
                drop(st);
                drop(change);
                self.give_back(&runs);
                return Err(e);
            }
            let mut cur = Vec::with_capacity(1);
            self.resolve_locked(&st, lba, 1, &mut cur)?;
            if cur[0] != old {
                // Someone wrote this block meanwhile: start over from what is there now.
                drop(st);
                drop(change);
                self.give_back(&runs);
                continue;
            }
            let mut space = self.store.space.lock();
            let mut tx = self.store.tx(&mut space, change.gen);
            let r = self
                .store
                .set_map(&self.vdi, &mut st, &mut tx, lba, &[new], false);
            drop(space);
            if r.is_err() {
                drop(st);
                self.give_back(&runs);
            }
            return r;
        }
    }

    /// Unmaps whole blocks in the range (edges keep their data: TRIM allows it).
    pub fn discard(&self, offset: u64, len: u64) -> StoreResult<()> {
        self.writable()?;
        self.range(offset, len)?;
        let first = offset.div_ceil(BLOCK_SIZE_U64);
        let end = (offset + len) / BLOCK_SIZE_U64;
        if first < end {
            self.fill(first, end, false)?;
        }
        self.after_write(false)
    }

    /// Makes the range read as zeros: partial blocks are patched, whole ones unmapped (or, with
    /// `no_hole`, recorded as zeros).
    pub fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool, fua: bool) -> StoreResult<()> {
        self.writable()?;
        self.range(offset, len)?;
        let end = offset + len;
        let first = offset.div_ceil(BLOCK_SIZE_U64);
        let last = end / BLOCK_SIZE_U64;
        if first > last {
            // Inside one block.
            let lba = offset / BLOCK_SIZE_U64;
            self.patch_block(
                lba,
                (offset % BLOCK_SIZE_U64) as usize,
                Some(&vec![0; len as usize]),
                no_hole,
            )?;
        } else {
            if offset % BLOCK_SIZE_U64 != 0 {
                let lba = offset / BLOCK_SIZE_U64;
                self.patch_block(lba, (offset % BLOCK_SIZE_U64) as usize, None, no_hole)?;
            }
            if first < last {
                self.fill(first, last, no_hole)?;
            }
            if end % BLOCK_SIZE_U64 != 0 {
                self.patch_block(
                    last,
                    0,
                    Some(&vec![0; (end % BLOCK_SIZE_U64) as usize]),
                    no_hole,
                )?;
            }
        }
        self.after_write(fua)
    }

    fn fill(&self, first: u64, end: u64, zero: bool) -> StoreResult<()> {
        let change = self.store.change();
        let mut st = self.vdi.state.write();
        self.attached(&st)?;
        let mut space = self.store.space.lock();
        let mut tx = self.store.tx(&mut space, change.gen);
        self.store
            .fill_map(&self.vdi, &mut st, &mut tx, first, end, zero)
    }

    /// Describes allocation from `offset`: at most `max` extents covering at most `len` bytes.
    /// Holes a remote-backed VDI reads through its backing are data to its readers.
    pub fn extents(&self, offset: u64, len: u64, max: usize) -> StoreResult<Vec<Extent>> {
        let raw = self.map_extents(offset, len, max)?;
        if self.remote_of(&self.vdi.state.read()).is_none() {
            return Ok(raw);
        }
        let mut out: Vec<Extent> = Vec::with_capacity(raw.len());
        for mut e in raw {
            if e.state == ExtentState::Hole {
                e.state = ExtentState::Data;
            }
            match out.last_mut() {
                Some(last) if last.state == e.state => last.len += e.len,
                _ => out.push(e),
            }
        }
        Ok(out)
    }

    /// [`StoreDisk::extents`] as the map has them: a hole is a hole.
    pub(super) fn map_extents(
        &self,
        offset: u64,
        len: u64,
        max: usize,
    ) -> StoreResult<Vec<Extent>> {
        if len == 0 {
            return Err(StoreError::Invalid("block status of an empty range".into()));
        }
        let (first, n) = block_range(offset, len);
        let mut walk = Extents {
            nodes: &self.store.nodes,
            dev: &*self.store.dev,
            max: max.max(1),
            budget: STATUS_BUDGET,
            out: Vec::new(),
        };
        {
            let st = self.vdi.state.read();
            self.check(&st, offset, len)?;
            retry_evicted(|| {
                walk.out.clear();
                walk.budget = STATUS_BUDGET;
                walk.walk(st.rec.root, st.rec.height, 0, first, first + n)
            })?;
        }
        // Blocks to bytes, clipped to the request.
        let mut pos = first * BLOCK_SIZE_U64;
        let end = offset + len;
        let mut res = Vec::with_capacity(walk.out.len());
        for (blocks, state) in walk.out {
            let s = pos.max(offset);
            let e = (pos + blocks * BLOCK_SIZE_U64).min(end);
            pos += blocks * BLOCK_SIZE_U64;
            if e > s {
                res.push(Extent { len: e - s, state });
            }
        }
        Ok(res)
    }

    /// The hash of block `lba` if the map points it at a stored block.
    pub(super) fn hash_at(&self, lba: u64) -> StoreResult<Option<[u8; 24]>> {
        let mut p = Vec::with_capacity(1);
        self.lookup(lba, 1, &mut p)?;
        Ok(p[0].is_block().then_some(p[0].hash))
    }

    /// The hashes of the whole blocks in the range, as the map holds them (`parallax:hash`):
    /// a stored block has its hash; holes, zeros, partial blocks at the edges and a backed
    /// VDI's blocks still at its remote have none here. At most `max` runs.
    pub fn hashes(&self, offset: u64, len: u64, max: usize) -> StoreResult<BlockHashes> {
        self.range(offset, len)?;
        let end = offset + len;
        let first = offset.div_ceil(BLOCK_SIZE_U64);
        let last = end / BLOCK_SIZE_U64;
        let mut out: BlockHashes = Vec::new();
        let push = |n: u64, h: Option<[u8; 24]>, out: &mut BlockHashes| match (h, out.last_mut()) {
            (None, Some((l, None))) => *l += n,
            _ => out.push((n, h)),
        };
        if first * BLOCK_SIZE_U64 > offset {
            push((first * BLOCK_SIZE_U64).min(end) - offset, None, &mut out);
        }
        if first < last {
            // Bounded: at most `max` runs, so at most `max` blocks are looked at.
            let n = (last - first).min(max.max(1) as u64);
            let mut ptrs = Vec::with_capacity(n as usize);
            self.lookup(first, n, &mut ptrs)?;
            for p in ptrs {
                let h = p.is_block().then_some(p.hash);
                let merges = h.is_none() && matches!(out.last(), Some((_, None)));
                if !merges && out.len() >= max {
                    break;
                }
                push(BLOCK_SIZE_U64, h, &mut out);
            }
            let covered: u64 = out.iter().map(|r| r.0).sum();
            if offset + covered == last * BLOCK_SIZE_U64 && last * BLOCK_SIZE_U64 < end {
                push(end - last * BLOCK_SIZE_U64, None, &mut out);
            }
        } else if out.is_empty() {
            push(len, None, &mut out);
        }
        Ok(out)
    }

    /// Reads ahead (warms the page cache for the blocks of a range).
    pub fn prefetch(&self, offset: u64, len: u64) -> StoreResult<()> {
        self.range(offset, len)
    }

    pub fn size(&self) -> u64 {
        self.vdi.state.read().rec.size
    }
}

impl Disk for StoreDisk {
    fn size(&self) -> u64 {
        StoreDisk::size(self)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        self.read(buf, offset).map_err(|e| to_disk(&self.name, e))
    }

    fn read_nowait(&self, buf: &mut [u8], offset: u64) -> Option<Result<(), DiskError>> {
        StoreDisk::read_nowait(self, buf, offset).map(|r| r.map_err(|e| to_disk(&self.name, e)))
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), DiskError> {
        self.write(buf, offset, fua)
            .map_err(|e| to_disk(&self.name, e))
    }

    fn flush(&self) -> Result<(), DiskError> {
        self.store.flush().map_err(|e| to_disk(&self.name, e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        StoreDisk::discard(self, offset, len).map_err(|e| to_disk(&self.name, e))
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), DiskError> {
        StoreDisk::write_zeroes(self, offset, len, no_hole, fua).map_err(|e| to_disk(&self.name, e))
    }

    fn block_status(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Result<Vec<Extent>, DiskError> {
        self.extents(offset, len, max_extents)
            .map_err(|e| to_disk(&self.name, e))
    }

    fn block_hashes(&self, offset: u64, len: u64, max: usize) -> Result<BlockHashes, DiskError> {
        self.hashes(offset, len, max)
            .map_err(|e| to_disk(&self.name, e))
    }

    fn cache(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.prefetch(offset, len)
            .map_err(|e| to_disk(&self.name, e))
    }
}

fn to_disk(name: &str, e: StoreError) -> DiskError {
    match &e {
        StoreError::Invalid(_) => DiskError::OutOfRange,
        StoreError::Io(_) | StoreError::Corrupt(_) | StoreError::Poisoned => {
            log_limited(format_args!("{name}: {e}"));
            e.disk_error()
        }
        _ => e.disk_error(),
    }
}

/// Test-only hooks into race windows.
#[cfg(test)]
pub(super) mod test_hooks {
    use std::sync::atomic::{AtomicU64, Ordering};

    use parking_lot::Mutex;

    /// Microseconds a write sleeps between looking blocks up in the dedup index and sharing
    /// them (0: none).
    pub static DEDUP_PAUSE_US: AtomicU64 = AtomicU64::new(0);
    /// Run once, by the next write, between its dedup lookup and its change.
    #[allow(clippy::type_complexity)]
    pub static AFTER_DEDUP_LOOKUP: Mutex<Option<Box<dyn FnOnce() + Send>>> = Mutex::new(None);

    pub fn pause_after_dedup_lookup() {
        let us = DEDUP_PAUSE_US.load(Ordering::Relaxed);
        if us > 0 {
            std::thread::sleep(std::time::Duration::from_micros(us));
        }
        let hook = AFTER_DEDUP_LOOKUP.lock().take();
        if let Some(f) = hook {
            f();
        }
    }
}
