//! The real server binary on 127.0.0.1, raw HTTP/1.1 over sockets (no client library of ours in the loop, so the
//! attacks are exactly what a hostile client sends), frames and process figures from `/proc`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mobillm_core::side::SampleId;
use mobillm_core::wire::{Frame, Quant};

pub const KEY: &str = "hostile-key";
pub const OTHER_KEY: &str = "hostile-other-key";
pub const ADMIN: &str = "hostile-admin";

pub struct Server {
    child: Child,
    pub api: String,
    pub admin: String,
    pub data: PathBuf,
    args: Vec<String>,
    probe: Probe,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.probe.report();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Measures `/healthz` every 50 ms while the attack runs, and prints the slowest answer when the test ends (a
/// figure for the record, not an assertion: tests never assert speed).
struct Probe {
    stop: Arc<AtomicBool>,
    /// The address to probe; empty while the server is down on purpose.
    target: Arc<Mutex<String>>,
    figures: Arc<Mutex<(f64, usize, usize)>>,
}

impl Probe {
    fn start(addr: &str) -> Probe {
        let probe = Probe {
            stop: Arc::new(AtomicBool::new(false)),
            target: Arc::new(Mutex::new(addr.to_string())),
            figures: Arc::new(Mutex::new((0.0, 0, 0))),
        };
        let (stop, target, figures) = (probe.stop.clone(), probe.target.clone(), probe.figures.clone());
        std::thread::spawn(move || {
            for _ in 0..20 * 600 {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let addr = target.lock().unwrap().clone();
                if !addr.is_empty() {
                    let t = Instant::now();
                    let ok = matches!(try_http(&addr, "GET", "/healthz", &[], b""), Ok((200, _)));
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    let mut f = figures.lock().unwrap();
                    if target.lock().unwrap().as_str() == addr {
                        f.0 = f.0.max(ms);
                        f.1 += 1;
                        f.2 += usize::from(!ok);
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        probe
    }

    fn retarget(&self, addr: &str) {
        *self.target.lock().unwrap() = addr.to_string();
    }

    fn report(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let (max_ms, probes, failures) = *self.figures.lock().unwrap();
        let test = std::thread::current().name().unwrap_or("?").to_string();
        eprintln!("[healthz] {test}: slowest {max_ms:.0} ms over {probes} probes, {failures} unanswered");
    }
}

fn spawn(data: &Path, args: &[String], nofile: Option<u64>) -> (Child, String, String) {
    let exe = env!("CARGO_BIN_EXE_mobillm-server");
    let mut cmd = match nofile {
        // The shell lowers the hard limit, so the server cannot raise it back.
        Some(n) => {
            let mut c = Command::new("sh");
            c.args(["-c", &format!("ulimit -n {n} && exec \"$0\" \"$@\""), exe]);
            c
        }
        None => Command::new(exe),
    };
    cmd.args(["--bind", "127.0.0.1:0", "--admin-bind", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .args(args)
        .env("MOBILLM_API_KEYS", format!("{KEY},{OTHER_KEY}"))
        .env("MOBILLM_ADMIN_TOKEN", ADMIN)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(data.with_extension("log")).unwrap());
    let mut child = cmd.spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let (mut api, mut admin) = (String::new(), String::new());
    out.read_line(&mut api).unwrap();
    out.read_line(&mut admin).unwrap();
    let Some(api) = api.trim().strip_prefix("listening on ").map(str::to_string) else {
        let _ = child.wait();
        panic!("the server did not start: {}", std::fs::read_to_string(data.with_extension("log")).unwrap_or_default());
    };
    let admin = admin.trim().strip_prefix("admin listening on ").unwrap().to_string();
    (child, api, admin)
}

impl Server {
    pub fn start(args: &[&str]) -> Server {
        Self::start_with(args, None)
    }

    /// With the process's file-descriptor limit at `nofile`.
    pub fn start_with(args: &[&str], nofile: Option<u64>) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let (child, api, admin) = spawn(&data, &args, nofile);
        let probe = Probe::start(&api);
        Server { child, api, admin, data, args, probe, _dir: Some(dir) }
    }

    /// kill -9, then start again on the same data.
    pub fn crash_and_restart(&mut self) {
        self.kill();
        self.start_again();
    }

    pub fn kill(&mut self) {
        self.probe.retarget("");
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn start_again(&mut self) {
        let (child, api, admin) = spawn(&self.data, &self.args, None);
        self.probe.retarget(&api);
        (self.child, self.api, self.admin) = (child, api, admin);
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Still running (not aborted).
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Sends SIGTERM and waits up to `limit` for the process to exit; true if it did.
    pub fn terminate(&mut self, limit: Duration) -> bool {
        self.probe.retarget("");
        Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().unwrap();
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn status_field(&self, field: &str) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<f64>().unwrap() / 1024.0
    }

    /// Resident memory now, MB.
    pub fn rss_mb(&self) -> f64 {
        self.status_field("VmRSS:")
    }

    /// Peak resident memory, MB.
    pub fn peak_rss_mb(&self) -> f64 {
        self.status_field("VmHWM:")
    }

    /// `/healthz` on the API listener answers `ok`.
    pub fn healthy(&self) -> bool {
        matches!(try_http(&self.api, "GET", "/healthz", &[], b""), Ok((200, body)) if body == b"ok")
    }

    /// Bytes of the store's files.
    pub fn disk_bytes(&self) -> u64 {
        std::fs::read_dir(&self.data).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
    }

    pub fn call(&self, method: &str, path: &str, token: &str, body: &[u8]) -> (u16, serde_json::Value) {
        let (status, body) = http(&self.api, method, path, &[("authorization", &format!("Bearer {token}"))], body);
        (status, serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null))
    }

    pub fn admin_get(&self, path: &str) -> (u16, String) {
        let (status, body) = http(&self.admin, "GET", path, &[("authorization", &format!("Bearer {ADMIN}"))], b"");
        (status, String::from_utf8_lossy(&body).to_string())
    }

    pub fn usage(&self) -> serde_json::Value {
        let (status, body) = self.admin_get("/admin/usage");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// A metric's value from `/metrics` (0 when absent).
    pub fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.admin_get("/metrics");
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
    }

    /// Creates a session with the API key; returns (id, token).
    pub fn create(&self, request: serde_json::Value) -> (String, String) {
        let (status, body) = self.call("POST", "/v1/sessions", KEY, request.to_string().as_bytes());
        assert_eq!(status, 201, "{body}");
        (body["session_id"].as_str().unwrap().into(), body["token"].as_str().unwrap().into())
    }
}

/// One HTTP/1.1 request with `Connection: close`; the whole answer (status, body). Write errors are ignored (a
/// server may answer before reading a body), and a read takes at most 30 s.
pub fn try_http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = s.write_all(head.as_bytes()).and_then(|_| s.write_all(body));
    read_response(&mut s)
}

pub fn read_response(s: &mut TcpStream) -> std::io::Result<(u16, Vec<u8>)> {
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or(std::io::ErrorKind::UnexpectedEof)?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or(std::io::ErrorKind::InvalidData)?;
    Ok((status, raw[split + 4..].to_vec()))
}

pub fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, Vec<u8>) {
    try_http(addr, method, path, headers, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// Deterministic values in [-1, 1).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = mobillm_core::testkit::Rng::new(seed);
    (0..n).map(|_| rng.unit()).collect()
}

pub fn ids(n: usize) -> Vec<SampleId> {
    (0..n).map(|_| SampleId::random().unwrap()).collect()
}

/// A Samples frame of `n` random samples.
pub fn samples_frame(n: usize, layers: usize, dim: usize, outputs: usize, quant: Quant) -> Vec<u8> {
    Frame::samples(ids(n), layers, dim, values(n * layers * dim, n as u64), outputs, values(n * outputs, 7))
        .encode(quant)
        .unwrap()
}

/// A `mobillm` step of `n` samples of `tokens` tokens each, labels in 0..2.
pub fn step_frame(n: usize, tokens: u32, layers: usize, dim: usize) -> Vec<u8> {
    let acts = values(n * tokens as usize * layers * dim, 3);
    let labels = (0..n as u32).map(|i| i % 2).collect();
    Frame::sequences(ids(n), layers, dim, acts, vec![tokens; n], labels, 2, vec![0.0; 2 * n])
        .encode(Quant::Int8)
        .unwrap()
}

/// A frame whose prefix and zstd body are as given (for frames no encoder of ours would write).
pub fn raw_frame(kind: u8, quant: u8, body: &[u8]) -> Vec<u8> {
    let mut out = b"MBLF".to_vec();
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&[kind, quant]);
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend(zstd::bulk::compress(body, 19).unwrap());
    out
}

/// The body of a Samples frame of `n` samples whose activation bytes are all `fill` (scales included).
pub fn samples_body(n: usize, layers: usize, dim: usize, outputs: usize, vector_bytes: usize, fill: u8) -> Vec<u8> {
    let mut body = Vec::new();
    for v in [n, layers, dim, outputs, 0] {
        body.extend_from_slice(&(v as u32).to_le_bytes());
    }
    ids(n).iter().for_each(|id| body.extend_from_slice(&id.0));
    body.extend(std::iter::repeat_n(fill, n * layers * vector_bytes));
    body.extend(std::iter::repeat_n(0u8, 4 * n * outputs));
    body
}

pub fn pae(layers: usize, dim: usize) -> serde_json::Value {
    serde_json::json!({"layers": layers, "dim": dim, "outputs": 8, "backbone": "hostile"})
}

pub fn mobillm(layers: usize, dim: usize, width: usize) -> serde_json::Value {
    serde_json::json!({"mode": "mobillm", "labels": 2, "layers": layers, "dim": dim, "outputs": 8,
                       "backbone": "hostile", "width": width, "rank": 8, "batch_size": 16})
}

/// Polls `done` every 50 ms, at most `limit` long; true once it holds.
pub fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
