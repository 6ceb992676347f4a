//! A latency histogram made of plain atomics: an observation is one `fetch_add` on its bucket
//! and one on the sum, with no lock (prometheus-client's own `Histogram` takes a mutex per
//! observation). Bucket bounds are fixed when it is made; scrapes read it without stopping
//! writers, so a scrape may see an observation in a bucket but not yet in the sum.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use prometheus_client::encoding::{MetricEncoder, NoLabelSet};

const US: u64 = 1_000;
const MS: u64 = 1_000_000;
const S: u64 = 1_000_000_000;

/// Upper bounds for one I/O request (nanoseconds): 10 µs to 1 s.
pub const IO_BUCKETS: &[u64] = &[
    10 * US,
    25 * US,
    50 * US,
    100 * US,
    250 * US,
    500 * US,
    MS,
    2 * MS + MS / 2,
    5 * MS,
    10 * MS,
    25 * MS,
    50 * MS,
    100 * MS,
    250 * MS,
    500 * MS,
    S,
];

/// Upper bounds for a checkpoint (nanoseconds): 1 ms to 30 s.
pub const CHECKPOINT_BUCKETS: &[u64] = &[
    MS,
    2 * MS + MS / 2,
    5 * MS,
    10 * MS,
    25 * MS,
    50 * MS,
    100 * MS,
    250 * MS,
    500 * MS,
    S,
    2 * S + S / 2,
    5 * S,
    10 * S,
    30 * S,
];

/// Durations counted into fixed buckets (Prometheus `le` semantics: a bucket counts what is
/// at most its bound; the last, unbounded, bucket is `+Inf`).
#[derive(Debug)]
pub struct LatencyHistogram {
    /// Ascending upper bounds in nanoseconds.
    bounds: &'static [u64],
    /// Observations per bucket (not cumulative), `bounds.len() + 1` of them.
    counts: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
}

impl LatencyHistogram {
    /// A histogram with these ascending upper bounds (nanoseconds).
    pub fn new(bounds: &'static [u64]) -> LatencyHistogram {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]));
        LatencyHistogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = self.bounds.partition_point(|&b| b < ns);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Writes the `_bucket`, `_sum` and `_count` samples.
    pub fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .map(|&b| b as f64 / 1e9)
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|&(_, n)| n).sum();
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let h = LatencyHistogram::new(IO_BUCKETS);
        h.observe(Duration::from_micros(10)); // exactly a bound: that bucket
        h.observe(Duration::from_micros(11));
        h.observe(Duration::from_secs(5)); // past the last bound: +Inf
        let n = |i: usize| h.counts[i].load(Ordering::Relaxed);
        assert_eq!((n(0), n(1), n(IO_BUCKETS.len())), (1, 1, 1));
        assert_eq!(h.count(), 3);
        assert_eq!(h.sum_ns.load(Ordering::Relaxed), 5_000_021_000);
    }
}
