//! The `scale` section's driver (bench/pxbench/sec_scale.py): fills one store with many forks
//! and snapshots through the store library (a control-socket request per entry would take hours
//! at a million), and times a sample of each registry operation as the registry grows.
//!
//! ```text
//! scale --store PATH --stages 10000,100000,1000000 [--samples 200] [--store-size BYTES]
//! ```
//!
//! At each stage the store holds that many entries: 90 % forks of `template@base` (VDIs named
//! `vm-NNNNNNNN`) and 10 % snapshots of the one VDI `deep` (so 100,000 snapshots of one VDI at
//! a million). Then it times `--samples` of each operation, undoing what they made, and prints
//! one JSON line per stage (latencies in microseconds). The store is left populated for the
//! daemon half of the section.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use parallax::store::{ListFilter, Store, StoreOptions};

struct Args {
    store: PathBuf,
    stages: Vec<u64>,
    samples: usize,
    store_size: u64,
}

fn parse() -> Args {
    let mut a = Args {
        store: PathBuf::new(),
        stages: vec![10_000, 100_000, 1_000_000],
        samples: 200,
        store_size: 16 << 30,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--store" => a.store = v.into(),
            "--stages" => a.stages = v.split(',').map(|s| s.parse().expect("stage")).collect(),
            "--samples" => a.samples = v.parse().expect("samples"),
            "--store-size" => a.store_size = v.parse().expect("store size"),
            _ => panic!("unknown option {k}"),
        }
    }
    assert!(!a.store.as_os_str().is_empty(), "--store PATH is required");
    a
}

/// Latency percentiles of a sample, in microseconds.
fn summary(mut d: Vec<Duration>) -> serde_json::Value {
    d.sort();
    let us = |q: f64| {
        let i = ((d.len() as f64 - 1.0) * q).round() as usize;
        d.get(i).map_or(0.0, |x| x.as_secs_f64() * 1e6)
    };
    serde_json::json!({ "n": d.len(), "p50_us": us(0.5), "p99_us": us(0.99), "max_us": us(1.0) })
}

fn time<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let t = Instant::now();
    let r = f();
    (t.elapsed(), r)
}

/// Blocks in use (data, maps, registry, log), from the allocator.
fn used_blocks(s: &Store) -> u64 {
    s.geometry().data_blocks() - s.free_blocks()
}

fn fork_name(i: u64) -> String {
    format!("vm-{i:08}")
}

fn main() {
    let a = parse();
    let opts = StoreOptions {
        checkpoint_interval: Some(Duration::from_secs(1)),
        ..StoreOptions::default()
    };
    let s: Arc<Store> = Store::create(&a.store, Some(a.store_size), opts).expect("create store");
    // A template with some data, so that forks share a real map.
    s.create_vdi("template", 1 << 30).unwrap();
    {
        let d = s.open_vdi("template", true).unwrap();
        let buf = vec![0x5a; 4096];
        for i in 0..64u64 {
            d.write(&buf, i * (16 << 20), false).unwrap();
        }
    }
    s.snapshot("template", "base").unwrap();
    s.create_vdi("deep", 1 << 30).unwrap();
    s.checkpoint().unwrap();

    let (mut forks, mut snaps) = (0u64, 0u64);
    for &stage in &a.stages {
        let want_snaps = stage / 10;
        let want_forks = stage - want_snaps;
        s.checkpoint().unwrap();
        let used0 = used_blocks(&s);
        let forks0 = forks;
        let (populate, ()) = time(|| {
            while forks < want_forks {
                s.fork("template@base", &fork_name(forks)).unwrap();
                forks += 1;
            }
        });
        s.checkpoint().unwrap();
        let used1 = used_blocks(&s);
        let (populate_snaps, ()) = time(|| {
            while snaps < want_snaps {
                s.snapshot("deep", &format!("s{snaps:08}")).unwrap();
                snaps += 1;
            }
        });
        s.checkpoint().unwrap();
        let ops = measure(&s, a.samples, forks, stage);
        let line = serde_json::json!({
            "entries": stage,
            "forks": forks,
            "snapshots_of_one_vdi": snaps,
            "populate_s": populate.as_secs_f64(),
            "populate_snapshots_s": populate_snaps.as_secs_f64(),
            "used_bytes": used_blocks(&s) * 4096,
            // What the store grew by per fork made in this stage: registry entries and
            // their share of the B+tree (forks of one snapshot share its whole map).
            "meta_bytes_per_fork": (used1.saturating_sub(used0) * 4096) as f64
                / (forks - forks0).max(1) as f64,
            "ops": ops,
        });
        println!("{line}");
    }
    s.close().unwrap();
}

