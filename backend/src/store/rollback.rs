//! `vdi rollback NAME@SNAP`: the VDI reads exactly its snapshot again, in O(1) — one logged
//! change that points the VDI at the snapshot's map ([`Store::apply_rollback`]), so a power
//! cut leaves either the old contents or the snapshot's, never a mix. The snapshot and every
//! other snapshot of the VDI stay.

use serde::{Deserialize, Serialize};

use super::{
    error::{StoreError, StoreResult},
    registry::{split_name, Kind},
    store::Store,
};

/// What `vdi rollback` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackReport {
    pub vdi: String,
    pub snapshot: String,
    /// The VDI's size now (the snapshot's).
    pub size: u64,
    /// Handles that were open on the VDI and are now detached (only with `force`).
    pub detached: usize,
}

impl Store {
    /// Rolls VDI `NAME` back to its snapshot `full` (`NAME@SNAP`); durable on return. Refused
    /// while the VDI is open, unless `force`, which detaches the open handles: their next I/O
    /// fails and their clients must reopen it.
    pub fn rollback(&self, full: &str, force: bool) -> StoreResult<RollbackReport> {
        let (vdi_name, snap) = split_name(full)?;
        if snap.is_none() {
            return Err(StoreError::Invalid(format!(
                "rollback takes the snapshot to go back to: `vdi rollback {full}@SNAP`"
            )));
        }
        self.check_writable()?;
        let version = self.format_version();
        if version < 3 {
            return Err(StoreError::Invalid(format!(
                "rollback needs store format 3 (this store is format {version}); run \
                 `parallax upgrade` first (older Parallax versions cannot open it after that)"
            )));
        }
        let report = {
            let change = self.change();
            let mut cat = self.catalog.lock();
            let sid = cat.resolve(&*self.dev, full)?;
            let id = cat.resolve(&*self.dev, vdi_name)?;
            let v = self.vdi_locked(&mut cat, id)?;
            let handles = v.handles();
            if handles > 0 && !force {
                return Err(StoreError::Busy(format!(
                    "{vdi_name} is open ({handles} handle(s)): disconnect its clients first, or \
                     pass --force to detach them (their I/O then fails until they reopen it)"
                )));
            }
            if v.state.read().rec.kind != Kind::Vdi {
                return Err(StoreError::Invalid(format!("{vdi_name} is not a VDI")));
            }
            self.apply_rollback(&mut cat, id, sid, change.gen)?;
            let size = v.state.read().rec.size;
            RollbackReport {
                vdi: vdi_name.to_string(),
                snapshot: full.to_string(),
                size,
                detached: handles,
            }
        };
        self.flush()?;
        Ok(report)
    }
}
