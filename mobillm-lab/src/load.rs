//! `cargo xtask load --devices N`: N simulated devices fine-tune against one release `mobillm-server` on
//! loopback at the same time, through the device's own client (retries, idempotency keys and all), while a
//! prober checks `/healthz` every 50 ms. Each device creates a `pae` session shaped like SmolLM2-135M's (30 taps of
//! 576), uploads frames of realistic activations (unit RMS per layer, a few outlier dimensions, int8 as the
//! device sends them), asks for one epoch, waits, downloads its outputs and deletes the session. Prints one JSON
//! line: `{devices, requests, errors, upload_p50_ms, upload_p99_ms, healthz_p99_ms, server_peak_rss_mb, …}`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mobillm_core::client::AssistClient;
use mobillm_core::memory;
use mobillm_core::protocol::CreateSession;
use mobillm_core::side::SampleId;
use mobillm_core::wire::{Frame, Quant};

use xtask::processes;

#[derive(clap::Args)]
pub struct Args {
    /// Simulated devices, all at once.
    #[arg(long, default_value_t = 200)]
    pub devices: usize,
    /// Samples each device uploads.
    #[arg(long, default_value_t = 64)]
    pub samples: usize,
    /// Samples per upload frame (the SDK's default).
    #[arg(long, default_value_t = 64)]
    pub chunk: usize,
    /// Extra `mobillm-server` flags (after `--`).
    #[arg(last = true)]
    pub server_args: Vec<String>,
}

pub(crate) const TAPS: usize = 30;
pub(crate) const DIM: usize = 576;
pub(crate) const OUTPUTS: usize = 8;
/// How long one device may take in all before it counts as an error.
const DEVICE_DEADLINE: Duration = Duration::from_secs(900);

/// Activations as the device uploads them: per layer unit RMS, Gaussian with a few large outlier dimensions
/// (as real pivots have), so frames compress as real ones do.
pub(crate) fn activations(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = mobillm_core::testkit::Rng::new(seed);
    let mut out = Vec::with_capacity(n * TAPS * DIM);
    for _ in 0..n * TAPS {
        let row: Vec<f32> = (0..DIM)
            .map(|j| {
                let g = rng.unit() + rng.unit() + rng.unit();
                if j % 97 == 0 {
                    12.0 * g
                } else {
                    g
                }
            })
            .collect();
        let rms = (row.iter().map(|v| v * v).sum::<f32>() / DIM as f32).sqrt().max(1e-6);
        out.extend(row.into_iter().map(|v| v / rms));
    }
    out
}

struct Tally {
    requests: AtomicUsize,
    errors: AtomicUsize,
    uploads_ms: Mutex<Vec<f64>>,
    first_error: Mutex<Option<String>>,
}

/// A `pae` session shaped like SmolLM2-135M's, for simulated device `i` uploading `samples` samples.
pub(crate) fn session_request(i: usize, samples: usize) -> CreateSession {
    CreateSession {
        mode: Default::default(),
        labels: None,
        layers: TAPS,
        dim: DIM,
        outputs: OUTPUTS,
        backbone: "load-test".into(),
        width: None,
        rank: None,
        members: None,
        activation: None,
        alpha0: None,
        lr: None,
        batch_size: Some((samples / 8).clamp(16, 128)),
        weight_decay: None,
        seed: Some(i as u64),
    }
}

/// A frame of `n` samples with realistic activations and arbitrary targets: its ids and encoded bytes.
pub(crate) fn samples_frame(n: usize, seed: u64) -> Result<(Vec<SampleId>, Vec<u8>)> {
    let ids: Vec<SampleId> = (0..n).map(|_| SampleId::random()).collect::<Result<_, _>>()?;
    let targets: Vec<f32> = (0..n * OUTPUTS).map(|k| ((k as u64 * 7 + seed) % 13) as f32 / 13.0 - 0.5).collect();
    let bytes = Frame::samples(ids.clone(), TAPS, DIM, activations(n, seed), OUTPUTS, targets).encode(Quant::Int8)?;
    Ok((ids, bytes))
}

