//! A copy-on-write B+tree of byte keys and values in 4 KiB nodes: the VDI registry's storage
//! (FORMAT.md §6).
//!
//! Nodes are decoded into memory when read (and verified against their parent's hash), changed
//! only once copied into the open transaction (`dirty`), and encoded and hashed bottom-up at
//! commit. Registry nodes are never shared, so each has refcount 1: copying one frees the old.
//! Deletion removes empty nodes but does not rebalance; lookups stay logarithmic because splits
//! keep nodes at least half full when they are made.

use std::{collections::HashMap, sync::Arc};

use super::{
    device::Device,
    error::{StoreError, StoreResult},
    format::{hash24, put_u16, u16_at, Ptr, BLOCK_SIZE, BLOCK_SIZE_U64, PTR_LEN},
    refcount::{Cursor, RcTable},
};

const LEAF: u8 = 1;
const BRANCH: u8 = 2;
/// Node header: kind at 0, entry count (u16) at 2; entries from 4 (FORMAT.md §6).
const KIND_AT: usize = 0;
const COUNT_AT: usize = 2;
const NODE_HEADER: usize = 4;
/// Longest key and value the tree takes (a leaf must hold at least two entries).
pub const MAX_KEY: usize = 512;
pub const MAX_VALUE: usize = 1400;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BNode {
    Leaf(Vec<(Vec<u8>, Vec<u8>)>),
    /// (lower bound key, child); the first key is empty.
    Branch(Vec<(Vec<u8>, Ptr)>),
}

impl BNode {
    fn encoded_len(&self) -> usize {
        NODE_HEADER
            + match self {
                BNode::Leaf(es) => es.iter().map(|(k, v)| 4 + k.len() + v.len()).sum::<usize>(),
                BNode::Branch(es) => es.iter().map(|(k, _)| 2 + k.len() + PTR_LEN).sum::<usize>(),
            }
    }

    fn encode(&self) -> Box<[u8; BLOCK_SIZE]> {
        let mut b = Box::new([0u8; BLOCK_SIZE]);
        let mut at = NODE_HEADER;
        match self {
            BNode::Leaf(es) => {
                b[KIND_AT] = LEAF;
                put_u16(&mut b[..], COUNT_AT, es.len() as u16);
                for (k, v) in es {
                    b[at..at + 2].copy_from_slice(&(k.len() as u16).to_le_bytes());
                    b[at + 2..at + 4].copy_from_slice(&(v.len() as u16).to_le_bytes());
                    at += 4;
                    b[at..at + k.len()].copy_from_slice(k);
                    at += k.len();
                    b[at..at + v.len()].copy_from_slice(v);
                    at += v.len();
                }
            }
            BNode::Branch(es) => {
                b[KIND_AT] = BRANCH;
                put_u16(&mut b[..], COUNT_AT, es.len() as u16);
                for (k, p) in es {
                    b[at..at + 2].copy_from_slice(&(k.len() as u16).to_le_bytes());
                    at += 2;
                    b[at..at + k.len()].copy_from_slice(k);
                    at += k.len();
                    p.encode(&mut b[at..at + PTR_LEN]);
                    at += PTR_LEN;
                }
            }
        }
        b
    }

