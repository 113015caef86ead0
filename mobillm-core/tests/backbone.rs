//! Batching, taps, tokenizer and the typed errors of the loader, on tiny generated models.

mod common;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::*;
use mobillm_core::side::Summary;
use mobillm_core::{Backbone, Error, Task, TaskSpec, Tokenizer};

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn padded_batch_equals_one_at_a_time() {
    let TinyBackbone { model, backbone, .. } = tiny_backbone(3, GgmlDType::Q8_0);
    let prompts = random_prompts(4, 7, model.vocab_size(), 40);
    assert!(prompts.iter().map(Vec::len).min() != prompts.iter().map(Vec::len).max(), "lengths must differ");
    let taps = [0, 2];
    let labels = [5u32, 9, 40];
    let batched = backbone.llama().forward_pivots(&prompts, &taps, &labels).unwrap();
    assert_eq!(batched.taps.dims(), &[7, 2, HIDDEN]);
    assert_eq!(batched.label_logits.dims(), &[7, 3]);
    for (i, p) in prompts.iter().enumerate() {
        let single = backbone.llama().forward_pivots(std::slice::from_ref(p), &taps, &labels).unwrap();
        assert_close(&flat(&batched.taps.get(i).unwrap()), &flat(&single.taps), 1e-5, &format!("taps {i}"));
        assert_close(
            &flat(&batched.label_logits.get(i).unwrap()),
            &flat(&single.label_logits),
            1e-5,
            &format!("logits {i}"),
        );
        let (batched_means, single_means) = (batched.means.as_ref().unwrap(), single.means.as_ref().unwrap());
        assert_close(&flat(&batched_means.get(i).unwrap()), &flat(single_means), 1e-5, &format!("means {i}"));
        // The means average every token's state after the first (the first alone in a one-token prompt), per tap.
        let (_, tokens) = backbone.llama().forward_sequences(std::slice::from_ref(p), &taps, &labels).unwrap();
        let first = usize::from(p.len() > 1);
        let expected = tokens[0].narrow(0, first, p.len() - first).unwrap().mean(0).unwrap();
        assert_close(&flat(single_means), &flat(&expected), 1e-5, &format!("means of tokens {i}"));
    }
    // The last tap of the full set is the stream the logits are computed from: different taps really differ.
    let all = backbone.llama().forward_pivots(&prompts[..1], &[0, 1, 2], &labels).unwrap();
    let rows = flat(&all.taps);
    assert_ne!(rows[..HIDDEN], rows[HIDDEN..2 * HIDDEN]);
}

#[test]
fn forward_all_keeps_input_order_across_length_buckets() {
    let TinyBackbone { backbone, .. } = tiny_backbone(8, GgmlDType::F32);
    let task = Task::new(
        TaskSpec { template: "Text: {text}\nIs it pos or neg:".into(), labels: vec!["pos".into(), "neg".into()] },
        backbone.tokenizer(),
    )
    .unwrap();
    let texts = ["the one that is very long indeed, with 12345 digits", "short", "a middle one here", "x"];
    let mut seen = Vec::new();
    let all = backbone
        .forward_all(&task, &texts, &[0, 1], 2, Summary::PivotAndMean, |done, total| seen.push((done, total)))
        .unwrap();
    assert_eq!(seen, vec![(2, 4), (4, 4)]);
    for (i, text) in texts.iter().enumerate() {
        let one = backbone.forward_texts(&task, &[text], &[0, 1]).unwrap();
        assert_close(&flat(&all.label_logits.get(i).unwrap()), &flat(&one.label_logits), 1e-5, text);
        assert_close(&flat(&all.taps.get(i).unwrap()), &flat(&one.taps), 1e-5, text);
        let means = all.means.as_ref().unwrap().get(i).unwrap();
        assert_close(&flat(&means), &flat(one.means.as_ref().unwrap()), 1e-5, text);
    }
    // The pivots alone do not keep the means.
    let pivots = backbone.forward_all(&task, &texts, &[0, 1], 2, Summary::Pivot, |_, _| {}).unwrap();
    assert!(pivots.means.is_none());
    assert_eq!(flat(&pivots.taps), flat(&all.taps));
}

