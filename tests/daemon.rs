//! `parallax serve` on a real store, driven by real NBD clients (qemu-img, qemu-io, nbdinfo,
//! nbdcopy, fio) and by the CLI through the control socket at the same time. Data is checked end
//! to end: what a client wrote is what `parallax vdi export` reads out of the store, and the
//! store checks clean afterwards. The protocol-level suite (`nbd_protocol`) covers the server
//! alone; these tests cover the daemon and the store behind it.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use parallax_integration::{
    daemon::*,
    nbd::{random_bytes, run_fail, run_ok},
};
use serde_json::Value;

const MIB: usize = 1 << 20;

fn setup(vdi_size: &str) -> (TestStore, Daemon) {
    let store = TestStore::new("512M");
    store.run(&["vdi", "create", "vm", "--size", vdi_size]);
    let d = Daemon::start(&store);
    (store, d)
}

/// Stops the daemon cleanly and checks the store (through the daemon first, then directly).
fn finish(store: TestStore, d: Daemon) {
    store.assert_clean();
    d.stop();
    store.assert_clean();
}

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i} (got {:#04x}, want {:#04x})",
            got[i], want[i]
        );
    }
}

/// The data/zero runs of `img` at 4 KiB granularity: `(start, length, is_data)`.
fn runs(img: &[u8]) -> Vec<(u64, u64, bool)> {
    let mut v: Vec<(u64, u64, bool)> = Vec::new();
    for (i, b) in img.chunks(4096).enumerate() {
        let data = b.iter().any(|&x| x != 0);
        match v.last_mut() {
            Some(last) if last.2 == data => last.1 += b.len() as u64,
            _ => v.push((i as u64 * 4096, b.len() as u64, data)),
        }
    }
    v
}

/// `nbdinfo --map` as runs of `(start, length, true)` for what does not read as zeros and
/// `false` for what does (adjacent runs of the same kind merged).
fn map_runs(uri: &str) -> Vec<(u64, u64, bool)> {
    classify(uri, 2)
}

/// `nbdinfo --map` as runs of `(start, length, true)` for allocated ranges and `false` for
/// holes.
fn hole_runs(uri: &str) -> Vec<(u64, u64, bool)> {
    classify(uri, 1)
}

fn classify(uri: &str, bit: u64) -> Vec<(u64, u64, bool)> {
    let mut v: Vec<(u64, u64, bool)> = Vec::new();
    for (off, len, kind) in nbdinfo_map(uri) {
        let set = kind & bit == 0;
        match v.last_mut() {
            Some(last) if last.2 == set => last.1 += len,
            _ => v.push((off, len, set)),
        }
    }
    v
}

#[test]
fn qemu_img_info_compare_convert_map() {
    let (store, d) = setup("16M");
    let img = image_with_holes(11, 16 * MIB);
    let src = store.file("src.img");
    std::fs::write(&src, &img).unwrap();

    let info = run_ok(Command::new("qemu-img").args(["info", "--output=json", &d.uri("vm")]));
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["virtual-size"], 16 * MIB as u64);
    assert_eq!(info["format"], "raw");

    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(d.uri("vm")),
    );
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(d.unix_uri("vm")),
    );
    // What the store holds, read by the CLI through the control socket.
    assert_same("vdi export", &store.export("vm"), &img);
    // A different image compares as different.
    let mut other = img.clone();
    other[5 * MIB + 17] ^= 1;
    let other_f = store.file("other.img");
    std::fs::write(&other_f, &other).unwrap();
    let out = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(&other_f)
        .arg(d.uri("vm"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");

    // Out of the export, over TCP and the unix socket.
    for (i, uri) in [d.uri("vm"), d.unix_uri("vm")].iter().enumerate() {
        let out = store.file(&format!("out{i}.img"));
        run_ok(
            Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "raw"])
                .arg(uri)
                .arg(&out),
        );
        assert_same("converted out", &std::fs::read(&out).unwrap(), &img);
    }

    // The map is exactly the image's data and holes, at 4 KiB granularity.
    let map =
        run_ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &d.uri("vm")]));
    let map: Value = serde_json::from_slice(&map.stdout).unwrap();
    let mut got: Vec<(u64, u64, bool)> = Vec::new();
    for e in map.as_array().unwrap() {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let data = e["zero"] == false;
        assert!(data || e["zero"] == true, "{e}");
        match got.last_mut() {
            Some(last) if last.2 == data => last.1 += len,
            _ => got.push((start, len, data)),
        }
    }
    assert_eq!(got, runs(&img));
    assert_eq!(map_runs(&d.uri("vm")), runs(&img));
    finish(store, d);
}

