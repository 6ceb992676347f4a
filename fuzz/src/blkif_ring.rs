//! A hostile guest's ring: the fuzzer writes the shared ring (entries and producer index) and
//! every other page of a small grant table (indirect segment lists, data pages), then the real
//! ring engine serves it over the local transport — the same code a Xen guest reaches — until
//! it has answered what was posted.
//!
//! The engine must not crash (the grant table sits between guard pages, so a stray access
//! kills the run), must not hang, and unless it shut the device down for a protocol violation
//! it must have answered every posted request, in order, echoing each request's id.
//!
//! Input: `[flags u8][req_prod u32 LE][rsp_event u32 LE][bytes...]`; the bytes fill the ring's
//! entry area, then the table's other pages in order.
use std::sync::{Arc, OnceLock};

use parallax::{
    blkif::{
        abi::{
            BlkifRequest, EntryBytes, BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY,
            PAGE_SIZE,
        },
        local::{LocalEvent, LocalGrantTable, LocalTransport},
        mem::copy_to_guest,
        ring::SharedRing,
        start_device, DeviceEnd, DeviceParams, Features, QueueParams,
    },
    disk::MemDisk,
};

/// Grant table pages: the ring (one or two pages) and the rest for segments and data.
const TABLE_PAGES: usize = 16;
const DISK_BYTES: u64 = 1 << 20;
/// Where entries start in the shared ring page.
const ENTRIES_AT: usize = 64;
const ENTRY: usize = 112;

fn table() -> &'static Arc<LocalGrantTable> {
    static TABLE: OnceLock<Arc<LocalGrantTable>> = OnceLock::new();
    TABLE.get_or_init(|| Arc::new(LocalGrantTable::create(TABLE_PAGES).expect("memfd grant table")))
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
    // Lay the input out over the table: ring entries first, then the other pages.
    let table = table();
    let all: Vec<u32> = (0..TABLE_PAGES as u32).collect();
    let pages = table.pages_for(&all, true).expect("own table");
    let ring_refs: Vec<u32> = (0..ring_pages as u32).collect();
    let ring = SharedRing::new(Box::new(table.pages_for(&ring_refs, true).unwrap()), order)
        .expect("ring pages");
    let ring_size = ring.size();
    let mut image = vec![0u8; TABLE_PAGES * PAGE_SIZE];
    let n = body.len().min(image.len() - ENTRIES_AT);
    image[ENTRIES_AT..ENTRIES_AT + n].copy_from_slice(&body[..n]);
    image[0..4].copy_from_slice(&req_prod.to_le_bytes());
    image[4..8].copy_from_slice(&1u32.to_le_bytes()); // req_event
    image[12..16].copy_from_slice(&rsp_event.to_le_bytes());
    for (i, page) in image.chunks(PAGE_SIZE).enumerate() {
        copy_to_guest(&pages, i, 0, page);
    }
    let posted: Vec<EntryBytes> = (0..req_prod.min(ring_size))
        .map(|i| {
            let at = ENTRIES_AT + (i as usize % ring_size as usize) * ENTRY;
            image[at..at + ENTRY].try_into().unwrap()
        })
        .collect();

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
            ring_refs,
            event_channel: 0,
        }],
        protocol: None,
        read_only: flags & 32 != 0,
        features,
    };
    let (back, _front) = LocalEvent::pair().expect("eventfds");
    let transport = Arc::new(LocalTransport::new(table.clone(), vec![back]));
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
