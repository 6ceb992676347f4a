//! Managing VDIs: create, snapshot, fork, rename, resize, delete; and the reports operators
//! read (list, info, tree, df) and `gc`. Every change is committed before the call returns,
//! so a snapshot that returned is durable.
//!
//! The report types are serialisable: the CLI prints them (or `--json`), and the daemon's
//! control socket carries them.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use super::{
    catalog::Catalog,
    error::{StoreError, StoreResult},
    format::{Ptr, BLOCK_SIZE_U64, FANOUT, MAX_VDI_BYTES},
    migration::PARKED_PREFIX,
    nodes::retry_evicted,
    registry::is_hidden,
    registry::{decode_id, snapshot_key, snapshot_prefix, split_name, validate_name, Kind, Record},
    store::{now_ns, Store},
};

/// One line of `vdi list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdiSummary {
    pub name: String,
    pub kind: Kind,
    pub size: u64,
    /// Creation time, Unix seconds.
    pub created: u64,
    /// For forks: the snapshot they came from (as it is called now, or as it was called when
    /// the fork was made if it has been deleted since).
    pub origin: Option<String>,
    /// The origin has been deleted (a snapshot of the same name may exist now: it is another).
    #[serde(default)]
    pub origin_deleted: bool,
    /// Data bytes its map points at, and of those the bytes nothing else shares: only when
    /// asked for (`ListFilter::usage`), since each costs a walk of the map.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique: Option<u64>,
    /// The NBD export it reads through where it was never written (remote-backed VDIs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<String>,
}

impl VdiSummary {
    /// The summary of `rec`, named `name` (its full name), without the map walk `used` and
    /// `unique` need.
    pub(super) fn of(rec: &Record, name: String, origin: (Option<String>, bool)) -> VdiSummary {
        VdiSummary {
            name,
            kind: rec.kind,
            size: rec.size,
            created: secs(rec.created_ns),
            origin: origin.0,
            origin_deleted: origin.1,
            used: None,
            unique: None,
            backing: rec.backing.clone(),
        }
    }
}

/// Which entries `vdi list` shows (all of them by default).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListFilter {
    /// Only names starting with this (a snapshot's name is `VDI@SNAP`).
    #[serde(default)]
    pub prefix: Option<String>,
    /// Only forks of this snapshot (`NAME@SNAP`, as it is called now).
    #[serde(default)]
    pub origin: Option<String>,
    /// Only VDIs, or only snapshots.
    #[serde(default)]
    pub kind: Option<Kind>,
    /// Also count each entry's used and unique bytes (a walk of its map each).
    #[serde(default)]
    pub usage: bool,
}

impl ListFilter {
    pub(super) fn admits(&self, v: &VdiSummary) -> bool {
        self.prefix
            .as_ref()
            .is_none_or(|p| v.name.starts_with(p.as_str()))
            && self.kind.is_none_or(|k| v.kind == k)
            && self
                .origin
                .as_ref()
                .is_none_or(|o| !v.origin_deleted && v.origin.as_ref() == Some(o))
    }
}

/// `vdi info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdiInfo {
    pub name: String,
    pub kind: Kind,
    pub id: u64,
    pub size: u64,
    pub created: u64,
    /// Bytes of data blocks the map points at.
    pub allocated: u64,
    /// Of those, bytes no other VDI or snapshot shares.
    pub unique: u64,
    /// Of those, bytes shared with other VDIs or snapshots.
    pub shared: u64,
    /// Map metadata bytes (radix nodes) reachable from this VDI.
    pub metadata: u64,
    pub origin: Option<String>,
    /// See [`VdiSummary::origin_deleted`].
    #[serde(default)]
    pub origin_deleted: bool,
    pub snapshots: Vec<String>,
    pub forks: Vec<String>,
    pub open_handles: usize,
    /// A remote-backed VDI's backing: what is local, cached and still remote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<super::BackingInfo>,
}

