//! AdamW that updates each parameter and its moments in place, in one pass. The rule is candle-nn's `AdamW`
//! (decoupled weight decay, bias-corrected moments, the same β₁, β₂ and ε), but candle-nn builds every update out
//! of about ten whole-parameter temporary tensors: for the side network's 2.2 M projection weights that is
//! ~100 MB allocated and freed on every step, which a `local` fine-tune measured as the device's RSS swinging
//! 236 → 371 MB at each step. Here the only memory beyond the parameters is the two moments.
//!
//! A parameter's second moment can also be shared along one axis ([`AdamW::share_second_moment`]): for `pae`
//! sessions (`Optimizer::EquivariantAdamW`) the trainer shares it along the axes the device's secret rotations act
//! on, so that a step is equivariant to them.

use std::cell::RefCell;

use candle_core::{backprop::GradStore, CpuStorage, InplaceOp2, Layout, Var, WithDType};
use candle_nn::ParamsAdamW;

use crate::error::{Error, Result};

/// The first and second moments of one parameter, in its dtype.
enum Moments {
    F32(Vec<f32>, Vec<f32>),
    F64(Vec<f64>, Vec<f64>),
}

/// A second moment shared along one axis of a parameter: one value per slice, the mean of g² over the axis's
/// `len` entries (`inner` is the stride of the axis). An orthogonal change of basis along that axis leaves the
/// shared value as it is and turns the update by the same change of basis, so training is equivariant to it.
#[derive(Clone, Copy)]
struct Shared {
    len: usize,
    inner: usize,
}

impl Shared {
    fn slot(self, i: usize) -> usize {
        (i / (self.len * self.inner)) * self.inner + i % self.inner
    }
}

pub struct AdamW {
    vars: Vec<(Var, Moments, Option<Shared>)>,
    params: ParamsAdamW,
    step_t: i32,
}

impl AdamW {
    /// Optimises `vars` (f32 or f64) with `params`.
    pub fn new(vars: Vec<Var>, params: ParamsAdamW) -> Result<Self> {
        let vars = vars
            .into_iter()
            .map(|var| {
                let n = var.elem_count();
                let moments = match var.dtype() {
                    candle_core::DType::F32 => Moments::F32(vec![0.0; n], vec![0.0; n]),
                    candle_core::DType::F64 => Moments::F64(vec![0.0; n], vec![0.0; n]),
                    other => return Err(Error::Internal(format!("AdamW on a {other:?} parameter"))),
                };
                Ok((var, moments, None))
            })
            .collect::<Result<_>>()?;
        Ok(Self { vars, params, step_t: 0 })
    }

