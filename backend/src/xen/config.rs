//! The daemon's `xen` configuration section, and starting the backend from it.
//!
//! ```ron
//! xen: (
//!     enabled: None,            // None: when this host has Xen (a xenstore socket or /dev/xen)
//!     backend_domid: None,      // None: this domain's `domid` node (0 in dom0)
//!     kinds: ["vbd", "vbd3"],   // backend/vbd (Xen 4.17 script=), backend/vbd3 (4.19+ tap)
//!     scripts: ["block-parallax"], // serve only disks with this hotplug script; [] = all
//!     transport: Xen,           // Xen (gntdev/evtchn) or Local (tests: memfd/eventfd)
//! )
//! ```

use std::{path::Path, sync::Arc};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{
    backend::{BackendSettings, XenBackend},
    connect::{Connector, LocalDomains, XenConnector},
    store::XenStore,
    vbd::VbdConfig,
    xsrs::XsRsStore,
};
use crate::{blkif::features::Features, disk::DiskProvider};

/// How rings reach guest memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum XenTransportKind {
    /// `/dev/xen/gntdev` and `/dev/xen/evtchn`.
    #[default]
    Xen,
    /// Local "domains" registered in-process ([`LocalDomains`]): for tests without Xen.
    Local,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct XenConfig {
    /// Serve Xen vbds. `None`: when this host has Xen (a xenstore socket or `/dev/xen`).
    pub enabled: Option<bool>,
    /// This (the backend) domain's id. `None`: the `domid` node of this domain, else 0.
    pub backend_domid: Option<u32>,
    /// Backend directories to serve: `vbd` (Xen 4.17: `script=block-parallax`) and `vbd3`
    /// (Xen 4.19+: `backendtype=tap`).
    pub kinds: Vec<String>,
    /// Serve only devices whose hotplug `script` is one of these (file name); empty: every
    /// device of those kinds (a storage domain that serves nothing else).
    pub scripts: Vec<String>,
    pub transport: XenTransportKind,
}

/// The hotplug script the example configs use.
pub const DEFAULT_SCRIPT: &str = "block-parallax";

impl Default for XenConfig {
    fn default() -> Self {
        XenConfig {
            enabled: None,
            backend_domid: None,
            kinds: vec!["vbd".into(), "vbd3".into()],
            scripts: vec![DEFAULT_SCRIPT.into()],
            transport: XenTransportKind::Xen,
        }
    }
}

/// Whether this host looks like it runs Xen: a xenstore socket (`$XENSTORED_PATH`,
/// `/run/xenstored/socket`) or the xenbus device.
pub fn host_has_xen() -> bool {
    let env = std::env::var_os("XENSTORED_PATH").filter(|p| !p.is_empty());
    env.is_some_and(|p| Path::new(&p).exists())
        || Path::new("/run/xenstored/socket").exists()
        || Path::new("/var/run/xenstored/socket").exists()
        || Path::new("/dev/xen/xenbus").exists()
}

impl XenConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.kinds.is_empty() {
            return Err("xen.kinds is empty: name at least one of \"vbd\", \"vbd3\"".into());
        }
        for k in &self.kinds {
            if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(format!(
                    "xen.kinds: {k:?} is not a backend kind like \"vbd\""
                ));
            }
        }
        for s in &self.scripts {
            if s.is_empty() || s.contains('/') {
                return Err(format!(
                    "xen.scripts: {s:?} should be a script's file name, like \"{DEFAULT_SCRIPT}\""
                ));
            }
        }
        Ok(())
    }

    /// Whether the daemon should run the backend (explicitly, or because Xen is here).
    pub fn wanted(&self) -> bool {
        self.enabled.unwrap_or_else(host_has_xen)
    }
}

/// The daemon's running backend, with the local domains when `transport: Local`.
pub struct RunningXen {
    pub backend: XenBackend,
    pub local: Option<LocalDomains>,
}

/// Starts the backend as the daemon does: connects to xenstore with `xenstore-rs`, finds the
/// backend domain id, watches. `Ok(None)` when Xen is not wanted, or (auto mode only) not
/// reachable.
pub fn start_from_config(
    cfg: &XenConfig,
    features: Features,
    provider: Arc<dyn DiskProvider>,
) -> Result<Option<RunningXen>, String> {
    if !cfg.wanted() {
        return Ok(None);
    }
    let explicit = cfg.enabled == Some(true);
    let store = match XsRsStore::connect() {
        Ok(s) => s,
        Err(e) if explicit => return Err(format!("xen: cannot reach xenstore: {e}")),
        Err(e) => {
            warn!("xen: this host looks like Xen but xenstore is not reachable ({e}); not serving Xen disks");
            return Ok(None);
        }
    };
    let backend_domid = match cfg.backend_domid {
        Some(d) => d,
        None => store
            .read("domid")
            .ok()
            .flatten()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0),
    };
    let (connector, local): (Arc<dyn Connector>, _) = match cfg.transport {
        XenTransportKind::Xen => {
            if cfg.kinds.iter().any(|k| k == "vbd") && Path::new("/sys/module/xen_blkback").exists()
            {
                warn!("xen: the kernel's xen-blkback is loaded in this domain: it claims every backend/vbd device too (unload it, or use backendtype=tap on Xen 4.19+)");
            }
            if !crate::blkif::xen::available() {
                warn!("xen: /dev/xen/gntdev or /dev/xen/evtchn is missing: guests' rings cannot be mapped (load xen-gntdev and xen-evtchn)");
            }
            (Arc::new(XenConnector), None)
        }
        XenTransportKind::Local => {
            let l = LocalDomains::new();
            (Arc::new(l.clone()), Some(l))
        }
    };
    let settings = BackendSettings {
        vbd: VbdConfig {
            backend_domid,
            features,
            scripts: cfg.scripts.clone(),
        },
        kinds: cfg.kinds.clone(),
    };
    let backend = XenBackend::start(store, settings, provider, connector)
        .map_err(|e| format!("xen: cannot watch the backend directories: {e}"))?;
    info!(backend_domid, transport = ?cfg.transport, "xen: serving vbds");
    Ok(Some(RunningXen { backend, local }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses() {
        let c = crate::daemon::config::Config::parse(include_str!(
            "../../../xen-configs/parallax-xen.ron"
        ))
        .unwrap();
        assert_eq!(c.xen.enabled, Some(true));
        assert_eq!(
            c.xen,
            XenConfig {
                enabled: Some(true),
                ..XenConfig::default()
            }
        );
    }

    #[test]
    fn validation() {
        XenConfig::default().validate().unwrap();
        let bad = XenConfig {
            kinds: vec![],
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("kinds"));
        let bad = XenConfig {
            kinds: vec!["vbd/x".into()],
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let bad = XenConfig {
            scripts: vec!["/etc/xen/scripts/block-parallax".into()],
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("file name"));
        assert!(!XenConfig {
            enabled: Some(false),
            ..Default::default()
        }
        .wanted());
    }
}
