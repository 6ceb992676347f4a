//! The NBD server's event loops: each thread on `mio` owns some of the sockets, a [`Slab`] of
//! connections, and a pool of workers for disk calls that may wait for a device.
//!
//! ```text
//!   loop 0: listeners ──accept──┬─► its Slab<Conn>        requests that need not wait run on
//!                               └─► hand-off channel ─►   the loop; the rest go to its workers
//!   loop 1..n: Slab<Conn> ◄──── completions (channel + Waker) ◄──── worker pool
//! ```
//!
//! Connections go round robin to the loops (one per CPU by default). Tokens: connections use
//! their slab key; listeners and the waker use the top of the token space. Slab keys are
//! reused, so every job carries the connection's generation and a completion for a connection
//! that has since closed is dropped.

use std::{
    collections::VecDeque,
    io,
    net::TcpListener,
    os::unix::net::UnixListener,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, Sender};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use crate::{disk::DiskProvider, ratelimit::RateLimit};

use super::{
    access::AccessPolicy,
    config::{NbdConfig, NbdStatsHandle, StatsInner},
    conn::{Conn, Ctx, Done, Pump, Socket, Stream},
    pool::{ConnId, Pool},
    tls::TlsServer,
};

/// Asks a running server to stop: it stops accepting, lets in-flight requests finish and
/// send their replies, closes every connection, and [`NbdServer::run`] returns.
#[derive(Clone)]
pub struct NbdShutdown {
    flag: Arc<AtomicBool>,
    wakers: Vec<Arc<Waker>>,
}

impl NbdShutdown {
    pub fn shutdown(&self) {
        self.flag.store(true, Ordering::Release);
        for w in &self.wakers {
            let _ = w.wake();
        }
    }
}

impl std::fmt::Debug for NbdShutdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdShutdown")
            .field("requested", &self.flag.load(Ordering::Relaxed))
            .finish()
    }
}

enum Listener {
    Tcp(mio::net::TcpListener),
    Unix(mio::net::UnixListener),
}

const WAKER: Token = Token(usize::MAX);
const FIRST_LISTENER: usize = usize::MAX - 1;
/// How often handshake deadlines are checked.
const SWEEP: Duration = Duration::from_millis(250);

/// A connection accepted by loop 0 for another loop.
struct Handoff {
    stream: Stream,
    peer: String,
}

/// What one event loop is made of before it runs.
struct LoopParts {
    poll: Poll,
    waker: Arc<Waker>,
    handoffs: (Sender<Handoff>, Receiver<Handoff>),
}

impl LoopParts {
    fn new() -> io::Result<LoopParts> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        Ok(LoopParts {
            poll,
            waker,
            handoffs: crossbeam_channel::unbounded(),
        })
    }
}

/// The NBD server. Build it, add listeners, take handles, then [`NbdServer::run`] it on a
/// thread of its own (it starts the other loops' threads).
pub struct NbdServer {
    provider: Arc<dyn DiskProvider>,
    cfg: NbdConfig,
    loops: Vec<LoopParts>,
    listeners: Vec<Listener>,
    shutdown: Arc<AtomicBool>,
    stats: Arc<StatsInner>,
    tls: Option<Arc<TlsServer>>,
    access: Arc<AccessPolicy>,
}

