//! The local transport: the Xen block ring between two processes on one Linux host, without
//! a hypervisor. `frontend-shim` plays blkfront over it; the daemon serves it.
//!
//! ```text
//!   frontend (shim)                         backend (daemon / engine)
//!   memfd "grant table" ── SCM_RIGHTS ───►  LocalGrantTable::open (sealed, mapped with guards)
//!     gref = page index                       map(refs) = pointers into the table
//!   eventfd kick  ──────── SCM_RIGHTS ───►  LocalEvent (one pair per queue; port = queue no.)
//!   eventfd notify ◄──────────────────────
//! ```
//!
//! The memfd must be sealed against shrinking (`F_SEAL_SHRINK`), or a frontend could truncate
//! it under the backend and turn every access into SIGBUS. The backend maps the table between
//! two `PROT_NONE` guard pages; grant references are bounds-checked against the table size.

mod attach;
mod scm;

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    ptr::NonNull,
    sync::Arc,
};

use parking_lot::Mutex;
use xen_sys::evtchn_port_t;

pub use self::{
    attach::{
        serve_attach, AttachError, AttachOffer, AttachRequest, ConnectReply, ConnectRequest,
        RingRegistry, ATTACH_OP, CLOSED_EVENT,
    },
    scm::{recv_with_fds, send_with_fds, MAX_FDS},
};
use super::{
    abi::{GrantRef, PAGE_SIZE},
    event::EventFd,
    mem::GuestPages,
    transport::{EventChannel, Transport, TransportError},
};

/// Largest grant table a backend accepts (pages; 1 GiB of address space, allocated lazily).
pub const MAX_TABLE_PAGES: usize = 1 << 18;

/// A memfd of pages shared between a frontend and a backend: the local stand-in for the
/// guest's grant table. A grant reference is a page index.
pub struct LocalGrantTable {
    fd: OwnedFd,
    /// Start of the reservation: one guard page, the table, one guard page.
    region: NonNull<u8>,
    pages: usize,
}

// SAFETY: the table is a shared mapping owned by this value; all access to its bytes goes
// through raw pointers with volatile operations (mem.rs), so sharing between threads is sound.
unsafe impl Send for LocalGrantTable {}
// SAFETY: as above.
unsafe impl Sync for LocalGrantTable {}

