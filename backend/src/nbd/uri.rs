//! NBD URIs as libnbd, qemu and nbdkit write them (the NBD project's `doc/uri.md`):
//!
//! ```text
//!  nbd://[USER@]HOST[:PORT]/[EXPORT][?QUERY]       nbds://…  (TLS required)
//!  nbd+unix:///[EXPORT]?socket=PATH[&QUERY]        nbds+unix://…
//! ```
//!
//! Query parameters understood: `socket`, `tls-psk-file` (keys in psktool's format; the
//! identity is `USER`, else `tls-username`, else the login name), `tls-certificates` (a
//! directory with `ca-cert.pem`, and `client-cert.pem` + `client-key.pem` to present),
//! `tls-username`. Others are refused rather than ignored.

use std::path::PathBuf;

/// The default NBD port.
pub const DEFAULT_PORT: u16 = 10809;

/// Where an NBD export is and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub address: Address,
    pub export: String,
    /// The server must upgrade to TLS (`nbds`).
    pub tls: bool,
    pub psk_file: Option<PathBuf>,
    pub username: Option<String>,
    pub certificates: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

impl NbdUri {
    /// True if `s` looks like an NBD URI rather than a file name.
    pub fn is_uri(s: &str) -> bool {
        ["nbd://", "nbds://", "nbd+unix://", "nbds+unix://"]
            .iter()
            .any(|p| s.starts_with(p))
    }

    /// Parses a URI; errors say what is wrong in one line.
    pub fn parse(s: &str) -> Result<NbdUri, String> {
        let bad = |why: &str| format!("{s:?} is not an NBD URI: {why}");
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| bad("expected nbd://, nbds://, nbd+unix:// or nbds+unix://"))?;
        let (tls, unix) = match scheme {
            "nbd" => (false, false),
            "nbds" => (true, false),
            "nbd+unix" => (false, true),
            "nbds+unix" => (true, true),
            _ => return Err(bad(&format!("unknown scheme {scheme:?}"))),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = decode(path).ok_or_else(|| bad("bad %-escape in the export name"))?;
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (
                Some(decode(u).ok_or_else(|| bad("bad %-escape in the user name"))?),
                h,
            ),
            None => (None, authority),
        };
        let mut uri = NbdUri {
            address: Address::Unix(PathBuf::new()),
            export,
            tls,
            psk_file: None,
            username: user,
            certificates: None,
        };
        let mut socket = None;
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = decode(v).ok_or_else(|| bad(&format!("bad %-escape in {k}")))?;
            match k {
                "socket" => socket = Some(PathBuf::from(v)),
                "tls-psk-file" => uri.psk_file = Some(PathBuf::from(v)),
                "tls-certificates" => uri.certificates = Some(PathBuf::from(v)),
                "tls-username" => uri.username = uri.username.or(Some(v)),
                _ => return Err(bad(&format!("unsupported query parameter {k:?}"))),
            }
        }
        if (uri.psk_file.is_some() || uri.certificates.is_some()) && !tls {
            return Err(bad("TLS credentials need an nbds:// or nbds+unix:// URI"));
        }
        uri.address = if unix {
            if !hostport.is_empty() {
                return Err(bad(
                    "a unix socket URI has no host (nbd+unix:///EXPORT?socket=PATH)",
                ));
            }
            Address::Unix(socket.ok_or_else(|| bad("needs ?socket=PATH"))?)
        } else {
            if socket.is_some() {
                return Err(bad("socket= is for nbd+unix:// URIs"));
            }
            let (host, port) = split_host_port(hostport).ok_or_else(|| bad("bad host or port"))?;
            Address::Tcp { host, port }
        };
        Ok(uri)
    }

    /// `uri` with the relative file paths in its query (`tls-psk-file`, `tls-certificates`,
    /// `socket`) made relative to `cwd`, for a process that runs elsewhere (the daemon).
    pub fn with_absolute_paths(uri: &str, cwd: &std::path::Path) -> String {
        let Some((base, query)) = uri.split_once('?') else {
            return uri.to_string();
        };
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k @ ("tls-psk-file" | "tls-certificates" | "socket"), v))
                    if !v.is_empty() && !v.starts_with('/') =>
                {
                    format!("{k}={}", cwd.join(v).display())
                }
                _ => pair.to_string(),
            })
            .collect();
        format!("{base}?{}", pairs.join("&"))
    }
}

