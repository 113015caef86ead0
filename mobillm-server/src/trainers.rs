//! `mobillm`-mode trainers kept in memory between step requests (with their optimiser state), each holding its
//! memory from the budget. A session has one slot: a step takes it before decoding anything, so concurrent steps
//! of one session are refused rather than stacked. When the budget runs short, idle trainers are evicted,
//! least recently used first; an evicted trainer is rebuilt from the session's checkpoint (every answered step
//! is checkpointed), losing only AdamW's moments. So is a trainer whose session another replica has stepped since
//! (behind a load balancer without session affinity): the record's step count tells.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use mobillm_core::side::SideTrainer;

use crate::budget::{Budget, Reservation};

#[derive(Default)]
pub struct LiveTrainers {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

pub struct Slot {
    pub trainer: Mutex<Option<Live>>,
    /// Milliseconds since `EPOCH` at the last step.
    last_used: AtomicU64,
}

/// A loaded trainer, the session's step count it has trained to, and the memory it holds.
pub struct Live {
    pub trainer: SideTrainer,
    pub steps: usize,
    pub _reservation: Reservation,
}

static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

fn now_ms() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl LiveTrainers {
    /// The session's slot, created empty on first use.
    pub fn slot(&self, id: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().expect("trainer slots");
        let slot = slots
            .entry(id.to_string())
            .or_insert_with(|| Arc::new(Slot { trainer: Mutex::new(None), last_used: AtomicU64::new(0) }))
            .clone();
        slot.last_used.store(now_ms(), Ordering::Relaxed);
        slot
    }

    pub fn remove(&self, id: &str) {
        self.slots.lock().expect("trainer slots").remove(id);
    }

    /// Trainers loaded now.
    pub fn loaded(&self) -> usize {
        let slots: Vec<_> = self.slots.lock().expect("trainer slots").values().cloned().collect();
        slots.iter().filter(|s| s.trainer.try_lock().map_or(true, |t| t.is_some())).count()
    }

    /// Unloads idle trainers, least recently used first, until `need` bytes of `budget` are free. Returns
    /// whether they are.
    pub fn evict_for(&self, budget: &Budget, need: u64) -> bool {
        let mut slots: Vec<_> = self.slots.lock().expect("trainer slots").values().cloned().collect();
        slots.sort_by_key(|s| s.last_used.load(Ordering::Relaxed));
        for slot in slots {
            if budget.total().saturating_sub(budget.used()) >= need {
                return true;
            }
            // A slot in use is not idle; `take` drops the trainer and its reservation.
            if let Ok(mut t) = slot.trainer.try_lock() {
                if t.take().is_some() {
                    tracing::info!("evicted an idle mobillm trainer to free memory");
                }
            }
        }
        budget.total().saturating_sub(budget.used()) >= need
    }
}
