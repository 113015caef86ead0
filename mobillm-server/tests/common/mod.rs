//! What the API tests share: a client over the real router, small frames, and the two store backends.

#![allow(dead_code)] // each test file uses its own part

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use mobillm_core::side::SampleId;
use mobillm_core::wire::{Frame, Quant};
use mobillm_server::{app, AppState, ServerConfig};
use tower::ServiceExt;

pub const KEY: &str = "test-api-key";
pub const LAYERS: usize = 2;
pub const DIM: usize = 8;
pub const OUTPUTS: usize = 4;

pub const ADMIN: &str = "test-admin-token";

pub async fn call(
    state: &Arc<AppState>,
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, serde_json::Value) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = app(state.clone()).oneshot(req.body(Body::from(body)).unwrap()).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
}

pub fn session_json() -> Vec<u8> {
    serde_json::json!({"layers": LAYERS, "dim": DIM, "outputs": OUTPUTS, "backbone": "f00d"}).to_string().into_bytes()
}

pub async fn create(state: &Arc<AppState>) -> (String, String) {
    let (status, body) = call(state, "POST", "/v1/sessions", Some(KEY), session_json()).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    session_of(&body)
}

/// The session id and token of a `201 SessionCreated` body.
pub fn session_of(body: &serde_json::Value) -> (String, String) {
    (body["session_id"].as_str().unwrap().to_string(), body["token"].as_str().unwrap().to_string())
}

pub fn frame(n: usize, seed: u32) -> (Vec<SampleId>, Vec<u8>) {
    let ids: Vec<SampleId> = (0..n).map(|_| SampleId::random().unwrap()).collect();
    let acts: Vec<f32> = (0..n * LAYERS * DIM).map(|i| ((i as u32 * 7 + seed) % 13) as f32 / 6.5 - 1.0).collect();
    let targets: Vec<f32> = (0..n * OUTPUTS).map(|i| i as f32 / 10.0).collect();
    let bytes = Frame::samples(ids.clone(), LAYERS, DIM, acts, OUTPUTS, targets).encode(Quant::Int8).unwrap();
    (ids, bytes)
}

pub async fn count(state: &Arc<AppState>, id: &str, token: &str) -> u64 {
    let (status, body) = call(state, "GET", &format!("/v1/sessions/{id}"), Some(token), vec![]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["samples"].as_u64().unwrap()
}

pub async fn wait_done(state: &Arc<AppState>, id: &str, token: &str) -> serde_json::Value {
    for _ in 0..600 {
        let (_, body) = call(state, "GET", &format!("/v1/sessions/{id}"), Some(token), vec![]).await;
        match body["job"]["status"].as_str() {
            Some("done") | Some("failed") => return body,
            _ => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
    panic!("training did not finish");
}

pub async fn raw_get(state: &Arc<AppState>, uri: &str, token: &str) -> Vec<u8> {
    let req = Request::builder().method("GET").uri(uri).header("authorization", format!("Bearer {token}"));
    let resp = app(state.clone()).oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.unwrap().to_bytes().to_vec()
}

/// A `mobillm`-mode batch: `n` samples of 1–4 tokens, labelled by the sign of the pivot token's first value (the
/// rule the server must learn), backbone label logits zero.
pub fn sequences(n: usize, seed: u32, bad_label: bool) -> Vec<u8> {
    let mut acts = Vec::new();
    let (mut lens, mut labels) = (Vec::new(), Vec::new());
    for i in 0..n {
        let len = 1 + (i + seed as usize) % 4;
        for t in 0..len {
            for j in 0..LAYERS * DIM {
                acts.push((((i * 31 + t * 7 + j * 3) as u32 + seed) % 17) as f32 / 8.0 - 1.0);
            }
        }
        let pivot_first = acts[acts.len() - LAYERS * DIM];
        lens.push(len as u32);
        labels.push(if bad_label && i == 0 { 5 } else { u32::from(pivot_first > 0.0) });
    }
    let ids = (0..n).map(|_| SampleId::random().unwrap()).collect();
    Frame::sequences(ids, LAYERS, DIM, acts, lens, labels, 2, vec![0.0; n * 2]).encode(Quant::Int8).unwrap()
}

/// Which store a test's server runs on.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Embedded,
    /// PostgreSQL and S3 from `MOBILLM_TEST_DATABASE_URL` and `MOBILLM_TEST_S3_BUCKET` (with the `AWS_*`
    /// variables), which `cargo xtask test` starts; each test gets a database and an object prefix of its own.
    Cluster,
}

impl Backend {
    /// `cfg` on this backend; `None` (the test is skipped, saying so) when the cluster's services are not
    /// configured and `MOBILLM_REQUIRE_CLUSTER` is not set.
    pub async fn config(self, cfg: ServerConfig) -> Option<ServerConfig> {
        match self {
            Backend::Embedded => Some(cfg),
            Backend::Cluster => cluster_config(cfg).await,
        }
    }
}

pub async fn cluster_config(mut cfg: ServerConfig) -> Option<ServerConfig> {
    let (Ok(url), Ok(bucket)) = (std::env::var("MOBILLM_TEST_DATABASE_URL"), std::env::var("MOBILLM_TEST_S3_BUCKET"))
    else {
        assert!(
            std::env::var_os("MOBILLM_REQUIRE_CLUSTER").is_none(),
            "MOBILLM_REQUIRE_CLUSTER is set but MOBILLM_TEST_DATABASE_URL or MOBILLM_TEST_S3_BUCKET is not"
        );
        eprintln!("skipped: no PostgreSQL and S3 configured (cargo xtask test starts them; or `cargo xtask services`)");
        return None;
    };
    let name = format!("t_{:016x}", rand_u64());
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("PostgreSQL");
    tokio::spawn(connection);
    client.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("creating a test database");
    let mut db_url = url::Url::parse(&url).unwrap();
    db_url.set_path(&name);
    cfg.database_url = Some(db_url.to_string());
    cfg.object_store = Some(format!("s3://{bucket}/{name}"));
    Some(cfg)
}

fn rand_u64() -> u64 {
    u64::from_le_bytes(SampleId::random().unwrap().0[..8].try_into().unwrap())
}

/// Opens a server's state off the async thread (the cluster store blocks while it connects and migrates).
pub async fn open(cfg: ServerConfig) -> Arc<AppState> {
    tokio::task::spawn_blocking(move || mobillm_server::open(cfg)).await.unwrap().expect("opening the server")
}

/// Runs store calls off the async thread, as the handlers do.
pub async fn blocking<R: Send + 'static>(state: &Arc<AppState>, f: impl FnOnce(&AppState) -> R + Send + 'static) -> R {
    let state = state.clone();
    tokio::task::spawn_blocking(move || f(&state)).await.unwrap()
}
