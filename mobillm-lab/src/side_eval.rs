//! `cargo xtask side-eval`: the side network on real pivot activations, in process (no server yet). Forwards the
//! train and held-out splits once (cached under `$MOBILLM_CACHE/pivots`), then reports zero-shot accuracy, `pae`
//! accuracy after each refinement round with the secrets on, and a labels-on-server cross-entropy baseline trained
//! on the same (rotated) activations for the same number of epochs.

use std::io::Write;
use std::ops::ControlFlow;
use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor};
use mobillm_core::side::targets::{accuracy, predict, prediction_differences, DEFAULT_TAU};
use mobillm_core::side::{normalize_taps, Activation, Objective, Secrets, SideConfig, SideTrainer, TrainConfig};

use crate::inputs;
use mobillm_core::side::whitening::{self, Whitening};
use xtask::args::DataArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub data: DataArgs,
    /// Use at most this many training examples.
    #[arg(long)]
    pub train: Option<usize>,
    /// Use at most this many held-out examples.
    #[arg(long)]
    pub test: Option<usize>,
    /// Refinement rounds (the device recomputes Δ from the server's outputs between rounds).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Server epochs per round.
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    #[arg(long, default_value_t = DEFAULT_TAU)]
    pub tau: f64,
    #[arg(long, default_value_t = 128)]
    pub width: usize,
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    #[arg(long, value_enum, default_value_t = ActivationArg::Gelu)]
    pub activation: ActivationArg,
    /// Train without secrets (R = Q = I), for comparison.
    #[arg(long)]
    pub no_secrets: bool,
    /// Centre and whiten each layer before rotating, as the device does with its secrets on (μ and W from a
    /// subset of the training split of the device's size, its rank and ε), to measure what it costs in accuracy.
    #[arg(long)]
    pub whiten: bool,
    /// With --whiten: ε relative to the mean eigenvalue, and the directions whitened exactly (default: the
    /// device's).
    #[arg(long, default_value_t = whitening::RELATIVE_EPS)]
    pub whiten_eps: f64,
    #[arg(long, default_value_t = whitening::RANK)]
    pub whiten_rank: usize,
    /// Also fit a ridge readout of these tapped layers (comma-separated positions, or `all`) on the device's
    /// inputs with the true labels, as a label head that never leaves the device would be, and report its
    /// held-out accuracy for a range of ridge penalties.
    #[arg(long, value_name = "LAYERS")]
    pub ridge: Option<String>,
    /// Skip the cross-entropy baseline.
    #[arg(long)]
    pub no_baseline: bool,
}

#[derive(clap::ValueEnum, Clone, Copy)]
pub enum ActivationArg {
    Gelu,
    Silu,
    Relu,
}

