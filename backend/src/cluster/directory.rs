//! The pool's directory of VDIs in etcd: the owner of each store publishes the names, kinds and
//! sizes of the store's VDIs and snapshots under the store's keys, so that any host lists every
//! VDI of every store in a pool, with the host that serves it, without opening a store
//! (`parallax cluster list`).
//!
//! The store's own registry stays the truth; the directory follows it. The daemon publishes
//! after every checkpoint that changed something, and at its stop; a command that opened the
//! store itself publishes when it closes it. Only the owner writes: every change is a
//! transaction that compares the `owner` key's create revision with the owner's fencing token,
//! so a host whose lease has gone cannot change the directory any more than the store.
//!
//! ```text
//!   /parallax/v1/stores/POOL/NAME/owner            the holder (lease.rs)
//!   /parallax/v1/stores/POOL/NAME/vdis/VDI[@SNAP]  {"kind": …, "size": …, "origin": …}
//! ```

use std::collections::BTreeMap;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use super::{
    etcd::Etcd,
    lease::{Holder, LeaseConfig, LeaseError},
};
use crate::store::{Kind, MapRoot, VdiSummary};

/// Operations per transaction (etcd's default limit is 128).
const TXN_OPS: usize = 100;

/// What the directory says of one VDI or snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub kind: Kind,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// A snapshot's map root, once a checkpoint has written it: what another store reads the
    /// snapshot through, straight from RADOS (`snapshots.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map: Option<MapRoot>,
}

/// One line of `parallax cluster list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listed {
    pub name: String,
    /// The store that holds it (`NAME` of `rados:POOL/NAME`).
    pub store: String,
    #[serde(flatten)]
    pub entry: Entry,
    /// The host serving the store now, if any.
    pub host: Option<String>,
    /// The stores (`POOL/NAME`) whose forks read this snapshot straight from RADOS
    /// (`snapshots.rs`): it is not deleted while any does.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held_by: Vec<String>,
}

/// The key of `name`'s entry in the directory of `store` (`pool/name`).
pub fn entry_key(store: &str, name: &str) -> String {
    format!("{}{name}", vdis_prefix(store))
}

fn vdis_prefix(store: &str) -> String {
    format!("/parallax/v1/stores/{store}/vdis/")
}

fn owner_key(store: &str) -> String {
    format!("/parallax/v1/stores/{store}/owner")
}

/// What this process last published for one store, and its connection to etcd.
#[derive(Default)]
pub struct Publisher {
    conn: Option<Etcd>,
    /// Key → value as etcd holds them (read on first use).
    published: Option<BTreeMap<String, Vec<u8>>>,
}

