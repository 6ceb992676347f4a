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

pub const LEAF: u8 = 1;
const BRANCH: u8 = 2;
/// Node header: kind at 0, entry count (u16) at 2; entries from 4 (FORMAT.md §6).
pub const KIND_AT: usize = 0;
pub const COUNT_AT: usize = 2;
pub const NODE_HEADER: usize = 4;
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
    /// What the last [`BTree::merge`] made, until [`BTree::written`].
    new_blocks: Arc<NewBlocks>,
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
            new_blocks: Arc::default(),
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
            let node = match self.new_blocks.get(p) {
                Some(b) => BNode::decode(b)?,
                None => read_node(dev, p)?,
            };
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

    /// The leaf where `key` is if the tree holds it, without reading the leaf (for callers
    /// that search leaves in place; the tree must have no transaction open).
    pub fn leaf_for(&mut self, dev: &dyn Device, key: &[u8]) -> StoreResult<Option<Ptr>> {
        if self.height == 0 {
            return Ok(None);
        }
        let mut p = self.root;
        for _ in 1..self.height {
            match self.node(dev, p)? {
                BNode::Branch(es) => p = es[branch_index(es, key)].1,
                BNode::Leaf(_) => {
                    return Err(StoreError::Corrupt(format!(
                        "registry node at block {} is a leaf above the tree's last level",
                        p.addr()
                    )))
                }
            }
        }
        Ok(Some(p))
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

    /// The blocks the last [`BTree::finalize`] returned, and those the last [`BTree::merge`]
    /// made, are on the device: finalized nodes move to the cache, as far as its bound allows.
    pub fn written(&mut self) {
        self.new_blocks = Arc::default();
        for (addr, node) in self.unwritten.drain() {
            if self.clean.len() >= self.cache_cap {
                break;
            }
            self.clean.insert(addr, node);
        }
    }

    /// Changes many keys at once, for a tree changed only this way (the dedup index).
    /// `keys` are sorted and distinct; `change(i, current)` gives key `i`'s new value (`None`:
    /// absent). Every node on the way to a changed key is copied once, in key order, straight
    /// into its encoded block (leaves are merged as bytes, not decoded); subtrees with no
    /// changed key are not read, and a node whose contents come out the same is kept. Nodes
    /// are split as `insert` would (each at least half full), never merged. The new blocks
    /// wait in [`BTree::new_blocks`] (4 KiB each, in a few large buffers) until
    /// [`BTree::written`]; the tree reads them from there meanwhile.
    pub fn merge<K: AsRef<[u8]>>(
        &mut self,
        ctx: &mut Ctx,
        keys: &[K],
        change: &mut Change,
    ) -> StoreResult<()> {
        assert!(
            self.dirty.is_empty(),
            "merge into a tree with a transaction open"
        );
        assert!(
            self.new_blocks.is_empty(),
            "merge before the last merge's blocks were written"
        );
        let mut m = Merge {
            change,
            new: NewBlocks::default(),
        };
        let merged = if self.height == 0 {
            match merge_leaf(&mut m, None, keys, 0)? {
                Some(es) => Some(write_nodes(ctx, &mut m, Entries::Leaf(es), Vec::new())?),
                None => None,
            }
        } else {
            let root = self.root;
            self.merge_rec(ctx, &mut m, root, Vec::new(), keys, 0)?
        };
        let Some(mut level) = merged else {
            return Ok(());
        };
        let mut height = self.height.max(1);
        while level.len() > 1 {
            level = write_nodes(ctx, &mut m, Entries::Branch(level), Vec::new())?;
            height += 1;
        }
        self.new_blocks = Arc::new(m.new);
        let Some((_, mut root)) = level.pop() else {
            self.root = Ptr::HOLE;
            self.height = 0;
            return Ok(());
        };
        // A branch root with one child gives way to the child.
        while height > 1 {
            let child = match self.node(ctx.dev, root)? {
                BNode::Branch(es) if es.len() == 1 => es[0].1,
                _ => break,
            };
            self.clean.remove(&root.addr());
            ctx.rc.decr(ctx.dev, root.addr())?;
            Arc::get_mut(&mut self.new_blocks)
                .expect("only the tree holds them during a merge")
                .forget(root.addr());
            root = child;
            height -= 1;
        }
        self.root = root;
        self.height = height;
        Ok(())
    }

    /// Merges `keys` into the subtree at `p`, whose lower bound is `lower`: the entries that
    /// replace `p` in its parent (none if it came out empty), or `None` if it is unchanged.
    #[allow(clippy::type_complexity)]
    fn merge_rec<K: AsRef<[u8]>>(
        &mut self,
        ctx: &mut Ctx,
        m: &mut Merge,
        p: Ptr,
        lower: Vec<u8>,
        keys: &[K],
        base: usize,
    ) -> StoreResult<Option<Vec<(Vec<u8>, Ptr)>>> {
        let block = self.take_block(ctx.dev, p)?;
        let entries = match block[KIND_AT] {
            LEAF => match merge_leaf(m, Some(&block[..]), keys, base)? {
                Some(es) => Entries::Leaf(es),
                None => return Ok(None),
            },
            _ => {
                let BNode::Branch(mut es) = BNode::decode(&block[..])? else {
                    unreachable!("not a leaf")
                };
                es[0].0 = lower.clone();
                let mut out = Vec::with_capacity(es.len() + 1);
                let mut changed = false;
                let mut from = 0;
                for c in 0..es.len() {
                    let to = match es.get(c + 1) {
                        Some((hi, _)) => {
                            from + keys[from..].partition_point(|k| k.as_ref() < hi.as_slice())
                        }
                        None => keys.len(),
                    };
                    let (child_lower, child) =
                        std::mem::replace(&mut es[c], (Vec::new(), Ptr::HOLE));
                    let sub = if to > from {
                        let sub = &keys[from..to];
                        self.merge_rec(ctx, m, child, child_lower.clone(), sub, base + from)?
                    } else {
                        None
                    };
                    match sub {
                        Some(replacement) => {
                            changed = true;
                            out.extend(replacement);
                        }
                        None => out.push((child_lower, child)),
                    }
                    from = to;
                }
                if !changed {
                    return Ok(None);
                }
                Entries::Branch(out)
            }
        };
        drop(block);
        let replacement = write_nodes(ctx, m, entries, lower)?;
        ctx.rc.decr(ctx.dev, p.addr())?;
        Ok(Some(replacement))
    }

    /// The block of the node at `p`, checked, and the node out of the cache (it is about to
    /// be replaced).
    fn take_block(&mut self, dev: &dyn Device, p: Ptr) -> StoreResult<Box<[u8; BLOCK_SIZE]>> {
        let addr = p.addr();
        for (h, node) in [self.clean.remove(&addr), self.unwritten.remove(&addr)]
            .into_iter()
            .flatten()
        {
            if h == p.hash {
                // Encoding is deterministic: these are the bytes the hash covers.
                return Ok(node.encode());
            }
        }
        self.read_block(dev, p)
    }

    /// The block of the node at `p`, checked against the pointer's hash: from the blocks
    /// the last merge made if it is one, else from the device.
    pub fn read_block(&self, dev: &dyn Device, p: Ptr) -> StoreResult<Box<[u8; BLOCK_SIZE]>> {
        match self.new_blocks.get(p) {
            Some(b) => Ok(Box::new(b.try_into().expect("a block"))),
            None => read_block(dev, p),
        }
    }

    /// The blocks the last merge made, to write before the commit record that names them.
    pub fn new_blocks(&self) -> Arc<NewBlocks> {
        self.new_blocks.clone()
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

/// Writes `entries` as as few nodes as hold them, evenly filled; returns each node's
/// (lower bound, pointer). The first node's lower bound is `lower`.
#[allow(clippy::type_complexity)]
fn write_nodes(
    ctx: &mut Ctx,
    m: &mut Merge,
    entries: Entries,
    lower: Vec<u8>,
) -> StoreResult<Vec<(Vec<u8>, Ptr)>> {
    let sizes: Vec<usize> = match &entries {
        Entries::Leaf(es) => (0..es.ends.len())
            .map(|i| es.ends[i] - es.start(i))
            .collect(),
        Entries::Branch(es) => es.iter().map(|(k, _)| 2 + k.len() + PTR_LEN).collect(),
    };
    let cap = BLOCK_SIZE - NODE_HEADER;
    let total: usize = sizes.iter().sum();
    let target = total.div_ceil(total.div_ceil(cap).max(1));
    // Where each node starts.
    let mut starts = vec![0];
    let mut acc = 0;
    for (i, &s) in sizes.iter().enumerate() {
        if acc > 0 && (acc + s > cap || acc >= target) {
            starts.push(i);
            acc = 0;
        }
        acc += s;
    }
    let mut out = Vec::with_capacity(starts.len());
    let mut lower = Some(lower);
    let mut build = |enc: Box<[u8; BLOCK_SIZE]>, first: &[u8], out: &mut Vec<(Vec<u8>, Ptr)>| {
        let hash = hash24(&enc[..]);
        let addr = ctx.alloc()?;
        m.new.push(addr, hash, &enc);
        let low = lower.take().unwrap_or_else(|| first.to_vec());
        out.push((low, Ptr::block(addr, hash)));
        StoreResult::Ok(())
    };
    if sizes.is_empty() {
        return Ok(out);
    }
    match entries {
        Entries::Leaf(es) => {
            let mut ends = starts[1..].to_vec();
            ends.push(sizes.len());
            for (&s, &e) in starts.iter().zip(&ends) {
                let (from, to) = (es.start(s), es.start(e));
                let mut b = Box::new([0u8; BLOCK_SIZE]);
                b[KIND_AT] = LEAF;
                put_u16(&mut b[..], COUNT_AT, (e - s) as u16);
                b[NODE_HEADER..NODE_HEADER + to - from].copy_from_slice(&es.bytes[from..to]);
                build(b, es.key(s), &mut out)?;
            }
        }
        Entries::Branch(es) => {
            for mut chunk in split_at(es, &starts) {
                let first = std::mem::take(&mut chunk[0].0);
                build(BNode::Branch(chunk).encode(), &first, &mut out)?;
            }
        }
    }
    Ok(out)
}

/// How [`BTree::merge`] changes key `i` given its current value: its new value, or `None`
/// for none.
pub type Change<'a> = dyn FnMut(usize, Option<&[u8]>) -> Option<Vec<u8>> + 'a;

/// What a merge carries down the tree: how keys change and where new nodes go.
struct Merge<'a> {
    change: &'a mut Change<'a>,
    new: NewBlocks,
}

/// Node blocks a merge made that are not on the device yet, kept in buffers of 4 MiB (which
/// the allocator maps and unmaps whole, so they do not linger in the heap once written).
#[derive(Default)]
pub struct NewBlocks {
    addrs: Vec<u64>,
    at: HashMap<u64, (usize, super::format::Hash24)>,
    chunks: Vec<Vec<u8>>,
}

/// Blocks in one buffer of [`NewBlocks`].
const CHUNK_BLOCKS: usize = 1024;
/// The address of a block [`NewBlocks::forget`] dropped.
const FORGOTTEN: u64 = u64::MAX;

impl NewBlocks {
    fn push(&mut self, addr: u64, hash: super::format::Hash24, block: &[u8; BLOCK_SIZE]) {
        let i = self.addrs.len();
        if i % CHUNK_BLOCKS == 0 {
            self.chunks
                .push(Vec::with_capacity(CHUNK_BLOCKS * BLOCK_SIZE));
        }
        self.chunks
            .last_mut()
            .expect("just ensured")
            .extend_from_slice(block);
        self.addrs.push(addr);
        self.at.insert(addr, (i, hash));
    }

    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    /// Drops the block at `addr` (freed before it was written: it must not be).
    fn forget(&mut self, addr: u64) {
        if let Some((i, _)) = self.at.remove(&addr) {
            self.addrs[i] = FORGOTTEN;
        }
    }

    /// Each block to write: its index (for [`NewBlocks::block`]) and address.
    pub fn to_write(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.addrs
            .iter()
            .enumerate()
            .filter(|(_, &a)| a != FORGOTTEN)
            .map(|(i, &a)| (i, a))
    }

    /// Block `i`'s bytes.
    pub fn block(&self, i: usize) -> &[u8] {
        &self.chunks[i / CHUNK_BLOCKS][(i % CHUNK_BLOCKS) * BLOCK_SIZE..][..BLOCK_SIZE]
    }

    /// The block for pointer `p`, if it is one of these.
    fn get(&self, p: Ptr) -> Option<&[u8]> {
        match self.at.get(&p.addr()) {
            Some(&(i, h)) if h == p.hash => Some(self.block(i)),
            _ => None,
        }
    }
}

/// The entries of a node a merge is about to write.
enum Entries {
    Leaf(LeafEntries),
    Branch(Vec<(Vec<u8>, Ptr)>),
}

/// Leaf entries encoded back to back as a leaf holds them (key and value lengths, key,
/// value), so that a merge copies bytes rather than allocating for each entry.
#[derive(Default)]
struct LeafEntries {
    bytes: Vec<u8>,
    /// Where each entry ends in `bytes`.
    ends: Vec<usize>,
}

impl LeafEntries {
    fn push(&mut self, key: &[u8], value: &[u8]) {
        self.bytes
            .extend_from_slice(&(key.len() as u16).to_le_bytes());
        self.bytes
            .extend_from_slice(&(value.len() as u16).to_le_bytes());
        self.bytes.extend_from_slice(key);
        self.bytes.extend_from_slice(value);
        self.ends.push(self.bytes.len());
    }

    fn start(&self, i: usize) -> usize {
        if i == 0 {
            0
        } else {
            self.ends[i - 1]
        }
    }

    fn key(&self, i: usize) -> &[u8] {
        let at = self.start(i);
        &self.bytes[at + 4..at + 4 + u16_at(&self.bytes, at) as usize]
    }
}

/// The (key, value) byte ranges of a leaf block's entries, checked as [`BNode::decode`]
/// checks them.
#[allow(clippy::type_complexity)]
fn leaf_ranges(b: &[u8]) -> StoreResult<Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>> {
    let bad = |why: &str| StoreError::Corrupt(format!("registry node: {why}"));
    let count = u16_at(b, COUNT_AT) as usize;
    let mut out = Vec::with_capacity(count);
    let mut at = NODE_HEADER;
    for _ in 0..count {
        if at + 4 > BLOCK_SIZE {
            return Err(bad("entry runs past the block"));
        }
        let (kl, vl) = (u16_at(b, at) as usize, u16_at(b, at + 2) as usize);
        let (k, v) = (at + 4..at + 4 + kl, at + 4 + kl..at + 4 + kl + vl);
        if v.end > BLOCK_SIZE {
            return Err(bad("entry runs past the block"));
        }
        at = v.end;
        out.push((k, v));
    }
    if out
        .windows(2)
        .any(|w| b[w[0].0.clone()] >= b[w[1].0.clone()])
    {
        return Err(bad("leaf keys out of order"));
    }
    Ok(out)
}

/// The entries of leaf block `old` (none if `None`) with `keys` changed, or `None` if
/// nothing changed.
fn merge_leaf<K: AsRef<[u8]>>(
    m: &mut Merge,
    old: Option<&[u8]>,
    keys: &[K],
    base: usize,
) -> StoreResult<Option<LeafEntries>> {
    let (b, ranges) = match old {
        Some(b) => (b, leaf_ranges(b)?),
        None => (&[][..], Vec::new()),
    };
    let mut out = LeafEntries::default();
    out.bytes.reserve(BLOCK_SIZE + keys.len() * 40);
    let mut old = ranges.into_iter().peekable();
    let mut changed = false;
    for (j, k) in keys.iter().enumerate() {
        let k = k.as_ref();
        while let Some((ok, ov)) = old.next_if(|(ok, _)| &b[ok.clone()] < k) {
            out.push(&b[ok], &b[ov]);
        }
        let cur = old
            .next_if(|(ok, _)| &b[ok.clone()] == k)
            .map(|(_, v)| &b[v]);
        let new = (m.change)(base + j, cur);
        changed |= new.as_deref() != cur;
        if let Some(v) = new {
            if k.len() > MAX_KEY || v.len() > MAX_VALUE {
                return Err(StoreError::Invalid("registry entry too large".into()));
            }
            out.push(k, &v);
        }
    }
    for (ok, ov) in old {
        out.push(&b[ok], &b[ov]);
    }
    Ok(changed.then_some(out))
}

/// `v` cut before each of `starts` (the first of which is 0).
fn split_at<T>(mut v: Vec<T>, starts: &[usize]) -> Vec<Vec<T>> {
    let mut parts = Vec::with_capacity(starts.len());
    for &s in starts.iter().skip(1).rev() {
        parts.push(v.split_off(s));
    }
    parts.push(v);
    parts.reverse();
    parts
}

/// Reads and decodes the node at `p`, checking it against the pointer's hash.
fn read_node(dev: &dyn Device, p: Ptr) -> StoreResult<BNode> {
    BNode::decode(&read_block(dev, p)?[..])
}

/// Reads the block of the node at `p`, checking it against the pointer's hash.
fn read_block(dev: &dyn Device, p: Ptr) -> StoreResult<Box<[u8; BLOCK_SIZE]>> {
    let addr = p.addr();
    let mut b = Box::new([0u8; BLOCK_SIZE]);
    dev.read_at(&mut b[..], addr * BLOCK_SIZE_U64)?;
    if hash24(&b[..]) != p.hash {
        return Err(StoreError::Corrupt(format!(
            "registry node at block {addr} fails its checksum"
        )));
    }
    Ok(b)
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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Batches of changes merged in: the same keys and values as a BTreeMap, every
        /// node reachable and allocated, nothing else allocated; emptied, nothing at all.
        #[test]
        fn merges_match_a_btreemap(batches in prop::collection::vec(
            prop::collection::btree_map(0u32..5000, prop::option::of(0usize..120), 1..1500), 1..8)) {
            let (dev, mut rc) = setup();
            let mut cursor = Cursor::default();
            let mut t = BTree::new(Ptr::HOLE, 0);
            let mut model = BTreeMap::new();
            let key = |k: u32| blake3::hash(&k.to_le_bytes()).as_bytes()[..24].to_vec();
            let mut all = batches.clone();
            all.push(model_keys_removed(&batches));
            for batch in all {
                let mut changes: Vec<(Vec<u8>, Option<Vec<u8>>)> = batch
                    .iter()
                    .map(|(&k, v)| (key(k), v.map(|n| vec![k as u8; n])))
                    .collect();
                changes.sort();
                let keys: Vec<Vec<u8>> = changes.iter().map(|c| c.0.clone()).collect();
                let mut seen = Vec::new();
                let mut ctx = Ctx { dev: &dev, rc: &mut rc, cursor: &mut cursor };
                t.merge(&mut ctx, &keys, &mut |i, cur| {
                    seen.push((i, cur.map(|c| c.to_vec())));
                    changes[i].1.clone()
                }).unwrap();
                for (i, cur) in seen {
                    prop_assert_eq!(cur.as_ref(), model.get(&keys[i]));
                }
                for (k, v) in changes {
                    match v {
                        Some(v) => model.insert(k, v),
                        None => model.remove(&k),
                    };
                }
                // Read before the new blocks are on the device, then after.
                let want: Vec<_> = model.clone().into_iter().collect();
                t.clean.clear();
                prop_assert_eq!(&t.scan(&dev, b"").unwrap(), &want);
                let new = t.new_blocks();
                for (i, addr) in new.to_write() {
                    prop_assert!(rc.get(&dev, addr).unwrap() == 1, "block {} written but free", addr);
                    dev.write_at(new.block(i), addr * BLOCK_SIZE_U64).unwrap();
                }
                t.written();
                t.clean.clear();
                prop_assert_eq!(&t.scan(&dev, b"").unwrap(), &want);
                let blocks = t.blocks(&dev).unwrap();
                prop_assert_eq!(blocks.len() as u64, rc.allocated());
                for b in blocks {
                    prop_assert!(rc.get(&dev, b).unwrap() == 1, "block {} not allocated once", b);
                }
            }
            prop_assert_eq!(t.height, 0);
            prop_assert_eq!(rc.allocated(), 0);
        }
    }

    /// A merge that leaves the root with one child: the root it rewrote gives way to the
    /// child and is neither kept nor written.
    #[test]
    fn merge_collapses_a_root_it_rewrote() {
        let (dev, mut rc) = setup();
        let mut cursor = Cursor::default();
        let mut t = BTree::new(Ptr::HOLE, 0);
        let keys: Vec<Vec<u8>> = (0..2000u32).map(|i| i.to_be_bytes().to_vec()).collect();
        let mut apply = |t: &mut BTree, rc: &mut RcTable, keys: &[Vec<u8>], v: Option<Vec<u8>>| {
            let mut ctx = Ctx {
                dev: &dev,
                rc,
                cursor: &mut cursor,
            };
            t.merge(&mut ctx, keys, &mut |_, _| v.clone()).unwrap();
            let new = t.new_blocks();
            for (i, addr) in new.to_write() {
                assert_eq!(
                    rc.get(&dev, addr).unwrap(),
                    1,
                    "block {addr} written but free"
                );
                dev.write_at(new.block(i), addr * BLOCK_SIZE_U64).unwrap();
            }
            t.written();
        };
        apply(&mut t, &mut rc, &keys, Some(vec![1; 40]));
        assert_eq!(t.height, 2);
        // Keep only the first leaf's keys.
        let first_leaf = match t.node(&dev, t.root).unwrap() {
            BNode::Branch(es) => es[1].0.clone(),
            BNode::Leaf(_) => unreachable!(),
        };
        let rest: Vec<Vec<u8>> = keys.iter().filter(|k| **k >= first_leaf).cloned().collect();
        apply(&mut t, &mut rc, &rest, None);
        assert_eq!(t.height, 1, "the root gave way to its only child");
        assert_eq!(rc.allocated(), 1);
        t.clean.clear();
        assert_eq!(t.scan(&dev, b"").unwrap().len(), keys.len() - rest.len());
    }

    /// Every key any batch touched, removed.
    fn model_keys_removed(
        batches: &[BTreeMap<u32, Option<usize>>],
    ) -> BTreeMap<u32, Option<usize>> {
        batches
            .iter()
            .flat_map(|b| b.keys().map(|&k| (k, None)))
            .collect()
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
