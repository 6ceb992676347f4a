//! A persistent cache on local disk of a RADOS store's blocks, bounded, with clock (LRU
//! approximation) eviction.
//!
//! The cache is a sparse file as large as the device, holding a copy of each cached 4 KiB block
//! at its own offset, and a bit per block saying which are there. A cached block is read from
//! the file (the page cache, then the local disk) and never from RADOS again; writes update the
//! copy before they go to RADOS, so the cache is coherent for as long as this host owns the
//! store, the only writer. Evicting a block punches a hole in the file, so the file's disk use
//! follows the bound.
//!
//! **Across owners.** Blocks of a store are rewritten in place once their space is reused, so
//! a cache is only good if nobody else owned the store since it was saved. It is saved at a
//! clean close with this host's fencing token; the next open on this host uses it only if etcd
//! says the store's last owner released it cleanly *with that same token*
//! ([`super::lease::Ownership::released_with`]): anyone else who owned it since, crashed or
//! not, changed that. Anything else starts the cache empty. A crash leaves no saved state to
//! trust (the record is removed when the cache is opened).

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::store::device::Device;

const BLOCK: u64 = 4096;
/// Stripes of the lock that orders a miss's fill against writes to the same blocks.
const STRIPES: usize = 256;

#[derive(Serialize, Deserialize)]
struct Saved {
    token: i64,
    blocks: u64,
}

/// Counters, for logs and tests.
#[derive(Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub evicted: AtomicU64,
}

/// A device with a local cache in front of it.
pub struct CachedDevice<D: Device> {
    inner: D,
    dir: PathBuf,
    file: File,
    blocks: u64,
    limit: u64,
    present: Vec<AtomicU64>,
    referenced: Vec<AtomicU64>,
    count: AtomicU64,
    /// Per stripe, writes so far: a fill only lands if none came since it read RADOS.
    stripes: Vec<Mutex<u64>>,
    hand: Mutex<u64>,
    token: i64,
    pub stats: CacheStats,
}

fn bit(v: &[AtomicU64], b: u64) -> bool {
    v[(b / 64) as usize].load(Ordering::Acquire) & (1 << (b % 64)) != 0
}

fn set(v: &[AtomicU64], b: u64, on: bool) -> bool {
    let m = 1u64 << (b % 64);
    let w = &v[(b / 64) as usize];
    let old = if on {
        w.fetch_or(m, Ordering::AcqRel)
    } else {
        w.fetch_and(!m, Ordering::AcqRel)
    };
    old & m != 0
}