/// `df`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DfReport {
    /// Size of the store.
    pub store_bytes: u64,
    /// Space for blocks (data and metadata).
    pub capacity_bytes: u64,
    /// In use by referenced blocks.
    pub used_bytes: u64,
    /// Available for new data (excludes the commit reserve and space awaiting reuse).
    pub free_bytes: u64,
    /// Kept back so commits always find room.
    pub reserved_bytes: u64,
    /// Freed but reusable only after the next commit (or queued for `gc`).
    pub pending_bytes: u64,
    /// Map nodes queued for reclamation by the orphan worker / `gc`.
    pub orphan_nodes: u64,
    pub vdis: u64,
    pub snapshots: u64,
    /// What the VDIs (not their snapshots) could hold if every block were written: the sum
    /// of their sizes. More than `capacity_bytes` means the store is overcommitted.
    #[serde(default)]
    pub provisioned_bytes: u64,
    /// Data bytes all VDIs and snapshots map, counting shared blocks once per mapping.
    pub logical_bytes: u64,
    /// Data bytes actually stored for them.
    pub stored_bytes: u64,
    /// logical / stored: what sharing (snapshots, forks, dedup) saves.
    pub sharing_ratio: f64,
    pub generation: u64,
    /// The store's on-disk format version (`parallax upgrade` moves old ones forward).
    #[serde(default)]
    pub format_version: u64,
    /// Remote-backed VDIs and snapshots: where their bytes are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backed: Vec<super::BackedUsage>,
    /// Caches of remote exports (one per backing), and the data they hold (part of
    /// `stored_bytes`).
    #[serde(default)]
    pub remote_caches: u64,
    #[serde(default)]
    pub remote_cache_bytes: u64,
    /// Dedup: the settings, the index, and what sharing below the map nodes saves.
    #[serde(default)]
    pub dedup: super::DedupUsage,
}

/// One node of `vdi tree`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeNode {
    pub name: String,
    pub kind: Kind,
    pub size: u64,
    /// Set on a placeholder for a deleted snapshot that still has forks.
    pub deleted: bool,
    pub children: Vec<TreeNode>,
}

/// `gc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    pub orphan_nodes_processed: u64,
    pub freed_bytes: u64,
    pub free_bytes: u64,
    /// Free ranges the sweep discarded (a store in RADOS: what the checkpoints could not give
    /// back); a range the device held nothing for counts too.
    #[serde(default)]
    pub swept_bytes: u64,
    /// Holds on other stores' snapshots released because nothing here reads them any more
    /// (left by a crash; a store in a cluster).
    #[serde(default)]
    pub holds_released: u64,
}

/// What `vdi delete` removed (or, with `dry_run`, would remove).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteReport {
    pub deleted: Vec<String>,
    #[serde(default)]
    pub dry_run: bool,
}

fn check_size(size: u64) -> StoreResult<()> {
    if size == 0 || size % 512 != 0 {
        return Err(StoreError::Invalid(format!(
            "a VDI size must be a positive multiple of 512 bytes (got {size})"
        )));
    }
    if size > MAX_VDI_BYTES {
        return Err(StoreError::Invalid(format!(
            "a VDI can be at most {} (got {})",
            crate::util::format_size(MAX_VDI_BYTES),
            crate::util::format_size(size)
        )));
    }
    Ok(())
}

pub(super) fn secs(ns: u64) -> u64 {
    ns / 1_000_000_000
}

impl Store {
    /// The current record of `id`: the loaded VDI's, else the catalog's.
    pub(super) fn record_of(&self, cat: &mut Catalog, id: u64) -> StoreResult<Record> {
        if let Some(v) = self.vdis.get(id) {
            let st = v.state.read();
            if st.deleted {
                return Err(StoreError::NotFound(format!("id {id}")));
            }
            return Ok(st.rec.clone());
        }
        cat.record(&*self.dev, id)?
            .ok_or_else(|| StoreError::NotFound(format!("id {id}")))
    }

    pub(super) fn full_name(&self, cat: &mut Catalog, rec: &Record) -> StoreResult<String> {
        Ok(match rec.kind {
            Kind::Vdi => rec.name.clone(),
            Kind::Snapshot => format!("{}@{}", self.record_of(cat, rec.parent)?.name, rec.name),
        })
    }

