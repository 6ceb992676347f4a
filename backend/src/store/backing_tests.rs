//! Remote-backed VDIs against a model: reads through, the cache, copy-on-write over the
//! remote, hydrate, and power cuts while all of that writes. The remote here is an image in
//! memory; the real NBD path is tested end to end in `tests/nbd_backing.rs`.

use std::sync::{
    atomic::{AtomicBool, AtomicU64, Ordering},
    Arc,
};

use rand::{rngs::SmallRng, Rng, SeedableRng};

use super::{
    backing::cache_name,
    device::{CrashDevice, Device, MemDevice},
    format::hash24,
    tests::small_opts,
    Remote, RemoteBlock, Store, StoreError, StoreResult,
};

const URI: &str = "nbd://gold.example/tpl@v1";

/// An export in memory that counts what it serves and can go away.
struct MemRemote {
    image: Vec<u8>,
    fetched: AtomicU64,
    down: AtomicBool,
}

impl MemRemote {
    fn new(size: usize, seed: u64) -> Arc<MemRemote> {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut image = vec![0u8; size];
        for (i, b) in image.chunks_mut(4096).enumerate() {
            // Every fifth block zero, the rest distinct.
            if i % 5 != 0 {
                rng.fill(b);
            }
        }
        Arc::new(MemRemote {
            image,
            fetched: AtomicU64::new(0),
            down: AtomicBool::new(false),
        })
    }
}

impl Remote for MemRemote {
    fn size(&self, _: &str) -> StoreResult<u64> {
        Ok(self.image.len() as u64)
    }

    fn read(&self, uri: &str, buf: &mut [u8], offset: u64) -> StoreResult<()> {
        if self.down.load(Ordering::Acquire) {
            return Err(StoreError::Remote(format!("{uri}: down")));
        }
        let at = offset as usize;
        buf.copy_from_slice(&self.image[at..at + buf.len()]);
        self.fetched.fetch_add(buf.len() as u64, Ordering::AcqRel);
        Ok(())
    }

    fn state(&self, _: &str) -> String {
        "in memory".into()
    }
}

fn store_on(dev: Arc<dyn Device>, remote: &Arc<MemRemote>) -> Arc<Store> {
    let len = dev.len();
    Store::format(&*dev, len).unwrap();
    let s = Store::open_device(dev, small_opts()).unwrap();
    s.set_remote(remote.clone());
    s
}

fn read_all(s: &Arc<Store>, name: &str) -> StoreResult<Vec<u8>> {
    let d = s.open_vdi(name, false)?;
    let mut buf = vec![0u8; d.size() as usize];
    d.read(&mut buf, 0)?;
    Ok(buf)
}

fn assert_clean(s: &Store) {
    let r = s.check(true, &mut |_| {}).unwrap();
    assert!(r.ok, "check found damage: {r:#?}");
}