#[test]
fn qemu_io_patterns_zeroes_discard_flush() {
    let (store, d) = setup("4M");
    let uri = d.uri("vm");
    let text = qemu_io(
        &uri,
        &[
            "write -P 0xab 1000 5000",
            "write -P 0xcd 1048575 3",
            "write -P 0x11 2097152 262144",
            "write -P 0x12 3145728 1048576",
            "write -z 2101248 8192",
            "discard 2162688 65536",
            "write -z 3145728 1048576",
            "flush",
            "read -P 0xab 1000 5000",
            "read -P 0 0 1000",
            "read -P 0 6000 4000",
            "read -P 0xcd 1048575 3",
            "read -P 0 2101248 8192",
            "read -P 0 2162688 65536",
            "read -P 0x11 2097152 4096",
            "read -P 0 3145728 1048576",
        ],
    );
    assert_eq!(text.matches("wrote ").count(), 6, "{text}");
    assert_eq!(text.matches("read ").count(), 8, "{text}");

    // The same, read out of the store by the CLI.
    let mut want = vec![0u8; 4 * MIB];
    want[1000..6000].fill(0xab);
    want[1048575..1048578].fill(0xcd);
    want[2097152..2097152 + 262144].fill(0x11);
    want[2101248..2101248 + 8192].fill(0);
    want[2162688..2162688 + 65536].fill(0);
    assert_same("vdi export", &store.export("vm"), &want);

    // Discarded and zeroed ranges read as zeros in the map; only written blocks hold data.
    // Zeroing without unmap (qemu-io's `write -z` sends NO_HOLE) need not leave a hole, but
    // a discard must.
    let map = map_runs(&uri);
    assert_eq!(map, runs(&want), "{map:?}");
    let holes = hole_runs(&uri);
    assert!(
        holes.contains(&(2162688, 65536, false)),
        "the discarded range is not a hole: {holes:?}"
    );
    let info = store.json(&["vdi", "info", "vm", "--json"]);
    assert_eq!(info["allocated"], data_bytes(&want), "{info:#}");
    finish(store, d);
}

#[test]
fn nbdinfo_list_and_map_of_forks() {
    let store = TestStore::new("256M");
    let tmpl = image_with_holes(12, 8 * MIB);
    store.import("tmpl", &tmpl);
    store.run(&["vdi", "snapshot", "tmpl", "gold"]);
    let d = Daemon::start(&store);
    // Made while the daemon runs: it sees them at once.
    store.run(&["vdi", "fork", "tmpl@gold", "vm1"]);
    store.run(&["vdi", "create", "blank", "--size", "1M"]);

    let out = run_ok(Command::new("nbdinfo").args(["--list", "--json", &d.uri("")]));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let exports = list["exports"].as_array().unwrap();
    let mut names: Vec<&str> = exports
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["blank", "tmpl", "tmpl@gold", "vm1"], "{list:#}");
    for e in exports {
        let snap = e["export-name"].as_str().unwrap().contains('@');
        assert_eq!(e["is_read_only"], snap, "{e:#}");
        assert_eq!(e["can_trim"], !snap, "{e:#}");
    }
    let vm1 = exports.iter().find(|e| e["export-name"] == "vm1").unwrap();
    assert_eq!(vm1["export-size"], 8 * MIB as u64);
    assert!(
        vm1["description"].as_str().unwrap().contains("tmpl@gold"),
        "{vm1:#}"
    );

    // A fresh fork is all holes except the template's data.
    assert_eq!(hole_runs(&d.uri("vm1")), runs(&tmpl));
    assert_eq!(map_runs(&d.uri("vm1")), runs(&tmpl));
    assert_eq!(hole_runs(&d.uri("tmpl@gold")), runs(&tmpl));
    assert_eq!(hole_runs(&d.uri("blank")), [(0, MIB as u64, false)]);

    // Trim into the fork's shared data: holes there, the snapshot unchanged.
    qemu_io(
        &d.uri("vm1"),
        &[
            "discard 0 64k",
            "discard 2M 1M",
            "write -P 9 1M 4k",
            "flush",
        ],
    );
    let mut vm1 = tmpl.clone();
    vm1[..65536].fill(0);
    vm1[2 * MIB..3 * MIB].fill(0);
    vm1[MIB..MIB + 4096].fill(9);
    assert_eq!(hole_runs(&d.uri("vm1")), runs(&vm1));
    assert_eq!(hole_runs(&d.uri("tmpl@gold")), runs(&tmpl));
    assert_same("vm1", &store.export("vm1"), &vm1);
    assert_same("tmpl@gold", &store.export("tmpl@gold"), &tmpl);
    finish(store, d);
}

