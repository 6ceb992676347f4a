//! The xenbus backend against an in-memory xenstore: the toolstack and the guest are played
//! by writing nodes the way libxl and blkfront do; rings are real (local transport).

use std::sync::Arc;

use proptest::prelude::*;

use super::{
    backend::{BackendSettings, Driver},
    connect::LocalDomains,
    store::{MemStore, XenStore},
    vbd::{VbdConfig, STATUS_NODE},
};
use crate::{
    blkif::{
        features::Features,
        local::{LocalEvent, LocalGrantTable, MAX_TABLE_PAGES},
    },
    disk::{MemDisk, MemProvider},
};

const MIB: u64 = 1 << 20;

struct Rig {
    s: MemStore,
    local: LocalDomains,
    provider: Arc<MemProvider>,
    disk: Arc<MemDisk>,
    d: Driver<MemStore>,
    /// Guest ends of event channels, kept alive like a guest would.
    guest_events: Vec<LocalEvent>,
}

fn be(kind: &str, dom: u32, dev: u32) -> String {
    format!("/local/domain/0/backend/{kind}/{dom}/{dev}")
}

fn fe(dom: u32, dev: u32) -> String {
    format!("/local/domain/{dom}/device/vbd/{dev}")
}

impl Rig {
    fn new() -> Rig {
        let s = MemStore::new();
        let local = LocalDomains::new();
        let provider = Arc::new(MemProvider::new());
        let disk = provider.add("vm1", MemDisk::new(8 * MIB));
        provider.add("other", MemDisk::new(4 * MIB));
        provider.add("gold@s1", MemDisk::new(2 * MIB).snapshot());
        let settings = BackendSettings {
            vbd: VbdConfig {
                backend_domid: 0,
                features: Features::default(),
                scripts: vec!["block-parallax".into()],
            },
            kinds: vec!["vbd".into(), "vbd3".into()],
        };
        let mut d = Driver::new(
            s.clone(),
            settings,
            provider.clone(),
            Arc::new(local.clone()),
        );
        d.watch().unwrap();
        d.run_pending().unwrap();
        Rig {
            s,
            local,
            provider,
            disk,
            d,
            guest_events: Vec::new(),
        }
    }

    fn step(&mut self) {
        self.d.run_pending().unwrap();
        assert_eq!(self.s.pending_events(), 0);
    }

    /// What libxl 4.17 writes for `script=block-parallax,target=PARAMS` (in one transaction).
    fn add(&mut self, kind: &str, dom: u32, dev: u32, params: &str, extra: &[(&str, &str)]) {
        let b = be(kind, dom, dev);
        let f = fe(dom, dev);
        let mut nodes = vec![
            ("frontend", f.clone()),
            ("frontend-id", dom.to_string()),
            ("params", params.to_string()),
            ("script", "/etc/xen/scripts/block-parallax".to_string()),
            ("online", "1".into()),
            ("removable", "0".into()),
            ("bootable", "1".into()),
            ("type", "phy".into()),
            ("mode", "w".into()),
            ("device-type", "disk".into()),
            ("discard-enable", "1".into()),
            ("dev", "xvda".into()),
        ];
        for (k, v) in extra {
            nodes.retain(|(n, _)| n != k);
            nodes.push((k, v.to_string()));
        }
        for (k, v) in nodes {
            self.s.write(&format!("{b}/{k}"), &v).unwrap();
        }
        for (k, v) in [
            ("backend", b.clone()),
            ("backend-id", "0".into()),
            ("virtual-device", dev.to_string()),
            ("device-type", "disk".into()),
            ("state", "1".into()),
        ] {
            self.s.write(&format!("{f}/{k}"), &v).unwrap();
        }
        self.s.write(&format!("{b}/state"), "1").unwrap();
    }

    fn be_node(&self, kind: &str, dom: u32, dev: u32, k: &str) -> Option<String> {
        self.s.read(&format!("{}/{k}", be(kind, dom, dev))).unwrap()
    }

    fn be_state(&self, kind: &str, dom: u32, dev: u32) -> String {
        self.be_node(kind, dom, dev, "state").unwrap_or_default()
    }

