//! Per-export counters: bytes, operations, errors and latency of every request a front end
//! makes on a VDI or snapshot, by transport.
//!
//! A front end gets an [`ExportMetrics`] once, when it opens the export (the provider wraps
//! the disk in a [`MeteredDisk`]); each request then costs two `Instant::now()` and a few
//! relaxed atomic adds, with no lookup and no lock. The table of exports is locked only on
//! open and on scrape.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Instant,
};

use parking_lot::RwLock;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet},
    metrics::MetricType,
    registry::Unit,
};

use super::histogram::{LatencyHistogram, IO_BUCKETS};
use crate::disk::{Disk, DiskError, Extent};

/// The front end an export is served through (label `transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Transport {
    Nbd,
    Ring,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Nbd => "nbd",
            Transport::Ring => "ring",
        }
    }
}

/// The kinds of request a [`Disk`] serves (label `op`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Trim,
    Zero,
    Cache,
    BlockStatus,
}

impl Op {
    pub const ALL: [Op; 7] = [
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Trim,
        Op::Zero,
        Op::Cache,
        Op::BlockStatus,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::Zero => "zero",
            Op::Cache => "cache",
            Op::BlockStatus => "block_status",
        }
    }
}

#[derive(Debug)]
struct OpMetrics {
    /// Every request of this kind, failed ones included; its count is the operation count.
    latency: LatencyHistogram,
    errors: AtomicU64,
}

/// The counters of one export through one transport, shared by every handle open on it.
#[derive(Debug)]
pub struct ExportMetrics {
    read_bytes: AtomicU64,
    written_bytes: AtomicU64,
    ops: [OpMetrics; Op::ALL.len()],
}

impl Default for ExportMetrics {
    fn default() -> Self {
        ExportMetrics {
            read_bytes: AtomicU64::new(0),
            written_bytes: AtomicU64::new(0),
            ops: Op::ALL.map(|_| OpMetrics {
                latency: LatencyHistogram::new(IO_BUCKETS),
                errors: AtomicU64::new(0),
            }),
        }
    }
}

impl ExportMetrics {
    /// Records a request of kind `op` that started at `started` and moved `bytes` if it
    /// succeeded (only reads and writes count bytes).
    pub fn done(&self, op: Op, started: Instant, result: Result<(), DiskError>, bytes: usize) {
        let m = &self.ops[op as usize];
        m.latency.observe(started.elapsed());
        match (result, op) {
            (Ok(()), Op::Read) => {
                self.read_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
            }
            (Ok(()), Op::Write) => {
                self.written_bytes
                    .fetch_add(bytes as u64, Ordering::Relaxed);
            }
            (Ok(()), _) => {}
            (Err(_), _) => {
                m.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Every export's counters since the daemon started, by name and transport.
#[derive(Debug, Default)]
pub struct Exports {
    table: RwLock<BTreeMap<Key, Arc<ExportMetrics>>>,
}

impl Exports {
    /// The counters of `name` through `transport`, made on first use. Call once per open.
    pub fn get(&self, name: &str, transport: Transport) -> Arc<ExportMetrics> {
        let key = (name.to_string(), transport);
        if let Some(m) = self.table.read().get(&key) {
            return m.clone();
        }
        self.table.write().entry(key).or_default().clone()
    }
}

type Key = (String, Transport);

impl Collector for Exports {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let exports: Vec<(Key, Arc<ExportMetrics>)> = self
            .table
            .read()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        type Get = fn(&ExportMetrics) -> &AtomicU64;
        let bytes: [(&str, &str, Get); 2] = [
            (
                "parallax_export_read",
                "Bytes read by clients (successful reads).",
                |m| &m.read_bytes,
            ),
            (
                "parallax_export_written",
                "Bytes written by clients (successful writes; zeroing and trimming not counted).",
                |m| &m.written_bytes,
            ),
        ];
        for (name, help, get) in bytes {
            let mut family =
                encoder.encode_descriptor(name, help, Some(&Unit::Bytes), MetricType::Counter)?;
            for ((export, t), m) in &exports {
                let v = get(m).load(Ordering::Relaxed);
                family
                    .encode_family(&[("export", export.as_str()), ("transport", t.as_str())])?
                    .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
            }
        }
        encode_ops(
            &mut encoder,
            (
                "parallax_export_operations",
                "Requests by kind, failed ones included.",
            ),
            (None, MetricType::Counter),
            &exports,
            |mut e, o| e.encode_counter::<NoLabelSet, _, u64>(&o.latency.count(), None),
        )?;
        encode_ops(
            &mut encoder,
            (
                "parallax_export_errors",
                "Requests answered with an error, by kind.",
            ),
            (None, MetricType::Counter),
            &exports,
            |mut e, o| {
                e.encode_counter::<NoLabelSet, _, u64>(&o.errors.load(Ordering::Relaxed), None)
            },
        )?;
        encode_ops(
            &mut encoder,
            (
                "parallax_export_operation_duration",
                "Time from a request reaching the store to its answer, by kind.",
            ),
            (Some(&Unit::Seconds), MetricType::Histogram),
            &exports,
            |e, o| o.latency.encode(e),
        )
    }
}

/// One family with an `op` label: a sample per export, transport and kind of request. Kinds
/// an export never saw are left out, to keep the output short.
fn encode_ops(
    encoder: &mut DescriptorEncoder,
    (name, help): (&str, &str),
    (unit, kind): (Option<&Unit>, MetricType),
    exports: &[(Key, Arc<ExportMetrics>)],
    mut each: impl FnMut(MetricEncoder, &OpMetrics) -> std::fmt::Result,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, unit, kind)?;
    for ((export, t), m) in exports {
        for op in Op::ALL {
            let o = &m.ops[op as usize];
            if o.latency.count() == 0 {
                continue;
            }
            let labels = [
                ("export", export.as_str()),
                ("transport", t.as_str()),
                ("op", op.as_str()),
            ];
            each(family.encode_family(&labels)?, o)?;
        }
    }
    Ok(())
}

/// A [`Disk`] that records every request into its export's counters.
pub struct MeteredDisk<D> {
    inner: D,
    metrics: Arc<ExportMetrics>,
}

impl<D: Disk> MeteredDisk<D> {
    pub fn new(inner: D, metrics: Arc<ExportMetrics>) -> MeteredDisk<D> {
        MeteredDisk { inner, metrics }
    }
}

fn status<T>(r: &Result<T, DiskError>) -> Result<(), DiskError> {
    r.as_ref().map(|_| ()).map_err(|e| *e)
}

impl<D: Disk> Disk for MeteredDisk<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let t = Instant::now();
        let r = self.inner.read_at(buf, offset);
        self.metrics.done(Op::Read, t, r, buf.len());
        r
    }

