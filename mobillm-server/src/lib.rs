//! The MobiLLM assist server (design §6). This is the first part of it: sessions with API-key creation and
//! hashed bearer tokens, idempotent and durable sample uploads with limits, status and deletion. Training jobs,
//! target updates, adapter and output downloads, TLS, metrics and OpenAPI come next.
//!
//! ```text
//! POST   /v1/sessions               (Authorization: Bearer <api key>)   {layers, dim, outputs, backbone}
//!                                   → 201 {session_id, token}
//! PUT    /v1/sessions/{id}/samples  (Bearer <token>) body: a Samples frame → {stored, duplicates, total}
//! GET    /v1/sessions/{id}          (Bearer <token>) → {session_id, samples, shape}
//! DELETE /v1/sessions/{id}          (Bearer <token>) → 204
//! GET    /healthz
//! ```

pub mod config;
pub mod error;
pub mod store;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use mobillm_core::wire::{Frame, FrameKind, Limits};
use rand::TryRngCore;
use serde::Deserialize;
use sha2::{Digest, Sha256};

pub use config::ServerConfig;
use error::ApiError;
use store::{SessionRecord, SessionShape, Store};

pub struct AppState {
    pub config: ServerConfig,
    pub store: Store,
}

impl AppState {
    pub fn open(config: ServerConfig) -> anyhow::Result<Arc<Self>> {
        let store = Store::open(&config.data_dir)?;
        Ok(Arc::new(Self { config, store }))
    }
}

pub fn app(state: Arc<AppState>) -> Router {
    let body_limit = state.config.max_body_bytes;
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/sessions", post(create_session))
        .route("/v1/sessions/{id}", get(session_status).delete(delete_session))
        .route("/v1/sessions/{id}/samples", put(upload_samples))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::unauthorized("missing `Authorization: Bearer …` header"))
}

fn random_hex(bytes: usize) -> Result<String, ApiError> {
    let mut b = vec![0u8; bytes];
    rand::rngs::OsRng.try_fill_bytes(&mut b).map_err(|e| ApiError::internal(format!("OS RNG: {e}")))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Loads the session and checks the caller's token against its stored hash: an unknown id is 404, a known id
/// with a missing or wrong token is 401. (redb reads are short and run on the async thread; writes, which fsync,
/// run on the blocking pool.)
async fn authorize(state: &AppState, id: &str, headers: &HeaderMap) -> Result<SessionRecord, ApiError> {
    let token = bearer(headers)?;
    let rec = state.store.session(id)?.ok_or_else(|| ApiError::not_found(format!("no session {id}")))?;
    if sha256_hex(token.as_bytes()) != rec.token_hash {
        return Err(ApiError::unauthorized("this token does not open this session"));
    }
    Ok(rec)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSession {
    layers: usize,
    dim: usize,
    outputs: usize,
    backbone: String,
}

async fn create_session(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let key = bearer(&headers)?;
    if !state.config.api_keys.iter().any(|k| k == key) {
        return Err(ApiError::unauthorized("unknown API key"));
    }
    let req: CreateSession = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("bad_json", format!("session request: {e}")))?;
    let limits = Limits::default();
    if req.layers == 0 || req.layers > limits.max_layers || req.dim == 0 || req.dim > limits.max_dim {
        return Err(ApiError::bad_request(
            "bad_shape",
            format!("layers {} / dim {} out of range", req.layers, req.dim),
        ));
    }
    if req.outputs == 0 || req.outputs > limits.max_width {
        return Err(ApiError::bad_request("bad_shape", format!("outputs {} out of range", req.outputs)));
    }
    let key_hash = sha256_hex(key.as_bytes());
    if state.store.sessions_of_key(&key_hash)? >= state.config.max_sessions_per_key {
        return Err(ApiError::limit(format!("this key already has {} sessions", state.config.max_sessions_per_key)));
    }
    let id = random_hex(16)?;
    let token = random_hex(32)?;
    let rec = SessionRecord {
        id: id.clone(),
        key_hash,
        token_hash: sha256_hex(token.as_bytes()),
        shape: SessionShape { layers: req.layers, dim: req.dim, outputs: req.outputs, backbone: req.backbone },
        created_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
    };
    state.store.put_session(&rec)?;
    tracing::info!(session = %id, "session created");
    Ok((StatusCode::CREATED, Json(serde_json::json!({"session_id": id, "token": token}))))
}

async fn session_status(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let rec = authorize(&state, &id, &headers).await?;
    let samples = state.store.sample_count(&id)?;
    Ok(Json(serde_json::json!({"session_id": id, "samples": samples, "shape": rec.shape})))
}

async fn delete_session(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    authorize(&state, &id, &headers).await?;
    state.store.delete_session(&id)?;
    tracing::info!(session = %id, "session deleted");
    Ok(StatusCode::NO_CONTENT)
}

async fn upload_samples(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let rec = authorize(&state, &id, &headers).await?;
    let shape = &rec.shape;
    let limits = Limits {
        max_decoded_bytes: state.config.max_decoded_bytes,
        max_samples: state.config.max_samples_per_session,
        max_layers: shape.layers,
        max_dim: shape.dim,
        max_width: shape.outputs,
        max_tokens: 0,
    };
    let state2 = state.clone();
    let (stored, duplicates, total) = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let (frame, _) = Frame::decode(&body, &limits)?;
        if frame.kind != FrameKind::Samples {
            return Err(ApiError::bad_request("bad_frame", format!("expected a Samples frame, got {:?}", frame.kind)));
        }
        if (frame.layers, frame.dim, frame.width) != (rec.shape.layers, rec.shape.dim, rec.shape.outputs) {
            return Err(ApiError::bad_request(
                "shape_mismatch",
                format!(
                    "frame has layers {} dim {} width {}, the session {} {} {}",
                    frame.layers, frame.dim, frame.width, rec.shape.layers, rec.shape.dim, rec.shape.outputs
                ),
            ));
        }
        let per = frame.layers * frame.dim;
        let rows: Vec<_> = frame
            .ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let acts = &frame.activations[i * per..(i + 1) * per];
                let target = &frame.values[i * frame.width..(i + 1) * frame.width];
                (*id, store::encode_sample(acts, target))
            })
            .collect();
        let max = state2.config.max_samples_per_session;
        match state2.store.put_samples(&rec.id, &rows, max)? {
            Ok((stored, dup)) => Ok((stored, dup, state2.store.sample_count(&rec.id)?)),
            Err(existing) => Err(ApiError::limit(format!(
                "the session holds {existing} samples; this upload would pass the limit of {max}"
            ))),
        }
    })
    .await
    .map_err(|e| ApiError::internal(format!("upload task: {e}")))??;
    Ok(Json(serde_json::json!({"stored": stored, "duplicates": duplicates, "total": total})))
}
