//! Space back to the device. A store in a shared RADOS pool should occupy what it holds, not
//! its high-water mark: a unit of the device ([`Device::discard_unit`], a RADOS object) whose
//! data blocks are all free is discarded. On a device that cannot give space back (a file, a
//! block device) none of this runs.
//!
//! When (docs/CLUSTER.md, "Space back to RADOS"): a checkpoint that frees blocks makes their
//! units candidates once it is durable and its frees are released; a candidate is given back
//! once nothing was freed in it for [`StoreOptions::give_back_after`](super::StoreOptions)
//! (checkpoints and the background thread look), at a clean close, and by `gc`. The wait keeps
//! overwrites, whose freed blocks the allocator reuses at once, from removing objects only to
//! have them made again.
//!
//! Why it is safe: a free block is referenced by no durable state, and no read that could have
//! looked it up is still running (its frees were released after the reader epoch flipped).
//! While a unit is being discarded, its free blocks are reserved, so no writer can be handed one
//! until the discard has returned; a unit with a block in use or held (a writer's reservation,
//! the log's next blocks) is left alone.
//!
//! A crash before a candidate is given back leaves its bytes in RADOS with nothing referencing
//! them, and so does a unit whose last block in use was a held one let go outside a checkpoint
//! (the intent log's next blocks, dropped at close). `gc` sweeps every unit the device says
//! holds bytes ([`Store::give_back_all`]), so nothing stays behind for good.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use tracing::{debug, warn};

use super::{
    error::StoreResult,
    format::{BLOCK_SIZE_U64, RC_PER_PAGE},
    space::Space,
    store::Store,
};

/// Units a sweep looks at per round (bounds the refcount pages it loads at once).
const SWEEP_BATCH: usize = 256;

/// How long a unit waits after a block of it was last freed before it is given back, by default:
/// under overwrites the allocator reuses freed blocks at once (it prefers blocks written before),
/// and giving their object back only to have it made again costs RADOS more than keeping it.
pub const GIVE_BACK_AFTER: Duration = Duration::from_secs(30);

/// Units that had blocks freed and may be given back: unit → when a block of it was last freed.
#[derive(Default)]
pub(super) struct Candidates(BTreeMap<u64, Instant>);

impl Store {
    /// After a durable checkpoint has released `freed` and `idle` (and the epoch flipped): their
    /// units become candidates, and the ones due are given back.
    pub(super) fn note_freed(&self, freed: &[u64], idle: &[(u64, u64)]) {
        let Some(per) = self.unit_blocks() else {
            return;
        };
        let mut units: Vec<u64> = freed.iter().map(|b| b / per).collect();
        units.extend(idle.iter().flat_map(|&(a, n)| [a / per, (a + n - 1) / per]));
        if units.is_empty() {
            return;
        }
        units.sort_unstable();
        units.dedup();
        let now = Instant::now();
        {
            let mut c = self.give_back.lock();
            for u in units {
                c.0.insert(u, now);
            }
        }
        self.give_back_due(false);
    }

    /// Gives back the candidate units nothing was freed in for
    /// [`StoreOptions::give_back_after`](super::StoreOptions) (every candidate with `all`) whose
    /// data blocks are all free. Returns the blocks given back.
    pub(super) fn give_back_due(&self, all: bool) -> u64 {
        let Some(per) = self.unit_blocks() else {
            return 0;
        };
        let due: Vec<u64> = {
            let mut c = self.give_back.lock();
            let now = Instant::now();
            let after = self.options.give_back_after;
            let due: Vec<u64> = (c.0.iter())
                .filter(|(_, &t)| all || now.duration_since(t) >= after)
                .map(|(&u, _)| u)
                .collect();
            for u in &due {
                c.0.remove(u);
            }
            due
        };
        if due.is_empty() {
            return 0;
        }
        self.discard_units(per, &due).unwrap_or_else(|e| {
            warn!(error = %e, "space not given back to the device");
            0
        })
    }

