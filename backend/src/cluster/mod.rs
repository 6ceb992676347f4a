//! Stores in a Ceph cluster: a store's bytes in a RADOS pool, its ownership in etcd.
//!
//! `--store rados:POOL/NAME` names store NAME in RADOS pool POOL: its blocks are objects in
//! the pool's namespace NAME ([`device`]), and whichever host opens it holds an etcd lease on
//! it ([`lease`]), so that one host at a time writes it and any host can take it over when the
//! holder dies or lets go. Everything above the device (maps, log, commits, dedup, snapshots)
//! is the same store as on a local disk, in the same format.
//!
//! ```text
//!   parallax (host A) ──Store──► RadosDevice ──librados──► pool POOL, namespace NAME
//!        │ lease, keepalive                                       ▲
//!        ▼                                                        │ blocklisted before
//!      etcd  ◄── host B waits for A's lease, fences A out ────────┘ B reads anything
//! ```

pub mod cache;
pub mod device;
pub mod directory;
mod etcd;
pub mod lease;
pub mod rados;
pub mod snapshots;

pub use snapshots::remote;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError, StoreOptions};

/// The prefix that makes `--store` name a store in RADOS.
pub const SCHEME: &str = "rados:";

/// A store in a RADOS pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RadosStore {
    pub pool: String,
    pub name: String,
}

impl RadosStore {
    /// `Some` when `spec` is `rados:POOL/NAME` (an error if it is malformed), `None` when it
    /// names a local file or device.
    pub fn parse(spec: &Path) -> Option<Result<RadosStore, String>> {
        let s = spec.to_str()?.strip_prefix(SCHEME)?;
        let bad = |why: &str| {
            Err(format!(
                "--store {SCHEME}{s}: {why} (expected {SCHEME}POOL/NAME)"
            ))
        };
        let Some((pool, name)) = s.split_once('/') else {
            return Some(bad("no store name"));
        };
        let ok = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        Some(if !ok(pool) {
            bad("the pool name is empty or has characters other than letters, digits, - _ .")
        } else if !ok(name) {
            bad("the store name is empty or has characters other than letters, digits, - _ .")
        } else {
            Ok(RadosStore {
                pool: pool.to_string(),
                name: name.to_string(),
            })
        })
    }

    /// The key its lease and records live under in etcd.
    fn key(&self) -> String {
        format!("{}/{}", self.pool, self.name)
    }
}

impl std::fmt::Display for RadosStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{SCHEME}{}/{}", self.pool, self.name)
    }
}

/// How to reach the cluster: the `cluster` section of `parallax.ron`, and the global
/// `--ceph-conf`, `--etcd`, `--host`, `--lease-ttl` options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Ceph's configuration file (mon addresses, keyring).
    pub ceph_conf: PathBuf,
    /// The Ceph user Parallax connects as (`client.USER`): it needs `rw` on the pool and the
    /// mon command `osd blocklist`.
    pub ceph_user: String,
    /// etcd client URLs.
    pub etcd: Vec<String>,
    /// This host's name in ownership records (default: the system's host name).
    pub host: Option<String>,
    /// Seconds a host that stopped renewing keeps a store before another may take it over.
    pub lease_ttl_secs: u64,
    /// Where this host keeps its local cache of each store's blocks (a directory per store).
    /// Default: /var/cache/parallax for root, else $XDG_CACHE_HOME/parallax or
    /// ~/.cache/parallax.
    pub cache_dir: Option<PathBuf>,
    /// The most the local cache of one store holds (bytes); 0: no local cache.
    pub cache_bytes: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            ceph_conf: PathBuf::from("/etc/ceph/ceph.conf"),
            ceph_user: "admin".into(),
            etcd: vec!["http://127.0.0.1:2379".into()],
            host: None,
            lease_ttl_secs: 5,
            cache_dir: None,
            cache_bytes: 8 << 30,
        }
    }
}

impl ClusterConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.etcd.is_empty() {
            return Err("cluster.etcd: no etcd endpoint".into());
        }
        if self.lease_ttl_secs == 0 {
            return Err("cluster.lease_ttl_secs must be at least 1".into());
        }
        Ok(())
    }

    /// The directory of `store`'s local cache.
    fn cache_dir(&self, store: &RadosStore) -> PathBuf {
        let base = self.cache_dir.clone().unwrap_or_else(default_cache_dir);
        base.join(&store.pool).join(&store.name)
    }

    fn lease(&self) -> lease::LeaseConfig {
        lease::LeaseConfig {
            endpoints: self.etcd.clone(),
            ttl: Duration::from_secs(self.lease_ttl_secs),
            host: self.host.clone().unwrap_or_else(hostname),
        }
    }
}

