//! The local attach protocol against `serve_attach`, with a small listener playing the
//! daemon's control dispatcher (reads the first JSON line, hands the stream over).

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use frontend_shim::{verify, Frontend, FrontendConfig, IoRequest, ShimError};
use parallax::{
    blkif::{
        abi::{BLKIF_RSP_ERROR, BLKIF_RSP_OKAY},
        local::{serve_attach, RingRegistry},
        Features,
    },
    disk::{Disk, MemDisk, MemProvider},
};

struct Daemon {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    registry: RingRegistry,
    provider: Arc<MemProvider>,
}

/// Listens on a socket file; each connection's first line goes to `serve_attach` on a thread.
fn daemon() -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ctl.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let registry = RingRegistry::new(Features::default());
    let provider = Arc::new(MemProvider::new());
    provider.add("vm1", MemDisk::new(16 << 20));
    let snap = provider.add("base", MemDisk::new(1 << 20));
    snap.write_at(&[7u8; 4096], 0, false).unwrap();
    provider.add("base@snap", snap.snapshot());
    let (reg, prov) = (registry.clone(), provider.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let stream = stream.unwrap();
            let (reg, prov) = (reg.clone(), prov.clone());
            std::thread::spawn(move || {
                // As a dispatcher would: a buffered reader for the first line only.
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                assert!(
                    reader.buffer().is_empty(),
                    "nothing may follow the first line yet"
                );
                let request: serde_json::Value = serde_json::from_str(&line).unwrap();
                let _ = serve_attach(request, reader.into_inner(), prov, reg);
            });
        }
    });
    Daemon {
        _dir: dir,
        socket,
        registry,
        provider,
    }
}

impl Daemon {
    fn connect(&self) -> UnixStream {
        UnixStream::connect(&self.socket).unwrap()
    }

