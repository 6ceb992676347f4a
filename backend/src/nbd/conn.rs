//! One client connection inside the event loop: its socket, input buffer, output queue, and
//! protocol phase. [`Conn::pump`] moves bytes until the socket would block or a limit is
//! reached; blocking work goes to the worker pool and comes back through [`Conn::complete`].
//!
//! ```text
//!  socket ─► InBuf ─► Handshake::advance ──► Query ─► pool ─► Handshake::answer ─┐
//!              │                                                                 ▼
//!              └───► decide ─► (payload) ─► pool: exec::execute ─► reply ─► out queue ─► socket
//! ```
//!
//! Backpressure: a connection stops reading requests while it has `max_inflight_requests`
//! requests, or `max_inflight_bytes` of payload, between header and fully written reply. It
//! always admits one request, so a single maximum-size request makes progress.

use std::{
    collections::VecDeque,
    io::{self, IoSlice, Read, Write},
    os::fd::{AsRawFd, RawFd},
    sync::{atomic::Ordering, Arc},
    time::Instant,
};

use mio::{event::Source, Interest, Registry, Token};
use openssl::ssl::{ErrorCode, SslStream};

use crate::{
    disk::{Disk, DiskProvider, ExportInfo, OpenError},
    ratelimit::RateLimit,
};

use super::{
    access::{Access, AccessPolicy},
    buffers,
    config::{NbdConfig, StatsInner},
    exec::{self, Outcome},
    handshake::{Answer, Handshake, HandshakeLimits, Query, Step, TlsPolicy, MAX_OPTION_LEN},
    pool::{ConnId, Job, Pool},
    proto::{command_name, RequestHeader, WireError, EIO, OPTION_HEADER_LEN, REQUEST_LEN},
    tls::{self, ClientIdentity, TlsServer},
    transmission::{decide, error_reply, Command, Decision, Params, Request},
};

/// A client socket: TCP or Unix.
pub enum Socket {
    Tcp(mio::net::TcpStream),
    Unix(mio::net::UnixStream),
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.read(buf),
            Socket::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Through sendmsg, so that a vanished client is EPIPE, never SIGPIPE.
        send_vectored(self.as_raw_fd(), &[IoSlice::new(buf)])
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Socket::Tcp(s) => s.as_raw_fd(),
            Socket::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Source for Socket {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.register(r, t, i),
            Socket::Unix(s) => s.register(r, t, i),
        }
    }

    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.reregister(r, t, i),
            Socket::Unix(s) => s.reregister(r, t, i),
        }
    }

    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.deregister(r),
            Socket::Unix(s) => s.deregister(r),
        }
    }
}

/// A client connection's byte stream: the socket, or TLS on it after STARTTLS.
pub enum Stream {
    Plain(Socket),
    Tls(Box<SslStream<Socket>>),
    /// Only while the socket moves into its TLS session.
    Switching,
}

