//! The dedup index: which block holds the data of a given hash (FORMAT.md §11).
//!
//! ```text
//!  on disk   a copy-on-write B+tree (btree.rs) of hash24 → block address, rooted in the
//!            commit record: committed with everything else, no log of its own
//!  in RAM    IndexChanges (in Space): what the open generation changed, applied to the tree
//!            at the cut; a Bloom filter (≈ 1.25–2.5 bytes per entry) that says "surely new"
//!            so that most unique writes never read the tree; a bounded node cache
//! ```
//!
//! The one invariant everything rests on: **the index never names a block that is free**.
//! Every data block that gets its first reference (claimed by a write) is entered; every data
//! block whose last reference goes leaves, in the same generation (a conditional removal: only
//! if the index still names that block for that hash). Both happen where the refcount changes,
//! under the space lock, in code that replay runs too (apply.rs, radix.rs), so a checkpoint
//! holds exactly the index that matches its refcounts, and recovery rebuilds the rest. A freed
//! block is reused only after the checkpoint that removed it from the index is durable.
//!
//! A lookup is only a hint: the writer compares bytes (unless the store trusts the hash), and
//! shares the block only if, under the space lock, it is still referenced and no freed block
//! was made reusable since the lookup ([`RcTable::releases`](super::refcount::RcTable)).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
};

use super::{
    btree::{BTree, Ctx, NewBlocks, COUNT_AT, KIND_AT, LEAF, NODE_HEADER},
    device::Device,
    error::{StoreError, StoreResult},
    format::{u16_at, u64_at, DedupRoot, Hash24, Ptr, BLOCK_SIZE},
};

/// What the open generation did to one hash's entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum IndexOp {
    /// The hash now names this block (whatever it named before).
    Set(u64),
    /// Remove the entry if it names one of these blocks (they were freed). Several blocks
    /// with one hash are freed together when a pass collapses their copies onto another.
    RemoveIf(Vec<u64>),
    /// Remove the entry (the block the generation had entered was freed).
    Remove,
}

/// The index changes of one generation, kept with the refcounts (they change together).
#[derive(Default)]
pub(super) struct IndexChanges {
    /// Whether the store keeps an index at all (format 7 on).
    pub enabled: bool,
    ops: HashMap<Hash24, IndexOp>,
}

impl IndexChanges {
    pub fn new(enabled: bool) -> IndexChanges {
        IndexChanges {
            enabled,
            ops: HashMap::new(),
        }
    }

    /// A data block got its first reference.
    pub fn claimed(&mut self, hash: Hash24, addr: u64) {
        if self.enabled {
            self.ops.insert(hash, IndexOp::Set(addr));
        }
    }

    /// A data block lost its last reference.
    pub fn freed(&mut self, hash: Hash24, addr: u64) {
        if !self.enabled {
            return;
        }
        match self.ops.get_mut(&hash) {
            None => {
                self.ops.insert(hash, IndexOp::RemoveIf(vec![addr]));
            }
            Some(op @ IndexOp::Set(_)) => {
                if *op == IndexOp::Set(addr) {
                    *op = IndexOp::Remove;
                }
                // Otherwise the index will name another, live block: nothing to remove.
            }
            Some(IndexOp::RemoveIf(freed)) => {
                if !freed.contains(&addr) {
                    freed.push(addr);
                }
            }
            Some(IndexOp::Remove) => {}
        }
    }

    pub fn get(&self, hash: &Hash24) -> Option<IndexOp> {
        self.ops.get(hash).cloned()
    }

    /// Hashes changed so far.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Every hash's change so far.
    pub fn ops(&self) -> Vec<(Hash24, IndexOp)> {
        self.ops.iter().map(|(h, o)| (*h, o.clone())).collect()
    }

    pub fn keys(&self) -> Vec<Hash24> {
        self.ops.keys().copied().collect()
    }

    pub fn take(&mut self) -> HashMap<Hash24, IndexOp> {
        std::mem::take(&mut self.ops)
    }
}

