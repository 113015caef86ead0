//! `mobillm-device`: the device side of MobiLLM as a command-line program (what an app does through the SDK), in
//! its own process so its memory is measured on its own. Progress goes to stderr; `fine-tune` ends with one JSON
//! line on stdout.
//!
//! ```text
//! MOBILLM_API_KEY=K mobillm-device fine-tune --model M.gguf --server http://127.0.0.1:8787 (--uci DIR | --data F.jsonl
//!                --template T) [--mode pae|mobillm] [--train N] [--test N] [--epochs E] [--label-epsilon ε]
//!                [--save adapter.safetensors]
//! mobillm-device fine-tune … --state ft.state [--state-key-file K]     # resumable; after a kill: … --resume
//! mobillm-device fine-tune --mode local --model M.gguf (--uci DIR | …)      # no server, no key
//! mobillm-device predict --model M.gguf --adapter adapter.safetensors "some text" …
//! ```

mod progress;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use mobillm_core::dataset::{self, Split};
use mobillm_core::fine_tune::{fine_tune, resume, CancelToken, FineTuneConfig, StateFile};
use mobillm_core::side::{DeviceAdapter, Summary};
use mobillm_core::wire::Quant;
use mobillm_core::{memory, Backbone, Mode, TaskSpec};
use progress::ProgressReport;

#[derive(Parser)]
#[command(name = "mobillm-device", about = "MobiLLM device side: fine-tune through an assist server, predict")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Forward the examples, train through the assist server (or on the device: `--mode local`), fold and
    /// evaluate the adapter.
    FineTune(Box<FineTuneArgs>),
    /// Predict labels of texts with the backbone and a saved adapter.
    Predict {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: PathBuf,
        texts: Vec<String>,
    },
}