#[test]
fn reads_through_caches_once_and_writes_stay_local() {
    let remote = MemRemote::new(2 << 20, 1);
    let s = store_on(Arc::new(MemDevice::new(64 << 20)), &remote);
    assert_eq!(s.create_backed("vm", None, URI).unwrap(), 2 << 20);
    assert_eq!(s.stat("vm").unwrap().backing.as_deref(), Some(URI));
    let names: Vec<String> = s.list().unwrap().into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["vm"], "the cache is not listed");

    // Every byte as the remote has it; each fetched once.
    let mut model = remote.image.clone();
    assert_eq!(read_all(&s, "vm").unwrap(), model);
    let fetched = remote.fetched.load(Ordering::Acquire);
    assert_eq!(fetched, 2 << 20);
    assert_eq!(read_all(&s, "vm").unwrap(), model);
    assert_eq!(remote.fetched.load(Ordering::Acquire), fetched);

    // Writes stay local, whole blocks, partial blocks, zeros and trims alike: zeros over
    // the remote's data read as zeros (recorded as zeros, not as holes that read through).
    let d = s.open_vdi("vm", true).unwrap();
    d.write(&[0xaa; 8192], 4096, false).unwrap();
    model[4096..12288].fill(0xaa);
    d.write(&[0xbb; 100], 70_000, false).unwrap();
    model[70_000..70_100].fill(0xbb);
    d.write(&vec![0u8; 8192], 16384, false).unwrap();
    model[16384..24576].fill(0);
    d.write_zeroes(40960, 8192, false, false).unwrap();
    model[40960..49152].fill(0);
    d.discard(81920, 8192).unwrap();
    model[81920..90112].fill(0);
    drop(d);
    assert_eq!(read_all(&s, "vm").unwrap(), model);
    let info = s.backing_info("vm").unwrap().unwrap();
    assert_eq!(info.remote_bytes, 0);
    assert_eq!(info.local_bytes, 9 * 4096);

    // A snapshot and a fork read through the same cache: nothing more is fetched.
    s.snapshot("vm", "s1").unwrap();
    s.fork("vm@s1", "vm2").unwrap();
    assert_eq!(s.stat("vm2").unwrap().backing.as_deref(), Some(URI));
    assert_eq!(read_all(&s, "vm2").unwrap(), model);
    assert_eq!(remote.fetched.load(Ordering::Acquire), fetched);

    // Hydrate copies the rest in; then the remote is not needed, and still-backed VDIs keep
    // the cache.
    let mut calls = 0;
    let r = s
        .hydrate("vm2", &mut |_, _| {
            calls += 1;
            Ok(())
        })
        .unwrap();
    assert!(calls > 1);
    assert!(!r.cache_deleted, "vm and vm@s1 still read through it");
    assert_eq!(s.stat("vm2").unwrap().backing, None);
    remote.down.store(true, Ordering::Release);
    assert_eq!(read_all(&s, "vm2").unwrap(), model);
    assert_eq!(read_all(&s, "vm").unwrap(), model, "from the cache");
    assert!(s.hydrate("vm@s1", &mut |_, _| Ok(())).is_err());
    assert!(s.hydrate("vm2", &mut |_, _| Ok(())).is_err(), "not backed");
    assert_clean(&s);

    // A new backed VDI over another export cannot read what was never fetched while that
    // remote is down, and says so; a fetched block is not lost to the failure.
    s.delete("vm", true).unwrap();
    assert!(
        s.stat(&cache_name(URI)).is_err(),
        "the last user took the cache with it"
    );
    assert_eq!(read_all(&s, "vm2").unwrap(), model);
    remote.down.store(false, Ordering::Release);
    s.create_backed("vm3", Some(4 << 20), URI).unwrap();
    let d = s.open_vdi("vm3", true).unwrap();
    let mut b = vec![0u8; 4096];
    d.read(&mut b, 0).unwrap();
    remote.down.store(true, Ordering::Release);
    assert!(matches!(
        d.read(&mut b, 1 << 20),
        Err(StoreError::Remote(_))
    ));
    d.read(&mut b, 0).unwrap();
    assert_eq!(b, remote.image[..4096]);
    // Past the export's end (the VDI is larger): zeros, without the remote.
    d.read(&mut b, 3 << 20).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    // Whole-block writes go on while it is down.
    d.write(&[9u8; 4096], 1 << 20, true).unwrap();
    drop(d);
    assert_clean(&s);

    // Deleting everything returns every block.
    s.delete("vm2", true).unwrap();
    s.delete("vm3", true).unwrap();
    assert!(s.stat(&cache_name(URI)).is_err());
    s.gc(&mut |_| {}).unwrap();
    s.gc(&mut |_| {}).unwrap();
    let df = s.df().unwrap();
    assert_eq!(df.stored_bytes, 0, "{df:#?}");
    assert_eq!(df.remote_caches, 0);
    assert_clean(&s);
}

#[test]
fn hydrate_never_overwrites_what_a_client_writes_meanwhile() {
    let remote = MemRemote::new(4 << 20, 2);
    let s = store_on(Arc::new(MemDevice::new(64 << 20)), &remote);
    s.create_backed("vm", None, URI).unwrap();
    let d = s.open_vdi("vm", true).unwrap();
    let writes = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut rng = SmallRng::seed_from_u64(9);
            for i in 0..300u32 {
                let block = rng.random_range(0..1024u64);
                let data = vec![(i % 250) as u8 + 1; 4096];
                d.write(&data, block * 4096, false).unwrap();
                writes.lock().unwrap().push((block, data));
            }
        });
        s.hydrate("vm", &mut |_, _| Ok(())).unwrap();
    });
    let mut model = remote.image.clone();
    for (block, data) in writes.into_inner().unwrap() {
        let at = block as usize * 4096;
        model[at..at + 4096].copy_from_slice(&data);
    }
    drop(d);
    remote.down.store(true, Ordering::Release);
    assert_eq!(s.stat("vm").unwrap().backing, None);
    assert_eq!(read_all(&s, "vm").unwrap(), model);
    assert_clean(&s);
}

