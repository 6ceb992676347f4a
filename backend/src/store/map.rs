//! Copy-on-write radix block maps: lookup, update, range fill, and the bottom-up finalisation a
//! commit needs. FORMAT.md §4–5 describe the structure and the sharing rules.
//!
//! Levels count from the data up: a pointer at level 0 is a data block; a pointer at level
//! *l* ≥ 1 is a node covering `128^l` logical blocks; a VDI of radix height *h* has its root
//! pointer at level *h*.
//!
//! Every function here works on [`Meta`], the store's metadata under its lock, and does no data
//! I/O: callers look up, then read or write data blocks without the lock.

use std::{collections::HashMap, sync::Arc};

use super::{
    engine::Meta,
    error::{StoreError, StoreResult},
    format::{hash24, Hash24, Ptr, PtrKind, FANOUT, FANOUT_BITS},
    node::Node,
};

/// A node whose last reference moved to the orphan list (FORMAT.md §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Orphan {
    pub ptr: Ptr,
    /// The node's level (≥ 1).
    pub level: u8,
}

fn span(level: u8) -> u64 {
    1u64 << (FANOUT_BITS * level as u32)
}

fn child_index(lba: u64, level: u8) -> usize {
    ((lba >> (FANOUT_BITS * (level as u32 - 1))) & (FANOUT as u64 - 1)) as usize
}

impl Meta {
    /// Allocates one block for metadata (may dig into the reserve kept for commits).
    pub fn alloc_meta(&mut self) -> StoreResult<u64> {
        let dev = &*self.dev;
        match self.rc.alloc(dev, &mut self.meta_cursor, 1, 0)? {
            Some((addr, _)) => Ok(addr),
            None => Err(StoreError::NoSpace),
        }
    }

    /// Makes the node `slot` points at (at `level` ≥ 1) writable in the open transaction and
    /// returns its address; `slot` is updated if the node moved.
    pub fn writable(&mut self, slot: &mut Ptr, level: u8) -> StoreResult<u64> {
        debug_assert!(level >= 1);
        match slot.kind()? {
            kind @ (PtrKind::Hole | PtrKind::Zero) => {
                let addr = self.alloc_meta()?;
                let fill = if kind == PtrKind::Zero {
                    Ptr::ZERO
                } else {
                    Ptr::HOLE
                };
                self.nodes.dirty.insert(addr, Node::filled(fill));
                *slot = Ptr::block(addr, [0; 24]);
                Ok(addr)
            }
            PtrKind::Block => {
                let addr = slot.addr();
                let refs = self.rc.get(&*self.dev, addr)?;
                if refs == 1 && self.nodes.is_dirty(addr) {
                    return Ok(addr);
                }
                let copy = self.nodes.copy(&*self.dev, *slot)?;
                let new = self.alloc_meta()?;
                if refs == 1 {
                    // Shadow: the copy takes over the old node's references.
                    self.rc.decr(&*self.dev, addr)?;
                    self.nodes.forget(addr);
                } else {
                    // Clone: the copy adds a reference to every child.
                    for e in copy.entries() {
                        if e.is_block() {
                            self.rc.incr(&*self.dev, e.addr())?;
                        }
                    }
                    self.rc.decr(&*self.dev, addr)?;
                }
                self.nodes.dirty.insert(new, copy);
                *slot = slot.with_addr(new);
                Ok(new)
            }
        }
    }

    /// Appends, for each of `count` logical blocks from `lba`, the pointer that maps it: a
    /// data block, `Ptr::HOLE` or `Ptr::ZERO`.
    pub fn resolve(
        &mut self,
        root: Ptr,
        height: u8,
        lba: u64,
        count: u64,
        out: &mut Vec<Ptr>,
    ) -> StoreResult<()> {
        self.resolve_rec(root, height, 0, lba, lba + count, out)
    }

