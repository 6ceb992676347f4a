//! The store: its owned parts, opening and creating it, and the rules that tie the parts
//! together.
//!
//! ```text
//!   Store ─ gate: RwLock<()>        every change holds it shared; a checkpoint's cut holds it
//!         │                         exclusively for the few microseconds the cut takes
//!         ─ catalog: Mutex          registry tree + name overlay + id counter
//!         ─ vdis                    loaded VDIs, each with its own lock (maps change per VDI)
//!         ─ nodes: NodeTable        map nodes, sharded; dirty ones by generation
//!         ─ space: Mutex<Space>     refcounts, orphans, metadata cursor, dedup index changes
//!         │                         (microseconds)
//!         ─ dedup: Mutex            the dedup index as of the last cut (dedup.rs)
//!         ─ commit: Mutex           the last durable commit record; one checkpoint at a
//!         │                         time (commit.rs)
//!         ─ log                     the intent log (log.rs)
//!         ─ background              checkpoint thread, log writer (background.rs)
//!         ─ epoch                   readers in flight, so freed blocks are reused after them
//!         ─ dev: Arc<dyn Device>
//! ```
//!
//! Lock order: (a guard's lock, foreign.rs) → holds (backing.rs) → gate → catalog → a VDI's
//! state → space → dedup → (node shards, leaves). Data never
//! moves under any of them: lookups return pointers, and reads and writes of data blocks
//! happen after the locks are dropped (io.rs).

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, OnceLock,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use parking_lot::{Mutex, RwLock, RwLockReadGuard};
use tracing::{debug, info, warn};

use super::{
    background::{Background, WorkerId},
    catalog::Catalog,
    dedup::{DedupIndex, DedupSettings, IndexChanges},
    device::{Device, FileDevice},
    epoch::Epoch,
    error::{StoreError, StoreResult},
    format::{
        commit_layout, magic, CommitRecord, Geometry, LogPosition, Ptr, Selector, Superblock,
        BLOCK_SIZE, BLOCK_SIZE_U64, COMMIT_SLOTS, DEDUP_VERSION, FORMAT_VERSION, GROUP_DATA_BLOCKS,
        LOG_BLOCK_ENTRIES, SUPERBLOCK_ADDR,
    },
    log::Log,
    nodes::NodeTable,
    orphans::{read_chain, OrphanList},
    radix::Tx,
    refcount::{Cursor, RcTable},
    space::Space,
    vdi::{Vdi, Vdis},
};

/// Tunables; the defaults suit a host serving many VDIs.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Clean map nodes kept in memory (4 KiB each).
    pub node_cache_nodes: usize,
    /// Refcount pages kept in memory (4 KiB each).
    pub rc_cache_pages: usize,
    /// Leaf blocks of the dedup index kept in memory for inline dedup's lookups (4 KiB
    /// each). A duplicate block whose leaf is not here costs a leaf read and its hash check.
    pub dedup_leaf_cache: usize,
    /// Orphan nodes taken apart per checkpoint (the rest wait for later ones or `gc`).
    pub orphans_per_commit: usize,
    /// Checkpoint once this many map nodes wait in memory (bounds memory and replay work).
    pub max_dirty_nodes: usize,
    /// A background thread checkpoints at least this often while anything changed. `None`:
    /// no thread; checkpoints happen only when asked for (and, past `max_dirty_nodes`, in
    /// the writer that crossed it) — for tests that need a deterministic sequence of writes.
    pub checkpoint_interval: Option<Duration>,
    /// On a device that can give space back (a store in RADOS): how long a unit (object) waits
    /// after a block of it was last freed before it is given back (giveback.rs).
    pub give_back_after: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            node_cache_nodes: 16384,
            rc_cache_pages: 4096,
            dedup_leaf_cache: 8192,
            orphans_per_commit: 2048,
            max_dirty_nodes: 32768,
            checkpoint_interval: Some(Duration::from_secs(5)),
            give_back_after: super::giveback::GIVE_BACK_AFTER,
        }
    }
}