impl NbdServer {
    pub fn new(provider: Arc<dyn DiskProvider>, cfg: NbdConfig) -> io::Result<Self> {
        cfg.validate()?;
        let n = match cfg.loops {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let loops = (0..n)
            .map(|_| LoopParts::new())
            .collect::<io::Result<_>>()?;
        Ok(NbdServer {
            provider,
            cfg,
            loops,
            listeners: Vec::new(),
            shutdown: Arc::new(AtomicBool::new(false)),
            stats: Arc::new(StatsInner::default()),
            tls: None,
            access: Arc::new(AccessPolicy::default()),
        })
    }

    /// Offers STARTTLS with these credentials (and requires it if they say so).
    pub fn set_tls(&mut self, tls: Option<Arc<TlsServer>>) {
        self.tls = tls;
    }

    /// Limits which client may see, read or write which export (by default: all, all).
    pub fn set_access(&mut self, access: AccessPolicy) {
        self.access = Arc::new(access);
    }

    fn listener_token(&self) -> Token {
        Token(FIRST_LISTENER - self.listeners.len())
    }

    /// Serves NBD on a bound TCP listener.
    pub fn add_tcp_listener(&mut self, listener: TcpListener) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        let mut l = mio::net::TcpListener::from_std(listener);
        self.loops[0].poll.registry().register(
            &mut l,
            self.listener_token(),
            Interest::READABLE,
        )?;
        self.listeners.push(Listener::Tcp(l));
        Ok(())
    }

    /// Serves NBD on a bound Unix socket listener.
    pub fn add_unix_listener(&mut self, listener: UnixListener) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        let mut l = mio::net::UnixListener::from_std(listener);
        self.loops[0].poll.registry().register(
            &mut l,
            self.listener_token(),
            Interest::READABLE,
        )?;
        self.listeners.push(Listener::Unix(l));
        Ok(())
    }

    pub fn shutdown_handle(&self) -> NbdShutdown {
        NbdShutdown {
            flag: self.shutdown.clone(),
            wakers: self.loops.iter().map(|l| l.waker.clone()).collect(),
        }
    }

    pub fn stats(&self) -> NbdStatsHandle {
        NbdStatsHandle::new(self.stats.clone())
    }

    /// Serves until [`NbdShutdown::shutdown`] is called, then drains and returns.
    pub fn run(self) -> io::Result<()> {
        let n = self.loops.len();
        let workers = self.cfg.workers.div_ceil(n).max(1);
        let peers: Vec<(Sender<Handoff>, Arc<Waker>)> = self.loops[1..]
            .iter()
            .map(|l| (l.handoffs.0.clone(), l.waker.clone()))
            .collect();
        let mut first = None;
        let mut others = Vec::new();
        for (i, parts) in self.loops.into_iter().enumerate() {
            let lp = Loop {
                provider: self.provider.clone(),
                cfg: self.cfg.clone(),
                tls: self.tls.clone(),
                access: self.access.clone(),
                pool: Pool::new(workers, parts.waker.clone())?,
                poll: parts.poll,
                incoming: parts.handoffs.1,
                peers: if i == 0 { peers.clone() } else { Vec::new() },
                next_loop: 0,
                listeners: Vec::new(),
                shutdown: self.shutdown.clone(),
                stats: self.stats.clone(),
                conns: Slab::new(),
                ready: VecDeque::new(),
                limiter: RateLimit::new(20, Duration::from_secs(10)),
                next_gen: 0,
                accept_retry: false,
            };
            if i == 0 {
                first = Some(lp);
            } else {
                others.push(
                    std::thread::Builder::new()
                        .name(format!("parallax-nbd-{i}"))
                        .spawn(move || lp.serve())?,
                );
            }
        }
        let mut lp = first.expect("at least one loop");
        lp.listeners = self.listeners;
        let mut result = lp.serve();
        for t in others {
            match t.join() {
                Ok(r) => result = result.and(r),
                Err(_) => tracing::warn!("nbd: an event loop panicked"),
            }
        }
        result
    }
}

struct Loop {
    provider: Arc<dyn DiskProvider>,
    cfg: NbdConfig,
    tls: Option<Arc<TlsServer>>,
    access: Arc<AccessPolicy>,
    poll: Poll,
    /// Connections loop 0 accepted for this loop.
    incoming: Receiver<Handoff>,
    /// Loop 0: the other loops, to spread connections over.
    peers: Vec<(Sender<Handoff>, Arc<Waker>)>,
    next_loop: usize,
    listeners: Vec<Listener>,
    shutdown: Arc<AtomicBool>,
    stats: Arc<StatsInner>,
    pool: Pool<Done>,
    conns: Slab<Conn>,
    ready: VecDeque<usize>,
    limiter: RateLimit,
    next_gen: u64,
    accept_retry: bool,
}

