//! The privacy audit's attacks as plain linear algebra, with no model or server in sight, so each can be tested on
//! planted data: k-means, ridge probes, spectral alignment of a rotated point cloud, nearest-candidate matching and
//! top-m decoding. Matrices hold one sample per row.

use nalgebra::DMatrix;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub type Mat = DMatrix<f32>;

/// Rows scaled to unit length (cosine similarity becomes a dot product, nearest in Euclidean distance the most
/// similar).
pub fn unit_rows(x: &Mat) -> Mat {
    let mut y = x.clone();
    for mut r in y.row_iter_mut() {
        let n = r.norm().max(1e-12);
        r /= n;
    }
    y
}

pub fn column_means(x: &Mat) -> Vec<f32> {
    (0..x.ncols()).map(|j| x.column(j).mean()).collect()
}

pub fn subtract_row(x: &Mat, row: &[f32]) -> Mat {
    let mut y = x.clone();
    for (j, m) in row.iter().enumerate() {
        y.column_mut(j).add_scalar_mut(-m);
    }
    y
}

/// Squared Euclidean distances `[n, m]` between the rows of `x` and the rows of `c`.
fn sq_distances(x: &Mat, c: &Mat) -> Mat {
    let xn: Vec<f32> = x.row_iter().map(|r| r.norm_squared()).collect();
    let cn: Vec<f32> = c.row_iter().map(|r| r.norm_squared()).collect();
    let mut d = x * c.transpose() * -2.0;
    for i in 0..d.nrows() {
        for j in 0..d.ncols() {
            d[(i, j)] += xn[i] + cn[j];
        }
    }
    d
}

fn argmin_row(d: &Mat, i: usize) -> usize {
    (0..d.ncols()).min_by(|&a, &b| d[(i, a)].total_cmp(&d[(i, b)])).unwrap_or(0)
}

/// Row-wise argmax (predicted classes from scores).
pub fn argmax_rows(m: &Mat) -> Vec<u32> {
    (0..m.nrows())
        .map(|i| (0..m.ncols()).max_by(|&a, &b| m[(i, a)].total_cmp(&m[(i, b)])).unwrap_or(0) as u32)
        .collect()
}

/// k-means with k-means++ seeding; the best of a few restarts by inertia. Returns each row's cluster.
pub fn kmeans(x: &Mat, k: usize, seed: u64) -> Vec<usize> {
    let (n, d) = x.shape();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut best: Option<(f32, Vec<usize>)> = None;
    for _ in 0..4 {
        let mut centres = Mat::zeros(k, d);
        centres.set_row(0, &x.row(rng.random_range(0..n)));
        for c in 1..k {
            let dist = sq_distances(x, &centres.rows(0, c).into_owned());
            let w: Vec<f32> = (0..n).map(|i| dist.row(i).min().max(0.0)).collect();
            let mut r = rng.random::<f32>() * w.iter().sum::<f32>();
            let pick = w.iter().position(|&wi| {
                r -= wi;
                r < 0.0
            });
            centres.set_row(c, &x.row(pick.unwrap_or(n - 1)));
        }
        let mut assign = vec![usize::MAX; n];
        for _ in 0..100 {
            let dist = sq_distances(x, &centres);
            let next: Vec<usize> = (0..n).map(|i| argmin_row(&dist, i)).collect();
            if next == assign {
                break;
            }
            assign = next;
            let mut sums = Mat::zeros(k, d);
            let mut counts = vec![0usize; k];
            for (i, &a) in assign.iter().enumerate() {
                let mut row = sums.row_mut(a);
                row += x.row(i);
                counts[a] += 1;
            }
            for (c, &count) in counts.iter().enumerate() {
                if count > 0 {
                    centres.set_row(c, &(sums.row(c) / count as f32));
                }
            }
        }
        let dist = sq_distances(x, &centres);
        let inertia: f32 = assign.iter().enumerate().map(|(i, &a)| dist[(i, a)]).sum();
        if best.as_ref().is_none_or(|(b, _)| inertia < *b) {
            best = Some((inertia, assign));
        }
    }
    best.map(|(_, a)| a).unwrap_or_default()
}

