//! Soak: the real `parallax serve` under concurrent load for a bounded time.
//!
//! NBD workers each own a VDI: random tagged writes, reads checked against a model, flushes,
//! reconnects, snapshots (checked later through their read-only exports), forks of those
//! snapshots (written, checked, deleted), deletes of old snapshots. Ring workers do the same
//! through `frontend-shim` attached to the daemon, detaching and re-attaching. An admin worker
//! runs `gc`, `df`, `vdi list` and creates and deletes scratch VDIs through the CLI meanwhile.
//!
//! The run has a warm-up phase and two measured phases; between phases every client
//! disconnects and the daemon's open descriptors and RSS are sampled: the second sample may not
//! exceed the first (descriptors) or grow past a generous bound (memory). At the end every VDI
//! and snapshot is checked against its model, the daemon stops cleanly, `check` is clean, and
//! the VDIs read back the same from the store offline.
//!
//! `PARALLAX_SOAK_SECS` sets the length (default 40 s, as in `make test`; `make soak` runs
//! 600 s); `PARALLAX_SOAK_SEED` the seed (printed, for reproducing a failure).

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use frontend_shim::{Frontend, FrontendConfig, IoRequest};
use parallax_integration::daemon::{block_tag, tagged_block, Daemon, NbdConn, TestStore};
use rand::{rngs::SmallRng, Rng, SeedableRng};

const BLOCK: usize = 4096;
/// Blocks per soaked VDI (8 MiB).
const VDI_BLOCKS: usize = 2048;
const NBD_WORKERS: usize = 4;
const RING_WORKERS: usize = 2;
/// Snapshots a worker keeps before deleting its oldest.
const KEEP_SNAPSHOTS: usize = 3;

/// The daemon's configuration: small caches, so they fill during the warm-up and memory is
/// flat afterwards; frequent commits.
const CONFIG: &str = "(commit_interval_ms: 300, nbd: (workers: 4, max_connections: 64), \
                      cache: (map_nodes: 2048, refcount_pages: 256))";

/// A VDI's expected contents: the tag of each block (0 = zeros).
#[derive(Clone)]
struct Model {
    name: String,
    blocks: Vec<u64>,
    /// Snapshots still alive: (full name, contents when taken).
    snapshots: Vec<(String, Vec<u64>)>,
    next_snapshot: u64,
}

impl Model {
    fn new(name: String) -> Model {
        Model {
            name,
            blocks: vec![0; VDI_BLOCKS],
            snapshots: Vec::new(),
            next_snapshot: 0,
        }
    }
}

fn check_blocks(what: &str, first: usize, data: &[u8], want: &[u64]) {
    for (i, b) in data.chunks(BLOCK).enumerate() {
        let got = block_tag(b);
        assert_eq!(
            got,
            Some(want[i]),
            "{what}: block {} holds {got:?}, expected tag {}",
            first + i,
            want[i]
        );
    }
}

/// Reads a whole VDI or snapshot over NBD and compares it with `want`.
fn verify_nbd(port: u16, export: &str, want: &[u64]) {
    let mut c = NbdConn::connect(port, export);
    const CHUNK: usize = 64;
    for first in (0..VDI_BLOCKS).step_by(CHUNK) {
        let data = c
            .read((first * BLOCK) as u64, (CHUNK * BLOCK) as u32)
            .unwrap_or_else(|e| panic!("read {export}: {e}"));
        check_blocks(export, first, &data, &want[first..first + CHUNK]);
    }
}

/// Unique tags across workers: worker id in the top bits.
struct Tags(AtomicU64);

impl Tags {
    fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}

fn snapshot(store: &TestStore, m: &mut Model) {
    let snap = format!("s{}", m.next_snapshot);
    m.next_snapshot += 1;
    store.run(&["vdi", "snapshot", &m.name, &snap]);
    m.snapshots
        .push((format!("{}@{snap}", m.name), m.blocks.clone()));
    if m.snapshots.len() > KEEP_SNAPSHOTS {
        let (old, _) = m.snapshots.remove(0);
        delete(store, &old);
    }
}

/// Forks one of `m`'s snapshots, checks and writes the fork over NBD, deletes it.
fn fork_cycle(store: &TestStore, port: u16, m: &Model, rng: &mut SmallRng, tags: &Tags) {
    let Some((snap, contents)) = m.snapshots.last() else {
        return;
    };
    let fork = format!("{}-fork{}", m.name, rng.random::<u32>());
    store.run(&["vdi", "fork", snap, &fork]);
    {
        let mut model = contents.clone();
        let mut c = NbdConn::connect(port, &fork);
        for _ in 0..8 {
            let b = rng.random_range(0..VDI_BLOCKS);
            let data = c.read((b * BLOCK) as u64, BLOCK as u32).expect("read fork");
            check_blocks(&fork, b, &data, &model[b..b + 1]);
            let tag = tags.next();
            c.write((b * BLOCK) as u64, &tagged_block(tag))
                .expect("write fork");
            model[b] = tag;
        }
        let data = c.read(0, (VDI_BLOCKS * BLOCK) as u32).expect("read fork");
        check_blocks(&fork, 0, &data, &model);
    }
    delete(store, &fork);
}

