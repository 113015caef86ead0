//! What the attacker knows (the public backbone, public look-alike texts and their activations) and what the
//! auditor knows besides (the victim's texts and labels).

use std::collections::HashSet;

use anyhow::Result;
use candle_core::Tensor;
use mobillm_core::dataset::Split;
use mobillm_core::side::normalize_taps;
use mobillm_core::{Backbone, Task};

use super::acts::Acts;
use super::attacks::{unit_rows, Mat};
use crate::inputs;

/// The attacker's public knowledge and the auditor's truth about every text.
pub struct Knowledge {
    /// Plain unit-RMS pivots of the victim's training texts (rows `..n_train`) then the public texts.
    pub everyone: Acts,
    pub n_train: usize,
    pub texts: Vec<String>,
    pub labels: Vec<u32>,
    pub n_labels: usize,
    /// `[public, K]`: the backbone's label logits on the public texts.
    pub public_logits: Mat,
    /// The tokens each text adds to the prompt.
    pub tokens: Vec<HashSet<u32>>,
    pub frequent: HashSet<u32>,
    /// `[V, d]`: the public embedding matrix, rows of unit length.
    pub embedding: Mat,
    pub final_norm: Vec<f32>,
}

impl Knowledge {
    pub fn public_rows(&self) -> Vec<usize> {
        (self.n_train..self.everyone.n).collect()
    }

    pub fn public_labels(&self) -> &[u32] {
        &self.labels[self.n_train..]
    }

    /// Runs `f` with `other` in place of `everyone` (for the attacker's public data whitened by public statistics),
    /// then puts both back, whatever `f` returns.
    pub fn with_everyone<T>(&mut self, other: &mut Acts, f: impl FnOnce(&Knowledge) -> T) -> T {
        std::mem::swap(&mut self.everyone, other);
        let result = f(self);
        std::mem::swap(&mut self.everyone, other);
        result
    }

    /// The share of the victim's majority label: what guessing it for every sample gets.
    pub fn chance(&self) -> f64 {
        let labels = &self.labels[..self.n_train];
        let most = (0..self.n_labels as u32).map(|l| labels.iter().filter(|&&x| x == l).count()).max().unwrap_or(0);
        most as f64 / self.n_train.max(1) as f64
    }
}

/// Forwards the victim's and the public texts once (cached) and gathers what the attacker and auditor know.
pub fn gather(backbone: &Backbone, task: &Task, split: &Split) -> Result<Knowledge> {
    let train = inputs::pivots(backbone, task, &split.train, "audit: victim's texts")?;
    let public = inputs::pivots(backbone, task, &split.test, "audit: public texts")?;
    let everyone = Acts::from_tensor(&normalize_taps(&Tensor::cat(&[&train.taps, &public.taps], 0)?)?)?;
    let texts: Vec<String> = split.train.iter().chain(&split.test).map(|e| e.text.clone()).collect();
    let labels: Vec<u32> = train.labels.iter().chain(&public.labels).copied().collect();
    let (np, kl) = public.logits.dims2()?;
    let public_logits = Mat::from_row_slice(np, kl, &public.logits.flatten_all()?.to_vec1::<f32>()?);
    let template: HashSet<u32> = task.encode(backbone.tokenizer(), "")?.into_iter().collect();
    let tokens = texts
        .iter()
        .map(|s| Ok(task.encode(backbone.tokenizer(), s)?.into_iter().filter(|x| !template.contains(x)).collect()))
        .collect::<Result<Vec<HashSet<u32>>>>()?;
    let mut df = std::collections::HashMap::<u32, usize>::new();
    for set in &tokens[train.labels.len()..] {
        for &x in set {
            *df.entry(x).or_default() += 1;
        }
    }
    let mut by_df: Vec<(u32, usize)> = df.into_iter().collect();
    by_df.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let frequent = by_df.iter().take(super::FREQUENT_TOKENS).map(|(x, _)| *x).collect();
    let weights = backbone.llama().weights();
    let embed = weights.embed.dense()?;
    let (v, d) = embed.dims2()?;
    let embedding = unit_rows(&Mat::from_row_slice(v, d, &embed.flatten_all()?.to_vec1::<f32>()?));
    Ok(Knowledge {
        everyone,
        n_train: split.train.len(),
        texts,
        labels,
        n_labels: kl,
        public_logits,
        tokens,
        frequent,
        embedding,
        final_norm: weights.final_norm.to_vec1::<f32>()?,
    })
}
