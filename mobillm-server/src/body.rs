//! Request bodies as extractors. Handlers list them last, after the credentials, so nothing is read before the
//! caller is known. A declared `Content-Length` over the limit is refused before reading (413); a body must arrive
//! in full within the body timeout (408); a frame body reserves its size from the memory budget before it is read
//! (503 when the budget is in use). Bytes are counted as they arrive, never as claimed.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;

use crate::budget::Reservation;
use crate::error::ApiError;
use crate::state::AppState;

/// Largest JSON request.
pub const MAX_JSON_BYTES: usize = 16 << 10;

fn content_length(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    match headers.get(header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Some)
            .ok_or_else(|| ApiError::bad_request("bad_request", "unreadable Content-Length")),
    }
}

async fn read(state: &AppState, req: Request, limit: usize) -> Result<Bytes, ApiError> {
    let read = axum::body::to_bytes(req.into_body(), limit);
    let bytes = match tokio::time::timeout(state.config.body_timeout(), read).await {
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!("the body did not arrive within {} s", state.config.body_timeout().as_secs()),
            ))
        }
        Ok(Err(e)) => {
            let over = std::error::Error::source(&e)
                .is_some_and(|s| s.downcast_ref::<http_body_util::LengthLimitError>().is_some());
            return Err(if over {
                ApiError::too_large(format!("the body is larger than {limit} bytes"))
            } else {
                ApiError::bad_request("bad_body", format!("the body could not be read: {e}"))
            });
        }
        Ok(Ok(bytes)) => bytes,
    };
    state.metrics.request_bytes.inc_by(bytes.len() as u64);
    Ok(bytes)
}

/// A binary frame, with the memory it takes reserved until the handler drops it.
pub struct FrameBody {
    pub bytes: Bytes,
    pub reservation: Reservation,
}

impl FromRequest<Arc<AppState>> for FrameBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let limit = state.config.max_body_bytes;
        let declared = content_length(req.headers())?;
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(ApiError::too_large(format!("the body is larger than {limit} bytes")));
        }
        let reservation = state.reserve(declared.unwrap_or(limit as u64))?;
        let bytes = read(state, req, limit).await?;
        Ok(FrameBody { bytes, reservation })
    }
}

/// A JSON request of type `T`, at most [`MAX_JSON_BYTES`].
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        if content_length(req.headers())?.is_some_and(|n| n > MAX_JSON_BYTES as u64) {
            return Err(ApiError::too_large(format!("a JSON request is at most {MAX_JSON_BYTES} bytes")));
        }
        let bytes = read(state, req, MAX_JSON_BYTES).await?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_request("bad_json", format!("request body: {e}")))
    }
}
