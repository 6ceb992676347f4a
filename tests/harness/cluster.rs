//! A throwaway real Ceph (1 mon + N memstore OSDs, cephx on) and a single etcd member for a
//! test, started by `scripts/cluster.sh` in a fresh temporary directory and stopped (SIGKILL,
//! data thrown away) when the [`Cluster`] is dropped. Every cluster listens on ports of its own,
//! so tests that run at the same time (nextest runs each in a process of its own) do not clash.
//! `scripts/deps.sh base` installs the packages.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

/// `scripts/cluster.sh` of this checkout.
pub fn cluster_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/cluster.sh")
}

/// A running cluster. Killed, and its directory removed, on drop.
pub struct Cluster {
    dir: tempfile::TempDir,
    /// The client configuration (`rados -c`, `rados_conf_read_file`); it names the keyring.
    pub ceph_conf: PathBuf,
    /// A replicated pool (size = number of OSDs, min_size 2 from 3 OSDs on) for the tests.
    pub pool: String,
    /// etcd's client endpoint(s), comma-separated (`http://127.0.0.1:PORT`).
    pub etcd: String,
    /// etcd's directory (its data is under `data/`).
    pub etcd_dir: PathBuf,
    /// The OSD ids, `0..osds`.
    pub osd_ids: Vec<u32>,
    /// Every `KEY=value` line of `DIR/env` (CEPH_CONF, CEPH_KEYRING, PX_POOL, PX_OSD_IDS,
    /// PX_OSD_COUNT, PX_MON_ADDR, ETCD_ENDPOINTS, ETCD_DIR, ETCD_DATA_DIR, ETCD_CLIENT_PORT,
    /// ETCD_PEER_PORT).
    pub env: BTreeMap<String, String>,
}

/// Runs `scripts/cluster.sh ARGS` and returns its output.
fn script(args: &[&str], dir: &Path) -> Output {
    let script = cluster_script();
    Command::new("bash")
        .arg(&script)
        .arg(args[0])
        .arg(dir)
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()))
}

/// Panics with the script's output unless it succeeded.
fn check(what: &str, o: &Output) {
    assert!(
        o.status.success(),
        "scripts/cluster.sh {what} failed ({}):\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

impl Cluster {
    /// Starts a mon, `osds` OSDs (1 to 3) and etcd, and returns once the pool takes a RADOS
    /// write and etcd is healthy (a couple of seconds). Panics with the script's output if not.
    pub fn start(osds: usize) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("px-cluster-")
            .tempdir()
            .expect("creating the cluster directory");
        let o = script(&["start", "--osds", &osds.to_string()], dir.path());
        if !o.status.success() {
            // The script has killed its daemons already; keep its logs for the panic message.
            let log = std::fs::read_to_string(dir.path().join("log/start.log")).unwrap_or_default();
            panic!(
                "scripts/cluster.sh start --osds {osds} failed ({}):\n{}{}\nsteps:\n{log}",
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let text = std::fs::read_to_string(dir.path().join("env")).expect("reading DIR/env");
        let env: BTreeMap<String, String> = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let get = |k: &str| -> String {
            env.get(k)
                .cloned()
                .unwrap_or_else(|| panic!("{k} is missing from DIR/env:\n{text}"))
        };
        let osd_ids = get("PX_OSD_IDS")
            .split(',')
            .map(|id| id.parse().expect("an OSD id"))
            .collect();
        Cluster {
            ceph_conf: get("CEPH_CONF").into(),
            pool: get("PX_POOL"),
            etcd: get("ETCD_ENDPOINTS"),
            etcd_dir: get("ETCD_DIR").into(),
            osd_ids,
            env,
            dir,
        }
    }

    /// The cluster's directory (configuration, `pids`, `env`, `log/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The running daemons as (name, pid): `mon.a`, `osd.N`, `etcd`.
    pub fn pids(&self) -> Vec<(String, u32)> {
        std::fs::read_to_string(self.dir().join("pids"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (name, pid) = l.split_once(' ')?;
                Some((name.to_string(), pid.trim().parse().ok()?))
            })
            .collect()
    }

    /// A `rados` command for the test pool: `rados -c CONF -p POOL`; add the operation.
    pub fn rados(&self) -> Command {
        let mut c = Command::new("rados");
        c.arg("-c").arg(&self.ceph_conf).arg("-p").arg(&self.pool);
        c.stdin(Stdio::null());
        c
    }

    /// An `etcdctl` (v3 API) command for this cluster's etcd; add the operation.
    pub fn etcdctl(&self) -> Command {
        let mut c = Command::new("etcdctl");
        c.env("ETCDCTL_API", "3").arg("--endpoints").arg(&self.etcd);
        c.stdin(Stdio::null());
        c
    }

    /// SIGKILLs OSD `id` and waits until it is gone. Its peers see refused connections and the
    /// mon marks it down within a second; the pool keeps serving while at least min_size OSDs
    /// of each PG are up. With a single OSD nobody notices and I/O hangs.
    pub fn kill_osd(&self, id: u32) {
        check(
            "kill-osd",
            &script(&["kill-osd", &id.to_string()], self.dir()),
        );
    }

    /// SIGKILLs etcd and waits until it is gone.
    pub fn stop_etcd(&self) {
        check("stop-etcd", &script(&["stop-etcd"], self.dir()));
    }

    /// Starts etcd again on the same port and data, and waits until it is healthy.
    pub fn start_etcd(&self) {
        check("start-etcd", &script(&["start-etcd"], self.dir()));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let o = script(&["stop"], self.dir());
        if !o.status.success() {
            eprintln!(
                "scripts/cluster.sh stop {} failed: {}",
                self.dir().display(),
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
}

/// Processes (pid, command line) whose command line mentions `path`: the daemons of a cluster
/// in that directory carry it in `-c DIR/ceph.conf` or `--data-dir DIR/etcd/data`.
pub fn processes_mentioning(path: &Path) -> Vec<(u32, String)> {
    let needle = path.to_string_lossy().into_owned();
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
            (pid != me && cmd.contains(&needle)).then_some((pid, cmd.trim_end().to_string()))
        })
        .collect()
}
