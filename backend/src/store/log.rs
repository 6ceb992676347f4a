//! The intent log (format 2, FORMAT.md §9): what makes a flush, a FUA write or a snapshot
//! durable without waiting for a checkpoint.
//!
//! ```text
//!  change (under its locks) ─ append entry ─► buffer (LSN-ordered bytes)
//!  flush ─ take buffer ─ write chained log blocks ─ fsync (data and log) ─► durable LSN
//!  checkpoint cut ─ records (head block, its sequence number, LSN, chain id) in the commit
//!                   record: recovery replays entries from that LSN on
//! ```
//!
//! Every change to the maps and the registry appends one entry, while the locks that order
//! the change are held, so the log's order is the order the changes happened in. A flush
//! writes what is buffered as a run of framed blocks, each naming the next (reserved ahead of
//! time), and group-commits: one writer at a time, and whoever gets the writer takes
//! everything buffered, for the flushes queued behind it too.
//!
//! Log blocks are only *reserved* in the allocator, never counted: no checkpoint references
//! them. Blocks before the head of a durable checkpoint go back to the allocator.

use std::{
    collections::VecDeque,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

use parking_lot::Mutex;

use super::{
    device::Device,
    error::{StoreError, StoreResult},
    format::{
        log_at, magic, open_frame, put_u16, put_u64, seal_frame, u16_at, u64_at, Frame,
        LogPosition, Ptr, BLOCK_SIZE, BLOCK_SIZE_U64, FRAME_HEADER, LOG_BLOCK_ENTRIES, PTR_LEN,
    },
    refcount::Cursor,
    schedules::Schedule,
    space::Space,
};

/// Entry header: kind (u8) and body length (u16).
const ENTRY_HEADER: usize = 3;
/// Most block pointers in one write entry (the largest entry must fit a log block).
pub(super) const MAX_WRITE_PTRS: usize = (LOG_BLOCK_ENTRIES - ENTRY_HEADER - 16) / PTR_LEN;
/// Log blocks reserved at a time.
const POOL_REFILL: u64 = 64;

mod kind {
    pub const WRITE: u8 = 1;
    pub const FILL: u8 = 2;
    pub const CREATE: u8 = 3;
    pub const SNAPSHOT: u8 = 4;
    pub const FORK: u8 = 5;
    pub const RENAME: u8 = 6;
    pub const RESIZE: u8 = 7;
    pub const DELETE: u8 = 8;
    /// Format 3.
    pub const ROLLBACK: u8 = 9;
    /// Format 4.
    pub const SCHEDULE: u8 = 10;
    /// Format 5.
    pub const BACKING: u8 = 11;
    /// Format 7: a write whose blocks were already in use (found by dedup).
    pub const SHARE: u8 = 12;
}

/// One change, as the log records it (FORMAT.md §9.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Entry {
    /// Blocks `lba..` of VDI `vdi` now map to `ptrs` (data blocks, holes or zeros). With
    /// `shared` (format 7), the data blocks were already in use and gain a reference;
    /// otherwise they are new (reserved) blocks.
    Write {
        vdi: u64,
        lba: u64,
        ptrs: Vec<Ptr>,
        shared: bool,
    },
    /// Blocks `start..end` of VDI `vdi` are now holes (or recorded zeros).
    Fill {
        vdi: u64,
        start: u64,
        end: u64,
        zero: bool,
    },
    Create {
        id: u64,
        size: u64,
        created: u64,
        name: String,
    },
    Snapshot {
        vdi: u64,
        id: u64,
        created: u64,
        name: String,
        /// A received snapshot's identity (format 3; written only when not 0).
        guid: u64,
    },
    Fork {
        snapshot: u64,
        id: u64,
        created: u64,
        name: String,
        origin_name: String,
    },
    /// A VDI's new name, or a snapshot's new name within its VDI.
    Rename {
        id: u64,
        name: String,
    },
    Resize {
        id: u64,
        size: u64,
    },
    /// VDIs and snapshots deleted together, in this order.
    Delete {
        ids: Vec<u64>,
    },
    /// VDI `vdi` reads as its snapshot `snapshot` again (map, size and height).
    Rollback {
        vdi: u64,
        snapshot: u64,
    },
    /// The snapshot schedule of `target` is now `schedule` (`None`: it has none).
    Schedule {
        target: String,
        schedule: Option<Schedule>,
    },
    /// VDI `id` now reads through the NBD export `uri` where its map has holes (`None`: it
    /// no longer does; it was hydrated).
    Backing {
        id: u64,
        uri: Option<String>,
    },
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A cursor over an entry body that fails instead of panicking on short or bad input.
struct Body<'a> {
    b: &'a [u8],
    at: usize,
}

