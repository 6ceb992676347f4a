//! `parallax serve` configuration, in RON. Every field is optional; `parallax.ron` at the top of
//! the repository is a documented example, and `parallax serve --print-config` shows the
//! effective configuration.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    nbd::{AccessPolicy, AccessRule, NbdConfig, TlsMode, TlsSettings},
    store::StoreOptions,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The store (a file or block device). `--store` and `PARALLAX_STORE` override it.
    pub store: Option<PathBuf>,
    pub nbd: NbdSection,
    /// Control socket path. Default: an abstract socket derived from the store path, which the
    /// CLI finds on its own.
    pub control_socket: Option<PathBuf>,
    /// Commit changes at least this often (milliseconds), even if no client flushes.
    pub commit_interval_ms: u64,
    pub cache: CacheSection,
    pub rings: RingSection,
    /// The Xen vbd backend (xenbus): see [`crate::xen::XenConfig`].
    pub xen: crate::xen::XenConfig,
    pub metrics: MetricsSection,
    /// Remote-backed VDIs (`vdi create --backing URI`).
    pub backing: BackingSection,
    /// The control protocol over TCP and TLS, for other hosts (`vdi migrate`).
    pub control: super::control_net::NetControlSettings,
    /// Background dedup (README "Dedup").
    pub dedup: DedupSection,
    /// The Ceph cluster and etcd of a `rados:POOL/NAME` store.
    pub cluster: crate::cluster::ClusterConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DedupSection {
    /// Walk what the store holds while clients are not writing, sharing the blocks inline
    /// dedup did not (as `parallax dedup` does).
    pub background: bool,
    /// Seconds without a client write before the worker runs.
    pub idle_secs: u64,
    /// Seconds between looks for new work once a pass is done.
    pub every_secs: u64,
}

