//! `cargo xtask bench`: MobiLLM against on-device LoRA and against full-activation transfer, in one run on one
//! machine. Each method runs as its own process(es), so device memory is each one's own: LoRA in an
//! `mobillm-lab bench-lora` child; `pae`, `mobillm` and `local` as the demo does (device program, plus the assist
//! server on loopback for the first two).
//! Writes `docs/bench.json` and the results section of `docs/benchmarks.md`, and prints the JSON as its last line.

use std::process::{Command, Stdio};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use xtask::report::{machine, replace_generated, today};
use xtask::{demo, paths};

#[derive(clap::Args)]
pub struct Args {
    /// Training examples (the UCI training split, in order), the same for every method.
    #[arg(long, default_value_t = 256)]
    pub train: usize,
    /// Held-out examples.
    #[arg(long, default_value_t = 200)]
    pub test: usize,
    /// Epochs of LoRA and passes of `mobillm` mode (`pae` and `local` run their defaults: up to 8 rounds of 10
    /// epochs over one device forward, stopped by their validation split).
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
}

/// The first time at which `acc` reaches `goal`, from parallel lists of accuracies and times.
fn time_to(goal: f64, accs: &[f64], times: &[f64]) -> Option<f64> {
    accs.iter().zip(times).find(|(a, _)| **a >= goal).map(|(_, t)| *t)
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().map(|a| a.iter().filter_map(Value::as_f64).collect()).unwrap_or_default()
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Value {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => json!(a / b),
        _ => Value::Null,
    }
}

