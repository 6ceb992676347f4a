//! Reports that walk the registry without loading it: `vdi list` entry by entry, one subtree
//! of `vdi tree`, a snapshot's forks, the VDI and snapshot counts.
//!
//! ```text
//!  list     N keys in name order (a range of them for --prefix) ─► each VDI's record,
//!           then its snapshots: the S keys under its id ─► their records
//!  records  R keys in id order from some id, with loaded VDIs' newer records merged in
//! ```
//!
//! Each walk goes in batches and holds the catalog only while it reads one batch, so a slow
//! reader (a pipe, a socket) never holds up other operations; an entry added or removed
//! meanwhile may or may not be seen, as with `ls` in a changing directory. Everything that
//! descends from an entry was made after it and has a larger id (ids are never reused), so
//! a subtree or a snapshot's forks are found by walking the records from that entry's id on.
//! That walk is O(newer records): an index of forks by origin would make it O(forks), and
//! needs a new key kind (see FORMAT.md §6).

use std::collections::{BTreeMap, HashMap, HashSet};

use super::{
    admin::{snapshot_node, vdi_node, ListFilter, TreeNode, VdiSummary},
    catalog::{Catalog, Counts},
    error::{StoreError, StoreResult},
    format::BLOCK_SIZE_U64,
    registry::is_hidden,
    registry::{decode_id, name_key, record_key, snapshot_prefix, split_name, Kind, Links, Record},
    store::Store,
};

/// Entries read per batch (per hold of the catalog).
const BATCH: usize = 256;

impl Store {
    /// How many VDIs and snapshots the store holds. O(n) the first time it is asked (a walk
    /// of the name keys only), O(1) after that. Snapshots of a VDI still under construction
    /// count; the VDI does not.
    pub fn counts(&self) -> StoreResult<Counts> {
        self.catalog.lock().counts(&*self.dev)
    }

    /// The entries of `vdi list` that `filter` admits, each VDI followed by its snapshots,
    /// VDIs in name order and a VDI's snapshots in name order.
    pub fn list_filtered(&self, filter: &ListFilter) -> StoreResult<Vec<VdiSummary>> {
        let mut out = Vec::new();
        self.list_each(filter, &mut |v| {
            out.push(v);
            Ok(())
        })?;
        Ok(out)
    }

    pub fn list(&self) -> StoreResult<Vec<VdiSummary>> {
        self.list_filtered(&ListFilter::default())
    }

    /// [`Store::list_filtered`], handing each entry to `emit` as soon as it is read: the first
    /// comes after O(log n) work whatever the size of the registry. `--prefix` reads only the
    /// names it matches; `--origin` walks the records newer than the origin.
    pub fn list_each(
        &self,
        filter: &ListFilter,
        emit: &mut dyn FnMut(VdiSummary) -> StoreResult<()>,
    ) -> StoreResult<()> {
        let mut emit = |mut v: VdiSummary, id: u64| -> StoreResult<()> {
            if !filter.admits(&v) {
                return Ok(());
            }
            if filter.usage {
                // Deleted meanwhile: reported as it was, without usage.
                if let Some(u) = self.walk_live(id, |root, h| self.usage(root, h))? {
                    v.used = Some(u.data * BLOCK_SIZE_U64);
                    v.unique = Some(u.unique * BLOCK_SIZE_U64);
                }
            }
            emit(v)
        };
        if let Some(origin) = &filter.origin {
            for (v, id) in self.forks_listed(origin)? {
                emit(v, id)?;
            }
            return Ok(());
        }
        let snapshots = filter.kind != Some(Kind::Vdi);
        // A prefix with an '@' names one VDI and a prefix of its snapshots' names.
        let prefix = filter.prefix.as_deref().unwrap_or("");
        if prefix.contains('@') {
            let Ok((vdi, Some(snap))) = split_name(prefix) else {
                return Ok(());
            };
            let id = match self.catalog.lock().resolve(&*self.dev, vdi) {
                Ok(id) => id,
                Err(StoreError::NotFound(_)) => return Ok(()),
                Err(e) => return Err(e),
            };
            if snapshots && !is_hidden(vdi) {
                self.list_snapshots(id, vdi, snap, &mut emit)?;
            }
            return Ok(());
        }
        let first = name_key(prefix);
        let mut after: Option<Vec<u8>> = None;
        // Names change between batches: the memo lives for one batch.
        let mut origins = HashMap::new();
        loop {
            let (batch, next) = {
                let mut cat = self.catalog.lock();
                let (names, next) = cat.names_after(&*self.dev, &first, after.as_deref(), BATCH)?;
                origins.clear();
                let mut batch = Vec::with_capacity(names.len());
                for (k, v) in names {
                    let name = String::from_utf8_lossy(&k[1..]).into_owned();
                    if is_hidden(&name) {
                        continue;
                    }
                    let id = decode_id(&v)?;
                    let summary = if filter.kind == Some(Kind::Snapshot) {
                        None
                    } else {
                        let rec = self.record_of(&mut cat, id)?;
                        Some(self.summary(&mut cat, &rec, name.clone(), &mut origins))
                    };
                    batch.push((id, name, summary));
                }
                (batch, next)
            };
            for (id, name, summary) in batch {
                if let Some(v) = summary {
                    emit(v, id)?;
                }
                if snapshots {
                    self.list_snapshots(id, &name, "", &mut emit)?;
                }
            }
            match next {
                Some(k) => after = Some(k),
                None => return Ok(()),
            }
        }
    }

