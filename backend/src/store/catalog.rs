//! The registry as the rest of the store sees it: the B+tree of the last cut, plus the name
//! changes made since (the overlay), plus the id counter.
//!
//! ```text
//!  Catalog ─ tree: BTree        names and records as of the last cut; changed only by a
//!          │                    checkpoint (applied at its cut, hashed and written after)
//!          ─ overlay            N/S name keys added (Some) or removed (None) since the cut
//!          ─ next_id
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
    registry::{decode_id, name_key, record_key, snapshot_key, split_name, Record},
    space::Space,
};

pub(super) struct Catalog {
    pub tree: BTree,
    overlay: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    pub next_id: u64,
}

/// Name changes a cut takes out of the overlay, to apply to the tree.
pub(super) type NameChanges = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

impl Catalog {
    pub fn new(root: Ptr, height: u8, next_id: u64) -> Catalog {
        Catalog {
            tree: BTree::new(root, height),
            overlay: BTreeMap::new(),
            next_id,
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
    pub fn set_name(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        self.overlay.insert(key, value);
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
