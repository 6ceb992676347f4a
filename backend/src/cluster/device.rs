//! A store's bytes in RADOS: the [`Device`] the store runs on when it lives in a Ceph pool.
//!
//! The device's address space is cut into objects of [`OBJECT_SIZE`] bytes, each named by its
//! index (`%016x`) in the store's own RADOS namespace, beside one header object
//! ([`HEADER_OBJECT`]) that records the device's size. An object that was never written reads
//! as zeros, so a new store costs no objects beyond the few its format writes.
//!
//! Writes go out asynchronously (`rados_aio_write`, the caller's bytes copied) and
//! [`Device::sync`] waits for every write issued before it. A write that continues the one
//! before it in the same object joins it (up to [`MAX_BATCH`]) rather than going out alone:
//! the store allocates new blocks in runs, so a burst of random guest writes becomes a few
//! large object writes. At most one such run waits unsent, and anything that does not continue
//! it (another write, a read of its object, a sync) sends it first, so RADOS still sees every
//! write in the order it was made.
//!
//! A sync waits for every write sent before it: a write is durable on every
//! replica when its completion reports it, which is what the store's commit protocol needs from
//! a sync. RADOS applies one client's operations on one object in the order they were sent, so
//! a read after a write to the same bytes sees it even before the sync.
//!
//! Space the store no longer needs goes back object by object ([`Device::discard`]): a whole
//! object is removed, its tail cut off, or a range zeroed.
//!
//! Every write (and discard) first asks the store's [`Fence`]: once this host's ownership of the
//! store has lapsed, nothing more leaves it (what was already sent is refused by the OSDs once
//! the next owner has blocklisted this client; see `lease.rs`).

use std::{
    collections::VecDeque,
    io,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::{
    lease::Fence,
    rados::{AioWrite, IoCtx},
};
use crate::store::device::Device;

/// Bytes per RADOS object: RBD's default, large enough that a store of a few TiB is a few
/// hundred thousand objects, small enough that recovery moves little at a time.
pub const OBJECT_SIZE: u64 = 4 << 20;

/// The object that says a namespace holds a Parallax device, and how large.
pub const HEADER_OBJECT: &str = "parallax.device";

/// The most a run of contiguous writes grows before it is sent.
pub const MAX_BATCH: usize = 1 << 20;

/// No object: what `RadosDevice::batch_object` holds when no run waits.
const NO_OBJECT: u64 = u64::MAX;

/// Writes in flight before a writer waits for the oldest (bounds the copied bytes too).
const MAX_IN_FLIGHT: usize = 1024;
const MAX_IN_FLIGHT_BYTES: usize = 64 << 20;

#[derive(Serialize, Deserialize)]
struct Header {
    /// Layout version of this header and the objects' naming (1).
    layout: u32,
    size: u64,
    object_size: u64,
}

/// A store's device in a RADOS namespace.
pub struct RadosDevice {
    io: IoCtx,
    len: u64,
    object_size: u64,
    fence: Option<Arc<Fence>>,
    in_flight: Mutex<InFlight>,
    /// The object of the run that waits unsent ([`NO_OBJECT`] if none), so that a read of
    /// another object need not take the lock.
    batch_object: AtomicU64,
}

#[derive(Default)]
struct InFlight {
    writes: VecDeque<AioWrite>,
    bytes: usize,
    /// The first write that failed and has not been reported by a sync yet.
    failed: Option<io::Error>,
    /// A write failed once: every later sync fails too, so that nothing (the local cache
    /// included) takes the device for whole afterwards.
    broken: Option<String>,
    /// Contiguous writes not sent yet.
    batch: Option<Batch>,
}

/// A run of contiguous bytes of one object.
struct Batch {
    object: u64,
    offset: u64,
    data: Vec<u8>,
}

impl InFlight {
    /// Collects the writes that have finished, oldest first.
    fn reap(&mut self) {
        while self.writes.front().is_some_and(|w| w.is_done()) {
            let w = self.writes.pop_front().expect("checked above");
            self.bytes -= w.len();
            if let Err(e) = w.wait() {
                self.failed.get_or_insert(e);
            }
        }
    }
}

/// Splits `len` bytes at `offset` into (object index, offset in it, offset in the buffer,
/// length) pieces, for objects of `object_size` bytes.
fn pieces(
    object_size: u64,
    offset: u64,
    len: usize,
) -> impl Iterator<Item = (u64, u64, usize, usize)> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        if at >= len {
            return None;
        }
        let pos = offset + at as u64;
        let (obj, off) = (pos / object_size, pos % object_size);
        let n = ((object_size - off) as usize).min(len - at);
        let piece = (obj, off, at, n);
        at += n;
        Some(piece)
    })
}