impl Body<'_> {
    fn bad() -> StoreError {
        StoreError::Corrupt("log entry is malformed".into())
    }

    fn u64(&mut self) -> StoreResult<u64> {
        let v = self.b.get(self.at..self.at + 8).ok_or_else(Self::bad)?;
        self.at += 8;
        Ok(u64_at(v, 0))
    }

    fn string(&mut self) -> StoreResult<String> {
        let n = u16_at(self.b.get(self.at..self.at + 2).ok_or_else(Self::bad)?, 0) as usize;
        let s = self
            .b
            .get(self.at + 2..self.at + 2 + n)
            .ok_or_else(Self::bad)?;
        self.at += 2 + n;
        String::from_utf8(s.to_vec()).map_err(|_| Self::bad())
    }

    fn done(&self) -> StoreResult<()> {
        if self.at == self.b.len() {
            Ok(())
        } else {
            Err(Self::bad())
        }
    }
}

impl Entry {
    /// Appends the encoded entry (header and body) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; ENTRY_HEADER]);
        let k = match self {
            Entry::Write {
                vdi,
                lba,
                ptrs,
                shared,
            } => {
                debug_assert!(ptrs.len() <= MAX_WRITE_PTRS);
                out.extend_from_slice(&vdi.to_le_bytes());
                out.extend_from_slice(&lba.to_le_bytes());
                for p in ptrs {
                    let mut b = [0u8; PTR_LEN];
                    p.encode(&mut b);
                    out.extend_from_slice(&b);
                }
                if *shared {
                    kind::SHARE
                } else {
                    kind::WRITE
                }
            }
            Entry::Fill {
                vdi,
                start,
                end,
                zero,
            } => {
                out.extend_from_slice(&vdi.to_le_bytes());
                out.extend_from_slice(&start.to_le_bytes());
                out.extend_from_slice(&end.to_le_bytes());
                out.push(*zero as u8);
                kind::FILL
            }
            Entry::Create {
                id,
                size,
                created,
                name,
            } => {
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&size.to_le_bytes());
                out.extend_from_slice(&created.to_le_bytes());
                put_str(out, name);
                kind::CREATE
            }
            Entry::Snapshot {
                vdi,
                id,
                created,
                name,
                guid,
            } => {
                out.extend_from_slice(&vdi.to_le_bytes());
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&created.to_le_bytes());
                put_str(out, name);
                if *guid != 0 {
                    out.extend_from_slice(&guid.to_le_bytes());
                }
                kind::SNAPSHOT
            }
            Entry::Fork {
                snapshot,
                id,
                created,
                name,
                origin_name,
            } => {
                out.extend_from_slice(&snapshot.to_le_bytes());
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&created.to_le_bytes());
                put_str(out, name);
                put_str(out, origin_name);
                kind::FORK
            }
            Entry::Rename { id, name } => {
                out.extend_from_slice(&id.to_le_bytes());
                put_str(out, name);
                kind::RENAME
            }
            Entry::Resize { id, size } => {
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&size.to_le_bytes());
                kind::RESIZE
            }
            Entry::Delete { ids } => {
                for id in ids {
                    out.extend_from_slice(&id.to_le_bytes());
                }
                kind::DELETE
            }
            Entry::Rollback { vdi, snapshot } => {
                out.extend_from_slice(&vdi.to_le_bytes());
                out.extend_from_slice(&snapshot.to_le_bytes());
                kind::ROLLBACK
            }
            Entry::Schedule { target, schedule } => {
                put_str(out, target);
                if let Some(s) = schedule {
                    out.extend_from_slice(&s.encode());
                }
                kind::SCHEDULE
            }
            Entry::Backing { id, uri } => {
                out.extend_from_slice(&id.to_le_bytes());
                if let Some(u) = uri {
                    put_str(out, u);
                }
                kind::BACKING
            }
        };
        let len = out.len() - start - ENTRY_HEADER;
        out[start] = k;
        put_u16(&mut out[start..], 1, len as u16);
    }

    /// Decodes the entry at the start of `b`; returns it and its encoded length.
    pub fn decode(b: &[u8]) -> StoreResult<(Entry, usize)> {
        if b.len() < ENTRY_HEADER {
            return Err(Body::bad());
        }
        let len = u16_at(b, 1) as usize;
        let body = b
            .get(ENTRY_HEADER..ENTRY_HEADER + len)
            .ok_or_else(Body::bad)?;
        let mut r = Body { b: body, at: 0 };
        let e = match b[0] {
            k @ (kind::WRITE | kind::SHARE) => {
                let vdi = r.u64()?;
                let lba = r.u64()?;
                let rest = &body[16..];
                if rest.len() % PTR_LEN != 0 {
                    return Err(Body::bad());
                }
                let ptrs: Vec<Ptr> = rest.chunks(PTR_LEN).map(Ptr::decode).collect();
                for p in &ptrs {
                    p.kind()?;
                }
                r.at = body.len();
                Entry::Write {
                    vdi,
                    lba,
                    ptrs,
                    shared: k == kind::SHARE,
                }
            }
            kind::FILL => {
                let vdi = r.u64()?;
                let start = r.u64()?;
                let end = r.u64()?;
                let zero = *body.get(24).ok_or_else(Body::bad)? != 0;
                r.at += 1;
                Entry::Fill {
                    vdi,
                    start,
                    end,
                    zero,
                }
            }
            kind::CREATE => Entry::Create {
                id: r.u64()?,
                size: r.u64()?,
                created: r.u64()?,
                name: r.string()?,
            },
            kind::SNAPSHOT => Entry::Snapshot {
                vdi: r.u64()?,
                id: r.u64()?,
                created: r.u64()?,
                name: r.string()?,
                guid: if r.at < body.len() { r.u64()? } else { 0 },
            },
            kind::FORK => Entry::Fork {
                snapshot: r.u64()?,
                id: r.u64()?,
                created: r.u64()?,
                name: r.string()?,
                origin_name: r.string()?,
            },
            kind::RENAME => Entry::Rename {
                id: r.u64()?,
                name: r.string()?,
            },
            kind::RESIZE => Entry::Resize {
                id: r.u64()?,
                size: r.u64()?,
            },
            kind::DELETE => {
                if len % 8 != 0 || len == 0 {
                    return Err(Body::bad());
                }
                let ids = body.chunks(8).map(|c| u64_at(c, 0)).collect();
                r.at = body.len();
                Entry::Delete { ids }
            }
            kind::ROLLBACK => Entry::Rollback {
                vdi: r.u64()?,
                snapshot: r.u64()?,
            },
            kind::SCHEDULE => {
                let target = r.string()?;
                let rest = &body[r.at..];
                r.at = body.len();
                Entry::Schedule {
                    target,
                    schedule: if rest.is_empty() {
                        None
                    } else {
                        Some(Schedule::decode(rest)?)
                    },
                }
            }
            kind::BACKING => Entry::Backing {
                id: r.u64()?,
                uri: if r.at < body.len() {
                    Some(r.string()?)
                } else {
                    None
                },
            },
            k => {
                return Err(StoreError::Corrupt(format!(
                    "log entry of unknown kind {k} (written by a newer Parallax?)"
                )))
            }
        };
        r.done()?;
        Ok((e, ENTRY_HEADER + len))
    }
}

