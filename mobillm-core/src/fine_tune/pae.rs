//! The `pae` loop (docs/design.md §4, §5). Every training example is forwarded once; its pivot activations are
//! normalised, whitened and rotated by the session's secrets, quantised and uploaded with its first target
//! `Q·[τ(onehot − softmax(z_b)); 0]` while the next batch computes. The whitening is fitted on a random
//! [`CALIBRATION_SAMPLES`] of the examples, forwarded first and held (f16) until the fit; nothing is sent before it.
//! The server trains; meanwhile the device forwards its validation split (a held-out test set, which only measures,
//! after round 1's training). Each refinement round downloads the server's outputs, decodes them and uploads new
//! targets only. The device keeps neither the training activations nor their targets: per example only its label logits
//! `z_b` and random id, which is all later rounds need. With decoys (`side::decoys`), the forward also returns the
//! logits of their candidate words, the decoys are chosen and fitted on the whitened calibration subset, each example's
//! decoy labels are drawn once when it is forwarded and kept with its `z_b`, and every target carries the decoys'
//! differences beside the real ones. Rounds continue until the validation split the device holds back stops improving,
//! or `max_rounds` (`stopping`). Then the refit: the device sends the split (whitened and rotated like the rest) and
//! everyone's first targets, and the server trains from its initial weights for as many rounds as the rule kept, on
//! every example; the adapter is the refit's last network. Not with decoys: the split's decoy labels would need its
//! decoy words' logits, which its forward does not keep.
//!
//! Every acknowledged step goes into the fine-tune's [`Journal`] (`state`): a resumed fine-tune forwards only the
//! examples the server has not acknowledged, with the recorded whitening, ids and secrets, and re-enters the
//! rounds where the record stands (the held-out and validation sets, never uploaded, are forwarded again).

use std::cell::Cell;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::held_out::Pivots;
use super::progress::{Phase, Progress};
use super::remote::{RemoteSession, Sent, Upload};
use super::state::{Journal, Step};
use super::stopping::ROUNDS_WITHOUT_VALIDATION;
use super::{random_split, Rounds, Run, Trained};
use crate::backbone::batching::{scatter_rows, BATCH_TOKENS};
use crate::dataset::Example;
use crate::error::{Error, Result};
use crate::side::decoys::{self, DecoyTasks};
use crate::side::whitening::{self, Whitening, CALIBRATION_SAMPLES};
use crate::side::SampleId;
use crate::side::{device_inputs, normalize_taps};
use crate::wire::Frame;

