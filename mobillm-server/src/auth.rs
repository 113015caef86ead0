//! Credentials as extractors, checked from the request's head before any body is read: [`ApiKey`] (creating
//! sessions), [`SessionAuth`] (a session's bearer token, for every `/v1/sessions/{id}` route) and [`Admin`]
//! (the admin listener). An unknown session is 404; a known one with a missing or wrong token is 401.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::state::{sha256_hex, AppState};
use crate::store::SessionRecord;

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::unauthorized("missing `Authorization: Bearer …` header"))
}

/// A valid API key; holds its hash.
pub struct ApiKey(pub String);

impl FromRequestParts<Arc<AppState>> for ApiKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        state.api_key(bearer(parts)?).map(ApiKey).ok_or_else(|| ApiError::unauthorized("unknown API key"))
    }
}

/// The session named in the path, opened with its token.
pub struct SessionAuth(pub SessionRecord);

/// Session ids are 32 lowercase hex digits.
fn is_session_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl FromRequestParts<Arc<AppState>> for SessionAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::not_found("no such session"))?;
        let token_hash = sha256_hex(bearer(parts)?.as_bytes());
        if !is_session_id(&id) {
            return Err(ApiError::not_found(format!("no session {id:.40}")));
        }
        let rec = state
            .blocking(move |s| Ok(s.store.session(&id)?))
            .await?
            .ok_or_else(|| ApiError::not_found("no such session"))?;
        if !bool::from(token_hash.as_bytes().ct_eq(rec.token_hash.as_bytes())) {
            return Err(ApiError::unauthorized("this token does not open this session"));
        }
        state.touch(&rec.id);
        Ok(SessionAuth(rec))
    }
}

/// The admin token.
pub struct Admin;

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        state.admin_token_matches(bearer(parts)?)?;
        Ok(Admin)
    }
}
