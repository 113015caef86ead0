//! What a fine-tune reports while it runs, and how it is stopped from another thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Drawing the session's secret matrices.
    Secrets,
    /// Device forward of the training examples (and upload, overlapped).
    Forward,
    /// Server training; `done`/`total` count epochs (`pae`) or steps (`mobillm`).
    Train,
    /// Sending refinement targets.
    Targets,
    /// Device forward of the held-out examples and scoring.
    Evaluate,
    Done,
}

/// What a progress listener hears: the phase, its progress, the refinement round (`pae`) or epoch (`mobillm`),
/// and the latest training loss.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Progress {
    pub phase: Phase,
    pub done: usize,
    pub total: usize,
    pub round: usize,
    pub loss: Option<f64>,
}

impl Progress {
    pub fn new(phase: Phase, done: usize, total: usize, round: usize, loss: Option<f64>) -> Self {
        Self { phase, done, total, round, loss }
    }
}

/// Cancels a running fine-tune from any thread: it ends with [`Error::Cancelled`] within one forward batch or
/// one server poll.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// `Err(Cancelled)` once cancelled.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            return Err(Error::Cancelled);
        }
        Ok(())
    }
}
