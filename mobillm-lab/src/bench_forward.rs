//! `cargo xtask bench-forward`: ms per prompt and peak RSS of three ways to run the device forward over the same
//! held-out UCI prompts, each in its own process:
//! - `candle-quantized`: candle-transformers' `quantized_llama`, one prompt at a time (it has no padded batches),
//!   computing full-vocabulary logits at the last position; its quantized matmuls run on the stored blocks;
//! - `dense-f32`: our forward with every weight dequantized to f32 at load (the fast but large route);
//! - `mobillm`: our forward with weights kept quantized and expanded one matrix at a time.
//!
//! The batched variants keep each batch's label logits only, as prediction does.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use mobillm_core::backbone::loader::GgufFile;
use mobillm_core::backbone::weights::Weight;
use mobillm_core::backbone::Llama;
use mobillm_core::{memory, Backbone, Task};

use crate::inputs;
use xtask::args::DataArgs;
use xtask::fetch;

#[derive(clap::Args)]
pub struct Args {
    /// Prompts for the batched variants.
    #[arg(long, default_value_t = 96)]
    pub prompts: usize,
    /// Prompts for candle's one-at-a-time quantized model (about a second each).
    #[arg(long, default_value_t = 8)]
    pub stock_prompts: usize,
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
}

#[derive(clap::Args)]
pub struct WorkerArgs {
    #[arg(long)]
    pub variant: String,
    #[arg(long)]
    pub prompts: usize,
    #[arg(long)]
    pub batch: usize,
}

pub fn run(args: Args) -> Result<()> {
    fetch::model()?;
    fetch::uci_data()?;
    let exe = std::env::current_exe()?;
    let mut rows = Vec::new();
    for (variant, prompts) in
        [("candle-quantized", args.stock_prompts), ("dense-f32", args.prompts), ("mobillm", args.prompts)]
    {
        eprintln!("bench-forward: {variant} on {prompts} prompts…");
        let out = Command::new(&exe)
            .args(["bench-forward-worker", "--variant", variant])
            .args(["--prompts", &prompts.to_string(), "--batch", &args.batch.to_string()])
            .output()
            .context("starting the benchmark worker")?;
        anyhow::ensure!(out.status.success(), "{variant} failed: {}", String::from_utf8_lossy(&out.stderr));
        let line = String::from_utf8(out.stdout)?;
        let row: serde_json::Value = serde_json::from_str(line.trim()).context("worker output")?;
        eprintln!(
            "  {variant:>16}: {:8.1} ms/prompt, peak RSS {:6.1} MB",
            row["ms_per_prompt"].as_f64().unwrap_or(f64::NAN),
            row["peak_rss_mb"].as_f64().unwrap_or(f64::NAN)
        );
        rows.push((variant, row));
    }
    let get =
        |v: &str, k: &str| rows.iter().find(|(n, _)| *n == v).and_then(|(_, r)| r[k].as_f64()).unwrap_or(f64::NAN);
    let summary = serde_json::json!({
        "variants": rows.iter().map(|(n, r)| (n.to_string(), r.clone())).collect::<serde_json::Map<_, _>>(),
        "ratios": {
            "speedup_over_candle_quantized": get("candle-quantized", "ms_per_prompt") / get("mobillm", "ms_per_prompt"),
            "speed_vs_dense_f32": get("dense-f32", "ms_per_prompt") / get("mobillm", "ms_per_prompt"),
            "rss_dense_f32_over_mobillm": get("dense-f32", "peak_rss_mb") / get("mobillm", "peak_rss_mb"),
            "rss_candle_quantized_over_mobillm": get("candle-quantized", "peak_rss_mb") / get("mobillm", "peak_rss_mb"),
        },
        "goal": {"ms_per_prompt": 60.0, "peak_rss_mb": 140.0},
    });
    println!("{summary}");
    Ok(())
}

/// The forward as prediction runs it: every tap computed, each batch's outputs dropped once its label logits are
/// kept, so the peak is the forward's working set and not the outputs of every prompt (which `forward_all` holds
/// as f32: 6.6 MB for 96 prompts, 20.7 MB for 300).
fn forward_keeping_logits(
    backbone: &Backbone,
    task: &Task,
    texts: &[&str],
    taps: &[usize],
    batch: usize,
) -> Result<()> {
    let mut logits = Vec::with_capacity(texts.len());
    backbone.forward_batches(task, texts, taps, batch, |_, out| {
        logits.push(out.label_logits);
        Ok(())
    })?;
    anyhow::ensure!(logits.iter().map(|l| l.dim(0).unwrap_or(0)).sum::<usize>() == texts.len(), "prompts lost");
    Ok(())
}

pub fn worker(args: WorkerArgs) -> Result<()> {
    let model = fetch::model()?;
    let data = DataArgs { model: Some(model.clone()), ..Default::default() };
    let (backbone, task, split) = inputs::load(&data)?;
    let texts: Vec<&str> = split.test.iter().take(args.prompts).map(|e| e.text.as_str()).collect();
    let prompts: Vec<Vec<u32>> =
        texts.iter().map(|t| task.encode(backbone.tokenizer(), t)).collect::<mobillm_core::Result<_>>()?;
    let mean_tokens = prompts.iter().map(Vec::len).sum::<usize>() as f64 / prompts.len() as f64;
    let taps = backbone.all_taps();
    let elapsed = match args.variant.as_str() {
        "mobillm" => {
            let start = Instant::now();
            forward_keeping_logits(&backbone, &task, &texts, &taps, args.batch)?;
            start.elapsed()
        }
        "dense-f32" => {
            drop(backbone);
            let mut gguf = GgufFile::open(&model)?;
            let tokenizer = mobillm_core::Tokenizer::from_gguf_metadata(&gguf.content.metadata)?;
            let mut weights = gguf.load_llama()?;
            let densify = |w: &mut Weight| -> Result<()> {
                *w = Weight::Dense(w.dense()?);
                Ok(())
            };
            densify(&mut weights.embed)?;
            for b in &mut weights.blocks {
                for w in [&mut b.q, &mut b.k, &mut b.v, &mut b.o, &mut b.gate, &mut b.up, &mut b.down] {
                    densify(w)?;
                }
            }
            let dense = Backbone::new(Llama::new(weights), tokenizer)?;
            let start = Instant::now();
            forward_keeping_logits(&dense, &task, &texts, &taps, args.batch)?;
            start.elapsed()
        }
        "candle-quantized" => {
            drop(backbone);
            let mut file = std::fs::File::open(&model)?;
            let content = candle_core::quantized::gguf_file::Content::read(&mut file)?;
            let mut stock = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
                content,
                &mut file,
                &Device::Cpu,
            )?;
            let start = Instant::now();
            for p in &prompts {
                stock.clear_kv_cache();
                let ids = Tensor::new(p.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
                stock.forward(&ids, 0)?;
            }
            start.elapsed()
        }
        other => anyhow::bail!("unknown variant {other}"),
    };
    let row = serde_json::json!({
        "prompts": prompts.len(),
        "mean_prompt_tokens": mean_tokens,
        "ms_per_prompt": elapsed.as_secs_f64() * 1e3 / prompts.len() as f64,
        "peak_rss_mb": memory::peak_rss_mb(),
    });
    println!("{row}");
    Ok(())
}
