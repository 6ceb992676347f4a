//! Reference counts of every data block, and the allocator that hands out blocks whose count
//! is zero.
//!
//! ```text
//!  RcTable ─ groups[g] ─ header selector (which copy of the group header is current)
//!                      ─ pages[p]: refcounts of 1008 blocks (loaded on first use)
//!                                  + "held" bits: freed and not yet reusable, or reserved
//!                      ─ page selectors, free counts per page (from the group header)
//! ```
//!
//! A block is allocatable when its count is 0 and it is not *held*. Freeing (count → 0) holds
//! the block until the checkpoint that freed it is durable and no reader from before it is
//! still running ([`RcTable::release`]); see FORMAT.md §8. Writers *reserve* blocks (held,
//! count 0) for data they are about to write and *claim* them (count 1) when the map points at
//! them, so that a checkpoint never counts a block that no tree references.
//!
//! A checkpoint *cuts* the open generation ([`RcTable::cut`]): from then on the pages and group
//! headers changed in the cut generation are that checkpoint's to encode
//! ([`RcTable::take_images`]). The next generation may change them meanwhile: the first
//! change of a page the checkpoint has not encoded yet saves the cut generation's counts
//! first (copy on write), so the checkpoint always encodes exactly what was true at the cut.
//! The new selectors are adopted once the checkpoint is durable ([`RcTable::commit_done`]).

use super::{
    device::Device,
    error::{StoreError, StoreResult},
    format::{
        decode_rc_page, encode_rc_page, rc_page_index, Geometry, GroupHeader, Selector, BLOCK_SIZE,
        BLOCK_SIZE_U64, GROUP_DATA_BLOCKS, RC_PER_PAGE,
    },
};

const WORDS: usize = (RC_PER_PAGE as usize).div_ceil(64);
type Counts = [u32; RC_PER_PAGE as usize];

struct RcPage {
    rc: Box<Counts>,
    held: [u64; WORDS],
    held_count: u32,
    /// Changed in the open generation.
    dirty: bool,
    /// Changed in the cut generation and not yet encoded by its checkpoint.
    pending: bool,
    /// The cut generation's counts, saved when the open generation first changed the page.
    frozen: Option<Box<Counts>>,
}

impl RcPage {
    fn empty() -> RcPage {
        RcPage {
            rc: Box::new([0; RC_PER_PAGE as usize]),
            held: [0; WORDS],
            held_count: 0,
            dirty: false,
            pending: false,
            frozen: None,
        }
    }

    fn is_held(&self, i: usize) -> bool {
        self.held[i / 64] & (1 << (i % 64)) != 0
    }

    fn set_held(&mut self, i: usize, on: bool) {
        if on {
            self.held[i / 64] |= 1 << (i % 64);
            self.held_count += 1;
        } else {
            self.held[i / 64] &= !(1 << (i % 64));
            self.held_count -= 1;
        }
    }

    fn free_at(&self, i: usize) -> bool {
        self.rc[i] == 0 && !self.is_held(i)
    }

    /// About to change counts in the open generation.
    fn touch(&mut self) {
        if self.pending && self.frozen.is_none() {
            self.frozen = Some(self.rc.clone());
        }
        self.dirty = true;
    }
}

struct GroupState {
    header_sel: Selector,
    page_sel: Vec<Selector>,
    /// Bumped each time a checkpoint moves a page to its other copy: a page read without
    /// the lock is installed only if its copy did not move meanwhile.
    page_moves: Vec<u32>,
    page_free: Vec<u16>,
    pages: Vec<Option<RcPage>>,
    dirty: bool,
    pending: bool,
    frozen_free: Option<Vec<u16>>,
}

impl GroupState {
    /// About to change the group (its free counts, or a page whose selector the header holds).
    fn touch(&mut self) {
        if self.pending && self.frozen_free.is_none() {
            self.frozen_free = Some(self.page_free.clone());
        }
        self.dirty = true;
    }
}

/// A page to read from the device because it is not in memory: (group, page, address; 0 for
/// a page never written; the page's move count when the address was taken).
pub(super) type PageRead = (usize, usize, u64, u32);

/// What a checkpoint writes for the refcounts, and the selectors it switches to once durable.
pub(super) struct RcImages {
    /// Pages: (address, global page index, the cut generation's counts).
    pages: Vec<(u64, u64, Box<Counts>)>,
    /// Group headers: (address, group, header).
    headers: Vec<(u64, u64, GroupHeader)>,
    pub group_selectors: Vec<Selector>,
    new_page_sels: Vec<(usize, usize, Selector)>,
    new_group_sels: Vec<(usize, Selector)>,
}

