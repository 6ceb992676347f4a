//! NBD over TLS against real clients: nbdinfo, nbdcopy (libnbd) and qemu-img, qemu-io (qemu),
//! all GnuTLS, with x509 certificates and with TLS-PSK keys in psktool's format. Plaintext
//! clients, wrong keys and certificates from another CA are refused, and the server serves on.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
};

use parallax::nbd::{NbdConfig, TlsMode, TlsServer, TlsSettings};
use parallax_integration::{daemon::*, nbd::*};

const MIB: u64 = 1 << 20;

/// Keys and certificates for one test, made with the `openssl` command.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let p = Pki { dir };
        // PSK: keys made by GnuTLS's psktool; qemu reads them as DIR/keys.psk. The wrong
        // key has the right identity.
        for dir in ["psk", "wrong-psk"] {
            std::fs::create_dir(p.path(dir)).unwrap();
            run_ok(
                Command::new("psktool")
                    .args(["-u", "alice", "-p"])
                    .arg(p.path(&format!("{dir}/keys.psk"))),
            );
        }
        // x509: a CA, the server's certificate, a client's (qemu and libnbd read
        // ca-cert.pem, client-cert.pem and client-key.pem from a directory), and a client
        // certificate from a CA the server does not trust.
        p.ca("ca");
        p.ca("rogue-ca");
        p.cert(
            "ca",
            "server",
            "localhost",
            Some("subjectAltName=DNS:localhost,IP:127.0.0.1"),
        );
        for (ca, dir) in [("ca", "client"), ("rogue-ca", "rogue")] {
            p.cert(ca, dir, "alice", None);
            std::fs::create_dir(p.path(dir)).unwrap();
            std::fs::rename(
                p.path(&format!("{dir}-cert.pem")),
                p.path(&format!("{dir}/client-cert.pem")),
            )
            .unwrap();
            std::fs::rename(
                p.path(&format!("{dir}-key.pem")),
                p.path(&format!("{dir}/client-key.pem")),
            )
            .unwrap();
            // Both trust the real CA, so only the server's check tells them apart.
            std::fs::copy(p.path("ca-cert.pem"), p.path(&format!("{dir}/ca-cert.pem"))).unwrap();
        }
        p
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn openssl(&self, args: &[&str]) {
        run_ok(
            Command::new("openssl")
                .args(args)
                .current_dir(self.dir.path()),
        );
    }

    fn ca(&self, name: &str) {
        let (key, cert) = (format!("{name}-key.pem"), format!("{name}-cert.pem"));
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &key,
            "-out",
            &cert,
        ]);
    }

    fn cert(&self, ca: &str, name: &str, cn: &str, ext: Option<&str>) {
        let (key, csr, cert) = (
            format!("{name}-key.pem"),
            format!("{name}.csr"),
            format!("{name}-cert.pem"),
        );
        self.openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &key,
            "-out",
            &csr,
        ]);
        let (ca_cert, ca_key) = (format!("{ca}-cert.pem"), format!("{ca}-key.pem"));
        let ext_file = format!("{name}.ext");
        let mut args = vec![
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            &csr,
            "-CA",
            &ca_cert,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &cert,
        ];
        if let Some(e) = ext {
            std::fs::write(self.path(&ext_file), e).unwrap();
            args.extend(["-extfile", &ext_file]);
        }
        self.openssl(&args);
    }

    /// Everything: x509 with client certificates, and PSK.
    fn settings(&self, mode: Option<TlsMode>) -> TlsSettings {
        TlsSettings {
            mode,
            cert: Some(self.path("server-cert.pem")),
            key: Some(self.path("server-key.pem")),
            ca: Some(self.path("ca-cert.pem")),
            psk: Some(self.path("psk/keys.psk")),
        }
    }
}

