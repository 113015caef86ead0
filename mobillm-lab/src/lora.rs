//! On-device LoRA, the usual alternative to MobiLLM, as the benchmark's baseline (issue: benchmarks): the same
//! GGUF backbone dequantized to f32 (training through quantized weights needs them dense), LoRA of rank r on the
//! q and v projections, AdamW, cross-entropy on the task's label words at the pivot — the same objective the side
//! network is trained for. Forward and backward both run on the device, which is the cost MobiLLM avoids.
//!
//! The forward is written with plain differentiable candle ops (RMS norm, interleaved RoPE as llama.cpp stores
//! Q/K, grouped-query attention, SwiGLU). With the LoRA `B` matrices at zero (their initial value) it computes the
//! frozen backbone, which the test below checks against `mobillm_core`'s forward.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::Optimizer;
use mobillm_core::LlamaConfig;

struct Block {
    attn_norm: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    ffn_norm: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

/// LoRA factors of one projection: `W x + scale · B (A x)`.
struct Lora {
    a: Var,
    b: Var,
}

pub struct LoraModel {
    cfg: LlamaConfig,
    embed: Tensor,
    head: Tensor,
    final_norm: Tensor,
    blocks: Vec<Block>,
    lora_q: Vec<Lora>,
    lora_v: Vec<Lora>,
    scale: f64,
}

impl LoraModel {
    /// Loads a llama GGUF, dequantizing every matrix to f32, and adds rank-`rank` LoRA on q and v (A Gaussian
    /// with std 1/√d, B zero; scale α/r with α = 2r).
    pub fn load(path: &Path, rank: usize, seed: u64) -> Result<Self> {
        let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let content = gguf_file::Content::read(&mut file)?;
        let vocab = content.tensor_infos.get("token_embd.weight").context("no token_embd.weight")?.shape.dims()[0];
        let tied = !content.tensor_infos.contains_key("output.weight");
        let cfg = LlamaConfig::from_gguf_metadata(&content.metadata, vocab, tied)?;
        let dev = Device::Cpu;
        let mut get = |name: &str| -> Result<Tensor> {
            Ok(content.tensor(&mut file, name, &dev).with_context(|| name.to_string())?.dequantize(&dev)?)
        };
        let embed = get("token_embd.weight")?;
        let head = if tied { embed.clone() } else { get("output.weight")? };
        let final_norm = get("output_norm.weight")?;
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let mut g = |n: &str| get(&format!("blk.{i}.{n}.weight"));
            blocks.push(Block {
                attn_norm: g("attn_norm")?,
                q: g("attn_q")?,
                k: g("attn_k")?,
                v: g("attn_v")?,
                o: g("attn_output")?,
                ffn_norm: g("ffn_norm")?,
                gate: g("ffn_gate")?,
                up: g("ffn_up")?,
                down: g("ffn_down")?,
            });
        }
        let mut rng = mobillm_core::testkit::Rng::new(seed);
        let d = cfg.hidden_size;
        let mut lora = |out: usize| -> Result<Lora> {
            let a: Vec<f32> = (0..rank * d).map(|_| rng.unit() * (3.0f32 / d as f32).sqrt()).collect();
            Ok(Lora {
                a: Var::from_tensor(&Tensor::from_vec(a, (rank, d), &dev)?)?,
                b: Var::zeros((out, rank), DType::F32, &dev)?,
            })
        };
        let lora_q = (0..cfg.num_hidden_layers).map(|_| lora(d)).collect::<Result<Vec<_>>>()?;
        let lora_v = (0..cfg.num_hidden_layers).map(|_| lora(cfg.kv_dim())).collect::<Result<Vec<_>>>()?;
        Ok(Self { cfg, embed, head, final_norm, blocks, lora_q, lora_v, scale: 2.0 })
    }

    /// The trainable parameters.
    pub fn vars(&self) -> Vec<Var> {
        self.lora_q.iter().chain(&self.lora_v).flat_map(|l| [l.a.clone(), l.b.clone()]).collect()
    }

    pub fn trainable_params(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }

    /// Label-word logits `[B, K]` at the pivot (last token) of each prompt, with gradients to the LoRA factors.
    pub fn label_logits(&self, batch: &[Vec<u32>], label_ids: &[u32]) -> Result<Tensor> {
        self.forward(batch, label_ids, true)
    }

    /// The same logits without a graph: the factors enter detached, so no operation is recorded and each layer's
    /// intermediates are freed as the forward moves on. Held-out scoring through [`LoraModel::label_logits`]
    /// kept the whole graph of a batch of 16 until its logits were read, more than training's batches of 8 hold:
    /// the bench's peak RSS was the evaluation's (UCI, 256 examples: 3028 MB, 2547 MB scoring without a graph).
    pub fn predict_label_logits(&self, batch: &[Vec<u32>], label_ids: &[u32]) -> Result<Tensor> {
        self.forward(batch, label_ids, false)
    }