impl Stream {
    fn socket(&mut self) -> io::Result<&mut Socket> {
        match self {
            Stream::Plain(s) => Ok(s),
            Stream::Tls(t) => Ok(t.get_mut()),
            Stream::Switching => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// Writes some of `bufs`: one `sendmsg` in plaintext, TLS records of the first ones
    /// otherwise.
    fn send(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => send_vectored(s.as_raw_fd(), bufs),
            Stream::Tls(t) => match bufs.iter().find(|b| !b.is_empty()) {
                Some(b) => t.write(b),
                None => Ok(0),
            },
            Stream::Switching => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(t) => t.read(buf),
            Stream::Switching => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

impl Source for Stream {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        self.socket()?.register(r, t, i)
    }

    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        self.socket()?.reregister(r, t, i)
    }

    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        self.socket()?.deregister(r)
    }
}

/// Where a connection is with TLS.
enum TlsPhase {
    /// Plaintext, and staying so unless the client sends STARTTLS.
    None,
    /// STARTTLS acknowledged: the TLS handshake starts once the acknowledgement is sent.
    Starting,
    /// The TLS handshake is running.
    Accepting,
    /// TLS is on.
    On,
}

/// Gathers `bufs` into one `sendmsg` with `MSG_NOSIGNAL`, so a vanished client is an `EPIPE`
/// error rather than a `SIGPIPE` that would kill the daemon.
fn send_vectored(fd: RawFd, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: an all-zero `msghdr` is valid: null name and control pointers with zero lengths.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // `IoSlice` is guaranteed ABI-compatible with `struct iovec` on Unix.
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len() as _;
    // SAFETY: `msg` points at `bufs.len()` valid iovecs borrowed for the duration of the call;
    // sendmsg only reads them. `fd` is an open socket owned by the caller.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Input bytes not yet parsed. Starts small and grows (up to `max`) only when a complete
/// message does not fit, i.e. for a long handshake option: write payloads bypass it.
struct InBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max: usize,
}

impl InBuf {
    fn new(initial: usize, max: usize) -> Self {
        InBuf {
            buf: vec![0; initial],
            start: 0,
            end: 0,
            max,
        }
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    fn consume(&mut self, n: usize) {
        self.start += n.min(self.len());
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Full at its largest size: nothing more can be read until something is parsed.
    fn is_full(&self) -> bool {
        self.len() >= self.max
    }

    fn read_from(&mut self, s: &mut Stream) -> io::Result<usize> {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let cap = (self.buf.len() * 2).clamp(1, self.max);
                self.buf.resize(cap, 0);
            }
        }
        let n = s.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }
}

/// Bytes waiting to be sent. `charge` is set on a request's reply: sending it completes the
/// request and returns its budget.
struct OutChunk {
    bytes: Vec<u8>,
    pos: usize,
    charge: Option<u64>,
}

/// What the workers hand back.
pub enum Done {
    Reply {
        outcome: Outcome,
        charge: u64,
        command: &'static str,
    },
    Answer {
        answer: Answer,
        disk: Option<Arc<dyn Disk>>,
    },
}

/// Everything a connection needs from the server while it runs.
pub struct Ctx<'a> {
    pub cfg: &'a NbdConfig,
    pub pool: &'a Pool<Done>,
    pub provider: &'a Arc<dyn DiskProvider>,
    pub stats: &'a StatsInner,
    pub limiter: &'a mut RateLimit,
    /// TLS credentials, when the server has them.
    pub tls: Option<&'a TlsServer>,
    /// Which client may see, read or write which export.
    pub access: &'a Arc<AccessPolicy>,
}

/// What the event loop should do with a connection after pumping it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pump {
    /// Nothing to do until the next event.
    Idle,
    /// More input may be waiting but the per-turn budget ran out: pump again soon.
    Busy,
    /// Close the connection.
    Close,
}

enum Recv {
    Header,
    Payload {
        req: Request,
        buf: Vec<u8>,
        have: usize,
        charge: u64,
    },
    Discard {
        remaining: u64,
    },
}

struct Transfer {
    params: Params,
    disk: Arc<dyn Disk>,
    recv: Recv,
}

enum Phase {
    Handshake(Box<Handshake>),
    Transmission(Box<Transfer>),
}

/// Input buffer size at first; it grows to hold the longest handshake option.
const INBUF_INITIAL: usize = 32 * 1024;
/// Bytes one pump reads before yielding to other connections.
const READ_BUDGET: usize = 1 << 20;
/// Slices gathered into one `sendmsg`.
const MAX_IOV: usize = 64;

/// Socket-side state, apart from the protocol phase so both can be borrowed at once.
struct Io {
    id: ConnId,
    stream: Stream,
    inbuf: InBuf,
    out: VecDeque<OutChunk>,
    inflight: usize,
    inflight_bytes: u64,
    /// Bytes sent so far (progress marker for `pump`).
    written: u64,
    /// Data the client read and wrote through this connection, for the log line at close.
    data_read: u64,
    data_written: u64,
    readable: bool,
    writable: bool,
    /// Read nothing more: EOF, `NBD_CMD_DISC`, `NBD_OPT_ABORT`, or server shutdown.
    input_closed: bool,
}

