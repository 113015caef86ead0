//! The device's client for the assist server (blocking: call it from a background thread, as the FFI does).
//!
//! Every request is safe to repeat, so every request is retried on a network failure, a 5xx, a `429` or a `503`
//! (honouring `Retry-After`): uploads and target updates are idempotent per sample id, reads and deletes are
//! idempotent by nature, and each `POST` carries an `Idempotency-Key` that the server answers with the first
//! outcome (a retried create returns the same session, a retried training step is not trained twice). Response
//! bodies are read up to a bound fixed by what the answer can hold, and waiting for training has a deadline.
//!
//! HTTPS goes through rustls (`ring` provider). By default the server's certificate is checked against the
//! platform's trust store (rustls-platform-verifier); a given CA (PEM) is trusted exclusively instead, which is
//! what a self-hosted assist server with a private CA (and the tests) need. Plain `http://` is refused for any
//! host but loopback unless the caller opts in (an emulator reaching its host, for instance).

use std::io::Read;
use std::time::{Duration, Instant};

use rand::TryRngCore;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::protocol::{
    CreateSession, ErrorBody, JobState, JobStatus, SessionCreated, SessionStatus, StepAck, TargetsAck, TrainRequest,
    UploadAck, IDEMPOTENCY_KEY,
};
use crate::side::{weights_file, SampleId};
use crate::wire::{Frame, FrameKind, Limits, Quant};

/// Largest JSON answer the client reads.
const MAX_JSON_BYTES: u64 = 1 << 20;
/// Largest adapter download (compressed); a side network is a few MB.
const MAX_ADAPTER_BYTES: u64 = 256 << 20;
/// Attempts per request, and the longest pause between two.
const ATTEMPTS: usize = 6;
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A session on the assist server: its id, bearer token (never printed by `Debug`), the samples it may hold and
/// the seconds without a request after which the server deletes it.
#[derive(Clone, PartialEq, Eq)]
pub struct Session {
    pub session_id: String,
    pub token: String,
    pub max_samples: usize,
    pub idle_ttl_s: u64,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("session_id", &self.session_id)
            .field("token", &"<redacted>")
            .field("max_samples", &self.max_samples)
            .field("idle_ttl_s", &self.idle_ttl_s)
            .finish()
    }
}

/// How the client reaches the server.
#[derive(Clone, Default)]
pub struct Connection {
    /// Trust only this CA (PEM) for HTTPS; `None` uses the platform's trust store.
    pub ca_pem: Option<Vec<u8>>,
    /// Allow plain `http://` to hosts other than loopback. Off by default: activations and tokens would cross
    /// the network in the clear.
    pub insecure_http: bool,
}

pub struct AssistClient {
    http: reqwest::blocking::Client,
    base: String,
}

impl AssistClient {
    /// A client for `base_url` that trusts the platform's certificate authorities.
    pub fn new(base_url: &str) -> Result<Self> {
        Self::connect(base_url, &Connection::default())
    }

    /// A client that trusts only the CA certificate (PEM) given, for servers with a private CA.
    pub fn with_ca(base_url: &str, ca_pem: &[u8]) -> Result<Self> {
        Self::connect(base_url, &Connection { ca_pem: Some(ca_pem.to_vec()), insecure_http: false })
    }

