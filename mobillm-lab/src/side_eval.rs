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
use crate::whitening::Whitening;
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
    /// Centre and whiten each layer before rotating, with the mean and covariance of the training split and ε =
    /// EPS times the mean eigenvalue (the audit simulates 0.1): the design change docs/privacy.md proposes against
    /// the alignment attack, to measure what it costs in accuracy.
    #[arg(long, value_name = "EPS")]
    pub whiten: Option<f64>,
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
    let (x_train_plain, x_test_plain) = match args.whiten {
        Some(eps) => {
            let whitening = Whitening::fit(&x_train_plain, eps, true)?;
            (whitening.apply(&x_train_plain)?, whitening.apply(&x_test_plain)?)
        }
        None => (x_train_plain, x_test_plain),
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
        "secrets": secrets.is_enabled(),
        "whitened": args.whiten,
        "side": cfg,
        "train": {"lr": args.lr, "batch": args.batch, "epochs_per_round": args.epochs, "rounds": args.rounds, "tau": args.tau},
        "epoch_s": epoch_s,
        "train_samples_per_s": n_train as f64 / epoch_s,
    });
    println!("{result}");
    Ok(())
}
