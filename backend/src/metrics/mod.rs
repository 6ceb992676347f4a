//! Prometheus metrics of a running daemon (`metrics.listen`; off by default).
//!
//! ```text
//!  NBD connection / ring attach ── open_export ──► MeteredDisk ──► ExportMetrics (atomics)
//!                                                                        │
//!  store checkpoint hook ──► checkpoint LatencyHistogram                 │
//!                                                                        ▼
//!  GET /metrics ──► http (own thread) ──► Metrics::encode ──► collectors: exports, store, rings
//! ```
//!
//! Counters that change per request are plain atomics in an [`ExportMetrics`] that a front end
//! resolves once, when it opens an export; the store's gauges and the ring devices' counters
//! are read when a scrape asks. prometheus-client does the registry and the text format.
//! With metrics off the provider hands out unwrapped disks: the data path is unchanged.
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `parallax_export_read_bytes_total` | export, transport | bytes read (successful reads) |
//! | `parallax_export_written_bytes_total` | export, transport | bytes written |
//! | `parallax_export_operations_total` | export, transport, op | requests, failed ones included |
//! | `parallax_export_errors_total` | export, transport, op | requests answered with an error |
//! | `parallax_export_operation_duration_seconds` | export, transport, op | histogram, 10 µs – 1 s |
//! | `parallax_store_checkpoint_duration_seconds` | | histogram, 1 ms – 30 s |
//! | `parallax_store_capacity_bytes`, `parallax_store_free_bytes` | | space |
//! | `parallax_store_dirty_map_nodes` | | map nodes waiting for a checkpoint |
//! | `parallax_store_vdis`, `parallax_store_snapshots` | | registry entries |
//! | `parallax_store_durable_generation`, `parallax_store_poisoned` | | commit state |
//! | `parallax_ring_requests_total`, `_segments_total`, `_errors_total` | device | blkif rings, every attach summed |
//! | `parallax_ring_devices` | | ring devices attached |
//! | `parallax_schedule_snapshots_taken_total`, `_pruned_total` | | what snapshot schedules did |
//! | `parallax_schedule_failed_passes_total` | | scheduler passes that failed (logged) |
//!
//! `op` is one of read, write, flush, trim, zero, cache, block_status; `transport` is nbd or
//! ring.

mod collect;
mod export;
mod histogram;
mod http;

use std::sync::Arc;

use prometheus_client::registry::Registry;

use self::{
    collect::{RingCollector, ScheduleCollector, StoreCollector},
    export::Exports,
    histogram::CHECKPOINT_BUCKETS,
};
pub use self::{
    export::{ExportMetrics, MeteredDisk, Op, Transport},
    histogram::LatencyHistogram,
    http::Endpoint,
};
use crate::{schedule::ScheduleCounters, store::Store};

/// The daemon's metrics: the registry that scrapes encode, and the per-export table.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    exports: Arc<Exports>,
}

impl Metrics {
    /// Metrics for a daemon serving `store` and running snapshot schedules that count into
    /// `schedules`; installs the store's checkpoint hook.
    pub fn new(store: &Arc<Store>, schedules: Arc<ScheduleCounters>) -> Arc<Metrics> {
        let exports = Arc::new(Exports::default());
        let checkpoints = Arc::new(LatencyHistogram::new(CHECKPOINT_BUCKETS));
        {
            let h = checkpoints.clone();
            if !store.on_checkpoint(move |took| h.observe(took)) {
                tracing::warn!("the store already reports checkpoints elsewhere; parallax_store_checkpoint_duration_seconds stays empty");
            }
        }
        let mut registry = Registry::default();
        registry.register_collector(Box::new(exports.clone()));
        registry.register_collector(Box::new(StoreCollector {
            store: Arc::downgrade(store),
            checkpoints,
        }));
        registry.register_collector(Box::new(RingCollector));
        registry.register_collector(Box::new(ScheduleCollector(schedules)));
        Arc::new(Metrics { registry, exports })
    }

    /// The counters of export `name` served through `transport`; call once per open.
    pub fn export(&self, name: &str, transport: Transport) -> Arc<ExportMetrics> {
        self.exports.get(name, transport)
    }

    /// Everything, in the Prometheus text format (version 0.0.4).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::warn!("metrics: encoding failed: {e}");
        }
        out
    }
}
