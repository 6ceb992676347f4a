//! What the xenbus backend needs from xenstore, as a trait, and an in-memory xenstore for tests.
//!
//! Implementations: [`super::xsrs::XsRsStore`] (the daemon's: `xenstore-rs` with watches),
//! [`super::conn::XsConn`] (a small blocking client with permissions and transactions, for
//! tests and tools), and [`MemStore`] here.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use parking_lot::Mutex;

pub use super::wire::XsError;

/// A fired watch: the node that changed and the token the watch was set with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub path: String,
    pub token: String,
}

/// Makes a blocked [`XenStore::next_event`] return early (with `None`). Cheap to clone.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// A xenstore connection. Reads of a missing node are `Ok(None)`, listings of a missing
/// directory are empty and removing a missing node succeeds; only real failures are errors.
pub trait XenStore: Send {
    fn read(&self, path: &str) -> Result<Option<String>, XsError>;
    fn write(&self, path: &str, value: &str) -> Result<(), XsError>;
    /// Writes `nodes` (absolute path, value) atomically, and only if `dir` still exists (a
    /// transaction, as Linux's `xenbus_switch_state` does): a backend must not re-create a
    /// directory the toolstack has just removed. Returns whether it wrote.
    fn write_if_exists(&self, dir: &str, nodes: &[(String, String)]) -> Result<bool, XsError>;
    fn directory(&self, path: &str) -> Result<Vec<String>, XsError>;
    /// Removes a node and everything below it.
    fn rm(&self, path: &str) -> Result<(), XsError>;
    /// Watches `path` and everything below it. Fires once at once (as xenstored does).
    fn watch(&self, path: &str, token: &str) -> Result<(), XsError>;
    fn unwatch(&self, path: &str, token: &str) -> Result<(), XsError>;
    /// The next watch event, waiting at most `timeout` (`None`: until one comes or the
    /// [`XenStore::waker`] is called). `Ok(None)` on a timeout or a wake.
    fn next_event(&self, timeout: Option<Duration>) -> Result<Option<WatchEvent>, XsError>;
    fn waker(&self) -> Waker;
}

/// `/a/b` is `/a/b` or below `/a`? (xenstore watches fire for the node and its descendants.)
pub fn is_at_or_below(path: &str, dir: &str) -> bool {
    path == dir
        || (path.len() > dir.len()
            && path.starts_with(dir)
            && (dir.ends_with('/') || path.as_bytes()[dir.len()] == b'/'))
}

#[derive(Default)]
struct MemInner {
    nodes: BTreeMap<String, String>,
    watches: Vec<(String, String)>,
    events: VecDeque<WatchEvent>,
    /// Writes made through this store, in order (for assertions).
    log: Vec<(String, Option<String>)>,
}

impl MemInner {
    fn fire(&mut self, path: &str, removed: bool) {
        for (w, token) in &self.watches {
            if is_at_or_below(path, w) || (removed && is_at_or_below(w, path)) {
                self.events.push_back(WatchEvent {
                    path: if removed && is_at_or_below(w, path) {
                        w.clone()
                    } else {
                        path.to_string()
                    },
                    token: token.clone(),
                });
            }
        }
    }

    fn write(&mut self, path: &str, value: &str) {
        // Parents exist implicitly (xenstored creates them empty).
        let mut p = path;
        while let Some(i) = p.rfind('/') {
            p = &p[..i];
            if p.is_empty() {
                break;
            }
            self.nodes.entry(p.to_string()).or_default();
        }
        self.nodes.insert(path.to_string(), value.to_string());
        self.log.push((path.to_string(), Some(value.to_string())));
        self.fire(path, false);
    }
}

/// An in-memory xenstore: nodes, watches and an event queue, for unit tests of the backend.
/// Permissions are not modelled. Cheap to clone (clones share the store).
#[derive(Clone, Default)]
pub struct MemStore {
    inner: Arc<Mutex<MemInner>>,
}

impl MemStore {
    pub fn new() -> MemStore {
        MemStore::default()
    }

    /// Every node at or below `dir`, relative to it (`""` is `dir` itself).
    pub fn dump(&self, dir: &str) -> BTreeMap<String, String> {
        let inner = self.inner.lock();
        inner
            .nodes
            .iter()
            .filter(|(k, _)| is_at_or_below(k, dir))
            .map(|(k, v)| {
                (
                    k[dir.len()..].trim_start_matches('/').to_string(),
                    v.clone(),
                )
            })
            .collect()
    }

    /// Watch events not consumed yet.
    pub fn pending_events(&self) -> usize {
        self.inner.lock().events.len()
    }

