//! The frozen Llama forward pass the device runs: a padded batch in, per example the hidden state after each
//! tapped block at the pivot token and the label-word logits at the pivot out. It never forms full-vocabulary
//! logits, and for quantized weights it expands one block's matrices at a time (≈14 MB of f32 for SmolLM2-135M)
//! so that the big batched GEMMs run in f32 while the model stays quantized in memory.
//!
//! Batches are right-padded: with a causal mask a real token never attends to a later position, so padding needs
//! no extra mask and every example keeps its own RoPE positions; the pivot of example `b` is row `len_b − 1`.

use candle_core::{DType, Device, Tensor};
use candle_nn::ops::{rms_norm, silu, softmax_last_dim};
use candle_nn::rotary_emb::rope;

use super::config::LlamaConfig;
use super::loader::{BlockWeights, LlamaWeights};
use super::weights::Weight;
use crate::error::{Error, Result};

/// What one forward returns for a batch of `B` examples.
#[derive(Debug, Clone)]
pub struct PivotOutput {
    /// `[B, taps.len(), hidden]`: the residual stream after each tapped block, at each example's pivot.
    pub taps: Tensor,
    /// `[B, K]`: the backbone's logits for the `K` requested label tokens at each example's pivot.
    pub label_logits: Tensor,
    /// `[B, taps.len(), hidden]`: the residual stream after each tapped block, averaged over each example's tokens
    /// after the first (the first token's state is an outlier in every layer, the same for every prompt). Always
    /// there from a batch's forward; `None` from `Backbone::forward_all` when the caller's summary does not use
    /// them (they would double what it holds).
    pub means: Option<Tensor>,
}

pub struct Llama {
    weights: LlamaWeights,
}

impl Llama {
    pub fn new(weights: LlamaWeights) -> Self {
        Self { weights }
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.weights.config
    }

    /// The weights (the privacy audit decodes activations against the public embedding matrix).
    pub fn weights(&self) -> &LlamaWeights {
        &self.weights
    }

    /// Bytes the weights occupy in memory as stored (quantized or dense).
    pub fn weight_bytes(&self) -> usize {
        let w = &self.weights;
        let blocks: usize = w
            .blocks
            .iter()
            .map(|b| [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down].iter().map(|m| m.storage_bytes()).sum::<usize>())
            .sum();
        blocks + w.embed.storage_bytes() + w.lm_head.as_ref().map_or(0, |h| h.storage_bytes())
    }

