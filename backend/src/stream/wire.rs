//! The send stream's encoding (docs/STREAM.md), free of the store: a header, records, and an
//! end record carrying the blake3 of every byte before its hash. Readers check every field
//! against the header before anything acts on it, so a damaged stream is refused rather than
//! written somewhere unexpected.

use std::io::{self, Read, Write};

pub const MAGIC: &[u8; 8] = b"PXSTREAM";
pub const VERSION: u32 = 1;
/// Largest data record.
pub const MAX_DATA: usize = 1 << 20;
const FLAG_INCREMENTAL: u32 = 1;
const REC_DATA: u8 = 1;
const REC_ZERO: u8 = 2;
const REC_END: u8 = 0xff;
/// Longest name the header may carry (a full `NAME@SNAP`).
const MAX_NAME: usize = 512;

/// What a stream is of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The snapshot's size in bytes.
    pub size: u64,
    pub guid: u64,
    /// Creation time, Unix nanoseconds.
    pub created_ns: u64,
    /// The snapshot's full name where it was sent from.
    pub name: String,
    /// For an incremental stream: the snapshot it applies to.
    pub base: Option<Base>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    pub guid: u64,
    pub name: String,
}

/// One record after the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Bytes at `offset`.
    Data { offset: u64, data: Vec<u8> },
    /// `len` bytes at `offset` read as zeros (incremental streams).
    Zero { offset: u64, len: u64 },
    /// The end; the stream was whole.
    End { records: u64, data_bytes: u64 },
}

/// Why a stream cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("not a Parallax send stream (it does not start with PXSTREAM)")]
    NotAStream,
    #[error("send stream version {0} is not supported (this parallax reads version {VERSION})")]
    Version(u32),
    #[error("the stream is truncated: it ends before its end record")]
    Truncated,
    #[error("the stream is damaged: {0}")]
    Damaged(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Writes a stream, hashing everything it writes.
pub struct StreamWriter<W: Write> {
    out: W,
    hash: blake3::Hasher,
    records: u64,
    data_bytes: u64,
    /// Bytes written so far.
    len: u64,
}

impl<W: Write> StreamWriter<W> {
    pub fn new(out: W, h: &Header) -> io::Result<StreamWriter<W>> {
        let mut w = StreamWriter {
            out,
            hash: blake3::Hasher::new(),
            records: 0,
            data_bytes: 0,
            len: 0,
        };
        let mut b = Vec::with_capacity(64 + h.name.len());
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        let flags = if h.base.is_some() {
            FLAG_INCREMENTAL
        } else {
            0
        };
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&h.size.to_le_bytes());
        b.extend_from_slice(&h.guid.to_le_bytes());
        b.extend_from_slice(&h.created_ns.to_le_bytes());
        b.extend_from_slice(&h.base.as_ref().map_or(0, |b| b.guid).to_le_bytes());
        for s in [
            &h.name,
            &h.base.as_ref().map_or(String::new(), |b| b.name.clone()),
        ] {
            b.extend_from_slice(&(s.len() as u16).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        }
        w.put(&b)?;
        Ok(w)
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.hash.update(b);
        self.len += b.len() as u64;
        self.out.write_all(b)
    }

    pub fn data(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        debug_assert!(!data.is_empty() && data.len() <= MAX_DATA);
        let mut h = [0u8; 13];
        h[0] = REC_DATA;
        h[1..9].copy_from_slice(&offset.to_le_bytes());
        h[9..13].copy_from_slice(&(data.len() as u32).to_le_bytes());
        self.put(&h)?;
        self.put(data)?;
        self.records += 1;
        self.data_bytes += data.len() as u64;
        Ok(())
    }

    pub fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let mut h = [0u8; 17];
        h[0] = REC_ZERO;
        h[1..9].copy_from_slice(&offset.to_le_bytes());
        h[9..17].copy_from_slice(&len.to_le_bytes());
        self.put(&h)?;
        self.records += 1;
        Ok(())
    }

    /// Writes the end record and flushes; returns the stream's length in bytes.
    pub fn finish(mut self) -> io::Result<u64> {
        let mut h = [0u8; 17];
        h[0] = REC_END;
        h[1..9].copy_from_slice(&self.records.to_le_bytes());
        h[9..17].copy_from_slice(&self.data_bytes.to_le_bytes());
        self.put(&h)?;
        let digest = *self.hash.finalize().as_bytes();
        self.out.write_all(&digest)?;
        self.out.flush()?;
        Ok(self.len + digest.len() as u64)
    }
}

