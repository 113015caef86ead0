//! Training jobs: a job that keeps stopping the server is failed, not re-run (row 2); many jobs share few
//! workers fairly between API keys (row 11); shutdown stops and joins the workers, and their jobs resume.

use std::time::Duration;

use mobillm_core::protocol::JobStatus;
use mobillm_core::wire::Quant;
use mobillm_server::store::embedded::Embedded;
use mobillm_server::store::{Refusal, Store};

use super::support::*;

fn status(server: &Server, id: &str, token: &str) -> serde_json::Value {
    let (code, body) = server.call("GET", &format!("/v1/sessions/{id}"), token, b"");
    assert_eq!(code, 200, "{body}");
    body
}

/// Marks a session's job as running with `attempts` start-ups behind it, as a server that crashed while starting
/// it would have left it (the server is stopped while the store is opened here).
fn mark_started(server: &mut Server, id: &str, attempts: u32) {
    server.kill();
    let store = Store::Embedded(Embedded::open(&server.data, 16 << 20).unwrap());
    store
        .update(id, |r| {
            r.job.status = JobStatus::Running;
            r.job.epochs_total = 3;
            r.job.epochs_done = 0;
            r.start_attempts = attempts;
            Ok::<_, Refusal>(())
        })
        .unwrap()
        .unwrap();
    drop(store);
    server.start_again();
}

#[test]
fn a_job_that_stopped_the_server_twice_is_failed_not_rerun() {
    let mut server = Server::start(&[]);
    let (crashing, token) = server.create(pae(2, 8));
    let (recovering, token2) = server.create(pae(2, 8));
    for (id, t) in [(&crashing, &token), (&recovering, &token2)] {
        let (code, _) =
            server.call("PUT", &format!("/v1/sessions/{id}/samples"), t, &samples_frame(8, 2, 8, 8, Quant::Int8));
        assert_eq!(code, 200);
    }
    // Row 2: the job was started twice and each time the process died before its first checkpoint.
    mark_started(&mut server, &crashing, 2);
    let st = status(&server, &crashing, &token);
    assert_eq!(st["job"]["status"], "failed", "{st}");
    assert!(st["job"]["message"].as_str().unwrap().contains("twice"), "{st}");
    for _ in 0..3 {
        server.crash_and_restart();
        assert!(server.alive() && server.healthy());
        assert_eq!(status(&server, &crashing, &token)["job"]["status"], "failed");
    }
    // One earlier crash: the job gets another start, and finishes.
    mark_started(&mut server, &recovering, 1);
    assert!(eventually(Duration::from_secs(60), || status(&server, &recovering, &token2)["job"]["status"] == "done"));
    assert!(server.alive());
}

#[test]
fn jobs_queue_on_the_workers_fairly_between_keys() {
    let mut server = Server::start(&["--workers", "1"]);
    let slow = serde_json::json!({"layers": 2, "dim": 16, "outputs": 8, "backbone": "q", "batch_size": 1, "width": 32});
    let create_with = |key: &str| {
        let (code, body) = server.call("POST", "/v1/sessions", key, slow.to_string().as_bytes());
        assert_eq!(code, 201, "{body}");
        let (id, token) =
            (body["session_id"].as_str().unwrap().to_string(), body["token"].as_str().unwrap().to_string());
        let (code, _) = server.call(
            "PUT",
            &format!("/v1/sessions/{id}/samples"),
            &token,
            &samples_frame(40, 2, 16, 8, Quant::Int8),
        );
        assert_eq!(code, 200);
        (id, token)
    };
    // Row 11: six jobs of one key, then one of another, on one worker.
    let a: Vec<_> = (0..6).map(|_| create_with(KEY)).collect();
    let b = create_with(OTHER_KEY);
    for (id, token) in a.iter().chain([&b]) {
        let (code, body) = server.call("POST", &format!("/v1/sessions/{id}/train"), token, br#"{"epochs": 40}"#);
        assert_eq!(code, 202, "{body}");
    }
    let mut most_running = 0.0f64;
    let done = |server: &Server, s: &(String, String)| status(server, &s.0, &s.1)["job"]["status"] == "done";
    assert!(eventually(Duration::from_secs(120), || {
        most_running = most_running.max(server.metric("mobillm_running_jobs"));
        done(&server, &b)
    }));
    let a_done = a.iter().filter(|s| done(&server, s)).count();
    assert!(a_done <= 3, "the other key's job waited for only its turn, not for all six: {a_done} of A's were done");
    assert!(most_running <= 1.0, "one worker runs one job at a time: {most_running}");
    // Shutdown stops the worker between epochs and joins it; the queued and interrupted jobs resume and finish.
    assert!(server.terminate(Duration::from_secs(40)), "the server stopped within its grace period");
    server.start_again();
    assert!(eventually(Duration::from_secs(180), || a.iter().all(|s| done(&server, s))));
    assert!(server.alive());
}