    /// What a fork's origin is called now (it may have been renamed since the fork), or the
    /// name it had at fork time and `true` if it has been deleted since.
    pub(super) fn origin_name(&self, cat: &mut Catalog, rec: &Record) -> (Option<String>, bool) {
        if rec.origin == 0 {
            return (None, false);
        }
        let current = self
            .record_of(cat, rec.origin)
            .ok()
            .and_then(|o| self.full_name(cat, &o).ok());
        match current {
            Some(name) => (Some(name), false),
            // A migration's received copy, gone once the VDI arrived: no origin to speak of.
            None if is_hidden(&rec.origin_name) => (None, false),
            None => (Some(rec.origin_name.clone()), true),
        }
    }

    /// Every live record: the catalog's as of the last cut, with loaded VDIs' changes.
    pub(super) fn all_records(&self, cat: &mut Catalog) -> StoreResult<Vec<Record>> {
        let mut by_id: BTreeMap<u64, Record> = cat
            .records(&*self.dev)?
            .into_iter()
            .map(|r| (r.id, r))
            .collect();
        for v in self.vdis.all() {
            let st = v.state.read();
            if st.deleted {
                by_id.remove(&v.id);
            } else {
                by_id.insert(v.id, st.rec.clone());
            }
        }
        Ok(by_id.into_values().collect())
    }

    /// Creates an empty VDI.
    pub fn create_vdi(&self, name: &str, size: u64) -> StoreResult<()> {
        validate_name(name, "VDI")?;
        self.create_unchecked(name, size)
    }

    /// Creates an empty VDI under a name the caller checked (a user's, or a staging name).
    pub(super) fn create_unchecked(&self, name: &str, size: u64) -> StoreResult<()> {
        check_size(size)?;
        self.check_writable()?;
        {
            let _change = self.change();
            let mut cat = self.catalog.lock();
            if cat.resolve(&*self.dev, name).is_ok() {
                return Err(StoreError::Exists(format!("VDI {name}")));
            }
            let id = cat.allocate_id();
            self.apply_create(&mut cat, id, name, size, now_ns())?;
        }
        self.flush()
    }

    /// Freezes VDI `vdi` as `vdi@snap`, in O(1); durable when this returns.
    pub fn snapshot(&self, vdi: &str, snap: &str) -> StoreResult<()> {
        self.snapshot_as(vdi, snap, now_ns(), 0)
    }

    /// [`Store::snapshot`] with a given creation time and identity (a received snapshot's).
    pub(super) fn snapshot_as(
        &self,
        vdi: &str,
        snap: &str,
        created: u64,
        guid: u64,
    ) -> StoreResult<()> {
        validate_name(snap, "snapshot")?;
        self.check_writable()?;
        {
            let _change = self.change();
            let mut cat = self.catalog.lock();
            if split_name(vdi)?.1.is_some() {
                return Err(StoreError::Invalid(format!(
                    "{vdi} is a snapshot; fork it (`vdi fork {vdi} NEW`) and snapshot the fork"
                )));
            }
            let id = cat.resolve(&*self.dev, vdi)?;
            if cat.get_name(&*self.dev, &snapshot_key(id, snap))?.is_some() {
                return Err(StoreError::Exists(format!("snapshot {vdi}@{snap}")));
            }
            let sid = cat.allocate_id();
            self.apply_snapshot(&mut cat, id, sid, snap, created, guid)?;
        }
        self.flush()
    }

    /// Makes `new`, a writable copy of snapshot `src` (`NAME@SNAP`), in O(1).
    pub fn fork(&self, src: &str, new: &str) -> StoreResult<()> {
        validate_name(new, "VDI")?;
        self.fork_unchecked(src, new)
    }

    /// [`Store::fork`] to a name the caller checked (a user's, or a staging name).
    pub(super) fn fork_unchecked(&self, src: &str, new: &str) -> StoreResult<()> {
        self.check_writable()?;
        {
            let _change = self.change();
            let mut cat = self.catalog.lock();
            if split_name(src)?.1.is_none() {
                return Err(StoreError::Invalid(format!(
                    "forks are made from snapshots: take one first (`vdi snapshot {src} SNAP`), then `vdi fork {src}@SNAP {new}`"
                )));
            }
            let sid = cat.resolve(&*self.dev, src)?;
            if cat.resolve(&*self.dev, new).is_ok() {
                return Err(StoreError::Exists(format!("VDI {new}")));
            }
            let id = cat.allocate_id();
            self.apply_fork(&mut cat, sid, id, new, src, now_ns())?;
        }
        self.flush()
    }