    /// blkfront's connect: a fresh ring in a fresh grant table, one event channel.
    fn guest_connect(&mut self, dom: u32, dev: u32, extra: &[(&str, &str)]) {
        let table = LocalGrantTable::create(4).unwrap();
        let back = LocalGrantTable::open(table.fd().try_clone_to_owned().unwrap(), MAX_TABLE_PAGES)
            .unwrap();
        self.local.set_grant_table(dom, Arc::new(back));
        let (b, f) = LocalEvent::pair().unwrap();
        let port = self.local.alloc_port(dom, b);
        self.guest_events.push(f);
        let f = fe(dom, dev);
        let mut nodes = vec![
            ("ring-ref", "0".to_string()),
            ("event-channel", port.to_string()),
            ("protocol", "x86_64-abi".to_string()),
        ];
        for (k, v) in extra {
            nodes.retain(|(n, _)| n != k);
            if !v.is_empty() {
                nodes.push((k, v.to_string()));
            }
        }
        for (k, v) in nodes {
            self.s.write(&format!("{f}/{k}"), &v).unwrap();
        }
        self.s.write(&format!("{f}/state"), "3").unwrap();
        self.step();
    }

    fn guest_state(&mut self, dom: u32, dev: u32, st: &str) {
        self.s
            .write(&format!("{}/state", fe(dom, dev)), st)
            .unwrap();
        self.step();
    }

    fn running(&self, kind: &str, dom: u32, dev: u32) -> bool {
        self.d
            .devices()
            .iter()
            .any(|d| d.id.kind == kind && d.id.frontend == dom && d.id.devid == dev && d.running)
    }
}

#[test]
fn handshake_close_reconnect_and_removal() {
    let mut r = Rig::new();
    let before = Arc::strong_count(&r.disk);
    r.add("vbd", 5, 51712, "vm1", &[]);
    r.step();
    assert_eq!(r.be_state("vbd", 5, 51712), "2");
    assert_eq!(
        r.be_node("vbd", 5, 51712, STATUS_NODE).as_deref(),
        Some("ready")
    );
    assert_eq!(
        r.be_node("vbd", 5, 51712, "parallax-vdi").as_deref(),
        Some("vm1")
    );
    assert_eq!(
        r.be_node("vbd", 5, 51712, "feature-flush-cache").as_deref(),
        Some("1")
    );
    assert_eq!(
        r.be_node("vbd", 5, 51712, "feature-discard").as_deref(),
        Some("1")
    );
    assert_eq!(
        r.be_node("vbd", 5, 51712, "discard-granularity").as_deref(),
        Some("4096")
    );
    assert_eq!(
        r.be_node("vbd", 5, 51712, "max-ring-page-order").as_deref(),
        Some("4")
    );
    assert_eq!(
        r.be_node("vbd", 5, 51712, "multi-queue-max-queues")
            .as_deref(),
        Some("4")
    );
    assert_eq!(
        r.be_node("vbd", 5, 51712, "feature-max-indirect-segments")
            .as_deref(),
        Some("256")
    );
    assert!(Arc::strong_count(&r.disk) > before, "the VDI is held open");

    r.guest_connect(5, 51712, &[]);
    assert_eq!(r.be_state("vbd", 5, 51712), "4");
    assert_eq!(
        r.be_node("vbd", 5, 51712, "sectors").as_deref(),
        Some("16384")
    );
    assert_eq!(
        r.be_node("vbd", 5, 51712, "sector-size").as_deref(),
        Some("512")
    );
    assert_eq!(
        r.be_node("vbd", 5, 51712, "physical-sector-size")
            .as_deref(),
        Some("4096")
    );
    assert_eq!(r.be_node("vbd", 5, 51712, "info").as_deref(), Some("0"));
    assert!(r.running("vbd", 5, 51712));
    r.guest_state(5, 51712, "4");
    assert!(r.running("vbd", 5, 51712));

    // Close and reconnect through Initialising.
    r.guest_state(5, 51712, "5");
    assert_eq!(r.be_state("vbd", 5, 51712), "5");
    assert!(!r.running("vbd", 5, 51712));
    r.guest_state(5, 51712, "6");
    assert_eq!(r.be_state("vbd", 5, 51712), "6");
    r.guest_state(5, 51712, "1");
    assert_eq!(r.be_state("vbd", 5, 51712), "2");
    r.guest_connect(5, 51712, &[]);
    assert_eq!(r.be_state("vbd", 5, 51712), "4");
    assert!(r.running("vbd", 5, 51712));

    // xl block-detach: online=0, state=5; the guest closes; the backend finishes.
    r.s.write(&format!("{}/online", be("vbd", 5, 51712)), "0")
        .unwrap();
    r.s.write(&format!("{}/state", be("vbd", 5, 51712)), "5")
        .unwrap();
    r.step();
    assert!(r.running("vbd", 5, 51712), "waits for the frontend");
    r.guest_state(5, 51712, "5");
    assert!(!r.running("vbd", 5, 51712));
    r.guest_state(5, 51712, "6");
    assert_eq!(r.be_state("vbd", 5, 51712), "6");
    assert_eq!(Arc::strong_count(&r.disk), before, "the VDI is let go");
    r.s.rm(&be("vbd", 5, 51712)).unwrap();
    r.s.rm(&fe(5, 51712)).unwrap();
    r.step();
    assert!(r.d.devices().is_empty());
    assert!(r.s.watches().iter().all(|(p, _)| !p.contains("/device/")));
}

