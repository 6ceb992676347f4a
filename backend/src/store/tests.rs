//! Store tests against a reference model, power cuts, and corruption.

use std::{collections::BTreeMap, sync::Arc};

use rand::{rngs::SmallRng, Rng, SeedableRng};

use super::{
    device::{CrashDevice, Device, MemDevice},
    format::BLOCK_SIZE_U64,
    KeepRule, Schedule, Store, StoreError, StoreOptions,
};
use crate::disk::ExtentState;

/// Snapshots taken during a test, with what each must hold.
type Snaps = Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

pub(super) fn small_opts() -> StoreOptions {
    StoreOptions {
        node_cache_nodes: 64,
        rc_cache_pages: 4,
        dedup_leaf_cache: 4,
        orphans_per_commit: 7,
        max_dirty_nodes: 300,
        checkpoint_interval: None,
        give_back_after: std::time::Duration::ZERO,
    }
}

fn new_store(dev: Arc<dyn Device>) -> Arc<Store> {
    let len = dev.len();
    Store::format(&*dev, len).unwrap();
    Store::open_device(dev, small_opts()).unwrap()
}

fn assert_clean(s: &Store) {
    let r = s.check(true, &mut |_| {}).unwrap();
    assert!(r.ok, "check found damage: {:#?}", r);
}

#[test]
fn basic_lifecycle() {
    let dev: Arc<dyn Device> = Arc::new(MemDevice::new(64 << 20));
    let s = new_store(dev.clone());
    s.create_vdi("a", 8 << 20).unwrap();
    let d = s.open_vdi("a", true).unwrap();
    let data: Vec<u8> = (0..20000u32).map(|i| (i * 7 % 251) as u8).collect();
    d.write(&data, 1000, false).unwrap();
    let mut back = vec![0u8; 20000];
    d.read(&mut back, 1000).unwrap();
    assert_eq!(back, data);
    let mut edge = vec![1u8; 1500];
    d.read(&mut edge, 0).unwrap();
    assert!(edge[..1000].iter().all(|&b| b == 0));
    assert_eq!(&edge[1000..], &data[..500]);
    s.snapshot("a", "s1").unwrap();
    d.write(&[9u8; 4096], 4096, false).unwrap();
    let snap = s.open_vdi("a@s1", false).unwrap();
    let mut sb = vec![0u8; 20000];
    snap.read(&mut sb, 1000).unwrap();
    assert_eq!(sb, data, "snapshot unchanged by later writes");
    assert!(matches!(
        snap.write(&[1], 0, false),
        Err(StoreError::ReadOnly(_))
    ));
    assert!(matches!(
        s.open_vdi("a@s1", true),
        Err(StoreError::ReadOnly(_))
    ));
    s.fork("a@s1", "b").unwrap();
    let b = s.open_vdi("b", true).unwrap();
    b.write(&[5u8; 512], 512, false).unwrap();
    d.read(&mut back, 1000).unwrap();
    assert_ne!(back, data);
    let mut bb = vec![0u8; 512];
    d.read(&mut bb, 512).unwrap();
    let mut want = vec![0u8; 512];
    want[488..].copy_from_slice(&data[..24]);
    assert_eq!(bb, want, "fork writes do not reach the original");
    drop((d, snap, b));
    s.flush().unwrap();
    assert_clean(&s);
    let info = s.info("b").unwrap();
    assert_eq!(info.origin.as_deref(), Some("a@s1"));
    assert!(info.shared > 0 && info.unique > 0);
    assert!(matches!(s.delete("a", false), Err(StoreError::Busy(_))));
    s.delete("a", true).unwrap();
    s.gc(&mut |_| {}).unwrap();
    assert_clean(&s);
    // The fork survives its origin's deletion.
    let b = s.open_vdi("b", false).unwrap();
    let mut fb = vec![0u8; 20000];
    b.read(&mut fb, 1000).unwrap();
    assert_eq!(&fb[4096 - 1000 + 4096..], &data[4096 - 1000 + 4096..]);
    drop(b);
    s.close().unwrap();
    drop(s);
    let s = Store::open_device(dev, small_opts()).unwrap();
    assert_eq!(s.list().unwrap().len(), 1);
    assert_clean(&s);
    let tree = s.tree().unwrap();
    assert!(tree[0].deleted && tree[0].name == "a@s1" && tree[0].children[0].name == "b");
}

/// Contents of one VDI or snapshot in the model.
#[derive(Clone)]
struct ModelVdi {
    data: Vec<u8>,
    snapshot: bool,
}

struct Model {
    vdis: BTreeMap<String, ModelVdi>,
}

const SIZES: [u64; 3] = [512 * 1024, 2 << 20, 80 << 20];

fn pick<'a>(rng: &mut SmallRng, names: &'a [String]) -> Option<&'a String> {
    if names.is_empty() {
        None
    } else {
        Some(&names[rng.random_range(0..names.len())])
    }
}

