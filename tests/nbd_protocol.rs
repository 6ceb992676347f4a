//! The NBD server at the protocol level with a raw socket client: the spec's answers for
//! each kind of request, and a malformed-input suite (bad magics and lengths, floods,
//! oversized requests, clients that vanish or never read). After every abuse a real client
//! (nbdinfo) checks that the server still serves.

use std::{io::Write, net::TcpStream, sync::Arc, time::Duration};

use parallax::{
    disk::{Disk, MemDisk},
    nbd::{proto::*, NbdConfig},
};
use parallax_integration::nbd::*;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 4 * MIB;

fn setup(cfg: NbdConfig) -> (TestServer, Arc<MemDisk>) {
    let provider = Arc::new(TestProvider::new());
    let disk = provider.add("vm", SIZE, "test disk");
    disk.write_at(&[0x42; 8192], 0, false).unwrap();
    provider.add_snapshot("vm@snap", &disk, "snapshot");
    (TestServer::start(provider, cfg), disk)
}

fn small_cfg() -> NbdConfig {
    NbdConfig {
        max_request_bytes: MIB as u32,
        ..NbdConfig::default()
    }
}

/// Descriptors of a block status reply's data: context ID, then (length, flags) pairs.
fn descriptors(data: &[u8]) -> (u32, Vec<(u32, u32)>) {
    let ctx = get_u32(data, 0).unwrap();
    let d = data[4..]
        .chunks(8)
        .map(|c| (get_u32(c, 0).unwrap(), get_u32(c, 4).unwrap()))
        .collect();
    (ctx, d)
}