/// Reads a stream, checking each record against the header and the whole against its hash.
pub struct StreamReader<R: Read> {
    input: R,
    hash: blake3::Hasher,
    header: Header,
    records: u64,
    data_bytes: u64,
    done: bool,
}

impl<R: Read> StreamReader<R> {
    pub fn new(mut input: R) -> Result<StreamReader<R>, StreamError> {
        let mut hash = blake3::Hasher::new();
        let mut fixed = [0u8; 48];
        read_exact(&mut input, &mut fixed).map_err(|e| match e {
            // Anything shorter than a header is not a stream.
            StreamError::Truncated => StreamError::NotAStream,
            e => e,
        })?;
        if &fixed[..8] != MAGIC {
            return Err(StreamError::NotAStream);
        }
        let version = u32::from_le_bytes(fixed[8..12].try_into().expect("4"));
        if version != VERSION {
            return Err(StreamError::Version(version));
        }
        hash.update(&fixed);
        let u64_at = |at: usize| u64::from_le_bytes(fixed[at..at + 8].try_into().expect("8"));
        let flags = u32::from_le_bytes(fixed[12..16].try_into().expect("4"));
        if flags & !FLAG_INCREMENTAL != 0 {
            return Err(StreamError::Damaged(format!(
                "unknown header flags {flags:#x}"
            )));
        }
        let mut string = |input: &mut R| -> Result<String, StreamError> {
            let mut n = [0u8; 2];
            read_exact(input, &mut n)?;
            hash.update(&n);
            let n = u16::from_le_bytes(n) as usize;
            if n > MAX_NAME {
                return Err(StreamError::Damaged(format!(
                    "a {n}-byte name in the header"
                )));
            }
            let mut s = vec![0u8; n];
            read_exact(input, &mut s)?;
            hash.update(&s);
            String::from_utf8(s)
                .map_err(|_| StreamError::Damaged("a name in the header is not UTF-8".into()))
        };
        let name = string(&mut input)?;
        let base_name = string(&mut input)?;
        let base_guid = u64_at(40);
        let incremental = flags & FLAG_INCREMENTAL != 0;
        if incremental != (base_guid != 0) || (!incremental && !base_name.is_empty()) {
            return Err(StreamError::Damaged(
                "header flags and base disagree".into(),
            ));
        }
        let header = Header {
            size: u64_at(16),
            guid: u64_at(24),
            created_ns: u64_at(32),
            name,
            base: incremental.then_some(Base {
                guid: base_guid,
                name: base_name,
            }),
        };
        Ok(StreamReader {
            input,
            hash,
            header,
            records: 0,
            data_bytes: 0,
            done: false,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    fn take(&mut self, buf: &mut [u8]) -> Result<(), StreamError> {
        read_exact(&mut self.input, buf)?;
        self.hash.update(buf);
        Ok(())
    }

    fn in_bounds(&self, offset: u64, len: u64) -> Result<(), StreamError> {
        if len == 0 || offset.checked_add(len).is_none_or(|e| e > self.header.size) {
            return Err(StreamError::Damaged(format!(
                "a record for bytes {offset}+{len} of a {}-byte snapshot",
                self.header.size
            )));
        }
        Ok(())
    }

    /// The next record; after [`Record::End`] the stream has been checked whole (and nothing
    /// follows it).
    pub fn next_record(&mut self, buf: &mut Vec<u8>) -> Result<Record, StreamError> {
        let mut kind = [0u8; 1];
        self.take(&mut kind)?;
        match kind[0] {
            REC_DATA => {
                let mut h = [0u8; 12];
                self.take(&mut h)?;
                let offset = u64::from_le_bytes(h[..8].try_into().expect("8"));
                let len = u32::from_le_bytes(h[8..].try_into().expect("4")) as usize;
                if len > MAX_DATA {
                    return Err(StreamError::Damaged(format!("a {len}-byte data record")));
                }
                self.in_bounds(offset, len as u64)?;
                buf.resize(len, 0);
                let mut data = std::mem::take(buf);
                self.take(&mut data)?;
                self.records += 1;
                self.data_bytes += len as u64;
                Ok(Record::Data { offset, data })
            }
            REC_ZERO => {
                if self.header.base.is_none() {
                    return Err(StreamError::Damaged(
                        "a zero record in a full stream".into(),
                    ));
                }
                let mut h = [0u8; 16];
                self.take(&mut h)?;
                let offset = u64::from_le_bytes(h[..8].try_into().expect("8"));
                let len = u64::from_le_bytes(h[8..].try_into().expect("8"));
                self.in_bounds(offset, len)?;
                self.records += 1;
                Ok(Record::Zero { offset, len })
            }
            REC_END => {
                let mut h = [0u8; 16];
                self.take(&mut h)?;
                let records = u64::from_le_bytes(h[..8].try_into().expect("8"));
                let data_bytes = u64::from_le_bytes(h[8..].try_into().expect("8"));
                let want = *self.hash.finalize().as_bytes();
                let mut got = [0u8; 32];
                read_exact(&mut self.input, &mut got)?;
                if got != want {
                    return Err(StreamError::Damaged("its checksum does not match".into()));
                }
                if (records, data_bytes) != (self.records, self.data_bytes) {
                    return Err(StreamError::Damaged(format!(
                        "it ends after {} records and {} data bytes but says {records} and \
                         {data_bytes}",
                        self.records, self.data_bytes
                    )));
                }
                let mut more = [0u8; 1];
                match self.input.read(&mut more) {
                    Ok(0) => {}
                    Ok(_) => {
                        return Err(StreamError::Damaged("bytes follow its end record".into()))
                    }
                    Err(e) => return Err(e.into()),
                }
                self.done = true;
                Ok(Record::End {
                    records,
                    data_bytes,
                })
            }
            k => Err(StreamError::Damaged(format!(
                "a record of unknown type {k}"
            ))),
        }
    }
}

/// `read_exact`, with an early end reported as [`StreamError::Truncated`].
fn read_exact(r: &mut impl Read, buf: &mut [u8]) -> Result<(), StreamError> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => return Err(StreamError::Truncated),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(incremental: bool) -> (Header, Vec<u8>) {
        let h = Header {
            size: 1 << 20,
            guid: 77,
            created_ns: 123,
            name: "vm@b".into(),
            base: incremental.then(|| Base {
                guid: 55,
                name: "vm@a".into(),
            }),
        };
        let mut out = Vec::new();
        let mut w = StreamWriter::new(&mut out, &h).unwrap();
        w.data(4096, &[7u8; 8192]).unwrap();
        if incremental {
            w.zero(65536, 4096).unwrap();
        }
        w.data(0, &[1u8; 512]).unwrap();
        w.finish().unwrap();
        (h, out)
    }

    fn read_all(b: &[u8]) -> Result<(Header, Vec<Record>), StreamError> {
        let mut r = StreamReader::new(b)?;
        let mut out = Vec::new();
        let mut buf = Vec::new();
        loop {
            let rec = r.next_record(&mut buf)?;
            let end = matches!(rec, Record::End { .. });
            out.push(rec);
            if end {
                return Ok((r.header().clone(), out));
            }
        }
    }

    #[test]
    fn round_trip() {
        for inc in [false, true] {
            let (h, b) = sample(inc);
            let (got, recs) = read_all(&b).unwrap();
            assert_eq!(got, h);
            assert_eq!(recs.len(), if inc { 4 } else { 3 });
            assert_eq!(
                recs[0],
                Record::Data {
                    offset: 4096,
                    data: vec![7u8; 8192]
                }
            );
        }
    }

    /// Every truncation and every single flipped bit is refused.
    #[test]
    fn damage_is_refused() {
        for inc in [false, true] {
            let (_, b) = sample(inc);
            for cut in 0..b.len() {
                assert!(read_all(&b[..cut]).is_err(), "cut at {cut}");
            }
            for at in 0..b.len() {
                for bit in [0, 3, 7] {
                    let mut d = b.clone();
                    d[at] ^= 1 << bit;
                    assert!(read_all(&d).is_err(), "bit {bit} of byte {at}");
                }
            }
            let mut longer = b.clone();
            longer.push(0);
            assert!(read_all(&longer).is_err());
        }
    }

    #[test]
    fn foreign_input_is_named() {
        assert!(matches!(
            StreamReader::new(&b"\x7fELF and more bytes than a header has, surely......"[..]),
            Err(StreamError::NotAStream)
        ));
        assert!(matches!(
            StreamReader::new(&b"short"[..]),
            Err(StreamError::NotAStream)
        ));
        let (_, mut b) = sample(false);
        b[8] = 9;
        assert!(matches!(
            StreamReader::new(&b[..]),
            Err(StreamError::Version(9))
        ));
    }
}