    /// Writes (`Some`) and removals (`None`) so far, in order; clears the log.
    pub fn take_log(&self) -> Vec<(String, Option<String>)> {
        std::mem::take(&mut self.inner.lock().log)
    }

    /// Watches registered now.
    pub fn watches(&self) -> Vec<(String, String)> {
        self.inner.lock().watches.clone()
    }
}

impl XenStore for MemStore {
    fn read(&self, path: &str) -> Result<Option<String>, XsError> {
        Ok(self.inner.lock().nodes.get(path).cloned())
    }

    fn write(&self, path: &str, value: &str) -> Result<(), XsError> {
        self.inner.lock().write(path, value);
        Ok(())
    }

    fn write_if_exists(&self, dir: &str, nodes: &[(String, String)]) -> Result<bool, XsError> {
        let mut inner = self.inner.lock();
        if !inner.nodes.contains_key(dir) {
            return Ok(false);
        }
        for (p, v) in nodes {
            inner.write(p, v);
        }
        Ok(true)
    }

    fn directory(&self, path: &str) -> Result<Vec<String>, XsError> {
        let inner = self.inner.lock();
        let prefix = format!("{}/", path.trim_end_matches('/'));
        Ok(inner
            .nodes
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, _)| !k[prefix.len()..].contains('/'))
            .map(|(k, _)| k[prefix.len()..].to_string())
            .collect())
    }

    fn rm(&self, path: &str) -> Result<(), XsError> {
        let mut inner = self.inner.lock();
        let doomed: Vec<String> = inner
            .nodes
            .keys()
            .filter(|k| is_at_or_below(k, path))
            .cloned()
            .collect();
        if doomed.is_empty() {
            return Ok(());
        }
        for k in &doomed {
            inner.nodes.remove(k);
        }
        inner.log.push((path.to_string(), None));
        inner.fire(path, true);
        Ok(())
    }

    fn watch(&self, path: &str, token: &str) -> Result<(), XsError> {
        let mut inner = self.inner.lock();
        inner.watches.push((path.to_string(), token.to_string()));
        inner.events.push_back(WatchEvent {
            path: path.to_string(),
            token: token.to_string(),
        });
        Ok(())
    }

    fn unwatch(&self, path: &str, token: &str) -> Result<(), XsError> {
        let mut inner = self.inner.lock();
        let before = inner.watches.len();
        inner.watches.retain(|(p, t)| !(p == path && t == token));
        if inner.watches.len() == before {
            return Err(XsError::NotFound);
        }
        Ok(())
    }

    fn next_event(&self, _timeout: Option<Duration>) -> Result<Option<WatchEvent>, XsError> {
        // Tests drive the backend step by step: never block.
        Ok(self.inner.lock().events.pop_front())
    }

    fn waker(&self) -> Waker {
        Arc::new(|| {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_store_nodes_and_watches() {
        let s = MemStore::new();
        assert_eq!(s.read("/a/b").unwrap(), None);
        s.watch("/a", "t").unwrap();
        assert_eq!(s.next_event(None).unwrap().unwrap().path, "/a");
        s.write("/a/b/c", "1").unwrap();
        s.write("/a/b/d", "2").unwrap();
        s.write("/ab", "x").unwrap();
        assert_eq!(s.read("/a/b").unwrap().as_deref(), Some(""));
        assert_eq!(s.directory("/a/b").unwrap(), vec!["c", "d"]);
        assert_eq!(s.directory("/a").unwrap(), vec!["b"]);
        assert!(s.directory("/nope").unwrap().is_empty());
        let evs: Vec<String> = std::iter::from_fn(|| s.next_event(None).unwrap())
            .map(|e| e.path)
            .collect();
        assert_eq!(evs, vec!["/a/b/c", "/a/b/d"]);
        s.watch("/a/b/c", "deep").unwrap();
        s.next_event(None).unwrap();
        s.rm("/a/b").unwrap();
        let evs: Vec<(String, String)> = std::iter::from_fn(|| s.next_event(None).unwrap())
            .map(|e| (e.path, e.token))
            .collect();
        assert_eq!(
            evs,
            vec![
                ("/a/b".to_string(), "t".to_string()),
                ("/a/b/c".to_string(), "deep".to_string())
            ]
        );
        assert_eq!(s.read("/a/b/c").unwrap(), None);
        assert_eq!(s.dump("/a").keys().cloned().collect::<Vec<_>>(), vec![""]);
        s.unwatch("/a", "t").unwrap();
        assert!(s.unwatch("/a", "t").is_err());
    }

    #[test]
    fn below() {
        assert!(is_at_or_below("/a/b", "/a"));
        assert!(is_at_or_below("/a", "/a"));
        assert!(!is_at_or_below("/ab", "/a"));
        assert!(!is_at_or_below("/a", "/a/b"));
    }
}
