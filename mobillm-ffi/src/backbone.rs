//! The backbone and the task, as the apps hold them.

use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{guarded, Result};

/// A frozen backbone loaded from a GGUF file or a safetensors directory (with `config.json` and
/// `tokenizer.json`).
#[derive(uniffi::Object)]
pub struct Backbone {
    pub(crate) inner: Arc<mobillm_core::Backbone>,
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
    pub(crate) spec: mobillm_core::TaskSpec,
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
