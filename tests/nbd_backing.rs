//! Remote-backed VDIs (`vdi create NAME --backing URI`, `vdi hydrate`): a VDI served by one
//! Parallax daemon that reads through another host's export — a Parallax daemon over TLS, or
//! qemu-nbd — keeping what it fetched, read and written by qemu-img and qemu-io.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use parallax_integration::{daemon::*, nbd::*};
use serde_json::Value;

const MIB: usize = 1 << 20;

/// A 24 MiB template: random data at 0–3 MiB and 16–17 MiB, zeros elsewhere.
fn template_image() -> Vec<u8> {
    let mut img = vec![0u8; 24 * MIB];
    img[..3 * MIB].copy_from_slice(&random_bytes(7, 3 * MIB));
    img[16 * MIB..17 * MIB].copy_from_slice(&random_bytes(8, MIB));
    img
}

/// What a daemon reading through a backing is configured with: a short reconnect delay.
const DST_CONFIG: &str =
    "(commit_interval_ms: 500, nbd: (workers: 4), backing: (reconnect_delay_secs: 2))";

fn qemu_img_read(uri: &str, store: &TestStore, file: &str) -> Vec<u8> {
    let out = store.file(file);
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", uri])
            .arg(&out),
    );
    std::fs::read(out).unwrap()
}

fn info(store: &TestStore, name: &str) -> Value {
    store.json(&["vdi", "info", name, "--json"])
}

/// Over TLS from a Parallax host: every byte as the template has it, each fetched once and
/// kept (forks and snapshots share it, restarts keep it), writes local, then hydrated with
/// the source gone.
#[test]
fn a_vdi_backed_by_a_parallax_host_over_tls() {
    let img = template_image();
    let (src, s) = tls_source_host(&img);
    let backing = format!(
        "nbds://alice@127.0.0.1:{}/tmpl@v1?tls-psk-file={}",
        s.port(),
        src.file("keys.psk").display()
    );

    let dst = TestStore::new("256M");
    let d = Daemon::start_with(&dst, DST_CONFIG, &[]);
    let v = dst.json(&["vdi", "create", "vm", "--backing", &backing, "--json"]);
    assert_eq!(v["size"], img.len() as u64, "{v}");
    let i = info(&dst, "vm");
    assert_eq!(i["backing"]["remote_bytes"], img.len() as u64, "{i}");
    assert_eq!(i["allocated"], 0);

    // Read by qemu-img through the destination: the template, byte for byte.
    assert!(qemu_img_read(&d.uri("vm"), &dst, "a.raw") == img);
    let i = info(&dst, "vm");
    assert_eq!(i["backing"]["remote_bytes"], 0, "{i}");
    assert_eq!(i["backing"]["cached_bytes"], img.len() as u64, "{i}");
    let fetched = i["backing"]["state"].as_str().unwrap().to_string();
    assert!(
        fetched.starts_with("reachable; 4.0 MiB fetched"),
        "{fetched}"
    );

    // A snapshot and a fork read the same cache: nothing more crosses the network.
    dst.run(&["vdi", "snapshot", "vm@s1"]);
    dst.run(&["vdi", "fork", "vm@s1", "vm2"]);
    assert!(qemu_img_read(&d.uri("vm2"), &dst, "b.raw") == img);
    assert_eq!(info(&dst, "vm2")["backing"]["state"], fetched.as_str());

    // Writes stay local: data, zeros over the template's data, a trim.
    let mut vm = img.clone();
    qemu_io(
        &d.uri("vm"),
        &[
            "write -P 0x61 1M 64k",
            "write -z 0 128k",
            "discard 2M 64k",
            "write -P 0x62 5000 100",
        ],
    );
    vm[MIB..MIB + 65536].fill(0x61);
    vm[..131072].fill(0);
    vm[2 * MIB..2 * MIB + 65536].fill(0);
    vm[5000..5100].fill(0x62);
    assert!(qemu_img_read(&d.uri("vm"), &dst, "c.raw") == vm);
    assert!(qemu_img_read(&d.uri("vm2"), &dst, "d.raw") == img);

    // The source goes away and the destination restarts: everything was kept.
    drop(s);
    d.kill9();
    let d = Daemon::start_with(&dst, DST_CONFIG, &[]);
    assert!(qemu_img_read(&d.uri("vm"), &dst, "e.raw") == vm);
    let df = dst.json(&["df", "--json"]);
    assert_eq!(df["remote_caches"], 1, "{df}");
    assert_eq!(df["vdis"], 2, "the cache is not a VDI of the user's: {df}");

    // Hydrate, through the daemon, with the source still gone: all of it is here.
    let h = dst.json(&["vdi", "hydrate", "vm", "--json"]);
    assert_eq!(h["name"], "vm", "{h}");
    assert!(info(&dst, "vm").get("backing").is_none());
    assert!(qemu_img_read(&d.uri("vm"), &dst, "f.raw") == vm);
    drop(d);
    assert!(dst.export("vm") == vm);
    dst.assert_clean();
    // The cache goes with the last VDI that reads through it.
    dst.run(&["vdi", "delete", "-r", "vm"]);
    dst.run(&["vdi", "delete", "vm2"]);
    let df = dst.json(&["df", "--json"]);
    assert_eq!(df["remote_caches"], 0, "{df}");
    dst.assert_clean();
}

