//! The store: opening and creating it, the metadata under its lock, and the commit protocol
//! (FORMAT.md §8).
//!
//! ```text
//!   Store ─ meta: Mutex<Meta>     maps, refcounts, registry, orphans — held briefly, never
//!         │                       across data I/O
//!         ─ commit: Mutex<..>     one commit at a time; flushes queue here (group commit)
//!         ─ epoch                 readers in flight, so freed blocks are reused only after them
//!         ─ dev: Arc<dyn Device>
//! ```
//!
//! A commit takes the metadata lock only to *collect* the transaction (hash dirty nodes, encode
//! changed blocks, swap in a fresh transaction); the writes and syncs run without it, so clients
//! keep reading and writing into the next transaction meanwhile.

use std::{
    collections::HashMap,
    fs::File,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use parking_lot::Mutex;
use tracing::{info, warn};

use super::{
    btree::{BTree, Ctx},
    device::{Device, FileDevice},
    epoch::Epoch,
    error::{StoreError, StoreResult},
    format::{
        magic, open_frame, seal_frame, CommitRecord, Frame, Geometry, Ptr, Selector, Superblock,
        BLOCK_SIZE, BLOCK_SIZE_U64, COMMIT_SLOTS, FRAME_HEADER, GROUP_DATA_BLOCKS, PTR_LEN,
        SUPERBLOCK_ADDR,
    },
    map::Orphan,
    node::{Node, NodeCache},
    refcount::{Cursor, RcTable},
    registry::{record_key, Record},
};

/// Tunables; the defaults suit a host serving many VDIs.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Clean map nodes kept in memory (4 KiB each).
    pub node_cache_nodes: usize,
    /// Refcount pages kept in memory (4 KiB each).
    pub rc_cache_pages: usize,
    /// Orphan nodes taken apart per commit (the rest wait for later commits or `gc`).
    pub orphans_per_commit: usize,
    /// Commit on its own once this many map nodes are dirty (bounds memory and replay loss).
    pub max_dirty_nodes: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            node_cache_nodes: 16384,
            rc_cache_pages: 4096,
            orphans_per_commit: 2048,
            max_dirty_nodes: 32768,
        }
    }
}

/// In-memory state of one VDI or snapshot.
pub struct VdiState {
    pub rec: Record,
    /// The record (root, size, name) changed since the last commit.
    pub dirty: bool,
    /// Where this VDI's data allocations continue.
    pub cursor: Cursor,
    /// Open handles (NBD connections, rings, CLI operations).
    pub handles: usize,
}

/// The store's metadata; everything here is protected by `Store::meta`.
pub struct Meta {
    pub dev: Arc<dyn Device>,
    pub geo: Geometry,
    pub rc: RcTable,
    pub nodes: NodeCache,
    pub registry: BTree,
    pub orphans: Vec<Orphan>,
    pub orphans_changed: bool,
    /// Blocks of the committed orphan list, freed when the list is rewritten.
    pub orphan_chain: Vec<u64>,
    pub meta_cursor: Cursor,
    pub next_id: u64,
    pub vdis: HashMap<u64, VdiState>,
    /// Generation of the open transaction.
    pub gen: u64,
    /// Something in the open transaction needs committing.
    pub changed: bool,
    /// Data allocations stop this many blocks short of full, so commits always find room.
    pub reserve: u64,
}

impl Meta {
    /// The state of VDI/snapshot `id`, loading its record from the registry if needed.
    pub fn vdi(&mut self, id: u64) -> StoreResult<&mut VdiState> {
        if !self.vdis.contains_key(&id) {
            let raw = self
                .registry
                .get(&*self.dev, &record_key(id))?
                .ok_or_else(|| StoreError::NotFound(format!("id {id}")))?;
            let rec = Record::decode(&raw)?;
            self.vdis.insert(
                id,
                VdiState {
                    rec,
                    dirty: false,
                    cursor: Cursor::default(),
                    handles: 0,
                },
            );
        }
        Ok(self.vdis.get_mut(&id).expect("just inserted"))
    }

    pub fn btree_ctx(&mut self) -> (&mut BTree, Ctx<'_>) {
        (
            &mut self.registry,
            Ctx {
                dev: &*self.dev,
                rc: &mut self.rc,
                cursor: &mut self.meta_cursor,
            },
        )
    }
}

