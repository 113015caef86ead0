//! Prometheus metrics, served by the admin listener (text exposition format). Counters are updated where the
//! work happens; gauges are read when scraped from sources that cost no scan (the store's usage row, the queue,
//! the budget). Labels are bounded: route templates (never a session id) and a fixed set of methods.

use std::sync::atomic::AtomicU64;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    /// By method, route template and status code.
    pub requests: Family<Labels, Counter>,
    /// Request body bytes actually read.
    pub request_bytes: Counter,
    pub samples_stored: Counter,
    /// Samples sent again that the session held already (a device resending a frame whose answer it lost).
    pub samples_duplicate: Counter,
    /// Samples × epochs the trainer went through (`pae` jobs and `mobillm` steps).
    pub trained_samples: Counter,
    pub training_seconds: Counter<f64, AtomicU64>,
    /// Requests refused because the memory budget was in use.
    pub overloaded: Counter,
    pub sessions_reaped: Counter,
    /// Cluster store: jobs this process's workers claimed after another worker's lease on them passed.
    pub jobs_reclaimed: Counter,
    pub connections_open: Gauge,
    /// Idle connections closed to make room for a new one, and new ones refused for want of room.
    pub connections_evicted: Counter,
    pub connections_refused: Counter,
    pub sessions: Gauge,
    pub stored_bytes: Gauge,
    pub queued_jobs: Gauge,
    pub running_jobs: Gauge,
    pub live_trainers: Gauge,
    pub memory_reserved_bytes: Gauge,
    pub memory_budget_bytes: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Self {
            registry: Registry::with_prefix("mobillm"),
            requests: Family::default(),
            request_bytes: Counter::default(),
            samples_stored: Counter::default(),
            samples_duplicate: Counter::default(),
            trained_samples: Counter::default(),
            training_seconds: Counter::default(),
            overloaded: Counter::default(),
            sessions_reaped: Counter::default(),
            jobs_reclaimed: Counter::default(),
            connections_open: Gauge::default(),
            connections_evicted: Counter::default(),
            connections_refused: Counter::default(),
            sessions: Gauge::default(),
            stored_bytes: Gauge::default(),
            queued_jobs: Gauge::default(),
            running_jobs: Gauge::default(),
            live_trainers: Gauge::default(),
            memory_reserved_bytes: Gauge::default(),
            memory_budget_bytes: Gauge::default(),
        };
        let r = &mut m.registry;
        r.register("http_requests", "HTTP requests by method, route and status", m.requests.clone());
        r.register("request_body_bytes", "Bytes of request bodies read", m.request_bytes.clone());
        r.register("samples_stored", "New samples stored (duplicates excluded)", m.samples_stored.clone());
        r.register(
            "samples_duplicate",
            "Samples received again that their session held already",
            m.samples_duplicate.clone(),
        );
        r.register("trained_samples", "Samples processed by training, once per epoch", m.trained_samples.clone());
        r.register("training_seconds", "Wall seconds spent training", m.training_seconds.clone());
        r.register("overloaded", "Requests refused with 503: memory budget in use", m.overloaded.clone());
        r.register("sessions_reaped", "Sessions deleted after their idle TTL", m.sessions_reaped.clone());
        r.register(
            "jobs_reclaimed",
            "Jobs claimed after the lease of the worker that held them passed",
            m.jobs_reclaimed.clone(),
        );
        r.register("connections_open", "Open API connections", m.connections_open.clone());
        r.register(
            "connections_evicted",
            "Idle API connections closed to admit new ones",
            m.connections_evicted.clone(),
        );
        r.register(
            "connections_refused",
            "API connections refused at the connection cap",
            m.connections_refused.clone(),
        );
        r.register("sessions", "Sessions in the store", m.sessions.clone());
        r.register("stored_bytes", "Bytes of samples and checkpoints in the store", m.stored_bytes.clone());
        r.register("queued_jobs", "Training jobs waiting for a worker", m.queued_jobs.clone());
        r.register("running_jobs", "Training jobs on a worker", m.running_jobs.clone());
        r.register("live_trainers", "mobillm trainers held in memory", m.live_trainers.clone());
        r.register("memory_reserved_bytes", "Bytes of the memory budget reserved now", m.memory_reserved_bytes.clone());
        r.register("memory_budget_bytes", "The memory budget", m.memory_budget_bytes.clone());
        m
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// The method as a label: one of HTTP's own, or `other` (invented methods must not grow the label set).
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// Counts every request by method, route template and answer status.
pub async fn track(State(state): State<std::sync::Arc<crate::AppState>>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched".to_string(), |p| p.as_str().to_string());
    let method = method_label(req.method());
    let resp = next.run(req).await;
    let labels = vec![("method", method.to_string()), ("route", route), ("status", resp.status().as_u16().to_string())];
    state.metrics.requests.get_or_create(&labels).inc();
    resp
}