/// For each cluster, the label most of its members carry (`labels` are what the mapping is voted with).
pub fn majority_mapping(clusters: &[usize], labels: &[u32], k: usize, n_labels: usize) -> Vec<u32> {
    let mut counts = vec![vec![0usize; n_labels]; k];
    for (&c, &l) in clusters.iter().zip(labels) {
        counts[c][l as usize] += 1;
    }
    counts.iter().map(|c| (0..n_labels).max_by_key(|&l| c[l]).unwrap_or(0) as u32).collect()
}

/// Names clusters without labels: the one-to-one naming under which the clusters agree most with `votes` (some
/// weak per-sample guess of the label). Exhaustive over namings for up to 6 labels, else per-cluster majority.
pub fn agreement_naming(clusters: &[usize], votes: &[u32], k: usize) -> Vec<u32> {
    if k > 6 {
        return majority_mapping(clusters, votes, k, k);
    }
    let mut counts = vec![vec![0usize; k]; k];
    for (&c, &v) in clusters.iter().zip(votes) {
        counts[c][v as usize] += 1;
    }
    let mut best = (0usize, (0..k as u32).collect::<Vec<_>>());
    let mut naming: Vec<u32> = (0..k as u32).collect();
    permutations(&mut naming, 0, &mut |p| {
        let agree = (0..k).map(|c| counts[c][p[c] as usize]).sum();
        if agree > best.0 {
            best = (agree, p.to_vec());
        }
    });
    best.1
}

fn permutations(items: &mut [u32], from: usize, visit: &mut dyn FnMut(&[u32])) {
    if from == items.len() {
        return visit(items);
    }
    for i in from..items.len() {
        items.swap(from, i);
        permutations(items, from + 1, visit);
        items.swap(from, i);
    }
}

/// Fraction of equal entries.
pub fn accuracy(predicted: &[u32], truth: &[u32]) -> f64 {
    predicted.iter().zip(truth).filter(|(p, t)| p == t).count() as f64 / truth.len().max(1) as f64
}

/// Clustering accuracy: each cluster named by the majority of its true labels. This needs the labels, so it is an
/// upper bound on an attacker who only has the clusters: it measures how well the partition follows the labels.
pub fn clustering_accuracy(clusters: &[usize], labels: &[u32], k: usize, n_labels: usize) -> f64 {
    let names = majority_mapping(clusters, labels, k, n_labels);
    accuracy(&clusters.iter().map(|&c| names[c]).collect::<Vec<_>>(), labels)
}

/// Ridge regression with an intercept: `y ≈ (x − mean)·w + bias`, the penalty `λ` relative to the mean
/// eigenvalue of the (centred) Gram matrix.
pub struct Ridge {
    mean: Vec<f32>,
    w: Mat,
    bias: Vec<f32>,
}

impl Ridge {
    pub fn fit(x: &Mat, y: &Mat, lambda: f32) -> Self {
        let mean = column_means(x);
        let bias = column_means(y);
        let xc = subtract_row(x, &mean);
        let yc = subtract_row(y, &bias);
        let mut g = (xc.transpose() * &xc).cast::<f64>();
        let scale = g.trace() / g.nrows().max(1) as f64;
        for i in 0..g.nrows() {
            g[(i, i)] += lambda as f64 * scale.max(1e-12);
        }
        let rhs = (xc.transpose() * yc).cast::<f64>();
        let w = match g.clone().cholesky() {
            Some(ch) => ch.solve(&rhs),
            None => g.lu().solve(&rhs).unwrap_or_else(|| DMatrix::zeros(rhs.nrows(), rhs.ncols())),
        };
        Self { mean, w: w.cast::<f32>(), bias }
    }

    pub fn predict(&self, x: &Mat) -> Mat {
        let mut y = subtract_row(x, &self.mean) * &self.w;
        for (j, b) in self.bias.iter().enumerate() {
            y.column_mut(j).add_scalar_mut(*b);
        }
        y
    }
}

pub fn one_hot(labels: &[u32], k: usize) -> Mat {
    Mat::from_fn(labels.len(), k, |i, j| f32::from(labels[i] as usize == j))
}

