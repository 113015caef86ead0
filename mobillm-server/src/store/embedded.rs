//! The embedded store: one redb file under the data directory, for a server of one process. Each write is one
//! redb transaction; commits record the allocator state (redb's quick-repair), so reopening after a crash does not
//! scan the whole file. A session's samples and bytes are counted in its record, each API key's in `keys`, the
//! whole store's in `usage`.

use std::collections::HashSet;
use std::path::Path;

use mobillm_core::side::SampleId;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};

use super::{now_unix, se, Created, Refusal, SessionRecord, StoreError, TrainingSet, Usage, SAMPLE_KEY_BYTES};
use crate::config::Quotas;

/// session id (hex) → JSON [`SessionRecord`].
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
/// (session id, sample id) → f16 activations followed by f32 target.
const SAMPLES: TableDefinition<(&str, &[u8]), &[u8]> = TableDefinition::new("samples");
/// session id → the side network's latest checkpoint (safetensors bytes).
const WEIGHTS: TableDefinition<&str, &[u8]> = TableDefinition::new("weights");
/// API key hash → JSON [`Usage`].
const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
/// `"all"` → JSON [`Usage`] of the whole store.
const USAGE: TableDefinition<&str, &[u8]> = TableDefinition::new("usage");
/// hash of (API key hash, idempotency key) of a create request → session id.
const IDEMPOTENCY: TableDefinition<&str, &str> = TableDefinition::new("idempotency");
/// `"layout"` → the version of this layout.
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

/// The store's layout. A store written by another layout is refused at start rather than misread; its sessions
/// are caches of fine-tunes in progress, so the remedy is a fresh data directory (devices upload again).
const LAYOUT: &str = "2";

pub struct Embedded {
    db: Database,
}

impl Embedded {
    /// Opens (or creates) the store in `dir` with a page cache of `cache_bytes`.
    pub fn open(dir: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join("mobillm.redb");
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .set_repair_callback(|session| {
                tracing::warn!(progress = session.progress(), "repairing the store after an unclean shutdown")
            })
            .create(&path)
            .map_err(|e| StoreError(format!("cannot open {}: {e}", path.display())))?;
        let store = Self { db };
        let txn = store.write()?;
        {
            let mut meta = txn.open_table(META).map_err(se)?;
            let layout = meta.get("layout").map_err(se)?.map(|v| v.value().to_string());
            let sessions = txn.open_table(SESSIONS).map_err(se)?.len().map_err(se)?;
            match layout.as_deref() {
                Some(LAYOUT) => {}
                None if sessions == 0 => {
                    meta.insert("layout", LAYOUT).map_err(se)?;
                }
                other => {
                    return Err(StoreError(format!(
                        "{} was written by another version of the server (store layout {}, this one reads {LAYOUT}); \
                         its sessions are caches of fine-tunes in progress: move it away and start with an empty \
                         data directory",
                        path.display(),
                        other.unwrap_or("1")
                    )))
                }
            }
        }
        for table in [WEIGHTS, KEYS, USAGE] {
            txn.open_table(table).map_err(se)?;
        }
        txn.open_table(SAMPLES).map_err(se)?;
        txn.open_table(IDEMPOTENCY).map_err(se)?;
        txn.commit().map_err(se)?;
        Ok(store)
    }

    fn write(&self) -> Result<WriteTransaction, StoreError> {
        let mut txn = self.db.begin_write().map_err(se)?;
        txn.set_quick_repair(true);
        Ok(txn)
    }

