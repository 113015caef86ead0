//! Configuration of the side network (its shape, which travels with every adapter) and of its training.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The non-linearity φ inside each bottleneck adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    Gelu,
    Silu,
    Relu,
}

/// Shape of the side network of docs/design.md §3.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SideConfig {
    /// T: number of tapped backbone layers (one activation vector per layer per sample).
    pub taps: usize,
    /// d: the backbone's hidden size.
    pub hidden: usize,
    /// w: width of the side stream (each `P_i` maps d → w).
    pub width: usize,
    /// r: bottleneck rank of each adapter (r ≪ w).
    pub rank: usize,
    /// K: the task's number of labels.
    pub labels: usize,
    /// K' ≥ K: the padded output size the server sees (targets are rotated in R^{K'}).
    pub outputs: usize,
    pub activation: Activation,
    /// α₀: initial gate logit of every layer (μ = sigmoid(α)).
    pub alpha0: f32,
}

impl SideConfig {
    /// Defaults for a backbone with `taps` tapped layers of width `hidden` and a task of `labels` labels.
    pub fn new(taps: usize, hidden: usize, labels: usize) -> Self {
        Self {
            taps,
            hidden,
            width: 128,
            rank: 16,
            labels,
            outputs: default_outputs(labels),
            activation: Activation::Gelu,
            alpha0: 0.0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(format!("side network: {m}")));
        for (name, v) in [("taps", self.taps), ("hidden", self.hidden), ("width", self.width), ("rank", self.rank)] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if self.labels < 2 {
            return bad(format!("a task needs at least 2 labels, got {}", self.labels));
        }
        if self.outputs < self.labels {
            return bad(format!("outputs K' = {} must be at least the {} labels", self.outputs, self.labels));
        }
        if !self.alpha0.is_finite() {
            return bad("alpha0 must be finite".into());
        }
        Ok(())
    }
}

/// K' for K labels: padded so the server cannot tell K from the target width, and at least 8.
pub fn default_outputs(labels: usize) -> usize {
    (2 * labels).max(8)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    AdamW,
    /// Plain SGD: rotation-equivariant, used to prove the secrets cost nothing.
    Sgd,
}

/// How the side network is trained. Defaults measured on SmolLM2-135M pivots of the UCI sentences
/// (docs/side-network.md): batch 128 at lr 3e-3 trains as well as batch 32 at 1e-3 in a quarter of the steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub optimizer: Optimizer,
    pub lr: f64,
    pub weight_decay: f64,
    pub batch_size: usize,
    pub epochs: usize,
    /// Seeds the initial weights and the per-epoch shuffling.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self { optimizer: Optimizer::AdamW, lr: 3e-3, weight_decay: 0.0, batch_size: 128, epochs: 10, seed: 0 }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(format!("training: {m}")));
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("lr {} must be positive", self.lr));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!("weight_decay {} must be non-negative", self.weight_decay));
        }
        if self.batch_size == 0 {
            return bad("batch_size must be positive".into());
        }
        Ok(())
    }
}
