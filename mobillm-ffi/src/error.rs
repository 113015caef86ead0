//! The one error of the SDK's foreign face, flat, with a message fit for a log; and the guard that keeps panics
//! on this side of the boundary.

use std::panic::{catch_unwind, AssertUnwindSafe};

/// Everything that can go wrong, flat, with a message fit for a log.
#[derive(Debug, thiserror::Error, uniffi::Error)]
pub enum MobiLlmError {
    /// A file could not be read or written.
    #[error("{reason}")]
    Io { reason: String },
    /// The model or adapter file is damaged, truncated, of an unsupported kind, or does not open with the key.
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
    /// The operation was cancelled through its [`crate::CancelHandle`].
    #[error("cancelled")]
    Cancelled,
    /// A resumable fine-tune was detached through [`crate::CancelHandle::detach`]: its state file and server
    /// session are kept; [`crate::FineTuneSession::resume`] continues it within `expires_in_seconds` (the server
    /// deletes a session after that long without a request, never while it trains).
    #[error("{reason}")]
    Detached { state_path: String, expires_in_seconds: u64, reason: String },
    /// A fine-tune cannot be resumed from its state file: the server session expired or was deleted, the backbone,
    /// the examples or the options differ from the recorded ones, or the file is damaged or needs another key.
    /// Delete the file and start a new fine-tune.
    #[error("{reason}")]
    CannotResume { reason: String },
    /// A bug: please report it with the message.
    #[error("{reason}")]
    Internal { reason: String },
}

pub type Result<T> = std::result::Result<T, MobiLlmError>;

impl MobiLlmError {
    pub(crate) fn internal(reason: impl Into<String>) -> Self {
        Self::Internal { reason: reason.into() }
    }
}

/// Runs `f`, turning a panic into [`MobiLlmError::Internal`].
pub(crate) fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(MobiLlmError::internal(format!("internal error: {what}")))
    })
}
