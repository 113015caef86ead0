//! The HTTP API through `oneshot` on the real router, on the embedded store in a temporary directory and (the
//! scenarios that hold for any store) on the cluster store, plus the real binary on 127.0.0.1 killed with SIGKILL
//! mid-session.

use std::io::{BufRead, BufReader, Read, Write};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use mobillm_core::side::{Optimizer, SampleId};
use mobillm_core::wire::{Frame, FrameKind, Quant};
use mobillm_server::{app, ServerConfig};
use tower::ServiceExt;

mod common;
use common::*;

// The scenarios that hold for any store run on both: the embedded store, and PostgreSQL with S3.
macro_rules! on_both_backends {
    ($($name:ident),*) => {
        mod embedded {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Backend::Embedded).await
            })*
        }
        mod cluster {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Backend::Cluster).await
            })*
        }
    };
}

on_both_backends!(
    sessions_uploads_are_idempotent_and_deletion_erases,
    bad_requests_get_the_right_status_and_change_nothing,
    training_outputs_targets_and_adapter,
    mobillm_mode_trains_step_by_step_and_keeps_modes_apart
);

fn config(dir: &std::path::Path) -> ServerConfig {
    let mut cfg = ServerConfig::new(dir, vec![KEY.into()]);
    cfg.admin_token = Some(ADMIN.into());
    cfg.max_body_bytes = 64 * 1024;
    cfg.max_decoded_bytes = 1 << 20;
    cfg.max_samples_per_session = 10;
    cfg.max_sessions_per_key = 3;
    cfg.workers = Some(1);
    // These tests write kilobytes; the production watermark (1 GiB free) would fail them on a nearly full CI disk.
    cfg.min_free_disk_mb = 16;
    cfg
}

type BadUpload<'a> = (&'a str, Option<&'a str>, Vec<u8>, StatusCode, &'a str);

async fn sessions_uploads_are_idempotent_and_deletion_erases(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(cfg) = backend.config(config(dir.path())).await else { return };
    let state = open(cfg.clone()).await;
    let (id, token) = create(&state).await;
    let uri = format!("/v1/sessions/{id}/samples");
    let (_, bytes) = frame(4, 1);
    let (status, body) = call(&state, "PUT", &uri, Some(&token), bytes.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["stored"].as_u64(), body["duplicates"].as_u64(), body["total"].as_u64()),
        (Some(4), Some(0), Some(4))
    );
    // The same frame again (a client that lost the acknowledgement) stores nothing new.
    let (_, body) = call(&state, "PUT", &uri, Some(&token), bytes).await;
    assert_eq!(
        (body["stored"].as_u64(), body["duplicates"].as_u64(), body["total"].as_u64()),
        (Some(0), Some(4), Some(4))
    );
    assert_eq!(count(&state, &id, &token).await, 4);

    // Reopening the store on the same directory keeps everything acknowledged.
    drop(state);
    let state = open(cfg.clone()).await;
    assert_eq!(count(&state, &id, &token).await, 4);

    let (status, _) = call(&state, "DELETE", &format!("/v1/sessions/{id}"), Some(&token), vec![]).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = call(&state, "GET", &format!("/v1/sessions/{id}"), Some(&token), vec![]).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
}

#[tokio::test]
async fn a_disk_below_the_watermark_refuses_writes_and_keeps_what_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let state = mobillm_server::open(config(dir.path())).unwrap();
    let (id, token) = create(&state).await;
    let uri = format!("/v1/sessions/{id}/samples");
    let (status, body) = call(&state, "PUT", &uri, Some(&token), frame(4, 1).1).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    drop(state);

    // No disk has this much free: every write must be refused.
    let full = ServerConfig { min_free_disk_mb: u64::MAX, ..config(dir.path()) };
    let state = mobillm_server::open(full).unwrap();
    let (status, body) = call(&state, "PUT", &uri, Some(&token), frame(4, 2).1).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::INSUFFICIENT_STORAGE, Some("insufficient_storage")));
    assert!(body["message"].as_str().unwrap().contains("watermark"), "{body}");
    let (status, body) = call(&state, "POST", "/v1/sessions", Some(KEY), session_json()).await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{body}");
    // What was acknowledged is still there, readable, and deleting (which frees space) still works.
    assert_eq!(count(&state, &id, &token).await, 4);
    let (status, _) = call(&state, "DELETE", &format!("/v1/sessions/{id}"), Some(&token), vec![]).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