/// Length of the entry at the start of `b` (which holds whole entries).
fn entry_len(b: &[u8]) -> usize {
    ENTRY_HEADER + u16_at(b, 1) as usize
}

struct LogState {
    /// Encoded entries not yet taken by a writer; `buf[0]` is at LSN `buf_lsn`.
    buf: Vec<u8>,
    buf_lsn: u64,
    /// Reserved blocks; the front is where the next block goes.
    pool: VecDeque<u64>,
    /// Sequence number of the block at the front of the pool.
    seq: u64,
    /// This session's chain id; 0 until a checkpoint's cut starts the chain.
    chain: u64,
    /// The checkpoint that starts the chain is durable: recovery can find its blocks, so
    /// they may be written.
    published: bool,
    /// Blocks handed to writers, oldest first, with their sequence numbers: released once a
    /// durable checkpoint's head is past them.
    written: VecDeque<(u64, u64)>,
    cursor: Cursor,
    /// LSN after the last entry written to a log block (synced or not).
    written_end: u64,
}

pub(super) struct Log {
    state: Mutex<LogState>,
    writer: Mutex<()>,
    durable: AtomicU64,
    /// The store is format 2 (the log exists).
    enabled: AtomicBool,
}

/// A run of log blocks a writer took, encoded and ready to write.
struct Record {
    blocks: Vec<(u64, Box<[u8; BLOCK_SIZE]>)>,
    end_lsn: u64,
}

