//! `vdi send` and `vdi recv`: a snapshot as a self-describing, checksummed stream (full, or
//! incremental from an older snapshot of the same history), and a new VDI made from one.
//! The encoding is [`wire`] (docs/STREAM.md); this module moves blocks between it and a store.
//!
//! A receive writes under a staging name ([`Store::create_staged`]) and gives the VDI its
//! name only after the end record's checksum matched and everything is durable, so a damaged,
//! truncated or interrupted stream leaves nothing behind.

pub mod wire;

use std::{
    io::{Read, Write},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use crate::{
    disk::ExtentState,
    store::{split_name, Staged, Store, StoreError, StoreResult},
    transfer::Progress,
};
use wire::{Base, Header, Record, StreamError, StreamReader, StreamWriter, MAX_DATA};

/// What `vdi send` wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendReport {
    pub snapshot: String,
    pub from: Option<String>,
    /// Bytes of the stream.
    pub stream_bytes: u64,
    /// Data bytes in it.
    pub data_bytes: u64,
}

/// What `vdi recv` made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecvReport {
    /// The new VDI; its snapshot `snapshot` holds exactly what was sent.
    pub name: String,
    pub snapshot: String,
    /// The snapshot as it was called where it was sent from.
    pub sent: String,
    pub size: u64,
    /// The snapshot it was applied to (incremental streams).
    pub base: Option<String>,
    pub data_bytes: u64,
}

impl From<StreamError> for StoreError {
    fn from(e: StreamError) -> StoreError {
        match e {
            StreamError::Io(e) => StoreError::Io(e),
            e => StoreError::Invalid(e.to_string()),
        }
    }
}

fn write_err(e: std::io::Error) -> StoreError {
    StoreError::Io(e)
}

/// Writes snapshot `name` (`NAME@SNAP`) to `out`: every block it holds, or with `from` (an
/// older snapshot of the same VDI) only the blocks that differ from it.
pub fn send(
    store: &Arc<Store>,
    name: &str,
    from: Option<&str>,
    out: &mut dyn Write,
    progress: Progress,
) -> StoreResult<SendReport> {
    if let Some(uri) = store.stat(name)?.backing {
        // The stream carries what the map holds; holes here are the remote's data.
        return Err(StoreError::Invalid(format!(
            "{name} reads through {uri}, which a stream cannot carry: fork it, `vdi hydrate`              the fork, snapshot and send that"
        )));
    }
    let id = store.snapshot_identity(name)?;
    let base = match from {
        Some(b) => {
            let (bv, _) = split_name(b)?;
            let (sv, _) = split_name(name)?;
            let bguid = store.snapshot_identity(b)?.guid;
            if bv != sv {
                return Err(StoreError::Invalid(format!(
                    "--from {b} is not a snapshot of {sv}; an incremental stream goes from an \
                     older snapshot of the same VDI"
                )));
            }
            Some(Base {
                guid: bguid,
                name: b.to_string(),
            })
        }
        None => None,
    };
    let disk = store.open_vdi(name, false)?;
    let header = Header {
        size: disk.size(),
        guid: id.guid,
        created_ns: id.created_ns,
        name: name.to_string(),
        base,
    };
    let mut w = StreamWriter::new(out, &header).map_err(write_err)?;
    let size = header.size;
    let mut buf = vec![0u8; MAX_DATA];
    let mut data_bytes = 0u64;
    let mut emit = |w: &mut StreamWriter<&mut dyn Write>, at: u64, end: u64| -> StoreResult<()> {
        let mut at = at;
        while at < end {
            let n = (end - at).min(MAX_DATA as u64) as usize;
            disk.read(&mut buf[..n], at)?;
            w.data(at, &buf[..n]).map_err(write_err)?;
            data_bytes += n as u64;
            at += n as u64;
        }
        Ok(())
    };
    progress(0, size)?;
    match from {
        None => {
            let mut pos = 0u64;
            while pos < size {
                for e in disk.extents(pos, (size - pos).min(1 << 30), 1024)? {
                    if e.state == ExtentState::Data {
                        emit(&mut w, pos, pos + e.len)?;
                    }
                    pos += e.len;
                    progress(pos, size)?;
                }
            }
        }
        Some(b) => {
            if store.stat(b)?.size > size {
                return Err(StoreError::Invalid(format!(
                    "{b} is larger than {name}: an incremental stream only grows a VDI"
                )));
            }
            let diff = store.diff(b, name)?;
            for e in &diff.extents {
                if e.zero {
                    w.zero(e.offset, e.length).map_err(write_err)?;
                } else {
                    emit(&mut w, e.offset, e.offset + e.length)?;
                }
                progress(e.offset + e.length, size)?;
            }
        }
    }
    let stream_bytes = w.finish().map_err(write_err)?;
    progress(size, size)?;
    Ok(SendReport {
        snapshot: name.to_string(),
        from: from.map(str::to_string),
        stream_bytes,
        data_bytes,
    })
}

