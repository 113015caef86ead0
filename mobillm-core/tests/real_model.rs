//! Integration tests on the real default model (SmolLM2-135M-Instruct Q4_1), run when it is cached
//! (`cargo xtask fetch-model`; CI sets `MOBILLM_REQUIRE_MODEL=1` so that a missing model fails instead of
//! skipping). Run in release mode: `cargo test --release -p mobillm-core --test real_model`.

mod common;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama;
use common::*;
use mobillm_core::dataset::{UCI_LABELS, UCI_TEMPLATE};
use mobillm_core::{Backbone, Task, TaskSpec, Tokenizer};

const REVIEWS: &[&str] = &[
    "I loved this phone, the battery lasts for days and the screen is gorgeous.",
    "Terrible service, cold food and a rude waiter.",
    "Not bad.",
    "The plot was predictable but the acting saved it; 7/10 from me.",
];

fn uci_task(backbone: &Backbone) -> Task {
    let spec = TaskSpec { template: UCI_TEMPLATE.into(), labels: UCI_LABELS.map(String::from).to_vec() };
    Task::new(spec, backbone.tokenizer()).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn pivot_logits_match_candle_quantized_llama() {
    let Some(path) = real_model() else { return };
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let backbone = Backbone::load(&path).unwrap();
    let cfg = backbone.config().clone();
    assert_eq!(
        (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads),
        (30, 576, 9, 3)
    );
    assert_eq!((cfg.intermediate_size, cfg.vocab_size, cfg.rope_theta), (1536, 49152, 100_000.0));
    assert!(cfg.tie_word_embeddings);
    let task = uci_task(&backbone);

    let mut f = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut reference = quantized_llama::ModelWeights::from_gguf(content, &mut f, &Device::Cpu).unwrap();
    let labels = task.label_token_ids();
    for text in REVIEWS {
        let ids = task.encode(backbone.tokenizer(), text).unwrap();
        let ours = backbone.llama().forward_pivots(std::slice::from_ref(&ids), &[29], labels).unwrap();
        reference.clear_kv_cache();
        let x = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = flat(&reference.forward(&x, 0).unwrap());
        let expected: Vec<f32> = labels.iter().map(|&l| logits[l as usize]).collect();
        assert_close(&flat(&ours.label_logits), &expected, 2e-4, text);
    }
}

#[test]
fn padded_batch_matches_single_forwards_and_predicts_sentiment() {
    let Some(path) = real_model() else { return };
    let backbone = Backbone::load(&path).unwrap();
    let task = uci_task(&backbone);
    let taps = backbone.all_taps();
    let batch = backbone.forward_texts(&task, REVIEWS, &taps).unwrap();
    assert_eq!(batch.taps.dims(), &[REVIEWS.len(), 30, 576]);
    for (i, text) in REVIEWS.iter().enumerate() {
        let single = backbone.forward_texts(&task, &[text], &taps).unwrap();
        assert_close(&flat(&batch.taps.get(i).unwrap()), &flat(&single.taps), 1e-4, text);
        assert_close(&flat(&batch.label_logits.get(i).unwrap()), &flat(&single.label_logits), 1e-4, text);
    }
    let predicted = batch.label_logits.argmax(1).unwrap().to_vec1::<u32>().unwrap();
    assert_eq!(predicted[0], 1, "clearly positive review");
    assert_eq!(predicted[1], 0, "clearly negative review");
}

#[test]
fn gguf_tokenizer_matches_a_tokenizer_json_of_the_same_vocabulary() {
    let Some(path) = real_model() else { return };
    let mut f = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let strings = |k: &str| -> Vec<String> {
        content.metadata[k].to_vec().unwrap().iter().map(|v| v.to_string().unwrap().clone()).collect()
    };
    let tokens = strings("tokenizer.ggml.tokens");
    let merges = strings("tokenizer.ggml.merges");
    let types: Vec<i32> =
        content.metadata["tokenizer.ggml.token_type"].to_vec().unwrap().iter().map(|v| v.to_i32().unwrap()).collect();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("tokenizer.json");
    std::fs::write(&json, tokenizer_json(&tokens, &types, &merges).to_string()).unwrap();
    let reference = Tokenizer::from_file(&json).unwrap();

    let from_gguf = Tokenizer::from_gguf_metadata(&content.metadata).unwrap();
    assert_eq!(from_gguf.vocab_size(), 49152);
    assert_eq!(from_gguf.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(from_gguf.token_to_id("<|im_end|>"), Some(2));
    let texts = [
        "Review: Great for the jawbone.\nSentiment (positive or negative):",
        "Prices rose 12345% in 2024 — 3.14 vs 2.71",
        "Café naïve résumé, déjà vu, Straße",
        "日本語のテキストと中文，한국어도",
        "emoji 🤖👍🏽 and flags 🇫🇷!",
        "runs   of    spaces\n\n\nand\ttabs \r\n end ",
        "<|im_start|>user\nhi<|im_end|>",
    ];
    for text in texts {
        let ids = from_gguf.encode(text).unwrap();
        assert_eq!(ids, reference.encode(text).unwrap(), "{text:?}");
        assert_eq!(from_gguf.decode(&ids).unwrap(), text);
    }
    // SmolLM2 splits digits one by one.
    let ids = from_gguf.encode("2024").unwrap();
    assert_eq!(ids.len(), 4);
}