pub fn run(args: Args) -> Result<()> {
    let (backbone, task, mut split) = inputs::load(&args.data)?;
    if let Some(n) = args.train {
        split.train.truncate(n);
    }
    if let Some(n) = args.test {
        split.test.truncate(n);
    }
    let train = inputs::pivots(&backbone, &task, &split.train, "train")?;
    let test = inputs::pivots(&backbone, &task, &split.test, "test")?;
    let (n_train, taps, hidden) = train.taps.dims3()?;
    let k = task.labels().len();
    let cfg = SideConfig {
        width: args.width,
        rank: args.rank,
        activation: match args.activation {
            ActivationArg::Gelu => Activation::Gelu,
            ActivationArg::Silu => Activation::Silu,
            ActivationArg::Relu => Activation::Relu,
        },
        ..SideConfig::new(taps, hidden, k)
    };
    let tc = TrainConfig { lr: args.lr, batch_size: args.batch, epochs: args.epochs, ..Default::default() };
    let secrets = if args.no_secrets { Secrets::disabled(&cfg)? } else { Secrets::generate(&cfg)? };

    let zero_shot = accuracy(&predict(&test.logits, None)?, &test.labels);
    eprintln!("zero-shot: {:.1}% on {} held-out", zero_shot * 100.0, test.labels.len());

    // What the device sends: unit-RMS, rotated activations (once) and rotated targets (per round).
    let (x_train_plain, x_test_plain) = (normalize_taps(&train.taps)?, normalize_taps(&test.taps)?);
    let (x_train_plain, x_test_plain) = if args.whiten {
        let n = x_train_plain.dim(0)?;
        let subset: Vec<u32> = (0..n.min(whitening::CALIBRATION_SAMPLES) as u32).collect();
        let calibration = x_train_plain.index_select(&Tensor::new(subset.as_slice(), &Device::Cpu)?, 0)?;
        let whitening = Whitening::fit(&calibration, args.whiten_rank, args.whiten_eps)?;
        (whitening.apply(&x_train_plain)?, whitening.apply(&x_test_plain)?)
    } else {
        (x_train_plain, x_test_plain)
    };
    let ridge = match &args.ridge {
        Some(layers) => ridge_head(layers, &x_train_plain, &x_test_plain, &train, &test, args.tau)?,
        None => serde_json::Value::Null,
    };
    let x_train = secrets.rotate_activations(&x_train_plain)?;

    let mut trainer = SideTrainer::new(&cfg, &tc)?;
    let mut dec: Option<Tensor> = None;
    let mut rounds = Vec::new();
    let mut train_seconds = 0.0;
    let mut epochs_run = 0;
    for round in 1..=args.rounds {
        let delta = prediction_differences(&train.logits, dec.as_ref(), &train.labels, args.tau)?;
        let prev = trainer.outputs(&x_train)?;
        let targets = (prev + secrets.encode_targets(&delta)?)?;
        let start = Instant::now();
        let reports = trainer.fit(&x_train, &Objective::Regression { targets }, args.epochs, |r, _| {
            eprint!("\rpae round {round}/{}: epoch {}/{} loss {:.4}", args.rounds, r.epoch, r.epochs, r.loss);
            let _ = std::io::stderr().flush();
            ControlFlow::Continue(())
        })?;
        train_seconds += start.elapsed().as_secs_f64();
        epochs_run += reports.len();
        dec = Some(secrets.decode_outputs(&trainer.outputs(&x_train)?)?);
        let train_acc = accuracy(&predict(&train.logits, dec.as_ref())?, &train.labels);
        // The device's view: fold the secrets in and run on plain activations.
        let folded = secrets.fold(trainer.net())?;
        let test_acc = accuracy(&predict(&test.logits, Some(&folded.forward(&x_test_plain)?))?, &test.labels);
        eprintln!(" → train {:.1}%, held-out {:.1}%", train_acc * 100.0, test_acc * 100.0);
        rounds.push(serde_json::json!({
            "round": round, "loss": reports.last().map(|r| r.loss), "train_acc": train_acc, "test_acc": test_acc,
        }));
    }
    let pae_acc = rounds.last().and_then(|r| r["test_acc"].as_f64());

    let baseline = if args.no_baseline {
        serde_json::Value::Null
    } else {
        // Labels on the server: cross-entropy on z_b + o[:K], same rotated activations, same epochs in all.
        let mut ce = SideTrainer::new(&cfg, &tc)?;
        let labels = Tensor::new(train.labels.as_slice(), &Device::Cpu)?;
        let objective = Objective::CrossEntropy { labels, prior: train.logits.clone() };
        let total = args.rounds * args.epochs;
        ce.fit(&x_train, &objective, total, |r, _| {
            eprint!("\rce baseline: epoch {}/{} loss {:.4}", r.epoch, r.epochs, r.loss);
            let _ = std::io::stderr().flush();
            ControlFlow::Continue(())
        })?;
        let x_test = secrets.rotate_activations(&x_test_plain)?;
        let corr = ce.outputs(&x_test)?.narrow(1, 0, k)?;
        let acc = accuracy(&predict(&test.logits, Some(&corr))?, &test.labels);
        eprintln!(" → held-out {:.1}%", acc * 100.0);
        serde_json::json!({"test_acc": acc, "epochs": total})
    };

    let epoch_s = train_seconds / epochs_run.max(1) as f64;
    let result = serde_json::json!({
        "train_samples": n_train,
        "test_samples": test.labels.len(),
        "zero_shot_acc": zero_shot,
        "pae_acc": pae_acc,
        "pae_rounds": rounds,
        "ce_baseline": baseline,
        "ridge_head": ridge,
        "secrets": secrets.is_enabled(),
        "whitened": args.whiten.then_some(serde_json::json!({"eps": args.whiten_eps, "rank": args.whiten_rank})),
        "side": cfg,
        "train": {"lr": args.lr, "batch": args.batch, "epochs_per_round": args.epochs, "rounds": args.rounds, "tau": args.tau},
        "epoch_s": epoch_s,
        "train_samples_per_s": n_train as f64 / epoch_s,
    });
    println!("{result}");
    Ok(())
}

