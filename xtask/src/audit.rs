//! `cargo xtask audit`: what the assist server can learn (design §5), measured. Runs a real fine-tune twice —
//! secrets on (the default) and off (R = Q = I) — through the real server and device binaries, keeps the server's
//! data dir, and then plays the server: from what it stored (activations, targets, ids, adapter checkpoint, log)
//! plus the public backbone and public look-alike data (the held-out split), it attacks labels, texts and the
//! model. The auditor knows which stored sample is which text because it holds the device's secrets (saved with
//! the adapter); the attacks never use them.

mod attacks;

use std::collections::HashSet;
use std::path::Path;

use anyhow::{anyhow, Result};
use candle_core::{DType, Device, Tensor};
use mobillm_core::side::{normalize_taps, weights_file, DeviceAdapter, SampleId, Secrets, SideConfig, SideNet};
use mobillm_core::wire::{Frame, Limits, Quant};
use mobillm_core::{Backbone, Task};
use mobillm_server::store::Store;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use crate::{bench, bindings, demo, side_eval, zeroshot, DataArgs};
use attacks::{
    accuracy, agreement_naming, argmax_rows, clustering_accuracy, column_means, kmeans, nearest_in_pool, one_hot,
    probe_cv_accuracy, subtract_row, top_m, unit_rows, Alignment, Mat, Ridge,
};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub data: DataArgs,
    /// Training examples of the victim's fine-tune (default: all; UCI has 2400). The held-out split is the
    /// attacker's public look-alike data.
    #[arg(long)]
    pub train: Option<usize>,
    /// Server epochs per round (default 10, 3 rounds).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Stored samples attacked by re-identification and token recovery.
    #[arg(long, default_value_t = 300)]
    pub attacked: usize,
    /// Candidate texts per re-identification, the true one among them.
    #[arg(long, default_value_t = 100)]
    pub pool: usize,
    /// Do not write docs/privacy-audit.json and the generated section of docs/privacy.md.
    #[arg(long)]
    pub no_docs: bool,
}

/// Principal axes per layer that the alignment attack matches.
const ALIGN_AXES: usize = 16;
/// Tokens this frequent in the public texts (by document frequency) are the attacker's free guesses (the, a, .);
/// token recovery counts only the others.
const FREQUENT_TOKENS: usize = 200;
/// The proposed whitening's ε, relative to the mean eigenvalue. Measured: a hundredth re-identified as many samples
/// (13.0% against 13.3%) and cost 3 points of accuracy (the side network overfits amplified noise directions).
const WHITENING_EPS: f64 = 0.1;

/// The whitening variants simulated on the secrets-on session's samples: (report key, centred).
const WHITENING: [(&str, bool); 2] = [("whitened_simulated", false), ("centred_whitened_simulated", true)];

/// Anchor counts of the known-plaintext re-identification.
const KNOWN_PLAINTEXT: [usize; 3] = [1, 4, 16];

/// Activations as rows: `n` samples of `t` layers of `d` values, sample after sample.
struct Acts {
    flat: Vec<f32>,
    n: usize,
    t: usize,
    d: usize,
}

impl Acts {
    fn from_tensor(x: &Tensor) -> Result<Self> {
        let (n, t, d) = x.dims3()?;
        Ok(Self { flat: x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?, n, t, d })
    }

    /// `[rows, d]`: layer `l` of the given samples.
    fn layer(&self, rows: &[usize], l: usize) -> Mat {
        Mat::from_fn(rows.len(), self.d, |i, j| self.flat[(rows[i] * self.t + l) * self.d + j])
    }

    /// `[rows, t·d]`: all layers side by side.
    fn all_layers(&self, rows: &[usize]) -> Mat {
        let w = self.t * self.d;
        Mat::from_fn(rows.len(), w, |i, j| self.flat[rows[i] * w + j])
    }

    /// `[rows, t(t−1)/2]`: each sample's cross-layer inner products (divided by d): what survives one rotation
    /// shared by all layers.
    fn cross_layer_products(&self, rows: &[usize]) -> Mat {
        let (t, d) = (self.t, self.d);
        let mut out = Mat::zeros(rows.len(), t * (t - 1) / 2);
        for (i, &r) in rows.iter().enumerate() {
            let x = Mat::from_row_slice(t, d, &self.flat[r * t * d..(r + 1) * t * d]);
            let g = &x * x.transpose();
            let mut c = 0;
            for a in 0..t {
                for b in a + 1..t {
                    out[(i, c)] = g[(a, b)] / d as f32;
                    c += 1;
                }
            }
        }
        out
    }

    /// `[rows, t]`: each layer's norm.
    fn norms(&self, rows: &[usize]) -> Mat {
        Mat::from_fn(rows.len(), self.t, |i, l| {
            let s = (rows[i] * self.t + l) * self.d;
            self.flat[s..s + self.d].iter().map(|v| v * v).sum::<f32>().sqrt()
        })
    }