impl LocalGrantTable {
    /// Creates a table of `pages` zeroed pages (frontend side), sealed against resizing.
    pub fn create(pages: usize) -> io::Result<LocalGrantTable> {
        if pages == 0 || pages > MAX_TABLE_PAGES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "grant table size out of range",
            ));
        }
        // SAFETY: the name is a NUL-terminated literal; the result is checked.
        let raw = unsafe {
            libc::memfd_create(
                c"parallax-grants".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain syscalls on a descriptor we own; results checked.
        unsafe {
            if libc::ftruncate(fd.as_raw_fd(), (pages * PAGE_SIZE) as libc::off_t) != 0 {
                return Err(io::Error::last_os_error());
            }
            let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
            if libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Self::map(fd, pages)
    }

    /// Opens a table received from a frontend (backend side): it must be a memfd sealed
    /// against shrinking, a whole number of pages, at most `max_pages`.
    pub fn open(fd: OwnedFd, max_pages: usize) -> Result<LocalGrantTable, TransportError> {
        // SAFETY: fcntl/fstat on a descriptor we own, with a live stat buffer; results checked.
        let (seals, size) = unsafe {
            let seals = libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS);
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd.as_raw_fd(), &mut st) != 0 {
                return Err(TransportError::io(
                    "fstat on the grant table",
                    io::Error::last_os_error(),
                ));
            }
            (seals, st.st_size)
        };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(TransportError::Invalid(
                "grant table is not a memfd sealed against shrinking".into(),
            ));
        }
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        if size == 0 || size % PAGE_SIZE != 0 || size / PAGE_SIZE > max_pages.min(MAX_TABLE_PAGES) {
            return Err(TransportError::Invalid(format!(
                "grant table of {size} bytes is not acceptable"
            )));
        }
        Self::map(fd, size / PAGE_SIZE)
            .map_err(|e| TransportError::io("mapping the grant table", e))
    }

    fn map(fd: OwnedFd, pages: usize) -> io::Result<LocalGrantTable> {
        let len = (pages + 2) * PAGE_SIZE;
        // SAFETY: an anonymous PROT_NONE reservation at an address of the kernel's choosing;
        // checked for MAP_FAILED.
        let region = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if region == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: maps the memfd over the middle of our own reservation (MAP_FIXED replaces
        // only pages we reserved above), leaving a guard page on each side.
        let table = unsafe {
            libc::mmap(
                region.cast::<u8>().add(PAGE_SIZE).cast(),
                pages * PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                0,
            )
        };
        if table == libc::MAP_FAILED {
            let err = io::Error::last_os_error();
            // SAFETY: unmapping the reservation made above, which nothing else references.
            unsafe { libc::munmap(region, len) };
            return Err(err);
        }
        let region = NonNull::new(region.cast::<u8>()).expect("mmap never returns null on success");
        Ok(LocalGrantTable { fd, region, pages })
    }

    /// Number of pages (valid grant references are `0..pages`).
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// The memfd, to pass to the other end.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Start of page `gref`, if it is in the table.
    fn page_ptr(&self, gref: GrantRef) -> Option<NonNull<u8>> {
        let i = gref as usize;
        if i >= self.pages {
            return None;
        }
        // SAFETY: 1 + i < pages + 2, inside the reservation.
        Some(unsafe { self.region.add((1 + i) * PAGE_SIZE) })
    }

    /// The pages `refs`, for reading and writing with [`super::mem`]'s helpers.
    pub fn pages_for(
        self: &Arc<Self>,
        refs: &[GrantRef],
        writable: bool,
    ) -> Result<LocalPages, TransportError> {
        let ptrs = refs
            .iter()
            .map(|&r| self.page_ptr(r).ok_or(TransportError::BadGrant(r)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(LocalPages {
            _table: self.clone(),
            ptrs,
            writable,
        })
    }
}

impl Drop for LocalGrantTable {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the reservation made in `map` (guards and table); every
        // LocalPages holds an Arc to this table, so no page pointer outlives the mapping.
        unsafe { libc::munmap(self.region.as_ptr().cast(), (self.pages + 2) * PAGE_SIZE) };
    }
}

/// Pages of a [`LocalGrantTable`] (a "grant mapping"; nothing to unmap).
pub struct LocalPages {
    _table: Arc<LocalGrantTable>,
    ptrs: Vec<NonNull<u8>>,
    writable: bool,
}

// SAFETY: the pointers point into the table mapping, which the Arc keeps alive.
unsafe impl Send for LocalPages {}
// SAFETY: as above; accesses are volatile through raw pointers.
unsafe impl Sync for LocalPages {}

// SAFETY: every pointer is a page of the table (bounds-checked in `pages_for`), page-aligned,
// mapped read-write and shared for as long as the Arc'd table lives; the memfd is sealed
// against shrinking, so accesses never fault. All pages are in one mapping (region 0).
unsafe impl GuestPages for LocalPages {
    fn count(&self) -> usize {
        self.ptrs.len()
    }

    fn page(&self, i: usize) -> NonNull<u8> {
        self.ptrs[i]
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn region(&self, _i: usize) -> usize {
        0
    }
}

/// One end of a local event channel: an eventfd the other end kicks, and one we kick.
pub struct LocalEvent {
    incoming: EventFd,
    outgoing: EventFd,
}

impl LocalEvent {
    pub fn new(incoming: EventFd, outgoing: EventFd) -> LocalEvent {
        LocalEvent { incoming, outgoing }
    }

    /// A connected pair: `(backend end, frontend end)`.
    pub fn pair() -> io::Result<(LocalEvent, LocalEvent)> {
        let to_back = EventFd::new()?;
        let to_front = EventFd::new()?;
        let front = LocalEvent {
            incoming: to_front.try_clone()?,
            outgoing: to_back.try_clone()?,
        };
        Ok((
            LocalEvent {
                incoming: to_back,
                outgoing: to_front,
            },
            front,
        ))
    }

    /// The eventfd the other end kicks.
    pub fn incoming(&self) -> &EventFd {
        &self.incoming
    }

    /// The eventfd we kick.
    pub fn outgoing(&self) -> &EventFd {
        &self.outgoing
    }
}

impl EventChannel for LocalEvent {
    fn fd(&self) -> BorrowedFd<'_> {
        self.incoming.as_fd()
    }

    fn clear(&self) -> Result<(), TransportError> {
        self.incoming
            .drain()
            .map(|_| ())
            .map_err(|e| TransportError::io("reading the kick eventfd", e))
    }

    fn notify(&self) -> Result<(), TransportError> {
        self.outgoing
            .signal()
            .map_err(|e| TransportError::io("writing the notify eventfd", e))
    }
}

/// The backend's view of a local frontend: its grant table and one event channel per queue
/// (port `i` is queue `i`'s pair).
pub struct LocalTransport {
    table: Arc<LocalGrantTable>,
    events: Mutex<Vec<Option<LocalEvent>>>,
}

impl LocalTransport {
    pub fn new(table: Arc<LocalGrantTable>, events: Vec<LocalEvent>) -> LocalTransport {
        LocalTransport {
            table,
            events: Mutex::new(events.into_iter().map(Some).collect()),
        }
    }

    pub fn table(&self) -> &Arc<LocalGrantTable> {
        &self.table
    }
}

impl Transport for LocalTransport {
    type Pages = LocalPages;
    type Event = LocalEvent;

    fn map(&self, refs: &[GrantRef], writable: bool) -> Result<LocalPages, TransportError> {
        self.table.pages_for(refs, writable)
    }

    fn bind(&self, port: evtchn_port_t) -> Result<LocalEvent, TransportError> {
        self.events
            .lock()
            .get_mut(port as usize)
            .and_then(Option::take)
            .ok_or(TransportError::BadPort(port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blkif::mem::{copy_from_guest, copy_to_guest};

    #[test]
    fn table_shared_between_mappings() {
        let front = Arc::new(LocalGrantTable::create(4).unwrap());
        let back =
            Arc::new(LocalGrantTable::open(front.fd().try_clone_to_owned().unwrap(), 16).unwrap());
        let p = front.pages_for(&[3], true).unwrap();
        copy_to_guest(&p, 0, 8, &[5u8; 16]);
        let q = back.pages_for(&[3, 0], false).unwrap();
        let mut b = [0u8; 32];
        copy_from_guest(&q, 0, 0, &mut b);
        assert_eq!(&b[..8], &[0u8; 8]);
        assert_eq!(&b[8..24], &[5u8; 16]);
        assert!(matches!(
            back.pages_for(&[4], false),
            Err(TransportError::BadGrant(4))
        ));
        assert!(matches!(
            back.pages_for(&[u32::MAX], false),
            Err(TransportError::BadGrant(_))
        ));
        // Too big for the receiver's limit.
        assert!(LocalGrantTable::open(front.fd().try_clone_to_owned().unwrap(), 3).is_err());
        // Shrinking is refused by the seal.
        // SAFETY: ftruncate on a descriptor we own.
        assert_ne!(unsafe { libc::ftruncate(front.fd().as_raw_fd(), 0) }, 0);
    }

    #[test]
    fn unsealed_memfd_is_refused() {
        // SAFETY: plain syscalls, results checked.
        let fd = unsafe {
            let raw = libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC);
            assert!(raw >= 0);
            assert_eq!(libc::ftruncate(raw, 4096), 0);
            OwnedFd::from_raw_fd(raw)
        };
        assert!(matches!(
            LocalGrantTable::open(fd, 16),
            Err(TransportError::Invalid(_))
        ));
        let file = tempfile::tempfile().unwrap();
        file.set_len(4096).unwrap();
        assert!(LocalGrantTable::open(file.into(), 16).is_err());
    }

    #[test]
    fn events_pair() {
        let (b, f) = LocalEvent::pair().unwrap();
        f.notify().unwrap();
        assert!(b.incoming().drain().unwrap());
        b.notify().unwrap();
        assert!(f.incoming().drain().unwrap());
        let t = LocalTransport::new(Arc::new(LocalGrantTable::create(1).unwrap()), vec![b]);
        assert!(t.bind(0).is_ok());
        assert!(matches!(t.bind(0), Err(TransportError::BadPort(0))));
        assert!(matches!(t.bind(7), Err(TransportError::BadPort(7))));
    }
}