    /// Renames a VDI (its snapshots follow), or a snapshot within its VDI. Names the store
    /// gives itself (starting with `.`) are neither taken nor given.
    pub fn rename(&self, old: &str, new: &str) -> StoreResult<()> {
        if is_hidden(old) {
            return Err(StoreError::NotFound(old.to_string()));
        }
        let (nv, ns) = split_name(new)?;
        validate_name(nv, "VDI")?;
        if let Some(ns) = ns {
            validate_name(ns, "snapshot")?;
        }
        // The snapshots whose names change: the guard keeps any that another store reads
        // by name.
        let snapshots = || {
            if split_name(old)?.1.is_some() {
                return Ok(vec![old.to_string()]);
            }
            let mut cat = self.catalog.lock();
            let id = cat.resolve(&*self.dev, old)?;
            Ok(cat
                .scan_names(&*self.dev, &snapshot_prefix(id))?
                .iter()
                .map(|(k, _)| format!("{old}@{}", String::from_utf8_lossy(&k[9..])))
                .collect())
        };
        self.guarded(snapshots, &mut |_| self.rename_stored(old, new))
    }

    /// [`Store::rename`] for the store's own names too (staging, migration).
    pub(super) fn rename_stored(&self, old: &str, new: &str) -> StoreResult<()> {
        self.check_writable()?;
        {
            let _change = self.change();
            let mut cat = self.catalog.lock();
            let id = cat.resolve(&*self.dev, old)?;
            let name = match (split_name(old)?, split_name(new)?) {
                ((_, None), (nv, None)) => nv,
                ((ov, Some(_)), (nv, Some(ns))) if ov == nv => ns,
                _ => {
                    return Err(StoreError::Invalid(format!(
                    "cannot rename {old} to {new}: rename a VDI to a VDI name, or NAME@A to NAME@B"
                )))
                }
            };
            self.apply_rename(&mut cat, id, name)?;
        }
        self.flush()
    }

    /// Grows a VDI to `size` bytes (the new space reads as zeros).
    pub fn resize(&self, name: &str, size: u64) -> StoreResult<()> {
        check_size(size)?;
        self.check_writable()?;
        {
            let change = self.change();
            let mut cat = self.catalog.lock();
            if split_name(name)?.1.is_some() {
                return Err(StoreError::ReadOnly(format!("snapshot {name}")));
            }
            let id = cat.resolve(&*self.dev, name)?;
            let current = self.record_of(&mut cat, id)?.size;
            if size < current {
                return Err(StoreError::Invalid(format!(
                    "{name} is {current} bytes; VDIs only grow (shrinking could cut off a guest's data)"
                )));
            }
            self.apply_resize(&mut cat, id, size, change.gen)?;
        }
        self.flush()
    }

    /// Deletes a VDI (with `recursive`, its snapshots too) or a snapshot. Forks of a deleted
    /// snapshot keep everything they share with it. Space is reclaimed by the orphan worker
    /// (each checkpoint) or `gc`.
    pub fn delete(&self, full: &str, recursive: bool) -> StoreResult<DeleteReport> {
        self.check_writable()?;
        // Its backing (a VDI's snapshots have the same), for dropping the cache after.
        let backing = if is_hidden(full) {
            None
        } else {
            self.stat(full).ok().and_then(|v| v.backing)
        };
        // The snapshots it takes with it: the guard keeps any that another store reads.
        let hidden = is_hidden(full);
        let snapshots = || {
            if hidden {
                return Ok(Vec::new());
            }
            let mut d = self.delete_dry_run(full, recursive)?.deleted;
            d.retain(|n| n.contains('@'));
            Ok(d)
        };
        let mut deleted = Vec::new();
        self.guarded(snapshots, &mut |asked| {
            let change = self.change();
            let mut cat = self.catalog.lock();
            let victims = self.delete_victims(&mut cat, full, recursive)?;
            // A snapshot the guard was not asked about (taken since it was asked) stays.
            for &id in victims.iter().filter(|_| asked.is_some() && !hidden) {
                let rec = self.record_of(&mut cat, id)?;
                if rec.kind == Kind::Snapshot {
                    let name = self.full_name(&mut cat, &rec)?;
                    if !asked.is_some_and(|a| a.contains(&name)) {
                        return Err(StoreError::Busy(format!(
                            "{name} was taken while {full} was being deleted; try again"
                        )));
                    }
                }
            }
            deleted = self.apply_delete(&mut cat, &victims, change.gen)?;
            Ok(())
        })?;
        self.flush()?;
        if let Some(uri) = backing {
            // The delete is done and durable; a cache left over is only space (the next
            // delete or hydrate of a VDI backed by it tries again).
            if let Err(e) = self.drop_cache_if_unused(&uri) {
                tracing::warn!("the cache of {uri} stays for now: {e}");
            }
        }
        Ok(DeleteReport {
            deleted,
            dry_run: false,
        })
    }

