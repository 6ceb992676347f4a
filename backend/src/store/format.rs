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
/// The format this code writes. Older stores (version 1: no intent log; version 2: no
/// rollback entries or staging names; version 3: no snapshot schedules; version 4: no
/// remote-backed VDIs; version 5: no migration names; version 6: no dedup index) are read and
/// written in their own format until `parallax upgrade` moves them to this one.
pub const FORMAT_VERSION: u64 = 7;
/// The first format with a dedup index (FORMAT.md §11).
pub const DEDUP_VERSION: u64 = 7;
/// The oldest format this code opens.
pub const OLDEST_VERSION: u64 = 1;

pub const SUPERBLOCK_ADDR: u64 = 0;
pub const COMMIT_SLOTS: [u64; 2] = [1, 2];
/// First block of group 0.
pub const GROUP_BASE: u64 = 3;

/// A block's bytes, owned (what the encoders return).
pub type BlockBuf = Box<[u8; BLOCK_SIZE]>;

/// Header of a framed block; the payload follows.
pub const FRAME_HEADER: usize = 64;
pub const FRAME_PAYLOAD: usize = BLOCK_SIZE - FRAME_HEADER;
const FRAME_CHECKSUM: std::ops::Range<usize> = frame_at::CHECKSUM..FRAME_HEADER;

/// Refcounts (u32) in one refcount page.
pub const RC_PER_PAGE: u64 = (FRAME_PAYLOAD / 4) as u64; // 1008
pub const RC_PAGES_PER_GROUP: u64 = 512;
pub const GROUP_HEADER_BLOCKS: u64 = 2;
pub const GROUP_RC_BLOCKS: u64 = 2 * RC_PAGES_PER_GROUP;
/// Offset of the first data block within a group.
pub const GROUP_DATA_OFFSET: u64 = GROUP_HEADER_BLOCKS + GROUP_RC_BLOCKS;
pub const GROUP_DATA_BLOCKS: u64 = RC_PAGES_PER_GROUP * RC_PER_PAGE; // 516096
pub const GROUP_BLOCKS: u64 = GROUP_DATA_OFFSET + GROUP_DATA_BLOCKS; // 517122

/// Groups whose selector bits fit in a commit record.
pub const MAX_GROUPS: u64 = ((FRAME_PAYLOAD - commit_at::SELECTORS) * 4) as u64; // 15360
/// The same in format version 1.
pub const MAX_GROUPS_V1: u64 = ((FRAME_PAYLOAD - commit_at::SELECTORS_V1) * 4) as u64; // 15616
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

/// Byte offsets within a framed block's header (FORMAT.md §3).
pub mod frame_at {
    pub const MAGIC: usize = 0;
    pub const GEN: usize = 8;
    pub const SELF: usize = 16;
    pub const AUX: usize = 24;
    pub const CHECKSUM: usize = 32;
}

/// Superblock payload offsets (FORMAT.md §3.1).
pub mod superblock_at {
    pub const VERSION: usize = 0;
    pub const BLOCK_SIZE: usize = 4;
    pub const UUID: usize = 8;
    pub const CREATED: usize = 24;
    pub const TOTAL_BLOCKS: usize = 32;
    pub const GROUP_BLOCKS: usize = 40;
    pub const RC_PAGES: usize = 44;
    pub const RC_PER_PAGE: usize = 48;
    pub const GROUPS: usize = 52;
}

/// Commit record payload offsets (FORMAT.md §3.2).
pub mod commit_at {
    pub const REGISTRY_ROOT: usize = 0;
    pub const REGISTRY_HEIGHT: usize = 32;
    pub const NEXT_ID: usize = 40;
    pub const ALLOCATED: usize = 48;
    pub const ORPHAN_HEAD: usize = 56;
    pub const ORPHAN_COUNT: usize = 88;
    pub const TIME: usize = 96;
    pub const FLAGS: usize = 104;
    pub const GROUPS: usize = 108;
    /// Version 2: where recovery starts reading the intent log (FORMAT.md §9).
    pub const LOG_HEAD: usize = 112;
    pub const LOG_SEQ: usize = 120;
    pub const LOG_LSN: usize = 128;
    pub const LOG_CHAIN: usize = 136;
    /// Version 7: the dedup index (FORMAT.md §11): its B+tree root and height, its settings
    /// and its entry count. Zero in older versions, which reads as an empty index.
    pub const DEDUP_ROOT: usize = 144;
    pub const DEDUP_HEIGHT: usize = 176;
    pub const DEDUP_FLAGS: usize = 177;
    pub const DEDUP_ENTRIES: usize = 184;
    /// Group selectors: at 128 in version 1, at 192 in version 2 (room for the log fields
    /// and what later versions add).
    pub const SELECTORS_V1: usize = 128;
    pub const SELECTORS: usize = 192;
}
const _: () = assert!(commit_at::DEDUP_ENTRIES + 8 <= commit_at::SELECTORS);

