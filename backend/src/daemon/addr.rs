//! Where a running daemon's control socket lives, so that the CLI and `frontend-shim` can find
//! the daemon that holds a given store.
//!
//! The default is a Linux *abstract* unix socket named after the store's canonical path:
//! `\0parallax-ctl/<first 32 hex digits of blake3(canonical path)>`. Abstract sockets vanish with
//! the process (nothing stale is left after `kill -9`), need no writable directory, and can be
//! computed by anyone who knows the store path. The daemon checks each peer's uid
//! (SO_PEERCRED), since abstract sockets carry no file permissions. A filesystem path can be
//! configured instead (`control_socket` in the config, `PARALLAX_CONTROL` for clients).
//!
//! The control protocol: the client sends one JSON object on a line (`{"op": ...}`); the daemon
//! answers with JSON lines. Some operations (ring attach) take over the connection after that.

use std::{
    io,
    os::{linux::net::SocketAddrExt, unix::net::SocketAddr, unix::net::UnixStream},
    path::{Path, PathBuf},
};

/// Environment variable that names an explicit control socket path for clients.
pub const CONTROL_ENV: &str = "PARALLAX_CONTROL";

/// Where a control socket lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlAddr {
    /// An abstract socket name (without the leading NUL).
    Abstract(Vec<u8>),
    /// A socket file.
    Path(PathBuf),
}

impl ControlAddr {
    /// The default control address of the daemon that holds the store at `store`.
    pub fn for_store(store: &Path) -> io::Result<ControlAddr> {
        // A store in RADOS is named the same from every directory: its name is its identity.
        let canon = match crate::cluster::RadosStore::parse(store) {
            Some(_) => store.to_path_buf(),
            None => std::fs::canonicalize(store)?,
        };
        let hash = blake3::hash(canon.as_os_str().as_encoded_bytes());
        let hex = hash.to_hex();
        Ok(ControlAddr::Abstract(
            format!("parallax-ctl/{}", &hex[..32]).into_bytes(),
        ))
    }

    /// The address a client should use: `PARALLAX_CONTROL` if set, else the store's default.
    pub fn for_client(store: &Path) -> io::Result<ControlAddr> {
        match std::env::var_os(CONTROL_ENV) {
            Some(p) if !p.is_empty() => Ok(ControlAddr::Path(PathBuf::from(p))),
            _ => Self::for_store(store),
        }
    }

    pub fn socket_addr(&self) -> io::Result<SocketAddr> {
        match self {
            ControlAddr::Abstract(name) => SocketAddr::from_abstract_name(name),
            ControlAddr::Path(p) => SocketAddr::from_pathname(p),
        }
    }

    /// Connects to the daemon listening here.
    pub fn connect(&self) -> io::Result<UnixStream> {
        UnixStream::connect_addr(&self.socket_addr()?)
    }
}

impl std::fmt::Display for ControlAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlAddr::Abstract(name) => write!(f, "@{}", String::from_utf8_lossy(name)),
            ControlAddr::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abstract_name_is_stable_and_per_store() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.store");
        let b = dir.path().join("b.store");
        std::fs::write(&a, b"").unwrap();
        std::fs::write(&b, b"").unwrap();
        let aa = ControlAddr::for_store(&a).unwrap();
        assert_eq!(
            aa,
            ControlAddr::for_store(&dir.path().join("./a.store")).unwrap()
        );
        assert_ne!(aa, ControlAddr::for_store(&b).unwrap());
        let listener =
            std::os::unix::net::UnixListener::bind_addr(&aa.socket_addr().unwrap()).unwrap();
        let _c = aa.connect().unwrap();
        drop(listener);
    }
}
