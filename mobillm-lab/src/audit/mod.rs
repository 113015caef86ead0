//! `cargo xtask audit` (`mobillm-lab audit`): what the assist server can learn (docs/design.md §5), measured. Runs a real fine-tune twice —
//! secrets on (the default) and off (R = Q = I) — through the real server and device binaries, keeps the server's
//! data dir, and then plays the server: from what it stored (activations, targets, ids, adapter checkpoint, log)
//! plus the public backbone and public look-alike data (the held-out split), it attacks labels, texts and the
//! model. The auditor knows which stored sample is which text because it holds the device's secrets (saved with
//! the adapter); the attacks never use them.

pub(crate) mod acts;
pub(crate) mod attacks;
pub(crate) mod knowledge;
pub(crate) mod labels;
mod model;
mod reidentification;
mod report;
pub(crate) mod server_view;
mod text;

use anyhow::Result;
use mobillm_core::side::{DeviceAdapter, Secrets};
use serde_json::{json, Value};
use xtask::args::DataArgs;
use xtask::demo;

use crate::inputs::{self, WhiteningArgs};
use attacks::{Alignment, IcaAlignment};
use knowledge::Knowledge;
use server_view::{
    ground_truth, publicly_whitened, read_server_view, simulate_public_whitening, simulate_session, ServerView,
};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub data: DataArgs,
    /// Training examples of the victim's fine-tune (default: all; UCI has 2400). The held-out split is the
    /// attacker's public look-alike data.
    #[arg(long)]
    pub train: Option<usize>,
    /// Server epochs per round (default 10, at most 8 rounds).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Stored samples attacked by re-identification and token recovery.
    #[arg(long, default_value_t = 300)]
    pub attacked: usize,
    /// Candidate texts per re-identification, the true one among them.
    #[arg(long, default_value_t = 100)]
    pub pool: usize,
    /// Train on labels passed through randomized response at this ε (the device's label noise); the label
    /// attacks are scored against the true labels.
    #[arg(long)]
    pub label_epsilon: Option<f64>,
    /// Send this many decoy tasks beside the real one (the device's `--decoys`).
    #[arg(long, default_value_t = 0)]
    pub decoys: usize,
    /// Do not write docs/privacy-audit.json and the generated section of docs/privacy.md.
    #[arg(long)]
    pub no_docs: bool,
    /// Fail unless every attack family succeeds with the secrets off (so the attacks stay real) and the default's
    /// stolen adapter, token recovery and re-identification are not shown over their goals (each rate's 99% lower
    /// confidence bound ≤ chance + 5 points, ≤ 2.5%, half the goal, and ≤ 5%).
    #[arg(long)]
    pub check: bool,
    /// The small audit `cargo xtask test` runs: 400 training sentences, 200 of them attacked, no held-out scoring,
    /// only the conditions the check reads, no higher-moment alignment; implies --no-docs and --check.
    #[arg(long)]
    pub quick: bool,
    /// Run no fine-tune: simulate this many sessions with fresh secrets from the victim's plain activations (the
    /// device's whitening on a random calibration subset, rotations, int8 wire, f16 storage) and report each one's
    /// re-identification without known plaintext under the default's two conditions, and their range.
    #[arg(long)]
    pub draws: Option<usize>,
    /// With --draws: the simulated sessions' whitening.
    #[command(flatten)]
    pub whitening: WhiteningArgs,
    /// Principal axes per layer the second-moment alignment pairs by rank. Beyond the whitening's exactly
    /// whitened directions the stored cloud keeps its order, which more axes try to exploit.
    #[arg(long, default_value_t = ALIGN_AXES)]
    pub align_axes: usize,
    /// With --draws: the sessions send only their whitening's tail (the block zeroed), and the attacker whitens
    /// its public data the same way: what a server holding the block apart could isolate.
    #[arg(long, requires = "draws")]
    pub tail_only: bool,
}

/// The training sentences of `--quick`, and how many of them are attacked.
const QUICK_TRAIN: usize = 400;
const QUICK_ATTACKED: usize = 200;

