//! The data path: [`StoreDisk`], a VDI or snapshot opened for I/O, implementing [`Disk`].
//!
//! ```text
//!  read:   lock → resolve blocks → unlock → pread runs of adjacent blocks → verify each hash
//!  write:  hash + zero-detect (no lock) → lock → reserve blocks → unlock → pwrite
//!          → lock → claim, point the map at them, drop old references → unlock
//!  partial block: read old (verified), patch, write as above, and only if the map entry is
//!          still the one read (else retry): concurrent sub-block writes never lose each other
//! ```
//!
//! Data never moves through the metadata lock; a reader holds a reader-epoch guard from lookup
//! to the end of its pread, so a block freed meanwhile is not reused under it.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Instant,
};

use tracing::error;

use super::{
    engine::{Meta, Store},
    error::{StoreError, StoreResult},
    format::{hash24, is_zero, Ptr, PtrKind, BLOCK_SIZE, BLOCK_SIZE_U64, FANOUT, FANOUT_BITS},
    registry::Kind,
};
use crate::disk::{check_range, Disk, DiskError, Extent, ExtentState};

/// Whole blocks hashed and placed per metadata-lock round trip.
const WRITE_BATCH: usize = 256;
/// Leaf entries a block-status call looks at before answering with what it has.
const STATUS_BUDGET: usize = 1 << 20;

/// A VDI or snapshot open for I/O. Dropping it releases the handle.
pub struct StoreDisk {
    store: Arc<Store>,
    id: u64,
    name: String,
    read_only: bool,
}

static LAST_ERROR_LOG: AtomicU64 = AtomicU64::new(0);
static SUPPRESSED: AtomicU64 = AtomicU64::new(0);

/// Logs a data-path error at most about once a second (clients can trigger these).
fn log_limited(msg: std::fmt::Arguments) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let now = START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1;
    let last = LAST_ERROR_LOG.load(Ordering::Relaxed);
    if now.saturating_sub(last) >= 1000
        && LAST_ERROR_LOG
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        let n = SUPPRESSED.swap(0, Ordering::Relaxed);
        if n > 0 {
            error!("{msg} ({n} similar errors suppressed)");
        } else {
            error!("{msg}");
        }
    } else {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
    }
}

impl Store {
    /// Opens a VDI (`NAME`) or snapshot (`NAME@SNAP`) for I/O; `write` asks for a writable
    /// handle, which a snapshot refuses.
    pub fn open_vdi(self: &Arc<Self>, name: &str, write: bool) -> StoreResult<StoreDisk> {
        let mut m = self.meta.lock();
        let id = super::admin::resolve(&mut m, name)?;
        let v = m.vdi(id)?;
        let snapshot = v.rec.kind == Kind::Snapshot;
        if write && snapshot {
            return Err(StoreError::ReadOnly(format!("snapshot {name}")));
        }
        v.handles += 1;
        Ok(StoreDisk {
            store: self.clone(),
            id,
            name: name.to_string(),
            read_only: snapshot || !write,
        })
    }
}

impl Drop for StoreDisk {
    fn drop(&mut self) {
        let mut m = self.store.meta.lock();
        if let Some(v) = m.vdis.get_mut(&self.id) {
            v.handles = v.handles.saturating_sub(1);
        }
    }
}

fn block_range(offset: u64, len: u64) -> (u64, u64) {
    let first = offset / BLOCK_SIZE_U64;
    let end = (offset + len).div_ceil(BLOCK_SIZE_U64);
    (first, end - first)
}

impl StoreDisk {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    fn size_locked(&self, m: &mut Meta) -> StoreResult<u64> {
        Ok(m.vdi(self.id)?.rec.size)
    }

    fn range(&self, m: &mut Meta, offset: u64, len: u64) -> StoreResult<()> {
        let size = self.size_locked(m)?;
        check_range(size, offset, len).map_err(|_| {
            StoreError::Invalid(format!(
                "range {offset}+{len} is outside {} ({size} bytes)",
                self.name
            ))
        })
    }

