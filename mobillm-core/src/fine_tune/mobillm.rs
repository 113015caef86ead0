//! The `mobillm` loop: no secrets, labels on the server. Every pass over the data forwards every example again and
//! sends all tokens' activations of every tapped layer with the label and the backbone's label logits; the server
//! takes one optimiser step per frame (one forward batch). Held-out pivots are forwarded first, so every pass is
//! scored as it ends.

use std::sync::Mutex;
use std::time::Instant;

use candle_core::{DType, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::progress::{Phase, Progress};
use super::remote::{RemoteSession, Upload};
use super::{Rounds, Run, Trained};
use crate::dataset::Example;
use crate::error::Result;
use crate::side::SampleId;
use crate::wire::Frame;

/// Padded tokens per forward batch, which is also one step frame: 512 tokens × 30 layers × 578 bytes ≈ 9 MB at
/// int8, under the server's 16 MB body limit, and a 35 MB f32 tensor on the device.
const STEP_TOKENS: usize = 512;

impl Run<'_> {
    pub(super) fn mobillm(
        &self,
        remote: &RemoteSession,
        train: &[Example],
        labels: &[u32],
        test: &[Example],
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Trained> {
        let (n, k) = (train.len(), self.side.labels);
        let (t, d) = (self.side.taps, self.side.hidden);
        let mut batches = self.plan(train, STEP_TOKENS)?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.cfg.seed);
        let (mut forward_s, mut upload_bytes) = (0.0, 0u64);
        let step_s = Mutex::new(0.0f64);
        let last_loss = Mutex::new(None);
        let held_out = self.forward_test(test, None, progress)?;
        let mut rounds = Rounds::default();
        for epoch in 1..=self.cfg.epochs {
            // Batches keep their length grouping; their order changes every pass.
            batches.groups.shuffle(&mut rng);
            upload_bytes += remote.stream(
                self.cfg.quant,
                self.cancel,
                |send| {
                    let mut done = 0;
                    for group in &batches.groups {
                        self.cancel.check()?;
                        let start = Instant::now();
                        let batch = batches.batch(group);
                        let (out, tokens) =
                            self.backbone.llama().forward_sequences(&batch, self.taps, self.task.label_token_ids())?;
                        forward_s += start.elapsed().as_secs_f64();
                        let lens: Vec<u32> = batch.iter().map(|s| s.len() as u32).collect();
                        let acts = Tensor::cat(&tokens, 0)?.flatten_all()?.to_vec1::<f32>()?;
                        let ids = (0..group.len()).map(|_| SampleId::random()).collect::<Result<_>>()?;
                        let group_labels = group.iter().map(|&i| labels[i]).collect();
                        let prior = out.label_logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                        send(Upload::Step(Frame::sequences(ids, t, d, acts, lens, group_labels, k, prior)))?;
                        done += group.len();
                        let loss = *last_loss.lock().expect("loss");
                        progress(&Progress::new(Phase::Forward, done, n, epoch, loss));
                    }
                    Ok(())
                },
                |ack, seconds| {
                    *step_s.lock().expect("step time") += seconds;
                    *last_loss.lock().expect("loss") = Some(ack.loss);
                },
                |_, _| Ok(()),
            )?;
            let net = self.secrets.fold(&remote.side_network()?)?;
            // Without a validation split every pass is kept: the last one's network is the adapter.
            let _ = self.end_round(&mut rounds, epoch, net, held_out.as_ref(), None)?;
        }
        let loss = *last_loss.lock().expect("loss");
        let server_train_s = *step_s.lock().expect("step time");
        Ok(Trained {
            rounds,
            whitening: None,
            held_out,
            upload_bytes,
            device_forward_s: forward_s,
            device_train_s: 0.0,
            server_train_s,
            loss,
        })
    }
}