/// Principal axes per layer that the alignment attack matches, unless `--align-axes` says otherwise.
pub const ALIGN_AXES: usize = 16;
/// The layers (every sixth, ending with the last) and components per layer of the higher-moment (ICA) alignment,
/// which costs far more than the second-moment one.
const ICA_LAYERS: [usize; 5] = [5, 11, 17, 23, 29];
const ICA_COMPONENTS: usize = 16;
/// Tokens this frequent in the public texts (by document frequency) are the attacker's free guesses (the, a, .);
/// token recovery counts only the others.
pub const FREQUENT_TOKENS: usize = 200;
/// The report's columns: (key, title). With the secrets on the server holds the device's whitened, rotated
/// samples; it attacks them with its public data as it is, and whitened with public statistics (its best guess at
/// the session's secret whitening). The simulated column is the alternative design: whitening with public
/// statistics that the attacker knows.
pub const CONDITIONS: [(&str, &str); 4] = [
    ("secrets_on", "secrets on (default)"),
    ("secrets_on_attacker_whitens", "secrets on, attacker whitens its data"),
    ("public_whitening_simulated", "public whitening instead (simulated)"),
    ("secrets_off", "secrets off"),
];
/// The conditions that are the default design: its figures are the worst of them.
const DEFAULT: [&str; 2] = ["secrets_on", "secrets_on_attacker_whitens"];

/// Anchor counts of the known-plaintext re-identification.
pub const KNOWN_PLAINTEXT: [usize; 3] = [1, 4, 16];

/// One session's stored data with what every attack shares.
pub struct Case<'a> {
    pub view: &'a ServerView,
    /// Which victim text (row of `k.everyone`) each stored sample is: the auditor's key, never used by an attack.
    pub truth: &'a [usize],
    pub k: &'a Knowledge,
    /// Each layer's alignment of stored to public activations, from second moments.
    pub alignments: Vec<Alignment>,
    /// Some layers' alignment from higher moments: (layer, alignment).
    pub ica: Vec<(usize, IcaAlignment)>,
    /// The true label of each stored sample.
    pub y: Vec<u32>,
    /// Every stored sample.
    pub all: Vec<usize>,
    /// The public texts' rows of `k.everyone`.
    pub public: Vec<usize>,
    /// The stored samples attacked by re-identification and token recovery.
    pub attacked: Vec<usize>,
}

impl<'a> Case<'a> {
    /// Aligns every layer from second moments and `ica_layers` from higher moments (those only re-identification
    /// uses).
    pub fn new(
        view: &'a ServerView,
        truth: &'a [usize],
        k: &'a Knowledge,
        attacked: usize,
        align_axes: usize,
        ica_layers: &[usize],
    ) -> Self {
        let acts = &view.acts;
        let (n, t) = (acts.n, acts.t);
        let all = acts.rows();
        let public = k.public_rows();
        eprintln!("audit: aligning {t} layers from second moments");
        let alignments: Vec<Alignment> =
            (0..t).map(|l| Alignment::fit(&k.everyone.layer(&public, l), &acts.layer(&all, l), align_axes)).collect();
        let ica_layers: Vec<usize> = ica_layers.iter().copied().filter(|&l| l < t).collect();
        if !ica_layers.is_empty() {
            eprintln!("audit: aligning {} layers from higher moments (ICA)", ica_layers.len());
        }
        let ica = ica_layers
            .into_iter()
            .map(|l| {
                (l, IcaAlignment::fit(&k.everyone.layer(&public, l), &acts.layer(&all, l), ICA_COMPONENTS, l as u64))
            })
            .collect();
        Case {
            view,
            truth,
            k,
            alignments,
            ica,
            y: truth.iter().map(|&i| k.labels[i]).collect(),
            all,
            public,
            attacked: (0..n.min(attacked)).collect(),
        }
    }
}

/// A real `pae` fine-tune through the server binary, as the server kept it.
pub struct Session {
    pub view: ServerView,
    /// Which victim text (row of `Knowledge::everyone`) each stored sample is.
    pub truth: Vec<usize>,
    /// The device's held-out accuracy (null without held-out scoring).
    pub device_acc: Value,
}

