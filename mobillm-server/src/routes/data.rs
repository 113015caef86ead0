//! A `pae` session's cached data: `PUT …/samples` (activations and first targets), `PUT …/targets` (refinement
//! rounds), `GET …/outputs` (the network's outputs per sample, between rounds).

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use candle_core::{Device, Tensor};
use mobillm_core::protocol::{Mode, TargetsAck, UploadAck};
use mobillm_core::wire::{Frame, FrameKind, Prefix, Quant};

use super::{frame_limits, refuse_while_training, require_mode};
use crate::auth::SessionAuth;
use crate::body::FrameBody;
use crate::budget::Cost;
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::encode_sample;

/// Memory a frame's decoding takes beyond its body: the decoded body, the activations (`element` bytes each) and
/// the stored rows (about as large again).
fn decode_bytes(state: &AppState, body: &[u8], element: usize) -> Result<u64, ApiError> {
    let prefix = Prefix::read(body)?;
    let decoded = prefix.decoded_len.min(state.config.max_decoded_bytes as u64);
    Ok(decoded.saturating_mul(1 + 2 * prefix.activation_expansion(element) as u64))
}

pub async fn upload_samples(
    State(state): State<Arc<AppState>>,
    SessionAuth(rec): SessionAuth,
    body: FrameBody,
) -> Result<Json<UploadAck>, ApiError> {
    require_mode(&rec, Mode::Pae)?;
    let _decoding = state.reserve(decode_bytes(&state, &body.bytes, 2)?)?;
    let ack = state
        .blocking(move |s| {
            s.check_disk()?;
            let limits = frame_limits(&s.config, &rec.shape, true);
            let (frame, _) = Frame::decode_f16(&body.bytes, &limits)?;
            let shape = &rec.shape;
            if frame.kind != FrameKind::Samples {
                return Err(ApiError::bad_request(
                    "bad_frame",
                    format!("expected a Samples frame, got {:?}", frame.kind),
                ));
            }
            if (frame.layers, frame.dim, frame.width) != (shape.layers, shape.dim, shape.outputs) {
                return Err(ApiError::bad_request(
                    "shape_mismatch",
                    format!(
                        "frame has layers {} dim {} width {}, the session {} {} {}",
                        frame.layers, frame.dim, frame.width, shape.layers, shape.dim, shape.outputs
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
                    (*id, encode_sample(acts, &frame.values[i * frame.width..(i + 1) * frame.width]))
                })
                .collect();
            drop(frame);
            let (stored, duplicates, total) = s.store.put_samples(&rec.id, &rows, &s.config.quotas())??;
            s.metrics.samples_stored.inc_by(stored as u64);
            s.metrics.samples_duplicate.inc_by(duplicates as u64);
            Ok(UploadAck { stored, duplicates, total })
        })
        .await?;
    Ok(Json(ack))
}

pub async fn upload_targets(
    State(state): State<Arc<AppState>>,
    SessionAuth(rec): SessionAuth,
    body: FrameBody,
) -> Result<Json<TargetsAck>, ApiError> {
    require_mode(&rec, Mode::Pae)?;
    refuse_while_training(&rec)?;
    let _decoding = state.reserve(decode_bytes(&state, &body.bytes, 4)?)?;
    let updated = state
        .blocking(move |s| {
            let (frame, _) = Frame::decode(&body.bytes, &frame_limits(&s.config, &rec.shape, false))?;
            if frame.kind != FrameKind::Targets || frame.width != rec.shape.outputs {
                return Err(ApiError::bad_request(
                    "bad_frame",
                    format!(
                        "expected a Targets frame of width {}, got {:?} of width {}",
                        rec.shape.outputs, frame.kind, frame.width
                    ),
                ));
            }
            let rows: Vec<_> =
                frame.ids.iter().zip(frame.values.chunks_exact(frame.width)).map(|(i, v)| (*i, v)).collect();
            match s.store.update_targets(&rec.id, &rows)? {
                Ok(n) => Ok(n),
                Err(Ok(missing)) => {
                    Err(ApiError::bad_request("unknown_sample", format!("sample {missing} was never uploaded")))
                }
                Err(Err(refusal)) => Err(refusal.into()),
            }
        })
        .await?;
    Ok(Json(TargetsAck { updated }))
}

pub async fn download_outputs(
    State(state): State<Arc<AppState>>,
    SessionAuth(rec): SessionAuth,
) -> Result<impl IntoResponse, ApiError> {
    require_mode(&rec, Mode::Pae)?;
    refuse_while_training(&rec)?;
    let cost = Cost::of(&rec.shape, &rec.side, rec.train.batch_size);
    let need = cost.and_then(|c| c.outputs(rec.samples as u64, rec.shape.outputs));
    let _memory = state.reserve(need.ok_or_else(|| ApiError::internal("outputs cost overflows"))?)?;
    let frame = state
        .blocking(move |s| {
            let k = rec.shape.outputs;
            if rec.samples == 0 {
                return Ok(Frame::rows(FrameKind::Outputs, vec![], k, vec![]).encode(Quant::F16)?);
            }
            let set = s.store.training_set(&rec)?;
            let trainer = crate::jobs::load_trainer(s, &rec).map_err(ApiError::internal)?;
            let n = set.ids.len();
            let x = Tensor::from_vec(set.x, (n, rec.shape.layers, rec.shape.dim), &Device::Cpu)
                .map_err(ApiError::internal)?;
            let outputs =
                trainer.outputs(&x)?.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(ApiError::internal)?;
            Ok(Frame::rows(FrameKind::Outputs, set.ids, k, outputs).encode(Quant::F16)?)
        })
        .await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], frame))
}
