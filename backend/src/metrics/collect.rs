//! What is read at scrape time rather than counted as it happens: the store's space, dirty
//! metadata and VDI count (through its public accessors), its checkpoint latency (a histogram
//! the store's checkpoint hook feeds), the ring devices' own counters, and the snapshot
//! scheduler's.

use std::sync::{Arc, Weak};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeGaugeValue, NoLabelSet},
    metrics::MetricType,
    registry::Unit,
};

use super::histogram::LatencyHistogram;
use crate::{
    blkif::{engine::device_totals, StatsSnapshot},
    schedule::ScheduleCounters,
    store::{format::BLOCK_SIZE_U64, Store},
};

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: impl EncodeGaugeValue,
) -> std::fmt::Result {
    encoder
        .encode_descriptor(name, help, unit, MetricType::Gauge)?
        .encode_gauge(&v)
}

/// The store's gauges and checkpoint histogram. Holds the store weakly: once the daemon has
/// closed it, a scrape shows the checkpoint histogram alone.
#[derive(Debug)]
pub struct StoreCollector {
    pub store: Weak<Store>,
    pub checkpoints: Arc<LatencyHistogram>,
}

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        self.checkpoints.encode(encoder.encode_descriptor(
            "parallax_store_checkpoint_duration",
            "Checkpoints, from the cut to the commit record synced and freed blocks released.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?)?;
        let Some(store) = self.store.upgrade() else {
            return Ok(());
        };
        let bytes = Some(&Unit::Bytes);
        let mut gauges = vec![
            (
                "parallax_store_capacity",
                "Space for blocks (data and metadata).",
                bytes,
                store.geometry().data_blocks() * BLOCK_SIZE_U64,
            ),
            (
                "parallax_store_free",
                "Space available for new data now (commit reserve and space awaiting reuse excluded).",
                bytes,
                store.free_blocks() * BLOCK_SIZE_U64,
            ),
            (
                "parallax_store_dirty_map_nodes",
                "Map nodes changed in memory, waiting for the next checkpoint (4 KiB each).",
                None,
                store.dirty_map_nodes() as u64,
            ),
            (
                "parallax_store_durable_generation",
                "Generation of the last durable checkpoint.",
                None,
                store.durable_generation(),
            ),
            (
                "parallax_store_poisoned",
                "1 once the store refuses writes after a failed device write or sync.",
                None,
                u64::from(store.is_poisoned()),
            ),
        ];
        // Counted once, then kept by every create, fork, snapshot and delete: O(1) a scrape.
        if let Ok(n) = store.counts() {
            gauges.push(("parallax_store_vdis", "VDIs in the store.", None, n.vdis));
            gauges.push((
                "parallax_store_snapshots",
                "Snapshots in the store.",
                None,
                n.snapshots,
            ));
        }
        for (name, help, unit, v) in gauges {
            gauge(&mut encoder, name, help, unit, v)?;
        }
        Ok(())
    }
}

/// The counters of the ring devices (blkif), by device name (the VDI, or `vbd-DOMID-DEVID`
/// for a Xen device whose VDI is unknown): summed over every device of that name since the
/// daemon started, running or ended.
#[derive(Debug)]
pub struct RingCollector;

impl Collector for RingCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let (totals, running) = device_totals();
        gauge(
            &mut encoder,
            "parallax_ring_devices",
            "Ring (blkif) devices attached now.",
            None,
            running as u64,
        )?;
        type Get = fn(&StatsSnapshot) -> u64;
        let counters: [(&str, &str, Get); 3] = [
            ("parallax_ring_requests", "Ring requests answered.", |s| {
                s.requests
            }),
            (
                "parallax_ring_segments",
                "Data segments (pages) in the ring requests executed.",
                |s| s.segments,
            ),
            (
                "parallax_ring_errors",
                "Ring requests answered with an error status.",
                |s| s.errors,
            ),
        ];
        for (name, help, get) in counters {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (device, s) in &totals {
                family
                    .encode_family(&[("device", device.as_str())])?
                    .encode_counter::<NoLabelSet, _, u64>(&get(s), None)?;
            }
        }
        Ok(())
    }
}

/// What the snapshot scheduler has done.
#[derive(Debug)]
pub struct ScheduleCollector(pub Arc<ScheduleCounters>);

impl Collector for ScheduleCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let c = &self.0;
        for (name, help, v) in [
            (
                "parallax_schedule_snapshots_taken",
                "Snapshots taken by snapshot schedules.",
                &c.taken,
            ),
            (
                "parallax_schedule_snapshots_pruned",
                "Automatic snapshots deleted because no keep rule kept them.",
                &c.pruned,
            ),
            (
                "parallax_schedule_failed_passes",
                "Scheduler passes that failed (the daemon logs why and retries).",
                &c.failed_passes,
            ),
        ] {
            encoder
                .encode_descriptor(name, help, None, MetricType::Counter)?
                .encode_counter::<NoLabelSet, _, u64>(
                    &v.load(std::sync::atomic::Ordering::Relaxed),
                    None,
                )?;
        }
        Ok(())
    }
}
