//! The Xen transport: grant mapping through `/dev/xen/gntdev` and event channels through
//! `/dev/xen/evtchn`, as a user-space backend in dom0 or a storage domain does it.
//!
//! * map: `IOCTL_GNTDEV_MAP_GRANT_REF` reserves the grants and returns an offset, `mmap` of
//!   that offset maps them (contiguously); `Drop` munmaps and `IOCTL_GNTDEV_UNMAP_GRANT_REF`s.
//! * bind: each queue opens its own `/dev/xen/evtchn` and `IOCTL_EVTCHN_BIND_INTERDOMAIN`s the
//!   frontend's port; pending events are read from the descriptor as local port numbers and
//!   written back to unmask; `IOCTL_EVTCHN_NOTIFY` kicks; `Drop` unbinds.
//!
//! Data pages are mapped per request (no persistent grants yet): correct, not fast.
//! The ioctl structs and numbers are checked against the Linux uapi headers that Debian's
//! `libxen-dev` ships (`xen/sys/gntdev.h`, `xen/sys/evtchn.h`) by the C probe test.

use std::{
    fs::OpenOptions,
    io,
    mem::size_of,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
        unix::fs::OpenOptionsExt,
    },
    path::Path,
    ptr::NonNull,
    sync::Arc,
};

use xen_sys::{domid_t, evtchn_port_t};

use super::{
    abi::{GrantRef, PAGE_SIZE},
    mem::GuestPages,
    transport::{EventChannel, Transport, TransportError},
};

pub const GNTDEV_PATH: &str = "/dev/xen/gntdev";
pub const EVTCHN_PATH: &str = "/dev/xen/evtchn";

/// Most grants mapped by one call (a ring of 16 pages, or a request's data pages).
pub const MAX_MAP_GRANTS: usize = 4096 + 16;

/// `struct ioctl_gntdev_grant_ref`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IoctlGntdevGrantRef {
    pub domid: u32,
    pub ref_: u32,
}

/// `struct ioctl_gntdev_map_grant_ref` (followed by `count - 1` more refs).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IoctlGntdevMapGrantRef {
    pub count: u32,
    pub pad: u32,
    pub index: u64,
    pub refs: [IoctlGntdevGrantRef; 1],
}

/// `struct ioctl_gntdev_unmap_grant_ref`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IoctlGntdevUnmapGrantRef {
    pub index: u64,
    pub count: u32,
    pub pad: u32,
}

/// `struct ioctl_evtchn_bind_interdomain`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IoctlEvtchnBindInterdomain {
    pub remote_domain: u32,
    pub remote_port: u32,
}

/// `struct ioctl_evtchn_unbind` / `struct ioctl_evtchn_notify`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IoctlEvtchnPort {
    pub port: u32,
}

/// `_IOC(_IOC_NONE, ty, nr, size)`.
const fn ioc_none(ty: u8, nr: u8, size: usize) -> u64 {
    ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}

pub const IOCTL_GNTDEV_MAP_GRANT_REF: u64 = ioc_none(b'G', 0, size_of::<IoctlGntdevMapGrantRef>());
pub const IOCTL_GNTDEV_UNMAP_GRANT_REF: u64 =
    ioc_none(b'G', 1, size_of::<IoctlGntdevUnmapGrantRef>());
pub const IOCTL_EVTCHN_BIND_INTERDOMAIN: u64 =
    ioc_none(b'E', 1, size_of::<IoctlEvtchnBindInterdomain>());
pub const IOCTL_EVTCHN_UNBIND: u64 = ioc_none(b'E', 3, size_of::<IoctlEvtchnPort>());
pub const IOCTL_EVTCHN_NOTIFY: u64 = ioc_none(b'E', 4, size_of::<IoctlEvtchnPort>());

const _: () = {
    assert!(size_of::<IoctlGntdevGrantRef>() == 8);
    assert!(size_of::<IoctlGntdevMapGrantRef>() == 24);
    assert!(std::mem::offset_of!(IoctlGntdevMapGrantRef, index) == 8);
    assert!(std::mem::offset_of!(IoctlGntdevMapGrantRef, refs) == 16);
    assert!(size_of::<IoctlGntdevUnmapGrantRef>() == 16);
    assert!(std::mem::offset_of!(IoctlGntdevUnmapGrantRef, count) == 8);
    assert!(size_of::<IoctlEvtchnBindInterdomain>() == 8);
    assert!(IOCTL_GNTDEV_MAP_GRANT_REF == 0x0018_4700);
    assert!(IOCTL_EVTCHN_BIND_INTERDOMAIN == 0x0008_4501);
};