/// Random operations over several VDIs, snapshots and forks, each checked against the model.
fn model_run(seed: u64, ops: usize) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let dev: Arc<dyn Device> = Arc::new(MemDevice::new(96 << 20));
    let mut s = new_store(dev.clone());
    let mut model = Model {
        vdis: BTreeMap::new(),
    };
    let mut counter = 0;
    for step in 0..ops {
        let ctx = format!("seed {seed} step {step}");
        let live: Vec<String> = model
            .vdis
            .iter()
            .filter(|(_, v)| !v.snapshot)
            .map(|(n, _)| n.clone())
            .collect();
        let snaps: Vec<String> = model
            .vdis
            .iter()
            .filter(|(_, v)| v.snapshot)
            .map(|(n, _)| n.clone())
            .collect();
        let all: Vec<String> = model.vdis.keys().cloned().collect();
        match rng.random_range(0..100) {
            0..=4 if live.len() < 4 => {
                counter += 1;
                let name = format!("v{counter}");
                let size = SIZES[rng.random_range(0..SIZES.len())];
                s.create_vdi(&name, size).unwrap();
                model.vdis.insert(
                    name,
                    ModelVdi {
                        data: vec![0; size as usize],
                        snapshot: false,
                    },
                );
            }
            5..=39 => {
                let Some(name) = pick(&mut rng, &live) else {
                    continue;
                };
                let v = model.vdis.get_mut(name).unwrap();
                let size = v.data.len() as u64;
                let len = match rng.random_range(0..4) {
                    0 => rng.random_range(1..600),
                    1 => 4096 * rng.random_range(1..5),
                    _ => rng.random_range(1..40000),
                }
                .min(size);
                let off = if rng.random_bool(0.5) {
                    rng.random_range(0..=(size - len) / 512) * 512
                } else {
                    rng.random_range(0..=size - len)
                };
                let buf: Vec<u8> = if rng.random_bool(0.15) {
                    vec![0; len as usize]
                } else {
                    (0..len).map(|_| rng.random()).collect()
                };
                let d = s.open_vdi(name, true).unwrap();
                d.write(&buf, off, rng.random_bool(0.05)).expect(&ctx);
                v.data[off as usize..(off + len) as usize].copy_from_slice(&buf);
            }
            40..=59 => {
                let Some(name) = pick(&mut rng, &all) else {
                    continue;
                };
                let v = &model.vdis[name];
                let size = v.data.len() as u64;
                let len = rng.random_range(1..=size.min(200_000));
                let off = rng.random_range(0..=size - len);
                let d = s.open_vdi(name, false).unwrap();
                let mut buf = vec![0u8; len as usize];
                d.read(&mut buf, off).expect(&ctx);
                assert!(
                    buf == v.data[off as usize..(off + len) as usize],
                    "{ctx}: read {name} {off}+{len} differs"
                );
            }
            60..=65 => {
                let Some(name) = pick(&mut rng, &live) else {
                    continue;
                };
                let v = model.vdis.get_mut(name).unwrap();
                let size = v.data.len() as u64;
                let len = rng.random_range(1..=size.min(1 << 20));
                let off = rng.random_range(0..=size - len);
                let d = s.open_vdi(name, true).unwrap();
                if rng.random_bool(0.5) {
                    let no_hole = rng.random_bool(0.3);
                    d.write_zeroes(off, len, no_hole, false).expect(&ctx);
                    v.data[off as usize..(off + len) as usize].fill(0);
                } else {
                    d.discard(off, len).expect(&ctx);
                    // Whole blocks inside the range read as zeros afterwards.
                    let first = off.div_ceil(BLOCK_SIZE_U64) * BLOCK_SIZE_U64;
                    let end = (off + len) / BLOCK_SIZE_U64 * BLOCK_SIZE_U64;
                    if first < end {
                        v.data[first as usize..end as usize].fill(0);
                    }
                }
            }
            66..=71 => {
                let Some(name) = pick(&mut rng, &live) else {
                    continue;
                };
                counter += 1;
                let snap = format!("s{counter}");
                s.snapshot(name, &snap).unwrap();
                let mut v = model.vdis[name].clone();
                v.snapshot = true;
                model.vdis.insert(format!("{name}@{snap}"), v);
            }
            72..=76 if live.len() < 5 => {
                let Some(src) = pick(&mut rng, &snaps) else {
                    continue;
                };
                counter += 1;
                let name = format!("f{counter}");
                s.fork(src, &name).unwrap();
                let mut v = model.vdis[src].clone();
                v.snapshot = false;
                model.vdis.insert(name, v);
            }
            77..=80 => {
                let Some(name) = pick(&mut rng, &all) else {
                    continue;
                };
                let recursive = !name.contains('@');
                let rep = s.delete(name, recursive).expect(&ctx);
                for gone in rep.deleted {
                    model.vdis.remove(&gone).expect("model knows it");
                }
            }
            81..=85 => s.flush().unwrap(),
            86..=88 => {
                s.flush().unwrap();
                drop(s);
                s = Store::open_device(dev.clone(), small_opts()).expect(&ctx);
            }
            89..=90 => {
                s.gc(&mut |_| {}).unwrap();
            }
            91 => {
                s.flush().unwrap();
                assert_clean(&s);
            }
            92..=93 => {
                let Some(name) = pick(&mut rng, &all) else {
                    continue;
                };
                let v = &model.vdis[name];
                let d = s.open_vdi(name, false).unwrap();
                let ext = d.extents(0, v.data.len() as u64, 1000).unwrap();
                let mut pos = 0usize;
                for e in ext {
                    if e.state != ExtentState::Data {
                        assert!(
                            v.data[pos..pos + e.len as usize].iter().all(|&b| b == 0),
                            "{ctx}: {name} hole at {pos} holds data"
                        );
                    }
                    pos += e.len as usize;
                }
                assert!(pos > 0);
            }
            _ => {}
        }
    }
    // Everything reads back, survives a reopen, checks clean, and gc returns all space.
    s.flush().unwrap();
    drop(s);
    let s = Store::open_device(dev.clone(), small_opts()).unwrap();
    for (name, v) in &model.vdis {
        let d = s.open_vdi(name, false).unwrap();
        let mut buf = vec![0u8; v.data.len()];
        d.read(&mut buf, 0).unwrap();
        assert!(buf == v.data, "seed {seed}: {name} differs after reopen");
    }
    assert_clean(&s);
    let names: Vec<String> = model
        .vdis
        .iter()
        .filter(|(_, v)| !v.snapshot)
        .map(|(n, _)| n.clone())
        .collect();
    for n in names {
        s.delete(&n, true).unwrap();
    }
    for n in model.vdis.keys().filter(|n| n.contains('@')) {
        let _ = s.delete(n, false);
    }
    s.gc(&mut |_| {}).unwrap();
    assert_clean(&s);
    let df = s.df().unwrap();
    assert_eq!(
        df.used_bytes, 0,
        "seed {seed}: space not returned after deleting everything: {df:#?}"
    );
}

#[test]
fn model_random_ops() {
    for seed in 0..6 {
        model_run(seed, 1500);
    }
}

/// What the crash workload did to one VDI or snapshot.
#[derive(Clone)]
struct Tracked {
    /// Contents as of the last completed commit.
    durable: Vec<u8>,
    /// Contents with every acknowledged write.
    current: Vec<u8>,
    /// Per 4 KiB block: hashes of every content written since the last commit.
    since: Vec<Vec<[u8; 32]>>,
    snapshot: bool,
}

impl Tracked {
    fn new(size: usize, snapshot: bool) -> Tracked {
        Tracked {
            durable: vec![0; size],
            current: vec![0; size],
            since: vec![Vec::new(); size / 4096],
            snapshot,
        }
    }

    fn note_write(&mut self, off: usize, len: usize) {
        for b in off / 4096..(off + len).div_ceil(4096) {
            let h = *blake3::hash(&self.current[b * 4096..(b + 1) * 4096]).as_bytes();
            self.since[b].push(h);
        }
    }

    fn committed(&mut self) {
        self.durable = self.current.clone();
        self.since.iter_mut().for_each(Vec::clear);
    }
}

enum Outcome {
    /// The workload ran to the end.
    Finished,
    /// The power went during an operation; these names may or may not exist now.
    Cut {
        uncertain: Vec<String>,
        /// A rollback the power cut short: the VDI, and what it reads if the rollback happened
        /// (else it reads as before it).
        rolling_back: Option<(String, Vec<u8>)>,
        /// A schedule change the power cut short: its target, and what it is if the change
        /// happened (else it is as before).
        scheduling: Option<(String, Option<Schedule>)>,
    },
}

/// What the workload expects of the store besides VDIs: its snapshot schedules.
type ScheduleModel = BTreeMap<String, Schedule>;

