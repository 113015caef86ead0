//! The training workers: a fixed set of threads (CPU-bound work never runs on the async runtime) that take jobs
//! from one of two queues:
//! - the embedded store's, in this process: bounded, fair between API keys (round-robin over the keys with work
//!   waiting, FIFO within a key); jobs resumed after a restart go through it too;
//! - the cluster store's, in PostgreSQL: each worker claims jobs from the database (see
//!   `store::cluster::Cluster::claim_job`), polling while there are none.
//!
//! Shutdown stops the workers between epochs and joins them; an interrupted job keeps its state and resumes at
//! the next start (embedded) or once its lease passes (cluster).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub struct Scheduler {
    inner: Arc<Inner>,
}

struct Inner {
    queue: Mutex<Queue>,
    wake: Condvar,
    stop: AtomicBool,
    /// Jobs on a worker now, with the flag that cancels each.
    running: Mutex<HashMap<String, Arc<AtomicBool>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    max_queued: usize,
}

#[derive(Default)]
struct Queue {
    /// Keys with jobs waiting, in the order they are served next.
    turn: VecDeque<String>,
    by_key: HashMap<String, VecDeque<String>>,
    queued: HashSet<String>,
}

/// What a worker does with a session's job (the queue knows ids, not what training is).
pub type JobRunner = Arc<dyn Fn(&str, &JobControl) + Send + Sync>;

/// How a cluster worker claims its next job: `Ok(None)` when there is none; its argument is the worker's name.
pub type JobClaimer = Arc<dyn Fn(&str) -> Result<Option<String>, String> + Send + Sync>;

/// How long a cluster worker waits before asking for a job again when there was none (or the claim failed).
const CLAIM_POLL: Duration = Duration::from_millis(500);

/// What a worker needs to know while it runs a job.
pub struct JobControl {
    cancelled: Arc<AtomicBool>,
    inner: Arc<Inner>,
    /// The worker's name when it holds the job under a lease (cluster store).
    worker: Option<String>,
}

impl JobControl {
    /// The session was deleted, the lease lost, or the server is stopping: leave the job as it stands.
    pub fn should_stop(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst) || self.inner.stop.load(Ordering::SeqCst)
    }

    /// Stops the job at its next epoch (its session is gone, or another worker holds it now).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }

    /// The lease holder's name, which every write of the job must match; `None` in the embedded store.
    pub fn worker(&self) -> Option<&str> {
        self.worker.as_deref()
    }
}

impl Scheduler {
    pub fn new(max_queued: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                queue: Mutex::new(Queue::default()),
                wake: Condvar::new(),
                stop: AtomicBool::new(false),
                running: Mutex::new(HashMap::new()),
                workers: Mutex::new(Vec::new()),
                max_queued,
            }),
        }
    }

    /// Starts `n` workers, each running the jobs it pops from this process's queue with `run`.
    pub fn start(&self, run: JobRunner, n: usize) {
        self.spawn(n, |inner, _| {
            let run = run.clone();
            move || worker(inner, run)
        });
    }

    /// Starts `n` workers named `{process}-{i}`, each running the jobs it claims with `claim` (cluster store).
    pub fn start_claiming(&self, process: &str, claim: JobClaimer, run: JobRunner, n: usize) {
        self.spawn(n, |inner, i| {
            let (name, claim, run) = (format!("{process}-{i}"), claim.clone(), run.clone());
            move || claiming_worker(inner, name, claim, run)
        });
    }

    fn spawn<F: FnOnce() + Send + 'static>(&self, n: usize, body: impl Fn(Arc<Inner>, usize) -> F) {
        let mut workers = self.inner.workers.lock().expect("workers");
        for i in 0..n {
            let handle = std::thread::Builder::new()
                .name(format!("trainer-{i}"))
                .spawn(body(self.inner.clone(), i))
                .expect("spawning a training worker");
            workers.push(handle);
        }
    }

    /// Queues a job; `false` when the queue is full (the caller answers 503).
    pub fn enqueue(&self, id: &str, key_hash: &str) -> bool {
        self.push(id, key_hash, false)
    }

    /// Queues a job resumed at start-up, whatever the queue holds.
    pub fn resume(&self, id: &str, key_hash: &str) {
        self.push(id, key_hash, true);
    }

    fn push(&self, id: &str, key_hash: &str, unbounded: bool) -> bool {
        let mut q = self.inner.queue.lock().expect("queue");
        if q.queued.contains(id) {
            return true;
        }
        if !unbounded && q.queued.len() >= self.inner.max_queued {
            return false;
        }
        q.queued.insert(id.to_string());
        let waiting = q.by_key.entry(key_hash.to_string()).or_default();
        waiting.push_back(id.to_string());
        if waiting.len() == 1 {
            q.turn.push_back(key_hash.to_string());
        }
        self.inner.wake.notify_one();
        true
    }

    /// Takes the job out of the queue, or stops it on its worker (between two epochs).
    pub fn cancel(&self, id: &str) {
        let mut q = self.inner.queue.lock().expect("queue");
        if q.queued.remove(id) {
            for waiting in q.by_key.values_mut() {
                waiting.retain(|j| j != id);
            }
            let Queue { turn, by_key, .. } = &mut *q;
            by_key.retain(|_, w| !w.is_empty());
            turn.retain(|k| by_key.contains_key(k));
        }
        if let Some(flag) = self.inner.running.lock().expect("running").get(id) {
            flag.store(true, Ordering::SeqCst);
        }
    }

    /// Queued or on a worker.
    pub fn is_active(&self, id: &str) -> bool {
        self.inner.queue.lock().expect("queue").queued.contains(id)
            || self.inner.running.lock().expect("running").contains_key(id)
    }

    pub fn queued(&self) -> usize {
        self.inner.queue.lock().expect("queue").queued.len()
    }

    pub fn running(&self) -> usize {
        self.inner.running.lock().expect("running").len()
    }

    /// Stops the workers after their current epoch and joins them, waiting at most `timeout`.
    pub fn shutdown(&self, timeout: Duration) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.wake.notify_all();
        let deadline = Instant::now() + timeout;
        let workers: Vec<_> = self.inner.workers.lock().expect("workers").drain(..).collect();
        for w in workers {
            while !w.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if w.is_finished() {
                let _ = w.join();
            } else {
                tracing::warn!("a training worker did not stop in time; its job resumes at the next start");
            }
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.wake.notify_all();
    }
}

