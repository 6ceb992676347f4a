//! Managing VDIs: create, snapshot, fork, rename, resize, delete; and the reports operators
//! read (list, info, tree, df) and `gc`. Every change is committed before the call returns,
//! so a snapshot that returned is durable.
//!
//! The report types are serialisable: the CLI prints them (or `--json`), and the daemon's
//! control socket carries them.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::{
    engine::{now_ns, Meta, Store, VdiState},
    error::{StoreError, StoreResult},
    format::{height_for, Ptr, BLOCK_SIZE_U64, FANOUT, MAX_VDI_BYTES},
    node::Node,
    refcount::Cursor,
    registry::{
        decode_id, name_key, record_key, snapshot_key, snapshot_prefix, split_name, validate_name,
        Kind, Record,
    },
};

/// One line of `vdi list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdiSummary {
    pub name: String,
    pub kind: Kind,
    pub size: u64,
    /// Creation time, Unix seconds.
    pub created: u64,
    /// For forks: the snapshot they came from.
    pub origin: Option<String>,
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
    pub snapshots: Vec<String>,
    pub forks: Vec<String>,
    pub open_handles: usize,
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
    /// Data bytes all VDIs and snapshots map, counting shared blocks once per mapping.
    pub logical_bytes: u64,
    /// Data bytes actually stored for them.
    pub stored_bytes: u64,
    /// logical / stored: what sharing (snapshots, forks, dedup) saves.
    pub sharing_ratio: f64,
    pub generation: u64,
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
}

/// What `vdi delete` removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteReport {
    pub deleted: Vec<String>,
}

/// Finds the id of `NAME` or `NAME@SNAP`.
pub fn resolve(m: &mut Meta, full: &str) -> StoreResult<u64> {
    let (vdi, snap) = split_name(full)?;
    let dev = m.dev.clone();
    let id = match m.registry.get(&*dev, &name_key(vdi))? {
        Some(v) => decode_id(&v)?,
        None => return Err(StoreError::NotFound(full.to_string())),
    };
    match snap {
        None => Ok(id),
        Some(s) => match m.registry.get(&*dev, &snapshot_key(id, s))? {
            Some(v) => decode_id(&v),
            None => Err(StoreError::NotFound(full.to_string())),
        },
    }
}

fn full_name(m: &mut Meta, rec: &Record) -> StoreResult<String> {
    Ok(match rec.kind {
        Kind::Vdi => rec.name.clone(),
        Kind::Snapshot => format!("{}@{}", m.vdi(rec.parent)?.rec.name, rec.name),
    })
}

/// What a fork's origin is called now (it may have been renamed since the fork), or the name
/// it had at fork time if it has been deleted since.
fn origin_name(m: &mut Meta, rec: &Record) -> Option<String> {
    if rec.origin == 0 {
        return None;
    }
    let current = match m.vdi(rec.origin) {
        Ok(v) => {
            let o = v.rec.clone();
            full_name(m, &o).ok()
        }
        Err(_) => None,
    };
    Some(current.unwrap_or_else(|| rec.origin_name.clone()))
}

