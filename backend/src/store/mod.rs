//! The crash-safe copy-on-write block store (format: `docs/FORMAT.md`).
//!
//! ```text
//!  store     Store: its owned parts, open, create, the lock order
//!  commit    checkpoints: the cut, then hashing and writing outside it
//!  background  the checkpoint and log-writer threads
//!  io        StoreDisk: reads, writes, discard, zeroes, block status of one VDI
//!  admin     create / snapshot / fork / rename / resize / delete, reports, gc
//!  listing   list, subtree, forks, counts: registry walks in batches, never all of it
//!  apply     every change, applied alike live and in replay
//!  log       the intent log: what makes a flush durable between checkpoints
//!  replay    opening after a crash: the log replayed; upgrades from older formats
//!  check     verification of the last durable checkpoint on disk
//!  diff      changed extents between two points of history, shared subtrees skipped
//!  rollback  a VDI back to one of its snapshots
//!  dedup     the dedup index (hash → block)      sharing   inline dedup, the dedup pass
//!  schedules snapshot schedules as the registry keeps them (the daemon runs them)
//!  staging   VDIs under construction (import, recv) under a reserved name
//!  backing   remote-backed VDIs: holes read through an NBD export, via a cached copy
//!  foreign   snapshots read from outside their store (map roots, checked reads, the guard)
//!  identity  snapshot guids, the same in every store a snapshot is sent to
//!  vdi       one VDI in memory: record, lock, handles, reserved blocks
//!  radix     copy-on-write radix maps        nodes     map nodes in memory (dirty, clean)
//!  catalog   registry tree + name overlay    btree     the registry's B+tree
//!  registry  VDI/snapshot records and keys   orphans   nodes waiting to be taken apart
//!  space     refcounts + orphans + cursor    refcount  refcounts and the allocator
//!  giveback  space back to a device that can take it (RADOS objects freed whole)
//!  epoch     reader epochs for safe reuse    format    on-disk constants and layouts
//!  device    file / memory / crash-simulating / fault-injecting devices
//!  lock      exclusive ownership of a store file
//!  observe   what the store reports to a watcher (checkpoint times, dirty nodes)
//! ```

mod admin;
mod apply;
mod background;
mod backing;
mod blockhash;
mod btree;
mod catalog;
mod check;
mod commit;
mod dedup;
pub mod device;
mod diff;
mod epoch;
mod error;
mod foreign;
pub mod format;
mod giveback;
mod identity;
mod io;
mod listing;
mod lock;
mod log;
mod migration;
mod nodes;
mod observe;
mod orphans;
mod radix;
mod refcount;
mod registry;
mod replay;
mod rollback;
mod schedules;
mod sharing;
mod space;
mod staging;
#[allow(clippy::module_inception)]
mod store;
mod vdi;

pub use admin::{DeleteReport, DfReport, GcReport, ListFilter, TreeNode, VdiInfo, VdiSummary};
pub use backing::{
    cache_name, BackedUsage, BackingInfo, HydrateReport, Remote, RemoteBlock, CACHE_PREFIX,
};
pub use catalog::Counts;
pub use check::{CheckProgress, CheckReport};
pub use diff::{ChangedExtent, DiffReport};
pub use error::{StoreError, StoreResult};
pub use foreign::{MapRoot, SnapshotGuard, SnapshotMap};
pub use identity::SnapshotIdentity;
pub use io::{StoreDisk, DATA_ERROR_TARGET};
pub use migration::{incoming_name, parked_name, INCOMING_PREFIX, PARKED_PREFIX};
pub use registry::{is_hidden, split_name, validate_name, Kind};
pub use rollback::RollbackReport;
pub use schedules::{validate_target, KeepRule, Schedule};
pub use sharing::{DedupPosition, DedupProgress, DedupReport, DedupStatus, DedupUsage};
pub use staging::{is_staging, Staged, STAGING_PREFIX};
pub use store::{Store, StoreOptions};

#[cfg(test)]
mod backing_tests;
#[cfg(test)]
mod dedup_tests;
#[cfg(test)]
mod tests;
