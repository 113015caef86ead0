//! The device adapter file: the folded side network (it runs on plain activations and outputs decoded logit
//! corrections `[N, K]`) plus everything needed to use it and to continue the session: the task, the tapped
//! layers, the side network's shape, the backbone fingerprint it was trained against, the session's secret seed
//! and its whitening. One safetensors file; the non-tensor parts are JSON strings in its metadata.
//!
//! Format versions: 2 adds the whitening (`whitening.*` tensors, present when the session had secrets); 3 adds
//! the summary (`side.summary`: the network reads each tapped layer's pivot and mean); 4 adds members
//! (`side.members`: networks side by side, their tensors stacked along the width). Files are written at the
//! lowest version that holds them, so an adapter of one network on the pivot alone stays readable by version-2
//! readers; versions 1 to 3 are still read and run as they were trained, and newer versions are refused by name.
//!
//! The file holds the session secret: apps keep it in private storage, and can seal it with a key from their
//! platform's keystore ([`DeviceAdapter::save_sealed`], authenticated encryption, [`crate::sealed`]). Saving
//! writes a temporary file and renames it, so a crash never leaves a half-written adapter in place of a good one.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use super::config::SideConfig;
use super::network::{normalize_taps, SideNet};
use super::trainer::outputs_in_batches;
use super::weights_file;
use super::whitening::Whitening;
use crate::backbone::{Backbone, PivotOutput};
use crate::error::{Error, Result};
use crate::task::{Task, TaskSpec};

const FORMAT: &str = "mobillm-device-adapter";
/// Versions this code reads.
const READS: [&str; 4] = ["1", "2", "3", "4"];

#[derive(Debug, Clone)]
pub struct DeviceAdapter {
    pub task: TaskSpec,
    pub taps: Vec<usize>,
    pub backbone_fingerprint: String,
    /// The session's secret seed (`None` when trained without secrets).
    pub secret_seed: Option<[u8; 32]>,
    /// The session's whitening, applied to unit-RMS taps before the network (`None` without secrets, and in
    /// version 1 files).
    pub whitening: Option<Whitening>,
    /// The folded network: `out` has K rows.
    pub net: SideNet,
}

/// One prediction: the label and the probability of every label (in the task's order).
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub label: String,
    pub label_index: usize,
    pub scores: Vec<f32>,
}

impl DeviceAdapter {
    pub fn side_config(&self) -> &SideConfig {
        self.net.config()
    }

