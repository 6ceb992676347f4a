//! Moving raw images into and out of VDIs (`vdi import`, `vdi export`), used both by the CLI
//! on a store it opened itself and by the daemon on behalf of the CLI.
//!
//! Import walks only the data regions of a sparse source (SEEK_DATA/SEEK_HOLE, or an NBD
//! server's `base:allocation`) and the store drops all-zero blocks, so holes and zeros stay
//! unallocated. Export writes only data extents
//! into a file it sized first, so the output is sparse too.

use std::{
    fs::File,
    io::{self, Write},
    os::{
        fd::AsRawFd,
        unix::fs::{FileExt, FileTypeExt},
    },
    sync::Arc,
    time::Duration,
};

use crate::{
    disk::ExtentState,
    nbd::{client::NbdClient, uri::NbdUri},
    store::{Store, StoreError, StoreResult},
};

/// How long a remote NBD server may take to answer before an import gives up.
const REMOTE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes asked about in one NBD_CMD_BLOCK_STATUS.
const STATUS_WINDOW: u64 = 1 << 30;

/// Bytes moved per read/write call.
const CHUNK: u64 = 4 << 20;

/// Told the bytes a transfer has moved and has to move (for progress bars); an error from it
/// stops the transfer (the daemon's client went away), which then leaves nothing behind.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64) -> StoreResult<()>;

/// Size of a regular file or block device.
pub fn file_size(f: &File) -> io::Result<u64> {
    let meta = f.metadata()?;
    if meta.file_type().is_block_device() {
        use std::io::Seek;
        let mut f = f;
        return f.seek(io::SeekFrom::End(0));
    }
    Ok(meta.len())
}

/// The next data region at or after `pos` in `f`: `Some((start, end))`, or `None` past the
/// last. Falls back to "everything is data" where SEEK_DATA is not supported.
fn next_data(f: &File, pos: u64, size: u64) -> Option<(u64, u64)> {
    if pos >= size {
        return None;
    }
    let fd = f.as_raw_fd();
    // SAFETY: lseek on a descriptor we own; it only moves the file offset, which we do not
    // rely on (all I/O here is positional).
    let start = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
    if start < 0 {
        return match io::Error::last_os_error().raw_os_error() {
            Some(libc::ENXIO) => None,
            _ => Some((pos, size)),
        };
    }
    // SAFETY: as above.
    let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
    let end = if end < 0 {
        size
    } else {
        (end as u64).min(size)
    };
    Some((start as u64, end))
}

/// A source image format that is not raw, recognised by its magic.
pub fn foreign_format(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(b"QFI\xfb") {
        Some("qcow2")
    } else if head.starts_with(b"KDMV") {
        Some("vmdk")
    } else if head.starts_with(b"conectix") {
        Some("vhd")
    } else if head.starts_with(b"vhdxfile") {
        Some("vhdx")
    } else if head.len() >= 72 && &head[64..72] == b"<<< Orac" {
        Some("vdi")
    } else if head.starts_with(b"PARALLAX") {
        Some("parallax store")
    } else {
        None
    }
}

/// The size of a VDI imported from a source of `len` bytes: `size` if given (never smaller
/// than the source), else `len` rounded up to 512 bytes.
fn vdi_size_for(size: Option<u64>, len: u64, what: &str) -> StoreResult<u64> {
    match size {
        Some(s) if s < len => Err(StoreError::Invalid(format!(
            "--size {s} is smaller than the {what} ({len} bytes)"
        ))),
        Some(s) => Ok(s),
        None => Ok(len.div_ceil(512).max(1) * 512),
    }
}

