//! Helpers for the NBD tests: an in-process [`NbdServer`] over [`MemProvider`] disks on an
//! ephemeral TCP port and a Unix socket, a raw protocol client for malformed-input tests, and
//! a runner for the real clients (qemu-img, qemu-io, nbdinfo, nbdcopy, fio).

use std::{
    collections::HashMap,
    io::{self, Read, Write},
    net::{TcpListener, TcpStream},
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::Duration,
};

use parallax::{
    disk::{Disk, DiskProvider, ExportInfo, MemDisk, MemProvider, OpenError},
    nbd::{proto::*, NbdConfig, NbdServer, NbdShutdown, NbdStatsHandle},
};

/// A [`MemProvider`] that also carries export descriptions (MemProvider's are empty).
#[derive(Default)]
pub struct TestProvider {
    pub mem: MemProvider,
    descriptions: Mutex<HashMap<String, String>>,
}

impl TestProvider {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a read-write disk of `size` bytes and returns it.
    pub fn add(&self, name: &str, size: u64, description: &str) -> Arc<MemDisk> {
        self.descriptions
            .lock()
            .unwrap()
            .insert(name.into(), description.into());
        self.mem.add(name, MemDisk::new(size))
    }

    /// Adds a read-only snapshot `NAME@SNAP` of `disk`'s current contents.
    pub fn add_snapshot(&self, name: &str, disk: &MemDisk, description: &str) -> Arc<MemDisk> {
        self.descriptions
            .lock()
            .unwrap()
            .insert(name.into(), description.into());
        self.mem.add(name, disk.snapshot())
    }
}

impl DiskProvider for TestProvider {
    fn list_exports(&self) -> Vec<ExportInfo> {
        let d = self.descriptions.lock().unwrap();
        let mut v = self.mem.list_exports();
        for e in &mut v {
            e.description = d.get(&e.name).cloned().unwrap_or_default();
        }
        v
    }

    fn open_export(&self, name: &str, write: bool) -> Result<Arc<dyn Disk>, OpenError> {
        self.mem.open_export(name, write)
    }
}

/// An NBD server running on a thread of its own, listening on 127.0.0.1 and a Unix socket.
pub struct TestServer {
    pub provider: Arc<TestProvider>,
    pub port: u16,
    pub socket: PathBuf,
    pub stats: NbdStatsHandle,
    shutdown: NbdShutdown,
    thread: Option<JoinHandle<io::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    pub fn start(provider: Arc<TestProvider>, cfg: NbdConfig) -> Self {
        Self::start_tls(provider, cfg, None)
    }

    /// Starts a server that offers (or requires) TLS with `tls`.
    pub fn start_tls(
        provider: Arc<TestProvider>,
        cfg: NbdConfig,
        tls: Option<Arc<parallax::nbd::TlsServer>>,
    ) -> Self {
        Self::start_tls_with_access(provider, cfg, tls, Default::default())
    }

    /// Starts a server with TLS and access rules.
    pub fn start_tls_with_access(
        provider: Arc<TestProvider>,
        cfg: NbdConfig,
        tls: Option<Arc<parallax::nbd::TlsServer>>,
        access: parallax::nbd::AccessPolicy,
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("nbd.sock");
        let tcp = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let port = tcp.local_addr().expect("local addr").port();
        let unix = UnixListener::bind(&socket).expect("bind unix");
        let mut server = NbdServer::new(provider.clone(), cfg).expect("server");
        server.add_tcp_listener(tcp).expect("tcp listener");
        server.add_unix_listener(unix).expect("unix listener");
        server.set_tls(tls);
        server.set_access(access);
        let shutdown = server.shutdown_handle();
        let stats = server.stats();
        let thread = std::thread::Builder::new()
            .name("nbd-server".into())
            .spawn(move || server.run())
            .expect("spawn server");
        TestServer {
            provider,
            port,
            socket,
            stats,
            shutdown,
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// `nbd://127.0.0.1:PORT/EXPORT`
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.port, export)
    }

