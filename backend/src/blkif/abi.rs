//! The blkif wire format (x86_64 native ABI), as in Xen's `xen/io/blkif.h` and `xen/io/ring.h`.
//!
//! ```text
//!  shared ring (2^order pages, virtually contiguous)
//!  0        4          8        12         16             64        64+112    64+112*n
//!  ├req_prod┼req_event─┼rsp_prod┼rsp_event─┼──pvt + pad───┼entry[0]──┼entry[1]─ …
//!
//!  entry = union { blkif_request (112 B), blkif_response (16 B) }
//!
//!  blkif_request          0 op │1 nr_segs │2 handle │8 id │16 sector │24 seg[11] (8 B each)
//!  blkif_request_discard  0 op │1 flag    │2 handle │8 id │16 sector │24 nr_sectors         (32 B)
//!  blkif_request_indirect 0 op │1 indir_op│2 nr_segs u16 │8 id │16 sector │24 handle │28 grefs[8] (64 B)
//!  blkif_response         0 id │8 op │10 status i16                                        (16 B)
//!  segment                0 gref u32 │4 first_sect │5 last_sect                          (8 B)
//! ```
//!
//! The `#[repr(C)]` structs below *define* the layout; the offsets used to encode and decode
//! are derived from them with `offset_of!`, and compile-time assertions pin every size and
//! offset to the header's values (a unit test also compiles a C probe against the real header).
//! Decoding works on a private copy of the bytes (`[u8; 112]`), never on shared memory, so a
//! guest cannot change a value between its check and its use.

use std::mem::{offset_of, size_of};

/// A grant reference (`grant_ref_t`): the guest's name for one of its pages.
pub type GrantRef = u32;
/// `RING_IDX`: free-running ring index; slots are `idx & (size - 1)`.
pub type RingIdx = u32;

/// Bytes per Xen page (`XEN_PAGE_SIZE`): grants, ring pages and segments are in these units.
pub const PAGE_SIZE: usize = 4096;
/// Bytes per blkif sector (`first_sect`, `sector_number`, `nr_sectors` count these).
pub const SECTOR: u64 = 512;
/// Sectors in one page: a segment's `last_sect` is at most this minus one.
pub const SECTORS_PER_PAGE: u8 = (PAGE_SIZE as u64 / SECTOR) as u8;

pub const BLKIF_OP_READ: u8 = 0;
pub const BLKIF_OP_WRITE: u8 = 1;
pub const BLKIF_OP_WRITE_BARRIER: u8 = 2;
pub const BLKIF_OP_FLUSH_DISKCACHE: u8 = 3;
pub const BLKIF_OP_RESERVED_1: u8 = 4;
pub const BLKIF_OP_DISCARD: u8 = 5;
pub const BLKIF_OP_INDIRECT: u8 = 6;

pub const BLKIF_RSP_EOPNOTSUPP: i16 = -2;
pub const BLKIF_RSP_ERROR: i16 = -1;
pub const BLKIF_RSP_OKAY: i16 = 0;

/// `flag` bit of a discard request asking that the data be made unrecoverable.
pub const BLKIF_DISCARD_SECURE: u8 = 1;

pub const BLKIF_MAX_SEGMENTS_PER_REQUEST: usize = 11;
pub const BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST: usize = 8;
/// Segments that fit in one indirect page (`PAGE_SIZE / sizeof(blkif_request_segment)`).
pub const SEGMENTS_PER_INDIRECT_PAGE: usize = PAGE_SIZE / size_of::<BlkifRequestSegment>();
/// The most segments an indirect request can name at all (8 pages of 512).
pub const MAX_INDIRECT_SEGMENTS_ABI: usize =
    BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * SEGMENTS_PER_INDIRECT_PAGE;

/// Largest `ring-page-order` the protocol allows here (16 pages, 512 entries).
pub const MAX_RING_PAGE_ORDER: u32 = 4;

