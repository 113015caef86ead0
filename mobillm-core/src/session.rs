//! The whole device side of a fine-tune (design §1, §4, §5), in either mode:
//!
//! * `pae` (default): every training example is forwarded once, in padded batches sorted by length; its pivot
//!   activations are normalised, rotated by the session's secrets, quantised and uploaded with its first target
//!   `Q·[τ(onehot − softmax(z_b)); 0]` while the next batch computes (a second thread uploads). The server trains;
//!   meanwhile the device forwards the held-out set. Each refinement round downloads the server's outputs, decodes
//!   them, and uploads new targets only. Finally the device downloads the adapter, folds its secrets in, evaluates
//!   and keeps the result as a [`DeviceAdapter`].
//! * `mobillm`: no secrets, labels on the server. Every epoch the device forwards every example again and sends
//!   all tokens' activations of every tapped layer with the label and the backbone's label logits; the server takes
//!   one optimiser step per frame (one forward batch).
//!
//! The device never keeps the training activations (2400 samples × 30 layers × 576 floats would be 166 MB): only
//! the label logits `z_b` and the random sample ids, which is all later rounds need. The server session is
//! deleted when the fine-tune ends, fails or is cancelled (unless asked to keep it), so no activation outlives it.
//! A cancelled fine-tune returns [`Error::Cancelled`] within one batch or one poll.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::backbone::Backbone;
use crate::client::{AssistClient, Connection, Session};
use crate::dataset::Example;
use crate::error::{Error, Result};
use crate::protocol::{CreateSession, Mode};
use crate::side::targets::{accuracy, predict, prediction_differences};
use crate::side::{normalize_taps, weights_file, DeviceAdapter, SampleId, Secrets, SideConfig, SideNet};
use crate::task::{Task, TaskSpec};
use crate::wire::{Frame, Quant};

/// Everything a fine-tune needs besides the backbone, the task and the data. `Default` gives the measured
/// defaults (docs/side-network.md) against a server on `http://127.0.0.1:8787`. `Debug` never prints the API key.
#[derive(Clone)]
pub struct SessionConfig {
    pub server_url: String,
    pub api_key: String,
    /// Trust only this CA (PEM) for HTTPS; `None` uses the platform's trust store.
    pub ca_pem: Option<Vec<u8>>,
    /// Allow plain `http://` to a host that is not loopback (development only: an emulator reaching its host).
    pub insecure_http: bool,
    pub mode: Mode,
    /// Tapped blocks; `None` taps them all.
    pub taps: Option<Vec<usize>>,
    pub width: usize,
    pub rank: usize,
    pub lr: f64,
    /// Largest server mini-batch (`pae`): a small data set gets `n/8` (at least 16), so every epoch takes at least
    /// 8 optimiser steps (measured: 256 examples reach 93% after one round at 32, 78.5% at 128). In `mobillm` mode
    /// a step is one forward batch.
    pub batch_size: usize,
    pub seed: u64,
    /// `pae`: server epochs per round. `mobillm`: passes over the data, each a new device forward.
    pub epochs: usize,
    /// `pae` refinement rounds.
    pub rounds: usize,
    pub tau: f64,
    pub quant: Quant,
    /// Examples per device forward.
    pub forward_batch: usize,
    /// Samples per `pae` upload frame.
    pub upload_chunk: usize,
    /// `pae` only: rotate with secret matrices (on by default; off only to measure what they protect).
    pub secrets: bool,
    /// Keep the server session after the fine-tune (for inspection); by default it is deleted.
    pub keep_server_session: bool,
    /// How often to ask the server about training progress.
    pub poll: Duration,
    /// How long one round of server training (queue included) may take before the fine-tune gives up.
    pub max_train_wait: Duration,
}