#[test]
fn commands_with_structured_replies() {
    let (srv, disk) = setup(small_cfg());
    let mut c = RawClient::start(srv.port);
    let (size, flags) = c.go("vm", true, false);
    assert_eq!(size, SIZE);
    for f in [
        FLAG_HAS_FLAGS,
        FLAG_SEND_FLUSH,
        FLAG_SEND_FUA,
        FLAG_SEND_TRIM,
        FLAG_SEND_WRITE_ZEROES,
        FLAG_SEND_FAST_ZERO,
        FLAG_SEND_CACHE,
        FLAG_CAN_MULTI_CONN,
        FLAG_SEND_DF,
    ] {
        assert_ne!(flags & f, 0, "flag {f:#x} missing from {flags:#x}");
    }
    assert_eq!(flags & FLAG_READ_ONLY, 0);

    // Byte-granular write and read: allowed, since the client did not ask for block sizes.
    c.write(CMD_FLAG_FUA, 1, 1001, b"abc");
    assert_eq!(c.read_reply(None).unwrap().error, 0);
    c.request(CMD_READ, CMD_FLAG_DF, 2, 1000, 5);
    let r = c.read_reply(Some(5)).unwrap();
    assert_eq!(
        (r.handle, r.error, r.data.as_slice()),
        (2, 0, &[0x42, b'a', b'b', b'c', 0x42][..])
    );
    assert_eq!(r.chunks, [REPLY_TYPE_OFFSET_DATA]);
    // Zero-length read: one NONE chunk.
    c.request(CMD_READ, 0, 3, 0, 0);
    assert_eq!(c.read_reply(Some(0)).unwrap().chunks, [REPLY_TYPE_NONE]);

    c.request(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 4, 65536, 65536);
    assert_eq!(c.read_reply(None).unwrap().error, 0);
    c.request(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 5, 0, SIZE as u32);
    assert_eq!(c.read_reply(None).unwrap().error, 0);
    assert!(disk_bytes(&disk, 0, 8192).iter().all(|&b| b == 0));
    c.write(0, 6, 8192, &[9u8; 4096]);
    c.request(CMD_TRIM, CMD_FLAG_FUA, 7, MIB, MIB as u32);
    c.request(CMD_FLUSH, 0, 8, 0, 0);
    c.request(CMD_CACHE, 0, 9, 0, 4096);
    let mut handles: Vec<u64> = (0..4)
        .map(|_| c.read_reply(None).unwrap())
        .map(|r| {
            assert_eq!(r.error, 0, "{r:?}");
            r.handle
        })
        .collect();
    handles.sort();
    assert_eq!(handles, [6, 7, 8, 9]);

    // Block status: data at 8192..12288, holes elsewhere.
    c.request(CMD_BLOCK_STATUS, 0, 10, 0, 3 * 4096);
    let r = c.read_reply(None).unwrap();
    assert_eq!(r.chunks, [REPLY_TYPE_BLOCK_STATUS]);
    assert_eq!(
        descriptors(&r.data),
        (1, vec![(8192, STATE_HOLE | STATE_ZERO), (4096, 0)])
    );
    c.request(
        CMD_BLOCK_STATUS,
        CMD_FLAG_REQ_ONE,
        11,
        8192,
        SIZE as u32 - 8192,
    );
    let r = c.read_reply(None).unwrap();
    assert_eq!(descriptors(&r.data), (1, vec![(4096, 0)]));

    // Past the end: EINVAL for reads, trims, status; ENOSPC for writes.
    for (kind, errno) in [
        (CMD_READ, EINVAL),
        (CMD_TRIM, EINVAL),
        (CMD_BLOCK_STATUS, EINVAL),
        (CMD_CACHE, EINVAL),
        (CMD_WRITE_ZEROES, ENOSPC),
    ] {
        c.request(kind, 0, 20, SIZE - 512, 1024);
        let r = c.read_reply(Some(1024)).unwrap();
        assert_eq!((r.handle, r.error), (20, errno), "{}", command_name(kind));
        assert!(r.chunks.iter().all(|&t| t == REPLY_TYPE_ERROR), "{r:?}");
    }
    c.write(0, 21, SIZE - 2, &[1, 2, 3]);
    assert_eq!(c.read_reply(None).unwrap().error, ENOSPC);
    // Unknown command, unknown flag, inapplicable flag, FLUSH with a length.
    c.request(42, 0, 22, 0, 0);
    assert_eq!(c.read_reply(None).unwrap().error, EINVAL);
    c.request(CMD_READ, 1 << 12, 23, 0, 512);
    assert_eq!(c.read_reply(Some(512)).unwrap().error, EINVAL);
    c.request(CMD_READ, CMD_FLAG_REQ_ONE, 24, 0, 512);
    assert_eq!(c.read_reply(Some(512)).unwrap().error, EINVAL);
    c.request(CMD_FLUSH, 0, 25, 0, 512);
    assert_eq!(c.read_reply(None).unwrap().error, EINVAL);
    // Over the maximum request size: EINVAL, or EOVERFLOW for a don't-fragment read.
    c.request(CMD_READ, 0, 26, 0, MIB as u32 + 512);
    assert_eq!(c.read_reply(Some(0)).unwrap().error, EINVAL);
    c.request(CMD_READ, CMD_FLAG_DF, 27, 0, MIB as u32 + 512);
    assert_eq!(c.read_reply(Some(0)).unwrap().error, EOVERFLOW);
    // A refused write still sends its payload; the connection stays in sync.
    c.write(0, 28, 0, &vec![7u8; MIB as usize + 512]);
    assert_eq!(c.read_reply(None).unwrap().error, EINVAL);
    assert!(disk_bytes(&disk, 0, 512).iter().all(|&b| b == 0));
    // Trim and fast zeroing are not limited by the maximum request size.
    c.request(CMD_TRIM, 0, 29, 0, SIZE as u32);
    assert_eq!(c.read_reply(None).unwrap().error, 0);
    c.request(CMD_READ, 0, 30, 8192, 4);
    assert_eq!(c.read_reply(Some(4)).unwrap().data, [0; 4]);

    // NBD_CMD_DISC: the server closes after answering what is in flight.
    c.request(CMD_READ, 0, 31, 0, 4096);
    c.request(CMD_DISC, 0, 32, 0, 0);
    assert_eq!(c.read_reply(Some(4096)).unwrap().handle, 31);
    assert!(c.closed_by_server());
    srv.assert_serving("vm", SIZE);
}

