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
