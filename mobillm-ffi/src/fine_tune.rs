//! A fine-tune as the apps run it: a session that collects labelled examples, its options, what a progress
//! listener hears, the cancel handle, and the result.

use std::sync::{Arc, Mutex};

use mobillm_core::dataset::Example;
use mobillm_core::fine_tune::{self, CancelToken, FineTuneConfig};

use crate::adapter::Adapter;
use crate::backbone::{Backbone, Task};
use crate::error::{guarded, MobiLlmError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum FineTuneMode {
    /// PAE MobiLLM (default): pivots once, device-defined targets, secrets; labels never leave the device.
    Pae,
    /// MobiLLM: all tokens every epoch, labels on the server (for comparison).
    Mobillm,
    /// No server: the device keeps its pivots and trains the side network itself; nothing leaves the phone.
    /// Costs device time and memory instead of a server (docs/modes.md); the kept pivots may take at most 256 MB
    /// (about 15 000 examples on SmolLM2-135M).
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum Quantization {
    F16,
    Int8,
    Int4,
}

/// What a `pae` fine-tune sends of each tapped layer, per example.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum LayerSummary {
    /// The hidden state at the answer cue (default).
    Pivot,
    /// The pivot and the mean over the prompt's tokens: twice the upload, for long texts and labels that rest on a
    /// few words.
    PivotAndMean,
}

/// How to reach the assist server and how to train. Unset fields take the SDK's defaults for the mode (those of
/// `mobillm_core::fine_tune::FineTuneConfig::for_mode`). `local` mode needs neither the server's URL nor its key.
/// `Debug` never prints the API key.
#[derive(Clone, uniffi::Record)]
pub struct FineTuneOptions {
    /// `https://…` (`http://` only to loopback, unless `allow_insecure_http`).
    #[uniffi(default = "")]
    pub server_url: String,
    /// The server's API key for creating sessions.
    #[uniffi(default = "")]
    pub api_key: String,
    /// Trust only this CA certificate (PEM) instead of the platform's trust store.
    #[uniffi(default = None)]
    pub ca_pem: Option<String>,
    /// Allow plain `http://` to a host that is not loopback (development only, e.g. an emulator reaching its
    /// host at 10.0.2.2): activations and tokens then cross the network in the clear.
    #[uniffi(default = None)]
    pub allow_insecure_http: Option<bool>,
    #[uniffi(default = None)]
    pub mode: Option<FineTuneMode>,
    /// `pae`, `local`: epochs per round (default 10). `mobillm`: passes over the data (default 3).
    #[uniffi(default = None)]
    pub epochs: Option<u32>,
    /// `pae`, `local`: at most this many rounds (default 8; `local` 4); fewer when the tenth of the examples held back on
    /// the device stops improving (below 200 examples there is no split and 3 rounds run).
    #[uniffi(default = None)]
    pub max_rounds: Option<u32>,
    #[uniffi(default = None)]
    pub learning_rate: Option<f64>,
    #[uniffi(default = None)]
    pub quantization: Option<Quantization>,
    /// Width (default 32) and bottleneck rank (default 16) of each of the four side networks trained side by side.
    #[uniffi(default = None)]
    pub width: Option<u32>,
    #[uniffi(default = None)]
    pub rank: Option<u32>,
    /// Examples per device forward (default 16).
    #[uniffi(default = None)]
    pub forward_batch: Option<u32>,
    /// How often to poll the server during training, in milliseconds (default 250).
    #[uniffi(default = None)]
    pub poll_millis: Option<u32>,
    /// Label differential privacy: train on labels passed through randomized response at this ε (smaller is
    /// more private and less accurate). Unset: the true labels.
    #[uniffi(default = None)]
    pub label_epsilon: Option<f64>,
    /// Decoy tasks sent beside the real one (`pae` with secrets, at most 7; default 0): the server's targets then
    /// hold several partitions of the samples, and only the device knows which is real.
    #[uniffi(default = None)]
    pub decoys: Option<u32>,
    /// `pae`, `local`: what is kept of each tapped layer (default: its pivot).
    #[uniffi(default = None)]
    pub summary: Option<LayerSummary>,
    /// `pae`: make the fine-tune resumable. Every acknowledged step is recorded in this file (in the app's
    /// private storage; it holds the server session's token and the secret seed, never text or activations), so
    /// that after the app is killed, the network fails or [`CancelHandle::detach`], [`FineTuneSession::resume`]
    /// continues it. Deleted when the fine-tune ends or is cancelled. Unset: the fine-tune runs in one go.
    #[uniffi(default = None)]
    pub state_path: Option<String>,
    /// Seal the state file with this 32-byte key (from the platform's keystore).
    #[uniffi(default = None)]
    pub state_key: Option<Vec<u8>>,
}

impl std::fmt::Debug for FineTuneOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FineTuneOptions")
            .field("server_url", &self.server_url)
            .field("api_key", &"<redacted>")
            .field("mode", &self.mode)
            .field("epochs", &self.epochs)
            .field("max_rounds", &self.max_rounds)
            .field("label_epsilon", &self.label_epsilon)
            .field("decoys", &self.decoys)
            .field("summary", &self.summary)
            .field("state_path", &self.state_path)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum FineTunePhase {
    Secrets,
    Forward,
    Train,
    Targets,
    /// Training again on every example, the validation split included, for the rounds the rule kept.
    Refit,
    Evaluate,
    Done,
}

#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct FineTuneProgress {
    pub phase: FineTunePhase,
    pub done: u64,
    pub total: u64,
    /// Refinement round (`pae`) or pass over the data (`mobillm`).
    pub round: u32,
    pub loss: Option<f64>,
}

