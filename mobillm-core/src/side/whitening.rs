//! Per-layer centring and whitening of the device's pivot activations, applied before the secret rotation
//! (docs/design.md §5): what the device sends is `R_i·rms(W_i·(â_i − μ_i))`.
//!
//! Why: LLM hidden states are strongly anisotropic, and a rotation keeps a session's whole point cloud. A server
//! that pairs the principal axes of its stored samples with those of public text by rank reads every sample in
//! public coordinates (97% re-identified among 100 in the privacy audit). A whitened, centred cloud has no
//! principal axes left to pair.
//!
//! The contract:
//! - μ and W come from the session's own data (the unit-RMS taps of a random subset of its training examples,
//!   [`CALIBRATION_SAMPLES`]), are never sent, and are kept with the other secrets in the adapter file. The server
//!   can only estimate them from look-alike data.
//! - W is `(C + εI)^{-1/2}` for the covariance C about μ, ε half of C's mean eigenvalue: the dominant directions
//!   are flattened to about unit variance while the weak ones are not amplified above it (amplified noise
//!   directions are what the side network overfits), held in a low-rank form: the top [`RANK`] eigenpairs
//!   exactly and every other direction (the tail) at the mean of the remaining eigenvalues, times
//!   [`Config::tail_gain`]. `W = r·I + U·diag(s − r)·Uᵀ` costs `T·k·d` values instead of `T·d²` (2 MiB against
//!   40 MiB at SmolLM2's size) and as many multiply-adds per sample. Sessions small enough to be whitened on at
//!   least half of the examples they send keep fewer directions, whiten them at a smaller ε and scale the tail
//!   down ([`Config::for_examples`]).
//! - The result is rescaled to unit RMS, like every tap, so no per-sample norm leaves the device. That rescaling
//!   is not linear, so W is not folded into the network: the adapter applies it before the folded network.

use candle_core::{DType, Device, Tensor};
use nalgebra::{DMatrix, SymmetricEigen};
use rayon::prelude::*;

use super::network::normalize_taps;
use crate::error::{Error, Result};

/// Training examples whose taps estimate μ and W (all of them when there are fewer).
pub const CALIBRATION_SAMPLES: usize = 256;
/// Eigen-directions per layer whitened exactly.
pub const RANK: usize = 64;
/// ε relative to the covariance's mean eigenvalue. Measured (docs/privacy.md, *Finding 2*): at 1 the flattened
/// directions keep enough of their order for the alignment attack to re-identify up to 5.3% of samples on some
/// secret draws; 0.5 keeps it at 1.3–3.3% over six draws (chance 1%) for about half a point of accuracy
/// (`side-eval` 91.8% over eight runs against 92.1–92.5% at 1); 0.3 costs a point more (91.5%).
pub const RELATIVE_EPS: f64 = 0.5;
/// A small session's whitening ([`Config::for_examples`]): 16 directions whitened all but exactly (ε 1% of the mean
/// eigenvalue: at 0.5 the block kept the order of its variances, and an attacker whitening public text the same
/// way paired its axes: 5.9% re-identified at 256 examples), the tail at 0.3.
pub const SMALL_RANK: usize = 16;
pub const SMALL_RELATIVE_EPS: f64 = 0.01;
pub const SMALL_TAIL_GAIN: f64 = 0.3;
/// The largest session whitened as a small one: its whitening is fitted on at least half of what it sends.
pub const SMALL_SESSION_EXAMPLES: usize = 2 * CALIBRATION_SAMPLES;

/// How a whitening is fitted.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Config {
    /// Eigen-directions per layer whitened exactly (at most d).
    pub rank: usize,
    /// ε relative to the covariance's mean eigenvalue.
    pub relative_eps: f64,
    /// The scale of every other direction (the tail) relative to whitening it at the mean of their eigenvalues:
    /// 1 whitens the tail like the rest (up to ε), 0 drops it.
    pub tail_gain: f64,
}