pub(crate) fn object_name(index: u64) -> String {
    format!("{index:016x}")
}

impl RadosDevice {
    /// Makes a device of `size` bytes in `io`'s namespace, which must hold none yet.
    pub fn create(io: IoCtx, size: u64, fence: Option<Arc<Fence>>) -> io::Result<RadosDevice> {
        if io.stat(HEADER_OBJECT)?.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the namespace holds a Parallax device already",
            ));
        }
        let h = Header {
            layout: 1,
            size,
            object_size: OBJECT_SIZE,
        };
        io.write_full(
            HEADER_OBJECT,
            &serde_json::to_vec(&h).map_err(io::Error::other)?,
        )?;
        Ok(Self::new(io, h, fence))
    }

    /// Opens the device in `io`'s namespace (`NotFound` if there is none).
    pub fn open(io: IoCtx, fence: Option<Arc<Fence>>) -> io::Result<RadosDevice> {
        let mut b = vec![0u8; 4096];
        let n = io.read(HEADER_OBJECT, &mut b, 0)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no Parallax device there",
            ));
        }
        let h: Header = serde_json::from_slice(&b[..n]).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidData, format!("{HEADER_OBJECT}: {e}"))
        })?;
        if h.layout != 1 || h.object_size == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{HEADER_OBJECT}: layout {} is not one this parallax reads",
                    h.layout
                ),
            ));
        }
        Ok(Self::new(io, h, fence))
    }

    fn new(io: IoCtx, h: Header, fence: Option<Arc<Fence>>) -> RadosDevice {
        RadosDevice {
            io,
            len: h.size,
            object_size: h.object_size,
            fence,
            in_flight: Mutex::new(InFlight::default()),
            batch_object: AtomicU64::new(NO_OBJECT),
        }
    }

    fn in_range(&self, offset: u64, len: usize) -> io::Result<()> {
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > self.len)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{len} bytes at {offset} are past the device's end ({})",
                    self.len
                ),
            ));
        }
        Ok(())
    }

    /// Sends the waiting run, if any (refused, and dropped, once the lease has lapsed).
    fn send_batch(&self, q: &mut InFlight) -> io::Result<()> {
        let Some(b) = q.batch.take() else {
            return Ok(());
        };
        self.batch_object.store(NO_OBJECT, Ordering::Release);
        if let Some(f) = &self.fence {
            if let Err(e) = f.check() {
                q.broken.get_or_insert_with(|| e.to_string());
                return Err(e);
            }
        }
        let n = b.data.len();
        let w = self
            .io
            .aio_write(&object_name(b.object), b.data, b.offset)?;
        q.bytes += n;
        q.writes.push_back(w);
        Ok(())
    }

    /// Removes every object of the device, the header last.
    pub fn destroy(self) -> io::Result<u64> {
        self.sync()?;
        let mut n = 0;
        for name in self.io.list()? {
            if name != HEADER_OBJECT {
                self.io.remove(&name)?;
                n += 1;
            }
        }
        self.io.remove(HEADER_OBJECT)?;
        Ok(n)
    }
}

