//! Copy-on-write radix block maps: lookup, update, range fill, and taking trees apart.
//! FORMAT.md §4–5 describe the structure and the sharing rules.
//!
//! Levels count from the data up: a pointer at level 0 is a data block; a pointer at level
//! *l* ≥ 1 is a node covering `128^l` logical blocks; a VDI of radix height *h* has its root
//! pointer at level *h*.
//!
//! Lookups ([`resolve`], [`extents`]) only read nodes. Changes go through a [`Tx`]: the
//! caller holds the gate (shared), the VDI's lock and the space lock, so a change and the
//! refcounts it moves belong to one generation. Nothing here touches data blocks.

use std::sync::Arc;

use super::{
    device::Device,
    error::{StoreError, StoreResult},
    format::{Ptr, PtrKind, FANOUT, FANOUT_BITS},
    nodes::{retry_evicted, Lookup, Node, NodeTable, State, UNSET},
    orphans::Orphan,
    space::Space,
};
use crate::disk::ExtentState;

fn span(level: u8) -> u64 {
    1u64 << (FANOUT_BITS * level as u32)
}

fn child_index(lba: u64, level: u8) -> usize {
    ((lba >> (FANOUT_BITS * (level as u32 - 1))) & (FANOUT as u64 - 1)) as usize
}

/// Appends, for each of `count` logical blocks from `lba`, the pointer that maps it: a data
/// block, `Ptr::HOLE` or `Ptr::ZERO`. Nodes not in memory are read from the device.
pub(super) fn resolve(
    nodes: &NodeTable,
    dev: &dyn Device,
    root: Ptr,
    height: u8,
    lba: u64,
    count: u64,
    out: &mut Vec<Ptr>,
) -> StoreResult<()> {
    let at = out.len();
    retry_evicted(|| {
        out.truncate(at);
        resolve_rec(nodes, Some(dev), root, height, 0, lba, lba + count, out)
    })
    .map(|_| ())
}

/// Like [`resolve`], from nodes in memory only: `Ok(false)` if one is not (a lookup that
/// would have to wait for the device).
pub(super) fn resolve_cached(
    nodes: &NodeTable,
    root: Ptr,
    height: u8,
    lba: u64,
    count: u64,
    out: &mut Vec<Ptr>,
) -> StoreResult<bool> {
    let at = out.len();
    retry_evicted(|| {
        out.truncate(at);
        resolve_rec(nodes, None, root, height, 0, lba, lba + count, out)
    })
}

#[allow(clippy::too_many_arguments)]
fn resolve_rec(
    nodes: &NodeTable,
    dev: Option<&dyn Device>,
    p: Ptr,
    level: u8,
    base: u64,
    start: u64,
    end: u64,
    out: &mut Vec<Ptr>,
) -> StoreResult<bool> {
    let s = start.max(base);
    let e = end.min(base.saturating_add(span(level)));
    if e <= s {
        return Ok(true);
    }
    match p.kind()? {
        PtrKind::Hole => out.extend(std::iter::repeat_n(Ptr::HOLE, (e - s) as usize)),
        PtrKind::Zero => out.extend(std::iter::repeat_n(Ptr::ZERO, (e - s) as usize)),
        PtrKind::Block if level == 0 => out.push(p),
        PtrKind::Block => {
            let child_span = span(level - 1);
            let first = ((s - base) / child_span) as usize;
            let last = ((e - 1 - base) / child_span) as usize;
            let node = match (nodes.get(p), dev) {
                (Lookup::Hit(n), _) => n,
                (Lookup::Miss, Some(dev)) => nodes.load(dev, p)?,
                (Lookup::Miss, None) => return Ok(false),
            };
            if level == 1 {
                out.extend((first..=last).map(|i| node.get(i)));
                return Ok(true);
            }
            for i in first..=last {
                let cbase = base + i as u64 * child_span;
                if !resolve_rec(nodes, dev, node.get(i), level - 1, cbase, start, end, out)? {
                    return Ok(false);
                }
            }
        }
    }
    Ok(true)
}

