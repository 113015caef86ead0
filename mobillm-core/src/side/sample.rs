//! Samples as the assist server caches them: an opaque random id, one activation vector per tapped layer (already
//! unit-RMS and rotated by the device), and the current regression target in the device's secret output space.

use std::collections::HashSet;
use std::ops::ControlFlow;

use candle_core::{Device, Tensor};
use rand::TryRngCore;
use serde::{Deserialize, Serialize};

use super::trainer::{EpochReport, Objective, SideTrainer};
use crate::error::{Error, Result};

/// A random 128-bit sample id. Never derived from content (docs/design.md §5), so it tells the server nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SampleId(pub [u8; 16]);

impl SampleId {
    pub fn random() -> Result<Self> {
        let mut id = [0u8; 16];
        rand::rngs::OsRng.try_fill_bytes(&mut id).map_err(|e| Error::InvalidInput(format!("OS RNG: {e}")))?;
        Ok(Self(id))
    }
}

impl std::fmt::Display for SampleId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CachedSample {
    pub id: SampleId,
    /// `T·d` values, layer after layer.
    pub activations: Vec<f32>,
    /// `K'` values.
    pub target: Vec<f32>,
}

/// Stacks samples into `x: [N, T, d]` and `targets: [N, K']`, checking every length and that ids are unique.
pub fn stack_samples(trainer: &SideTrainer, samples: &[CachedSample]) -> Result<(Tensor, Tensor)> {
    let cfg = trainer.net().config();
    let (t, d, k) = (cfg.taps, cfg.hidden, cfg.outputs);
    let mut seen = HashSet::with_capacity(samples.len());
    let mut x = Vec::with_capacity(samples.len() * t * d);
    let mut y = Vec::with_capacity(samples.len() * k);
    for s in samples {
        if !seen.insert(s.id) {
            return Err(Error::InvalidInput(format!("sample {} appears twice", s.id)));
        }
        if s.activations.len() != t * d || s.target.len() != k {
            return Err(Error::InvalidInput(format!(
                "sample {} has {} activation values and {} target values, expected {} and {k}",
                s.id,
                s.activations.len(),
                s.target.len(),
                t * d
            )));
        }
        x.extend_from_slice(&s.activations);
        y.extend_from_slice(&s.target);
    }
    let n = samples.len();
    Ok((Tensor::from_vec(x, (n, t, d), &Device::Cpu)?, Tensor::from_vec(y, (n, k), &Device::Cpu)?))
}

impl SideTrainer {
    /// Trains on cached samples (PAE regression) for `epochs` epochs.
    pub fn fit_samples(
        &mut self,
        samples: &[CachedSample],
        epochs: usize,
        on_epoch: impl FnMut(&EpochReport, &super::SideNet) -> ControlFlow<()>,
    ) -> Result<Vec<EpochReport>> {
        let (x, targets) = stack_samples(self, samples)?;
        self.fit(&x, &Objective::Regression { targets }, epochs, on_epoch)
    }

    /// The network's current output `[K']` for each sample, keyed by id (what the device downloads between
    /// refinement rounds).
    pub fn sample_outputs(&self, samples: &[CachedSample]) -> Result<Vec<(SampleId, Vec<f32>)>> {
        let (x, _) = stack_samples(self, samples)?;
        let out = self.outputs(&x)?.to_vec2::<f32>()?;
        Ok(samples.iter().map(|s| s.id).zip(out).collect())
    }
}
