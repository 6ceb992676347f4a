//! The `parallax` CLI on a real store file. Every scenario runs twice: on the store directly
//! (`direct::…`) and with `parallax serve` holding the store, so that the same commands go
//! through its control socket (`via_daemon::…`). Where a scenario needs a block-level writer,
//! it writes over NBD with qemu-io or qemu-img: through the running daemon, or, in direct mode,
//! through one started just for that and stopped cleanly before the CLI looks again.

use std::{
    io::Write,
    os::unix::fs::MetadataExt,
    process::{Command, Stdio},
};

use parallax_integration::{
    daemon::*,
    fixtures::names_listed,
    nbd::{random_bytes, run_ok},
};
use serde_json::Value;

const MIB: usize = 1 << 20;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Direct,
    Daemon,
}

/// A store, with a daemon holding it in [`Mode::Daemon`].
struct Env {
    store: TestStore,
    daemon: Option<Daemon>,
}

impl Env {
    fn new(mode: Mode, size: &str) -> Env {
        let store = TestStore::new(size);
        let daemon = (mode == Mode::Daemon).then(|| Daemon::start(&store));
        Env { store, daemon }
    }

    /// Runs `f` with a daemon serving the store: the running one, or a temporary one.
    fn with_nbd<R>(&self, f: impl FnOnce(&Daemon) -> R) -> R {
        match &self.daemon {
            Some(d) => f(d),
            None => {
                let d = Daemon::start(&self.store);
                let r = f(&d);
                d.stop();
                r
            }
        }
    }

    /// Stops the daemon (if any, asserting a clean exit), then checks the store.
    fn finish(mut self) {
        self.store.assert_clean();
        if let Some(d) = self.daemon.take() {
            d.stop();
            self.store.assert_clean();
        }
    }
}

impl std::ops::Deref for Env {
    type Target = TestStore;
    fn deref(&self) -> &TestStore {
        &self.store
    }
}

/// Each scenario as `direct::NAME` and `via_daemon::NAME`.
macro_rules! both_modes {
    ($($name:ident),* $(,)?) => {
        mod direct {
            $( #[test] fn $name() { super::$name(super::Mode::Direct) } )*
        }
        mod via_daemon {
            $( #[test] fn $name() { super::$name(super::Mode::Daemon) } )*
        }
    };
}

both_modes!(
    import_export_round_trip,
    snapshot_unchanged_while_vdi_rewritten,
    forks_are_isolated,
    space_returns_after_delete,
    list_info_tree,
    rename_resize_delete,
    errors_are_one_line,
    corrupt_data_block_is_detected,
    rollback_restores_a_snapshot,
    interrupted_import_leaves_nothing,
    send_recv_through_a_pipe,
    schedules_set_list_remove,
    list_streams_each_vdi_with_its_snapshots,
);

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i} (got {:#04x}, want {:#04x})",
            got[i], want[i]
        );
    }
}

fn import_export_round_trip(mode: Mode) {
    let env = Env::new(mode, "512M");
    let img = image_with_holes(1, 64 * MIB);
    let src = env.file("src.img");
    std::fs::write(&src, &img).unwrap();
    let out = env.run(&["vdi", "import", "tmpl", src.to_str().unwrap()]);
    assert!(out.contains("imported"), "{out}");

    let info = env.json(&["vdi", "info", "tmpl", "--json"]);
    assert_eq!(info["size"], 64 * MIB as u64);
    // All-zero blocks stay unallocated.
    assert_eq!(info["allocated"], data_bytes(&img), "{info:#}");

    let out = env.export_file("tmpl");
    run_ok(Command::new("cmp").arg(&src).arg(&out));
    // The export is sparse too, and an existing file is not overwritten without --force.
    let meta = std::fs::metadata(&out).unwrap();
    assert_eq!(meta.len(), img.len() as u64);
    assert!(meta.blocks() * 512 < img.len() as u64 - 16 * MIB as u64);
    env.fail(&["vdi", "export", "tmpl", out.to_str().unwrap()])
        .assert_one_line(1, "--force");
    env.run(&["vdi", "export", "tmpl", out.to_str().unwrap(), "--force"]);
    run_ok(Command::new("cmp").arg(&src).arg(&out));

    // Export to stdout, through a pipe.
    let piped = output_ok(
        env.cmd(&["vdi", "export", "tmpl", "-"])
            .stdout(Stdio::piped()),
    );
    assert_same("export to stdout", &piped.stdout, &img);

    // A fork's export is sparse: it occupies about as much as the data it maps.
    env.run(&["vdi", "snapshot", "tmpl", "gold"]);
    env.run(&["vdi", "fork", "tmpl@gold", "vm1"]);
    let fork = env.export_file("vm1");
    run_ok(Command::new("cmp").arg(&src).arg(&fork));
    let used = std::fs::metadata(&fork).unwrap().blocks() * 512;
    let data = data_bytes(&img);
    assert!(
        used >= data && used <= data + 2 * MIB as u64,
        "export of a fork occupies {used} bytes for {data} bytes of data"
    );
    // And so is the snapshot's.
    let snap = env.export_file("tmpl@gold");
    run_ok(Command::new("cmp").arg(&src).arg(&snap));
    env.finish();
}