impl Publisher {
    fn etcd(&mut self, cfg: &LeaseConfig) -> Result<&mut Etcd, LeaseError> {
        if self.conn.is_none() {
            self.conn = Some(Etcd::connect(cfg)?);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    /// Makes the directory of `store` (`pool/name`) say `vdis`, with the map roots `roots` of
    /// its snapshots, as the owner holding `token`. Returns how many keys changed.
    pub fn publish(
        &mut self,
        cfg: &LeaseConfig,
        store: &str,
        token: i64,
        vdis: &[VdiSummary],
        roots: &[(String, MapRoot)],
    ) -> Result<usize, LeaseError> {
        let prefix = vdis_prefix(store);
        if self.published.is_none() {
            let now = self.etcd(cfg)?.get_prefix(&prefix)?;
            self.published = Some(now.into_iter().collect());
        }
        let roots: BTreeMap<&str, &MapRoot> = roots.iter().map(|(n, r)| (n.as_str(), r)).collect();
        let wanted: BTreeMap<String, Vec<u8>> = vdis
            .iter()
            .map(|v| {
                let e = Entry {
                    kind: v.kind,
                    size: v.size,
                    origin: v.origin.clone(),
                    map: roots.get(v.name.as_str()).map(|r| (*r).clone()),
                };
                let value = serde_json::to_vec(&e).expect("an entry serialises");
                (format!("{prefix}{}", v.name), value)
            })
            .collect();
        let published = self.published.as_ref().expect("read above");
        let mut ops = Vec::new();
        for (k, v) in &wanted {
            if published.get(k) != Some(v) {
                ops.push(TxnOp::put(k.clone(), v.clone(), None));
            }
        }
        for k in published.keys() {
            if !wanted.contains_key(k) {
                ops.push(TxnOp::delete(k.clone(), None));
            }
        }
        let changed = ops.len();
        let owner = owner_key(store);
        for chunk in ops.chunks(TXN_OPS) {
            let txn = Txn::new()
                .when([Compare::create_revision(
                    owner.clone(),
                    CompareOp::Equal,
                    token,
                )])
                .and_then(chunk.to_vec());
            let r = self.etcd(cfg)?.txn(txn);
            let ok = match r {
                Ok(r) => r.succeeded(),
                Err(e) => {
                    // What etcd holds is not known now: read it again next time.
                    self.published = None;
                    return Err(e);
                }
            };
            if !ok {
                self.published = None;
                return Err(LeaseError::Etcd(format!(
                    "this host no longer owns store {store}: its directory was left as it is"
                )));
            }
        }
        self.published = Some(wanted);
        Ok(changed)
    }

    /// Takes the snapshots `names` of `store` out of its directory, unless another store holds
    /// one (`snapshots.rs`): then fails with [`Unpublish::Held`], naming the holders. One
    /// transaction per 100 names, each comparing that its names have no holds and that
    /// `token` still owns the store. A snapshot taken out stays out until the next publish,
    /// which puts back any that is still there (a delete that failed after this).
    pub fn unpublish(
        &mut self,
        cfg: &LeaseConfig,
        store: &str,
        token: i64,
        names: &[String],
    ) -> Result<(), Unpublish> {
        for chunk in names.chunks(TXN_OPS) {
            let mut when = vec![Compare::create_revision(
                owner_key(store),
                CompareOp::Equal,
                token,
            )];
            when.extend(chunk.iter().map(|n| {
                Compare::version(holds_prefix(store, n), CompareOp::Equal, 0).with_prefix()
            }));
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|n| TxnOp::delete(entry_key(store, n), None))
                .collect();
            let etcd = self.etcd(cfg)?;
            if etcd.txn(Txn::new().when(when).and_then(ops))?.succeeded() {
                if let Some(p) = &mut self.published {
                    for n in chunk {
                        p.remove(&entry_key(store, n));
                    }
                }
                continue;
            }
            let mut held = Vec::new();
            for n in chunk {
                for (k, _) in etcd.get_prefix(&holds_prefix(store, n))? {
                    let by = k.rsplit_once("/by/").map_or(k.as_str(), |(_, h)| h);
                    held.push((n.clone(), by.to_string()));
                }
            }
            if held.is_empty() {
                return Err(LeaseError::Etcd(format!(
                    "this host no longer owns store {store}: its directory was left as it is"
                ))
                .into());
            }
            return Err(Unpublish::Held(held));
        }
        Ok(())
    }
}

/// Why [`Publisher::unpublish`] took nothing out.
#[derive(Debug, thiserror::Error)]
pub enum Unpublish {
    /// (snapshot, store that holds it)
    #[error("held")]
    Held(Vec<(String, String)>),
    #[error(transparent)]
    Etcd(#[from] LeaseError),
}

/// The prefix of the holds on snapshot `name` of `store`: `…/holds/NAME/by/HOLDER`.
pub fn holds_prefix(store: &str, name: &str) -> String {
    format!("/parallax/v1/stores/{store}/holds/{name}/by/")
}

/// Every VDI and snapshot the directory lists for the stores of `pool`, by store then name.
pub fn list(cfg: &LeaseConfig, pool: &str) -> Result<Vec<Listed>, LeaseError> {
    let base = format!("/parallax/v1/stores/{pool}/");
    let kvs = Etcd::connect(cfg)?.get_prefix(&base)?;
    let mut hosts = BTreeMap::new();
    let mut holds: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let mut out = Vec::new();
    for (key, value) in kvs {
        let Some(rest) = key.strip_prefix(&base) else {
            continue;
        };
        let Some((store, what)) = rest.split_once('/') else {
            continue;
        };
        if what == "owner" {
            if let Ok(h) = serde_json::from_slice::<Holder>(&value) {
                hosts.insert(store.to_string(), h.host);
            }
        } else if let Some(name) = what.strip_prefix("vdis/") {
            if let Ok(entry) = serde_json::from_slice::<Entry>(&value) {
                out.push(Listed {
                    name: name.to_string(),
                    store: store.to_string(),
                    entry,
                    host: None,
                    held_by: Vec::new(),
                });
            }
        } else if let Some((name, by)) = what
            .strip_prefix("holds/")
            .and_then(|h| h.split_once("/by/"))
        {
            holds
                .entry((store.to_string(), name.to_string()))
                .or_default()
                .push(by.to_string());
        }
    }
    for l in &mut out {
        l.host = hosts.get(&l.store).cloned();
        if let Some(h) = holds.remove(&(l.store.clone(), l.name.clone())) {
            l.held_by = h;
        }
    }
    Ok(out)
}
