//! VDIs under construction (`vdi import`, `vdi recv`): made under a reserved *staging name*
//! that no user's name can take (user names never start with `.`), and renamed to their real
//! name in one logged step once complete. Whatever an interrupt or a crash leaves behind is
//! deleted the next time the store opens (FORMAT.md §10: staging names came with format 3;
//! in older stores a VDI under construction carries its real name, as before).

use tracing::warn;

use super::{
    backing::CACHE_PREFIX,
    error::{StoreError, StoreResult},
    migration::{INCOMING_PREFIX, PARKED_PREFIX},
    registry::{name_key, validate_name},
    store::Store,
};

/// What a staging name starts with.
pub const STAGING_PREFIX: &str = ".part:";

/// Whether `name` (a VDI's name, or a snapshot's full name) belongs to a VDI under
/// construction.
pub fn is_staging(name: &str) -> bool {
    name.starts_with(STAGING_PREFIX)
}

/// Checks a VDI name read back from the log or written by the store itself: a user's name,
/// the staging name of one (which may be an incoming migration's), a remote export's cache,
/// or a migration's name on either side.
pub(super) fn validate_stored_name(name: &str) -> StoreResult<()> {
    let inner = name.strip_prefix(STAGING_PREFIX).unwrap_or(name);
    let inner = [CACHE_PREFIX, INCOMING_PREFIX, PARKED_PREFIX]
        .iter()
        .find_map(|p| inner.strip_prefix(p))
        .unwrap_or(inner);
    validate_name(inner, "VDI")
}

/// A VDI under construction: deleted on drop unless [`Staged::publish`] gave it its name.
pub struct Staged<'a> {
    store: &'a Store,
    name: String,
    staging: String,
    published: bool,
}

impl Store {
    /// Creates an empty VDI that will be called `name` once published; refuses if `name`
    /// exists or is under construction already.
    pub fn create_staged(&self, name: &str, size: u64) -> StoreResult<Staged<'_>> {
        self.staged(name, |staging| self.create_unchecked(staging, size))
    }

    /// Like [`Store::create_staged`], but a fork of snapshot `base` (`NAME@SNAP`).
    pub fn create_staged_fork(&self, name: &str, base: &str) -> StoreResult<Staged<'_>> {
        self.staged(name, |staging| self.fork_unchecked(base, staging))
    }

    fn staged(
        &self,
        name: &str,
        create: impl FnOnce(&str) -> StoreResult<()>,
    ) -> StoreResult<Staged<'_>> {
        match name.strip_prefix(INCOMING_PREFIX) {
            // A migration's bulk copy (format 6) is made like a received VDI.
            Some(inner) => {
                self.require_migration()?;
                validate_name(inner, "VDI")?
            }
            None => validate_name(name, "VDI")?,
        }
        if self.stat(name).is_ok() {
            return Err(StoreError::Exists(format!("VDI {name}")));
        }
        let staging = if self.format_version() >= 3 {
            format!("{STAGING_PREFIX}{name}")
        } else {
            name.to_string()
        };
        match create(&staging) {
            Err(StoreError::Exists(_)) if staging != name => {
                return Err(StoreError::Busy(format!(
                    "{name} is being made already (an import or receive in progress)"
                )))
            }
            r => r?,
        }
        Ok(Staged {
            store: self,
            name: name.to_string(),
            staging,
            published: false,
        })
    }

    /// Deletes the VDIs (and their snapshots) that a crash or an interrupt left under
    /// construction. Called once the store is open, when nothing can be using them.
    pub(super) fn remove_staging_leftovers(&self) -> StoreResult<()> {
        if self.format_version() < 3 {
            return Ok(());
        }
        let leftovers = self
            .catalog
            .lock()
            .scan_names(&*self.dev, &name_key(STAGING_PREFIX))?;
        for (key, _) in leftovers {
            let staging = String::from_utf8_lossy(&key[1..]).into_owned();
            warn!(
                "removing {}: an import or receive of it did not complete",
                &staging[STAGING_PREFIX.len()..]
            );
            self.delete(&staging, true)?;
        }
        Ok(())
    }
}

impl Staged<'_> {
    /// The name to write it under until it is published.
    pub fn staging_name(&self) -> &str {
        &self.staging
    }

    /// Takes snapshot `snap` of it, with a given creation time and identity.
    pub fn snapshot(&self, snap: &str, created: u64, guid: u64) -> StoreResult<()> {
        self.store.snapshot_as(&self.staging, snap, created, guid)
    }

    /// Makes everything written durable, then gives the VDI its name (durable on return).
    pub fn publish(mut self) -> StoreResult<()> {
        self.store.flush()?;
        if self.staging != self.name {
            self.store.rename_stored(&self.staging, &self.name)?;
        }
        self.published = true;
        Ok(())
    }
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        if !self.published {
            // Best effort: the store may be what failed; the next open removes it then.
            let _ = self.store.delete(&self.staging, true);
        }
    }
}