    fn read_nowait(&self, buf: &mut [u8], offset: u64) -> Option<Result<(), DiskError>> {
        let t = Instant::now();
        // `None` read nothing: the front end calls `read_at` next, which is what counts.
        let r = self.inner.read_nowait(buf, offset)?;
        self.metrics.done(Op::Read, t, r, buf.len());
        Some(r)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), DiskError> {
        let t = Instant::now();
        let r = self.inner.write_at(buf, offset, fua);
        self.metrics.done(Op::Write, t, r, buf.len());
        r
    }

    fn flush(&self) -> Result<(), DiskError> {
        let t = Instant::now();
        let r = self.inner.flush();
        self.metrics.done(Op::Flush, t, r, 0);
        r
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        let t = Instant::now();
        let r = self.inner.discard(offset, len);
        self.metrics.done(Op::Trim, t, r, 0);
        r
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), DiskError> {
        let t = Instant::now();
        let r = self.inner.write_zeroes(offset, len, no_hole, fua);
        self.metrics.done(Op::Zero, t, r, 0);
        r
    }

    fn block_status(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Result<Vec<Extent>, DiskError> {
        let t = Instant::now();
        let r = self.inner.block_status(offset, len, max_extents);
        self.metrics.done(Op::BlockStatus, t, status(&r), 0);
        r
    }

    fn block_hashes(
        &self,
        offset: u64,
        len: u64,
        max: usize,
    ) -> Result<crate::disk::BlockHashes, DiskError> {
        let t = Instant::now();
        let r = self.inner.block_hashes(offset, len, max);
        self.metrics.done(Op::BlockStatus, t, status(&r), 0);
        r
    }

    fn cache(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        let t = Instant::now();
        let r = self.inner.cache(offset, len);
        self.metrics.done(Op::Cache, t, r, 0);
        r
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::{encoding::prometheus_text::encode, registry::Registry};

    use super::*;
    use crate::disk::MemDisk;

    fn scrape(exports: &Arc<Exports>) -> String {
        let mut r = Registry::default();
        r.register_collector(Box::new(exports.clone()));
        let mut out = String::new();
        encode(&mut out, &r).unwrap();
        out
    }

    #[test]
    fn a_metered_disk_counts_bytes_ops_errors_and_latency() {
        let exports = Arc::new(Exports::default());
        let m = exports.get("vm", Transport::Nbd);
        assert!(Arc::ptr_eq(&m, &exports.get("vm", Transport::Nbd)));
        let disk = MeteredDisk::new(MemDisk::new(1 << 20), m);
        disk.write_at(&[1; 8192], 0, false).unwrap();
        disk.write_at(&[1; 512], 1 << 20, false).unwrap_err();
        let mut buf = [0u8; 4096];
        disk.read_at(&mut buf, 4096).unwrap();
        disk.flush().unwrap();
        // A second handle on the same export adds to the same counters.
        let other = MeteredDisk::new(MemDisk::new(1 << 20), exports.get("vm", Transport::Nbd));
        other.read_at(&mut buf, 0).unwrap();

        let text = scrape(&exports);
        let l = r#"export="vm",transport="nbd""#;
        for want in [
            format!("parallax_export_written_bytes_total{{{l}}} 8192\n"),
            format!("parallax_export_read_bytes_total{{{l}}} 8192\n"),
            format!("parallax_export_operations_total{{{l},op=\"write\"}} 2\n"),
            format!("parallax_export_errors_total{{{l},op=\"write\"}} 1\n"),
            format!("parallax_export_operations_total{{{l},op=\"read\"}} 2\n"),
            format!("parallax_export_operations_total{{{l},op=\"flush\"}} 1\n"),
            format!("parallax_export_operation_duration_seconds_count{{{l},op=\"write\"}} 2\n"),
            format!(
                "parallax_export_operation_duration_seconds_bucket{{{l},op=\"read\",le=\"+Inf\"}} 2\n"
            ),
        ] {
            assert!(text.contains(&want), "{want:?} missing from:\n{text}");
        }
        // Kinds never used are left out.
        assert!(!text.contains("op=\"trim\""), "{text}");
    }
}