/// Receives progress on the fine-tune's own thread.
#[uniffi::export(with_foreign)]
pub trait ProgressListener: Send + Sync {
    fn on_progress(&self, progress: FineTuneProgress);
}

/// Stops the fine-tune of the session that handed it out; usable from any thread.
#[derive(uniffi::Object)]
pub struct CancelHandle {
    token: CancelToken,
}

#[uniffi::export]
impl CancelHandle {
    /// Ends the fine-tune with [`MobiLlmError::Cancelled`]: its server session and state file are deleted.
    pub fn cancel(&self) {
        self.token.cancel();
    }

    /// Puts a resumable fine-tune down (one with a `state_path`): it ends with [`MobiLlmError::Detached`] within
    /// one batch or one server poll, keeping its state file and server session, and the server goes on training.
    /// [`FineTuneSession::resume`] picks it up later, in this process or another. Without a state file, a cancel.
    pub fn detach(&self) {
        self.token.detach();
    }

    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }
}

#[derive(uniffi::Record)]
pub struct FineTuneResult {
    pub adapter: Arc<Adapter>,
    /// Held-out accuracy of the backbone alone and with the adapter (absent without held-out examples).
    pub zero_shot_accuracy: Option<f64>,
    pub finetuned_accuracy: Option<f64>,
    /// The ε of the label noise the fine-tune trained with (absent: the true labels).
    pub label_epsilon: Option<f64>,
    /// Training examples given; `validation_samples` of them stayed on the device to decide when to stop.
    pub train_samples: u64,
    pub validation_samples: u64,
    pub test_samples: u64,
    /// Rounds run (`pae`, `local`) or passes over the data (`mobillm`), and the one the validation split chose.
    pub rounds_used: u32,
    pub kept_round: u32,
    /// `pae` with a validation split: the rounds run again on every example (`kept_round` of them), whose last
    /// network the adapter holds; 0 otherwise (the adapter holds `kept_round`'s).
    pub refit_rounds: u32,
    pub upload_bytes: u64,
    pub device_forward_seconds: f64,
    /// Seconds the device spent training the side network (`local`; 0 otherwise).
    pub device_train_seconds: f64,
    pub server_train_seconds: f64,
    pub wall_seconds: f64,
    /// Times the fine-tune was resumed (0: it ran in one go); the figures above add up every run's share.
    pub resumes: u32,
}

#[derive(Debug, Clone, uniffi::Record)]
pub struct LabeledText {
    pub text: String,
    pub label: String,
}

/// Collects labelled examples for one task and fine-tunes the backbone on them, through an assist server or on
/// the device (`local`).
#[derive(uniffi::Object)]
pub struct FineTuneSession {
    backbone: Arc<mobillm_core::Backbone>,
    spec: mobillm_core::TaskSpec,
    examples: Mutex<Vec<Example>>,
    held_out: Mutex<Vec<Example>>,
    cancel: CancelToken,
    running: Mutex<bool>,
}

fn poisoned<T>(_: T) -> MobiLlmError {
    MobiLlmError::internal("a lock was poisoned by an earlier panic")
}

impl FineTuneSession {
    fn check_label(&self, e: &LabeledText) -> Result<Example> {
        if !self.spec.labels.contains(&e.label) {
            return Err(MobiLlmError::InvalidInput {
                reason: format!("label {:?} is not one of the task's labels {:?}", e.label, self.spec.labels),
            });
        }
        Ok(Example { text: e.text.clone(), label: e.label.clone() })
    }

    fn add_to(&self, list: &Mutex<Vec<Example>>, items: &[LabeledText]) -> Result<u64> {
        // All or nothing: one bad label adds none of the batch.
        let checked = items.iter().map(|e| self.check_label(e)).collect::<Result<Vec<_>>>()?;
        let mut list = list.lock().map_err(poisoned)?;
        list.extend(checked);
        Ok(list.len() as u64)
    }

    fn set_running(&self, running: bool) {
        if let Ok(mut r) = self.running.lock() {
            *r = running;
        }
    }