#[test]
fn simple_replies_and_block_size_constraints() {
    let (srv, disk) = setup(small_cfg());
    let mut c = RawClient::start(srv.port);
    let (_, flags) = c.go("vm", false, true);
    assert_eq!(flags & FLAG_SEND_DF, 0, "DF needs structured replies");
    c.request(CMD_READ, 0, 1, 0, 4096);
    let r = c.read_reply(Some(4096)).unwrap();
    assert_eq!((r.handle, r.error), (1, 0));
    assert!(r.data.iter().all(|&b| b == 0x42));
    // The client asked for block sizes; the minimum is 1, so any byte range is aligned.
    c.request(CMD_READ, 0, 2, 1, 512);
    let r = c.read_reply(Some(512)).unwrap();
    assert_eq!((r.handle, r.error), (2, 0));
    c.write(0, 3, 512, &[1u8; 100]);
    assert_eq!(c.read_reply(None).unwrap().error, 0);
    c.write(0, 4, 700, &[2u8; 3]);
    assert_eq!(c.read_reply(None).unwrap().error, 0);
    assert_eq!(disk_bytes(&disk, 511, 2), [0x42, 1]);
    assert_eq!(disk_bytes(&disk, 699, 5), [0x42, 2, 2, 2, 0x42]);
    // No metadata context was negotiated.
    c.request(CMD_BLOCK_STATUS, 0, 5, 0, 512);
    assert_eq!(c.read_reply(None).unwrap().error, EINVAL);
    // An error on a read sends no payload in a simple reply; the stream stays in sync.
    c.request(CMD_READ, 0, 6, SIZE, 512);
    assert_eq!(c.read_reply(Some(512)).unwrap().error, EINVAL);
    c.request(CMD_READ, 0, 7, 0, 512);
    assert_eq!(c.read_reply(Some(512)).unwrap().handle, 7);
}

#[test]
fn read_only_export_answers_eperm() {
    let (srv, disk) = setup(small_cfg());
    for structured in [true, false] {
        let mut c = RawClient::start(srv.port);
        let (_, flags) = c.go("vm@snap", structured, false);
        assert_ne!(flags & FLAG_READ_ONLY, 0);
        assert_eq!(flags & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES), 0);
        c.write(0, 1, 0, &[1u8; 512]);
        c.request(CMD_TRIM, 0, 2, 0, 4096);
        c.request(CMD_WRITE_ZEROES, 0, 3, 0, 4096);
        for _ in 0..3 {
            let r = c.read_reply(None).unwrap();
            assert_eq!(r.error, EPERM, "{r:?}");
        }
        c.request(CMD_READ, 0, 4, 0, 512);
        assert!(c
            .read_reply(Some(512))
            .unwrap()
            .data
            .iter()
            .all(|&b| b == 0x42));
    }
    // The writable VDI was not touched through its snapshot.
    assert!(disk_bytes(&disk, 0, 4096).iter().all(|&b| b == 0x42));
}

