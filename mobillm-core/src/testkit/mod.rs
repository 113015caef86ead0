//! Test support (feature `testkit`): tiny Llama models generated from a seed, written as GGUF (any storage type,
//! tokenizer included) or as a safetensors directory with `config.json` and `tokenizer.json`. Unit tests, the
//! server's end-to-end tests and the Kotlin harness all load these instead of downloading anything. Functions
//! here panic on I/O errors: they are for tests and harnesses, never for app code.

pub mod fuzz;

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

pub const HIDDEN: usize = 64;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const HEAD_DIM: usize = HIDDEN / HEADS;
pub const FFN: usize = 96;
pub const LAYERS: usize = 3;
pub const ROPE_THETA: f32 = 10_000.0;
pub const EPS: f32 = 1e-5;

/// Deterministic xorshift generator: the same model on every run and machine.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// GPT-2 byte-level vocabulary: the 256 byte symbols, a few merges, and one control token.
pub struct TinyVocab {
    pub tokens: Vec<String>,
    pub types: Vec<i32>,
    pub merges: Vec<String>,
}

pub fn tiny_vocab() -> TinyVocab {
    let mut tokens: Vec<String> =
        tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet().into_iter().map(String::from).collect();
    tokens.sort();
    let merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "r e", "a t", "Ġ p", "o s", "i t", "i v"];
    let mut merges_out = Vec::new();
    for m in merges {
        let (a, b) = m.split_once(' ').unwrap();
        tokens.push(format!("{a}{b}"));
        merges_out.push(m.to_string());
    }
    // Label words: " pos" / " neg" start with distinct tokens (" p" vs "Ġn").
    let mut types = vec![1; tokens.len()];
    tokens.push("<|endoftext|>".into());
    types.push(3);
    TinyVocab { tokens, types, merges: merges_out }
}

/// Weights of a tiny model in HF layout and orientation, as f32 tensors keyed by HF name.
pub struct TinyModel {
    pub vocab: TinyVocab,
    pub tensors: Vec<(String, Tensor)>,
    pub tied: bool,
}

impl TinyModel {
    pub fn vocab_size(&self) -> usize {
        self.vocab.tokens.len()
    }

    pub fn get(&self, name: &str) -> &Tensor {
        &self.tensors.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name}")).1
    }
}

pub fn tiny_model(seed: u64, tied: bool) -> TinyModel {
    let vocab = tiny_vocab();
    let v = vocab.tokens.len();
    let mut rng = Rng::new(seed);
    let mut mat = |rows: usize, cols: usize, scale: f32| -> Tensor {
        let data: Vec<f32> = (0..rows * cols).map(|_| rng.unit() * scale).collect();
        Tensor::from_vec(data, (rows, cols), &Device::Cpu).unwrap()
    };
    let kv = KV_HEADS * HEAD_DIM;
    let mut tensors = vec![("model.embed_tokens.weight".to_string(), mat(v, HIDDEN, 1.0))];
    if !tied {
        tensors.push(("lm_head.weight".into(), mat(v, HIDDEN, 0.3)));
    }
    let norm = |rng: &mut Rng| -> Tensor {
        let data: Vec<f32> = (0..HIDDEN).map(|_| 1.0 + 0.2 * rng.unit()).collect();
        Tensor::from_vec(data, HIDDEN, &Device::Cpu).unwrap()
    };
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        let s = 1.0 / (HIDDEN as f32).sqrt() * 1.7;
        tensors.push((format!("{p}.self_attn.q_proj.weight"), mat(HIDDEN, HIDDEN, s)));
        tensors.push((format!("{p}.self_attn.k_proj.weight"), mat(kv, HIDDEN, s)));
        tensors.push((format!("{p}.self_attn.v_proj.weight"), mat(kv, HIDDEN, s)));
        tensors.push((format!("{p}.self_attn.o_proj.weight"), mat(HIDDEN, HIDDEN, s)));
        tensors.push((format!("{p}.mlp.gate_proj.weight"), mat(FFN, HIDDEN, s)));
        tensors.push((format!("{p}.mlp.up_proj.weight"), mat(FFN, HIDDEN, s)));
        tensors.push((format!("{p}.mlp.down_proj.weight"), mat(HIDDEN, FFN, 1.0 / (FFN as f32).sqrt())));
    }
    let mut rng = Rng::new(seed ^ 0xABCD);
    for i in 0..LAYERS {
        tensors.push((format!("model.layers.{i}.input_layernorm.weight"), norm(&mut rng)));
        tensors.push((format!("model.layers.{i}.post_attention_layernorm.weight"), norm(&mut rng)));
    }
    tensors.push(("model.norm.weight".into(), norm(&mut rng)));
    TinyModel { vocab, tensors, tied }
}

/// HF → llama.cpp row order of Q/K (interleaved RoPE halves): GGUF row `h·hd + 2i + j` is HF row `h·hd + j·hd/2 + i`.
pub fn permute_for_gguf(t: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = t.dims2().unwrap();
    let hd = rows / heads;
    t.reshape((heads, 2, hd / 2, cols)).unwrap().transpose(1, 2).unwrap().reshape((rows, cols)).unwrap()
}

