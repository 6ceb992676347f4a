//! One writer per store across hosts: an etcd lease names the host that owns a store in RADOS,
//! and the next owner fences the last one out of RADOS before it touches anything.
//!
//! Keys, per store (`POOL/NAME`), under `/parallax/v1/stores/POOL/NAME/`:
//! * `owner` — the holder ([`Holder`] as JSON), attached to a lease of `ttl` seconds that the
//!   holder keeps alive; it vanishes when the holder releases it or stops renewing it.
//! * `last-owner` — the same record without a lease: the owner that has not *released* the
//!   store yet, so that the next owner knows whom to fence even if that owner's lease ran out
//!   long before anyone looked.
//! * `released` — the fencing token of the last owner that released the store cleanly (a
//!   host's local cache of the store is good only if that token is its own: `cache.rs`).
//!
//! Taking the store is one etcd transaction: if `owner` does not exist, read `last-owner` and
//! `released`, write `owner`. The transaction's revision is the owner's fencing token. Then the
//! new owner fences `last-owner` (below), and only then names itself in `last-owner`, so that
//! a failed or interrupted takeover leaves the unfenced owner named for the next one. A clean
//! release deletes `owner` and `last-owner` and records its token in `released`, in one
//! transaction guarded by that token.
//!
//! **Fencing.** A RADOS operation touches one object, and the store writes many, so a guard
//! inside each write op (`cmpxattr` on a fence object) cannot cover them; a guard on every
//! object would need the new owner to stamp every object first. The next owner instead
//! *blocklists* the last owner's RADOS client in the OSD map (what RBD's exclusive lock does):
//! OSDs refuse every operation that client sends once they hold that map, and the new owner's
//! own operations carry the newer map, so none of its reads or writes can be overtaken by a
//! late one of the old owner's. The new owner blocklists before it reads the store. On its own
//! side, a holder stops sending writes once its lease may have expired ([`Fence`]): its local
//! deadline is the time it *sent* the last renewal that etcd answered, plus the TTL etcd
//! granted, minus a margin, so it is never later than etcd's own expiry.

use std::{
    io,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse,
};
use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use super::rados::Rados;

/// Where the lease and whose it is.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// etcd client URLs.
    pub endpoints: Vec<String>,
    /// How long a silent owner keeps the store (etcd rounds to whole seconds, at least 1).
    pub ttl: Duration,
    /// This host's name in the owner record.
    pub host: String,
}

/// Who holds (or last held) a store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    /// The holder's RADOS client addresses (what the next owner blocklists).
    pub addrs: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "host {} (PID {})", self.host, self.pid)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("held by {0}")]
    Held(Holder),
    #[error("etcd: {0}")]
    Etcd(String),
    #[error("fencing the last owner ({holder}) in RADOS: {err}")]
    Fence { holder: Holder, err: io::Error },
}

impl From<etcd_client::Error> for LeaseError {
    fn from(e: etcd_client::Error) -> Self {
        // gRPC wraps the cause several layers deep; the innermost says what happened.
        let mut cause: &dyn std::error::Error = match &e {
            etcd_client::Error::GRpcStatus(s) => s,
            e => e,
        };
        while let Some(inner) = cause.source() {
            cause = inner;
        }
        let text = match &e {
            etcd_client::Error::GRpcStatus(s) if std::ptr::addr_eq(cause, s) => {
                s.message().to_string()
            }
            _ => cause.to_string(),
        };
        LeaseError::Etcd(text)
    }
}

/// Until when this host may still write: checked before every write to the store's device.
///
/// While etcd cannot be reached the deadline is not extended, and writes *wait* for it (up to
/// a TTL) rather than fail: if etcd comes back and the lease is still alive, nobody else can
/// have taken the store, and the writes go on. Once etcd says the lease is gone, writes fail
/// for good.
pub struct Fence {
    base: Instant,
    /// Nanoseconds after `base`.
    deadline: AtomicU64,
    gone: AtomicBool,
    /// Set with `gone`, for [`Fence::wait_revoked`].
    revoked: Mutex<bool>,
    revoked_cv: Condvar,
    /// How long a write waits for a renewal before it fails.
    pause: Duration,
    store: String,
}

impl Fence {
    fn new(store: &str, pause: Duration) -> Fence {
        Fence {
            base: Instant::now(),
            deadline: AtomicU64::new(0),
            gone: AtomicBool::new(false),
            revoked: Mutex::new(false),
            revoked_cv: Condvar::new(),
            pause,
            store: store.to_string(),
        }
    }

