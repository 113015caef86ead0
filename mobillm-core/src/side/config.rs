//! Configuration of the side network (its shape, which travels with every adapter) and of its training.

use candle_core::Tensor;
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

/// What the device sends of each tapped layer, per sample (docs/side-network.md, *Long texts*).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Summary {
    /// The hidden state at the pivot token (the default: 16 KB a sample at int8 on SmolLM2-135M).
    #[default]
    Pivot,
    /// The pivot and the mean over the prompt's tokens after the first: twice the upload, for long texts and
    /// labels that rest on a few words.
    PivotAndMean,
}

impl Summary {
    /// Inputs per tapped layer.
    pub fn count(self) -> usize {
        match self {
            Summary::Pivot => 1,
            Summary::PivotAndMean => 2,
        }
    }

    pub fn is_pivot(&self) -> bool {
        *self == Summary::Pivot
    }

    /// The side network's inputs `[B, T·count, d]` from a forward's pivots and means (`[B, T, d]` each): per
    /// layer, the pivot and then the mean, so the ladder still climbs the layers in order.
    pub fn inputs(self, pivots: &Tensor, means: Option<&Tensor>) -> Result<Tensor> {
        match (self, means) {
            (Summary::Pivot, _) => Ok(pivots.clone()),
            (Summary::PivotAndMean, Some(means)) => {
                let (b, t, d) = pivots.dims3()?;
                Ok(Tensor::stack(&[pivots, means], 2)?.reshape((b, 2 * t, d))?)
            }
            (Summary::PivotAndMean, None) => Err(Error::Internal("the means were not kept from the forward".into())),
        }
    }
}

impl std::str::FromStr for Summary {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "pivot" => Ok(Summary::Pivot),
            "pivot_and_mean" | "pivot-and-mean" => Ok(Summary::PivotAndMean),
            other => Err(Error::InvalidInput(format!("unknown summary {other:?} (pivot or pivot_and_mean)"))),
        }
    }
}

/// Shape of the side network of docs/design.md §3.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SideConfig {
    /// The network's inputs per sample: tapped backbone layers × `summary.count()` (one activation vector each).
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
    /// E: networks side by side, each trained on its own loss, used through their mean (module `network`).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub members: usize,
    /// What the inputs are: the device's business (it decides the inputs and the rotations they share); the
    /// server, which never sees it, trains on `taps` inputs either way.
    #[serde(default, skip_serializing_if = "Summary::is_pivot")]
    pub summary: Summary,
}

impl SideConfig {
    /// Defaults for a backbone with `taps` tapped layers of width `hidden` and a task of `labels` labels.
    pub fn new(taps: usize, hidden: usize, labels: usize) -> Self {
        Self {
            taps,
            hidden,
            // Four members of a quarter of the width one network had: the same projections and memory, and their
            // mean is about a point better than one network (docs/side-network.md, *Members*).
            width: 32,
            rank: 16,
            labels,
            outputs: default_outputs(labels),
            activation: Activation::Gelu,
            alpha0: 0.0,
            members: 4,
            summary: Summary::Pivot,
        }
    }

    /// Tapped backbone layers (one rotation each): the inputs over the summaries per layer.
    pub fn layers(&self) -> usize {
        self.taps / self.summary.count()
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(format!("side network: {m}")));
        for (name, v) in [
            ("taps", self.taps),
            ("hidden", self.hidden),
            ("width", self.width),
            ("rank", self.rank),
            ("members", self.members),
        ] {
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
        if !self.taps.is_multiple_of(self.summary.count()) {
            return bad(format!("{} inputs are not {} per tapped layer", self.taps, self.summary.count()));
        }
        Ok(())
    }
}

/// Serde's default for counts that were one before they could be more (members in configs and resume recipes).
pub(crate) fn one() -> usize {
    1
}

fn is_one(v: &usize) -> bool {
    *v == 1
}

/// K' for K labels: padded so the server cannot tell K from the target width, and at least 8.
pub fn default_outputs(labels: usize) -> usize {
    (2 * labels).max(8)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    /// AdamW, one second moment per weight: for networks trained on plain activations (`mobillm` sessions on the
    /// server, `local` on the device).
    AdamW,
    /// AdamW with one second moment per projection row and per output column instead of per weight
    /// ([`super::adamw::AdamW::share_second_moment`]): a step in the secret coordinates is the rotated image of the
    /// step on plain activations, as with SGD, so the secrets cost nothing (per-weight AdamW depends on the basis).
    /// What `pae` sessions train with. Not the default: with no rotation to be equivariant to, it trains worse on
    /// small data sets (docs/side-network.md, *Optimiser*).
    #[serde(rename = "adamw-equivariant")]
    EquivariantAdamW,
    /// Plain SGD, whose steps are easy to check by hand in tests.
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