/// Committed-state bookkeeping, owned by whoever holds the commit lock.
pub(crate) struct CommitState {
    pub last: CommitRecord,
}

/// A Parallax block store.
pub struct Store {
    pub(crate) dev: Arc<dyn Device>,
    pub(crate) meta: Mutex<Meta>,
    pub(crate) commit: Mutex<CommitState>,
    pub(crate) epoch: Epoch,
    pub(crate) poisoned: AtomicBool,
    pub(crate) options: StoreOptions,
    superblock: Superblock,
    path: Option<PathBuf>,
    /// Holds the store's fcntl locks for as long as the store is open.
    _lock_file: Option<File>,
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn random_uuid() -> [u8; 16] {
    let mut b = [0u8; 16];
    let seed = format!(
        "{}-{}-{:?}",
        now_ns(),
        std::process::id(),
        std::thread::current().id()
    );
    b.copy_from_slice(&blake3::hash(seed.as_bytes()).as_bytes()[..16]);
    b
}

impl Store {
    /// Creates a store file of `size` bytes (sparse) at `path`, or initialises the block device
    /// at `path` (size = the device's; `size`, if given, must not exceed it).
    pub fn create(
        path: &Path,
        size: Option<u64>,
        options: StoreOptions,
    ) -> StoreResult<Arc<Store>> {
        let is_blockdev = std::fs::metadata(path)
            .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
            .unwrap_or(false);
        let dev = if is_blockdev {
            let d = FileDevice::open(path)?;
            super::lock::lock_exclusive(d.file())?;
            let mut head = [0u8; 8];
            d.read_at(&mut head, 0)?;
            if head == magic::SUPERBLOCK {
                return Err(StoreError::Exists(format!(
                    "a Parallax store on {} (refusing to overwrite it)",
                    path.display()
                )));
            }
            if let Some(s) = size.filter(|&s| s > d.len()) {
                return Err(StoreError::Invalid(format!(
                    "{} is only {} bytes, less than the {s} asked for",
                    path.display(),
                    d.len()
                )));
            }
            d
        } else {
            let size =
                size.ok_or_else(|| StoreError::Invalid("a store file needs a size".into()))?;
            Geometry::for_size(size)?;
            let d = FileDevice::create(path, size).map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => {
                    StoreError::Exists(format!("{} (refusing to overwrite it)", path.display()))
                }
                _ => StoreError::Io(e),
            })?;
            super::lock::lock_exclusive(d.file())?;
            d
        };
        let len = size.unwrap_or(dev.len());
        let lock = dev.file().try_clone()?;
        let dev: Arc<dyn Device> = Arc::new(dev);
        Self::format(&*dev, len)?;
        Self::open_inner(dev, options, Some(path.to_path_buf()), Some(lock))
    }

    /// Opens the store at `path` (a file or block device), taking it exclusively.
    pub fn open(path: &Path, options: StoreOptions) -> StoreResult<Arc<Store>> {
        let dev = FileDevice::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StoreError::NotFound(format!(
                "store {} (create one with `parallax --store {} init`)",
                path.display(),
                path.display()
            )),
            _ => StoreError::Io(e),
        })?;
        super::lock::lock_exclusive(dev.file())?;
        let lock = dev.file().try_clone()?;
        Self::open_inner(Arc::new(dev), options, Some(path.to_path_buf()), Some(lock))
    }

    /// Writes a fresh, empty store of `len` bytes onto `dev`.
    pub fn format(dev: &dyn Device, len: u64) -> StoreResult<()> {
        let geo = Geometry::for_size(len)?;
        let sb = Superblock {
            uuid: random_uuid(),
            created_ns: now_ns(),
            geometry: geo,
        };
        let rec = CommitRecord {
            gen: 1,
            registry_root: Ptr::HOLE,
            registry_height: 0,
            next_id: 1,
            allocated_blocks: 0,
            orphan_head: Ptr::HOLE,
            orphan_count: 0,
            time_ns: now_ns(),
            clean: true,
            group_selectors: vec![Selector::default(); geo.groups as usize],
        };
        // Commit slots first (the other one zeroed, in case the device held an old store),
        // then the superblock that makes this a store.
        let slot = COMMIT_SLOTS[(rec.gen % 2) as usize];
        let other = COMMIT_SLOTS[((rec.gen + 1) % 2) as usize];
        dev.write_at(&[0u8; BLOCK_SIZE], other * BLOCK_SIZE_U64)?;
        dev.write_at(&rec.encode(slot)[..], slot * BLOCK_SIZE_U64)?;
        dev.sync()?;
        dev.write_at(&sb.encode()[..], SUPERBLOCK_ADDR * BLOCK_SIZE_U64)?;
        dev.sync()?;
        Ok(())
    }

    /// Opens a store on an arbitrary device (tests: memory, crash simulation, fault injection).
    pub fn open_device(dev: Arc<dyn Device>, options: StoreOptions) -> StoreResult<Arc<Store>> {
        Self::open_inner(dev, options, None, None)
    }

    fn open_inner(
        dev: Arc<dyn Device>,
        options: StoreOptions,
        path: Option<PathBuf>,
        lock: Option<File>,
    ) -> StoreResult<Arc<Store>> {
        let dev_blocks = dev.len() / BLOCK_SIZE_U64;
        if dev_blocks == 0 {
            return Err(StoreError::NotAStore("the device is empty".into()));
        }
        let mut b = [0u8; BLOCK_SIZE];
        dev.read_at(&mut b, SUPERBLOCK_ADDR * BLOCK_SIZE_U64)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    StoreError::NotAStore("it is smaller than one block".into())
                } else {
                    StoreError::Io(e)
                }
            })?;
        let sb = Superblock::decode(&b, dev_blocks)?;
        let geo = sb.geometry;
        let mut best: Option<CommitRecord> = None;
        let mut errors = Vec::new();
        for slot in COMMIT_SLOTS {
            dev.read_at(&mut b, slot * BLOCK_SIZE_U64)?;
            match CommitRecord::decode(&b, slot, geo.groups) {
                Ok(r) if best.as_ref().is_none_or(|x| r.gen > x.gen) => best = Some(r),
                Ok(_) => {}
                Err(e) => errors.push(e.to_string()),
            }
        }
        let last = best.ok_or_else(|| {
            StoreError::Corrupt(format!("no valid commit record ({})", errors.join("; ")))
        })?;
        if !errors.is_empty() && last.gen > 1 {
            // Expected after a power cut during a commit (the newer record was torn); if the
            // store was closed cleanly, this is media damage and the newest commit is lost.
            warn!(
                generation = last.gen,
                "one commit record is unreadable ({}); using generation {}",
                errors.join("; "),
                last.gen
            );
        }
        if !last.clean {
            info!(
                generation = last.gen,
                "store was not closed cleanly; opening the last commit (nothing to repair)"
            );
        }
        let rc = RcTable::open(&*dev, geo, &last.group_selectors, last.gen)?;
        if rc.allocated() != last.allocated_blocks {
            return Err(StoreError::Corrupt(format!(
                "commit record counts {} allocated blocks, the refcount pages {}",
                last.allocated_blocks,
                rc.allocated()
            )));
        }
        let mut meta = Meta {
            dev: dev.clone(),
            geo,
            rc,
            nodes: NodeCache::new(options.node_cache_nodes),
            registry: BTree::new(last.registry_root, last.registry_height),
            orphans: Vec::new(),
            orphans_changed: false,
            orphan_chain: Vec::new(),
            meta_cursor: Cursor::default(),
            next_id: last.next_id,
            vdis: HashMap::new(),
            gen: last.gen + 1,
            changed: false,
            reserve: (geo.data_blocks() / 200).clamp(64, 16384),
        };
        let (orphans, chain) = read_orphan_chain(&*dev, last.orphan_head, last.orphan_count)?;
        meta.orphans = orphans;
        meta.orphan_chain = chain;
        if let Some(p) = &path {
            info!(store = %p.display(), generation = last.gen, groups = geo.groups, "opened store");
        }
        Ok(Arc::new(Store {
            dev,
            meta: Mutex::new(meta),
            commit: Mutex::new(CommitState { last }),
            epoch: Epoch::default(),
            poisoned: AtomicBool::new(false),
            options,
            superblock: sb,
            path,
            _lock_file: lock,
        }))
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn uuid(&self) -> [u8; 16] {
        self.superblock.uuid
    }

    pub fn geometry(&self) -> Geometry {
        self.superblock.geometry
    }

    /// Generation of the last durable commit.
    pub fn durable_generation(&self) -> u64 {
        self.commit.lock().last.gen
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    pub(crate) fn check_writable(&self) -> StoreResult<()> {
        if self.is_poisoned() {
            Err(StoreError::Poisoned)
        } else {
            Ok(())
        }
    }

    pub(crate) fn poison(&self, why: &dyn std::fmt::Display) {
        if !self.poisoned.swap(true, Ordering::AcqRel) {
            warn!("store write failed ({why}); refusing further writes until it is reopened");
        }
    }

    /// Makes every change made so far durable.
    pub fn flush(&self) -> StoreResult<()> {
        // Everything acknowledged so far is in the open transaction, or in one already
        // collected by a commit that may still be writing: wait for the newest of them. (A
        // commit drops the metadata lock while it writes, so "nothing changed since" does not
        // mean "durable".)
        let target = {
            let m = self.meta.lock();
            if m.changed {
                m.gen
            } else {
                m.gen - 1
            }
        };
        // A store that refuses writes cannot promise that anything is durable.
        self.check_writable()?;
        self.commit_through(target, false)
    }

    /// Commits everything and marks the store closed cleanly. The store stays usable.
    pub fn close(&self) -> StoreResult<()> {
        if self.is_poisoned() {
            return Err(StoreError::Poisoned);
        }
        let target = self.meta.lock().gen;
        self.commit_through(target, true)
    }

    /// Commits until generation `target` is durable (waiting behind a commit in progress).
    pub(crate) fn commit_through(&self, target: u64, clean: bool) -> StoreResult<()> {
        let mut cs = self.commit.lock();
        if cs.last.gen >= target && !clean {
            return Ok(());
        }
        self.commit_locked(&mut cs, clean)
    }

    /// Commits the open transaction if there is one, or if orphans wait to be taken apart (the
    /// daemon's timer calls this).
    pub fn commit_if_changed(&self) -> StoreResult<bool> {
        {
            let m = self.meta.lock();
            if !m.changed && m.orphans.is_empty() {
                return Ok(false);
            }
        }
        let mut cs = self.commit.lock();
        self.commit_locked(&mut cs, false)?;
        Ok(true)
    }

    fn commit_locked(&self, cs: &mut CommitState, clean: bool) -> StoreResult<()> {
        self.check_writable()?;
        let prepared = {
            let mut m = self.meta.lock();
            if !m.changed && !clean && m.orphans.is_empty() {
                return Ok(());
            }
            if !m.changed && clean && cs.last.clean {
                return Ok(());
            }
            let budget = self.options.orphans_per_commit;
            match self.prepare(&mut m, &cs.last, clean, budget) {
                Ok(p) => p,
                Err(e) => {
                    self.poison(&e);
                    return Err(e);
                }
            }
        };
        let Prepared { record, writes, rc } = prepared;
        let result = (|| -> StoreResult<()> {
            write_sorted(&*self.dev, writes)?;
            self.dev.sync()?;
            let slot = COMMIT_SLOTS[(record.gen % 2) as usize];
            self.dev
                .write_at(&record.encode(slot)[..], slot * BLOCK_SIZE_U64)?;
            self.dev.sync()?;
            Ok(())
        })();
        if let Err(e) = result {
            self.poison(&e);
            return Err(e);
        }
        self.meta.lock().rc.commit_done(rc);
        // Reads that may still use blocks this commit freed must finish before reuse.
        self.epoch.flip_and_wait();
        {
            let mut m = self.meta.lock();
            m.rc.release_held();
            m.nodes.trim();
            let keep = self.options.rc_cache_pages;
            m.rc.trim_cache(keep);
        }
        cs.last = record;
        Ok(())
    }

    /// Collects the open transaction into blocks to write and the commit record (FORMAT.md §8
    /// steps 2–3), and opens the next transaction.
    fn prepare(
        &self,
        m: &mut Meta,
        last: &CommitRecord,
        clean: bool,
        orphan_budget: usize,
    ) -> StoreResult<Prepared> {
        m.process_orphans(orphan_budget)?;
        let mut node_writes: Vec<(u64, Arc<Node>)> = Vec::new();
        let mut done = HashMap::new();
        // Finalise every changed record's tree, then put the record back in the registry.
        let dirty_ids: Vec<u64> = m
            .vdis
            .iter()
            .filter(|(_, v)| v.dirty)
            .map(|(id, _)| *id)
            .collect();
        for id in dirty_ids {
            let (mut root, height) = {
                let v = &m.vdis[&id];
                (v.rec.root, v.rec.height)
            };
            m.finalize(&mut root, height, &mut node_writes, &mut done);
            let v = m.vdis.get_mut(&id).expect("dirty vdi");
            v.rec.root = root;
            v.dirty = false;
            let enc = v.rec.encode();
            let (tree, mut ctx) = m.btree_ctx();
            tree.insert(&mut ctx, &record_key(id), &enc)?;
        }
        if !m.nodes.dirty.is_empty() {
            return Err(StoreError::Corrupt(format!(
                "{} map nodes changed but unreachable at commit (a bug; refusing to commit)",
                m.nodes.dirty.len()
            )));
        }
        let mut writes: Vec<(u64, WriteBuf)> = node_writes
            .into_iter()
            .map(|(a, n)| (a, WriteBuf::Node(n)))
            .collect();
        // The orphan list is rewritten whole when it changed.
        let (orphan_head, orphan_count) = if m.orphans_changed {
            for addr in std::mem::take(&mut m.orphan_chain) {
                m.rc.decr(&*m.dev, addr)?;
            }
            let (head, chain, blocks) = write_orphan_chain(m)?;
            m.orphan_chain = chain;
            m.orphans_changed = false;
            writes.extend(blocks.into_iter().map(|(a, b)| (a, WriteBuf::Owned(b))));
            (head, m.orphans.len() as u64)
        } else {
            (last.orphan_head, last.orphan_count)
        };
        for (addr, b) in m.registry.finalize() {
            writes.push((addr, WriteBuf::Owned(b)));
        }
        let gen = m.gen;
        // Refcounts last: every allocation of this transaction has happened.
        let mut rc = m.rc.prepare_commit(gen);
        let record = CommitRecord {
            gen,
            registry_root: m.registry.root,
            registry_height: m.registry.height,
            next_id: m.next_id,
            allocated_blocks: m.rc.allocated(),
            orphan_head,
            orphan_count,
            time_ns: now_ns(),
            clean,
            group_selectors: rc.group_selectors.clone(),
        };
        writes.extend(
            std::mem::take(&mut rc.writes)
                .into_iter()
                .map(|(a, b)| (a, WriteBuf::Owned(b))),
        );
        m.gen += 1;
        m.changed = false;
        Ok(Prepared { record, writes, rc })
    }

    /// Every block the last durable commit depends on: the superblock, the current commit slot,
    /// the selected copies of group headers and refcount pages, and every allocated block.
    #[cfg(test)]
    pub(crate) fn live_blocks(&self) -> Vec<u64> {
        let cs = self.commit.lock();
        let geo = self.geometry();
        let mut out = vec![SUPERBLOCK_ADDR, COMMIT_SLOTS[(cs.last.gen % 2) as usize]];
        let mut m = self.meta.lock();
        for (g, sel) in cs.last.group_selectors.iter().enumerate() {
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
        let dev = m.dev.clone();
        for b in 0..geo.total_blocks {
            if geo.locate(b).is_some() && m.rc.get(&*dev, b).expect("rc") > 0 {
                out.push(b);
            }
        }
        out
    }

    /// Blocks that can be allocated for data right now (after the commit reserve).
    pub fn free_blocks(&self) -> u64 {
        let m = self.meta.lock();
        m.rc.free().saturating_sub(m.reserve)
    }

    /// Blocks per group that hold data, for reports.
    pub fn group_data_blocks() -> u64 {
        GROUP_DATA_BLOCKS
    }
}

struct Prepared {
    record: CommitRecord,
    writes: Vec<(u64, WriteBuf)>,
    rc: super::refcount::RcCommit,
}

enum WriteBuf {
    Node(Arc<Node>),
    Owned(Box<[u8; BLOCK_SIZE]>),
}

impl WriteBuf {
    fn bytes(&self) -> &[u8] {
        match self {
            WriteBuf::Node(n) => &n.0,
            WriteBuf::Owned(b) => &b[..],
        }
    }
}

/// Writes blocks in address order, runs of adjacent blocks as one vectored write.
fn write_sorted(dev: &dyn Device, mut writes: Vec<(u64, WriteBuf)>) -> StoreResult<()> {
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

const ORPHANS_PER_BLOCK: usize = 100;
const ORPHAN_ENTRY: usize = 40;
const ORPHAN_NEXT_AT: usize = 4000;

/// Encodes the orphan list into fresh blocks; returns the head pointer, the chain's blocks,
/// and the blocks to write.
#[allow(clippy::type_complexity)]
fn write_orphan_chain(
    m: &mut Meta,
) -> StoreResult<(Ptr, Vec<u64>, Vec<(u64, Box<[u8; BLOCK_SIZE]>)>)> {
    if m.orphans.is_empty() {
        return Ok((Ptr::HOLE, Vec::new(), Vec::new()));
    }
    let chunks: Vec<Vec<Orphan>> = m
        .orphans
        .chunks(ORPHANS_PER_BLOCK)
        .map(|c| c.to_vec())
        .collect();
    let mut addrs = Vec::with_capacity(chunks.len());
    for _ in 0..chunks.len() {
        addrs.push(m.alloc_meta()?);
    }
    // Encode back to front so each block can point at (and hash) its successor.
    let mut next = Ptr::HOLE;
    let mut blocks = Vec::with_capacity(chunks.len());
    for (chunk, &addr) in chunks.iter().zip(addrs.iter()).rev() {
        let mut b = Box::new([0u8; BLOCK_SIZE]);
        for (i, o) in chunk.iter().enumerate() {
            let at = FRAME_HEADER + i * ORPHAN_ENTRY;
            o.ptr.encode(&mut b[at..at + PTR_LEN]);
            b[at + PTR_LEN] = o.level;
        }
        next.encode(&mut b[FRAME_HEADER + ORPHAN_NEXT_AT..FRAME_HEADER + ORPHAN_NEXT_AT + PTR_LEN]);
        seal_frame(
            &mut b[..],
            Frame {
                magic: magic::ORPHAN,
                gen: m.gen,
                addr,
                aux: chunk.len() as u64,
            },
        );
        next = Ptr::block(addr, super::format::hash24(&b[..]));
        blocks.push((addr, b));
    }
    Ok((next, addrs, blocks))
}

#[allow(clippy::type_complexity)]
pub(crate) fn read_orphan_chain(
    dev: &dyn Device,
    head: Ptr,
    count: u64,
) -> StoreResult<(Vec<Orphan>, Vec<u64>)> {
    let mut out = Vec::new();
    let mut chain = Vec::new();
    let mut p = head;
    while p.is_block() {
        if chain.len() as u64 > count / ORPHANS_PER_BLOCK as u64 + 1 {
            return Err(StoreError::Corrupt(
                "orphan list is longer than recorded".into(),
            ));
        }
        let mut b = [0u8; BLOCK_SIZE];
        dev.read_at(&mut b, p.addr() * BLOCK_SIZE_U64)?;
        if super::format::hash24(&b) != p.hash {
            return Err(StoreError::Corrupt(format!(
                "orphan block {} fails its checksum",
                p.addr()
            )));
        }
        let f = open_frame(&b, magic::ORPHAN, p.addr())?;
        if f.aux as usize > ORPHANS_PER_BLOCK {
            return Err(StoreError::Corrupt(format!(
                "orphan block {} holds {} entries",
                p.addr(),
                f.aux
            )));
        }
        for i in 0..f.aux as usize {
            let at = FRAME_HEADER + i * ORPHAN_ENTRY;
            let ptr = Ptr::decode(&b[at..at + PTR_LEN]);
            let level = b[at + PTR_LEN];
            if !ptr.is_block() || level == 0 || level > super::format::MAX_HEIGHT {
                return Err(StoreError::Corrupt(format!(
                    "orphan block {}: bad entry {i}",
                    p.addr()
                )));
            }
            out.push(Orphan { ptr, level });
        }
        chain.push(p.addr());
        p = Ptr::decode(&b[FRAME_HEADER + ORPHAN_NEXT_AT..FRAME_HEADER + ORPHAN_NEXT_AT + PTR_LEN]);
    }
    if out.len() as u64 != count {
        return Err(StoreError::Corrupt(format!(
            "orphan list holds {} entries, the commit record says {count}",
            out.len()
        )));
    }
    Ok((out, chain))
}