impl Log {
    /// A log continuing at LSN `lsn`; `enabled` for format-2 stores.
    pub fn new(lsn: u64, enabled: bool) -> Log {
        Log {
            state: Mutex::new(LogState {
                buf: Vec::new(),
                buf_lsn: lsn,
                pool: VecDeque::new(),
                seq: 0,
                chain: 0,
                published: false,
                written: VecDeque::new(),
                cursor: Cursor::default(),
                written_end: lsn,
            }),
            writer: Mutex::new(()),
            durable: AtomicU64::new(lsn),
            enabled: AtomicBool::new(enabled),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Release);
    }

    /// Records a change (call with the locks that order the change held).
    pub fn append(&self, e: &Entry) {
        if self.enabled() {
            e.encode(&mut self.state.lock().buf);
        }
    }

    /// The LSN after the last entry appended.
    pub fn end(&self) -> u64 {
        let st = self.state.lock();
        st.buf_lsn + st.buf.len() as u64
    }

    /// Entries up to `lsn` are durable (a checkpoint covered them).
    pub fn durable_through(&self, lsn: u64) {
        self.durable.fetch_max(lsn, Ordering::AcqRel);
    }

    /// At a checkpoint's cut (the caller holds the space lock): where recovery from that
    /// checkpoint starts. Starts this session's chain on the first cut.
    pub fn cut(&self, dev: &dyn Device, space: &mut Space, nonce: u64) -> StoreResult<LogPosition> {
        if !self.enabled() {
            return Ok(LogPosition::default());
        }
        let mut st = self.state.lock();
        if st.pool.is_empty() {
            let mut cursor = st.cursor;
            let got = space
                .rc
                .reserve(dev, &mut cursor, POOL_REFILL, 0)?
                .ok_or(StoreError::NoSpace)?;
            st.cursor = cursor;
            st.pool.extend(got.0..got.0 + got.1);
        }
        if st.chain == 0 {
            st.chain = nonce | 1;
            st.seq = 0;
        }
        Ok(LogPosition {
            head: *st.pool.front().expect("refilled"),
            seq: st.seq,
            lsn: st.buf_lsn + st.buf.len() as u64,
            chain: st.chain,
        })
    }

    /// Continues at LSN `lsn` (after recovery, or an upgrade), with nothing buffered.
    pub fn reset(&self, lsn: u64) {
        let mut st = self.state.lock();
        st.buf.clear();
        st.buf_lsn = lsn;
        st.written_end = lsn;
        self.durable.store(lsn, Ordering::Release);
    }

    /// A checkpoint at `pos` is durable: entries before `pos.lsn` need no log block any more,
    /// and the blocks before its head go back to the allocator (returned for the caller to
    /// unreserve).
    pub fn checkpointed(&self, pos: LogPosition) -> Vec<u64> {
        self.durable_through(pos.lsn);
        let mut st = self.state.lock();
        if pos.chain == st.chain {
            st.published = true;
        }
        if pos.lsn > st.buf_lsn {
            let n = ((pos.lsn - st.buf_lsn) as usize).min(st.buf.len());
            st.buf.drain(..n);
            st.buf_lsn += n as u64;
        }
        let mut out = Vec::new();
        while st.written.front().is_some_and(|&(seq, _)| seq < pos.seq) {
            out.push(st.written.pop_front().expect("checked").1);
        }
        out
    }