    /// SHA-256 (hex) of the configuration and all weights as stored.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let w = &self.weights;
        let mut h = Sha256::new();
        h.update(serde_json::to_vec(&w.config).unwrap_or_default());
        let mut add = |weight: &Weight| {
            h.update(weight.dtype_name().as_bytes());
            for d in weight.dims() {
                h.update((*d as u64).to_le_bytes());
            }
            weight.hash_bytes(&mut |bytes| h.update(bytes));
        };
        add(&w.embed);
        if let Some(head) = &w.lm_head {
            add(head);
        }
        for b in &w.blocks {
            for m in [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down] {
                add(m);
            }
        }
        for t in std::iter::once(&w.final_norm).chain(w.blocks.iter().flat_map(|b| [&b.attn_norm, &b.ffn_norm])) {
            for x in t.to_vec1::<f32>().unwrap_or_default() {
                h.update(x.to_le_bytes());
            }
        }
        format!("{:x}", h.finalize())
    }

    /// Runs the batch. `taps` are 0-based block indices in increasing order; `label_ids` index the vocabulary.
    pub fn forward_pivots(&self, batch: &[Vec<u32>], taps: &[usize], label_ids: &[u32]) -> Result<PivotOutput> {
        Ok(self.forward(batch, taps, label_ids, false)?.0)
    }

    /// As [`Llama::forward_pivots`], and also every token's hidden state after each tapped block, one tensor
    /// `[len_i, taps, d]` per example (what `mobillm` mode sends).
    pub fn forward_sequences(
        &self,
        batch: &[Vec<u32>],
        taps: &[usize],
        label_ids: &[u32],
    ) -> Result<(PivotOutput, Vec<Tensor>)> {
        let (out, tokens) = self.forward(batch, taps, label_ids, true)?;
        let tokens = tokens.expect("asked for tokens"); // [B, T, taps, d]
        let per_example = batch
            .iter()
            .enumerate()
            .map(|(i, seq)| Ok(tokens.get(i)?.narrow(0, 0, seq.len())?))
            .collect::<Result<Vec<_>>>()?;
        Ok((out, per_example))
    }

    fn forward(
        &self,
        batch: &[Vec<u32>],
        taps: &[usize],
        label_ids: &[u32],
        keep_tokens: bool,
    ) -> Result<(PivotOutput, Option<Tensor>)> {
        let cfg = &self.weights.config;
        self.check_inputs(batch, taps, label_ids)?;
        let (b, t) = (batch.len(), batch.iter().map(Vec::len).max().unwrap_or(0));
        let (d, heads, kv_heads, hd) =
            (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim());
        let dev = Device::Cpu;

        let mut ids = Vec::with_capacity(b * t);
        let mut pivot_rows = Vec::with_capacity(b);
        for (i, seq) in batch.iter().enumerate() {
            ids.extend_from_slice(seq);
            ids.extend(std::iter::repeat_n(0u32, t - seq.len()));
            pivot_rows.push((i * t + seq.len() - 1) as u32);
        }
        let pivot_rows = Tensor::from_vec(pivot_rows, b, &dev)?;
        // Row b averages example b's tokens 1..len_b (its first token alone when it has no other).
        let mut pool = vec![0f32; b * b * t];
        for (i, seq) in batch.iter().enumerate() {
            let first = usize::from(seq.len() > 1);
            let w = 1.0 / (seq.len() - first) as f32;
            for j in first..seq.len() {
                pool[i * b * t + i * t + j] = w;
            }
        }
        let pool = Tensor::from_vec(pool, (b, b * t), &dev)?;
        let mut x = self.weights.embed.rows(&ids)?; // [B·T, d]

        let (cos, sin) = rope_tables(hd, cfg.rope_theta, t)?;
        // GQA without copying K/V: the `n_rep` query heads that share a KV head are stacked along the time axis,
        // so the causal mask is the [T, T] mask repeated n_rep times.
        let n_rep = heads / kv_heads;
        let mask = causal_mask(t, n_rep)?;
        let ctx = AttnShape { b, t, d, heads, kv_heads, hd, n_rep };

        let mut tapped = Vec::with_capacity(taps.len());
        let mut means = Vec::with_capacity(taps.len());
        let mut tokens = Vec::new();
        let mut next_tap = taps.iter().peekable();
        for (layer, block) in self.weights.blocks.iter().enumerate() {
            x = block_forward(&x, block, &ctx, &cos, &sin, &mask, cfg.rms_norm_eps as f32)?;
            if next_tap.peek() == Some(&&layer) {
                next_tap.next();
                tapped.push(x.index_select(&pivot_rows, 0)?);
                means.push(pool.matmul(&x)?);
                if keep_tokens {
                    tokens.push(x.clone());
                }
            }
        }
        let taps_t = Tensor::stack(&tapped, 1)?; // [B, taps, d]
        let tokens = if keep_tokens { Some(Tensor::stack(&tokens, 1)?.reshape((b, t, taps.len(), d))?) } else { None };

        let last = x.index_select(&pivot_rows, 0)?;
        let last = rms_norm(&last, &self.weights.final_norm, cfg.rms_norm_eps as f32)?;
        let head = self.weights.lm_head.as_ref().unwrap_or(&self.weights.embed);
        let label_rows = head.rows(label_ids)?; // [K, d]
        let label_logits = last.matmul(&label_rows.t()?)?;
        let means = Some(Tensor::stack(&means, 1)?);
        Ok((PivotOutput { taps: taps_t, label_logits, means }, tokens))
    }

    fn check_inputs(&self, batch: &[Vec<u32>], taps: &[usize], label_ids: &[u32]) -> Result<()> {
        let cfg = &self.weights.config;
        let bad = |m: String| Err(Error::InvalidInput(m));
        if batch.is_empty() {
            return bad("empty batch".into());
        }
        if let Some(i) = batch.iter().position(Vec::is_empty) {
            return bad(format!("example {i} has no tokens"));
        }
        if let Some(len) = batch.iter().map(Vec::len).find(|&l| l > cfg.max_position_embeddings) {
            return bad(format!(
                "a prompt of {len} tokens exceeds the model's {} positions",
                cfg.max_position_embeddings
            ));
        }
        let vocab = cfg.vocab_size as u32;
        if let Some(&id) = batch.iter().flatten().chain(label_ids).find(|&&id| id >= vocab) {
            return bad(format!("token id {id} is outside the vocabulary of {vocab}"));
        }
        if label_ids.is_empty() {
            return bad("no label tokens".into());
        }
        if taps.is_empty() || taps.windows(2).any(|w| w[0] >= w[1]) || taps.last() >= Some(&cfg.num_hidden_layers) {
            return bad(format!(
                "taps {taps:?} must be strictly increasing block indices below {}",
                cfg.num_hidden_layers
            ));
        }
        Ok(())
    }
}

struct AttnShape {
    b: usize,
    t: usize,
    d: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    n_rep: usize,
}

/// One pre-norm decoder block on `x: [B·T, d]`. The attention runs in a function of its own so that its
/// intermediates (the normed input, q/k/v before and after RoPE, the per-chunk outputs) are freed before the FFN
/// allocates; held to the end of the block they added 8.7 MB to the heap's peak at 16 UCI prompts
/// (docs/benchmarks.md, *The forward alone*).
fn block_forward(
    x: &Tensor,
    w: &BlockWeights,
    s: &AttnShape,
    cos: &Tensor,
    sin: &Tensor,
    mask: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    let x = (x + attention(&rms_norm(x, &w.attn_norm, eps)?, w, s, cos, sin, mask)?)?;
    let out = ffn(&rms_norm(&x, &w.ffn_norm, eps)?, w)?;
    Ok((x + out)?)
}