/// Writes the model as a llama GGUF with every matrix stored as `dtype` (norms stay F32), tokenizer included.
/// `edit` may change metadata or tensors before writing (for the error tests).
pub fn write_gguf_with(
    model: &TinyModel,
    path: &Path,
    dtype: GgmlDType,
    edit: impl FnOnce(&mut Vec<(String, Value)>, &mut Vec<(String, QTensor)>),
) {
    let gguf_name = |hf: &str| -> String {
        let hf = hf.strip_suffix(".weight").unwrap();
        let mapped = match hf {
            "model.embed_tokens" => "token_embd".to_string(),
            "lm_head" => "output".to_string(),
            "model.norm" => "output_norm".to_string(),
            other => {
                let rest = other.strip_prefix("model.layers.").unwrap();
                let (i, part) = rest.split_once('.').unwrap();
                let part = match part {
                    "self_attn.q_proj" => "attn_q",
                    "self_attn.k_proj" => "attn_k",
                    "self_attn.v_proj" => "attn_v",
                    "self_attn.o_proj" => "attn_output",
                    "mlp.gate_proj" => "ffn_gate",
                    "mlp.up_proj" => "ffn_up",
                    "mlp.down_proj" => "ffn_down",
                    "input_layernorm" => "attn_norm",
                    "post_attention_layernorm" => "ffn_norm",
                    p => panic!("unmapped {p}"),
                };
                format!("blk.{i}.{part}")
            }
        };
        format!("{mapped}.weight")
    };
    let mut tensors = Vec::new();
    for (name, t) in &model.tensors {
        let t = if name.ends_with("q_proj.weight") {
            permute_for_gguf(t, HEADS)
        } else if name.ends_with("k_proj.weight") {
            permute_for_gguf(t, KV_HEADS)
        } else {
            t.clone()
        };
        let dt = if t.rank() == 1 { GgmlDType::F32 } else { dtype };
        tensors.push((gguf_name(name), QTensor::quantize(&t, dt).unwrap()));
    }
    let strings = |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("llama.block_count".into(), Value::U32(LAYERS as u32)),
        ("llama.embedding_length".into(), Value::U32(HIDDEN as u32)),
        ("llama.feed_forward_length".into(), Value::U32(FFN as u32)),
        ("llama.attention.head_count".into(), Value::U32(HEADS as u32)),
        ("llama.attention.head_count_kv".into(), Value::U32(KV_HEADS as u32)),
        ("llama.rope.dimension_count".into(), Value::U32(HEAD_DIM as u32)),
        ("llama.rope.freq_base".into(), Value::F32(ROPE_THETA)),
        ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(EPS)),
        ("llama.context_length".into(), Value::U32(512)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        ("tokenizer.ggml.tokens".into(), strings(&model.vocab.tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(model.vocab.types.iter().map(|&t| Value::I32(t)).collect())),
        ("tokenizer.ggml.merges".into(), strings(&model.vocab.merges)),
    ];
    edit(&mut md, &mut tensors);
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

pub fn write_gguf(model: &TinyModel, path: &Path, dtype: GgmlDType) {
    write_gguf_with(model, path, dtype, |_, _| {});
}

/// An HF-style `tokenizer.json` for a byte-level BPE vocabulary, written as a JSON document (not through our
/// GGUF tokenizer builder), laid out like SmolLM2's published one.
pub fn tokenizer_json(tokens: &[String], types: &[i32], merges: &[String]) -> serde_json::Value {
    let vocab: serde_json::Map<String, serde_json::Value> =
        tokens.iter().enumerate().map(|(i, t)| (t.clone(), serde_json::json!(i))).collect();
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, &ty))| ty == 3)
        .map(|(i, (t, _))| {
            serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                               "normalized": false, "special": true})
        })
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    })
}

/// Writes `config.json`, `model.safetensors` and `tokenizer.json` into `dir`.
pub fn write_safetensors_dir(model: &TinyModel, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "vocab_size": model.vocab_size(),
        "rms_norm_eps": EPS, "rope_theta": ROPE_THETA, "max_position_embeddings": 512,
        "tie_word_embeddings": model.tied, "bos_token_id": 1, "eos_token_id": 2
    });
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    let map: HashMap<String, Tensor> = model.tensors.iter().cloned().collect();
    candle_core::safetensors::save(&map, dir.join("model.safetensors")).unwrap();
    let tok = tokenizer_json(&model.vocab.tokens, &model.vocab.types, &model.vocab.merges);
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
}

/// Writes a tiny model (seeded, tied embeddings) as a Q8_0 GGUF at `path`: the quickest complete backbone file.
pub fn write_tiny_gguf(seed: u64, path: &Path) {
    write_gguf(&tiny_model(seed, true), path, GgmlDType::Q8_0);
}
