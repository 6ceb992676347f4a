//! Xen without a hypervisor, for tests: Debian's real C xenstored (xen-utils-4.17) with an
//! `LD_PRELOAD` stub of its hypervisor calls (`tests/xenstored-stub/stub.c`, compiled here
//! with gcc), plus the two other parties of a vbd's life: the toolstack (writes the backend
//! and frontend directories the way libxl does, with permissions) and the guest (blkfront's
//! xenbus handshake, with `frontend-shim`'s rings over the local grant/event transport).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context};
use frontend_shim::{Frontend, FrontendConfig};
use parallax::{
    blkif::{
        event::StopSignal,
        features::Features,
        local::{LocalGrantTable, MAX_TABLE_PAGES},
    },
    xen::{
        wire::{Access, Perm},
        LocalDomains, XenStore, XsConn,
    },
};

/// The xenstored binary (override with `PARALLAX_XENSTORED`).
pub fn xenstored_bin() -> PathBuf {
    std::env::var_os("PARALLAX_XENSTORED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/xen-4.17/bin/xenstored"))
}

/// A running xenstored in a temporary directory. Killed on drop.
///
/// One at a time per process: tests that run as threads of one process (`cargo test`) take
/// turns (nextest runs each test in a process of its own, so they run side by side there).
pub struct Xenstored {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
    _turn: std::sync::MutexGuard<'static, ()>,
}

