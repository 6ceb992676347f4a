//! Dedup through the real `parallax`: forks of a template that write the same data through
//! real NBD clients (nbdcopy, qemu-io) store it once; with inline dedup off, `parallax dedup`
//! over the daemon and the daemon's background worker collapse the copies; everything comes
//! back when the VDIs go.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use parallax_integration::{
    daemon::{Daemon, TestStore},
    nbd::{random_bytes, run_ok, write_file},
};
use serde_json::Value;

const MIB: usize = 1 << 20;
const FORKS: usize = 20;
/// What every fork writes the same, and what each writes of its own.
const SHARED: usize = 8 * MIB;
const OWN: usize = 512 << 10;
const TEMPLATE: usize = 16 * MIB;

fn df(store: &TestStore) -> Value {
    store.json(&["df", "--json"])
}

fn stored(store: &TestStore) -> u64 {
    df(store)["stored_bytes"].as_u64().unwrap()
}

/// A template imported, snapshotted and forked `FORKS` times.
fn template_and_forks(store: &TestStore) -> Vec<u8> {
    let template = random_bytes(1, TEMPLATE);
    store.import("t", &template);
    store.run(&["vdi", "snapshot", "t", "base"]);
    for i in 0..FORKS {
        store.run(&["vdi", "fork", "t@base", &format!("f{i:02}")]);
    }
    template
}

/// What fork `i` writes of its own.
fn own(i: usize) -> Vec<u8> {
    random_bytes(100 + i as u64, OWN)
}

/// Every fork writes `shared` at 0 with nbdcopy, and its own bytes at 12 MiB with qemu-io.
fn write_forks(store: &TestStore, d: &Daemon, shared: &[u8]) {
    let file = store.file("shared.img");
    write_file(&file, shared);
    for i in 0..FORKS {
        let uri = d.uri(&format!("f{i:02}"));
        run_ok(Command::new("nbdcopy").arg(&file).arg(&uri));
        let mine = store.file(&format!("own{i}.img"));
        write_file(&mine, &own(i));
        run_ok(Command::new("qemu-io").args([
            "-f",
            "raw",
            &uri,
            "-c",
            &format!("write -s {} 12M {OWN}", mine.display()),
            "-c",
            "flush",
        ]));
    }
}

/// Each fork reads as the template with its writes over it.
fn assert_forks(store: &TestStore, template: &[u8], shared: &[u8]) {
    for i in [0, 7, FORKS - 1] {
        let got = store.export(&format!("f{i:02}"));
        let mut want = template.to_vec();
        want[..SHARED].copy_from_slice(shared);
        want[12 * MIB..12 * MIB + OWN].copy_from_slice(&own(i));
        assert!(got == want, "fork {i} reads back wrong");
    }
}

#[test]
fn forks_writing_the_same_data_through_nbd_store_it_once() {
    let store = TestStore::new("1G");
    let template = template_and_forks(&store);
    let shared = random_bytes(2, SHARED);
    let d = Daemon::start(&store);
    write_forks(&store, &d, &shared);
    let r = df(&store);
    d.stop();
    // The template, one copy of what the forks share, and what each wrote of its own.
    let want = (TEMPLATE + SHARED + FORKS * OWN) as u64;
    let got = r["stored_bytes"].as_u64().unwrap();
    assert!(
        got <= want + want / 50,
        "stored {got} bytes for {want} of distinct data: {r:#}"
    );
    assert_eq!(r["dedup"]["inline"], true);
    assert_eq!(r["dedup"]["shared_blocks"], (SHARED / 4096) as u64, "{r:#}");
    assert_forks(&store, &template, &shared);
    store.assert_clean();
    // A fork's info: what it shares (template, dedup) and what only it holds.
    let info = store.json(&["vdi", "info", "f03", "--json"]);
    assert_eq!(info["unique"], OWN as u64, "{info:#}");
    // Everything goes back: the VDIs deleted, gc, no data and no index left.
    store.run(&["vdi", "delete", "t", "--recursive"]);
    for i in 0..FORKS {
        store.run(&["vdi", "delete", &format!("f{i:02}")]);
    }
    store.run(&["gc"]);
    let r = df(&store);
    assert_eq!(r["used_bytes"], 0, "{r:#}");
    assert_eq!(r["dedup"]["index_entries"], 0, "{r:#}");
    store.assert_clean();
}

#[test]
fn a_pass_and_the_background_worker_collapse_copies_written_without_inline_dedup() {
    let store = TestStore::new("1G");
    let template = template_and_forks(&store);
    let set = store.json(&["dedup", "set", "--inline", "off", "--json"]);
    assert_eq!(set["inline"], false);
    let shared = random_bytes(3, SHARED);
    // Half the forks now; a pass through the daemon collapses them.
    let d = Daemon::start_with(
        &store,
        "(commit_interval_ms: 500, dedup: (background: false))",
        &[],
    );
    write_forks(&store, &d, &shared);
    let before = stored(&store);
    assert!(before >= (TEMPLATE + FORKS * (SHARED + OWN)) as u64);
    let r = store.json(&["dedup", "--json"]);
    assert_eq!(
        r["blocks_shared"],
        ((FORKS - 1) * SHARED / 4096) as u64,
        "{r:#}"
    );
    let after = stored(&store);
    assert_eq!(before - after, ((FORKS - 1) * SHARED) as u64);
    d.stop();
    assert_forks(&store, &template, &shared);
    store.assert_clean();

    // The worker does the same by itself once clients stop writing.
    let shared2 = random_bytes(4, SHARED);
    let d = Daemon::start_with(
        &store,
        "(commit_interval_ms: 500, dedup: (background: true, idle_secs: 1, every_secs: 1))",
        &[],
    );
    write_forks(&store, &d, &shared2);
    let target = (TEMPLATE + SHARED + FORKS * OWN) as u64;
    let start = Instant::now();
    while stored(&store) > target && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        stored(&store) <= target,
        "the worker did not collapse the copies within 60 s: {:#}\n{}",
        df(&store),
        d.stderr()
    );
    assert!(d.wait_stderr("dedup: pass done"), "{}", d.stderr());
    d.stop();
    assert_forks(&store, &template, &shared2);
    store.assert_clean();
}

#[test]
fn dedup_refuses_cleanly_without_a_setting_and_says_what_it_changed() {
    let store = TestStore::new("64M");
    store
        .fail(&["dedup", "set"])
        .assert_one_line(1, "--inline on|off");
    let s = store.json(&["dedup", "status", "--json"]);
    assert_eq!(s["supported"], true);
    assert_eq!(s["inline"], true);
    assert_eq!(s["trust_hash"], false);
    let s = store.json(&["dedup", "set", "--trust-hash", "on", "--json"]);
    assert_eq!(s["trust_hash"], true);
    // Kept in the store.
    let s = store.json(&["dedup", "status", "--json"]);
    assert_eq!(s["trust_hash"], true);
    let text = store.run(&["dedup", "status"]);
    assert!(text.contains("trusting the hash"), "{text}");
}