    /// `nbd+unix:///EXPORT?socket=PATH`
    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{}?socket={}", export, self.socket.display())
    }

    pub fn shutdown_handle(&self) -> NbdShutdown {
        self.shutdown.clone()
    }

    /// Shuts the server down and returns what `run` returned.
    pub fn stop(mut self) -> io::Result<()> {
        self.shutdown.shutdown();
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("server thread panicked")
    }

    /// True while the server thread runs.
    pub fn running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Checks with a real client (nbdinfo) that the server still answers on `export`.
    pub fn assert_serving(&self, export: &str, size: u64) {
        assert!(self.running(), "server thread exited");
        let out = run_ok(Command::new("nbdinfo").arg("--size").arg(self.uri(export)));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            size.to_string()
        );
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs a command and returns its output, panicking with its stderr if it failed.
pub fn run_ok(cmd: &mut Command) -> Output {
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

/// Runs a command that is expected to fail; returns its stdout+stderr.
pub fn run_fail(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "{cmd:?} unexpectedly succeeded: {text}"
    );
    text
}

/// Writes `data` to a new file at `path`.
pub fn write_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// One decoded server reply in the transmission phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub handle: u64,
    /// 0 on success.
    pub error: u32,
    /// Read data (reassembled from data chunks), or block status descriptors encoded as
    /// big-endian (length, flags) pairs after the context ID.
    pub data: Vec<u8>,
    /// Chunk types seen, in order (empty for a simple reply).
    pub chunks: Vec<u16>,
}

/// A hand-driven NBD client over TCP for protocol-level and malformed-input tests.
pub struct RawClient {
    pub s: TcpStream,
    pub structured: bool,
}

impl RawClient {
    /// Connects and reads the greeting.
    pub fn connect(port: u16) -> Self {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        s.set_nodelay(true).expect("nodelay");
        let mut c = RawClient {
            s,
            structured: false,
        };
        let g = c.read_exact(GREETING_LEN).expect("greeting");
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(get_u16(&g, 16), Some(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        c
    }

    /// Connects and sends the client flags (fixed newstyle, no zeroes).
    pub fn start(port: u16) -> Self {
        let mut c = Self::connect(port);
        c.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        c
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    /// Sends without panicking (the server may have closed the connection).
    pub fn try_send(&mut self, b: &[u8]) -> io::Result<()> {
        self.s.write_all(b)
    }

    pub fn read_exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v)?;
        Ok(v)
    }

    /// Reads until EOF (or error); true if the server closed the connection.
    pub fn closed_by_server(&mut self) -> bool {
        let mut buf = [0u8; 65536];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut b = OptionHeader {
            option,
            len: data.len() as u32,
        }
        .encode()
        .to_vec();
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// Reads one option reply: (option, reply type, data).
    pub fn read_option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self
            .read_exact(OPTION_REPLY_HEADER_LEN)
            .expect("option reply");
        assert_eq!(get_u64(&h, 0), Some(OPT_REPLY_MAGIC));
        let len = get_u32(&h, 16).unwrap() as usize;
        let data = self.read_exact(len).expect("option reply data");
        (get_u32(&h, 8).unwrap(), get_u32(&h, 12).unwrap(), data)
    }

    /// Reads option replies up to and including the final one (ACK or an error).
    pub fn read_option_replies(&mut self) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        loop {
            let r = self.read_option_reply();
            let last = r.1 == REP_ACK || r.1 & (1 << 31) != 0;
            v.push(r);
            if last {
                return v;
            }
        }
    }

    /// Negotiates structured replies (if asked) and `base:allocation`, then `NBD_OPT_GO` on
    /// `export`, requesting block sizes if `block_size`. Returns (size, transmission flags).
    pub fn go(&mut self, export: &str, structured: bool, block_size: bool) -> (u64, u16) {
        if structured {
            self.send_option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(self.read_option_reply().1, REP_ACK);
            self.send_option(
                OPT_SET_META_CONTEXT,
                &meta_data(export, &["base:allocation"]),
            );
            let r = self.read_option_replies();
            assert_eq!(r.len(), 2, "{r:?}");
            assert_eq!(r[0].1, REP_META_CONTEXT);
            self.structured = true;
        }
        let reqs: &[u16] = if block_size { &[INFO_BLOCK_SIZE] } else { &[] };
        self.send_option(OPT_GO, &go_data(export, reqs));
        let r = self.read_option_replies();
        assert_eq!(r.last().unwrap().1, REP_ACK, "GO failed: {r:?}");
        let info = r
            .iter()
            .find(|x| x.1 == REP_INFO && get_u16(&x.2, 0) == Some(INFO_EXPORT))
            .expect("NBD_INFO_EXPORT");
        (get_u64(&info.2, 2).unwrap(), get_u16(&info.2, 10).unwrap())
    }