/// Fine-tunes on the first `k.n_train` victim texts through the real server and device binaries (secrets on or
/// off, labels through randomized response at `label_epsilon`, `decoys` decoy tasks when the secrets are on),
/// scoring on `held_out` examples, and reads what the server kept. The device's secrets, from its saved adapter, give the auditor its key.
pub fn fine_tune(
    data: &DataArgs,
    k: &Knowledge,
    held_out: usize,
    epochs: Option<usize>,
    secrets_on: bool,
    label_epsilon: Option<f64>,
    decoys: usize,
) -> Result<Session> {
    let work = tempfile::tempdir()?;
    let adapter_path = work.path().join("device-adapter.safetensors");
    let mut device_args = vec!["--keep-session".to_string()];
    if !secrets_on {
        device_args.push("--no-secrets".into());
    }
    if let Some(epsilon) = label_epsilon {
        device_args.extend(["--label-epsilon".to_string(), epsilon.to_string()]);
    }
    if secrets_on && decoys > 0 {
        device_args.extend(["--decoys".to_string(), decoys.to_string()]);
    }
    let device = demo::run_in(
        demo::Args {
            mode: "pae".into(),
            data: data.clone(),
            train: Some(k.n_train),
            test: Some(held_out),
            epochs,
            save: Some(adapter_path.clone()),
            device_args,
            ..Default::default()
        },
        work.path(),
    )?;
    let view = read_server_view(work.path())?;
    let adapter = DeviceAdapter::load(&adapter_path)?;
    anyhow::ensure!(adapter.secret_seed.is_some() == secrets_on, "the device's secrets are not as asked");
    let secrets = match adapter.secret_seed {
        Some(seed) => Secrets::from_seed(adapter.side_config(), seed)?,
        None => Secrets::disabled(adapter.side_config())?,
    };
    anyhow::ensure!(adapter.whitening.is_some() == secrets_on, "the device's whitening is not as asked");
    let truth = ground_truth(&view, &k.everyone, k.n_train, &secrets, adapter.whitening.as_ref())?;
    Ok(Session { view, truth, device_acc: device["finetuned_acc"].clone() })
}

/// `--draws`: re-identification without known plaintext (the best attack, and the alignment alone) in `draws`
/// simulated sessions, each with fresh secrets and calibration subset, with the attacker's public data plain and
/// whitened by public statistics. Prints one JSON line.
fn reidentification_over_draws(args: &Args, draws: usize, mut k: Knowledge) -> Result<()> {
    let truth: Vec<usize> = (0..k.n_train).collect();
    let mut whitened = publicly_whitened(&k.everyone, k.n_train, args.tail_only)?;
    let mut rows = Vec::new();
    for draw in 1..=draws {
        let view = simulate_session(&k.everyone, k.n_train, &args.whitening.config(k.n_train), args.tail_only)?;
        let attack = |k: &Knowledge| -> Result<Value> {
            let (reid, _) =
                reidentification::attack(&Case::new(&view, &truth, k, args.attacked, args.align_axes, &[]), args)?;
            let aligned = reid.iter().find(|(n, _)| *n == "aligned").map_or(f64::NAN, |(_, v)| *v);
            Ok(json!({"best": report::best(&reid), "aligned": aligned}))
        };
        let mut row = serde_json::Map::new();
        row.insert("secrets_on".into(), attack(&k)?);
        row.insert("secrets_on_attacker_whitens".into(), k.with_everyone(&mut whitened, attack)?);
        let best = DEFAULT.iter().filter_map(|c| row[*c]["best"].as_f64()).fold(f64::NAN, f64::max);
        row.insert("default".into(), json!(best));
        eprintln!(
            "audit: draw {draw}/{draws}: re-identification {:.1}% ({})",
            best * 100.0,
            Value::Object(row.clone())
        );
        rows.push(Value::Object(row));
    }
    let defaults: Vec<f64> = rows.iter().filter_map(|r| r["default"].as_f64()).collect();
    let over = defaults.iter().filter(|&&v| v > 0.05).count();
    println!(
        "{}",
        json!({
            "draws": rows, "train": k.n_train, "attacked": args.attacked.min(k.n_train), "pool": args.pool,
            "whitening": args.whitening.config(k.n_train), "tail_only": args.tail_only,
            "default_min": defaults.iter().copied().fold(f64::NAN, f64::min),
            "default_mean": defaults.iter().sum::<f64>() / defaults.len().max(1) as f64,
            "default_max": defaults.iter().copied().fold(f64::NAN, f64::max),
            "draws_over_goal": over,
        })
    );
    Ok(())
}