/// Whether this host runs under Xen with the user-space backend devices available.
pub fn available() -> bool {
    Path::new(GNTDEV_PATH).exists() && Path::new(EVTCHN_PATH).exists()
}

/// `ioctl(fd, request, arg)`; returns the non-negative result.
///
/// # Safety
/// `arg` must point to the structure `request` expects, live and writable for the call.
unsafe fn ioctl(fd: BorrowedFd<'_>, request: u64, arg: *mut libc::c_void) -> io::Result<i32> {
    // SAFETY: forwarded from the caller's contract.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Grant mapping and event channels for one frontend domain.
pub struct XenTransport {
    gntdev: Arc<OwnedFd>,
    domid: domid_t,
}

impl XenTransport {
    /// Opens `/dev/xen/gntdev` for mapping grants of domain `domid`.
    pub fn open(domid: domid_t) -> Result<XenTransport, TransportError> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(GNTDEV_PATH)
            .map_err(|e| TransportError::io("opening /dev/xen/gntdev", e))?;
        Ok(XenTransport {
            gntdev: Arc::new(f.into()),
            domid,
        })
    }
}

impl Transport for XenTransport {
    type Pages = XenPages;
    type Event = XenEvent;

    fn map(&self, refs: &[GrantRef], writable: bool) -> Result<XenPages, TransportError> {
        let count = refs.len();
        if count == 0 || count > MAX_MAP_GRANTS {
            return Err(TransportError::TooMany(count));
        }
        // Header (count, pad, index) then `count` (domid, ref) pairs, as u32 words.
        let mut buf = vec![0u32; 4 + 2 * count];
        buf[0] = count as u32;
        for (i, r) in refs.iter().enumerate() {
            buf[4 + 2 * i] = u32::from(self.domid);
            buf[5 + 2 * i] = *r;
        }
        // SAFETY: `buf` holds a map_grant_ref header followed by `count` refs, as the ioctl
        // reads (count) and writes (index); it is live for the call.
        unsafe {
            ioctl(
                self.gntdev.as_fd(),
                IOCTL_GNTDEV_MAP_GRANT_REF,
                buf.as_mut_ptr().cast(),
            )
        }
        .map_err(|e| TransportError::io("IOCTL_GNTDEV_MAP_GRANT_REF", e))?;
        let index = u64::from(buf[2]) | (u64::from(buf[3]) << 32);
        let len = count * PAGE_SIZE;
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        // SAFETY: maps the grants reserved above at the offset gntdev returned; checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                self.gntdev.as_raw_fd(),
                index as libc::off_t,
            )
        };
        let mut pages = XenPages {
            gntdev: self.gntdev.clone(),
            addr: None,
            index,
            count,
            writable,
        };
        if addr == libc::MAP_FAILED {
            // `pages` drops here and releases the reservation.
            return Err(TransportError::io(
                "mmap of granted pages",
                io::Error::last_os_error(),
            ));
        }
        pages.addr = NonNull::new(addr.cast());
        Ok(pages)
    }

    fn bind(&self, port: evtchn_port_t) -> Result<XenEvent, TransportError> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(EVTCHN_PATH)
            .map_err(|e| TransportError::io("opening /dev/xen/evtchn", e))?;
        let fd: OwnedFd = f.into();
        let mut bind = IoctlEvtchnBindInterdomain {
            remote_domain: u32::from(self.domid),
            remote_port: port,
        };
        // SAFETY: `bind` is the struct this ioctl expects, live for the call.
        let local = unsafe {
            ioctl(
                fd.as_fd(),
                IOCTL_EVTCHN_BIND_INTERDOMAIN,
                (&raw mut bind).cast(),
            )
        }
        .map_err(|e| TransportError::io("IOCTL_EVTCHN_BIND_INTERDOMAIN", e))?;
        Ok(XenEvent {
            fd,
            port: local as u32,
        })
    }
}

/// Granted pages mapped through gntdev; unmapped on drop.
pub struct XenPages {
    gntdev: Arc<OwnedFd>,
    addr: Option<NonNull<u8>>,
    index: u64,
    count: usize,
    writable: bool,
}

// SAFETY: the mapping is owned by this value; access is through raw pointers (mem.rs).
unsafe impl Send for XenPages {}
// SAFETY: as above.
unsafe impl Sync for XenPages {}

