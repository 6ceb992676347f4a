//! Forks across stores: a VDI in one store backed by a snapshot of another store in the same
//! cluster, read straight from RADOS, and the holds in etcd that keep the snapshot while it is.
//!
//! ```text
//!  store B (host B)                 etcd                          store A (host A, or nobody)
//!  vdi create vm --backing rados:POOL/A/tpl@gold
//!   hold ──txn: if A's entry for tpl@gold exists──► …/stores/POOL/A/holds/tpl@gold/by/POOL/B
//!                                                   …/holders/POOL/B/<uri>
//!   read of a hole ─► SnapshotRemote ─ entry's map root ─► SnapshotMap over A's objects (RADOS)
//!                                                        (every node and block hash-checked)
//!   last VDI backed by it gone ─► release (both keys)
//!                                    A: vdi delete tpl@gold ─► txn: if no holds, take the
//!                                       entry out; then delete (the publisher waits meanwhile)
//! ```
//!
//! Why this is safe without asking A's owner anything: a snapshot's map and blocks never change
//! while it exists, and every pointer from the published root down carries the hash of what it
//! points at, so a read can only return the snapshot's bytes or fail (`store/foreign.rs`). The
//! holds are what keeps the snapshot existing: A's owner deletes (or renames) a snapshot only
//! after a transaction that finds no hold on it and takes its entry out of the directory, and
//! B holds only through a transaction that finds the entry there; etcd orders the two, so
//! either B's hold comes first and A refuses, or A's comes first and B's hold fails. While the
//! deletion runs, A's publisher waits, so it cannot put the entry back in between.
//!
//! A hold outlives a crash between it and the VDI it was for, or between the last VDI's delete
//! and its release: `gc` on B releases every hold of B's that nothing in B reads through
//! (`holders/POOL/B/` lists them).

use std::{collections::HashMap, sync::Arc};

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use parking_lot::Mutex;

use super::{
    device::RadosDevice,
    directory::{entry_key, holds_prefix, Entry, Unpublish},
    etcd::Etcd,
    lease::{LeaseConfig, LeaseError},
    rados::Rados,
    ClusterConfig, Held, SCHEME,
};
use crate::store::{
    MapRoot, Remote, RemoteBlock, SnapshotGuard, SnapshotMap, Store, StoreError, StoreResult,
};

/// A snapshot of another store, as a backing URI names it: `rados:POOL/STORE/VDI@SNAP`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SnapshotUri {
    /// `POOL/STORE`
    store: String,
    pool: String,
    namespace: String,
    /// `VDI@SNAP`
    name: String,
}

impl SnapshotUri {
    fn parse(uri: &str) -> StoreResult<SnapshotUri> {
        let bad = |why: &str| {
            StoreError::Invalid(format!(
                "{uri}: {why} (a snapshot in another store is {SCHEME}POOL/STORE/VDI@SNAP)"
            ))
        };
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| bad("not a rados: URI"))?;
        let mut parts = rest.splitn(3, '/');
        let (Some(pool), Some(namespace), Some(name)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("too few parts"));
        };
        if pool.is_empty() || namespace.is_empty() || name.contains('/') {
            return Err(bad("empty or malformed parts"));
        }
        match name.split_once('@') {
            Some((v, s)) if !v.is_empty() && !s.is_empty() => {}
            _ => return Err(bad("not a snapshot: forks are made from snapshots")),
        }
        Ok(SnapshotUri {
            store: format!("{pool}/{namespace}"),
            pool: pool.into(),
            namespace: namespace.into(),
            name: name.into(),
        })
    }

    fn hold_key(&self, holder: &str) -> String {
        format!("{}{holder}", holds_prefix(&self.store, &self.name))
    }
}

fn holder_key(holder: &str, uri: &str) -> String {
    format!("/parallax/v1/holders/{holder}/{uri}")
}

fn etcd_err(e: LeaseError) -> StoreError {
    StoreError::Remote(e.to_string())
}

/// Reads snapshots of other stores of the cluster straight from RADOS, for the store `holder`
/// (`POOL/NAME`), which holds what it reads.
pub struct SnapshotRemote {
    ceph: (std::path::PathBuf, String),
    lease: LeaseConfig,
    holder: String,
    etcd: Mutex<Option<Etcd>>,
    rados: Mutex<Option<Arc<Rados>>>,
    maps: Mutex<HashMap<String, Arc<SnapshotMap>>>,
}

impl SnapshotRemote {
    pub fn new(cfg: &ClusterConfig, holder: &str) -> SnapshotRemote {
        SnapshotRemote {
            ceph: (cfg.ceph_conf.clone(), cfg.ceph_user.clone()),
            lease: cfg.lease(),
            holder: holder.to_string(),
            etcd: Mutex::new(None),
            rados: Mutex::new(None),
            maps: Mutex::new(HashMap::new()),
        }
    }

