//! Opening and using a store whose metadata blocks hold fuzzer-chosen bytes.
//!
//! A small valid store is built once (VDIs with data, snapshots, a fork, a sparse 1 TiB VDI,
//! enough VDIs for a two-level registry, a deleted VDI whose nodes wait on the orphan list,
//! blocks shared by dedup and so a dedup index, and changes after the last checkpoint that
//! only the intent log holds, a write that dedup shared among them).
//! Each input then overwrites bytes of its metadata blocks — superblock, commit slots, group
//! headers, refcount pages, map nodes, registry nodes, dedup index nodes, orphan blocks, log
//! blocks — and the store is opened and used: list, stat, info, tree, df, reads and block
//! status of every VDI, check, and (if the input asks) writes, a snapshot, a delete, gc, a
//! dedup pass and a reopen. Errors are fine; a panic,
//! a hang or an absurd allocation is a bug.
//!
//! Checksums would stop almost every mutation at the first read, so by default the harness
//! *re-seals* what it changed: framed blocks get their checksum recomputed, and a changed block
//! that a pointer names gets its new hash written into that pointer (at the place the valid
//! image had it), up to the commit record. Then the decoders behind the checksums see the
//! fuzzer's bytes. Flag bit 0 turns re-sealing off, to fuzz the checksum paths themselves.
//!
//! Input: `[flags u8]` then patches `[target u8][offset u16 LE][len u8][len bytes]`: `target`
//! picks a metadata block (modulo their number), `offset` is taken modulo the block size.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, OnceLock},
};

use parallax::store::{
    device::{Device, MemDevice},
    format::{
        hash24, seal_frame, Frame, BLOCK_SIZE, BLOCK_SIZE_U64, GROUP_BASE, GROUP_DATA_OFFSET,
        HASH_LEN,
    },
    Store, StoreOptions,
};

const STORE_BYTES: u64 = 16 << 20;
/// Every data block the builder writes starts with this, so data is told from metadata.
const DATA_TAG: &[u8; 8] = b"FUZZDATA";

/// The valid image, and what the harness knows about its metadata.
struct Image {
    /// Every non-zero block.
    blocks: BTreeMap<u64, Box<[u8; BLOCK_SIZE]>>,
    /// Metadata blocks, in an order where every block comes before the blocks pointing at it.
    targets: Vec<u64>,
    /// For each hash-referenced block: (parent block, byte offset of the hash in the parent).
    parents: BTreeMap<u64, Vec<(u64, usize)>>,
    /// Framed blocks (re-sealed after a change).
    framed: BTreeSet<u64>,
}

fn options() -> StoreOptions {
    StoreOptions {
        node_cache_nodes: 32,
        rc_cache_pages: 4,
        dedup_leaf_cache: 4,
        orphans_per_commit: 1,
        max_dirty_nodes: 64,
        checkpoint_interval: None,
        give_back_after: std::time::Duration::ZERO,
    }
}

fn tagged(n: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE];
    b[..8].copy_from_slice(DATA_TAG);
    b[8..16].copy_from_slice(&n.to_le_bytes());
    for (i, x) in b[16..].iter_mut().enumerate() {
        *x = (n as usize * 31 + i) as u8;
    }
    b
}