fn default_cache_dir() -> PathBuf {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } == 0 {
        return PathBuf::from("/var/cache/parallax");
    }
    match (std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME")) {
        (Some(d), _) if !d.is_empty() => PathBuf::from(d).join("parallax"),
        (_, Some(h)) if !h.is_empty() => PathBuf::from(h).join(".cache/parallax"),
        _ => std::env::temp_dir().join("parallax-cache"),
    }
}

/// The system's host name.
pub fn hostname() -> String {
    let mut b = [0u8; 256];
    // SAFETY: `b` is writable for its length; gethostname NUL-terminates within it or
    // truncates.
    let r = unsafe { libc::gethostname(b.as_mut_ptr().cast(), b.len()) };
    if r != 0 {
        return "localhost".into();
    }
    let n = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..n]).into_owned()
}

/// Why a cluster store did not open.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("store {store} is held by {holder}")]
    Held {
        store: RadosStore,
        holder: lease::Holder,
    },
    #[error("store {0} does not exist (create it with `parallax --store {0} init --size SIZE`)")]
    NoStore(RadosStore),
    #[error("store {0} exists already")]
    Exists(RadosStore),
    #[error("Ceph: {0}")]
    Rados(std::io::Error),
    #[error("the local cache in {}: {err}", dir.display())]
    Cache { dir: PathBuf, err: std::io::Error },
    #[error("{0}")]
    Lease(lease::LeaseError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a store in RADOS holds on to while it is open: its ownership (released last, after the
/// device has synced and dropped).
struct Held {
    ownership: lease::Ownership,
    directory: parking_lot::Mutex<directory::Publisher>,
}

impl Held {
    fn new(ownership: lease::Ownership) -> Box<Held> {
        Box::new(Held {
            ownership,
            directory: Default::default(),
        })
    }

    fn of(store: &Store) -> Option<&Held> {
        store.held()?.downcast_ref::<Held>()
    }
}

/// The fence of a store opened from RADOS (`None` for any other store): a daemon waits on it
/// to stop serving once its lease is gone.
pub fn fence_of(store: &Store) -> Option<Arc<lease::Fence>> {
    Some(Held::of(store)?.ownership.fence().clone())
}

/// Publishes the VDIs of `store`, if it is a store in RADOS, to the pool's directory in etcd
/// (`directory.rs`). Returns how many entries changed.
pub fn publish(store: &Store) -> Result<usize, ClusterError> {
    let Some(held) = Held::of(store) else {
        return Ok(0);
    };
    let o = &held.ownership;
    // Locked before the listing: a snapshot being deleted meanwhile (`snapshots.rs`) is
    // either not listed or not yet deleted.
    let mut directory = held.directory.lock();
    let vdis = store.list()?;
    let roots = store.map_roots()?;
    directory
        .publish(o.config(), o.store(), o.token(), &vdis, &roots)
        .map_err(ClusterError::Lease)
}

/// Every VDI and snapshot of every store in `pool`, as the directory in etcd lists them.
pub fn list(pool: &str, cfg: &ClusterConfig) -> Result<Vec<directory::Listed>, ClusterError> {
    directory::list(&cfg.lease(), pool).map_err(ClusterError::Lease)
}

fn connect(store: &RadosStore, cfg: &ClusterConfig) -> Result<rados::IoCtx, ClusterError> {
    let r = rados::Rados::connect(&cfg.ceph_conf, &cfg.ceph_user).map_err(ClusterError::Rados)?;
    r.ioctx(&store.pool, &store.name)
        .map_err(ClusterError::Rados)
}

/// Connects to `store`, which must exist.
fn connect_existing(store: &RadosStore, cfg: &ClusterConfig) -> Result<rados::IoCtx, ClusterError> {
    let io = connect(store, cfg)?;
    if io
        .stat(device::HEADER_OBJECT)
        .map_err(ClusterError::Rados)?
        .is_none()
    {
        return Err(ClusterError::NoStore(store.clone()));
    }
    Ok(io)
}

/// Takes `store` for this host: waiting for its holder when `wait` (saying so through
/// `on_wait`), failing with [`ClusterError::Held`] otherwise.
fn own(
    store: &RadosStore,
    cfg: &ClusterConfig,
    io: &rados::IoCtx,
    wait: bool,
    on_wait: &mut dyn FnMut(&lease::Holder),
) -> Result<lease::Ownership, ClusterError> {
    lease::acquire(&cfg.lease(), &store.key(), io.rados(), wait, on_wait).map_err(|e| match e {
        lease::LeaseError::Held(holder) => ClusterError::Held {
            store: store.clone(),
            holder,
        },
        e => ClusterError::Lease(e),
    })
}

/// The device a store is opened on: its RADOS objects, behind the local cache unless that is
/// off.
fn stack(
    store: &RadosStore,
    cfg: &ClusterConfig,
    dev: device::RadosDevice,
    owner: &lease::Ownership,
) -> Result<Arc<dyn crate::store::device::Device>, ClusterError> {
    if cfg.cache_bytes == 0 {
        return Ok(Arc::new(dev));
    }
    let dir = cfg.cache_dir(store);
    let cached = cache::CachedDevice::open(
        dev,
        &dir,
        cfg.cache_bytes,
        owner.token(),
        owner.released_with(),
    )
    .map_err(|err| ClusterError::Cache { dir, err })?;
    Ok(Arc::new(cached))
}

/// Creates store `store` of `size` bytes and opens it.
pub fn create(
    store: &RadosStore,
    cfg: &ClusterConfig,
    size: u64,
    options: StoreOptions,
) -> Result<Arc<Store>, ClusterError> {
    let io = connect(store, cfg)?;
    let owner = own(store, cfg, &io, false, &mut |_| {})?;
    crate::store::format::Geometry::for_size(size)?;
    let dev = device::RadosDevice::create(io, size, Some(owner.fence().clone())).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            ClusterError::Exists(store.clone())
        } else {
            ClusterError::Rados(e)
        }
    })?;
    let dev = stack(store, cfg, dev, &owner)?;
    Store::format(&*dev, size)?;
    guarded(Store::open_held(
        dev,
        options,
        PathBuf::from(store.to_string()),
        Held::new(owner),
    )?)
}

