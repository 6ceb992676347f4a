//! Checkpoints: how the open generation becomes durable (FORMAT.md §8).
//!
//! ```text
//!  cut (gate held exclusively, microseconds)      finalize + write (no store-wide lock)
//!  ─ generation g closes, g+1 opens               ─ hash g's map nodes bottom-up, fill the
//!  ─ changed records, name changes → registry       hashes into what is written
//!    tree (its new nodes allocated in g)          ─ patch records' root hashes, hash registry
//!  ─ orphan chain blocks allocated                ─ encode refcount pages as of the cut
//!  ─ refcounts: g's pages frozen (copy on write)  ─ write all, fsync, commit record, fsync
//!  ─ dirty map nodes of g frozen                  ─ release blocks g freed (after readers)
//! ```
//!
//! Writers go on in generation g+1 while g is hashed and written: a frozen map node is copied
//! before it is changed, a refcount page is saved before its first change, and admin
//! operations only add name changes to the catalog's overlay. One checkpoint runs at a time
//! (`Store::commit`); a background thread (store.rs) runs them every
//! `checkpoint_interval` while anything changed, and when asked to.

use std::{
    collections::HashMap,
    sync::{atomic::Ordering, Arc},
};

use super::{
    btree::NewBlocks,
    catalog::Catalog,
    device::Device,
    error::{StoreError, StoreResult},
    format::{
        commit_layout, hash24, CommitRecord, Hash24, LogPosition, Ptr, BLOCK_SIZE, BLOCK_SIZE_U64,
        COMMIT_SLOTS,
    },
    nodes::{Node, UNSET},
    orphans::{chain_blocks, encode_chain, Orphan},
    refcount::RcCut,
    registry::Record,
    space::Space,
    store::{now_ns, random_u64, Store},
    vdi::Vdi,
};

/// What a cut fixed for its checkpoint to write.
struct Cut {
    gen: u64,
    records: Vec<(Arc<Vdi>, Record, bool)>,
    frozen: Vec<(u64, u8)>,
    rc: RcCut,
    /// The orphan list and its new chain's blocks, if it changed.
    orphans: Option<(Vec<Orphan>, Vec<u64>)>,
    next_id: u64,
    log: LogPosition,
    /// How long the cut held the gate (writers waited that long).
    held: std::time::Duration,
}

impl Store {
    /// Makes every change made so far durable: through the intent log (format 2), else by a
    /// checkpoint.
    pub fn flush(&self) -> StoreResult<()> {
        // A store that refuses writes cannot promise that anything is durable.
        self.check_writable()?;
        if self.log.enabled() {
            match self.log.flush(&*self.dev, &self.space, self.log.end()) {
                Ok(true) => return Ok(()),
                // The chain starts with this session's first checkpoint.
                Ok(false) => {}
                Err(e) => {
                    if !matches!(e, StoreError::NoSpace) {
                        self.poison(&e);
                    }
                    return Err(e);
                }
            }
        }
        // Everything acknowledged so far is in the open generation, or in one a checkpoint
        // has cut and may still be writing: wait for the newest of them.
        let target = {
            let _change = self.change();
            let open = self.open_generation();
            if self.has_changes() {
                open
            } else {
                open - 1
            }
        };
        self.checkpoint_through(target, false)
    }

    /// Commits everything and marks the store closed cleanly; stops background checkpoints.
    /// The store stays usable.
    pub fn close(&self) -> StoreResult<()> {
        self.background.stop();
        self.check_writable()?;
        let target = self.open_generation();
        self.checkpoint_through(target, true)?;
        self.give_back_due(true);
        Ok(())
    }

    /// Checkpoints if anything changed or orphans wait to be taken apart (the background
    /// thread calls this). Returns whether it did.
    pub fn checkpoint(&self) -> StoreResult<bool> {
        if !self.has_changes() && self.space.lock().orphans.list.is_empty() {
            // Nothing to commit; space freed a while ago may be due to go back.
            self.give_back_due(false);
            return Ok(false);
        }
        let mut last = self.commit.lock();
        self.run_checkpoint(&mut last, false)
    }

    /// Checkpoints until generation `target` is durable (waiting behind one in progress).
    pub(super) fn checkpoint_through(&self, target: u64, clean: bool) -> StoreResult<()> {
        let mut last = self.commit.lock();
        let mark_clean = clean && !last.clean;
        if last.gen >= target && !mark_clean {
            return Ok(());
        }
        self.run_checkpoint(&mut last, clean).map(|_| ())
    }

