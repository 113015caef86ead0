//! Server configuration, from flags or environment variables. Secrets (API keys, the admin token) come from the
//! environment or from files, never from the command line, where `ps` would show them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

const MIB: u64 = 1 << 20;

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "mobillm-server", about = "MobiLLM assist server")]
pub struct ServerConfig {
    /// Address of the API listener.
    #[arg(long, env = "MOBILLM_BIND", default_value = "127.0.0.1:8787")]
    pub bind: SocketAddr,
    /// Address of the admin listener (health, metrics, session list and deletion; needs the admin token).
    #[arg(long, env = "MOBILLM_ADMIN_BIND", default_value = "127.0.0.1:8788")]
    pub admin_bind: SocketAddr,
    /// What this process does: `all` serves the API and trains (the only role of the embedded store); `serve`
    /// only the API and `work` only training, any number of each on one cluster store; `migrate` brings the
    /// cluster store's database to this version and exits.
    #[arg(long, env = "MOBILLM_ROLE", value_enum, default_value_t = Role::All)]
    pub role: Role,
    /// Directory of the embedded store (used when no --database-url is given).
    #[arg(long, env = "MOBILLM_DATA_DIR", default_value = "mobillm-data")]
    pub data_dir: PathBuf,
    /// PostgreSQL of the cluster store, e.g. `postgres://mobillm@db.internal/mobillm` (a password belongs in the
    /// environment variable or in PGPASSFILE's file, not on a command line).
    #[arg(long, env = "MOBILLM_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Object store of the cluster store: `s3://bucket[/prefix]` (credentials, region and endpoint from the
    /// `AWS_*` environment variables) or `file:///directory`.
    #[arg(long, env = "MOBILLM_OBJECT_STORE")]
    pub object_store: Option<String>,
    /// PostgreSQL connections this process may open.
    #[arg(long, env = "MOBILLM_DATABASE_CONNECTIONS", default_value_t = 16)]
    pub database_connections: usize,
    /// Seconds a worker's claim on a job lasts without a heartbeat (cluster store): a job whose worker died is
    /// claimed again after this long and resumes from its last checkpoint.
    #[arg(long, env = "MOBILLM_LEASE_SECS", default_value_t = 30)]
    pub lease_secs: u64,
    /// File of API keys allowed to create sessions, one per line (or set MOBILLM_API_KEYS, comma-separated).
    #[arg(long, env = "MOBILLM_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// File holding the admin token (or set MOBILLM_ADMIN_TOKEN). Without one, the admin routes answer 403.
    #[arg(long, env = "MOBILLM_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// PEM certificate chain: serve HTTPS (rustls) instead of plain HTTP. Needs --tls-key.
    #[arg(long, env = "MOBILLM_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "MOBILLM_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve plain HTTP on an address that is not loopback (behind a TLS-terminating proxy, say).
    #[arg(long, env = "MOBILLM_INSECURE_HTTP")]
    pub insecure_http: bool,

    /// Largest binary request body (a compressed frame), in bytes.
    #[arg(long, env = "MOBILLM_MAX_BODY_BYTES", default_value_t = 16 * MIB as usize)]
    pub max_body_bytes: usize,
    /// Largest decoded frame body, in bytes.
    #[arg(long, env = "MOBILLM_MAX_DECODED_BYTES", default_value_t = 16 * MIB as usize)]
    pub max_decoded_bytes: usize,
    /// Largest ratio of a frame's decoded body to its compressed size.
    #[arg(long, env = "MOBILLM_MAX_EXPANSION", default_value_t = 8)]
    pub max_expansion: usize,
    /// Samples per frame.
    #[arg(long, env = "MOBILLM_MAX_SAMPLES_PER_FRAME", default_value_t = 4096)]
    pub max_samples_per_frame: usize,
    #[arg(long, env = "MOBILLM_MAX_SAMPLES_PER_SESSION", default_value_t = 20_000)]
    pub max_samples_per_session: usize,
    /// Live sessions per API key (every install of an app shares its key).
    #[arg(long, env = "MOBILLM_MAX_SESSIONS_PER_KEY", default_value_t = 1024)]
    pub max_sessions_per_key: usize,

    /// Bytes one session may store (cached samples and checkpoint), in MiB.
    #[arg(long, env = "MOBILLM_SESSION_QUOTA_MB", default_value_t = 1024)]
    pub session_quota_mb: u64,
    /// Bytes the sessions of one API key may store together, in MiB.
    #[arg(long, env = "MOBILLM_KEY_QUOTA_MB", default_value_t = 16 * 1024)]
    pub key_quota_mb: u64,
    /// Bytes all sessions may store together, in MiB.
    #[arg(long, env = "MOBILLM_GLOBAL_QUOTA_MB", default_value_t = 64 * 1024)]
    pub global_quota_mb: u64,
    /// Free disk below which writes are refused with 507, in MiB.
    #[arg(long, env = "MOBILLM_MIN_FREE_DISK_MB", default_value_t = 1024)]
    pub min_free_disk_mb: u64,
    /// Seconds without a request after which a session (not training) is deleted with its data.
    #[arg(long, env = "MOBILLM_IDLE_TTL_SECS", default_value_t = 24 * 3600)]
    pub idle_ttl_secs: u64,

