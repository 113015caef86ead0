#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mobillm_core::testkit::fuzz::requests(data));