    fn rows(&self) -> Vec<usize> {
        (0..self.n).collect()
    }
}

/// What the server holds once the session is over, read the way the server reads it.
struct ServerView {
    side: SideConfig,
    acts: Acts,
    /// `[n, K']`: each sample's current target.
    targets: Mat,
    weights: Option<Vec<u8>>,
    /// Every printable run of ≥ 16 bytes in the server's files (store and log): where a plaintext would show.
    strings: String,
}

fn read_server_view(work: &Path) -> Result<ServerView> {
    let store = Store::open(&work.join("data"), 64 << 20).map_err(|e| anyhow!("opening the server's store: {e}"))?;
    let sessions = store.sessions(None, 2).map_err(|e| anyhow!("{e}"))?;
    let [rec] = sessions.as_slice() else {
        anyhow::bail!("expected the one kept session in the server's store, found {}", sessions.len());
    };
    let set = store.training_set(rec).map_err(|e| anyhow!("{e}"))?;
    let weights = store.weights(&rec.id).map_err(|e| anyhow!("{e}"))?;
    drop(store);
    let (n, k) = (set.ids.len(), rec.shape.outputs);
    let (t, d) = (rec.shape.layers, rec.shape.dim);
    let flat: Vec<f32> = set.x.iter().map(|v| v.to_f32()).collect();
    let targets = set.targets;
    let mut strings = String::new();
    for path in [work.join("server.log")].into_iter().chain(bindings::walk(&work.join("data"))?) {
        printable_runs(&std::fs::read(&path)?, 16, &mut strings);
    }
    Ok(ServerView {
        side: rec.side.clone(),
        acts: Acts { flat, n, t, d },
        targets: Mat::from_row_slice(n, k, &targets),
        weights,
        strings,
    })
}

fn printable_runs(bytes: &[u8], min: usize, out: &mut String) {
    for run in bytes.split(|b| !(b.is_ascii_graphic() || *b == b' ')) {
        if run.len() >= min {
            out.push_str(&String::from_utf8_lossy(run));
            out.push('\n');
        }
    }
}

/// The design change the audit proposes against the alignment attack (docs/privacy.md), for simulation: per-layer
/// whitening `x ↦ W_l·(x − μ_l)`, rescaled to unit RMS, with `W_l = (C_l + εI)^{-1/2}` from a calibration text set's
/// unit-RMS activations: `C_l` their covariance about their mean `μ_l` when centring, else their second moment
/// (`μ_l = 0`), and ε `relative_eps` times its mean eigenvalue. Uncentred, the mean stays one shared direction
/// that the alignment can read every sample along.
pub struct Whitening {
    /// `[1, T, d]`.
    mean: Tensor,
    /// `[T, d, d]`.
    w: Tensor,
}

impl Whitening {
    pub fn fit(x: &Tensor, relative_eps: f64, centre: bool) -> Result<Self> {
        let (n, t, d) = x.dims3()?;
        let x = x.to_dtype(DType::F32)?;
        let mean = if centre { x.mean_keepdim(0)? } else { Tensor::zeros((1, t, d), DType::F32, &Device::Cpu)? };
        let xc = x.broadcast_sub(&mean)?.transpose(0, 1)?.contiguous()?; // [T, N, d]
        let m = (xc.transpose(1, 2)?.matmul(&xc)? / n as f64)?; // [T, d, d]
        let mut out = Vec::with_capacity(t * d * d);
        for l in 0..t {
            let ml = nalgebra::DMatrix::<f64>::from_row_iterator(
                d,
                d,
                m.get(l)?.flatten_all()?.to_vec1::<f32>()?.into_iter().map(f64::from),
            );
            let eig = ml.symmetric_eigen();
            let eps = relative_eps * eig.eigenvalues.mean();
            let scale = eig.eigenvalues.map(|v| 1.0 / (v.max(0.0) + eps).sqrt());
            let w = &eig.eigenvectors * nalgebra::DMatrix::from_diagonal(&scale) * eig.eigenvectors.transpose();
            out.extend(w.transpose().iter().map(|v| *v as f32)); // row-major
        }
        Ok(Self { mean, w: Tensor::from_vec(out, (t, d, d), &Device::Cpu)? })
    }

    /// Unit-RMS activations `[N, T, d]` → whitened, unit-RMS activations `[N, T, d]`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let xc = x.to_dtype(DType::F32)?.broadcast_sub(&self.mean)?.transpose(0, 1)?.contiguous()?;
        let y = xc.matmul(&self.w.transpose(1, 2)?)?;
        Ok(normalize_taps(&y.transpose(0, 1)?.contiguous()?)?)
    }
}