    /// Memory that decoding, training steps, training jobs and live trainers may hold together, in MiB.
    #[arg(long, env = "MOBILLM_MEMORY_BUDGET_MB", default_value_t = 2048)]
    pub memory_budget_mb: u64,
    /// The store's page cache, in MiB: memory beside the budget (resident memory stays under budget + cache + a
    /// small baseline).
    #[arg(long, env = "MOBILLM_STORE_CACHE_MB", default_value_t = 128)]
    pub store_cache_mb: u64,
    /// Training workers (default: one per core).
    #[arg(long, env = "MOBILLM_WORKERS")]
    pub workers: Option<usize>,
    /// Training jobs that may wait for a worker.
    #[arg(long, env = "MOBILLM_MAX_QUEUED_JOBS", default_value_t = 256)]
    pub max_queued_jobs: usize,

    /// Open connections on the API listener (also kept below the process's file-descriptor limit).
    #[arg(long, env = "MOBILLM_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Seconds a connection may take to send a request's headers (or the TLS handshake), and may sit idle
    /// between requests.
    #[arg(long, env = "MOBILLM_HEADER_TIMEOUT_SECS", default_value_t = 10)]
    pub header_timeout_secs: u64,
    /// Seconds a request body may take to arrive in full.
    #[arg(long, env = "MOBILLM_BODY_TIMEOUT_SECS", default_value_t = 60)]
    pub body_timeout_secs: u64,

    /// API keys, loaded by [`ServerConfig::load_secrets`] (never a flag).
    #[arg(skip)]
    pub api_keys: Vec<String>,
    /// The admin token, loaded by [`ServerConfig::load_secrets`].
    #[arg(skip)]
    pub admin_token: Option<String>,
}

impl ServerConfig {
    /// Every default (as overridden by `MOBILLM_*` environment variables), for `data_dir` and `api_keys`: for tests
    /// and embedders.
    pub fn new(data_dir: &Path, api_keys: Vec<String>) -> Self {
        use clap::Parser;
        let mut cfg = Self::parse_from(["mobillm-server"]);
        cfg.data_dir = data_dir.to_path_buf();
        cfg.api_keys = api_keys;
        cfg
    }

    /// Reads the API keys and admin token from their files or environment variables.
    pub fn load_secrets(&mut self) -> anyhow::Result<()> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))
        };
        let mut keys: Vec<String> = match &self.api_key_file {
            Some(path) => read(path)?.lines().map(str::to_string).collect(),
            None => std::env::var("MOBILLM_API_KEYS").unwrap_or_default().split(',').map(str::to_string).collect(),
        };
        keys.retain(|k| !k.trim().is_empty());
        keys.iter_mut().for_each(|k| *k = k.trim().to_string());
        anyhow::ensure!(!keys.is_empty(), "no API key: set MOBILLM_API_KEYS or give --api-key-file");
        self.api_keys = keys;
        self.admin_token = match &self.admin_token_file {
            Some(path) => Some(read(path)?.trim().to_string()),
            None => std::env::var("MOBILLM_ADMIN_TOKEN").ok().map(|t| t.trim().to_string()),
        }
        .filter(|t| !t.is_empty());
        Ok(())
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout_secs.max(1))
    }

    pub fn body_timeout(&self) -> Duration {
        Duration::from_secs(self.body_timeout_secs.max(1))
    }

    pub fn idle_ttl(&self) -> Duration {
        Duration::from_secs(self.idle_ttl_secs.max(1))
    }

    /// Seconds a job's lease lasts (at least 3, so a heartbeat every third of it has room).
    pub fn lease_secs(&self) -> u64 {
        self.lease_secs.max(3)
    }

    pub fn workers(&self) -> usize {
        self.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1)
    }

    pub fn quotas(&self) -> Quotas {
        Quotas {
            max_sessions_per_key: self.max_sessions_per_key,
            max_samples_per_session: self.max_samples_per_session,
            session_bytes: self.session_quota_mb.saturating_mul(MIB),
            key_bytes: self.key_quota_mb.saturating_mul(MIB),
            global_bytes: self.global_quota_mb.saturating_mul(MIB),
        }
    }

    pub fn memory_budget_bytes(&self) -> u64 {
        self.memory_budget_mb.saturating_mul(MIB)
    }

    pub fn store_cache_bytes(&self) -> usize {
        usize::try_from(self.store_cache_mb.saturating_mul(MIB)).unwrap_or(usize::MAX)
    }

    pub fn min_free_disk_bytes(&self) -> u64 {
        self.min_free_disk_mb.saturating_mul(MIB)
    }
}

/// What a server process does (see `--role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    All,
    Serve,
    Work,
    Migrate,
}

impl Role {
    pub fn serves_api(self) -> bool {
        matches!(self, Role::All | Role::Serve)
    }

    pub fn trains(self) -> bool {
        matches!(self, Role::All | Role::Work)
    }
}

/// What sessions may hold, checked inside the store's write transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    pub max_sessions_per_key: usize,
    /// The most a session's sample cap can be. The cap itself is fixed at creation (also bounded by the byte
    /// quota and the memory budget) and kept in the session record, which is what the store checks.
    pub max_samples_per_session: usize,
    pub session_bytes: u64,
    pub key_bytes: u64,
    pub global_bytes: u64,
}
