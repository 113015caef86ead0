//! What a fine-tune reports while it runs, and how it is stopped from another thread.

use std::sync::atomic::{AtomicU8, Ordering};
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
    /// The refit (`pae` with a validation split): training again from the initial weights on every example, the
    /// split included, for as many rounds as the rule kept; `round` is the refit's, `done`/`total` count epochs
    /// (0 of them while the split and the targets are sent).
    Refit,
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

/// Stops a running fine-tune from any thread, within one forward batch or one server poll: `cancel` ends it
/// with [`Error::Cancelled`] (its server session and state file deleted); `detach` ends a resumable one with
/// [`Error::Detached`], keeping both so that `fine_tune::resume` continues it later. A cancel after a detach
/// still cancels.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicU8>);

const RUNNING: u8 = 0;
const DETACHED: u8 = 1;
const CANCELLED: u8 = 2;

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cancel(&self) {
        self.0.store(CANCELLED, Ordering::SeqCst);
    }

    pub fn detach(&self) {
        let _ = self.0.compare_exchange(RUNNING, DETACHED, Ordering::SeqCst, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst) == CANCELLED
    }

    /// Makes the token usable for another fine-tune (after one ended detached or cancelled).
    pub fn reset(&self) {
        self.0.store(RUNNING, Ordering::SeqCst);
    }

    /// `Err(Cancelled)` once cancelled, `Err(Detached)` once detached (its path and expiry are filled in by the
    /// fine-tune, which knows them).
    pub fn check(&self) -> Result<()> {
        match self.0.load(Ordering::SeqCst) {
            CANCELLED => Err(Error::Cancelled),
            DETACHED => Err(Error::Detached { path: Default::default(), idle_ttl_s: 0 }),
            _ => Ok(()),
        }
    }
}
