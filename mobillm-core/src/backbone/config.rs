//! Hyper-parameters of a Llama-architecture decoder, read from GGUF metadata or an HF `config.json`, and checked
//! for consistency before any weight is read (so a bad file fails with a message, not a shape error deep inside a
//! matmul, and absurd sizes never reach an allocation).

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
}

/// Generous bounds that no real small-device model exceeds; they turn a corrupt header into an error instead of
/// a multi-gigabyte allocation.
const MAX_HIDDEN: usize = 32_768;
const MAX_LAYERS: usize = 512;
const MAX_VOCAB: usize = 1 << 20;

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn kv_dim(&self) -> usize {
        self.head_dim() * self.num_key_value_heads
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return bad(format!("{name} must be positive"));
        }
        if self.hidden_size > MAX_HIDDEN || self.intermediate_size > 8 * MAX_HIDDEN {
            return bad(format!(
                "hidden_size {} / intermediate_size {} are beyond any supported model",
                self.hidden_size, self.intermediate_size
            ));
        }
        if self.num_hidden_layers > MAX_LAYERS || self.vocab_size > MAX_VOCAB {
            return bad(format!(
                "num_hidden_layers {} / vocab_size {} are beyond any supported model",
                self.num_hidden_layers, self.vocab_size
            ));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!("head dimension {} must be even for rotary embeddings", self.head_dim()));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad(format!("rms_norm_eps {} must be a positive number", self.rms_norm_eps));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!("rope_theta {} must be a positive number", self.rope_theta));
        }
        Ok(())
    }

    /// Reads the `llama.*` keys of a GGUF header. `vocab_size` comes from the embedding table's shape, which the
    /// caller passes, because many GGUF writers omit `llama.vocab_size`.
    pub fn from_gguf_metadata(
        md: &HashMap<String, Value>,
        vocab_size: usize,
        tie_word_embeddings: bool,
    ) -> Result<Self> {
        let arch = md.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
        if arch != "llama" {
            return Err(Error::UnsupportedArchitecture(arch));
        }
        let hidden_size = md_usize(md, "llama.embedding_length")?;
        let num_attention_heads = md_usize(md, "llama.attention.head_count")?;
        let cfg = LlamaConfig {
            hidden_size,
            intermediate_size: md_usize(md, "llama.feed_forward_length")?,
            num_hidden_layers: md_usize(md, "llama.block_count")?,
            num_attention_heads,
            num_key_value_heads: md_opt_usize(md, "llama.attention.head_count_kv")?.unwrap_or(num_attention_heads),
            vocab_size,
            rms_norm_eps: md_f64(md, "llama.attention.layer_norm_rms_epsilon")?,
            rope_theta: md_opt_f64(md, "llama.rope.freq_base")?.unwrap_or(10_000.0) as f32,
            max_position_embeddings: md_opt_usize(md, "llama.context_length")?.unwrap_or(2048),
            tie_word_embeddings,
        };
        cfg.validate()?;
        // Partial rotary embeddings exist in other families; a Llama GGUF rotates the whole head.
        if let Some(rope_dim) = md_opt_usize(md, "llama.rope.dimension_count")? {
            if rope_dim != cfg.head_dim() {
                return Err(Error::InvalidConfig(format!(
                    "llama.rope.dimension_count {rope_dim} differs from the head dimension {}",
                    cfg.head_dim()
                )));
            }
        }
        Ok(cfg)
    }

    /// Parses an HF `config.json` of the Llama layout (`model_type: "llama"`).
    pub fn from_hf_json(json: &str) -> Result<Self> {
        #[derive(Deserialize)]
        struct Hf {
            model_type: Option<String>,
            hidden_size: usize,
            intermediate_size: usize,
            num_hidden_layers: usize,
            num_attention_heads: usize,
            num_key_value_heads: Option<usize>,
            vocab_size: usize,
            rms_norm_eps: f64,
            rope_theta: Option<f32>,
            max_position_embeddings: Option<usize>,
            #[serde(default)]
            tie_word_embeddings: bool,
        }
        let hf: Hf = serde_json::from_str(json).map_err(|e| Error::InvalidConfig(format!("config.json: {e}")))?;
        match hf.model_type.as_deref() {
            Some("llama") | None => {}
            Some(other) => return Err(Error::UnsupportedArchitecture(other.to_string())),
        }
        let cfg = LlamaConfig {
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            num_key_value_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            vocab_size: hf.vocab_size,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta: hf.rope_theta.unwrap_or(10_000.0),
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: hf.tie_word_embeddings,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

fn md_opt_usize(md: &HashMap<String, Value>, key: &str) -> Result<Option<usize>> {
    let Some(v) = md.get(key) else { return Ok(None) };
    let n: i128 = match v {
        Value::U8(x) => (*x).into(),
        Value::I8(x) => (*x).into(),
        Value::U16(x) => (*x).into(),
        Value::I16(x) => (*x).into(),
        Value::U32(x) => (*x).into(),
        Value::I32(x) => (*x).into(),
        Value::U64(x) => (*x).into(),
        Value::I64(x) => (*x).into(),
        other => return Err(Error::InvalidConfig(format!("metadata `{key}` should be an integer, found {other:?}"))),
    };
    usize::try_from(n).map(Some).map_err(|_| Error::InvalidConfig(format!("metadata `{key}` = {n} is out of range")))
}

fn md_usize(md: &HashMap<String, Value>, key: &str) -> Result<usize> {
    md_opt_usize(md, key)?.ok_or_else(|| Error::InvalidConfig(format!("missing metadata `{key}`")))
}

fn md_opt_f64(md: &HashMap<String, Value>, key: &str) -> Result<Option<f64>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::F32(x)) => Ok(Some(*x as f64)),
        Some(Value::F64(x)) => Ok(Some(*x)),
        Some(other) => Err(Error::InvalidConfig(format!("metadata `{key}` should be a float, found {other:?}"))),
    }
}