    /// Runs `f` on the connection to etcd, made on first use and again after a failure.
    fn etcd<R>(&self, f: impl FnOnce(&mut Etcd) -> Result<R, LeaseError>) -> StoreResult<R> {
        let mut conn = self.etcd.lock();
        if conn.is_none() {
            *conn = Some(Etcd::connect(&self.lease).map_err(etcd_err)?);
        }
        let r = f(conn.as_mut().expect("connected above"));
        if r.is_err() {
            *conn = None;
        }
        r.map_err(etcd_err)
    }

    /// What the directory says of the snapshot `u` names.
    fn entry(&self, uri: &str, u: &SnapshotUri) -> StoreResult<Entry> {
        let key = entry_key(&u.store, &u.name);
        let Some(v) = self.etcd(|e| e.get(&key))? else {
            return Err(StoreError::Remote(format!(
                "{uri}: store {} has no snapshot {} in the pool's directory (`parallax cluster \
                 list`; its owner publishes a snapshot within a second of its first checkpoint)",
                u.store, u.name
            )));
        };
        serde_json::from_slice(&v)
            .map_err(|e| StoreError::Remote(format!("{uri}: its directory entry: {e}")))
    }

    /// The map of the snapshot `uri` names, from the directory's root (again, with `fresh`).
    fn map(&self, uri: &str, fresh: bool) -> StoreResult<Arc<SnapshotMap>> {
        if !fresh {
            if let Some(m) = self.maps.lock().get(uri) {
                return Ok(m.clone());
            }
        }
        let u = SnapshotUri::parse(uri)?;
        let entry = self.entry(uri, &u)?;
        let root: MapRoot = entry.map.ok_or_else(|| {
            StoreError::Remote(format!(
                "{uri} cannot be read straight from RADOS: its store has not published where its \
                 map is (it is remote-backed itself, or was taken since the last checkpoint)"
            ))
        })?;
        let rados = {
            let mut r = self.rados.lock();
            match &*r {
                Some(r) => r.clone(),
                None => r
                    .insert(Rados::connect(&self.ceph.0, &self.ceph.1)?)
                    .clone(),
            }
        };
        let dev = RadosDevice::open(rados.ioctx(&u.pool, &u.namespace)?, None)?;
        let m = Arc::new(SnapshotMap::new(Arc::new(dev), &root)?);
        self.maps.lock().insert(uri.to_string(), m.clone());
        Ok(m)
    }

    /// Runs `f` on the map of `uri`; if what it read fails its checksum, once more on the
    /// map the directory names now (its store's owner crashed before the checkpoint that
    /// wrote the root it had published, and published another since).
    fn with_map<R>(
        &self,
        uri: &str,
        mut f: impl FnMut(&SnapshotMap) -> StoreResult<R>,
    ) -> StoreResult<R> {
        match f(&*self.map(uri, false)?) {
            Err(StoreError::Corrupt(why)) => {
                tracing::warn!(uri, "{why}: reading the snapshot's map root again");
                f(&*self.map(uri, true)?)
            }
            r => r,
        }
    }
}

impl Remote for SnapshotRemote {
    fn blocks(&self, uri: &str, offset: u64, len: u64) -> StoreResult<Option<Vec<RemoteBlock>>> {
        self.with_map(uri, |m| m.blocks(offset, len)).map(Some)
    }

    fn size(&self, uri: &str) -> StoreResult<u64> {
        Ok(self.map(uri, false)?.size())
    }

    fn read(&self, uri: &str, buf: &mut [u8], offset: u64) -> StoreResult<()> {
        self.with_map(uri, |m| m.read(buf, offset))
    }

    fn state(&self, uri: &str) -> String {
        match SnapshotUri::parse(uri) {
            Ok(u) => format!(
                "read straight from RADOS (store {SCHEME}{}), held in etcd",
                u.store
            ),
            Err(e) => e.to_string(),
        }
    }

    fn hold(&self, uri: &str) -> StoreResult<()> {
        let u = SnapshotUri::parse(uri)?;
        let entry = entry_key(&u.store, &u.name);
        let value = serde_json::json!({ "host": self.lease.host }).to_string();
        let txn = Txn::new()
            .when([Compare::version(entry, CompareOp::Greater, 0)])
            .and_then([
                TxnOp::put(u.hold_key(&self.holder), value.clone(), None),
                TxnOp::put(holder_key(&self.holder, uri), value, None),
            ]);
        if self.etcd(|e| e.txn(txn))?.succeeded() {
            return Ok(());
        }
        Err(StoreError::Remote(format!(
            "{uri}: store {} has no snapshot {} in the pool's directory now",
            u.store, u.name
        )))
    }