fn enqueue(ready: &mut VecDeque<usize>, key: usize, c: &mut Conn) {
    if !c.queued {
        c.queued = true;
        ready.push_back(key);
    }
}

impl Loop {
    /// Runs the loop to the end, then closes its sockets and stops its workers.
    fn serve(mut self) -> io::Result<()> {
        let result = self.run();
        // Close every socket before waiting for the workers. After a clean drain nothing is
        // in flight and the join is quick; otherwise leave stuck workers behind.
        let clean = self.conns.is_empty();
        self.close_all();
        if clean {
            self.pool.join();
        }
        result
    }

    fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut drain_deadline: Option<Instant> = None;
        let mut next_sweep = Instant::now() + SWEEP;
        tracing::info!(listeners = self.listeners.len(), "nbd: serving");
        loop {
            let now = Instant::now();
            // Wake up for handshake deadlines and the shutdown timeout only while they matter.
            let timeout = if !self.ready.is_empty() {
                Some(Duration::ZERO)
            } else if drain_deadline.is_some() || !self.conns.is_empty() || self.accept_retry {
                Some(next_sweep.saturating_duration_since(now))
            } else {
                None
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for ev in events.iter() {
                match ev.token() {
                    WAKER => self.take_handoffs(),
                    Token(t) if t > FIRST_LISTENER - self.listeners.len() => {
                        self.accept(FIRST_LISTENER - t);
                    }
                    Token(key) => {
                        if let Some(c) = self.conns.get_mut(key) {
                            c.ready();
                            enqueue(&mut self.ready, key, c);
                        }
                    }
                }
            }
            self.completions();
            if drain_deadline.is_none() && self.shutdown.load(Ordering::Acquire) {
                drain_deadline = Some(Instant::now() + self.cfg.shutdown_timeout);
                self.begin_drain();
            }
            self.pump_ready();
            let now = Instant::now();
            if now >= next_sweep {
                next_sweep = now + SWEEP;
                self.sweep(now);
            }
            if let Some(deadline) = drain_deadline {
                if self.conns.is_empty() {
                    tracing::info!("nbd: shut down");
                    return Ok(());
                }
                if now >= deadline {
                    tracing::warn!(
                        connections = self.conns.len(),
                        "nbd: shutdown timed out, closing connections"
                    );
                    return Ok(());
                }
            }
        }
    }

