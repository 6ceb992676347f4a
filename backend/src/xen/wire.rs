//! The xenstore wire protocol (`xen/io/xs_wire.h`), as far as Parallax needs it beyond what
//! `xenstore-rs` offers: framing, errors, and the permission strings of `GET_PERMS`/`SET_PERMS`.
//! Pure: bytes in, values out.
//!
//! ```text
//!  struct xsd_sockmsg { u32 type; u32 req_id; u32 tx_id; u32 len; }   native endian, then
//!  `len` (<= 4096) bytes of payload: NUL-separated strings
//!    READ "path\0"               -> "value"          (no NUL)
//!    WRITE "path\0value"         -> "OK\0"
//!    DIRECTORY "path\0"          -> "a\0b\0"
//!    SET_PERMS "path\0n0\0r5\0"  -> "OK\0"           (first entry: owner + everyone's access)
//!    WATCH "path\0token\0"       -> "OK\0", later WATCH_EVENT "path\0token\0" (req_id 0)
//!    ERROR                       <- "EACCES\0"
//! ```

use std::{fmt, io, str::FromStr};

/// Bytes of a message header.
pub const HEADER_LEN: usize = 16;
/// Largest payload either side may send.
pub const PAYLOAD_MAX: usize = 4096;

/// Message types used here (`enum xsd_sockmsg_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum MsgType {
    Directory = 1,
    Read = 2,
    GetPerms = 3,
    Watch = 4,
    Unwatch = 5,
    TransactionStart = 6,
    TransactionEnd = 7,
    Write = 11,
    Mkdir = 12,
    Rm = 13,
    SetPerms = 14,
    WatchEvent = 15,
    Error = 16,
}

impl MsgType {
    pub fn from_u32(v: u32) -> Option<MsgType> {
        use MsgType::*;
        Some(match v {
            1 => Directory,
            2 => Read,
            3 => GetPerms,
            4 => Watch,
            5 => Unwatch,
            6 => TransactionStart,
            7 => TransactionEnd,
            11 => Write,
            12 => Mkdir,
            13 => Rm,
            14 => SetPerms,
            15 => WatchEvent,
            16 => Error,
            _ => return None,
        })
    }
}

/// Why a xenstore operation failed.
#[derive(Debug, thiserror::Error)]
pub enum XsError {
    #[error("no such node")]
    NotFound,
    #[error("permission denied")]
    Denied,
    #[error("transaction conflict (EAGAIN)")]
    Again,
    #[error("xenstored answered {0}")]
    Errno(String),
    #[error("xenstore connection: {0}")]
    Io(#[from] io::Error),
    #[error("xenstore protocol: {0}")]
    Protocol(String),
}

impl XsError {
    /// The error for an `XS_ERROR` payload (`"ENOENT\0"`).
    pub fn from_errno(payload: &[u8]) -> XsError {
        let name = strings(payload).into_iter().next().unwrap_or_default();
        match name.as_str() {
            "ENOENT" => XsError::NotFound,
            "EACCES" | "EPERM" => XsError::Denied,
            "EAGAIN" => XsError::Again,
            _ => XsError::Errno(name),
        }
    }

    /// Whether the connection itself is unusable (as opposed to one request failing).
    pub fn is_fatal(&self) -> bool {
        matches!(self, XsError::Io(_) | XsError::Protocol(_))
    }
}

/// A decoded message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub ty: u32,
    pub req_id: u32,
    pub tx_id: u32,
    pub len: u32,
}

impl Header {
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, XsError> {
        let word = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let h = Header {
            ty: word(0),
            req_id: word(4),
            tx_id: word(8),
            len: word(12),
        };
        if h.len as usize > PAYLOAD_MAX {
            return Err(XsError::Protocol(format!(
                "payload of {} bytes (at most {PAYLOAD_MAX})",
                h.len
            )));
        }
        Ok(h)
    }
}

/// A whole message: header and payload.
pub fn encode(ty: MsgType, req_id: u32, tx_id: u32, payload: &[u8]) -> Result<Vec<u8>, XsError> {
    if payload.len() > PAYLOAD_MAX {
        return Err(XsError::Protocol(format!(
            "request of {} bytes (at most {PAYLOAD_MAX})",
            payload.len()
        )));
    }
    let mut m = Vec::with_capacity(HEADER_LEN + payload.len());
    for w in [ty as u32, req_id, tx_id, payload.len() as u32] {
        m.extend_from_slice(&w.to_ne_bytes());
    }
    m.extend_from_slice(payload);
    Ok(m)
}

