//! Metrics stay bounded and truthful under junk (row 13); a crash mid-write loses no acknowledged sample and the
//! restarted server answers at once (row 16).

use std::time::Duration;

use mobillm_core::wire::Quant;

use super::support::*;

#[test]
fn metrics_are_bounded_counted_as_read_and_for_operators_only() {
    let mut server = Server::start(&[]);
    // Row 13: invented methods and paths do not grow the label set.
    for i in 0..3000 {
        let _ = try_http(&server.api, &format!("BREW{i}"), &format!("/junk/{i}"), &[], b"");
    }
    let (status, text) = server.admin_get("/metrics");
    assert_eq!(status, 200);
    assert!(text.len() < 16 << 10, "/metrics grew to {} bytes", text.len());
    assert!(!text.contains("BREW"), "an invented method became a label");
    // Bytes are counted as they arrive: a claimed Content-Length counts for nothing.
    let before = server.metric("mobillm_request_body_bytes_total");
    let (id, token) = server.create(pae(1, 8));
    let after_create = server.metric("mobillm_request_body_bytes_total");
    assert_eq!(after_create - before, pae(1, 8).to_string().len() as f64);
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(&server.api).unwrap();
        let head = format!(
            "PUT /v1/sessions/{id}/samples HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 999999\r\n\r\n"
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(b"0123456789").unwrap();
    }
    let frame = samples_frame(3, 1, 8, 8, Quant::Int8);
    assert_eq!(server.call("PUT", &format!("/v1/sessions/{id}/samples"), &token, &frame).0, 200);
    assert!(eventually(Duration::from_secs(5), || {
        server.metric("mobillm_request_body_bytes_total") - after_create == frame.len() as f64
    }));
    // Operators only: the admin token on the admin listener; nothing of it on the API listener.
    let (status, _) = http(&server.admin, "GET", "/metrics", &[], b"");
    assert_eq!(status, 401);
    let (status, _) = http(&server.admin, "GET", "/metrics", &[("authorization", "Bearer wrong")], b"");
    assert_eq!(status, 401);
    assert_eq!(http(&server.api, "GET", "/metrics", &[], b"").0, 404);
    assert_eq!(http(&server.admin, "GET", "/healthz", &[], b"").0, 200);
    // The admin lists and deletes sessions.
    let (status, list) = server.admin_get("/admin/sessions");
    assert_eq!(status, 200);
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list["sessions"][0]["session_id"], id.as_str());
    assert_eq!(list["sessions"][0]["samples"], 3);
    let auth = format!("Bearer {ADMIN}");
    let (status, _) = http(&server.admin, "DELETE", &format!("/admin/sessions/{id}"), &[("authorization", &auth)], b"");
    assert_eq!(status, 204);
    assert_eq!(server.call("GET", &format!("/v1/sessions/{id}"), &token, b"").0, 404);
    assert!(server.alive());
}

#[test]
fn a_crash_mid_write_loses_no_acknowledged_sample() {
    let mut server = Server::start(&[]);
    let (id, token) = server.create(pae(30, 576));
    let acknowledged = std::sync::atomic::AtomicUsize::new(0);
    let path = format!("/v1/sessions/{id}/samples");
    // Row 16: writers keep uploading while the process is killed.
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..40 {
                    let frame = samples_frame(16, 30, 576, 8, Quant::Int8);
                    match try_http(&server.api, "PUT", &path, &[("authorization", &format!("Bearer {token}"))], &frame)
                    {
                        Ok((200, _)) => acknowledged.fetch_add(16, std::sync::atomic::Ordering::SeqCst),
                        _ => return,
                    };
                }
            });
        }
        std::thread::sleep(Duration::from_millis(1500));
        let pid = server.pid().to_string();
        std::process::Command::new("kill").args(["-9", &pid]).status().unwrap();
    });
    server.kill(); // reaps the killed process
    server.start_again();
    assert!(server.healthy());
    let (_, st) = server.call("GET", &format!("/v1/sessions/{id}"), &token, b"");
    let stored = st["samples"].as_u64().unwrap() as usize;
    let acked = acknowledged.load(std::sync::atomic::Ordering::SeqCst);
    assert!(acked > 0, "some uploads were acknowledged before the kill");
    assert!(stored >= acked, "{acked} samples were acknowledged, {stored} survived");
    // The counts kept in the transactions match the rows.
    assert_eq!(server.usage()["stored_bytes"], st["stored_bytes"]);
    assert!(server.alive());
}