impl<D: Device> CachedDevice<D> {
    /// A cache in `dir` of at most `limit_bytes` in front of `inner`, for the owner holding
    /// fencing `token`. `reuse_from`: the token whose saved cache may be used (the one the last
    /// owner released the store with), if any.
    pub fn open(
        inner: D,
        dir: &Path,
        limit_bytes: u64,
        token: i64,
        reuse_from: Option<i64>,
    ) -> io::Result<CachedDevice<D>> {
        std::fs::create_dir_all(dir)?;
        let blocks = inner.len() / BLOCK;
        let words = blocks.div_ceil(64) as usize;
        let saved = Self::take_saved(dir);
        let present: Vec<AtomicU64> = match (&saved, reuse_from) {
            (Some((s, bits)), Some(t)) if s.token == t && s.blocks == blocks => {
                bits.iter().map(|&w| AtomicU64::new(w)).collect()
            }
            _ => (0..words).map(|_| AtomicU64::new(0)).collect(),
        };
        let count: u64 = present
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("blocks"))?;
        if count == 0 {
            // Nothing to keep: drop what an earlier cache left.
            file.set_len(0)?;
        }
        file.set_len(inner.len())?;
        info!(dir = %dir.display(), blocks = count, limit_bytes, "local block cache opened");
        Ok(CachedDevice {
            inner,
            dir: dir.to_path_buf(),
            file,
            blocks,
            limit: (limit_bytes / BLOCK).max(1),
            present,
            referenced: (0..words).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(count),
            stripes: (0..STRIPES).map(|_| Mutex::new(0)).collect(),
            hand: Mutex::new(0),
            token,
            stats: CacheStats::default(),
        })
    }

    /// The saved record and bitmap, removed from disk as they are read (so that a crash from
    /// here on leaves nothing that looks valid).
    fn take_saved(dir: &Path) -> Option<(Saved, Vec<u64>)> {
        let meta = std::fs::read(dir.join("saved.json")).ok();
        let bits = std::fs::read(dir.join("present")).ok();
        let _ = std::fs::remove_file(dir.join("saved.json"));
        let s: Saved = serde_json::from_slice(&meta?).ok()?;
        let bits = bits?;
        if bits.len() as u64 != s.blocks.div_ceil(64) * 8 {
            return None;
        }
        let words = bits
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        Some((s, words))
    }

    /// Writes the bitmap and then the record that makes it valid, after the blocks are durable.
    fn save(&self) -> io::Result<()> {
        self.file.sync_data()?;
        let bits: Vec<u8> = self
            .present
            .iter()
            .flat_map(|w| w.load(Ordering::Acquire).to_le_bytes())
            .collect();
        let write = |name: &str, data: &[u8]| -> io::Result<()> {
            let tmp = self.dir.join(format!("{name}.tmp"));
            let f = File::create(&tmp)?;
            f.write_all_at(data, 0)?;
            f.sync_all()?;
            std::fs::rename(&tmp, self.dir.join(name))
        };
        write("present", &bits)?;
        let s = Saved {
            token: self.token,
            blocks: self.blocks,
        };
        write(
            "saved.json",
            &serde_json::to_vec(&s).map_err(io::Error::other)?,
        )?;
        File::open(&self.dir)?.sync_all()
    }

    fn stripe(&self, b: u64) -> &Mutex<u64> {
        &self.stripes[(b % STRIPES as u64) as usize]
    }

    /// Takes block `b` (its bytes in `data`) into the cache, unless a write to its stripe came
    /// after `seen`.
    fn fill(&self, b: u64, data: &[u8], seen: u64) -> io::Result<()> {
        let s = self.stripe(b).lock();
        if *s != seen || bit(&self.present, b) {
            return Ok(());
        }
        self.file.write_all_at(data, b * BLOCK)?;
        set(&self.referenced, b, true);
        if !set(&self.present, b, true) {
            self.count.fetch_add(1, Ordering::AcqRel);
        }
        drop(s);
        self.evict_if_full()
    }

    /// Evicts unreferenced blocks (clock) until the cache is a sixteenth under its bound.
    fn evict_if_full(&self) -> io::Result<()> {
        if self.count.load(Ordering::Acquire) <= self.limit {
            return Ok(());
        }
        let Some(mut hand) = self.hand.try_lock() else {
            return Ok(()); // someone else is evicting
        };
        let goal = self.limit - self.limit / 16;
        let mut steps = 0u64;
        while self.count.load(Ordering::Acquire) > goal && steps < 2 * self.blocks + 2 {
            let b = *hand;
            *hand = (b + 1) % self.blocks;
            steps += 1;
            if !bit(&self.present, b) || set(&self.referenced, b, false) {
                continue;
            }
            let _s = self.stripe(b).lock();
            if set(&self.present, b, false) {
                self.count.fetch_sub(1, Ordering::AcqRel);
                self.stats.evicted.fetch_add(1, Ordering::Relaxed);
                punch(&self.file, b * BLOCK, BLOCK)?;
            }
        }
        Ok(())
    }

    fn span(offset: u64, len: usize) -> std::ops::Range<u64> {
        offset / BLOCK..(offset + len as u64).div_ceil(BLOCK)
    }
}