    pub fn request(&mut self, kind: u16, flags: u16, handle: u64, offset: u64, len: u32) {
        let h = RequestHeader {
            flags,
            kind,
            handle,
            offset,
            len,
        };
        self.send(&h.encode());
    }

    pub fn write(&mut self, flags: u16, handle: u64, offset: u64, data: &[u8]) {
        self.request(CMD_WRITE, flags, handle, offset, data.len() as u32);
        self.send(data);
    }

    /// Reads one complete reply. `read_len` is the length of the READ it answers (needed
    /// for simple replies, which carry no length), or `None` for other commands.
    pub fn read_reply(&mut self, read_len: Option<usize>) -> io::Result<Reply> {
        if !self.structured {
            let h = self.read_exact(SIMPLE_REPLY_LEN)?;
            assert_eq!(
                get_u32(&h, 0),
                Some(SIMPLE_REPLY_MAGIC),
                "simple reply magic"
            );
            let error = get_u32(&h, 4).unwrap();
            let handle = get_u64(&h, 8).unwrap();
            let data = match read_len {
                Some(n) if error == 0 => self.read_exact(n)?,
                _ => Vec::new(),
            };
            return Ok(Reply {
                handle,
                error,
                data,
                chunks: Vec::new(),
            });
        }
        let mut reply = Reply {
            handle: 0,
            error: 0,
            data: Vec::new(),
            chunks: Vec::new(),
        };
        let mut base = None;
        loop {
            let h = self.read_exact(SIMPLE_REPLY_LEN.max(4))?;
            let magic = get_u32(&h, 0).unwrap();
            if magic == SIMPLE_REPLY_MAGIC {
                reply.handle = get_u64(&h, 8).unwrap();
                reply.error = get_u32(&h, 4).unwrap();
                return Ok(reply);
            }
            assert_eq!(magic, STRUCTURED_REPLY_MAGIC);
            let rest = self.read_exact(CHUNK_HEADER_LEN - SIMPLE_REPLY_LEN)?;
            let flags = get_u16(&h, 4).unwrap();
            let kind = get_u16(&h, 6).unwrap();
            reply.handle = get_u64(&h, 8).unwrap();
            let len = get_u32(&rest, 0).unwrap() as usize;
            let payload = self.read_exact(len)?;
            reply.chunks.push(kind);
            match kind {
                REPLY_TYPE_OFFSET_DATA => {
                    let off = get_u64(&payload, 0).unwrap();
                    let b = *base.get_or_insert(off);
                    let at = (off - b) as usize;
                    if reply.data.len() < at + payload.len() - 8 {
                        reply.data.resize(at + payload.len() - 8, 0);
                    }
                    reply.data[at..at + payload.len() - 8].copy_from_slice(&payload[8..]);
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    let off = get_u64(&payload, 0).unwrap();
                    let n = get_u32(&payload, 8).unwrap() as usize;
                    let b = *base.get_or_insert(off);
                    let at = (off - b) as usize;
                    if reply.data.len() < at + n {
                        reply.data.resize(at + n, 0);
                    }
                }
                REPLY_TYPE_BLOCK_STATUS => reply.data.extend_from_slice(&payload),
                REPLY_TYPE_NONE => assert_eq!(len, 0),
                k if k & (1 << 15) != 0 => {
                    reply.error = get_u32(&payload, 0).unwrap();
                    let mlen = get_u16(&payload, 4).unwrap() as usize;
                    assert!(
                        6 + mlen <= payload.len(),
                        "error message overflows the chunk"
                    );
                }
                k => panic!("unexpected chunk type {k}"),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                return Ok(reply);
            }
        }
    }
}

/// Data of `NBD_OPT_GO` / `NBD_OPT_INFO`.
pub fn go_data(name: &str, reqs: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
    for r in reqs {
        d.extend_from_slice(&r.to_be_bytes());
    }
    d
}

/// Data of `NBD_OPT_{LIST,SET}_META_CONTEXT`.
pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

/// Reads `len` bytes at `offset` straight from a disk.
pub fn disk_bytes(disk: &MemDisk, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    disk.read_at(&mut v, offset).expect("disk read");
    v
}
