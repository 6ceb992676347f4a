//! On-disk format, version 1: constants, geometry, and the encodings of fixed-layout blocks.
//! `docs/FORMAT.md` is the prose version of this file; keep them in step.
//!
//! ```text
//! block 0   superblock        block 1, 2   commit slots A, B       block 3..   groups
//! group:    [hdr ×2][refcount pages 512 × 2 copies][516096 data blocks]
//! ```

use super::error::{StoreError, StoreResult};

/// Bytes per block.
pub const BLOCK_SIZE: usize = 4096;
pub const BLOCK_SIZE_U64: u64 = BLOCK_SIZE as u64;
/// The format this code writes and reads.
pub const FORMAT_VERSION: u64 = 1;

pub const SUPERBLOCK_ADDR: u64 = 0;
pub const COMMIT_SLOTS: [u64; 2] = [1, 2];
/// First block of group 0.
pub const GROUP_BASE: u64 = 3;

/// Header of a framed block; the payload follows.
pub const FRAME_HEADER: usize = 64;
pub const FRAME_PAYLOAD: usize = BLOCK_SIZE - FRAME_HEADER;
const FRAME_CHECKSUM: std::ops::Range<usize> = 32..64;

/// Refcounts (u32) in one refcount page.
pub const RC_PER_PAGE: u64 = (FRAME_PAYLOAD / 4) as u64; // 1008
pub const RC_PAGES_PER_GROUP: u64 = 512;
pub const GROUP_HEADER_BLOCKS: u64 = 2;
pub const GROUP_RC_BLOCKS: u64 = 2 * RC_PAGES_PER_GROUP;
/// Offset of the first data block within a group.
pub const GROUP_DATA_OFFSET: u64 = GROUP_HEADER_BLOCKS + GROUP_RC_BLOCKS;
pub const GROUP_DATA_BLOCKS: u64 = RC_PAGES_PER_GROUP * RC_PER_PAGE; // 516096
pub const GROUP_BLOCKS: u64 = GROUP_DATA_OFFSET + GROUP_DATA_BLOCKS; // 517122

/// Commit-record payload offset of the group selector bits.
const COMMIT_SELECTORS_AT: usize = 128;
/// Groups whose selector bits fit in a commit record.
pub const MAX_GROUPS: u64 = ((FRAME_PAYLOAD - COMMIT_SELECTORS_AT) * 4) as u64; // 15616
/// A data region smaller than this is not worth a group.
const MIN_GROUP_DATA: u64 = 256;
/// Smallest store `init` accepts.
pub const MIN_STORE_BYTES: u64 = 16 << 20;

/// Entries (pointers) in a radix map node.
pub const FANOUT: usize = 128;
pub const FANOUT_BITS: u32 = 7;
/// Largest VDI: 2^50 bytes (1 PiB); needs radix height 6.
pub const MAX_VDI_BYTES: u64 = 1 << 50;
pub const MAX_HEIGHT: u8 = 6;

/// Bytes of a block hash kept in a pointer.
pub const HASH_LEN: usize = 24;
pub type Hash24 = [u8; HASH_LEN];

/// The hash24 of a block's contents.
pub fn hash24(block: &[u8]) -> Hash24 {
    let full = blake3::hash(block);
    let mut h = [0u8; HASH_LEN];
    h.copy_from_slice(&full.as_bytes()[..HASH_LEN]);
    h
}

/// The hash24 of an all-zero block (never stored: zero blocks are holes).
pub fn zero_block_hash() -> Hash24 {
    hash24(&[0u8; BLOCK_SIZE])
}

pub fn is_zero(buf: &[u8]) -> bool {
    // Compare 16 bytes at a time; the compiler vectorises this.
    let (head, body, tail) = {
        // SAFETY: u128 has no invalid bit patterns and align_to only reinterprets the
        // properly aligned middle of the slice.
        unsafe { buf.align_to::<u128>() }
    };
    head.iter().all(|&b| b == 0) && body.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Magic numbers of framed blocks.
pub mod magic {
    pub const SUPERBLOCK: [u8; 8] = *b"PARALLAX";
    pub const COMMIT: [u8; 8] = *b"PXCOMMIT";
    pub const GROUP: [u8; 8] = *b"PXGROUPH";
    pub const RCPAGE: [u8; 8] = *b"PXRCPAGE";
    pub const ORPHAN: [u8; 8] = *b"PXORPHAN";
}

fn magic_name(m: &[u8]) -> String {
    if m.iter().all(|b| b.is_ascii_graphic()) {
        String::from_utf8_lossy(m).into_owned()
    } else {
        format!("{:02x?}", m)
    }
}

/// Header fields of a framed block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub magic: [u8; 8],
    pub gen: u64,
    pub addr: u64,
    pub aux: u64,
}

