//! Server configuration, from flags or environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "mobillm-server", about = "MobiLLM assist server")]
pub struct ServerConfig {
    /// Address to listen on.
    #[arg(long, env = "MOBILLM_BIND", default_value = "127.0.0.1:8787")]
    pub bind: SocketAddr,
    /// Directory of the durable store.
    #[arg(long, env = "MOBILLM_DATA_DIR", default_value = "mobillm-data")]
    pub data_dir: PathBuf,
    /// API keys allowed to create sessions (comma-separated).
    #[arg(long = "api-key", env = "MOBILLM_API_KEYS", value_delimiter = ',', required = true)]
    pub api_keys: Vec<String>,
    /// Largest request body accepted, in bytes (compressed frames).
    #[arg(long, env = "MOBILLM_MAX_BODY_BYTES", default_value_t = 16 << 20)]
    pub max_body_bytes: usize,
    /// Largest decoded frame body, in bytes.
    #[arg(long, env = "MOBILLM_MAX_DECODED_BYTES", default_value_t = 64 << 20)]
    pub max_decoded_bytes: usize,
    #[arg(long, env = "MOBILLM_MAX_SAMPLES_PER_SESSION", default_value_t = 20_000)]
    pub max_samples_per_session: usize,
    #[arg(long, env = "MOBILLM_MAX_SESSIONS_PER_KEY", default_value_t = 16)]
    pub max_sessions_per_key: usize,
    /// PEM certificate chain: serve HTTPS (rustls) instead of plain HTTP. Needs --tls-key.
    #[arg(long, env = "MOBILLM_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "MOBILLM_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}
