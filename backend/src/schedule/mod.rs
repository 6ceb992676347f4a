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

use crate::store::{is_hidden, KeepRule, Kind, ListFilter, Store, StoreResult};

pub use policy::{auto_name, auto_time, schedule_from_text, AUTO_PREFIX};
pub use worker::{run_once, spawn_scheduler, PassReport, ScheduleCounters};

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

/// The VDIs the schedules may apply to (not staging ones), with their snapshots' names, as
/// the planner takes them. Only the names that start like a target are listed (each target's
/// text before its first wildcard), so a schedule for a few VDIs does not list the whole
/// registry at each tick.
fn histories(
    store: &Store,
    schedules: &[(String, crate::store::Schedule)],
) -> StoreResult<Vec<policy::VdiHistory>> {
    let mut prefixes: Vec<&str> = schedules
        .iter()
        .map(|(t, _)| &t[..t.find(['*', '?']).unwrap_or(t.len())])
        .collect();
    prefixes.sort_unstable();
    // A prefix that another one starts with adds nothing.
    prefixes.dedup_by(|later, earlier| later.starts_with(*earlier));
    let mut out: Vec<policy::VdiHistory> = Vec::new();
    let mut index = std::collections::HashMap::new();
    let mut snapshots = Vec::new();
    for prefix in prefixes {
        for e in store.list_filtered(&ListFilter {
            prefix: (!prefix.is_empty()).then(|| prefix.to_string()),
            ..ListFilter::default()
        })? {
            match e.kind {
                Kind::Vdi if !is_hidden(&e.name) => {
                    index.insert(e.name.clone(), out.len());
                    out.push(policy::VdiHistory {
                        name: e.name,
                        snapshots: Vec::new(),
                    });
                }
                Kind::Vdi => {}
                Kind::Snapshot => snapshots.push(e.name),
            }
        }
    }
    for full in snapshots {
        if let Some((vdi, snap)) = full.split_once('@') {
            if let Some(&i) = index.get(vdi) {
                out[i].snapshots.push(snap.to_string());
            }
        }
    }
    Ok(out)
}
