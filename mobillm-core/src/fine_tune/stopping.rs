//! When `pae` stops refining (docs/side-network.md, *Rounds*). The device holds back a validation split of its
//! training examples — never uploaded, scored with their true labels even under label noise — and after every
//! round scores the folded network on it. A round that raises the validation accuracy, or lowers the validation
//! loss by at least [`MIN_LOSS_GAIN`], is an improvement; the fine-tune stops at the first round that is not, or at
//! `max_rounds`, and keeps the network of the last round that improved.
//!
//! Why a split and not the training fit: the server's outputs on the training samples keep improving as the side
//! network memorises them, long after held-out accuracy has stopped moving; only examples the network never saw
//! say when another round stops helping.

use candle_core::{Device, Tensor};

use super::random_split;
use crate::error::Result;
use crate::side::targets::{accuracy, predict};

/// The share of the training examples held back for validation.
pub const VALIDATION_SHARE: f64 = 0.1;
/// At most this many: past it the validation accuracy is already within about 2 points.
pub const MAX_VALIDATION: usize = 256;
/// Below this many a validation split says too little: smaller data sets train on every example and run
/// [`ROUNDS_WITHOUT_VALIDATION`] rounds (or `max_rounds`, if fewer).
pub const MIN_VALIDATION: usize = 20;
/// The fixed round count measured before the rule (docs/side-network.md): what a run with nothing to validate
/// on does, rather than every round it may.
pub const ROUNDS_WITHOUT_VALIDATION: usize = 3;
/// The relative drop in validation loss that counts as an improvement without a gain in accuracy.
pub const MIN_LOSS_GAIN: f64 = 0.01;

/// The indices of `n` training examples to hold back and of those to send, each sorted; none held back when a
/// split would be smaller than [`MIN_VALIDATION`] or there is only one round to choose.
pub fn validation_split(n: usize, max_rounds: usize) -> (Vec<usize>, Vec<usize>) {
    let m = ((n as f64 * VALIDATION_SHARE) as usize).min(MAX_VALIDATION);
    random_split(n, if max_rounds < 2 || m < MIN_VALIDATION { 0 } else { m })
}

/// How the fused model does on a set of examples: accuracy and mean cross-entropy of its label logits.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Score {
    pub accuracy: f64,
    pub loss: f64,
}

impl Score {
    /// The score of fused label logits `[N, K]` against `labels`.
    pub fn of(fused: &Tensor, labels: &[u32]) -> Result<Self> {
        let targets = Tensor::new(labels, &Device::Cpu)?;
        Ok(Score {
            accuracy: accuracy(&predict(fused, None)?, labels),
            loss: f64::from(candle_nn::loss::cross_entropy(fused, &targets)?.to_scalar::<f32>()?),
        })
    }
}

/// The rounds seen so far and the best of them.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Stopping {
    best: Option<(usize, Score)>,
}

impl Stopping {
    /// Records `round`'s validation score; true if it improved on the best so far (the caller keeps its network).
    pub fn improved(&mut self, round: usize, score: Score) -> bool {
        let better = match self.best {
            None => true,
            Some((_, best)) => score.accuracy > best.accuracy || score.loss < best.loss * (1.0 - MIN_LOSS_GAIN),
        };
        if better {
            self.best = Some((round, score));
        }
        better
    }

    /// The round whose network is kept.
    pub fn best_round(&self) -> Option<usize> {
        self.best.map(|(round, _)| round)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(accuracy: f64, loss: f64) -> Score {
        Score { accuracy, loss }
    }

    #[test]
    fn a_round_improves_by_accuracy_or_by_a_clear_drop_in_loss() {
        let mut stop = Stopping::default();
        assert!(stop.improved(1, s(0.80, 0.50)), "the first round is the best so far");
        assert!(stop.improved(2, s(0.85, 0.55)), "accuracy up, even with the loss up");
        assert!(stop.improved(3, s(0.85, 0.50)), "same accuracy, loss down 9%");
        assert!(!stop.improved(4, s(0.85, 0.499)), "a loss drop under 1% is noise");
        assert!(stop.improved(5, s(0.84, 0.40)), "a 20% loss drop counts even with fewer right");
        assert!(!stop.improved(6, s(0.84, 0.45)));
        assert_eq!(stop.best_round(), Some(5), "a worse round never replaces the kept one");
    }

    #[test]
    fn the_split_is_a_tenth_capped_and_skipped_when_too_small_or_pointless() {
        assert!(validation_split(199, 8).0.is_empty(), "19 examples would say too little");
        let (v, sent) = validation_split(200, 8);
        assert_eq!(v.len(), 20);
        assert!(v.windows(2).all(|w| w[0] < w[1]) && v.iter().all(|&i| i < 200), "sorted, distinct, in range");
        assert_eq!(sent.len(), 180);
        assert!(sent.windows(2).all(|w| w[0] < w[1]) && sent.iter().all(|i| !v.contains(i)), "the others, in order");
        assert_eq!(validation_split(2400, 8).0.len(), 240);
        assert_eq!(validation_split(100_000, 8).0.len(), MAX_VALIDATION);
        assert!(validation_split(2400, 1).0.is_empty(), "one round leaves nothing to choose");
    }
}
