//! `parallax serve`: owns the store and serves it.
//!
//! ```text
//!  main thread ── waits for SIGTERM/SIGINT, then shuts down in order:
//!   ├─ NBD server thread (mio loop + workers)   1. stop accepting, answer in-flight, close
//!   ├─ ring devices (one thread per queue)      2. answer what they saw, detach
//!   ├─ control socket thread (+1 per request)   3. stop accepting
//!   ├─ metrics endpoint thread (if configured)  4. stop answering scrapes
//!   ├─ snapshot scheduler thread                5. stop after its pass
//!   ├─ background hydration thread (if set)     5. stop within a step of its copy
//!   └─ store (its checkpoint thread)            6. final checkpoint, marked closed cleanly
//! ```

use std::{
    io,
    net::TcpListener,
    os::{fd::AsRawFd, unix::net::UnixListener},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{anyhow, bail, Context};
use tracing::{error, info, warn};

use super::{
    addr::ControlAddr,
    config::Config,
    control::{self, ControlContext},
    control_net,
    deduper::{spawn_deduper, DedupSchedule},
    hydrator::spawn_hydrator,
    provider::{FrontEnd, StoreProvider},
};
use crate::{
    blkif::local::{serve_attach, RingRegistry},
    disk::DiskProvider,
    metrics::{Endpoint, Metrics},
    nbd::{remote::NbdRemote, NbdServer, TlsServer},
    schedule::{spawn_scheduler, ScheduleCounters},
    signal::Worker,
    store::Store,
};

/// Binds a unix socket at `path`, replacing a stale socket file left by a killed daemon but
/// refusing to steal one a live process still listens on.
pub fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    match UnixListener::bind(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "{} is in use by another process (is another parallax serve running?)",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
            UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("cannot listen on {}", path.display())),
    }
}

fn bind_control(addr: &ControlAddr) -> anyhow::Result<UnixListener> {
    match addr {
        ControlAddr::Path(p) => bind_unix(p),
        ControlAddr::Abstract(_) => UnixListener::bind_addr(&addr.socket_addr()?).map_err(|e| {
            if e.kind() == io::ErrorKind::AddrInUse {
                anyhow!("control socket {addr} is in use: another daemon serves this store")
            } else {
                anyhow!("cannot listen on control socket {addr}: {e}")
            }
        }),
    }
}

/// What a running daemon listens on, for messages and tests.
#[derive(Debug, Clone)]
pub struct Listening {
    pub nbd_tcp: Vec<std::net::SocketAddr>,
    pub nbd_unix: Option<PathBuf>,
    pub control: ControlAddr,
    /// The metrics endpoint, when `metrics.listen` is set.
    pub metrics: Option<std::net::SocketAddr>,
    /// The network control listener, when `control.listen` is set.
    pub control_net: Option<std::net::SocketAddr>,
}

/// Runs the daemon until SIGTERM or SIGINT. Returns once everything is committed.
pub fn run(cfg: Config) -> anyhow::Result<()> {
    crate::malloc::tune_for_daemon();
    let signals = signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT])
        .context("cannot install signal handlers")?;
    let handle = signals.handle();
    let daemon = Daemon::start(cfg)?;
    let l = &daemon.listening;
    let tcp: Vec<String> = l.nbd_tcp.iter().map(|a| a.to_string()).collect();
    println!(
        "parallax serve: ready; NBD on {}{}; {}control socket {}",
        if tcp.is_empty() {
            "no TCP address".to_string()
        } else {
            tcp.join(", ")
        },
        l.nbd_unix
            .as_ref()
            .map(|p| format!(" and unix:{}", p.display()))
            .unwrap_or_default(),
        l.metrics
            .map(|a| format!("metrics on http://{a}/metrics; "))
            .unwrap_or_default(),
        l.control
    );
    if let Some(a) = l.control_net {
        println!("parallax serve: control over TLS on {a}");
    }
    // Under systemd (Type=notify) the unit is started once this arrives; without
    // $NOTIFY_SOCKET it does nothing.
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        warn!("cannot tell systemd the daemon is ready: {e}");
    }
    // A store in RADOS whose lease is gone (another host may own it now) cannot be served: its
    // writes are refused for good, and the reads would go stale. Stop, as on SIGTERM, and say why.
    let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fence = crate::cluster::fence_of(&daemon.store);
    if let Some(fence) = fence.clone() {
        let lost = lost.clone();
        std::thread::Builder::new()
            .name("lease-watch".into())
            .spawn(move || {
                fence.wait_revoked();
                lost.store(true, std::sync::atomic::Ordering::SeqCst);
                let _ = signal_hook::low_level::raise(libc::SIGTERM);
            })
            .context("cannot start the lease watcher")?;
    }
    let directory = fence
        .as_ref()
        .map(|_| DirectoryPublisher::start(&daemon.store));
    let mut signals = signals;
    if let Some(sig) = signals.forever().next() {
        if !lost.load(std::sync::atomic::Ordering::SeqCst) {
            info!(signal = sig, "shutting down");
        }
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    handle.close();
    if let Some(d) = directory {
        d.stop();
    }
    if let Some(fence) = fence.filter(|_| lost.load(std::sync::atomic::Ordering::SeqCst)) {
        error!(
            store = fence.store(),
            "this host's lease on the store is gone: stopping"
        );
        // The final commit cannot happen (the device refuses it): what was not flushed is
        // lost, as in a crash at the moment the lease ran out.
        let _ = daemon.stop();
        bail!(
            "stopped serving store {}: this host's lease on it is gone, and another host may \
             own it now",
            fence.store()
        );
    }
    daemon.stop()
}

