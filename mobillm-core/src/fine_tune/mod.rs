//! The whole device side of a fine-tune (docs/design.md §1, §4, §5), in any of the three modes: [`fine_tune`]
//! forwards the examples on the backbone, trains through the assist server (`pae`, `mobillm`) or on the device
//! (`local`), folds the session's secrets into the result and scores it on the held-out examples.
//!
//! - [`config`]: [`FineTuneConfig`], with one source of defaults per mode;
//! - [`progress`]: what a listener hears, and [`CancelToken`];
//! - [`remote`]: the session on the server — the only way a fine-tune talks to it;
//! - `pae`, `mobillm` and `local`: the modes' loops; `held_out`: held-out pivots and their scoring;
//! - `stopping`: the validation split and the rule that ends the rounds of `pae` and `local`;
//! - [`state`]: a `pae` fine-tune's record on the device, from which [`resume`] continues it.
//!
//! The contract: `fine_tune` blocks (call it from a background thread); it returns the folded adapter and the
//! figures of the run, or an [`Error`] naming what failed. The server session is deleted when the fine-tune ends,
//! fails or is cancelled (unless asked to keep it), so no activation outlives it. A cancelled fine-tune returns
//! [`Error::Cancelled`] within one forward batch, one server poll or one epoch of local training.
//!
//! A `pae` fine-tune given a state file ([`FineTuneConfig::state`]) is resumable: it records every acknowledged
//! step there, and when it stops short — the process killed, the network gone, [`CancelToken::detach`] — its
//! server session is kept (until the server's idle expiry) and [`resume`] continues it from the last
//! acknowledged step, in this process or another: no acknowledged example is forwarded or sent again and the
//! secrets stay the same. Only the end of the fine-tune or a cancel deletes the session and the file.

pub mod config;
mod held_out;
mod local;
mod mobillm;
mod pae;
pub mod progress;
pub mod remote;
pub mod state;
pub mod stopping;

use std::cell::Cell;
use std::ops::ControlFlow;
use std::time::Instant;

use candle_core::Tensor;
use rand::TryRngCore;

pub use config::{FineTuneConfig, Mode};
pub use progress::{CancelToken, Phase, Progress};
pub use state::StateFile;

use crate::backbone::batching::{Batches, BATCH_TOKENS};
use crate::backbone::Backbone;
use crate::client;
use crate::dataset::Example;
use crate::error::{Error, Result};
use crate::side::config::default_outputs;
use crate::side::{label_noise, DeviceAdapter, Secrets, SideConfig, SideNet, Whitening};
use crate::task::{Task, TaskSpec};
use held_out::Pivots;
use remote::RemoteSession;
use state::{Journal, Start};

/// The result of a fine-tune.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub mode: Mode,
    pub adapter: DeviceAdapter,
    /// Training examples given; `validation_samples` of them were held back on the device to decide when to stop
    /// (`pae`, see [`stopping`]) and the rest were sent.
    pub train_samples: usize,
    pub validation_samples: usize,
    pub test_samples: usize,
    /// Held-out accuracy of the backbone alone and with the adapter (`None` without held-out examples).
    pub zero_shot_acc: Option<f64>,
    pub finetuned_acc: Option<f64>,
    /// The ε of the label noise the fine-tune trained with (`None`: the true labels).
    pub label_epsilon: Option<f64>,
    /// Bytes of every frame the device sent (activations, targets).
    pub upload_bytes: u64,
    /// Seconds the device spent in backbone forwards of training examples.
    pub device_forward_s: f64,
    /// Seconds the device spent training the side network (`local`; 0 otherwise).
    pub device_train_s: f64,
    /// Seconds between asking the server to train and its reporting done, summed over rounds (`pae`); the
    /// server's step time as seen by the device (`mobillm`).
    pub server_train_s: f64,
    pub wall_s: f64,
    /// Refinement rounds run (`pae`; at most `max_rounds`) or passes over the data (`mobillm`), and the one the
    /// validation split chose (the last that improved on it; the last without one).
    pub rounds_used: usize,
    pub kept_round: usize,
    /// `pae` with a validation split: the rounds run again from the initial weights on every example, the split
    /// included (`kept_round` of them; `stopping`); the adapter holds the last one's network. 0 otherwise: the
    /// adapter holds `kept_round`'s.
    pub refit_rounds: usize,
    /// Held-out accuracy after each refinement round (`pae`, the refit's after them) or pass over the data
    /// (`mobillm`), with the time since the fine-tune started, evaluation excluded (for time-to-accuracy); empty
    /// without held-out examples.
    pub rounds: Vec<RoundReport>,
    /// Times the fine-tune was resumed from its state file (0: it ran in one go). The figures above add up every
    /// process's share.
    pub resumes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RoundReport {
    pub round: usize,
    pub finetuned_acc: f64,
    /// Accuracy on the device's validation split (`pae` with one).
    pub validation_acc: Option<f64>,
    /// Seconds since this process started the fine-tune, less the time spent forwarding and scoring the held-out
    /// examples: evaluation is not training, and an app that passes no held-out set never spends it.
    pub elapsed_s: f64,
}

