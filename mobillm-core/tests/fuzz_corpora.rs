//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`, grown by `cargo fuzz`) through the fuzz targets'
//! bodies, so every input the fuzzers kept, crashes found and fixed included, stays a regression test in an
//! ordinary `cargo test`, without libFuzzer.

use std::path::Path;

use mobillm_core::testkit::fuzz;

fn replay(target: &str, body: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "{} holds no inputs", dir.display());
    for input in &inputs {
        let data = std::fs::read(input).unwrap();
        let outcome = std::panic::catch_unwind(|| body(&data));
        assert!(outcome.is_ok(), "{target}: {} panics", input.display());
    }
    eprintln!("{target}: {} inputs replayed", inputs.len());
}

#[test]
fn frame_corpus() {
    replay("frame", fuzz::frame);
}

#[test]
fn gguf_corpus() {
    replay("gguf", fuzz::gguf);
}

#[test]
fn adapter_corpus() {
    replay("adapter", fuzz::adapter);
}

#[test]
fn requests_corpus() {
    replay("requests", fuzz::requests);
}

#[test]
fn frame_body_corpus() {
    replay("frame_body", fuzz::frame_body);
}
