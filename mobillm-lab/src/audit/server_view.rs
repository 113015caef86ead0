//! What the server holds once a session is over, read from its data dir the way the server reads it; the same
//! samples as it would hold them under the alternative design (whitening with public statistics); and the
//! auditor's key to which sample is which text.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Device, Tensor};
use mobillm_core::side::whitening::{self, Whitening};
use mobillm_core::side::{SampleId, Secrets, SideConfig};
use mobillm_core::wire::{Frame, Limits, Quant};
use mobillm_server::store::embedded::Embedded;
use xtask::paths;

use super::acts::Acts;
use super::attacks::Mat;

/// What the server holds once the session is over, read the way the server reads it.
pub struct ServerView {
    pub side: SideConfig,
    pub acts: Acts,
    /// `[n, K']`: each sample's current target.
    pub targets: Mat,
    pub weights: Option<Vec<u8>>,
    /// Every printable run of ≥ 16 bytes in the server's files (store and log): where a plaintext would show.
    pub strings: String,
}

/// Reads the one kept session from the server's data dir (`work/data`) and log (`work/server.log`).
pub fn read_server_view(work: &Path) -> Result<ServerView> {
    let store = Embedded::open(&work.join("data"), 64 << 20).map_err(|e| anyhow!("opening the server's store: {e}"))?;
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
    for path in [work.join("server.log")].into_iter().chain(paths::walk(&work.join("data"))?) {
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

/// Every text (`everyone`, the first `n_train` rows the victim's) whitened with statistics of the public texts
/// as the device whitens a session of `n_train` examples: what an attacker computes from public data as its best
/// guess at a session's secret whitening, and under the public-whitening design exactly the device's whitening.
/// With `tail_only`, the whitening's tail alone ([`tail_only`]).
pub fn publicly_whitened(everyone: &Acts, n_train: usize, tail_only: bool) -> Result<Acts> {
    let all = Tensor::from_slice(&everyone.flat, (everyone.n, everyone.t, everyone.d), &Device::Cpu)?;
    let public = all.narrow(0, n_train, everyone.n - n_train)?;
    let whitening = Whitening::fit(&public, &whitening::Config::for_examples(n_train))?;
    let whitening = if tail_only { self::tail_only(&whitening)? } else { whitening };
    Acts::from_tensor(&whitening.apply(&all)?)
}

/// The whitening with its exactly whitened block zeroed: what it sends outside the block (the tail), as a server
/// would isolate it if it also held the block on its own (docs/side-network.md, *A tail per session*).
pub fn tail_only(w: &Whitening) -> Result<Whitening> {
    let tensors = w.tensors();
    let (t, _, d) = tensors.iter().find(|(n, _)| *n == whitening::BASIS).context("no basis")?.1.dims3()?;
    let zeroed: Vec<(&str, Tensor)> = tensors
        .into_iter()
        .map(|(n, v)| Ok((n, if n == whitening::SCALE { v.zeros_like()? } else { v })))
        .collect::<Result<_>>()?;
    Whitening::from_tensors(&zeroed, t, d)?.context("no whitening")
}

/// What the server would hold if the device whitened with public statistics instead of its session's
/// (`R_l·rms(W_l·(â_l − μ_l))`, μ and W from the public texts: `whitened` is [`publicly_whitened`]), for the
/// victim's samples in the order of `truth`, with the targets of the real session. Fresh rotations: any Haar draw
/// is as good as the device's.
pub fn simulate_public_whitening(view: &ServerView, truth: &[usize], whitened: &Acts) -> Result<ServerView> {
    let (t, d) = (whitened.t, whitened.d);
    let secrets = Secrets::from_seed(&SideConfig::new(t, d, 2), [42; 32])?;
    let rows: Vec<f32> =
        truth.iter().flat_map(|&i| whitened.flat[i * t * d..(i + 1) * t * d].iter().copied()).collect();
    let x = Tensor::from_vec(rows, (truth.len(), t, d), &Device::Cpu)?;
    stored_view(&x, &secrets, view.side.clone(), view.targets.clone())
}

/// What the server would hold after a session with fresh secrets on the victim's `n_train` texts (rows of
/// `everyone`, plain unit RMS), as the device computes it without running a fine-tune: whitening fitted on a random
/// calibration subset as `config` says, fresh rotations, the wire's int8 and f16 storage. Targets are zero: this
/// view serves the attacks on activations. Returns the view; its sample `i` is text `i`.
/// With `tail_only`, the whitening's tail alone ([`tail_only`]).
pub fn simulate_session(
    everyone: &Acts,
    n_train: usize,
    config: &whitening::Config,
    tail_only: bool,
) -> Result<ServerView> {
    let (t, d) = (everyone.t, everyone.d);
    let train = Tensor::from_slice(&everyone.flat[..n_train * t * d], (n_train, t, d), &Device::Cpu)?;
    let (calibration, _) = mobillm_core::fine_tune::random_split(n_train, whitening::CALIBRATION_SAMPLES);
    let whitening = Whitening::fit(&crate::inputs::select_rows(&train, &calibration)?, config)?;
    let whitening = if tail_only { self::tail_only(&whitening)? } else { whitening };
    let side = SideConfig::new(t, d, 2);
    let secrets = Secrets::generate(&side)?;
    let targets = Mat::zeros(n_train, side.outputs);
    stored_view(&whitening.apply(&train)?, &secrets, side, targets)
}

/// A server's view of whitened activations `x` rotated with `secrets`, as stored, beside `targets`.
fn stored_view(x: &Tensor, secrets: &Secrets, side: SideConfig, targets: Mat) -> Result<ServerView> {
    let stored = as_stored(&secrets.rotate_activations(x)?)?;
    Ok(ServerView { side, acts: Acts::from_tensor(&stored)?, targets, weights: None, strings: String::new() })
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
/// With secrets, the auditor whitens and rotates its own plain activations with the device's secrets and matches
/// the last layer; a stored sample that matches nothing well stops the audit (its ground truth would be wrong).
pub fn ground_truth(
    view: &ServerView,
    everyone: &Acts,
    n_train: usize,
    secrets: &Secrets,
    whitening: Option<&Whitening>,
) -> Result<Vec<usize>> {
    let (t, d) = (everyone.t, everyone.d);
    let last = t - 1;
    let mut rotated = Vec::with_capacity(n_train * d);
    for start in (0..n_train).step_by(128) {
        let len = (n_train - start).min(128);
        let chunk =
            Tensor::from_slice(&everyone.flat[start * t * d..(start + len) * t * d], (len, t, d), &Device::Cpu)?;
        let chunk = match whitening {
            Some(w) => w.apply(&chunk)?,
            None => chunk,
        };
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

#[cfg(test)]
mod tests {
    use mobillm_core::side::normalize_taps;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    /// Largest eigenvalue of a layer's covariance over the mean eigenvalue: 1 for an isotropic cloud.
    fn anisotropy(x: &Mat) -> f64 {
        let x = x.clone().cast::<f64>();
        let mean = x.row_mean();
        let xc = Mat::from_fn(x.nrows(), x.ncols(), |i, j| (x[(i, j)] - mean[j]) as f32).cast::<f64>();
        let eig = (xc.transpose() * &xc).symmetric_eigenvalues();
        eig.max() / eig.mean()
    }

    /// A simulated session holds the victim's samples as the device sends them: unit RMS, whitened (the cloud's
    /// dominant direction flattened) and rotated, with fresh secrets each time.
    #[test]
    fn a_simulated_session_is_whitened_rotated_and_fresh() {
        let (n, t, d) = (600, 2, 16);
        // Coordinate j scaled by 8/(1+j): strongly anisotropic, like hidden states.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let values: Vec<f32> =
            (0..n * t * d).map(|i| (rng.random::<f32>() - 0.5) * 8.0 / (1.0 + (i % d) as f32)).collect();
        let plain =
            Acts::from_tensor(&normalize_taps(&Tensor::from_vec(values, (n, t, d), &Device::Cpu).unwrap()).unwrap())
                .unwrap();
        let full = whitening::Config { rank: d, relative_eps: 0.01, tail_gain: 1.0 };
        let (a, b) = (
            simulate_session(&plain, 500, &full, false).unwrap(),
            simulate_session(&plain, 500, &full, false).unwrap(),
        );
        assert_eq!((a.acts.n, a.acts.t, a.acts.d, a.targets.nrows()), (500, t, d, 500));
        let rows: Vec<usize> = (0..500).collect();
        for l in 0..t {
            for norm in a.acts.norms(&rows).column(l).iter() {
                assert!((norm / (d as f32).sqrt() - 1.0).abs() < 0.02, "unit RMS, up to int8 and f16: {norm}");
            }
            let (before, after) = (anisotropy(&plain.layer(&rows, l)), anisotropy(&a.acts.layer(&rows, l)));
            assert!(before > 6.0 && after < 2.0, "layer {l}: anisotropy {before:.1} -> {after:.1}");
        }
        assert_ne!(a.acts.flat[..d], plain.flat[..d], "rotated");
        assert_ne!(a.acts.flat[..d], b.acts.flat[..d], "fresh secrets each session");
    }

    /// The tail alone has nothing left along the block's directions, and keeps what lies outside them.
    #[test]
    fn the_tail_alone_is_orthogonal_to_the_block() {
        let (n, t, d, k) = (300, 2, 12, 4);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let values: Vec<f32> =
            (0..n * t * d).map(|i| (rng.random::<f32>() - 0.5) * 8.0 / (1.0 + (i % d) as f32)).collect();
        let x = normalize_taps(&Tensor::from_vec(values, (n, t, d), &Device::Cpu).unwrap()).unwrap();
        let config = whitening::Config { rank: k, relative_eps: 0.01, tail_gain: 0.3 };
        let full = Whitening::fit(&x, &config).unwrap();
        let tail = tail_only(&full).unwrap();
        let basis = full.tensors().into_iter().find(|(n, _)| *n == whitening::BASIS).unwrap().1; // [t, k, d]
        let along = |w: &Whitening| -> f32 {
            let y = w.apply(&x).unwrap().transpose(0, 1).unwrap().contiguous().unwrap(); // [t, n, d]
            let coords = y.matmul(&basis.transpose(1, 2).unwrap().contiguous().unwrap()).unwrap(); // [t, n, k]
            (coords.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() / (n * t) as f32).sqrt()
        };
        assert!(along(&full) > 1.0, "the whole whitening sends the block: {}", along(&full));
        assert!(along(&tail) < 1e-4, "the tail alone sends nothing along the block: {}", along(&tail));
        let norms = tail.apply(&x).unwrap().sqr().unwrap().sum_keepdim(2).unwrap();
        let min = norms.flatten_all().unwrap().min(0).unwrap().to_scalar::<f32>().unwrap();
        assert!((min / d as f32 - 1.0).abs() < 1e-3, "still unit RMS: {min}");
    }
}
