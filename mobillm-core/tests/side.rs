//! The side network's math on synthetic activations (no model needed): zero start, pivot-only equivalence,
//! gradients, rotation equivariance, secrets folding, adapter files and typed errors.

mod common;

use std::ops::ControlFlow;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, Rng};
use mobillm_core::side::network::{DOWN, GATE_ALPHA, OUT, PROJ, UP};
use mobillm_core::side::targets::{predict, prediction_differences};
use mobillm_core::side::whitening;
use mobillm_core::side::{
    normalize_taps, DeviceAdapter, Objective, Optimizer, Secrets, SideConfig, SideNet, SideTrainer, Summary,
    TrainConfig, Whitening,
};
use mobillm_core::{Error, TaskSpec};

const T: usize = 4;
const D: usize = 24;
const K: usize = 3;

fn cfg() -> SideConfig {
    SideConfig { width: 16, rank: 4, ..SideConfig::new(T, D, K) }
}

fn gaussian(rng: &mut Rng, shape: &[usize], dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    // Sum of uniforms: close enough to Gaussian for test data.
    let v: Vec<f32> = (0..n).map(|_| (0..4).map(|_| rng.unit()).sum::<f32>() * 0.87).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

/// A separable synthetic task: labels are the argmax of fixed linear read-outs of the last two layers.
struct Synthetic {
    x: Tensor,
    z_b: Tensor,
    labels: Vec<u32>,
}

fn synthetic(seed: u64, n: usize) -> Synthetic {
    let mut rng = Rng::new(seed);
    let x = normalize_taps(&gaussian(&mut rng, &[n, T, D], DType::F32)).unwrap();
    let mut teacher = Rng::new(4242);
    let v = gaussian(&mut teacher, &[K, 2 * D], DType::F32);
    let feats = x.narrow(1, T - 2, 2).unwrap().reshape((n, 2 * D)).unwrap();
    let scores = feats.matmul(&v.t().unwrap()).unwrap();
    let labels = scores.argmax(1).unwrap().to_vec1::<u32>().unwrap();
    // The "backbone" knows a little: a noisy, shrunken copy of the teacher's scores.
    let noise = gaussian(&mut rng, &[n, K], DType::F32);
    let z_b = ((scores * 0.15).unwrap() + noise).unwrap();
    Synthetic { x, z_b, labels }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()
}

fn random_params(seed: u64, dtype: DType, out_rows: usize) -> Vec<(&'static str, Tensor)> {
    let c = cfg();
    let (w, r, e) = (c.width, c.rank, c.members);
    let mut rng = Rng::new(seed);
    let mut g = |shape: &[usize], s: f64| (gaussian(&mut rng, shape, dtype) * s).unwrap();
    vec![
        (PROJ, g(&[T, e * w, D], 0.2)),
        (GATE_ALPHA, g(&[T * e], 0.5)),
        (DOWN, g(&[T, e * r, w], 0.25)),
        (UP, g(&[T, e * w, r], 0.25)),
        (OUT, g(&[out_rows, e * w], 0.25)),
    ]
}

#[test]
fn a_fresh_side_network_changes_nothing() {
    let c = cfg();
    let data = synthetic(1, 40);
    let trainer = SideTrainer::new(&c, &TrainConfig::default()).unwrap();
    let o = trainer.outputs(&data.x).unwrap();
    assert_eq!(o.dims(), &[40, c.outputs]);
    assert!(flat(&o).iter().all(|&v| v == 0.0), "W_up and W_out start at zero");
    let secrets = Secrets::from_seed(&c, [7; 32]).unwrap();
    let dec = secrets.decode_outputs(&o).unwrap();
    assert_eq!(predict(&data.z_b, Some(&dec)).unwrap(), predict(&data.z_b, None).unwrap());
    let folded = secrets.fold(trainer.net()).unwrap();
    assert!(flat(&folded.forward(&data.x).unwrap()).iter().all(|&v| v == 0.0));
}

/// Members are whole networks side by side: a network of two members runs as the mean of the two networks it
/// stacks, each member's output is its network's, and folding the secrets into the stack folds them into each.
#[test]
fn members_are_networks_side_by_side_used_through_their_mean() {
    let two = SideConfig { members: 2, ..cfg() };
    let one = SideConfig { members: 1, ..two.clone() };
    let params = |seed: u64| -> Vec<(&'static str, Tensor)> {
        let (w, r, o) = (one.width, one.rank, one.outputs);
        let mut rng = Rng::new(seed);
        let mut g = |shape: &[usize]| (gaussian(&mut rng, shape, DType::F32) * 0.25).unwrap();
        vec![
            (PROJ, g(&[T, w, D])),
            (GATE_ALPHA, g(&[T])),
            (DOWN, g(&[T, r, w])),
            (UP, g(&[T, w, r])),
            (OUT, g(&[o, w])),
        ]
    };
    let (a, b) = (params(71), params(72));
    let stacked: Vec<(&str, Tensor)> = a
        .iter()
        .zip(&b)
        .map(|((name, x), (_, y))| match *name {
            // [T·E], layer-major.
            GATE_ALPHA => (*name, Tensor::stack(&[x, y], 1).unwrap().flatten_all().unwrap()),
            _ => (*name, Tensor::cat(&[x, y], 1).unwrap()),
        })
        .collect();
    let (net_a, net_b) = (SideNet::from_tensors(&one, &a).unwrap(), SideNet::from_tensors(&one, &b).unwrap());
    let net = SideNet::from_tensors(&two, &stacked).unwrap();
    assert!(SideNet::from_tensors(&one, &stacked).is_err(), "a stack is not one network");
    let x = synthetic(73, 30).x;
    let (oa, ob) = (net_a.forward(&x).unwrap(), net_b.forward(&x).unwrap());
    let mean = ((&oa + &ob).unwrap() / 2.0).unwrap();
    assert_close(&flat(&net.forward(&x).unwrap()), &flat(&mean), 1e-5, "the mean of the members");
    let members = net.forward_members(&net.project(&net.layer_major(&x).unwrap()).unwrap()).unwrap();
    assert_eq!(members.dims(), &[2, 30, one.outputs]);
    assert_close(&flat(&members.get(0).unwrap()), &flat(&oa), 1e-5, "member 0");
    assert_close(&flat(&members.get(1).unwrap()), &flat(&ob), 1e-5, "member 1");
    assert!(flat(&oa).iter().zip(flat(&ob)).any(|(p, q)| (p - q).abs() > 1e-3), "members differ");

    let secrets = Secrets::from_seed(&two, [8; 32]).unwrap();
    let folded = secrets.fold(&net).unwrap();
    let folded_mean = ((secrets.fold(&net_a).unwrap().forward(&x).unwrap()
        + secrets.fold(&net_b).unwrap().forward(&x).unwrap())
    .unwrap()
        / 2.0)
        .unwrap();
    assert_close(&flat(&folded.forward(&x).unwrap()), &flat(&folded_mean), 1e-4, "folded member by member");
}

/// The side network is token-wise: running it on every token and keeping the pivot's output gives the loss and
/// gradients of running it on the pivot alone.
#[test]
fn pivot_only_training_equals_all_tokens_then_pivot() {
    let c = cfg();
    let (b, len) = (5, 7);
    let mut rng = Rng::new(3);
    let all_tokens = normalize_taps(&gaussian(&mut rng, &[b, len, T, D], DType::F32)).unwrap();
    let pivots: Vec<u32> = (0..b).map(|_| rng.below(len) as u32).collect();
    let targets = gaussian(&mut rng, &[b, c.outputs], DType::F32);
    let trainer =
        SideTrainer::from_tensors(&c, &TrainConfig::default(), random_params(5, DType::F32, c.outputs)).unwrap();

    let pivot_rows: Vec<u32> = pivots.iter().enumerate().map(|(i, &p)| (i * len) as u32 + p).collect();
    let pivot_idx = Tensor::new(pivot_rows.as_slice(), &Device::Cpu).unwrap();
    let flat_tokens = all_tokens.reshape((b * len, T, D)).unwrap();

    // Each member's outputs `[E, B·len, K']`, kept at the pivots: the training loss is the members' mean loss.
    let net = trainer.net();
    let members = net.forward_members(&net.project(&net.layer_major(&flat_tokens).unwrap()).unwrap()).unwrap();
    let o_all = members.index_select(&pivot_idx, 1).unwrap();
    let loss_all =
        candle_nn::loss::mse(&o_all, &targets.unsqueeze(0).unwrap().broadcast_as(o_all.shape()).unwrap()).unwrap();
    let x_pivot = flat_tokens.index_select(&pivot_idx, 0).unwrap();
    let loss_pivot = trainer.loss(&x_pivot, &Objective::Regression { targets: targets.clone() }, None).unwrap();

    let (la, lp) = (loss_all.to_scalar::<f32>().unwrap(), loss_pivot.to_scalar::<f32>().unwrap());
    assert!((la - lp).abs() <= 1e-6 * la.abs().max(1.0), "{la} vs {lp}");
    let (ga, gp) = (loss_all.backward().unwrap(), loss_pivot.backward().unwrap());
    for (name, var) in trainer.vars() {
        let (a, p) = (ga.get(&var).unwrap(), gp.get(&var).unwrap());
        assert_close(&flat(a), &flat(p), 1e-5, &name);
    }
}

#[test]
fn gradients_match_finite_differences() {
    let c = cfg();
    let mut rng = Rng::new(11);
    let n = 6;
    let x = normalize_taps(&gaussian(&mut rng, &[n, T, D], DType::F64)).unwrap();
    let objectives = [
        Objective::Regression { targets: gaussian(&mut rng, &[n, c.outputs], DType::F64) },
        Objective::CrossEntropy {
            labels: Tensor::new(&[0u32, 2, 1, 1, 0, 2], &Device::Cpu).unwrap(),
            prior: gaussian(&mut rng, &[n, K], DType::F64),
        },
    ];
    for objective in &objectives {
        let trainer =
            SideTrainer::from_tensors(&c, &TrainConfig::default(), random_params(13, DType::F64, c.outputs)).unwrap();
        let loss = |t: &SideTrainer| t.loss(&x, objective, None).unwrap().to_scalar::<f64>().unwrap();
        let grads = trainer.loss(&x, objective, None).unwrap().backward().unwrap();
        // What training steps on: the projections' gradient computed by hand, in a mini-batch's sample order.
        let (batch_loss, batch) = trainer.batch_grads(&x, objective, &[3, 0, 5, 1, 4, 2]).unwrap();
        assert!((batch_loss - loss(&trainer)).abs() < 1e-12);
        let eps = 1e-6;
        for (name, var) in trainer.vars() {
            let g = grads.get(&var).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let b = batch.get(&var).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            assert_close(
                &b.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                &g.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                1e-6,
                &name,
            );
            let base = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for probe in 0..4 {
                let j = (probe * 7919 + name.len()) % base.len();
                let at = |delta: f64| {
                    let mut v = base.clone();
                    v[j] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
                    loss(&trainer)
                };
                let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
                assert!(
                    (numeric - g[j]).abs() <= 1e-6 + 1e-4 * numeric.abs().max(g[j].abs()),
                    "{name}[{j}]: finite difference {numeric} vs autograd {}",
                    g[j]
                );
            }
        }
    }
}

/// A mini-batch larger than a micro-batch is stepped on as one: the micro-batches' gradients, weighted by their
/// shares, sum to the whole mini-batch's.
#[test]
fn a_mini_batch_of_several_micro_batches_takes_one_whole_step() {
    let c = cfg();
    let n = 2 * mobillm_core::side::trainer::MICRO_BATCH + 22;
    let mut rng = Rng::new(31);
    let x = normalize_taps(&gaussian(&mut rng, &[n, T, D], DType::F64)).unwrap();
    let labels: Vec<u32> = (0..n as u32).map(|i| i % K as u32).collect();
    let objective = Objective::CrossEntropy {
        labels: Tensor::new(labels.as_slice(), &Device::Cpu).unwrap(),
        prior: gaussian(&mut rng, &[n, K], DType::F64),
    };
    let tc = TrainConfig { optimizer: Optimizer::Sgd, lr: 0.3, batch_size: n, ..Default::default() };
    let mut trainer = SideTrainer::from_tensors(&c, &tc, random_params(33, DType::F64, c.outputs)).unwrap();
    let before: Vec<(String, Vec<f32>)> =
        trainer.vars().into_iter().map(|(name, v)| (name, flat(v.as_tensor()))).collect();
    let whole = trainer.loss(&x, &objective, None).unwrap().backward().unwrap();
    let expected: Vec<(String, Vec<f32>)> = trainer
        .vars()
        .into_iter()
        .map(|(name, v)| {
            let step = (v.as_tensor() - (whole.get(&v).unwrap() * 0.3).unwrap()).unwrap();
            (name, flat(&step))
        })
        .collect();
    let reports = trainer.fit(&x, &objective, 1, |_, _| ControlFlow::Continue(())).unwrap();
    assert_eq!(reports.len(), 1);
    for (name, want) in expected {
        let got = flat(trainer.vars()[&name].as_tensor());
        assert_close(&got, &want, 1e-6, &name);
        let was = &before.iter().find(|(n, _)| *n == name).unwrap().1;
        assert!(got.iter().zip(was).any(|(a, b)| (a - b).abs() > 1e-4), "{name} moved");
    }
}

fn sgd(epochs: usize) -> TrainConfig {
    TrainConfig { optimizer: Optimizer::Sgd, lr: 0.5, batch_size: 8, epochs, seed: 17, ..Default::default() }
}

/// Trains a plain network on `â_i` and `[Δ; 0]`, and one on `R_i·â_i` and `Q·[Δ; 0]` initialised as the rotated
/// image of the plain one (`P' = P·Rᵀ`; `W_out` is zero either way), both with `tc`, and asserts that the two
/// runs' epoch losses and the plain outputs and the folded rotated outputs agree.
fn assert_rotated_training_equals_plain(tc: &TrainConfig, name: &str) {
    let c = cfg();
    let data = synthetic(21, 64);
    let delta = prediction_differences(&data.z_b, None, &data.labels, 4.0).unwrap();
    let plain_secrets = Secrets::disabled(&c).unwrap();
    let secrets = Secrets::from_seed(&c, [9; 32]).unwrap();
    assert!(secrets.is_enabled() && !plain_secrets.is_enabled());

    let mut plain = SideTrainer::new(&c, tc).unwrap();
    let rotated_init: Vec<(&str, Tensor)> = plain
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            if n == PROJ {
                let r = secrets_rotations(&secrets, &c);
                (n, t.matmul(&r.transpose(1, 2).unwrap()).unwrap())
            } else {
                (n, t)
            }
        })
        .collect();
    let mut rotated = SideTrainer::from_tensors(&c, tc, rotated_init).unwrap();

    let plain_obj = Objective::Regression { targets: plain_secrets.encode_targets(&delta).unwrap() };
    let rot_obj = Objective::Regression { targets: secrets.encode_targets(&delta).unwrap() };
    let rot_x = secrets.rotate_activations(&data.x).unwrap();
    assert!(flat(&rot_x) != flat(&data.x));
    let lp = plain.fit(&data.x, &plain_obj, tc.epochs, |_, _| ControlFlow::Continue(())).unwrap();
    let lr = rotated.fit(&rot_x, &rot_obj, tc.epochs, |_, _| ControlFlow::Continue(())).unwrap();
    assert!(lp.last().unwrap().loss < 0.8 * lp[0].loss, "{name}: training reduces the loss: {lp:?}");
    for (a, b) in lp.iter().zip(&lr) {
        // Equal up to the f16 rounding of the stored rotations (R·Rᵀ = I to about 10⁻⁴).
        assert!((a.loss - b.loss).abs() <= 1e-3 * a.loss, "{name}: epoch {}: {} vs {}", a.epoch, a.loss, b.loss);
    }
    let plain_out = flat(&plain_secrets.fold(plain.net()).unwrap().forward(&data.x).unwrap());
    let folded_out = flat(&secrets.fold(rotated.net()).unwrap().forward(&data.x).unwrap());
    assert_close(&folded_out, &plain_out, 1e-3, &format!("{name}: folded outputs"));
    // Decoding the server-side outputs is the same as running the folded network.
    let decoded = secrets.decode_outputs(&rotated.outputs(&rot_x).unwrap()).unwrap();
    assert_close(&flat(&decoded), &folded_out, 1e-4, &format!("{name}: decode vs fold"));
}

