//! The cluster store across processes' worth of state on one PostgreSQL and one S3 server (started by
//! `cargo xtask test` on 127.0.0.1): API replicas and training workers as separate states, jobs claimed under
//! leases and claimed again when a worker stops renewing its lease, `mobillm` steps behind replicas without
//! session affinity, and a deleted session's objects gone.

use std::time::Duration;

use axum::http::StatusCode;
use mobillm_server::config::Role;
use mobillm_server::store::{Lease, Refusal, Store};
use mobillm_server::ServerConfig;

mod common;
use common::*;

fn config(dir: &std::path::Path, role: Role) -> ServerConfig {
    let mut cfg = ServerConfig::new(dir, vec![KEY.into()]);
    cfg.role = role;
    cfg.workers = Some(1);
    cfg.lease_secs = 3;
    cfg
}

/// Configs for `roles` on one fresh database and object prefix.
async fn cluster(dir: &std::path::Path, roles: &[Role]) -> Option<Vec<ServerConfig>> {
    let first = cluster_config(config(dir, Role::All)).await?;
    Some(roles.iter().map(|&role| ServerConfig { role, ..first.clone() }).collect())
}

fn train_request() -> Vec<u8> {
    serde_json::json!({"layers": LAYERS, "dim": DIM, "outputs": OUTPUTS, "backbone": "f00d",
                       "width": 8, "rank": 2, "batch_size": 4, "lr": 0.02})
    .to_string()
    .into_bytes()
}

#[tokio::test]
async fn an_api_replica_takes_uploads_a_worker_trains_and_deletion_removes_every_object() {
    let dir = tempfile::tempdir().unwrap();
    let Some(cfgs) = cluster(dir.path(), &[Role::Serve, Role::Work]).await else { return };
    let api = open(cfgs[0].clone()).await;
    let (status, body) = call(&api, "POST", "/v1/sessions", Some(KEY), train_request()).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (id, token) = session_of(&body);
    let (_, bytes) = frame(8, 5);
    let uri = format!("/v1/sessions/{id}/samples");
    let (status, body) = call(&api, "PUT", &uri, Some(&token), bytes.clone()).await;
    assert_eq!((status, body["stored"].as_u64()), (StatusCode::OK, Some(8)), "{body}");
    let (_, body) = call(&api, "PUT", &uri, Some(&token), bytes).await;
    assert_eq!(body["duplicates"].as_u64(), Some(8), "a repeated upload stores nothing: {body}");
    let id2 = id.clone();
    let objects = blocking(&api, move |s| cluster_store(s).session_objects(&id2).unwrap()).await;
    assert_eq!(objects, 1, "one upload, one object");

    // The API replica queues the job; nothing in it trains.
    let train = serde_json::json!({"epochs": 20}).to_string().into_bytes();
    let (status, body) = call(&api, "POST", &format!("/v1/sessions/{id}/train"), Some(&token), train).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (_, body) = call(&api, "GET", &format!("/v1/sessions/{id}"), Some(&token), vec![]).await;
    assert_eq!(body["job"]["status"], "queued", "no worker yet: {body}");

    // A worker (another state on the same database and objects) claims it and trains it to the end.
    let worker = open(cfgs[1].clone()).await;
    let done = wait_done(&api, &id, &token).await;
    assert_eq!(
        (done["job"]["status"].as_str(), done["job"]["epochs_done"].as_u64()),
        (Some("done"), Some(20)),
        "{done}"
    );
    let adapter = raw_get(&api, &format!("/v1/sessions/{id}/adapter"), &token).await;
    assert!(!adapter.is_empty());
    let id2 = id.clone();
    let objects = blocking(&api, move |s| cluster_store(s).session_objects(&id2).unwrap()).await;
    assert_eq!(objects, 2, "the upload and the latest checkpoint only (earlier checkpoints deleted)");

    let (status, _) = call(&api, "DELETE", &format!("/v1/sessions/{id}"), Some(&token), vec![]).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let id2 = id.clone();
    let (objects, usage) =
        blocking(&api, move |s| (cluster_store(s).session_objects(&id2).unwrap(), s.store.usage().unwrap())).await;
    assert_eq!(objects, 0, "deleting the session deleted its objects");
    assert_eq!((usage.sessions, usage.bytes), (0, 0), "and gave back what it was charged");
    drop(worker);
}

