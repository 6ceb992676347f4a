//! The control socket: how `parallax vdi …`, `df`, `check`, `gc` reach a running daemon.
//!
//! ```text
//!  client                                         daemon (a thread per connection)
//!  {"op":"snapshot","vdi":"a","snap":"s"}\n  ──►   (+ SCM_RIGHTS file for import/export)
//!                                            ◄──   {"progress":{"done":..,"total":..}}\n …
//!                                            ◄──   {"item":<entry>}\n …  (a streamed list)
//!                                            ◄──   {"ok":<result>}\n  or  {"error":{..}}\n
//!  {"op":"ring-attach",…}\n                  ──►   handed to blkif::local::serve_attach
//! ```
//!
//! One request per connection. Only the daemon's own user and root may connect (checked with
//! SO_PEERCRED: an abstract socket has no file permissions).

use std::{
    fs::File,
    io::{self, BufRead, BufReader, Write},
    os::{
        fd::{AsFd, OwnedFd},
        unix::net::{UnixListener, UnixStream},
    },
    sync::Arc,
};

use serde::{Deserialize, Serialize};
use tracing::{debug, error, info, warn};

use crate::{
    blkif::local::{recv_with_fds, send_with_fds},
    schedule::{self, policy},
    signal::Signal,
    store::{Kind, ListFilter, Schedule, Store, StoreError},
    stream, transfer,
};

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Who are you: the daemon's store and PID.
    Hello,
    Create {
        name: String,
        size: u64,
    },
    /// A VDI reading through the NBD export `uri` (paths in it absolute); `size` `None`: the
    /// export's.
    CreateBacked {
        name: String,
        size: Option<u64>,
        uri: String,
    },
    /// Copy what a remote-backed VDI still reads through its backing, then drop the backing.
    Hydrate {
        name: String,
    },
    /// The raw image comes as a file descriptor, or from the NBD export at `source` (a URI
    /// the daemon connects to; paths in it absolute), or (over the network control listener)
    /// as the bytes that follow the request line, `size` of them at most.
    Import {
        name: String,
        size: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source: Option<String>,
    },
    /// The destination comes as a file descriptor; `stream` for pipes (write every byte).
    Export {
        name: String,
        stream: bool,
    },
    Snapshot {
        vdi: String,
        snap: String,
    },
    Fork {
        src: String,
        new: String,
    },
    /// Every entry when no filter field is given.
    List {
        #[serde(default)]
        prefix: Option<String>,
        #[serde(default)]
        origin: Option<String>,
        #[serde(default)]
        kind: Option<Kind>,
        /// Count used and unique bytes too (a map walk per entry).
        #[serde(default)]
        usage: bool,
        /// Send each entry as an `item` line as soon as it is read, then `ok` with null;
        /// without it, one `ok` line with the whole list (what older clients expect).
        #[serde(default)]
        stream: bool,
    },
    Info {
        name: String,
    },
    /// Name, kind, size and origin, without walking the map (cheaper than `Info`).
    Stat {
        name: String,
    },
    /// The whole forest, or the subtree that starts at `name`.
    Tree {
        #[serde(default)]
        name: Option<String>,
    },
    Diff {
        from: String,
        to: String,
    },
    Rename {
        old: String,
        new: String,
    },
    Send {
        snapshot: String,
        #[serde(default)]
        from: Option<String>,
    },
    Recv {
        name: String,
    },
    Rollback {
        snapshot: String,
        #[serde(default)]
        force: bool,
    },
    Resize {
        name: String,
        size: u64,
    },
    Delete {
        name: String,
        recursive: bool,
        #[serde(default)]
        dry_run: bool,
    },
    Check {
        verify_data: bool,
    },
    Gc,
    Df,
    Flush,
    /// A dedup pass over everything stored.
    Dedup,
    DedupStatus,
    DedupSet {
        inline: Option<bool>,
        trust_hash: Option<bool>,
    },
    ScheduleSet {
        target: String,
        schedule: Schedule,
    },
    ScheduleList,
    ScheduleRemove {
        target: String,
    },
    /// Move VDI `name` to the Parallax host whose network control listener is `to`.
    Migrate {
        name: String,
        to: String,
        /// How to prove who this host is to `to` (key paths absolute).
        #[serde(default)]
        tls: PeerTls,
        #[serde(default)]
        delete_snapshots: bool,
    },
    /// (Between hosts.) The stream that follows is a migration's bulk copy of `name`
    /// (`migration` absent) or its final delta.
    MigrateIn {
        name: String,
        #[serde(default)]
        migration: Option<u64>,
    },
    /// (Between hosts.) End migration `migration` of `name` unless it committed.
    MigrateAbort {
        name: String,
        migration: u64,
        #[serde(default)]
        final_snapshot: Option<(String, u64)>,
    },
}

