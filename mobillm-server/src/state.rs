//! The server's shared state: configuration, credentials, the store, the memory budget, the training queue and
//! its workers, live `mobillm` trainers, metrics, and when each session was last used.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::budget::{Budget, Reservation};
use crate::config::ServerConfig;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::scheduler::Scheduler;
use crate::store::{now_unix, Store};
use crate::trainers::LiveTrainers;

pub struct AppState {
    pub config: ServerConfig,
    /// SHA-256 of each API key and of the admin token: presented secrets are hashed and compared in constant
    /// time, and the plain secrets are not kept.
    api_keys: Vec<[u8; 32]>,
    admin_token: Option<[u8; 32]>,
    pub store: Store,
    pub budget: Arc<Budget>,
    pub scheduler: Scheduler,
    pub trainers: LiveTrainers,
    pub metrics: Metrics,
    /// Unix seconds of each session's latest request, for the reaper (writes also persist it in the record).
    last_seen: Mutex<HashMap<String, u64>>,
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

impl AppState {
    /// Opens the store; the training workers are started by [`crate::open`].
    pub(crate) fn new(mut config: ServerConfig) -> anyhow::Result<Arc<Self>> {
        anyhow::ensure!(!config.api_keys.is_empty(), "no API key configured");
        let store = Store::open(&config)?;
        anyhow::ensure!(
            store.is_shared() || config.role == crate::config::Role::All,
            "--role {:?} needs the cluster store (--database-url and --object-store): the embedded store belongs to \
             one process, which serves and trains",
            config.role
        );
        let api_keys = config.api_keys.iter().map(|k| sha256(k.as_bytes())).collect();
        let admin_token = config.admin_token.as_deref().map(|t| sha256(t.as_bytes()));
        // The plain secrets are not needed past this point.
        config.api_keys.iter_mut().for_each(|k| *k = "<redacted>".into());
        config.admin_token = config.admin_token.map(|_| "<redacted>".into());
        let state = Arc::new(Self {
            budget: Budget::new(config.memory_budget_bytes()),
            scheduler: Scheduler::new(config.max_queued_jobs),
            config,
            api_keys,
            admin_token,
            store,
            trainers: LiveTrainers::default(),
            metrics: Metrics::default(),
            last_seen: Mutex::new(HashMap::new()),
        });
        Ok(state)
    }

    /// Stops the training workers (after their current epoch) and waits for them.
    pub fn shutdown(&self, timeout: Duration) {
        self.scheduler.shutdown(timeout);
    }

