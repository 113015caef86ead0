//! Decoy tasks (docs/privacy.md, "Decoy tasks"): beside the real task the device sends the server M synthetic
//! ones, all mixed through the secret `Q`, so the targets hold M + 1 partitions of the samples and nothing in the
//! protocol says which one is real. The server trains one network on all of them; the device keeps only the real
//! task's columns (`dec(o) = (Qᵀ·o)[:K]`, unchanged), so the adapter does not change.
//!
//! A decoy is a question the backbone has an opinion about, like the real task: "which of these two words comes
//! next?", for two secret words of the vocabulary, read from the backbone's own logits at the pivot (the real
//! task's label logits are read there too, so one forward gives both). Its score is the logit difference. It copies
//! what the server can measure of the real task:
//! - **meaning that generalizes**: the backbone's preference is a function of the text that holds on every
//!   sample, so a model fitted on some samples predicts it on others (a direction fitted to the calibration
//!   sample's own principal components does not: measured, the server's most-learnable pick found the real task);
//! - **class balance**: the score is cut at the real labels' class proportions (on the calibration set), each class
//!   a random bucket;
//! - **learnability**: a fraction ρ of its labels is replaced by another label, ρ chosen so that a ridge readout of
//!   the whitened taps (every layer) on the calibration set fits the decoy as well as it fits the real labels;
//! - **target magnitudes**: its "backbone logits" are the real ones with the true label's and the decoy label's
//!   entries swapped, sample by sample, so each sample's Δ holds the same values in another order, and the
//!   backbone is confidently wrong on a decoy exactly where it is on the real task.
//!
//! What it cannot copy is the real task's meaning: a public probe for the real task agrees with the real partition
//! and not with a decoy. The audit measures how far that gets a server.

use candle_core::{DType, Device, Tensor};
use nalgebra::DMatrix;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::targets::prediction_differences;
use crate::error::{Error, Result};

/// The most decoys a fine-tune may ask for: each costs the server's network K outputs.
pub const MAX_DECOYS: usize = 7;

/// Word pairs drawn per decoy; the most learnable are kept. Their logits cost one row of the output matrix each.
const CANDIDATES_PER_DECOY: usize = 8;
/// A candidate whose partition is this associated with the real one (Cramér's V) is not a decoy but a copy.
const MAX_ASSOCIATION: f64 = 0.3;

/// The generator of M decoy tasks for one session: secret word pairs, cuts and label noise.
pub struct DecoyTasks {
    labels: usize,
    count: usize,
    /// The candidate word pairs; a decoy's score is its pair's logit difference.
    words: Vec<[u32; 2]>,
    /// Set by `fit`, one per decoy: its candidate, the K − 1 ascending cuts of its score, the label of each of
    /// the K buckets, and ρ, the probability that its label is replaced by another, uniformly.
    chosen: Vec<Decoy>,
    rng: ChaCha20Rng,
}

#[derive(Clone)]
struct Decoy {
    candidate: usize,
    cuts: Vec<f32>,
    bucket_labels: Vec<u32>,
    flip: f64,
}

impl std::fmt::Debug for DecoyTasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The words and cuts are secrets.
        f.debug_struct("DecoyTasks").field("count", &self.count).field("flip_rates", &self.flip_rates()).finish()
    }
}

