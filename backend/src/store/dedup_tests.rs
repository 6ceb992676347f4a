//! Dedup tests: a model over a small pool of block contents, a forced hash collision, the
//! dedup pass, and power cuts during inline dedup, the pass and gc.

use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
};

use rand::{rngs::SmallRng, Rng, SeedableRng};

use super::{
    device::{CrashDevice, Device, MemDevice},
    format::{hash24, BLOCK_SIZE_U64},
    tests::small_opts,
    Store,
};

const POOL: usize = 6;

/// Block content `i` of the pool (never all zeros).
fn content(i: usize) -> Vec<u8> {
    let mut b = vec![0x5au8; 4096];
    b[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    b
}

fn new_store(dev: Arc<dyn Device>) -> Arc<Store> {
    Store::format(&*dev, dev.len()).unwrap();
    Store::open_device(dev, small_opts()).unwrap()
}

fn assert_clean(s: &Store, ctx: &str) {
    let r = s.check(true, &mut |_| {}).unwrap();
    assert!(r.ok, "{ctx}: check found damage: {r:#?}");
}

/// Data blocks the store holds for VDIs and snapshots.
fn stored_blocks(s: &Arc<Store>) -> u64 {
    s.df().unwrap().stored_bytes / BLOCK_SIZE_U64
}

/// Per VDI or snapshot, the pool content of each block (`None`: zeros).
type Images = BTreeMap<String, Vec<Option<usize>>>;

fn read_all(s: &Arc<Store>, images: &Images, ctx: &str) {
    for (name, blocks) in images {
        let d = s.open_vdi(name, false).unwrap();
        let mut buf = vec![0u8; blocks.len() * 4096];
        d.read(&mut buf, 0).unwrap();
        for (b, want) in blocks.iter().enumerate() {
            let got = &buf[b * 4096..(b + 1) * 4096];
            let ok = match want {
                None => got.iter().all(|&x| x == 0),
                Some(i) => got == content(*i),
            };
            assert!(ok, "{ctx}: {name} block {b} is not content {want:?}");
        }
    }
}

fn distinct(images: &Images) -> u64 {
    let set: HashSet<usize> = images.values().flatten().flatten().copied().collect();
    set.len() as u64
}

#[test]
fn model_over_a_small_pool_of_contents() {
    for seed in 0..6u64 {
        let mut rng = SmallRng::seed_from_u64(seed);
        let dev: Arc<dyn Device> = Arc::new(MemDevice::new(64 << 20));
        let mut s = new_store(dev.clone());
        let mut images: Images = BTreeMap::new();
        let mut n = 0;
        for step in 0..400 {
            let ctx = format!("seed {seed} step {step}");
            let vdis: Vec<String> = images
                .keys()
                .filter(|k| !k.contains('@'))
                .cloned()
                .collect();
            let snaps: Vec<String> = images.keys().filter(|k| k.contains('@')).cloned().collect();
            match rng.random_range(0..100) {
                0..=5 if vdis.len() < 5 => {
                    n += 1;
                    let name = format!("v{n}");
                    let blocks = rng.random_range(1..600);
                    s.create_vdi(&name, blocks * 4096).unwrap();
                    images.insert(name, vec![None; blocks as usize]);
                }
                6..=69 if !vdis.is_empty() => {
                    let name = &vdis[rng.random_range(0..vdis.len())];
                    let img = images.get_mut(name).unwrap();
                    let b = rng.random_range(0..img.len());
                    let c = (!rng.random_bool(0.1)).then(|| rng.random_range(0..POOL));
                    let data = c.map_or_else(|| vec![0u8; 4096], content);
                    let d = s.open_vdi(name, true).unwrap();
                    d.write(&data, b as u64 * 4096, rng.random_bool(0.05))
                        .expect(&ctx);
                    img[b] = c;
                }
                70..=77 if !vdis.is_empty() => {
                    let name = vdis[rng.random_range(0..vdis.len())].clone();
                    n += 1;
                    let snap = format!("s{n}");
                    s.snapshot(&name, &snap).unwrap();
                    let img = images[&name].clone();
                    images.insert(format!("{name}@{snap}"), img);
                }
                78..=83 if !snaps.is_empty() && vdis.len() < 6 => {
                    let snap = snaps[rng.random_range(0..snaps.len())].clone();
                    n += 1;
                    let name = format!("f{n}");
                    s.fork(&snap, &name).unwrap();
                    let img = images[&snap].clone();
                    images.insert(name, img);
                }
                84..=88 => {
                    let all: Vec<String> = images.keys().cloned().collect();
                    if all.is_empty() {
                        continue;
                    }
                    let name = &all[rng.random_range(0..all.len())];
                    s.delete(name, true).unwrap();
                    let prefix = format!("{name}@");
                    images.retain(|k, _| k != name && !k.starts_with(&prefix));
                }
                89..=92 => {
                    s.dedup_pass(&mut |_| {}).expect(&ctx);
                }
                93..=95 => {
                    s.close().unwrap();
                    drop(s);
                    s = Store::open_device(dev.clone(), small_opts()).unwrap();
                }
                _ => {
                    s.gc(&mut |_| {}).unwrap();
                    // With writes of one block at a time, inline dedup keeps exactly one
                    // copy of each content in use.
                    assert_eq!(stored_blocks(&s), distinct(&images), "{ctx}: stored blocks");
                }
            }
        }
        let ctx = format!("seed {seed} end");
        read_all(&s, &images, &ctx);
        assert_clean(&s, &ctx);
        s.gc(&mut |_| {}).unwrap();
        assert_eq!(stored_blocks(&s), distinct(&images), "{ctx}: stored blocks");
        let df = s.df().unwrap();
        let logical: u64 = images.values().flatten().flatten().count() as u64;
        assert_eq!(df.logical_bytes, logical * 4096, "{ctx}: logical bytes");
        // Everything back: every VDI deleted, gc, and nothing is allocated, the index empty.
        for name in images.keys().filter(|k| !k.contains('@')) {
            s.delete(name, true).unwrap();
        }
        s.gc(&mut |_| {}).unwrap();
        let df = s.df().unwrap();
        assert_eq!(df.used_bytes, 0, "{ctx}: {df:#?}");
        assert_eq!(df.dedup.status.index_entries, 0, "{ctx}: {df:#?}");
        assert_clean(&s, &ctx);
    }
}

/// Two different blocks whose index key is the same (forced: the index is told that block
/// A's address holds B's hash) must both keep their contents: the byte compare refuses.
#[test]
fn a_hash_collision_keeps_both_contents() {
    let dev: Arc<dyn Device> = Arc::new(MemDevice::new(32 << 20));
    let s = new_store(dev);
    s.create_vdi("v", 1 << 20).unwrap();
    let d = s.open_vdi("v", true).unwrap();
    let (a, b) = (content(1), content(2));
    d.write(&a, 0, false).unwrap();
    let mut ptrs = Vec::new();
    d.lookup(0, 1, &mut ptrs).unwrap();
    s.space.lock().dedup.claimed(hash24(&b), ptrs[0].addr());
    d.write(&b, 4096, false).unwrap();
    let mut back = vec![0u8; 8192];
    d.read(&mut back, 0).unwrap();
    assert_eq!(&back[..4096], &a[..]);
    assert_eq!(&back[4096..], &b[..]);
    d.lookup(1, 1, &mut ptrs).unwrap();
    assert_ne!(ptrs[1].addr(), ptrs[0].addr(), "B got a block of its own");
    drop(d);
    s.flush().unwrap();
    // B's own block replaced the false entry, so the index is true again.
    assert_clean(&s, "after the collision");
}

/// Four blocks of fork `f`'s own (each different).
fn own(f: u8) -> Vec<u8> {
    (0..4 * 4096u32)
        .map(|i| (i / 4096) as u8 + 10 * (f + 1))
        .collect()
}

/// Forks of a template that write the same data, stored once: inline, and by a pass over
/// data written with inline dedup off.
#[test]
fn forks_writing_the_same_data_store_it_once() {
    for inline in [true, false] {
        let dev: Arc<dyn Device> = Arc::new(MemDevice::new(64 << 20));
        let s = new_store(dev);
        s.set_dedup(Some(inline), None).unwrap();
        s.create_vdi("t", 4 << 20).unwrap();
        let t = s.open_vdi("t", true).unwrap();
        let template: Vec<u8> = (0..64 * 4096u32).map(|i| (i / 4096 + 100) as u8).collect();
        t.write(&template, 0, false).unwrap();
        drop(t);
        s.snapshot("t", "base").unwrap();
        let shared: Vec<u8> = (0..32 * 4096u32).map(|i| (i / 4096) as u8 ^ 0xc3).collect();
        for f in 0..5u8 {
            let name = format!("f{f}");
            s.fork("t@base", &name).unwrap();
            let d = s.open_vdi(&name, true).unwrap();
            // The same 32 blocks at the same place, and 4 blocks of its own.
            d.write(&shared, 128 * 4096, false).unwrap();
            d.write(&own(f), 256 * 4096, false).unwrap();
        }
        s.flush().unwrap();
        let before = stored_blocks(&s);
        if inline {
            assert_eq!(before, 64 + 32 + 5 * 4);
        } else {
            assert_eq!(before, 64 + 5 * 32 + 5 * 4);
            let r = s.dedup_pass(&mut |_| {}).unwrap();
            assert_eq!(r.blocks_shared, 4 * 32, "{r:#?}");
            // (and the log blocks its checkpoints gave back)
            assert!(r.freed_bytes >= 4 * 32 * 4096, "{r:#?}");
            assert_eq!(stored_blocks(&s), 64 + 32 + 5 * 4);
            // A second pass finds nothing more.
            assert_eq!(s.dedup_pass(&mut |_| {}).unwrap().blocks_shared, 0);
        }
        for f in 0..5u8 {
            let d = s.open_vdi(&format!("f{f}"), false).unwrap();
            let mut buf = vec![0u8; 260 * 4096];
            d.read(&mut buf, 0).unwrap();
            assert_eq!(&buf[..64 * 4096], &template[..]);
            assert_eq!(&buf[128 * 4096..160 * 4096], &shared[..]);
            assert_eq!(&buf[256 * 4096..], &own(f)[..]);
        }
        let df = s.df().unwrap();
        assert_eq!(df.dedup.shared_blocks, 32, "{df:#?}");
        assert_clean(&s, &format!("inline {inline}"));
    }
}

/// A VDI's model under power cuts: what was flushed, and every content written since.
struct Tracked {
    durable: Vec<Option<usize>>,
    current: Vec<Option<usize>>,
    since: Vec<HashSet<Option<usize>>>,
}

/// Runs the workload on a crash device (cut after `cut` operations, if given), then checks
/// the store after the crash. Returns the device operations made.
fn crash_case(seed: u64, cut: Option<u64>, image: u64) -> u64 {
    let dev = Arc::new(CrashDevice::new(16 << 20));
    Store::format(&*dev, 16 << 20).unwrap();
    dev.sync().unwrap();
    let s = Store::open_device(dev.clone(), small_opts()).unwrap();
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut vdis: BTreeMap<String, Tracked> = BTreeMap::new();
    for v in 0..3 {
        let name = format!("v{v}");
        s.create_vdi(&name, 256 * 4096).unwrap();
        vdis.insert(
            name,
            Tracked {
                durable: vec![None; 256],
                current: vec![None; 256],
                since: vec![HashSet::new(); 256],
            },
        );
    }
    // Half the runs start with inline dedup off, so that the pass has copies to collapse.
    s.set_dedup(Some(seed % 2 == 0), None).unwrap();
    if let Some(c) = cut {
        dev.cut_after(c);
    }
    let mut snaps = Vec::new();
    let names: Vec<String> = vdis.keys().cloned().collect();
    for step in 0..300 {
        let r: Result<(), super::StoreError> = (|| {
            match rng.random_range(0..100) {
                0..=69 => {
                    let name = &names[rng.random_range(0..names.len())];
                    let t = vdis.get_mut(name).unwrap();
                    let b = rng.random_range(0..255);
                    let n = rng.random_range(1..3);
                    let cs: Vec<usize> = (0..n).map(|_| rng.random_range(0..POOL)).collect();
                    let data: Vec<u8> = cs.iter().flat_map(|&c| content(c)).collect();
                    for (k, &c) in cs.iter().enumerate() {
                        t.current[b + k] = Some(c);
                        t.since[b + k].insert(Some(c));
                    }
                    let d = s.open_vdi(name, true)?;
                    d.write(&data, b as u64 * 4096, false)?;
                }
                70..=79 => {
                    s.flush()?;
                    for t in vdis.values_mut() {
                        t.durable = t.current.clone();
                        t.since.iter_mut().for_each(HashSet::clear);
                    }
                }
                80..=86 => {
                    let name = &names[rng.random_range(0..names.len())];
                    let snap = format!("{name}@s{step}");
                    s.snapshot(name, &format!("s{step}"))?;
                    snaps.push(snap);
                }
                87..=91 if !snaps.is_empty() => {
                    let snap = snaps.remove(rng.random_range(0..snaps.len()));
                    s.delete(&snap, false)?;
                }
                92..=96 => {
                    s.dedup_pass(&mut |_| {})?;
                }
                _ => {
                    s.gc(&mut |_| {})?;
                }
            }
            Ok(())
        })();
        if r.is_err() {
            assert!(
                dev.is_dead(),
                "seed {seed}: an error without a power cut: {r:?}"
            );
            break;
        }
    }
    let ops = dev.ops();
    drop(s);
    let ctx = format!("seed {seed} cut {cut:?} image {image}");
    let after: Arc<dyn Device> = Arc::new(dev.after_crash(image));
    let s = Store::open_device(after, small_opts())
        .unwrap_or_else(|e| panic!("{ctx}: reopen failed: {e}"));
    assert_clean(&s, &ctx);
    for (name, t) in &vdis {
        let d = s.open_vdi(name, false).unwrap();
        let mut buf = vec![0u8; 256 * 4096];
        d.read(&mut buf, 0)
            .unwrap_or_else(|e| panic!("{ctx}: reading {name}: {e}"));
        for b in 0..256 {
            let got = &buf[b * 4096..(b + 1) * 4096];
            let is = |c: &Option<usize>| match c {
                None => got.iter().all(|&x| x == 0),
                Some(i) => got == content(*i),
            };
            assert!(
                is(&t.durable[b]) || t.since[b].iter().any(is),
                "{ctx}: {name} block {b} holds neither its flushed content nor a later write"
            );
        }
    }
    // The recovered store goes on: a pass, gc, and it is still clean.
    s.dedup_pass(&mut |_| {}).unwrap();
    assert_clean(&s, &format!("{ctx}, after a pass"));
    ops
}

#[test]
fn power_cuts_during_inline_dedup_the_pass_and_gc() {
    for seed in [1u64, 2, 3, 4] {
        let total = crash_case(seed, None, 0);
        assert!(total > 100, "workload too small ({total} ops)");
        let mut rng = SmallRng::seed_from_u64(seed * 1000);
        for i in 0..60 {
            let cut = rng.random_range(0..total);
            crash_case(seed, Some(cut), seed * 7919 + i);
        }
    }
}

/// A block found by a lookup is freed, made reusable and reused for other data before the
/// write that found it shares it: the write must notice and write its own copy.
#[test]
fn a_block_reused_between_lookup_and_sharing_is_not_shared() {
    let dev: Arc<dyn Device> = Arc::new(MemDevice::new(32 << 20));
    let s = new_store(dev);
    for v in ["x", "y", "z"] {
        s.create_vdi(v, 1 << 20).unwrap();
    }
    let c = content(1);
    let x = s.open_vdi("x", true).unwrap();
    x.write(&c, 0, false).unwrap();
    let mut ptrs = Vec::new();
    x.lookup(0, 1, &mut ptrs).unwrap();
    let a = ptrs[0].addr();
    s.checkpoint().unwrap();
    let (s2, reused) = (
        s.clone(),
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
    );
    let seen = reused.clone();
    *super::io::test_hooks::AFTER_DEDUP_LOOKUP.lock() = Some(Box::new(move || {
        // x's copy goes, the checkpoints make its block reusable, and z's new data
        // takes it.
        x.write(&content(2), 0, false).unwrap();
        s2.checkpoint().unwrap();
        s2.checkpoint().unwrap();
        let z = s2.open_vdi("z", true).unwrap();
        let other: Vec<u8> = (0..64).flat_map(|k| content(100 + k)).collect();
        z.write(&other, 0, false).unwrap();
        let mut p = Vec::new();
        z.lookup(0, 64, &mut p).unwrap();
        seen.store(
            p.iter().any(|p| p.addr() == a),
            std::sync::atomic::Ordering::SeqCst,
        );
    }));
    let y = s.open_vdi("y", true).unwrap();
    y.write(&c, 0, false).unwrap();
    assert!(
        reused.load(std::sync::atomic::Ordering::SeqCst),
        "the race did not happen: block {a} was not reused"
    );
    let mut back = vec![0u8; 4096];
    y.read(&mut back, 0).unwrap();
    assert_eq!(back, c);
    drop(y);
    s.flush().unwrap();
    assert_clean(&s, "after the race");
}

/// Sets the dedup pause for as long as it lives (tests that set it run in their own process
/// under nextest).
struct Pause;

impl Pause {
    fn set(us: u64) -> Pause {
        super::io::test_hooks::DEDUP_PAUSE_US.store(us, std::sync::atomic::Ordering::Relaxed);
        Pause
    }
}

impl Drop for Pause {
    fn drop(&mut self) {
        super::io::test_hooks::DEDUP_PAUSE_US.store(0, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Writers sharing blocks across VDIs while background checkpoints free and reuse blocks,
/// snapshots come and go and dedup passes run: every VDI reads back what its writer wrote.
#[test]
fn concurrent_writers_share_blocks_while_blocks_are_freed_and_reused() {
    let dev: Arc<dyn Device> = Arc::new(MemDevice::new(24 << 20));
    Store::format(&*dev, dev.len()).unwrap();
    let opts = super::StoreOptions {
        checkpoint_interval: Some(std::time::Duration::from_millis(1)),
        ..small_opts()
    };
    let s = Store::open_device(dev, opts).unwrap();
    // Checkpoints (which make freed blocks reusable) happen between a write's lookup and
    // its change, often.
    let _pause = Pause::set(300);
    const BLOCKS: usize = 512;
    for v in 0..3 {
        s.create_vdi(&format!("v{v}"), BLOCKS as u64 * 4096)
            .unwrap();
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let admin = {
        let (s, stop) = (s.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let v = format!("v{}", n % 3);
                s.snapshot(&v, &format!("s{n}")).unwrap();
                if n % 4 == 0 {
                    s.dedup_pass(&mut |_| {}).unwrap();
                }
                s.delete(&format!("{v}@s{n}"), false).unwrap();
                s.gc(&mut |_| {}).unwrap();
            }
        })
    };
    let writers: Vec<_> = (0..3)
        .map(|v| {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(v);
                let mut img: Vec<Option<usize>> = vec![None; BLOCKS];
                let d = s.open_vdi(&format!("v{v}"), true).unwrap();
                for _ in 0..1500 {
                    let b = rng.random_range(0..BLOCKS - 3);
                    let n = rng.random_range(1..4);
                    let cs: Vec<Option<usize>> = (0..n)
                        // Enough contents that blocks are freed and reused all the time.
                        .map(|_| (!rng.random_bool(0.1)).then(|| rng.random_range(0..1200)))
                        .collect();
                    let data: Vec<u8> = cs
                        .iter()
                        .flat_map(|c| c.map_or_else(|| vec![0u8; 4096], content))
                        .collect();
                    d.write(&data, b as u64 * 4096, rng.random_bool(0.02))
                        .unwrap();
                    img[b..b + n].copy_from_slice(&cs);
                }
                img
            })
        })
        .collect();
    let images: Vec<Vec<Option<usize>>> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    admin.join().unwrap();
    let images: Images = images
        .into_iter()
        .enumerate()
        .map(|(v, img)| (format!("v{v}"), img))
        .collect();
    read_all(&s, &images, "after the writers");
    s.flush().unwrap();
    assert_clean(&s, "after the writers");
}

/// A store kept full of unique data and overwritten again and again: each checkpoint copies
/// much of the dedup index, and must always find the room to (the reserve grows with the
/// index; before it did, such a checkpoint failed with "no space" and the store refused
/// writes).
#[test]
fn overwriting_a_full_store_leaves_room_for_the_index() {
    let dev: Arc<dyn Device> = Arc::new(MemDevice::new(24 << 20));
    let s = new_store(dev);
    // A VDI that fills all but a few hundred blocks: overwriting it goes on only as
    // checkpoints free what it replaced, each with the index to copy.
    let n = s.free_blocks() - 1000;
    s.create_vdi("a", n * 4096).unwrap();
    let mut seed = 0u64;
    let mut unique = |len: u64| -> Vec<u8> {
        (0..len / 8)
            .flat_map(|_| {
                seed += 1;
                blake3::hash(&seed.to_le_bytes()).as_bytes()[..8].to_vec()
            })
            .collect()
    };
    let d = s.open_vdi("a", true).unwrap();
    for round in 0..4 {
        for chunk in 0..n.div_ceil(64) {
            let at = chunk * 64;
            let len = (n - at).min(64) * 4096;
            d.write(&unique(len), at * 4096, false)
                .unwrap_or_else(|e| {
                    let sp = s.space.lock();
                    panic!(
                        "round {round} block {at}: {e}; free {} reserve {} reserved {} pending {} entries {}",
                        sp.rc.free(),
                        sp.reserve(),
                        sp.rc.reserved(),
                        sp.rc.pending(),
                        s.dedup.lock().entries
                    )
                });
        }
    }
    drop(d);
    s.flush().unwrap();
    assert_clean(&s, "after overwriting a full store");
}
