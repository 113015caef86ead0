//! When `pae` stops refining (docs/side-network.md, *Rounds*). The device holds back a validation split of its
//! training examples — never uploaded, scored with their true labels even under label noise — and after every
//! round scores the folded network on it. A round improves on the best so far if it gets clearly more of the split
//! right — of the examples on which the two disagree, it must win more than it loses by over one standard deviation
//! of that difference were the two rounds equally good (`won − lost > √(won + lost)`: McNemar's paired test at
//! z = 1) — or if it lowers the split's cross-entropy by at least [`MIN_LOSS_GAIN`]. The fine-tune stops at the
//! first round that does not improve, or at `max_rounds`, and keeps the network of the last round that did.
//!
//! Why a split and not the training fit: the server's outputs on the training samples keep improving as the side
//! network memorises them, long after held-out accuracy has stopped moving; only examples the network never saw
//! say when another round stops helping. Why a paired test and not any rise: a split of a few hundred examples
//! moves by a point or two between equally good rounds, and on UCI a later round that "improved" by that much
//! was usually worse held out than round 1. Why the loss too, by a clear margin: on a small split the accuracy
//! saturates (80 BBC articles, 3 wrong from round 2 on) while the rounds still pay off held out, and it shows as
//! a falling cross-entropy. Why a margin as wide as 15%: on UCI's 2400 sentences the later rounds lower the
//! split's cross-entropy by 4–25% — every example a little more confident, 9 in 10 of them lower — without
//! helping held out, so neither a smaller drop nor one consistent across examples tells them from rounds that
//! help. Both thresholds were chosen on four tasks' rounds (docs/side-network.md, *Rounds*).
//!
//! The refit: once the rule has chosen, `pae` trains the chosen number of rounds again, from the initial weights,
//! on every example — the split included, which the server then sees like the others. Why: the split chooses how
//! many rounds, not which network; one round's training from a fresh draw of the sent examples ends anywhere in
//! 92.8–95.3% held out on UCI (26 runs), one round on every example in 94.0–95.0% (15 runs), and a tenth more
//! data is worth having (docs/side-network.md, *Refit*).

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
/// A round must win this many standard deviations more of the split's disputed examples than it loses…
pub const MIN_GAIN_SDS: f64 = 1.0;
/// …or lower the split's cross-entropy by this share.
pub const MIN_LOSS_GAIN: f64 = 0.15;

/// The indices of `n` training examples to hold back and of those to send, each sorted; none held back when a
/// split would be smaller than [`MIN_VALIDATION`] or there is only one round to choose.
pub fn validation_split(n: usize, max_rounds: usize) -> (Vec<usize>, Vec<usize>) {
    let m = ((n as f64 * VALIDATION_SHARE) as usize).min(MAX_VALIDATION);
    random_split(n, if max_rounds < 2 || m < MIN_VALIDATION { 0 } else { m })
}

/// How the fused model does on a set of examples: accuracy and mean cross-entropy of its label logits, and which
/// examples it gets right.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Score {
    pub accuracy: f64,
    pub loss: f64,
    /// Per example, in the split's order. Empty in a record written before it was kept: such a best is beaten by
    /// any higher accuracy.
    #[serde(default)]
    pub correct: Vec<bool>,
}

impl Score {
    /// The score of fused label logits `[N, K]` against `labels`.
    pub fn of(fused: &Tensor, labels: &[u32]) -> Result<Self> {
        let targets = Tensor::new(labels, &Device::Cpu)?;
        let predicted = predict(fused, None)?;
        Ok(Score {
            accuracy: accuracy(&predicted, labels),
            loss: f64::from(candle_nn::loss::cross_entropy(fused, &targets)?.to_scalar::<f32>()?),
            correct: predicted.iter().zip(labels).map(|(p, l)| p == l).collect(),
        })
    }

    /// True if this score gets clearly more of the split right than `other` (module doc).
    pub fn clearly_beats(&self, other: &Score) -> bool {
        if self.correct.len() != other.correct.len() {
            return self.accuracy > other.accuracy;
        }
        let (mut won, mut lost) = (0usize, 0usize);
        for (&now, &before) in self.correct.iter().zip(&other.correct) {
            match (now, before) {
                (true, false) => won += 1,
                (false, true) => lost += 1,
                _ => {}
            }
        }
        won > lost && (won - lost) as f64 > MIN_GAIN_SDS * ((won + lost) as f64).sqrt()
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
        let better = match &self.best {
            None => true,
            Some((_, best)) => score.clearly_beats(best) || score.loss < best.loss * (1.0 - MIN_LOSS_GAIN),
        };
        if better {
            self.best = Some((round, score));
        }
        better
    }

    /// The round whose network is kept.
    pub fn best_round(&self) -> Option<usize> {
        self.best.as_ref().map(|(round, _)| *round)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A score on a split of `right.len()` examples, '1' for each one right, with cross-entropy `loss`.
    fn s(right: &str, loss: f64) -> Score {
        let correct: Vec<bool> = right.chars().map(|c| c == '1').collect();
        let accuracy = correct.iter().filter(|&&c| c).count() as f64 / correct.len() as f64;
        Score { accuracy, loss, correct }
    }

    #[test]
    fn a_round_improves_by_clearly_more_examples_right_or_a_clear_drop_in_loss() {
        let mut stop = Stopping::default();
        assert!(stop.improved(1, s("0000000000", 0.50)), "the first round is the best so far");
        assert!(stop.improved(2, s("1110000000", 0.52)), "won 3, lost 0: 3 > √3, even with the loss up");
        assert!(!stop.improved(3, s("1111000000", 0.45)), "won 1, lost 0: not more than √1; loss down 13.5%");
        assert!(!stop.improved(4, s("0001111100", 0.52)), "won 5, lost 3: 2 < √8, though 2 more are right");
        assert!(stop.improved(5, s("1111111100", 0.52)), "won 5, lost 0");
        assert!(!stop.improved(6, s("1111111000", 0.52)), "fewer right");
        assert!(stop.improved(7, s("1111111000", 0.44)), "fewer right, but the loss down 15.4%");
        assert!(!stop.improved(8, s("1111111000", 0.38)), "as many right, the loss down 13.6%");
        assert_eq!(stop.best_round(), Some(7), "a round that did not improve never replaces the kept one");
    }

    #[test]
    fn a_best_recorded_without_its_examples_is_beaten_by_any_higher_accuracy() {
        let mut stop: Stopping = serde_json::from_str(r#"{"best":[1,{"accuracy":0.5,"loss":0.7}]}"#)
            .expect("a record from before `correct`");
        assert!(!stop.improved(2, s("1100", 0.7)), "equal accuracy");
        assert!(stop.improved(3, s("1110", 0.7)));
        assert!(!stop.improved(4, s("1111", 0.7)), "compared example by example from here on: won 1, lost 0");
        assert_eq!(stop.best_round(), Some(3));
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
