//! Persistent grants (`feature-persistent`): pages the frontend grants once and reuses for
//! every request, which the backend keeps mapped for the life of the ring instead of mapping
//! and unmapping them per request (under Xen two gntdev ioctls, an mmap and a munmap with its
//! TLB shootdown each time).
//!
//! Each kept grant is its own one-page, read-write mapping (blkback maps persistent grants
//! read-write too; the frontend grants them so). A grant that cannot be mapped read-write is
//! mapped read-only for the WRITE that names it, and not kept. A request's pages then come from several
//! mappings, so they are never coalesced into one slice: a read of more than one page goes
//! through a bounce buffer (exec.rs). At most [`MAX_KEPT`] grants per queue are kept, as
//! blkback does; past that, requests map and unmap the rest as without the feature. Every
//! mapping is dropped, and so unmapped, with the queue.

use std::{collections::HashMap, ptr::NonNull, sync::Arc};

use parking_lot::Mutex;

use crate::blkif::{
    abi::GrantRef,
    mem::GuestPages,
    transport::{Transport, TransportError},
};

/// Grants kept mapped per queue (Linux blkback's `max_persistent_grants`).
pub(super) const MAX_KEPT: usize = 1056;

/// The grants kept mapped for one queue.
pub(super) struct KeptGrants<T: Transport> {
    maps: Mutex<HashMap<GrantRef, Arc<T::Pages>>>,
}

impl<T: Transport> KeptGrants<T> {
    pub(super) fn new() -> Self {
        KeptGrants {
            maps: Mutex::new(HashMap::new()),
        }
    }

    /// The pages of `refs`, in order: kept mappings, mapping (and keeping) the ones not seen
    /// yet while there is room; `writable` if the request writes into them (a READ). Also
    /// returns how many grants it mapped.
    pub(super) fn map(
        &self,
        transport: &T,
        refs: &[GrantRef],
        writable: bool,
    ) -> Result<(KeptPages<T>, usize), TransportError> {
        // One look under the lock for the common case, every grant kept already.
        let mut found: Vec<Option<Arc<T::Pages>>> = {
            let maps = self.maps.lock();
            refs.iter().map(|r| maps.get(r).cloned()).collect()
        };
        let mut all_writable = true;
        let mut mapped = 0;
        for (slot, &r) in found.iter_mut().zip(refs) {
            if slot.is_some() {
                continue;
            }
            // Mapped outside the lock: another thread may map the same grant meanwhile, and
            // then the first one kept wins (the other mapping is dropped with its request).
            mapped += 1;
            let p = match transport.map(&[r], true) {
                Ok(p) => Arc::new(p),
                Err(_) if !writable => {
                    all_writable = false;
                    *slot = Some(Arc::new(transport.map(&[r], false)?));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut maps = self.maps.lock();
            *slot = Some(match maps.get(&r) {
                Some(kept) => kept.clone(),
                None if maps.len() < MAX_KEPT => maps.entry(r).or_insert(p).clone(),
                None => p,
            });
        }
        let pages: Vec<Arc<T::Pages>> = found.into_iter().flatten().collect();
        let pages = KeptPages {
            pages,
            writable: all_writable,
        };
        Ok((pages, mapped))
    }
}

/// A request's pages from [`KeptGrants::map`]: each page its own mapping.
pub(super) struct KeptPages<T: Transport> {
    pages: Vec<Arc<T::Pages>>,
    /// Every page is mapped read-write.
    writable: bool,
}

// SAFETY: page `i` is page 0 of `pages[i]`, a one-page mapping that the Arc keeps alive (and
// so mapped, per its own GuestPages contract) at least as long as `self`; `writable` is true
// only when every one of them was mapped writable. Pages share a region only when they are
// the same mapping (the same grant twice), so a range over "adjacent pages of one region"
// never spans two mappings.
unsafe impl<T: Transport> GuestPages for KeptPages<T> {
    fn count(&self) -> usize {
        self.pages.len()
    }

    fn page(&self, i: usize) -> NonNull<u8> {
        self.pages[i].page(0)
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn region(&self, i: usize) -> usize {
        Arc::as_ptr(&self.pages[i]) as *const u8 as usize
    }
}
