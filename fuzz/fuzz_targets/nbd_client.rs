//! libFuzzer entry point; the harness is `parallax_fuzz::nbd_client` (fuzz/src).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| parallax_fuzz::nbd_client(data));