    pub fn session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(se)?;
        read_record(&txn.open_table(SESSIONS).map_err(se)?, id)
    }

    /// Up to `limit` sessions in id order, after `after`.
    pub fn sessions(&self, after: Option<&str>, limit: usize) -> Result<Vec<SessionRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(se)?;
        let t = txn.open_table(SESSIONS).map_err(se)?;
        let mut out = Vec::new();
        let rows = match after {
            Some(a) => t.range::<&str>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)).map_err(se)?,
            None => t.iter().map_err(se)?,
        };
        for row in rows.take(limit) {
            let (_, v) = row.map_err(se)?;
            out.push(serde_json::from_slice(v.value()).map_err(se)?);
        }
        Ok(out)
    }

    pub fn usage(&self) -> Result<Usage, StoreError> {
        let txn = self.db.begin_read().map_err(se)?;
        let t = txn.open_table(USAGE).map_err(se)?;
        read_usage(&t, "all")
    }

    pub fn key_usage(&self, key_hash: &str) -> Result<Usage, StoreError> {
        let txn = self.db.begin_read().map_err(se)?;
        let t = txn.open_table(KEYS).map_err(se)?;
        read_usage(&t, key_hash)
    }

    /// Creates a session, unless its API key already has `max_sessions_per_key` (checked in the same
    /// transaction, so concurrent creates cannot pass the cap). With an idempotency key seen before, answers
    /// with that session instead (after checking the request is the same) and gives it `rec.token_hash`.
    pub fn create_session(&self, rec: &SessionRecord, quotas: &Quotas) -> Result<Result<Created, Refusal>, StoreError> {
        let txn = self.write()?;
        let outcome = {
            let mut idem = txn.open_table(IDEMPOTENCY).map_err(se)?;
            let mut sessions = txn.open_table(SESSIONS).map_err(se)?;
            let earlier = match &rec.create_request {
                Some((key, _)) => idem.get(key.as_str()).map_err(se)?.map(|v| v.value().to_string()),
                None => None,
            };
            if let Some(id) = earlier {
                let Some(mut first) = read_record(&sessions, &id)? else { return Ok(Err(Refusal::Gone)) };
                if let Err(refusal) = first.replay(rec) {
                    return Ok(Err(refusal));
                }
                sessions.insert(id.as_str(), serde_json::to_vec(&first).map_err(se)?.as_slice()).map_err(se)?;
                Ok(Created::Replayed(id))
            } else {
                let mut keys = txn.open_table(KEYS).map_err(se)?;
                let mut key_usage = read_usage(&keys, &rec.key_hash)?;
                if key_usage.sessions >= quotas.max_sessions_per_key as u64 {
                    Err(Refusal::key_sessions(key_usage.sessions))
                } else {
                    let mut usage_t = txn.open_table(USAGE).map_err(se)?;
                    let mut all = read_usage(&usage_t, "all")?;
                    key_usage.sessions += 1;
                    all.sessions += 1;
                    write_usage(&mut keys, &rec.key_hash, key_usage)?;
                    write_usage(&mut usage_t, "all", all)?;
                    sessions.insert(rec.id.as_str(), serde_json::to_vec(rec).map_err(se)?.as_slice()).map_err(se)?;
                    if let Some((key, _)) = &rec.create_request {
                        idem.insert(key.as_str(), rec.id.as_str()).map_err(se)?;
                    }
                    Ok(Created::New)
                }
            }
        };
        if outcome.is_ok() {
            txn.commit().map_err(se)?;
        }
        Ok(outcome)
    }

    /// As [`Store::update`], and saves a checkpoint of the weights with it, charging its size to the session.
    pub fn checkpoint<R>(
        &self,
        id: &str,
        weights: Option<&[u8]>,
        f: impl FnOnce(&mut SessionRecord) -> Result<R, Refusal>,
    ) -> Result<Result<R, Refusal>, StoreError> {
        let txn = self.write()?;
        let outcome = {
            let mut sessions = txn.open_table(SESSIONS).map_err(se)?;
            let Some(mut rec) = read_record(&sessions, id)? else { return Ok(Err(Refusal::Gone)) };
            match f(&mut rec) {
                Err(refusal) => Err(refusal),
                Ok(r) => {
                    if let Some(w) = weights {
                        let mut t = txn.open_table(WEIGHTS).map_err(se)?;
                        let old = t.insert(id, w).map_err(se)?.map_or(0, |v| v.value().len() as u64);
                        let new = w.len() as u64;
                        rec.stored_bytes = (rec.stored_bytes + new).saturating_sub(old);
                        self.charge(&txn, &rec.key_hash, new as i64 - old as i64)?;
                    }
                    sessions.insert(id, serde_json::to_vec(&rec).map_err(se)?.as_slice()).map_err(se)?;
                    Ok(r)
                }
            }
        };
        if outcome.is_ok() {
            txn.commit().map_err(se)?;
        }
        Ok(outcome)
    }

    /// Adds `delta` bytes to the key's and the store's usage (inside `txn`).
    fn charge(&self, txn: &WriteTransaction, key_hash: &str, delta: i64) -> Result<(), StoreError> {
        let mut keys = txn.open_table(KEYS).map_err(se)?;
        let mut usage_t = txn.open_table(USAGE).map_err(se)?;
        let (mut k, mut all) = (read_usage(&keys, key_hash)?, read_usage(&usage_t, "all")?);
        k.bytes = k.bytes.saturating_add_signed(delta);
        all.bytes = all.bytes.saturating_add_signed(delta);
        write_usage(&mut keys, key_hash, k)?;
        write_usage(&mut usage_t, "all", all)
    }

    /// Stores the samples whose ids are new, in one transaction, within the session's sample cap and the
    /// session's, its key's and the store's byte quotas. Returns (stored, already present, total now).
    pub fn put_samples(
        &self,
        session: &str,
        rows: &[(SampleId, Vec<u8>)],
        quotas: &Quotas,
    ) -> Result<Result<(usize, usize, usize), Refusal>, StoreError> {
        let txn = self.write()?;
        let outcome = {
            let mut sessions = txn.open_table(SESSIONS).map_err(se)?;
            let Some(mut rec) = read_record(&sessions, session)? else { return Ok(Err(Refusal::Gone)) };
            let mut samples = txn.open_table(SAMPLES).map_err(se)?;
            let mut seen = HashSet::with_capacity(rows.len());
            let mut fresh = Vec::with_capacity(rows.len());
            for (id, bytes) in rows {
                if seen.insert(*id) && samples.get((session, &id.0[..])).map_err(se)?.is_none() {
                    fresh.push((id, bytes));
                }
            }
            let added: u64 = fresh.iter().map(|(_, b)| b.len() as u64 + SAMPLE_KEY_BYTES).sum();
            let keys = txn.open_table(KEYS).map_err(se)?;
            let key_usage = read_usage(&keys, &rec.key_hash)?;
            drop(keys);
            let all = read_usage(&txn.open_table(USAGE).map_err(se)?, "all")?;
            let room = rec.room_for(fresh.len(), added, quotas).and_then(|()| {
                if key_usage.bytes + added > quotas.key_bytes {
                    Err(Refusal::bytes_over(added, "this API key's", quotas.key_bytes))
                } else if all.bytes + added > quotas.global_bytes {
                    Err(Refusal::bytes_over(added, "the server's", quotas.global_bytes))
                } else {
                    Ok(())
                }
            });
            match room {
                Err(refusal) => Err(refusal),
                Ok(()) => {
                    for (id, bytes) in &fresh {
                        samples.insert((session, &id.0[..]), bytes.as_slice()).map_err(se)?;
                    }
                    rec.samples += fresh.len();
                    rec.stored_bytes += added;
                    rec.last_used_unix = now_unix();
                    sessions.insert(session, serde_json::to_vec(&rec).map_err(se)?.as_slice()).map_err(se)?;
                    drop((samples, sessions));
                    self.charge(&txn, &rec.key_hash, added as i64)?;
                    Ok((fresh.len(), rows.len() - fresh.len(), rec.samples))
                }
            }
        };
        if outcome.is_ok() {
            txn.commit().map_err(se)?;
        }
        Ok(outcome)
    }

    /// Erases a session, its samples, checkpoint and idempotency entry, and gives back what it was charged.
    /// Returns the deleted record.
    pub fn delete_session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        let txn = self.write()?;
        let rec: Option<SessionRecord> = {
            let mut s = txn.open_table(SESSIONS).map_err(se)?;
            let removed = s.remove(id).map_err(se)?;
            removed.map(|v| serde_json::from_slice(v.value()).map_err(se)).transpose()?
        };
        if let Some(rec) = &rec {
            txn.open_table(SAMPLES)
                .map_err(se)?
                .retain_in((id, &[][..])..=(id, &[0xFFu8; 16][..]), |_, _| false)
                .map_err(se)?;
            txn.open_table(WEIGHTS).map_err(se)?.remove(id).map_err(se)?;
            if let Some((key, _)) = &rec.create_request {
                txn.open_table(IDEMPOTENCY).map_err(se)?.remove(key.as_str()).map_err(se)?;
            }
            let mut keys = txn.open_table(KEYS).map_err(se)?;
            let mut usage_t = txn.open_table(USAGE).map_err(se)?;
            let (mut k, mut all) = (read_usage(&keys, &rec.key_hash)?, read_usage(&usage_t, "all")?);
            k.sessions = k.sessions.saturating_sub(1);
            k.bytes = k.bytes.saturating_sub(rec.stored_bytes);
            all.sessions = all.sessions.saturating_sub(1);
            all.bytes = all.bytes.saturating_sub(rec.stored_bytes);
            if k.sessions == 0 {
                keys.remove(rec.key_hash.as_str()).map_err(se)?;
            } else {
                write_usage(&mut keys, &rec.key_hash, k)?;
            }
            write_usage(&mut usage_t, "all", all)?;
        }
        txn.commit().map_err(se)?;
        Ok(rec)
    }

    pub fn training_set(&self, rec: &SessionRecord) -> Result<TrainingSet, StoreError> {
        let shape = &rec.shape;
        let mut set = TrainingSet::with_capacity(rec)?;
        let txn = self.db.begin_read().map_err(se)?;
        let t = txn.open_table(SAMPLES).map_err(se)?;
        let id = rec.id.as_str();
        for row in t.range((id, &[][..])..=(id, &[0xFFu8; 16][..])).map_err(se)? {
            let (k, v) = row.map_err(se)?;
            let bytes = v.value();
            if bytes.len() != shape.stored_sample_len() {
                return Err(StoreError(format!("a sample of session {id} has {} stored bytes", bytes.len())));
            }
            let (acts, target) = bytes.split_at(2 * shape.layers * shape.dim);
            set.push(SampleId(k.value().1.try_into().map_err(se)?), acts, target);
        }
        Ok(set)
    }

    /// Replaces the targets of existing samples, all or nothing. `Err(id)` names the first unknown sample.
    pub fn update_targets(
        &self,
        session: &str,
        rows: &[(SampleId, &[f32])],
    ) -> Result<Result<usize, Result<SampleId, Refusal>>, StoreError> {
        let txn = self.write()?;
        {
            let mut sessions = txn.open_table(SESSIONS).map_err(se)?;
            let Some(mut rec) = read_record(&sessions, session)? else { return Ok(Err(Err(Refusal::Gone))) };
            let mut t = txn.open_table(SAMPLES).map_err(se)?;
            let acts_len = 2 * rec.shape.layers * rec.shape.dim;
            for (id, target) in rows {
                let updated = match t.get((session, &id.0[..])).map_err(se)? {
                    Some(v) => {
                        let mut bytes = v.value()[..acts_len].to_vec();
                        target.iter().for_each(|x| bytes.extend_from_slice(&x.to_le_bytes()));
                        bytes
                    }
                    None => return Ok(Err(Ok(*id))), // dropping the transaction discards earlier updates
                };
                t.insert((session, &id.0[..]), updated.as_slice()).map_err(se)?;
            }
            rec.last_used_unix = now_unix();
            sessions.insert(session, serde_json::to_vec(&rec).map_err(se)?.as_slice()).map_err(se)?;
        }
        txn.commit().map_err(se)?;
        Ok(Ok(rows.len()))
    }

    pub fn weights(&self, session: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(se)?;
        let t = txn.open_table(WEIGHTS).map_err(se)?;
        Ok(t.get(session).map_err(se)?.map(|v| v.value().to_vec()))
    }
}

fn read_record(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    id: &str,
) -> Result<Option<SessionRecord>, StoreError> {
    t.get(id).map_err(se)?.map(|v| serde_json::from_slice(v.value()).map_err(se)).transpose()
}

fn read_usage(t: &impl ReadableTable<&'static str, &'static [u8]>, key: &str) -> Result<Usage, StoreError> {
    t.get(key).map_err(se)?.map_or(Ok(Usage::default()), |v| serde_json::from_slice(v.value()).map_err(se))
}

fn write_usage(t: &mut redb::Table<&'static str, &'static [u8]>, key: &str, u: Usage) -> Result<(), StoreError> {
    t.insert(key, serde_json::to_vec(&u).map_err(se)?.as_slice()).map_err(se)?;
    Ok(())
}