async fn bad_requests_get_the_right_status_and_change_nothing(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(cfg) = backend.config(config(dir.path())).await else { return };
    let state = open(cfg.clone()).await;
    let (id, token) = create(&state).await;
    let (other_id, other_token) = create(&state).await;
    let uri = format!("/v1/sessions/{id}/samples");
    let (_, good) = frame(2, 3);
    let (status, _) = call(&state, "PUT", &uri, Some(&token), good.clone()).await;
    assert_eq!(status, StatusCode::OK);

    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    let mut bad_version = good.clone();
    bad_version[4] = 7;
    let wrong_dims = Frame::samples(
        vec![SampleId::random().unwrap()],
        LAYERS,
        DIM + 8,
        vec![0.5; LAYERS * (DIM + 8)],
        OUTPUTS,
        vec![0.0; OUTPUTS],
    )
    .encode(Quant::Int8)
    .unwrap();
    let targets_frame = Frame::rows(FrameKind::Targets, vec![SampleId::random().unwrap()], OUTPUTS, vec![0.0; OUTPUTS])
        .encode(Quant::Int8)
        .unwrap();
    let mut lying = good.clone();
    let declared = u64::from_le_bytes(lying[12..20].try_into().unwrap());
    lying[12..20].copy_from_slice(&(declared - 1).to_le_bytes());
    let mut nan_scale = good[..20].to_vec();
    let mut body = zstd::stream::decode_all(&good[20..]).unwrap();
    body[20 + 32..20 + 34].copy_from_slice(&0x7E00u16.to_le_bytes());
    nan_scale.extend(zstd::bulk::compress(&body, 3).unwrap());
    let mut bomb = good[..12].to_vec();
    bomb.extend_from_slice(&4096u64.to_le_bytes());
    zstd::stream::copy_encode(std::io::repeat(0).take(1 << 30), &mut bomb, 19).unwrap();
    let (_, too_many) = frame(9, 4); // 2 stored + 9 > the limit of 10
    let oversized = vec![0u8; 70 * 1024];

    // (what, token, body, expected status, expected error code)
    let cases: Vec<BadUpload> = vec![
        ("no token", None, good.clone(), StatusCode::UNAUTHORIZED, "unauthorized"),
        ("wrong token", Some("nope"), good.clone(), StatusCode::UNAUTHORIZED, "unauthorized"),
        ("another session's token", Some(&other_token), good.clone(), StatusCode::UNAUTHORIZED, "unauthorized"),
        ("wrong magic", Some(&token), bad_magic, StatusCode::BAD_REQUEST, "bad_frame"),
        ("wrong version", Some(&token), bad_version, StatusCode::BAD_REQUEST, "bad_frame"),
        ("truncated", Some(&token), good[..good.len() / 2].to_vec(), StatusCode::BAD_REQUEST, "bad_frame"),
        ("dims differ from the session", Some(&token), wrong_dims, StatusCode::BAD_REQUEST, "bad_frame"),
        ("not a samples frame", Some(&token), targets_frame, StatusCode::BAD_REQUEST, "bad_frame"),
        ("declared size lies", Some(&token), lying, StatusCode::BAD_REQUEST, "bad_frame"),
        ("NaN scale", Some(&token), nan_scale, StatusCode::BAD_REQUEST, "bad_frame"),
        ("zstd bomb", Some(&token), bomb, StatusCode::BAD_REQUEST, "bad_frame"),
        ("too many samples", Some(&token), too_many, StatusCode::UNPROCESSABLE_ENTITY, "limit_exceeded"),
        ("body over the limit", Some(&token), oversized, StatusCode::PAYLOAD_TOO_LARGE, ""),
    ];
    for (what, tok, body, status, code) in cases {
        let (got, resp) = call(&state, "PUT", &uri, tok, body).await;
        assert_eq!(got, status, "{what}: {resp}");
        if !code.is_empty() {
            assert_eq!(resp["code"], code, "{what}: {resp}");
            assert!(!resp["message"].as_str().unwrap_or("").is_empty(), "{what}: a message");
        }
        assert_eq!(count(&state, &id, &token).await, 2, "{what} changed nothing");
    }
    let (status, _) =
        call(&state, "PUT", &format!("/v1/sessions/{}/samples", "0".repeat(32)), Some(&token), good).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "unknown session");
    assert_eq!(count(&state, &other_id, &other_token).await, 0);

    // Session creation: keys, JSON, shape, and the per-key limit.
    for (key, body, status) in [
        (None, session_json(), StatusCode::UNAUTHORIZED),
        (Some("wrong"), session_json(), StatusCode::UNAUTHORIZED),
        (Some(KEY), b"{not json".to_vec(), StatusCode::BAD_REQUEST),
        (Some(KEY), br#"{"layers":0,"dim":8,"outputs":4,"backbone":"x"}"#.to_vec(), StatusCode::BAD_REQUEST),
    ] {
        let (got, resp) = call(&state, "POST", "/v1/sessions", key, body).await;
        assert_eq!(got, status, "{resp}");
    }
    create(&state).await; // the third session of this key
    let (got, resp) = call(&state, "POST", "/v1/sessions", Some(KEY), session_json()).await;
    assert_eq!(got, StatusCode::UNPROCESSABLE_ENTITY, "{resp}");
}

