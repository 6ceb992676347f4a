//! File-descriptor plumbing for the ring: eventfds (the local transport's event channels and
//! the engine's stop signal) and a small `poll(2)` wrapper.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

/// A non-blocking Linux eventfd.
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(EventFd { fd })
    }

    /// Wraps a descriptor received from elsewhere (checked to behave as an eventfd only by use:
    /// writes and reads of 8 bytes; errors are reported, never trusted).
    pub fn from_owned(fd: OwnedFd) -> EventFd {
        EventFd { fd }
    }

    /// Adds one to the counter, waking pollers.
    pub fn signal(&self) -> io::Result<()> {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local buffer to an fd we own.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), 8) };
        if n == 8 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        // A full counter (EAGAIN) still means "signalled".
        if n < 0 && err.kind() == io::ErrorKind::WouldBlock {
            return Ok(());
        }
        Err(err)
    }

    /// Resets the counter; returns whether it was non-zero.
    pub fn drain(&self) -> io::Result<bool> {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live local buffer from an fd we own.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
        if n == 8 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        if n < 0 && err.kind() == io::ErrorKind::WouldBlock {
            return Ok(false);
        }
        if n >= 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "short read from eventfd",
            ));
        }
        Err(err)
    }

    pub fn try_clone(&self) -> io::Result<EventFd> {
        Ok(EventFd {
            fd: self.fd.try_clone()?,
        })
    }

    pub fn into_owned(self) -> OwnedFd {
        self.fd
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Waits until one of `fds` is readable (or hung up), or `timeout` passes (`None`: forever).
/// Returns one flag per descriptor; `EINTR` counts as a timeout (all false).
pub fn poll_readable(fds: &[BorrowedFd<'_>], timeout: Option<Duration>) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = match timeout {
        None => -1,
        Some(d) => d.as_millis().min(i32::MAX as u128) as i32,
    };
    // SAFETY: `pfds` is a live, correctly sized array of pollfd; the descriptors are borrowed
    // for the duration of the call.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(err);
    }
    Ok(pfds
        .iter()
        .map(|p| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0)
        .collect())
}

/// A one-shot, level-triggered stop request: once [`StopSignal::signal`]led, its descriptor
/// stays readable and [`StopSignal::is_set`] stays true. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StopSignal {
    inner: Arc<StopInner>,
}

#[derive(Debug)]
struct StopInner {
    flag: AtomicBool,
    fd: EventFd,
}

impl StopSignal {
    pub fn new() -> io::Result<StopSignal> {
        Ok(StopSignal {
            inner: Arc::new(StopInner {
                flag: AtomicBool::new(false),
                fd: EventFd::new()?,
            }),
        })
    }

    pub fn signal(&self) {
        self.inner.flag.store(true, Ordering::SeqCst);
        // An eventfd write of 1 cannot fail short of a closed fd; the flag is set regardless.
        let _ = self.inner.fd.signal();
    }

    pub fn is_set(&self) -> bool {
        self.inner.flag.load(Ordering::SeqCst)
    }

    /// Readable once signalled (never drained).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inner.fd.as_fd()
    }
}

impl AsFd for StopSignal {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventfd_and_stop() {
        let e = EventFd::new().unwrap();
        assert!(!e.drain().unwrap());
        e.signal().unwrap();
        e.signal().unwrap();
        let r = poll_readable(&[e.as_fd()], Some(Duration::ZERO)).unwrap();
        assert_eq!(r, vec![true]);
        assert!(e.drain().unwrap());
        assert!(!e.drain().unwrap());

        let s = StopSignal::new().unwrap();
        assert!(!s.is_set());
        assert_eq!(
            poll_readable(&[s.fd()], Some(Duration::ZERO)).unwrap(),
            vec![false]
        );
        s.clone().signal();
        assert!(s.is_set());
        assert_eq!(
            poll_readable(&[s.fd()], Some(Duration::ZERO)).unwrap(),
            vec![true]
        );
        assert_eq!(
            poll_readable(&[s.fd()], Some(Duration::ZERO)).unwrap(),
            vec![true]
        );
    }
}
