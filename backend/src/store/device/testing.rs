//! Devices for tests: memory, power cuts, faults on cue (with `cfg(test)` or the `test-utils`
//! feature).

use std::{
    collections::HashMap,
    io,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use parking_lot::Mutex;

use super::Device;
use crate::store::format::{BLOCK_SIZE, BLOCK_SIZE_U64};

type Blocks = HashMap<u64, Box<[u8; BLOCK_SIZE]>>;

fn read_blocks(blocks: &Blocks, buf: &mut [u8], offset: u64) {
    let mut done = 0usize;
    while done < buf.len() {
        let pos = offset + done as u64;
        let within = (pos % BLOCK_SIZE_U64) as usize;
        let n = (BLOCK_SIZE - within).min(buf.len() - done);
        match blocks.get(&(pos / BLOCK_SIZE_U64)) {
            Some(b) => buf[done..done + n].copy_from_slice(&b[within..within + n]),
            None => buf[done..done + n].fill(0),
        }
        done += n;
    }
}

fn write_blocks(blocks: &mut Blocks, buf: &[u8], offset: u64) {
    let mut done = 0usize;
    while done < buf.len() {
        let pos = offset + done as u64;
        let within = (pos % BLOCK_SIZE_U64) as usize;
        let n = (BLOCK_SIZE - within).min(buf.len() - done);
        let b = blocks
            .entry(pos / BLOCK_SIZE_U64)
            .or_insert_with(|| Box::new([0; BLOCK_SIZE]));
        b[within..within + n].copy_from_slice(&buf[done..done + n]);
        done += n;
    }
}

fn check_bounds(len: u64, offset: u64, n: usize) -> io::Result<()> {
    if offset.checked_add(n as u64).is_none_or(|end| end > len) {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "access past the end of device",
        ));
    }
    Ok(())
}

/// A sparse in-memory device. Everything written is "durable" at once.
pub struct MemDevice {
    len: u64,
    blocks: Mutex<Blocks>,
}

impl MemDevice {
    pub fn new(len: u64) -> MemDevice {
        MemDevice {
            len,
            blocks: Mutex::new(HashMap::new()),
        }
    }

    /// Blocks written so far, in order (for corruption tests).
    pub fn written_blocks(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.blocks.lock().keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// A copy of this device (for corruption tests).
    pub fn duplicate(&self) -> MemDevice {
        MemDevice {
            len: self.len,
            blocks: Mutex::new(self.blocks.lock().clone()),
        }
    }

    /// Flips bits of the byte at `offset`, for corruption tests.
    pub fn corrupt(&self, offset: u64, xor: u8) {
        let mut blocks = self.blocks.lock();
        let mut byte = [0u8];
        read_blocks(&blocks, &mut byte, offset);
        byte[0] ^= xor;
        write_blocks(&mut blocks, &byte, offset);
    }
}

impl Device for MemDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_bounds(self.len, offset, buf.len())?;
        read_blocks(&self.blocks.lock(), buf, offset);
        Ok(())
    }
    fn read_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        self.read_at(buf, offset).map(|()| true)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_bounds(self.len, offset, buf.len())?;
        write_blocks(&mut self.blocks.lock(), buf, offset);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> u64 {
        self.len
    }
}

struct CrashState {
    /// What survives a power cut for certain.
    durable: Blocks,
    /// What reads see: durable plus every write since.
    volatile: Blocks,
    /// Writes since the last sync, in order.
    unsynced: Vec<(u64, Vec<u8>)>,
    /// Writes (and syncs) left before the power goes; `None` = never.
    ops_left: Option<u64>,
    dead: bool,
}

/// A device that models a volatile write cache: writes are visible at once but survive a
/// power cut only once synced. After [`CrashDevice::cut_after`] more operations the power goes:
/// that operation and everything after fail with EIO, and [`CrashDevice::after_crash`] yields
/// what the disk could hold on restart — the durable image plus an arbitrary subset of the
/// unsynced writes, some of them torn at 512-byte boundaries.
pub struct CrashDevice {
    len: u64,
    /// Gives space back in units of this many bytes, as a store in RADOS does.
    discard_unit: Option<u64>,
    /// The operation count ([`CrashDevice::ops`]) at each discard so far.
    discards: Mutex<Vec<u64>>,
    state: Mutex<CrashState>,
    ops: AtomicU64,
}

impl CrashDevice {
    pub fn new(len: u64) -> CrashDevice {
        Self::shedding(len, None)
    }

