//! Radix map nodes (128 block pointers in 4 KiB) and the table that holds them in memory.
//!
//! ```text
//!  NodeTable ─ 64 shards ─ addr → Slot::Dirty { gen, level, node }   written in generation `gen`;
//!                        │                                            memory only until its checkpoint
//!                        └ addr → Slot::Clean { hash, pin, node }    on disk, immutable, verified
//! ```
//!
//! A *dirty* node was allocated in generation `gen`. While `gen` is the open generation, the
//! one VDI that references it may change it in place. Once a checkpoint has cut `gen` the node
//! is *frozen*: it is never changed again (a writer copies it instead), and the checkpoint
//! hashes it, writes it and turns it into a clean slot.
//!
//! Pointers to dirty nodes carry [`UNSET`] instead of a hash: the hash is known only once the
//! checkpoint has hashed the node. The checkpoint fills in the hashes in what it writes; in
//! memory, a pointer with an unset hash is followed to whatever slot holds that address, which
//! is why a clean slot made by checkpoint *k* is pinned (never evicted) until checkpoint *k+1*
//! has been written: by then every in-memory node that pointed at it with an unset hash has
//! been written with the hash filled in, and replaced.
//!
//! Shard locks are leaves: nothing else is locked while one is held.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
};

use parking_lot::Mutex;

use super::{
    device::Device,
    error::{StoreError, StoreResult},
    format::{hash24, Hash24, Ptr, BLOCK_SIZE, BLOCK_SIZE_U64, FANOUT, PTR_LEN},
};

/// The hash a pointer to a dirty node carries until a checkpoint hashes the node.
pub(super) const UNSET: Hash24 = [0; 24];

/// Times a walk starts over after meeting an evicted node.
const WALK_RETRIES: usize = 16;

/// Runs a walk of a map that is held still (its VDI locked), again from the root if it met
/// a node evicted under a stale copy of its parent ([`StoreError::Evicted`]): the node table
/// then holds the parent as written, with the child's hash, so the next walk reads the child
/// from the device. Each retry needs another checkpoint to overtake the walk.
pub(super) fn retry_evicted<R>(mut walk: impl FnMut() -> StoreResult<R>) -> StoreResult<R> {
    let mut tries = 0;
    loop {
        match walk() {
            Err(StoreError::Evicted(_)) if tries < WALK_RETRIES => tries += 1,
            r => return r,
        }
    }
}

/// One radix node.
#[derive(Clone)]
pub struct Node(pub [u8; BLOCK_SIZE]);

impl Node {
    /// A node whose every entry is `fill`.
    pub fn filled(fill: Ptr) -> Node {
        let mut n = Node([0; BLOCK_SIZE]);
        if fill != Ptr::HOLE {
            for i in 0..FANOUT {
                n.set(i, fill);
            }
        }
        n
    }

    pub fn get(&self, i: usize) -> Ptr {
        Ptr::decode(&self.0[i * PTR_LEN..(i + 1) * PTR_LEN])
    }

    pub fn set(&mut self, i: usize, p: Ptr) {
        p.encode(&mut self.0[i * PTR_LEN..(i + 1) * PTR_LEN]);
    }

    pub fn entries(&self) -> impl Iterator<Item = Ptr> + '_ {
        (0..FANOUT).map(|i| self.get(i))
    }
}

/// Reads the node `p` points at and checks it against `p`'s hash.
pub fn read_node(dev: &dyn Device, p: Ptr) -> StoreResult<Node> {
    let mut node = Node([0; BLOCK_SIZE]);
    dev.read_at(&mut node.0, p.addr() * BLOCK_SIZE_U64)?;
    if hash24(&node.0) != p.hash {
        return Err(StoreError::Corrupt(format!(
            "map node at block {} fails its checksum",
            p.addr()
        )));
    }
    for e in node.entries() {
        e.kind()?;
        if e.is_block() && e.hash == UNSET {
            return Err(StoreError::Corrupt(format!(
                "map node at block {} holds a pointer without a checksum",
                p.addr()
            )));
        }
    }
    Ok(node)
}

enum Slot {
    Dirty {
        gen: u64,
        node: Arc<Node>,
        /// Its last reference went after it was frozen: written by its checkpoint, then
        /// dropped.
        freed: bool,
    },
    Clean {
        hash: Hash24,
        /// Not evicted until the checkpoint of this generation has been written.
        pin: u64,
        node: Arc<Node>,
    },
}

const SHARDS: usize = 64;

fn shard_of(addr: u64) -> usize {
    // Nodes of one tree are often allocated next to each other: mix the bits.
    (addr.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58) as usize
}

/// What a lookup found.
pub(super) enum Lookup {
    Hit(Arc<Node>),
    /// Not in memory: read it with [`NodeTable::load`] (without holding locks) and try again.
    Miss,
}

