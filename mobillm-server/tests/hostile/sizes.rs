//! Sizes a client chooses: session shapes (rows 1, 15), amplifying frames (rows 3, 4) and values past f16 (row 14).

use std::time::Duration;

use mobillm_core::wire::Quant;

use super::support::*;

#[test]
fn oversized_shapes_are_refused_before_anything_is_allocated() {
    let mut server = Server::start(&[]);
    let create = |v: serde_json::Value| server.call("POST", "/v1/sessions", KEY, v.to_string().as_bytes());
    // Row 1: a width past every bound is refused by the bounds; shapes within the bounds whose training would
    // not fit the memory budget are refused by the budget.
    let (status, body) =
        create(serde_json::json!({"layers": 1, "dim": 1, "outputs": 8, "backbone": "x", "width": 1u64 << 34}));
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_config")), "{body}");
    let (status, body) =
        create(serde_json::json!({"layers": 128, "dim": 16384, "outputs": 8, "backbone": "x", "width": 4096}));
    assert_eq!((status, body["code"].as_str()), (422, Some("over_budget")), "{body}");
    let (status, body) = create(serde_json::json!({"mode": "mobillm", "labels": 512, "layers": 128, "dim": 16384,
        "outputs": 1024, "backbone": "x", "width": 4096, "rank": 1024, "batch_size": 8192}));
    assert_eq!((status, body["code"].as_str()), (422, Some("over_budget")), "{body}");
    let (status, body) = create(
        serde_json::json!({"mode": "mobillm", "labels": 9, "layers": 1, "dim": 8, "outputs": 8, "backbone": "x"}),
    );
    assert_eq!((status, body["code"].as_str()), (422, Some("inconsistent_config")), "{body}");
    // Row 15: long strings. A fingerprint past its bound is refused; a 15 MiB body is refused by its
    // Content-Length before it is read.
    let (status, body) = create(serde_json::json!({"layers": 1, "dim": 8, "outputs": 8, "backbone": "b".repeat(200)}));
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_config")), "{body}");
    let huge = format!(r#"{{"layers":1,"dim":8,"outputs":8,"backbone":"{}"}}"#, "b".repeat(15 << 20));
    for _ in 0..8 {
        let (status, body) = server.call("POST", "/v1/sessions", KEY, huge.as_bytes());
        assert_eq!((status, body["code"].as_str()), (413, Some("body_too_large")), "{body}");
    }
    assert_eq!(server.usage()["sessions"], 0, "nothing was created");
    assert!(server.disk_bytes() < 4 << 20, "the store holds {} bytes", server.disk_bytes());
    assert!(server.alive() && server.healthy());
}

#[test]
fn amplifying_frames_are_refused_and_memory_stays_within_the_budget() {
    let budget_mb = 256.0;
    let mut server = Server::start(&["--memory-budget-mb", "256", "--session-quota-mb", "128"]);
    // A 32 × 4096 session whose training fits the budget: a narrow side network and a quota of 128 MB.
    let (id, token) = server.create(
        serde_json::json!({"layers": 32, "dim": 4096, "outputs": 8, "backbone": "x", "width": 16, "batch_size": 16}),
    );
    let samples = format!("/v1/sessions/{id}/samples");
    let int4_vector = 4096 / 2 + 2 * (4096 / 32);
    // Row 3: 16.7 KB of zeros declaring 64 MiB, and a frame under the decoded limit that inflates more than 8:1.
    let bomb = raw_frame(1, 2, &samples_body(910, 32, 4096, 8, int4_vector, 0));
    assert!(bomb.len() < 64 << 10, "{} bytes", bomb.len());
    let (status, body) = server.call("PUT", &samples, &token, &bomb);
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_frame")), "{body}");
    let inflating = raw_frame(1, 2, &samples_body(100, 32, 4096, 8, int4_vector, 0));
    let (status, body) = server.call("PUT", &samples, &token, &inflating);
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_frame")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("inflates"), "{body}");
    // Real frames near the body limit, four at once: each is stored or refused for want of memory, never more.
    let frame = samples_frame(100, 32, 4096, 8, Quant::Int8);
    let answers: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4).map(|_| s.spawn(|| server.call("PUT", &samples, &token, &frame).0)).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(answers.iter().all(|s| *s == 200 || *s == 503), "{answers:?}");
    assert!(answers.contains(&200), "{answers:?}");
    let peak = server.peak_rss_mb();
    assert!(peak < budget_mb + 200.0, "peak RSS {peak:.0} MB with a budget of {budget_mb} MB");
    assert!(server.alive() && server.healthy());

    // Row 4: a `mobillm` step declaring 64 MiB from 2 KB, then six real steps at once on one session.
    let mut narrow = mobillm(32, 4096, 16);
    narrow["batch_size"] = 4.into();
    let (mid, mtoken) = server.create(narrow);
    let steps = format!("/v1/sessions/{mid}/steps");
    let mut seq = Vec::new();
    for v in [1usize, 32, 4096, 2, 128] {
        seq.extend_from_slice(&(v as u32).to_le_bytes());
    }
    seq.extend(ids(1).iter().flat_map(|i| i.0));
    seq.extend_from_slice(&128u32.to_le_bytes());
    seq.extend_from_slice(&0u32.to_le_bytes());
    seq.extend(std::iter::repeat_n(0u8, 128 * 32 * 4098));
    seq.extend(std::iter::repeat_n(0u8, 8));
    let amplifier = raw_frame(4, 1, &seq);
    assert!(amplifier.len() < 64 << 10);
    let (status, body) = server.call("POST", &steps, &mtoken, &amplifier);
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_frame")), "{body}");
    let step = step_frame(2, 4, 32, 4096);
    let answers: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6).map(|_| s.spawn(|| server.call("POST", &steps, &mtoken, &step).0)).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(answers.iter().all(|s| [200, 429, 503].contains(s)), "{answers:?}");
    let (_, status) = server.call("GET", &format!("/v1/sessions/{mid}"), &mtoken, b"");
    let trained = answers.iter().filter(|s| **s == 200).count() as u64;
    assert_eq!(status["job"]["steps"].as_u64(), Some(trained), "every 200 is one step, and only those: {status}");
    let peak = server.peak_rss_mb();
    assert!(peak < budget_mb + 200.0, "peak RSS {peak:.0} MB with a budget of {budget_mb} MB");
    assert!(server.alive() && server.healthy());
    assert!(eventually(Duration::from_secs(5), || server.usage()["memory_reserved_bytes"].as_u64() < Some(64 << 20)));
}

