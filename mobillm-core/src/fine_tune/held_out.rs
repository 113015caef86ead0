//! The held-out and validation examples: forwarded once, kept as f16 pivots (half the memory; corrections are computed from
//! them in f32 slices), and scored with and without the adapter after every round, through the session's
//! whitening as the adapter will be.

use candle_core::{DType, Device, Tensor};

use super::progress::{Phase, Progress};
use super::stopping::Score;
use super::Run;
use crate::backbone::batching::scatter_rows;
use crate::dataset::Example;
use crate::error::Result;
use crate::side::targets::{accuracy, predict};
use crate::side::{device_inputs, SideNet, Whitening};

/// Held-out pivots: taps `[N, T, d]` (f16), the backbone's label logits `[N, K]` and the session's whitening.
pub struct Pivots {
    pub taps: Tensor,
    pub logits: Tensor,
    pub whitening: Option<Whitening>,
}

/// Rows scored at a time: each chunk's whitening passes through a few `[T, rows, d]` f32 copies (4.4 MB each at
/// 64 rows of SmolLM2's 30×576), which showed as 20–30 MB spikes of RSS at the end of every round.
const SCORE_ROWS: usize = 16;

impl Pivots {
    /// Accuracy of the backbone's label logits plus, with `net`, the folded network's corrections.
    pub fn accuracy(&self, net: Option<&SideNet>, labels: &[u32]) -> Result<f64> {
        let corrections = net.map(|net| self.corrections(net)).transpose()?;
        Ok(accuracy(&predict(&self.logits, corrections.as_ref())?, labels))
    }

    /// Accuracy and cross-entropy of the backbone's label logits plus the folded network's corrections.
    pub fn score(&self, net: &SideNet, labels: &[u32]) -> Result<Score> {
        Score::of(&(&self.logits + &self.corrections(net)?)?, labels)
    }

    /// The folded network's corrections `[N, K]` (f32), computed [`SCORE_ROWS`] at a time.
    fn corrections(&self, net: &SideNet) -> Result<Tensor> {
        let n = self.taps.dim(0)?;
        let parts = (0..n)
            .step_by(SCORE_ROWS)
            .map(|s| -> Result<Tensor> {
                let rows = self.taps.narrow(0, s, SCORE_ROWS.min(n - s))?.to_dtype(DType::F32)?;
                Ok(net.forward(&device_inputs(&rows, self.whitening.as_ref())?)?.to_dtype(DType::F32)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }
}

impl Run<'_> {
    /// Forwards the held-out (test) examples as evaluation: their time is not the fine-tune's (`elapsed_s`).
    pub(super) fn forward_test(
        &self,
        test: &[Example],
        whitening: Option<&Whitening>,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Option<Pivots>> {
        self.evaluating(|| self.forward_held_out(test, whitening, progress))
    }

    /// Forwards held-out examples (the validation split's or the test set's); `None` without any.
    pub(super) fn forward_held_out(
        &self,
        test: &[Example],
        whitening: Option<&Whitening>,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Option<Pivots>> {
        if test.is_empty() {
            return Ok(None);
        }
        let (n, k) = (test.len(), self.side.labels);
        let per = self.side.taps * self.side.hidden;
        let mut taps = vec![half::f16::ZERO; n * per];
        let mut logits = vec![0f32; n * k];
        self.forward_each(test, (Phase::Evaluate, 0), progress, |group, inputs, label_logits| {
            scatter_rows(inputs, group, per, &mut taps)?;
            scatter_rows(label_logits, group, k, &mut logits)
        })?;
        Ok(Some(Pivots {
            taps: Tensor::from_vec(taps, (n, self.side.taps, self.side.hidden), &Device::Cpu)?,
            logits: Tensor::from_vec(logits, (n, k), &Device::Cpu)?,
            whitening: whitening.cloned(),
        }))
    }
}
