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

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use super::lease::{connect, Holder, LeaseConfig, LeaseError};
use crate::store::{Kind, VdiSummary};

/// Operations per transaction (etcd's default limit is 128).
const TXN_OPS: usize = 100;

/// What the directory says of one VDI or snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub kind: Kind,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
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
}

fn vdis_prefix(store: &str) -> String {
    format!("/parallax/v1/stores/{store}/vdis/")
}

/// What this process last published for one store, and its connection to etcd.
#[derive(Default)]
pub struct Publisher {
    conn: Option<(tokio::runtime::Runtime, Client)>,
    /// Key → value as etcd holds them (read on first use).
    published: Option<BTreeMap<String, Vec<u8>>>,
}

impl Publisher {
    /// Makes the directory of `store` (`pool/name`) say `vdis`, as the owner holding `token`.
    /// Returns how many keys changed.
    pub fn publish(
        &mut self,
        cfg: &LeaseConfig,
        store: &str,
        token: i64,
        vdis: &[VdiSummary],
    ) -> Result<usize, LeaseError> {
        if self.conn.is_none() {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| LeaseError::Etcd(e.to_string()))?;
            let client = rt.block_on(connect(cfg))?;
            self.conn = Some((rt, client));
        }
        let (rt, client) = self.conn.as_mut().expect("connected above");
        let prefix = vdis_prefix(store);
        let published = match &mut self.published {
            Some(p) => p,
            None => {
                let r =
                    rt.block_on(client.get(prefix.clone(), Some(GetOptions::new().with_prefix())))?;
                let now = r
                    .kvs()
                    .iter()
                    .map(|kv| {
                        (
                            String::from_utf8_lossy(kv.key()).into_owned(),
                            kv.value().to_vec(),
                        )
                    })
                    .collect();
                self.published.insert(now)
            }
        };
        let wanted: BTreeMap<String, Vec<u8>> = vdis
            .iter()
            .map(|v| {
                let e = Entry {
                    kind: v.kind,
                    size: v.size,
                    origin: v.origin.clone(),
                };
                let value = serde_json::to_vec(&e).expect("an entry serialises");
                (format!("{prefix}{}", v.name), value)
            })
            .collect();
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
        let owner = format!("/parallax/v1/stores/{store}/owner");
        for chunk in ops.chunks(TXN_OPS) {
            let txn = Txn::new()
                .when([Compare::create_revision(
                    owner.clone(),
                    CompareOp::Equal,
                    token,
                )])
                .and_then(chunk.to_vec());
            let r = rt.block_on(client.txn(txn));
            let ok = match r {
                Ok(r) => r.succeeded(),
                Err(e) => {
                    // What etcd holds is not known now: read it again next time.
                    self.published = None;
                    return Err(e.into());
                }
            };
            if !ok {
                self.published = None;
                return Err(LeaseError::Etcd(format!(
                    "this host no longer owns store {store}: its directory was left as it is"
                )));
            }
        }
        *published = wanted;
        Ok(changed)
    }
}

/// Every VDI and snapshot the directory lists for the stores of `pool`, by store then name.
pub fn list(cfg: &LeaseConfig, pool: &str) -> Result<Vec<Listed>, LeaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| LeaseError::Etcd(e.to_string()))?;
    rt.block_on(async {
        let mut c = connect(cfg).await?;
        let base = format!("/parallax/v1/stores/{pool}/");
        let r = c
            .get(base.clone(), Some(GetOptions::new().with_prefix()))
            .await?;
        let mut hosts = BTreeMap::new();
        let mut out = Vec::new();
        for kv in r.kvs() {
            let key = String::from_utf8_lossy(kv.key());
            let Some(rest) = key.strip_prefix(&base) else {
                continue;
            };
            let Some((store, what)) = rest.split_once('/') else {
                continue;
            };
            if what == "owner" {
                if let Ok(h) = serde_json::from_slice::<Holder>(kv.value()) {
                    hosts.insert(store.to_string(), h.host);
                }
            } else if let Some(name) = what.strip_prefix("vdis/") {
                if let Ok(entry) = serde_json::from_slice::<Entry>(kv.value()) {
                    out.push(Listed {
                        name: name.to_string(),
                        store: store.to_string(),
                        entry,
                        host: None,
                    });
                }
            }
        }
        for l in &mut out {
            l.host = hosts.get(&l.store).cloned();
        }
        Ok(out)
    })
}
