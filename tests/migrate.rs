//! `vdi migrate NAME --to HOST`: two Parallax daemons on this machine, the destination serving
//! its control listener over TLS-PSK. The VDI moves with what its NBD client wrote, the client
//! is cut off at the switch-over, the destination serves it to qemu-io, and refusals (no TLS,
//! an identity not allowed, an unreachable host) leave the VDI where it was.

use std::{net::TcpListener, process::Command};

use parallax_integration::{daemon::*, nbd::*};

const MIB: usize = 1 << 20;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A destination daemon: NBD and its control listener over TLS-PSK with keys for `host` and
/// `stranger`, serving only `psk:host`. Returns the daemon and its control address.
fn destination(store: &TestStore) -> (Daemon, String) {
    for who in ["host", "stranger"] {
        run_ok(
            Command::new("psktool")
                .args(["-u", who, "-p"])
                .arg(store.file("keys.psk")),
        );
    }
    let port = free_port();
    let d = Daemon::start_with(
        store,
        &format!(
            r#"(commit_interval_ms: 500, nbd: (workers: 2, tls: (psk: "keys.psk")),
                control: (listen: "127.0.0.1:{port}", clients: ["psk:host"]))"#
        ),
        &[],
    );
    (d, format!("127.0.0.1:{port}"))
}

fn migrate_cmd(src: &TestStore, dst: &TestStore, name: &str, to: &str, user: &str) -> Command {
    let mut c = src.cmd(&["vdi", "migrate", name, "--to", to, "--tls-username", user]);
    c.arg("--tls-psk-file").arg(dst.file("keys.psk"));
    c
}

#[test]
fn a_vdi_moves_to_another_daemon_with_what_its_client_wrote() {
    let img = image_with_holes(31, 16 * MIB);
    let src = TestStore::new("256M");
    src.import("vm", &img);
    let s = Daemon::start(&src);
    let dst = TestStore::new("256M");
    let (d, to) = destination(&dst);

    // The VM writes (and flushes) on the source; its connection stays open.
    let mut vm = s.nbd("vm");
    vm.write(5 * MIB as u64, &[0xa5; 65536]).unwrap();
    vm.flush().unwrap();
    let mut want = img.clone();
    want[5 * MIB..5 * MIB + 65536].fill(0xa5);

    let out = output_ok(migrate_cmd(&src, &dst, "vm", &to, "host").arg("--json"));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["name"], "vm");
    assert_eq!(r["detached"], 1, "{r}");
    assert_eq!(r["bulk_bytes"].as_u64().unwrap(), data_bytes(&want), "{r}");
    assert_eq!(
        r["delta_bytes"], 0,
        "nothing was written after the copy: {r}"
    );
    assert!(r["downtime_ms"].as_u64().unwrap() < 30_000, "{r}");

    // The source's client is cut off; the source no longer has the VDI.
    assert!(
        vm.write(0, &[1; 4096]).is_err(),
        "a detached client must not write"
    );
    drop(vm);
    let listed = src.json(&["vdi", "list", "--json"]);
    assert_eq!(listed, serde_json::json!([]), "{listed}");
    src.fail(&["vdi", "info", "vm"]).assert_one_line(1, "vm");

    // The destination has it, whole, with the snapshot of what arrived, and serves it.
    assert_eq!(dst.export("vm"), want);
    let arrived = r["arrived"].as_str().unwrap();
    assert_eq!(dst.export(arrived), want);
    let io = run_ok(
        Command::new("qemu-io")
            .arg("--object")
            .arg(format!(
                "tls-creds-psk,id=tls0,endpoint=client,username=host,dir={}",
                dst.dir.path().display()
            ))
            .args(["--image-opts", &format!(
                "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export=vm,tls-creds=tls0",
                d.port()
            )])
            .args(["-c", "write -P 0x3c 0 4k", "-c", "read -P 0x3c 0 4k", "-c", "flush"]),
    );
    let io = String::from_utf8_lossy(&io.stdout);
    assert!(
        !io.contains("fail") && io.contains("read 4096/4096"),
        "{io}"
    );
    src.assert_clean();
    dst.assert_clean();

    // And it can come back the same way, once the source listens too.
    drop(s);
    let (_back, back_to) = destination(&src);
    let mut c = dst.cmd(&[
        "vdi",
        "migrate",
        "vm",
        "--to",
        &back_to,
        "--tls-username",
        "host",
    ]);
    c.arg("--tls-psk-file").arg(src.file("keys.psk"));
    c.arg("--delete-snapshots");
    let text = String::from_utf8(output_ok(&mut c).stdout).unwrap();
    assert!(text.contains("migrated vm to"), "{text}");
    let mut back = want.clone();
    back[..4096].fill(0x3c);
    assert_eq!(src.export("vm"), back);
    drop(d);
}