/// Bits per entry of each Bloom filter (7 probes: about 1 % false positives).
const BLOOM_BITS_PER_ENTRY: u64 = 10;
const BLOOM_PROBES: u64 = 7;
/// Entries the first filter is sized for.
const BLOOM_MIN_ENTRIES: u64 = 1 << 16;

/// One Bloom filter, sized for `capacity` entries.
struct Filter {
    bits: Vec<u64>,
    capacity: u64,
    count: u64,
}

impl Filter {
    fn new(capacity: u64) -> Filter {
        let words = (capacity * BLOOM_BITS_PER_ENTRY).div_ceil(64).max(1);
        Filter {
            bits: vec![0; words as usize],
            capacity,
            count: 0,
        }
    }

    /// The probe positions of `h` (double hashing over bits of a cryptographic hash).
    fn probes(&self, h: &Hash24) -> impl Iterator<Item = u64> {
        let m = self.bits.len() as u64 * 64;
        let a = u64_at(h, 0);
        let b = u64_at(h, 8) | 1;
        (0..BLOOM_PROBES).map(move |i| a.wrapping_add(i.wrapping_mul(b)) % m)
    }

    fn insert(&mut self, h: &Hash24) {
        let probes: Vec<u64> = self.probes(h).collect();
        for p in probes {
            self.bits[(p / 64) as usize] |= 1 << (p % 64);
        }
        self.count += 1;
    }

    fn may_contain(&self, h: &Hash24) -> bool {
        self.probes(h)
            .all(|p| self.bits[(p / 64) as usize] & (1 << (p % 64)) != 0)
    }
}

/// A Bloom filter that grows: a new filter twice the size of the last when it is full, so
/// RAM stays about 10–20 bits per entry. Removed entries stay in it (a false positive costs
/// one tree lookup); it is rebuilt from the tree when the store opens.
pub(super) struct Bloom {
    filters: Vec<Filter>,
}

impl Bloom {
    fn new(expected: u64) -> Bloom {
        Bloom {
            filters: vec![Filter::new(expected.max(BLOOM_MIN_ENTRIES))],
        }
    }

    fn insert(&mut self, h: &Hash24) {
        let last = self.filters.last().expect("at least one filter");
        if last.count >= last.capacity {
            let next = Filter::new(last.capacity * 2);
            self.filters.push(next);
        }
        self.filters.last_mut().expect("just ensured").insert(h);
    }

    fn may_contain(&self, h: &Hash24) -> bool {
        self.filters.iter().any(|f| f.may_contain(h))
    }

    /// Bytes of RAM the filters hold.
    fn bytes(&self) -> u64 {
        self.filters.iter().map(|f| f.bits.len() as u64 * 8).sum()
    }
}

/// The index: the tree as of the last cut, its entry count, the filter and a cache of leaf
/// blocks. Lives under its own lock (`Store::dedup`): lookups read the tree, only the
/// checkpoint's cut changes it.
pub(super) struct DedupIndex {
    tree: BTree,
    pub entries: u64,
    bloom: Bloom,
    leaves: LeafCache,
}

/// Leaf blocks kept for lookups, as read (checked, not decoded: a lookup binary-searches the
/// block's fixed-size entries in place). Bounded; a full cache drops a leaf at random.
struct LeafCache {
    blocks: HashMap<u64, (Hash24, Box<[u8; BLOCK_SIZE]>)>,
    cap: usize,
}

/// An entry of an index leaf: key and value lengths (u16 each), the hash24, the block.
const LEAF_ENTRY: usize = 4 + 24 + 8;

impl LeafCache {
    /// The leaf of `tree` at `p` (read, checked and kept if it was not here).
    fn get(&mut self, dev: &dyn Device, tree: &BTree, p: Ptr) -> StoreResult<&[u8; BLOCK_SIZE]> {
        let addr = p.addr();
        if !matches!(self.blocks.get(&addr), Some((h, _)) if *h == p.hash) {
            let b = tree.read_block(dev, p)?;
            leaf_count(&b[..])?;
            if self.blocks.len() >= self.cap {
                if let Some(&victim) = self.blocks.keys().next() {
                    self.blocks.remove(&victim);
                }
            }
            self.blocks.insert(addr, (p.hash, b));
        }
        Ok(&self.blocks[&addr].1)
    }
}