pub fn run(args: Args) -> Result<()> {
    let (n, m, e) = (args.train.to_string(), args.test.to_string(), args.epochs.to_string());

    eprintln!("bench: 1/4 on-device LoRA ({} train, {} held-out, {} epochs)", args.train, args.test, args.epochs);
    let out = Command::new(std::env::current_exe()?)
        .args(["bench-lora", "--train", &n, "--test", &m, "--epochs", &e])
        .stderr(Stdio::inherit())
        .output()
        .context("running bench-lora")?;
    anyhow::ensure!(out.status.success(), "bench-lora failed ({})", out.status);
    let lora: Value = serde_json::from_str(String::from_utf8(out.stdout)?.lines().last().context("no LoRA result")?)?;

    eprintln!("bench: 2/4 pae");
    let pae = demo::run(demo::Args {
        mode: "pae".into(),
        train: Some(args.train),
        test: Some(args.test),
        ..Default::default()
    })?;
    eprintln!("bench: 3/4 mobillm");
    let mobillm = demo::run(demo::Args {
        mode: "mobillm".into(),
        train: Some(args.train),
        test: Some(args.test),
        epochs: Some(args.epochs),
        ..Default::default()
    })?;
    eprintln!("bench: 4/4 local");
    let local = demo::run(demo::Args {
        mode: "local".into(),
        train: Some(args.train),
        test: Some(args.test),
        ..Default::default()
    })?;

    let lora_accs = floats(&lora["acc_by_epoch"]);
    let lora_final = lora_accs.last().copied();
    let goal = lora_final.map(|a| a - 0.01);
    let rounds = |r: &Value| -> (Vec<f64>, Vec<f64>) {
        let list = r["rounds"].as_array().cloned().unwrap_or_default();
        (
            list.iter().filter_map(|x| x["finetuned_acc"].as_f64()).collect(),
            list.iter().filter_map(|x| x["elapsed_s"].as_f64()).collect(),
        )
    };
    let (pae_accs, pae_times) = rounds(&pae);
    let (mob_accs, mob_times) = rounds(&mobillm);
    let (local_accs, local_times) = rounds(&local);
    let lora_tta = goal.and_then(|g| time_to(g, &lora_accs, &floats(&lora["train_s_by_epoch"])));
    let pae_tta = goal.and_then(|g| time_to(g, &pae_accs, &pae_times));
    let mob_tta = goal.and_then(|g| time_to(g, &mob_accs, &mob_times));
    let local_tta = goal.and_then(|g| time_to(g, &local_accs, &local_times));
    let per_sample = |v: &Value, key: &str| v[key].as_f64().map(|s| s / args.train.max(1) as f64);
    let at = |accs: &[f64], i: usize| accs.get(i).copied();

    let result = json!({
        "command": format!("cargo xtask bench --train {} --test {} --epochs {}", args.train, args.test, args.epochs),
        "machine": machine(),
        "date": today(),
        "data": {"train": args.train, "test": args.test, "set": "UCI Sentiment Labelled Sentences"},
        "lora": {
            "rank": lora["rank"], "targets": "q, v", "trainable_params": lora["trainable_params"],
            "device_peak_rss_mb": lora["device_peak_rss_mb"],
            "device_s_per_train_sample_per_epoch": lora["device_s_per_train_sample"],
            "device_train_s": lora["device_train_s"],
            "zero_shot_acc": lora["zero_shot_acc"],
            "acc_epoch_1": at(&lora_accs, 0), "acc_epoch_3": at(&lora_accs, 2), "acc_by_epoch": lora_accs,
            "time_to_accuracy_s": lora_tta,
        },
        "pae": {
            "device_peak_rss_mb": pae["device_peak_rss_mb"],
            "device_s_per_train_sample": per_sample(&pae, "device_forward_s"),
            "device_forward_s": pae["device_forward_s"],
            "upload_bytes_per_sample": pae["upload_bytes_per_sample"],
            "server_train_s": pae["server_train_s"],
            "server_train_samples_per_s": pae["server_train_samples_per_s"],
            "acc_by_round": pae_accs, "acc_round_1": at(&pae_accs, 0), "acc_round_3": at(&pae_accs, 2),
            "finetuned_acc": pae["finetuned_acc"], "wall_s": pae["wall_s"],
            "time_to_accuracy_s": pae_tta,
        },
        "mobillm": {
            "device_peak_rss_mb": mobillm["device_peak_rss_mb"],
            "device_s_per_train_sample": per_sample(&mobillm, "device_forward_s"),
            "device_forward_s": mobillm["device_forward_s"],
            "upload_bytes_per_sample": mobillm["upload_bytes_per_sample"],
            "server_train_s": mobillm["server_train_s"],
            "acc_by_epoch": mob_accs, "acc_epoch_1": at(&mob_accs, 0), "acc_epoch_3": at(&mob_accs, 2),
            "finetuned_acc": mobillm["finetuned_acc"], "wall_s": mobillm["wall_s"],
            "time_to_accuracy_s": mob_tta,
        },
        "local": {
            "device_peak_rss_mb": local["device_peak_rss_mb"],
            "device_s_per_train_sample": per_sample(&local, "device_forward_s"),
            "device_forward_s": local["device_forward_s"],
            "device_train_s": local["device_train_s"],
            "upload_bytes_per_sample": local["upload_bytes_per_sample"],
            "acc_by_round": local_accs, "acc_round_1": at(&local_accs, 0),
            "finetuned_acc": local["finetuned_acc"], "wall_s": local["wall_s"],
            "time_to_accuracy_s": local_tta,
        },
        "ratios": {
            "device_rss_lora_over_pae": ratio(lora["device_peak_rss_mb"].as_f64(), pae["device_peak_rss_mb"].as_f64()),
            "device_time_lora_over_pae": ratio(lora["device_train_s"].as_f64(), pae["device_forward_s"].as_f64()),
            "upload_mobillm_over_pae": ratio(mobillm["upload_bytes_per_sample"].as_f64(), pae["upload_bytes_per_sample"].as_f64()),
            "time_to_accuracy_lora_over_pae": ratio(lora_tta, pae_tta),
            "time_to_accuracy_lora_over_local": ratio(lora_tta, local_tta),
            "device_time_local_over_pae": ratio(
                local["device_forward_s"].as_f64().zip(local["device_train_s"].as_f64()).map(|(f, t)| f + t),
                pae["device_forward_s"].as_f64(),
            ),
        },
    });
    write_docs(&result)?;
    println!("{result}");
    Ok(())
}

const START: &str = "<!-- cargo xtask bench: start -->";
const END: &str = "<!-- cargo xtask bench: end -->";