impl Run<'_> {
    pub(super) fn pae(
        &self,
        remote: &RemoteSession,
        journal: &mut Journal,
        (train, labels): (&[Example], &[u32]),
        // The split, its true labels (to score rounds) and those the refit sends (noisy under label noise).
        (validation, validation_labels, refit_labels): (&[Example], &[u32], &[u32]),
        test: &[Example],
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Trained> {
        let (n, k, k_out) = (train.len(), self.side.labels, self.side.outputs);
        let (t, d, m) = (self.side.taps, self.side.hidden, self.cfg.decoys);
        let ids: Vec<SampleId> = journal.record.ids.clone();
        let (mut whitening, kept) = journal.load_tensors(self.side)?;
        // What a resumed fine-tune still has to forward: the examples the server has not acknowledged.
        let todo: Vec<usize> = (0..n).filter(|&i| !journal.record.acked[i]).collect();
        let batches = self.plan(train, BATCH_TOKENS)?;
        // With secrets on, a random subset is forwarded first and held until it has fitted the whitening (unless
        // a resumed fine-tune has it already).
        let calibration = match self.secrets.is_enabled() && whitening.is_none() {
            true => todo.len().min(CALIBRATION_SAMPLES),
            false => 0,
        };
        let (first, rest) = random_split(todo.len(), calibration);
        let (first, rest): (Vec<usize>, Vec<usize>) =
            (first.iter().map(|&j| todo[j]).collect(), rest.iter().map(|&j| todo[j]).collect());
        let plan = |part: &[usize]| batches.groups_of(part, self.cfg.forward_batch, BATCH_TOKENS);
        let mut z_b = journal.z_b();
        // Decoys read their words' logits from the same forward as the label words'.
        let mut decoy_tasks = match m {
            0 => None,
            _ => Some(DecoyTasks::new(
                m,
                k,
                self.backbone.config().vocab_size,
                self.task.label_token_ids(),
                super::os_seed()?,
            )?),
        };
        let word_ids: Vec<u32> = self
            .task
            .label_token_ids()
            .iter()
            .copied()
            .chain(decoy_tasks.as_ref().map(DecoyTasks::word_ids).unwrap_or_default())
            .collect();
        let decoy_words = word_ids.len() - k;
        let mut decoy_labels = vec![0u32; n * m];
        let forward_s = Cell::new(journal.record.device_forward_s);
        let streaming = journal.record.step == Step::Upload;
        let journal_cell = std::sync::Mutex::new(&mut *journal);
        remote.stream(
            self.cfg.quant,
            self.cancel,
            |send| {
                if !streaming {
                    return Ok(());
                }
                let mut pending: Vec<usize> = Vec::new();
                let (mut acts, mut targets) = (Vec::new(), Vec::new());
                let mut emitted = 0;
                // Whitens, rotates and targets one forwarded group, and sends every full frame. `word_logits` holds
                // the label words' logits, then the decoys' words'.
                let mut emit = |group: &[usize],
                                taps: &Tensor,
                                word_logits: &Tensor,
                                w: Option<&Whitening>,
                                decoy_tasks: Option<&mut DecoyTasks>|
                 -> Result<()> {
                    let group_labels: Vec<u32> = group.iter().map(|&i| labels[i]).collect();
                    let inputs = device_inputs(taps, w)?;
                    let logits = &word_logits.narrow(1, 0, k)?.contiguous()?;
                    let group_decoys = match decoy_tasks {
                        Some(tasks) => {
                            tasks.label(&tasks.scores(&word_logits.narrow(1, k, decoy_words)?.contiguous()?)?)?
                        }
                        None => Vec::new(),
                    };
                    for (j, &i) in group.iter().enumerate().filter(|_| m > 0) {
                        decoy_labels[i * m..(i + 1) * m].copy_from_slice(&group_decoys[j * m..(j + 1) * m]);
                    }
                    let x = self.secrets.rotate_activations(&inputs)?;
                    let delta = decoys::differences(logits, None, &group_labels, &group_decoys, self.cfg.tau)?;
                    let y = self.secrets.encode_targets(&delta)?;
                    scatter_rows(logits, group, k, &mut z_b)?;
                    acts.extend(x.flatten_all()?.to_vec1::<f32>()?);
                    targets.extend(y.flatten_all()?.to_vec1::<f32>()?);
                    pending.extend_from_slice(group);
                    emitted += group.len();
                    while pending.len() >= self.cfg.upload_chunk || (emitted == todo.len() && !pending.is_empty()) {
                        let m = pending.len().min(self.cfg.upload_chunk);
                        let samples: Vec<usize> = pending.drain(..m).collect();
                        let frame_ids = samples.iter().map(|&i| ids[i]).collect();
                        let frame_acts = acts.drain(..m * t * d).collect();
                        let frame_targets = targets.drain(..m * k_out).collect();
                        let logits = samples.iter().flat_map(|&i| z_b[i * k..(i + 1) * k].to_vec()).collect();
                        let sent = Sent { samples, logits, forward_s: forward_s.get() };
                        send(Upload::Samples(Frame::samples(frame_ids, t, d, frame_acts, k_out, frame_targets), sent))?;
                    }
                    Ok(())
                };
                let mut forwarded = n - todo.len();
                let mut forward = |group: &[usize]| -> Result<crate::backbone::PivotOutput> {
                    self.cancel.check()?;
                    let start = Instant::now();
                    let out = self.backbone.llama().forward_pivots(&batches.batch(group), self.taps, &word_ids)?;
                    forward_s.set(forward_s.get() + start.elapsed().as_secs_f64());
                    forwarded += group.len();
                    progress(&Progress::new(Phase::Forward, forwarded, n, 1, None));
                    Ok(out)
                };
                let mut held = Vec::new();
                for group in plan(&first) {
                    let out = forward(&group)?;
                    let inputs = self.side.summary.inputs(&out.taps, out.means.as_ref())?;
                    held.push((group, normalize_taps(&inputs)?.to_dtype(DType::F16)?, out.label_logits));
                }
                let mut calibration = None;
                if !held.is_empty() {
                    let taps = Tensor::cat(&held.iter().map(|(_, x, _)| x).collect::<Vec<_>>(), 0)?;
                    // The groups' own copies go before the fit: one f16 copy of the subset is held, not two.
                    let groups: Vec<(Vec<usize>, Tensor)> = held.drain(..).map(|(g, _, z)| (g, z)).collect();
                    let fitted = Whitening::fit(&taps, &whitening::Config::for_examples(todo.len()))?;
                    if let Some(tasks) = decoy_tasks.as_mut() {
                        let inputs = device_inputs(&taps.to_dtype(DType::F32)?, Some(&fitted))?;
                        let word_logits = Tensor::cat(&groups.iter().map(|(_, z)| z).collect::<Vec<_>>(), 0)?;
                        let scores = tasks.scores(&word_logits.narrow(1, k, decoy_words)?.contiguous()?)?;
                        let held_labels: Vec<u32> =
                            groups.iter().flat_map(|(g, _)| g.iter().map(|&i| labels[i])).collect();
                        tasks.fit(&scores, &inputs, &held_labels, &class_counts(labels, k))?;
                    }
                    // Recorded before anything whitened with it is sent.
                    let mut journal = journal_cell.lock().map_err(|_| Error::Internal("journal lock".into()))?;
                    journal.save_tensors(Some(&fitted), None)?;
                    journal.record.whitened = true;
                    journal.save()?;
                    whitening = Some(fitted);
                    calibration = Some((taps, groups));
                }
                if let Some((taps, groups)) = calibration {
                    let mut start = 0;
                    for (group, logits) in groups {
                        let rows = taps.narrow(0, start, group.len())?.to_dtype(DType::F32)?;
                        start += group.len();
                        emit(&group, &rows, &logits, whitening.as_ref(), decoy_tasks.as_mut())?;
                    }
                }
                for group in plan(&rest) {
                    let out = forward(&group)?;
                    let inputs = self.side.summary.inputs(&out.taps, out.means.as_ref())?;
                    emit(&group, &inputs, &out.label_logits, whitening.as_ref(), decoy_tasks.as_mut())?;
                }
                Ok(())
            },
            |_, _| {},
            |sent, bytes| {
                let mut journal = journal_cell.lock().map_err(|_| Error::Internal("journal lock".into()))?;
                journal.acknowledge(&sent.samples, &sent.logits, bytes, sent.forward_s)
            },
        )?;
        if streaming {
            journal.record.step = Step::Round { round: 1, train_key: None };
            journal.save()?;
        }
        let z_b = Tensor::from_vec(z_b, (n, k), &Device::Cpu)?;
        // Every activation is sent: the rounds need the rotations only to fold, which draws them layer by layer.
        self.secrets.release_rotations();

        let (mut held_out, mut validation_pivots) = (None, None);
        let (first_round, used, refit_from) = match journal.record.step {
            Step::Round { round, .. } => (round, round - 1, 1),
            // A resumed refit: the rounds are over.
            Step::Refit { after, round, .. } => (usize::MAX, after, round),
            Step::Upload => return Err(Error::Internal("the upload ended without a round to start".into())),
        };
        // A resumed fine-tune takes up the rounds' record; the network kept is the best round's (in the tensors
        // file).
        let mut rounds = Rounds {
            reports: journal.record.reports.clone(),
            kept,
            stopping: journal.record.stopping.clone(),
            used,
            refit: 0,
        };
        let mut loss = None;
        let max_rounds = match validation.is_empty() {
            true => self.cfg.max_rounds.min(ROUNDS_WITHOUT_VALIDATION),
            false => self.cfg.max_rounds,
        };
        let decoy_columns = k * (m + 1);
        for round in first_round..=max_rounds {
            let key = self.train_key(journal, progress, |progress| {
                if round == 1 {
                    return Ok(0);
                }
                // Refinement: decode the server's outputs and send new targets o + Q·[Δ; 0].
                progress(&Progress::new(Phase::Targets, 0, n, round, loss));
                let o = remote.outputs(&ids)?;
                let decoded = self.secrets.decode_columns(&o, decoy_columns)?;
                let delta = decoys::differences(&z_b, Some(&decoded), labels, &decoy_labels, self.cfg.tau)?;
                remote.upload_targets(&ids, &(o + self.secrets.encode_targets(&delta)?)?)
            })?;
            let start = Instant::now();
            remote.start_training(self.cfg.epochs, false, &key)?;
            progress(&Progress::new(Phase::Train, 0, self.cfg.epochs, round, loss));
            if validation_pivots.is_none() {
                // The server trains while the device forwards the validation split (once per process).
                validation_pivots = self.forward_held_out(validation, whitening.as_ref(), progress)?;
            }
            loss = self.wait_trained(remote, Phase::Train, round, progress)?;
            journal.record.server_train_s += start.elapsed().as_secs_f64();
            if held_out.is_none() {
                // Not while the server trains: evaluation's time is left out of the rounds' times, so it must not
                // hide any of the training's.
                held_out = self.forward_test(test, whitening.as_ref(), progress)?;
            }
            let net = self.secrets.fold(&remote.side_network()?)?;
            let validation = validation_pivots.as_ref().map(|v| (v, validation_labels));
            let flow = self.end_round(&mut rounds, round, net, held_out.as_ref(), validation)?;
            let next = match flow.is_break() || round == max_rounds {
                true => Step::Refit { after: round, round: 1, train_key: None },
                false => Step::Round { round: round + 1, train_key: None },
            };
            // A kept round's network goes into the tensors file before the record moves on.
            if flow.is_continue() {
                journal.save_tensors(whitening.as_ref(), rounds.kept.as_ref().map(|net| (round, net)))?;
            }
            journal.record.stopping = rounds.stopping.clone();
            journal.record.reports = rounds.reports.clone();
            journal.record.step = next;
            journal.save()?;
            if flow.is_break() {
                break;
            }
        }

        // The refit (`stopping`): the rounds the rule kept, again from the initial weights, on every example.
        let refit_rounds = match (m, validation.is_empty()) {
            (0, false) => rounds.stopping.best_round().unwrap_or(0),
            _ => 0,
        };
        if refit_rounds > 0 {
            if validation_pivots.is_none() {
                validation_pivots = self.forward_held_out(validation, whitening.as_ref(), progress)?;
            }
            if held_out.is_none() {
                held_out = self.forward_test(test, whitening.as_ref(), progress)?;
            }
            let split = validation_pivots.as_ref().ok_or_else(|| Error::Internal("no validation split".into()))?;
            let all_ids: Vec<SampleId> = ids.iter().chain(&journal.record.validation_ids).copied().collect();
            let all_labels: Vec<u32> = labels.iter().chain(refit_labels).copied().collect();
            let all_z_b = Tensor::cat(&[&z_b, &split.logits], 0)?;
            let split_ids = journal.record.validation_ids.clone();
            for round in refit_from..=refit_rounds {
                let key = self.train_key(journal, progress, |progress| {
                    progress(&Progress::new(Phase::Refit, 0, self.cfg.epochs, round, loss));
                    let (o, sent) = match round {
                        // The split's samples and everyone's first targets; training starts from scratch.
                        1 => (None, self.upload_split(remote, split, &split_ids, refit_labels)?),
                        _ => (Some(remote.outputs(&all_ids)?), 0),
                    };
                    let decoded = o.as_ref().map(|o| self.secrets.decode_outputs(o)).transpose()?;
                    let delta = decoys::differences(&all_z_b, decoded.as_ref(), &all_labels, &[], self.cfg.tau)?;
                    let targets = match o {
                        Some(o) => (o + self.secrets.encode_targets(&delta)?)?,
                        None => self.secrets.encode_targets(&delta)?,
                    };
                    Ok(sent + remote.upload_targets(&all_ids, &targets)?)
                })?;
                let start = Instant::now();
                remote.start_training(self.cfg.epochs, round == 1, &key)?;
                loss = self.wait_trained(remote, Phase::Refit, round, progress)?;
                journal.record.server_train_s += start.elapsed().as_secs_f64();
                let net = self.secrets.fold(&remote.side_network()?)?;
                if let Some(p) = held_out.as_ref() {
                    rounds.reports.push(self.report(rounds.used + round, &net, p, None)?);
                }
                rounds.refit = round;
                if round == refit_rounds {
                    rounds.kept = Some(net);
                } else {
                    journal.record.reports = rounds.reports.clone();
                    journal.record.step = Step::Refit { after: rounds.used, round: round + 1, train_key: None };
                    journal.save()?;
                }
            }
        }
        Ok(Trained {
            rounds,
            whitening,
            held_out,
            upload_bytes: journal.record.upload_bytes,
            device_forward_s: journal.record.device_forward_s,
            device_train_s: 0.0,
            server_train_s: journal.record.server_train_s,
            loss,
        })
    }
}

