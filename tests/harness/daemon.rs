//! Helpers for driving the real `parallax` binary: a temporary store ([`TestStore`]) that runs
//! CLI commands on it, a running `parallax serve` ([`Daemon`]) that is stopped when dropped, and
//! a small non-panicking NBD client ([`NbdConn`]) for load generators that must survive the
//! daemon being killed under them.
//!
//! The binary is `PARALLAX_BIN` if set, else the `parallax` next to the test executable's
//! profile directory (`<target>/debug/parallax`), else `<CARGO_TARGET_DIR or
//! workspace/target>/debug/parallax`. `make test` builds it first; `cargo nextest run
//! --workspace --all-targets` does too.

use std::{
    io::{self, BufRead, BufReader, Read},
    net::SocketAddr,
    os::{
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr as UnixAddr, UnixStream},
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{mpsc, Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use parallax::nbd::proto::{RequestHeader, CMD_FLAG_FUA, CMD_FLUSH, CMD_READ, CMD_WRITE};
use serde_json::Value;

use crate::nbd::RawClient;

/// The line `parallax serve` prints on stdout once it accepts connections.
pub const READY_PREFIX: &str = "parallax serve: ready;";

/// How long a daemon may take to start, or to exit after SIGTERM.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(60);

/// The `parallax` binary under test.
pub fn parallax_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PARALLAX_BIN").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "PARALLAX_BIN={} does not exist", p.display());
        return p;
    }
    let mut candidates = Vec::new();
    // <target>/debug/deps/<test>-<hash> → <target>/debug/parallax
    if let Ok(exe) = std::env::current_exe() {
        if let Some(profile) = exe.parent().and_then(Path::parent) {
            candidates.push(profile.join("parallax"));
        }
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    candidates.push(target.join("debug/parallax"));
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "the parallax binary is missing (looked at {candidates:?}); build it with \
                 `cargo build -p parallax` or set PARALLAX_BIN"
            )
        })
}

/// A `parallax` command with a clean environment: no store, control socket or log settings
/// inherited from whoever runs the tests.
pub fn parallax() -> Command {
    let mut c = Command::new(parallax_bin());
    c.env_remove("PARALLAX_STORE")
        .env_remove("PARALLAX_CONTROL")
        .env_remove("PARALLAX_CONNECT")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    c
}

/// What a failed command left: its exit code and stderr.
#[derive(Debug)]
pub struct Failure {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Failure {
    /// Asserts the CLI's error convention: exit status `code`, one line on stderr that starts
    /// with `parallax: error:` and contains `needle`.
    pub fn assert_one_line(&self, code: i32, needle: &str) {
        assert_eq!(self.code, Some(code), "{self:?}");
        let msg = self.stderr.trim_end();
        assert!(
            !msg.contains('\n') && msg.starts_with("parallax: error: "),
            "expected one error line, got: {:?}",
            self.stderr
        );
        assert!(msg.contains(needle), "expected {needle:?} in {msg:?}");
    }
}

/// Runs `cmd`, panicking with its output unless it succeeded.
pub fn output_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `cmd`, panicking unless it failed.
pub fn output_fail(cmd: &mut Command) -> Failure {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let f = Failure {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        !out.status.success(),
        "{cmd:?} unexpectedly succeeded: {f:?}"
    );
    f
}

/// A store file in a temporary directory, made with `parallax init` (or, with `args` and
/// `env` naming a cluster, a `rados:` store; the directory then holds only scratch files).
pub struct TestStore {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    /// Given to every command after `--store PATH`.
    pub args: Vec<String>,
    /// Set for every command.
    pub env: Vec<(String, String)>,
}

impl TestStore {
    /// `parallax --store DIR/test.store init --size SIZE`.
    pub fn new(size: &str) -> TestStore {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("test.store");
        let s = TestStore {
            dir,
            path,
            args: Vec::new(),
            env: Vec::new(),
        };
        s.run(&["init", "--size", size]);
        s
    }