pub struct Conn {
    io: Io,
    phase: Phase,
    tls: TlsPhase,
    /// Who the client proved to be (anonymous until a TLS handshake says otherwise).
    client: ClientIdentity,
    span: tracing::Span,
    /// Handshake deadline; `None` in transmission.
    pub deadline: Option<Instant>,
    /// Already in the loop's ready queue.
    pub queued: bool,
}

impl Conn {
    pub fn new(
        id: ConnId,
        stream: Stream,
        peer: &str,
        cfg: &NbdConfig,
        tls: Option<&TlsServer>,
    ) -> Self {
        let span = tracing::info_span!(
            "nbd",
            conn = id.gen,
            peer = %peer,
            client = tracing::field::Empty,
            export = tracing::field::Empty
        );
        let policy = match tls {
            None => TlsPolicy::Unavailable,
            Some(t) if t.required() => TlsPolicy::Required,
            Some(_) => TlsPolicy::Optional,
        };
        let limits = HandshakeLimits {
            max_options: cfg.max_options,
            max_option_len: MAX_OPTION_LEN,
            max_request_bytes: cfg.max_request_bytes,
        };
        let mut io = Io {
            id,
            stream,
            inbuf: InBuf::new(INBUF_INITIAL, MAX_OPTION_LEN as usize + OPTION_HEADER_LEN),
            out: VecDeque::new(),
            inflight: 0,
            inflight_bytes: 0,
            written: 0,
            data_read: 0,
            data_written: 0,
            readable: true,
            writable: true,
            input_closed: false,
        };
        io.queue(Handshake::greeting().to_vec(), None);
        Conn {
            io,
            phase: Phase::Handshake(Box::new(Handshake::with_tls(limits, policy))),
            tls: TlsPhase::None,
            client: ClientIdentity::Anonymous,
            span,
            deadline: Some(Instant::now() + cfg.handshake_timeout),
            queued: false,
        }
    }

    pub fn id(&self) -> ConnId {
        self.io.id
    }

    /// The log line for a connection that ends: at `info` with the data it moved once it
    /// reached an export (its opening was logged too), else at `debug`.
    pub fn log_closed(&self) {
        self.span.in_scope(|| match &self.phase {
            Phase::Transmission(_) => tracing::info!(
                read_bytes = self.io.data_read,
                written_bytes = self.io.data_written,
                "nbd: closed"
            ),
            Phase::Handshake(_) => tracing::debug!("nbd: closed during the handshake"),
        });
    }

    pub fn stream(&mut self) -> &mut Stream {
        &mut self.io.stream
    }

    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    pub fn in_handshake(&self) -> bool {
        matches!(self.phase, Phase::Handshake(_))
    }

    /// A readiness event arrived.
    pub fn ready(&mut self) {
        self.io.readable = true;
        self.io.writable = true;
    }

    /// Server shutdown: read no more requests; what is in flight still gets its reply.
    /// Connections still in the handshake are closed.
    pub fn begin_drain(&mut self) -> Pump {
        if self.in_handshake() {
            return Pump::Close;
        }
        self.stop_input();
        Pump::Busy
    }

    /// Stops reading, drops unparsed input, and forgets a request whose payload was only
    /// partly received.
    fn stop_input(&mut self) {
        self.io.input_closed = true;
        self.io.inbuf.clear();
        self.forget_partial();
    }

    fn forget_partial(&mut self) {
        if let Phase::Transmission(t) = &mut self.phase {
            if let Recv::Payload { charge, .. } = t.recv {
                self.io.inflight -= 1;
                self.io.inflight_bytes -= charge;
            }
            t.recv = Recv::Header;
        }
    }