#[test]
fn nbdcopy_round_trip_multi_conn() {
    let (store, d) = setup("24M");
    let img = image_with_holes(13, 24 * MIB);
    let src = store.file("src.img");
    let out = store.file("out.img");
    std::fs::write(&src, &img).unwrap();

    let info = run_ok(Command::new("nbdinfo").args(["--json", &d.uri("vm")]));
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["exports"][0]["can_multi_conn"], true, "{info:#}");

    run_ok(
        Command::new("nbdcopy")
            .args(["--connections=4", "--threads=4", "--requests=16"])
            .arg(&src)
            .arg(d.uri("vm")),
    );
    assert_same("store after nbdcopy in", &store.export("vm"), &img);
    run_ok(
        Command::new("nbdcopy")
            .args(["--connections=4", "--threads=4"])
            .arg(d.unix_uri("vm"))
            .arg(&out),
    );
    run_ok(Command::new("cmp").arg(&src).arg(&out));
    // nbdcopy skips zeroes: the source's holes stay holes in the store.
    let alloc = store.json(&["vdi", "info", "vm", "--json"])["allocated"].clone();
    assert_eq!(alloc, data_bytes(&img));
    finish(store, d);
}

#[test]
fn fio_random_writes_verify() {
    let (store, d) = setup("32M");
    let out = run_ok(Command::new("fio").args([
        "--name=nbd-verify",
        "--ioengine=nbd",
        &format!("--uri={}", d.uri("vm")),
        "--rw=randwrite",
        "--bs=4k",
        "--size=16m",
        "--iodepth=16",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--do_verify=1",
        "--output-format=json",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&text[text.find('{').expect("fio report")..]).unwrap();
    let job = &report["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert_eq!(job["write"]["io_bytes"], 16 * MIB as u64);
    assert_eq!(job["read"]["io_bytes"], 16 * MIB as u64);
    // fio wrote every block of the first 16 MiB once, each with a verify header.
    let data = store.export("vm");
    assert!(data[..16 * MIB]
        .chunks(4096)
        .all(|b| b.iter().any(|&x| x != 0)));
    assert!(data[16 * MIB..].iter().all(|&x| x == 0));
    finish(store, d);
}

#[test]
fn read_only_snapshots_and_isolated_forks_over_nbd() {
    let (store, d) = setup("4M");
    qemu_io(&d.uri("vm"), &["write -P 0x77 0 4M"]);
    store.run(&["vdi", "snapshot", "vm", "base"]);
    store.run(&["vdi", "fork", "vm@base", "f1"]);
    store.run(&["vdi", "fork", "vm@base", "f2"]);

    for uri in [d.uri("vm@base"), d.unix_uri("vm@base")] {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw", &uri, "-c", "write -P 1 0 4096"]);
        let text = run_fail(&mut c);
        assert!(
            ["read-only", "Operation not permitted", "Permission denied"]
                .iter()
                .any(|m| text.contains(m)),
            "unexpected error: {text}"
        );
    }
    // A raw NBD write to the snapshot (opened read-only by the server) is refused with EPERM.
    let mut c = d.nbd("vm@base");
    assert!(c.write(0, &[1; 4096]).is_err());
    assert_same("snapshot", &c.read(0, 4096).unwrap(), &[0x77; 4096]);

    // Forks diverge independently, over TCP and the unix socket at once.
    qemu_io(&d.uri("f1"), &["write -P 0x01 0 1M", "discard 3M 1M"]);
    qemu_io(&d.unix_uri("f2"), &["write -P 0x02 512k 1M", "flush"]);
    qemu_io(&d.uri("vm"), &["write -P 0x03 1M 1M"]);
    qemu_io(
        &d.uri("f1"),
        &["read -P 0x01 0 1M", "read -P 0x77 1M 2M", "read -P 0 3M 1M"],
    );
    qemu_io(
        &d.uri("f2"),
        &[
            "read -P 0x77 0 512k",
            "read -P 0x02 512k 1M",
            "read -P 0x77 1536k 2560k",
        ],
    );
    qemu_io_ro(&d.uri("vm@base"), &["read -P 0x77 0 4M"]);
    qemu_io(
        &d.uri("vm"),
        &[
            "read -P 0x77 0 1M",
            "read -P 0x03 1M 1M",
            "read -P 0x77 2M 2M",
        ],
    );
    // The snapshot cannot be resized, renamed onto a VDI or written by the CLI either.
    store
        .fail(&["vdi", "resize", "vm@base", "8M"])
        .assert_one_line(1, "read-only");
    finish(store, d);
}

/// One write of a live-load writer: which block, with which tag, sent and acknowledged when.
struct LoggedWrite {
    block: u64,
    tag: u64,
    sent: Instant,
    acked: Option<Instant>,
}

/// Writes tagged 4 KiB blocks at random places in `blocks` of `export`, one at a time, until
/// `stop`; returns the log. Tags are `id << 32 | (index + 1)`.
fn live_writer(
    port: u16,
    export: &str,
    id: u64,
    blocks: std::ops::Range<u64>,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> Vec<LoggedWrite> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(id);
    let mut c = NbdConn::connect(port, export);
    let mut log = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let block = rng.random_range(blocks.clone());
        let tag = id << 32 | (log.len() as u64 + 1);
        log.push(LoggedWrite {
            block,
            tag,
            sent: Instant::now(),
            acked: None,
        });
        c.write(block * 4096, &tagged_block(tag))
            .expect("write under a snapshot");
        log.last_mut().unwrap().acked = Some(Instant::now());
        done.fetch_add(1, Ordering::Relaxed);
    }
    log
}

/// Checks a snapshot image against one writer's log: the writer's blocks hold exactly the
/// state after its first `k` writes, for a `k` that includes every write acknowledged before
/// the snapshot command started and no write sent after it returned. Returns `k`.
fn snapshot_prefix(
    img: &[u8],
    log: &[LoggedWrite],
    blocks: std::ops::Range<u64>,
    started: Instant,
    returned: Instant,
) -> usize {
    let mut k = 0;
    let mut found = Vec::new();
    for b in blocks.clone() {
        let data = &img[b as usize * 4096..(b as usize + 1) * 4096];
        let tag = block_tag(data).unwrap_or_else(|| panic!("block {b} holds garbage"));
        if tag != 0 {
            let i = (tag & 0xffff_ffff) as usize - 1;
            assert!(
                i < log.len() && log[i].tag == tag && log[i].block == b,
                "block {b} holds tag {tag:#x}, which this writer never wrote there"
            );
            k = k.max(i + 1);
        }
        found.push(tag);
    }
    // The state after the first k writes, block by block.
    let mut want = vec![0u64; (blocks.end - blocks.start) as usize];
    for w in &log[..k] {
        want[(w.block - blocks.start) as usize] = w.tag;
    }
    assert_eq!(
        found, want,
        "the snapshot is not the state after any prefix of the writes (k = {k})"
    );
    if k > 0 {
        assert!(
            log[k - 1].sent < returned,
            "write {k} was sent after the snapshot command returned but is in the snapshot"
        );
    }
    let acked_before = log
        .iter()
        .take_while(|w| w.acked.is_some_and(|a| a < started))
        .count();
    assert!(
        k >= acked_before,
        "{acked_before} writes were acknowledged before the snapshot started, only {k} are in it"
    );
    k
}

#[test]
fn snapshot_under_live_writes() {
    const REGION: u64 = 512;
    let (store, d) = setup("8M");
    let stop = Arc::new(AtomicBool::new(false));
    // Writes acknowledged, per writer.
    let done: Vec<Arc<AtomicU64>> = (0..2).map(|_| Arc::default()).collect();
    let writers: Vec<_> = (1..=2u64)
        .map(|id| {
            let (stop, done, port) = (stop.clone(), done[id as usize - 1].clone(), d.port());
            let region = (id - 1) * REGION..id * REGION;
            let t = thread::spawn(move || live_writer(port, "vm", id, region, stop, done));
            (id, t)
        })
        .collect();

    // Lets every writer make `n` more writes.
    let more = |n: u64| {
        let until = Instant::now() + Duration::from_secs(60);
        for c in &done {
            let want = c.load(Ordering::Relaxed) + n;
            while c.load(Ordering::Relaxed) < want {
                assert!(Instant::now() < until, "a writer stalled");
                thread::sleep(Duration::from_millis(2));
            }
        }
    };
    let mut snaps = Vec::new();
    let mut first_export = None;
    for i in 0..4 {
        more(150);
        let name = format!("s{i}");
        let started = Instant::now();
        store.run(&["vdi", "snapshot", "vm", &name]);
        snaps.push((name, started, Instant::now()));
        if i == 0 {
            // Read the first snapshot while the writers keep going.
            first_export = Some(store.export("vm@s0"));
        }
    }
    more(150);
    stop.store(true, Ordering::Relaxed);
    let logs: Vec<(u64, Vec<LoggedWrite>)> = writers
        .into_iter()
        .map(|(id, t)| (id, t.join().expect("writer panicked")))
        .collect();

    let mut last_k = vec![0usize; logs.len()];
    for (name, started, returned) in &snaps {
        let img = store.export(&format!("vm@{name}"));
        if name == "s0" {
            assert_same(
                "s0 read during the load and after",
                &img,
                first_export.as_ref().unwrap(),
            );
        }
        for (i, (id, log)) in logs.iter().enumerate() {
            let region = (id - 1) * REGION..id * REGION;
            let k = snapshot_prefix(&img, log, region, *started, *returned);
            assert!(k >= last_k[i], "snapshots went back in time");
            // Every writer wrote after every snapshot returned, so no snapshot holds all.
            assert!(k < log.len(), "writer {id}: all its writes are in {name}");
            last_k[i] = k;
            let during = log
                .iter()
                .filter(|w| w.sent > *started && w.sent < *returned)
                .count();
            eprintln!(
                "{name}: writer {id}: k = {k} of {}, {during} writes sent during the command",
                log.len()
            );
        }
    }
    // The VDI itself holds every write.
    let img = store.export("vm");
    for (id, log) in &logs {
        let region = (id - 1) * REGION..id * REGION;
        let far = Instant::now() + Duration::from_secs(3600);
        assert_eq!(snapshot_prefix(&img, log, region, far, far), log.len());
    }
    finish(store, d);
}

#[test]
fn malformed_input_while_another_client_works() {
    let (store, d) = setup("8M");
    // A well-behaved client writes and reads back its own blocks throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let good = {
        let (stop, ops, port) = (stop.clone(), ops.clone(), d.port());
        thread::spawn(move || {
            let mut c = NbdConn::connect(port, "vm");
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let block = i % 256;
                let data = tagged_block(i + 1);
                c.write(block * 4096, &data).expect("good client write");
                assert_eq!(c.read(block * 4096, 4096).expect("good client read"), data);
                i += 1;
                ops.fetch_add(1, Ordering::Relaxed);
            }
            c.flush().expect("good client flush");
        })
    };
    let progress = || {
        let n = ops.load(Ordering::Relaxed);
        let until = Instant::now() + Duration::from_secs(30);
        while ops.load(Ordering::Relaxed) < n + 20 {
            assert!(Instant::now() < until, "the good client stalled");
            thread::sleep(Duration::from_millis(2));
        }
    };
    progress();

    // Garbage instead of a handshake, and garbage after a valid one.
    let mut s = TcpStream::connect(d.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = s.write_all(&random_bytes(21, 65536));
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    let mut c = d.nbd("vm");
    let _ = c.raw().try_send(&random_bytes(22, 4096));
    assert!(c.raw().closed_by_server());
    progress();

    // A client that asks for 32 MiB and leaves without reading; one that dies mid-write.
    let mut c = d.nbd("vm");
    let _ = c.raw().try_send(
        &parallax::nbd::proto::RequestHeader {
            flags: 0,
            kind: parallax::nbd::proto::CMD_READ,
            handle: 1,
            offset: 0,
            len: 32 << 20,
        }
        .encode(),
    );
    let mut head = [0u8; 16];
    let _ = c.raw().s.read_exact(&mut head);
    drop(c);
    let mut c = d.nbd("vm");
    let mut req = parallax::nbd::proto::RequestHeader {
        flags: 0,
        kind: parallax::nbd::proto::CMD_WRITE,
        handle: 2,
        offset: 0,
        len: 1 << 20,
    }
    .encode()
    .to_vec();
    req.extend_from_slice(&[0xee; 1000]);
    let _ = c.raw().try_send(&req);
    drop(c);
    progress();

    // The control socket: not JSON, an unknown op, a request missing its descriptor, an
    // overlong line, a half line, and a connection that says nothing.
    let answer = |line: &[u8]| -> String {
        let mut s = d.connect_control();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let _ = s.write_all(line);
        let mut reply = String::new();
        let _ = BufReader::new(&s).read_line(&mut reply);
        reply
    };
    for (line, want) in [
        (&b"hello?\n"[..], "invalid"),
        (b"{\"op\":\"frobnicate\"}\n", "invalid"),
        (
            b"{\"op\":\"export\",\"name\":\"vm\",\"stream\":true}\n",
            "file descriptor",
        ),
        (
            b"{\"op\":\"snapshot\",\"vdi\":\"nope\",\"snap\":\"x\"}\n",
            "not-found",
        ),
        (b"[1,2,3]\n", "invalid"),
    ] {
        let reply = answer(line);
        let v: Value = serde_json::from_str(&reply)
            .unwrap_or_else(|e| panic!("reply to {line:?} is not JSON ({e}): {reply:?}"));
        assert!(v["error"].is_object(), "{reply}");
        assert!(reply.contains(want), "{want:?} not in {reply}");
    }
    let long = vec![b'x'; 200 << 10];
    assert_eq!(answer(&long), "", "an overlong line should just be dropped");
    drop(d.connect_control());
    let mut half = d.connect_control();
    half.write_all(b"{\"op\":\"li").unwrap();
    drop(half);
    progress();

    // The CLI and new clients still work; the good client never saw an error.
    let list = store.json(&["vdi", "list", "--json"]);
    assert_eq!(list[0]["name"], "vm", "{list:#}");
    run_ok(Command::new("nbdinfo").args(["--size", &d.uri("vm")]));
    stop.store(true, Ordering::Relaxed);
    good.join().expect("the good client failed");
    finish(store, d);
}

/// libnbd in its default strict mode checks requests against the block sizes the server
/// advertises before sending them. Byte-granular reads and writes (a minimum block size of 1,
/// as qemu-nbd has for raw files) go through, and land as read-modify-write in the store.
#[test]
fn libnbd_strict_mode_unaligned_io() {
    let (store, d) = setup("1M");
    let script = format!(
        r#"
import nbd
h = nbd.NBD()
h.connect_uri("{}")
assert h.get_block_size(nbd.SIZE_MINIMUM) == 1, h.get_block_size(nbd.SIZE_MINIMUM)
h.pwrite(b"hello", 1001)
h.pwrite(b"x" * 5000, 4094)
h.flush()
assert h.pread(5, 1001) == b"hello"
assert h.pread(3, 4093) == b"\0xx"
assert h.pread(7, 9091) == b"xxx\0\0\0\0"
h.shutdown()
"#,
        d.uri("vm")
    );
    // Debian's python3-libnbd is for the system python.
    run_ok(Command::new("/usr/bin/python3").arg("-c").arg(&script));
    let img = store.export("vm");
    let mut want = vec![0u8; MIB];
    want[1001..1006].copy_from_slice(b"hello");
    want[4094..9094].fill(b'x');
    assert_same("unaligned writes", &img, &want);
    finish(store, d);
}

/// The daemon's log says who opened which export and how, what each connection moved when it
/// closed, and which control commands ran or failed, in the words a user would type.
#[test]
fn log_lines_for_connections_and_commands() {
    let (store, d) = setup("4M");
    qemu_io(&d.uri("vm"), &["write -P 0x11 0 64k", "read -P 0x11 0 64k"]);
    store.run(&["vdi", "snapshot", "vm@s1"]);
    store.fail(&["vdi", "info", "nope"]);
    let want = [
        "nbd: export opened",
        "access=\"read-write\"",
        "export=\"vm\"",
        "nbd: closed",
        "read_bytes=65536",
        "written_bytes=65536",
        "control: vdi snapshot vm@s1",
        "control: vdi info nope failed: no such VDI or snapshot",
    ];
    let until = Instant::now() + Duration::from_secs(20);
    let log = loop {
        let log = d.stderr();
        if want.iter().all(|w| log.contains(w)) || Instant::now() > until {
            break log;
        }
        thread::sleep(Duration::from_millis(100));
    };
    for w in want {
        assert!(log.contains(w), "{w:?} missing from the log:\n{log}");
    }
    assert!(
        !log.contains("Snapshot {"),
        "a request in debug form:\n{log}"
    );
    finish(store, d);
}

/// The config of a daemon with the metrics endpoint on (an ephemeral port).
const METRICS_CONFIG: &str =
    r#"(commit_interval_ms: 500, nbd: (workers: 4), metrics: (listen: "127.0.0.1:0"))"#;

/// `GET /metrics`, asserting a 200 in the text exposition format; returns the body.
fn scrape(d: &Daemon) -> String {
    let addr = d.metrics.expect("the daemon serves metrics");
    let (status, headers, body) = http_get(addr, "/metrics");
    assert!(status.contains(" 200 "), "{status}\n{headers}\n{body}");
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{headers}"
    );
    body
}