/// Writes the header and checksum of a framed block whose payload is already in place.
pub fn seal_frame(block: &mut [u8], f: Frame) {
    debug_assert_eq!(block.len(), BLOCK_SIZE);
    block[0..8].copy_from_slice(&f.magic);
    block[8..16].copy_from_slice(&f.gen.to_le_bytes());
    block[16..24].copy_from_slice(&f.addr.to_le_bytes());
    block[24..32].copy_from_slice(&f.aux.to_le_bytes());
    block[FRAME_CHECKSUM].fill(0);
    let sum = blake3::hash(block);
    block[FRAME_CHECKSUM].copy_from_slice(sum.as_bytes());
}

/// Checks a framed block read from `addr`: magic, self address, checksum. Returns its header.
pub fn open_frame(block: &[u8], want_magic: [u8; 8], addr: u64) -> StoreResult<Frame> {
    let f = Frame {
        magic: block[0..8].try_into().expect("8 bytes"),
        gen: u64_at(block, 8),
        addr: u64_at(block, 16),
        aux: u64_at(block, 24),
    };
    if f.magic != want_magic {
        return Err(StoreError::Corrupt(format!(
            "block {addr}: expected a {} block, found magic {}",
            magic_name(&want_magic),
            magic_name(&f.magic)
        )));
    }
    let mut copy = [0u8; BLOCK_SIZE];
    copy.copy_from_slice(block);
    copy[FRAME_CHECKSUM].fill(0);
    if blake3::hash(&copy).as_bytes()[..] != block[FRAME_CHECKSUM] {
        return Err(StoreError::Corrupt(format!(
            "block {addr} ({}): checksum mismatch",
            magic_name(&want_magic)
        )));
    }
    if f.addr != addr {
        return Err(StoreError::Corrupt(format!(
            "block {addr} ({}): written for block {} (misdirected write)",
            magic_name(&want_magic),
            f.addr
        )));
    }
    Ok(f)
}

pub fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
pub fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
pub fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}
pub fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
pub fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
pub fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

/// What a pointer points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PtrKind {
    /// Nothing: reads as zeros.
    Hole,
    /// A block (data at level 0, a node above).
    Block,
    /// Recorded zeros: reads as zeros, holds no block.
    Zero,
}

const ADDR_MASK: u64 = (1 << 48) - 1;

/// A 32-byte block pointer: address, kind, and the hash24 of the target.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ptr {
    word: u64,
    pub hash: Hash24,
}

pub const PTR_LEN: usize = 32;

impl std::fmt::Debug for Ptr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind() {
            Ok(PtrKind::Hole) => write!(f, "Hole"),
            Ok(PtrKind::Zero) => write!(f, "Zero"),
            Ok(PtrKind::Block) => write!(f, "Block({})", self.addr()),
            Err(_) => write!(f, "Bad({:#x})", self.word),
        }
    }
}

impl Ptr {
    pub const HOLE: Ptr = Ptr {
        word: 0,
        hash: [0; HASH_LEN],
    };
    pub const ZERO: Ptr = Ptr {
        word: 2 << 48,
        hash: [0; HASH_LEN],
    };

    pub fn block(addr: u64, hash: Hash24) -> Ptr {
        debug_assert!(addr != 0 && addr <= ADDR_MASK);
        Ptr {
            word: addr | (1 << 48),
            hash,
        }
    }

    pub fn kind(&self) -> StoreResult<PtrKind> {
        match (self.word >> 48, self.word & ADDR_MASK) {
            (0, 0) => Ok(PtrKind::Hole),
            (1, a) if a != 0 => Ok(PtrKind::Block),
            (2, 0) => Ok(PtrKind::Zero),
            _ => Err(StoreError::Corrupt(format!(
                "invalid block pointer word {:#018x}",
                self.word
            ))),
        }
    }