/// The credentials a host presents to another's network control listener, as `nbds://` URIs
/// give them (`tls-psk-file` with `tls-username`, or `tls-certificates`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PeerTls {
    pub psk_file: Option<std::path::PathBuf>,
    pub username: Option<String>,
    pub certificates: Option<std::path::PathBuf>,
}

/// How the daemon's log names a request: the command a user would type, not Rust's debug form.
impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::Hello => write!(f, "hello"),
            Request::Create { name, size } => write!(f, "vdi create {name} --size {size}"),
            Request::CreateBacked { name, size, uri } => {
                write!(f, "vdi create {name} --backing {uri}")?;
                size.map_or(Ok(()), |s| write!(f, " --size {s}"))
            }
            Request::Hydrate { name } => write!(f, "vdi hydrate {name}"),
            Request::Import { name, size, source } => {
                write!(f, "vdi import {name}")?;
                if let Some(s) = source {
                    write!(f, " {s}")?;
                }
                size.map_or(Ok(()), |s| write!(f, " --size {s}"))
            }
            Request::Export { name, stream } => {
                write!(f, "vdi export {name}{}", if *stream { " -" } else { "" })
            }
            Request::Snapshot { vdi, snap } => write!(f, "vdi snapshot {vdi}@{snap}"),
            Request::Fork { src, new } => write!(f, "vdi fork {src} {new}"),
            Request::List {
                prefix,
                origin,
                kind,
                usage,
                ..
            } => {
                write!(f, "vdi list")?;
                if *usage {
                    write!(f, " -o used,unique")?;
                }
                if let Some(p) = prefix {
                    write!(f, " --prefix {p}")?;
                }
                if let Some(o) = origin {
                    write!(f, " --origin {o}")?;
                }
                match kind {
                    Some(Kind::Vdi) => write!(f, " --type vdi"),
                    Some(Kind::Snapshot) => write!(f, " --type snapshot"),
                    None => Ok(()),
                }
            }
            Request::Info { name } => write!(f, "vdi info {name}"),
            Request::Stat { name } => write!(f, "vdi stat {name}"),
            Request::Tree { name } => match name {
                Some(n) => write!(f, "vdi tree {n}"),
                None => write!(f, "vdi tree"),
            },
            Request::Diff { from, to } => write!(f, "vdi diff {from} {to}"),
            Request::Rename { old, new } => write!(f, "vdi rename {old} {new}"),
            Request::Send { snapshot, from } => match from {
                Some(b) => write!(f, "vdi send {snapshot} --from {b}"),
                None => write!(f, "vdi send {snapshot}"),
            },
            Request::Recv { name } => write!(f, "vdi recv {name}"),
            Request::Rollback { snapshot, force } => {
                write!(
                    f,
                    "vdi rollback {snapshot}{}",
                    if *force { " --force" } else { "" }
                )
            }
            Request::Resize { name, size } => write!(f, "vdi resize {name} {size}"),
            Request::Delete {
                name,
                recursive,
                dry_run,
            } => write!(
                f,
                "vdi delete {name}{}{}",
                if *recursive { " --recursive" } else { "" },
                if *dry_run { " --dry-run" } else { "" }
            ),
            Request::Check { verify_data } => write!(
                f,
                "check{}",
                if *verify_data { "" } else { " --metadata-only" }
            ),
            Request::Gc => write!(f, "gc"),
            Request::Dedup => write!(f, "dedup"),
            Request::DedupStatus => write!(f, "dedup status"),
            Request::DedupSet { inline, trust_hash } => {
                let onoff = |b: bool| if b { "on" } else { "off" };
                write!(f, "dedup set")?;
                if let Some(i) = inline {
                    write!(f, " --inline {}", onoff(*i))?;
                }
                if let Some(t) = trust_hash {
                    write!(f, " --trust-hash {}", onoff(*t))?;
                }
                Ok(())
            }
            Request::Df => write!(f, "df"),
            Request::Flush => write!(f, "flush"),
            Request::ScheduleSet { target, schedule } => write!(
                f,
                "schedule set {target} --every {} --keep {}",
                policy::format_duration(schedule.every_secs),
                policy::format_keep(&schedule.keep)
            ),
            Request::ScheduleList => write!(f, "schedule list"),
            Request::ScheduleRemove { target } => write!(f, "schedule remove {target}"),
            Request::Migrate {
                name,
                to,
                delete_snapshots,
                ..
            } => write!(
                f,
                "vdi migrate {name} --to {to}{}",
                if *delete_snapshots {
                    " --delete-snapshots"
                } else {
                    ""
                }
            ),
            Request::MigrateIn {
                name,
                migration: None,
            } => write!(f, "migrate-in {name} (bulk copy)"),
            Request::MigrateIn {
                name,
                migration: Some(m),
            } => write!(f, "migrate-in {name} (final delta of {m:x})"),
            Request::MigrateAbort {
                name, migration, ..
            } => write!(f, "migrate-abort {name} ({migration:x})"),
        }
    }
}

