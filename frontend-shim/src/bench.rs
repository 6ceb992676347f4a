//! `bench`: fio-style load through the ring. Each queue runs on its own thread and keeps
//! `depth` requests in flight; latency is measured from submission to completion.

use std::time::{Duration, Instant};

use parallax::blkif::abi::SECTOR;
use rand::{rngs::SmallRng, Rng, SeedableRng};
use serde::Serialize;

use crate::{FrontError, FrontQueue, Frontend, IoKind, IoRequest};

/// The access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    RandRead,
    RandWrite,
    Read,
    Write,
}

impl std::str::FromStr for Pattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "randread" => Ok(Pattern::RandRead),
            "randwrite" => Ok(Pattern::RandWrite),
            "read" => Ok(Pattern::Read),
            "write" => Ok(Pattern::Write),
            _ => Err(format!(
                "unknown pattern {s:?} (randread, randwrite, read, write)"
            )),
        }
    }
}

impl Pattern {
    fn writes(self) -> bool {
        matches!(self, Pattern::RandWrite | Pattern::Write)
    }

    fn random(self) -> bool {
        matches!(self, Pattern::RandRead | Pattern::RandWrite)
    }
}

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub pattern: Pattern,
    /// Bytes per request (a multiple of 512).
    pub block_size: u64,
    /// Requests in flight per queue.
    pub depth: usize,
    pub duration: Duration,
    /// Bytes of the disk to use (default: all).
    pub span: Option<u64>,
    pub seed: u64,
}

/// Results, per run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub rw: Pattern,
    pub block_size: u64,
    pub queues: usize,
    pub depth: usize,
    pub seconds: f64,
    pub ops: u64,
    pub errors: u64,
    pub iops: f64,
    pub mb_per_s: f64,
    pub lat_p50_us: f64,
    pub lat_p99_us: f64,
    pub lat_p999_us: f64,
    pub lat_max_us: f64,
    /// The backend went away before the run ended.
    pub interrupted: bool,
}

impl BenchReport {
    /// A two-line table.
    pub fn table(&self) -> String {
        format!(
            "{:<10} {:>6} {:>6} {:>5} {:>8} {:>10} {:>11} {:>9} {:>9} {:>9} {:>9}\n{:<10} {:>6} {:>6} {:>5} {:>8.1} {:>10.0} {:>11.1} {:>9.1} {:>9.1} {:>9.1} {:>9}",
            "rw", "bs", "queues", "depth", "seconds", "IOPS", "MB/s", "p50 us", "p99 us", "p999 us", "errors",
            format!("{:?}", self.rw).to_lowercase(),
            parallax::util::format_size(self.block_size).replace(' ', ""),
            self.queues,
            self.depth,
            self.seconds,
            self.iops,
            self.mb_per_s,
            self.lat_p50_us,
            self.lat_p99_us,
            self.lat_p999_us,
            self.errors,
        )
    }
}

/// A log-linear latency histogram (nanoseconds; 32 sub-buckets per power of two, ~3% error).
#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

const SUB: u32 = 5;

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; (64 << SUB) as usize],
            total: 0,
            max: 0,
        }
    }
}

impl Histogram {
    fn index(v: u64) -> usize {
        if v < (1 << SUB) {
            return v as usize;
        }
        let exp = 63 - v.leading_zeros(); // >= SUB
        let sub = (v >> (exp - SUB)) & ((1 << SUB) - 1);
        (((exp - SUB + 1) << SUB) as u64 + sub) as usize
    }

    fn value(i: usize) -> u64 {
        let i = i as u64;
        if i < (1 << SUB) {
            return i;
        }
        let exp = (i >> SUB) + u64::from(SUB) - 1;
        let sub = i & ((1 << SUB) - 1);
        // Upper edge of the bucket.
        ((1 << SUB) | sub) << (exp - u64::from(SUB)) | ((1 << (exp - u64::from(SUB))) - 1)
    }

    pub fn record(&mut self, ns: u64) {
        self.counts[Self::index(ns)] += 1;
        self.total += 1;
        self.max = self.max.max(ns);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    /// The value at quantile `q` (0..=1), in ns.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::value(i).min(self.max);
            }
        }
        self.max
    }
}

struct QueueResult {
    interrupted: bool,
    ops: u64,
    errors: u64,
    hist: Histogram,
}

