//! Typed access to a shared ring (`struct blkif_sring`) in guest memory, for both ends.
//!
//! The four indexes are read and written as atomics with explicit orderings standing in for
//! ring.h's barriers; entries are copied in and out with volatile loads and stores
//! ([`super::mem`]). Nothing here decides anything: the engine ([`super::engine`]) and the
//! frontend in `frontend-shim` implement the protocol on top.
//!
//! Ring pages need not be virtually contiguous: every access is at most 8 bytes, 8-aligned, and
//! is routed to the page that holds it, so an entry straddling two pages is split.

use std::sync::atomic::{AtomicU32, Ordering};

use super::{
    abi::{
        ring_size, BlkifResponse, EntryBytes, RingIdx, ENTRY_SIZE, MAX_RING_PAGE_ORDER, PAGE_SIZE,
        SRING_ENTRIES_OFFSET, SRING_REQ_EVENT, SRING_REQ_PROD, SRING_RSP_EVENT, SRING_RSP_PROD,
    },
    mem::{copy_from_guest, copy_to_guest, GuestPages},
};

/// Why a ring mapping cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("ring page order {0} is not supported (0..={MAX_RING_PAGE_ORDER})")]
    BadOrder(u32),
    #[error("ring needs {expected} pages, mapping has {got}")]
    PageCount { expected: usize, got: usize },
    #[error("ring pages are mapped read-only")]
    ReadOnly,
}

/// `(new - event) < (new - old)`: whether the other end asked to be woken for the entries
/// published between `old` and `new` (ring.h's `RING_PUSH_*_AND_CHECK_NOTIFY`).
pub fn need_notify(new: RingIdx, old: RingIdx, event: RingIdx) -> bool {
    new.wrapping_sub(event) < new.wrapping_sub(old)
}

/// A shared ring in mapped guest pages.
pub struct SharedRing {
    pages: Box<dyn GuestPages>,
    size: u32,
}

impl SharedRing {
    /// Wraps `2^order` mapped, writable ring pages.
    pub fn new(pages: Box<dyn GuestPages>, order: u32) -> Result<SharedRing, RingError> {
        if order > MAX_RING_PAGE_ORDER {
            return Err(RingError::BadOrder(order));
        }
        let expected = 1usize << order;
        if pages.count() != expected {
            return Err(RingError::PageCount {
                expected,
                got: pages.count(),
            });
        }
        if !pages.writable() {
            return Err(RingError::ReadOnly);
        }
        Ok(SharedRing {
            pages,
            size: ring_size(order),
        })
    }

    /// Entries in the ring (a power of two).
    pub fn size(&self) -> u32 {
        self.size
    }

    fn index_word(&self, offset: usize) -> &AtomicU32 {
        debug_assert!(offset < SRING_ENTRIES_OFFSET && offset % 4 == 0);
        let ptr = self.pages.page(0).as_ptr();
        // SAFETY: page 0 is mapped and writable for as long as `self.pages` lives (GuestPages
        // contract), which outlives the returned borrow; `offset` is one of the 4-aligned index
        // fields in the first 64 bytes. An AtomicU32 has the layout of a u32 and tolerates
        // concurrent access by the other end, which only ever uses atomic-width stores.
        unsafe { AtomicU32::from_ptr(ptr.add(offset).cast::<u32>()) }
    }

    /// `req_prod`, with Acquire ordering: entries up to it are visible after this load
    /// (the backend's `rmb()` after reading the producer index).
    pub fn req_prod(&self) -> RingIdx {
        self.index_word(SRING_REQ_PROD).load(Ordering::Acquire)
    }

    /// Publishes `req_prod` with Release ordering: the entries written before are visible
    /// first (the frontend's `wmb()` in `RING_PUSH_REQUESTS`).
    pub fn set_req_prod(&self, v: RingIdx) {
        self.index_word(SRING_REQ_PROD).store(v, Ordering::Release)
    }

    pub fn req_event(&self) -> RingIdx {
        self.index_word(SRING_REQ_EVENT).load(Ordering::Acquire)
    }

    pub fn set_req_event(&self, v: RingIdx) {
        self.index_word(SRING_REQ_EVENT).store(v, Ordering::Release)
    }

    /// `rsp_prod` with Acquire ordering (the frontend's read before consuming responses).
    pub fn rsp_prod(&self) -> RingIdx {
        self.index_word(SRING_RSP_PROD).load(Ordering::Acquire)
    }

    /// Publishes `rsp_prod` with Release ordering: responses written before are visible first
    /// (`RING_PUSH_RESPONSES`' `wmb()`).
    pub fn set_rsp_prod(&self, v: RingIdx) {
        self.index_word(SRING_RSP_PROD).store(v, Ordering::Release)
    }