/// Log block payload offsets (FORMAT.md §9); entries follow.
pub mod log_at {
    pub const NEXT: usize = 0;
    pub const FIRST_LSN: usize = 8;
    pub const CHAIN: usize = 16;
    /// Entries before this LSN were durable, data and all, when the block was written.
    pub const SYNCED_LSN: usize = 24;
    pub const ENTRIES: usize = 32;
}
/// Entry bytes one log block holds.
pub const LOG_BLOCK_ENTRIES: usize = FRAME_PAYLOAD - log_at::ENTRIES;

/// Group header payload offsets (FORMAT.md §3.3).
pub mod group_at {
    pub const FREE: usize = 0;
    pub const DATA_BLOCKS: usize = 4;
    pub const PAGE_SELECTORS: usize = 64;
    pub const PAGE_FREE: usize = 192;
}

/// Orphan-list block payload layout (FORMAT.md §7): entries of a pointer and a level, and
/// the pointer to the next block.
pub const ORPHANS_PER_BLOCK: usize = 100;
pub const ORPHAN_ENTRY_LEN: usize = 40;
pub const ORPHAN_LEVEL_AT: usize = PTR_LEN;
pub const ORPHAN_NEXT_AT: usize = 4000;
const _: () = assert!(ORPHANS_PER_BLOCK * ORPHAN_ENTRY_LEN <= ORPHAN_NEXT_AT);
const _: () = assert!(ORPHAN_NEXT_AT + PTR_LEN <= FRAME_PAYLOAD);

/// Magic numbers of framed blocks.
pub mod magic {
    pub const SUPERBLOCK: [u8; 8] = *b"PARALLAX";
    pub const COMMIT: [u8; 8] = *b"PXCOMMIT";
    pub const GROUP: [u8; 8] = *b"PXGROUPH";
    pub const RCPAGE: [u8; 8] = *b"PXRCPAGE";
    pub const ORPHAN: [u8; 8] = *b"PXORPHAN";
    pub const LOG: [u8; 8] = *b"PXLOGBLK";
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
    block[frame_at::MAGIC..frame_at::MAGIC + 8].copy_from_slice(&f.magic);
    put_u64(block, frame_at::GEN, f.gen);
    put_u64(block, frame_at::SELF, f.addr);
    put_u64(block, frame_at::AUX, f.aux);
    block[FRAME_CHECKSUM].fill(0);
    let sum = blake3::hash(block);
    block[FRAME_CHECKSUM].copy_from_slice(sum.as_bytes());
}

