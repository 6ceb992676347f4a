//! The migration protocol between two in-memory stores, with the destination failing at each
//! step, and power cuts on the source: at every instant one host owns the VDI, and it is whole.

use std::{io, sync::Arc};

use rand::{rngs::SmallRng, Rng, SeedableRng};

use super::*;
use crate::store::{
    device::{CrashDevice, Device, MemDevice},
    StoreOptions,
};

const MIB: u64 = 1 << 20;

fn store_on(dev: Arc<dyn Device>) -> Arc<Store> {
    let len = dev.len();
    Store::format(&*dev, len).unwrap();
    Store::open_device(dev, StoreOptions::default()).unwrap()
}

fn mem_store() -> Arc<Store> {
    store_on(Arc::new(MemDevice::new(64 * MIB)))
}

fn read_all(s: &Arc<Store>, name: &str) -> Vec<u8> {
    let d = s.open_vdi(name, false).unwrap();
    let mut buf = vec![0u8; d.size() as usize];
    d.read(&mut buf, 0).unwrap();
    buf
}

fn assert_clean(s: &Store) {
    let r = s.check(true, &mut |_| {}).unwrap();
    assert!(r.ok, "check found damage: {r:#?}");
}

/// The names the store lists, and `vm`'s hidden migration names if it has them.
fn names(s: &Store) -> Vec<String> {
    let mut out: Vec<String> = s.list().unwrap().into_iter().map(|v| v.name).collect();
    for hidden in [".migrating:vm", ".incoming:vm"] {
        if s.stat(hidden).is_ok() {
            out.push(hidden.to_string());
        }
    }
    out.sort();
    out
}

