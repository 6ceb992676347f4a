//! The control protocol between hosts: the same request and answer lines as the control
//! socket ([`super::control`]), over TCP inside TLS, for what one Parallax host asks of
//! another (`vdi migrate`) and for managing a daemon from elsewhere.
//!
//! ```text
//!  peer                                           daemon (`serve --control-listen ADDR`)
//!  TCP connect, TLS handshake (the NBD server's credentials: PSK or x509)
//!                                                 identity not in `control.clients` → denied
//!  {"op":"migrate-in","name":"vm"}\n + stream ──► ◄── {"ok":…}\n  or  {"error":{…}}\n
//! ```
//!
//! TLS is not optional here: the listener refuses to start without credentials, and only the
//! identities listed in `control.clients` (`psk:NAME`, `cert:NAME`, with `*` and `?`) are
//! served. An import's image follows its request line (as a migration's stream does);
//! requests that hand over a file descriptor to write to or read a stream from (export, send,
//! receive) cannot cross a network and are refused; everything else is as on the socket.

use std::{
    cell::RefCell,
    io::{self, BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream, ToSocketAddrs},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::{
    control::{self, ControlContext, PeerTls, Reply, Request, MAX_CONNECTIONS},
    migrate::{AbortOutcome, Destination, StreamBody},
};
use crate::{
    nbd::{
        client::tls_client,
        tls::{identity, TlsServer},
        uri::{Address, NbdUri},
    },
    store::{StoreError, StoreResult},
    stream::RecvReport,
    util::wildcard_match,
};

/// The port a network control listener takes when an address names none.
pub const DEFAULT_PORT: u16 = 10810;
/// How long a peer may take to connect, finish its TLS handshake and send its request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connection may go without a byte moving once its request is in (a stream
/// that stalls, a peer that stops reading, an answer that never comes): a peer that is gone
/// does not hold a thread, or a parked VDI, forever.
const STALL_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest request line accepted.
const MAX_LINE: u64 = 64 << 10;

/// `control` in `parallax.ron`: the network control listener.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetControlSettings {
    /// `HOST:PORT` to listen on (TLS with the `nbd.tls` credentials); none by default.
    pub listen: Option<String>,
    /// Client identities served (`psk:NAME`, `cert:NAME`, with `*` and `?`); no one by default.
    pub clients: Vec<String>,
}

impl NetControlSettings {
    /// Checks the settings' shape; errors are one line.
    pub fn validate(&self) -> Result<(), String> {
        let Some(listen) = &self.listen else {
            return Ok(());
        };
        if self.clients.is_empty() {
            return Err(format!(
                "control listener {listen}: name who may use it (--control-client psk:NAME or \
                 cert:NAME)"
            ));
        }
        for c in &self.clients {
            if !(c.starts_with("psk:") || c.starts_with("cert:") || c == "*") {
                return Err(format!(
                    "control client {c:?} is not `psk:NAME`, `cert:NAME` or `*`"
                ));
            }
        }
        Ok(())
    }
}

/// Binds `addr` (`HOST:PORT`, or `HOST` for [`DEFAULT_PORT`]).
pub fn bind(addr: &str) -> io::Result<TcpListener> {
    let full = with_port(addr);
    TcpListener::bind(&full)
        .map_err(|e| io::Error::new(e.kind(), format!("control listener {full}: {e}")))
}

fn with_port(addr: &str) -> String {
    let has_port = match addr.rsplit_once(':') {
        Some((host, port)) => {
            port.parse::<u16>().is_ok() && (!host.contains(':') || host.ends_with(']'))
        }
        None => false,
    };
    if has_port {
        addr.to_string()
    } else {
        format!("{addr}:{DEFAULT_PORT}")
    }
}

/// Accepts peers until the listener is shut down; each is served on its own thread, at most
/// [`MAX_CONNECTIONS`] at once.
pub fn serve(
    listener: TcpListener,
    tls: Arc<TlsServer>,
    clients: Vec<String>,
    ctx: Arc<ControlContext>,
) {
    let clients = Arc::new(clients);
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => break,
            Err(e) => {
                warn!("control listener accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            debug!("control listener: too many peers; one refused");
            continue;
        }
        let (tls, clients, ctx, active) =
            (tls.clone(), clients.clone(), ctx.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name("parallax-ctl-net".into())
            .spawn(move || {
                let peer = stream
                    .peer_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                if let Err(e) = handle(stream, &tls, &clients, &ctx) {
                    debug!("control connection from {peer}: {e}");
                }
                active.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            warn!("cannot start a control thread: {e}");
        }
    }
}

/// One connection's reader and writer, used in turn: a request reads the stream after it,
/// then answers.
struct Shared<S: Read + Write>(RefCell<BufReader<S>>);

impl<S: Read + Write> Read for &Shared<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.borrow_mut().read(buf)
    }
}