#[test]
fn handshake_options() {
    let (srv, _disk) = setup(small_cfg());
    let mut c = RawClient::start(srv.port);
    // LIST with descriptions.
    c.send_option(OPT_LIST, &[]);
    let r = c.read_option_replies();
    let names: Vec<String> = r[..r.len() - 1]
        .iter()
        .map(|x| {
            assert_eq!(x.1, REP_SERVER);
            let n = get_u32(&x.2, 0).unwrap() as usize;
            String::from_utf8(x.2[4..4 + n].to_vec()).unwrap()
        })
        .collect();
    assert_eq!(names, ["vm", "vm@snap"]);
    assert_eq!(&r[0].2[6..], b"test disk");
    // INFO does not enter transmission; unknown exports and options get errors.
    c.send_option(
        OPT_INFO,
        &go_data("vm", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]),
    );
    let r = c.read_option_replies();
    assert_eq!(r.last().unwrap().1, REP_ACK);
    let infos: Vec<u16> = r
        .iter()
        .filter(|x| x.1 == REP_INFO)
        .map(|x| get_u16(&x.2, 0).unwrap())
        .collect();
    for i in [INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE] {
        assert!(infos.contains(&i), "info {i} missing");
    }
    c.send_option(OPT_INFO, &go_data("nope", &[]));
    assert_eq!(c.read_option_replies().last().unwrap().1, REP_ERR_UNKNOWN);
    c.send_option(OPT_GO, &go_data("nope", &[]));
    assert_eq!(c.read_option_replies().last().unwrap().1, REP_ERR_UNKNOWN);
    c.send_option(0x1234, b"whatever");
    assert_eq!(c.read_option_reply().1, REP_ERR_UNSUP);
    c.send_option(OPT_STARTTLS, &[]);
    assert_eq!(c.read_option_reply().1, REP_ERR_UNSUP);
    c.send_option(OPT_SET_META_CONTEXT, &meta_data("vm", &["base:allocation"]));
    assert_eq!(
        c.read_option_reply().1,
        REP_ERR_INVALID,
        "meta context before structured replies"
    );
    // Inconsistent lengths inside an option.
    c.send_option(OPT_GO, &[0, 0, 1, 0, b'v', b'm', 0, 0]);
    assert_eq!(c.read_option_reply().1, REP_ERR_INVALID);
    c.send_option(OPT_LIST, b"x");
    assert_eq!(c.read_option_reply().1, REP_ERR_INVALID);
    // Then a normal GO still works on the same connection.
    c.go("vm", true, true);
    c.request(CMD_READ, 0, 1, 0, 512);
    assert_eq!(c.read_reply(Some(512)).unwrap().error, 0);

    // ABORT gets an ACK and the server closes.
    let mut c = RawClient::start(srv.port);
    c.send_option(OPT_ABORT, &[]);
    assert_eq!(c.read_option_reply().1, REP_ACK);
    assert!(c.closed_by_server());

    // Old-style EXPORT_NAME, with and without the 124 zero bytes.
    for (flags, tail) in [
        (FLAG_C_FIXED_NEWSTYLE, 124),
        (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 0),
    ] {
        let mut c = RawClient::connect(srv.port);
        c.send(&flags.to_be_bytes());
        c.send_option(OPT_EXPORT_NAME, b"vm");
        let r = c.read_exact(10 + tail).unwrap();
        assert_eq!(get_u64(&r, 0), Some(SIZE));
        c.request(CMD_READ, 0, 9, 0, 16);
        assert_eq!(c.read_reply(Some(16)).unwrap().data, [0x42; 16]);
    }
    // EXPORT_NAME of an unknown export: the server can only hang up.
    let mut c = RawClient::start(srv.port);
    c.send_option(OPT_EXPORT_NAME, b"nope");
    assert!(c.closed_by_server());
    srv.assert_serving("vm", SIZE);
}

#[test]
fn many_requests_in_flight_on_many_connections() {
    let (srv, disk) = setup(NbdConfig::default());
    let mut clients: Vec<RawClient> = (0..4)
        .map(|_| {
            let mut c = RawClient::start(srv.port);
            c.go("vm", true, true);
            c
        })
        .collect();
    for (i, c) in clients.iter_mut().enumerate() {
        for j in 0..64u64 {
            let off = (i as u64 * 64 + j) * 4096;
            c.write(0, j, off, &[(i * 64 + j as usize) as u8; 4096]);
        }
    }
    for c in &mut clients {
        let mut got: Vec<u64> = (0..64)
            .map(|_| c.read_reply(None).unwrap())
            .map(|r| {
                assert_eq!(r.error, 0);
                r.handle
            })
            .collect();
        got.sort();
        assert_eq!(got, (0..64).collect::<Vec<_>>());
    }
    for i in 0..256u64 {
        assert_eq!(disk_bytes(&disk, i * 4096 + 100, 1), [i as u8]);
    }
}

#[test]
fn maximum_size_requests() {
    // The default limit: 64 MiB reads and writes work, one byte more is refused.
    let provider = Arc::new(TestProvider::new());
    let disk = provider.add("big", 128 * MIB, "");
    let srv = TestServer::start(provider, NbdConfig::default());
    let max = 64 * MIB as usize;
    let data = random_bytes(3, max);
    let mut c = RawClient::start(srv.port);
    c.go("big", true, true);
    c.write(CMD_FLAG_FUA, 1, 32 * MIB, &data);
    assert_eq!(c.read_reply(None).unwrap().error, 0);
    c.request(CMD_READ, CMD_FLAG_DF, 2, 32 * MIB, max as u32);
    let r = c.read_reply(Some(max)).unwrap();
    assert_eq!(
        (r.error, r.chunks.as_slice()),
        (0, &[REPLY_TYPE_OFFSET_DATA][..])
    );
    assert!(r.data == data, "64 MiB read differs");
    assert!(disk_bytes(&disk, 32 * MIB, max) == data);
    c.request(CMD_READ, 0, 3, 0, max as u32 + 512);
    assert_eq!(c.read_reply(None).unwrap().error, EINVAL);
    // A simple-reply client gets the same answers.
    let mut c = RawClient::start(srv.port);
    c.go("big", false, false);
    c.request(CMD_READ, 0, 4, 32 * MIB, max as u32);
    assert!(c.read_reply(Some(max)).unwrap().data == data);
    c.request(CMD_READ, 0, 5, 0, max as u32 + 512);
    assert_eq!(c.read_reply(Some(max + 512)).unwrap().error, EINVAL);
    c.request(CMD_READ, 0, 6, 0, 512);
    assert_eq!(c.read_reply(Some(512)).unwrap().handle, 6);
}