    /// The block address (meaningful for `Block` pointers).
    pub fn addr(&self) -> u64 {
        self.word & ADDR_MASK
    }

    pub fn is_block(&self) -> bool {
        self.word >> 48 == 1
    }

    pub fn is_hole(&self) -> bool {
        self.word == 0
    }

    pub fn decode(b: &[u8]) -> Ptr {
        let mut hash = [0u8; HASH_LEN];
        hash.copy_from_slice(&b[8..PTR_LEN]);
        Ptr {
            word: u64_at(b, 0),
            hash,
        }
    }

    pub fn encode(&self, b: &mut [u8]) {
        put_u64(b, 0, self.word);
        b[8..PTR_LEN].copy_from_slice(&self.hash);
    }

    /// The same pointer aimed at another address (hash to be filled in at commit).
    pub fn with_addr(&self, addr: u64) -> Ptr {
        Ptr::block(addr, self.hash)
    }
}

/// Where groups and their parts are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub total_blocks: u64,
    pub groups: u64,
}

impl Geometry {
    /// The geometry of a store of `bytes` bytes (rounded down to whole blocks).
    pub fn for_size(bytes: u64) -> StoreResult<Geometry> {
        if bytes < MIN_STORE_BYTES {
            return Err(StoreError::Invalid(format!(
                "a store must be at least {} MiB",
                MIN_STORE_BYTES >> 20
            )));
        }
        let total_blocks = bytes / BLOCK_SIZE_U64;
        let avail = total_blocks - GROUP_BASE;
        let mut groups = avail / GROUP_BLOCKS;
        if avail % GROUP_BLOCKS >= GROUP_DATA_OFFSET + MIN_GROUP_DATA {
            groups += 1;
        }
        if groups > MAX_GROUPS {
            return Err(StoreError::Invalid(format!(
                "a format-{FORMAT_VERSION} store holds at most {MAX_GROUPS} groups (about {} TiB)",
                (MAX_GROUPS * GROUP_DATA_BLOCKS * BLOCK_SIZE_U64) >> 40
            )));
        }
        Ok(Geometry {
            total_blocks,
            groups,
        })
    }

    pub fn group_start(&self, g: u64) -> u64 {
        GROUP_BASE + g * GROUP_BLOCKS
    }

    /// Data blocks in group `g` (the last group may be short).
    pub fn group_data_blocks(&self, g: u64) -> u64 {
        let start = self.group_start(g) + GROUP_DATA_OFFSET;
        (self.total_blocks.saturating_sub(start)).min(GROUP_DATA_BLOCKS)
    }

    pub fn data_blocks(&self) -> u64 {
        (0..self.groups).map(|g| self.group_data_blocks(g)).sum()
    }

    /// Address of copy `copy` of group `g`'s header.
    pub fn group_header_addr(&self, g: u64, copy: u8) -> u64 {
        self.group_start(g) + copy as u64
    }

    /// Address of copy `copy` of refcount page `p` of group `g`.
    pub fn rc_page_addr(&self, g: u64, p: u64, copy: u8) -> u64 {
        self.group_start(g) + GROUP_HEADER_BLOCKS + 2 * p + copy as u64
    }

    /// The (group, page, index) that holds the refcount of data block `addr`, or `None` if
    /// `addr` is not a data block.
    pub fn locate(&self, addr: u64) -> Option<(u64, u64, usize)> {
        let rel = addr.checked_sub(GROUP_BASE)?;
        let g = rel / GROUP_BLOCKS;
        let within = (rel % GROUP_BLOCKS).checked_sub(GROUP_DATA_OFFSET)?;
        if g >= self.groups || within >= self.group_data_blocks(g) {
            return None;
        }
        Some((g, within / RC_PER_PAGE, (within % RC_PER_PAGE) as usize))
    }

    /// The data block at (group, page, index).
    pub fn data_addr(&self, g: u64, p: u64, i: usize) -> u64 {
        self.group_start(g) + GROUP_DATA_OFFSET + p * RC_PER_PAGE + i as u64
    }

