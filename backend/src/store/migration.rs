//! The store's part in moving a VDI to another host (`vdi migrate`): the two hidden names a
//! migration gives a VDI, each a durable step.
//!
//! - On the **source**, [`Store::park`] renames the VDI to `.migrating:NAME` and detaches every
//!   handle open on it, in one logged step under the VDI's lock: from then on no client can
//!   write it (nothing exports or opens hidden names), and a restart keeps it that way, so the
//!   destination may take the VDI over. [`Store::unpark`] undoes it when the destination is
//!   known not to have taken it.
//! - On the **destination**, the bulk copy arrives as `.incoming:NAME` (with its snapshot), a
//!   VDI nobody can open; the final delta is received as a fork of it under the real name,
//!   which appears in one logged rename once everything in it is durable.
//!
//! Both names need format 6: older code would read them as a damaged registry.

use super::{
    error::{StoreError, StoreResult},
    registry::{snapshot_prefix, split_name, validate_name, Kind},
    store::Store,
};

/// The name a VDI has on its source host from switch-over until the destination owns it.
pub const PARKED_PREFIX: &str = ".migrating:";
/// The name the bulk copy of a VDI has on the destination until the VDI moves there.
pub const INCOMING_PREFIX: &str = ".incoming:";

/// `.migrating:NAME`.
pub fn parked_name(name: &str) -> String {
    format!("{PARKED_PREFIX}{name}")
}

/// `.incoming:NAME`.
pub fn incoming_name(name: &str) -> String {
    format!("{INCOMING_PREFIX}{name}")
}

impl Store {
    /// Refuses migration on a store older than format 6.
    pub fn require_migration(&self) -> StoreResult<()> {
        let version = self.format_version();
        if version < 6 {
            return Err(StoreError::Invalid(format!(
                "migration needs store format 6 (this store is format {version}); run \
                 `parallax upgrade` first (older Parallax versions cannot open it after that)"
            )));
        }
        Ok(())
    }

    /// Takes VDI `name` away from its clients for good: renames it `.migrating:NAME` and
    /// detaches the handles open on it (their next I/O fails; every write they finished is in
    /// the VDI), in one step, durable on return. Returns how many handles were detached.
    pub fn park(&self, name: &str) -> StoreResult<usize> {
        self.require_migration()?;
        validate_name(name, "VDI")?;
        self.check_writable()?;
        let detached = {
            let _change = self.change();
            let mut cat = self.catalog.lock();
            let id = cat.resolve(&*self.dev, name)?;
            let v = self.vdi_locked(&mut cat, id)?;
            if v.state.read().rec.kind != Kind::Vdi {
                return Err(StoreError::Invalid(format!("{name} is not a VDI")));
            }
            let handles = v.handles();
            self.apply_rename(&mut cat, id, &parked_name(name))?;
            // Under the state lock every write checks its handle against: none lands after.
            v.state.write().detached += 1;
            handles
        };
        self.flush()?;
        Ok(detached)
    }

    /// Gives a parked VDI its name back (the migration did not happen); durable on return.
    pub fn unpark(&self, name: &str) -> StoreResult<()> {
        self.require_migration()?;
        validate_name(name, "VDI")?;
        self.rename_stored(&parked_name(name), name)
    }

    /// Whether `name` (a VDI's user name) is parked here.
    pub fn is_parked(&self, name: &str) -> bool {
        split_name(name).is_ok_and(|(_, s)| s.is_none()) && self.stat(&parked_name(name)).is_ok()
    }
}

impl Store {
    /// The names (the part after `@`) of VDI `vdi`'s snapshots, hidden VDIs included.
    pub fn snapshots_of(&self, vdi: &str) -> StoreResult<Vec<String>> {
        let mut cat = self.catalog.lock();
        let id = cat.resolve(&*self.dev, vdi)?;
        let found = cat.scan_names(&*self.dev, &snapshot_prefix(id))?;
        Ok(found
            .into_iter()
            .map(|(k, _)| String::from_utf8_lossy(&k[9..]).into_owned())
            .collect())
    }
}