    /// Moves bytes both ways until the socket would block, a limit is hit, or the per-turn
    /// read budget is spent.
    pub fn pump(&mut self, ctx: &mut Ctx<'_>) -> Pump {
        let span = self.span.clone();
        let _entered = span.enter();
        if let Err(e) = self.io.flush() {
            tracing::debug!(error = %e, "nbd: write failed");
            return Pump::Close;
        }
        let mut budget = READ_BUDGET;
        // Run to a fixpoint: writing output can unblock parsing (handshake replies, request
        // budget), and parsing can produce output, so stop only when a round changes nothing.
        loop {
            let mark = (
                self.io.inbuf.len(),
                self.io.written,
                self.io.out.len(),
                self.tls_step(),
            );
            if self.advance_tls(ctx).is_err() || self.process(ctx).is_err() {
                return Pump::Close;
            }
            if let Err(e) = self.io.flush() {
                tracing::debug!(error = %e, "nbd: write failed");
                return Pump::Close;
            }
            let can_read =
                !self.blocked(ctx.cfg) && !self.io.input_closed && self.io.readable && budget > 0;
            if !can_read {
                let now = (
                    self.io.inbuf.len(),
                    self.io.written,
                    self.io.out.len(),
                    self.tls_step(),
                );
                if mark == now {
                    break;
                }
                continue;
            }
            match self.read_some(budget) {
                // EOF: requests already buffered are still answered.
                Ok(0) => self.io.input_closed = true,
                Ok(n) => budget = budget.saturating_sub(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.io.readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(error = %e, "nbd: read failed");
                    return Pump::Close;
                }
            }
        }
        if self.io.input_closed {
            // Nothing more will arrive, so a partly received request never completes.
            self.forget_partial();
            let handshake_done = match &self.phase {
                Phase::Handshake(_) => true,
                Phase::Transmission(_) => self.io.inflight == 0,
            };
            if handshake_done && self.io.out.is_empty() {
                return Pump::Close;
            }
            return Pump::Idle;
        }
        if budget == 0 && self.io.readable && !self.blocked(ctx.cfg) {
            Pump::Busy
        } else {
            Pump::Idle
        }
    }

    /// Where the connection is with TLS, as a number (progress marker for `pump`).
    fn tls_step(&self) -> u8 {
        match self.tls {
            TlsPhase::None => 0,
            TlsPhase::Starting => 1,
            TlsPhase::Accepting => 2,
            TlsPhase::On => 3,
        }
    }

    /// Between STARTTLS and the end of the TLS handshake.
    fn tls_switching(&self) -> bool {
        matches!(self.tls, TlsPhase::Starting | TlsPhase::Accepting)
    }

    /// Moves the connection into TLS once STARTTLS's acknowledgement is sent, and drives the
    /// TLS handshake as the socket allows. `Err` means close the connection.
    fn advance_tls(&mut self, ctx: &mut Ctx<'_>) -> Result<(), ()> {
        match self.tls {
            TlsPhase::Starting if self.io.out.is_empty() => {
                if self.io.inbuf.len() > 0 {
                    // The client must wait for the acknowledgement before starting TLS.
                    tracing::debug!("nbd: client sent data between STARTTLS and TLS");
                    return Err(());
                }
                let server = ctx.tls.ok_or(())?;
                let ssl = server.session().map_err(|e| {
                    tracing::warn!(error = %e, "nbd: cannot start a TLS session");
                })?;
                let Stream::Plain(sock) = std::mem::replace(&mut self.io.stream, Stream::Switching)
                else {
                    return Err(());
                };
                let stream = SslStream::new(ssl, sock).map_err(|e| {
                    tracing::warn!(error = %e, "nbd: cannot start a TLS session");
                })?;
                self.io.stream = Stream::Tls(Box::new(stream));
                self.tls = TlsPhase::Accepting;
                self.accept_tls(ctx)
            }
            TlsPhase::Accepting => self.accept_tls(ctx),
            _ => Ok(()),
        }
    }