/// A line the daemon sends back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reply {
    Progress {
        done: u64,
        total: u64,
    },
    /// One entry of a streamed answer.
    Item(serde_json::Value),
    Ok(serde_json::Value),
    Error {
        kind: String,
        message: String,
    },
}

/// What `hello` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub store: String,
    pub pid: u32,
    pub version: String,
}

/// Longest request line accepted.
const MAX_LINE: usize = 64 << 10;
/// Control connections served at once; more are told the daemon is busy.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send its request line.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads the first line of a connection one byte at a time, so nothing after the newline is
/// consumed (a ring attach hands the rest of the stream to the blkif code), collecting any
/// descriptors sent with it.
pub fn read_request_line(stream: &UnixStream) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let (n, mut got) = recv_with_fds(stream, &mut byte)?;
        fds.append(&mut got);
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        if byte[0] == b'\n' {
            return Ok((line, fds));
        }
        line.push(byte[0]);
        if line.len() > MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request line too long",
            ));
        }
    }
}

/// Where a connection's answer lines go: a Unix socket, or a TLS session (`control_net`).
pub(super) trait Lines {
    fn put(&self, bytes: &[u8]) -> io::Result<()>;
}

impl Lines for UnixStream {
    fn put(&self, bytes: &[u8]) -> io::Result<()> {
        let mut s = self;
        s.write_all(bytes)
    }
}

impl<W: Write> Lines for std::cell::RefCell<W> {
    fn put(&self, bytes: &[u8]) -> io::Result<()> {
        let mut w = self.borrow_mut();
        w.write_all(bytes)?;
        w.flush()
    }
}

pub(super) fn send(out: &dyn Lines, reply: &Reply) -> io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(io::Error::other)?;
    line.push(b'\n');
    out.put(&line)
}

/// Checks that the peer is root or runs as our user.
fn peer_allowed(stream: &UnixStream) -> bool {
    // SAFETY: ucred is plain data; getsockopt fills at most `len` bytes into it.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the fd is a live socket owned by `stream`; the pointers are valid for `len`.
    let r = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(stream),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    // SAFETY: getuid has no preconditions.
    let me = unsafe { libc::getuid() };
    r == 0 && (cred.uid == 0 || cred.uid == me)
}

/// What the control server needs from the daemon.
pub struct ControlContext {
    pub store: Arc<Store>,
    pub store_path: String,
    /// Handles `ring-attach` connections (the blkif local attach), if rings are enabled.
    #[allow(clippy::type_complexity)]
    pub ring_attach: Option<Arc<dyn Fn(serde_json::Value, UnixStream) + Send + Sync>>,
    /// How long a client may take to send its request line ([`REQUEST_TIMEOUT`]).
    pub request_timeout: std::time::Duration,
    /// Told when the schedules change, so that a new one starts at its next tick.
    pub scheduler: Option<Signal>,
    /// Told when a backed VDI is made, when the daemon hydrates in the background.
    pub hydrator: Option<Signal>,
    /// VDIs migrating to this host.
    pub arrivals: super::migrate::Arrivals,
}

