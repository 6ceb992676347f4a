//! Every change to the store's state, applied the one way both live operations and log replay
//! use: the data path (io.rs) and admin operations (admin.rs) validate, pick ids, write data
//! blocks, then apply here and append the log entry under the same locks; recovery (replay.rs)
//! applies the logged entries through the same functions.
//!
//! Callers hold a [`Change`](super::store::Change) (the gate, shared); functions that take a
//! [`Catalog`] expect it locked. Entries read back from the log are checked like any other
//! input: one that does not fit the store is `Corrupt`, never a panic.

use std::sync::Arc;

use super::{
    catalog::Catalog,
    error::{StoreError, StoreResult},
    format::{height_for, Ptr, MAX_VDI_BYTES},
    log::{Entry, MAX_WRITE_PTRS},
    nodes::{Node, UNSET},
    radix::Tx,
    registry::{name_key, snapshot_key, validate_name, Kind, Record},
    schedules::{schedule_key, validate_target, Schedule},
    staging::validate_stored_name,
    store::Store,
    vdi::{Vdi, VdiState},
};

/// Most ids in one delete entry (so that it fits a log block).
const MAX_DELETE_IDS: usize = 500;

fn id_bytes(id: u64) -> Option<Vec<u8>> {
    Some(id.to_le_bytes().to_vec())
}

fn bad(what: String) -> StoreError {
    StoreError::Corrupt(format!("log entry cannot apply: {what}"))
}

impl Store {
    /// The loaded VDI `id`, with the catalog already locked by the caller.
    pub(super) fn vdi_locked(&self, cat: &mut Catalog, id: u64) -> StoreResult<Arc<Vdi>> {
        if let Some(v) = self.vdis.get(id) {
            return Ok(v);
        }
        let rec = cat
            .record(&*self.dev, id)?
            .ok_or_else(|| StoreError::NotFound(format!("id {id}")))?;
        Ok(self.vdis.insert(Vdi::new(rec, false)))
    }

    /// Adds a new VDI or snapshot to the loaded set, as a change of the open generation.
    fn add_vdi(&self, rec: Record) {
        let v = self.vdis.insert(Vdi::new(rec, true));
        self.vdis.note_changed(&v);
        self.mark_changed();
    }

    /// Marks a loaded VDI's record changed (with its state write-locked).
    pub(super) fn touch(&self, v: &Arc<Vdi>, st: &mut VdiState) {
        if !st.changed {
            st.changed = true;
            self.vdis.note_changed(v);
        }
        self.mark_changed();
    }

