//! The Swift and Kotlin face of MobiLLM: a thin UniFFI layer over [`mobillm_core`] (no model math here).
//!
//! Objects: [`Backbone`] (a loaded model), [`Task`] (prompt template + labels, checked against the backbone's
//! tokenizer), [`FineTuneSession`] (collects labelled examples, fine-tunes against an assist server) and
//! [`Adapter`] (the result: saved, loaded, predicts). Errors: one flat [`MobiLlmError`] (Kotlin:
//! `MobiLlmException`, Swift: `MobiLlmError`).
//!
//! Threading model: every object is thread-safe (`Arc` inside, interior locks where state changes) and may be used
//! from any thread. The long operation, [`FineTuneSession::fine_tune`], is `async` (Kotlin `suspend`, Swift
//! `async`): it runs on a thread of its own and never blocks the caller's thread; progress arrives on that thread
//! through [`ProgressListener`] (hop to the UI thread yourself), and [`CancelHandle::cancel`] stops it within one
//! batch or one server poll, ending with [`MobiLlmError::Cancelled`]. Loading a backbone (≈1 s) and predicting
//! (≈50 ms per text) are synchronous: call them off the main thread. A panic inside never crosses the boundary: it
//! becomes [`MobiLlmError::Internal`].

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use mobillm_core::dataset::Example;
use mobillm_core::protocol::Mode;
use mobillm_core::session::{self, CancelToken, Phase, SessionConfig};
use mobillm_core::side::DeviceAdapter;
use mobillm_core::wire::Quant;

uniffi::setup_scaffolding!();

pub use mobillm_core::VERSION;

/// Everything that can go wrong, flat, with a message fit for a log.
#[derive(Debug, thiserror::Error, uniffi::Error)]
pub enum MobiLlmError {
    /// A file could not be read or written.
    #[error("{reason}")]
    Io { reason: String },
    /// The model file is damaged, truncated, or of an unsupported kind.
    #[error("{reason}")]
    InvalidModel { reason: String },
    /// The task's template or labels do not work with this backbone.
    #[error("{reason}")]
    InvalidTask { reason: String },
    /// A bad argument (unknown label, empty data, wrong shapes, …).
    #[error("{reason}")]
    InvalidInput { reason: String },
    /// The assist server answered with an error.
    #[error("server error {status} ({code}): {reason}")]
    Server { status: u16, code: String, reason: String },
    /// The assist server could not be reached, or its answer was unreadable.
    #[error("{reason}")]
    Network { reason: String },
    /// The operation was cancelled through its [`CancelHandle`].
    #[error("cancelled")]
    Cancelled,
    /// A bug: please report it with the message.
    #[error("{reason}")]
    Internal { reason: String },
}

impl From<mobillm_core::Error> for MobiLlmError {
    fn from(e: mobillm_core::Error) -> Self {
        use mobillm_core::Error as E;
        let reason = e.to_string();
        match e {
            E::Io { .. } => Self::Io { reason },
            E::InvalidModelFile { .. }
            | E::TruncatedTensor { .. }
            | E::UnsupportedTensorType { .. }
            | E::MissingTensor(_)
            | E::TensorShape { .. }
            | E::InvalidConfig(_)
            | E::UnsupportedArchitecture(_)
            | E::Tokenizer(_) => Self::InvalidModel { reason },
            E::InvalidTask(_) => Self::InvalidTask { reason },
            E::Dataset { .. } | E::InvalidInput(_) => Self::InvalidInput { reason },
            E::Server { status, code, message } => Self::Server { status, code, reason: message },
            E::TrainingFailed(message) => Self::Server { status: 500, code: "training_failed".into(), reason: message },
            E::Network(_) | E::Frame(_) | E::Protocol(_) => Self::Network { reason },
            E::Cancelled => Self::Cancelled,
            E::Compute(_) => Self::Internal { reason },
        }
    }
}

type Result<T> = std::result::Result<T, MobiLlmError>;

/// Runs `f`, turning a panic into [`MobiLlmError::Internal`].
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(MobiLlmError::Internal { reason: format!("internal error: {what}") })
    })
}

/// A frozen backbone loaded from a GGUF file or a safetensors directory (with `config.json` and
/// `tokenizer.json`).
#[derive(uniffi::Object)]
pub struct Backbone {
    inner: Arc<mobillm_core::Backbone>,
}

#[uniffi::export]
impl Backbone {
    /// Loads the model at `path` (≈1 s for SmolLM2-135M; call off the main thread).
    #[uniffi::constructor]
    pub fn load(path: String) -> Result<Arc<Self>> {
        guarded(|| Ok(Arc::new(Self { inner: Arc::new(mobillm_core::Backbone::load(&PathBuf::from(path))?) })))
    }

    /// SHA-256 of the weights: an adapter only works with the backbone it was trained on.
    pub fn fingerprint(&self) -> String {
        self.inner.fingerprint().to_string()
    }

    pub fn layers(&self) -> u32 {
        self.inner.config().num_hidden_layers as u32
    }

    pub fn hidden_size(&self) -> u32 {
        self.inner.config().hidden_size as u32
    }
}