    /// After a change: when too many map nodes wait in memory, have them checkpointed — by
    /// the background thread, or here if there is none or it falls far behind.
    pub(super) fn after_change(&self) -> StoreResult<()> {
        let dirty = self.nodes.dirty_count();
        let max = self.options.max_dirty_nodes;
        if dirty <= max {
            return Ok(());
        }
        if let Some(&id) = self.checkpoint_worker.get() {
            if self.background.running(id) && dirty <= 2 * max {
                self.background.wake(id);
                return Ok(());
            }
        }
        self.checkpoint().map(|_| ())
    }

    fn run_checkpoint(&self, last: &mut CommitRecord, clean: bool) -> StoreResult<bool> {
        self.check_writable()?;
        self.take_orphans_apart(self.options.orphans_per_commit)?;
        let pending_orphans = !self.space.lock().orphans.list.is_empty();
        let mark_clean = clean && !last.clean;
        if !self.has_changes() && !mark_clean && !pending_orphans {
            return Ok(false);
        }
        self.prefetch_registry()?;
        self.prefetch_dedup()?;
        let cut = match self.cut() {
            Ok(c) => c,
            Err(e) => {
                self.poison(&e);
                return Err(e);
            }
        };
        match self.write_checkpoint(last, cut, clean) {
            Ok(()) => {
                self.checkpointed.store(true, Ordering::Release);
                Ok(true)
            }
            Err(e) => {
                self.poison(&e);
                Err(e)
            }
        }
    }

    /// Takes up to `budget` orphans apart, as a change of the open generation. Their nodes
    /// are read first, without any lock held.
    pub(super) fn take_orphans_apart(&self, budget: usize) -> StoreResult<usize> {
        let next: Vec<Ptr> = {
            let s = self.space.lock();
            s.orphans
                .list
                .iter()
                .rev()
                .take(budget)
                .map(|o| o.ptr)
                .collect()
        };
        if next.is_empty() {
            return Ok(0);
        }
        for p in &next {
            // An unreadable one is reported (and skipped) by process_orphans.
            let _ = self.nodes.fetch(&*self.dev, *p);
        }
        Space::load_pages(&self.space, &*self.dev, next.iter().map(|p| p.addr()))?;
        let change = self.change();
        let mut space = self.space.lock();
        let n = self.tx(&mut space, change.gen).process_orphans(budget)?;
        self.mark_changed();
        Ok(n)
    }

    /// Reads the registry nodes the next cut will change, so that the cut does no I/O.
    fn prefetch_registry(&self) -> StoreResult<()> {
        let ids: Vec<u64> = self.vdis.all().iter().map(|v| v.id).collect();
        let mut cat = self.catalog.lock();
        for id in ids {
            cat.record(&*self.dev, id)?;
        }
        Ok(())
    }

    /// Reads the dedup index nodes the next cut will change, so that the cut does no I/O (a
    /// hash entered after this is read at the cut).
    fn prefetch_dedup(&self) -> StoreResult<()> {
        let keys = self.space.lock().dedup.keys();
        if keys.is_empty() {
            return Ok(());
        }
        self.dedup.lock().prefetch(&*self.dev, &keys)
    }

    /// Closes the open generation: what changed in it becomes the checkpoint's to write.
    fn cut(&self) -> StoreResult<Cut> {
        let _gate = self.gate.write();
        let held = std::time::Instant::now();
        let (gen, _) = self.advance_generation();
        let mut records = Vec::new();
        for v in self.vdis.take_changed() {
            let mut st = v.state.write();
            st.changed = false;
            let (rec, deleted) = (st.rec.clone(), st.deleted);
            drop(st);
            records.push((v, rec, deleted));
        }
        let mut cat = self.catalog.lock();
        let names = cat.take_overlay();
        let mut space = self.space.lock();
        {
            let plain: Vec<(Record, bool)> =
                records.iter().map(|(_, r, d)| (r.clone(), *d)).collect();
            let mut ctx = Catalog::ctx(&*self.dev, &mut space);
            cat.apply(&mut ctx, names, &plain)?;
        }
        {
            let ops = space.dedup.take();
            if !ops.is_empty() {
                let mut index = self.dedup.lock();
                let mut ctx = Catalog::ctx(&*self.dev, &mut space);
                index.apply(&mut ctx, ops)?;
                let entries = index.entries;
                drop(index);
                space.index_entries = entries;
            }
        }
        let orphans = if space.orphans.changed {
            space.orphans.changed = false;
            for a in std::mem::take(&mut space.orphans.chain) {
                space.rc.decr(&*self.dev, a)?;
            }
            let n = chain_blocks(space.orphans.list.len());
            let mut addrs = Vec::with_capacity(n);
            for _ in 0..n {
                addrs.push(space.alloc_meta(&*self.dev)?);
            }
            space.orphans.chain = addrs.clone();
            Some((space.orphans.list.clone(), addrs))
        } else {
            None
        };
        let rc = space.rc.cut();
        let log = self.log.cut(&*self.dev, &mut space, random_u64())?;
        Ok(Cut {
            log,
            gen,
            records,
            frozen: self.nodes.take_created(),
            rc,
            orphans,
            next_id: cat.next_id,
            held: held.elapsed(),
        })
    }

