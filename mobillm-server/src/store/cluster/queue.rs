//! The training queue of the cluster store: the sessions whose job is queued or running. A worker claims the next
//! job with `SELECT … FOR UPDATE SKIP LOCKED` (workers never wait for one another) under a lease that its
//! heartbeat renews (`jobs.rs`); a job whose lease passes is claimed again. Order: the API key served longest ago
//! first, then first come first served within a key.

use mobillm_core::protocol::JobStatus;

use super::{parse_record, pg, write_record, Cluster};
use crate::store::{now_unix, Lease, StoreError};

/// A job a worker claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub session: String,
    /// Another worker held it before, and its lease passed (that worker died or stalled).
    pub reclaimed: bool,
}

impl Cluster {
    /// Claims the next training job for `worker` until `lease_secs` from now: the queued job (or the job whose
    /// worker's lease has passed) of the API key served longest ago, first come first served within a key.
    pub fn claim_job(&self, worker: &str, lease_secs: u64) -> Result<Option<Claim>, StoreError> {
        self.block_on(async {
            let mut client = self.client().await?;
            let txn = client.transaction().await.map_err(pg)?;
            let now = now_unix() as i64;
            let row = txn
                .query_opt(
                    "SELECT s.record FROM sessions s JOIN api_keys k ON k.key_hash = s.key_hash \
                     WHERE s.job_active AND s.lease_until < $1 \
                     ORDER BY k.served_turn, s.queued_turn LIMIT 1 FOR UPDATE OF s SKIP LOCKED",
                    &[&now],
                )
                .await
                .map_err(pg)?;
            let Some(row) = row else { return Ok(None) };
            let mut rec = parse_record(row.get(0))?;
            // A job left running under a lease: its worker died or stalled (one that stops on purpose, or a job
            // queued anew, has none).
            let reclaimed = rec.job.status == JobStatus::Running && rec.lease.is_some();
            if let Some(earlier) = rec.lease.as_ref().filter(|_| reclaimed) {
                tracing::warn!(session = %rec.id, worker = %earlier.worker, "reclaiming a job whose worker's lease passed");
            }
            rec.lease = Some(Lease { worker: worker.to_string(), until_unix: now as u64 + lease_secs });
            rec.job.status = JobStatus::Running;
            write_record(&txn, &rec, None).await?;
            txn.execute("UPDATE api_keys SET served_turn = nextval('turns') WHERE key_hash = $1", &[&rec.key_hash])
                .await
                .map_err(pg)?;
            txn.commit().await.map_err(pg)?;
            Ok(Some(Claim { session: rec.id, reclaimed }))
        })
    }

    /// Jobs waiting for a worker (queued, or whose worker's lease has passed).
    pub fn queued_jobs(&self) -> Result<usize, StoreError> {
        self.count("SELECT count(*) FROM sessions WHERE job_active AND lease_until < $1")
    }

    /// Jobs a worker holds a lease on.
    pub fn running_jobs(&self) -> Result<usize, StoreError> {
        self.count("SELECT count(*) FROM sessions WHERE job_active AND lease_until >= $1")
    }

    fn count(&self, sql: &str) -> Result<usize, StoreError> {
        self.block_on(async {
            let row = self.client().await?.query_one(sql, &[&(now_unix() as i64)]).await.map_err(pg)?;
            Ok(row.get::<_, i64>(0) as usize)
        })
    }
}