    /// Keeps `var`'s second moment shared along `axis` (see [`Shared`]) instead of per element.
    pub fn share_second_moment(&mut self, var: &Var, axis: usize) -> Result<()> {
        let Some((v, moments, shared)) =
            self.vars.iter_mut().find(|(v, ..)| v.as_tensor().id() == var.as_tensor().id())
        else {
            return Err(Error::Internal("AdamW: sharing the second moment of a parameter it does not hold".into()));
        };
        let dims = v.dims();
        let Some(&len) = dims.get(axis) else {
            return Err(Error::Internal(format!("AdamW: axis {axis} of a parameter of shape {dims:?}")));
        };
        let s = Shared { len, inner: dims[axis + 1..].iter().product() };
        let slots = v.elem_count() / len.max(1);
        match moments {
            Moments::F32(_, second) => *second = vec![0.0; slots],
            Moments::F64(_, second) => *second = vec![0.0; slots],
        }
        *shared = Some(s);
        Ok(())
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    /// One step from `grads`; parameters without a gradient are left as they are.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_t += 1;
        let p = &self.params;
        let rule = Rule {
            lr: p.lr,
            decay: 1.0 - p.lr * p.weight_decay,
            beta1: p.beta1,
            beta2: p.beta2,
            eps: p.eps,
            scale_m: 1.0 / (1.0 - p.beta1.powi(self.step_t)),
            scale_v: 1.0 / (1.0 - p.beta2.powi(self.step_t)),
        };
        for (var, moments, shared) in &mut self.vars {
            if let Some(g) = grads.get(var) {
                let update = Update { rule, shared: *shared, moments: RefCell::new(moments) };
                var.as_tensor().inplace_op2(&g.contiguous()?, &update)?;
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
struct Rule {
    lr: f64,
    decay: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    scale_m: f64,
    scale_v: f64,
}

impl Rule {
    fn apply<T: WithDType>(&self, theta: &mut [T], g: &[T], m: &mut [T], v: &mut [T], shared: Option<Shared>) {
        if let Some(s) = shared {
            return self.apply_shared(theta, g, m, v, s);
        }
        for (((theta, g), m), v) in theta.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let g = g.to_f64();
            let next_m = m.to_f64() * self.beta1 + g * (1.0 - self.beta1);
            let next_v = v.to_f64() * self.beta2 + g * g * (1.0 - self.beta2);
            let step = (next_m * self.scale_m) / ((next_v * self.scale_v).sqrt() + self.eps);
            *theta = T::from_f64(theta.to_f64() * self.decay - step * self.lr);
            *m = T::from_f64(next_m);
            *v = T::from_f64(next_v);
        }
    }

    /// Adam's rule with the second moment of slot `s.slot(i)` for element `i`.
    fn apply_shared<T: WithDType>(&self, theta: &mut [T], g: &[T], m: &mut [T], v: &mut [T], s: Shared) {
        for v in v.iter_mut() {
            *v = T::from_f64(v.to_f64() * self.beta2);
        }
        let weight = (1.0 - self.beta2) / s.len as f64;
        for (i, g) in g.iter().enumerate() {
            let g = g.to_f64();
            let v = &mut v[s.slot(i)];
            *v = T::from_f64(v.to_f64() + weight * g * g);
        }
        for (i, ((theta, g), m)) in theta.iter_mut().zip(g).zip(m.iter_mut()).enumerate() {
            let next_m = m.to_f64() * self.beta1 + g.to_f64() * (1.0 - self.beta1);
            let step = (next_m * self.scale_m) / ((v[s.slot(i)].to_f64() * self.scale_v).sqrt() + self.eps);
            *theta = T::from_f64(theta.to_f64() * self.decay - step * self.lr);
            *m = T::from_f64(next_m);
        }
    }
}

/// One parameter's update: the parameter is written in place, its moments beside it.
struct Update<'a> {
    rule: Rule,
    shared: Option<Shared>,
    moments: RefCell<&'a mut Moments>,
}

impl InplaceOp2 for Update<'_> {
    fn name(&self) -> &'static str {
        "adamw-in-place"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let (Some((a, b)), Some((c, d))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("adamw: a parameter or its gradient is not contiguous");
        };
        let mut moments = self.moments.borrow_mut();
        match (s1, s2, &mut **moments) {
            (CpuStorage::F32(theta), CpuStorage::F32(g), Moments::F32(m, v)) => {
                self.rule.apply(&mut theta[a..b], &g[c..d], m, v, self.shared)
            }
            (CpuStorage::F64(theta), CpuStorage::F64(g), Moments::F64(m, v)) => {
                self.rule.apply(&mut theta[a..b], &g[c..d], m, v, self.shared)
            }
            _ => candle_core::bail!("adamw: a parameter, its gradient and its moments differ in dtype"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};
    use candle_nn::Optimizer as _;

    use super::*;

    /// Ten steps on a quadratic with candle-nn's AdamW and this one from the same start end at the same point.
    #[test]
    fn steps_as_candle_nn_adamw_does() {
        let start = Tensor::randn(0f32, 1.0, (3, 5), &Device::Cpu).unwrap();
        let target = Tensor::randn(0f32, 1.0, (3, 5), &Device::Cpu).unwrap();
        let params = ParamsAdamW { lr: 0.05, weight_decay: 0.1, ..Default::default() };
        let (ours_var, theirs_var) = (Var::from_tensor(&start).unwrap(), Var::from_tensor(&start).unwrap());
        let mut ours = AdamW::new(vec![ours_var.clone()], params.clone()).unwrap();
        let mut theirs = candle_nn::AdamW::new(vec![theirs_var.clone()], params).unwrap();
        let loss = |v: &Var| (v.as_tensor() - &target).unwrap().sqr().unwrap().sum_all().unwrap();
        for step in 0..10 {
            if step == 5 {
                ours.set_learning_rate(0.01);
                theirs.set_learning_rate(0.01);
            }
            ours.step(&loss(&ours_var).backward().unwrap()).unwrap();
            theirs.step(&loss(&theirs_var).backward().unwrap()).unwrap();
        }
        let diff = (ours_var.as_tensor() - theirs_var.as_tensor()).unwrap().abs().unwrap();
        let moved = (ours_var.as_tensor() - &start).unwrap().abs().unwrap().max_all().unwrap();
        assert!(moved.to_scalar::<f32>().unwrap() > 0.1, "the steps moved the parameters");
        assert!(diff.max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-5);
    }

    /// With the second moment shared along the input axis, ten steps of least squares on inputs `X·R` from `θ·R`
    /// end at the image `θ_end·R` of the plain run's end (R a rotation of two coordinate planes); per element they
    /// do not, since Adam's per-coordinate scaling depends on the basis.
    #[test]
    fn a_shared_second_moment_steps_equivariantly_to_rotations() {
        let dev = &Device::Cpu;
        let (c, s) = (0.6f64.cos(), 0.6f64.sin());
        let r = Tensor::new(&[[c, -s, 0.0, 0.0], [s, c, 0.0, 0.0], [0.0, 0.0, c, s], [0.0, 0.0, -s, c]], dev).unwrap();
        // Fixed, irregular values (no unseeded draws), so the test is the same every run.
        let fill = |rows: usize, cols: usize, phase: f64| {
            let v: Vec<f64> =
                (0..rows * cols).map(|i| (1.7 * i as f64 + phase).sin() * (1.0 + (i % 3) as f64)).collect();
            Tensor::from_vec(v, (rows, cols), dev).unwrap()
        };
        let (x, y, start) = (fill(8, 4, 0.3), fill(8, 3, 1.1), fill(3, 4, 2.9));
        let loss = |x: &Tensor, theta: &Var| {
            (x.matmul(&theta.as_tensor().t().unwrap()).unwrap() - &y).unwrap().sqr().unwrap().sum_all().unwrap()
        };
        let run = |x: &Tensor, start: &Tensor, shared: bool| {
            let theta = Var::from_tensor(start).unwrap();
            let mut opt = AdamW::new(vec![theta.clone()], ParamsAdamW { lr: 0.05, ..Default::default() }).unwrap();
            if shared {
                opt.share_second_moment(&theta, 1).unwrap();
            }
            for _ in 0..10 {
                opt.step(&loss(x, &theta).backward().unwrap()).unwrap();
            }
            theta.as_tensor().clone()
        };
        let gap = |shared: bool| {
            let plain = run(&x, &start, shared);
            let rotated = run(&x.matmul(&r).unwrap(), &start.matmul(&r).unwrap(), shared);
            assert!((&plain - &start).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap() > 0.1);
            let image = plain.matmul(&r).unwrap();
            (rotated - image).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
        };
        // The first step is lr · g / rms(g over its row): Adam's first step with the row's mean square as v.
        let theta = Var::from_tensor(&start).unwrap();
        let params = ParamsAdamW { lr: 0.05, weight_decay: 0.0, ..Default::default() };
        let mut opt = AdamW::new(vec![theta.clone()], params).unwrap();
        opt.share_second_moment(&theta, 1).unwrap();
        let grads = loss(&x, &theta).backward().unwrap();
        let g = grads.get(&theta).unwrap().clone();
        let rms = g.sqr().unwrap().mean_keepdim(1).unwrap().sqrt().unwrap();
        let want = (&start - (g.broadcast_div(&rms).unwrap() * 0.05).unwrap()).unwrap();
        opt.step(&grads).unwrap();
        let off = (theta.as_tensor() - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(off < 1e-9, "first shared step off by {off}");
        assert!(gap(true) < 1e-12, "shared: {}", gap(true));
        assert!(gap(false) > 1e-3, "per element: {}", gap(false));
    }
}