    /// Refcount pages in use in group `g`.
    pub fn group_pages(&self, g: u64) -> u64 {
        self.group_data_blocks(g).div_ceil(RC_PER_PAGE)
    }

    /// Data blocks covered by page `p` of group `g`.
    pub fn page_blocks(&self, g: u64, p: u64) -> usize {
        (self.group_data_blocks(g) - p * RC_PER_PAGE).min(RC_PER_PAGE) as usize
    }
}

/// Radix height needed for a VDI of `bytes` bytes.
pub fn height_for(bytes: u64) -> u8 {
    let blocks = bytes.div_ceil(BLOCK_SIZE_U64).max(1);
    let mut h = 1u8;
    while h < MAX_HEIGHT && (1u64 << (FANOUT_BITS * h as u32)) < blocks {
        h += 1;
    }
    h
}

/// The superblock's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub uuid: [u8; 16],
    pub created_ns: u64,
    pub geometry: Geometry,
}

impl Superblock {
    pub fn encode(&self) -> Box<[u8; BLOCK_SIZE]> {
        let mut b = Box::new([0u8; BLOCK_SIZE]);
        let p = &mut b[FRAME_HEADER..];
        put_u32(p, 0, FORMAT_VERSION as u32);
        put_u32(p, 4, BLOCK_SIZE as u32);
        p[8..24].copy_from_slice(&self.uuid);
        put_u64(p, 24, self.created_ns);
        put_u64(p, 32, self.geometry.total_blocks);
        put_u32(p, 40, GROUP_BLOCKS as u32);
        put_u32(p, 44, RC_PAGES_PER_GROUP as u32);
        put_u32(p, 48, RC_PER_PAGE as u32);
        put_u32(p, 52, self.geometry.groups as u32);
        seal_frame(
            &mut b[..],
            Frame {
                magic: magic::SUPERBLOCK,
                gen: 0,
                addr: SUPERBLOCK_ADDR,
                aux: FORMAT_VERSION,
            },
        );
        b
    }

    /// Decodes and validates a superblock; `device_blocks` is the device's size in blocks.
    pub fn decode(b: &[u8], device_blocks: u64) -> StoreResult<Superblock> {
        if b[0..8] != magic::SUPERBLOCK {
            return Err(StoreError::NotAStore(if b.iter().all(|&x| x == 0) {
                "the first block is all zeros".into()
            } else {
                format!("it starts with {:02x?}", &b[0..8])
            }));
        }
        let version = u64_at(b, 24);
        if version != FORMAT_VERSION {
            return Err(StoreError::Version(version));
        }
        open_frame(b, magic::SUPERBLOCK, SUPERBLOCK_ADDR)?;
        let p = &b[FRAME_HEADER..];
        let total_blocks = u64_at(p, 32);
        let geometry = Geometry::for_size(total_blocks * BLOCK_SIZE_U64)
            .map_err(|e| StoreError::Corrupt(format!("superblock geometry is invalid: {e}")))?;
        let fields = [
            (u32_at(p, 0) as u64, FORMAT_VERSION, "format version"),
            (u32_at(p, 4) as u64, BLOCK_SIZE_U64, "block size"),
            (u32_at(p, 40) as u64, GROUP_BLOCKS, "group size"),
            (
                u32_at(p, 44) as u64,
                RC_PAGES_PER_GROUP,
                "refcount pages per group",
            ),
            (u32_at(p, 48) as u64, RC_PER_PAGE, "refcounts per page"),
            (u32_at(p, 52) as u64, geometry.groups, "group count"),
        ];
        for (found, want, what) in fields {
            if found != want {
                return Err(StoreError::Corrupt(format!(
                    "superblock {what} is {found}, expected {want}"
                )));
            }
        }
        if total_blocks > device_blocks {
            return Err(StoreError::Truncated {
                expected: total_blocks * BLOCK_SIZE_U64,
                found: device_blocks * BLOCK_SIZE_U64,
            });
        }
        Ok(Superblock {
            uuid: p[8..24].try_into().expect("16 bytes"),
            created_ns: u64_at(p, 24),
            geometry,
        })
    }
}

