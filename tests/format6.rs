//! Stores in format 6 (made by parallax before dedup) against this parallax: read, written,
//! log replayed, never deduplicated (no index to keep right); `dedup` refused until
//! `upgrade`; upgraded in place, after which a pass finds the copies already stored.
//!
//! `fixtures/format6.store.gz` was made by the previous release (commit 396fa17):
//! `init --size 16M`; `vdi import a` of the pattern below; `vdi snapshot a s1`;
//! `vdi fork a@s1 b`; then `serve`, `qemu-io -c "write -P 0x5a 0 64k" -c flush nbd://…/b`
//! and kill -9 of the daemon (so the write is in the log only).

use parallax_integration::{
    daemon::Daemon,
    fixtures::{format, names, open_fixture, pattern},
};

#[test]
fn a_format_6_store_reads_writes_and_upgrades_for_dedup() {
    let a = pattern();
    let mut b = a.clone();
    b[..65536].fill(0x5a);
    const NAMES: [&str; 3] = ["a", "a@s1", "b"];
    let store = open_fixture(
        "format6.store.gz",
        6,
        &NAMES,
        &[("a", &a), ("a@s1", &a), ("b", &b)],
    );

    // Dedup needs format 7: refused, with the way forward; the status says why.
    store
        .fail(&["dedup"])
        .assert_one_line(1, "parallax upgrade");
    let st = store.json(&["dedup", "status", "--json"]);
    assert_eq!(st["supported"], false);
    assert_eq!(st["inline"], false);

    // Written in format 6 through the daemon (the same block twice: stored twice, as format
    // 6 does), replayed after kill -9, still format 6.
    let used = store.json(&["df", "--json"])["stored_bytes"]
        .as_u64()
        .unwrap();
    let d = Daemon::start(&store);
    let mut c = d.nbd("a");
    c.write(0, &[0x11u8; 4096]).unwrap();
    c.write(8192, &[0x11u8; 4096]).unwrap();
    c.flush().unwrap();
    drop(c);
    d.kill9();
    assert_eq!(format(&store), 6);
    let mut a1 = a.clone();
    a1[..4096].fill(0x11);
    a1[8192..12288].fill(0x11);
    assert_eq!(store.export("a"), a1);
    let df = store.json(&["df", "--json"]);
    assert_eq!(df["dedup"]["index_entries"], 0, "{df:#}");
    // Blocks 0 and 2 of `a` were a zero block and a data block the snapshot keeps.
    assert_eq!(
        df["stored_bytes"].as_u64().unwrap(),
        used + 2 * 4096,
        "{df:#}"
    );
    store.assert_clean();

    let up = store.json(&["upgrade", "--json"]);
    assert_eq!(
        up,
        serde_json::json!({"from": 6, "to": 7, "upgraded": true})
    );
    assert_eq!(format(&store), 7);
    store.assert_clean();
    assert_eq!(store.export("a"), a1);
    assert_eq!(store.export("b"), b);
    assert_eq!(names(&store), NAMES);

    // A pass enters what is stored and shares the copies it may, in map nodes only one tree
    // reaches: `b`'s 16 blocks of 0x5a (15 copies), `a`'s two blocks of 0x11 (one), and the
    // pattern's block 2 in `a@s1`, which is the same as its block 253 (i·7 mod 251 repeats
    // from 251 on). Each copy was its block's last reference.
    let r = store.json(&["dedup", "--json"]);
    assert_eq!(r["blocks_shared"], 15 + 1 + 1, "{r:#}");
    let after = store.json(&["df", "--json"]);
    assert_eq!(
        df["stored_bytes"].as_u64().unwrap() - after["stored_bytes"].as_u64().unwrap(),
        17 * 4096,
        "{after:#}"
    );
    assert_eq!(store.export("a"), a1);
    assert_eq!(store.export("b"), b);
    store.assert_clean();
    // And from now on writes dedup inline.
    let d = Daemon::start(&store);
    let mut c = d.nbd("b");
    c.write(65536, &[0x5au8; 4096]).unwrap();
    c.flush().unwrap();
    drop(c);
    d.stop();
    let last = store.json(&["df", "--json"]);
    assert_eq!(last["stored_bytes"], after["stored_bytes"], "{last:#}");
    store.assert_clean();
}