    fn accept_tls(&mut self, ctx: &mut Ctx<'_>) -> Result<(), ()> {
        let Stream::Tls(t) = &mut self.io.stream else {
            return Err(());
        };
        match t.accept() {
            Ok(()) => {
                let who = tls::identity(t.ssl());
                self.span.record("client", tracing::field::display(&who));
                tracing::debug!(version = t.ssl().version_str(), "nbd: TLS on");
                if let Phase::Handshake(hs) = &mut self.phase {
                    hs.tls_started();
                }
                self.client = who;
                self.tls = TlsPhase::On;
                Ok(())
            }
            Err(e) if e.code() == ErrorCode::WANT_READ => {
                self.io.readable = false;
                Ok(())
            }
            Err(e) if e.code() == ErrorCode::WANT_WRITE => {
                self.io.writable = false;
                Ok(())
            }
            Err(e) => {
                if ctx.limiter.allow() {
                    tracing::warn!(error = %e, "nbd: TLS handshake failed");
                }
                Err(())
            }
        }
    }

    /// True if the connection must not take more input now.
    fn blocked(&self, cfg: &NbdConfig) -> bool {
        match &self.phase {
            // Options are answered one at a time: the client waits for each reply anyway,
            // and this bounds what a client that never reads can make us buffer.
            Phase::Handshake(hs) => {
                hs.waiting()
                    || !self.io.out.is_empty()
                    || self.io.inbuf.is_full()
                    || self.tls_switching()
            }
            // A request whose header was admitted still gets its payload read.
            Phase::Transmission(t) => {
                self.io.inbuf.is_full()
                    || (matches!(t.recv, Recv::Header) && self.io.over_budget(cfg))
            }
        }
    }

    fn read_some(&mut self, budget: usize) -> io::Result<usize> {
        if let Phase::Transmission(t) = &mut self.phase {
            if let Recv::Payload { buf, have, .. } = &mut t.recv {
                if self.io.inbuf.len() == 0 {
                    // Large payloads go straight into their buffer.
                    let end = buf.len().min(*have + budget.max(1));
                    let n = self.io.stream.read(&mut buf[*have..end])?;
                    *have += n;
                    return Ok(n);
                }
            }
        }
        self.io.inbuf.read_from(&mut self.io.stream)
    }

    /// Parses and acts on buffered input. `Err` means close the connection now.
    fn process(&mut self, ctx: &mut Ctx<'_>) -> Result<(), ()> {
        loop {
            let switching = self.tls_switching();
            match &mut self.phase {
                Phase::Handshake(hs) => {
                    if self.io.input_closed || hs.waiting() || !self.io.out.is_empty() || switching
                    {
                        return Ok(());
                    }
                    let (n, step) = hs.advance(self.io.inbuf.data());
                    self.io.inbuf.consume(n);
                    self.io.queue(hs.take_output(), None);
                    match step {
                        Step::Continue => continue,
                        Step::NeedInput => return Ok(()),
                        Step::Query(q) => {
                            self.io.submit_query(q, self.client.clone(), ctx);
                            return Ok(());
                        }
                        Step::Abort => {
                            tracing::debug!("nbd: client aborted the handshake");
                            self.stop_input();
                            return Ok(());
                        }
                        Step::Fail(e) => {
                            if ctx.limiter.allow() {
                                tracing::warn!(error = %e, "nbd: handshake failed");
                            }
                            return Err(());
                        }
                        Step::StartTls => {
                            self.tls = TlsPhase::Starting;
                            return Ok(());
                        }
                        Step::Transmission(_) => return Err(()),
                    }
                }
                Phase::Transmission(t) => {
                    if self.io.process_requests(t, ctx)? {
                        self.stop_input();
                    }
                    return Ok(());
                }
            }
        }
    }