fn md_f64(md: &HashMap<String, Value>, key: &str) -> Result<f64> {
    md_opt_f64(md, key)?.ok_or_else(|| Error::InvalidConfig(format!("missing metadata `{key}`")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_json(extra: &str) -> String {
        format!(
            r#"{{"model_type":"llama","hidden_size":64,"intermediate_size":96,"num_hidden_layers":2,
               "num_attention_heads":4,"num_key_value_heads":2,"vocab_size":300,"rms_norm_eps":1e-5{extra}}}"#
        )
    }

    #[test]
    fn hf_config_defaults_and_head_dims() {
        let cfg = LlamaConfig::from_hf_json(&tiny_json("")).unwrap();
        assert_eq!(cfg.head_dim(), 16);
        assert_eq!(cfg.kv_dim(), 32);
        assert_eq!(cfg.rope_theta, 10_000.0);
        assert!(!cfg.tie_word_embeddings);
    }

    #[test]
    fn inconsistent_configs_are_named() {
        let cases = [
            (r#","num_key_value_heads":3"#, "not a multiple of num_key_value_heads"),
            (r#","rms_norm_eps":0"#, "rms_norm_eps"),
            (r#","num_hidden_layers":0"#, "num_hidden_layers must be positive"),
            (r#","hidden_size":1000000"#, "beyond any supported model"),
            (r#","hidden_size":66"#, "not divisible by num_attention_heads"),
        ];
        for (extra, needle) in cases {
            // Patch the object: a duplicated key would be a parse error of its own.
            let mut v: serde_json::Value = serde_json::from_str(&tiny_json("")).unwrap();
            let patch: serde_json::Value = serde_json::from_str(&format!("{{{}}}", &extra[1..])).unwrap();
            for (k, val) in patch.as_object().unwrap() {
                v[k] = val.clone();
            }
            let err = LlamaConfig::from_hf_json(&v.to_string()).unwrap_err();
            assert!(matches!(err, Error::InvalidConfig(_)), "{extra}: {err}");
            assert!(err.to_string().contains(needle), "{extra}: {err}");
        }
        let err = LlamaConfig::from_hf_json(&tiny_json("").replace("llama", "gpt_neox")).unwrap_err();
        assert!(matches!(err, Error::UnsupportedArchitecture(ref a) if a == "gpt_neox"), "{err}");
        let err = LlamaConfig::from_hf_json("{").unwrap_err();
        assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
    }
}
