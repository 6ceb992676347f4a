//! Limits of the real `parallax serve`: more connections than allowed, descriptors running out,
//! many VDIs open at once, a full store, a 16 TiB VDI. Each gives a clear error or works; the
//! daemon never crashes and serves normally once the pressure is gone.

use std::{
    io::Read,
    net::TcpStream,
    process::Command,
    time::{Duration, Instant},
};

use frontend_shim::{Frontend, FrontendConfig, IoRequest};
use parallax_integration::{
    daemon::{block_tag, tagged_block, Daemon, NbdConn, TestStore},
    nbd::random_bytes,
};

/// True if the server closes a fresh TCP connection without a greeting.
fn refused(port: u16) -> bool {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 18];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// Retries `f` for up to 10 s (the server notices closed connections asynchronously).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < until, "{what} never happened");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A full NBD session on `export`, or `None` if the server turned the client away.
fn try_nbd(port: u16, export: &str) -> Option<NbdConn> {
    std::panic::catch_unwind(|| NbdConn::connect(port, export)).ok()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .count()
}

#[test]
fn connections_past_the_cap_are_refused_and_the_rest_carry_on() {
    let store = TestStore::new("64M");
    store.run(&["vdi", "create", "a", "--size", "1M"]);
    let d = Daemon::start_with(&store, "(nbd: (max_connections: 4))", &[]);
    let mut conns: Vec<NbdConn> = (0..4).map(|_| d.nbd("a")).collect();
    assert!(refused(d.port()), "a fifth connection is closed at once");
    assert!(d.wait_stderr("too many connections"));
    for (i, c) in conns.iter_mut().enumerate() {
        c.write(i as u64 * 4096, &tagged_block(i as u64 + 1))
            .expect("write");
        let back = c.read(i as u64 * 4096, 4096).expect("read");
        assert_eq!(block_tag(&back), Some(i as u64 + 1));
    }
    conns.pop();
    let mut c = None;
    eventually("a connection slot frees up", || {
        c = try_nbd(d.port(), "a");
        c.is_some()
    });
    let mut c = c.unwrap();
    assert_eq!(block_tag(&c.read(0, 4096).unwrap()), Some(1));
    drop((c, conns));
    d.stop();
    store.assert_clean();
}

#[test]
fn running_out_of_descriptors_refuses_clients_without_crashing() {
    let store = TestStore::new("64M");
    store.run(&["vdi", "create", "a", "--size", "1M"]);
    let mut d = Daemon::start(&store);
    let pid = d.pid();
    let limit = open_fds(pid) + 12;
    let st = Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .status()
        .expect("run prlimit");
    assert!(st.success());
    // More clients than descriptors: the first ones work, the rest are refused or dropped.
    let mut held = Vec::new();
    let mut turned_away = 0;
    for _ in 0..24 {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", d.port())) else {
            turned_away += 1;
            continue;
        };
        s.set_read_timeout(Some(Duration::from_millis(250)))
            .unwrap();
        let mut b = [0u8; 18];
        match s.read(&mut b) {
            Ok(18) => held.push(s),
            _ => turned_away += 1,
        }
    }
    assert!(
        !held.is_empty() && turned_away > 0,
        "{} held, {turned_away} turned away",
        held.len()
    );
    assert!(d.alive(), "the daemon survives running out of descriptors");
    drop(held);
    // Once the descriptors are back, clients and the control socket work again.
    eventually("a full NBD session", || {
        try_nbd(d.port(), "a")
            .is_some_and(|mut c| c.write(0, &tagged_block(7)).is_ok() && c.flush().is_ok())
    });
    store.run(&["vdi", "list"]);
    d.stop();
    store.assert_clean();
}