#[test]
fn unknown_vdi_is_a_hotplug_error_not_a_hang() {
    let mut r = Rig::new();
    r.add("vbd", 7, 51712, "no-such-vdi", &[]);
    r.step();
    // InitWait anyway, so that libxl runs the hotplug script, which reports the error.
    assert_eq!(r.be_state("vbd", 7, 51712), "2");
    assert_eq!(
        r.be_node("vbd", 7, 51712, STATUS_NODE).as_deref(),
        Some("error")
    );
    let e = r.be_node("vbd", 7, 51712, "hotplug-error").unwrap();
    assert!(
        e.contains("no-such-vdi") && e.contains("parallax vdi list"),
        "{e}"
    );
    // A guest that tries anyway is told to go away.
    r.guest_connect(7, 51712, &[]);
    assert_eq!(r.be_state("vbd", 7, 51712), "5");
    assert!(!r.running("vbd", 7, 51712));
    // libxl tears it down: online=0 + Closing; the frontend never connected.
    r.s.write(&format!("{}/online", be("vbd", 7, 51712)), "0")
        .unwrap();
    r.guest_state(7, 51712, "6");
    assert_eq!(r.be_state("vbd", 7, 51712), "6");

    // Bad formats and empty targets are readable errors too.
    r.add("vbd3", 8, 1, "vhd:/srv/x.vhd", &[]);
    r.add("vbd3", 8, 2, "", &[]);
    r.step();
    let e = r.be_node("vbd3", 8, 1, "hotplug-error").unwrap();
    assert!(e.contains("raw"), "{e}");
    let e = r.be_node("vbd3", 8, 2, "hotplug-error").unwrap();
    assert!(e.contains("target="), "{e}");
}

#[test]
fn vbd3_raw_prefix_snapshots_and_read_only_mode() {
    let mut r = Rig::new();
    // Xen 4.19 backendtype=tap: backend/vbd3, params "raw:TARGET".
    r.add("vbd3", 3, 768, "raw:vm1", &[]);
    r.add("vbd", 3, 832, "gold@s1", &[]);
    r.add(
        "vbd",
        3,
        848,
        "other",
        &[("mode", "r"), ("device-type", "cdrom")],
    );
    r.step();
    for (k, d) in [("vbd3", 768), ("vbd", 832), ("vbd", 848)] {
        assert_eq!(r.be_state(k, 3, d), "2", "{k} {d}");
    }
    assert_eq!(
        r.be_node("vbd", 3, 832, "feature-discard").as_deref(),
        Some("0")
    );
    r.guest_connect(3, 768, &[]);
    r.guest_connect(3, 832, &[]);
    r.guest_connect(3, 848, &[]);
    assert_eq!(r.be_node("vbd3", 3, 768, "info").as_deref(), Some("0"));
    assert_eq!(r.be_node("vbd", 3, 832, "info").as_deref(), Some("4"));
    assert_eq!(r.be_node("vbd", 3, 848, "info").as_deref(), Some("5"));
    assert!(r.running("vbd3", 3, 768) && r.running("vbd", 3, 832) && r.running("vbd", 3, 848));
}

#[test]
fn disks_of_other_scripts_are_left_alone() {
    let mut r = Rig::new();
    r.add(
        "vbd",
        4,
        51712,
        "/dev/vg/root",
        &[("script", "/etc/xen/scripts/block")],
    );
    r.step();
    assert_eq!(r.be_state("vbd", 4, 51712), "1");
    assert_eq!(r.be_node("vbd", 4, 51712, STATUS_NODE), None);
    assert_eq!(r.d.devices().len(), 1);
    assert!(!r.d.devices()[0].active);
    r.s.rm(&be("vbd", 4, 51712)).unwrap();
    r.step();
    assert!(r.d.devices().is_empty());
}

