//! libFuzzer entry point; the harness is `parallax_fuzz::blkif_ring` (fuzz/src).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| parallax_fuzz::blkif_ring(data));
