//! `verify`: random reads, writes, flushes, barriers and discards across every queue, with
//! every byte read checked against a model of the disk.
//!
//! The model covers the first `span` bytes. A sector is *unknown* until first read or written
//! (a VDI may hold data already); after that every read of it must match. Requests in flight
//! at the same time never overlap, so completion order does not matter. Discards follow the
//! [`parallax::disk::Disk`] contract: whole 4 KiB blocks inside the range read back as zeros,
//! partial blocks keep their data. A few requests reach past the end of the disk and must
//! fail.

use std::{collections::HashMap, os::fd::BorrowedFd, time::Duration};

use parallax::blkif::{
    abi::{BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, SECTOR},
    event::poll_readable,
};
use rand::{rngs::SmallRng, Rng, RngCore, SeedableRng};

use crate::{Completion, FrontError, Frontend, IoKind, IoRequest};

/// What to run.
#[derive(Debug, Clone)]
pub struct VerifyConfig {
    pub ops: u64,
    pub seed: u64,
    /// Bytes of the disk to exercise (default: all of it, at most 64 MiB).
    pub span: Option<u64>,
}

impl Default for VerifyConfig {
    fn default() -> Self {
        VerifyConfig {
            ops: 2000,
            seed: 1,
            span: None,
        }
    }
}

/// What ran.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    pub ops: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub barriers: u64,
    pub discards: u64,
    pub indirect: u64,
    pub expected_errors: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Requests per queue (beyond the ring size means the ring wrapped).
    pub per_queue: Vec<u64>,
}

