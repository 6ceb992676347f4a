//! `parallax check`: verifies the last durable commit as it is on disk.
//!
//! Everything is read afresh from the device (no caches), so this checks what a restart would
//! see: every framed block, registry node, map node and (unless told not to) data block against
//! its checksum; the registry's keys against its records; and every block's stored refcount
//! against the references actually found — a count too high is a leak, one too low means the
//! block could be freed while still in use (double ownership).
//!
//! A check first checkpoints what the log holds (so that what is on disk is what a restart
//! would see), then holds the commit lock: clients keep reading and writing meanwhile; only
//! checkpoints wait until it is done.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::{
    btree::BTree,
    dedup::read_index,
    error::{StoreError, StoreResult},
    format::{
        decode_rc_page, hash24, rc_page_index, DedupRoot, Geometry, GroupHeader, Ptr, PtrKind,
        BLOCK_SIZE, BLOCK_SIZE_U64, RC_PER_PAGE,
    },
    nodes::read_node,
    registry::{decode_id, Kind, Record},
    schedules::{validate_target, Schedule},
    store::Store,
};

/// Errors listed in full in a report; the rest are only counted.
const MAX_LISTED: usize = 100;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckReport {
    /// No damage found.
    pub ok: bool,
    pub generation: u64,
    pub vdis: u64,
    pub snapshots: u64,
    pub registry_nodes: u64,
    pub map_nodes: u64,
    pub data_blocks: u64,
    /// Whether data blocks were read and verified (not only metadata).
    pub data_verified: bool,
    pub allocated_blocks: u64,
    pub checksum_errors: u64,
    /// Allocated blocks that nothing references.
    pub leaked_blocks: u64,
    /// Blocks referenced more often than their refcount says (or referenced but free).
    pub undercounted_blocks: u64,
    pub orphan_nodes: u64,
    /// Entries in the dedup index (format 7), each checked to name a block in use (and,
    /// with data verification, holding the data of its hash).
    #[serde(default)]
    pub dedup_index_entries: u64,
    #[serde(default)]
    pub dedup_index_nodes: u64,
    pub errors_total: u64,
    pub errors: Vec<String>,
}

/// Progress of a check, for a progress bar.
#[derive(Debug, Clone, Copy)]
pub struct CheckProgress {
    pub blocks_visited: u64,
    pub blocks_total: u64,
}

struct Checker<'a> {
    dev: &'a dyn super::device::Device,
    geo: Geometry,
    /// References found per data block (by ordinal); 255 means "see `overflow`".
    found: Vec<u8>,
    overflow: HashMap<u64, u32>,
    verify_data: bool,
    report: CheckReport,
    visited_nodes: HashSet<u64>,
    progress: &'a mut dyn FnMut(CheckProgress),
}

