//! Stores in format 5 (made by parallax before migration) against this parallax: read,
//! written, log replayed; migration refused until `upgrade`; upgraded in place and never
//! misread.
//!
//! `fixtures/format5.store.gz` was made by the previous release (commit 09e50bb):
//! `init --size 16M`; `vdi import a` of the pattern below; `vdi snapshot a s1`;
//! `vdi fork a@s1 b`; then `serve`, `qemu-io -c "write -P 0x5a 0 64k" -c flush nbd://…/b`
//! and kill -9 of the daemon (so the write is in the log only).

use parallax_integration::{
    daemon::Daemon,
    fixtures::{format, names, open_fixture, pattern},
};

#[test]
fn a_format_5_store_reads_writes_and_upgrades_for_migration() {
    let a = pattern();
    let mut b = a.clone();
    b[..65536].fill(0x5a);
    const NAMES: [&str; 3] = ["a", "a@s1", "b"];
    let store = open_fixture(
        "format5.store.gz",
        5,
        &NAMES,
        &[("a", &a), ("a@s1", &a), ("b", &b)],
    );

    // Migration needs format 6: refused before anything is sent, with the way forward.
    store
        .fail(&[
            "vdi",
            "migrate",
            "a",
            "--to",
            "127.0.0.1:9",
            "--tls-psk-file",
            "/dev/null",
        ])
        .assert_one_line(1, "parallax upgrade");
    assert_eq!(names(&store), NAMES);

    // Written in format 5 through the daemon, replayed after kill -9, still format 5.
    let d = Daemon::start(&store);
    let mut c = d.nbd("a");
    c.write(0, &[0x11u8; 4096]).unwrap();
    c.flush().unwrap();
    drop(c);
    d.kill9();
    assert_eq!(format(&store), 5);
    let mut a1 = a.clone();
    a1[..4096].fill(0x11);
    assert_eq!(store.export("a"), a1);
    store.assert_clean();

    let up = store.json(&["upgrade", "--json"]);
    assert_eq!(
        up,
        serde_json::json!({"from": 5, "to": 7, "upgraded": true})
    );
    assert_eq!(format(&store), 7);
    store.assert_clean();
    assert_eq!(store.export("a"), a1);
    assert_eq!(store.export("b"), b);
    assert_eq!(names(&store), NAMES);
    // Now the format is not what stops a migration: the unreachable host is.
    store
        .fail(&[
            "vdi",
            "migrate",
            "b",
            "--to",
            "127.0.0.1:9",
            "--tls-psk-file",
            "/dev/null",
        ])
        .assert_one_line(1, "127.0.0.1:9");
    assert_eq!(
        names(&store),
        NAMES,
        "the refused migration left nothing behind"
    );
}