/// The value of the sample `name` whose labels include every pair in `labels`; `None` if
/// there is none (a series that has not appeared yet).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let have: Vec<&str> = rest.split(',').collect();
        let all = labels
            .iter()
            .all(|(k, v)| have.contains(&format!("{k}=\"{v}\"").as_str()));
        (n == name && all).then(|| value.parse().expect("a number"))
    })
}

/// TCP ports the process `pid` listens on (its sockets in LISTEN state, from /proc).
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the daemon's fds")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for l in text.lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().collect();
            // local_address is HEXIP:HEXPORT, st 0A is LISTEN, inode is field 9.
            if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
                let port = f[1].rsplit(':').next().unwrap();
                ports.push(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports.sort();
    ports
}

/// With `metrics.listen` set, a scrape over plain TCP shows what a real client (qemu-io) moved
/// through NBD, byte for byte, its latency histograms, the store's space and a checkpoint.
#[test]
fn metrics_count_what_an_nbd_client_moved() {
    let store = TestStore::new("512M");
    store.run(&["vdi", "create", "vm", "--size", "4M"]);
    let d = Daemon::start_with(&store, METRICS_CONFIG, &[]);
    let addr = d
        .metrics
        .expect("the ready line names the metrics endpoint");
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
    assert!(
        d.wait_stderr("metrics endpoint listening"),
        "{}",
        d.stderr()
    );
    assert!(!d.stderr().contains("reveal VDI names"), "{}", d.stderr());
    assert!(listening_ports(d.pid()).contains(&addr.port()));

    let export = [("export", "vm"), ("transport", "nbd")];
    let op = |op| [("export", "vm"), ("transport", "nbd"), ("op", op)];
    let before = scrape(&d);
    let val = |text: &str, name: &str, labels: &[(&str, &str)]| -> f64 {
        sample(text, name, labels).unwrap_or(0.0)
    };
    qemu_io(
        &d.uri("vm"),
        &[
            "write -P 0x5a 0 192k",
            "write -P 0x5b 1M 4k",
            "flush",
            "read -P 0x5a 0 64k",
            "read -P 0x5a 64k 64k",
        ],
    );
    let after = scrape(&d);
    let delta = |name: &str, labels: &[(&str, &str)]| {
        val(&after, name, labels) - val(&before, name, labels)
    };
    assert_eq!(
        delta("parallax_export_written_bytes_total", &export),
        (192 * 1024 + 4096) as f64,
        "{after}"
    );
    assert_eq!(
        delta("parallax_export_read_bytes_total", &export),
        (128 * 1024) as f64,
        "{after}"
    );
    let writes = delta("parallax_export_operations_total", &op("write"));
    assert!(writes >= 2.0, "{after}");
    assert_eq!(
        delta(
            "parallax_export_operation_duration_seconds_count",
            &op("write")
        ),
        writes,
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            "parallax_export_operation_duration_seconds_bucket",
            &[("op", "write"), ("export", "vm"), ("le", "+Inf")]
        ),
        sample(
            &after,
            "parallax_export_operation_duration_seconds_count",
            &op("write")
        ),
        "{after}"
    );
    assert!(delta("parallax_export_operations_total", &op("read")) >= 2.0);
    assert!(delta("parallax_export_operations_total", &op("flush")) >= 1.0);
    assert_eq!(
        val(&after, "parallax_export_errors_total", &op("write")),
        0.0,
        "{after}"
    );

    let free = sample(&after, "parallax_store_free_bytes", &[]).expect("free space");
    let capacity = sample(&after, "parallax_store_capacity_bytes", &[]).expect("capacity");
    assert!(free > 0.0 && free < capacity, "{after}");
    assert_eq!(sample(&after, "parallax_store_vdis", &[]), Some(1.0));
    assert!(sample(&after, "parallax_store_dirty_map_nodes", &[]).is_some());
    assert_eq!(sample(&after, "parallax_ring_devices", &[]), Some(0.0));

    // The writes are checkpointed within the commit interval; the hook times it.
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let text = scrape(&d);
        let n = val(
            &text,
            "parallax_store_checkpoint_duration_seconds_count",
            &[],
        );
        if n > 0.0 {
            break;
        }
        assert!(Instant::now() < until, "no checkpoint was timed:\n{text}");
        thread::sleep(Duration::from_millis(100));
    }

    for path in ["/", "/metrics/x", "/nope"] {
        let (status, _, _) = http_get(addr, path);
        assert!(status.contains(" 404 "), "{path}: {status}");
    }
    finish(store, d);
}

