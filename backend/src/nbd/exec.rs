//! Runs a validated [`Request`] against a [`Disk`] and encodes the complete reply. Touches no
//! socket. The event loop runs what need not wait for a device itself ([`placement`],
//! [`try_read_inline`]) and hands the rest to worker threads ([`execute`]).

use crate::disk::{Disk, DiskError, ExtentState};

use super::buffers;
use super::meta::{hash_descriptors, hash_part_id, Contexts, BASE_ALLOCATION_ID, HASH_PARTS};
use super::proto::*;
use super::transmission::{
    block_status_chunk, error_reply, finish_read_reply, none_chunk, ok_reply, read_prefix_len,
    Command, Request,
};

/// Most extents in one `BLOCK_STATUS` reply; clients ask again for the rest.
pub const MAX_EXTENTS: usize = 16 * 1024;

/// A finished request: the reply to send, and the disk error if it failed (for logs).
#[derive(Debug)]
pub struct Outcome {
    pub reply: Vec<u8>,
    pub error: Option<DiskError>,
}

/// The NBD error for a disk error on `command`. The spec wants `ENOSPC` for writes past the
/// end and reserves `ENOTSUP` for fast zeroing, so those differ from [`DiskError::errno`].
pub fn nbd_errno(e: DiskError, command: &Command) -> u32 {
    let writes = matches!(command, Command::Write { .. } | Command::WriteZeroes { .. });
    match e {
        DiskError::Io => EIO,
        DiskError::NoSpace => ENOSPC,
        DiskError::ReadOnly => EPERM,
        DiskError::OutOfRange if writes => ENOSPC,
        DiskError::OutOfRange | DiskError::Invalid | DiskError::NotSupported => EINVAL,
    }
}

/// The reply for a request that failed (or whose worker panicked) with `errno`.
pub fn failure_reply(structured: bool, req: &Request, errno: u32, message: &str) -> Vec<u8> {
    error_reply(structured, req.handle, errno, message)
}

/// Requests up to this size may run on the event loop.
pub const INLINE_BYTES: u32 = 64 << 10;

/// Where a request runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// On the event loop: it does not wait for a device (or only rarely, briefly).
    Inline,
    /// On the event loop if the disk can read it without waiting ([`try_read_inline`]),
    /// else on a worker.
    ReadIfCached,
    /// On a worker: it waits for the device (a flush, FUA) or takes long (large requests).
    Worker,
}

/// Where `req` runs. Small writes, trims, zeroing and block status change only memory and the
/// page cache; flushes and FUA wait for the disk; large requests would hold up the other
/// connections of the loop (and hash faster spread over the workers).
pub fn placement(req: &Request) -> Placement {
    match req.command {
        Command::Read { len, .. } if len <= INLINE_BYTES => Placement::ReadIfCached,
        Command::Write {
            len, fua: false, ..
        } if len <= INLINE_BYTES => Placement::Inline,
        Command::Trim { fua: false, .. }
        | Command::WriteZeroes { fua: false, .. }
        | Command::BlockStatus { .. }
        | Command::Cache { .. } => Placement::Inline,
        _ => Placement::Worker,
    }
}

/// Answers a READ if the disk has everything in memory; `None` if a worker must.
pub fn try_read_inline(disk: &dyn Disk, structured: bool, req: &Request) -> Option<Outcome> {
    let Command::Read { offset, len } = req.command else {
        return None;
    };
    if len == 0 {
        return Some(execute(disk, structured, *req, Vec::new()));
    }
    let prefix = read_prefix_len(structured);
    let mut buf = buffers::take(prefix + len as usize);
    let Some(read) = disk.read_nowait(&mut buf[prefix..], offset) else {
        buffers::give(buf);
        return None;
    };
    match read {
        Ok(()) => {
            finish_read_reply(&mut buf, structured, req.handle, offset);
            Some(Outcome {
                reply: buf,
                error: None,
            })
        }
        Err(e) => Some(Outcome {
            reply: error_reply(
                structured,
                req.handle,
                nbd_errno(e, &req.command),
                &e.to_string(),
            ),
            error: Some(e),
        }),
    }
}

