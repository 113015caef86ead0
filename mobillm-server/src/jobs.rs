//! Training jobs: one OS thread per training session (CPU-bound work stays off the async runtime). After every
//! epoch the job stores a checkpoint of the weights together with its progress in one transaction, so a restarted
//! server resumes from the last finished epoch ([`resume_all`]). The optimiser's moments are not checkpointed:
//! a resumed job restarts AdamW's running averages, which costs a little progress, never correctness.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::Arc;

use mobillm_core::side::sample::stack_samples;
use mobillm_core::side::{weights_file, Objective, SideTrainer};

use crate::store::{JobStatus, SessionRecord};
use crate::AppState;

/// Starts training `epochs` epochs for the session (resuming from its checkpoint, if any) on a new thread.
/// The caller has marked the session as running in `state.running`.
pub fn spawn(state: Arc<AppState>, rec: SessionRecord) {
    let id = rec.id.clone();
    std::thread::Builder::new()
        .name(format!("train-{}", &id[..8.min(id.len())]))
        .spawn(move || {
            let result = run(&state, rec.clone());
            if let Err(message) = result {
                tracing::error!(session = %id, %message, "training failed");
                let mut failed = rec;
                if let Ok(Some(latest)) = state.store.session(&id) {
                    failed = latest;
                }
                failed.job.status = JobStatus::Failed;
                failed.job.message = Some(message);
                let _ = state.store.put_checkpoint(&failed, None);
            }
            state.running.lock().expect("running set").remove(&id);
        })
        .expect("spawning a training thread");
}

fn run(state: &AppState, mut rec: SessionRecord) -> Result<(), String> {
    let samples = state.store.samples(&rec.id, &rec.shape).map_err(|e| e.to_string())?;
    let mut trainer = load_trainer(state, &rec)?;
    let (x, targets) = stack_samples(&trainer, &samples).map_err(|e| e.to_string())?;
    let objective = Objective::Regression { targets };
    tracing::info!(session = %rec.id, samples = samples.len(), done = rec.job.epochs_done, total = rec.job.epochs_total, "training");
    // One `fit` for all remaining epochs (the data is validated once); each epoch's weights and progress are
    // checkpointed together from the callback.
    let mut failure = None;
    let remaining = rec.job.epochs_total.saturating_sub(rec.job.epochs_done);
    let mut epoch_started = std::time::Instant::now();
    trainer
        .fit(&x, &objective, remaining, |report, net| {
            // A deleted session stops its job; nothing is written back.
            if !matches!(state.store.session(&rec.id), Ok(Some(_))) {
                tracing::info!(session = %rec.id, "session deleted; training stopped");
                return ControlFlow::Break(());
            }
            state.metrics.trained_samples.inc_by(report.samples as u64);
            state.metrics.training_seconds.inc_by(epoch_started.elapsed().as_secs_f64());
            rec.job.epochs_done += 1;
            rec.job.loss = Some(report.loss);
            if rec.job.epochs_done == rec.job.epochs_total {
                rec.job.status = JobStatus::Done;
            }
            let saved = weights_file::to_bytes(&net.tensors(), HashMap::new())
                .map_err(|e| e.to_string())
                .and_then(|w| state.store.put_checkpoint(&rec, Some(&w)).map_err(|e| e.to_string()));
            epoch_started = std::time::Instant::now();
            match saved {
                Ok(()) => ControlFlow::Continue(()),
                Err(e) => {
                    failure = Some(e);
                    ControlFlow::Break(())
                }
            }
        })
        .map_err(|e| e.to_string())?;
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(())
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

/// Marks sessions whose job was running when the server stopped and starts them again.
pub fn resume_all(state: &Arc<AppState>) -> Result<usize, String> {
    let mut resumed = 0;
    for rec in state.store.all_sessions().map_err(|e| e.to_string())? {
        if rec.job.status == JobStatus::Running && state.running.lock().expect("running set").insert(rec.id.clone()) {
            tracing::info!(session = %rec.id, done = rec.job.epochs_done, total = rec.job.epochs_total, "resuming training");
            spawn(state.clone(), rec);
            resumed += 1;
        }
    }
    Ok(resumed)
}
