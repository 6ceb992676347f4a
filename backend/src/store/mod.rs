//! The crash-safe copy-on-write block store (format: `docs/FORMAT.md`).
//!
//! ```text
//!  io        StoreDisk: reads, writes, discard, zeroes, block status of one VDI
//!  admin     create / snapshot / fork / rename / resize / delete, reports, gc
//!  check     verification of the last durable commit on disk
//!  engine    Store: open, create, the metadata lock, the commit protocol
//!  map       copy-on-write radix maps        btree     the registry's B+tree
//!  node      map nodes and their cache      registry  VDI/snapshot records and keys
//!  refcount  refcounts and the allocator    epoch     reader epochs for safe reuse
//!  format    on-disk constants and fixed-layout blocks
//!  device    file / memory / crash-simulating / fault-injecting devices
//!  lock      exclusive ownership of a store file
//! ```

mod admin;
mod btree;
mod check;
pub mod device;
mod engine;
mod epoch;
mod error;
pub mod format;
mod io;
mod lock;
mod map;
mod node;
mod refcount;
mod registry;

pub use admin::{DeleteReport, DfReport, GcReport, TreeNode, VdiInfo, VdiSummary};
pub use check::{CheckProgress, CheckReport};
pub use engine::{Store, StoreOptions};
pub use error::{StoreError, StoreResult};
pub use io::StoreDisk;
pub use registry::{validate_name, Kind};

#[cfg(test)]
mod tests;