impl std::fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionConfig")
            .field("server_url", &self.server_url)
            .field("api_key", &"<redacted>")
            .field("ca_pem", &self.ca_pem.as_ref().map(|p| format!("{} bytes", p.len())))
            .field("insecure_http", &self.insecure_http)
            .field("mode", &self.mode)
            .field("taps", &self.taps)
            .field("width", &self.width)
            .field("rank", &self.rank)
            .field("lr", &self.lr)
            .field("batch_size", &self.batch_size)
            .field("seed", &self.seed)
            .field("epochs", &self.epochs)
            .field("rounds", &self.rounds)
            .field("tau", &self.tau)
            .field("quant", &self.quant)
            .field("forward_batch", &self.forward_batch)
            .field("upload_chunk", &self.upload_chunk)
            .field("secrets", &self.secrets)
            .field("keep_server_session", &self.keep_server_session)
            .field("poll", &self.poll)
            .field("max_train_wait", &self.max_train_wait)
            .finish()
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            server_url: "http://127.0.0.1:8787".into(),
            api_key: String::new(),
            ca_pem: None,
            insecure_http: false,
            mode: Mode::Pae,
            taps: None,
            width: 128,
            rank: 16,
            lr: 3e-3,
            batch_size: 128,
            seed: 0,
            epochs: 10,
            rounds: 3,
            tau: crate::side::targets::DEFAULT_TAU,
            quant: Quant::Int8,
            forward_batch: 16,
            upload_chunk: 64,
            secrets: true,
            keep_server_session: false,
            poll: Duration::from_millis(250),
            max_train_wait: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Drawing the session's secret matrices.
    Secrets,
    /// Device forward of the training examples (and upload, overlapped).
    Forward,
    /// Server training; `done`/`total` count epochs (`pae`) or steps (`mobillm`).
    Train,
    /// Sending refinement targets.
    Targets,
    /// Device forward of the held-out examples and scoring.
    Evaluate,
    Done,
}

/// What a progress listener hears: the phase, its progress, the refinement round (`pae`) or epoch (`mobillm`),
/// and the latest training loss.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Progress {
    pub phase: Phase,
    pub done: usize,
    pub total: usize,
    pub round: usize,
    pub loss: Option<f64>,
}

/// Cancels a running fine-tune from any thread.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            return Err(Error::Cancelled);
        }
        Ok(())
    }
}

/// The result of a fine-tune.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub mode: Mode,
    pub adapter: DeviceAdapter,
    pub train_samples: usize,
    pub test_samples: usize,
    /// Held-out accuracy of the backbone alone and with the adapter (`None` without held-out examples).
    pub zero_shot_acc: Option<f64>,
    pub finetuned_acc: Option<f64>,
    /// Bytes of every frame the device sent (activations, targets).
    pub upload_bytes: u64,
    /// Seconds the device spent in backbone forwards of training examples.
    pub device_forward_s: f64,
    /// Seconds between asking the server to train and its reporting done, summed over rounds (`pae`); the
    /// server's step time as seen by the device (`mobillm`).
    pub server_train_s: f64,
    pub wall_s: f64,
    /// Held-out accuracy after each refinement round (`pae`) or pass over the data (`mobillm`), with the time
    /// since the fine-tune started (for time-to-accuracy); empty without held-out examples.
    pub rounds: Vec<RoundReport>,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RoundReport {
    pub round: usize,
    pub finetuned_acc: f64,
    pub elapsed_s: f64,
}

/// Deletes the server session when dropped (end, error or cancel), unless asked to keep it.
struct ServerSession<'a> {
    client: &'a AssistClient,
    session: Session,
    keep: bool,
}

impl Drop for ServerSession<'_> {
    fn drop(&mut self) {
        if !self.keep {
            if let Err(e) = self.client.delete(&self.session) {
                warn(&format!("could not delete server session {}: {e}", self.session.session_id));
            }
        }
    }
}

// The core crate has no logging dependency; a failed clean-up is reported on stderr, never silently.
fn warn(message: &str) {
    eprintln!("mobillm: warning: {message}");
}

