//! Guest memory: pages another party (the guest) can write at any moment.
//!
//! This is one of the two places (with [`super::ring`]) where the ring layer touches shared
//! memory through raw pointers. The rules:
//!
//! * A [`GuestPages`] implementation promises that its page pointers stay valid (mapped, and
//!   never faulting) until it is dropped. Grant mappings unmap themselves in `Drop`.
//! * Bytes the backend *decides on* (ring entries, indirect segment lists, WRITE data) are first
//!   copied out with volatile 8-byte loads ([`copy_from_guest`]); decisions are made on the copy,
//!   so a value is read exactly once.
//! * The only Rust reference ever formed over guest memory is the `&mut [u8]` handed to
//!   [`crate::disk::Disk::read_at`] for a READ ([`with_guest_slice_mut`]): disk data goes
//!   straight into the granted page with no bounce copy. That slice is only written by the disk
//!   and never read back by us; if the guest scribbles on it concurrently it only spoils its own
//!   read result.
//! * WRITE data is copied out *before* it reaches the disk: the store checksums every block, and
//!   if the guest changed the page between hashing and writing, the store would hold a block
//!   that fails its own checksum. The copy is the block the guest is deemed to have written.

use std::ptr::NonNull;

use super::abi::PAGE_SIZE;

/// Pages of guest memory mapped into this process (a grant mapping).
///
/// # Safety
///
/// Implementors guarantee that for every `i < self.count()`, `self.page(i)` points to
/// [`PAGE_SIZE`] bytes, 8-byte aligned, that stay mapped and accessible without faulting
/// (readable, and writable when [`GuestPages::writable`] is true) until `self` is dropped, and
/// that pages with the same [`GuestPages::region`] belong to one mapping (so an address range
/// spanning adjacent pages of one region is a single allocation).
pub unsafe trait GuestPages: Send + Sync {
    /// Number of pages.
    fn count(&self) -> usize;
    /// Start of page `i` (`i < count()`).
    fn page(&self, i: usize) -> NonNull<u8>;
    /// Whether the pages may be written.
    fn writable(&self) -> bool;
    /// Which mapping page `i` lives in; see the trait's safety contract.
    fn region(&self, i: usize) -> usize;
}

/// Copies `dst.len()` bytes from offset `offset` of page `page` into `dst`, with volatile
/// 8-byte loads (the guest may be writing the page right now; each byte is read once).
///
/// Panics (a bug in the caller, never guest-controlled) if the range leaves the page or is not
/// 8-byte aligned.
pub fn copy_from_guest(pages: &dyn GuestPages, page: usize, offset: usize, dst: &mut [u8]) {
    assert!(page < pages.count(), "page index out of the mapping");
    assert!(
        offset % 8 == 0 && dst.len() % 8 == 0,
        "unaligned guest copy"
    );
    assert!(
        offset + dst.len() <= PAGE_SIZE,
        "guest copy leaves its page"
    );
    let base = pages.page(page).as_ptr();
    for (k, chunk) in dst.chunks_exact_mut(8).enumerate() {
        // SAFETY: `base + offset + 8k .. +8` lies inside page `page` (asserted above), which the
        // GuestPages contract keeps mapped and readable; the address is 8-aligned (page
        // alignment + aligned offset). A volatile load of plain bytes tolerates concurrent
        // guest writes (we get some value, read once).
        let v = unsafe { std::ptr::read_volatile(base.add(offset + 8 * k).cast::<u64>()) };
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
}

/// Copies `src` into page `page` at `offset` with volatile 8-byte stores.
///
/// Panics (a caller bug) if the range leaves the page, is unaligned, or the pages are mapped
/// read-only.
pub fn copy_to_guest(pages: &dyn GuestPages, page: usize, offset: usize, src: &[u8]) {
    assert!(pages.writable(), "write to read-only guest pages");
    assert!(page < pages.count(), "page index out of the mapping");
    assert!(
        offset % 8 == 0 && src.len() % 8 == 0,
        "unaligned guest copy"
    );
    assert!(
        offset + src.len() <= PAGE_SIZE,
        "guest copy leaves its page"
    );
    let base = pages.page(page).as_ptr();
    for (k, chunk) in src.chunks_exact(8).enumerate() {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        // SAFETY: inside page `page` (asserted), mapped writable (asserted, per the contract),
        // 8-aligned; a volatile store does not assume exclusive access.
        unsafe {
            std::ptr::write_volatile(
                base.add(offset + 8 * k).cast::<u64>(),
                u64::from_ne_bytes(w),
            )
        };
    }
}

/// A byte range of guest memory: `len` bytes at `offset` of page `page`, possibly running on
/// into the following pages when they are adjacent in one mapping (see [`coalesce`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestRange {
    pub page: usize,
    pub offset: usize,
    pub len: usize,
}