/// Two bits per item: "written" and "which copy". Used for group selectors (in the commit
/// record) and page selectors (in group headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Selector {
    pub written: bool,
    pub copy: u8,
}

impl Selector {
    fn get(bits: &[u8], i: usize) -> Selector {
        let v = (bits[i / 4] >> ((i % 4) * 2)) & 3;
        Selector {
            written: v & 1 != 0,
            copy: (v >> 1) & 1,
        }
    }

    fn put(bits: &mut [u8], i: usize, s: Selector) {
        let shift = (i % 4) * 2;
        let v = (s.written as u8) | (s.copy << 1);
        bits[i / 4] = (bits[i / 4] & !(3 << shift)) | (v << shift);
    }

    /// The copy a new version goes to: the one not holding the current version.
    pub fn next(&self) -> Selector {
        Selector {
            written: true,
            copy: if self.written { 1 - self.copy } else { 0 },
        }
    }
}

/// The commit record's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitRecord {
    pub gen: u64,
    pub registry_root: Ptr,
    pub registry_height: u8,
    pub next_id: u64,
    pub allocated_blocks: u64,
    pub orphan_head: Ptr,
    pub orphan_count: u64,
    pub time_ns: u64,
    pub clean: bool,
    pub group_selectors: Vec<Selector>,
}

impl CommitRecord {
    pub fn encode(&self, slot_addr: u64) -> Box<[u8; BLOCK_SIZE]> {
        let mut b = Box::new([0u8; BLOCK_SIZE]);
        let p = &mut b[FRAME_HEADER..];
        self.registry_root.encode(&mut p[0..32]);
        p[32] = self.registry_height;
        put_u64(p, 40, self.next_id);
        put_u64(p, 48, self.allocated_blocks);
        self.orphan_head.encode(&mut p[56..88]);
        put_u64(p, 88, self.orphan_count);
        put_u64(p, 96, self.time_ns);
        put_u32(p, 104, self.clean as u32);
        put_u32(p, 108, self.group_selectors.len() as u32);
        for (i, s) in self.group_selectors.iter().enumerate() {
            Selector::put(&mut p[COMMIT_SELECTORS_AT..], i, *s);
        }
        seal_frame(
            &mut b[..],
            Frame {
                magic: magic::COMMIT,
                gen: self.gen,
                addr: slot_addr,
                aux: 0,
            },
        );
        b
    }

    pub fn decode(b: &[u8], slot_addr: u64, groups: u64) -> StoreResult<CommitRecord> {
        let f = open_frame(b, magic::COMMIT, slot_addr)?;
        let p = &b[FRAME_HEADER..];
        let n = u32_at(p, 108) as u64;
        if n != groups {
            return Err(StoreError::Corrupt(format!(
                "commit record {slot_addr} describes {n} groups, the store has {groups}"
            )));
        }
        let registry_height = p[32];
        if registry_height > 16 {
            return Err(StoreError::Corrupt(format!(
                "registry height {registry_height}"
            )));
        }
        Ok(CommitRecord {
            gen: f.gen,
            registry_root: Ptr::decode(&p[0..32]),
            registry_height,
            next_id: u64_at(p, 40),
            allocated_blocks: u64_at(p, 48),
            orphan_head: Ptr::decode(&p[56..88]),
            orphan_count: u64_at(p, 88),
            time_ns: u64_at(p, 96),
            clean: u32_at(p, 104) & 1 != 0,
            group_selectors: (0..groups as usize)
                .map(|i| Selector::get(&p[COMMIT_SELECTORS_AT..], i))
                .collect(),
        })
    }
}

/// A group header's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupHeader {
    pub free: u32,
    pub data_blocks: u32,
    pub page_selectors: Vec<Selector>,
    pub page_free: Vec<u16>,
}

const GH_SELECTORS_AT: usize = 64;
const GH_PAGE_FREE_AT: usize = 192;

impl GroupHeader {
    /// The header of a group never written: everything free.
    pub fn empty(geo: &Geometry, g: u64) -> GroupHeader {
        let pages = geo.group_pages(g);
        GroupHeader {
            free: geo.group_data_blocks(g) as u32,
            data_blocks: geo.group_data_blocks(g) as u32,
            page_selectors: vec![Selector::default(); pages as usize],
            page_free: (0..pages).map(|p| geo.page_blocks(g, p) as u16).collect(),
        }
    }