    pub fn connect(base_url: &str, connection: &Connection) -> Result<Self> {
        let url =
            reqwest::Url::parse(base_url).map_err(|e| Error::InvalidInput(format!("server URL {base_url:?}: {e}")))?;
        match url.scheme() {
            "https" => {}
            "http" if connection.insecure_http || is_loopback(&url) => {}
            "http" => {
                return Err(Error::InvalidInput(format!(
                    "server URL {base_url:?} is plain http to a host that is not loopback: use https (or opt in to \
                     insecure http for a development setup)"
                )))
            }
            other => return Err(Error::InvalidInput(format!("server URL {base_url:?}: unsupported scheme {other:?}"))),
        }
        // The process-wide rustls provider; an app that installed one already keeps its own.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120));
        if let Some(pem) = &connection.ca_pem {
            let ca =
                reqwest::Certificate::from_pem(pem).map_err(|e| Error::InvalidInput(format!("CA certificate: {e}")))?;
            builder = builder.tls_certs_only([ca]);
        }
        let http = builder.build().map_err(|e| Error::Network(e.to_string()))?;
        Ok(Self { http, base: base_url.trim_end_matches('/').to_string() })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn session_url(&self, s: &Session, tail: &str) -> String {
        self.url(&format!("/v1/sessions/{}{tail}", s.session_id))
    }

    /// Sends a request built by `build` (called once per attempt), retrying what may be retried; any other
    /// error answer becomes [`Error::Server`].
    fn send(&self, build: impl Fn() -> reqwest::blocking::RequestBuilder) -> Result<reqwest::blocking::Response> {
        let mut delay = Duration::from_millis(200);
        for attempt in 1..=ATTEMPTS {
            let last = attempt == ATTEMPTS;
            match build().send() {
                Ok(resp) if resp.status().is_success() => return Ok(resp),
                Ok(resp) => {
                    let status = resp.status();
                    let retryable = status.is_server_error() || status.as_u16() == 429;
                    if !retryable || last {
                        return Err(server_error(resp));
                    }
                    let wait = retry_after(&resp).unwrap_or(delay).min(MAX_BACKOFF);
                    drop(resp);
                    std::thread::sleep(wait);
                }
                Err(e) if last || !(e.is_connect() || e.is_timeout() || e.is_request() || e.is_body()) => {
                    return Err(Error::Network(e.to_string()))
                }
                Err(_) => std::thread::sleep(delay),
            }
            delay = (delay * 2).min(MAX_BACKOFF);
        }
        unreachable!("the last attempt returns")
    }

    fn json<T: DeserializeOwned>(&self, resp: reqwest::blocking::Response, what: &str) -> Result<T> {
        let bytes = read_bounded(resp, MAX_JSON_BYTES, what)?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Network(format!("unreadable {what} answer: {e}")))
    }

    /// Creates a session. Retrying with the same idempotency key returns the same session.
    pub fn create_session(&self, api_key: &str, req: &CreateSession) -> Result<Session> {
        let key = idempotency_key()?;
        let resp = self.send(|| {
            self.http.post(self.url("/v1/sessions")).bearer_auth(api_key).header(IDEMPOTENCY_KEY, &key).json(req)
        })?;
        let created: SessionCreated = self.json(resp, "session")?;
        Ok(Session {
            session_id: created.session_id,
            token: created.token,
            max_samples: created.max_samples,
            idle_ttl_s: created.idle_ttl_s,
        })
    }

    pub fn upload_frame(&self, s: &Session, bytes: &[u8]) -> Result<UploadAck> {
        let url = self.session_url(s, "/samples");
        let resp = self.send(|| self.http.put(&url).bearer_auth(&s.token).body(bytes.to_vec()))?;
        self.json(resp, "upload")
    }

