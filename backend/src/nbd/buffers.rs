//! Recycled buffers for large read replies and write payloads.
//!
//! A fresh 1 MiB `vec![0; n]` costs a memset and, once glibc hands it back to the kernel, a
//! page fault per 4 KiB when it is touched again: about a tenth of the CPU of a 1 MiB NBD read
//! in `bench/profile.py`. Large buffers go back to a small shared pool when their reply has
//! been sent or their payload written, and the next large request takes one from there.
//!
//! A taken buffer is not zeroed: it holds an earlier request's bytes, possibly another export's.
//! Every caller overwrites all of it before anything is sent: a read reply is filled by
//! `Disk::read_at` (which writes every byte, holes as zeroes) or not sent at all, and a write
//! payload is filled from the socket before it is written.

use parking_lot::Mutex;

/// Smaller buffers come from the allocator, which serves them well.
const MIN_POOLED: usize = 64 * 1024;
/// Larger buffers are not kept (a 32 MiB request is rare; holding it is not worth it).
const MAX_POOLED: usize = 4 * 1024 * 1024 + 64;
/// Buffers kept at most: enough for every connection's requests in flight on a busy server.
const POOL_LEN: usize = 32;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A buffer of `len` bytes whose contents the caller must overwrite entirely.
pub fn take(len: usize) -> Vec<u8> {
    if (MIN_POOLED..=MAX_POOLED).contains(&len) {
        let found = {
            let mut pool = POOL.lock();
            pool.iter()
                .position(|b| b.capacity() >= len)
                .map(|i| pool.swap_remove(i))
        };
        if let Some(mut b) = found {
            if b.len() < len {
                b.resize(len, 0);
            } else {
                b.truncate(len);
            }
            return b;
        }
    }
    vec![0; len]
}

/// Returns a buffer that is no longer needed; small and oversized ones are freed.
pub fn give(b: Vec<u8>) {
    if (MIN_POOLED..=MAX_POOLED).contains(&b.capacity()) {
        let mut pool = POOL.lock();
        if pool.len() < POOL_LEN {
            pool.push(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_are_reused_and_sized_as_asked() {
        let mut a = take(1 << 20);
        assert_eq!(a.len(), 1 << 20);
        a[0] = 7;
        let at = a.as_ptr();
        give(a);
        // Another test may take it first; take until it comes back or the pool is empty.
        let mut taken = Vec::new();
        let mut reused = false;
        for _ in 0..POOL_LEN {
            let b = take(1000 * 1000);
            assert_eq!(b.len(), 1000 * 1000);
            if b.as_ptr() == at {
                reused = true;
                break;
            }
            taken.push(b);
        }
        assert!(reused);
        // A small buffer is never pooled, and is zeroed.
        give(vec![1u8; 100]);
        assert!(take(100).iter().all(|&x| x == 0));
    }
}