    pub fn encode(&self, gen: u64, addr: u64, g: u64) -> Box<[u8; BLOCK_SIZE]> {
        let mut b = Box::new([0u8; BLOCK_SIZE]);
        let p = &mut b[FRAME_HEADER..];
        put_u32(p, 0, self.free);
        put_u32(p, 4, self.data_blocks);
        for (i, s) in self.page_selectors.iter().enumerate() {
            Selector::put(&mut p[GH_SELECTORS_AT..], i, *s);
        }
        for (i, f) in self.page_free.iter().enumerate() {
            put_u16(p, GH_PAGE_FREE_AT + 2 * i, *f);
        }
        seal_frame(
            &mut b[..],
            Frame {
                magic: magic::GROUP,
                gen,
                addr,
                aux: g,
            },
        );
        b
    }

    pub fn decode(b: &[u8], addr: u64, geo: &Geometry, g: u64) -> StoreResult<GroupHeader> {
        let f = open_frame(b, magic::GROUP, addr)?;
        if f.aux != g {
            return Err(StoreError::Corrupt(format!(
                "group header at {addr} is for group {}, expected {g}",
                f.aux
            )));
        }
        let p = &b[FRAME_HEADER..];
        let pages = geo.group_pages(g) as usize;
        let h = GroupHeader {
            free: u32_at(p, 0),
            data_blocks: u32_at(p, 4),
            page_selectors: (0..pages)
                .map(|i| Selector::get(&p[GH_SELECTORS_AT..], i))
                .collect(),
            page_free: (0..pages)
                .map(|i| u16_at(p, GH_PAGE_FREE_AT + 2 * i))
                .collect(),
        };
        if h.data_blocks as u64 != geo.group_data_blocks(g)
            || h.page_free.iter().map(|&f| f as u64).sum::<u64>() != h.free as u64
            || h.page_free
                .iter()
                .enumerate()
                .any(|(i, &f)| f as usize > geo.page_blocks(g, i as u64))
        {
            return Err(StoreError::Corrupt(format!(
                "group {g} header at {addr} is inconsistent"
            )));
        }
        Ok(h)
    }
}

/// Encodes a refcount page.
pub fn encode_rc_page(rc: &[u32], gen: u64, addr: u64, page_index: u64) -> Box<[u8; BLOCK_SIZE]> {
    let mut b = Box::new([0u8; BLOCK_SIZE]);
    for (i, v) in rc.iter().enumerate() {
        put_u32(&mut b[FRAME_HEADER..], 4 * i, *v);
    }
    seal_frame(
        &mut b[..],
        Frame {
            magic: magic::RCPAGE,
            gen,
            addr,
            aux: page_index,
        },
    );
    b
}

/// Decodes a refcount page into `out` (RC_PER_PAGE entries).
pub fn decode_rc_page(b: &[u8], addr: u64, page_index: u64, out: &mut [u32]) -> StoreResult<()> {
    let f = open_frame(b, magic::RCPAGE, addr)?;
    if f.aux != page_index {
        return Err(StoreError::Corrupt(format!(
            "refcount page at {addr} is page {}, expected {page_index}",
            f.aux
        )));
    }
    for (i, v) in out.iter_mut().enumerate() {
        *v = u32_at(&b[FRAME_HEADER..], 4 * i);
    }
    Ok(())
}