/// What the server would hold if the device whitened before rotating (`R_l·W_l·(â_l − μ_l)`, rescaled), for the victim's samples in
/// the order of `truth`, with the targets of the real session. Fresh rotations: any Haar draw is as good as the
/// device's. Also returns the attacker's knowledge of every text in whitened coordinates (W is public).
fn simulate_whitening(
    view: &ServerView,
    truth: &[usize],
    everyone: &Acts,
    n_train: usize,
    centre: bool,
) -> Result<(ServerView, Acts)> {
    let (t, d) = (everyone.t, everyone.d);
    let all = Tensor::from_slice(&everyone.flat, (everyone.n, t, d), &Device::Cpu)?;
    let whitening = Whitening::fit(&all.narrow(0, n_train, everyone.n - n_train)?, WHITENING_EPS, centre)?;
    let whitened = Acts::from_tensor(&whitening.apply(&all)?)?;
    let secrets = Secrets::from_seed(&SideConfig::new(t, d, 2), [42; 32])?;
    let rows: Vec<f32> =
        truth.iter().flat_map(|&i| whitened.flat[i * t * d..(i + 1) * t * d].iter().copied()).collect();
    let stored =
        as_stored(&secrets.rotate_activations(&Tensor::from_vec(rows, (truth.len(), t, d), &Device::Cpu)?)?)?;
    let view = ServerView {
        side: view.side.clone(),
        acts: Acts::from_tensor(&stored)?,
        targets: view.targets.clone(),
        weights: None,
        strings: String::new(),
    };
    Ok((view, whitened))
}

/// Activations `[N, T, d]` as the server would store them: through the real wire codec at the device's default
/// int8 and back, then f16. (Exact f32 values would let the last bits of each norm identify a sample.)
fn as_stored(x: &Tensor) -> Result<Tensor> {
    let (n, t, d) = x.dims3()?;
    let flat = x.flatten_all()?.to_vec1::<f32>()?;
    let mut out = Vec::with_capacity(flat.len());
    for chunk in flat.chunks(256 * t * d) {
        let m = chunk.len() / (t * d);
        let ids = (0..m).map(|_| SampleId::random()).collect::<mobillm_core::Result<Vec<_>>>()?;
        let frame = Frame::samples(ids, t, d, chunk.to_vec(), 1, vec![0.0; m]);
        let (decoded, _) = Frame::decode(&frame.encode(Quant::Int8)?, &Limits::default())?;
        out.extend(decoded.activations);
    }
    Ok(Tensor::from_vec(out, (n, t, d), &Device::Cpu)?.to_dtype(DType::F16)?.to_dtype(DType::F32)?)
}

/// The auditor's key: which victim example (row of `everyone`, the first `n_train` rows) each stored sample is.
/// With secrets, the auditor rotates its own plain activations with the device's secrets and matches the last
/// layer; a stored sample that matches nothing well stops the audit (its ground truth would be wrong).
fn ground_truth(view: &ServerView, everyone: &Acts, n_train: usize, secrets: &Secrets) -> Result<Vec<usize>> {
    let (t, d) = (everyone.t, everyone.d);
    let last = t - 1;
    let mut rotated = Vec::with_capacity(n_train * d);
    for start in (0..n_train).step_by(128) {
        let len = (n_train - start).min(128);
        let chunk =
            Tensor::from_slice(&everyone.flat[start * t * d..(start + len) * t * d], (len, t, d), &Device::Cpu)?;
        rotated.extend(secrets.rotate_activations(&chunk)?.narrow(1, last, 1)?.flatten_all()?.to_vec1::<f32>()?);
    }
    let candidates = Mat::from_row_slice(n_train, d, &rotated);
    let sims = view.acts.layer(&view.acts.rows(), last) * candidates.transpose() / d as f32;
    (0..view.acts.n)
        .map(|i| {
            let (j, sim) =
                (0..n_train).map(|j| (j, sims[(i, j)])).max_by(|a, b| a.1.total_cmp(&b.1)).unwrap_or((0, 0.0));
            anyhow::ensure!(sim > 0.95, "stored sample {i} matches no training example (best cosine {sim:.3})");
            Ok(j)
        })
        .collect()
}

/// The attacker's public knowledge and the auditor's truth about every text.
struct Knowledge {
    /// Plain unit-RMS pivots of the victim's training texts (rows `..n_train`) then the public texts.
    everyone: Acts,
    n_train: usize,
    texts: Vec<String>,
    labels: Vec<u32>,
    n_labels: usize,
    /// `[public, K]`: the backbone's label logits on the public texts.
    public_logits: Mat,
    /// The tokens each text adds to the prompt.
    tokens: Vec<HashSet<u32>>,
    frequent: HashSet<u32>,
    /// `[V, d]`: the public embedding matrix, rows of unit length.
    embedding: Mat,
    final_norm: Vec<f32>,
}

impl Knowledge {
    fn public_rows(&self) -> Vec<usize> {
        (self.n_train..self.everyone.n).collect()
    }

    fn public_labels(&self) -> &[u32] {
        &self.labels[self.n_train..]
    }
}