/// Every attack on one session's stored data. Returns the headline numbers and the details.
fn attack(view: &ServerView, truth: &[usize], k: &Knowledge, args: &Args) -> Result<Value> {
    let n = view.acts.n;
    // The quick audit leaves out the higher-moment alignment: it is the slowest attack and, at 400 sentences, finds
    // nothing even with the secrets off, so the check could not read it.
    let case = Case::new(view, truth, k, args.attacked, args.align_axes, if args.quick { &[] } else { &ICA_LAYERS });
    eprintln!("audit: label attacks");
    let (labels, label_details) = labels::attack(&case)?;
    eprintln!("audit: re-identification");
    let (reid, reid_details) = reidentification::attack(&case, args)?;
    eprintln!("audit: token recovery");
    let (text, text_details) = text::attack(&case)?;
    let model = model::attack(&case)?;
    Ok(json!({
        "label_attack_acc": report::best(&labels),
        "reidentification": report::best(&reid),
        "text_recovery": report::best(&text),
        "stolen_adapter_acc": model["adapter_alone"],
        "stolen_adapter_with_backbone_acc": model["with_public_backbone"],
        "details": {
            "samples": n,
            "labels": label_details,
            "reidentification": reid_details,
            "text": text_details,
            "model": model,
        },
    }))
}