/// Accuracy of `scores` after the one constant per label that best fits `labels` (softmax cross-entropy, by gradient
/// descent): what anyone holding a few labelled texts gets from a model by correcting its label bias alone, and so
/// the baseline a stolen model must beat before it has told its thief anything more.
pub fn calibrated_accuracy(scores: &Mat, labels: &[u32]) -> f64 {
    let (n, k) = scores.shape();
    let mut offset = vec![0.0f64; k];
    // The gradient is the mean of (softmax − one-hot), at most 1 in size and 1/2-Lipschitz, so a unit step
    // converges; 2000 steps reach offsets of any size a model's logits need.
    for _ in 0..2000 {
        let mut gradient = vec![0.0f64; k];
        for i in 0..n {
            let row: Vec<f64> = (0..k).map(|j| scores[(i, j)] as f64 + offset[j]).collect();
            let top = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = row.iter().map(|v| (v - top).exp()).sum();
            for j in 0..k {
                gradient[j] += (row[j] - top).exp() / total - f64::from(labels[i] as usize == j);
            }
        }
        for (o, g) in offset.iter_mut().zip(&gradient) {
            *o -= g / n.max(1) as f64;
        }
    }
    let shifted = Mat::from_fn(n, k, |i, j| scores[(i, j)] + offset[j] as f32);
    accuracy(&argmax_rows(&shifted), labels)
}

/// Held-out accuracy of a ridge classifier trained on the first half of (`x`, `labels`) and scored on the second:
/// how an attacker picks a layer using only its own public data.
pub fn probe_cv_accuracy(x: &Mat, labels: &[u32], k: usize) -> f64 {
    let half = x.nrows() / 2;
    let fit = Ridge::fit(&x.rows(0, half).into_owned(), &one_hot(&labels[..half], k), 0.1);
    let predicted = argmax_rows(&fit.predict(&x.rows(half, x.nrows() - half).into_owned()));
    accuracy(&predicted, &labels[half..])
}

/// Linear ridge regression with an intercept in its dual form, from the Gram matrix of centred training rows
/// (`[n, n]`, so any number of features fits): the eigen-decomposition once, then each penalty (relative to the
/// Gram matrix's mean eigenvalue) costs one product.
pub struct DualRidge {
    eig: nalgebra::SymmetricEigen<f64, nalgebra::Dyn>,
    /// `Uᵀ·(y − mean)`.
    uty: DMatrix<f64>,
    mean: Vec<f64>,
}

impl DualRidge {
    pub fn fit(gram: DMatrix<f64>, y: &DMatrix<f64>) -> Self {
        let mean: Vec<f64> = (0..y.ncols()).map(|j| y.column(j).mean()).collect();
        let mut yc = y.clone();
        for (j, m) in mean.iter().enumerate() {
            yc.column_mut(j).add_scalar_mut(-m);
        }
        let eig = gram.symmetric_eigen();
        let uty = eig.eigenvectors.transpose() * yc;
        Self { eig, uty, mean }
    }

    /// Predictions for rows whose products with the (centred) training rows are `cross` (`[m, n]`).
    pub fn predict(&self, cross: &DMatrix<f64>, penalty: f64) -> DMatrix<f64> {
        let lambda = penalty * self.eig.eigenvalues.mean().max(1e-12);
        let mut a = self.uty.clone();
        for (i, mut row) in a.row_iter_mut().enumerate() {
            row /= self.eig.eigenvalues[i].max(0.0) + lambda;
        }
        let mut pred = cross * (&self.eig.eigenvectors * a);
        for (j, m) in self.mean.iter().enumerate() {
            pred.column_mut(j).add_scalar_mut(*m);
        }
        pred
    }
}