/// A deterministic workload; stops at the first failing operation (the power cut).
fn crash_workload(
    s: &Arc<Store>,
    seed: u64,
    model: &mut BTreeMap<String, Tracked>,
    schedules: &mut ScheduleModel,
) -> Outcome {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut counter = 0;
    macro_rules! commit_point {
        ($r:expr, $uncertain:expr) => {
            match $r {
                Ok(_) => model.values_mut().for_each(Tracked::committed),
                Err(_) => {
                    return Outcome::Cut {
                        uncertain: $uncertain,
                        rolling_back: None,
                        scheduling: None,
                    }
                }
            }
        };
    }
    commit_point!(s.create_vdi("base", 3 << 20), vec!["base".into()]);
    model.insert("base".into(), Tracked::new(3 << 20, false));
    for _ in 0..160 {
        let live: Vec<String> = model
            .iter()
            .filter(|(_, t)| !t.snapshot)
            .map(|(n, _)| n.clone())
            .collect();
        let snaps: Vec<String> = model
            .iter()
            .filter(|(_, t)| t.snapshot)
            .map(|(n, _)| n.clone())
            .collect();
        match rng.random_range(0..100) {
            0..=54 => {
                let name = pick(&mut rng, &live).unwrap().clone();
                let t = model.get_mut(&name).unwrap();
                let size = t.current.len();
                let len = match rng.random_range(0..3) {
                    0 => 4096 * rng.random_range(1..6),
                    1 => rng.random_range(1..9000),
                    _ => 4096 * rng.random_range(16..64),
                };
                let len = len.min(size);
                let off = rng.random_range(0..=size - len);
                let buf: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                let d = s.open_vdi(&name, true).unwrap();
                // The write may land (wholly or in part) even if it fails: note it first.
                t.current[off..off + len].copy_from_slice(&buf);
                t.note_write(off, len);
                if d.write(&buf, off as u64, false).is_err() {
                    return Outcome::Cut {
                        uncertain: Vec::new(),
                        rolling_back: None,
                        scheduling: None,
                    };
                }
            }
            55..=62 => {
                let name = pick(&mut rng, &live).unwrap().clone();
                let t = model.get_mut(&name).unwrap();
                let size = t.current.len();
                let off = rng.random_range(0..size / 4096) * 4096;
                let len = (rng.random_range(1..40) * 4096).min(size - off);
                t.current[off..off + len].fill(0);
                t.note_write(off, len);
                let d = s.open_vdi(&name, true).unwrap();
                if d.discard(off as u64, len as u64).is_err() {
                    return Outcome::Cut {
                        uncertain: Vec::new(),
                        rolling_back: None,
                        scheduling: None,
                    };
                }
            }
            63..=74 => commit_point!(s.flush(), Vec::new()),
            75..=77 => {
                // Set, replace or remove a snapshot schedule.
                let target = ["base", "f*", "f1?"][rng.random_range(0..3)].to_string();
                let new = if schedules.contains_key(&target) && rng.random_bool(0.5) {
                    None
                } else {
                    let every_secs = rng.random_range(1..100);
                    Some(Schedule {
                        every_secs,
                        keep: vec![KeepRule {
                            every_secs,
                            for_secs: every_secs * rng.random_range(1..10),
                        }],
                    })
                };
                let r = match &new {
                    Some(sch) => s.set_schedule(&target, sch),
                    None => s.remove_schedule(&target),
                };
                if r.is_err() {
                    return Outcome::Cut {
                        uncertain: Vec::new(),
                        rolling_back: None,
                        scheduling: Some((target, new)),
                    };
                }
                match new {
                    Some(sch) => schedules.insert(target, sch),
                    None => schedules.remove(&target),
                };
                model.values_mut().for_each(Tracked::committed);
            }
            78..=85 => {
                let name = pick(&mut rng, &live).unwrap().clone();
                counter += 1;
                let full = format!("{name}@s{counter}");
                commit_point!(
                    s.snapshot(&name, &format!("s{counter}")),
                    vec![full.clone()]
                );
                let mut t = model[&name].clone();
                t.snapshot = true;
                model.insert(full, t);
            }
            86..=91 if live.len() < 4 => {
                let Some(src) = pick(&mut rng, &snaps).cloned() else {
                    continue;
                };
                counter += 1;
                let name = format!("f{counter}");
                commit_point!(s.fork(&src, &name), vec![name.clone()]);
                let mut t = model[&src].clone();
                t.snapshot = false;
                model.insert(name, t);
            }
            95 => {
                // Roll a live VDI back to one of its snapshots.
                let own: Vec<String> = snaps
                    .iter()
                    .filter(|n| live.iter().any(|l| n.starts_with(&format!("{l}@"))))
                    .cloned()
                    .collect();
                let Some(snap) = pick(&mut rng, &own).cloned() else {
                    continue;
                };
                let vdi = snap.split('@').next().unwrap().to_string();
                let image = model[&snap].current.clone();
                if s.rollback(&snap, false).is_err() {
                    return Outcome::Cut {
                        uncertain: Vec::new(),
                        rolling_back: Some((vdi, image)),
                        scheduling: None,
                    };
                }
                let t = model.get_mut(&vdi).unwrap();
                t.current = image;
                model.values_mut().for_each(Tracked::committed);
            }
            92..=94 => {
                let all: Vec<String> = model.keys().filter(|n| *n != "base").cloned().collect();
                let Some(victim) = pick(&mut rng, &all).cloned() else {
                    continue;
                };
                let doomed: Vec<String> = model
                    .keys()
                    .filter(|n| **n == victim || n.starts_with(&format!("{victim}@")))
                    .cloned()
                    .collect();
                commit_point!(s.delete(&victim, true), doomed.clone());
                for d in doomed {
                    model.remove(&d);
                }
            }
            _ => {
                if s.gc(&mut |_| {}).is_err() {
                    return Outcome::Cut {
                        uncertain: Vec::new(),
                        rolling_back: None,
                        scheduling: None,
                    };
                }
                model.values_mut().for_each(Tracked::committed);
            }
        }
    }
    Outcome::Finished
}

/// `discard_unit`: the device gives space back in units of so many bytes (giveback.rs).
/// Returns the device operations the workload made, and where its discards came.
fn crash_case(
    seed: u64,
    cut: Option<u64>,
    image_seed: u64,
    discard_unit: Option<u64>,
) -> (u64, Vec<u64>) {
    // A small store, so that freed blocks are reused (the allocator wraps around) often.
    let dev = Arc::new(CrashDevice::shedding(16 << 20, discard_unit));
    Store::format(&*dev, 16 << 20).unwrap();
    dev.sync().unwrap();
    let s = Store::open_device(dev.clone(), small_opts()).unwrap();
    let base = dev.ops();
    if let Some(c) = cut {
        dev.cut_after(c);
    }
    let mut model = BTreeMap::new();
    let mut schedules = ScheduleModel::new();
    let outcome = crash_workload(&s, seed, &mut model, &mut schedules);
    let discards = dev.discard_ops();
    let ops = (
        dev.ops() - base,
        discards
            .iter()
            .filter_map(|d| d.checked_sub(base))
            .collect(),
    );
    drop(s);
    let (uncertain, rolling_back, scheduling) = match outcome {
        Outcome::Finished => (Vec::new(), None, None),
        Outcome::Cut {
            uncertain,
            rolling_back,
            scheduling,
        } => (uncertain, rolling_back, scheduling),
    };
    let ctx = format!("seed {seed} cut {cut:?} image {image_seed} discard {discard_unit:?}");
    let after: Arc<dyn Device> = Arc::new(dev.after_crash(image_seed));
    let s = Store::open_device(after, small_opts())
        .unwrap_or_else(|e| panic!("{ctx}: reopen failed: {e}"));
    let r = s.check(true, &mut |_| {}).unwrap();
    assert!(r.ok, "{ctx}: check after crash: {r:#?}");
    let found: ScheduleModel = s.schedules().unwrap().into_iter().collect();
    if let Some((target, new)) = scheduling {
        // The interrupted change happened wholly, or not at all.
        if found.get(&target) == new.as_ref() {
            match new {
                Some(sch) => schedules.insert(target, sch),
                None => schedules.remove(&target),
            };
        }
    }
    assert_eq!(found, schedules, "{ctx}: schedules after the crash");
    let listed: Vec<String> = s.list().unwrap().into_iter().map(|v| v.name).collect();
    for (name, t) in &model {
        if uncertain.contains(name) {
            continue;
        }
        assert!(
            listed.contains(name),
            "{ctx}: {name} is gone after the crash"
        );
        let d = s.open_vdi(name, false).unwrap();
        let mut buf = vec![0u8; t.current.len()];
        d.read(&mut buf, 0)
            .unwrap_or_else(|e| panic!("{ctx}: reading {name}: {e}"));
        if rolling_back
            .as_ref()
            .is_some_and(|(v, image)| v == name && *image == buf)
        {
            // The rollback happened, wholly.
            continue;
        }
        for b in 0..buf.len() / 4096 {
            let got = &buf[b * 4096..(b + 1) * 4096];
            if got == &t.durable[b * 4096..(b + 1) * 4096] {
                continue;
            }
            let h = *blake3::hash(got).as_bytes();
            assert!(
                t.since[b].contains(&h),
                "{ctx}: {name} block {b} holds neither its flushed content nor any later write"
            );
        }
    }
    for name in &listed {
        assert!(
            model.contains_key(name) || uncertain.contains(name),
            "{ctx}: {name} exists but was deleted or never made"
        );
    }
    // The recovered store works: write, flush, reopen-free check.
    s.gc(&mut |_| {}).unwrap();
    s.create_vdi("after", 1 << 20).unwrap();
    let d = s.open_vdi("after", true).unwrap();
    d.write(&[7u8; 10000], 123, true).unwrap();
    drop(d);
    s.gc(&mut |_| {}).unwrap();
    assert_clean(&s);
    ops
}

