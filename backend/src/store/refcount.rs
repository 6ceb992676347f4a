//! Reference counts of every data block, and the allocator that hands out blocks whose count
//! is zero.
//!
//! ```text
//!  RcTable ─ groups[g] ─ header selector (which copy of the group header is current)
//!                      ─ pages[p]: refcounts of 1008 blocks (loaded on first use)
//!                                  + "held" bits: freed in a transaction not yet durable
//!                      ─ page selectors, free counts per page (from the group header)
//! ```
//!
//! A block is allocatable when its count is 0 and it is not *held*. Freeing (count → 0) holds
//! the block until the commit that freed it is durable and no reader from before that commit
//! is still running ([`RcTable::release_held`]); see FORMAT.md §8.
//!
//! At commit, every changed page goes to the copy its selector does not point at, and every
//! group with a changed page gets a new header (with the flipped page selectors) in the other
//! copy; the commit record carries the flipped group selectors. The new selectors are adopted
//! only once the commit is durable ([`RcTable::commit_done`]).

use super::{
    device::Device,
    error::{StoreError, StoreResult},
    format::{
        decode_rc_page, encode_rc_page, rc_page_index, Geometry, GroupHeader, Selector, BLOCK_SIZE,
        RC_PER_PAGE,
    },
};

const WORDS: usize = (RC_PER_PAGE as usize).div_ceil(64);

struct RcPage {
    rc: Box<[u32; RC_PER_PAGE as usize]>,
    held: [u64; WORDS],
    held_count: u32,
    dirty: bool,
}

impl RcPage {
    fn empty() -> RcPage {
        RcPage {
            rc: Box::new([0; RC_PER_PAGE as usize]),
            held: [0; WORDS],
            held_count: 0,
            dirty: false,
        }
    }

    fn is_held(&self, i: usize) -> bool {
        self.held[i / 64] & (1 << (i % 64)) != 0
    }

    fn free_at(&self, i: usize) -> bool {
        self.rc[i] == 0 && !self.is_held(i)
    }
}

struct GroupState {
    header_sel: Selector,
    page_sel: Vec<Selector>,
    page_free: Vec<u16>,
    pages: Vec<Option<RcPage>>,
    dirty: bool,
}