#[test]
fn misbehaving_frontends_are_refused_and_others_carry_on() {
    let mut r = Rig::new();
    r.add("vbd", 9, 1, "other", &[]);
    r.step();
    r.guest_connect(9, 1, &[]);
    assert!(r.running("vbd", 9, 1));

    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("event-channel", "")], "event-channel is missing"),
        (&[("ring-ref", "99999")], "grant reference"),
        (&[("ring-ref", "zero")], "not a number"),
        (&[("protocol", "x86_32-abi")], "not supported"),
        (&[("event-channel", "77")], "port"),
        (&[("ring-page-order", "7")], "max-ring-page-order"),
        (&[("multi-queue-num-queues", "64")], "queues"),
    ];
    for (i, (nodes, want)) in cases.iter().enumerate() {
        let dev = 100 + i as u32;
        r.add("vbd", 10, dev, "vm1", &[]);
        r.step();
        r.guest_connect(10, dev, nodes);
        assert_eq!(r.be_state("vbd", 10, dev), "5", "{nodes:?}");
        assert!(!r.running("vbd", 10, dev));
        let err =
            r.s.read(&format!("/local/domain/0/error/backend/vbd/10/{dev}/error"))
                .unwrap()
                .unwrap_or_default();
        assert!(err.contains(want), "{nodes:?}: {err}");
        // The guest gives up; the VDI is free for the next case.
        r.guest_state(10, dev, "6");
        assert_eq!(r.be_state("vbd", 10, dev), "6");
        r.s.rm(&be("vbd", 10, dev)).unwrap();
        r.s.rm(&fe(10, dev)).unwrap();
        r.step();
        assert!(r.running("vbd", 9, 1), "the other device carries on");
    }
    assert_eq!(r.d.devices().len(), 1);
}

#[test]
fn a_removed_directory_is_not_recreated() {
    let mut r = Rig::new();
    r.add("vbd", 14, 1, "vm1", &[]);
    r.step();
    r.guest_connect(14, 1, &[]);
    // libxl asks for removal and removes everything before the backend looks.
    r.s.write(&format!("{}/online", be("vbd", 14, 1)), "0")
        .unwrap();
    r.s.write(&format!("{}/state", be("vbd", 14, 1)), "5")
        .unwrap();
    r.s.write(&format!("{}/state", fe(14, 1)), "6").unwrap();
    r.s.rm(&be("vbd", 14, 1)).unwrap();
    r.s.rm(&fe(14, 1)).unwrap();
    r.step();
    assert_eq!(r.s.read(&be("vbd", 14, 1)).unwrap(), None);
    assert!(r.d.devices().is_empty());
}

#[test]
fn frontend_that_disappears() {
    let mut r = Rig::new();
    r.add("vbd", 11, 1, "vm1", &[]);
    r.step();
    r.guest_connect(11, 1, &[]);
    assert!(r.running("vbd", 11, 1));
    r.s.rm(&fe(11, 1)).unwrap();
    r.step();
    assert!(!r.running("vbd", 11, 1));
    assert_eq!(r.be_state("vbd", 11, 1), "6");
}

#[test]
fn stale_connected_frontend_is_asked_to_reconnect() {
    let mut r = Rig::new();
    // A frontend left Connected by an earlier daemon instance.
    r.add("vbd", 12, 1, "vm1", &[]);
    r.s.write(&format!("{}/state", fe(12, 1)), "4").unwrap();
    r.step();
    assert_eq!(r.be_state("vbd", 12, 1), "5");
    assert!(!r.running("vbd", 12, 1));
    r.guest_state(12, 1, "6");
    assert_eq!(
        r.be_state("vbd", 12, 1),
        "2",
        "InitWait offered once it closed"
    );
    r.guest_connect(12, 1, &[]);
    assert!(r.running("vbd", 12, 1));
}

