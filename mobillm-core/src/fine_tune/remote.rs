//! The fine-tune's session on the assist server: the only way a fine-tune talks to the server. It creates the
//! server session from the fine-tune's configuration (or reopens a recorded one), deletes it when dropped (end,
//! error or cancel: no activation outlives the fine-tune, unless asked to keep it or the fine-tune is resumable),
//! sends frames from a thread of its own while the caller
//! computes the next ones, and turns the server's answers into what the loops need: a training round waited for,
//! outputs in the device's sample order, the side network checked against the session's shape.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use candle_core::{Device, Tensor};

use super::config::FineTuneConfig;
use super::progress::CancelToken;
use crate::client::{AssistClient, Connection, Session};
use crate::error::{Error, Result};
use crate::protocol::{CreateSession, JobState, Mode, StepAck};
use crate::side::{weights_file, SampleId, SideConfig, SideNet};
use crate::wire::{Frame, Quant};

/// Targets per refinement frame (4096 × K' f32 values: 128 KiB at K' = 8).
const TARGETS_PER_FRAME: usize = 4096;

/// What the computing thread hands the sending thread.
pub enum Upload {
    /// `pae`: samples to cache, and what the device records once the server has stored them.
    Samples(Frame, Sent),
    /// `mobillm`: a batch to train on at once.
    Step(Frame),
}

/// A `pae` frame's samples (indices of the sent examples), their label logits `[m·K]`, and the device's forward
/// seconds up to them.
pub struct Sent {
    pub samples: Vec<usize>,
    pub logits: Vec<f32>,
    pub forward_s: f64,
}

pub struct RemoteSession {
    client: AssistClient,
    session: Session,
    keep: AtomicBool,
    side: SideConfig,
}

impl RemoteSession {
    /// Creates the server session for a fine-tune of `samples` examples with side network `side`. A `pae`
    /// session never tells the server the number of labels.
    pub fn open(cfg: &FineTuneConfig, side: &SideConfig, backbone: &str, samples: usize) -> Result<Self> {
        let mode = cfg
            .mode
            .remote()
            .ok_or_else(|| Error::InvalidInput(format!("`{}` mode opens no server session", cfg.mode)))?;
        let connection = Connection { ca_pem: cfg.ca_pem.clone(), insecure_http: cfg.insecure_http };
        let client = AssistClient::connect(&cfg.server_url, &connection)?;
        let request = CreateSession {
            mode,
            labels: (mode == Mode::Mobillm).then_some(side.labels),
            layers: side.taps,
            dim: side.hidden,
            outputs: side.outputs,
            backbone: backbone.to_string(),
            width: Some(side.width),
            rank: Some(side.rank),
            members: Some(side.members),
            activation: None,
            alpha0: None,
            lr: Some(cfg.lr),
            batch_size: Some(match mode {
                Mode::Pae => cfg.epoch_batch(samples),
                Mode::Mobillm => cfg.batch_size,
            }),
            weight_decay: None,
            seed: Some(cfg.seed),
        };
        let session = client.create_session(&cfg.api_key, &request)?;
        let remote = Self { client, session, keep: AtomicBool::new(cfg.keep_server_session), side: side.clone() };
        if mode == Mode::Pae && samples > remote.session.max_samples {
            // Dropping `remote` deletes the session just made.
            return Err(Error::InvalidInput(format!(
                "{samples} training examples, but this server lets a session of this model hold at most {}",
                remote.session.max_samples
            )));
        }
        Ok(remote)
    }

