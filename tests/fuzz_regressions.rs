//! Replays the fuzz seed corpora and every input that once made a fuzz target fail
//! (`fuzz/regressions/<target>/`) through the same harnesses the fuzzers run (`fuzz/src`), so
//! a bug a fuzzer found stays fixed without building libFuzzer. `make fuzz` does the fuzzing.

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod harness;

use std::path::{Path, PathBuf};

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.expect("dir entry").path()).collect(),
        Err(_) => Vec::new(),
    };
    v.retain(|p| p.is_file() && p.file_name().is_none_or(|n| n != "README.md"));
    v.sort();
    v
}

fn replay(target: &str) {
    let (_, run) = harness::TARGETS
        .iter()
        .find(|(n, _)| *n == target)
        .expect("known target");
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let seeds = inputs(&fuzz.join("corpus").join(target));
    assert!(!seeds.is_empty(), "{target} has a seed corpus");
    let regressions = inputs(&fuzz.join("regressions").join(target));
    for path in seeds.iter().chain(&regressions) {
        let data = std::fs::read(path).expect("read input");
        eprintln!("{target}: {}", path.display());
        run(&data);
    }
}

#[test]
fn nbd_handshake() {
    replay("nbd_handshake");
}

#[test]
fn nbd_client() {
    replay("nbd_client");
}

#[test]
fn nbd_requests() {
    replay("nbd_requests");
}

#[test]
fn blkif_ring() {
    replay("blkif_ring");
}

#[test]
fn store_metadata() {
    replay("store_metadata");
}

#[test]
fn config() {
    replay("config");
}

#[test]
fn send_stream() {
    replay("send_stream");
}
