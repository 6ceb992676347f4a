//! Snapshot schedules: `parallax schedule set NAME|PATTERN --every 10s --keep 10s:1h,1m:1d`.
//!
//! ```text
//!  policy   what a schedule means: spec text, matching, names, the plan for a moment (pure)
//!  worker   the daemon's scheduler thread: list, plan, snapshot, prune, sleep to the next tick
//! ```
//!
//! The store keeps the schedules (`store::Schedule`, registry and log, so they survive
//! restarts and crashes); only a running daemon acts on them.

pub mod policy;
pub mod worker;

use serde::{Deserialize, Serialize};

use crate::store::{is_staging, KeepRule, Kind, ListFilter, Store, StoreResult};

pub use policy::{auto_name, auto_time, schedule_from_text, AUTO_PREFIX};
pub use worker::{run_once, PassReport, Scheduler, Waker};

/// One schedule as `schedule list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleStatus {
    /// The VDI name or pattern.
    pub target: String,
    pub every_secs: u64,
    pub keep: Vec<KeepRule>,
    /// `every` and `keep` as `schedule set` takes them.
    pub every: String,
    pub keep_spec: String,
    /// The VDIs it applies to now (a VDI named by one schedule and matched by another's
    /// pattern follows the one naming it; see `policy::schedule_for`).
    pub vdis: u64,
}

/// Every schedule with the number of VDIs it applies to.
pub fn status(store: &Store) -> StoreResult<Vec<ScheduleStatus>> {
    let schedules = store.schedules()?;
    let mut counts = vec![0u64; schedules.len()];
    if !schedules.is_empty() {
        for v in store.list_filtered(&ListFilter {
            kind: Some(Kind::Vdi),
            ..ListFilter::default()
        })? {
            if let Some(i) = policy::schedule_for(&schedules, &v.name) {
                counts[i] += 1;
            }
        }
    }
    Ok(schedules
        .into_iter()
        .zip(counts)
        .map(|((target, s), vdis)| ScheduleStatus {
            every: policy::format_duration(s.every_secs),
            keep_spec: policy::format_keep(&s.keep),
            target,
            every_secs: s.every_secs,
            keep: s.keep,
            vdis,
        })
        .collect())
}

/// The VDIs (not staging ones) and their snapshots' names, as the planner takes them.
fn histories(store: &Store) -> StoreResult<Vec<policy::VdiHistory>> {
    let mut out: Vec<policy::VdiHistory> = Vec::new();
    let mut index = std::collections::HashMap::new();
    let entries = store.list_filtered(&ListFilter::default())?;
    for e in entries.iter().filter(|e| e.kind == Kind::Vdi) {
        if is_staging(&e.name) {
            continue;
        }
        index.insert(e.name.clone(), out.len());
        out.push(policy::VdiHistory {
            name: e.name.clone(),
            snapshots: Vec::new(),
        });
    }
    for e in entries.iter().filter(|e| e.kind == Kind::Snapshot) {
        if let Some((vdi, snap)) = e.name.split_once('@') {
            if let Some(&i) = index.get(vdi) {
                out[i].snapshots.push(snap.to_string());
            }
        }
    }
    Ok(out)
}