/// Merges consecutive ranges that are adjacent in memory and in the same mapping region, so
/// that a multi-page READ becomes one disk call. `ranges` must each lie within their page.
pub fn coalesce(pages: &dyn GuestPages, ranges: &[GuestRange], out: &mut Vec<GuestRange>) {
    out.clear();
    let mut cur: Option<(GuestRange, usize)> = None; // (range, end address)
    for r in ranges {
        let start = pages.page(r.page).as_ptr() as usize + r.offset;
        match cur.as_mut() {
            Some((c, end)) if *end == start && pages.region(c.page) == pages.region(r.page) => {
                c.len += r.len;
                *end += r.len;
            }
            _ => {
                if let Some((c, _)) = cur.take() {
                    out.push(c);
                }
                cur = Some((*r, start + r.len));
            }
        }
    }
    if let Some((c, _)) = cur {
        out.push(c);
    }
}

/// Runs `f` on a mutable byte slice over guest memory (for a disk READ straight into the
/// granted pages). `range` must be one produced by [`coalesce`] from in-page ranges, so every
/// byte lies in pages of one mapping region.
///
/// Panics (a caller bug) if the pages are read-only or the range leaves the mapping.
pub fn with_guest_slice_mut<R>(
    pages: &dyn GuestPages,
    range: GuestRange,
    f: impl FnOnce(&mut [u8]) -> R,
) -> R {
    assert!(pages.writable(), "disk read into read-only guest pages");
    let first = range.page;
    let last_byte = range.offset + range.len.max(1) - 1;
    let last = first + last_byte / PAGE_SIZE;
    assert!(last < pages.count(), "guest range leaves the mapping");
    let base = pages.page(first).as_ptr() as usize;
    for p in first..=last {
        // The pages the range spans must be the adjacent pages of one region.
        assert_eq!(
            pages.page(p).as_ptr() as usize,
            base + (p - first) * PAGE_SIZE
        );
        assert_eq!(pages.region(p), pages.region(first));
    }
    // SAFETY: the bytes lie in adjacent, writable pages of one mapping (checked above), which
    // stays mapped while `pages` is borrowed. This is the one documented place where a Rust
    // reference covers guest-writable memory: the slice is only written by the disk read, and a
    // concurrent guest write can only change the guest's own read result (see module docs).
    let slice = unsafe {
        std::slice::from_raw_parts_mut(pages.page(first).as_ptr().add(range.offset), range.len)
    };
    f(slice)
}

/// Plain process memory posing as guest pages (unit tests).
pub struct HeapPages {
    /// Start of a leaked `Box<[u64]>` of `pages * PAGE_SIZE / 8` words, freed in `Drop`.
    base: NonNull<u64>,
    pages: usize,
}

impl HeapPages {
    pub fn new(pages: usize) -> Self {
        let words = vec![0u64; pages.max(1) * PAGE_SIZE / 8].into_boxed_slice();
        let base = NonNull::new(Box::into_raw(words).cast::<u64>()).expect("box is non-null");
        HeapPages { base, pages }
    }
}

impl Drop for HeapPages {
    fn drop(&mut self) {
        let len = self.pages.max(1) * PAGE_SIZE / 8;
        // SAFETY: `base` came from `Box::into_raw` of a boxed slice of exactly `len` words in
        // `new`, and is freed only here.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.base.as_ptr(), len)) });
    }
}

// SAFETY: the raw allocation is owned by `self` (Send/Sync like a Box<[u64]>).
unsafe impl Send for HeapPages {}
// SAFETY: as above; all access goes through raw pointers with volatile operations.
unsafe impl Sync for HeapPages {}

// SAFETY: the pages live in one heap allocation owned by `self` until Drop, 8-aligned (u64
// words), one region; pointers derive from the raw allocation pointer, never from a reference.
unsafe impl GuestPages for HeapPages {
    fn count(&self) -> usize {
        self.pages
    }

    fn page(&self, i: usize) -> NonNull<u8> {
        assert!(i < self.pages);
        // SAFETY: i < pages, so the offset stays inside the allocation.
        unsafe { self.base.cast::<u8>().add(i * PAGE_SIZE) }
    }

    fn writable(&self) -> bool {
        true
    }

    fn region(&self, _i: usize) -> usize {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_and_coalesces() {
        let pages = HeapPages::new(3);
        copy_to_guest(&pages, 1, 512, &[7u8; 1024]);
        let mut out = [0u8; 1536];
        copy_from_guest(&pages, 1, 0, &mut out);
        assert!(out[..512].iter().all(|&b| b == 0));
        assert!(out[512..].iter().all(|&b| b == 7));

        let ranges = [
            GuestRange {
                page: 0,
                offset: 3584,
                len: 512,
            },
            GuestRange {
                page: 1,
                offset: 0,
                len: 4096,
            },
            GuestRange {
                page: 2,
                offset: 0,
                len: 512,
            },
            GuestRange {
                page: 0,
                offset: 0,
                len: 512,
            },
        ];
        let mut merged = Vec::new();
        coalesce(&pages, &ranges, &mut merged);
        assert_eq!(
            merged,
            vec![
                GuestRange {
                    page: 0,
                    offset: 3584,
                    len: 5120
                },
                GuestRange {
                    page: 0,
                    offset: 0,
                    len: 512
                }
            ]
        );
        with_guest_slice_mut(&pages, merged[0], |s| s.fill(9));
        let mut out = [0u8; 4096];
        copy_from_guest(&pages, 2, 0, &mut out);
        assert!(out[..512].iter().all(|&b| b == 9));
        assert!(out[512..].iter().all(|&b| b == 0));
    }
}