impl DecoyTasks {
    /// Draws candidates for `count` decoys of `labels` classes from `seed`: pairs of distinct words from the upper
    /// seven eighths of a vocabulary of `vocab` ids (the lowest ids are bytes and fragments), none of them in
    /// `exclude` (the task's label words).
    pub fn new(count: usize, labels: usize, vocab: usize, exclude: &[u32], seed: [u8; 32]) -> Result<Self> {
        if count == 0 || count > MAX_DECOYS {
            return Err(Error::InvalidInput(format!("decoys must be between 1 and {MAX_DECOYS}, not {count}")));
        }
        let (low, pairs) = (vocab / 8, count * CANDIDATES_PER_DECOY);
        if vocab - low < 2 * pairs + exclude.len() {
            return Err(Error::InvalidInput(format!("a vocabulary of {vocab} has too few words for {count} decoys")));
        }
        let mut rng = ChaCha20Rng::from_seed(seed);
        let mut taken: Vec<u32> = exclude.to_vec();
        let mut draw = |rng: &mut ChaCha20Rng| loop {
            let id = rng.random_range(low as u32..vocab as u32);
            if !taken.contains(&id) {
                taken.push(id);
                return id;
            }
        };
        let words = (0..pairs).map(|_| [draw(&mut rng), draw(&mut rng)]).collect();
        Ok(Self { labels, count, words, chosen: Vec::new(), rng })
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// The word ids whose logits the forward pass must return after the task's label words: every candidate's
    /// pair.
    pub fn word_ids(&self) -> Vec<u32> {
        self.words.iter().flatten().copied().collect()
    }

    /// Each example's candidate scores `[g][C]` from the logits of [`DecoyTasks::word_ids`], `[g, 2C]`.
    pub fn scores(&self, word_logits: &Tensor) -> Result<Vec<Vec<f32>>> {
        let (_, w) = word_logits.dims2()?;
        if w != 2 * self.words.len() {
            return Err(Error::InvalidInput(format!("{w} word logits for {} word pairs", self.words.len())));
        }
        let rows = word_logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        Ok(rows.into_iter().map(|r| r.chunks_exact(2).map(|p| p[0] - p[1]).collect()).collect())
    }

    /// Fits the decoys to the calibration set: `scores` of its `m` examples, their whitened taps `inputs`
    /// `[m, T, d]` and true `labels`; `class_counts` are the real labels' counts over the whole training set (the
    /// balance to copy). Each candidate is cut at that balance; of those not associated with the real labels, the
    /// `count` that a ridge readout of the taps fits best are kept, and each gets the flip rate that brings its fit
    /// down to the real labels'.
    pub fn fit(&mut self, scores: &[Vec<f32>], inputs: &Tensor, labels: &[u32], class_counts: &[usize]) -> Result<()> {
        let k = self.labels;
        let (m, t, d) = inputs.dims3()?;
        if class_counts.len() != k || labels.len() != m || scores.len() != m || m < 2 * k {
            return Err(Error::InvalidInput(format!(
                "decoys need scores and labels for at least {} calibration examples, and {k} class counts",
                2 * k
            )));
        }
        if let Some(row) = scores.iter().find(|r| r.len() != self.words.len()) {
            return Err(Error::InvalidInput(format!("{} scores for {} word pairs", row.len(), self.words.len())));
        }
        let x = inputs.to_dtype(DType::F32)?.reshape((m, t * d))?;
        let xc = x.broadcast_sub(&x.mean_keepdim(0)?)?;
        // Two random halves: an order that follows the labels (alternating, say) must not decide the folds.
        let mut shuffled: Vec<usize> = (0..m).collect();
        shuffled.shuffle(&mut self.rng);
        let readout = Readout::new(&xc, [shuffled[..m / 2].to_vec(), shuffled[m / 2..].to_vec()])?;
        let real = readout.two_fold_accuracy(labels, k)?;
        let total: usize = class_counts.iter().sum();
        let mut candidates = Vec::with_capacity(self.words.len());
        for c in 0..self.words.len() {
            let mut bucket_labels: Vec<u32> = (0..k as u32).collect();
            bucket_labels.shuffle(&mut self.rng);
            let mut sorted: Vec<f32> = scores.iter().map(|row| row[c]).collect();
            sorted.sort_by(f32::total_cmp);
            let mut cumulative = 0;
            let cuts: Vec<f32> = bucket_labels[..k - 1]
                .iter()
                .map(|&l| {
                    cumulative += class_counts[l as usize];
                    sorted[(cumulative * m).div_ceil(total.max(1)).min(m - 1)]
                })
                .collect();
            let decoy = Decoy { candidate: c, cuts, bucket_labels, flip: 0.0 };
            let clean: Vec<u32> = scores.iter().map(|row| decoy.clean_label(row)).collect();
            let distinct = cramers_v(&clean, labels, k) <= MAX_ASSOCIATION;
            candidates.push((distinct, readout.two_fold_accuracy(&clean, k)?, decoy, clean));
        }
        candidates.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.total_cmp(&a.1)));
        let ranked: Vec<(bool, &[u32])> = candidates.iter().map(|(d, _, _, clean)| (*d, clean.as_slice())).collect();
        let kept = keep_distinct(&ranked, self.count, k);
        self.chosen = kept
            .into_iter()
            .map(|i| {
                let (_, fit, decoy, _) = &candidates[i];
                Decoy { flip: flip_rate(*fit, real, k), ..decoy.clone() }
            })
            .collect();
        Ok(())
    }

    /// Each decoy's probability that its label is replaced by another (0 for a decoy the readout fits no better
    /// than the real labels: that decoy is harder than the real task, which an attacker may notice).
    pub fn flip_rates(&self) -> Vec<f64> {
        self.chosen.iter().map(|d| d.flip).collect()
    }

    /// The decoy labels of a group of examples, `[g × M]` row-major, from their candidate scores. Drawn once per
    /// example: the caller keeps them for every round.
    pub fn label(&mut self, scores: &[Vec<f32>]) -> Result<Vec<u32>> {
        if self.chosen.len() != self.count {
            return Err(Error::Internal("decoys used before they were fitted".into()));
        }
        let k = self.labels as u32;
        let mut out = Vec::with_capacity(scores.len() * self.count);
        for row in scores {
            if row.len() != self.words.len() {
                return Err(Error::InvalidInput(format!("{} scores for {} word pairs", row.len(), self.words.len())));
            }
            for decoy in &self.chosen {
                let label = decoy.clean_label(row);
                let flipped = self.rng.random_bool(decoy.flip);
                out.push(if flipped { (label + self.rng.random_range(1..k)) % k } else { label });
            }
        }
        Ok(out)
    }
}

