//! The cluster store, shared by any number of API and worker processes: PostgreSQL holds sessions, per-key and
//! global usage, idempotency keys, each cached sample's target and where its activations are, and the training
//! queue (claimed with `FOR UPDATE SKIP LOCKED` under a lease); an object store (S3, or a directory) holds the
//! activations, one object per upload, and the checkpoints.
//!
//! Acknowledged means durable in both: an upload's object is written before the transaction that records its
//! rows commits, and only then is the request answered. A checkpoint is written under a fresh key and the record
//! switched to it in the transaction, so a worker whose lease has passed cannot overwrite the checkpoint of the
//! worker that took its job over (its transaction is refused; the object it wrote is deleted). Deleting a session
//! deletes its rows in one transaction, then every object under its prefix.
//!
//! Lock order, to keep transactions free of deadlocks: a session row, then its key's row, then the usage row. The
//! usage row is taken last and held only until commit: it is the one row every upload changes.
//!
//! PostgreSQL and the object store are reached through a small runtime of the store's own, so the methods block
//! like the embedded store's and may be called from any thread that is not running async code.

use std::collections::{HashMap, HashSet};
use std::future::Future;

mod objects;
mod queue;

use deadpool_postgres::{GenericClient, Pool, Transaction};
use mobillm_core::side::SampleId;
use object_store::path::Path as ObjectPath;

pub use objects::Objects;
pub use queue::Claim;

use super::{now_unix, se, Created, Refusal, SessionRecord, StoreError, TrainingSet, Usage, SAMPLE_KEY_BYTES};
use crate::config::Quotas;

/// The migrations, in order; each is applied once, in a transaction, and recorded in `schema_migrations`.
const MIGRATIONS: &[(i32, &str)] = &[(1, include_str!("../../../migrations/0001_cluster_store.sql"))];

/// How long a connection may take to open, and a request may wait for a free one.
const DATABASE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serialises migrations between processes starting at once (an arbitrary, fixed advisory-lock id).
const MIGRATION_LOCK: i64 = 0x6d6f_6269_6c6c_6d01;

