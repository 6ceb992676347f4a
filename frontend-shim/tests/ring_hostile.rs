//! A hostile guest: random garbage and adversarial values in ring slots, indexes and indirect
//! pages. The backend must never crash, never touch memory outside the grant table (the
//! backend maps it between guard pages, so a stray access would kill this test process),
//! answer with errors or shut the device down, never hang, and a second device in the same
//! process must keep serving correct data throughout.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use frontend_shim::{verify, FrontQueue, Frontend, FrontendConfig};
use parallax::{
    blkif::{
        abi::{
            BlkifRequest, BlkifRequestDiscard, BlkifRequestIndirect, BlkifRequestSegment,
            EntryBytes, PAGE_SIZE,
        },
        mem::copy_to_guest,
        Features,
    },
    disk::MemDisk,
};
use proptest::prelude::*;

const DISK: u64 = 4 << 20;

/// One round of the hostile guest: fill some slots, scribble on some pages, publish.
#[derive(Debug, Clone)]
struct Round {
    entries: Vec<Entry>,
    pages: Vec<PageAct>,
    publish: Publish,
    events: Option<(u32, u32)>,
}

#[derive(Debug, Clone)]
enum PageAct {
    /// Random bytes at an offset of a page of the table.
    Bytes {
        page: u32,
        offset: u16,
        bytes: Vec<u8>,
    },
    /// A list of (often plausible) segments at the start of a page (indirect pages).
    Segments { page: u32, segs: Vec<(u32, u8, u8)> },
}

#[derive(Debug, Clone)]
enum Publish {
    /// Exactly the entries written this round.
    Exact,
    /// Any producer index change, however absurd.
    Delta(u32),
}

#[derive(Debug, Clone)]
enum Entry {
    Raw(Vec<u8>),
    Rw {
        op: u8,
        nr: u8,
        id: u64,
        sector: u64,
        segs: Vec<(u32, u8, u8)>,
    },
    Discard {
        flag: u8,
        id: u64,
        sector: u64,
        nr: u64,
    },
    Indirect {
        op: u8,
        nr: u16,
        id: u64,
        sector: u64,
        grefs: Vec<u32>,
    },
}

fn gref() -> impl Strategy<Value = u32> {
    // Valid pages (the table is a few thousand pages), the edges, and anything.
    // Page 0 is the ring itself: a guest may grant it as a data buffer, too.
    prop_oneof![6 => 1u32..600, 1 => Just(0), 1 => 515u32..530, 1 => Just(u32::MAX), 1 => any::<u32>()]
}

fn sector() -> impl Strategy<Value = u64> {
    let last = DISK / 512;
    prop_oneof![
        0u64..last,
        Just(last - 1),
        Just(last),
        Just(u64::MAX),
        Just(u64::MAX / 512),
        any::<u64>()
    ]
}

fn entry() -> impl Strategy<Value = Entry> {
    // Plausible reads and writes (in range, valid segments) keep real I/O in the mix.
    let plausible = (
        0u8..2,
        any::<u64>(),
        0u64..(DISK / 512 - 100),
        proptest::collection::vec((1u32..520, 0u8..4, 4u8..8), 11),
        1u8..12,
    )
        .prop_map(|(op, id, sector, segs, nr)| Entry::Rw {
            op,
            nr,
            id,
            sector,
            segs,
        });
    // Indirect requests naming the slots' indirect pages (65, 130, ...).
    let plausible_indirect = (
        0u8..2,
        1u16..64,
        any::<u64>(),
        0u64..(DISK / 512 - 600),
        1u32..9,
    )
        .prop_map(|(op, nr, id, sector, k)| Entry::Indirect {
            op,
            nr,
            id,
            sector,
            grefs: vec![65 * k; 8],
        });
    prop_oneof![
        3 => plausible,
        2 => plausible_indirect,
        1 => proptest::collection::vec(any::<u8>(), 112).prop_map(Entry::Raw),
        1 => (0u8..8, 0u8..14, any::<u64>(), sector(), proptest::collection::vec((gref(), 0u8..10, 0u8..10), 11))
            .prop_map(|(op, nr, id, sector, segs)| Entry::Rw { op, nr, id, sector, segs }),
        1 => (0u8..3, any::<u64>(), sector(), prop_oneof![0u64..64, any::<u64>()])
            .prop_map(|(flag, id, sector, nr)| Entry::Discard { flag, id, sector, nr }),
        1 => (0u8..8, prop_oneof![0u16..40, 0u16..600, any::<u16>()], any::<u64>(), sector(), proptest::collection::vec(gref(), 8))
            .prop_map(|(op, nr, id, sector, grefs)| Entry::Indirect { op, nr, id, sector, grefs }),
    ]
}