/// After a flush, each block may only hold its last content.
fn settle(allowed: &mut [Vec<Vec<u8>>]) {
    for a in allowed.iter_mut() {
        let last = a.pop().expect("at least one");
        *a = vec![last];
    }
}

/// One run of the backed workload on a crash device; returns its device operations.
fn crash_case(seed: u64, cut: Option<u64>, image_seed: u64) -> u64 {
    let remote = MemRemote::new(1 << 20, seed);
    let dev = Arc::new(CrashDevice::new(16 << 20));
    let s = store_on(dev.clone(), &remote);
    dev.sync().unwrap();
    if let Some(c) = cut {
        dev.cut_after(c);
    }
    let mut rng = SmallRng::seed_from_u64(seed);
    // Per block: contents it may hold after a crash (the durable one first).
    let blocks = remote.image.len() / 4096;
    let mut allowed: Vec<Vec<Vec<u8>>> = remote
        .image
        .chunks(4096)
        .map(|b| vec![b.to_vec()])
        .collect();
    let mut created = false;
    let mut hydrated = false;
    let ctx = format!("seed {seed} cut {cut:?} image {image_seed}");
    let mut run = || -> StoreResult<()> {
        s.create_backed("vm", None, URI)?;
        created = true;
        let d = s.open_vdi("vm", true)?;
        for step in 0..60 {
            let block = rng.random_range(0..blocks);
            match rng.random_range(0..4) {
                0 | 1 => {
                    let mut buf = vec![0u8; 8192.min((blocks - block) * 4096)];
                    d.read(&mut buf, block as u64 * 4096)?;
                }
                2 => {
                    let data = if rng.random_bool(0.3) {
                        vec![0u8; 4096]
                    } else {
                        vec![(step + 1) as u8; 4096]
                    };
                    let fua = rng.random_bool(0.3);
                    allowed[block].push(data.clone());
                    d.write(&data, block as u64 * 4096, fua)?;
                    if fua {
                        // FUA flushes the whole store.
                        settle(&mut allowed);
                    }
                }
                _ => {
                    s.flush()?;
                    settle(&mut allowed);
                }
            }
        }
        drop(d);
        s.hydrate("vm", &mut |_, _| Ok(()))?;
        hydrated = true;
        Ok(())
    };
    let result = run();
    if cut.is_none() {
        result.unwrap_or_else(|e| panic!("{ctx}: {e}"));
    }
    let ops = dev.ops();
    drop(s);
    let after: Arc<dyn Device> = Arc::new(dev.after_crash(image_seed));
    let s =
        Store::open_device(after, small_opts()).unwrap_or_else(|e| panic!("{ctx}: reopen: {e}"));
    s.set_remote(remote.clone());
    assert_clean(&s);
    match s.stat("vm") {
        Ok(v) => {
            if hydrated {
                assert_eq!(v.backing, None, "{ctx}: hydrate returned, so it is durable");
            }
            let got = read_all(&s, "vm").unwrap_or_else(|e| panic!("{ctx}: read: {e}"));
            for (b, ok) in allowed.iter().enumerate() {
                let g = &got[b * 4096..(b + 1) * 4096];
                assert!(
                    ok.iter().any(|a| a == g),
                    "{ctx}: block {b} holds neither its flushed content nor a later write"
                );
            }
            // Whatever the crash left, a hydrate finishes the job.
            if v.backing.is_some() {
                s.hydrate("vm", &mut |_, _| Ok(())).unwrap();
                remote.down.store(true, Ordering::Release);
                assert_eq!(
                    read_all(&s, "vm").unwrap(),
                    got,
                    "{ctx}: hydrate changed data"
                );
            }
        }
        Err(StoreError::NotFound(_)) => assert!(!created, "{ctx}: vm is gone after the crash"),
        Err(e) => panic!("{ctx}: {e}"),
    }
    assert_clean(&s);
    ops
}