    fn writable(&self) -> StoreResult<()> {
        if self.read_only {
            return Err(StoreError::ReadOnly(self.name.clone()));
        }
        self.store.check_writable()
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> StoreResult<()> {
        if buf.is_empty() {
            return self.range(&mut self.store.meta.lock(), offset, 0);
        }
        let _epoch = self.store.epoch.enter();
        let (first, n) = block_range(offset, buf.len() as u64);
        let mut ptrs = Vec::with_capacity(n as usize);
        {
            let mut m = self.store.meta.lock();
            self.range(&mut m, offset, buf.len() as u64)?;
            let v = m.vdi(self.id)?;
            let (root, height) = (v.rec.root, v.rec.height);
            m.resolve(root, height, first, n, &mut ptrs)?;
        }
        let end = offset + buf.len() as u64;
        let dev = &*self.store.dev;
        let whole = |k: usize| {
            let s = (first + k as u64) * BLOCK_SIZE_U64;
            s >= offset && s + BLOCK_SIZE_U64 <= end
        };
        let mut k = 0usize;
        while k < ptrs.len() {
            let bstart = (first + k as u64) * BLOCK_SIZE_U64;
            let lo = offset.max(bstart);
            let hi = end.min(bstart + BLOCK_SIZE_U64);
            let p = ptrs[k];
            if !p.is_block() {
                buf[(lo - offset) as usize..(hi - offset) as usize].fill(0);
                k += 1;
                continue;
            }
            if !whole(k) {
                let mut tmp = [0u8; BLOCK_SIZE];
                dev.read_at(&mut tmp, p.addr() * BLOCK_SIZE_U64)?;
                self.verify(&tmp, p, first + k as u64)?;
                let within = (lo - bstart) as usize;
                buf[(lo - offset) as usize..(hi - offset) as usize]
                    .copy_from_slice(&tmp[within..within + (hi - lo) as usize]);
                k += 1;
                continue;
            }
            let mut j = k + 1;
            while j < ptrs.len()
                && whole(j)
                && ptrs[j].is_block()
                && ptrs[j].addr() == p.addr() + (j - k) as u64
            {
                j += 1;
            }
            let at = (lo - offset) as usize;
            let run = &mut buf[at..at + (j - k) * BLOCK_SIZE];
            dev.read_at(run, p.addr() * BLOCK_SIZE_U64)?;
            for (i, chunk) in run.chunks(BLOCK_SIZE).enumerate() {
                self.verify(chunk, ptrs[k + i], first + (k + i) as u64)?;
            }
            k = j;
        }
        Ok(())
    }

    fn verify(&self, data: &[u8], p: Ptr, lba: u64) -> StoreResult<()> {
        if hash24(data) != p.hash {
            log_limited(format_args!(
                "checksum mismatch: {} block {lba} (store block {}); answering with an I/O error",
                self.name,
                p.addr()
            ));
            return Err(StoreError::Checksum(format!(
                "{} block {lba} (store block {})",
                self.name,
                p.addr()
            )));
        }
        Ok(())
    }

    /// Writes `buf` at `offset`; with `fua`, durable on return.
    pub fn write(&self, buf: &[u8], offset: u64, fua: bool) -> StoreResult<()> {
        self.writable()?;
        self.range(&mut self.store.meta.lock(), offset, buf.len() as u64)?;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let bstart = pos - pos % BLOCK_SIZE_U64;
            if pos != bstart || end - pos < BLOCK_SIZE_U64 {
                let chunk_end = end.min(bstart + BLOCK_SIZE_U64);
                let data = &buf[(pos - offset) as usize..(chunk_end - offset) as usize];
                self.patch_block(
                    pos / BLOCK_SIZE_U64,
                    (pos - bstart) as usize,
                    Some(data),
                    false,
                )?;
                pos = chunk_end;
            } else {
                let run_end = end - end % BLOCK_SIZE_U64;
                self.write_whole(
                    pos / BLOCK_SIZE_U64,
                    &buf[(pos - offset) as usize..(run_end - offset) as usize],
                )?;
                pos = run_end;
            }
        }
        self.after_write(fua)
    }

