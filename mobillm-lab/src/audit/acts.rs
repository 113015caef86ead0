//! Pivot activations as the audit handles them: a flat row-major buffer with views per layer, per sample and
//! per sample's layer norms.

use anyhow::Result;
use candle_core::{DType, Tensor};

use super::attacks::Mat;

/// Activations as rows: `n` samples of `t` layers of `d` values, sample after sample.
pub struct Acts {
    pub flat: Vec<f32>,
    pub n: usize,
    pub t: usize,
    pub d: usize,
}

impl Acts {
    pub fn from_tensor(x: &Tensor) -> Result<Self> {
        let (n, t, d) = x.dims3()?;
        Ok(Self { flat: x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?, n, t, d })
    }

    /// `[rows, d]`: layer `l` of the given samples.
    pub fn layer(&self, rows: &[usize], l: usize) -> Mat {
        Mat::from_fn(rows.len(), self.d, |i, j| self.flat[(rows[i] * self.t + l) * self.d + j])
    }

    /// `[rows, t·d]`: all layers side by side.
    pub fn all_layers(&self, rows: &[usize]) -> Mat {
        let w = self.t * self.d;
        Mat::from_fn(rows.len(), w, |i, j| self.flat[rows[i] * w + j])
    }

    /// `[rows, t(t−1)/2]`: each sample's cross-layer inner products (divided by d): what survives one rotation
    /// shared by all layers.
    pub fn cross_layer_products(&self, rows: &[usize]) -> Mat {
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
    pub fn norms(&self, rows: &[usize]) -> Mat {
        Mat::from_fn(rows.len(), self.t, |i, l| {
            let s = (rows[i] * self.t + l) * self.d;
            self.flat[s..s + self.d].iter().map(|v| v * v).sum::<f32>().sqrt()
        })
    }

    pub fn rows(&self) -> Vec<usize> {
        (0..self.n).collect()
    }
}
