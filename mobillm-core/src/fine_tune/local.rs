//! The `local` loop: no server, nothing leaves the device. Every training example is forwarded once; its pivots,
//! normalised as the adapter will see them, are kept as int8 rows (`side::int8_rows`: 17 KB an example on
//! SmolLM2-135M) with its label logits `z_b`. The device then trains the side network itself on the labels:
//! cross-entropy of `z_b + o`, the objective of the labels-on-server baseline (docs/side-network.md). Training
//! runs in rounds of `epochs` epochs, each with a fresh optimiser and its learning rate annealed to zero — what
//! a `pae` server does per round — and stops, as `pae` does, at the first round that does not improve the
//! validation split (`stopping`), keeping the last network that did. No secrets: there is nobody to hide from,
//! so the adapter has no rotation or whitening to fold, and one output per label.

use std::ops::ControlFlow;
use std::time::Instant;

use candle_core::{Device, Tensor};

use super::progress::{Phase, Progress};
use super::stopping::ROUNDS_WITHOUT_VALIDATION;
use super::{Rounds, Run, Trained};
use crate::backbone::batching::scatter_rows;
use crate::dataset::Example;
use crate::error::{Error, Result};
use crate::side::int8_rows::{Int8Rows, Int8RowsWriter};
use crate::side::{normalize_taps, Objective, SideNet, SideTrainer, TrainConfig};

/// The most the kept pivots may take: 256 MiB is about 15 000 examples of SmolLM2-135M's 30 × 576 pivots. A larger
/// set is refused before anything is forwarded, rather than running the phone out of memory halfway.
pub const MAX_KEPT_BYTES: usize = 256 << 20;

/// Refuses a training set whose kept pivots would pass [`MAX_KEPT_BYTES`].
fn check_kept_bytes(n: usize, taps: usize, hidden: usize) -> Result<()> {
    let bytes = Int8Rows::bytes_for(n, taps, hidden);
    if bytes > MAX_KEPT_BYTES {
        return Err(Error::InvalidInput(format!(
            "{n} training examples would keep {} MB of pivots on the device in `local` mode (at most {} MB): \
             use fewer examples or `pae` mode",
            bytes >> 20,
            MAX_KEPT_BYTES >> 20
        )));
    }
    Ok(())
}

impl Run<'_> {
    pub(super) fn local(
        &self,
        train: &[Example],
        labels: &[u32],
        (validation, validation_labels): (&[Example], &[u32]),
        test: &[Example],
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Trained> {
        let n = train.len();
        check_kept_bytes(n, self.side.taps, self.side.hidden)?;
        let started = Instant::now();
        let (x, z_b) = self.forward_to_keep(train, progress)?;
        let device_forward_s = started.elapsed().as_secs_f64();
        let objective = Objective::CrossEntropy { labels: Tensor::new(labels, &Device::Cpu)?, prior: z_b };
        let validation_pivots = self.forward_held_out(validation, None, progress)?;
        let held_out = self.forward_test(test, None, progress)?;
        // The forwards are over: what their batches left free in the heap goes back before training allocates.
        crate::memory::release_free_pages();

        let tc = TrainConfig {
            lr: self.cfg.lr,
            batch_size: self.cfg.epoch_batch(n),
            epochs: self.cfg.epochs,
            seed: self.cfg.seed,
            ..TrainConfig::default()
        };
        let mut trainer = SideTrainer::new(self.side, &tc)?;
        let (mut rounds, mut loss, mut train_s) = (Rounds::default(), None, 0.0);
        let max_rounds = match validation.is_empty() {
            true => self.cfg.max_rounds.min(ROUNDS_WITHOUT_VALIDATION),
            false => self.cfg.max_rounds,
        };
        for round in 1..=max_rounds {
            self.cancel.check()?;
            let start = Instant::now();
            // Each round a fresh optimiser over the last round's weights (the first has one already).
            if round > 1 {
                trainer = SideTrainer::from_tensors(self.side, &tc, trainer.tensors())?;
            }
            trainer = trainer.annealed(0, tc.epochs);
            let reports = trainer.fit(&x, &objective, tc.epochs, |r, _| {
                progress(&Progress::new(Phase::Train, r.epoch, r.epochs, round, Some(r.loss)));
                match self.cancel.check() {
                    Err(_) => ControlFlow::Break(()),
                    Ok(()) => ControlFlow::Continue(()),
                }
            })?;
            self.cancel.check()?;
            train_s += start.elapsed().as_secs_f64();
            loss = reports.last().map(|r| r.loss);
            // Detached parameters: a network of `Var`s would record a graph while scoring and hold every scored
            // chunk's intermediates until the end (measured: +90 MB at each round's end).
            let net = SideNet::from_tensors(self.side, &trainer.tensors())?;
            let validation = validation_pivots.as_ref().map(|v| (v, validation_labels));
            if self.end_round(&mut rounds, round, net, held_out.as_ref(), validation)?.is_break() {
                break;
            }
        }
        Ok(Trained {
            rounds,
            whitening: None,
            held_out,
            upload_bytes: 0,
            device_forward_s,
            server_train_s: 0.0,
            device_train_s: train_s,
            loss,
        })
    }

    /// Forwards the training examples and keeps what training needs: their normalised pivots as int8 rows and
    /// their label logits `[N, K]`.
    fn forward_to_keep(&self, train: &[Example], progress: &mut dyn FnMut(&Progress)) -> Result<(Int8Rows, Tensor)> {
        let (n, k) = (train.len(), self.side.labels);
        let mut rows = Int8RowsWriter::new(n, self.side.taps, self.side.hidden);
        let mut z_b = vec![0f32; n * k];
        self.forward_each(train, (Phase::Forward, 1), progress, |group, inputs, logits| {
            rows.write(group, &normalize_taps(inputs)?)?;
            scatter_rows(logits, group, k, &mut z_b)
        })?;
        Ok((rows.finish(), Tensor::from_vec(z_b, (n, k), &Device::Cpu)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_whose_pivots_would_not_fit_is_refused_by_name() {
        check_kept_bytes(2400, 30, 576).unwrap();
        check_kept_bytes(15_000, 30, 576).unwrap();
        let err = check_kept_bytes(20_000, 30, 576).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidInput(m) if m.contains("20000 training examples") && m.contains("256 MB")),
            "{err}"
        );
    }
}