#[test]
fn activations_past_f16_are_refused() {
    let mut server = Server::start(&[]);
    let (id, token) = server.create(pae(1, 8));
    // Row 14: an int8 vector with scale 65504 and value 127 would be stored as +Inf.
    let mut body = Vec::new();
    for v in [1u32, 1, 8, 8, 0] {
        body.extend_from_slice(&v.to_le_bytes());
    }
    body.extend(ids(1).iter().flat_map(|i| i.0));
    body.extend_from_slice(&half::f16::from_f32(65504.0).to_le_bytes());
    body.extend([127u8; 8]);
    body.extend([0u8; 32]);
    let (status, resp) = server.call("PUT", &format!("/v1/sessions/{id}/samples"), &token, &raw_frame(1, 1, &body));
    assert_eq!((status, resp["code"].as_str()), (400, Some("bad_frame")), "{resp}");
    let (_, st) = server.call("GET", &format!("/v1/sessions/{id}"), &token, b"");
    assert_eq!(st["samples"], 0);
    // The session still trains from good samples.
    let (status, _) =
        server.call("PUT", &format!("/v1/sessions/{id}/samples"), &token, &samples_frame(8, 1, 8, 8, Quant::Int8));
    assert_eq!(status, 200);
    let (status, resp) = server.call("POST", &format!("/v1/sessions/{id}/train"), &token, br#"{"epochs": 2}"#);
    assert_eq!(status, 202, "{resp}");
    assert!(eventually(Duration::from_secs(30), || {
        server.call("GET", &format!("/v1/sessions/{id}"), &token, b"").1["job"]["status"] == "done"
    }));
    assert!(server.alive());
}