/// Frees `len` bytes of `file` at `offset` (they read as zeros afterwards).
fn punch(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on an open descriptor with plain integer arguments.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl<D: Device> Device for CachedDevice<D> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let span = Self::span(offset, buf.len());
        if span.clone().all(|b| bit(&self.present, b)) {
            self.file.read_exact_at(buf, offset)?;
            // A block evicted meanwhile reads as a hole: check again, and go to RADOS if so.
            if span.clone().all(|b| bit(&self.present, b)) {
                for b in span {
                    set(&self.referenced, b, true);
                }
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let seen: Vec<u64> = span.clone().map(|b| *self.stripe(b).lock()).collect();
        let start = span.start * BLOCK;
        let mut whole = vec![0u8; ((span.end - span.start) * BLOCK) as usize];
        self.inner.read_at(&mut whole, start)?;
        let at = (offset - start) as usize;
        buf.copy_from_slice(&whole[at..at + buf.len()]);
        for (i, b) in span.enumerate() {
            let data = &whole[i * BLOCK as usize..(i + 1) * BLOCK as usize];
            if let Err(e) = self.fill(b, data, seen[i]) {
                warn!(error = %e, "local block cache: cannot keep a block");
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let span = Self::span(offset, buf.len());
        // First the copies go (a fill that read RADOS before this write must not land), then
        // RADOS takes the write, then the new copies come: the cache never holds bytes that
        // RADOS refused.
        for b in span.clone() {
            let mut s = self.stripe(b).lock();
            *s += 1;
            if set(&self.present, b, false) {
                self.count.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.inner.write_at(buf, offset)?;
        for b in span {
            let (bs, be) = (b * BLOCK, (b + 1) * BLOCK);
            // Part of a block: the copy would be stale; RADOS has it.
            if bs < offset || be > offset + buf.len() as u64 {
                continue;
            }
            let mut s = self.stripe(b).lock();
            *s += 1;
            let from = (bs - offset) as usize;
            if self
                .file
                .write_all_at(&buf[from..from + BLOCK as usize], bs)
                .is_ok()
            {
                set(&self.referenced, b, true);
                if !set(&self.present, b, true) {
                    self.count.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
        self.evict_if_full()
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        self.write_at(&bufs.concat(), offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }

    fn discard_unit(&self) -> Option<u64> {
        self.inner.discard_unit()
    }

    /// Drops the copies of the blocks the range covers, then passes it on.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let span = Self::span(offset, len as usize);
        for b in span.clone() {
            let mut s = self.stripe(b).lock();
            *s += 1;
            if set(&self.present, b, false) {
                self.count.fetch_sub(1, Ordering::AcqRel);
            }
        }
        if let Err(e) = punch(
            &self.file,
            span.start * BLOCK,
            (span.end - span.start) * BLOCK,
        ) {
            warn!(error = %e, "local block cache: cannot free discarded blocks");
        }
        self.inner.discard(offset, len)
    }

    fn stored_units(&self) -> io::Result<Option<Vec<u64>>> {
        self.inner.stored_units()
    }

    fn len(&self) -> u64 {
        self.inner.len()
    }
}

impl<D: Device> Drop for CachedDevice<D> {
    fn drop(&mut self) {
        let s = &self.stats;
        info!(
            hits = s.hits.load(Ordering::Relaxed),
            misses = s.misses.load(Ordering::Relaxed),
            evicted = s.evicted.load(Ordering::Relaxed),
            blocks = self.count.load(Ordering::Relaxed),
            "local block cache closed"
        );
        // Only what RADOS has durably may be trusted next time (a write RADOS refused at any
        // time fails every sync).
        if self.inner.sync().is_ok() {
            if let Err(e) = self.save() {
                warn!(dir = %self.dir.display(), error = %e, "cannot save the local block cache; the next open starts it empty");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rand::{rngs::SmallRng, Rng, SeedableRng};

    use super::*;
    use crate::store::device::MemDevice;

    const LEN: u64 = 256 * BLOCK;

    fn fill(seed: u64, len: usize) -> Vec<u8> {
        let mut r = SmallRng::seed_from_u64(seed);
        (0..len).map(|_| r.random()).collect()
    }

    /// Random reads and writes, aligned or not, against a cache far smaller than the device
    /// and a plain copy: every read matches the copy, and the cache stays within its bound.
    #[test]
    fn reads_match_a_model_through_fills_writes_and_evictions() {
        let dir = tempfile::tempdir().unwrap();
        let c = CachedDevice::open(MemDevice::new(LEN), dir.path(), 16 * BLOCK, 1, None).unwrap();
        let mut model = vec![0u8; LEN as usize];
        let mut r = SmallRng::seed_from_u64(3);
        for i in 0..4000u64 {
            let len = if r.random_bool(0.7) {
                4096
            } else {
                r.random_range(1..3 * 4096)
            };
            let off = if len == 4096 && r.random_bool(0.8) {
                r.random_range(0..LEN / BLOCK) * BLOCK
            } else {
                r.random_range(0..LEN - len as u64)
            };
            if r.random_bool(0.3) {
                let data = fill(i, len);
                c.write_at(&data, off).unwrap();
                model[off as usize..off as usize + len].copy_from_slice(&data);
            } else {
                let mut buf = vec![0u8; len];
                c.read_at(&mut buf, off).unwrap();
                assert!(
                    buf == model[off as usize..off as usize + len],
                    "op {i}: {len} at {off}"
                );
            }
            assert!(
                c.count.load(Ordering::Relaxed) <= 16 + 3,
                "op {i}: over the bound"
            );
        }
        assert!(c.stats.evicted.load(Ordering::Relaxed) > 0);
        assert!(c.stats.hits.load(Ordering::Relaxed) > 0);
    }

    /// A device whose reads take a while, so that writes land while a miss reads.
    struct SlowReads(MemDevice);
    impl Device for SlowReads {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.0.read_at(buf, offset)?;
            std::thread::sleep(std::time::Duration::from_micros(200));
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.0.write_at(buf, offset)
        }
        fn sync(&self) -> io::Result<()> {
            self.0.sync()
        }
        fn len(&self) -> u64 {
            self.0.len()
        }
    }

    /// Threads writing their own blocks and reading everyone's: a fill that raced a write never
    /// leaves the old bytes in the cache.
    #[test]
    fn a_fill_racing_a_write_never_keeps_old_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let c = Arc::new(
            CachedDevice::open(
                SlowReads(MemDevice::new(LEN)),
                dir.path(),
                32 * BLOCK,
                1,
                None,
            )
            .unwrap(),
        );
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    let mut r = SmallRng::seed_from_u64(t);
                    let mut mine = [0u8; 64];
                    for i in 0..1500u64 {
                        let b = r.random_range(0..16u64);
                        let blk = b * 4 + t; // each thread owns every fourth block
                        if r.random_bool(0.5) {
                            mine[b as usize] = (i % 250) as u8 + 1;
                            c.write_at(&[mine[b as usize]; 4096], blk * BLOCK).unwrap();
                        }
                        let mut buf = [0u8; 4096];
                        c.read_at(&mut buf, blk * BLOCK).unwrap();
                        assert!(
                            buf.iter().all(|&x| x == mine[b as usize]),
                            "thread {t}, block {blk}"
                        );
                        let other = r.random_range(0..64u64);
                        c.read_at(&mut buf, other * BLOCK).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    /// The interleaving the stripe counters exist for: a miss reads the old bytes, a write
    /// lands and is cached, the block is evicted, then the miss's fill arrives. It must not
    /// put the old bytes back.
    #[test]
    fn a_late_fill_after_a_write_and_an_eviction_does_not_land() {
        let dir = tempfile::tempdir().unwrap();
        let c = CachedDevice::open(MemDevice::new(LEN), dir.path(), LEN, 1, None).unwrap();
        c.write_at(&[1u8; 4096], 0).unwrap();
        // The miss: samples the stripe and reads the device (old bytes).
        let seen = *c.stripe(0).lock();
        let mut old = vec![0u8; 4096];
        c.inner.read_at(&mut old, 0).unwrap();
        // The write, cached; then the block is evicted.
        c.write_at(&[2u8; 4096], 0).unwrap();
        {
            let _s = c.stripe(0).lock();
            assert!(set(&c.present, 0, false));
            c.count.fetch_sub(1, Ordering::AcqRel);
        }
        // The late fill.
        c.fill(0, &old, seen).unwrap();
        let mut buf = [0u8; 4096];
        c.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [2u8; 4096], "the late fill put the old bytes back");
    }

    /// A saved cache is used only with the token it was saved with; a crash (no save) or
    /// another token starts it empty.
    #[test]
    fn a_saved_cache_comes_back_only_for_its_own_token() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Arc::new(MemDevice::new(LEN));
        let open =
            |token, reuse| CachedDevice::open(dev.clone(), dir.path(), LEN, token, reuse).unwrap();
        let c = open(7, None);
        c.write_at(&[9u8; 4096], 0).unwrap();
        drop(c); // saved with token 7
        let count = |c: &CachedDevice<Arc<MemDevice>>| c.count.load(Ordering::Relaxed);
        let c = open(8, Some(7));
        assert_eq!(count(&c), 1, "the cache saved with token 7 was not used");
        std::mem::forget(c); // a crash: nothing saved, and opening removed the record
        assert_eq!(
            count(&open(9, Some(8))),
            0,
            "a crashed owner's cache was used"
        );
        let c = open(10, None);
        c.write_at(&[1u8; 4096], 0).unwrap();
        drop(c);
        assert_eq!(
            count(&open(11, Some(99))),
            0,
            "another token's cache was used"
        );
    }
}
