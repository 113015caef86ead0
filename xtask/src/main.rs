//! Project chores: `cargo xtask <command>` (the alias builds this crate in release mode). The research commands
//! (benchmarks, the privacy audit, side-network evaluations, the load test) run the `mobillm-lab` binary.

mod api_check;
mod bindings;
mod lab;
mod test;

use anyhow::Result;
use clap::{Parser, Subcommand};
use xtask::{demo, fetch};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "MobiLLM project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// Arguments handed to `mobillm-lab` unchanged (`--help` among them).
#[derive(clap::Args)]
struct LabArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Download (once) and verify the default model, SmolLM2-135M-Instruct Q4_1, and print its path.
    FetchModel,
    /// Download (once) and verify the UCI Sentiment Labelled Sentences and print their directory.
    FetchData,
    /// The main job: an end-to-end fine-tune (device process + assist server on loopback) on the default model
    /// and the UCI sentences; prints one JSON line.
    Demo(Box<demo::Args>),
    /// Fetch the model and data, then run every test of the workspace in release mode (the README's test command).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
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
    /// schemathesis (PyPI) against the server's OpenAPI document: a short seeded run of every phase; fails on
    /// any failed check.
    ApiCheck,
    /// Start PostgreSQL and an S3-compatible server (s3s-fs) on 127.0.0.1 for the cluster store, print the
    /// variables that point the server and its tests at them, and keep them up until Ctrl-C.
    Services,
    /// (lab) Zero-shot accuracy of the frozen backbone on a held-out split.
    #[command(disable_help_flag = true)]
    Zeroshot(LabArgs),
    /// (lab) Side-network accuracy on real pivots, one task or several, N runs: zero-shot, `pae`, cross-entropy.
    #[command(disable_help_flag = true)]
    SideEval(LabArgs),
    /// (lab) Forward-pass speed and peak memory: candle's stock quantized model, dequantized weights, and ours.
    #[command(disable_help_flag = true)]
    BenchForward(LabArgs),
    /// (lab) MobiLLM (`pae`, `mobillm`) against on-device LoRA; writes docs/bench.json and docs/benchmarks.md.
    #[command(disable_help_flag = true)]
    Bench(LabArgs),
    /// (lab) On-device LoRA on the UCI sentences or a public task (`--task`), in one process: the benchmarks'
    /// baseline.
    #[command(disable_help_flag = true)]
    BenchLora(LabArgs),
    /// (lab) Privacy audit: plays the server against real fine-tunes; writes docs/privacy-audit.json and
    /// docs/privacy.md's results.
    #[command(disable_help_flag = true)]
    Audit(LabArgs),
    /// (lab) The label defences' frontier: accuracy against the best label attack; writes
    /// docs/privacy-frontier.{json,png} and docs/privacy.md's frontier table.
    #[command(disable_help_flag = true)]
    Frontier(LabArgs),
    /// (lab) Load test: N simulated devices against one server; prints one JSON line.
    #[command(disable_help_flag = true)]
    Load(LabArgs),
    /// (lab) The server as a cluster on real components (PostgreSQL, S3, nginx, two API replicas, two workers),
    /// a worker and a replica killed mid-run; prints one JSON line. `--scaling`: workers and replicas 1 → 2.
    #[command(disable_help_flag = true)]
    Cluster(LabArgs),
}

fn services() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("mobillm-services").tempdir()?;
    let services = xtask::services::ClusterServices::start(dir.path())?;
    for (k, v) in services.test_env() {
        println!("export {k}={v}");
    }
    println!("# up until Ctrl-C");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::FetchModel => println!("{}", fetch::model()?.display()),
        Cmd::FetchData => println!("{}", fetch::uci_data()?.display()),
        Cmd::Demo(args) => println!("{}", demo::run(*args)?),
        Cmd::Test { args } => test::run(&args)?,
        Cmd::Bindings { check } => bindings::bindings(check)?,
        Cmd::KotlinTest => bindings::kotlin_test()?,
        Cmd::SwiftCheck => bindings::swift_check()?,
        Cmd::Android => bindings::android()?,
        Cmd::Ios => bindings::ios()?,
        Cmd::ApiCheck => api_check::run()?,
        Cmd::Services => services()?,
        Cmd::Zeroshot(a) => lab::run("zeroshot", &a.args)?,
        Cmd::SideEval(a) => lab::run("side-eval", &a.args)?,
        Cmd::BenchForward(a) => lab::run("bench-forward", &a.args)?,
        Cmd::Bench(a) => lab::run("bench", &a.args)?,
        Cmd::BenchLora(a) => lab::run("bench-lora", &a.args)?,
        Cmd::Audit(a) => lab::run("audit", &a.args)?,
        Cmd::Frontier(a) => lab::run("frontier", &a.args)?,
        Cmd::Load(a) => lab::run("load", &a.args)?,
        Cmd::Cluster(a) => lab::run("cluster", &a.args)?,
    }
    Ok(())
}
