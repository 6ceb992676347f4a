//! Stores in format 2 (made by parallax before rollback and staging names) against this
//! parallax: read, written, log replayed, served as they are; rollback refused until
//! `upgrade`; upgraded in place and never misread.
//!
//! `fixtures/format2.store.gz` was made by the previous release (commit 748661e):
//! `init --size 16M`; `vdi import a` of the pattern below; `vdi snapshot a s1`;
//! `vdi fork a@s1 b`; `vdi create c --size 8M`; `vdi snapshot c empty`; then `serve`,
//! `qemu-io -c "write -P 0x5a 0 64k" -c flush nbd://…/b` and kill -9 of the daemon.

use parallax_integration::{
    daemon::Daemon,
    fixtures::{format, open_fixture, pattern},
};
use serde_json::Value;

#[test]
fn a_format_2_store_reads_writes_and_upgrades_for_rollback() {
    let a = pattern();
    let mut b = a.clone();
    b[..65536].fill(0x5a);
    let store = open_fixture(
        "format2.store.gz",
        2,
        &["a", "a@s1", "b", "c", "c@empty"],
        &[
            ("a", &a),
            ("a@s1", &a),
            ("b", &b),
            ("c@empty", &vec![0u8; 8 << 20]),
        ],
    );

    // Rollback needs format 3: refused, with the way forward, and nothing changes.
    store
        .fail(&["vdi", "rollback", "a@s1"])
        .assert_one_line(1, "parallax upgrade");
    assert_eq!(format(&store), 2);

    // Written in format 2 (an import goes under its own name there), directly and through
    // the daemon.
    let d_img: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    store.import("d", &d_img);
    let d = Daemon::start(&store);
    let mut c = d.nbd("a");
    c.write(0, &[0x11u8; 4096]).unwrap();
    c.flush().unwrap();
    drop(c);
    d.kill9();
    assert_eq!(
        format(&store),
        2,
        "nothing moves a store to a newer format but `upgrade`"
    );
    store.assert_clean();

    let up = store.json(&["upgrade", "--json"]);
    assert_eq!(
        up,
        serde_json::json!({"from": 2, "to": 7, "upgraded": true})
    );
    assert_eq!(format(&store), 7);
    let again: Value = store.json(&["upgrade", "--json"]);
    assert_eq!(again["upgraded"], false);
    store.assert_clean();
    assert_eq!(store.export("b"), b);
    assert_eq!(store.export("d")[..d_img.len()], d_img[..]);

    // Now rollback works, through the daemon too, and survives its kill -9 (the rollback is
    // replayed from the log).
    store.run(&["vdi", "rollback", "a@s1"]);
    assert_eq!(store.export("a"), a);
    let d = Daemon::start(&store);
    let mut c = d.nbd("a");
    c.write(8192, &[0x22u8; 4096]).unwrap();
    c.flush().unwrap();
    drop(c);
    store.run(&["vdi", "snapshot", "a@s2"]);
    store.run(&["vdi", "rollback", "a@s1"]);
    d.kill9();
    assert_eq!(store.export("a"), a);
    let mut a2 = a.clone();
    a2[8192..12288].fill(0x22);
    assert_eq!(store.export("a@s2"), a2);
    store.assert_clean();
}
