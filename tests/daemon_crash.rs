//! The daemon dying: `kill -9` under a write load with periodic flushes and FUA writes (every
//! write acknowledged before a completed flush, or with FUA, survives; later ones are old or new
//! per block, never garbage; a snapshot taken under the load survives whole; the store checks
//! clean and opens without repair), and SIGTERM with clients connected (exit 0, everything
//! written is kept, the next open finds a clean close).

use std::{
    collections::BTreeMap,
    ops::Range,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use parallax_integration::daemon::*;

/// What `Store::open` logs (at info) when the last close was not clean.
const UNCLEAN: &str = "not closed cleanly";

/// One write of the load: where, what, and when it was sent and acknowledged.
#[derive(Clone)]
struct Write {
    block: u64,
    tag: u64,
    fua: bool,
    sent: Instant,
    acked: Option<Instant>,
}

/// A snapshot taken under the load: its name, when the command started and returned.
struct Snap {
    name: String,
    started: Instant,
    returned: Instant,
}

/// Everything the load did, shared by its writer threads.
#[derive(Default)]
struct History {
    /// Per writer, its writes in order.
    writes: Vec<Vec<Write>>,
    /// When each completed flush was sent (it covers every write acknowledged before that, on
    /// any connection: the export advertises CAN_MULTI_CONN).
    flushes_sent: Vec<Instant>,
    snapshot: Option<Snap>,
}

impl History {
    /// The writes to `block`, in order (each block belongs to one writer).
    fn writes_to(&self, block: u64) -> Vec<&Write> {
        self.writes
            .iter()
            .flat_map(|w| w.iter().filter(move |w| w.block == block))
            .collect()
    }
}

/// What the writers of one round share.
#[derive(Clone)]
struct Load {
    port: u16,
    round: u64,
    flush_every: u64,
    /// Writers `0..flushers` flush; the others rely on them (multi-conn).
    flushers: usize,
    /// Every 7th write carries FUA.
    fua: bool,
    history: Arc<Mutex<History>>,
    /// Writes acknowledged so far.
    progress: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

/// A writer: random tagged 4 KiB writes in `region`, one at a time (every 7th with FUA if the
/// load says so), a flush every `flush_every` writes if it is one of the flushers, until the
/// connection fails (the daemon died) or `stop`.
fn writer(load: Load, id: usize, region: Range<u64>) {
    use rand::{Rng, SeedableRng};
    let Load {
        port,
        round,
        flush_every,
        flushers,
        fua,
        history,
        progress,
        stop,
    } = load;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(round << 8 | id as u64);
    let mut c = NbdConn::connect(port, "vm");
    for n in 0u64.. {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let block = rng.random_range(region.clone());
        // Unique across writers and rounds, never 0.
        let tag = round << 48 | (id as u64) << 40 | (n + 1);
        let fua = fua && n % 7 == 3;
        let idx = {
            let mut h = history.lock().unwrap();
            let w = &mut h.writes[id];
            w.push(Write {
                block,
                tag,
                fua,
                sent: Instant::now(),
                acked: None,
            });
            w.len() - 1
        };
        let data = tagged_block(tag);
        let r = if fua {
            c.write_fua(block * 4096, &data)
        } else {
            c.write(block * 4096, &data)
        };
        if r.is_err() {
            return;
        }
        history.lock().unwrap().writes[id][idx].acked = Some(Instant::now());
        progress.fetch_add(1, Ordering::Relaxed);
        if id < flushers && (n + 1) % flush_every == 0 {
            let sent = Instant::now();
            if c.flush().is_err() {
                return;
            }
            history.lock().unwrap().flushes_sent.push(sent);
        }
    }
}

/// Checks one block: `found` must be the tag of the last write that must be there (index
/// `floor` in `writes`, or `before` if `None`) or of a later write sent before `until` (any
/// later write if `None`). Returns a description of the failure.
fn check_block(
    b: u64,
    found: u64,
    before: u64,
    writes: &[&Write],
    floor: Option<usize>,
    until: Option<Instant>,
) -> Result<(), String> {
    let (must, later) = match floor {
        Some(i) => (writes[i].tag, &writes[i + 1..]),
        None => (before, writes),
    };
    let may = |w: &&&Write| until.is_none_or(|u| w.sent < u);
    if found == must || later.iter().filter(may).any(|w| w.tag == found) {
        return Ok(());
    }
    let pos = |t: u64| writes.iter().position(|w| w.tag == t);
    Err(format!(
        "block {b}: found tag {found:#x} (write {:?} of {} to this block); it must hold {must:#x} \
         (write {floor:?}) or one of the {} later writes",
        pos(found),
        writes.len(),
        later.iter().filter(may).count()
    ))
}

/// Panics listing `errors`, if any.
fn report(what: &str, errors: &[String]) {
    assert!(
        errors.is_empty(),
        "{what}: {} blocks are wrong:\n{}",
        errors.len(),
        errors
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The tag of every block of `img`, panicking on garbage.
fn tags(what: &str, img: &[u8]) -> Vec<u64> {
    img.chunks(4096)
        .enumerate()
        .map(|(b, d)| block_tag(d).unwrap_or_else(|| panic!("{what}: block {b} holds garbage")))
        .collect()
}

/// Checks the VDI after a crash against the load's history and the tags before the load:
/// every write acknowledged before a completed flush was sent, or acknowledged with FUA, is
/// there (unless overwritten later); nothing else is but writes that were sent. Returns the
/// tags now in the VDI.
fn verify_vdi(img: &[u8], before: &[u64], h: &History) -> Vec<u64> {
    let flushed = h.flushes_sent.iter().max().copied();
    let now = tags("vm", img);
    let mut durable_blocks = 0;
    let mut errors = Vec::new();
    for (b, &found) in now.iter().enumerate() {
        let writes = h.writes_to(b as u64);
        let floor = writes.iter().rposition(|w| match w.acked {
            Some(a) => w.fua || flushed.is_some_and(|f| a < f),
            None => false,
        });
        durable_blocks += floor.is_some() as usize;
        if let Err(e) = check_block(b as u64, found, before[b], &writes, floor, None) {
            errors.push(e);
        }
    }
    report("vm after the crash", &errors);
    assert!(durable_blocks > 0, "no durable write was checked");
    eprintln!(
        "after the crash: {durable_blocks} blocks held durable writes ({} flushes, {} writes)",
        h.flushes_sent.len(),
        h.writes.iter().map(Vec::len).sum::<usize>()
    );
    now
}

/// Checks a snapshot taken under the load: it holds every write acknowledged before the
/// snapshot command started, and no write sent after it returned.
fn verify_snapshot(img: &[u8], before: &[u64], h: &History, s: &Snap) {
    let mut errors = Vec::new();
    for (b, found) in tags(&s.name, img).into_iter().enumerate() {
        let writes = h.writes_to(b as u64);
        let floor = writes
            .iter()
            .rposition(|w| w.acked.is_some_and(|a| a < s.started));
        if let Err(e) = check_block(b as u64, found, before[b], &writes, floor, Some(s.returned)) {
            errors.push(e);
        }
    }
    report(&s.name, &errors);
}

/// One round of [`kill_9`]: the daemon is killed after this many writes; a writer flushes every
/// `flush_every` of its writes; the daemon commits every `commit_ms` on its own.
struct Round {
    writes_before_kill: u64,
    flush_every: u64,
    commit_ms: u64,
}

const fn round(writes_before_kill: u64, flush_every: u64, commit_ms: u64) -> Round {
    Round {
        writes_before_kill,
        flush_every,
        commit_ms,
    }
}

/// Three writers on separate connections; only the first flushes (its flushes cover the others'
/// writes: multi-conn), and the daemon commits only when asked (flushes, the snapshot). The
/// variant below has every writer flush, FUA writes and periodic commits, so flushes overlap
/// commits in flight.
#[test]
fn kill_9_under_write_load() {
    kill_9(
        &[
            round(300, 8, 60_000),
            round(1500, 32, 60_000),
            round(3000, 5, 60_000),
            round(800, 64, 60_000),
            round(2000, 16, 60_000),
            round(5000, 200, 60_000),
        ],
        1,
        false,
    );
}

/// Every writer flushes, some writes carry FUA, and the daemon commits often on its own: flushes
/// arrive while other commits are being written.
#[test]
fn kill_9_under_write_load_with_concurrent_commits() {
    kill_9(
        &[
            round(300, 8, 50),
            round(1500, 32, 60_000),
            round(3000, 5, 200),
            round(800, 64, 500),
            round(2000, 16, 20),
            round(5000, 200, 60_000),
        ],
        3,
        true,
    );
}

fn kill_9(rounds: &[Round], flushers: usize, fua: bool) {
    const BLOCKS: u64 = 2048;
    const WRITERS: usize = 3;
    let store = TestStore::new("256M");
    store.run(&["vdi", "create", "vm", "--size", "8M"]);
    let mut before = vec![0u64; BLOCKS as usize];
    // Snapshot images taken under the load, which must never change afterwards.
    let mut snapshots: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    // After even rounds the CLI opens the store directly first; after odd rounds the restarted
    // daemon does, and the data is read back through it.
    let mut unverified: Option<History> = None;
    for (i, r) in rounds.iter().enumerate() {
        let Round {
            writes_before_kill,
            flush_every,
            commit_ms,
        } = *r;
        let cfg = format!("(commit_interval_ms: {commit_ms}, nbd: (workers: 4))");
        let d = Daemon::start_with(&store, &cfg, &[]);
        if let Some(h) = unverified.take() {
            assert!(d.wait_stderr(UNCLEAN), "{}", d.stderr());
            before = verify_round(&store, &before, &h, &mut snapshots);
        }
        let load = Load {
            port: d.port(),
            round: i as u64 + 1,
            flush_every,
            flushers,
            fua,
            history: Arc::new(Mutex::new(History {
                writes: vec![Vec::new(); WRITERS],
                ..History::default()
            })),
            progress: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let per = BLOCKS / WRITERS as u64;
        let threads: Vec<_> = (0..WRITERS)
            .map(|id| {
                let load = load.clone();
                let region = id as u64 * per..(id as u64 + 1) * per;
                thread::spawn(move || writer(load, id, region))
            })
            .collect();
        // Waits for `n` acknowledged writes and at least one completed flush.
        let wait_for = |n: u64| {
            let until = Instant::now() + Duration::from_secs(60);
            while load.progress.load(Ordering::Relaxed) < n
                || load.history.lock().unwrap().flushes_sent.is_empty()
            {
                assert!(Instant::now() < until, "the load stalled");
                thread::sleep(Duration::from_millis(1));
            }
        };
        // Half-way, a snapshot through the control socket while the writers go on.
        wait_for(writes_before_kill / 2);
        let name = format!("r{i}");
        let started = Instant::now();
        store.run(&["vdi", "snapshot", "vm", &name]);
        load.history.lock().unwrap().snapshot = Some(Snap {
            name: format!("vm@{name}"),
            started,
            returned: Instant::now(),
        });
        wait_for(writes_before_kill);
        d.kill9();
        load.stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().expect("writer panicked");
        }
        let h = std::mem::take(&mut *load.history.lock().unwrap());
        if i % 2 == 1 {
            unverified = Some(h);
            continue;
        }
        // The store opens directly, says it was not closed cleanly, and checks clean.
        let out = output_ok(store.cmd(&["check", "--json"]).env("RUST_LOG", "info"));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["ok"], true, "{report:#}");
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(log.contains(UNCLEAN), "{log}");
        before = verify_round(&store, &before, &h, &mut snapshots);
    }
    let d = Daemon::start(&store);
    if let Some(h) = unverified.take() {
        assert!(d.wait_stderr(UNCLEAN), "{}", d.stderr());
        verify_round(&store, &before, &h, &mut snapshots);
    }
    d.stop();
    store.assert_clean();
}

/// After a kill -9 (and maybe a restart): the VDI and the round's snapshot hold what the load
/// allows, earlier snapshots are unchanged, and the store checks clean. Returns the VDI's tags.
fn verify_round(
    store: &TestStore,
    before: &[u64],
    h: &History,
    snapshots: &mut BTreeMap<String, Vec<u8>>,
) -> Vec<u64> {
    let now = verify_vdi(&store.export("vm"), before, h);
    let s = h.snapshot.as_ref().expect("a snapshot in every round");
    let img = store.export(&s.name);
    verify_snapshot(&img, before, h, s);
    snapshots.insert(s.name.clone(), img);
    for (name, img) in snapshots.iter() {
        assert!(store.export(name) == *img, "{name} changed after a crash");
    }
    store.assert_clean();
    now
}

#[test]
fn sigterm_with_clients_connected() {
    let store = TestStore::new("128M");
    store.run(&["vdi", "create", "vm", "--size", "4M"]);
    store.run(&["vdi", "snapshot", "vm", "empty"]);
    // No periodic commit: only the shutdown makes the writes durable.
    let d = Daemon::start_with(&store, "(commit_interval_ms: 3600000)", &[]);
    let mut writer = d.nbd("vm");
    let mut reader = d.nbd("vm@empty");
    let mut idle = d.nbd("vm");
    for b in 0..256u64 {
        writer.write(b * 4096, &tagged_block(b + 1)).unwrap();
    }
    assert_eq!(reader.read(0, 4096).unwrap(), vec![0; 4096]);
    // A qemu-io that is still connected while the daemon goes down.
    let mut qio = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            &d.uri("vm"),
            "-c",
            "write -P 0x5a 2M 1M",
            "-c",
            "sleep 60000",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until qemu-io's write has landed (the store sees it through the daemon).
    let until = Instant::now() + Duration::from_secs(60);
    while writer.read(2 << 20, 4096).unwrap() != vec![0x5a; 4096] {
        assert!(Instant::now() < until, "qemu-io's write never arrived");
        thread::sleep(Duration::from_millis(20));
    }

    let (status, stderr) = d.terminate();
    assert!(status.success(), "exit status {status}; stderr:\n{stderr}");
    assert!(stderr.contains("closed cleanly"), "{stderr}");
    // The clients were disconnected.
    assert!(writer.read(0, 4096).is_err());
    assert!(reader.read(0, 4096).is_err());
    assert!(idle.raw().closed_by_server());
    let _ = qio.kill();
    let _ = qio.wait();

    // The next open finds a clean close, and everything written is there.
    let out = output_ok(store.cmd(&["vdi", "list"]).env("RUST_LOG", "info"));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!log.contains(UNCLEAN), "{log}");
    assert!(
        log.contains("opened store"),
        "RUST_LOG=info shows nothing: {log}"
    );
    let img = store.export("vm");
    for b in 0..256usize {
        assert_eq!(
            block_tag(&img[b * 4096..(b + 1) * 4096]),
            Some(b as u64 + 1),
            "block {b}"
        );
    }
    assert!(img[2 << 20..3 << 20].iter().all(|&x| x == 0x5a));
    assert!(img[3 << 20..].iter().all(|&x| x == 0));
    assert!(store.export("vm@empty").iter().all(|&x| x == 0));
    store.assert_clean();
    let d = Daemon::start(&store);
    assert!(d.wait_stderr("parallax serve started"), "{}", d.stderr());
    assert!(!d.stderr().contains(UNCLEAN), "{}", d.stderr());
    d.stop();
}

/// A flush that arrives while a commit is being written, with nothing changed since that
/// commit was prepared, must still wait for it: the writes it covers are in that commit.
#[test]
fn flush_during_a_commit_waits_for_it() {
    const BLOCKS: u64 = 16384;
    let store = TestStore::new("256M");
    store.run(&["vdi", "create", "vm", "--size", "64M"]);
    let mut before = vec![0u64; BLOCKS as usize];
    for attempt in 0..3u64 {
        let d = Daemon::start_with(&store, "(commit_interval_ms: 3600000)", &[]);
        // Many scattered writes: a commit with many map nodes and data to sync.
        let mut a = d.nbd("vm");
        let mut b = d.nbd("vm");
        let mut written = Vec::new();
        for i in 0..4096u64 {
            let block = (i * 7919 + attempt * 13) % BLOCKS;
            let tag = (attempt + 1) << 32 | (i + 1);
            a.write(block * 4096, &tagged_block(tag)).unwrap();
            written.push((block, tag));
        }
        // Flush A starts the commit; flush B arrives while it is being written.
        let t = thread::spawn(move || {
            let r = a.flush();
            (r, Instant::now())
        });
        thread::sleep(Duration::from_millis(5));
        b.flush().unwrap();
        let b_done = Instant::now();
        d.kill9();
        let (_, a_done) = t.join().unwrap();
        eprintln!(
            "attempt {attempt}: flush B returned {:?} before flush A",
            a_done.saturating_duration_since(b_done)
        );
        let img = store.export("vm");
        let mut lost = 0;
        for &(block, tag) in &written {
            let found = block_tag(&img[block as usize * 4096..][..4096]).unwrap();
            if found != tag {
                assert_eq!(found, before[block as usize], "block {block} holds garbage");
                lost += 1;
            }
        }
        assert_eq!(
            lost, 0,
            "{lost} flushed writes were lost (attempt {attempt})"
        );
        for (block, tag) in written {
            before[block as usize] = tag;
        }
    }
    store.assert_clean();
}
