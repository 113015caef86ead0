//! Serving a router on a TCP listener, plain or TLS (rustls), HTTP/1.1 only, with the defences a public port
//! needs against slow and idle clients:
//!
//! - a TLS handshake and a request's headers must arrive within the header timeout, which is also how long a
//!   kept-alive connection may sit idle between requests (hyper's header-read timer starts when it waits for a
//!   request);
//! - bodies have their own deadline (see `body.rs`);
//! - open connections are capped. At the cap, the connection that has waited longest for a request (idle, or
//!   trickling its headers) is closed to admit the new one; a connection inside a request is never closed.
//!   Only when every connection is inside a request is the newcomer refused.
//! - shutdown stops accepting, lets requests in flight finish for a grace period, then returns.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::Router;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tower::ServiceExt;

/// How connections are limited, and where they are counted.
#[derive(Clone)]
pub struct ConnectionPolicy {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub open: Gauge,
    pub evicted: Counter,
    pub refused: Counter,
}

impl ConnectionPolicy {
    /// A policy whose counts go nowhere (the admin listener's).
    pub fn uncounted(max_connections: usize, header_timeout: Duration) -> Self {
        Self {
            max_connections,
            header_timeout,
            open: Gauge::default(),
            evicted: Counter::default(),
            refused: Counter::default(),
        }
    }
}

/// The rustls configuration for a PEM certificate chain and key.
pub fn tls_config(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("TLS certificate {}: {e}", cert.display()))?;
    anyhow::ensure!(!certs.is_empty(), "TLS certificate {}: no certificate in the file", cert.display());
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| anyhow::anyhow!("TLS key {}: {e}", key.display()))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| anyhow::anyhow!("TLS certificate {} / key {}: {e}", cert.display(), key.display()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// One open connection, as the cap sees it.
struct Conn {
    in_flight: AtomicUsize,
    /// Milliseconds (since the listener started) at which the connection last became idle.
    idle_since: AtomicU64,
    close: tokio::sync::Notify,
}

struct Connections {
    started: Instant,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Conn>>>,
}

impl Connections {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Makes room for one more connection under `max`: true if there is room (possibly after closing the
    /// connection idle longest).
    fn admit(&self, max: usize, policy: &ConnectionPolicy) -> bool {
        let mut open = self.open.lock().expect("connections");
        if open.len() < max {
            return true;
        }
        let oldest_idle = open
            .iter()
            .filter(|(_, c)| c.in_flight.load(Ordering::SeqCst) == 0)
            .min_by_key(|(_, c)| c.idle_since.load(Ordering::SeqCst))
            .map(|(id, _)| *id);
        match oldest_idle.and_then(|id| open.remove(&id)) {
            Some(conn) => {
                conn.close.notify_one();
                policy.evicted.inc();
                true
            }
            None => {
                policy.refused.inc();
                false
            }
        }
    }
}

/// Counts a request in flight on its connection until the response body is done with.
struct InFlight {
    conn: Arc<Conn>,
    connections: Arc<Connections>,
}

impl InFlight {
    fn new(conn: Arc<Conn>, connections: Arc<Connections>) -> Self {
        conn.in_flight.fetch_add(1, Ordering::SeqCst);
        Self { conn, connections }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.conn.idle_since.store(self.connections.now_ms(), Ordering::SeqCst);
        self.conn.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its request counted as in flight until it is sent or dropped.
struct TrackedBody {
    inner: Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then waits up to `grace` for requests in flight.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: Router,
    policy: ConnectionPolicy,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    let graceful = GracefulShutdown::new();
    let connections =
        Arc::new(Connections { started: Instant::now(), next_id: AtomicU64::new(0), open: Mutex::new(HashMap::new()) });
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if !connections.admit(policy.max_connections, &policy) {
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let id = connections.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(connections.now_ms()),
            close: tokio::sync::Notify::new(),
        });
        connections.open.lock().expect("connections").insert(id, conn.clone());
        policy.open.inc();
        let (tls, router, policy, connections) = (tls.clone(), router.clone(), policy.clone(), connections.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let closed = conn.clone();
            let run = async {
                match tls {
                    None => serve_connection(stream, router, &policy, conn, connections.clone(), watcher).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(policy.header_timeout, acceptor.accept(stream)).await {
                            Ok(Ok(stream)) => {
                                serve_connection(stream, router, &policy, conn, connections.clone(), watcher).await
                            }
                            Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                            Err(_) => tracing::debug!("TLS handshake timed out"),
                        }
                    }
                }
            };
            tokio::select! {
                _ = run => {}
                _ = closed.close.notified() => tracing::debug!("idle connection closed at the connection cap"),
            }
            connections.open.lock().expect("connections").remove(&id);
            policy.open.dec();
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!("requests still in flight after the grace period; closing them");
    }
}

async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    router: Router,
    policy: &ConnectionPolicy,
    conn: Arc<Conn>,
    connections: Arc<Connections>,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let in_flight = InFlight::new(conn.clone(), connections.clone());
        let router = router.clone();
        async move {
            let resp = router.oneshot(req).await.unwrap_or_else(|never: Infallible| match never {});
            Ok::<_, Infallible>(resp.map(|inner| TrackedBody { inner, _in_flight: in_flight }))
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(policy.header_timeout)
        .serve_connection(TokioIo::new(stream), service);
    if let Err(e) = watcher.watch(connection).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