fn device(client: &AssistClient, key: &str, i: usize, args: &Args, tally: &Tally) -> Result<()> {
    let started = Instant::now();
    let request = session_request(i, args.samples);
    let count = |n: usize| tally.requests.fetch_add(n, Ordering::Relaxed);
    let session = client.create_session(key, &request)?;
    count(1);
    let mut ids = Vec::with_capacity(args.samples);
    for start in (0..args.samples).step_by(args.chunk.max(1)) {
        let n = args.chunk.min(args.samples - start);
        let (frame_ids, bytes) = samples_frame(n, (i * 7919 + start) as u64)?;
        ids.extend_from_slice(&frame_ids);
        let sent = Instant::now();
        client.upload_frame(&session, &bytes)?;
        tally.uploads_ms.lock().expect("uploads").push(sent.elapsed().as_secs_f64() * 1e3);
        count(1);
    }
    client.train(&session, 1)?;
    count(1);
    let remaining = DEVICE_DEADLINE.saturating_sub(started.elapsed());
    client.wait_trained(&session, Duration::from_millis(500), remaining, |_| {
        count(1);
        Ok(())
    })?;
    let outputs = client.outputs(&session, ids.len(), OUTPUTS)?;
    count(1);
    anyhow::ensure!(outputs.len() == ids.len(), "{} outputs for {} samples", outputs.len(), ids.len());
    client.delete(&session)?;
    count(1);
    Ok(())
}

pub(crate) fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[((values.len() - 1) as f64 * p).round() as usize]
}

pub fn run(args: Args) -> Result<serde_json::Value> {
    let bin_dir = processes::build_binaries()?;
    let work = tempfile::tempdir()?;
    let key = format!("load-{}", std::process::id());
    let log = work.path().join("server.log");
    let server = processes::start_server_with(&bin_dir, &work.path().join("data"), &key, &log, &args.server_args)?;
    eprintln!(
        "load: {} devices × {} samples against {} (log: {})",
        args.devices,
        args.samples,
        server.url,
        log.display()
    );
    let client = AssistClient::new(&server.url)?;
    let tally = Tally {
        requests: AtomicUsize::new(0),
        errors: AtomicUsize::new(0),
        uploads_ms: Mutex::new(Vec::new()),
        first_error: Mutex::new(None),
    };
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let peak_reserved = std::sync::atomic::AtomicU64::new(0);
    let (mut health_ms, health_failures) = std::thread::scope(|s| {
        s.spawn(|| {
            // The budget's reservations, sampled: what the memory budget accounts for, beside the peak RSS.
            while !stop.load(Ordering::SeqCst) && started.elapsed() < DEVICE_DEADLINE {
                let usage: Option<serde_json::Value> =
                    server.admin_get("/admin/usage").ok().and_then(|u| serde_json::from_str(&u).ok());
                if let Some(r) = usage.and_then(|u| u["memory_reserved_bytes"].as_u64()) {
                    peak_reserved.fetch_max(r, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let prober = s.spawn(|| {
            let (mut times, mut failures) = (Vec::new(), 0usize);
            while !stop.load(Ordering::SeqCst) && started.elapsed() < DEVICE_DEADLINE {
                let t = Instant::now();
                // A fresh connection and no credentials, as a load balancer's probe sends it.
                match processes::http_get(&server.url, "/healthz", None) {
                    Ok(_) => times.push(t.elapsed().as_secs_f64() * 1e3),
                    Err(_) => failures += 1,
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (times, failures)
        });
        let devices: Vec<_> = (0..args.devices)
            .map(|i| {
                let (client, key, args, tally) = (&client, &key, &args, &tally);
                s.spawn(move || {
                    if let Err(e) = device(client, key, i, args, tally) {
                        tally.errors.fetch_add(1, Ordering::Relaxed);
                        tally.first_error.lock().expect("error").get_or_insert(format!("device {i}: {e}"));
                    }
                })
            })
            .collect();
        for d in devices {
            let _ = d.join();
        }
        stop.store(true, Ordering::SeqCst);
        prober.join().expect("health prober")
    });
    let peak = memory::peak_rss_mb_of(server.pid()).context("the server's /proc status")?;
    let metrics = server.admin_get("/metrics").unwrap_or_default();
    let metric = |name: &str| processes::metric(&metrics, name).unwrap_or(0.0);
    let mut uploads = tally.uploads_ms.into_inner().expect("uploads");
    if let Some(e) = tally.first_error.into_inner().expect("error") {
        eprintln!("load: first error: {e}");
    }
    Ok(serde_json::json!({
        "devices": args.devices,
        "requests": tally.requests.into_inner(),
        "errors": tally.errors.into_inner(),
        "upload_p50_ms": percentile(&mut uploads, 0.5),
        "upload_p99_ms": percentile(&mut uploads, 0.99),
        "healthz_p99_ms": percentile(&mut health_ms, 0.99),
        "healthz_failures": health_failures,
        "server_peak_rss_mb": peak,
        "server_peak_reserved_mb": peak_reserved.into_inner() as f64 / f64::from(1 << 20),
        "server_refused_overloaded": metric("mobillm_overloaded_total"),
        "memory_budget_mb": metric("mobillm_memory_budget_bytes") / f64::from(1 << 20),
        "wall_s": started.elapsed().as_secs_f64(),
    }))
}
