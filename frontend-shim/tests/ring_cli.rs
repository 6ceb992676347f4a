//! The `frontend-shim` binary, against its in-process backend (`--mem`).

use std::process::Command;

fn shim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_frontend-shim"))
        .args(args)
        .env_remove("PARALLAX_STORE")
        .env("RUST_LOG", "error")
        .output()
        .unwrap()
}

#[test]
fn verify_and_bench_commands() {
    let out = shim(&[
        "--mem",
        "16M",
        "verify",
        "x",
        "--ops",
        "800",
        "--ring-order",
        "1",
        "--queues",
        "2",
        "--indirect",
        "64",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["ops"], 800);
    assert_eq!(r["per_queue"].as_array().unwrap().len(), 2);

    let out = shim(&[
        "--mem",
        "16M",
        "bench",
        "x",
        "--rw",
        "randwrite",
        "--bs",
        "64k",
        "--depth",
        "8",
        "--seconds",
        "1",
        "--indirect",
        "32",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["block_size"], 65536);
    assert_eq!(r["errors"], 0);
    assert!(r["ops"].as_u64().unwrap() > 0);
    assert!(r["lat_p99_us"].as_f64().unwrap() >= r["lat_p50_us"].as_f64().unwrap());

    let out = shim(&[
        "--mem",
        "16M",
        "bench",
        "x",
        "--depth",
        "64",
        "--seconds",
        "1",
    ]);
    assert!(!out.status.success(), "depth 64 needs ring order 1");
    let out = shim(&["verify", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("PARALLAX_STORE"));
}
