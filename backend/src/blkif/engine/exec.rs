//! Running one request against the disk: decode and validate it, map the guest's pages, read
//! into them or copy out of them and write. Never fails: errors become a response status.
//!
//! A request can be tried without waiting for a device ([`Executor::execute`] with `nowait`):
//! then a read the page cache cannot answer, and a flush, are left for the queue's I/O threads
//! (`Executed::WouldBlock`) rather than holding up the requests behind them.

use std::sync::Arc;

use parking_lot::Mutex;

use super::{
    grants::{KeptGrants, KeptPages},
    split::{read_into_guest, run_parts, split_lengths, worth_splitting},
    Shared,
};
use crate::{
    blkif::{
        abi::{
            BlkifRequestSegment, BlkifResponse, EntryBytes, GrantRef, BLKIF_RSP_EOPNOTSUPP,
            BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, PAGE_SIZE, SECTOR, SEGMENTS_PER_INDIRECT_PAGE,
        },
        mem::{
            coalesce, copy_from_guest, copy_to_guest, with_guest_slice_mut, GuestPages, GuestRange,
        },
        request::{self, DataOp, Limits, Request},
        transport::{Transport, TransportError},
    },
    disk::{Disk, DiskError},
};

/// What a queue needs to run requests; shared by its thread and its I/O threads.
pub(super) struct Executor<T: Transport> {
    pub(super) transport: Arc<T>,
    pub(super) disk: Arc<dyn Disk>,
    pub(super) limits: Limits,
    /// Threads a large request is split between.
    pub(super) parts: usize,
    /// With persistent grants negotiated: the grants kept mapped.
    pub(super) kept: Option<KeptGrants<T>>,
    /// The device's counters.
    pub(super) shared: Arc<Shared>,
}

/// A request's guest pages: mapped for this request alone, or kept (persistent grants).
enum Mapped<T: Transport> {
    Once(T::Pages),
    Kept(KeptPages<T>),
}

impl<T: Transport> Mapped<T> {
    fn pages(&self) -> &dyn GuestPages {
        match self {
            Mapped::Once(p) => p,
            Mapped::Kept(p) => p,
        }
    }
}

/// Buffers one thread reuses from request to request.
#[derive(Default)]
pub(super) struct Scratch {
    segments: Vec<BlkifRequestSegment>,
    grefs: Vec<GrantRef>,
    ranges: Vec<GuestRange>,
    runs: Vec<GuestRange>,
    bounce: Vec<u8>,
}

/// The result of running a request.
pub(super) enum Executed {
    /// Its response, and what to log if it failed.
    Done(BlkifResponse, Option<(u8, String)>),
    /// Tried without waiting and it would have to wait: nothing was done, run it again.
    WouldBlock,
}

/// How a request failed: the status to answer, and what to log.
struct Failure {
    status: i16,
    why: String,
}

/// Why a request did not complete.
enum Stop {
    Failed(Failure),
    /// Tried without waiting, and it would have waited.
    WouldBlock,
}

impl<F: Into<Failure>> From<F> for Stop {
    fn from(f: F) -> Stop {
        Stop::Failed(f.into())
    }
}

impl Failure {
    fn error(why: impl ToString) -> Failure {
        Failure {
            status: BLKIF_RSP_ERROR,
            why: why.to_string(),
        }
    }
}

impl From<DiskError> for Failure {
    fn from(e: DiskError) -> Failure {
        let status = if e == DiskError::NotSupported {
            BLKIF_RSP_EOPNOTSUPP
        } else {
            BLKIF_RSP_ERROR
        };
        Failure {
            status,
            why: format!("disk: {e}"),
        }
    }
}

impl From<TransportError> for Failure {
    fn from(e: TransportError) -> Failure {
        Failure::error(e)
    }
}

impl From<request::Reason> for Failure {
    fn from(e: request::Reason) -> Failure {
        Failure::error(e)
    }
}