impl Checker<'_> {
    fn error(&mut self, msg: String) {
        self.report.errors_total += 1;
        if self.report.errors.len() < MAX_LISTED {
            self.report.errors.push(msg);
        }
    }

    fn ordinal(&self, addr: u64) -> Option<u64> {
        let (g, p, i) = self.geo.locate(addr)?;
        Some(g * super::format::GROUP_DATA_BLOCKS + p * RC_PER_PAGE + i as u64)
    }

    /// Counts one reference to `addr`; returns false (after reporting) if it cannot be a block.
    fn reference(&mut self, addr: u64, what: &str) -> bool {
        let Some(o) = self.ordinal(addr) else {
            self.error(format!(
                "{what} points at block {addr}, outside the data area"
            ));
            return false;
        };
        let slot = &mut self.found[o as usize];
        match *slot {
            0..=253 => *slot += 1,
            // From 255 on, the count is in `overflow`.
            254 => {
                *slot = 255;
                self.overflow.insert(o, 255);
            }
            _ => *self.overflow.entry(o).or_insert(255) += 1,
        }
        true
    }

    fn count(&self, ordinal: u64) -> u32 {
        match self.found[ordinal as usize] {
            255 => self.overflow[&ordinal],
            n => n as u32,
        }
    }

    fn tick(&mut self) {
        let visited = self.report.map_nodes + self.report.data_blocks;
        if visited % 4096 == 0 {
            (self.progress)(CheckProgress {
                blocks_visited: visited,
                blocks_total: self.report.allocated_blocks,
            });
        }
    }

    /// Walks the tree under `p` (at `level`); `p` itself was already counted.
    fn walk(&mut self, p: Ptr, level: u8, label: &str) {
        match p.kind() {
            Ok(PtrKind::Block) => {}
            Ok(_) => return,
            Err(e) => {
                self.error(format!("{label}: {e}"));
                return;
            }
        }
        self.tick();
        if level == 0 {
            self.report.data_blocks += 1;
            if self.verify_data {
                let mut b = [0u8; BLOCK_SIZE];
                match self.dev.read_at(&mut b, p.addr() * BLOCK_SIZE_U64) {
                    Ok(()) if hash24(&b) == p.hash => {}
                    Ok(()) => {
                        self.report.checksum_errors += 1;
                        self.error(format!(
                            "{label}: data block {} fails its checksum",
                            p.addr()
                        ));
                    }
                    Err(e) => self.error(format!("{label}: reading data block {}: {e}", p.addr())),
                }
            }
            return;
        }
        if !self.visited_nodes.insert(p.addr()) {
            return;
        }
        self.report.map_nodes += 1;
        let node = match read_node(self.dev, p) {
            Ok(n) => n,
            Err(e) => {
                if matches!(e, StoreError::Corrupt(_)) {
                    self.report.checksum_errors += 1;
                }
                self.error(format!("{label}: {e}"));
                return;
            }
        };
        for c in node.entries() {
            if c.is_block() && self.reference(c.addr(), label) {
                // A data block shared by several leaves is verified once.
                let first = level > 1 || self.ordinal(c.addr()).is_some_and(|o| self.count(o) == 1);
                if first {
                    self.walk(c, level - 1, label);
                }
            }
        }
    }
}

impl Checker<'_> {
    /// The dedup index: its nodes are counted as references; each entry must name a data
    /// block that a map references (so never a free one), holding the data of its hash.
    /// Call after every tree was walked.
    fn check_dedup_index(&mut self, root: DedupRoot) {
        let (blocks, entries) = match read_index(self.dev, root) {
            Ok(x) => x,
            Err(e) => {
                self.error(format!("dedup index: {e}"));
                return;
            }
        };
        self.report.dedup_index_nodes = blocks.len() as u64;
        self.report.dedup_index_entries = entries.len() as u64;
        for b in blocks {
            self.reference(b, "dedup index");
        }
        if entries.len() as u64 != root.entries {
            self.error(format!(
                "dedup index: {} entries, the commit record says {}",
                entries.len(),
                root.entries
            ));
        }
        let mut b = [0u8; BLOCK_SIZE];
        for (h, addr) in entries {
            let referenced = self.ordinal(addr).is_some_and(|o| self.count(o) > 0);
            if !referenced {
                self.error(format!(
                    "dedup index: names block {addr}, which no map references"
                ));
                continue;
            }
            if self.verify_data {
                match self.dev.read_at(&mut b, addr * BLOCK_SIZE_U64) {
                    Ok(()) if hash24(&b) == h => {}
                    Ok(()) => self.error(format!(
                        "dedup index: block {addr} does not hold the data of its entry's hash"
                    )),
                    Err(e) => self.error(format!("dedup index: reading block {addr}: {e}")),
                }
            }
        }
    }
}

