//! Live `mobillm` trainers stay within the memory budget: idle ones are evicted and rebuilt from their
//! checkpoints (row 5).

use super::support::*;

#[test]
fn idle_trainers_are_evicted_to_stay_within_the_budget() {
    let budget: u64 = 96 << 20;
    let mut server = Server::start(&["--memory-budget-mb", "96", "--max-decoded-bytes", "4194304"]);
    // Each trainer holds about 26 MB (8 layers × 1024 dims into width 128, with AdamW's state): three fit.
    let sessions: Vec<_> = (0..8).map(|_| server.create(mobillm(8, 1024, 128))).collect();
    let step = step_frame(4, 3, 8, 1024);
    for round in 1..=2 {
        for (id, token) in &sessions {
            let (code, body) = server.call("POST", &format!("/v1/sessions/{id}/steps"), token, &step);
            assert_eq!(code, 200, "{body}");
            assert_eq!(body["steps"], round, "an evicted trainer continues from its checkpoint: {body}");
            let usage = server.usage();
            assert!(usage["memory_reserved_bytes"].as_u64().unwrap() <= budget, "{usage}");
            assert!(usage["live_trainers"].as_u64().unwrap() <= 3, "{usage}");
        }
    }
    assert!(server.metric("mobillm_overloaded_total") == 0.0, "nothing was refused: evictions made room");
    let peak = server.peak_rss_mb();
    assert!(peak < 96.0 + 200.0, "peak RSS {peak:.0} MB");
    // Deleting a session gives its trainer's memory back at once.
    for (id, token) in &sessions {
        assert_eq!(server.call("DELETE", &format!("/v1/sessions/{id}"), token, b"").0, 204);
    }
    assert_eq!(server.usage()["live_trainers"], 0);
    assert!(server.alive());
}
