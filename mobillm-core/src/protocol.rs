//! The JSON messages of the `/v1` API, shared by the device's client and the assist server, and the bounds the
//! server enforces on every size a client chooses. Bulk data (activations, targets, outputs) travel as binary
//! frames instead ([`crate::wire`]).
//!
//! Every request type denies unknown fields, and [`CreateSession::validate`] is the one place that decides whether
//! a session's shape is acceptable before any memory is reserved for it: the server calls it, and so can a client
//! that wants to fail early. The OpenAPI document (`mobillm-server/openapi.json`) declares the same bounds; a test
//! keeps the two in step.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::side::{Activation, Optimizer, SideConfig, TrainConfig};

/// Upper (and lower) bounds of every client-chosen size. The server's memory budget may refuse a session within
/// these bounds whose parameters or training set would not fit (`422 over_budget`).
pub mod bounds {
    /// Tapped layers per sample (a 70B Llama has 80 blocks).
    pub const MAX_LAYERS: usize = 128;
    /// Activation dimension d.
    pub const MAX_DIM: usize = 16_384;
    /// Target width K' (twice the labels, at least 8).
    pub const MAX_OUTPUTS: usize = 1024;
    /// Labels K of a `mobillm` session.
    pub const MAX_LABELS: usize = 512;
    /// Side-network width w.
    pub const MAX_WIDTH: usize = 4096;
    /// Bottleneck rank r.
    pub const MAX_RANK: usize = 1024;
    /// Side networks trained side by side.
    pub const MAX_MEMBERS: usize = 16;
    /// Server mini-batch.
    pub const MAX_BATCH_SIZE: usize = 8192;
    /// The backbone fingerprint (the device sends a 64-character SHA-256).
    pub const MAX_BACKBONE_LEN: usize = 128;
    /// Learning rate, exclusive of 0.
    pub const MAX_LR: f64 = 10.0;
    pub const MAX_WEIGHT_DECAY: f64 = 1.0;
    /// |α₀|, the gates' initial logit.
    pub const MAX_ALPHA0: f32 = 100.0;
    /// Epochs one training request may ask for.
    pub const MAX_EPOCHS: usize = 1000;
    /// Characters of an `Idempotency-Key` header.
    pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;
}

/// Why a [`CreateSession`] is refused: a value outside [`bounds`] (what a schema can say), or values that are
/// each in bounds but do not fit together.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Invalid {
    #[error("{0}")]
    OutOfBounds(String),
    #[error("{0}")]
    Inconsistent(String),
}

impl From<Invalid> for Error {
    fn from(e: Invalid) -> Self {
        Error::InvalidConfig(e.to_string())
    }
}

/// JSON numbers for integer fields: a whole number written as a float (`59.0`, as some JSON writers do) is the
/// same number.
mod whole {
    use serde::{de::Error as _, Deserialize, Deserializer};

    fn from_f64<E: serde::de::Error>(v: f64) -> Result<u64, E> {
        // `u64::MAX as f64` rounds up to 2^64, which does not fit: the bound is strict.
        if v.fract() == 0.0 && v >= 0.0 && v < u64::MAX as f64 {
            Ok(v as u64)
        } else {
            Err(E::custom(format!("{v} is not a whole number")))
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Num {
        Int(u64),
        Float(f64),
    }

    fn value<'de, D: Deserializer<'de>>(n: Num) -> Result<u64, D::Error> {
        match n {
            Num::Int(v) => Ok(v),
            Num::Float(v) => from_f64(v),
        }
    }

    pub fn usize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        let v = value::<D>(Num::deserialize(d)?)?;
        usize::try_from(v).map_err(D::Error::custom)
    }

    /// A present field: `null` is not a number (an absent field takes the default).
    pub fn some_usize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
        usize(d).map(Some)
    }

    pub fn some_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        value::<D>(Num::deserialize(d)?).map(Some)
    }

    /// A present field of any other type, `null` refused likewise.
    pub fn some<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
        T::deserialize(d).map(Some)
    }
}

/// How a session trains.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// PAE MobiLLM (the default): pivot activations sent once, device-defined targets, secrets.
    #[default]
    Pae,
    /// MobiLLM: every token's activations re-sent each epoch, labels and backbone label logits on the server.
    Mobillm,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Pae => "pae",
            Mode::Mobillm => "mobillm",
        })
    }
}

