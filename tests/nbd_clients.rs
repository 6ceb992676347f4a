//! The NBD server against real clients: qemu-img, qemu-io, nbdinfo, nbdcopy and fio, with the
//! server in-process over in-memory disks. Every test checks data end to end, against the
//! backing disk or a file the client wrote.

use std::{process::Command, sync::Arc};

use parallax::{
    disk::{Disk, ExtentState, MemDisk},
    nbd::NbdConfig,
};
use parallax_integration::nbd::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn server_with(size: u64) -> (TestServer, Arc<MemDisk>) {
    let provider = Arc::new(TestProvider::new());
    let disk = provider.add("vm", size, "a test VDI");
    (TestServer::start(provider, NbdConfig::default()), disk)
}

/// A raw image of `size` bytes: random data in every other 1 MiB region, except a few
/// sub-block islands in the holes, so it has both data and holes.
fn sparse_image(seed: u64, size: u64) -> Vec<u8> {
    let mut img = vec![0u8; size as usize];
    let data = random_bytes(seed, size as usize);
    for (i, chunk) in img.chunks_mut(MIB as usize).enumerate() {
        if i % 2 == 0 {
            let at = i * MIB as usize;
            chunk.copy_from_slice(&data[at..at + chunk.len()]);
        } else {
            chunk[5000..5100].fill(0x5a);
        }
    }
    img
}

#[test]
fn qemu_img_info_convert_compare_map() {
    let size = 16 * MIB;
    let (srv, disk) = server_with(size);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let img = sparse_image(1, size);
    write_file(&src, &img);

    let info = run_ok(Command::new("qemu-img").args(["info", "--output=json", &srv.uri("vm")]));
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["virtual-size"], size);

    // Into the export, then compare from both ends.
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(srv.uri("vm")),
    );
    assert!(
        disk_bytes(&disk, 0, size as usize) == img,
        "export differs from the source image"
    );
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(srv.uri("vm")),
    );

    // Out of the export (over the Unix socket this time).
    let out = dir.path().join("out.img");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(srv.unix_uri("vm"))
            .arg(&out),
    );
    assert!(std::fs::read(&out).unwrap() == img, "copy out differs");

    // The map shows data where the image has data and holes elsewhere.
    let map = run_ok(Command::new("qemu-img").args([
        "map",
        "--output=json",
        "-f",
        "raw",
        &srv.uri("vm"),
    ]));
    let map: Value = serde_json::from_slice(&map.stdout).unwrap();
    let mut covered = 0u64;
    let mut holes = 0u64;
    for e in map.as_array().unwrap() {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        assert_eq!(start, covered, "map is contiguous");
        covered += len;
        if e["data"] == false {
            assert_eq!(e["zero"], true);
            holes += len;
            assert!(img[start as usize..(start + len) as usize]
                .iter()
                .all(|&b| b == 0));
        }
        let st = disk.block_status(start, len, 1).unwrap()[0].state;
        assert_eq!(
            st == ExtentState::Data,
            e["data"] == true,
            "extent at {start}"
        );
    }
    assert_eq!(covered, size);
    assert!(
        holes >= 6 * MIB,
        "expected holes in the map, got {holes} bytes"
    );
}

#[test]
fn qemu_io_patterns_zeroes_discard_flush() {
    let (srv, disk) = server_with(4 * MIB);
    let uri = srv.uri("vm");
    let out = run_ok(Command::new("qemu-io").args(["-f", "raw", &uri]).args([
        "-c",
        "write -P 0xab 1000 5000",
        "-c",
        "write -P 0xcd 1048575 3",
        "-c",
        "write -P 0x11 2097152 262144",
        "-c",
        "write -z 2101248 8192",
        "-c",
        "discard 2162688 65536",
        "-c",
        "flush",
        "-c",
        "read -P 0xab 1000 5000",
        "-c",
        "read -P 0xcd 1048575 3",
        "-c",
        "read -P 0 2101248 8192",
        "-c",
        "read -P 0 2162688 65536",
        "-c",
        "read -P 0x11 2097152 4096",
    ]));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("failed"), "{text}");
    assert!(!text.contains("Pattern verification"), "{text}");
    assert_eq!(text.matches("wrote ").count(), 4, "{text}");
    assert_eq!(text.matches("read ").count(), 5, "{text}");

    // Check the disk itself.
    assert!(disk_bytes(&disk, 1000, 5000).iter().all(|&b| b == 0xab));
    assert_eq!(disk_bytes(&disk, 999, 1), [0]);
    assert_eq!(disk_bytes(&disk, 6000, 1), [0]);
    assert_eq!(disk_bytes(&disk, 1048574, 5), [0, 0xcd, 0xcd, 0xcd, 0]);
    assert!(disk_bytes(&disk, 2101248, 8192).iter().all(|&b| b == 0));
    assert!(disk_bytes(&disk, 2162688, 65536).iter().all(|&b| b == 0));
    assert!(disk_bytes(&disk, 2097152 + 262144 - 4096, 4096)
        .iter()
        .all(|&b| b == 0x11));
    // The discarded range is a hole again.
    assert_eq!(
        disk.block_status(2162688, 65536, 4).unwrap()[0].state,
        ExtentState::Hole
    );
}

