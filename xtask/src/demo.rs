//! `cargo xtask demo`: the main job end to end. Fetches the model and data if needed, builds and starts
//! `mobillm-server` on a free loopback port with a temporary data dir, runs `mobillm-device fine-tune` against it
//! in its own process (progress on stderr), and prints the device's JSON result as the last line.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::{fetch, DataArgs};

#[derive(clap::Args, Default)]
pub struct Args {
    /// `pae` (default): pivots once, device-defined targets, secrets. `mobillm`: all tokens every epoch, labels
    /// on the server.
    #[arg(long, default_value = "pae")]
    pub mode: String,
    #[command(flatten)]
    pub data: DataArgs,
    /// At most N training examples (default: all; UCI has 2400).
    #[arg(long)]
    pub train: Option<usize>,
    /// At most N held-out examples (default: all; UCI has 600).
    #[arg(long)]
    pub test: Option<usize>,
    /// pae: server epochs per round (default 10, 3 rounds); mobillm: passes over the data (default 3).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Save the device adapter here.
    #[arg(long)]
    pub save: Option<PathBuf>,
    /// Further arguments for `mobillm-device fine-tune` (after `--`).
    #[arg(last = true)]
    pub device_args: Vec<String>,
}

/// Kills the server when the demo ends, however it ends.
pub struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Builds the server and device binaries (release) and returns the directory holding them.
pub fn build_binaries() -> Result<PathBuf> {
    eprintln!("demo: building mobillm-server and mobillm-device (release)…");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--quiet", "-p", "mobillm-server", "-p", "mobillm-core"])
        .args(["--features", "mobillm-core/cli", "--bin", "mobillm-server", "--bin", "mobillm-device"])
        .status()?;
    anyhow::ensure!(status.success(), "building the binaries failed ({status})");
    // This program runs from the same target directory (`cargo xtask` builds it in release).
    let exe = std::env::current_exe()?;
    Ok(exe.parent().context("xtask binary has no directory")?.to_path_buf())
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
        http_get(&self.admin_url, path, &self.admin_token)
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
    let admin_token = format!("admin-{}", std::process::id());
    let mut child = Command::new(bin_dir.join("mobillm-server"))
        .args(["--bind", "127.0.0.1:0", "--admin-bind", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .env("MOBILLM_API_KEYS", api_key)
        .env("MOBILLM_ADMIN_TOKEN", &admin_token)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .context("starting mobillm-server")?;
    let mut stdout = BufReader::new(child.stdout.take().context("server stdout")?);
    let (mut line, mut admin_line) = (String::new(), String::new());
    stdout.read_line(&mut line)?;
    stdout.read_line(&mut admin_line)?;
    let process = ServerProcess(child);
    let (Some(addr), Some(admin)) =
        (line.trim().strip_prefix("listening on "), admin_line.trim().strip_prefix("admin listening on "))
    else {
        bail!("mobillm-server did not start; its log:\n{}", std::fs::read_to_string(log).unwrap_or_default());
    };
    Ok(Server { url: format!("http://{addr}"), admin_url: format!("http://{admin}"), admin_token, _process: process })
}

/// Runs the demo; returns the device's JSON result (also printed by `cargo xtask demo`).
pub fn run(args: Args) -> Result<serde_json::Value> {
    let work = tempfile::tempdir()?;
    run_in(args, work.path())
}

/// Runs the demo with the server's data dir (`work/data`) and log (`work/server.log`) in `work`, which outlive
/// the run (the privacy audit reads them afterwards). The server is stopped before this returns.
pub fn run_in(args: Args, work: &Path) -> Result<serde_json::Value> {
    let model = match &args.data.model {
        Some(p) => p.clone(),
        None => fetch::model()?,
    };
    let data = match &args.data.data {
        Some(p) => vec!["--data".into(), p.display().to_string()],
        None => vec!["--uci".into(), fetch::uci_data()?.display().to_string()],
    };
    let bin_dir = build_binaries()?;
    let api_key = format!("demo-{}", std::process::id());
    let log = work.join("server.log");
    let server = start_server(&bin_dir, &work.join("data"), &api_key, &log)?;
    let url = &server.url;
    eprintln!("demo: assist server at {url} (log: {})", log.display());

    let mut device = Command::new(bin_dir.join("mobillm-device"));
    device.arg("fine-tune").arg("--model").arg(&model).args(["--server", url]).env("MOBILLM_API_KEY", &api_key);
    device.args(&data).args(["--mode", &args.mode]);
    if let Some(t) = &args.data.template {
        device.args(["--template", t]);
    }
    for (flag, value) in [("--train", args.train), ("--test", args.test), ("--epochs", args.epochs)] {
        if let Some(v) = value {
            device.args([flag, &v.to_string()]);
        }
    }
    if let Some(p) = &args.save {
        device.arg("--save").arg(p);
    }
    device.args(&args.device_args);
    let out = device.stderr(Stdio::inherit()).output().context("running mobillm-device")?;
    if !out.status.success() {
        let server_log = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = server_log.lines().rev().take(20).collect();
        bail!(
            "mobillm-device failed ({}); last server log lines:\n{}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let result = String::from_utf8(out.stdout)?;
    let last = result.lines().last().context("mobillm-device printed no result")?;
    let mut result: serde_json::Value =
        serde_json::from_str(last).with_context(|| format!("mobillm-device printed {last:?}"))?;
    // The server's own training throughput, from its metrics (samples × epochs per second of training).
    if let Ok(metrics) = server.admin_get("/metrics") {
        let value = |name: &str| -> Option<f64> {
            metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        };
        if let (Some(samples), Some(seconds)) =
            (value("mobillm_trained_samples_total"), value("mobillm_training_seconds_total"))
        {
            result["server_train_samples_per_s"] = serde_json::json!(samples / seconds.max(1e-9));
        }
    }
    Ok(result)
}

/// A plain HTTP/1.1 GET on loopback with a bearer token (the demo's server speaks plain HTTP).
fn http_get(base: &str, path: &str, token: &str) -> Result<String> {
    use std::io::{Read, Write};
    let addr = base.strip_prefix("http://").context("not an http:// URL")?;
    let mut stream = std::net::TcpStream::connect(addr)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").context("malformed HTTP answer")?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "GET {path}: {}", head.lines().next().unwrap_or(""));
    Ok(body.to_string())
}