    /// Runs store or CPU work on the blocking pool, off the async workers.
    pub async fn blocking<R: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&AppState) -> Result<R, ApiError> + Send + 'static,
    ) -> Result<R, ApiError> {
        let state = self.clone();
        tokio::task::spawn_blocking(move || f(&state)).await.map_err(ApiError::internal)?
    }

    /// The hash (hex) of the presented API key if it is one of ours.
    pub fn api_key(&self, presented: &str) -> Option<String> {
        let h = sha256(presented.as_bytes());
        // Check every key, so the time taken does not tell which one matched.
        let known = self.api_keys.iter().fold(0u8, |found, k| found | k.ct_eq(&h).unwrap_u8());
        (known == 1).then(|| sha256_hex(presented.as_bytes()))
    }

    pub fn admin_token_matches(&self, presented: &str) -> Result<(), ApiError> {
        let expected = self.admin_token.ok_or_else(|| ApiError::forbidden("no admin token is configured"))?;
        if bool::from(expected.ct_eq(&sha256(presented.as_bytes()))) {
            Ok(())
        } else {
            Err(ApiError::unauthorized("wrong admin token"))
        }
    }

    /// Reserves `bytes` of the memory budget now, unloading idle trainers if that makes room; otherwise 503.
    pub fn reserve(&self, bytes: u64) -> Result<Reservation, ApiError> {
        if bytes > self.budget.total() {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "over_budget",
                format!("this needs {bytes} bytes of memory, more than the server's budget of {}", self.budget.total()),
            ));
        }
        if let Some(r) = self.budget.try_reserve(bytes) {
            return Ok(r);
        }
        if self.trainers.evict_for(&self.budget, bytes) {
            if let Some(r) = self.budget.try_reserve(bytes) {
                return Ok(r);
            }
        }
        self.metrics.overloaded.inc();
        Err(ApiError::busy(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "the server's memory budget is in use; retry shortly",
            2,
        ))
    }

    /// As [`AppState::reserve`] for a worker thread, which may wait up to `timeout`.
    pub fn reserve_waiting(&self, bytes: u64, timeout: Duration) -> Option<Reservation> {
        if let Some(r) = self.budget.try_reserve(bytes) {
            return Some(r);
        }
        self.trainers.evict_for(&self.budget, bytes);
        self.budget.reserve_within(bytes, timeout)
    }

    /// Whether a training job may be queued now (the queue is bounded: a full one answers 503).
    pub fn queue_has_room(&self) -> Result<bool, ApiError> {
        let queued = match &self.store {
            Store::Embedded(_) => self.scheduler.queued(),
            Store::Cluster(c) => c.queued_jobs()?,
        };
        Ok(queued < self.config.max_queued_jobs)
    }

    /// Hands a session whose job was just set to queued to the workers: the embedded store's go through this
    /// process's queue (`false` when it is full); the cluster store's record is the queue entry already.
    pub fn enqueue(&self, id: &str, key_hash: &str) -> bool {
        match &self.store {
            Store::Embedded(_) => self.scheduler.enqueue(id, key_hash),
            Store::Cluster(_) => true,
        }
    }

    /// Claims the next job of the cluster's queue for `worker` under a lease (the embedded store's jobs come
    /// from this process's queue instead: none to claim). Returns its session id.
    pub fn claim_job(&self, worker: &str) -> Result<Option<String>, String> {
        let Store::Cluster(c) = &self.store else { return Ok(None) };
        let claim = c.claim_job(worker, self.config.lease_secs()).map_err(|e| e.to_string())?;
        if claim.as_ref().is_some_and(|c| c.reclaimed) {
            self.metrics.jobs_reclaimed.inc();
        }
        Ok(claim.map(|c| c.session))
    }

    /// Training jobs waiting, and on a worker: this process's, or the whole cluster's.
    pub fn job_counts(&self) -> Result<(usize, usize), ApiError> {
        Ok(match &self.store {
            Store::Embedded(_) => (self.scheduler.queued(), self.scheduler.running()),
            Store::Cluster(c) => (c.queued_jobs()?, c.running_jobs()?),
        })
    }

    /// Refuses writes when the data directory's disk is nearly full (the embedded store's; the cluster store's
    /// capacity is its database's and object store's).
    pub fn check_disk(&self) -> Result<(), ApiError> {
        if self.store.is_shared() {
            return Ok(());
        }
        let free = fs4::available_space(&self.config.data_dir).map_err(ApiError::internal)?;
        if free < self.config.min_free_disk_bytes() {
            return Err(ApiError::insufficient_storage(format!(
                "the server's disk has {} MiB free, below its watermark of {} MiB",
                free >> 20,
                self.config.min_free_disk_mb
            )));
        }
        Ok(())
    }

    /// Records a request to the session (for its idle expiry).
    pub fn touch(&self, id: &str) {
        self.last_seen.lock().expect("last seen").insert(id.to_string(), now_unix());
    }

    /// The latest request to the session this process has seen.
    pub fn last_seen(&self, id: &str) -> Option<u64> {
        self.last_seen.lock().expect("last seen").get(id).copied()
    }

    pub fn forget(&self, id: &str) {
        self.last_seen.lock().expect("last seen").remove(id);
        self.trainers.remove(id);
        self.scheduler.cancel(id);
    }

    /// Deletes a session and everything it holds: queued or running training, a live trainer, its data.
    pub fn delete_session(&self, id: &str) -> Result<bool, ApiError> {
        self.forget(id);
        let deleted = self.store.delete_session(id)?;
        Ok(deleted.is_some())
    }
}