    fn wait_detached(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.registry.attached().is_empty() {
            assert!(
                Instant::now() < deadline,
                "still attached: {:?}",
                self.registry.attached()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[test]
fn attach_verify_detach() {
    let d = daemon();
    let cfg = FrontendConfig {
        ring_order: 1,
        queues: 2,
        indirect_segments: 64,
        ..Default::default()
    };
    let mut f = Frontend::attach(d.connect(), "vm1", &cfg).unwrap();
    assert_eq!(f.size(), 16 << 20);
    assert_eq!(f.queues().len(), 2);
    assert_eq!(d.registry.attached(), vec!["vm1".to_string()]);
    let r = verify::run(
        &mut f,
        &verify::VerifyConfig {
            ops: 1500,
            seed: 3,
            span: None,
        },
    )
    .unwrap();
    assert_eq!(r.ops, 1500);
    let q = f.queue(0);
    assert_eq!(
        q.run(&IoRequest::write(8, &[5u8; 4096])).unwrap().status,
        BLKIF_RSP_OKAY
    );
    assert_eq!(f.detach().unwrap(), "frontend detached");
    d.wait_detached();
    // The write went to the provider's disk.
    let disk = parallax::disk::DiskProvider::open_export(&*d.provider, "vm1", false).unwrap();
    let mut buf = [0u8; 4096];
    disk.read_at(&mut buf, 8 * 512).unwrap();
    assert_eq!(buf, [5u8; 4096]);
}

#[test]
fn attach_through_the_control_address() {
    let d = daemon();
    // PARALLAX_CONTROL names the socket, as for any client of the daemon.
    std::env::set_var(parallax::daemon::addr::CONTROL_ENV, &d.socket);
    let store = tempfile::NamedTempFile::new().unwrap();
    let mut f = Frontend::attach_store(store.path(), "vm1", &FrontendConfig::default()).unwrap();
    assert_eq!(
        f.queue(0).run(&IoRequest::read(0, 512)).unwrap().status,
        BLKIF_RSP_OKAY
    );
    f.detach().unwrap();
}

#[test]
fn refusals() {
    let d = daemon();
    let cfg = FrontendConfig::default();
    match Frontend::attach(d.connect(), "nope", &cfg) {
        Err(ShimError::Refused(e)) => assert!(e.contains("no such export"), "{e}"),
        other => panic!("{:?}", other.err()),
    }
    // A snapshot cannot be attached writable, but can be read-only.
    assert!(matches!(
        Frontend::attach(d.connect(), "base@snap", &cfg),
        Err(ShimError::Refused(_))
    ));
    let ro = FrontendConfig {
        read_only: true,
        ..Default::default()
    };
    let mut f = Frontend::attach(d.connect(), "base@snap", &ro).unwrap();
    assert!(f.read_only());
    let q = f.queue(0);
    assert_eq!(
        q.run(&IoRequest::read(0, 4096)).unwrap().data.unwrap(),
        vec![7u8; 4096]
    );
    assert_eq!(
        q.run(&IoRequest::write(0, &[1u8; 512])).unwrap().status,
        BLKIF_RSP_ERROR
    );
    f.detach().unwrap();
    d.wait_detached();
}

/// Reads one JSON line from a raw stream.
fn line(s: &mut UnixStream) -> serde_json::Value {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        out.push(b[0]);
    }
    serde_json::from_slice(&out).unwrap_or(serde_json::Value::Null)
}

#[test]
fn malformed_connects_are_refused() {
    let d = daemon();
    let attach = b"{\"op\":\"ring-attach\",\"name\":\"vm1\"}\n";
    // Connect message without descriptors.
    let mut s = d.connect();
    s.write_all(attach).unwrap();
    assert_eq!(line(&mut s)["ok"], true);
    s.write_all(b"{\"ring_order\":0,\"ring_refs\":[[0]]}\n")
        .unwrap();
    let r = line(&mut s);
    assert_eq!(r["ok"], false, "{r}");
    // Garbage instead of JSON.
    let mut s = d.connect();
    s.write_all(attach).unwrap();
    line(&mut s);
    s.write_all(b"not json\n").unwrap();
    assert_eq!(line(&mut s)["ok"], false);
    // An unsealed memfd as the grant table.
    let mut s = d.connect();
    s.write_all(attach).unwrap();
    line(&mut s);
    let file = tempfile::tempfile().unwrap();
    file.set_len(4096).unwrap();
    let (b, _f) = parallax::blkif::local::LocalEvent::pair().unwrap();
    use std::os::fd::AsFd;
    parallax::blkif::local::send_with_fds(
        &s,
        b"{\"ring_order\":0,\"ring_refs\":[[0]]}\n",
        &[file.as_fd(), b.incoming().as_fd(), b.outgoing().as_fd()],
    )
    .unwrap();
    let r = line(&mut s);
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("sealed"), "{r}");
    // Hanging up mid-handshake releases the registration.
    let mut s = d.connect();
    s.write_all(attach).unwrap();
    line(&mut s);
    drop(s);
    d.wait_detached();
}

#[test]
fn frontend_death_releases_everything() {
    let d = daemon();
    let mut f = Frontend::attach(
        d.connect(),
        "vm1",
        &FrontendConfig {
            queues: 3,
            ..Default::default()
        },
    )
    .unwrap();
    let q = f.queue(1);
    for i in 0..8 {
        q.submit(&IoRequest::read(i * 8, 4096)).unwrap();
    }
    q.push().unwrap();
    // Gone without a word, requests in flight: as if the process were killed.
    drop(f);
    d.wait_detached();
    // The export can be attached again.
    let f = Frontend::attach(d.connect(), "vm1", &FrontendConfig::default()).unwrap();
    f.detach().unwrap();
}

#[test]
fn daemon_shutdown_detaches_everyone() {
    let d = daemon();
    let mut a = Frontend::attach(d.connect(), "vm1", &FrontendConfig::default()).unwrap();
    let b = Frontend::attach(
        d.connect(),
        "base@snap",
        &FrontendConfig {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(d.registry.attached().len(), 2);
    // Requests posted (not kicked) when the daemon stops are still answered.
    let q = a.queue(0);
    for i in 0..10 {
        q.submit(&IoRequest::read(i * 8, 4096)).unwrap();
    }
    q.ring().set_req_prod(q.req_prod_pvt());
    assert_eq!(d.registry.shutdown_all(Duration::from_secs(30)), 0);
    let mut done = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while done.len() < 10 {
        assert!(Instant::now() < deadline);
        let _ = q.wait(Some(Duration::from_millis(100)));
        q.poll(&mut done).unwrap();
    }
    assert!(done.iter().all(|c| c.status == BLKIF_RSP_OKAY));
    assert!(matches!(
        q.wait(Some(Duration::from_secs(30))),
        Err(frontend_shim::FrontError::BackendGone)
    ));
    assert_eq!(a.detach().unwrap(), "daemon shutting down");
    assert_eq!(b.detach().unwrap(), "daemon shutting down");
    match Frontend::attach(d.connect(), "vm1", &FrontendConfig::default()) {
        Err(ShimError::Refused(e)) => assert!(e.contains("shutting down"), "{e}"),
        other => panic!("{:?}", other.err()),
    }
}