pub fn run(mut args: Args) -> Result<()> {
    let (backbone, task, mut split) = inputs::load(&args.data)?;
    if args.quick {
        (args.train, args.attacked, args.no_docs, args.check) = (Some(QUICK_TRAIN), QUICK_ATTACKED, true, true);
    }
    if let Some(n) = args.train {
        split.train.truncate(n);
    }
    anyhow::ensure!(!split.train.is_empty() && !split.test.is_empty(), "the audit needs training and held-out data");
    anyhow::ensure!(
        args.draws.is_some() || !args.whitening.any(),
        "--whiten-* set the simulated sessions' whitening: they need --draws (a fine-tune whitens as the device does)"
    );
    let mut knowledge = knowledge::gather(&backbone, &task, &split)?;
    if let Some(draws) = args.draws {
        return reidentification_over_draws(&args, draws, knowledge);
    }
    let n_train = knowledge.n_train;
    let held_out = if args.quick { 0 } else { 200 };
    let mut report = serde_json::Map::new();
    for (name, secrets_on) in [("secrets_on", true), ("secrets_off", false)] {
        eprintln!("audit: fine-tune with {}", name.replace('_', " "));
        let session =
            fine_tune(&args.data, &knowledge, held_out, args.epochs, secrets_on, args.label_epsilon, args.decoys)?;
        let (view, truth) = (&session.view, &session.truth);
        let mut attack_as = |key: &str, view: &ServerView, k: &Knowledge| -> Result<()> {
            eprintln!("audit: {key}");
            let mut result = attack(view, truth, k, &args)?;
            result["details"]["device_finetuned_acc"] = session.device_acc.clone();
            eprintln!("audit: {key}: {}", headline(&result));
            report.insert(key.into(), result);
            Ok(())
        };
        if !secrets_on {
            attack_as("secrets_off", view, &knowledge)?;
            continue;
        }
        attack_as("secrets_on", view, &knowledge)?;
        let mut whitened = publicly_whitened(&knowledge.everyone, n_train, false)?;
        let simulated = simulate_public_whitening(view, truth, &whitened)?;
        knowledge.with_everyone(&mut whitened, |k| {
            attack_as("secrets_on_attacker_whitens", view, k)?;
            if !args.quick {
                attack_as("public_whitening_simulated", &simulated, k)?;
            }
            Ok::<(), anyhow::Error>(())
        })?;
    }
    let chance = knowledge.chance();
    // The default's figure for each attack: the best the server does in any of the default's conditions.
    let worst = |key: &str| DEFAULT.iter().filter_map(|c| report[*c][key].as_f64()).fold(f64::NAN, f64::max);
    let mut full = json!({
        "chance": chance,
        "default": {
            "label_attack_acc": worst("label_attack_acc"),
            "reidentification": worst("reidentification"),
            "text_recovery": worst("text_recovery"),
            "stolen_adapter_acc": worst("stolen_adapter_acc"),
        },
        "goals_met": {
            "label_attack": worst("label_attack_acc") <= chance + 0.05,
            "reidentification": worst("reidentification") <= 0.05,
            "text_recovery": worst("text_recovery") <= 0.05,
            "stolen_adapter": worst("stolen_adapter_acc") <= chance + 0.05,
        },
        "data": {"train": n_train, "public": split.test.len(), "attacked": args.attacked.min(n_train), "pool": args.pool},
        "command": format!(
            "cargo xtask audit{}{}{}",
            if args.quick { " --quick" } else { "" },
            args.train.filter(|_| !args.quick).map_or(String::new(), |n| format!(" --train {n}")),
            args.label_epsilon.map_or(String::new(), |e| format!(" --label-epsilon {e}"))
        ) + &if args.decoys > 0 { format!(" --decoys {}", args.decoys) } else { String::new() },
        "label_epsilon": args.label_epsilon,
        "decoys": args.decoys,
        "machine": xtask::report::machine(),
        "date": xtask::report::today(),
    });
    for (key, _) in CONDITIONS {
        full[key] = report.get(key).cloned().unwrap_or(Value::Null);
    }
    if !args.no_docs {
        report::write_docs(&full)?;
    }
    let mut line = json!({
        "chance": chance,
        "zero_shot_acc": full["secrets_on"]["details"]["model"]["uncalibrated"]["zero_shot"],
        "zero_shot_calibrated_acc": full["secrets_on"]["details"]["model"]["zero_shot"],
        "default": full["default"],
        "goals_met": full["goals_met"],
    });
    for (key, _) in CONDITIONS {
        line[key] = headline(&full[key]);
    }
    println!("{line}");
    if args.check {
        check(&full, chance)?;
    }
    Ok(())
}

