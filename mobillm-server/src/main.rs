use std::time::Duration;

use clap::Parser;
use mobillm_server::{app, AppState, ServerConfig};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Logs go to stderr: stdout carries only the bound address, for parent processes.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let config = ServerConfig::parse();
    let bind = config.bind;
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            // rustls with the `ring` provider, installed once for the process.
            let _ = rustls::crypto::ring::default_provider().install_default();
            Some(
                axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
                    .await
                    .map_err(|e| anyhow::anyhow!("TLS certificate {} / key {}: {e}", cert.display(), key.display()))?,
            )
        }
        _ => None,
    };
    let state = AppState::open(config)?;
    let listener = std::net::TcpListener::bind(bind)?;
    listener.set_nonblocking(true)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    // The bound address on its own line, so a parent process can start us on port 0 and read the port.
    println!("listening on {}", listener.local_addr()?);
    tracing::info!(addr = %listener.local_addr()?, scheme, "serving");
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        shutdown().await;
        // Finish requests in flight (uploads are acknowledged only once stored); training threads checkpoint
        // per epoch and resume on the next start.
        stopper.graceful_shutdown(Some(Duration::from_secs(30)));
    });
    let service = app(state).into_make_service();
    match tls {
        Some(tls) => axum_server::from_tcp_rustls(listener, tls).handle(handle).serve(service).await?,
        None => axum_server::from_tcp(listener).handle(handle).serve(service).await?,
    }
    Ok(())
}

async fn shutdown() {
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
