//! Who may see, read or write which exports: rules that match a client's TLS identity and an
//! export's name (`nbd.access` in `parallax.ron`).
//!
//! The first rule whose `clients` and `exports` both match decides. An export no rule grants
//! is invisible: `NBD_OPT_LIST` leaves it out and `INFO`/`GO` answer "unknown export", as for
//! one that does not exist. `see` lists it and answers `INFO`, but `GO` is refused with
//! `NBD_REP_ERR_POLICY`; `read` opens it read-only; `write` as the export allows (snapshots are
//! read-only whatever the rule). Without rules every client may write every export.

use serde::{Deserialize, Serialize};

use super::tls::ClientIdentity;
use crate::util::wildcard_match;

/// What a rule grants, each level including the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    See,
    Read,
    Write,
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    /// Client identities, with `*` and `?`: `psk:NAME` (the PSK identity), `cert:NAME` (the
    /// certificate's common name), `anonymous` (no TLS, or TLS without a client key or
    /// certificate), or `*` for anyone.
    pub clients: Vec<String>,
    /// Export names, with `*` and `?` (`template@*` for a VDI's snapshots; `*` matches `@`
    /// too, so `vm-*` covers `vm-1` and its snapshots `vm-1@…`).
    pub exports: Vec<String>,
    pub allow: Access,
}

/// The rules a server enforces.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessPolicy {
    rules: Vec<AccessRule>,
}

impl AccessPolicy {
    /// Checks the rules' shape; errors are one line naming the rule.
    pub fn new(rules: Vec<AccessRule>) -> Result<AccessPolicy, String> {
        for (i, r) in rules.iter().enumerate() {
            let at = |why: String| format!("access rule {}: {why}", i + 1);
            if r.clients.is_empty() || r.exports.is_empty() {
                return Err(at(
                    "`clients` and `exports` each need at least one entry".into()
                ));
            }
            for c in &r.clients {
                let kind_ok = c == "*"
                    || c == "anonymous"
                    || c.strip_prefix("psk:").is_some_and(|n| !n.is_empty())
                    || c.strip_prefix("cert:").is_some_and(|n| !n.is_empty());
                if !kind_ok {
                    return Err(at(format!(
                        "client {c:?} is not `*`, `anonymous`, `psk:NAME` or `cert:NAME`"
                    )));
                }
            }
            if let Some(e) = r.exports.iter().find(|e| e.is_empty()) {
                return Err(at(format!("empty export pattern {e:?}")));
            }
        }
        Ok(AccessPolicy { rules })
    }

    /// What `client` may do with `export`; `None`: it may not even know it exists.
    pub fn access(&self, client: &ClientIdentity, export: &str) -> Option<Access> {
        if self.rules.is_empty() {
            return Some(Access::Write);
        }
        let who = client.to_string();
        self.rules
            .iter()
            .find(|r| {
                r.clients.iter().any(|c| wildcard_match(c, &who))
                    && r.exports.iter().any(|e| wildcard_match(e, export))
            })
            .map(|r| r.allow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(clients: &[&str], exports: &[&str], allow: Access) -> AccessRule {
        AccessRule {
            clients: clients.iter().map(|s| s.to_string()).collect(),
            exports: exports.iter().map(|s| s.to_string()).collect(),
            allow,
        }
    }

    #[test]
    fn the_first_matching_rule_decides_and_nothing_else_is_visible() {
        let p = AccessPolicy::new(vec![
            rule(&["psk:alice"], &["vm-*"], Access::Write),
            rule(&["psk:*", "cert:ops"], &["vm-1", "vm-1@*"], Access::Read),
            rule(&["*"], &["public"], Access::See),
        ])
        .unwrap();
        let alice = ClientIdentity::Psk("alice".into());
        let bob = ClientIdentity::Psk("bob".into());
        let ops = ClientIdentity::Cert("ops".into());
        assert_eq!(p.access(&alice, "vm-1"), Some(Access::Write));
        // `*` takes `@` too: `vm-*` covers the VDIs' snapshots (which stay read-only).
        assert_eq!(p.access(&alice, "vm-1@s"), Some(Access::Write));
        assert_eq!(p.access(&bob, "vm-1"), Some(Access::Read));
        assert_eq!(p.access(&bob, "vm-2"), None);
        assert_eq!(p.access(&ops, "vm-1@s"), Some(Access::Read));
        assert_eq!(
            p.access(&ClientIdentity::Anonymous, "public"),
            Some(Access::See)
        );
        assert_eq!(p.access(&ClientIdentity::Anonymous, "vm-1"), None);
        // A certificate named like a PSK identity is a different client.
        assert_eq!(
            p.access(&ClientIdentity::Cert("alice".into()), "vm-1"),
            None
        );
        let open = AccessPolicy::default();
        assert_eq!(
            open.access(&ClientIdentity::Anonymous, "x"),
            Some(Access::Write)
        );
    }

    #[test]
    fn malformed_rules_are_refused() {
        for (r, why) in [
            (rule(&[], &["x"], Access::Read), "at least one"),
            (rule(&["alice"], &["x"], Access::Read), "is not `*`"),
            (rule(&["psk:"], &["x"], Access::Read), "is not `*`"),
            (rule(&["*"], &[""], Access::Read), "empty export"),
        ] {
            let e = AccessPolicy::new(vec![rule(&["*"], &["ok"], Access::See), r]).unwrap_err();
            assert!(e.starts_with("access rule 2: ") && e.contains(why), "{e}");
        }
    }
}
