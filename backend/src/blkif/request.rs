//! Decoding and validating blkif requests: bytes copied out of the ring in, a checked
//! [`Request`] or a [`Reject`] (with the status to answer) out. Pure, so it can be fuzzed.
//!
//! Every request is answered: a [`Reject`] carries the guest's `id` and the operation byte to
//! echo, so the engine always has a response to send.

use super::abi::{
    BlkifRequest, BlkifRequestDiscard, BlkifRequestIndirect, BlkifRequestSegment, EntryBytes,
    GrantRef, BLKIF_DISCARD_SECURE, BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
    BLKIF_MAX_SEGMENTS_PER_REQUEST, BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_INDIRECT,
    BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR,
    MAX_INDIRECT_SEGMENTS_ABI, SECTOR, SECTORS_PER_PAGE, SEGMENTS_PER_INDIRECT_PAGE,
};

/// What the backend agreed to serve on this device: limits every request is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Disk size in bytes.
    pub disk_bytes: u64,
    /// Refuse writes and discards.
    pub read_only: bool,
    /// `feature-flush-cache`.
    pub flush: bool,
    /// `feature-barrier`.
    pub barrier: bool,
    /// `feature-discard`.
    pub discard: bool,
    /// `discard-secure`.
    pub discard_secure: bool,
    /// `feature-max-indirect-segments` (0: indirect requests are refused).
    pub max_indirect_segments: usize,
}

/// A data-carrying operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataOp {
    Read,
    Write,
    /// `FLUSH_DISKCACHE`: flush, then the (optional) data written durably.
    Flush,
    /// `WRITE_BARRIER`: earlier writes complete and durable, then the data written durably.
    Barrier,
}

impl DataOp {
    /// Whether the data moves from guest to disk.
    pub fn writes(self) -> bool {
        !matches!(self, DataOp::Read)
    }
}

/// A request that passed decoding; the segment checks ([`plan`]) come next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Read, write, flush or barrier with its segments inline (at most 11; flush and barrier
    /// may have none).
    Direct {
        id: u64,
        echo: u8,
        op: DataOp,
        sector: u64,
        segments: Vec<BlkifRequestSegment>,
    },
    /// Read or write whose segment list lives in guest pages `pages[..]`.
    Indirect {
        id: u64,
        echo: u8,
        op: DataOp,
        sector: u64,
        nr_segments: usize,
        pages: Vec<GrantRef>,
    },
    Discard {
        id: u64,
        echo: u8,
        sector: u64,
        nr_sectors: u64,
    },
}

impl Request {
    pub fn id(&self) -> u64 {
        match self {
            Request::Direct { id, .. }
            | Request::Indirect { id, .. }
            | Request::Discard { id, .. } => *id,
        }
    }

    /// The operation byte to put in the response.
    pub fn echo(&self) -> u8 {
        match self {
            Request::Direct { echo, .. }
            | Request::Indirect { echo, .. }
            | Request::Discard { echo, .. } => *echo,
        }
    }
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    #[error("operation {0} is not supported")]
    Unsupported(u8),
    #[error("{op} request with {n} segments")]
    SegmentCount { op: &'static str, n: usize },
    #[error("indirect request for operation {0} (only read and write)")]
    IndirectOp(u8),
    #[error("segment {index} has sectors {first}..={last} (page has 0..=7)")]
    BadSegment { index: usize, first: u8, last: u8 },
    #[error("sectors {sector}+{count} run past the disk ({disk_sectors} sectors)")]
    OutOfRange {
        sector: u64,
        count: u64,
        disk_sectors: u64,
    },
    #[error("write to a read-only device")]
    ReadOnly,
    #[error("secure discard is not supported")]
    SecureDiscard,
}

/// A refused request: the response to send and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub id: u64,
    pub echo: u8,
    pub status: i16,
    pub reason: Reason,
}

fn reject(id: u64, echo: u8, status: i16, reason: Reason) -> Reject {
    Reject {
        id,
        echo,
        status,
        reason,
    }
}

