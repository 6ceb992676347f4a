//! The orphan list (FORMAT.md §7): map nodes whose last reference went while they were not in
//! memory, waiting for the orphan worker (each checkpoint, and `gc`) to take them apart.

use super::{
    device::Device,
    error::{StoreError, StoreResult},
    format::{
        hash24, magic, open_frame, seal_frame, BlockBuf, Frame, Ptr, BLOCK_SIZE, BLOCK_SIZE_U64,
        FRAME_HEADER, MAX_HEIGHT, ORPHANS_PER_BLOCK, ORPHAN_ENTRY_LEN, ORPHAN_LEVEL_AT,
        ORPHAN_NEXT_AT, PTR_LEN,
    },
};

/// A node whose last reference moved to the orphan list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Orphan {
    pub ptr: Ptr,
    /// The node's level (≥ 1).
    pub level: u8,
}

/// The list in memory, and the blocks of its last written chain.
#[derive(Default)]
pub(super) struct OrphanList {
    pub list: Vec<Orphan>,
    /// Changed since the last cut: the next checkpoint rewrites the chain.
    pub changed: bool,
    /// Blocks of the chain the last cut allocated (freed when the chain is rewritten).
    pub chain: Vec<u64>,
}

/// Blocks a chain of `n` entries takes.
pub(super) fn chain_blocks(n: usize) -> usize {
    n.div_ceil(ORPHANS_PER_BLOCK)
}

/// Encodes `orphans` into the blocks at `addrs` (one per [`chain_blocks`]) for generation
/// `gen`; returns the head pointer and the blocks to write.
pub(super) fn encode_chain(
    orphans: &[Orphan],
    addrs: &[u64],
    gen: u64,
) -> (Ptr, Vec<(u64, BlockBuf)>) {
    debug_assert_eq!(addrs.len(), chain_blocks(orphans.len()));
    // Back to front, so that each block can point at (and hash) its successor.
    let mut next = Ptr::HOLE;
    let mut blocks = Vec::with_capacity(addrs.len());
    for (chunk, &addr) in orphans.chunks(ORPHANS_PER_BLOCK).zip(addrs).rev() {
        let mut b = Box::new([0u8; BLOCK_SIZE]);
        let payload = &mut b[FRAME_HEADER..];
        for (i, o) in chunk.iter().enumerate() {
            let at = i * ORPHAN_ENTRY_LEN;
            o.ptr.encode(&mut payload[at..at + PTR_LEN]);
            payload[at + ORPHAN_LEVEL_AT] = o.level;
        }
        next.encode(&mut payload[ORPHAN_NEXT_AT..ORPHAN_NEXT_AT + PTR_LEN]);
        seal_frame(
            &mut b[..],
            Frame {
                magic: magic::ORPHAN,
                gen,
                addr,
                aux: chunk.len() as u64,
            },
        );
        next = Ptr::block(addr, hash24(&b[..]));
        blocks.push((addr, b));
    }
    (next, blocks)
}

/// Reads the chain from `head`, checking it against `count`; returns the entries and the
/// chain's blocks.
pub(crate) fn read_chain(
    dev: &dyn Device,
    head: Ptr,
    count: u64,
) -> StoreResult<(Vec<Orphan>, Vec<u64>)> {
    let mut out = Vec::new();
    let mut chain = Vec::new();
    let mut p = head;
    while p.is_block() {
        if chain.len() as u64 > count / ORPHANS_PER_BLOCK as u64 + 1 {
            return Err(StoreError::Corrupt(
                "orphan list is longer than recorded".into(),
            ));
        }
        let mut b = [0u8; BLOCK_SIZE];
        dev.read_at(&mut b, p.addr() * BLOCK_SIZE_U64)?;
        if hash24(&b) != p.hash {
            return Err(StoreError::Corrupt(format!(
                "orphan block {} fails its checksum",
                p.addr()
            )));
        }
        let f = open_frame(&b, magic::ORPHAN, p.addr())?;
        if f.aux as usize > ORPHANS_PER_BLOCK {
            return Err(StoreError::Corrupt(format!(
                "orphan block {} holds {} entries",
                p.addr(),
                f.aux
            )));
        }
        let payload = &b[FRAME_HEADER..];
        for i in 0..f.aux as usize {
            let at = i * ORPHAN_ENTRY_LEN;
            let ptr = Ptr::decode(&payload[at..at + PTR_LEN]);
            let level = payload[at + ORPHAN_LEVEL_AT];
            if !ptr.is_block() || level == 0 || level > MAX_HEIGHT {
                return Err(StoreError::Corrupt(format!(
                    "orphan block {}: bad entry {i}",
                    p.addr()
                )));
            }
            out.push(Orphan { ptr, level });
        }
        chain.push(p.addr());
        p = Ptr::decode(&payload[ORPHAN_NEXT_AT..ORPHAN_NEXT_AT + PTR_LEN]);
    }
    if out.len() as u64 != count {
        return Err(StoreError::Corrupt(format!(
            "orphan list holds {} entries, the commit record says {count}",
            out.len()
        )));
    }
    Ok((out, chain))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::device::MemDevice;

    #[test]
    fn chain_round_trips() {
        let dev = MemDevice::new(16 << 20);
        let orphans: Vec<Orphan> = (0..250u64)
            .map(|i| Orphan {
                ptr: Ptr::block(5000 + i, [i as u8 + 1; 24]),
                level: (i % 3 + 1) as u8,
            })
            .collect();
        let addrs = [100, 200, 300];
        assert_eq!(chain_blocks(orphans.len()), addrs.len());
        let (head, blocks) = encode_chain(&orphans, &addrs, 7);
        for (a, b) in blocks {
            dev.write_at(&b[..], a * BLOCK_SIZE_U64).unwrap();
        }
        let (back, chain) = read_chain(&dev, head, 250).unwrap();
        assert_eq!(back, orphans);
        assert_eq!(chain, addrs);
        assert!(read_chain(&dev, head, 249).is_err());
    }
}
