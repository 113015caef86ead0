//! UniFFI facade over [`mobillm_core`]. The exported API (backbone, task, fine-tune session, adapter) lands with
//! the bindings issue; this crate stays a thin layer with no model math of its own.

pub use mobillm_core::VERSION;