/// Executes `req`; `payload` is the data of a WRITE (empty otherwise).
pub fn execute(disk: &dyn Disk, structured: bool, req: Request, payload: Vec<u8>) -> Outcome {
    let h = req.handle;
    let done = |r: Result<(), DiskError>| match r {
        Ok(()) => Outcome {
            reply: ok_reply(h),
            error: None,
        },
        Err(e) => Outcome {
            reply: error_reply(structured, h, nbd_errno(e, &req.command), &e.to_string()),
            error: Some(e),
        },
    };
    match req.command {
        Command::Read { offset, len } => {
            if len == 0 {
                let reply = if structured {
                    none_chunk(h)
                } else {
                    ok_reply(h)
                };
                return Outcome { reply, error: None };
            }
            let prefix = read_prefix_len(structured);
            let mut buf = buffers::take(prefix + len as usize);
            match disk.read_at(&mut buf[prefix..], offset) {
                Ok(()) => {
                    finish_read_reply(&mut buf, structured, h, offset);
                    Outcome {
                        reply: buf,
                        error: None,
                    }
                }
                Err(e) => done(Err(e)),
            }
        }
        Command::Write { offset, fua, .. } => {
            let r = disk.write_at(&payload, offset, fua);
            buffers::give(payload);
            done(r)
        }
        Command::Flush => done(disk.flush()),
        Command::Trim { offset, len, fua } => {
            let r = disk.discard(offset, len.into());
            done(if fua {
                r.and_then(|()| disk.flush())
            } else {
                r
            })
        }
        Command::WriteZeroes {
            offset,
            len,
            no_hole,
            fua,
        } => done(disk.write_zeroes(offset, len.into(), no_hole, fua)),
        Command::Cache { offset, len } => done(disk.cache(offset, len.into())),
        Command::BlockStatus {
            offset,
            len,
            req_one,
            contexts,
        } => match status_chunks(disk, h, offset, len, req_one, contexts) {
            Ok(reply) => Outcome { reply, error: None },
            Err(e) => done(Err(e)),
        },
    }
}

/// The reply to a block status request: one chunk per selected context, the last with
/// `DONE`.
fn status_chunks(
    disk: &dyn Disk,
    handle: u64,
    offset: u64,
    len: u32,
    req_one: bool,
    contexts: Contexts,
) -> Result<Vec<u8>, DiskError> {
    let max = if req_one { 1 } else { MAX_EXTENTS };
    let mut chunks: Vec<(u32, Vec<(u32, u32)>)> = Vec::new();
    if contexts.base_allocation {
        let extents = disk.block_status(offset, len.into(), max)?;
        chunks.push((BASE_ALLOCATION_ID, descriptors(&extents, len, max)));
    }
    if contexts.hash_parts != 0 {
        let hashes = disk.block_hashes(offset, len.into(), max)?;
        for k in 0..HASH_PARTS {
            if contexts.hash_parts & (1 << k) != 0 {
                chunks.push((hash_part_id(k), hash_descriptors(&hashes, k, len, max)));
            }
        }
    }
    let mut reply = Vec::new();
    let last = chunks.len().saturating_sub(1);
    for (i, (id, descs)) in chunks.iter().enumerate() {
        block_status_chunk(&mut reply, handle, *id, descs, i == last);
    }
    Ok(reply)
}

