//! The daemon's xenbus backend against Debian's real C xenstored (hypervisor calls stubbed):
//! a test plays the toolstack (libxl's writes, with permissions) and the guest (blkfront's
//! handshake, `frontend-shim` rings over the local grant/event transport), and checks the
//! whole life of a vbd with verified I/O in between, plus guests that misbehave.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use frontend_shim::{
    verify::{self, VerifyConfig},
    FrontendConfig, IoRequest,
};
use parallax::{
    blkif::{
        abi::BLKIF_RSP_OKAY,
        local::{LocalEvent, LocalGrantTable, MAX_TABLE_PAGES},
    },
    daemon::{
        config::{Config, NbdSection},
        serve::Daemon,
    },
    disk::Disk,
    store::{Store, StoreOptions},
    xen::{config::XenTransportKind, LocalDomains, XenConfig, XenStore},
};
use parallax_integration::xenstored::{
    libxl_add, libxl_destroy, libxl_request_remove, wait_node, VbdSpec, XenGuest, Xenstored, STEP,
};

const MIB: u64 = 1 << 20;
/// Where a known pattern goes: beyond the span the random verifier writes.
const PATTERN_SECTOR: u64 = 16 * MIB / 512;

/// A store with VDIs `vm1` (64 MiB, snapshot `vm1@gold`) and `vm2` (16 MiB), served by an
/// in-process daemon with the Xen backend on the local transport, against `xs`.
fn start_daemon(xs: &Xenstored, dir: &Path) -> Daemon {
    let path = dir.join("store");
    let store = Store::create(&path, Some(512 * MIB), StoreOptions::default()).unwrap();
    store.create_vdi("vm1", 64 * MIB).unwrap();
    store.snapshot("vm1", "gold").unwrap();
    store.create_vdi("vm2", 16 * MIB).unwrap();
    store.close().unwrap();
    drop(store);
    let cfg = Config {
        store: Some(path),
        nbd: NbdSection {
            enabled: false,
            ..NbdSection::default()
        },
        control_socket: Some(dir.join("control.sock")),
        xen: XenConfig {
            enabled: Some(true),
            transport: XenTransportKind::Local,
            ..XenConfig::default()
        },
        ..Config::default()
    };
    xs.start_daemon(cfg)
        .expect("daemon starts with the xen backend")
}

fn local(d: &Daemon) -> LocalDomains {
    d.xen
        .as_ref()
        .and_then(|x| x.local.clone())
        .expect("the xen backend runs on the local transport")
}

fn backend_node(xs: &impl XenStore, spec: &VbdSpec, k: &str) -> Option<String> {
    xs.read(&format!("{}/{k}", spec.backend())).unwrap()
}