    fn resolve_rec(
        &mut self,
        p: Ptr,
        level: u8,
        base: u64,
        start: u64,
        end: u64,
        out: &mut Vec<Ptr>,
    ) -> StoreResult<()> {
        let s = start.max(base);
        let e = end.min(base.saturating_add(span(level)));
        if e <= s {
            return Ok(());
        }
        match p.kind()? {
            PtrKind::Hole => out.extend(std::iter::repeat_n(Ptr::HOLE, (e - s) as usize)),
            PtrKind::Zero => out.extend(std::iter::repeat_n(Ptr::ZERO, (e - s) as usize)),
            PtrKind::Block if level == 0 => out.push(p),
            PtrKind::Block => {
                let child_span = span(level - 1);
                let first = ((s - base) / child_span) as usize;
                let last = ((e - 1 - base) / child_span) as usize;
                let node = self.nodes.get(&*self.dev, p)?;
                if level == 1 {
                    out.extend((first..=last).map(|i| node.get(i)));
                    return Ok(());
                }
                let children: Vec<Ptr> = (first..=last).map(|i| node.get(i)).collect();
                for (k, c) in children.into_iter().enumerate() {
                    let cbase = base + (first + k) as u64 * child_span;
                    self.resolve_rec(c, level - 1, cbase, start, end, out)?;
                }
            }
        }
        Ok(())
    }

    /// Points logical blocks `lba..` at `new` — as many as fit in the leaf holding `lba` — and
    /// returns how many were set. The pointers replaced are appended to `old`; the caller drops
    /// their references.
    pub fn set_run(
        &mut self,
        root: &mut Ptr,
        height: u8,
        lba: u64,
        new: &[Ptr],
        old: &mut Vec<Ptr>,
    ) -> StoreResult<usize> {
        let mut addr = self.writable(root, height)?;
        for level in (2..=height).rev() {
            let idx = child_index(lba, level);
            let mut child = self.nodes.dirty[&addr].get(idx);
            let caddr = self.writable(&mut child, level - 1)?;
            self.nodes
                .dirty
                .get_mut(&addr)
                .expect("dirty parent")
                .set(idx, child);
            addr = caddr;
        }
        let first = (lba % FANOUT as u64) as usize;
        let n = new.len().min(FANOUT - first);
        let leaf = self.nodes.dirty.get_mut(&addr).expect("dirty leaf");
        for (k, p) in new[..n].iter().enumerate() {
            old.push(leaf.get(first + k));
            leaf.set(first + k, *p);
        }
        Ok(n)
    }

    /// Drops one reference held by a pointer at `level`: data blocks are freed at zero; a node
    /// whose last reference this is moves to the orphan list (dirty ones are taken apart at
    /// once, since they are in memory).
    pub fn drop_ref(&mut self, p: Ptr, level: u8) -> StoreResult<()> {
        if !p.is_block() {
            return Ok(());
        }
        let addr = p.addr();
        if level == 0 {
            self.rc.decr(&*self.dev, addr)?;
            return Ok(());
        }
        if self.rc.get(&*self.dev, addr)? > 1 {
            self.rc.decr(&*self.dev, addr)?;
            return Ok(());
        }
        let orphan = Orphan { ptr: p, level };
        if self.nodes.is_dirty(addr) {
            self.take_apart(orphan)
        } else {
            self.orphans.push(orphan);
            self.orphans_changed = true;
            Ok(())
        }
    }

    /// Takes an orphan apart: drops its children's references, frees the node.
    fn take_apart(&mut self, o: Orphan) -> StoreResult<()> {
        let children: Vec<Ptr> = self.nodes.get(&*self.dev, o.ptr)?.entries().collect();
        for c in children {
            self.drop_ref(c, o.level - 1)?;
        }
        self.rc.decr(&*self.dev, o.ptr.addr())?;
        self.nodes.forget(o.ptr.addr());
        Ok(())
    }