// ---- malformed input ----

#[test]
fn bad_client_flags_and_magic() {
    let (srv, _disk) = setup(small_cfg());
    let mut c = RawClient::connect(srv.port);
    c.send(&0x8000_0001u32.to_be_bytes());
    assert!(c.closed_by_server());
    srv.assert_serving("vm", SIZE);

    let mut c = RawClient::start(srv.port);
    c.send(b"NOTMAGIC\0\0\0\x07\0\0\0\0");
    assert!(c.closed_by_server());
    srv.assert_serving("vm", SIZE);

    // Bad request magic in transmission.
    let mut c = RawClient::start(srv.port);
    c.go("vm", true, false);
    c.send(&[0xde; 28]);
    assert!(c.closed_by_server());
    srv.assert_serving("vm", SIZE);

    // Garbage right after connecting.
    let mut c = RawClient::connect(srv.port);
    let _ = c.try_send(&random_bytes(7, 100_000));
    assert!(c.closed_by_server());
    srv.assert_serving("vm", SIZE);
}

#[test]
fn huge_option_lengths() {
    let (srv, _disk) = setup(small_cfg());
    // A 4 GiB option: the server skips what arrives and never allocates it.
    let mut hung = RawClient::start(srv.port);
    hung.send(
        &OptionHeader {
            option: OPT_GO,
            len: 0xffff_fff0,
        }
        .encode(),
    );
    hung.send(&[0u8; 100_000]);
    srv.assert_serving("vm", SIZE);
    // A 1 MiB option, sent in full, is refused with TOO_BIG and the session carries on.
    let mut c = RawClient::start(srv.port);
    c.send_option(0x77, &vec![1u8; MIB as usize]);
    assert_eq!(c.read_option_reply().1, REP_ERR_TOO_BIG);
    c.send_option(OPT_SET_META_CONTEXT, &vec![0xff; 2000]);
    assert_eq!(c.read_option_reply().1, REP_ERR_INVALID);
    c.go("vm", false, false);
    drop(hung);
    srv.assert_serving("vm", SIZE);
}

#[test]
fn option_flood_is_cut_off() {
    let (srv, _disk) = setup(NbdConfig {
        max_options: 32,
        ..small_cfg()
    });
    let mut c = RawClient::start(srv.port);
    let one: Vec<u8> = {
        let mut v = OptionHeader {
            option: 0x99,
            len: 0,
        }
        .encode()
        .to_vec();
        v.extend_from_slice(&[]);
        v
    };
    // Send far more options than allowed without reading a single reply.
    for _ in 0..10_000 {
        if c.try_send(&one).is_err() {
            break;
        }
    }
    assert!(c.closed_by_server());
    srv.assert_serving("vm", SIZE);
}

#[test]
fn oversized_and_truncated_requests() {
    let (srv, _disk) = setup(small_cfg());
    // A write announcing 4 GiB of payload, then the client vanishes.
    let mut c = RawClient::start(srv.port);
    c.go("vm", true, false);
    c.request(CMD_WRITE, 0, 1, 0, u32::MAX);
    c.send(&[0u8; 65536]);
    drop(c);
    srv.assert_serving("vm", SIZE);
    // A write that stops halfway through its payload.
    let mut c = RawClient::start(srv.port);
    c.go("vm", false, false);
    c.request(CMD_WRITE, 0, 1, 0, 512 * 1024);
    c.send(&[1u8; 100_000]);
    drop(c);
    // A header cut short.
    let mut c = RawClient::start(srv.port);
    c.go("vm", true, false);
    c.send(
        &RequestHeader {
            flags: 0,
            kind: CMD_READ,
            handle: 1,
            offset: 0,
            len: 512,
        }
        .encode()[..20],
    );
    drop(c);
    srv.assert_serving("vm", SIZE);
}

