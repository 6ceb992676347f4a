//! The daemon's catalogue of exports: every VDI (read-write) and snapshot (`NAME@SNAP`,
//! read-only), and the single-writer rule between front ends.
//!
//! A VDI attached writable to a ring (a guest's disk) belongs to that ring alone: no second
//! ring and no NBD client may open it writable. NBD connections may share a VDI with each other
//! (one client using several connections — `nbdcopy`, qemu multi-conn — is still one writer,
//! and a flush on any connection commits the whole store). Read-only opens are always allowed.

use std::{collections::HashMap, sync::Arc};

use parking_lot::Mutex;

use crate::{
    disk::{BlockHashes, Disk, DiskError, DiskProvider, ExportInfo, Extent, OpenError},
    metrics::{MeteredDisk, Metrics, Transport},
    store::{is_hidden, Kind, Store, StoreDisk, StoreError, VdiSummary},
    util::format_size,
};

/// Which front end opens through a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontEnd {
    Nbd,
    Ring,
}

impl FrontEnd {
    fn transport(self) -> Transport {
        match self {
            FrontEnd::Nbd => Transport::Nbd,
            FrontEnd::Ring => Transport::Ring,
        }
    }
}

#[derive(Default)]
struct Writers {
    nbd: usize,
    ring: usize,
}

/// A [`DiskProvider`] over the store, for one kind of front end; providers made with
/// [`StoreProvider::sibling`] share the writer bookkeeping (and the metrics).
#[derive(Clone)]
pub struct StoreProvider {
    store: Arc<Store>,
    front: FrontEnd,
    writers: Arc<Mutex<HashMap<String, Writers>>>,
    /// When set, every handle handed out counts its requests there.
    metrics: Option<Arc<Metrics>>,
}

impl StoreProvider {
    pub fn new(store: Arc<Store>, front: FrontEnd) -> StoreProvider {
        StoreProvider {
            store,
            front,
            writers: Arc::default(),
            metrics: None,
        }
    }

    /// Counts every request on the handles this provider (and its siblings made after this)
    /// hands out.
    pub fn with_metrics(mut self, metrics: Option<Arc<Metrics>>) -> StoreProvider {
        self.metrics = metrics;
        self
    }

