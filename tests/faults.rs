//! Fault injection through the device layer, seen by real protocol clients.
//!
//! The store runs on a [`FaultDevice`] over a [`MemDevice`] (the "disk"); the real NBD server
//! (over the daemon's [`StoreProvider`]) serves it in-process, and the clients are a raw NBD
//! client, qemu-io, and `frontend-shim`'s blkfront over the ring engine. Failed reads, writes
//! and fsyncs, ENOSPC, short writes and a full store must each give the client the protocol's
//! error; after a failed write or fsync the store refuses writes until it is reopened; and on
//! reopening the same disk, `check` is clean and everything flushed before is there.

use std::{
    io,
    net::TcpListener,
    process::Command,
    sync::{atomic::Ordering, Arc},
    thread::JoinHandle,
};

use frontend_shim::{Frontend, FrontendConfig, IoRequest};
use parallax::{
    blkif::Features,
    daemon::provider::{FrontEnd, StoreProvider},
    disk::Disk,
    nbd::{proto::*, NbdConfig, NbdServer, NbdShutdown},
    store::{
        device::{FaultDevice, FaultPlan, MemDevice},
        Store, StoreOptions,
    },
};
use parallax_integration::nbd::{random_bytes, RawClient};
use rand::{rngs::SmallRng, Rng, SeedableRng};

// Linux errno values, as NBD carries them.
const EIO: u32 = 5;
const ENOSPC: u32 = 28;
const BLOCK: usize = 4096;
const BLKIF_RSP_OKAY: i16 = 0;
const BLKIF_RSP_ERROR: i16 = -1;

fn options() -> StoreOptions {
    StoreOptions {
        node_cache_nodes: 64,
        rc_cache_pages: 8,
        dedup_leaf_cache: 8,
        orphans_per_commit: 64,
        max_dirty_nodes: 200,
        checkpoint_interval: None,
        give_back_after: std::time::Duration::ZERO,
    }
}

/// A store on a fault-injecting device, served over NBD on an ephemeral port.
struct Rig {
    mem: Arc<MemDevice>,
    plan: Arc<FaultPlan>,
    store: Arc<Store>,
    port: u16,
    shutdown: NbdShutdown,
    server: Option<JoinHandle<io::Result<()>>>,
}

impl Rig {
    /// A fresh store of `bytes` bytes holding the VDIs `vdis` (name, size).
    fn create(bytes: u64, vdis: &[(&str, u64)]) -> Rig {
        let mem = Arc::new(MemDevice::new(bytes));
        Store::format(&*mem, bytes).expect("format");
        let s = Store::open_device(mem.clone(), options()).expect("open");
        for (name, size) in vdis {
            s.create_vdi(name, *size).expect("create vdi");
        }
        s.close().expect("close");
        drop(s);
        Rig::open(mem)
    }

    /// Opens the store on `mem` (through a fresh, healthy fault device) and serves it.
    fn open(mem: Arc<MemDevice>) -> Rig {
        let fault = FaultDevice::new(mem.clone());
        let plan = fault.plan.clone();
        let store = Store::open_device(Arc::new(fault), options()).expect("reopen");
        let provider = Arc::new(StoreProvider::new(store.clone(), FrontEnd::Nbd));
        let tcp = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = tcp.local_addr().expect("addr").port();
        let mut server = NbdServer::new(
            provider,
            NbdConfig {
                workers: 2,
                ..NbdConfig::default()
            },
        )
        .expect("server");
        server.add_tcp_listener(tcp).expect("listen");
        let shutdown = server.shutdown_handle();
        let thread = std::thread::spawn(move || server.run());
        Rig {
            mem,
            plan,
            store,
            port,
            shutdown,
            server: Some(thread),
        }
    }

    /// A raw client with structured replies, in the transmission phase on `export`.
    fn client(&self, export: &str) -> Client {
        let mut c = RawClient::start(self.port);
        c.go(export, true, false);
        Client { c, handle: 0 }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }

