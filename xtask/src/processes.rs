//! The release binaries as processes: building `mobillm-server` and `mobillm-device`, and a server on loopback
//! that is killed when its handle is dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::paths;

/// Kills the server when its owner is done, however that ends.
pub struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Builds the server and device binaries (release) and returns the directory holding them.
pub fn build_binaries() -> Result<PathBuf> {
    eprintln!("building mobillm-server and mobillm-device (release)…");
    paths::run(
        paths::cargo().args(["build", "--release", "--quiet", "-p", "mobillm-server", "-p", "mobillm-core"]).args([
            "--features",
            "mobillm-core/cli",
            "--bin",
            "mobillm-server",
            "--bin",
            "mobillm-device",
        ]),
        "building the server and device binaries",
    )?;
    paths::bin_dir()
}

/// A `mobillm-server` on loopback: its URL, its admin listener's URL and token.
pub struct Server {
    _process: ServerProcess,
    pub url: String,
    pub admin_url: String,
    pub admin_token: String,
}

impl Server {
    pub fn pid(&self) -> u32 {
        self._process.0.id()
    }

    /// A GET on the admin listener (plain HTTP on loopback), e.g. `/metrics`.
    pub fn admin_get(&self, path: &str) -> Result<String> {
        http_get(&self.admin_url, path, Some(&self.admin_token))
    }
}

/// Starts `mobillm-server` on 127.0.0.1 port 0 (API and admin) with `api_key`, passed through the environment
/// as a deployment would; logs go to `log`.
pub fn start_server(bin_dir: &Path, data_dir: &Path, api_key: &str, log: &Path) -> Result<Server> {
    start_server_with(bin_dir, data_dir, api_key, log, &[])
}

/// As [`start_server`], with more flags.
pub fn start_server_with(
    bin_dir: &Path,
    data_dir: &Path,
    api_key: &str,
    log: &Path,
    extra: &[String],
) -> Result<Server> {
    launch_server(bin_dir, data_dir, api_key, log, &Launch { extra: extra.to_vec(), ..Launch::default() })
}

/// How to start one `mobillm-server` beyond the defaults: more flags, environment variables (a cluster store's
/// settings), and a CPU to pin it to.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    pub extra: Vec<String>,
    pub env: Vec<(&'static str, String)>,
    /// Run under `taskset -c CPU` (which execs the server: the pid stays the server's).
    pub cpu: Option<usize>,
}

/// Starts `mobillm-server` on 127.0.0.1 port 0 as [`start_server`] does, as `launch` says. A `--role work`
/// process has no API listener: its [`Server::url`] is empty.
pub fn launch_server(bin_dir: &Path, data_dir: &Path, api_key: &str, log: &Path, launch: &Launch) -> Result<Server> {
    let admin_token = format!("admin-{}", std::process::id());
    let server = bin_dir.join("mobillm-server");
    let mut command = match launch.cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", &cpu.to_string()]).arg(&server);
            c
        }
        None => Command::new(&server),
    };
    // These servers write under 100 MB to a temporary directory: a production watermark (1 GiB free) would stop
    // a demo or test on a nearly full disk for no reason. An explicit setting still wins.
    if std::env::var_os("MOBILLM_MIN_FREE_DISK_MB").is_none() {
        command.env("MOBILLM_MIN_FREE_DISK_MB", "256");
    }
    let mut child = command
        .args(["--bind", "127.0.0.1:0", "--admin-bind", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(&launch.extra)
        .envs(launch.env.iter().map(|(k, v)| (*k, v)))
        .env("MOBILLM_API_KEYS", api_key)
        .env("MOBILLM_ADMIN_TOKEN", &admin_token)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .context("starting mobillm-server")?;
    let mut stdout = BufReader::new(child.stdout.take().context("server stdout")?);
    let process = ServerProcess(child);
    let (mut api, mut admin) = (None, None);
    for _ in 0..2 {
        let mut line = String::new();
        if stdout.read_line(&mut line)? == 0 {
            break;
        }
        if let Some(a) = line.trim().strip_prefix("admin listening on ") {
            admin = Some(a.to_string());
            break; // the last line the server prints
        }
        api = line.trim().strip_prefix("listening on ").map(str::to_string);
    }
    let Some(admin) = admin else {
        bail!("mobillm-server did not start; its log:\n{}", std::fs::read_to_string(log).unwrap_or_default());
    };
    Ok(Server {
        url: api.map(|a| format!("http://{a}")).unwrap_or_default(),
        admin_url: format!("http://{admin}"),
        admin_token,
        _process: process,
    })
}

/// A plain HTTP/1.1 GET on loopback, with a bearer token if given (the servers started here speak plain HTTP);
/// the answer must come within 10 s.
pub fn http_get(base: &str, path: &str, token: Option<&str>) -> Result<String> {
    use std::io::{Read, Write};
    let addr = base.strip_prefix("http://").context("not an http:// URL")?;
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").context("malformed HTTP answer")?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "GET {path}: {}", head.lines().next().unwrap_or(""));
    Ok(body.to_string())
}

/// The value of the unlabelled metric `name` in a Prometheus text exposition.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