fn run_queue(
    q: &mut FrontQueue,
    cfg: &BenchConfig,
    span_blocks: u64,
    qi: usize,
    nq: usize,
) -> Result<QueueResult, FrontError> {
    let mut rng = SmallRng::seed_from_u64(cfg.seed.wrapping_add(qi as u64));
    let sectors_per_block = cfg.block_size / SECTOR;
    // Sequential patterns give each queue its own stretch of the disk.
    let stretch = (span_blocks / nq as u64).max(1);
    let mut seq = stretch * qi as u64;
    let mut next_block = |rng: &mut SmallRng| {
        if cfg.pattern.random() {
            rng.random_range(0..span_blocks)
        } else {
            let b = seq;
            seq += 1;
            if seq >= (stretch * (qi as u64 + 1)).min(span_blocks) {
                seq = stretch * qi as u64;
            }
            b
        }
    };
    let kind = if cfg.pattern.writes() {
        IoKind::Write
    } else {
        IoKind::Read
    };
    // What a guest writes: data, not zeros (Parallax stores a zero block as a hole and
    // writes nothing, which would flatter the write figures), and every sector of a request
    // stamped with a counter, so that no two writes carry the same bytes.
    let mut payload = Vec::new();
    if kind == IoKind::Write {
        payload = vec![0u8; cfg.block_size as usize];
        rng.fill(&mut payload[..]);
    }
    let mut stamp = 0u64;
    let depth = cfg.depth.min(q.depth());
    let mut res = QueueResult {
        interrupted: false,
        ops: 0,
        errors: 0,
        hist: Histogram::default(),
    };
    let mut done = Vec::with_capacity(depth);
    let end = Instant::now() + cfg.duration;
    loop {
        let running = Instant::now() < end;
        while running && q.in_flight() < depth && q.can_submit() {
            if !payload.is_empty() {
                stamp += 1;
                for block in payload.chunks_mut(512) {
                    block[..8].copy_from_slice(&stamp.to_le_bytes());
                }
            }
            let req = IoRequest {
                kind,
                sector: next_block(&mut rng) * sectors_per_block,
                len: cfg.block_size,
                data: (!payload.is_empty()).then_some(&payload[..]),
                first_sect: 0,
                force_indirect: false,
                want_data: false,
            };
            q.submit(&req)?;
        }
        q.push()?;
        if q.in_flight() == 0 {
            break;
        }
        match q.wait(Some(Duration::from_secs(30))) {
            // The backend went away (daemon stopping): report what ran until then.
            Err(FrontError::BackendGone) => {
                res.interrupted = true;
                break;
            }
            r => r?,
        };
        done.clear();
        q.poll(&mut done)?;
        for c in &done {
            res.ops += 1;
            if c.status != 0 {
                res.errors += 1;
            }
            res.hist.record(c.latency.as_nanos() as u64);
        }
    }
    Ok(res)
}

/// Runs the benchmark on every queue of `front` at once.
pub fn run(front: &mut Frontend, cfg: &BenchConfig) -> Result<BenchReport, FrontError> {
    if cfg.block_size == 0 || cfg.block_size % SECTOR != 0 {
        return Err(FrontError::Invalid(
            "block size must be a multiple of 512".into(),
        ));
    }
    if cfg.block_size > front.queues()[0].max_request_bytes() {
        return Err(FrontError::Invalid(format!(
            "block size {} is larger than a request can carry ({}); use --indirect",
            cfg.block_size,
            front.queues()[0].max_request_bytes()
        )));
    }
    if cfg.pattern.writes() && front.read_only() {
        return Err(FrontError::Invalid("device is read-only".into()));
    }
    let span = cfg.span.unwrap_or(u64::MAX).min(front.size());
    let span_blocks = span / cfg.block_size;
    if span_blocks == 0 {
        return Err(FrontError::Invalid("disk smaller than one block".into()));
    }
    let nq = front.queues().len();
    let start = Instant::now();
    let results: Vec<Result<QueueResult, FrontError>> = std::thread::scope(|s| {
        let handles: Vec<_> = front
            .queues_mut()
            .iter_mut()
            .enumerate()
            .map(|(qi, q)| s.spawn(move || run_queue(q, cfg, span_blocks, qi, nq)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread panicked"))
            .collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut hist = Histogram::default();
    let (mut ops, mut errors, mut interrupted) = (0, 0, false);
    for r in results {
        let r = r?;
        interrupted |= r.interrupted;
        ops += r.ops;
        errors += r.errors;
        hist.merge(&r.hist);
    }
    let us = |ns: u64| ns as f64 / 1000.0;
    Ok(BenchReport {
        rw: cfg.pattern,
        block_size: cfg.block_size,
        queues: nq,
        depth: cfg.depth,
        seconds: elapsed,
        ops,
        errors,
        iops: ops as f64 / elapsed,
        mb_per_s: (ops * cfg.block_size) as f64 / elapsed / 1e6,
        lat_p50_us: us(hist.quantile(0.5)),
        lat_p99_us: us(hist.quantile(0.99)),
        lat_p999_us: us(hist.quantile(0.999)),
        lat_max_us: us(hist.max),
        interrupted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles() {
        let mut h = Histogram::default();
        for v in 1..=10_000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5) as f64;
        let p99 = h.quantile(0.99) as f64;
        assert!((p50 / 5_000_000.0 - 1.0).abs() < 0.05, "p50 {p50}");
        assert!((p99 / 9_900_000.0 - 1.0).abs() < 0.05, "p99 {p99}");
        assert_eq!(h.quantile(1.0), 10_000_000);
        for v in [0u64, 1, 31, 32, 33, 1000, u64::MAX / 2] {
            assert!(Histogram::value(Histogram::index(v)) >= v, "{v}");
        }
    }
}
