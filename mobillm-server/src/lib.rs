//! The MobiLLM assist server (design §6): sessions with API-key creation and hashed bearer tokens, idempotent and
//! durable uploads with limits, training jobs that survive restarts, adapter and output downloads, deletion.
//! `mobillm`-mode sessions train from Sequences frames step by step instead. TLS (rustls) is the binary's business
//! (see `main.rs`); Prometheus metrics at `/metrics`; the OpenAPI document at `/v1/openapi.json`.
//!
//! ```text
//! POST   /v1/sessions               (Bearer <api key>) {layers, dim, outputs, backbone, [mode, labels, width, rank, activation,
//!                                   alpha0, lr, batch_size, weight_decay, seed]} → 201 {session_id, token}
//! PUT    /v1/sessions/{id}/samples  (Bearer <token>) Samples frame → {stored, duplicates, total}
//! PUT    /v1/sessions/{id}/targets  (Bearer <token>) Targets frame → {updated}
//! POST   /v1/sessions/{id}/train    (Bearer <token>) {epochs} → 202 {job}
//! POST   /v1/sessions/{id}/steps    (Bearer <token>) Sequences frame → {loss, samples, steps}   (mobillm mode)
//! GET    /v1/sessions/{id}          (Bearer <token>) → {session_id, samples, shape, side, job}
//! GET    /v1/sessions/{id}/outputs  (Bearer <token>) → Outputs frame (the network's K' outputs per sample)
//! GET    /v1/sessions/{id}/adapter  (Bearer <token>) → zstd(safetensors) of the trained side network
//! DELETE /v1/sessions/{id}          (Bearer <token>) → 204 (erases samples, weights; stops training)
//! GET    /healthz, /metrics, /v1/openapi.json
//! ```

pub mod config;
pub mod error;
pub mod jobs;
pub mod metrics;
pub mod store;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use mobillm_core::side::network::normalize_taps;
use mobillm_core::side::{weights_file, SideTrainer};
use mobillm_core::wire::{Frame, FrameKind, Limits, Quant};
use mobillm_core::Mode;
use rand::TryRngCore;
use serde::Deserialize;
use sha2::{Digest, Sha256};

pub use config::ServerConfig;
use error::ApiError;
use mobillm_core::side::{Activation, SideConfig, TrainConfig};
use store::{JobState, JobStatus, SessionRecord, SessionShape, Store};

pub struct AppState {
    pub config: ServerConfig,
    pub store: Store,
    /// Sessions with a training thread alive.
    pub running: std::sync::Mutex<std::collections::HashSet<String>>,
    /// `mobillm`-mode trainers kept between step requests (with their optimiser state); rebuilt from the stored
    /// checkpoint after a restart.
    pub live: std::sync::Mutex<std::collections::HashMap<String, Arc<std::sync::Mutex<SideTrainer>>>>,
    pub metrics: metrics::Metrics,
}

impl AppState {
    /// Opens the store and resumes the training jobs a previous process left running.
    pub fn open(config: ServerConfig) -> anyhow::Result<Arc<Self>> {
        let store = Store::open(&config.data_dir)?;
        let state = Arc::new(Self {
            config,
            store,
            running: Default::default(),
            live: Default::default(),
            metrics: Default::default(),
        });
        let resumed = jobs::resume_all(&state).map_err(anyhow::Error::msg)?;
        if resumed > 0 {
            tracing::info!(resumed, "training jobs resumed");
        }
        Ok(state)
    }
}

pub fn app(state: Arc<AppState>) -> Router {
    let body_limit = state.config.max_body_bytes;
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(render_metrics))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/sessions", post(create_session))
        .route("/v1/sessions/{id}", get(session_status).delete(delete_session))
        .route("/v1/sessions/{id}/samples", put(upload_samples))
        .route("/v1/sessions/{id}/targets", put(upload_targets))
        .route("/v1/sessions/{id}/train", post(start_training))
        .route("/v1/sessions/{id}/steps", post(train_step))
        .route("/v1/sessions/{id}/outputs", get(download_outputs))
        .route("/v1/sessions/{id}/adapter", get(download_adapter))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(state.clone(), metrics::track))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// The OpenAPI 3.1 description of this API (written by hand next to the handlers; a test checks that it lists
/// exactly the routes the router serves).
pub const OPENAPI: &str = include_str!("../openapi.json");