/// Runs a whole fine-tune: see the module documentation. `test` may be empty (no evaluation).
pub fn fine_tune(
    backbone: &Backbone,
    spec: TaskSpec,
    train: &[Example],
    test: &[Example],
    cfg: &SessionConfig,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Outcome> {
    let started = Instant::now();
    let task = Task::new(spec, backbone.tokenizer())?;
    if train.is_empty() {
        return Err(Error::InvalidInput("no training examples".into()));
    }
    let labels = label_indices(&task, train)?;
    let test_labels = label_indices(&task, test)?;
    let taps = cfg.taps.clone().unwrap_or_else(|| backbone.all_taps());
    let side = SideConfig {
        width: cfg.width,
        rank: cfg.rank,
        ..SideConfig::new(taps.len(), backbone.config().hidden_size, task.labels().len())
    };
    side.validate()?;
    if cfg.forward_batch == 0 || cfg.upload_chunk == 0 || cfg.epochs == 0 || (cfg.mode == Mode::Pae && cfg.rounds == 0)
    {
        return Err(Error::InvalidInput("forward_batch, upload_chunk, epochs and rounds must be positive".into()));
    }
    let client = AssistClient::connect(
        &cfg.server_url,
        &Connection { ca_pem: cfg.ca_pem.clone(), insecure_http: cfg.insecure_http },
    )?;
    let secrets = if cfg.mode == Mode::Pae && cfg.secrets {
        progress(&Progress { phase: Phase::Secrets, done: 0, total: 1, round: 0, loss: None });
        Secrets::generate(&side)?
    } else {
        Secrets::disabled(&side)?
    };
    cancel.check()?;
    let request = CreateSession {
        mode: cfg.mode,
        labels: (cfg.mode == Mode::Mobillm).then_some(side.labels),
        layers: side.taps,
        dim: side.hidden,
        outputs: side.outputs,
        backbone: backbone.fingerprint().to_string(),
        width: Some(side.width),
        rank: Some(side.rank),
        activation: None,
        alpha0: None,
        lr: Some(cfg.lr),
        batch_size: Some(cfg.batch_size.min((train.len() / 8).max(16))),
        weight_decay: None,
        seed: Some(cfg.seed),
    };
    let session = client.create_session(&cfg.api_key, &request)?;
    if cfg.mode == Mode::Pae && train.len() > session.max_samples {
        let _ = client.delete(&session);
        return Err(Error::InvalidInput(format!(
            "{} training examples, but this server lets a session of this model hold at most {}",
            train.len(),
            session.max_samples
        )));
    }
    let server = ServerSession { client: &client, session, keep: cfg.keep_server_session };
    let run = Run {
        backbone,
        task: &task,
        taps: &taps,
        side: &side,
        secrets: &secrets,
        cfg,
        cancel,
        server: &server,
        test_labels: &test_labels,
        started,
    };
    let trained = match cfg.mode {
        Mode::Pae => run.pae(train, &labels, test, progress)?,
        Mode::Mobillm => run.mobillm(train, &labels, test, progress)?,
    };

    let adapter = DeviceAdapter {
        task: task.spec().clone(),
        taps: taps.clone(),
        backbone_fingerprint: backbone.fingerprint().to_string(),
        secret_seed: secrets.seed(),
        net: trained.folded,
    };
    let (zero_shot_acc, finetuned_acc) = match &trained.test {
        Some(t) => (
            Some(held_out_accuracy(None, t, &test_labels)?),
            Some(held_out_accuracy(Some(&adapter.net), t, &test_labels)?),
        ),
        None => (None, None),
    };
    progress(&Progress { phase: Phase::Done, done: 1, total: 1, round: 0, loss: trained.loss });
    Ok(Outcome {
        mode: cfg.mode,
        adapter,
        train_samples: train.len(),
        test_samples: test.len(),
        zero_shot_acc,
        finetuned_acc,
        upload_bytes: trained.upload_bytes,
        device_forward_s: trained.device_forward_s,
        server_train_s: trained.server_train_s,
        wall_s: started.elapsed().as_secs_f64(),
        rounds: trained.rounds,
    })
}

/// Accuracy of the backbone's label logits plus, with `net`, the folded network's corrections, over held-out
/// pivots (evaluated 64 at a time, converting the f16 taps as it goes).
fn held_out_accuracy(net: Option<&SideNet>, pivots: &Pivots, labels: &[u32]) -> Result<f64> {
    let corrections = match net {
        Some(net) => {
            let n = pivots.taps.dim(0)?;
            let parts = (0..n)
                .step_by(64)
                .map(|s| -> Result<Tensor> {
                    let x = normalize_taps(&pivots.taps.narrow(0, s, 64.min(n - s))?.to_dtype(DType::F32)?)?;
                    Ok(net.forward(&x)?.to_dtype(DType::F32)?)
                })
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&parts, 0)?)
        }
        None => None,
    };
    Ok(accuracy(&predict(&pivots.logits, corrections.as_ref())?, labels))
}