impl Store {
    /// Checks the last durable commit. `verify_data` also reads every data block.
    pub fn check(
        &self,
        verify_data: bool,
        progress: &mut dyn FnMut(CheckProgress),
    ) -> StoreResult<CheckReport> {
        // What a restart would see: the last checkpoint plus the log. Checkpoint the log's
        // changes first, so that the checkpoint on disk is all of it.
        if !self.is_poisoned() && self.has_changes() {
            self.checkpoint_through(self.open_generation(), false)?;
        }
        let cs = self.commit.lock();
        let last = cs.clone();
        let geo = self.geometry();
        let dev = &*self.dev;
        let mut ck = Checker {
            dev,
            geo,
            found: vec![0u8; geo.data_blocks() as usize],
            overflow: HashMap::new(),
            verify_data,
            report: CheckReport {
                ok: false,
                generation: last.gen,
                vdis: 0,
                snapshots: 0,
                registry_nodes: 0,
                map_nodes: 0,
                data_blocks: 0,
                data_verified: verify_data,
                allocated_blocks: last.allocated_blocks,
                checksum_errors: 0,
                leaked_blocks: 0,
                undercounted_blocks: 0,
                orphan_nodes: last.orphan_count,
                dedup_index_entries: 0,
                dedup_index_nodes: 0,
                errors_total: 0,
                errors: Vec::new(),
            },
            visited_nodes: HashSet::new(),
            progress,
        };

        // The registry: its nodes, then its entries.
        let mut tree = BTree::new(last.registry_root, last.registry_height);
        tree.cache_cap = 64;
        let entries = match tree
            .blocks(dev)
            .and_then(|bs| Ok((bs, tree.scan(dev, b"")?)))
        {
            Ok((blocks, entries)) => {
                ck.report.registry_nodes = blocks.len() as u64;
                for b in blocks {
                    ck.reference(b, "registry");
                }
                entries
            }
            Err(e) => {
                ck.error(format!("registry: {e}"));
                Vec::new()
            }
        };
        let mut records: HashMap<u64, Record> = HashMap::new();
        let mut names: Vec<(String, u64)> = Vec::new();
        let mut snaps: Vec<(u64, String, u64)> = Vec::new();
        for (k, v) in &entries {
            let parsed = match k.first() {
                Some(b'R') if k.len() == 9 => Record::decode(v).map(|r| {
                    let id = u64::from_be_bytes(k[1..9].try_into().expect("8 bytes"));
                    if r.id != id {
                        Err(format!("record under id {id} says it is id {}", r.id))
                    } else {
                        records.insert(id, r);
                        Ok(())
                    }
                }),
                Some(b'N') => decode_id(v).map(|id| {
                    names.push((String::from_utf8_lossy(&k[1..]).into_owned(), id));
                    Ok(())
                }),
                Some(b'S') if k.len() > 9 => decode_id(v).map(|id| {
                    let vdi = u64::from_be_bytes(k[1..9].try_into().expect("8 bytes"));
                    snaps.push((vdi, String::from_utf8_lossy(&k[9..]).into_owned(), id));
                    Ok(())
                }),
                Some(b'P') => match (
                    validate_target(&String::from_utf8_lossy(&k[1..])),
                    Schedule::decode(v),
                ) {
                    (Ok(()), Ok(_)) => Ok(Ok(())),
                    (Err(e), _) | (_, Err(e)) => Ok(Err(format!(
                        "schedule for {}: {e}",
                        String::from_utf8_lossy(&k[1..])
                    ))),
                },
                _ => Ok(Err(format!(
                    "unknown registry key {:02x?}",
                    &k[..k.len().min(12)]
                ))),
            };
            match parsed {
                Ok(Ok(())) => {}
                Ok(Err(msg)) => ck.error(format!("registry: {msg}")),
                Err(e) => ck.error(format!("registry: {e}")),
            }
        }
        let mut named: HashSet<u64> = HashSet::new();
        for (name, id) in &names {
            match records.get(id) {
                Some(r) if r.kind == Kind::Vdi && &r.name == name => {
                    named.insert(*id);
                }
                _ => ck.error(format!(
                    "registry: name {name} points at id {id}, which is not that VDI"
                )),
            }
        }
        for (vdi, snap, id) in &snaps {
            match records.get(id) {
                Some(r) if r.kind == Kind::Snapshot && r.parent == *vdi && &r.name == snap => {
                    named.insert(*id);
                }
                _ => ck.error(format!(
                    "registry: snapshot {snap} of id {vdi} points at id {id}, which is not it"
                )),
            }
        }
        for (id, r) in &records {
            if !named.contains(id) {
                ck.error(format!(
                    "registry: record {id} ({}) has no name entry",
                    r.name
                ));
            }
            if r.kind == Kind::Snapshot && !records.contains_key(&r.parent) {
                ck.error(format!(
                    "registry: snapshot {} belongs to missing VDI {}",
                    r.name, r.parent
                ));
            }
            if *id >= last.next_id {
                ck.error(format!(
                    "registry: id {id} is not below the next id {}",
                    last.next_id
                ));
            }
        }
        ck.report.vdis = records.values().filter(|r| r.kind == Kind::Vdi).count() as u64;
        ck.report.snapshots = records.len() as u64 - ck.report.vdis;

        // Every tree, from the records and from the orphan list.
        let mut roots: Vec<(Ptr, u8, String)> = records
            .values()
            .map(|r| {
                let label = match r.kind {
                    Kind::Vdi => r.name.clone(),
                    Kind::Snapshot => format!(
                        "{}@{}",
                        records.get(&r.parent).map_or("?", |p| p.name.as_str()),
                        r.name
                    ),
                };
                (r.root, r.height, label)
            })
            .collect();
        match super::orphans::read_chain(dev, last.orphan_head, last.orphan_count) {
            Ok((orphans, chain)) => {
                for b in chain {
                    ck.reference(b, "orphan list");
                }
                roots.extend(
                    orphans
                        .into_iter()
                        .map(|o| (o.ptr, o.level, "orphan".to_string())),
                );
            }
            Err(e) => ck.error(format!("orphan list: {e}")),
        }
        roots.sort_by(|a, b| a.2.cmp(&b.2));
        for (root, height, label) in roots {
            if root.is_block() && ck.reference(root.addr(), &label) {
                ck.walk(root, height, &label);
            }
        }

        ck.check_dedup_index(last.dedup);

        // Stored refcounts against what was found.
        let mut allocated = 0u64;
        for g in 0..geo.groups {
            let sel = last.group_selectors[g as usize];
            let header = if sel.written {
                let addr = geo.group_header_addr(g, sel.copy);
                let mut b = [0u8; BLOCK_SIZE];
                match dev
                    .read_at(&mut b, addr * BLOCK_SIZE_U64)
                    .map_err(StoreError::from)
                    .and_then(|_| GroupHeader::decode(&b, addr, &geo, g))
                {
                    Ok(h) => h,
                    Err(e) => {
                        ck.error(format!("group {g} header: {e}"));
                        continue;
                    }
                }
            } else {
                GroupHeader::empty(&geo, g)
            };
            for p in 0..geo.group_pages(g) {
                let n = geo.page_blocks(g, p);
                let mut rc = vec![0u32; RC_PER_PAGE as usize];
                let psel = header.page_selectors[p as usize];
                if psel.written {
                    let addr = geo.rc_page_addr(g, p, psel.copy);
                    let mut b = [0u8; BLOCK_SIZE];
                    let r = dev
                        .read_at(&mut b, addr * BLOCK_SIZE_U64)
                        .map_err(StoreError::from)
                        .and_then(|_| decode_rc_page(&b, addr, rc_page_index(g, p), &mut rc));
                    if let Err(e) = r {
                        ck.error(format!("refcount page {p} of group {g}: {e}"));
                        continue;
                    }
                }
                let free = rc[..n].iter().filter(|&&c| c == 0).count();
                if free != header.page_free[p as usize] as usize {
                    ck.error(format!(
                        "group {g} page {p}: {free} free blocks, the group header says {}",
                        header.page_free[p as usize]
                    ));
                }
                let base = geo.data_addr(g, p, 0);
                for (i, &stored) in rc[..n].iter().enumerate() {
                    let addr = base + i as u64;
                    let found = ck.ordinal(addr).map_or(0, |o| ck.count(o));
                    allocated += (stored > 0) as u64;
                    if stored == found {
                        continue;
                    }
                    if stored > found {
                        if found == 0 {
                            ck.report.leaked_blocks += 1;
                        }
                        ck.error(format!(
                            "block {addr}: refcount {stored} but {found} references (leak)"
                        ));
                    } else {
                        ck.report.undercounted_blocks += 1;
                        ck.error(format!(
                            "block {addr}: refcount {stored} but {found} references (would be freed while in use)"
                        ));
                    }
                }
            }
        }
        if allocated != last.allocated_blocks {
            ck.error(format!(
                "{allocated} blocks have a refcount, the commit record says {}",
                last.allocated_blocks
            ));
        }
        drop(cs);
        let mut report = ck.report;
        report.ok = report.errors_total == 0;
        Ok(report)
    }
}