/// Out-of-fold predictions of each of `ys` from `x` by [`DualRidge`]: fitted on the even rows, predicting the odd,
/// and the other way round. Each target's penalty is the one of `penalties` whose predictions fit it best, so no
/// label is used. This is what a server learns from the model it can fit on what it stores, scored on samples that
/// model did not see: its generalization, which label noise on the targets does not remove. The Gram matrix and
/// its decompositions are shared by all targets.
pub fn cross_fitted_ridge(x: &Mat, ys: &[&Mat], penalties: &[f64]) -> Vec<Mat> {
    let n = x.nrows();
    let xc = subtract_row(x, &column_means(x));
    let gram = (&xc * xc.transpose()).cast::<f64>();
    let widths: Vec<usize> = ys.iter().map(|y| y.ncols()).collect();
    let y = DMatrix::from_fn(n, widths.iter().sum(), |i, j| {
        let (mut group, mut col) = (0, j);
        while col >= widths[group] {
            col -= widths[group];
            group += 1;
        }
        f64::from(ys[group][(i, col)])
    });
    let folds: [Vec<usize>; 2] = [(0..n).step_by(2).collect(), (1..n).step_by(2).collect()];
    let fitted: Vec<DualRidge> = folds
        .iter()
        .map(|fit| DualRidge::fit(gram.select_rows(fit).select_columns(fit), &y.select_rows(fit)))
        .collect();
    let predictions: Vec<DMatrix<f64>> = penalties
        .iter()
        .map(|&penalty| {
            let mut out = DMatrix::zeros(n, y.ncols());
            for (f, ridge) in fitted.iter().enumerate() {
                let (fit, held) = (&folds[f], &folds[1 - f]);
                let pred = ridge.predict(&gram.select_rows(held).select_columns(fit), penalty);
                for (r, &i) in held.iter().enumerate() {
                    out.set_row(i, &pred.row(r));
                }
            }
            out
        })
        .collect();
    let mut start = 0;
    widths
        .iter()
        .map(|&w| {
            let part = |p: &DMatrix<f64>| p.columns(start, w).into_owned();
            let truth = part(&y);
            let best = predictions
                .iter()
                .map(part)
                .min_by(|a, b| (a - &truth).norm_squared().total_cmp(&(b - &truth).norm_squared()))
                .unwrap_or_else(|| DMatrix::zeros(n, w));
            start += w;
            best.cast::<f32>()
        })
        .collect()
}

/// The scores `[n, k]` of the `k` most non-Gaussian independent components of `x` (see [`IcaAlignment`]).
pub fn independent_scores(x: &Mat, k: usize, seed: u64) -> Mat {
    independent_components(x, k, seed).apply(x)
}

/// The rows of `x` about their column means (in f64), and the eigen-decomposition of their covariance.
fn centred_eigen(x: &Mat) -> (DMatrix<f64>, nalgebra::SymmetricEigen<f64, nalgebra::Dyn>) {
    let xc = subtract_row(x, &column_means(x)).cast::<f64>();
    let eig = (xc.transpose() * &xc / x.nrows().max(1) as f64).symmetric_eigen();
    (xc, eig)
}

/// The `k` principal axes (`[d, k]`, by decreasing variance) of the rows of `x`.
fn principal_axes(x: &Mat, k: usize) -> Mat {
    let (_, eig) = centred_eigen(x);
    let mut order: Vec<usize> = (0..eig.eigenvalues.len()).collect();
    order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
    let cols: Vec<_> = order.iter().take(k).map(|&i| eig.eigenvectors.column(i).into_owned()).collect();
    DMatrix::from_columns(&cols).cast::<f32>()
}

/// The sign an axis is read with, from the data alone: the sign of the mean projection where the mean is clearly
/// away from zero, else the sign of the third moment (skew). Both survive a rotation of the data.
fn orientation(projection: &[f32], use_mean: bool) -> f32 {
    let n = projection.len().max(1) as f32;
    let mean = projection.iter().sum::<f32>() / n;
    if use_mean {
        return mean.signum();
    }
    projection.iter().map(|p| (p - mean).powi(3)).sum::<f32>().signum()
}

/// Unsupervised alignment of the server's coordinates of one layer (`R·a`, R unknown) with the public backbone's
/// (`a`): both point clouds have the same covariance up to R, so their principal axes correspond by rank, with
/// signs fixed by the mean or the skew. Needs only public look-alike data — no known plaintext.
pub struct Alignment {
    /// `[d, k]`: axes in the public coordinates.
    pub public_axes: Mat,
    /// `[d, k]`: the corresponding axes in the server's coordinates, oriented like the public ones.
    pub stored_axes: Mat,
}

impl Alignment {
    pub fn fit(public: &Mat, stored: &Mat, k: usize) -> Self {
        let public_axes = principal_axes(public, k);
        let mut stored_axes = principal_axes(stored, k);
        let (pp, sp) = (public * &public_axes, stored * &stored_axes);
        for j in 0..k.min(public_axes.ncols()) {
            let p: Vec<f32> = pp.column(j).iter().copied().collect();
            let s: Vec<f32> = sp.column(j).iter().copied().collect();
            let std = (p.iter().map(|v| v * v).sum::<f32>() / p.len().max(1) as f32).sqrt();
            let use_mean = (p.iter().sum::<f32>() / p.len().max(1) as f32).abs() > 0.25 * std;
            if orientation(&p, use_mean) != orientation(&s, use_mean) {
                stored_axes.column_mut(j).neg_mut();
            }
        }
        Self { public_axes, stored_axes }
    }