impl<S: Read + Write> control::Lines for Shared<S> {
    fn put(&self, bytes: &[u8]) -> io::Result<()> {
        let mut r = self.0.borrow_mut();
        r.get_mut().write_all(bytes)?;
        r.get_mut().flush()
    }
}

fn handle(
    tcp: TcpStream,
    tls: &TlsServer,
    clients: &[String],
    ctx: &ControlContext,
) -> io::Result<()> {
    tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    tcp.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    tcp.set_nodelay(true)?;
    let session = tls.session().map_err(io::Error::other)?;
    let ssl = session
        .accept(tcp)
        .map_err(|e| io::Error::other(format!("TLS handshake: {e}")))?;
    let who = identity(ssl.ssl()).to_string();
    let conn = Shared(RefCell::new(BufReader::new(ssl)));
    let refuse = |kind: &str, message: String| {
        control::send(
            &conn,
            &Reply::Error {
                kind: kind.into(),
                message,
            },
        )
    };
    if !clients.iter().any(|c| wildcard_match(c, &who)) {
        warn!("control connection from {who} refused: not in control.clients");
        return refuse(
            "denied",
            format!("{who} may not use this daemon's control listener"),
        );
    }
    let mut line = Vec::new();
    conn.0
        .borrow_mut()
        .by_ref()
        .take(MAX_LINE)
        .read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        return refuse("invalid", "request line missing or too long".into());
    }
    {
        // The request is in: a transfer may take as long as it takes, if it moves.
        let r = conn.0.borrow();
        r.get_ref()
            .get_ref()
            .set_read_timeout(Some(STALL_TIMEOUT))?;
        r.get_ref()
            .get_ref()
            .set_write_timeout(Some(STALL_TIMEOUT))?;
    }
    let req: Request = match serde_json::from_slice(&line) {
        Ok(r) => r,
        Err(e) => return refuse("invalid", format!("bad request: {e}")),
    };
    if matches!(
        req,
        Request::Export { .. } | Request::Send { .. } | Request::Recv { .. }
    ) {
        return refuse(
            "unsupported",
            format!("`{req}` hands over a file, which cannot cross a network: run it on the host"),
        );
    }
    info!("control (network, {who}): {req}");
    let mut input = &conn;
    control::answer(&req, None, Some(&mut input), ctx, &conn)
}

/// A client of another daemon's network control listener (what `vdi migrate` and
/// `parallax --connect` use): one connection per request.
#[derive(Debug, Clone)]
pub struct NetClient {
    addr: String,
    uri: NbdUri,
}

impl NetClient {
    /// `to` is `HOST[:PORT]`; `tls` the credentials to present.
    pub fn new(to: &str, tls: &PeerTls) -> StoreResult<NetClient> {
        let addr = with_port(to);
        let (host, port) = addr
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
            .ok_or_else(|| StoreError::Invalid(format!("--to {to}: expected HOST[:PORT]")))?;
        if tls.psk_file.is_none() && tls.certificates.is_none() {
            return Err(StoreError::Invalid(
                "the other daemon speaks only TLS: give a key file (with the identity to use) \
                 or a certificates directory"
                    .into(),
            ));
        }
        Ok(NetClient {
            addr: addr.clone(),
            uri: NbdUri {
                address: Address::Tcp {
                    host: host.to_string(),
                    port,
                },
                export: String::new(),
                tls: true,
                psk_file: tls.psk_file.clone(),
                username: tls.username.clone(),
                certificates: tls.certificates.clone(),
            },
        })
    }

    fn unreachable(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Peer(format!("{}: {e}", self.addr))
    }

    /// Where it connects, `HOST:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends `req` and returns its answer, passing progress lines to `progress` and each item
    /// of a streamed answer to `item`.
    pub fn request(
        &self,
        req: &Request,
        progress: &mut dyn FnMut(u64, u64),
        item: &mut dyn FnMut(serde_json::Value) -> io::Result<()>,
    ) -> StoreResult<serde_json::Value> {
        self.exchange(req, None, progress, item)
    }

    /// Sends `req`, then everything `body` holds (an image to import), and returns the
    /// answer; `sent` is told how many bytes have gone.
    pub fn request_with_body(
        &self,
        req: &Request,
        body: &mut dyn Read,
        sent: &mut dyn FnMut(u64),
        progress: &mut dyn FnMut(u64, u64),
    ) -> StoreResult<serde_json::Value> {
        let mut copy = |w: &mut dyn Write| -> StoreResult<u64> {
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            loop {
                let n = match body.read(&mut buf) {
                    Ok(0) => return Ok(total),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(StoreError::Io(e)),
                };
                w.write_all(&buf[..n]).map_err(|e| self.unreachable(e))?;
                total += n as u64;
                sent(total);
            }
        };
        self.exchange(req, Some(&mut copy), progress, &mut |_| {
            Err(io::Error::other("an item in an answer that has none"))
        })
    }