    /// Points blocks from `lba` at `new` (reserved blocks, holes or zeros), claims the blocks
    /// (entering them in the dedup index) and drops the references of what the entries
    /// pointed at; logs each run applied. With `shared`, the blocks are ones already in use
    /// (found by dedup), and each gets one more reference instead. In a remote-backed VDI,
    /// where a hole means "the remote's bytes", holes are recorded as zeros.
    pub(super) fn set_map(
        &self,
        vdi: &Arc<Vdi>,
        st: &mut VdiState,
        tx: &mut Tx,
        lba: u64,
        new: &[Ptr],
        shared: bool,
    ) -> StoreResult<()> {
        let as_zeros: Vec<Ptr>;
        let new = if st.rec.backing.is_some() && new.iter().any(Ptr::is_hole) {
            as_zeros = new
                .iter()
                .map(|p| if p.is_hole() { Ptr::ZERO } else { *p })
                .collect();
            &as_zeros[..]
        } else {
            new
        };
        let height = st.rec.height;
        let blocks = st.rec.size.div_ceil(4096);
        if lba.checked_add(new.len() as u64).is_none_or(|e| e > blocks) {
            return Err(bad(format!(
                "blocks {lba}+{} outside VDI {}",
                new.len(),
                vdi.id
            )));
        }
        let mut old = Vec::with_capacity(new.len());
        let mut done = 0;
        let mut result = Ok(());
        while done < new.len() {
            let mut root = st.rec.root;
            let r = tx.set_run(&mut root, height, lba + done as u64, &new[done..], &mut old);
            st.rec.root = root;
            let n = match r {
                Ok(n) => n,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            for p in new[done..done + n].iter().filter(|p| p.is_block()) {
                if shared {
                    if tx.space.rc.get(tx.dev, p.addr())? == 0 {
                        return Err(bad(format!("sharing free block {}", p.addr())));
                    }
                    tx.space.rc.incr(tx.dev, p.addr())?;
                } else {
                    tx.space.rc.claim(tx.dev, p.addr())?;
                    tx.space.dedup.claimed(p.hash, p.addr());
                }
            }
            for (k, chunk) in new[done..done + n].chunks(MAX_WRITE_PTRS).enumerate() {
                self.log.append(&Entry::Write {
                    vdi: vdi.id,
                    lba: lba + (done + k * MAX_WRITE_PTRS) as u64,
                    ptrs: chunk.to_vec(),
                    shared,
                });
            }
            done += n;
        }
        self.touch(vdi, st);
        result?;
        for p in old {
            tx.drop_ref(p, 0)?;
        }
        Ok(())
    }

    /// Makes blocks `first..end` all holes (or recorded zeros; always, in a remote-backed
    /// VDI).
    pub(super) fn fill_map(
        &self,
        vdi: &Arc<Vdi>,
        st: &mut VdiState,
        tx: &mut Tx,
        first: u64,
        end: u64,
        zero: bool,
    ) -> StoreResult<()> {
        let zero = zero || st.rec.backing.is_some();
        if first > end || end > st.rec.size.div_ceil(4096) {
            return Err(bad(format!("blocks {first}..{end} outside VDI {}", vdi.id)));
        }
        let fill = if zero { Ptr::ZERO } else { Ptr::HOLE };
        let (mut root, height) = (st.rec.root, st.rec.height);
        let r = tx.fill_range(&mut root, height, first, end, fill);
        st.rec.root = root;
        self.touch(vdi, st);
        r?;
        self.log.append(&Entry::Fill {
            vdi: vdi.id,
            start: first,
            end,
            zero,
        });
        Ok(())
    }

    pub(super) fn apply_create(
        &self,
        cat: &mut Catalog,
        id: u64,
        name: &str,
        size: u64,
        created: u64,
    ) -> StoreResult<()> {
        validate_stored_name(name)?;
        if size == 0 || size > MAX_VDI_BYTES || cat.resolve(&*self.dev, name).is_ok() {
            return Err(bad(format!("create {name}")));
        }
        cat.next_id = cat.next_id.max(id + 1);
        cat.set_name(&*self.dev, name_key(name), id_bytes(id))?;
        self.add_vdi(Record {
            kind: Kind::Vdi,
            height: height_for(size),
            id,
            size,
            root: Ptr::HOLE,
            created_ns: created,
            parent: 0,
            origin: 0,
            name: name.to_string(),
            origin_name: String::new(),
            guid: 0,
            backing: None,
        });
        self.log.append(&Entry::Create {
            id,
            size,
            created,
            name: name.to_string(),
        });
        Ok(())
    }

    pub(super) fn apply_snapshot(
        &self,
        cat: &mut Catalog,
        vdi: u64,
        sid: u64,
        name: &str,
        created: u64,
        guid: u64,
    ) -> StoreResult<()> {
        validate_name(name, "snapshot")?;
        let v = self.vdi_locked(cat, vdi)?;
        let st = v.state.read();
        if st.rec.kind != Kind::Vdi
            || st.deleted
            || cat
                .get_name(&*self.dev, &snapshot_key(vdi, name))?
                .is_some()
        {
            return Err(bad(format!("snapshot {name} of {vdi}")));
        }
        if st.rec.root.is_block() {
            self.space.lock().rc.incr(&*self.dev, st.rec.root.addr())?;
        }
        let rec = Record {
            kind: Kind::Snapshot,
            id: sid,
            parent: vdi,
            origin: 0,
            created_ns: created,
            name: name.to_string(),
            origin_name: String::new(),
            guid,
            ..st.rec.clone()
        };
        cat.next_id = cat.next_id.max(sid + 1);
        cat.set_name(&*self.dev, snapshot_key(vdi, name), id_bytes(sid))?;
        self.add_vdi(rec);
        // Appended before the VDI's lock goes: a write that changes the VDI after the
        // snapshot copied its record must come after the snapshot in the log too (replay
        // would put it into the snapshot otherwise).
        self.log.append(&Entry::Snapshot {
            vdi,
            id: sid,
            created,
            name: name.to_string(),
            guid,
        });
        drop(st);
        Ok(())
    }

    pub(super) fn apply_fork(
        &self,
        cat: &mut Catalog,
        sid: u64,
        id: u64,
        name: &str,
        origin_name: &str,
        created: u64,
    ) -> StoreResult<()> {
        validate_stored_name(name)?;
        let s = self.vdi_locked(cat, sid)?;
        let snap = s.state.read().rec.clone();
        if snap.kind != Kind::Snapshot || cat.resolve(&*self.dev, name).is_ok() {
            return Err(bad(format!("fork {name} of {sid}")));
        }
        if snap.root.is_block() {
            self.space.lock().rc.incr(&*self.dev, snap.root.addr())?;
        }
        cat.next_id = cat.next_id.max(id + 1);
        cat.set_name(&*self.dev, name_key(name), id_bytes(id))?;
        self.add_vdi(Record {
            kind: Kind::Vdi,
            id,
            parent: 0,
            origin: sid,
            created_ns: created,
            name: name.to_string(),
            origin_name: origin_name.to_string(),
            guid: 0,
            ..snap
        });
        self.log.append(&Entry::Fork {
            snapshot: sid,
            id,
            created,
            name: name.to_string(),
            origin_name: origin_name.to_string(),
        });
        Ok(())
    }

    /// Renames VDI `id` to `name`, or snapshot `id` to `name` within its VDI.
    pub(super) fn apply_rename(&self, cat: &mut Catalog, id: u64, name: &str) -> StoreResult<()> {
        let v = self.vdi_locked(cat, id)?;
        let mut st = v.state.write();
        match st.rec.kind {
            Kind::Vdi => {
                validate_stored_name(name)?;
                if cat.resolve(&*self.dev, name).is_ok() {
                    return Err(StoreError::Exists(format!("VDI {name}")));
                }
                cat.set_name(&*self.dev, name_key(&st.rec.name), None)?;
                cat.set_name(&*self.dev, name_key(name), id_bytes(id))?;
            }
            Kind::Snapshot => {
                validate_name(name, "snapshot")?;
                let parent = st.rec.parent;
                if cat
                    .get_name(&*self.dev, &snapshot_key(parent, name))?
                    .is_some()
                {
                    return Err(StoreError::Exists(format!("snapshot {name}")));
                }
                cat.set_name(&*self.dev, snapshot_key(parent, &st.rec.name), None)?;
                cat.set_name(&*self.dev, snapshot_key(parent, name), id_bytes(id))?;
            }
        }
        st.rec.name = name.to_string();
        self.touch(&v, &mut st);
        self.log.append(&Entry::Rename {
            id,
            name: name.to_string(),
        });
        Ok(())
    }

    /// Grows VDI `id` to `size` bytes (new root levels above the old root).
    pub(super) fn apply_resize(
        &self,
        cat: &mut Catalog,
        id: u64,
        size: u64,
        gen: u64,
    ) -> StoreResult<()> {
        let v = self.vdi_locked(cat, id)?;
        let mut st = v.state.write();
        if st.rec.kind != Kind::Vdi || size < st.rec.size || size > MAX_VDI_BYTES {
            return Err(bad(format!("resize {id} to {size}")));
        }
        let height = height_for(size);
        while st.rec.height < height {
            if !st.rec.root.is_hole() {
                // A new root whose first entry is the old root (its reference moves there).
                let addr = self.space.lock().alloc_meta(&*self.dev)?;
                let mut node = Node::filled(Ptr::HOLE);
                node.set(0, st.rec.root);
                self.nodes.insert_dirty(addr, gen, st.rec.height + 1, node);
                st.rec.root = Ptr::block(addr, UNSET);
            }
            st.rec.height += 1;
        }
        st.rec.size = size;
        self.touch(&v, &mut st);
        self.log.append(&Entry::Resize { id, size });
        Ok(())
    }

    /// Deletes VDIs and snapshots `ids`, in order (a VDI's snapshots before it). Returns their
    /// full names.
    pub(super) fn apply_delete(
        &self,
        cat: &mut Catalog,
        ids: &[u64],
        gen: u64,
    ) -> StoreResult<Vec<String>> {
        let mut names = Vec::with_capacity(ids.len());
        for &id in ids {
            let v = self.vdi_locked(cat, id)?;
            let r = v.state.read().rec.clone();
            let name = match r.kind {
                Kind::Vdi => {
                    cat.set_name(&*self.dev, name_key(&r.name), None)?;
                    r.name.clone()
                }
                Kind::Snapshot => {
                    cat.set_name(&*self.dev, snapshot_key(r.parent, &r.name), None)?;
                    let parent = self
                        .vdi_locked(cat, r.parent)
                        .map(|p| p.state.read().rec.name.clone())
                        .unwrap_or_else(|_| "?".into());
                    format!("{parent}@{}", r.name)
                }
            };
            let mut st = v.state.write();
            if st.deleted {
                return Err(bad(format!("delete {id} twice")));
            }
            st.deleted = true;
            let root = std::mem::replace(&mut st.rec.root, Ptr::HOLE);
            self.touch(&v, &mut st);
            drop(st);
            let mut space = self.space.lock();
            self.tx(&mut space, gen).drop_ref(root, r.height)?;
            names.push(name);
        }
        for chunk in ids.chunks(MAX_DELETE_IDS) {
            self.log.append(&Entry::Delete {
                ids: chunk.to_vec(),
            });
        }
        Ok(names)
    }

    /// Makes VDI `vdi` read as its snapshot `sid` again: the snapshot's map, size and height
    /// (the snapshot stays). Handles open on the VDI are detached: their next I/O fails.
    pub(super) fn apply_rollback(
        &self,
        cat: &mut Catalog,
        vdi: u64,
        sid: u64,
        gen: u64,
    ) -> StoreResult<()> {
        let s = self.vdi_locked(cat, sid)?;
        let (snap, snap_deleted) = {
            let st = s.state.read();
            (st.rec.clone(), st.deleted)
        };
        let v = self.vdi_locked(cat, vdi)?;
        let mut st = v.state.write();
        if snap.kind != Kind::Snapshot
            || snap.parent != vdi
            || snap_deleted
            || st.rec.kind != Kind::Vdi
            || st.deleted
        {
            return Err(bad(format!("rollback {vdi} to {sid}")));
        }
        if snap.root.is_block() {
            self.space.lock().rc.incr(&*self.dev, snap.root.addr())?;
        }
        let old = std::mem::replace(&mut st.rec.root, snap.root);
        let old_height = std::mem::replace(&mut st.rec.height, snap.height);
        st.rec.size = snap.size;
        st.detached += 1;
        self.touch(&v, &mut st);
        let mut space = self.space.lock();
        self.tx(&mut space, gen).drop_ref(old, old_height)?;
        // Before the VDI's lock goes, so that no write to it comes between (as for a
        // snapshot).
        self.log.append(&Entry::Rollback { vdi, snapshot: sid });
        drop(space);
        drop(st);
        Ok(())
    }

    /// Makes VDI `id` read through `uri` where its map has holes, or (`None`) stop doing so.
    pub(super) fn apply_backing(
        &self,
        cat: &mut Catalog,
        id: u64,
        uri: Option<String>,
    ) -> StoreResult<()> {
        let v = self.vdi_locked(cat, id)?;
        let mut st = v.state.write();
        if st.rec.kind != Kind::Vdi || st.deleted || uri.as_ref().is_some_and(|u| u.is_empty()) {
            return Err(bad(format!("backing of {id}")));
        }
        st.rec.backing.clone_from(&uri);
        self.touch(&v, &mut st);
        self.log.append(&Entry::Backing { id, uri });
        Ok(())
    }

    /// Sets (`Some`) or removes (`None`) the snapshot schedule of `target`.
    pub(super) fn apply_schedule(
        &self,
        cat: &mut Catalog,
        target: &str,
        schedule: Option<&Schedule>,
    ) -> StoreResult<()> {
        validate_target(target).map_err(|e| bad(format!("schedule: {e}")))?;
        if let Some(s) = schedule {
            s.validate().map_err(|e| bad(format!("schedule: {e}")))?;
        }
        cat.set_name(
            &*self.dev,
            schedule_key(target),
            schedule.map(Schedule::encode),
        )?;
        self.mark_changed();
        self.log.append(&Entry::Schedule {
            target: target.to_string(),
            schedule: schedule.cloned(),
        });
        Ok(())
    }
}
