//! Reading Llama weights from a GGUF file or from safetensors + `config.json` into one in-memory layout
//! ([`LlamaWeights`]) that the forward pass consumes. All layout differences between the two formats are resolved
//! here, so the forward has a single code path:
//! - GGUF Llama files store the rows of Q and K permuted for interleaved RoPE; the loader puts them back in HF
//!   order (a pure row permutation, so quantized blocks are moved, never re-quantized) and the forward always
//!   uses half-split RoPE.
//! - A missing output matrix means tied embeddings.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::{ggml_file::qtensor_from_ggml, gguf_file};
use candle_core::{DType, Device, Tensor};

use super::config::LlamaConfig;
use super::weights::{is_supported_gguf_type, vector_f32, Weight, SUPPORTED_GGUF_TYPES};
use crate::error::{Error, Result};

/// Weights of one decoder block.
#[derive(Debug)]
pub struct BlockWeights {
    pub attn_norm: Tensor,
    pub q: Weight,
    pub k: Weight,
    pub v: Weight,
    pub o: Weight,
    pub ffn_norm: Tensor,
    pub gate: Weight,
    pub up: Weight,
    pub down: Weight,
}

#[derive(Debug)]
pub struct LlamaWeights {
    pub config: LlamaConfig,
    pub embed: Weight,
    /// `None` when the output head is tied to `embed`.
    pub lm_head: Option<Weight>,
    pub blocks: Vec<BlockWeights>,
    pub final_norm: Tensor,
}

/// An open GGUF file: parsed header plus a handle for reading tensors on demand.
pub struct GgufFile {
    path: PathBuf,
    file: File,
    file_len: u64,
    pub content: gguf_file::Content,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| Error::InvalidModelFile { path: path.to_path_buf(), reason: e.to_string() })?;
        Ok(Self { path: path.to_path_buf(), file, file_len, content })
    }

    fn info(&self, name: &str) -> Result<&gguf_file::TensorInfo> {
        self.content.tensor_infos.get(name).ok_or_else(|| Error::MissingTensor(name.to_string()))
    }

    /// Reads tensor `name`, checking its shape (PyTorch order) and type before touching its data.
    /// `unpermute_heads` undoes llama.cpp's Q/K row permutation for that many heads.
    fn read(&mut self, name: &str, expected: &[usize], unpermute_heads: Option<usize>) -> Result<Weight> {
        let info = self.info(name)?;
        let (dtype, dims, offset) = (info.ggml_dtype, info.shape.dims().to_vec(), info.offset);
        if dims != expected {
            return Err(Error::TensorShape { tensor: name.to_string(), expected: expected.to_vec(), found: dims });
        }
        if !is_supported_gguf_type(dtype) {
            return Err(Error::UnsupportedTensorType {
                tensor: name.to_string(),
                dtype: format!("{dtype:?}"),
                supported: SUPPORTED_GGUF_TYPES,
            });
        }
        let row_len = *dims.last().unwrap_or(&1);
        if !row_len.is_multiple_of(dtype.block_size()) {
            return Err(Error::InvalidModelFile {
                path: self.path.clone(),
                reason: format!("tensor `{name}` rows of {row_len} values do not fill whole {dtype:?} blocks"),
            });
        }
        let n_rows = dims.iter().product::<usize>() / row_len;
        let row_bytes = row_len / dtype.block_size() * dtype.type_size();
        let size = (n_rows * row_bytes) as u64;
        let start = self.content.tensor_data_offset.saturating_add(offset);
        let end = start.saturating_add(size);
        if end > self.file_len {
            return Err(Error::TruncatedTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
                start,
                end,
                file_len: self.file_len,
            });
        }
        let mut raw = vec![0u8; size as usize];
        let path = &self.path;
        self.file.seek(SeekFrom::Start(start)).map_err(|e| Error::io(path, e))?;
        self.file.read_exact(&mut raw).map_err(|e| Error::io(path, e))?;
        if let Some(heads) = unpermute_heads {
            raw = unpermute_rope_rows(&raw, n_rows, row_bytes, heads);
        }
        let q = qtensor_from_ggml(dtype, &raw, dims, &Device::Cpu)?;
        Ok(Weight::Quantized(q))
    }

    fn vector(&mut self, name: &str, len: usize) -> Result<Tensor> {
        let w = self.read(name, &[len], None)?;
        vector_f32(&w)
    }

    pub fn load_llama(&mut self) -> Result<LlamaWeights> {
        let embed_dims = self.info("token_embd.weight")?.shape.dims().to_vec();
        let &[vocab_size, _] = embed_dims.as_slice() else {
            return Err(Error::InvalidModelFile {
                path: self.path.clone(),
                reason: format!("token_embd.weight has shape {embed_dims:?}, expected [vocab, hidden]"),
            });
        };
        let tied = !self.content.tensor_infos.contains_key("output.weight");
        let cfg = LlamaConfig::from_gguf_metadata(&self.content.metadata, vocab_size, tied)?;
        let (d, kv, ff, heads, kv_heads) =
            (cfg.hidden_size, cfg.kv_dim(), cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads);
        let embed = self.read("token_embd.weight", &[vocab_size, d], None)?;
        let lm_head = if tied { None } else { Some(self.read("output.weight", &[vocab_size, d], None)?) };
        let final_norm = self.vector("output_norm.weight", d)?;
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("blk.{i}");
            blocks.push(BlockWeights {
                attn_norm: self.vector(&format!("{p}.attn_norm.weight"), d)?,
                q: self.read(&format!("{p}.attn_q.weight"), &[d, d], Some(heads))?,
                k: self.read(&format!("{p}.attn_k.weight"), &[kv, d], Some(kv_heads))?,
                v: self.read(&format!("{p}.attn_v.weight"), &[kv, d], None)?,
                o: self.read(&format!("{p}.attn_output.weight"), &[d, d], None)?,
                ffn_norm: self.vector(&format!("{p}.ffn_norm.weight"), d)?,
                gate: self.read(&format!("{p}.ffn_gate.weight"), &[ff, d], None)?,
                up: self.read(&format!("{p}.ffn_up.weight"), &[ff, d], None)?,
                down: self.read(&format!("{p}.ffn_down.weight"), &[d, ff], None)?,
            });
        }
        Ok(LlamaWeights { config: cfg, embed, lm_head, blocks, final_norm })
    }
}

