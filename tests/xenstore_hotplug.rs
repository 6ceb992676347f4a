//! `xen-configs/block-parallax`, the hotplug script, run the way libxl runs it (`add` /
//! `remove` with `XENBUS_PATH`), with xenstore-utils talking to the real xenstored
//! (`XENSTORED_PATH`); under the system shell and busybox's.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use frontend_shim::{FrontendConfig, IoRequest};
use parallax::{
    blkif::abi::BLKIF_RSP_OKAY,
    daemon::config::{Config, NbdSection},
    store::{Store, StoreOptions},
    xen::{config::XenTransportKind, XenConfig, XenStore},
};
use parallax_integration::xenstored::{
    libxl_add, libxl_destroy, libxl_request_remove, VbdSpec, XenGuest, Xenstored,
};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../xen-configs/block-parallax")
}

/// The shells to run the script with: the system's, and busybox's when installed (the Xen
/// rig's dom0 has only busybox).
fn shells() -> Vec<Vec<&'static str>> {
    let mut v = vec![vec!["/bin/sh"]];
    if Path::new("/bin/busybox").exists() {
        v.push(vec!["/bin/busybox", "sh"]);
    }
    v
}

fn run_script(
    shell: &[&str],
    xs: &Xenstored,
    cmd: &str,
    be: Option<&str>,
    env: &[(&str, &str)],
) -> Output {
    let mut c = Command::new(shell[0]);
    c.args(&shell[1..])
        .arg(script())
        .arg(cmd)
        .env("XENSTORED_PATH", xs.socket())
        .env_remove("XENBUS_PATH");
    if let Some(be) = be {
        c.env("XENBUS_PATH", be);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("running block-parallax")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn script_reports_ready_errors_and_a_missing_daemon() {
    let xs = Xenstored::start().unwrap();
    let tool = xs.conn();
    for (n, shell) in shells().iter().enumerate() {
        let be = format!("/local/domain/0/backend/vbd/{}/51712", 3 + n);
        let r = |cmd: &str, env: &[(&str, &str)]| run_script(shell, &xs, cmd, Some(&be), env);

        // The daemon opened the VDI.
        tool.write(&format!("{be}/parallax-status"), "ready")
            .unwrap();
        let o = r("add", &[]);
        assert!(o.status.success(), "{shell:?}: {}", stderr(&o));
        assert_eq!(
            tool.read(&format!("{be}/hotplug-status"))
                .unwrap()
                .as_deref(),
            Some("connected")
        );
        let o = r("remove", &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(tool.read(&format!("{be}/hotplug-status")).unwrap(), None);

        // The daemon could not: its reason reaches the toolstack untouched.
        let why = "parallax: no VDI or snapshot named \"ghost\" in this store";
        tool.write(&format!("{be}/hotplug-error"), why).unwrap();
        tool.write(&format!("{be}/parallax-status"), "error")
            .unwrap();
        let o = r("add", &[]);
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr(&o).contains("ghost"), "{}", stderr(&o));
        assert_eq!(
            tool.read(&format!("{be}/hotplug-status"))
                .unwrap()
                .as_deref(),
            Some("error")
        );
        assert_eq!(
            tool.read(&format!("{be}/hotplug-error"))
                .unwrap()
                .as_deref(),
            Some(why)
        );

        // No daemon at all: a bounded wait, then a reason that says what to check.
        tool.rm(&be).unwrap();
        tool.write(&format!("{be}/state"), "2").unwrap();
        let o = r("add", &[("PARALLAX_HOTPLUG_TIMEOUT", "1")]);
        assert_eq!(o.status.code(), Some(1));
        let e = tool.read(&format!("{be}/hotplug-error")).unwrap().unwrap();
        assert!(e.contains("parallax serve"), "{e}");
        let o = r("add", &[("PARALLAX_HOTPLUG_TIMEOUT", "soon")]);
        assert_eq!(o.status.code(), Some(1));

        // Misuse.
        let o = run_script(shell, &xs, "add", None, &[]);
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr(&o).contains("XENBUS_PATH"));
        let o = r("frobnicate", &[]);
        assert_eq!(o.status.code(), Some(1));
    }
}

/// `xl create` / `xl block-detach` as libxl 4.17 sequences them, with the daemon serving.
#[test]
fn libxl_sequence_with_the_daemon() {
    let xs = Xenstored::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let store = Store::create(&path, Some(256 << 20), StoreOptions::default()).unwrap();
    store.create_vdi("web", 32 << 20).unwrap();
    store.close().unwrap();
    drop(store);
    let daemon = xs
        .start_daemon(Config {
            store: Some(path),
            nbd: NbdSection {
                enabled: false,
                ..NbdSection::default()
            },
            control_socket: Some(dir.path().join("control.sock")),
            xen: XenConfig {
                enabled: Some(true),
                transport: XenTransportKind::Local,
                ..XenConfig::default()
            },
            ..Config::default()
        })
        .unwrap();
    let local = daemon.xen.as_ref().unwrap().local.clone().unwrap();
    let tool = xs.conn();
    let shell = &shells()[shells().len() - 1];

    // xl create: devices written, backend reaches InitWait, then the script runs.
    let spec = VbdSpec::new(4, 51712, "web");
    libxl_add(&tool, &spec).unwrap();
    let guest = XenGuest::new(&xs, local.clone(), spec.clone());
    guest.wait_backend(&["2"]).unwrap();
    let o = run_script(shell, &xs, "add", Some(&spec.backend()), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut front = guest.connect(&FrontendConfig::default()).unwrap();
    let c = front
        .queue(0)
        .run(&IoRequest::write(8, &[0x5a; 4096]))
        .unwrap();
    assert_eq!(c.status, BLKIF_RSP_OKAY);

    // xl block-detach: removal request, the guest closes, the script's remove, directories go.
    libxl_request_remove(&tool, &spec).unwrap();
    guest.wait_backend(&["5"]).unwrap();
    guest.close(front).unwrap();
    guest.wait_backend(&["6"]).unwrap();
    let o = run_script(shell, &xs, "remove", Some(&spec.backend()), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    libxl_destroy(&tool, &spec).unwrap();

    // xl create with a VDI that does not exist: the script fails and names it.
    let ghost = VbdSpec::new(5, 51712, "ghost");
    libxl_add(&tool, &ghost).unwrap();
    XenGuest::new(&xs, local, ghost.clone())
        .wait_backend(&["2"])
        .unwrap();
    let o = run_script(shell, &xs, "add", Some(&ghost.backend()), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("\"ghost\""), "{}", stderr(&o));
    daemon.stop().unwrap();
}