/// Minimal HTTP/1.1 over a real socket (no client library of ours in the loop).
fn http(addr: &str, method: &str, path: &str, token: &str, body: &[u8]) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).unwrap();
    s.write_all(body).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

fn spawn_server(dir: &std::path::Path) -> (std::process::Child, String) {
    let log = dir.with_extension("log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mobillm-server"))
        .args(["--bind", "127.0.0.1:0", "--admin-bind", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .env("MOBILLM_API_KEYS", KEY)
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let Some(addr) = line.trim().strip_prefix("listening on ") else {
        let status = child.wait();
        panic!("the server did not start ({status:?}): {}", std::fs::read_to_string(&log).unwrap_or_default());
    };
    (child, addr.to_string())
}

#[test]
fn acknowledged_uploads_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, addr) = spawn_server(dir.path());
    let (status, body) = http(&addr, "POST", "/v1/sessions", KEY, &session_json());
    assert_eq!(status, 201, "{body}");
    let created: serde_json::Value = serde_json::from_str(&body).unwrap();
    let (id, token) = (created["session_id"].as_str().unwrap(), created["token"].as_str().unwrap());
    let (_, bytes) = frame(5, 9);
    let (status, body) = http(&addr, "PUT", &format!("/v1/sessions/{id}/samples"), token, &bytes);
    assert_eq!(status, 200, "{body}");
    server.kill().unwrap(); // SIGKILL
    server.wait().unwrap();

    let (mut server, addr) = spawn_server(dir.path());
    let (status, body) = http(&addr, "GET", &format!("/v1/sessions/{id}"), token, b"");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["samples"], 5);
    server.kill().unwrap();
    server.wait().unwrap();
}

