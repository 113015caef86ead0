//! The device's per-session secrets (docs/design.md §5): an independent random orthogonal `R_i` (d×d) per tapped layer and
//! a random orthogonal `Q` (K'×K') for the output space, all derived from one 32-byte seed drawn from the OS CSPRNG.
//! Activations leave the device as `R_i·â_i`, targets as `Q·[Δ; 0]`; outputs come back through
//! `dec(o) = (Qᵀ·o)[:K]`; and the trained adapter is folded (`P_i ← P_i·R_i`, `W_out ← (Qᵀ·W_out)[:K]`) so the
//! device runs it on plain activations. The seed regenerates everything, so only it needs storing.
//!
//! Orthogonal matrices are Haar-distributed: the Q factor of the QR decomposition of a Gaussian matrix with the
//! signs of R's diagonal moved into Q.
//!
//! With two summaries per layer (`Summary::PivotAndMean`) a layer's pivot and mean share its `R_i`: the
//! rotations stay one per layer (20 MB, not 40), at the price of the server seeing each sample's inner products
//! between its pivot and mean at a layer (docs/privacy.md).
//!
//! The rotations are kept as f16: 20 MB at SmolLM2's size rather than 40. Rounding them (relative error 2⁻¹¹, so
//! `R·Rᵀ` is the identity to about 10⁻⁴) costs nothing measurable: the rotated activations are quantised to int8
//! for the wire next, an error about 20 times larger, and the fold uses the same rounded matrices, so the folded
//! network computes what the server trained. Each is expanded to f32 one layer at a time when it is applied. They are
//! drawn once and kept while activations are being sent; after that [`Secrets::release_rotations`] drops them,
//! and folding draws each layer's again from the seed, one at a time (≈2 s per fold, once a round), so the rounds
//! run without them.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use half::f16;
use nalgebra::DMatrix;
use rand::{RngCore, SeedableRng, TryRngCore};
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

use super::config::SideConfig;
use super::network::{SideNet, OUT, PROJ};
use crate::error::{Error, Result};

#[derive(Clone)]
pub struct Secrets {
    seed: Option<[u8; 32]>,
    /// Inputs per sample, and tapped layers (one rotation each): `taps = layers × summaries`, a layer's
    /// summaries adjacent.
    taps: usize,
    layers: usize,
    hidden: usize,
    labels: usize,
    /// `[L, d, d]` f16 while kept; empty when disabled (identity) or released (drawn again from the seed when
    /// needed). Shared by clones, which hold the same secrets.
    rotations: Arc<Mutex<Option<Tensor>>>,
    /// `[K', K']`.
    q: Tensor,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the seed.
        f.debug_struct("Secrets").field("enabled", &self.seed.is_some()).field("labels", &self.labels).finish()
    }
}

impl Secrets {
    /// Fresh secrets from the operating system's CSPRNG.
    pub fn generate(cfg: &SideConfig) -> Result<Self> {
        let mut seed = [0u8; 32];
        rand::rngs::OsRng.try_fill_bytes(&mut seed).map_err(|e| Error::InvalidInput(format!("OS RNG: {e}")))?;
        Self::from_seed(cfg, seed)
    }

    /// The secrets a seed determines (the same on every call).
    pub fn from_seed(cfg: &SideConfig, seed: [u8; 32]) -> Result<Self> {
        cfg.validate()?;
        let layers = cfg.layers();
        let sub_seeds = sub_seeds(seed, layers);
        let (d, k_out) = (cfg.hidden, cfg.outputs);
        let rotations = draw_rotations(&sub_seeds[..layers], d)?;
        let mut q = vec![0f32; k_out * k_out];
        random_orthogonal_into(&mut ChaCha20Rng::from_seed(sub_seeds[layers]), k_out, &mut q);
        let q = Tensor::from_vec(q, (k_out, k_out), &Device::Cpu)?;
        Ok(Self {
            seed: Some(seed),
            taps: cfg.taps,
            layers,
            hidden: d,
            labels: cfg.labels,
            rotations: Arc::new(Mutex::new(Some(rotations))),
            q,
        })
    }

    /// No secrets (R = Q = I): for comparisons and the privacy audit's "secrets off" runs only.
    pub fn disabled(cfg: &SideConfig) -> Result<Self> {
        cfg.validate()?;
        let q = Tensor::eye(cfg.outputs, DType::F32, &Device::Cpu)?;
        let rotations = Arc::new(Mutex::new(None));
        Ok(Self {
            seed: None,
            taps: cfg.taps,
            layers: cfg.layers(),
            hidden: cfg.hidden,
            labels: cfg.labels,
            rotations,
            q,
        })
    }

    pub fn seed(&self) -> Option<[u8; 32]> {
        self.seed
    }