/// The number of entries of an index leaf, after checking that every one is a hash24 and a
/// block address.
fn leaf_count(b: &[u8]) -> StoreResult<usize> {
    let bad = |why: String| StoreError::Corrupt(format!("dedup index leaf: {why}"));
    if b[KIND_AT] != LEAF {
        return Err(bad(format!(
            "node kind {} where a leaf belongs",
            b[KIND_AT]
        )));
    }
    let n = u16_at(b, COUNT_AT) as usize;
    if NODE_HEADER + n * LEAF_ENTRY > BLOCK_SIZE {
        return Err(bad(format!("{n} entries do not fit in a block")));
    }
    for i in 0..n {
        let at = NODE_HEADER + i * LEAF_ENTRY;
        if (u16_at(b, at), u16_at(b, at + 2)) != (24, 8) {
            return Err(bad(format!(
                "entry {i} is not a hash24 and a block address"
            )));
        }
    }
    Ok(n)
}

/// The block a checked index leaf names for `h`, by binary search in place.
fn search_leaf(b: &[u8], h: &Hash24) -> Option<u64> {
    let n = u16_at(b, COUNT_AT) as usize;
    let key = |i: usize| &b[NODE_HEADER + i * LEAF_ENTRY + 4..][..24];
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = (lo + hi) / 2;
        match key(mid).cmp(&h[..]) {
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
            std::cmp::Ordering::Equal => {
                return Some(u64_at(b, NODE_HEADER + mid * LEAF_ENTRY + 4 + 24))
            }
        }
    }
    None
}

/// The store's dedup settings (the commit record's dedup flags, FORMAT.md §11), read on the
/// write path without a lock; a change is committed by the next checkpoint.
pub(super) struct DedupSettings(AtomicU8);

impl DedupSettings {
    pub fn new(flags: u8) -> DedupSettings {
        DedupSettings(AtomicU8::new(flags))
    }

    pub fn flags(&self) -> u8 {
        self.0.load(Ordering::Acquire)
    }

    pub fn inline(&self) -> bool {
        self.flags() & DedupRoot::INLINE_OFF == 0
    }

    pub fn trust_hash(&self) -> bool {
        self.flags() & DedupRoot::TRUST_HASH != 0
    }

    /// Turns the setting `bit` (a `DedupRoot` flag) on or off.
    pub fn set(&self, bit: u8, on: bool) {
        if on {
            self.0.fetch_or(bit, Ordering::AcqRel);
        } else {
            self.0.fetch_and(!bit, Ordering::AcqRel);
        }
    }
}

/// A hash's change, keyed by the hash for [`BTree::merge`].
struct Keyed(Hash24, IndexOp);

impl AsRef<[u8]> for Keyed {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// What a lookup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Found {
    /// The filter says no block has this hash.
    SurelyNew,
    /// No entry.
    Absent,
    /// This block had the hash (check it still does before sharing it).
    Block(u64),
}

fn encode_addr(addr: u64) -> [u8; 8] {
    addr.to_le_bytes()
}

fn decode_entry(k: &[u8], v: &[u8]) -> StoreResult<(Hash24, u64)> {
    if k.len() != 24 || v.len() != 8 {
        return Err(StoreError::Corrupt(format!(
            "dedup index entry with a {}-byte key and a {}-byte value",
            k.len(),
            v.len()
        )));
    }
    Ok((k.try_into().expect("24 bytes"), u64_at(v, 0)))
}

