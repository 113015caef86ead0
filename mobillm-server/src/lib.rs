//! The MobiLLM assist server: sessions created with an API key and opened with hashed bearer tokens; idempotent,
//! durable, quota-bounded uploads of binary frames; a fair training queue whose jobs survive restarts; `mobillm`
//! steps; adapter and output downloads; idle expiry; and a separate admin listener. Everything a client can size
//! is bounded and paid for from one memory budget before it is allocated (docs/server.md).
//!
//! ```text
//! POST   /v1/sessions               (Bearer <api key>, Idempotency-Key) CreateSession → 201 SessionCreated
//! PUT    /v1/sessions/{id}/samples  (Bearer <token>) Samples frame → UploadAck
//! PUT    /v1/sessions/{id}/targets  (Bearer <token>) Targets frame → TargetsAck
//! POST   /v1/sessions/{id}/train    (Bearer <token>, Idempotency-Key) TrainRequest → 202 TrainAccepted
//! POST   /v1/sessions/{id}/steps    (Bearer <token>, Idempotency-Key) Sequences frame → StepAck   (mobillm mode)
//! GET    /v1/sessions/{id}          (Bearer <token>) → SessionStatus
//! GET    /v1/sessions/{id}/outputs  (Bearer <token>) → Outputs frame (the network's K' outputs per sample)
//! GET    /v1/sessions/{id}/adapter  (Bearer <token>) → zstd(safetensors) of the trained side network
//! DELETE /v1/sessions/{id}          (Bearer <token>) → 204 (erases samples, weights; stops training)
//! GET    /healthz, /v1/openapi.json
//! ```
//! The message types are `mobillm_core::protocol`'s, shared with the device's client; the frames are
//! `mobillm_core::wire`'s.
//!
//! - [`config`]: flags, limits, quotas; [`state`]: what the handlers share;
//! - [`auth`] and [`body`]: credentials and bodies as extractors (credentials first);
//! - `routes`: the `/v1` handlers per resource; [`admin`]: the admin listener;
//! - [`store`]: the embedded store (redb) or the cluster store (PostgreSQL and an object store), with counts and
//!   quotas in the same transactions as the data;
//! - [`budget`]: the memory budget and what each kind of work costs;
//! - [`scheduler`], [`jobs`], [`trainers`]: the training workers and their queue (this process's, or the
//!   database's), one job, live `mobillm` trainers;
//! - [`reaper`]: idle expiry; [`serve`]: listeners, TLS, connection limits and timeouts; [`metrics`].

pub mod admin;
pub mod auth;
pub mod body;
pub mod budget;
pub mod config;
pub mod error;
pub mod jobs;
pub mod metrics;
pub mod reaper;
mod routes;
pub mod scheduler;
pub mod serve;
pub mod state;
pub mod store;
pub mod trainers;

use std::sync::Arc;

use axum::http::header;
use axum::routing::get;
use axum::Router;

pub use config::ServerConfig;
pub use state::AppState;

/// Opens the server's state: the store and, when the role trains, the training workers (which hold the state
/// weakly, so dropping it stops them). With the embedded store, the jobs a previous process left unfinished are
/// queued again; with the cluster store, workers claim them from the database once their leases pass.
pub fn open(config: ServerConfig) -> anyhow::Result<Arc<AppState>> {
    let (workers, role) = (config.workers(), config.role);
    let state = AppState::new(config)?;
    if !role.trains() {
        return Ok(state);
    }
    let weak = Arc::downgrade(&state);
    let run: scheduler::JobRunner = Arc::new(move |id: &str, control: &scheduler::JobControl| {
        if let Some(state) = weak.upgrade() {
            jobs::run(&state, id, control);
        }
    });
    if state.store.is_shared() {
        let weak = Arc::downgrade(&state);
        let claim: scheduler::JobClaimer =
            Arc::new(move |worker: &str| weak.upgrade().map_or(Ok(None), |state| state.claim_job(worker)));
        let process = format!("{}-{:08x}", std::process::id(), rand::random::<u32>());
        state.scheduler.start_claiming(&process, claim, run, workers);
        return Ok(state);
    }
    state.scheduler.start(run, workers);
    let resumed = jobs::resume_all(&state).map_err(anyhow::Error::msg)?;
    if resumed > 0 {
        tracing::info!(resumed, "training jobs resumed");
    }
    Ok(state)
}

/// The API router: `/v1` and `/healthz`, each request counted and traced.
pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .merge(routes::router())
        .layer(axum::middleware::from_fn_with_state(state.clone(), metrics::track))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// The OpenAPI 3.1 description of this API (written by hand next to the handlers; tests check that it lists
/// exactly the routes the router serves and declares the bounds of `mobillm_core::protocol`).
pub const OPENAPI: &str = include_str!("../openapi.json");
