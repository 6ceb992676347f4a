//! The hashes of many data blocks at once.
//!
//! A 4 KiB block is four BLAKE3 chunks under a two-level tree. `blake3::hash` of one block
//! spreads its four chunks over the SIMD lanes, a quarter of AVX-512's sixteen; hashing the
//! same chunk of sixteen blocks side by side fills them, then the parents the same way. On the
//! development machine (AVX-512) that hashes a MiB of blocks in 202 µs instead of 364 µs, and
//! block hashing is the largest cost of 1 MiB reads and writes (each block is verified or
//! hashed).
//!
//! The wide primitive is `blake3::platform::Platform::hash_many`, which the crate exports
//! undocumented and unstable (for its own benchmarks). The version is pinned in Cargo.toml and
//! the tests below check every result against `blake3::hash`; a blake3 upgrade that changes the
//! primitive fails to build or fails those tests, and [`hash24_each`] can fall back to
//! [`hash24`] per block without any other change.

use blake3::platform::Platform;
use blake3::IncrementCounter;

use super::format::{hash24, Hash24, BLOCK_SIZE, HASH_LEN};

/// BLAKE3's key words for plain hashing (the SHA-256 IV; the specification, section 2.1).
const IV: [u32; 8] = [
    0x6A09_E667,
    0xBB67_AE85,
    0x3C6E_F372,
    0xA54F_F53A,
    0x510E_527F,
    0x9B05_688C,
    0x1F83_D9AB,
    0x5BE0_CD19,
];
/// Domain flags (the specification, table 3).
const CHUNK_START: u8 = 1 << 0;
const CHUNK_END: u8 = 1 << 1;
const PARENT: u8 = 1 << 2;
const ROOT: u8 = 1 << 3;

const CHUNK_LEN: usize = 1024;
const CHUNKS: usize = BLOCK_SIZE / CHUNK_LEN;
const CV_LEN: usize = 32;
/// Blocks hashed side by side: AVX-512's lanes.
const WIDTH: usize = 16;
/// Below this many blocks, one at a time is as fast.
const MIN_WIDE: usize = 4;

const _: () = assert!(CHUNKS == 4, "the tree below is the one for four chunks");

/// Calls `f(i, hash24(blocks[i]))` for each block, hashing side by side where that is faster.
/// Every block must be [`BLOCK_SIZE`] bytes.
pub fn hash24_each(blocks: &[&[u8]], mut f: impl FnMut(usize, Hash24)) {
    let platform = Platform::detect();
    let mut done = 0;
    for group in blocks.chunks(WIDTH) {
        if group.len() < MIN_WIDE {
            for (i, b) in group.iter().enumerate() {
                f(done + i, hash24(b));
            }
        } else {
            let mut roots = [0u8; WIDTH * CV_LEN];
            hash_group(platform, group, &mut roots);
            for i in 0..group.len() {
                let mut h = [0u8; HASH_LEN];
                h.copy_from_slice(&roots[i * CV_LEN..][..HASH_LEN]);
                f(done + i, h);
            }
        }
        done += group.len();
    }
}

/// Hashes up to [`WIDTH`] blocks into `roots` (32 bytes each).
fn hash_group(platform: Platform, group: &[&[u8]], roots: &mut [u8; WIDTH * CV_LEN]) {
    let n = group.len();
    debug_assert!(n <= WIDTH);
    // Chaining values of every chunk, block-major: block i's chunk c at i * CHUNKS + c, so
    // that each block's pairs of siblings are adjacent 64-byte parent inputs.
    let mut cvs = [0u8; WIDTH * CHUNKS * CV_LEN];
    let mut out = [0u8; WIDTH * CV_LEN];
    for c in 0..CHUNKS {
        let mut inputs: [&[u8; CHUNK_LEN]; WIDTH] = [&[0; CHUNK_LEN]; WIDTH];
        for (slot, b) in inputs.iter_mut().zip(group) {
            assert_eq!(b.len(), BLOCK_SIZE, "a data block");
            *slot = b[c * CHUNK_LEN..][..CHUNK_LEN]
                .try_into()
                .expect("a chunk of a block");
        }
        // Chunk c of every block: chunk counter c, the same for all inputs.
        platform.hash_many(
            &inputs[..n],
            &IV,
            c as u64,
            IncrementCounter::No,
            0,
            CHUNK_START,
            CHUNK_END,
            &mut out,
        );
        for i in 0..n {
            cvs[(i * CHUNKS + c) * CV_LEN..][..CV_LEN]
                .copy_from_slice(&out[i * CV_LEN..][..CV_LEN]);
        }
    }
    // The two parents of each block: (chunk 0, chunk 1) and (chunk 2, chunk 3).
    let mut parents = [0u8; WIDTH * 2 * CV_LEN];
    let pairs: Vec<&[u8; 2 * CV_LEN]> = cvs[..n * CHUNKS * CV_LEN]
        .chunks_exact(2 * CV_LEN)
        .map(|p| p.try_into().expect("two chaining values"))
        .collect();
    platform.hash_many(
        &pairs,
        &IV,
        0,
        IncrementCounter::No,
        PARENT,
        0,
        0,
        &mut parents,
    );
    // The root of each block, over its two parents.
    let tops: Vec<&[u8; 2 * CV_LEN]> = parents[..n * 2 * CV_LEN]
        .chunks_exact(2 * CV_LEN)
        .map(|p| p.try_into().expect("two chaining values"))
        .collect();
    platform.hash_many(
        &tops,
        &IV,
        0,
        IncrementCounter::No,
        PARENT | ROOT,
        0,
        0,
        roots,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n * BLOCK_SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Every count around the group width and the fallback threshold, against `blake3::hash`.
    #[test]
    fn matches_blake3_for_every_count() {
        for n in (0..=2 * WIDTH + 3).chain([255, 256]) {
            let data = blocks(n, n as u64 + 1);
            let refs: Vec<&[u8]> = data.chunks(BLOCK_SIZE).collect();
            let mut got = vec![None; n];
            hash24_each(&refs, |i, h| {
                assert!(got[i].replace(h).is_none(), "block {i} reported twice");
            });
            for (i, b) in refs.iter().enumerate() {
                assert_eq!(got[i], Some(hash24(b)), "block {i} of {n}");
            }
        }
    }

    /// Equal blocks hash equal and a one-bit change anywhere changes only that block's hash.
    #[test]
    fn each_block_is_hashed_on_its_own() {
        let mut data = vec![7u8; WIDTH * BLOCK_SIZE];
        let at = 5 * BLOCK_SIZE + 3 * CHUNK_LEN + 17;
        data[at] ^= 1;
        let refs: Vec<&[u8]> = data.chunks(BLOCK_SIZE).collect();
        let mut got = Vec::new();
        hash24_each(&refs, |_, h| got.push(h));
        let same = hash24(&[7u8; BLOCK_SIZE]);
        for (i, h) in got.iter().enumerate() {
            assert_eq!(*h == same, i != 5, "block {i}");
        }
    }
}
