//! Decoy tasks (docs/privacy.md, "Decoy tasks"): beside the real task the device sends the server M synthetic
//! ones, all mixed through the secret `Q`, so the targets hold M + 1 partitions of the samples and nothing in the
//! protocol says which one is real. The server trains one network on all of them; the device keeps only the real
//! task's columns (`dec(o) = (Qᵀ·o)[:K]`, unchanged), so the adapter does not change.
//!
//! A decoy copies what the server can measure of the real task:
//! - **class balance**: its labels cut a secret random linear score of the whitened taps (every layer) at the real
//!   labels' class proportions, each class a random bucket. The score is a random mix of the calibration set's
//!   leading principal components, where a real task's signal lives too (a random direction among the ~17 000
//!   features would be all but unlearnable, and so unlike any real task);
//! - **learnability**: a fraction ρ of its labels is replaced by another label, ρ chosen so that a ridge readout
//!   on the calibration set fits the decoy as well as it fits the real labels;
//! - **target magnitudes**: its "backbone logits" are the real ones with the true label's and the decoy label's
//!   entries swapped, sample by sample, so each sample's Δ holds the same values in another order, and the
//!   backbone is confidently wrong on a decoy exactly where it is on the real task.
//!
//! What it cannot copy is meaning: a public probe for the real task agrees with the real partition and not with
//! a decoy. The audit measures how far that gets a server.

use candle_core::{DType, Device, Tensor};
use nalgebra::DMatrix;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};

use super::targets::prediction_differences;
use crate::error::{Error, Result};

/// The most decoys a fine-tune may ask for: each costs the server's network K outputs.
pub const MAX_DECOYS: usize = 7;

/// Leading principal components of the calibration set a decoy's score mixes (at most a quarter of its examples).
const COMPONENTS: usize = 16;

/// The generator of M decoy tasks for one session: secret directions, cuts and label noise.
pub struct DecoyTasks {
    labels: usize,
    /// `[1, T·d]`: the calibration set's mean, which scores are taken about.
    mean: Tensor,
    /// `[T·d, M]`: one secret direction per decoy over the flattened whitened taps.
    directions: Tensor,
    /// Per decoy, the K − 1 ascending cuts of its score and the label of each of the K buckets.
    cuts: Vec<Vec<f32>>,
    bucket_labels: Vec<Vec<u32>>,
    /// ρ: the probability that a decoy label is replaced by another, uniformly.
    flip: f64,
    rng: ChaCha20Rng,
}

impl std::fmt::Debug for DecoyTasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The directions and cuts are secrets.
        f.debug_struct("DecoyTasks").field("count", &self.count()).field("flip", &self.flip).finish()
    }
}

