//! Dedup as the store does it, on top of the index (dedup.rs): the lookups inline dedup
//! makes, the background pass over blocks already stored, the settings, and what `df`
//! reports.
//!
//! ```text
//!  inline    io.rs hashes a write → dedup_candidates (overlay, filter, tree) → same_data
//!            (byte compare) → the write points at the block found (a Share entry)
//!  pass      each VDI and snapshot, leaf by leaf: hashes the index lacks are entered;
//!            in a leaf only this tree reaches, a block whose copy the index names is
//!            remapped to it (a Share entry), and its own copy freed
//! ```
//!
//! Sharing a block found by a lookup is safe only if it still holds what was compared: the
//! writer shares it only if, under the space lock, it is still referenced and no freed block
//! was made reusable since the lookup began ([`RcTable::releases`]).
//!
//! [`RcTable::releases`]: super::refcount::RcTable::releases

use std::{collections::HashMap, sync::Arc, time::Instant};

use serde::{Deserialize, Serialize};

use super::{
    dedup::{Found, IndexOp},
    error::{StoreError, StoreResult},
    format::{hash24, DedupRoot, Hash24, Ptr, BLOCK_SIZE, BLOCK_SIZE_U64, DEDUP_VERSION, FANOUT},
    nodes::{retry_evicted, Node},
    space::Space,
    staging::is_staging,
    store::Store,
    vdi::Vdi,
};

/// The store's dedup settings and index, for `parallax dedup status` and `df`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DedupStatus {
    /// Whether the store keeps a dedup index (format 7 on).
    pub supported: bool,
    /// Writes look for a copy of their blocks before writing them.
    pub inline: bool,
    /// A block with the same hash is shared without comparing bytes.
    pub trust_hash: bool,
    /// Hashes in the index (as of the last checkpoint).
    pub index_entries: u64,
    /// RAM the index's filter holds.
    pub filter_bytes: u64,
}

/// Dedup in `df`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DedupUsage {
    #[serde(flatten)]
    pub status: DedupStatus,
    /// Bytes of the index's nodes on disk.
    pub index_bytes: u64,
    /// Data blocks in the index that more than one map node points at.
    pub shared_blocks: u64,
    /// What those extra references would take as copies: bytes saved by dedup, and by map
    /// nodes a fork copied from its snapshot (both point at the same blocks).
    pub saved_bytes: u64,
}

/// What a dedup pass did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DedupReport {
    /// VDIs and snapshots walked.
    pub trees: u64,
    /// Data blocks looked at (a block in a map node several trees share, once per tree).
    pub blocks_scanned: u64,
    /// Blocks entered into the index (the first copy of their data it had seen).
    pub blocks_indexed: u64,
    /// Map entries now pointing at an existing copy instead of their own block.
    pub blocks_shared: u64,
    /// Blocks whose hash matched another's but whose bytes did not.
    pub collisions: u64,
    /// Bytes of space the pass gave back (after its checkpoints).
    pub freed_bytes: u64,
    pub seconds: f64,
}

/// Where a pass goes on: the VDI or snapshot id, and the block within it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupPosition {
    pub id: u64,
    pub lba: u64,
}

/// Progress of a pass, for a progress bar.
#[derive(Debug, Clone, Copy)]
pub struct DedupProgress {
    pub trees_done: u64,
    pub trees_total: u64,
    pub blocks_scanned: u64,
}

/// One leaf of a tree as the pass saw it.
struct Leaf {
    /// The leaf's first logical block.
    base: u64,
    node: Arc<Node>,
    /// Every node from the root to the leaf has refcount 1: only this tree reaches it, so
    /// changing it copies nothing shared.
    private: bool,
    /// `RcTable::releases` before the leaf was read.
    seen: u64,
}

/// Where the next leaf is, or how far a hole reaches.
enum Step {
    Leaf(Leaf),
    /// No data before this block.
    Skip(u64),
    /// The tree is gone (deleted).
    Gone,
}