impl std::str::FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "pae" => Ok(Mode::Pae),
            "mobillm" => Ok(Mode::Mobillm),
            other => Err(Error::InvalidInput(format!("unknown mode {other:?} (pae or mobillm)"))),
        }
    }
}

/// `POST /v1/sessions` (with the API key). Omitted training options take the server's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    #[serde(default)]
    pub mode: Mode,
    /// K: only `mobillm` sessions send it (a `pae` server never learns the number of labels).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "whole::some_usize")]
    pub labels: Option<usize>,
    /// Tapped layers T.
    #[serde(deserialize_with = "whole::usize")]
    pub layers: usize,
    /// Activation dimension d.
    #[serde(deserialize_with = "whole::usize")]
    pub dim: usize,
    /// Target width K'.
    #[serde(deserialize_with = "whole::usize")]
    pub outputs: usize,
    /// Fingerprint of the device's backbone (opaque to the server).
    pub backbone: String,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "whole::some_usize")]
    pub width: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "whole::some_usize")]
    pub rank: Option<usize>,
    /// Side networks trained side by side, each of `width` (default 1: what a device that does not send it expects).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "whole::some_usize")]
    pub members: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "whole::some")]
    pub activation: Option<Activation>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "whole::some")]
    pub alpha0: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "whole::some")]
    pub lr: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "whole::some_usize")]
    pub batch_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "whole::some")]
    pub weight_decay: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "whole::some_u64")]
    pub seed: Option<u64>,
}

impl CreateSession {
    /// Checks every size against [`bounds`] (and that they fit together) and returns the side network and training configuration the server
    /// will use. In `pae` mode `labels` is a placeholder only the device's own copy fills in: the server fits
    /// K'-wide targets and never uses it.
    pub fn validate(&self) -> std::result::Result<(SideConfig, TrainConfig), Invalid> {
        use bounds::*;
        let bad = |m: String| Err(Invalid::OutOfBounds(m));
        let in_range = |name: &str, v: usize, min: usize, max: usize| {
            if v < min || v > max {
                return Err(Invalid::OutOfBounds(format!("{name} = {v} is outside {min}..={max}")));
            }
            Ok(())
        };
        in_range("layers", self.layers, 1, MAX_LAYERS)?;
        in_range("dim", self.dim, 1, MAX_DIM)?;
        in_range("outputs", self.outputs, 2, MAX_OUTPUTS)?;
        if self.backbone.is_empty()
            || self.backbone.len() > MAX_BACKBONE_LEN
            || !self.backbone.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
        {
            return bad(format!(
                "backbone must be 1..={MAX_BACKBONE_LEN} characters of [0-9A-Za-z._:-] (a fingerprint), got {} bytes",
                self.backbone.len()
            ));
        }
        let labels = match (self.mode, self.labels) {
            (Mode::Pae, None) => 2,
            (Mode::Pae, Some(_)) => return bad("pae sessions do not tell the server their labels".into()),
            (Mode::Mobillm, Some(k)) => {
                in_range("labels", k, 2, MAX_LABELS)?;
                if k > self.outputs {
                    return Err(Invalid::Inconsistent(format!(
                        "labels = {k} must not exceed outputs = {}",
                        self.outputs
                    )));
                }
                k
            }
            (Mode::Mobillm, None) => return bad("mobillm sessions must give `labels` (K)".into()),
        };
        let defaults = SideConfig::new(self.layers, self.dim, labels);
        let side = SideConfig {
            outputs: self.outputs,
            width: self.width.unwrap_or(defaults.width),
            rank: self.rank.unwrap_or(defaults.rank),
            members: self.members.unwrap_or(1),
            activation: self.activation.unwrap_or(defaults.activation),
            alpha0: self.alpha0.unwrap_or(defaults.alpha0),
            ..defaults
        };
        in_range("width", side.width, 1, MAX_WIDTH)?;
        in_range("rank", side.rank, 1, MAX_RANK)?;
        in_range("members", side.members, 1, MAX_MEMBERS)?;
        if !(side.alpha0.is_finite() && side.alpha0.abs() <= MAX_ALPHA0) {
            return bad(format!("alpha0 = {} is outside -{MAX_ALPHA0}..={MAX_ALPHA0}", side.alpha0));
        }
        let d = TrainConfig::default();
        let train = TrainConfig {
            // A `pae` session's activations are in the device's secret coordinates; a `mobillm` session's are plain.
            optimizer: match self.mode {
                Mode::Pae => Optimizer::EquivariantAdamW,
                Mode::Mobillm => Optimizer::AdamW,
            },
            lr: self.lr.unwrap_or(d.lr),
            batch_size: self.batch_size.unwrap_or(d.batch_size),
            weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
            seed: self.seed.unwrap_or(d.seed),
            ..d
        };
        in_range("batch_size", train.batch_size, 1, MAX_BATCH_SIZE)?;
        if !(train.lr > 0.0 && train.lr <= MAX_LR) {
            return bad(format!("lr = {} is outside (0, {MAX_LR}]", train.lr));
        }
        if !(train.weight_decay >= 0.0 && train.weight_decay <= MAX_WEIGHT_DECAY) {
            return bad(format!("weight_decay = {} is outside 0..={MAX_WEIGHT_DECAY}", train.weight_decay));
        }
        side.validate().map_err(|e| Invalid::Inconsistent(e.to_string()))?;
        train.validate().map_err(|e| Invalid::Inconsistent(e.to_string()))?;
        Ok((side, train))
    }
}