    fn after_write(&self, fua: bool) -> StoreResult<()> {
        if fua {
            return self.store.flush();
        }
        let over = self.store.meta.lock().nodes.dirty.len() > self.store.options.max_dirty_nodes;
        if over {
            self.store.commit_if_changed()?;
        }
        Ok(())
    }

    /// Writes whole blocks from `lba`.
    fn write_whole(&self, lba: u64, data: &[u8]) -> StoreResult<()> {
        for (b, batch) in data.chunks(WRITE_BATCH * BLOCK_SIZE).enumerate() {
            self.write_batch(lba + (b * WRITE_BATCH) as u64, batch)?;
        }
        Ok(())
    }

    fn write_batch(&self, lba: u64, batch: &[u8]) -> StoreResult<()> {
        let blocks: Vec<&[u8]> = batch.chunks(BLOCK_SIZE).collect();
        let mut new: Vec<Ptr> = blocks
            .iter()
            .map(|b| {
                if is_zero(b) {
                    Ptr::HOLE
                } else {
                    Ptr::block(1, hash24(b))
                }
            })
            .collect();
        let wanted = new.iter().filter(|p| p.is_block()).count() as u64;
        let runs = self.reserve(wanted)?;
        // Hand out the reserved addresses to the data blocks in order.
        let mut addrs = runs.iter().flat_map(|&(a, n)| a..a + n);
        for p in new.iter_mut().filter(|p| p.is_block()) {
            *p = p.with_addr(addrs.next().expect("reserved enough"));
        }
        if let Err(e) = self.write_data(&new, &blocks) {
            self.unreserve(&runs);
            self.store.poison(&e);
            return Err(e);
        }
        let mut m = self.store.meta.lock();
        let dev = m.dev.clone();
        for p in new.iter().filter(|p| p.is_block()) {
            m.rc.claim(&*dev, p.addr())?;
        }
        self.set_entries(&mut m, lba, &new)
    }

    /// Writes data blocks to their (reserved) addresses, adjacent ones in one vectored write.
    fn write_data(&self, ptrs: &[Ptr], blocks: &[&[u8]]) -> StoreResult<()> {
        let dev = &*self.store.dev;
        let placed: Vec<(u64, &[u8])> = ptrs
            .iter()
            .zip(blocks)
            .filter(|(p, _)| p.is_block())
            .map(|(p, b)| (p.addr(), *b))
            .collect();
        let mut i = 0;
        while i < placed.len() {
            let mut j = i + 1;
            while j < placed.len() && placed[j].0 == placed[i].0 + (j - i) as u64 {
                j += 1;
            }
            let bufs: Vec<&[u8]> = placed[i..j].iter().map(|(_, b)| *b).collect();
            dev.write_vectored_at(&bufs, placed[i].0 * BLOCK_SIZE_U64)?;
            i = j;
        }
        Ok(())
    }

    /// Reserves `want` blocks for data. When the store looks full but holds blocks that a
    /// commit would make reusable (freed by overwrites, or queued orphans), commits and tries
    /// again before answering "no space".
    fn reserve(&self, want: u64) -> StoreResult<Vec<(u64, u64)>> {
        let mut attempts = 0;
        loop {
            match self.try_reserve(want) {
                Err(StoreError::NoSpace) if attempts < 3 => {
                    let reclaimable = {
                        let m = self.store.meta.lock();
                        m.rc.held() > 0 || !m.orphans.is_empty()
                    };
                    if !reclaimable {
                        return Err(StoreError::NoSpace);
                    }
                    attempts += 1;
                    self.store.commit_if_changed()?;
                }
                other => return other,
            }
        }
    }