/// Creates VDI `name` from the raw image in `src` and fills it. `size` (default: the image's,
/// rounded up to 512 bytes) may be larger than the image. A pipe is read front to back and
/// needs `size`. On failure the half-made VDI is deleted. Returns the VDI's size.
pub fn import(
    store: &Arc<Store>,
    name: &str,
    src: &File,
    size: Option<u64>,
    progress: Progress,
) -> StoreResult<u64> {
    let ft = src.metadata()?.file_type();
    if ft.is_dir() {
        return Err(StoreError::Invalid(
            "the source is a directory, not a raw disk image".into(),
        ));
    }
    if ft.is_char_device() && size.is_none() {
        return Err(StoreError::Invalid(
            "the source is a character device (like /dev/null), not a raw disk image; \
             give --size to read it as a stream"
                .into(),
        ));
    }
    let seekable = ft.is_file() || ft.is_block_device();
    let src_size = if seekable {
        Some(file_size(src)?)
    } else {
        None
    };
    let vdi_size = match src_size {
        Some(n) => vdi_size_for(size, n, "image")?,
        None => size.ok_or_else(|| {
            StoreError::Invalid(
                "importing from a pipe needs --size (the image's size cannot be known up front)"
                    .into(),
            )
        })?,
    };
    let Some(total) = src_size else {
        let mut reader = src;
        return import_stream(store, name, &mut reader, vdi_size, progress);
    };
    let mut buf = vec![0u8; CHUNK as usize];
    // Look at the first bytes before creating anything.
    let head_len = read_full_at(src, &mut buf[..512], 0)?;
    refuse_foreign(&buf[..head_len])?;
    // Under a staging name until complete: an interrupt or a crash leaves no VDI that looks
    // whole and is not.
    let staged = store.create_staged(name, vdi_size)?;
    {
        let disk = store.open_vdi(staged.staging_name(), true)?;
        progress(0, total)?;
        let mut pos = 0u64;
        while let Some((start, end)) = next_data(src, pos, total) {
            let mut at = start;
            while at < end {
                let n = (end - at).min(CHUNK) as usize;
                let got = read_full_at(src, &mut buf[..n], at)?;
                if got == 0 {
                    break;
                }
                disk.write(&buf[..got], at, false)?;
                at += got as u64;
                progress(at, total)?;
            }
            pos = end.max(pos + 1);
        }
        progress(total, total)?;
        // The last word before the name appears: a daemon's client that went away stops it.
        progress(vdi_size, vdi_size)?;
    }
    staged.publish()?;
    Ok(vdi_size)
}

fn refuse_foreign(head: &[u8]) -> StoreResult<()> {
    match foreign_format(&head[..head.len().min(512)]) {
        Some(fmt) => Err(StoreError::Invalid(format!(
            "the image is {fmt}, not raw; convert it first: qemu-img convert -O raw IMAGE IMAGE.raw"
        ))),
        None => Ok(()),
    }
}

/// Creates VDI `name` of `vdi_size` bytes from a raw image read from `src` to its end (a
/// pipe, or another host's `vdi import` over the network control listener). All-zero blocks
/// stay unallocated. On failure nothing is left behind.
pub fn import_stream(
    store: &Arc<Store>,
    name: &str,
    src: &mut dyn io::Read,
    vdi_size: u64,
    progress: Progress,
) -> StoreResult<u64> {
    let mut buf = vec![0u8; CHUNK as usize];
    // Look at the first bytes before creating anything.
    let mut got = read_stream(src, &mut buf)?;
    refuse_foreign(&buf[..got])?;
    let staged = store.create_staged(name, vdi_size)?;
    {
        let disk = store.open_vdi(staged.staging_name(), true)?;
        // The chunk read to sniff the format is the first chunk of data.
        let mut at = 0u64;
        while got > 0 {
            if at + got as u64 > vdi_size {
                return Err(StoreError::Invalid(format!(
                    "the image is larger than --size {vdi_size}"
                )));
            }
            disk.write(&buf[..got], at, false)?;
            at += got as u64;
            progress(at, vdi_size)?;
            got = read_stream(src, &mut buf)?;
        }
        // The last word before the name appears: a daemon's client that went away stops it.
        progress(vdi_size, vdi_size)?;
    }
    staged.publish()?;
    Ok(vdi_size)
}