    fn forward(&self, batch: &[Vec<u32>], label_ids: &[u32], with_graph: bool) -> Result<Tensor> {
        let factor = |v: &Var| if with_graph { v.as_tensor().clone() } else { v.as_tensor().detach() };
        let cfg = &self.cfg;
        let dev = Device::Cpu;
        let (b, t) = (batch.len(), batch.iter().map(Vec::len).max().context("empty batch")?);
        let (d, heads, kv, hd) = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim());
        let eps = cfg.rms_norm_eps;
        // Right padding: under the causal mask no real token sees a pad, and the pivot is the last real token.
        let mut ids = Vec::with_capacity(b * t);
        let mut pivots = Vec::with_capacity(b);
        for (i, seq) in batch.iter().enumerate() {
            ids.extend_from_slice(seq);
            ids.extend(std::iter::repeat_n(0u32, t - seq.len()));
            pivots.push((i * t + seq.len() - 1) as u32);
        }
        let mut x = self.embed.index_select(&Tensor::from_vec(ids, b * t, &dev)?, 0)?; // [B·T, d]
        let (cos, sin) = rope_tables(hd, cfg.rope_theta as f64, t)?;
        let mask: Vec<f32> =
            (0..t).flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
        let mask = Tensor::from_vec(mask, (1, 1, t, t), &dev)?;
        for (i, w) in self.blocks.iter().enumerate() {
            let h = rms_norm(&x, &w.attn_norm, eps)?;
            let lq = &self.lora_q[i];
            let lv = &self.lora_v[i];
            let low_rank = |l: &Lora| -> Result<Tensor> {
                Ok((h.matmul(&factor(&l.a).t()?)?.matmul(&factor(&l.b).t()?)? * self.scale)?)
            };
            let q = (frozen_linear(&h, &w.q)? + low_rank(lq)?)?;
            let k = frozen_linear(&h, &w.k)?;
            let v = (frozen_linear(&h, &w.v)? + low_rank(lv)?)?;
            let split = |m: Tensor, n: usize| -> Result<Tensor> {
                Ok(m.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?) // [B, n, T, hd]
            };
            let q = rope_interleaved(&split(q, heads)?, &cos, &sin)?;
            let k = repeat_kv(&rope_interleaved(&split(k, kv)?, &cos, &sin)?, heads / kv)?;
            let v = repeat_kv(&split(v, kv)?, heads / kv)?;
            let att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?.broadcast_add(&mask)?;
            let att = candle_nn::ops::softmax(&att, D::Minus1)?.matmul(&v)?; // [B, H, T, hd]
            let att = att.transpose(1, 2)?.reshape((b * t, d))?;
            x = (x + frozen_linear(&att, &w.o)?)?;
            let h = rms_norm(&x, &w.ffn_norm, eps)?;
            let ffn = frozen_linear(&(frozen_linear(&h, &w.gate)?.silu()? * frozen_linear(&h, &w.up)?)?, &w.down)?;
            x = (x + ffn)?;
        }
        let last = x.index_select(&Tensor::from_vec(pivots, b, &dev)?, 0)?;
        let last = rms_norm(&last, &self.final_norm, eps)?;
        let rows = self.head.index_select(&Tensor::from_slice(label_ids, label_ids.len(), &dev)?, 0)?;
        frozen_linear(&last, &rows)
    }
}

/// `x · Wᵀ` for a frozen `W`. candle's autograd computes a matmul's gradient for both operands, so a plain
/// matmul would materialise a full gradient for every frozen matrix at every step (as much memory as the weights
/// and a third more compute). As a custom op the backward only returns the input's gradient, `grad · W`, as
/// frameworks with `requires_grad = False` do; the LoRA baseline is then measured at its real cost.
struct FrozenLinear(Tensor);

impl candle_core::CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("frozen-linear needs a contiguous input".into()))?;
        let x = Tensor::from_slice(&storage.as_slice::<f32>()?[start..end], layout.shape(), &Device::Cpu)?;
        let y = x.matmul(&self.0.t()?)?;
        let shape = y.shape().clone();
        Ok((candle_core::CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.matmul(&self.0)?))
    }
}

fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(FrozenLinear(w.clone()))?)
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let scale = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&scale)?.broadcast_mul(w)?)
}

