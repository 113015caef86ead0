//! The services the cluster store needs, started by the project itself on 127.0.0.1 in a temporary directory and
//! stopped when their handles drop: PostgreSQL from Debian's packages (`initdb` as an unprivileged user: the
//! server refuses root) and `s3s-fs`, an S3-compatible server on a directory, from crates.io.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long a service may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A child process stopped (and reaped) when dropped: with `stop_signal` and up to 5 s to exit, then SIGKILL.
pub struct Service {
    child: Child,
    name: &'static str,
    /// nginx's master must pass the signal on to its workers: SIGKILL would leave them holding the port.
    stop_signal: Option<&'static str>,
}

impl Service {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(signal) = self.stop_signal {
            let _ = Command::new("kill").args([signal, &self.child.id().to_string()]).status();
            let asked = Instant::now();
            while asked.elapsed() < Duration::from_secs(5) && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("stopped {}", self.name);
    }
}

/// PostgreSQL on 127.0.0.1 with trust authentication for the `mobillm` role.
pub struct Postgres {
    _service: Service,
    /// `postgres://mobillm@127.0.0.1:PORT/postgres`: the maintenance database; tests create their own beside it.
    pub url: String,
}

/// An S3-compatible server on 127.0.0.1 with one bucket, `mobillm`.
pub struct S3 {
    _service: Service,
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub bucket: String,
}

impl S3 {
    /// The variables object_store's S3 client reads.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }
}

fn pg_bin(name: &str) -> Result<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path().join("bin").join(name))).collect())
        .unwrap_or_default();
    versions.retain(|p| p.exists());
    versions.sort();
    versions.pop().with_context(|| {
        format!("{name} not found under /usr/lib/postgresql: install Debian's postgresql package (.ci/run does)")
    })
}

/// Whether Debian's PostgreSQL server is installed.
pub fn postgres_installed() -> bool {
    pg_bin("postgres").is_ok()
}

/// The pinned `s3s-fs`, installed from crates.io into cargo's bin directory when it is missing (later versions
/// need a newer rustc than the workspace's).
pub fn ensure_s3s_fs() -> Result<PathBuf> {
    if let Ok(path) = s3s_fs() {
        return Ok(path);
    }
    eprintln!("installing s3s-fs 0.14.1 from crates.io (cargo install, a few minutes)…");
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["install", "s3s-fs@0.14.1", "--features", "binary", "--locked", "--quiet"])
        .status()
        .context("running cargo install s3s-fs")?;
    anyhow::ensure!(status.success(), "cargo install s3s-fs failed");
    s3s_fs()
}

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_for_port(port: u16, service: &mut Service, log: &Path) -> Result<()> {
    let started = Instant::now();
    while started.elapsed() < START_TIMEOUT {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Some(status) = service.child.try_wait()? {
            bail!("{} exited ({status}) before listening; its log: {}", service.name, log.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{} did not listen on port {port} within {START_TIMEOUT:?}; its log: {}", service.name, log.display())
}

/// Whether this process runs as root (the owner of `/proc/self` is the effective user).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// As root, runs `program` as the `postgres` user (Debian's package creates it), with no wrapper process in
/// between, so signals reach it; otherwise as ourselves.
fn as_unprivileged(program: &Path) -> Result<Command> {
    let mut c = Command::new(program);
    if is_root() {
        use std::os::unix::process::CommandExt;
        let id = |flag: &str| -> Result<u32> {
            let out = Command::new("id").args([flag, "postgres"]).output()?;
            anyhow::ensure!(
                out.status.success(),
                "no `postgres` user to run PostgreSQL as (Debian's package makes it)"
            );
            Ok(String::from_utf8(out.stdout)?.trim().parse()?)
        };
        c.uid(id("-u")?).gid(id("-g")?);
    }
    Ok(c)
}

impl Postgres {
    /// `initdb` in `dir` (created, and given to the `postgres` user when we are root), then the server.
    pub fn start(dir: &Path) -> Result<Self> {
        let data = dir.join("pgdata");
        std::fs::create_dir_all(dir)?;
        if is_root() {
            let status = Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir).status()?;
            anyhow::ensure!(status.success(), "chown of {} to postgres failed", dir.display());
        }
        let log = dir.join("postgres.log");
        let status = as_unprivileged(&pg_bin("initdb")?)?
            .arg("-D")
            .arg(&data)
            .args(["-U", "mobillm", "--auth=trust", "-E", "UTF8", "--no-instructions"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .status()
            .context("running initdb")?;
        anyhow::ensure!(status.success(), "initdb failed; see {}", log.display());
        let port = free_port()?;
        let child = as_unprivileged(&pg_bin("postgres")?)?
            .arg("-D")
            .arg(&data)
            .args(["-c", "listen_addresses=127.0.0.1", "-c", &format!("port={port}")])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.display()))
            .args(["-c", "max_connections=200"])
            .stdout(Stdio::null())
            .stderr(std::fs::OpenOptions::new().append(true).open(&log)?)
            .spawn()
            .context("starting postgres")?;
        let mut service = Service { child, name: "postgres", stop_signal: Some("-INT") };
        wait_for_port(port, &mut service, &log)?;
        // Accepting TCP is not yet accepting queries: ask pg_isready.
        let started = Instant::now();
        loop {
            let ready = Command::new(pg_bin("pg_isready")?)
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "mobillm", "-q"])
                .status()?;
            if ready.success() {
                break;
            }
            anyhow::ensure!(started.elapsed() < START_TIMEOUT, "postgres did not get ready; see {}", log.display());
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("postgres on 127.0.0.1:{port} (data in {})", data.display());
        Ok(Self { _service: service, url: format!("postgres://mobillm@127.0.0.1:{port}/postgres") })
    }
}

impl S3 {
    /// `s3s-fs` on a directory with bucket `mobillm`.
    pub fn start(dir: &Path) -> Result<Self> {
        let bucket = "mobillm";
        std::fs::create_dir_all(dir.join(bucket))?;
        let port = free_port()?;
        let (access_key, secret_key) = ("mobillm-test".to_string(), "mobillm-test-secret".to_string());
        let log = dir.with_extension("log");
        let child = Command::new(ensure_s3s_fs()?)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", &access_key, "--secret-key", &secret_key])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting s3s-fs")?;
        let mut service = Service { child, name: "s3s-fs", stop_signal: None };
        wait_for_port(port, &mut service, &log)?;
        eprintln!("s3s-fs on 127.0.0.1:{port} (objects in {})", dir.display());
        Ok(Self {
            _service: service,
            endpoint: format!("http://127.0.0.1:{port}"),
            access_key,
            secret_key,
            bucket: bucket.into(),
        })
    }
}