/// `VDISK_*` bits of the backend's `info` node.
pub const VDISK_CDROM: u32 = 0x1;
pub const VDISK_REMOVABLE: u32 = 0x2;
pub const VDISK_READONLY: u32 = 0x4;

/// The only ring ABI served (`XEN_IO_PROTO_ABI_X86_64`, native on x86_64 hosts).
pub const PROTOCOL_X86_64: &str = "x86_64-abi";
/// The 32-bit x86 ABI string, which differs in layout and is refused.
pub const PROTOCOL_X86_32: &str = "x86_32-abi";

/// `struct blkif_request_segment`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlkifRequestSegment {
    pub gref: GrantRef,
    /// First sector in the page to transfer (inclusive).
    pub first_sect: u8,
    /// Last sector in the page to transfer (inclusive).
    pub last_sect: u8,
}

/// `struct blkif_request` (read, write, barrier, flush).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlkifRequest {
    pub operation: u8,
    pub nr_segments: u8,
    pub handle: u16,
    pub id: u64,
    pub sector_number: u64,
    pub seg: [BlkifRequestSegment; BLKIF_MAX_SEGMENTS_PER_REQUEST],
}

/// `struct blkif_request_discard`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlkifRequestDiscard {
    pub operation: u8,
    pub flag: u8,
    pub handle: u16,
    pub id: u64,
    pub sector_number: u64,
    pub nr_sectors: u64,
}

/// `struct blkif_request_indirect` (x86_64: no trailing pad).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlkifRequestIndirect {
    pub operation: u8,
    pub indirect_op: u8,
    pub nr_segments: u16,
    pub id: u64,
    pub sector_number: u64,
    pub handle: u16,
    pub indirect_grefs: [GrantRef; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST],
}

/// `struct blkif_response`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlkifResponse {
    pub id: u64,
    pub operation: u8,
    pub status: i16,
}

/// `union blkif_sring_entry`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union BlkifSringEntry {
    pub req: BlkifRequest,
    pub rsp: BlkifResponse,
}

/// The header of `struct blkif_sring`; the entries follow at [`SRING_ENTRIES_OFFSET`].
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlkifSringHeader {
    pub req_prod: RingIdx,
    pub req_event: RingIdx,
    pub rsp_prod: RingIdx,
    pub rsp_event: RingIdx,
    /// The `pvt` union (4 bytes) and `__pad[44]`.
    pub pad: [u8; 48],
}

/// Bytes of one ring entry (a request or a response).
pub const ENTRY_SIZE: usize = size_of::<BlkifSringEntry>();
/// Offset of `ring[0]` in `struct blkif_sring`.
pub const SRING_ENTRIES_OFFSET: usize = size_of::<BlkifSringHeader>();
pub const SRING_REQ_PROD: usize = offset_of!(BlkifSringHeader, req_prod);
pub const SRING_REQ_EVENT: usize = offset_of!(BlkifSringHeader, req_event);
pub const SRING_RSP_PROD: usize = offset_of!(BlkifSringHeader, rsp_prod);
pub const SRING_RSP_EVENT: usize = offset_of!(BlkifSringHeader, rsp_event);