fn snapshot_unchanged_while_vdi_rewritten(mode: Mode) {
    let env = Env::new(mode, "256M");
    let v1 = image_with_holes(2, 8 * MIB);
    env.import("disk", &v1);
    env.run(&["vdi", "snapshot", "disk", "s1"]);

    // Rewrite the VDI completely with another image, then poke at it block by block.
    let v2 = random_bytes(3, 8 * MIB);
    let v2_file = env.file("v2.img");
    std::fs::write(&v2_file, &v2).unwrap();
    let mut want = v2.clone();
    env.with_nbd(|d| {
        run_ok(
            Command::new("qemu-img")
                .args(["convert", "-n", "-f", "raw", "-O", "raw"])
                .arg(&v2_file)
                .arg(d.uri("disk")),
        );
    });
    env.run(&["vdi", "snapshot", "disk", "s2"]);
    env.with_nbd(|d| {
        qemu_io(
            &d.uri("disk"),
            &[
                "write -P 0x11 0 1M",
                "write -P 0x22 3000 5000",
                "write -z 2M 64k",
                "discard 4M 1M",
                "flush",
            ],
        );
    });
    want[..MIB].fill(0x11);
    want[3000..8000].fill(0x22);
    want[2 * MIB..2 * MIB + 65536].fill(0);
    want[4 * MIB..5 * MIB].fill(0);

    assert_same("disk", &env.export("disk"), &want);
    assert_same("disk@s1", &env.export("disk@s1"), &v1);
    assert_same("disk@s2", &env.export("disk@s2"), &v2);

    // What changed since s2, by extent: the rewritten first MiB, the zeroed and the discarded
    // ranges (v2 is random, so both read differently now).
    let diff = env.json(&["vdi", "diff", "disk@s2", "disk", "--json"]);
    let extents: Vec<(u64, u64, bool)> = diff["extents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let n = |k: &str| e[k].as_u64().unwrap();
            (n("offset"), n("length"), e["zero"].as_bool().unwrap())
        })
        .collect();
    let mib = MIB as u64;
    assert_eq!(
        extents,
        vec![
            (0, mib, false),
            (2 * mib, 65536, true),
            (4 * mib, mib, true)
        ],
        "{diff:#}"
    );
    assert_eq!(diff["changed_bytes"], 2 * mib + 65536);
    let same = env.run(&["vdi", "diff", "disk@s1", "disk@s1"]);
    assert!(same.contains("hold the same content"), "{same}");
    let text = env.run(&["vdi", "diff", "disk@s2", "disk"]);
    assert!(text.contains("3 extent(s)"), "{text}");
    let info = env.json(&["vdi", "info", "disk@s1", "--json"]);
    assert_eq!(info["kind"], "snapshot");
    assert_eq!(info["allocated"], data_bytes(&v1), "{info:#}");
    env.finish();
}

fn forks_are_isolated(mode: Mode) {
    let env = Env::new(mode, "256M");
    let tmpl = image_with_holes(4, 4 * MIB);
    env.import("tmpl", &tmpl);
    env.run(&["vdi", "snapshot", "tmpl", "gold"]);
    for vm in ["a", "b", "c"] {
        env.run(&["vdi", "fork", "tmpl@gold", vm]);
    }
    env.with_nbd(|d| {
        qemu_io(
            &d.uri("a"),
            &["write -P 0xaa 0 1M", "discard 2M 1M", "flush"],
        );
        qemu_io(&d.uri("b"), &["write -P 0xbb 512k 1M", "write -z 3M 4k"]);
        qemu_io(&d.uri("tmpl"), &["write -P 0xcc 0 4M"]);
    });
    let mut a = tmpl.clone();
    a[..MIB].fill(0xaa);
    a[2 * MIB..3 * MIB].fill(0);
    let mut b = tmpl.clone();
    b[MIB / 2..MIB / 2 + MIB].fill(0xbb);
    b[3 * MIB..3 * MIB + 4096].fill(0);
    assert_same("fork a", &env.export("a"), &a);
    assert_same("fork b", &env.export("b"), &b);
    assert_same("fork c", &env.export("c"), &tmpl);
    assert_same("tmpl@gold", &env.export("tmpl@gold"), &tmpl);
    assert_same("tmpl", &env.export("tmpl"), &vec![0xcc; 4 * MIB]);

    // Deleting one fork, and the template with its snapshot, leaves the others whole.
    env.run(&["vdi", "delete", "a"]);
    env.run(&["vdi", "delete", "--recursive", "tmpl"]);
    assert_same("fork b after deletes", &env.export("b"), &b);
    assert_same("fork c after deletes", &env.export("c"), &tmpl);
    env.finish();
}

fn df(env: &Env) -> Value {
    env.json(&["df", "--json"])
}

