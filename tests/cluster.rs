//! Stores in a real Ceph cluster with their owners in a real etcd (both started for each test by
//! `scripts/cluster.sh`): every command on a `rados:` store, one host at a time, another host
//! taking over from one killed with `kill -9` with every flushed write, a frozen owner that wakes
//! up after the takeover changing nothing, an OSD killed under load and etcd restarted under
//! load losing nothing, and space going back to RADOS as VDIs are deleted.
//!
//! Hosts are `parallax` processes with their own `--host`, scratch directory and control
//! socket (on one machine they would otherwise share the abstract socket named after the
//! store).

use std::{
    path::PathBuf,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use parallax_integration::{cluster::Cluster, daemon::*};

const TTL_SECS: u64 = 2;

/// Host `name`'s view of store `store` in `c`'s pool.
fn host(c: &Cluster, store: &str, name: &str) -> TestStore {
    let dir = tempfile::tempdir().expect("tempdir");
    let ctl = dir.path().join("ctl.sock");
    TestStore {
        path: PathBuf::from(format!("rados:{}/{store}", c.pool)),
        args: vec![
            "--ceph-conf".into(),
            c.ceph_conf.display().to_string(),
            "--etcd".into(),
            c.etcd.clone(),
            "--host".into(),
            name.into(),
            "--lease-ttl".into(),
            TTL_SECS.to_string(),
            "--cache-dir".into(),
            dir.path().join("cache").display().to_string(),
        ],
        env: vec![("PARALLAX_CONTROL".into(), ctl.display().to_string())],
        dir,
    }
}

/// `parallax serve` on host `h`, with its own control socket.
fn serve(h: &TestStore) -> Daemon {
    let cfg = format!(
        "(commit_interval_ms: 500, nbd: (workers: 4), control_socket: \"{}\")",
        h.file("ctl.sock").display()
    );
    Daemon::start_with(h, &cfg, &[])
}

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(st.success(), "kill {sig} {pid}");
}

/// Reads `blocks` 4 KiB blocks of `export` through `d` and decodes their tags.
fn tags(d: &Daemon, export: &str, blocks: u64) -> Vec<Option<u64>> {
    let mut c = d.nbd(export);
    (0..blocks)
        .map(|b| block_tag(&c.read(b * 4096, 4096).expect("read")))
        .collect()
}

