//! The daemon's scheduler: one thread that, at each tick of any schedule, takes the snapshots
//! that are due and deletes the automatic snapshots their policy no longer keeps, then sleeps
//! to the next tick. A pass is one [`run_once`], which takes the time as an argument so that
//! tests can drive it with any clock.
//!
//! Pruning is cheap where it runs: deleting a snapshot is one logged change, and the space
//! comes back through the store's orphan worker a little at a time, never in one long stall
//! of client I/O.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tracing::{debug, info, warn};

use super::{histories, policy};
use crate::{
    signal::{Signal, Worker},
    store::{Store, StoreError, StoreResult},
};

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Snapshots taken (full names).
    pub taken: Vec<String>,
    /// Snapshots deleted (full names).
    pub pruned: Vec<String>,
    /// Snapshots due for deletion that are in use (exported), left for a later pass.
    pub busy: Vec<String>,
    /// The next tick of any schedule that applies to a VDI (Unix seconds).
    pub next: Option<u64>,
}

/// One pass at time `now` (Unix seconds): snapshots every VDI whose schedule has ticked since
/// its last automatic snapshot, then deletes what the policies no longer keep.
pub fn run_once(store: &Store, now: u64) -> StoreResult<PassReport> {
    let schedules = store.schedules()?;
    if schedules.is_empty() {
        return Ok(PassReport::default());
    }
    let plan = policy::plan(&schedules, &histories(store, &schedules)?, now);
    let mut report = PassReport {
        next: plan.next,
        ..PassReport::default()
    };
    for (vdi, snap) in plan.take {
        match store.snapshot(&vdi, &snap) {
            Ok(()) => report.taken.push(format!("{vdi}@{snap}")),
            // Deleted, renamed or snapshotted by hand since the listing: nothing to do.
            Err(StoreError::NotFound(_) | StoreError::Exists(_)) => {}
            Err(e) => return Err(e),
        }
    }
    for full in plan.prune {
        match store.delete(&full, false) {
            Ok(_) => report.pruned.push(full),
            Err(StoreError::Busy(_)) => report.busy.push(full),
            Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(report)
}

/// What the scheduler has done since the daemon started (the metrics endpoint shows them).
#[derive(Debug, Default)]
pub struct ScheduleCounters {
    pub taken: AtomicU64,
    pub pruned: AtomicU64,
    pub failed_passes: AtomicU64,
}

/// How long a pass that failed waits before the next try.
const RETRY: Duration = Duration::from_secs(10);
/// Longest sleep with no schedule applying to anything (a new VDI a pattern matches is
/// noticed within this; a schedule change wakes the thread at once).
const IDLE: Duration = Duration::from_secs(60);

/// Starts the scheduler thread of a daemon: wake it when the schedules change; a stop ends
/// it after the pass it may be in.
pub fn spawn_scheduler(
    store: Arc<Store>,
    counters: Arc<ScheduleCounters>,
) -> std::io::Result<Worker> {
    Worker::spawn("parallax-schedules", move |signal| {
        run(&store, signal, &counters)
    })
}

fn run(store: &Store, signal: &Signal, counters: &ScheduleCounters) {
    loop {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let wait = match run_once(store, secs) {
            Ok(r) => {
                counters
                    .taken
                    .fetch_add(r.taken.len() as u64, Ordering::Relaxed);
                counters
                    .pruned
                    .fetch_add(r.pruned.len() as u64, Ordering::Relaxed);
                for s in &r.taken {
                    info!("schedule: snapshot {s} taken");
                }
                for s in &r.pruned {
                    info!("schedule: snapshot {s} deleted (no longer kept by its policy)");
                }
                for s in &r.busy {
                    debug!("schedule: snapshot {s} is in use; deleting it later");
                }
                r.next.map_or(IDLE, |n| {
                    (UNIX_EPOCH + Duration::from_secs(n))
                        .duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO)
                        .min(IDLE)
                })
            }
            Err(e) => {
                counters.failed_passes.fetch_add(1, Ordering::Relaxed);
                warn!(
                    "schedule: pass failed: {e}; trying again in {}s",
                    RETRY.as_secs()
                );
                RETRY
            }
        };
        if !signal.wait(wait) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        schedule::{auto_name, schedule_from_text},
        store::{device::MemDevice, Kind, ListFilter},
    };

    fn snapshots(s: &Store) -> Vec<String> {
        s.list_filtered(&ListFilter {
            kind: Some(Kind::Snapshot),
            ..ListFilter::default()
        })
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect()
    }

    /// Passes at made-up times against a real store: snapshots named by tick, pruning as the
    /// policy says, exported snapshots left for later, hand-made ones never touched.
    #[test]
    fn passes_snapshot_and_prune_a_store_by_the_clock_they_are_given() {
        let dev = Arc::new(MemDevice::new(64 << 20));
        Store::format(&*dev, 64 << 20).unwrap();
        let s = Store::open_device(dev, Default::default()).unwrap();
        assert_eq!(run_once(&s, 1000).unwrap(), PassReport::default());
        for n in ["vm-1", "vm-2", "db", "dbx", "web"] {
            s.create_vdi(n, 1 << 20).unwrap();
        }
        // Listed by the targets' literal prefixes: "db" lists dbx too, which it must not
        // snapshot; "web" is listed by no target.
        s.set_schedule("db", &schedule_from_text("1h", None).unwrap())
            .unwrap();
        s.snapshot("vm-1", "gold").unwrap();
        s.set_schedule("vm-*", &schedule_from_text("10s", Some("10s:30s")).unwrap())
            .unwrap();
        let t0 = 1_800_000_000;
        let r = run_once(&s, t0 + 3).unwrap();
        assert_eq!(
            r.taken,
            [
                format!("db@{}", auto_name(t0 - t0 % 3600)),
                format!("vm-1@{}", auto_name(t0)),
                format!("vm-2@{}", auto_name(t0))
            ]
        );
        s.remove_schedule("db").unwrap();
        assert_eq!(r.next, Some(t0 + 10));
        assert!(r.pruned.is_empty());
        // Within the same tick: nothing.
        assert_eq!(run_once(&s, t0 + 9).unwrap().taken, Vec::<String>::new());
        for k in 1..=3 {
            run_once(&s, t0 + 10 * k).unwrap();
        }
        // At t0+30 the t0 snapshot is 30 s old: out of the window.
        let mut want = vec![
            format!("db@{}", auto_name(t0 - t0 % 3600)),
            "vm-1@gold".to_string(),
        ];
        for vm in ["vm-1", "vm-2"] {
            for k in 1..=3 {
                want.push(format!("{vm}@{}", auto_name(t0 + 10 * k)));
            }
        }
        want.sort();
        assert_eq!(snapshots(&s), want);

        // An exported snapshot is not deleted under its client; the next pass does it.
        let held = format!("vm-2@{}", auto_name(t0 + 10));
        let d = s.open_vdi(&held, false).unwrap();
        let r = run_once(&s, t0 + 45).unwrap();
        assert_eq!(r.busy, std::slice::from_ref(&held));
        assert!(snapshots(&s).contains(&held));
        drop(d);
        let r = run_once(&s, t0 + 46).unwrap();
        assert!(r.pruned.contains(&held));
        assert!(!snapshots(&s).contains(&held));

        // A removed schedule takes and deletes nothing more.
        s.remove_schedule("vm-*").unwrap();
        assert_eq!(run_once(&s, t0 + 10_000).unwrap(), PassReport::default());
        assert!(snapshots(&s).contains(&"vm-1@gold".to_string()));
        let r = s.check(true, &mut |_| {}).unwrap();
        assert!(r.ok, "{r:#?}");
    }
}