#[test]
fn gguf_tokenizer_matches_tokenizer_json() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(1, true);
    let path = dir.path().join("m.gguf");
    write_gguf(&model, &path, GgmlDType::F32);
    let v = &model.vocab;
    let json_path = dir.path().join("tokenizer.json");
    std::fs::write(&json_path, tokenizer_json(&v.tokens, &v.types, &v.merges).to_string()).unwrap();
    let from_json = Tokenizer::from_file(&json_path).unwrap();
    let backbone = Backbone::load(&path).unwrap();
    let from_gguf = backbone.tokenizer();
    for text in MIXED_TEXTS {
        let ids = from_gguf.encode(text).unwrap();
        assert_eq!(ids, from_json.encode(text).unwrap(), "{text:?}");
        assert_eq!(from_gguf.decode(&ids).unwrap(), *text, "round trip of {text:?}");
    }
    // Digits are split one by one before byte-level BPE, and control tokens are atomic.
    let ids = from_gguf.encode("2024<|endoftext|>").unwrap();
    assert_eq!(ids.len(), 5);
    assert_eq!(ids[4], (v.tokens.len() - 1) as u32);
}

const MIXED_TEXTS: &[&str] = &[
    "the theater is in the street",
    "Prices: 12345 and 3.14159, 1st of 2nd",
    "Café naïve résumé — déjà vu",
    "日本語のテキストと中文",
    "emoji 🤖👍🏽 and flags 🇫🇷",
    "runs   of    spaces\n\n\nand\ttabs \r\n end ",
    "  leading and trailing  ",
];

#[test]
fn task_label_words_and_validation() {
    let TinyBackbone { backbone, .. } = tiny_backbone(1, GgmlDType::F32);
    let tok = backbone.tokenizer();
    let spec = |t: &str, labels: &[&str]| TaskSpec {
        template: t.into(),
        labels: labels.iter().map(|s| s.to_string()).collect(),
    };
    let task = Task::new(spec("Review: {text}\nAnswer:", &["pos", "neg"]), tok).unwrap();
    assert_eq!(task.label_token_ids()[0], tok.token_to_id("Ġp").unwrap(), "first token of \" pos\"");
    assert_eq!(task.label_token_ids()[1], tok.token_to_id("Ġ").unwrap(), "first token of \" neg\"");
    assert_eq!(task.prompt("  hi  "), "Review: hi\nAnswer:");
    // Over-long prompts keep the cue at the end.
    let long_task =
        Task::new(spec("Review: {text}\nAnswer:", &["pos", "neg"]), tok).unwrap().with_max_prompt_tokens(16);
    let ids = long_task.encode(tok, &"word ".repeat(50)).unwrap();
    assert_eq!(ids.len(), 16);
    assert!(tok.decode(&ids).unwrap().ends_with("\nAnswer:"));

    for (bad, needle) in [
        (spec("no slot", &["a", "b"]), "exactly once"),
        (spec("{text}{text}", &["a", "b"]), "exactly once"),
        (spec("{text}:", &["only"]), "at least two labels"),
        (spec("{text}:", &["a", "a"]), "appears twice"),
        (spec("{text}:", &["pos", "post"]), "same token"),
    ] {
        let err = Task::new(bad, tok).unwrap_err();
        assert!(matches!(err, Error::InvalidTask(_)) && err.to_string().contains(needle), "{err}");
    }
}

#[test]
fn bad_inputs_to_the_forward_are_typed_errors() {
    let TinyBackbone { model, backbone, .. } = tiny_backbone(1, GgmlDType::F32);
    let llama = backbone.llama();
    let v = model.vocab_size() as u32;
    for (batch, taps, labels) in [
        (vec![], vec![0], vec![1]),
        (vec![vec![]], vec![0], vec![1]),
        (vec![vec![1, v]], vec![0], vec![1]),
        (vec![vec![1]], vec![0], vec![v]),
        (vec![vec![1]], vec![0], vec![]),
        (vec![vec![1]], vec![LAYERS], vec![1]),
        (vec![vec![1]], vec![1, 0], vec![1]),
        (vec![vec![1; 600]], vec![0], vec![1]),
    ] {
        let err = llama.forward_pivots(&batch, &taps, &labels).unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{batch:?} {taps:?} {labels:?}: {err}");
    }
}

fn load_err(path: &std::path::Path) -> Error {
    match Backbone::load(path) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e,
    }
}

