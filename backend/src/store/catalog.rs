//! The registry as the rest of the store sees it: the B+tree of the last cut, plus the name
//! changes made since (the overlay), plus the id counter.
//!
//! ```text
//!  Catalog ─ tree: BTree        names and records as of the last cut; changed only by a
//!          │                    checkpoint (applied at its cut, hashed and written after)
//!          ─ overlay            N/S name keys added (Some) or removed (None) since the cut
//!          ─ next_id
//!          ─ counts             VDIs and snapshots, counted once when first asked for and
//!                               kept up to date by every name change after that
//! ```
//!
//! Records of VDIs changed since the cut live in their [`Vdi`](super::vdi::Vdi), not here; a
//! checkpoint puts them into the tree at its cut. Admin operations only ever write the
//! overlay, so the tree stays the checkpoint's to hash and write while they go on.

use std::collections::BTreeMap;

use super::{
    btree::{BTree, Ctx},
    device::Device,
    error::{StoreError, StoreResult},
    format::Ptr,
    registry::is_hidden,
    registry::{decode_id, name_key, record_key, snapshot_key, split_name, Record},
    space::Space,
};

pub(super) struct Catalog {
    pub tree: BTree,
    overlay: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    pub next_id: u64,
    counts: Option<Counts>,
}

/// How many VDIs (not counting those under construction) and snapshots the registry holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub vdis: u64,
    pub snapshots: u64,
}

impl Counts {
    /// What one name key counts as.
    fn of_key(key: &[u8]) -> Counts {
        match key.first() {
            Some(b'N') if !is_hidden(&String::from_utf8_lossy(&key[1..])) => Counts {
                vdis: 1,
                snapshots: 0,
            },
            Some(b'S') => Counts {
                vdis: 0,
                snapshots: 1,
            },
            _ => Counts::default(),
        }
    }
}

/// Name changes a cut takes out of the overlay, to apply to the tree.
pub(super) type NameChanges = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

impl Catalog {
    pub fn new(root: Ptr, height: u8, next_id: u64) -> Catalog {
        Catalog {
            tree: BTree::new(root, height),
            overlay: BTreeMap::new(),
            next_id,
            counts: None,
        }
    }