/// Stacks per-layer feature blocks side by side.
fn hstack(blocks: &[Mat]) -> Mat {
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

fn best(values: &[(&str, f64)]) -> f64 {
    values.iter().map(|(_, v)| *v).fold(0.0, f64::max)
}

fn named(values: &[(&str, f64)]) -> Value {
    Value::Object(values.iter().map(|(k, v)| (k.to_string(), json!(v))).collect())
}

/// Every attack on one session's stored data. Returns the four headline numbers and the details.
fn attack(view: &ServerView, truth: &[usize], k: &Knowledge, args: &Args) -> Result<Value> {
    let acts = &view.acts;
    let (n, t, kl) = (acts.n, acts.t, k.n_labels);
    let all = acts.rows();
    let y: Vec<u32> = truth.iter().map(|&i| k.labels[i]).collect();
    let public = k.public_rows();
    let public_y = k.public_labels();

    // The alignment of every layer, shared by the label, text and re-identification attacks.
    eprintln!("audit: aligning {t} layers from second moments");
    let alignments: Vec<Alignment> =
        (0..t).map(|l| Alignment::fit(&k.everyone.layer(&public, l), &acts.layer(&all, l), ALIGN_AXES)).collect();

    // 1. Labels.
    eprintln!("audit: label attacks");
    let target_clusters = kmeans(&view.targets, kl, 11);
    let probe_layer = (0..t)
        .map(|l| (l, probe_cv_accuracy(&k.everyone.layer(&public, l), public_y, kl)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(t - 1, |(l, _)| l);
    let probe = Ridge::fit(&k.everyone.layer(&public, probe_layer), &one_hot(public_y, kl), 0.1);
    let aligned_layer = (0..t)
        .map(|l| (l, probe_cv_accuracy(&alignments[l].public_features(&k.everyone.layer(&public, l)), public_y, kl)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(t - 1, |(l, _)| l);
    let al = &alignments[aligned_layer];
    let aligned_probe =
        Ridge::fit(&al.public_features(&k.everyone.layer(&public, aligned_layer)), &one_hot(public_y, kl), 0.1);
    let aligned_predictions =
        argmax_rows(&aligned_probe.predict(&al.stored_features(&acts.layer(&all, aligned_layer))));
    let readout = Ridge::fit(&k.everyone.layer(&public, t - 1), &k.public_logits, 1e-3);
    let readout_agreement =
        accuracy(&argmax_rows(&readout.predict(&k.everyone.layer(&public, t - 1))), &argmax_rows(&k.public_logits));
    let named_clusters = {
        let names = agreement_naming(&target_clusters, &aligned_predictions, kl);
        target_clusters.iter().map(|&c| names[c]).collect::<Vec<_>>()
    };
    let labels = [
        ("targets_clustered", clustering_accuracy(&target_clusters, &y, kl, kl)),
        ("activations_clustered", clustering_accuracy(&kmeans(&unit_rows(&acts.all_layers(&all)), kl, 12), &y, kl, kl)),
        ("last_layer_clustered", clustering_accuracy(&kmeans(&acts.layer(&all, t - 1), kl, 13), &y, kl, kl)),
        ("targets_read_plainly", accuracy(&argmax_rows(&view.targets.columns(0, kl).into_owned()), &y)),
        ("public_probe", accuracy(&argmax_rows(&probe.predict(&acts.layer(&all, probe_layer))), &y)),
        ("aligned_probe", accuracy(&aligned_predictions, &y)),
        ("backbone_zero_shot_readout", accuracy(&argmax_rows(&readout.predict(&acts.layer(&all, t - 1))), &y)),
    ];
    // The number of labels, as far as the targets show it: Q·[Δ; 0] spans only K − 1 of the K' dimensions (Δ sums
    // to zero), but the server's own outputs, added from round 2 on, spread further (AdamW steps per coordinate).
    let target_rank = {
        let sv = view.targets.clone().cast::<f64>().singular_values();
        let top = sv.max();
        sv.iter().filter(|&&v| v > 1e-3 * top).count()
    };
    let label_details = json!({
        "label_count_from_target_rank": target_rank + 1,
        "attacks": named(&labels),
        "target_clusters_named_by_aligned_probe": accuracy(&named_clusters, &y),
        "probe_layer": probe_layer,
        "aligned_probe_layer": aligned_layer,
        "zero_shot_readout_agreement_on_public": readout_agreement,
    });

    // 2a. Re-identification among `pool` candidates (victim and public texts alike).
    eprintln!("audit: re-identification");
    let attacked: Vec<usize> = (0..n.min(args.attacked)).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let pools: Vec<Vec<usize>> = attacked
        .iter()
        .map(|&s| {
            let truth_text = &k.texts[truth[s]];
            let mut pool = vec![truth[s]];
            while pool.len() < args.pool.min(k.everyone.n) {
                let c = rng.random_range(0..k.everyone.n);
                if !pool.contains(&c) && k.texts[c] != *truth_text {
                    pool.push(c);
                }
            }
            pool.shuffle(&mut rng);
            pool
        })
        .collect();
    let rate = |picks: Vec<usize>| -> f64 {
        picks.iter().zip(&attacked).filter(|(p, &s)| k.texts[**p] == k.texts[truth[s]]).count() as f64
            / attacked.len().max(1) as f64
    };
    let everyone = k.everyone.rows();
    let aligned_features = |x: &Acts, rows: &[usize], stored: bool| -> Mat {
        let blocks: Vec<Mat> = (0..t)
            .map(|l| {
                let a = &alignments[l];
                if stored {
                    a.stored_features(&x.layer(rows, l))
                } else {
                    a.public_features(&x.layer(rows, l))
                }
            })
            .collect();
        unit_rows(&hstack(&blocks))
    };
    let reid = [
        (
            "activations",
            rate(nearest_in_pool(
                &unit_rows(&acts.all_layers(&attacked)),
                &unit_rows(&k.everyone.all_layers(&everyone)),
                &pools,
            )),
        ),
        ("layer_norms", rate(nearest_in_pool(&acts.norms(&attacked), &k.everyone.norms(&everyone), &pools))),
        (
            "cross_layer_products",
            rate(nearest_in_pool(
                &acts.cross_layer_products(&attacked),
                &k.everyone.cross_layer_products(&everyone),
                &pools,
            )),
        ),
        (
            "aligned",
            rate(nearest_in_pool(
                &aligned_features(acts, &attacked, true),
                &aligned_features(&k.everyone, &everyone, false),
                &pools,
            )),
        ),
    ];
    // Known plaintext: the attacker knows which text `a` stored samples are (not among the attacked) and
    // compares inner products with them, which survive any rotation within a layer.
    let mut known = serde_json::Map::new();
    for &a in &KNOWN_PLAINTEXT {
        if attacked.len() + a > n {
            continue;
        }
        let anchors: Vec<usize> = (attacked.len()..attacked.len() + a).collect();
        let anchor_texts: Vec<usize> = anchors.iter().map(|&s| truth[s]).collect();
        let d = acts.d as f32;
        let stored: Vec<Mat> =
            (0..t).map(|l| acts.layer(&attacked, l) * acts.layer(&anchors, l).transpose() / d).collect();
        let cands: Vec<Mat> = (0..t)
            .map(|l| k.everyone.layer(&everyone, l) * k.everyone.layer(&anchor_texts, l).transpose() / d)
            .collect();
        known.insert(a.to_string(), json!(rate(nearest_in_pool(&hstack(&stored), &hstack(&cands), &pools))));
    }
    // Relative spread of the stored per-layer norms (zero up to quantisation: the device sends unit RMS).
    let norm_spread = {
        let norms = acts.norms(&all);
        let mean = norms.mean();
        (norms.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / norms.len().max(1) as f32).sqrt() / mean
    };
    let reid_details = json!({
        "attacks": named(&reid),
        "chance": 1.0 / args.pool as f64,
        "attacked": attacked.len(),
        "known_plaintext_anchors": known,
        "layer_norm_spread": norm_spread,
    });

    // 2b. Token recovery: rank the vocabulary against a stored activation, guess as many tokens as the text has
    // (not counting the frequent ones, which need no attack).
    eprintln!("audit: token recovery");
    let vocab = k.embedding.nrows();
    let content: Vec<Vec<u32>> = attacked
        .iter()
        .map(|&s| k.tokens[truth[s]].iter().copied().filter(|x| !k.frequent.contains(x)).collect())
        .collect();
    let recovery = |scores: &Mat, ids: &dyn Fn(usize) -> Option<u32>| -> f64 {
        let (mut hits, mut total) = (0usize, 0usize);
        for (i, want) in content.iter().enumerate() {
            let row: Vec<f32> = scores.row(i).iter().copied().collect();
            let guesses: HashSet<u32> = top_m(&row, want.len(), |j| ids(j).is_some_and(|id| !k.frequent.contains(&id)))
                .into_iter()
                .filter_map(ids)
                .collect();
            hits += want.iter().filter(|x| guesses.contains(x)).count();
            total += want.len();
        }
        hits as f64 / total.max(1) as f64
    };
    let vocab_ids = |j: usize| (j < vocab).then_some(j as u32);
    let mut decode_layers: Vec<usize> = vec![0, 1, 2, 3, t / 2, t - 1];
    decode_layers.retain(|&l| l < t);
    decode_layers.dedup();
    // The bag-of-words probe's vocabulary: content tokens of the public texts.
    let mut bow: Vec<u32> =
        public.iter().flat_map(|&r| k.tokens[r].iter().copied()).filter(|x| !k.frequent.contains(x)).collect();
    bow.sort_unstable();
    bow.dedup();
    let bow_targets = Mat::from_fn(public.len(), bow.len(), |i, j| f32::from(k.tokens[public[i]].contains(&bow[j])));
    let bow_ids = |j: usize| bow.get(j).copied();
    let (mut vocab_rate, mut lens_rate, mut bow_rate, mut bow_aligned_rate) = (0f64, 0f64, 0f64, 0f64);
    for &l in &decode_layers {
        let x = acts.layer(&attacked, l);
        let centred = subtract_row(&x, &column_means(&acts.layer(&all, l)));
        vocab_rate = vocab_rate.max(recovery(&(&centred * k.embedding.transpose()), &vocab_ids));
        let mut lens = x.clone();
        for (j, g) in k.final_norm.iter().enumerate() {
            lens.column_mut(j).scale_mut(*g);
        }
        lens_rate = lens_rate.max(recovery(&(&lens * k.embedding.transpose()), &vocab_ids));
        let public_l = k.everyone.layer(&public, l);
        let probe = Ridge::fit(&public_l, &bow_targets, 1.0);
        bow_rate = bow_rate.max(recovery(&probe.predict(&x), &bow_ids));
        let a = &alignments[l];
        let probe = Ridge::fit(&a.public_features(&public_l), &bow_targets, 1.0);
        bow_aligned_rate = bow_aligned_rate.max(recovery(&probe.predict(&a.stored_features(&x)), &bow_ids));
    }
    let text = [
        ("nearest_vocabulary", vocab_rate),
        ("logit_lens", lens_rate),
        ("bag_of_words_probe", bow_rate),
        ("aligned_bag_of_words_probe", bow_aligned_rate),
    ];
    let mean_tokens = content.iter().map(Vec::len).sum::<usize>() as f64 / content.len().max(1) as f64;
    let text_details = json!({
        "attacks": named(&text),
        "chance": mean_tokens / (vocab - k.frequent.len()) as f64,
        "content_tokens_per_text": mean_tokens,
        "layers": decode_layers,
        "plaintexts_in_server_files": k.texts[..k.n_train].iter().filter(|s| s.len() >= 16 && view.strings.contains(s.as_str())).count(),
    });

    // 3. The model: the server's adapter checkpoint on the public backbone's plain activations, without Q. The
    // attacker may use it alone or add it to the backbone's logits.
    let model = match &view.weights {
        Some(bytes) => {
            eprintln!("audit: stolen adapter");
            let (tensors, _) = weights_file::from_bytes(bytes).map_err(|e| anyhow!("the stored checkpoint: {e}"))?;
            let net = SideNet::from_tensors(&view.side, &weights_file::as_refs(&tensors))?;
            let dtype = net.tensors()[0].1.dtype();
            let (np, w) = (public.len(), t * acts.d);
            let x = Tensor::from_slice(&k.everyone.flat[k.n_train * w..], (np, t, acts.d), &Device::Cpu)?;
            let o = net.forward(&x.to_dtype(dtype)?)?.to_dtype(DType::F32)?.narrow(1, 0, kl)?.contiguous()?;
            let o = Mat::from_row_slice(np, kl, &o.flatten_all()?.to_vec1::<f32>()?);
            json!({
                "adapter_alone": accuracy(&argmax_rows(&o), public_y),
                "with_public_backbone": accuracy(&argmax_rows(&(&k.public_logits + &o)), public_y),
                "zero_shot": accuracy(&argmax_rows(&k.public_logits), public_y),
            })
        }
        None => Value::Null,
    };

    Ok(json!({
        "label_attack_acc": best(&labels),
        "reidentification": best(&reid),
        "text_recovery": best(&text),
        "stolen_adapter_acc": model["adapter_alone"],
        "stolen_adapter_with_backbone_acc": model["with_public_backbone"],
        "details": {
            "samples": n,
            "labels": label_details,
            "reidentification": reid_details,
            "text": text_details,
            "model": model,
        },
    }))
}

pub fn run(args: Args) -> Result<()> {
    let (backbone, task, mut split) = zeroshot::load(&args.data)?;
    if let Some(n) = args.train {
        split.train.truncate(n);
    }
    anyhow::ensure!(!split.train.is_empty() && !split.test.is_empty(), "the audit needs training and held-out data");
    let mut knowledge = knowledge(&backbone, &task, &split)?;
    let n_train = knowledge.n_train;
    let mut report = serde_json::Map::new();
    for (name, secrets_on) in [("secrets_on", true), ("secrets_off", false)] {
        eprintln!("audit: fine-tune with {}", name.replace('_', " "));
        let work = tempfile::tempdir()?;
        let adapter_path = work.path().join("device-adapter.safetensors");
        let mut device_args = vec!["--keep-session".to_string()];
        if !secrets_on {
            device_args.push("--no-secrets".into());
        }
        let device = demo::run_in(
            demo::Args {
                mode: "pae".into(),
                data: args.data.clone(),
                train: Some(n_train),
                test: Some(200),
                epochs: args.epochs,
                save: Some(adapter_path.clone()),
                device_args,
            },
            work.path(),
        )?;
        let view = read_server_view(work.path())?;
        let adapter = DeviceAdapter::load(&adapter_path)?;
        anyhow::ensure!(adapter.secret_seed.is_some() == secrets_on, "the device's secrets are not as asked");
        let secrets = match adapter.secret_seed {
            Some(seed) => Secrets::from_seed(adapter.side_config(), seed)?,
            None => Secrets::disabled(adapter.side_config())?,
        };
        let truth = ground_truth(&view, &knowledge.everyone, n_train, &secrets)?;
        let mut result = attack(&view, &truth, &knowledge, &args)?;
        result["details"]["device_finetuned_acc"] = device["finetuned_acc"].clone();
        eprintln!("audit: {name}: {}", headline(&result));
        report.insert(name.into(), result);
        if secrets_on {
            for (key, centre) in WHITENING {
                eprintln!("audit: the same samples as the server would hold them after {key}");
                let (simulated, whitened) = simulate_whitening(&view, &truth, &knowledge.everyone, n_train, centre)?;
                let plain = std::mem::replace(&mut knowledge.everyone, whitened);
                let result = attack(&simulated, &truth, &knowledge, &args);
                knowledge.everyone = plain;
                let result = result?;
                eprintln!("audit: {key}: {}", headline(&result));
                report.insert(key.into(), result);
            }
        }
    }
    let labels = &knowledge.labels[..n_train];
    let chance = (0..knowledge.n_labels as u32).map(|l| labels.iter().filter(|&&x| x == l).count()).max().unwrap_or(0)
        as f64
        / n_train as f64;
    let on = &report["secrets_on"];
    let num = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let mut full = json!({
        "chance": chance,
        "secrets_on": report["secrets_on"],
        "secrets_off": report["secrets_off"],
        "goals_met": {
            "label_attack": num(&on["label_attack_acc"]) <= chance + 0.05,
            "reidentification": num(&on["reidentification"]) <= 0.05,
            "text_recovery": num(&on["text_recovery"]) <= 0.05,
            "stolen_adapter": num(&on["stolen_adapter_acc"]) <= chance + 0.05,
        },
        "data": {"train": n_train, "public": split.test.len(), "attacked": args.attacked.min(n_train), "pool": args.pool},
        "command": format!("cargo xtask audit{}", args.train.map_or(String::new(), |n| format!(" --train {n}"))),
        "machine": bench::machine(),
        "date": bench::today(),
    });
    for (key, _) in WHITENING {
        full[key] = report[key].clone();
    }
    if !args.no_docs {
        write_docs(&full)?;
    }
    let mut line = json!({
        "chance": chance,
        "zero_shot_acc": full["secrets_on"]["details"]["model"]["zero_shot"],
        "secrets_on": headline(&full["secrets_on"]),
        "secrets_off": headline(&full["secrets_off"]),
    });
    for (key, _) in WHITENING {
        line[key] = headline(&full[key]);
    }
    println!("{line}");
    Ok(())
}

/// The four numbers the issue asks for (and the adapter with the backbone's logits, next to its alone figure).
fn headline(v: &Value) -> Value {
    json!({
        "label_attack_acc": v["label_attack_acc"],
        "reidentification": v["reidentification"],
        "text_recovery": v["text_recovery"],
        "stolen_adapter_acc": v["stolen_adapter_acc"],
        "stolen_adapter_with_backbone_acc": v["stolen_adapter_with_backbone_acc"],
    })
}

/// Forwards the victim's and the public texts once (cached) and gathers what the attacker and auditor know.
fn knowledge(backbone: &Backbone, task: &Task, split: &mobillm_core::dataset::Split) -> Result<Knowledge> {
    let train = side_eval::pivots(backbone, task, &split.train, "audit: victim's texts")?;
    let public = side_eval::pivots(backbone, task, &split.test, "audit: public texts")?;
    let everyone = Acts::from_tensor(&normalize_taps(&Tensor::cat(&[&train.taps, &public.taps], 0)?)?)?;
    let texts: Vec<String> = split.train.iter().chain(&split.test).map(|e| e.text.clone()).collect();
    let labels: Vec<u32> = train.labels.iter().chain(&public.labels).copied().collect();
    let (np, kl) = public.logits.dims2()?;
    let public_logits = Mat::from_row_slice(np, kl, &public.logits.flatten_all()?.to_vec1::<f32>()?);
    let template: HashSet<u32> = task.encode(backbone.tokenizer(), "")?.into_iter().collect();
    let tokens = texts
        .iter()
        .map(|s| Ok(task.encode(backbone.tokenizer(), s)?.into_iter().filter(|x| !template.contains(x)).collect()))
        .collect::<Result<Vec<HashSet<u32>>>>()?;
    let mut df = std::collections::HashMap::<u32, usize>::new();
    for set in &tokens[train.labels.len()..] {
        for &x in set {
            *df.entry(x).or_default() += 1;
        }
    }
    let mut by_df: Vec<(u32, usize)> = df.into_iter().collect();
    by_df.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let frequent = by_df.iter().take(FREQUENT_TOKENS).map(|(x, _)| *x).collect();
    let weights = backbone.llama().weights();
    let embed = weights.embed.dense()?;
    let (v, d) = embed.dims2()?;
    let embedding = unit_rows(&Mat::from_row_slice(v, d, &embed.flatten_all()?.to_vec1::<f32>()?));
    Ok(Knowledge {
        everyone,
        n_train: split.train.len(),
        texts,
        labels,
        n_labels: kl,
        public_logits,
        tokens,
        frequent,
        embedding,
        final_norm: weights.final_norm.to_vec1::<f32>()?,
    })
}

const START: &str = "<!-- cargo xtask audit: start -->";
const END: &str = "<!-- cargo xtask audit: end -->";

/// Writes docs/privacy-audit.json and the generated results section of docs/privacy.md.
fn write_docs(r: &Value) -> Result<()> {
    let docs = bindings::root().join("docs");
    std::fs::write(docs.join("privacy-audit.json"), serde_json::to_string_pretty(r)? + "\n")?;
    let pct = |v: Option<&Value>| v.and_then(Value::as_f64).map_or("–".to_string(), |x| format!("{:.1}%", x * 100.0));
    let on = &r["secrets_on"];
    let chance = r["chance"].as_f64().unwrap_or(0.5);
    let mut conditions = vec!["secrets_on".to_string(), "secrets_off".to_string()];
    conditions.extend(WHITENING.map(|(key, _)| key.to_string()));
    let mut rows = String::new();
    let mut row = |what: &str, pointer: &str, goal: &str| {
        let cells: Vec<String> = conditions.iter().map(|c| pct(r[c.as_str()].pointer(pointer))).collect();
        rows.push_str(&format!("| {what} | {} | {goal} |\n", cells.join(" | ")));
    };
    let keys = |pointer: &str| -> Vec<String> {
        on.pointer(pointer).and_then(Value::as_object).map_or(Vec::new(), |m| m.keys().cloned().collect())
    };
    let label_goal = format!("≤ {:.1}%", (chance + 0.05) * 100.0);
    row("**label attack** (best)", "/label_attack_acc", &label_goal);
    for key in keys("/details/labels/attacks") {
        row(&format!("· {}", key.replace('_', " ")), &format!("/details/labels/attacks/{key}"), "");
    }
    row(
        "· target clusters named by the aligned probe (no labels used)",
        "/details/labels/target_clusters_named_by_aligned_probe",
        "",
    );
    row("**re-identification** among 100 (best)", "/reidentification", "≤ 5% (chance 1%)");
    for key in keys("/details/reidentification/attacks") {
        row(&format!("· {}", key.replace('_', " ")), &format!("/details/reidentification/attacks/{key}"), "");
    }
    let mut anchors = keys("/details/reidentification/known_plaintext_anchors");
    anchors.sort_by_key(|a| a.parse::<usize>().unwrap_or(0));
    for key in anchors {
        row(
            &format!("· known plaintext, {key} anchor(s)"),
            &format!("/details/reidentification/known_plaintext_anchors/{key}"),
            "",
        );
    }
    row("**token recovery** (best)", "/text_recovery", "≤ 5%");
    for key in keys("/details/text/attacks") {
        row(&format!("· {}", key.replace('_', " ")), &format!("/details/text/attacks/{key}"), "");
    }
    row("**stolen adapter** alone", "/stolen_adapter_acc", &label_goal);
    row("· stolen adapter + public backbone logits", "/stolen_adapter_with_backbone_acc", "");
    row("· public backbone alone (zero-shot)", "/details/model/zero_shot", "");
    row("the device's own fine-tuned accuracy", "/details/device_finetuned_acc", "");
    let section = format!(
        "{START}\n## Measured\n\n`{cmd}` on {machine}, {date}: {train} training sentences fine-tuned through the real \
server, {public} public look-alike sentences for the attacker, {attacked} stored samples attacked for texts. \
Chance (the majority label) {chance}; token-recovery chance {text_chance}.\n\n\
| attack | secrets on | secrets off | {whitened} | goal (secrets on) |\n\
|---|---:|---:|{align}---|\n{rows}{END}",
        whitened = WHITENING
            .map(|(_, centre)| format!("secrets on + {}whitening (simulated)", if centre { "centred " } else { "" }))
            .join(" | "),
        align = "---:|".repeat(WHITENING.len()),
        cmd = r["command"].as_str().unwrap_or(""),
        machine = r["machine"].as_str().unwrap_or(""),
        date = r["date"].as_str().unwrap_or(""),
        train = r["data"]["train"],
        public = r["data"]["public"],
        attacked = r["data"]["attacked"],
        chance = pct(r.get("chance")),
        text_chance = on["details"]["text"]["chance"].as_f64().map_or("–".into(), |x| format!("{:.3}%", x * 100.0)),
    );
    bench::replace_generated(&docs.join("privacy.md"), START, END, &section)
}
