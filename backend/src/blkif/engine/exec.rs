//! Running one request against the disk: decode and validate it, map the guest's pages, read
//! into them or copy out of them and write. Never fails: errors become a response status.

use super::{
    queue::Queue,
    split::{read_into_guest, run_parts, split_lengths, worth_splitting},
};
use crate::{
    blkif::{
        abi::{
            BlkifRequestSegment, BlkifResponse, EntryBytes, GrantRef, BLKIF_RSP_EOPNOTSUPP,
            BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, PAGE_SIZE, SECTOR, SEGMENTS_PER_INDIRECT_PAGE,
        },
        mem::{coalesce, copy_from_guest, GuestRange},
        request::{self, DataOp, Request},
        transport::{Transport, TransportError},
    },
    disk::DiskError,
};

/// How a request failed: the status to answer, and what to log.
struct Failure {
    status: i16,
    why: String,
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

impl<T: Transport> Queue<T> {
    /// Runs one request and builds its response. Never fails: errors become a status.
    pub(super) fn execute(&mut self, entry: &EntryBytes) -> BlkifResponse {
        let req = match request::decode(entry, &self.limits) {
            Ok(r) => r,
            Err(rej) => {
                self.warn(rej.id, rej.echo, &rej.reason.to_string());
                return BlkifResponse {
                    id: rej.id,
                    operation: rej.echo,
                    status: rej.status,
                };
            }
        };
        let (id, echo) = (req.id(), req.echo());
        let result = match req {
            Request::Discard {
                sector, nr_sectors, ..
            } => self
                .disk
                .discard(sector * SECTOR, nr_sectors * SECTOR)
                .map_err(Failure::from),
            Request::Direct {
                op,
                sector,
                segments,
                ..
            } => self.data(op, sector, &segments),
            Request::Indirect {
                op,
                sector,
                nr_segments,
                pages,
                ..
            } => match self.fetch_indirect(&pages, nr_segments) {
                Ok(segs) => {
                    let r = self.data(op, sector, &segs);
                    self.segments = segs;
                    r
                }
                Err(f) => Err(f),
            },
        };
        let status = match result {
            Ok(()) => BLKIF_RSP_OKAY,
            Err(f) => {
                self.warn(id, echo, &f.why);
                f.status
            }
        };
        BlkifResponse {
            id,
            operation: echo,
            status,
        }
    }

    /// Copies an indirect request's segment list out of its (read-only mapped) pages.
    fn fetch_indirect(
        &mut self,
        pages: &[GrantRef],
        n: usize,
    ) -> Result<Vec<BlkifRequestSegment>, Failure> {
        let map = self.transport.map(pages, false)?;
        let mut segs = std::mem::take(&mut self.segments);
        segs.clear();
        let mut buf = [0u8; PAGE_SIZE];
        for p in 0..pages.len() {
            let here = (n - p * SEGMENTS_PER_INDIRECT_PAGE).min(SEGMENTS_PER_INDIRECT_PAGE);
            let bytes = &mut buf[..here * BlkifRequestSegment::SIZE];
            copy_from_guest(&map, p, 0, bytes);
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
        &mut self,
        op: DataOp,
        sector: u64,
        segs: &[BlkifRequestSegment],
    ) -> Result<(), Failure> {
        let total = request::plan(&self.limits, sector, segs)?;
        if matches!(op, DataOp::Flush | DataOp::Barrier) {
            // Everything acknowledged before this request becomes durable first.
            self.disk.flush()?;
        }
        if segs.is_empty() {
            return Ok(());
        }
        self.grefs.clear();
        self.grefs.extend(segs.iter().map(|s| s.gref));
        self.ranges.clear();
        self.ranges
            .extend(segs.iter().enumerate().map(|(i, s)| GuestRange {
                page: i,
                offset: usize::from(s.first_sect) * SECTOR as usize,
                len: usize::from(s.last_sect - s.first_sect + 1) * SECTOR as usize,
            }));
        let offset = sector * SECTOR;
        if op == DataOp::Read {
            let pages = self.transport.map(&self.grefs, true)?;
            coalesce(&pages, &self.ranges, &mut self.runs);
            read_into_guest(&*self.disk, &pages, &self.runs, offset, self.parts)?;
            return Ok(());
        }
        // WRITE data is copied out of guest memory before the store sees it: the store hashes
        // each block, and a guest changing the page between hashing and writing would leave a
        // block that fails its checksum. What we copied is what the guest wrote.
        let pages = self.transport.map(&self.grefs, false)?;
        let len = (total * SECTOR) as usize;
        self.bounce.resize(len, 0);
        let mut pos = 0;
        for r in &self.ranges {
            copy_from_guest(&pages, r.page, r.offset, &mut self.bounce[pos..pos + r.len]);
            pos += r.len;
        }
        drop(pages);
        let fua = matches!(op, DataOp::Flush | DataOp::Barrier);
        if !worth_splitting(len, self.parts) {
            self.disk.write_at(&self.bounce[..len], offset, fua)?;
            return Ok(());
        }
        let mut pieces = Vec::new();
        let mut rest = &self.bounce[..len];
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
}