fn label_indices(task: &Task, examples: &[Example]) -> Result<Vec<u32>> {
    examples
        .iter()
        .enumerate()
        .map(|(i, e)| {
            task.label_index(&e.label).map(|l| l as u32).ok_or_else(|| {
                Error::InvalidInput(format!("example {i}: label {:?} is not one of {:?}", e.label, task.labels()))
            })
        })
        .collect()
}

struct Run<'a> {
    backbone: &'a Backbone,
    task: &'a Task,
    taps: &'a [usize],
    side: &'a SideConfig,
    secrets: &'a Secrets,
    cfg: &'a SessionConfig,
    cancel: &'a CancelToken,
    server: &'a ServerSession<'a>,
    test_labels: &'a [u32],
    started: Instant,
}

/// Held-out pivots: taps `[N, T, d]` (f16) and label logits `[N, K]`.
struct Pivots {
    taps: Tensor,
    logits: Tensor,
}

struct Trained {
    folded: SideNet,
    test: Option<Pivots>,
    upload_bytes: u64,
    device_forward_s: f64,
    server_train_s: f64,
    loss: Option<f64>,
    rounds: Vec<RoundReport>,
}

/// Padded tokens per forward batch: the longest prompts go in smaller batches, so the forward's working memory
/// stays flat (the cost per token is the same).
const FORWARD_BATCH_TOKENS: usize = 640;
/// Padded tokens per `mobillm` forward batch (and step frame).
const MOBILLM_MAX_BATCH_TOKENS: usize = 512;

type Batches = (Vec<Vec<u32>>, Vec<Vec<usize>>);

/// What the forward thread hands the upload thread.
enum Upload {
    Samples(Frame),
    Step(Frame),
}

