//! `cargo xtask cluster`: the assist server as a cluster on real components, started on 127.0.0.1 by this
//! harness — PostgreSQL (Debian's), an S3 server (`s3s-fs`), two API replicas (`--role serve`) behind nginx
//! (round-robin, failed requests retried on the other replica) and two training workers (`--role work`).
//!
//! Two kinds of simulated device run at once against nginx:
//! - upload devices, through the device's own client: a `pae` session shaped like SmolLM2-135M's, realistic
//!   frames (int8, as a phone sends them), each acknowledged sample id remembered; then training, and every
//!   acknowledged sample must come back in the session's outputs (what did not is *lost*);
//! - whole fine-tunes of a tiny generated backbone through the device's fine-tune code (`pae`, every round), whose
//!   held-out accuracy is compared with the same fine-tunes against one embedded-store server.
//!
//! As soon as a worker holds a job, that worker and one API replica are killed with SIGKILL; the job must be
//! claimed again once its lease passes. Prints one JSON line: `{devices, sessions_completed, sessions_failed,
//! acknowledged_samples_lost, upload_p50_ms, upload_p99_ms, jobs_reclaimed, accuracy_single_node,
//! accuracy_cluster, …}`. With `--real-model`, one fine-tune of the real model (160 train / 100 held-out UCI
//! sentences) runs against each too. With `--scaling`, it measures instead: training samples/s with one and two
//! workers, each pinned to a core, and API requests/s with one and two replicas behind nginx.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mobillm_core::client::AssistClient;
use mobillm_core::dataset::Example;
use mobillm_core::fine_tune::{fine_tune, CancelToken, FineTuneConfig};
use mobillm_core::{Backbone, Mode, TaskSpec};
use xtask::processes::{self, launch_server, Launch, Server};
use xtask::services::{Nginx, Postgres, S3};

use crate::load::{percentile, samples_frame, session_request, OUTPUTS};

#[derive(clap::Args)]
pub struct Args {
    /// Upload devices (SmolLM2-135M-shaped sessions), started 100 ms apart.
    #[arg(long, default_value_t = 12)]
    pub devices: usize,
    /// Samples each upload device sends.
    #[arg(long, default_value_t = 256)]
    pub samples: usize,
    /// Samples per upload frame.
    #[arg(long, default_value_t = 32)]
    pub chunk: usize,
    /// Epochs each upload device asks for.
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Whole fine-tunes of a tiny generated backbone, on one node and then on the cluster.
    #[arg(long, default_value_t = 5)]
    pub fine_tunes: usize,
    /// Also one fine-tune of the real model on each (SmolLM2-135M, 160 train / 100 held-out UCI sentences).
    #[arg(long)]
    pub real_model: bool,
    /// Kill nothing (to compare accuracy and latency with a run that kills).
    #[arg(long)]
    pub no_kill: bool,
    /// Seconds a worker's lease lasts (a killed worker's job is claimed again after this).
    #[arg(long, default_value_t = 5)]
    pub lease_secs: u64,
    /// Measure scaling instead (workers 1 → 2 and API replicas 1 → 2, each pinned to one core).
    #[arg(long)]
    pub scaling: bool,
}

/// How long the whole run may take before it is stopped as failed.
const DEADLINE: Duration = Duration::from_secs(1200);

const KEY: &str = "cluster-key";

/// The services and processes of one cluster.
struct Cluster {
    postgres: Postgres,
    s3: S3,
    bin_dir: PathBuf,
    work: PathBuf,
    replicas: Vec<Option<Server>>,
    workers: Vec<Option<Server>>,
}

impl Cluster {
    fn start(bin_dir: &Path, work: &Path) -> Result<Self> {
        let postgres = Postgres::start(&work.join("postgres"))?;
        create_database(&postgres)?;
        let s3 = S3::start(&work.join("s3"))?;
        let cluster = Self {
            postgres,
            s3,
            bin_dir: bin_dir.to_path_buf(),
            work: work.to_path_buf(),
            replicas: Vec::new(),
            workers: Vec::new(),
        };
        // The schema first, as a deployment would (every process would also migrate on start).
        let status = Command::new(bin_dir.join("mobillm-server"))
            .args(["--role", "migrate"])
            .envs(cluster.env())
            .status()
            .context("mobillm-server --role migrate")?;
        anyhow::ensure!(status.success(), "mobillm-server --role migrate failed");
        Ok(cluster)
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = self.s3.env();
        env.push(("MOBILLM_DATABASE_URL", self.database()));
        env.push(("MOBILLM_OBJECT_STORE", format!("s3://{}/cluster", self.s3.bucket)));
        env
    }

