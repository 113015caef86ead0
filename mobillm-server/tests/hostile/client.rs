//! The device's client (row 17): retries repeat nothing, answers are read up to a bound, waiting has a deadline,
//! secrets stay out of `Debug`. Transport (row 18): plain HTTP only on loopback unless asked, keys from files.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mobillm_core::client::{AssistClient, Connection, Session};
use mobillm_core::protocol::{CreateSession, Mode};
use mobillm_core::wire::Quant;
use mobillm_core::Error;

use super::support::*;

/// A proxy on loopback that forwards each request to `upstream` and, for the first `drop_posts` POSTs, lets the
/// server answer but closes the client's connection without relaying it: an answer lost on the way back.
fn lossy_proxy(upstream: String, drop_posts: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let left = Arc::new(AtomicUsize::new(drop_posts));
    std::thread::spawn(move || {
        for client in listener.incoming().take(200) {
            let Ok(mut client) = client else { continue };
            let (upstream, left) = (upstream.clone(), left.clone());
            std::thread::spawn(move || {
                client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut reader = BufReader::new(client.try_clone().unwrap());
                let mut head = String::new();
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    if !lower.starts_with("connection:") {
                        head.push_str(&line);
                    }
                }
                let mut body = vec![0u8; length];
                reader.read_exact(&mut body).unwrap();
                let mut server = TcpStream::connect(&upstream).unwrap();
                server.write_all(format!("{head}Connection: close\r\n\r\n").as_bytes()).unwrap();
                server.write_all(&body).unwrap();
                let mut answer = Vec::new();
                server.read_to_end(&mut answer).unwrap();
                let lose = head.starts_with("POST")
                    && left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
                if !lose {
                    let _ = client.write_all(&answer);
                }
            });
        }
    });
    format!("http://{addr}")
}

fn request(mode: Mode) -> CreateSession {
    CreateSession {
        mode,
        labels: (mode == Mode::Mobillm).then_some(2),
        layers: 2,
        dim: 8,
        outputs: 8,
        backbone: "client".into(),
        width: Some(16),
        rank: Some(4),
        members: None,
        activation: None,
        alpha0: None,
        lr: None,
        batch_size: Some(4),
        weight_decay: None,
        seed: None,
    }
}

#[test]
fn retries_after_lost_answers_create_train_and_step_once() {
    let mut server = Server::start(&[]);
    let client = AssistClient::new(&lossy_proxy(server.api.clone(), 3)).unwrap();
    let session = client.create_session(KEY, &request(Mode::Pae)).unwrap();
    assert_eq!(server.usage()["sessions"], 1, "the retried create made one session");
    let ids = ids(6);
    client
        .upload_samples(&session, &ids, &values(6 * 16, 1), &values(6 * 8, 2), (2, 8, 8), Quant::Int8, 3, |_, _| {})
        .unwrap();
    let job = client.train(&session, 3).unwrap();
    assert_eq!(job.epochs_total, 3, "the retried training request got the first one's job");
    let done = client.wait_trained(&session, Duration::from_millis(20), Duration::from_secs(60), |_| Ok(())).unwrap();
    assert_eq!((done.job.epochs_done, done.samples), (3, 6));
    let mobillm = client.create_session(KEY, &request(Mode::Mobillm)).unwrap();
    let step = step_frame(4, 2, 2, 8);
    let ack = client.train_step(&mobillm, &step).unwrap();
    assert_eq!(ack.steps, 1, "the retried step was trained once");
    assert_eq!(client.status(&mobillm).unwrap().job.steps, 1);
    client.delete(&session).unwrap();
    client.delete(&session).unwrap(); // already gone: still deleted
    assert!(server.alive());
}