/// Creates VDI `name` from the NBD export `source` (a URI: another Parallax host, qemu-nbd,
/// nbdkit, nbd-server; `nbds://` for TLS), reading only what the server's `base:allocation`
/// says may hold data. `size` (default: the export's, rounded up to 512 bytes) may be larger.
/// On failure the half-made VDI is deleted. Returns the VDI's size.
pub fn import_nbd(
    store: &Arc<Store>,
    name: &str,
    source: &str,
    size: Option<u64>,
    progress: Progress,
) -> StoreResult<u64> {
    let uri = NbdUri::parse(source).map_err(StoreError::Invalid)?;
    let remote = |e: io::Error| StoreError::Io(io::Error::new(e.kind(), format!("{source}: {e}")));
    let mut client = NbdClient::connect(&uri, REMOTE_TIMEOUT).map_err(remote)?;
    let total = client.size();
    let vdi_size = vdi_size_for(size, total, "export")?;
    let staged = store.create_staged(name, vdi_size)?;
    {
        let disk = store.open_vdi(staged.staging_name(), true)?;
        let mut buf = vec![0u8; CHUNK as usize];
        progress(0, total)?;
        let mut pos = 0u64;
        while pos < total {
            let window = (total - pos).min(STATUS_WINDOW) as u32;
            for extent in client.extents(pos, window).map_err(remote)? {
                let end = (pos + extent.len).min(total);
                let mut at = pos;
                while !extent.zero && at < end {
                    let n = (end - at).min(CHUNK) as usize;
                    client.read(&mut buf[..n], at).map_err(remote)?;
                    disk.write(&buf[..n], at, false)?;
                    at += n as u64;
                    progress(at, total)?;
                }
                pos = end;
                progress(pos, total)?;
                if pos >= total {
                    break;
                }
            }
        }
        progress(vdi_size, vdi_size)?;
    }
    staged.publish()?;
    Ok(vdi_size)
}

/// Reads from a stream until `buf` is full or the stream ends; returns the bytes read.
fn read_stream(f: &mut dyn io::Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn read_full_at(f: &File, buf: &mut [u8], mut off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                off += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Where an export goes.
pub enum Sink<'a> {
    /// A regular file or block device, written at offsets; holes are skipped in a regular
    /// file (which is truncated to the VDI's size first) and zeroed on a block device.
    File(&'a File),
    /// A pipe or terminal: every byte, in order.
    Stream(&'a mut dyn Write),
}

/// Writes VDI or snapshot `name` to `sink`. Returns bytes of data written (excluding holes).
pub fn export(store: &Arc<Store>, name: &str, sink: Sink, progress: Progress) -> StoreResult<u64> {
    let disk = store.open_vdi(name, false)?;
    let size = disk.size();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut written = 0u64;
    progress(0, size)?;
    match sink {
        Sink::File(f) => {
            let blockdev = f.metadata()?.file_type().is_block_device();
            if blockdev {
                if file_size(f)? < size {
                    return Err(StoreError::Invalid(format!(
                        "the device is smaller than {name} ({size} bytes)"
                    )));
                }
            } else {
                f.set_len(0)?;
                f.set_len(size)?;
            }
            let mut pos = 0u64;
            while pos < size {
                let ext = disk.extents(pos, (size - pos).min(1 << 30), 1024)?;
                for e in ext {
                    let mut at = pos;
                    let end = pos + e.len;
                    while at < end {
                        let n = (end - at).min(CHUNK) as usize;
                        if e.state == ExtentState::Data {
                            disk.read(&mut buf[..n], at)?;
                            if !crate::store::format::is_zero(&buf[..n]) || blockdev {
                                f.write_all_at(&buf[..n], at)?;
                                written += n as u64;
                            }
                        } else if blockdev {
                            buf[..n].fill(0);
                            f.write_all_at(&buf[..n], at)?;
                        }
                        at += n as u64;
                        progress(at, size)?;
                    }
                    pos = end;
                }
            }
            f.sync_data()?;
        }
        Sink::Stream(w) => {
            let mut pos = 0u64;
            while pos < size {
                let n = (size - pos).min(CHUNK) as usize;
                disk.read(&mut buf[..n], pos)?;
                w.write_all(&buf[..n])?;
                written += n as u64;
                pos += n as u64;
                progress(pos, size)?;
            }
            w.flush()?;
        }
    }
    Ok(written)
}