/// cos/sin `[T, hd/2]`.
fn rope_tables(hd: usize, theta: f64, t: usize) -> Result<(Tensor, Tensor)> {
    let inv: Vec<f32> = (0..hd / 2).map(|i| (1.0 / theta.powf(2.0 * i as f64 / hd as f64)) as f32).collect();
    let angles: Vec<f32> = (0..t).flat_map(|p| inv.iter().map(move |f| p as f32 * f)).collect();
    let angles = Tensor::from_vec(angles, (t, hd / 2), &Device::Cpu)?;
    Ok((angles.cos()?, angles.sin()?))
}

/// RoPE on interleaved pairs (llama.cpp's Q/K row order): `(x0, x1) → (x0·cos − x1·sin, x0·sin + x1·cos)`.
fn rope_interleaved(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, n, t, hd) = x.dims4()?;
    let pairs = x.reshape((b, n, t, hd / 2, 2))?;
    let x0 = pairs.narrow(4, 0, 1)?.squeeze(4)?;
    let x1 = pairs.narrow(4, 1, 1)?.squeeze(4)?;
    let r0 = (x0.broadcast_mul(cos)? - x1.broadcast_mul(sin)?)?;
    let r1 = (x0.broadcast_mul(sin)? + x1.broadcast_mul(cos)?)?;
    Ok(Tensor::stack(&[r0, r1], 4)?.reshape((b, n, t, hd))?)
}

fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, hd) = x.dims4()?;
    Ok(x.unsqueeze(2)?.broadcast_as((b, kv, n_rep, t, hd))?.reshape((b, kv * n_rep, t, hd))?)
}

/// One epoch of AdamW over `batches` (token ids and label indices); returns the mean loss.
pub fn train_epoch(
    model: &LoraModel,
    opt: &mut candle_nn::AdamW,
    batches: &[(Vec<Vec<u32>>, Vec<u32>)],
    label_ids: &[u32],
    mut progress: impl FnMut(usize),
) -> Result<f64> {
    let mut total = 0.0;
    for (i, (batch, labels)) in batches.iter().enumerate() {
        let logits = model.label_logits(batch, label_ids)?;
        let target = Tensor::from_slice(labels, labels.len(), &Device::Cpu)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &target)?;
        total += loss.to_scalar::<f32>()? as f64;
        opt.backward_step(&loss)?;
        progress(i + 1);
    }
    Ok(total / batches.len().max(1) as f64)
}

#[derive(clap::Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub data: xtask::args::DataArgs,
    #[arg(long, default_value_t = 256)]
    pub train: usize,
    #[arg(long, default_value_t = 200)]
    pub test: usize,
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
}

