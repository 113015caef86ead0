//! The memory budget: one pool of bytes that every request body, frame decode, training step, training job,
//! outputs computation and live trainer reserves from before it allocates, and gives back when it ends
//! ([`Reservation`] is a guard). What cannot be reserved at once is refused with 503 and `Retry-After` (requests)
//! or waited for (queued training jobs). Together with the bounds on every client-chosen size this keeps the
//! process's memory under the configured budget plus a fixed baseline, whatever clients send.
//!
//! [`Cost`] estimates what each kind of work holds, from the session's shape, with checked arithmetic: a shape
//! whose cost overflows is simply too large.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use mobillm_core::side::trainer::OUTPUT_BATCH;
use mobillm_core::side::SideConfig;

use crate::store::SessionShape;

pub struct Budget {
    total: u64,
    used: Mutex<u64>,
    freed: Condvar,
}

/// Bytes held from the budget until dropped.
pub struct Reservation {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Budget {
    pub fn new(total: u64) -> Arc<Self> {
        Arc::new(Self { total, used: Mutex::new(0), freed: Condvar::new() })
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn used(&self) -> u64 {
        *self.used.lock().expect("budget lock")
    }

    /// Reserves `bytes` if they are free now.
    pub fn try_reserve(self: &Arc<Self>, bytes: u64) -> Option<Reservation> {
        let mut used = self.used.lock().expect("budget lock");
        if bytes > self.total.saturating_sub(*used) {
            return None;
        }
        *used += bytes;
        Some(Reservation { budget: self.clone(), bytes })
    }

    /// Waits up to `timeout` for `bytes` to be free (a worker thread's wait; never on an async task).
    pub fn reserve_within(self: &Arc<Self>, bytes: u64, timeout: Duration) -> Option<Reservation> {
        let used = self.used.lock().expect("budget lock");
        let (mut used, _) = self
            .freed
            .wait_timeout_while(used, timeout, |used| bytes > self.total.saturating_sub(*used))
            .expect("budget lock");
        if bytes > self.total.saturating_sub(*used) {
            return None;
        }
        *used += bytes;
        Some(Reservation { budget: self.clone(), bytes })
    }
}

impl Reservation {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut used = self.budget.used.lock().expect("budget lock");
        *used = used.saturating_sub(self.bytes);
        self.budget.freed.notify_all();
    }
}

/// What one session's work holds in memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    /// The side network's parameters (f32).
    pub params: u64,
    /// A trainer: parameters, gradients, AdamW's two moments, and the detached copy and file of a checkpoint.
    pub trainer: u64,
    /// One mini-batch's forward graph kept for the backward pass, with its gradients.
    pub batch: u64,
    /// A forward pass without gradients over [`OUTPUT_BATCH`] rows (what outputs are computed in).
    pub forward: u64,
    /// One cached sample in a training set (f16 activations, f32 target, id).
    pub sample: u64,
}

impl Cost {
    /// `None` when the shape is too large to count in 64 bits (and so far too large to serve).
    pub fn of(shape: &SessionShape, side: &SideConfig, batch_size: usize) -> Option<Cost> {
        let m = |a: usize, b: usize| (a as u64).checked_mul(b as u64);
        // Members sit side by side: their widths and ranks add up (w and r below), each adapter still maps one
        // member's width to its rank.
        let (t, d, k, e) = (side.taps, side.hidden, side.outputs, side.members);
        let (w, r) = (side.width.checked_mul(e)?, side.rank.checked_mul(e)?);
        let params = m(t, w)?
            .checked_mul(d as u64)?
            .checked_add(m(t, e)?)?
            .checked_add(m(t, r)?.checked_mul(2 * side.width as u64)?)?
            .checked_add(m(k, w)?)?;
        let f32s = |n: u64| n.checked_mul(4);
        let trainer = f32s(params)?.checked_mul(6)?;
        // Per sample and tap: the input row three times (as cached, as f32, transposed for the projections), and
        // about eight width-sized and four rank-sized intermediates; doubled for their gradients.
        let per_row = m(3, d)?.checked_add(m(8, w)?)?.checked_add(m(4, r)?)?;
        let batch = f32s(m(batch_size, t)?.checked_mul(per_row)?)?.checked_mul(2)?;
        let forward = f32s(m(OUTPUT_BATCH, t)?.checked_mul(per_row)?)?;
        let sample = (shape.stored_sample_len() as u64).checked_add(16)?;
        Some(Cost { params, trainer, batch, forward, sample })
    }

