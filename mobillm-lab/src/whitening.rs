//! Per-layer whitening of pivot activations, simulated: what the privacy audit proposes against the alignment
//! attack, and what `side-eval --whiten` measures the accuracy of.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use mobillm_core::side::normalize_taps;

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

#[cfg(test)]
mod tests {
    use super::*;

    /// Correlated activations come out far less correlated: after whitening (and the rescaling to unit RMS that
    /// follows it, which brings back a little correlation), one direction no longer dominates each layer.
    #[test]
    fn whitening_decorrelates_each_layer() {
        let (n, t, d) = (2000, 2, 8);
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let z: Vec<f32> = (0..n * t * d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let z = Tensor::from_vec(z, (n, t, d), &Device::Cpu).unwrap();
        // Mix every layer with the same skewing matrix: the first coordinate leaks into all others.
        let mut mix = vec![0f32; d * d];
        for i in 0..d {
            mix[i * d + i] = 1.0;
            mix[i * d] = 2.0;
        }
        let mix = Tensor::from_vec(mix, (d, d), &Device::Cpu).unwrap();
        let x = z.reshape((n * t, d)).unwrap().matmul(&mix.t().unwrap()).unwrap().reshape((n, t, d)).unwrap();
        let x = normalize_taps(&x).unwrap();
        let off_diagonal = |x: &Tensor, l: usize| -> f32 {
            let xl = x.narrow(1, l, 1).unwrap().squeeze(1).unwrap();
            let m = (xl.t().unwrap().matmul(&xl).unwrap() / n as f64).unwrap().to_vec2::<f32>().unwrap();
            let diag: f32 = (0..d).map(|i| m[i][i]).sum::<f32>() / d as f32;
            let off = (0..d).flat_map(|i| (0..d).filter(move |&j| j != i).map(move |j| (i, j)));
            off.map(|(i, j)| m[i][j].abs()).fold(0f32, f32::max) / diag
        };
        let whitened = Whitening::fit(&x, 1e-3, true).unwrap().apply(&x).unwrap();
        assert_eq!(whitened.dims3().unwrap(), (n, t, d));
        for l in 0..t {
            let (before, after) = (off_diagonal(&x, l), off_diagonal(&whitened, l));
            eprintln!("layer {l}: largest off-diagonal / mean diagonal {before:.3} → {after:.3}");
            assert!(before > 0.5, "the test data is correlated");
            assert!(after < before / 3.0, "layer {l}: {before} → {after}");
        }
    }
}