/// `s3s-fs` on the PATH or in cargo's bin directory.
fn s3s_fs() -> Result<PathBuf> {
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| dirs::home_dir().map(|h| h.join(".cargo")))
        .map(|h| h.join("bin").join("s3s-fs"));
    let on_path =
        std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join("s3s-fs")).find(|p| p.exists()));
    on_path
        .or(cargo_bin.filter(|p| p.exists()))
        .context("s3s-fs not found: `cargo install s3s-fs@0.14.1 --features binary --locked` (.ci/run does)")
}

/// PostgreSQL and S3 for the cluster store's tests, in `dir`; the variables that point the tests at them.
pub struct ClusterServices {
    pub postgres: Postgres,
    pub s3: S3,
}

impl ClusterServices {
    pub fn start(dir: &Path) -> Result<Self> {
        Ok(Self { postgres: Postgres::start(&dir.join("postgres"))?, s3: S3::start(&dir.join("s3"))? })
    }

    /// What `cargo test` needs to run the cluster store's tests against these services.
    pub fn test_env(&self) -> Vec<(&'static str, String)> {
        let mut env = self.s3.env();
        env.push(("MOBILLM_TEST_DATABASE_URL", self.postgres.url.clone()));
        env.push(("MOBILLM_TEST_S3_BUCKET", self.s3.bucket.clone()));
        env
    }
}

/// nginx on 127.0.0.1 in front of API replicas: round-robin, and a request whose replica fails (connection
/// refused or reset: a replica killed) goes to the next one. Requests that are not idempotent in HTTP's sense
/// are retried too: ours carry idempotency keys, so a retry is answered, not applied twice.
pub struct Nginx {
    _service: Service,
    pub url: String,
}

impl Nginx {
    /// Starts nginx with its configuration, logs and temporary files in `dir`, in front of `upstreams`
    /// (`http://127.0.0.1:PORT` each).
    pub fn start(dir: &Path, upstreams: &[String]) -> Result<Self> {
        std::fs::create_dir_all(dir.join("tmp"))?;
        if is_root() {
            // nginx's workers run as `nobody`: they must reach the directory and write its temporary files.
            use std::os::unix::fs::PermissionsExt;
            let mut d = dir.to_path_buf();
            while d.pop() && d.starts_with(std::env::temp_dir()) && d != std::env::temp_dir() {
                std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))?;
            }
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
            std::fs::set_permissions(dir.join("tmp"), std::fs::Permissions::from_mode(0o777))?;
        }
        let port = free_port()?;
        let servers: String = upstreams
            .iter()
            .map(|u| format!("        server {} max_fails=1 fail_timeout=10s;\n", u.trim_start_matches("http://")))
            .collect();
        let d = dir.display();
        let conf = format!(
            "worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    client_max_body_size 64m;
    client_body_buffer_size 1m;
    upstream api {{
{servers}        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://api;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_next_upstream error timeout http_502 non_idempotent;
            proxy_next_upstream_tries 3;
            proxy_connect_timeout 2s;
            proxy_read_timeout 120s;
        }}
    }}
}}
"
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let log = dir.join("error.log");
        let child = Command::new("/usr/sbin/nginx")
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr.log"))?)
            .spawn()
            .context("starting nginx (Debian's nginx package)")?;
        let mut service = Service { child, name: "nginx", stop_signal: Some("-QUIT") };
        wait_for_port(port, &mut service, &log)?;
        eprintln!("nginx on 127.0.0.1:{port} in front of {}", upstreams.join(", "));
        Ok(Self { _service: service, url: format!("http://127.0.0.1:{port}") })
    }
}
