//! NBD over TLS: the credentials a server is configured with, the OpenSSL context built from
//! them, and the identity a client proved.
//!
//! STARTTLS is as the NBD spec describes it (doc/proto.md, "TLS support"): the client sends
//! `NBD_OPT_STARTTLS`, the server acknowledges it, the TLS handshake runs on the same socket,
//! and option haggling starts again from scratch inside TLS (the handshake state machine forgets
//! what was negotiated before). Credentials, either or both:
//!
//! - x509: a certificate chain and its key; with a CA file, clients must present a certificate
//!   that CA signed (its subject's common name is the client's identity);
//! - TLS-PSK: a key file in the format `psktool`, `qemu-nbd` and `nbdkit` use, one
//!   `identity:hexkey` per line (the identity is the client's).
//!
//! rustls has no TLS-PSK, which is what qemu (`tls-creds-psk`) and libnbd (`tls-psk-file`)
//! speak, so one stack does both: the system's OpenSSL.

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
};

use openssl::{
    ex_data::Index,
    ssl::{
        ClientHelloResponse, Ssl, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslMode,
        SslOptions, SslRef, SslVerifyMode, SslVersion,
    },
};
use serde::{Deserialize, Serialize};

/// Whether clients must use TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// No TLS: `NBD_OPT_STARTTLS` is answered "unsupported".
    Off,
    /// STARTTLS is offered; clients that do not upgrade are served in plaintext.
    Allow,
    /// Every option but STARTTLS and ABORT is refused with `NBD_REP_ERR_TLS_REQD` until the
    /// client upgrades.
    Require,
}

/// TLS settings, as `parallax.ron` (`nbd: (tls: (...))`) and `parallax serve --tls-*` give them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// `off`, `allow` or `require`. Default: `require` when credentials are given, else `off`.
    pub mode: Option<TlsMode>,
    /// The server's certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// The key of `cert` (PEM).
    pub key: Option<PathBuf>,
    /// CA certificates (PEM): clients must present a certificate one of them signed.
    pub ca: Option<PathBuf>,
    /// Pre-shared keys, `identity:hexkey` per line (`psktool -u NAME -p FILE` makes them).
    pub psk: Option<PathBuf>,
}

impl TlsSettings {
    /// The mode in effect: the one given, else `require` if any credentials are.
    pub fn effective_mode(&self) -> TlsMode {
        self.mode
            .unwrap_or(if self.cert.is_some() || self.psk.is_some() {
                TlsMode::Require
            } else {
                TlsMode::Off
            })
    }
}

/// What a client proved about itself during the TLS handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientIdentity {
    /// No TLS, or TLS without a client certificate or key.
    Anonymous,
    /// The PSK identity the client used.
    Psk(String),
    /// The common name of the client certificate the CA vouched for.
    Cert(String),
}

impl fmt::Display for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientIdentity::Anonymous => write!(f, "anonymous"),
            ClientIdentity::Psk(id) => write!(f, "psk:{id}"),
            ClientIdentity::Cert(cn) => write!(f, "cert:{cn}"),
        }
    }
}

/// The server side of TLS: a context shared by every connection.
pub struct TlsServer {
    ctx: SslContext,
    require: bool,
}

/// Where a session keeps the PSK identity its client used: OpenSSL forgets it under TLS 1.3
/// (`SSL_get_psk_identity` is NULL there), so the key callback notes it.
fn psk_identity_index() -> Index<Ssl, String> {
    static INDEX: OnceLock<Index<Ssl, String>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().expect("OpenSSL ex_data index"))
}

impl fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsServer")
            .field("require", &self.require)
            .finish_non_exhaustive()
    }
}