fn put_record(m: &mut Meta, rec: Record) -> StoreResult<()> {
    let enc = rec.encode();
    let id = rec.id;
    let (tree, mut ctx) = m.btree_ctx();
    tree.insert(&mut ctx, &record_key(id), &enc)?;
    match m.vdis.get_mut(&id) {
        Some(v) => {
            v.rec = rec;
            v.dirty = true;
        }
        None => {
            m.vdis.insert(
                id,
                VdiState {
                    rec,
                    dirty: true,
                    cursor: Cursor::default(),
                    handles: 0,
                },
            );
        }
    }
    m.changed = true;
    Ok(())
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

fn secs(ns: u64) -> u64 {
    ns / 1_000_000_000
}

impl Store {
    fn all_records(m: &mut Meta) -> StoreResult<Vec<Record>> {
        let dev = m.dev.clone();
        let mut out = Vec::new();
        for (_, v) in m.registry.scan(&*dev, b"R")? {
            let rec = Record::decode(&v)?;
            // The in-memory record is newer (its root may have moved since the last commit).
            out.push(m.vdis.get(&rec.id).map(|s| s.rec.clone()).unwrap_or(rec));
        }
        Ok(out)
    }

    /// Creates an empty VDI.
    pub fn create_vdi(&self, name: &str, size: u64) -> StoreResult<()> {
        validate_name(name, "VDI")?;
        check_size(size)?;
        self.check_writable()?;
        {
            let mut m = self.meta.lock();
            if resolve(&mut m, name).is_ok() {
                return Err(StoreError::Exists(format!("VDI {name}")));
            }
            let id = m.next_id;
            m.next_id += 1;
            let rec = Record {
                kind: Kind::Vdi,
                height: height_for(size),
                id,
                size,
                root: Ptr::HOLE,
                created_ns: now_ns(),
                parent: 0,
                origin: 0,
                name: name.to_string(),
                origin_name: String::new(),
            };
            let (tree, mut ctx) = m.btree_ctx();
            tree.insert(&mut ctx, &name_key(name), &id.to_le_bytes())?;
            put_record(&mut m, rec)?;
        }
        self.flush()
    }

    /// Freezes VDI `vdi` as `vdi@snap`, in O(1); durable when this returns.
    pub fn snapshot(&self, vdi: &str, snap: &str) -> StoreResult<()> {
        validate_name(snap, "snapshot")?;
        self.check_writable()?;
        {
            let mut m = self.meta.lock();
            let (_, s) = split_name(vdi)?;
            if s.is_some() {
                return Err(StoreError::Invalid(format!(
                    "{vdi} is a snapshot; fork it (`vdi fork {vdi} NEW`) and snapshot the fork"
                )));
            }
            let id = resolve(&mut m, vdi)?;
            let dev = m.dev.clone();
            if m.registry.get(&*dev, &snapshot_key(id, snap))?.is_some() {
                return Err(StoreError::Exists(format!("snapshot {vdi}@{snap}")));
            }
            let src = m.vdi(id)?.rec.clone();
            let sid = m.next_id;
            m.next_id += 1;
            if src.root.is_block() {
                m.rc.incr(&*dev, src.root.addr())?;
            }
            let rec = Record {
                kind: Kind::Snapshot,
                id: sid,
                parent: id,
                origin: 0,
                created_ns: now_ns(),
                name: snap.to_string(),
                origin_name: String::new(),
                ..src
            };
            let (tree, mut ctx) = m.btree_ctx();
            tree.insert(&mut ctx, &snapshot_key(id, snap), &sid.to_le_bytes())?;
            put_record(&mut m, rec)?;
        }
        self.flush()
    }

    /// Makes `new`, a writable copy of snapshot `src` (`NAME@SNAP`), in O(1).
    pub fn fork(&self, src: &str, new: &str) -> StoreResult<()> {
        validate_name(new, "VDI")?;
        self.check_writable()?;
        {
            let mut m = self.meta.lock();
            if split_name(src)?.1.is_none() {
                return Err(StoreError::Invalid(format!(
                    "forks are made from snapshots: take one first (`vdi snapshot {src} SNAP`), then `vdi fork {src}@SNAP {new}`"
                )));
            }
            let sid = resolve(&mut m, src)?;
            if resolve(&mut m, new).is_ok() {
                return Err(StoreError::Exists(format!("VDI {new}")));
            }
            let snap = m.vdi(sid)?.rec.clone();
            let id = m.next_id;
            m.next_id += 1;
            let dev = m.dev.clone();
            if snap.root.is_block() {
                m.rc.incr(&*dev, snap.root.addr())?;
            }
            let rec = Record {
                kind: Kind::Vdi,
                id,
                parent: 0,
                origin: sid,
                created_ns: now_ns(),
                name: new.to_string(),
                origin_name: src.to_string(),
                ..snap
            };
            let (tree, mut ctx) = m.btree_ctx();
            tree.insert(&mut ctx, &name_key(new), &id.to_le_bytes())?;
            put_record(&mut m, rec)?;
        }
        self.flush()
    }

    /// Renames a VDI (its snapshots follow), or a snapshot within its VDI.
    pub fn rename(&self, old: &str, new: &str) -> StoreResult<()> {
        self.check_writable()?;
        {
            let mut m = self.meta.lock();
            let id = resolve(&mut m, old)?;
            let mut rec = m.vdi(id)?.rec.clone();
            match (split_name(old)?, split_name(new)?) {
                ((_, None), (nv, None)) => {
                    validate_name(nv, "VDI")?;
                    if resolve(&mut m, nv).is_ok() {
                        return Err(StoreError::Exists(format!("VDI {nv}")));
                    }
                    let (tree, mut ctx) = m.btree_ctx();
                    tree.remove(&mut ctx, &name_key(&rec.name))?;
                    tree.insert(&mut ctx, &name_key(nv), &id.to_le_bytes())?;
                    rec.name = nv.to_string();
                }
                ((ov, Some(_)), (nv, Some(ns))) if ov == nv => {
                    validate_name(ns, "snapshot")?;
                    if resolve(&mut m, new).is_ok() {
                        return Err(StoreError::Exists(format!("snapshot {new}")));
                    }
                    let (tree, mut ctx) = m.btree_ctx();
                    tree.remove(&mut ctx, &snapshot_key(rec.parent, &rec.name))?;
                    tree.insert(&mut ctx, &snapshot_key(rec.parent, ns), &id.to_le_bytes())?;
                    rec.name = ns.to_string();
                }
                _ => {
                    return Err(StoreError::Invalid(format!(
                    "cannot rename {old} to {new}: rename a VDI to a VDI name, or NAME@A to NAME@B"
                )))
                }
            }
            put_record(&mut m, rec)?;
        }
        self.flush()
    }

    /// Grows a VDI to `size` bytes (the new space reads as zeros).
    pub fn resize(&self, name: &str, size: u64) -> StoreResult<()> {
        check_size(size)?;
        self.check_writable()?;
        {
            let mut m = self.meta.lock();
            if split_name(name)?.1.is_some() {
                return Err(StoreError::ReadOnly(format!("snapshot {name}")));
            }
            let id = resolve(&mut m, name)?;
            let mut rec = m.vdi(id)?.rec.clone();
            if size < rec.size {
                return Err(StoreError::Invalid(format!(
                    "{name} is {} bytes; VDIs only grow (shrinking could cut off a guest's data)",
                    rec.size
                )));
            }
            let height = height_for(size);
            while rec.height < height {
                if !rec.root.is_hole() {
                    // A new root whose first entry is the old root (its reference moves there).
                    let addr = m.alloc_meta()?;
                    let mut node = Node::filled(Ptr::HOLE);
                    node.set(0, rec.root);
                    m.nodes.dirty.insert(addr, node);
                    rec.root = Ptr::block(addr, [0; 24]);
                }
                rec.height += 1;
            }
            rec.size = size;
            put_record(&mut m, rec)?;
        }
        self.flush()
    }

    /// Deletes a VDI (with `recursive`, its snapshots too) or a snapshot. Forks of a deleted
    /// snapshot keep everything they share with it. Space is reclaimed by the orphan worker
    /// (the daemon, each commit) or `gc`.
    pub fn delete(&self, full: &str, recursive: bool) -> StoreResult<DeleteReport> {
        self.check_writable()?;
        let mut deleted = Vec::new();
        {
            let mut m = self.meta.lock();
            let id = resolve(&mut m, full)?;
            let rec = m.vdi(id)?.rec.clone();
            let mut victims = Vec::new();
            if rec.kind == Kind::Vdi {
                let dev = m.dev.clone();
                let snaps = m.registry.scan(&*dev, &snapshot_prefix(id))?;
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
            for &v in &victims {
                let s = m.vdi(v)?;
                if s.handles > 0 {
                    let n = s.handles;
                    let rec = s.rec.clone();
                    let what = full_name(&mut m, &rec)?;
                    return Err(StoreError::Busy(format!(
                        "{what} is in use ({n} open handle(s)); disconnect its clients first"
                    )));
                }
            }
            for v in victims {
                let r = m.vdi(v)?.rec.clone();
                let name = full_name(&mut m, &r)?;
                let (tree, mut ctx) = m.btree_ctx();
                match r.kind {
                    Kind::Vdi => tree.remove(&mut ctx, &name_key(&r.name))?,
                    Kind::Snapshot => tree.remove(&mut ctx, &snapshot_key(r.parent, &r.name))?,
                };
                tree.remove(&mut ctx, &record_key(v))?;
                m.vdis.remove(&v);
                m.drop_ref(r.root, r.height)?;
                m.changed = true;
                deleted.push(name);
            }
        }
        self.flush()?;
        Ok(DeleteReport { deleted })
    }

    /// Reclaims everything deleted or discarded: takes every queued orphan node apart and
    /// commits. `progress` is told how many orphans are left after each round.
    pub fn gc(&self, progress: &mut dyn FnMut(u64)) -> StoreResult<GcReport> {
        self.check_writable()?;
        let before = self.meta.lock().rc.free();
        let mut processed = 0u64;
        loop {
            let (n, left) = {
                let mut m = self.meta.lock();
                let n = m.process_orphans(4096)?;
                if n > 0 {
                    m.changed = true;
                }
                (n, m.orphans.len() as u64)
            };
            processed += n as u64;
            progress(left);
            self.commit_if_changed()?;
            if n == 0 || left == 0 {
                break;
            }
        }
        // One more commit releases what the last round freed.
        self.commit_if_changed()?;
        let after = self.meta.lock().rc.free();
        Ok(GcReport {
            orphan_nodes_processed: processed,
            freed_bytes: after.saturating_sub(before) * BLOCK_SIZE_U64,
            free_bytes: self.free_blocks() * BLOCK_SIZE_U64,
        })
    }

    pub fn list(&self) -> StoreResult<Vec<VdiSummary>> {
        let mut m = self.meta.lock();
        let mut recs = Self::all_records(&mut m)?;
        recs.sort_by_key(|r| r.id);
        let vdi_names: HashMap<u64, &str> = recs
            .iter()
            .filter(|r| r.kind == Kind::Vdi)
            .map(|r| (r.id, r.name.as_str()))
            .collect();
        let full = |r: &Record| match r.kind {
            Kind::Vdi => r.name.clone(),
            Kind::Snapshot => {
                format!(
                    "{}@{}",
                    vdi_names.get(&r.parent).copied().unwrap_or("?"),
                    r.name
                )
            }
        };
        let names: HashMap<u64, String> = recs.iter().map(|r| (r.id, full(r))).collect();
        let mut out: Vec<VdiSummary> = recs
            .iter()
            .map(|r| VdiSummary {
                name: names[&r.id].clone(),
                kind: r.kind,
                size: r.size,
                created: secs(r.created_ns),
                // The origin's current name (forks outlive renames and deletions).
                origin: (r.origin != 0).then(|| {
                    names
                        .get(&r.origin)
                        .cloned()
                        .unwrap_or_else(|| r.origin_name.clone())
                }),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Name, kind, size, origin of one VDI or snapshot, without walking its map.
    pub fn stat(&self, full: &str) -> StoreResult<VdiSummary> {
        let mut m = self.meta.lock();
        let id = resolve(&mut m, full)?;
        let rec = m.vdi(id)?.rec.clone();
        Ok(VdiSummary {
            name: full_name(&mut m, &rec)?,
            kind: rec.kind,
            size: rec.size,
            created: secs(rec.created_ns),
            origin: origin_name(&mut m, &rec),
        })
    }

    pub fn info(&self, full: &str) -> StoreResult<VdiInfo> {
        let mut m = self.meta.lock();
        let id = resolve(&mut m, full)?;
        let v = m.vdi(id)?;
        let rec = v.rec.clone();
        let handles = v.handles;
        let usage = usage(&mut m, rec.root, rec.height)?;
        let dev = m.dev.clone();
        let snapshots = if rec.kind == Kind::Vdi {
            m.registry
                .scan(&*dev, &snapshot_prefix(id))?
                .into_iter()
                .map(|(k, _)| format!("{full}@{}", String::from_utf8_lossy(&k[9..])))
                .collect()
        } else {
            Vec::new()
        };
        let forks = if rec.kind == Kind::Snapshot {
            Self::all_records(&mut m)?
                .into_iter()
                .filter(|r| r.origin == id)
                .map(|r| r.name)
                .collect()
        } else {
            Vec::new()
        };
        Ok(VdiInfo {
            name: full_name(&mut m, &rec)?,
            kind: rec.kind,
            id,
            size: rec.size,
            created: secs(rec.created_ns),
            allocated: usage.data * BLOCK_SIZE_U64,
            unique: usage.unique * BLOCK_SIZE_U64,
            shared: (usage.data - usage.unique) * BLOCK_SIZE_U64,
            metadata: usage.nodes * BLOCK_SIZE_U64,
            origin: origin_name(&mut m, &rec),
            snapshots,
            forks,
            open_handles: handles,
        })
    }

    pub fn tree(&self) -> StoreResult<Vec<TreeNode>> {
        let mut m = self.meta.lock();
        let recs = Self::all_records(&mut m)?;
        let by_id: HashMap<u64, &Record> = recs.iter().map(|r| (r.id, r)).collect();
        let mut snaps_of: BTreeMap<u64, Vec<&Record>> = BTreeMap::new();
        let mut forks_of: BTreeMap<u64, Vec<&Record>> = BTreeMap::new();
        let mut roots: Vec<&Record> = Vec::new();
        let mut orphaned: BTreeMap<String, Vec<&Record>> = BTreeMap::new();
        for r in &recs {
            match r.kind {
                Kind::Snapshot => snaps_of.entry(r.parent).or_default().push(r),
                Kind::Vdi if r.origin == 0 => roots.push(r),
                Kind::Vdi if by_id.contains_key(&r.origin) => {
                    forks_of.entry(r.origin).or_default().push(r)
                }
                Kind::Vdi => orphaned.entry(r.origin_name.clone()).or_default().push(r),
            }
        }
        fn vdi_node(
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
                    .map(|s| {
                        let mut forks: Vec<&&Record> = forks_of
                            .get(&s.id)
                            .map(|v| v.iter().collect())
                            .unwrap_or_default();
                        forks.sort_by(|a, b| a.name.cmp(&b.name));
                        TreeNode {
                            name: format!("{}@{}", r.name, s.name),
                            kind: Kind::Snapshot,
                            size: s.size,
                            deleted: false,
                            children: forks
                                .into_iter()
                                .map(|f| vdi_node(f, snaps_of, forks_of))
                                .collect(),
                        }
                    })
                    .collect(),
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

    pub fn df(&self) -> StoreResult<DfReport> {
        let generation = self.durable_generation();
        let mut m = self.meta.lock();
        let recs = Self::all_records(&mut m)?;
        let geo = m.geo;
        let mut memo: HashMap<u64, u64> = HashMap::new();
        let mut logical = 0u64;
        for r in &recs {
            logical += count_data(&mut m, r.root, r.height, &mut memo)?;
        }
        let vdis = recs.iter().filter(|r| r.kind == Kind::Vdi).count() as u64;
        // Every allocated block is a map node, a registry node, an orphan-list block, or data
        // (including data still held by queued orphans).
        let dev = m.dev.clone();
        let registry_blocks = m.registry.blocks(&*dev)?.len() as u64;
        let meta_blocks = memo.len() as u64 + registry_blocks + m.orphan_chain.len() as u64;
        let stored_bytes = m.rc.allocated().saturating_sub(meta_blocks) * BLOCK_SIZE_U64;
        Ok(DfReport {
            store_bytes: geo.total_blocks * BLOCK_SIZE_U64,
            capacity_bytes: geo.data_blocks() * BLOCK_SIZE_U64,
            used_bytes: m.rc.allocated() * BLOCK_SIZE_U64,
            free_bytes: m.rc.free().saturating_sub(m.reserve) * BLOCK_SIZE_U64,
            reserved_bytes: m.reserve.min(m.rc.free()) * BLOCK_SIZE_U64,
            pending_bytes: m.rc.held() * BLOCK_SIZE_U64,
            orphan_nodes: m.orphans.len() as u64,
            vdis,
            snapshots: recs.len() as u64 - vdis,
            logical_bytes: logical * BLOCK_SIZE_U64,
            stored_bytes,
            sharing_ratio: if stored_bytes == 0 {
                1.0
            } else {
                (logical * BLOCK_SIZE_U64) as f64 / stored_bytes as f64
            },
            generation,
        })
    }
}

struct Usage {
    data: u64,
    unique: u64,
    nodes: u64,
}

/// Data blocks under `root`, and how many of them only this tree references (every pointer on
/// the path has refcount 1).
fn usage(m: &mut Meta, root: Ptr, height: u8) -> StoreResult<Usage> {
    let mut u = Usage {
        data: 0,
        unique: 0,
        nodes: 0,
    };
    usage_rec(m, root, height, true, &mut u)?;
    Ok(u)
}

fn usage_rec(m: &mut Meta, p: Ptr, level: u8, exclusive: bool, u: &mut Usage) -> StoreResult<()> {
    if !p.is_block() {
        return Ok(());
    }
    let dev = m.dev.clone();
    let exclusive = exclusive && m.rc.get(&*dev, p.addr())? == 1;
    if level == 0 {
        u.data += 1;
        u.unique += exclusive as u64;
        return Ok(());
    }
    u.nodes += 1;
    let children: Vec<Ptr> = m.nodes.get(&*dev, p)?.entries().collect();
    if level == 1 && !exclusive {
        u.data += children.iter().filter(|c| c.is_block()).count() as u64;
        return Ok(());
    }
    for c in children {
        usage_rec(m, c, level - 1, exclusive, u)?;
    }
    Ok(())
}

/// Data blocks mapped under `p`, memoised per node (so `memo` ends up holding every distinct
/// map node).
fn count_data(m: &mut Meta, p: Ptr, level: u8, memo: &mut HashMap<u64, u64>) -> StoreResult<u64> {
    if !p.is_block() {
        return Ok(0);
    }
    if level == 0 {
        return Ok(1);
    }
    if let Some(&n) = memo.get(&p.addr()) {
        return Ok(n);
    }
    let dev = m.dev.clone();
    let children: Vec<Ptr> = m.nodes.get(&*dev, p)?.entries().collect();
    let mut n = 0;
    debug_assert_eq!(children.len(), FANOUT);
    for c in children {
        n += count_data(m, c, level - 1, memo)?;
    }
    memo.insert(p.addr(), n);
    Ok(n)
}