pub struct Cluster {
    runtime: Option<tokio::runtime::Runtime>,
    pool: Pool,
    objects: Objects,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // May be dropped on an async thread, where a runtime may not block.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Cluster {
    /// Connects to PostgreSQL at `database_url` (applying any migration it lacks) and to the object store at
    /// `objects`: `s3://bucket[/prefix]` (credentials, region and endpoint from the usual `AWS_*` variables) or
    /// `file:///directory`.
    pub fn open(database_url: &str, objects: &str, connections: usize) -> Result<Self, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("store-io")
            .enable_all()
            .build()
            .map_err(|e| StoreError(format!("cannot start the store's runtime: {e}")))?;
        let mut pg: tokio_postgres::Config =
            database_url.parse().map_err(|e| StoreError(format!("bad --database-url: {e}")))?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(DATABASE_TIMEOUT);
        }
        let manager = deadpool_postgres::Manager::from_config(
            pg,
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig { recycling_method: deadpool_postgres::RecyclingMethod::Fast },
        );
        let pool = {
            let _guard = runtime.enter();
            Pool::builder(manager)
                .max_size(connections.max(2))
                .runtime(deadpool_postgres::Runtime::Tokio1)
                // A database that does not answer fails requests with a 500 rather than holding them forever.
                .wait_timeout(Some(DATABASE_TIMEOUT))
                .create_timeout(Some(DATABASE_TIMEOUT))
                .recycle_timeout(Some(DATABASE_TIMEOUT))
                .build()
                .map_err(se)?
        };
        let objects = Objects::open(objects)?;
        let store = Self { runtime: Some(runtime), pool, objects };
        store.block_on(store.migrate())?;
        Ok(store)
    }

    pub(crate) fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.runtime.as_ref().expect("the runtime lives as long as the store").block_on(f)
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|e| StoreError(format!("PostgreSQL: {e}")))
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let txn = client.transaction().await.map_err(pg)?;
        txn.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(pg)?;
        txn.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, applied_unix bigint NOT NULL)",
        )
        .await
        .map_err(pg)?;
        let applied: HashSet<i32> = txn
            .query("SELECT version FROM schema_migrations", &[])
            .await
            .map_err(pg)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let newest = MIGRATIONS.last().map_or(0, |m| m.0);
        if let Some(unknown) = applied.iter().find(|v| **v > newest) {
            return Err(StoreError(format!(
                "the database has migration {unknown}, newer than this server's newest ({newest}): run the newer \
                 server, or a database of this version"
            )));
        }
        for (version, sql) in MIGRATIONS {
            if !applied.contains(version) {
                txn.batch_execute(sql).await.map_err(|e| StoreError(format!("migration {version}: {e}")))?;
                txn.execute("INSERT INTO schema_migrations VALUES ($1, $2)", &[version, &(now_unix() as i64)])
                    .await
                    .map_err(pg)?;
                tracing::info!(version, "database migrated");
            }
        }
        txn.commit().await.map_err(pg)
    }

    pub fn session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        self.block_on(async {
            let client = self.client().await?;
            let row = client.query_opt("SELECT record FROM sessions WHERE id = $1", &[&id]).await.map_err(pg)?;
            row.map(|r| parse_record(r.get(0))).transpose()
        })
    }

    pub fn sessions(&self, after: Option<&str>, limit: usize) -> Result<Vec<SessionRecord>, StoreError> {
        self.block_on(async {
            let client = self.client().await?;
            let rows = client
                .query(
                    "SELECT record FROM sessions WHERE id > $1 ORDER BY id LIMIT $2",
                    &[&after.unwrap_or(""), &(limit as i64)],
                )
                .await
                .map_err(pg)?;
            rows.iter().map(|r| parse_record(r.get(0))).collect()
        })
    }

    pub fn usage(&self) -> Result<Usage, StoreError> {
        self.block_on(async {
            let row = self.client().await?.query_one("SELECT sessions, bytes FROM usage", &[]).await.map_err(pg)?;
            Ok(usage_of(&row))
        })
    }

    pub fn key_usage(&self, key_hash: &str) -> Result<Usage, StoreError> {
        self.block_on(async { key_usage_of(&self.client().await?, key_hash).await })
    }

    pub fn create_session(&self, rec: &SessionRecord, quotas: &Quotas) -> Result<Result<Created, Refusal>, StoreError> {
        self.block_on(async {
            let mut client = self.client().await?;
            let txn = client.transaction().await.map_err(pg)?;
            if let Some((key, _)) = &rec.create_request {
                let earlier = txn
                    .query_opt("SELECT session_id FROM idempotency WHERE key = $1", &[key])
                    .await
                    .map_err(pg)?
                    .map(|r| r.get::<_, String>(0));
                if let Some(id) = earlier {
                    let Some(mut first) = lock_record(&txn, &id).await? else { return Ok(Err(Refusal::Gone)) };
                    if let Err(refusal) = first.replay(rec) {
                        return Ok(Err(refusal));
                    }
                    write_record(&txn, &first, None).await?;
                    txn.commit().await.map_err(pg)?;
                    return Ok(Ok(Created::Replayed(id)));
                }
            }
            txn.execute("INSERT INTO api_keys (key_hash) VALUES ($1) ON CONFLICT DO NOTHING", &[&rec.key_hash])
                .await
                .map_err(pg)?;
            let counted = txn
                .execute(
                    "UPDATE api_keys SET sessions = sessions + 1 WHERE key_hash = $1 AND sessions < $2",
                    &[&rec.key_hash, &(quotas.max_sessions_per_key as i64)],
                )
                .await
                .map_err(pg)?;
            if counted == 0 {
                return Ok(Err(Refusal::key_sessions(key_usage_of(&txn, &rec.key_hash).await?.sessions)));
            }
            txn.execute(
                "INSERT INTO sessions (id, key_hash, record) VALUES ($1, $2, $3)",
                &[&rec.id, &rec.key_hash, &to_json(rec)?],
            )
            .await
            .map_err(pg)?;
            if let Some((key, _)) = &rec.create_request {
                txn.execute("INSERT INTO idempotency VALUES ($1, $2)", &[key, &rec.id]).await.map_err(pg)?;
            }
            txn.execute("UPDATE usage SET sessions = sessions + 1", &[]).await.map_err(pg)?;
            txn.commit().await.map_err(pg)?;
            Ok(Ok(Created::New))
        })
    }

    pub fn checkpoint<R>(
        &self,
        id: &str,
        weights: Option<&[u8]>,
        f: impl FnOnce(&mut SessionRecord) -> Result<R, Refusal>,
    ) -> Result<Result<R, Refusal>, StoreError> {
        let mut written: Option<ObjectPath> = None;
        let outcome = self.block_on(async {
            let mut client = self.client().await?;
            let txn = client.transaction().await.map_err(pg)?;
            let row = txn
                .query_opt("SELECT record, weights_key, weights_bytes FROM sessions WHERE id = $1 FOR UPDATE", &[&id])
                .await
                .map_err(pg)?;
            let Some(row) = row else { return Ok(Err(Refusal::Gone)) };
            let mut rec = parse_record(row.get(0))?;
            let (old_key, old_bytes): (Option<String>, i64) = (row.get(1), row.get(2));
            let r = match f(&mut rec) {
                Ok(r) => r,
                Err(refusal) => return Ok(Err(refusal)),
            };
            let mut new_weights = None;
            if let Some(w) = weights {
                let path = self.objects.new_key(id, "weights");
                self.objects.put(&path, w.to_vec()).await?;
                written = Some(path.clone());
                let delta = w.len() as i64 - old_bytes;
                rec.stored_bytes = rec.stored_bytes.saturating_add_signed(delta);
                charge(&txn, &rec.key_hash, delta).await?;
                new_weights = Some((path.to_string(), w.len() as i64));
            }
            write_record(&txn, &rec, new_weights).await?;
            txn.commit().await.map_err(pg)?;
            written = None; // committed: the new object is the checkpoint, the old one is garbage
            if let (Some(old), Some(_)) = (old_key, weights) {
                self.objects.delete_unreferenced(&ObjectPath::from(old)).await;
            }
            Ok(Ok(r))
        });
        if let Some(orphan) = written {
            self.block_on(self.objects.delete_unreferenced(&orphan));
        }
        outcome
    }

    pub fn put_samples(
        &self,
        session: &str,
        rows: &[(SampleId, Vec<u8>)],
        quotas: &Quotas,
    ) -> Result<Result<(usize, usize, usize), Refusal>, StoreError> {
        let mut written: Option<ObjectPath> = None;
        let outcome = self.block_on(async {
            let mut client = self.client().await?;
            let txn = client.transaction().await.map_err(pg)?;
            let Some(mut rec) = lock_record(&txn, session).await? else { return Ok(Err(Refusal::Gone)) };
            let ids: Vec<&[u8]> = rows.iter().map(|(id, _)| &id.0[..]).collect();
            let present: HashSet<Vec<u8>> = txn
                .query("SELECT sample_id FROM samples WHERE session_id = $1 AND sample_id = ANY($2)", &[&session, &ids])
                .await
                .map_err(pg)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let mut seen = HashSet::with_capacity(rows.len());
            let fresh: Vec<_> =
                rows.iter().filter(|(id, _)| !present.contains(&id.0[..]) && seen.insert(id.0)).collect();
            let added: u64 = fresh.iter().map(|(_, b)| b.len() as u64 + SAMPLE_KEY_BYTES).sum();
            if let Err(refusal) = rec.room_for(fresh.len(), added, quotas) {
                return Ok(Err(refusal));
            }
            if !fresh.is_empty() {
                let acts_len = 2 * rec.shape.layers * rec.shape.dim;
                let mut chunk = Vec::new();
                chunk
                    .try_reserve_exact(fresh.len() * acts_len)
                    .map_err(|_| StoreError("no memory for a chunk".into()))?;
                fresh.iter().for_each(|(_, b)| chunk.extend_from_slice(&b[..acts_len]));
                let path = self.objects.new_key(session, "chunks");
                self.objects.put(&path, chunk).await?;
                written = Some(path.clone());
                let chunk_key = path.to_string();
                let fresh_ids: Vec<&[u8]> = fresh.iter().map(|(id, _)| &id.0[..]).collect();
                let index: Vec<i32> = (0..fresh.len() as i32).collect();
                let targets: Vec<&[u8]> = fresh.iter().map(|(_, b)| &b[acts_len..]).collect();
                txn.execute(
                    "INSERT INTO samples (session_id, sample_id, chunk, row_index, target) \
                     SELECT $1, u.id, $2, u.i, u.t FROM unnest($3::bytea[], $4::int[], $5::bytea[]) AS u(id, i, t)",
                    &[&session, &chunk_key, &fresh_ids, &index, &targets],
                )
                .await
                .map_err(pg)?;
                let key_ok = txn
                    .execute(
                        "UPDATE api_keys SET bytes = bytes + $2 WHERE key_hash = $1 AND bytes + $2 <= $3",
                        &[&rec.key_hash, &(added as i64), &(quotas.key_bytes as i64)],
                    )
                    .await
                    .map_err(pg)?;
                if key_ok == 0 {
                    return Ok(Err(Refusal::bytes_over(added, "this API key's", quotas.key_bytes)));
                }
                let all_ok = txn
                    .execute(
                        "UPDATE usage SET bytes = bytes + $1 WHERE bytes + $1 <= $2",
                        &[&(added as i64), &(quotas.global_bytes as i64)],
                    )
                    .await
                    .map_err(pg)?;
                if all_ok == 0 {
                    return Ok(Err(Refusal::bytes_over(added, "the server's", quotas.global_bytes)));
                }
            }
            rec.samples += fresh.len();
            rec.stored_bytes += added;
            rec.last_used_unix = now_unix();
            write_record(&txn, &rec, None).await?;
            txn.commit().await.map_err(pg)?;
            written = None;
            Ok(Ok((fresh.len(), rows.len() - fresh.len(), rec.samples)))
        });
        if let Some(orphan) = written {
            self.block_on(self.objects.delete_unreferenced(&orphan));
        }
        outcome
    }

    pub fn delete_session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        let rec = self.block_on(async {
            let mut client = self.client().await?;
            let txn = client.transaction().await.map_err(pg)?;
            let row = txn.query_opt("DELETE FROM sessions WHERE id = $1 RETURNING record", &[&id]).await.map_err(pg)?;
            let Some(row) = row else { return Ok(None) };
            let rec = parse_record(row.get(0))?;
            let bytes = rec.stored_bytes as i64;
            txn.execute(
                "UPDATE api_keys SET sessions = greatest(sessions - 1, 0), bytes = greatest(bytes - $2, 0) \
                 WHERE key_hash = $1",
                &[&rec.key_hash, &bytes],
            )
            .await
            .map_err(pg)?;
            txn.execute(
                "UPDATE usage SET sessions = greatest(sessions - 1, 0), bytes = greatest(bytes - $1, 0)",
                &[&bytes],
            )
            .await
            .map_err(pg)?;
            txn.commit().await.map_err(pg)?;
            Ok::<_, StoreError>(Some(rec))
        })?;
        // The rows are gone (and with them every reference to the objects): now the objects.
        self.block_on(self.objects.delete_session(id))?;
        Ok(rec)
    }

    /// How many objects a session has (none once it is deleted).
    pub fn session_objects(&self, id: &str) -> Result<usize, StoreError> {
        self.block_on(self.objects.count_session(id))
    }

    pub fn training_set(&self, rec: &SessionRecord) -> Result<TrainingSet, StoreError> {
        let shape = &rec.shape;
        let acts_len = 2 * shape.layers * shape.dim;
        let mut set = TrainingSet::with_capacity(rec)?;
        self.block_on(async {
            let client = self.client().await?;
            // Chunk by chunk, so one chunk's bytes are held at a time beside the set.
            let rows = client
                .query(
                    "SELECT sample_id, chunk, row_index, target FROM samples WHERE session_id = $1 \
                     ORDER BY chunk, row_index",
                    &[&rec.id],
                )
                .await
                .map_err(pg)?;
            let mut current: Option<(String, bytes::Bytes)> = None;
            for row in &rows {
                let (id, chunk, index, target): (&[u8], String, i32, &[u8]) =
                    (row.get(0), row.get(1), row.get(2), row.get(3));
                if current.as_ref().is_none_or(|(c, _)| *c != chunk) {
                    let bytes = self.objects.get(&ObjectPath::from(chunk.as_str())).await?;
                    current = Some((chunk, bytes));
                }
                let (name, bytes) = current.as_ref().expect("fetched above");
                let start = index as usize * acts_len;
                let acts = bytes.get(start..start + acts_len).ok_or_else(|| {
                    StoreError(format!("object {name} has {} bytes, too few for row {index}", bytes.len()))
                })?;
                if target.len() != 4 * shape.outputs {
                    return Err(StoreError(format!(
                        "a sample of session {} has a {}-byte target",
                        rec.id,
                        target.len()
                    )));
                }
                set.push(SampleId(id.try_into().map_err(se)?), acts, target);
            }
            Ok(())
        })?;
        Ok(set)
    }

    pub fn update_targets(
        &self,
        session: &str,
        rows: &[(SampleId, &[f32])],
    ) -> Result<Result<usize, Result<SampleId, Refusal>>, StoreError> {
        self.block_on(async {
            let mut client = self.client().await?;
            let txn = client.transaction().await.map_err(pg)?;
            let Some(mut rec) = lock_record(&txn, session).await? else { return Ok(Err(Err(Refusal::Gone))) };
            // A repeated id keeps its last target, as one update after another would.
            let mut latest: HashMap<[u8; 16], &[f32]> = HashMap::with_capacity(rows.len());
            rows.iter().for_each(|(id, t)| {
                latest.insert(id.0, t);
            });
            let ids: Vec<&[u8]> = latest.keys().map(|k| &k[..]).collect();
            let targets: Vec<Vec<u8>> =
                latest.values().map(|t| t.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
            let updated = txn
                .execute(
                    "UPDATE samples s SET target = u.t FROM unnest($2::bytea[], $3::bytea[]) AS u(id, t) \
                     WHERE s.session_id = $1 AND s.sample_id = u.id",
                    &[&session, &ids, &targets],
                )
                .await
                .map_err(pg)?;
            if updated as usize != ids.len() {
                let known: HashSet<Vec<u8>> = txn
                    .query(
                        "SELECT sample_id FROM samples WHERE session_id = $1 AND sample_id = ANY($2)",
                        &[&session, &ids],
                    )
                    .await
                    .map_err(pg)?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let unknown = rows.iter().find(|(id, _)| !known.contains(&id.0[..])).map_or(rows[0].0, |r| r.0);
                return Ok(Err(Ok(unknown))); // dropping the transaction discards the update
            }
            rec.last_used_unix = now_unix();
            write_record(&txn, &rec, None).await?;
            txn.commit().await.map_err(pg)?;
            Ok(Ok(rows.len()))
        })
    }

    pub fn weights(&self, session: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.block_on(async {
            let client = self.client().await?;
            let row =
                client.query_opt("SELECT weights_key FROM sessions WHERE id = $1", &[&session]).await.map_err(pg)?;
            match row.and_then(|r| r.get::<_, Option<String>>(0)) {
                Some(key) => Ok(Some(self.objects.get(&ObjectPath::from(key)).await?.to_vec())),
                None => Ok(None),
            }
        })
    }
}

