//! One `pae` training job, as a worker runs it: reserve its memory, stack the session's cached samples, and train
//! the remaining epochs, annealing the learning rate to zero over the job's epochs. After every epoch the job stores a checkpoint of the weights together with its progress
//! in one transaction, so a restarted server resumes from the last finished epoch. The optimiser's moments are not
//! checkpointed: a resumed job restarts AdamW's running averages, which costs a little progress, never
//! correctness. A job that stops the process twice before its first checkpoint is failed, not retried.
//!
//! With the cluster store a worker holds the job under a lease, renewed by a heartbeat every third of its length;
//! every write of the job checks the lease is still this worker's, so a worker that stalled past its lease (and
//! whose job another worker has claimed) stops at its next epoch without writing anything.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use mobillm_core::protocol::JobStatus;
use mobillm_core::side::{weights_file, Objective, SideTrainer};

use crate::budget::Cost;
use crate::scheduler::JobControl;
use crate::state::AppState;
use crate::store::{now_unix, Refusal, SessionRecord};

/// Start-ups without a checkpoint after which a job is failed instead of run again.
const MAX_START_ATTEMPTS: u32 = 2;

/// Runs the session's queued job; failures are recorded in the job state.
pub fn run(state: &AppState, id: &str, control: &JobControl) {
    let rec = match state.store.session(id) {
        Ok(Some(rec)) if rec.job.status.is_active() => rec,
        Ok(_) => return, // deleted or no longer wanted
        Err(e) => return tracing::error!(session = %id, error = %e, "cannot read a queued job"),
    };
    if rec.start_attempts >= MAX_START_ATTEMPTS {
        return fail(
            state,
            id,
            control.worker(),
            "the job stopped the server while starting, twice; it is not run again".into(),
        );
    }
    let started = state.store.update(id, |r| {
        holds_lease(r, control.worker())?;
        r.job.status = JobStatus::Running;
        r.start_attempts += 1;
        Ok(r.clone())
    });
    let rec = match started {
        Ok(Ok(rec)) => rec,
        Ok(Err(_)) => return,
        Err(e) => return fail(state, id, control.worker(), e.to_string()),
    };
    match with_heartbeat(state, id, control, || train(state, rec, control)) {
        Ok(()) => {}
        Err(message) if !control.should_stop() => fail(state, id, control.worker(), message),
        Err(message) => {
            // Stopped on purpose (deleted, lease lost, or the worker is stopping): this start did not crash
            // anything, and the job is free for the next worker at once.
            tracing::info!(session = %id, %message, "training stopped");
            let _ = state.store.update(id, |r| {
                holds_lease(r, control.worker())?;
                r.start_attempts = r.start_attempts.saturating_sub(1);
                r.lease = None;
                Ok(())
            });
        }
    }
}

/// Refuses a write by a worker that no longer holds the job's lease (there are no leases in the embedded store).
fn holds_lease(r: &SessionRecord, worker: Option<&str>) -> Result<(), Refusal> {
    match worker {
        Some(worker) if r.lease.as_ref().is_none_or(|l| l.worker != worker) => {
            Err(Refusal::Conflict("another worker holds this job now".into()))
        }
        _ => Ok(()),
    }
}

/// Runs `f` while a heartbeat renews the job's lease (cluster store); a heartbeat that finds the session gone or
/// the lease taken stops the job.
fn with_heartbeat<R>(state: &AppState, id: &str, control: &JobControl, f: impl FnOnce() -> R) -> R {
    if control.worker().is_none() {
        return f();
    }
    let lease = state.config.lease_secs();
    let period = Duration::from_secs(lease) / 3;
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut renewed = Instant::now();
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
                if renewed.elapsed() < period {
                    continue;
                }
                renewed = Instant::now();
                let renewal = state.store.update(id, |r| {
                    holds_lease(r, control.worker())?;
                    if let Some(l) = &mut r.lease {
                        l.until_unix = now_unix() + lease;
                    }
                    Ok(())
                });
                match renewal {
                    Ok(Ok(())) => {}
                    Ok(Err(refusal)) => {
                        tracing::warn!(session = %id, ?refusal, "the job's lease is lost; stopping it");
                        control.cancel();
                        return;
                    }
                    // The database may be back before the lease passes; if not, another worker takes over.
                    Err(e) => tracing::warn!(session = %id, error = %e, "cannot renew the job's lease"),
                }
            }
        });
        let out = f();
        done.store(true, Ordering::SeqCst);
        out
    })
}

fn fail(state: &AppState, id: &str, worker: Option<&str>, message: String) {
    tracing::warn!(session = %id, %message, "training failed");
    let _ = state.store.update(id, |r| {
        holds_lease(r, worker)?;
        r.job.status = JobStatus::Failed;
        r.job.message = Some(message);
        Ok(())
    });
}