    /// Processes up to `budget` orphans; returns how many. An orphan that cannot be read is
    /// dropped from the list with an error: its blocks stay allocated (`check` reports them as
    /// leaked) rather than failing every later commit over garbage.
    pub fn process_orphans(&mut self, budget: usize) -> StoreResult<usize> {
        let mut done = 0;
        while done < budget {
            let Some(o) = self.orphans.pop() else { break };
            self.orphans_changed = true;
            if let Err(e) = self.nodes.get(&*self.dev, o.ptr) {
                tracing::error!(
                    "orphan map node at block {} is unreadable ({e}); leaving its blocks allocated",
                    o.ptr.addr()
                );
                continue;
            }
            self.take_apart(o)?;
            done += 1;
        }
        Ok(done)
    }

    /// Makes logical blocks `start..end` all `fill` (`Ptr::HOLE` or `Ptr::ZERO`), dropping
    /// whole subtrees where the range covers them.
    pub fn fill_range(
        &mut self,
        root: &mut Ptr,
        height: u8,
        start: u64,
        end: u64,
        fill: Ptr,
    ) -> StoreResult<()> {
        self.fill_rec(root, height, 0, start, end, fill)
    }

    fn fill_rec(
        &mut self,
        slot: &mut Ptr,
        level: u8,
        base: u64,
        start: u64,
        end: u64,
        fill: Ptr,
    ) -> StoreResult<()> {
        let sp = span(level);
        if end <= start.max(base) || base.saturating_add(sp) <= start {
            return Ok(());
        }
        if start <= base && base + sp <= end {
            if *slot != fill {
                let old = *slot;
                *slot = fill;
                self.drop_ref(old, level)?;
            }
            return Ok(());
        }
        if *slot == fill {
            return Ok(());
        }
        let addr = self.writable(slot, level)?;
        let child_span = span(level - 1);
        let s = start.max(base);
        let e = end.min(base + sp);
        let first = ((s - base) / child_span) as usize;
        let last = ((e - 1 - base) / child_span) as usize;
        for i in first..=last {
            let mut c = self.nodes.dirty[&addr].get(i);
            self.fill_rec(
                &mut c,
                level - 1,
                base + i as u64 * child_span,
                start,
                end,
                fill,
            )?;
            self.nodes
                .dirty
                .get_mut(&addr)
                .expect("dirty node")
                .set(i, c);
        }
        // A node that became all `fill` is dropped in favour of a `fill` pointer.
        if self.nodes.dirty[&addr].entries().all(|p| p == fill) {
            let old = *slot;
            *slot = fill;
            self.drop_ref(old, level)?;
        }
        Ok(())
    }

    /// Hashes the dirty nodes reachable from `slot` bottom-up, fixing the hashes in their
    /// parents and in `slot`, and moves them to `out` (to be written) and the clean cache.
    pub fn finalize(
        &mut self,
        slot: &mut Ptr,
        level: u8,
        out: &mut Vec<(u64, Arc<Node>)>,
        done: &mut HashMap<u64, Hash24>,
    ) {
        if level == 0 || !slot.is_block() {
            return;
        }
        let addr = slot.addr();
        if let Some(h) = done.get(&addr) {
            slot.hash = *h;
            return;
        }
        let Some(mut node) = self.nodes.dirty.remove(&addr) else {
            return;
        };
        if level >= 2 {
            for i in 0..FANOUT {
                let mut c = node.get(i);
                if c.is_block() && (self.nodes.is_dirty(c.addr()) || done.contains_key(&c.addr())) {
                    self.finalize(&mut c, level - 1, out, done);
                    node.set(i, c);
                }
            }
        }
        let h = hash24(&node.0);
        slot.hash = h;
        done.insert(addr, h);
        let arc: Arc<Node> = Arc::from(node);
        self.nodes.insert_clean(addr, h, arc.clone());
        out.push((addr, arc));
    }
}