/// `vdi delete NAME`, retried while the VDI is still open: a client's handle goes when the
/// server sees its connection closed, a moment after the client closed it.
fn delete(store: &TestStore, name: &str) {
    for attempt in 0.. {
        let out = store
            .cmd(&["vdi", "delete", name])
            .output()
            .expect("run delete");
        if out.status.success() {
            return;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            attempt < 100 && err.contains("in use"),
            "delete {name}: {err}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One NBD worker's phase: random I/O on its VDI until `until`.
fn nbd_phase(store: &TestStore, port: u16, m: &mut Model, seed: u64, tags: &Tags, until: Instant) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut c = NbdConn::connect(port, &m.name);
    while Instant::now() < until {
        let first = rng.random_range(0..VDI_BLOCKS);
        let n = rng.random_range(1..=8).min(VDI_BLOCKS - first);
        match rng.random_range(0..100) {
            0..=54 => {
                let mut data = Vec::with_capacity(n * BLOCK);
                for i in 0..n {
                    let tag = tags.next();
                    data.extend_from_slice(&tagged_block(tag));
                    m.blocks[first + i] = tag;
                }
                c.write((first * BLOCK) as u64, &data).expect("write");
            }
            55..=79 => {
                let data = c
                    .read((first * BLOCK) as u64, (n * BLOCK) as u32)
                    .expect("read");
                check_blocks(&m.name, first, &data, &m.blocks[first..first + n]);
            }
            80..=84 => c.flush().expect("flush"),
            85..=89 => c = NbdConn::connect(port, &m.name),
            90..=93 => snapshot(store, m),
            94..=96 => fork_cycle(store, port, m, &mut rng, tags),
            _ => {
                if let Some((snap, contents)) = m.snapshots.first() {
                    let mut s = NbdConn::connect(port, snap);
                    let data = s
                        .read((first * BLOCK) as u64, (n * BLOCK) as u32)
                        .expect("read snapshot");
                    check_blocks(snap, first, &data, &contents[first..first + n]);
                }
            }
        }
    }
    c.flush().expect("flush");
}

/// One ring worker's phase: `frontend-shim` attached to the daemon, detaching now and then.
fn ring_phase(store: &TestStore, m: &mut Model, seed: u64, tags: &Tags, until: Instant) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let cfg = FrontendConfig {
        indirect_segments: 32,
        ..FrontendConfig::default()
    };
    let name = m.name.clone();
    let attach = || Frontend::attach_store(&store.path, &name, &cfg).expect("attach");
    let mut front = attach();
    while Instant::now() < until {
        let first = rng.random_range(0..VDI_BLOCKS);
        let n = rng.random_range(1..=16).min(VDI_BLOCKS - first);
        let sector = (first * BLOCK / 512) as u64;
        match rng.random_range(0..100) {
            0..=54 => {
                let mut data = Vec::with_capacity(n * BLOCK);
                let mut written = Vec::with_capacity(n);
                for _ in 0..n {
                    let tag = tags.next();
                    data.extend_from_slice(&tagged_block(tag));
                    written.push(tag);
                }
                let c = front
                    .queue(0)
                    .run(&IoRequest::write(sector, &data))
                    .expect("ring write");
                assert_eq!(c.status, 0, "ring write");
                m.blocks[first..first + n].copy_from_slice(&written);
            }
            55..=84 => {
                let c = front
                    .queue(0)
                    .run(&IoRequest::read(sector, (n * BLOCK) as u64))
                    .expect("ring read");
                assert_eq!(c.status, 0, "ring read");
                let data = c.data.expect("read data");
                check_blocks(&m.name, first, &data, &m.blocks[first..first + n]);
            }
            85..=91 => {
                let c = front.queue(0).run(&IoRequest::flush()).expect("ring flush");
                assert_eq!(c.status, 0, "ring flush");
            }
            92..=95 => {
                front.detach().expect("detach");
                front = attach();
            }
            _ => snapshot(store, m),
        }
    }
    front.detach().expect("detach");
}

/// The admin worker: reports, gc and registry churn through the control socket.
fn admin_phase(store: &TestStore, seed: u64, until: Instant) {
    let mut rng = SmallRng::seed_from_u64(seed);
    while Instant::now() < until {
        store.json(&["gc", "--json"]);
        store.json(&["df", "--json"]);
        store.json(&["vdi", "list", "--json"]);
        let name = format!("scratch-{}", rng.random::<u32>());
        store.run(&["vdi", "create", &name, "--size", "1G"]);
        store.run(&["vdi", "delete", &name]);
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// What the daemon holds, sampled once every client has gone.
#[derive(Debug, Clone, Copy)]
struct Sample {
    fds: usize,
    /// Memory mappings (a grant table left mapped after a detach would show here).
    maps: usize,
    threads: u64,
    /// Resident bytes, and the anonymous and shared-memory parts of it.
    rss: u64,
    anon: u64,
    shmem: u64,
}

/// Samples process `pid` once its descriptor count settles.
fn resources(pid: u32) -> Sample {
    let fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("fd dir")
            .count()
    };
    let mut last = fds();
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let now = fds();
        if now == last {
            break;
        }
        last = now;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .expect("maps")
        .lines()
        .count();
    Sample {
        fds: last,
        maps,
        threads: field("Threads:"),
        rss: field("VmRSS:") * 1024,
        anon: field("RssAnon:") * 1024,
        shmem: field("RssShmem:") * 1024,
    }
}

#[test]
fn soak() {
    let secs: u64 = std::env::var("PARALLAX_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let seed: u64 = std::env::var("PARALLAX_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x50a6);
    eprintln!("soak: {secs} s, seed {seed} (PARALLAX_SOAK_SECS, PARALLAX_SOAK_SEED)");
    let store = TestStore::new("1G");
    let names: Vec<String> = (0..NBD_WORKERS)
        .map(|i| format!("nbd-{i}"))
        .chain((0..RING_WORKERS).map(|i| format!("ring-{i}")))
        .collect();
    for n in &names {
        store.run(&[
            "vdi",
            "create",
            n,
            "--size",
            &format!("{}", VDI_BLOCKS * BLOCK),
        ]);
    }
    let daemon = Daemon::start_with(&store, CONFIG, &[]);
    let port = daemon.port();
    let mut models: Vec<Model> = names.iter().cloned().map(Model::new).collect();
    let tags = Arc::new(Tags(AtomicU64::new(1)));

    // Warm-up, then two measured phases of equal length.
    let phases = [secs / 5, secs * 2 / 5, secs * 2 / 5];
    let mut samples = Vec::new();
    for (p, &len) in phases.iter().enumerate() {
        let until = Instant::now() + Duration::from_secs(len.max(2));
        std::thread::scope(|s| {
            let store = &store;
            let tags = &tags;
            let mut handles = Vec::new();
            for (i, m) in models.iter_mut().enumerate() {
                let wseed = seed ^ ((p as u64) << 32) ^ ((i as u64 + 1) * 0x9e37_79b9);
                handles.push(s.spawn(move || {
                    if i < NBD_WORKERS {
                        nbd_phase(store, port, m, wseed, tags, until);
                    } else {
                        ring_phase(store, m, wseed, tags, until);
                    }
                }));
            }
            s.spawn(move || admin_phase(store, seed ^ p as u64, until));
        });
        let r = resources(daemon.pid());
        eprintln!(
            "soak: after phase {p}: {} descriptors, {} mappings, {} threads, RSS {} MiB \
             (anonymous {} MiB, shared {} MiB)",
            r.fds,
            r.maps,
            r.threads,
            r.rss >> 20,
            r.anon >> 20,
            r.shmem >> 20
        );
        samples.push(r);
    }
    let (a, b) = (samples[1], samples[2]);
    // The allocator maps and unmaps arenas on its own, so mappings get a little slack; a grant
    // table left mapped per ring attach would add hundreds.
    assert!(
        b.fds <= a.fds && b.maps <= a.maps + 16 && b.threads <= a.threads,
        "the daemon holds more after the last phase than after the one before: {a:?} then {b:?}"
    );
    assert!(
        b.rss <= a.rss + (a.rss / 2).max(32 << 20),
        "the daemon's RSS grew from {} MiB to {} MiB between equal phases",
        a.rss >> 20,
        b.rss >> 20
    );

    // Every VDI and every snapshot still alive reads back as modelled.
    for m in &models {
        verify_nbd(port, &m.name, &m.blocks);
        for (snap, contents) in &m.snapshots {
            verify_nbd(port, snap, contents);
        }
    }
    let listed = store.json(&["vdi", "list", "--json"]);
    let mut live: BTreeMap<String, ()> = BTreeMap::new();
    for v in listed.as_array().expect("list is an array") {
        live.insert(v["name"].as_str().expect("name").to_string(), ());
    }
    for m in &models {
        assert!(live.contains_key(&m.name), "{} is listed", m.name);
        for (snap, _) in &m.snapshots {
            assert!(live.contains_key(snap), "{snap} is listed");
        }
    }
    assert_eq!(
        live.len(),
        models.iter().map(|m| 1 + m.snapshots.len()).sum::<usize>(),
        "no forks, scratch VDIs or deleted snapshots are left: {listed:#}"
    );
    daemon.stop();
    store.assert_clean();
    // And offline, after the clean shutdown.
    for m in models.iter().take(2) {
        let data = store.export(&m.name);
        check_blocks(&m.name, 0, &data, &m.blocks);
    }
}
