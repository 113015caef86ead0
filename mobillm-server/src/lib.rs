//! The assist server. Sessions, the activation cache and the trainer land with the server issue.

pub use mobillm_core::VERSION;