/// A store to test in, the template written to a raw file in it and served by qemu-nbd on
/// a unix socket, and that export's URI.
fn template_on_qemu_nbd() -> (TestStore, Vec<u8>, QemuNbd, String) {
    let dst = TestStore::new("256M");
    let img = template_image();
    write_file(&dst.file("src.raw"), &img);
    let q = QemuNbd::start(&dst.file("src.raw"), &dst.file("q.sock"));
    let backing = format!("nbd+unix:///base?socket={}", dst.file("q.sock").display());
    (dst, img, q, backing)
}

/// qemu-nbd as the backing, which goes away: cached reads and whole-block writes go on, an
/// uncached read waits the reconnect delay and fails with EIO, and once the export is back
/// the next read fetches it; then hydrate.
#[test]
fn an_unreachable_backing_fails_uncached_reads_only_and_comes_back() {
    let (dst, img, q, backing) = template_on_qemu_nbd();
    let d = Daemon::start_with(&dst, DST_CONFIG, &[]);
    dst.run(&[
        "vdi",
        "create",
        "vm",
        "--backing",
        &backing,
        "--size",
        "32M",
    ]);
    assert_eq!(info(&dst, "vm")["size"], 32 * MIB as u64);
    let uri = d.uri("vm");
    qemu_io(&uri, &["read 0 1M"]);

    drop(q);
    // Cached: at once. Past the export's end (the VDI is larger): zeros, no remote needed.
    let t = Instant::now();
    qemu_io(
        &uri,
        &[
            "read 0 1M",
            "read -P 0 24M 1M",
            "write -P 0x44 20M 64k",
            "read -P 0x44 20M 64k",
        ],
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // Not cached: waits for the export, then EIO.
    let t = Instant::now();
    let out = Command::new("qemu-io")
        .args(["-f", "raw", &uri, "-c", "read 16M 4k"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("read failed: Input/output error"), "{text}");
    assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
    let state = info(&dst, "vm")["backing"]["state"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(state.starts_with("unreachable for"), "{state}");
    assert!(d.wait_stderr("reconnecting"));

    // Back: the next read fetches, without anyone reconnecting by hand.
    let _q = QemuNbd::start(&dst.file("src.raw"), &dst.file("q.sock"));
    qemu_io(&uri, &["read 16M 4k"]);
    assert!(info(&dst, "vm")["backing"]["state"]
        .as_str()
        .unwrap()
        .starts_with("reachable"));
    assert!(d.wait_stderr("reachable again"));

    let mut vm = img.clone();
    vm.resize(32 * MIB, 0);
    vm[20 * MIB..20 * MIB + 65536].fill(0x44);
    dst.run(&["vdi", "hydrate", "vm"]);
    drop(_q);
    assert!(qemu_img_read(&uri, &dst, "vm.raw") == vm);
    drop(d);
    dst.assert_clean();
}

/// With `backing.hydrate_bytes_per_sec`, the daemon hydrates by itself: the VDI is cut loose
/// from its backing without anyone asking, and then needs it no more.
#[test]
fn the_daemon_hydrates_in_the_background() {
    let (dst, img, q, backing) = template_on_qemu_nbd();
    let d = Daemon::start_with(
        &dst,
        "(nbd: (workers: 2), backing: (hydrate_bytes_per_sec: 33554432))",
        &[],
    );
    dst.run(&["vdi", "create", "vm", "--backing", &backing]);
    assert!(
        d.wait_stderr("hydrate: vm no longer reads through"),
        "{}",
        d.stderr()
    );
    assert!(info(&dst, "vm").get("backing").is_none());
    drop(q);
    assert!(qemu_img_read(&d.uri("vm"), &dst, "vm.raw") == img);
    let df = dst.json(&["df", "--json"]);
    assert_eq!(df["remote_caches"], 0, "{df}");
    drop(d);
    dst.assert_clean();
}

/// Parallax to Parallax: the source offers each block's hash (`parallax:hash:0..5`, read
/// here by nbdinfo too), so the destination skips what reads as zeros, verifies what it
/// fetches, and a second template derived from the first costs only what differs.
#[test]
fn block_hashes_make_a_derived_template_cost_only_the_difference() {
    let src = TestStore::new("256M");
    let img = template_image();
    src.import("t", &img);
    src.run(&["vdi", "snapshot", "t@v1"]);
    src.run(&["vdi", "fork", "t@v1", "t2"]);
    let s = Daemon::start(&src);
    let mut t2 = img.clone();
    t2[MIB..2 * MIB].copy_from_slice(&random_bytes(9, MIB));
    let mut c = s.nbd("t2");
    c.write(MIB as u64, &t2[MIB..2 * MIB]).unwrap();
    c.flush().unwrap();
    drop(c);
    src.run(&["vdi", "snapshot", "t2@v1"]);

    // What nbdinfo reads of the six contexts is the blocks' blake3, 24 bytes.
    let mut h = [0u8; 24];
    for k in 0..6 {
        let out = output_ok(Command::new("nbdinfo").args([
            &format!("--map=parallax:hash:{k}"),
            "--json",
            &s.uri("t@v1"),
        ]));
        let map: Value = serde_json::from_slice(&out.stdout).unwrap();
        let second = &map[1];
        assert_eq!(
            (second["offset"].as_u64(), second["length"].as_u64()),
            (Some(4096), Some(4096)),
            "{map}"
        );
        h[4 * k..4 * k + 4]
            .copy_from_slice(&(second["type"].as_u64().unwrap() as u32).to_be_bytes());
    }
    assert_eq!(h, parallax::store::format::hash24(&img[4096..8192]));

    let dst = TestStore::new("256M");
    let d = Daemon::start_with(&dst, DST_CONFIG, &[]);
    let fetched = |name: &str| {
        info(&dst, name)["backing"]["state"]
            .as_str()
            .unwrap()
            .to_string()
    };
    dst.run(&["vdi", "create", "vm1", "--backing", &s.uri("t@v1")]);
    assert!(qemu_img_read(&d.uri("vm1"), &dst, "1.raw") == img);
    assert!(
        fetched("vm1").contains("; 4.0 MiB fetched"),
        "only the data: {}",
        fetched("vm1")
    );
    dst.run(&["vdi", "create", "vm2", "--backing", &s.uri("t2@v1")]);
    assert!(qemu_img_read(&d.uri("vm2"), &dst, "2.raw") == t2);
    assert!(
        fetched("vm2").contains("; 1.0 MiB fetched"),
        "only what differs: {}",
        fetched("vm2")
    );
    drop(d);
    dst.assert_clean();
}

/// Bad input is one line and leaves nothing behind.
#[test]
fn backed_vdis_refuse_what_they_cannot_do() {
    let dst = TestStore::new("64M");
    dst.fail(&["vdi", "create", "x", "--backing", "/tmp/file.raw"])
        .assert_one_line(1, "NBD URI");
    dst.fail(&["vdi", "create", "x", "--backing", "nbd://127.0.0.1:1/none"])
        .assert_one_line(1, "Connection refused");
    let f = dst.fail(&["vdi", "create", "x"]);
    assert_eq!(f.code, Some(2), "{f:?}");
    assert!(f.stderr.contains("--size"), "{f:?}");
    dst.run(&["vdi", "create", "plain", "--size", "1M"]);
    dst.fail(&["vdi", "hydrate", "plain"])
        .assert_one_line(1, "not backed");
    let list = dst.json(&["vdi", "list", "--json"]);
    assert_eq!(list.as_array().map(|a| a.len()), Some(1), "{list}");
    dst.assert_clean();
}