#[test]
fn shutdown_and_toolstack_recreate() {
    let mut r = Rig::new();
    r.add("vbd", 13, 1, "vm1", &[]);
    r.add("vbd", 13, 2, "other", &[]);
    r.step();
    r.guest_connect(13, 1, &[]);
    r.guest_connect(13, 2, &[]);
    // The toolstack re-creates device 2 over the old one (both states back to 1).
    r.s.write(&format!("{}/state", fe(13, 2)), "1").unwrap();
    r.s.write(&format!("{}/state", be("vbd", 13, 2)), "1")
        .unwrap();
    r.step();
    assert_eq!(r.be_state("vbd", 13, 2), "2");
    assert!(!r.running("vbd", 13, 2));
    r.guest_connect(13, 2, &[]);
    assert!(r.running("vbd", 13, 2));
    r.d.shutdown();
    assert!(r.d.devices().is_empty());
    assert_eq!(r.be_state("vbd", 13, 1), "5");
    assert_eq!(r.be_state("vbd", 13, 2), "5");
    drop(r.provider);
}

#[derive(Debug, Clone)]
enum Op {
    Add(u32),
    FrontState(u32, u8),
    FrontNode(u32, u8, u16),
    Online(u32, bool),
    BackState(u32, u8),
    RemoveBack(u32),
    RemoveFront(u32),
    Connect(u32),
}

fn op() -> impl Strategy<Value = Op> {
    let dev = 0u32..3;
    prop_oneof![
        dev.clone().prop_map(Op::Add),
        (dev.clone(), 0u8..9).prop_map(|(d, s)| Op::FrontState(d, s)),
        (dev.clone(), 0u8..6, any::<u16>()).prop_map(|(d, k, v)| Op::FrontNode(d, k, v)),
        (dev.clone(), any::<bool>()).prop_map(|(d, o)| Op::Online(d, o)),
        // What a toolstack writes to a backend's state: 1 (set up), 5 (remove).
        (dev.clone(), prop_oneof![Just(1u8), Just(5u8)]).prop_map(|(d, s)| Op::BackState(d, s)),
        dev.clone().prop_map(Op::RemoveBack),
        dev.clone().prop_map(Op::RemoveFront),
        dev.prop_map(Op::Connect),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Any sequence of toolstack and guest writes: no panic, a served ring always shows as
    /// Connected (or Closing while the frontend lets go), a removed directory is forgotten.
    #[test]
    fn any_sequence_keeps_the_invariants(ops in proptest::collection::vec(op(), 1..40)) {
        let mut r = Rig::new();
        for o in ops {
            match o {
                Op::Add(d) => r.add("vbd", 20, d, if d == 2 { "nope" } else { "vm1" }, &[]),
                Op::FrontState(d, s) => {
                    r.s.write(&format!("{}/state", fe(20, d)), &s.to_string()).unwrap()
                }
                Op::FrontNode(d, k, v) => {
                    let key = ["ring-ref", "event-channel", "protocol", "ring-page-order",
                        "multi-queue-num-queues", "queue-1/ring-ref"][k as usize];
                    r.s.write(&format!("{}/{key}", fe(20, d)), &v.to_string()).unwrap()
                }
                Op::Online(d, o) => {
                    let p = format!("{}/online", be("vbd", 20, d));
                    if r.s.read(&p).unwrap().is_some() {
                        r.s.write(&p, if o { "1" } else { "0" }).unwrap()
                    }
                }
                Op::BackState(d, s) => {
                    let p = format!("{}/state", be("vbd", 20, d));
                    if r.s.read(&p).unwrap().is_some() {
                        r.s.write(&p, &s.to_string()).unwrap()
                    }
                }
                Op::RemoveBack(d) => r.s.rm(&be("vbd", 20, d)).unwrap(),
                Op::RemoveFront(d) => r.s.rm(&fe(20, d)).unwrap(),
                Op::Connect(d) => {
                    if r.s.read(&fe(20, d)).unwrap().is_some() {
                        r.guest_connect(20, d, &[]);
                    }
                }
            }
            r.step();
            for dev in r.d.devices() {
                let b = be("vbd", 20, dev.id.devid);
                prop_assert!(r.s.read(&b).unwrap().is_some(), "{:?} kept after removal", dev.id);
                if dev.running {
                    // Connected, or closing and waiting for the frontend to let go.
                    let st = r.s.read(&format!("{b}/state")).unwrap().unwrap_or_default();
                    prop_assert!(st == "4" || st == "5", "{:?} running in state {st}", dev.id);
                }
            }
        }
    }
}