/// Waits until the backend no longer tracks any device of `domid`.
fn wait_forgotten(d: &Daemon, domid: u32) {
    let deadline = Instant::now() + STEP;
    let x = d.xen.as_ref().unwrap();
    while x.backend.devices().iter().any(|s| s.id.frontend == domid) {
        assert!(
            Instant::now() < deadline,
            "device of domain {domid} still tracked: {:?}",
            x.backend.devices()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn verify(front: &mut frontend_shim::Frontend, ops: u64, seed: u64) {
    let r = verify::run(
        front,
        &VerifyConfig {
            ops,
            seed,
            span: Some(8 * MIB),
        },
    )
    .expect("verified I/O over the ring");
    assert_eq!(r.ops, ops);
    assert!(r.reads > 0 && r.writes > 0, "{r:?}");
}

#[test]
fn handshake_io_close_reconnect_and_removal() {
    let xs = Xenstored::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_daemon(&xs, dir.path());
    let tool = xs.conn();

    // xl create: libxl writes both directories; the daemon offers its features and InitWait.
    let spec = VbdSpec::new(5, 51712, "vm1");
    libxl_add(&tool, &spec).unwrap();
    let guest = XenGuest::new(&xs, local(&daemon), spec.clone());
    guest.wait_backend(&["2"]).unwrap();
    assert_eq!(
        backend_node(&tool, &spec, "parallax-status").as_deref(),
        Some("ready")
    );
    assert_eq!(
        backend_node(&tool, &spec, "feature-flush-cache").as_deref(),
        Some("1")
    );
    assert_eq!(
        backend_node(&tool, &spec, "feature-discard").as_deref(),
        Some("1")
    );
    assert_eq!(
        backend_node(&tool, &spec, "discard-granularity").as_deref(),
        Some("4096")
    );
    assert_eq!(
        backend_node(&tool, &spec, "max-ring-page-order").as_deref(),
        Some("4")
    );
    assert_eq!(
        backend_node(&tool, &spec, "multi-queue-max-queues").as_deref(),
        Some("4")
    );
    assert_eq!(
        backend_node(&tool, &spec, "feature-max-indirect-segments").as_deref(),
        Some("256")
    );
    assert_eq!(
        backend_node(&tool, &spec, "feature-persistent").as_deref(),
        Some("1")
    );
    // Nodes the daemon created inherit the directory's permissions: the guest may read them.
    let perms = tool
        .get_perms(&format!("{}/feature-flush-cache", spec.backend()))
        .unwrap();
    assert_eq!(
        perms.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        ["n0", "r5"]
    );

    // The guest connects with two queues of two-page rings, indirect requests and persistent
    // grants (the reconnect below uses none of them).
    let cfg = FrontendConfig {
        ring_order: 1,
        queues: 2,
        indirect_segments: 32,
        persistent: true,
        ..FrontendConfig::default()
    };
    let mut front = guest.connect(&cfg).unwrap();
    assert_eq!(front.size(), 64 * MIB);
    assert!(!front.read_only());
    assert_eq!(
        backend_node(&tool, &spec, "sector-size").as_deref(),
        Some("512")
    );
    assert_eq!(
        backend_node(&tool, &spec, "physical-sector-size").as_deref(),
        Some("4096")
    );
    assert_eq!(backend_node(&tool, &spec, "info").as_deref(), Some("0"));
    verify(&mut front, 400, 1);
    let pattern: Vec<u8> = (0..40 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let c = front
        .queue(0)
        .run(&IoRequest::write(PATTERN_SECTOR, &pattern))
        .unwrap();
    assert_eq!(c.status, BLKIF_RSP_OKAY);
    assert_eq!(
        front.queue(1).run(&IoRequest::flush()).unwrap().status,
        BLKIF_RSP_OKAY
    );

    // A second guest asking for the same VDI writable is refused with a readable reason.
    let clash = VbdSpec::new(6, 51712, "vm1");
    libxl_add(&tool, &clash).unwrap();
    wait_node(
        &tool,
        &format!("{}/parallax-status", clash.backend()),
        &["error"],
        STEP,
    )
    .unwrap();
    let e = backend_node(&tool, &clash, "hotplug-error").unwrap();
    assert!(e.contains("busy"), "{e}");
    libxl_request_remove(&tool, &clash).unwrap();
    wait_node(&tool, &format!("{}/state", clash.backend()), &["6"], STEP).unwrap();
    libxl_destroy(&tool, &clash).unwrap();
    wait_forgotten(&daemon, 6);

    // The guest closes its disk, then reconnects through Initialising (one queue this time).
    guest.close(front).unwrap();
    guest.wait_backend(&["6"]).unwrap();
    guest.restart().unwrap();
    let mut front = guest.connect(&FrontendConfig::default()).unwrap();
    let c = front
        .queue(0)
        .run(&IoRequest::read(PATTERN_SECTOR, pattern.len() as u64))
        .unwrap();
    assert_eq!(c.status, BLKIF_RSP_OKAY);
    assert!(
        c.data.as_deref() == Some(&pattern[..]),
        "data survived the reconnect"
    );
    verify(&mut front, 200, 2);

    // xl block-detach: online=0 and Closing; the guest lets go; the daemon finishes; libxl
    // removes the directories.
    libxl_request_remove(&tool, &spec).unwrap();
    guest.wait_backend(&["5"]).unwrap();
    guest.close(front).unwrap();
    guest.wait_backend(&["6"]).unwrap();
    libxl_destroy(&tool, &spec).unwrap();
    wait_forgotten(&daemon, 5);

    // The VDI holds what the guest wrote, and is free for the next guest.
    let disk = daemon.store.open_vdi("vm1", false).unwrap();
    let mut back = vec![0u8; pattern.len()];
    disk.read_at(&mut back, PATTERN_SECTOR * 512).unwrap();
    assert!(back == pattern);
    drop(disk);
    let next = VbdSpec::new(6, 768, "vm1");
    libxl_add(&tool, &next).unwrap();
    let guest2 = XenGuest::new(&xs, local(&daemon), next.clone());
    let mut front2 = guest2.connect(&FrontendConfig::default()).unwrap();
    verify(&mut front2, 50, 3);

    // Stopping the daemon answers what the ring saw and tells the frontend (Closing).
    daemon.stop().unwrap();
    assert_eq!(backend_node(&tool, &next, "state").as_deref(), Some("5"));
    drop(front2);
    let mut xs = xs;
    assert!(xs.alive(), "xenstored survived: {}", xs.log());
}

#[test]
fn snapshot_read_only_over_vbd3() {
    let xs = Xenstored::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_daemon(&xs, dir.path());
    let tool = xs.conn();
    // Xen 4.19+ `backendtype=tap`: backend/vbd3, params "raw:TARGET".
    let spec = VbdSpec {
        kind: "vbd3",
        ..VbdSpec::new(12, 832, "vm1@gold")
    };
    libxl_add(&tool, &spec).unwrap();
    let guest = XenGuest::new(&xs, local(&daemon), spec.clone());
    let mut front = guest.connect(&FrontendConfig::default()).unwrap();
    assert!(front.read_only());
    assert_eq!(backend_node(&tool, &spec, "info").as_deref(), Some("4"));
    assert_eq!(
        backend_node(&tool, &spec, "feature-discard").as_deref(),
        Some("0")
    );
    let c = front.queue(0).run(&IoRequest::read(0, 4096)).unwrap();
    assert_eq!(c.status, BLKIF_RSP_OKAY);
    let c = front
        .queue(0)
        .run(&IoRequest::write(0, &[1u8; 4096]))
        .unwrap();
    assert_ne!(c.status, BLKIF_RSP_OKAY, "a snapshot is read-only");
    guest.close(front).unwrap();
    daemon.stop().unwrap();
}

#[test]
fn unknown_vdis_and_misbehaving_frontends() {
    let xs = Xenstored::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_daemon(&xs, dir.path());
    let tool = xs.conn();

    // A healthy guest that keeps working throughout.
    let good = VbdSpec::new(7, 51712, "vm2");
    libxl_add(&tool, &good).unwrap();
    let good_guest = XenGuest::new(&xs, local(&daemon), good.clone());
    let mut good_front = good_guest.connect(&FrontendConfig::default()).unwrap();
    verify(&mut good_front, 50, 10);

    // An unknown VDI: InitWait (so the hotplug script runs) with a readable hotplug-error.
    let unknown = VbdSpec::new(8, 51712, "no-such-vdi");
    libxl_add(&tool, &unknown).unwrap();
    wait_node(
        &tool,
        &format!("{}/parallax-status", unknown.backend()),
        &["error"],
        STEP,
    )
    .unwrap();
    wait_node(&tool, &format!("{}/state", unknown.backend()), &["2"], STEP).unwrap();
    let e = backend_node(&tool, &unknown, "hotplug-error").unwrap();
    assert!(
        e.contains("no-such-vdi") && e.contains("parallax vdi list"),
        "{e}"
    );
    libxl_request_remove(&tool, &unknown).unwrap();
    wait_node(&tool, &format!("{}/state", unknown.backend()), &["6"], STEP).unwrap();
    libxl_destroy(&tool, &unknown).unwrap();

    // Frontends that publish nonsense are refused (Closing, with the reason where Linux's
    // xenbus_dev_fatal puts it), one after the other, on the same VDI.
    let ld = local(&daemon);
    let table = LocalGrantTable::create(4).unwrap();
    let back =
        LocalGrantTable::open(table.fd().try_clone_to_owned().unwrap(), MAX_TABLE_PAGES).unwrap();
    ld.set_grant_table(9, std::sync::Arc::new(back));
    let mut keep = Vec::new();
    let mut port = || {
        let (b, f) = LocalEvent::pair().unwrap();
        keep.push(f);
        ld.alloc_port(9, b).to_string()
    };
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (
            vec![("ring-ref", "0".into()), ("protocol", "x86_64-abi".into())],
            "event-channel is missing",
        ),
        (
            vec![("ring-ref", "99999".into()), ("event-channel", port())],
            "grant reference 99999",
        ),
        (
            vec![
                ("ring-ref", "0".into()),
                ("event-channel", port()),
                ("protocol", "x86_32-abi".into()),
            ],
            "protocol",
        ),
        (
            vec![("ring-ref", "0".into()), ("event-channel", "4242".into())],
            "4242",
        ),
        (
            vec![
                ("ring-page-order", "9".into()),
                ("ring-ref0", "0".into()),
                ("event-channel", port()),
            ],
            "max-ring-page-order",
        ),
    ];
    for (i, (nodes, want)) in cases.into_iter().enumerate() {
        let spec = VbdSpec::new(9, 100 + i as u32, "vm1");
        libxl_add(&tool, &spec).unwrap();
        let guest = XenGuest::new(&xs, ld.clone(), spec.clone());
        guest.wait_backend(&["2"]).unwrap();
        let nodes: Vec<(String, String)> =
            nodes.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        guest.publish(&nodes).unwrap();
        guest.wait_backend(&["5"]).unwrap();
        let err = tool
            .read(&format!(
                "/local/domain/0/error/backend/vbd/9/{}/error",
                100 + i
            ))
            .unwrap()
            .unwrap_or_default();
        assert!(err.contains(want), "{nodes:?}: {err}");
        guest.set_state("6").unwrap();
        guest.wait_backend(&["6"]).unwrap();
        libxl_request_remove(&tool, &spec).unwrap();
        libxl_destroy(&tool, &spec).unwrap();
        verify(&mut good_front, 20, 20 + i as u64);
    }
    drop(keep);
    wait_forgotten(&daemon, 9);

    // A frontend that vanishes (its directory removed while connected): the ring stops, the
    // backend goes Closed, the VDI is let go once the toolstack removes the device.
    let gone = VbdSpec::new(11, 51712, "vm1");
    libxl_add(&tool, &gone).unwrap();
    let gone_guest = XenGuest::new(&xs, local(&daemon), gone.clone());
    let front = gone_guest.connect(&FrontendConfig::default()).unwrap();
    tool.rm(&gone.frontend()).unwrap();
    wait_node(&tool, &format!("{}/state", gone.backend()), &["6"], STEP).unwrap();
    drop(front);
    tool.rm(&gone.backend()).unwrap();
    wait_forgotten(&daemon, 11);

    // A guest that corrupts its ring gets its device shut down; the backend says Closing.
    let evil = VbdSpec::new(13, 51712, "vm1");
    libxl_add(&tool, &evil).unwrap();
    let evil_guest = XenGuest::new(&xs, local(&daemon), evil.clone());
    let front = evil_guest.connect(&FrontendConfig::default()).unwrap();
    let ring = front.queues()[0].ring();
    ring.set_req_prod(ring.size() * 3);
    front.queues()[0].kick().unwrap();
    evil_guest.wait_backend(&["5"]).unwrap();
    drop(front);

    verify(&mut good_front, 50, 30);
    good_guest.close(good_front).unwrap();
    daemon.stop().unwrap();
}
