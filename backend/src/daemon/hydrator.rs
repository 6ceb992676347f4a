//! Background hydration (`backing.hydrate_bytes_per_sec`): one thread that copies what
//! remote-backed VDIs still read through their backings into the store, one VDI at a time and
//! at most that fast, until each is cut loose from its backing (`Store::hydrate`, the same
//! work as `vdi hydrate`). It looks for backed VDIs when the daemon starts, whenever a
//! `vdi create --backing` wakes it, and every minute; a VDI whose backing fails is tried
//! again then.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tracing::{info, warn};

use crate::{
    signal::{Signal, Worker},
    store::{Kind, Store, StoreError},
    util::format_size,
};

/// Longest wait between looks for backed VDIs.
const IDLE: Duration = Duration::from_secs(60);

/// Starts the hydration thread of a daemon, at most `bytes_per_sec`: wake it when a backed
/// VDI is made; a stop ends it within a step of its copy (what it copied stays).
pub fn spawn_hydrator(store: Arc<Store>, bytes_per_sec: u64) -> std::io::Result<Worker> {
    Worker::spawn("parallax-hydrate", move |signal| {
        run(&store, bytes_per_sec.max(1), signal)
    })
}

/// The VDIs (not snapshots, which cannot change) that still read through a backing.
fn backed(store: &Store) -> Vec<String> {
    match store.list() {
        Ok(l) => l
            .into_iter()
            .filter(|v| v.kind == Kind::Vdi && v.backing.is_some())
            .map(|v| v.name)
            .collect(),
        Err(e) => {
            warn!("hydrate: cannot list VDIs: {e}");
            Vec::new()
        }
    }
}

fn run(store: &Arc<Store>, bytes_per_sec: u64, signal: &Signal) {
    loop {
        for name in backed(store) {
            let start = Instant::now();
            // Paced by sleeping between steps until the bytes done are due; a stop ends the
            // wait and the copy.
            let mut pace = |done: u64, _total: u64| -> Result<(), StoreError> {
                let due = Duration::from_secs_f64(done as f64 / bytes_per_sec as f64);
                if !signal.sleep_until(start + due) {
                    return Err(StoreError::Busy("the daemon is stopping".into()));
                }
                Ok(())
            };
            match store.hydrate(&name, &mut pace) {
                Ok(r) => info!(
                    "hydrate: {name} no longer reads through {} ({} copied in {:.1}s)",
                    r.uri,
                    format_size(r.hydrated_bytes),
                    start.elapsed().as_secs_f64()
                ),
                Err(_) if signal.is_stopped() => return,
                // Deleted, or hydrated by hand, meanwhile.
                Err(StoreError::NotFound(_) | StoreError::Invalid(_)) => {}
                Err(e) => warn!(
                    "hydrate: {name}: {e}; trying again within {}s",
                    IDLE.as_secs()
                ),
            }
        }
        if !signal.wait(IDLE) {
            return;
        }
    }
}