    fn stop(&mut self) {
        if let Some(t) = self.server.take() {
            self.shutdown.shutdown();
            t.join().expect("server thread").expect("server run");
        }
    }

    /// Stops serving, forgets the store's memory (as a restart does) and opens the same disk
    /// again; `check` must be clean.
    fn reopen(mut self) -> Rig {
        self.stop();
        let mem = self.mem.clone();
        drop(self);
        let rig = Rig::open(mem);
        rig.assert_clean();
        rig
    }

    fn assert_clean(&self) {
        let r = self.store.check(true, &mut |_| {}).expect("check runs");
        assert!(r.ok, "check found damage: {r:#?}");
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A raw NBD client that answers with the reply's errno.
struct Client {
    c: RawClient,
    handle: u64,
}

impl Client {
    fn next(&mut self) -> u64 {
        self.handle += 1;
        self.handle
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        let h = self.next();
        self.c.write(0, h, offset, data);
        self.reply(h, None).error
    }

    fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, u32> {
        let h = self.next();
        self.c.request(CMD_READ, 0, h, offset, len as u32);
        let r = self.reply(h, Some(len));
        if r.error == 0 {
            assert_eq!(r.data.len(), len, "a successful read returns all its bytes");
            Ok(r.data)
        } else {
            Err(r.error)
        }
    }

    fn flush(&mut self) -> u32 {
        let h = self.next();
        self.c.request(CMD_FLUSH, 0, h, 0, 0);
        self.reply(h, None).error
    }

    fn trim(&mut self, offset: u64, len: u32) -> u32 {
        let h = self.next();
        self.c.request(CMD_TRIM, 0, h, offset, len);
        self.reply(h, None).error
    }

    fn reply(&mut self, h: u64, len: Option<usize>) -> parallax_integration::nbd::Reply {
        let r = self.c.read_reply(len).expect("every request gets a reply");
        assert_eq!(r.handle, h);
        r
    }
}

/// `data` with no all-zero 4 KiB block (those would be stored as holes).
fn dense(seed: u64, len: usize) -> Vec<u8> {
    let mut v = random_bytes(seed, len);
    for b in v.chunks_mut(BLOCK) {
        b[0] |= 1;
    }
    v
}

#[test]
fn failed_write_is_eio_and_the_store_refuses_writes_until_reopened() {
    for short in [false, true] {
        let rig = Rig::create(32 << 20, &[("a", 8 << 20), ("b", 8 << 20)]);
        let mut a = rig.client("a");
        let flushed = dense(1, 64 << 10);
        assert_eq!(a.write(0, &flushed), 0);
        assert_eq!(a.flush(), 0);
        rig.plan.short_write.store(short, Ordering::Relaxed);
        rig.plan.fail_write_at.store(1, Ordering::Relaxed);
        assert_eq!(a.write(64 << 10, &dense(2, 64 << 10)), EIO, "short={short}");
        assert_eq!(rig.plan.failures.load(Ordering::Relaxed), 1);
        // The disk works again, but the store does not guess: writes and flushes are refused
        // on every connection until it is reopened.
        rig.plan.heal();
        assert_eq!(a.write(128 << 10, &dense(3, 4096)), EIO);
        assert_eq!(a.flush(), EIO);
        let mut b = rig.client("b");
        assert_eq!(b.write(0, &dense(4, 4096)), EIO);
        assert!(rig.store.is_poisoned());
        // Reads carry on.
        assert_eq!(a.read(0, flushed.len()).unwrap(), flushed);
        assert_eq!(b.read(0, 4096).unwrap(), vec![0u8; 4096]);
        drop((a, b));

        let rig = rig.reopen();
        let mut a = rig.client("a");
        assert_eq!(
            a.read(0, flushed.len()).unwrap(),
            flushed,
            "flushed data survives"
        );
        let lost = a.read(64 << 10, 128 << 10).unwrap();
        assert!(
            lost.iter().all(|&x| x == 0),
            "failed writes left nothing behind"
        );
        assert_eq!(
            a.write(64 << 10, &dense(5, 8192)),
            0,
            "writable after reopening"
        );
        assert_eq!(a.flush(), 0);
        drop(a);
        rig.assert_clean();
    }
}

#[test]
fn failed_fsync_fails_the_flush_and_the_store_refuses_writes_until_reopened() {
    // A flush syncs once (the intent log covers its data and its log blocks together); a
    // failure of the sync after it must not be hidden either. (Checkpoints' syncs fail at
    // random points in `random_faults_never_lose_flushed_data`.)
    for sync in [1u64, 2] {
        let rig = Rig::create(32 << 20, &[("a", 8 << 20)]);
        let mut a = rig.client("a");
        let flushed = dense(10, 32 << 10);
        assert_eq!(a.write(0, &flushed), 0);
        assert_eq!(a.flush(), 0);
        let pending = dense(11, 32 << 10);
        assert_eq!(a.write(32 << 10, &pending), 0);
        rig.plan.fail_sync_at.store(sync, Ordering::Relaxed);
        if sync == 2 {
            assert_eq!(a.flush(), 0, "the flush before the failing sync");
            assert_eq!(a.write(32 << 10, &pending), 0);
        }
        assert_eq!(a.flush(), EIO, "sync {sync}");
        rig.plan.heal();
        assert_eq!(a.write(64 << 10, &dense(12, 4096)), EIO);
        assert_eq!(
            a.flush(),
            EIO,
            "a flush cannot promise anything after a failed fsync"
        );
        assert_eq!(a.read(0, flushed.len()).unwrap(), flushed);
        drop(a);

        let rig = rig.reopen();
        let mut a = rig.client("a");
        assert_eq!(a.read(0, flushed.len()).unwrap(), flushed);
        // The unflushed write is either wholly there or wholly not (never mixed up).
        let got = a.read(32 << 10, pending.len()).unwrap();
        assert!(
            got == pending || got.iter().all(|&x| x == 0),
            "sync {sync}: unflushed data is the write or the old contents"
        );
        assert_eq!(a.read(64 << 10, 4096).unwrap(), vec![0u8; 4096]);
        assert_eq!(a.write(64 << 10, &dense(13, 4096)), 0);
        assert_eq!(a.flush(), 0);
    }
}

#[test]
fn failed_read_is_eio_and_nothing_else_changes() {
    let rig = Rig::create(32 << 20, &[("a", 8 << 20)]);
    let mut a = rig.client("a");
    let data = dense(20, 16 << 10);
    assert_eq!(a.write(0, &data), 0);
    assert_eq!(a.flush(), 0);
    rig.plan.fail_read_at.store(1, Ordering::Relaxed);
    assert_eq!(a.read(0, data.len()), Err(EIO));
    assert_eq!(a.read(0, data.len()).unwrap(), data, "the next read works");
    // A failed read changed nothing on disk: writes and flushes go on.
    assert!(!rig.store.is_poisoned());
    assert_eq!(a.write(16 << 10, &dense(21, 4096)), 0);
    assert_eq!(a.flush(), 0);
    drop(a);
    let rig = rig.reopen();
    assert_eq!(rig.client("a").read(0, data.len()).unwrap(), data);
}

#[test]
fn enospc_from_the_device_reaches_the_client() {
    let rig = Rig::create(32 << 20, &[("a", 8 << 20)]);
    let mut a = rig.client("a");
    let data = dense(30, 16 << 10);
    assert_eq!(a.write(0, &data), 0);
    assert_eq!(a.flush(), 0);
    // The file system under the store is full (a sparse store file).
    rig.plan.write_errno.store(ENOSPC as i32, Ordering::Relaxed);
    rig.plan.fail_write_at.store(1, Ordering::Relaxed);
    rig.plan.sticky.store(true, Ordering::Relaxed);
    assert_eq!(a.write(16 << 10, &dense(31, 4096)), ENOSPC);
    assert_ne!(a.flush(), 0);
    // Space is freed on the host; the store still refuses until reopened, then works.
    rig.plan.heal();
    assert_ne!(a.write(16 << 10, &dense(32, 4096)), 0);
    drop(a);
    let rig = rig.reopen();
    let mut a = rig.client("a");
    assert_eq!(a.read(0, data.len()).unwrap(), data);
    assert_eq!(a.write(16 << 10, &dense(33, 4096)), 0);
    assert_eq!(a.flush(), 0);
}

#[test]
fn a_full_store_answers_enospc_and_writes_work_again_once_space_is_freed() {
    // The smallest store: about 12 MiB of data blocks, less the commit reserve.
    let rig = Rig::create(16 << 20, &[("keep", 1 << 20), ("fill", 64 << 20)]);
    let mut keep = rig.client("keep");
    let kept = dense(40, 256 << 10);
    assert_eq!(keep.write(0, &kept), 0);
    assert_eq!(keep.flush(), 0);

    let mut fill = rig.client("fill");
    let chunk = 256 << 10;
    let mut written = 0u64;
    let err = loop {
        let e = fill.write(written, &dense(41 + written, chunk));
        if e != 0 {
            break e;
        }
        written += chunk as u64;
        assert!(written < 64 << 20, "a 16 MiB store took 64 MiB");
    };
    assert_eq!(err, ENOSPC, "a full store is ENOSPC, not an I/O error");
    assert!(written >= 8 << 20, "only {written} bytes fit");
    // Fill the last blocks one at a time.
    while fill.write(written, &dense(41 + written, BLOCK)) == 0 {
        written += BLOCK as u64;
    }
    // A full store is not a broken one: flushes work, reads work, nothing is poisoned.
    assert!(!rig.store.is_poisoned());
    assert_eq!(fill.flush(), 0);
    assert_eq!(keep.read(0, kept.len()).unwrap(), kept);
    assert_eq!(keep.write(512 << 10, &dense(42, BLOCK)), ENOSPC);
    // A real client sees it too.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x33 32M 1M", &rig.uri("fill")])
        .output()
        .expect("run qemu-io");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("No space left on device"),
        "qemu-io said: {text}"
    );

    // Trimming returns space (after the commit that frees it).
    assert_eq!(fill.trim(0, (written / 2) as u32), 0);
    assert_eq!(fill.flush(), 0);
    assert_eq!(keep.write(512 << 10, &dense(43, 64 << 10)), 0);
    assert_eq!(keep.flush(), 0);
    // So does deleting a VDI.
    drop(fill);
    loop {
        match rig.store.delete("fill", false) {
            Ok(_) => break,
            // The server drops the connection's handle just after the socket closes.
            Err(e) if e.kind() == "busy" => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("delete: {e}"),
        }
    }
    rig.store.gc(&mut |_| {}).expect("gc");
    rig.store.flush().expect("commit the delete");
    assert_eq!(keep.write(0, &dense(44, 1 << 20)), 0, "space is back");
    assert_eq!(keep.flush(), 0);
    let now = keep.read(0, 1 << 20).unwrap();
    drop(keep);
    let rig = rig.reopen();
    assert_eq!(rig.client("keep").read(0, 1 << 20).unwrap(), now);
    assert_eq!(rig.store.list().unwrap().len(), 1);
}

/// Per 4 KiB block of a VDI: what a read may return after the store is reopened.
#[derive(Clone)]
struct BlockModel {
    /// The contents as of the last successful flush.
    flushed: Vec<u8>,
    /// Every version written (or attempted) since; any one of them may have been committed.
    since: Vec<Vec<u8>>,
}

/// Random I/O over two VDIs with a random fault at a random point, then a reopen: every
/// request is answered, after a write or sync fault no write or flush succeeds, and on reopen
/// `check` is clean and every block holds its flushed contents or something written since.
#[test]
fn random_faults_never_lose_flushed_data() {
    const VDI_BLOCKS: usize = 64;
    let (mut rounds, mut faulted) = (0, 0);
    for seed in 0..8u64 {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut rig = Rig::create(
            32 << 20,
            &[
                ("v0", (VDI_BLOCKS * BLOCK) as u64),
                ("v1", (VDI_BLOCKS * BLOCK) as u64),
            ],
        );
        let mut model: Vec<Vec<BlockModel>> = vec![
            vec![
                BlockModel {
                    flushed: vec![0; BLOCK],
                    since: Vec::new()
                };
                VDI_BLOCKS
            ];
            2
        ];
        let mut tag = seed << 32;
        for round in 0..3 {
            let ctx = format!("seed {seed} round {round}");
            let mut clients = [rig.client("v0"), rig.client("v1")];
            rounds += 1;
            let arm_at = rng.random_range(0..40);
            let kind = rng.random_range(0..5);
            let mut armed = false;
            for step in 0..80 {
                if step == arm_at {
                    let n = rng.random_range(1..4);
                    let p = &rig.plan;
                    match kind {
                        0 => p.fail_write_at.store(n, Ordering::Relaxed),
                        1 => {
                            p.write_errno.store(ENOSPC as i32, Ordering::Relaxed);
                            p.fail_write_at.store(n, Ordering::Relaxed);
                        }
                        2 => {
                            p.short_write.store(true, Ordering::Relaxed);
                            p.fail_write_at.store(n, Ordering::Relaxed);
                        }
                        3 => p.fail_sync_at.store(n, Ordering::Relaxed),
                        _ => p.fail_read_at.store(n, Ordering::Relaxed),
                    }
                    armed = true;
                }
                let write_fault =
                    armed && kind < 4 && rig.plan.failures.load(Ordering::Relaxed) > 0;
                let v = rng.random_range(0..2);
                let c = &mut clients[v];
                let first = rng.random_range(0..VDI_BLOCKS);
                let n = rng.random_range(1..=4).min(VDI_BLOCKS - first);
                match rng.random_range(0..10) {
                    0..=4 => {
                        tag += 1;
                        let data = dense(tag, n * BLOCK);
                        for (i, b) in data.chunks(BLOCK).enumerate() {
                            model[v][first + i].since.push(b.to_vec());
                        }
                        let e = c.write((first * BLOCK) as u64, &data);
                        if write_fault {
                            assert_ne!(
                                e, 0,
                                "{ctx}: a write succeeded after a failed write or sync"
                            );
                        } else if !armed {
                            assert_eq!(e, 0, "{ctx}: write");
                        }
                        assert!([0, EIO, ENOSPC].contains(&e), "{ctx}: write errno {e}");
                    }
                    5 => {
                        let e = c.trim((first * BLOCK) as u64, (n * BLOCK) as u32);
                        for i in 0..n {
                            model[v][first + i].since.push(vec![0; BLOCK]);
                        }
                        assert!(e == 0 || armed, "{ctx}: trim errno {e}");
                    }
                    6 | 7 => {
                        let e = c.flush();
                        let failed_before = rig.plan.failures.load(Ordering::Relaxed) > 0;
                        if e == 0 {
                            assert!(
                                !(failed_before && kind < 4),
                                "{ctx}: a flush succeeded after a failed write or sync"
                            );
                            // Everything acknowledged so far is durable: the latest version of
                            // each block is now its flushed contents.
                            for bm in model.iter_mut().flatten() {
                                if let Some(last) = bm.since.pop() {
                                    bm.flushed = last;
                                    bm.since.clear();
                                }
                            }
                        } else {
                            assert!(armed, "{ctx}: flush errno {e} with no fault armed");
                        }
                    }
                    _ => match c.read((first * BLOCK) as u64, n * BLOCK) {
                        Ok(data) => {
                            for (i, b) in data.chunks(BLOCK).enumerate() {
                                let bm = &model[v][first + i];
                                let latest = bm.since.last().unwrap_or(&bm.flushed);
                                if !armed {
                                    assert!(b == &latest[..], "{ctx}: read of block {}", first + i);
                                } else {
                                    assert!(
                                        b == &bm.flushed[..] || bm.since.iter().any(|s| s == b),
                                        "{ctx}: block {} holds data nobody wrote there",
                                        first + i
                                    );
                                }
                            }
                        }
                        Err(e) => assert!(armed && e == EIO, "{ctx}: read errno {e}"),
                    },
                }
            }
            drop(clients);
            if rig.plan.failures.load(Ordering::Relaxed) > 0 {
                faulted += 1;
            }
            rig = rig.reopen();
            // After the reopen: each block holds its flushed version or one written since.
            let mut clients = [rig.client("v0"), rig.client("v1")];
            for (v, c) in clients.iter_mut().enumerate() {
                let all = c.read(0, VDI_BLOCKS * BLOCK).expect("read after reopen");
                for (i, b) in all.chunks(BLOCK).enumerate() {
                    let bm = &mut model[v][i];
                    assert!(
                        b == &bm.flushed[..] || bm.since.iter().any(|s| s == b),
                        "{ctx}: after reopen, v{v} block {i} is neither its flushed contents nor a later write"
                    );
                    bm.flushed = b.to_vec();
                    bm.since.clear();
                }
            }
        }
    }
    assert!(
        faulted * 3 >= rounds * 2,
        "only {faulted} of {rounds} rounds hit their fault"
    );
}

#[test]
fn ring_clients_get_blkif_errors_and_the_store_recovers() {
    let mem = Arc::new(MemDevice::new(32 << 20));
    Store::format(&*mem, 32 << 20).unwrap();
    let data = dense(50, 32 << 10);
    for fault in ["write", "sync"] {
        let fdev = FaultDevice::new(mem.clone());
        let plan = fdev.plan.clone();
        let store = Store::open_device(Arc::new(fdev), options()).unwrap();
        if store.list().unwrap().is_empty() {
            store.create_vdi("g", 4 << 20).unwrap();
        }
        let disk: Arc<dyn Disk> = Arc::new(store.open_vdi("g", true).unwrap());
        let mut front =
            Frontend::in_process(disk, Features::default(), &FrontendConfig::default()).unwrap();
        let q = front.queue(0);
        assert_eq!(
            q.run(&IoRequest::write(0, &data)).unwrap().status,
            BLKIF_RSP_OKAY
        );
        assert_eq!(q.run(&IoRequest::flush()).unwrap().status, BLKIF_RSP_OKAY);
        match fault {
            "write" => {
                plan.fail_write_at.store(1, Ordering::Relaxed);
                let c = q.run(&IoRequest::write(256, &dense(51, 8192))).unwrap();
                assert_eq!(c.status, BLKIF_RSP_ERROR);
            }
            _ => {
                assert_eq!(
                    q.run(&IoRequest::write(256, &dense(52, 8192)))
                        .unwrap()
                        .status,
                    BLKIF_RSP_OKAY
                );
                plan.fail_sync_at.store(1, Ordering::Relaxed);
                assert_eq!(q.run(&IoRequest::flush()).unwrap().status, BLKIF_RSP_ERROR);
            }
        }
        plan.heal();
        let c = q.run(&IoRequest::write(512, &dense(53, 4096))).unwrap();
        assert_eq!(
            c.status, BLKIF_RSP_ERROR,
            "{fault}: writes refused until reopened"
        );
        assert_eq!(q.run(&IoRequest::flush()).unwrap().status, BLKIF_RSP_ERROR);
        let r = q.run(&IoRequest::read(0, data.len() as u64)).unwrap();
        assert_eq!(r.status, BLKIF_RSP_OKAY);
        assert_eq!(
            r.data.as_deref(),
            Some(&data[..]),
            "{fault}: reads carry on"
        );
        front.detach().unwrap();
        drop(store);

        let store = Store::open_device(mem.clone(), options()).unwrap();
        let r = store.check(true, &mut |_| {}).unwrap();
        assert!(r.ok, "{fault}: {r:#?}");
        let d = store.open_vdi("g", false).unwrap();
        let mut back = vec![0u8; data.len()];
        d.read(&mut back, 0).unwrap();
        assert_eq!(back, data, "{fault}: flushed data survives");
    }
}