impl Inner {
    /// Waits `timeout`, or until the workers are told to stop.
    fn idle(&self, timeout: Duration) {
        let q = self.queue.lock().expect("queue");
        if !self.stop.load(Ordering::SeqCst) {
            let _ = self.wake.wait_timeout(q, timeout);
        }
    }

    /// The next job, round-robin over keys; `None` once stopping.
    fn pop(&self) -> Option<(String, Arc<AtomicBool>)> {
        let mut q = self.queue.lock().expect("queue");
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return None;
            }
            if let Some(key) = q.turn.pop_front() {
                let waiting = q.by_key.get_mut(&key).expect("a key in turn has jobs");
                let id = waiting.pop_front().expect("a key in turn has jobs");
                if waiting.is_empty() {
                    q.by_key.remove(&key);
                } else {
                    q.turn.push_back(key);
                }
                q.queued.remove(&id);
                let flag = Arc::new(AtomicBool::new(false));
                self.running.lock().expect("running").insert(id.clone(), flag.clone());
                return Some((id, flag));
            }
            q = self.wake.wait(q).expect("queue");
        }
    }
}

fn worker(inner: Arc<Inner>, run: JobRunner) {
    while let Some((id, cancelled)) = inner.pop() {
        let control = JobControl { cancelled, inner: inner.clone(), worker: None };
        run(&id, &control);
        inner.running.lock().expect("running").remove(&id);
    }
}

fn claiming_worker(inner: Arc<Inner>, name: String, claim: JobClaimer, run: JobRunner) {
    while !inner.stop.load(Ordering::SeqCst) {
        match claim(&name) {
            Ok(Some(id)) => {
                let cancelled = Arc::new(AtomicBool::new(false));
                inner.running.lock().expect("running").insert(id.clone(), cancelled.clone());
                let control = JobControl { cancelled, inner: inner.clone(), worker: Some(name.clone()) };
                run(&id, &control);
                inner.running.lock().expect("running").remove(&id);
            }
            Ok(None) => inner.idle(CLAIM_POLL),
            Err(e) => {
                tracing::error!(worker = %name, error = %e, "cannot claim a training job");
                inner.idle(CLAIM_POLL);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(s: &Scheduler, n: usize) -> Vec<String> {
        (0..n).map(|_| s.inner.pop().unwrap().0).collect()
    }

    #[test]
    fn keys_take_turns_and_each_key_is_first_in_first_out() {
        let s = Scheduler::new(10);
        for (id, key) in [("a1", "A"), ("a2", "A"), ("a3", "A"), ("b1", "B"), ("c1", "C"), ("b2", "B")] {
            assert!(s.enqueue(id, key));
        }
        assert_eq!(order(&s, 6), ["a1", "b1", "c1", "a2", "b2", "a3"]);
        assert_eq!(s.running(), 6, "popped jobs count as running until their worker ends them");
    }

    #[test]
    fn the_queue_is_bounded_and_cancel_takes_a_job_out() {
        let s = Scheduler::new(2);
        assert!(s.enqueue("a1", "A") && s.enqueue("a2", "A"));
        assert!(s.enqueue("a1", "A"), "queuing a queued job again is a no-op");
        assert!(!s.enqueue("b1", "B"), "full");
        s.resume("b1", "B"); // start-up resumes ignore the bound
        s.cancel("a1");
        assert!(!s.is_active("a1"));
        assert_eq!(order(&s, 2), ["a2", "b1"]);
        assert_eq!(s.queued(), 0);
    }
}
