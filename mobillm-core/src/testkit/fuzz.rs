//! The fuzz targets' bodies (`fuzz/`, run with `cargo fuzz`), here so that the corpora they grow are replayed by
//! an ordinary test (`tests/fuzz_corpora.rs`) without libFuzzer. Each takes arbitrary bytes and must return
//! without panicking, aborting or allocating more than the input justifies; what it checks beyond that is
//! written next to it.

use std::io::Write;
use std::path::Path;

use crate::protocol::{CreateSession, TrainRequest};
use crate::side::DeviceAdapter;
use crate::wire::{Frame, Limits, Prefix};

/// Small limits, so the fuzzer explores shapes instead of allocating.
const LIMITS: Limits = Limits {
    max_decoded_bytes: 1 << 20,
    max_expansion: 64,
    max_samples: 64,
    max_layers: 8,
    max_dim: 256,
    max_width: 16,
    max_tokens: 512,
};

/// A wire frame. A frame that decodes re-encodes (at its own quantisation) to one that decodes to the same kind,
/// ids, dimensions, lengths and labels.
pub fn frame(data: &[u8]) {
    let _ = Prefix::read(data);
    let _ = Frame::decode_f16(data, &LIMITS);
    let Ok((frame, quant)) = Frame::decode(data, &LIMITS) else { return };
    let again = frame.encode(quant).expect("a decoded frame re-encodes");
    let unlimited = Limits { max_expansion: usize::MAX, ..LIMITS };
    let (back, _) = Frame::decode(&again, &unlimited).expect("a re-encoded frame decodes");
    assert_eq!(
        (back.kind, &back.ids, back.layers, back.dim, back.width, &back.lens, &back.labels),
        (frame.kind, &frame.ids, frame.layers, frame.dim, frame.width, &frame.lens, &frame.labels)
    );
}

/// A GGUF model file, loaded as the device would (written to a temporary file first: the loader reads files).
pub fn gguf(data: &[u8]) {
    let Ok(mut file) = tempfile::NamedTempFile::new() else { return };
    if file.write_all(data).is_err() {
        return;
    }
    let _ = crate::Backbone::load(file.path());
}

/// A device adapter file.
pub fn adapter(data: &[u8]) {
    let _ = DeviceAdapter::from_bytes(data, Path::new("fuzz.safetensors"));
}

/// The JSON requests the server reads.
pub fn requests(data: &[u8]) {
    if let Ok(req) = serde_json::from_slice::<CreateSession>(data) {
        let _ = req.validate();
    }
    let _ = serde_json::from_slice::<TrainRequest>(data);
}

/// A frame's body as the parser sees it once decompressed: the first two bytes pick the kind and quantisation,
/// the rest is the body, compressed here so that the fuzzer's mutations reach the parser instead of zstd.
pub fn frame_body(data: &[u8]) {
    let [kind, quant, body @ ..] = data else { return };
    let mut framed = crate::wire::MAGIC.to_vec();
    framed.extend_from_slice(&crate::wire::VERSION.to_le_bytes());
    framed.extend_from_slice(&[kind % 5, quant % 3]);
    framed.extend_from_slice(&0u32.to_le_bytes());
    framed.extend_from_slice(&(body.len() as u64).to_le_bytes());
    framed.extend(zstd::bulk::compress(body, 1).expect("zstd compresses any bytes"));
    frame(&framed);
}
