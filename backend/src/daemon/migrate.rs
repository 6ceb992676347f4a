//! `vdi migrate NAME --to HOST`: moving a VDI's one writer to another Parallax host, so that
//! exactly one host writes the VDI at every instant, and a failure at any step leaves it whole
//! and owned by one host.
//!
//! ```text
//!  source (owns NAME)                                   destination
//!  snapshot NAME@migrate-…-1          full stream ──►   .incoming:NAME (+ its snapshot)
//!      … the VM keeps writing on the source during the bulk copy …
//!  ── switch-over (the downtime) ──
//!  park: NAME → .migrating:NAME,
//!        open handles detached       (durable: no one writes it here again)
//!  snapshot …@migrate-…-2          delta stream ──►   NAME, a fork of the incoming copy, with
//!                                                       NAME@migrate-…-2; appears in one
//!                                  ◄── ok               logged rename: the commit point
//!  delete .migrating:NAME
//! ```
//!
//! When the final step's outcome is unknown (an error, a lost connection), the source asks
//! the destination to **abort**: under the same lock as the final publish, the destination
//! either finds NAME with the final snapshot (committed: the source finishes) or marks the
//! migration aborted so that a final stream still in flight can no longer publish, and drops
//! its incoming copy (the source then gives NAME back to its clients). If the destination
//! cannot be asked, NAME stays parked on the source and running the same command again finishes
//! or undoes it. The snapshot names carry the destination, so a rerun aimed elsewhere is refused.
//!
//! This module is the protocol core, free of I/O: the source talks to a [`Destination`]
//! (over the network in `control_net`, in-process in the tests) and the destination's side is
//! [`Arrivals`].

use std::{collections::HashSet, io, sync::Arc, time::Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::{
    store::{incoming_name, parked_name, Kind, Staged, Store, StoreError, StoreResult},
    stream::{self, RecvReport},
    transfer::Progress,
};

/// How the destination answers an abort.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AbortOutcome {
    /// The VDI arrived (the final snapshot is there): the destination owns it.
    Committed,
    /// Nothing of the migration is left there, and nothing can arrive any more.
    Aborted,
    /// A VDI of that name is there but not this migration's: a person must look.
    Conflict,
}

/// Writes a stream into the writer it is given; returns its data bytes.
pub type StreamBody<'a> = dyn FnMut(&mut dyn io::Write) -> StoreResult<u64> + 'a;

/// What the source needs the destination to do; each call is one request.
pub trait Destination {
    /// Where the VDI goes, as the user named it.
    fn describe(&self) -> String;
    /// Receives the bulk copy: `send` writes the full stream into the writer it is given.
    fn receive_full(
        &mut self,
        name: &str,
        send: &mut StreamBody<'_>,
    ) -> Result<RecvReport, StoreError>;
    /// Receives the delta and gives the VDI its name there (the commit point).
    fn receive_final(
        &mut self,
        name: &str,
        migration: u64,
        send: &mut StreamBody<'_>,
    ) -> Result<RecvReport, StoreError>;
    /// Ends migration `migration` of `name` if it has not committed (see [`AbortOutcome`]).
    fn abort(
        &mut self,
        name: &str,
        migration: u64,
        final_snapshot: Option<(&str, u64)>,
    ) -> Result<AbortOutcome, StoreError>;
}

/// What `vdi migrate` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateReport {
    pub name: String,
    pub to: String,
    /// Data bytes of the bulk copy (while the VDI was still in use here).
    pub bulk_bytes: u64,
    /// Data bytes of the final delta (during the switch-over).
    pub delta_bytes: u64,
    /// From taking the VDI away from its clients here to the destination owning it.
    pub downtime_ms: u64,
    /// Clients detached at the switch-over.
    pub detached: usize,
    /// The snapshot on the destination that holds what arrived.
    pub arrived: String,
    /// An interrupted migration of this VDI that this run found and finished or undid first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed: Option<String>,
    /// Snapshots of the VDI deleted here with it (`--delete-snapshots`).
    pub deleted_snapshots: Vec<String>,
    /// The snapshot schedule this host had for the VDI, now removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed_schedule: Option<String>,
}

/// Options of one migration.
#[derive(Debug, Clone, Default)]
pub struct MigrateOptions {
    /// Delete the VDI's own snapshots here with it (they do not travel).
    pub delete_snapshots: bool,
}

