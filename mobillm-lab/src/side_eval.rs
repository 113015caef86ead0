//! `cargo xtask side-eval`: the side network on real pivot activations, in process, on one task or several
//! (`--tasks`), over `--runs` runs with fresh secrets. Forwards each task's train and held-out splits once (cached
//! under `$MOBILLM_CACHE/pivots`), then per run reports `pae` as the device runs it by default and a labels-on-server
//! cross-entropy baseline on the same (whitened, rotated) activations, and finally each task's zero-shot accuracy
//! and the mean, min and max of both over the runs.
//!
//! `pae` here is the device's loop without the network in between: the same validation split and stopping rule
//! (`fine_tune::stopping`), whitening fitted on a random calibration subset, activations through the wire's int8
//! quantisation, the server's mini-batch rule, and each round trained as the server does (from the saved weights,
//! with a fresh optimiser and the learning rate annealed over the round), then the refit (the kept number of
//! rounds again from the initial weights on every example, the split included). The baseline trains `--epochs`
//! per round the same way with the same validation split, stopping rule and refit, so both get the same budget
//! and the same chance to stop. Each run's JSON also gives, round by round, the held-out accuracy of the mean of the rounds'
//! outputs so far and of one network with the mean of their weights, for comparison with the round kept.
//!
//! `--select-tails` and `--ensemble-tails` measure choosing the whitening's tail per session and averaging a session
//! of each (docs/side-network.md, *A tail per session*): not what the device does.

use std::io::Write;
use std::ops::ControlFlow;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use mobillm_core::fine_tune::stopping::{validation_split, Score, Stopping, ROUNDS_WITHOUT_VALIDATION};
use mobillm_core::fine_tune::{random_split, FineTuneConfig};
use mobillm_core::side;
use mobillm_core::side::targets::{accuracy, predict, prediction_differences, DEFAULT_TAU};
use mobillm_core::side::whitening::{self, Whitening, CALIBRATION_SAMPLES};
use mobillm_core::side::{
    device_inputs, Activation, Objective, Optimizer, SampleId, Secrets, SideConfig, SideNet, SideTrainer, TrainConfig,
};
use mobillm_core::wire::{Frame, Limits, Quant};
use mobillm_core::Mode;

use crate::inputs::{self, select_rows, Pivots, WhiteningArgs};
use xtask::args::DataArgs;
use xtask::tasks::PublicTask;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub data: DataArgs,
    /// Several tasks in one run, comma-separated (`uci` and the public tasks), or `all`; prints a table.
    #[arg(long, value_enum, value_delimiter = ',', conflicts_with_all = ["data", "task"])]
    pub tasks: Vec<TaskName>,
    /// Runs per task, each with fresh secrets, validation split and calibration subset.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// Use at most this many training examples.
    #[arg(long)]
    pub train: Option<usize>,
    /// Use at most this many held-out examples.
    #[arg(long)]
    pub test: Option<usize>,
    /// At most this many refinement rounds (the device's default).
    #[arg(long, default_value_t = FineTuneConfig::for_mode(Mode::Pae).max_rounds)]
    pub max_rounds: usize,
    /// Server epochs per round.
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    #[arg(long, default_value_t = DEFAULT_TAU)]
    pub tau: f64,
    /// Width and rank of each member (the device's defaults).
    #[arg(long, default_value_t = SideConfig::new(1, 1, 2).width)]
    pub width: usize,
    #[arg(long, default_value_t = SideConfig::new(1, 1, 2).rank)]
    pub rank: usize,
    /// Side networks trained side by side, each of `--width`; the device uses their mean.
    #[arg(long, default_value_t = SideConfig::new(1, 1, 2).members)]
    pub members: usize,
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    /// Largest server mini-batch (small sets get n/8, at least 16, as on the server).
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    #[arg(long, value_enum, default_value_t = ActivationArg::Gelu)]
    pub activation: ActivationArg,
    /// Train without secrets (R = Q = I, no whitening), for comparison.
    #[arg(long)]
    pub no_secrets: bool,
    /// Train with one AdamW second moment per weight (what `local` and `mobillm` sessions use) instead of the
    /// `pae` server's shared moments: with `--no-secrets`, the baseline is then `local` mode's recipe.
    #[arg(long)]
    pub per_weight_adamw: bool,
    /// Whiten as the device does but leave out the rotations (R = Q = I), for comparison.
    #[arg(long, conflicts_with = "no_secrets")]
    pub no_rotation: bool,
    #[command(flatten)]
    pub whitening: WhiteningArgs,
    /// Also fit a ridge readout of these tapped layers (comma-separated positions, or `all`) on the device's
    /// inputs with the true labels, as a label head that never leaves the device would be, and report its
    /// held-out accuracy for a range of ridge penalties (first run only).
    #[arg(long, value_name = "LAYERS")]
    pub ridge: Option<String>,
    /// Skip the cross-entropy baseline.
    #[arg(long)]
    pub no_baseline: bool,
    /// What each tapped layer sends: its pivot, its mean over the prompt's tokens, or both (two inputs per layer).
    #[arg(long, value_enum, default_value_t = Summary::Pivot)]
    pub summary: Summary,
    /// Weight decay of the server's AdamW.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Training examples whose taps fit the whitening.
    #[arg(long, default_value_t = CALIBRATION_SAMPLES)]
    pub calibration: usize,
    /// Calibrate the backbone's label logits on the device (a temperature and a bias per label, fitted on the
    /// sent examples) before any target is computed.
    #[arg(long)]
    pub calibrate: bool,
    /// Train every round up to `--max-rounds` even after the stopping rule ends the fine-tune (the round kept
    /// stays the rule's), recording each round's validation predictions, to compare stopping rules afterwards.
    #[arg(long)]
    pub all_rounds: bool,
    /// Choose the whitening's tail gain per run among these: round 1 is trained on 4 folds of the sent examples
    /// for each, and the gain whose out-of-fold predictions the device's labels score best is used
    /// (docs/side-network.md, *A tail per session*). Prints each gain's out-of-fold accuracy and target error.
    #[arg(long, value_delimiter = ',')]
    pub select_tails: Vec<f64>,
    /// Run `pae` once per tail gain, each as its own session (secrets, split, refit), and report the held-out
    /// accuracy of the mean of their final networks' corrections (docs/side-network.md, *A tail per session*).
    #[arg(long, value_delimiter = ',', conflicts_with = "select_tails")]
    pub ensemble_tails: Vec<f64>,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
