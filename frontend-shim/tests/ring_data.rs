//! The data path through the ring on a MemDisk: every operation, indirect requests, every ring
//! order, several queues, and many more requests than ring slots (wrap-around).

use std::sync::Arc;

use frontend_shim::{verify, Frontend, FrontendConfig, IoKind, IoRequest};
use parallax::{
    blkif::{
        abi::{
            BlkifRequest, BlkifRequestIndirect, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_INDIRECT,
            BLKIF_OP_READ, BLKIF_OP_RESERVED_1, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER,
            BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY,
        },
        Features,
    },
    disk::{Disk, MemDisk},
};

fn front(disk: Arc<MemDisk>, cfg: FrontendConfig) -> Frontend {
    Frontend::in_process(disk, Features::default(), &cfg).unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn every_operation_reaches_the_disk() {
    let disk = Arc::new(MemDisk::new(8 << 20));
    let mut f = front(
        disk.clone(),
        FrontendConfig {
            indirect_segments: 256,
            ..Default::default()
        },
    );
    let q = f.queue(0);

    // Write with an offset inside the first page (first_sect = 3), read it back both ways.
    let data = pattern(5 * 512, 1);
    let c = q
        .run(&IoRequest {
            first_sect: 3,
            ..IoRequest::write(10, &data)
        })
        .unwrap();
    assert_eq!((c.status, c.operation), (BLKIF_RSP_OKAY, BLKIF_OP_WRITE));
    let mut on_disk = vec![0u8; data.len()];
    disk.read_at(&mut on_disk, 10 * 512).unwrap();
    assert_eq!(on_disk, data);
    let c = q
        .run(&IoRequest {
            first_sect: 7,
            ..IoRequest::read(10, data.len() as u64)
        })
        .unwrap();
    assert_eq!(c.data.unwrap(), data);

    // 11 full pages inline, then an indirect request of 200 pages.
    let big = pattern(11 * 4096, 2);
    assert_eq!(
        q.run(&IoRequest::write(64, &big)).unwrap().status,
        BLKIF_RSP_OKAY
    );
    assert_eq!(
        q.run(&IoRequest::read(64, big.len() as u64))
            .unwrap()
            .data
            .unwrap(),
        big
    );
    let huge = pattern(200 * 4096, 3);
    let c = q.run(&IoRequest::write(2048, &huge)).unwrap();
    // The response to an indirect request echoes the inner operation.
    assert_eq!((c.status, c.operation), (BLKIF_RSP_OKAY, BLKIF_OP_WRITE));
    let mut on_disk = vec![0u8; huge.len()];
    disk.read_at(&mut on_disk, 2048 * 512).unwrap();
    assert_eq!(on_disk, huge);
    let c = q
        .run(&IoRequest {
            force_indirect: true,
            ..IoRequest::read(2048, 4096)
        })
        .unwrap();
    assert_eq!(c.data.unwrap(), huge[..4096]);

    // Flush, flush with data, barrier with data.
    let c = q.run(&IoRequest::flush()).unwrap();
    assert_eq!(
        (c.status, c.operation),
        (BLKIF_RSP_OKAY, BLKIF_OP_FLUSH_DISKCACHE)
    );
    let d = pattern(4096, 4);
    let c = q
        .run(&IoRequest {
            kind: IoKind::Flush,
            ..IoRequest::write(100, &d)
        })
        .unwrap();
    assert_eq!(c.status, BLKIF_RSP_OKAY);
    let c = q
        .run(&IoRequest {
            kind: IoKind::Barrier,
            ..IoRequest::write(108, &d)
        })
        .unwrap();
    assert_eq!(
        (c.status, c.operation),
        (BLKIF_RSP_OKAY, BLKIF_OP_WRITE_BARRIER)
    );
    let mut on_disk = vec![0u8; 8192];
    disk.read_at(&mut on_disk, 100 * 512).unwrap();
    assert_eq!(on_disk[..4096], d[..]);
    assert_eq!(on_disk[4096..], d[..]);

    // Discard: whole blocks read back as zeros. Secure discard is refused.
    assert_eq!(
        q.run(&IoRequest::discard(2048, 16)).unwrap().status,
        BLKIF_RSP_OKAY
    );
    let c = q.run(&IoRequest::read(2048, 8192)).unwrap();
    assert!(c.data.unwrap().iter().all(|&b| b == 0));
    let c = q
        .run(&IoRequest {
            kind: IoKind::Discard { secure: true },
            ..IoRequest::discard(0, 8)
        })
        .unwrap();
    assert_eq!(c.status, BLKIF_RSP_EOPNOTSUPP);

    // Out of range, past the end and overflowing.
    let sectors = (8 << 20) / 512;
    assert_eq!(
        q.run(&IoRequest::read(sectors - 1, 1024)).unwrap().status,
        BLKIF_RSP_ERROR
    );
    assert_eq!(
        q.run(&IoRequest::read(u64::MAX, 512)).unwrap().status,
        BLKIF_RSP_ERROR
    );
    assert_eq!(
        q.run(&IoRequest::discard(u64::MAX - 2, 8)).unwrap().status,
        BLKIF_RSP_ERROR
    );
    assert_eq!(
        q.run(&IoRequest::read(sectors - 1, 512)).unwrap().status,
        BLKIF_RSP_OKAY
    );

    let stats = f.device().unwrap().stats();
    assert_eq!(stats.errors, 4);
    assert_eq!(f.detach().unwrap(), "stopped");
}

#[test]
fn unknown_operations_get_eopnotsupp() {
    let disk = Arc::new(MemDisk::new(1 << 20));
    let mut f = front(disk, FrontendConfig::default());
    let q = f.queue(0);
    for (i, op) in [BLKIF_OP_RESERVED_1, 7, 200, 255].into_iter().enumerate() {
        let r = BlkifRequest {
            operation: op,
            nr_segments: 1,
            id: 1000 + i as u64,
            ..Default::default()
        };
        let idx = q.req_prod_pvt();
        q.ring().write_entry(idx, &r.encode());
        q.set_req_prod_pvt(idx + 1);
        q.push().unwrap();
        q.kick().unwrap();
        while q.ring().rsp_prod() == idx {
            q.wait(Some(std::time::Duration::from_secs(5))).unwrap();
        }
        let rsp = q.ring().read_response(idx);
        assert_eq!(
            (rsp.id, rsp.operation, rsp.status),
            (1000 + i as u64, op, BLKIF_RSP_EOPNOTSUPP)
        );
    }
    // Indirect requests are refused when the backend offers none.
    let disk = Arc::new(MemDisk::new(1 << 20));
    let no_indirect = Features {
        max_indirect_segments: 0,
        ..Features::default()
    };
    let mut f = Frontend::in_process(disk, no_indirect, &FrontendConfig::default()).unwrap();
    let q = f.queue(0);
    let r = BlkifRequestIndirect {
        operation: BLKIF_OP_INDIRECT,
        indirect_op: BLKIF_OP_READ,
        nr_segments: 1,
        id: 5,
        ..Default::default()
    };
    q.ring().write_entry(0, &r.encode());
    q.set_req_prod_pvt(1);
    q.push().unwrap();
    while q.ring().rsp_prod() == 0 {
        q.wait(Some(std::time::Duration::from_secs(5))).unwrap();
    }
    assert_eq!(q.ring().read_response(0).status, BLKIF_RSP_EOPNOTSUPP);
}

#[test]
fn read_only_devices_refuse_writes() {
    let disk = Arc::new(MemDisk::new(1 << 20));
    disk.write_at(&[9u8; 512], 0, false).unwrap();
    let mut f = front(Arc::new(disk.snapshot()), FrontendConfig::default());
    assert!(f.read_only());
    let q = f.queue(0);
    assert_eq!(
        q.run(&IoRequest::write(0, &[1u8; 512])).unwrap().status,
        BLKIF_RSP_ERROR
    );
    assert_eq!(
        q.run(&IoRequest::discard(0, 8)).unwrap().status,
        BLKIF_RSP_ERROR
    );
    assert_eq!(
        q.run(&IoRequest::read(0, 512)).unwrap().data.unwrap(),
        vec![9u8; 512]
    );
    assert_eq!(q.run(&IoRequest::flush()).unwrap().status, BLKIF_RSP_OKAY);
    // Asking for read-only on a writable disk works the same way.
    let mut f = front(
        disk,
        FrontendConfig {
            read_only: true,
            ..Default::default()
        },
    );
    assert_eq!(
        f.queue(0)
            .run(&IoRequest::write(0, &[1u8; 512]))
            .unwrap()
            .status,
        BLKIF_RSP_ERROR
    );
}

#[test]
fn verify_every_ring_order_with_wraparound() {
    for order in 0..=4u32 {
        let disk = Arc::new(MemDisk::new(16 << 20));
        let ring = 32usize << order;
        let cfg = FrontendConfig {
            ring_order: order,
            depth: Some(ring),
            indirect_segments: 32,
            ..Default::default()
        };
        let mut f = front(disk, cfg);
        assert_eq!(f.queues()[0].ring_size() as usize, ring);
        // Several times the ring size: the ring indexes wrap many times.
        let ops = (ring * 6) as u64;
        let r = verify::run(
            &mut f,
            &verify::VerifyConfig {
                ops,
                seed: u64::from(order),
                span: Some(4 << 20),
            },
        )
        .unwrap();
        assert_eq!(r.ops, ops);
        assert!(
            r.reads > 0 && r.writes > 0 && r.flushes > 0 && r.discards > 0,
            "{r:?}"
        );
        assert!(f.queues()[0].req_prod_pvt() as usize >= 5 * ring);
        assert_eq!(f.device().unwrap().fault(), None);
    }
}

#[test]
fn verify_multiple_queues_and_indirect() {
    let disk = Arc::new(MemDisk::new(32 << 20));
    let cfg = FrontendConfig {
        ring_order: 1,
        queues: 4,
        indirect_segments: 256,
        depth: Some(16),
        ..Default::default()
    };
    let mut f = front(disk.clone(), cfg);
    assert_eq!(f.queues().len(), 4);
    let r = verify::run(
        &mut f,
        &verify::VerifyConfig {
            ops: 3000,
            seed: 7,
            span: None,
        },
    )
    .unwrap();
    assert!(r.per_queue.iter().all(|&n| n > 200), "{r:?}");
    assert!(
        r.indirect > 100 && r.barriers > 0 && r.expected_errors > 0,
        "{r:?}"
    );
    // More queues than offered are clamped.
    let few = Features {
        max_queues: 2,
        ..Features::default()
    };
    let f = Frontend::in_process(
        disk,
        few,
        &FrontendConfig {
            queues: 8,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(f.queues().len(), 2);
}

/// With persistent grants each slot's pages are mapped once and kept: the data is the same
/// as without (verify checks every byte, with multi-page and indirect requests going through
/// the bounce path), and the grants mapped stop growing with the requests.
#[test]
fn persistent_grants_are_mapped_once_and_keep_the_data_right() {
    let mut maps = Vec::new();
    for persistent in [false, true] {
        let disk = Arc::new(MemDisk::new(32 << 20));
        let cfg = FrontendConfig {
            ring_order: 1,
            queues: 2,
            indirect_segments: 64,
            depth: Some(8),
            persistent,
            ..Default::default()
        };
        let mut f = front(disk, cfg);
        let r = verify::run(
            &mut f,
            &verify::VerifyConfig {
                ops: 2000,
                seed: 11,
                span: Some(8 << 20),
            },
        )
        .unwrap();
        assert!(r.indirect > 50 && r.reads > 300, "{r:?}");
        let stats = f.device().unwrap().stats();
        assert_eq!(f.device().unwrap().fault(), None);
        maps.push(stats.grant_maps);
    }
    // 2 queues x 8 slots x (64 data + 1 indirect page) grants at most, against at least one
    // map per request without the feature.
    assert!(maps[0] >= 2000, "{maps:?}");
    assert!(maps[1] <= 2 * 8 * 65, "{maps:?}");
}

#[test]
fn stop_answers_what_was_posted() {
    let disk = Arc::new(MemDisk::new(1 << 20));
    let mut f = front(
        disk,
        FrontendConfig {
            depth: Some(32),
            ..Default::default()
        },
    );
    let stop = f.device().unwrap().stop_signal();
    let q = f.queue(0);
    // Post requests without kicking: the backend only finds them when asked to stop.
    for i in 0..20u64 {
        q.submit(&IoRequest::read(i * 8, 4096)).unwrap();
    }
    q.ring().set_req_prod(q.req_prod_pvt());
    stop.signal();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut done = Vec::new();
    while done.len() < 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "stopped device left requests unanswered"
        );
        match q.wait(Some(std::time::Duration::from_millis(100))) {
            Ok(_) | Err(frontend_shim::FrontError::BackendGone) => {}
            Err(e) => panic!("{e}"),
        }
        q.poll(&mut done).unwrap();
    }
    assert!(done.iter().all(|c| c.status == BLKIF_RSP_OKAY));
    assert_eq!(f.detach().unwrap(), "stopped");
}