#[test]
fn power_cuts_while_reading_through_writing_and_hydrating() {
    for seed in [21u64, 22] {
        let total = crash_case(seed, None, 0);
        assert!(total > 50, "workload too small ({total} ops)");
        let mut rng = SmallRng::seed_from_u64(seed * 1000);
        for i in 0..60 {
            let cut = rng.random_range(0..total);
            crash_case(seed, Some(cut), seed * 7919 + i);
        }
    }
}

#[test]
fn a_cache_deleted_by_hand_is_fetched_again() {
    let remote = MemRemote::new(1 << 20, 3);
    let s = store_on(Arc::new(MemDevice::new(64 << 20)), &remote);
    s.create_backed("vm", None, URI).unwrap();
    assert_eq!(read_all(&s, "vm").unwrap(), remote.image);
    s.delete(&cache_name(URI), true).unwrap();
    assert_eq!(read_all(&s, "vm").unwrap(), remote.image);
    assert_eq!(remote.fetched.load(Ordering::Acquire), 2 << 20);
    // A create that fails leaves no cache behind.
    let other = "nbd://gold.example/other";
    assert!(matches!(
        s.create_backed("vm", None, other),
        Err(StoreError::Exists(_))
    ));
    assert!(s.stat(&cache_name(other)).is_err());
    assert_clean(&s);
}

/// A remote that gives block hashes (as a Parallax server does) and can lie about its data.
struct HashingRemote {
    inner: Arc<MemRemote>,
    flip: AtomicBool,
}

impl Remote for HashingRemote {
    fn size(&self, uri: &str) -> StoreResult<u64> {
        self.inner.size(uri)
    }

    fn blocks(&self, _: &str, offset: u64, len: u64) -> StoreResult<Option<Vec<RemoteBlock>>> {
        let img = &self.inner.image[offset as usize..(offset + len) as usize];
        Ok(Some(
            img.chunks(4096)
                .map(|b| {
                    if b.iter().all(|&x| x == 0) {
                        RemoteBlock::Zero
                    } else {
                        RemoteBlock::Hash(hash24(b))
                    }
                })
                .collect(),
        ))
    }

    fn read(&self, uri: &str, buf: &mut [u8], offset: u64) -> StoreResult<()> {
        self.inner.read(uri, buf, offset)?;
        if self.flip.load(Ordering::Acquire) {
            buf[0] ^= 1;
        }
        Ok(())
    }

    fn state(&self, _: &str) -> String {
        "hashing".into()
    }
}

#[test]
fn hashes_skip_zeros_reuse_other_caches_and_catch_bad_data() {
    let base = MemRemote::new(1 << 20, 4);
    let remote = Arc::new(HashingRemote {
        inner: base.clone(),
        flip: AtomicBool::new(false),
    });
    let s = store_on(Arc::new(MemDevice::new(64 << 20)), &base);
    s.set_remote(remote.clone());
    // Zeros are not fetched: every fifth block of the image.
    s.create_backed("a", None, URI).unwrap();
    assert_eq!(read_all(&s, "a").unwrap(), base.image);
    let data = base
        .image
        .chunks(4096)
        .filter(|b| b.iter().any(|&x| x != 0))
        .count();
    assert_eq!(base.fetched.load(Ordering::Acquire), data as u64 * 4096);
    // The same blocks behind another URI come from the first cache, not the network.
    let other = "nbd://gold.example/tpl2@v1";
    s.create_backed("b", None, other).unwrap();
    assert_eq!(read_all(&s, "b").unwrap(), base.image);
    assert_eq!(base.fetched.load(Ordering::Acquire), data as u64 * 4096);
    // Data that does not match its hash is refused, and not kept.
    remote.flip.store(true, Ordering::Release);
    let third = "nbd://gold.example/tpl3@v1";
    s.delete("a", false).unwrap();
    s.delete("b", false).unwrap();
    s.create_backed("c", None, third).unwrap();
    let err = read_all(&s, "c").unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
    let info = s.backing_info("c").unwrap().unwrap();
    assert_eq!(info.cached_bytes, 0);
    remote.flip.store(false, Ordering::Release);
    assert_eq!(read_all(&s, "c").unwrap(), base.image);
    assert_clean(&s);
}
