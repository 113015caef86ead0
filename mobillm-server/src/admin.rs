//! The admin listener, on a port of its own: `/healthz` for anyone; `/metrics`, the session list, usage and
//! session deletion for holders of the admin token.
//!
//! ```text
//! GET    /healthz                                   → "ok"
//! GET    /metrics                   (Bearer admin)  → Prometheus text
//! GET    /admin/usage               (Bearer admin)  → {sessions, stored_bytes, memory_budget_bytes, …}
//! GET    /admin/sessions?after=&limit=  (Bearer admin) → {sessions: [...], next}
//! DELETE /admin/sessions/{id}       (Bearer admin)  → 204 | 404
//! ```

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::routing::{delete, get};
use axum::{Json, Router};
use mobillm_core::protocol::{JobState, Mode};
use serde::{Deserialize, Serialize};

use crate::auth::Admin;
use crate::error::ApiError;
use crate::state::AppState;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/admin/usage", get(usage))
        .route("/admin/sessions", get(list))
        .route("/admin/sessions/{id}", delete(remove))
        .with_state(state)
}

/// Sets the gauges from their sources and renders every metric.
pub async fn metrics(
    State(state): State<Arc<AppState>>,
    _: Admin,
) -> Result<([(header::HeaderName, &'static str); 1], String), ApiError> {
    let (usage, (queued, running)) = state.blocking(|s| Ok((s.store.usage()?, s.job_counts()?))).await?;
    let m = &state.metrics;
    m.sessions.set(usage.sessions as i64);
    m.stored_bytes.set(usage.bytes as i64);
    m.queued_jobs.set(queued as i64);
    m.running_jobs.set(running as i64);
    m.live_trainers.set(state.trainers.loaded() as i64);
    m.memory_reserved_bytes.set(state.budget.used() as i64);
    m.memory_budget_bytes.set(state.budget.total() as i64);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], m.render()))
}

#[derive(Serialize)]
struct Usage {
    sessions: u64,
    stored_bytes: u64,
    memory_budget_bytes: u64,
    memory_reserved_bytes: u64,
    queued_jobs: usize,
    running_jobs: usize,
    live_trainers: usize,
}

async fn usage(State(state): State<Arc<AppState>>, _: Admin) -> Result<Json<Usage>, ApiError> {
    let (u, (queued_jobs, running_jobs)) = state.blocking(|s| Ok((s.store.usage()?, s.job_counts()?))).await?;
    Ok(Json(Usage {
        sessions: u.sessions,
        stored_bytes: u.bytes,
        memory_budget_bytes: state.budget.total(),
        memory_reserved_bytes: state.budget.used(),
        queued_jobs,
        running_jobs,
        live_trainers: state.trainers.loaded(),
    }))
}

#[derive(Deserialize)]
struct Page {
    after: Option<String>,
    limit: Option<usize>,
}

#[derive(Serialize)]
struct SessionSummary {
    session_id: String,
    /// The first 12 hex digits of the creating API key's SHA-256.
    key: String,
    mode: Mode,
    samples: usize,
    stored_bytes: u64,
    created_unix: u64,
    last_used_unix: u64,
    job: JobState,
}

#[derive(Serialize)]
struct SessionList {
    sessions: Vec<SessionSummary>,
    /// Pass as `after` for the next page; absent on the last.
    next: Option<String>,
}

async fn list(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Query(page): Query<Page>,
) -> Result<Json<SessionList>, ApiError> {
    let limit = page.limit.unwrap_or(100).clamp(1, 1000);
    let records = state.blocking(move |s| Ok(s.store.sessions(page.after.as_deref(), limit)?)).await?;
    let next = (records.len() == limit).then(|| records.last().map(|r| r.id.clone())).flatten();
    let sessions = records
        .into_iter()
        .map(|r| SessionSummary {
            last_used_unix: r.last_used_unix.max(state.last_seen(&r.id).unwrap_or(0)),
            session_id: r.id,
            key: r.key_hash.chars().take(12).collect(),
            mode: r.shape.mode,
            samples: r.samples,
            stored_bytes: r.stored_bytes,
            created_unix: r.created_unix,
            job: r.job,
        })
        .collect();
    Ok(Json(SessionList { sessions, next }))
}

async fn remove(State(state): State<Arc<AppState>>, _: Admin, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    let deleted = state.blocking(move |s| s.delete_session(&id)).await?;
    if !deleted {
        return Err(ApiError::not_found("no such session"));
    }
    Ok(StatusCode::NO_CONTENT)
}
