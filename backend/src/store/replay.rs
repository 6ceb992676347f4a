//! Opening after a crash (format 2): the last checkpoint, plus the log entries written after
//! its cut, replayed through the same functions that made them (apply.rs); then a checkpoint,
//! so the log starts afresh. And `upgrade`, which moves a format-1 store to format 2.
//!
//! ```text
//!  commit record ─ log position (head, sequence, LSN, chain)
//!        └─► read the chain until a block is not the next of this chain
//!        └─► reserve what the entries name (the chain's blocks, the data blocks written)
//!        └─► apply the entries from the position's LSN, in order
//!        └─► checkpoint; give the chain's blocks back
//! ```

use std::sync::{atomic::Ordering, Arc};

use tracing::info;

use super::{
    error::{StoreError, StoreResult},
    format::{
        Geometry, LogPosition, Superblock, BLOCK_SIZE_U64, DEDUP_VERSION, FORMAT_VERSION,
        SUPERBLOCK_ADDR,
    },
    log::{read_chain, Entry},
    store::Store,
};

impl Store {
    /// Replays the log found from `pos` (called once, while opening).
    pub(super) fn recover(self: &Arc<Self>, pos: LogPosition) -> StoreResult<()> {
        let mut found = read_chain(&*self.dev, pos)?;
        self.drop_unwritten_tail(&mut found);
        if found.entries.is_empty() {
            self.log.reset(found.end);
            self.log.enable();
            return Ok(());
        }
        info!(
            entries = found.entries.len(),
            blocks = found.blocks.len(),
            "replaying the intent log"
        );
        // Nothing may be allocated over what the log names: its own blocks, and the data
        // blocks its writes point at (free in the checkpoint, since they were reserved after
        // its cut).
        let mut reserved = Vec::new();
        {
            let mut space = self.space.lock();
            let named = found.entries.iter().flat_map(|(_, e)| match e {
                // A shared write's blocks are in use already: in the checkpoint, or claimed
                // by a write before it.
                Entry::Write {
                    ptrs,
                    shared: false,
                    ..
                } => ptrs
                    .iter()
                    .filter(|p| p.is_block())
                    .map(|p| (p.addr(), true))
                    .collect(),
                _ => Vec::new(),
            });
            let chain = found.blocks.iter().map(|&b| (b, false));
            for (addr, data) in chain.chain(named) {
                if !space.rc.reserve_at(&*self.dev, addr)? {
                    return Err(StoreError::Corrupt(format!(
                        "the intent log names block {addr}{}, which is not free in the last checkpoint",
                        if data { " for data" } else { "" }
                    )));
                }
                reserved.push((addr, 1));
            }
        }
        for (lsn, e) in found.entries {
            self.replay(e)
                .map_err(|err| StoreError::Corrupt(format!("log entry at LSN {lsn}: {err}")))?;
        }
        self.log.reset(found.end);
        self.log.enable();
        self.checkpoint_through(self.open_generation(), false)?;
        // Data blocks the replay claimed are counted now; the rest go back.
        self.space.lock().unreserve(&*self.dev, &reserved);
        Ok(())
    }

    /// Entries after the last point the log knew durable were written before the sync that
    /// would have made them durable returned (ahead of a flush, or by a flush the power cut
    /// short): their data may not have reached the disk. Replay stops at the first write whose
    /// data does not match: no flush returned after it (a flush's one sync covers its data
    /// and its log blocks), so neither it nor anything after it was acknowledged as durable.
    fn drop_unwritten_tail(&self, found: &mut super::log::Found) {
        let mut b = [0u8; super::format::BLOCK_SIZE];
        let bad = found.entries.iter().position(|(lsn, e)| {
            let Entry::Write { ptrs, .. } = e else {
                return false;
            };
            *lsn >= found.synced
                && ptrs.iter().filter(|p| p.is_block()).any(|p| {
                    self.dev.read_at(&mut b, p.addr() * BLOCK_SIZE_U64).is_err()
                        || super::format::hash24(&b) != p.hash
                })
        });
        if let Some(i) = bad {
            info!(
                dropped = found.entries.len() - i,
                "the end of the intent log points at data that never reached the disk; replaying up to it"
            );
            found.entries.truncate(i);
        }
    }

