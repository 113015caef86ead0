//! Project automation: `cargo xtask <command>` (the alias builds this crate in release mode).

mod api_check;
mod audit;
mod bench;
mod bench_forward;
mod bindings;
mod demo;
mod fetch;
mod load;
mod lora;
mod side_eval;
mod zeroshot;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "MobiLLM project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Download (once) and verify the default model, SmolLM2-135M-Instruct Q4_1, and print its path.
    FetchModel,
    /// Download (once) and verify the UCI Sentiment Labelled Sentences and print their directory.
    FetchData,
    /// The main job: an end-to-end fine-tune (device process + assist server on loopback) on the default model
    /// and the UCI sentences; prints one JSON line.
    Demo(demo::Args),
    /// Fetch the model and data, then run every test of the workspace in release mode (the README's test command).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Zero-shot accuracy of the frozen backbone on a held-out split.
    Zeroshot(zeroshot::Args),
    /// Side-network accuracy on real pivot activations: zero-shot, `pae` with secrets, cross-entropy baseline.
    SideEval(side_eval::Args),
    /// Forward-pass speed and peak memory: candle's stock quantized model, all weights dequantized, and ours.
    BenchForward(bench_forward::Args),
    /// Regenerate the Swift package and Kotlin module in bindings/ (library mode); with --check, fail if the
    /// committed copy differs from a fresh generation.
    Bindings {
        #[arg(long)]
        check: bool,
    },
    /// Compile the generated Kotlin and its tests with kotlinc and run them on the JVM against the real library.
    KotlinTest,
    /// Static checks of the Swift side: syntax (tree-sitter-swift), header compile, exported symbols.
    SwiftCheck,
    /// Build the Android libraries per ABI (needs the NDK and cargo-ndk).
    Android,
    /// Build the iOS xcframework (needs macOS with Xcode).
    Ios,
    /// MobiLLM (`pae`, `mobillm`) against on-device LoRA: device memory and time, upload, accuracy, time to
    /// accuracy; writes docs/bench.json and docs/benchmarks.md.
    Bench(bench::Args),
    /// On-device LoRA (the usual alternative) on the UCI sentences, in this process: accuracy per epoch, device
    /// seconds per training sample, peak RSS. The baseline of the benchmarks.
    BenchLora(lora::WorkerArgs),
    /// Privacy audit: fine-tunes with secrets on and off, then plays the server and attacks labels, texts and
    /// the model from what it stored; writes docs/privacy-audit.json and docs/privacy.md's results; prints JSON.
    Audit(audit::Args),
    /// schemathesis (PyPI) against the server's OpenAPI document: a short seeded run of every phase; fails on
    /// any failed check.
    ApiCheck,
    /// Load test: N simulated devices fine-tune against one server at once; prints one JSON line (upload and
    /// health latency percentiles, errors, the server's peak RSS).
    Load(load::Args),
    /// (internal) one benchmark variant, run in its own process so its peak RSS is its own.
    #[command(hide = true)]
    BenchForwardWorker(bench_forward::WorkerArgs),
}

/// Model and data options shared by the commands that run the backbone.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct DataArgs {
    /// A GGUF file or a safetensors directory (default: the fetched SmolLM2-135M-Instruct Q4_1).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// JSONL data, one {"text","label"} object per line (default: the UCI sentences).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Prompt template with one {text} slot, ending in an answer cue (default: the UCI sentiment prompt).
    #[arg(long)]
    pub template: Option<String>,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::FetchModel => println!("{}", fetch::model()?.display()),
        Cmd::FetchData => println!("{}", fetch::uci_data()?.display()),
        Cmd::Bindings { check } => bindings::bindings(check)?,
        Cmd::KotlinTest => bindings::kotlin_test()?,
        Cmd::SwiftCheck => bindings::swift_check()?,
        Cmd::Android => bindings::android()?,
        Cmd::Ios => bindings::ios()?,
        Cmd::Bench(args) => bench::run(args)?,
        Cmd::Audit(args) => audit::run(args)?,
        Cmd::BenchLora(args) => lora::worker(args)?,
        Cmd::Demo(args) => println!("{}", demo::run(args)?),
        Cmd::Test { args } => test(&args)?,
        Cmd::Zeroshot(args) => zeroshot::run(args)?,
        Cmd::Load(args) => println!("{}", load::run(args)?),
        Cmd::ApiCheck => api_check::run()?,
        Cmd::SideEval(args) => side_eval::run(args)?,
        Cmd::BenchForward(args) => bench_forward::run(args)?,
        Cmd::BenchForwardWorker(args) => bench_forward::worker(args)?,
    }
    Ok(())
}

/// The real model is fetched first so the integration tests run instead of skipping: `MOBILLM_REQUIRE_MODEL=1`
/// turns a missing model into a failure.
fn test(args: &[String]) -> Result<()> {
    let model = fetch::model()?;
    fetch::uci_data()?;
    let status = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["test", "--release", "--workspace"])
        .args(args)
        .env("MOBILLM_MODEL", &model)
        .env("MOBILLM_REQUIRE_MODEL", "1")
        .status()?;
    anyhow::ensure!(status.success(), "cargo test failed ({status})");
    if !args.is_empty() {
        return Ok(()); // a filtered run: only the tests asked for
    }
    // The API contract, as an outside client checks it.
    api_check::run()?;
    // The SDK: committed bindings are current, Swift passes its static checks, Kotlin tests pass on the JVM.
    bindings::bindings(true)?;
    bindings::swift_check()?;
    bindings::kotlin_test()?;
    // The main job, small: the real model, server and device binaries as separate processes, UCI data.
    eprintln!("test: demo smoke run (160 train / 100 held-out UCI sentences)");
    let result = demo::run(demo::Args {
        mode: "pae".into(),
        train: Some(160),
        test: Some(100),
        epochs: Some(5),
        ..Default::default()
    })?;
    println!("{result}");
    let (zero, tuned) = (result["zero_shot_acc"].as_f64(), result["finetuned_acc"].as_f64());
    let per_sample = result["upload_bytes_per_sample"].as_f64().unwrap_or(f64::INFINITY);
    anyhow::ensure!(
        matches!((zero, tuned), (Some(z), Some(t)) if t >= z + 0.05),
        "the demo's fine-tune did not beat zero-shot by 5 points: {result}"
    );
    anyhow::ensure!(per_sample <= 20_000.0, "the demo uploaded {per_sample} bytes per sample (goal ≤ 20 KB)");
    eprintln!("test: demo smoke run passed");
    Ok(())
}