#[test]
fn power_cut_at_random_points() {
    // A run without a cut tells how many device operations the workload makes.
    for seed in [11u64, 12, 13] {
        let (total, _) = crash_case(seed, None, 0, None);
        assert!(total > 50, "workload too small ({total} ops)");
        let mut rng = SmallRng::seed_from_u64(seed * 1000);
        for i in 0..110 {
            let cut = rng.random_range(0..total);
            crash_case(seed, Some(cut), seed * 7919 + i, None);
        }
    }
}

/// The same on a device that takes space back (a store in RADOS), in units of 16 blocks: a
/// power cut anywhere, and right after each discard in particular, loses no flushed write and
/// leaves the store clean.
#[test]
fn power_cut_at_random_points_while_space_goes_back() {
    let unit = Some(16 * BLOCK_SIZE_U64);
    for seed in [21u64, 22] {
        let (total, discards) = crash_case(seed, None, 0, unit);
        assert!(discards.len() > 10, "only {} discards", discards.len());
        let mut rng = SmallRng::seed_from_u64(seed * 1000);
        // Right after a discard (the power goes at the next operation, or the one after).
        let step = discards.len().div_ceil(20);
        let near = discards.iter().step_by(step).flat_map(|&d| [d + 1, d + 2]);
        for (i, cut) in (0..30)
            .map(|_| rng.random_range(0..total))
            .chain(near)
            .enumerate()
        {
            crash_case(seed, Some(cut), seed * 7919 + i as u64, unit);
        }
    }
}

/// On a nearly full store, overwriting data needs the space its old blocks free — but only
/// once the commit that frees them is durable. Overwrites must succeed (the store commits to
/// make room), and a power cut at any point leaves each block with its old or new content.
#[test]
fn overwriting_a_full_store_after_power_cuts() {
    let run = |cut: Option<u64>, image: u64| -> u64 {
        let dev = Arc::new(CrashDevice::new(16 << 20));
        Store::format(&*dev, 16 << 20).unwrap();
        dev.sync().unwrap();
        let s = Store::open_device(dev.clone(), small_opts()).unwrap();
        let blocks = s.free_blocks() * 8 / 10;
        s.create_vdi("v", blocks * 4096).unwrap();
        let d = s.open_vdi("v", true).unwrap();
        let a = vec![0xaau8; 64 << 10];
        let b = vec![0xbbu8; 64 << 10];
        for off in (0..blocks * 4096).step_by(a.len()) {
            let n = (blocks * 4096 - off).min(a.len() as u64) as usize;
            d.write(&a[..n], off, false).unwrap();
        }
        s.flush().unwrap();
        let start = dev.ops();
        if let Some(c) = cut {
            dev.cut_after(c);
        }
        for off in (0..blocks * 4096).step_by(b.len()) {
            let n = (blocks * 4096 - off).min(b.len() as u64) as usize;
            if let Err(e) = d.write(&b[..n], off, false) {
                assert!(cut.is_some(), "overwrite failed without a power cut: {e}");
                break;
            }
        }
        let used = dev.ops() - start;
        drop(d);
        drop(s);
        let s = Store::open_device(Arc::new(dev.after_crash(image)), small_opts()).unwrap();
        let d = s.open_vdi("v", false).unwrap();
        let mut buf = vec![0u8; 4096];
        for blk in 0..blocks {
            d.read(&mut buf, blk * 4096)
                .unwrap_or_else(|e| panic!("cut {cut:?}: block {blk}: {e}"));
            assert!(
                buf.iter().all(|&x| x == 0xaa) || buf.iter().all(|&x| x == 0xbb),
                "cut {cut:?}: block {blk} mixed"
            );
        }
        drop(d);
        assert_clean(&s);
        used
    };
    let total = run(None, 0);
    let mut rng = SmallRng::seed_from_u64(5);
    for i in 0..25 {
        run(Some(rng.random_range(0..total)), i);
    }
}

/// Flips a byte in every block ever written, one block at a time: opening, listing, reading and
/// checking the damaged store never panics; damage to a block the last commit depends on is
/// reported by `check` (or makes the store refuse to open); damage to a data block makes the
/// read of that block an error, never wrong bytes.
#[test]
fn corruption_is_detected_and_never_panics() {
    let dev = Arc::new(MemDevice::new(32 << 20));
    Store::format(&*dev, 32 << 20).unwrap();
    let s = Store::open_device(dev.clone(), small_opts()).unwrap();
    let mut rng = SmallRng::seed_from_u64(99);
    let mut contents: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    s.create_vdi("a", 3 << 20).unwrap();
    let a = s.open_vdi("a", true).unwrap();
    let data: Vec<u8> = (0..(3 << 20)).map(|_| rng.random()).collect();
    a.write(&data, 0, false).unwrap();
    drop(a);
    s.snapshot("a", "s").unwrap();
    s.fork("a@s", "b").unwrap();
    let b = s.open_vdi("b", true).unwrap();
    let patch: Vec<u8> = (0..300_000).map(|_| rng.random()).collect();
    b.write(&patch, 12345, false).unwrap();
    drop(b);
    s.close().unwrap();
    let mut bdata = data.clone();
    bdata[12345..12345 + patch.len()].copy_from_slice(&patch);
    contents.insert("a".into(), data.clone());
    contents.insert("a@s".into(), data);
    contents.insert("b".into(), bdata);
    let live = s.live_blocks();
    // Damage to the newest commit record falls back to the previous commit, by design (it is
    // what a torn commit record after a power cut looks like).
    let newest_slot = super::format::COMMIT_SLOTS[(s.durable_generation() % 2) as usize];
    drop(s);

    let written = dev.written_blocks();
    let mut detected = 0;
    for (n, blk) in written.iter().enumerate() {
        let damaged = Arc::new(dev.duplicate());
        let at = blk * 4096 + rng.random_range(0..4096);
        damaged.corrupt(at, 1 << rng.random_range(0..8));
        let is_live = live.contains(blk);
        let ctx = format!("block {blk} (#{n}, live {is_live})");
        let store = match Store::open_device(damaged, small_opts()) {
            Ok(s) if *blk == newest_slot => {
                // The previous checkpoint and the log after it hold everything flushed; the
                // last write to b was made durable only by the closing checkpoint.
                assert!(
                    s.check(true, &mut |_| {}).unwrap().ok,
                    "{ctx}: previous commit damaged"
                );
                for (name, want) in &contents {
                    let d = s.open_vdi(name, false).unwrap();
                    let mut buf = vec![0u8; want.len()];
                    d.read(&mut buf, 0).unwrap();
                    assert!(
                        &buf == want || (name == "b" && buf == contents["a"]),
                        "{ctx}: {name} holds neither its content nor its flushed content"
                    );
                }
                continue;
            }
            Ok(s) => s,
            Err(e) => {
                assert!(
                    is_live,
                    "{ctx}: a stale block stopped the store opening: {e}"
                );
                detected += 1;
                continue;
            }
        };
        let _ = store.list();
        let _ = store.tree();
        let _ = store.df();
        let mut read_failed = false;
        for (name, want) in &contents {
            let Ok(d) = store.open_vdi(name, false) else {
                read_failed = true;
                continue;
            };
            let mut buf = vec![0u8; want.len()];
            for (i, chunk) in buf.chunks_mut(64 << 10).enumerate() {
                match d.read(chunk, (i * (64 << 10)) as u64) {
                    Ok(()) => assert!(
                        chunk == &want[i * (64 << 10)..i * (64 << 10) + chunk.len()],
                        "{ctx}: {name} returned wrong bytes"
                    ),
                    Err(_) => read_failed = true,
                }
            }
        }
        let report = store.check(true, &mut |_| {}).unwrap();
        if is_live {
            assert!(!report.ok || read_failed, "{ctx}: damage went unnoticed");
            assert!(!report.ok, "{ctx}: check missed damage: {report:#?}");
            detected += 1;
        }
    }
    assert!(detected > 50, "only {detected} damaged blocks were live");
}