fn train(state: &AppState, rec: SessionRecord, control: &JobControl) -> Result<(), String> {
    let cost = Cost::of(&rec.shape, &rec.side, rec.train.batch_size).ok_or("the session is too large to train")?;
    let bytes = cost.job(rec.samples as u64).ok_or("the session is too large to train")?;
    // Wait for memory in slices, so a cancel or a shutdown is noticed.
    let _reservation = loop {
        if control.should_stop() {
            return Err("stopped while waiting for memory".into());
        }
        if bytes > state.budget.total() {
            return Err(format!("the job needs {bytes} bytes, more than the server's memory budget"));
        }
        if let Some(r) = state.reserve_waiting(bytes, Duration::from_millis(500)) {
            break r;
        }
    };
    let set = state.store.training_set(&rec).map_err(|e| e.to_string())?;
    let n = set.ids.len();
    if n == 0 {
        return Err("the session has no samples".into());
    }
    let (done, total) = (rec.job.epochs_done, rec.job.epochs_total);
    // One job is one `pae` round: it ends at a learning rate near zero, and a resumed job continues the schedule.
    let trainer = match rec.fresh_weights {
        true => SideTrainer::new(&rec.side, &rec.train).map_err(|e| e.to_string())?,
        false => load_trainer(state, &rec)?,
    };
    let mut trainer = trainer.annealed(done, total);
    let (t, d, k) = (rec.shape.layers, rec.shape.dim, rec.shape.outputs);
    let x = Tensor::from_vec(set.x, (n, t, d), &Device::Cpu).map_err(|e| e.to_string())?;
    let targets = Tensor::from_vec(set.targets, (n, k), &Device::Cpu).map_err(|e| e.to_string())?;
    let objective = Objective::Regression { targets };
    tracing::info!(session = %rec.id, samples = n, done, total, "training");
    let mut failure = None;
    let mut epoch_started = Instant::now();
    let mut epochs_done = done;
    trainer
        .fit(&x, &objective, total.saturating_sub(done), |report, net| {
            if control.should_stop() {
                return ControlFlow::Break(());
            }
            state.metrics.trained_samples.inc_by(report.samples as u64);
            state.metrics.training_seconds.inc_by(epoch_started.elapsed().as_secs_f64());
            epochs_done += 1;
            let saved =
                weights_file::to_bytes(&net.tensors(), HashMap::new()).map_err(|e| e.to_string()).and_then(|w| {
                    let update = |r: &mut SessionRecord| {
                        holds_lease(r, control.worker())?;
                        r.job.epochs_done = epochs_done;
                        r.job.loss = Some(report.loss);
                        r.fresh_weights = false;
                        r.start_attempts = 0;
                        if epochs_done >= r.job.epochs_total {
                            r.job.status = JobStatus::Done;
                        }
                        Ok::<_, Refusal>(())
                    };
                    match state.store.checkpoint(&rec.id, Some(&w), update) {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(Refusal::Gone)) => Err("the session was deleted".to_string()),
                        Ok(Err(refusal)) => {
                            control.cancel();
                            Err(format!("{refusal:?}"))
                        }
                        Err(e) => Err(e.to_string()),
                    }
                });
            epoch_started = Instant::now();
            match saved {
                Ok(()) => ControlFlow::Continue(()),
                Err(e) => {
                    failure = Some(e);
                    ControlFlow::Break(())
                }
            }
        })
        .map_err(|e| e.to_string())?;
    match failure {
        Some(e) => Err(e),
        None if control.should_stop() => Err("stopped".into()),
        None => Ok(()),
    }
}

/// The session's network as last checkpointed, or a fresh one (whose outputs are zero) before any training.
pub fn load_trainer(state: &AppState, rec: &SessionRecord) -> Result<SideTrainer, String> {
    match state.store.weights(&rec.id).map_err(|e| e.to_string())? {
        Some(bytes) => {
            let (tensors, _) = weights_file::from_bytes(&bytes)?;
            SideTrainer::from_tensors(&rec.side, &rec.train, weights_file::as_refs(&tensors))
        }
        None => SideTrainer::new(&rec.side, &rec.train),
    }
    .map_err(|e| e.to_string())
}

/// At start-up: queues the jobs a previous process left queued or running, and fails those that stopped it
/// twice while starting.
pub fn resume_all(state: &AppState) -> Result<usize, String> {
    let mut resumed = Vec::new();
    state
        .store
        .for_each_session(|rec| {
            if rec.job.status.is_active() {
                resumed.push(rec);
            }
        })
        .map_err(|e| e.to_string())?;
    let mut n = 0;
    for rec in resumed {
        if rec.start_attempts >= MAX_START_ATTEMPTS {
            fail(state, &rec.id, None, "the job stopped the server while starting, twice; it is not run again".into());
            continue;
        }
        tracing::info!(session = %rec.id, done = rec.job.epochs_done, total = rec.job.epochs_total, "resuming training");
        state.scheduler.resume(&rec.id, &rec.key_hash);
        n += 1;
    }
    Ok(n)
}
