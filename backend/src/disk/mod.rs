//! The interface every protocol front end (NBD, the blkif ring) uses to reach a VDI.
//!
//! ```text
//!   NBD connection ─┐                       ┌─ StoreDisk (a VDI or snapshot in the block store)
//!   blkif ring ─────┼─► Arc<dyn Disk> ──────┤
//!   tests ──────────┘                       └─ MemDisk (in memory, for protocol tests and
//!                                              frontend-shim; `test-utils` feature)
//! ```
//!
//! A [`Disk`] is byte addressed and safe to call from many threads at once. Front ends check
//! ranges and alignment themselves (each protocol has its own error for those) but a `Disk`
//! checks again and answers [`DiskError::OutOfRange`] rather than trusting them.
//!
//! Durability follows block-device rules: a write that returned `Ok` is visible to every later
//! read on any handle of the same VDI; it is durable once a later [`Disk::flush`] returns `Ok`
//! (or at once when written with `fua`). A flush covers writes acknowledged on *every* handle of
//! the store, not just this one, which is what lets NBD advertise `CAN_MULTI_CONN`.

use std::sync::Arc;

#[cfg(any(test, feature = "test-utils"))]
mod mem;
#[cfg(any(test, feature = "test-utils"))]
pub use mem::{MemDisk, MemProvider};

/// Bytes per sector, the unit of the blkif protocol and of the store's write granularity.
pub const SECTOR_SIZE: u64 = 512;

/// What went wrong with a request, in the terms a protocol can answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DiskError {
    /// A device read, write or sync failed, a checksum did not match, or the store refuses
    /// writes after an earlier failure.
    #[error("input/output error")]
    Io,
    /// The store has no free blocks left for this write.
    #[error("no space left in the store")]
    NoSpace,
    /// The disk is read-only (a snapshot, or opened read-only).
    #[error("read-only disk")]
    ReadOnly,
    /// The range runs past the end of the disk.
    #[error("request outside the disk")]
    OutOfRange,
    /// The request is malformed for this disk (e.g. misaligned where alignment is required).
    #[error("invalid request")]
    Invalid,
    /// The disk does not do this operation.
    #[error("operation not supported")]
    NotSupported,
}

impl DiskError {
    /// The POSIX errno that protocols (NBD replies) carry for this error.
    pub fn errno(self) -> i32 {
        match self {
            DiskError::Io => libc::EIO,
            DiskError::NoSpace => libc::ENOSPC,
            DiskError::ReadOnly => libc::EPERM,
            DiskError::OutOfRange | DiskError::Invalid => libc::EINVAL,
            DiskError::NotSupported => libc::EOPNOTSUPP,
        }
    }
}

/// How a range of a disk is backed, for NBD `base:allocation` and `qemu-img map`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentState {
    /// Allocated blocks holding data.
    Data,
    /// Reads as zeros and is recorded as zeros (write-zeroes with "no hole"), but holds no block.
    Zero,
    /// Unallocated: reads as zeros and holds no block.
    Hole,
}

/// A run of bytes that share one [`ExtentState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub state: ExtentState,
}

/// Runs of (bytes, the hash of the one block the run is, if known): [`Disk::block_hashes`].
pub type BlockHashes = Vec<(u64, Option<[u8; 24]>)>;

/// A VDI as the front ends see it. Every method may be called concurrently.
pub trait Disk: Send + Sync {
    /// Size in bytes (a multiple of [`SECTOR_SIZE`]).
    fn size(&self) -> u64;

    /// True for snapshots and read-only opens: every write-like call answers `ReadOnly`.
    fn read_only(&self) -> bool;

    /// Fills `buf` with the bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError>;

    /// Like [`Disk::read_at`] if it can be done without waiting for a device (everything in
    /// memory); `None` if it cannot, and then nothing was read. The default never can.
    fn read_nowait(&self, buf: &mut [u8], offset: u64) -> Option<Result<(), DiskError>> {
        let _ = (buf, offset);
        None
    }

    /// Writes `buf` at `offset`; with `fua` the data is durable when this returns.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), DiskError>;

    /// Makes every write acknowledged so far (on any handle of the store) durable.
    fn flush(&self) -> Result<(), DiskError>;

    /// Discards (trims) a range: whole blocks inside it are freed and read back as zeros.
    /// Partial blocks at the edges keep their contents, which TRIM permits.
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError>;

    /// Makes a range read as zeros. Whole blocks are unmapped unless `no_hole` is set, in which
    /// case they are recorded as [`ExtentState::Zero`]. Always fast: no zeros are written for
    /// whole blocks.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), DiskError>;

    /// Describes the range starting at `offset`: at least one extent, at most `max_extents`,
    /// covering at most `len` bytes; consecutive extents have different states.
    fn block_status(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Result<Vec<Extent>, DiskError>;

    /// The blake3 hashes (24 bytes, as the store keeps them) of the whole blocks in the range,
    /// for `parallax:hash:K`: runs of (bytes, `Some(hash)` for one 4 KiB block whose hash is
    /// known, `None` for a run without), at most `max` runs, covering at most `len` bytes.
    /// The default knows no hashes.
    fn block_hashes(&self, offset: u64, len: u64, max: usize) -> Result<BlockHashes, DiskError> {
        check_range(self.size(), offset, len)?;
        let _ = max;
        Ok(vec![(len, None)])
    }

    /// Hints that a range will be read soon. The default does nothing.
    fn cache(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        check_range(self.size(), offset, len)
    }
}

/// One export a [`DiskProvider`] offers, for NBD `LIST` and friends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub read_only: bool,
}

/// Why an export could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("no such export: {0}")]
    NotFound(String),
    #[error("export {name} is busy: {why}")]
    Busy { name: String, why: String },
    #[error("export {0} is read-only")]
    ReadOnly(String),
    /// The client may know the export but not open it (NBD access rules).
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    Other(String),
}

/// The catalogue of exports a daemon serves: VDIs by name (read-write) and snapshots as
/// `NAME@SNAP` (read-only).
pub trait DiskProvider: Send + Sync {
    fn list_exports(&self) -> Vec<ExportInfo>;
    /// One export's description, if it exists. The default searches [`Self::list_exports`];
    /// providers with many exports answer directly.
    fn export_info(&self, name: &str) -> Option<ExportInfo> {
        self.list_exports().into_iter().find(|e| e.name == name)
    }
    /// Opens an export. `write` asks for a writable handle; a snapshot then fails with
    /// [`OpenError::ReadOnly`]. A front end that only reads passes `false`.
    fn open_export(&self, name: &str, write: bool) -> Result<Arc<dyn Disk>, OpenError>;
}

/// Checks that `[offset, offset+len)` lies inside a disk of `size` bytes.
pub fn check_range(size: u64, offset: u64, len: u64) -> Result<(), DiskError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DiskError::OutOfRange),
    }
}