/// `base:allocation` descriptors for `extents`, trimmed to the request: at most `max`, none
/// empty, summing to at most `len`, and at least one (status 0, "allocated", is always safe).
pub fn descriptors(extents: &[crate::disk::Extent], len: u32, max: usize) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut left = u64::from(len);
    for e in extents {
        if left == 0 {
            break;
        }
        let n = e.len.min(left);
        if n == 0 {
            continue;
        }
        let flags = match e.state {
            ExtentState::Hole => STATE_HOLE | STATE_ZERO,
            ExtentState::Zero => STATE_ZERO,
            ExtentState::Data => 0,
        };
        match out.last_mut() {
            Some(last) if last.1 == flags => last.0 += n as u32,
            _ => {
                if out.len() >= max {
                    break;
                }
                out.push((n as u32, flags));
            }
        }
        left -= n;
    }
    if out.is_empty() {
        out.push((len, 0));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{Extent, MemDisk};
    use crate::nbd::transmission::block_status_reply;

    fn req(command: Command) -> Request {
        Request { handle: 3, command }
    }

    #[test]
    fn read_write_status() {
        let d = MemDisk::new(1 << 20);
        let w = execute(
            &d,
            true,
            req(Command::Write {
                offset: 10,
                len: 3,
                fua: true,
            }),
            vec![1, 2, 3],
        );
        assert_eq!(w.reply, ok_reply(3));
        let r = execute(&d, true, req(Command::Read { offset: 9, len: 5 }), vec![]);
        assert_eq!(&r.reply[DATA_CHUNK_PREFIX_LEN..], &[0, 1, 2, 3, 0]);
        let r = execute(&d, false, req(Command::Read { offset: 9, len: 5 }), vec![]);
        assert_eq!(&r.reply[SIMPLE_REPLY_LEN..], &[0, 1, 2, 3, 0]);
        let r = execute(&d, true, req(Command::Read { offset: 0, len: 0 }), vec![]);
        assert_eq!(r.reply, none_chunk(3));
        let s = execute(
            &d,
            true,
            req(Command::BlockStatus {
                offset: 0,
                len: 16384,
                req_one: false,
                contexts: BASE,
            }),
            vec![],
        );
        assert_eq!(s.reply, block_status_reply(3, 1, &[(4096, 0), (12288, 3)]));
        let s = execute(
            &d,
            true,
            req(Command::BlockStatus {
                offset: 0,
                len: 16384,
                req_one: true,
                contexts: BASE,
            }),
            vec![],
        );
        assert_eq!(s.reply, block_status_reply(3, 1, &[(4096, 0)]));
        d.write_zeroes(4096, 4096, true, false).unwrap();
        let s = execute(
            &d,
            true,
            req(Command::BlockStatus {
                offset: 4096,
                len: 4096,
                req_one: false,
                contexts: BASE,
            }),
            vec![],
        );
        assert_eq!(s.reply, block_status_reply(3, 1, &[(4096, STATE_ZERO)]));
    }

    const BASE: Contexts = Contexts {
        base_allocation: true,
        hash_parts: 0,
    };

    /// Each selected context gets its chunk, `base:allocation` first, the last one `DONE`.
    #[test]
    fn block_status_answers_every_selected_context() {
        let d = MemDisk::new(16384);
        d.write_at(&[1u8; 4096], 0, false).unwrap();
        let both = Contexts {
            base_allocation: true,
            hash_parts: 0b000010,
        };
        let r = execute(
            &d,
            true,
            req(Command::BlockStatus {
                offset: 0,
                len: 16384,
                req_one: false,
                contexts: both,
            }),
            vec![],
        );
        let mut want = Vec::new();
        block_status_chunk(&mut want, 3, 1, &[(4096, 0), (12288, 3)], false);
        // A disk without hashes: one run, status 0 ("no hash").
        block_status_chunk(&mut want, 3, 3, &[(16384, 0)], true);
        assert_eq!(r.reply, want);
    }

    #[test]
    fn errors_are_mapped() {
        let d = MemDisk::new(4096).snapshot();
        let w = execute(
            &d,
            true,
            req(Command::Write {
                offset: 0,
                len: 1,
                fua: false,
            }),
            vec![1],
        );
        assert_eq!(w.error, Some(DiskError::ReadOnly));
        assert_eq!(get_u32(&w.reply, 20), Some(EPERM));
        let cmd = Command::Write {
            offset: 0,
            len: 1,
            fua: false,
        };
        assert_eq!(nbd_errno(DiskError::OutOfRange, &cmd), ENOSPC);
        assert_eq!(nbd_errno(DiskError::OutOfRange, &Command::Flush), EINVAL);
        assert_eq!(nbd_errno(DiskError::NotSupported, &Command::Flush), EINVAL);
    }

    #[test]
    fn descriptors_are_trimmed() {
        let e = |len, state| Extent { len, state };
        assert_eq!(descriptors(&[], 100, 5), vec![(100, 0)]);
        assert_eq!(
            descriptors(
                &[
                    e(50, ExtentState::Data),
                    e(0, ExtentState::Zero),
                    e(80, ExtentState::Hole)
                ],
                100,
                5
            ),
            vec![(50, 0), (50, 3)]
        );
        assert_eq!(
            descriptors(
                &[e(10, ExtentState::Hole), e(10, ExtentState::Hole)],
                100,
                1
            ),
            vec![(20, 3)]
        );
    }
}