// SAFETY: `addr` is a live mapping of `count` pages (one mmap, so one region), page-aligned,
// with the protection `writable` says, until Drop unmaps it. Grant mappings do not fault while
// mapped: the hypervisor keeps the frames until we unmap.
unsafe impl GuestPages for XenPages {
    fn count(&self) -> usize {
        self.count
    }

    fn page(&self, i: usize) -> NonNull<u8> {
        assert!(i < self.count);
        let base = self.addr.expect("only mapped XenPages are handed out");
        // SAFETY: i < count, inside the mapping.
        unsafe { base.add(i * PAGE_SIZE) }
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn region(&self, _i: usize) -> usize {
        0
    }
}

impl Drop for XenPages {
    fn drop(&mut self) {
        if let Some(addr) = self.addr {
            // SAFETY: unmaps exactly the mapping made in `map`; no pointer into it outlives
            // `self` (GuestPages borrows).
            unsafe { libc::munmap(addr.as_ptr().cast(), self.count * PAGE_SIZE) };
        }
        let mut unmap = IoctlGntdevUnmapGrantRef {
            index: self.index,
            count: self.count as u32,
            pad: 0,
        };
        // SAFETY: `unmap` is the struct this ioctl expects, live for the call.
        if let Err(e) = unsafe {
            ioctl(
                self.gntdev.as_fd(),
                IOCTL_GNTDEV_UNMAP_GRANT_REF,
                (&raw mut unmap).cast(),
            )
        } {
            tracing::warn!("IOCTL_GNTDEV_UNMAP_GRANT_REF failed: {e}");
        }
    }
}

/// A bound inter-domain event channel; unbound on drop.
pub struct XenEvent {
    fd: OwnedFd,
    port: evtchn_port_t,
}

impl XenEvent {
    fn port_ioctl(&self, request: u64) -> io::Result<()> {
        let mut arg = IoctlEvtchnPort { port: self.port };
        // SAFETY: `arg` is the struct UNBIND/NOTIFY expect, live for the call.
        unsafe { ioctl(self.fd.as_fd(), request, (&raw mut arg).cast()) }.map(|_| ())
    }
}

impl EventChannel for XenEvent {
    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn clear(&self) -> Result<(), TransportError> {
        let mut ports = [0u32; 16];
        loop {
            // SAFETY: reads into a live local buffer of the stated size.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    ports.as_mut_ptr().cast(),
                    size_of::<[u32; 16]>(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    return Ok(());
                }
                return Err(TransportError::io("reading /dev/xen/evtchn", e));
            }
            let n = n as usize / 4;
            if n == 0 {
                return Ok(());
            }
            // Writing the ports back unmasks them.
            // SAFETY: writes `n` ports from the live local buffer.
            let w = unsafe { libc::write(self.fd.as_raw_fd(), ports.as_ptr().cast(), n * 4) };
            if w < 0 {
                return Err(TransportError::io(
                    "unmasking the event channel",
                    io::Error::last_os_error(),
                ));
            }
        }
    }

    fn notify(&self) -> Result<(), TransportError> {
        self.port_ioctl(IOCTL_EVTCHN_NOTIFY)
            .map_err(|e| TransportError::io("IOCTL_EVTCHN_NOTIFY", e))
    }
}

impl Drop for XenEvent {
    fn drop(&mut self) {
        if let Err(e) = self.port_ioctl(IOCTL_EVTCHN_UNBIND) {
            tracing::warn!(port = self.port, "IOCTL_EVTCHN_UNBIND failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers() {
        assert_eq!(IOCTL_GNTDEV_MAP_GRANT_REF, 0x0018_4700);
        assert_eq!(IOCTL_GNTDEV_UNMAP_GRANT_REF, 0x0010_4701);
        assert_eq!(IOCTL_EVTCHN_BIND_INTERDOMAIN, 0x0008_4501);
        assert_eq!(IOCTL_EVTCHN_UNBIND, 0x0004_4503);
        assert_eq!(IOCTL_EVTCHN_NOTIFY, 0x0004_4504);
    }

    #[test]
    fn opening_without_xen_fails_cleanly() {
        if available() {
            return; // Running under Xen: opening would succeed; nothing to check here.
        }
        assert!(matches!(
            XenTransport::open(1),
            Err(TransportError::Io { .. })
        ));
    }
}
