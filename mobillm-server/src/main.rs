use std::time::Duration;

use clap::Parser;
use mobillm_server::config::Role;
use mobillm_server::serve::{serve, tls_config, ConnectionPolicy};
use mobillm_server::store::Store;
use mobillm_server::{admin, app, reaper, ServerConfig};
use tracing_subscriber::EnvFilter;

/// How long requests in flight may take to finish once shutdown starts.
const GRACE: Duration = Duration::from_secs(30);
/// File descriptors kept free of API connections: the store, the admin listener, logs.
const RESERVED_FDS: u64 = 128;
/// Connections of the admin listener.
const ADMIN_CONNECTIONS: usize = 64;

/// glibc's malloc gives every busy thread an arena of its own and returns little of them: under load the process
/// held hundreds of MB beyond its memory budget (measured with `cargo xtask load`). Two arenas cost nothing
/// measurable in speed there. jemalloc held memory as well but halved the throughput.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    // SAFETY: `mallopt` only sets an allocator parameter; this runs first in `main`, before any other thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

fn main() -> anyhow::Result<()> {
    limit_malloc_arenas();
    // Logs go to stderr: stdout carries only the bound addresses, for parent processes.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let mut config = ServerConfig::parse();
    if config.role == Role::Migrate {
        anyhow::ensure!(
            config.database_url.is_some(),
            "--role migrate needs --database-url: only the cluster store has a schema to migrate"
        );
        Store::open(&config)?;
        tracing::info!("the database is at this version's schema");
        return Ok(());
    }
    config.load_secrets()?;
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            // rustls with the `ring` provider, installed once for the process.
            let _ = rustls::crypto::ring::default_provider().install_default();
            Some(tls_config(cert, key)?)
        }
        _ => None,
    };
    if tls.is_none() && !config.insecure_http {
        for addr in [config.bind, config.admin_bind] {
            anyhow::ensure!(
                addr.ip().is_loopback(),
                "plain HTTP on {addr}, which is not loopback, would send tokens and activations in the clear: \
                 give --tls-cert and --tls-key, or --insecure-http behind a TLS-terminating proxy"
            );
        }
    }
    // Connections stay below the file-descriptor limit, raised as far as the system allows.
    let nofile = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024);
    let max_connections = config.max_connections.min(nofile.saturating_sub(RESERVED_FDS).max(16) as usize);
    if max_connections < config.max_connections {
        tracing::warn!(max_connections, nofile, "connection cap lowered to fit the file-descriptor limit");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Store and CPU work runs on the blocking pool; bound it (requests beyond wait their turn).
        .max_blocking_threads(64)
        .build()?
        .block_on(run(config, tls, max_connections))
}

async fn run(
    config: ServerConfig,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    max_connections: usize,
) -> anyhow::Result<()> {
    let header_timeout = config.header_timeout();
    let (bind, admin_bind, role) = (config.bind, config.admin_bind, config.role);
    // Opening the cluster store connects and migrates: blocking work, off the async workers.
    let state = tokio::task::spawn_blocking(move || mobillm_server::open(config)).await??;
    // A `work` process has no API listener: its admin listener serves health and metrics.
    let api = match role.serves_api() {
        true => Some(tokio::net::TcpListener::bind(bind).await.map_err(|e| anyhow::anyhow!("binding {bind}: {e}"))?),
        false => None,
    };
    let admin_listener =
        tokio::net::TcpListener::bind(admin_bind).await.map_err(|e| anyhow::anyhow!("binding {admin_bind}: {e}"))?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    // The bound addresses on lines of their own, so a parent process can start us on port 0 and read them (a
    // parent that stops reading early must not stop us: write errors are ignored).
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        if let Some(api) = &api {
            let _ = writeln!(out, "listening on {}", api.local_addr()?);
        }
        let _ = writeln!(out, "admin listening on {}", admin_listener.local_addr()?);
        let _ = out.flush();
    }
    tracing::info!(api = ?api.as_ref().map(|a| a.local_addr()), admin = %admin_listener.local_addr()?, scheme, ?role,
        max_connections, "serving");
    if role.serves_api() {
        tokio::spawn(reaper::run(std::sync::Arc::downgrade(&state)));
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let m = &state.metrics;
    let policy = ConnectionPolicy {
        max_connections,
        header_timeout,
        open: m.connections_open.clone(),
        evicted: m.connections_evicted.clone(),
        refused: m.connections_refused.clone(),
    };
    let (api_tls, api_stop, api_state) = (tls.clone(), stopped(stop_rx.clone()), state.clone());
    let api_server = async move {
        if let Some(api) = api {
            serve(api, api_tls, app(api_state), policy, api_stop, GRACE).await;
        }
    };
    let admin_server = serve(
        admin_listener,
        tls,
        admin::router(state.clone()),
        ConnectionPolicy::uncounted(ADMIN_CONNECTIONS, header_timeout),
        stopped(stop_rx),
        GRACE,
    );
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    tokio::join!(api_server, admin_server);
    // Training workers stop after their current epoch; an interrupted job resumes at the next start.
    let state2 = state.clone();
    tokio::task::spawn_blocking(move || state2.shutdown(GRACE)).await?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}
