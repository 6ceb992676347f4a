//! A small blocking xenstore client over xenstored's unix socket, for what `xenstore-rs` 0.8
//! cannot do: permissions (`SET_PERMS`/`GET_PERMS`), transactions and `MKDIR`. Tests use it to
//! play the toolstack and the guest against a real xenstored; it also implements
//! [`XenStore`], so the backend can run on it.
//!
//! One request at a time: a request is written, then messages are read until its answer;
//! watch events that arrive meanwhile are queued for [`XsConn::next_event`].

use std::{
    collections::VecDeque,
    fs::File,
    io::{self, Read, Write},
    os::{
        fd::{AsFd, BorrowedFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;

use super::{
    store::{Waker, WatchEvent, XenStore},
    wire::{self, Header, MsgType, Perm, XsError, HEADER_LEN},
};
use crate::blkif::event::{poll_readable, EventFd};

/// The socket clients use: `$XENSTORED_PATH`, else `/run/xenstored/socket`.
pub fn default_socket() -> PathBuf {
    match std::env::var_os("XENSTORED_PATH") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from("/run/xenstored/socket"),
    }
}

/// The xenbus device of a domain without a local xenstored (a driver domain).
pub const XENBUS_DEVICE: &str = "/dev/xen/xenbus";

/// Where the messages go: xenstored's socket, or the xenbus device (same framing).
enum Chan {
    Unix(UnixStream),
    Dev(File),
}

impl Read for Chan {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Chan::Unix(s) => s.read(buf),
            Chan::Dev(f) => f.read(buf),
        }
    }
}

impl Write for Chan {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Chan::Unix(s) => s.write(buf),
            Chan::Dev(f) => f.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for Chan {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Chan::Unix(s) => s.as_fd(),
            Chan::Dev(f) => f.as_fd(),
        }
    }
}

struct Inner {
    stream: Chan,
    next_req: u32,
    events: VecDeque<WatchEvent>,
}

/// A blocking connection to xenstored.
pub struct XsConn {
    inner: Mutex<Inner>,
    wake: Arc<EventFd>,
}

/// A transaction on an [`XsConn`]: operations see a snapshot; [`Transaction::commit`] applies
/// them atomically or reports a conflict.
pub struct Transaction<'a> {
    conn: &'a XsConn,
    id: u32,
    done: bool,
}

impl XsConn {
    pub fn connect(path: &Path) -> Result<XsConn, XsError> {
        let stream = UnixStream::connect(path).map_err(|e| {
            XsError::Io(std::io::Error::new(
                e.kind(),
                format!("connecting to xenstored at {}: {e}", path.display()),
            ))
        })?;
        Self::over(Chan::Unix(stream))
    }

    fn over(stream: Chan) -> Result<XsConn, XsError> {
        Ok(XsConn {
            inner: Mutex::new(Inner {
                stream,
                next_req: 1,
                events: VecDeque::new(),
            }),
            wake: Arc::new(EventFd::new()?),
        })
    }

    /// Connects the way Xen's tools do: [`default_socket`], else the xenbus device.
    pub fn connect_default() -> Result<XsConn, XsError> {
        match Self::connect(&default_socket()) {
            Ok(c) => Ok(c),
            Err(e) => match File::options().read(true).write(true).open(XENBUS_DEVICE) {
                Ok(f) => Self::over(Chan::Dev(f)),
                Err(_) => Err(e),
            },
        }
    }

    fn read_message(stream: &mut Chan) -> Result<(Header, Vec<u8>), XsError> {
        let mut h = [0u8; HEADER_LEN];
        stream.read_exact(&mut h)?;
        let h = Header::decode(&h)?;
        let mut payload = vec![0u8; h.len as usize];
        stream.read_exact(&mut payload)?;
        Ok((h, payload))
    }