impl<T: Transport> Executor<T> {
    /// Maps `refs` for one request (`writable` for a READ into them), or finds them kept.
    fn map(&self, refs: &[GrantRef], writable: bool) -> Result<Mapped<T>, TransportError> {
        let (mapped, new) = match &self.kept {
            Some(kept) => {
                let (pages, new) = kept.map(&*self.transport, refs, writable)?;
                (Mapped::Kept(pages), new)
            }
            None => (
                Mapped::Once(self.transport.map(refs, writable)?),
                refs.len(),
            ),
        };
        self.shared
            .stats
            .grant_maps
            .fetch_add(new as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(mapped)
    }

    /// Runs one request and builds its response; errors become a status. With `nowait`, a
    /// request that would wait for a device is not run ([`Executed::WouldBlock`]).
    pub(super) fn execute(&self, sc: &mut Scratch, entry: &EntryBytes, nowait: bool) -> Executed {
        let req = match request::decode(entry, &self.limits) {
            Ok(r) => r,
            Err(rej) => {
                let rsp = BlkifResponse {
                    id: rej.id,
                    operation: rej.echo,
                    status: rej.status,
                };
                return Executed::Done(rsp, Some((rej.echo, rej.reason.to_string())));
            }
        };
        let (id, echo) = (req.id(), req.echo());
        let segments = match &req {
            Request::Direct { segments, .. } => segments.len(),
            Request::Indirect { nr_segments, .. } => *nr_segments,
            Request::Discard { .. } => 0,
        };
        let result = match req {
            Request::Discard {
                sector, nr_sectors, ..
            } => self
                .disk
                .discard(sector * SECTOR, nr_sectors * SECTOR)
                .map_err(Stop::from),
            Request::Direct {
                op,
                sector,
                segments,
                ..
            } => self.data(sc, op, sector, &segments, nowait),
            Request::Indirect {
                op,
                sector,
                nr_segments,
                pages,
                ..
            } => match self.fetch_indirect(sc, &pages, nr_segments) {
                Ok(segs) => {
                    let r = self.data(sc, op, sector, &segs, nowait);
                    sc.segments = segs;
                    r
                }
                Err(f) => Err(f.into()),
            },
        };
        let (status, failure) = match result {
            Ok(()) => (BLKIF_RSP_OKAY, None),
            Err(Stop::WouldBlock) => return Executed::WouldBlock,
            Err(Stop::Failed(f)) => (f.status, Some((echo, f.why))),
        };
        self.shared
            .stats
            .segments
            .fetch_add(segments as u64, std::sync::atomic::Ordering::Relaxed);
        let rsp = BlkifResponse {
            id,
            operation: echo,
            status,
        };
        Executed::Done(rsp, failure)
    }

    /// Copies an indirect request's segment list out of its (read-only mapped) pages.
    fn fetch_indirect(
        &self,
        sc: &mut Scratch,
        pages: &[GrantRef],
        n: usize,
    ) -> Result<Vec<BlkifRequestSegment>, Failure> {
        let map = self.map(pages, false)?;
        let mut segs = std::mem::take(&mut sc.segments);
        segs.clear();
        let mut buf = [0u8; PAGE_SIZE];
        for p in 0..pages.len() {
            let here = (n - p * SEGMENTS_PER_INDIRECT_PAGE).min(SEGMENTS_PER_INDIRECT_PAGE);
            let bytes = &mut buf[..here * BlkifRequestSegment::SIZE];
            copy_from_guest(map.pages(), p, 0, bytes);
            for chunk in bytes.chunks_exact(BlkifRequestSegment::SIZE) {
                let mut s = [0u8; 8];
                s.copy_from_slice(chunk);
                segs.push(BlkifRequestSegment::decode(&s));
            }
        }
        Ok(segs)
    }

    /// Read, write, flush or barrier over `segs` starting at `sector`.
    fn data(
        &self,
        sc: &mut Scratch,
        op: DataOp,
        sector: u64,
        segs: &[BlkifRequestSegment],
        nowait: bool,
    ) -> Result<(), Stop> {
        let total = request::plan(&self.limits, sector, segs)?;
        let durable = matches!(op, DataOp::Flush | DataOp::Barrier);
        if nowait && durable {
            return Err(Stop::WouldBlock);
        }
        if durable {
            // Everything acknowledged before this request becomes durable first.
            self.disk.flush()?;
        }
        if segs.is_empty() {
            return Ok(());
        }
        sc.grefs.clear();
        sc.grefs.extend(segs.iter().map(|s| s.gref));
        sc.ranges.clear();
        sc.ranges
            .extend(segs.iter().enumerate().map(|(i, s)| GuestRange {
                page: i,
                offset: usize::from(s.first_sect) * SECTOR as usize,
                len: usize::from(s.last_sect - s.first_sect + 1) * SECTOR as usize,
            }));
        let offset = sector * SECTOR;
        if op == DataOp::Read {
            let mapped = self.map(&sc.grefs, true)?;
            let pages = mapped.pages();
            coalesce(pages, &sc.ranges, &mut sc.runs);
            let len = (total * SECTOR) as usize;
            if sc.runs.len() > 1 && matches!(mapped, Mapped::Kept(_)) {
                // Kept pages are separate mappings: one disk read, then a copy per page.
                return self.read_bounced(sc, pages, offset, len, nowait);
            }
            if nowait && !worth_splitting(len, self.parts) {
                // From the page cache or not at all (a run read before a miss is read again).
                let mut at = offset;
                for &run in &sc.runs {
                    let read =
                        with_guest_slice_mut(pages, run, |buf| self.disk.read_nowait(buf, at));
                    read.ok_or(Stop::WouldBlock)??;
                    at += run.len as u64;
                }
                return Ok(());
            }
            read_into_guest(&*self.disk, pages, &sc.runs, offset, self.parts)?;
            return Ok(());
        }
        // WRITE data is copied out of guest memory before the store sees it: the store hashes
        // each block, and a guest changing the page between hashing and writing would leave a
        // block that fails its checksum. What we copied is what the guest wrote.
        let mapped = self.map(&sc.grefs, false)?;
        let len = (total * SECTOR) as usize;
        sc.bounce.resize(len, 0);
        let mut pos = 0;
        for r in &sc.ranges {
            copy_from_guest(
                mapped.pages(),
                r.page,
                r.offset,
                &mut sc.bounce[pos..pos + r.len],
            );
            pos += r.len;
        }
        drop(mapped);
        let fua = durable;
        if !worth_splitting(len, self.parts) {
            self.disk.write_at(&sc.bounce[..len], offset, fua)?;
            return Ok(());
        }
        let mut pieces = Vec::new();
        let mut rest = &sc.bounce[..len];
        let mut at = offset;
        for n in split_lengths(offset, len, self.parts) {
            let (piece, tail) = rest.split_at(n);
            pieces.push((piece, at));
            rest = tail;
            at += n as u64;
        }
        let disk = &*self.disk;
        run_parts(&pieces, |&(data, at)| disk.write_at(data, at, fua))?;
        Ok(())
    }

    /// A READ of `len` bytes at `offset` into `sc.ranges` of `pages` through `sc.bounce`.
    fn read_bounced(
        &self,
        sc: &mut Scratch,
        pages: &dyn GuestPages,
        offset: u64,
        len: usize,
        nowait: bool,
    ) -> Result<(), Stop> {
        sc.bounce.resize(len, 0);
        let buf = &mut sc.bounce[..len];
        if nowait && !worth_splitting(len, self.parts) {
            self.disk
                .read_nowait(buf, offset)
                .ok_or(Stop::WouldBlock)??;
        } else if !worth_splitting(len, self.parts) {
            self.disk.read_at(buf, offset)?;
        } else {
            let mut pieces = Vec::new();
            let mut rest = buf;
            let mut at = offset;
            for n in split_lengths(offset, len, self.parts) {
                let (piece, tail) = rest.split_at_mut(n);
                pieces.push((Mutex::new(piece), at));
                rest = tail;
                at += n as u64;
            }
            let disk = &*self.disk;
            run_parts(&pieces, |(piece, at)| disk.read_at(&mut piece.lock(), *at))?;
        }
        let mut pos = 0;
        for r in &sc.ranges {
            copy_to_guest(pages, r.page, r.offset, &sc.bounce[pos..pos + r.len]);
            pos += r.len;
        }
        Ok(())
    }
}