    /// Drops the rotations (no more activations to send, but for the refit's split): folding and rotating then
    /// draw them one layer at a time.
    pub fn release_rotations(&self) {
        if let Ok(mut kept) = self.rotations.lock() {
            kept.take();
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.seed.is_some()
    }

    /// `[N, T, d]` unit-RMS activations → `R_i·â_i` per layer.
    pub fn rotate_activations(&self, x: &Tensor) -> Result<Tensor> {
        let (t, d) = (self.taps, self.hidden);
        let dims = x.dims();
        if dims.len() != 3 || dims[1] != t || dims[2] != d {
            return Err(Error::InvalidInput(format!("activations have shape {dims:?}, expected [N, {t}, {d}]")));
        }
        if self.seed.is_none() {
            return Ok(x.clone());
        }
        let mut values = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        self.rotate_in_place(&mut values)?;
        Ok(Tensor::from_vec(values, (dims[0], t, d), &Device::Cpu)?)
    }

    /// [`Secrets::rotate_activations`] on `[N, T, d]` values in place, one layer at a time: besides `x`, only one
    /// layer's rows and rotation are held. With the rotations released (the refit's split comes after the
    /// upload), each layer's is drawn in turn and dropped, as the fold does: keeping all 30 again, or copying
    /// the activations whole, put 40–50 MB on the device's peak.
    pub fn rotate_in_place(&self, x: &mut [f32]) -> Result<()> {
        let (t, d) = (self.taps, self.hidden);
        if !x.len().is_multiple_of(t * d) {
            return Err(Error::InvalidInput(format!("{} activation values are not rows of [{t}, {d}]", x.len())));
        }
        let Some(seed) = self.seed else { return Ok(()) };
        let (layers, s, n) = (self.layers, t / self.layers, x.len() / (t * d));
        let rotations = self.layer_rotations(seed)?;
        // Layer l's rows of sample i: its s summaries, adjacent, from offset (i·T + l·s)·d.
        let rows = |i: usize, l: usize| (i * t + l * s) * d..(i * t + (l + 1) * s) * d;
        for l in 0..layers {
            let r = rotations.layer(l)?;
            let mut layer = Vec::with_capacity(n * s * d);
            (0..n).for_each(|i| layer.extend_from_slice(&x[rows(i, l)]));
            let y = Tensor::from_vec(layer, (n * s, d), &Device::Cpu)?.matmul(&r.t()?)?.flatten_all()?;
            for (i, chunk) in y.to_vec1::<f32>()?.chunks_exact(s * d).enumerate() {
                x[rows(i, l)].copy_from_slice(chunk);
            }
        }
        Ok(())
    }

    /// `Δ: [N, k]` → `Q·[Δ; 0]: [N, K']`, for the task's K labels and any decoys' columns after them
    /// (`K ≤ k ≤ K'`).
    pub fn encode_targets(&self, delta: &Tensor) -> Result<Tensor> {
        let (n, k) = delta.dims2()?;
        let k_out = self.q.dim(0)?;
        if k < self.labels || k > k_out {
            return Err(Error::InvalidInput(format!(
                "targets have {k} columns, expected between the task's {} labels and the {k_out} outputs",
                self.labels
            )));
        }
        let padded = Tensor::cat(&[delta.clone(), Tensor::zeros((n, k_out - k), delta.dtype(), delta.device())?], 1)?;
        Ok(padded.matmul(&self.q.t()?)?)
    }

    /// `o: [N, K']` (server coordinates) → `(Qᵀ·o)[:K]: [N, K]`.
    pub fn decode_outputs(&self, o: &Tensor) -> Result<Tensor> {
        self.decode_columns(o, self.labels)
    }

    /// `o: [N, K']` → `(Qᵀ·o)[:cols]`: the task's outputs and the decoys' after them.
    pub fn decode_columns(&self, o: &Tensor, cols: usize) -> Result<Tensor> {
        let (_, k_out) = o.dims2()?;
        if k_out != self.q.dim(0)? || cols > k_out {
            return Err(Error::InvalidInput(format!(
                "outputs have {k_out} columns, expected {} (decoding {cols})",
                self.q.dim(0)?
            )));
        }
        Ok(o.matmul(&self.q)?.narrow(1, 0, cols)?)
    }

    /// Folds the secrets into a network trained in server coordinates: the result maps plain unit-RMS
    /// activations to decoded outputs `[N, K]`.
    pub fn fold(&self, trained: &SideNet) -> Result<SideNet> {
        let cfg = trained.config();
        if trained.out_rows() != self.q.dim(0)? {
            return Err(Error::InvalidInput(format!(
                "the network has {} outputs, the secrets {}",
                trained.out_rows(),
                self.q.dim(0)?
            )));
        }
        let tensors: Vec<(&str, Tensor)> = trained
            .tensors()
            .into_iter()
            .map(|(name, t)| -> Result<(&str, Tensor)> {
                let t = t.to_dtype(DType::F32)?;
                Ok(match name {
                    PROJ => (name, self.rotate_projections(&t)?),
                    OUT => (name, self.q.t()?.matmul(&t)?.narrow(0, 0, self.labels)?), // (Qᵀ W)[:K]
                    _ => (name, t),
                })
            })
            .collect::<Result<_>>()?;
        SideNet::from_tensors(cfg, &tensors)
    }
}

impl Secrets {
    /// The kept rotations (`None` when released or disabled).
    fn kept_rotations(&self) -> Result<std::sync::MutexGuard<'_, Option<Tensor>>> {
        self.rotations.lock().map_err(|_| Error::Internal("secrets lock poisoned".into()))
    }