    /// What [`Store::delete`] would delete, refusing what it would refuse; changes nothing.
    pub fn delete_dry_run(&self, full: &str, recursive: bool) -> StoreResult<DeleteReport> {
        let mut cat = self.catalog.lock();
        let mut deleted = Vec::new();
        for id in self.delete_victims(&mut cat, full, recursive)? {
            let rec = self.record_of(&mut cat, id)?;
            deleted.push(self.full_name(&mut cat, &rec)?);
        }
        Ok(DeleteReport {
            deleted,
            dry_run: true,
        })
    }

    /// The records deleting `full` takes with it (its snapshots, with `recursive`), once it is
    /// sure that none of them is open.
    fn delete_victims(
        &self,
        cat: &mut Catalog,
        full: &str,
        recursive: bool,
    ) -> StoreResult<Vec<u64>> {
        let id = cat.resolve(&*self.dev, full)?;
        let rec = self.record_of(cat, id)?;
        let mut victims = Vec::new();
        if rec.kind == Kind::Vdi {
            let snaps = cat.scan_names(&*self.dev, &snapshot_prefix(id))?;
            if !snaps.is_empty() && !recursive {
                let names: Vec<String> = snaps
                    .iter()
                    .map(|(k, _)| format!("{full}@{}", String::from_utf8_lossy(&k[9..])))
                    .collect();
                return Err(StoreError::Busy(format!(
                    "{full} has snapshots ({}); delete them first or pass --recursive",
                    names.join(", ")
                )));
            }
            for (_, v) in snaps {
                victims.push(decode_id(&v)?);
            }
        }
        victims.push(id);
        for &vid in &victims {
            let v = self.vdi_locked(cat, vid)?;
            let n = v.handles();
            // A parked VDI's handles were all detached when it was parked, and nothing opens
            // it since: they hold it only until their clients go away.
            let parked = {
                let st = v.state.read();
                st.rec.kind == Kind::Vdi && st.rec.name.starts_with(PARKED_PREFIX)
            };
            if n > 0 && !parked {
                let r = v.state.read().rec.clone();
                let what = self.full_name(cat, &r)?;
                return Err(StoreError::Busy(format!(
                    "{what} is in use ({n} open handle(s)); disconnect its clients first"
                )));
            }
        }
        Ok(victims)
    }

    /// Reclaims everything deleted or discarded: takes every queued orphan node apart and
    /// checkpoints. `progress` is told how many orphans are left after each round.
    pub fn gc(&self, progress: &mut dyn FnMut(u64)) -> StoreResult<GcReport> {
        self.check_writable()?;
        let before = self.space.lock().rc.free();
        let mut processed = 0u64;
        loop {
            let n = self.take_orphans_apart(4096)?;
            let left = self.space.lock().orphans.list.len() as u64;
            processed += n as u64;
            progress(left);
            self.checkpoint()?;
            if n == 0 || left == 0 {
                break;
            }
        }
        // What the last round freed is released by the checkpoint that cut it; one more
        // checkpoint writes the list as it ended.
        self.checkpoint()?;
        let after = self.space.lock().rc.free();
        // What the checkpoints freed goes back now, without waiting; the sweep finds what a
        // crash (or a held block) kept from going back.
        self.give_back_due(true);
        let swept = self.give_back_all()?;
        let holds_released = self.release_unused_holds()? as u64;
        Ok(GcReport {
            orphan_nodes_processed: processed,
            freed_bytes: after.saturating_sub(before) * BLOCK_SIZE_U64,
            free_bytes: self.free_blocks() * BLOCK_SIZE_U64,
            swept_bytes: swept * BLOCK_SIZE_U64,
            holds_released,
        })
    }