    fn extend_to(&self, until: Instant) {
        let ns = until.saturating_duration_since(self.base).as_nanos() as u64;
        self.deadline.fetch_max(ns, Ordering::AcqRel);
    }

    /// Ends the right to write, for good.
    fn revoke(&self) {
        self.gone.store(true, Ordering::Release);
        self.deadline.store(0, Ordering::Release);
        *self.revoked.lock() = true;
        self.revoked_cv.notify_all();
    }

    /// Blocks until the right to write has ended for good (etcd said the lease is gone): what
    /// a daemon waits on to stop serving a store it no longer owns.
    pub fn wait_revoked(&self) {
        let mut r = self.revoked.lock();
        while !*r {
            self.revoked_cv.wait(&mut r);
        }
    }

    /// The store this fence guards (`pool/name`).
    pub fn store(&self) -> &str {
        &self.store
    }

    /// Whether this host may write now.
    pub fn valid(&self) -> bool {
        !self.gone.load(Ordering::Acquire)
            && (self.base.elapsed().as_nanos() as u64) < self.deadline.load(Ordering::Acquire)
    }

    /// `Ok` when this host may write (after waiting up to a TTL for a renewal); the error a
    /// write gets when it may not.
    pub fn check(&self) -> io::Result<()> {
        let start = Instant::now();
        while !self.valid() {
            if self.gone.load(Ordering::Acquire) || start.elapsed() >= self.pause {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "this host's lease on store {} has lapsed (another host may own it now)",
                        self.store
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

/// Ownership of one store; released (at once, for the next owner) when dropped.
pub struct Ownership {
    cfg: LeaseConfig,
    store: String,
    token: i64,
    /// The token the store was last cleanly released with, if no owner came since.
    released_with: Option<i64>,
    fence: Arc<Fence>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Ownership {
    /// The fencing token: the etcd revision at which this host took the store.
    pub fn token(&self) -> i64 {
        self.token
    }

    pub fn fence(&self) -> &Arc<Fence> {
        &self.fence
    }

    /// Where the lease is kept, and this host's name.
    pub fn config(&self) -> &LeaseConfig {
        &self.cfg
    }

    /// The store owned (`pool/name`).
    pub fn store(&self) -> &str {
        &self.store
    }

    /// Deletes every record of the store (it is gone), releasing it.
    pub fn forget(mut self) -> Result<(), LeaseError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| LeaseError::Etcd(e.to_string()))?;
        rt.block_on(async {
            let mut c = connect(&self.cfg).await?;
            let prefix = format!("/parallax/v1/stores/{}/", self.store);
            c.delete(prefix, Some(DeleteOptions::new().with_prefix()))
                .await?;
            Ok(())
        })
    }

    /// The fencing token of the owner before this one, if it released the store cleanly and
    /// nobody owned it since (whoever owned it since, crashed or not, left `last-owner`).
    pub fn released_with(&self) -> Option<i64> {
        self.released_with
    }
}

impl Drop for Ownership {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The store's keys: `owner`, `last-owner`, `released`.
fn keys(store: &str) -> (String, String, String) {
    let base = format!("/parallax/v1/stores/{store}/");
    (
        format!("{base}owner"),
        format!("{base}last-owner"),
        format!("{base}released"),
    )
}

/// The token a `get` of `released` answered with.
fn token_of(r: &TxnOpResponse) -> Option<i64> {
    match r {
        TxnOpResponse::Get(g) => g
            .kvs()
            .first()
            .and_then(|kv| std::str::from_utf8(kv.value()).ok()?.parse().ok()),
        _ => None,
    }
}

/// Connects to etcd, failing within seconds when it is not there.
pub(super) async fn connect(cfg: &LeaseConfig) -> Result<Client, LeaseError> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5));
    let unreachable = |e: etcd_client::Error| {
        let why = match LeaseError::from(e) {
            LeaseError::Etcd(why) => why,
            other => other.to_string(),
        };
        LeaseError::Etcd(format!("cannot reach {}: {why}", cfg.endpoints.join(",")))
    };
    let mut c = Client::connect(&cfg.endpoints, Some(opts))
        .await
        .map_err(unreachable)?;
    // The channel connects lazily: ask something, so that an absent etcd is said here.
    c.status().await.map_err(unreachable)?;
    Ok(c)
}

/// The holder a `get` answered with, if the key was there.
fn holder_of(r: &TxnOpResponse) -> Option<Holder> {
    match r {
        TxnOpResponse::Get(g) => g
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice(kv.value()).ok()),
        _ => None,
    }
}