    /// Makes every entry appended before `target` durable. `Ok(false)` if the chain may not be
    /// written yet (the caller checkpoints instead): until the checkpoint that starts it is
    /// durable, recovery would not find it.
    pub fn flush(&self, dev: &dyn Device, space: &Mutex<Space>, target: u64) -> StoreResult<bool> {
        if self.durable.load(Ordering::Acquire) >= target {
            return Ok(true);
        }
        let _w = self.writer.lock();
        while self.durable.load(Ordering::Acquire) < target {
            if !self.prepare_pool(dev, space)? {
                return Ok(false);
            }
            // One sync makes the data, the blocks written ahead and these durable together.
            // Until it returns, any of them may reach the disk without the others: the blocks
            // claim only what was durable before it, and recovery checks every later entry's
            // data (replay.rs, `drop_unwritten_tail`).
            let synced = self.durable.load(Ordering::Acquire);
            let end = match self.take(synced) {
                Some(rec) => {
                    write_blocks(dev, &rec.blocks)?;
                    rec.end_lsn
                }
                None => self.state.lock().written_end,
            };
            dev.sync()?;
            self.durable.fetch_max(end, Ordering::AcqRel);
        }
        Ok(true)
    }

    /// Writes buffered entries to log blocks without syncing, once at least `min_bytes` are
    /// buffered, so that a flush only has the last moments to write. Skipped while a flush
    /// writes.
    pub fn write_ahead(
        &self,
        dev: &dyn Device,
        space: &Mutex<Space>,
        min_bytes: usize,
    ) -> StoreResult<()> {
        let Some(_w) = self.writer.try_lock() else {
            return Ok(());
        };
        if self.state.lock().buf.len() < min_bytes || !self.prepare_pool(dev, space)? {
            return Ok(());
        }
        let synced = self.durable.load(Ordering::Acquire);
        if let Some(rec) = self.take(synced) {
            write_blocks(dev, &rec.blocks)?;
        }
        Ok(())
    }

    /// Makes sure the pool has blocks for what is buffered; false if the chain may not be
    /// written yet (no durable checkpoint names it).
    fn prepare_pool(&self, dev: &dyn Device, space: &Mutex<Space>) -> StoreResult<bool> {
        let need = {
            let st = self.state.lock();
            if !st.published {
                return Ok(false);
            }
            // One more than the entries take: each block names its successor.
            (st.buf.len().div_ceil(LOG_BLOCK_ENTRIES / 2) + 2).saturating_sub(st.pool.len())
        };
        if need > 0 {
            self.refill(dev, space, need as u64)?;
        }
        Ok(true)
    }

    /// Reserves `n` more blocks for the chain.
    fn refill(&self, dev: &dyn Device, space: &Mutex<Space>, n: u64) -> StoreResult<()> {
        let mut cursor = self.state.lock().cursor;
        let mut got = Vec::new();
        {
            let mut sp = space.lock();
            let mut left = n.max(POOL_REFILL);
            while left > 0 {
                match sp.rc.reserve(dev, &mut cursor, left, 0)? {
                    Some((a, k)) => {
                        got.extend(a..a + k);
                        left -= k;
                    }
                    None if got.len() as u64 >= n => break,
                    None => {
                        let runs: Vec<(u64, u64)> = got.iter().map(|&a| (a, 1)).collect();
                        sp.unreserve(dev, &runs);
                        return Err(StoreError::NoSpace);
                    }
                }
            }
        }
        let mut st = self.state.lock();
        st.cursor = cursor;
        st.pool.extend(got);
        Ok(())
    }