async fn training_outputs_targets_and_adapter(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(cfg) = backend.config(config(dir.path())).await else { return };
    let state = open(cfg.clone()).await;
    let req = serde_json::json!({"layers": LAYERS, "dim": DIM, "outputs": OUTPUTS, "backbone": "f00d",
                                 "width": 8, "rank": 2, "batch_size": 4, "lr": 0.02});
    let (status, body) = call(&state, "POST", "/v1/sessions", Some(KEY), req.to_string().into_bytes()).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (id, token) = session_of(&body);
    let (ids, bytes) = frame(8, 5);
    call(&state, "PUT", &format!("/v1/sessions/{id}/samples"), Some(&token), bytes).await;

    // Before training the network is fresh: zero outputs; and there is no adapter yet.
    let (status, body) = call(&state, "GET", &format!("/v1/sessions/{id}/adapter"), Some(&token), vec![]).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::CONFLICT, Some("not_trained")));
    let outputs = raw_get(&state, &format!("/v1/sessions/{id}/outputs"), &token).await;
    let (frame0, _) = Frame::decode(&outputs, &Default::default()).unwrap();
    assert!(frame0.values.iter().all(|&v| v == 0.0) && frame0.ids.len() == 8);

    let train = |epochs: usize| serde_json::json!({"epochs": epochs}).to_string().into_bytes();
    let (status, body) = call(&state, "POST", &format!("/v1/sessions/{id}/train"), Some(&token), train(40)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (status, _) = call(&state, "POST", &format!("/v1/sessions/{id}/train"), Some(&token), b"{}".to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "malformed train request");
    let done = wait_done(&state, &id, &token).await;
    assert_eq!(done["job"]["status"], "done", "{done}");
    assert_eq!(done["job"]["epochs_done"], 40);

    // The outputs moved towards the targets (i / 10 per value, see `frame`).
    let outputs = raw_get(&state, &format!("/v1/sessions/{id}/outputs"), &token).await;
    let (out, _) = Frame::decode(&outputs, &Default::default()).unwrap();
    assert_eq!(out.kind, FrameKind::Outputs);
    let mut by_id: Vec<_> = out.ids.iter().zip(out.values.chunks(OUTPUTS)).collect();
    by_id.sort_by_key(|(i, _)| ids.iter().position(|x| x == *i).unwrap());
    let err: f32 = by_id
        .iter()
        .enumerate()
        .map(|(s, (_, o))| {
            o.iter().enumerate().map(|(k, v)| (v - (s * OUTPUTS + k) as f32 / 10.0).powi(2)).sum::<f32>()
        })
        .sum();
    let base: f32 = (0..8 * OUTPUTS).map(|i| (i as f32 / 10.0).powi(2)).sum();
    assert!(err < 0.5 * base, "training fits the targets: {err} vs {base}");

    let adapter = raw_get(&state, &format!("/v1/sessions/{id}/adapter"), &token).await;
    let (tensors, _) =
        mobillm_core::side::weights_file::from_bytes(&zstd::stream::decode_all(&adapter[..]).unwrap()).unwrap();
    assert_eq!(tensors.len(), 5);

    // New targets for known samples replace the old ones; an unknown id changes nothing.
    let new_targets =
        Frame::rows(FrameKind::Targets, ids.clone(), OUTPUTS, vec![1.0; 8 * OUTPUTS]).encode(Quant::F16).unwrap();
    let (status, body) = call(&state, "PUT", &format!("/v1/sessions/{id}/targets"), Some(&token), new_targets).await;
    assert_eq!((status, body["updated"].as_u64()), (StatusCode::OK, Some(8)));
    let mut with_unknown = ids[..2].to_vec();
    with_unknown.push(SampleId::random().unwrap());
    let bad =
        Frame::rows(FrameKind::Targets, with_unknown, OUTPUTS, vec![9.0; 3 * OUTPUTS]).encode(Quant::F16).unwrap();
    let (status, body) = call(&state, "PUT", &format!("/v1/sessions/{id}/targets"), Some(&token), bad).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::BAD_REQUEST, Some("unknown_sample")));
    let session = id.clone();
    let set =
        blocking(&state, move |s| s.store.training_set(&s.store.session(&session).unwrap().unwrap()).unwrap()).await;
    assert!(set.targets.iter().all(|&t| t == 1.0), "the refused update left every target as it was");

    // `from_scratch` trains from the initial weights: twice from scratch gives one network, and continuing
    // from the checkpoint another.
    let adapter_after = async |body: serde_json::Value| {
        let (status, resp) =
            call(&state, "POST", &format!("/v1/sessions/{id}/train"), Some(&token), body.to_string().into_bytes())
                .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{resp}");
        assert_eq!(wait_done(&state, &id, &token).await["job"]["status"], "done");
        let bytes = raw_get(&state, &format!("/v1/sessions/{id}/adapter"), &token).await;
        let (mut tensors, _) =
            mobillm_core::side::weights_file::from_bytes(&zstd::stream::decode_all(&bytes[..]).unwrap()).unwrap();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        tensors.iter().flat_map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect::<Vec<f32>>()
    };
    let scratch = serde_json::json!({"epochs": 3, "from_scratch": true});
    let first = adapter_after(scratch.clone()).await;
    let continued = adapter_after(serde_json::json!({"epochs": 3})).await;
    let again = adapter_after(scratch).await;
    let distance = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(distance(&first, &again) < 1e-5, "from scratch twice: {}", distance(&first, &again));
    assert!(distance(&first, &continued) > 1e-3, "continuing moved on: {}", distance(&first, &continued));
}