/// What one attempt to take a store gave.
enum Attempt {
    Taken {
        lease: i64,
        token: i64,
        last: Option<Holder>,
        released: Option<i64>,
    },
    Held(Holder),
}

async fn attempt(
    client: &mut Client,
    store: &str,
    me: &Holder,
    ttl: i64,
) -> Result<Attempt, LeaseError> {
    let (owner, last, released) = keys(store);
    let lease = client.lease_grant(ttl, None).await?.id();
    // `last-owner` is left as it is here: it names whom to fence until that is done.
    let value = serde_json::to_vec(me).expect("a Holder serialises");
    let txn = Txn::new()
        .when([Compare::create_revision(owner.clone(), CompareOp::Equal, 0)])
        .and_then([
            TxnOp::get(last.clone(), None),
            TxnOp::get(released, None),
            TxnOp::put(
                owner.clone(),
                value,
                Some(PutOptions::new().with_lease(lease)),
            ),
        ])
        .or_else([TxnOp::get(owner, None)]);
    let r = client.txn(txn).await?;
    let ops = r.op_responses();
    if r.succeeded() {
        let token = r.header().map_or(0, |h| h.revision());
        return Ok(Attempt::Taken {
            lease,
            token,
            last: ops.first().and_then(holder_of),
            released: ops.get(1).and_then(token_of),
        });
    }
    let _ = client.lease_revoke(lease).await;
    match ops.first().and_then(holder_of) {
        Some(h) => Ok(Attempt::Held(h)),
        // Released between the compare and the get, or unreadable: try again.
        None => Ok(Attempt::Held(Holder {
            host: "?".into(),
            pid: 0,
            addrs: String::new(),
        })),
    }
}