async fn openapi() -> ([(axum::http::HeaderName, &'static str); 1], &'static str) {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn render_metrics(
    State(state): State<Arc<AppState>>,
) -> Result<([(axum::http::HeaderName, &'static str); 1], String), ApiError> {
    let sessions = state.store.all_sessions()?.len();
    state.metrics.sessions.set(sessions as i64);
    state.metrics.running_jobs.set(state.running.lock().expect("running set").len() as i64);
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()))
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
    mode: Option<Mode>,
    labels: Option<usize>,
    layers: usize,
    dim: usize,
    outputs: usize,
    backbone: String,
    width: Option<usize>,
    rank: Option<usize>,
    activation: Option<Activation>,
    alpha0: Option<f32>,
    lr: Option<f64>,
    batch_size: Option<usize>,
    weight_decay: Option<f64>,
    seed: Option<u64>,
}

impl CreateSession {
    /// The side network the server trains. It never learns K: `labels` is a placeholder only the device's own
    /// copy of the configuration fills in (the server fits K'-wide targets and does not use it).
    fn configs(&self) -> Result<(SideConfig, TrainConfig), ApiError> {
        let labels = match (self.mode.unwrap_or_default(), self.labels) {
            (Mode::Pae, None) => 2,
            (Mode::Pae, Some(_)) => {
                return Err(ApiError::bad_request("bad_config", "pae sessions do not tell the server their labels"))
            }
            (Mode::Mobillm, Some(k)) => k,
            (Mode::Mobillm, None) => {
                return Err(ApiError::bad_request("bad_config", "mobillm sessions must give `labels` (K)"))
            }
        };
        let defaults = SideConfig::new(self.layers, self.dim, labels);
        let side = SideConfig {
            outputs: self.outputs,
            width: self.width.unwrap_or(defaults.width),
            rank: self.rank.unwrap_or(defaults.rank),
            activation: self.activation.unwrap_or(defaults.activation),
            alpha0: self.alpha0.unwrap_or(defaults.alpha0),
            ..defaults
        };
        let d = TrainConfig::default();
        let train = TrainConfig {
            lr: self.lr.unwrap_or(d.lr),
            batch_size: self.batch_size.unwrap_or(d.batch_size),
            weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
            seed: self.seed.unwrap_or(d.seed),
            ..d
        };
        side.validate().map_err(|e| ApiError::bad_request("bad_config", e.to_string()))?;
        train.validate().map_err(|e| ApiError::bad_request("bad_config", e.to_string()))?;
        Ok((side, train))
    }
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
    let (side, train) = req.configs()?;
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
        shape: SessionShape {
            mode: req.mode.unwrap_or_default(),
            layers: req.layers,
            dim: req.dim,
            outputs: req.outputs,
            backbone: req.backbone,
        },
        side,
        train,
        job: JobState::default(),
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
    Ok(Json(serde_json::json!({
        "session_id": id, "samples": samples, "shape": rec.shape, "side": rec.side, "job": rec.job,
    })))
}

async fn delete_session(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    authorize(&state, &id, &headers).await?;
    state.store.delete_session(&id)?;
    state.live.lock().expect("live trainers").remove(&id);
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
    require_mode(&rec, Mode::Pae)?;
    let limits = frame_limits(&state, &rec.shape, true);
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
            Ok((stored, dup)) => {
                state2.metrics.samples_stored.inc_by(stored as u64);
                Ok((stored, dup, state2.store.sample_count(&rec.id)?))
            }
            Err(existing) => Err(ApiError::limit(format!(
                "the session holds {existing} samples; this upload would pass the limit of {max}"
            ))),
        }
    })
    .await
    .map_err(|e| ApiError::internal(format!("upload task: {e}")))??;
    Ok(Json(serde_json::json!({"stored": stored, "duplicates": duplicates, "total": total})))
}

/// What a frame for this session may hold: its own dimensions exactly (activations only where the frame kind
/// carries them), within the server's size limits.
fn frame_limits(state: &AppState, shape: &SessionShape, activations: bool) -> Limits {
    Limits {
        max_decoded_bytes: state.config.max_decoded_bytes,
        max_samples: state.config.max_samples_per_session,
        max_layers: if activations { shape.layers } else { 0 },
        max_dim: if activations { shape.dim } else { 0 },
        max_width: shape.outputs,
        max_tokens: 0,
    }
}

