//! The store's error type: one enum, each variant a kind of failure a caller can act on.

use crate::disk::DiskError;

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The device failed a read, write or sync.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A block failed its checksum or holds impossible values.
    #[error("store is damaged: {0}")]
    Corrupt(String),
    /// A data block's contents do not match the checksum its map entry holds.
    #[error("checksum mismatch in {0}")]
    Checksum(String),
    #[error("not a Parallax store: {0}")]
    NotAStore(String),
    /// Nothing at the store's path.
    #[error("store {} does not exist (create it with `parallax --store {} init`)", .0.display(), .0.display())]
    NoStore(std::path::PathBuf),
    #[error(
        "unsupported store format version {0} (this parallax reads versions {oldest} to {newest})",
        oldest = super::format::OLDEST_VERSION,
        newest = super::format::FORMAT_VERSION
    )]
    Version(u64),
    #[error("store is truncated: it should be {expected} bytes, the device has {found}")]
    Truncated { expected: u64, found: u64 },
    #[error("store is in use by {}", match .pid { Some(p) => format!("PID {p}"), None => "another process".to_string() })]
    InUse { pid: Option<i32> },
    /// A bad argument from the caller.
    #[error("{0}")]
    Invalid(String),
    #[error("no such VDI or snapshot: {0}")]
    NotFound(String),
    /// No snapshot schedule for this name or pattern.
    #[error("no schedule for {0}")]
    NoSchedule(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("no space left in the store")]
    NoSpace,
    #[error("{0} is read-only")]
    ReadOnly(String),
    #[error("{0}")]
    Busy(String),
    /// A walk followed a pointer without a hash, taken from a node it held while a checkpoint
    /// wrote and evicted the child; walked again from the root, it finds the hash
    /// (`nodes::retry_evicted`).
    #[error("map node at block {0} was evicted while a walk held a stale copy of its parent")]
    Evicted(u64),
    /// The handle's VDI was rolled back under it (`rollback --force`).
    #[error("{0} was rolled back while open (rollback --force); reopen it")]
    Detached(String),
    /// A remote-backed VDI's backing could not be read (unreachable past the reconnect
    /// delay, or it answered with an error).
    #[error("remote backing: {0}")]
    Remote(String),
    /// Another Parallax host (a migration's other end) failed or could not be reached.
    #[error("{0}")]
    Peer(String),
    /// An earlier write or sync failed; the store refuses writes until it is reopened.
    #[error("the store refuses writes after an earlier I/O error; restart or reopen it")]
    Poisoned,
}

impl StoreError {
    /// The protocol-level error a front end reports for this.
    pub fn disk_error(&self) -> DiskError {
        match self {
            StoreError::NoSpace => DiskError::NoSpace,
            StoreError::ReadOnly(_) => DiskError::ReadOnly,
            StoreError::Invalid(_) => DiskError::Invalid,
            // The file system under a sparse store file is full.
            StoreError::Io(e) if e.raw_os_error() == Some(libc::ENOSPC) => DiskError::NoSpace,
            _ => DiskError::Io,
        }
    }

    /// Short machine-readable kind, for `--json` and the control protocol.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Io(_) => "io",
            StoreError::Corrupt(_) | StoreError::Checksum(_) | StoreError::Evicted(_) => "corrupt",
            StoreError::NotAStore(_) | StoreError::Version(_) | StoreError::Truncated { .. } => {
                "bad-store"
            }
            StoreError::InUse { .. } => "in-use",
            StoreError::Invalid(_) => "invalid",
            StoreError::NotFound(_) | StoreError::NoStore(_) | StoreError::NoSchedule(_) => {
                "not-found"
            }
            StoreError::Exists(_) => "exists",
            StoreError::NoSpace => "no-space",
            StoreError::ReadOnly(_) => "read-only",
            StoreError::Busy(_) => "busy",
            StoreError::Detached(_) => "detached",
            StoreError::Poisoned => "poisoned",
            StoreError::Remote(_) | StoreError::Peer(_) => "remote",
        }
    }
}