/// Takes `store` (`POOL/NAME`) for this host. With `wait`, waits for the holder to release it
/// or for its lease to run out (`on_wait` is told whom it waits for, once); without, fails with
/// [`LeaseError::Held`]. Before returning, fences the last owner that did not release the store
/// out of `rados`.
pub fn acquire(
    cfg: &LeaseConfig,
    store: &str,
    rados: &Rados,
    wait: bool,
    on_wait: &mut dyn FnMut(&Holder),
) -> Result<Ownership, LeaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| LeaseError::Etcd(format!("starting the etcd client: {e}")))?;
    let me = Holder {
        host: cfg.host.clone(),
        pid: std::process::id(),
        addrs: rados
            .addrs()
            .map_err(|e| LeaseError::Etcd(format!("this client's RADOS address: {e}")))?,
    };
    let ttl = cfg.ttl.as_secs().max(1) as i64;
    let fence = Arc::new(Fence::new(store, Duration::from_secs(ttl as u64)));
    let (mut client, lease, token, last, released) = rt.block_on(async {
        let mut client = connect(cfg).await?;
        let mut told = false;
        loop {
            let sent = Instant::now();
            match attempt(&mut client, store, &me, ttl).await? {
                Attempt::Taken {
                    lease,
                    token,
                    last,
                    released,
                } => {
                    fence.extend_to(sent + margin(Duration::from_secs(ttl as u64)));
                    break Ok::<_, LeaseError>((client, lease, token, last, released));
                }
                Attempt::Held(h) if !wait => return Err(LeaseError::Held(h)),
                Attempt::Held(h) => {
                    if !told {
                        on_wait(&h);
                        told = true;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })?;
    let released_with = if last.is_none() { released } else { None };
    if let Some(h) = last.filter(|h| *h != me) {
        info!(store, last = %h, addrs = %h.addrs, "fencing the last owner out of RADOS");
        if let Err(err) = rados.blocklist(&h.addrs, 0) {
            // Without the fence nothing may be read or written. `last-owner` still names the
            // unfenced owner, for whoever tries next; the lease goes.
            let _ = rt.block_on(client.lease_revoke(lease));
            return Err(LeaseError::Fence { holder: h, err });
        }
    }
    // Only now this host becomes the owner to fence if it does not release the store: before
    // this point it has not touched the store.
    if let Err(e) = rt.block_on(record_last_owner(&mut client, store, token, &me)) {
        let _ = rt.block_on(client.lease_revoke(lease));
        return Err(e);
    }
    info!(store, token, host = %cfg.host, "took the store's lease");
    let (stop, stopped) = oneshot::channel();
    let f = fence.clone();
    let store_name = store.to_string();
    let thread = std::thread::Builder::new()
        .name("parallax-lease".into())
        .spawn(move || {
            rt.block_on(keep(client, &store_name, lease, token, ttl, f, stopped));
        })
        .map_err(|e| LeaseError::Etcd(format!("starting the lease thread: {e}")))?;
    Ok(Ownership {
        cfg: cfg.clone(),
        store: store.to_string(),
        token,
        released_with,
        fence,
        stop: Some(stop),
        thread: Some(thread),
    })
}

/// Names `me` in `last-owner`, if this host still holds the store (`token`).
async fn record_last_owner(
    client: &mut Client,
    store: &str,
    token: i64,
    me: &Holder,
) -> Result<(), LeaseError> {
    let (owner, last, _) = keys(store);
    let value = serde_json::to_vec(me).expect("a Holder serialises");
    let txn = Txn::new()
        .when([Compare::create_revision(owner, CompareOp::Equal, token)])
        .and_then([TxnOp::put(last, value, None)]);
    if client.txn(txn).await?.succeeded() {
        Ok(())
    } else {
        Err(LeaseError::Etcd(
            "the store's lease ran out while this host was taking it".into(),
        ))
    }
}

/// How long after sending a renewal this host may still write: the TTL less a margin for
/// clocks that run at slightly different rates and for the write in progress at the deadline.
fn margin(ttl: Duration) -> Duration {
    ttl.saturating_sub((ttl / 10).max(Duration::from_millis(250)))
}

/// etcd says the lease is gone: this host writes nothing to the store any more.
fn lapse(store: &str, fence: &Fence) {
    error!(
        store,
        "the store's lease expired: this host no longer writes to it"
    );
    fence.revoke();
}

/// Renews the lease every third of its TTL until told to stop, then releases the store.
async fn keep(
    mut client: Client,
    store: &str,
    lease: i64,
    token: i64,
    ttl: i64,
    fence: Arc<Fence>,
    mut stop: oneshot::Receiver<()>,
) {
    let every = Duration::from_millis((ttl as u64 * 1000 / 3).max(200));
    let mut stream = None;
    let mut lost = false;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(every) => {}
        }
        if lost {
            continue;
        }
        if stream.is_none() {
            match client.lease_keep_alive(lease).await {
                Ok(s) => stream = Some(s),
                // etcd answered that the lease is gone (how etcd-client says a TTL of 0 when it
                // opens the renewal stream).
                Err(etcd_client::Error::LeaseKeepAliveError(m)) if m == "lease not found" => {
                    lapse(store, &fence);
                    lost = true;
                }
                Err(e) => {
                    warn!(store, error = %e, "cannot renew the store's lease; retrying");
                    continue;
                }
            }
        }
        let (keeper, answers) = stream.as_mut().expect("set above");
        let sent = Instant::now();
        let renewed = async {
            keeper.keep_alive().await?;
            answers.message().await
        };
        match tokio::time::timeout(every, renewed).await {
            Ok(Ok(Some(r))) if r.ttl() > 0 => {
                fence.extend_to(sent + margin(Duration::from_secs(r.ttl() as u64)));
                debug!(store, ttl = r.ttl(), "lease renewed");
            }
            Ok(Ok(Some(_))) => {
                lapse(store, &fence);
                lost = true;
            }
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                warn!(store, "renewing the store's lease failed; retrying");
                stream = None;
            }
        }
    }
    if !lost {
        if let Err(e) = release(&mut client, store, token, lease).await {
            warn!(store, error = %e, "releasing the store's lease (it runs out by itself)");
        }
    }
}

/// Gives the store back, if this host still holds it: `owner` and `last-owner` go, `released`
/// records the token.
async fn release(
    client: &mut Client,
    store: &str,
    token: i64,
    lease: i64,
) -> Result<(), LeaseError> {
    let (owner, last, released) = keys(store);
    let txn = Txn::new()
        .when([Compare::create_revision(
            owner.clone(),
            CompareOp::Equal,
            token,
        )])
        .and_then([
            TxnOp::delete(owner, None),
            TxnOp::delete(last, None),
            TxnOp::put(released, token.to_string(), None),
        ]);
    tokio::time::timeout(Duration::from_secs(3), async {
        client.txn(txn).await?;
        client.lease_revoke(lease).await?;
        Ok::<_, LeaseError>(())
    })
    .await
    .map_err(|_| LeaseError::Etcd("timed out".into()))??;
    info!(store, "released the store's lease");
    Ok(())
}