    /// Uploads samples (`activations`: n × layers × dim, `targets`: n × width) in frames of `chunk` samples.
    /// Returns the bytes sent; `progress(done, total)` follows the chunks.
    #[allow(clippy::too_many_arguments)]
    pub fn upload_samples(
        &self,
        s: &Session,
        ids: &[SampleId],
        activations: &[f32],
        targets: &[f32],
        (layers, dim, width): (usize, usize, usize),
        quant: Quant,
        chunk: usize,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<u64> {
        let (per_a, n) = (layers * dim, ids.len());
        if activations.len() != n * per_a || targets.len() != n * width {
            return Err(Error::InvalidInput(format!(
                "{n} ids with {} activations and {} targets",
                activations.len(),
                targets.len()
            )));
        }
        let mut sent = 0u64;
        for start in (0..n).step_by(chunk.max(1)) {
            let end = (start + chunk.max(1)).min(n);
            let frame = Frame::samples(
                ids[start..end].to_vec(),
                layers,
                dim,
                activations[start * per_a..end * per_a].to_vec(),
                width,
                targets[start * width..end * width].to_vec(),
            );
            let bytes = frame.encode(quant)?;
            self.upload_frame(s, &bytes)?;
            sent += bytes.len() as u64;
            progress(end, n);
        }
        Ok(sent)
    }

    /// Replaces the targets of uploaded samples (all or nothing). Returns the bytes sent.
    pub fn upload_targets(&self, s: &Session, ids: &[SampleId], values: &[f32], width: usize) -> Result<u64> {
        let bytes = Frame::rows(FrameKind::Targets, ids.to_vec(), width, values.to_vec()).encode(Quant::F16)?;
        let url = self.session_url(s, "/targets");
        let ack: TargetsAck =
            self.json(self.send(|| self.http.put(&url).bearer_auth(&s.token).body(bytes.clone()))?, "targets")?;
        if ack.updated != ids.len() {
            return Err(Error::Protocol(format!("the server updated {} of {} targets", ack.updated, ids.len())));
        }
        Ok(bytes.len() as u64)
    }

    /// `mobillm` mode: sends one encoded Sequences frame; the server trains on it at once and answers with the
    /// loss. A retry after a lost answer gets the first answer back instead of a second optimiser step.
    pub fn train_step(&self, s: &Session, frame: &[u8]) -> Result<StepAck> {
        let url = self.session_url(s, "/steps");
        let key = idempotency_key()?;
        let resp = self
            .send(|| self.http.post(&url).bearer_auth(&s.token).header(IDEMPOTENCY_KEY, &key).body(frame.to_vec()))?;
        self.json(resp, "step")
    }

    /// Asks the server to train `epochs` more epochs from the current weights (the job is queued, then runs).
    pub fn train(&self, s: &Session, epochs: usize) -> Result<JobState> {
        self.train_keyed(s, epochs, false, &idempotency_key()?)
    }

    /// [`AssistClient::train`] with the caller's idempotency key: asked again with the same key (after a crash,
    /// say), the server answers with the job that key started instead of starting another. `from_scratch` trains
    /// from the session's initial weights instead.
    pub fn train_keyed(&self, s: &Session, epochs: usize, from_scratch: bool, key: &str) -> Result<JobState> {
        let url = self.session_url(s, "/train");
        let req = TrainRequest { epochs, from_scratch };
        let resp = self.send(|| self.http.post(&url).bearer_auth(&s.token).header(IDEMPOTENCY_KEY, key).json(&req))?;
        Ok(self.json::<crate::protocol::TrainAccepted>(resp, "train")?.job)
    }

    pub fn status(&self, s: &Session) -> Result<SessionStatus> {
        let url = self.session_url(s, "");
        self.json(self.send(|| self.http.get(&url).bearer_auth(&s.token))?, "status")
    }

    /// Polls until the training job ends, at most `deadline` long. `on_poll` sees every poll and may stop the
    /// wait by returning an error (a cancel, say). A failed job is [`Error::TrainingFailed`].
    pub fn wait_trained(
        &self,
        s: &Session,
        poll: Duration,
        deadline: Duration,
        mut on_poll: impl FnMut(&JobState) -> Result<()>,
    ) -> Result<SessionStatus> {
        let started = Instant::now();
        loop {
            let st = self.status(s)?;
            on_poll(&st.job)?;
            match st.job.status {
                JobStatus::Done => return Ok(st),
                JobStatus::Failed => return Err(Error::TrainingFailed(st.job.message.unwrap_or_default())),
                JobStatus::Idle => {
                    return Err(Error::Protocol("the server reports no training job for this session".into()))
                }
                JobStatus::Queued | JobStatus::Running if started.elapsed() >= deadline => {
                    return Err(Error::Network(format!(
                        "training did not finish within {} s ({} of {} epochs done)",
                        deadline.as_secs(),
                        st.job.epochs_done,
                        st.job.epochs_total
                    )))
                }
                JobStatus::Queued | JobStatus::Running => std::thread::sleep(poll),
            }
        }
    }

    /// The server's current outputs per sample (`width` values each) for a session of `samples` samples.
    pub fn outputs(&self, s: &Session, samples: usize, width: usize) -> Result<Vec<(SampleId, Vec<f32>)>> {
        let url = self.session_url(s, "/outputs");
        let resp = self.send(|| self.http.get(&url).bearer_auth(&s.token))?;
        // 40 bytes of counts and prefix, then per sample its id and its values; zstd never grows data by much.
        let decoded = 64 + samples * (16 + 4 * width);
        let bytes = read_bounded(resp, (decoded + decoded / 8 + 4096) as u64, "outputs")?;
        let limits = Limits {
            max_decoded_bytes: decoded,
            max_samples: samples,
            max_width: width,
            max_layers: 0,
            max_dim: 0,
            max_tokens: 0,
            ..Limits::default()
        };
        let (frame, _) = Frame::decode(&bytes, &limits)?;
        if frame.kind != FrameKind::Outputs || frame.width != width {
            return Err(Error::Protocol(format!(
                "expected outputs of width {width}, got a {:?} frame of width {}",
                frame.kind, frame.width
            )));
        }
        Ok(frame.ids.into_iter().zip(frame.values.chunks(width).map(<[f32]>::to_vec)).collect())
    }

    /// The trained side network's parameters, in server coordinates (fold them with the session's secrets).
    pub fn adapter(&self, s: &Session) -> Result<weights_file::Named> {
        let url = self.session_url(s, "/adapter");
        let bytes =
            read_bounded(self.send(|| self.http.get(&url).bearer_auth(&s.token))?, MAX_ADAPTER_BYTES, "adapter")?;
        let raw = zstd::bulk::decompress(&bytes, 4 * MAX_ADAPTER_BYTES as usize)
            .map_err(|e| Error::Protocol(format!("adapter: {e}")))?;
        // Three copies of the network at once (compressed, raw, parsed) were one of the device's peaks.
        drop(bytes);
        let (tensors, _) = weights_file::from_bytes(&raw).map_err(|e| Error::Protocol(format!("adapter: {e}")))?;
        Ok(tensors)
    }

    /// Deletes the session and everything it holds on the server. A session already gone counts as deleted.
    pub fn delete(&self, s: &Session) -> Result<()> {
        let url = self.session_url(s, "");
        match self.send(|| self.http.delete(&url).bearer_auth(&s.token)) {
            Ok(_) | Err(Error::Server { status: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn is_loopback(url: &reqwest::Url) -> bool {
    let host = url.host_str().unwrap_or("");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A fresh random key for one logical request, reused by its retries.
pub fn idempotency_key() -> Result<String> {
    let mut b = [0u8; 16];
    rand::rngs::OsRng.try_fill_bytes(&mut b).map_err(|e| Error::InvalidInput(format!("OS RNG: {e}")))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Seconds of a `Retry-After` header (the server sends whole seconds).
fn retry_after(resp: &reqwest::blocking::Response) -> Option<Duration> {
    let v = resp.headers().get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Reads a body of at most `limit` bytes; a longer one is an error, not a larger allocation.
fn read_bounded(resp: reqwest::blocking::Response, limit: u64, what: &str) -> Result<Vec<u8>> {
    if resp.content_length().is_some_and(|n| n > limit) {
        return Err(Error::Protocol(format!("the {what} answer is larger than {limit} bytes")));
    }
    let mut out = Vec::new();
    resp.take(limit + 1).read_to_end(&mut out).map_err(|e| Error::Network(format!("{what} answer: {e}")))?;
    if out.len() as u64 > limit {
        return Err(Error::Protocol(format!("the {what} answer is larger than {limit} bytes")));
    }
    Ok(out)
}

/// An error answer as [`Error::Server`], its body read up to a bound.
fn server_error(resp: reqwest::blocking::Response) -> Error {
    let status = resp.status().as_u16();
    let body = read_bounded(resp, 64 << 10, "error").ok();
    let parsed: Option<ErrorBody> = body.as_deref().and_then(|b| serde_json::from_slice(b).ok());
    let (code, message) = match parsed {
        Some(e) => (e.code, e.message),
        None => ("unknown".to_string(), String::new()),
    };
    Error::Server { status, code, message }
}