    /// A device that also gives space back ([`Device::discard`]) in units of `unit` bytes: a
    /// discard is durable once it returns (as a RADOS remove is) and leaves garbage, not
    /// zeros, so that a store reading a block it gave back sees damage.
    pub fn shedding(len: u64, unit: Option<u64>) -> CrashDevice {
        CrashDevice {
            len,
            discard_unit: unit,
            discards: Mutex::new(Vec::new()),
            state: Mutex::new(CrashState {
                durable: HashMap::new(),
                volatile: HashMap::new(),
                unsynced: Vec::new(),
                ops_left: None,
                dead: false,
            }),
            ops: AtomicU64::new(0),
        }
    }

    /// The power goes out at the `n`-th write or sync from now (0 = the next one).
    pub fn cut_after(&self, n: u64) {
        self.state.lock().ops_left = Some(n);
    }

    /// Writes and syncs done so far (to choose cut points).
    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    /// Where the discards so far came: the value of [`CrashDevice::ops`] just before each.
    pub fn discard_ops(&self) -> Vec<u64> {
        self.discards.lock().clone()
    }

    pub fn is_dead(&self) -> bool {
        self.state.lock().dead
    }

    /// What the disk holds after the power cut (or now, if the power is still on): durable
    /// data plus a random subset of unsynced writes, each possibly torn. `seed` picks which.
    pub fn after_crash(&self, seed: u64) -> CrashDevice {
        let st = self.state.lock();
        let mut rng = seed ^ 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            // xorshift64*: enough randomness for choosing subsets.
            rng ^= rng >> 12;
            rng ^= rng << 25;
            rng ^= rng >> 27;
            rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let mut image = st.durable.clone();
        for (off, data) in &st.unsynced {
            match next() % 4 {
                0 => {} // lost
                1 => {
                    // torn: only some whole sectors made it
                    let sectors = data.len().div_ceil(512);
                    let keep = (next() as usize) % (sectors + 1);
                    for s in 0..sectors {
                        if (s < keep) ^ (next() % 5 == 0) {
                            let a = s * 512;
                            let b = (a + 512).min(data.len());
                            write_blocks(&mut image, &data[a..b], off + a as u64);
                        }
                    }
                }
                _ => write_blocks(&mut image, data, *off),
            }
        }
        CrashDevice {
            len: self.len,
            discard_unit: self.discard_unit,
            discards: Mutex::new(Vec::new()),
            state: Mutex::new(CrashState {
                durable: image.clone(),
                volatile: image,
                unsynced: Vec::new(),
                ops_left: None,
                dead: false,
            }),
            ops: AtomicU64::new(0),
        }
    }

    fn tick(&self, st: &mut CrashState) -> io::Result<()> {
        self.ops.fetch_add(1, Ordering::Relaxed);
        if st.dead {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        if let Some(left) = st.ops_left.as_mut() {
            if *left == 0 {
                st.dead = true;
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            *left -= 1;
        }
        Ok(())
    }
}

impl Device for CrashDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_bounds(self.len, offset, buf.len())?;
        read_blocks(&self.state.lock().volatile, buf, offset);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_bounds(self.len, offset, buf.len())?;
        let mut st = self.state.lock();
        self.tick(&mut st)?;
        write_blocks(&mut st.volatile, buf, offset);
        st.unsynced.push((offset, buf.to_vec()));
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut st = self.state.lock();
        self.tick(&mut st)?;
        let writes = std::mem::take(&mut st.unsynced);
        for (off, data) in writes {
            write_blocks(&mut st.durable, &data, off);
        }
        Ok(())
    }

    fn discard_unit(&self) -> Option<u64> {
        self.discard_unit
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        check_bounds(self.len, offset, len as usize)?;
        let mut st = self.state.lock();
        self.discards.lock().push(self.ops());
        self.tick(&mut st)?;
        let garbage = vec![0xEE; len as usize];
        write_blocks(&mut st.volatile, &garbage, offset);
        write_blocks(&mut st.durable, &garbage, offset);
        // Ordered after every earlier write: none of them can land over it after a crash.
        st.unsynced
            .retain(|(o, d)| *o + d.len() as u64 <= offset || *o >= offset + len);
        Ok(())
    }

    fn len(&self) -> u64 {
        self.len
    }
}

/// When a [`FaultDevice`] fails, and how.
#[derive(Debug, Default)]
pub struct FaultPlan {
    /// Fail the n-th read / write / sync from now on (1-based; 0 = never). Each counter is
    /// decremented per operation of its kind; reaching 1 fails that operation.
    pub fail_read_at: AtomicU64,
    pub fail_write_at: AtomicU64,
    pub fail_sync_at: AtomicU64,
    /// Fail every operation of the kind once triggered (sticky), instead of just one.
    pub sticky: std::sync::atomic::AtomicBool,
    /// errno for failed writes: EIO (default, 0 means EIO) or ENOSPC.
    pub write_errno: std::sync::atomic::AtomicI32,
    /// Before failing a write, write its first half (a short write).
    pub short_write: std::sync::atomic::AtomicBool,
    tripped_read: std::sync::atomic::AtomicBool,
    tripped_write: std::sync::atomic::AtomicBool,
    tripped_sync: std::sync::atomic::AtomicBool,
    /// Operations that failed so far.
    pub failures: AtomicU64,
}

