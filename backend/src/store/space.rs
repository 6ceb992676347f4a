//! Space: the refcount table, the orphan list and the metadata allocation cursor, which
//! change together and live under one lock ([`Store::space`](super::store::Store)). Held for
//! microseconds at a time: no device I/O happens under it on the common path (callers load the
//! refcount pages they will need first, with [`Space::load_pages`]).

use parking_lot::Mutex;

use super::{
    dedup::IndexChanges,
    device::Device,
    error::{StoreError, StoreResult},
    orphans::OrphanList,
    refcount::{Cursor, RcTable},
};

pub(super) struct Space {
    pub rc: RcTable,
    pub orphans: OrphanList,
    /// Where metadata allocations (map nodes, registry nodes, orphan chains) continue.
    pub meta_cursor: Cursor,
    /// Data allocations stop [`Space::reserve`] blocks short of full, so checkpoints always
    /// find room: this many, plus room for the next checkpoint to copy every node of the dedup
    /// index and add what the open generation enters.
    pub base_reserve: u64,
    /// Entries in the dedup index as of the last cut.
    pub index_entries: u64,
    /// What the open generation changed in the dedup index (dedup.rs): it changes with the
    /// refcounts of data blocks.
    pub dedup: IndexChanges,
}

/// Dedup index entries per node, about (nodes split half full; removals do not rebalance, so
/// this is an estimate): what a checkpoint that copies every node of the index needs room for.
const MIN_INDEX_ENTRIES_PER_NODE: u64 = 50;

impl Space {
    /// Blocks data allocations leave free for checkpoints.
    pub fn reserve(&self) -> u64 {
        let index = self.index_entries + self.dedup.len() as u64;
        self.base_reserve + index.div_ceil(MIN_INDEX_ENTRIES_PER_NODE) + 1
    }

    /// Allocates one block for metadata (may dig into the reserve kept for checkpoints).
    pub fn alloc_meta(&mut self, dev: &dyn Device) -> StoreResult<u64> {
        match self.rc.alloc(dev, &mut self.meta_cursor, 1, 0)? {
            Some((addr, _)) => Ok(addr),
            None => Err(StoreError::NoSpace),
        }
    }

    /// Reserves `need` blocks for data (and up to `extra` more if they are there), as runs,
    /// continuing at `cursor`; `None` when not even `need` are free (short of the reserve).
    pub fn reserve_data(
        &mut self,
        dev: &dyn Device,
        cursor: &mut Cursor,
        need: u64,
        extra: u64,
    ) -> StoreResult<Option<Vec<(u64, u64)>>> {
        let keep = self.reserve();
        let mut runs = Vec::new();
        let mut got = 0;
        while got < need + extra {
            match self.rc.reserve(dev, cursor, need + extra - got, keep)? {
                Some((a, n)) => {
                    runs.push((a, n));
                    got += n;
                }
                None if got >= need => break,
                None => {
                    self.unreserve(dev, &runs);
                    return Ok(None);
                }
            }
        }
        Ok(Some(runs))
    }

    /// Gives back reserved blocks that were not used.
    pub fn unreserve(&mut self, dev: &dyn Device, runs: &[(u64, u64)]) {
        for &(a, n) in runs {
            for b in a..a + n {
                // Only fails for an address outside the data area, which a run never holds.
                let _ = self.rc.unreserve(dev, b);
            }
        }
    }

    /// Loads the refcount pages of `addrs` that are not in memory, reading them from the
    /// device without holding the lock.
    pub fn load_pages(
        space: &Mutex<Space>,
        dev: &dyn Device,
        addrs: impl IntoIterator<Item = u64>,
    ) -> StoreResult<()> {
        let missing = space.lock().rc.missing(addrs);
        if missing.is_empty() {
            return Ok(());
        }
        let mut read = Vec::with_capacity(missing.len());
        for m in missing {
            read.push((m, RcTable::read_page(dev, m)?));
        }
        let mut s = space.lock();
        for (m, counts) in read {
            s.rc.install(m, counts)?;
        }
        Ok(())
    }
}