fn require_mode(rec: &SessionRecord, mode: Mode) -> Result<(), ApiError> {
    if rec.shape.mode != mode {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "wrong_mode",
            format!("this is a {} session; the endpoint is for {mode} sessions", rec.shape.mode),
        ));
    }
    Ok(())
}

fn refuse_while_training(state: &AppState, id: &str) -> Result<(), ApiError> {
    if state.running.lock().expect("running set").contains(id) {
        return Err(ApiError::new(StatusCode::CONFLICT, "training", "the session is training; wait for it to finish"));
    }
    Ok(())
}

async fn upload_targets(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let rec = authorize(&state, &id, &headers).await?;
    require_mode(&rec, Mode::Pae)?;
    refuse_while_training(&state, &id)?;
    let limits = frame_limits(&state, &rec.shape, false);
    let state2 = state.clone();
    let updated = tokio::task::spawn_blocking(move || -> Result<usize, ApiError> {
        let (frame, _) = Frame::decode(&body, &limits)?;
        if frame.kind != FrameKind::Targets || frame.width != rec.shape.outputs {
            return Err(ApiError::bad_request(
                "bad_frame",
                format!(
                    "expected a Targets frame of width {}, got {:?} of width {}",
                    rec.shape.outputs, frame.kind, frame.width
                ),
            ));
        }
        let rows: Vec<_> = frame.ids.iter().zip(frame.values.chunks_exact(frame.width)).map(|(i, v)| (*i, v)).collect();
        match state2.store.update_targets(&rec.id, &rows, &rec.shape)? {
            Ok(n) => Ok(n),
            Err(missing) => {
                Err(ApiError::bad_request("unknown_sample", format!("sample {missing} was never uploaded")))
            }
        }
    })
    .await
    .map_err(|e| ApiError::internal(format!("targets task: {e}")))??;
    Ok(Json(serde_json::json!({"updated": updated})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartTraining {
    epochs: usize,
}

/// Epochs one request may ask for.
const MAX_EPOCHS: usize = 1000;

async fn start_training(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let mut rec = authorize(&state, &id, &headers).await?;
    require_mode(&rec, Mode::Pae)?;
    let req: StartTraining =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request("bad_json", format!("train request: {e}")))?;
    if req.epochs == 0 || req.epochs > MAX_EPOCHS {
        return Err(ApiError::bad_request("bad_epochs", format!("epochs must be 1..={MAX_EPOCHS}")));
    }
    if state.store.sample_count(&id)? == 0 {
        return Err(ApiError::bad_request("no_samples", "upload samples before training"));
    }
    if !state.running.lock().expect("running set").insert(id.clone()) {
        return Err(ApiError::new(StatusCode::CONFLICT, "training", "the session is already training"));
    }
    // Continue from the current weights: a new request adds epochs on top of what was trained.
    rec.job = JobState {
        status: JobStatus::Running,
        epochs_total: req.epochs,
        epochs_done: 0,
        loss: rec.job.loss,
        message: None,
        steps: rec.job.steps,
    };
    if let Err(e) = state.store.put_checkpoint(&rec, None) {
        state.running.lock().expect("running set").remove(&id);
        return Err(e.into());
    }
    jobs::spawn(state.clone(), rec.clone());
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({"job": rec.job}))))
}

