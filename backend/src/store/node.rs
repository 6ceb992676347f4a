//! Radix map nodes (128 block pointers in 4 KiB) and the cache that holds them.
//!
//! A node is *dirty* when it was allocated in the open transaction: it lives only in memory and
//! may be changed in place while its refcount is 1. At commit it is hashed, written, and becomes
//! *clean*: immutable, cached, and verified against its parent's hash whenever it is read back.

use std::{collections::HashMap, sync::Arc};

use super::{
    device::Device,
    error::{StoreError, StoreResult},
    format::{hash24, Hash24, Ptr, BLOCK_SIZE, BLOCK_SIZE_U64, FANOUT, PTR_LEN},
};

/// One radix node.
#[derive(Clone)]
pub struct Node(pub [u8; BLOCK_SIZE]);

impl Node {
    /// A node whose every entry is `fill`.
    pub fn filled(fill: Ptr) -> Box<Node> {
        let mut n = Box::new(Node([0; BLOCK_SIZE]));
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

/// Clean nodes (by address, with their hash) and dirty ones.
pub struct NodeCache {
    clean: HashMap<u64, (Hash24, Arc<Node>)>,
    pub dirty: HashMap<u64, Box<Node>>,
    /// Clean nodes to keep; beyond this the cache is trimmed after each commit.
    pub cap: usize,
}

impl NodeCache {
    pub fn new(cap: usize) -> NodeCache {
        NodeCache {
            clean: HashMap::new(),
            dirty: HashMap::new(),
            cap,
        }
    }

    /// The node `p` points at: dirty, cached, or read from the device and verified.
    pub fn get(&mut self, dev: &dyn Device, p: Ptr) -> StoreResult<&Node> {
        let addr = p.addr();
        if self.dirty.contains_key(&addr) {
            return Ok(&self.dirty[&addr]);
        }
        let hit = matches!(self.clean.get(&addr), Some((h, _)) if *h == p.hash);
        if !hit {
            let node = read_node(dev, p)?;
            self.clean.insert(addr, (p.hash, Arc::new(node)));
        }
        Ok(&self.clean[&addr].1)
    }

    pub fn is_dirty(&self, addr: u64) -> bool {
        self.dirty.contains_key(&addr)
    }

    /// A copy of the node (to clone or shadow it).
    pub fn copy(&mut self, dev: &dyn Device, p: Ptr) -> StoreResult<Box<Node>> {
        Ok(Box::new(self.get(dev, p)?.clone()))
    }

    /// Forgets a block that was freed (dirty or clean).
    pub fn forget(&mut self, addr: u64) {
        self.dirty.remove(&addr);
        self.clean.remove(&addr);
    }

    /// A node finalised at commit becomes clean.
    pub fn insert_clean(&mut self, addr: u64, hash: Hash24, node: Arc<Node>) {
        self.clean.insert(addr, (hash, node));
    }

    /// Drops clean nodes beyond the cap (arbitrary ones: hash-map order is as good as random).
    pub fn trim(&mut self) {
        if self.clean.len() <= self.cap {
            return;
        }
        let excess = self.clean.len() - self.cap;
        let victims: Vec<u64> = self.clean.keys().take(excess).copied().collect();
        for v in victims {
            self.clean.remove(&v);
        }
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
    }
    Ok(node)
}