    /// Takes as many buffered entries as the pool has blocks for, and encodes them into
    /// chained blocks that say entries before `synced` are durable.
    fn take(&self, synced: u64) -> Option<Record> {
        let mut st = self.state.lock();
        if st.buf.is_empty() {
            return None;
        }
        let mut blocks = Vec::new();
        let mut pos = 0;
        while pos < st.buf.len() && st.pool.len() >= 2 {
            let mut end = pos;
            while end < st.buf.len() && end - pos + entry_len(&st.buf[end..]) <= LOG_BLOCK_ENTRIES {
                end += entry_len(&st.buf[end..]);
            }
            if end == pos {
                debug_assert!(false, "a log entry larger than a block");
                break;
            }
            let addr = st.pool.pop_front().expect("two in the pool");
            let next = *st.pool.front().expect("two in the pool");
            let seq = st.seq;
            st.seq += 1;
            let mut b = Box::new([0u8; BLOCK_SIZE]);
            {
                let p = &mut b[FRAME_HEADER..];
                put_u64(p, log_at::NEXT, next);
                put_u64(p, log_at::FIRST_LSN, st.buf_lsn + pos as u64);
                put_u64(p, log_at::CHAIN, st.chain);
                put_u64(p, log_at::SYNCED_LSN, synced);
                p[log_at::ENTRIES..log_at::ENTRIES + end - pos].copy_from_slice(&st.buf[pos..end]);
            }
            seal_frame(
                &mut b[..],
                Frame {
                    magic: magic::LOG,
                    gen: seq,
                    addr,
                    aux: (end - pos) as u64,
                },
            );
            st.written.push_back((seq, addr));
            blocks.push((addr, b));
            pos = end;
        }
        if blocks.is_empty() {
            return None;
        }
        st.buf.drain(..pos);
        st.buf_lsn += pos as u64;
        st.written_end = st.buf_lsn;
        Some(Record {
            blocks,
            end_lsn: st.buf_lsn,
        })
    }
}

/// Writes log blocks, runs of adjacent ones in one vectored write.
fn write_blocks(dev: &dyn Device, blocks: &[(u64, Box<[u8; BLOCK_SIZE]>)]) -> StoreResult<()> {
    let mut i = 0;
    while i < blocks.len() {
        let mut j = i + 1;
        while j < blocks.len() && blocks[j].0 == blocks[i].0 + (j - i) as u64 {
            j += 1;
        }
        let bufs: Vec<&[u8]> = blocks[i..j].iter().map(|(_, b)| &b[..]).collect();
        dev.write_vectored_at(&bufs, blocks[i].0 * BLOCK_SIZE_U64)?;
        i = j;
    }
    Ok(())
}

/// A log chain as found on disk from a checkpoint's position: its blocks and its entries
/// (with their LSNs) from the position's LSN on.
pub(super) struct Found {
    pub blocks: Vec<u64>,
    pub entries: Vec<(u64, Entry)>,
    /// The LSN after the last entry found.
    pub end: u64,
    /// Entries before this LSN were durable with their data; later ones may not be (log
    /// blocks written ahead of a flush, before a crash).
    pub synced: u64,
}