fn split_host_port(s: &str) -> Option<(String, u16)> {
    if let Some(v6) = s.strip_prefix('[') {
        let (host, rest) = v6.split_once(']')?;
        let port = match rest.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if rest.is_empty() => DEFAULT_PORT,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().ok()?),
        None => (s, DEFAULT_PORT),
    };
    (!host.is_empty()).then(|| (host.to_string(), port))
}

/// Percent-decoding; `None` for a broken escape or bytes that are not UTF-8.
fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_as_libnbd_writes_them() {
        let u =
            NbdUri::parse("nbds://alice@host.example:10810/vm%401?tls-psk-file=/k.psk").unwrap();
        assert_eq!(
            u,
            NbdUri {
                address: Address::Tcp {
                    host: "host.example".into(),
                    port: 10810
                },
                export: "vm@1".into(),
                tls: true,
                psk_file: Some("/k.psk".into()),
                username: Some("alice".into()),
                certificates: None,
            }
        );
        let u = NbdUri::parse("nbd://[::1]/").unwrap();
        assert_eq!(
            u.address,
            Address::Tcp {
                host: "::1".into(),
                port: DEFAULT_PORT
            }
        );
        assert_eq!(u.export, "");
        let u = NbdUri::parse("nbd+unix:///tmpl?socket=/run/p/nbd.sock").unwrap();
        assert_eq!(u.address, Address::Unix("/run/p/nbd.sock".into()));
        assert_eq!(u.export, "tmpl");
        let u = NbdUri::parse("nbds://h/x?tls-certificates=/pki&tls-username=bob").unwrap();
        assert_eq!(
            u.certificates.as_deref(),
            Some(std::path::Path::new("/pki"))
        );
        assert_eq!(u.username.as_deref(), Some("bob"));
        assert!(NbdUri::is_uri("nbds+unix:///x?socket=/s") && !NbdUri::is_uri("/tmp/x.img"));
    }

    #[test]
    fn relative_paths_are_made_absolute_for_the_daemon() {
        let cwd = std::path::Path::new("/home/op");
        assert_eq!(
            NbdUri::with_absolute_paths("nbds://a@h/x?tls-psk-file=k.psk&tls-username=a", cwd),
            "nbds://a@h/x?tls-psk-file=/home/op/k.psk&tls-username=a"
        );
        assert_eq!(
            NbdUri::with_absolute_paths("nbd+unix:///x?socket=/run/s", cwd),
            "nbd+unix:///x?socket=/run/s"
        );
        assert_eq!(NbdUri::with_absolute_paths("nbd://h/x", cwd), "nbd://h/x");
    }

    #[test]
    fn bad_uris_say_why() {
        for (s, why) in [
            ("http://h/x", "unknown scheme"),
            ("nbd:/h/x", "expected nbd://"),
            ("nbd://h:port/x", "bad host or port"),
            ("nbd://:10809/x", "bad host or port"),
            ("nbd+unix:///x", "needs ?socket"),
            ("nbd+unix://h/x?socket=/s", "has no host"),
            ("nbd://h/x?socket=/s", "socket= is for"),
            ("nbd://h/x?tls-psk-file=/k", "need an nbds://"),
            ("nbd://h/x?timeout=3", "unsupported query parameter"),
            ("nbd://h/%zz", "bad %-escape"),
        ] {
            let e = NbdUri::parse(s).unwrap_err();
            assert!(e.contains(why), "{s}: {e}");
        }
    }
}
