//! Durable session state in redb under the data directory. Every write is one committed transaction before the
//! request is acknowledged, so an acknowledged upload survives `kill -9`. Activations are kept as f16 (half the
//! disk of f32; they arrived quantised to 8 bits or fewer anyway).

use std::path::Path;

use mobillm_core::side::{CachedSample, SampleId, SideConfig, TrainConfig};
use mobillm_core::Mode;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// session id (hex) → JSON [`SessionRecord`].
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
/// (session id, sample id) → f16 activations followed by f32 target.
const SAMPLES: TableDefinition<(&str, &[u8]), &[u8]> = TableDefinition::new("samples");
/// session id → the side network's latest checkpoint (safetensors bytes).
const WEIGHTS: TableDefinition<&str, &[u8]> = TableDefinition::new("weights");

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(String);

fn se(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Idle,
    Running,
    Done,
    Failed,
}

/// The session's training job, as clients see it in the status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobState {
    pub status: JobStatus,
    pub epochs_total: usize,
    pub epochs_done: usize,
    pub loss: Option<f64>,
    pub message: Option<String>,
    /// `mobillm` mode: training-step requests trained on so far.
    #[serde(default)]
    pub steps: usize,
}

impl Default for JobState {
    fn default() -> Self {
        Self { status: JobStatus::Idle, epochs_total: 0, epochs_done: 0, loss: None, message: None, steps: 0 }
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
}

pub struct Store {
    db: Database,
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(se)?;
        let db = Database::create(dir.join("mobillm.redb")).map_err(se)?;
        let txn = db.begin_write().map_err(se)?;
        txn.open_table(SESSIONS).map_err(se)?;
        txn.open_table(SAMPLES).map_err(se)?;
        txn.open_table(WEIGHTS).map_err(se)?;
        txn.commit().map_err(se)?;
        Ok(Self { db })
    }

    pub fn put_session(&self, rec: &SessionRecord) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(se)?;
        {
            let mut t = txn.open_table(SESSIONS).map_err(se)?;
            t.insert(rec.id.as_str(), serde_json::to_vec(rec).map_err(se)?.as_slice()).map_err(se)?;
        }
        txn.commit().map_err(se)
    }

    pub fn session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(se)?;
        let t = txn.open_table(SESSIONS).map_err(se)?;
        match t.get(id).map_err(se)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(se)?)),
            None => Ok(None),
        }
    }

    pub fn all_sessions(&self) -> Result<Vec<SessionRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(se)?;
        let t = txn.open_table(SESSIONS).map_err(se)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(se)? {
            let (_, v) = row.map_err(se)?;
            out.push(serde_json::from_slice(v.value()).map_err(se)?);
        }
        Ok(out)
    }

    pub fn sessions_of_key(&self, key_hash: &str) -> Result<usize, StoreError> {
        let txn = self.db.begin_read().map_err(se)?;
        let t = txn.open_table(SESSIONS).map_err(se)?;
        let mut n = 0;
        for row in t.iter().map_err(se)? {
            let (_, v) = row.map_err(se)?;
            let rec: SessionRecord = serde_json::from_slice(v.value()).map_err(se)?;
            n += usize::from(rec.key_hash == key_hash);
        }
        Ok(n)
    }

    pub fn sample_count(&self, session: &str) -> Result<usize, StoreError> {
        let txn = self.db.begin_read().map_err(se)?;
        let t = txn.open_table(SAMPLES).map_err(se)?;
        let range = t.range((session, &[][..])..=(session, &[0xFFu8; 16][..])).map_err(se)?;
        Ok(range.count())
    }

    /// Stores the samples whose ids are new, in one transaction, up to `max_total` samples in the session.
    /// Returns (stored, already present). Nothing is stored when the limit would be exceeded.
    pub fn put_samples(
        &self,
        session: &str,
        rows: &[(SampleId, Vec<u8>)],
        max_total: usize,
    ) -> Result<Result<(usize, usize), usize>, StoreError> {
        let txn = self.db.begin_write().map_err(se)?;
        let outcome = {
            let mut t = txn.open_table(SAMPLES).map_err(se)?;
            let existing = t.range((session, &[][..])..=(session, &[0xFFu8; 16][..])).map_err(se)?.count();
            let mut fresh = Vec::new();
            for (id, bytes) in rows {
                if t.get((session, &id.0[..])).map_err(se)?.is_none() && !fresh.iter().any(|(i, _)| i == id) {
                    fresh.push((*id, bytes));
                }
            }
            if existing + fresh.len() > max_total {
                Err(existing)
            } else {
                for (id, bytes) in &fresh {
                    t.insert((session, &id.0[..]), bytes.as_slice()).map_err(se)?;
                }
                Ok((fresh.len(), rows.len() - fresh.len()))
            }
        };
        if outcome.is_ok() {
            txn.commit().map_err(se)?;
        }
        Ok(outcome)
    }

    /// Erases a session and all its samples.
    pub fn delete_session(&self, id: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_write().map_err(se)?;
        let existed = {
            let mut s = txn.open_table(SESSIONS).map_err(se)?;
            let existed = s.remove(id).map_err(se)?.is_some();
            let mut t = txn.open_table(SAMPLES).map_err(se)?;
            t.retain_in((id, &[][..])..=(id, &[0xFFu8; 16][..]), |_, _| false).map_err(se)?;
            txn.open_table(WEIGHTS).map_err(se)?.remove(id).map_err(se)?;
            existed
        };
        txn.commit().map_err(se)?;
        Ok(existed)
    }
}

