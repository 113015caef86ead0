//! `cargo xtask demo`: the main job end to end. Fetches the model and data if needed, builds and starts
//! `mobillm-server` on a free loopback port with a temporary data dir, runs `mobillm-device fine-tune` against it
//! in its own process (progress on stderr), and prints the device's JSON result as the last line. With
//! `--mode local` no server is started: the device trains on its own. With `--kill-at`, the device process is
//! killed with SIGKILL at that point of a resumable fine-tune and a new one resumes it; the result then also says
//! where it was killed and how many samples the server received twice.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::args::DataArgs;
use crate::fetch;
use crate::processes::{build_binaries, metric, start_server};

#[derive(clap::Args, Default)]
pub struct Args {
    /// `pae` (default): pivots once, device-defined targets, secrets. `mobillm`: all tokens every epoch, labels
    /// on the server. `local`: no server; the device trains the side network itself.
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
    /// pae, local: epochs per round (default 10, at most 8 rounds); mobillm: passes over the data (default 3).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Save the device adapter here.
    #[arg(long)]
    pub save: Option<PathBuf>,
    /// `pae`: kill the device process (SIGKILL) at this point of a resumable fine-tune, then resume it in a new
    /// one: `upload:50%` (share of the training examples forwarded), `train:N` (the server training round N),
    /// `targets:N` (round N's targets being sent) or `refit:N` (the server training the refit's round N).
    #[arg(long)]
    pub kill_at: Option<KillAt>,
    /// Further arguments for `mobillm-device fine-tune` (after `--`).
    #[arg(last = true)]
    pub device_args: Vec<String>,
    /// A running assist server to fine-tune against (its URL and an API key) instead of starting one.
    #[arg(skip)]
    pub server: Option<(String, String)>,
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
    let data = match args.data.jsonl()? {
        Some(d) => {
            let mut flags = vec!["--data".into(), d.path.display().to_string(), "--template".into(), d.template];
            if let Some(labels) = d.labels {
                flags.extend(["--labels".into(), labels.join(",")]);
            }
            flags
        }
        None => {
            let mut flags = vec!["--uci".into(), fetch::uci_data()?.display().to_string()];
            flags.extend(args.data.template.iter().flat_map(|t| ["--template".to_string(), t.clone()]));
            flags
        }
    };
    let bin_dir = build_binaries()?;
    let mut device = Command::new(bin_dir.join("mobillm-device"));
    device.arg("fine-tune").arg("--model").arg(&model);
    let log = work.join("server.log");
    let server = if args.mode == "local" {
        eprintln!("demo: local mode, no assist server");
        None
    } else if let Some((url, api_key)) = &args.server {
        eprintln!("demo: assist server at {url}");
        device.args(["--server", url]).env("MOBILLM_API_KEY", api_key);
        None
    } else {
        let api_key = format!("demo-{}", std::process::id());
        let server = start_server(&bin_dir, &work.join("data"), &api_key, &log)?;
        eprintln!("demo: assist server at {} (log: {})", server.url, log.display());
        device.args(["--server", &server.url]).env("MOBILLM_API_KEY", &api_key);
        Some(server)
    };
    device.args(&data).args(["--mode", &args.mode]);
    for (flag, value) in [("--train", args.train), ("--test", args.test), ("--epochs", args.epochs)] {
        if let Some(v) = value {
            device.args([flag, &v.to_string()]);
        }
    }
    if let Some(p) = &args.save {
        device.arg("--save").arg(p);
    }
    device.args(&args.device_args);
    let killed = match args.kill_at {
        Some(at) => {
            device.arg("--state").arg(work.join("fine-tune.state"));
            let killed = run_until_killed(&device, at)?;
            device.arg("--resume");
            eprintln!("demo: resuming in a new device process");
            Some(killed)
        }
        None => None,
    };
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
    if let Some(Ok(metrics)) = server.as_ref().map(|s| s.admin_get("/metrics")) {
        if let (Some(samples), Some(seconds)) =
            (metric(&metrics, "mobillm_trained_samples_total"), metric(&metrics, "mobillm_training_seconds_total"))
        {
            result["server_train_samples_per_s"] = serde_json::json!(samples / seconds.max(1e-9));
        }
        if let Some(killed) = killed {
            result["killed_at"] = killed;
            result["samples_stored"] = serde_json::json!(metric(&metrics, "mobillm_samples_stored_total"));
            result["samples_sent_again"] = serde_json::json!(metric(&metrics, "mobillm_samples_duplicate_total"));
        }
    }
    Ok(result)
}

/// Where `--kill-at` kills the device process.
#[derive(Clone, Copy, Debug)]
pub enum KillAt {
    /// This share (0–1) of the training examples forwarded.
    Upload(f64),
    Train(usize),
    Targets(usize),
    Refit(usize),
}

impl std::str::FromStr for KillAt {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (what, at) = s.split_once(':').context("--kill-at upload:P% | train:N | targets:N | refit:N")?;
        Ok(match what {
            "upload" => {
                let p: f64 = at.trim_end_matches('%').parse().context("upload:P% takes a percentage")?;
                anyhow::ensure!((0.0..=100.0).contains(&p), "upload:{p}% is not a percentage");
                KillAt::Upload(p / 100.0)
            }
            "train" => KillAt::Train(at.parse().context("train:N takes a round")?),
            "targets" => KillAt::Targets(at.parse().context("targets:N takes a round")?),
            "refit" => KillAt::Refit(at.parse().context("refit:N takes a round")?),
            other => bail!("--kill-at {other}:…: upload, train, targets or refit"),
        })
    }
}

impl KillAt {
    fn matches(self, event: &serde_json::Value) -> bool {
        let (phase, round) = (event["phase"].as_str().unwrap_or(""), event["round"].as_u64().unwrap_or(0) as usize);
        let (done, total) = (event["done"].as_f64().unwrap_or(0.0), event["total"].as_f64().unwrap_or(0.0));
        match self {
            KillAt::Upload(share) => phase == "forward" && total > 0.0 && done >= share * total,
            KillAt::Train(n) => phase == "train" && round == n,
            KillAt::Targets(n) => phase == "targets" && round == n,
            // Once the server is training it (the split and the targets are sent).
            KillAt::Refit(n) => phase == "refit" && round == n && done >= 1.0,
        }
    }
}

/// Runs (a copy of) the device command with its progress events until `at` comes, and kills it there (SIGKILL);
/// returns the event it was killed at, with the seconds the process had run. Its other output passes through.
fn run_until_killed(device: &Command, at: KillAt) -> Result<serde_json::Value> {
    let mut copy = Command::new(device.get_program());
    copy.args(device.get_args());
    for (key, value) in device.get_envs() {
        match value {
            Some(v) => copy.env(key, v),
            None => copy.env_remove(key),
        };
    }
    let started = std::time::Instant::now();
    let mut child = copy
        .arg("--progress-events")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running mobillm-device")?;
    let stderr = BufReader::new(child.stderr.take().context("device stderr")?);
    for line in stderr.lines() {
        let line = line?;
        let Some(event) = line.strip_prefix("progress ") else {
            eprintln!("{line}");
            continue;
        };
        let mut event: serde_json::Value = serde_json::from_str(event)?;
        if at.matches(&event) {
            child.kill()?;
            child.wait()?;
            eprintln!("demo: killed the device process (SIGKILL) at {event}");
            event["after_s"] = serde_json::json!(started.elapsed().as_secs_f64());
            return Ok(event);
        }
    }
    let status = child.wait()?;
    bail!("the device process ended ({status}) before --kill-at {at:?} came")
}