/// Runs a whole fine-tune: see the module documentation. `test` may be empty (no evaluation). With a state file
/// (`pae` only), none may be there yet: an earlier fine-tune's record is resumed or deleted, never overwritten.
pub fn fine_tune(
    backbone: &Backbone,
    spec: TaskSpec,
    train: &[Example],
    test: &[Example],
    cfg: &FineTuneConfig,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Outcome> {
    if let Some(file) = &cfg.state {
        if cfg.mode != Mode::Pae || cfg.decoys > 0 {
            return Err(Error::InvalidInput(
                "a state file (resumable fine-tunes) is for `pae` mode without decoys: `local` and `mobillm` \
                 fine-tunes start again after a kill"
                    .into(),
            ));
        }
        if file.exists() {
            return Err(Error::InvalidInput(format!(
                "{} holds a fine-tune's state already: resume it, or delete the file to start a new one",
                file.path.display()
            )));
        }
    }
    run(backbone, spec, train, test, cfg, cancel, progress, false)
}

/// Continues the `pae` fine-tune recorded in `cfg.state` from its last acknowledged step, with the same backbone,
/// task, training examples and options (anything else is [`Error::CannotResume`] naming what differs). `test`
/// may differ: the held-out set is forwarded again.
pub fn resume(
    backbone: &Backbone,
    spec: TaskSpec,
    train: &[Example],
    test: &[Example],
    cfg: &FineTuneConfig,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Outcome> {
    if cfg.state.is_none() {
        return Err(Error::InvalidInput("resuming needs the state file the fine-tune was started with".into()));
    }
    run(backbone, spec, train, test, cfg, cancel, progress, true)
}

#[allow(clippy::too_many_arguments)]
fn run(
    backbone: &Backbone,
    spec: TaskSpec,
    train: &[Example],
    test: &[Example],
    cfg: &FineTuneConfig,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&Progress),
    resuming: bool,
) -> Result<Outcome> {
    let started = Instant::now();
    let task = Task::new(spec, backbone.tokenizer())?;
    if train.is_empty() {
        return Err(Error::InvalidInput("no training examples".into()));
    }
    cfg.validate()?;
    let all_labels = label_indices(&task, train)?;
    let taps = cfg.taps.clone().unwrap_or_else(|| backbone.all_taps());
    let k = task.labels().len();
    let side = SideConfig {
        width: cfg.width,
        rank: cfg.rank,
        members: cfg.members,
        // Decoys take K outputs each; the padding still hides K when there is room. A local network has nothing
        // to hide.
        outputs: match cfg.mode {
            Mode::Local => k,
            _ => default_outputs(k).max(k * (cfg.decoys + 1)),
        },
        summary: cfg.summary,
        ..SideConfig::new(taps.len() * cfg.summary.count(), backbone.config().hidden_size, k)
    };
    side.validate()?;
    let data = state::data_fingerprint(task.spec(), train);
    // A resumed fine-tune takes its split, seeds and server session from its record.
    let journal = match (resuming, &cfg.state) {
        (true, Some(file)) => Some(Journal::resume(file.clone(), backbone.fingerprint(), &data, cfg, k)?),
        _ => None,
    };
    // The validation split stays on the device, so it keeps its true labels even under label noise.
    let (held_back, sent) = match (&journal, cfg.mode) {
        (Some(j), _) => {
            let held: Vec<usize> = j.record.validation.clone();
            if held.iter().any(|&i| i >= train.len()) {
                return Err(Error::Internal("the record's validation split is out of range".into()));
            }
            let sent = (0..train.len()).filter(|i| held.binary_search(i).is_err()).collect();
            (held, sent)
        }
        (None, Mode::Pae | Mode::Local) => stopping::validation_split(train.len(), cfg.max_rounds),
        (None, Mode::Mobillm) => (Vec::new(), (0..train.len()).collect()),
    };
    let validation: Vec<Example> = held_back.iter().map(|&i| train[i].clone()).collect();
    let validation_labels: Vec<u32> = held_back.iter().map(|&i| all_labels[i]).collect();
    let fit: Vec<Example> = sent.iter().map(|&i| train[i].clone()).collect();
    // Drawn once, for every example: every round trains on the same noisy labels and the refit sends the split's
    // (`stopping`), so each label is released once (and a resumed fine-tune draws the same from its recorded
    // seed).
    let noise_seed = match (&journal, cfg.label_epsilon) {
        (Some(j), _) => j.record.noise_seed,
        (None, Some(_)) => Some(os_seed()?),
        (None, None) => None,
    };
    let released = match (cfg.label_epsilon, noise_seed) {
        (Some(epsilon), Some(seed)) => label_noise::randomize(&all_labels, task.labels().len(), epsilon, seed)?,
        _ => all_labels.clone(),
    };
    let labels: Vec<u32> = sent.iter().map(|&i| released[i]).collect();
    let refit_labels: Vec<u32> = held_back.iter().map(|&i| released[i]).collect();
    let test_labels = label_indices(&task, test)?;
    let secrets = match (&journal, cfg.mode == Mode::Pae && cfg.secrets) {
        (Some(j), true) => Secrets::from_seed(
            &side,
            j.record.secret_seed.ok_or_else(|| Error::Internal("the record has no secret seed".into()))?,
        )?,
        (None, true) => {
            progress(&Progress::new(Phase::Secrets, 0, 1, 0, None));
            Secrets::generate(&side)?
        }
        (_, false) => Secrets::disabled(&side)?,
    };
    cancel.check()?;
    let run = Run {
        backbone,
        task: &task,
        taps: &taps,
        side: &side,
        secrets: &secrets,
        cfg,
        cancel,
        test_labels: &test_labels,
        started,
        evaluation_s: Cell::new(0.0),
    };
    let validation = (validation.as_slice(), validation_labels.as_slice());
    let mut resumes = 0;
    let mut wall_before = 0.0;
    let trained = match cfg.mode {
        Mode::Local => run.local(&fit, &labels, validation, test, progress).map_err(detach_means_cancel)?,
        Mode::Mobillm => {
            // Dropping the session deletes it on the server: when its loop ends, fails or is cancelled.
            let remote = RemoteSession::open(cfg, &side, backbone.fingerprint(), fit.len())?;
            run.mobillm(&remote, &fit, &labels, test, progress).map_err(detach_means_cancel)?
        }
        Mode::Pae => {
            let (remote, mut journal) = match journal {
                Some(journal) => {
                    let acked = journal.record.acked.iter().filter(|&&a| a).count();
                    let session = client::Session::from(&journal.record.server);
                    let path = journal.path().unwrap_or(std::path::Path::new("")).to_path_buf();
                    (RemoteSession::reopen(cfg, &side, session, acked, &path)?, journal)
                }
                None => {
                    // Sized for every example: the refit sends the split too.
                    let remote = RemoteSession::open(cfg, &side, backbone.fingerprint(), train.len())?;
                    let journal = Journal::start(
                        cfg.state.clone(),
                        Start {
                            backbone: backbone.fingerprint(),
                            data: data.clone(),
                            cfg,
                            session: remote.session(),
                            secret_seed: secrets.seed(),
                            noise_seed,
                            validation: held_back.clone(),
                            sent: fit.len(),
                            labels: k,
                        },
                    )?;
                    // Recorded: from here on a stop short of the end keeps the session for `resume`.
                    remote.keep_on_drop(cfg.keep_server_session || cfg.state.is_some());
                    (remote, journal)
                }
            };
            resumes = journal.record.resumes;
            wall_before = journal.record.wall_s;
            let result = run.pae(
                &remote,
                &mut journal,
                (&fit, &labels),
                (validation.0, validation.1, &refit_labels),
                test,
                progress,
            );
            match result {
                // The end and a cancel delete the record and (unless asked to keep it) the session.
                Ok(_) | Err(Error::Cancelled) => {
                    remote.keep_on_drop(cfg.keep_server_session);
                    journal.remove()?;
                    result?
                }
                Err(Error::Detached { .. }) if journal.path().is_none() => {
                    // Nothing to come back to: a detach without a state file is a cancel.
                    return Err(Error::Cancelled);
                }
                Err(e) => {
                    // Kept for `resume` (its session too); the time spent so far counts in the end.
                    journal.record.wall_s += started.elapsed().as_secs_f64();
                    journal.save()?;
                    return Err(match e {
                        Error::Detached { .. } => Error::Detached {
                            path: journal.path().map(|p| p.to_path_buf()).unwrap_or_default(),
                            idle_ttl_s: remote.session().idle_ttl_s,
                        },
                        e => e,
                    });
                }
            }
        }
    };

    let adapter = DeviceAdapter {
        task: task.spec().clone(),
        taps: taps.clone(),
        backbone_fingerprint: backbone.fingerprint().to_string(),
        secret_seed: secrets.seed(),
        whitening: trained.whitening,
        net: trained.rounds.kept.ok_or_else(|| Error::Internal("no round ran".into()))?,
    };
    let (zero_shot_acc, finetuned_acc) = match &trained.held_out {
        Some(p) => (Some(p.accuracy(None, &test_labels)?), Some(p.accuracy(Some(&adapter.net), &test_labels)?)),
        None => (None, None),
    };
    progress(&Progress::new(Phase::Done, 1, 1, 0, trained.loss));
    Ok(Outcome {
        mode: cfg.mode,
        adapter,
        train_samples: train.len(),
        validation_samples: validation.0.len(),
        test_samples: test.len(),
        zero_shot_acc,
        finetuned_acc,
        label_epsilon: cfg.label_epsilon,
        upload_bytes: trained.upload_bytes,
        device_forward_s: trained.device_forward_s,
        device_train_s: trained.device_train_s,
        server_train_s: trained.server_train_s,
        wall_s: wall_before + started.elapsed().as_secs_f64(),
        rounds_used: trained.rounds.used,
        kept_round: trained.rounds.stopping.best_round().unwrap_or(trained.rounds.used),
        refit_rounds: trained.rounds.refit,
        rounds: trained.rounds.reports,
        resumes,
    })
}

/// A detach where there is nothing to come back to (`local`, `mobillm`) is a cancel.
fn detach_means_cancel(e: Error) -> Error {
    match e {
        Error::Detached { .. } => Error::Cancelled,
        e => e,
    }
}

/// A fresh secret from the operating system's CSPRNG.
pub(crate) fn os_seed() -> Result<[u8; 32]> {
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.try_fill_bytes(&mut seed).map_err(|e| Error::Internal(format!("OS RNG: {e}")))?;
    Ok(seed)
}

/// A random `m` of the indices `0..n` and the others, each sorted: the whitening's calibration subset and the
/// validation split are drawn with it (public so the lab's harnesses draw theirs the same way).
pub fn random_split(n: usize, m: usize) -> (Vec<usize>, Vec<usize>) {
    let mut chosen = rand::seq::index::sample(&mut rand::rng(), n, m.min(n)).into_vec();
    chosen.sort_unstable();
    let mut is_chosen = vec![false; n];
    chosen.iter().for_each(|&i| is_chosen[i] = true);
    (chosen, (0..n).filter(|&i| !is_chosen[i]).collect())
}

fn label_indices(task: &Task, examples: &[Example]) -> Result<Vec<u32>> {
    examples
        .iter()
        .enumerate()
        .map(|(i, e)| {
            task.label_index(&e.label).map(|l| l as u32).ok_or_else(|| {
                Error::InvalidInput(format!("example {i}: label {:?} is not one of {:?}", e.label, task.labels()))
            })
        })
        .collect()
}

/// What the modes' loops share.
struct Run<'a> {
    backbone: &'a Backbone,
    task: &'a Task,
    taps: &'a [usize],
    side: &'a SideConfig,
    secrets: &'a Secrets,
    cfg: &'a FineTuneConfig,
    cancel: &'a CancelToken,
    test_labels: &'a [u32],
    started: Instant,
    /// Seconds spent forwarding and scoring the held-out examples so far (left out of `elapsed_s`).
    evaluation_s: Cell<f64>,
}