fn round() -> impl Strategy<Value = Round> {
    let page_act = prop_oneof![
        (
            0u32..600,
            (0u16..512).prop_map(|o| o * 8),
            proptest::collection::vec(any::<u8>(), 8..64)
        )
            .prop_map(|(page, offset, bytes)| PageAct::Bytes {
                page,
                offset,
                bytes
            }),
        (
            prop_oneof![0u32..600, (1u32..9).prop_map(|k| 65 * k)],
            proptest::collection::vec((gref(), 0u8..9, 0u8..9), 1..80)
        )
            .prop_map(|(page, segs)| PageAct::Segments { page, segs }),
    ];
    let publish = prop_oneof![18 => Just(Publish::Exact), 1 => any::<u32>().prop_map(Publish::Delta), 1 => (0u32..40).prop_map(Publish::Delta)];
    (
        proptest::collection::vec(entry(), 1..9),
        proptest::collection::vec(page_act, 0..3),
        publish,
        proptest::option::weighted(0.1, (any::<u32>(), any::<u32>())),
    )
        .prop_map(|(entries, pages, publish, events)| Round {
            entries,
            pages,
            publish,
            events,
        })
}

fn encode(e: &Entry) -> EntryBytes {
    match e {
        Entry::Raw(b) => {
            let mut out = [0u8; 112];
            out.copy_from_slice(b);
            out
        }
        Entry::Rw {
            op,
            nr,
            id,
            sector,
            segs,
        } => {
            let mut r = BlkifRequest {
                operation: *op,
                nr_segments: *nr,
                id: *id,
                sector_number: *sector,
                ..Default::default()
            };
            for (s, &(gref, first_sect, last_sect)) in r.seg.iter_mut().zip(segs) {
                *s = BlkifRequestSegment {
                    gref,
                    first_sect,
                    last_sect,
                };
            }
            r.encode()
        }
        Entry::Discard {
            flag,
            id,
            sector,
            nr,
        } => BlkifRequestDiscard {
            operation: 5,
            flag: *flag,
            handle: 0,
            id: *id,
            sector_number: *sector,
            nr_sectors: *nr,
        }
        .encode(),
        Entry::Indirect {
            op,
            nr,
            id,
            sector,
            grefs,
        } => {
            let mut g = [0u32; 8];
            g.copy_from_slice(grefs);
            BlkifRequestIndirect {
                operation: 6,
                indirect_op: *op,
                nr_segments: *nr,
                id: *id,
                sector_number: *sector,
                handle: 0,
                indirect_grefs: g,
            }
            .encode()
        }
    }
}

