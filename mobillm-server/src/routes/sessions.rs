//! `POST /v1/sessions`, `GET` and `DELETE /v1/sessions/{id}`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use mobillm_core::protocol::{CreateSession, Invalid, JobState, Mode, SessionCreated, SessionStatus};
use mobillm_core::side::SideConfig;
use rand::TryRngCore;

use super::idempotency_key;
use crate::auth::{ApiKey, SessionAuth};
use crate::body::JsonBody;
use crate::budget::Cost;
use crate::error::ApiError;
use crate::state::{sha256_hex, AppState};
use crate::store::{now_unix, Created, SessionRecord, SessionShape};

fn random_hex(bytes: usize) -> Result<String, ApiError> {
    let mut b = vec![0u8; bytes];
    rand::rngs::OsRng.try_fill_bytes(&mut b).map_err(|e| ApiError::internal(format!("OS RNG: {e}")))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Refuses a session whose work could not fit the memory budget: a `pae` job over as many samples as its quotas
/// allow, or a `mobillm` step of the largest frame with its live trainer.
fn check_budget(state: &AppState, shape: &SessionShape, side: &SideConfig, batch: usize) -> Result<(), ApiError> {
    let over = |need: Option<u64>, what: &str| -> Result<(), ApiError> {
        match need {
            Some(n) if n <= state.budget.total() => Ok(()),
            _ => Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "over_budget",
                format!(
                    "{what} of this shape would need {} bytes of memory, more than the server's budget of {}",
                    need.map_or("too many".to_string(), |n| n.to_string()),
                    state.budget.total()
                ),
            )),
        }
    };
    let cost = Cost::of(shape, side, batch);
    match shape.mode {
        Mode::Pae => {
            let need = cost.and_then(|c| c.job(1));
            over(need, "training a session")
        }
        Mode::Mobillm => {
            let need = cost.and_then(|c| c.trainer.checked_add(c.step(state.config.max_decoded_bytes as u64, 8)?));
            over(need, "a training step")
        }
    }
}

/// Samples a session may hold: the server's cap, the byte quota, and what its training can hold within the
/// memory budget. (`check_budget` has made sure at least one sample fits.)
fn max_samples(state: &AppState, shape: &SessionShape, side: &SideConfig, batch: usize) -> usize {
    let quotas = state.config.quotas();
    let Some(cost) = Cost::of(shape, side, batch) else { return 0 };
    let by_quota = quotas.session_bytes / cost.sample.max(1);
    let by_budget = state.budget.total().saturating_sub(cost.trainer + cost.batch) / cost.sample.max(1);
    let n = by_quota.min(by_budget).min(quotas.max_samples_per_session as u64);
    if shape.mode == Mode::Mobillm {
        return 0; // steps are trained at once, never stored
    }
    n as usize
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    ApiKey(key_hash): ApiKey,
    headers: HeaderMap,
    JsonBody(req): JsonBody<CreateSession>,
) -> Result<(StatusCode, Json<SessionCreated>), ApiError> {
    let (side, train) = req.validate().map_err(|e| match e {
        Invalid::OutOfBounds(m) => ApiError::bad_request("bad_config", m),
        Invalid::Inconsistent(m) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "inconsistent_config", m),
    })?;
    let shape = SessionShape {
        mode: req.mode,
        layers: req.layers,
        dim: req.dim,
        outputs: req.outputs,
        backbone: req.backbone.clone(),
    };
    check_budget(&state, &shape, &side, train.batch_size)?;
    let max_samples = max_samples(&state, &shape, &side, train.batch_size);
    if shape.mode == Mode::Pae && max_samples == 0 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "over_budget",
            "not one sample of this shape fits the server's session quota",
        ));
    }
    let idempotency = idempotency_key(&headers, &key_hash)?;
    let body_hash = sha256_hex(&serde_json::to_vec(&req).map_err(ApiError::internal)?);
    let token = random_hex(32)?;
    let now = now_unix();
    let rec = SessionRecord {
        id: random_hex(16)?,
        key_hash,
        token_hash: sha256_hex(token.as_bytes()),
        shape,
        side,
        train,
        job: JobState::default(),
        created_unix: now,
        last_used_unix: now,
        max_samples,
        samples: 0,
        stored_bytes: 0,
        start_attempts: 0,
        create_request: idempotency.map(|k| (k, body_hash)),
        train_request: None,
        last_step: None,
        lease: None,
        fresh_weights: false,
    };
    let id = state
        .blocking(move |s| {
            s.check_disk()?;
            match s.store.create_session(&rec, &s.config.quotas())? {
                Ok(Created::New) => Ok(rec.id),
                Ok(Created::Replayed(id)) => Ok(id),
                Err(refusal) => Err(refusal.into()),
            }
        })
        .await?;
    state.touch(&id);
    tracing::info!(session = %id, "session created");
    let idle_ttl_s = state.config.idle_ttl().as_secs();
    Ok((StatusCode::CREATED, Json(SessionCreated { session_id: id, token, idle_ttl_s, max_samples })))
}

pub async fn status(State(state): State<Arc<AppState>>, SessionAuth(rec): SessionAuth) -> Json<SessionStatus> {
    Json(SessionStatus {
        session_id: rec.id,
        mode: rec.shape.mode,
        samples: rec.samples,
        max_samples: rec.max_samples,
        stored_bytes: rec.stored_bytes,
        job: rec.job,
        expires_in_s: state.config.idle_ttl().as_secs(),
    })
}

pub async fn delete(State(state): State<Arc<AppState>>, SessionAuth(rec): SessionAuth) -> Result<StatusCode, ApiError> {
    let id = rec.id.clone();
    state.blocking(move |s| s.delete_session(&id)).await?;
    tracing::info!(session = %rec.id, "session deleted");
    Ok(StatusCode::NO_CONTENT)
}