impl Config {
    /// The device's whitening for a session of `examples` training examples. When the fit covers at least half of
    /// them (at most [`SMALL_SESSION_EXAMPLES`]), the tail is where the examples the network trains on differ from
    /// held-out text: at 256 examples about 255 fitted directions against 576, the rest empty for them and not for
    /// anyone else. Such a session whitens [`SMALL_RANK`] directions and keeps the tail at [`SMALL_TAIL_GAIN`];
    /// measured (docs/side-network.md, *The whitening's tail*), it gains 0.6–3.1 points on each of four tasks at
    /// 256 examples, and at 500 0.8–1.2 on three tasks (`hedge` lost 1.6, within its runs' spread); at 800–2400
    /// examples a smaller tail cost up to a point, so larger sessions keep [`RANK`] and the whole tail.
    pub fn for_examples(examples: usize) -> Self {
        if examples <= SMALL_SESSION_EXAMPLES {
            Self { rank: SMALL_RANK, relative_eps: SMALL_RELATIVE_EPS, tail_gain: SMALL_TAIL_GAIN }
        } else {
            Self { rank: RANK, relative_eps: RELATIVE_EPS, tail_gain: 1.0 }
        }
    }
}

/// Parameter names, as stored in adapter files.
pub const MEAN: &str = "whitening.mean"; // [T, d]
pub const BASIS: &str = "whitening.basis"; // [T, k, d]: rows are eigenvectors
pub const SCALE: &str = "whitening.scale"; // [T, k]
pub const REST: &str = "whitening.rest"; // [T]

#[derive(Debug, Clone)]
pub struct Whitening {
    mean: Tensor,
    basis: Tensor,
    scale: Tensor,
    rest: Tensor,
}

impl Whitening {
    /// Fits μ and W per layer on unit-RMS taps `x: [N, T, d]`.
    pub fn fit(x: &Tensor, config: &Config) -> Result<Self> {
        let Config { rank, relative_eps, tail_gain } = *config;
        let (n, t, d) = x.dims3()?;
        if n == 0 || rank == 0 || !(0.0..=1.0).contains(&tail_gain) {
            return Err(Error::InvalidInput(format!(
                "whitening needs samples, a rank and a tail gain in [0, 1] (got {n}, {rank} and {tail_gain})"
            )));
        }
        let k = rank.min(d);
        // One layer at a time, each read from `x` as its own [N, d] slice: the device's peak memory is a few d×d
        // matrices per thread, not T of them, nor an f32 copy of all the taps.
        let layers: Vec<LayerFit> = (0..t)
            .into_par_iter()
            .map(|l| -> Result<LayerFit> {
                let rows = x.narrow(1, l, 1)?.squeeze(1)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let mut xc = DMatrix::<f64>::from_row_iterator(n, d, rows.iter().map(|&v| f64::from(v)));
                let mean = xc.row_mean();
                for mut row in xc.row_iter_mut() {
                    row -= &mean;
                }
                let c = xc.tr_mul(&xc) / n as f64;
                let trace = c.trace().max(0.0);
                let eig = SymmetricEigen::new(c);
                let mut order: Vec<usize> = (0..d).collect();
                order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
                let eps = (relative_eps * trace / d as f64).max(1e-9);
                let top: f64 = order[..k].iter().map(|&j| eig.eigenvalues[j].max(0.0)).sum();
                let rest_var = if k < d { ((trace - top) / (d - k) as f64).max(0.0) } else { 0.0 };
                let mut basis = Vec::with_capacity(k * d);
                let mut scale = Vec::with_capacity(k);
                for &j in &order[..k] {
                    basis.extend(eig.eigenvectors.column(j).iter().map(|&v| v as f32));
                    scale.push((1.0 / (eig.eigenvalues[j].max(0.0) + eps).sqrt()) as f32);
                }
                Ok(LayerFit {
                    mean: mean.iter().map(|&v| v as f32).collect(),
                    basis,
                    scale,
                    rest: (tail_gain / (rest_var + eps).sqrt()) as f32,
                })
            })
            .collect::<Result<_>>()?;
        let cpu = &Device::Cpu;
        Ok(Self {
            mean: Tensor::from_vec(layers.iter().flat_map(|l| l.mean.clone()).collect(), (t, d), cpu)?,
            basis: Tensor::from_vec(layers.iter().flat_map(|l| l.basis.clone()).collect(), (t, k, d), cpu)?,
            scale: Tensor::from_vec(layers.iter().flat_map(|l| l.scale.clone()).collect(), (t, k), cpu)?,
            rest: Tensor::from_vec(layers.iter().map(|l| l.rest).collect(), t, cpu)?,
        })
    }