/// `parts` joined by NULs, with a final NUL if `trailing_nul` (WRITE's value has none).
pub fn join(parts: &[&str], trailing_nul: bool) -> Vec<u8> {
    let mut v = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            v.push(0);
        }
        v.extend_from_slice(p.as_bytes());
    }
    if trailing_nul {
        v.push(0);
    }
    v
}

/// The NUL-separated strings of a payload (a final NUL is optional; non-UTF-8 bytes are
/// replaced).
pub fn strings(payload: &[u8]) -> Vec<String> {
    let body = payload.strip_suffix(&[0]).unwrap_or(payload);
    if body.is_empty() {
        return Vec::new();
    }
    body.split(|&b| b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// What a permission entry grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    None,
    Read,
    Write,
    Both,
}

/// One permission entry, `r5` = domain 5 may read. In a node's list the first entry names the
/// owner (who may do anything) and what every domain not listed may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perm {
    pub access: Access,
    pub domid: u32,
}

impl Perm {
    pub fn new(access: Access, domid: u32) -> Perm {
        Perm { access, domid }
    }
}

impl fmt::Display for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = match self.access {
            Access::None => 'n',
            Access::Read => 'r',
            Access::Write => 'w',
            Access::Both => 'b',
        };
        write!(f, "{c}{}", self.domid)
    }
}

impl FromStr for Perm {
    type Err = XsError;

    fn from_str(s: &str) -> Result<Perm, XsError> {
        let bad = || XsError::Protocol(format!("bad permission {s:?}"));
        let mut chars = s.chars();
        let access = match chars.next().ok_or_else(bad)? {
            'n' => Access::None,
            'r' => Access::Read,
            'w' => Access::Write,
            'b' => Access::Both,
            _ => return Err(bad()),
        };
        let domid = chars.as_str().parse().map_err(|_| bad())?;
        Ok(Perm { access, domid })
    }
}

/// SET_PERMS payload: the path, then each entry.
pub fn set_perms_payload(path: &str, perms: &[Perm]) -> Vec<u8> {
    let list: Vec<String> = perms.iter().map(Perm::to_string).collect();
    let mut parts = vec![path];
    parts.extend(list.iter().map(String::as_str));
    join(&parts, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_round_trip() {
        let m = encode(MsgType::Write, 7, 3, &join(&["/a/b", "v"], false)).unwrap();
        assert_eq!(m.len(), HEADER_LEN + 6);
        let h = Header::decode(m[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(
            h,
            Header {
                ty: 11,
                req_id: 7,
                tx_id: 3,
                len: 6
            }
        );
        assert_eq!(&m[HEADER_LEN..], b"/a/b\0v");
        assert!(encode(MsgType::Read, 0, 0, &[b'x'; PAYLOAD_MAX + 1]).is_err());
        let mut big = [0u8; HEADER_LEN];
        big[12..].copy_from_slice(&5000u32.to_ne_bytes());
        assert!(Header::decode(&big).is_err());
    }

    #[test]
    fn strings_and_errors() {
        assert_eq!(strings(b"a\0bc\0"), vec!["a", "bc"]);
        assert_eq!(strings(b"value"), vec!["value"]);
        assert!(strings(b"").is_empty());
        assert!(strings(b"\0").is_empty());
        assert!(matches!(
            XsError::from_errno(b"ENOENT\0"),
            XsError::NotFound
        ));
        assert!(matches!(XsError::from_errno(b"EACCES\0"), XsError::Denied));
        assert!(matches!(XsError::from_errno(b"EAGAIN\0"), XsError::Again));
        assert!(matches!(XsError::from_errno(b"E2BIG\0"), XsError::Errno(e) if e == "E2BIG"));
        assert!(!XsError::NotFound.is_fatal());
        assert!(XsError::Protocol("x".into()).is_fatal());
    }

    #[test]
    fn permissions() {
        let p: Perm = "r5".parse().unwrap();
        assert_eq!(p, Perm::new(Access::Read, 5));
        assert_eq!(Perm::new(Access::Both, 0).to_string(), "b0");
        for bad in ["", "x1", "r", "r-1", "n99999999999"] {
            assert!(bad.parse::<Perm>().is_err(), "{bad}");
        }
        assert_eq!(
            set_perms_payload(
                "/p",
                &[Perm::new(Access::None, 0), Perm::new(Access::Read, 5)]
            ),
            b"/p\0n0\0r5\0"
        );
    }
}