/// Describes allocation of blocks `start..end`: runs of (blocks, state), at most `max` of
/// them, looking at no more than `budget` leaf entries (what was found so far is kept).
pub(super) struct Extents<'a> {
    pub nodes: &'a NodeTable,
    pub dev: &'a dyn Device,
    pub max: usize,
    pub budget: usize,
    pub out: Vec<(u64, ExtentState)>,
}

impl Extents<'_> {
    /// Walks the tree under `p`; returns true once it should stop.
    pub fn walk(
        &mut self,
        p: Ptr,
        level: u8,
        base: u64,
        start: u64,
        end: u64,
    ) -> StoreResult<bool> {
        let span = span(level);
        let s = start.max(base);
        let e = end.min(base.saturating_add(span));
        if e <= s {
            return Ok(false);
        }
        let state = match p.kind()? {
            PtrKind::Hole => ExtentState::Hole,
            PtrKind::Zero => ExtentState::Zero,
            PtrKind::Block if level == 0 => ExtentState::Data,
            PtrKind::Block => {
                let child_span = span >> FANOUT_BITS;
                let firsti = ((s - base) / child_span) as usize;
                let lasti = ((e - 1 - base) / child_span) as usize;
                let node = self.nodes.fetch(self.dev, p)?;
                for i in firsti..=lasti.min(FANOUT - 1) {
                    let cbase = base + i as u64 * child_span;
                    if self.walk(node.get(i), level - 1, cbase, start, end)? {
                        return Ok(true);
                    }
                }
                return Ok(false);
            }
        };
        if self.budget == 0 {
            return Ok(true);
        }
        self.budget -= 1;
        let full = self.out.len() >= self.max;
        match self.out.last_mut() {
            Some((n, st)) if *st == state => *n += e - s,
            _ if full => return Ok(true),
            _ => self.out.push((e - s, state)),
        }
        Ok(false)
    }
}

/// One change to the maps, under the locks that make it belong to generation `gen`.
pub(super) struct Tx<'a> {
    pub dev: &'a dyn Device,
    pub nodes: &'a NodeTable,
    pub space: &'a mut Space,
    /// The open generation.
    pub gen: u64,
}