impl FaultPlan {
    fn should_fail(&self, counter: &AtomicU64, tripped: &std::sync::atomic::AtomicBool) -> bool {
        if tripped.load(Ordering::Relaxed) && self.sticky.load(Ordering::Relaxed) {
            return true;
        }
        let prev = counter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                if c == 0 {
                    None
                } else {
                    Some(c - 1)
                }
            })
            .unwrap_or(0);
        if prev == 1 {
            tripped.store(true, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Clears every trigger (the "disk" is healthy again).
    pub fn heal(&self) {
        for c in [&self.fail_read_at, &self.fail_write_at, &self.fail_sync_at] {
            c.store(0, Ordering::Relaxed);
        }
        for t in [&self.tripped_read, &self.tripped_write, &self.tripped_sync] {
            t.store(false, Ordering::Relaxed);
        }
    }
}

/// Wraps a device and fails operations as its [`FaultPlan`] says.
pub struct FaultDevice {
    inner: Arc<dyn Device>,
    pub plan: Arc<FaultPlan>,
}

impl FaultDevice {
    pub fn new(inner: Arc<dyn Device>) -> FaultDevice {
        FaultDevice {
            inner,
            plan: Arc::new(FaultPlan::default()),
        }
    }

    fn fail(&self, errno: i32) -> io::Error {
        self.plan.failures.fetch_add(1, Ordering::Relaxed);
        io::Error::from_raw_os_error(errno)
    }
}

impl Device for FaultDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self
            .plan
            .should_fail(&self.plan.fail_read_at, &self.plan.tripped_read)
        {
            return Err(self.fail(libc::EIO));
        }
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self
            .plan
            .should_fail(&self.plan.fail_write_at, &self.plan.tripped_write)
        {
            if self.plan.short_write.load(Ordering::Relaxed) && buf.len() > 1 {
                self.inner.write_at(&buf[..buf.len() / 2], offset)?;
            }
            let errno = match self.plan.write_errno.load(Ordering::Relaxed) {
                0 => libc::EIO,
                e => e,
            };
            return Err(self.fail(errno));
        }
        self.inner.write_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        if self
            .plan
            .should_fail(&self.plan.fail_sync_at, &self.plan.tripped_sync)
        {
            return Err(self.fail(libc::EIO));
        }
        self.inner.sync()
    }

    fn len(&self) -> u64 {
        self.inner.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_device_keeps_synced_and_may_drop_unsynced() {
        let d = CrashDevice::new(1 << 20);
        d.write_at(&[1u8; 4096], 0).unwrap();
        d.sync().unwrap();
        d.write_at(&[2u8; 4096], 4096).unwrap();
        let mut b = [0u8; 4096];
        d.read_at(&mut b, 4096).unwrap();
        assert_eq!(b[0], 2, "reads see unsynced writes");
        let mut saw_lost = false;
        let mut saw_kept = false;
        for seed in 0..64 {
            let after = d.after_crash(seed);
            after.read_at(&mut b, 0).unwrap();
            assert!(b.iter().all(|&x| x == 1), "synced data survives");
            after.read_at(&mut b, 4096).unwrap();
            saw_lost |= b.iter().all(|&x| x == 0);
            saw_kept |= b.iter().all(|&x| x == 2);
        }
        assert!(saw_lost && saw_kept);
        d.cut_after(1);
        d.write_at(&[3u8; 10], 0).unwrap();
        assert!(d.write_at(&[3u8; 10], 0).is_err());
        assert!(d.sync().is_err());
        assert!(d.is_dead());
    }

    #[test]
    fn fault_device_fails_on_cue() {
        let f = FaultDevice::new(Arc::new(MemDevice::new(1 << 20)));
        f.plan.fail_write_at.store(2, Ordering::Relaxed);
        f.write_at(&[1], 0).unwrap();
        assert!(f.write_at(&[1], 0).is_err());
        f.write_at(&[1], 0).unwrap();
        f.plan.fail_sync_at.store(1, Ordering::Relaxed);
        f.plan.sticky.store(true, Ordering::Relaxed);
        assert!(f.sync().is_err());
        assert!(f.sync().is_err());
        f.plan.heal();
        f.sync().unwrap();
    }
}
