//! What the harnesses run on: the backbone, the task and the split that `--model/--data/--template` select
//! (fetching the pinned defaults as needed), and the pivot activations of a set of examples, cached on disk.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use mobillm_core::dataset::{self, Example, Split};
use mobillm_core::side::{whitening, Summary};
use mobillm_core::{Backbone, Task, TaskSpec};
use sha2::{Digest, Sha256};
use xtask::args::DataArgs;
use xtask::fetch;

/// The backbone, the task and the split that `--model/--data/--task/--template` select (fetching defaults as needed).
pub fn load(args: &DataArgs) -> Result<(Backbone, Task, Split)> {
    let (model, split, spec) = task_data(args)?;
    let backbone = Backbone::load(&model).with_context(|| format!("loading {}", model.display()))?;
    let task = Task::new(spec, backbone.tokenizer())?;
    Ok((backbone, task, split))
}

/// The model file, the split and the task's prompt and labels that the same options select, without loading the
/// backbone (for a harness with a model of its own, such as LoRA's).
pub fn task_data(args: &DataArgs) -> Result<(PathBuf, Split, TaskSpec)> {
    let model = match &args.model {
        Some(p) => p.clone(),
        None => fetch::model()?,
    };
    let (split, labels, template) = match args.jsonl()? {
        Some(data) => {
            let split = dataset::split_jsonl(&data.path)?;
            let labels = data.labels.unwrap_or_else(|| {
                dataset::labels_of(&split.train.iter().chain(&split.test).cloned().collect::<Vec<_>>())
            });
            (split, labels, data.template)
        }
        None => (
            dataset::uci_split(&fetch::uci_data()?)?,
            dataset::UCI_LABELS.map(String::from).to_vec(),
            args.template.clone().unwrap_or_else(|| dataset::UCI_TEMPLATE.to_string()),
        ),
    };
    Ok((model, split, TaskSpec { template, labels }))
}

/// Rows `idx` of `t` (along its first axis).
pub fn select_rows(t: &Tensor, idx: &[usize]) -> Result<Tensor> {
    let i = Tensor::new(idx.iter().map(|&i| i as u32).collect::<Vec<_>>().as_slice(), &Device::Cpu)?;
    Ok(t.index_select(&i, 0)?)
}

/// Pivot activations and label logits of a set of examples.
#[derive(Clone)]
pub struct Pivots {
    /// `[N, taps, d]`, as the backbone computed them (not normalised).
    pub taps: Tensor,
    /// `[N, K]`.
    pub logits: Tensor,
    pub labels: Vec<u32>,
    /// `[N, taps, d]`: each tapped layer averaged over the prompt's tokens after the first (not normalised).
    pub means: Tensor,
}

/// Pivot taps (all blocks) and label logits of `examples`, from the cache when this model, task and data were
/// forwarded before.
pub fn pivots(backbone: &Backbone, task: &Task, examples: &[Example], what: &str) -> Result<Pivots> {
    let labels = examples
        .iter()
        .map(|e| task.label_index(&e.label).map(|i| i as u32).context("label not in the task"))
        .collect::<Result<Vec<_>>>()?;
    let mut key = Sha256::new();
    key.update(backbone.fingerprint());
    key.update(serde_json::to_vec(task.spec())?);
    for e in examples {
        key.update(e.text.as_bytes());
        key.update([0]);
    }
    let dir: PathBuf = fetch::cache_dir()?.join("pivots");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{:x}.safetensors", key.finalize()));
    if let Ok(mut t) = candle_core::safetensors::load(&path, &Device::Cpu) {
        if let (Some(taps), Some(logits), Some(means)) = (t.remove("taps"), t.remove("logits"), t.remove("means")) {
            eprintln!("{what}: {} pivots from the cache", examples.len());
            return Ok(Pivots { taps, logits, labels, means });
        }
    }
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let start = Instant::now();
    let out = backbone.forward_all(task, &texts, &backbone.all_taps(), 16, Summary::PivotAndMean, |done, total| {
        eprint!(
            "\r{what}: forward {done}/{total} ({:.0} ms/sample)",
            start.elapsed().as_secs_f64() * 1e3 / done as f64
        );
        let _ = std::io::stderr().flush();
    })?;
    eprintln!();
    let means = out.means.ok_or_else(|| anyhow::anyhow!("the forward kept no means"))?;
    let map = std::collections::HashMap::from([
        ("taps".to_string(), out.taps.clone()),
        ("logits".to_string(), out.label_logits.clone()),
        ("means".to_string(), means.clone()),
    ]);
    let tmp = path.with_extension("partial");
    candle_core::safetensors::save(&map, &tmp)?;
    std::fs::rename(&tmp, &path)?;
    Ok(Pivots { taps: out.taps, logits: out.label_logits, labels, means })
}

/// The device's whitening, or another one for comparison: each option left out is the device's choice for the
/// session's size ([`whitening::Config::for_examples`]).
#[derive(clap::Args, Debug, Clone)]
pub struct WhiteningArgs {
    /// The whitening's ε relative to the mean eigenvalue.
    #[arg(long)]
    pub whiten_eps: Option<f64>,
    /// The directions whitened exactly.
    #[arg(long)]
    pub whiten_rank: Option<usize>,
    /// The gain of every other direction (0 drops them).
    #[arg(long)]
    pub whiten_tail: Option<f64>,
}

impl WhiteningArgs {
    /// The whitening of a session that sends `examples` training examples.
    pub fn config(&self, examples: usize) -> whitening::Config {
        let device = whitening::Config::for_examples(examples);
        whitening::Config {
            rank: self.whiten_rank.unwrap_or(device.rank),
            relative_eps: self.whiten_eps.unwrap_or(device.relative_eps),
            tail_gain: self.whiten_tail.unwrap_or(device.tail_gain),
        }
    }

    /// Whether any option is given.
    pub fn any(&self) -> bool {
        self.whiten_eps.is_some() || self.whiten_rank.is_some() || self.whiten_tail.is_some()
    }
}