    fn replay(&self, e: Entry) -> StoreResult<()> {
        let change = self.change();
        match e {
            Entry::Write { shared: true, .. } if self.format_version() < DEDUP_VERSION => {
                Err(StoreError::Corrupt(format!(
                    "a shared write entry in a store of format {} (dedup came with format 7)",
                    self.format_version()
                )))
            }
            Entry::Write {
                vdi,
                lba,
                ptrs,
                shared,
            } => {
                let v = self.vdi(vdi)?;
                let mut st = v.state.write();
                if st.deleted {
                    return Err(StoreError::Corrupt(format!("a write to deleted VDI {vdi}")));
                }
                let mut space = self.space.lock();
                let mut tx = self.tx(&mut space, change.gen);
                self.set_map(&v, &mut st, &mut tx, lba, &ptrs, shared)
            }
            Entry::Fill {
                vdi,
                start,
                end,
                zero,
            } => {
                let v = self.vdi(vdi)?;
                let mut st = v.state.write();
                let mut space = self.space.lock();
                let mut tx = self.tx(&mut space, change.gen);
                self.fill_map(&v, &mut st, &mut tx, start, end, zero)
            }
            Entry::Create {
                id,
                size,
                created,
                name,
            } => {
                let mut cat = self.catalog.lock();
                self.apply_create(&mut cat, id, &name, size, created)
            }
            Entry::Snapshot {
                vdi,
                id,
                created,
                name,
                guid,
            } => {
                let mut cat = self.catalog.lock();
                self.apply_snapshot(&mut cat, vdi, id, &name, created, guid)
            }
            Entry::Fork {
                snapshot,
                id,
                created,
                name,
                origin_name,
            } => {
                let mut cat = self.catalog.lock();
                self.apply_fork(&mut cat, snapshot, id, &name, &origin_name, created)
            }
            Entry::Rename { id, name } => {
                let mut cat = self.catalog.lock();
                self.apply_rename(&mut cat, id, &name)
            }
            Entry::Resize { id, size } => {
                let mut cat = self.catalog.lock();
                self.apply_resize(&mut cat, id, size, change.gen)
            }
            Entry::Delete { ids } => {
                let mut cat = self.catalog.lock();
                self.apply_delete(&mut cat, &ids, change.gen).map(|_| ())
            }
            Entry::Rollback { .. } if self.format_version() < 3 => Err(StoreError::Corrupt(
                "a rollback entry in a store of format 2 (rollbacks came with format 3)".into(),
            )),
            Entry::Rollback { vdi, snapshot } => {
                let mut cat = self.catalog.lock();
                self.apply_rollback(&mut cat, vdi, snapshot, change.gen)
            }
            Entry::Schedule { .. } if self.format_version() < 4 => {
                Err(StoreError::Corrupt(format!(
                    "a schedule entry in a store of format {} (schedules came with format 4)",
                    self.format_version()
                )))
            }
            Entry::Schedule { target, schedule } => {
                let mut cat = self.catalog.lock();
                self.apply_schedule(&mut cat, &target, schedule.as_ref())
            }
            Entry::Backing { .. } if self.format_version() < 5 => {
                Err(StoreError::Corrupt(format!(
                    "a backing entry in a store of format {} (remote-backed VDIs came with format 5)",
                    self.format_version()
                )))
            }
            Entry::Backing { id, uri } => {
                let mut cat = self.catalog.lock();
                self.apply_backing(&mut cat, id, uri)
            }
        }
    }

    /// Moves an older store to the current format, one version at a time. Crash-safe: for
    /// each step the store is first checkpointed and closed cleanly in its format, then the
    /// superblock names the next; a superblock torn by a crash there reads as the older format
    /// (FORMAT.md §10). Commit records say which layout they are in, so either superblock
    /// reads them. Returns false if there was nothing to do. Background checkpoints stop; the
    /// store stays usable.
    pub fn upgrade(&self) -> StoreResult<bool> {
        if self.format_version() >= FORMAT_VERSION {
            return Ok(false);
        }
        while self.format_version() < FORMAT_VERSION {
            self.upgrade_step(self.format_version() + 1)?;
        }
        Ok(true)
    }

    fn upgrade_step(&self, to: u64) -> StoreResult<()> {
        let from = self.format_version();
        let geo = self.geometry();
        Geometry::for_version(geo.total_blocks * BLOCK_SIZE_U64, to).map_err(|e| {
            StoreError::Invalid(format!("this store cannot move to format {to}: {e}"))
        })?;
        self.close()?;
        let sb = Superblock {
            version: to,
            ..self.superblock().clone()
        };
        let result = self
            .dev
            .write_at(&sb.encode()[..], SUPERBLOCK_ADDR * BLOCK_SIZE_U64)
            .and_then(|()| self.dev.sync());
        if let Err(e) = result {
            self.poison(&e);
            return Err(e.into());
        }
        self.set_format_version(to);
        if from < 2 {
            // Format 2 brought the intent log; a format-1 session kept none.
            self.log.reset(0);
            self.log.enable();
        }
        if to == DEDUP_VERSION {
            // From now on every data block's first and last reference change the index; the
            // blocks already there are entered by a dedup pass (`parallax dedup`).
            self.space.lock().dedup.enabled = true;
        }
        info!("store upgraded from format {from} to format {to}");
        Ok(())
    }

    fn set_format_version(&self, v: u64) {
        self.version_cell().store(v, Ordering::Release);
    }
}
