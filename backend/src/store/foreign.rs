//! Snapshots read from outside their store: the root another reader needs to walk a snapshot's
//! map straight from the device, the reader itself, and the guard a store asks before its
//! snapshots go.
//!
//! A snapshot's map never changes while the snapshot exists, and every pointer carries the hash
//! of what it points at (FORMAT.md §4). So whoever knows a snapshot's root pointer can read the
//! snapshot from the device with no lock and no help from the store's owner, and cannot be
//! fooled: a node or block that is not what the root says (the snapshot was deleted and its
//! blocks were reused, or the root was read before the checkpoint that wrote it reached the
//! device) fails its checksum and is an error, never wrong data. Stores in a Ceph cluster fork
//! another store's snapshot this way, reading its blocks straight from RADOS
//! (`cluster/snapshots.rs`); a [`SnapshotGuard`] keeps the snapshot from going while they do.
//!
//! ```text
//!   store A (owner publishes)            store B (any host)
//!   snapshot S ── map_roots() ─► MapRoot ─► SnapshotMap over A's device ─► blocks(), read()
//!        ▲                                           (every node and block checked)
//!        └── delete/rename asks the SnapshotGuard first (B's hold keeps S)
//! ```

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{
    backing::RemoteBlock,
    device::Device,
    error::{StoreError, StoreResult},
    format::{hash24, Ptr, PtrKind, BLOCK_SIZE, BLOCK_SIZE_U64, MAX_HEIGHT, PTR_LEN},
    nodes::{NodeTable, UNSET},
    radix,
    registry::{is_hidden, Kind},
    store::Store,
};

/// Map nodes a [`SnapshotMap`] keeps in memory (4 MiB): a leaf maps 512 KiB, so a sequential
/// reader's path stays, and a random one's costs a node read per miss.
const NODES_KEPT: usize = 1024;

/// Where a snapshot's map starts: enough for a reader outside the store to walk it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapRoot {
    /// The root pointer, 32 bytes as the format stores them, in hex.
    pub root: String,
    /// Radix height of the map.
    pub height: u8,
    /// The snapshot's size in bytes.
    pub size: u64,
}

impl MapRoot {
    fn new(root: Ptr, height: u8, size: u64) -> MapRoot {
        let mut b = [0u8; PTR_LEN];
        root.encode(&mut b);
        MapRoot {
            root: b.iter().map(|x| format!("{x:02x}")).collect(),
            height,
            size,
        }
    }

