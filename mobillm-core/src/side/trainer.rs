//! Training the side network by backprop (what the assist server runs): candle `Var`s, AdamW (in place, `adamw`) or SGD, seeded
//! initial weights and per-epoch shuffling, one loss figure per epoch through a callback that may stop training.
//!
//! The learning rate is constant unless the trainer is told to anneal it over a job ([`SideTrainer::annealed`]):
//! a `pae` round ends at a learning rate near zero, so its network is not one noisy step away from where the
//! next step would have taken it (measured: `side-eval --runs 5` on UCI 92.5% [91.5–93.0] annealed, 92.0%
//! [90.8–93.3] constant; docs/side-network.md).

use std::collections::HashMap;
use std::ops::ControlFlow;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer as _, VarBuilder, VarMap};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use super::adamw::AdamW;
use super::config::{Optimizer, SideConfig, TrainConfig};
use super::network::{SideNet, DOWN, GATE_ALPHA, OUT, PROJ, UP};
use crate::error::{Error, Result};

/// What the network is fitted to, one row per sample.
#[derive(Debug, Clone)]
pub enum Objective {
    /// PAE mode: mean squared error to per-sample targets `[N, K']` (prediction differences, in the device's
    /// secret output coordinates).
    Regression { targets: Tensor },
    /// MobiLLM mode: cross-entropy of `prior + o[:, :K]` against labels `[N]` (u32), where `prior` `[N, K]` are
    /// the backbone's label logits.
    CrossEntropy { labels: Tensor, prior: Tensor },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochReport {
    /// 1-based.
    pub epoch: usize,
    pub epochs: usize,
    /// Mean training loss over the epoch's mini-batches.
    pub loss: f64,
    pub samples: usize,
}

enum Opt {
    AdamW(AdamW),
    Sgd(candle_nn::SGD),
}

pub struct SideTrainer {
    cfg: SideConfig,
    train: TrainConfig,
    varmap: VarMap,
    net: SideNet,
    opt: Opt,
    rng: ChaCha8Rng,
    /// The parameters' dtype; inputs of another float dtype (f16 caches) are converted batch by batch.
    dtype: DType,
    /// `(epochs already run, epochs in all)` of the job whose learning rate is annealed; `None`: constant.
    anneal: Option<(usize, usize)>,
}

impl SideTrainer {
    /// A fresh network: `P_i` and `W_down` Gaussian (scaled so unit-RMS inputs give unit-scale outputs), gates at
    /// α₀, `W_up` and `W_out` zero. Parameters are f32.
    pub fn new(cfg: &SideConfig, train: &TrainConfig) -> Result<Self> {
        Self::new_with_dtype(cfg, train, DType::F32)
    }

    /// As [`SideTrainer::new`] with another float dtype (f64 for gradient checks).
    pub fn new_with_dtype(cfg: &SideConfig, train: &TrainConfig, dtype: DType) -> Result<Self> {
        cfg.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(train.seed);
        let (t, d, w, r, k, e) = (cfg.taps, cfg.hidden, cfg.width, cfg.rank, cfg.outputs, cfg.members);
        let mut gaussian = |shape: &[usize], std: f64| -> Result<Tensor> {
            let n: usize = shape.iter().product();
            let v: Vec<f64> = (0..n).map(|_| StandardNormal.sample(&mut rng)).map(|x: f64| x * std).collect();
            Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?)
        };
        let init = vec![
            (PROJ, gaussian(&[t, e * w, d], 1.0 / (d as f64).sqrt())?),
            (GATE_ALPHA, (Tensor::ones(t * e, dtype, &Device::Cpu)? * cfg.alpha0 as f64)?),
            (DOWN, gaussian(&[t, e * r, w], 1.0 / (w as f64).sqrt())?),
            (UP, Tensor::zeros((t, e * w, r), dtype, &Device::Cpu)?),
            (OUT, Tensor::zeros((k, e * w), dtype, &Device::Cpu)?),
        ];
        Self::from_tensors(cfg, train, init)
    }