/// Waits until the backend answered everything published, or shut the device down.
fn settle(f: &Frontend, published: u32) {
    let q = &f.queues()[0];
    let dev = f.device().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if dev.fault().is_some() || q.ring().rsp_prod() == published {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "backend neither answered nor shut down (req_prod {published}, rsp_prod {})",
            q.ring().rsp_prod()
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Plays `rounds`; returns how many requests were answered.
fn run_hostile(f: &mut Frontend, rounds: &[Round]) -> u32 {
    let table = f.table().clone();
    let pages = table.pages() as u32;
    let ring_size = f.queues()[0].ring_size();
    let mut published = 0u32;
    let mut answered = 0u32;
    let mut answered_total = 0u64;
    for r in rounds {
        if f.device().unwrap().fault().is_some() {
            break;
        }
        let q: &mut FrontQueue = f.queue(0);
        for (i, e) in r.entries.iter().enumerate() {
            q.ring()
                .write_entry(published.wrapping_add(i as u32), &encode(e));
        }
        for p in &r.pages {
            let (page, offset, bytes) = match p {
                PageAct::Bytes {
                    page,
                    offset,
                    bytes,
                } => (*page, usize::from(*offset), bytes.clone()),
                PageAct::Segments { page, segs } => (
                    *page,
                    0,
                    segs.iter()
                        .flat_map(|&(gref, first_sect, last_sect)| {
                            BlkifRequestSegment {
                                gref,
                                first_sect,
                                last_sect,
                            }
                            .encode()
                        })
                        .collect(),
                ),
            };
            // Whole words only (the helpers copy 8 bytes at a time).
            let n = bytes.len() / 8 * 8;
            let off = offset.min(PAGE_SIZE - n);
            let mapped = table.pages_for(&[page % pages], true).unwrap();
            copy_to_guest(&mapped, 0, off, &bytes[..n]);
        }
        if let Some((req_event, rsp_event)) = r.events {
            q.ring().set_req_event(req_event);
            q.ring().set_rsp_event(rsp_event);
        }
        published = match r.publish {
            Publish::Exact => published.wrapping_add(r.entries.len() as u32),
            Publish::Delta(d) => published.wrapping_add(d),
        };
        q.ring().set_req_prod(published);
        q.kick().unwrap();
        settle(f, published);
        if f.device().unwrap().fault().is_none() {
            // Every request published was answered exactly once, never more. (Response
            // slots themselves may have been overwritten since: a guest can grant its own
            // ring page as a READ buffer.)
            let q = &f.queues()[0];
            let rsp = q.ring().rsp_prod();
            assert_eq!(rsp, published);
            assert!(rsp.wrapping_sub(answered) <= ring_size);
            let total = f.device().unwrap().stats().requests;
            assert_eq!(
                total,
                answered_total + u64::from(rsp.wrapping_sub(answered))
            );
            answered_total = total;
            answered = rsp;
        }
    }
    answered
}

fn devices() -> (Frontend, Frontend) {
    let hostile = Frontend::in_process(
        Arc::new(MemDisk::new(DISK)),
        Features::default(),
        &FrontendConfig {
            ring_order: 0,
            indirect_segments: 64,
            depth: Some(8),
            ..Default::default()
        },
    )
    .unwrap();
    let victim = Frontend::in_process(
        Arc::new(MemDisk::new(DISK)),
        Features::default(),
        &FrontendConfig {
            indirect_segments: 32,
            ..Default::default()
        },
    )
    .unwrap();
    (hostile, victim)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn hostile_guest_cannot_hurt_the_backend(rounds in proptest::collection::vec(round(), 1..30), seed in any::<u64>()) {
        let (mut hostile, mut victim) = devices();
        std::thread::scope(|s| {
            let v = s.spawn(|| verify::run(&mut victim, &verify::VerifyConfig { ops: 300, seed, span: None }));
            run_hostile(&mut hostile, &rounds);
            let report = v.join().unwrap().expect("the other device keeps serving correct data");
            assert_eq!(report.ops, 300);
        });
        // The hostile device stops cleanly whatever state it is in.
        hostile.detach().unwrap();
        victim.detach().unwrap();
    }
}

#[test]
fn protocol_violations_shut_the_device_down() {
    // req_prod more than a ring ahead.
    let (mut f, _) = devices();
    let q = f.queue(0);
    q.ring().set_req_prod(33);
    q.kick().unwrap();
    settle(&f, 33);
    let why = f.device().unwrap().fault().expect("device shut down");
    assert!(why.contains("more than the ring"), "{why}");

    // The same id twice in one batch.
    let (mut f, _) = devices();
    let q = f.queue(0);
    let r = BlkifRequest {
        operation: 0,
        nr_segments: 1,
        id: 42,
        ..Default::default()
    };
    q.ring().write_entry(0, &r.encode());
    q.ring().write_entry(1, &r.encode());
    q.ring().set_req_prod(2);
    q.kick().unwrap();
    settle(&f, 2);
    let why = f.device().unwrap().fault().expect("device shut down");
    assert!(why.contains("already in flight"), "{why}");
    assert!(f.detach().unwrap().contains("already in flight"));
}

#[test]
fn scribbling_guest_while_requests_run() {
    let (mut hostile, mut victim) = devices();
    let table = hostile.table().clone();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        // Flips bytes all over the hostile device's ring and data pages, concurrently with
        // its own well-formed traffic.
        let scribbler = s.spawn(|| {
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let page = (x % table.pages() as u64) as u32;
                let off = ((x >> 20) % 512) as usize * 8;
                // The ring indexes (page 0, first 16 bytes) are left alone here: a lost
                // kick would only make this test wait (index garbage is the proptest's job).
                if page == 0 && off < 16 {
                    continue;
                }
                let p = table.pages_for(&[page], true).unwrap();
                copy_to_guest(&p, 0, off, &x.to_le_bytes());
            }
        });
        let v = s.spawn(|| {
            verify::run(
                &mut victim,
                &verify::VerifyConfig {
                    ops: 2000,
                    seed: 9,
                    span: None,
                },
            )
        });
        // The hostile device's own verify may fail in any way (its memory is being
        // scribbled on); it must not crash or hang the backend.
        for seed in 0..20 {
            if hostile.device().unwrap().fault().is_some() {
                break;
            }
            if verify::run(
                &mut hostile,
                &verify::VerifyConfig {
                    ops: 200,
                    seed,
                    span: None,
                },
            )
            .is_err()
            {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        scribbler.join().unwrap();
        assert_eq!(v.join().unwrap().unwrap().ops, 2000);
    });
    hostile.detach().unwrap();
    victim.detach().unwrap();
}