/// Keeps the pool's directory in etcd following a store in RADOS (`cluster/directory.rs`):
/// publishes once a second when a checkpoint changed something.
struct DirectoryPublisher {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl DirectoryPublisher {
    fn start(store: &Arc<Store>) -> DirectoryPublisher {
        let (stop, stopped) = std::sync::mpsc::channel();
        // Weak: the daemon's stop drops the store, which lets go of its lease.
        let store = Arc::downgrade(store);
        let thread = std::thread::spawn(move || {
            let mut published = None;
            let mut failing = false;
            loop {
                let Some(s) = store.upgrade() else { return };
                let gen = s.durable_generation();
                if published != Some(gen) {
                    match crate::cluster::publish(&s) {
                        Ok(n) => {
                            published = Some(gen);
                            failing = false;
                            if n > 0 {
                                tracing::debug!(changed = n, "directory published");
                            }
                        }
                        Err(e) if !failing => {
                            failing = true;
                            warn!(error = %e, "cannot update the pool's directory in etcd; retrying");
                        }
                        Err(_) => {}
                    }
                }
                drop(s);
                if !matches!(
                    stopped.recv_timeout(Duration::from_secs(1)),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                ) {
                    return;
                }
            }
        });
        DirectoryPublisher { stop, thread }
    }

    fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// A running daemon (also used in-process by tests).
pub struct Daemon {
    pub store: Arc<Store>,
    pub listening: Listening,
    nbd_shutdown: Option<crate::nbd::NbdShutdown>,
    nbd_thread: Option<std::thread::JoinHandle<io::Result<()>>>,
    rings: RingRegistry,
    /// The Xen vbd backend, when serving Xen (see [`crate::xen::config`]).
    pub xen: Option<crate::xen::config::RunningXen>,
    control_fd: i32,
    control_thread: Option<std::thread::JoinHandle<()>>,
    control_path: Option<PathBuf>,
    /// The network control listener's socket and thread.
    control_net: Option<(i32, std::thread::JoinHandle<()>)>,
    metrics: Option<Endpoint>,
    scheduler: Option<Worker>,
    hydrator: Option<Worker>,
    deduper: Option<Worker>,
}

/// Binds the metrics endpoint's address, with an error that names the setting.
fn bind_metrics(a: &str) -> anyhow::Result<TcpListener> {
    let l = TcpListener::bind(a).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            anyhow!("cannot serve metrics on {a}: address in use (set metrics.listen in the config or --metrics-listen)")
        } else {
            anyhow!("cannot serve metrics on {a} (metrics.listen): {e}")
        }
    })?;
    let addr = l.local_addr()?;
    info!(listen = %addr, "metrics endpoint listening");
    if !addr.ip().is_loopback() {
        warn!(listen = %addr, "the metrics endpoint is reachable from other hosts and has no authentication: its metrics reveal VDI names");
    }
    Ok(l)
}

/// Opens the store the daemon serves: a local one, or one in RADOS, waiting for the host that
/// holds it to let go or to stop renewing its lease (failover).
fn open_store(path: &std::path::Path, cfg: &Config) -> anyhow::Result<Arc<Store>> {
    let Some(rs) = crate::cluster::RadosStore::parse(path) else {
        return Store::open(path, cfg.store_options())
            .with_context(|| format!("cannot open store {}", path.display()));
    };
    let rs = rs.map_err(|e| anyhow!(e))?;
    crate::cluster::open(&rs, &cfg.cluster, cfg.store_options(), true, &mut |h| {
        info!(store = %rs, holder = %h, ttl_secs = cfg.cluster.lease_ttl_secs,
              "the store is held by another host: waiting for it to let go or for its lease to run out");
    })
    .with_context(|| format!("cannot open store {rs}"))
}

