//! Exclusive ownership of a store: one process at a time.
//!
//! Two fcntl locks on the store's file descriptor:
//! * an open-file-description (OFD) write lock on byte 0 is the real exclusion — it belongs to
//!   the open file, so it also keeps a second open in the *same* process out;
//! * a classic POSIX read lock on byte 1 exists only so that a loser can learn the holder's PID
//!   (`F_GETLK` reports the PID of POSIX lock holders, not of OFD ones).
//!
//! Both go away when the descriptor is closed or the process dies, so a crash never leaves the
//! store locked.

use std::{fs::File, io, os::fd::AsRawFd};

use super::error::StoreError;

fn flock(kind: libc::c_int, start: libc::off_t) -> libc::flock {
    // SAFETY: flock is a plain C struct; all-zero is a valid value, fields are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = 1;
    fl
}

fn fcntl_lock(file: &File, cmd: libc::c_int, fl: &mut libc::flock) -> io::Result<()> {
    // SAFETY: `fl` is a valid, exclusively borrowed flock struct for the duration of the call and
    // the fd is open (owned by `file`).
    let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, fl as *mut libc::flock) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Takes exclusive ownership of the store open on `file`, or says who holds it.
pub fn lock_exclusive(file: &File) -> Result<(), StoreError> {
    let mut excl = flock(libc::F_WRLCK, 0);
    match fcntl_lock(file, libc::F_OFD_SETLK, &mut excl) {
        Ok(()) => {}
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => {
            return Err(StoreError::InUse {
                pid: holder_pid(file),
            });
        }
        Err(e) => return Err(StoreError::Io(e)),
    }
    // Advertise our PID; failure here only costs a less helpful message for the next opener.
    let mut pid = flock(libc::F_RDLCK, 1);
    let _ = fcntl_lock(file, libc::F_SETLK, &mut pid);
    Ok(())
}

/// The PID of the process holding the store open on `file`, if it can be learnt.
pub fn holder_pid(file: &File) -> Option<i32> {
    let mut probe = flock(libc::F_WRLCK, 1);
    fcntl_lock(file, libc::F_GETLK, &mut probe).ok()?;
    if probe.l_type == libc::F_UNLCK as libc::c_short {
        // Either nobody, or our own process (POSIX locks never conflict with their owner).
        let mut excl = flock(libc::F_WRLCK, 0);
        fcntl_lock(file, libc::F_OFD_GETLK, &mut excl).ok()?;
        return (excl.l_type != libc::F_UNLCK as libc::c_short)
            .then(std::process::id)
            .map(|p| p as i32);
    }
    Some(probe.l_pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_open_is_refused_with_our_pid() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, [0u8; 16]).unwrap();
        let a = File::options().read(true).write(true).open(&p).unwrap();
        lock_exclusive(&a).unwrap();
        let b = File::options().read(true).write(true).open(&p).unwrap();
        match lock_exclusive(&b) {
            Err(StoreError::InUse { pid }) => assert_eq!(pid, Some(std::process::id() as i32)),
            other => panic!("expected InUse, got {other:?}"),
        }
        drop(b);
        drop(a);
        let c = File::options().read(true).write(true).open(&p).unwrap();
        lock_exclusive(&c).unwrap();
    }
}