    fn queue_event(events: &mut VecDeque<WatchEvent>, payload: &[u8]) {
        let mut s = wire::strings(payload).into_iter();
        if let (Some(path), Some(token)) = (s.next(), s.next()) {
            events.push_back(WatchEvent { path, token });
        }
    }

    fn request(&self, ty: MsgType, tx: u32, payload: &[u8]) -> Result<Vec<u8>, XsError> {
        let mut inner = self.inner.lock();
        let req = inner.next_req;
        inner.next_req = inner.next_req.wrapping_add(1).max(1);
        let msg = wire::encode(ty, req, tx, payload)?;
        inner.stream.write_all(&msg)?;
        loop {
            let (h, payload) = Self::read_message(&mut inner.stream)?;
            match MsgType::from_u32(h.ty) {
                Some(MsgType::WatchEvent) => Self::queue_event(&mut inner.events, &payload),
                _ if h.req_id != req => {
                    return Err(XsError::Protocol(format!(
                        "answer to request {} while waiting for {req}",
                        h.req_id
                    )))
                }
                Some(MsgType::Error) => return Err(XsError::from_errno(&payload)),
                Some(t) if t == ty => return Ok(payload),
                _ => {
                    return Err(XsError::Protocol(format!(
                        "answer of type {} to a {ty:?}",
                        h.ty
                    )))
                }
            }
        }
    }

