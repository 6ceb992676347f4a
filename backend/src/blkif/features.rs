//! What the backend advertises to frontends (the xenstore feature nodes of a vbd backend, and
//! the local attach reply), and the device properties published on connect.

use serde::{Deserialize, Serialize};

use super::abi::{MAX_INDIRECT_SEGMENTS_ABI, MAX_RING_PAGE_ORDER, VDISK_READONLY};

/// Features and limits the backend offers. The defaults are what Parallax advertises.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Features {
    /// `max-ring-page-order`: rings of up to `2^order` pages.
    pub max_ring_page_order: u32,
    /// `multi-queue-max-queues`.
    pub max_queues: u32,
    /// `feature-max-indirect-segments` (0: indirect requests not offered).
    pub max_indirect_segments: u32,
    /// `feature-flush-cache`.
    pub flush: bool,
    /// `feature-barrier`. Barriers order requests of their own queue only (a barrier splits
    /// its queue's round: what comes before it completes first); Linux blkfront uses flush
    /// instead.
    pub barrier: bool,
    /// `feature-discard`.
    pub discard: bool,
    /// `discard-secure`: never offered (freed store blocks are not scrubbed).
    pub discard_secure: bool,
    /// `discard-granularity` in bytes (the store's block size).
    pub discard_granularity: u32,
    /// `discard-alignment` in bytes.
    pub discard_alignment: u32,
    /// `feature-persistent`: a frontend that asks for it keeps its grants for good, and the
    /// backend keeps them mapped.
    pub persistent: bool,
}

/// Default `feature-max-indirect-segments` (Linux blkback's value: 1 MiB per request).
pub const DEFAULT_MAX_INDIRECT_SEGMENTS: u32 = 256;
/// Default `multi-queue-max-queues`.
pub const DEFAULT_MAX_QUEUES: u32 = 4;
/// Most queues the engine accepts for one device, whatever is configured.
pub const MAX_QUEUES_LIMIT: u32 = 16;

impl Default for Features {
    fn default() -> Self {
        Features {
            max_ring_page_order: MAX_RING_PAGE_ORDER,
            max_queues: DEFAULT_MAX_QUEUES,
            max_indirect_segments: DEFAULT_MAX_INDIRECT_SEGMENTS,
            flush: true,
            barrier: true,
            discard: true,
            discard_secure: false,
            discard_granularity: 4096,
            discard_alignment: 0,
            persistent: true,
        }
    }
}

impl Features {
    /// The same features with every limit clamped to what the engine can serve.
    pub fn clamped(&self) -> Features {
        Features {
            max_ring_page_order: self.max_ring_page_order.min(MAX_RING_PAGE_ORDER),
            max_queues: self.max_queues.clamp(1, MAX_QUEUES_LIMIT),
            max_indirect_segments: self
                .max_indirect_segments
                .min(MAX_INDIRECT_SEGMENTS_ABI as u32),
            ..self.clone()
        }
    }

    /// The backend's feature nodes, as written to xenstore before `InitWait`
    /// (relative to the backend directory). Nodes of features not offered are left out, as
    /// blkif.h asks for `feature-max-indirect-segments`.
    pub fn xenstore_nodes(&self) -> Vec<(&'static str, String)> {
        let f = self.clamped();
        let b = |v: bool| if v { "1" } else { "0" }.to_string();
        let mut nodes = vec![
            ("feature-flush-cache", b(f.flush)),
            ("feature-barrier", b(f.barrier)),
            ("feature-discard", b(f.discard)),
            ("feature-persistent", b(f.persistent)),
            ("max-ring-page-order", f.max_ring_page_order.to_string()),
            ("multi-queue-max-queues", f.max_queues.to_string()),
        ];
        if f.discard {
            nodes.push(("discard-granularity", f.discard_granularity.to_string()));
            nodes.push(("discard-alignment", f.discard_alignment.to_string()));
            nodes.push(("discard-secure", b(f.discard_secure)));
        }
        if f.max_indirect_segments > 0 {
            nodes.push((
                "feature-max-indirect-segments",
                f.max_indirect_segments.to_string(),
            ));
        }
        nodes
    }
}

/// The device properties a backend publishes before `Connected`: `sectors`, `sector-size`,
/// `physical-sector-size`, `info`.
pub fn device_nodes(disk_bytes: u64, read_only: bool) -> Vec<(&'static str, String)> {
    vec![
        ("sectors", (disk_bytes / 512).to_string()),
        ("sector-size", "512".to_string()),
        ("physical-sector-size", "4096".to_string()),
        (
            "info",
            if read_only { VDISK_READONLY } else { 0 }.to_string(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes() {
        let f = Features::default();
        let nodes = f.xenstore_nodes();
        let get = |k: &str| nodes.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("max-ring-page-order"), Some("4"));
        assert_eq!(get("feature-max-indirect-segments"), Some("256"));
        assert_eq!(get("discard-secure"), Some("0"));
        let none = Features {
            max_indirect_segments: 0,
            discard: false,
            ..f
        };
        let nodes = none.xenstore_nodes();
        assert!(nodes
            .iter()
            .all(|(n, _)| *n != "feature-max-indirect-segments" && *n != "discard-granularity"));
        assert_eq!(
            Features {
                max_queues: 1000,
                ..Default::default()
            }
            .clamped()
            .max_queues,
            MAX_QUEUES_LIMIT
        );
        assert_eq!(
            device_nodes(1 << 20, true)[0],
            ("sectors", "2048".to_string())
        );
        assert_eq!(device_nodes(1 << 20, true)[3].1, "4");
    }
}
