//! Session expiry: a session that has had no request for the idle TTL, and has no training queued or running,
//! is deleted with all its data. Orphans (an app killed mid fine-tune, a client that gave up) so give their
//! memory, disk and their key's session slot back without anyone's help.

use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::state::AppState;
use crate::store::now_unix;

/// Checks every `max(ttl / 10, 1 s)` (at most every minute) until the state is dropped.
pub async fn run(state: Weak<AppState>) {
    let period = match state.upgrade() {
        Some(s) => (s.config.idle_ttl() / 10).clamp(Duration::from_secs(1), Duration::from_secs(60)),
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(state) = state.upgrade() else { return };
        let reaped = tokio::task::spawn_blocking(move || reap(&state)).await;
        match reaped {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(sessions = n, "expired sessions deleted"),
            Ok(Err(e)) => tracing::error!(error = %e, "session expiry failed"),
            Err(e) => tracing::error!(error = %e, "session expiry task failed"),
        }
    }
}

/// Deletes the sessions idle past the TTL; returns how many. Reads seen in memory but not yet in a record are
/// written back once they lag by a quarter of the TTL, so a restart does not expire a session in use.
pub fn reap(state: &Arc<AppState>) -> Result<usize, crate::store::StoreError> {
    let (now, ttl) = (now_unix(), state.config.idle_ttl().as_secs());
    let (mut expired, mut lagging) = (Vec::new(), Vec::new());
    state.store.for_each_session(|rec| {
        let seen = state.last_seen(&rec.id).unwrap_or(0);
        let last = rec.last_used_unix.max(seen);
        let busy = rec.job.status.is_active() || state.scheduler.is_active(&rec.id);
        if !busy && now.saturating_sub(last) >= ttl {
            expired.push(rec.id);
        } else if seen > rec.last_used_unix + ttl / 4 {
            lagging.push((rec.id, seen));
        }
    })?;
    for (id, seen) in lagging {
        state
            .store
            .update(&id, |r| {
                r.last_used_unix = r.last_used_unix.max(seen);
                Ok(())
            })?
            .ok();
    }
    let mut n = 0;
    for id in expired {
        // A request may have arrived since the scan.
        if state.last_seen(&id).is_some_and(|seen| now_unix().saturating_sub(seen) < ttl) {
            continue;
        }
        if state.delete_session(&id).unwrap_or(false) {
            tracing::info!(session = %id, "session expired");
            state.metrics.sessions_reaped.inc();
            n += 1;
        }
    }
    Ok(n)
}
