//! The fine-tuned adapter: saved and loaded (sealed with an app-supplied key when given), and predicting.

use std::path::PathBuf;
use std::sync::Arc;

use mobillm_core::side::DeviceAdapter;

use crate::backbone::Backbone;
use crate::error::{guarded, MobiLlmError, Result};

#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct Prediction {
    pub label: String,
    pub label_index: u32,
    /// Probability of every label, in the task's order.
    pub scores: Vec<f32>,
}

/// A fine-tuned adapter: the folded side network, the task, and the session secret. The file holds that secret:
/// keep it in the app's private storage, and pass a 32-byte key from the platform's keystore to seal it
/// (authenticated encryption: without the key it is unreadable, and a changed file does not load).
#[derive(uniffi::Object)]
pub struct Adapter {
    pub(crate) inner: DeviceAdapter,
}

#[uniffi::export]
impl Adapter {
    /// Loads an adapter; a sealed one needs the `key` it was saved with.
    #[uniffi::constructor(default(key = None))]
    pub fn load(path: String, key: Option<Vec<u8>>) -> Result<Arc<Self>> {
        guarded(|| {
            let path = PathBuf::from(path);
            let inner = match key {
                Some(key) => DeviceAdapter::load_sealed(&path, &key)?,
                None => DeviceAdapter::load(&path)?,
            };
            Ok(Arc::new(Self { inner }))
        })
    }

    /// Writes the adapter atomically (a crash never leaves a half-written file), sealed with `key` if given.
    #[uniffi::method(default(key = None))]
    pub fn save(&self, path: String, key: Option<Vec<u8>>) -> Result<()> {
        guarded(|| {
            let path = PathBuf::from(path);
            match key {
                Some(key) => self.inner.save_sealed(&path, &key)?,
                None => self.inner.save(&path)?,
            }
            Ok(())
        })
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
        all.pop().ok_or_else(|| MobiLlmError::internal("no prediction"))
    }

    pub fn predict_all(&self, backbone: &Backbone, texts: Vec<String>) -> Result<Vec<Prediction>> {
        guarded(|| {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            Ok(self.inner.predict(&backbone.inner, &refs)?.into_iter().map(Prediction::from).collect())
        })
    }
}