    /// Starts a process in `role` (`serve` or `work`), pinned to `cpu` if given.
    fn launch(&self, role: &str, n: usize, cpu: Option<usize>, lease_secs: u64) -> Result<Server> {
        let log = self.work.join(format!("{role}-{n}.log"));
        let launch = Launch {
            extra: vec![
                "--role".into(),
                role.into(),
                "--workers".into(),
                "1".into(),
                "--lease-secs".into(),
                lease_secs.to_string(),
            ],
            env: self.env(),
            cpu,
        };
        launch_server(&self.bin_dir, &self.work.join("unused-data"), KEY, &log, &launch)
            .with_context(|| format!("starting {role} {n} (log: {})", log.display()))
    }

    /// The cluster's database (made by [`create_database`] beside PostgreSQL's maintenance database).
    fn database(&self) -> String {
        self.postgres.url.replace("/postgres", "/mobillm")
    }

    /// The pid of a worker process that holds a job's lease now, if any (workers are named `pid-…-i`).
    fn worker_holding_a_job(&self) -> Result<Option<u32>> {
        let holders = psql(
            &self.database(),
            "SELECT (record::jsonb)->'lease'->>'worker' FROM sessions WHERE job_active AND lease_until > 0",
        )?;
        Ok(holders.lines().find_map(|w| w.split('-').next()?.parse().ok()))
    }
}

/// Creates the database the cluster's processes use (PostgreSQL's maintenance database stays untouched).
fn create_database(postgres: &Postgres) -> Result<()> {
    psql(&postgres.url, "CREATE DATABASE mobillm").map(drop)
}

