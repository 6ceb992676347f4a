//! The transmission phase's pure half: checking a request header against what was negotiated
//! ([`decide`]) and encoding replies. Executing a request against a disk is
//! [`exec`](super::exec); moving bytes is the server's job.
//!
//! ```text
//!   28-byte header ─► decide ─┬─ Execute(Request) ─► (read the WRITE payload) ─► exec ─► reply bytes
//!                             ├─ Reject{errno}   ─► (skip any WRITE payload)  ─► error reply
//!                             └─ Disconnect (NBD_CMD_DISC)
//! ```

use super::handshake::{Negotiated, MIN_BLOCK};
use super::meta::Contexts;
use super::proto::*;

/// What the transmission phase needs to know about the negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub size: u64,
    pub read_only: bool,
    /// Structured replies were negotiated: reads and errors use chunks.
    pub structured: bool,
    /// The client asked for block size constraints, so misaligned requests are errors.
    pub strict_blocks: bool,
    /// The metadata contexts selected.
    pub contexts: Contexts,
    /// Largest READ/WRITE/CACHE/WRITE_ZEROES length.
    pub max_request: u32,
}

impl From<&Negotiated> for Params {
    fn from(n: &Negotiated) -> Self {
        Params {
            size: n.export.size,
            read_only: n.export.read_only,
            structured: n.structured,
            strict_blocks: n.block_size_negotiated,
            contexts: n.contexts,
            max_request: n.max_request_bytes,
        }
    }
}

/// A request that passed every check and can run against the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    /// The `len` payload bytes follow the header.
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
    },
    Cache {
        offset: u64,
        len: u32,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
        contexts: Contexts,
    },
}

impl Command {
    /// Bytes this request ties up until its reply is sent: its payload in or out.
    pub fn cost(&self) -> u64 {
        match *self {
            Command::Read { len, .. } | Command::Write { len, .. } => len.into(),
            _ => 0,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Command::Read { .. } => "READ",
            Command::Write { .. } => "WRITE",
            Command::Flush => "FLUSH",
            Command::Trim { .. } => "TRIM",
            Command::WriteZeroes { .. } => "WRITE_ZEROES",
            Command::Cache { .. } => "CACHE",
            Command::BlockStatus { .. } => "BLOCK_STATUS",
        }
    }
}

/// A validated request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub handle: u64,
    pub command: Command,
}

/// What to do with a request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Run it (after reading the payload of a WRITE).
    Execute(Request),
    /// Answer with `errno`, after skipping the `discard` payload bytes that follow the header
    /// (a refused WRITE still sends its data).
    Reject {
        handle: u64,
        errno: u32,
        discard: u32,
        why: &'static str,
    },
    /// `NBD_CMD_DISC`: finish what is in flight and close.
    Disconnect,
}

/// Checks a request against the negotiated parameters, in the spec's terms: unknown commands,
/// unknown or inapplicable flags, misalignment (when block sizes were negotiated), and
/// over-long requests are `EINVAL` (an over-long read with `DF` is `EOVERFLOW`); writes to a
/// read-only export are `EPERM`; writes past the end are `ENOSPC`, other requests past the end
/// `EINVAL`.
pub fn decide(p: &Params, h: &RequestHeader) -> Decision {
    let discard = if h.kind == CMD_WRITE { h.len } else { 0 };
    let reject = |errno, why| Decision::Reject {
        handle: h.handle,
        errno,
        discard,
        why,
    };
    let allowed = CMD_FLAG_FUA
        | match h.kind {
            CMD_READ if p.structured => CMD_FLAG_DF,
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            CMD_READ | CMD_WRITE | CMD_DISC | CMD_FLUSH | CMD_TRIM | CMD_CACHE => 0,
            _ => return reject(EINVAL, "unknown command"),
        };
    if h.kind == CMD_DISC {
        return Decision::Disconnect;
    }
    if h.flags & !allowed != 0 {
        return reject(EINVAL, "unsupported command flags");
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let (offset, len) = (h.offset, h.len);
    if h.kind == CMD_FLUSH {
        if offset != 0 || len != 0 {
            return reject(EINVAL, "flush with nonzero offset or length");
        }
        return Decision::Execute(Request {
            handle: h.handle,
            command: Command::Flush,
        });
    }
    let writes = matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if h.kind == CMD_WRITE && len > p.max_request {
        return reject(EINVAL, "request longer than the maximum block size");
    }
    if h.kind == CMD_BLOCK_STATUS && p.contexts.is_empty() {
        return reject(EINVAL, "no metadata context was negotiated");
    }
    if writes && p.read_only {
        return reject(EPERM, "export is read-only");
    }
    let min = u64::from(MIN_BLOCK);
    if p.strict_blocks && (offset % min != 0 || u64::from(len) % min != 0) {
        return reject(EINVAL, "request not aligned to the minimum block size");
    }
    let fast_zero = h.flags & CMD_FLAG_FAST_ZERO != 0;
    let limited = match h.kind {
        CMD_READ | CMD_CACHE => true,
        CMD_WRITE_ZEROES => !fast_zero,
        _ => false,
    };
    if limited && len > p.max_request {
        if h.kind == CMD_READ && h.flags & CMD_FLAG_DF != 0 {
            return reject(EOVERFLOW, "read too large to send unfragmented");
        }
        return reject(EINVAL, "request longer than the maximum block size");
    }
    if offset
        .checked_add(len.into())
        .is_none_or(|end| end > p.size)
    {
        let errno = if matches!(h.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
            ENOSPC
        } else {
            EINVAL
        };
        return reject(errno, "request beyond the end of the export");
    }
    let command = match h.kind {
        CMD_READ => Command::Read { offset, len },
        CMD_WRITE => Command::Write { offset, len, fua },
        CMD_TRIM => Command::Trim { offset, len, fua },
        CMD_CACHE => Command::Cache { offset, len },
        CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset,
            len,
            no_hole: h.flags & CMD_FLAG_NO_HOLE != 0,
            fua,
        },
        _ => {
            if len == 0 {
                return reject(EINVAL, "block status of an empty range");
            }
            Command::BlockStatus {
                offset,
                len,
                req_one: h.flags & CMD_FLAG_REQ_ONE != 0,
                contexts: p.contexts,
            }
        }
    };
    Decision::Execute(Request {
        handle: h.handle,
        command,
    })
}