    /// The layers' rotations, kept or to be drawn from `seed` one at a time.
    fn layer_rotations(&self, seed: [u8; 32]) -> Result<LayerRotations> {
        let kept = self.kept_rotations()?.clone();
        let seeds = if kept.is_none() { sub_seeds(seed, self.layers) } else { Vec::new() };
        Ok(LayerRotations { kept, seeds, d: self.hidden })
    }

    /// `P_i·R_i` for the projections `[T, w, d]` (input `i` of layer `i / summaries`), one layer at a time:
    /// with the kept rotations, or drawing each layer's from the seed. The result is written straight into one
    /// buffer (no per-layer copies to stack: the fold is one of the device's peaks).
    fn rotate_projections(&self, p: &Tensor) -> Result<Tensor> {
        let Some(seed) = self.seed else { return Ok(p.clone()) };
        let (t, w, d) = p.dims3()?;
        // A layer's summaries are adjacent: [T, w, d] is [L, s·w, d] without a copy.
        let per_layer = t / self.layers * w * d;
        let p = p.reshape((self.layers, t / self.layers * w, d))?;
        let rotations = self.layer_rotations(seed)?;
        let mut out = vec![0f32; t * w * d];
        for (l, slot) in out.chunks_exact_mut(per_layer).enumerate() {
            let r = rotations.layer(l)?;
            slot.copy_from_slice(&p.get(l)?.matmul(&r)?.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(Tensor::from_vec(out, (t, w, d), &Device::Cpu)?)
    }
}

/// Each layer's rotation in turn: the kept ones, or — released — drawn from the seed one layer at a time and
/// dropped after use. Drawing one after another: each draw holds ≈10 MB of f64 QR workspace, and running them in
/// parallel put that many times over on the device's peak at every round's end.
struct LayerRotations {
    kept: Option<Tensor>,
    seeds: Vec<[u8; 32]>,
    d: usize,
}

impl LayerRotations {
    /// Layer `l`'s rotation `[d, d]` in f32.
    fn layer(&self, l: usize) -> Result<Tensor> {
        Ok(match &self.kept {
            Some(r) => r.get(l)?.to_dtype(DType::F32)?,
            None => {
                let mut r = vec![f16::ZERO; self.d * self.d];
                draw_rotation_into(self.seeds[l], self.d, &mut r);
                Tensor::from_vec(r, (self.d, self.d), &Device::Cpu)?.to_dtype(DType::F32)?
            }
        })
    }
}

/// One sub-seed per matrix (the `layers` rotations, then Q) from the master stream, so the decompositions run in
/// parallel and the result does not depend on the number of threads.
fn sub_seeds(seed: [u8; 32], layers: usize) -> Vec<[u8; 32]> {
    let mut master = ChaCha20Rng::from_seed(seed);
    (0..=layers)
        .map(|_| {
            let mut s = [0u8; 32];
            master.fill_bytes(&mut s);
            s
        })
        .collect()
}

/// The rotations `[L, d, d]` (f16) of `seeds`, drawn in parallel, each written straight into its slot of one
/// buffer: no per-matrix copies to concatenate.
fn draw_rotations(seeds: &[[u8; 32]], d: usize) -> Result<Tensor> {
    let mut rotations = vec![f16::ZERO; seeds.len() * d * d];
    rotations.par_chunks_mut(d * d).zip(seeds).for_each(|(slot, s)| draw_rotation_into(*s, d, slot));
    Ok(Tensor::from_vec(rotations, (seeds.len(), d, d), &Device::Cpu)?)
}

/// One layer's rotation (≈60 ms at d = 576), rounded to f16 into `out`: kept or drawn again, the same values.
fn draw_rotation_into(seed: [u8; 32], d: usize, out: &mut [f16]) {
    let mut r = vec![0f32; d * d];
    random_orthogonal_into(&mut ChaCha20Rng::from_seed(seed), d, &mut r);
    out.iter_mut().zip(&r).for_each(|(o, &v)| *o = f16::from_f32(v));
}

/// A Haar-random n×n orthogonal matrix, written row-major into `out` (n² values).
fn random_orthogonal_into(rng: &mut ChaCha20Rng, n: usize, out: &mut [f32]) {
    let g = DMatrix::<f64>::from_fn(n, n, |_, _| StandardNormal.sample(rng));
    // `unpack` builds R in the decomposition's own storage: one n×n f64 matrix fewer at once.
    let (mut q, r) = g.qr().unpack();
    for j in 0..n {
        if r[(j, j)] < 0.0 {
            q.column_mut(j).neg_mut();
        }
    }
    for i in 0..n {
        for j in 0..n {
            out[i * n + j] = q[(i, j)] as f32;
        }
    }
}