/// Under a `pae` session's AdamW (second moments shared along the axes the secrets turn) and under SGD, a network
/// trained in the secret coordinates and folded gives the plain network's outputs: the secrets cost nothing.
/// (That per-weight AdamW is not equivariant is the `adamw` module's test.)
#[test]
fn training_on_rotated_data_is_equivariant() {
    let adamw = TrainConfig {
        optimizer: Optimizer::EquivariantAdamW,
        lr: 3e-3,
        batch_size: 8,
        epochs: 6,
        seed: 17,
        ..Default::default()
    };
    for (name, tc) in [("sgd", sgd(6)), ("equivariant adamw", adamw)] {
        assert_rotated_training_equals_plain(&tc, name);
    }
}

/// An annealed job ends at a learning rate near zero, and a job resumed from its checkpoint continues the schedule:
/// full-batch SGD (no shuffling to replay) over 4 epochs equals 2 epochs, a restart from the saved weights, then
/// 2 more; restarting the schedule instead, or not annealing, gives other weights.
#[test]
fn annealed_jobs_resume_their_schedule() {
    let c = cfg();
    let data = synthetic(23, 48);
    let delta = prediction_differences(&data.z_b, None, &data.labels, 4.0).unwrap();
    let objective = Objective::Regression { targets: Secrets::disabled(&c).unwrap().encode_targets(&delta).unwrap() };
    let tc = TrainConfig { batch_size: 48, ..sgd(4) };
    let run = |trainer: SideTrainer, epochs: usize| {
        let mut trainer = trainer;
        trainer.fit(&data.x, &objective, epochs, |_, _| ControlFlow::Continue(())).unwrap();
        trainer.tensors()
    };
    let straight = run(SideTrainer::new(&c, &tc).unwrap().annealed(0, 4), 4);
    let half = run(SideTrainer::new(&c, &tc).unwrap().annealed(0, 4), 2);
    let resumed = run(SideTrainer::from_tensors(&c, &tc, half.clone()).unwrap().annealed(2, 4), 2);
    let restarted = run(SideTrainer::from_tensors(&c, &tc, half).unwrap().annealed(0, 4), 2);
    let constant = run(SideTrainer::new(&c, &tc).unwrap(), 4);
    let max_diff = |a: &[(&str, Tensor)], b: &[(&str, Tensor)]| {
        a.iter()
            .zip(b)
            .flat_map(|((_, x), (_, y))| flat(x).into_iter().zip(flat(y)))
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    assert!(max_diff(&straight, &resumed) < 1e-5, "resumed: {}", max_diff(&straight, &resumed));
    assert!(max_diff(&straight, &restarted) > 1e-3, "restarting the schedule changes the result");
    assert!(max_diff(&straight, &constant) > 1e-3, "annealing changes the result");
}

/// The rotations, recovered through the public API: rotating the identity basis of each layer.
fn secrets_rotations(secrets: &Secrets, c: &SideConfig) -> Tensor {
    // rotate_activations maps e_j (at layer i) to column j of R_i; stacking D basis vectors gives R_iᵀ.
    let eye = Tensor::eye(c.hidden, DType::F32, &Device::Cpu).unwrap();
    let basis = eye.unsqueeze(1).unwrap().repeat((1, c.taps, 1)).unwrap(); // [D, T, D]
    let rotated = secrets.rotate_activations(&basis).unwrap(); // [D, T, D]: row j, layer i = R_i e_j
    rotated.transpose(0, 1).unwrap().transpose(1, 2).unwrap().contiguous().unwrap()
    // [T, D(out), D(j)] = R_i
}

#[test]
fn rotations_are_orthogonal_independent_and_seeded() {
    let c = cfg();
    let a = Secrets::from_seed(&c, [1; 32]).unwrap();
    let b = Secrets::from_seed(&c, [1; 32]).unwrap();
    let other = Secrets::from_seed(&c, [2; 32]).unwrap();
    let (ra, rb, ro) = (secrets_rotations(&a, &c), secrets_rotations(&b, &c), secrets_rotations(&other, &c));
    assert_eq!(flat(&ra), flat(&rb), "a seed determines the secrets");
    assert_ne!(flat(&ra), flat(&ro));
    let eye = Tensor::eye(D, DType::F32, &Device::Cpu).unwrap();
    for i in 0..T {
        let r = ra.get(i).unwrap();
        let rrt = r.matmul(&r.t().unwrap()).unwrap();
        assert_close(&flat(&rrt), &flat(&eye), 1e-3, "R Rᵀ = I, up to the rotations' f16 storage");
    }
    assert_ne!(flat(&ra.get(0).unwrap()), flat(&ra.get(1).unwrap()), "one rotation per layer");
    // Targets round-trip through Q, and the padding is not visible as zeros.
    let delta = Tensor::new(&[[0.5f32, -0.25, -0.25]], &Device::Cpu).unwrap();
    let sent = a.encode_targets(&delta).unwrap();
    assert_eq!(sent.dims(), &[1, c.outputs]);
    assert!(flat(&sent).iter().filter(|v| v.abs() < 1e-6).count() == 0);
    assert_close(&flat(&a.decode_outputs(&sent).unwrap()), &flat(&delta), 1e-5, "dec(Q[Δ;0]) = Δ");
    assert!(!format!("{a:?}").contains("1, 1"), "Debug never prints the seed");
}

#[test]
fn released_rotations_fold_and_rotate_as_the_kept_ones() {
    let c = cfg();
    let secrets = Secrets::from_seed(&c, [4; 32]).unwrap();
    let tc = TrainConfig { epochs: 2, lr: 1e-2, batch_size: 32, seed: 6, ..Default::default() };
    let data = synthetic(33, 200);
    let x = secrets.rotate_activations(&data.x).unwrap();
    let targets = secrets.encode_targets(&prediction_differences(&data.z_b, None, &data.labels, 2.0).unwrap()).unwrap();
    let mut trainer = SideTrainer::new(&c, &tc).unwrap();
    trainer.fit(&x, &Objective::Regression { targets }, tc.epochs, |_, _| ControlFlow::Continue(())).unwrap();
    let kept = secrets.fold(trainer.net()).unwrap().forward(&data.x).unwrap();
    secrets.release_rotations();
    let redrawn = secrets.fold(trainer.net()).unwrap().forward(&data.x).unwrap();
    assert_close(&flat(&redrawn), &flat(&kept), 1e-5, "folding with rotations drawn layer by layer");
    assert_ne!(flat(&kept).iter().filter(|v| v.abs() > 1e-4).count(), 0, "the network learned something to compare");
    assert_close(&flat(&secrets.rotate_activations(&data.x).unwrap()), &flat(&x), 1e-6, "rotating draws them again");
}

#[test]
fn bad_inputs_are_typed_errors() {
    let c = cfg();
    let trainer = SideTrainer::new(&c, &TrainConfig::default()).unwrap();
    let mut t2 = SideTrainer::new(&c, &TrainConfig::default()).unwrap();
    let data = synthetic(41, 10);
    let targets = Tensor::zeros((10, c.outputs), DType::F32, &Device::Cpu).unwrap();
    let fit = |t: &mut SideTrainer, x: &Tensor, obj: &Objective| t.fit(x, obj, 1, |_, _| ControlFlow::Continue(()));
    let reg = |t: Tensor| Objective::Regression { targets: t };
    let invalid = |r: mobillm_core::Result<Vec<_>>| matches!(r, Err(Error::InvalidInput(_)));

    assert!(invalid(fit(&mut t2, &data.x.narrow(2, 0, D - 1).unwrap(), &reg(targets.clone()))), "wrong d");
    assert!(invalid(fit(&mut t2, &data.x.narrow(1, 0, T - 1).unwrap(), &reg(targets.clone()))), "wrong T");
    assert!(invalid(fit(&mut t2, &data.x, &reg(targets.narrow(1, 0, 2).unwrap()))), "wrong K'");
    assert!(invalid(fit(&mut t2, &data.x.narrow(0, 0, 0).unwrap(), &reg(targets.narrow(0, 0, 0).unwrap()))), "empty");
    let mut nan = flat(&data.x);
    nan[17] = f32::NAN;
    let nan_x = Tensor::from_vec(nan, (10, T, D), &Device::Cpu).unwrap();
    assert!(invalid(fit(&mut t2, &nan_x, &reg(targets.clone()))), "NaN activations");
    let mut inf = vec![0f32; 10 * c.outputs];
    inf[3] = f32::INFINITY;
    let inf_t = Tensor::from_vec(inf, (10, c.outputs), &Device::Cpu).unwrap();
    assert!(invalid(fit(&mut t2, &data.x, &reg(inf_t))), "inf targets");
    let bad_labels = Objective::CrossEntropy {
        labels: Tensor::new(&[0u32, 1, 2, 3, 0, 1, 2, 0, 1, 2], &Device::Cpu).unwrap(),
        prior: data.z_b.clone(),
    };
    assert!(invalid(fit(&mut t2, &data.x, &bad_labels)), "label out of range");

    let narrow_k = SideConfig { outputs: K - 1, ..cfg() };
    assert!(matches!(SideTrainer::new(&narrow_k, &TrainConfig::default()), Err(Error::InvalidConfig(_))));
    assert!(matches!(Secrets::from_seed(&narrow_k, [0; 32]), Err(Error::InvalidConfig(_))));
    let bad_lr = TrainConfig { lr: f64::NAN, ..Default::default() };
    assert!(matches!(SideTrainer::new(&c, &bad_lr), Err(Error::InvalidConfig(_))));

    assert!(matches!(prediction_differences(&data.z_b, None, &[0; 9], 4.0), Err(Error::InvalidInput(_))));
    assert!(matches!(prediction_differences(&data.z_b, None, &[5; 10], 4.0), Err(Error::InvalidInput(_))));
    assert!(matches!(prediction_differences(&data.z_b, None, &[0; 10], 0.0), Err(Error::InvalidInput(_))));
    let secrets = Secrets::from_seed(&c, [0; 32]).unwrap();
    assert!(matches!(secrets.decode_outputs(&data.z_b), Err(Error::InvalidInput(_))), "K columns, not K'");
    // Targets take K to K' columns (the task's and any decoys'), no fewer and no more.
    let columns = |k: usize| Tensor::zeros((10, k), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(secrets.encode_targets(&columns(K - 1)), Err(Error::InvalidInput(_))), "fewer than K");
    assert!(matches!(secrets.encode_targets(&columns(c.outputs + 1)), Err(Error::InvalidInput(_))), "more than K'");
    assert!(secrets.encode_targets(&columns(c.outputs)).is_ok());
    assert!(matches!(trainer.net().forward(&data.z_b), Err(Error::InvalidInput(_))));
}

#[test]
fn device_adapter_files_round_trip_and_reject_damage() {
    let c = cfg();
    let data = synthetic(51, 20);
    let secrets = Secrets::from_seed(&c, [4; 32]).unwrap();
    let trained = SideNet::from_tensors(&c, &random_params(52, DType::F32, c.outputs)).unwrap();
    let adapter = DeviceAdapter {
        task: TaskSpec { template: "{text}:".into(), labels: vec!["a".into(), "b".into(), "c".into()] },
        taps: (0..T).collect(),
        backbone_fingerprint: "f".repeat(64),
        secret_seed: secrets.seed(),
        whitening: Some(
            Whitening::fit(&data.x, &whitening::Config { rank: 3, relative_eps: 0.1, tail_gain: 1.0 }).unwrap(),
        ),
        net: secrets.fold(&trained).unwrap(),
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.safetensors");
    adapter.save(&path).unwrap();
    let loaded = DeviceAdapter::load(&path).unwrap();
    assert_eq!(loaded.task, adapter.task);
    assert_eq!(loaded.taps, adapter.taps);
    assert_eq!(loaded.secret_seed, Some([4; 32]));
    assert_eq!(loaded.side_config(), &c);
    assert!(loaded.whitening.is_some());
    let raw = data.x.clone();
    let whitened = flat(&adapter.corrections(&raw).unwrap());
    assert_eq!(flat(&loaded.corrections(&raw).unwrap()), whitened);
    let unwhitened = DeviceAdapter { whitening: None, ..adapter.clone() };
    assert_ne!(flat(&unwhitened.corrections(&raw).unwrap()), whitened, "the whitening is applied");

    // A version 1 file (before whitening) still reads, and runs as it was trained: without whitening. A version
    // from the future is refused by name.
    let (tensors, meta) = mobillm_core::side::weights_file::from_bytes(&unwhitened_bytes(&unwhitened)).unwrap();
    assert_eq!((c.members, meta["format_version"].as_str()), (4, "4"), "members need version 4");
    for (version, readable) in [("1", true), ("5", false)] {
        let mut meta = meta.clone();
        meta.insert("format_version".into(), version.into());
        let old = dir.path().join(format!("v{version}.safetensors"));
        let bytes =
            mobillm_core::side::weights_file::to_bytes(&mobillm_core::side::weights_file::as_refs(&tensors), meta)
                .unwrap();
        std::fs::write(&old, bytes).unwrap();
        match DeviceAdapter::load(&old) {
            Ok(a) if readable => {
                assert!(a.whitening.is_none());
                assert_eq!(flat(&a.corrections(&raw).unwrap()), flat(&unwhitened.corrections(&raw).unwrap()));
            }
            Err(e) if !readable => assert!(e.to_string().contains("version 5"), "{e}"),
            other => panic!("version {version}: {other:?}"),
        }
    }
    // A whitening tensor without the others is damage, not an old file.
    let mut partial = tensors.clone();
    partial.push(("whitening.mean".into(), Tensor::zeros((T, D), DType::F32, &Device::Cpu).unwrap()));
    let bytes =
        mobillm_core::side::weights_file::to_bytes(&mobillm_core::side::weights_file::as_refs(&partial), meta).unwrap();
    std::fs::write(dir.path().join("partial.safetensors"), bytes).unwrap();
    let err = DeviceAdapter::load(&dir.path().join("partial.safetensors")).unwrap_err();
    assert!(err.to_string().contains("whitening.mean"), "{err}");

    let bytes = std::fs::read(&path).unwrap();
    for cut in [0, 8, bytes.len() / 2, bytes.len() - 3] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        assert!(matches!(DeviceAdapter::load(&path), Err(Error::InvalidModelFile { .. })), "cut at {cut}");
    }
    let other = dir.path().join("other.safetensors");
    candle_core::safetensors::save(&std::collections::HashMap::from([("x".to_string(), data.z_b.clone())]), &other)
        .unwrap();
    let err = DeviceAdapter::load(&other).unwrap_err();
    assert!(err.to_string().contains("format"), "{err}");
    // Saving over a file replaces it whole.
    adapter.save(&path).unwrap();
    assert_eq!(DeviceAdapter::load(&path).unwrap().taps, adapter.taps);
}

#[test]
fn trainer_api_over_cached_samples() {
    use mobillm_core::side::{CachedSample, SampleId};
    let c = cfg();
    let data = synthetic(61, 48);
    let delta = prediction_differences(&data.z_b, None, &data.labels, 4.0).unwrap();
    let secrets = Secrets::from_seed(&c, [6; 32]).unwrap();
    let x = secrets.rotate_activations(&data.x).unwrap().to_vec3::<f32>().unwrap();
    let y = secrets.encode_targets(&delta).unwrap().to_vec2::<f32>().unwrap();
    let samples: Vec<CachedSample> = x
        .into_iter()
        .zip(y)
        .map(|(a, t)| CachedSample { id: SampleId::random().unwrap(), activations: a.concat(), target: t })
        .collect();
    let ids: std::collections::HashSet<_> = samples.iter().map(|s| s.id).collect();
    assert_eq!(ids.len(), samples.len(), "random ids do not collide");

    let tc = TrainConfig { batch_size: 16, lr: 1e-2, ..Default::default() };
    let mut trainer = SideTrainer::new(&c, &tc).unwrap();
    let reports = trainer.fit_samples(&samples, 8, |_, _| ControlFlow::Continue(())).unwrap();
    assert!(reports.last().unwrap().loss < reports[0].loss);
    let outputs = trainer.sample_outputs(&samples).unwrap();
    assert_eq!(outputs.len(), samples.len());
    assert!(outputs.iter().zip(&samples).all(|((id, o), s)| *id == s.id && o.len() == c.outputs));

    // Early stop through the callback.
    let stopped =
        trainer.fit_samples(
            &samples,
            8,
            |r, _| if r.epoch == 2 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) },
        );
    assert_eq!(stopped.unwrap().len(), 2);

    let mut dup = samples.clone();
    dup[3].id = dup[0].id;
    let err = trainer.fit_samples(&dup, 1, |_, _| ControlFlow::Continue(())).unwrap_err();
    assert!(err.to_string().contains("twice"), "{err}");
    let mut short = samples.clone();
    short[5].activations.pop();
    assert!(matches!(trainer.fit_samples(&short, 1, |_, _| ControlFlow::Continue(())), Err(Error::InvalidInput(_))));
    assert!(matches!(trainer.fit_samples(&[], 1, |_, _| ControlFlow::Continue(())), Err(Error::InvalidInput(_))));
}