/// What a mode's loop hands back.
struct Trained {
    rounds: Rounds,
    whitening: Option<Whitening>,
    held_out: Option<Pivots>,
    upload_bytes: u64,
    device_forward_s: f64,
    server_train_s: f64,
    device_train_s: f64,
    loss: Option<f64>,
}

/// A fine-tune's rounds (`pae`, `local`) or passes (`mobillm`) so far: their reports, the network kept, and the
/// validation rule that ends them.
#[derive(Default)]
struct Rounds {
    reports: Vec<RoundReport>,
    kept: Option<SideNet>,
    stopping: stopping::Stopping,
    used: usize,
    /// The refit's rounds run (`pae`).
    refit: usize,
}

impl Run<'_> {
    /// Runs `f` as evaluation: its time is left out of the rounds' `elapsed_s`.
    fn evaluating<R>(&self, f: impl FnOnce() -> R) -> R {
        let start = Instant::now();
        let out = f();
        self.evaluation_s.set(self.evaluation_s.get() + start.elapsed().as_secs_f64());
        out
    }

    /// Seconds since the fine-tune started, evaluation excluded.
    fn training_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64() - self.evaluation_s.get()
    }

    /// The forward batches of `examples`, at most `forward_batch` examples and `max_tokens` padded tokens each.
    fn plan(&self, examples: &[Example], max_tokens: usize) -> Result<Batches> {
        let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
        Batches::plan(self.task, self.backbone.tokenizer(), &texts, self.cfg.forward_batch, max_tokens)
    }

    /// Forwards `examples` in token-budget batches and hands each batch's example indices, side-network inputs
    /// `[B, T, d]` (the summary's, not yet normalised) and label logits `[B, K]` to `each`; checks for a cancel
    /// before every batch and reports `phase` after it.
    fn forward_each(
        &self,
        examples: &[Example],
        (phase, round): (Phase, usize),
        progress: &mut dyn FnMut(&Progress),
        mut each: impl FnMut(&[usize], &Tensor, &Tensor) -> Result<()>,
    ) -> Result<()> {
        let batches = self.plan(examples, BATCH_TOKENS)?;
        let mut done = 0;
        for group in &batches.groups {
            self.cancel.check()?;
            let out =
                self.backbone.llama().forward_pivots(&batches.batch(group), self.taps, self.task.label_token_ids())?;
            each(group, &self.side.summary.inputs(&out.taps, out.means.as_ref())?, &out.label_logits)?;
            done += group.len();
            progress(&Progress::new(phase, done, examples.len(), round, None));
        }
        Ok(())
    }

    /// `round`'s report: `net` scored on the held-out pivots, as evaluation, and the training time up to it.
    fn report(
        &self,
        round: usize,
        net: &SideNet,
        held_out: &Pivots,
        validation_acc: Option<f64>,
    ) -> Result<RoundReport> {
        let elapsed_s = self.training_s();
        let finetuned_acc = self.evaluating(|| held_out.accuracy(Some(net), self.test_labels))?;
        Ok(RoundReport { round, finetuned_acc, validation_acc, elapsed_s })
    }

    /// Ends `round` with its folded network: scores it on the held-out pivots and the validation split (each if
    /// any), records it, and keeps it unless it did not improve on the split; `Break` when the rounds should stop.
    fn end_round(
        &self,
        rounds: &mut Rounds,
        round: usize,
        net: SideNet,
        held_out: Option<&Pivots>,
        validation: Option<(&Pivots, &[u32])>,
    ) -> Result<ControlFlow<()>> {
        rounds.used = round;
        let score = validation.map(|(pivots, labels)| pivots.score(&net, labels)).transpose()?;
        if let Some(p) = held_out {
            rounds.reports.push(self.report(round, &net, p, score.as_ref().map(|s| s.accuracy))?);
        }
        if score.is_some_and(|score| !rounds.stopping.improved(round, score)) {
            return Ok(ControlFlow::Break(()));
        }
        rounds.kept = Some(net);
        Ok(ControlFlow::Continue(()))
    }
}
