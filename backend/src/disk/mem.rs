//! In-memory disks and a catalogue of them, for protocol tests and frontend-shim (with
//! `cfg(test)` or the `test-utils` feature).

use std::{collections::HashMap, sync::Arc};

use parking_lot::Mutex;

use super::{
    check_range, Disk, DiskError, DiskProvider, ExportInfo, Extent, ExtentState, OpenError,
};

const MEM_BLOCK: u64 = 4096;

#[derive(Clone)]
enum MemBlock {
    Data(Box<[u8; MEM_BLOCK as usize]>),
    Zero,
}

/// A sparse in-memory [`Disk`] for protocol tests: 4 KiB blocks in a hash map, holes where
/// nothing was written. Flush does nothing (there is nothing to make durable).
pub struct MemDisk {
    size: u64,
    read_only: bool,
    blocks: Mutex<HashMap<u64, MemBlock>>,
}

impl MemDisk {
    pub fn new(size: u64) -> Self {
        MemDisk {
            size,
            read_only: false,
            blocks: Mutex::new(HashMap::new()),
        }
    }

    /// A read-only view holding a copy of this disk's current contents.
    pub fn snapshot(&self) -> Self {
        MemDisk {
            size: self.size,
            read_only: true,
            blocks: Mutex::new(self.blocks.lock().clone()),
        }
    }

    fn zero_range(&self, offset: u64, len: u64, no_hole: bool) {
        let mut blocks = self.blocks.lock();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let blk = pos / MEM_BLOCK;
            let in_blk = pos % MEM_BLOCK;
            let n = (MEM_BLOCK - in_blk).min(end - pos);
            if n == MEM_BLOCK {
                if no_hole {
                    blocks.insert(blk, MemBlock::Zero);
                } else {
                    blocks.remove(&blk);
                }
            } else if let Some(MemBlock::Data(b)) = blocks.get_mut(&blk) {
                b[in_blk as usize..(in_blk + n) as usize].fill(0);
            }
            pos += n;
        }
    }
}

impl Disk for MemDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_nowait(&self, buf: &mut [u8], offset: u64) -> Option<Result<(), DiskError>> {
        Some(self.read_at(buf, offset))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(self.size, offset, buf.len() as u64)?;
        let blocks = self.blocks.lock();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_blk = (pos % MEM_BLOCK) as usize;
            let n = (MEM_BLOCK as usize - in_blk).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match blocks.get(&(pos / MEM_BLOCK)) {
                Some(MemBlock::Data(b)) => out.copy_from_slice(&b[in_blk..in_blk + n]),
                _ => out.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(self.size, offset, buf.len() as u64)?;
        let mut blocks = self.blocks.lock();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_blk = (pos % MEM_BLOCK) as usize;
            let n = (MEM_BLOCK as usize - in_blk).min(buf.len() - done);
            let entry = blocks
                .entry(pos / MEM_BLOCK)
                .or_insert_with(|| MemBlock::Data(Box::new([0; MEM_BLOCK as usize])));
            if let MemBlock::Zero = entry {
                *entry = MemBlock::Data(Box::new([0; MEM_BLOCK as usize]));
            }
            if let MemBlock::Data(b) = entry {
                b[in_blk..in_blk + n].copy_from_slice(&buf[done..done + n]);
            }
            done += n;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), DiskError> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(self.size, offset, len)?;
        // Only whole blocks are dropped; partial edges keep their data.
        let first = offset.div_ceil(MEM_BLOCK);
        let last = (offset + len) / MEM_BLOCK;
        let mut blocks = self.blocks.lock();
        for blk in first..last {
            blocks.remove(&blk);
        }
        Ok(())
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        _fua: bool,
    ) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(self.size, offset, len)?;
        self.zero_range(offset, len, no_hole);
        Ok(())
    }

    fn block_status(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Result<Vec<Extent>, DiskError> {
        check_range(self.size, offset, len)?;
        let blocks = self.blocks.lock();
        let mut out: Vec<Extent> = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let n = (MEM_BLOCK - pos % MEM_BLOCK).min(end - pos);
            let state = match blocks.get(&(pos / MEM_BLOCK)) {
                Some(MemBlock::Data(_)) => ExtentState::Data,
                Some(MemBlock::Zero) => ExtentState::Zero,
                None => ExtentState::Hole,
            };
            let full = out.len() >= max_extents.max(1);
            match out.last_mut() {
                Some(last) if last.state == state => last.len += n,
                _ if full => break,
                _ => out.push(Extent { len: n, state }),
            }
            pos += n;
        }
        Ok(out)
    }
}

/// A [`DiskProvider`] over named [`MemDisk`]s, for protocol tests.
#[derive(Default)]
pub struct MemProvider {
    disks: Mutex<Vec<(String, Arc<MemDisk>)>>,
}

impl MemProvider {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&self, name: &str, disk: MemDisk) -> Arc<MemDisk> {
        let disk = Arc::new(disk);
        self.disks.lock().push((name.to_string(), disk.clone()));
        disk
    }
}

impl DiskProvider for MemProvider {
    fn list_exports(&self) -> Vec<ExportInfo> {
        self.disks
            .lock()
            .iter()
            .map(|(name, d)| ExportInfo {
                name: name.clone(),
                description: String::new(),
                size: d.size(),
                read_only: d.read_only(),
            })
            .collect()
    }

    fn open_export(&self, name: &str, write: bool) -> Result<Arc<dyn Disk>, OpenError> {
        let disks = self.disks.lock();
        let (_, d) = disks
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| OpenError::NotFound(name.to_string()))?;
        if write && d.read_only() {
            return Err(OpenError::ReadOnly(name.to_string()));
        }
        Ok(d.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memdisk_round_trip_and_status() {
        let d = MemDisk::new(1 << 20);
        d.write_at(&[7u8; 1000], 4000, false).unwrap();
        let mut buf = vec![0u8; 1100];
        d.read_at(&mut buf, 3950).unwrap();
        assert!(buf[..50].iter().all(|&b| b == 0));
        assert!(buf[50..1050].iter().all(|&b| b == 7));
        assert!(buf[1050..].iter().all(|&b| b == 0));
        let st = d.block_status(0, 1 << 20, 16).unwrap();
        assert_eq!(
            st,
            vec![
                Extent {
                    len: 8192,
                    state: ExtentState::Data
                },
                Extent {
                    len: (1 << 20) - 8192,
                    state: ExtentState::Hole
                },
            ]
        );
        d.write_zeroes(4096, 4096, true, false).unwrap();
        let st = d.block_status(4096, 8192, 16).unwrap();
        assert_eq!(
            st[0],
            Extent {
                len: 4096,
                state: ExtentState::Zero
            }
        );
        assert_eq!(
            d.read_at(&mut buf, (1 << 20) - 10),
            Err(DiskError::OutOfRange)
        );
        assert_eq!(
            d.snapshot().write_at(&[1], 0, false),
            Err(DiskError::ReadOnly)
        );
    }
}