/// A ridge readout of some layers' device inputs `[N, T, d]`, fitted on the round-1 targets Δ (in its dual form,
/// so any number of layers fits in N×N): held-out accuracy of `z_b + readout` per ridge penalty.
fn ridge_head(
    layers: &str,
    x_train: &Tensor,
    x_test: &Tensor,
    train: &inputs::Pivots,
    test: &inputs::Pivots,
    tau: f64,
) -> Result<serde_json::Value> {
    let (n, t, d) = x_train.dims3()?;
    let chosen: Vec<usize> = if layers == "all" {
        (0..t).collect()
    } else {
        layers.split(',').map(|l| l.trim().parse::<usize>()).collect::<std::result::Result<_, _>>()?
    };
    anyhow::ensure!(chosen.iter().all(|&l| l < t), "--ridge: layers are positions below {t}");
    let pick = |x: &Tensor| -> Result<Tensor> {
        let idx = Tensor::new(chosen.iter().map(|&l| l as u32).collect::<Vec<_>>().as_slice(), &Device::Cpu)?;
        Ok(x.to_dtype(candle_core::DType::F32)?.index_select(&idx, 1)?.reshape((x.dim(0)?, chosen.len() * d))?)
    };
    let (phi, phi_test) = (pick(x_train)?, pick(x_test)?);
    let k_train = phi.matmul(&phi.t()?)?.to_vec2::<f32>()?;
    let k_test = phi_test.matmul(&phi.t()?)?;
    let delta = prediction_differences(&train.logits, None, &train.labels, tau)?.to_vec2::<f32>()?;
    let kk = delta[0].len();
    let km = nalgebra::DMatrix::<f64>::from_fn(n, n, |i, j| f64::from(k_train[i][j]));
    let y = nalgebra::DMatrix::<f64>::from_fn(n, kk, |i, j| f64::from(delta[i][j]));
    let eig = km.symmetric_eigen();
    let uty = eig.eigenvectors.transpose() * &y;
    let scale = eig.eigenvalues.mean();
    let mut results = Vec::new();
    for rel in [1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0] {
        let lambda = rel * scale;
        let mut a = uty.clone();
        for (i, mut row) in a.row_iter_mut().enumerate() {
            row /= eig.eigenvalues[i] + lambda;
        }
        let alpha = &eig.eigenvectors * a; // [n, K]
        let alpha =
            Tensor::from_vec(alpha.transpose().iter().map(|v| *v as f32).collect::<Vec<_>>(), (n, kk), &Device::Cpu)?;
        let corr = k_test.matmul(&alpha)?;
        let acc = accuracy(&predict(&test.logits, Some(&corr))?, &test.labels);
        eprintln!("ridge head on layers {layers}, λ = {rel} × mean eigenvalue: held-out {:.1}%", acc * 100.0);
        results.push(serde_json::json!({"relative_lambda": rel, "test_acc": acc}));
    }
    Ok(serde_json::json!({"layers": layers, "results": results}))
}
