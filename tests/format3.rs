//! Stores in format 3 (made by parallax before snapshot schedules) against this parallax:
//! read, written, log replayed (a rollback and a snapshot in it), served as they are;
//! schedules refused until `upgrade`; upgraded in place and never misread.
//!
//! `fixtures/format3.store.gz` was made by the previous release (commit b329145):
//! `init --size 16M`; `vdi import a` of the pattern below; `vdi snapshot a s1`;
//! `vdi fork a@s1 b`; `vdi send a@s1 -o s1.stream`; `vdi recv r s1.stream`; then `serve`,
//! `qemu-io -c "write -P 0x5a 0 64k" -c flush nbd://…/b`,
//! `qemu-io -c "write -P 0x33 4096 4k" -c flush nbd://…/a`, `vdi rollback a@s1`,
//! `vdi snapshot b t1` (both through the daemon) and kill -9 of the daemon.

use parallax_integration::{
    daemon::Daemon,
    fixtures::{format, open_fixture, pattern},
};

#[test]
fn a_format_3_store_reads_writes_and_upgrades_for_schedules() {
    let a = pattern();
    let mut b = a.clone();
    b[..65536].fill(0x5a);
    // `a`: the logged rollback is replayed.
    let store = open_fixture(
        "format3.store.gz",
        3,
        &["a", "a@s1", "b", "b@t1", "r", "r@s1"],
        &[("a", &a), ("b", &b), ("b@t1", &b), ("r@s1", &a)],
    );

    // Schedules need format 4: refused, with the way forward, and nothing changes.
    store
        .fail(&["schedule", "set", "a", "--every", "1h"])
        .assert_one_line(1, "parallax upgrade");
    assert_eq!(format(&store), 3);

    // Written in format 3, through the daemon, and replayed after kill -9.
    let d = Daemon::start(&store);
    let mut c = d.nbd("a");
    c.write(0, &[0x11u8; 4096]).unwrap();
    c.flush().unwrap();
    drop(c);
    store.run(&["vdi", "rollback", "b@t1"]);
    d.kill9();
    assert_eq!(
        format(&store),
        3,
        "nothing moves a store to a newer format but `upgrade`"
    );
    let mut a1 = a.clone();
    a1[..4096].fill(0x11);
    assert_eq!(store.export("a"), a1);
    store.assert_clean();

    let up = store.json(&["upgrade", "--json"]);
    assert_eq!(
        up,
        serde_json::json!({"from": 3, "to": 7, "upgraded": true})
    );
    assert_eq!(format(&store), 7);
    store.assert_clean();
    assert_eq!(store.export("a"), a1);
    assert_eq!(store.export("b"), b);

    // Now schedules work, and the daemon acts on them.
    store.run(&["schedule", "set", "a", "--every", "1s"]);
    let d = Daemon::start(&store);
    assert!(d.wait_stderr("schedule: snapshot a@auto-"));
    d.kill9();
    let list = store.json(&["schedule", "list", "--json"]);
    assert_eq!(list[0]["target"], "a");
    assert_eq!(format(&store), 7);
    store.assert_clean();
}