/// Causal self-attention with its output projection on the normed `h: [B·T, d]`.
fn attention(h: &Tensor, w: &BlockWeights, s: &AttnShape, cos: &Tensor, sin: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let AttnShape { b, t, d, heads, kv_heads, hd, n_rep } = *s;
    let split_heads = |m: Tensor, n: usize| -> Result<Tensor> {
        Ok(m.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?) // [B, n, T, hd]
    };
    let q =
        rope(&split_heads(h.matmul(&w.q.dense()?.t()?)?, heads)?, cos, sin)?.reshape((b, kv_heads, n_rep * t, hd))?;
    let k = rope(&split_heads(h.matmul(&w.k.dense()?.t()?)?, kv_heads)?, cos, sin)?;
    let v = split_heads(h.matmul(&w.v.dense()?.t()?)?, kv_heads)?;
    let scale = 1.0 / (hd as f64).sqrt();
    // Scores grow with T²; taking the batch a few examples at a time keeps them near ATTN_SCORE_BUDGET floats.
    let per_chunk = (ATTN_SCORE_BUDGET / (heads * t * t)).clamp(1, b);
    let mut parts = Vec::with_capacity(b.div_ceil(per_chunk));
    for start in (0..b).step_by(per_chunk) {
        let n = per_chunk.min(b - start);
        let (q, k, v) = (q.narrow(0, start, n)?, k.narrow(0, start, n)?, v.narrow(0, start, n)?);
        let att = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
        parts.push(softmax_last_dim(&att)?.matmul(&v)?); // [n, kv, n_rep·T, hd]
    }
    drop((q, k, v));
    let att = Tensor::cat(&parts, 0)?;
    drop(parts);
    let att = att.reshape((b, heads, t, hd))?.transpose(1, 2)?.reshape((b * t, d))?;
    Ok(att.matmul(&w.o.dense()?.t()?)?)
}

/// `down(silu(gate·h) ⊙ up·h)` on `h: [rows, d]`. The expanded FFN matrices are the largest transient buffers of
/// the forward, so `gate` and `up` are expanded a slab of intermediate units at a time and `down` only after
/// them; rows go in chunks to bound the activations.
fn ffn(h: &Tensor, w: &BlockWeights) -> Result<Tensor> {
    let rows = h.dim(0)?;
    let ff = w.gate.dims()[0];
    let chunks: Vec<(usize, usize)> =
        (0..rows).step_by(FFN_ROW_CHUNK).map(|s| (s, FFN_ROW_CHUNK.min(rows - s))).collect();
    let mut acts: Vec<Vec<Tensor>> = vec![Vec::new(); chunks.len()];
    for slab in (0..ff).step_by(FFN_SLAB) {
        let len = FFN_SLAB.min(ff - slab);
        let (gate_w, up_w) = (w.gate.dense_rows(slab, len)?, w.up.dense_rows(slab, len)?);
        for (&(start, n), act) in chunks.iter().zip(&mut acts) {
            let h = h.narrow(0, start, n)?;
            let gate = silu(&h.matmul(&gate_w.t()?)?)?;
            act.push((gate * h.matmul(&up_w.t()?)?)?);
        }
    }
    let down_w = w.down.dense()?;
    let mut parts = Vec::with_capacity(chunks.len());
    for act in acts {
        parts.push(Tensor::cat(&act, 1)?.matmul(&down_w.t()?)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// Attention scores computed at once (1M floats = 4 MB).
const ATTN_SCORE_BUDGET: usize = 1 << 20;

/// Token rows per FFN chunk: large enough for efficient GEMMs, small enough to keep activations at ~1.5 MB.
const FFN_ROW_CHUNK: usize = 256;

/// Intermediate units of `gate`/`up` expanded at once (a third of SmolLM2's 1536: 1.2 MB per matrix).
const FFN_SLAB: usize = 512;

/// `cos`, `sin`: `[T, hd/2]` for half-split RoPE with base `theta`.
fn rope_tables(hd: usize, theta: f32, t: usize) -> Result<(Tensor, Tensor)> {
    let inv_freq: Vec<f32> = (0..hd / 2).map(|i| 1.0 / theta.powf(2.0 * i as f32 / hd as f32)).collect();
    let inv_freq = Tensor::from_vec(inv_freq, (1, hd / 2), &Device::Cpu)?;
    let pos = Tensor::arange(0u32, t as u32, &Device::Cpu)?.to_dtype(DType::F32)?.reshape((t, 1))?;
    let freqs = pos.matmul(&inv_freq)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

/// Additive causal mask `[n_rep·T, T]`: row `r` is position `r mod T`.
fn causal_mask(t: usize, n_rep: usize) -> Result<Tensor> {
    let mut m = Vec::with_capacity(n_rep * t * t);
    for _ in 0..n_rep {
        for i in 0..t {
            m.extend((0..t).map(|j| if j <= i { 0.0f32 } else { f32::NEG_INFINITY }));
        }
    }
    Ok(Tensor::from_vec(m, (n_rep * t, t), &Device::Cpu)?)
}