fn tls_server(pki: &Pki, mode: Option<TlsMode>) -> (TestServer, Arc<parallax::disk::MemDisk>) {
    let provider = Arc::new(TestProvider::new());
    let disk = provider.add("vm", 16 * MIB, "a test VDI");
    let tls = TlsServer::new(&pki.settings(mode)).unwrap();
    (
        TestServer::start_tls(provider, NbdConfig::default(), tls),
        disk,
    )
}

fn psk_uri(port: u16, export: &str, keys: &Path) -> String {
    format!(
        "nbds://alice@127.0.0.1:{port}/{export}?tls-psk-file={}",
        keys.display()
    )
}

fn cert_uri(port: u16, export: &str, dir: &Path) -> String {
    format!(
        "nbds://127.0.0.1:{port}/{export}?tls-certificates={}",
        dir.display()
    )
}

/// qemu's `--object` for PSK (`DIR/keys.psk`) or x509 (`DIR/ca-cert.pem` …) credentials.
fn qemu_creds(psk: bool, dir: &Path) -> String {
    if psk {
        format!(
            "tls-creds-psk,id=tls0,endpoint=client,username=alice,dir={}",
            dir.display()
        )
    } else {
        format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            dir.display()
        )
    }
}

fn qemu_image(port: u16, export: &str) -> String {
    format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export={export},tls-creds=tls0,tls-hostname=localhost"
    )
}

/// Data written and read back through libnbd and qemu, with keys and with certificates, is
/// what lands on the disk.
#[test]
fn real_clients_move_data_over_tls_with_psk_and_x509() {
    let pki = Pki::new();
    let (srv, disk) = tls_server(&pki, None);
    let keys = pki.path("psk/keys.psk");
    let size = run_ok(
        Command::new("nbdinfo")
            .arg("--size")
            .arg(psk_uri(srv.port, "vm", &keys)),
    );
    assert_eq!(String::from_utf8_lossy(&size.stdout).trim(), "16777216");
    let info = run_ok(Command::new("nbdinfo").arg(cert_uri(srv.port, "vm", &pki.path("client"))));
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("with TLS"), "{info}");

    // 8 MiB in with nbdcopy over PSK (large requests: many TLS records each way).
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let img = random_bytes(3, 8 * MIB as usize);
    write_file(&src, &img);
    run_ok(
        Command::new("nbdcopy")
            .arg(&src)
            .arg(psk_uri(srv.port, "vm", &keys)),
    );
    assert!(disk_bytes(&disk, 0, img.len()) == img, "nbdcopy over PSK");
    // Out again with qemu-img over x509, and compared by qemu over PSK.
    let out = dir.path().join("out.img");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw", "--object"])
            .arg(qemu_creds(false, &pki.path("client")))
            .args(["--image-opts", &qemu_image(srv.port, "vm")])
            .arg(&out),
    );
    assert!(
        std::fs::read(&out).unwrap()[..img.len()] == img[..],
        "qemu-img over x509"
    );
    // qemu-io writes a pattern over PSK; libnbd reads it back over x509.
    run_ok(
        Command::new("qemu-io")
            .args(["--object", &qemu_creds(true, &pki.path("psk"))])
            .args(["--image-opts", &qemu_image(srv.port, "vm")])
            .args(["-c", "write -P 0x5a 12M 1M", "-c", "flush"]),
    );
    let back = dir.path().join("back.img");
    run_ok(
        Command::new("nbdcopy")
            .arg(cert_uri(srv.port, "vm", &pki.path("client")))
            .arg(&back),
    );
    let back = std::fs::read(&back).unwrap();
    assert!(back[12 * MIB as usize..13 * MIB as usize]
        .iter()
        .all(|&b| b == 0x5a));
    assert!(back[..img.len()] == img[..]);
    assert!(disk_bytes(&disk, 12 * MIB, MIB as usize)
        .iter()
        .all(|&b| b == 0x5a));
}