impl Run<'_> {
    fn client(&self) -> &AssistClient {
        self.server.client
    }

    /// Token ids of every example, and example indices in forward batches sorted by prompt length so padding
    /// stays small. With `max_tokens`, a batch also holds at most that many (padded) tokens.
    fn batches(&self, examples: &[Example], max_tokens: Option<usize>) -> Result<Batches> {
        let tokenizer = self.backbone.tokenizer();
        let encoded =
            examples.iter().map(|e| self.task.encode(tokenizer, &e.text)).collect::<Result<Vec<Vec<u32>>>>()?;
        let mut order: Vec<usize> = (0..examples.len()).collect();
        order.sort_by_key(|&i| encoded[i].len());
        let mut batches: Vec<Vec<usize>> = Vec::new();
        for i in order {
            // Sorted ascending, so the newcomer is the batch's longest prompt.
            let fits = batches.last().is_some_and(|b| {
                b.len() < self.cfg.forward_batch && max_tokens.is_none_or(|m| (b.len() + 1) * encoded[i].len() <= m)
            });
            match batches.last_mut() {
                Some(b) if fits => b.push(i),
                _ => batches.push(vec![i]),
            }
        }
        Ok((encoded, batches))
    }

    /// Runs `produce` on this thread while a second thread uploads what it sends. Returns the bytes uploaded.
    fn with_uploader(
        &self,
        produce: impl FnOnce(&dyn Fn(Upload) -> Result<()>) -> Result<()>,
        mut on_step: impl FnMut(f64, f64) + Send,
    ) -> Result<u64> {
        let bytes = AtomicU64::new(0);
        let (tx, rx) = sync_channel::<Upload>(2);
        std::thread::scope(|scope| {
            let uploader = scope.spawn(|| -> Result<()> {
                for item in rx {
                    self.cancel.check()?;
                    let session = &self.server.session;
                    match item {
                        Upload::Samples(frame) => {
                            let encoded = frame.encode(self.cfg.quant)?;
                            self.client().upload_frame(session, &encoded)?;
                            bytes.fetch_add(encoded.len() as u64, Ordering::Relaxed);
                        }
                        Upload::Step(frame) => {
                            let encoded = frame.encode(self.cfg.quant)?;
                            let sent = Instant::now();
                            let ack = self.client().train_step(session, &encoded)?;
                            bytes.fetch_add(encoded.len() as u64, Ordering::Relaxed);
                            on_step(ack.loss, sent.elapsed().as_secs_f64());
                        }
                    }
                }
                Ok(())
            });
            let send = |item: Upload| tx.send(item).map_err(|_| Error::Network("the upload thread stopped".into()));
            let produced = produce(&send);
            drop(tx);
            let upload_result = uploader.join().map_err(|_| Error::Network("the upload thread panicked".into()))?;
            // The uploader's error explains a failed send better than the send itself.
            upload_result.and(produced)
        })?;
        Ok(bytes.into_inner())
    }

    /// Forwards the held-out examples, keeping their pivot taps as f16 (half the memory; the adapter's
    /// corrections are computed from them in f32 chunks).
    fn forward_test(&self, test: &[Example], progress: &mut dyn FnMut(&Progress)) -> Result<Option<Pivots>> {
        if test.is_empty() {
            return Ok(None);
        }
        let (n, k) = (test.len(), self.side.labels);
        let per = self.side.taps * self.side.hidden;
        let (encoded, batches) = self.batches(test, Some(FORWARD_BATCH_TOKENS))?;
        let mut taps = vec![half::f16::ZERO; n * per];
        let mut logits = vec![0f32; n * k];
        let mut done = 0;
        for chunk in &batches {
            self.cancel.check()?;
            let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| encoded[i].clone()).collect();
            let out = self.backbone.llama().forward_pivots(&batch, self.taps, self.task.label_token_ids())?;
            let rows = out.taps.to_dtype(DType::F16)?.flatten_all()?.to_vec1::<half::f16>()?;
            let z = out.label_logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            for (j, &i) in chunk.iter().enumerate() {
                taps[i * per..(i + 1) * per].copy_from_slice(&rows[j * per..(j + 1) * per]);
                logits[i * k..(i + 1) * k].copy_from_slice(&z[j * k..(j + 1) * k]);
            }
            done += chunk.len();
            progress(&Progress { phase: Phase::Evaluate, done, total: n, round: 0, loss: None });
        }
        Ok(Some(Pivots {
            taps: Tensor::from_vec(taps, (n, self.side.taps, self.side.hidden), &Device::Cpu)?,
            logits: Tensor::from_vec(logits, (n, k), &Device::Cpu)?,
        }))
    }

    fn pae(
        &self,
        train: &[Example],
        labels: &[u32],
        test: &[Example],
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Trained> {
        let (n, k, k_out) = (train.len(), self.side.labels, self.side.outputs);
        let (t, d) = (self.side.taps, self.side.hidden);
        let ids: Vec<SampleId> = (0..n).map(|_| SampleId::random()).collect::<Result<_>>()?;
        let (encoded, batches) = self.batches(train, Some(FORWARD_BATCH_TOKENS))?;
        let mut z_b = vec![0f32; n * k];
        let mut forward_s = 0.0;
        let mut upload_bytes = self.with_uploader(
            |send| {
                let mut pending: Vec<usize> = Vec::new();
                let mut forwarded = 0;
                let (mut acts, mut targets) = (Vec::new(), Vec::new());
                for (b, chunk) in batches.iter().enumerate() {
                    self.cancel.check()?;
                    let start = Instant::now();
                    let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| encoded[i].clone()).collect();
                    let out = self.backbone.llama().forward_pivots(&batch, self.taps, self.task.label_token_ids())?;
                    forward_s += start.elapsed().as_secs_f64();
                    let chunk_labels: Vec<u32> = chunk.iter().map(|&i| labels[i]).collect();
                    let x = self.secrets.rotate_activations(&normalize_taps(&out.taps)?)?;
                    let delta = prediction_differences(&out.label_logits, None, &chunk_labels, self.cfg.tau)?;
                    let y = self.secrets.encode_targets(&delta)?;
                    for (j, row) in out.label_logits.to_vec2::<f32>()?.into_iter().enumerate() {
                        z_b[chunk[j] * k..(chunk[j] + 1) * k].copy_from_slice(&row);
                    }
                    acts.extend(x.flatten_all()?.to_vec1::<f32>()?);
                    targets.extend(y.flatten_all()?.to_vec1::<f32>()?);
                    pending.extend_from_slice(chunk);
                    let last = b + 1 == batches.len();
                    while pending.len() >= self.cfg.upload_chunk || (last && !pending.is_empty()) {
                        let m = pending.len().min(self.cfg.upload_chunk);
                        let frame_ids = pending.drain(..m).map(|i| ids[i]).collect();
                        let frame_acts = acts.drain(..m * t * d).collect();
                        let frame_targets = targets.drain(..m * k_out).collect();
                        send(Upload::Samples(Frame::samples(frame_ids, t, d, frame_acts, k_out, frame_targets)))?;
                    }
                    forwarded += chunk.len();
                    progress(&Progress { phase: Phase::Forward, done: forwarded, total: n, round: 1, loss: None });
                }
                Ok(())
            },
            |_, _| {},
        )?;
        let z_b = Tensor::from_vec(z_b, (n, k), &Device::Cpu)?;
        let index: HashMap<SampleId, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();

        let mut server_s = 0.0;
        let mut test_pivots = None;
        let (mut rounds, mut folded) = (Vec::new(), None);
        let mut loss = None;
        for round in 1..=self.cfg.rounds {
            if round > 1 {
                // Refinement: decode the server's outputs and send new targets o + Q·[Δ; 0].
                progress(&Progress { phase: Phase::Targets, done: 0, total: n, round, loss });
                let outputs = self.client().outputs(&self.server.session, n, k_out)?;
                let mut o = vec![0f32; n * k_out];
                let mut seen = 0;
                for (id, row) in outputs {
                    if let (Some(&i), true) = (index.get(&id), row.len() == k_out) {
                        o[i * k_out..(i + 1) * k_out].copy_from_slice(&row);
                        seen += 1;
                    }
                }
                if seen != n {
                    return Err(Error::Protocol(format!("the server returned outputs for {seen} of {n} samples")));
                }
                let o = Tensor::from_vec(o, (n, k_out), &Device::Cpu)?;
                let dec = self.secrets.decode_outputs(&o)?;
                let delta = prediction_differences(&z_b, Some(&dec), labels, self.cfg.tau)?;
                let targets = (o + self.secrets.encode_targets(&delta)?)?.flatten_all()?.to_vec1::<f32>()?;
                for (c, id_chunk) in ids.chunks(4096).enumerate() {
                    let rows = &targets[c * 4096 * k_out..(c * 4096 + id_chunk.len()) * k_out];
                    upload_bytes += self.client().upload_targets(&self.server.session, id_chunk, rows, k_out)?;
                }
            }
            self.cancel.check()?;
            let start = Instant::now();
            self.client().train(&self.server.session, self.cfg.epochs)?;
            if test_pivots.is_none() {
                // The server trains the first round while the device forwards the held-out set.
                test_pivots = Some(self.forward_test(test, progress)?);
            }
            loss = self.wait_trained(round, progress)?;
            server_s += start.elapsed().as_secs_f64();
            let net = self.secrets.fold(&self.download_adapter()?)?;
            self.report_round(round, &net, test_pivots.as_ref().and_then(Option::as_ref), &mut rounds)?;
            folded = Some(net);
        }
        Ok(Trained {
            folded: folded.ok_or_else(|| Error::InvalidInput("no refinement round ran".into()))?,
            test: test_pivots.flatten(),
            upload_bytes,
            device_forward_s: forward_s,
            server_train_s: server_s,
            loss,
            rounds,
        })
    }

    fn mobillm(
        &self,
        train: &[Example],
        labels: &[u32],
        test: &[Example],
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Trained> {
        let (n, k) = (train.len(), self.side.labels);
        let (t, d) = (self.side.taps, self.side.hidden);
        // A step frame holds every token of its batch: 512 tokens × 30 layers × 578 bytes ≈ 9 MB at int8, under the
        // server's default 16 MB body limit, and a 35 MB f32 tensor on the device.
        let (encoded, mut batches) = self.batches(train, Some(MOBILLM_MAX_BATCH_TOKENS))?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.cfg.seed);
        let (mut forward_s, mut upload_bytes) = (0.0, 0u64);
        let step_s = std::sync::Mutex::new(0.0f64);
        let last_loss = std::sync::Mutex::new(None);
        // Held-out pivots first, so every pass can be scored as it ends.
        let test_pivots = self.forward_test(test, progress)?;
        let (mut rounds, mut folded) = (Vec::new(), None);
        for epoch in 1..=self.cfg.epochs {
            // Batches keep their length grouping; their order changes every epoch.
            batches.shuffle(&mut rng);
            upload_bytes += self.with_uploader(
                |send| {
                    let mut done = 0;
                    for chunk in &batches {
                        self.cancel.check()?;
                        let start = Instant::now();
                        let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| encoded[i].clone()).collect();
                        let (out, tokens) =
                            self.backbone.llama().forward_sequences(&batch, self.taps, self.task.label_token_ids())?;
                        forward_s += start.elapsed().as_secs_f64();
                        let lens: Vec<u32> = batch.iter().map(|s| s.len() as u32).collect();
                        let acts = Tensor::cat(&tokens, 0)?.flatten_all()?.to_vec1::<f32>()?;
                        let ids = (0..chunk.len()).map(|_| SampleId::random()).collect::<Result<_>>()?;
                        let chunk_labels = chunk.iter().map(|&i| labels[i]).collect();
                        let prior = out.label_logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                        send(Upload::Step(Frame::sequences(ids, t, d, acts, lens, chunk_labels, k, prior)))?;
                        done += chunk.len();
                        progress(&Progress {
                            phase: Phase::Forward,
                            done,
                            total: n,
                            round: epoch,
                            loss: *last_loss.lock().expect("loss"),
                        });
                    }
                    Ok(())
                },
                |loss, seconds| {
                    *step_s.lock().expect("step time") += seconds;
                    *last_loss.lock().expect("loss") = Some(loss);
                },
            )?;
            let net = self.secrets.fold(&self.download_adapter()?)?;
            self.report_round(epoch, &net, test_pivots.as_ref(), &mut rounds)?;
            folded = Some(net);
        }
        let loss = *last_loss.lock().expect("loss");
        let server_train_s = *step_s.lock().expect("step time");
        Ok(Trained {
            folded: folded.ok_or_else(|| Error::InvalidInput("no pass over the data ran".into()))?,
            test: test_pivots,
            upload_bytes,
            device_forward_s: forward_s,
            server_train_s,
            loss,
            rounds,
        })
    }

    /// Scores the folded network on the held-out pivots (if any) and records the round.
    fn report_round(
        &self,
        round: usize,
        net: &SideNet,
        pivots: Option<&Pivots>,
        rounds: &mut Vec<RoundReport>,
    ) -> Result<()> {
        if let Some(p) = pivots {
            let finetuned_acc = held_out_accuracy(Some(net), p, self.test_labels)?;
            rounds.push(RoundReport { round, finetuned_acc, elapsed_s: self.started.elapsed().as_secs_f64() });
        }
        Ok(())
    }

    /// Polls the training job until it is done. A cancel is noticed at the next poll (deleting the session, which
    /// the caller's guard does, stops the server's job).
    fn wait_trained(&self, round: usize, progress: &mut dyn FnMut(&Progress)) -> Result<Option<f64>> {
        let status =
            self.client().wait_trained(&self.server.session, self.cfg.poll, self.cfg.max_train_wait, |job| {
                self.cancel.check()?;
                let (done, total) = (job.epochs_done, job.epochs_total);
                progress(&Progress { phase: Phase::Train, done, total, round, loss: job.loss });
                Ok(())
            })?;
        Ok(status.job.loss)
    }

    /// The trained network in server coordinates, checked against the session's shape.
    fn download_adapter(&self) -> Result<SideNet> {
        let tensors = self.client().adapter(&self.server.session)?;
        SideNet::from_tensors(self.side, &weights_file::as_refs(&tensors))
            .map_err(|e| Error::Protocol(format!("the server's adapter does not fit this session: {e}")))
    }
}