// The layout of `xen/io/blkif.h` on x86_64 (DESIGN.md section 5); `cprobe` checks the header.
const _: () = {
    assert!(size_of::<BlkifRequestSegment>() == 8);
    assert!(offset_of!(BlkifRequestSegment, gref) == 0);
    assert!(offset_of!(BlkifRequestSegment, first_sect) == 4);
    assert!(offset_of!(BlkifRequestSegment, last_sect) == 5);
    assert!(size_of::<BlkifRequest>() == 112);
    assert!(offset_of!(BlkifRequest, operation) == 0);
    assert!(offset_of!(BlkifRequest, nr_segments) == 1);
    assert!(offset_of!(BlkifRequest, handle) == 2);
    assert!(offset_of!(BlkifRequest, id) == 8);
    assert!(offset_of!(BlkifRequest, sector_number) == 16);
    assert!(offset_of!(BlkifRequest, seg) == 24);
    assert!(size_of::<BlkifRequestDiscard>() == 32);
    assert!(offset_of!(BlkifRequestDiscard, flag) == 1);
    assert!(offset_of!(BlkifRequestDiscard, handle) == 2);
    assert!(offset_of!(BlkifRequestDiscard, id) == 8);
    assert!(offset_of!(BlkifRequestDiscard, sector_number) == 16);
    assert!(offset_of!(BlkifRequestDiscard, nr_sectors) == 24);
    assert!(size_of::<BlkifRequestIndirect>() == 64);
    assert!(offset_of!(BlkifRequestIndirect, indirect_op) == 1);
    assert!(offset_of!(BlkifRequestIndirect, nr_segments) == 2);
    assert!(offset_of!(BlkifRequestIndirect, id) == 8);
    assert!(offset_of!(BlkifRequestIndirect, sector_number) == 16);
    assert!(offset_of!(BlkifRequestIndirect, handle) == 24);
    assert!(offset_of!(BlkifRequestIndirect, indirect_grefs) == 28);
    assert!(size_of::<BlkifResponse>() == 16);
    assert!(offset_of!(BlkifResponse, id) == 0);
    assert!(offset_of!(BlkifResponse, operation) == 8);
    assert!(offset_of!(BlkifResponse, status) == 10);
    assert!(size_of::<BlkifSringEntry>() == 112);
    assert!(SRING_REQ_PROD == 0);
    assert!(SRING_REQ_EVENT == 4);
    assert!(SRING_RSP_PROD == 8);
    assert!(SRING_RSP_EVENT == 12);
    assert!(SRING_ENTRIES_OFFSET == 64);
    assert!(SEGMENTS_PER_INDIRECT_PAGE == 512);
    assert!(ring_size(0) == 32);
    assert!(ring_size(MAX_RING_PAGE_ORDER) == 512);
};

/// Entries in a ring of `2^order` pages: `__CONST_RING_SIZE`, the largest power of two of
/// entries that fits after the header.
pub const fn ring_size(order: u32) -> u32 {
    let bytes = (PAGE_SIZE << order) - SRING_ENTRIES_OFFSET;
    let n = (bytes / ENTRY_SIZE) as u32;
    // Round down to a power of two.
    1 << (31 - n.leading_zeros())
}

/// Bytes of a ring entry, copied out of shared memory.
pub type EntryBytes = [u8; ENTRY_SIZE];

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn put(b: &mut [u8], off: usize, v: &[u8]) {
    b[off..off + v.len()].copy_from_slice(v);
}

impl BlkifRequestSegment {
    pub const SIZE: usize = size_of::<Self>();

    /// Decodes a segment from its 8 bytes.
    pub fn decode(b: &[u8; 8]) -> Self {
        BlkifRequestSegment {
            gref: u32_at(b, offset_of!(Self, gref)),
            first_sect: b[offset_of!(Self, first_sect)],
            last_sect: b[offset_of!(Self, last_sect)],
        }
    }

    pub fn encode(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        put(&mut b, offset_of!(Self, gref), &self.gref.to_le_bytes());
        b[offset_of!(Self, first_sect)] = self.first_sect;
        b[offset_of!(Self, last_sect)] = self.last_sect;
        b
    }
}

