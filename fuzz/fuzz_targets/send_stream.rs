//! libFuzzer entry point; the harness is `parallax_fuzz::send_stream` (fuzz/src).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| parallax_fuzz::send_stream(data));
