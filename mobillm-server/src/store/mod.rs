//! Where sessions live, behind one interface with two backends:
//! - [`embedded`]: one redb file under the data directory, for a server of one process (the default);
//! - [`cluster`]: PostgreSQL for sessions, usage, idempotency and the training queue, and an object store (S3 or a
//!   directory) for activation caches and checkpoints, shared by any number of API and worker processes.
//!
//! Both keep the same promises: every write is committed before the request is acknowledged (an acknowledged
//! upload survives `kill -9` of any process), and counts and quotas change in the same transactions as the rows
//! they count, so no request counts rows. Activations are kept as f16 (half the bytes of f32; they arrived
//! quantised to 8 bits or fewer anyway).
//!
//! All methods block: call them from the blocking pool or a worker thread, never from an async task.

pub mod cluster;
pub mod embedded;
mod records;

use half::f16;
use mobillm_core::side::SampleId;

pub use records::{now_unix, Lease, Refusal, SessionRecord, SessionShape, Usage};

use crate::config::{Quotas, ServerConfig};

/// Bytes a cached sample is charged beyond its value: its 16-byte id.
pub(crate) const SAMPLE_KEY_BYTES: u64 = 16;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub(crate) String);

pub(crate) fn se(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

/// A session's cached samples, stacked for training: `x` `[N, T, d]` as f16, targets `[N, K']`.
pub struct TrainingSet {
    pub ids: Vec<SampleId>,
    pub x: Vec<f16>,
    pub targets: Vec<f32>,
}

impl TrainingSet {
    /// Room for `n` samples of `rec`'s shape; allocation failures are errors, not aborts.
    pub(crate) fn with_capacity(rec: &SessionRecord) -> Result<Self, StoreError> {
        let (n, shape) = (rec.samples, &rec.shape);
        let mut set = TrainingSet { ids: Vec::new(), x: Vec::new(), targets: Vec::new() };
        let oom = |what: &str| StoreError(format!("no memory for the training set's {what}"));
        set.ids.try_reserve_exact(n).map_err(|_| oom("ids"))?;
        set.x.try_reserve_exact(n * shape.layers * shape.dim).map_err(|_| oom("activations"))?;
        set.targets.try_reserve_exact(n * shape.outputs).map_err(|_| oom("targets"))?;
        Ok(set)
    }

    /// Appends one sample: its f16 activations (little-endian bytes) and f32 target (little-endian bytes).
    pub(crate) fn push(&mut self, id: SampleId, activations: &[u8], target: &[u8]) {
        self.ids.push(id);
        self.x.extend(activations.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]])));
        self.targets.extend(target.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
    }
}

/// How a create request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    New,
    /// A retry of an earlier create: that session, whose token is now the new one.
    Replayed(String),
}

/// The store a server was configured with.
pub enum Store {
    Embedded(embedded::Embedded),
    Cluster(cluster::Cluster),
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Store::Embedded($s) => $e,
            Store::Cluster($s) => $e,
        }
    };
}

impl Store {
    /// The cluster store when a database URL is configured, else the embedded store in the data directory.
    pub fn open(config: &ServerConfig) -> Result<Self, StoreError> {
        match &config.database_url {
            Some(url) => {
                let objects = config.object_store.as_deref().ok_or_else(|| {
                    StoreError("--database-url needs --object-store (s3://bucket/prefix or file:///dir)".into())
                })?;
                Ok(Self::Cluster(cluster::Cluster::open(url, objects, config.database_connections)?))
            }
            None => Ok(Self::Embedded(embedded::Embedded::open(&config.data_dir, config.store_cache_bytes())?)),
        }
    }

    /// Whether several processes share this store (the training queue is then the database's).
    pub fn is_shared(&self) -> bool {
        matches!(self, Store::Cluster(_))
    }