fn build() -> Image {
    let dev: Arc<dyn Device> = Arc::new(MemDevice::new(STORE_BYTES));
    Store::format(&*dev, STORE_BYTES).unwrap();
    let s = Store::open_device(dev.clone(), options()).unwrap();
    s.create_vdi("a", 4 << 20).unwrap();
    let a = s.open_vdi("a", true).unwrap();
    for i in 0..24u64 {
        a.write(&tagged(i), i * 37 % 1024 * BLOCK_SIZE_U64, false)
            .unwrap();
    }
    // Copies of blocks already there: dedup shares them.
    for i in 0..4u64 {
        a.write(&tagged(i), (900 + i) * BLOCK_SIZE_U64, false)
            .unwrap();
    }
    s.snapshot("a", "s1").unwrap();
    a.write(&tagged(100), 0, false).unwrap();
    s.fork("a@s1", "b").unwrap();
    let b = s.open_vdi("b", true).unwrap();
    b.write(&tagged(200), 5 * BLOCK_SIZE_U64, false).unwrap();
    s.create_vdi("big", 1 << 40).unwrap();
    let big = s.open_vdi("big", true).unwrap();
    big.write(&tagged(300), 0, false).unwrap();
    big.write(&tagged(301), (1 << 40) - BLOCK_SIZE_U64, false)
        .unwrap();
    for i in 0..40 {
        s.create_vdi(
            &format!("vm-{i:03}-with-a-rather-long-name-to-fill-the-registry"),
            1 << 20,
        )
        .unwrap();
    }
    s.create_vdi("doomed", 8 << 20).unwrap();
    let d = s.open_vdi("doomed", true).unwrap();
    for i in 0..4 {
        d.write(&tagged(400 + i), i * (1 << 20), false).unwrap();
    }
    drop((a, b, big, d));
    s.flush().unwrap();
    s.delete("doomed", false).unwrap();
    s.close().unwrap();
    drop(s);
    // A live intent log: changes flushed after the last checkpoint, then a crash (no close),
    // so that opening the image replays them.
    let s = Store::open_device(dev.clone(), options()).unwrap();
    s.flush().unwrap();
    let b = s.open_vdi("b", true).unwrap();
    b.write(&tagged(500), 6 * BLOCK_SIZE_U64, false).unwrap();
    s.flush().unwrap();
    s.snapshot("b", "s2").unwrap();
    b.write(&tagged(501), 7 * BLOCK_SIZE_U64, false).unwrap();
    // The same data as block 0 of `a`: shared by inline dedup, a Share entry in the log.
    b.write(&tagged(0), 8 * BLOCK_SIZE_U64, false).unwrap();
    b.discard(0, BLOCK_SIZE_U64).unwrap();
    drop(b);
    s.rename("big", "huge").unwrap();
    drop(s);

    let mut blocks = BTreeMap::new();
    for addr in 0..STORE_BYTES / BLOCK_SIZE_U64 {
        let mut b = Box::new([0u8; BLOCK_SIZE]);
        dev.read_at(&mut b[..], addr * BLOCK_SIZE_U64).unwrap();
        if b.iter().any(|&x| x != 0) {
            blocks.insert(addr, b);
        }
    }
    let fixed_end = GROUP_BASE + GROUP_DATA_OFFSET;
    let framed: BTreeSet<u64> = blocks
        .iter()
        .filter(|(&a, b)| a < fixed_end || &b[..8] == b"PXORPHAN" || &b[..8] == b"PXLOGBLK")
        .map(|(&a, _)| a)
        .collect();
    let meta: Vec<u64> = blocks
        .iter()
        .filter(|(&a, b)| a < fixed_end || &b[..8] != DATA_TAG)
        .map(|(&a, _)| a)
        .collect();
    // Who points at whom: a pointer holds the first 24 bytes of its target's blake3.
    let by_hash: HashMap<[u8; HASH_LEN], u64> = meta
        .iter()
        .filter(|&&a| a >= fixed_end)
        .map(|&a| (hash24(&blocks[&a][..]), a))
        .collect();
    let mut parents: BTreeMap<u64, Vec<(u64, usize)>> = BTreeMap::new();
    for &parent in &meta {
        let pb = &blocks[&parent];
        for at in 0..=BLOCK_SIZE - HASH_LEN {
            if let Some(&child) = by_hash.get(&pb[at..at + HASH_LEN]) {
                parents.entry(child).or_default().push((parent, at));
            }
        }
    }
    // Children before parents: a block's depth is one more than its deepest child's.
    let mut depth: BTreeMap<u64, usize> = meta.iter().map(|&a| (a, 0)).collect();
    for _ in 0..meta.len() {
        for (&child, ps) in &parents {
            let d = depth[&child] + 1;
            for &(p, _) in ps {
                let e = depth.get_mut(&p).unwrap();
                *e = (*e).max(d);
            }
        }
    }
    let mut targets = meta.clone();
    targets.sort_by_key(|a| (depth[a], *a));
    assert!(targets.len() > 20, "the image has metadata of every kind");
    Image {
        blocks,
        targets,
        parents,
        framed,
    }
}

fn image() -> &'static Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE.get_or_init(build)
}

