//! The interface every protocol front end (NBD, the blkif ring) uses to reach a VDI.
//!
//! ```text
//!   NBD connection ─┐                       ┌─ StoreDisk (a VDI or snapshot in the block store)
//!   blkif ring ─────┼─► Arc<dyn Disk> ──────┤
//!   tests ──────────┘                       └─ MemDisk (in memory, for protocol tests)
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

use std::{collections::HashMap, sync::Arc};

use parking_lot::Mutex;

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

const MEM_BLOCK: u64 = 4096;

#[derive(Clone)]
enum MemBlock {
    Data(Box<[u8; MEM_BLOCK as usize]>),
    Zero,
}

/// A sparse in-memory [`Disk`] for protocol tests: 4 KiB blocks in a hash map, holes where
/// nothing was written. Flush does nothing (there is nothing to make durable).
pub struct MemDisk {
    size: u64,
    read_only: bool,
    blocks: Mutex<HashMap<u64, MemBlock>>,
}

impl MemDisk {
    pub fn new(size: u64) -> Self {
        MemDisk {
            size,
            read_only: false,
            blocks: Mutex::new(HashMap::new()),
        }
    }

    /// A read-only view holding a copy of this disk's current contents.
    pub fn snapshot(&self) -> Self {
        MemDisk {
            size: self.size,
            read_only: true,
            blocks: Mutex::new(self.blocks.lock().clone()),
        }
    }

    fn zero_range(&self, offset: u64, len: u64, no_hole: bool) {
        let mut blocks = self.blocks.lock();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let blk = pos / MEM_BLOCK;
            let in_blk = pos % MEM_BLOCK;
            let n = (MEM_BLOCK - in_blk).min(end - pos);
            if n == MEM_BLOCK {
                if no_hole {
                    blocks.insert(blk, MemBlock::Zero);
                } else {
                    blocks.remove(&blk);
                }
            } else if let Some(MemBlock::Data(b)) = blocks.get_mut(&blk) {
                b[in_blk as usize..(in_blk + n) as usize].fill(0);
            }
            pos += n;
        }
    }
}

impl Disk for MemDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_nowait(&self, buf: &mut [u8], offset: u64) -> Option<Result<(), DiskError>> {
        Some(self.read_at(buf, offset))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(self.size, offset, buf.len() as u64)?;
        let blocks = self.blocks.lock();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_blk = (pos % MEM_BLOCK) as usize;
            let n = (MEM_BLOCK as usize - in_blk).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match blocks.get(&(pos / MEM_BLOCK)) {
                Some(MemBlock::Data(b)) => out.copy_from_slice(&b[in_blk..in_blk + n]),
                _ => out.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(self.size, offset, buf.len() as u64)?;
        let mut blocks = self.blocks.lock();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_blk = (pos % MEM_BLOCK) as usize;
            let n = (MEM_BLOCK as usize - in_blk).min(buf.len() - done);
            let entry = blocks
                .entry(pos / MEM_BLOCK)
                .or_insert_with(|| MemBlock::Data(Box::new([0; MEM_BLOCK as usize])));
            if let MemBlock::Zero = entry {
                *entry = MemBlock::Data(Box::new([0; MEM_BLOCK as usize]));
            }
            if let MemBlock::Data(b) = entry {
                b[in_blk..in_blk + n].copy_from_slice(&buf[done..done + n]);
            }
            done += n;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), DiskError> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(self.size, offset, len)?;
        // Only whole blocks are dropped; partial edges keep their data.
        let first = offset.div_ceil(MEM_BLOCK);
        let last = (offset + len) / MEM_BLOCK;
        let mut blocks = self.blocks.lock();
        for blk in first..last {
            blocks.remove(&blk);
        }
        Ok(())
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        _fua: bool,
    ) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(self.size, offset, len)?;
        self.zero_range(offset, len, no_hole);
        Ok(())
    }

    fn block_status(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Result<Vec<Extent>, DiskError> {
        check_range(self.size, offset, len)?;
        let blocks = self.blocks.lock();
        let mut out: Vec<Extent> = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let n = (MEM_BLOCK - pos % MEM_BLOCK).min(end - pos);
            let state = match blocks.get(&(pos / MEM_BLOCK)) {
                Some(MemBlock::Data(_)) => ExtentState::Data,
                Some(MemBlock::Zero) => ExtentState::Zero,
                None => ExtentState::Hole,
            };
            let full = out.len() >= max_extents.max(1);
            match out.last_mut() {
                Some(last) if last.state == state => last.len += n,
                _ if full => break,
                _ => out.push(Extent { len: n, state }),
            }
            pos += n;
        }
        Ok(out)
    }
}

/// A [`DiskProvider`] over named [`MemDisk`]s, for protocol tests.
#[derive(Default)]
pub struct MemProvider {
    disks: Mutex<Vec<(String, Arc<MemDisk>)>>,
}

impl MemProvider {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&self, name: &str, disk: MemDisk) -> Arc<MemDisk> {
        let disk = Arc::new(disk);
        self.disks.lock().push((name.to_string(), disk.clone()));
        disk
    }
}

impl DiskProvider for MemProvider {
    fn list_exports(&self) -> Vec<ExportInfo> {
        self.disks
            .lock()
            .iter()
            .map(|(name, d)| ExportInfo {
                name: name.clone(),
                description: String::new(),
                size: d.size(),
                read_only: d.read_only(),
            })
            .collect()
    }

    fn open_export(&self, name: &str, write: bool) -> Result<Arc<dyn Disk>, OpenError> {
        let disks = self.disks.lock();
        let (_, d) = disks
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| OpenError::NotFound(name.to_string()))?;
        if write && d.read_only() {
            return Err(OpenError::ReadOnly(name.to_string()));
        }
        Ok(d.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memdisk_round_trip_and_status() {
        let d = MemDisk::new(1 << 20);
        d.write_at(&[7u8; 1000], 4000, false).unwrap();
        let mut buf = vec![0u8; 1100];
        d.read_at(&mut buf, 3950).unwrap();
        assert!(buf[..50].iter().all(|&b| b == 0));
        assert!(buf[50..1050].iter().all(|&b| b == 7));
        assert!(buf[1050..].iter().all(|&b| b == 0));
        let st = d.block_status(0, 1 << 20, 16).unwrap();
        assert_eq!(
            st,
            vec![
                Extent {
                    len: 8192,
                    state: ExtentState::Data
                },
                Extent {
                    len: (1 << 20) - 8192,
                    state: ExtentState::Hole
                },
            ]
        );
        d.write_zeroes(4096, 4096, true, false).unwrap();
        let st = d.block_status(4096, 8192, 16).unwrap();
        assert_eq!(
            st[0],
            Extent {
                len: 4096,
                state: ExtentState::Zero
            }
        );
        assert_eq!(
            d.read_at(&mut buf, (1 << 20) - 10),
            Err(DiskError::OutOfRange)
        );
        assert_eq!(
            d.snapshot().write_at(&[1], 0, false),
            Err(DiskError::ReadOnly)
        );
    }
}