/// A Parallax block store.
pub struct Store {
    pub(super) dev: Arc<dyn Device>,
    pub(super) gate: RwLock<()>,
    /// The open generation (changes only under the gate, exclusively).
    gen: AtomicU64,
    /// Something changed in the open generation.
    changed: AtomicBool,
    pub(super) catalog: Mutex<Catalog>,
    pub(super) vdis: Vdis,
    pub(super) nodes: NodeTable,
    pub(super) space: Mutex<Space>,
    /// The dedup index as of the last cut (dedup.rs); the open generation's changes to it
    /// are in `space`.
    pub(super) dedup: Mutex<DedupIndex>,
    pub(super) dedup_settings: DedupSettings,
    /// The last durable commit record; held by whoever checkpoints (one at a time).
    pub(super) commit: Mutex<CommitRecord>,
    pub(super) background: Background,
    pub(super) checkpoint_worker: OnceLock<WorkerId>,
    /// A checkpoint ran since the checkpoint thread last gave freed memory back
    /// ([`crate::malloc::release_free_memory`]): whoever ran it, a flush included.
    pub(super) checkpointed: AtomicBool,
    /// Told how long each checkpoint took (observe.rs).
    pub(super) checkpoint_hook: OnceLock<super::observe::CheckpointHook>,
    pub(super) log: Log,
    /// The format version the store is in (1 until `upgrade`).
    version: AtomicU64,
    pub(super) epoch: Epoch,
    /// Units of the device that may be given back (giveback.rs).
    pub(super) give_back: Mutex<super::giveback::Candidates>,
    /// Writes through handles so far (background dedup runs while it stands still).
    client_writes: AtomicU64,
    poisoned: AtomicBool,
    pub(super) options: StoreOptions,
    superblock: Superblock,
    path: Option<PathBuf>,
    /// How backed VDIs reach their remote exports (`backing.rs`); none until given.
    pub(super) remote: RwLock<Option<Arc<dyn super::backing::Remote>>>,
    /// Held while a backing is held or released (`backing.rs`): a VDI made backed by it
    /// and the release of the last one before it never interleave.
    pub(super) holds: Mutex<()>,
    /// Asked before snapshots go (`foreign.rs`); none unless given.
    pub(super) snapshot_guard: RwLock<Option<Arc<dyn super::foreign::SnapshotGuard>>>,
    /// What makes the store this process's for as long as it is open: the file holding its
    /// fcntl locks, or a cluster lease (`crate::cluster`). Declared last, so dropped after the
    /// device.
    _held: Option<Box<dyn std::any::Any + Send + Sync>>,
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A random 64-bit value (ids that must differ between sessions, not secrets).
pub(super) fn random_u64() -> u64 {
    let h = blake3::hash(format!("{:?}", random_uuid()).as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

fn random_uuid() -> [u8; 16] {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut b = [0u8; 16];
    let seed = format!(
        "{}-{}-{}-{:?}",
        COUNTER.fetch_add(1, Ordering::Relaxed),
        now_ns(),
        std::process::id(),
        std::thread::current().id()
    );
    b.copy_from_slice(&blake3::hash(seed.as_bytes()).as_bytes()[..16]);
    b
}

/// How often the log writer looks for buffered entries to write ahead of a flush.
const WRITE_AHEAD_EVERY: Duration = Duration::from_millis(2);

/// How often the writeback thread starts writing dirty pages of the store out, so that a flush,
/// snapshot or fork pays for at most this long's writes in its sync rather than for everything
/// written since the last one (bench/limits.md, "Snapshots").
const WRITEBACK_EVERY: Duration = Duration::from_millis(10);

/// A change in progress: the gate held shared, in generation `gen`.
pub(super) struct Change<'a> {
    _gate: RwLockReadGuard<'a, ()>,
    pub gen: u64,
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
                    "a Parallax store on {}",
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
                std::io::ErrorKind::AlreadyExists => StoreError::Exists(path.display().to_string()),
                _ => StoreError::Io(e),
            })?;
            super::lock::lock_exclusive(d.file())?;
            d
        };
        let len = size.unwrap_or(dev.len());
        let lock = dev.file().try_clone()?;
        let dev: Arc<dyn Device> = Arc::new(dev);
        Self::format(&*dev, len)?;
        Self::open_inner(dev, options, Some(path.to_path_buf()), Some(Box::new(lock)))
    }

    /// Opens the store at `path` (a file or block device), taking it exclusively.
    pub fn open(path: &Path, options: StoreOptions) -> StoreResult<Arc<Store>> {
        let dev = FileDevice::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StoreError::NoStore(path.to_path_buf()),
            _ => StoreError::Io(e),
        })?;
        super::lock::lock_exclusive(dev.file())?;
        let lock = dev.file().try_clone()?;
        Self::open_inner(
            Arc::new(dev),
            options,
            Some(path.to_path_buf()),
            Some(Box::new(lock)),
        )
    }

    /// Writes a fresh, empty store of `len` bytes onto `dev`.
    pub fn format(dev: &dyn Device, len: u64) -> StoreResult<()> {
        let geo = Geometry::for_size(len)?;
        let sb = Superblock {
            version: FORMAT_VERSION,
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
            log: LogPosition::default(),
            version: commit_layout(FORMAT_VERSION),
            dedup: Default::default(),
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

    /// Opens a store on `dev` that `held` makes this process's (the store keeps it until it
    /// is dropped); `label` names it in messages.
    pub fn open_held(
        dev: Arc<dyn Device>,
        options: StoreOptions,
        label: PathBuf,
        held: Box<dyn std::any::Any + Send + Sync>,
    ) -> StoreResult<Arc<Store>> {
        Self::open_inner(dev, options, Some(label), Some(held))
    }

    fn open_inner(
        dev: Arc<dyn Device>,
        options: StoreOptions,
        path: Option<PathBuf>,
        held: Option<Box<dyn std::any::Any + Send + Sync>>,
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
        let (sb, torn) = match Superblock::decode(&b, dev_blocks) {
            Ok(sb) => (sb, false),
            Err(e) => match Superblock::decode_torn_upgrade(&b, dev_blocks) {
                Some(sb) => (sb, true),
                None => return Err(e),
            },
        };
        if torn {
            warn!(
                "the superblock was torn by an interrupted `parallax upgrade`; the store stays format {} (run `parallax upgrade` again)",
                sb.version
            );
            dev.write_at(&sb.encode()[..], SUPERBLOCK_ADDR * BLOCK_SIZE_U64)?;
            dev.sync()?;
        }
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
        let (orphans, chain) = read_chain(&*dev, last.orphan_head, last.orphan_count)?;
        let space = Space {
            rc,
            orphans: OrphanList {
                list: orphans,
                changed: false,
                chain,
            },
            meta_cursor: Cursor::default(),
            base_reserve: (geo.data_blocks() / 200).clamp(64, 16384),
            index_entries: 0,
            dedup: IndexChanges::new(sb.version >= DEDUP_VERSION),
        };
        let dedup = DedupIndex::open(&*dev, last.dedup, options.dedup_leaf_cache)?;
        let mut space = space;
        space.index_entries = dedup.entries;
        if let Some(p) = &path {
            info!(store = %p.display(), generation = last.gen, groups = geo.groups, "opened store");
        }
        let log_pos = last.log;
        let store = Arc::new(Store {
            log: Log::new(log_pos.lsn, false),
            version: AtomicU64::new(sb.version),
            gate: RwLock::new(()),
            gen: AtomicU64::new(last.gen + 1),
            changed: AtomicBool::new(false),
            catalog: Mutex::new(Catalog::new(
                last.registry_root,
                last.registry_height,
                last.next_id,
            )),
            vdis: Vdis::default(),
            remote: RwLock::new(None),
            holds: Mutex::new(()),
            snapshot_guard: RwLock::new(None),
            nodes: NodeTable::new(options.node_cache_nodes, last.gen),
            space: Mutex::new(space),
            dedup: Mutex::new(dedup),
            dedup_settings: DedupSettings::new(last.dedup.flags),
            commit: Mutex::new(last),
            background: Background::default(),
            checkpoint_worker: OnceLock::new(),
            checkpointed: AtomicBool::new(false),
            checkpoint_hook: OnceLock::new(),
            epoch: Epoch::default(),
            give_back: Default::default(),
            client_writes: AtomicU64::new(0),
            poisoned: AtomicBool::new(false),
            dev,
            options,
            superblock: sb,
            path,
            _held: held,
        });
        if store.format_version() >= 2 {
            store.recover(log_pos)?;
        }
        store.remove_staging_leftovers()?;
        store.start_background();
        Ok(store)
    }

    /// Starts the checkpoint thread and the log writer (when `checkpoint_interval` is set).
    fn start_background(self: &Arc<Self>) {
        let Some(every) = self.options.checkpoint_interval else {
            return;
        };
        let checkpoints = self.start_worker("parallax-ckpt", every, |store| {
            if !store.is_poisoned() {
                if let Err(e) = store.checkpoint() {
                    warn!("background checkpoint failed: {e}");
                }
            }
            // Here rather than after each checkpoint: a flush's checkpoint would wait for it.
            if store.checkpointed.swap(false, Ordering::AcqRel) {
                crate::malloc::release_free_memory();
            }
        });
        match checkpoints {
            Ok(id) => {
                let _ = self.checkpoint_worker.set(id);
            }
            Err(e) => warn!("cannot start the checkpoint thread ({e}); checkpoints only on flush"),
        }
        let log = self.start_worker("parallax-log", WRITE_AHEAD_EVERY, |store| {
            if store.is_poisoned() || !store.log.enabled() {
                return;
            }
            let written = store
                .log
                .write_ahead(&*store.dev, &store.space, LOG_BLOCK_ENTRIES / 2);
            if let Err(e) = written {
                if !matches!(e, StoreError::NoSpace) {
                    store.poison(&e);
                }
            }
        });
        if let Err(e) = log {
            warn!("cannot start the log writer ({e}); flushes write the whole log");
        }
        if !self.dev.writes_back() {
            return;
        }
        let writeback = self.start_worker("parallax-wback", WRITEBACK_EVERY, |store| {
            if let Err(e) = store.dev.start_writeback() {
                // Only a hint: the next sync reports any real failure.
                debug!("starting writeback failed: {e}");
            }
        });
        if let Err(e) = writeback {
            warn!("cannot start the writeback thread ({e}); syncs write everything themselves");
        }
    }

    /// Starts a background worker running `task` on this store; it ends once the store is gone
    /// (the worker holds it only while the task runs).
    fn start_worker(
        self: &Arc<Self>,
        name: &str,
        every: Duration,
        task: impl Fn(&Store) + Send + 'static,
    ) -> std::io::Result<WorkerId> {
        let weak = Arc::downgrade(self);
        self.background
            .start(name, every, move || match weak.upgrade() {
                Some(store) => {
                    task(&store);
                    true
                }
                None => false,
            })
    }

    /// The format version the store is in.
    pub fn format_version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    pub(super) fn version_cell(&self) -> &AtomicU64 {
        &self.version
    }

    pub(super) fn superblock(&self) -> &Superblock {
        &self.superblock
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

    /// What makes the store this process's (given to [`Store::open_held`]), for its owner to
    /// look at.
    pub fn held(&self) -> Option<&(dyn std::any::Any + Send + Sync)> {
        self._held.as_deref()
    }

    /// Generation of the last durable checkpoint.
    pub fn durable_generation(&self) -> u64 {
        self.commit.lock().gen
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    pub(super) fn check_writable(&self) -> StoreResult<()> {
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

    /// Starts a change: the gate shared, so the change belongs to one generation.
    pub(super) fn change(&self) -> Change<'_> {
        let gate = self.gate.read();
        Change {
            _gate: gate,
            gen: self.gen.load(Ordering::Acquire),
        }
    }

    /// Notes that the open generation holds a change (call inside a [`Change`]).
    pub(super) fn mark_changed(&self) {
        if !self.changed.load(Ordering::Relaxed) {
            self.changed.store(true, Ordering::Release);
        }
    }

    /// Whether the open generation holds changes.
    pub(super) fn has_changes(&self) -> bool {
        self.changed.load(Ordering::Acquire)
    }

    /// Closes the open generation (only under the gate, exclusively): returns it and whether
    /// it held changes.
    pub(super) fn advance_generation(&self) -> (u64, bool) {
        let gen = self.gen.fetch_add(1, Ordering::AcqRel);
        (gen, self.changed.swap(false, Ordering::AcqRel))
    }

    pub(super) fn open_generation(&self) -> u64 {
        self.gen.load(Ordering::Acquire)
    }

    /// A transaction over the maps for a change in generation `gen` (the space lock held by
    /// the caller).
    pub(super) fn tx<'a>(&'a self, space: &'a mut Space, gen: u64) -> Tx<'a> {
        Tx {
            dev: &*self.dev,
            nodes: &self.nodes,
            space,
            gen,
        }
    }

    /// The loaded VDI `id`, loading its record if needed.
    pub(super) fn vdi(&self, id: u64) -> StoreResult<Arc<Vdi>> {
        if let Some(v) = self.vdis.get(id) {
            return Ok(v);
        }
        let rec = self
            .catalog
            .lock()
            .record(&*self.dev, id)?
            .ok_or_else(|| StoreError::NotFound(format!("id {id}")))?;
        Ok(self.vdis.insert(Vdi::new(rec, false)))
    }

    /// The loaded VDI `NAME` or `NAME@SNAP`.
    pub(super) fn vdi_named(&self, name: &str) -> StoreResult<Arc<Vdi>> {
        let id = self.catalog.lock().resolve(&*self.dev, name)?;
        self.vdi(id)
    }

    /// Writes made through handles since the store opened.
    pub fn client_writes(&self) -> u64 {
        self.client_writes.load(Ordering::Relaxed)
    }

    pub(super) fn note_client_write(&self) {
        self.client_writes.fetch_add(1, Ordering::Relaxed);
    }

    /// Blocks that can be allocated for data right now (after the checkpoint reserve).
    pub fn free_blocks(&self) -> u64 {
        let s = self.space.lock();
        s.rc.free().saturating_sub(s.reserve())
    }

    /// Blocks per group that hold data, for reports.
    pub fn group_data_blocks() -> u64 {
        GROUP_DATA_BLOCKS
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.background.stop();
    }
}