/// The most adjacent candidate blocks [`Store::same_data`] reads at once.
const SAME_DATA_RUN: usize = 256;

impl Store {
    /// Whether writes look for copies of their blocks.
    pub(super) fn inline_dedup(&self) -> bool {
        self.format_version() >= DEDUP_VERSION && self.dedup_settings.inline()
    }

    /// The block the index names for each hash, if any, and `RcTable::releases` from before
    /// the lookup (what a writer checks again before sharing one).
    pub(super) fn dedup_candidates(
        &self,
        hashes: &[Hash24],
    ) -> StoreResult<(Vec<Option<u64>>, u64)> {
        let (pending, seen): (Vec<Option<IndexOp>>, u64) = {
            let s = self.space.lock();
            (
                hashes.iter().map(|h| s.dedup.get(h)).collect(),
                s.rc.releases(),
            )
        };
        let mut index = self.dedup.lock();
        let mut out = Vec::with_capacity(hashes.len());
        for (h, p) in hashes.iter().zip(pending) {
            out.push(match index.lookup(&*self.dev, h, p)? {
                Found::Block(a) => Some(a),
                Found::Absent | Found::SurelyNew => None,
            });
        }
        Ok((out, seen))
    }

    /// For each (block address, data), whether the block holds the data (always, if the
    /// store trusts the hash). Adjacent blocks are read together.
    pub(super) fn same_data(&self, cands: &[(u64, &[u8])]) -> StoreResult<Vec<bool>> {
        if self.dedup_settings.trust_hash() {
            return Ok(vec![true; cands.len()]);
        }
        let mut order: Vec<usize> = (0..cands.len()).collect();
        order.sort_unstable_by_key(|&i| cands[i].0);
        let mut same = vec![false; cands.len()];
        let mut buf = Vec::new();
        let mut run = 0;
        while run < order.len() {
            let start = cands[order[run]].0;
            let mut end = run + 1;
            while end < order.len()
                && cands[order[end]].0 == start + (end - run) as u64
                && end - run < SAME_DATA_RUN
            {
                end += 1;
            }
            buf.resize((end - run) * BLOCK_SIZE, 0);
            self.dev.read_at(&mut buf, start * BLOCK_SIZE_U64)?;
            for (k, &i) in order[run..end].iter().enumerate() {
                same[i] = buf[k * BLOCK_SIZE..(k + 1) * BLOCK_SIZE] == cands[i].1[..];
            }
            run = end;
        }
        Ok(same)
    }

    /// The store's dedup settings and index.
    pub fn dedup_status(&self) -> DedupStatus {
        let index = self.dedup.lock();
        DedupStatus {
            supported: self.format_version() >= DEDUP_VERSION,
            inline: self.inline_dedup(),
            trust_hash: self.dedup_settings.trust_hash(),
            index_entries: index.entries,
            filter_bytes: index.filter_bytes(),
        }
    }

    /// The index and what the blocks in it share (walks the index; entries as the open
    /// generation changed them).
    pub fn dedup_usage(&self) -> StoreResult<DedupUsage> {
        let mut status = self.dedup_status();
        let (nodes, entries) = self.dedup.lock().contents(&*self.dev)?;
        let mut entries: HashMap<Hash24, u64> = entries.into_iter().collect();
        for (h, op) in self.space.lock().dedup.ops() {
            match op {
                IndexOp::Set(a) => {
                    entries.insert(h, a);
                }
                IndexOp::RemoveIf(freed) => {
                    if entries.get(&h).is_some_and(|a| freed.contains(a)) {
                        entries.remove(&h);
                    }
                }
                IndexOp::Remove => {
                    entries.remove(&h);
                }
            }
        }
        status.index_entries = entries.len() as u64;
        Space::load_pages(&self.space, &*self.dev, entries.values().copied())?;
        let mut space = self.space.lock();
        let (mut shared, mut saved) = (0, 0);
        for a in entries.into_values() {
            let refs = space.rc.get(&*self.dev, a)? as u64;
            if refs > 1 {
                shared += 1;
                saved += refs - 1;
            }
        }
        Ok(DedupUsage {
            status,
            index_bytes: nodes.len() as u64 * BLOCK_SIZE_U64,
            shared_blocks: shared,
            saved_bytes: saved * BLOCK_SIZE_U64,
        })
    }

