//! The side network of docs/design.md §3, token-wise over the tapped layers of one token:
//!
//! ```text
//! μ_i = sigmoid(α_i)
//! s_i = (1 − μ_i)·P_i·x_i + μ_i·h_{i−1}            h_0 = 0
//! h_i = s_i + W_up,i · φ(W_down,i · norm(s_i))
//! o   = W_out · norm(h_T)
//! ```
//!
//! `x_i` is the (unit-RMS, possibly rotated) activation of tapped layer i. `norm` is parameter-free RMS scaling.
//! `W_up` and `W_out` start at zero, so a fresh network outputs exactly zero. The same code serves the server's
//! training (parameters are candle `Var`s) and the device's inference (plain tensors from an adapter file).

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;

use super::config::{Activation, SideConfig};
use crate::error::{Error, Result};

/// Parameter names, as stored in adapter files.
pub const PROJ: &str = "proj"; // [T, w, d]
pub const GATE_ALPHA: &str = "gate_alpha"; // [T]
pub const DOWN: &str = "down"; // [T, r, w]
pub const UP: &str = "up"; // [T, w, r]
pub const OUT: &str = "out"; // [K_out, w]

const NORM_EPS: f64 = 1e-6;

#[derive(Debug, Clone)]
pub struct SideNet {
    cfg: SideConfig,
    proj: Tensor,
    gate_alpha: Tensor,
    down: Tensor,
    up: Tensor,
    out: Tensor,
}

impl SideNet {
    /// Reads the parameters from `vb`; `out` has `out_rows` rows (K' on the server, K once folded on the device).
    pub fn new(cfg: &SideConfig, out_rows: usize, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (t, d, w, r) = (cfg.taps, cfg.hidden, cfg.width, cfg.rank);
        let get = |shape: &[usize], name: &str| -> Result<Tensor> {
            vb.get(shape, name).map_err(|e| Error::InvalidInput(format!("side network parameter `{name}`: {e}")))
        };
        Ok(Self {
            cfg: cfg.clone(),
            proj: get(&[t, w, d], PROJ)?,
            gate_alpha: get(&[t], GATE_ALPHA)?,
            down: get(&[t, r, w], DOWN)?,
            up: get(&[t, w, r], UP)?,
            out: get(&[out_rows, w], OUT)?,
        })
    }

    pub fn config(&self) -> &SideConfig {
        &self.cfg
    }

    /// The parameters' dtype.
    pub fn dtype(&self) -> DType {
        self.proj.dtype()
    }

    /// The projections `P` `[T, w, d]` (a `Var` while training).
    pub fn projections(&self) -> &Tensor {
        &self.proj
    }

    pub fn out_rows(&self) -> usize {
        self.out.dim(0).unwrap_or(0)
    }

    /// `x: [N, T, d]` → `o: [N, out_rows]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_projected(&self.project(&self.layer_major(x)?)?)
    }

    /// `x: [N, T, d]` → `[T, N, d]`, contiguous: the layout [`SideNet::project`] takes.
    pub fn layer_major(&self, x: &Tensor) -> Result<Tensor> {
        let (t, d) = (self.cfg.taps, self.cfg.hidden);
        let dims = x.dims();
        if dims.len() != 3 || dims[1] != t || dims[2] != d {
            return Err(Error::InvalidInput(format!("side network input has shape {dims:?}, expected [N, {t}, {d}]")));
        }
        Ok(x.transpose(0, 1)?.contiguous()?)
    }

    /// All projections at once: `x: [T, N, d]` × `P_iᵀ` → `u: [T, N, w]`.
    pub fn project(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.proj.transpose(1, 2)?)?)
    }

    /// The network after its projections: `u: [T, N, w]` → `o: [N, out_rows]`.
    pub fn forward_projected(&self, u: &Tensor) -> Result<Tensor> {
        let n = u.dim(1)?;
        let mu = candle_nn::ops::sigmoid(&self.gate_alpha)?;
        let mut h = Tensor::zeros((n, self.cfg.width), u.dtype(), u.device())?;
        for i in 0..self.cfg.taps {
            let m = mu.narrow(0, i, 1)?;
            let s = (u.get(i)?.broadcast_mul(&(1.0 - &m)?)? + h.broadcast_mul(&m)?)?;
            let z = rms(&s)?.matmul(&self.down.get(i)?.t()?)?;
            let z = self.activation(&z)?.matmul(&self.up.get(i)?.t()?)?;
            h = (s + z)?;
        }
        Ok(rms(&h)?.matmul(&self.out.t()?)?)
    }

    fn activation(&self, z: &Tensor) -> Result<Tensor> {
        Ok(match self.cfg.activation {
            Activation::Gelu => z.gelu_erf()?,
            Activation::Silu => candle_nn::ops::silu(z)?,
            Activation::Relu => z.relu()?,
        })
    }

    /// The parameters by name (for saving and folding).
    pub fn tensors(&self) -> Vec<(&'static str, Tensor)> {
        vec![
            (PROJ, self.proj.clone()),
            (GATE_ALPHA, self.gate_alpha.clone()),
            (DOWN, self.down.clone()),
            (UP, self.up.clone()),
            (OUT, self.out.clone()),
        ]
    }

    /// A network over plain tensors (no autograd), e.g. after folding.
    pub fn from_tensors(cfg: &SideConfig, tensors: &[(&str, Tensor)]) -> Result<Self> {
        let map: std::collections::HashMap<String, Tensor> =
            tensors.iter().map(|(n, t)| (n.to_string(), t.clone())).collect();
        let dtype = map.get(PROJ).map_or(DType::F32, |t| t.dtype());
        let out_rows = map.get(OUT).map_or(0, |t| t.dim(0).unwrap_or(0));
        Self::new(cfg, out_rows, VarBuilder::from_tensors(map, dtype, &Device::Cpu))
    }
}

/// Parameter-free RMS scaling over the last dimension (autograd-friendly, unlike the fused candle-nn op).
pub fn rms(x: &Tensor) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_div(&(ms + NORM_EPS)?.sqrt()?)?)
}

/// What the device does before anything leaves it: scales every tapped activation to unit RMS, so no norm is sent.
pub fn normalize_taps(taps: &Tensor) -> Result<Tensor> {
    rms(taps)
}