static ONE_PER_PROCESS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Compiles the stub library into `dir`.
fn build_stub(dir: &Path) -> anyhow::Result<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("xenstored-stub/stub.c");
    let out = dir.join("xenstored-stub.so");
    let o = Command::new("gcc")
        .args([
            "-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-Werror", "-o",
        ])
        .arg(&out)
        .arg(&src)
        .arg("-ldl")
        .output()
        .context("running gcc (scripts/deps.sh installs it)")?;
    if !o.status.success() {
        bail!(
            "compiling {}: {}",
            src.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(out)
}

impl Xenstored {
    /// Starts xenstored and waits until it answers on its socket.
    pub fn start() -> anyhow::Result<Xenstored> {
        let bin = xenstored_bin();
        if !bin.exists() {
            bail!(
                "{} is missing: install xen-utils-4.17 (scripts/deps.sh base does)",
                bin.display()
            );
        }
        let turn = ONE_PER_PROCESS.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir()?;
        let stub = build_stub(dir.path())?;
        let rundir = dir.path().join("run");
        std::fs::create_dir(&rundir)?;
        let log = std::fs::File::create(dir.path().join("xenstored.log"))?;
        let child = Command::new(&bin)
            .args(["--no-fork", "-T"])
            .arg(dir.path().join("trace"))
            .env("LD_PRELOAD", &stub)
            .env("XENSTORED_RUNDIR", &rundir)
            // xenstored takes its socket path from XENSTORED_PATH when set, as clients do.
            .env("XENSTORED_PATH", rundir.join("socket"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut x = Xenstored {
            child,
            socket: rundir.join("socket"),
            dir,
            _turn: turn,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = x.child.try_wait()? {
                bail!("xenstored exited ({st}): {}", x.log());
            }
            if x.socket.exists() {
                if let Ok(c) = XsConn::connect(&x.socket) {
                    if c.directory("/").is_ok() {
                        return Ok(x);
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("xenstored's socket did not come up: {}", x.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The socket clients use (`XENSTORED_PATH`).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A new client connection.
    pub fn conn(&self) -> XsConn {
        XsConn::connect(&self.socket).expect("connecting to the test xenstored")
    }

    /// xenstored's own output.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("xenstored.log")).unwrap_or_default()
    }

    /// Starts an in-process daemon whose xenstore connection is this xenstored. The daemon
    /// finds xenstored like every Xen client, through `XENSTORED_PATH` (one xenstored per
    /// process at a time, so setting it is safe).
    pub fn start_daemon(
        &self,
        cfg: parallax::daemon::config::Config,
    ) -> anyhow::Result<parallax::daemon::serve::Daemon> {
        std::env::set_var("XENSTORED_PATH", &self.socket);
        parallax::daemon::serve::Daemon::start(cfg)
    }

    /// Whether xenstored still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Xenstored {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A vbd as the toolstack describes it.
#[derive(Debug, Clone)]
pub struct VbdSpec {
    /// `vbd` (Xen 4.17, `script=`) or `vbd3` (4.19+ `backendtype=tap`).
    pub kind: &'static str,
    pub backend_domid: u32,
    pub domid: u32,
    pub devid: u32,
    /// The disk's `target` (what libxl writes to `params`).
    pub params: String,
    pub script: String,
    /// `w` or `r`.
    pub mode: &'static str,
}

impl VbdSpec {
    pub fn new(domid: u32, devid: u32, params: &str) -> VbdSpec {
        VbdSpec {
            kind: "vbd",
            backend_domid: 0,
            domid,
            devid,
            params: params.to_string(),
            script: "/etc/xen/scripts/block-parallax".into(),
            mode: "w",
        }
    }

    pub fn backend(&self) -> String {
        format!(
            "/local/domain/{}/backend/{}/{}/{}",
            self.backend_domid, self.kind, self.domid, self.devid
        )
    }

    pub fn frontend(&self) -> String {
        format!("/local/domain/{}/device/vbd/{}", self.domid, self.devid)
    }
}

/// The toolstack's side: libxl's `libxl__device_generic_add` for a disk, in one transaction
/// (frontend dir owned by the guest and readable by the backend, backend dir owned by the
/// backend and readable by the guest).
pub fn libxl_add(xs: &XsConn, spec: &VbdSpec) -> anyhow::Result<()> {
    let (be, fe) = (spec.backend(), spec.frontend());
    let dev = spec.devid.to_string();
    let params = if spec.kind == "vbd3" {
        format!("raw:{}", spec.params)
    } else {
        spec.params.clone()
    };
    xs.in_transaction(|t| {
        t.rm(&fe)?;
        t.rm(&be)?;
        t.mkdir(&fe)?;
        t.set_perms(
            &fe,
            &[
                Perm::new(Access::None, spec.domid),
                Perm::new(Access::Read, spec.backend_domid),
            ],
        )?;
        t.mkdir(&be)?;
        t.set_perms(
            &be,
            &[
                Perm::new(Access::None, spec.backend_domid),
                Perm::new(Access::Read, spec.domid),
            ],
        )?;
        for (k, v) in [
            ("frontend", fe.as_str()),
            ("params", params.as_str()),
            ("script", spec.script.as_str()),
            ("frontend-id", &spec.domid.to_string()),
            ("online", "1"),
            ("removable", "0"),
            ("bootable", "1"),
            ("state", "1"),
            ("dev", "xvda"),
            ("type", if spec.kind == "vbd3" { "vbd3" } else { "phy" }),
            ("mode", spec.mode),
            ("device-type", "disk"),
            ("discard-enable", "1"),
        ] {
            t.write(&format!("{be}/{k}"), v)?;
        }
        for (k, v) in [
            ("backend", be.as_str()),
            ("backend-id", &spec.backend_domid.to_string()),
            ("state", "1"),
            ("virtual-device", dev.as_str()),
            ("device-type", "disk"),
        ] {
            t.write(&format!("{fe}/{k}"), v)?;
        }
        Ok(())
    })?;
    Ok(())
}

/// libxl's removal request: `online=0`, backend `state=5`.
pub fn libxl_request_remove(xs: &XsConn, spec: &VbdSpec) -> anyhow::Result<()> {
    let be = spec.backend();
    xs.in_transaction(|t| {
        t.write(&format!("{be}/online"), "0")?;
        t.write(&format!("{be}/state"), "5")
    })?;
    Ok(())
}

/// libxl's last step: both directories go.
pub fn libxl_destroy(xs: &XsConn, spec: &VbdSpec) -> anyhow::Result<()> {
    xs.rm(&spec.backend())?;
    xs.rm(&spec.frontend())?;
    Ok(())
}

/// Waits (with a watch) until `path` has one of `want`; returns it, or an error naming what
/// it has.
pub fn wait_node(
    xs: &XsConn,
    path: &str,
    want: &[&str],
    timeout: Duration,
) -> anyhow::Result<String> {
    let token = format!("wait:{path}");
    xs.watch(path, &token)?;
    let deadline = Instant::now() + timeout;
    let r = loop {
        let v = xs.read(path)?;
        if let Some(v) = &v {
            if want.contains(&v.as_str()) {
                break Ok(v.clone());
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break Err(anyhow!(
                "{path} is {v:?} after {timeout:?}, waiting for {want:?}"
            ));
        }
        xs.next_event(Some(left.min(Duration::from_millis(200))))?;
    };
    let _ = xs.unwatch(path, &token);
    r
}

/// The guest: blkfront's xenbus handshake over xenstore, rings from `frontend-shim` over the
/// local transport (the grant table and event channels are registered in the daemon's
/// [`LocalDomains`], standing in for the hypervisor).
pub struct XenGuest {
    pub xs: XsConn,
    local: LocalDomains,
    pub spec: VbdSpec,
    /// Signalled when the guest stops talking to the backend (queues see "backend gone").
    gone: StopSignal,
}

/// How long a handshake step may take.
pub const STEP: Duration = Duration::from_secs(10);

impl XenGuest {
    pub fn new(xenstored: &Xenstored, local: LocalDomains, spec: VbdSpec) -> XenGuest {
        XenGuest {
            xs: xenstored.conn(),
            local,
            spec,
            gone: StopSignal::new().expect("eventfd"),
        }
    }

    fn fe(&self, k: &str) -> String {
        format!("{}/{k}", self.spec.frontend())
    }

    fn be(&self, k: &str) -> String {
        format!("{}/{k}", self.spec.backend())
    }

    /// The backend's state node.
    pub fn backend_state(&self) -> Option<String> {
        self.xs.read(&self.be("state")).unwrap()
    }

    pub fn wait_backend(&self, want: &[&str]) -> anyhow::Result<String> {
        wait_node(&self.xs, &self.be("state"), want, STEP)
    }

    pub fn set_state(&self, s: &str) -> anyhow::Result<()> {
        self.xs.write(&self.fe("state"), s)?;
        Ok(())
    }

    /// What the backend offers (its feature nodes).
    pub fn backend_features(&self) -> anyhow::Result<Features> {
        let num = |k: &str| -> anyhow::Result<u32> {
            Ok(self
                .xs
                .read(&self.be(k))?
                .and_then(|v| v.parse().ok())
                .unwrap_or(0))
        };
        Ok(Features {
            max_ring_page_order: num("max-ring-page-order")?,
            max_queues: num("multi-queue-max-queues")?.max(1),
            max_indirect_segments: num("feature-max-indirect-segments")?,
            flush: num("feature-flush-cache")? == 1,
            barrier: num("feature-barrier")? == 1,
            discard: num("feature-discard")? == 1,
            discard_granularity: num("discard-granularity")?,
            persistent: num("feature-persistent")? == 1,
            ..Features::default()
        })
    }

    /// blkfront's connect: waits for InitWait, sets up rings for what the backend offers,
    /// publishes them (one transaction, like `talk_to_blkback`), waits for Connected.
    pub fn connect(&self, cfg: &FrontendConfig) -> anyhow::Result<Frontend> {
        self.wait_backend(&["2"])?;
        let features = self.backend_features()?;
        let (mut front, rings) = Frontend::external(&features, cfg, Arc::new(self.gone.clone()))?;
        let back = LocalGrantTable::open(rings.table.fd().try_clone_to_owned()?, MAX_TABLE_PAGES)?;
        self.local.set_grant_table(self.spec.domid, Arc::new(back));
        let mut nodes: Vec<(String, String)> = Vec::new();
        let nq = rings.queues.len();
        if rings.ring_order > 0 {
            nodes.push(("ring-page-order".into(), rings.ring_order.to_string()));
        }
        if nq > 1 {
            nodes.push(("multi-queue-num-queues".into(), nq.to_string()));
        }
        for (q, (refs, back_event)) in rings.queues.into_iter().enumerate() {
            let dir = if nq > 1 {
                format!("queue-{q}/")
            } else {
                String::new()
            };
            let port = self.local.alloc_port(self.spec.domid, back_event);
            if rings.ring_order == 0 {
                nodes.push((format!("{dir}ring-ref"), refs[0].to_string()));
            } else {
                for (i, r) in refs.iter().enumerate() {
                    nodes.push((format!("{dir}ring-ref{i}"), r.to_string()));
                }
            }
            nodes.push((format!("{dir}event-channel"), port.to_string()));
        }
        nodes.push(("protocol".into(), "x86_64-abi".into()));
        if cfg.persistent && features.persistent {
            // The frontend's slots keep their grants (frontend-shim never changes them).
            nodes.push(("feature-persistent".into(), "1".into()));
        }
        self.publish(&nodes)?;
        self.wait_backend(&["4"])?;
        let sectors: u64 = self
            .xs
            .read(&self.be("sectors"))?
            .ok_or_else(|| anyhow!("backend wrote no sectors"))?
            .parse()?;
        let info: u32 = self
            .xs
            .read(&self.be("info"))?
            .unwrap_or_default()
            .parse()
            .unwrap_or(0);
        front.set_disk(sectors * 512, info & 4 != 0);
        self.set_state("4")?;
        Ok(front)
    }

    /// Writes `nodes` (frontend-relative) and `state = 3` in one transaction, clearing the
    /// ring nodes of an earlier connection first.
    pub fn publish(&self, nodes: &[(String, String)]) -> anyhow::Result<()> {
        let fe = self.spec.frontend();
        self.xs.in_transaction(|t| {
            for old in t.directory(&fe)? {
                if old.starts_with("ring-ref")
                    || old.starts_with("queue-")
                    || matches!(
                        old.as_str(),
                        "event-channel"
                            | "protocol"
                            | "ring-page-order"
                            | "multi-queue-num-queues"
                            | "feature-persistent"
                    )
                {
                    t.rm(&format!("{fe}/{old}"))?;
                }
            }
            for (k, v) in nodes {
                t.write(&format!("{fe}/{k}"), v)?;
            }
            t.write(&format!("{fe}/state"), "3")
        })?;
        Ok(())
    }

    /// blkfront's close: Closing, wait for the backend to follow, Closed.
    pub fn close(&self, front: Frontend) -> anyhow::Result<()> {
        self.set_state("5")?;
        self.wait_backend(&["5", "6"])?;
        drop(front);
        self.set_state("6")?;
        Ok(())
    }

    /// A restarted frontend: Initialising, and the backend offers InitWait again.
    pub fn restart(&self) -> anyhow::Result<()> {
        self.set_state("1")?;
        self.wait_backend(&["2"])?;
        Ok(())
    }
}