/// llama.cpp's converter stores row `h·hd + 2i + j` of HF's Q/K at HF row `h·hd + j·hd/2 + i` (it interleaves the
/// two rotary halves of every head). Inverting that is a permutation of whole rows, which keeps quantized blocks
/// intact because blocks never straddle rows.
fn unpermute_rope_rows(raw: &[u8], n_rows: usize, row_bytes: usize, heads: usize) -> Vec<u8> {
    let hd = n_rows / heads;
    let half = hd / 2;
    let mut out = vec![0u8; raw.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = h * hd + 2 * i + j;
                let dst = h * hd + j * half + i;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&raw[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    out
}

/// Loads safetensors weights in the HF Llama layout from `dir` (every `*.safetensors` file in it) with the
/// `config.json` beside them. Weights are kept dense in f32.
pub fn load_safetensors_dir(dir: &Path) -> Result<LlamaWeights> {
    let cfg_path = dir.join("config.json");
    let json = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let cfg = LlamaConfig::from_hf_json(&json)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::InvalidModelFile { path: dir.to_path_buf(), reason: "no *.safetensors file".into() });
    }
    let mut tensors = std::collections::HashMap::new();
    for f in &files {
        let loaded = candle_core::safetensors::load(f, &Device::Cpu)
            .map_err(|e| Error::InvalidModelFile { path: f.clone(), reason: e.to_string() })?;
        tensors.extend(loaded);
    }
    let mut take = |name: &str, expected: &[usize]| -> Result<Tensor> {
        let t = tensors.remove(name).ok_or_else(|| Error::MissingTensor(name.to_string()))?;
        if t.dims() != expected {
            return Err(Error::TensorShape {
                tensor: name.to_string(),
                expected: expected.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(t.to_dtype(DType::F32)?)
    };
    let (d, kv, ff, v) = (cfg.hidden_size, cfg.kv_dim(), cfg.intermediate_size, cfg.vocab_size);
    let embed = Weight::Dense(take("model.embed_tokens.weight", &[v, d])?);
    let lm_head = if cfg.tie_word_embeddings { None } else { Some(Weight::Dense(take("lm_head.weight", &[v, d])?)) };
    let final_norm = take("model.norm.weight", &[d])?;
    let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let attn_norm = take(&format!("{p}.input_layernorm.weight"), &[d])?;
        let ffn_norm = take(&format!("{p}.post_attention_layernorm.weight"), &[d])?;
        let mut w = |n: &str, shape: &[usize]| take(&format!("{p}.{n}.weight"), shape).map(Weight::Dense);
        blocks.push(BlockWeights {
            attn_norm,
            ffn_norm,
            q: w("self_attn.q_proj", &[d, d])?,
            k: w("self_attn.k_proj", &[kv, d])?,
            v: w("self_attn.v_proj", &[kv, d])?,
            o: w("self_attn.o_proj", &[d, d])?,
            gate: w("mlp.gate_proj", &[ff, d])?,
            up: w("mlp.up_proj", &[ff, d])?,
            down: w("mlp.down_proj", &[d, ff])?,
        });
    }
    Ok(LlamaWeights { config: cfg, embed, lm_head, blocks, final_norm })
}