/// Accepts control connections until the listener is shut down; each runs on its own thread,
/// at most [`MAX_CONNECTIONS`] at once.
pub fn serve(listener: UnixListener, ctx: Arc<ControlContext>) {
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => break,
            Err(e) => {
                warn!("control socket accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
        };
        use std::sync::atomic::Ordering;
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            let _ = send(
                &stream,
                &Reply::Error {
                    kind: "busy".into(),
                    message: format!(
                        "the daemon is serving {MAX_CONNECTIONS} control connections; try again"
                    ),
                },
            );
            continue;
        }
        let ctx = ctx.clone();
        let slot = Slot(Some(active.clone()));
        let spawned = std::thread::Builder::new()
            .name("parallax-control".into())
            .spawn(move || {
                if let Err(e) = handle(stream, &ctx, slot) {
                    debug!("control connection: {e}");
                }
            });
        if let Err(e) = spawned {
            warn!("cannot start a control thread: {e}");
        }
    }
}

/// A counted place among the [`MAX_CONNECTIONS`]; given back when dropped or released.
struct Slot(Option<Arc<std::sync::atomic::AtomicUsize>>);

impl Slot {
    fn release(&mut self) {
        if let Some(a) = self.0.take() {
            a.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.release();
    }
}

fn handle(stream: UnixStream, ctx: &ControlContext, mut slot: Slot) -> io::Result<()> {
    if !peer_allowed(&stream) {
        warn!("control connection from another user refused");
        return send(
            &stream,
            &Reply::Error {
                kind: "denied".into(),
                message: "permission denied".into(),
            },
        );
    }
    // A client that never finishes its request line does not keep a thread forever.
    stream.set_read_timeout(Some(ctx.request_timeout))?;
    let (line, fds) = read_request_line(&stream)?;
    stream.set_read_timeout(None)?;
    let value: serde_json::Value = match serde_json::from_slice(&line) {
        Ok(v) => v,
        Err(e) => {
            return send(
                &stream,
                &Reply::Error {
                    kind: "invalid".into(),
                    message: format!("bad request: {e}"),
                },
            )
        }
    };
    if value.get("op").and_then(|o| o.as_str()) == Some(crate::blkif::local::ATTACH_OP) {
        return match &ctx.ring_attach {
            Some(attach) => {
                // An attached ring keeps its connection for as long as it lives; it is not
                // one of the short control requests the cap is for.
                slot.release();
                attach(value, stream);
                Ok(())
            }
            None => send(
                &stream,
                &Reply::Error {
                    kind: "unsupported".into(),
                    message: "this daemon serves no rings".into(),
                },
            ),
        };
    }
    let req: Request = match serde_json::from_value(value) {
        Ok(r) => r,
        Err(e) => {
            return send(
                &stream,
                &Reply::Error {
                    kind: "invalid".into(),
                    message: format!("bad request: {e}"),
                },
            )
        }
    };
    let mut input = &stream;
    answer(&req, fds.into_iter().next(), Some(&mut input), ctx, &stream)
}

/// Runs `req` and sends its answer: what every transport does once it has a request.
/// `input` is the rest of the connection, for requests followed by a stream.
pub(super) fn answer(
    req: &Request,
    fd: Option<OwnedFd>,
    input: Option<&mut dyn io::Read>,
    ctx: &ControlContext,
    out: &dyn Lines,
) -> io::Result<()> {
    info!("control: {req}");
    // A panic here is a bug; it must not leave the client without an answer, nor the store
    // taking writes on in-memory state the panic may have left half changed.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        execute(req, fd, input, ctx, out)
    }));
    let reply = match outcome {
        Ok(Ok(v)) => Reply::Ok(v),
        Ok(Err(e)) => Reply::Error {
            kind: e.kind().into(),
            message: e.to_string(),
        },
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            error!(panic = %what, "control: {req} panicked (a bug)");
            ctx.store
                .poison(&format_args!("a control request panicked: {what}"));
            Reply::Error {
                kind: "internal".into(),
                message: format!(
                    "internal error (a bug, please report it): {what}; the store refuses writes until the daemon is restarted"
                ),
            }
        }
    };
    if let Reply::Error { message, .. } = &reply {
        info!("control: {req} failed: {message}");
    }
    send(out, &reply)
}