#[tokio::test]
async fn a_job_whose_worker_dies_is_claimed_again_and_the_dead_worker_can_no_longer_write() {
    let dir = tempfile::tempdir().unwrap();
    let Some(cfgs) = cluster(dir.path(), &[Role::Serve, Role::Work]).await else { return };
    let api = open(cfgs[0].clone()).await;
    let (_, body) = call(&api, "POST", "/v1/sessions", Some(KEY), train_request()).await;
    let (id, token) = session_of(&body);
    call(&api, "PUT", &format!("/v1/sessions/{id}/samples"), Some(&token), frame(8, 5).1).await;
    let train = serde_json::json!({"epochs": 10}).to_string().into_bytes();
    let (status, _) = call(&api, "POST", &format!("/v1/sessions/{id}/train"), Some(&token), train).await;
    assert_eq!(status, StatusCode::ACCEPTED);

    // A worker claims the job and dies at once: no heartbeat, no checkpoint.
    let claimed = blocking(&api, |s| cluster_store(s).claim_job("dead-worker", 2).unwrap()).await.unwrap();
    assert_eq!((claimed.session.as_str(), claimed.reclaimed), (id.as_str(), false));
    let again = blocking(&api, |s| cluster_store(s).claim_job("other", 2).unwrap()).await;
    assert_eq!(again, None, "a job under a live lease is nobody else's");

    // Once the lease passes, a live worker claims it and finishes it.
    let worker = open(cfgs[1].clone()).await;
    let done = wait_done(&api, &id, &token).await;
    assert_eq!(
        (done["job"]["status"].as_str(), done["job"]["epochs_done"].as_u64()),
        (Some("done"), Some(10)),
        "{done}"
    );
    let id2 = id.clone();
    let rec = blocking(&api, move |s| s.store.session(&id2).unwrap().unwrap()).await;
    let holder = rec.lease.as_ref().map(|l| l.worker.clone()).unwrap();
    assert_ne!(holder, "dead-worker", "the job was claimed again");
    assert_eq!(worker.metrics.jobs_reclaimed.get(), 1, "and counted as reclaimed");

    // The dead worker, back, finds its lease gone: the check every job write makes refuses it.
    let id2 = id.clone();
    let late = blocking(&api, move |s| {
        s.store.update(&id2, |r| match &r.lease {
            Some(Lease { worker, .. }) if worker == "dead-worker" => Ok(()),
            _ => Err(Refusal::Conflict("another worker holds this job now".into())),
        })
    })
    .await
    .unwrap();
    assert!(matches!(late, Err(Refusal::Conflict(_))), "{late:?}");
    drop(worker);
}

#[tokio::test]
async fn mobillm_steps_alternate_between_api_replicas_without_affinity() {
    let dir = tempfile::tempdir().unwrap();
    let Some(cfgs) = cluster(dir.path(), &[Role::Serve, Role::Serve]).await else { return };
    let (a, b) = (open(cfgs[0].clone()).await, open(cfgs[1].clone()).await);
    let req = serde_json::json!({"layers": LAYERS, "dim": DIM, "outputs": OUTPUTS, "backbone": "f00d",
                                 "mode": "mobillm", "labels": 2, "lr": 0.01, "batch_size": 32});
    let (status, resp) = call(&a, "POST", "/v1/sessions", Some(KEY), req.to_string().into_bytes()).await;
    assert_eq!(status, StatusCode::CREATED, "{resp}");
    let (id, token) = session_of(&resp);
    let steps = format!("/v1/sessions/{id}/steps");
    let batch = sequences(32, 3, false);
    let mut losses = Vec::new();
    for i in 0..30 {
        let replica = if i % 2 == 0 { &a } else { &b };
        let (status, resp) = call(replica, "POST", &steps, Some(&token), batch.clone()).await;
        assert_eq!(status, StatusCode::OK, "{resp}");
        assert_eq!(resp["steps"].as_u64(), Some(i + 1), "every step counted once, whichever replica: {resp}");
        losses.push(resp["loss"].as_f64().unwrap());
    }
    // Each replica reloads the checkpoint the other wrote, so training continues rather than restarting.
    assert!(losses[29] < 0.5 * losses[0], "the loss must fall across replicas: {losses:?}");
}

