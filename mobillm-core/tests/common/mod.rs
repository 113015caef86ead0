//! Shared test helpers. The tiny random Llama models (both file formats, byte-level BPE vocabulary) come from
//! `mobillm_core::testkit`, so tests exercise the same parsing and forward code as the real model in
//! milliseconds.
#![allow(dead_code)]

pub mod assist;

use std::path::PathBuf;

use candle_core::quantized::GgmlDType;
pub use mobillm_core::testkit::*;

/// Random prompts of varied lengths over the normal (non-control) tokens.
pub fn random_prompts(seed: u64, n: usize, vocab: usize, max_len: usize) -> Vec<Vec<u32>> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let len = 1 + rng.below(max_len);
            (0..len).map(|_| rng.below(vocab - 1) as u32).collect()
        })
        .collect()
}

pub fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    let scale = b.iter().fold(1.0f32, |m, x| m.max(x.abs()));
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * scale, "{what}[{i}]: {x} vs {y} (tol {tol} × {scale})");
    }
}

/// Where the real model is cached, if it is. With `MOBILLM_REQUIRE_MODEL=1` (CI) its absence is a failure.
pub fn real_model() -> Option<PathBuf> {
    let path = match std::env::var_os("MOBILLM_MODEL") {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = match std::env::var_os("MOBILLM_CACHE") {
                Some(d) if !d.is_empty() => PathBuf::from(d),
                _ => dirs_cache()?.join("mobillm"),
            };
            cache.join("models").join("SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    };
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var("MOBILLM_REQUIRE_MODEL").as_deref() != Ok("1"),
        "MOBILLM_REQUIRE_MODEL=1 but {} does not exist: run `cargo xtask fetch-model`",
        path.display()
    );
    eprintln!("skipping: {} not cached (run `cargo xtask fetch-model`)", path.display());
    None
}

fn dirs_cache() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
}

/// A tiny model written as a GGUF of `dtype` into a fresh temporary directory, and loaded.
pub struct TinyBackbone {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub model: TinyModel,
    pub backbone: mobillm_core::Backbone,
}

pub fn tiny_backbone(seed: u64, dtype: GgmlDType) -> TinyBackbone {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(seed, true);
    let path = dir.path().join("m.gguf");
    write_gguf(&model, &path, dtype);
    let backbone = mobillm_core::Backbone::load(&path).unwrap();
    TinyBackbone { dir, path, model, backbone }
}
