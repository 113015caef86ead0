//! `cargo xtask test`, the README's test command: fetches what the tests need, then runs every test of the
//! workspace in release mode (the cluster store's tests against PostgreSQL and S3 started here), the API check, the
//! SDK's checks, a small demo in `pae` and in `local` mode, a small cluster run and a small privacy audit.

use std::time::Instant;

use anyhow::Result;
use xtask::{demo, fetch, paths, services};

use crate::{api_check, bindings, lab};

/// The real model is fetched first so the integration tests run instead of skipping: `MOBILLM_REQUIRE_MODEL=1`
/// turns a missing model into a failure.
pub fn run(args: &[String]) -> Result<()> {
    let mut clock = PhaseClock::start();
    let model = fetch::model()?;
    fetch::uci_data()?;
    // The Kotlin tests need a JVM and JNA, the frontier plot's test a font; find out now rather than after half an
    // hour of tests.
    bindings::ensure_test_packages()?;
    // The cluster store's tests run against PostgreSQL and an S3 server started here, on 127.0.0.1; each test
    // makes a database and an object prefix of its own. `MOBILLM_REQUIRE_CLUSTER=1` turns a missing service
    // into a failure rather than a skip.
    let services_dir = tempfile::Builder::new().prefix("mobillm-test-services").tempdir()?;
    let services = services::ClusterServices::start(services_dir.path())?;
    paths::run(
        paths::cargo()
            .args(["test", "--release", "--workspace"])
            .args(args)
            .envs(services.test_env())
            .env("MOBILLM_REQUIRE_CLUSTER", "1")
            .env("MOBILLM_MODEL", &model)
            .env("MOBILLM_REQUIRE_MODEL", "1")
            // The servers the tests start write megabytes at most; the production watermark (1 GiB free) would
            // fail them on a nearly full CI disk. The watermark's own test sets its own.
            .env("MOBILLM_MIN_FREE_DISK_MB", "64"),
        "cargo test",
    )?;
    drop(services);
    clock.lap("fetch, build and cargo test");
    if !args.is_empty() {
        return Ok(()); // a filtered run: only the tests asked for
    }
    // The API contract, as an outside client checks it.
    api_check::run()?;
    clock.lap("API check");
    // The SDK: committed bindings are current, Swift passes its static checks, Kotlin tests pass on the JVM.
    bindings::bindings(true)?;
    bindings::swift_check()?;
    bindings::kotlin_test()?;
    clock.lap("bindings, Swift and Kotlin");
    // The main job, small: the real model, server and device binaries as separate processes, UCI data, the device
    // killed with SIGKILL while the server trains and resumed by a new one; then the same in `local` mode (no
    // server started, nothing sent). Each must beat zero-shot by 5 points.
    let result = demo_smoke("pae", Some(demo::KillAt::Train(1)))?;
    let per_sample = result["upload_bytes_per_sample"].as_f64().unwrap_or(f64::INFINITY);
    anyhow::ensure!(per_sample <= 20_000.0, "the demo uploaded {per_sample} bytes per sample (goal ≤ 20 KB)");
    anyhow::ensure!(
        result["resumes"] == 1 && result["samples_sent_again"] == 0.0,
        "the resumed demo resumed other than once, or sent samples again: {result}"
    );
    let local = demo_smoke("local", None)?;
    anyhow::ensure!(local["upload_bytes"].as_u64() == Some(0), "a local fine-tune sent bytes: {local}");
    clock.lap("demo smoke runs");
    // The server as a cluster, small: PostgreSQL, S3, nginx, two API replicas and two workers, one replica and
    // one worker killed with SIGKILL mid-run.
    cluster_smoke()?;
    clock.lap("cluster smoke run");
    // The privacy audit, small: the attacks still work with the secrets off, and the default holds its goals.
    eprintln!("test: quick privacy audit (400 training sentences, 200 attacked)");
    lab::run("audit", &["--quick".to_string()])?;
    clock.lap("quick privacy audit");
    clock.print();
    Ok(())
}

/// Wall time per phase, printed at the end: CI has a time budget, and this says where it goes.
struct PhaseClock {
    laps: Vec<(&'static str, f64)>,
    since: Instant,
}

impl PhaseClock {
    fn start() -> Self {
        PhaseClock { laps: Vec::new(), since: Instant::now() }
    }

    fn lap(&mut self, phase: &'static str) {
        self.laps.push((phase, self.since.elapsed().as_secs_f64()));
        self.since = Instant::now();
    }

    fn print(&self) {
        let total: f64 = self.laps.iter().map(|(_, s)| s).sum();
        eprintln!("test: wall time by phase ({:.1} min in all):", total / 60.0);
        for (phase, seconds) in &self.laps {
            eprintln!("test:   {:>6.1} min  {phase}", seconds / 60.0);
        }
    }
}

/// `cargo xtask cluster`, small: every session completes, no acknowledged sample is lost, the killed worker's
/// job is claimed again, and the cluster's tiny fine-tunes are as accurate as one node's (within the run-to-run
/// noise of an 80-example held-out set).
fn cluster_smoke() -> Result<()> {
    eprintln!("test: cluster smoke run (6 upload devices, 8 tiny fine-tunes, a worker and a replica killed)");
    let r = lab::run_json("cluster", &["--devices", "6", "--samples", "96", "--fine-tunes", "8"])?;
    println!("{r}");
    let (single, cluster) = (r["accuracy_single_node"].as_f64(), r["accuracy_cluster"].as_f64());
    anyhow::ensure!(
        r["sessions_failed"] == 0
            && r["acknowledged_samples_lost"] == 0
            && r["jobs_reclaimed"].as_f64().is_some_and(|n| n >= 1.0)
            && matches!((single, cluster), (Some(s), Some(c)) if c >= s - 0.15 && c >= 0.65),
        "the cluster smoke run failed its goals: {r}"
    );
    eprintln!("test: cluster smoke run passed");
    Ok(())
}

/// A small demo in `mode` (160 training / 100 held-out UCI sentences, 5 epochs), killed and resumed at `kill_at`:
/// its JSON result, once it has beaten zero-shot by 5 points.
fn demo_smoke(mode: &str, kill_at: Option<demo::KillAt>) -> Result<serde_json::Value> {
    eprintln!("test: {mode} demo smoke run (160 train / 100 held-out UCI sentences, killed at {kill_at:?})");
    let result = demo::run(demo::Args {
        mode: mode.into(),
        train: Some(160),
        test: Some(100),
        epochs: Some(5),
        kill_at,
        ..Default::default()
    })?;
    println!("{result}");
    let (zero, tuned) = (result["zero_shot_acc"].as_f64(), result["finetuned_acc"].as_f64());
    anyhow::ensure!(
        matches!((zero, tuned), (Some(z), Some(t)) if t >= z + 0.05),
        "the {mode} demo's fine-tune did not beat zero-shot by 5 points: {result}"
    );
    eprintln!("test: {mode} demo smoke run passed");
    Ok(result)
}
