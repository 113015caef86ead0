//! Prometheus metrics at `GET /metrics` (text exposition format). Counters are updated where the work happens;
//! the gauges (sessions, running jobs) are read from the store when scraped.

use std::sync::atomic::AtomicU64;

use axum::extract::{MatchedPath, Request, State};
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
    /// By route template (never the session id) and status code.
    pub requests: Family<Labels, Counter>,
    pub request_bytes: Counter,
    pub samples_stored: Counter,
    /// Samples × epochs the trainer went through (PAE jobs and `mobillm` steps).
    pub trained_samples: Counter,
    pub training_seconds: Counter<f64, AtomicU64>,
    pub sessions: Gauge,
    pub running_jobs: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Self {
            registry: Registry::with_prefix("mobillm"),
            requests: Family::default(),
            request_bytes: Counter::default(),
            samples_stored: Counter::default(),
            trained_samples: Counter::default(),
            training_seconds: Counter::default(),
            sessions: Gauge::default(),
            running_jobs: Gauge::default(),
        };
        let r = &mut m.registry;
        r.register("http_requests", "HTTP requests by route and status", m.requests.clone());
        r.register("request_body_bytes", "Bytes of request bodies received", m.request_bytes.clone());
        r.register("samples_stored", "New samples stored (duplicates excluded)", m.samples_stored.clone());
        r.register("trained_samples", "Samples processed by training, once per epoch", m.trained_samples.clone());
        r.register("training_seconds", "Wall seconds spent training", m.training_seconds.clone());
        r.register("sessions", "Sessions in the store", m.sessions.clone());
        r.register("running_jobs", "Training jobs running", m.running_jobs.clone());
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

/// Counts every request by its route template and answer status.
pub async fn track(State(state): State<std::sync::Arc<crate::AppState>>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched".to_string(), |p| p.as_str().to_string());
    let method = req.method().to_string();
    if let Some(len) = req.headers().get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()) {
        state.metrics.request_bytes.inc_by(len.parse().unwrap_or(0));
    }
    let resp = next.run(req).await;
    let labels = vec![("method", method), ("route", route), ("status", resp.status().as_u16().to_string())];
    state.metrics.requests.get_or_create(&labels).inc();
    resp
}