    /// Decodes a node, checking every length against the block.
    pub fn decode(b: &[u8]) -> StoreResult<BNode> {
        let bad = |why: &str| StoreError::Corrupt(format!("registry node: {why}"));
        let count = u16_at(b, COUNT_AT) as usize;
        let mut at = NODE_HEADER;
        let take = |at: &mut usize, n: usize| -> StoreResult<std::ops::Range<usize>> {
            let r = *at..at
                .checked_add(n)
                .filter(|&e| e <= BLOCK_SIZE)
                .ok_or_else(|| bad("entry runs past the block"))?;
            *at = r.end;
            Ok(r)
        };
        match b[KIND_AT] {
            LEAF => {
                let mut es = Vec::with_capacity(count);
                for _ in 0..count {
                    let h = take(&mut at, 4)?;
                    let (kl, vl) = (u16_at(b, h.start) as usize, u16_at(b, h.start + 2) as usize);
                    let k = take(&mut at, kl)?;
                    let v = take(&mut at, vl)?;
                    es.push((b[k].to_vec(), b[v].to_vec()));
                }
                if es.windows(2).any(|w| w[0].0 >= w[1].0) {
                    return Err(bad("leaf keys out of order"));
                }
                Ok(BNode::Leaf(es))
            }
            BRANCH => {
                let mut es = Vec::with_capacity(count);
                for _ in 0..count {
                    let h = take(&mut at, 2)?;
                    let k = take(&mut at, u16_at(b, h.start) as usize)?;
                    let p = take(&mut at, PTR_LEN)?;
                    let ptr = Ptr::decode(&b[p]);
                    if !ptr.is_block() {
                        return Err(bad("branch entry without a child"));
                    }
                    es.push((b[k].to_vec(), ptr));
                }
                if es.is_empty() || !es[0].0.is_empty() || es.windows(2).any(|w| w[0].0 >= w[1].0) {
                    return Err(bad("branch keys out of order"));
                }
                Ok(BNode::Branch(es))
            }
            k => Err(bad(&format!("unknown node kind {k}"))),
        }
    }
}

/// What B-tree operations need from the rest of the store: the device, refcounts, a cursor.
pub struct Ctx<'a> {
    pub dev: &'a dyn Device,
    pub rc: &'a mut RcTable,
    pub cursor: &'a mut Cursor,
}

impl Ctx<'_> {
    fn alloc(&mut self) -> StoreResult<u64> {
        match self.rc.alloc(self.dev, self.cursor, 1, 0)? {
            Some((a, _)) => Ok(a),
            None => Err(StoreError::NoSpace),
        }
    }
}

pub struct BTree {
    pub root: Ptr,
    /// 0 = empty; 1 = the root is a leaf.
    pub height: u8,
    clean: HashMap<u64, (super::format::Hash24, Arc<BNode>)>,
    dirty: HashMap<u64, BNode>,
    /// Nodes finalized but maybe not on the device yet: read from here, never from the
    /// device, until [`BTree::written`].
    unwritten: HashMap<u64, (super::format::Hash24, Arc<BNode>)>,
    pub cache_cap: usize,
}

impl BTree {
    pub fn new(root: Ptr, height: u8) -> BTree {
        BTree {
            root,
            height,
            clean: HashMap::new(),
            dirty: HashMap::new(),
            unwritten: HashMap::new(),
            cache_cap: 4096,
        }
    }

    fn node(&mut self, dev: &dyn Device, p: Ptr) -> StoreResult<&BNode> {
        let addr = p.addr();
        if self.dirty.contains_key(&addr) {
            return Ok(&self.dirty[&addr]);
        }
        if matches!(self.unwritten.get(&addr), Some((h, _)) if *h == p.hash) {
            return Ok(&self.unwritten[&addr].1);
        }
        if !matches!(self.clean.get(&addr), Some((h, _)) if *h == p.hash) {
            let mut b = [0u8; BLOCK_SIZE];
            dev.read_at(&mut b, addr * BLOCK_SIZE_U64)?;
            if hash24(&b) != p.hash {
                return Err(StoreError::Corrupt(format!(
                    "registry node at block {addr} fails its checksum"
                )));
            }
            let node = BNode::decode(&b)?;
            if self.clean.len() >= self.cache_cap {
                self.clean.clear();
            }
            self.clean.insert(addr, (p.hash, Arc::new(node)));
        }
        Ok(&self.clean[&addr].1)
    }

    /// Makes the node `slot` points at writable (copying it into the transaction).
    fn writable(&mut self, ctx: &mut Ctx, slot: &mut Ptr) -> StoreResult<u64> {
        let addr = slot.addr();
        if self.dirty.contains_key(&addr) {
            return Ok(addr);
        }
        let node = self.node(ctx.dev, *slot)?.clone();
        let new = ctx.alloc()?;
        ctx.rc.decr(ctx.dev, addr)?;
        self.clean.remove(&addr);
        self.unwritten.remove(&addr);
        self.dirty.insert(new, node);
        *slot = slot.with_addr(new);
        Ok(new)
    }

