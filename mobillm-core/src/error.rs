//! The one error type of the core crate, grouped by where things go wrong. Every variant names the thing that was
//! wrong (file, tensor, key, line, server answer) so that an app developer can act on the message without a
//! debugger; the FFI maps each variant to one of its own in one place (`mobillm-ffi/src/error.rs`).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- Files and models ----
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The file is not a readable GGUF, safetensors or adapter file (bad magic, truncated header, corrupt
    /// metadata), or an encrypted file that does not open with the key given.
    #[error("{path} is not a valid model file: {reason}")]
    InvalidModelFile { path: PathBuf, reason: String },

    /// A tensor's data runs past the end of the file.
    #[error(
        "model file {path} is truncated: tensor `{tensor}` needs bytes {start}..{end} but the file has {file_len}"
    )]
    TruncatedTensor { path: PathBuf, tensor: String, start: u64, end: u64, file_len: u64 },

    #[error("tensor `{tensor}` has type {dtype}, which MobiLLM does not load (supported: {supported})")]
    UnsupportedTensorType { tensor: String, dtype: String, supported: &'static str },

    #[error("the model has no tensor `{0}`")]
    MissingTensor(String),

    #[error("tensor `{tensor}` has shape {found:?}, the config implies {expected:?}")]
    TensorShape { tensor: String, expected: Vec<usize>, found: Vec<usize> },

    /// Missing, mistyped or mutually inconsistent hyper-parameters (GGUF metadata, `config.json`, a side network
    /// or training configuration).
    #[error("invalid config: {0}")]
    InvalidConfig(String),

    #[error("unsupported model architecture `{0}` (supported: llama)")]
    UnsupportedArchitecture(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    // ---- Tasks and data ----
    #[error("invalid task: {0}")]
    InvalidTask(String),

    #[error("{path}:{line}: {message}")]
    Dataset { path: PathBuf, line: usize, message: String },

    /// Caller-supplied input that does not fit (empty data, an unknown label, wrong shapes, a prompt too long).
    #[error("invalid input: {0}")]
    InvalidInput(String),

    // ---- The wire and the assist server ----
    /// A malformed, oversized or inconsistent wire frame.
    #[error("bad frame: {0}")]
    Frame(String),

    /// The assist server answered with an error (`code` and `message` are its JSON error body).
    #[error("server error {status} ({code}): {message}")]
    Server { status: u16, code: String, message: String },

    /// The assist server's answer does not fit the protocol (wrong frame kind, missing samples, unreadable body).
    #[error("protocol: {0}")]
    Protocol(String),

    /// The server's training job failed; the message is the server's.
    #[error("training failed on the server: {0}")]
    TrainingFailed(String),

    /// The assist server could not be reached, or the connection broke, after retries; or it did not finish in
    /// time.
    #[error("network: {0}")]
    Network(String),

    // ---- Control and bugs ----
    /// The caller cancelled the operation.
    #[error("cancelled")]
    Cancelled,

    /// The caller detached a resumable fine-tune (`fine_tune::CancelToken::detach`): its state file and server
    /// session are kept, and `fine_tune::resume` continues it while the server session lives (it is deleted after
    /// `idle_ttl_s` seconds without a request, never while it trains).
    #[error("detached: resume the fine-tune from {path} within {idle_ttl_s} s")]
    Detached { path: PathBuf, idle_ttl_s: u64 },

    /// A fine-tune cannot continue from its state file: the server session expired, the backbone, the training
    /// examples or the options differ from the recorded ones, or the file is damaged or sealed with another key.
    #[error("cannot resume the fine-tune recorded in {path}: {reason}")]
    CannotResume { path: PathBuf, reason: String },

    /// A bug of ours (a broken invariant, a worker thread that panicked): please report it with the message.
    #[error("internal error: {0}")]
    Internal(String),

    #[error("tensor computation failed: {0}")]
    Compute(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