    pub fn session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        dispatch!(self, s => s.session(id))
    }

    /// Up to `limit` sessions in id order, after `after`.
    pub fn sessions(&self, after: Option<&str>, limit: usize) -> Result<Vec<SessionRecord>, StoreError> {
        dispatch!(self, s => s.sessions(after, limit))
    }

    /// Every session, page by page (start-up and the reaper).
    pub fn for_each_session(&self, mut f: impl FnMut(SessionRecord)) -> Result<(), StoreError> {
        let mut after: Option<String> = None;
        loop {
            let page = self.sessions(after.as_deref(), 512)?;
            let Some(last) = page.last() else { return Ok(()) };
            after = Some(last.id.clone());
            page.into_iter().for_each(&mut f);
        }
    }

    pub fn usage(&self) -> Result<Usage, StoreError> {
        dispatch!(self, s => s.usage())
    }

    pub fn key_usage(&self, key_hash: &str) -> Result<Usage, StoreError> {
        dispatch!(self, s => s.key_usage(key_hash))
    }

    /// Creates a session, unless its API key already has `max_sessions_per_key` (checked in the same
    /// transaction, so concurrent creates cannot pass the cap). With an idempotency key seen before, answers
    /// with that session instead (after checking the request is the same) and gives it `rec.token_hash`.
    pub fn create_session(&self, rec: &SessionRecord, quotas: &Quotas) -> Result<Result<Created, Refusal>, StoreError> {
        dispatch!(self, s => s.create_session(rec, quotas))
    }

    /// Reads, changes and writes back a session record in one transaction. `None` if there is no such session;
    /// `f` may refuse (`Err`), which writes nothing.
    pub fn update<R>(
        &self,
        id: &str,
        f: impl FnOnce(&mut SessionRecord) -> Result<R, Refusal>,
    ) -> Result<Result<R, Refusal>, StoreError> {
        self.checkpoint(id, None, f)
    }

    /// As [`Store::update`], and saves a checkpoint of the weights with it, charging its size to the session.
    pub fn checkpoint<R>(
        &self,
        id: &str,
        weights: Option<&[u8]>,
        f: impl FnOnce(&mut SessionRecord) -> Result<R, Refusal>,
    ) -> Result<Result<R, Refusal>, StoreError> {
        dispatch!(self, s => s.checkpoint(id, weights, f))
    }

    /// Stores the samples whose ids are new, in one transaction, within the session's sample cap and the
    /// session's, its key's and the store's byte quotas. Returns (stored, already present, total now).
    pub fn put_samples(
        &self,
        session: &str,
        rows: &[(SampleId, Vec<u8>)],
        quotas: &Quotas,
    ) -> Result<Result<(usize, usize, usize), Refusal>, StoreError> {
        dispatch!(self, s => s.put_samples(session, rows, quotas))
    }

    /// Erases a session, its samples, checkpoint and idempotency entry, and gives back what it was charged.
    /// Returns the deleted record.
    pub fn delete_session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        dispatch!(self, s => s.delete_session(id))
    }

    /// Every cached sample of a session, stacked for training, in sample id order.
    pub fn training_set(&self, rec: &SessionRecord) -> Result<TrainingSet, StoreError> {
        dispatch!(self, s => s.training_set(rec))
    }

    /// Replaces the targets of existing samples, all or nothing. `Err(Ok(id))` names the first unknown sample.
    pub fn update_targets(
        &self,
        session: &str,
        rows: &[(SampleId, &[f32])],
    ) -> Result<Result<usize, Result<SampleId, Refusal>>, StoreError> {
        dispatch!(self, s => s.update_targets(session, rows))
    }

    /// The session's latest checkpoint (safetensors bytes), if any.
    pub fn weights(&self, session: &str) -> Result<Option<Vec<u8>>, StoreError> {
        dispatch!(self, s => s.weights(session))
    }
}

/// Encodes one sample for storage: f16 activations, then f32 target values.
pub fn encode_sample(activations: &[f16], target: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 * activations.len() + 4 * target.len());
    for a in activations {
        out.extend_from_slice(&a.to_le_bytes());
    }
    for t in target {
        out.extend_from_slice(&t.to_le_bytes());
    }
    out
}
