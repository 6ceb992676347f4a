//! The fuzz harnesses, apart from libFuzzer: each takes the fuzzer's bytes and panics only on a
//! bug. The fuzz targets (`fuzz_targets/`) call them, and so does the workspace's
//! `tests/fuzz_regressions.rs`, which replays the seed corpora and every input that once found
//! a bug (`fuzz/regressions/<target>/`) in the ordinary test suite.

mod blkif_ring;
mod store_metadata;

pub use blkif_ring::blkif_ring;
pub use store_metadata::store_metadata;

/// The NBD handshake (fixed newstyle) and option parser over arbitrary client bytes.
pub fn nbd_handshake(data: &[u8]) {
    parallax::nbd::handshake::fuzz_handshake(data);
}

/// The NBD client against a server sending arbitrary bytes (handshake, block status, read).
pub fn nbd_client(data: &[u8]) {
    parallax::nbd::client::fuzz_client(data);
}

/// Transmission-phase request headers (28 bytes each) through the server's request checks.
pub fn nbd_requests(data: &[u8]) {
    parallax::nbd::transmission::fuzz_requests(data);
}

/// The RON configuration loader (`parallax serve --config`): any text is a configuration or
/// an error, and what parses prints and reads back the same.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = parallax::daemon::config::Config::parse(text) {
        let again = parallax::daemon::config::Config::parse(&cfg.to_ron())
            .expect("a printed configuration parses");
        assert_eq!(again, cfg, "a printed configuration reads back the same");
    }
}

/// The send stream reader (`vdi recv`): any bytes are a whole stream or an error, never a
/// panic; a stream read to its end, checksum and all, encodes back to the same bytes.
pub fn send_stream(data: &[u8]) {
    use parallax::stream::wire::{Record, StreamReader, StreamWriter};
    let Ok(mut r) = StreamReader::new(data) else {
        return;
    };
    let header = r.header().clone();
    let mut records = Vec::new();
    let mut buf = Vec::new();
    loop {
        match r.next_record(&mut buf) {
            Ok(Record::End { .. }) => break,
            Ok(rec) => records.push(rec),
            Err(_) => return,
        }
    }
    let mut out = Vec::new();
    let mut w = StreamWriter::new(&mut out, &header).expect("write to memory");
    for rec in records {
        match rec {
            Record::Data { offset, data } => w.data(offset, &data),
            Record::Zero { offset, len } => w.zero(offset, len),
            Record::End { .. } => unreachable!("the loop stops at the end"),
        }
        .expect("write to memory");
    }
    w.finish().expect("write to memory");
    assert_eq!(out, data, "a stream that reads whole encodes back the same");
}

/// A harness: the fuzzer's bytes in, a panic only on a bug.
pub type Harness = fn(&[u8]);

/// Every harness by target name (for replaying inputs).
pub const TARGETS: [(&str, Harness); 7] = [
    ("nbd_handshake", nbd_handshake),
    ("nbd_client", nbd_client),
    ("nbd_requests", nbd_requests),
    ("blkif_ring", blkif_ring),
    ("store_metadata", store_metadata),
    ("config", config),
    ("send_stream", send_stream),
];