/// What a commit writes for the refcounts, and the selectors it switches to once durable.
pub struct RcCommit {
    pub writes: Vec<(u64, Box<[u8; BLOCK_SIZE]>)>,
    pub group_selectors: Vec<Selector>,
    new_page_sels: Vec<(usize, usize, Selector)>,
    new_group_sels: Vec<(usize, Selector)>,
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
    /// Blocks held (freed but not yet reusable).
    held: u64,
    /// Freed in the open transaction.
    pending: Vec<u64>,
    /// Freed in the transaction being committed; released once it is durable.
    committing: Vec<u64>,
    /// Where fresh extents start: data-block ordinal (group-major), wraps around.
    rotor: u64,
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
                dev.read_at(&mut b, addr * BLOCK_SIZE as u64)?;
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
                page_sel: header.page_selectors,
                page_free: header.page_free,
                pages: (0..pages).map(|_| None).collect(),
                dirty: false,
            });
        }
        let allocated = geo.data_blocks() - free_total;
        Ok(RcTable {
            geo,
            groups,
            allocated,
            held: 0,
            pending: Vec::new(),
            committing: Vec::new(),
            rotor: 0,
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

    /// Blocks freed but not yet reusable.
    pub fn held(&self) -> u64 {
        self.held
    }

    fn locate(&self, addr: u64) -> StoreResult<(usize, usize, usize)> {
        self.geo
            .locate(addr)
            .map(|(g, p, i)| (g as usize, p as usize, i))
            .ok_or_else(|| StoreError::Corrupt(format!("block {addr} is not a data block")))
    }

    fn page(&mut self, dev: &dyn Device, g: usize, p: usize) -> StoreResult<&mut RcPage> {
        if self.groups[g].pages[p].is_none() {
            let sel = self.groups[g].page_sel[p];
            let mut page = RcPage::empty();
            if sel.written {
                let addr = self.geo.rc_page_addr(g as u64, p as u64, sel.copy);
                let mut b = [0u8; BLOCK_SIZE];
                dev.read_at(&mut b, addr * BLOCK_SIZE as u64)?;
                decode_rc_page(
                    &b,
                    addr,
                    rc_page_index(g as u64, p as u64),
                    &mut page.rc[..],
                )?;
                let n = self.geo.page_blocks(g as u64, p as u64);
                let free = page.rc[..n].iter().filter(|&&c| c == 0).count();
                if free != self.groups[g].page_free[p] as usize
                    || page.rc[n..].iter().any(|&c| c != 0)
                {
                    return Err(StoreError::Corrupt(format!(
                        "refcount page {p} of group {g}: {free} free blocks, its header says {}",
                        self.groups[g].page_free[p]
                    )));
                }
            }
            self.groups[g].pages[p] = Some(page);
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
        let (g, p, i) = self.locate(addr)?;
        let page = self.page(dev, g, p)?;
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
        page.dirty = true;
        self.groups[g].dirty = true;
        Ok(())
    }

    /// Drops a reference to `addr`; returns the new count. At zero the block is held until
    /// the current transaction is durable.
    pub fn decr(&mut self, dev: &dyn Device, addr: u64) -> StoreResult<u32> {
        let (g, p, i) = self.locate(addr)?;
        let page = self.page(dev, g, p)?;
        if page.rc[i] == 0 {
            return Err(StoreError::Corrupt(format!(
                "dropping a reference to free block {addr}"
            )));
        }
        page.rc[i] -= 1;
        page.dirty = true;
        let now = page.rc[i];
        if now == 0 {
            page.held[i / 64] |= 1 << (i % 64);
            page.held_count += 1;
            self.groups[g].page_free[p] += 1;
            self.allocated -= 1;
            self.held += 1;
            self.pending.push(addr);
        }
        self.groups[g].dirty = true;
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
    /// committed until [`RcTable::claim`]ed (or are given back with [`RcTable::unreserve`]).
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
            if self.groups[g].page_free[p] as usize
                > self.groups[g].pages[p]
                    .as_ref()
                    .map_or(0, |pg| pg.held_count as usize)
            {
                let page_start = ord - (ord % RC_PER_PAGE);
                let in_page = self.geo.page_blocks(g as u64, p as u64) as u64;
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
                scanned += in_page - (ord - page_start);
                ord = page_start + in_page;
            } else {
                let page_start = ord - (ord % RC_PER_PAGE);
                let in_page = self.geo.page_blocks(g as u64, p as u64) as u64;
                scanned += in_page - (ord - page_start);
                ord = page_start + in_page;
            }
            if ord >= total {
                ord = 0;
            }
        }
        Ok(None)
    }

    /// Ordinal (0-based over all data blocks, group-major) of a data block address.
    fn ordinal(&self, addr: u64) -> u64 {
        let (g, p, i) = self.geo.locate(addr).expect("a data block");
        g * super::format::GROUP_DATA_BLOCKS + p * RC_PER_PAGE + i as u64
    }

    fn ordinal_parts(&self, ord: u64) -> (usize, usize, usize) {
        let g = ord / super::format::GROUP_DATA_BLOCKS;
        let within = ord % super::format::GROUP_DATA_BLOCKS;
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
            if reserve {
                page.held[(i + n) / 64] |= 1 << ((i + n) % 64);
            } else {
                page.rc[i + n] = 1;
            }
            n += 1;
        }
        if n == 0 {
            return Ok(None);
        }
        if reserve {
            page.held_count += n as u32;
            self.held += n as u64;
        } else {
            page.dirty = true;
            self.groups[g].page_free[p] -= n as u16;
            self.groups[g].dirty = true;
            self.allocated += n as u64;
        }
        Ok(Some((self.geo.data_addr(g as u64, p as u64, i), n as u64)))
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
        page.held[i / 64] &= !(1 << (i % 64));
        page.held_count -= 1;
        page.rc[i] = 1;
        page.dirty = true;
        self.held -= 1;
        self.allocated += 1;
        self.groups[g].page_free[p] -= 1;
        self.groups[g].dirty = true;
        Ok(())
    }

    /// Gives back a reserved block that was not used.
    pub fn unreserve(&mut self, dev: &dyn Device, addr: u64) -> StoreResult<()> {
        let (g, p, i) = self.locate(addr)?;
        let page = self.page(dev, g, p)?;
        if page.rc[i] == 0 && page.is_held(i) {
            page.held[i / 64] &= !(1 << (i % 64));
            page.held_count -= 1;
            self.held -= 1;
        }
        Ok(())
    }

    /// Moves the open transaction's frees to the committing set and encodes every changed
    /// page and group header for generation `gen`.
    pub fn prepare_commit(&mut self, gen: u64) -> RcCommit {
        debug_assert!(self.committing.is_empty());
        self.committing = std::mem::take(&mut self.pending);
        let mut writes = Vec::new();
        let mut new_page_sels = Vec::new();
        let mut new_group_sels = Vec::new();
        let mut group_selectors: Vec<Selector> = self.groups.iter().map(|g| g.header_sel).collect();
        for (g, gs) in self.groups.iter_mut().enumerate() {
            if !gs.dirty {
                continue;
            }
            gs.dirty = false;
            let mut page_sels = gs.page_sel.clone();
            for (p, page) in gs.pages.iter_mut().enumerate() {
                let Some(page) = page.as_mut().filter(|pg| pg.dirty) else {
                    continue;
                };
                page.dirty = false;
                let sel = gs.page_sel[p].next();
                let addr = self.geo.rc_page_addr(g as u64, p as u64, sel.copy);
                writes.push((
                    addr,
                    encode_rc_page(&page.rc[..], gen, addr, rc_page_index(g as u64, p as u64)),
                ));
                page_sels[p] = sel;
                new_page_sels.push((g, p, sel));
            }
            let header = GroupHeader {
                free: gs.page_free.iter().map(|&f| f as u32).sum(),
                data_blocks: self.geo.group_data_blocks(g as u64) as u32,
                page_selectors: page_sels,
                page_free: gs.page_free.clone(),
            };
            let sel = gs.header_sel.next();
            let addr = self.geo.group_header_addr(g as u64, sel.copy);
            writes.push((addr, header.encode(gen, addr, g as u64)));
            group_selectors[g] = sel;
            new_group_sels.push((g, sel));
        }
        RcCommit {
            writes,
            group_selectors,
            new_page_sels,
            new_group_sels,
        }
    }

    /// The commit prepared by [`RcTable::prepare_commit`] is durable: adopt its selectors.
    pub fn commit_done(&mut self, c: RcCommit) {
        for (g, p, sel) in c.new_page_sels {
            self.groups[g].page_sel[p] = sel;
        }
        for (g, sel) in c.new_group_sels {
            self.groups[g].header_sel = sel;
        }
    }

    /// Makes the blocks freed by the last durable commit allocatable. Call only after the
    /// reader epoch has drained.
    pub fn release_held(&mut self) {
        for addr in std::mem::take(&mut self.committing) {
            let (g, p, i) = self
                .geo
                .locate(addr)
                .map(|(g, p, i)| (g as usize, p as usize, i))
                .expect("held block");
            let page = self.groups[g].pages[p]
                .as_mut()
                .expect("held pages stay loaded");
            if page.is_held(i) {
                page.held[i / 64] &= !(1 << (i % 64));
                page.held_count -= 1;
                self.held -= 1;
            }
        }
    }

    /// Drops clean, unheld pages from memory (they are re-read on demand).
    pub fn trim_cache(&mut self, keep_pages: usize) {
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
                if slot
                    .as_ref()
                    .is_some_and(|pg| !pg.dirty && pg.held_count == 0)
                {
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
        let c1 = t.prepare_commit(1);
        assert!(!c1.writes.is_empty());
        t.commit_done(c1);
        t.release_held();
        assert_eq!(t.free(), total - 10);
        let mut c2 = Cursor(Some(t.ordinal(a)));
        assert_eq!(
            t.alloc(&dev, &mut c2, 1, 0).unwrap().unwrap().0,
            a,
            "released block is reused"
        );
    }

    #[test]
    fn commit_round_trips_through_the_device() {
        let (dev, mut t) = table(64 << 20);
        let mut c = Cursor::default();
        let (a, _) = t.alloc(&dev, &mut c, 3000, 0).unwrap().unwrap();
        t.incr(&dev, a).unwrap();
        let commit = t.prepare_commit(1);
        for (addr, b) in &commit.writes {
            dev.write_at(&b[..], addr * BLOCK_SIZE as u64).unwrap();
        }
        let sels = commit.group_selectors.clone();
        t.commit_done(commit);
        let mut t2 = RcTable::open(&dev, *t.geometry(), &sels, 1).unwrap();
        assert_eq!(t2.allocated(), t.allocated());
        assert_eq!(t2.get(&dev, a).unwrap(), 2);
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