    fn release(&self, uri: &str) -> StoreResult<()> {
        let u = SnapshotUri::parse(uri)?;
        let txn = Txn::new().and_then([
            TxnOp::delete(u.hold_key(&self.holder), None),
            TxnOp::delete(holder_key(&self.holder, uri), None),
        ]);
        self.etcd(|e| e.txn(txn))?;
        self.maps.lock().remove(uri);
        Ok(())
    }

    fn release_unused(&self, in_use: &[String]) -> StoreResult<usize> {
        let prefix = holder_key(&self.holder, "");
        let held = self.etcd(|e| e.get_prefix(&prefix))?;
        let mut n = 0;
        for (k, _) in held {
            let uri = &k[prefix.len()..];
            if !in_use.iter().any(|u| u == uri) {
                tracing::info!(uri, "releasing a hold nothing in this store reads through");
                self.release(uri)?;
                n += 1;
            }
        }
        Ok(n)
    }
}

/// The store's way to backings: snapshots of other stores of the cluster straight from RADOS
/// (`rados:` URIs), everything else through `other` (NBD).
pub struct Routes {
    snapshots: Option<SnapshotRemote>,
    other: Arc<dyn Remote>,
}

impl Routes {
    fn route(&self, uri: &str) -> StoreResult<&dyn Remote> {
        if !uri.starts_with(SCHEME) {
            return Ok(&*self.other);
        }
        match &self.snapshots {
            Some(s) => Ok(s),
            None => Err(StoreError::Invalid(format!(
                "{uri}: a fork of a snapshot in RADOS lives in a store of the same cluster \
                 (--store {SCHEME}POOL/NAME), which holds the snapshot in etcd"
            ))),
        }
    }
}

impl Remote for Routes {
    fn blocks(&self, uri: &str, offset: u64, len: u64) -> StoreResult<Option<Vec<RemoteBlock>>> {
        self.route(uri)?.blocks(uri, offset, len)
    }
    fn size(&self, uri: &str) -> StoreResult<u64> {
        self.route(uri)?.size(uri)
    }
    fn read(&self, uri: &str, buf: &mut [u8], offset: u64) -> StoreResult<()> {
        self.route(uri)?.read(uri, buf, offset)
    }
    fn state(&self, uri: &str) -> String {
        match self.route(uri) {
            Ok(r) => r.state(uri),
            Err(e) => e.to_string(),
        }
    }
    fn hold(&self, uri: &str) -> StoreResult<()> {
        self.route(uri)?.hold(uri)
    }
    fn release(&self, uri: &str) -> StoreResult<()> {
        self.route(uri)?.release(uri)
    }
    fn release_unused(&self, in_use: &[String]) -> StoreResult<usize> {
        let mut n = self.other.release_unused(in_use)?;
        if let Some(s) = &self.snapshots {
            n += s.release_unused(in_use)?;
        }
        Ok(n)
    }
}

/// The remote `store` reads its backings through: `other` (NBD) for everything, and for a store
/// in RADOS also the snapshots of other stores of its cluster, straight from RADOS.
pub fn remote(store: &Store, cfg: &ClusterConfig, other: Arc<dyn Remote>) -> Arc<dyn Remote> {
    let snapshots = Held::of(store).map(|h| SnapshotRemote::new(cfg, h.ownership.store()));
    Arc::new(Routes { snapshots, other })
}

/// What a store in RADOS asks before its snapshots go: that no other store holds them.
pub(super) struct HoldGuard;

impl SnapshotGuard for HoldGuard {
    fn releasing(
        &self,
        store: &Store,
        snapshots: &[String],
        apply: &mut dyn FnMut() -> StoreResult<()>,
    ) -> StoreResult<()> {
        let Some(held) = Held::of(store) else {
            return apply();
        };
        let o = &held.ownership;
        // Held until `apply` is done: the publisher must not put the entries back meanwhile.
        let mut directory = held.directory.lock();
        match directory.unpublish(o.config(), o.store(), o.token(), snapshots) {
            Ok(()) => apply(),
            Err(Unpublish::Held(held)) => {
                let what: Vec<String> = held
                    .iter()
                    .map(|(snap, by)| format!("{snap} (store {SCHEME}{by})"))
                    .collect();
                Err(StoreError::Busy(format!(
                    "forks in other stores read through {}: delete those forks or `vdi hydrate` \
                     them first",
                    what.join(", ")
                )))
            }
            Err(Unpublish::Etcd(e)) => Err(StoreError::Remote(format!(
                "asking etcd whether other stores hold these snapshots: {e}"
            ))),
        }
    }
}