/// Writes the `item` lines of a streamed answer in blocks: the first at once, then whenever
/// 32 KiB are waiting or 20 ms have passed, so a long list costs few writes and a slow one
/// still shows its entries as they come.
struct ItemWriter<'a> {
    stream: &'a dyn Lines,
    buf: Vec<u8>,
    sent: Option<std::time::Instant>,
}

impl<'a> ItemWriter<'a> {
    fn new(stream: &'a dyn Lines) -> Self {
        ItemWriter {
            stream,
            buf: Vec::new(),
            sent: None,
        }
    }

    fn push(&mut self, v: serde_json::Value) -> Result<(), StoreError> {
        serde_json::to_writer(&mut self.buf, &Reply::Item(v))
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        self.buf.push(b'\n');
        let due = self
            .sent
            .is_none_or(|t| t.elapsed() >= std::time::Duration::from_millis(20));
        if due || self.buf.len() >= 32 << 10 {
            self.finish()?;
        }
        Ok(())
    }

    /// Sends what is waiting. A client that went away ends the listing.
    fn finish(&mut self) -> Result<(), StoreError> {
        self.stream.put(&self.buf).map_err(|e| {
            StoreError::Io(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("the client went away ({e})"),
            ))
        })?;
        self.buf.clear();
        self.sent = Some(std::time::Instant::now());
        Ok(())
    }
}

fn to_value<T: Serialize>(v: T) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(v).map_err(|e| StoreError::Invalid(e.to_string()))
}

