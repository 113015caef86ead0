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
//!
//! With `members` E > 1 the network is E such ladders side by side, trained each on its own loss
//! ([`SideNet::forward_members`]) and used through their mean ([`SideNet::forward`]): an ensemble, because single
//! networks trained from different initial weights end one to two points apart on UCI and the mean of their
//! outputs beats the average of their accuracies (docs/side-network.md, *Members*). The members are stacked along
//! the width, so the tensors that the secrets and the whitening fold into (`proj`'s rows, `out`'s columns) keep
//! their meaning: `proj` `[T, E·w, d]`, `gate_alpha` `[T·E]`, `down` `[T, E·r, w]`, `up` `[T, E·w, r]`, `out`
//! `[K_out, E·w]`, member-minor. With E = 1 these are the shapes of a single network.

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;

use super::config::{Activation, SideConfig};
use crate::error::{Error, Result};

/// Parameter names, as stored in adapter files.
pub const PROJ: &str = "proj"; // [T, E·w, d]
pub const GATE_ALPHA: &str = "gate_alpha"; // [T·E]
pub const DOWN: &str = "down"; // [T, E·r, w]
pub const UP: &str = "up"; // [T, E·w, r]
pub const OUT: &str = "out"; // [K_out, E·w]

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
        let (t, d, w, r, e) = (cfg.taps, cfg.hidden, cfg.width, cfg.rank, cfg.members);
        let get = |shape: &[usize], name: &str| -> Result<Tensor> {
            vb.get(shape, name).map_err(|e| Error::InvalidInput(format!("side network parameter `{name}`: {e}")))
        };
        Ok(Self {
            cfg: cfg.clone(),
            proj: get(&[t, e * w, d], PROJ)?,
            gate_alpha: get(&[t * e], GATE_ALPHA)?,
            down: get(&[t, e * r, w], DOWN)?,
            up: get(&[t, e * w, r], UP)?,
            out: get(&[out_rows, e * w], OUT)?,
        })
    }

    pub fn config(&self) -> &SideConfig {
        &self.cfg
    }

    /// The parameters' dtype.
    pub fn dtype(&self) -> DType {
        self.proj.dtype()
    }

    /// The projections `P` `[T, E·w, d]` (a `Var` while training).
    pub fn projections(&self) -> &Tensor {
        &self.proj
    }

    pub fn out_rows(&self) -> usize {
        self.out.dim(0).unwrap_or(0)
    }

    /// `x: [N, T, d]` → `o: [N, out_rows]`, the members' mean.
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

    /// All projections at once: `x: [T, N, d]` × `P_iᵀ` → `u: [T, N, E·w]`.
    pub fn project(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.proj.transpose(1, 2)?)?)
    }

    /// The network after its projections: `u: [T, N, E·w]` → `o: [N, out_rows]`, the members' mean.
    pub fn forward_projected(&self, u: &Tensor) -> Result<Tensor> {
        Ok(self.forward_members(u)?.mean(0)?)
    }

    /// Each member's outputs after the projections: `u: [T, N, E·w]` → `[E, N, out_rows]` (what training fits,
    /// one loss per member).
    pub fn forward_members(&self, u: &Tensor) -> Result<Tensor> {
        let (e, w, r) = (self.cfg.members, self.cfg.width, self.cfg.rank);
        let n = u.dim(1)?;
        let mu = candle_nn::ops::sigmoid(&self.gate_alpha)?.reshape((self.cfg.taps, e, 1, 1))?;
        let mut h = Tensor::zeros((e, n, w), u.dtype(), u.device())?;
        for i in 0..self.cfg.taps {
            let m = mu.get(i)?;
            let u_i = u.get(i)?.reshape((n, e, w))?.transpose(0, 1)?;
            let s = (u_i.broadcast_mul(&(1.0 - &m)?)? + h.broadcast_mul(&m)?)?;
            let down = self.down.get(i)?.reshape((e, r, w))?.transpose(1, 2)?;
            let up = self.up.get(i)?.reshape((e, w, r))?.transpose(1, 2)?;
            let z = rms(&s)?.matmul(&down)?;
            let z = self.activation(&z)?.matmul(&up)?;
            h = (s + z)?;
        }
        let out = self.out.reshape((self.out_rows(), e, w))?.permute((1, 2, 0))?.contiguous()?;
        Ok(rms(&h)?.matmul(&out)?)
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