impl Tx<'_> {
    /// A node the open generation created: in memory for sure.
    fn open_node(&self, addr: u64) -> StoreResult<Arc<Node>> {
        self.nodes.fetch(self.dev, Ptr::block(addr, UNSET))
    }

    /// `p` with its hash filled in if it points at a node a checkpoint has made clean.
    fn hashed(&self, p: Ptr) -> Ptr {
        if p.is_block() && p.hash == UNSET {
            if let Some(h) = self.nodes.clean_hash(p.addr()) {
                return Ptr::block(p.addr(), h);
            }
        }
        p
    }

    /// Makes the node `slot` points at (at `level` ≥ 1) changeable in the open generation
    /// and returns its address; `slot` is updated if the node moved.
    pub fn writable(&mut self, slot: &mut Ptr, level: u8) -> StoreResult<u64> {
        debug_assert!(level >= 1);
        match slot.kind()? {
            kind @ (PtrKind::Hole | PtrKind::Zero) => {
                let addr = self.space.alloc_meta(self.dev)?;
                let fill = if kind == PtrKind::Zero {
                    Ptr::ZERO
                } else {
                    Ptr::HOLE
                };
                self.nodes
                    .insert_dirty(addr, self.gen, level, Node::filled(fill));
                *slot = Ptr::block(addr, UNSET);
                Ok(addr)
            }
            PtrKind::Block => {
                let addr = slot.addr();
                let refs = self.space.rc.get(self.dev, addr)?;
                if refs == 1 && self.nodes.state(addr, self.gen) == State::Open {
                    return Ok(addr);
                }
                let mut copy = (*self.nodes.fetch(self.dev, *slot)?).clone();
                if level >= 2 {
                    for i in 0..FANOUT {
                        let c = copy.get(i);
                        let h = self.hashed(c);
                        if h != c {
                            copy.set(i, h);
                        }
                    }
                }
                let new = self.space.alloc_meta(self.dev)?;
                if refs == 1 {
                    // Shadow: the copy takes over the old node's references.
                    self.space.rc.decr(self.dev, addr)?;
                    self.nodes.forget(addr, self.gen);
                } else {
                    // Clone: the copy adds a reference to every child.
                    let children = copy.entries().filter(|e| e.is_block()).map(|e| e.addr());
                    self.space.rc.incr_all(self.dev, children)?;
                    self.space.rc.decr(self.dev, addr)?;
                }
                self.nodes.insert_dirty(new, self.gen, level, copy);
                *slot = Ptr::block(new, UNSET);
                Ok(new)
            }
        }
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
            let mut child = self.open_node(addr)?.get(idx);
            let caddr = self.writable(&mut child, level - 1)?;
            self.nodes.modify(addr, |n| n.set(idx, child));
            addr = caddr;
        }
        let first = (lba % FANOUT as u64) as usize;
        let n = new.len().min(FANOUT - first);
        self.nodes.modify(addr, |leaf| {
            for (k, p) in new[..n].iter().enumerate() {
                old.push(leaf.get(first + k));
                leaf.set(first + k, *p);
            }
        });
        Ok(n)
    }

    /// Drops one reference held by a pointer at `level`: data blocks are freed at zero; a node
    /// whose last reference this is moves to the orphan list (nodes in memory are taken apart
    /// at once).
    pub fn drop_ref(&mut self, p: Ptr, level: u8) -> StoreResult<()> {
        if !p.is_block() {
            return Ok(());
        }
        let addr = p.addr();
        if level == 0 {
            if self.space.rc.decr(self.dev, addr)? == 0 {
                self.space.dedup.freed(p.hash, addr);
            }
            return Ok(());
        }
        if self.space.rc.get(self.dev, addr)? > 1 {
            self.space.rc.decr(self.dev, addr)?;
            return Ok(());
        }
        let orphan = Orphan {
            ptr: self.hashed(p),
            level,
        };
        if self.nodes.state(addr, self.gen) != State::Clean {
            self.take_apart(orphan)
        } else if orphan.ptr.hash == UNSET {
            Err(StoreError::Corrupt(format!(
                "map node {addr} lost its checksum before it was freed (a bug)"
            )))
        } else {
            self.space.orphans.list.push(orphan);
            self.space.orphans.changed = true;
            Ok(())
        }
    }

    /// Takes an orphan apart: drops its children's references, frees the node.
    fn take_apart(&mut self, o: Orphan) -> StoreResult<()> {
        let node = self.nodes.fetch(self.dev, o.ptr)?;
        for c in node.entries() {
            self.drop_ref(c, o.level - 1)?;
        }
        self.space.rc.decr(self.dev, o.ptr.addr())?;
        self.nodes.forget(o.ptr.addr(), self.gen);
        Ok(())
    }

    /// Processes up to `budget` orphans; returns how many. An orphan that cannot be read is
    /// dropped from the list with an error: its blocks stay allocated (`check` reports them as
    /// leaked) rather than failing every later checkpoint over garbage.
    pub fn process_orphans(&mut self, budget: usize) -> StoreResult<usize> {
        let mut done = 0;
        while done < budget {
            let Some(o) = self.space.orphans.list.pop() else {
                break;
            };
            self.space.orphans.changed = true;
            if let Err(e) = self.nodes.fetch(self.dev, o.ptr) {
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
            let mut c = self.open_node(addr)?.get(i);
            self.fill_rec(
                &mut c,
                level - 1,
                base + i as u64 * child_span,
                start,
                end,
                fill,
            )?;
            self.nodes.modify(addr, |n| n.set(i, c));
        }
        // A node that became all `fill` is dropped in favour of a `fill` pointer.
        if self.open_node(addr)?.entries().all(|p| p == fill) {
            let old = *slot;
            *slot = fill;
            self.drop_ref(old, level)?;
        }
        Ok(())
    }
}