#[test]
fn many_vdis_open_at_once_over_nbd_and_rings() {
    const NBD_VDIS: usize = 48;
    const RING_VDIS: usize = 8;
    let store = TestStore::new("256M");
    for i in 0..NBD_VDIS + RING_VDIS {
        store.run(&["vdi", "create", &format!("v{i:03}"), "--size", "4M"]);
    }
    let d = Daemon::start(&store);
    let mut nbd: Vec<NbdConn> = (0..NBD_VDIS).map(|i| d.nbd(&format!("v{i:03}"))).collect();
    let mut rings: Vec<Frontend> = (NBD_VDIS..NBD_VDIS + RING_VDIS)
        .map(|i| {
            Frontend::attach_store(&store.path, &format!("v{i:03}"), &FrontendConfig::default())
                .expect("attach")
        })
        .collect();
    for (i, c) in nbd.iter_mut().enumerate() {
        c.write(8192, &tagged_block(100 + i as u64)).expect("write");
    }
    for (i, f) in rings.iter_mut().enumerate() {
        let c = f
            .queue(0)
            .run(&IoRequest::write(16, &tagged_block(200 + i as u64)))
            .expect("ring write");
        assert_eq!(c.status, 0);
    }
    // A second writer on a VDI a ring holds is refused with a clear error.
    let mut raw = parallax_integration::nbd::RawClient::start(d.port());
    raw.send_option(
        parallax::nbd::proto::OPT_GO,
        &parallax_integration::nbd::go_data(&format!("v{NBD_VDIS:03}"), &[]),
    );
    let replies = raw.read_option_replies();
    assert!(replies.last().unwrap().1 & (1 << 31) != 0, "{replies:?}");
    for (i, c) in nbd.iter_mut().enumerate() {
        assert_eq!(
            block_tag(&c.read(8192, 4096).unwrap()),
            Some(100 + i as u64)
        );
        c.flush().unwrap();
    }
    for (i, f) in rings.iter_mut().enumerate() {
        let c = f
            .queue(0)
            .run(&IoRequest::read(16, 4096))
            .expect("ring read");
        assert_eq!(block_tag(c.data.as_deref().unwrap()), Some(200 + i as u64));
        assert_eq!(f.queue(0).run(&IoRequest::flush()).unwrap().status, 0);
    }
    for f in rings {
        f.detach().expect("detach");
    }
    drop(nbd);
    d.stop();
    store.assert_clean();
}

#[test]
fn a_full_store_is_a_clear_error_and_stays_usable() {
    let store = TestStore::new("16M");
    // An import larger than the store: refused part way with "no space", nothing damaged.
    let img = store.file("big.img");
    std::fs::write(&img, random_bytes(9, 24 << 20)).unwrap();
    let f = store.fail(&["vdi", "import", "big", img.to_str().unwrap()]);
    assert_eq!(f.code, Some(1), "{f:?}");
    assert!(f.stderr.contains("no space"), "{f:?}");
    store.assert_clean();
    // Space is there again for something that fits.
    assert!(
        !store.run(&["vdi", "list"]).contains("big"),
        "a failed import leaves no VDI"
    );
    store.run(&["gc"]);
    let small = store.file("small.img");
    std::fs::write(&small, random_bytes(10, 4 << 20)).unwrap();
    store.run(&["vdi", "import", "small", small.to_str().unwrap()]);
    assert_eq!(store.export("small"), std::fs::read(&small).unwrap());
    store.assert_clean();
}

#[test]
fn a_16_tib_vdi_in_a_small_store() {
    const T16: u64 = 16 << 40;
    let store = TestStore::new("64M");
    store.run(&["vdi", "create", "big", "--size", "16T"]);
    let d = Daemon::start(&store);
    let mut c = d.nbd("big");
    assert_eq!(c.size, T16);
    c.write(0, &tagged_block(1)).unwrap();
    c.write(T16 - 4096, &tagged_block(2)).unwrap();
    c.write(T16 / 2 + 512, &[0xab; 512]).unwrap();
    c.flush().unwrap();
    assert_eq!(block_tag(&c.read(T16 - 4096, 4096).unwrap()), Some(2));
    assert_eq!(c.read(T16 / 2, 1024).unwrap()[512..], [0xab; 512]);
    // Past the end: an error, not a crash.
    assert!(c.write(T16, &[1; 512]).is_err());
    drop(c);
    // Real clients agree on the size and see the data.
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "read -P 0xab 8796093022720 512",
            &d.uri("big"),
        ])
        .output()
        .expect("qemu-io");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("fail"), "{text}");
    let info = Command::new("qemu-img")
        .args(["info", &d.uri("big")])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&info.stdout).contains("16 TiB"));
    // Snapshots and forks of it are O(1), and its usage is what was written.
    store.run(&["vdi", "snapshot", "big", "s"]);
    store.run(&["vdi", "fork", "big@s", "big2"]);
    let v = store.json(&["vdi", "info", "big2", "--json"]);
    assert_eq!(v["size"], T16);
    assert_eq!(v["allocated"], 3 * 4096, "{v:#}");
    // Beyond the format's 1 PiB: a clear error.
    let f = store.fail(&["vdi", "create", "huge", "--size", "2P"]);
    assert_eq!(f.code, Some(1), "{f:?}");
    assert!(f.stderr.contains("PiB"), "{f:?}");
    d.stop();
    store.assert_clean();
}