/// With TLS required, plaintext clients are refused as the spec says (`NBD_REP_ERR_TLS_REQD`,
/// shown by qemu), and so are wrong keys, certificates from another CA and clients without a
/// certificate; the server goes on serving. With `allow`, plaintext is served too.
#[test]
fn clients_without_valid_credentials_are_refused() {
    let pki = Pki::new();
    let (srv, _) = tls_server(&pki, Some(TlsMode::Require));
    let plain = run_fail(Command::new("qemu-img").args(["info", &srv.uri("vm")]));
    assert!(plain.contains("TLS negotiation required"), "{plain}");
    assert!(plain.contains("this server requires TLS"), "{plain}");
    run_fail(Command::new("nbdinfo").arg(srv.uri("vm")));
    run_fail(Command::new("nbdinfo").arg(srv.unix_uri("vm")));
    // A raw client sees the error code itself, and cannot list the exports.
    let mut c = RawClient::start(srv.port);
    c.send_option(3, &[]); // NBD_OPT_LIST
    let (opt, reply, msg) = c.read_option_reply();
    assert_eq!(
        (opt, reply),
        (3, (1 << 31) + 5),
        "{}",
        String::from_utf8_lossy(&msg)
    );
    run_fail(Command::new("nbdinfo").arg(psk_uri(srv.port, "vm", &pki.path("wrong-psk/keys.psk"))));
    run_fail(
        Command::new("qemu-img")
            .args([
                "info",
                "--object",
                &qemu_creds(true, &pki.path("wrong-psk")),
            ])
            .args(["--image-opts", &qemu_image(srv.port, "vm")]),
    );
    run_fail(Command::new("nbdinfo").arg(cert_uri(srv.port, "vm", &pki.path("rogue"))));
    // No client certificate at all (only the CA to check the server with).
    let anon = pki.path("anon");
    std::fs::create_dir(&anon).unwrap();
    std::fs::copy(pki.path("ca-cert.pem"), anon.join("ca-cert.pem")).unwrap();
    run_fail(Command::new("nbdinfo").arg(cert_uri(srv.port, "vm", &anon)));
    run_ok(Command::new("nbdinfo").arg(psk_uri(srv.port, "vm", &pki.path("psk/keys.psk"))));
    assert!(srv.running());
    drop(srv);

    let (srv, _) = tls_server(&pki, Some(TlsMode::Allow));
    srv.assert_serving("vm", 16 * MIB);
    run_ok(Command::new("nbdinfo").arg(psk_uri(srv.port, "vm", &pki.path("psk/keys.psk"))));
}

/// `parallax serve` with TLS from its config: keys from a relative path, clients served;
/// listening beyond loopback without TLS takes `--insecure`.
#[test]
fn serve_requires_tls_or_insecure_beyond_loopback() {
    let pki = Pki::new();
    let store = TestStore::new("256M");
    store.run(&["vdi", "create", "vm", "--size", "4M"]);
    std::fs::copy(pki.path("psk/keys.psk"), store.file("keys.psk")).unwrap();
    let d = Daemon::start_with(
        &store,
        r#"(commit_interval_ms: 500, nbd: (workers: 2, tls: (psk: "keys.psk")))"#,
        &[],
    );
    let size = run_ok(Command::new("nbdinfo").arg("--size").arg(psk_uri(
        d.port(),
        "vm",
        &store.file("keys.psk"),
    )));
    assert_eq!(String::from_utf8_lossy(&size.stdout).trim(), "4194304");
    run_fail(Command::new("nbdinfo").arg(d.uri("vm")));
    assert!(d.wait_stderr("client=psk:alice"), "{}", d.stderr());
    drop(d);

    let f = store.fail(&[
        "serve",
        "--listen",
        "0.0.0.0:0",
        "--unix",
        &store.file("n.sock").display().to_string(),
    ]);
    f.assert_one_line(1, "reachable from other hosts");
    assert!(f.stderr.contains("--insecure"), "{}", f.stderr);
    // With --insecure it starts, and says what that means.
    let err = std::fs::File::create(store.file("insecure.log")).unwrap();
    let mut child = store
        .cmd(&["serve", "--listen", "0.0.0.0:0", "--insecure", "--unix"])
        .arg(store.file("i.sock"))
        .stdout(std::process::Stdio::piped())
        .stderr(err)
        .spawn()
        .unwrap();
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    let ready = std::io::BufRead::lines(out)
        .map_while(Result::ok)
        .any(|l| l.starts_with(READY_PREFIX));
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(store.file("insecure.log")).unwrap();
    assert!(ready, "{log}");
    assert!(
        log.contains("without TLS (--insecure)") && log.contains("WARN"),
        "{log}"
    );
    let f = store.fail(&["serve", "--listen", "127.0.0.1:0", "--tls", "require"]);
    f.assert_one_line(1, "needs a certificate");
    let f = store.fail(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--tls-psk",
        "/nonexistent/keys",
    ]);
    f.assert_one_line(1, "PSK file /nonexistent/keys");
}