impl Device for RadosDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.in_range(offset, buf.len())?;
        for (obj, off, at, n) in pieces(self.object_size, offset, buf.len()) {
            if self.batch_object.load(Ordering::Acquire) == obj {
                let mut q = self.in_flight.lock();
                if q.batch.as_ref().is_some_and(|b| b.object == obj) {
                    self.send_batch(&mut q)?;
                }
            }
            let part = &mut buf[at..at + n];
            let got = self.io.read(&object_name(obj), part, off)?;
            part[got..].fill(0);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.in_range(offset, buf.len())?;
        if let Some(f) = &self.fence {
            f.check()?;
        }
        let mut q = self.in_flight.lock();
        q.reap();
        for (obj, off, at, n) in pieces(self.object_size, offset, buf.len()) {
            let piece = &buf[at..at + n];
            if let Some(b) = q.batch.as_mut().filter(|b| {
                b.object == obj
                    && b.offset + b.data.len() as u64 == off
                    && b.data.len() + n <= MAX_BATCH
            }) {
                b.data.extend_from_slice(piece);
                continue;
            }
            self.send_batch(&mut q)?;
            q.batch = Some(Batch {
                object: obj,
                offset: off,
                data: piece.to_vec(),
            });
            self.batch_object.store(obj, Ordering::Release);
        }
        // Back-pressure: wait for the oldest writes while too much is in flight.
        while q.writes.len() > MAX_IN_FLIGHT || q.bytes > MAX_IN_FLIGHT_BYTES {
            let w = q.writes.pop_front().expect("over the bound, so not empty");
            q.bytes -= w.len();
            if let Err(e) = w.wait() {
                q.failed.get_or_insert(e);
            }
        }
        Ok(())
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        self.write_at(&bufs.concat(), offset)
    }

    fn sync(&self) -> io::Result<()> {
        let (writes, failed) = {
            let mut q = self.in_flight.lock();
            self.send_batch(&mut q)?;
            q.bytes = 0;
            (std::mem::take(&mut q.writes), q.failed.take())
        };
        let mut first = failed;
        for w in writes {
            if let Err(e) = w.wait() {
                first.get_or_insert(e);
            }
        }
        let mut q = self.in_flight.lock();
        if let Some(e) = first {
            q.broken.get_or_insert_with(|| e.to_string());
            return Err(e);
        }
        match &q.broken {
            Some(was) => Err(io::Error::other(format!("an earlier write failed: {was}"))),
            None => Ok(()),
        }
    }

    fn discard_unit(&self) -> Option<u64> {
        Some(self.object_size)
    }

    /// Removes the object when the range is all of it, cuts it short when the range is its
    /// tail, and zeroes the range otherwise; never creates one.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.in_range(offset, len as usize)?;
        let (obj, off) = (offset / self.object_size, offset % self.object_size);
        let end = self.object_size.min(self.len - obj * self.object_size);
        if off + len > end {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("discarding {len} bytes at {offset} crosses an object's end"),
            ));
        }
        if let Some(f) = &self.fence {
            f.check()?;
        }
        if self.batch_object.load(Ordering::Acquire) == obj {
            let mut q = self.in_flight.lock();
            if q.batch.as_ref().is_some_and(|b| b.object == obj) {
                self.send_batch(&mut q)?;
            }
        }
        let name = object_name(obj);
        if off == 0 && len == end {
            self.io.remove(&name)
        } else if off + len == end {
            self.io.truncate(&name, off)
        } else {
            self.io.zero(&name, off, len)
        }
    }

    fn stored_units(&self) -> io::Result<Option<Vec<u64>>> {
        let units = self
            .io
            .list()?
            .iter()
            .filter_map(|name| u64::from_str_radix(name, 16).ok())
            .collect();
        Ok(Some(units))
    }

    fn len(&self) -> u64 {
        self.len
    }
}

impl Drop for RadosDevice {
    fn drop(&mut self) {
        // Writes still in flight wait in their own drop; nothing to report them to here. A run
        // never sent is dropped: nobody synced it, so nobody was promised it.
        let q = self.in_flight.get_mut();
        q.batch = None;
        q.writes.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::pieces;

    #[test]
    fn pieces_cover_the_range_once_and_never_cross_an_object() {
        for (offset, len) in [
            (0, 0),
            (0, 4096),
            (4090, 12),
            (8191, 2),
            (5, 40_000),
            (12_288, 8192),
        ] {
            let got: Vec<_> = pieces(8192, offset, len).collect();
            let mut at = 0;
            for &(obj, off, buf_at, n) in &got {
                assert_eq!(buf_at, at, "{offset}+{len}: {got:?}");
                assert_eq!(obj * 8192 + off, offset + at as u64);
                assert!(n > 0 && off + n as u64 <= 8192, "{got:?}");
                at += n;
            }
            assert_eq!(at, len, "{offset}+{len}: {got:?}");
        }
        assert_eq!(
            pieces(8192, 8000, 400).collect::<Vec<_>>(),
            [(0, 8000, 0, 192), (1, 0, 192, 208)]
        );
    }
}