/// How a slot may be changed by the open generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// Dirty in the open generation: changeable in place (if its refcount is 1).
    Open,
    /// Dirty in a generation a checkpoint has cut: copy it to change it.
    Frozen,
    /// Clean, or not in memory.
    Clean,
}

pub(super) struct NodeTable {
    shards: Box<[Mutex<HashMap<u64, Slot>>]>,
    /// Clean nodes to keep; beyond this, unpinned ones are evicted after each checkpoint.
    cap: usize,
    clean: AtomicUsize,
    dirty: AtomicUsize,
    /// Dirty nodes created per generation, in creation order, for the checkpoint.
    created: Mutex<Vec<(u64, u8)>>,
    /// Generation of the last checkpoint written (clean slots pinned below it may go).
    written: AtomicU64,
}

impl NodeTable {
    pub fn new(cap: usize, written: u64) -> NodeTable {
        NodeTable {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            cap,
            clean: AtomicUsize::new(0),
            dirty: AtomicUsize::new(0),
            created: Mutex::new(Vec::new()),
            written: AtomicU64::new(written),
        }
    }

    fn shard(&self, addr: u64) -> parking_lot::MutexGuard<'_, HashMap<u64, Slot>> {
        self.shards[shard_of(addr)].lock()
    }

    /// Map nodes waiting for a checkpoint.
    pub fn dirty_count(&self) -> usize {
        self.dirty.load(Ordering::Relaxed)
    }

    /// The node `p` points at, if it is in memory. A pointer with an unset hash accepts
    /// whatever node is at its address; a hashed pointer only a clean node of that hash.
    pub fn get(&self, p: Ptr) -> Lookup {
        let sh = self.shard(p.addr());
        match sh.get(&p.addr()) {
            Some(Slot::Dirty { node, .. }) => Lookup::Hit(node.clone()),
            Some(Slot::Clean { hash, node, .. }) if p.hash == UNSET || *hash == p.hash => {
                Lookup::Hit(node.clone())
            }
            _ => Lookup::Miss,
        }
    }

    /// Reads a node that missed, verifies it, and caches it.
    pub fn load(&self, dev: &dyn Device, p: Ptr) -> StoreResult<Arc<Node>> {
        if p.hash == UNSET {
            // Only dirty or pinned nodes are reached through unset hashes from the live
            // tree; a walk holding a node it fetched before a checkpoint wrote it (and whose
            // children's pins then ran out) can still meet one.
            return Err(StoreError::Evicted(p.addr()));
        }
        let node = Arc::new(read_node(dev, p)?);
        let mut sh = self.shard(p.addr());
        match sh.get(&p.addr()) {
            Some(Slot::Dirty { node, .. }) => return Ok(node.clone()),
            Some(Slot::Clean { hash, node, .. }) if *hash == p.hash => return Ok(node.clone()),
            Some(Slot::Clean { .. }) => {}
            None => {
                self.clean.fetch_add(1, Ordering::Relaxed);
            }
        }
        sh.insert(
            p.addr(),
            Slot::Clean {
                hash: p.hash,
                pin: 0,
                node: node.clone(),
            },
        );
        Ok(node)
    }

    /// The node `p` points at: from memory, or read from the device (for callers that hold no
    /// lock a device read would stall, or that must make progress anyway).
    pub fn fetch(&self, dev: &dyn Device, p: Ptr) -> StoreResult<Arc<Node>> {
        match self.get(p) {
            Lookup::Hit(n) => Ok(n),
            Lookup::Miss => self.load(dev, p),
        }
    }

    /// How the open generation `open` may change the node at `addr`.
    pub fn state(&self, addr: u64, open: u64) -> State {
        match self.shard(addr).get(&addr) {
            Some(Slot::Dirty { gen, .. }) if *gen == open => State::Open,
            Some(Slot::Dirty { .. }) => State::Frozen,
            _ => State::Clean,
        }
    }

    /// A new dirty node at `addr` (a block just allocated) in generation `gen`.
    pub fn insert_dirty(&self, addr: u64, gen: u64, level: u8, node: Node) {
        let old = self.shard(addr).insert(
            addr,
            Slot::Dirty {
                gen,
                node: Arc::new(node),
                freed: false,
            },
        );
        match old {
            Some(Slot::Clean { .. }) => {
                self.clean.fetch_sub(1, Ordering::Relaxed);
            }
            Some(Slot::Dirty { .. }) => debug_assert!(false, "block {addr} allocated twice"),
            None => {}
        }
        self.dirty.fetch_add(1, Ordering::Relaxed);
        self.created.lock().push((addr, level));
    }

    /// Changes the open-generation node at `addr` in place. (Readers that still hold the
    /// node keep seeing the version they took.)
    pub fn modify<R>(&self, addr: u64, f: impl FnOnce(&mut Node) -> R) -> R {
        let mut sh = self.shard(addr);
        match sh.get_mut(&addr) {
            Some(Slot::Dirty { node, .. }) => f(Arc::make_mut(node)),
            _ => panic!("map node {addr} changed in place but it is not dirty"),
        }
    }

    /// Forgets a node whose block was freed. A frozen node stays until its checkpoint has
    /// written it.
    pub fn forget(&self, addr: u64, open: u64) {
        let mut sh = self.shard(addr);
        match sh.get_mut(&addr) {
            Some(Slot::Dirty { gen, freed, .. }) if *gen != open => *freed = true,
            Some(Slot::Dirty { .. }) => {
                sh.remove(&addr);
                self.dirty.fetch_sub(1, Ordering::Relaxed);
            }
            // A node the last checkpoint made clean may still be reached through an unset
            // hash by a frozen node being hashed: it stays until its pin runs out (its block
            // is held longer than that).
            Some(Slot::Clean { pin, .. }) if *pin > self.written.load(Ordering::Acquire) => {}
            Some(Slot::Clean { .. }) => {
                sh.remove(&addr);
                self.clean.fetch_sub(1, Ordering::Relaxed);
            }
            None => {}
        }
    }

    /// The dirty nodes created so far (the checkpoint's cut takes them: they are the frozen
    /// set from then on). Nodes freed meanwhile are skipped by [`NodeTable::frozen`].
    pub fn take_created(&self) -> Vec<(u64, u8)> {
        std::mem::take(&mut *self.created.lock())
    }

    /// A frozen node of generation ≤ `gen`, if it is still there.
    pub fn frozen(&self, addr: u64, gen: u64) -> Option<Arc<Node>> {
        match self.shard(addr).get(&addr) {
            Some(Slot::Dirty { gen: g, node, .. }) if *g <= gen => Some(node.clone()),
            _ => None,
        }
    }

    /// What the table holds at `addr`, for error messages.
    pub fn describe(&self, addr: u64) -> String {
        match self.shard(addr).get(&addr) {
            Some(Slot::Dirty { gen, freed, .. }) => format!(
                "dirty in generation {gen}{}",
                if *freed { ", freed" } else { "" }
            ),
            Some(Slot::Clean { pin, .. }) => format!("clean, pinned to {pin}"),
            None => "not in memory".into(),
        }
    }

    /// The hash to fill into a pointer with an unset hash to `addr`, once checkpoints have
    /// made that node clean.
    pub fn clean_hash(&self, addr: u64) -> Option<Hash24> {
        match self.shard(addr).get(&addr) {
            Some(Slot::Clean { hash, .. }) => Some(*hash),
            _ => None,
        }
    }

    /// A frozen node of checkpoint `gen` has been written as `image` (its hashes filled in):
    /// it becomes clean, pinned until the next checkpoint has been written. A node freed
    /// meanwhile is dropped.
    pub fn written(&self, addr: u64, gen: u64, hash: Hash24, image: Arc<Node>) {
        let mut sh = self.shard(addr);
        let Some(Slot::Dirty { gen: g, freed, .. }) = sh.get(&addr) else {
            return;
        };
        if *g > gen {
            return;
        }
        let freed = *freed;
        self.dirty.fetch_sub(1, Ordering::Relaxed);
        if freed {
            sh.remove(&addr);
            return;
        }
        sh.insert(
            addr,
            Slot::Clean {
                hash,
                pin: gen + 1,
                node: image,
            },
        );
        self.clean.fetch_add(1, Ordering::Relaxed);
    }

    /// Checkpoint `gen` has been written: nodes pinned for it may be evicted, and clean nodes
    /// beyond the cap are (arbitrary ones: hash-map order is as good as random).
    pub fn checkpoint_written(&self, gen: u64) {
        self.written.store(gen, Ordering::Release);
        let mut excess = self.clean.load(Ordering::Relaxed).saturating_sub(self.cap);
        if excess == 0 {
            return;
        }
        let per_shard = excess.div_ceil(SHARDS);
        for shard in self.shards.iter() {
            let mut sh = shard.lock();
            let victims: Vec<u64> = sh
                .iter()
                .filter(|(_, s)| matches!(s, Slot::Clean { pin, .. } if *pin <= gen))
                .map(|(a, _)| *a)
                .take(per_shard.min(excess))
                .collect();
            for v in victims {
                sh.remove(&v);
                self.clean.fetch_sub(1, Ordering::Relaxed);
                excess -= 1;
            }
            if excess == 0 {
                return;
            }
        }
    }
}