impl RcImages {
    /// Encodes every block for generation `gen`, as (address, block).
    pub fn encode(&self, gen: u64) -> Vec<(u64, Box<[u8; BLOCK_SIZE]>)> {
        let mut out = Vec::with_capacity(self.pages.len() + self.headers.len());
        for (addr, index, counts) in &self.pages {
            out.push((*addr, encode_rc_page(&counts[..], gen, *addr, *index)));
        }
        for (addr, g, header) in &self.headers {
            out.push((*addr, header.encode(gen, *addr, *g)));
        }
        out
    }
}

/// What the cut of one generation fixed: the allocated count and the blocks it freed.
pub(super) struct RcCut {
    pub allocated: u64,
    pub freed: Vec<u64>,
}

/// An allocation cursor: where the next allocation for one stream (a VDI's data, metadata)
/// looks first, so that a stream's blocks end up next to each other.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cursor(Option<u64>);

/// Blocks one cursor claims at a time before others are steered elsewhere.
const EXTENT_BLOCKS: u64 = 256;

pub struct RcTable {
    geo: Geometry,
    groups: Vec<GroupState>,
    /// Blocks with a count above zero.
    allocated: u64,
    /// Blocks held (freed but not yet reusable, or reserved).
    held: u64,
    /// Of those, freed ones (the rest are reserved).
    freed_held: u64,
    /// Freed in the open generation.
    freed: Vec<u64>,
    /// Where fresh extents start: data-block ordinal (group-major), wraps around. Released
    /// blocks pull it back, so that blocks already written once (backed by the file system)
    /// are reused before never-written ones.
    rotor: u64,
    /// How many times freed blocks were made allocatable again ([`RcTable::releases`]).
    releases: u64,
}

impl RcTable {
    /// Builds the table from the committed group selectors, reading the group headers.
    pub fn open(
        dev: &dyn Device,
        geo: Geometry,
        group_sels: &[Selector],
        gen: u64,
    ) -> StoreResult<RcTable> {
        let mut groups = Vec::with_capacity(geo.groups as usize);
        let mut free_total = 0u64;
        for g in 0..geo.groups {
            let sel = group_sels[g as usize];
            let header = if sel.written {
                let addr = geo.group_header_addr(g, sel.copy);
                let mut b = [0u8; BLOCK_SIZE];
                dev.read_at(&mut b, addr * BLOCK_SIZE_U64)?;
                let h = GroupHeader::decode(&b, addr, &geo, g)?;
                let f = super::format::open_frame(&b, super::format::magic::GROUP, addr)?;
                if f.gen > gen {
                    return Err(StoreError::Corrupt(format!(
                        "group {g} header is from generation {}, newer than the commit ({gen})",
                        f.gen
                    )));
                }
                h
            } else {
                GroupHeader::empty(&geo, g)
            };
            free_total += header.free as u64;
            let pages = geo.group_pages(g) as usize;
            groups.push(GroupState {
                header_sel: sel,
                page_moves: vec![0; header.page_selectors.len()],
                page_sel: header.page_selectors,
                page_free: header.page_free,
                pages: (0..pages).map(|_| None).collect(),
                dirty: false,
                pending: false,
                frozen_free: None,
            });
        }
        let allocated = geo.data_blocks() - free_total;
        Ok(RcTable {
            geo,
            groups,
            allocated,
            held: 0,
            freed_held: 0,
            freed: Vec::new(),
            rotor: 0,
            releases: 0,
        })
    }

