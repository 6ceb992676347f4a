//! Background dedup (`dedup.background`): one thread that walks what the store holds
//! (`Store::dedup_step`, the work of `parallax dedup`) while clients are not writing, so that
//! blocks written before inline dedup saw them (imported templates, stores from before
//! format 7, writes with inline dedup off) end up stored once. It goes on from where it
//! paused, starts a new pass only after clients wrote something since the last one began, and
//! logs what each pass shared and freed.

use std::{sync::Arc, time::Duration};

use tracing::{info, warn};

use crate::{
    signal::{Signal, Worker},
    store::{DedupPosition, DedupReport, Store},
    util::format_size,
};

/// Data blocks looked at per slice (then the worker checks for client writes again).
const SLICE_BLOCKS: u64 = 16384;

/// When the deduper runs.
#[derive(Debug, Clone, Copy)]
pub struct DedupSchedule {
    /// Clients must not have written for this long before a slice runs.
    pub idle: Duration,
    /// How often it looks for work once a pass is done.
    pub every: Duration,
}

/// Starts the background dedup thread; a stop ends it within a slice.
pub fn spawn_deduper(store: Arc<Store>, schedule: DedupSchedule) -> std::io::Result<Worker> {
    Worker::spawn("parallax-dedup", move |signal| {
        run(&store, schedule, signal)
    })
}

fn run(store: &Arc<Store>, schedule: DedupSchedule, signal: &Signal) {
    if !store.dedup_status().supported {
        info!("dedup: the store's format has no dedup index; background dedup is off (run `parallax upgrade`)");
        return;
    }
    let mut pos = DedupPosition::default();
    let mut report = DedupReport::default();
    // Client writes when the current pass began (`None`: no pass under way).
    let mut began: Option<u64> = None;
    let mut last_pass: Option<u64> = None;
    loop {
        let writes = store.client_writes();
        if began.is_none() && last_pass == Some(writes) {
            // Nothing written since the last pass began: nothing new to find.
            if !signal.wait(schedule.every) {
                return;
            }
            continue;
        }
        // Idle: no client write for `idle`.
        if !signal.sleep_until(std::time::Instant::now() + schedule.idle) {
            return;
        }
        if store.client_writes() != writes {
            continue;
        }
        let started = *began.get_or_insert(writes);
        match store.dedup_step(&mut pos, SLICE_BLOCKS, &mut report, &mut |_| {}) {
            Ok(false) => {}
            Ok(true) => {
                if let Err(e) = store.gc(&mut |_| {}) {
                    warn!("dedup: reclaiming after the pass: {e}");
                }
                info!(
                    "dedup: pass done: {} blocks scanned, {} shared ({}), {} entered in the index",
                    report.blocks_scanned,
                    report.blocks_shared,
                    format_size(report.blocks_shared * 4096),
                    report.blocks_indexed
                );
                last_pass = Some(started);
                began = None;
                pos = DedupPosition::default();
                report = DedupReport::default();
            }
            Err(e) => {
                if signal.is_stopped() {
                    return;
                }
                warn!("dedup: {e}; trying again in {}s", schedule.every.as_secs());
                if !signal.wait(schedule.every) {
                    return;
                }
            }
        }
    }
}