/// A failed verification.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("data mismatch at sector {sector} (read of {len} bytes at sector {start})")]
    Mismatch { sector: u64, start: u64, len: u64 },
    #[error("{op} at sector {sector}: status {status}, expected {expected}")]
    Status {
        op: &'static str,
        sector: u64,
        status: i16,
        expected: i16,
    },
    #[error("the backend answered nothing for 60 s")]
    Stalled,
    #[error("cannot verify a read-only device")]
    ReadOnly,
    #[error("{0}")]
    Front(#[from] FrontError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone)]
enum Op {
    Read {
        start: u64,
        sectors: u64,
    },
    Write {
        start: u64,
        data: Vec<u8>,
        kind: IoKind,
    },
    Flush,
    Discard {
        start: u64,
        sectors: u64,
    },
    /// A read past the end of the disk: must fail.
    BadRead {
        start: u64,
        sectors: u64,
    },
}

impl Op {
    fn range(&self) -> Option<(u64, u64)> {
        match self {
            Op::Read { start, sectors } | Op::Discard { start, sectors } => {
                Some((*start, start + sectors))
            }
            Op::Write { start, data, .. } => Some((*start, start + data.len() as u64 / SECTOR)),
            Op::Flush | Op::BadRead { .. } => None,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Op::Read { .. } => "read",
            Op::Write {
                kind: IoKind::Flush,
                ..
            } => "flush+write",
            Op::Write {
                kind: IoKind::Barrier,
                ..
            } => "barrier+write",
            Op::Write { .. } => "write",
            Op::Flush => "flush",
            Op::Discard { .. } => "discard",
            Op::BadRead { .. } => "read past the end",
        }
    }
}

struct Model {
    data: Vec<u8>,
    known: Vec<bool>,
}

impl Model {
    fn write(&mut self, start: u64, bytes: &[u8]) {
        let s = start as usize;
        self.data[s * 512..s * 512 + bytes.len()].copy_from_slice(bytes);
        self.known[s..s + bytes.len() / 512].fill(true);
    }

    fn discard(&mut self, start: u64, sectors: u64) {
        // Whole 4 KiB blocks (8 sectors) inside the range become zeros.
        let first = start.div_ceil(8) * 8;
        let end = (start + sectors) / 8 * 8;
        if end > first {
            let (f, e) = (first as usize, end as usize);
            self.data[f * 512..e * 512].fill(0);
            self.known[f..e].fill(true);
        }
    }

    fn check_read(&mut self, start: u64, got: &[u8]) -> Result<(), VerifyError> {
        for (i, sector) in got.chunks(512).enumerate() {
            let s = start as usize + i;
            let model = &mut self.data[s * 512..(s + 1) * 512];
            if self.known[s] {
                if model != sector {
                    return Err(VerifyError::Mismatch {
                        sector: s as u64,
                        start,
                        len: got.len() as u64,
                    });
                }
            } else {
                model.copy_from_slice(sector);
                self.known[s] = true;
            }
        }
        Ok(())
    }
}

/// Runs `cfg.ops` random requests over all of `front`'s queues and checks every result.
pub fn run(front: &mut Frontend, cfg: &VerifyConfig) -> Result<VerifyReport, VerifyError> {
    if front.read_only() {
        return Err(VerifyError::ReadOnly);
    }
    let disk_sectors = front.size() / SECTOR;
    let span = cfg.span.unwrap_or(64 << 20).min(front.size()) / SECTOR;
    let mut model = Model {
        data: vec![0; (span * SECTOR) as usize],
        known: vec![false; span as usize],
    };
    let mut rng = SmallRng::seed_from_u64(cfg.seed);
    let discard = front.features().discard;
    let barrier = front.features().barrier;
    let flush = front.features().flush;
    let nq = front.queues().len();
    let max_bytes = front.queues()[0].max_request_bytes();
    let indirect_ok = front.queues()[0].max_request_bytes() > 11 * 4096;
    let mut report = VerifyReport {
        per_queue: vec![0; nq],
        ..Default::default()
    };
    let mut in_flight: HashMap<(usize, u64), Op> = HashMap::new();
    let (mut issued, mut completed) = (0u64, 0u64);
    let mut done = Vec::new();
    if span == 0 {
        return Ok(report);
    }

    while completed < cfg.ops {
        // Fill every queue with non-overlapping requests.
        for q in 0..nq {
            let mut tries = 0;
            while issued < cfg.ops && front.queues()[q].can_submit() && tries < 8 {
                let (op, first_sect, force_indirect) = gen_op(
                    &mut rng,
                    span,
                    disk_sectors,
                    max_bytes,
                    indirect_ok,
                    discard,
                    flush,
                    barrier,
                );
                if let Some((s, e)) = op.range() {
                    let clash = in_flight
                        .values()
                        .any(|o| o.range().is_some_and(|(a, b)| a < e && s < b));
                    if clash {
                        tries += 1;
                        continue;
                    }
                }
                let req = match &op {
                    Op::Read { start, sectors } | Op::BadRead { start, sectors } => IoRequest {
                        first_sect,
                        force_indirect,
                        ..IoRequest::read(*start, sectors * SECTOR)
                    },
                    Op::Write { start, data, kind } => IoRequest {
                        kind: *kind,
                        first_sect,
                        force_indirect,
                        ..IoRequest::write(*start, data)
                    },
                    Op::Flush => IoRequest::flush(),
                    Op::Discard { start, sectors } => IoRequest::discard(*start, *sectors),
                };
                let id = front.queue(q).submit(&req)?;
                if force_indirect || req.len > 11 * 4096 {
                    report.indirect += 1;
                }
                in_flight.insert((q, id), op);
                report.per_queue[q] += 1;
                issued += 1;
            }
            front.queue(q).push()?;
        }
        // Wait for at least one completion on any queue.
        let mut ready = false;
        for q in front.queues() {
            if q.in_flight() > 0 && q.prepare_wait() {
                ready = true;
            }
        }
        if !ready {
            let fds: Vec<BorrowedFd<'_>> = front
                .queues()
                .iter()
                .flat_map(|q| [q.event_fd(), q.gone_fd()])
                .collect();
            let r = poll_readable(&fds, Some(Duration::from_secs(60)))?;
            if r.iter().all(|x| !x) {
                return Err(VerifyError::Stalled);
            }
            for (i, q) in front.queues().iter().enumerate() {
                if r[2 * i + 1] && !q.prepare_wait() {
                    return Err(FrontError::BackendGone.into());
                }
            }
        }
        for q in 0..nq {
            // Draining the notify eventfd is harmless; responses are what we go by.
            let _ = poll_readable(&[front.queues()[q].event_fd()], Some(Duration::ZERO));
            done.clear();
            front.queue(q).poll(&mut done)?;
            for c in done.drain(..) {
                let op = in_flight
                    .remove(&(q, c.id))
                    .expect("front queue validated the id");
                check(&mut model, &mut report, op, c)?;
                completed += 1;
            }
        }
    }
    report.ops = completed;
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
fn gen_op(
    rng: &mut SmallRng,
    span: u64,
    disk_sectors: u64,
    max_bytes: u64,
    indirect_ok: bool,
    discard: bool,
    flush: bool,
    barrier: bool,
) -> (Op, u8, bool) {
    let first_sect: u8 = if rng.random_bool(0.3) {
        rng.random_range(0..8)
    } else {
        0
    };
    let room = (max_bytes / SECTOR)
        .saturating_sub(u64::from(first_sect))
        .max(1);
    let max_sectors = room.min(span);
    let sectors = match rng.random_range(0..100) {
        0..50 => rng.random_range(1..=8u64.min(max_sectors)),
        50..85 => rng.random_range(1..=88u64.min(max_sectors)),
        _ => rng.random_range(1..=max_sectors),
    };
    let start = rng.random_range(0..=span - sectors);
    let force_indirect = indirect_ok && rng.random_bool(0.1);
    let op = match rng.random_range(0..100) {
        0..40 => Op::Read { start, sectors },
        40..80 => Op::Write {
            start,
            data: random_bytes(rng, sectors),
            kind: IoKind::Write,
        },
        80..84 if flush => Op::Flush,
        84..87 if flush => Op::Write {
            start,
            data: random_bytes(rng, sectors),
            kind: IoKind::Flush,
        },
        87..90 if barrier => Op::Write {
            start,
            data: random_bytes(rng, sectors),
            kind: IoKind::Barrier,
        },
        90..98 if discard => Op::Discard {
            start,
            sectors: rng.random_range(1..=64u64.min(span - start)),
        },
        98..100 => {
            let n = sectors.min(8);
            Op::BadRead {
                start: disk_sectors - n + rng.random_range(1..=n),
                sectors: n,
            }
        }
        _ => Op::Read { start, sectors },
    };
    // Flush and barrier writes go inline (the protocol has no indirect flush).
    let force_indirect = force_indirect
        && matches!(
            op,
            Op::Read { .. }
                | Op::Write {
                    kind: IoKind::Write,
                    ..
                }
        );
    (clip_inline(op, first_sect), first_sect, force_indirect)
}

/// Flush and barrier writes must fit 11 inline segments.
fn clip_inline(op: Op, first_sect: u8) -> Op {
    match op {
        Op::Write {
            start,
            mut data,
            kind: kind @ (IoKind::Flush | IoKind::Barrier),
        } => {
            let max = (11 * 4096 - usize::from(first_sect) * 512).min(data.len());
            data.truncate(max);
            Op::Write { start, data, kind }
        }
        other => other,
    }
}

fn random_bytes(rng: &mut SmallRng, sectors: u64) -> Vec<u8> {
    let mut v = vec![0u8; (sectors * SECTOR) as usize];
    rng.fill_bytes(&mut v);
    v
}

fn check(
    model: &mut Model,
    report: &mut VerifyReport,
    op: Op,
    c: Completion,
) -> Result<(), VerifyError> {
    let expected = if matches!(op, Op::BadRead { .. }) {
        BLKIF_RSP_ERROR
    } else {
        BLKIF_RSP_OKAY
    };
    if c.status != expected {
        let sector = op.range().map_or(0, |r| r.0);
        return Err(VerifyError::Status {
            op: op.name(),
            sector,
            status: c.status,
            expected,
        });
    }
    match op {
        Op::Read { start, sectors } => {
            let data = c.data.expect("successful reads carry data");
            debug_assert_eq!(data.len() as u64, sectors * SECTOR);
            model.check_read(start, &data)?;
            report.reads += 1;
            report.bytes_read += data.len() as u64;
        }
        Op::Write { start, data, kind } => {
            model.write(start, &data);
            report.bytes_written += data.len() as u64;
            match kind {
                IoKind::Flush => report.flushes += 1,
                IoKind::Barrier => report.barriers += 1,
                _ => report.writes += 1,
            }
        }
        Op::Flush => report.flushes += 1,
        Op::Discard { start, sectors } => {
            model.discard(start, sectors);
            report.discards += 1;
        }
        Op::BadRead { .. } => report.expected_errors += 1,
    }
    Ok(())
}