impl DecoyTasks {
    /// Draws `count` decoys from `seed` and fits them to the calibration set: `inputs` `[m, T, d]` are the device's
    /// whitened taps of `m` examples with true labels `labels`; `class_counts` are the real labels' counts over the
    /// whole training set (the balance to copy).
    pub fn fit(count: usize, inputs: &Tensor, labels: &[u32], class_counts: &[usize], seed: [u8; 32]) -> Result<Self> {
        let k = class_counts.len();
        let (m, t, d) = inputs.dims3()?;
        if count == 0 || count > MAX_DECOYS {
            return Err(Error::InvalidInput(format!("decoys must be between 1 and {MAX_DECOYS}, not {count}")));
        }
        if labels.len() != m || m < 2 * k {
            return Err(Error::InvalidInput(format!("decoys need labels for at least {} calibration examples", 2 * k)));
        }
        let total: usize = class_counts.iter().sum();
        let mut rng = ChaCha20Rng::from_seed(seed);
        let x = inputs.to_dtype(DType::F32)?.reshape((m, t * d))?;
        let mean = x.mean_keepdim(0)?;
        let xc = x.broadcast_sub(&mean)?;
        // Two random halves: an order that follows the labels (alternating, say) must not decide the folds.
        let mut shuffled: Vec<usize> = (0..m).collect();
        shuffled.shuffle(&mut rng);
        let halves = [shuffled[..m / 2].to_vec(), shuffled[m / 2..].to_vec()];
        let readout = Readout::new(&xc, halves)?;
        // Direction = Xcᵀ·U·Λ⁻¹·g over the top components (U, Λ of the Gram matrix): on the calibration set its
        // scores are U·g, every component weighted alike.
        let eig = readout.gram.clone().symmetric_eigen();
        let mut order: Vec<usize> = (0..m).collect();
        order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
        let top: Vec<usize> =
            order.into_iter().take(COMPONENTS.min(m / 4).max(1)).filter(|&j| eig.eigenvalues[j] > 1e-9).collect();
        let mut coefficients = vec![0f32; m * count];
        for j in 0..count {
            for &c in &top {
                let g: f64 = StandardNormal.sample(&mut rng);
                let weight = g / eig.eigenvalues[c];
                for i in 0..m {
                    coefficients[i * count + j] += (eig.eigenvectors[(i, c)] * weight) as f32;
                }
            }
        }
        let coefficients = Tensor::from_vec(coefficients, (m, count), &Device::Cpu)?;
        let directions = xc.t()?.matmul(&coefficients)?; // [T·d, M]
        let scores = xc.matmul(&directions)?.to_vec2::<f32>()?; // [m, M]
        let (mut cuts, mut bucket_labels) = (Vec::with_capacity(count), Vec::with_capacity(count));
        for j in 0..count {
            let mut order: Vec<u32> = (0..k as u32).collect();
            order.shuffle(&mut rng);
            let mut sorted: Vec<f32> = scores.iter().map(|row| row[j]).collect();
            sorted.sort_by(f32::total_cmp);
            let mut cumulative = 0;
            let cut: Vec<f32> = order[..k - 1]
                .iter()
                .map(|&c| {
                    cumulative += class_counts[c as usize];
                    let at = (cumulative * m).div_ceil(total.max(1)).min(m - 1);
                    sorted[at]
                })
                .collect();
            cuts.push(cut);
            bucket_labels.push(order);
        }
        let mut decoys = Self { labels: k, mean, directions, cuts, bucket_labels, flip: 0.0, rng };
        // ρ from how well a readout fits each: the clean decoys fit (almost) perfectly, the real labels less.
        let real = readout.two_fold_accuracy(labels, k)?;
        let clean = decoys.clean_labels(&scores);
        let fitted: Vec<f64> = (0..count)
            .map(|j| readout.two_fold_accuracy(&clean.iter().map(|row| row[j]).collect::<Vec<_>>(), k))
            .collect::<Result<_>>()?;
        let clean_acc = fitted.iter().sum::<f64>() / count as f64;
        decoys.flip = flip_rate(clean_acc, real, k);
        Ok(decoys)
    }

    pub fn count(&self) -> usize {
        self.cuts.len()
    }

    /// The probability that a decoy label is replaced by another.
    pub fn flip_rate(&self) -> f64 {
        self.flip
    }

    /// The decoy labels of a group of examples, `[g × M]` row-major, from their whitened taps `[g, T, d]`. Drawn
    /// once per example: the caller keeps them for every round.
    pub fn label(&mut self, inputs: &Tensor) -> Result<Vec<u32>> {
        let (g, t, d) = inputs.dims3()?;
        if t * d != self.directions.dim(0)? {
            return Err(Error::InvalidInput(format!(
                "decoys were fitted to {} features, not {}",
                self.directions.dim(0)?,
                t * d
            )));
        }
        let x = inputs.to_dtype(DType::F32)?.reshape((g, t * d))?.broadcast_sub(&self.mean)?;
        let scores = x.matmul(&self.directions)?.to_vec2::<f32>()?;
        let (k, flip) = (self.labels as u32, self.flip);
        let mut out = Vec::with_capacity(g * self.count());
        for row in self.clean_labels(&scores) {
            for label in row {
                out.push(if self.rng.random_bool(flip) { (label + self.rng.random_range(1..k)) % k } else { label });
            }
        }
        Ok(out)
    }

    fn clean_labels(&self, scores: &[Vec<f32>]) -> Vec<Vec<u32>> {
        scores
            .iter()
            .map(|row| {
                (0..self.count())
                    .map(|j| self.bucket_labels[j][self.cuts[j].iter().filter(|&&c| row[j] >= c).count()])
                    .collect()
            })
            .collect()
    }
}

/// ρ such that labels fitted with accuracy `clean` are fitted with accuracy `real` once a fraction ρ is replaced
/// by another label (a replaced label is fitted as often as chance among the other K − 1).
fn flip_rate(clean: f64, real: f64, k: usize) -> f64 {
    let wrong = (1.0 - clean) / (k - 1) as f64;
    let rho = (clean - real) / (clean - wrong).max(1e-9);
    rho.clamp(0.0, 1.0 - 1.0 / k as f64)
}