impl Store {
    /// Every sample of a session, decoded for training (activations `layers·dim`, target `outputs`).
    pub fn samples(&self, session: &str, shape: &SessionShape) -> Result<Vec<CachedSample>, StoreError> {
        let txn = self.db.begin_read().map_err(se)?;
        let t = txn.open_table(SAMPLES).map_err(se)?;
        let mut out = Vec::new();
        for row in t.range((session, &[][..])..=(session, &[0xFFu8; 16][..])).map_err(se)? {
            let (k, v) = row.map_err(se)?;
            let id = SampleId(k.value().1.try_into().map_err(se)?);
            out.push(decode_sample(id, v.value(), shape)?);
        }
        Ok(out)
    }

    /// Replaces the targets of existing samples, all or nothing. `Err(id)` names the first unknown sample.
    pub fn update_targets(
        &self,
        session: &str,
        rows: &[(SampleId, &[f32])],
        shape: &SessionShape,
    ) -> Result<Result<usize, SampleId>, StoreError> {
        let txn = self.db.begin_write().map_err(se)?;
        {
            let mut t = txn.open_table(SAMPLES).map_err(se)?;
            for (id, target) in rows {
                let acts_len = 2 * shape.layers * shape.dim;
                let updated = match t.get((session, &id.0[..])).map_err(se)? {
                    Some(v) => {
                        let mut bytes = v.value()[..acts_len].to_vec();
                        target.iter().for_each(|x| bytes.extend_from_slice(&x.to_le_bytes()));
                        bytes
                    }
                    None => return Ok(Err(*id)), // dropping the transaction discards earlier updates
                };
                t.insert((session, &id.0[..]), updated.as_slice()).map_err(se)?;
            }
        }
        txn.commit().map_err(se)?;
        Ok(Ok(rows.len()))
    }

    /// Saves the job state, and with it a checkpoint of the weights when given, in one transaction.
    pub fn put_checkpoint(&self, rec: &SessionRecord, weights: Option<&[u8]>) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(se)?;
        {
            let mut s = txn.open_table(SESSIONS).map_err(se)?;
            if s.get(rec.id.as_str()).map_err(se)?.is_none() {
                return Ok(()); // deleted meanwhile: write nothing back
            }
            s.insert(rec.id.as_str(), serde_json::to_vec(rec).map_err(se)?.as_slice()).map_err(se)?;
            if let Some(w) = weights {
                txn.open_table(WEIGHTS).map_err(se)?.insert(rec.id.as_str(), w).map_err(se)?;
            }
        }
        txn.commit().map_err(se)
    }

    pub fn weights(&self, session: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(se)?;
        let t = txn.open_table(WEIGHTS).map_err(se)?;
        Ok(t.get(session).map_err(se)?.map(|v| v.value().to_vec()))
    }
}

fn decode_sample(id: SampleId, bytes: &[u8], shape: &SessionShape) -> Result<CachedSample, StoreError> {
    let n_acts = shape.layers * shape.dim;
    if bytes.len() != 2 * n_acts + 4 * shape.outputs {
        return Err(StoreError(format!("sample {id} has {} stored bytes", bytes.len())));
    }
    let activations =
        bytes[..2 * n_acts].chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect();
    let target = bytes[2 * n_acts..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Ok(CachedSample { id, activations, target })
}

/// Encodes one sample for storage: f16 activations, then f32 target values.
pub fn encode_sample(activations: &[f32], target: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 * activations.len() + 4 * target.len());
    for a in activations {
        out.extend_from_slice(&half::f16::from_f32(*a).to_le_bytes());
    }
    for t in target {
        out.extend_from_slice(&t.to_le_bytes());
    }
    out
}