impl Daemon {
    pub fn start(cfg: Config) -> anyhow::Result<Daemon> {
        cfg.validate()
            .map_err(|e| anyhow!("invalid configuration: {e}"))?;
        let store_path = cfg.store.clone().ok_or_else(|| {
            anyhow!("no store given: pass --store PATH, set PARALLAX_STORE, or set `store` in the config")
        })?;
        // Credentials first: a bad file stops the daemon before it touches the store.
        let tls = TlsServer::new(&cfg.nbd.tls).map_err(|e| anyhow!("nbd.{e}"))?;
        let store = open_store(&store_path, &cfg)?;
        store.set_remote(crate::cluster::remote(
            &store,
            &cfg.cluster,
            Arc::new(NbdRemote::new(Duration::from_secs(
                cfg.backing.reconnect_delay_secs,
            ))),
        ));
        let control_addr = match &cfg.control_socket {
            Some(p) => ControlAddr::Path(p.clone()),
            None => ControlAddr::for_store(&store_path)?,
        };
        let control_listener = bind_control(&control_addr)?;
        let control_net_listener = match &cfg.control.listen {
            Some(a) => Some(control_net::bind(a)?),
            None => None,
        };
        // Before the front ends, so that every handle they open is counted; an address that
        // cannot be bound leaves nothing running.
        let schedule_counters = Arc::new(ScheduleCounters::default());
        let (metrics, endpoint) = match &cfg.metrics.listen {
            Some(a) => {
                let listener = bind_metrics(a)?;
                let metrics = Metrics::new(&store, schedule_counters.clone());
                let endpoint = Endpoint::start(listener, metrics.clone())
                    .context("cannot start the metrics endpoint")?;
                (Some(metrics), Some(endpoint))
            }
            None => (None, None),
        };

        let provider = StoreProvider::new(store.clone(), FrontEnd::Nbd).with_metrics(metrics);
        // Before the other servers, so a Xen setup error leaves nothing running.
        let xen = crate::xen::config::start_from_config(
            &cfg.xen,
            cfg.ring_features(),
            Arc::new(provider.sibling(FrontEnd::Ring)),
        )
        .map_err(|e| anyhow!(e))?;
        let mut nbd_tcp = Vec::new();
        let mut nbd_unix = None;
        let (nbd_shutdown, nbd_thread) = if cfg.nbd.enabled {
            let mut server = NbdServer::new(Arc::new(provider.clone()), cfg.nbd_config())
                .context("cannot start the NBD server")?;
            if let Some(t) = &tls {
                tracing::info!(
                    required = t.required(),
                    x509 = cfg.nbd.tls.cert.is_some(),
                    client_certificates = cfg.nbd.tls.ca.is_some(),
                    psk = cfg.nbd.tls.psk.is_some(),
                    "nbd: TLS offered"
                );
            }
            server.set_tls(tls.clone());
            server.set_access(cfg.access_policy().map_err(|e| anyhow!(e))?);
            let plaintext = !tls.as_ref().is_some_and(|t| t.required());
            for a in &cfg.nbd.listen {
                let l = TcpListener::bind(a).map_err(|e| {
                    if e.kind() == io::ErrorKind::AddrInUse {
                        anyhow!("cannot listen on {a}: address in use (is another parallax serve or NBD server running? set nbd.listen in the config)")
                    } else {
                        anyhow!("cannot listen on {a}: {e}")
                    }
                })?;
                let at = l.local_addr()?;
                if plaintext && !at.ip().is_loopback() {
                    tracing::warn!(
                        "nbd: serving {at} without TLS (--insecure): anyone who can reach it can read and write every VDI"
                    );
                }
                nbd_tcp.push(at);
                server.add_tcp_listener(l)?;
            }
            if let Some(p) = &cfg.nbd.unix {
                server.add_unix_listener(bind_unix(p)?)?;
                nbd_unix = Some(p.clone());
            }
            let shutdown = server.shutdown_handle();
            let t = std::thread::Builder::new()
                .name("parallax-nbd".into())
                .spawn(move || server.run())?;
            (Some(shutdown), Some(t))
        } else {
            (None, None)
        };

        let rings = RingRegistry::new(cfg.ring_features());
        let ring_attach: Option<
            Arc<dyn Fn(serde_json::Value, std::os::unix::net::UnixStream) + Send + Sync>,
        > = if cfg.rings.enabled {
            let ring_provider: Arc<dyn DiskProvider> = Arc::new(provider.sibling(FrontEnd::Ring));
            let rings = rings.clone();
            Some(Arc::new(move |req, stream| {
                let _ = serve_attach(req, stream, ring_provider.clone(), rings.clone());
            }))
        } else {
            None
        };
        let scheduler = spawn_scheduler(store.clone(), schedule_counters)
            .context("cannot start the snapshot scheduler")?;
        let hydrator = match cfg.backing.hydrate_bytes_per_sec {
            0 => None,
            rate => Some(
                spawn_hydrator(store.clone(), rate).context("cannot start background hydration")?,
            ),
        };
        let deduper = if cfg.dedup.background {
            let schedule = DedupSchedule {
                idle: Duration::from_secs(cfg.dedup.idle_secs),
                every: Duration::from_secs(cfg.dedup.every_secs.max(1)),
            };
            Some(spawn_deduper(store.clone(), schedule).context("cannot start background dedup")?)
        } else {
            None
        };
        let ctx = Arc::new(ControlContext {
            store: store.clone(),
            store_path: store_path.display().to_string(),
            ring_attach,
            request_timeout: control::REQUEST_TIMEOUT,
            scheduler: Some(scheduler.waker()),
            hydrator: hydrator.as_ref().map(Worker::waker),
            arrivals: Default::default(),
        });
        let control_fd = control_listener.as_raw_fd();
        let mut control_net_addr = None;
        let control_net = match (control_net_listener, &tls) {
            (Some(l), Some(tls)) => {
                control_net_addr = Some(l.local_addr()?);
                let fd = l.as_raw_fd();
                let (tls, clients, ctx) = (tls.clone(), cfg.control.clients.clone(), ctx.clone());
                let t = std::thread::Builder::new()
                    .name("parallax-ctl-net".into())
                    .spawn(move || control_net::serve(l, tls, clients, ctx))?;
                Some((fd, t))
            }
            _ => None,
        };
        let control_thread = std::thread::Builder::new()
            .name("parallax-control".into())
            .spawn(move || control::serve(control_listener, ctx))?;

        info!(store = %store_path.display(), "parallax serve started");
        Ok(Daemon {
            store,
            listening: Listening {
                nbd_tcp,
                nbd_unix,
                control: control_addr.clone(),
                metrics: endpoint.as_ref().map(Endpoint::addr),
                control_net: control_net_addr,
            },
            nbd_shutdown,
            nbd_thread,
            rings,
            xen,
            control_fd,
            control_thread: Some(control_thread),
            control_path: match control_addr {
                ControlAddr::Path(p) => Some(p),
                ControlAddr::Abstract(_) => None,
            },
            control_net,
            metrics: endpoint,
            scheduler: Some(scheduler),
            hydrator,
            deduper,
        })
    }