/// Times `n` of each operation on a store holding `forks` forks (`entries` entries).
fn measure(s: &Arc<Store>, n: usize, forks: u64, entries: u64) -> serde_json::Value {
    // Spread the sample over the registry (a fixed stride, so runs compare).
    let pick = |i: usize| fork_name((i as u64 * 7919) % forks);
    let tag = entries;
    let mut out = serde_json::Map::new();
    let mut run = |name: &str, f: &mut dyn FnMut(usize)| {
        let d: Vec<Duration> = (0..n).map(|i| time(|| f(i)).0).collect();
        out.insert(name.into(), summary(d));
    };
    run("create", &mut |i| {
        s.create_vdi(&format!("c{tag}-{i}"), 1 << 30).unwrap()
    });
    run("fork", &mut |i| {
        s.fork("template@base", &format!("f{tag}-{i}")).unwrap()
    });
    run("snapshot", &mut |i| {
        s.snapshot("deep", &format!("x{tag}-{i}")).unwrap()
    });
    run("snapshot_fork", &mut |i| {
        s.snapshot(&pick(i), &format!("x{tag}-{i}")).unwrap()
    });
    run("stat", &mut |i| drop(s.stat(&pick(i)).unwrap()));
    run("info_vdi", &mut |i| drop(s.info(&pick(i)).unwrap()));
    run("info_snapshot", &mut |i| {
        drop(s.info(&format!("{}@x{tag}-{i}", pick(i))).unwrap())
    });
    run("open", &mut |i| drop(s.open_vdi(&pick(i), true).unwrap()));
    run("subtree", &mut |i| drop(s.subtree(&pick(i)).unwrap()));
    run("list_prefix", &mut |i| {
        let p = &pick(i)[..10]; // vm-0000012: up to 10 entries
        drop(s.list_filtered(&ListFilter {
            prefix: Some(p.into()),
            ..ListFilter::default()
        }))
    });
    run("delete", &mut |i| {
        drop(s.delete(&format!("c{tag}-{i}"), false).unwrap())
    });
    run("delete_fork", &mut |i| {
        drop(s.delete(&format!("f{tag}-{i}"), false).unwrap())
    });
    run("delete_snapshot", &mut |i| {
        drop(s.delete(&format!("deep@x{tag}-{i}"), false).unwrap())
    });
    run("delete_snapshot_fork", &mut |i| {
        drop(s.delete(&format!("{}@x{tag}-{i}", pick(i)), false).unwrap())
    });
    // Whole-registry operations, once each: the full list (and when its first entry came),
    // and the VDI/snapshot counts the metrics endpoint reports (counted once, then kept).
    let t = Instant::now();
    let (mut first, mut count) = (None, 0u64);
    s.list_each(&ListFilter::default(), &mut |_| {
        first.get_or_insert_with(|| t.elapsed());
        count += 1;
        Ok(())
    })
    .unwrap();
    out.insert(
        "list_all".into(),
        serde_json::json!({
            "n": 1,
            "total_us": t.elapsed().as_secs_f64() * 1e6,
            "first_us": first.unwrap_or_default().as_secs_f64() * 1e6,
            "entries": count,
        }),
    );
    let (d, _) = time(|| s.counts().unwrap());
    out.insert("counts".into(), summary(vec![d]));
    serde_json::Value::Object(out)
}