    /// The value under a name key (`N…` or `S…`), overlay first.
    pub fn get_name(&mut self, dev: &dyn Device, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        match self.overlay.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.tree.get(dev, key),
        }
    }

    /// Adds (`Some`) or removes (`None`) a name key.
    pub fn set_name(
        &mut self,
        dev: &dyn Device,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    ) -> StoreResult<()> {
        if self.counts.is_some() {
            let was = self.get_name(dev, &key)?.is_some();
            let c = Counts::of_key(&key);
            let n = self.counts.as_mut().expect("counted");
            match (was, value.is_some()) {
                (false, true) => {
                    n.vdis += c.vdis;
                    n.snapshots += c.snapshots;
                }
                (true, false) => {
                    n.vdis -= c.vdis;
                    n.snapshots -= c.snapshots;
                }
                _ => {}
            }
        }
        self.overlay.insert(key, value);
        Ok(())
    }

    /// How many VDIs and snapshots there are. The first call counts the name keys (a walk of
    /// the keys, without reading a record: O(n) once); name changes keep the count after that.
    pub fn counts(&mut self, dev: &dyn Device) -> StoreResult<Counts> {
        if let Some(c) = self.counts {
            return Ok(c);
        }
        let mut n = Counts::default();
        for prefix in [&b"N"[..], b"S"] {
            let mut after = None;
            loop {
                let (batch, next) = self.names_after(dev, prefix, after.as_deref(), 4096)?;
                for (k, _) in &batch {
                    let c = Counts::of_key(k);
                    n.vdis += c.vdis;
                    n.snapshots += c.snapshots;
                }
                match next {
                    Some(k) => after = Some(k),
                    None => break,
                }
            }
        }
        self.counts = Some(n);
        Ok(n)
    }

    /// Up to about `limit` name entries starting with `prefix` that sort after `after`,
    /// overlay applied, in key order; and the key to continue after, if there may be more.
    /// Lets a long listing go in batches without holding the catalog between them.
    #[allow(clippy::type_complexity)]
    pub fn names_after(
        &mut self,
        dev: &dyn Device,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> StoreResult<(Vec<(Vec<u8>, Vec<u8>)>, Option<Vec<u8>>)> {
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let mut last = None;
        self.tree.walk(dev, prefix, after, &mut |k, v| {
            merged.insert(k.to_vec(), v.to_vec());
            if merged.len() >= limit {
                last = Some(k.to_vec());
                false
            } else {
                true
            }
        })?;
        // The overlay's changes in the same key range: (after, last] or (after, end of prefix].
        let start = match after {
            Some(a) => std::ops::Bound::Excluded(a.to_vec()),
            None => std::ops::Bound::Included(prefix.to_vec()),
        };
        for (k, v) in self.overlay.range((start, std::ops::Bound::Unbounded)) {
            if !k.starts_with(prefix) || last.as_ref().is_some_and(|l| k > l) {
                break;
            }
            match v {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        Ok((merged.into_iter().collect(), last))
    }

    /// Every name entry starting with `prefix`, overlay applied, in key order.
    pub fn scan_names(
        &mut self,
        dev: &dyn Device,
        prefix: &[u8],
    ) -> StoreResult<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> =
            self.tree.scan(dev, prefix)?.into_iter().collect();
        for (k, v) in self.overlay.range(prefix.to_vec()..) {
            if !k.starts_with(prefix) {
                break;
            }
            match v {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        Ok(merged.into_iter().collect())
    }

    /// The id of `NAME` or `NAME@SNAP`.
    pub fn resolve(&mut self, dev: &dyn Device, full: &str) -> StoreResult<u64> {
        let (vdi, snap) = split_name(full)?;
        let id = match self.get_name(dev, &name_key(vdi))? {
            Some(v) => decode_id(&v)?,
            None => return Err(StoreError::NotFound(full.to_string())),
        };
        match snap {
            None => Ok(id),
            Some(s) => match self.get_name(dev, &snapshot_key(id, s))? {
                Some(v) => decode_id(&v),
                None => Err(StoreError::NotFound(full.to_string())),
            },
        }
    }

    /// The record of `id` as of the last cut (callers look in the loaded VDIs first).
    pub fn record(&mut self, dev: &dyn Device, id: u64) -> StoreResult<Option<Record>> {
        self.tree
            .get(dev, &record_key(id))?
            .map(|raw| Record::decode(&raw))
            .transpose()
    }

    /// Every record as of the last cut.
    pub fn records(&mut self, dev: &dyn Device) -> StoreResult<Vec<Record>> {
        self.tree
            .scan(dev, b"R")?
            .into_iter()
            .map(|(_, v)| Record::decode(&v))
            .collect()
    }

    /// A new id.
    pub fn allocate_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Takes the name changes made since the last cut.
    pub fn take_overlay(&mut self) -> NameChanges {
        std::mem::take(&mut self.overlay)
    }

    /// At a cut: puts the name changes and the changed records into the tree (allocating its
    /// new nodes now, so that they belong to the cut generation). Records' root hashes may be
    /// unset; [`Catalog::patch_record`] fills them in before the tree is written.
    pub fn apply(
        &mut self,
        ctx: &mut Ctx,
        names: NameChanges,
        records: &[(Record, bool)],
    ) -> StoreResult<()> {
        for (k, v) in names {
            match v {
                Some(v) => self.tree.insert(ctx, &k, &v)?,
                None => self.tree.remove(ctx, &k)?,
            };
        }
        for (rec, deleted) in records {
            if *deleted {
                self.tree.remove(ctx, &record_key(rec.id))?;
            } else {
                self.tree.insert(ctx, &record_key(rec.id), &rec.encode())?;
            }
        }
        Ok(())
    }

    /// Replaces a record applied at the cut with the same record, hashes filled in. The path
    /// to it is already in the transaction, so this allocates nothing.
    pub fn patch_record(&mut self, ctx: &mut Ctx, rec: &Record) -> StoreResult<()> {
        self.tree.insert(ctx, &record_key(rec.id), &rec.encode())?;
        Ok(())
    }

    /// Takes the space lock's state for a tree change.
    pub fn ctx<'a>(dev: &'a dyn Device, space: &'a mut Space) -> Ctx<'a> {
        Ctx {
            dev,
            rc: &mut space.rc,
            cursor: &mut space.meta_cursor,
        }
    }
}