/// What `--check` asserts. The label partition is not among the default's goals it checks: the default does not
/// hide it (docs/privacy.md), and the check says so rather than passing on a goal it misses.
fn check(full: &Value, chance: f64) -> Result<()> {
    let num = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let off = &full["secrets_off"];
    let text_chance = num(&off["details"]["text"]["chance"]);
    let mut failures = Vec::new();
    let mut expect = |ok: bool, what: String| {
        if !ok {
            failures.push(what);
        }
    };
    let (reid, label, text) =
        (num(&off["reidentification"]), num(&off["label_attack_acc"]), num(&off["text_recovery"]));
    expect(reid >= 0.9, format!("secrets off: re-identification {reid:.3}, expected ≥ 0.9"));
    expect(label >= 0.9, format!("secrets off: label attack {label:.3}, expected ≥ 0.9"));
    expect(text >= 20.0 * text_chance, format!("secrets off: token recovery {text:.4}, expected ≥ 20× chance"));
    // The stolen adapter's figures grant the thief the best offset per label (audit::model). Alone is the use
    // the check reads: added to the backbone's logits it is compared with the backbone under the same offset, and
    // on a prompt whose calibrated zero-shot is within a few points of any fine-tune (UCI's chat format, 91.8%)
    // that comparison cannot tell a working attack from a failed one.
    let stolen = num(&off["stolen_adapter_acc"]);
    expect(stolen >= chance + 0.15, format!("secrets off: stolen adapter {stolen:.3}, expected ≥ chance + 0.15"));
    let default = &full["default"];
    let (reid, text) = (num(&default["reidentification"]), num(&default["text_recovery"]));
    // Re-identification sits near its goal (4.5–5.7% measured), so a bound at the goal would fail about half the
    // runs on noise alone. The check fails when the data show the goal missed: the rate's one-sided 99% lower
    // confidence bound (Wilson) above 5% — at 200 attacked samples, 18 or more re-identified.
    let attacked = num(&full["data"]["attacked"]);
    let reid_low = wilson_lower_bound(reid, attacked, Z_ONE_SIDED_99);
    expect(
        reid_low <= 0.05,
        format!("default: re-identification {reid:.3} of {attacked}, its 99% lower bound {reid_low:.3} is over 0.05"),
    );
    // Token recovery is the best of four attacks at six layers in two conditions, and moves with the secrets'
    // draw (0.8–2.6% measured on the chat-format prompt): it is held to half its goal the same way, by the rate's
    // 99% lower bound over the content tokens counted — at 200 texts of about 6, failing from about 3.8%.
    let tokens = attacked * num(&full["secrets_on"]["details"]["text"]["content_tokens_per_text"]);
    let text_low = wilson_lower_bound(text, tokens, Z_ONE_SIDED_99);
    expect(
        text_low <= 0.025,
        format!(
            "default: token recovery {text:.4} of {tokens:.0} tokens, its 99% lower bound {text_low:.4} is over 0.025"
        ),
    );
    // The stolen adapter is scored on the public texts with an offset fitted to them (57.0% against chance 53.0%
    // in one quick audit): held to its goal by its accuracy's 99% lower bound, like the rates above.
    let stolen = num(&default["stolen_adapter_acc"]);
    let public = num(&full["data"]["public"]);
    let stolen_low = wilson_lower_bound(stolen, public, Z_ONE_SIDED_99);
    expect(
        stolen_low <= chance + 0.05,
        format!("default: stolen adapter {stolen:.3} on {public} texts, its 99% lower bound {stolen_low:.3} is over chance + 0.05"),
    );
    anyhow::ensure!(failures.is_empty(), "privacy audit check failed:\n  {}", failures.join("\n  "));
    eprintln!(
        "audit check passed: every attack family works with the secrets off; with the default, re-identification, \
         token recovery and the stolen adapter stay within their goals (the label partition is not hidden)"
    );
    Ok(())
}

/// Standard errors below the rate for the check's one-sided 99% lower confidence bounds.
const Z_ONE_SIDED_99: f64 = 2.326;

/// The lower end of the Wilson score interval for a rate `p` measured on `n` trials, `z` standard errors down.
fn wilson_lower_bound(p: f64, n: f64, z: f64) -> f64 {
    let z2 = z * z;
    let centre = p + z2 / (2.0 * n);
    let spread = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    (centre - spread) / (1.0 + z2 / n)
}

/// The four numbers the issue asks for (and the adapter with the backbone's logits, next to its alone figure).
fn headline(v: &Value) -> Value {
    json!({
        "label_attack_acc": v["label_attack_acc"],
        "reidentification": v["reidentification"],
        "text_recovery": v["text_recovery"],
        "stolen_adapter_acc": v["stolen_adapter_acc"],
        "stolen_adapter_with_backbone_acc": v["stolen_adapter_with_backbone_acc"],
    })
}

#[cfg(test)]
mod tests {
    use super::wilson_lower_bound;

    #[test]
    fn the_re_identification_bound_fails_only_on_clear_evidence() {
        // At 200 attacked samples: 17 re-identified (8.5%) is consistent with a 5% rate, 18 (9%) is not.
        assert!(wilson_lower_bound(17.0 / 200.0, 200.0, 2.326) <= 0.05);
        assert!(wilson_lower_bound(18.0 / 200.0, 200.0, 2.326) > 0.05);
        // More samples, tighter bound.
        assert!(wilson_lower_bound(0.07, 2000.0, 2.326) > 0.05);
        assert!(wilson_lower_bound(0.0, 200.0, 2.326).abs() < 1e-12);
    }
}