    /// Resumes training from saved parameters (e.g. after a server restart).
    pub fn from_tensors(cfg: &SideConfig, train: &TrainConfig, tensors: Vec<(&str, Tensor)>) -> Result<Self> {
        cfg.validate()?;
        train.validate()?;
        let varmap = VarMap::new();
        let mut vars = Vec::new();
        let dtype = tensors.first().map_or(DType::F32, |(_, t)| t.dtype());
        {
            let mut data = varmap.data().lock().expect("fresh VarMap");
            for (name, t) in tensors {
                let var = Var::from_tensor(&t)?;
                vars.push(var.clone());
                data.insert(name.to_string(), var);
            }
        }
        let net = SideNet::new(cfg, cfg.outputs, VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu))?;
        let opt = match train.optimizer {
            Optimizer::AdamW | Optimizer::EquivariantAdamW => {
                let params =
                    candle_nn::ParamsAdamW { lr: train.lr, weight_decay: train.weight_decay, ..Default::default() };
                let mut adamw = AdamW::new(vars, params)?;
                if train.optimizer == Optimizer::EquivariantAdamW {
                    // R_i turns the rows of P_i (its input axis), Q the columns of W_out (its output axis).
                    let data = varmap.data().lock().expect("VarMap");
                    for (name, axis) in [(PROJ, 2), (OUT, 0)] {
                        if let Some(var) = data.get(name) {
                            adamw.share_second_moment(var, axis)?;
                        }
                    }
                }
                Opt::AdamW(adamw)
            }
            Optimizer::Sgd => Opt::Sgd(candle_nn::SGD::new(vars, train.lr)?),
        };
        // Shuffling continues from a stream of its own, so resuming with the same seed does not replay epochs.
        let rng = ChaCha8Rng::seed_from_u64(train.seed ^ 0x5EED_5EED);
        Ok(Self { cfg: cfg.clone(), train: train.clone(), varmap, net, opt, rng, dtype, anneal: None })
    }

    /// Anneals the learning rate from `lr` to zero over a job of `total` epochs (half a cosine, step by step), of
    /// which `done` ran before this trainer (a job resumed from its checkpoint continues the schedule).
    pub fn annealed(mut self, done: usize, total: usize) -> Self {
        self.anneal = Some((done, total.max(1)));
        self
    }

    pub fn net(&self) -> &SideNet {
        &self.net
    }

    /// Current parameters, detached from the optimizer (what is saved or sent to the device).
    pub fn tensors(&self) -> Vec<(&'static str, Tensor)> {
        self.net.tensors().into_iter().map(|(n, t)| (n, t.detach())).collect()
    }

    /// All parameters as named `Var`s (for gradient checks).
    pub fn vars(&self) -> HashMap<String, Var> {
        self.varmap.data().lock().expect("VarMap lock").clone()
    }

    /// Loss of `objective` on rows `idx` of `x` (all rows when `None`), through the whole graph.
    pub fn loss(&self, x: &Tensor, objective: &Objective, idx: Option<&Tensor>) -> Result<Tensor> {
        let rows = match idx {
            Some(i) => x.index_select(i, 0)?,
            None => x.clone(),
        };
        let u = self.net.project(&self.net.layer_major(&rows.to_dtype(self.dtype)?)?)?;
        self.objective_loss(&self.net.forward_members(&u)?, objective, idx)
    }

    /// Loss and gradients of the mini-batch `chunk` (sample indices into `x`), as one optimiser step takes them.
    /// The projections `u = x·Pᵀ` run once for the whole mini-batch, without a graph; the rest of the network runs
    /// forward and backward [`MICRO_BATCH`] samples at a time, each pass's loss weighted by its share, so a pass's
    /// graph and gradients stay small whatever the mini-batch; and the projections' gradient is computed by hand
    /// at the end, `dP_i = (∂L/∂u_i)ᵀ · x_i`, in one product over the mini-batch. Autograd through `u = x·Pᵀ`
    /// would also compute the inputs' gradient, which nothing uses, and hold it with copies of `Pᵀ` until the step
    /// (measured on a `local` fine-tune, peak RSS: 287 MB through autograd, 270 MB by hand, 248 MB with the passes).
    pub fn batch_grads<X: TrainingInputs + ?Sized>(
        &self,
        x: &X,
        objective: &Objective,
        chunk: &[u32],
    ) -> Result<(f64, GradStore)> {
        let b = chunk.len();
        let idx = Tensor::from_slice(chunk, b, &Device::Cpu)?;
        let x = self.net.layer_major(&x.rows(chunk)?.to_dtype(self.dtype)?)?;
        let u = self.net.project(&x)?.detach();
        let (mut total, mut grads, mut du) = (0.0, None::<GradStore>, Vec::new());
        for start in (0..b).step_by(MICRO_BATCH) {
            let len = MICRO_BATCH.min(b - start);
            let u_pass = Var::from_tensor(&u.narrow(1, start, len)?)?;
            let o = self.net.forward_members(u_pass.as_tensor())?;
            let share = len as f64 / b as f64;
            let loss = (self.objective_loss(&o, objective, Some(&idx.narrow(0, start, len)?))? * share)?;
            total += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let mut pass = loss.backward()?;
            let missing = || Error::Internal("no gradient reached the projections".into());
            du.push(pass.remove(u_pass.as_tensor()).ok_or_else(missing)?);
            grads = Some(match grads {
                None => pass,
                Some(mut sum) => {
                    for (_, p) in self.net.tensors() {
                        if let Some(g) = pass.get(&p) {
                            let added = match sum.get(&p) {
                                Some(s) => (s + g)?,
                                None => g.clone(),
                            };
                            sum.insert(&p, added);
                        }
                    }
                    sum
                }
            });
        }
        let mut grads = grads.ok_or_else(|| Error::Internal("an empty mini-batch".into()))?;
        let du = Tensor::cat(&du, 1)?;
        grads.insert(self.net.projections(), du.transpose(1, 2)?.contiguous()?.matmul(&x)?);
        Ok((total, grads))
    }

    /// `objective` on the members' outputs `o: [E, B, K']` of samples `idx` (all when `None`): the mean of the
    /// members' losses, so each member is trained as if alone.
    fn objective_loss(&self, o: &Tensor, objective: &Objective, idx: Option<&Tensor>) -> Result<Tensor> {
        let pick = |t: &Tensor| -> Result<Tensor> {
            Ok(match idx {
                Some(i) => t.index_select(i, 0)?,
                None => t.clone(),
            })
        };
        let (e, b, _) = o.dims3()?;
        Ok(match objective {
            Objective::Regression { targets } => {
                candle_nn::loss::mse(o, &pick(targets)?.unsqueeze(0)?.broadcast_as(o.shape())?)?
            }
            Objective::CrossEntropy { labels, prior } => {
                let logits = o.narrow(2, 0, self.cfg.labels)?.broadcast_add(&pick(prior)?.unsqueeze(0)?)?;
                let labels = pick(labels)?.unsqueeze(0)?.broadcast_as((e, b))?.contiguous()?.flatten_all()?;
                candle_nn::loss::cross_entropy(&logits.reshape((e * b, self.cfg.labels))?, &labels)?
            }
        })
    }

    /// Trains for `epochs` epochs over `x: [N, T, d]` (a tensor of any float dtype — a cache may keep it as f16
    /// — or int8 rows; each mini-batch is decoded on its own), validating the data once. `on_epoch` sees each epoch's mean
    /// loss and the network as it stands after that epoch (to checkpoint it), and may stop early.
    /// Returns the reports of the epochs run.
    pub fn fit<X: TrainingInputs + ?Sized>(
        &mut self,
        x: &X,
        objective: &Objective,
        epochs: usize,
        mut on_epoch: impl FnMut(&EpochReport, &SideNet) -> ControlFlow<()>,
    ) -> Result<Vec<EpochReport>> {
        let n = check_training_data(&self.cfg, x, objective)?;
        let mut order: Vec<u32> = (0..n as u32).collect();
        let mut reports = Vec::with_capacity(epochs);
        let steps_per_epoch = n.div_ceil(self.train.batch_size);
        let mut step = self.anneal.map_or(0, |(done, _)| done * steps_per_epoch);
        for epoch in 1..=epochs {
            order.shuffle(&mut self.rng);
            let (mut total, mut batches) = (0.0f64, 0usize);
            for chunk in order.chunks(self.train.batch_size) {
                let (value, grads) = self.batch_grads(x, objective, chunk)?;
                if !value.is_finite() {
                    return Err(Error::InvalidInput(format!("training diverged: loss {value} in epoch {epoch}")));
                }
                if let Some((_, job_epochs)) = self.anneal {
                    let progress = (step as f64 / (job_epochs * steps_per_epoch) as f64).min(1.0);
                    let lr = self.train.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                    match &mut self.opt {
                        Opt::AdamW(o) => o.set_learning_rate(lr),
                        Opt::Sgd(o) => o.set_learning_rate(lr),
                    }
                }
                step += 1;
                match &mut self.opt {
                    Opt::AdamW(o) => o.step(&grads)?,
                    Opt::Sgd(o) => o.step(&grads)?,
                }
                total += value;
                batches += 1;
            }
            let report = EpochReport { epoch, epochs, loss: total / batches as f64, samples: n };
            reports.push(report);
            if on_epoch(&report, &self.net).is_break() {
                break;
            }
        }
        Ok(reports)
    }

    /// Outputs `[N, K']` for `x: [N, T, d]`, in batches, without building a graph.
    pub fn outputs(&self, x: &Tensor) -> Result<Tensor> {
        outputs_in_batches(&self.net, x, OUTPUT_BATCH)
    }

    /// The parameters' dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

