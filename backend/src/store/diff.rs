//! What changed between two points of history (`parallax vdi diff`): the two maps are walked
//! side by side and every subtree they share — the same map node, which copy-on-write never
//! changes once two trees point at it — is skipped, so the cost follows the change, not the
//! size of the VDI.
//!
//! ```text
//!  A@s1  root ─┬─ n1               A  root' ─┬─ n1        same node: skipped
//!              └─ n2 ─ leaf b                 └─ n2' ─ leaf b'   walked: b ≠ b'
//! ```
//!
//! Content decides, not placement: a hole and an explicit zero read alike, and two data
//! blocks with the same hash hold the same bytes.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{
    error::{StoreError, StoreResult},
    format::{Ptr, PtrKind, BLOCK_SIZE_U64, FANOUT, FANOUT_BITS},
    nodes::{retry_evicted, Node, UNSET},
    store::Store,
    vdi::VdiState,
};

/// A run of bytes whose content differs between the two points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedExtent {
    pub offset: u64,
    pub length: u64,
    /// The newer point reads zeros here (a trim, a zeroing, or a hole).
    pub zero: bool,
}

/// `parallax vdi diff FROM TO`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffReport {
    pub from: String,
    pub to: String,
    /// Size of `to` in bytes; the extents lie within it.
    pub size: u64,
    pub changed_bytes: u64,
    pub extents: Vec<ChangedExtent>,
    /// Map nodes the walk looked into: what the diff cost.
    pub nodes_visited: u64,
}

/// One side of the walk: a pointer and the level it has in its own tree. A tree lower than the
/// other is walked as if it were child 0 of nodes of the missing levels (growing a VDI adds
/// levels above its old root the same way).
#[derive(Clone, Copy)]
struct Side {
    p: Ptr,
    level: u8,
}

/// A side's children at one level.
enum Children {
    Node(Arc<Node>),
    /// Every child is this hole or zero pointer.
    Uniform(Ptr),
    /// The side sits lower: child 0 is it, the rest lie beyond its tree.
    Lifted(Side),
}

impl Children {
    fn get(&self, i: usize, level: u8) -> Side {
        match self {
            Children::Node(n) => Side {
                p: n.get(i),
                level: level - 1,
            },
            Children::Uniform(p) => Side {
                p: *p,
                level: level - 1,
            },
            Children::Lifted(s) if i == 0 => *s,
            Children::Lifted(_) => Side {
                p: Ptr::HOLE,
                level: level - 1,
            },
        }
    }
}

fn span(level: u8) -> u64 {
    1u64 << (FANOUT_BITS * level as u32)
}

struct Walk<'a> {
    store: &'a Store,
    /// Blocks of `to` (nothing past it is reported).
    end: u64,
    out: Vec<ChangedExtent>,
    nodes_visited: u64,
}

impl Walk<'_> {
    fn children(&mut self, s: Side, level: u8) -> StoreResult<Children> {
        if s.level < level {
            return Ok(Children::Lifted(s));
        }
        Ok(match s.p.kind()? {
            PtrKind::Hole | PtrKind::Zero => Children::Uniform(s.p),
            PtrKind::Block => {
                self.nodes_visited += 1;
                Children::Node(self.store.nodes.fetch(&*self.store.dev, s.p)?)
            }
        })
    }

    fn walk(&mut self, a: Side, b: Side, level: u8, base: u64) -> StoreResult<()> {
        if base >= self.end {
            return Ok(());
        }
        let (ka, kb) = (a.p.kind()?, b.p.kind()?);
        let a_here = a.level == level;
        let b_here = b.level == level;
        match (ka, kb) {
            // Zeros on both sides, however they are written down.
            (PtrKind::Hole | PtrKind::Zero, PtrKind::Hole | PtrKind::Zero) => return Ok(()),
            // The same node or the same data.
            (PtrKind::Block, PtrKind::Block)
                if a_here
                    && b_here
                    && (a.p.addr() == b.p.addr()
                        || (level == 0 && a.p.hash == b.p.hash && a.p.hash != UNSET)) =>
            {
                return Ok(())
            }
            _ => {}
        }
        if level == 0 {
            self.emit(base, kb != PtrKind::Block);
            return Ok(());
        }
        let (ca, cb) = (self.children(a, level)?, self.children(b, level)?);
        let child_span = span(level - 1);
        for i in 0..FANOUT {
            let cbase = base + i as u64 * child_span;
            if cbase >= self.end {
                break;
            }
            self.walk(ca.get(i, level), cb.get(i, level), level - 1, cbase)?;
        }
        Ok(())
    }

    fn emit(&mut self, lba: u64, zero: bool) {
        let offset = lba * BLOCK_SIZE_U64;
        match self.out.last_mut() {
            Some(e) if e.zero == zero && e.offset + e.length == offset => {
                e.length += BLOCK_SIZE_U64
            }
            _ => self.out.push(ChangedExtent {
                offset,
                length: BLOCK_SIZE_U64,
                zero,
            }),
        }
    }
}

impl Store {
    /// The extents whose content differs between `from` and `to` (each `NAME` or `NAME@SNAP`,
    /// usually two points of one VDI's history, older first). Both are held still while the
    /// walk runs: writes to a live `to` wait for it.
    pub fn diff(&self, from: &str, to: &str) -> StoreResult<DiffReport> {
        let va = self.vdi_named(from)?;
        let vb = self.vdi_named(to)?;
        // Two read locks, taken in id order so that two diffs can never wait on each other
        // behind a writer.
        let (first, second) = if va.id <= vb.id {
            (&va, &vb)
        } else {
            (&vb, &va)
        };
        let g1 = first.state.read();
        let g2 = (first.id != second.id).then(|| second.state.read());
        let s1: &VdiState = &g1;
        let s2: &VdiState = g2.as_deref().unwrap_or(s1);
        let (sa, sb) = if va.id <= vb.id { (s1, s2) } else { (s2, s1) };
        for (name, st) in [(from, sa), (to, sb)] {
            if st.deleted {
                return Err(StoreError::NotFound(name.to_string()));
            }
        }
        let (ra, rb) = (&sa.rec, &sb.rec);
        let height = ra.height.max(rb.height);
        let mut walk = Walk {
            store: self,
            end: rb.size.div_ceil(BLOCK_SIZE_U64),
            out: Vec::new(),
            nodes_visited: 0,
        };
        retry_evicted(|| {
            walk.out.clear();
            walk.nodes_visited = 0;
            walk.walk(
                Side {
                    p: ra.root,
                    level: ra.height,
                },
                Side {
                    p: rb.root,
                    level: rb.height,
                },
                height,
                0,
            )
        })?;
        let size = rb.size;
        let mut extents = walk.out;
        // The last block may run past a size that is not a multiple of the block size.
        if let Some(e) = extents.last_mut() {
            e.length = e.length.min(size - e.offset);
        }
        Ok(DiffReport {
            from: from.to_string(),
            to: to.to_string(),
            size,
            changed_bytes: extents.iter().map(|e| e.length).sum(),
            extents,
            nodes_visited: walk.nodes_visited,
        })
    }
}
