//! Large requests cut at block boundaries and run on several threads (the queue's and rayon's
//! pool), since one thread hashing a 1 MiB request leaves the other CPUs idle.

use crate::{
    blkif::abi::PAGE_SIZE,
    blkif::mem::{with_guest_slice_mut, GuestPages, GuestRange},
    disk::{Disk, DiskError},
};

/// Requests of at least this many bytes are split between threads (see the module docs).
pub const SPLIT_BYTES: usize = 256 * 1024;
/// Alignment of the split points on the disk: whole store blocks, so that no block is read
/// or written by two parts.
const SPLIT_ALIGN: u64 = 4096;

/// How many threads a large request is split between: the CPUs, up to 4.
pub(super) fn split_parts() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// Whether a request of `len` bytes is split between `parts` threads. Callers check this
/// first, so that small requests (the common case) allocate nothing for the split.
pub(super) fn worth_splitting(len: usize, parts: usize) -> bool {
    parts > 1 && len >= SPLIT_BYTES
}

/// Where to cut `len` bytes that start at disk offset `start` into about `parts` pieces:
/// the lengths of the pieces, each ending on a [`SPLIT_ALIGN`] boundary except the last.
pub(super) fn split_lengths(start: u64, len: usize, parts: usize) -> Vec<usize> {
    if !worth_splitting(len, parts) {
        return vec![len];
    }
    let want = (len / parts).max(1) as u64;
    let end = start + len as u64;
    let mut cuts = Vec::with_capacity(parts);
    let mut at = start;
    while at < end {
        let mut next = (at + want).div_ceil(SPLIT_ALIGN) * SPLIT_ALIGN;
        if next >= end || cuts.len() + 1 == parts {
            next = end;
        }
        cuts.push((next - at) as usize);
        at = next;
    }
    cuts
}

/// Reads disk bytes from `offset` on into the guest `runs` (from [`coalesce`]), split between
/// threads when large.
pub(super) fn read_into_guest(
    disk: &dyn Disk,
    pages: &dyn GuestPages,
    runs: &[GuestRange],
    offset: u64,
    parts: usize,
) -> Result<(), DiskError> {
    // Straight into the granted pages (see `mem` for why this is the one place a reference
    // to guest memory is formed). Pieces cover disjoint guest bytes.
    let read = |range: GuestRange, at: u64| {
        with_guest_slice_mut(pages, range, |buf| disk.read_at(buf, at))
    };
    let total: usize = runs.iter().map(|r| r.len).sum();
    if !worth_splitting(total, parts) {
        let mut at = offset;
        for &run in runs {
            read(run, at)?;
            at += run.len as u64;
        }
        return Ok(());
    }
    let lengths = split_lengths(offset, total, parts);
    // The pieces as (guest range, disk offset) lists: cut the runs at the lengths above.
    let mut pieces: Vec<Vec<(GuestRange, u64)>> = Vec::with_capacity(lengths.len());
    let mut runs = runs.iter().copied();
    let mut cur: Option<GuestRange> = None;
    let mut disk_at = offset;
    for want in lengths {
        let mut piece = Vec::new();
        let mut left = want;
        while left > 0 {
            let Some(r) = cur.take().or_else(|| runs.next()) else {
                break;
            };
            let take = r.len.min(left);
            piece.push((
                GuestRange {
                    page: r.page,
                    offset: r.offset,
                    len: take,
                },
                disk_at,
            ));
            if take < r.len {
                // The rest of the run continues in the adjacent pages of the same mapping.
                let rest = r.offset + take;
                cur = Some(GuestRange {
                    page: r.page + rest / PAGE_SIZE,
                    offset: rest % PAGE_SIZE,
                    len: r.len - take,
                });
            }
            disk_at += take as u64;
            left -= take;
        }
        pieces.push(piece);
    }
    let read_piece = |piece: &Vec<(GuestRange, u64)>| -> Result<(), DiskError> {
        piece.iter().try_for_each(|&(range, at)| read(range, at))
    };
    run_parts(&pieces, read_piece)
}