/// Makes VDI `name` from the stream in `input`: a new VDI (full stream) or a fork of the
/// stream's base, which must be here (incremental), with the sent snapshot on it under its
/// own name and identity.
pub fn recv(
    store: &Arc<Store>,
    name: &str,
    input: &mut dyn Read,
    progress: Progress,
) -> StoreResult<RecvReport> {
    receive(store, name, input, progress, None, &mut |staged| {
        staged.publish()
    })
}

/// [`recv`], for a migration: an incremental stream's base is looked for under `base_vdi`
/// (the name this store gave the VDI it received before, which may be hidden) and the VDI is
/// given its name by `publish`, which may refuse.
pub fn receive(
    store: &Arc<Store>,
    name: &str,
    input: &mut dyn Read,
    progress: Progress,
    base_vdi: Option<&str>,
    publish: &mut dyn FnMut(Staged<'_>) -> StoreResult<()>,
) -> StoreResult<RecvReport> {
    let version = store.format_version();
    if version < 3 {
        return Err(StoreError::Invalid(format!(
            "receiving needs store format 3 (this store is format {version}); run \
             `parallax upgrade` first (older Parallax versions cannot open it after that)"
        )));
    }
    let mut r = StreamReader::new(input)?;
    let h = r.header().clone();
    let snap = match split_name(&h.name)? {
        (_, Some(s)) => s.to_string(),
        _ => {
            return Err(StoreError::Invalid(format!(
                "the stream names {:?}, not a snapshot",
                h.name
            )))
        }
    };
    let (staged, base) = match &h.base {
        None => (store.create_staged(name, h.size)?, None),
        Some(b) => {
            let hint = match (base_vdi, split_name(&b.name)?) {
                (Some(v), (_, Some(snap))) => format!("{v}@{snap}"),
                _ => b.name.clone(),
            };
            let Some(found) = store.find_snapshot(b.guid, &hint)? else {
                return Err(StoreError::NotFound(format!(
                    "{} (the base of this incremental stream; receive it first, or send a full \
                     stream)",
                    b.name
                )));
            };
            let base_size = store.stat(&found)?.size;
            if base_size > h.size {
                return Err(StoreError::Invalid(format!(
                    "the stream's snapshot is smaller than its base {found}"
                )));
            }
            let staged = store.create_staged_fork(name, &found)?;
            if base_size < h.size {
                store.resize(staged.staging_name(), h.size)?;
            }
            (staged, Some(found))
        }
    };
    let disk = store.open_vdi(staged.staging_name(), true)?;
    let mut buf = Vec::with_capacity(MAX_DATA);
    progress(0, h.size)?;
    let data_bytes = loop {
        match r.next_record(&mut buf)? {
            Record::Data { offset, data } => {
                disk.write(&data, offset, false)?;
                progress(offset + data.len() as u64, h.size)?;
                buf = data;
            }
            Record::Zero { offset, len } => {
                disk.write_zeroes(offset, len, false, false)?;
                progress(offset + len, h.size)?;
            }
            Record::End { data_bytes, .. } => break data_bytes,
        }
    };
    drop(disk);
    staged.snapshot(&snap, h.created_ns, h.guid)?;
    // The last word before the name appears: a daemon's client that went away stops it.
    progress(h.size, h.size)?;
    publish(staged)?;
    Ok(RecvReport {
        name: name.to_string(),
        snapshot: format!("{name}@{snap}"),
        sent: h.name.clone(),
        size: h.size,
        base,
        data_bytes,
    })
}

#[cfg(test)]
mod tests;