#[test]
fn truncated_and_corrupt_gguf_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(2, true);
    let path = dir.path().join("m.gguf");
    write_gguf(&model, &path, GgmlDType::Q4_1);
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.gguf");
    // Cut inside the header, inside the tensor table, and inside the last tensor's data.
    for len in [0, 3, 7, 100, bytes.len() / 3, bytes.len() - 1] {
        std::fs::write(&cut, &bytes[..len]).unwrap();
        let err = load_err(&cut);
        assert!(matches!(err, Error::InvalidModelFile { .. } | Error::TruncatedTensor { .. }), "cut at {len}: {err}");
    }
    std::fs::write(&cut, &bytes[..bytes.len() - 1]).unwrap();
    let err = load_err(&cut);
    assert!(matches!(&err, Error::TruncatedTensor { tensor, .. } if !tensor.is_empty()), "{err}");
    assert!(err.to_string().contains("truncated"), "{err}");

    // Flipped bytes anywhere must never panic; what they break must come back as an error or a loadable model.
    let mut rng = Rng::new(99);
    for _ in 0..200 {
        let mut corrupt = bytes.clone();
        for _ in 0..4 {
            let i = rng.below(corrupt.len().min(4096));
            corrupt[i] ^= 1 << rng.below(8);
        }
        std::fs::write(&cut, &corrupt).unwrap();
        let _ = Backbone::load(&cut);
    }
    let missing = dir.path().join("nope.gguf");
    assert!(matches!(load_err(&missing), Error::Io { .. }));
}

#[test]
fn unsupported_type_missing_tensor_and_bad_config_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(2, true);
    let path = dir.path().join("m.gguf");

    write_gguf_with(&model, &path, GgmlDType::F32, |_, tensors| {
        let (_, t) = tensors.iter_mut().find(|(n, _)| n == "blk.1.attn_v.weight").unwrap();
        let dense = t.dequantize(&Device::Cpu).unwrap();
        *t = QTensor::quantize(&dense, GgmlDType::BF16).unwrap();
    });
    let err = load_err(&path);
    assert!(
        matches!(&err, Error::UnsupportedTensorType { tensor, dtype, .. } if tensor == "blk.1.attn_v.weight" && dtype == "BF16"),
        "{err}"
    );

    write_gguf_with(&model, &path, GgmlDType::F32, |_, tensors| tensors.retain(|(n, _)| n != "blk.2.ffn_up.weight"));
    assert!(matches!(load_err(&path), Error::MissingTensor(n) if n == "blk.2.ffn_up.weight"));

    write_gguf_with(&model, &path, GgmlDType::F32, |md, _| {
        md.iter_mut().find(|(k, _)| k == "llama.attention.head_count").unwrap().1 = Value::U32(5);
    });
    assert!(matches!(load_err(&path), Error::InvalidConfig(m) if m.contains("num_attention_heads")));

    write_gguf_with(&model, &path, GgmlDType::F32, |md, _| md.retain(|(k, _)| k != "llama.block_count"));
    assert!(matches!(load_err(&path), Error::InvalidConfig(m) if m.contains("llama.block_count")));

    write_gguf_with(&model, &path, GgmlDType::F32, |md, _| {
        md.iter_mut().find(|(k, _)| k == "general.architecture").unwrap().1 = Value::String("gpt2".into());
    });
    assert!(matches!(load_err(&path), Error::UnsupportedArchitecture(a) if a == "gpt2"));

    write_gguf_with(&model, &path, GgmlDType::F32, |_, tensors| {
        let (_, t) = tensors.iter_mut().find(|(n, _)| n == "blk.0.ffn_down.weight").unwrap();
        let wrong = Tensor::zeros((HIDDEN, FFN - 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        *t = QTensor::quantize(&wrong, GgmlDType::F32).unwrap();
    });
    assert!(matches!(load_err(&path), Error::TensorShape { tensor, .. } if tensor == "blk.0.ffn_down.weight"));

    // A safetensors directory whose config contradicts its tensors, or that lacks its config.
    let st = dir.path().join("st");
    write_safetensors_dir(&model, &st);
    let cfg = std::fs::read_to_string(st.join("config.json")).unwrap();
    std::fs::write(st.join("config.json"), cfg.replace("\"intermediate_size\": 96", "\"intermediate_size\": 128"))
        .unwrap();
    assert!(matches!(load_err(&st), Error::TensorShape { .. }));
    std::fs::remove_file(st.join("config.json")).unwrap();
    assert!(matches!(load_err(&st), Error::Io { .. }));
}