/// Runs `f` on every piece, the first on this thread and the others on rayon's pool (kept
/// warm, so a part costs a wake-up rather than a thread start); the first error wins.
pub(super) fn run_parts<P: Sync>(
    pieces: &[P],
    f: impl Fn(&P) -> Result<(), DiskError> + Sync,
) -> Result<(), DiskError> {
    let Some((first, rest)) = pieces.split_first() else {
        return Ok(());
    };
    if rest.is_empty() {
        return f(first);
    }
    let mut results: Vec<Result<(), DiskError>> = vec![Ok(()); rest.len()];
    let mut result = Ok(());
    rayon::in_place_scope(|s| {
        let f = &f;
        for (p, r) in rest.iter().zip(results.iter_mut()) {
            s.spawn(move |_| *r = f(p));
        }
        result = f(first);
    });
    result.and(results.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        blkif::mem::{coalesce, copy_from_guest, HeapPages},
        disk::MemDisk,
    };

    #[test]
    fn split_lengths_cut_on_block_boundaries() {
        for start in [0u64, 512, 4096, 7 * 512, 1 << 30] {
            for len in [
                0usize,
                4096,
                SPLIT_BYTES - 512,
                SPLIT_BYTES,
                1 << 20,
                (1 << 20) + 1536,
            ] {
                for parts in 1..=4 {
                    let l = split_lengths(start, len, parts);
                    assert_eq!(l.iter().sum::<usize>(), len, "{start} {len} {parts}");
                    assert!(l.len() <= parts.max(1));
                    if len < SPLIT_BYTES || parts == 1 {
                        assert_eq!(l, vec![len]);
                    }
                    let mut at = start;
                    for (i, n) in l.iter().enumerate() {
                        at += *n as u64;
                        assert!(*n > 0 || len == 0);
                        if i + 1 < l.len() {
                            assert_eq!(at % SPLIT_ALIGN, 0, "{start} {len} {parts}: {l:?}");
                        }
                    }
                }
            }
        }
        // A 1 MiB request on 2 CPUs: two halves.
        assert_eq!(split_lengths(0, 1 << 20, 2), vec![1 << 19, 1 << 19]);
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8 | 1).collect()
    }

    #[test]
    fn split_reads_fill_the_guest_pages_like_one_read() {
        let disk = MemDisk::new(8 << 20);
        disk.write_at(&pattern(8 << 20), 0, false).unwrap();
        let pages = HeapPages::new(600);
        // A request starting half-way into its first page, then whole pages, some adjacent
        // (coalesced into one run) and some not, as a guest's scattered buffers would be.
        let mut ranges = vec![GuestRange {
            page: 0,
            offset: 1024,
            len: 3072,
        }];
        let mut page = 1;
        for i in 0..300 {
            ranges.push(GuestRange {
                page,
                offset: 0,
                len: PAGE_SIZE,
            });
            page += if i % 7 == 0 { 2 } else { 1 };
        }
        let total: usize = ranges.iter().map(|r| r.len).sum();
        let disk_offset = 3 * 4096 + 1024;
        let mut runs = Vec::new();
        coalesce(&pages, &ranges, &mut runs);
        for parts in [1, 2, 3, 4] {
            read_into_guest(&disk, &pages, &runs, disk_offset, parts).unwrap();
            let mut got = vec![0u8; total];
            let mut pos = 0;
            for r in &ranges {
                copy_from_guest(&pages, r.page, r.offset, &mut got[pos..pos + r.len]);
                pos += r.len;
            }
            let mut want = vec![0u8; total];
            disk.read_at(&mut want, disk_offset).unwrap();
            assert!(got == want, "{parts} parts");
            // Clear the pages for the next round.
            let zeros = vec![0u8; PAGE_SIZE];
            for p in 0..pages.count() {
                crate::blkif::mem::copy_to_guest(&pages, p, 0, &zeros);
            }
        }
    }

    #[test]
    fn a_failing_part_fails_the_request() {
        let disk = MemDisk::new(1 << 20);
        let pages = HeapPages::new(300);
        let ranges: Vec<GuestRange> = (0..256)
            .map(|p| GuestRange {
                page: p,
                offset: 0,
                len: PAGE_SIZE,
            })
            .collect();
        let mut runs = Vec::new();
        coalesce(&pages, &ranges, &mut runs);
        // The second half runs past the end of the disk.
        assert_eq!(
            read_into_guest(&disk, &pages, &runs, 512 << 10, 2),
            Err(DiskError::OutOfRange)
        );
    }
}