    /// Name, kind, size, origin of one VDI or snapshot, without walking its map.
    pub fn stat(&self, full: &str) -> StoreResult<VdiSummary> {
        let mut cat = self.catalog.lock();
        let id = cat.resolve(&*self.dev, full)?;
        let rec = self.record_of(&mut cat, id)?;
        let origin = self.origin_name(&mut cat, &rec);
        let name = self.full_name(&mut cat, &rec)?;
        Ok(VdiSummary::of(&rec, name, origin))
    }

    pub fn info(self: &Arc<Self>, full: &str) -> StoreResult<VdiInfo> {
        let (id, rec, handles, snapshots, name, origin) = {
            let mut cat = self.catalog.lock();
            let id = cat.resolve(&*self.dev, full)?;
            let rec = self.record_of(&mut cat, id)?;
            let handles = self.vdis.get(id).map_or(0, |v| v.handles());
            let snapshots = if rec.kind == Kind::Vdi {
                cat.scan_names(&*self.dev, &snapshot_prefix(id))?
                    .into_iter()
                    .map(|(k, _)| format!("{full}@{}", String::from_utf8_lossy(&k[9..])))
                    .collect()
            } else {
                Vec::new()
            };
            let name = self.full_name(&mut cat, &rec)?;
            let origin = self.origin_name(&mut cat, &rec);
            (id, rec, handles, snapshots, name, origin)
        };
        // Forks are newer than their snapshot: a walk of the records from its id on.
        let forks = if rec.kind == Kind::Snapshot {
            self.forks_of(id)?
        } else {
            Vec::new()
        };
        let usage = self
            .walk_live(id, |root, h| self.usage(root, h))?
            .ok_or_else(|| StoreError::NotFound(full.to_string()))?;
        Ok(VdiInfo {
            name,
            kind: rec.kind,
            id,
            size: rec.size,
            created: secs(rec.created_ns),
            allocated: usage.data * BLOCK_SIZE_U64,
            unique: usage.unique * BLOCK_SIZE_U64,
            shared: (usage.data - usage.unique) * BLOCK_SIZE_U64,
            metadata: usage.nodes * BLOCK_SIZE_U64,
            origin: origin.0,
            origin_deleted: origin.1,
            snapshots,
            forks,
            open_handles: handles,
            backing: self.backing_info(full)?,
        })
    }

    pub fn tree(&self) -> StoreResult<Vec<TreeNode>> {
        let recs = {
            let mut cat = self.catalog.lock();
            self.all_records(&mut cat)?
        };
        let by_id: HashMap<u64, &Record> = recs.iter().map(|r| (r.id, r)).collect();
        let mut snaps_of: BTreeMap<u64, Vec<&Record>> = BTreeMap::new();
        let mut forks_of: BTreeMap<u64, Vec<&Record>> = BTreeMap::new();
        let mut roots: Vec<&Record> = Vec::new();
        let mut orphaned: BTreeMap<String, Vec<&Record>> = BTreeMap::new();
        for r in &recs {
            match r.kind {
                Kind::Snapshot => snaps_of.entry(r.parent).or_default().push(r),
                Kind::Vdi if is_hidden(&r.name) => {}
                Kind::Vdi if r.origin == 0 => roots.push(r),
                Kind::Vdi if by_id.contains_key(&r.origin) => {
                    forks_of.entry(r.origin).or_default().push(r)
                }
                Kind::Vdi => orphaned.entry(r.origin_name.clone()).or_default().push(r),
            }
        }
        roots.sort_by(|a, b| a.name.cmp(&b.name));
        let mut out: Vec<TreeNode> = roots
            .into_iter()
            .map(|r| vdi_node(r, &snaps_of, &forks_of))
            .collect();
        for (origin, mut forks) in orphaned {
            forks.sort_by(|a, b| a.name.cmp(&b.name));
            out.push(TreeNode {
                name: origin,
                kind: Kind::Snapshot,
                size: forks.first().map_or(0, |f| f.size),
                deleted: true,
                children: forks
                    .into_iter()
                    .map(|f| vdi_node(f, &snaps_of, &forks_of))
                    .collect(),
            });
        }
        Ok(out)
    }