/// Decodes a ring entry (already copied out of shared memory).
pub fn decode(entry: &EntryBytes, limits: &Limits) -> Result<Request, Reject> {
    let base = BlkifRequest::decode(entry);
    let (id, op) = (base.id, base.operation);
    let not_supported = |r| Err(reject(id, op, BLKIF_RSP_EOPNOTSUPP, r));
    let data_op = match op {
        BLKIF_OP_READ => DataOp::Read,
        BLKIF_OP_WRITE => DataOp::Write,
        BLKIF_OP_FLUSH_DISKCACHE if limits.flush => DataOp::Flush,
        BLKIF_OP_WRITE_BARRIER if limits.barrier => DataOp::Barrier,
        BLKIF_OP_DISCARD if limits.discard => {
            let d = BlkifRequestDiscard::decode(entry);
            if d.flag & BLKIF_DISCARD_SECURE != 0 && !limits.discard_secure {
                return not_supported(Reason::SecureDiscard);
            }
            if limits.read_only {
                return Err(reject(id, op, BLKIF_RSP_ERROR, Reason::ReadOnly));
            }
            check_sectors(limits, d.sector_number, d.nr_sectors)
                .map_err(|r| reject(id, op, BLKIF_RSP_ERROR, r))?;
            return Ok(Request::Discard {
                id,
                echo: op,
                sector: d.sector_number,
                nr_sectors: d.nr_sectors,
            });
        }
        BLKIF_OP_INDIRECT if limits.max_indirect_segments > 0 => {
            let ind = BlkifRequestIndirect::decode(entry);
            // The response echoes the inner operation (what Linux blkfront expects).
            let echo = ind.indirect_op;
            let op = match ind.indirect_op {
                BLKIF_OP_READ => DataOp::Read,
                BLKIF_OP_WRITE => DataOp::Write,
                other => return Err(reject(id, echo, BLKIF_RSP_ERROR, Reason::IndirectOp(other))),
            };
            let n = ind.nr_segments as usize;
            if n == 0 || n > limits.max_indirect_segments.min(MAX_INDIRECT_SEGMENTS_ABI) {
                return Err(reject(
                    id,
                    echo,
                    BLKIF_RSP_ERROR,
                    Reason::SegmentCount { op: "indirect", n },
                ));
            }
            if op.writes() && limits.read_only {
                return Err(reject(id, echo, BLKIF_RSP_ERROR, Reason::ReadOnly));
            }
            let npages = n.div_ceil(SEGMENTS_PER_INDIRECT_PAGE);
            debug_assert!(npages <= BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST);
            return Ok(Request::Indirect {
                id,
                echo,
                op,
                sector: ind.sector_number,
                nr_segments: n,
                pages: ind.indirect_grefs[..npages].to_vec(),
            });
        }
        other => return not_supported(Reason::Unsupported(other)),
    };
    let n = base.nr_segments as usize;
    let min = if matches!(data_op, DataOp::Read | DataOp::Write) {
        1
    } else {
        0
    };
    if n < min || n > BLKIF_MAX_SEGMENTS_PER_REQUEST {
        let name = super::abi::op_name(op);
        return Err(reject(
            id,
            op,
            BLKIF_RSP_ERROR,
            Reason::SegmentCount { op: name, n },
        ));
    }
    if data_op.writes() && n > 0 && limits.read_only {
        return Err(reject(id, op, BLKIF_RSP_ERROR, Reason::ReadOnly));
    }
    Ok(Request::Direct {
        id,
        echo: op,
        op: data_op,
        sector: base.sector_number,
        segments: base.seg[..n].to_vec(),
    })
}

/// Checks `count` sectors at `sector` against the disk, without overflow.
fn check_sectors(limits: &Limits, sector: u64, count: u64) -> Result<(), Reason> {
    let disk_sectors = limits.disk_bytes / SECTOR;
    match sector.checked_add(count) {
        Some(end) if end <= disk_sectors => Ok(()),
        _ => Err(Reason::OutOfRange {
            sector,
            count,
            disk_sectors,
        }),
    }
}