/// Recomputes the checksum of a framed block, keeping whatever header bytes it now has.
fn reseal(b: &mut [u8; BLOCK_SIZE]) {
    let f = Frame {
        magic: b[0..8].try_into().unwrap(),
        gen: u64::from_le_bytes(b[8..16].try_into().unwrap()),
        addr: u64::from_le_bytes(b[16..24].try_into().unwrap()),
        aux: u64::from_le_bytes(b[24..32].try_into().unwrap()),
    };
    seal_frame(&mut b[..], f);
}

/// Reads a bounded sample of a disk: the start, the middle, the end, and block status.
fn sample(s: &Arc<Store>, name: &str) {
    let Ok(d) = s.open_vdi(name, false) else {
        return;
    };
    let size = d.size();
    let mut buf = vec![0u8; 64 << 10];
    for at in [0, size / 2, size.saturating_sub(buf.len() as u64)] {
        let n = (size - at.min(size)).min(buf.len() as u64) as usize;
        let _ = d.read(&mut buf[..n], at);
    }
    let _ = d.read(&mut buf[..100], 3);
    if size > 0 {
        let _ = d.extents(0, size, 64);
    }
}

fn exercise(dev: &Arc<MemDevice>, writes: bool) {
    let Ok(s) = Store::open_device(dev.clone(), options()) else {
        return;
    };
    let list = s.list().unwrap_or_default();
    for v in list.iter().take(8) {
        let _ = s.stat(&v.name);
        let _ = s.info(&v.name);
        sample(&s, &v.name);
    }
    let _ = s.tree();
    let _ = s.df();
    let _ = s.check(true, &mut |_| {});
    if !writes {
        return;
    }
    for v in list.iter().take(3) {
        if let Ok(d) = s.open_vdi(&v.name, true) {
            let _ = d.write(&[0x5a; 6000], 1000, false);
            let _ = d.discard(0, 8192);
            let _ = d.write_zeroes(BLOCK_SIZE_U64, 3 * BLOCK_SIZE_U64, false, false);
        }
    }
    let _ = s.create_vdi("new", 1 << 20);
    if let Some(v) = list.first() {
        let _ = s.snapshot(&v.name, "fz");
        let _ = s.fork(&format!("{}@fz", v.name), "fzfork");
    }
    if let Some(v) = list.last() {
        let _ = s.delete(&v.name, true);
    }
    let _ = s.gc(&mut |_| {});
    let _ = s.dedup_pass(&mut |_| {});
    let _ = s.flush();
    let _ = s.close();
    drop(s);
    if let Ok(s) = Store::open_device(dev.clone(), options()) {
        let _ = s.list();
        let _ = s.check(false, &mut |_| {});
    }
}

pub fn store_metadata(data: &[u8]) {
    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    let img = image();
    let mut blocks = img.blocks.clone();
    let mut changed = BTreeSet::new();
    while rest.len() >= 4 {
        let target = img.targets[rest[0] as usize % img.targets.len()];
        let offset = u16::from_le_bytes([rest[1], rest[2]]) as usize % BLOCK_SIZE;
        let len = (rest[3] as usize)
            .min(rest.len() - 4)
            .min(BLOCK_SIZE - offset);
        let b = blocks.get_mut(&target).unwrap();
        b[offset..offset + len].copy_from_slice(&rest[4..4 + len]);
        changed.insert(target);
        rest = &rest[4 + len..];
    }
    if flags & 1 == 0 {
        // Children first, so a parent's pointers are fixed before its own checksum is.
        for &addr in &img.targets {
            if !changed.contains(&addr) {
                continue;
            }
            let b = blocks.get_mut(&addr).unwrap();
            if img.framed.contains(&addr) {
                reseal(b);
            }
            let h = hash24(&b[..]);
            for &(parent, at) in img.parents.get(&addr).map(Vec::as_slice).unwrap_or(&[]) {
                blocks.get_mut(&parent).unwrap()[at..at + HASH_LEN].copy_from_slice(&h);
                changed.insert(parent);
            }
        }
    }
    let dev = Arc::new(MemDevice::new(STORE_BYTES));
    for (&addr, b) in &blocks {
        dev.write_at(&b[..], addr * BLOCK_SIZE_U64).unwrap();
    }
    exercise(&dev, flags & 2 != 0);
}
