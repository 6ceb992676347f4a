//! Stores in format 4 (made by parallax before remote-backed VDIs) against this parallax:
//! read, written, log replayed, schedules kept; backed VDIs refused until `upgrade`; upgraded
//! in place and never misread.
//!
//! `fixtures/format4.store.gz` was made by the previous release (commit 1b55bb1):
//! `init --size 16M`; `vdi import a` of the pattern below; `vdi snapshot a s1`;
//! `vdi fork a@s1 b`; `schedule set a --every 1h`; then `serve` (whose scheduler took
//! `a@auto-2026-12-06T19:00:00Z` at once), `qemu-io -c "write -P 0x5a 0 64k" -c flush
//! nbd://…/b` and kill -9 of the daemon.

use parallax_integration::{
    daemon::Daemon,
    fixtures::{format, names, open_fixture, pattern},
};

#[test]
fn a_format_4_store_reads_writes_and_upgrades_for_backed_vdis() {
    let a = pattern();
    let mut b = a.clone();
    b[..65536].fill(0x5a);
    // The logged snapshots are replayed.
    const NAMES: [&str; 4] = ["a", "a@auto-2026-12-06T19:00:00Z", "a@s1", "b"];
    let store = open_fixture(
        "format4.store.gz",
        4,
        &NAMES,
        &[("a", &a), (NAMES[1], &a), ("a@s1", &a), ("b", &b)],
    );
    let schedules = store.json(&["schedule", "list", "--json"]);
    assert_eq!(schedules[0]["target"], "a");

    // Backed VDIs need format 5: refused before anything is asked of the remote, with the
    // way forward, and nothing changes.
    store
        .fail(&["vdi", "create", "x", "--backing", "nbd://127.0.0.1:9/none"])
        .assert_one_line(1, "parallax upgrade");
    assert_eq!(format(&store), 4);
    assert_eq!(names(&store), NAMES);

    // Written in format 4 through the daemon, replayed after kill -9, still format 4.
    let d = Daemon::start(&store);
    let mut c = d.nbd("a");
    c.write(0, &[0x11u8; 4096]).unwrap();
    c.flush().unwrap();
    drop(c);
    d.kill9();
    assert_eq!(format(&store), 4);
    let mut a1 = a.clone();
    a1[..4096].fill(0x11);
    assert_eq!(store.export("a"), a1);
    store.assert_clean();

    let up = store.json(&["upgrade", "--json"]);
    assert_eq!(
        up,
        serde_json::json!({"from": 4, "to": 7, "upgraded": true})
    );
    assert_eq!(format(&store), 7);
    store.assert_clean();
    assert_eq!(store.export("a"), a1);
    assert_eq!(store.export("b"), b);
    // Now the format is not what stops a backed VDI: an unreachable remote is.
    store
        .fail(&["vdi", "create", "x", "--backing", "nbd://127.0.0.1:9/none"])
        .assert_one_line(1, "127.0.0.1:9");
    // (The daemon above may have taken another automatic snapshot: it runs the schedule.)
    assert!(!names(&store).iter().any(|n| n.starts_with('x')));
}