#[test]
fn every_command_works_on_a_store_in_rados_and_one_host_holds_it_at_a_time() {
    let c = Cluster::start(1);
    let a = host(&c, "s1", "hostA");
    let out = a.run(&["init", "--size", "1G"]);
    assert!(out.contains("created store rados:"), "{out}");
    assert!(a
        .fail(&["init", "--size", "1G"])
        .stderr
        .contains("exists already"));

    let img = image_with_holes(7, 4 << 20);
    a.import("template", &img);
    a.run(&["vdi", "snapshot", "template", "gold"]);
    a.run(&["vdi", "fork", "template@gold", "vm1"]);
    assert_eq!(a.names(), ["template", "template@gold", "vm1"]);
    assert_eq!(a.export("vm1"), img);
    a.assert_clean();
    let df = a.json(&["df", "--json"]);
    assert!(df["used_bytes"].as_u64().unwrap_or(0) > 0, "{df}");

    // The blocks are RADOS objects in the store's namespace.
    let out = c
        .rados()
        .args(["--namespace", "s1", "ls"])
        .output()
        .unwrap();
    let objects = String::from_utf8_lossy(&out.stdout);
    assert!(objects.lines().any(|l| l == "parallax.device"), "{objects}");
    assert!(objects.lines().count() > 1, "{objects}");

    // While host A serves it, host B cannot open it, and says who holds it.
    let d = serve(&a);
    let b = host(&c, "s1", "hostB");
    let f = b.fail(&["vdi", "list"]);
    assert!(f.stderr.contains("held by host hostA"), "{f:?}");
    assert_eq!(f.stderr.trim().lines().count(), 1, "{f:?}");
    // Host A's own commands go through its daemon.
    a.run(&["vdi", "fork", "template@gold", "vm2"]);
    // A planned stop lets go of the store at once: host B opens it without waiting a TTL.
    d.stop();
    let t = Instant::now();
    assert_eq!(b.names(), ["template", "template@gold", "vm1", "vm2"]);
    assert!(
        t.elapsed() < Duration::from_secs(TTL_SECS),
        "host B waited {:?} for a store nobody held",
        t.elapsed()
    );
    assert_eq!(b.export("vm2"), img);

    // Destroying the store leaves nothing of it in the pool or in etcd.
    let keys = || etcd_keys(&c, "/parallax/").join("\n");
    assert!(keys().contains("/s1/released"), "{}", keys());
    assert!(b.fail(&["destroy"]).stderr.contains("--yes"));
    let out = b.run(&["destroy", "--yes"]);
    assert!(out.contains("destroyed store"), "{out}");
    let out = c
        .rados()
        .args(["--namespace", "s1", "ls"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "", "objects left");
    assert_eq!(keys(), "", "etcd records left");
    assert!(b.fail(&["vdi", "list"]).stderr.contains("does not exist"));
}

/// Writes block `b` (tag `b + 1`) for `b` in `range`, flushing every `flush_every` writes; the
/// number of blocks a completed flush covered.
fn write_blocks(conn: &mut NbdConn, range: std::ops::Range<u64>, flush_every: u64) -> u64 {
    let mut flushed = range.start;
    for b in range.clone() {
        if conn.write(b * 4096, &tagged_block(b + 1)).is_err() {
            break;
        }
        if (b + 1 - range.start).is_multiple_of(flush_every) {
            if conn.flush().is_err() {
                break;
            }
            flushed = b + 1;
        }
    }
    flushed
}

/// What Parallax needs of the mons: reading maps, and the command that fences a host.
const MON_CAPS: &str = "allow r, allow command \"osd blocklist\"";

/// Makes Ceph user `client.NAME` with mon capabilities `mon` and read and write on the pool,
/// its key added to the cluster's keyring.
fn restricted_user(c: &Cluster, name: &str, mon: &str) {
    let out = Command::new("ceph")
        .arg("-c")
        .arg(&c.ceph_conf)
        .args(["auth", "get-or-create", &format!("client.{name}")])
        .args(["mon", mon])
        .args(["osd", &format!("allow rwx pool={}", c.pool)])
        .output()
        .expect("ceph auth get-or-create");
    assert!(out.status.success(), "{out:?}");
    let keyring = c.dir().join("keyring");
    let mut all = std::fs::read(&keyring).expect("the cluster's keyring");
    all.extend_from_slice(b"\n");
    all.extend_from_slice(&out.stdout);
    std::fs::write(&keyring, all).expect("write the keyring");
}

#[test]
fn another_host_takes_over_from_a_killed_owner_with_every_flushed_write() {
    const BLOCKS: u64 = 2048;
    let c = Cluster::start(1);
    // Both hosts connect as a user with only the capabilities the README names.
    restricted_user(&c, "px", MON_CAPS);
    let with_user = |mut h: TestStore| {
        h.args.extend(["--ceph-user".into(), "px".into()]);
        h
    };
    let a = with_user(host(&c, "s2", "hostA"));
    a.run(&["init", "--size", "1G"]);
    a.run(&["vdi", "create", "vm", "--size", "8M"]);
    let d = serve(&a);
    // A writer that keeps going until the daemon dies under it.
    let port = d.port();
    let writer = thread::spawn(move || {
        let mut conn = NbdConn::connect(port, "vm");
        write_blocks(&mut conn, 0..BLOCKS, 16)
    });
    thread::sleep(Duration::from_millis(1500));
    d.kill9();
    let flushed = writer.join().expect("writer");
    assert!(flushed > 0, "no flush completed before the kill");

    let b = with_user(host(&c, "s2", "hostB"));
    let t = Instant::now();
    let d = serve(&b);
    let took = t.elapsed();
    eprintln!("host B served the store {took:?} after host A was killed (TTL {TTL_SECS} s)");
    assert!(
        d.stderr().contains("fencing the last owner"),
        "{}",
        d.stderr()
    );
    let got = tags(&d, "vm", BLOCKS);
    for (b, t) in got.iter().enumerate() {
        let b = b as u64;
        if b < flushed {
            assert_eq!(
                *t,
                Some(b + 1),
                "block {b}, flushed before the kill, is not there"
            );
        } else {
            assert!(
                *t == Some(0) || *t == Some(b + 1),
                "block {b}: neither its old nor its new content: {t:?}"
            );
        }
    }
    let r = b.json(&["check", "--json"]);
    assert_eq!(r["ok"], true, "{r}");
}

/// A host whose Ceph user may not blocklist cannot fence a dead owner, so it does not take the
/// store: it says why, and leaves the dead owner named as the one to fence, so that a host
/// that can fence it still does.
#[test]
fn a_host_that_cannot_fence_the_last_owner_does_not_take_over() {
    let c = Cluster::start(1);
    restricted_user(&c, "nofence", "allow r");
    let a = host(&c, "s5", "hostA");
    a.run(&["init", "--size", "1G"]);
    a.run(&["vdi", "create", "vm", "--size", "1M"]);
    serve(&a).kill9();
    thread::sleep(Duration::from_secs(TTL_SECS + 1));

    let mut b = host(&c, "s5", "hostB");
    b.args.extend(["--ceph-user".into(), "nofence".into()]);
    let f = b.fail(&["vdi", "list"]);
    assert!(
        f.stderr.contains("blocklisting") && f.stderr.contains("ermission denied"),
        "{f:?}"
    );
    assert_eq!(f.stderr.trim().lines().count(), 1, "{f:?}");
    let key = |k: &str| {
        let o = c
            .etcdctl()
            .args([
                "get",
                "--print-value-only",
                &format!("/parallax/v1/stores/{}/s5/{k}", c.pool),
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert!(
        key("last-owner").contains("\"hostA\""),
        "{}",
        key("last-owner")
    );
    assert_eq!(key("owner"), "", "host B kept the store");

    // A host that may fence takes it, and fences host A.
    let h = host(&c, "s5", "hostC");
    let d = serve(&h);
    assert!(
        d.stderr().contains("fencing the last owner"),
        "{}",
        d.stderr()
    );
    d.stop();
    assert!(key("last-owner").is_empty(), "{}", key("last-owner"));
}

#[test]
fn a_frozen_owner_that_wakes_after_a_takeover_changes_nothing() {
    const BLOCKS: u64 = 256;
    let c = Cluster::start(1);
    let a = host(&c, "s3", "hostA");
    a.run(&["init", "--size", "1G"]);
    a.run(&["vdi", "create", "vm", "--size", "1M"]);
    let da = serve(&a);
    let mut ca = da.nbd("vm");
    assert_eq!(write_blocks(&mut ca, 0..64, 64), 64);
    // Acknowledged but not flushed: host A still holds these when it freezes.
    for b in 64..128 {
        ca.write(b * 4096, &tagged_block(1000 + b)).expect("write");
    }
    signal(da.pid(), "-STOP");

    // Host B waits out A's lease, fences A, and writes.
    let b = host(&c, "s3", "hostB");
    let db = serve(&b);
    let mut cb = db.nbd("vm");
    for blk in 0..32 {
        cb.write(blk * 4096, &tagged_block(5000 + blk))
            .expect("write through B");
    }
    cb.flush().expect("flush through B");
    let before = tags(&db, "vm", BLOCKS);

    // A wakes: what it holds, its commits and a client's new writes must not reach the store.
    signal(da.pid(), "-CONT");
    let late: Result<(), _> = (128..160)
        .try_for_each(|blk| ca.write(blk * 4096, &tagged_block(9000 + blk)))
        .and_then(|()| ca.flush());
    assert!(
        late.is_err(),
        "host A acknowledged a flush after host B took over"
    );
    // Several of A's commit intervals.
    thread::sleep(Duration::from_secs(2));
    let after = tags(&db, "vm", BLOCKS);
    for blk in 0..BLOCKS as usize {
        assert_eq!(
            before[blk], after[blk],
            "block {blk} changed after host A woke up"
        );
    }
    assert_eq!(before[0], Some(5000));
    assert_eq!(before[40], Some(41));
    drop(ca);
    // Host A stops serving by itself once etcd has told it its lease is gone, and says why.
    let (st, err) = da
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|err| panic!("host A still serves a store it no longer owns:\n{err}"));
    assert!(!st.success(), "host A exited with {st}: {err}");
    assert!(
        err.contains("stopped serving store") && err.contains("lease on it is gone"),
        "{err}"
    );
    db.stop();
    // What a third host opens afresh is what B served, block by block, and checks clean.
    let h = host(&c, "s3", "hostC");
    let img = h.export("vm");
    for blk in 0..BLOCKS as usize {
        assert_eq!(
            block_tag(&img[blk * 4096..(blk + 1) * 4096]),
            before[blk],
            "block {blk} on reopening"
        );
    }
    h.assert_clean();
}

/// Writes and flushes through `d` in a thread while `disturb` runs; then checks every block.
fn survives(c: &Cluster, store: &str, disturb: impl FnOnce()) {
    const BLOCKS: u64 = 1024;
    let a = host(c, store, "hostA");
    a.run(&["init", "--size", "1G"]);
    a.run(&["vdi", "create", "vm", "--size", "4M"]);
    let d = serve(&a);
    let port = d.port();
    let writer = thread::spawn(move || {
        let mut conn = NbdConn::connect(port, "vm");
        let start = Instant::now();
        let mut done = 0;
        // At least 3 s of writing, so that the disturbance lands in the middle of it.
        while done < BLOCKS || start.elapsed() < Duration::from_secs(3) {
            let b = done % BLOCKS;
            conn.write(b * 4096, &tagged_block(done + 1))
                .expect("a write failed");
            if done % 8 == 7 {
                conn.flush().expect("a flush failed");
            }
            done += 1;
        }
        conn.flush().expect("the last flush failed");
        done
    });
    thread::sleep(Duration::from_millis(700));
    disturb();
    let done = writer.join().expect("writer");
    let got = tags(&d, "vm", BLOCKS);
    for b in 0..BLOCKS {
        // The last write to block b had tag (the largest n < done with n % BLOCKS == b) + 1.
        let last = (done - 1 - b) / BLOCKS * BLOCKS + b;
        assert_eq!(got[b as usize], Some(last + 1), "block {b}");
    }
    d.stop();
    a.assert_clean();
}

#[test]
fn an_osd_killed_under_load_loses_nothing() {
    let c = Cluster::start(3);
    survives(&c, "s4", || c.kill_osd(c.osd_ids[1]));
}

#[test]
fn etcd_restarted_under_load_pauses_nothing_and_loses_nothing() {
    let c = Cluster::start(1);
    survives(&c, "s5", || {
        c.stop_etcd();
        thread::sleep(Duration::from_millis(500));
        c.start_etcd();
    });
}

#[test]
fn a_host_forks_a_template_that_another_host_serves_from_its_own_store() {
    let c = Cluster::start(1);
    // Host A owns store `a` with the template; host B owns store `b` in the same pool.
    let a = host(&c, "a", "hostA");
    a.run(&["init", "--size", "1G"]);
    let img = image_with_holes(11, 4 << 20);
    a.import("template", &img);
    a.run(&["vdi", "snapshot", "template", "gold"]);
    let da = serve(&a);
    let b = host(&c, "b", "hostB");
    b.run(&["init", "--size", "1G"]);
    b.run(&[
        "vdi",
        "create",
        "vm1",
        "--backing",
        &da.uri("template@gold"),
    ]);
    let db = serve(&b);
    // The fork on B reads the template through A, writes its own blocks into store `b`.
    let mut vm = db.nbd("vm1");
    assert_eq!(vm.read(0, 1 << 20).unwrap(), img[..1 << 20]);
    vm.write(4096, &tagged_block(77)).unwrap();
    vm.flush().unwrap();
    let mut want = img.clone();
    want[4096..8192].copy_from_slice(&tagged_block(77));
    let got = qemu_io(&db.uri("vm1"), &["read -v 0 8192"]);
    assert!(got.contains("read 8192/8192"), "{got}");
    drop(vm);
    db.stop();
    assert_eq!(b.export("vm1"), want);
    da.stop();
    assert_eq!(a.export("template"), img);
}

/// Reads the OSDs served so far (their `op_r` counters, over their admin sockets).
fn osd_reads(c: &Cluster) -> u64 {
    c.osd_ids
        .iter()
        .map(|id| {
            let sock = c.dir().join(format!("run/osd.{id}.asok"));
            let out = Command::new("ceph")
                .arg("--admin-daemon")
                .arg(&sock)
                .args(["perf", "dump"])
                .output()
                .expect("ceph --admin-daemon");
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("perf dump of osd.{id}: {e}"));
            v["osd"]["op_r"].as_u64().expect("osd.op_r")
        })
        .sum()
}

#[test]
fn a_hosts_cache_serves_repeated_reads_survives_restarts_and_is_dropped_after_another_owner() {
    const SIZE: usize = 8 << 20;
    let c = Cluster::start(1);
    let a = host(&c, "s6", "hostA");
    a.run(&["init", "--size", "1G"]);
    let img = image_with_holes(5, SIZE);
    a.import("template", &img);
    // The daemon's first read of the template comes from the cache the import filled (the CLI
    // saved it on close), and so do the second and the next daemon's.
    for round in 0..2 {
        let d = serve(&a);
        let before = osd_reads(&c);
        for _ in 0..2 {
            let mut conn = d.nbd("template");
            for at in (0..SIZE).step_by(1 << 20) {
                let got = conn.read(at as u64, 1 << 20).unwrap();
                assert!(
                    got == img[at..at + (1 << 20)],
                    "round {round}, MiB {}",
                    at >> 20
                );
            }
        }
        assert_eq!(osd_reads(&c), before, "round {round}: reads reached RADOS");
        d.stop();
    }

    // Another host changes the template; host A's cache is then stale and must not be used.
    let b = host(&c, "s6", "hostB");
    let db = serve(&b);
    let mut conn = db.nbd("template");
    conn.write(0, &tagged_block(42)).unwrap();
    conn.flush().unwrap();
    drop(conn);
    db.stop();
    let got = a.export("template");
    assert_eq!(
        block_tag(&got[..4096]),
        Some(42),
        "host A read its stale cache"
    );
    assert!(got[4096..] == img[4096..]);

    // A cache bound far below the data: evictions, the same bytes, and the file stays small.
    let mut small = host(&c, "s6", "hostA");
    small.args.extend(["--cache-size".into(), "64K".into()]);
    for _ in 0..2 {
        assert_eq!(block_tag(&small.export("template")[..4096]), Some(42));
    }
    let cached = small.file("cache").join(&c.pool).join("s6").join("blocks");
    let used = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&cached).unwrap()) * 512;
    assert!(
        used <= 128 << 10,
        "the cache file holds {used} bytes with a 64 KiB bound"
    );
}