pub enum Summary {
    Pivot,
    Mean,
    Both,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
pub enum TaskName {
    Uci,
    Bbc,
    Hedge,
    Tweets,
    All,
}

impl TaskName {
    /// The public task it names; `None` for `uci` and `all`.
    fn public(self) -> Option<PublicTask> {
        match self {
            TaskName::Bbc => Some(PublicTask::Bbc),
            TaskName::Hedge => Some(PublicTask::Hedge),
            TaskName::Tweets => Some(PublicTask::Tweets),
            TaskName::Uci | TaskName::All => None,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy)]
pub enum ActivationArg {
    Gelu,
    Silu,
    Relu,
}

pub fn run(args: Args) -> Result<()> {
    anyhow::ensure!(args.runs >= 1 && args.max_rounds >= 1, "--runs and --max-rounds must be positive");
    let tasks: Vec<(String, DataArgs)> = if args.tasks.is_empty() {
        vec![(args.data.name(), args.data.clone())]
    } else {
        let all = args.tasks.contains(&TaskName::All);
        let mut chosen = vec![];
        if all || args.tasks.contains(&TaskName::Uci) {
            chosen.push(("uci".to_string(), DataArgs { model: args.data.model.clone(), ..Default::default() }));
        }
        for t in PublicTask::ALL {
            if all || args.tasks.iter().any(|n| n.public() == Some(t)) {
                let data = DataArgs { model: args.data.model.clone(), task: Some(t), ..Default::default() };
                chosen.push((t.name().to_string(), data));
            }
        }
        chosen
    };
    let mut results = Vec::new();
    for (name, data) in &tasks {
        eprintln!("== {name}");
        results.push(evaluate_task(&args, name, data)?);
    }
    eprintln!("\n{}", table(&results, args.runs));
    println!("{}", serde_json::json!({ "runs": args.runs, "max_rounds": args.max_rounds, "tasks": results }));
    Ok(())
}

/// Zero-shot accuracy and `--runs` runs of `pae` and the baseline on one task.
fn evaluate_task(args: &Args, name: &str, data: &DataArgs) -> Result<serde_json::Value> {
    let (backbone, task, mut split) = inputs::load(data)?;
    if let Some(n) = args.train {
        split.train.truncate(n);
    }
    if let Some(n) = args.test {
        split.test.truncate(n);
    }
    let train = summarise(inputs::pivots(&backbone, &task, &split.train, "train")?, args.summary)?;
    let test = summarise(inputs::pivots(&backbone, &task, &split.test, "test")?, args.summary)?;
    drop(backbone);
    let (n_train, taps, hidden) = train.taps.dims3()?;
    let k = task.labels().len();
    let cfg = SideConfig {
        width: args.width,
        rank: args.rank,
        members: args.members,
        activation: match args.activation {
            ActivationArg::Gelu => Activation::Gelu,
            ActivationArg::Silu => Activation::Silu,
            ActivationArg::Relu => Activation::Relu,
        },
        // `both` as the device sends it: a layer's two inputs share its rotation.
        summary: match args.summary {
            Summary::Both => side::Summary::PivotAndMean,
            Summary::Pivot | Summary::Mean => side::Summary::Pivot,
        },
        ..SideConfig::new(taps, hidden, k)
    };
    let zero_shot = accuracy(&predict(&test.logits, None)?, &test.labels);
    eprintln!("zero-shot: {:.1}% on {} held-out ({n_train} training examples)", zero_shot * 100.0, test.labels.len());

    let mut runs = Vec::new();
    for run in 1..=args.runs {
        let ridge = args.ridge.as_deref().filter(|_| run == 1);
        let what = format!("{name} run {run}/{}", args.runs);
        if args.ensemble_tails.is_empty() {
            runs.push(one_run(args, &cfg, &train, &test, ridge, &what, None)?.0);
            continue;
        }
        // An ensemble of one session per tail gain: the mean of their final networks' corrections.
        let (mut parts, mut sum) = (Vec::new(), None::<Tensor>);
        for &g in &args.ensemble_tails {
            let (json, correction) = one_run(args, &cfg, &train, &test, None, &what, Some(g))?;
            let correction = correction.context("an ensemble member ran without a refit (no validation split)")?;
            sum = Some(match sum {
                Some(s) => (s + correction)?,
                None => correction,
            });
            parts.push(json);
        }
        let mean = (sum.context("--ensemble-tails is empty")? / args.ensemble_tails.len() as f64)?;
        let acc = Score::of(&(&test.logits + mean)?, &test.labels)?.accuracy;
        let part_accs: Vec<String> =
            parts.iter().map(|p| format!("{:.1}%", p["pae"]["test_acc"].as_f64().unwrap_or(0.0) * 100.0)).collect();
        eprintln!("{what}: ensemble {:.1}% (each alone: {})", acc * 100.0, part_accs.join(", "));
        let rounds: Vec<_> = parts.iter().map(|p| p["pae"]["rounds_used"].clone()).collect();
        runs.push(serde_json::json!({"pae": {"test_acc": acc, "rounds_used": rounds}, "parts": parts}));
    }
    let spread = |key: &str| -> serde_json::Value {
        let v: Vec<f64> = runs.iter().filter_map(|r| r[key]["test_acc"].as_f64()).collect();
        if v.is_empty() {
            return serde_json::Value::Null;
        }
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let (min, max) = v.iter().fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        serde_json::json!({"mean": mean, "min": min, "max": max})
    };
    Ok(serde_json::json!({
        "task": name,
        "labels": k,
        "train_samples": n_train,
        "test_samples": test.labels.len(),
        "zero_shot_acc": zero_shot,
        "pae": spread("pae"),
        "ce_baseline": spread("ce_baseline"),
        "pae_rounds_used": runs.iter().map(|r| r["pae"]["rounds_used"].clone()).collect::<Vec<_>>(),
        "runs": runs,
    }))
}

/// One run: fresh secrets, validation split and whitening; `pae` and the baseline on the same uploads.
fn one_run(
    args: &Args,
    cfg: &SideConfig,
    train: &Pivots,
    test: &Pivots,
    ridge: Option<&str>,
    what: &str,
    tail: Option<f64>,
) -> Result<(serde_json::Value, Option<Tensor>)> {
    let k = cfg.labels;
    let secrets = if args.no_secrets || args.no_rotation { Secrets::disabled(cfg)? } else { Secrets::generate(cfg)? };
    let (held_back, sent) = validation_split(train.labels.len(), args.max_rounds);
    let rows = |p: &Pivots, idx: &[usize]| -> Result<Pivots> {
        Ok(Pivots {
            taps: select_rows(&p.taps, idx)?,
            logits: select_rows(&p.logits, idx)?,
            labels: idx.iter().map(|&i| p.labels[i]).collect(),
            means: select_rows(&p.means, idx)?,
        })
    };
    let (mut validation, mut train) = (rows(train, &held_back)?, rows(train, &sent)?);
    let mut test = test.clone();
    if args.calibrate {
        let (scale, bias) = fit_calibration(&train.logits, &train.labels)?;
        let apply = |z: &Tensor| -> Result<Tensor> {
            let b = Tensor::new(bias.iter().map(|&b| b as f32).collect::<Vec<_>>().as_slice(), &Device::Cpu)?;
            Ok(((z.to_dtype(DType::F32)? * scale)?.broadcast_add(&b)?).to_dtype(z.dtype())?)
        };
        train.logits = apply(&train.logits)?;
        validation.logits = apply(&validation.logits)?;
        test.logits = apply(&test.logits)?;
        eprintln!(
            "calibrated: scale {scale:.3}, bias {bias:?}; zero-shot {:.1}% held out",
            accuracy(&predict(&test.logits, None)?, &test.labels) * 100.0
        );
    }
    let test = &test;
    let n = train.labels.len();
    // The refit's examples: the sent ones, then the split (as the device sends them).
    let everyone = Pivots {
        taps: Tensor::cat(&[&train.taps, &validation.taps], 0)?,
        logits: Tensor::cat(&[&train.logits, &validation.logits], 0)?,
        labels: train.labels.iter().chain(&validation.labels).copied().collect(),
        means: Tensor::cat(&[&train.means, &validation.means], 0)?,
    };
    // The device whitens (secrets on) with a fit on a random subset of what it sends.
    let mut whitening_config = args.whitening.config(n);
    if let Some(g) = tail {
        whitening_config.tail_gain = g;
    }
    let whitening = if !args.no_secrets {
        let calibration = device_inputs(&select_rows(&train.taps, &random_split(n, args.calibration).0)?, None)?;
        if args.select_tails.len() > 1 {
            // One fit per tail gain; the chosen one is the session's.
            let mut fits = args
                .select_tails
                .iter()
                .map(|&g| Ok(Whitening::fit(&calibration, &whitening::Config { tail_gain: g, ..whitening_config })?))
                .collect::<Result<Vec<_>>>()?;
            let views = args
                .select_tails
                .iter()
                .zip(&fits)
                .map(|(g, w)| Ok((format!("tail {g}"), device_inputs(&train.taps, Some(w))?)))
                .collect::<Result<Vec<_>>>()?;
            let chosen = choose_view(args, cfg, &secrets, &views, &train, what)?;
            whitening_config.tail_gain = args.select_tails[chosen];
            Some(fits.swap_remove(chosen))
        } else {
            Some(Whitening::fit(&calibration, &whitening_config)?)
        }
    } else {
        None
    };
    let plain = |p: &Pivots| device_inputs(&p.taps, whitening.as_ref());
    let (x_plain, x_validation, x_test) = (plain(&train)?, plain(&validation)?, plain(test)?);
    let ridge = match ridge {
        Some(layers) => ridge_head(layers, &x_plain, &x_test, &train, test, args.tau)?,
        None => serde_json::Value::Null,
    };
    let x = through_the_wire(&secrets.rotate_activations(&x_plain)?, cfg.outputs)?;
    let has_validation = !held_back.is_empty();
    let x_everyone = match has_validation {
        true => Some(through_the_wire(&secrets.rotate_activations(&plain(&everyone)?)?, cfg.outputs)?),
        false => None,
    };
    // As the server trains a `pae` session (the baseline too: it trains on the same rotated uploads), its
    // mini-batch sized for every example, which the device declares.
    let tc = server_train_config(args, everyone.labels.len());
    let score = |net: &SideNet, x: &Tensor, p: &Pivots| Score::of(&(&p.logits + net.forward(x)?)?, &p.labels);

    // pae: targets from the device, trained in server coordinates, folded and scored on the device.
    let mut trainer = SideTrainer::new(cfg, &tc)?;
    let mut decoded: Option<Tensor> = None;
    // The held-out accuracy of the mean of the rounds' corrections so far (a round ensemble), for comparison.
    let (mut correction_sum, mut round_mean_acc) = (None::<Tensor>, Vec::new());
    // And of one network whose weights are the mean of the rounds' folded networks so far.
    let (mut weight_sum, mut weight_mean_acc) = (None::<Vec<(&str, Tensor)>>, Vec::new());
    let start = Instant::now();
    let pae = rounds(args.max_rounds, has_validation, args.all_rounds, |round| {
        let delta = prediction_differences(&train.logits, decoded.as_ref(), &train.labels, args.tau)?;
        let targets = (trainer.outputs(&x)? + secrets.encode_targets(&delta)?)?;
        // The server loads the saved weights for each round: a fresh optimiser and shuffle stream.
        trainer = SideTrainer::from_tensors(cfg, &tc, trainer.tensors())?.annealed(0, args.epochs);
        let reports = trainer.fit(&x, &Objective::Regression { targets }, args.epochs, |r, _| {
            eprint!("\r{what}: pae round {round}: epoch {}/{} loss {:.4}  ", r.epoch, r.epochs, r.loss);
            let _ = std::io::stderr().flush();
            ControlFlow::Continue(())
        })?;
        decoded = Some(secrets.decode_outputs(&trainer.outputs(&x)?)?);
        let folded = secrets.fold(trainer.net())?;
        let v = if has_validation { Some(score(&folded, &x_validation, &validation)?) } else { None };
        let correction = folded.forward(&x_test)?;
        let sum = match correction_sum.take() {
            Some(s) => (s + &correction)?,
            None => correction,
        };
        let mean = (&sum / round as f64)?;
        round_mean_acc.push(Score::of(&(&test.logits + mean)?, &test.labels)?.accuracy);
        correction_sum = Some(sum);
        let sum = match weight_sum.take() {
            Some(s) => s
                .into_iter()
                .zip(folded.tensors())
                .map(|((n, a), (_, b))| Ok((n, (a + b)?)))
                .collect::<Result<Vec<_>>>()?,
            None => folded.tensors(),
        };
        let mean: Vec<(&str, Tensor)> =
            sum.iter().map(|(n, t)| Ok((*n, (t / round as f64)?))).collect::<Result<_>>()?;
        let averaged = SideNet::from_tensors(folded.config(), &mean)?;
        weight_mean_acc.push(score(&averaged, &x_test, test)?.accuracy);
        weight_sum = Some(sum);
        Ok((v, score(&folded, &x_test, test)?.accuracy, reports.last().map(|r| r.loss)))
    })?;
    let mut pae = pae;
    // The refit, as the device runs it: the kept number of rounds again, from the initial weights, on everyone.
    let mut final_correction = None;
    if let Some(x_all) = &x_everyone {
        let mut trainer = SideTrainer::new(cfg, &tc)?;
        let mut decoded: Option<Tensor> = None;
        for round in 1..=pae.kept_round {
            let delta = prediction_differences(&everyone.logits, decoded.as_ref(), &everyone.labels, args.tau)?;
            let targets = (trainer.outputs(x_all)? + secrets.encode_targets(&delta)?)?;
            trainer = SideTrainer::from_tensors(cfg, &tc, trainer.tensors())?.annealed(0, args.epochs);
            trainer.fit(x_all, &Objective::Regression { targets }, args.epochs, |r, _| {
                eprint!("\r{what}: pae refit round {round}: epoch {}/{} loss {:.4}  ", r.epoch, r.epochs, r.loss);
                let _ = std::io::stderr().flush();
                ControlFlow::Continue(())
            })?;
            decoded = Some(secrets.decode_outputs(&trainer.outputs(x_all)?)?);
        }
        let folded = secrets.fold(trainer.net())?;
        final_correction = Some(folded.forward(&x_test)?);
        pae.refit(score(&folded, &x_test, test)?.accuracy);
    }
    let pae_s = start.elapsed().as_secs_f64();
    eprintln!(
        "\r{what}: pae {:.1}% (kept round {} of {}; {:.1}% before the refit)          ",
        pae.test_acc * 100.0,
        pae.kept_round,
        pae.rounds_used,
        pae.rule_test_acc.unwrap_or(pae.test_acc) * 100.0
    );

    let baseline = if args.no_baseline {
        None
    } else {
        // Labels on the server: cross-entropy on z_b + o[:K], same uploads, `--epochs` per round.
        let x_val_rot = secrets.rotate_activations(&x_validation)?;
        let x_test_rot = secrets.rotate_activations(&x_test)?;
        let labels = Tensor::new(train.labels.as_slice(), &Device::Cpu)?;
        let objective = Objective::CrossEntropy { labels, prior: train.logits.clone() };
        let mut ce = SideTrainer::new(cfg, &tc)?;
        let trace = rounds(args.max_rounds, has_validation, args.all_rounds, |round| {
            ce = SideTrainer::from_tensors(cfg, &tc, ce.tensors())?.annealed(0, args.epochs);
            let reports = ce.fit(&x, &objective, args.epochs, |r, _| {
                eprint!("\r{what}: baseline round {round}: epoch {}/{} loss {:.4}  ", r.epoch, r.epochs, r.loss);
                let _ = std::io::stderr().flush();
                ControlFlow::Continue(())
            })?;
            let corrections = |x: &Tensor| -> Result<Tensor> { Ok(ce.outputs(x)?.narrow(1, 0, k)?) };
            let v = if has_validation {
                Some(Score::of(&(&validation.logits + corrections(&x_val_rot)?)?, &validation.labels)?)
            } else {
                None
            };
            let t = Score::of(&(&test.logits + corrections(&x_test_rot)?)?, &test.labels)?;
            Ok((v, t.accuracy, reports.last().map(|r| r.loss)))
        })?;
        let mut trace = trace;
        // The same refit: labels on the server could train on everyone just as well.
        if let Some(x_all) = &x_everyone {
            let labels = Tensor::new(everyone.labels.as_slice(), &Device::Cpu)?;
            let objective = Objective::CrossEntropy { labels, prior: everyone.logits.clone() };
            let mut ce = SideTrainer::new(cfg, &tc)?;
            for round in 1..=trace.kept_round {
                ce = SideTrainer::from_tensors(cfg, &tc, ce.tensors())?.annealed(0, args.epochs);
                ce.fit(x_all, &objective, args.epochs, |r, _| {
                    eprint!("\r{what}: baseline refit round {round}: epoch {}/{}  ", r.epoch, r.epochs);
                    let _ = std::io::stderr().flush();
                    ControlFlow::Continue(())
                })?;
            }
            let corrections = ce.outputs(&x_test_rot)?.narrow(1, 0, k)?;
            trace.refit(Score::of(&(&test.logits + corrections)?, &test.labels)?.accuracy);
        }
        eprintln!(
            "\r{what}: baseline {:.1}% (kept round {} of {})          ",
            trace.test_acc * 100.0,
            trace.kept_round,
            trace.rounds_used
        );
        Some(trace)
    };
    let json = serde_json::json!({
        "train_samples": n,
        "validation_samples": held_back.len(),
        "pae": pae.json(),
        "pae_round_mean_acc": round_mean_acc,
        "pae_round_weight_mean_acc": weight_mean_acc,
        "ce_baseline": baseline.map(|b| b.json()),
        "ridge_head": ridge,
        "secrets": secrets.is_enabled(),
        "whitening": whitening.is_some().then_some(whitening_config),
        "side": cfg,
        "train": {"optimizer": tc.optimizer, "lr": args.lr, "batch": tc.batch_size, "epochs_per_round": args.epochs, "max_rounds": args.max_rounds, "tau": args.tau},
        "pae_seconds": pae_s,
    });
    Ok((json, final_correction))
}

/// How the server trains a `pae` session of `examples` examples (the mini-batch is sized by the device's count,
/// by the device's own rule).
fn server_train_config(args: &Args, examples: usize) -> TrainConfig {
    let device = FineTuneConfig { batch_size: args.batch, ..FineTuneConfig::for_mode(Mode::Pae) };
    TrainConfig {
        optimizer: match args.per_weight_adamw {
            true => Optimizer::AdamW,
            false => Optimizer::EquivariantAdamW,
        },
        lr: args.lr,
        batch_size: device.epoch_batch(examples),
        epochs: args.epochs,
        weight_decay: args.weight_decay,
        ..Default::default()
    }
}

/// The view whose round-1 networks, each trained on all folds of the sent examples but one, predict the left-out
/// fold best by the device's labels (ties: the smaller target error, which the server could compute without
/// labels and which alone chooses worse: docs/side-network.md). Prints both for every view.
fn choose_view(
    args: &Args,
    cfg: &SideConfig,
    secrets: &Secrets,
    views: &[(String, Tensor)],
    train: &Pivots,
    what: &str,
) -> Result<usize> {
    let n = train.labels.len();
    let folds = 4;
    let delta = prediction_differences(&train.logits, None, &train.labels, args.tau)?;
    let targets = secrets.encode_targets(&delta)?;
    let tc = server_train_config(args, n);
    let mut shuffled: Vec<usize> = (0..n).collect(); // fold f: the positions ≡ f (mod folds)
    rand::seq::SliceRandom::shuffle(shuffled.as_mut_slice(), &mut rand::rng());
    let (mut best, mut best_key) = (0, (0usize, f64::MIN));
    for (v, (m, x)) in views.iter().enumerate() {
        let x = through_the_wire(&secrets.rotate_activations(x)?, cfg.outputs)?;
        let (mut err, mut correct) = (0.0, 0usize);
        for f in 0..folds {
            let held: Vec<usize> =
                shuffled.iter().enumerate().filter(|(i, _)| i % folds == f).map(|(_, &j)| j).collect();
            let kept: Vec<usize> =
                shuffled.iter().enumerate().filter(|(i, _)| i % folds != f).map(|(_, &j)| j).collect();
            let mut trainer = SideTrainer::new(cfg, &tc)?.annealed(0, args.epochs);
            let objective = Objective::Regression { targets: select_rows(&targets, &kept)? };
            trainer.fit(&select_rows(&x, &kept)?, &objective, args.epochs, |r, _| {
                eprint!("\r{what}: {m} fold {f}: epoch {}/{}  ", r.epoch, r.epochs);
                ControlFlow::Continue(())
            })?;
            let out = trainer.outputs(&select_rows(&x, &held)?)?;
            let diff = (&out - select_rows(&targets, &held)?)?.to_dtype(DType::F32)?;
            err += diff.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            let labels: Vec<u32> = held.iter().map(|&i| train.labels[i]).collect();
            let logits = (select_rows(&train.logits, &held)? + secrets.decode_outputs(&out)?)?;
            correct += Score::of(&logits, &labels)?.correct.iter().filter(|&&c| c).count();
        }
        let err = err / n as f64;
        eprintln!(
            "\r{what}: {m}: held-out target error {err:.4}, fold accuracy {:.1}%      ",
            100.0 * correct as f64 / n as f64
        );
        if (correct, -err) > best_key {
            (best, best_key) = (v, (correct, -err));
        }
    }
    eprintln!("{what}: chose {}", views[best].0);
    Ok(best)
}

/// Temperature and per-label bias minimising the cross-entropy of `scale·z + bias` on `labels` (gradient descent).
fn fit_calibration(logits: &Tensor, labels: &[u32]) -> Result<(f64, Vec<f64>)> {
    let z: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
    let k = z[0].len();
    let n = z.len() as f64;
    let (mut scale, mut bias) = (1.0f64, vec![0.0f64; k]);
    for _ in 0..2000 {
        let (mut g_scale, mut g_bias) = (0.0, vec![0.0; k]);
        for (row, &y) in z.iter().zip(labels) {
            let s: Vec<f64> = row.iter().zip(&bias).map(|(&v, b)| scale * v as f64 + b).collect();
            let m = s.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            for j in 0..k {
                let g = e[j] / sum - if j == y as usize { 1.0 } else { 0.0 };
                g_bias[j] += g / n;
                g_scale += g * row[j] as f64 / n;
            }
        }
        scale -= 0.1 * g_scale;
        for j in 0..k {
            bias[j] -= 0.5 * g_bias[j];
        }
    }
    Ok((scale, bias))
}

/// The pivots with `taps` replaced by what `summary` sends: `[N, T, d]` pivots or means, or `[N, 2T, d]` with each
/// layer's pivot followed by its mean.
fn summarise(p: Pivots, summary: Summary) -> Result<Pivots> {
    let taps = match summary {
        Summary::Pivot => p.taps.clone(),
        Summary::Mean => p.means.clone(),
        Summary::Both => side::Summary::PivotAndMean.inputs(&p.taps, Some(&p.means))?,
    };
    Ok(Pivots { taps, ..p })
}

/// The activations as the server stores them: through an int8 frame (the device's default quantisation) and
/// kept as f16.
fn through_the_wire(x: &Tensor, k_out: usize) -> Result<Tensor> {
    let (n, t, d) = x.dims3()?;
    let limits = Limits { max_decoded_bytes: usize::MAX, ..Limits::default() };
    let mut parts = Vec::new();
    for start in (0..n).step_by(64) {
        let m = 64.min(n - start);
        let acts = x.narrow(0, start, m)?.flatten_all()?.to_vec1::<f32>()?;
        let ids = (0..m).map(|_| SampleId::random()).collect::<mobillm_core::Result<Vec<_>>>()?;
        let frame = Frame::samples(ids, t, d, acts, k_out, vec![0.0; m * k_out]);
        let (decoded, _) = Frame::decode(&frame.encode(Quant::Int8)?, &limits)?;
        parts.push(Tensor::from_vec(decoded.activations, (m, t, d), &Device::Cpu)?.to_dtype(DType::F16)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// Rounds of training as the device runs them: until the validation score stops improving (`Stopping`) or
/// `max_rounds`; without a validation split, the fixed [`ROUNDS_WITHOUT_VALIDATION`]. With `all_rounds`, the
/// rounds after the rule stops run and are recorded too, without changing the round kept. `round` trains one
/// round and returns its validation result, held-out accuracy and last loss.
fn rounds(
    max_rounds: usize,
    has_validation: bool,
    all_rounds: bool,
    mut round: impl FnMut(usize) -> Result<(Option<Score>, f64, Option<f64>)>,
) -> Result<Trace> {
    let max = if has_validation { max_rounds } else { max_rounds.min(ROUNDS_WITHOUT_VALIDATION) };
    let mut stopping = Stopping::default();
    let mut trace = Trace::default();
    let mut stopped = false;
    for r in 1..=max {
        let (validation, test_acc, loss) = round(r)?;
        trace.rounds.push(serde_json::json!({
            "round": r, "loss": loss, "test_acc": test_acc,
            "validation_acc": validation.as_ref().map(|v| v.accuracy),
            "validation_loss": validation.as_ref().map(|v| v.loss),
            "validation_correct": validation.as_ref().map(|v| v.correct.iter().map(|&c| if c { '1' } else { '0' }).collect::<String>()),
        }));
        if stopped {
            continue;
        }
        trace.rounds_used = r;
        let improved = match validation {
            Some(v) => stopping.improved(r, v),
            None => true,
        };
        if improved {
            (trace.kept_round, trace.test_acc) = (r, test_acc);
        } else if all_rounds {
            stopped = true;
        } else {
            break;
        }
    }
    Ok(trace)
}

/// The rounds one training ran and the held-out accuracy of what it ends with: the kept round's network, or after
/// a refit the refit's (`rule_test_acc` then holds the kept round's).
#[derive(Default)]
struct Trace {
    rounds: Vec<serde_json::Value>,
    rounds_used: usize,
    kept_round: usize,
    test_acc: f64,
    rule_test_acc: Option<f64>,
}

impl Trace {
    /// The refit's network, trained for `kept_round` rounds on every example, replaces the kept one.
    fn refit(&mut self, test_acc: f64) {
        self.rule_test_acc = Some(self.test_acc);
        self.test_acc = test_acc;
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "test_acc": self.test_acc, "rounds_used": self.rounds_used, "kept_round": self.kept_round,
            "refit_rounds": if self.rule_test_acc.is_some() { self.kept_round } else { 0 },
            "rule_test_acc": self.rule_test_acc, "rounds": self.rounds,
        })
    }
}

/// The summary table (Markdown): per task, zero-shot and mean [min–max] of `pae` and the baseline.
fn table(results: &[serde_json::Value], runs: usize) -> String {
    let pct = |v: &serde_json::Value| v.as_f64().map_or("—".to_string(), |x| format!("{:.1}", x * 100.0));
    let spread = |v: &serde_json::Value| match runs {
        1 => format!("{}%", pct(&v["mean"])),
        _ => format!("{}% [{}–{}]", pct(&v["mean"]), pct(&v["min"]), pct(&v["max"])),
    };
    let mut out = format!(
        "| task | labels | train / held out | zero-shot | `pae` ({runs} run{}) | rounds used | cross-entropy baseline |\n|---|---:|---:|---:|---:|---:|---:|\n",
        if runs == 1 { "" } else { "s" }
    );
    for r in results {
        let rounds: Vec<String> =
            r["pae_rounds_used"].as_array().into_iter().flatten().map(|v| v.to_string()).collect();
        out.push_str(&format!(
            "| {} | {} | {} / {} | {}% | {} | {} | {} |\n",
            r["task"].as_str().unwrap_or("?"),
            r["labels"],
            r["train_samples"],
            r["test_samples"],
            pct(&r["zero_shot_acc"]),
            spread(&r["pae"]),
            rounds.join(", "),
            if r["ce_baseline"].is_null() { "—".to_string() } else { spread(&r["ce_baseline"]) },
        ));
    }
    out
}

/// A ridge readout of some layers' device inputs `[N, T, d]`, fitted on the round-1 targets Δ (in its dual form,
/// so any number of layers fits in N×N): held-out accuracy of `z_b + readout` per ridge penalty.
fn ridge_head(
    layers: &str,
    x_train: &Tensor,
    x_test: &Tensor,
    train: &Pivots,
    test: &Pivots,
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