    /// `[n, k]` coordinates of public-coordinate rows.
    pub fn public_features(&self, x: &Mat) -> Mat {
        x * &self.public_axes
    }

    /// `[n, k]` coordinates of server-coordinate rows, meant to equal `public_features` of their plain versions.
    pub fn stored_features(&self, x: &Mat) -> Mat {
        x * &self.stored_axes
    }
}

/// Alignment by higher moments, for clouds that are whitened: each cloud is centred and whitened by its own
/// covariance (which undoes any linear whitening the device applied, up to a rotation), then FastICA finds its `k`
/// most non-Gaussian directions (largest |excess kurtosis|); directions are paired across the clouds by kurtosis
/// rank and oriented by skew. Independent non-Gaussian components are what second moments cannot see and a
/// rotation cannot hide.
pub struct IcaAlignment {
    public: Standardized,
    stored: Standardized,
}

/// `x ↦ (x − mean)·map`: unit-variance scores of the components, in the attacker's pairing order.
struct Standardized {
    mean: Vec<f32>,
    /// `[d, k]`
    map: Mat,
}

impl Standardized {
    fn apply(&self, x: &Mat) -> Mat {
        subtract_row(x, &self.mean) * &self.map
    }
}

impl IcaAlignment {
    pub fn fit(public: &Mat, stored: &Mat, k: usize, seed: u64) -> Self {
        let (public, stored) = (independent_components(public, k, seed), independent_components(stored, k, seed));
        Self { public, stored }
    }

    pub fn public_features(&self, x: &Mat) -> Mat {
        self.public.apply(x)
    }

    pub fn stored_features(&self, x: &Mat) -> Mat {
        self.stored.apply(x)
    }
}

/// Iterations of FastICA per component (it usually converges in tens).
const ICA_ITERATIONS: usize = 200;

/// The `k` most non-Gaussian components of `x` by deflationary FastICA (kurtosis contrast), sorted by
/// |excess kurtosis| and oriented to positive skew.
fn independent_components(x: &Mat, k: usize, seed: u64) -> Standardized {
    let (n, d) = x.shape();
    let (xc, eig) = centred_eigen(x);
    let floor = eig.eigenvalues.max() * 1e-9 + 1e-12;
    let whiten = DMatrix::<f64>::from_fn(d, d, |i, j| eig.eigenvectors[(i, j)] / eig.eigenvalues[j].max(floor).sqrt());
    let z = &xc * &whiten; // [n, d], identity covariance
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut found: Vec<nalgebra::DVector<f64>> = Vec::new();
    for _ in 0..k.min(d) {
        let mut w = nalgebra::DVector::<f64>::from_fn(d, |_, _| rng.random_range(-1.0..1.0));
        for _ in 0..ICA_ITERATIONS {
            let u = &z * &w;
            // w ← E[z·u³] − 3w, then deflate and normalise.
            let u3 = u.map(|v| v * v * v);
            let mut next = z.transpose() * u3 / n as f64 - &w * 3.0;
            for f in &found {
                next -= f * f.dot(&next);
            }
            let norm = next.norm().max(1e-12);
            next /= norm;
            let converged = (next.dot(&w).abs() - 1.0).abs() < 1e-6;
            w = next;
            if converged {
                break;
            }
        }
        found.push(w);
    }
    let moments = |w: &nalgebra::DVector<f64>| {
        let u = &z * w;
        let m = |p: i32| u.iter().map(|v| v.powi(p)).sum::<f64>() / n as f64;
        (m(4) - 3.0, m(3))
    };
    let mut scored: Vec<(f64, nalgebra::DVector<f64>)> = found
        .into_iter()
        .map(|w| {
            let (kurtosis, skew) = moments(&w);
            (kurtosis.abs(), if skew < 0.0 { -w } else { w })
        })
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    let cols: Vec<_> = scored.iter().map(|(_, w)| &whiten * w).collect();
    Standardized { mean: column_means(x), map: DMatrix::from_columns(&cols).cast::<f32>() }
}