impl Run<'_> {
    /// The idempotency key of the current step's training request: the recorded one, or — after `send_targets`
    /// has sent what the round trains on (returning its bytes) — a new one, recorded before it is used.
    fn train_key(
        &self,
        journal: &mut Journal,
        progress: &mut dyn FnMut(&Progress),
        send_targets: impl FnOnce(&mut dyn FnMut(&Progress)) -> Result<u64>,
    ) -> Result<String> {
        let (Step::Round { train_key, .. } | Step::Refit { train_key, .. }) = &journal.record.step else {
            return Err(Error::Internal("no round to train".into()));
        };
        // Asked before a crash or detach: asking again with the key returns that job.
        if let Some(key) = train_key {
            return Ok(key.clone());
        }
        journal.record.upload_bytes += send_targets(progress)?;
        self.cancel.check()?;
        let key = crate::client::idempotency_key()?;
        if let Step::Round { train_key, .. } | Step::Refit { train_key, .. } = &mut journal.record.step {
            *train_key = Some(key.clone());
        }
        journal.save()?;
        Ok(key)
    }

    /// Waits for the server's training job, reporting its epochs as `phase` of `round`; returns its last loss.
    fn wait_trained(
        &self,
        remote: &RemoteSession,
        phase: Phase,
        round: usize,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Option<f64>> {
        remote.wait_trained(self.cfg, |job| {
            self.cancel.check()?;
            progress(&Progress::new(phase, job.epochs_done, job.epochs_total, round, job.loss));
            Ok(())
        })
    }

    /// Sends the validation split for the refit: whitened and rotated as the training examples were, with their
    /// first targets, `upload_chunk` a frame; returns the bytes sent. The split is whitened in small chunks into
    /// one buffer (the whitening's f32 copies are what spikes: `held_out`) and rotated in place, one layer at a
    /// time (the rotations were released after the upload and are drawn again: ≈2 s at SmolLM2's size).
    fn upload_split(&self, remote: &RemoteSession, split: &Pivots, ids: &[SampleId], labels: &[u32]) -> Result<u64> {
        let (t, d) = (self.side.taps, self.side.hidden);
        let (n, per) = (split.taps.dim(0)?, t * d);
        if ids.len() != n || labels.len() != n {
            return Err(Error::Internal(format!("{n} held-back examples, {} ids, {} labels", ids.len(), labels.len())));
        }
        let mut x = Vec::with_capacity(n * per);
        for s in (0..n).step_by(WHITEN_ROWS) {
            let taps = split.taps.narrow(0, s, WHITEN_ROWS.min(n - s))?.to_dtype(DType::F32)?;
            x.extend(device_inputs(&taps, split.whitening.as_ref())?.flatten_all()?.to_vec1::<f32>()?);
        }
        self.secrets.rotate_in_place(&mut x)?;
        let delta = decoys::differences(&split.logits, None, labels, &[], self.cfg.tau)?;
        let y = self.secrets.encode_targets(&delta)?.flatten_all()?.to_vec1::<f32>()?;
        let k_out = self.side.outputs;
        let mut sent = 0;
        for s in (0..n).step_by(self.cfg.upload_chunk) {
            self.cancel.check()?;
            let e = (s + self.cfg.upload_chunk).min(n);
            let acts = x[s * per..e * per].to_vec();
            let frame = Frame::samples(ids[s..e].to_vec(), t, d, acts, k_out, y[s * k_out..e * k_out].to_vec());
            sent += remote.upload_samples(&frame, self.cfg.quant)?;
        }
        Ok(sent)
    }
}

/// Split rows whitened at a time (each chunk's whitening passes through a few f32 copies of it).
const WHITEN_ROWS: usize = 16;

/// How many of `labels` each of the `k` labels has.
fn class_counts(labels: &[u32], k: usize) -> Vec<usize> {
    let mut counts = vec![0; k];
    labels.iter().for_each(|&l| counts[l as usize] += 1);
    counts
}