    pub fn df(self: &Arc<Self>) -> StoreResult<DfReport> {
        let generation = self.durable_generation();
        let (recs, registry_blocks) = {
            let mut cat = self.catalog.lock();
            let recs = self.all_records(&mut cat)?;
            (recs, cat.tree.blocks(&*self.dev)?.len() as u64)
        };
        let geo = self.geometry();
        let mut memo: HashMap<u64, u64> = HashMap::new();
        let mut logical = 0u64;
        for r in &recs {
            logical += self
                .walk_live(r.id, |root, h| self.count_data(root, h, &mut memo))?
                .unwrap_or(0);
        }
        let (caches, recs): (Vec<Record>, Vec<Record>) =
            recs.into_iter().partition(|r| is_hidden(&r.name));
        let mut cache_memo = HashMap::new();
        let mut remote_cache_bytes = 0;
        for c in &caches {
            remote_cache_bytes += self
                .walk_live(c.id, |root, h| self.count_data(root, h, &mut cache_memo))?
                .unwrap_or(0)
                * BLOCK_SIZE_U64;
        }
        let mut backed = Vec::new();
        for r in recs.iter().filter(|r| r.backing.is_some()) {
            let name = self.full_name(&mut self.catalog.lock(), r)?;
            let uri = r.backing.as_deref().unwrap_or_default();
            backed.push(self.backing_usage(&name, uri)?);
        }
        // What a cache holds is what its backed VDIs read: count it once.
        logical += remote_cache_bytes / BLOCK_SIZE_U64;
        let vdis = recs.iter().filter(|r| r.kind == Kind::Vdi).count() as u64;
        let dedup = self.dedup_usage()?;
        let space = self.space.lock();
        // Every allocated block is a map node, a registry node, an orphan-list block, or data
        // (including data still held by queued orphans).
        let meta_blocks = (memo.len() + cache_memo.len()) as u64
            + registry_blocks
            + dedup.index_bytes / BLOCK_SIZE_U64
            + space.orphans.chain.len() as u64;
        let allocated = space.rc.allocated();
        let stored_bytes = allocated.saturating_sub(meta_blocks) * BLOCK_SIZE_U64;
        Ok(DfReport {
            store_bytes: geo.total_blocks * BLOCK_SIZE_U64,
            capacity_bytes: geo.data_blocks() * BLOCK_SIZE_U64,
            used_bytes: allocated * BLOCK_SIZE_U64,
            // Blocks reserved for imminent writes count as free: the store takes them back
            // when it runs short.
            free_bytes: (space.rc.free() + space.rc.reserved()).saturating_sub(space.reserve())
                * BLOCK_SIZE_U64,
            reserved_bytes: space.reserve().min(space.rc.free()) * BLOCK_SIZE_U64,
            pending_bytes: space.rc.pending() * BLOCK_SIZE_U64,
            orphan_nodes: space.orphans.list.len() as u64,
            vdis,
            snapshots: recs.len() as u64 - vdis,
            provisioned_bytes: recs
                .iter()
                .filter(|r| r.kind == Kind::Vdi)
                .map(|r| r.size)
                .sum(),
            logical_bytes: logical * BLOCK_SIZE_U64,
            stored_bytes,
            sharing_ratio: if stored_bytes == 0 {
                1.0
            } else {
                (logical * BLOCK_SIZE_U64) as f64 / stored_bytes as f64
            },
            generation,
            format_version: self.format_version(),
            backed,
            remote_caches: caches.len() as u64,
            remote_cache_bytes,
            dedup,
        })
    }

    /// Runs `f` on the map of VDI or snapshot `id` as it is now, holding it still; `None` if
    /// it was deleted meanwhile. A walk must not start from a copied record (pointers to
    /// dirty nodes are followed through memory, valid only until the next checkpoint), and
    /// one that meets a node evicted under it starts over ([`retry_evicted`]).
    pub(super) fn walk_live<R>(
        &self,
        id: u64,
        mut f: impl FnMut(Ptr, u8) -> StoreResult<R>,
    ) -> StoreResult<Option<R>> {
        let v = {
            let mut cat = self.catalog.lock();
            match self.vdi_locked(&mut cat, id) {
                Ok(v) => v,
                Err(StoreError::NotFound(_)) => return Ok(None),
                Err(e) => return Err(e),
            }
        };
        let st = v.state.read();
        if st.deleted {
            return Ok(None);
        }
        retry_evicted(|| f(st.rec.root, st.rec.height)).map(Some)
    }