    /// Sends `req`, then whatever `body` writes, and returns the answer.
    fn call(
        &self,
        req: &Request,
        body: Option<&mut StreamBody<'_>>,
    ) -> StoreResult<serde_json::Value> {
        self.exchange(req, body, &mut |_, _| {}, &mut |_| {
            Err(io::Error::other("an item in an answer that has none"))
        })
    }

    fn exchange(
        &self,
        req: &Request,
        body: Option<&mut StreamBody<'_>>,
        progress: &mut dyn FnMut(u64, u64),
        item: &mut dyn FnMut(serde_json::Value) -> io::Result<()>,
    ) -> StoreResult<serde_json::Value> {
        let sock = self
            .addr
            .to_socket_addrs()
            .map_err(|e| self.unreachable(e))?
            .next()
            .ok_or_else(|| self.unreachable("no address"))?;
        let tcp = TcpStream::connect_timeout(&sock, HANDSHAKE_TIMEOUT)
            .map_err(|e| self.unreachable(e))?;
        tcp.set_nodelay(true).map_err(|e| self.unreachable(e))?;
        tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(|e| self.unreachable(e))?;
        tcp.set_write_timeout(Some(STALL_TIMEOUT))
            .map_err(|e| self.unreachable(e))?;
        let mut tls = tls_client(tcp, &self.uri).map_err(|e| self.unreachable(e))?;
        let mut line = serde_json::to_vec(req).map_err(|e| StoreError::Invalid(e.to_string()))?;
        line.push(b'\n');
        let mut sent = tls.write_all(&line).map_err(|e| self.unreachable(e));
        if let (Ok(()), Some(body)) = (&sent, body) {
            let mut w = io::BufWriter::with_capacity(1 << 20, &mut tls);
            sent = body(&mut w).and_then(|_| w.flush().map_err(|e| self.unreachable(e)));
            drop(w);
            if sent.is_ok() {
                // A stream ends where its sender stops: TLS's close_notify, after which the
                // session still carries the answer the other way.
                sent = tls.shutdown().map(|_| ()).map_err(|e| self.unreachable(e));
            }
        }
        // The destination may have refused before reading everything: its answer says why,
        // better than a broken pipe. After a failure here it is told that nothing more comes
        // (and given a while to answer).
        let wait = if let Err(e) = &sent {
            debug!("{}: sending failed: {e}", self.addr);
            let _ = tls.get_ref().shutdown(std::net::Shutdown::Write);
            HANDSHAKE_TIMEOUT
        } else {
            STALL_TIMEOUT
        };
        tls.get_ref()
            .set_read_timeout(Some(wait))
            .map_err(|e| self.unreachable(e))?;
        let mut reader = BufReader::new(&mut tls);
        let (reply, read) = loop {
            let mut answer = String::new();
            let read = reader.read_line(&mut answer);
            let reply = match read {
                Ok(n) if n > 0 => serde_json::from_str::<Reply>(&answer).ok(),
                _ => None,
            };
            match reply {
                Some(Reply::Progress { done, total }) => progress(done, total),
                Some(Reply::Item(v)) => item(v).map_err(|e| self.unreachable(e))?,
                r => break (r, read),
            }
        };
        match (reply, sent) {
            (Some(Reply::Ok(v)), Ok(())) => Ok(v),
            (Some(Reply::Error { message, .. }), _) => Err(remote_error(&self.addr, message)),
            (_, Err(e)) => Err(e),
            (_, Ok(())) => Err(self.unreachable(match read {
                Err(e) => e.to_string(),
                Ok(_) => "closed the connection without answering".into(),
            })),
        }
    }
}

/// The other host's error as this host reports it: its words, saying where it happened.
fn remote_error(addr: &str, message: String) -> StoreError {
    StoreError::Peer(format!("{addr}: {message}"))
}

fn decode<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> StoreResult<T> {
    serde_json::from_value(v).map_err(|e| StoreError::Peer(format!("unexpected answer: {e}")))
}

impl Destination for NetClient {
    fn describe(&self) -> String {
        self.addr.clone()
    }

    fn receive_full(&mut self, name: &str, send: &mut StreamBody<'_>) -> StoreResult<RecvReport> {
        let req = Request::MigrateIn {
            name: name.to_string(),
            migration: None,
        };
        decode(self.call(&req, Some(send))?)
    }

    fn receive_final(
        &mut self,
        name: &str,
        migration: u64,
        send: &mut StreamBody<'_>,
    ) -> StoreResult<RecvReport> {
        let req = Request::MigrateIn {
            name: name.to_string(),
            migration: Some(migration),
        };
        decode(self.call(&req, Some(send))?)
    }

    fn abort(
        &mut self,
        name: &str,
        migration: u64,
        final_snapshot: Option<(&str, u64)>,
    ) -> StoreResult<AbortOutcome> {
        let req = Request::MigrateAbort {
            name: name.to_string(),
            migration,
            final_snapshot: final_snapshot.map(|(n, g)| (n.to_string(), g)),
        };
        decode(self.call(&req, None)?)
    }
}