#[test]
fn refusals_leave_the_vdi_where_it_was() {
    let src = TestStore::new("64M");
    src.import("vm", &random_bytes(5, MIB));
    let _s = Daemon::start(&src);
    let dst = TestStore::new("64M");
    let (_d, to) = destination(&dst);

    // An identity the destination does not serve.
    output_fail(&mut migrate_cmd(&src, &dst, "vm", &to, "stranger"))
        .assert_one_line(1, "psk:stranger may not use");
    // A host that does not answer.
    let nowhere = format!("127.0.0.1:{}", free_port());
    output_fail(&mut migrate_cmd(&src, &dst, "vm", &nowhere, "host")).assert_one_line(1, &nowhere);
    // No credentials.
    src.fail(&["vdi", "migrate", "vm", "--to", &to])
        .assert_one_line(1, "--tls-psk-file");
    // The destination has a VDI of that name.
    dst.run(&["vdi", "create", "vm", "--size", "1M"]);
    output_fail(&mut migrate_cmd(&src, &dst, "vm", &to, "host")).assert_one_line(1, "exists");

    // Still here, whole and writable, with nothing left over on either side.
    let names = |s: &TestStore| -> Vec<String> {
        s.json(&["vdi", "list", "--json"])
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(&src), ["vm"]);
    assert_eq!(names(&dst), ["vm"]);
    assert_eq!(src.export("vm"), random_bytes(5, MIB));
    src.run(&["vdi", "snapshot", "vm@still-mine"]);
    src.assert_clean();
    dst.assert_clean();

    // A control listener without TLS does not start.
    let plain = TestStore::new("16M");
    let f = output_fail(&mut plain.cmd(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--unix",
        plain.file("nbd.sock").to_str().unwrap(),
        "--control-listen",
        "127.0.0.1:0",
        "--control-client",
        "psk:host",
    ]));
    f.assert_one_line(1, "only speaks TLS");
}

/// `parallax --connect HOST …`: an admin elsewhere (dom0, for a storage domain) manages the
/// VDIs of a daemon through the same listener and identities.
#[test]
fn another_host_manages_vdis_through_the_control_listener() {
    let dst = TestStore::new("64M");
    let (_d, to) = destination(&dst);
    let keys = dst.file("keys.psk");
    let remote = |user: &str, args: &[&str]| {
        let mut c = parallax();
        c.args([
            "--connect",
            &to,
            "--connect-username",
            user,
            "--connect-psk-file",
        ])
        .arg(&keys)
        .args(args);
        c
    };
    for args in [
        &["vdi", "create", "a", "--size", "1M"][..],
        &["vdi", "snapshot", "a@s"],
        &["vdi", "fork", "a@s", "b"],
    ] {
        output_ok(&mut remote("host", args));
    }
    let out = output_ok(&mut remote("host", &["vdi", "list", "--json"]));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "a@s", "b"]);
    output_ok(&mut remote(
        "host",
        &["schedule", "set", "b", "--every", "1h"],
    ));
    let out = output_ok(&mut remote("host", &["schedule", "list", "--json"]));
    let schedules: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(schedules[0]["target"], "b", "{schedules}");
    output_ok(&mut remote("host", &["schedule", "remove", "b"]));
    let out = output_ok(&mut remote("host", &["vdi", "info", "b", "--json"]));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["origin"], "a@s", "{info}");
    output_ok(&mut remote("host", &["vdi", "delete", "b", "--recursive"]));
    let out = output_ok(&mut remote("host", &["df", "--json"]));
    let df: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(df["vdis"], 1, "{df}");
    // The host's own view agrees.
    assert_eq!(
        dst.json(&["vdi", "list", "--json"])
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // What writes a file, or needs the store itself, stays on the host; strangers are
    // refused; nothing changed.
    output_fail(&mut remote("host", &["vdi", "export", "a", "/dev/null"]))
        .assert_one_line(1, "cannot cross a network");
    output_fail(&mut remote("host", &["upgrade"])).assert_one_line(1, "--connect");
    output_fail(&mut remote("stranger", &["vdi", "list"])).assert_one_line(1, "may not use");
    // A key the daemon does not have: refused at the handshake, saying so.
    let intruder = dst.file("intruder.psk");
    std::fs::write(&intruder, format!("intruder:{}\n", "ab".repeat(32))).unwrap();
    let mut c = parallax();
    c.args([
        "--connect",
        &to,
        "--connect-username",
        "intruder",
        "--connect-psk-file",
    ])
    .arg(&intruder)
    .args(["vdi", "list"]);
    output_fail(&mut c).assert_one_line(1, "does not accept the key of \"intruder\"");
    dst.assert_clean();
}