/// Samples per forward-and-backward pass through the network after its projections ([`SideTrainer::batch_grads`]).
pub const MICRO_BATCH: usize = 32;

/// Rows per forward batch when outputs are computed without gradients (server outputs, device predictions).
pub const OUTPUT_BATCH: usize = 256;

pub fn outputs_in_batches(net: &SideNet, x: &Tensor, batch: usize) -> Result<Tensor> {
    let n = x.dim(0)?;
    if n == 0 {
        return Err(Error::InvalidInput("no samples".into()));
    }
    let mut parts = Vec::with_capacity(n.div_ceil(batch));
    for start in (0..n).step_by(batch) {
        let rows = x.narrow(0, start, batch.min(n - start))?.to_dtype(net.dtype())?;
        parts.push(net.forward(&rows)?.detach());
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// What a network trains on: `[N, T, d]` samples, drawn a mini-batch at a time.
pub trait TrainingInputs {
    fn dims(&self) -> Vec<usize>;
    /// Rows `idx` as a float tensor `[B, T, d]`.
    fn rows(&self, idx: &[u32]) -> Result<Tensor>;
    fn check_finite(&self) -> Result<()>;
}

impl TrainingInputs for Tensor {
    fn dims(&self) -> Vec<usize> {
        Tensor::dims(self).to_vec()
    }

    fn rows(&self, idx: &[u32]) -> Result<Tensor> {
        Ok(self.index_select(&Tensor::from_slice(idx, idx.len(), self.device())?, 0)?)
    }

    fn check_finite(&self) -> Result<()> {
        check_finite(self, "activations")
    }
}

/// Checks shapes and finiteness of a training set; returns the number of samples.
pub fn check_training_data<X: TrainingInputs + ?Sized>(
    cfg: &SideConfig,
    x: &X,
    objective: &Objective,
) -> Result<usize> {
    let bad = |m: String| Err(Error::InvalidInput(m));
    let dims = x.dims();
    if dims.len() != 3 || dims[1] != cfg.taps || dims[2] != cfg.hidden {
        return bad(format!("activations have shape {dims:?}, expected [N, {}, {}]", cfg.taps, cfg.hidden));
    }
    let n = dims[0];
    if n == 0 {
        return bad("no training samples".into());
    }
    x.check_finite()?;
    match objective {
        Objective::Regression { targets } => {
            if targets.dims() != [n, cfg.outputs] {
                return bad(format!("targets have shape {:?}, expected [{n}, {}]", targets.dims(), cfg.outputs));
            }
            check_finite(targets, "targets")?;
        }
        Objective::CrossEntropy { labels, prior } => {
            if labels.dims() != [n] || labels.dtype() != DType::U32 {
                return bad(format!("labels must be [{n}] u32, got {:?} {:?}", labels.dims(), labels.dtype()));
            }
            if prior.dims() != [n, cfg.labels] {
                return bad(format!("prior logits have shape {:?}, expected [{n}, {}]", prior.dims(), cfg.labels));
            }
            check_finite(prior, "prior logits")?;
            let max = labels.max(0)?.to_scalar::<u32>()?;
            if max as usize >= cfg.labels {
                return bad(format!("label {max} is out of range for {} labels", cfg.labels));
            }
        }
    }
    Ok(n)
}

pub fn check_finite(t: &Tensor, what: &str) -> Result<()> {
    let sum = t.abs()?.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    if !sum.is_finite() {
        return Err(Error::InvalidInput(format!("{what} contain NaN or infinite values")));
    }
    Ok(())
}