    /// A worker finished something for this connection.
    pub fn complete(&mut self, done: Done, ctx: &mut Ctx<'_>) -> Pump {
        let span = self.span.clone();
        let _entered = span.enter();
        match done {
            Done::Reply {
                outcome,
                charge,
                command,
            } => {
                self.io.finish(outcome, charge, command, ctx);
                Pump::Busy
            }
            Done::Answer { answer, disk } => {
                let Phase::Handshake(hs) = &mut self.phase else {
                    return Pump::Close;
                };
                let step = hs.answer(answer);
                self.io.queue(hs.take_output(), None);
                match step {
                    Step::Continue | Step::NeedInput => Pump::Busy,
                    Step::Transmission(n) => {
                        let Some(disk) = disk else { return Pump::Close };
                        self.span.record("export", n.export.name.as_str());
                        tracing::info!(
                            size = n.export.size,
                            access = if n.export.read_only {
                                "read-only"
                            } else {
                                "read-write"
                            },
                            structured = n.structured,
                            block_sizes = n.block_size_negotiated,
                            contexts = n.contexts.named().len(),
                            "nbd: export opened"
                        );
                        let params = Params::from(&n);
                        self.phase = Phase::Transmission(Box::new(Transfer {
                            params,
                            disk,
                            recv: Recv::Header,
                        }));
                        self.deadline = None;
                        Pump::Busy
                    }
                    Step::Fail(e) => {
                        if ctx.limiter.allow() {
                            tracing::warn!(error = %e, "nbd: handshake failed");
                        }
                        Pump::Close
                    }
                    // An answer never starts TLS: only the STARTTLS option does.
                    Step::Abort | Step::Query(_) | Step::StartTls => Pump::Close,
                }
            }
        }
    }
}

impl Io {
    fn queue(&mut self, bytes: Vec<u8>, charge: Option<u64>) {
        if bytes.is_empty() && charge.is_none() {
            return;
        }
        self.out.push_back(OutChunk {
            bytes,
            pos: 0,
            charge,
        });
    }

    fn over_budget(&self, cfg: &NbdConfig) -> bool {
        self.inflight > 0
            && (self.inflight >= cfg.max_inflight_requests
                || self.inflight_bytes >= cfg.max_inflight_bytes)
    }