#[test]
fn training_resumes_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, addr) = spawn_server(dir.path());
    let req =
        serde_json::json!({"layers": LAYERS, "dim": DIM, "outputs": OUTPUTS, "backbone": "f00d", "batch_size": 1});
    let (_, body) = http(&addr, "POST", "/v1/sessions", KEY, req.to_string().as_bytes());
    let created: serde_json::Value = serde_json::from_str(&body).unwrap();
    let (id, token) = (created["session_id"].as_str().unwrap(), created["token"].as_str().unwrap());
    let (_, bytes) = frame(10, 2);
    http(&addr, "PUT", &format!("/v1/sessions/{id}/samples"), token, &bytes);
    let (status, body) = http(&addr, "POST", &format!("/v1/sessions/{id}/train"), token, br#"{"epochs": 1000}"#);
    assert_eq!(status, 202, "{body}");
    let status_of = |addr: &str| -> serde_json::Value {
        serde_json::from_str(&http(addr, "GET", &format!("/v1/sessions/{id}"), token, b"").1).unwrap()
    };
    let mut before = status_of(&addr);
    for _ in 0..2000 {
        let active = before["job"]["status"] == "running" || before["job"]["status"] == "queued";
        if before["job"]["epochs_done"].as_u64().unwrap() >= 3 || !active {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        before = status_of(&addr);
    }
    assert_eq!(before["job"]["status"], "running", "{before}");
    server.kill().unwrap();
    server.wait().unwrap();
    let killed_at = before["job"]["epochs_done"].as_u64().unwrap();
    assert!(killed_at < 1000, "killed mid-training");

    let (mut server, addr) = spawn_server(dir.path());
    let mut after = status_of(&addr);
    for _ in 0..3000 {
        if after["job"]["status"] == "done" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        after = status_of(&addr);
    }
    assert_eq!(after["job"]["status"], "done", "{after}");
    assert_eq!(after["job"]["epochs_done"], 1000);
    server.kill().unwrap();
    server.wait().unwrap();
}

async fn mobillm_mode_trains_step_by_step_and_keeps_modes_apart(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(cfg) = backend.config(config(dir.path())).await else { return };
    let state = open(cfg.clone()).await;
    let body = |v: serde_json::Value| v.to_string().into_bytes();
    let base = serde_json::json!({"layers": LAYERS, "dim": DIM, "outputs": OUTPUTS, "backbone": "f00d"});
    let with = |extra: serde_json::Value| {
        let mut v = base.clone();
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body(v)
    };
    // PAE sessions never tell the server K; mobillm sessions must.
    let (status, resp) = call(&state, "POST", "/v1/sessions", Some(KEY), with(serde_json::json!({"labels": 2}))).await;
    assert_eq!((status, resp["code"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_config")), "{resp}");
    let (status, resp) =
        call(&state, "POST", "/v1/sessions", Some(KEY), with(serde_json::json!({"mode": "mobillm"}))).await;
    assert_eq!((status, resp["code"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_config")), "{resp}");
    let (status, resp) = call(
        &state,
        "POST",
        "/v1/sessions",
        Some(KEY),
        with(serde_json::json!({"mode": "mobillm", "labels": 2, "lr": 0.01, "batch_size": 32})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{resp}");
    let (id, token) = session_of(&resp);
    let steps = format!("/v1/sessions/{id}/steps");

    let batch = sequences(32, 3, false);
    let mut losses = Vec::new();
    for _ in 0..30 {
        let (status, resp) = call(&state, "POST", &steps, Some(&token), batch.clone()).await;
        assert_eq!(status, StatusCode::OK, "{resp}");
        assert_eq!(resp["samples"], 32);
        losses.push(resp["loss"].as_f64().unwrap());
    }
    assert!((losses[0] - std::f64::consts::LN_2).abs() < 1e-3, "a fresh network starts at ln 2: {}", losses[0]);
    assert!(losses[29] < 0.5 * losses[0], "the loss must fall: {losses:?}");

    // Bad steps change nothing.
    let (status, resp) = call(&state, "POST", &steps, Some(&token), sequences(8, 1, true)).await;
    assert_eq!((status, resp["code"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_label")), "{resp}");
    let (status, resp) = call(&state, "POST", &steps, Some(&token), frame(4, 1).1).await;
    assert_eq!((status, resp["code"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_frame")), "{resp}");
    // PAE endpoints refuse a mobillm session, and the steps endpoint a PAE session.
    let (status, resp) = call(&state, "PUT", &format!("/v1/sessions/{id}/samples"), Some(&token), frame(2, 1).1).await;
    assert_eq!((status, resp["code"].as_str()), (StatusCode::CONFLICT, Some("wrong_mode")), "{resp}");
    let (pae, pae_token) = create(&state).await;
    let (status, resp) =
        call(&state, "POST", &format!("/v1/sessions/{pae}/steps"), Some(&pae_token), batch.clone()).await;
    assert_eq!((status, resp["code"].as_str()), (StatusCode::CONFLICT, Some("wrong_mode")), "{resp}");

    // A restart continues from the last acknowledged step, not from scratch.
    drop(state);
    let state = open(cfg.clone()).await;
    let (status, resp) = call(&state, "POST", &steps, Some(&token), batch).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert!(resp["loss"].as_f64().unwrap() < 0.5 * losses[0], "{resp}");
    let (_, status_body) = call(&state, "GET", &format!("/v1/sessions/{id}"), Some(&token), vec![]).await;
    assert_eq!(status_body["job"]["steps"], 31, "{status_body}");
    assert!(!raw_get(&state, &format!("/v1/sessions/{id}/adapter"), &token).await.is_empty());
}

#[tokio::test]
async fn metrics_count_requests_and_openapi_lists_served_routes() {
    let dir = tempfile::tempdir().unwrap();
    let state = mobillm_server::open(config(dir.path())).unwrap();
    let (id, token) = create(&state).await;
    let (status, _) = call(&state, "PUT", &format!("/v1/sessions/{id}/samples"), Some(&token), frame(4, 2).1).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(&state, "GET", "/v1/sessions/0123", Some(&token), vec![]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let metrics = Request::get("/metrics").header("authorization", format!("Bearer {ADMIN}"));
    let resp =
        mobillm_server::admin::router(state.clone()).oneshot(metrics.body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let text = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    for line in [
        r#"mobillm_http_requests_total{method="POST",route="/v1/sessions",status="201"} 1"#,
        r#"mobillm_http_requests_total{method="PUT",route="/v1/sessions/{id}/samples",status="200"} 1"#,
        r#"mobillm_http_requests_total{method="GET",route="/v1/sessions/{id}",status="404"} 1"#,
        "mobillm_samples_stored_total 4",
        "mobillm_sessions 1",
        "mobillm_running_jobs 0",
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
    }

    // Every operation the document lists is served: the router answers an unknown route with an empty 404 and
    // a wrong method with 405; our handlers answer with JSON (here mostly 401/404, as no token is sent).
    let resp = app(state.clone()).oneshot(Request::get("/v1/openapi.json").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let doc: serde_json::Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let mut operations = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in ["get", "put", "post", "delete"] {
            if item.get(method).is_none() {
                continue;
            }
            operations += 1;
            let uri = path.replace("{id}", "00000000000000000000000000000000");
            let req = Request::builder().method(method.to_uppercase().as_str()).uri(&uri).body(Body::empty()).unwrap();
            let resp = app(state.clone()).oneshot(req).await.unwrap();
            let status = resp.status();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            assert!(status.is_success() || !bytes.is_empty(), "{method} {path}: {status} with an empty body");
        }
    }
    assert_eq!(operations, 11);
    let resp = app(state.clone()).oneshot(Request::get("/v1/nowhere").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert!(resp.into_body().collect().await.unwrap().to_bytes().is_empty());
}

/// The OpenAPI document declares exactly the bounds `mobillm_core::protocol` enforces.
#[test]
fn openapi_declares_the_protocol_bounds() {
    use mobillm_core::protocol::bounds::*;
    let doc: serde_json::Value = serde_json::from_str(mobillm_server::OPENAPI).unwrap();
    let schemas = &doc["components"]["schemas"];
    let create = &schemas["CreateSession"]["properties"];
    for (field, max) in [
        ("layers", MAX_LAYERS),
        ("dim", MAX_DIM),
        ("outputs", MAX_OUTPUTS),
        ("labels", MAX_LABELS),
        ("width", MAX_WIDTH),
        ("rank", MAX_RANK),
        ("members", MAX_MEMBERS),
        ("batch_size", MAX_BATCH_SIZE),
    ] {
        assert_eq!(create[field]["maximum"].as_u64(), Some(max as u64), "{field}");
    }
    assert_eq!(create["lr"]["maximum"].as_f64(), Some(MAX_LR));
    assert_eq!(create["weight_decay"]["maximum"].as_f64(), Some(MAX_WEIGHT_DECAY));
    assert_eq!(create["alpha0"]["maximum"].as_f64(), Some(MAX_ALPHA0 as f64));
    assert!(create["backbone"]["pattern"].as_str().unwrap().ends_with(&format!("{{1,{MAX_BACKBONE_LEN}}}$")));
    assert_eq!(schemas["TrainRequest"]["properties"]["epochs"]["maximum"].as_u64(), Some(MAX_EPOCHS as u64));
    let idem = doc["components"]["parameters"]["IdempotencyKey"]["schema"]["pattern"].as_str().unwrap();
    assert!(idem.ends_with(&format!("{{1,{MAX_IDEMPOTENCY_KEY_LEN}}}$")), "{idem}");
    // What the schema calls valid, the server's own check accepts: the smallest and largest of every bound.
    let at = |v: serde_json::Value| serde_json::from_value::<mobillm_core::protocol::CreateSession>(v).unwrap();
    let smallest = at(serde_json::json!({"layers": 1, "dim": 1, "outputs": 2, "backbone": "a", "width": 1, "rank": 1,
        "members": 1, "batch_size": 1, "lr": 1e-9, "weight_decay": 0, "alpha0": -MAX_ALPHA0, "seed": 0}));
    // (And a `pae` session trains with the optimiser equivariant to its secrets, a `mobillm` one with plain AdamW.)
    assert_eq!(smallest.validate().unwrap().1.optimizer, Optimizer::EquivariantAdamW);
    let largest = at(serde_json::json!({"mode": "mobillm", "labels": MAX_LABELS, "layers": MAX_LAYERS as f64,
        "dim": MAX_DIM, "outputs": MAX_OUTPUTS, "backbone": "b".repeat(MAX_BACKBONE_LEN), "width": MAX_WIDTH,
        "rank": MAX_RANK, "members": MAX_MEMBERS, "batch_size": MAX_BATCH_SIZE, "lr": MAX_LR, "weight_decay": MAX_WEIGHT_DECAY,
        "alpha0": MAX_ALPHA0, "seed": u64::MAX}));
    assert_eq!(largest.validate().unwrap().1.optimizer, Optimizer::AdamW);
    for members in [0, MAX_MEMBERS + 1] {
        let outside = at(serde_json::json!({"layers": 1, "dim": 1, "outputs": 2, "backbone": "a", "members": members}));
        let err = outside.validate().expect_err("refused").to_string();
        assert!(err.contains(&format!("members = {members}")), "{err}");
    }
    // A device that does not say how many members gets one network, as before there were members.
    let (side, _) = at(serde_json::json!({"layers": 1, "dim": 1, "outputs": 2, "backbone": "a"})).validate().unwrap();
    assert_eq!(side.members, 1);
}

/// A store written by another layout is refused with a message that says what to do, and its data left as it was.
#[test]
fn a_store_of_another_layout_is_refused_not_misread() {
    let dir = tempfile::tempdir().unwrap();
    {
        // What the first layout looked like: sessions, and no layout marker.
        let db = redb::Database::create(dir.path().join("mobillm.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        let table: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("sessions");
        txn.open_table(table).unwrap().insert("0123", b"{}".as_slice()).unwrap();
        txn.commit().unwrap();
    }
    let err = mobillm_server::open(config(dir.path())).err().expect("refused").to_string();
    assert!(err.contains("another version") && err.contains("empty data directory"), "{err}");
    // The old session is still there, and no layout marker was written over it.
    let db = redb::Database::create(dir.path().join("mobillm.redb")).unwrap();
    let txn = redb::ReadableDatabase::begin_read(&db).unwrap();
    let sessions: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("sessions");
    assert!(redb::ReadableTable::get(&txn.open_table(sessions).unwrap(), "0123").unwrap().is_some());
    let meta: redb::TableDefinition<&str, &str> = redb::TableDefinition::new("meta");
    assert!(txn.open_table(meta).is_err(), "no layout was written");
}