fn space_returns_after_delete(mode: Mode) {
    let env = Env::new(mode, "256M");
    let empty = df(&env);
    assert_eq!(empty["vdis"], 0);
    let capacity = empty["capacity_bytes"].as_u64().unwrap();
    assert!(capacity > 200 * MIB as u64, "{empty:#}");

    let img = random_bytes(5, 16 * MIB);
    env.import("big", &img);
    env.run(&["vdi", "snapshot", "big", "s"]);
    env.run(&["vdi", "fork", "big@s", "clone"]);
    // Data of its own (a pattern's identical blocks would be stored once: dedup).
    let dir = tempfile::tempdir().unwrap();
    let four = dir.path().join("four.img");
    let own = random_bytes(6, 4 * MIB);
    std::fs::write(&four, &own).unwrap();
    let write = format!("write -s {} 0 4M", four.display());
    env.with_nbd(|d| qemu_io(&d.uri("clone"), &[&write, "flush"]));
    let full = df(&env);
    let used = |v: &Value| v["used_bytes"].as_u64().unwrap();
    let free = |v: &Value| v["free_bytes"].as_u64().unwrap();
    assert!(
        used(&full) >= used(&empty) + 20 * MIB as u64,
        "{empty:#} {full:#}"
    );
    assert!(free(&full) + 20 * MIB as u64 <= free(&empty));
    assert_eq!(full["vdis"], 2);
    assert_eq!(full["snapshots"], 1);
    assert_eq!(full["provisioned_bytes"], 32 * MIB as u64, "{full:#}");
    // A VDI bigger than the store: df warns that the store is overcommitted.
    env.run(&["vdi", "create", "huge", "--size", "1G"]);
    let text = env.run(&["df"]);
    assert!(
        text.contains("warning:") && text.contains("capacity"),
        "{text}"
    );
    env.run(&["vdi", "delete", "huge"]);
    assert!(!env.run(&["df"]).contains("warning:"));
    // The snapshot and the fork share 12 MiB with the VDI: mapped 16+16+16, stored 20.
    assert_eq!(full["logical_bytes"], 48 * MIB as u64, "{full:#}");
    assert_eq!(full["stored_bytes"], 20 * MIB as u64, "{full:#}");
    assert!(full["sharing_ratio"].as_f64().unwrap() > 2.0);

    let deleted = env.json(&["vdi", "delete", "--recursive", "big", "--json"]);
    let mut names: Vec<&str> = deleted["deleted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["big", "big@s"]);
    // The fork keeps what it shares with the deleted snapshot.
    let mut clone = img.clone();
    clone[..4 * MIB].copy_from_slice(&own);
    assert_same("fork of a deleted snapshot", &env.export("clone"), &clone);
    let mid = df(&env);
    assert!(used(&mid) >= 16 * MIB as u64, "{mid:#}");

    env.run(&["vdi", "delete", "clone"]);
    let gc = env.json(&["gc", "--json"]);
    assert!(gc["free_bytes"].is_u64(), "{gc}");
    let after = df(&env);
    assert_eq!(used(&after), used(&empty), "{empty:#} {after:#}");
    assert_eq!(free(&after), free(&empty), "{empty:#} {after:#}");
    assert_eq!(after["vdis"], 0);
    assert_eq!(after["pending_bytes"], 0);
    env.finish();
}

/// Names in a `vdi tree --json` forest, as `parent -> child` edges.
fn tree_edges(nodes: &Value, parent: &str, out: &mut Vec<String>) {
    for n in nodes.as_array().expect("tree nodes") {
        let name = n["name"].as_str().unwrap();
        out.push(format!("{parent} -> {name}"));
        tree_edges(&n["children"], name, out);
    }
}

/// `vdi list` is streamed (through the daemon as `item` lines): each VDI comes with its
/// snapshots right after it, even where another VDI's name sorts between them; the JSON form
/// is one array, and a prefix with an `@` lists that VDI's snapshots.
fn list_streams_each_vdi_with_its_snapshots(mode: Mode) {
    let env = Env::new(mode, "256M");
    for v in ["a", "a-b", "a0", "aA"] {
        env.run(&["vdi", "create", v, "--size", "1M"]);
    }
    env.run(&["vdi", "snapshot", "a", "s2"]);
    env.run(&["vdi", "snapshot", "a", "s1"]);
    env.run(&["vdi", "fork", "a@s1", "b"]);
    let names = |args: &[&str]| names_listed(&env, args);
    assert_eq!(names(&[]), ["a", "a@s1", "a@s2", "a-b", "a0", "aA", "b"]);
    assert_eq!(names(&["--prefix", "a@"]), ["a@s1", "a@s2"]);
    assert_eq!(names(&["--prefix", "a@s2"]), ["a@s2"]);
    assert_eq!(
        names(&["--prefix", "a", "-t", "snapshot"]),
        ["a@s1", "a@s2"]
    );
    assert_eq!(names(&["--origin", "a@s1"]), ["b"]);
    assert!(names(&["--prefix", "x@"]).is_empty());
    // The JSON is printed entry by entry, laid out as a pretty-printed array (fields in the
    // order the entry declares them, which serde_json's own Value would sort).
    let text = env.run(&["vdi", "list", "--json", "--prefix", "a@"]);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert!(
        text.starts_with("[\n  {\n    \"name\": \"a@s1\",\n") && text.ends_with("\n  }\n]\n"),
        "{text}"
    );
    assert_eq!(text.lines().count(), 2 + 2 * 8, "{text}");
    assert_eq!(env.run(&["vdi", "list", "--json", "--prefix", "x"]), "[]\n");
    // The table: a header, then one aligned line per entry in the same order.
    let text = env.run(&["vdi", "list", "-o", "name,kind"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["NAME", "KIND"]
    );
    assert_eq!(lines[2], "a@s1  snapshot", "{text}");
    assert_eq!(lines.len(), 8, "{text}");
    assert_eq!(
        env.run(&["vdi", "list", "--prefix", "x"]).trim(),
        "nothing matches"
    );
    // One subtree: the snapshot, its fork, nothing else.
    let t = env.json(&["vdi", "tree", "a@s1", "--json"]);
    assert_eq!(t[0]["name"], "a@s1");
    assert_eq!(t[0]["children"][0]["name"], "b");
    assert_eq!(t[0]["children"].as_array().unwrap().len(), 1);
}

fn list_info_tree(mode: Mode) {
    let env = Env::new(mode, "256M");
    assert_eq!(env.json(&["vdi", "list", "--json"]), Value::Array(vec![]));
    let tmpl = image_with_holes(6, 4 * MIB);
    env.import("tmpl", &tmpl);
    env.run(&["vdi", "create", "empty", "--size", "1G"]);
    env.run(&["vdi", "snapshot", "tmpl", "gold"]);
    env.run(&["vdi", "fork", "tmpl@gold", "vm1"]);
    env.run(&["vdi", "fork", "tmpl@gold", "vm2"]);
    env.run(&["vdi", "snapshot", "vm1", "monday"]);

    let list = env.json(&["vdi", "list", "--json"]);
    let mut rows: Vec<(String, String, u64, Option<String>)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["kind"].as_str().unwrap().to_string(),
                e["size"].as_u64().unwrap(),
                e["origin"].as_str().map(String::from),
            )
        })
        .collect();
    rows.sort();
    let m4 = 4 * MIB as u64;
    let fork = Some("tmpl@gold".to_string());
    assert_eq!(
        rows,
        [
            ("empty".into(), "vdi".into(), 1 << 30, None),
            ("tmpl".into(), "vdi".into(), m4, None),
            ("tmpl@gold".into(), "snapshot".into(), m4, None),
            ("vm1".into(), "vdi".into(), m4, fork.clone()),
            ("vm1@monday".into(), "snapshot".into(), m4, None),
            ("vm2".into(), "vdi".into(), m4, fork.clone()),
        ],
        "{list:#}"
    );
    for e in list.as_array().unwrap() {
        assert!(e["created"].as_u64().unwrap() > 1_600_000_000, "{e}");
    }
    // Filters, alone and together; the output stays sorted by name.
    let names = |args: &[&str]| names_listed(&env, args);
    assert_eq!(names(&["--prefix", "vm"]), ["vm1", "vm1@monday", "vm2"]);
    assert_eq!(names(&["-t", "snapshot"]), ["tmpl@gold", "vm1@monday"]);
    assert_eq!(names(&["--type", "vdi", "--prefix", "vm"]), ["vm1", "vm2"]);
    assert_eq!(names(&["--origin", "tmpl@gold"]), ["vm1", "vm2"]);
    assert!(names(&["--prefix", "nothing"]).is_empty());
    let text = env.run(&["vdi", "list", "--origin", "tmpl@gold"]);
    assert_eq!(text.lines().count(), 3, "a header and two forks: {text}");
    // Scripted: chosen columns, no header, tabs, exact numbers; used and unique per entry.
    let text = env.run(&[
        "vdi",
        "list",
        "-H",
        "-p",
        "-o",
        "name,size,used,unique",
        "--prefix",
        "tmpl",
    ]);
    let d = data_bytes(&tmpl).to_string();
    let m4s = m4.to_string();
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        [
            // The VDI and its snapshot share every block: neither holds any alone.
            ["tmpl", m4s.as_str(), d.as_str(), "0"].join("\t"),
            ["tmpl@gold", m4s.as_str(), d.as_str(), "0"].join("\t"),
        ],
        "{text}"
    );
    let j = env.json(&[
        "vdi",
        "list",
        "-o",
        "name,used",
        "--prefix",
        "empty",
        "--json",
    ]);
    assert_eq!(
        (&j[0]["used"], &j[0]["unique"]),
        (&Value::from(0), &Value::from(0)),
        "{j}"
    );
    let text = env.run(&["vdi", "list", "-o", "name,used"]);
    assert!(text.starts_with("NAME") && text.contains("USED"), "{text}");

    let t = env.json(&["vdi", "info", "tmpl", "--json"]);
    assert_eq!(t["kind"], "vdi");
    assert_eq!(t["snapshots"], serde_json::json!(["tmpl@gold"]));
    assert_eq!(t["allocated"], data_bytes(&tmpl));
    // Everything the template maps is shared with its snapshot (and through it, the forks).
    assert_eq!(t["unique"], 0, "{t:#}");
    assert_eq!(t["shared"], data_bytes(&tmpl));
    let g = env.json(&["vdi", "info", "tmpl@gold", "--json"]);
    assert_eq!(g["kind"], "snapshot");
    let mut forks: Vec<&str> = g["forks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    forks.sort();
    assert_eq!(forks, ["vm1", "vm2"], "{g:#}");
    let v = env.json(&["vdi", "info", "vm1", "--json"]);
    assert_eq!(v["origin"], "tmpl@gold");
    assert_eq!(v["snapshots"], serde_json::json!(["vm1@monday"]));
    let e = env.json(&["vdi", "info", "empty", "--json"]);
    assert_eq!(
        (e["size"].as_u64(), e["allocated"].as_u64()),
        (Some(1 << 30), Some(0))
    );
    let text = env.run(&["vdi", "info", "vm1"]);
    assert!(text.contains("origin:     tmpl@gold"), "{text}");

    let tree = env.json(&["vdi", "tree", "--json"]);
    let mut edges = Vec::new();
    tree_edges(&tree, "", &mut edges);
    edges.sort();
    assert_eq!(
        edges,
        [
            " -> empty",
            " -> tmpl",
            "tmpl -> tmpl@gold",
            "tmpl@gold -> vm1",
            "tmpl@gold -> vm2",
            "vm1 -> vm1@monday",
        ],
        "{tree:#}"
    );
    let text = env.run(&["vdi", "tree"]);
    assert!(text.contains("tmpl@gold"), "{text}");
    // One subtree: the snapshot and what descends from it.
    let sub = env.json(&["vdi", "tree", "tmpl@gold", "--json"]);
    let mut edges = Vec::new();
    tree_edges(&sub, "", &mut edges);
    edges.sort();
    assert_eq!(
        edges,
        [
            " -> tmpl@gold",
            "tmpl@gold -> vm1",
            "tmpl@gold -> vm2",
            "vm1 -> vm1@monday",
        ],
        "{sub:#}"
    );
    let text = env.run(&["vdi", "tree", "vm1"]);
    assert!(
        text.contains("vm1@monday") && !text.contains("vm2"),
        "{text}"
    );
    env.fail(&["vdi", "tree", "nope"])
        .assert_one_line(1, "no such VDI or snapshot");

    let dot = env.run(&["vdi", "tree", "--dot"]);
    let dot = dot.trim();
    assert!(
        dot.starts_with("digraph ") && dot.ends_with('}'),
        "not a graph: {dot}"
    );
    assert_eq!(dot.matches('{').count(), 1, "{dot}");
    assert_eq!(dot.matches('}').count(), 1, "{dot}");
    for edge in ["\"tmpl\" -> \"tmpl@gold\";", "\"tmpl@gold\" -> \"vm2\";"] {
        assert!(dot.contains(edge), "{edge} missing from {dot}");
    }
    for line in dot.lines().skip(1).filter(|l| *l != "}") {
        let l = line.trim();
        assert!(l.ends_with(';'), "statement without ';': {l:?}");
        assert_eq!(l.matches('"').count() % 2, 0, "unbalanced quotes: {l:?}");
    }
    env.finish();
}