/// A successful reply without payload (a simple reply, which the spec allows for every
/// command but a structured READ).
pub fn ok_reply(handle: u64) -> Vec<u8> {
    let mut v = vec![0u8; SIMPLE_REPLY_LEN];
    write_simple_reply(&mut v, handle, 0);
    v
}

/// A successful structured reply without content: a single `NONE` chunk with `DONE`.
pub fn none_chunk(handle: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(CHUNK_HEADER_LEN);
    put_chunk_header(&mut v, REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0);
    v
}

/// An error reply: a simple reply with `errno`, or, with structured replies, an `ERROR`
/// chunk with `DONE` carrying a message for humans.
pub fn error_reply(structured: bool, handle: u64, errno: u32, message: &str) -> Vec<u8> {
    if !structured {
        let mut v = vec![0u8; SIMPLE_REPLY_LEN];
        write_simple_reply(&mut v, handle, errno);
        return v;
    }
    let msg = &message.as_bytes()[..message.len().min(MAX_STRING)];
    let mut v = Vec::with_capacity(CHUNK_HEADER_LEN + 6 + msg.len());
    put_chunk_header(
        &mut v,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        handle,
        6 + msg.len() as u32,
    );
    v.extend_from_slice(&errno.to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

/// Bytes to reserve in front of read data for the reply header.
pub fn read_prefix_len(structured: bool) -> usize {
    if structured {
        DATA_CHUNK_PREFIX_LEN
    } else {
        SIMPLE_REPLY_LEN
    }
}

/// Fills in the header in front of read data: `buf` is `read_prefix_len` bytes followed by
/// the data. With structured replies this is one `OFFSET_DATA` chunk with `DONE` (the data
/// is complete, so no error can follow). `buf` must hold at least one data byte when
/// structured; a zero-length structured read is answered with [`none_chunk`] instead.
pub fn finish_read_reply(buf: &mut [u8], structured: bool, handle: u64, offset: u64) {
    if structured {
        let data_len = buf.len() - DATA_CHUNK_PREFIX_LEN;
        // Requests are capped at max_request (< 4 GiB - 8), so this fits the length field.
        let chunk_len = (data_len + 8) as u32;
        write_chunk_header(
            buf,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            handle,
            chunk_len,
        );
        buf[CHUNK_HEADER_LEN..DATA_CHUNK_PREFIX_LEN].copy_from_slice(&offset.to_be_bytes());
    } else {
        write_simple_reply(buf, handle, 0);
    }
}

/// A `BLOCK_STATUS` chunk with `DONE` for one context: descriptors of (length, flags).
pub fn block_status_reply(handle: u64, context: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut v = Vec::new();
    block_status_chunk(&mut v, handle, context, extents, true);
    v
}

/// Appends a `BLOCK_STATUS` chunk for one context (the last of a reply with `done`).
pub fn block_status_chunk(
    v: &mut Vec<u8>,
    handle: u64,
    context: u32,
    extents: &[(u32, u32)],
    done: bool,
) {
    let len = 4 + 8 * extents.len();
    v.reserve(CHUNK_HEADER_LEN + len);
    put_chunk_header(
        v,
        if done { REPLY_FLAG_DONE } else { 0 },
        REPLY_TYPE_BLOCK_STATUS,
        handle,
        len as u32,
    );
    v.extend_from_slice(&context.to_be_bytes());
    for (l, f) in extents {
        v.extend_from_slice(&l.to_be_bytes());
        v.extend_from_slice(&f.to_be_bytes());
    }
}

/// Runs [`decide`] over every 28-byte header in `data` with a few parameter sets. A fuzz
/// target's entry point; never panics.
pub fn fuzz_requests(data: &[u8]) {
    let params = [
        Params {
            size: 1 << 20,
            read_only: false,
            structured: true,
            strict_blocks: true,
            contexts: Contexts {
                base_allocation: true,
                hash_parts: 0,
            },
            max_request: 1 << 16,
        },
        Params {
            size: u64::MAX - 511,
            read_only: true,
            structured: false,
            strict_blocks: false,
            contexts: Contexts::default(),
            max_request: 0xffff_fe00,
        },
    ];
    for chunk in data.chunks(REQUEST_LEN) {
        let Ok(h) = RequestHeader::decode(chunk) else {
            continue;
        };
        for p in &params {
            if let Decision::Execute(r) = decide(p, &h) {
                let _ = r.command.cost();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const P: Params = Params {
        size: 1 << 20,
        read_only: false,
        structured: true,
        strict_blocks: false,
        contexts: Contexts {
            base_allocation: true,
            hash_parts: 0,
        },
        max_request: 1 << 16,
    };

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            handle: 42,
            offset,
            len,
        }
    }

    fn errno(d: Decision) -> Option<u32> {
        match d {
            Decision::Reject { errno, .. } => Some(errno),
            _ => None,
        }
    }

    #[test]
    fn valid_requests() {
        assert_eq!(
            decide(&P, &req(CMD_READ, CMD_FLAG_DF, 1, 3)),
            Decision::Execute(Request {
                handle: 42,
                command: Command::Read { offset: 1, len: 3 }
            })
        );
        assert!(matches!(
            decide(&P, &req(CMD_WRITE, CMD_FLAG_FUA, 0, 512)),
            Decision::Execute(Request {
                command: Command::Write { fua: true, .. },
                ..
            })
        ));
        assert!(matches!(
            decide(
                &P,
                &req(
                    CMD_WRITE_ZEROES,
                    CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                    0,
                    1 << 20
                )
            ),
            Decision::Execute(Request {
                command: Command::WriteZeroes { no_hole: true, .. },
                ..
            })
        ));
        assert!(matches!(
            decide(&P, &req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 1 << 20)),
            Decision::Execute(Request {
                command: Command::BlockStatus { req_one: true, .. },
                ..
            })
        ));
        assert!(matches!(
            decide(&P, &req(CMD_TRIM, 0, 0, 1 << 20)),
            Decision::Execute(_)
        ));
        assert!(matches!(
            decide(&P, &req(CMD_READ, 0, 1 << 20, 0)),
            Decision::Execute(_)
        ));
        assert_eq!(decide(&P, &req(CMD_DISC, 0, 0, 0)), Decision::Disconnect);
    }

    #[test]
    fn errors_follow_the_spec() {
        assert_eq!(errno(decide(&P, &req(99, 0, 0, 0))), Some(EINVAL));
        assert_eq!(
            errno(decide(&P, &req(CMD_READ, CMD_FLAG_NO_HOLE, 0, 1))),
            Some(EINVAL)
        );
        assert_eq!(
            errno(decide(&P, &req(CMD_READ, 1 << 9, 0, 1))),
            Some(EINVAL)
        );
        assert_eq!(errno(decide(&P, &req(CMD_FLUSH, 0, 1, 0))), Some(EINVAL));
        assert_eq!(
            errno(decide(&P, &req(CMD_READ, 0, 0, (1 << 16) + 1))),
            Some(EINVAL)
        );
        assert_eq!(
            errno(decide(&P, &req(CMD_READ, CMD_FLAG_DF, 0, (1 << 16) + 1))),
            Some(EOVERFLOW)
        );
        assert_eq!(
            errno(decide(&P, &req(CMD_READ, 0, (1 << 20) - 1, 2))),
            Some(EINVAL)
        );
        assert_eq!(
            errno(decide(&P, &req(CMD_READ, 0, u64::MAX, 2))),
            Some(EINVAL)
        );
        assert_eq!(
            errno(decide(&P, &req(CMD_WRITE, 0, 1 << 20, 1))),
            Some(ENOSPC)
        );
        assert_eq!(
            errno(decide(&P, &req(CMD_WRITE_ZEROES, 0, 1 << 20, 1))),
            Some(ENOSPC)
        );
        assert_eq!(
            errno(decide(&P, &req(CMD_TRIM, 0, 1 << 20, 1))),
            Some(EINVAL)
        );
        assert_eq!(
            errno(decide(&P, &req(CMD_BLOCK_STATUS, 0, 0, 0))),
            Some(EINVAL)
        );
        // Over-long zeroing is refused unless it is a fast zero.
        assert_eq!(
            errno(decide(&P, &req(CMD_WRITE_ZEROES, 0, 0, (1 << 16) + 512))),
            Some(EINVAL)
        );
        let no_meta = Params {
            contexts: Contexts::default(),
            ..P
        };
        assert_eq!(
            errno(decide(&no_meta, &req(CMD_BLOCK_STATUS, 0, 0, 512))),
            Some(EINVAL)
        );
        let simple = Params {
            structured: false,
            ..P
        };
        assert_eq!(
            errno(decide(&simple, &req(CMD_READ, CMD_FLAG_DF, 0, 1))),
            Some(EINVAL)
        );
    }

    #[test]
    fn oversized_write_discards_its_payload() {
        assert_eq!(
            decide(&P, &req(CMD_WRITE, 0, 0, u32::MAX)),
            Decision::Reject {
                handle: 42,
                errno: EINVAL,
                discard: u32::MAX,
                why: "request longer than the maximum block size"
            }
        );
    }

    #[test]
    fn read_only_and_alignment() {
        let ro = Params {
            read_only: true,
            ..P
        };
        for kind in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert_eq!(errno(decide(&ro, &req(kind, 0, 0, 512))), Some(EPERM));
        }
        assert!(matches!(
            decide(&ro, &req(CMD_READ, 0, 0, 512)),
            Decision::Execute(_)
        ));
        let strict = Params {
            strict_blocks: true,
            ..P
        };
        // The minimum block size is 1: even strict clients may address any byte.
        assert!(matches!(
            decide(&strict, &req(CMD_READ, 0, 1, 512)),
            Decision::Execute(_)
        ));
        assert!(matches!(
            decide(&strict, &req(CMD_WRITE, 0, 512, 100)),
            Decision::Execute(_)
        ));
        assert!(matches!(
            decide(&strict, &req(CMD_READ, 0, 512, 1024)),
            Decision::Execute(_)
        ));
        assert!(matches!(
            decide(&P, &req(CMD_WRITE, 0, 3, 100)),
            Decision::Execute(_)
        ));
    }

    #[test]
    fn reply_encodings() {
        let e = error_reply(true, 7, EIO, "boom");
        assert_eq!(get_u32(&e, 0), Some(STRUCTURED_REPLY_MAGIC));
        assert_eq!(get_u16(&e, 4), Some(REPLY_FLAG_DONE));
        assert_eq!(get_u16(&e, 6), Some(REPLY_TYPE_ERROR));
        assert_eq!(get_u64(&e, 8), Some(7));
        assert_eq!(get_u32(&e, 16), Some(10));
        assert_eq!(get_u32(&e, 20), Some(EIO));
        assert_eq!(get_u16(&e, 24), Some(4));
        assert_eq!(&e[26..], b"boom");
        let s = error_reply(false, 7, EIO, "boom");
        assert_eq!(s.len(), 16);
        assert_eq!(get_u32(&s, 4), Some(EIO));
        let mut r = vec![0u8; DATA_CHUNK_PREFIX_LEN + 3];
        finish_read_reply(&mut r, true, 9, 100);
        assert_eq!(get_u16(&r, 6), Some(REPLY_TYPE_OFFSET_DATA));
        assert_eq!(get_u32(&r, 16), Some(11));
        assert_eq!(get_u64(&r, 20), Some(100));
        let b = block_status_reply(1, 1, &[(4096, 3), (512, 0)]);
        assert_eq!(get_u32(&b, 16), Some(20));
        assert_eq!(get_u32(&b, 24), Some(4096));
        assert_eq!(get_u32(&b, 28), Some(3));
        assert_eq!(none_chunk(5).len(), 20);
    }

    proptest! {
        #[test]
        fn decide_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            fuzz_requests(&data);
        }

        #[test]
        fn accepted_requests_are_in_range(
            kind in 0u16..10, flags in 0u16..32, offset in any::<u64>(), len in any::<u32>(),
            strict in any::<bool>(),
        ) {
            // (The minimum block size is 1: alignment holds for any request.)
            let p = Params { strict_blocks: strict, ..P };
            if let Decision::Execute(r) = decide(&p, &req(kind, flags, offset, len)) {
                prop_assert!(offset + u64::from(len) <= p.size);
                if matches!(r.command, Command::Read { .. } | Command::Write { .. }) {
                    prop_assert!(len <= p.max_request);
                }
            }
        }
    }
}