/// Writes docs/bench.json and replaces the generated section of docs/benchmarks.md.
fn write_docs(r: &Value) -> Result<()> {
    let docs = paths::root().join("docs");
    std::fs::write(docs.join("bench.json"), serde_json::to_string_pretty(r)? + "\n")?;
    let f = |v: &Value, digits: usize| v.as_f64().map_or("–".to_string(), |x| format!("{x:.digits$}"));
    let pct = |v: &Value| v.as_f64().map_or("–".to_string(), |x| format!("{:.1}%", x * 100.0));
    let list = |v: &Value| v.as_array().map_or("–".into(), |a| a.iter().map(pct).collect::<Vec<_>>().join(" → "));
    let (l, p, mo, lo, ra) = (&r["lora"], &r["pae"], &r["mobillm"], &r["local"], &r["ratios"]);
    let section = format!(
        "{START}\n## MobiLLM against on-device LoRA and full-activation transfer\n\n\
`{cmd}` on {machine}, {date}; {train} UCI training sentences, {test} held out, the same for every method.\n\n\
| | on-device LoRA (r={rank}, q+v) | `pae` | `mobillm` | `local` |\n|---|---|---|---|---|\n\
| device peak RSS | {l_rss} MB | {p_rss} MB | {m_rss} MB | {lo_rss} MB |\n\
| device seconds per training sample | {l_s} per epoch (forward + backward) | {p_s} in all (one forward) | {m_s} in all ({epochs} forwards) | {lo_s} forward + {lo_t} training |\n\
| upload per training sample | 0 | {p_up} bytes | {m_up} bytes | 0 |\n\
| server training seconds | – | {p_srv} | {m_srv} | – |\n\
| held-out accuracy | {l_acc} (zero-shot {zs}, per epoch) | {p_acc} (per round of 10 server epochs) | {m_acc} (per pass) | {lo_acc} (per round of 10 device epochs) |\n\
| time to within 1 point of LoRA's final accuracy | {l_tta} s | {p_tta} s | {m_tta} s | {lo_tta} s |\n\n\
Ratios: device RSS LoRA/pae **{r_rss}×**, device time LoRA (all epochs)/pae **{r_time}×**, upload mobillm/pae \
**{r_up}×**, time to accuracy LoRA/pae **{r_tta}×**, LoRA/local **{r_tta_lo}×**; device time local/pae \
**{r_lo_time}×**.\n{END}",
        cmd = r["command"].as_str().unwrap_or(""),
        machine = r["machine"].as_str().unwrap_or(""),
        date = r["date"].as_str().unwrap_or(""),
        train = r["data"]["train"],
        test = r["data"]["test"],
        rank = l["rank"],
        l_rss = f(&l["device_peak_rss_mb"], 0),
        p_rss = f(&p["device_peak_rss_mb"], 0),
        m_rss = f(&mo["device_peak_rss_mb"], 0),
        lo_rss = f(&lo["device_peak_rss_mb"], 0),
        lo_s = f(&lo["device_s_per_train_sample"], 3),
        lo_t = f(&lo["device_train_s"].as_f64().map(|t| t / r["data"]["train"].as_f64().unwrap_or(1.0)).into(), 3),
        lo_acc = list(&lo["acc_by_round"]),
        lo_tta = f(&lo["time_to_accuracy_s"], 1),
        r_tta_lo = f(&ra["time_to_accuracy_lora_over_local"], 1),
        r_lo_time = f(&ra["device_time_local_over_pae"], 1),
        l_s = f(&l["device_s_per_train_sample_per_epoch"], 3),
        p_s = f(&p["device_s_per_train_sample"], 3),
        m_s = f(&mo["device_s_per_train_sample"], 3),
        epochs = mo["acc_by_epoch"].as_array().map_or(0, Vec::len),
        p_up = f(&p["upload_bytes_per_sample"], 0),
        m_up = f(&mo["upload_bytes_per_sample"], 0),
        p_srv = f(&p["server_train_s"], 1),
        m_srv = f(&mo["server_train_s"], 1),
        l_acc = list(&l["acc_by_epoch"]),
        zs = pct(&l["zero_shot_acc"]),
        p_acc = list(&p["acc_by_round"]),
        m_acc = list(&mo["acc_by_epoch"]),
        l_tta = f(&l["time_to_accuracy_s"], 1),
        p_tta = f(&p["time_to_accuracy_s"], 1),
        m_tta = f(&mo["time_to_accuracy_s"], 1),
        r_rss = f(&ra["device_rss_lora_over_pae"], 1),
        r_time = f(&ra["device_time_lora_over_pae"], 1),
        r_up = f(&ra["upload_mobillm_over_pae"], 1),
        r_tta = f(&ra["time_to_accuracy_lora_over_pae"], 1),
    );
    replace_generated(&docs.join("benchmarks.md"), START, END, &section)
}