/// A classification task: a prompt template with one `{text}` slot ending in an answer cue, and its labels
/// (label words are the first token of `" " + label`; they must differ).
#[derive(uniffi::Object)]
pub struct Task {
    spec: mobillm_core::TaskSpec,
}

#[uniffi::export]
impl Task {
    /// Checks the template and labels against the backbone's tokenizer.
    #[uniffi::constructor]
    pub fn new(backbone: &Backbone, template: String, labels: Vec<String>) -> Result<Arc<Self>> {
        guarded(|| {
            let spec = mobillm_core::TaskSpec { template, labels };
            mobillm_core::Task::new(spec.clone(), backbone.inner.tokenizer())?;
            Ok(Arc::new(Self { spec }))
        })
    }

    pub fn template(&self) -> String {
        self.spec.template.clone()
    }

    pub fn labels(&self) -> Vec<String> {
        self.spec.labels.clone()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum FineTuneMode {
    /// PAE MobiLLM (default): pivots once, device-defined targets, secrets; labels never leave the device.
    Pae,
    /// MobiLLM: all tokens every epoch, labels on the server (for comparison).
    Mobillm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum Quantization {
    F16,
    Int8,
    Int4,
}

/// How to reach the assist server and how to train. Unset fields take the SDK's defaults. `Debug` never prints
/// the API key.
#[derive(Clone, uniffi::Record)]
pub struct FineTuneOptions {
    /// `https://…` (`http://` only to loopback, unless `allow_insecure_http`).
    pub server_url: String,
    /// The server's API key for creating sessions.
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
    /// `pae`: server epochs per refinement round (default 10). `mobillm`: passes over the data (default 3).
    #[uniffi(default = None)]
    pub epochs: Option<u32>,
    /// `pae` refinement rounds (default 3).
    #[uniffi(default = None)]
    pub rounds: Option<u32>,
    #[uniffi(default = None)]
    pub learning_rate: Option<f64>,
    #[uniffi(default = None)]
    pub quantization: Option<Quantization>,
    /// Side-network width (default 128) and bottleneck rank (default 16).
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
}

impl std::fmt::Debug for FineTuneOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FineTuneOptions")
            .field("server_url", &self.server_url)
            .field("api_key", &"<redacted>")
            .field("mode", &self.mode)
            .field("epochs", &self.epochs)
            .field("rounds", &self.rounds)
            .finish_non_exhaustive()
    }
}

impl FineTuneOptions {
    fn to_config(&self) -> SessionConfig {
        let d = SessionConfig::default();
        let mode = match self.mode.unwrap_or(FineTuneMode::Pae) {
            FineTuneMode::Pae => Mode::Pae,
            FineTuneMode::Mobillm => Mode::Mobillm,
        };
        let mobillm = mode == Mode::Mobillm;
        SessionConfig {
            server_url: self.server_url.clone(),
            api_key: self.api_key.clone(),
            ca_pem: self.ca_pem.clone().map(String::into_bytes),
            insecure_http: self.allow_insecure_http.unwrap_or(false),
            mode,
            epochs: self.epochs.map_or(if mobillm { 3 } else { d.epochs }, |e| e as usize),
            rounds: self.rounds.map_or(d.rounds, |r| r as usize),
            lr: self.learning_rate.unwrap_or(if mobillm { 1e-3 } else { d.lr }),
            quant: match self.quantization {
                None | Some(Quantization::Int8) => Quant::Int8,
                Some(Quantization::Int4) => Quant::Int4,
                Some(Quantization::F16) => Quant::F16,
            },
            width: self.width.map_or(d.width, |w| w as usize),
            rank: self.rank.map_or(d.rank, |r| r as usize),
            forward_batch: self.forward_batch.map_or(d.forward_batch, |b| b as usize),
            poll: self.poll_millis.map_or(d.poll, |ms| std::time::Duration::from_millis(ms as u64)),
            ..d
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum FineTunePhase {
    Secrets,
    Forward,
    Train,
    Targets,
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

/// Cancels the fine-tune of the session that handed it out; usable from any thread.
#[derive(uniffi::Object)]
pub struct CancelHandle {
    token: CancelToken,
}

#[uniffi::export]
impl CancelHandle {
    pub fn cancel(&self) {
        self.token.cancel();
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
    pub train_samples: u64,
    pub test_samples: u64,
    pub upload_bytes: u64,
    pub device_forward_seconds: f64,
    pub server_train_seconds: f64,
    pub wall_seconds: f64,
}

#[derive(Debug, Clone, uniffi::Record)]
pub struct LabeledText {
    pub text: String,
    pub label: String,
}

/// Collects labelled examples for one task and fine-tunes the backbone on them through an assist server.
#[derive(uniffi::Object)]
pub struct FineTuneSession {
    backbone: Arc<mobillm_core::Backbone>,
    spec: mobillm_core::TaskSpec,
    examples: Mutex<Vec<Example>>,
    held_out: Mutex<Vec<Example>>,
    cancel: CancelToken,
    running: Mutex<bool>,
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
        let mut list = list.lock().map_err(|_| MobiLlmError::Internal { reason: "poisoned lock".into() })?;
        list.extend(checked);
        Ok(list.len() as u64)
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
    /// awaits. One fine-tune at a time per session.
    pub async fn fine_tune(
        self: Arc<Self>,
        options: FineTuneOptions,
        listener: Option<Arc<dyn ProgressListener>>,
    ) -> Result<FineTuneResult> {
        {
            let mut running = self.running.lock().map_err(|_| MobiLlmError::Internal { reason: "lock".into() })?;
            if *running {
                return Err(MobiLlmError::InvalidInput { reason: "this session is already fine-tuning".into() });
            }
            *running = true;
        }
        let (tx, rx) = futures_channel::oneshot::channel();
        let session = self.clone();
        let spawned = std::thread::Builder::new().name("mobillm-fine-tune".into()).spawn(move || {
            let result = guarded(|| session.run(&options, listener.as_deref()));
            if let Ok(mut running) = session.running.lock() {
                *running = false;
            }
            let _ = tx.send(result);
        });
        if let Err(e) = spawned {
            if let Ok(mut running) = self.running.lock() {
                *running = false;
            }
            return Err(MobiLlmError::Internal { reason: format!("cannot start a thread: {e}") });
        }
        rx.await.unwrap_or_else(|_| Err(MobiLlmError::Internal { reason: "the fine-tune thread vanished".into() }))
    }
}

impl FineTuneSession {
    fn run(&self, options: &FineTuneOptions, listener: Option<&dyn ProgressListener>) -> Result<FineTuneResult> {
        let train = self.examples.lock().map_err(|_| MobiLlmError::Internal { reason: "lock".into() })?.clone();
        let test = self.held_out.lock().map_err(|_| MobiLlmError::Internal { reason: "lock".into() })?.clone();
        let outcome = session::fine_tune(
            &self.backbone,
            self.spec.clone(),
            &train,
            &test,
            &options.to_config(),
            &self.cancel,
            &mut |p| {
                if let Some(l) = listener {
                    l.on_progress(FineTuneProgress {
                        phase: match p.phase {
                            Phase::Secrets => FineTunePhase::Secrets,
                            Phase::Forward => FineTunePhase::Forward,
                            Phase::Train => FineTunePhase::Train,
                            Phase::Targets => FineTunePhase::Targets,
                            Phase::Evaluate => FineTunePhase::Evaluate,
                            Phase::Done => FineTunePhase::Done,
                        },
                        done: p.done as u64,
                        total: p.total as u64,
                        round: p.round as u32,
                        loss: p.loss,
                    });
                }
            },
        )?;
        Ok(FineTuneResult {
            adapter: Arc::new(Adapter { inner: outcome.adapter }),
            zero_shot_accuracy: outcome.zero_shot_acc,
            finetuned_accuracy: outcome.finetuned_acc,
            train_samples: outcome.train_samples as u64,
            test_samples: outcome.test_samples as u64,
            upload_bytes: outcome.upload_bytes,
            device_forward_seconds: outcome.device_forward_s,
            server_train_seconds: outcome.server_train_s,
            wall_seconds: outcome.wall_s,
        })
    }
}

#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct Prediction {
    pub label: String,
    pub label_index: u32,
    /// Probability of every label, in the task's order.
    pub scores: Vec<f32>,
}

/// A fine-tuned adapter: the folded side network, the task, and the session secret. The file holds that secret:
/// keep it in the app's private storage.
#[derive(uniffi::Object)]
pub struct Adapter {
    inner: DeviceAdapter,
}

#[uniffi::export]
impl Adapter {
    #[uniffi::constructor]
    pub fn load(path: String) -> Result<Arc<Self>> {
        guarded(|| Ok(Arc::new(Self { inner: DeviceAdapter::load(&PathBuf::from(path))? })))
    }

    /// Writes the adapter atomically (a crash never leaves a half-written file).
    pub fn save(&self, path: String) -> Result<()> {
        guarded(|| Ok(self.inner.save(&PathBuf::from(path))?))
    }

    pub fn labels(&self) -> Vec<String> {
        self.inner.task.labels.clone()
    }

    /// Fingerprint of the backbone this adapter works with.
    pub fn backbone_fingerprint(&self) -> String {
        self.inner.backbone_fingerprint.clone()
    }

    /// The label of `text` and the probability of every label (≈50 ms; call off the main thread).
    pub fn predict(&self, backbone: &Backbone, text: String) -> Result<Prediction> {
        let mut all = self.predict_all(backbone, vec![text])?;
        all.pop().ok_or_else(|| MobiLlmError::Internal { reason: "no prediction".into() })
    }

    pub fn predict_all(&self, backbone: &Backbone, texts: Vec<String>) -> Result<Vec<Prediction>> {
        guarded(|| {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            Ok(self
                .inner
                .predict(&backbone.inner, &refs)?
                .into_iter()
                .map(|p| Prediction { label: p.label, label_index: p.label_index as u32, scores: p.scores })
                .collect())
        })
    }
}
