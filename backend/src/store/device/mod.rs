//! The device layer: every byte the store reads or writes goes through [`Device`], so tests can
//! swap in a device that loses unsynced writes or fails on cue (`testing`, built for tests and
//! with the `test-utils` feature).
//!
//! ```text
//!   Store ──► Arc<dyn Device> ─┬─ FileDevice   a regular file (sparse) or a block device
//!                              ├─ MemDevice    memory, for unit tests          ┐
//!                              ├─ CrashDevice  durable vs volatile images,     │ testing
//!                              │               power cuts                      │
//!                              └─ FaultDevice  wraps another; EIO/ENOSPC/short ┘
//!                                              writes on cue
//! ```

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt},
    path::Path,
};

#[cfg(any(test, feature = "test-utils"))]
mod testing;
#[cfg(any(test, feature = "test-utils"))]
pub use testing::{CrashDevice, FaultDevice, FaultPlan, MemDevice};

/// Block storage for a store: positional reads and writes, and a durability barrier.
pub trait Device: Send + Sync {
    /// Fills `buf` from `offset`. Bytes never written read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`. Not durable until [`Device::sync`].
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Writes `bufs` back to back starting at `offset`.
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let mut at = offset;
        for b in bufs {
            self.write_at(b, at)?;
            at += b.len() as u64;
        }
        Ok(())
    }
    /// Fills `buf` from `offset` only if that cannot block (the data is in memory): `Ok(false)`
    /// means it would have (nothing is promised about `buf` then). Devices that cannot tell
    /// say `false`.
    fn read_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        let _ = (buf, offset);
        Ok(false)
    }
    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;
    /// Whether [`Device::start_writeback`] does anything here (a file system with a page cache
    /// that writes back to a disk).
    fn writes_back(&self) -> bool {
        false
    }
    /// Starts writing completed writes out to the medium without waiting for them and without
    /// promising anything about durability: it only does early what the kernel may do at any
    /// moment anyway, so that the next [`Device::sync`] finds little left to write.
    fn start_writeback(&self) -> io::Result<()> {
        Ok(())
    }
    /// The size, and alignment, of the pieces whose space this device can give back once the
    /// store needs none of their bytes ([`Device::discard`]); `None` if it cannot.
    fn discard_unit(&self) -> Option<u64> {
        None
    }
    /// The store needs none of the `len` bytes at `offset` (within one
    /// [`Device::discard_unit`]) until it writes them again: the device may give their space
    /// back. They read as zeros afterwards. Ordered after every write made before it.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// The discard units that may hold bytes (`None`: the device cannot tell), so that a sweep
    /// need not look at units that hold nothing.
    fn stored_units(&self) -> io::Result<Option<Vec<u64>>> {
        Ok(None)
    }
    /// Size in bytes.
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A shared device is a device (a wrapper, such as the cluster's cache, may sit on one).
impl<D: Device + ?Sized> Device for std::sync::Arc<D> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        (**self).write_vectored_at(bufs, offset)
    }
    fn read_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        (**self).read_nowait(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        (**self).sync()
    }
    fn writes_back(&self) -> bool {
        (**self).writes_back()
    }
    fn start_writeback(&self) -> io::Result<()> {
        (**self).start_writeback()
    }
    fn discard_unit(&self) -> Option<u64> {
        (**self).discard_unit()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).discard(offset, len)
    }
    fn stored_units(&self) -> io::Result<Option<Vec<u64>>> {
        (**self).stored_units()
    }
    fn len(&self) -> u64 {
        (**self).len()
    }
}

/// A store in a regular file or on a block device.
pub struct FileDevice {
    file: File,
    len: u64,
    block_device: bool,
    /// How a read that must not block is done on this file.
    nowait: NoWait,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoWait {
    /// `preadv2(RWF_NOWAIT)`: fails with EAGAIN rather than wait for the disk.
    Flag,
    /// tmpfs: everything is in memory, a plain read never waits for a disk.
    Memory,
}

const TMPFS_MAGIC: i64 = 0x0102_1994;

fn on_tmpfs(file: &File) -> bool {
    // SAFETY: statfs is plain data, filled in by the call.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open (owned by `file`) and `st` is valid for the call.
    let r = unsafe { libc::fstatfs(std::os::fd::AsRawFd::as_raw_fd(file), &mut st) };
    r == 0 && st.f_type as i64 == TMPFS_MAGIC
}

impl FileDevice {
    /// Opens an existing file or block device read-write.
    pub fn open(path: &Path) -> io::Result<FileDevice> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Self::from_file(file)
    }