/// The objects of `store`'s namespace in `c`'s pool, with their sizes.
fn objects(c: &Cluster, store: &str) -> Vec<(String, u64)> {
    let out = c
        .rados()
        .args(["--namespace", store, "ls"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let out = c
                .rados()
                .args(["--namespace", store, "stat", &name])
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let size = text
                .rsplit("size ")
                .next()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or_else(|| panic!("no size in {text}"));
            (name, size)
        })
        .collect()
}

/// Space goes back to RADOS: deleting every VDI and running `gc` leaves the namespace with
/// the store's own metadata only (the superblock, commit slots and refcount pages at the start
/// of the device), however much data it held.
#[test]
fn deleting_everything_and_gc_leaves_no_data_objects() {
    let c = Cluster::start(1);
    let a = host(&c, "s1", "hostA");
    a.run(&["init", "--size", "1G"]);
    for (i, name) in ["t1", "t2", "t3"].into_iter().enumerate() {
        a.import(name, &image_with_holes(i as u64 + 1, 12 << 20));
    }
    a.run(&["vdi", "snapshot", "t1", "gold"]);
    a.run(&["vdi", "fork", "t1@gold", "vm1"]);
    a.import("t4", &image_with_holes(9, 12 << 20));
    let full = objects(&c, "s1");
    let bytes = |objs: &[(String, u64)]| objs.iter().map(|(_, s)| s).sum::<u64>();
    assert!(bytes(&full) > 24 << 20, "{full:?}");

    // Deleting one VDI and running gc gives its objects back (without gc too, when the command
    // closes the store: seen by hand, docs/CLUSTER.md).
    a.run(&["vdi", "delete", "t4"]);
    a.run(&["gc"]);
    let some = objects(&c, "s1");
    assert!(bytes(&some) < bytes(&full) - (4 << 20), "{some:?}");

    for name in ["vm1", "t1", "t2", "t3"] {
        a.run(&["vdi", "delete", "-r", name]);
    }
    a.run(&["gc"]);
    a.assert_clean();
    // Group 0's data blocks start at block 1029 (FORMAT.md §2: the superblock, two commit
    // slots, two group headers, 1024 refcount page copies): no object holds a byte past that.
    let left = objects(&c, "s1");
    let data_start = 1029 * 4096;
    for (name, size) in &left {
        if name == "parallax.device" {
            continue;
        }
        let index = u64::from_str_radix(name, 16).expect("an object index");
        assert!(
            index * (4 << 20) + size <= data_start,
            "object {name} ({size} bytes) holds data blocks; left: {left:?}"
        );
    }
    assert!(left.len() <= 3, "{left:?}");
}