#[test]
fn client_closing_mid_reply() {
    let (srv, _disk) = setup(NbdConfig::default());
    for _ in 0..3 {
        let mut c = RawClient::start(srv.port);
        c.go("vm", true, false);
        c.request(CMD_READ, 0, 1, 0, SIZE as u32);
        c.request(CMD_READ, 0, 2, 0, SIZE as u32);
        let _ = c.read_exact(1000).unwrap();
        drop(c);
    }
    srv.assert_serving("vm", SIZE);
}

#[test]
fn client_that_never_reads_is_throttled() {
    let cfg = NbdConfig {
        max_inflight_requests: 16,
        max_inflight_bytes: 8 * MIB,
        ..small_cfg()
    };
    let (srv, _disk) = setup(cfg);
    let mut c = RawClient::start(srv.port);
    c.go("vm", true, false);
    c.s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let req = RequestHeader {
        flags: 0,
        kind: CMD_READ,
        handle: 0,
        offset: 0,
        len: MIB as u32,
    }
    .encode();
    let batch: Vec<u8> = (0..1000).flat_map(|_| req).collect();
    let limit = 4_000_000u64;
    let mut sent = 0u64;
    // Four million reads of 1 MiB would be 4 TB of replies: the server must stop reading long
    // before, and then the socket buffers fill and our write times out.
    while sent < limit {
        match c.s.write_all(&batch) {
            Ok(()) => sent += 1000,
            Err(_) => break,
        }
    }
    assert!(sent < limit, "the server kept reading");
    let stats = srv.stats.get();
    assert!(
        stats.requests < 1000,
        "{} requests executed for a client that reads nothing",
        stats.requests
    );
    // Another client is served meanwhile.
    srv.assert_serving("vm", SIZE);
    let mut other = RawClient::start(srv.port);
    other.go("vm", true, false);
    other.request(CMD_READ, 0, 5, 0, 4096);
    assert_eq!(other.read_reply(Some(4096)).unwrap().data, vec![0x42; 4096]);
    drop(c);
    srv.assert_serving("vm", SIZE);
}

#[test]
fn handshake_timeout_and_connection_cap() {
    let cfg = NbdConfig {
        max_connections: 3,
        handshake_timeout: Duration::from_millis(500),
        ..small_cfg()
    };
    let (srv, _disk) = setup(cfg);
    // A client that connects and says nothing is dropped after the timeout.
    let mut idle = RawClient::connect(srv.port);
    assert!(idle.closed_by_server());
    // Fill every slot with finished handshakes; the next connection is refused at once.
    let mut held: Vec<RawClient> = (0..3)
        .map(|_| {
            let mut c = RawClient::start(srv.port);
            c.go("vm", false, false);
            c
        })
        .collect();
    let mut extra = TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0u8; 18];
    let n = std::io::Read::read(&mut extra, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "connection over the cap was served");
    // Held connections keep working; freeing a slot lets a real client in.
    held[0].request(CMD_READ, 0, 1, 0, 512);
    assert_eq!(held[0].read_reply(Some(512)).unwrap().error, 0);
    held.pop();
    srv.assert_serving("vm", SIZE);
}

#[test]
fn shutdown_finishes_in_flight_requests() {
    let (srv, _disk) = setup(NbdConfig::default());
    let mut c = RawClient::start(srv.port);
    c.go("vm", true, false);
    for h in 0..8 {
        c.request(CMD_READ, 0, h, 0, MIB as u32);
    }
    // Wait until the server has taken all eight, then shut down while the replies are
    // still queued behind an unread socket.
    while srv.stats.get().requests < 8 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let handle = srv.shutdown_handle();
    handle.shutdown();
    let mut handles: Vec<u64> = (0..8)
        .map(|_| {
            let r = c.read_reply(Some(MIB as usize)).unwrap();
            assert_eq!((r.error, r.data.len()), (0, MIB as usize));
            r.handle
        })
        .collect();
    handles.sort();
    assert_eq!(handles, (0..8).collect::<Vec<_>>());
    assert!(c.closed_by_server());
    srv.stop().unwrap();
}
