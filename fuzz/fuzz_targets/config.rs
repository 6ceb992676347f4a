//! libFuzzer entry point; the harness is `parallax_fuzz::config` (fuzz/src).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| parallax_fuzz::config(data));