    /// Hashes and writes what `cut` fixed, then the commit record (FORMAT.md §8 steps 2–6),
    /// and releases what the generation freed.
    fn write_checkpoint(&self, last: &mut CommitRecord, cut: Cut, clean: bool) -> StoreResult<()> {
        let started = std::time::Instant::now();
        let (gen, cut_held) = (cut.gen, cut.held);
        let (hashes, images) = self.finalize_nodes(gen, cut.frozen)?;
        let resolve = |p: Ptr| -> StoreResult<Ptr> {
            if !p.is_block() || p.hash != UNSET {
                return Ok(p);
            }
            hashes
                .get(&p.addr())
                .copied()
                .or_else(|| self.nodes.clean_hash(p.addr()))
                .map(|h| Ptr::block(p.addr(), h))
                .ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "root node {} has no checksum at its checkpoint (a bug)",
                        p.addr()
                    ))
                })
        };
        // Records: their roots' hashes, in the registry and in memory.
        let mut records = Vec::with_capacity(cut.records.len());
        for (vdi, mut rec, deleted) in cut.records {
            if deleted {
                continue;
            }
            let root = resolve(rec.root)?;
            if root != rec.root {
                let mut st = vdi.state.write();
                if st.rec.root.addr() == root.addr() && st.rec.root.hash == UNSET {
                    st.rec.root = root;
                }
            }
            rec.root = root;
            records.push(rec);
        }
        let mut writes: Vec<(u64, Buf)> = images
            .iter()
            .map(|(a, n, _)| (*a, Buf::Node(n.clone())))
            .collect();
        let (registry_root, registry_height) = {
            let mut cat = self.catalog.lock();
            let mut space = self.space.lock();
            let mut ctx = Catalog::ctx(&*self.dev, &mut space);
            for rec in &records {
                cat.patch_record(&mut ctx, rec)?;
            }
            drop(space);
            for (addr, b) in cat.tree.finalize() {
                writes.push((addr, Buf::Owned(b)));
            }
            (cat.tree.root, cat.tree.height)
        };
        let (orphan_head, orphan_count) = match &cut.orphans {
            Some((list, addrs)) => {
                let (head, blocks) = encode_chain(list, addrs, gen);
                writes.extend(blocks.into_iter().map(|(a, b)| (a, Buf::Owned(b))));
                (head, list.len() as u64)
            }
            None => (last.orphan_head, last.orphan_count),
        };
        let dedup = {
            let index = self.dedup.lock();
            let new = index.new_blocks();
            writes.extend(new.to_write().map(|(i, a)| (a, Buf::New(new.clone(), i))));
            index.root(self.dedup_settings.flags())
        };
        let rc_images = self.space.lock().rc.take_images();
        writes.extend(
            rc_images
                .encode(gen)
                .into_iter()
                .map(|(a, b)| (a, Buf::Owned(b))),
        );
        let record = CommitRecord {
            gen,
            registry_root,
            registry_height,
            next_id: cut.next_id,
            allocated_blocks: cut.rc.allocated,
            orphan_head,
            orphan_count,
            time_ns: now_ns(),
            clean,
            group_selectors: rc_images.group_selectors.clone(),
            log: cut.log,
            version: commit_layout(self.format_version()),
            dedup,
        };
        let blocks = writes.len();
        write_sorted(&*self.dev, writes)?;
        self.dev.sync()?;
        // The trees' new nodes are on the device: they may be read from it again.
        self.catalog.lock().tree.written();
        self.dedup.lock().written();
        let slot = COMMIT_SLOTS[(record.gen % 2) as usize];
        self.dev
            .write_at(&record.encode(slot)[..], slot * BLOCK_SIZE_U64)?;
        self.dev.sync()?;
        // Durable. Frozen nodes become clean; the generation's frees become reusable once
        // every read that started before now has finished.
        for (addr, image, hash) in images {
            self.nodes.written(addr, gen, hash, image);
        }
        self.space.lock().rc.commit_done(rc_images);
        self.epoch.flip_and_wait();
        // (VDI locks come before the space lock: unload first.)
        let mut idle = self.vdis.unload_idle();
        idle.extend(self.log.checkpointed(cut.log).into_iter().map(|a| (a, 1)));
        let freed = {
            let mut space = self.space.lock();
            let freed = self.dev.discard_unit().map(|_| cut.rc.freed.clone());
            space.rc.release(cut.rc.freed);
            space.unreserve(&*self.dev, &idle);
            space.rc.trim(self.options.rc_cache_pages);
            freed
        };
        // The device may take back what they occupied (giveback.rs).
        if let Some(freed) = freed {
            self.note_freed(&freed, &idle);
        }
        self.nodes.checkpoint_written(gen);
        *last = record;
        tracing::debug!(
            gen,
            blocks,
            ms = started.elapsed().as_secs_f64() * 1e3,
            cut_ms = cut_held.as_secs_f64() * 1e3,
            "checkpoint written"
        );
        self.checkpoint_done(started.elapsed());
        Ok(())
    }

    /// Hashes the frozen map nodes of generation `gen` bottom-up; returns every node's hash
    /// and the images to write (hashes of children filled in).
    #[allow(clippy::type_complexity)]
    fn finalize_nodes(
        &self,
        gen: u64,
        mut frozen: Vec<(u64, u8)>,
    ) -> StoreResult<(HashMap<u64, Hash24>, Vec<(u64, Arc<Node>, Hash24)>)> {
        frozen.sort_unstable_by_key(|&(addr, level)| (level, addr));
        let mut hashes: HashMap<u64, Hash24> = HashMap::with_capacity(frozen.len());
        let mut images = Vec::with_capacity(frozen.len());
        for (addr, level) in frozen {
            let Some(node) = self.nodes.frozen(addr, gen) else {
                // Freed before the cut: never part of any tree that is written.
                continue;
            };
            let mut image = (*node).clone();
            if level >= 2 {
                for i in 0..super::format::FANOUT {
                    let c = image.get(i);
                    if !c.is_block() || c.hash != UNSET {
                        continue;
                    }
                    let h = hashes
                        .get(&c.addr())
                        .copied()
                        .or_else(|| self.nodes.clean_hash(c.addr()))
                        .ok_or_else(|| {
                            StoreError::Corrupt(format!(
                                "map node {addr} (level {level}, checkpoint {gen}) points at node {} ({}) whose checksum is unknown (a bug)",
                                c.addr(), self.nodes.describe(c.addr())
                            ))
                        })?;
                    image.set(i, Ptr::block(c.addr(), h));
                }
            }
            let h = hash24(&image.0);
            hashes.insert(addr, h);
            images.push((addr, Arc::new(image), h));
        }
        Ok((hashes, images))
    }

    /// Every block the last durable checkpoint depends on: the superblock, the current commit
    /// slot, the selected copies of group headers and refcount pages, and every allocated
    /// block.
    #[cfg(test)]
    pub(crate) fn live_blocks(&self) -> Vec<u64> {
        use super::format::SUPERBLOCK_ADDR;
        let last = self.commit.lock();
        let geo = self.geometry();
        let mut out = vec![SUPERBLOCK_ADDR, COMMIT_SLOTS[(last.gen % 2) as usize]];
        for (g, sel) in last.group_selectors.iter().enumerate() {
            if !sel.written {
                continue;
            }
            let addr = geo.group_header_addr(g as u64, sel.copy);
            out.push(addr);
            let mut b = [0u8; BLOCK_SIZE];
            self.dev
                .read_at(&mut b, addr * BLOCK_SIZE_U64)
                .expect("header");
            let h = super::format::GroupHeader::decode(&b, addr, &geo, g as u64).expect("header");
            for (p, ps) in h.page_selectors.iter().enumerate() {
                if ps.written {
                    out.push(geo.rc_page_addr(g as u64, p as u64, ps.copy));
                }
            }
        }
        let mut space = self.space.lock();
        for b in 0..geo.total_blocks {
            if geo.locate(b).is_some() && space.rc.get(&*self.dev, b).expect("rc") > 0 {
                out.push(b);
            }
        }
        out
    }
}

enum Buf {
    Node(Arc<Node>),
    Owned(Box<[u8; BLOCK_SIZE]>),
    /// Block `i` of a B-tree merge's new blocks.
    New(Arc<NewBlocks>, usize),
}

impl Buf {
    fn bytes(&self) -> &[u8] {
        match self {
            Buf::Node(n) => &n.0,
            Buf::Owned(b) => &b[..],
            Buf::New(n, i) => n.block(*i),
        }
    }
}

/// Writes blocks in address order, runs of adjacent blocks as one vectored write.
fn write_sorted(dev: &dyn Device, mut writes: Vec<(u64, Buf)>) -> StoreResult<()> {
    writes.sort_unstable_by_key(|(a, _)| *a);
    let mut i = 0;
    while i < writes.len() {
        let start = writes[i].0;
        let mut j = i + 1;
        while j < writes.len() && writes[j].0 == start + (j - i) as u64 && j - i < 256 {
            j += 1;
        }
        let bufs: Vec<&[u8]> = writes[i..j].iter().map(|(_, b)| b.bytes()).collect();
        dev.write_vectored_at(&bufs, start * BLOCK_SIZE_U64)?;
        i = j;
    }
    Ok(())
}