impl DedupIndex {
    /// The index of a store whose commit record says `root`; reads every leaf once to fill
    /// the filter. Lookups keep up to `leaf_cache` leaf blocks.
    pub fn open(dev: &dyn Device, root: DedupRoot, leaf_cache: usize) -> StoreResult<DedupIndex> {
        let mut tree = BTree::new(root.root, root.height);
        // Decoded, a full index leaf takes about 12 KiB.
        tree.cache_cap = 256;
        let mut bloom = Bloom::new(root.entries * 2);
        let mut found = 0u64;
        let mut bad = None;
        tree.walk(dev, b"", None, &mut |k, v| match decode_entry(k, v) {
            Ok((h, _)) => {
                bloom.insert(&h);
                found += 1;
                true
            }
            Err(e) => {
                bad = Some(e);
                false
            }
        })?;
        if let Some(e) = bad {
            return Err(e);
        }
        if found != root.entries {
            return Err(StoreError::Corrupt(format!(
                "the dedup index holds {found} entries, the commit record says {}",
                root.entries
            )));
        }
        Ok(DedupIndex {
            tree,
            entries: root.entries,
            bloom,
            leaves: LeafCache {
                blocks: HashMap::new(),
                cap: leaf_cache.max(1),
            },
        })
    }

    /// Where the index is, for the commit record (after [`DedupIndex::apply`]), with the
    /// settings `flags`.
    pub fn root(&self, flags: u8) -> DedupRoot {
        DedupRoot {
            root: self.tree.root,
            height: self.tree.height,
            flags,
            entries: self.entries,
        }
    }

    /// RAM the filter holds, in bytes.
    pub fn filter_bytes(&self) -> u64 {
        self.bloom.bytes()
    }

    /// The block the index names for `h`, given what the open generation did to it.
    pub fn lookup(
        &mut self,
        dev: &dyn Device,
        h: &Hash24,
        pending: Option<IndexOp>,
    ) -> StoreResult<Found> {
        let except = match pending {
            Some(IndexOp::Set(a)) => return Ok(Found::Block(a)),
            Some(IndexOp::Remove) => return Ok(Found::Absent),
            Some(IndexOp::RemoveIf(freed)) => freed,
            None => Vec::new(),
        };
        if !self.bloom.may_contain(h) {
            return Ok(Found::SurelyNew);
        }
        let Some(leaf) = self.tree.leaf_for(dev, h)? else {
            return Ok(Found::Absent);
        };
        Ok(
            match search_leaf(self.leaves.get(dev, &self.tree, leaf)?, h) {
                Some(a) if !except.contains(&a) => Found::Block(a),
                _ => Found::Absent,
            },
        )
    }

    /// Reads the tree nodes that `keys` will change into the node cache, so that the cut
    /// does no I/O, if they fit in it (a larger cut reads its nodes as it goes).
    pub fn prefetch(&mut self, dev: &dyn Device, keys: &[Hash24]) -> StoreResult<()> {
        if self.tree.height == 0 || keys.len() > self.tree.cache_cap / 2 {
            return Ok(());
        }
        for k in keys {
            self.tree.get(dev, k)?;
        }
        Ok(())
    }