/// A ridge readout from centred, flattened features `[m, F]` (dual form: fitted from the Gram matrix), scored on two
/// folds.
struct Readout {
    gram: DMatrix<f64>,
    halves: [Vec<usize>; 2],
}

impl Readout {
    fn new(x: &Tensor, halves: [Vec<usize>; 2]) -> Result<Self> {
        let g = x.matmul(&x.t()?)?.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let m = g.len();
        Ok(Self { gram: DMatrix::from_fn(m, m, |i, j| g[i][j]), halves })
    }

    /// Accuracy of predicting each half's labels from a readout fitted on the other half.
    fn two_fold_accuracy(&self, labels: &[u32], k: usize) -> Result<f64> {
        let (m, halves) = (labels.len(), &self.halves);
        // The penalty is the mean squared norm: strong enough for m ≪ F, and the same for every label set, which is
        // all the comparison needs.
        let penalty = self.gram.diagonal().mean();
        let mut correct = 0;
        for (fit, score) in [(&halves[0], &halves[1]), (&halves[1], &halves[0])] {
            let mut a = self.gram.select_rows(fit).select_columns(fit);
            a += DMatrix::identity(fit.len(), fit.len()) * penalty;
            // One-hot labels about their means, which are added back: an intercept, so imbalanced classes fit too.
            let y = DMatrix::from_fn(fit.len(), k, |i, c| if labels[fit[i]] as usize == c { 1.0 } else { 0.0 });
            let means = y.row_mean();
            let yc = DMatrix::from_fn(fit.len(), k, |i, c| y[(i, c)] - means[c]);
            let alpha = a.cholesky().ok_or_else(|| Error::Internal("decoy readout: singular Gram".into()))?.solve(&yc);
            let mut predicted = self.gram.select_rows(score).select_columns(fit) * alpha;
            for mut row in predicted.row_iter_mut() {
                row += &means;
            }
            correct += score
                .iter()
                .enumerate()
                .filter(|&(r, &i)| predicted.row(r).transpose().argmax().0 == labels[i] as usize)
                .count();
        }
        Ok(correct as f64 / m as f64)
    }
}