fn execute(
    req: &Request,
    fd: Option<OwnedFd>,
    input: Option<&mut dyn io::Read>,
    ctx: &ControlContext,
    stream: &dyn Lines,
) -> Result<serde_json::Value, StoreError> {
    let s = &ctx.store;
    let mut last_pct = u64::MAX;
    // At most ~100 progress lines per operation, and always the last. A client that went
    // away stops a transfer (which then leaves nothing behind).
    let mut progress = |done: u64, total: u64| -> Result<(), StoreError> {
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        if pct != last_pct || done == total {
            last_pct = pct;
            send(stream, &Reply::Progress { done, total }).map_err(|e| {
                StoreError::Io(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("the client went away ({e})"),
                ))
            })?;
        }
        Ok(())
    };
    let need_file = |fd: Option<OwnedFd>| {
        fd.map(File::from)
            .ok_or_else(|| StoreError::Invalid("this request needs a file descriptor".into()))
    };
    match req {
        Request::Hello => to_value(Hello {
            store: ctx.store_path.clone(),
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
        }),
        Request::Create { name, size } => to_value(s.create_vdi(name, *size)?),
        Request::CreateBacked { name, size, uri } => {
            let size = s.create_backed(name, *size, uri)?;
            if let Some(h) = &ctx.hydrator {
                h.wake();
            }
            to_value(size)
        }
        Request::Hydrate { name } => to_value(s.hydrate(name, &mut progress)?),
        Request::Import {
            name,
            size,
            source: Some(uri),
        } => to_value(transfer::import_nbd(s, name, uri, *size, &mut progress)?),
        Request::Import {
            name,
            size,
            source: None,
        } => match (fd, input) {
            (Some(fd), _) => to_value(transfer::import(
                s,
                name,
                &File::from(fd),
                *size,
                &mut progress,
            )?),
            // From another host: the image follows the request line, `size` bytes at most.
            (None, Some(input)) => {
                let size = size.ok_or_else(|| {
                    StoreError::Invalid("an image sent after the request needs its size".into())
                })?;
                to_value(transfer::import_stream(
                    s,
                    name,
                    input,
                    size,
                    &mut progress,
                )?)
            }
            (None, None) => Err(StoreError::Invalid(
                "this request needs a file descriptor".into(),
            )),
        },
        Request::Export {
            name,
            stream: as_stream,
        } => {
            let mut f = need_file(fd)?;
            let sink = if *as_stream {
                transfer::Sink::Stream(&mut f)
            } else {
                transfer::Sink::File(&f)
            };
            let n = transfer::export(s, name, sink, &mut progress)?;
            to_value(n)
        }
        Request::Snapshot { vdi, snap } => to_value(s.snapshot(vdi, snap)?),
        Request::Fork { src, new } => to_value(s.fork(src, new)?),
        Request::List {
            prefix,
            origin,
            kind,
            usage,
            stream: streamed,
        } => {
            let filter = ListFilter {
                prefix: prefix.clone(),
                origin: origin.clone(),
                kind: *kind,
                usage: *usage,
            };
            if !*streamed {
                return to_value(s.list_filtered(&filter)?);
            }
            let mut out = ItemWriter::new(stream);
            s.list_each(&filter, &mut |v| out.push(to_value(v)?))?;
            out.finish()?;
            Ok(serde_json::Value::Null)
        }
        Request::Info { name } => to_value(s.info(name)?),
        Request::Stat { name } => to_value(s.stat(name)?),
        Request::Tree { name: None } => to_value(s.tree()?),
        Request::Tree { name: Some(n) } => to_value(vec![s.subtree(n)?]),
        Request::Diff { from, to } => to_value(s.diff(from, to)?),
        Request::Rename { old, new } => to_value(s.rename(old, new)?),
        Request::Send { snapshot, from } => {
            let mut f = need_file(fd)?;
            to_value(stream::send(
                s,
                snapshot,
                from.as_deref(),
                &mut f,
                &mut progress,
            )?)
        }
        Request::Recv { name } => {
            let mut f = need_file(fd)?;
            to_value(stream::recv(s, name, &mut f, &mut progress)?)
        }
        Request::Rollback { snapshot, force } => {
            let r = s.rollback(snapshot, *force)?;
            if r.detached > 0 {
                warn!(
                    "{} rolled back to {snapshot} with --force: {} open handle(s) detached; \
                     their clients get I/O errors until they reconnect",
                    r.vdi, r.detached
                );
            }
            to_value(r)
        }
        Request::Resize { name, size } => to_value(s.resize(name, *size)?),
        Request::Delete {
            name,
            recursive,
            dry_run: true,
        } => to_value(s.delete_dry_run(name, *recursive)?),
        Request::Delete {
            name, recursive, ..
        } => {
            let r = s.delete(name, *recursive)?;
            s.gc(&mut |_| {})?;
            to_value(r)
        }
        Request::Check { verify_data } => {
            let r = s.check(*verify_data, &mut |p| {
                let _ = progress(p.blocks_visited, p.blocks_total);
            })?;
            to_value(r)
        }
        Request::Gc => to_value(s.gc(&mut |left| {
            let _ = progress(0, left);
        })?),
        Request::Df => to_value(s.df()?),
        Request::Dedup => to_value(s.dedup_pass(&mut |p| {
            let _ = progress(p.trees_done, p.trees_total);
        })?),
        Request::DedupStatus => to_value(s.dedup_status()),
        Request::DedupSet { inline, trust_hash } => {
            s.set_dedup(*inline, *trust_hash)?;
            to_value(s.dedup_status())
        }
        Request::Flush => to_value(s.flush()?),
        Request::ScheduleSet { target, schedule } => {
            s.set_schedule(target, schedule)?;
            ctx.wake_scheduler();
            to_value(())
        }
        Request::ScheduleList => to_value(schedule::status(s)?),
        Request::ScheduleRemove { target } => {
            s.remove_schedule(target)?;
            ctx.wake_scheduler();
            to_value(())
        }
        Request::Migrate {
            name,
            to,
            tls,
            delete_snapshots,
        } => {
            let mut dest = super::control_net::NetClient::new(to, tls)?;
            let opts = super::migrate::MigrateOptions {
                delete_snapshots: *delete_snapshots,
            };
            to_value(super::migrate::migrate(
                s,
                name,
                &mut dest,
                &opts,
                &mut progress,
            )?)
        }
        Request::MigrateIn { name, migration } => {
            let input = input.ok_or_else(|| {
                StoreError::Invalid("this request needs the stream after it".into())
            })?;
            to_value(match migration {
                None => ctx.arrivals.receive_full(s, name, input)?,
                Some(m) => ctx.arrivals.receive_final(s, name, *m, input)?,
            })
        }
        Request::MigrateAbort {
            name,
            migration,
            final_snapshot,
        } => to_value(ctx.arrivals.abort(
            s,
            name,
            *migration,
            final_snapshot.as_ref().map(|(n, g)| (n.as_str(), *g)),
        )?),
    }
}

