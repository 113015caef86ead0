//! Training: `POST …/train` queues a `pae` job, `POST …/steps` trains a `mobillm` session on one frame at once,
//! `GET …/adapter` downloads the side network as last checkpointed.
//!
//! `mobillm` mode: the device sends a Sequences frame (every token's activations, labels, the backbone's label
//! logits) and the server trains on it at once, one optimiser step per mini-batch, with cross-entropy on
//! `prior + o[:K]`. Our side network works token by token, so only each sample's pivot (last) token reaches the
//! loss: the server trains on the pivot rows, normalised as the device would. Every answered step is
//! checkpointed, so a restart (or an eviction of the live trainer) continues from the last acknowledged step,
//! with fresh AdamW moments.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use candle_core::{Device, Tensor};
use mobillm_core::protocol::{bounds::MAX_EPOCHS, JobState, JobStatus, Mode, StepAck, TrainAccepted, TrainRequest};
use mobillm_core::side::network::normalize_taps;
use mobillm_core::side::{weights_file, Objective};
use mobillm_core::wire::{Frame, FrameKind, Limits, Prefix};

use super::{frame_limits, idempotency_key, require_mode};
use crate::auth::SessionAuth;
use crate::body::{FrameBody, JsonBody};
use crate::budget::Cost;
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::{now_unix, Refusal};
use crate::trainers::Live;

enum Start {
    Queued(JobState, (JobState, bool)),
    Replayed(JobState),
}

pub async fn start(
    State(state): State<Arc<AppState>>,
    SessionAuth(rec): SessionAuth,
    headers: HeaderMap,
    JsonBody(req): JsonBody<TrainRequest>,
) -> Result<(StatusCode, Json<TrainAccepted>), ApiError> {
    require_mode(&rec, Mode::Pae)?;
    if req.epochs == 0 || req.epochs > MAX_EPOCHS {
        return Err(ApiError::bad_request("bad_epochs", format!("epochs must be 1..={MAX_EPOCHS}")));
    }
    if rec.samples == 0 {
        return Err(ApiError::conflict("no_samples", "upload samples before training"));
    }
    let key = idempotency_key(&headers, &rec.id)?;
    let job = state
        .blocking(move |s| {
            let queue_full = || {
                ApiError::busy(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "queue_full",
                    "the training queue is full; retry shortly",
                    5,
                )
            };
            if !s.queue_has_room()? && rec.train_request != key {
                return Err(queue_full());
            }
            let started = s.store.update(&rec.id, |r| {
                if key.is_some() && r.train_request == key {
                    return Ok(Start::Replayed(r.job.clone()));
                }
                if r.job.status.is_active() {
                    return Err(Refusal::Conflict("the session is already training".into()));
                }
                let before = (r.job.clone(), r.fresh_weights);
                // Continue from the current weights unless asked to start over: a new request adds epochs on
                // top of what was trained.
                r.fresh_weights = req.from_scratch;
                r.job = JobState {
                    status: JobStatus::Queued,
                    epochs_total: req.epochs,
                    epochs_done: 0,
                    loss: r.job.loss,
                    message: None,
                    steps: r.job.steps,
                };
                r.train_request = key.clone();
                r.lease = None;
                r.last_used_unix = now_unix();
                Ok(Start::Queued(r.job.clone(), before))
            })??;
            match started {
                Start::Replayed(job) => Ok(job),
                Start::Queued(job, before) => {
                    if s.enqueue(&rec.id, &rec.key_hash) {
                        return Ok(job);
                    }
                    let _ = s.store.update(&rec.id, |r| {
                        (r.job, r.fresh_weights) = before;
                        r.train_request = None;
                        Ok(())
                    });
                    Err(queue_full())
                }
            }
        })
        .await?;
    Ok((StatusCode::ACCEPTED, Json(TrainAccepted { job })))
}