/// `[Δ, Δ₁, …, Δ_M]: [N, K·(M + 1)]`: the real task's prediction differences and each decoy's. `decoy_labels` is
/// `[N × M]` row-major; `dec_o` holds the decoded outputs of all `K·(M + 1)` columns (`None` before round 1). A
/// decoy's backbone logits are the real ones with the true and the decoy label's entries swapped per sample.
pub fn differences(
    z_b: &Tensor,
    dec_o: Option<&Tensor>,
    labels: &[u32],
    decoy_labels: &[u32],
    tau: f64,
) -> Result<Tensor> {
    let (n, k) = z_b.dims2()?;
    let count = decoy_labels.len().checked_div(n).unwrap_or(0);
    if decoy_labels.len() != n * count || labels.len() != n {
        return Err(Error::InvalidInput(format!("{} decoy labels for {n} samples", decoy_labels.len())));
    }
    if let Some(o) = dec_o {
        if o.dims() != [n, k * (count + 1)] {
            return Err(Error::InvalidInput(format!(
                "decoded outputs {:?}, expected [{n}, {}]",
                o.dims(),
                k * (count + 1)
            )));
        }
    }
    let block = |j: usize| dec_o.map(|o| o.narrow(1, j * k, k)).transpose();
    let mut parts = vec![prediction_differences(z_b, block(0)?.as_ref(), labels, tau)?];
    let logits = z_b.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    for j in 0..count {
        let mine: Vec<u32> = (0..n).map(|i| decoy_labels[i * count + j]).collect();
        if let Some(&bad) = mine.iter().find(|&&l| l as usize >= k) {
            return Err(Error::InvalidInput(format!("decoy label {bad} is out of range for {k} labels")));
        }
        let swapped: Vec<f32> = logits
            .iter()
            .enumerate()
            .flat_map(|(i, row)| {
                let mut row = row.clone();
                row.swap(labels[i] as usize, mine[i] as usize);
                row
            })
            .collect();
        let z = Tensor::from_vec(swapped, (n, k), &Device::Cpu)?;
        parts.push(prediction_differences(&z, block(j + 1)?.as_ref(), &mine, tau)?);
    }
    Ok(Tensor::cat(&parts, 1)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whitened-looking taps: `m` examples, `t` layers of width `d`, the first coordinate of every layer carrying
    /// the label (with `noise` of the labels unrelated to it).
    fn calibration(m: usize, t: usize, d: usize, noise: f64, seed: u64) -> (Tensor, Vec<u32>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let labels: Vec<u32> = (0..m).map(|i| (i % 2) as u32).collect();
        let mut x = Vec::with_capacity(m * t * d);
        for &y in &labels {
            let signal = if rng.random_bool(noise) { rng.random_range(0..2) } else { y };
            for _ in 0..t {
                let noise: f32 = StandardNormal.sample(&mut rng);
                x.push(if signal == 1 { 1.5 } else { -1.5 } + 0.5 * noise);
                x.extend((1..d).map(|_| -> f32 { StandardNormal.sample(&mut rng) }));
            }
        }
        (Tensor::from_vec(x, (m, t, d), &Device::Cpu).unwrap(), labels)
    }

    #[test]
    fn decoys_copy_the_class_balance_and_the_learnability_of_the_real_labels() {
        let (x, y) = calibration(256, 3, 16, 0.5, 1);
        // A 3 : 1 balance over the whole training set.
        let decoys = DecoyTasks::fit(3, &x, &y, &[750, 250], [7; 32]).unwrap();
        assert_eq!(decoys.count(), 3);
        // The real labels fit at about 75% (half of them random), the clean decoys better, so some decoy labels
        // must be flipped.
        assert!((0.05..0.4).contains(&decoys.flip_rate()), "flip rate {}", decoys.flip_rate());
        let mut decoys = decoys;
        let (fresh, _) = calibration(2000, 3, 16, 0.5, 2);
        let labels = decoys.label(&fresh).unwrap();
        assert_eq!(labels.len(), 2000 * 3);
        for j in 0..3 {
            let zeros = (0..2000).filter(|&i| labels[i * 3 + j] == 0).count() as f64 / 2000.0;
            // 75% or 25% depending on which bucket label 0 got, moved towards 50% by the flips.
            let target = [0.75, 0.25].iter().map(|p| p * (1.0 - decoys.flip_rate()) + (1.0 - p) * decoys.flip_rate());
            assert!(
                target.clone().any(|t| (zeros - t).abs() < 0.05),
                "decoy {j}: {zeros} of label 0, expected one of {target:?}",
                target = target.collect::<Vec<_>>()
            );
        }
        // Decoys are not the real partition.
        for j in 0..3 {
            let same = (0..2000).filter(|&i| labels[i * 3 + j] == (i % 2) as u32).count() as f64 / 2000.0;
            assert!((0.3..0.7).contains(&same), "decoy {j} agrees with the real labels on {same}");
        }
    }

    #[test]
    fn flip_rate_matches_the_accuracies() {
        assert!((flip_rate(1.0, 0.9, 2) - 0.1).abs() < 1e-12);
        assert_eq!(flip_rate(0.8, 0.95, 2), 0.0);
        assert!((flip_rate(1.0, 0.0, 3) - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn a_decoy_has_the_real_targets_magnitudes_in_its_own_order() {
        let z = Tensor::from_vec(vec![2.0f32, -1.0, 0.5, 0.0, -3.0, 1.0], (2, 3), &Device::Cpu).unwrap();
        let (labels, decoy) = ([0u32, 2], [1u32, 2]);
        let all = differences(&z, None, &labels, &decoy, 2.0).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(all[0].len(), 6);
        let mut real: Vec<f32> = all[0][..3].to_vec();
        let mut fake: Vec<f32> = all[0][3..].to_vec();
        // Sample 0: label 0, decoy label 1: the entries of labels 0 and 1 trade places.
        assert_eq!((real[0], real[1], real[2]), (fake[1], fake[0], fake[2]));
        real.sort_by(f32::total_cmp);
        fake.sort_by(f32::total_cmp);
        assert_eq!(real, fake);
        // Sample 1: the decoy label is the true one: the same Δ.
        assert_eq!(all[1][..3], all[1][3..]);
        // Decoded outputs of the wrong width are refused.
        let o = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(differences(&z, Some(&o), &labels, &decoy, 2.0).is_err());
    }
}
