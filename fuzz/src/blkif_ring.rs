//! A hostile guest's ring: the fuzzer writes the shared ring (entries and producer index) and
//! every page of a small grant table (indirect segment lists, data pages), then the real ring
//! engine serves it over the local transport — the code a Xen guest reaches — until it has
//! answered what was posted.
//!
//! The engine must not crash (grant tables sit between guard pages, so a stray access kills
//! the run), must not hang, and unless it shut the device down for a protocol violation it must
//! have answered every posted request, in order, echoing each request's id.
//!
//! The ring pages live in a table of their own that requests cannot name (grant references
//! from [`RING_REFS`] up reach only them, and only once, as the ring), so a guest READ into its own
//! ring page — legal, and the guest's own problem — cannot blur what the engine answered.
//!
//! Input: `[flags u8][req_prod u32 LE][rsp_event u32 LE][bytes...]`; the bytes fill the ring's
//! entry area, then the data table's pages in order (grant reference 0, 1, ...).

use std::sync::{Arc, OnceLock};

use parallax::{
    blkif::{
        abi::{
            BlkifRequest, EntryBytes, GrantRef, BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR,
            BLKIF_RSP_OKAY, PAGE_SIZE,
        },
        local::{LocalEvent, LocalGrantTable, LocalPages},
        mem::copy_to_guest,
        ring::SharedRing,
        start_device, DeviceEnd, DeviceParams, Features, QueueParams, Transport, TransportError,
    },
    disk::MemDisk,
};

/// Grant references of the ring pages (outside the data table's `0..DATA_PAGES`).
const RING_REFS: GrantRef = 1 << 20;
const RING_PAGES: usize = 2;
const DATA_PAGES: usize = 16;
const DISK_BYTES: u64 = 1 << 20;
/// Where entries start in the shared ring.
const ENTRIES_AT: usize = 64;
const ENTRY: usize = 112;

struct Tables {
    ring: Arc<LocalGrantTable>,
    data: Arc<LocalGrantTable>,
}

fn tables() -> &'static Tables {
    static T: OnceLock<Tables> = OnceLock::new();
    T.get_or_init(|| Tables {
        ring: Arc::new(LocalGrantTable::create(RING_PAGES).expect("memfd ring table")),
        data: Arc::new(LocalGrantTable::create(DATA_PAGES).expect("memfd data table")),
    })
}

/// The local transport, with the ring's pages apart from the pages requests can name.
struct FuzzTransport {
    /// The backend's end of the one event channel (port 0), until bound.
    event: std::sync::Mutex<Option<LocalEvent>>,
    /// The ring table is handed out once, as the ring; afterwards its references are not
    /// granted (a request naming one would otherwise write into the ring it is answered on).
    ring_mapped: std::sync::atomic::AtomicBool,
}

impl Transport for FuzzTransport {
    type Pages = LocalPages;
    type Event = LocalEvent;

    fn map(&self, refs: &[GrantRef], writable: bool) -> Result<LocalPages, TransportError> {
        let t = tables();
        if let Some(&bad) = refs.iter().find(|&&r| r >= RING_REFS) {
            if !refs.iter().all(|&r| r >= RING_REFS)
                || self
                    .ring_mapped
                    .swap(true, std::sync::atomic::Ordering::AcqRel)
            {
                return Err(TransportError::BadGrant(bad));
            }
            let local: Vec<GrantRef> = refs.iter().map(|&r| r - RING_REFS).collect();
            t.ring.pages_for(&local, writable)
        } else {
            t.data.pages_for(refs, writable)
        }
    }

    fn bind(&self, port: u32) -> Result<LocalEvent, TransportError> {
        let mut slot = self.event.lock().expect("event slot");
        match (port, slot.take()) {
            (0, Some(e)) => Ok(e),
            _ => Err(TransportError::BadPort(port)),
        }
    }
}

