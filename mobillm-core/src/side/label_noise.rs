//! Label differential privacy on the device: k-ary randomized response. Each training label is kept with
//! probability `p = e^ε / (e^ε + K − 1)` and otherwise replaced by one of the other `K − 1` labels, uniformly. Any
//! two labels then make a given noisy label at most `e^ε` times as likely as each other, so whatever the server
//! learns from the targets (which depend on the label only through the noisy one) is ε-label-DP for each sample.
//!
//! The noise is drawn once per sample and the noisy labels are used in every round: a label is released once,
//! however many rounds reuse it, so ε does not grow with the rounds. A Bayes-optimal attacker who recovers a noisy
//! label exactly guesses the true one with probability `p` (uniform prior); a better prior (a public classifier,
//! say) can do better, which is why ε is a dial and not a guarantee about accuracy. docs/privacy.md has the
//! figures.

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};

/// The probability that randomized response keeps a label, for `labels` classes at `epsilon`.
pub fn keep_probability(epsilon: f64, labels: usize) -> f64 {
    let e = epsilon.exp();
    e / (e + labels.saturating_sub(1) as f64)
}

/// Refuses an ε that is not a positive, finite number.
pub fn validate_epsilon(epsilon: f64) -> Result<()> {
    if epsilon.is_finite() && epsilon > 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!("label ε must be a positive, finite number, not {epsilon}")))
    }
}

/// Randomized response over `classes` labels: each of `labels` is kept with [`keep_probability`] and otherwise
/// replaced by another label, uniformly; the draws come from `seed` (a fresh secret per fine-tune).
pub fn randomize(labels: &[u32], classes: usize, epsilon: f64, seed: [u8; 32]) -> Result<Vec<u32>> {
    validate_epsilon(epsilon)?;
    if classes < 2 {
        return Err(Error::InvalidInput(format!("randomized response needs 2 or more labels, not {classes}")));
    }
    if let Some(bad) = labels.iter().find(|&&l| l as usize >= classes) {
        return Err(Error::Internal(format!("label index {bad} of {classes} labels")));
    }
    let keep = keep_probability(epsilon, classes);
    let mut rng = ChaCha8Rng::from_seed(seed);
    let mut others: Vec<u32> = Vec::with_capacity(classes - 1);
    Ok(labels
        .iter()
        .map(|&l| {
            if rng.random_bool(keep) {
                return l;
            }
            others.clear();
            others.extend((0..classes as u32).filter(|&o| o != l));
            *others.choose(&mut rng).expect("two or more labels")
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_labels_at_the_rate_epsilon_allows() {
        let n = 20_000;
        for (epsilon, classes) in [(1.0, 2), (3.0, 2), (0.5, 4)] {
            let labels: Vec<u32> = (0..n).map(|i| (i % classes) as u32).collect();
            let noisy = randomize(&labels, classes, epsilon, [9; 32]).unwrap();
            let kept = labels.iter().zip(&noisy).filter(|(a, b)| a == b).count() as f64 / n as f64;
            let p = keep_probability(epsilon, classes);
            assert!((kept - p).abs() < 0.015, "ε {epsilon}, K {classes}: kept {kept}, expected {p}");
            // A changed label goes to every other label alike.
            for target in 0..classes as u32 {
                let to = noisy.iter().zip(&labels).filter(|(b, a)| a != b && **b == target).count() as f64;
                let changed = (n as f64) * (1.0 - p);
                assert!((to / changed - 1.0 / classes as f64).abs() < 0.03, "label {target}: {to} of {changed}");
            }
        }
        assert!((keep_probability(1.0, 2) - 0.7311).abs() < 1e-4);
    }

    #[test]
    fn the_same_seed_draws_the_same_noise_and_bad_input_is_refused() {
        let labels: Vec<u32> = (0..500).map(|i| (i % 3) as u32).collect();
        let a = randomize(&labels, 3, 1.0, [1; 32]).unwrap();
        assert_eq!(a, randomize(&labels, 3, 1.0, [1; 32]).unwrap());
        assert_ne!(a, randomize(&labels, 3, 1.0, [2; 32]).unwrap());
        for epsilon in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(randomize(&labels, 3, epsilon, [1; 32]), Err(Error::InvalidInput(_))), "{epsilon}");
        }
        assert!(matches!(randomize(&labels, 1, 1.0, [1; 32]), Err(Error::InvalidInput(_))));
        assert!(matches!(randomize(&[5], 3, 1.0, [1; 32]), Err(Error::Internal(_))));
    }
}