pub async fn step(
    State(state): State<Arc<AppState>>,
    SessionAuth(rec): SessionAuth,
    headers: HeaderMap,
    body: FrameBody,
) -> Result<Json<StepAck>, ApiError> {
    require_mode(&rec, Mode::Mobillm)?;
    let key = idempotency_key(&headers, &rec.id)?;
    if let (Some(k), Some((last, ack))) = (&key, &rec.last_step) {
        if k == last {
            return Ok(Json(*ack)); // a retry of the step just trained: its answer, not a second step
        }
    }
    let cost = Cost::of(&rec.shape, &rec.side, rec.train.batch_size).ok_or_else(|| ApiError::internal("cost"))?;
    let slot = state.trainers.slot(&rec.id);
    let ack = state
        .blocking(move |s| {
            // The session's one step slot, taken before anything is decoded.
            let mut live = slot.trainer.try_lock().map_err(|_| {
                ApiError::busy(
                    StatusCode::TOO_MANY_REQUESTS,
                    "busy",
                    "another step of this session is being trained; send steps one at a time",
                    1,
                )
            })?;
            let prefix = Prefix::read(&body.bytes)?;
            let decoded = prefix.decoded_len.min(s.config.max_decoded_bytes as u64);
            let need =
                cost.step(decoded, prefix.activation_expansion(4) as u64).ok_or_else(|| ApiError::internal("cost"))?;
            let _decoding = s.reserve(need)?;
            let k = rec.side.labels;
            let limits = Limits {
                max_width: k,
                max_tokens: Limits::default().max_tokens,
                ..frame_limits(&s.config, &rec.shape, true)
            };
            let (frame, _) = Frame::decode(&body.bytes, &limits)?;
            drop(body);
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
            let device = Device::Cpu;
            let x = Tensor::from_vec(frame.pivot_rows()?, (n, rec.shape.layers, rec.shape.dim), &device)
                .map_err(ApiError::internal)?;
            let x = normalize_taps(&x)?;
            let labels = Tensor::from_slice(&frame.labels, n, &device).map_err(ApiError::internal)?;
            let prior = Tensor::from_vec(frame.values, (n, k), &device).map_err(ApiError::internal)?;
            // Another replica may have trained steps since this one last did: the record's count says, and a
            // trainer behind it is reloaded from the checkpoint.
            let steps = s.store.session(&rec.id)?.ok_or(Refusal::Gone)?.job.steps;
            if live.as_ref().is_some_and(|l| l.steps != steps) {
                *live = None;
            }
            if live.is_none() {
                let reservation = s.reserve(cost.trainer)?;
                let trainer = crate::jobs::load_trainer(s, &rec).map_err(ApiError::internal)?;
                *live = Some(Live { trainer, steps, _reservation: reservation });
            }
            let live = live.as_mut().expect("loaded above");
            let trainer = &mut live.trainer;
            let started = std::time::Instant::now();
            let objective = Objective::CrossEntropy { labels, prior };
            let reports = trainer.fit(&x, &objective, 1, |_, _| std::ops::ControlFlow::Continue(()))?;
            let loss = reports.last().map_or(f64::NAN, |r| r.loss);
            let weights = weights_file::to_bytes(&trainer.tensors(), Default::default())?;
            let ack = s.store.checkpoint(&rec.id, Some(&weights), |r| {
                if r.job.steps != steps {
                    return Err(Refusal::Conflict(
                        "another step of this session was trained meanwhile; send steps one at a time".into(),
                    ));
                }
                r.job.steps += 1;
                r.job.loss = Some(loss);
                r.last_used_unix = now_unix();
                let ack = StepAck { loss, samples: n, steps: r.job.steps };
                r.last_step = key.map(|k| (k, ack));
                Ok(ack)
            })??;
            live.steps = ack.steps;
            s.metrics.trained_samples.inc_by(n as u64);
            s.metrics.training_seconds.inc_by(started.elapsed().as_secs_f64());
            Ok(ack)
        })
        .await?;
    Ok(Json(ack))
}

pub async fn download_adapter(
    State(state): State<Arc<AppState>>,
    SessionAuth(rec): SessionAuth,
) -> Result<impl IntoResponse, ApiError> {
    let cost = Cost::of(&rec.shape, &rec.side, rec.train.batch_size).ok_or_else(|| ApiError::internal("cost"))?;
    let _memory = state.reserve(cost.params.saturating_mul(8))?;
    let compressed = state
        .blocking(move |s| {
            let weights =
                s.store.weights(&rec.id)?.ok_or_else(|| ApiError::conflict("not_trained", "nothing trained yet"))?;
            zstd::bulk::compress(&weights, mobillm_core::wire::ZSTD_LEVEL).map_err(ApiError::internal)
        })
        .await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], compressed))
}