    fn ptr(&self) -> StoreResult<Ptr> {
        let bad = || StoreError::Invalid(format!("not a map root: {}", self.root));
        if self.root.len() != 2 * PTR_LEN || !self.root.is_ascii() {
            return Err(bad());
        }
        let mut b = [0u8; PTR_LEN];
        for (i, byte) in b.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&self.root[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        let p = Ptr::decode(&b);
        match p.kind() {
            Ok(PtrKind::Block) if p.hash == UNSET => Err(bad()),
            Ok(_) => Ok(p),
            Err(_) => Err(bad()),
        }
    }
}

/// One snapshot's map, read from a device the reader does not own (another store's), with
/// every node and data block checked against the hash its pointer carries.
pub struct SnapshotMap {
    dev: Arc<dyn Device>,
    nodes: NodeTable,
    root: Ptr,
    height: u8,
    size: u64,
}

impl SnapshotMap {
    pub fn new(dev: Arc<dyn Device>, root: &MapRoot) -> StoreResult<SnapshotMap> {
        if root.height == 0 || root.height > MAX_HEIGHT {
            return Err(StoreError::Invalid(format!(
                "map root of height {}",
                root.height
            )));
        }
        Ok(SnapshotMap {
            dev,
            nodes: NodeTable::new(NODES_KEPT, 0),
            root: root.ptr()?,
            height: root.height,
            size: root.size,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The pointers of the blocks `offset..offset + len` (clipped to the size).
    fn resolve(&self, offset: u64, len: u64) -> StoreResult<Vec<Ptr>> {
        let end = (offset + len).min(self.size);
        let first = offset / BLOCK_SIZE_U64;
        let last = end.div_ceil(BLOCK_SIZE_U64);
        let mut out = Vec::new();
        if last > first {
            radix::resolve(
                &self.nodes,
                &*self.dev,
                self.root,
                self.height,
                first,
                last - first,
                &mut out,
            )?;
        }
        // Loaded nodes are never pinned: anything beyond the bound may go.
        self.nodes.checkpoint_written(0);
        Ok(out)
    }

    /// What each 4 KiB block of `offset..offset + len` (`offset` block aligned) holds.
    pub fn blocks(&self, offset: u64, len: u64) -> StoreResult<Vec<RemoteBlock>> {
        Ok(self
            .resolve(offset, len)?
            .into_iter()
            .map(|p| {
                if p.is_block() {
                    RemoteBlock::Hash(p.hash)
                } else {
                    RemoteBlock::Zero
                }
            })
            .collect())
    }

    /// Fills `buf` from `offset` (inside the size): blocks that are contiguous on the device
    /// in one read each, every one checked against its hash.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> StoreResult<()> {
        let end = offset + buf.len() as u64;
        if end > self.size {
            return Err(StoreError::Invalid(format!(
                "read of {}..{end} past the snapshot's {} bytes",
                offset, self.size
            )));
        }
        let first = offset / BLOCK_SIZE_U64;
        let ptrs = self.resolve(offset, buf.len() as u64)?;
        let mut blocks = vec![0u8; ptrs.len() * BLOCK_SIZE];
        let mut i = 0;
        while i < ptrs.len() {
            if !ptrs[i].is_block() {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < ptrs.len()
                && ptrs[j].is_block()
                && ptrs[j].addr() == ptrs[i].addr() + (j - i) as u64
            {
                j += 1;
            }
            let run = &mut blocks[i * BLOCK_SIZE..j * BLOCK_SIZE];
            self.dev.read_at(run, ptrs[i].addr() * BLOCK_SIZE_U64)?;
            for (k, b) in run.chunks(BLOCK_SIZE).enumerate() {
                if hash24(b) != ptrs[i + k].hash {
                    return Err(StoreError::Corrupt(format!(
                        "block {} of the snapshot (device block {}) fails its checksum",
                        first + (i + k) as u64,
                        ptrs[i + k].addr()
                    )));
                }
            }
            i = j;
        }
        let skip = (offset - first * BLOCK_SIZE_U64) as usize;
        buf.copy_from_slice(&blocks[skip..skip + buf.len()]);
        Ok(())
    }
}

/// What a store asks before it deletes or renames snapshots: something outside it (a fork in
/// another store reading them straight from the device) may still need them.
pub trait SnapshotGuard: Send + Sync {
    /// Runs `apply`, which deletes or renames `snapshots` (full names), unless something outside
    /// the store still reads one of them: then fails with [`StoreError::Busy`], saying what.
    /// Nothing may start reading them while `apply` runs.
    fn releasing(
        &self,
        store: &Store,
        snapshots: &[String],
        apply: &mut dyn FnMut() -> StoreResult<()>,
    ) -> StoreResult<()>;
}

impl Store {
    /// Gives the store the guard it asks before its snapshots go.
    pub fn set_snapshot_guard(&self, guard: Arc<dyn SnapshotGuard>) {
        *self.snapshot_guard.write() = Some(guard);
    }

    /// Runs `apply`, which deletes or renames the snapshots `snapshots` lists, through the
    /// guard if there is one (only then are they listed). `apply` is told which snapshots
    /// the guard let go (`None`: there is no guard).
    pub(super) fn guarded(
        &self,
        snapshots: impl FnOnce() -> StoreResult<Vec<String>>,
        apply: &mut dyn FnMut(Option<&[String]>) -> StoreResult<()>,
    ) -> StoreResult<()> {
        let Some(guard) = self.snapshot_guard.read().clone() else {
            return apply(None);
        };
        let names = snapshots()?;
        if names.is_empty() {
            return apply(Some(&names));
        }
        guard.releasing(self, &names, &mut || apply(Some(&names)))
    }

    /// The map roots of the snapshots a reader outside the store can walk, by full name: those
    /// whose root a checkpoint has hashed (a snapshot taken since the last checkpoint comes
    /// after the next), and that read through no backing of their own.
    pub fn map_roots(&self) -> StoreResult<Vec<(String, MapRoot)>> {
        let mut cat = self.catalog.lock();
        let mut out = Vec::new();
        for rec in self.all_records(&mut cat)? {
            if rec.kind != Kind::Snapshot
                || rec.backing.is_some()
                || (rec.root.is_block() && rec.root.hash == UNSET)
            {
                continue;
            }
            let name = self.full_name(&mut cat, &rec)?;
            if is_hidden(&name) {
                continue;
            }
            out.push((name, MapRoot::new(rec.root, rec.height, rec.size)));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use parking_lot::Mutex;
    use rand::{rngs::SmallRng, Rng, SeedableRng};

    use super::*;
    use crate::store::{
        device::{Device, MemDevice},
        tests::small_opts,
    };

    const SIZE: usize = 3 << 20;

    /// A store on `dev` with VDI `tpl` (random data, every fifth block zeros, the last 64
    /// blocks never written) and its snapshot `tpl@gold`, checkpointed; returns the image.
    fn template(dev: &Arc<dyn Device>) -> (Arc<Store>, Vec<u8>) {
        let len = dev.len();
        Store::format(&**dev, len).unwrap();
        let s = Store::open_device(dev.clone(), small_opts()).unwrap();
        s.create_vdi("tpl", SIZE as u64).unwrap();
        let mut img = vec![0u8; SIZE];
        let mut rng = SmallRng::seed_from_u64(7);
        let written = SIZE - 64 * BLOCK_SIZE;
        for (i, b) in img[..written].chunks_mut(BLOCK_SIZE).enumerate() {
            if i % 5 != 0 {
                rng.fill(b);
            }
        }
        let d = s.open_vdi("tpl", true).unwrap();
        d.write(&img[..written], 0, false).unwrap();
        drop(d);
        s.snapshot("tpl", "gold").unwrap();
        (s, img)
    }

    fn root_of(s: &Store, name: &str) -> Option<MapRoot> {
        s.map_roots()
            .unwrap()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, r)| r)
    }

    #[test]
    fn a_snapshot_reads_from_outside_its_store_as_inside_once_checkpointed() {
        let dev: Arc<dyn Device> = Arc::new(MemDevice::new(64 << 20));
        let (s, img) = template(&dev);
        // Its root is not on the device yet: not published.
        assert_eq!(root_of(&s, "tpl@gold"), None);
        s.checkpoint().unwrap();
        let root = root_of(&s, "tpl@gold").expect("published after a checkpoint");
        assert_eq!(root.size, SIZE as u64);
        // The VDI moves on; the snapshot does not.
        let d = s.open_vdi("tpl", true).unwrap();
        d.write(&[0xee; 1 << 20], 0, false).unwrap();
        drop(d);
        s.checkpoint().unwrap();
        assert_eq!(root_of(&s, "tpl@gold"), Some(root.clone()));
        assert!(root_of(&s, "tpl").is_none(), "only snapshots");

        let m = SnapshotMap::new(dev.clone(), &root).unwrap();
        let mut all = vec![0u8; SIZE];
        m.read(&mut all, 0).unwrap();
        assert!(all == img, "the snapshot's bytes");
        // Unaligned reads, and what each block holds.
        let mut part = vec![0u8; 10_000];
        m.read(&mut part, 4097).unwrap();
        assert_eq!(part, img[4097..14_097]);
        let blocks = m.blocks(0, SIZE as u64).unwrap();
        assert_eq!(blocks.len(), SIZE / BLOCK_SIZE);
        for (i, b) in blocks.iter().enumerate() {
            let data = &img[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE];
            if data.iter().all(|&x| x == 0) {
                assert_eq!(*b, RemoteBlock::Zero, "block {i}");
            } else {
                assert_eq!(*b, RemoteBlock::Hash(hash24(data)), "block {i}");
            }
        }
        assert!(m.read(&mut [0u8; 4096], SIZE as u64 - 2048).is_err());
    }

    #[test]
    fn what_is_not_the_published_snapshot_fails_its_checksum() {
        let dev: Arc<dyn Device> = Arc::new(MemDevice::new(64 << 20));
        let (s, _) = template(&dev);
        s.checkpoint().unwrap();
        let root = root_of(&s, "tpl@gold").unwrap();

        // A root whose hash is not its node's.
        let mut wrong = root.clone();
        let last = if wrong.root.ends_with('0') { "1" } else { "0" };
        wrong.root.replace_range(wrong.root.len() - 1.., last);
        let m = SnapshotMap::new(dev.clone(), &wrong).unwrap();
        assert!(matches!(
            m.read(&mut [0u8; 4096], 4096),
            Err(StoreError::Corrupt(_))
        ));

        // A data block changed on the device under a good root.
        let m = SnapshotMap::new(dev.clone(), &root).unwrap();
        let p = m.resolve(4096, 4096).unwrap()[0];
        assert!(p.is_block());
        dev.write_at(&[0x55; BLOCK_SIZE], p.addr() * BLOCK_SIZE_U64)
            .unwrap();
        let m = SnapshotMap::new(dev.clone(), &root).unwrap();
        let e = m.read(&mut [0u8; 8192], 0).unwrap_err();
        assert!(matches!(e, StoreError::Corrupt(_)), "{e}");
        // Blocks around it still read.
        m.read(&mut [0u8; 4096], 8192).unwrap();

        // The snapshot deleted and its space reused: nothing reads as the snapshot.
        let root2 = root_of(&s, "tpl@gold").unwrap();
        s.delete("tpl", true).unwrap();
        s.gc(&mut |_| {}).unwrap();
        s.create_vdi("other", SIZE as u64).unwrap();
        let d = s.open_vdi("other", true).unwrap();
        d.write(&vec![0x77; SIZE], 0, false).unwrap();
        drop(d);
        s.checkpoint().unwrap();
        let m = SnapshotMap::new(dev.clone(), &root2).unwrap();
        let mut buf = vec![0u8; SIZE];
        match m.read(&mut buf, 0) {
            Err(StoreError::Corrupt(_)) => {}
            r => panic!("read a deleted snapshot whose blocks were reused: {r:?}"),
        }
    }

    /// Refuses (or lets go) and remembers what it was asked.
    #[derive(Default)]
    struct Guard {
        refuse: Mutex<bool>,
        asked: Mutex<Vec<Vec<String>>>,
    }

    impl SnapshotGuard for Guard {
        fn releasing(
            &self,
            _: &Store,
            snapshots: &[String],
            apply: &mut dyn FnMut() -> StoreResult<()>,
        ) -> StoreResult<()> {
            self.asked.lock().push(snapshots.to_vec());
            if *self.refuse.lock() {
                return Err(StoreError::Busy("held".into()));
            }
            apply()
        }
    }

    #[test]
    fn snapshots_go_only_through_the_guard() {
        let dev: Arc<dyn Device> = Arc::new(MemDevice::new(64 << 20));
        let (s, _) = template(&dev);
        s.snapshot("tpl", "second").unwrap();
        s.create_vdi("plain", 1 << 20).unwrap();
        let g = Arc::new(Guard::default());
        s.set_snapshot_guard(g.clone());
        *g.refuse.lock() = true;
        let busy = |r: StoreResult<()>| assert!(matches!(r, Err(StoreError::Busy(_))), "{r:?}");
        busy(s.delete("tpl@gold", false).map(|_| ()));
        busy(s.delete("tpl", true).map(|_| ()));
        busy(s.rename("tpl", "renamed"));
        busy(s.rename("tpl@gold", "tpl@bronze"));
        let names: Vec<String> = s.list().unwrap().into_iter().map(|v| v.name).collect();
        assert_eq!(names, ["plain", "tpl", "tpl@gold", "tpl@second"]);
        // A VDI without snapshots, and a hidden name, are not asked about.
        s.rename("plain", "plain2").unwrap();
        s.delete("plain2", false).unwrap();
        let both = vec!["tpl@gold".to_string(), "tpl@second".to_string()];
        assert_eq!(
            *g.asked.lock(),
            [
                vec!["tpl@gold".to_string()],
                both.clone(),
                both.clone(),
                vec!["tpl@gold".to_string()]
            ]
        );
        *g.refuse.lock() = false;
        s.delete("tpl", true).unwrap();
        assert_eq!(g.asked.lock().last(), Some(&both));
        assert!(s.list().unwrap().is_empty());
    }
}