    fn try_reserve(&self, mut want: u64) -> StoreResult<Vec<(u64, u64)>> {
        let mut runs = Vec::new();
        if want == 0 {
            return Ok(runs);
        }
        let mut m = self.store.meta.lock();
        let keep = m.reserve;
        let mut cursor = m.vdi(self.id)?.cursor;
        while want > 0 {
            let dev = m.dev.clone();
            match m.rc.reserve(&*dev, &mut cursor, want, keep)? {
                Some((a, n)) => {
                    runs.push((a, n));
                    want -= n;
                }
                None => {
                    for &(a, n) in &runs {
                        for b in a..a + n {
                            m.rc.unreserve(&*dev, b)?;
                        }
                    }
                    return Err(StoreError::NoSpace);
                }
            }
        }
        m.vdi(self.id)?.cursor = cursor;
        Ok(runs)
    }

    fn unreserve(&self, runs: &[(u64, u64)]) {
        let mut m = self.store.meta.lock();
        let dev = m.dev.clone();
        for &(a, n) in runs {
            for b in a..a + n {
                let _ = m.rc.unreserve(&*dev, b);
            }
        }
    }

    /// Points logical blocks from `lba` at `new` (claimed blocks, holes or zeros) and drops the
    /// references of what they pointed at.
    fn set_entries(&self, m: &mut Meta, lba: u64, new: &[Ptr]) -> StoreResult<()> {
        let v = m.vdi(self.id)?;
        let (mut root, height) = (v.rec.root, v.rec.height);
        let mut old = Vec::with_capacity(new.len());
        let mut done = 0;
        let mut result = Ok(());
        while done < new.len() {
            match m.set_run(&mut root, height, lba + done as u64, &new[done..], &mut old) {
                Ok(n) => done += n,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        let v = m.vdi(self.id)?;
        v.rec.root = root;
        v.dirty = true;
        m.changed = true;
        result?;
        for p in old {
            m.drop_ref(p, 0)?;
        }
        Ok(())
    }

    /// Read-modify-write of one block: `data` (or zeros, if `None`) at byte `within`.
    /// With `keep_zero` a block that ends up all zeros is recorded as zeros, not a hole.
    fn patch_block(
        &self,
        lba: u64,
        within: usize,
        data: Option<&[u8]>,
        keep_zero: bool,
    ) -> StoreResult<()> {
        let len = data.map_or(BLOCK_SIZE - within, |d| d.len());
        loop {
            let mut block = [0u8; BLOCK_SIZE];
            let old = {
                let _epoch = self.store.epoch.enter();
                let old = {
                    let mut m = self.store.meta.lock();
                    let v = m.vdi(self.id)?;
                    let (root, height) = (v.rec.root, v.rec.height);
                    let mut out = Vec::with_capacity(1);
                    m.resolve(root, height, lba, 1, &mut out)?;
                    out[0]
                };
                if old.is_block() {
                    self.store
                        .dev
                        .read_at(&mut block, old.addr() * BLOCK_SIZE_U64)?;
                    self.verify(&block, old, lba)?;
                }
                old
            };
            match data {
                Some(d) => block[within..within + d.len()].copy_from_slice(d),
                None => block[within..within + len].fill(0),
            }
            let new = if is_zero(&block) {
                if keep_zero || old.kind()? == PtrKind::Zero {
                    Ptr::ZERO
                } else {
                    Ptr::HOLE
                }
            } else {
                Ptr::block(1, hash24(&block))
            };
            if new == old {
                return Ok(());
            }
            let runs = if new.is_block() {
                self.reserve(1)?
            } else {
                Vec::new()
            };
            let new = match runs.first() {
                Some(&(a, _)) => {
                    let p = new.with_addr(a);
                    if let Err(e) = self.store.dev.write_at(&block, a * BLOCK_SIZE_U64) {
                        self.unreserve(&runs);
                        self.store.poison(&e);
                        return Err(e.into());
                    }
                    p
                }
                None => new,
            };
            let mut m = self.store.meta.lock();
            let v = m.vdi(self.id)?;
            let (root, height) = (v.rec.root, v.rec.height);
            let mut cur = Vec::with_capacity(1);
            m.resolve(root, height, lba, 1, &mut cur)?;
            if cur[0] != old {
                // Someone wrote this block meanwhile: start over from what is there now.
                drop(m);
                self.unreserve(&runs);
                continue;
            }
            if new.is_block() {
                m.rc.claim(&*self.store.dev, new.addr())?;
            }
            return self.set_entries(&mut m, lba, &[new]);
        }
    }

    /// Unmaps whole blocks in the range (edges keep their data: TRIM allows it).
    pub fn discard(&self, offset: u64, len: u64) -> StoreResult<()> {
        self.writable()?;
        self.range(&mut self.store.meta.lock(), offset, len)?;
        let first = offset.div_ceil(BLOCK_SIZE_U64);
        let end = (offset + len) / BLOCK_SIZE_U64;
        if first < end {
            self.fill(first, end, Ptr::HOLE)?;
        }
        self.after_write(false)
    }

    /// Makes the range read as zeros: partial blocks are patched, whole ones unmapped (or, with
    /// `no_hole`, recorded as zeros).
    pub fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool, fua: bool) -> StoreResult<()> {
        self.writable()?;
        self.range(&mut self.store.meta.lock(), offset, len)?;
        let end = offset + len;
        let first = offset.div_ceil(BLOCK_SIZE_U64);
        let last = end / BLOCK_SIZE_U64;
        if first > last {
            // Inside one block.
            let lba = offset / BLOCK_SIZE_U64;
            self.patch_block(
                lba,
                (offset % BLOCK_SIZE_U64) as usize,
                Some(&vec![0; len as usize]),
                no_hole,
            )?;
        } else {
            if offset % BLOCK_SIZE_U64 != 0 {
                let lba = offset / BLOCK_SIZE_U64;
                self.patch_block(lba, (offset % BLOCK_SIZE_U64) as usize, None, no_hole)?;
            }
            if first < last {
                self.fill(first, last, if no_hole { Ptr::ZERO } else { Ptr::HOLE })?;
            }
            if end % BLOCK_SIZE_U64 != 0 {
                self.patch_block(
                    last,
                    0,
                    Some(&vec![0; (end % BLOCK_SIZE_U64) as usize]),
                    no_hole,
                )?;
            }
        }
        self.after_write(fua)
    }

    fn fill(&self, first: u64, end: u64, fill: Ptr) -> StoreResult<()> {
        let mut m = self.store.meta.lock();
        let v = m.vdi(self.id)?;
        let (mut root, height) = (v.rec.root, v.rec.height);
        let r = m.fill_range(&mut root, height, first, end, fill);
        let v = m.vdi(self.id)?;
        v.rec.root = root;
        v.dirty = true;
        m.changed = true;
        r
    }

    /// Describes allocation from `offset`: at most `max` extents covering at most `len` bytes.
    pub fn extents(&self, offset: u64, len: u64, max: usize) -> StoreResult<Vec<Extent>> {
        if len == 0 {
            return Err(StoreError::Invalid("block status of an empty range".into()));
        }
        let (first, n) = block_range(offset, len);
        let mut out: Vec<(u64, ExtentState)> = Vec::new();
        {
            let mut m = self.store.meta.lock();
            self.range(&mut m, offset, len)?;
            let v = m.vdi(self.id)?;
            let (root, height) = (v.rec.root, v.rec.height);
            let mut budget = STATUS_BUDGET;
            m.extents_rec(
                root,
                height,
                0,
                first,
                first + n,
                &mut out,
                max.max(1),
                &mut budget,
            )?;
        }
        // Blocks to bytes, clipped to the request.
        let mut pos = first * BLOCK_SIZE_U64;
        let end = offset + len;
        let mut res = Vec::with_capacity(out.len());
        for (blocks, state) in out {
            let s = pos.max(offset);
            let e = (pos + blocks * BLOCK_SIZE_U64).min(end);
            pos += blocks * BLOCK_SIZE_U64;
            if e > s {
                res.push(Extent { len: e - s, state });
            }
        }
        Ok(res)
    }

    /// Reads ahead (warms the page cache for the blocks of a range).
    pub fn prefetch(&self, offset: u64, len: u64) -> StoreResult<()> {
        self.range(&mut self.store.meta.lock(), offset, len)?;
        Ok(())
    }

    pub fn size(&self) -> u64 {
        self.store
            .meta
            .lock()
            .vdi(self.id)
            .map(|v| v.rec.size)
            .unwrap_or(0)
    }
}

impl Meta {
    #[allow(clippy::too_many_arguments)]
    fn extents_rec(
        &mut self,
        p: Ptr,
        level: u8,
        base: u64,
        start: u64,
        end: u64,
        out: &mut Vec<(u64, ExtentState)>,
        max: usize,
        budget: &mut usize,
    ) -> StoreResult<bool> {
        let span = 1u64 << (FANOUT_BITS * level as u32);
        let s = start.max(base);
        let e = end.min(base.saturating_add(span));
        if e <= s {
            return Ok(false);
        }
        let state = match p.kind()? {
            PtrKind::Hole => ExtentState::Hole,
            PtrKind::Zero => ExtentState::Zero,
            PtrKind::Block if level == 0 => ExtentState::Data,
            PtrKind::Block => {
                let child_span = span >> FANOUT_BITS;
                let firsti = ((s - base) / child_span) as usize;
                let lasti = ((e - 1 - base) / child_span) as usize;
                let children: Vec<Ptr> = {
                    let node = self.nodes.get(&*self.dev, p)?;
                    (firsti..=lasti.min(FANOUT - 1))
                        .map(|i| node.get(i))
                        .collect()
                };
                for (k, c) in children.into_iter().enumerate() {
                    let cbase = base + (firsti + k) as u64 * child_span;
                    if self.extents_rec(c, level - 1, cbase, start, end, out, max, budget)? {
                        return Ok(true);
                    }
                }
                return Ok(false);
            }
        };
        if *budget == 0 {
            return Ok(true);
        }
        *budget -= 1;
        let full = out.len() >= max;
        match out.last_mut() {
            Some((n, st)) if *st == state => *n += e - s,
            _ if full => return Ok(true),
            _ => out.push((e - s, state)),
        }
        Ok(false)
    }
}

impl Disk for StoreDisk {
    fn size(&self) -> u64 {
        StoreDisk::size(self)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        self.read(buf, offset).map_err(|e| to_disk(&self.name, e))
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), DiskError> {
        self.write(buf, offset, fua)
            .map_err(|e| to_disk(&self.name, e))
    }

    fn flush(&self) -> Result<(), DiskError> {
        self.store.flush().map_err(|e| to_disk(&self.name, e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        StoreDisk::discard(self, offset, len).map_err(|e| to_disk(&self.name, e))
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), DiskError> {
        StoreDisk::write_zeroes(self, offset, len, no_hole, fua).map_err(|e| to_disk(&self.name, e))
    }

    fn block_status(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Result<Vec<Extent>, DiskError> {
        self.extents(offset, len, max_extents)
            .map_err(|e| to_disk(&self.name, e))
    }

    fn cache(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.prefetch(offset, len)
            .map_err(|e| to_disk(&self.name, e))
    }
}

fn to_disk(name: &str, e: StoreError) -> DiskError {
    match &e {
        StoreError::Invalid(_) => DiskError::OutOfRange,
        StoreError::Io(_) | StoreError::Corrupt(_) | StoreError::Poisoned => {
            log_limited(format_args!("{name}: {e}"));
            e.disk_error()
        }
        _ => e.disk_error(),
    }
}