    /// Discards every unit the device holds bytes for whose data blocks are all free (what a
    /// crash, or a block held past its unit's last free, left). Returns the blocks given back.
    pub(super) fn give_back_all(&self) -> StoreResult<u64> {
        let Some(per) = self.unit_blocks() else {
            return Ok(0);
        };
        let Some(mut units) = self.dev.stored_units()? else {
            return Ok(0);
        };
        units.sort_unstable();
        let mut given = 0;
        for batch in units.chunks(SWEEP_BATCH) {
            given += self.discard_units(per, batch)?;
            let mut space = self.space.lock();
            space.rc.trim(self.options.rc_cache_pages);
        }
        Ok(given)
    }

    /// Blocks per discard unit, if the device gives space back in whole blocks.
    fn unit_blocks(&self) -> Option<u64> {
        let unit = self.dev.discard_unit()?;
        (unit >= BLOCK_SIZE_U64 && unit % BLOCK_SIZE_U64 == 0).then_some(unit / BLOCK_SIZE_U64)
    }

    /// Discards the data blocks of each of `units` (of `per` blocks) whose data blocks are all
    /// free, reserving them until the discard has returned.
    fn discard_units(&self, per: u64, units: &[u64]) -> StoreResult<u64> {
        let geo = self.geometry();
        let data_blocks = |u: u64| {
            (u * per..((u + 1) * per).min(geo.total_blocks))
                .filter(move |&b| geo.locate(b).is_some())
        };
        // One block per half page finds every refcount page a unit's blocks are on.
        let probes = |u: u64| {
            let end = ((u + 1) * per).min(geo.total_blocks);
            (u * per..end)
                .step_by(RC_PER_PAGE as usize / 2)
                .chain(end.checked_sub(1))
        };
        Space::load_pages(
            &self.space,
            &*self.dev,
            units.iter().flat_map(|&u| probes(u)),
        )?;
        // The runs of the units to discard; their blocks stay reserved until it has returned.
        let (mut plan, mut units_shed) = (Vec::<(u64, u64)>::new(), 0);
        {
            let mut space = self.space.lock();
            let dev = &*self.dev;
            'unit: for &u in units {
                let mut runs = Vec::<(u64, u64)>::new();
                for b in data_blocks(u) {
                    if !space.rc.reserve_at(dev, b)? {
                        // In use, or held (a writer's reservation).
                        space.unreserve(dev, &runs);
                        continue 'unit;
                    }
                    match runs.last_mut() {
                        Some((a, n)) if *a + *n == b => *n += 1,
                        _ => runs.push((b, 1)),
                    }
                }
                units_shed += usize::from(!runs.is_empty());
                plan.extend(runs);
            }
        }
        let mut given = 0;
        let mut failed = None;
        for &(a, n) in &plan {
            match self.dev.discard(a * BLOCK_SIZE_U64, n * BLOCK_SIZE_U64) {
                Ok(()) => given += n,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        self.space.lock().unreserve(&*self.dev, &plan);
        if given > 0 {
            debug!(
                units = units_shed,
                blocks = given,
                "space given back to the device"
            );
        }
        match failed {
            Some(e) => Err(e.into()),
            None => Ok(given),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::{BTreeMap, BTreeSet},
        io,
        sync::Arc,
    };

    use parking_lot::Mutex;
    use rand::{rngs::SmallRng, Rng, SeedableRng};

    use crate::store::{
        device::{Device, MemDevice},
        format::BLOCK_SIZE_U64,
        tests::small_opts,
        Store,
    };

    /// Blocks per discard unit in these tests: small, so a small store has many units.
    const UNIT_BLOCKS: u64 = 16;

    /// A device that gives space back in units of [`UNIT_BLOCKS`]: a discarded range reads as
    /// garbage, not zeros, so that a store reading a block it gave back, or giving back a
    /// block it still uses, fails its checksums or the test's comparisons.
    struct Shedding {
        inner: MemDevice,
        /// Blocks written and not discarded since.
        stored: Mutex<BTreeSet<u64>>,
        discarded: Mutex<u64>,
        refuse: std::sync::atomic::AtomicBool,
    }

    impl Shedding {
        fn new(bytes: u64) -> Arc<Shedding> {
            Arc::new(Shedding {
                inner: MemDevice::new(bytes),
                stored: Mutex::new(BTreeSet::new()),
                discarded: Mutex::new(0),
                refuse: Default::default(),
            })
        }
    }

    impl Device for Shedding {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            let first = offset / BLOCK_SIZE_U64;
            let end = (offset + buf.len() as u64).div_ceil(BLOCK_SIZE_U64);
            self.stored.lock().extend(first..end);
            self.inner.write_at(buf, offset)
        }
        fn sync(&self) -> io::Result<()> {
            Ok(())
        }
        fn discard_unit(&self) -> Option<u64> {
            Some(UNIT_BLOCKS * BLOCK_SIZE_U64)
        }
        fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
            if self.refuse.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(io::Error::other("refused, as the test asked"));
            }
            let unit = UNIT_BLOCKS * BLOCK_SIZE_U64;
            assert_eq!(
                offset / unit,
                (offset + len - 1) / unit,
                "a discard crosses a unit"
            );
            assert_eq!(offset % BLOCK_SIZE_U64, 0);
            assert_eq!(len % BLOCK_SIZE_U64, 0);
            let blocks = offset / BLOCK_SIZE_U64..(offset + len) / BLOCK_SIZE_U64;
            let mut stored = self.stored.lock();
            for b in blocks.clone() {
                stored.remove(&b);
            }
            *self.discarded.lock() += blocks.end - blocks.start;
            self.inner.write_at(&vec![0xEE; len as usize], offset)
        }
        fn stored_units(&self) -> io::Result<Option<Vec<u64>>> {
            let stored = self.stored.lock();
            let units: BTreeSet<u64> = stored.iter().map(|b| b / UNIT_BLOCKS).collect();
            Ok(Some(units.into_iter().collect()))
        }
        fn len(&self) -> u64 {
            self.inner.len()
        }
    }

    fn store_on(dev: &Arc<Shedding>) -> Arc<Store> {
        Store::format(&**dev, dev.len()).unwrap();
        Store::open_device(dev.clone(), small_opts()).unwrap()
    }

    /// Writes `n` random blocks of `name` and its model.
    fn scribble(s: &Arc<Store>, rng: &mut SmallRng, name: &str, model: &mut [u8], n: usize) {
        let d = s.open_vdi(name, true).unwrap();
        for _ in 0..n {
            let at = rng.random_range(0..model.len() as u64 / 4096) * 4096;
            let mut block = vec![0u8; 4096];
            rng.fill(&mut block[..]);
            d.write(&block, at, false).unwrap();
            model[at as usize..at as usize + 4096].copy_from_slice(&block);
        }
    }

    fn assert_reads(s: &Arc<Store>, models: &BTreeMap<String, Vec<u8>>) {
        for (name, model) in models {
            let d = s.open_vdi(name, false).unwrap();
            let mut img = vec![0u8; model.len()];
            d.read(&mut img, 0).unwrap();
            assert!(img == *model, "{name} does not read back what was written");
        }
    }

    /// The data blocks the device still stores in units whose data blocks are all free (not
    /// referenced, not held): what should have been given back.
    fn kept_for_nothing(s: &Arc<Store>, dev: &Shedding) -> Vec<u64> {
        let geo = s.geometry();
        let stored: Vec<u64> = dev.stored.lock().iter().copied().collect();
        let mut space = s.space.lock();
        let mut unit_free = |u: u64| {
            (u * UNIT_BLOCKS..(u + 1) * UNIT_BLOCKS)
                .filter(|&b| geo.locate(b).is_some())
                .all(|b| {
                    let free = space.rc.reserve_at(&*s.dev, b).unwrap();
                    if free {
                        space.rc.unreserve(&*s.dev, b).unwrap();
                    }
                    free
                })
        };
        stored
            .into_iter()
            .filter(|&b| geo.locate(b).is_some() && unit_free(b / UNIT_BLOCKS))
            .collect()
    }

    /// No stored block lies in a unit whose data blocks are all free, and `check` is clean.
    fn assert_nothing_kept_and_clean(s: &Arc<Store>, dev: &Shedding) {
        let kept = kept_for_nothing(s, dev);
        assert!(
            kept.is_empty(),
            "blocks kept in units nothing uses: {kept:?}"
        );
        let r = s.check(true, &mut |_| {}).unwrap();
        assert!(r.ok, "{r:#?}");
    }

    /// Writes, snapshots, forks and deletes, with checkpoints between: the store gives units
    /// back as their blocks free up, never one it still uses (everything reads back, `check`
    /// is clean, also after reopening), and once everything is deleted no unit holds data.
    #[test]
    fn freed_units_go_back_and_live_ones_stay() {
        let dev = Shedding::new(32 << 20);
        let s = store_on(&dev);
        let mut rng = SmallRng::seed_from_u64(17);
        let mut models = BTreeMap::new();
        for name in ["a", "b", "c"] {
            s.create_vdi(name, 2 << 20).unwrap();
            let mut m = vec![0u8; 2 << 20];
            scribble(&s, &mut rng, name, &mut m, 300);
            models.insert(name.to_string(), m);
        }
        s.checkpoint().unwrap();
        s.snapshot("a", "s1").unwrap();
        models.insert("a@s1".into(), models["a"].clone());
        s.fork("a@s1", "f").unwrap();
        let mut f = models["a"].clone();
        scribble(&s, &mut rng, "f", &mut f, 200);
        models.insert("f".into(), f);
        let mut a = models.remove("a").unwrap();
        scribble(&s, &mut rng, "a", &mut a, 200);
        models.insert("a".into(), a);
        s.checkpoint().unwrap();
        for gone in ["b", "c"] {
            s.delete(gone, false).unwrap();
            models.remove(gone);
        }
        // Checkpoints alone (no sweep): they take the deleted maps apart and give back.
        while s.checkpoint().unwrap() {}
        assert!(*dev.discarded.lock() > 0, "nothing was given back");
        assert_reads(&s, &models);
        assert_nothing_kept_and_clean(&s, &dev);

        drop(s);
        let s = Store::open_device(dev.clone(), small_opts()).unwrap();
        assert_reads(&s, &models);
        for name in ["f", "a"] {
            s.delete(name, true).unwrap();
        }
        while s.checkpoint().unwrap() {}
        assert_nothing_kept_and_clean(&s, &dev);

        // Everything deleted: what the device still stores is the store's own metadata and
        // the units the intent log held blocks in, a few units at most.
        s.close().unwrap();
        drop(s);
        let s = Store::open_device(dev.clone(), small_opts()).unwrap();
        s.gc(&mut |_| {}).unwrap();
        let geo = s.geometry();
        let data: Vec<u64> = (dev.stored.lock().iter())
            .copied()
            .filter(|&b| geo.locate(b).is_some())
            .collect();
        assert!(
            data.len() as u64 <= 4 * UNIT_BLOCKS,
            "still stored: {data:?}"
        );
    }

    /// A checkpoint whose discards fail still succeeds (the space stays allocatable in the
    /// store), and `gc`'s sweep gives the units back later: what a crash between a checkpoint
    /// and its discards leaves behind does not stay for good.
    #[test]
    fn gc_sweeps_what_checkpoints_could_not_give_back() {
        let dev = Shedding::new(32 << 20);
        let s = store_on(&dev);
        let mut rng = SmallRng::seed_from_u64(5);
        s.create_vdi("a", 2 << 20).unwrap();
        let mut m = vec![0u8; 2 << 20];
        scribble(&s, &mut rng, "a", &mut m, 400);
        s.checkpoint().unwrap();
        dev.refuse.store(true, std::sync::atomic::Ordering::SeqCst);
        s.delete("a", false).unwrap();
        s.gc(&mut |_| {}).unwrap_err();
        assert!(!kept_for_nothing(&s, &dev).is_empty());
        dev.refuse.store(false, std::sync::atomic::Ordering::SeqCst);
        let r = s.gc(&mut |_| {}).unwrap();
        assert!(r.swept_bytes > 0, "{r:#?}");
        assert_nothing_kept_and_clean(&s, &dev);
    }
}