/// Reads the chain from `pos` until a block that is not the next one of the chain (never
/// written, torn, or from another chain). Entries before `pos.lsn` are skipped; an entry that
/// does not decode ends the chain there (it was written but is garbage: an error).
pub(super) fn read_chain(dev: &dyn Device, pos: LogPosition) -> StoreResult<Found> {
    let mut found = Found {
        blocks: Vec::new(),
        entries: Vec::new(),
        end: pos.lsn,
        synced: pos.lsn,
    };
    if pos.head == 0 {
        return Ok(found);
    }
    let (mut addr, mut seq) = (pos.head, pos.seq);
    // LSN where the next block must start (blocks are contiguous in the LSN stream; the head
    // block may start before `pos.lsn`, with entries the checkpoint already holds).
    let mut next_lsn: Option<u64> = None;
    let max_blocks = dev.len() / BLOCK_SIZE_U64;
    let mut b = [0u8; BLOCK_SIZE];
    while addr != 0 && addr < max_blocks && (found.blocks.len() as u64) < max_blocks {
        if dev.read_at(&mut b, addr * BLOCK_SIZE_U64).is_err() {
            break;
        }
        let Ok(f) = open_frame(&b, magic::LOG, addr) else {
            break;
        };
        let p = &b[FRAME_HEADER..];
        if f.gen != seq
            || u64_at(p, log_at::CHAIN) != pos.chain
            || f.aux as usize > LOG_BLOCK_ENTRIES
        {
            break;
        }
        let first = u64_at(p, log_at::FIRST_LSN);
        // Blocks follow each other in the LSN stream. A gap can only hold entries a durable
        // checkpoint already has (dropped from memory before anyone wrote them).
        let fits = match next_lsn {
            Some(n) => first == n || (first > n && first <= pos.lsn),
            None => first <= pos.lsn,
        };
        if !fits {
            return Err(StoreError::Corrupt(format!(
                "log block {addr} (sequence {seq}) starts at LSN {first}, expected {} (chain from block {} at LSN {})",
                next_lsn.unwrap_or(pos.lsn),
                pos.head,
                pos.lsn
            )));
        }
        found.synced = found.synced.max(u64_at(p, log_at::SYNCED_LSN));
        next_lsn = Some(first + f.aux);
        let entries = &p[log_at::ENTRIES..log_at::ENTRIES + f.aux as usize];
        let mut at = 0;
        while at < entries.len() {
            let (e, n) = Entry::decode(&entries[at..])
                .map_err(|e| StoreError::Corrupt(format!("log block {addr}, offset {at}: {e}")))?;
            let lsn = first + at as u64;
            if lsn >= pos.lsn {
                found.entries.push((lsn, e));
            }
            at += n;
        }
        found.end = found.end.max(first + entries.len() as u64);
        found.blocks.push(addr);
        addr = u64_at(p, log_at::NEXT);
        seq += 1;
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::schedules::KeepRule;
    use crate::store::{device::MemDevice, format::Geometry, refcount::RcTable};

    fn entries() -> Vec<Entry> {
        vec![
            Entry::Write {
                vdi: 3,
                lba: 99,
                ptrs: vec![Ptr::block(77, [5; 24]), Ptr::HOLE, Ptr::ZERO],
                shared: false,
            },
            Entry::Write {
                vdi: 3,
                lba: 7,
                ptrs: vec![Ptr::block(78, [6; 24])],
                shared: true,
            },
            Entry::Fill {
                vdi: 3,
                start: 5,
                end: 1 << 40,
                zero: true,
            },
            Entry::Create {
                id: 9,
                size: 1 << 30,
                created: 42,
                name: "vm-1".into(),
            },
            Entry::Snapshot {
                vdi: 9,
                id: 10,
                created: 43,
                name: "s".into(),
                guid: 0,
            },
            Entry::Snapshot {
                vdi: 9,
                id: 13,
                created: 44,
                name: "received".into(),
                guid: 0xfeed_beef,
            },
            Entry::Fork {
                snapshot: 10,
                id: 11,
                created: 44,
                name: "f".into(),
                origin_name: "vm-1@s".into(),
            },
            Entry::Rename {
                id: 11,
                name: "g".into(),
            },
            Entry::Resize { id: 11, size: 4096 },
            Entry::Delete { ids: vec![10, 9] },
            Entry::Rollback {
                vdi: 11,
                snapshot: 12,
            },
            Entry::Schedule {
                target: "vm-*".into(),
                schedule: Some(Schedule {
                    every_secs: 10,
                    keep: vec![
                        KeepRule {
                            every_secs: 10,
                            for_secs: 3600,
                        },
                        KeepRule {
                            every_secs: 3600,
                            for_secs: 30 * 86400,
                        },
                    ],
                }),
            },
            Entry::Schedule {
                target: "vm-1".into(),
                schedule: None,
            },
            Entry::Backing {
                id: 12,
                uri: Some("nbd+unix:///gold?socket=/run/p.sock".into()),
            },
            Entry::Backing { id: 12, uri: None },
        ]
    }

    #[test]
    fn entries_round_trip_and_garbage_is_refused() {
        for e in entries() {
            let mut b = Vec::new();
            e.encode(&mut b);
            assert_eq!(Entry::decode(&b).unwrap(), (e.clone(), b.len()));
            for cut in 0..b.len() {
                assert!(Entry::decode(&b[..cut]).is_err(), "{e:?} cut at {cut}");
            }
        }
        assert!(Entry::decode(&[99, 0, 0]).is_err());
        let big = Entry::Write {
            vdi: 1,
            lba: 0,
            ptrs: vec![Ptr::block(5, [1; 24]); MAX_WRITE_PTRS],
            shared: false,
        };
        let mut b = Vec::new();
        big.encode(&mut b);
        assert!(b.len() <= LOG_BLOCK_ENTRIES);
    }

    fn space(dev: &MemDevice) -> Mutex<Space> {
        let geo = Geometry::for_size(dev.len()).unwrap();
        let sels = vec![Default::default(); geo.groups as usize];
        Mutex::new(Space {
            rc: RcTable::open(dev, geo, &sels, 0).unwrap(),
            orphans: Default::default(),
            meta_cursor: Cursor::default(),
            base_reserve: 64,
            index_entries: 0,
            dedup: Default::default(),
        })
    }

    #[test]
    fn flushed_entries_are_read_back_from_the_cut() {
        let dev = MemDevice::new(32 << 20);
        let sp = space(&dev);
        let log = Log::new(1000, true);
        let all = entries();
        log.append(&all[0]);
        assert!(
            !log.flush(&dev, &sp, log.end()).unwrap(),
            "no chain before a cut"
        );
        let pos = log.cut(&dev, &mut sp.lock(), 0xabc).unwrap();
        assert_eq!(pos.lsn, log.end());
        log.append(&all[1]);
        assert!(
            !log.flush(&dev, &sp, log.end()).unwrap(),
            "no log block before the checkpoint naming the chain is durable"
        );
        assert!(log.checkpointed(pos).is_empty());
        // Many entries, so that they span blocks.
        for i in 0..300 {
            for e in &all {
                let mut e = e.clone();
                if let Entry::Resize { size, .. } = &mut e {
                    *size = i;
                }
                log.append(&e);
            }
            if i % 100 == 0 {
                assert!(log.flush(&dev, &sp, log.end()).unwrap());
            }
        }
        assert!(log.flush(&dev, &sp, log.end()).unwrap());
        let found = read_chain(&dev, pos).unwrap();
        assert_eq!(found.entries.len(), 1 + 300 * all.len());
        assert_eq!(found.end, log.end());
        assert!(found.blocks.len() > 10);
        assert!(found.entries.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(found.entries[0].1, all[1]);
        let resize = all
            .iter()
            .position(|e| matches!(e, Entry::Resize { .. }))
            .unwrap();
        assert_eq!(
            found.entries[1 + all.len() + resize].1,
            Entry::Resize { id: 11, size: 1 }
        );
        // Another chain id reads nothing; a checkpoint releases blocks before its head.
        assert!(read_chain(&dev, LogPosition { chain: 7, ..pos })
            .unwrap()
            .entries
            .is_empty());
        let later = log.cut(&dev, &mut sp.lock(), 0).unwrap();
        assert_eq!(log.checkpointed(later).len(), found.blocks.len());
    }

    #[test]
    fn a_torn_block_ends_the_chain() {
        let dev = MemDevice::new(32 << 20);
        let sp = space(&dev);
        let log = Log::new(0, true);
        let pos = log.cut(&dev, &mut sp.lock(), 5).unwrap();
        log.checkpointed(pos);
        for e in entries() {
            log.append(&e);
            assert!(log.flush(&dev, &sp, log.end()).unwrap());
        }
        let found = read_chain(&dev, pos).unwrap();
        assert_eq!(found.entries.len(), entries().len());
        // Damage the third block: the chain ends before it.
        let third = found.blocks[2];
        let mut b = [0u8; BLOCK_SIZE];
        dev.read_at(&mut b, third * BLOCK_SIZE_U64).unwrap();
        b[FRAME_HEADER + 100] ^= 1;
        dev.write_at(&b, third * BLOCK_SIZE_U64).unwrap();
        let short = read_chain(&dev, pos).unwrap();
        assert_eq!(short.entries.len(), 2);
    }
}