/// One SQL statement through `psql` on the database at `url`: its rows as text.
fn psql(url: &str, sql: &str) -> Result<String> {
    let out = Command::new("psql").args([url, "-tAc", sql]).output().context("psql")?;
    anyhow::ensure!(out.status.success(), "psql {sql:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?)
}

/// A two-label task the tiny backbone can learn: the label is carried by the words.
fn spec() -> TaskSpec {
    TaskSpec { template: "Text: {text}\nIs it pos or neg:".into(), labels: vec!["pos".into(), "neg".into()] }
}

fn examples(n: usize, offset: usize) -> Vec<Example> {
    (offset..offset + n)
        .map(|i| match i % 2 {
            0 => Example { text: format!("the pos {i} at it"), label: "pos".into() },
            _ => Example { text: format!("on s{i} re as"), label: "neg".into() },
        })
        .collect()
}

fn tiny_config(url: &str) -> FineTuneConfig {
    FineTuneConfig {
        server_url: url.to_string(),
        api_key: KEY.into(),
        mode: Mode::Pae,
        width: 16,
        rank: 4,
        lr: 1e-2,
        batch_size: 8,
        epochs: 15,
        max_rounds: 2,
        forward_batch: 8,
        upload_chunk: 10,
        poll: Duration::from_millis(50),
        ..FineTuneConfig::default()
    }
}

/// `n` tiny fine-tunes at once against `url`: each one's held-out accuracy, or its error.
fn tiny_fine_tunes(backbone: &Backbone, url: &str, n: usize) -> Vec<Result<f64>> {
    let (train, test) = (examples(96, 0), examples(80, 1000));
    std::thread::scope(|s| {
        let runs: Vec<_> = (0..n)
            .map(|_| {
                s.spawn(|| {
                    let outcome = fine_tune(
                        backbone,
                        spec(),
                        &train,
                        &test,
                        &tiny_config(url),
                        &CancelToken::new(),
                        &mut |_| {},
                    )?;
                    outcome.finetuned_acc.context("no held-out accuracy")
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a fine-tune panicked")))).collect()
    })
}

/// One fine-tune of the real model (the demo's device program, small) against the server at `url`: its JSON
/// result.
fn real_fine_tune(url: &str) -> Result<serde_json::Value> {
    xtask::demo::run(xtask::demo::Args {
        mode: "pae".into(),
        train: Some(160),
        test: Some(100),
        epochs: Some(5),
        server: Some((url.into(), KEY.into())),
        ..Default::default()
    })
}

struct Tally {
    uploads_ms: Mutex<Vec<f64>>,
    acknowledged: AtomicUsize,
    lost: AtomicUsize,
}

/// An upload device: uploads, trains, and checks every acknowledged sample is in the outputs.
fn upload_device(client: &AssistClient, i: usize, args: &Args, tally: &Tally) -> Result<()> {
    let session = client.create_session(KEY, &session_request(i, args.samples))?;
    let mut acknowledged = Vec::with_capacity(args.samples);
    for start in (0..args.samples).step_by(args.chunk.max(1)) {
        let n = args.chunk.min(args.samples - start);
        let (ids, bytes) = samples_frame(n, (i * 7919 + start) as u64)?;
        let sent = Instant::now();
        client.upload_frame(&session, &bytes)?;
        tally.uploads_ms.lock().expect("uploads").push(sent.elapsed().as_secs_f64() * 1e3);
        tally.acknowledged.fetch_add(n, Ordering::Relaxed);
        acknowledged.extend(ids);
    }
    client.train(&session, args.epochs)?;
    let job = client.wait_trained(&session, Duration::from_millis(200), DEADLINE, |_| Ok(()))?.job;
    anyhow::ensure!(job.epochs_done == args.epochs, "trained {} of {} epochs", job.epochs_done, args.epochs);
    let outputs = client.outputs(&session, acknowledged.len(), OUTPUTS)?;
    let returned: HashSet<_> = outputs.iter().map(|(id, _)| *id).collect();
    let lost = acknowledged.iter().filter(|id| !returned.contains(id)).count();
    tally.lost.fetch_add(lost, Ordering::Relaxed);
    client.delete(&session)?;
    anyhow::ensure!(lost == 0, "{lost} acknowledged samples did not come back");
    Ok(())
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

pub fn run(args: Args) -> Result<serde_json::Value> {
    if args.scaling {
        return scaling(&args);
    }
    let bin_dir = processes::build_binaries()?;
    let work = tempfile::Builder::new().prefix("mobillm-cluster").tempdir()?;
    let model = work.path().join("tiny.gguf");
    mobillm_core::testkit::write_tiny_gguf(7, &model);
    let backbone = Backbone::load(&model)?;

    // One node, the embedded store: the accuracy to match.
    let single = processes::start_server(&bin_dir, &work.path().join("single"), KEY, &work.path().join("single.log"))?;
    eprintln!("cluster: {} tiny fine-tunes against one node ({})", args.fine_tunes, single.url);
    let single_accs: Vec<f64> =
        tiny_fine_tunes(&backbone, &single.url, args.fine_tunes).into_iter().collect::<Result<_>>()?;
    let single_real = if args.real_model { Some(real_fine_tune(&single.url)?) } else { None };
    drop(single);

    // The cluster.
    let mut cluster = Cluster::start(&bin_dir, work.path())?;
    for n in 0..2 {
        cluster.replicas.push(Some(cluster.launch("serve", n, None, args.lease_secs)?));
        cluster.workers.push(Some(cluster.launch("work", n, None, args.lease_secs)?));
    }
    let upstreams: Vec<String> = cluster.replicas.iter().flatten().map(|r| r.url.clone()).collect();
    let nginx = Nginx::start(&work.path().join("nginx"), &upstreams)?;
    eprintln!(
        "cluster: {} upload devices × {} samples and {} tiny fine-tunes through {}",
        args.devices, args.samples, args.fine_tunes, nginx.url
    );
    let client = AssistClient::new(&nginx.url)?;
    let tally =
        Tally { uploads_ms: Mutex::new(Vec::new()), acknowledged: AtomicUsize::new(0), lost: AtomicUsize::new(0) };
    let started = Instant::now();
    let done = AtomicBool::new(false);
    let killed = Mutex::new(None::<(f64, u32)>);
    let cluster_ref = Mutex::new(&mut cluster);
    let (device_results, tiny_results) = std::thread::scope(|s| {
        // The killer: once a third of the uploads are acknowledged, as soon as a worker holds a job, SIGKILL that
        // worker and API replica 0.
        s.spawn(|| {
            let third = args.devices * args.samples / 3;
            while !args.no_kill && !done.load(Ordering::SeqCst) && started.elapsed() < DEADLINE {
                if tally.acknowledged.load(Ordering::Relaxed) < third {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                let mut c = cluster_ref.lock().expect("cluster");
                if let Ok(Some(pid)) = c.worker_holding_a_job() {
                    let slot = c.workers.iter_mut().find(|w| w.as_ref().is_some_and(|w| w.pid() == pid));
                    if let Some(slot) = slot {
                        slot.take(); // dropping a server process kills it with SIGKILL
                        c.replicas[0].take();
                        eprintln!("cluster: killed worker {pid} (holding a job) and API replica 0 with SIGKILL");
                        *killed.lock().expect("killed") = Some((started.elapsed().as_secs_f64(), pid));
                        return;
                    }
                }
                drop(c);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let tiny = s.spawn(|| tiny_fine_tunes(&backbone, &nginx.url, args.fine_tunes));
        let devices: Vec<_> = (0..args.devices)
            .map(|i| {
                let (client, args, tally) = (&client, &args, &tally);
                s.spawn(move || {
                    std::thread::sleep(Duration::from_millis(100 * i as u64));
                    upload_device(client, i, args, tally)
                })
            })
            .collect();
        let devices: Vec<Result<()>> =
            devices.into_iter().map(|d| d.join().unwrap_or_else(|_| bail!("a device panicked"))).collect();
        let tiny = tiny.join().unwrap_or_default();
        done.store(true, Ordering::SeqCst);
        (devices, tiny)
    });
    let cluster_real = if args.real_model { Some(real_fine_tune(&nginx.url)?) } else { None };

    let mut jobs_reclaimed = 0.0;
    for w in cluster.workers.iter().flatten() {
        let metrics = w.admin_get("/metrics").unwrap_or_default();
        jobs_reclaimed += processes::metric(&metrics, "mobillm_jobs_reclaimed_total").unwrap_or(0.0);
    }
    let mut errors: Vec<String> = Vec::new();
    errors.extend(device_results.iter().filter_map(|r| r.as_ref().err().map(|e| format!("device: {e:#}"))));
    errors.extend(tiny_results.iter().filter_map(|r| r.as_ref().err().map(|e| format!("fine-tune: {e:#}"))));
    for e in errors.iter().take(5) {
        eprintln!("cluster: {e}");
    }
    let cluster_accs: Vec<f64> = tiny_results.iter().filter_map(|r| r.as_ref().ok().copied()).collect();
    let completed = device_results.iter().filter(|r| r.is_ok()).count() + cluster_accs.len();
    let mut uploads = tally.uploads_ms.into_inner().expect("uploads");
    let range = |v: &[f64]| {
        serde_json::json!([
            v.iter().copied().fold(f64::INFINITY, f64::min),
            v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
        ])
    };
    let real_acc = |r: &Option<serde_json::Value>| r.as_ref().map(|r| r["finetuned_acc"].clone());
    Ok(serde_json::json!({
        "devices": args.devices + args.fine_tunes,
        "sessions_completed": completed,
        "sessions_failed": args.devices + args.fine_tunes - completed,
        "acknowledged_samples": tally.acknowledged.into_inner(),
        "acknowledged_samples_lost": tally.lost.into_inner(),
        "upload_p50_ms": percentile(&mut uploads, 0.5),
        "upload_p99_ms": percentile(&mut uploads, 0.99),
        "jobs_reclaimed": jobs_reclaimed,
        "killed_at_s": killed.into_inner().expect("killed").map(|k| k.0),
        "accuracy_single_node": mean(&single_accs),
        "accuracy_cluster": mean(&cluster_accs),
        "accuracy_single_node_range": range(&single_accs),
        "accuracy_cluster_range": range(&cluster_accs),
        "accuracy_single_node_each": single_accs,
        "accuracy_cluster_each": cluster_accs,
        "real_model_accuracy_single_node": real_acc(&single_real),
        "real_model_accuracy_cluster": real_acc(&cluster_real),
        "wall_s": started.elapsed().as_secs_f64(),
    }))
}

/// Sessions the scaling run trains, samples in each, and epochs per round.
const SCALING_SESSIONS: usize = 8;
const SCALING_SAMPLES: usize = 512;
const SCALING_EPOCHS: usize = 2;
/// How long wrk drives the API per measurement.
const WRK_SECONDS: u64 = 8;

/// Training samples/s with 1 and 2 workers and API requests/s with 1 and 2 replicas, each of these processes
/// pinned to one core (`taskset`), in one run on one cluster.
fn scaling(args: &Args) -> Result<serde_json::Value> {
    anyhow::ensure!(
        std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2,
        "scaling needs two cores to pin two processes to"
    );
    let bin_dir = processes::build_binaries()?;
    let work = tempfile::Builder::new().prefix("mobillm-scaling").tempdir()?;
    let cluster = Cluster::start(&bin_dir, work.path())?;
    let api = cluster.launch("serve", 0, None, args.lease_secs)?;
    let client = AssistClient::new(&api.url)?;
    eprintln!("scaling: uploading {SCALING_SESSIONS} sessions × {SCALING_SAMPLES} samples");
    let mut sessions = Vec::new();
    for i in 0..SCALING_SESSIONS {
        let session = client.create_session(KEY, &session_request(i, SCALING_SAMPLES))?;
        for start in (0..SCALING_SAMPLES).step_by(128) {
            client.upload_frame(&session, &samples_frame(128, (i * 7919 + start) as u64)?.1)?;
        }
        sessions.push(session);
    }
    // One round of every job with `workers` workers pinned to cores 0.., timed from queueing to the last done.
    let round = |workers: usize| -> Result<f64> {
        let started_workers: Vec<Server> =
            (0..workers).map(|n| cluster.launch("work", n, Some(n), args.lease_secs)).collect::<Result<_>>()?;
        let started = Instant::now();
        for s in &sessions {
            client.train(s, SCALING_EPOCHS)?;
        }
        for s in &sessions {
            client.wait_trained(s, Duration::from_millis(100), DEADLINE, |_| Ok(()))?;
        }
        let secs = started.elapsed().as_secs_f64();
        drop(started_workers);
        let per_s = (SCALING_SESSIONS * SCALING_SAMPLES * SCALING_EPOCHS) as f64 / secs;
        eprintln!("scaling: {workers} worker(s): {per_s:.0} training samples/s ({secs:.1} s)");
        Ok(per_s)
    };
    let (train_1, train_2) = (round(1)?, round(2)?);
    drop(api);

    // API: GET a session's status (bearer token checked, record read from PostgreSQL) through nginx.
    let wrk = |replicas: usize| -> Result<(f64, f64)> {
        let servers: Vec<Server> =
            (0..replicas).map(|n| cluster.launch("serve", 10 + n, Some(n), args.lease_secs)).collect::<Result<_>>()?;
        let nginx = Nginx::start(
            &work.path().join(format!("nginx-{replicas}")),
            &servers.iter().map(|s| s.url.clone()).collect::<Vec<_>>(),
        )?;
        let s = &sessions[0];
        let cpu_before: f64 = servers.iter().map(|p| cpu_seconds(p.pid())).sum();
        let out = Command::new("wrk")
            .args(["-t", "2", "-c", "32", "-d", &format!("{WRK_SECONDS}s")])
            .args(["-H", &format!("Authorization: Bearer {}", s.token)])
            .arg(format!("{}/v1/sessions/{}", nginx.url, s.session_id))
            .output()
            .context("running wrk (Debian's wrk package)")?;
        let text = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(!text.contains("Non-2xx"), "wrk saw errors:\n{text}");
        let rps = text
            .lines()
            .find_map(|l| l.strip_prefix("Requests/sec:")?.trim().parse::<f64>().ok())
            .with_context(|| format!("wrk printed no rate:\n{text}"))?;
        let cpu: f64 = servers.iter().map(|p| cpu_seconds(p.pid())).sum::<f64>() - cpu_before;
        let cpu_ms_per_request = 1e3 * cpu / (rps * WRK_SECONDS as f64);
        eprintln!(
            "scaling: {replicas} API replica(s): {rps:.0} requests/s, {cpu_ms_per_request:.3} replica CPU ms each"
        );
        Ok((rps, cpu_ms_per_request))
    };
    let ((api_1, cpu_1), (api_2, _)) = (wrk(1)?, wrk(2)?);
    Ok(serde_json::json!({
        "training_samples_per_s_1_worker": train_1,
        "training_samples_per_s_2_workers": train_2,
        "worker_scaling": train_2 / train_1,
        "api_requests_per_s_1_replica": api_1,
        "api_requests_per_s_2_replicas": api_2,
        "replica_scaling": api_2 / api_1,
        "api_replica_cpu_ms_per_request": cpu_1,
        "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
    }))
}

/// User and system CPU seconds a process has used (`/proc/PID/stat`, in clock ticks of 1/100 s).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces, inside parentheses): utime and stime are the 12th
    // and 13th of them.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}