    /// Unit-RMS taps `[N, T, d]` → centred, whitened, unit-RMS taps `[N, T, d]` (f32).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (t, k, d) = self.basis.dims3()?;
        let dims = x.dims();
        if dims.len() != 3 || dims[1] != t || dims[2] != d {
            return Err(Error::InvalidInput(format!("taps have shape {dims:?}, expected [N, {t}, {d}]")));
        }
        let xc = x.to_dtype(DType::F32)?.broadcast_sub(&self.mean.unsqueeze(0)?)?.transpose(0, 1)?.contiguous()?;
        // W·v = r·v + Uᵀ·((s − r) ⊙ (U·v)), per layer, for all N samples at once: [T, N, d].
        let coords = xc.matmul(&self.basis.transpose(1, 2)?)?; // [T, N, k]
        let gain = self.scale.broadcast_sub(&self.rest.unsqueeze(1)?)?.reshape((t, 1, k))?;
        let y =
            (xc.broadcast_mul(&self.rest.reshape((t, 1, 1))?)? + coords.broadcast_mul(&gain)?.matmul(&self.basis)?)?;
        normalize_taps(&y.transpose(0, 1)?.contiguous()?)
    }

    /// The parameters by name (for the adapter file).
    pub fn tensors(&self) -> Vec<(&'static str, Tensor)> {
        vec![
            (MEAN, self.mean.clone()),
            (BASIS, self.basis.clone()),
            (SCALE, self.scale.clone()),
            (REST, self.rest.clone()),
        ]
    }

    /// The whitening stored among `tensors` for taps of `t` layers of width `d`: `None` when none is stored, an
    /// error naming the tensor when it is incomplete or of the wrong shape.
    pub fn from_tensors(tensors: &[(&str, Tensor)], t: usize, d: usize) -> Result<Option<Self>> {
        let get = |name: &str| tensors.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_dtype(DType::F32));
        let (Some(mean), Some(basis), Some(scale), Some(rest)) = (get(MEAN), get(BASIS), get(SCALE), get(REST)) else {
            return match [MEAN, BASIS, SCALE, REST].iter().find(|n| get(n).is_some()) {
                Some(n) => Err(Error::InvalidInput(format!("`{n}` is stored without the rest of the whitening"))),
                None => Ok(None),
            };
        };
        let (mean, basis, scale, rest) = (mean?, basis?, scale?, rest?);
        let k = basis.dims().get(1).copied().unwrap_or(0);
        let expect = [
            (MEAN, &mean, vec![t, d]),
            (BASIS, &basis, vec![t, k, d]),
            (SCALE, &scale, vec![t, k]),
            (REST, &rest, vec![t]),
        ];
        for (name, tensor, shape) in expect {
            if tensor.dims() != shape.as_slice() || k == 0 || k > d {
                return Err(Error::InvalidInput(format!("`{name}` has shape {:?}, expected {shape:?}", tensor.dims())));
            }
        }
        Ok(Some(Self { mean, basis, scale, rest }))
    }
}

/// One layer's fit, row-major.
struct LayerFit {
    mean: Vec<f32>,
    basis: Vec<f32>,
    scale: Vec<f32>,
    rest: f32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Anisotropic taps: every layer's first coordinate leaks into all others, plus an offset.
    fn skewed(n: usize, t: usize, d: usize) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let z: Vec<f32> = (0..n * t * d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let z = Tensor::from_vec(z, (n * t, d), &Device::Cpu).unwrap();
        let mut mix = vec![0f32; d * d];
        for i in 0..d {
            mix[i * d + i] = 1.0 + i as f32 * 0.1;
            mix[i * d] = 2.0;
        }
        let mix = Tensor::from_vec(mix, (d, d), &Device::Cpu).unwrap();
        let x = (z.matmul(&mix.t().unwrap()).unwrap() + 0.5).unwrap().reshape((n, t, d)).unwrap();
        normalize_taps(&x).unwrap()
    }

    /// Largest |off-diagonal| of a layer's covariance over its mean diagonal, and |mean| over RMS.
    fn anisotropy(x: &Tensor, l: usize) -> (f32, f32) {
        let (n, _, d) = x.dims3().unwrap();
        let xl = x.narrow(1, l, 1).unwrap().squeeze(1).unwrap();
        let mean = xl.mean_keepdim(0).unwrap();
        let xc = xl.broadcast_sub(&mean).unwrap();
        let m = (xc.t().unwrap().matmul(&xc).unwrap() / n as f64).unwrap().to_vec2::<f32>().unwrap();
        let diag: f32 = (0..d).map(|i| m[i][i]).sum::<f32>() / d as f32;
        let off = (0..d).flat_map(|i| (0..d).filter(move |&j| j != i).map(move |j| (i, j)));
        let mean_norm = mean.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        (off.map(|(i, j)| m[i][j].abs()).fold(0f32, f32::max) / diag, mean_norm / (d as f32).sqrt())
    }