    /// Writes queued output until the socket would block.
    fn flush(&mut self) -> io::Result<()> {
        while !self.out.is_empty() && self.writable {
            let slices: Vec<IoSlice<'_>> = self
                .out
                .iter()
                .take(MAX_IOV)
                .map(|c| IoSlice::new(&c.bytes[c.pos..]))
                .collect();
            let n = match self.stream.send(&slices) {
                Ok(0) if slices.iter().any(|s| !s.is_empty()) => {
                    return Err(io::ErrorKind::WriteZero.into())
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.writable = false;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.written += n as u64;
            let mut left = n;
            while let Some(front) = self.out.front_mut() {
                let rest = front.bytes.len() - front.pos;
                if left < rest {
                    front.pos += left;
                    break;
                }
                left -= rest;
                if let Some(charge) = front.charge {
                    self.inflight -= 1;
                    self.inflight_bytes -= charge;
                }
                if let Some(sent) = self.out.pop_front() {
                    buffers::give(sent.bytes);
                }
            }
        }
        Ok(())
    }

    fn submit_query(&mut self, q: Query, client: ClientIdentity, ctx: &mut Ctx<'_>) {
        let provider = ctx.provider.clone();
        let access = ctx.access.clone();
        let fallback = match &q {
            Query::List => Answer::List(Vec::new()),
            Query::Lookup(_) => Answer::Lookup(None),
            Query::Open(_) => Answer::Open(Err(OpenError::Other("internal error".into()))),
        };
        ctx.pool.submit(Job {
            conn: self.id,
            work: Box::new(move || {
                let (answer, disk) = answer_query(&*provider, q, &client, &access);
                Done::Answer { answer, disk }
            }),
            fallback: Done::Answer {
                answer: fallback,
                disk: None,
            },
        });
    }

    fn dispatch(
        &mut self,
        t: &Transfer,
        req: Request,
        payload: Vec<u8>,
        charge: u64,
        ctx: &mut Ctx<'_>,
    ) {
        let structured = t.params.structured;
        let command = req.command.name();
        ctx.stats.requests.fetch_add(1, Ordering::Relaxed);
        match req.command {
            Command::Read { len, .. } => {
                self.data_read += u64::from(len);
                ctx.stats
                    .bytes_read
                    .fetch_add(len.into(), Ordering::Relaxed);
            }
            Command::Write { len, .. } => {
                self.data_written += u64::from(len);
                ctx.stats
                    .bytes_written
                    .fetch_add(len.into(), Ordering::Relaxed);
            }
            _ => {}
        }
        // No hand-off to another thread for what does not wait for a device.
        let outcome = match exec::placement(&req) {
            exec::Placement::Inline => exec::execute(&*t.disk, structured, req, payload),
            exec::Placement::ReadIfCached => {
                match exec::try_read_inline(&*t.disk, structured, &req) {
                    Some(outcome) => outcome,
                    None => return self.submit(t, req, Vec::new(), charge, ctx),
                }
            }
            exec::Placement::Worker => return self.submit(t, req, payload, charge, ctx),
        };
        self.finish(outcome, charge, command, ctx);
    }

    /// A request's reply is ready: queue it (its budget comes back once it is sent).
    fn finish(&mut self, outcome: Outcome, charge: u64, command: &'static str, ctx: &mut Ctx<'_>) {
        if let Some(e) = outcome.error {
            ctx.stats.request_errors.fetch_add(1, Ordering::Relaxed);
            if ctx.limiter.allow() {
                tracing::warn!(command, error = %e, "nbd: request failed");
            }
        }
        self.queue(outcome.reply, Some(charge));
    }

    /// Hands a request to a worker thread.
    fn submit(
        &mut self,
        t: &Transfer,
        req: Request,
        payload: Vec<u8>,
        charge: u64,
        ctx: &mut Ctx<'_>,
    ) {
        let (disk, structured) = (t.disk.clone(), t.params.structured);
        let command = req.command.name();
        let fallback = Done::Reply {
            outcome: Outcome {
                reply: exec::failure_reply(structured, &req, EIO, "internal error"),
                error: Some(crate::disk::DiskError::Io),
            },
            charge,
            command,
        };
        ctx.pool.submit(Job {
            conn: self.id,
            work: Box::new(move || Done::Reply {
                outcome: exec::execute(&*disk, structured, req, payload),
                charge,
                command,
            }),
            fallback,
        });
    }

    /// Parses requests out of the input buffer. Returns `Ok(true)` when the client sent
    /// `NBD_CMD_DISC`, `Err` on a protocol violation that ends the connection.
    fn process_requests(&mut self, t: &mut Transfer, ctx: &mut Ctx<'_>) -> Result<bool, ()> {
        loop {
            match &mut t.recv {
                Recv::Header => {
                    if self.inbuf.len() < REQUEST_LEN || self.over_budget(ctx.cfg) {
                        return Ok(false);
                    }
                    let h = match RequestHeader::decode(self.inbuf.data()) {
                        Ok(h) => h,
                        Err(WireError::BadMagic(m)) => {
                            if ctx.limiter.allow() {
                                tracing::warn!(
                                    magic = format_args!("{m:#x}"),
                                    "nbd: bad request magic, disconnecting"
                                );
                            }
                            return Err(());
                        }
                        Err(WireError::Short) => return Ok(false),
                    };
                    self.inbuf.consume(REQUEST_LEN);
                    match decide(&t.params, &h) {
                        Decision::Disconnect => {
                            tracing::debug!("nbd: client disconnected");
                            return Ok(true);
                        }
                        Decision::Reject {
                            handle,
                            errno,
                            discard,
                            why,
                        } => {
                            ctx.stats.request_errors.fetch_add(1, Ordering::Relaxed);
                            if ctx.limiter.allow() {
                                tracing::warn!(
                                    command = command_name(h.kind),
                                    offset = h.offset,
                                    len = h.len,
                                    flags = h.flags,
                                    errno,
                                    "nbd: request refused: {why}"
                                );
                            }
                            let reply = error_reply(t.params.structured, handle, errno, why);
                            self.inflight += 1;
                            self.queue(reply, Some(0));
                            if discard > 0 {
                                t.recv = Recv::Discard {
                                    remaining: discard.into(),
                                };
                            }
                        }
                        Decision::Execute(req) => {
                            let charge = req.command.cost();
                            self.inflight += 1;
                            self.inflight_bytes += charge;
                            match req.command {
                                Command::Write { len, .. } if len > 0 => {
                                    t.recv = Recv::Payload {
                                        req,
                                        buf: buffers::take(len as usize),
                                        have: 0,
                                        charge,
                                    };
                                }
                                _ => self.dispatch(t, req, Vec::new(), charge, ctx),
                            }
                        }
                    }
                }
                Recv::Payload { buf, have, .. } => {
                    let n = self.inbuf.len().min(buf.len() - *have);
                    buf[*have..*have + n].copy_from_slice(&self.inbuf.data()[..n]);
                    self.inbuf.consume(n);
                    *have += n;
                    if *have < buf.len() {
                        return Ok(false);
                    }
                    let Recv::Payload {
                        req, buf, charge, ..
                    } = std::mem::replace(&mut t.recv, Recv::Header)
                    else {
                        unreachable!("matched above")
                    };
                    self.dispatch(t, req, buf, charge, ctx);
                }
                Recv::Discard { remaining } => {
                    let n = (self.inbuf.len() as u64).min(*remaining);
                    self.inbuf.consume(n as usize);
                    *remaining -= n;
                    if *remaining > 0 {
                        return Ok(false);
                    }
                    t.recv = Recv::Header;
                }
            }
        }
    }
}

/// Answers a handshake query from the export catalogue as `access` lets `client` see it (on a
/// worker thread). An `Open` also returns the disk it opened.
pub fn answer_query(
    provider: &dyn DiskProvider,
    q: Query,
    client: &ClientIdentity,
    access: &AccessPolicy,
) -> (Answer, Option<Arc<dyn Disk>>) {
    // What the client may do, and the export as it may use it (read-only unless it may write).
    let find = |name: &str| {
        let mut info = provider.export_info(name)?;
        let allowed = access.access(client, name)?;
        info.read_only |= allowed != Access::Write;
        Some((allowed, info))
    };
    match q {
        Query::List => {
            let mut exports = provider.list_exports();
            exports.retain(|e| access.access(client, &e.name).is_some());
            (Answer::List(exports), None)
        }
        Query::Lookup(name) => (Answer::Lookup(find(&name).map(|(_, info)| info)), None),
        Query::Open(name) => {
            let Some((allowed, info)) = find(&name) else {
                return (Answer::Open(Err(OpenError::NotFound(name))), None);
            };
            if allowed == Access::See {
                let why = format!("client {client} may not open {name}");
                return (Answer::Open(Err(OpenError::Denied(why))), None);
            }
            let write = !info.read_only;
            match provider.open_export(&name, write) {
                Ok(disk) => {
                    let export = ExportInfo {
                        name: info.name,
                        description: info.description,
                        size: disk.size(),
                        read_only: !write || disk.read_only(),
                    };
                    (Answer::Open(Ok(export)), Some(disk))
                }
                Err(e) => (Answer::Open(Err(e)), None),
            }
        }
    }
}