    /// A store unpacked from a gzip-compressed image in `tests/fixtures/`.
    pub fn from_fixture(name: &str) -> TestStore {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("test.store");
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join(name);
        let out = Command::new("gzip")
            .arg("-dc")
            .arg(&src)
            .output()
            .expect("run gzip");
        assert!(out.status.success(), "gzip -dc {}", src.display());
        std::fs::write(&path, out.stdout).expect("write the store");
        TestStore {
            dir,
            path,
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// A path for a scratch file next to the store.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `parallax --store PATH ARGS…`, not yet run.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = parallax();
        c.arg("--store")
            .arg(&self.path)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(args);
        c
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn run(&self, args: &[&str]) -> String {
        String::from_utf8(output_ok(&mut self.cmd(args)).stdout).expect("utf-8 stdout")
    }

    /// Runs a command with `--json` output and parses it.
    pub fn json(&self, args: &[&str]) -> Value {
        let out = self.run(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: bad JSON ({e}): {out}"))
    }

    /// The names `vdi list` shows (VDIs and snapshots), in its order.
    pub fn names(&self) -> Vec<String> {
        self.json(&["vdi", "list", "--json"])
            .as_array()
            .expect("vdi list --json gives an array")
            .iter()
            .map(|v| v["name"].as_str().expect("a name").to_string())
            .collect()
    }

    /// Runs a command that must fail.
    pub fn fail(&self, args: &[&str]) -> Failure {
        output_fail(&mut self.cmd(args))
    }

    /// `check --json`: asserts exit status 0 and `"ok": true`; returns the report.
    pub fn assert_clean(&self) -> Value {
        let out = self
            .cmd(&["check", "--json"])
            .output()
            .expect("run parallax check");
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "check --json: bad JSON ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert!(
            out.status.success() && report["ok"] == true,
            "check failed ({}): {report:#}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(report["errors_total"], 0, "{report:#}");
        report
    }

    /// `vdi import NAME FILE` of `data` (written to a scratch file first).
    pub fn import(&self, name: &str, data: &[u8]) {
        let f = self.file(&format!("{name}.import"));
        std::fs::write(&f, data).expect("write image");
        self.run(&["vdi", "import", name, f.to_str().unwrap()]);
        std::fs::remove_file(&f).expect("remove image");
    }

    /// `vdi export NAME FILE`; returns the path of the exported file.
    pub fn export_file(&self, name: &str) -> PathBuf {
        let f = self.file(&format!("{}.export", name.replace('@', "_")));
        let _ = std::fs::remove_file(&f);
        self.run(&["vdi", "export", name, f.to_str().unwrap()]);
        f
    }

    /// The contents of VDI or snapshot `name`, through `vdi export`.
    pub fn export(&self, name: &str) -> Vec<u8> {
        let f = self.export_file(name);
        let data = std::fs::read(&f).expect("read export");
        std::fs::remove_file(&f).expect("remove export");
        data
    }
}

/// A running `parallax serve` on a [`TestStore`], on an ephemeral TCP port and a unix socket in
/// the store's directory. Dropping it sends SIGTERM, then SIGKILL if it does not exit in time;
/// if the test is panicking, the daemon's stderr is printed.
pub struct Daemon {
    child: Child,
    pub addr: SocketAddr,
    pub unix: PathBuf,
    /// The control socket as the daemon printed it (`@name` for an abstract socket).
    pub control: String,
    /// The metrics endpoint, when the config turned it on.
    pub metrics: Option<SocketAddr>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
}

/// A Parallax host serving `tmpl` (holding `img`) and its snapshot `tmpl@v1` over TLS only,
/// with a PSK for `alice` in its `keys.psk`.
pub fn tls_source_host(img: &[u8]) -> (TestStore, Daemon) {
    let src = TestStore::new("256M");
    src.import("tmpl", img);
    src.run(&["vdi", "snapshot", "tmpl@v1"]);
    crate::nbd::run_ok(
        Command::new("psktool")
            .args(["-u", "alice", "-p"])
            .arg(src.file("keys.psk")),
    );
    let d = Daemon::start_with(
        &src,
        r#"(commit_interval_ms: 500, nbd: (workers: 2, tls: (psk: "keys.psk")))"#,
        &[],
    );
    (src, d)
}

/// qemu-nbd serving a raw file read-only as export `base` on a unix socket, until dropped.
pub struct QemuNbd(std::process::Child);

impl QemuNbd {
    pub fn start(raw: &Path, sock: &Path) -> QemuNbd {
        let _ = std::fs::remove_file(sock);
        let q = Command::new("qemu-nbd")
            .args(["-f", "raw", "-x", "base", "--persistent", "-r", "-k"])
            .arg(sock)
            .arg(raw)
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-nbd");
        for _ in 0..100 {
            if sock.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        QemuNbd(q)
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The config file `Daemon::start` uses: commit often, so tests see periodic commits too.
pub const DEFAULT_CONFIG: &str = "(commit_interval_ms: 500, nbd: (workers: 4))";

impl Daemon {
    /// Starts `parallax serve` with [`DEFAULT_CONFIG`].
    pub fn start(store: &TestStore) -> Daemon {
        Self::start_with(store, DEFAULT_CONFIG, &[])
    }

    /// Starts `parallax serve --config FILE` where FILE holds `config` (RON), with extra
    /// environment variables, and waits for its ready line.
    pub fn start_with(store: &TestStore, config: &str, env: &[(&str, &str)]) -> Daemon {
        let cfg = store.file("serve.ron");
        std::fs::write(&cfg, config).expect("write config");
        let unix = store.file("nbd.sock");
        let mut cmd = store.cmd(&["serve", "--listen", "127.0.0.1:0", "--config"]);
        cmd.arg(&cfg)
            .arg("--unix")
            .arg(&unix)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn parallax serve");

        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut err_pipe = child.stderr.take().expect("stderr pipe");
        let sink = stderr.clone();
        let err_reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let out_pipe = child.stdout.take().expect("stdout pipe");
        let (tx, rx) = mpsc::channel();
        let out_reader = std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(out_pipe).lines() {
                let Ok(line) = line else { break };
                if line.starts_with(READY_PREFIX) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(line);
                    }
                }
            }
        });
        let mut d = Daemon {
            child,
            addr: "127.0.0.1:0".parse().unwrap(),
            unix,
            control: String::new(),
            metrics: None,
            stderr,
            readers: vec![err_reader, out_reader],
        };
        let line = match rx.recv_timeout(DAEMON_TIMEOUT) {
            Ok(l) => l,
            Err(_) => {
                let status = d.child.try_wait().ok().flatten();
                d.kill_now();
                panic!(
                    "parallax serve did not get ready (exit status {status:?}); stderr:\n{}",
                    d.stderr()
                );
            }
        };
        let (addr, control, metrics) = parse_ready(&line);
        d.addr = addr;
        d.control = control;
        d.metrics = metrics;
        d
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `nbd://ADDR/EXPORT`
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.addr, export)
    }

    /// `nbd+unix:///EXPORT?socket=PATH`
    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{}?socket={}", export, self.unix.display())
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Waits until the daemon's stderr contains `needle` (up to 30 s); false if it never does.
    pub fn wait_stderr(&self, needle: &str) -> bool {
        let until = Instant::now() + Duration::from_secs(30);
        while !self.stderr().contains(needle) {
            if Instant::now() > until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Connects to the control socket.
    pub fn connect_control(&self) -> UnixStream {
        let addr = match self.control.strip_prefix('@') {
            Some(name) => UnixAddr::from_abstract_name(name.as_bytes()),
            None => UnixAddr::from_pathname(&self.control),
        }
        .expect("control address");
        UnixStream::connect_addr(&addr).expect("connect to the control socket")
    }

    /// An NBD connection to `export` (writable unless it is a snapshot).
    pub fn nbd(&self, export: &str) -> NbdConn {
        NbdConn::connect(self.port(), export)
    }

    /// Sends SIGTERM (std only sends SIGKILL, with `Child::kill`).
    fn sigterm(&self) {
        let st = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -TERM {} failed", self.child.id());
    }

    fn wait_timeout(&mut self, limit: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().expect("wait for parallax serve") {
                return Some(st);
            }
            if Instant::now() > until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn finish_readers(&mut self) {
        for t in self.readers.drain(..) {
            let _ = t.join();
        }
    }

    fn kill_now(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.finish_readers();
    }

    /// Sends SIGTERM and waits for the exit; returns the status and the daemon's stderr.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        self.sigterm();
        let Some(st) = self.wait_timeout(DAEMON_TIMEOUT) else {
            self.kill_now();
            panic!(
                "parallax serve did not exit after SIGTERM; stderr:\n{}",
                self.stderr()
            );
        };
        self.finish_readers();
        (st, self.stderr())
    }

    /// Waits up to `limit` for the daemon to exit by itself: its status and stderr, or (if
    /// it did not, and was killed) its stderr as the error.
    pub fn wait_exit(mut self, limit: Duration) -> Result<(ExitStatus, String), String> {
        let st = self.wait_timeout(limit);
        if st.is_none() {
            self.kill_now();
        }
        self.finish_readers();
        st.map(|st| (st, self.stderr()))
            .ok_or_else(|| self.stderr())
    }

    /// SIGTERM, and asserts a clean exit (status 0).
    pub fn stop(self) {
        let (st, err) = self.terminate();
        assert!(
            st.success(),
            "parallax serve exited with {st}; stderr:\n{err}"
        );
    }

    /// `kill -9`; returns the daemon's stderr.
    pub fn kill9(mut self) -> String {
        self.child.kill().expect("kill -9 parallax serve");
        let _ = self.child.wait();
        self.finish_readers();
        self.stderr()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.alive() {
            self.sigterm();
            if self.wait_timeout(Duration::from_secs(10)).is_none() {
                self.kill_now();
            }
        }
        self.finish_readers();
        if std::thread::panicking() {
            eprintln!("--- parallax serve stderr ---\n{}", self.stderr());
        }
    }
}

/// Parses `parallax serve: ready; NBD on ADDR[, ADDR…][ and unix:PATH]; [metrics on
/// http://ADDR/metrics; ]control socket CTL`.
fn parse_ready(line: &str) -> (SocketAddr, String, Option<SocketAddr>) {
    let after = |key: &str| -> &str {
        line.split(key)
            .nth(1)
            .unwrap_or_else(|| panic!("no {key:?} in the ready line: {line}"))
    };
    let addr = after("NBD on ")
        .split([',', ' ', ';'])
        .next()
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .unwrap_or_else(|| panic!("no TCP address in the ready line: {line}"));
    let metrics = line.split("metrics on http://").nth(1).map(|rest| {
        rest.split('/')
            .next()
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .unwrap_or_else(|| panic!("no metrics address in the ready line: {line}"))
    });
    (addr, after("control socket ").trim().to_string(), metrics)
}

/// `GET PATH` on the daemon's metrics endpoint over plain TCP: the status line, the headers
/// and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> (String, String, String) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text)
        .expect("read the metrics response");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_string(), body.to_string())
}

/// A minimal NBD client (simple replies, one request at a time) whose calls return errors
/// instead of panicking, for loads that outlive the server.
pub struct NbdConn {
    raw: RawClient,
    handle: u64,
    pub size: u64,
}

impl NbdConn {
    /// Connects over TCP and negotiates `export` (panics if that fails).
    pub fn connect(port: u16, export: &str) -> NbdConn {
        let mut raw = RawClient::start(port);
        let (size, _flags) = raw.go(export, false, false);
        NbdConn {
            raw,
            handle: 0,
            size,
        }
    }

    fn next_handle(&mut self) -> u64 {
        self.handle += 1;
        self.handle
    }

    fn send(&mut self, kind: u16, offset: u64, len: u32, data: &[u8]) -> io::Result<u64> {
        self.send_flags(kind, 0, offset, len, data)
    }

    fn send_flags(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> io::Result<u64> {
        let handle = self.next_handle();
        let mut b = RequestHeader {
            flags,
            kind,
            handle,
            offset,
            len,
        }
        .encode()
        .to_vec();
        b.extend_from_slice(data);
        self.raw.try_send(&b)?;
        Ok(handle)
    }

    fn finish(&mut self, handle: u64, read_len: Option<usize>) -> io::Result<Vec<u8>> {
        let r = self.raw.read_reply(read_len)?;
        if r.handle != handle {
            return Err(io::Error::other(format!(
                "reply for handle {} while waiting for {handle}",
                r.handle
            )));
        }
        if r.error != 0 {
            return Err(io::Error::other(format!("NBD error {}", r.error)));
        }
        Ok(r.data)
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let h = self.send(CMD_WRITE, offset, data.len() as u32, data)?;
        self.finish(h, None).map(drop)
    }

    /// A write with NBD_CMD_FLAG_FUA: durable once acknowledged.
    pub fn write_fua(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let h = self.send_flags(CMD_WRITE, CMD_FLAG_FUA, offset, data.len() as u32, data)?;
        self.finish(h, None).map(drop)
    }

    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let h = self.send(CMD_READ, offset, len, &[])?;
        self.finish(h, Some(len as usize))
    }

    pub fn flush(&mut self) -> io::Result<()> {
        let h = self.send(CMD_FLUSH, 0, 0, &[])?;
        self.finish(h, None).map(drop)
    }

    /// The underlying raw client, for hand-made requests.
    pub fn raw(&mut self) -> &mut RawClient {
        &mut self.raw
    }
}

/// Deterministic content of a 4 KiB block: `tag` (little-endian) in the first 8 bytes, then
/// bytes derived from it. A block read back can be decoded with [`block_tag`].
pub fn tagged_block(tag: u64) -> Vec<u8> {
    let mut b = crate::nbd::random_bytes(tag ^ 0x9e37_79b9_7f4a_7c15, 4096);
    b[..8].copy_from_slice(&tag.to_le_bytes());
    b
}

/// The tag of a block made by [`tagged_block`]; `Some(0)` for an all-zero block, `None` if the
/// block is neither (garbage).
pub fn block_tag(b: &[u8]) -> Option<u64> {
    if b.iter().all(|&x| x == 0) {
        return Some(0);
    }
    let tag = u64::from_le_bytes(b[..8].try_into().unwrap());
    (tag != 0 && tagged_block(tag) == b).then_some(tag)
}

/// A raw image of `size` bytes (a multiple of 1 MiB) with holes: random data in most 1 MiB
/// regions, every third region left zero except a few bytes, and the last one all zeros.
pub fn image_with_holes(seed: u64, size: usize) -> Vec<u8> {
    const MIB: usize = 1 << 20;
    let mut img = crate::nbd::random_bytes(seed, size);
    let regions = size / MIB;
    for (i, chunk) in img.chunks_mut(MIB).enumerate() {
        if i + 1 == regions {
            chunk.fill(0);
        } else if i % 3 == 1 {
            chunk.fill(0);
            chunk[12_345..12_400].fill(0xa5);
        }
    }
    img
}

/// Bytes of data (non-hole 4 KiB blocks) in `img`.
pub fn data_bytes(img: &[u8]) -> u64 {
    img.chunks(4096)
        .filter(|b| b.iter().any(|&x| x != 0))
        .count() as u64
        * 4096
}

/// `nbdinfo --map --json URI` (the `base:allocation` context): `(offset, length, type)` where
/// type bit 0 is "hole" and bit 1 is "reads as zeros".
pub fn nbdinfo_map(uri: &str) -> Vec<(u64, u64, u64)> {
    let out = output_ok(Command::new("nbdinfo").args(["--map", "--json", uri]));
    let map: Value = serde_json::from_slice(&out.stdout).expect("nbdinfo --map JSON");
    map.as_array()
        .expect("map array")
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Runs `qemu-io -f raw URI -c CMD…`, asserting that it succeeded and that no command failed or
/// read back the wrong pattern. Returns stdout and stderr.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    qemu_io_with(&[], uri, cmds)
}

/// [`qemu_io`] opening the image read-only (`-r`), as a snapshot export needs.
pub fn qemu_io_ro(uri: &str, cmds: &[&str]) -> String {
    qemu_io_with(&["-r"], uri, cmds)
}

fn qemu_io_with(opts: &[&str], uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(opts).args(["-f", "raw", uri]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = output_ok(&mut c);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("failed") && !text.contains("Pattern verification"),
        "qemu-io {cmds:?}: {text}"
    );
    text
}