/// For each query row `i`, the member of `pools[i]` (rows of `candidates`) nearest in Euclidean distance.
pub fn nearest_in_pool(queries: &Mat, candidates: &Mat, pools: &[Vec<usize>]) -> Vec<usize> {
    pools
        .iter()
        .enumerate()
        .map(|(i, pool)| {
            let q = queries.row(i);
            *pool
                .iter()
                .min_by(|&&a, &&b| {
                    (candidates.row(a) - q).norm_squared().total_cmp(&(candidates.row(b) - q).norm_squared())
                })
                .unwrap_or(&usize::MAX)
        })
        .collect()
}

/// The `m` indices with the largest scores among those `allowed`.
pub fn top_m(scores: &[f32], m: usize, allowed: impl Fn(usize) -> bool) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).filter(|&i| allowed(i)).collect();
    let m = m.min(idx.len());
    if m == 0 {
        return Vec::new();
    }
    idx.select_nth_unstable_by(m - 1, |&a, &b| scores[b].total_cmp(&scores[a]));
    idx.truncate(m);
    idx
}

/// Stacks per-layer feature blocks side by side.
pub fn hstack(blocks: &[Mat]) -> Mat {
    let n = blocks.first().map_or(0, Mat::nrows);
    let w: usize = blocks.iter().map(Mat::ncols).sum();
    let mut out = Mat::zeros(n, w);
    let mut c = 0;
    for b in blocks {
        out.columns_mut(c, b.ncols()).copy_from(b);
        c += b.ncols();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Haar-random orthogonal `n × n` matrix (for the tests and the synthetic checks).
    fn random_rotation(n: usize, rng: &mut impl Rng) -> Mat {
        let g = DMatrix::<f64>::from_fn(n, n, |_, _| gaussian(rng));
        let qr = g.qr();
        let (mut q, r) = (qr.q(), qr.r());
        for j in 0..n {
            if r[(j, j)] < 0.0 {
                q.column_mut(j).neg_mut();
            }
        }
        q.cast::<f32>()
    }

    /// A standard normal draw (Box–Muller).
    fn gaussian(rng: &mut impl Rng) -> f64 {
        let u: f64 = rng.random::<f64>().max(1e-300);
        let v: f64 = rng.random();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    /// `n` rows of `d` skewed (exponential) coordinates with decaying scales: an anisotropic cloud like hidden
    /// states, whose principal axes and orientations are well defined.
    fn cloud(n: usize, d: usize, rng: &mut ChaCha8Rng) -> Mat {
        Mat::from_fn(n, d, |_, j| {
            let e = -(rng.random::<f32>().max(1e-9)).ln() - 1.0;
            e * 10.0 / (1.0 + j as f32) + 0.3
        })
    }

    #[test]
    fn kmeans_recovers_planted_clusters_and_not_random_labels() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let labels: Vec<u32> = (0..200).map(|i| (i % 2) as u32).collect();
        let x =
            Mat::from_fn(200, 16, |i, j| gaussian(&mut rng) as f32 + if j == 3 { 6.0 * labels[i] as f32 } else { 0.0 });
        assert_eq!(clustering_accuracy(&kmeans(&x, 2, 7), &labels, 2, 2), 1.0);
        let noise = Mat::from_fn(200, 16, |_, _| gaussian(&mut rng) as f32);
        let acc = clustering_accuracy(&kmeans(&noise, 2, 7), &labels, 2, 2);
        assert!(acc < 0.62, "clusters of noise follow arbitrary labels: {acc}");
    }

    #[test]
    fn ridge_probe_learns_a_linear_rule() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let x = Mat::from_fn(400, 10, |_, _| gaussian(&mut rng) as f32);
        let labels: Vec<u32> = (0..400).map(|i| u32::from(x[(i, 0)] - x[(i, 4)] > 0.0)).collect();
        assert!(probe_cv_accuracy(&x, &labels, 2) > 0.95);
        // The same probe on rotated inputs is guessing.
        let r = random_rotation(10, &mut rng);
        let fit = Ridge::fit(&x, &one_hot(&labels, 2), 0.1);
        let acc = accuracy(&argmax_rows(&fit.predict(&(&x * &r))), &labels);
        assert!(acc < 0.75, "a probe survived a random rotation: {acc}");
    }

    #[test]
    fn spectral_alignment_undoes_a_secret_rotation_of_an_anisotropic_cloud() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (public, private) = (cloud(4000, 12, &mut rng), cloud(4000, 12, &mut rng));
        let r = random_rotation(12, &mut rng);
        let stored = &private * r.transpose(); // each row a ↦ R·a
        let al = Alignment::fit(&public, &stored, 6);
        let (want, got) = (al.public_features(&private), al.stored_features(&stored));
        for j in 0..6 {
            let (a, b) = (want.column(j), got.column(j));
            let corr = a.dot(&b) / (a.norm() * b.norm());
            assert!(corr > 0.95, "axis {j}: correlation {corr}");
        }
        // Isotropic data (all variances equal) has no axes to align: the same attack learns nothing.
        let iso = Mat::from_fn(4000, 12, |_, _| gaussian(&mut rng) as f32);
        let al = Alignment::fit(&Mat::from_fn(4000, 12, |_, _| gaussian(&mut rng) as f32), &(&iso * r.transpose()), 6);
        let (want, got) = (al.public_features(&iso), al.stored_features(&(&iso * r.transpose())));
        let mean_corr: f32 = (0..6)
            .map(|j| (want.column(j).dot(&got.column(j)) / (want.column(j).norm() * got.column(j).norm())).abs())
            .sum::<f32>()
            / 6.0;
        assert!(mean_corr < 0.7, "aligned an isotropic cloud: {mean_corr}");
    }

    #[test]
    fn ica_alignment_undoes_a_secret_whitening_and_rotation_of_non_gaussian_sources() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        // Independent sources with distinct excess kurtosis (product of normals 6, Laplace 3, two-point with noise
        // about −1.7, uniform −1.2) and four Gaussian ones, mixed by one fixed public matrix: the backbone's view.
        let d = 8;
        let sources = |rng: &mut ChaCha8Rng, n: usize| {
            Mat::from_fn(n, d, |_, j| {
                let u: f64 = rng.random_range(-1.0..1.0);
                (match j {
                    0 => gaussian(rng) * gaussian(rng),
                    1 => -u.abs().ln() * u.signum(),
                    2 => u.signum() + 0.3 * gaussian(rng),
                    3 => u,
                    _ => gaussian(rng),
                }) as f32
            })
        };
        let mix =
            random_rotation(d, &mut rng) * Mat::from_diagonal(&nalgebra::DVector::from_fn(d, |i, _| 1.0 + i as f32));
        let (public, private) =
            (sources(&mut rng, 20000) * mix.transpose(), sources(&mut rng, 20000) * mix.transpose());
        // The device whitens with its own statistics and rotates: second moments now say nothing.
        let (centred, eig) = centred_eigen(&private);
        let w = &eig.eigenvectors
            * DMatrix::from_diagonal(&eig.eigenvalues.map(|v| 1.0 / v.sqrt()))
            * eig.eigenvectors.transpose();
        let stored = (centred * w).cast::<f32>() * random_rotation(d, &mut rng).transpose();
        let second = Alignment::fit(&public, &stored, 4);
        let ica = IcaAlignment::fit(&public, &stored, 4, 1);
        let corr = |a: &Mat, b: &Mat, j: usize| {
            let (a, b) = (a.column(j), b.column(j));
            let (a, b) = (a.add_scalar(-a.mean()), b.add_scalar(-b.mean()));
            a.dot(&b) / (a.norm() * b.norm())
        };
        let (want, got) = (ica.public_features(&private), ica.stored_features(&stored));
        for j in 0..4 {
            // Symmetric sources have no skew to orient them by: the sign is the attacker's to guess.
            let c = corr(&want, &got, j).abs();
            assert!(c > 0.9, "ICA component {j}: correlation {c}");
        }
        let (want, got) = (second.public_features(&private), second.stored_features(&stored));
        let mean_corr = (0..4).map(|j| corr(&want, &got, j).abs()).sum::<f32>() / 4.0;
        assert!(mean_corr < 0.7, "second moments aligned a secretly whitened cloud: {mean_corr}");
        // Gaussian sources have no higher moments to align by: the same attack learns nothing.
        let gauss = |rng: &mut ChaCha8Rng| Mat::from_fn(20000, d, |_, _| gaussian(rng) as f32);
        let (public, private) = (gauss(&mut rng), gauss(&mut rng));
        let stored = &private * random_rotation(d, &mut rng).transpose();
        let ica = IcaAlignment::fit(&public, &stored, 4, 1);
        let (want, got) = (ica.public_features(&private), ica.stored_features(&stored));
        let mean_corr = (0..4).map(|j| corr(&want, &got, j).abs()).sum::<f32>() / 4.0;
        assert!(mean_corr < 0.7, "ICA aligned Gaussian clouds: {mean_corr}");
    }

    #[test]
    fn cross_fitted_ridge_generalizes_through_label_noise_and_not_from_noise() {
        // Labels from a linear rule; the targets carry them with a fifth flipped, like randomized response. The
        // out-of-fold model recovers the true labels better than the noisy targets show them; on features
        // unrelated to the labels it cannot.
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let (n, d) = (1000, 5);
        let x = Mat::from_fn(n, d, |_, _| gaussian(&mut rng) as f32);
        let y: Vec<u32> = (0..n).map(|i| u32::from(x[(i, 0)] + 0.5 * x[(i, 1)] > 0.0)).collect();
        let noisy: Vec<u32> = y.iter().map(|&l| if rng.random_bool(0.2) { 1 - l } else { l }).collect();
        let targets = one_hot(&noisy, 2);
        let predicted = argmax_rows(&cross_fitted_ridge(&x, &[&targets], &[0.01, 0.1, 1.0, 10.0])[0]);
        let (model, plain) = (accuracy(&predicted, &y), accuracy(&noisy, &y));
        assert!(model > 0.9 && model > plain + 0.05, "cross-fitted {model}, noisy targets {plain}");
        let unrelated = Mat::from_fn(n, d, |_, _| gaussian(&mut rng) as f32);
        let guessed =
            accuracy(&argmax_rows(&cross_fitted_ridge(&unrelated, &[&targets], &[0.01, 0.1, 1.0, 10.0])[0]), &y);
        assert!(guessed < 0.6, "cross-fitted on unrelated features {guessed}");
    }

    #[test]
    fn agreement_naming_follows_a_weak_biased_guess() {
        // Two perfect clusters; the guesses say "1" for 60% of cluster 0 and 90% of cluster 1, so a per-cluster
        // majority names both clusters 1, while the one-to-one naming with the most agreement gets them right.
        let clusters: Vec<usize> = (0..1000).map(|i| i % 2).collect();
        let votes: Vec<u32> =
            (0..1000).map(|i| u32::from(if i % 2 == 0 { i % 20 < 11 } else { i % 20 != 1 })).collect();
        assert_eq!(majority_mapping(&clusters, &votes, 2, 2), vec![1, 1]);
        assert_eq!(agreement_naming(&clusters, &votes, 2), vec![0, 1]);
    }

    #[test]
    fn calibration_undoes_a_constant_label_bias_and_nothing_more() {
        // Three labels; the informative score for the true label is buried under a bias of 6 towards label 0, so
        // the raw argmax says 0 for nearly everything. One offset per label recovers the scores' information; on
        // scores that carry none it cannot beat always answering the majority label.
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let labels: Vec<u32> = (0..900).map(|i| [0, 1, 1, 2, 2, 2][i % 6]).collect();
        let informative = Mat::from_fn(900, 3, |i, j| {
            f32::from(labels[i] as usize == j) * 2.0 + gaussian(&mut rng) as f32 * 0.5 + if j == 0 { 6.0 } else { 0.0 }
        });
        let raw = accuracy(&argmax_rows(&informative), &labels);
        let calibrated = calibrated_accuracy(&informative, &labels);
        assert!(raw < 0.2, "raw accuracy {raw}");
        assert!(calibrated > 0.9, "calibrated accuracy {calibrated}");
        let noise = Mat::from_fn(900, 3, |_, j| gaussian(&mut rng) as f32 + if j == 0 { 6.0 } else { 0.0 });
        let majority = 0.5;
        let calibrated = calibrated_accuracy(&noise, &labels);
        assert!(calibrated <= majority + 0.02, "calibrated accuracy of noise {calibrated}");
    }

    #[test]
    fn nearest_in_pool_and_top_m() {
        let c = Mat::from_row_slice(3, 2, &[0.0, 0.0, 1.0, 0.0, 0.0, 5.0]);
        let q = Mat::from_row_slice(2, 2, &[0.9, 0.1, 0.1, 4.0]);
        assert_eq!(nearest_in_pool(&q, &c, &[vec![0, 1, 2], vec![0, 1]]), vec![1, 0]);
        assert_eq!(
            {
                let mut t = top_m(&[0.1, 0.9, 0.5, 0.7], 2, |i| i != 1);
                t.sort();
                t
            },
            vec![2, 3]
        );
    }
}