    /// Emits the snapshots of VDI `id` (called `vdi`) whose names start with `prefix`.
    fn list_snapshots(
        &self,
        id: u64,
        vdi: &str,
        prefix: &str,
        emit: &mut dyn FnMut(VdiSummary, u64) -> StoreResult<()>,
    ) -> StoreResult<()> {
        let mut first = snapshot_prefix(id);
        first.extend_from_slice(prefix.as_bytes());
        let mut after: Option<Vec<u8>> = None;
        loop {
            let (batch, next) = {
                let mut cat = self.catalog.lock();
                let (names, next) = cat.names_after(&*self.dev, &first, after.as_deref(), BATCH)?;
                let mut batch = Vec::with_capacity(names.len());
                for (k, v) in names {
                    let sid = decode_id(&v)?;
                    let rec = self.record_of(&mut cat, sid)?;
                    let name = format!("{vdi}@{}", String::from_utf8_lossy(&k[9..]));
                    batch.push((self.summary(&mut cat, &rec, name, &mut HashMap::new()), sid));
                }
                (batch, next)
            };
            for (v, sid) in batch {
                emit(v, sid)?;
            }
            match next {
                Some(k) => after = Some(k),
                None => return Ok(()),
            }
        }
    }

    /// The forks of snapshot `origin` (as it is called now) for `vdi list --origin`, by name.
    fn forks_listed(&self, origin: &str) -> StoreResult<Vec<(VdiSummary, u64)>> {
        let sid = match self.catalog.lock().resolve(&*self.dev, origin) {
            Ok(id) => id,
            Err(StoreError::NotFound(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        self.records_from(sid + 1, &mut |raw| {
            let l = Links::peek(raw)?;
            if l.kind != Kind::Vdi || l.origin != sid {
                return Ok(true);
            }
            let r = Record::decode(raw)?;
            if !is_hidden(&r.name) {
                let v = VdiSummary::of(&r, r.name.clone(), (Some(origin.to_string()), false));
                out.push((v, r.id));
            }
            Ok(true)
        })?;
        out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        Ok(out)
    }

    /// The names of the forks of snapshot `sid`, oldest first.
    pub(super) fn forks_of(&self, sid: u64) -> StoreResult<Vec<String>> {
        let mut out = Vec::new();
        self.records_from(sid + 1, &mut |raw| {
            let l = Links::peek(raw)?;
            if l.kind == Kind::Vdi && l.origin == sid {
                out.push(Record::decode(raw)?.name);
            }
            Ok(true)
        })?;
        Ok(out)
    }

    /// `rec`'s line of `vdi list`. `origins` remembers what origins are called (a list of a
    /// million forks of one template looks its name up once).
    fn summary(
        &self,
        cat: &mut Catalog,
        rec: &Record,
        name: String,
        origins: &mut HashMap<u64, (Option<String>, bool)>,
    ) -> VdiSummary {
        let origin = match origins.get(&rec.origin) {
            Some(o) => o.clone(),
            None => {
                let o = self.origin_name(cat, rec);
                if origins.len() >= 4096 {
                    origins.clear();
                }
                origins.insert(rec.origin, o.clone());
                o
            }
        };
        VdiSummary::of(rec, name, origin)
    }

    /// Every live record with an id of at least `first`, in id order (the tree's as of the
    /// last cut with the loaded VDIs' changes merged in), until `f` returns false. `f` gets
    /// each record encoded, to peek at ([`Links::peek`]) before it decodes what it keeps.
    pub(super) fn records_from(
        &self,
        first: u64,
        f: &mut dyn FnMut(&[u8]) -> StoreResult<bool>,
    ) -> StoreResult<()> {
        let mut lo = first;
        loop {
            let (batch, more) = {
                let mut cat = self.catalog.lock();
                let after = lo.checked_sub(1).map(record_key);
                let mut by_id = BTreeMap::new();
                let mut bad_key = false;
                cat.tree
                    .walk(&*self.dev, b"R", after.as_deref(), &mut |k, v| {
                        match k.get(1..).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
                            Some(id) => drop(by_id.insert(u64::from_be_bytes(id), v.to_vec())),
                            None => bad_key = true,
                        }
                        by_id.len() < BATCH
                    })?;
                if bad_key {
                    return Err(StoreError::Corrupt(
                        "registry record key is not 9 bytes".into(),
                    ));
                }
                let more = by_id.len() >= BATCH;
                let hi = match by_id.last_key_value() {
                    Some((&id, _)) if more => id,
                    _ => u64::MAX,
                };
                for v in self.vdis.all() {
                    if v.id < lo || v.id > hi {
                        continue;
                    }
                    let st = v.state.read();
                    if st.deleted {
                        by_id.remove(&v.id);
                    } else {
                        by_id.insert(v.id, st.rec.encode());
                    }
                }
                (by_id, more.then_some(hi))
            };
            for raw in batch.into_values() {
                if !f(&raw)? {
                    return Ok(());
                }
            }
            match more {
                Some(hi) => lo = hi + 1,
                None => return Ok(()),
            }
        }
    }

    /// The part of `vdi tree` that starts at `name` (a VDI or snapshot): it, and what
    /// descends from it. Reads the records newer than it, not the whole registry.
    pub fn subtree(&self, name: &str) -> StoreResult<TreeNode> {
        let (root, vdi_name) = {
            let mut cat = self.catalog.lock();
            let (vdi, _) = split_name(name)?;
            if is_hidden(vdi) {
                return Err(StoreError::NotFound(name.to_string()));
            }
            let id = cat.resolve(&*self.dev, name)?;
            (self.record_of(&mut cat, id)?, vdi.to_string())
        };
        let mut members = HashSet::from([root.id]);
        let mut snaps_of: BTreeMap<u64, Vec<Record>> = BTreeMap::new();
        let mut forks_of: BTreeMap<u64, Vec<Record>> = BTreeMap::new();
        self.records_from(root.id + 1, &mut |raw| {
            let l = Links::peek(raw)?;
            let joins = match l.kind {
                Kind::Snapshot => members.contains(&l.parent),
                Kind::Vdi => members.contains(&l.origin),
            };
            if !joins {
                return Ok(true);
            }
            let r = Record::decode(raw)?;
            match r.kind {
                Kind::Snapshot => {
                    members.insert(r.id);
                    snaps_of.entry(r.parent).or_default().push(r);
                }
                Kind::Vdi if !is_hidden(&r.name) => {
                    members.insert(r.id);
                    forks_of.entry(r.origin).or_default().push(r);
                }
                Kind::Vdi => {}
            }
            Ok(true)
        })?;
        let snaps_of = snaps_of
            .iter()
            .map(|(k, v)| (*k, v.iter().collect()))
            .collect();
        let forks_of = forks_of
            .iter()
            .map(|(k, v)| (*k, v.iter().collect()))
            .collect();
        Ok(match root.kind {
            Kind::Vdi => vdi_node(&root, &snaps_of, &forks_of),
            Kind::Snapshot => snapshot_node(&vdi_name, &root, &snaps_of, &forks_of),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::{device::MemDevice, StoreOptions};

    fn store() -> Arc<Store> {
        let dev = Arc::new(MemDevice::new(64 << 20));
        Store::format(&*dev, 64 << 20).unwrap();
        let opts = StoreOptions {
            checkpoint_interval: None,
            ..StoreOptions::default()
        };
        Store::open_device(dev, opts).unwrap()
    }

    /// `vdi list` as the whole registry says it should be: every record, VDIs by name, each
    /// followed by its snapshots by name.
    fn model(s: &Store, filter: &ListFilter) -> Vec<VdiSummary> {
        let mut cat = s.catalog.lock();
        let recs = s.all_records(&mut cat).unwrap();
        let mut out: Vec<((String, String), VdiSummary)> = Vec::new();
        for r in &recs {
            let (vdi, snap) = match r.kind {
                Kind::Vdi => (r.name.clone(), String::new()),
                Kind::Snapshot => (
                    s.record_of(&mut cat, r.parent).unwrap().name,
                    r.name.clone(),
                ),
            };
            if is_hidden(&vdi) {
                continue;
            }
            let name = s.full_name(&mut cat, r).unwrap();
            let (origin, origin_deleted) = s.origin_name(&mut cat, r);
            let v = VdiSummary::of(r, name, (origin, origin_deleted));
            if filter.admits(&v) {
                out.push(((vdi, snap), v));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out.into_iter().map(|(_, v)| v).collect()
    }

    fn find(nodes: Vec<TreeNode>, name: &str) -> Option<TreeNode> {
        for n in nodes {
            if n.name == name && !n.deleted {
                return Some(n);
            }
            if let Some(f) = find(n.children, name) {
                return Some(f);
            }
        }
        None
    }

    fn check(s: &Arc<Store>) {
        let filters = [
            ListFilter::default(),
            ListFilter {
                prefix: Some("a".into()),
                ..ListFilter::default()
            },
            ListFilter {
                prefix: Some("a@".into()),
                ..ListFilter::default()
            },
            ListFilter {
                prefix: Some("deep@s1".into()),
                ..ListFilter::default()
            },
            ListFilter {
                prefix: Some("vm-01".into()),
                kind: Some(Kind::Vdi),
                ..ListFilter::default()
            },
            ListFilter {
                kind: Some(Kind::Snapshot),
                ..ListFilter::default()
            },
            ListFilter {
                origin: Some("t@base".into()),
                ..ListFilter::default()
            },
            ListFilter {
                origin: Some("t@base".into()),
                prefix: Some("vm-02".into()),
                ..ListFilter::default()
            },
            ListFilter {
                origin: Some("nothing@here".into()),
                ..ListFilter::default()
            },
        ];
        for f in &filters {
            assert_eq!(s.list_filtered(f).unwrap(), model(s, f), "{f:?}");
        }
        let all = model(s, &ListFilter::default());
        let vdis = all.iter().filter(|v| v.kind == Kind::Vdi).count() as u64;
        assert_eq!(
            s.counts().unwrap(),
            Counts {
                vdis,
                snapshots: all.len() as u64 - vdis
            }
        );
        let forest = s.tree().unwrap();
        for v in all.iter().step_by(7) {
            assert_eq!(
                s.subtree(&v.name).unwrap(),
                find(forest.clone(), &v.name).unwrap(),
                "subtree {}",
                v.name
            );
        }
        let info = s.info("t@base").unwrap();
        let mut forks: Vec<String> = all
            .iter()
            .filter(|v| v.origin.as_deref() == Some("t@base"))
            .map(|v| v.name.clone())
            .collect();
        let mut got = info.forks.clone();
        forks.sort();
        got.sort();
        assert_eq!(got, forks);
    }

    /// Lists, counts, subtrees and forks read in batches agree with the whole registry read at
    /// once: across batch boundaries, with changes still in memory and after a checkpoint,
    /// after renames and deletions, and with names that sort between a VDI and its snapshots.
    #[test]
    fn walks_in_batches_match_the_whole_registry() {
        let s = store();
        s.create_vdi("t", 1 << 20).unwrap();
        s.snapshot("t", "base").unwrap();
        s.create_vdi("deep", 1 << 20).unwrap();
        for i in 0..600 {
            s.snapshot("deep", &format!("s{i:04}")).unwrap();
        }
        for name in ["a", "a-b", "a0", "aA", "a.c", "b"] {
            s.create_vdi(name, 1 << 20).unwrap();
            s.snapshot(name, "x").unwrap();
            s.snapshot(name, "y").unwrap();
        }
        s.fork("a@x", "a-fork").unwrap();
        assert_eq!(s.counts().unwrap().snapshots, 613);
        for i in 0..700 {
            s.fork("t@base", &format!("vm-{i:04}")).unwrap();
        }
        check(&s);
        s.checkpoint().unwrap();
        check(&s);
        // Changes on top of the tree, in the overlay and in loaded VDIs only.
        for i in (0..700).step_by(3) {
            s.delete(&format!("vm-{i:04}"), false).unwrap();
        }
        for i in (0..600).step_by(5) {
            s.delete(&format!("deep@s{i:04}"), false).unwrap();
        }
        s.rename("vm-0001", "a1").unwrap();
        s.rename("t@base", "t@gold").unwrap();
        s.rename("t@gold", "t@base").unwrap();
        s.snapshot("vm-0002", "p").unwrap();
        s.fork("vm-0002@p", "vm-0002-child").unwrap();
        s.delete("a@x", false).unwrap();
        s.create_vdi("zz", 1 << 20).unwrap();
        check(&s);
        s.checkpoint().unwrap();
        check(&s);
    }

    #[test]
    fn finds_a_snapshot_by_guid_without_a_hint() {
        let s = store();
        s.create_vdi("v", 1 << 20).unwrap();
        for i in 0..300 {
            s.snapshot("v", &format!("s{i}")).unwrap();
        }
        s.checkpoint().unwrap();
        s.snapshot("v", "new").unwrap();
        for name in ["v@s7", "v@s299", "v@new"] {
            let guid = s.snapshot_identity(name).unwrap().guid;
            assert_eq!(
                s.find_snapshot(guid, "v@s0").unwrap().as_deref(),
                Some(name)
            );
        }
        assert_eq!(s.find_snapshot(2, "v@s0").unwrap(), None);
    }
}