/// Fine-tunes with LoRA on the UCI sentences, or on the data `--task`/`--data` select split as `side-eval` splits
/// it, in this process (so its peak RSS is LoRA's own) and prints one JSON line: accuracy before and after each
/// epoch, device seconds per training sample, peak RSS.
pub fn worker(args: WorkerArgs) -> Result<()> {
    use mobillm_core::{dataset, Task, Tokenizer};
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    use std::io::Write;

    let (path, mut split, spec) = crate::inputs::task_data(&args.data)?;
    split.train.truncate(args.train);
    split.test.truncate(args.test);
    let tokenizer = {
        let mut f = std::fs::File::open(&path)?;
        Tokenizer::from_gguf_metadata(&gguf_file::Content::read(&mut f)?.metadata)?
    };
    let task = Task::new(spec, &tokenizer)?;
    let encode = |examples: &[dataset::Example]| -> Result<Vec<(Vec<u32>, u32)>> {
        examples
            .iter()
            .map(|e| Ok((task.encode(&tokenizer, &e.text)?, task.label_index(&e.label).context("label")? as u32)))
            .collect()
    };
    let (train, test) = (encode(&split.train)?, encode(&split.test)?);
    let model = LoraModel::load(&path, args.rank, 7)?;
    let label_ids = task.label_token_ids().to_vec();
    let accuracy = |model: &LoraModel| -> Result<f64> {
        let mut correct = 0;
        for chunk in test.chunks(16) {
            let batch: Vec<Vec<u32>> = chunk.iter().map(|(ids, _)| ids.clone()).collect();
            let predicted = model.predict_label_logits(&batch, &label_ids)?.argmax(1)?.to_vec1::<u32>()?;
            correct += predicted.iter().zip(chunk).filter(|(p, (_, l))| *p == l).count();
        }
        Ok(correct as f64 / test.len().max(1) as f64)
    };
    let zero_shot = accuracy(&model)?;
    eprintln!("lora: {} trainable parameters, zero-shot {:.1}%", model.trainable_params(), zero_shot * 100.0);
    let mut opt = candle_nn::AdamW::new(model.vars(), candle_nn::ParamsAdamW { lr: args.lr, ..Default::default() })?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let (mut train_s, mut accs, mut losses, mut elapsed) = (0.0, Vec::new(), Vec::new(), Vec::new());
    for epoch in 1..=args.epochs {
        let mut order: Vec<usize> = (0..train.len()).collect();
        order.shuffle(&mut rng);
        let batches: Vec<(Vec<Vec<u32>>, Vec<u32>)> = order
            .chunks(args.batch)
            .map(|c| (c.iter().map(|&i| train[i].0.clone()).collect(), c.iter().map(|&i| train[i].1).collect()))
            .collect();
        let start = std::time::Instant::now();
        let n_batches = batches.len();
        let loss = train_epoch(&model, &mut opt, &batches, &label_ids, |done| {
            eprint!("\rlora epoch {epoch}: batch {done}/{n_batches}");
            let _ = std::io::stderr().flush();
        })?;
        train_s += start.elapsed().as_secs_f64();
        let acc = accuracy(&model)?;
        eprintln!(" loss {loss:.4}, held-out {:.1}%", acc * 100.0);
        losses.push(loss);
        accs.push(acc);
        elapsed.push(train_s);
    }
    let result = serde_json::json!({
        "method": "lora", "task": args.data.name(), "rank": args.rank,
        "trainable_params": model.trainable_params(),
        "train_samples": train.len(), "test_samples": test.len(), "epochs": args.epochs, "batch": args.batch,
        "lr": args.lr, "zero_shot_acc": zero_shot, "acc_by_epoch": accs, "loss_by_epoch": losses,
        "train_s_by_epoch": elapsed,
        "device_s_per_train_sample": train_s / (train.len() * args.epochs).max(1) as f64,
        "device_train_s": train_s, "device_peak_rss_mb": mobillm_core::memory::peak_rss_mb(),
    });
    println!("{result}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With B = 0 the LoRA model is the frozen backbone: its pivot label logits equal mobillm-core's forward on
    /// the same GGUF; and one AdamW step moves them.
    #[test]
    fn zero_lora_equals_the_backbone_and_training_moves_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        mobillm_core::testkit::write_gguf(
            &mobillm_core::testkit::tiny_model(5, true),
            &path,
            candle_core::quantized::GgmlDType::F32,
        );
        let backbone = mobillm_core::Backbone::load(&path).unwrap();
        let model = LoraModel::load(&path, 4, 1).unwrap();
        let batch: Vec<Vec<u32>> = vec![vec![5, 70, 9, 33], vec![100, 2], vec![7, 8, 9, 10, 11, 12]];
        let labels = [40u32, 41];
        let want = backbone.llama().forward_pivots(&batch, &[0], &labels).unwrap().label_logits;
        let got = model.label_logits(&batch, &labels).unwrap();
        let (want, got) = (want.to_vec2::<f32>().unwrap(), got.to_vec2::<f32>().unwrap());
        for (w, g) in want.iter().flatten().zip(got.iter().flatten()) {
            assert!((w - g).abs() <= 1e-3 * w.abs().max(1.0), "{w} vs {g}");
        }
        assert_eq!(model.trainable_params(), 3 * (4 * 64 * 2 + 64 * 4 + 32 * 4));

        let mut opt =
            candle_nn::AdamW::new(model.vars(), candle_nn::ParamsAdamW { lr: 1e-2, ..Default::default() }).unwrap();
        let data = vec![(batch.clone(), vec![0u32, 1, 0])];
        let first = train_epoch(&model, &mut opt, &data, &labels, |_| {}).unwrap();
        for _ in 0..20 {
            train_epoch(&model, &mut opt, &data, &labels, |_| {}).unwrap();
        }
        let last = train_epoch(&model, &mut opt, &data, &labels, |_| {}).unwrap();
        assert!(last < first * 0.5, "LoRA training lowers the loss: {first} → {last}");

        // Scoring gives the trained logits without recording a graph back to the factors.
        let tracked = model.label_logits(&batch, &labels).unwrap();
        let scored = model.predict_label_logits(&batch, &labels).unwrap();
        let diff = (&tracked - &scored).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff <= 1e-5, "scoring and training logits differ by {diff}");
        let vars = model.vars();
        let through_training = tracked.sum_all().unwrap().backward().unwrap();
        assert!(vars.iter().all(|v| through_training.get(v.as_tensor()).is_some()));
        let through_scoring = scored.sum_all().unwrap().backward().unwrap();
        assert!(vars.iter().all(|v| through_scoring.get(v.as_tensor()).is_none()), "scoring recorded a graph");
    }
}