    pub fn get(&mut self, dev: &dyn Device, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        if self.height == 0 {
            return Ok(None);
        }
        let mut p = self.root;
        loop {
            match self.node(dev, p)? {
                BNode::Leaf(es) => {
                    return Ok(es
                        .binary_search_by(|(k, _)| k.as_slice().cmp(key))
                        .ok()
                        .map(|i| es[i].1.clone()))
                }
                BNode::Branch(es) => p = es[branch_index(es, key)].1,
            }
        }
    }

    /// Every (key, value) whose key starts with `prefix`, in order.
    pub fn scan(
        &mut self,
        dev: &dyn Device,
        prefix: &[u8],
    ) -> StoreResult<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        self.walk(dev, prefix, None, &mut |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            true
        })?;
        Ok(out)
    }

    /// Calls `f` on each (key, value) whose key starts with `prefix` and sorts after `after`
    /// (every one if `None`), in key order, until `f` returns false. Reads only the nodes on
    /// the way to the first such key and those holding the keys visited: O(log n + visited).
    pub fn walk(
        &mut self,
        dev: &dyn Device,
        prefix: &[u8],
        after: Option<&[u8]>,
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> StoreResult<()> {
        if self.height > 0 {
            self.walk_rec(dev, self.root, prefix, after, f)?;
        }
        Ok(())
    }

    /// Returns false once the walk is over (`f` said stop, or the keys left the prefix).
    fn walk_rec(
        &mut self,
        dev: &dyn Device,
        p: Ptr,
        prefix: &[u8],
        after: Option<&[u8]>,
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> StoreResult<bool> {
        // The walk starts at the first key ≥ `lo`.
        let lo = match after {
            Some(a) if a > prefix => a,
            _ => prefix,
        };
        let first = match self.node(dev, p)? {
            BNode::Leaf(es) => {
                let start = es.partition_point(|(k, _)| k.as_slice() < lo);
                for (k, v) in &es[start..] {
                    if !k.starts_with(prefix) {
                        return Ok(false);
                    }
                    if after.is_some_and(|a| k.as_slice() <= a) {
                        continue;
                    }
                    if !f(k, v) {
                        return Ok(false);
                    }
                }
                return Ok(true);
            }
            BNode::Branch(es) => branch_index(es, lo),
        };
        // Children before `first` hold only keys below `lo`. The node is looked up again for
        // each child (a hash lookup; the walk below may have evicted it) rather than copied.
        for i in first.. {
            let child = match self.node(dev, p)? {
                BNode::Branch(es) => match es.get(i) {
                    // Child i holds keys ≥ its key: past the prefix, so is everything after.
                    Some((k, _)) if k.as_slice() > prefix && !k.starts_with(prefix) => {
                        return Ok(false)
                    }
                    Some((_, c)) => *c,
                    None => return Ok(true),
                },
                BNode::Leaf(_) => unreachable!("a node's kind does not change under a walk"),
            };
            if !self.walk_rec(dev, child, prefix, after, f)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Inserts or replaces; returns the old value.
    pub fn insert(
        &mut self,
        ctx: &mut Ctx,
        key: &[u8],
        value: &[u8],
    ) -> StoreResult<Option<Vec<u8>>> {
        if key.len() > MAX_KEY || value.len() > MAX_VALUE {
            return Err(StoreError::Invalid("registry entry too large".into()));
        }
        if self.height == 0 {
            let addr = ctx.alloc()?;
            self.dirty
                .insert(addr, BNode::Leaf(vec![(key.to_vec(), value.to_vec())]));
            self.root = Ptr::block(addr, [0; 24]);
            self.height = 1;
            return Ok(None);
        }
        let mut root = self.root;
        let (old, split) = self.insert_rec(ctx, &mut root, key, value)?;
        if let Some((sep, right)) = split {
            let addr = ctx.alloc()?;
            self.dirty
                .insert(addr, BNode::Branch(vec![(Vec::new(), root), (sep, right)]));
            root = Ptr::block(addr, [0; 24]);
            self.height += 1;
        }
        self.root = root;
        Ok(old)
    }

    #[allow(clippy::type_complexity)]
    fn insert_rec(
        &mut self,
        ctx: &mut Ctx,
        slot: &mut Ptr,
        key: &[u8],
        value: &[u8],
    ) -> StoreResult<(Option<Vec<u8>>, Option<(Vec<u8>, Ptr)>)> {
        let addr = self.writable(ctx, slot)?;
        let old;
        let child_update = match self.dirty.get_mut(&addr).expect("dirty") {
            BNode::Leaf(es) => {
                match es.binary_search_by(|(k, _)| k.as_slice().cmp(key)) {
                    Ok(i) => old = Some(std::mem::replace(&mut es[i].1, value.to_vec())),
                    Err(i) => {
                        es.insert(i, (key.to_vec(), value.to_vec()));
                        old = None;
                    }
                }
                None
            }
            BNode::Branch(es) => {
                let i = branch_index(es, key);
                old = None;
                Some((i, es[i].1))
            }
        };
        let mut old = old;
        if let Some((i, mut child)) = child_update {
            let (o, split) = self.insert_rec(ctx, &mut child, key, value)?;
            old = o;
            let BNode::Branch(es) = self.dirty.get_mut(&addr).expect("dirty") else {
                unreachable!()
            };
            es[i].1 = child;
            if let Some((sep, right)) = split {
                es.insert(i + 1, (sep, right));
            }
        }
        Ok((old, self.split_if_needed(ctx, addr)?))
    }

    fn split_if_needed(&mut self, ctx: &mut Ctx, addr: u64) -> StoreResult<Option<(Vec<u8>, Ptr)>> {
        let node = &self.dirty[&addr];
        if node.encoded_len() <= BLOCK_SIZE {
            return Ok(None);
        }
        let half = node.encoded_len() / 2;
        let right_addr = ctx.alloc()?;
        let node = self.dirty.get_mut(&addr).expect("dirty");
        let (sep, right) = match node {
            BNode::Leaf(es) => {
                let at = split_point(es.iter().map(|(k, v)| 4 + k.len() + v.len()), half);
                let right = es.split_off(at);
                (right[0].0.clone(), BNode::Leaf(right))
            }
            BNode::Branch(es) => {
                let at = split_point(es.iter().map(|(k, _)| 2 + k.len() + PTR_LEN), half);
                let mut right = es.split_off(at);
                let sep = std::mem::take(&mut right[0].0);
                (sep, BNode::Branch(right))
            }
        };
        self.dirty.insert(right_addr, right);
        Ok(Some((sep, Ptr::block(right_addr, [0; 24]))))
    }

    /// Removes a key; returns its value.
    pub fn remove(&mut self, ctx: &mut Ctx, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        if self.height == 0 || self.get(ctx.dev, key)?.is_none() {
            return Ok(None);
        }
        let mut root = self.root;
        let (old, empty) = self.remove_rec(ctx, &mut root, key)?;
        if empty {
            self.free_dirty(ctx, root.addr())?;
            self.root = Ptr::HOLE;
            self.height = 0;
            return Ok(old);
        }
        // A branch root with one child gives way to the child (which this remove may not have
        // touched: then it is not in the transaction).
        while self.height > 1 {
            let child = match self.node(ctx.dev, root)? {
                BNode::Branch(es) if es.len() == 1 => es[0].1,
                _ => break,
            };
            self.free_node(ctx, root.addr())?;
            root = child;
            self.height -= 1;
        }
        self.root = root;
        Ok(old)
    }

    /// Returns (old value, node is now empty).
    fn remove_rec(
        &mut self,
        ctx: &mut Ctx,
        slot: &mut Ptr,
        key: &[u8],
    ) -> StoreResult<(Option<Vec<u8>>, bool)> {
        let addr = self.writable(ctx, slot)?;
        let child = match self.dirty.get_mut(&addr).expect("dirty") {
            BNode::Leaf(es) => {
                let old = match es.binary_search_by(|(k, _)| k.as_slice().cmp(key)) {
                    Ok(i) => Some(es.remove(i).1),
                    Err(_) => None,
                };
                return Ok((old, es.is_empty()));
            }
            BNode::Branch(es) => {
                let i = branch_index(es, key);
                (i, es[i].1)
            }
        };
        let (i, mut cptr) = child;
        let (old, child_empty) = self.remove_rec(ctx, &mut cptr, key)?;
        if child_empty {
            self.free_dirty(ctx, cptr.addr())?;
        }
        let BNode::Branch(es) = self.dirty.get_mut(&addr).expect("dirty") else {
            unreachable!()
        };
        if child_empty {
            es.remove(i);
            if let Some(first) = es.first_mut() {
                first.0.clear();
            }
        } else {
            es[i].1 = cptr;
        }
        Ok((old, es.is_empty()))
    }

    fn free_dirty(&mut self, ctx: &mut Ctx, addr: u64) -> StoreResult<()> {
        self.dirty.remove(&addr);
        ctx.rc.decr(ctx.dev, addr)?;
        Ok(())
    }

    /// Frees a node of the tree, in the transaction or not.
    fn free_node(&mut self, ctx: &mut Ctx, addr: u64) -> StoreResult<()> {
        self.clean.remove(&addr);
        self.unwritten.remove(&addr);
        self.free_dirty(ctx, addr)
    }

    /// Encodes and hashes every dirty node bottom-up; returns the blocks to write. `root` is
    /// updated with the root's hash.
    pub fn finalize(&mut self) -> Vec<(u64, Box<[u8; BLOCK_SIZE]>)> {
        let mut out = Vec::new();
        if self.height > 0 {
            let mut root = self.root;
            self.finalize_rec(&mut root, &mut out);
            self.root = root;
        }
        debug_assert!(self.dirty.is_empty(), "unreachable dirty registry nodes");
        self.dirty.clear();
        out
    }

    fn finalize_rec(&mut self, slot: &mut Ptr, out: &mut Vec<(u64, Box<[u8; BLOCK_SIZE]>)>) {
        let addr = slot.addr();
        let Some(mut node) = self.dirty.remove(&addr) else {
            return;
        };
        if let BNode::Branch(es) = &mut node {
            for (_, child) in es.iter_mut() {
                if self.dirty.contains_key(&child.addr()) {
                    self.finalize_rec(child, out);
                }
            }
        }
        let enc = node.encode();
        let h = hash24(&enc[..]);
        slot.hash = h;
        self.unwritten.insert(addr, (h, Arc::new(node)));
        out.push((addr, enc));
    }

    /// The blocks the last [`BTree::finalize`] returned are on the device: their nodes move
    /// to the cache, as far as its bound allows.
    pub fn written(&mut self) {
        for (addr, node) in self.unwritten.drain() {
            if self.clean.len() >= self.cache_cap {
                break;
            }
            self.clean.insert(addr, node);
        }
    }

    /// Every block of the tree (for `check`), with the node it holds.
    pub fn blocks(&mut self, dev: &dyn Device) -> StoreResult<Vec<u64>> {
        let mut out = Vec::new();
        if self.height > 0 {
            let mut stack = vec![self.root];
            while let Some(p) = stack.pop() {
                out.push(p.addr());
                if let BNode::Branch(es) = self.node(dev, p)? {
                    stack.extend(es.iter().map(|(_, c)| *c));
                }
            }
        }
        Ok(out)
    }
}

/// Index of the branch entry whose child holds `key`.
fn branch_index(es: &[(Vec<u8>, Ptr)], key: &[u8]) -> usize {
    match es.binary_search_by(|(k, _)| k.as_slice().cmp(key)) {
        Ok(i) => i,
        Err(i) => i - 1, // es[0] has the empty key, which is ≤ every key
    }
}

/// The entry index at which the running size first reaches `half` (at least 1, at most n-1).
fn split_point(sizes: impl ExactSizeIterator<Item = usize>, half: usize) -> usize {
    let n = sizes.len();
    let mut acc = NODE_HEADER;
    for (i, s) in sizes.enumerate() {
        acc += s;
        if acc >= half {
            return (i + 1).clamp(1, n - 1);
        }
    }
    n / 2
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{
        device::MemDevice,
        format::{Geometry, Selector},
    };
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn setup() -> (MemDevice, RcTable) {
        let geo = Geometry::for_size(64 << 20).unwrap();
        let dev = MemDevice::new(64 << 20);
        let rc = RcTable::open(
            &dev,
            geo,
            &vec![Selector::default(); geo.groups as usize],
            0,
        )
        .unwrap();
        (dev, rc)
    }

    fn commit(t: &mut BTree, dev: &MemDevice) {
        for (addr, b) in t.finalize() {
            dev.write_at(&b[..], addr * BLOCK_SIZE_U64).unwrap();
        }
        t.written();
        t.clean.clear();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn matches_a_btreemap(ops in prop::collection::vec((0u8..3, 0u16..600, 0usize..300), 1..400)) {
            let (dev, mut rc) = setup();
            let mut cursor = Cursor::default();
            let mut t = BTree::new(Ptr::HOLE, 0);
            let mut model = BTreeMap::new();
            for (n, (op, k, vlen)) in ops.into_iter().enumerate() {
                let key = format!("k{k:05}").into_bytes();
                let mut ctx = Ctx { dev: &dev, rc: &mut rc, cursor: &mut cursor };
                match op {
                    0 | 1 => {
                        let v = vec![k as u8; vlen];
                        prop_assert_eq!(t.insert(&mut ctx, &key, &v).unwrap(), model.insert(key, v));
                    }
                    _ => prop_assert_eq!(t.remove(&mut ctx, &key).unwrap(), model.remove(&key)),
                }
                if n % 37 == 0 {
                    commit(&mut t, &dev);
                }
            }
            commit(&mut t, &dev);
            let all = t.scan(&dev, b"").unwrap();
            let want: Vec<_> = model.clone().into_iter().collect();
            prop_assert_eq!(all, want);
            let pre = t.scan(&dev, b"k001").unwrap();
            let want_pre: Vec<_> = model.iter().filter(|(k, _)| k.starts_with(b"k001")).map(|(k, v)| (k.clone(), v.clone())).collect();
            prop_assert_eq!(pre, want_pre);
            // A walk resumed after any key, stopped after a few: the next keys in order.
            for after in [&b"k0"[..], b"k00150", b"k00299x", b"k006"] {
                let mut got = Vec::new();
                t.walk(&dev, b"k00", Some(after), &mut |k, _| {
                    got.push(k.to_vec());
                    got.len() < 5
                }).unwrap();
                let want: Vec<_> = model.keys().filter(|k| k.starts_with(b"k00") && k.as_slice() > after).take(5).cloned().collect();
                prop_assert_eq!(got, want);
            }
        }
    }

    /// Removing every key, largest first, from a committed tree of three levels: the root
    /// keeps giving way to a child that the removes did not touch.
    #[test]
    fn removing_everything_from_a_committed_tree() {
        let (dev, mut rc) = setup();
        let mut cursor = Cursor::default();
        let mut t = BTree::new(Ptr::HOLE, 0);
        let keys: Vec<Vec<u8>> = (0..20_000u32)
            .map(|i| blake3::hash(&i.to_le_bytes()).as_bytes()[..24].to_vec())
            .collect();
        {
            let mut ctx = Ctx {
                dev: &dev,
                rc: &mut rc,
                cursor: &mut cursor,
            };
            for k in &keys {
                t.insert(&mut ctx, k, &[7; 8]).unwrap();
            }
        }
        assert!(t.height >= 3, "height {}", t.height);
        commit(&mut t, &dev);
        let mut sorted = keys.clone();
        sorted.sort();
        for (n, k) in sorted.iter().rev().enumerate() {
            let mut ctx = Ctx {
                dev: &dev,
                rc: &mut rc,
                cursor: &mut cursor,
            };
            assert!(t.remove(&mut ctx, k).unwrap().is_some());
            if n % 997 == 0 {
                commit(&mut t, &dev);
            }
        }
        assert_eq!(t.height, 0);
        assert_eq!(rc.allocated(), 0, "every node freed");
    }

    #[test]
    fn decode_rejects_garbage() {
        let mut b = [0u8; BLOCK_SIZE];
        b[0] = LEAF;
        b[2] = 200;
        b[4] = 0xff;
        b[5] = 0xff;
        assert!(BNode::decode(&b).is_err());
        b[0] = 9;
        assert!(BNode::decode(&b).is_err());
    }
}