fn rename_resize_delete(mode: Mode) {
    let env = Env::new(mode, "256M");
    let img = image_with_holes(7, 4 * MIB);
    env.import("a", &img);
    env.run(&["vdi", "snapshot", "a", "s1"]);
    env.run(&["vdi", "fork", "a@s1", "f"]);

    // Rename: snapshots follow the VDI; forks keep pointing at the renamed snapshot.
    env.run(&["vdi", "rename", "a", "b"]);
    env.run(&["vdi", "rename", "b@s1", "b@old"]);
    let list = env.json(&["vdi", "list", "--json"]);
    let mut names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["b", "b@old", "f"], "{list:#}");
    let tree = env.json(&["vdi", "tree", "--json"]);
    let mut edges = Vec::new();
    tree_edges(&tree, "", &mut edges);
    edges.sort();
    assert_eq!(edges, [" -> b", "b -> b@old", "b@old -> f"], "{tree:#}");
    assert_same("renamed snapshot", &env.export("b@old"), &img);
    env.fail(&["vdi", "info", "a"])
        .assert_one_line(1, "no such VDI");
    env.fail(&["vdi", "rename", "b", "f"])
        .assert_one_line(1, "exists");

    // Resize: grows, never shrinks; the new tail reads as zeros; snapshots stay as they were.
    env.run(&["vdi", "resize", "b", "9M"]);
    assert_eq!(
        env.json(&["vdi", "info", "b", "--json"])["size"],
        9 * MIB as u64
    );
    let mut grown = img.clone();
    grown.resize(9 * MIB, 0);
    assert_same("grown VDI", &env.export("b"), &grown);
    env.with_nbd(|d| {
        let out = run_ok(Command::new("nbdinfo").args(["--size", &d.uri("b")]));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            (9 * MIB).to_string()
        );
        qemu_io(&d.uri("b"), &["write -P 0x5e 8M 1M"]);
    });
    grown[8 * MIB..].fill(0x5e);
    assert_same("grown VDI after a write", &env.export("b"), &grown);
    env.fail(&["vdi", "resize", "b", "1M"])
        .assert_one_line(1, "only grow");
    let f = env.fail(&["vdi", "resize", "b", "-1M"]);
    assert_eq!(f.code, Some(2), "{f:?}");
    assert!(f.stderr.contains("only grow"), "{f:?}");
    // Relative growth.
    env.run(&["vdi", "resize", "b", "+1M"]);
    assert_eq!(
        env.json(&["vdi", "info", "b", "--json"])["size"],
        10 * MIB as u64
    );
    grown.resize(10 * MIB, 0);
    assert_same("VDI grown by +1M", &env.export("b"), &grown);
    env.fail(&["vdi", "resize", "b@old", "16M"])
        .assert_one_line(1, "read-only");
    assert_eq!(
        env.json(&["vdi", "info", "b@old", "--json"])["size"],
        4 * MIB as u64
    );

    // Delete: a VDI with snapshots needs --recursive; the fork survives its origin's deletion.
    env.fail(&["vdi", "delete", "b"])
        .assert_one_line(1, "--recursive");
    env.fail(&["vdi", "delete", "b", "--dry-run"])
        .assert_one_line(1, "--recursive");
    let plan = env.json(&["vdi", "delete", "-r", "b", "--dry-run", "--json"]);
    let mut would: Vec<&str> = plan["deleted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    would.sort();
    assert_eq!(
        (would, &plan["dry_run"]),
        (vec!["b", "b@old"], &Value::from(true))
    );
    let text = env.run(&["vdi", "delete", "-r", "-n", "b"]);
    assert!(text.starts_with("would delete "), "{text}");
    assert_eq!(
        env.json(&["vdi", "list", "--json"])
            .as_array()
            .unwrap()
            .len(),
        3
    );
    let d = env.json(&["vdi", "delete", "-r", "b", "--json"]);
    assert_eq!(d["deleted"].as_array().unwrap().len(), 2, "{d}");
    let list = env.json(&["vdi", "list", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list:#}");
    assert_same("fork of a deleted snapshot", &env.export("f"), &img);
    let tree = env.json(&["vdi", "tree", "--json"]);
    assert_eq!(tree[0]["deleted"], true, "{tree:#}");
    assert_eq!(tree[0]["children"][0]["name"], "f", "{tree:#}");
    env.run(&["vdi", "delete", "f"]);
    assert_eq!(env.json(&["vdi", "tree", "--json"]), Value::Array(vec![]));
    env.finish();
}

/// `vdi list` and `vdi info` name a fork's origin as it is called now (`vdi tree` does).
fn fork_origin_follows_renames(mode: Mode) {
    let env = Env::new(mode, "64M");
    env.run(&["vdi", "create", "a", "--size", "1M"]);
    // NAME@SNAP in one word, as everywhere else.
    env.run(&["vdi", "snapshot", "a@s1"]);
    env.fail(&["vdi", "snapshot", "a"])
        .assert_one_line(1, "name the snapshot");
    env.run(&["vdi", "fork", "a@s1", "f"]);
    env.run(&["vdi", "rename", "a", "b"]);
    env.run(&["vdi", "rename", "b@s1", "b@old"]);
    assert_eq!(
        env.json(&["vdi", "info", "b@old", "--json"])["forks"][0],
        "f"
    );
    assert_eq!(env.json(&["vdi", "info", "f", "--json"])["origin"], "b@old");
    let list = env.json(&["vdi", "list", "--json"]);
    let f = list
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "f")
        .unwrap();
    assert_eq!(f["origin"], "b@old", "{list:#}");
    assert_eq!(f["origin_deleted"], false, "{list:#}");

    // Once the origin is gone, a new snapshot of the same name is not it.
    env.run(&["vdi", "delete", "b@old"]);
    env.run(&["vdi", "snapshot", "b", "old"]);
    let info = env.json(&["vdi", "info", "f", "--json"]);
    assert_eq!(
        (&info["origin"], &info["origin_deleted"]),
        (&Value::from("a@s1"), &Value::from(true)),
        "{info:#}"
    );
    let text = env.run(&["vdi", "info", "f"]);
    assert!(text.contains("origin:     a@s1 (deleted)"), "{text}");
    let text = env.run(&["vdi", "list"]);
    assert!(text.contains("a@s1 (deleted)"), "{text}");
    env.finish();
}

#[test]
fn fork_origin_follows_renames_direct() {
    fork_origin_follows_renames(Mode::Direct)
}

#[test]
fn fork_origin_follows_renames_via_daemon() {
    fork_origin_follows_renames(Mode::Daemon)
}

fn errors_are_one_line(mode: Mode) {
    let env = Env::new(mode, "64M");
    env.run(&["vdi", "create", "x", "--size", "1M"]);
    let out = env.file("out.img");
    let out = out.to_str().unwrap();
    for args in [
        &["vdi", "info", "nope"][..],
        &["vdi", "export", "nope", out],
        &["vdi", "snapshot", "nope", "s"],
        &["vdi", "fork", "nope@s", "y"],
        &["vdi", "fork", "x@nope", "y"],
        &["vdi", "delete", "nope"],
        &["vdi", "rename", "nope", "y"],
        &["vdi", "resize", "nope", "2M"],
    ] {
        env.fail(args).assert_one_line(1, "no such VDI or snapshot");
        // With --json, the same error line, the same exit code, and the error on stdout.
        let mut with_json = args.to_vec();
        with_json.push("--json");
        let f = env.fail(&with_json);
        f.assert_one_line(1, "no such VDI or snapshot");
        let v: Value = serde_json::from_str(&f.stdout)
            .unwrap_or_else(|e| panic!("{with_json:?}: no JSON error ({e}): {f:?}"));
        assert_eq!(v["error"]["kind"], "not-found", "{with_json:?}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("no such VDI or snapshot"),
            "{v}"
        );
    }
    let f = env.fail(&["vdi", "create", "x", "--size", "1M", "--json"]);
    let v: Value = serde_json::from_str(&f.stdout).unwrap();
    assert_eq!(v["error"]["kind"], "exists", "{v}");
    // Every command that changes something says what it did in JSON too.
    assert_eq!(
        env.json(&["vdi", "snapshot", "x@j1", "--json"])["snapshot"],
        "x@j1"
    );
    assert_eq!(
        env.json(&["vdi", "fork", "x@j1", "xf", "--json"])["forked"],
        "xf"
    );
    assert_eq!(
        env.json(&["vdi", "resize", "xf", "+1M", "--json"])["size"],
        2 * MIB as u64
    );
    assert_eq!(
        env.json(&["vdi", "rename", "xf", "xg", "--json"])["to"],
        "xg"
    );
    assert_eq!(
        env.json(&["vdi", "create", "xc", "--size", "1M", "--json"])["created"],
        "xc"
    );
    env.run(&["vdi", "delete", "xg"]);
    env.run(&["vdi", "delete", "xc"]);
    env.run(&["vdi", "delete", "x@j1"]);
    assert!(
        !env.file("out.img").exists(),
        "a failed export left its file"
    );
    env.fail(&["vdi", "create", "x", "--size", "1M"])
        .assert_one_line(1, "already exists");
    env.fail(&["vdi", "create", "bad/name", "--size", "1M"])
        .assert_one_line(1, "");
    let f = env.fail(&["init", "--size", "64M"]);
    f.assert_one_line(1, "already exists");
    assert!(!f.stderr.contains("refusing"), "{f:?}");
    let dir = env.file("a-directory");
    std::fs::create_dir(&dir).unwrap();
    env.fail(&["vdi", "import", "d", dir.to_str().unwrap()])
        .assert_one_line(1, "is a directory");
    env.fail(&["vdi", "import", "d", "/dev/null"])
        .assert_one_line(1, "character device");

    let qcow = env.file("disk.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&qcow)
            .arg("16M"),
    );
    env.fail(&["vdi", "import", "q", qcow.to_str().unwrap()])
        .assert_one_line(1, "qcow2");
    env.fail(&[
        "vdi",
        "import",
        "q",
        env.file("missing.img").to_str().unwrap(),
    ])
    .assert_one_line(1, "missing.img");
    // Nothing was created by the failed imports, and the store still works.
    let list = env.json(&["vdi", "list", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list:#}");
    // Usage errors are clap's (exit status 2).
    assert_eq!(env.fail(&["vdi", "frobnicate"]).code, Some(2));
    assert_eq!(
        env.fail(&["vdi", "create", "z", "--size", "lots"]).code,
        Some(2)
    );
    env.finish();
}

/// The byte offset in the store file of the one 4 KiB block equal to `block`.
fn find_block(store: &std::path::Path, block: &[u8]) -> u64 {
    let data = std::fs::read(store).unwrap();
    let hits: Vec<usize> = data
        .chunks(4096)
        .enumerate()
        .filter(|(_, b)| *b == block)
        .map(|(i, _)| i * 4096)
        .collect();
    assert_eq!(hits.len(), 1, "block found at {hits:?}");
    hits[0] as u64
}

fn corrupt_data_block_is_detected(mode: Mode) {
    let env = Env::new(mode, "64M");
    let img = random_bytes(8, 2 * MIB);
    env.import("vm", &img);
    env.run(&["vdi", "snapshot", "vm", "s"]);
    env.assert_clean();
    // Flip one byte in the middle of logical block 100 where the store keeps it.
    let at = find_block(&env.path, &img[100 * 4096..101 * 4096]) + 2000;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&env.path)
            .unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
        f.sync_all().unwrap();
    }

    let out = env.cmd(&["check", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(report["checksum_errors"], 1, "{report:#}");
    let text = env.cmd(&["check"]).output().unwrap();
    assert_eq!(text.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&text.stdout).contains("DAMAGED"));
    // A metadata-only check does not read data blocks.
    env.run(&["check", "--metadata-only"]);

    // Exports of the VDI and its snapshot (which shares the block) fail; nothing is written.
    let out = env.file("vm.out");
    env.fail(&["vdi", "export", "vm", out.to_str().unwrap()])
        .assert_one_line(1, "checksum mismatch");
    env.fail(&["vdi", "export", "vm@s", out.to_str().unwrap()])
        .assert_one_line(1, "checksum mismatch");
    assert!(!out.exists());

    // Over NBD: the damaged block is an I/O error, its neighbours still read.
    env.with_nbd(|d| {
        for export in ["vm", "vm@s"] {
            let mut c = Command::new("qemu-io");
            c.args(["-r", "-f", "raw", &d.uri(export), "-c", "read 409600 4096"]);
            let f = output_fail(&mut c);
            let text = format!("{}{}", f.stdout, f.stderr);
            assert!(text.contains("Input/output error"), "{text}");
            let mut conn = d.nbd(export);
            assert!(conn.read(100 * 4096 + 1000, 10).is_err());
            assert_same(
                "neighbour",
                &conn.read(99 * 4096, 4096).unwrap(),
                &img[99 * 4096..100 * 4096],
            );
            assert_same(
                "neighbour",
                &conn.read(101 * 4096, 4096).unwrap(),
                &img[101 * 4096..102 * 4096],
            );
        }
        // Overwriting the damaged block whole repairs the VDI (the snapshot keeps its damage).
        qemu_io(&d.uri("vm"), &["write -P 0x33 400k 4k", "flush"]);
    });
    let mut fixed = img.clone();
    fixed[100 * 4096..101 * 4096].fill(0x33);
    assert_same("rewritten VDI", &env.export("vm"), &fixed);
    let out = env.cmd(&["check"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "the snapshot is still damaged");
    env.run(&["vdi", "delete", "vm@s"]);
    env.run(&["gc"]);
    env.finish();
}

#[test]
fn missing_store_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("none.store");
    for args in [&["vdi", "list"][..], &["check"], &["df"], &["gc"]] {
        let f = output_fail(parallax().arg("--store").arg(&path).args(args));
        f.assert_one_line(1, "does not exist");
    }
    // `serve` says the same, not "no such VDI".
    let f = output_fail(parallax().arg("--store").arg(&path).args([
        "serve",
        "--listen",
        "127.0.0.1:0",
    ]));
    f.assert_one_line(1, "does not exist");
    assert!(!f.stderr.contains("no such VDI"), "{f:?}");
    let f = output_fail(parallax().args(["vdi", "list"]));
    f.assert_one_line(1, "no store given");
    // Not a store at all.
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![0x42u8; 1 << 20]).unwrap();
    let f = output_fail(parallax().arg("--store").arg(&junk).args(["vdi", "list"]));
    f.assert_one_line(1, "not a Parallax store");
}

#[test]
fn second_opener_is_told_who_holds_the_store() {
    let store = TestStore::new("64M");
    // A direct CLI holds the store while it waits for its import source (a FIFO).
    let fifo = store.file("src.fifo");
    run_ok(Command::new("mkfifo").arg(&fifo));
    let spawn = || {
        store
            .cmd(&["vdi", "import", "v", fifo.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut importer = spawn();
    // The importer opens the store before the FIFO; wait until it holds the lock.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let msg = loop {
        // If a probe below held the store just when the importer opened it, the importer
        // was told so and gave up: start it again.
        if importer.try_wait().unwrap().is_some() {
            importer = spawn();
        }
        let out = store.cmd(&["vdi", "list"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        if err.contains(&format!("in use by PID {}", importer.id())) {
            assert!(!out.status.success());
            break err;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the importer never took the store"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let f = Failure {
        code: Some(1),
        stdout: String::new(),
        stderr: msg,
    };
    f.assert_one_line(1, &format!("in use by PID {}", importer.id()));
    // Let the importer go on. Importing from a pipe may be unsupported (the import reads
    // with pread); then it must fail cleanly and leave nothing behind.
    let data = random_bytes(9, MIB);
    let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    let _ = w.write_all(&data);
    drop(w);
    let out = importer.wait_with_output().unwrap();
    let list = store.json(&["vdi", "list", "--json"]);
    if out.status.success() {
        assert_same("imported from a FIFO", &store.export("v"), &data);
    } else {
        Failure {
            code: out.status.code(),
            stdout: String::new(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
        .assert_one_line(1, "");
        assert_eq!(list, Value::Array(vec![]));
        store.import("v", &data);
    }

    // A daemon holds it: a CLI that cannot reach its control socket, and a second daemon.
    let d = Daemon::start(&store);
    let mut cmd = store.cmd(&["vdi", "list"]);
    cmd.env("PARALLAX_CONTROL", store.file("no-such.sock"));
    output_fail(&mut cmd).assert_one_line(1, &format!("in use by PID {}", d.pid()));
    let other = store.file("other.sock");
    let second = output_fail(
        store
            .cmd(&["serve", "--listen", "127.0.0.1:0", "--unix"])
            .arg(&other),
    );
    assert!(
        second
            .stderr
            .contains(&format!("in use by PID {}", d.pid())),
        "{second:?}"
    );
    // The CLI through the daemon works meanwhile.
    assert_same("through the daemon", &store.export("v"), &data);
    d.stop();
    store.assert_clean();
}

/// `parallax completions` and `parallax man` are generated from the command-line definition:
/// the commands are all there.
#[test]
fn completions_and_man_page() {
    let store = TestStore::new("16M");
    for shell in ["bash", "zsh", "fish"] {
        let out = store.run(&["completions", shell]);
        for word in ["vdi", "serve", "snapshot", "diff", "json"] {
            assert!(out.contains(word), "{shell} completions lack {word}");
        }
    }
    let man = store.run(&["man"]);
    assert!(man.contains(".TH parallax"), "not a man page: {man}");
    for word in ["vdi", "serve", "check", "upgrade", "completions"] {
        assert!(man.contains(word), "the man page lacks {word}");
    }
    let f = store.fail(&["completions", "cmd.exe"]);
    assert_eq!(f.code, Some(2), "an unknown shell is a usage error: {f:?}");
}

/// Under systemd (`Type=notify`) the daemon says READY=1 once it listens and STOPPING=1 when
/// SIGTERM tells it to stop.
#[test]
fn daemon_notifies_systemd() {
    let store = TestStore::new("64M");
    let path = store.file("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let d = Daemon::start_with(
        &store,
        DEFAULT_CONFIG,
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
    );
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("no READY=1 from the daemon");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    d.stop();
    let n = sock.recv(&mut buf).expect("no STOPPING=1 from the daemon");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.lines().any(|l| l == "STOPPING=1"), "{msg:?}");
}

/// A `RUST_LOG` that does not parse is an error with a message, not a silent default.
#[test]
fn malformed_rust_log_is_an_error() {
    let store = TestStore::new("16M");
    let out = store
        .cmd(&["vdi", "list"])
        .env("RUST_LOG", "parallax=loudest")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.starts_with("parallax: error: RUST_LOG=") && err.lines().count() == 1,
        "{err}"
    );
    let out = store
        .cmd(&["vdi", "list"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success());
}

fn rollback_restores_a_snapshot(mode: Mode) {
    let env = Env::new(mode, "256M");
    let img = random_bytes(7, 4 * MIB);
    env.import("v", &img);
    env.run(&["vdi", "snapshot", "v@s1"]);
    let mut changed = img.clone();
    changed[MIB..2 * MIB].fill(0x33);
    env.with_nbd(|d| {
        let mut c = d.nbd("v");
        c.write(MIB as u64, &changed[MIB..2 * MIB]).unwrap();
        c.flush().unwrap();
    });
    env.run(&["vdi", "snapshot", "v", "s2"]);
    env.run(&["vdi", "resize", "v", "+4M"]);
    assert_same("before rollback", &env.export("v")[..4 * MIB], &changed);

    env.fail(&["vdi", "rollback", "v"])
        .assert_one_line(1, "v@SNAP");
    env.fail(&["vdi", "rollback", "v@nope"])
        .assert_one_line(1, "no such VDI or snapshot");
    let r = env.json(&["vdi", "rollback", "v@s1", "--json"]);
    assert_eq!(
        r,
        serde_json::json!({"vdi": "v", "snapshot": "v@s1", "size": 4 * MIB, "detached": 0})
    );
    assert_same("after rollback", &env.export("v"), &img);
    assert_same("later snapshot kept", &env.export("v@s2"), &changed);

    if let Some(d) = &env.daemon {
        // Open by a client: refused, unless forced; the forced one detaches the client.
        let mut c = d.nbd("v");
        c.write(0, &[1u8; 4096]).unwrap();
        env.fail(&["vdi", "rollback", "v@s2"])
            .assert_one_line(1, "--force");
        let out = env.run(&["vdi", "rollback", "v@s2", "--force"]);
        assert!(out.contains("detached 1 open handle"), "{out}");
        assert!(c.read(0, 4096).is_err(), "a detached client's I/O fails");
        assert!(d.wait_stderr("with --force: 1 open handle(s) detached"));
        drop(c);
        let mut c = d.nbd("v");
        assert_eq!(c.read(MIB as u64, 4096).unwrap(), vec![0x33u8; 4096]);
    }
    env.finish();
}

fn interrupted_import_leaves_nothing(mode: Mode) {
    let env = Env::new(mode, "256M");
    let mut child = env
        .cmd(&["vdi", "import", "big", "-", "--size", "64M"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&random_bytes(3, 8 * MIB)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    // As a Ctrl-C would, without the chance to clean up.
    child.kill().unwrap();
    child.wait().unwrap();
    drop(stdin);
    let staged = ".part:big";
    let gone = || {
        env.cmd(&["vdi", "info", staged, "--json"])
            .output()
            .is_ok_and(|o| !o.status.success())
    };
    // The daemon finds its client gone at once (it reads to the end of the pipe first);
    // a store opened anew drops what a killed process left.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !gone() {
        assert!(
            std::time::Instant::now() < deadline,
            "the interrupted import is still there"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let names: Vec<Value> = env
        .json(&["vdi", "list", "--json"])
        .as_array()
        .unwrap()
        .clone();
    assert!(names.is_empty(), "{names:?}");
    env.fail(&["vdi", "info", "big"])
        .assert_one_line(1, "no such VDI");
    assert_eq!(df(&env)["vdis"], 0);
    // The name is free again.
    env.import("big", &random_bytes(4, MIB));
    env.finish();
}

/// `vdi send SNAP | vdi recv NAME` between two processes, with `recv` on `env`'s store.
fn pipe_send_recv(from: &TestStore, send: &[&str], to: &TestStore, recv: &[&str]) -> String {
    let mut sender = from
        .cmd(send)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = to
        .cmd(recv)
        .stdin(sender.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(sender.wait().unwrap().success(), "{send:?}");
    assert!(
        out.status.success(),
        "{recv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn send_recv_through_a_pipe(mode: Mode) {
    let env = Env::new(mode, "256M");
    let img = image_with_holes(2, 8 * MIB);
    env.import("vm", &img);
    env.run(&["vdi", "snapshot", "vm@mon"]);
    env.with_nbd(|d| {
        let mut c = d.nbd("vm");
        c.write(MIB as u64, &[0x44u8; 65536]).unwrap();
        c.flush().unwrap();
    });
    env.run(&["vdi", "snapshot", "vm@tue"]);
    let tue = env.export("vm@tue");

    // Full, then incremental, to another store; and back into this one.
    let other = TestStore::new("256M");
    let out = pipe_send_recv(
        &env,
        &["vdi", "send", "vm@mon"],
        &other,
        &["vdi", "recv", "copy"],
    );
    assert!(out.contains("received vm@mon as copy@mon"), "{out}");
    assert_same("full", &other.export("copy@mon"), &img);
    assert_same("full, the VDI", &other.export("copy"), &img);
    let inc = env.file("inc.stream");
    let r = env.json(&[
        "vdi",
        "send",
        "vm@tue",
        "--from",
        "vm@mon",
        "-o",
        inc.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(r["data_bytes"], 65536, "only the change is sent: {r}");
    let r = other.json(&["vdi", "recv", "copy2", inc.to_str().unwrap(), "--json"]);
    assert_eq!(r["base"], "copy@mon", "{r}");
    assert_same("incremental", &other.export("copy2@tue"), &tue);
    other.assert_clean();
    if mode == Mode::Daemon {
        // Both ends through the one daemon holding the store.
        pipe_send_recv(
            &env,
            &["vdi", "send", "vm@tue"],
            &env,
            &["vdi", "recv", "back"],
        );
    } else {
        // Two processes cannot both hold the store: through a file.
        let f = env.file("tue.stream");
        env.run(&["vdi", "send", "vm@tue", "-o", f.to_str().unwrap()]);
        env.run(&["vdi", "recv", "back", f.to_str().unwrap()]);
    }
    assert_same("into the same store", &env.export("back@tue"), &tue);

    // Damaged or truncated: refused, nothing left; no base: refused.
    let bytes = std::fs::read(&inc).unwrap();
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 0x10;
    std::fs::write(env.file("flipped"), &flipped).unwrap();
    std::fs::write(env.file("short"), &bytes[..bytes.len() - 40]).unwrap();
    let before = env.run(&["vdi", "list", "-H", "-o", "name"]);
    for (file, why) in [("flipped", "damaged"), ("short", "truncated")] {
        env.fail(&["vdi", "recv", "bad", env.file(file).to_str().unwrap()])
            .assert_one_line(1, why);
        assert_eq!(env.run(&["vdi", "list", "-H", "-o", "name"]), before);
        assert!(!env
            .cmd(&["vdi", "info", ".part:bad"])
            .output()
            .unwrap()
            .status
            .success());
    }
    other.run(&["vdi", "delete", "-r", "copy2"]);
    other.run(&["vdi", "delete", "-r", "copy"]);
    other
        .fail(&["vdi", "recv", "again", inc.to_str().unwrap()])
        .assert_one_line(1, "receive it first");
    other
        .fail(&["vdi", "send", "nope@x"])
        .assert_one_line(1, "no such");
    other.assert_clean();
    env.finish();
}

fn schedules_set_list_remove(mode: Mode) {
    let env = Env::new(mode, "64M");
    env.run(&["vdi", "create", "vm-1", "--size", "1M"]);
    env.run(&["vdi", "create", "vm-2", "--size", "1M"]);
    env.run(&["vdi", "create", "db", "--size", "1M"]);
    let none = env.run(&["schedule", "list"]);
    assert!(none.contains("no schedules"), "{none}");

    let set = env.json(&[
        "schedule",
        "set",
        "vm-*",
        "--every",
        "10s",
        "--keep",
        "10s:1h,1m:1d,1h:30d",
        "--json",
    ]);
    assert_eq!(set["target"], "vm-*");
    assert_eq!(set["every_secs"], 10);
    assert_eq!(set["keep_spec"], "10s:1h,1m:1d,1h:30d");
    assert_eq!(set["vdis"], 2);
    let text = env.run(&["schedule", "set", "vm-2", "--every", "1h"]);
    assert!(
        text.contains("schedule for vm-2: a snapshot every 1h, keeping 1h:1d,1d:30d (1 VDI now)"),
        "{text}"
    );
    let list = env.json(&["schedule", "list", "--json"]);
    let rows: Vec<(String, u64, u64)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["target"].as_str().unwrap().to_string(),
                r["every_secs"].as_u64().unwrap(),
                r["vdis"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [("vm-*".to_string(), 10, 1), ("vm-2".to_string(), 3600, 1)],
        "vm-2 follows the schedule naming it"
    );
    let table = env.run(&["schedule", "list"]);
    assert!(table.starts_with("TARGET"), "{table}");
    assert!(table.contains("10s:1h,1m:1d,1h:30d"), "{table}");

    env.fail(&["schedule", "set", "vm-*", "--every", "1.5s"])
        .assert_one_line(1, "whole seconds");
    env.fail(&[
        "schedule", "set", "vm-*", "--every", "1h", "--keep", "1d:1h",
    ])
    .assert_one_line(1, "keeps nothing");
    env.fail(&["schedule", "set", "db@s", "--every", "1h"])
        .assert_one_line(1, "not snapshots");
    env.fail(&["schedule", "remove", "nope"])
        .assert_one_line(1, "no schedule for nope");
    let err = env.fail(&["schedule", "remove", "nope", "--json"]);
    let v: Value = serde_json::from_str(err.stdout.trim())
        .unwrap_or_else(|e| panic!("--json error is not JSON ({e}): {:?}", err.stdout));
    assert_eq!(v["error"]["kind"], "not-found", "{v}");

    env.run(&["schedule", "remove", "vm-*"]);
    let left = env.json(&["schedule", "list", "--json"]);
    assert_eq!(left.as_array().unwrap().len(), 1);
    assert_eq!(left[0]["target"], "vm-2");
    env.finish();
}
