//! Prediction differences (docs/design.md §4): the device owns the loss. With backbone label logits `z_b`, the decoded
//! side output `dec(o)` (zero at first) and label `y`,
//!
//! ```text
//! Δ = τ · (onehot_K(y) − softmax(z_b + dec(o)))
//! ```
//!
//! is τ times the negative gradient of the cross-entropy with respect to the logits: a boosting pseudo-residual.
//! The server fits its outputs to `o_prev + Q·[Δ; 0]`; a few rounds of this approach cross-entropy training with
//! no further backbone forward.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Default τ: the logit step one round may take. Measured (docs/side-network.md): τ = 2 is good after every
/// round; τ = 1 needs more rounds, τ ≥ 4 overshoots in the first.
pub const DEFAULT_TAU: f64 = 2.0;

/// `Δ: [N, K]` for backbone logits `z_b: [N, K]`, decoded side outputs `dec_o: [N, K]` (or `None` before the first
/// round) and labels (indices into the task's labels).
pub fn prediction_differences(z_b: &Tensor, dec_o: Option<&Tensor>, labels: &[u32], tau: f64) -> Result<Tensor> {
    let (n, k) = z_b.dims2()?;
    if labels.len() != n {
        return Err(Error::InvalidInput(format!("{} labels for {n} samples", labels.len())));
    }
    if let Some(&bad) = labels.iter().find(|&&l| l as usize >= k) {
        return Err(Error::InvalidInput(format!("label {bad} is out of range for {k} labels")));
    }
    if !(tau.is_finite() && tau > 0.0) {
        return Err(Error::InvalidInput(format!("tau {tau} must be positive")));
    }
    let logits = match dec_o {
        Some(o) if o.dims() != z_b.dims() => {
            return Err(Error::InvalidInput(format!("decoded outputs {:?} vs logits {:?}", o.dims(), z_b.dims())))
        }
        Some(o) => (z_b + o)?,
        None => z_b.clone(),
    };
    super::trainer::check_finite(&logits, "logits")?;
    let p = candle_nn::ops::softmax_last_dim(&logits.to_dtype(DType::F32)?)?;
    Ok(((one_hot(labels, k)? - p)? * tau)?)
}

pub fn one_hot(labels: &[u32], k: usize) -> Result<Tensor> {
    let mut v = vec![0f32; labels.len() * k];
    for (i, &l) in labels.iter().enumerate() {
        v[i * k + l as usize] = 1.0;
    }
    Ok(Tensor::from_vec(v, (labels.len(), k), &Device::Cpu)?)
}

/// Predicted label indices: `argmax(z_b + dec_o)`.
pub fn predict(z_b: &Tensor, dec_o: Option<&Tensor>) -> Result<Vec<u32>> {
    let logits = match dec_o {
        Some(o) => (z_b + o)?,
        None => z_b.clone(),
    };
    Ok(logits.argmax(1)?.to_vec1::<u32>()?)
}

/// Fraction of `predicted` equal to `labels`.
pub fn accuracy(predicted: &[u32], labels: &[u32]) -> f64 {
    let correct = predicted.iter().zip(labels).filter(|(p, l)| p == l).count();
    correct as f64 / labels.len().max(1) as f64
}