/// Checks a framed block read from `addr`: magic, self address, checksum. Returns its header.
pub fn open_frame(block: &[u8], want_magic: [u8; 8], addr: u64) -> StoreResult<Frame> {
    let f = Frame {
        magic: block[frame_at::MAGIC..frame_at::MAGIC + 8]
            .try_into()
            .expect("8 bytes"),
        gen: u64_at(block, frame_at::GEN),
        addr: u64_at(block, frame_at::SELF),
        aux: u64_at(block, frame_at::AUX),
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
    /// The geometry of a new store of `bytes` bytes (rounded down to whole blocks).
    pub fn for_size(bytes: u64) -> StoreResult<Geometry> {
        Self::for_version(bytes, FORMAT_VERSION)
    }

    /// The geometry of a store of `bytes` bytes in format `version`.
    pub fn for_version(bytes: u64, version: u64) -> StoreResult<Geometry> {
        let max_groups = if version == 1 {
            MAX_GROUPS_V1
        } else {
            MAX_GROUPS
        };
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
        if groups > max_groups {
            return Err(StoreError::Invalid(format!(
                "a format-{version} store holds at most {max_groups} groups (about {} TiB)",
                (max_groups * GROUP_DATA_BLOCKS * BLOCK_SIZE_U64) >> 40
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
    /// The format version (1 or 2).
    pub version: u64,
    pub uuid: [u8; 16],
    pub created_ns: u64,
    pub geometry: Geometry,
}

impl Superblock {
    pub fn encode(&self) -> Box<[u8; BLOCK_SIZE]> {
        let mut b = Box::new([0u8; BLOCK_SIZE]);
        let p = &mut b[FRAME_HEADER..];
        use superblock_at as at;
        put_u32(p, at::VERSION, self.version as u32);
        put_u32(p, at::BLOCK_SIZE, BLOCK_SIZE as u32);
        p[at::UUID..at::UUID + 16].copy_from_slice(&self.uuid);
        put_u64(p, at::CREATED, self.created_ns);
        put_u64(p, at::TOTAL_BLOCKS, self.geometry.total_blocks);
        put_u32(p, at::GROUP_BLOCKS, GROUP_BLOCKS as u32);
        put_u32(p, at::RC_PAGES, RC_PAGES_PER_GROUP as u32);
        put_u32(p, at::RC_PER_PAGE, RC_PER_PAGE as u32);
        put_u32(p, at::GROUPS, self.geometry.groups as u32);
        seal_frame(
            &mut b[..],
            Frame {
                magic: magic::SUPERBLOCK,
                gen: 0,
                addr: SUPERBLOCK_ADDR,
                aux: self.version,
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
        let version = u64_at(b, frame_at::AUX);
        if !(OLDEST_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(StoreError::Version(version));
        }
        open_frame(b, magic::SUPERBLOCK, SUPERBLOCK_ADDR)?;
        use superblock_at as at;
        let p = &b[FRAME_HEADER..];
        let total_blocks = u64_at(p, at::TOTAL_BLOCKS);
        let geometry = Geometry::for_version(total_blocks * BLOCK_SIZE_U64, version)
            .map_err(|e| StoreError::Corrupt(format!("superblock geometry is invalid: {e}")))?;
        let fields = [
            (u32_at(p, at::VERSION) as u64, version, "format version"),
            (
                u32_at(p, at::BLOCK_SIZE) as u64,
                BLOCK_SIZE_U64,
                "block size",
            ),
            (
                u32_at(p, at::GROUP_BLOCKS) as u64,
                GROUP_BLOCKS,
                "group size",
            ),
            (
                u32_at(p, at::RC_PAGES) as u64,
                RC_PAGES_PER_GROUP,
                "refcount pages per group",
            ),
            (
                u32_at(p, at::RC_PER_PAGE) as u64,
                RC_PER_PAGE,
                "refcounts per page",
            ),
            (u32_at(p, at::GROUPS) as u64, geometry.groups, "group count"),
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
            version,
            uuid: p[at::UUID..at::UUID + 16].try_into().expect("16 bytes"),
            created_ns: u64_at(p, at::CREATED),
            geometry,
        })
    }
}

impl Superblock {
    /// A superblock that fails its checksum but differs from a valid one only in the bytes an
    /// upgrade rewrites (the version fields, each reading `v` or `v + 1`, and the checksum): an
    /// upgrade step interrupted by a crash. It is read as the older version `v` (both fields
    /// reading `v + 1` are read as `v`), since an upgrade step writes nothing of the new
    /// version before the new superblock is durable, and it starts from a store closed
    /// cleanly, which reads the same in either version. (Damage to the UUID or creation time
    /// alone looks the same; those fields carry no structure.)
    pub fn decode_torn_upgrade(b: &[u8], device_blocks: u64) -> Option<Superblock> {
        if b.len() != BLOCK_SIZE || b[0..8] != magic::SUPERBLOCK {
            return None;
        }
        let p = &b[FRAME_HEADER..];
        let total_blocks = u64_at(p, superblock_at::TOTAL_BLOCKS);
        let fields = [
            u64_at(b, frame_at::AUX),
            u32_at(p, superblock_at::VERSION) as u64,
        ];
        let (lo, hi) = (fields[0].min(fields[1]), fields[0].max(fields[1]));
        // Both fields alike: either both new (read as the older version) or both old with
        // only the checksum torn; a store closed cleanly reads the same either way.
        let version = if lo == hi {
            lo.saturating_sub(1).max(OLDEST_VERSION)
        } else {
            lo
        };
        if lo < OLDEST_VERSION || hi - lo > 1 || hi > FORMAT_VERSION {
            return None;
        }
        let geometry = Geometry::for_version(total_blocks * BLOCK_SIZE_U64, version).ok()?;
        if total_blocks > device_blocks {
            return None;
        }
        let sb = Superblock {
            version,
            uuid: p[superblock_at::UUID..superblock_at::UUID + 16]
                .try_into()
                .ok()?,
            created_ns: u64_at(p, superblock_at::CREATED),
            geometry,
        };
        let want = sb.encode();
        let version_at = FRAME_HEADER + superblock_at::VERSION;
        let same = (0..BLOCK_SIZE).all(|i| {
            (frame_at::AUX..FRAME_HEADER).contains(&i)
                || (version_at..version_at + 4).contains(&i)
                || b[i] == want[i]
        });
        same.then_some(sb)
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
    /// Where recovery reads the intent log from (version 2; all zero in version 1).
    pub log: LogPosition,
    /// The layout this record was (or is to be) written in: 1 or 2 ([`commit_layout`]).
    pub version: u64,
    /// The dedup index (format 7; empty, with default settings, before).
    pub dedup: DedupRoot,
}

/// Where the dedup index is and how the store dedups (FORMAT.md §11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupRoot {
    pub root: Ptr,
    /// 0 = empty.
    pub height: u8,
    /// Bit 0: inline dedup off. Bit 1: trust the hash (no byte compare).
    pub flags: u8,
    pub entries: u64,
}

impl Default for DedupRoot {
    fn default() -> Self {
        DedupRoot {
            root: Ptr::HOLE,
            height: 0,
            flags: 0,
            entries: 0,
        }
    }
}

impl DedupRoot {
    pub const INLINE_OFF: u8 = 1;
    pub const TRUST_HASH: u8 = 2;
}

/// The commit record layout a store of format `version` writes: 1 for format 1, else 2
/// (format 3 changed no layout).
pub fn commit_layout(version: u64) -> u64 {
    version.min(2)
}

/// A checkpoint's place in the intent log: entries from `lsn` on are not in the checkpoint,
/// and are found from the block at `head`, which carries sequence number `seq` and belongs to
/// chain `chain` (a random id per session, so that blocks a crashed session left behind are
/// never read as part of another). `head == 0`: no log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogPosition {
    pub head: u64,
    pub seq: u64,
    pub lsn: u64,
    pub chain: u64,
}

impl CommitRecord {
    /// Encodes the record for slot `slot_addr`, in the layout of `self.version`. The frame's
    /// `aux` names the layout (0 for version 1, which wrote 0 there), so that a record can be
    /// read whatever the superblock says.
    pub fn encode(&self, slot_addr: u64) -> Box<[u8; BLOCK_SIZE]> {
        let mut b = Box::new([0u8; BLOCK_SIZE]);
        let p = &mut b[FRAME_HEADER..];
        use commit_at as at;
        self.registry_root
            .encode(&mut p[at::REGISTRY_ROOT..at::REGISTRY_ROOT + PTR_LEN]);
        p[at::REGISTRY_HEIGHT] = self.registry_height;
        put_u64(p, at::NEXT_ID, self.next_id);
        put_u64(p, at::ALLOCATED, self.allocated_blocks);
        self.orphan_head
            .encode(&mut p[at::ORPHAN_HEAD..at::ORPHAN_HEAD + PTR_LEN]);
        put_u64(p, at::ORPHAN_COUNT, self.orphan_count);
        put_u64(p, at::TIME, self.time_ns);
        put_u32(p, at::FLAGS, self.clean as u32);
        put_u32(p, at::GROUPS, self.group_selectors.len() as u32);
        let selectors = if self.version == 1 {
            at::SELECTORS_V1
        } else {
            put_u64(p, at::LOG_HEAD, self.log.head);
            put_u64(p, at::LOG_SEQ, self.log.seq);
            put_u64(p, at::LOG_LSN, self.log.lsn);
            put_u64(p, at::LOG_CHAIN, self.log.chain);
            self.dedup
                .root
                .encode(&mut p[at::DEDUP_ROOT..at::DEDUP_ROOT + PTR_LEN]);
            p[at::DEDUP_HEIGHT] = self.dedup.height;
            p[at::DEDUP_FLAGS] = self.dedup.flags;
            put_u64(p, at::DEDUP_ENTRIES, self.dedup.entries);
            at::SELECTORS
        };
        for (i, s) in self.group_selectors.iter().enumerate() {
            Selector::put(&mut p[selectors..], i, *s);
        }
        seal_frame(
            &mut b[..],
            Frame {
                magic: magic::COMMIT,
                gen: self.gen,
                addr: slot_addr,
                aux: if self.version == 1 { 0 } else { self.version },
            },
        );
        b
    }

    pub fn decode(b: &[u8], slot_addr: u64, groups: u64) -> StoreResult<CommitRecord> {
        let f = open_frame(b, magic::COMMIT, slot_addr)?;
        use commit_at as at;
        let p = &b[FRAME_HEADER..];
        let (version, selectors, log) = match f.aux {
            0 => (1, at::SELECTORS_V1, LogPosition::default()),
            2 => (
                2,
                at::SELECTORS,
                LogPosition {
                    head: u64_at(p, at::LOG_HEAD),
                    seq: u64_at(p, at::LOG_SEQ),
                    lsn: u64_at(p, at::LOG_LSN),
                    chain: u64_at(p, at::LOG_CHAIN),
                },
            ),
            v => {
                return Err(StoreError::Corrupt(format!(
                    "commit record {slot_addr} has unknown layout {v}"
                )))
            }
        };
        if (groups as usize).div_ceil(4) > FRAME_PAYLOAD - selectors {
            return Err(StoreError::Corrupt(format!(
                "commit record {slot_addr}: {groups} groups do not fit its layout"
            )));
        }
        let n = u32_at(p, at::GROUPS) as u64;
        if n != groups {
            return Err(StoreError::Corrupt(format!(
                "commit record {slot_addr} describes {n} groups, the store has {groups}"
            )));
        }
        let registry_height = p[at::REGISTRY_HEIGHT];
        if registry_height > 16 {
            return Err(StoreError::Corrupt(format!(
                "registry height {registry_height}"
            )));
        }
        let dedup = if version == 1 {
            DedupRoot::default()
        } else {
            DedupRoot {
                root: Ptr::decode(&p[at::DEDUP_ROOT..at::DEDUP_ROOT + PTR_LEN]),
                height: p[at::DEDUP_HEIGHT],
                flags: p[at::DEDUP_FLAGS],
                entries: u64_at(p, at::DEDUP_ENTRIES),
            }
        };
        if dedup.height > 16 || (dedup.height == 0) != dedup.root.is_hole() {
            return Err(StoreError::Corrupt(format!(
                "commit record {slot_addr}: dedup index root and height {} disagree",
                dedup.height
            )));
        }
        Ok(CommitRecord {
            gen: f.gen,
            registry_root: Ptr::decode(&p[at::REGISTRY_ROOT..at::REGISTRY_ROOT + PTR_LEN]),
            registry_height,
            next_id: u64_at(p, at::NEXT_ID),
            allocated_blocks: u64_at(p, at::ALLOCATED),
            orphan_head: Ptr::decode(&p[at::ORPHAN_HEAD..at::ORPHAN_HEAD + PTR_LEN]),
            orphan_count: u64_at(p, at::ORPHAN_COUNT),
            time_ns: u64_at(p, at::TIME),
            clean: u32_at(p, at::FLAGS) & 1 != 0,
            group_selectors: (0..groups as usize)
                .map(|i| Selector::get(&p[selectors..], i))
                .collect(),
            log,
            version,
            dedup,
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

const _: () = assert!(group_at::PAGE_FREE + 2 * RC_PAGES_PER_GROUP as usize <= FRAME_PAYLOAD);
const _: () = assert!(
    group_at::PAGE_SELECTORS + (RC_PAGES_PER_GROUP as usize).div_ceil(4) <= group_at::PAGE_FREE
);

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
        put_u32(p, group_at::FREE, self.free);
        put_u32(p, group_at::DATA_BLOCKS, self.data_blocks);
        for (i, s) in self.page_selectors.iter().enumerate() {
            Selector::put(&mut p[group_at::PAGE_SELECTORS..], i, *s);
        }
        for (i, f) in self.page_free.iter().enumerate() {
            put_u16(p, group_at::PAGE_FREE + 2 * i, *f);
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
            free: u32_at(p, group_at::FREE),
            data_blocks: u32_at(p, group_at::DATA_BLOCKS),
            page_selectors: (0..pages)
                .map(|i| Selector::get(&p[group_at::PAGE_SELECTORS..], i))
                .collect(),
            page_free: (0..pages)
                .map(|i| u16_at(p, group_at::PAGE_FREE + 2 * i))
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
        assert_eq!(MAX_GROUPS, 15360);
        assert_eq!(MAX_GROUPS_V1, 15616);
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
        // Between the two limits: a version-1 store, too big for version 2.
        let bytes = (GROUP_BASE + 15500 * GROUP_BLOCKS) * BLOCK_SIZE_U64;
        assert!(Geometry::for_version(bytes, 1).is_ok());
        assert!(Geometry::for_version(bytes, 2).is_err());
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
            version: FORMAT_VERSION,
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
        let old = Superblock {
            version: 1,
            ..sb.clone()
        };
        assert_eq!(
            Superblock::decode(&old.encode()[..], geo.total_blocks).unwrap(),
            old
        );
        let future = Superblock {
            version: FORMAT_VERSION + 1,
            ..sb.clone()
        };
        assert!(matches!(
            Superblock::decode(&future.encode()[..], geo.total_blocks),
            Err(StoreError::Version(v)) if v == FORMAT_VERSION + 1
        ));
        let mut cr = CommitRecord {
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
            log: LogPosition {
                head: 5000,
                seq: 77,
                lsn: 123456,
                chain: 0xfeed,
            },
            version: 2,
            dedup: DedupRoot {
                root: Ptr::block(4242, [9; HASH_LEN]),
                height: 3,
                flags: DedupRoot::TRUST_HASH,
                entries: 31337,
            },
        };
        assert_eq!(CommitRecord::decode(&cr.encode(2)[..], 2, 2).unwrap(), cr);
        // Version 1 has no log or dedup fields and its selectors at 128.
        cr.version = 1;
        cr.log = LogPosition::default();
        cr.dedup = DedupRoot::default();
        let v1 = cr.encode(1);
        assert_eq!(CommitRecord::decode(&v1[..], 1, 2).unwrap(), cr);
        assert_eq!(v1[FRAME_HEADER + commit_at::SELECTORS_V1], 0b11);
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

    /// An upgrade step rewrites the version fields and the checksum of the superblock;
    /// whatever mix of old and new bytes a crash leaves there reads as a version at most the
    /// new one and at least 1, the geometry unchanged, and nothing else.
    #[test]
    fn a_torn_upgrade_reads_as_the_old_version() {
        for from in OLDEST_VERSION..FORMAT_VERSION {
            torn_upgrade_step(from);
        }
    }

    fn torn_upgrade_step(from: u64) {
        let geo = Geometry::for_size(1 << 30).unwrap();
        let v1 = Superblock {
            version: from,
            uuid: [3; 16],
            created_ns: 9,
            geometry: geo,
        };
        let v2 = Superblock {
            version: from + 1,
            ..v1.clone()
        };
        let (old, new) = (v1.encode(), v2.encode());
        let differ: Vec<usize> = (0..BLOCK_SIZE).filter(|&i| old[i] != new[i]).collect();
        assert!(
            differ.iter().all(|&i| i < 512),
            "the upgrade changes sector 0 only"
        );
        for mask in 0u64..64 {
            let mut torn = old.clone();
            for (k, &i) in differ.iter().enumerate() {
                if (mask >> (k % 6)) & 1 == 1 {
                    torn[i] = new[i];
                }
            }
            let got = Superblock::decode(&torn[..], geo.total_blocks)
                .ok()
                .or_else(|| Superblock::decode_torn_upgrade(&torn[..], geo.total_blocks));
            let got = got.expect("a torn upgrade opens");
            let fine = got.version <= from + 1
                && got.geometry == v1.geometry
                && got.uuid == v1.uuid
                && got.created_ns == v1.created_ns;
            assert!(fine, "{got:?}");
        }
        for at in [
            FRAME_HEADER + superblock_at::GROUP_BLOCKS,
            FRAME_HEADER + superblock_at::TOTAL_BLOCKS,
            FRAME_HEADER + superblock_at::VERSION,
            frame_at::AUX + 1,
            2000,
        ] {
            let mut damaged = new.clone();
            damaged[at] ^= 4;
            assert!(
                Superblock::decode_torn_upgrade(&damaged[..], geo.total_blocks).is_none(),
                "damage at {at}"
            );
        }
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
