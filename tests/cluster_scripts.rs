//! `scripts/cluster.sh` through the test harness: a real Ceph (cephx, memstore) and etcd come
//! up in a temporary directory, serve a RADOS and an etcd round trip, and leave no process
//! behind once dropped.

use std::{process::Output, time::Instant};

use parallax_integration::cluster::{processes_mentioning, Cluster};

fn ok(what: &str, o: Output) -> String {
    assert!(
        o.status.success(),
        "{what} failed ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("utf-8 output")
}

#[test]
fn one_osd_cluster_round_trips_and_stops_clean() {
    let t = Instant::now();
    let c = Cluster::start(1);
    eprintln!("cluster up in {:.2?} in {}", t.elapsed(), c.dir().display());
    assert_eq!(c.osd_ids, vec![0]);
    assert_eq!(c.pool, "parallax");
    assert!(c.ceph_conf.is_file());
    let names: Vec<String> = c.pids().into_iter().map(|(n, _)| n).collect();
    assert!(
        names.contains(&"mon.a".into())
            && names.contains(&"osd.0".into())
            && names.contains(&"etcd".into()),
        "{names:?}"
    );

    // RADOS: write an object, read it back, through the client config the cluster wrote.
    let file = c.dir().join("object.in");
    std::fs::write(&file, b"parallax cluster test\n").unwrap();
    ok(
        "rados put",
        c.rados().arg("put").arg("obj").arg(&file).output().unwrap(),
    );
    let got = ok(
        "rados get",
        c.rados().args(["get", "obj", "-"]).output().unwrap(),
    );
    assert_eq!(got, "parallax cluster test\n");

    // etcd.
    ok(
        "etcdctl put",
        c.etcdctl()
            .args(["put", "/px/test", "v1"])
            .output()
            .unwrap(),
    );
    let got = ok(
        "etcdctl get",
        c.etcdctl()
            .args(["get", "/px/test", "--print-value-only"])
            .output()
            .unwrap(),
    );
    assert_eq!(got.trim(), "v1");

    // etcd restarted on the same port keeps its data.
    c.stop_etcd();
    c.start_etcd();
    let got = ok(
        "etcdctl get after restart",
        c.etcdctl()
            .args(["get", "/px/test", "--print-value-only"])
            .output()
            .unwrap(),
    );
    assert_eq!(got.trim(), "v1");

    let dir = c.dir().to_path_buf();
    assert!(
        !processes_mentioning(&dir).is_empty(),
        "the daemons should show up in /proc"
    );
    drop(c);
    let left = processes_mentioning(&dir);
    assert!(left.is_empty(), "processes left behind: {left:?}");
    assert!(!dir.exists(), "{} should be gone", dir.display());
}