impl BlkifRequest {
    pub fn decode(b: &EntryBytes) -> Self {
        let mut seg = [BlkifRequestSegment::default(); BLKIF_MAX_SEGMENTS_PER_REQUEST];
        let base = offset_of!(Self, seg);
        for (i, s) in seg.iter_mut().enumerate() {
            let off = base + i * BlkifRequestSegment::SIZE;
            let mut sb = [0u8; 8];
            sb.copy_from_slice(&b[off..off + 8]);
            *s = BlkifRequestSegment::decode(&sb);
        }
        BlkifRequest {
            operation: b[offset_of!(Self, operation)],
            nr_segments: b[offset_of!(Self, nr_segments)],
            handle: u16_at(b, offset_of!(Self, handle)),
            id: u64_at(b, offset_of!(Self, id)),
            sector_number: u64_at(b, offset_of!(Self, sector_number)),
            seg,
        }
    }

    pub fn encode(&self) -> EntryBytes {
        let mut b = [0u8; ENTRY_SIZE];
        b[offset_of!(Self, operation)] = self.operation;
        b[offset_of!(Self, nr_segments)] = self.nr_segments;
        put(&mut b, offset_of!(Self, handle), &self.handle.to_le_bytes());
        put(&mut b, offset_of!(Self, id), &self.id.to_le_bytes());
        put(
            &mut b,
            offset_of!(Self, sector_number),
            &self.sector_number.to_le_bytes(),
        );
        let base = offset_of!(Self, seg);
        for (i, s) in self.seg.iter().enumerate() {
            put(&mut b, base + i * BlkifRequestSegment::SIZE, &s.encode());
        }
        b
    }
}

impl BlkifRequestDiscard {
    pub fn decode(b: &EntryBytes) -> Self {
        BlkifRequestDiscard {
            operation: b[offset_of!(Self, operation)],
            flag: b[offset_of!(Self, flag)],
            handle: u16_at(b, offset_of!(Self, handle)),
            id: u64_at(b, offset_of!(Self, id)),
            sector_number: u64_at(b, offset_of!(Self, sector_number)),
            nr_sectors: u64_at(b, offset_of!(Self, nr_sectors)),
        }
    }

    pub fn encode(&self) -> EntryBytes {
        let mut b = [0u8; ENTRY_SIZE];
        b[offset_of!(Self, operation)] = self.operation;
        b[offset_of!(Self, flag)] = self.flag;
        put(&mut b, offset_of!(Self, handle), &self.handle.to_le_bytes());
        put(&mut b, offset_of!(Self, id), &self.id.to_le_bytes());
        put(
            &mut b,
            offset_of!(Self, sector_number),
            &self.sector_number.to_le_bytes(),
        );
        put(
            &mut b,
            offset_of!(Self, nr_sectors),
            &self.nr_sectors.to_le_bytes(),
        );
        b
    }
}

impl BlkifRequestIndirect {
    pub fn decode(b: &EntryBytes) -> Self {
        let mut indirect_grefs = [0; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
        let base = offset_of!(Self, indirect_grefs);
        for (i, g) in indirect_grefs.iter_mut().enumerate() {
            *g = u32_at(b, base + 4 * i);
        }
        BlkifRequestIndirect {
            operation: b[offset_of!(Self, operation)],
            indirect_op: b[offset_of!(Self, indirect_op)],
            nr_segments: u16_at(b, offset_of!(Self, nr_segments)),
            id: u64_at(b, offset_of!(Self, id)),
            sector_number: u64_at(b, offset_of!(Self, sector_number)),
            handle: u16_at(b, offset_of!(Self, handle)),
            indirect_grefs,
        }
    }

    pub fn encode(&self) -> EntryBytes {
        let mut b = [0u8; ENTRY_SIZE];
        b[offset_of!(Self, operation)] = self.operation;
        b[offset_of!(Self, indirect_op)] = self.indirect_op;
        put(
            &mut b,
            offset_of!(Self, nr_segments),
            &self.nr_segments.to_le_bytes(),
        );
        put(&mut b, offset_of!(Self, id), &self.id.to_le_bytes());
        put(
            &mut b,
            offset_of!(Self, sector_number),
            &self.sector_number.to_le_bytes(),
        );
        put(&mut b, offset_of!(Self, handle), &self.handle.to_le_bytes());
        let base = offset_of!(Self, indirect_grefs);
        for (i, g) in self.indirect_grefs.iter().enumerate() {
            put(&mut b, base + 4 * i, &g.to_le_bytes());
        }
        b
    }
}

impl BlkifResponse {
    pub const SIZE: usize = size_of::<Self>();