    /// A training job over `samples` cached samples: the stacked set, the trainer, one batch.
    pub fn job(&self, samples: u64) -> Option<u64> {
        self.sample.checked_mul(samples)?.checked_add(self.trainer)?.checked_add(self.batch)
    }

    /// Outputs for `samples` samples: the stacked set, the network (with an optimiser state the loader makes),
    /// one forward batch, the answer frame.
    pub fn outputs(&self, samples: u64, outputs: usize) -> Option<u64> {
        let answer = samples.checked_mul(16 + 8 * outputs as u64)?;
        self.sample
            .checked_mul(samples)?
            .checked_add(self.params.checked_mul(16)?)?
            .checked_add(self.forward)?
            .checked_add(answer)
    }

    /// A `mobillm` step whose frame decodes to `decoded` body bytes of which activations expand by `expansion`
    /// (bytes of f32 per body byte), besides the live trainer: the body, its activations, pivots and one batch.
    pub fn step(&self, decoded: u64, expansion: u64) -> Option<u64> {
        decoded.checked_mul(expansion.checked_add(2)?)?.checked_add(self.batch)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use mobillm_core::protocol::Mode;

    use super::*;

    fn shape(layers: usize, dim: usize) -> SessionShape {
        SessionShape { mode: Mode::Pae, layers, dim, outputs: 8, backbone: "x".into() }
    }

    #[test]
    fn costs_follow_the_shape_and_overflow_is_too_large() {
        let side = SideConfig { width: 128, rank: 16, members: 1, ..SideConfig::new(30, 576, 2) };
        let c = Cost::of(&shape(30, 576), &side, 128).unwrap();
        // SmolLM2-135M, one side network of width 128: 2.24 M parameters; a cached sample is 34.6 KB.
        assert_eq!(c.params, 30 * 128 * 576 + 30 + 2 * 30 * 16 * 128 + 8 * 128);
        // Two members of width 64 side by side: the same projections, half the adapters' weights.
        let two = SideConfig { width: 64, members: 2, ..side.clone() };
        let c2 = Cost::of(&shape(30, 576), &two, 128).unwrap();
        assert_eq!(c2.params, 30 * 128 * 576 + 30 * 2 + 2 * 30 * 16 * 64 * 2 + 8 * 128);
        assert_eq!(c.sample, (2 * 30 * 576 + 4 * 8 + 16) as u64);
        assert!(c.job(2400).unwrap() > c.job(100).unwrap());
        let huge = SideConfig { width: usize::MAX / 4, ..side };
        assert_eq!(Cost::of(&shape(30, 576), &huge, 128), None);
        assert_eq!(c.job(u64::MAX), None);
    }

    #[test]
    fn reservations_hold_bytes_until_dropped() {
        let budget = Budget::new(100);
        assert!(budget.try_reserve(101).is_none());
        let a = budget.try_reserve(60).unwrap();
        assert!(budget.try_reserve(50).is_none());
        assert_eq!(budget.used(), 60);
        let waiter = {
            let budget = budget.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                let r = budget.reserve_within(50, Duration::from_secs(10));
                (r.map(|r| r.bytes()), started.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        drop(a);
        let (got, _) = waiter.join().unwrap();
        assert_eq!(got, Some(50), "the waiter got the bytes once they were given back");
        assert_eq!(budget.used(), 0, "and gave them back in turn");
        assert!(budget.reserve_within(101, Duration::from_millis(10)).is_none());
    }
}