    /// Writes the adapter as a plain safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::sealed::write_atomically(path, &self.to_bytes()?)
    }

    /// Writes the adapter sealed with `key` (32 bytes, from the app's keystore): unreadable, and unchangeable
    /// unnoticed, without it.
    pub fn save_sealed(&self, path: &Path, key: &[u8]) -> Result<()> {
        crate::sealed::write_atomically(path, &crate::sealed::seal(key, &self.to_bytes()?)?)
    }

    fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("format_version".to_string(), format_version(self.net.config()).to_string()),
            ("task".to_string(), to_json(&self.task)?),
            ("taps".to_string(), to_json(&self.taps)?),
            ("side".to_string(), to_json(self.net.config())?),
            ("backbone".to_string(), self.backbone_fingerprint.clone()),
        ]);
        if let Some(seed) = self.secret_seed {
            meta.insert("secret_seed".into(), hex(&seed));
        }
        let mut tensors = self.net.tensors();
        tensors.extend(self.whitening.iter().flat_map(Whitening::tensors));
        weights_file::to_bytes(&tensors, meta)
    }

    /// Reads a plain adapter file (a sealed one needs [`DeviceAdapter::load_sealed`]).
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        if crate::sealed::is_sealed(&bytes) {
            return Err(Error::InvalidModelFile {
                path: path.to_path_buf(),
                reason: "this adapter is encrypted: load it with its key".into(),
            });
        }
        Self::from_bytes(&bytes, path)
    }

    /// Reads an adapter sealed with `key`.
    pub fn load_sealed(path: &Path, key: &[u8]) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&crate::sealed::open(key, &bytes, path)?, path)
    }

    /// Reads an adapter from the bytes of a file (`path` names it in errors).
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidModelFile { path: path.to_path_buf(), reason };
        let (tensors, meta) = weights_file::from_bytes(bytes).map_err(invalid)?;
        let field = |k: &str| meta.get(k).ok_or_else(|| invalid(format!("no `{k}` in the adapter metadata")));
        if field("format")? != FORMAT {
            return Err(invalid(format!("not a MobiLLM device adapter (format {:?})", meta.get("format"))));
        }
        if !READS.contains(&field("format_version")?.as_str()) {
            return Err(invalid(format!("adapter format version {} is not supported", field("format_version")?)));
        }
        let parse = |k: &str| -> Result<serde_json::Value> {
            serde_json::from_str(field(k)?).map_err(|e| invalid(format!("metadata `{k}`: {e}")))
        };
        let task: TaskSpec = serde_json::from_value(parse("task")?).map_err(|e| invalid(format!("task: {e}")))?;
        let taps: Vec<usize> = serde_json::from_value(parse("taps")?).map_err(|e| invalid(format!("taps: {e}")))?;
        let side: SideConfig = serde_json::from_value(parse("side")?).map_err(|e| invalid(format!("side: {e}")))?;
        if taps.len() * side.summary.count() != side.taps {
            return Err(invalid(format!(
                "{} taps listed for a network of {} inputs ({} per tap)",
                taps.len(),
                side.taps,
                side.summary.count()
            )));
        }
        let secret_seed = match meta.get("secret_seed") {
            Some(h) => Some(unhex(h).ok_or_else(|| invalid("malformed secret_seed".into()))?),
            None => None,
        };
        let tensors = weights_file::as_refs(&tensors);
        let net = SideNet::from_tensors(&side, &tensors).map_err(|e| invalid(e.to_string()))?;
        let whitening =
            Whitening::from_tensors(&tensors, side.taps, side.hidden).map_err(|e| invalid(e.to_string()))?;
        if net.out_rows() != side.labels {
            return Err(invalid(format!("the network has {} outputs for {} labels", net.out_rows(), side.labels)));
        }
        Ok(Self { task, taps, backbone_fingerprint: field("backbone")?.clone(), secret_seed, whitening, net })
    }

    /// Decoded logit corrections `[N, K]` for already-computed network inputs `[N, taps, d]` (the forward's
    /// pivots, or what [`Self::inputs`] builds from them; not yet normalised).
    pub fn corrections(&self, inputs: &Tensor) -> Result<Tensor> {
        outputs_in_batches(&self.net, &device_inputs(inputs, self.whitening.as_ref())?, super::trainer::OUTPUT_BATCH)
    }

    /// The network's inputs from a forward over this adapter's taps: the summaries it was trained on.
    pub fn inputs(&self, out: &PivotOutput) -> Result<Tensor> {
        self.side_config().summary.inputs(&out.taps, out.means.as_ref())
    }

    /// Predicts the label of each text with the backbone plus this adapter, a forward batch at a time (the memory
    /// does not grow with the number of texts).
    pub fn predict(&self, backbone: &Backbone, texts: &[&str]) -> Result<Vec<Prediction>> {
        if backbone.fingerprint() != self.backbone_fingerprint {
            return Err(Error::InvalidInput(
                "this adapter was trained on another backbone (fingerprints differ)".into(),
            ));
        }
        let task = Task::new(self.task.clone(), backbone.tokenizer())?;
        let mut predictions: Vec<Option<Prediction>> = vec![None; texts.len()];
        backbone.forward_batches(&task, texts, &self.taps, 16, |group, out| {
            let logits = (&out.label_logits + self.corrections(&self.inputs(&out)?)?)?;
            let probs = candle_nn::ops::softmax_last_dim(&logits)?.to_vec2::<f32>()?;
            for (&i, scores) in group.iter().zip(probs) {
                let (best, _) =
                    scores.iter().enumerate().fold((0, f32::MIN), |m, (i, &s)| if s > m.1 { (i, s) } else { m });
                predictions[i] = Some(Prediction { label: self.task.labels[best].clone(), label_index: best, scores });
            }
            Ok(())
        })?;
        predictions
            .into_iter()
            .map(|p| p.ok_or_else(|| Error::Internal("a text was left out of the forward batches".into())))
            .collect()
    }
}

/// What the device feeds its folded network (and, rotated, the server): taps `[N, T, d]` scaled to unit RMS,
/// then whitened with the session's whitening if it has one.
pub fn device_inputs(taps: &Tensor, whitening: Option<&Whitening>) -> Result<Tensor> {
    let x = normalize_taps(taps)?;
    match whitening {
        Some(w) => w.apply(&x),
        None => Ok(x),
    }
}

fn to_json<T: serde::Serialize + ?Sized>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::InvalidInput(format!("serializing adapter metadata: {e}")))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The lowest format version that holds an adapter of this shape (module docs).
fn format_version(side: &SideConfig) -> &'static str {
    match (side.members, side.summary.is_pivot()) {
        (1, true) => "2",
        (1, false) => "3",
        _ => "4",
    }
}