/// `201` to [`CreateSession`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionCreated {
    pub session_id: String,
    /// Bearer token of this session; the server keeps only its SHA-256.
    pub token: String,
    /// Seconds without a request after which the server deletes the session and its data.
    pub idle_ttl_s: u64,
    /// Samples the session may hold: the server's cap, its byte quota and its memory budget decide.
    pub max_samples: usize,
}

impl std::fmt::Debug for SessionCreated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionCreated")
            .field("session_id", &self.session_id)
            .field("token", &"<redacted>")
            .field("idle_ttl_s", &self.idle_ttl_s)
            .field("max_samples", &self.max_samples)
            .finish()
    }
}

/// Where a session's training job stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Nothing asked yet (or, in `mobillm` mode, steps only).
    #[default]
    Idle,
    /// Waiting for a training worker.
    Queued,
    Running,
    Done,
    Failed,
}

impl JobStatus {
    /// Queued or running: the server has work to do for this session.
    pub fn is_active(self) -> bool {
        matches!(self, JobStatus::Queued | JobStatus::Running)
    }
}

/// The session's training job, as clients see it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobState {
    pub status: JobStatus,
    pub epochs_total: usize,
    pub epochs_done: usize,
    pub loss: Option<f64>,
    /// Why a job failed.
    pub message: Option<String>,
    /// `mobillm` mode: training steps trained on so far.
    #[serde(default)]
    pub steps: usize,
}

/// `GET /v1/sessions/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionStatus {
    pub session_id: String,
    pub mode: Mode,
    pub samples: usize,
    /// Samples the session may hold.
    pub max_samples: usize,
    /// Bytes the session holds on the server (cached samples and checkpoint).
    pub stored_bytes: u64,
    pub job: JobState,
    /// Seconds until the server deletes the session if no further request arrives.
    pub expires_in_s: u64,
}

/// `PUT /v1/sessions/{id}/samples`: what the frame did. Re-sent ids count as duplicates and change nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadAck {
    pub stored: usize,
    pub duplicates: usize,
    /// Samples the session holds now.
    pub total: usize,
}

/// `PUT /v1/sessions/{id}/targets`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetsAck {
    pub updated: usize,
}

/// `POST /v1/sessions/{id}/train`: train this many more epochs, continuing from the current weights — or, with
/// `from_scratch`, from the session's initial weights (the device's refit on every example after the rounds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainRequest {
    #[serde(deserialize_with = "whole::usize")]
    pub epochs: usize,
    /// Omitted (what older devices send) means false; sent only when true, so older servers see no change.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_scratch: bool,
}

/// `202` to [`TrainRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainAccepted {
    pub job: JobState,
}

/// The server's answer to a `mobillm`-mode training step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepAck {
    /// Mean cross-entropy over the frame's mini-batches.
    pub loss: f64,
    pub samples: usize,
    /// Step requests the session has trained on so far.
    pub steps: usize,
}

/// Every error answer: a stable machine-readable code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

/// The header that makes a `POST` safe to retry: the server answers a repeated key with the first outcome.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
