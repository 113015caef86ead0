//! What the store keeps per session, per API key and for the whole server.

use mobillm_core::protocol::{JobState, Mode, StepAck};
use mobillm_core::side::{SideConfig, TrainConfig};
use serde::{Deserialize, Serialize};

use crate::config::Quotas;

/// What a session's creator declared, fixed for its lifetime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionShape {
    #[serde(default)]
    pub mode: Mode,
    /// Tapped layers per sample.
    pub layers: usize,
    /// Activation dimension.
    pub dim: usize,
    /// Target width K'.
    pub outputs: usize,
    /// Backbone fingerprint the device reported (opaque to the server).
    pub backbone: String,
}

impl SessionShape {
    /// Bytes one cached sample takes in the store: f16 activations, then f32 target values.
    pub fn stored_sample_len(&self) -> usize {
        2 * self.layers * self.dim + 4 * self.outputs
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: String,
    /// SHA-256 (hex) of the API key that created the session (the key itself is never stored).
    pub key_hash: String,
    /// SHA-256 (hex) of the session's bearer token.
    pub token_hash: String,
    pub shape: SessionShape,
    pub side: SideConfig,
    pub train: TrainConfig,
    pub job: JobState,
    pub created_unix: u64,
    /// Last request that changed the session (reads are tracked in memory, see `state::AppState::touch`).
    pub last_used_unix: u64,
    /// Samples the session may hold: the server's cap, the session's byte quota and the memory budget of its
    /// training decide, once, at creation.
    pub max_samples: usize,
    /// Cached samples, and the bytes of samples and checkpoint: counted in the transactions that change them.
    pub samples: usize,
    pub stored_bytes: u64,
    /// Times a worker started this session's current job without reaching its first checkpoint; a job that
    /// does so twice (a crash while loading, say) is failed instead of retried.
    pub start_attempts: u32,
    /// The create request's idempotency key (hashed with the API key) and body hash, to answer a retry.
    pub create_request: Option<(String, String)>,
    /// Idempotency key (hashed) of the training request that set the current job.
    pub train_request: Option<String>,
    /// `mobillm` mode: the last step's idempotency key (hashed) and answer, for a retry of it.
    pub last_step: Option<(String, StepAck)>,
    /// Cluster store: the worker that claimed the current job, until when. Another worker may claim the job once
    /// the lease has passed, and a worker whose lease has passed may no longer write the session.
    #[serde(default)]
    pub lease: Option<Lease>,
    /// The current job was asked for `from_scratch`: it starts from the initial weights, not the checkpoint.
    /// Cleared by its first checkpoint, so a job resumed after that continues from it.
    #[serde(default)]
    pub fresh_weights: bool,
}

impl SessionRecord {
    /// Answers a retried create request (same idempotency key) with this session: the same request gets it back
    /// under the retry's new token; a different request under the same key is refused.
    pub fn replay(&mut self, retry: &SessionRecord) -> Result<(), Refusal> {
        if self.create_request != retry.create_request {
            return Err(Refusal::IdempotencyMismatch);
        }
        self.token_hash = retry.token_hash.clone();
        self.last_used_unix = retry.last_used_unix;
        Ok(())
    }

    /// Refuses `samples` more samples of `bytes` bytes that the session itself has no room for: its sample cap
    /// and its byte quota (the key's and the server's quotas are each store's to check).
    pub fn room_for(&self, samples: usize, bytes: u64, quotas: &Quotas) -> Result<(), Refusal> {
        if self.samples + samples > self.max_samples {
            return Err(Refusal::Quota(format!(
                "the session holds {} samples; {samples} more would pass its limit of {}",
                self.samples, self.max_samples
            )));
        }
        if self.stored_bytes + bytes > quotas.session_bytes {
            return Err(Refusal::bytes_over(bytes, "the session's", quotas.session_bytes));
        }
        Ok(())
    }
}

/// A worker's claim on a session's job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub worker: String,
    pub until_unix: u64,
}

/// Sessions and stored bytes, per API key and for the whole store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub sessions: u64,
    pub bytes: u64,
}

/// Why the store refused a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The session was deleted meanwhile.
    Gone,
    /// A count or byte quota would be passed (the message says which).
    Quota(String),
    /// An idempotency key came back with a different request.
    IdempotencyMismatch,
    /// The session's state does not allow it now (a job is queued or running, say).
    Conflict(String),
}

impl Refusal {
    /// `bytes` more would pass `whose` (`"this API key's"`, `"the server's"`) byte quota.
    pub fn bytes_over(bytes: u64, whose: &str, quota: u64) -> Self {
        Refusal::Quota(format!("{bytes} more bytes would pass {whose} quota of {quota} bytes"))
    }

    /// The API key has as many sessions as it may.
    pub fn key_sessions(sessions: u64) -> Self {
        Refusal::Quota(format!("this API key already has {sessions} sessions"))
    }
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