    #[cfg(test)]
    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }

    /// Blocks with a count above zero.
    pub fn allocated(&self) -> u64 {
        self.allocated
    }

    /// Blocks that can be allocated now.
    pub fn free(&self) -> u64 {
        self.geo.data_blocks() - self.allocated - self.held
    }

    /// Blocks freed and waiting for the checkpoint that makes them reusable.
    pub fn pending(&self) -> u64 {
        self.freed_held
    }

    /// Blocks reserved for writes about to happen (writers' batches, the log's next blocks).
    pub fn reserved(&self) -> u64 {
        self.held - self.freed_held
    }

    /// Blocks freed since the last cut (reusable after the next checkpoint).
    pub fn freed_since_cut(&self) -> usize {
        self.freed.len()
    }

    fn locate(&self, addr: u64) -> StoreResult<(usize, usize, usize)> {
        self.geo
            .locate(addr)
            .map(|(g, p, i)| (g as usize, p as usize, i))
            .ok_or_else(|| StoreError::Corrupt(format!("block {addr} is not a data block")))
    }

    /// Of the pages holding the counts of `addrs`, those not in memory, with the address to
    /// read each from: the caller reads them without holding the table's lock and
    /// [`RcTable::install`]s them.
    pub fn missing(&self, addrs: impl IntoIterator<Item = u64>) -> Vec<PageRead> {
        let mut out: Vec<PageRead> = Vec::new();
        for addr in addrs {
            let Ok((g, p, _)) = self.locate(addr) else {
                continue;
            };
            let gs = &self.groups[g];
            if gs.pages[p].is_some() || out.iter().any(|&(og, op, ..)| (og, op) == (g, p)) {
                continue;
            }
            let sel = gs.page_sel[p];
            let at = if sel.written {
                self.geo.rc_page_addr(g as u64, p as u64, sel.copy)
            } else {
                0
            };
            out.push((g, p, at, gs.page_moves[p]));
        }
        out
    }

    /// Reads one page listed by [`RcTable::missing`] (no lock needed).
    pub fn read_page(dev: &dyn Device, (g, p, addr, _): PageRead) -> StoreResult<Box<Counts>> {
        let mut counts = Box::new([0u32; RC_PER_PAGE as usize]);
        if addr != 0 {
            let mut b = [0u8; BLOCK_SIZE];
            dev.read_at(&mut b, addr * BLOCK_SIZE_U64)?;
            decode_rc_page(&b, addr, rc_page_index(g as u64, p as u64), &mut counts[..])?;
        }
        Ok(counts)
    }

    /// Installs a page read by [`RcTable::read_page`], unless it was loaded meanwhile, or
    /// a checkpoint moved it to its other copy since its address was taken (then what was
    /// read may be stale: it is dropped, and the page is read again when it is needed).
    pub fn install(&mut self, (g, p, _, moves): PageRead, counts: Box<Counts>) -> StoreResult<()> {
        if self.groups[g].pages[p].is_some() || self.groups[g].page_moves[p] != moves {
            return Ok(());
        }
        let n = self.geo.page_blocks(g as u64, p as u64);
        let free = counts[..n].iter().filter(|&&c| c == 0).count();
        if free != self.groups[g].page_free[p] as usize || counts[n..].iter().any(|&c| c != 0) {
            return Err(StoreError::Corrupt(format!(
                "refcount page {p} of group {g}: {free} free blocks, its header says {}",
                self.groups[g].page_free[p]
            )));
        }
        let mut page = RcPage::empty();
        page.rc = counts;
        self.groups[g].pages[p] = Some(page);
        Ok(())
    }

    /// The page, loaded from the device under the lock if it was not in memory (callers
    /// that can, load pages beforehand with [`RcTable::missing`]).
    fn page(&mut self, dev: &dyn Device, g: usize, p: usize) -> StoreResult<&mut RcPage> {
        if self.groups[g].pages[p].is_none() {
            for r in self.missing([self.geo.data_addr(g as u64, p as u64, 0)]) {
                let counts = Self::read_page(dev, r)?;
                self.install(r, counts)?;
            }
        }
        Ok(self.groups[g].pages[p].as_mut().expect("just loaded"))
    }

    /// The count of block `addr`.
    pub fn get(&mut self, dev: &dyn Device, addr: u64) -> StoreResult<u32> {
        let (g, p, i) = self.locate(addr)?;
        Ok(self.page(dev, g, p)?.rc[i])
    }

    /// Adds a reference to `addr` (which must already be referenced).
    pub fn incr(&mut self, dev: &dyn Device, addr: u64) -> StoreResult<()> {
        self.incr_all(dev, std::iter::once(addr))
    }

    /// Adds a reference to each of `addrs` (a cloned node's children): like [`RcTable::incr`]
    /// for each, finding each refcount page once for a run of addresses on it.
    pub fn incr_all(
        &mut self,
        dev: &dyn Device,
        addrs: impl IntoIterator<Item = u64>,
    ) -> StoreResult<()> {
        let mut cur: Option<(usize, usize)> = None;
        for addr in addrs {
            let (g, p, i) = self.locate(addr)?;
            if cur != Some((g, p)) {
                self.groups[g].touch();
                self.page(dev, g, p)?.touch();
                cur = Some((g, p));
            }
            let page = self.groups[g].pages[p].as_mut().expect("loaded above");
            match page.rc[i] {
                0 => {
                    return Err(StoreError::Corrupt(format!(
                        "adding a reference to free block {addr}"
                    )))
                }
                u32::MAX => {
                    return Err(StoreError::Corrupt(format!(
                        "refcount of block {addr} overflows"
                    )))
                }
                _ => page.rc[i] += 1,
            }
        }
        Ok(())
    }

    /// Drops a reference to `addr`; returns the new count. At zero the block is held until
    /// the checkpoint of the open generation is durable.
    pub fn decr(&mut self, dev: &dyn Device, addr: u64) -> StoreResult<u32> {
        let (g, p, i) = self.locate(addr)?;
        let page = self.page(dev, g, p)?;
        if page.rc[i] == 0 {
            return Err(StoreError::Corrupt(format!(
                "dropping a reference to free block {addr}"
            )));
        }
        page.touch();
        page.rc[i] -= 1;
        let now = page.rc[i];
        if now == 0 {
            page.set_held(i, true);
        }
        // Any change of a page changes its group's header (the page's selector).
        self.groups[g].touch();
        if now == 0 {
            self.groups[g].page_free[p] += 1;
            self.allocated -= 1;
            self.held += 1;
            self.freed_held += 1;
            self.freed.push(addr);
        }
        Ok(now)
    }

    /// Allocates up to `want` contiguous blocks, looking first where `cursor` points. Returns
    /// the first block and how many were taken (at least 1), each with count 1; `None` if no
    /// block is free beyond `keep_free`.
    pub fn alloc(
        &mut self,
        dev: &dyn Device,
        cursor: &mut Cursor,
        want: u64,
        keep_free: u64,
    ) -> StoreResult<Option<(u64, u64)>> {
        self.find(dev, cursor, want, keep_free, false)
    }

    /// Like [`RcTable::alloc`], but the blocks are only reserved: they stay free in anything
    /// checkpointed until [`RcTable::claim`]ed (or are given back with [`RcTable::unreserve`]).
    /// Data is written into reserved blocks before the map points at them.
    pub fn reserve(
        &mut self,
        dev: &dyn Device,
        cursor: &mut Cursor,
        want: u64,
        keep_free: u64,
    ) -> StoreResult<Option<(u64, u64)>> {
        self.find(dev, cursor, want, keep_free, true)
    }

    fn find(
        &mut self,
        dev: &dyn Device,
        cursor: &mut Cursor,
        want: u64,
        keep_free: u64,
        reserve: bool,
    ) -> StoreResult<Option<(u64, u64)>> {
        if self.free() <= keep_free || want == 0 {
            return Ok(None);
        }
        let want = want.min(self.free() - keep_free);
        let total = self.geo.data_blocks();
        // Try the cursor's own position first, then fresh extents from the rotor.
        if let Some(pos) = cursor.0 {
            if let Some(run) = self.take_run_at(dev, pos, want, reserve)? {
                cursor.0 = Some((self.ordinal(run.0) + run.1) % total);
                return Ok(Some(run));
            }
        }
        let start = self.rotor;
        let mut ord = start;
        let mut scanned = 0u64;
        while scanned < total {
            let (g, p, _) = self.ordinal_parts(ord);
            let page_start = ord - (ord % RC_PER_PAGE);
            let in_page = self.geo.page_blocks(g as u64, p as u64) as u64;
            if self.groups[g].page_free[p] as usize
                > self.groups[g].pages[p]
                    .as_ref()
                    .map_or(0, |pg| pg.held_count as usize)
            {
                let page = self.page(dev, g, p)?;
                let from = (ord - page_start) as usize;
                if let Some(i) = (from..in_page as usize).find(|&i| page.free_at(i)) {
                    let first = page_start + i as u64;
                    let run = self
                        .take_run_at(dev, first, want, reserve)?
                        .expect("block is free");
                    let end = self.ordinal(run.0) + run.1;
                    cursor.0 = Some(end % total);
                    self.rotor =
                        (end.div_ceil(EXTENT_BLOCKS) * EXTENT_BLOCKS + EXTENT_BLOCKS) % total;
                    return Ok(Some(run));
                }
            }
            scanned += in_page - (ord - page_start);
            ord = page_start + in_page;
            if ord >= total {
                ord = 0;
            }
        }
        Ok(None)
    }

    /// Ordinal (0-based over all data blocks, group-major) of a data block address.
    fn ordinal(&self, addr: u64) -> u64 {
        let (g, p, i) = self.geo.locate(addr).expect("a data block");
        g * GROUP_DATA_BLOCKS + p * RC_PER_PAGE + i as u64
    }

    fn ordinal_parts(&self, ord: u64) -> (usize, usize, usize) {
        let g = ord / GROUP_DATA_BLOCKS;
        let within = ord % GROUP_DATA_BLOCKS;
        (
            g as usize,
            (within / RC_PER_PAGE) as usize,
            (within % RC_PER_PAGE) as usize,
        )
    }

    /// Takes a run of free blocks starting exactly at ordinal `ord` (up to `want`, within one
    /// page), or `None` if that block is not free. With `reserve` the blocks are only held
    /// (count stays 0) until [`RcTable::claim`]; otherwise they get count 1 at once.
    fn take_run_at(
        &mut self,
        dev: &dyn Device,
        ord: u64,
        want: u64,
        reserve: bool,
    ) -> StoreResult<Option<(u64, u64)>> {
        if ord >= self.geo.data_blocks() {
            return Ok(None);
        }
        let (g, p, i) = self.ordinal_parts(ord);
        let in_page = self.geo.page_blocks(g as u64, p as u64);
        let page = self.page(dev, g, p)?;
        let mut n = 0usize;
        while n < want as usize && i + n < in_page && page.free_at(i + n) {
            n += 1;
        }
        if n == 0 {
            return Ok(None);
        }
        if reserve {
            for k in i..i + n {
                page.set_held(k, true);
            }
            self.held += n as u64;
        } else {
            page.touch();
            page.rc[i..i + n].fill(1);
            self.groups[g].touch();
            self.groups[g].page_free[p] -= n as u16;
            self.allocated += n as u64;
        }
        Ok(Some((self.geo.data_addr(g as u64, p as u64, i), n as u64)))
    }

    /// Reserves the block at `addr` (recovery: blocks the log names). `false` if it is not
    /// free.
    pub fn reserve_at(&mut self, dev: &dyn Device, addr: u64) -> StoreResult<bool> {
        let (g, p, i) = self.locate(addr)?;
        let page = self.page(dev, g, p)?;
        if !page.free_at(i) {
            return Ok(false);
        }
        page.set_held(i, true);
        self.held += 1;
        Ok(true)
    }

    /// A reserved block is now referenced: count 1.
    pub fn claim(&mut self, dev: &dyn Device, addr: u64) -> StoreResult<()> {
        let (g, p, i) = self.locate(addr)?;
        let page = self.page(dev, g, p)?;
        if page.rc[i] != 0 || !page.is_held(i) {
            return Err(StoreError::Corrupt(format!(
                "claiming block {addr}, which was not reserved"
            )));
        }
        page.touch();
        page.set_held(i, false);
        page.rc[i] = 1;
        self.held -= 1;
        self.allocated += 1;
        self.groups[g].touch();
        self.groups[g].page_free[p] -= 1;
        Ok(())
    }

    /// Gives back a reserved block that was not used.
    pub fn unreserve(&mut self, dev: &dyn Device, addr: u64) -> StoreResult<()> {
        let (g, p, i) = self.locate(addr)?;
        let page = self.page(dev, g, p)?;
        if page.rc[i] == 0 && page.is_held(i) {
            page.set_held(i, false);
            self.held -= 1;
        }
        Ok(())
    }

    /// Cuts the open generation: what changed so far belongs to the checkpoint that cuts.
    pub fn cut(&mut self) -> RcCut {
        for gs in self.groups.iter_mut().filter(|g| g.dirty) {
            debug_assert!(
                !gs.pending,
                "a checkpoint cut before the last one was encoded"
            );
            gs.dirty = false;
            gs.pending = true;
            for page in gs.pages.iter_mut().flatten().filter(|p| p.dirty) {
                page.dirty = false;
                page.pending = true;
            }
        }
        RcCut {
            allocated: self.allocated,
            freed: std::mem::take(&mut self.freed),
        }
    }

    /// The cut generation's pages and group headers (each written to the copy its selector
    /// does not point at), and the group selectors of the checkpoint's commit record. Called
    /// once per cut.
    pub fn take_images(&mut self) -> RcImages {
        let mut pages = Vec::new();
        let mut headers = Vec::new();
        let mut new_page_sels = Vec::new();
        let mut new_group_sels = Vec::new();
        let mut group_selectors: Vec<Selector> = self.groups.iter().map(|g| g.header_sel).collect();
        for (g, gs) in self.groups.iter_mut().enumerate() {
            if !gs.pending {
                continue;
            }
            gs.pending = false;
            let mut page_sels = gs.page_sel.clone();
            for (p, page) in gs.pages.iter_mut().enumerate() {
                let Some(page) = page.as_mut().filter(|pg| pg.pending) else {
                    continue;
                };
                page.pending = false;
                let counts = page.frozen.take().unwrap_or_else(|| page.rc.clone());
                let sel = gs.page_sel[p].next();
                let addr = self.geo.rc_page_addr(g as u64, p as u64, sel.copy);
                pages.push((addr, rc_page_index(g as u64, p as u64), counts));
                page_sels[p] = sel;
                new_page_sels.push((g, p, sel));
            }
            let page_free = gs
                .frozen_free
                .take()
                .unwrap_or_else(|| gs.page_free.clone());
            let header = GroupHeader {
                free: page_free.iter().map(|&f| f as u32).sum(),
                data_blocks: self.geo.group_data_blocks(g as u64) as u32,
                page_selectors: page_sels,
                page_free,
            };
            let sel = gs.header_sel.next();
            let addr = self.geo.group_header_addr(g as u64, sel.copy);
            headers.push((addr, g as u64, header));
            group_selectors[g] = sel;
            new_group_sels.push((g, sel));
        }
        RcImages {
            pages,
            headers,
            group_selectors,
            new_page_sels,
            new_group_sels,
        }
    }

    /// The checkpoint that took `images` is durable: adopt its selectors.
    pub fn commit_done(&mut self, images: RcImages) {
        for (g, p, sel) in images.new_page_sels {
            let gs = &mut self.groups[g];
            gs.page_sel[p] = sel;
            gs.page_moves[p] = gs.page_moves[p].wrapping_add(1);
        }
        for (g, sel) in images.new_group_sels {
            self.groups[g].header_sel = sel;
        }
    }

    /// Makes blocks freed by a durable checkpoint allocatable. Call only after the reader
    /// epoch has drained.
    pub fn release(&mut self, freed: Vec<u64>) {
        if !freed.is_empty() {
            self.releases += 1;
        }
        let mut lowest = u64::MAX;
        for addr in freed {
            let (g, p, i) = self
                .geo
                .locate(addr)
                .map(|(g, p, i)| (g as usize, p as usize, i))
                .expect("held block");
            let page = self.groups[g].pages[p]
                .as_mut()
                .expect("held pages stay loaded");
            if page.is_held(i) && page.rc[i] == 0 {
                page.set_held(i, false);
                self.held -= 1;
                self.freed_held -= 1;
                lowest = lowest.min(self.ordinal(addr));
            }
        }
        if lowest != u64::MAX {
            self.rotor = self.rotor.min(lowest);
        }
    }

    /// How many times blocks were made allocatable again. While it stays the same, no block
    /// was reused: one with a count above zero holds what it held when the count was read
    /// (how inline dedup knows the block it compared is still the block it shares).
    pub fn releases(&self) -> u64 {
        self.releases
    }

    /// Drops pages that hold nothing the store still needs in memory (they are re-read on
    /// demand).
    pub fn trim(&mut self, keep_pages: usize) {
        let mut loaded: usize = self
            .groups
            .iter()
            .map(|g| g.pages.iter().filter(|p| p.is_some()).count())
            .sum();
        if loaded <= keep_pages {
            return;
        }
        for gs in self.groups.iter_mut() {
            for slot in gs.pages.iter_mut() {
                if loaded <= keep_pages {
                    return;
                }
                if slot.as_ref().is_some_and(|pg| {
                    !pg.dirty && !pg.pending && pg.frozen.is_none() && pg.held_count == 0
                }) {
                    *slot = None;
                    loaded -= 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::device::MemDevice;

    fn table(bytes: u64) -> (MemDevice, RcTable) {
        let geo = Geometry::for_size(bytes).unwrap();
        let dev = MemDevice::new(bytes);
        let sels = vec![Selector::default(); geo.groups as usize];
        let t = RcTable::open(&dev, geo, &sels, 0).unwrap();
        (dev, t)
    }

    /// Writes a cut's images to the device and adopts them, as a checkpoint does.
    fn checkpoint(dev: &MemDevice, t: &mut RcTable, gen: u64) -> (RcCut, Vec<Selector>) {
        let cut = t.cut();
        let images = t.take_images();
        for (addr, b) in images.encode(gen) {
            dev.write_at(&b[..], addr * BLOCK_SIZE_U64).unwrap();
        }
        let sels = images.group_selectors.clone();
        t.commit_done(images);
        (cut, sels)
    }

    #[test]
    fn alloc_free_hold_release() {
        let (dev, mut t) = table(64 << 20);
        let total = t.free();
        let mut c = Cursor::default();
        let (a, n) = t.alloc(&dev, &mut c, 10, 0).unwrap().unwrap();
        assert_eq!(n, 10);
        let (b, _) = t.alloc(&dev, &mut c, 1, 0).unwrap().unwrap();
        assert_eq!(b, a + 10, "a cursor continues where it stopped");
        assert_eq!(t.free(), total - 11);
        t.incr(&dev, a).unwrap();
        assert_eq!(t.decr(&dev, a).unwrap(), 1);
        assert_eq!(t.decr(&dev, a).unwrap(), 0);
        assert!(t.decr(&dev, a).is_err());
        assert_eq!(t.free(), total - 11, "freed but held");
        let (cut, _) = checkpoint(&dev, &mut t, 1);
        assert_eq!(cut.freed, vec![a]);
        t.release(cut.freed);
        assert_eq!(t.free(), total - 10);
        let mut c2 = Cursor(Some(t.ordinal(a)));
        assert_eq!(
            t.alloc(&dev, &mut c2, 1, 0).unwrap().unwrap().0,
            a,
            "released block is reused"
        );
    }

    #[test]
    fn released_blocks_are_reused_before_fresh_ones() {
        let (dev, mut t) = table(64 << 20);
        let mut c = Cursor::default();
        let (a, _) = t.alloc(&dev, &mut c, 100, 0).unwrap().unwrap();
        for b in a..a + 100 {
            t.decr(&dev, b).unwrap();
        }
        let (cut, _) = checkpoint(&dev, &mut t, 1);
        t.release(cut.freed);
        let mut fresh = Cursor::default();
        let (b, n) = t.alloc(&dev, &mut fresh, 100, 0).unwrap().unwrap();
        assert_eq!(
            (b, n),
            (a, 100),
            "the freed (already written) run comes back first"
        );
    }

    #[test]
    fn commit_round_trips_through_the_device() {
        let (dev, mut t) = table(64 << 20);
        let mut c = Cursor::default();
        let (a, n) = t.alloc(&dev, &mut c, 3000, 0).unwrap().unwrap();
        assert!(n > 4, "a run of {n}");
        let last = a + n - 1;
        t.incr(&dev, a).unwrap();
        t.incr_all(&dev, [a + 1, a + 2, last, a + 2]).unwrap();
        assert!(t.incr_all(&dev, [a + 3, last + 1]).is_err(), "a free block");
        let (_, sels) = checkpoint(&dev, &mut t, 1);
        let mut t2 = RcTable::open(&dev, *t.geometry(), &sels, 1).unwrap();
        assert_eq!(t2.allocated(), t.allocated());
        assert_eq!(t2.get(&dev, a).unwrap(), 2);
        assert_eq!(t2.get(&dev, a + 1).unwrap(), 2);
        assert_eq!(t2.get(&dev, a + 2).unwrap(), 3);
        assert_eq!(t2.get(&dev, last).unwrap(), 2);
        assert_eq!(t2.get(&dev, a + 4).unwrap(), 1);
        assert_eq!(t2.get(&dev, last + 1).unwrap(), 0);
    }

    /// Changes made after a cut do not leak into the images of the cut generation.
    #[test]
    fn images_hold_the_cut_generation_only() {
        let (dev, mut t) = table(64 << 20);
        let mut c = Cursor::default();
        let (a, _) = t.alloc(&dev, &mut c, 10, 0).unwrap().unwrap();
        let cut = t.cut();
        assert_eq!(cut.allocated, 10);
        // The next generation changes the same page before the checkpoint encodes it.
        t.incr(&dev, a).unwrap();
        t.decr(&dev, a + 1).unwrap();
        let (b, _) = t.alloc(&dev, &mut c, 5, 0).unwrap().unwrap();
        let images = t.take_images();
        for (addr, blk) in images.encode(1) {
            dev.write_at(&blk[..], addr * BLOCK_SIZE_U64).unwrap();
        }
        let sels = images.group_selectors.clone();
        t.commit_done(images);
        let mut t1 = RcTable::open(&dev, *t.geometry(), &sels, 1).unwrap();
        assert_eq!(t1.allocated(), 10);
        assert_eq!(t1.get(&dev, a).unwrap(), 1);
        assert_eq!(t1.get(&dev, a + 1).unwrap(), 1);
        assert_eq!(t1.get(&dev, b).unwrap(), 0);
        // The next checkpoint carries the later changes.
        let (_, sels) = checkpoint(&dev, &mut t, 2);
        let mut t2 = RcTable::open(&dev, *t.geometry(), &sels, 2).unwrap();
        assert_eq!(t2.allocated(), 14);
        assert_eq!(t2.get(&dev, a).unwrap(), 2);
        assert_eq!(t2.get(&dev, a + 1).unwrap(), 0);
        assert_eq!(t2.get(&dev, b).unwrap(), 1);
    }

    #[test]
    fn pages_load_outside_the_lock() {
        let (dev, mut t) = table(64 << 20);
        let mut c = Cursor::default();
        let (a, _) = t.alloc(&dev, &mut c, 3, 0).unwrap().unwrap();
        let (_, sels) = checkpoint(&dev, &mut t, 1);
        let mut t2 = RcTable::open(&dev, *t.geometry(), &sels, 1).unwrap();
        let missing = t2.missing([a, a + 1]);
        assert_eq!(missing.len(), 1, "one page holds both");
        for r in missing {
            let counts = RcTable::read_page(&dev, r).unwrap();
            t2.install(r, counts).unwrap();
        }
        assert!(t2.missing([a]).is_empty());
        assert_eq!(t2.get(&dev, a + 2).unwrap(), 1);
    }

    /// A page read outside the lock while a checkpoint moved it to its other copy (and it was
    /// dropped from memory) holds stale counts: it is not installed.
    #[test]
    fn a_page_read_before_it_moved_is_not_installed() {
        let (dev, mut t) = table(64 << 20);
        let mut c = Cursor::default();
        let (a, _) = t.alloc(&dev, &mut c, 3, 0).unwrap().unwrap();
        let (_, sels) = checkpoint(&dev, &mut t, 1);
        let mut t2 = RcTable::open(&dev, *t.geometry(), &sels, 1).unwrap();
        let stale: Vec<PageRead> = t2.missing([a]);
        let old = RcTable::read_page(&dev, stale[0]).unwrap();
        // Meanwhile: the page changes, a checkpoint writes it to its other copy, and it is
        // dropped from memory.
        t2.decr(&dev, a).unwrap();
        checkpoint(&dev, &mut t2, 2);
        t2.trim(0);
        t2.install(stale[0], old).unwrap();
        assert_eq!(t2.get(&dev, a).unwrap(), 0, "the stale page was installed");
        assert_eq!(t2.get(&dev, a + 1).unwrap(), 1);
    }

    #[test]
    fn reserved_blocks_stay_free_until_claimed() {
        let (dev, mut t) = table(64 << 20);
        let free = t.free();
        let mut c = Cursor::default();
        let (a, n) = t.reserve(&dev, &mut c, 4, 0).unwrap().unwrap();
        assert_eq!(n, 4);
        assert_eq!(t.free(), free - 4);
        assert_eq!(t.allocated(), 0);
        let mut c2 = Cursor::default();
        let (b, _) = t.alloc(&dev, &mut c2, 1, 0).unwrap().unwrap();
        assert!(b < a || b >= a + 4, "reserved blocks are not handed out");
        t.claim(&dev, a).unwrap();
        t.unreserve(&dev, a + 1).unwrap();
        assert!(t.claim(&dev, a + 1).is_err());
        assert_eq!(t.allocated(), 2);
        assert_eq!(t.free(), free - 2 - 2);
    }

    #[test]
    fn keep_free_reserve_and_exhaustion() {
        let (dev, mut t) = table(16 << 20);
        let mut c = Cursor::default();
        let mut got = 0;
        while let Some((_, n)) = t.alloc(&dev, &mut c, 100, 50).unwrap() {
            got += n;
        }
        assert_eq!(t.free(), 50);
        assert!(got > 0);
        while t.alloc(&dev, &mut c, 100, 0).unwrap().is_some() {}
        assert_eq!(t.free(), 0);
    }
}