    /// Reopens a recorded `pae` session: it must still be on the server, and hold at least the `acknowledged`
    /// samples. Any answer but the session's status is [`Error::CannotResume`] naming `state`.
    pub fn reopen(
        cfg: &FineTuneConfig,
        side: &SideConfig,
        session: Session,
        acknowledged: usize,
        state: &std::path::Path,
    ) -> Result<Self> {
        let connection = Connection { ca_pem: cfg.ca_pem.clone(), insecure_http: cfg.insecure_http };
        let client = AssistClient::connect(&cfg.server_url, &connection)?;
        let cannot = |reason: String| Error::CannotResume { path: state.to_path_buf(), reason };
        let status = match client.status(&session) {
            Ok(status) => status,
            Err(Error::Server { status: 401 | 404, .. }) => {
                return Err(cannot(format!(
                    "the server no longer has session {} (deleted, or expired after {} s without a request): start \
                     a new fine-tune",
                    session.session_id, session.idle_ttl_s
                )))
            }
            Err(e) => return Err(e),
        };
        if status.mode != Mode::Pae || status.samples < acknowledged {
            return Err(cannot(format!(
                "the server's session {} is a {} session holding {} samples; the record has {acknowledged} stored",
                session.session_id, status.mode, status.samples
            )));
        }
        // A reopened session belongs to a resumable fine-tune: kept unless it ends or is cancelled.
        Ok(Self { client, session, keep: AtomicBool::new(true), side: side.clone() })
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Whether dropping this deletes the server session: kept for a fine-tune that can be resumed.
    pub fn keep_on_drop(&self, keep: bool) {
        self.keep.store(keep, Ordering::SeqCst);
    }

    /// Runs `produce` on this thread while a second thread encodes and sends what it hands over; returns the
    /// bytes sent. A channel of two frames keeps memory flat. `on_step` sees each `mobillm` step's answer and its
    /// round-trip seconds; `on_stored` each `pae` frame the server stored, with its bytes. The sender's error
    /// explains a failed hand-over better than the hand-over itself.
    pub fn stream(
        &self,
        quant: Quant,
        cancel: &CancelToken,
        produce: impl FnOnce(&dyn Fn(Upload) -> Result<()>) -> Result<()>,
        mut on_step: impl FnMut(StepAck, f64) + Send,
        mut on_stored: impl FnMut(Sent, u64) -> Result<()> + Send,
    ) -> Result<u64> {
        let (tx, rx) = sync_channel::<Upload>(2);
        std::thread::scope(|scope| {
            let sender = scope.spawn(|| -> Result<u64> {
                let mut bytes = 0u64;
                for item in rx {
                    cancel.check()?;
                    let (Upload::Samples(frame, _) | Upload::Step(frame)) = &item;
                    let encoded = frame.encode(quant)?;
                    match item {
                        Upload::Samples(_, sent) => {
                            self.client.upload_frame(&self.session, &encoded)?;
                            on_stored(sent, encoded.len() as u64)?;
                        }
                        Upload::Step(_) => {
                            let sent = Instant::now();
                            let ack = self.client.train_step(&self.session, &encoded)?;
                            on_step(ack, sent.elapsed().as_secs_f64());
                        }
                    }
                    bytes += encoded.len() as u64;
                }
                Ok(bytes)
            });
            let hand_over = |item: Upload| tx.send(item).map_err(|_| Error::Network("the upload stopped".into()));
            let produced = produce(&hand_over);
            drop(tx);
            let bytes = sender.join().map_err(|_| Error::Internal("the upload thread panicked".into()))??;
            produced?;
            Ok(bytes)
        })
    }

    /// Replaces the targets of uploaded samples: `targets` is `[n, K']`, row i for `ids[i]`. Returns the bytes
    /// sent.
    pub fn upload_targets(&self, ids: &[SampleId], targets: &Tensor) -> Result<u64> {
        let k = self.side.outputs;
        let values = targets.flatten_all()?.to_vec1::<f32>()?;
        if values.len() != ids.len() * k {
            return Err(Error::Internal(format!("{} target values for {} samples", values.len(), ids.len())));
        }
        let mut sent = 0;
        for (ids, rows) in ids.chunks(TARGETS_PER_FRAME).zip(values.chunks(TARGETS_PER_FRAME * k)) {
            sent += self.client.upload_targets(&self.session, ids, rows, k)?;
        }
        Ok(sent)
    }

    /// Queues `epochs` more epochs of training from the current weights (`from_scratch`: from the initial ones);
    /// asked again with the same idempotency `key`, the server answers with the job it started then.
    pub fn start_training(&self, epochs: usize, from_scratch: bool, key: &str) -> Result<()> {
        self.client.train_keyed(&self.session, epochs, from_scratch, key)?;
        Ok(())
    }

    /// Sends one `pae` samples frame outside the upload's stream (the refit's split); returns the bytes sent.
    pub fn upload_samples(&self, frame: &Frame, quant: Quant) -> Result<u64> {
        let encoded = frame.encode(quant)?;
        self.client.upload_frame(&self.session, &encoded)?;
        Ok(encoded.len() as u64)
    }

    /// Waits for the training job (`on_poll` sees each poll and may stop the wait: a cancel, say). Returns the
    /// last epoch's loss.
    pub fn wait_trained(
        &self,
        cfg: &FineTuneConfig,
        on_poll: impl FnMut(&JobState) -> Result<()>,
    ) -> Result<Option<f64>> {
        let done = self.client.wait_trained(&self.session, cfg.poll, cfg.max_train_wait, on_poll)?;
        Ok(done.job.loss)
    }

    /// The server's current outputs `[n, K']`, row i for `ids[i]`.
    pub fn outputs(&self, ids: &[SampleId]) -> Result<Tensor> {
        let k = self.side.outputs;
        let index: std::collections::HashMap<SampleId, usize> =
            ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let mut o = vec![0f32; ids.len() * k];
        let mut seen = vec![false; ids.len()];
        for (id, row) in self.client.outputs(&self.session, ids.len(), k)? {
            if let Some(&i) = index.get(&id) {
                o[i * k..(i + 1) * k].copy_from_slice(&row);
                seen[i] = true;
            }
        }
        let missing = seen.iter().filter(|s| !**s).count();
        if missing > 0 {
            return Err(Error::Protocol(format!(
                "the server returned no outputs for {missing} of {} samples",
                ids.len()
            )));
        }
        Ok(Tensor::from_vec(o, (ids.len(), k), &Device::Cpu)?)
    }

    /// The trained side network, in the server's (the device's secret) coordinates, checked against the session.
    pub fn side_network(&self) -> Result<SideNet> {
        let tensors = self.client.adapter(&self.session)?;
        SideNet::from_tensors(&self.side, &weights_file::as_refs(&tensors))
            .map_err(|e| Error::Protocol(format!("the server's side network does not fit this session: {e}")))
    }
}

impl Drop for RemoteSession {
    fn drop(&mut self) {
        if self.keep.load(Ordering::SeqCst) {
            return;
        }
        if let Err(e) = self.client.delete(&self.session) {
            // The core crate has no logging dependency: a failed clean-up is reported on stderr, never silently.
            // The server's idle expiry deletes the session in the end.
            eprintln!("mobillm: warning: could not delete server session {}: {e}", self.session.session_id);
        }
    }
}