/// `vdi import FILE` through `--connect`: the image crosses the network after the request
/// (how an admin seeds templates into a storage domain); pipes need `--size`, what is not a
/// raw image is refused before anything is made, and an image larger than `--size` leaves
/// nothing behind.
#[test]
fn an_image_crosses_the_network_into_another_hosts_vdi() {
    let dst = TestStore::new("64M");
    let (_d, to) = destination(&dst);
    let keys = dst.file("keys.psk");
    let remote = || {
        let mut c = parallax();
        c.args([
            "--connect",
            &to,
            "--connect-username",
            "host",
            "--connect-psk-file",
        ])
        .arg(&keys);
        c
    };
    // A file, with a run of zeros in the middle that stays unallocated; its size rounds up
    // to 512 bytes.
    let mut img = random_bytes(9, 2 * MIB);
    img[MIB..MIB + 256 * 1024].fill(0);
    img.truncate(img.len() - 100);
    let file = dst.file("template.raw");
    std::fs::write(&file, &img).unwrap();
    let out = output_ok(
        remote()
            .args(["vdi", "import", "template"])
            .arg(&file)
            .arg("--json"),
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["size"], 2 * MIB, "{r}");
    assert_eq!(r["allocated"], 2 * MIB - 256 * 1024, "{r}");
    let mut want = img.clone();
    want.resize(2 * MIB, 0);
    assert_eq!(dst.export("template"), want);

    // A pipe: with --size, every byte it gives.
    let piped = random_bytes(10, MIB + 4096);
    let mut c = remote();
    c.args(["vdi", "import", "piped", "-", "--size", "2M"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&piped).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut want = piped.clone();
    want.resize(2 * MIB, 0);
    assert_eq!(dst.export("piped"), want);

    // Refusals, each in one line, none leaving a VDI behind.
    let mut c = remote();
    c.args(["vdi", "import", "nosize", "-"])
        .stdin(std::process::Stdio::null());
    output_fail(&mut c).assert_one_line(1, "needs --size");
    let mut qcow = b"QFI\xfb".to_vec();
    qcow.resize(65536, 0);
    let qcow_file = dst.file("disk.qcow2");
    std::fs::write(&qcow_file, &qcow).unwrap();
    output_fail(remote().args(["vdi", "import", "qcow"]).arg(&qcow_file))
        .assert_one_line(1, "qemu-img convert");
    output_fail(
        remote()
            .args(["vdi", "import", "small", "--size", "1M"])
            .arg(&file),
    )
    .assert_one_line(1, "smaller than the image");
    output_fail(remote().args(["vdi", "import", "template"]).arg(&file))
        .assert_one_line(1, "template");
    let names = dst.names();
    assert_eq!(names, ["piped", "template"]);
    dst.assert_clean();
}
