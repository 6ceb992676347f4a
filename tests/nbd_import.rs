//! `parallax vdi import NAME URI`: a VDI pulled from another host's NBD export — a Parallax
//! daemon over TLS, or qemu-nbd — with only the data regions read, in direct and daemon mode.

use parallax_integration::{daemon::*, nbd::*};

const MIB: usize = 1 << 20;

/// A 24 MiB image: random data at 0–3 MiB and 16–17 MiB, a 4 KiB island at 10 MiB, zeros
/// elsewhere.
fn template_image() -> Vec<u8> {
    let mut img = vec![0u8; 24 * MIB];
    img[..3 * MIB].copy_from_slice(&random_bytes(1, 3 * MIB));
    img[16 * MIB..17 * MIB].copy_from_slice(&random_bytes(2, MIB));
    img[10 * MIB..10 * MIB + 4096].fill(0x7e);
    img
}

const DATA_BYTES: u64 = 4 * MIB as u64 + 4096;

/// A Parallax host serving `tmpl` (and its snapshot `tmpl@v1`) over TLS with a PSK for alice.
fn source_host() -> (TestStore, Daemon, Vec<u8>) {
    let img = template_image();
    let (src, d) = tls_source_host(&img);
    (src, d, img)
}

fn tls_uri(d: &Daemon, export: &str, keys: &str) -> String {
    format!(
        "nbds://alice@127.0.0.1:{}/{export}?tls-psk-file={keys}",
        d.port()
    )
}

/// From a Parallax daemon over TLS into a store opened directly, and into one a daemon owns
/// (which reads the key file itself: the relative path is made absolute for it). The copy is
/// byte for byte, its holes stay holes, and a snapshot works as a source too.
#[test]
fn import_from_a_parallax_host_over_tls() {
    let (src, d, img) = source_host();
    let keys = src.file("keys.psk").display().to_string();
    let dst = TestStore::new("256M");
    let v = dst.json(&[
        "vdi",
        "import",
        "copy",
        &tls_uri(&d, "tmpl", &keys),
        "--json",
    ]);
    assert_eq!(v["size"], img.len() as u64);
    assert_eq!(v["allocated"], DATA_BYTES, "{v}");
    assert!(
        dst.export("copy") == img,
        "the copy differs from the template"
    );
    // Only the data crossed the network: block status told the client where the holes are.
    let moved = format!("read_bytes={DATA_BYTES} ");
    assert!(d.wait_stderr(&moved), "{}", d.stderr());
    dst.run(&["vdi", "import", "v1", &tls_uri(&d, "tmpl@v1", &keys)]);
    assert!(dst.export("v1") == img);

    let owner = Daemon::start(&dst);
    let out = dst
        .cmd(&[
            "vdi",
            "import",
            "via-daemon",
            &tls_uri(&d, "tmpl", "keys.psk"),
        ])
        .current_dir(src.dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        owner.wait_stderr("vdi import via-daemon nbds://"),
        "{}",
        owner.stderr()
    );
    drop(owner);
    assert!(dst.export("via-daemon") == img);
    dst.assert_clean();
    drop(d);
}

/// What goes wrong is one line, and leaves no VDI behind.
#[test]
fn failed_imports_say_why_and_leave_nothing() {
    let (src, d, _) = source_host();
    let keys = src.file("keys.psk").display().to_string();
    let dst = TestStore::new("64M");
    let plain = format!("nbd://127.0.0.1:{}/tmpl", d.port());
    dst.fail(&["vdi", "import", "x", &plain])
        .assert_one_line(1, "requires TLS: use an nbds:// URI");
    dst.fail(&["vdi", "import", "x", &tls_uri(&d, "nope", &keys)])
        .assert_one_line(1, "no such export");
    dst.fail(&["vdi", "import", "x", "nbd://127.0.0.1:1/tmpl"])
        .assert_one_line(1, "Connection refused");
    dst.fail(&["vdi", "import", "x", "nbd+unix:///tmpl"])
        .assert_one_line(1, "needs ?socket=PATH");
    dst.fail(&[
        "vdi",
        "import",
        "x",
        &tls_uri(&d, "tmpl", &keys),
        "--size",
        "1M",
    ])
    .assert_one_line(1, "smaller than the export");
    let list = dst.json(&["vdi", "list", "--json"]);
    assert_eq!(list.as_array().map(|a| a.len()), Some(0), "{list}");
    dst.assert_clean();
}

/// From qemu-nbd over a unix socket: another NBD server, block status and all.
#[test]
fn import_from_qemu_nbd() {
    let dst = TestStore::new("256M");
    let img = template_image();
    let raw = dst.file("src.raw");
    write_file(&raw, &img);
    let sock = dst.file("q.sock");
    let q = QemuNbd::start(&raw, &sock);
    let uri = format!("nbd+unix:///base?socket={}", sock.display());
    let v = dst.json(&["vdi", "import", "base", &uri, "--json"]);
    drop(q);
    assert_eq!(v["allocated"], DATA_BYTES, "{v}");
    assert!(dst.export("base") == img);
}