#[derive(clap::Args)]
struct FineTuneArgs {
    /// The backbone: a GGUF file or a safetensors directory.
    #[arg(long)]
    model: PathBuf,
    #[arg(long, env = "MOBILLM_SERVER", default_value = "http://127.0.0.1:8787")]
    server: String,
    /// File holding the server's API key (or set MOBILLM_API_KEY; a key is never taken from the command line,
    /// where `ps` would show it).
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// Allow plain http:// to a host that is not loopback (development only).
    #[arg(long)]
    insecure_http: bool,
    /// Trust only this CA certificate (PEM) for an https:// server.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The UCI Sentiment Labelled Sentences directory (`cargo xtask fetch-data`).
    #[arg(long, conflicts_with = "data")]
    uci: Option<PathBuf>,
    /// JSONL of {"text","label"}; 20% is held out by text hash.
    #[arg(long, requires = "template")]
    data: Option<PathBuf>,
    /// Prompt with one {text} slot ending in an answer cue (default: the UCI sentiment prompt).
    #[arg(long)]
    template: Option<String>,
    /// Labels in order (comma-separated; default: as they first appear in the data).
    #[arg(long, value_delimiter = ',')]
    labels: Option<Vec<String>>,
    /// pae (default): the server trains on rotated pivots; mobillm: all tokens and labels on the server (for
    /// comparison); local: the device trains the side network itself, no server needed.
    #[arg(long, default_value = "pae")]
    mode: Mode,
    /// Use at most N training examples.
    #[arg(long)]
    train: Option<usize>,
    /// Use at most N held-out examples.
    #[arg(long)]
    test: Option<usize>,
    /// pae, local: epochs per round (default 10). mobillm: passes over the data, each a device forward (default 3).
    #[arg(long)]
    epochs: Option<usize>,
    /// pae, local: at most N rounds (default 8; local 4); fewer when the 10% of training examples held back on the
    /// device stop improving (below 200 examples there is no split and 3 rounds run).
    #[arg(long)]
    max_rounds: Option<usize>,
    /// How activations are quantised for upload (default int8).
    #[arg(long, value_enum)]
    quant: Option<QuantArg>,
    /// Examples per device forward (default 16).
    #[arg(long)]
    forward_batch: Option<usize>,
    /// Training mini-batch (default 128; pae and local give small data sets n/8, at least 16).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Learning rate (default 3e-3 for pae and local, 1e-3 for mobillm's small steps).
    #[arg(long)]
    lr: Option<f64>,
    /// Label differential privacy: train on labels passed through randomized response at this ε (smaller is
    /// more private and less accurate; default: the true labels).
    #[arg(long)]
    label_epsilon: Option<f64>,
    /// Send this many decoy tasks beside the real one (pae with secrets; at most 7), so the server's targets hold
    /// several partitions of the samples and not only the real one (docs/privacy.md).
    #[arg(long, default_value_t = 0)]
    decoys: usize,
    /// pae, local: what is kept of each tapped layer: `pivot` (default), or `pivot-and-mean`, its pivot and its mean
    /// over the prompt's tokens (twice the upload; pays on long texts and labels that rest on a few words).
    #[arg(long, default_value = "pivot")]
    summary: Summary,
    /// Save the device adapter here.
    #[arg(long)]
    save: Option<PathBuf>,
    /// Send plain activations and targets (measurement only: the server then sees them unprotected).
    #[arg(long, hide = true)]
    no_secrets: bool,
    /// Leave the session (and its cached activations) on the server.
    #[arg(long)]
    keep_session: bool,
    /// pae: make the fine-tune resumable, recording every acknowledged step in this file (deleted at the end).
    #[arg(long)]
    state: Option<PathBuf>,
    /// Seal the state file with the 32-byte key in this file.
    #[arg(long, requires = "state")]
    state_key_file: Option<PathBuf>,
    /// Continue the fine-tune recorded in `--state` (same data and options) instead of starting one.
    #[arg(long, requires = "state")]
    resume: bool,
    /// Print every progress event as `progress {json}` on stderr (for harnesses that act on them).
    #[arg(long, hide = true)]
    progress_events: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum QuantArg {
    F16,
    Int8,
    Int4,
}

fn main() -> ExitCode {
    mobillm_core::memory::release_large_blocks();
    match Cli::parse().command {
        Command::FineTune(args) => report(run_fine_tune(*args)),
        Command::Predict { model, adapter, texts } => report(run_predict(&model, &adapter, &texts)),
    }
}

fn report(result: Result<(), Box<dyn std::error::Error>>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mobillm-device: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load_split(args: &FineTuneArgs) -> Result<(Split, TaskSpec), Box<dyn std::error::Error>> {
    let (mut split, labels, template) = match (&args.data, &args.uci) {
        (Some(path), _) => {
            let split = dataset::split_jsonl(path)?;
            let all: Vec<_> = split.train.iter().chain(&split.test).cloned().collect();
            let template = args.template.clone().ok_or("--data needs --template")?;
            (split, dataset::labels_of(&all), template)
        }
        (None, Some(dir)) => (
            dataset::uci_split(dir)?,
            dataset::UCI_LABELS.map(String::from).to_vec(),
            args.template.clone().unwrap_or_else(|| dataset::UCI_TEMPLATE.to_string()),
        ),
        (None, None) => return Err("give the data: --uci DIR or --data FILE.jsonl --template T".into()),
    };
    if let Some(n) = args.train {
        split.train.truncate(n);
    }
    if let Some(n) = args.test {
        split.test.truncate(n);
    }
    let labels = args.labels.clone().unwrap_or(labels);
    Ok((split, TaskSpec { template, labels }))
}

fn run_fine_tune(args: FineTuneArgs) -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let (split, spec) = load_split(&args)?;
    let backbone = Backbone::load(&args.model)?;
    eprintln!(
        "device: {} ({} blocks, d={}), {} train / {} held-out examples, labels {:?}, mode {}",
        args.model.display(),
        backbone.config().num_hidden_layers,
        backbone.config().hidden_size,
        split.train.len(),
        split.test.len(),
        spec.labels,
        args.mode
    );
    // Only what was given changes the mode's defaults.
    let mut cfg = FineTuneConfig {
        server_url: args.server.clone(),
        // `local` talks to no server: no key to ask for.
        api_key: if args.mode == Mode::Local { String::new() } else { api_key(&args)? },
        insecure_http: args.insecure_http,
        ca_pem: args.ca.as_ref().map(std::fs::read).transpose()?,
        secrets: !args.no_secrets,
        keep_server_session: args.keep_session,
        label_epsilon: args.label_epsilon,
        decoys: args.decoys,
        summary: args.summary,
        state: match &args.state {
            Some(path) => Some(StateFile {
                path: path.clone(),
                key: args.state_key_file.as_ref().map(std::fs::read).transpose()?,
            }),
            None => None,
        },
        ..FineTuneConfig::for_mode(args.mode)
    };
    args.epochs.inspect(|&v| cfg.epochs = v);
    args.max_rounds.inspect(|&v| cfg.max_rounds = v);
    args.lr.inspect(|&v| cfg.lr = v);
    args.forward_batch.inspect(|&v| cfg.forward_batch = v);
    args.batch_size.inspect(|&v| cfg.batch_size = v);
    if let Some(q) = args.quant {
        cfg.quant = match q {
            QuantArg::F16 => Quant::F16,
            QuantArg::Int8 => Quant::Int8,
            QuantArg::Int4 => Quant::Int4,
        };
    }
    let cancel = CancelToken::new();
    let mut report = ProgressReport::new(started, cfg.mode);
    let run = if args.resume { resume } else { fine_tune };
    let outcome = run(&backbone, spec, &split.train, &split.test, &cfg, &cancel, &mut |p| {
        if args.progress_events {
            eprintln!("progress {}", serde_json::json!(p));
        }
        report.show(p)
    })?;
    report.finish();
    if let Some(path) = &args.save {
        outcome.adapter.save(path)?;
        eprintln!("adapter saved to {}", path.display());
    }
    let result = serde_json::json!({
        "mode": outcome.mode.to_string(),
        "zero_shot_acc": outcome.zero_shot_acc,
        "finetuned_acc": outcome.finetuned_acc,
        "label_epsilon": outcome.label_epsilon,
        "decoys": cfg.decoys,
        "summary": cfg.summary,
        "train_samples": outcome.train_samples,
        "validation_samples": outcome.validation_samples,
        "test_samples": outcome.test_samples,
        "upload_bytes": outcome.upload_bytes,
        // The refit sends the split too; without one, the split never leaves the device.
        "upload_bytes_per_sample": outcome.upload_bytes as f64
            / match outcome.refit_rounds {
                0 => outcome.train_samples - outcome.validation_samples,
                _ => outcome.train_samples,
            }
            .max(1) as f64,
        "device_forward_s": outcome.device_forward_s,
        "device_train_s": outcome.device_train_s,
        "device_peak_rss_mb": memory::peak_rss_mb(),
        "server_train_s": outcome.server_train_s,
        "wall_s": started.elapsed().as_secs_f64(),
        "rounds_used": outcome.rounds_used,
        "kept_round": outcome.kept_round,
        "refit_rounds": outcome.refit_rounds,
        "rounds": outcome.rounds,
        "resumes": outcome.resumes,
    });
    println!("{result}");
    Ok(())
}

fn api_key(args: &FineTuneArgs) -> Result<String, Box<dyn std::error::Error>> {
    let key = match &args.api_key_file {
        Some(path) => std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?,
        None => std::env::var("MOBILLM_API_KEY").map_err(|_| "set MOBILLM_API_KEY or give --api-key-file")?,
    };
    Ok(key.trim().to_string())
}

fn run_predict(
    model: &std::path::Path,
    adapter: &std::path::Path,
    texts: &[String],
) -> Result<(), Box<dyn std::error::Error>> {
    let backbone = Backbone::load(model)?;
    let adapter = DeviceAdapter::load(adapter)?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    for (text, p) in texts.iter().zip(adapter.predict(&backbone, &refs)?) {
        let scores: serde_json::Map<_, _> =
            adapter.task.labels.iter().cloned().zip(p.scores.iter().map(|s| serde_json::json!(s))).collect();
        println!("{}", serde_json::json!({"text": text, "label": p.label, "scores": scores}));
    }
    Ok(())
}