    /// A provider for another front end sharing this one's writer rule.
    pub fn sibling(&self, front: FrontEnd) -> StoreProvider {
        StoreProvider {
            store: self.store.clone(),
            front,
            writers: self.writers.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// `disk` as handed to a front end: metered when metrics are on, untouched otherwise.
    fn handle(&self, name: &str, disk: impl Disk + 'static) -> Arc<dyn Disk> {
        match &self.metrics {
            Some(m) => Arc::new(MeteredDisk::new(
                disk,
                m.export(name, self.front.transport()),
            )),
            None => Arc::new(disk),
        }
    }
}

fn open_error(name: &str, e: StoreError) -> OpenError {
    match e {
        StoreError::NotFound(_) => OpenError::NotFound(name.to_string()),
        StoreError::ReadOnly(_) => OpenError::ReadOnly(name.to_string()),
        StoreError::Busy(why) => OpenError::Busy {
            name: name.to_string(),
            why,
        },
        other => OpenError::Other(other.to_string()),
    }
}

fn export(v: VdiSummary) -> ExportInfo {
    ExportInfo {
        description: match (&v.kind, &v.origin) {
            (Kind::Snapshot, _) => format!("snapshot, {} (read-only)", format_size(v.size)),
            (Kind::Vdi, Some(o)) => format!("VDI, {}, forked from {o}", format_size(v.size)),
            (Kind::Vdi, None) => format!("VDI, {}", format_size(v.size)),
        },
        read_only: v.kind == Kind::Snapshot,
        size: v.size,
        name: v.name,
    }
}

impl DiskProvider for StoreProvider {
    fn list_exports(&self) -> Vec<ExportInfo> {
        self.store
            .list()
            .map(|l| l.into_iter().map(export).collect())
            .unwrap_or_default()
    }

    fn export_info(&self, name: &str) -> Option<ExportInfo> {
        if is_hidden(name) {
            return None;
        }
        self.store.stat(name).ok().map(export)
    }

    fn open_export(&self, name: &str, write: bool) -> Result<Arc<dyn Disk>, OpenError> {
        // The store's own VDIs (under construction, caches) are nobody's export.
        if is_hidden(name) {
            return Err(OpenError::NotFound(name.to_string()));
        }
        let disk = self
            .store
            .open_vdi(name, write)
            .map_err(|e| open_error(name, e))?;
        if !write {
            return Ok(self.handle(name, disk));
        }
        {
            let mut writers = self.writers.lock();
            let w = writers.entry(name.to_string()).or_default();
            let clash = match self.front {
                FrontEnd::Ring => w.ring > 0 || w.nbd > 0,
                FrontEnd::Nbd => w.ring > 0,
            };
            if clash {
                let holder = if w.ring > 0 {
                    "a guest's ring"
                } else {
                    "NBD clients"
                };
                return Err(OpenError::Busy {
                    name: name.to_string(),
                    why: format!("it is attached writable to {holder}"),
                });
            }
            match self.front {
                FrontEnd::Ring => w.ring += 1,
                FrontEnd::Nbd => w.nbd += 1,
            }
        }
        let lease = WriterLease {
            disk,
            name: name.to_string(),
            front: self.front,
            writers: self.writers.clone(),
        };
        Ok(self.handle(name, lease))
    }
}

/// A writable handle; dropping it lets other front ends write again.
struct WriterLease {
    disk: StoreDisk,
    name: String,
    front: FrontEnd,
    writers: Arc<Mutex<HashMap<String, Writers>>>,
}

impl Drop for WriterLease {
    fn drop(&mut self) {
        let mut writers = self.writers.lock();
        if let Some(w) = writers.get_mut(&self.name) {
            match self.front {
                FrontEnd::Ring => w.ring = w.ring.saturating_sub(1),
                FrontEnd::Nbd => w.nbd = w.nbd.saturating_sub(1),
            }
            if w.ring == 0 && w.nbd == 0 {
                writers.remove(&self.name);
            }
        }
    }
}

impl Disk for WriterLease {
    fn size(&self) -> u64 {
        self.disk.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        self.disk.read_at(buf, offset)
    }
    fn read_nowait(&self, buf: &mut [u8], offset: u64) -> Option<Result<(), DiskError>> {
        Disk::read_nowait(&self.disk, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), DiskError> {
        self.disk.write_at(buf, offset, fua)
    }
    fn flush(&self) -> Result<(), DiskError> {
        self.disk.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        Disk::discard(&self.disk, offset, len)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), DiskError> {
        Disk::write_zeroes(&self.disk, offset, len, no_hole, fua)
    }
    fn block_status(&self, offset: u64, len: u64, max: usize) -> Result<Vec<Extent>, DiskError> {
        self.disk.block_status(offset, len, max)
    }
    fn block_hashes(&self, offset: u64, len: u64, max: usize) -> Result<BlockHashes, DiskError> {
        self.disk.block_hashes(offset, len, max)
    }
    fn cache(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.disk.cache(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::device::MemDevice;

    #[test]
    fn ring_writers_are_exclusive() {
        let dev = Arc::new(MemDevice::new(64 << 20));
        Store::format(&*dev, 64 << 20).unwrap();
        let store = Store::open_device(dev, Default::default()).unwrap();
        store.create_vdi("a", 1 << 20).unwrap();
        store.snapshot("a", "s").unwrap();
        let nbd = StoreProvider::new(store.clone(), FrontEnd::Nbd);
        let ring = nbd.sibling(FrontEnd::Ring);
        let n1 = nbd.open_export("a", true).unwrap();
        let _n2 = nbd.open_export("a", true).unwrap();
        assert!(matches!(
            ring.open_export("a", true),
            Err(OpenError::Busy { .. })
        ));
        assert!(ring.open_export("a", false).is_ok());
        drop(n1);
        drop(_n2);
        let r = ring.open_export("a", true).unwrap();
        assert!(matches!(
            nbd.open_export("a", true),
            Err(OpenError::Busy { .. })
        ));
        assert!(matches!(
            ring.open_export("a", true),
            Err(OpenError::Busy { .. })
        ));
        drop(r);
        assert!(nbd.open_export("a", true).is_ok());
        assert!(matches!(
            nbd.open_export("a@s", true),
            Err(OpenError::ReadOnly(_))
        ));
        let list = nbd.list_exports();
        assert!(list.iter().any(|e| e.name == "a@s" && e.read_only));
        assert_eq!(
            nbd.export_info("a@s").as_ref(),
            list.iter().find(|e| e.name == "a@s")
        );
        assert_eq!(nbd.export_info("nope"), None);
        assert!(matches!(
            nbd.open_export("nope", false),
            Err(OpenError::NotFound(_))
        ));
    }
}
