//! Connections: bodies are not read before the credentials are checked (row 6), slow and idle connections are
//! closed and a connection cap keeps the server answering (row 7), a claimed body past the limit is refused at
//! once (row 8).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::support::*;

fn open(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

#[test]
fn bodies_wait_for_the_credentials_and_their_declared_size_is_checked_first() {
    let mut server = Server::start(&[]);
    let (id, token) = server.create(pae(30, 576));
    let before = server.rss_mb();
    // Row 6: 100 connections declare 15 MiB bodies with a wrong token and send 64 KB of them; each is answered
    // 401 at once, with the rest of its body never read.
    let chunk = vec![7u8; 64 << 10];
    let mut held: Vec<TcpStream> = (0..100)
        .map(|_| {
            let mut s = open(&server.api);
            let head = format!(
                "PUT /v1/sessions/{id}/samples HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\nContent-Length: {}\r\n\r\n",
                15 << 20
            );
            s.write_all(head.as_bytes()).unwrap();
            let _ = s.write_all(&chunk);
            s
        })
        .collect();
    for s in &mut held {
        let mut first = [0u8; 12];
        s.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"HTTP/1.1 401");
    }
    let grown = server.rss_mb() - before;
    assert!(grown < 100.0, "100 unauthenticated bodies grew the server by {grown:.0} MB");
    drop(held);
    // Row 8: a valid token and a claimed terabyte with no body: 413 at once, for frames and JSON alike.
    for (path, auth) in [(format!("/v1/sessions/{id}/samples"), token.as_str()), ("/v1/sessions".to_string(), KEY)] {
        let mut s = open(&server.api);
        let head = format!(
            "PUT {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {auth}\r\nContent-Length: {}\r\n\r\n",
            1u64 << 40
        )
        .replace("PUT /v1/sessions HTTP", "POST /v1/sessions HTTP");
        s.write_all(head.as_bytes()).unwrap();
        let (status, body) = read_response(&mut s).unwrap();
        assert_eq!(status, 413, "{path}: {}", String::from_utf8_lossy(&body));
    }
    assert!(server.alive() && server.healthy());
}

#[test]
fn slow_and_idle_connections_are_closed_and_the_cap_keeps_health_answering() {
    // Row 7, at a file-descriptor limit of 256: the cap (1024 by default) is lowered to 128 to fit it.
    let mut server = Server::start_with(&["--header-timeout-secs", "2", "--body-timeout-secs", "3"], Some(256));
    let (id, token) = server.create(pae(1, 8));
    // Half-sent headers and bodies that trickle in.
    let mut half: Vec<TcpStream> = (0..300)
        .filter_map(|_| {
            let mut s = TcpStream::connect(&server.api).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
            s.write_all(b"PUT /v1/sessions/x/samples HTTP/1.1\r\nHost: x\r\n").ok()?;
            Some(s)
        })
        .collect();
    let mut trickle: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = open(&server.api);
            let head = format!(
                "PUT /v1/sessions/{id}/samples HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 1000\r\n\r\n"
            );
            s.write_all(head.as_bytes()).unwrap();
            s
        })
        .collect();
    // Health keeps answering throughout: the connection idle longest makes room for each newcomer.
    for _ in 0..20 {
        assert!(server.healthy(), "/healthz did not answer under 320 slow connections");
        for s in &mut trickle {
            let _ = s.write_all(b"x");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Within the timeouts every slow connection is closed by the server: EOF, reset, or a 408.
    for s in half.iter_mut().chain(&mut trickle) {
        let mut rest = Vec::new();
        match s.read_to_end(&mut rest) {
            Ok(_) => {
                assert!(rest.is_empty() || rest.starts_with(b"HTTP/1.1 408"), "{}", String::from_utf8_lossy(&rest))
            }
            Err(e) => assert!(
                matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe),
                "the server held a slow connection open: {e}"
            ),
        }
    }
    assert!(eventually(Duration::from_secs(10), || server.metric("mobillm_connections_open") <= 2.0));
    assert!(server.metric("mobillm_connections_evicted_total") > 0.0);
    assert!(server.alive() && server.healthy());
    let (_, st) = server.call("GET", &format!("/v1/sessions/{id}"), &token, b"");
    assert_eq!(st["samples"], 0, "no trickled body was stored");
}