#[test]
fn read_only_snapshot_refuses_writes() {
    let provider = Arc::new(TestProvider::new());
    let disk = provider.add("vm", 4 * MIB, "writable");
    disk.write_at(&[0x77; 4096], 0, false).unwrap();
    provider.add_snapshot("vm@base", &disk, "frozen");
    let srv = TestServer::start(provider, NbdConfig::default());

    let text = run_fail(Command::new("qemu-io").args([
        "-f",
        "raw",
        &srv.uri("vm@base"),
        "-c",
        "write -P 1 0 4096",
    ]));
    assert!(
        ["read-only", "Operation not permitted", "Permission denied"]
            .iter()
            .any(|m| text.contains(m)),
        "unexpected error: {text}"
    );
    // Read-only opens still read.
    let out = run_ok(Command::new("qemu-io").args([
        "-r",
        "-f",
        "raw",
        &srv.uri("vm@base"),
        "-c",
        "read -P 0x77 0 4096",
    ]));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("fail"));
    let info = run_ok(Command::new("nbdinfo").args(["--json", &srv.uri("vm@base")]));
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["exports"][0]["is_read_only"], true);
    let info = run_ok(Command::new("nbdinfo").args(["--json", &srv.uri("vm")]));
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["exports"][0]["is_read_only"], false);
    assert_eq!(info["exports"][0]["can_multi_conn"], true);
    assert_eq!(info["exports"][0]["can_fast_zero"], true);
    assert_eq!(info["exports"][0]["block_size_maximum"], 64 * MIB);
}

#[test]
fn nbdinfo_list_and_map() {
    let provider = Arc::new(TestProvider::new());
    let disk = provider.add("vm", 8 * MIB, "the first VDI");
    provider.add("other", MIB, "another one");
    provider.add_snapshot("vm@monday", &disk, "Monday's snapshot");
    let srv = TestServer::start(provider, NbdConfig::default());

    let out = run_ok(Command::new("nbdinfo").args(["--list", "--json", &srv.uri("")]));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let exports = list["exports"].as_array().unwrap();
    assert_eq!(exports.len(), 3, "{list}");
    let by_name = |n: &str| {
        exports
            .iter()
            .find(|e| e["export-name"] == n)
            .unwrap_or_else(|| panic!("{n} missing"))
    };
    assert_eq!(by_name("vm")["description"], "the first VDI");
    assert_eq!(by_name("vm@monday")["description"], "Monday's snapshot");
    assert_eq!(by_name("vm@monday")["is_read_only"], true);
    assert_eq!(by_name("other")["export-size"], MIB);
    let plain = run_ok(Command::new("nbdinfo").args(["--list", &srv.uri("")]));
    assert!(String::from_utf8_lossy(&plain.stdout).contains("description: another one"));

    // Write 1 MiB, then trim a 64 KiB hole into it: the map shows data, hole, data, hole.
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", &srv.uri("vm")])
            .args(["-c", "write -P 3 0 1M", "-c", "discard 262144 65536"]),
    );
    let out = run_ok(Command::new("nbdinfo").args(["--map", "--json", &srv.uri("vm")]));
    let map: Value = serde_json::from_slice(&out.stdout).unwrap();
    let got: Vec<(u64, u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (0, 262144, 0),
            (262144, 65536, 3),
            (327680, MIB - 327680, 0),
            (MIB, 7 * MIB, 3)
        ],
        "{map}"
    );
}

#[test]
fn nbdcopy_round_trip_multi_conn() {
    let size = 24 * MIB;
    let (srv, disk) = server_with(size);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let out = dir.path().join("out.img");
    let img = sparse_image(2, size);
    write_file(&src, &img);

    let before = srv.stats.get().connections_total;
    run_ok(
        Command::new("nbdcopy")
            .args(["--connections=4", "--threads=4", "--requests=16"])
            .arg(&src)
            .arg(srv.uri("vm")),
    );
    let after_in = srv.stats.get().connections_total;
    assert!(
        after_in - before >= 4,
        "nbdcopy did not use multi-conn ({} connections)",
        after_in - before
    );
    assert!(
        disk_bytes(&disk, 0, size as usize) == img,
        "export differs after nbdcopy in"
    );

    run_ok(
        Command::new("nbdcopy")
            .args(["--connections=4", "--threads=4"])
            .arg(srv.uri("vm"))
            .arg(&out),
    );
    assert!(srv.stats.get().connections_total - after_in >= 4);
    assert!(std::fs::read(&out).unwrap() == img, "copy out differs");
    // nbdcopy skips zero regions: the holes of the source stay holes.
    assert_eq!(
        disk.block_status(MIB, 4096, 1).unwrap()[0].state,
        ExtentState::Hole
    );
}

#[test]
fn fio_random_writes_verify() {
    let (srv, _disk) = server_with(32 * MIB);
    let out = run_ok(Command::new("fio").args([
        "--name=nbd-verify",
        "--ioengine=nbd",
        &format!("--uri={}", srv.uri("vm")),
        "--rw=randwrite",
        "--bs=4k",
        "--size=16m",
        "--iodepth=16",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--do_verify=1",
        "--output-format=json",
    ]));
    // fio prints "fio: connected to NBD server" before the report.
    let text = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&text[text.find('{').expect("fio report")..]).unwrap();
    let job = &report["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert_eq!(job["write"]["io_bytes"], 16 * MIB);
    // The verify pass read everything back.
    assert_eq!(job["read"]["io_bytes"], 16 * MIB);
    assert!(srv.stats.get().requests >= 2 * 4096);
}

#[test]
fn graceful_shutdown_returns() {
    let (srv, _disk) = server_with(MIB);
    srv.assert_serving("vm", MIB);
    let mut c = RawClient::start(srv.port);
    c.go("vm", true, true);
    srv.stop().expect("server run() returned an error");
    assert!(c.closed_by_server());
}