    pub fn decode(b: &[u8; 16]) -> Self {
        BlkifResponse {
            id: u64_at(b, offset_of!(Self, id)),
            operation: b[offset_of!(Self, operation)],
            status: u16_at(b, offset_of!(Self, status)) as i16,
        }
    }

    /// The 16 bytes of the response (padding zeroed, so no backend memory leaks to the guest).
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        put(&mut b, offset_of!(Self, id), &self.id.to_le_bytes());
        b[offset_of!(Self, operation)] = self.operation;
        put(&mut b, offset_of!(Self, status), &self.status.to_le_bytes());
        b
    }
}

/// The name of an operation code, for logs.
pub fn op_name(op: u8) -> &'static str {
    match op {
        BLKIF_OP_READ => "read",
        BLKIF_OP_WRITE => "write",
        BLKIF_OP_WRITE_BARRIER => "write-barrier",
        BLKIF_OP_FLUSH_DISKCACHE => "flush-diskcache",
        BLKIF_OP_RESERVED_1 => "reserved-1",
        BLKIF_OP_DISCARD => "discard",
        BLKIF_OP_INDIRECT => "indirect",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_sizes_by_order() {
        let sizes: Vec<u32> = (0..=MAX_RING_PAGE_ORDER).map(ring_size).collect();
        assert_eq!(sizes, vec![32, 64, 128, 256, 512]);
    }

    #[test]
    fn encode_decode_round_trip() {
        let mut r = BlkifRequest {
            operation: BLKIF_OP_WRITE,
            nr_segments: 3,
            handle: 0x1234,
            id: 0xdead_beef_0102_0304,
            sector_number: 77,
            ..Default::default()
        };
        r.seg[0] = BlkifRequestSegment {
            gref: 9,
            first_sect: 1,
            last_sect: 7,
        };
        r.seg[10] = BlkifRequestSegment {
            gref: u32::MAX,
            first_sect: 0,
            last_sect: 0,
        };
        let b = r.encode();
        assert_eq!(b[0], 1);
        assert_eq!(&b[8..16], &0xdead_beef_0102_0304u64.to_le_bytes());
        assert_eq!(&b[24..28], &9u32.to_le_bytes());
        assert_eq!(BlkifRequest::decode(&b), r);

        let d = BlkifRequestDiscard {
            operation: BLKIF_OP_DISCARD,
            flag: BLKIF_DISCARD_SECURE,
            handle: 2,
            id: 5,
            sector_number: 8,
            nr_sectors: 1 << 40,
        };
        let b = d.encode();
        assert_eq!(&b[24..32], &(1u64 << 40).to_le_bytes());
        assert_eq!(BlkifRequestDiscard::decode(&b), d);

        let i = BlkifRequestIndirect {
            operation: BLKIF_OP_INDIRECT,
            indirect_op: BLKIF_OP_READ,
            nr_segments: 300,
            id: 1,
            sector_number: 2,
            handle: 3,
            indirect_grefs: [1, 2, 3, 4, 5, 6, 7, 8],
        };
        let b = i.encode();
        assert_eq!(&b[28..32], &1u32.to_le_bytes());
        assert_eq!(BlkifRequestIndirect::decode(&b), i);

        let rsp = BlkifResponse {
            id: 42,
            operation: BLKIF_OP_READ,
            status: BLKIF_RSP_EOPNOTSUPP,
        };
        let b = rsp.encode();
        assert_eq!(&b[10..12], &(-2i16).to_le_bytes());
        assert_eq!(BlkifResponse::decode(&b), rsp);
    }
}
