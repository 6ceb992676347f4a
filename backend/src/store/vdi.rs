//! One VDI or snapshot in memory: its record (root, size, name) under its own lock, its open
//! handles, and the blocks reserved for its next data writes.
//!
//! ```text
//!  Vdi ─ state: RwLock<VdiState>   record + "changed since the last cut"; read-locked by
//!      │                           lookups, write-locked by changes to this VDI's map only
//!      ─ handles                   NBD connections, rings, CLI operations holding it open
//!      ─ batch: Mutex<Batch>       data blocks reserved ahead, so most writes allocate
//!                                  without the space lock
//! ```
//!
//! VDIs are loaded on demand and stay loaded while they are open or changed since the last
//! checkpoint ([`Vdis`]).

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use parking_lot::{Mutex, RwLock};

use super::{refcount::Cursor, registry::Record};

pub(super) struct VdiState {
    pub rec: Record,
    /// Changed since the last cut: the next checkpoint writes (or, if `deleted`, removes) the
    /// record.
    pub changed: bool,
    pub deleted: bool,
    /// Bumped by a rollback: handles opened before it are detached (not on disk).
    pub detached: u64,
}

/// Blocks reserved for a VDI's data, handed out in order.
#[derive(Default)]
pub(super) struct Batch {
    runs: VecDeque<(u64, u64)>,
    /// Where the next reservation continues, so that a VDI's data stays together.
    pub cursor: Cursor,
    /// How many blocks the next refill asks for (grows while the VDI writes a lot).
    pub next_refill: u64,
}

/// Most blocks one refill reserves.
pub(super) const MAX_BATCH: u64 = 256;

impl Batch {
    pub fn available(&self) -> u64 {
        self.runs.iter().map(|r| r.1).sum()
    }

    pub fn add(&mut self, runs: Vec<(u64, u64)>) {
        self.runs.extend(runs);
    }

    /// Takes `n` blocks (the caller made sure there are enough), as runs.
    pub fn take(&mut self, mut n: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        while n > 0 {
            let (a, len) = self.runs.front_mut().expect("enough reserved");
            let k = n.min(*len);
            out.push((*a, k));
            *a += k;
            *len -= k;
            n -= k;
            if *len == 0 {
                self.runs.pop_front();
            }
        }
        out
    }

    /// Gives back unused runs (to return to the allocator).
    pub fn drain(&mut self) -> Vec<(u64, u64)> {
        self.runs.drain(..).collect()
    }
}

pub(super) struct Vdi {
    pub id: u64,
    pub state: RwLock<VdiState>,
    handles: AtomicUsize,
    pub batch: Mutex<Batch>,
}

impl Vdi {
    pub fn new(rec: Record, changed: bool) -> Arc<Vdi> {
        Arc::new(Vdi {
            id: rec.id,
            state: RwLock::new(VdiState {
                rec,
                changed,
                deleted: false,
                detached: 0,
            }),
            handles: AtomicUsize::new(0),
            batch: Mutex::new(Batch::default()),
        })
    }

    pub fn handles(&self) -> usize {
        self.handles.load(Ordering::Acquire)
    }

    pub fn open_handle(&self) {
        self.handles.fetch_add(1, Ordering::AcqRel);
    }

    /// Returns the handles left.
    pub fn close_handle(&self) -> usize {
        self.handles.fetch_sub(1, Ordering::AcqRel) - 1
    }
}

/// The loaded VDIs, and which of them changed since the last cut.
#[derive(Default)]
pub(super) struct Vdis {
    loaded: RwLock<HashMap<u64, Arc<Vdi>>>,
    changed: Mutex<Vec<Arc<Vdi>>>,
}

impl Vdis {
    pub fn get(&self, id: u64) -> Option<Arc<Vdi>> {
        self.loaded.read().get(&id).cloned()
    }

    /// Adds a VDI just loaded (or made); if another thread loaded it first, returns that one.
    pub fn insert(&self, vdi: Arc<Vdi>) -> Arc<Vdi> {
        self.loaded.write().entry(vdi.id).or_insert(vdi).clone()
    }

    /// Notes that `vdi` changed (call with its state write-locked, after setting `changed`
    /// from false to true).
    pub fn note_changed(&self, vdi: &Arc<Vdi>) {
        self.changed.lock().push(vdi.clone());
    }

    /// The VDIs changed since the last cut (the cut takes them).
    pub fn take_changed(&self) -> Vec<Arc<Vdi>> {
        std::mem::take(&mut *self.changed.lock())
    }

    pub fn all(&self) -> Vec<Arc<Vdi>> {
        self.loaded.read().values().cloned().collect()
    }

    /// Forgets VDIs that are deleted, or closed and unchanged since the last checkpoint;
    /// returns the data blocks their batches still held.
    pub fn unload_idle(&self) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        let mut loaded = self.loaded.write();
        loaded.retain(|_, v| {
            let st = v.state.read();
            let idle = v.handles() == 0 && !st.changed && Arc::strong_count(v) == 1;
            if idle || (st.deleted && !st.changed) {
                runs.extend(v.batch.lock().drain());
                false
            } else {
                true
            }
        });
        runs
    }
}
