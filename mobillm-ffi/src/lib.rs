//! The Swift and Kotlin face of MobiLLM: a thin UniFFI layer over [`mobillm_core`] (no model math here, and no
//! defaults of its own: unset options take the core's).
//!
//! - [`Backbone`] (a loaded model) and [`Task`] (prompt template and labels, checked against the backbone's
//!   tokenizer): `backbone.rs`;
//! - [`FineTuneSession`] (collects labelled examples, fine-tunes against an assist server or on the device, and
//!   resumes a fine-tune recorded in a state file), its options, progress listener and cancel handle (cancel or
//!   detach): `fine_tune.rs`;
//! - [`Adapter`] (the result: saved, loaded — sealed with an app key if given — and predicting): `adapter.rs`;
//! - one flat error, [`MobiLlmError`] (Kotlin: `MobiLlmException`, Swift: `MobiLlmError`): `error.rs`;
//! - conversions between these records and the core's types, each one `From`: `convert.rs`.
//!
//! Threading model: every object is thread-safe (`Arc` inside, interior locks where state changes) and may be used
//! from any thread. The long operation, [`FineTuneSession::fine_tune`], is `async` (Kotlin `suspend`, Swift
//! `async`): it runs on a thread of its own and never blocks the caller's thread; progress arrives on that thread
//! through [`ProgressListener`] (hop to the UI thread yourself), and [`CancelHandle::cancel`] stops it within one
//! batch or one server poll, ending with [`MobiLlmError::Cancelled`] ([`CancelHandle::detach`]: with
//! [`MobiLlmError::Detached`], to be resumed with [`FineTuneSession::resume`]). Loading a backbone (≈1 s) and
//! predicting (≈50 ms per text) are synchronous: call them off the main thread. A panic inside never crosses the boundary: it
//! becomes [`MobiLlmError::Internal`].

mod adapter;
mod backbone;
mod convert;
mod error;
mod fine_tune;

pub use adapter::{Adapter, Prediction};
pub use backbone::{Backbone, Task};
pub use error::MobiLlmError;
pub use fine_tune::{
    CancelHandle, FineTuneMode, FineTuneOptions, FineTunePhase, FineTuneProgress, FineTuneResult, FineTuneSession,
    LabeledText, ProgressListener, Quantization,
};

uniffi::setup_scaffolding!();

pub use mobillm_core::VERSION;