    /// Shuts down in order and makes everything durable.
    pub fn stop(mut self) -> anyhow::Result<()> {
        // Xen guests first: each ring answers what it has seen, frontends see Closing.
        if let Some(x) = self.xen.take() {
            x.backend.stop();
        }
        if let Some(s) = self.nbd_shutdown.take() {
            s.shutdown();
        }
        if let Some(t) = self.nbd_thread.take() {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!("NBD server stopped with an error: {e}"),
                Err(_) => warn!("NBD server thread panicked"),
            }
        }
        let left = self.rings.shutdown_all(Duration::from_secs(30));
        if left > 0 {
            warn!("{left} ring device(s) did not detach in time");
        }
        // SAFETY: shutting down a listening socket we own wakes its accept() with EINVAL; the
        // descriptor stays open until the listener is dropped by the control thread.
        unsafe {
            libc::shutdown(self.control_fd, libc::SHUT_RDWR);
        }
        if let Some(t) = self.control_thread.take() {
            let _ = t.join();
        }
        if let Some((fd, t)) = self.control_net.take() {
            // SAFETY: as above, for the network control listener, which its thread owns.
            unsafe {
                libc::shutdown(fd, libc::SHUT_RDWR);
            }
            let _ = t.join();
        }
        if let Some(p) = &self.control_path {
            let _ = std::fs::remove_file(p);
        }
        if let Some(m) = self.metrics.take() {
            m.stop();
        }
        if let Some(s) = self.scheduler.take() {
            s.stop();
        }
        if let Some(h) = self.hydrator.take() {
            h.stop();
        }
        if let Some(d) = self.deduper.take() {
            d.stop();
        }
        if let Some(p) = &self.listening.nbd_unix {
            let _ = std::fs::remove_file(p);
        }
        self.store.close().context("final commit failed")?;
        if let Err(e) = crate::cluster::publish(&self.store) {
            warn!(error = %e, "cannot update the pool's directory in etcd");
        }
        info!("parallax serve stopped; store closed cleanly");
        Ok(())
    }
}