#[tokio::test]
async fn workers_claim_jobs_in_turn_between_api_keys_and_objects_may_live_in_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let Some(cfgs) = cluster(dir.path(), &[Role::Serve]).await else { return };
    // Objects in a directory (`file://`) rather than S3: the same store otherwise.
    let mut cfg = cfgs[0].clone();
    cfg.object_store = Some(format!("file://{}", dir.path().join("objects").display()));
    cfg.api_keys = vec![KEY.into(), "second-key".into()];
    let api = open(cfg).await;
    let mut queued = Vec::new();
    for key in [KEY, KEY, KEY, "second-key"] {
        let (status, body) = call(&api, "POST", "/v1/sessions", Some(key), train_request()).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let (id, token) = session_of(&body);
        call(&api, "PUT", &format!("/v1/sessions/{id}/samples"), Some(&token), frame(4, 1).1).await;
        let train = serde_json::json!({"epochs": 1}).to_string().into_bytes();
        let (status, _) = call(&api, "POST", &format!("/v1/sessions/{id}/train"), Some(&token), train).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        queued.push(id);
    }
    assert!(dir.path().join("objects").read_dir().unwrap().next().is_some(), "the uploads are files");
    let claims = blocking(&api, |s| {
        (0..5).map(|i| cluster_store(s).claim_job(&format!("w{i}"), 30).unwrap().map(|c| c.session)).collect::<Vec<_>>()
    })
    .await;
    // The second key's one job goes second, not after the first key's three; each key first come first served.
    let expected = [&queued[0], &queued[3], &queued[1], &queued[2]].map(|id| Some(id.clone()));
    assert_eq!(claims[..4], expected, "{claims:?}");
    assert_eq!(claims[4], None, "every job is claimed, once");
}

#[tokio::test]
async fn migrations_apply_once_and_roles_need_the_cluster_store() {
    let dir = tempfile::tempdir().unwrap();
    // The embedded store belongs to one process: it neither serves nor trains alone.
    let err = tokio::task::spawn_blocking({
        let cfg = config(dir.path(), Role::Serve);
        move || mobillm_server::open(cfg).err().expect("refused").to_string()
    })
    .await
    .unwrap();
    assert!(err.contains("needs the cluster store"), "{err}");

    let Some(cfgs) = cluster(dir.path(), &[Role::All, Role::Serve]).await else { return };
    // A database that is not there is named at start, not met at the first request.
    let mut down = cfgs[0].clone();
    down.database_url = Some("postgres://mobillm@127.0.0.1:9/nowhere".into());
    let err = tokio::task::spawn_blocking(move || mobillm_server::open(down).err().expect("refused").to_string())
        .await
        .unwrap();
    assert!(err.contains("PostgreSQL"), "{err}");

    let first = open(cfgs[0].clone()).await;
    let (status, _) = call(&first, "POST", "/v1/sessions", Some(KEY), session_json()).await;
    assert_eq!(status, StatusCode::CREATED);
    // A second process on the same database finds it migrated and its data there.
    let second = open(cfgs[1].clone()).await;
    let usage = blocking(&second, |s| s.store.usage().unwrap()).await;
    assert_eq!(usage.sessions, 1);

    // A database migrated by a newer server is refused, not misread.
    let url = cfgs[0].database_url.clone().unwrap();
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client.batch_execute("INSERT INTO schema_migrations VALUES (999, 0)").await.unwrap();
    let cfg = cfgs[1].clone();
    let err = tokio::task::spawn_blocking(move || mobillm_server::open(cfg).err().expect("refused").to_string())
        .await
        .unwrap();
    assert!(err.contains("migration 999"), "{err}");
}

fn cluster_store(state: &mobillm_server::AppState) -> &mobillm_server::store::cluster::Cluster {
    match &state.store {
        Store::Cluster(c) => c,
        Store::Embedded(_) => panic!("a cluster test on the embedded store"),
    }
}
