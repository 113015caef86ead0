//! The device's client for the assist server (blocking: call it from a background thread, as the FFI does).
//! Uploads go in chunks; a chunk that fails on the network or with a 5xx is retried with backoff, and because
//! uploads are idempotent per sample id, retrying or re-running an interrupted upload never duplicates samples.
//!
//! HTTPS goes through rustls (`ring` provider). By default the server's certificate is checked against the
//! platform's trust store (rustls-platform-verifier); [`AssistClient::with_ca`] trusts exactly one given CA
//! instead, which is what a self-hosted assist server with a private CA (and the tests) need.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::side::{weights_file, SampleId};
use crate::wire::{Frame, FrameKind, Limits, Mode, Quant};

/// What the device asks the server for when it creates a session.
#[derive(Debug, Clone, Serialize)]
pub struct SessionRequest {
    pub mode: Mode,
    /// K, sent in `mobillm` mode only (in `pae` mode the server never learns the number of labels).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<usize>,
    pub layers: usize,
    pub dim: usize,
    pub outputs: usize,
    pub backbone: String,
    pub width: usize,
    pub rank: usize,
    pub lr: f64,
    pub batch_size: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub session_id: String,
    pub token: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Job {
    pub status: String,
    pub epochs_total: usize,
    pub epochs_done: usize,
    pub loss: Option<f64>,
    pub message: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Status {
    pub samples: usize,
    pub job: Job,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct UploadAck {
    pub stored: usize,
    pub duplicates: usize,
    pub total: usize,
}

/// The server's answer to a `mobillm`-mode training step.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct StepAck {
    /// Mean cross-entropy over the frame's mini-batches.
    pub loss: f64,
    pub samples: usize,
    /// Step requests the session has trained on so far.
    pub steps: usize,
}

pub struct AssistClient {
    http: reqwest::blocking::Client,
    base: String,
    retries: usize,
}

impl AssistClient {
    /// A client for `base_url` (`http://…` or `https://…`) that trusts the platform's certificate authorities.
    pub fn new(base_url: &str) -> Result<Self> {
        Self::build(base_url, None)
    }

    /// A client that trusts only the CA certificate (PEM) given, for servers with a private CA.
    pub fn with_ca(base_url: &str, ca_pem: &[u8]) -> Result<Self> {
        Self::build(base_url, Some(ca_pem))
    }

    fn build(base_url: &str, ca_pem: Option<&[u8]>) -> Result<Self> {
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(Error::InvalidInput(format!("server URL {base_url:?} must start with http:// or https://")));
        }
        // The process-wide rustls provider; an app that installed one already keeps its own.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::blocking::Client::builder().timeout(Duration::from_secs(120));
        if let Some(pem) = ca_pem {
            let ca =
                reqwest::Certificate::from_pem(pem).map_err(|e| Error::InvalidInput(format!("CA certificate: {e}")))?;
            builder = builder.tls_certs_only([ca]);
        }
        let http = builder.build().map_err(|e| Error::Network(e.to_string()))?;
        Ok(Self { http, base: base_url.trim_end_matches('/').to_string(), retries: 4 })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a request built by `build`, retrying network failures and 5xx answers with exponential backoff.
    fn send(&self, build: impl Fn() -> reqwest::blocking::RequestBuilder) -> Result<reqwest::blocking::Response> {
        let mut delay = Duration::from_millis(200);
        let mut attempt = 0;
        loop {
            let outcome = build().send();
            let retryable = match &outcome {
                Ok(r) => r.status().is_server_error(),
                Err(e) => e.is_connect() || e.is_timeout() || e.is_request(),
            };
            if !retryable || attempt == self.retries {
                let resp = outcome.map_err(|e| Error::Network(e.to_string()))?;
                return check(resp);
            }
            attempt += 1;
            std::thread::sleep(delay);
            delay *= 2;
        }
    }

    pub fn create_session(&self, api_key: &str, req: &SessionRequest) -> Result<Session> {
        let resp = self.send(|| self.http.post(self.url("/v1/sessions")).bearer_auth(api_key).json(req))?;
        resp.json().map_err(|e| Error::Network(format!("session reply: {e}")))
    }

    pub fn upload_frame(&self, s: &Session, bytes: &[u8]) -> Result<UploadAck> {
        let url = self.url(&format!("/v1/sessions/{}/samples", s.session_id));
        let resp = self.send(|| self.http.put(&url).bearer_auth(&s.token).body(bytes.to_vec()))?;
        resp.json().map_err(|e| Error::Network(format!("upload reply: {e}")))
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

    pub fn upload_targets(&self, s: &Session, ids: &[SampleId], values: &[f32], width: usize) -> Result<u64> {
        let bytes = Frame::rows(FrameKind::Targets, ids.to_vec(), width, values.to_vec()).encode(Quant::F16)?;
        let url = self.url(&format!("/v1/sessions/{}/targets", s.session_id));
        self.send(|| self.http.put(&url).bearer_auth(&s.token).body(bytes.clone()))?;
        Ok(bytes.len() as u64)
    }

    /// `mobillm` mode: sends one encoded Sequences frame; the server trains on it at once and answers with the loss.
    pub fn train_step(&self, s: &Session, frame: &[u8]) -> Result<StepAck> {
        let url = self.url(&format!("/v1/sessions/{}/steps", s.session_id));
        let resp = self.send(|| self.http.post(&url).bearer_auth(&s.token).body(frame.to_vec()))?;
        resp.json().map_err(|e| Error::Network(format!("step reply: {e}")))
    }

    pub fn train(&self, s: &Session, epochs: usize) -> Result<()> {
        let url = self.url(&format!("/v1/sessions/{}/train", s.session_id));
        self.send(|| self.http.post(&url).bearer_auth(&s.token).json(&serde_json::json!({"epochs": epochs})))?;
        Ok(())
    }

    pub fn status(&self, s: &Session) -> Result<Status> {
        let url = self.url(&format!("/v1/sessions/{}", s.session_id));
        self.send(|| self.http.get(&url).bearer_auth(&s.token))?
            .json()
            .map_err(|e| Error::Network(format!("status: {e}")))
    }

    /// Polls until the training job ends; `progress` sees every poll. A failed job is an error.
    pub fn wait_trained(&self, s: &Session, poll: Duration, mut progress: impl FnMut(&Job)) -> Result<Status> {
        loop {
            let st = self.status(s)?;
            progress(&st.job);
            match st.job.status.as_str() {
                "done" => return Ok(st),
                "failed" => {
                    return Err(Error::Server {
                        status: 500,
                        code: "training_failed".into(),
                        message: st.job.message.unwrap_or_default(),
                    })
                }
                _ => std::thread::sleep(poll),
            }
        }
    }

    /// The server's current outputs per sample (K' values each).
    pub fn outputs(&self, s: &Session) -> Result<Vec<(SampleId, Vec<f32>)>> {
        let url = self.url(&format!("/v1/sessions/{}/outputs", s.session_id));
        let bytes = self
            .send(|| self.http.get(&url).bearer_auth(&s.token))?
            .bytes()
            .map_err(|e| Error::Network(e.to_string()))?;
        let (frame, _) = Frame::decode(&bytes, &Limits { max_samples: 1 << 20, ..Limits::default() })?;
        if frame.kind != FrameKind::Outputs {
            return Err(Error::Frame(format!("expected outputs, got {:?}", frame.kind)));
        }
        let width = frame.width.max(1);
        Ok(frame.ids.into_iter().zip(frame.values.chunks(width).map(<[f32]>::to_vec)).collect())
    }

    /// The trained side network's parameters, in server coordinates (fold them with the session's secrets).
    pub fn adapter(&self, s: &Session) -> Result<weights_file::Named> {
        let url = self.url(&format!("/v1/sessions/{}/adapter", s.session_id));
        let bytes = self
            .send(|| self.http.get(&url).bearer_auth(&s.token))?
            .bytes()
            .map_err(|e| Error::Network(e.to_string()))?;
        // An adapter is a few MB; 256 MB bounds a hostile answer.
        let raw = zstd::bulk::decompress(&bytes, 256 << 20).map_err(|e| Error::Frame(format!("adapter: {e}")))?;
        let (tensors, _) = weights_file::from_bytes(&raw).map_err(|e| Error::Frame(format!("adapter: {e}")))?;
        Ok(tensors)
    }

    pub fn delete(&self, s: &Session) -> Result<()> {
        let url = self.url(&format!("/v1/sessions/{}", s.session_id));
        self.send(|| self.http.delete(&url).bearer_auth(&s.token))?;
        Ok(())
    }
}

fn check(resp: reqwest::blocking::Response) -> Result<reqwest::blocking::Response> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status().as_u16();
    let body: serde_json::Value = resp.json().unwrap_or(serde_json::Value::Null);
    Err(Error::Server {
        status,
        code: body["code"].as_str().unwrap_or("unknown").to_string(),
        message: body["message"].as_str().unwrap_or("").to_string(),
    })
}