/// A device whose syncs wait until the test lets them through.
struct GatedDevice {
    inner: MemDevice,
    gate: parking_lot::Mutex<bool>,
    cv: parking_lot::Condvar,
    syncs_waiting: std::sync::atomic::AtomicUsize,
}

impl Device for GatedDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.syncs_waiting
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut open = self.gate.lock();
        while !*open {
            self.cv.wait(&mut open);
        }
        self.syncs_waiting
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
}

/// A flush that arrives while another flush's commit is writing must wait for that commit:
/// the writes it covers are no longer "changed" in memory, but not yet durable either.
#[test]
fn flush_waits_for_a_commit_in_flight() {
    use std::sync::atomic::Ordering;
    let dev = Arc::new(GatedDevice {
        inner: MemDevice::new(32 << 20),
        gate: parking_lot::Mutex::new(true),
        cv: parking_lot::Condvar::new(),
        syncs_waiting: Default::default(),
    });
    Store::format(&*dev, 32 << 20).unwrap();
    let s = Store::open_device(dev.clone(), small_opts()).unwrap();
    s.create_vdi("v", 1 << 20).unwrap();
    let d = s.open_vdi("v", true).unwrap();
    d.write(&[1u8; 4096], 0, false).unwrap();
    *dev.gate.lock() = false;
    let first = {
        let s = s.clone();
        std::thread::spawn(move || s.flush().unwrap())
    };
    while dev.syncs_waiting.load(Ordering::SeqCst) == 0 {
        std::thread::yield_now();
    }
    // The first flush's commit is now stuck in its sync, with the write collected.
    let second_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let second = {
        let (s, done) = (s.clone(), second_done.clone());
        std::thread::spawn(move || {
            s.flush().unwrap();
            done.store(true, Ordering::SeqCst);
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(
        !second_done.load(Ordering::SeqCst),
        "a flush returned before the write was durable"
    );
    *dev.gate.lock() = true;
    dev.cv.notify_all();
    first.join().unwrap();
    second.join().unwrap();
    assert!(second_done.load(Ordering::SeqCst));
}

/// Several threads write, flush and snapshot one VDI while checkpoints run in the background
/// every millisecond; everything reads back, survives a reopen and checks clean.
#[test]
fn concurrent_writers_and_background_checkpoints() {
    use std::sync::Mutex;
    let dev: Arc<dyn Device> = Arc::new(MemDevice::new(256 << 20));
    let len = dev.len();
    Store::format(&*dev, len).unwrap();
    let opts = StoreOptions {
        checkpoint_interval: Some(std::time::Duration::from_millis(1)),
        max_dirty_nodes: 40,
        ..small_opts()
    };
    let s = Store::open_device(dev.clone(), opts.clone()).unwrap();
    const BLOCKS: usize = 2048;
    s.create_vdi("vm", (BLOCKS * 4096) as u64).unwrap();
    let model = Arc::new(Mutex::new(vec![0u8; BLOCKS]));
    let snaps: Snaps = Arc::default();
    // Writers hold it shared from write to model update; a snapshot holds it exclusively.
    let quiet = Arc::new(std::sync::RwLock::new(()));
    let threads: Vec<_> = (0..3u64)
        .map(|t| {
            let (s, model, snaps, quiet) = (s.clone(), model.clone(), snaps.clone(), quiet.clone());
            std::thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(t);
                let d = s.open_vdi("vm", true).unwrap();
                for i in 0..1500 {
                    // Each thread owns the blocks b with b % 3 == t.
                    let b = rng.random_range(0..BLOCKS / 3) * 3 + t as usize;
                    let v = rng.random_range(1..=255u8);
                    {
                        let _w = quiet.read().unwrap();
                        d.write(&[v; 4096], (b * 4096) as u64, i % 50 == 0).unwrap();
                        model.lock().unwrap()[b] = v;
                    }
                    if i % 97 == 0 {
                        s.flush().unwrap();
                    }
                    if t == 0 && i % 211 == 0 {
                        let _q = quiet.write().unwrap();
                        let m = model.lock().unwrap();
                        let name = format!("s{i}");
                        s.snapshot("vm", &name).unwrap();
                        snaps
                            .lock()
                            .unwrap()
                            .push((format!("vm@{name}"), m.clone()));
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let verify = |s: &Arc<Store>| {
        let d = s.open_vdi("vm", false).unwrap();
        let mut buf = vec![0u8; BLOCKS * 4096];
        d.read(&mut buf, 0).unwrap();
        let m = model.lock().unwrap();
        for b in 0..BLOCKS {
            assert!(
                buf[b * 4096..(b + 1) * 4096].iter().all(|&x| x == m[b]),
                "block {b}"
            );
        }
        for (name, want) in snaps.lock().unwrap().iter() {
            let d = s.open_vdi(name, false).unwrap();
            d.read(&mut buf, 0).unwrap();
            for b in 0..BLOCKS {
                assert!(
                    buf[b * 4096..(b + 1) * 4096].iter().all(|&x| x == want[b]),
                    "{name} block {b}"
                );
            }
        }
    };
    verify(&s);
    s.close().unwrap();
    assert_clean(&s);
    drop(s);
    let s = Store::open_device(dev, opts).unwrap();
    verify(&s);
    assert_clean(&s);
    s.close().unwrap();
}

/// Power cuts while writers on several threads write, flush, take snapshots and let
/// checkpoints run in the background: after recovery, every write acknowledged before a
/// completed flush (of its own thread) is there, every block holds a version some write put
/// there, snapshots that returned are intact, and the store checks clean.
#[test]
fn power_cut_under_concurrent_writers_and_background_checkpoints() {
    use std::sync::Mutex;
    const BLOCKS: usize = 768;
    const THREADS: usize = 3;
    for round in 0..24u64 {
        // A small store, so that freed blocks are soon reused.
        let dev = Arc::new(CrashDevice::new(16 << 20));
        Store::format(&*dev, 16 << 20).unwrap();
        dev.sync().unwrap();
        let opts = StoreOptions {
            checkpoint_interval: Some(std::time::Duration::from_millis(2)),
            max_dirty_nodes: 60,
            ..small_opts()
        };
        let s = Store::open_device(dev.clone(), opts.clone()).unwrap();
        s.create_vdi("vm", (BLOCKS * 4096) as u64).unwrap();
        // Per block: the value durable for sure, and every value written since.
        let durable = Arc::new(Mutex::new(vec![0u8; BLOCKS]));
        let since: Arc<Mutex<Vec<Vec<u8>>>> = Arc::new(Mutex::new(vec![Vec::new(); BLOCKS]));
        let snaps: Snaps = Arc::default();
        let mut rng = SmallRng::seed_from_u64(round);
        dev.cut_after(rng.random_range(200..6000));
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let (s, durable, since, snaps) =
                    (s.clone(), durable.clone(), since.clone(), snaps.clone());
                std::thread::spawn(move || {
                    let mut rng = SmallRng::seed_from_u64(round * 10 + t as u64);
                    let Ok(d) = s.open_vdi("vm", true) else {
                        return;
                    };
                    // This thread's blocks: b % THREADS == t. Values acknowledged since the
                    // thread's last flush.
                    let mut mine: Vec<(usize, u8)> = Vec::new();
                    for i in 0.. {
                        let b = rng.random_range(0..BLOCKS / THREADS) * THREADS + t;
                        let v = rng.random_range(1..=255u8);
                        since.lock().unwrap()[b].push(v);
                        if d.write(&[v; 4096], (b * 4096) as u64, false).is_err() {
                            return;
                        }
                        mine.push((b, v));
                        if i % 13 == 12 {
                            if s.flush().is_err() {
                                return;
                            }
                            let mut dur = durable.lock().unwrap();
                            let mut sn = since.lock().unwrap();
                            for &(b, v) in &mine {
                                dur[b] = v;
                                // Older values of the block can no longer come back.
                                let keep = sn[b].iter().rposition(|&x| x == v).unwrap_or(0);
                                sn[b].drain(..keep);
                            }
                            mine.clear();
                        }
                        if t == 0 && i % 40 == 39 {
                            // The snapshot holds at least what this thread flushed and, for
                            // the other threads' blocks, some value they wrote.
                            let name = format!("s{i}");
                            if s.snapshot("vm", &name).is_err() {
                                return;
                            }
                            let dv = s.open_vdi(&format!("vm@{name}"), false).unwrap();
                            let mut img = vec![0u8; BLOCKS * 4096];
                            if dv.read(&mut img, 0).is_err() {
                                return;
                            }
                            let per: Vec<u8> = (0..BLOCKS).map(|b| img[b * 4096]).collect();
                            snaps.lock().unwrap().push((format!("vm@{name}"), per));
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(s);
        let ctx = format!("round {round}");
        let after: Arc<dyn Device> = Arc::new(dev.after_crash(round));
        let s = Store::open_device(after, opts.clone())
            .unwrap_or_else(|e| panic!("{ctx}: reopen failed: {e}"));
        let d = s.open_vdi("vm", false).unwrap();
        let mut img = vec![0u8; BLOCKS * 4096];
        d.read(&mut img, 0)
            .unwrap_or_else(|e| panic!("{ctx}: read: {e}"));
        let dur = durable.lock().unwrap();
        let sn = since.lock().unwrap();
        for b in 0..BLOCKS {
            let blk = &img[b * 4096..(b + 1) * 4096];
            assert!(
                blk.iter().all(|&x| x == blk[0]),
                "{ctx}: block {b} is torn or garbage"
            );
            assert!(
                blk[0] == dur[b] || sn[b].contains(&blk[0]),
                "{ctx}: block {b} holds {} (flushed {}, written since {:?})",
                blk[0],
                dur[b],
                sn[b]
            );
        }
        for (name, want) in snaps.lock().unwrap().iter() {
            let dv = s
                .open_vdi(name, false)
                .unwrap_or_else(|e| panic!("{ctx}: snapshot {name} is gone: {e}"));
            let mut img = vec![0u8; BLOCKS * 4096];
            dv.read(&mut img, 0).unwrap();
            for b in 0..BLOCKS {
                assert_eq!(img[b * 4096], want[b], "{ctx}: {name} block {b} changed");
            }
        }
        drop(d);
        s.close().unwrap();
        assert_clean(&s);
    }
}

/// A store on a crash-simulating device whose VDI `v` (64 blocks) holds 1s, flushed, then
/// block `b` rewritten with `2 + b`, unflushed, the entries of the first `ahead` blocks written
/// ahead to log blocks (8 at a time).
fn flushed_then_written_ahead(ahead: u64) -> (Arc<CrashDevice>, Arc<Store>, super::StoreDisk) {
    let dev = Arc::new(CrashDevice::new(16 << 20));
    Store::format(&*dev, 16 << 20).unwrap();
    dev.sync().unwrap();
    let s = Store::open_device(dev.clone(), small_opts()).unwrap();
    s.create_vdi("v", 64 * 4096).unwrap();
    let d = s.open_vdi("v", true).unwrap();
    d.write(&[1u8; 64 * 4096], 0, false).unwrap();
    s.flush().unwrap();
    for b in 0..64u64 {
        d.write(&[2 + b as u8; 4096], b * 4096, false).unwrap();
        if b % 8 == 7 && b < ahead {
            s.log.write_ahead(&*s.dev, &s.space, 0).unwrap();
        }
    }
    (dev, s, d)
}

/// Log blocks written ahead of a flush, without a sync, may reach the disk without the data
/// they point at. After a power cut there, the store opens, every block reads (no checksum
/// error), and each holds its flushed content or a later write.
#[test]
fn power_cut_after_the_log_was_written_ahead() {
    for seed in 0..60u64 {
        // Unflushed writes, their entries written ahead to log blocks, then the power goes.
        let (dev, s, d) = flushed_then_written_ahead(64);
        dev.cut_after(0);
        drop(d);
        drop(s);
        let after: Arc<dyn Device> = Arc::new(dev.after_crash(seed));
        let s = Store::open_device(after, small_opts())
            .unwrap_or_else(|e| panic!("seed {seed}: reopen: {e}"));
        let d = s.open_vdi("v", false).unwrap();
        let mut buf = vec![0u8; 4096];
        for b in 0..64u64 {
            d.read(&mut buf, b * 4096)
                .unwrap_or_else(|e| panic!("seed {seed}: block {b}: {e}"));
            assert!(
                buf.iter().all(|&x| x == 1) || buf.iter().all(|&x| x == 2 + b as u8),
                "seed {seed}: block {b} holds neither version"
            );
        }
        drop(d);
        assert_clean(&s);
    }
}

/// A flush writes its log blocks and syncs once: a power cut before that sync returns may
/// leave any mix of the data, the blocks written ahead and the flush's own blocks on the disk.
/// After it, the store opens, every block reads (no checksum error), and each holds its
/// flushed content or its new one; a flush that returned leaves every new one.
#[test]
fn power_cut_inside_a_flush() {
    for cut in 0..4u64 {
        for seed in 0..40u64 {
            let ctx = format!("cut {cut} seed {seed}");
            // Half the new writes' entries go to log blocks ahead of the flush.
            let (dev, s, d) = flushed_then_written_ahead(32);
            dev.cut_after(cut);
            let flushed = s.flush().is_ok();
            drop(d);
            drop(s);
            let after: Arc<dyn Device> = Arc::new(dev.after_crash(seed));
            let s = Store::open_device(after, small_opts())
                .unwrap_or_else(|e| panic!("{ctx}: reopen: {e}"));
            let d = s.open_vdi("v", false).unwrap();
            let mut buf = vec![0u8; 4096];
            for b in 0..64u64 {
                d.read(&mut buf, b * 4096)
                    .unwrap_or_else(|e| panic!("{ctx}: block {b}: {e}"));
                let new = buf.iter().all(|&x| x == 2 + b as u8);
                assert!(
                    new || (!flushed && buf.iter().all(|&x| x == 1)),
                    "{ctx}: block {b} holds {} after a flush that {}",
                    buf[0],
                    if flushed { "returned" } else { "failed" }
                );
            }
            drop(d);
            assert_clean(&s);
        }
    }
}

/// Reads all of `name` (a VDI or snapshot) as blocks.
fn image_blocks(s: &Arc<Store>, name: &str) -> Vec<Vec<u8>> {
    let d = s.open_vdi(name, false).unwrap();
    let mut img = vec![0u8; d.size() as usize];
    d.read(&mut img, 0).unwrap();
    img.chunks(4096).map(|c| c.to_vec()).collect()
}

/// What `diff` must say, worked out from the two images: per block, whether its bytes differ
/// (beyond the end of `from`, it reads as zeros), merged into extents.
fn expected_diff(from: &[Vec<u8>], to: &[Vec<u8>]) -> Vec<super::ChangedExtent> {
    let zero = vec![0u8; 4096];
    let mut out: Vec<super::ChangedExtent> = Vec::new();
    for (b, block) in to.iter().enumerate() {
        let old = from.get(b).unwrap_or(&zero);
        if old == block {
            continue;
        }
        let z = block.iter().all(|&x| x == 0);
        let offset = b as u64 * 4096;
        match out.last_mut() {
            Some(e) if e.zero == z && e.offset + e.length == offset => e.length += 4096,
            _ => out.push(super::ChangedExtent {
                offset,
                length: 4096,
                zero: z,
            }),
        }
    }
    out
}

/// `diff` between every pair of points of one history (snapshots, the live VDI, across a
/// resize that adds a map level) says exactly which blocks' contents differ.
#[test]
fn diff_matches_the_images() {
    for seed in 0..6u64 {
        let mut rng = SmallRng::seed_from_u64(seed);
        let s = new_store(Arc::new(MemDevice::new(96 << 20)));
        // 100 blocks: one leaf level under the root; the resize below adds a level.
        s.create_vdi("v", 100 * 4096).unwrap();
        let mut points = vec![];
        let mut blocks = 100u64;
        for round in 0..8 {
            if round == 4 {
                blocks = 300;
                s.resize("v", blocks * 4096).unwrap();
            }
            let d = s.open_vdi("v", true).unwrap();
            for _ in 0..rng.random_range(1..40) {
                let b = rng.random_range(0..blocks);
                let n = rng.random_range(1..6).min(blocks - b);
                match rng.random_range(0..10) {
                    0 => d.discard(b * 4096, n * 4096).unwrap(),
                    1 => d
                        .write_zeroes(b * 4096, n * 4096, rng.random(), false)
                        .unwrap(),
                    // Rewriting a block with what it holds changes nothing.
                    2 => {
                        let mut buf = vec![0u8; (n * 4096) as usize];
                        d.read(&mut buf, b * 4096).unwrap();
                        d.write(&buf, b * 4096, false).unwrap();
                    }
                    _ => {
                        let fill = rng.random_range(1..=255u8);
                        d.write(&vec![fill; (n * 4096) as usize], b * 4096, false)
                            .unwrap();
                    }
                }
            }
            drop(d);
            let snap = format!("s{round}");
            s.snapshot("v", &snap).unwrap();
            points.push(format!("v@{snap}"));
            if round == 5 {
                // A checkpoint in the middle: clean nodes and dirty ones both.
                s.flush().unwrap();
            }
        }
        points.push("v".into());
        let images: Vec<_> = points.iter().map(|p| image_blocks(&s, p)).collect();
        for (i, a) in points.iter().enumerate() {
            for (j, b) in points.iter().enumerate() {
                let r = s.diff(a, b).unwrap();
                let want = expected_diff(&images[i], &images[j]);
                assert_eq!(r.extents, want, "seed {seed}: diff {a} {b}");
                assert_eq!(r.changed_bytes, want.iter().map(|e| e.length).sum::<u64>());
                assert_eq!(r.size, images[j].len() as u64 * 4096);
            }
        }
        assert!(matches!(
            s.diff("v@nope", "v"),
            Err(StoreError::NotFound(_))
        ));
    }
}

/// The walk skips what two points share: one changed block in a 1 TiB VDI costs the nodes on
/// its path, whatever else the VDI holds.
#[test]
fn diff_costs_what_changed() {
    let s = new_store(Arc::new(MemDevice::new(256 << 20)));
    s.create_vdi("big", 1 << 40).unwrap();
    let d = s.open_vdi("big", true).unwrap();
    for i in 0..2000u64 {
        d.write(&[7u8; 4096], i * 134_217_728 + i * 4096, false)
            .unwrap();
    }
    s.snapshot("big", "a").unwrap();
    let same = s.diff("big@a", "big").unwrap();
    assert_eq!((same.extents.len(), same.nodes_visited), (0, 0));
    d.write(&[8u8; 4096], 5 << 30, false).unwrap();
    s.flush().unwrap();
    let one = s.diff("big@a", "big").unwrap();
    assert_eq!(
        one.extents,
        vec![super::ChangedExtent {
            offset: 5 << 30,
            length: 4096,
            zero: false
        }]
    );
    // Height 4 (128^4 blocks = 1 TiB): at most the four nodes on the path, on each side.
    assert!(one.nodes_visited <= 8, "visited {}", one.nodes_visited);
}

#[test]
fn rollback_reads_the_snapshot_and_keeps_history() {
    let dev: Arc<dyn Device> = Arc::new(MemDevice::new(64 << 20));
    let s = new_store(dev.clone());
    s.create_vdi("a", 1 << 20).unwrap();
    let d = s.open_vdi("a", true).unwrap();
    d.write(&[1u8; 8192], 0, false).unwrap();
    drop(d);
    s.snapshot("a", "s1").unwrap();
    let d = s.open_vdi("a", true).unwrap();
    d.write(&[2u8; 4096], 4096, false).unwrap();
    d.write(&[3u8; 4096], 65536, false).unwrap();
    drop(d);
    s.snapshot("a", "s2").unwrap();
    s.resize("a", 2 << 20).unwrap();
    let d = s.open_vdi("a", true).unwrap();
    d.write(&[4u8; 4096], (1 << 20) + 4096, false).unwrap();

    // Open: refused, unless forced; a forced rollback detaches the open handle.
    assert!(matches!(
        s.rollback("a@s1", false),
        Err(StoreError::Busy(_))
    ));
    assert!(matches!(
        s.rollback("a", false),
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        s.rollback("a@nope", false),
        Err(StoreError::NotFound(_))
    ));
    let r = s.rollback("a@s1", true).unwrap();
    assert_eq!((r.detached, r.size), (1, 1 << 20));
    let mut buf = vec![0u8; 4096];
    assert!(matches!(d.read(&mut buf, 0), Err(StoreError::Detached(_))));
    assert!(matches!(
        d.write(&buf, 0, false),
        Err(StoreError::Detached(_))
    ));
    drop(d);

    let image = |s: &Arc<Store>, name: &str| {
        let d = s.open_vdi(name, false).unwrap();
        let mut b = vec![0u8; d.size() as usize];
        d.read(&mut b, 0).unwrap();
        b
    };
    let mut s1 = vec![0u8; 1 << 20];
    s1[..8192].fill(1);
    assert_eq!(image(&s, "a"), s1, "the VDI reads exactly the snapshot");
    assert_eq!(image(&s, "a@s1"), s1);
    let mut s2 = s1.clone();
    s2[4096..8192].fill(2);
    s2[65536..65536 + 4096].fill(3);
    assert_eq!(image(&s, "a@s2"), s2, "later snapshots stay");

    // The VDI is writable afterwards without touching the snapshot; rolling forward works.
    let d = s.open_vdi("a", true).unwrap();
    d.write(&[9u8; 4096], 0, false).unwrap();
    drop(d);
    assert_eq!(image(&s, "a@s1"), s1);
    s.rollback("a@s2", false).unwrap();
    assert_eq!(image(&s, "a"), s2);
    assert_clean(&s);
    s.gc(&mut |_| {}).unwrap();
    assert_clean(&s);

    // It survives a restart (checkpointed or replayed from the log).
    s.rollback("a@s1", false).unwrap();
    drop(s);
    let s = Store::open_device(dev, small_opts()).unwrap();
    assert_eq!(image(&s, "a"), s1);
    assert_clean(&s);
}

#[test]
fn an_import_interrupted_leaves_nothing_after_reopen() {
    let dev: Arc<dyn Device> = Arc::new(MemDevice::new(64 << 20));
    let s = new_store(dev.clone());
    let staged = s.create_staged("img", 1 << 20).unwrap();
    let d = s.open_vdi(staged.staging_name(), true).unwrap();
    d.write(&[5u8; 4096], 0, false).unwrap();
    drop(d);
    assert!(s.list().unwrap().is_empty(), "not listed while being made");
    assert!(matches!(
        s.create_staged("img", 1 << 20),
        Err(StoreError::Busy(_))
    ));
    s.flush().unwrap();
    // A crash here: the process goes away without publishing or deleting it.
    std::mem::forget(staged);
    drop(s);
    let s = Store::open_device(dev.clone(), small_opts()).unwrap();
    assert!(s.list().unwrap().is_empty());
    assert!(s.stat(&format!("{}img", super::STAGING_PREFIX)).is_err());
    s.gc(&mut |_| {}).unwrap();
    assert_eq!(s.df().unwrap().vdis, 0);
    assert_clean(&s);
    // Published, it appears under its name with its contents.
    let staged = s.create_staged("img", 1 << 20).unwrap();
    let d = s.open_vdi(staged.staging_name(), true).unwrap();
    d.write(&[6u8; 4096], 0, false).unwrap();
    drop(d);
    staged.publish().unwrap();
    let names: Vec<String> = s.list().unwrap().into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["img"]);
    drop(s);
    let s = Store::open_device(dev, small_opts()).unwrap();
    let d = s.open_vdi("img", false).unwrap();
    let mut b = vec![0u8; 4096];
    d.read(&mut b, 0).unwrap();
    assert_eq!(b, vec![6u8; 4096]);
}

/// Reports that walk maps (`df`, `vdi info`, `list -o used`) while writers dirty them and
/// checkpoints cut and evict: every walk must start from the live map, never a copied root.
#[test]
fn reports_walk_maps_while_checkpoints_run() {
    let dev: Arc<dyn Device> = Arc::new(MemDevice::new(256 << 20));
    let len = dev.len();
    Store::format(&*dev, len).unwrap();
    let s = Store::open_device(
        dev,
        StoreOptions {
            checkpoint_interval: Some(std::time::Duration::from_millis(5)),
            ..small_opts()
        },
    )
    .unwrap();
    for name in ["a", "b"] {
        s.create_vdi(name, 64 << 20).unwrap();
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|name| {
            let (s, stop) = (s.clone(), stop.clone());
            std::thread::spawn(move || {
                let d = s.open_vdi(name, true).unwrap();
                let mut rng = SmallRng::seed_from_u64(name.len() as u64);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let block = rng.random_range(0..(64u64 << 20) / 4096);
                    d.write(&[rng.random::<u8>() | 1; 4096], block * 4096, false)
                        .unwrap();
                }
            })
        })
        .collect();
    let usage = super::ListFilter {
        usage: true,
        ..Default::default()
    };
    let until = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut rounds = 0;
    while std::time::Instant::now() < until {
        s.df().unwrap();
        s.info("a").unwrap();
        s.list_filtered(&usage).unwrap();
        rounds += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    assert!(rounds > 10, "{rounds} rounds");
}

#[test]
fn schedules_are_kept_across_restarts_and_checked() {
    let dev: Arc<dyn Device> = Arc::new(MemDevice::new(64 << 20));
    let s = new_store(dev.clone());
    let hourly = Schedule {
        every_secs: 3600,
        keep: vec![KeepRule {
            every_secs: 3600,
            for_secs: 86400,
        }],
    };
    let fast = Schedule {
        every_secs: 10,
        keep: vec![
            KeepRule {
                every_secs: 10,
                for_secs: 3600,
            },
            KeepRule {
                every_secs: 60,
                for_secs: 86400,
            },
        ],
    };
    s.set_schedule("vm-*", &hourly).unwrap();
    s.set_schedule("db", &fast).unwrap();
    s.set_schedule("db", &hourly).unwrap();
    s.set_schedule("web?", &fast).unwrap();
    s.remove_schedule("web?").unwrap();
    assert!(matches!(
        s.remove_schedule("web?"),
        Err(StoreError::NoSchedule(_))
    ));
    for bad in ["", "a@b", "-x", "x y", &"n".repeat(201)] {
        assert!(
            matches!(s.set_schedule(bad, &hourly), Err(StoreError::Invalid(_))),
            "{bad:?}"
        );
    }
    let mut broken = hourly.clone();
    broken.keep[0].for_secs = 10;
    assert!(matches!(
        s.set_schedule("x", &broken),
        Err(StoreError::Invalid(_))
    ));
    let want = vec![("db".to_string(), hourly.clone()), ("vm-*".into(), hourly)];
    assert_eq!(s.schedules().unwrap(), want);
    assert_clean(&s);

    // Replayed from the log (no checkpoint since), then checkpointed and reopened.
    drop(s);
    let s = Store::open_device(dev.clone(), small_opts()).unwrap();
    assert_eq!(s.schedules().unwrap(), want);
    assert_clean(&s);
    s.close().unwrap();
    let s = Store::open_device(dev, small_opts()).unwrap();
    assert_eq!(s.schedules().unwrap(), want);
}