    pub fn rsp_event(&self) -> RingIdx {
        self.index_word(SRING_RSP_EVENT).load(Ordering::Acquire)
    }

    pub fn set_rsp_event(&self, v: RingIdx) {
        self.index_word(SRING_RSP_EVENT).store(v, Ordering::Release)
    }

    /// `SHARED_RING_INIT`: zero producers and padding, events at 1. Frontend side.
    pub fn init(&self) {
        self.set_req_prod(0);
        self.set_rsp_prod(0);
        self.set_req_event(1);
        self.set_rsp_event(1);
        copy_to_guest(&*self.pages, 0, 16, &[0u8; SRING_ENTRIES_OFFSET - 16]);
    }

    /// Byte offset of ring slot `idx & (size - 1)` in the ring pages.
    fn slot_offset(&self, idx: RingIdx) -> usize {
        SRING_ENTRIES_OFFSET + (idx & (self.size - 1)) as usize * ENTRY_SIZE
    }

    /// Splits `len` bytes at ring offset `off` at page boundaries: calls `f(page, in_page, at)`
    /// with `at` the position within the entry.
    fn pieces(off: usize, len: usize, mut f: impl FnMut(usize, usize, std::ops::Range<usize>)) {
        let mut done = 0;
        while done < len {
            let pos = off + done;
            let n = (PAGE_SIZE - pos % PAGE_SIZE).min(len - done);
            f(pos / PAGE_SIZE, pos % PAGE_SIZE, done..done + n);
            done += n;
        }
    }

    /// Copies the entry at `idx` out of the ring (each byte read once, volatile).
    pub fn read_entry(&self, idx: RingIdx) -> EntryBytes {
        let mut out = [0u8; ENTRY_SIZE];
        Self::pieces(self.slot_offset(idx), ENTRY_SIZE, |page, at, r| {
            copy_from_guest(&*self.pages, page, at, &mut out[r]);
        });
        out
    }

    /// Writes a whole entry (frontend side: a request; tests: arbitrary bytes).
    pub fn write_entry(&self, idx: RingIdx, bytes: &EntryBytes) {
        Self::pieces(self.slot_offset(idx), ENTRY_SIZE, |page, at, r| {
            copy_to_guest(&*self.pages, page, at, &bytes[r]);
        });
    }

    /// Writes a response into slot `idx` (its 16 bytes only).
    pub fn write_response(&self, idx: RingIdx, rsp: &BlkifResponse) {
        let bytes = rsp.encode();
        Self::pieces(self.slot_offset(idx), BlkifResponse::SIZE, |page, at, r| {
            copy_to_guest(&*self.pages, page, at, &bytes[r]);
        });
    }

    /// Copies the response in slot `idx` out of the ring.
    pub fn read_response(&self, idx: RingIdx) -> BlkifResponse {
        let mut b = [0u8; BlkifResponse::SIZE];
        Self::pieces(self.slot_offset(idx), BlkifResponse::SIZE, |page, at, r| {
            copy_from_guest(&*self.pages, page, at, &mut b[r]);
        });
        BlkifResponse::decode(&b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blkif::{abi::*, mem::HeapPages};

    #[test]
    fn notify_rule() {
        // Other end wants a kick at 5; we published 3..=6.
        assert!(need_notify(6, 3, 5));
        assert!(!need_notify(6, 3, 7));
        assert!(!need_notify(6, 6, 6));
        // Across the u32 wrap.
        assert!(need_notify(2, u32::MAX - 1, 0));
        assert!(!need_notify(2, u32::MAX - 1, 3));
    }

    #[test]
    fn entries_across_pages() {
        let ring = SharedRing::new(Box::new(HeapPages::new(2)), 1).unwrap();
        ring.init();
        assert_eq!(ring.size(), 64);
        assert_eq!(ring.req_event(), 1);
        // Slot 36 starts at 64 + 36*112 = 4096 - 0; slot 35 straddles the page boundary.
        let mut e = [0u8; ENTRY_SIZE];
        for (i, b) in e.iter_mut().enumerate() {
            *b = i as u8;
        }
        for idx in [0, 35, 36, 63, 64 + 35] {
            ring.write_entry(idx, &e);
            assert_eq!(ring.read_entry(idx), e);
        }
        let rsp = BlkifResponse {
            id: 9,
            operation: BLKIF_OP_WRITE,
            status: BLKIF_RSP_ERROR,
        };
        ring.write_response(35, &rsp);
        assert_eq!(ring.read_response(35), rsp);
        assert_eq!(ring.read_entry(35)[16..], e[16..]);
        assert!(SharedRing::new(Box::new(HeapPages::new(1)), 1).is_err());
        assert!(SharedRing::new(Box::new(HeapPages::new(32)), 5).is_err());
    }
}