    /// Creates a new sparse file of `len` bytes (fails if it exists).
    pub fn create(path: &Path, len: u64) -> io::Result<FileDevice> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        file.set_len(len)?;
        Self::from_file(file)
    }

    fn from_file(file: File) -> io::Result<FileDevice> {
        let meta = file.metadata()?;
        let block_device = meta.file_type().is_block_device();
        let len = if block_device {
            use std::io::Seek;
            (&file).seek(io::SeekFrom::End(0))?
        } else {
            meta.len()
        };
        let nowait = if on_tmpfs(&file) {
            NoWait::Memory
        } else {
            NoWait::Flag
        };
        Ok(FileDevice {
            file,
            len,
            block_device,
            nowait,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn is_block_device(&self) -> bool {
        self.block_device
    }
}

impl Device for FileDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn read_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        match self.nowait {
            NoWait::Memory => self.file.read_exact_at(buf, offset).map(|()| true),
            NoWait::Flag => {
                let iov = libc::iovec {
                    iov_base: buf.as_mut_ptr() as *mut _,
                    iov_len: buf.len(),
                };
                let off = libc::off_t::try_from(offset)
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
                // SAFETY: the iovec points at `buf`, live and writable for the call; the fd is
                // open (owned by self.file).
                let n = unsafe {
                    libc::preadv2(
                        std::os::fd::AsRawFd::as_raw_fd(&self.file),
                        &iov,
                        1,
                        off,
                        libc::RWF_NOWAIT,
                    )
                };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    return match e.raw_os_error() {
                        Some(libc::EAGAIN) | Some(libc::EOPNOTSUPP) => Ok(false),
                        _ => Err(e),
                    };
                }
                // A short read: part of the range is not in memory.
                Ok(n as usize == buf.len())
            }
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        // pwritev in batches of IOV_MAX; fall back to write_all_at for a short write.
        const IOV_MAX: usize = 1024;
        let mut at = offset;
        for chunk in bufs.chunks(IOV_MAX) {
            let iov: Vec<libc::iovec> = chunk
                .iter()
                .map(|b| libc::iovec {
                    iov_base: b.as_ptr() as *mut _,
                    iov_len: b.len(),
                })
                .collect();
            let total: usize = chunk.iter().map(|b| b.len()).sum();
            let off = libc::off_t::try_from(at)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
            // SAFETY: every iovec points into a live borrowed slice of the stated length, and
            // pwritev only reads from them; the fd is owned by self.file and open.
            let n = unsafe {
                libc::pwritev(
                    std::os::fd::AsRawFd::as_raw_fd(&self.file),
                    iov.as_ptr(),
                    iov.len() as libc::c_int,
                    off,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    // Simplest correct retry: write the chunk the slow way.
                    let mut a = at;
                    for b in chunk {
                        self.write_at(b, a)?;
                        a += b.len() as u64;
                    }
                } else {
                    return Err(e);
                }
            } else if (n as usize) < total {
                // Short write: finish what is left buffer by buffer.
                let mut skip = n as usize;
                let mut a = at;
                for b in chunk {
                    if skip >= b.len() {
                        skip -= b.len();
                    } else {
                        self.write_at(&b[skip..], a + skip as u64)?;
                        skip = 0;
                    }
                    a += b.len() as u64;
                }
            }
            at += total as u64;
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn writes_back(&self) -> bool {
        self.nowait != NoWait::Memory
    }

    fn start_writeback(&self) -> io::Result<()> {
        // SAFETY: the fd is open (owned by `self.file`); offset 0 and length 0 name the whole
        // file, and SYNC_FILE_RANGE_WRITE only queues its dirty pages for writing.
        let r = unsafe {
            libc::sync_file_range(
                std::os::fd::AsRawFd::as_raw_fd(&self.file),
                0,
                0,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn len(&self) -> u64 {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_device_vectored_writes() {
        let dir = tempfile::tempdir().unwrap();
        let d = FileDevice::create(&dir.path().join("s"), 1 << 20).unwrap();
        d.write_vectored_at(&[&[1u8; 100], &[2u8; 50]], 10).unwrap();
        let mut b = [0u8; 160];
        d.read_at(&mut b, 0).unwrap();
        assert_eq!(&b[..10], &[0; 10]);
        assert_eq!(&b[10..110], &[1; 100]);
        assert_eq!(&b[110..160], &[2; 50]);
        assert_eq!(d.len(), 1 << 20);
    }
}
