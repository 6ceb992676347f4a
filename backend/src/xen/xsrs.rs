//! The daemon's xenstore connection: `xenstore-rs` (`XsTokio`, the only flavour with watches)
//! on a tokio current-thread runtime owned by the xenbus thread.
//!
//! ```text
//!   xenbus thread ── block_on(read/write/...) ──► XsTokio task (requests) ──► xenstored socket
//!        │                                                                 (or /dev/xen/xenbus)
//!        ├── watch/unwatch ─────────────────────► XsTokio task (watches only) ──►   〃
//!        └── next_event: block_on(rx.recv()) ◄── one forwarding task per watch
//! ```
//!
//! The runtime only runs inside `block_on`, i.e. while the xenbus thread waits for xenstore.
//! Each watch stream is drained by its own task into one unbounded channel, because
//! `XsTokio` delivers watch events with a bounded `send().await` in the same task that
//! delivers replies: an undrained watch would otherwise stall every later request.
//! Connection: `$XENSTORED_PATH`, else `/run/xenstored/socket`, else `/dev/xen/xenbus`
//! (`XsTokio::new`). `xenstore-rs` 0.8 has no transactions, so guarded writes
//! ([`XenStore::write_if_exists`]) go over a second, blocking connection ([`XsConn`]).
//!
//! Watches have a connection of their own, on which no other request is ever in flight.
//! Through `/dev/xen/xenbus` (a storage domain) Linux handles `XS_WATCH` and `XS_UNWATCH`
//! synchronously inside `write()`, holding the open file's message lock until xenstored
//! answers; the kernel's one xenstore reader thread, meanwhile, needs that same lock to hand
//! the file the reply to any request sent on it before. With both on one file, an unwatch
//! sent while a read's reply was on its way stopped the whole domain's xenstore traffic for
//! good: no more watch events, and no `xl shutdown` (tests/xen-rig/README.md).

use std::{collections::HashMap, io, pin::Pin, sync::Arc, time::Duration};

use futures_core::Stream;
use parking_lot::Mutex;
use tokio::{runtime::Runtime, sync::mpsc, task::JoinHandle};
use xenstore_rs::{tokio::XsTokio, AsyncWatch, AsyncXs};

use super::{
    conn::XsConn,
    store::{Waker, WatchEvent, XenStore, XsError},
};

enum Msg {
    Event(WatchEvent),
    Wake,
}

/// `xenstore-rs` behind [`XenStore`].
pub struct XsRsStore {
    rt: Runtime,
    xs: XsTokio,
    /// Only watches and unwatches go over this one (see the module docs).
    watcher: XsTokio,
    tx: mpsc::UnboundedSender<Msg>,
    rx: Mutex<mpsc::UnboundedReceiver<Msg>>,
    watches: Mutex<HashMap<(String, String), JoinHandle<()>>>,
    /// For transactions.
    side: XsConn,
}

fn map_err(e: io::Error) -> XsError {
    match e.kind() {
        io::ErrorKind::NotFound => XsError::NotFound,
        io::ErrorKind::PermissionDenied => XsError::Denied,
        io::ErrorKind::WouldBlock => XsError::Again,
        // A dead connection: XsTokio reports its task's end as BrokenPipe.
        io::ErrorKind::BrokenPipe | io::ErrorKind::UnexpectedEof => XsError::Io(e),
        io::ErrorKind::InvalidData => XsError::Errno(format!("invalid data: {e}")),
        _ => XsError::Errno(e.to_string()),
    }
}

impl XsRsStore {
    /// Connects the way `xenstore-rs` does (see the module docs).
    pub fn connect() -> Result<XsRsStore, XsError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let xs = rt.block_on(XsTokio::new())?;
        let watcher = rt.block_on(XsTokio::new())?;
        let side = XsConn::connect_default()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let store = XsRsStore {
            rt,
            xs,
            watcher,
            tx,
            rx: Mutex::new(rx),
            watches: Mutex::new(HashMap::new()),
            side,
        };
        // XsTokio reports a dead connection only on use: check it now, with a read any domain
        // may make (its own `domid`; "/" is dom0's only).
        match store.read("domid") {
            Err(e) if e.is_fatal() => return Err(e),
            _ => {}
        }
        Ok(store)
    }
}

impl XenStore for XsRsStore {
    fn read(&self, path: &str) -> Result<Option<String>, XsError> {
        match self.rt.block_on(self.xs.read(path)) {
            Ok(v) => Ok(Some(v.into())),
            Err(e) => match map_err(e) {
                XsError::NotFound => Ok(None),
                e => Err(e),
            },
        }
    }

    fn write(&self, path: &str, value: &str) -> Result<(), XsError> {
        self.rt
            .block_on(self.xs.write(path, value))
            .map_err(map_err)
    }

    fn write_if_exists(&self, dir: &str, nodes: &[(String, String)]) -> Result<bool, XsError> {
        self.side.write_if_exists(dir, nodes)
    }

    fn directory(&self, path: &str) -> Result<Vec<String>, XsError> {
        match self.rt.block_on(self.xs.directory(path)) {
            Ok(v) => Ok(v.into_iter().map(String::from).collect()),
            Err(e) => match map_err(e) {
                XsError::NotFound => Ok(Vec::new()),
                e => Err(e),
            },
        }
    }

    fn rm(&self, path: &str) -> Result<(), XsError> {
        match self.rt.block_on(self.xs.rm(path)) {
            Ok(()) => Ok(()),
            Err(e) => match map_err(e) {
                XsError::NotFound => Ok(()),
                e => Err(e),
            },
        }
    }

    fn watch(&self, path: &str, token: &str) -> Result<(), XsError> {
        let stream = self
            .rt
            .block_on(self.watcher.watch(path))
            .map_err(map_err)?;
        let mut stream = Box::pin(stream);
        let tx = self.tx.clone();
        let token_owned = token.to_string();
        let task = self.rt.spawn(async move {
            while let Some(path) =
                std::future::poll_fn(|cx| Pin::new(&mut stream).as_mut().poll_next(cx)).await
            {
                let ev = WatchEvent {
                    path: path.into(),
                    token: token_owned.clone(),
                };
                if tx.send(Msg::Event(ev)).is_err() {
                    break;
                }
            }
        });
        if let Some(old) = self
            .watches
            .lock()
            .insert((path.to_string(), token.to_string()), task)
        {
            old.abort();
        }
        Ok(())
    }

    fn unwatch(&self, path: &str, token: &str) -> Result<(), XsError> {
        // Dropping the stream (with its task) unwatches upstream.
        match self
            .watches
            .lock()
            .remove(&(path.to_string(), token.to_string()))
        {
            Some(task) => {
                task.abort();
                Ok(())
            }
            None => Err(XsError::NotFound),
        }
    }

    fn next_event(&self, timeout: Option<Duration>) -> Result<Option<WatchEvent>, XsError> {
        let mut rx = self.rx.lock();
        let msg = self.rt.block_on(async {
            match timeout {
                Some(t) => tokio::time::timeout(t, rx.recv()).await.ok().flatten(),
                None => rx.recv().await,
            }
        });
        match msg {
            Some(Msg::Event(e)) => Ok(Some(e)),
            Some(Msg::Wake) | None => Ok(None),
        }
    }

    fn waker(&self) -> Waker {
        let tx = self.tx.clone();
        Arc::new(move || {
            let _ = tx.send(Msg::Wake);
        })
    }
}

impl Drop for XsRsStore {
    fn drop(&mut self) {
        for (_, t) in self.watches.lock().drain() {
            t.abort();
        }
    }
}