/// Without `metrics.listen` nothing serves metrics: the daemon listens on its NBD port alone
/// and says nothing about metrics.
#[test]
fn metrics_are_off_by_default() {
    let (store, d) = setup("4M");
    assert_eq!(d.metrics, None);
    assert_eq!(listening_ports(d.pid()), vec![d.port()]);
    qemu_io(&d.uri("vm"), &["write -P 0x11 0 4k"]);
    assert!(!d.stderr().contains("metrics"), "{}", d.stderr());
    finish(store, d);
}

/// A metrics address that cannot be had is a one-line startup error naming the setting, and
/// `--print-config` shows the flag's value.
#[test]
fn metrics_address_errors_and_print_config() {
    let store = TestStore::new("64M");
    let shown = store.run(&[
        "serve",
        "--metrics-listen",
        "127.0.0.1:9810",
        "--print-config",
    ]);
    assert!(shown.contains(r#"listen: "127.0.0.1:9810""#), "{shown}");
    let off = store.run(&["serve", "--print-config"]);
    assert!(
        off.contains("metrics: (") && off.contains("listen: None"),
        "{off}"
    );

    store
        .fail(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "nonsense",
        ])
        .assert_one_line(1, "metrics.listen: \"nonsense\" is not an address");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = taken.local_addr().unwrap().to_string();
    let unix = store.file("nbd.sock");
    let f = store.fail(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--unix",
        unix.to_str().unwrap(),
        "--metrics-listen",
        &a,
    ]);
    // The store was opened first (its log line comes before): the error is the last line.
    assert_eq!(f.code, Some(1), "{f:?}");
    let last = f.stderr.trim_end().lines().last().unwrap_or("");
    assert!(
        last.starts_with("parallax: error: cannot serve metrics on ")
            && last.contains(&format!("{a}: address in use")),
        "{f:?}"
    );
    drop(taken);
}