pub fn blkif_ring(data: &[u8]) {
    if data.len() < 9 {
        return;
    }
    let flags = data[0];
    let req_prod = u32::from_le_bytes(data[1..5].try_into().unwrap());
    let rsp_event = u32::from_le_bytes(data[5..9].try_into().unwrap());
    let body = &data[9..];
    let order = u32::from(flags & 1);
    let ring_pages = 1usize << order;
    let t = tables();

    // The ring: header, then entries from the input.
    let ring_view: Vec<GrantRef> = (0..ring_pages as GrantRef).collect();
    let ring = SharedRing::new(Box::new(t.ring.pages_for(&ring_view, true).unwrap()), order)
        .expect("ring pages");
    let ring_size = ring.size();
    let mut image = vec![0u8; RING_PAGES * PAGE_SIZE];
    let n = body.len().min(ring_pages * PAGE_SIZE - ENTRIES_AT);
    image[ENTRIES_AT..ENTRIES_AT + n].copy_from_slice(&body[..n]);
    image[0..4].copy_from_slice(&req_prod.to_le_bytes());
    image[4..8].copy_from_slice(&1u32.to_le_bytes()); // req_event
    image[12..16].copy_from_slice(&rsp_event.to_le_bytes());
    let all_ring: Vec<GrantRef> = (0..RING_PAGES as GrantRef).collect();
    let pages = t.ring.pages_for(&all_ring, true).unwrap();
    for (i, page) in image.chunks(PAGE_SIZE).enumerate() {
        copy_to_guest(&pages, i, 0, page);
    }
    let posted: Vec<EntryBytes> = (0..req_prod.min(ring_size))
        .map(|i| {
            let at = ENTRIES_AT + i as usize * ENTRY;
            image[at..at + ENTRY].try_into().unwrap()
        })
        .collect();
    // The data pages: the rest of the input.
    let rest = body.get(n..).unwrap_or(&[]);
    let mut data_image = vec![0u8; DATA_PAGES * PAGE_SIZE];
    let m = rest.len().min(data_image.len());
    data_image[..m].copy_from_slice(&rest[..m]);
    let all_data: Vec<GrantRef> = (0..DATA_PAGES as GrantRef).collect();
    let dpages = t.data.pages_for(&all_data, true).unwrap();
    for (i, page) in data_image.chunks(PAGE_SIZE).enumerate() {
        copy_to_guest(&dpages, i, 0, page);
    }

    let features = Features {
        max_ring_page_order: 1,
        max_queues: 1,
        max_indirect_segments: if flags & 2 != 0 { 0 } else { 256 },
        flush: flags & 4 == 0,
        barrier: flags & 8 == 0,
        discard: flags & 16 == 0,
        ..Features::default()
    };
    let params = DeviceParams {
        name: "fuzz".into(),
        ring_order: order,
        queues: vec![QueueParams {
            ring_refs: (0..ring_pages as GrantRef).map(|r| RING_REFS + r).collect(),
            event_channel: 0,
        }],
        protocol: None,
        read_only: flags & 32 != 0,
        features,
        // Persistent grants: the guest's pages stay mapped across requests.
        persistent: flags & 64 != 0,
    };
    let (back, _front) = LocalEvent::pair().expect("eventfds");
    let transport = Arc::new(FuzzTransport {
        event: std::sync::Mutex::new(Some(back)),
        ring_mapped: std::sync::atomic::AtomicBool::new(false),
    });
    let disk = Arc::new(MemDisk::new(DISK_BYTES));
    let device = start_device(transport, params, disk).expect("valid parameters start");
    // A stop answers everything posted before it (one ring at most) and ends the queue.
    device.stop();
    let end = device.join();

    match end {
        DeviceEnd::Fault(_) => {
            // A protocol violation (producer index too far ahead, duplicate id) shuts the
            // device down; only answered requests are published.
            assert!(ring.rsp_prod() <= req_prod.min(ring_size));
        }
        DeviceEnd::Stopped => {
            assert!(
                req_prod <= ring_size,
                "a producer index past the ring must be a fault"
            );
            assert_eq!(
                ring.rsp_prod(),
                req_prod,
                "every posted request is answered"
            );
            for (i, entry) in posted.iter().enumerate() {
                let rsp = ring.read_response(i as u32);
                assert_eq!(
                    rsp.id,
                    BlkifRequest::decode(entry).id,
                    "response {i} echoes its id"
                );
                assert!(
                    [BLKIF_RSP_OKAY, BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP].contains(&rsp.status),
                    "status {}",
                    rsp.status
                );
            }
        }
    }
}
