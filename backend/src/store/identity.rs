//! A snapshot's identity across stores (its *guid*), for incremental `vdi send`/`vdi recv`:
//! a received snapshot keeps the guid it had where it was sent from (its record holds it);
//! every other snapshot's is derived from the store's UUID, its id and its creation time, so it
//! never needs storing and never changes.

use super::{
    error::{StoreError, StoreResult},
    registry::is_hidden,
    registry::{split_name, Kind, Links, Record},
    store::Store,
};

/// Who a snapshot is, wherever it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotIdentity {
    pub guid: u64,
    /// Creation time, Unix nanoseconds (a received snapshot keeps the sender's).
    pub created_ns: u64,
}

impl Store {
    /// The identity of snapshot `full` (`NAME@SNAP`).
    pub fn snapshot_identity(&self, full: &str) -> StoreResult<SnapshotIdentity> {
        if split_name(full)?.1.is_none() {
            return Err(StoreError::Invalid(format!(
                "{full} is a VDI; send a snapshot of it (`vdi snapshot {full} SNAP`)"
            )));
        }
        let v = self.vdi_named(full)?;
        let rec = v.state.read().rec.clone();
        Ok(SnapshotIdentity {
            guid: self.guid_of(&rec),
            created_ns: rec.created_ns,
        })
    }

    fn guid_of(&self, rec: &Record) -> u64 {
        if rec.guid != 0 {
            return rec.guid;
        }
        let mut h = blake3::Hasher::new();
        h.update(b"parallax snapshot guid");
        h.update(&self.uuid());
        h.update(&rec.id.to_le_bytes());
        h.update(&rec.created_ns.to_le_bytes());
        let b = h.finalize();
        u64::from_le_bytes(b.as_bytes()[..8].try_into().expect("8 bytes")) | 1
    }

    /// The full name of the snapshot whose guid is `guid`: `hint` if that one has it, else
    /// the first found by a walk of the registry.
    pub fn find_snapshot(&self, guid: u64, hint: &str) -> StoreResult<Option<String>> {
        if self.snapshot_identity(hint).is_ok_and(|i| i.guid == guid) {
            return Ok(Some(hint.to_string()));
        }
        // No index by guid (it would need a key kind of its own): a walk of the records.
        let mut found = None;
        self.records_from(1, &mut |raw| {
            if Links::peek(raw)?.kind != Kind::Snapshot {
                return Ok(true);
            }
            let rec = Record::decode(raw)?;
            if self.guid_of(&rec) == guid {
                let name = self.full_name(&mut self.catalog.lock(), &rec)?;
                if !is_hidden(&name) {
                    found = Some(name);
                    return Ok(false);
                }
            }
            Ok(true)
        })?;
        Ok(found)
    }
}
