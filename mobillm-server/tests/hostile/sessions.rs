//! Sessions: the per-key cap holds under concurrent creates (row 9); idle sessions expire and a retried create
//! is the same session (row 10); large uploads and create/delete churn leave the server answering, their store
//! work off the async workers (row 12).

use std::time::Duration;

use mobillm_core::wire::Quant;

use super::support::*;

#[test]
fn the_per_key_cap_holds_under_concurrent_creates() {
    let mut server = Server::start(&["--max-sessions-per-key", "16"]);
    let request = pae(1, 8).to_string();
    // Row 9: 200 creates at once against a cap of 16.
    let answers: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> =
            (0..200).map(|_| s.spawn(|| server.call("POST", "/v1/sessions", KEY, request.as_bytes()).0)).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(answers.iter().filter(|s| **s == 201).count(), 16, "{answers:?}");
    assert!(answers.iter().all(|s| *s == 201 || *s == 422), "{answers:?}");
    assert_eq!(server.usage()["sessions"], 16);
    // Another key is not locked out by the first.
    let (status, _) = server.call("POST", "/v1/sessions", OTHER_KEY, request.as_bytes());
    assert_eq!(status, 201);
    assert!(server.alive());
}

#[test]
fn idle_sessions_expire_and_a_retried_create_is_the_same_session() {
    let mut server = Server::start(&["--idle-ttl-secs", "2"]);
    let create = |key: &str, body: &serde_json::Value| {
        let (status, resp) = http(
            &server.api,
            "POST",
            "/v1/sessions",
            &[("authorization", &format!("Bearer {KEY}")), ("idempotency-key", key)],
            body.to_string().as_bytes(),
        );
        (status, serde_json::from_slice::<serde_json::Value>(&resp).unwrap())
    };
    // Row 10: a client that lost the answer sends the create again; it gets the same session, with a new token.
    let (status, first) = create("retry-me", &pae(1, 8));
    assert_eq!(status, 201, "{first}");
    let (status, again) = create("retry-me", &pae(1, 8));
    assert_eq!(status, 201, "{again}");
    assert_eq!(first["session_id"], again["session_id"]);
    assert_eq!(first["idle_ttl_s"], 2);
    let (id, token) = (again["session_id"].as_str().unwrap(), again["token"].as_str().unwrap());
    assert_eq!(server.call("GET", &format!("/v1/sessions/{id}"), first["token"].as_str().unwrap(), b"").0, 401);
    let (status, other) = create("retry-me", &pae(2, 8));
    assert_eq!((status, other["code"].as_str()), (422, Some("idempotency_mismatch")), "{other}");
    assert_eq!(server.usage()["sessions"], 1);
    let (status, _) =
        server.call("PUT", &format!("/v1/sessions/{id}/samples"), token, &samples_frame(4, 1, 8, 8, Quant::Int8));
    assert_eq!(status, 200);
    assert!(server.usage()["stored_bytes"].as_u64().unwrap() > 0);
    // Orphaned (the app was killed): within a few TTLs the session and its data are gone, its key slot free.
    assert!(eventually(Duration::from_secs(20), || server.usage()["sessions"] == 0));
    assert_eq!(server.usage()["stored_bytes"], 0);
    assert_eq!(server.call("GET", &format!("/v1/sessions/{id}"), token, b"").0, 404);
    assert!(server.metric("mobillm_sessions_reaped_total") >= 1.0);
    // A session in use is kept: requests keep it alive past its TTL.
    let (id, token) = server.create(pae(1, 8));
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(800));
        assert_eq!(server.call("GET", &format!("/v1/sessions/{id}"), &token, b"").0, 200);
    }
    assert!(server.alive());
}

#[test]
fn large_uploads_and_churn_leave_the_server_answering() {
    let mut server = Server::start(&[]);
    let (id, token) = server.create(pae(30, 576));
    // Row 12: a 20 000-id frame is over the per-frame limit; frames at the limit are stored while health, and
    // another session's small uploads, keep answering.
    let (status, body) =
        server.call("PUT", &format!("/v1/sessions/{id}/samples"), &token, &samples_frame(20_000, 1, 1, 8, Quant::Int8));
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_frame")), "{body}");
    let big = samples_frame(4096, 2, 64, 8, Quant::Int8);
    let (victim, victim_token) = server.create(pae(1, 8));
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let uploads: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let (other, t) = server.create(pae(2, 64));
                    server.call("PUT", &format!("/v1/sessions/{other}/samples"), &t, &big).0
                })
            })
            .collect();
        let churn = s.spawn(|| {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && n < 200 {
                let (cid, ct) = server.create(pae(1, 8));
                assert_eq!(server.call("DELETE", &format!("/v1/sessions/{cid}"), &ct, b"").0, 204);
                n += 1;
            }
        });
        for _ in 0..20 {
            assert!(server.healthy());
            let small = samples_frame(2, 1, 8, 8, Quant::Int8);
            assert_eq!(server.call("PUT", &format!("/v1/sessions/{victim}/samples"), &victim_token, &small).0, 200);
        }
        for u in uploads {
            assert_eq!(u.join().unwrap(), 200);
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        churn.join().unwrap();
    });
    let (_, st) = server.call("GET", &format!("/v1/sessions/{victim}"), &victim_token, b"");
    assert_eq!(st["samples"], 40);
    assert_eq!(server.usage()["sessions"], 4, "the churned sessions are all gone");
    assert!(server.alive());
}