    fn read_tx(&self, tx: u32, path: &str) -> Result<Option<String>, XsError> {
        match self.request(MsgType::Read, tx, &wire::join(&[path], true)) {
            Ok(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
            Err(XsError::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write_tx(&self, tx: u32, path: &str, value: &str) -> Result<(), XsError> {
        self.request(MsgType::Write, tx, &wire::join(&[path, value], false))?;
        Ok(())
    }

    fn directory_tx(&self, tx: u32, path: &str) -> Result<Vec<String>, XsError> {
        match self.request(MsgType::Directory, tx, &wire::join(&[path], true)) {
            Ok(v) => Ok(wire::strings(&v)),
            Err(XsError::NotFound) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    fn rm_tx(&self, tx: u32, path: &str) -> Result<(), XsError> {
        match self.request(MsgType::Rm, tx, &wire::join(&[path], true)) {
            Ok(_) | Err(XsError::NotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn mkdir_tx(&self, tx: u32, path: &str) -> Result<(), XsError> {
        self.request(MsgType::Mkdir, tx, &wire::join(&[path], true))?;
        Ok(())
    }

    fn set_perms_tx(&self, tx: u32, path: &str, perms: &[Perm]) -> Result<(), XsError> {
        if perms.is_empty() {
            return Err(XsError::Protocol("a node needs at least an owner".into()));
        }
        self.request(MsgType::SetPerms, tx, &wire::set_perms_payload(path, perms))?;
        Ok(())
    }

    pub fn mkdir(&self, path: &str) -> Result<(), XsError> {
        self.mkdir_tx(0, path)
    }

    /// Sets a node's permissions: `perms[0]` is the owner (and what others may do).
    pub fn set_perms(&self, path: &str, perms: &[Perm]) -> Result<(), XsError> {
        self.set_perms_tx(0, path, perms)
    }

    pub fn get_perms(&self, path: &str) -> Result<Vec<Perm>, XsError> {
        let v = self.request(MsgType::GetPerms, 0, &wire::join(&[path], true))?;
        wire::strings(&v).iter().map(|s| s.parse()).collect()
    }

    /// Starts a transaction.
    pub fn transaction(&self) -> Result<Transaction<'_>, XsError> {
        let v = self.request(MsgType::TransactionStart, 0, b"\0")?;
        let s = wire::strings(&v);
        let id = s
            .first()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| XsError::Protocol(format!("transaction id {s:?}")))?;
        Ok(Transaction {
            conn: self,
            id,
            done: false,
        })
    }

    /// Runs `f` in a transaction, retrying on conflicts (at most 100 times).
    pub fn in_transaction<T>(
        &self,
        mut f: impl FnMut(&Transaction<'_>) -> Result<T, XsError>,
    ) -> Result<T, XsError> {
        for _ in 0..100 {
            let t = self.transaction()?;
            let v = f(&t)?;
            if t.commit()? {
                return Ok(v);
            }
        }
        Err(XsError::Again)
    }
}

impl Transaction<'_> {
    pub fn read(&self, path: &str) -> Result<Option<String>, XsError> {
        self.conn.read_tx(self.id, path)
    }
    pub fn write(&self, path: &str, value: &str) -> Result<(), XsError> {
        self.conn.write_tx(self.id, path, value)
    }
    pub fn directory(&self, path: &str) -> Result<Vec<String>, XsError> {
        self.conn.directory_tx(self.id, path)
    }
    pub fn rm(&self, path: &str) -> Result<(), XsError> {
        self.conn.rm_tx(self.id, path)
    }
    pub fn mkdir(&self, path: &str) -> Result<(), XsError> {
        self.conn.mkdir_tx(self.id, path)
    }
    pub fn set_perms(&self, path: &str, perms: &[Perm]) -> Result<(), XsError> {
        self.conn.set_perms_tx(self.id, path, perms)
    }

    /// Commits; `Ok(false)` if another change conflicted (nothing was applied: retry).
    pub fn commit(mut self) -> Result<bool, XsError> {
        self.done = true;
        match self
            .conn
            .request(MsgType::TransactionEnd, self.id, &wire::join(&["T"], true))
        {
            Ok(_) => Ok(true),
            Err(XsError::Again) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self
                .conn
                .request(MsgType::TransactionEnd, self.id, &wire::join(&["F"], true));
        }
    }
}

impl XenStore for XsConn {
    fn write_if_exists(&self, dir: &str, nodes: &[(String, String)]) -> Result<bool, XsError> {
        self.in_transaction(|t| {
            if t.read(dir)?.is_none() {
                return Ok(false);
            }
            for (p, v) in nodes {
                t.write(p, v)?;
            }
            Ok(true)
        })
    }

    fn read(&self, path: &str) -> Result<Option<String>, XsError> {
        self.read_tx(0, path)
    }

    fn write(&self, path: &str, value: &str) -> Result<(), XsError> {
        self.write_tx(0, path, value)
    }

    fn directory(&self, path: &str) -> Result<Vec<String>, XsError> {
        self.directory_tx(0, path)
    }

    fn rm(&self, path: &str) -> Result<(), XsError> {
        self.rm_tx(0, path)
    }

    fn watch(&self, path: &str, token: &str) -> Result<(), XsError> {
        self.request(MsgType::Watch, 0, &wire::join(&[path, token], true))?;
        Ok(())
    }

    fn unwatch(&self, path: &str, token: &str) -> Result<(), XsError> {
        self.request(MsgType::Unwatch, 0, &wire::join(&[path, token], true))?;
        Ok(())
    }

    fn next_event(&self, timeout: Option<Duration>) -> Result<Option<WatchEvent>, XsError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let mut inner = self.inner.lock();
            if let Some(e) = inner.events.pop_front() {
                return Ok(Some(e));
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let ready = poll_readable(&[inner.stream.as_fd(), self.wake.as_fd()], left)?;
            if ready[1] {
                self.wake.drain()?;
                return Ok(None);
            }
            if ready[0] {
                let (h, payload) = Self::read_message(&mut inner.stream)?;
                if MsgType::from_u32(h.ty) == Some(MsgType::WatchEvent) {
                    Self::queue_event(&mut inner.events, &payload);
                } else {
                    return Err(XsError::Protocol(format!(
                        "unexpected message of type {} between requests",
                        h.ty
                    )));
                }
            } else if left.is_some_and(|l| l.is_zero()) {
                return Ok(None);
            }
        }
    }

    fn waker(&self) -> Waker {
        let wake = self.wake.clone();
        Arc::new(move || {
            let _ = wake.signal();
        })
    }
}
