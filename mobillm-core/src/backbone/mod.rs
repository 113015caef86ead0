//! The device's frozen backbone: weights, tokenizer and the pivot forward, loaded from one GGUF file or from a
//! safetensors directory (`config.json`, `*.safetensors`, `tokenizer.json`).

pub mod batching;
pub mod config;
pub mod llama;
pub mod loader;
pub mod weights;

use std::path::Path;

use batching::scatter_rows;
pub use batching::Batches;
pub use config::LlamaConfig;
pub use llama::{Llama, PivotOutput};

use crate::error::{Error, Result};
use crate::side::Summary;
use crate::task::Task;
use crate::tokenizer::Tokenizer;

pub struct Backbone {
    llama: Llama,
    tokenizer: Tokenizer,
    fingerprint: std::sync::OnceLock<String>,
}

impl Backbone {
    /// `path` is a `.gguf` file (weights and tokenizer in one) or a directory holding `config.json`,
    /// `*.safetensors` and `tokenizer.json`.
    pub fn load(path: &Path) -> Result<Self> {
        if path.is_dir() {
            let weights = loader::load_safetensors_dir(path)?;
            let tokenizer = Tokenizer::from_file(&path.join("tokenizer.json"))?;
            return Self::new(Llama::new(weights), tokenizer);
        }
        let mut gguf = loader::GgufFile::open(path)?;
        let tokenizer = Tokenizer::from_gguf_metadata(&gguf.content.metadata)?;
        // The vocabulary and merges arrays (~8 MB parsed) are not needed any more; free them before the weights
        // are read so the heap can reuse that memory.
        gguf.content.metadata.retain(|k, _| !k.starts_with("tokenizer."));
        let weights = gguf.load_llama()?;
        Self::new(Llama::new(weights), tokenizer)
    }

    pub fn new(llama: Llama, tokenizer: Tokenizer) -> Result<Self> {
        if tokenizer.vocab_size() > llama.config().vocab_size {
            return Err(Error::InvalidConfig(format!(
                "the tokenizer has {} tokens but the model's vocabulary is {}",
                tokenizer.vocab_size(),
                llama.config().vocab_size
            )));
        }
        Ok(Self { llama, tokenizer, fingerprint: std::sync::OnceLock::new() })
    }

    /// SHA-256 (hex) of the configuration and every weight as stored: identifies the backbone an adapter was
    /// trained against. Computed on first use (≈0.3 s for the 98 MB default model).
    pub fn fingerprint(&self) -> &str {
        self.fingerprint.get_or_init(|| self.llama.fingerprint())
    }

    pub fn config(&self) -> &LlamaConfig {
        self.llama.config()
    }

    pub fn llama(&self) -> &Llama {
        &self.llama
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// All blocks, the default tap set (docs/design.md §3).
    pub fn all_taps(&self) -> Vec<usize> {
        (0..self.config().num_hidden_layers).collect()
    }

    /// Tokenizes `texts` with the task's template and runs one padded forward over them.
    pub fn forward_texts(&self, task: &Task, texts: &[&str], taps: &[usize]) -> Result<PivotOutput> {
        let batch = texts.iter().map(|t| task.encode(&self.tokenizer, t)).collect::<Result<Vec<_>>>()?;
        self.llama.forward_pivots(&batch, taps, task.label_token_ids())
    }

    /// Forwards any number of texts in padded batches of at most `batch_size` (and [`batching::BATCH_TOKENS`]
    /// padded tokens), grouping prompts of similar length, and hands each batch's outputs to `each` with the
    /// indices (into `texts`) of its examples. Nothing is held from one batch to the next, so the memory is the
    /// forward's working set whatever the number of texts.
    pub fn forward_batches(
        &self,
        task: &Task,
        texts: &[&str],
        taps: &[usize],
        batch_size: usize,
        mut each: impl FnMut(&[usize], PivotOutput) -> Result<()>,
    ) -> Result<()> {
        if texts.is_empty() {
            return Err(Error::InvalidInput("no texts to forward".into()));
        }
        let batches = Batches::plan(task, &self.tokenizer, texts, batch_size, batching::BATCH_TOKENS)?;
        for group in &batches.groups {
            each(group, self.llama.forward_pivots(&batches.batch(group), taps, task.label_token_ids())?)?;
        }
        Ok(())
    }

    /// [`Backbone::forward_batches`] with every output kept: outputs come back in the order of `texts`, the means
    /// only when `summary` uses them; `progress(done, total)` is called after every batch.
    ///
    /// Each batch's outputs are copied into buffers of the final size as it finishes, so what is held beyond
    /// the forward's working set is the outputs once (keeping the batches' tensors and stacking them at the end
    /// held them twice: 26 MB of 153 for 96 prompts at SmolLM2's size).
    pub fn forward_all(
        &self,
        task: &Task,
        texts: &[&str],
        taps: &[usize],
        batch_size: usize,
        summary: Summary,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<PivotOutput> {
        let (n, t, d, k) = (texts.len(), taps.len(), self.config().hidden_size, task.label_token_ids().len());
        let with_means = !summary.is_pivot();
        let mut taps_out = vec![0f32; n * t * d];
        let mut means_out = vec![0f32; if with_means { n * t * d } else { 0 }];
        let mut logits_out = vec![0f32; n * k];
        let mut done = 0;
        self.forward_batches(task, texts, taps, batch_size, |group, out| {
            scatter_rows(&out.taps, group, t * d, &mut taps_out)?;
            scatter_rows(&out.label_logits, group, k, &mut logits_out)?;
            if with_means {
                let means =
                    out.means.as_ref().ok_or_else(|| Error::Internal("a batch came back without means".into()))?;
                scatter_rows(means, group, t * d, &mut means_out)?;
            }
            done += group.len();
            progress(done, n);
            Ok(())
        })?;
        let dev = &candle_core::Device::Cpu;
        Ok(PivotOutput {
            taps: candle_core::Tensor::from_vec(taps_out, (n, t, d), dev)?,
            label_logits: candle_core::Tensor::from_vec(logits_out, (n, k), dev)?,
            means: with_means.then(|| candle_core::Tensor::from_vec(means_out, (n, t, d), dev)).transpose()?,
        })
    }
}