    fn run(
        &self,
        options: &FineTuneOptions,
        listener: Option<&dyn ProgressListener>,
        resume: bool,
    ) -> Result<FineTuneResult> {
        let train = self.examples.lock().map_err(poisoned)?.clone();
        let test = self.held_out.lock().map_err(poisoned)?.clone();
        let config = FineTuneConfig::from(options);
        let run = if resume { fine_tune::resume } else { fine_tune::fine_tune };
        let outcome = run(&self.backbone, self.spec.clone(), &train, &test, &config, &self.cancel, &mut |p| {
            if let Some(l) = listener {
                l.on_progress(FineTuneProgress::from(p));
            }
        })?;
        Ok(FineTuneResult::from(outcome))
    }

    /// Runs the fine-tune (or its resume) on a thread of its own; one at a time per session.
    async fn spawn(
        self: Arc<Self>,
        options: FineTuneOptions,
        listener: Option<Arc<dyn ProgressListener>>,
        resume: bool,
    ) -> Result<FineTuneResult> {
        {
            let mut running = self.running.lock().map_err(poisoned)?;
            if *running {
                return Err(MobiLlmError::InvalidInput { reason: "this session is already fine-tuning".into() });
            }
            *running = true;
        }
        // A detach or cancel of an earlier run does not stop this one.
        self.cancel.reset();
        let (tx, rx) = futures_channel::oneshot::channel();
        let session = self.clone();
        let spawned = std::thread::Builder::new().name("mobillm-fine-tune".into()).spawn(move || {
            let result = guarded(|| session.run(&options, listener.as_deref(), resume));
            session.set_running(false);
            let _ = tx.send(result);
        });
        if let Err(e) = spawned {
            self.set_running(false);
            return Err(MobiLlmError::internal(format!("cannot start a thread: {e}")));
        }
        let mut caller_gone = StopWhenDropped(Some(self.cancel.clone()));
        let result = rx.await.unwrap_or_else(|_| Err(MobiLlmError::internal("the fine-tune thread vanished")));
        caller_gone.0 = None;
        result
    }
}

/// Stops the fine-tune's thread when its caller stops awaiting it (a cancelled Kotlin coroutine or Swift task drops
/// the future): a resumable fine-tune is detached, any other cancelled, as the cancel handle would.
struct StopWhenDropped(Option<CancelToken>);

impl Drop for StopWhenDropped {
    fn drop(&mut self) {
        if let Some(token) = self.0.take() {
            token.detach();
        }
    }
}

#[uniffi::export]
impl FineTuneSession {
    #[uniffi::constructor]
    pub fn new(backbone: &Backbone, task: &Task) -> Arc<Self> {
        Arc::new(Self {
            backbone: backbone.inner.clone(),
            spec: task.spec.clone(),
            examples: Mutex::default(),
            held_out: Mutex::default(),
            cancel: CancelToken::new(),
            running: Mutex::new(false),
        })
    }

    /// Adds one training example; returns how many the session holds.
    pub fn add_example(&self, text: String, label: String) -> Result<u64> {
        self.add_to(&self.examples, &[LabeledText { text, label }])
    }

    /// Adds training examples, all or none (an unknown label adds nothing).
    pub fn add_examples(&self, examples: Vec<LabeledText>) -> Result<u64> {
        self.add_to(&self.examples, &examples)
    }

    /// Adds held-out examples: scored before and after fine-tuning, never trained on.
    pub fn add_held_out(&self, examples: Vec<LabeledText>) -> Result<u64> {
        self.add_to(&self.held_out, &examples)
    }

    pub fn example_count(&self) -> u64 {
        self.examples.lock().map_or(0, |l| l.len() as u64)
    }

    /// The handle that cancels this session's fine-tune.
    pub fn cancel_handle(&self) -> Arc<CancelHandle> {
        Arc::new(CancelHandle { token: self.cancel.clone() })
    }

    /// Fine-tunes on the examples added so far. Runs on its own thread; the caller's thread is free while it
    /// awaits. One fine-tune at a time per session. Cancelling the awaiting coroutine or task stops it as
    /// [`CancelHandle::detach`] does (a resumable fine-tune is kept for `resume`, any other cancelled). With `options.state_path`, no state may be there yet
    /// ([`FineTuneSession::resume`] it, or delete it).
    pub async fn fine_tune(
        self: Arc<Self>,
        options: FineTuneOptions,
        listener: Option<Arc<dyn ProgressListener>>,
    ) -> Result<FineTuneResult> {
        self.spawn(options, listener, false).await
    }

    /// Continues the `pae` fine-tune recorded in `state_path` (after the app was killed, the network failed or
    /// the fine-tune was detached) from its last acknowledged step: examples the server holds are neither
    /// forwarded nor sent again, the secrets and the server session are the same. Add the same training examples
    /// first and give the same options (`state_key` too); anything else, or a server session that expired, is
    /// [`MobiLlmError::CannotResume`] naming what differs.
    pub async fn resume(
        self: Arc<Self>,
        state_path: String,
        options: FineTuneOptions,
        listener: Option<Arc<dyn ProgressListener>>,
    ) -> Result<FineTuneResult> {
        let options = FineTuneOptions { state_path: Some(state_path), ..options };
        self.spawn(options, listener, true).await
    }
}