impl Decoy {
    fn clean_label(&self, scores: &[f32]) -> u32 {
        let score = scores[self.candidate];
        self.bucket_labels[self.cuts.iter().filter(|&&c| score >= c).count()]
    }
}

/// Cramér's V between two labellings of the same examples over `k` classes: 0 independent, 1 one determines the
/// other.
/// The `count` candidates to keep, from `ranked` (best first; each with whether it is distinct from the real
/// partition, and its labels): first those that copy neither the real partition nor a decoy already kept (a
/// second copy of a partition adds no ambiguity, only outputs), then, if too few are left, the others in order.
fn keep_distinct(ranked: &[(bool, &[u32])], count: usize, k: usize) -> Vec<usize> {
    let mut kept: Vec<usize> = Vec::with_capacity(count);
    for (i, &(distinct, labels)) in ranked.iter().enumerate() {
        if kept.len() < count && distinct && kept.iter().all(|&j| cramers_v(labels, ranked[j].1, k) <= MAX_ASSOCIATION)
        {
            kept.push(i);
        }
    }
    for i in 0..ranked.len() {
        if kept.len() < count && !kept.contains(&i) {
            kept.push(i);
        }
    }
    kept
}

fn cramers_v(a: &[u32], b: &[u32], k: usize) -> f64 {
    let n = a.len() as f64;
    let mut table = vec![0f64; k * k];
    a.iter().zip(b).for_each(|(&x, &y)| table[x as usize * k + y as usize] += 1.0);
    let rows: Vec<f64> = (0..k).map(|i| table[i * k..(i + 1) * k].iter().sum()).collect();
    let cols: Vec<f64> = (0..k).map(|j| (0..k).map(|i| table[i * k + j]).sum()).collect();
    let mut chi2 = 0.0;
    for i in 0..k {
        for j in 0..k {
            let expected = rows[i] * cols[j] / n;
            if expected > 0.0 {
                chi2 += (table[i * k + j] - expected).powi(2) / expected;
            }
        }
    }
    (chi2 / (n * (k - 1) as f64)).sqrt()
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
    use rand_distr::{Distribution, StandardNormal};

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

    /// Word logits `[m, 48]` of the 24 candidates of three decoys: candidate c's score is coordinate c + 1 of layer
    /// 0 scaled by (c + 1) / 24 plus unit noise, so the later candidates are the more learnable.
    fn word_logits(x: &Tensor, seed: u64) -> Tensor {
        let m = x.dim(0).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let features = x.narrow(1, 0, 1).unwrap().reshape((m, 16)).unwrap().to_vec2::<f32>().unwrap();
        let mut logits = Vec::with_capacity(m * 48);
        for row in features {
            for c in 0..24 {
                let noise: f32 = StandardNormal.sample(&mut rng);
                logits.extend([row[1 + c % 15] * (c + 1) as f32 / 6.0 + noise, 0.0]);
            }
        }
        Tensor::from_vec(logits, (m, 48), &Device::Cpu).unwrap()
    }

    #[test]
    fn decoys_copy_the_class_balance_and_the_learnability_of_the_real_labels() {
        let mut decoys = DecoyTasks::new(3, 2, 1000, &[200, 300], [7; 32]).unwrap();
        let words = decoys.word_ids();
        assert_eq!(words.len(), 48);
        assert!(words.iter().all(|&w| (125..1000).contains(&w) && w != 200 && w != 300), "{words:?}");
        assert!(words.iter().enumerate().all(|(i, w)| !words[..i].contains(w)), "distinct: {words:?}");

        let (x, y) = calibration(256, 3, 16, 0.5, 1);
        // A 3 : 1 balance over the whole training set.
        decoys.fit(&decoys.scores(&word_logits(&x, 3)).unwrap(), &x, &y, &[750, 250]).unwrap();
        // The most learnable candidates are kept (the late ones), and the real labels fit at about 75% (half of
        // them random), so their labels must be flipped.
        assert!(
            decoys.chosen.iter().all(|d| d.candidate >= 12),
            "{:?}",
            decoys.chosen.iter().map(|d| d.candidate).collect::<Vec<_>>()
        );
        assert!(decoys.flip_rates().iter().all(|f| (0.03..0.4).contains(f)), "flip rates {:?}", decoys.flip_rates());
        let (fresh, _) = calibration(2000, 3, 16, 0.5, 2);
        let labels = decoys.label(&decoys.scores(&word_logits(&fresh, 4)).unwrap()).unwrap();
        assert_eq!(labels.len(), 2000 * 3);
        for (j, flip) in decoys.flip_rates().into_iter().enumerate() {
            let zeros = (0..2000).filter(|&i| labels[i * 3 + j] == 0).count() as f64 / 2000.0;
            // 75% or 25% depending on which bucket label 0 got, moved towards 50% by the flips.
            let target = [0.75, 0.25].map(|p| p * (1.0 - flip) + (1.0 - p) * flip);
            assert!(
                target.iter().any(|t| (zeros - t).abs() < 0.05),
                "decoy {j}: {zeros} of label 0, expected one of {target:?}"
            );
        }
        // Decoys are not the real partition.
        for j in 0..3 {
            let same = (0..2000).filter(|&i| labels[i * 3 + j] == (i % 2) as u32).count() as f64 / 2000.0;
            assert!((0.3..0.7).contains(&same), "decoy {j} agrees with the real labels on {same}");
        }
    }

    #[test]
    fn bad_counts_vocabularies_and_shapes_are_refused() {
        assert!(DecoyTasks::new(0, 2, 1000, &[], [0; 32]).is_err());
        assert!(DecoyTasks::new(MAX_DECOYS + 1, 2, 1000, &[], [0; 32]).is_err());
        assert!(DecoyTasks::new(3, 2, 50, &[], [0; 32]).is_err(), "44 words for 48");
        let mut decoys = DecoyTasks::new(1, 2, 1000, &[], [0; 32]).unwrap();
        assert!(decoys.label(&[vec![0.5; 8]]).is_err(), "not fitted yet");
        assert!(decoys.scores(&Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap()).is_err());
    }

    #[test]
    fn cramers_v_tells_copies_from_independent_partitions() {
        let a: Vec<u32> = (0..400).map(|i| (i % 2) as u32).collect();
        let complement: Vec<u32> = a.iter().map(|l| 1 - l).collect();
        let other: Vec<u32> = (0..400).map(|i| ((i / 2) % 2) as u32).collect();
        assert!((cramers_v(&a, &a, 2) - 1.0).abs() < 1e-9);
        assert!((cramers_v(&a, &complement, 2) - 1.0).abs() < 1e-9);
        assert!(cramers_v(&a, &other, 2) < 1e-9);
    }

    #[test]
    fn a_decoy_that_copies_a_kept_one_gives_way_to_the_next_distinct_one() {
        let a: Vec<u32> = (0..400).map(|i| (i % 2) as u32).collect();
        let complement: Vec<u32> = a.iter().map(|l| 1 - l).collect();
        let b: Vec<u32> = (0..400).map(|i| ((i / 2) % 2) as u32).collect();
        let c: Vec<u32> = (0..400).map(|i| ((i / 4) % 2) as u32).collect();
        // Best first: a, its complement (the same partition), a copy of the real labels, b, c.
        let ranked = [(true, &a[..]), (true, &complement[..]), (false, &b[..]), (true, &b[..]), (true, &c[..])];
        assert_eq!(keep_distinct(&ranked, 3, 2), vec![0, 3, 4]);
        // Too few distinct ones: the rest fill up in order.
        assert_eq!(keep_distinct(&ranked[..3], 3, 2), vec![0, 1, 2]);
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