/// Access rules by identity: each client lists only what it may see, reads what it may read,
/// and writes only what it may write; the rest is as if it did not exist.
#[test]
fn access_rules_decide_what_each_client_sees_reads_and_writes() {
    use parallax::nbd::{Access, AccessPolicy, AccessRule};
    let pki = Pki::new();
    let bob = pki.path("bob");
    std::fs::create_dir(&bob).unwrap();
    run_ok(
        Command::new("psktool")
            .args(["-u", "bob", "-p"])
            .arg(bob.join("keys.psk")),
    );
    // One server key file with both clients' keys.
    let both = pki.path("both.psk");
    let text = std::fs::read_to_string(pki.path("psk/keys.psk")).unwrap()
        + &std::fs::read_to_string(bob.join("keys.psk")).unwrap();
    std::fs::write(&both, text).unwrap();

    let provider = Arc::new(TestProvider::new());
    for name in ["vm1", "vm2", "secret"] {
        provider.add(name, 4 * MIB, "a test VDI");
    }
    let tls = TlsServer::new(&TlsSettings {
        psk: Some(both),
        ..Default::default()
    })
    .unwrap();
    let rule = |c: &str, e: &str, allow| AccessRule {
        clients: vec![c.into()],
        exports: vec![e.into()],
        allow,
    };
    let access = AccessPolicy::new(vec![
        rule("psk:alice", "vm*", Access::Write),
        rule("psk:bob", "vm1", Access::Read),
        rule("psk:bob", "vm2", Access::See),
    ])
    .unwrap();
    let srv = TestServer::start_tls_with_access(provider, NbdConfig::default(), tls, access);
    let uri = |keys: &Path, export: &str| {
        let user = if keys.starts_with(&bob) {
            "bob"
        } else {
            "alice"
        };
        format!(
            "nbds://{user}@127.0.0.1:{}/{export}?tls-psk-file={}",
            srv.port,
            keys.display()
        )
    };
    let (alice_keys, bob_keys) = (pki.path("psk/keys.psk"), bob.join("keys.psk"));
    let list = |keys: &Path| {
        let out = run_ok(
            Command::new("nbdinfo")
                .args(["--list", "--json"])
                .arg(uri(keys, "")),
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut names: Vec<String> = v["exports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["export-name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    };
    assert_eq!(list(&alice_keys), ["vm1", "vm2"]);
    assert_eq!(list(&bob_keys), ["vm1", "vm2"]);
    let qemu_io = |user: &str, dir: &Path, export: &str, cmd: &str| {
        let mut c = Command::new("qemu-io");
        c.args([
            "--object",
            &format!(
                "tls-creds-psk,id=tls0,endpoint=client,username={user},dir={}",
                dir.display()
            ),
        ])
        .args(["--image-opts", &qemu_image(srv.port, export)])
        .args(["-c", cmd]);
        if cmd.starts_with("read") {
            c.arg("-r");
        }
        c
    };
    run_ok(&mut qemu_io(
        "alice",
        &pki.path("psk"),
        "vm1",
        "write -P 0x33 0 64k",
    ));
    // Bob reads what alice wrote, read-only; his write is refused.
    run_ok(&mut qemu_io("bob", &bob, "vm1", "read -P 0x33 0 64k"));
    let info = run_ok(Command::new("nbdinfo").arg(uri(&bob_keys, "vm1")));
    assert!(String::from_utf8_lossy(&info.stdout).contains("is_read_only: true"));
    let denied = run_fail(&mut qemu_io("bob", &bob, "vm1", "write -P 0x44 0 64k"));
    assert!(
        denied.contains("read-only") || denied.contains("ermission"),
        "{denied}"
    );
    // vm2: bob sees it but may not open it; `secret` exists for nobody.
    run_fail(Command::new("nbdinfo").arg(uri(&bob_keys, "vm2")));
    let e = run_fail(
        Command::new("qemu-img")
            .args(["info", "--object"])
            .arg(format!(
                "tls-creds-psk,id=tls0,endpoint=client,username=bob,dir={}",
                bob.display()
            ))
            .args(["--image-opts", &qemu_image(srv.port, "vm2")]),
    );
    // NBD_REP_ERR_POLICY, as qemu words it, with the server's message.
    assert!(
        e.contains("Denied by server") && e.contains("psk:bob may not open vm2"),
        "{e}"
    );
    for keys in [&alice_keys, &bob_keys] {
        let e = run_fail(Command::new("nbdinfo").arg(uri(keys, "secret")));
        assert!(e.contains("not found") || e.contains("No such"), "{e}");
    }
    run_ok(&mut qemu_io("bob", &bob, "vm1", "read -P 0x33 0 64k"));
}

/// Our own client with x509: `vdi import` from a daemon that requires client certificates
/// checks the server's certificate against the CA and its address, and presents its own.
#[test]
fn import_over_x509_presents_and_checks_certificates() {
    let pki = Pki::new();
    let src = TestStore::new("256M");
    let img = random_bytes(9, 3 * MIB as usize);
    src.import("tmpl", &img);
    let p = |n: &str| pki.path(n).display().to_string();
    let config = format!(
        r#"(nbd: (workers: 2, tls: (cert: "{}", key: "{}", ca: "{}")))"#,
        p("server-cert.pem"),
        p("server-key.pem"),
        p("ca-cert.pem")
    );
    let d = Daemon::start_with(&src, &config, &[]);
    let dst = TestStore::new("256M");
    let uri = |host: &str, dir: &str| {
        format!(
            "nbds://{host}:{}/tmpl?tls-certificates={}",
            d.port(),
            pki.path(dir).display()
        )
    };
    dst.run(&["vdi", "import", "copy", &uri("127.0.0.1", "client")]);
    assert!(dst.export("copy") == img);
    assert!(d.wait_stderr("client=cert:alice"), "{}", d.stderr());
    // By name too (the certificate names localhost).
    dst.run(&["vdi", "import", "by-name", &uri("localhost", "client")]);
    // A certificate from another CA, and none at all, are turned away.
    dst.fail(&["vdi", "import", "x", &uri("127.0.0.1", "rogue")])
        .assert_one_line(1, "nbds://");
    let anon = pki.path("anon");
    std::fs::create_dir(&anon).unwrap();
    std::fs::copy(pki.path("ca-cert.pem"), anon.join("ca-cert.pem")).unwrap();
    dst.fail(&["vdi", "import", "x", &uri("127.0.0.1", "anon")])
        .assert_one_line(1, "nbds://");
    // The client checks the server: a CA that did not sign its certificate fails.
    let other = pki.path("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::copy(pki.path("rogue-ca-cert.pem"), other.join("ca-cert.pem")).unwrap();
    let e = dst.fail(&["vdi", "import", "x", &uri("127.0.0.1", "other")]);
    e.assert_one_line(1, "certificate verify failed");
}
