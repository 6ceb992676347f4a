//! Send and receive against the store: round trips, and receives cut short by power cuts.

use std::sync::Arc;

use rand::{rngs::SmallRng, Rng, SeedableRng};

use super::{recv, send};
use crate::store::{
    device::{CrashDevice, Device, MemDevice},
    Store, StoreOptions,
};

fn opts() -> StoreOptions {
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

fn store(dev: Arc<dyn Device>) -> Arc<Store> {
    Store::format(&*dev, dev.len()).unwrap();
    Store::open_device(dev, opts()).unwrap()
}

fn image(s: &Arc<Store>, name: &str) -> Vec<u8> {
    let d = s.open_vdi(name, false).unwrap();
    let mut b = vec![0u8; d.size() as usize];
    d.read(&mut b, 0).unwrap();
    b
}

fn ok(_: u64, _: u64) -> crate::store::StoreResult<()> {
    Ok(())
}

/// A sender with `vm@a` and `vm@b` (b: some blocks rewritten, some zeroed, grown); returns
/// the full stream of `vm@a`, the incremental stream a→b, and both images.
fn streams() -> (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>) {
    let s = store(Arc::new(MemDevice::new(64 << 20)));
    let mut rng = SmallRng::seed_from_u64(5);
    s.create_vdi("vm", 2 << 20).unwrap();
    let d = s.open_vdi("vm", true).unwrap();
    let data: Vec<u8> = (0..(1 << 20) + 3000).map(|_| rng.random()).collect();
    d.write(&data, 8192, false).unwrap();
    drop(d);
    s.snapshot("vm", "a").unwrap();
    let d = s.open_vdi("vm", true).unwrap();
    d.write(&[9u8; 20000], 300_000, false).unwrap();
    d.write_zeroes(600_000, 100_000, false, false).unwrap();
    drop(d);
    s.resize("vm", 3 << 20).unwrap();
    let d = s.open_vdi("vm", true).unwrap();
    d.write(&[4u8; 4096], (2 << 20) + 4096, false).unwrap();
    drop(d);
    s.snapshot("vm", "b").unwrap();
    let (mut full, mut inc) = (Vec::new(), Vec::new());
    send(&s, "vm@a", None, &mut full, &mut ok).unwrap();
    let r = send(&s, "vm@b", Some("vm@a"), &mut inc, &mut ok).unwrap();
    assert!(r.data_bytes < 40_000, "{r:?}");
    (full, inc, image(&s, "vm@a"), image(&s, "vm@b"))
}

#[test]
fn full_and_incremental_round_trip() {
    let (full, inc, a, b) = streams();
    let r = store(Arc::new(MemDevice::new(64 << 20)));
    // The base must be there first.
    assert!(recv(&r, "nope", &mut &inc[..], &mut ok).is_err());
    recv(&r, "copy", &mut &full[..], &mut ok).unwrap();
    assert_eq!(image(&r, "copy"), a);
    assert_eq!(image(&r, "copy@a"), a);
    let rep = recv(&r, "copy2", &mut &inc[..], &mut ok).unwrap();
    assert_eq!(rep.base.as_deref(), Some("copy@a"));
    assert_eq!(image(&r, "copy2@b"), b);
    // A received snapshot keeps its identity: it can be the base of the next stream here.
    assert_eq!(
        r.snapshot_identity("copy@a").unwrap(),
        r.snapshot_identity("copy@a").unwrap()
    );
    let names: Vec<String> = r.list().unwrap().into_iter().map(|v| v.name).collect();
    // Each VDI is listed with its snapshots after it.
    assert_eq!(names, ["copy", "copy@a", "copy2", "copy2@b"]);
    let c = r.check(true, &mut |_| {}).unwrap();
    assert!(c.ok, "{c:#?}");
}

#[test]
fn damaged_streams_leave_nothing() {
    let (full, _, _, _) = streams();
    let r = store(Arc::new(MemDevice::new(64 << 20)));
    let mut rng = SmallRng::seed_from_u64(9);
    for i in 0..40 {
        let mut bad = full.clone();
        if i % 2 == 0 {
            bad.truncate(rng.random_range(0..full.len()));
        } else {
            let at = rng.random_range(0..full.len());
            bad[at] ^= 1 << rng.random_range(0..8);
        }
        assert!(recv(&r, "x", &mut &bad[..], &mut ok).is_err(), "case {i}");
        assert!(r.list().unwrap().is_empty(), "case {i}");
    }
    r.gc(&mut |_| {}).unwrap();
    assert_eq!(r.df().unwrap().vdis, 0);
    let c = r.check(true, &mut |_| {}).unwrap();
    assert!(c.ok, "{c:#?}");
}

/// Power cut at any point of a receive: afterwards the new VDI is either absent or whole.
#[test]
fn power_cut_during_recv() {
    let (full, inc, a, b) = streams();
    let run = |cut: Option<u64>, seed: u64| -> u64 {
        let dev = Arc::new(CrashDevice::new(32 << 20));
        Store::format(&*dev, 32 << 20).unwrap();
        dev.sync().unwrap();
        let s = Store::open_device(dev.clone(), opts()).unwrap();
        recv(&s, "copy", &mut &full[..], &mut ok).unwrap();
        let start = dev.ops();
        if let Some(c) = cut {
            dev.cut_after(c);
        }
        let done = recv(&s, "next", &mut &inc[..], &mut ok).is_ok();
        let ops = dev.ops() - start;
        drop(s);
        let s = Store::open_device(Arc::new(dev.after_crash(seed)), opts())
            .unwrap_or_else(|e| panic!("cut {cut:?}: reopen: {e}"));
        let names: Vec<String> = s.list().unwrap().into_iter().map(|v| v.name).collect();
        assert_eq!(image(&s, "copy@a"), a, "cut {cut:?}");
        if names.contains(&"next".to_string()) {
            assert_eq!(image(&s, "next@b"), b, "cut {cut:?}: half a receive");
            assert_eq!(image(&s, "next"), b, "cut {cut:?}");
        } else {
            assert!(!done, "cut {cut:?}: a receive that returned is gone");
            assert_eq!(names, ["copy", "copy@a"], "cut {cut:?}");
        }
        s.gc(&mut |_| {}).unwrap();
        let c = s.check(true, &mut |_| {}).unwrap();
        assert!(c.ok, "cut {cut:?}: {c:#?}");
        ops
    };
    let total = run(None, 0);
    assert!(total > 10, "{total} device operations");
    for cut in 0..total {
        run(Some(cut), cut * 31 + 7);
    }
}