/// The device's whole path on a tiny real backbone: pivots → secrets → training → fold → adapter file → predict.
#[test]
fn device_adapter_predicts_with_its_backbone_only() {
    use candle_core::quantized::GgmlDType;
    let common::TinyBackbone { dir, backbone, .. } = common::tiny_backbone(70, GgmlDType::Q8_0);
    let spec =
        TaskSpec { template: "Text: {text}\nIs it pos or neg:".into(), labels: vec!["pos".into(), "neg".into()] };
    let task = mobillm_core::Task::new(spec.clone(), backbone.tokenizer()).unwrap();
    let texts: Vec<String> =
        (0..24).map(|i| if i % 2 == 0 { format!("the pos {i} at it") } else { format!("on s{i} re") }).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let labels: Vec<u32> = (0..24).map(|i| (i % 2) as u32).collect();
    let taps = backbone.all_taps();
    let out = backbone.forward_all(&task, &refs, &taps, 8, Summary::Pivot, |_, _| {}).unwrap();

    let c = SideConfig { width: 16, rank: 4, ..SideConfig::new(taps.len(), common::HIDDEN, 2) };
    let secrets = Secrets::from_seed(&c, [8; 32]).unwrap();
    let x = secrets.rotate_activations(&normalize_taps(&out.taps).unwrap()).unwrap();
    let delta = prediction_differences(&out.label_logits, None, &labels, 2.0).unwrap();
    let objective = Objective::Regression { targets: secrets.encode_targets(&delta).unwrap() };
    let mut trainer = SideTrainer::new(&c, &TrainConfig { batch_size: 8, lr: 1e-2, ..Default::default() }).unwrap();
    trainer.fit(&x, &objective, 30, |_, _| ControlFlow::Continue(())).unwrap();
    let adapter = DeviceAdapter {
        task: spec,
        taps: taps.clone(),
        backbone_fingerprint: backbone.fingerprint().to_string(),
        secret_seed: secrets.seed(),
        whitening: None,
        net: secrets.fold(trainer.net()).unwrap(),
    };
    let file = dir.path().join("adapter.safetensors");
    adapter.save(&file).unwrap();
    let adapter = DeviceAdapter::load(&file).unwrap();

    let predictions = adapter.predict(&backbone, &refs).unwrap();
    let dec = secrets.decode_outputs(&trainer.outputs(&x).unwrap()).unwrap();
    let expected = predict(&out.label_logits, Some(&dec)).unwrap();
    for (p, e) in predictions.iter().zip(&expected) {
        assert_eq!(p.label_index as u32, *e);
        assert_eq!(p.label, ["pos", "neg"][p.label_index]);
        assert!((p.scores.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
    // The random tiny backbone is very confident, so a short training run cannot flip its predictions; it must
    // still move the margin towards the true labels.
    let margin = |logits: &Tensor| -> f32 {
        let l = logits.to_vec2::<f32>().unwrap();
        labels.iter().zip(&l).map(|(&y, row)| row[y as usize] - row[1 - y as usize]).sum::<f32>() / l.len() as f32
    };
    let before = margin(&out.label_logits);
    let after = margin(&(&out.label_logits + &dec).unwrap());
    assert!(after > before + 0.5, "training moved the margin: {before} → {after}");
    let other_path = dir.path().join("other.gguf");
    common::write_gguf(&common::tiny_model(71, true), &other_path, GgmlDType::Q8_0);
    let other = mobillm_core::Backbone::load(&other_path).unwrap();
    assert_ne!(other.fingerprint(), backbone.fingerprint());
    let err = adapter.predict(&other, &refs).unwrap_err();
    assert!(err.to_string().contains("another backbone"), "{err}");
}

/// The bytes of an adapter file saved without whitening.
fn unwhitened_bytes(adapter: &DeviceAdapter) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plain.safetensors");
    adapter.save(&path).unwrap();
    std::fs::read(path).unwrap()
}

/// With two summaries per layer (pivot and mean, adjacent inputs), a layer's inputs share its rotation, the
/// folded network runs on plain inputs as the trained one on rotated inputs (rotations kept or drawn again), and
/// the adapter records the summary (format version 3 for one network) so that `predict` builds the same inputs.
#[test]
fn two_summaries_per_layer_share_its_rotation_and_fold_back() {
    let c = SideConfig { summary: Summary::PivotAndMean, members: 1, ..cfg() };
    assert_eq!((c.taps, c.layers()), (T, T / 2));
    assert!(matches!(SideConfig { taps: T + 1, ..c.clone() }.validate(), Err(Error::InvalidConfig(_))));
    let (n, layers) = (50, T / 2);
    let data = synthetic(61, n);

    // Inputs: per layer, the pivot then the mean.
    let mut rng = Rng::new(62);
    let (pivots, means) =
        (gaussian(&mut rng, &[n, layers, D], DType::F32), gaussian(&mut rng, &[n, layers, D], DType::F32));
    let inputs = Summary::PivotAndMean.inputs(&pivots, Some(&means)).unwrap();
    assert_eq!(inputs.dims(), &[n, T, D]);
    assert_eq!(flat(&inputs.narrow(1, 2, 1).unwrap()), flat(&pivots.narrow(1, 1, 1).unwrap()));
    assert_eq!(flat(&inputs.narrow(1, 3, 1).unwrap()), flat(&means.narrow(1, 1, 1).unwrap()));
    assert_eq!(flat(&Summary::Pivot.inputs(&pivots, None).unwrap()), flat(&pivots));

    let secrets = Secrets::from_seed(&c, [5; 32]).unwrap();
    // The same vector at every input comes out equal within a layer and different across layers.
    let same = pivots.narrow(1, 0, 1).unwrap().repeat((1, T, 1)).unwrap();
    let rotated = secrets.rotate_activations(&same).unwrap();
    let input = |i: usize| flat(&rotated.narrow(1, i, 1).unwrap());
    for l in 0..layers {
        assert_eq!(input(2 * l), input(2 * l + 1), "layer {l}: one rotation for its two inputs");
    }
    assert_ne!(input(0), input(2), "each layer its own rotation");
    assert_ne!(input(0), flat(&same.narrow(1, 0, 1).unwrap()), "rotated");

    let tc = TrainConfig { epochs: 2, lr: 1e-2, batch_size: 16, seed: 6, ..Default::default() };
    let x = secrets.rotate_activations(&data.x).unwrap();
    let targets = secrets.encode_targets(&prediction_differences(&data.z_b, None, &data.labels, 2.0).unwrap()).unwrap();
    let mut trainer = SideTrainer::new(&c, &tc).unwrap();
    trainer.fit(&x, &Objective::Regression { targets }, tc.epochs, |_, _| ControlFlow::Continue(())).unwrap();
    let served = secrets.decode_outputs(&trainer.net().forward(&x).unwrap()).unwrap();
    let kept = secrets.fold(trainer.net()).unwrap();
    assert_close(&flat(&kept.forward(&data.x).unwrap()), &flat(&served), 1e-4, "fold with the kept rotations");
    secrets.release_rotations();
    let redrawn = secrets.fold(trainer.net()).unwrap();
    assert_close(&flat(&redrawn.forward(&data.x).unwrap()), &flat(&served), 1e-4, "fold drawing them again");
    assert!(flat(&served).iter().any(|v| v.abs() > 1e-4), "the network learned something to compare");

    let adapter = DeviceAdapter {
        task: TaskSpec { template: "{text}:".into(), labels: vec!["a".into(), "b".into(), "c".into()] },
        taps: (0..layers).collect(),
        backbone_fingerprint: "f".repeat(64),
        secret_seed: secrets.seed(),
        whitening: None,
        net: kept,
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("both.safetensors");
    adapter.save(&path).unwrap();
    let (_, meta) = mobillm_core::side::weights_file::from_bytes(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(meta["format_version"], "3");
    let loaded = DeviceAdapter::load(&path).unwrap();
    assert_eq!(loaded.side_config(), &c);
    assert_eq!(flat(&loaded.corrections(&data.x).unwrap()), flat(&adapter.corrections(&data.x).unwrap()));
    // The same network read as pivots alone is a shape error, not a silent misreading.
    let mut wrong = meta.clone();
    wrong.insert("side".into(), serde_json::to_string(&cfg()).unwrap());
    wrong.insert("taps".into(), serde_json::to_string(&(0..layers).collect::<Vec<_>>()).unwrap());
    let (tensors, _) = mobillm_core::side::weights_file::from_bytes(&std::fs::read(&path).unwrap()).unwrap();
    let bytes = mobillm_core::side::weights_file::to_bytes(&mobillm_core::side::weights_file::as_refs(&tensors), wrong)
        .unwrap();
    std::fs::write(&path, bytes).unwrap();
    assert!(matches!(DeviceAdapter::load(&path), Err(Error::InvalidModelFile { .. })));
}
