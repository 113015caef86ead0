//! The `/v1` routes, one file per resource: sessions (create, status, delete), their cached data (samples,
//! targets, outputs) and their training (jobs, `mobillm` steps, the adapter).

mod data;
mod sessions;
mod training;

use std::sync::Arc;

use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::Router;
use mobillm_core::protocol::Mode;
use mobillm_core::wire::Limits;

use crate::config::ServerConfig;
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::{Refusal, SessionRecord, SessionShape};

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/sessions", post(sessions::create))
        .route("/v1/sessions/{id}", get(sessions::status).delete(sessions::delete))
        .route("/v1/sessions/{id}/samples", put(data::upload_samples))
        .route("/v1/sessions/{id}/targets", put(data::upload_targets))
        .route("/v1/sessions/{id}/outputs", get(data::download_outputs))
        .route("/v1/sessions/{id}/train", post(training::start))
        .route("/v1/sessions/{id}/steps", post(training::step))
        .route("/v1/sessions/{id}/adapter", get(training::download_adapter))
}

fn require_mode(rec: &SessionRecord, mode: Mode) -> Result<(), ApiError> {
    if rec.shape.mode != mode {
        return Err(ApiError::conflict(
            "wrong_mode",
            format!("this is a {} session; the endpoint is for {mode} sessions", rec.shape.mode),
        ));
    }
    Ok(())
}

fn refuse_while_training(rec: &SessionRecord) -> Result<(), ApiError> {
    if rec.job.status.is_active() {
        return Err(ApiError::conflict("training", "the session is training; wait for it to finish"));
    }
    Ok(())
}

/// What a frame for this session may hold: its own dimensions exactly (activations only where the frame kind
/// carries them), within the server's size limits.
fn frame_limits(config: &ServerConfig, shape: &SessionShape, activations: bool) -> Limits {
    Limits {
        max_decoded_bytes: config.max_decoded_bytes,
        max_expansion: if activations { config.max_expansion } else { usize::MAX },
        max_samples: config.max_samples_per_frame,
        max_layers: if activations { shape.layers } else { 0 },
        max_dim: if activations { shape.dim } else { 0 },
        max_width: shape.outputs,
        max_tokens: 0,
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Gone => ApiError::not_found("the session was deleted"),
            Refusal::Quota(m) => ApiError::limit(m),
            Refusal::IdempotencyMismatch => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_mismatch",
                "this Idempotency-Key was used before with a different request",
            ),
            Refusal::Conflict(m) => ApiError::conflict("training", m),
        }
    }
}

/// The hashed `Idempotency-Key` of a request (scoped by `scope`, so two callers' keys never meet), if it has a
/// well-formed one.
fn idempotency_key(headers: &axum::http::HeaderMap, scope: &str) -> Result<Option<String>, ApiError> {
    use mobillm_core::protocol::{bounds::MAX_IDEMPOTENCY_KEY_LEN, IDEMPOTENCY_KEY};
    let Some(v) = headers.get(IDEMPOTENCY_KEY) else { return Ok(None) };
    let v = v.to_str().ok().filter(|v| !v.is_empty() && v.len() <= MAX_IDEMPOTENCY_KEY_LEN).ok_or_else(|| {
        ApiError::bad_request(
            "bad_idempotency_key",
            format!("Idempotency-Key: 1..={MAX_IDEMPOTENCY_KEY_LEN} visible characters"),
        )
    })?;
    Ok(Some(crate::state::sha256_hex(format!("{scope}:{v}").as_bytes())))
}