    fn accept(&mut self, index: usize) {
        loop {
            let Some(listener) = self.listeners.get(index) else {
                return;
            };
            let accepted = match listener {
                Listener::Tcp(l) => l.accept().map(|(s, peer)| {
                    let _ = s.set_nodelay(true);
                    (Stream::Plain(Socket::Tcp(s)), peer.to_string())
                }),
                Listener::Unix(l) => l
                    .accept()
                    .map(|(s, _)| (Stream::Plain(Socket::Unix(s)), "unix".to_string())),
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // E.g. out of file descriptors: the connection stays in the backlog, and
                    // no new edge may come for it, so try again at the next sweep.
                    if self.limiter.allow() {
                        tracing::warn!(error = %e, "nbd: accept failed");
                    }
                    self.accept_retry = true;
                    return;
                }
            };
            self.stats.connections_total.fetch_add(1, Ordering::Relaxed);
            if self.stats.connections.load(Ordering::Relaxed) as usize >= self.cfg.max_connections {
                if self.limiter.allow() {
                    tracing::warn!(%peer, max = self.cfg.max_connections, "nbd: too many connections, refusing");
                }
                continue;
            }
            // Counted now, so the limit holds while the connection travels to its loop.
            self.stats.connections.fetch_add(1, Ordering::Relaxed);
            let target = self.next_loop % (self.peers.len() + 1);
            self.next_loop = self.next_loop.wrapping_add(1);
            if target == 0 {
                self.add(stream, &peer);
            } else {
                let (tx, waker) = &self.peers[target - 1];
                if tx.send(Handoff { stream, peer }).is_ok() {
                    let _ = waker.wake();
                } else {
                    self.stats.connections.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Connections loop 0 handed to this loop.
    fn take_handoffs(&mut self) {
        while let Ok(h) = self.incoming.try_recv() {
            if self.shutdown.load(Ordering::Acquire) {
                // Draining: accepted too late, closed at once.
                self.stats.connections.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
            self.add(h.stream, &h.peer);
        }
    }

    /// Takes a new connection (already counted in the stats).
    fn add(&mut self, stream: Stream, peer: &str) {
        self.next_gen += 1;
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let mut conn = Conn::new(
            ConnId {
                key,
                gen: self.next_gen,
            },
            stream,
            peer,
            &self.cfg,
            self.tls.as_deref(),
        );
        if let Err(e) = self.poll.registry().register(
            conn.stream(),
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::warn!(error = %e, "nbd: cannot register connection");
            self.stats.connections.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        conn.span().in_scope(|| tracing::debug!("nbd: connected"));
        let c = entry.insert(conn);
        enqueue(&mut self.ready, key, c);
    }

    fn ctx(&mut self) -> (Ctx<'_>, &mut Slab<Conn>, &mut VecDeque<usize>) {
        (
            Ctx {
                cfg: &self.cfg,
                pool: &self.pool,
                provider: &self.provider,
                stats: &self.stats,
                limiter: &mut self.limiter,
                tls: self.tls.as_deref(),
                access: &self.access,
            },
            &mut self.conns,
            &mut self.ready,
        )
    }

    fn completions(&mut self) {
        let mut closing = Vec::new();
        {
            let (mut ctx, conns, ready) = self.ctx();
            let pool = ctx.pool;
            pool.drain(|id, done| {
                let Some(c) = conns.get_mut(id.key) else {
                    return;
                };
                if c.id().gen != id.gen {
                    return;
                }
                match c.complete(done, &mut ctx) {
                    Pump::Close => closing.push(id.key),
                    _ => enqueue(ready, id.key, c),
                }
            });
        }
        for key in closing {
            self.close(key);
        }
    }

    fn pump_ready(&mut self) {
        let mut closing = Vec::new();
        {
            let (mut ctx, conns, ready) = self.ctx();
            for _ in 0..ready.len() {
                let Some(key) = ready.pop_front() else { break };
                let Some(c) = conns.get_mut(key) else {
                    continue;
                };
                c.queued = false;
                match c.pump(&mut ctx) {
                    Pump::Close => closing.push(key),
                    Pump::Busy => enqueue(ready, key, c),
                    Pump::Idle => {}
                }
            }
        }
        for key in closing {
            self.close(key);
        }
    }

    fn begin_drain(&mut self) {
        tracing::info!(connections = self.conns.len(), "nbd: shutting down");
        for mut l in self.listeners.drain(..) {
            let _ = match &mut l {
                Listener::Tcp(l) => self.poll.registry().deregister(l),
                Listener::Unix(l) => self.poll.registry().deregister(l),
            };
        }
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            let c = &mut self.conns[key];
            match c.begin_drain() {
                Pump::Close => self.close(key),
                _ => enqueue(&mut self.ready, key, c),
            }
        }
    }

    fn sweep(&mut self, now: Instant) {
        if std::mem::take(&mut self.accept_retry) {
            for i in 0..self.listeners.len() {
                self.accept(i);
            }
        }
        let expired: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(k, _)| k)
            .collect();
        for key in expired {
            if self.limiter.allow() {
                self.conns[key]
                    .span()
                    .in_scope(|| tracing::warn!("nbd: handshake timed out"));
            }
            self.close(key);
        }
    }

    fn close(&mut self, key: usize) {
        if let Some(mut c) = self.conns.try_remove(key) {
            let _ = self.poll.registry().deregister(c.stream());
            c.log_closed();
            self.stats.connections.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn close_all(&mut self) {
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.close(key);
        }
    }
}