    /// Changes the dedup settings (durable on return).
    pub fn set_dedup(&self, inline: Option<bool>, trust_hash: Option<bool>) -> StoreResult<()> {
        self.check_writable()?;
        if self.format_version() < DEDUP_VERSION {
            return Err(StoreError::Invalid(format!(
                "this store is format {}, which has no dedup index; run `parallax upgrade` first",
                self.format_version()
            )));
        }
        {
            let _change = self.change();
            if let Some(i) = inline {
                self.dedup_settings.set(DedupRoot::INLINE_OFF, !i);
            }
            if let Some(t) = trust_hash {
                self.dedup_settings.set(DedupRoot::TRUST_HASH, t);
            }
            self.mark_changed();
        }
        self.checkpoint_through(self.open_generation(), false)
    }

    /// Walks every VDI and snapshot: enters the blocks the index lacks, and points map
    /// entries at an existing copy of their data where only this tree reaches them (so no
    /// map node that several trees share is copied). Checkpoints as it goes and at the end,
    /// so what it freed is free when it returns.
    pub fn dedup_pass(&self, progress: &mut dyn FnMut(DedupProgress)) -> StoreResult<DedupReport> {
        let started = Instant::now();
        let free_before = self.space.lock().rc.free();
        let mut pos = DedupPosition::default();
        let mut report = DedupReport::default();
        while !self.dedup_step(&mut pos, u64::MAX, &mut report, progress)? {}
        // Two checkpoints: the first frees what the pass freed, the second takes apart the
        // map nodes it orphaned.
        self.checkpoint_through(self.open_generation(), false)?;
        self.gc(&mut |_| {})?;
        report.freed_bytes =
            self.space.lock().rc.free().saturating_sub(free_before) * BLOCK_SIZE_U64;
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Goes on with a pass from `pos` for about `budget` data blocks (at least one leaf),
    /// adding to `report`; returns true when the pass has walked everything. Positions are
    /// VDI ids (ascending: a tree made meanwhile is reached, one deleted is skipped) and
    /// blocks within them, so a pass can pause and resume, as the daemon's worker does.
    pub fn dedup_step(
        &self,
        pos: &mut DedupPosition,
        budget: u64,
        report: &mut DedupReport,
        progress: &mut dyn FnMut(DedupProgress),
    ) -> StoreResult<bool> {
        self.check_writable()?;
        if self.format_version() < DEDUP_VERSION {
            return Err(StoreError::Invalid(format!(
                "this store is format {}, which has no dedup index; run `parallax upgrade` first",
                self.format_version()
            )));
        }
        let mut ids: Vec<u64> = {
            let mut cat = self.catalog.lock();
            self.all_records(&mut cat)?
                .into_iter()
                .filter(|r| !is_staging(&r.name))
                .map(|r| r.id)
                .collect()
        };
        ids.sort_unstable();
        let total = ids.len() as u64;
        let first = ids.partition_point(|&id| id < pos.id);
        let budget_end = report.blocks_scanned.saturating_add(budget.max(1));
        for (n, &id) in ids.iter().enumerate().skip(first) {
            if id != pos.id {
                *pos = DedupPosition { id, lba: 0 };
            }
            let v = match self.vdi(id) {
                Ok(v) => v,
                Err(StoreError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            let done = self.dedup_tree(&v, &mut pos.lba, budget_end, report, &mut |r| {
                progress(DedupProgress {
                    trees_done: n as u64,
                    trees_total: total,
                    blocks_scanned: r.blocks_scanned,
                })
            })?;
            self.after_change()?;
            if !done {
                return Ok(false);
            }
            report.trees += 1;
            *pos = DedupPosition { id: id + 1, lba: 0 };
        }
        progress(DedupProgress {
            trees_done: total,
            trees_total: total,
            blocks_scanned: report.blocks_scanned,
        });
        Ok(true)
    }

    /// Walks `v` from block `*lba` until the report has scanned `budget_end` blocks; true
    /// when it reached the end.
    fn dedup_tree(
        &self,
        v: &Arc<Vdi>,
        lba: &mut u64,
        budget_end: u64,
        report: &mut DedupReport,
        progress: &mut dyn FnMut(&DedupReport),
    ) -> StoreResult<bool> {
        let blocks = v.state.read().rec.size.div_ceil(BLOCK_SIZE_U64);
        while *lba < blocks {
            if report.blocks_scanned >= budget_end {
                return Ok(false);
            }
            // A leaf whose changes a checkpoint overtook (it made freed blocks reusable) is
            // read and done again, a few times at most; a later pass gets what is left.
            let mut next = None;
            for _ in 0..3 {
                let leaf = match retry_evicted(|| self.leaf_at(v, *lba))? {
                    Step::Gone => return Ok(true),
                    Step::Skip(n) => {
                        next = Some(n);
                        break;
                    }
                    Step::Leaf(l) => l,
                };
                next = Some(leaf.base + FANOUT as u64);
                if self.dedup_leaf(v, &leaf, report)? {
                    break;
                }
            }
            *lba = next.expect("set by the first try");
            progress(report);
        }
        Ok(true)
    }

    /// The leaf holding block `lba` of `v`, as it is now.
    fn leaf_at(&self, v: &Arc<Vdi>, lba: u64) -> StoreResult<Step> {
        let _epoch = self.epoch.enter();
        let seen = self.space.lock().rc.releases();
        let st = v.state.read();
        if st.deleted {
            return Ok(Step::Gone);
        }
        let mut p = st.rec.root;
        let mut path = Vec::with_capacity(st.rec.height as usize);
        for level in (1..=st.rec.height).rev() {
            // `p` is a node of `level`, covering 128^level blocks.
            let span = 1u64 << (7 * level as u32);
            if !p.is_block() {
                return Ok(Step::Skip((lba / span + 1) * span));
            }
            path.push(p.addr());
            let node = self.nodes.fetch(&*self.dev, p)?;
            if level == 1 {
                drop(st);
                Space::load_pages(&self.space, &*self.dev, path.iter().copied())?;
                let mut space = self.space.lock();
                let mut private = true;
                for a in &path {
                    private &= space.rc.get(&*self.dev, *a)? == 1;
                }
                return Ok(Step::Leaf(Leaf {
                    base: lba - lba % FANOUT as u64,
                    node,
                    private,
                    seen,
                }));
            }
            let idx = ((lba >> (7 * (level as u32 - 1))) & 127) as usize;
            p = node.get(idx);
        }
        Ok(Step::Skip(u64::MAX))
    }

    /// Enters and remaps what one leaf holds; false if a checkpoint overtook it (nothing
    /// remapped then).
    fn dedup_leaf(&self, v: &Arc<Vdi>, leaf: &Leaf, report: &mut DedupReport) -> StoreResult<bool> {
        let entries: Vec<(usize, Ptr)> = (0..FANOUT)
            .map(|i| (i, leaf.node.get(i)))
            .filter(|(_, p)| p.is_block())
            .collect();
        if entries.is_empty() {
            return Ok(true);
        }
        report.blocks_scanned += entries.len() as u64;
        let hashes: Vec<Hash24> = entries.iter().map(|(_, p)| p.hash).collect();
        let (found, _) = self.dedup_candidates(&hashes)?;
        let mut enter = Vec::new();
        let mut remap = Vec::new();
        let trust = self.dedup_settings.trust_hash();
        // Copies within this leaf share the first one, which is entered.
        let mut first: HashMap<Hash24, u64> = HashMap::new();
        for (&(i, p), cand) in entries.iter().zip(found) {
            match cand.or_else(|| first.get(&p.hash).copied()) {
                None => {
                    first.insert(p.hash, p.addr());
                    enter.push(p);
                }
                Some(b) if b == p.addr() => {}
                Some(_) if !leaf.private => {}
                Some(b) => {
                    if trust || self.blocks_match(p, b)? {
                        remap.push((leaf.base + i as u64, p, b));
                    } else {
                        report.collisions += 1;
                    }
                }
            }
        }
        if !enter.is_empty() {
            Space::load_pages(&self.space, &*self.dev, enter.iter().map(|p| p.addr()))?;
            let mut space = self.space.lock();
            if space.rc.releases() != leaf.seen {
                return Ok(false);
            }
            for p in enter {
                if space.rc.get(&*self.dev, p.addr())? > 0 && space.dedup.get(&p.hash).is_none() {
                    space.dedup.claimed(p.hash, p.addr());
                    report.blocks_indexed += 1;
                }
            }
        }
        if !remap.is_empty() {
            match self.remap(v, leaf, &remap)? {
                Some(n) => report.blocks_shared += n,
                None => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Whether the data block `p` points at and block `b` hold the same bytes (`p`'s own
    /// verified against its hash).
    fn blocks_match(&self, p: Ptr, b: u64) -> StoreResult<bool> {
        let mut mine = [0u8; BLOCK_SIZE];
        let mut other = [0u8; BLOCK_SIZE];
        self.dev.read_at(&mut mine, p.addr() * BLOCK_SIZE_U64)?;
        if hash24(&mine) != p.hash {
            return Err(StoreError::Checksum(format!(
                "data block {} fails its checksum",
                p.addr()
            )));
        }
        self.dev.read_at(&mut other, b * BLOCK_SIZE_U64)?;
        Ok(mine == other)
    }

    /// Points each `(lba, old, copy)` at `copy` where the map still holds `old`; returns how
    /// many it changed, or `None` if a checkpoint overtook the leaf (nothing changed).
    fn remap(
        &self,
        v: &Arc<Vdi>,
        leaf: &Leaf,
        remap: &[(u64, Ptr, u64)],
    ) -> StoreResult<Option<u64>> {
        let addrs = remap.iter().flat_map(|&(_, p, b)| [p.addr(), b]);
        Space::load_pages(&self.space, &*self.dev, addrs)?;
        let change = self.change();
        let mut st = v.state.write();
        if st.deleted {
            return Ok(Some(0));
        }
        let mut cur = Vec::with_capacity(FANOUT);
        let root = (st.rec.root, st.rec.height);
        retry_evicted(|| {
            cur.clear();
            super::radix::resolve(
                &self.nodes,
                &*self.dev,
                root.0,
                root.1,
                leaf.base,
                FANOUT as u64,
                &mut cur,
            )
        })?;
        let mut space = self.space.lock();
        if space.rc.releases() != leaf.seen {
            return Ok(None);
        }
        let mut tx = self.tx(&mut space, change.gen);
        // Runs of adjacent entries, one change each. No copy is a block another entry here
        // drops: copies are what the index names or the first of their data in this leaf,
        // neither of which is remapped.
        let mut run: Vec<Ptr> = Vec::new();
        let mut start = 0;
        let mut done = 0;
        for &(lba, old, copy) in remap {
            let ok = cur[(lba - leaf.base) as usize] == old && tx.space.rc.get(tx.dev, copy)? > 0;
            if !run.is_empty() && (!ok || lba != start + run.len() as u64) {
                self.set_map(v, &mut st, &mut tx, start, &run, true)?;
                done += run.len() as u64;
                run.clear();
            }
            if ok {
                if run.is_empty() {
                    start = lba;
                }
                run.push(old.with_addr(copy));
            }
        }
        if !run.is_empty() {
            self.set_map(v, &mut st, &mut tx, start, &run, true)?;
            done += run.len() as u64;
        }
        Ok(Some(done))
    }
}