    #[test]
    fn whitening_centres_and_decorrelates_each_layer_at_full_and_low_rank() {
        let (n, t, d) = (2000, 2, 8);
        let x = skewed(n, t, d);
        for rank in [d, 2] {
            // A small ε: the full decorrelation (the device's ε = 0.5 flattens the dominant directions only).
            let whitened =
                Whitening::fit(&x, &Config { rank, relative_eps: 0.01, tail_gain: 1.0 }).unwrap().apply(&x).unwrap();
            assert_eq!(whitened.dims3().unwrap(), (n, t, d));
            for l in 0..t {
                let (before, after) = (anisotropy(&x, l), anisotropy(&whitened, l));
                eprintln!(
                    "rank {rank}, layer {l}: off-diagonal {:.3} → {:.3}, mean {:.3} → {:.3}",
                    before.0, after.0, before.1, after.1
                );
                assert!(before.0 > 0.5 && before.1 > 0.2, "the test data is skewed and off-centre");
                assert!(after.0 < before.0 / 2.0, "rank {rank}, layer {l}: {before:?} → {after:?}");
                // Centred before the rescaling to unit RMS, which brings a little mean back.
                assert!(after.1 < before.1 / 2.0, "rank {rank}, layer {l}: centred: {before:?} → {after:?}");
            }
            let rms = whitened.sqr().unwrap().mean(2).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(rms.iter().all(|v| (v - 1.0).abs() < 1e-3), "unit RMS after whitening");
        }
    }

    /// The part of each layer's whitened taps outside the span of that layer's basis, over their RMS.
    fn outside_basis(w: &Whitening, y: &Tensor) -> f32 {
        let y = y.transpose(0, 1).unwrap().contiguous().unwrap(); // [T, N, d]
        let basis = &w.basis; // [T, k, d], orthonormal rows
        let inside = y.matmul(&basis.transpose(1, 2).unwrap()).unwrap().matmul(basis).unwrap();
        let outside = (&y - inside).unwrap().sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
        (outside / y.sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap()).sqrt()
    }

    #[test]
    fn a_tail_gain_of_zero_drops_every_direction_outside_the_basis() {
        let x = skewed(500, 2, 8);
        let fit = |tail_gain| Whitening::fit(&x, &Config { rank: 3, relative_eps: RELATIVE_EPS, tail_gain }).unwrap();
        let (dropped, kept, halved) = (fit(0.0), fit(1.0), fit(0.5));
        let outside = |w: &Whitening| outside_basis(w, &w.apply(&x).unwrap());
        let (o0, o1, o5) = (outside(&dropped), outside(&kept), outside(&halved));
        eprintln!("outside the basis: gain 0 {o0:.2e}, 0.5 {o5:.3}, 1 {o1:.3}");
        assert!(o0 < 1e-3, "gain 0 leaves {o0} outside the basis");
        assert!(o1 > 0.3 && o5 > 0.1 && o5 < o1, "the tail is kept, and halved by a gain of 0.5: {o5} vs {o1}");
        for tail_gain in [-0.1, 1.5, f64::NAN] {
            let err = Whitening::fit(&x, &Config { tail_gain, ..Config::for_examples(500) }).unwrap_err();
            assert!(err.to_string().contains("tail gain"), "{err}");
        }
    }

    #[test]
    fn whitening_round_trips_through_its_tensors_and_rejects_partial_or_misshapen_ones() {
        let x = skewed(300, 3, 8);
        let w = Whitening::fit(&x, &Config { rank: 4, ..Config::for_examples(300) }).unwrap();
        let tensors = w.tensors();
        let back = Whitening::from_tensors(&tensors, 3, 8).unwrap().unwrap();
        let (a, b) = (w.apply(&x).unwrap(), back.apply(&x).unwrap());
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert!(Whitening::from_tensors(&[], 3, 8).unwrap().is_none());
        let err = Whitening::from_tensors(&tensors[..2], 3, 8).unwrap_err();
        assert!(err.to_string().contains(SCALE) || err.to_string().contains("without"), "{err}");
        let err = Whitening::from_tensors(&tensors, 3, 9).unwrap_err();
        assert!(err.to_string().contains("shape"), "{err}");
        assert!(matches!(w.apply(&x.narrow(1, 0, 2).unwrap()), Err(Error::InvalidInput(_))));
        assert!(matches!(
            Whitening::fit(&x.narrow(0, 0, 0).unwrap(), &Config::for_examples(0)),
            Err(Error::InvalidInput(_))
        ));
    }
}