    /// Applies a generation's changes to the tree (at the cut; new nodes allocated in it,
    /// written by the checkpoint before its commit record: [`DedupIndex::new_blocks`]).
    pub fn apply(&mut self, ctx: &mut Ctx, ops: HashMap<Hash24, IndexOp>) -> StoreResult<()> {
        let mut ops: Vec<Keyed> = ops.into_iter().map(|(h, op)| Keyed(h, op)).collect();
        ops.sort_unstable_by_key(|k| k.0);
        let DedupIndex {
            tree,
            entries,
            bloom,
            ..
        } = self;
        let mut bad = None;
        let mut change = |i: usize, cur: Option<&[u8]>| -> Option<Vec<u8>> {
            let Keyed(h, op) = &ops[i];
            let cur_addr = match cur.map(|v| decode_entry(h, v)).transpose() {
                Ok(a) => a.map(|(_, a)| a),
                Err(e) => {
                    bad = Some(e);
                    return cur.map(<[u8]>::to_vec);
                }
            };
            let new = match op {
                IndexOp::Set(a) => {
                    bloom.insert(h);
                    Some(encode_addr(*a).to_vec())
                }
                IndexOp::RemoveIf(freed) if cur_addr.is_some_and(|a| !freed.contains(&a)) => {
                    cur.map(<[u8]>::to_vec)
                }
                IndexOp::RemoveIf(_) | IndexOp::Remove => None,
            };
            match (cur.is_some(), new.is_some()) {
                (false, true) => *entries += 1,
                (true, false) => *entries -= 1,
                _ => {}
            }
            new
        };
        tree.merge(ctx, &ops, &mut change)?;
        match bad {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The tree's node blocks and its entries, as of the last cut.
    #[allow(clippy::type_complexity)]
    pub fn contents(&mut self, dev: &dyn Device) -> StoreResult<(Vec<u64>, Vec<(Hash24, u64)>)> {
        read_tree(&mut self.tree, dev)
    }

    /// The node blocks the last apply made: the checkpoint's to write.
    pub fn new_blocks(&self) -> Arc<NewBlocks> {
        self.tree.new_blocks()
    }

    /// What [`DedupIndex::new_blocks`] returned is on the device.
    pub fn written(&mut self) {
        self.tree.written();
    }
}

/// Reads a committed index afresh (for `check`): its node blocks and its entries.
#[allow(clippy::type_complexity)]
pub(super) fn read_index(
    dev: &dyn Device,
    root: DedupRoot,
) -> StoreResult<(Vec<u64>, Vec<(Hash24, u64)>)> {
    let mut tree = BTree::new(root.root, root.height);
    tree.cache_cap = 64;
    read_tree(&mut tree, dev)
}

#[allow(clippy::type_complexity)]
fn read_tree(tree: &mut BTree, dev: &dyn Device) -> StoreResult<(Vec<u64>, Vec<(Hash24, u64)>)> {
    let blocks = tree.blocks(dev)?;
    let mut entries = Vec::new();
    let mut bad = None;
    tree.walk(dev, b"", None, &mut |k, v| match decode_entry(k, v) {
        Ok(e) => {
            entries.push(e);
            true
        }
        Err(e) => {
            bad = Some(e);
            false
        }
    })?;
    match bad {
        Some(e) => Err(e),
        None => Ok((blocks, entries)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u64) -> Hash24 {
        super::super::format::hash24(&n.to_le_bytes())
    }

    #[test]
    fn changes_never_keep_a_freed_block() {
        let mut c = IndexChanges::new(true);
        c.claimed(h(1), 10);
        c.freed(h(1), 10);
        assert_eq!(c.get(&h(1)), Some(IndexOp::Remove));
        c.freed(h(2), 20);
        assert_eq!(c.get(&h(2)), Some(IndexOp::RemoveIf(vec![20])));
        // Copies collapsed onto a third block: the index may still name that one.
        c.freed(h(2), 21);
        assert_eq!(c.get(&h(2)), Some(IndexOp::RemoveIf(vec![20, 21])));
        c.claimed(h(3), 30);
        c.freed(h(3), 31);
        assert_eq!(c.get(&h(3)), Some(IndexOp::Set(30)));
        let mut off = IndexChanges::default();
        off.claimed(h(1), 1);
        assert_eq!(off.get(&h(1)), None);
    }

    #[test]
    fn the_filter_has_no_false_negatives_and_few_false_positives() {
        let mut b = Bloom::new(1000);
        for i in 0..200_000 {
            b.insert(&h(i));
        }
        assert!((0..200_000).all(|i| b.may_contain(&h(i))));
        let fp = (1_000_000..1_100_000)
            .filter(|&i| b.may_contain(&h(i)))
            .count();
        assert!(fp < 3000, "{fp} false positives in 100000");
        // 10 bits an entry, and up to three times that just after the filter grew (the new
        // filter's pages are not touched until entries go in).
        assert!(b.bytes() * 8 <= 200_000 * 30, "{} bytes", b.bytes());
    }
}