/// How a snapshot name says which destination it was taken for: the destination with every
/// character a name cannot hold replaced by `_`.
fn destination_tag(to: &str) -> String {
    to.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._+-:".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `migrate-<time>-to-<tag>-<step>`.
fn step_snapshot(stamp: &str, tag: &str, step: u8) -> String {
    format!("migrate-{stamp}-to-{tag}-{step}")
}

/// The step (1 or 2) and destination tag of a snapshot a migration took, if it is one.
fn parse_step(snap: &str) -> Option<(String, &str, u8)> {
    let rest = snap.strip_prefix("migrate-")?;
    let (stamp, rest) = rest.split_once("-to-")?;
    let (tag, step) = rest.rsplit_once('-')?;
    let step = match step {
        "1" => 1,
        "2" => 2,
        _ => return None,
    };
    Some((stamp.to_string(), tag, step))
}

fn now_stamp() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    // Milliseconds since the epoch: unique per migration of a VDI; as many digits until 2286,
    // so the text sorts as the number does.
    format!("{ms}")
}

/// Moves VDI `name` to `dest`. `progress` sees the bulk copy's and the delta's bytes; a
/// client that goes away stops the migration only before the switch-over.
pub fn migrate(
    store: &Arc<Store>,
    name: &str,
    dest: &mut dyn Destination,
    opts: &MigrateOptions,
    progress: Progress,
) -> StoreResult<MigrateReport> {
    store.require_migration()?;
    crate::store::validate_name(name, "VDI")?;
    let to = dest.describe();
    let tag = destination_tag(&to);
    let resumed = if store.is_parked(name) {
        Some(resume(store, name, dest, &tag)?)
    } else {
        None
    };
    if let Some(Resumed::Finished(mut report)) = resumed {
        report.resumed = Some(format!(
            "an interrupted migration of {name} to {to} had committed; this run finished it"
        ));
        return Ok(report);
    }
    let resumed = resumed.map(|_| {
        format!("an interrupted migration of {name} to {to} had not committed; it was undone")
    });

    let summary = store.stat(name)?;
    if summary.kind != Kind::Vdi {
        return Err(StoreError::Invalid(format!(
            "{name} is a snapshot; migrate moves a VDI (fork the snapshot and migrate the fork)"
        )));
    }
    if let Some(uri) = summary.backing {
        return Err(StoreError::Invalid(format!(
            "{name} reads through {uri}: `vdi hydrate {name}` first, so that all of it can move"
        )));
    }
    // A migration interrupted before its switch-over leaves its bulk snapshot: drop it.
    drop_step_snapshots(store, name, name);
    let own = store.snapshots_of(name)?;
    if !own.is_empty() && !opts.delete_snapshots {
        return Err(StoreError::Busy(format!(
            "{name} has snapshots ({}); they do not move with it (send them with `vdi send`), \
             so pass --delete-snapshots to delete them here once it has moved",
            own.iter()
                .map(|s| format!("{name}@{s}"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }

    // 1. The bulk copy, while the VDI is still in use here.
    let stamp = now_stamp();
    let snap1 = step_snapshot(&stamp, &tag, 1);
    store.snapshot(name, &snap1)?;
    let migration = store.snapshot_identity(&format!("{name}@{snap1}"))?.guid;
    info!("migrate {name} to {to}: bulk copy of {name}@{snap1}");
    let bulk = dest.receive_full(name, &mut |w| {
        let r = stream::send(store, &format!("{name}@{snap1}"), None, w, progress)?;
        Ok(r.data_bytes)
    });
    let bulk = match bulk {
        Ok(r) => r,
        Err(e) => {
            undo_bulk(store, name, &snap1, dest, migration);
            return Err(e);
        }
    };

    // 2. The switch-over: from here the VDI is nobody's until the destination owns it.
    let started = Instant::now();
    let detached = match store.park(name) {
        Ok(n) => n,
        Err(e) => {
            undo_bulk(store, name, &snap1, dest, migration);
            return Err(e);
        }
    };
    info!("migrate {name} to {to}: switch-over ({detached} client(s) detached)");
    let parked = parked_name(name);
    let snap2 = step_snapshot(&stamp, &tag, 2);
    let sent_final = store.snapshot(&parked, &snap2).and_then(|()| {
        let guid = store.snapshot_identity(&format!("{parked}@{snap2}"))?.guid;
        Ok(guid)
    });
    let final_guid = match sent_final {
        Ok(g) => g,
        Err(e) => {
            // No delta was sent: the destination cannot have it.
            return Err(give_back(store, name, dest, migration, None, e));
        }
    };
    let delta = dest.receive_final(name, migration, &mut |w| {
        let r = stream::send(
            store,
            &format!("{parked}@{snap2}"),
            Some(&format!("{parked}@{snap1}")),
            w,
            // The switch-over goes on whatever the client does.
            &mut |_, _| Ok(()),
        )?;
        Ok(r.data_bytes)
    });
    let delta = match delta {
        Ok(r) => r,
        Err(e) => match ask_abort(dest, name, migration, Some((&snap2, final_guid))) {
            Ok(AbortOutcome::Committed) => {
                warn!("migrate {name}: the final step reported {e}, but {to} has {name}");
                RecvReport {
                    name: name.to_string(),
                    snapshot: format!("{name}@{snap2}"),
                    sent: format!("{parked}@{snap2}"),
                    size: summary.size,
                    base: None,
                    data_bytes: 0,
                }
            }
            outcome => return Err(give_back(store, name, dest, migration, Some(outcome), e)),
        },
    };
    let downtime_ms = started.elapsed().as_millis() as u64;
    info!("migrate {name} to {to}: {to} owns it ({downtime_ms} ms without a writer)");
    let (deleted_snapshots, removed_schedule) = finish(store, name);
    Ok(MigrateReport {
        name: name.to_string(),
        to,
        bulk_bytes: bulk.data_bytes,
        delta_bytes: delta.data_bytes,
        downtime_ms,
        detached,
        arrived: format!("{name}@{snap2}"),
        resumed,
        deleted_snapshots,
        removed_schedule,
    })
}

/// Asks the destination to abort, a few times over a few seconds (a connection that just
/// failed may come back).
fn ask_abort(
    dest: &mut dyn Destination,
    name: &str,
    migration: u64,
    final_snapshot: Option<(&str, u64)>,
) -> Result<AbortOutcome, StoreError> {
    let mut last = None;
    for attempt in 0..3 {
        if attempt > 0 {
            std::thread::sleep(std::time::Duration::from_millis(500 << attempt));
        }
        match dest.abort(name, migration, final_snapshot) {
            Ok(o) => return Ok(o),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("three attempts"))
}

/// Before the switch-over: drops the bulk snapshot here and the copy there (best effort: the
/// next migration of the VDI replaces a copy left there).
fn undo_bulk(store: &Store, name: &str, snap1: &str, dest: &mut dyn Destination, migration: u64) {
    if let Err(e) = store.delete(&format!("{name}@{snap1}"), false) {
        warn!("migrate {name}: cannot delete {name}@{snap1}: {e}");
    }
    if let Err(e) = dest.abort(name, migration, None) {
        // The next migration of the name replaces a copy left there.
        debug!(
            "migrate {name}: cannot drop the copy on {}: {e}",
            dest.describe()
        );
    }
}

/// After the switch-over failed: gives the VDI back to this host's clients if the destination
/// says it did not take it, else leaves it parked. Returns the error to report.
fn give_back(
    store: &Store,
    name: &str,
    dest: &mut dyn Destination,
    migration: u64,
    asked: Option<Result<AbortOutcome, StoreError>>,
    cause: StoreError,
) -> StoreError {
    let to = dest.describe();
    let outcome = asked.unwrap_or_else(|| ask_abort(dest, name, migration, None));
    match outcome {
        Ok(AbortOutcome::Aborted) => match store.unpark(name) {
            Ok(()) => {
                drop_step_snapshots(store, name, name);
                StoreError::Peer(format!(
                    "migrating {name} to {to} failed at the switch-over ({cause}); {name} \
                     stays on this host and its clients may reopen it"
                ))
            }
            Err(e) => StoreError::Invalid(format!(
                "migrating {name} to {to} failed ({cause}) and {name} could not be given its \
                 name back ({e}); it is whole, parked here as {}: run the same command again",
                parked_name(name)
            )),
        },
        Ok(AbortOutcome::Committed) => unreachable!("a commit is not a failure"),
        Ok(AbortOutcome::Conflict) => StoreError::Exists(format!(
            "migrating {name} to {to} failed ({cause}) and {to} has a VDI {name} that is not \
             this migration's; {name} is whole, parked here as {}, owned by no one until a \
             person decides (delete one of the two, then run the same command again)",
            parked_name(name)
        )),
        Err(e) => StoreError::Peer(format!(
            "migrating {name} to {to} failed at the switch-over ({cause}) and {to} cannot say \
             whether it took {name} ({e}); {name} is whole, parked here as {}: run the same \
             command again to finish or undo it",
            parked_name(name)
        )),
    }
}

/// Deletes the snapshots migrations took of `vdi` (VDI `name` parked or not).
fn drop_step_snapshots(store: &Store, name: &str, vdi: &str) {
    for s in store.snapshots_of(vdi).unwrap_or_default() {
        if parse_step(&s).is_some() {
            if let Err(e) = store.delete(&format!("{vdi}@{s}"), false) {
                warn!("migrate {name}: cannot delete {vdi}@{s}: {e}");
            }
        }
    }
}

/// Once the destination owns the VDI: deletes it here with its snapshots, and its schedule.
fn finish(store: &Store, name: &str) -> (Vec<String>, Option<String>) {
    let parked = parked_name(name);
    let deleted = store
        .snapshots_of(&parked)
        .unwrap_or_default()
        .into_iter()
        .filter(|s| parse_step(s).is_none())
        .map(|s| format!("{name}@{s}"))
        .collect();
    if let Err(e) = store.delete(&parked, true) {
        // The destination owns it; what is left here is space that no one can write.
        warn!("migrate {name}: cannot delete {parked} here: {e}");
    }
    let schedule = store
        .schedules()
        .ok()
        .and_then(|all| all.into_iter().find(|(t, _)| t == name))
        .map(|(t, _)| t);
    if let Some(t) = &schedule {
        if let Err(e) = store.remove_schedule(t) {
            warn!("migrate {name}: cannot remove its snapshot schedule here: {e}");
        }
    }
    (deleted, schedule)
}

enum Resumed {
    Finished(MigrateReport),
    Undone,
}

/// A VDI parked by a migration that did not end: finishes it if the destination has the VDI,
/// else gives the VDI back here.
fn resume(
    store: &Store,
    name: &str,
    dest: &mut dyn Destination,
    tag: &str,
) -> StoreResult<Resumed> {
    let parked = parked_name(name);
    let to = dest.describe();
    let snaps = store.snapshots_of(&parked)?;
    // The latest bulk snapshot: its time stamp and destination name the migration.
    let Some((stamp, was_tag)) = snaps
        .iter()
        .filter_map(|s| parse_step(s))
        .filter(|(_, _, step)| *step == 1)
        .map(|(stamp, tag, _)| (stamp, tag.to_string()))
        .max()
    else {
        return Err(StoreError::Corrupt(format!(
            "{parked} has no migration snapshot: report this"
        )));
    };
    if was_tag != tag {
        return Err(StoreError::Busy(format!(
            "{name} is parked here by a migration to {was_tag} that did not end; run the \
             migration to that host again (`--to {was_tag}`) to finish or undo it"
        )));
    }
    let snap1 = step_snapshot(&stamp, tag, 1);
    let snap2 = Some(step_snapshot(&stamp, tag, 2)).filter(|s| snaps.contains(s));
    let migration = store.snapshot_identity(&format!("{parked}@{snap1}"))?.guid;
    let final_snapshot = match &snap2 {
        Some(s) => Some((
            s.clone(),
            store.snapshot_identity(&format!("{parked}@{s}"))?.guid,
        )),
        None => None,
    };
    let outcome = ask_abort(
        dest,
        name,
        migration,
        final_snapshot.as_ref().map(|(s, g)| (s.as_str(), *g)),
    )
    .map_err(|e| {
        StoreError::Peer(format!(
            "{name} is parked here by a migration to {to} that did not end, and {to} cannot \
             say whether it took {name} ({e}); try again when it answers"
        ))
    })?;
    match outcome {
        AbortOutcome::Committed => {
            let size = store.stat(&parked)?.size;
            let (deleted_snapshots, removed_schedule) = finish(store, name);
            info!("migrate {name} to {to}: finished an interrupted migration ({size} bytes)");
            Ok(Resumed::Finished(MigrateReport {
                name: name.to_string(),
                to,
                bulk_bytes: 0,
                delta_bytes: 0,
                downtime_ms: 0,
                detached: 0,
                arrived: format!("{name}@{}", snap2.unwrap_or_default()),
                resumed: None,
                deleted_snapshots,
                removed_schedule,
            }))
        }
        AbortOutcome::Aborted => {
            store.unpark(name)?;
            drop_step_snapshots(store, name, name);
            info!("migrate {name} to {to}: undid an interrupted migration");
            Ok(Resumed::Undone)
        }
        AbortOutcome::Conflict => Err(StoreError::Exists(format!(
            "{name} is parked here by a migration to {to} that did not end, and {to} has a VDI \
             {name} that is not this migration's; delete one of the two, then run this again"
        ))),
    }
}

/// The destination's side: receives copies and knows which migrations were aborted (in
/// memory: a restarted destination has no final stream in flight and no incoming copy it
/// could publish, since what an interrupted receive left is deleted when the store opens).
#[derive(Default)]
pub struct Arrivals {
    state: Mutex<ArrivalState>,
}

#[derive(Default)]
struct ArrivalState {
    /// Migrations (the bulk snapshot's guid) that may not publish any more.
    aborted: HashSet<u64>,
    /// VDI names with a receive in progress.
    busy: HashSet<String>,
}

/// Marks a name busy for as long as it lives.
struct BusyName<'a> {
    arrivals: &'a Arrivals,
    name: String,
}

impl Drop for BusyName<'_> {
    fn drop(&mut self) {
        self.arrivals.state.lock().busy.remove(&self.name);
    }
}

impl Arrivals {
    fn claim(&self, name: &str) -> StoreResult<BusyName<'_>> {
        if !self.state.lock().busy.insert(name.to_string()) {
            return Err(StoreError::Busy(format!(
                "a migration of {name} to this host is in progress already"
            )));
        }
        Ok(BusyName {
            arrivals: self,
            name: name.to_string(),
        })
    }

    /// Receives the bulk copy of `name` as `.incoming:NAME`, replacing one a failed migration
    /// left; refused if `name` is here.
    pub fn receive_full(
        &self,
        store: &Arc<Store>,
        name: &str,
        input: &mut dyn io::Read,
    ) -> StoreResult<RecvReport> {
        store.require_migration()?;
        crate::store::validate_name(name, "VDI")?;
        let _busy = self.claim(name)?;
        if store.stat(name).is_ok() {
            return Err(StoreError::Exists(format!(
                "VDI {name} (on the destination: delete or rename it there first)"
            )));
        }
        let incoming = incoming_name(name);
        if store.stat(&incoming).is_ok() {
            warn!("dropping the copy of {name} that an earlier migration left");
            store.delete(&incoming, true)?;
        }
        stream::recv(store, &incoming, input, &mut |_, _| Ok(()))
    }

    /// Receives the delta of migration `migration` as VDI `name` (a fork of the incoming
    /// copy), unless the migration was aborted meanwhile; then drops the incoming copy.
    pub fn receive_final(
        &self,
        store: &Arc<Store>,
        name: &str,
        migration: u64,
        input: &mut dyn io::Read,
    ) -> StoreResult<RecvReport> {
        store.require_migration()?;
        crate::store::validate_name(name, "VDI")?;
        let _busy = self.claim(name)?;
        let incoming = incoming_name(name);
        let mut publish = |staged: Staged<'_>| {
            let st = self.state.lock();
            if st.aborted.contains(&migration) {
                return Err(StoreError::Invalid(format!(
                    "the migration of {name} was aborted"
                )));
            }
            staged.publish()
        };
        let r = stream::receive(
            store,
            name,
            input,
            &mut |_, _| Ok(()),
            Some(&incoming),
            &mut publish,
        )?;
        if let Err(e) = store.delete(&incoming, true) {
            warn!("{name} arrived; its incoming copy stays for now: {e}");
        }
        info!(
            "{name} arrived by migration ({} bytes of delta)",
            r.data_bytes
        );
        Ok(r)
    }

    /// Ends migration `migration` of `name` here unless it committed (see [`AbortOutcome`]).
    pub fn abort(
        &self,
        store: &Store,
        name: &str,
        migration: u64,
        final_snapshot: Option<(&str, u64)>,
    ) -> StoreResult<AbortOutcome> {
        crate::store::validate_name(name, "VDI")?;
        // Under the lock a final publish takes: it has happened, or it never will.
        let mut st = self.state.lock();
        if store.stat(name).is_ok() {
            let ours = final_snapshot.is_some_and(|(snap, guid)| {
                store
                    .snapshot_identity(&format!("{name}@{snap}"))
                    .is_ok_and(|id| id.guid == guid)
            });
            return Ok(if ours {
                AbortOutcome::Committed
            } else {
                AbortOutcome::Conflict
            });
        }
        st.aborted.insert(migration);
        drop(st);
        let incoming = incoming_name(name);
        match store.delete(&incoming, true) {
            Ok(_) | Err(StoreError::NotFound(_)) => {}
            // A receive still running holds it; it cannot publish now, and the next
            // migration of the name replaces what it leaves.
            Err(e) => warn!("the incoming copy of {name} stays for now: {e}"),
        }
        Ok(AbortOutcome::Aborted)
    }
}

#[cfg(test)]
mod tests;