impl ControlContext {
    fn wake_scheduler(&self) {
        if let Some(w) = &self.scheduler {
            w.wake();
        }
    }
}

/// A connection to a running daemon's control socket.
pub struct ControlClient {
    stream: UnixStream,
}

/// An error from the daemon, with its kind (see `StoreError::kind`).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RemoteError {
    pub kind: String,
    pub message: String,
}

impl ControlClient {
    pub fn connect(addr: &super::addr::ControlAddr) -> io::Result<ControlClient> {
        Ok(ControlClient {
            stream: addr.connect()?,
        })
    }

    /// Sends `req` (with `file` attached if given) and waits for the result, passing progress
    /// lines to `progress`.
    pub fn call(
        self,
        req: &Request,
        file: Option<&File>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Result<serde_json::Value, RemoteError>, io::Error> {
        self.call_each(req, file, progress, &mut |_| {
            Err(io::Error::other(
                "the daemon streamed an answer to a request that has none",
            ))
        })
    }

    /// [`ControlClient::call`] for a request whose answer is streamed: each `item` line goes to
    /// `item` as it arrives (an error from it ends the call).
    pub fn call_each(
        self,
        req: &Request,
        file: Option<&File>,
        progress: &mut dyn FnMut(u64, u64),
        item: &mut dyn FnMut(serde_json::Value) -> io::Result<()>,
    ) -> Result<Result<serde_json::Value, RemoteError>, io::Error> {
        let mut line = serde_json::to_vec(req).map_err(io::Error::other)?;
        line.push(b'\n');
        let sent = match file {
            Some(f) => send_with_fds(&self.stream, &line, &[f.as_fd()]),
            None => (&self.stream).write_all(&line),
        };
        match sent {
            // A busy daemon answers at once and closes without reading the request: the
            // answer is still there to read.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
            other => other?,
        }
        let mut reader = BufReader::new(&self.stream);
        let mut buf = String::new();
        loop {
            buf.clear();
            if reader.read_line(&mut buf)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the daemon closed the control connection without answering",
                ));
            }
            match serde_json::from_str::<Reply>(&buf).map_err(io::Error::other)? {
                Reply::Progress { done, total } => progress(done, total),
                Reply::Item(v) => item(v)?,
                Reply::Ok(v) => return Ok(Ok(v)),
                Reply::Error { kind, message } => return Ok(Err(RemoteError { kind, message })),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::device::MemDevice;

    fn hello(path: &std::path::Path) -> Reply {
        let mut s = UnixStream::connect(path).unwrap();
        // A busy daemon may have answered and closed before the request is written.
        if let Err(e) = s.write_all(b"{\"op\":\"hello\"}\n") {
            assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
        }
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    #[test]
    fn silent_clients_are_capped_and_timed_out() {
        let dev = Arc::new(MemDevice::new(32 << 20));
        Store::format(&*dev, 32 << 20).unwrap();
        let store = Store::open_device(dev, Default::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl");
        let listener = UnixListener::bind(&path).unwrap();
        let ctx = Arc::new(ControlContext {
            store,
            store_path: "mem".into(),
            ring_attach: None,
            request_timeout: std::time::Duration::from_millis(300),
            scheduler: None,
            hydrator: None,
            arrivals: Default::default(),
        });
        std::thread::spawn(move || serve(listener, ctx));
        assert!(matches!(hello(&path), Reply::Ok(_)));
        let silent: Vec<UnixStream> = (0..MAX_CONNECTIONS)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(100));
        match hello(&path) {
            Reply::Error { kind, .. } => assert_eq!(kind, "busy"),
            other => panic!("expected busy, got {other:?}"),
        }
        // The CLI's client reports "busy" too, however its write raced the daemon's close.
        for _ in 0..20 {
            let addr = super::super::addr::ControlAddr::Path(path.clone());
            let client = ControlClient::connect(&addr).unwrap();
            match client.call(&Request::Hello, None, &mut |_, _| {}) {
                Ok(Err(e)) => assert_eq!(e.kind, "busy"),
                other => panic!("expected busy, got {other:?}"),
            }
        }
        // The silent ones time out and free their places.
        std::thread::sleep(std::time::Duration::from_millis(600));
        assert!(matches!(hello(&path), Reply::Ok(_)));
        drop(silent);
    }
}