/// Checks a data request's segments and range; returns the total sectors.
///
/// A request without segments (a flush or barrier carrying no data) touches no sector, so its
/// `sector_number` means nothing and is not checked: Linux blkfront sends an empty flush with
/// the block layer's "no position", `(sector_t)-1` (blkback skips the check the same way).
pub fn plan(limits: &Limits, sector: u64, segments: &[BlkifRequestSegment]) -> Result<u64, Reason> {
    if segments.is_empty() {
        return Ok(0);
    }
    let mut total = 0u64;
    for (index, s) in segments.iter().enumerate() {
        if s.first_sect > s.last_sect || s.last_sect >= SECTORS_PER_PAGE {
            return Err(Reason::BadSegment {
                index,
                first: s.first_sect,
                last: s.last_sect,
            });
        }
        total += u64::from(s.last_sect - s.first_sect) + 1;
    }
    check_sectors(limits, sector, total)?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blkif::abi::{BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR};

    fn limits() -> Limits {
        Limits {
            disk_bytes: 1 << 20,
            read_only: false,
            flush: true,
            barrier: true,
            discard: true,
            discard_secure: false,
            max_indirect_segments: 256,
        }
    }

    fn rw(op: u8, n: u8, sector: u64) -> EntryBytes {
        let mut r = BlkifRequest {
            operation: op,
            nr_segments: n,
            id: 7,
            sector_number: sector,
            ..Default::default()
        };
        for s in r.seg.iter_mut() {
            *s = BlkifRequestSegment {
                gref: 1,
                first_sect: 0,
                last_sect: 7,
            };
        }
        r.encode()
    }

    #[test]
    fn decodes_and_plans() {
        let l = limits();
        let req = decode(&rw(BLKIF_OP_WRITE, 2, 8), &l).unwrap();
        let Request::Direct {
            id: 7,
            op: DataOp::Write,
            sector: 8,
            segments,
            ..
        } = req
        else {
            panic!("{req:?}")
        };
        assert_eq!(plan(&l, 8, &segments), Ok(16));
        // The last 16 sectors fit; one more does not.
        assert_eq!(plan(&l, 2048 - 16, &segments), Ok(16));
        assert!(matches!(
            plan(&l, 2048 - 15, &segments),
            Err(Reason::OutOfRange { .. })
        ));
        assert!(matches!(
            plan(&l, u64::MAX, &segments),
            Err(Reason::OutOfRange { .. })
        ));
        let bad = [BlkifRequestSegment {
            gref: 0,
            first_sect: 3,
            last_sect: 2,
        }];
        assert!(matches!(plan(&l, 0, &bad), Err(Reason::BadSegment { .. })));
        let bad = [BlkifRequestSegment {
            gref: 0,
            first_sect: 0,
            last_sect: 8,
        }];
        assert!(matches!(plan(&l, 0, &bad), Err(Reason::BadSegment { .. })));
    }

    #[test]
    fn rejects() {
        let l = limits();
        let e = decode(&rw(BLKIF_OP_READ, 0, 0), &l).unwrap_err();
        assert_eq!((e.id, e.status), (7, BLKIF_RSP_ERROR));
        assert!(decode(&rw(BLKIF_OP_READ, 12, 0), &l).is_err());
        assert!(decode(&rw(BLKIF_OP_FLUSH_DISKCACHE, 0, 0), &l).is_ok());
        // An empty flush as Linux blkfront sends it: sector (sector_t)-1, no segments.
        let Ok(Request::Direct {
            op: DataOp::Flush,
            sector,
            segments,
            ..
        }) = decode(&rw(BLKIF_OP_FLUSH_DISKCACHE, 0, u64::MAX), &l)
        else {
            panic!("empty flush refused")
        };
        assert_eq!(plan(&l, sector, &segments), Ok(0));
        let e = decode(&rw(4, 1, 0), &l).unwrap_err();
        assert_eq!((e.status, e.echo), (BLKIF_RSP_EOPNOTSUPP, 4));
        let e = decode(&rw(200, 1, 0), &l).unwrap_err();
        assert_eq!(e.status, BLKIF_RSP_EOPNOTSUPP);
        let ro = Limits {
            read_only: true,
            ..l.clone()
        };
        assert_eq!(
            decode(&rw(BLKIF_OP_WRITE, 1, 0), &ro).unwrap_err().reason,
            Reason::ReadOnly
        );
        assert!(decode(&rw(BLKIF_OP_READ, 1, 0), &ro).is_ok());
        let nf = Limits {
            flush: false,
            barrier: false,
            ..l.clone()
        };
        assert_eq!(
            decode(&rw(BLKIF_OP_FLUSH_DISKCACHE, 0, 0), &nf)
                .unwrap_err()
                .status,
            BLKIF_RSP_EOPNOTSUPP
        );
        assert_eq!(
            decode(&rw(BLKIF_OP_WRITE_BARRIER, 0, 0), &nf)
                .unwrap_err()
                .status,
            BLKIF_RSP_EOPNOTSUPP
        );

        let d = |flag, sector, n| {
            BlkifRequestDiscard {
                operation: BLKIF_OP_DISCARD,
                flag,
                handle: 0,
                id: 3,
                sector_number: sector,
                nr_sectors: n,
            }
            .encode()
        };
        assert_eq!(
            decode(&d(0, 0, 2048), &l).unwrap(),
            Request::Discard {
                id: 3,
                echo: BLKIF_OP_DISCARD,
                sector: 0,
                nr_sectors: 2048
            }
        );
        assert_eq!(
            decode(&d(0, 1, 2048), &l).unwrap_err().status,
            BLKIF_RSP_ERROR
        );
        assert_eq!(
            decode(&d(0, u64::MAX, 2), &l).unwrap_err().status,
            BLKIF_RSP_ERROR
        );
        assert_eq!(
            decode(&d(BLKIF_DISCARD_SECURE, 0, 8), &l)
                .unwrap_err()
                .status,
            BLKIF_RSP_EOPNOTSUPP
        );
        assert_eq!(
            decode(&d(0, 0, 8), &ro).unwrap_err().status,
            BLKIF_RSP_ERROR
        );
    }

    #[test]
    fn indirect() {
        let l = limits();
        let ind = |op, n| {
            BlkifRequestIndirect {
                operation: BLKIF_OP_INDIRECT,
                indirect_op: op,
                nr_segments: n,
                id: 11,
                sector_number: 0,
                handle: 0,
                indirect_grefs: [1, 2, 3, 4, 5, 6, 7, 8],
            }
            .encode()
        };
        let r = decode(&ind(BLKIF_OP_READ, 256), &l).unwrap();
        assert_eq!(
            r,
            Request::Indirect {
                id: 11,
                echo: BLKIF_OP_READ,
                op: DataOp::Read,
                sector: 0,
                nr_segments: 256,
                pages: vec![1]
            }
        );
        assert!(decode(&ind(BLKIF_OP_READ, 257), &l).is_err());
        assert!(decode(&ind(BLKIF_OP_READ, 0), &l).is_err());
        let e = decode(&ind(BLKIF_OP_FLUSH_DISKCACHE, 4), &l).unwrap_err();
        assert_eq!(
            (e.echo, e.status),
            (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_RSP_ERROR)
        );
        let big = Limits {
            max_indirect_segments: 4096,
            ..l.clone()
        };
        let Request::Indirect { pages, .. } = decode(&ind(BLKIF_OP_WRITE, 513), &big).unwrap()
        else {
            panic!()
        };
        assert_eq!(pages, vec![1, 2]);
        let none = Limits {
            max_indirect_segments: 0,
            ..l
        };
        assert_eq!(
            decode(&ind(BLKIF_OP_READ, 4), &none).unwrap_err().status,
            BLKIF_RSP_EOPNOTSUPP
        );
    }

    proptest::proptest! {
        /// Any 112 bytes decode to a request or a rejection, never a panic; planned ranges
        /// always lie inside the disk (a plan of no sectors touches none, wherever it says).
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 112), ro in proptest::prelude::any::<bool>()) {
            let mut e = [0u8; 112];
            e.copy_from_slice(&bytes);
            let l = Limits { read_only: ro, ..limits() };
            if let Ok(Request::Direct { sector, segments, .. }) = decode(&e, &l) {
                if let Ok(n) = plan(&l, sector, &segments) {
                    proptest::prop_assert!(n == 0 || (sector + n) * SECTOR <= l.disk_bytes);
                }
            }
        }
    }
}