    fn refs(&self, addr: u64) -> StoreResult<u32> {
        self.space.lock().rc.get(&*self.dev, addr)
    }

    /// Data blocks under `root`, and how many of them only this tree references (every
    /// pointer on the path has refcount 1).
    pub(super) fn usage(&self, root: Ptr, height: u8) -> StoreResult<Usage> {
        let mut u = Usage {
            data: 0,
            unique: 0,
            nodes: 0,
        };
        self.usage_rec(root, height, true, &mut u)?;
        Ok(u)
    }

    fn usage_rec(&self, p: Ptr, level: u8, exclusive: bool, u: &mut Usage) -> StoreResult<()> {
        if !p.is_block() {
            return Ok(());
        }
        let exclusive = exclusive && self.refs(p.addr())? == 1;
        if level == 0 {
            u.data += 1;
            u.unique += exclusive as u64;
            return Ok(());
        }
        u.nodes += 1;
        let node = self.nodes.fetch(&*self.dev, p)?;
        if level == 1 && !exclusive {
            u.data += node.entries().filter(|c| c.is_block()).count() as u64;
            return Ok(());
        }
        for c in node.entries() {
            self.usage_rec(c, level - 1, exclusive, u)?;
        }
        Ok(())
    }

    /// Data blocks mapped under `p`, memoised per node (so `memo` ends up holding every
    /// distinct map node).
    fn count_data(&self, p: Ptr, level: u8, memo: &mut HashMap<u64, u64>) -> StoreResult<u64> {
        if !p.is_block() {
            return Ok(0);
        }
        if level == 0 {
            return Ok(1);
        }
        if let Some(&n) = memo.get(&p.addr()) {
            return Ok(n);
        }
        let node = self.nodes.fetch(&*self.dev, p)?;
        let mut n = 0;
        debug_assert_eq!(node.entries().count(), FANOUT);
        for c in node.entries() {
            n += self.count_data(c, level - 1, memo)?;
        }
        memo.insert(p.addr(), n);
        Ok(n)
    }
}

pub(super) struct Usage {
    pub data: u64,
    pub unique: u64,
    pub nodes: u64,
}

/// The tree node of VDI `r`: its snapshots (oldest first), each with its forks.
pub(super) fn vdi_node(
    r: &Record,
    snaps_of: &BTreeMap<u64, Vec<&Record>>,
    forks_of: &BTreeMap<u64, Vec<&Record>>,
) -> TreeNode {
    let mut snaps: Vec<&&Record> = snaps_of
        .get(&r.id)
        .map(|v| v.iter().collect())
        .unwrap_or_default();
    snaps.sort_by_key(|s| s.created_ns);
    TreeNode {
        name: r.name.clone(),
        kind: Kind::Vdi,
        size: r.size,
        deleted: false,
        children: snaps
            .into_iter()
            .map(|s| snapshot_node(&r.name, s, snaps_of, forks_of))
            .collect(),
    }
}

/// The tree node of snapshot `s` of VDI `vdi`: its forks by name, each with its own tree.
pub(super) fn snapshot_node(
    vdi: &str,
    s: &Record,
    snaps_of: &BTreeMap<u64, Vec<&Record>>,
    forks_of: &BTreeMap<u64, Vec<&Record>>,
) -> TreeNode {
    let mut forks: Vec<&&Record> = forks_of
        .get(&s.id)
        .map(|v| v.iter().collect())
        .unwrap_or_default();
    forks.sort_by(|a, b| a.name.cmp(&b.name));
    TreeNode {
        name: format!("{vdi}@{}", s.name),
        kind: Kind::Snapshot,
        size: s.size,
        deleted: false,
        children: forks
            .into_iter()
            .map(|f| vdi_node(f, snaps_of, forks_of))
            .collect(),
    }
}