/// `cluster list --json` on host `h`, as (name, store, host) sorted.
fn directory(h: &TestStore) -> Vec<(String, String, Option<String>)> {
    let v = h.json(&["cluster", "list", "--json"]);
    let mut out: Vec<_> = v
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["store"].as_str().unwrap().to_string(),
                e["host"].as_str().map(str::to_string),
            )
        })
        .collect();
    out.sort();
    out
}

/// Waits (up to 15 s) until host `h`'s `cluster list` says `want`.
fn directory_says(h: &TestStore, want: &[(&str, &str, Option<&str>)]) {
    let want: Vec<(String, String, Option<String>)> = want
        .iter()
        .map(|(n, s, h)| (n.to_string(), s.to_string(), h.map(str::to_string)))
        .collect();
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let got = directory(h);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < until,
            "the directory says {got:?}, not {want:?}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// Every host sees every VDI of every store in the pool, with the host serving it: the owners
/// publish their stores' VDIs to etcd, and `cluster list` reads them on a host that owns
/// nothing. Changes made through a daemon and by a command on a store nobody serves both show.
#[test]
fn every_host_lists_every_vdi_of_the_pool_with_its_host() {
    let c = Cluster::start(1);
    let a = host(&c, "s1", "hostA");
    let b = host(&c, "s2", "hostB");
    let other = host(&c, "s9", "hostC");
    a.run(&["init", "--size", "1G"]);
    b.run(&["init", "--size", "1G"]);
    a.run(&["vdi", "create", "template", "--size", "4M"]);
    a.run(&["vdi", "snapshot", "template", "gold"]);
    // A command on a store nobody serves publishes when it closes the store.
    directory_says(
        &other,
        &[("template", "s1", None), ("template@gold", "s1", None)],
    );

    let da = serve(&a);
    let db = serve(&b);
    a.run(&["vdi", "fork", "template@gold", "vm1"]);
    b.run(&["vdi", "create", "vm2", "--size", "8M"]);
    directory_says(
        &other,
        &[
            ("template", "s1", Some("hostA")),
            ("template@gold", "s1", Some("hostA")),
            ("vm1", "s1", Some("hostA")),
            ("vm2", "s2", Some("hostB")),
        ],
    );
    let v = other.json(&["cluster", "list", "--json"]);
    let vm2 = v
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "vm2")
        .unwrap();
    assert_eq!(vm2["size"], 8 << 20, "{v}");
    assert_eq!(vm2["kind"], "vdi", "{v}");
    let text = other.run(&["cluster", "list"]);
    assert!(
        text.lines()
            .any(|l| l.starts_with("vm1 ") && l.ends_with("hostA")),
        "{text}"
    );

    a.run(&["vdi", "delete", "vm1"]);
    da.stop();
    db.stop();
    directory_says(
        &other,
        &[
            ("template", "s1", None),
            ("template@gold", "s1", None),
            ("vm2", "s2", None),
        ],
    );
    assert!(other
        .fail(&[
            "cluster",
            "list",
            "--pool",
            "nosuchpool",
            "--etcd",
            "http://127.0.0.1:9"
        ])
        .stderr
        .contains("cannot reach"));
}