impl Default for DedupSection {
    fn default() -> Self {
        DedupSection {
            background: true,
            idle_secs: 10,
            every_secs: 300,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackingSection {
    /// How long a read that needs an unreachable backing waits for it to come back (seconds)
    /// before it fails with an I/O error; cached reads and writes never wait.
    pub reconnect_delay_secs: u64,
    /// Copy what backed VDIs still read through their backings in the background, at most
    /// this many bytes a second, until each is cut loose (as `vdi hydrate` does); 0 (the
    /// default): only when asked.
    pub hydrate_bytes_per_sec: u64,
}

impl Default for BackingSection {
    fn default() -> Self {
        BackingSection {
            reconnect_delay_secs: crate::nbd::remote::DEFAULT_RECONNECT_DELAY.as_secs(),
            hydrate_bytes_per_sec: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NbdSection {
    pub enabled: bool,
    /// TCP addresses to listen on.
    pub listen: Vec<String>,
    /// A unix socket to listen on too (`None` for none).
    pub unix: Option<PathBuf>,
    pub max_connections: usize,
    /// Largest request accepted (bytes); larger ones get an error, not a crash.
    pub max_request_bytes: u32,
    /// Threads doing disk I/O for NBD requests that may wait for the device.
    pub workers: usize,
    /// Event-loop threads serving connections (0: one per CPU).
    pub loops: usize,
    pub handshake_timeout_secs: u64,
    /// NBD over TLS (STARTTLS): credentials and whether clients must use it.
    pub tls: TlsSettings,
    /// Which client identity may see, read or write which exports; empty: everyone all.
    pub access: Vec<AccessRule>,
    /// Allow listening on an address other than loopback without requiring TLS (anyone who
    /// can reach it can then read and write every VDI).
    pub insecure: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheSection {
    /// Map nodes kept in memory (4 KiB each).
    pub map_nodes: usize,
    /// Refcount pages kept in memory (4 KiB each).
    pub refcount_pages: usize,
    /// Leaf blocks of the dedup index kept in memory (4 KiB each) for inline dedup.
    pub dedup_leaves: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RingSection {
    /// Accept blkif ring attaches (frontend-shim) on the control socket.
    pub enabled: bool,
    pub max_ring_page_order: u32,
    pub max_queues: u32,
    pub max_indirect_segments: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSection {
    /// TCP address of the Prometheus endpoint (`GET /metrics`); `None` (the default) serves
    /// no metrics.
    pub listen: Option<String>,
}

/// Where the daemon keeps its sockets by default: `/run/parallax` for root, else
/// `$XDG_RUNTIME_DIR/parallax`, else `/tmp/parallax-UID`.
pub fn runtime_dir() -> PathBuf {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        return PathBuf::from("/run/parallax");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("parallax"),
        _ => PathBuf::from(format!("/tmp/parallax-{uid}")),
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            store: None,
            nbd: NbdSection::default(),
            control_socket: None,
            commit_interval_ms: 5000,
            cache: CacheSection::default(),
            rings: RingSection::default(),
            xen: crate::xen::XenConfig::default(),
            metrics: MetricsSection::default(),
            backing: BackingSection::default(),
            control: Default::default(),
            dedup: DedupSection::default(),
            cluster: Default::default(),
        }
    }
}

impl Default for NbdSection {
    fn default() -> Self {
        let n = NbdConfig::default();
        NbdSection {
            enabled: true,
            listen: vec!["127.0.0.1:10809".into()],
            unix: Some(runtime_dir().join("nbd.sock")),
            max_connections: n.max_connections,
            max_request_bytes: n.max_request_bytes,
            workers: n.workers,
            loops: n.loops,
            handshake_timeout_secs: n.handshake_timeout.as_secs(),
            tls: TlsSettings::default(),
            access: Vec::new(),
            insecure: false,
        }
    }
}

impl Default for CacheSection {
    fn default() -> Self {
        let o = StoreOptions::default();
        CacheSection {
            map_nodes: o.node_cache_nodes,
            refcount_pages: o.rc_cache_pages,
            dedup_leaves: o.dedup_leaf_cache,
        }
    }
}

impl Default for RingSection {
    fn default() -> Self {
        let f = crate::blkif::features::Features::default();
        RingSection {
            enabled: true,
            max_ring_page_order: f.max_ring_page_order,
            max_queues: f.max_queues,
            max_indirect_segments: f.max_indirect_segments,
        }
    }
}

impl Config {
    /// Parses a configuration. Errors name the line and column.
    pub fn parse(text: &str) -> Result<Config, String> {
        let cfg: Config = ron::Options::default()
            .with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME)
            .from_str(text)
            .map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a configuration file; relative paths in it are relative to its directory.
    pub fn load(path: &std::path::Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut cfg = Config::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let dir = path.parent().unwrap_or(std::path::Path::new(""));
        let tls = &mut cfg.nbd.tls;
        // A rados: store is a name, not a path; the cluster's paths are paths whichever store
        // the command line names.
        cfg.cluster.ceph_conf = dir.join(&cfg.cluster.ceph_conf);
        if let Some(s) = cfg
            .store
            .as_mut()
            .filter(|s| crate::cluster::RadosStore::parse(s).is_none())
        {
            *s = dir.join(&*s);
        }
        for p in [
            &mut cfg.cluster.cache_dir,
            &mut cfg.control_socket,
            &mut cfg.nbd.unix,
            &mut tls.cert,
            &mut tls.key,
            &mut tls.ca,
            &mut tls.psk,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        self.nbd_config()
            .validate()
            .map_err(|e| format!("nbd: {e}"))?;
        self.access_policy()?;
        let plaintext = self.nbd.tls.effective_mode() != TlsMode::Require;
        for a in &self.nbd.listen {
            let addr = a
                .parse::<std::net::SocketAddr>()
                .map_err(|_| format!("nbd.listen: {a:?} is not an address like 127.0.0.1:10809"))?;
            if plaintext && !addr.ip().is_loopback() && !self.nbd.insecure {
                return Err(format!(
                    "nbd.listen: {a} is reachable from other hosts, and without TLS anyone there could read and write every VDI: require TLS (--tls-cert/--tls-key or --tls-psk) or pass --insecure (nbd.insecure)"
                ));
            }
        }
        if let Some(a) = &self.metrics.listen {
            a.parse::<std::net::SocketAddr>().map_err(|_| {
                format!("metrics.listen: {a:?} is not an address like 127.0.0.1:9810")
            })?;
        }
        self.xen.validate()?;
        if self.control.listen.is_some()
            && self.nbd.tls.cert.is_none()
            && self.nbd.tls.psk.is_none()
        {
            return Err(
                "control.listen: the control listener only speaks TLS; give the NBD server credentials (--tls-psk, or --tls-cert and --tls-key)"
                    .into(),
            );
        }
        self.control
            .validate()
            .map_err(|e| format!("control: {e}"))?;
        self.cluster.validate()?;
        if self.commit_interval_ms == 0 {
            return Err("commit_interval_ms must be at least 1".into());
        }
        Ok(())
    }

    /// The NBD access rules, checked.
    pub fn access_policy(&self) -> Result<AccessPolicy, String> {
        AccessPolicy::new(self.nbd.access.clone()).map_err(|e| format!("nbd.{e}"))
    }

    pub fn nbd_config(&self) -> NbdConfig {
        NbdConfig {
            max_connections: self.nbd.max_connections,
            max_request_bytes: self.nbd.max_request_bytes,
            workers: self.nbd.workers,
            loops: self.nbd.loops,
            handshake_timeout: Duration::from_secs(self.nbd.handshake_timeout_secs),
            ..NbdConfig::default()
        }
    }

    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            node_cache_nodes: self.cache.map_nodes,
            rc_cache_pages: self.cache.refcount_pages,
            dedup_leaf_cache: self.cache.dedup_leaves,
            checkpoint_interval: Some(Duration::from_millis(self.commit_interval_ms)),
            ..StoreOptions::default()
        }
    }

    pub fn ring_features(&self) -> crate::blkif::features::Features {
        crate::blkif::features::Features {
            max_ring_page_order: self.rings.max_ring_page_order,
            max_queues: self.rings.max_queues,
            max_indirect_segments: self.rings.max_indirect_segments,
            ..Default::default()
        }
    }

    /// The effective configuration as RON, for `--print-config`.
    pub fn to_ron(&self) -> String {
        // Options written as plain values, as in parallax.ron.
        let pretty = ron::ser::PrettyConfig::default()
            .extensions(ron::extensions::Extensions::IMPLICIT_SOME);
        ron::ser::to_string_pretty(self, pretty).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_partial_configs_take_defaults() {
        assert_eq!(Config::parse("()").unwrap(), Config::default());
        let c = Config::parse(
            r#"(store: "/tmp/s", nbd: (listen: ["0.0.0.0:10810"], unix: None, insecure: true))"#,
        )
        .unwrap();
        assert_eq!(c.store.as_deref(), Some(std::path::Path::new("/tmp/s")));
        assert_eq!(c.nbd.listen, vec!["0.0.0.0:10810"]);
        assert_eq!(c.nbd.unix, None);
        assert_eq!(c.nbd.workers, NbdSection::default().workers);
    }

    #[test]
    fn other_hosts_get_plaintext_nbd_only_when_asked_for() {
        let e = Config::parse(r#"(nbd: (listen: ["0.0.0.0:10810"]))"#).unwrap_err();
        assert!(
            e.contains("reachable from other hosts") && e.contains("--insecure"),
            "{e}"
        );
        let e =
            Config::parse(r#"(nbd: (listen: ["10.1.2.3:10810"], tls: (mode: allow, psk: "k")))"#)
                .unwrap_err();
        assert!(e.contains("reachable from other hosts"), "{e}");
        for ok in [
            r#"(nbd: (listen: ["[::1]:10810", "127.0.0.2:1"]))"#,
            r#"(nbd: (listen: ["0.0.0.0:10810"], tls: (psk: "keys.psk")))"#,
            r#"(nbd: (listen: ["0.0.0.0:10810"], tls: (mode: allow, psk: "k"), insecure: true))"#,
        ] {
            Config::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        let c =
            Config::parse(r#"(nbd: (tls: (cert: "c.pem", key: "k.pem", ca: "ca.pem")))"#).unwrap();
        assert_eq!(c.nbd.tls.effective_mode(), TlsMode::Require);
    }

    #[test]
    fn bad_configs_are_clear_errors() {
        let e = Config::parse("(nbd: (listne: []))").unwrap_err();
        assert!(e.contains("listne"), "{e}");
        let e = Config::parse(r#"(nbd: (listen: ["nonsense"]))"#).unwrap_err();
        assert!(e.contains("nonsense"), "{e}");
        assert!(Config::parse("(commit_interval_ms: 0)").is_err());
        assert!(Config::parse("(").is_err());
    }

    #[test]
    fn the_control_listener_needs_tls_and_named_clients() {
        assert_eq!(Config::default().control.listen, None);
        let e =
            Config::parse(r#"(control: (listen: "127.0.0.1:0", clients: ["psk:a"]))"#).unwrap_err();
        assert!(e.contains("only speaks TLS"), "{e}");
        let tls = r#"nbd: (tls: (psk: "keys.psk"))"#;
        let e = Config::parse(&format!("({tls}, control: (listen: \"127.0.0.1:0\"))")).unwrap_err();
        assert!(e.contains("--control-client"), "{e}");
        let e = Config::parse(&format!(
            "({tls}, control: (listen: \"127.0.0.1:0\", clients: [\"alice\"]))"
        ))
        .unwrap_err();
        assert!(e.contains("\"alice\""), "{e}");
        let c = Config::parse(&format!(
            "({tls}, control: (listen: \"127.0.0.1:0\", clients: [\"psk:src-*\"]))"
        ))
        .unwrap();
        assert_eq!(c.control.clients, ["psk:src-*"]);
        assert_eq!(Config::parse(&c.to_ron()).unwrap(), c);
    }

    #[test]
    fn metrics_are_off_unless_an_address_is_given() {
        assert_eq!(Config::default().metrics.listen, None);
        assert_eq!(Config::parse("(metrics: ())").unwrap().metrics.listen, None);
        let c = Config::parse(r#"(metrics: (listen: "127.0.0.1:9810"))"#).unwrap();
        assert_eq!(c.metrics.listen.as_deref(), Some("127.0.0.1:9810"));
        let c = Config::parse(r#"(metrics: (listen: "[::1]:0"))"#).unwrap();
        assert_eq!(c.metrics.listen.as_deref(), Some("[::1]:0"));
        // Printed, it reads back the same, on or off.
        assert_eq!(Config::parse(&c.to_ron()).unwrap(), c);
        assert!(c.to_ron().contains("[::1]:0"), "{}", c.to_ron());
        assert!(Config::default().to_ron().contains("metrics"));
    }

    #[test]
    fn bad_metrics_addresses_name_the_field() {
        for bad in [
            r#"(metrics: (listen: "localhost"))"#,
            r#"(metrics: (listen: "9810"))"#,
            r#"(metrics: (listen: ""))"#,
        ] {
            let e = Config::parse(bad).unwrap_err();
            assert!(e.starts_with("metrics.listen: "), "{bad}: {e}");
            assert!(!e.contains('\n'), "{bad}: {e}");
        }
        let e = Config::parse("(metrics: (port: 9810))").unwrap_err();
        assert!(e.contains("port"), "{e}");
    }

    #[test]
    fn the_example_in_the_repository_parses() {
        let text = include_str!("../../../parallax.ron");
        Config::parse(text).unwrap();
    }

    #[test]
    fn relative_paths_are_relative_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("serve.ron");
        std::fs::write(
            &file,
            r#"(store: "s.px", control_socket: "/run/c.sock", nbd: (unix: "sub/nbd.sock"))"#,
        )
        .unwrap();
        let c = Config::load(&file).unwrap();
        assert_eq!(c.store, Some(dir.path().join("s.px")));
        assert_eq!(c.control_socket, Some(PathBuf::from("/run/c.sock")));
        assert_eq!(c.nbd.unix, Some(dir.path().join("sub/nbd.sock")));
    }

    #[test]
    fn a_rados_store_is_a_name_and_the_cluster_paths_are_relative_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("serve.ron");
        for (store, want) in [
            ("rados:vms/rack1", PathBuf::from("rados:vms/rack1")),
            // The cluster's paths count even when the command line names the rados: store.
            ("s.px", dir.path().join("s.px")),
        ] {
            std::fs::write(
                &file,
                format!(r#"(store: "{store}", cluster: (ceph_conf: "ceph.conf", cache_dir: "c"))"#),
            )
            .unwrap();
            let c = Config::load(&file).unwrap();
            assert_eq!(c.store, Some(want));
            assert_eq!(c.cluster.ceph_conf, dir.path().join("ceph.conf"));
            assert_eq!(c.cluster.cache_dir, Some(dir.path().join("c")));
        }
    }

    #[test]
    fn printed_config_reads_back() {
        let c = Config::default();
        assert_eq!(Config::parse(&c.to_ron()).unwrap(), c);
    }
}