/// A blkif ring (frontend-shim, attached through the control socket) is counted twice: its
/// requests, segments and errors as the ring saw them, and its disk I/O under
/// `transport="ring"`. The counters outlive the attach.
#[test]
fn metrics_count_ring_requests() {
    use frontend_shim::{
        verify::{self, VerifyConfig},
        Frontend, FrontendConfig,
    };
    let store = TestStore::new("512M");
    store.run(&["vdi", "create", "vm", "--size", "4M"]);
    let d = Daemon::start_with(&store, METRICS_CONFIG, &[]);
    let mut front =
        Frontend::attach_store(&store.path, "vm", &FrontendConfig::default()).expect("attach");
    assert_eq!(sample(&scrape(&d), "parallax_ring_devices", &[]), Some(1.0));
    let r = verify::run(
        &mut front,
        &VerifyConfig {
            ops: 300,
            seed: 7,
            span: Some(2 * MIB as u64),
        },
    )
    .expect("verified I/O over the ring");
    front.detach().expect("detach");

    let ring = [("device", "vm")];
    let io = [("export", "vm"), ("transport", "ring")];
    let until = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = scrape(&d);
        if sample(&text, "parallax_ring_devices", &[]) == Some(0.0) || Instant::now() > until {
            break text;
        }
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(sample(&text, "parallax_ring_devices", &[]), Some(0.0));
    assert_eq!(
        sample(&text, "parallax_ring_requests_total", &ring),
        Some(r.ops as f64),
        "{r:?}\n{text}"
    );
    assert_eq!(
        sample(&text, "parallax_ring_errors_total", &ring),
        Some(r.expected_errors as f64),
        "{r:?}\n{text}"
    );
    // Every read and write carries at least one segment.
    let segments = sample(&text, "parallax_ring_segments_total", &ring).unwrap();
    assert!(segments >= (r.reads + r.writes) as f64, "{r:?}\n{text}");
    assert_eq!(
        sample(&text, "parallax_export_written_bytes_total", &io),
        Some(r.bytes_written as f64),
        "{r:?}\n{text}"
    );
    assert_eq!(
        sample(&text, "parallax_export_read_bytes_total", &io),
        Some(r.bytes_read as f64),
        "{r:?}\n{text}"
    );
    finish(store, d);
}