/// `store`, whose snapshots go only once no other store holds them.
fn guarded(store: Arc<Store>) -> Result<Arc<Store>, ClusterError> {
    store.set_snapshot_guard(Arc::new(snapshots::HoldGuard));
    Ok(store)
}

/// Opens `store`, taking it for this host: with `wait`, once its holder lets go or its lease
/// runs out (`on_wait` is told whom it waits for); without, failing with
/// [`ClusterError::Held`].
pub fn open(
    store: &RadosStore,
    cfg: &ClusterConfig,
    options: StoreOptions,
    wait: bool,
    on_wait: &mut dyn FnMut(&lease::Holder),
) -> Result<Arc<Store>, ClusterError> {
    let io = connect_existing(store, cfg)?;
    let owner = own(store, cfg, &io, wait, on_wait)?;
    let dev =
        device::RadosDevice::open(io, Some(owner.fence().clone())).map_err(ClusterError::Rados)?;
    guarded(Store::open_held(
        stack(store, cfg, dev, &owner)?,
        options,
        PathBuf::from(store.to_string()),
        Held::new(owner),
    )?)
}

/// Removes store `store`: every object it has (the header last), this host's cache of it,
/// then its records in etcd. Takes it first, so not while another host holds it. How many
/// objects went.
pub fn destroy(store: &RadosStore, cfg: &ClusterConfig) -> Result<u64, ClusterError> {
    let io = connect_existing(store, cfg)?;
    let owner = own(store, cfg, &io, false, &mut |_| {})?;
    // Its directory goes first, in a transaction that finds no holds on its snapshots: from
    // then on no other store can hold one.
    let base = format!("/parallax/v1/stores/{}/", store.key());
    let holds = format!("{base}holds/");
    let txn = etcd_client::Txn::new()
        .when([
            etcd_client::Compare::create_revision(
                format!("{base}owner"),
                etcd_client::CompareOp::Equal,
                owner.token(),
            ),
            etcd_client::Compare::version(holds.clone(), etcd_client::CompareOp::Equal, 0)
                .with_prefix(),
        ])
        .and_then([etcd_client::TxnOp::delete(
            format!("{base}vdis/"),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )]);
    let held = etcd::Etcd::connect(&cfg.lease())
        .and_then(|mut e| match e.txn(txn)?.succeeded() {
            true => Ok(Vec::new()),
            false => e.get_prefix(&holds),
        })
        .map_err(ClusterError::Lease)?;
    if !held.is_empty() {
        let what: Vec<&str> = held
            .iter()
            .filter_map(|(k, _)| k.strip_prefix(&holds))
            .collect();
        return Err(ClusterError::Lease(lease::LeaseError::Etcd(format!(
            "store {store} has snapshots that forks in other stores read through ({}): delete              or hydrate those first",
            what.join(", ").replace("/by/", " by ")
        ))));
    }
    let dev =
        device::RadosDevice::open(io, Some(owner.fence().clone())).map_err(ClusterError::Rados)?;
    let n = dev.destroy().map_err(ClusterError::Rados)?;
    let _ = std::fs::remove_dir_all(cfg.cache_dir(store));
    // What it held of other stores' snapshots goes with it.
    use crate::store::Remote;
    snapshots::SnapshotRemote::new(cfg, &store.key())
        .release_unused(&[])
        .map_err(ClusterError::Store)?;
    owner.forget().map_err(ClusterError::Lease)?;
    Ok(n + 1)
}