/// A server that answers every request with `head` and then endless zeros.
fn endless_answers(head: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(50) {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf);
                let _ = conn.write_all(head.as_bytes());
                let zeros = [0u8; 65536];
                for _ in 0..32_768 {
                    if conn.write_all(&zeros).is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

#[test]
fn hostile_answers_are_read_up_to_a_bound() {
    let session = Session { session_id: "0".repeat(32), token: "t".into(), max_samples: 10, idle_ttl_s: 60 };
    for head in [
        "HTTP/1.1 200 OK\r\nContent-Length: 10000000000\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n40000000\r\n",
    ] {
        let client = AssistClient::new(&endless_answers(head)).unwrap();
        assert!(matches!(client.status(&session), Err(Error::Protocol(_) | Error::Network(_))));
        assert!(matches!(client.outputs(&session, 10, 8), Err(Error::Protocol(_) | Error::Network(_))));
        assert!(matches!(client.adapter(&session), Err(Error::Protocol(_) | Error::Network(_))));
    }
    let peak_mb = mobillm_core::memory::peak_rss_mb().unwrap_or(0.0);
    assert!(peak_mb < 1500.0, "reading hostile answers took {peak_mb:.0} MB");
}

#[test]
fn waiting_for_training_has_a_deadline_and_secrets_stay_out_of_debug() {
    let server = Server::start(&["--workers", "1"]);
    let client = AssistClient::new(&format!("http://{}", server.api)).unwrap();
    let session = client.create_session(KEY, &CreateSession { batch_size: Some(1), ..request(Mode::Pae) }).unwrap();
    let ids = ids(40);
    client
        .upload_samples(&session, &ids, &values(40 * 16, 1), &values(40 * 8, 2), (2, 8, 8), Quant::Int8, 40, |_, _| {})
        .unwrap();
    client.train(&session, 1000).unwrap();
    let waited = client.wait_trained(&session, Duration::from_millis(50), Duration::from_secs(1), |_| Ok(()));
    assert!(matches!(&waited, Err(Error::Network(m)) if m.contains("did not finish")), "{waited:?}");
    let cancelled =
        client.wait_trained(&session, Duration::from_millis(50), Duration::from_secs(60), |_| Err(Error::Cancelled));
    assert!(matches!(cancelled, Err(Error::Cancelled)));
    client.delete(&session).unwrap();

    assert!(!format!("{session:?}").contains(&session.token));
    let cfg = mobillm_core::fine_tune::FineTuneConfig { api_key: "very-secret-key".into(), ..Default::default() };
    assert!(!format!("{cfg:?}").contains("very-secret-key"));
}

#[test]
fn plain_http_only_to_loopback_and_keys_from_files() {
    // The client.
    for url in ["http://127.0.0.1:1", "http://[::1]:1", "http://localhost:1", "https://192.0.2.1"] {
        assert!(AssistClient::new(url).is_ok(), "{url}");
    }
    for url in ["http://192.0.2.1:8787", "http://assist.example.com", "ftp://127.0.0.1"] {
        assert!(matches!(AssistClient::new(url), Err(Error::InvalidInput(_))), "{url}");
    }
    let insecure = Connection { ca_pem: None, insecure_http: true };
    assert!(AssistClient::connect("http://192.0.2.1:8787", &insecure).is_ok());

    // The server refuses plain HTTP on an address that is not loopback unless told, and reads keys from files.
    let dir = tempfile::tempdir().unwrap();
    let exe = env!("CARGO_BIN_EXE_mobillm-server");
    let out = std::process::Command::new(exe)
        .args(["--bind", "0.0.0.0:0", "--admin-bind", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("a"))
        .env("MOBILLM_API_KEYS", KEY)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--insecure-http"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(exe)
        .args(["--data-dir"])
        .arg(dir.path().join("b"))
        .env_remove("MOBILLM_API_KEYS")
        .output()
        .unwrap();
    assert!(!out.status.success(), "no key, no server");
    let key_file = dir.path().join("keys");
    std::fs::write(&key_file, "from-a-file\n\n").unwrap();
    let mut child = std::process::Command::new(exe)
        .args(["--bind", "0.0.0.0:0", "--admin-bind", "127.0.0.1:0", "--insecure-http", "--api-key-file"])
        .arg(&key_file)
        .arg("--data-dir")
        .arg(dir.path().join("c"))
        .env_remove("MOBILLM_API_KEYS")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let port = line.trim().rsplit(':').next().unwrap().to_string();
    let addr = format!("127.0.0.1:{port}");
    let (status, _) = http(
        &addr,
        "POST",
        "/v1/sessions",
        &[("authorization", "Bearer from-a-file")],
        pae(1, 8).to_string().as_bytes(),
    );
    assert_eq!(status, 201);
    let (status, _) = http(
        &addr,
        "POST",
        "/v1/sessions",
        &[("authorization", &format!("Bearer {KEY}"))],
        pae(1, 8).to_string().as_bytes(),
    );
    assert_eq!(status, 401);
    child.kill().unwrap();
    child.wait().unwrap();
}