/// The automatic snapshots of `vdi`, oldest first.
fn auto_snapshots(store: &TestStore, vdi: &str) -> Vec<String> {
    let list = store.json(&["vdi", "list", "--json", "--prefix", &format!("{vdi}@auto-")]);
    let mut names: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

/// A schedule set through the CLI makes the daemon snapshot the VDI each period, under a
/// name that says when, and delete what the keep rules drop; it is still there, and still
/// acted on, after a kill -9 and a restart. Each snapshot holds what the VDI held then.
#[test]
fn scheduled_snapshots_are_taken_pruned_and_survive_a_restart() {
    let (store, d) = setup("1M");
    store.run(&["vdi", "snapshot", "vm", "gold"]);
    let mut c = d.nbd("vm");
    c.write(0, &[0x11; 4096]).unwrap();
    c.flush().unwrap();
    store.run(&["schedule", "set", "vm", "--every", "1s", "--keep", "1s:3s"]);
    // Snapshots come, and the window keeps at most 3 (and the newest) of them.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = std::collections::BTreeSet::new();
    loop {
        let now = auto_snapshots(&store, "vm");
        assert!(now.len() <= 4, "pruning keeps up: {now:?}");
        seen.extend(now.iter().cloned());
        let pruned = seen.iter().filter(|s| !now.contains(s)).count();
        if pruned >= 2 && now.len() >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no pruning in 30 s: {seen:?}");
        thread::sleep(Duration::from_millis(200));
    }
    assert!(d.wait_stderr("schedule: snapshot vm@auto-"));
    let snap = auto_snapshots(&store, "vm").pop().unwrap();
    assert!(
        snap.ends_with('Z') && snap.starts_with("vm@auto-20"),
        "{snap}"
    );
    let mut s = d.nbd(&snap);
    assert_eq!(s.read(0, 4096).unwrap(), vec![0x11; 4096]);
    drop(s);
    drop(c);
    let names = store.names();
    assert!(
        names.contains(&"vm@gold".to_string()),
        "hand-made snapshots stay"
    );

    d.kill9();
    let list = store.json(&["schedule", "list", "--json"]);
    assert_eq!(
        list[0]["target"], "vm",
        "the schedule survives kill -9: {list}"
    );
    let before = auto_snapshots(&store, "vm");
    let d = Daemon::start_with(&store, METRICS_CONFIG, &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while auto_snapshots(&store, "vm")
        .iter()
        .all(|s| before.contains(s))
    {
        assert!(Instant::now() < deadline, "no snapshot after the restart");
        thread::sleep(Duration::from_millis(200));
    }
    // The metrics count what the scheduler did since this daemon started.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = scrape(&d);
        let taken = sample(&m, "parallax_schedule_snapshots_taken_total", &[]).unwrap();
        let pruned = sample(&m, "parallax_schedule_snapshots_pruned_total", &[]).unwrap();
        assert_eq!(
            sample(&m, "parallax_schedule_failed_passes_total", &[]),
            Some(0.0)
        );
        if taken >= 1.0 && pruned >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "taken {taken}, pruned {pruned}");
        thread::sleep(Duration::from_millis(200));
    }
    store.run(&["schedule", "remove", "vm"]);
    d.stop();
    store.assert_clean();
}