impl TlsServer {
    /// Builds the server's TLS context from `settings`, reading the files they name; `None`
    /// when TLS is off. Errors are one line naming the setting at fault.
    pub fn new(settings: &TlsSettings) -> Result<Option<Arc<TlsServer>>, String> {
        let mode = settings.effective_mode();
        if mode == TlsMode::Off {
            return Ok(None);
        }
        if settings.cert.is_none() && settings.psk.is_none() {
            return Err(
                "tls: mode allow or require needs a certificate (--tls-cert, --tls-key) or keys (--tls-psk)"
                    .into(),
            );
        }
        let keys = match &settings.psk {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("tls: PSK file {}: {e}", path.display()))?;
                let keys = parse_psk_file(&text)
                    .map_err(|e| format!("tls: PSK file {}: {e}", path.display()))?;
                Some(Arc::new(keys))
            }
            None => None,
        };
        let mut b = builder()?;
        if let Some(keys) = &keys {
            add_psk(&mut b, keys.clone())?;
        }
        match (&settings.cert, &settings.key) {
            (Some(cert), Some(key)) => add_x509(&mut b, cert, key, settings.ca.as_deref())?,
            (None, None) if settings.ca.is_some() => {
                return Err(
                    "tls: client certificates (--tls-ca) need a server certificate (--tls-cert)"
                        .into(),
                )
            }
            (None, None) => {}
            _ => return Err("tls: a certificate needs its key (--tls-cert with --tls-key)".into()),
        }
        if let (Some(keys), Some(_)) = (&keys, &settings.cert) {
            // A server with a certificate sends it even to a client that offered a key, and
            // GnuTLS clients that have only a key (qemu, libnbd) then give up: a client that
            // offers PSK ciphersuites is moved to a context with keys and no certificate.
            let mut pb = builder()?;
            add_psk(&mut pb, keys.clone())?;
            let psk_only = pb.build();
            b.set_client_hello_callback(move |ssl, _alert| {
                if offers_psk(ssl) {
                    ssl.set_ssl_context(&psk_only)?;
                    ssl.set_verify(SslVerifyMode::NONE);
                }
                Ok(ClientHelloResponse::SUCCESS)
            });
        }
        Ok(Some(Arc::new(TlsServer {
            ctx: b.build(),
            require: mode == TlsMode::Require,
        })))
    }

    /// Clients must upgrade before anything else.
    pub fn required(&self) -> bool {
        self.require
    }

    /// A new server-side TLS session for one connection.
    pub fn session(&self) -> Result<Ssl, openssl::error::ErrorStack> {
        Ssl::new(&self.ctx)
    }
}

/// A server context with what every connection needs.
fn builder() -> Result<SslContextBuilder, String> {
    let mut b = SslContextBuilder::new(SslMethod::tls_server())
        .map_err(|e| format!("tls: cannot set up OpenSSL: {e}"))?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(|e| format!("tls: {e}"))?;
    // Output stays queued in the connection and is retried from wherever it moved to.
    b.set_mode(SslMode::ENABLE_PARTIAL_WRITE | SslMode::ACCEPT_MOVING_WRITE_BUFFER);
    b.set_options(SslOptions::NO_RENEGOTIATION);
    Ok(b)
}

fn add_x509(
    b: &mut SslContextBuilder,
    cert: &Path,
    key: &Path,
    ca: Option<&Path>,
) -> Result<(), String> {
    let at = |what: &str, path: &Path| {
        let (what, path) = (what.to_string(), path.display().to_string());
        move |e: openssl::error::ErrorStack| format!("tls: {what} {path}: {e}")
    };
    b.set_certificate_chain_file(cert)
        .map_err(at("certificate", cert))?;
    b.set_private_key_file(key, SslFiletype::PEM)
        .map_err(at("key", key))?;
    b.check_private_key()
        .map_err(at("key does not match the certificate:", key))?;
    if let Some(ca) = ca {
        b.set_ca_file(ca).map_err(at("CA file", ca))?;
        b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
    }
    Ok(())
}

fn add_psk(b: &mut SslContextBuilder, keys: Arc<HashMap<String, Vec<u8>>>) -> Result<(), String> {
    // OpenSSL leaves the TLS 1.2 PSK ciphersuites out of its default list; TLS 1.3 takes the
    // key through the same callback.
    b.set_cipher_list("ECDHEPSK:PSK:DEFAULT:!eNULL")
        .map_err(|e| format!("tls: {e}"))?;
    let index = psk_identity_index();
    b.set_psk_server_callback(move |ssl, identity, out| {
        let found = identity
            .and_then(|id| std::str::from_utf8(id).ok())
            .and_then(|id| keys.get_key_value(id));
        match found {
            Some((id, k)) if k.len() <= out.len() => {
                out[..k.len()].copy_from_slice(k);
                ssl.set_ex_data(index, id.clone());
                Ok(k.len())
            }
            // Unknown identity: 0 bytes of key fails the handshake.
            _ => Ok(0),
        }
    });
    Ok(())
}

