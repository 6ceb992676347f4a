//! Metadata contexts (pure): `base:allocation`, and Parallax's block hashes in six contexts
//! `parallax:hash:0` … `parallax:hash:5` (`docs/NBD-HASH.md`).
//!
//! A block status descriptor carries 32 bits of status; a block's hash (the 24 bytes of
//! blake3 the store keeps in every map pointer) needs 192, so part K of the hash is bytes
//! 4K..4K+4 of it, big-endian, in context `parallax:hash:K`. Every context has a fixed ID.

use super::proto::BASE_ALLOCATION;

/// What the hash contexts' names start with.
pub const HASH_PREFIX: &str = "parallax:hash:";
/// Hash contexts: 6 × 4 bytes = the 24-byte block hash.
pub const HASH_PARTS: usize = 6;
/// The ID of `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;
/// The size a hash describes: one store block.
pub const HASH_BLOCK: u64 = 4096;

/// The ID of `parallax:hash:K`.
pub fn hash_part_id(k: usize) -> u32 {
    2 + k as u32
}

/// A set of contexts (selected by a client, or listed for it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Contexts {
    pub base_allocation: bool,
    /// Bit K: `parallax:hash:K`.
    pub hash_parts: u8,
}

impl Contexts {
    pub fn is_empty(&self) -> bool {
        !self.base_allocation && self.hash_parts == 0
    }

    /// The contexts `queries` name: for `SET_META_CONTEXT` (`set`) only full names count;
    /// for `LIST_META_CONTEXT` no query lists everything, and `base:`, `parallax:` or
    /// `parallax:hash:` list a namespace. Unknown names are ignored, as the spec asks.
    pub fn from_queries(queries: &[String], set: bool) -> Contexts {
        let mut c = Contexts::default();
        if !set && queries.is_empty() {
            return Contexts {
                base_allocation: true,
                hash_parts: (1 << HASH_PARTS) - 1,
            };
        }
        for q in queries {
            if q == BASE_ALLOCATION || (!set && q == "base:") {
                c.base_allocation = true;
            } else if !set && (q == "parallax:" || q == HASH_PREFIX) {
                c.hash_parts = (1 << HASH_PARTS) - 1;
            } else if let Some(part) = q.strip_prefix(HASH_PREFIX) {
                match part.parse::<usize>() {
                    Ok(k) if k < HASH_PARTS && part == k.to_string() => c.hash_parts |= 1 << k,
                    _ => {}
                }
            }
        }
        c
    }

    /// (ID, name) of each context in the set, `base:allocation` first.
    pub fn named(&self) -> Vec<(u32, String)> {
        let mut out = Vec::new();
        if self.base_allocation {
            out.push((BASE_ALLOCATION_ID, BASE_ALLOCATION.to_string()));
        }
        for k in 0..HASH_PARTS {
            if self.hash_parts & (1 << k) != 0 {
                out.push((hash_part_id(k), format!("{HASH_PREFIX}{k}")));
            }
        }
        out
    }
}

/// Descriptors of `parallax:hash:K` for `hashes` (runs of (bytes, hash if the run is one
/// stored block)), trimmed to `len` bytes and `max` descriptors: one descriptor per block
/// with a hash, its part K as the status; one per run without, status 0. A block whose six
/// parts are all 0 has no hash to offer (a real hash that is all zeros does not occur).
pub fn hash_descriptors(
    hashes: &[(u64, Option<[u8; 24]>)],
    k: usize,
    len: u32,
    max: usize,
) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut left = u64::from(len);
    // The last descriptor is a run without a hash (runs merge; hashed blocks never do).
    let mut open_run = false;
    for &(n, h) in hashes {
        let n = n.min(left);
        if n == 0 {
            break;
        }
        let full = out.len() == max;
        match (h, out.last_mut()) {
            (None, Some(last)) if open_run => last.0 += n as u32,
            _ if full => break,
            (None, _) => {
                out.push((n as u32, 0));
                open_run = true;
            }
            (Some(h), _) => {
                let part = u32::from_be_bytes(h[4 * k..4 * k + 4].try_into().expect("4 bytes"));
                out.push((n as u32, part));
                open_run = false;
            }
        }
        left -= n;
    }
    if out.is_empty() {
        out.push((len.min(HASH_BLOCK as u32).max(1), 0));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_select_what_they_name() {
        let q = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let all = Contexts::from_queries(&[], false);
        assert_eq!(all.named().len(), 7);
        assert_eq!(all.named()[1], (2, "parallax:hash:0".to_string()));
        assert_eq!(Contexts::from_queries(&[], true), Contexts::default());
        let c = Contexts::from_queries(&q(&["parallax:hash:0", "parallax:hash:5", "x:y"]), true);
        assert_eq!(c.hash_parts, 0b100001);
        assert!(!c.base_allocation);
        assert!(
            Contexts::from_queries(&q(&["parallax:hash:6", "parallax:hash:01"]), true).is_empty()
        );
        assert!(Contexts::from_queries(&q(&["parallax:"]), true).is_empty());
        assert_eq!(
            Contexts::from_queries(&q(&["parallax:"]), false).hash_parts,
            0b111111
        );
    }

    #[test]
    fn descriptors_give_one_part_per_hashed_block() {
        let h: [u8; 24] = std::array::from_fn(|i| i as u8 + 1);
        let runs = [
            (8192, None),
            (4096, Some(h)),
            (4096, Some(h)),
            (12288, None),
            (4096, Some(h)),
        ];
        assert_eq!(
            hash_descriptors(&runs, 0, 32768, 100),
            [
                (8192, 0),
                (4096, 0x01020304),
                (4096, 0x01020304),
                (12288, 0),
                (4096, 0x01020304)
            ]
        );
        assert_eq!(
            hash_descriptors(&runs, 5, 32768, 2),
            [(8192, 0), (4096, 0x15161718)]
        );
        assert_eq!(
            hash_descriptors(&runs, 1, 10000, 100),
            [(8192, 0), (1808, 0x05060708)]
        );
        assert_eq!(hash_descriptors(&[], 1, 100, 100), [(100, 0)]);
    }
}