/// Keys under `prefix` in etcd.
fn etcd_keys(c: &Cluster, prefix: &str) -> Vec<String> {
    let o = c
        .etcdctl()
        .args(["get", "--prefix", "--keys-only", prefix])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// A fork in host B's store of a snapshot in store `a`, read straight from RADOS: nobody
/// serves `a` while B reads, and host A's writes to the template after the fork do not show.
/// The hold B takes in etcd keeps A from deleting, renaming or destroying the snapshot until B
/// hydrates its fork; a hold that a crash left behind goes at B's next `gc`.
#[test]
fn a_fork_reads_another_stores_snapshot_straight_from_rados_and_holds_it() {
    let c = Cluster::start(1);
    let a = host(&c, "a", "hostA");
    a.run(&["init", "--size", "1G"]);
    let img = image_with_holes(21, 6 << 20);
    a.import("template", &img);
    a.run(&["vdi", "snapshot", "template", "gold"]);
    // Closing the store checkpointed it and published the snapshot's map root.
    let uri = format!("rados:{}/a/template@gold", c.pool);
    let b = host(&c, "b", "hostB");
    b.run(&["init", "--size", "1G"]);
    b.run(&["vdi", "create", "vm1", "--backing", &uri]);
    assert_eq!(
        etcd_keys(&c, &format!("/parallax/v1/stores/{}/a/holds/", c.pool)),
        [format!(
            "/parallax/v1/stores/{0}/a/holds/template@gold/by/{0}/b",
            c.pool
        )]
    );
    // Host A moves the template on; the snapshot stays as it was.
    let da = serve(&a);
    let mut t = da.nbd("template");
    t.write(0, &vec![0xee; 1 << 20]).unwrap();
    t.flush().unwrap();
    drop(t);
    da.stop();

    let db = serve(&b);
    let mut vm = db.nbd("vm1");
    assert!(
        vm.read(0, img.len() as u32).unwrap() == img,
        "vm1 reads as the snapshot"
    );
    vm.write(8192, &tagged_block(5)).unwrap();
    vm.flush().unwrap();
    let mut want = img.clone();
    want[8192..12288].copy_from_slice(&tagged_block(5));
    drop(vm);
    let got = qemu_io(&db.uri("vm1"), &["read -v 8192 16"]);
    assert!(got.contains("read 16/16"), "{got}");

    // Every host sees the hold.
    let text = b.run(&["cluster", "list"]);
    assert!(
        text.lines()
            .any(|l| l.starts_with("template@gold ")
                && l.ends_with(&format!("(held by {}/b)", c.pool))),
        "{text}"
    );
    // Store a keeps the held snapshot: one line naming who holds it.
    let held = format!("store rados:{}/b", c.pool);
    a.fail(&["vdi", "delete", "template@gold"])
        .assert_one_line(1, &held);
    a.fail(&["vdi", "delete", "-r", "template"])
        .assert_one_line(1, &held);
    a.fail(&["vdi", "rename", "template@gold", "template@old"])
        .assert_one_line(1, &held);
    assert!(a
        .fail(&["destroy", "--yes"])
        .stderr
        .contains("template@gold by"));
    assert!(a.names().contains(&"template@gold".to_string()));
    // Snapshots nobody holds go as before.
    a.run(&["vdi", "snapshot", "template", "newer"]);
    a.run(&["vdi", "delete", "template@newer"]);

    // Hydrated, vm1 no longer reads through a's snapshot and lets it go.
    b.run(&["vdi", "hydrate", "vm1"]);
    assert!(etcd_keys(&c, &format!("/parallax/v1/stores/{}/a/holds/", c.pool)).is_empty());
    a.run(&["vdi", "delete", "template@gold"]);
    db.stop();
    assert!(b.export("vm1") == want, "vm1 after hydrate");
    b.assert_clean();
    a.assert_clean();

    // A hold left by a crash (between the hold and its VDI) goes at B's next gc.
    a.run(&["vdi", "snapshot", "template", "gold2"]);
    let uri2 = format!("rados:{}/a/template@gold2", c.pool);
    b.run(&["vdi", "create", "vm2", "--backing", &uri2]);
    b.run(&["vdi", "delete", "vm2"]);
    assert!(etcd_keys(&c, "/parallax/v1/holders/").is_empty());
    for key in [
        format!(
            "/parallax/v1/stores/{0}/a/holds/template@gold2/by/{0}/b",
            c.pool
        ),
        format!("/parallax/v1/holders/{}/b/{uri2}", c.pool),
    ] {
        let st = c.etcdctl().args(["put", &key, "{}"]).status().unwrap();
        assert!(st.success());
    }
    a.fail(&["vdi", "delete", "template@gold2"])
        .assert_one_line(1, &held);
    let out = b.run(&["gc"]);
    assert!(out.contains("released 1 hold"), "{out}");
    assert!(etcd_keys(&c, "/parallax/v1/holders/").is_empty());
    a.run(&["vdi", "delete", "template@gold2"]);
}