/// Global index of refcount page `p` of group `g` (recorded in the page's frame).
pub fn rc_page_index(g: u64, p: u64) -> u64 {
    g * RC_PAGES_PER_GROUP + p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_constants_add_up() {
        assert_eq!(RC_PER_PAGE, 1008);
        assert_eq!(GROUP_BLOCKS, 517122);
        assert_eq!(MAX_GROUPS, 15616);
        let geo = Geometry::for_size(64 << 20).unwrap();
        assert_eq!(geo.groups, 1);
        assert_eq!(
            geo.group_data_blocks(0),
            16384 - GROUP_BASE - GROUP_DATA_OFFSET
        );
        let first = geo.data_addr(0, 0, 0);
        assert_eq!(geo.locate(first), Some((0, 0, 0)));
        assert_eq!(geo.locate(first - 1), None);
        assert_eq!(geo.locate(geo.total_blocks), None);
        let big = Geometry::for_size(5 << 40).unwrap();
        let a = big.data_addr(2, 7, 5);
        assert_eq!(big.locate(a), Some((2, 7, 5)));
        assert!(Geometry::for_size(1 << 20).is_err());
        assert!(Geometry::for_size(40 << 40).is_err());
    }

    #[test]
    fn heights() {
        assert_eq!(height_for(4096), 1);
        assert_eq!(height_for(128 * 4096), 1);
        assert_eq!(height_for(128 * 4096 + 1), 2);
        assert_eq!(height_for(16 << 40), 5);
        assert_eq!(height_for(MAX_VDI_BYTES), 6);
    }

    #[test]
    fn frames_detect_damage_and_misdirection() {
        let mut b = [0u8; BLOCK_SIZE];
        b[100] = 42;
        seal_frame(
            &mut b,
            Frame {
                magic: magic::ORPHAN,
                gen: 9,
                addr: 77,
                aux: 3,
            },
        );
        let f = open_frame(&b, magic::ORPHAN, 77).unwrap();
        assert_eq!((f.gen, f.aux), (9, 3));
        assert!(open_frame(&b, magic::ORPHAN, 78).is_err());
        assert!(open_frame(&b, magic::COMMIT, 77).is_err());
        b[2000] ^= 1;
        assert!(open_frame(&b, magic::ORPHAN, 77).is_err());
    }

    #[test]
    fn records_round_trip() {
        let geo = Geometry::for_size(3 << 30).unwrap();
        let sb = Superblock {
            uuid: [7; 16],
            created_ns: 5,
            geometry: geo,
        };
        assert_eq!(
            Superblock::decode(&sb.encode()[..], geo.total_blocks).unwrap(),
            sb
        );
        assert!(matches!(
            Superblock::decode(&sb.encode()[..], geo.total_blocks - 1),
            Err(StoreError::Truncated { .. })
        ));
        let cr = CommitRecord {
            gen: 12,
            registry_root: Ptr::block(99, [3; HASH_LEN]),
            registry_height: 2,
            next_id: 7,
            allocated_blocks: 1000,
            orphan_head: Ptr::HOLE,
            orphan_count: 0,
            time_ns: 1,
            clean: true,
            group_selectors: vec![
                Selector {
                    written: true,
                    copy: 1,
                },
                Selector::default(),
            ],
        };
        assert_eq!(CommitRecord::decode(&cr.encode(2)[..], 2, 2).unwrap(), cr);
        let mut gh = GroupHeader::empty(&geo, 1);
        gh.page_selectors[3] = Selector {
            written: true,
            copy: 1,
        };
        gh.page_free[3] -= 5;
        gh.free -= 5;
        assert_eq!(
            GroupHeader::decode(&gh.encode(4, 10, 1)[..], 10, &geo, 1).unwrap(),
            gh
        );
        let rc: Vec<u32> = (0..RC_PER_PAGE as u32).collect();
        let enc = encode_rc_page(&rc, 3, 50, 6);
        let mut out = vec![0u32; RC_PER_PAGE as usize];
        decode_rc_page(&enc[..], 50, 6, &mut out).unwrap();
        assert_eq!(out, rc);
    }

    #[test]
    fn pointers() {
        let p = Ptr::block(12345, [9; HASH_LEN]);
        let mut b = [0u8; PTR_LEN];
        p.encode(&mut b);
        assert_eq!(Ptr::decode(&b), p);
        assert_eq!(p.kind().unwrap(), PtrKind::Block);
        assert_eq!(Ptr::HOLE.kind().unwrap(), PtrKind::Hole);
        assert_eq!(Ptr::ZERO.kind().unwrap(), PtrKind::Zero);
        b[6] = 9;
        assert!(Ptr::decode(&b).kind().is_err());
        assert!(is_zero(&[0u8; 4096]));
        let mut z = [0u8; 4096];
        z[4095] = 1;
        assert!(!is_zero(&z));
    }
}
