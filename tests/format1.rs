//! Stores in format 1 (made by parallax before the intent log) against this parallax: read
//! and written as they are, served, upgraded in place, and never misread.
//!
//! `fixtures/format1.store.gz` was made by the previous release (commit cef23d6):
//! `init --size 16M`; `vdi import a` of the pattern below; `vdi snapshot a s1`;
//! `vdi fork a@s1 b`; `vdi create c --size 8M`; `vdi snapshot c empty`.

use parallax_integration::{
    daemon::Daemon,
    fixtures::{format, open_fixture, pattern},
};
use serde_json::Value;

#[test]
fn a_format_1_store_reads_writes_serves_and_upgrades() {
    let a = pattern();
    let store = open_fixture(
        "format1.store.gz",
        1,
        &["a", "a@s1", "b", "c", "c@empty"],
        &[("a", &a), ("b", &a), ("c@empty", &vec![0u8; 8 << 20])],
    );

    // Written in format 1, directly and through the daemon (flushes checkpoint).
    let d_img: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    store.import("d", &d_img);
    let d = Daemon::start(&store);
    let mut c = d.nbd("b");
    c.write(4096, &[0xabu8; 8192]).unwrap();
    c.flush().unwrap();
    drop(c);
    d.kill9();
    let mut b = a.clone();
    b[4096..4096 + 8192].fill(0xab);
    assert_eq!(
        store.export("b"),
        b,
        "a flushed write to a format-1 store survives kill -9"
    );
    assert_eq!(
        format(&store),
        1,
        "nothing moves a store to format 2 but `upgrade`"
    );
    store.assert_clean();

    // Upgrade, then the same contents, and the intent log at work.
    let up = store.json(&["upgrade", "--json"]);
    assert_eq!(
        up,
        serde_json::json!({"from": 1, "to": 7, "upgraded": true})
    );
    assert_eq!(format(&store), 7);
    let again: Value = store.json(&["upgrade", "--json"]);
    assert_eq!(again["upgraded"], false);
    store.assert_clean();
    assert_eq!(store.export("a"), a);
    assert_eq!(store.export("a@s1"), a);
    assert_eq!(store.export("b"), b);
    assert_eq!(store.export("d")[..d_img.len()], d_img[..]);
    let d = Daemon::start(&store);
    let mut c = d.nbd("a");
    c.write(0, &[0x11u8; 4096]).unwrap();
    c.flush().unwrap();
    drop(c);
    store.run(&["vdi", "snapshot", "a", "after"]);
    d.kill9();
    let mut a2 = a.clone();
    a2[..4096].fill(0x11);
    assert_eq!(store.export("a"), a2);
    assert_eq!(store.export("a@after"), a2);
    store.assert_clean();
}
