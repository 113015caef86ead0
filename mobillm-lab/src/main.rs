//! `mobillm-lab`: the research commands (`cargo xtask <command>` runs them through here).

use anyhow::Result;
use clap::{Parser, Subcommand};
use mobillm_lab::{audit, bench, bench_forward, cluster, frontier, load, lora, side_eval, zeroshot};

#[derive(Parser)]
#[command(name = "mobillm-lab", about = "MobiLLM research: audit, evaluations, benchmarks, load test")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Zero-shot accuracy of the frozen backbone on a held-out split.
    Zeroshot(zeroshot::Args),
    /// Side-network accuracy on real pivot activations, on one task or several and over N runs: zero-shot, `pae` as
    /// the device runs it by default, and a labels-on-server cross-entropy baseline.
    SideEval(side_eval::Args),
    /// Forward-pass speed and peak memory: candle's stock quantized model, all weights dequantized, and ours.
    BenchForward(bench_forward::Args),
    /// MobiLLM (`pae`, `mobillm`) against on-device LoRA: device memory and time, upload, accuracy, time to
    /// accuracy; writes docs/bench.json and docs/benchmarks.md.
    Bench(bench::Args),
    /// On-device LoRA (the usual alternative) on the UCI sentences or a public task (`--task`), in this process:
    /// accuracy per epoch, device seconds per training sample, peak RSS. The baseline of the benchmarks.
    BenchLora(lora::WorkerArgs),
    /// Privacy audit: fine-tunes with secrets on and off, then plays the server and attacks labels, texts and
    /// the model from what it stored; writes docs/privacy-audit.json and docs/privacy.md's results; prints JSON.
    Audit(audit::Args),
    /// The label defences' frontier: device accuracy against the best label attack for each defence and setting;
    /// writes docs/privacy-frontier.{json,png} and docs/privacy.md's frontier table; prints JSON.
    Frontier(frontier::Args),
    /// Load test: N simulated devices fine-tune against one server at once; prints one JSON line (upload and
    /// health latency percentiles, errors, the server's peak RSS).
    Load(load::Args),
    /// The server as a cluster (PostgreSQL, S3, nginx, two API replicas, two workers) with simulated devices, a
    /// worker and a replica killed mid-run; prints one JSON line. `--scaling` measures workers and replicas 1 → 2.
    Cluster(cluster::Args),
    /// (internal) one benchmark variant, run in its own process so its peak RSS is its own.
    #[command(hide = true)]
    BenchForwardWorker(bench_forward::WorkerArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if matches!(cli.command, Cmd::BenchForwardWorker(_) | Cmd::BenchLora(_)) {
        // The device processes of the benchmarks: the allocator setting of `mobillm-device`, so their peak RSS
        // is the device's.
        mobillm_core::memory::release_large_blocks();
    }
    match cli.command {
        Cmd::Zeroshot(args) => zeroshot::run(args)?,
        Cmd::SideEval(args) => side_eval::run(args)?,
        Cmd::BenchForward(args) => bench_forward::run(args)?,
        Cmd::BenchForwardWorker(args) => bench_forward::worker(args)?,
        Cmd::Bench(args) => bench::run(args)?,
        Cmd::BenchLora(args) => lora::worker(args)?,
        Cmd::Audit(args) => audit::run(args)?,
        Cmd::Frontier(args) => frontier::run(args)?,
        Cmd::Load(args) => println!("{}", load::run(args)?),
        Cmd::Cluster(args) => println!("{}", cluster::run(args)?),
    }
    Ok(())
}
