//! `cargo xtask zeroshot`: the frozen backbone's accuracy on the held-out split, predicting the label whose word
//! has the highest logit at the pivot.

use std::io::Write;
use std::time::Instant;

use anyhow::Result;
use mobillm_core::memory;
use mobillm_core::side::Summary;

use crate::inputs;
use xtask::args::DataArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub data: DataArgs,
    /// Evaluate at most this many held-out examples.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Prompts per padded forward.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
}

pub fn run(args: Args) -> Result<()> {
    let (backbone, task, split) = inputs::load(&args.data)?;
    let mut test = split.test;
    if let Some(n) = args.limit {
        test.truncate(n);
    }
    anyhow::ensure!(!test.is_empty(), "no held-out examples");
    let texts: Vec<&str> = test.iter().map(|e| e.text.as_str()).collect();
    let last_tap = [backbone.config().num_hidden_layers - 1];
    eprintln!(
        "model loaded: {:.1} MB of weights, process RSS {:.1} MB; {} held-out examples",
        backbone.llama().weight_bytes() as f64 / 1e6,
        memory::current_rss_mb().unwrap_or(f64::NAN),
        test.len()
    );
    let start = Instant::now();
    let out = backbone.forward_all(&task, &texts, &last_tap, args.batch, Summary::Pivot, |done, total| {
        let ms = start.elapsed().as_secs_f64() * 1e3 / done as f64;
        eprint!("\rzeroshot: {done}/{total} examples, {ms:.1} ms/sample");
        let _ = std::io::stderr().flush();
    })?;
    eprintln!();
    let elapsed = start.elapsed().as_secs_f64();
    let predicted = out.label_logits.argmax(1)?.to_vec1::<u32>()?;
    let correct =
        test.iter().zip(&predicted).filter(|(ex, &p)| task.label_index(&ex.label) == Some(p as usize)).count();
    let result = serde_json::json!({
        "accuracy": correct as f64 / test.len() as f64,
        "samples": test.len(),
        "ms_per_sample": elapsed * 1e3 / test.len() as f64,
        "peak_rss_mb": memory::peak_rss_mb(),
    });
    println!("{result}");
    Ok(())
}