async fn download_outputs(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Vec<u8>, ApiError> {
    let rec = authorize(&state, &id, &headers).await?;
    require_mode(&rec, Mode::Pae)?;
    refuse_while_training(&state, &id)?;
    let state2 = state.clone();
    tokio::task::spawn_blocking(move || -> Result<Vec<u8>, ApiError> {
        let samples = state2.store.samples(&rec.id, &rec.shape)?;
        let trainer = jobs::load_trainer(&state2, &rec).map_err(ApiError::internal)?;
        if samples.is_empty() {
            return Ok(Frame::rows(FrameKind::Outputs, vec![], rec.shape.outputs, vec![]).encode(Quant::F16)?);
        }
        let outputs = trainer.sample_outputs(&samples)?;
        let (ids, values): (Vec<_>, Vec<_>) = outputs.into_iter().unzip();
        Ok(Frame::rows(FrameKind::Outputs, ids, rec.shape.outputs, values.concat()).encode(Quant::F16)?)
    })
    .await
    .map_err(|e| ApiError::internal(format!("outputs task: {e}")))?
}

async fn download_adapter(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Vec<u8>, ApiError> {
    let rec = authorize(&state, &id, &headers).await?;
    let weights = state.store.weights(&id)?.ok_or_else(|| ApiError::not_found("nothing trained yet"))?;
    let _ = rec;
    zstd::bulk::compress(&weights, mobillm_core::wire::ZSTD_LEVEL).map_err(|e| ApiError::internal(format!("zstd: {e}")))
}

/// `mobillm` mode (design §1): the device sends a Sequences frame (every token's activations, labels, the
/// backbone's label logits) and the server trains on it at once, one optimiser step per mini-batch, with
/// cross-entropy on `prior + o[:K]`. Our side network works token by token, so only each sample's pivot (last)
/// token reaches the loss: the server trains on the pivot rows, normalised as the device would. Every answered
/// step is checkpointed, so a restart continues from the last acknowledged step (with fresh AdamW moments).
async fn train_step(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let rec = authorize(&state, &id, &headers).await?;
    require_mode(&rec, Mode::Mobillm)?;
    let limits = Limits {
        // Step frames are not stored, so the per-session sample limit does not apply; the decoded-size limit does.
        max_samples: Limits::default().max_samples,
        max_width: rec.side.labels,
        max_tokens: Limits::default().max_tokens,
        ..frame_limits(&state, &rec.shape, true)
    };
    let state2 = state.clone();
    let (loss, samples, steps) = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let (frame, _) = Frame::decode(&body, &limits)?;
        let k = rec.side.labels;
        if frame.kind != FrameKind::Sequences
            || (frame.layers, frame.dim, frame.width) != (rec.shape.layers, rec.shape.dim, k)
        {
            return Err(ApiError::bad_request(
                "shape_mismatch",
                format!(
                    "expected a Sequences frame with layers {} dim {} and {k} prior logits, got {:?} with {} {} {}",
                    rec.shape.layers, rec.shape.dim, frame.kind, frame.layers, frame.dim, frame.width
                ),
            ));
        }
        let n = frame.ids.len();
        if n == 0 {
            return Err(ApiError::bad_request("no_samples", "an empty training step"));
        }
        if let Some(bad) = frame.labels.iter().find(|&&l| l as usize >= k) {
            return Err(ApiError::bad_request("bad_label", format!("label {bad} is out of range for {k} labels")));
        }
        let device = candle_core::Device::Cpu;
        let x = candle_core::Tensor::from_vec(frame.pivot_rows()?, (n, rec.shape.layers, rec.shape.dim), &device)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let x = normalize_taps(&x)?;
        let labels = candle_core::Tensor::from_slice(&frame.labels, n, &device)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let prior = candle_core::Tensor::from_vec(frame.values, (n, k), &device)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let trainer = live_trainer(&state2, &rec)?;
        let mut trainer = trainer.lock().expect("trainer lock");
        let started = std::time::Instant::now();
        let objective = mobillm_core::side::Objective::CrossEntropy { labels, prior };
        let reports = trainer.fit(&x, &objective, 1, |_, _| std::ops::ControlFlow::Continue(()))?;
        let loss = reports.last().map_or(f64::NAN, |r| r.loss);
        // Re-read the record: job state changes (steps) come only from here, under the trainer lock.
        let mut latest = state2.store.session(&rec.id)?.ok_or_else(|| ApiError::not_found("session deleted"))?;
        latest.job.steps += 1;
        latest.job.loss = Some(loss);
        let weights = weights_file::to_bytes(&trainer.tensors(), Default::default())?;
        state2.store.put_checkpoint(&latest, Some(&weights))?;
        state2.metrics.trained_samples.inc_by(n as u64);
        state2.metrics.training_seconds.inc_by(started.elapsed().as_secs_f64());
        Ok((loss, n, latest.job.steps))
    })
    .await
    .map_err(|e| ApiError::internal(format!("step task: {e}")))??;
    Ok(Json(serde_json::json!({"loss": loss, "samples": samples, "steps": steps})))
}

/// The session's in-memory trainer, created from its checkpoint (or fresh) on first use.
fn live_trainer(state: &AppState, rec: &SessionRecord) -> Result<Arc<std::sync::Mutex<SideTrainer>>, ApiError> {
    let mut live = state.live.lock().expect("live trainers");
    if let Some(t) = live.get(&rec.id) {
        return Ok(t.clone());
    }
    let trainer = jobs::load_trainer(state, rec).map_err(ApiError::internal)?;
    let t = Arc::new(std::sync::Mutex::new(trainer));
    live.insert(rec.id.clone(), t.clone());
    Ok(t)
}