/// The ClientHello offers a PSK ciphersuite (a client with a key).
fn offers_psk(ssl: &SslRef) -> bool {
    let Some(bytes) = ssl.client_hello_ciphers() else {
        return false;
    };
    let bytes = bytes.to_vec();
    ssl.bytes_to_cipher_list(&bytes, ssl.client_hello_isv2())
        .is_ok_and(|l| l.suites.iter().any(|c| c.name().contains("PSK")))
}

/// Who the client of a finished TLS handshake is.
pub fn identity(ssl: &SslRef) -> ClientIdentity {
    if let Some(id) = ssl.ex_data(psk_identity_index()) {
        return ClientIdentity::Psk(id.clone());
    }
    let cn = ssl.peer_certificate().and_then(|c| {
        c.subject_name()
            .entries_by_nid(openssl::nid::Nid::COMMONNAME)
            .next()
            .and_then(|e| e.data().to_string().ok())
    });
    match cn {
        Some(cn) => ClientIdentity::Cert(cn),
        None => ClientIdentity::Anonymous,
    }
}

/// Longest key OpenSSL takes (`PSK_MAX_PSK_LEN`).
const MAX_PSK_BYTES: usize = 256;

/// Parses a `psktool` key file: `identity:hexkey` per line; blank lines are skipped.
pub fn parse_psk_file(text: &str) -> Result<HashMap<String, Vec<u8>>, String> {
    let mut keys = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let at = |why: &str| format!("line {}: {why}", n + 1);
        let (id, hex) = line
            .split_once(':')
            .ok_or_else(|| at("expected IDENTITY:HEXKEY"))?;
        if id.is_empty() {
            return Err(at("empty identity"));
        }
        let key =
            decode_hex(hex).ok_or_else(|| at("the key is not an even number of hex digits"))?;
        if key.is_empty() || key.len() > MAX_PSK_BYTES {
            return Err(at(&format!("a key is 1 to {MAX_PSK_BYTES} bytes")));
        }
        if keys.insert(id.to_string(), key).is_some() {
            return Err(at(&format!("identity {id:?} appears twice")));
        }
    }
    if keys.is_empty() {
        return Err("no keys".into());
    }
    Ok(keys)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psk_files_parse_like_psktool_writes_them() {
        let keys = parse_psk_file("alice:00ff10\n\nbob:DEADbeef\n").unwrap();
        assert_eq!(keys["alice"], vec![0, 0xff, 0x10]);
        assert_eq!(keys["bob"], vec![0xde, 0xad, 0xbe, 0xef]);
        for (bad, why) in [
            ("alice", "line 1: expected"),
            (":00", "line 1: empty identity"),
            ("a:0", "hex digits"),
            ("a:zz", "hex digits"),
            ("a:", "1 to 256"),
            ("a:00\na:01", "line 2: identity \"a\" appears twice"),
            ("\n\n", "no keys"),
        ] {
            let e = parse_psk_file(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn mode_defaults_to_require_with_credentials() {
        let mut s = TlsSettings::default();
        assert_eq!(s.effective_mode(), TlsMode::Off);
        assert!(TlsServer::new(&s).unwrap().is_none());
        s.psk = Some("/nonexistent".into());
        assert_eq!(s.effective_mode(), TlsMode::Require);
        let e = TlsServer::new(&s).unwrap_err();
        assert!(e.starts_with("tls: PSK file /nonexistent"), "{e}");
        let e = TlsServer::new(&TlsSettings {
            mode: Some(TlsMode::Require),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.contains("needs a certificate"), "{e}");
        let e = TlsServer::new(&TlsSettings {
            cert: Some("/c".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.contains("needs its key"), "{e}");
    }

    #[test]
    fn a_psk_server_builds() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("keys.psk");
        std::fs::write(&f, "alice:0123456789abcdef0123456789abcdef\n").unwrap();
        let s = TlsServer::new(&TlsSettings {
            psk: Some(f),
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        assert!(s.required());
        s.session().unwrap();
    }
}