/// Writes `fill` into blocks `blocks` of `vm` and flushes.
fn write(s: &Arc<Store>, name: &str, blocks: std::ops::Range<u64>, fill: u8) {
    let d = s.open_vdi(name, true).unwrap();
    for b in blocks {
        d.write(&[fill; 4096], b * 4096, false).unwrap();
    }
    s.flush().unwrap();
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fault {
    None,
    /// The final stream never reaches the destination.
    FinalLost,
    /// The destination commits, but its answer is lost.
    AnswerLost,
    /// The final stream is held back (still in flight) and the connection fails.
    FinalDelayed,
}

/// The destination in-process: streams go through a buffer.
struct Local {
    store: Arc<Store>,
    arrivals: Arc<Arrivals>,
    fault: Fault,
    /// After the bulk copy (the VM still writing on the source), run this.
    after_bulk: Option<Box<dyn FnMut()>>,
    /// Aborts fail (the destination cannot be reached any more).
    unreachable: bool,
    /// A final stream held back by [`Fault::FinalDelayed`].
    held: Option<Vec<u8>>,
}

impl Local {
    fn new(store: &Arc<Store>, fault: Fault) -> Local {
        Local {
            store: store.clone(),
            arrivals: Arc::new(Arrivals::default()),
            fault,
            after_bulk: None,
            unreachable: false,
            held: None,
        }
    }
}

fn lost() -> StoreError {
    StoreError::Peer("connection reset".into())
}

impl Destination for Local {
    fn describe(&self) -> String {
        "dest.example:10810".into()
    }

    fn receive_full(&mut self, name: &str, send: &mut StreamBody<'_>) -> StoreResult<RecvReport> {
        let mut buf = Vec::new();
        send(&mut buf)?;
        let r = self
            .arrivals
            .receive_full(&self.store, name, &mut &buf[..])?;
        if let Some(f) = &mut self.after_bulk {
            f();
        }
        Ok(r)
    }

    fn receive_final(
        &mut self,
        name: &str,
        migration: u64,
        send: &mut StreamBody<'_>,
    ) -> StoreResult<RecvReport> {
        let mut buf = Vec::new();
        send(&mut buf)?;
        match self.fault {
            Fault::FinalLost => Err(lost()),
            Fault::FinalDelayed => {
                self.held = Some(buf);
                Err(lost())
            }
            Fault::AnswerLost => {
                self.arrivals
                    .receive_final(&self.store, name, migration, &mut &buf[..])?;
                Err(lost())
            }
            Fault::None => self
                .arrivals
                .receive_final(&self.store, name, migration, &mut &buf[..]),
        }
    }

    fn abort(
        &mut self,
        name: &str,
        migration: u64,
        final_snapshot: Option<(&str, u64)>,
    ) -> StoreResult<AbortOutcome> {
        if self.unreachable {
            return Err(lost());
        }
        self.arrivals
            .abort(&self.store, name, migration, final_snapshot)
    }
}

fn opts() -> MigrateOptions {
    MigrateOptions::default()
}

fn no_progress() -> impl FnMut(u64, u64) -> StoreResult<()> {
    |_, _| Ok(())
}

#[test]
fn a_vdi_moves_with_what_was_written_during_the_copy_and_its_clients_are_detached() {
    let (src, dst) = (mem_store(), mem_store());
    src.create_vdi("vm", 4 * MIB).unwrap();
    write(&src, "vm", 0..64, 0x11);
    let client = src.open_vdi("vm", true).unwrap();
    let mut dest = Local::new(&dst, Fault::None);
    let during = src.clone();
    // The VM keeps writing while the bulk copy runs: the delta carries it.
    dest.after_bulk = Some(Box::new(move || write(&during, "vm", 10..20, 0x22)));
    let r = migrate(&src, "vm", &mut dest, &opts(), &mut no_progress()).unwrap();
    assert_eq!(r.bulk_bytes, 64 * 4096);
    assert_eq!(
        r.delta_bytes,
        10 * 4096,
        "only what changed crosses at the switch-over"
    );
    assert_eq!(r.detached, 1);
    let mut want = vec![0u8; 4 * MIB as usize];
    want[..64 * 4096].fill(0x11);
    want[10 * 4096..20 * 4096].fill(0x22);
    assert_eq!(read_all(&dst, "vm"), want);
    // The client here is cut off: its writes cannot land anywhere.
    assert!(matches!(
        client.write(&[1; 4096], 0, false),
        Err(StoreError::Detached(_))
    ));
    assert_eq!(names(&src), Vec::<String>::new(), "nothing is left here");
    assert_eq!(names(&dst), ["vm".to_string(), r.arrived.clone()]);
    // The destination's copy is a writable VDI of its own.
    write(&dst, "vm", 0..1, 0x33);
    assert_clean(&src);
    assert_clean(&dst);
}

#[test]
fn a_final_step_that_never_arrived_gives_the_vdi_back() {
    let (src, dst) = (mem_store(), mem_store());
    src.create_vdi("vm", 2 * MIB).unwrap();
    write(&src, "vm", 0..8, 0x44);
    let before = read_all(&src, "vm");
    let mut dest = Local::new(&dst, Fault::FinalLost);
    let e = migrate(&src, "vm", &mut dest, &opts(), &mut no_progress()).unwrap_err();
    assert!(e.to_string().contains("stays on this host"), "{e}");
    assert_eq!(
        names(&src),
        ["vm"],
        "back under its name, without the migration's snapshots"
    );
    assert_eq!(read_all(&src, "vm"), before);
    write(&src, "vm", 0..1, 0x45);
    assert_eq!(
        names(&dst),
        Vec::<String>::new(),
        "the copy there is dropped"
    );
    assert_clean(&src);
    assert_clean(&dst);
    // And it can go again.
    let mut dest = Local::new(&dst, Fault::None);
    migrate(&src, "vm", &mut dest, &opts(), &mut no_progress()).unwrap();
    assert_eq!(read_all(&dst, "vm")[..4096], [0x45; 4096]);
}

#[test]
fn a_lost_answer_after_the_commit_finishes_the_move() {
    let (src, dst) = (mem_store(), mem_store());
    src.create_vdi("vm", 2 * MIB).unwrap();
    write(&src, "vm", 0..8, 0x55);
    let want = read_all(&src, "vm");
    let mut dest = Local::new(&dst, Fault::AnswerLost);
    let r = migrate(&src, "vm", &mut dest, &opts(), &mut no_progress()).unwrap();
    assert_eq!(r.name, "vm");
    assert_eq!(names(&src), Vec::<String>::new());
    assert_eq!(read_all(&dst, "vm"), want);
    assert_clean(&src);
    assert_clean(&dst);
}

#[test]
fn a_final_stream_still_in_flight_cannot_publish_after_an_abort() {
    let (src, dst) = (mem_store(), mem_store());
    src.create_vdi("vm", 2 * MIB).unwrap();
    write(&src, "vm", 0..8, 0x66);
    let mut dest = Local::new(&dst, Fault::FinalDelayed);
    dest.unreachable = true;
    migrate(&src, "vm", &mut dest, &opts(), &mut no_progress()).unwrap_err();
    assert_eq!(names(&src), [".migrating:vm"]);
    // The held-back stream arrives late, racing the abort of a rerun: the fence refuses it,
    // so vm is never owned twice.
    let held = dest.held.take().unwrap();
    let migration = {
        // Its base is the bulk snapshot, whose guid names the migration; find it in the
        // stream's header the way the destination would.
        let r = crate::stream::wire::StreamReader::new(&held[..]).unwrap();
        r.header().base.clone().unwrap().guid
    };
    // Most of it is in when the abort comes.
    let (mut reader, mut writer) = std::io::pipe().unwrap();
    let (arrivals, store) = (dest.arrivals.clone(), dst.clone());
    let late =
        std::thread::spawn(move || arrivals.receive_final(&store, "vm", migration, &mut reader));
    // All but its last bytes: the receive has read the header and made its fork.
    let half = held.len() - 10;
    io::Write::write_all(&mut writer, &held[..half]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let outcome = dest.arrivals.abort(&dst, "vm", migration, None).unwrap();
    assert_eq!(outcome, AbortOutcome::Aborted);
    io::Write::write_all(&mut writer, &held[half..]).unwrap();
    drop(writer);
    let e = late.join().unwrap().unwrap_err();
    assert!(e.to_string().contains("aborted"), "{e}");
    assert!(
        dst.stat("vm").is_err(),
        "vm must not appear on the destination"
    );
    assert_clean(&dst);
    // The rerun gives it back here, then moves it.
    dest.unreachable = false;
    dest.fault = Fault::None;
    let r = migrate(&src, "vm", &mut dest, &opts(), &mut no_progress()).unwrap();
    assert!(r.resumed.is_some());
    assert_eq!(read_all(&dst, "vm")[..4096], [0x66; 4096]);
}

#[test]
fn an_unreachable_destination_leaves_the_vdi_parked_until_the_command_runs_again() {
    for committed in [false, true] {
        let (src, dst) = (mem_store(), mem_store());
        src.create_vdi("vm", 2 * MIB).unwrap();
        write(&src, "vm", 0..8, 0x77);
        let want = read_all(&src, "vm");
        let fault = if committed {
            Fault::AnswerLost
        } else {
            Fault::FinalLost
        };
        let mut dest = Local::new(&dst, fault);
        dest.unreachable = true;
        let e = migrate(&src, "vm", &mut dest, &opts(), &mut no_progress()).unwrap_err();
        assert!(e.to_string().contains("run the same command again"), "{e}");
        assert_eq!(
            names(&src),
            [".migrating:vm"],
            "parked: nobody writes it here"
        );
        assert!(src.open_vdi("vm", true).is_err());

        // Aimed at another host, the rerun is refused: only the first can say what happened.
        struct Elsewhere;
        impl Destination for Elsewhere {
            fn describe(&self) -> String {
                "other.example:10810".into()
            }
            fn receive_full(&mut self, _: &str, _: &mut StreamBody<'_>) -> StoreResult<RecvReport> {
                unreachable!()
            }
            fn receive_final(
                &mut self,
                _: &str,
                _: u64,
                _: &mut StreamBody<'_>,
            ) -> StoreResult<RecvReport> {
                unreachable!()
            }
            fn abort(
                &mut self,
                _: &str,
                _: u64,
                _: Option<(&str, u64)>,
            ) -> StoreResult<AbortOutcome> {
                unreachable!()
            }
        }
        let e = migrate(&src, "vm", &mut Elsewhere, &opts(), &mut no_progress()).unwrap_err();
        assert!(e.to_string().contains("dest.example"), "{e}");

        // The destination answers again: the rerun finishes (it had committed) or undoes and
        // then moves the VDI.
        let mut dest = Local {
            fault: Fault::None,
            unreachable: false,
            ..dest
        };
        let r = migrate(&src, "vm", &mut dest, &opts(), &mut no_progress()).unwrap();
        assert!(r.resumed.is_some(), "{r:?}");
        assert_eq!(names(&src), Vec::<String>::new());
        assert_eq!(read_all(&dst, "vm"), want, "committed: {committed}");
        assert_clean(&src);
        assert_clean(&dst);
    }
}

#[test]
fn refusals_change_nothing() {
    let (src, dst) = (mem_store(), mem_store());
    src.create_vdi("vm", MIB).unwrap();
    dst.create_vdi("vm", MIB).unwrap();
    let mut dest = Local::new(&dst, Fault::None);
    let e = migrate(&src, "vm", &mut dest, &opts(), &mut no_progress()).unwrap_err();
    assert!(matches!(e, StoreError::Exists(_)), "{e}");
    assert_eq!(names(&src), ["vm"], "the bulk snapshot is deleted again");
    assert_eq!(names(&dst), ["vm"]);

    // Snapshots do not move: refused unless they may be deleted here.
    let other = mem_store();
    src.snapshot("vm", "keep").unwrap();
    let mut dest = Local::new(&other, Fault::None);
    let e = migrate(&src, "vm", &mut dest, &opts(), &mut no_progress()).unwrap_err();
    assert!(e.to_string().contains("vm@keep"), "{e}");
    let r = migrate(
        &src,
        "vm",
        &mut dest,
        &MigrateOptions {
            delete_snapshots: true,
        },
        &mut no_progress(),
    )
    .unwrap();
    assert_eq!(r.deleted_snapshots, ["vm@keep"]);
    assert_eq!(names(&src), Vec::<String>::new());

    let e = migrate(&src, "nope", &mut dest, &opts(), &mut no_progress()).unwrap_err();
    assert!(matches!(e, StoreError::NotFound(_)), "{e}");
}

/// One migration with the source's power cut after `cut` device operations (or none):
/// afterwards exactly one of the two hosts owns `vm`, whole, and a rerun completes the move.
fn crash_case(seed: u64, cut: Option<u64>) -> u64 {
    let dev = Arc::new(CrashDevice::new(32 * MIB));
    let src = store_on(dev.clone());
    let dst = mem_store();
    src.create_vdi("vm", 2 * MIB).unwrap();
    let mut rng = SmallRng::seed_from_u64(seed);
    let d = src.open_vdi("vm", true).unwrap();
    for _ in 0..24 {
        let b = rng.random_range(0..512u64);
        d.write(&[rng.random::<u8>() | 1; 4096], b * 4096, false)
            .unwrap();
    }
    drop(d);
    src.flush().unwrap();
    let want = read_all(&src, "vm");
    dev.sync().unwrap();
    let start = dev.ops();
    if let Some(c) = cut {
        dev.cut_after(c);
    }
    let mut dest = Local::new(&dst, Fault::None);
    let arrivals = dest.arrivals.clone();
    let done = migrate(&src, "vm", &mut dest, &opts(), &mut no_progress()).is_ok();
    let ops = dev.ops() - start;
    drop(src);
    let ctx = format!("seed {seed} cut {cut:?}");
    let src = Store::open_device(Arc::new(dev.after_crash(seed ^ 0x5eed)), Default::default())
        .unwrap_or_else(|e| panic!("{ctx}: reopen: {e}"));
    assert_clean(&src);
    let here = src.stat("vm").is_ok();
    let parked = src.is_parked("vm");
    let there = dst.stat("vm").is_ok();
    assert!(
        !(here && there),
        "{ctx}: both hosts own vm (here {here}, parked {parked}, there {there})"
    );
    assert!(here || parked || there, "{ctx}: vm is lost");
    if done {
        assert!(
            there && !here,
            "{ctx}: the migration returned, so it is durable"
        );
    }
    // Rerunning the command (the destination process kept running) finishes the move.
    if !there || parked {
        let mut dest = Local {
            arrivals,
            ..Local::new(&dst, Fault::None)
        };
        migrate(&src, "vm", &mut dest, &opts(), &mut no_progress())
            .unwrap_or_else(|e| panic!("{ctx}: rerun: {e}"));
    }
    assert_eq!(read_all(&dst, "vm"), want, "{ctx}");
    assert!(src.stat("vm").is_err() && !src.is_parked("vm"), "{ctx}");
    assert_clean(&src);
    assert_clean(&dst);
    ops
}

#[test]
fn power_cuts_on_the_source_never_leave_two_owners_or_none() {
    let total = crash_case(1, None);
    assert!(total >= 5, "too few operations ({total})");
    // Every cut point (each is a log write or a sync), with a few ways the unsynced writes
    // can land.
    for cut in 0..=total {
        for seed in 0..4 {
            crash_case(100 * cut + seed, Some(cut));
        }
    }
}