async fn key_usage_of(client: &impl GenericClient, key_hash: &str) -> Result<Usage, StoreError> {
    let row =
        client.query_opt("SELECT sessions, bytes FROM api_keys WHERE key_hash = $1", &[&key_hash]).await.map_err(pg)?;
    Ok(row.as_ref().map_or(Usage::default(), usage_of))
}

/// A `(sessions, bytes)` row of `usage` or `api_keys`.
fn usage_of(row: &tokio_postgres::Row) -> Usage {
    Usage { sessions: row.get::<_, i64>(0) as u64, bytes: row.get::<_, i64>(1) as u64 }
}

async fn lock_record(txn: &Transaction<'_>, id: &str) -> Result<Option<SessionRecord>, StoreError> {
    let row = txn.query_opt("SELECT record FROM sessions WHERE id = $1 FOR UPDATE", &[&id]).await.map_err(pg)?;
    row.map(|r| parse_record(r.get(0))).transpose()
}

/// Writes the record and the columns derived from it; `weights` switches the checkpoint object.
pub(crate) async fn write_record(
    txn: &Transaction<'_>,
    rec: &SessionRecord,
    weights: Option<(String, i64)>,
) -> Result<(), StoreError> {
    let active = rec.job.status.is_active();
    let lease_until = rec.lease.as_ref().filter(|_| active).map_or(0, |l| l.until_unix as i64);
    let (key, bytes) = weights.map_or((None, None), |(k, b)| (Some(k), Some(b)));
    txn.execute(
        "UPDATE sessions SET record = $2, lease_until = $4, \
         queued_turn = CASE WHEN $3 AND NOT job_active THEN nextval('turns') ELSE queued_turn END, \
         job_active = $3, weights_key = coalesce($5, weights_key), weights_bytes = coalesce($6, weights_bytes) \
         WHERE id = $1",
        &[&rec.id, &to_json(rec)?, &active, &lease_until, &key, &bytes],
    )
    .await
    .map_err(pg)?;
    Ok(())
}

/// Adds `delta` bytes to the key's and the store's usage (a checkpoint is charged, never refused).
async fn charge(txn: &Transaction<'_>, key_hash: &str, delta: i64) -> Result<(), StoreError> {
    txn.execute("UPDATE api_keys SET bytes = greatest(bytes + $2, 0) WHERE key_hash = $1", &[&key_hash, &delta])
        .await
        .map_err(pg)?;
    txn.execute("UPDATE usage SET bytes = greatest(bytes + $1, 0)", &[&delta]).await.map_err(pg)?;
    Ok(())
}

pub(crate) fn parse_record(json: &str) -> Result<SessionRecord, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError(format!("a session record does not parse: {e}")))
}

fn to_json(rec: &SessionRecord) -> Result<String, StoreError> {
    serde_json::to_string(rec).map_err(se)
}

pub(crate) fn pg(e: tokio_postgres::Error) -> StoreError {
    StoreError(format!("PostgreSQL: {e}"))
}
