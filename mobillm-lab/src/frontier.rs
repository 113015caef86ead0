//! `cargo xtask frontier` (`mobillm-lab frontier`): the label defences measured as a frontier (docs/privacy.md).
//! For each defence and dial setting, a real `pae` fine-tune through the server (secrets on) gives the device's
//! held-out accuracy, and the audit's label attacks on what the server kept give the best label attack — with the
//! attacker's public data as it is and whitened, the default's two conditions. The points:
//!
//! - no label defence (today's default);
//! - randomized response on the device at each `--epsilons` ε (the attack is also bounded by theory: a Bayes
//!   attacker with no prior better than the class balance who recovers every noisy label exactly is right with
//!   probability `e^ε / (e^ε + K − 1)`);
//! - decoy tasks: `--decoys` M synthetic tasks beside the real one, mixed with it through Q (the attacks include
//!   the adaptive ones: the targets unmixed into candidate partitions, the one most learnable or most like the
//!   public probe picked);
//! - a label head on the device: a ridge readout of the session-whitened taps of every layer, fitted on the
//!   device with its labels. Nothing label-dependent is sent, so its attack is the best attack on activations
//!   alone (measured on the first session's stored activations, which do not depend on the labels).
//!
//! Prints one JSON line; unless `--no-docs`, writes docs/privacy-frontier.json, docs/privacy-frontier.png and the
//! frontier table in docs/privacy.md (for `--task T`: docs/privacy-frontier-T.{json,png} and that task's table).

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use mobillm_core::side::label_noise::keep_probability;
use mobillm_core::side::whitening::{self, Whitening};
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use serde_json::{json, Value};
use xtask::args::DataArgs;
use xtask::{paths, report};

use crate::audit::acts::Acts;
use crate::audit::attacks::{accuracy, argmax_rows, one_hot, DualRidge, Mat};
use crate::audit::knowledge::{self, Knowledge};
use crate::audit::server_view::publicly_whitened;
use crate::audit::{fine_tune, labels, Case, Session};
use crate::inputs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub data: DataArgs,
    /// Training examples of each fine-tune (UCI has 2400).
    #[arg(long, default_value_t = 1200)]
    pub train: usize,
    /// The ε of each randomized-response point (comma-separated; the flag alone: none).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_values_t = vec![4.0, 2.0, 1.0, 0.5])]
    pub epsilons: Vec<f64>,
    /// The decoy counts of the decoy points (comma-separated; the flag alone: none).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_values_t = vec![1, 3])]
    pub decoys: Vec<usize>,
    /// Do not write docs/privacy-frontier.{json,png} and the frontier table of docs/privacy.md.
    #[arg(long)]
    pub no_docs: bool,
}

/// The device head's ridge penalty, relative to the mean eigenvalue of the Gram matrix: `side-eval --ridge all`
/// found 92.2–92.8% held out for 0.03–1, so the middle of that range, chosen once rather than on the held-out set.
const HEAD_PENALTY: f64 = 0.1;

/// One point of the frontier.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Point {
    pub defence: &'static str,
    pub setting: String,
    pub epsilon: Option<f64>,
    pub device_acc: f64,
    /// The best label attack over every attack and both default conditions.
    pub label_attack: f64,
    pub best_attack: String,
    /// The best of the attacks that need no public look-alike data.
    pub label_attack_without_public_data: f64,
    /// What label DP alone allows a Bayes attacker with the class balance as its prior.
    pub dp_bound: Option<f64>,
}

pub fn run(args: Args) -> Result<()> {
    // The docs have a section for UCI and for each public task, none for a file of one's own.
    anyhow::ensure!(
        args.no_docs || args.data.data.is_none(),
        "with --data, add --no-docs: the docs have no section for it"
    );
    let task_name = args.data.task.map(|t| t.name());
    let (backbone, task, mut split) = inputs::load(&args.data)?;
    split.train.truncate(args.train);
    anyhow::ensure!(split.train.len() >= 100 && split.test.len() >= 100, "the frontier needs ≥ 100 train and held-out");
    let mut k = knowledge::gather(&backbone, &task, &split)?;
    let held_out = split.test.len();
    let chance = k.chance();
    // The attacker's public data whitened with public statistics: the same for every session.
    let mut whitened = publicly_whitened(&k.everyone, k.n_train, false)?;
    let mut points = Vec::new();
    // The first session's attacks: its stored activations do not depend on the labels.
    let mut first_attacks: Option<Vec<(String, f64)>> = None;
    let settings = std::iter::once((None, 0))
        .chain(args.epsilons.iter().map(|&e| (Some(e), 0)))
        .chain(args.decoys.iter().map(|&m| (None, m)));
    for (epsilon, decoys) in settings {
        let setting = match (epsilon, decoys) {
            (Some(e), _) => format!("ε = {e}"),
            (None, 0) => "true labels".to_string(),
            (None, m) => format!("M = {m}"),
        };
        eprintln!("frontier: fine-tune with {setting}");
        let session = fine_tune(&args.data, &k, held_out, None, true, epsilon, decoys)?;
        let attacks = label_attacks(&session, &mut k, &mut whitened)?;
        let (best_attack, label_attack) = best(&attacks, |_| true);
        let device_acc = session.device_acc.as_f64().context("the device reported no held-out accuracy")?;
        let point = Point {
            defence: match (epsilon, decoys) {
                (Some(_), _) => "randomized response",
                (None, 0) => "none",
                _ => "decoy tasks",
            },
            setting,
            epsilon,
            device_acc,
            label_attack,
            best_attack,
            label_attack_without_public_data: best(&attacks, |a| labels::WITHOUT_PUBLIC_DATA.contains(&a)).1,
            dp_bound: epsilon.map(|e| keep_probability(e, k.n_labels).max(chance)),
        };
        eprintln!("frontier: {point:?}");
        points.push(point);
        first_attacks.get_or_insert(attacks);
    }
    let attacks = first_attacks.context("no fine-tune ran")?;
    let (best_attack, label_attack) = best(&attacks, |a| labels::FROM_ACTIVATIONS.contains(&a));
    let head = Point {
        defence: "label head on the device",
        setting: format!("ridge, all layers, penalty {HEAD_PENALTY}"),
        epsilon: None,
        device_acc: device_head_accuracy(&k)?,
        label_attack,
        best_attack,
        label_attack_without_public_data: best(&attacks, |a| {
            labels::FROM_ACTIVATIONS.contains(&a) && labels::WITHOUT_PUBLIC_DATA.contains(&a)
        })
        .1,
        dp_bound: None,
    };
    eprintln!("frontier: {head:?}");
    points.push(head);
    let result = json!({
        "chance": chance,
        "goal_label_attack": chance + 0.05,
        "goal_accuracy": 0.93,
        "points": points,
        "data": {"train": k.n_train, "held_out": held_out},
        "command": format!("cargo xtask frontier{} --train {} --epsilons {} --decoys {}",
            task_name.map_or(String::new(), |t| format!(" --task {t}")), args.train,
            args.epsilons.iter().map(f64::to_string).collect::<Vec<_>>().join(","),
            args.decoys.iter().map(usize::to_string).collect::<Vec<_>>().join(",")),
        "machine": report::machine(),
        "date": report::today(),
    });
    if !args.no_docs {
        let name = task_name.map_or("privacy-frontier".to_string(), |t| format!("privacy-frontier-{t}"));
        let docs = paths::root().join("docs");
        std::fs::write(docs.join(format!("{name}.json")), serde_json::to_string_pretty(&result)? + "\n")?;
        plot(&points, chance, &docs.join(format!("{name}.png")))?;
        write_table(&result, &points, &name, task_name)?;
    }
    println!("{result}");
    Ok(())
}

/// Every label attack on a session, as the default's two conditions allow: with the attacker's public data plain
/// and `whitened` by public statistics (swapped into `k` for the second); each attack's better figure.
fn label_attacks(session: &Session, k: &mut Knowledge, whitened: &mut Acts) -> Result<Vec<(String, f64)>> {
    let mut results: Vec<(String, f64)> = Vec::new();
    let mut merge = |found: Vec<(&'static str, f64)>, naming: f64| {
        for (name, v) in found.into_iter().chain([("target_clusters_named_by_aligned_probe", naming)]) {
            match results.iter_mut().find(|(n, _)| n == name) {
                Some((_, best)) => *best = best.max(v),
                None => results.push((name.to_string(), v)),
            }
        }
    };
    let (view, truth) = (&session.view, &session.truth);
    let (found, details) = labels::attack(&Case::new(view, truth, k, 0, crate::audit::ALIGN_AXES, &[]))?;
    merge(found, details["target_clusters_named_by_aligned_probe"].as_f64().unwrap_or(0.0));
    let (found, details) =
        k.with_everyone(whitened, |k| labels::attack(&Case::new(view, truth, k, 0, crate::audit::ALIGN_AXES, &[])))?;
    merge(found, details["target_clusters_named_by_aligned_probe"].as_f64().unwrap_or(0.0));
    Ok(results)
}

/// The best of the attacks `keep` selects: (name, accuracy).
fn best(attacks: &[(String, f64)], keep: impl Fn(&str) -> bool) -> (String, f64) {
    attacks
        .iter()
        .filter(|(n, _)| keep(n))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .cloned()
        .unwrap_or_else(|| ("none".into(), f64::NAN))
}

/// Held-out accuracy of a label head fitted on the device: the session's whitening (core's, on a calibration
/// subset of the training texts), then a ridge readout of all layers (dual form) on one-hot labels.
fn device_head_accuracy(k: &Knowledge) -> Result<f64> {
    let (n, t, d) = (k.n_train, k.everyone.t, k.everyone.d);
    let all = Tensor::from_slice(&k.everyone.flat, (k.everyone.n, t, d), &Device::Cpu)?;
    let calibration = all.narrow(0, 0, n.min(whitening::CALIBRATION_SAMPLES))?;
    let w = Whitening::fit(&calibration, &whitening::Config::for_examples(n))?;
    let x = w.apply(&all)?.reshape((k.everyone.n, t * d))?;
    let (train, public) = (x.narrow(0, 0, n)?, x.narrow(0, n, k.everyone.n - n)?);
    let mean = train.mean_keepdim(0)?;
    let (train, public) = (train.broadcast_sub(&mean)?, public.broadcast_sub(&mean)?);
    let gram = to_mat(&train.matmul(&train.t()?)?)?.cast::<f64>();
    let cross = to_mat(&public.matmul(&train.t()?)?)?.cast::<f64>();
    let head = DualRidge::fit(gram, &one_hot(&k.labels[..n], k.n_labels).cast::<f64>());
    Ok(accuracy(&argmax_rows(&head.predict(&cross, HEAD_PENALTY).cast::<f32>()), k.public_labels()))
}

fn to_mat(x: &Tensor) -> Result<Mat> {
    let (r, c) = x.dims2()?;
    Ok(Mat::from_row_slice(r, c, &x.flatten_all()?.to_vec1::<f32>()?))
}

/// The font the plot draws its text with (Debian fonts-dejavu-core, which `cargo xtask test` installs).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Draws the frontier: held-out accuracy against the best label attack, one series per defence, with the goals.
pub fn plot(points: &[Point], chance: f64, path: &Path) -> Result<()> {
    let font = std::fs::read(FONT).with_context(|| format!("reading {FONT} (Debian package fonts-dejavu-core)"))?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into_boxed_slice()))
        .map_err(|_| anyhow::anyhow!("{FONT} is not a font plotters can read"))?;
    let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let lowest = points.iter().map(|p| p.device_acc).fold(0.9, f64::min);
    let mut chart = ChartBuilder::on(&root)
        .caption("Label defences: accuracy against the best label attack", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(45.0..106.0, ((lowest * 100.0 - 3.0).floor())..97.0)?;
    chart
        .configure_mesh()
        .x_desc("best label attack on what the server stores (%)")
        .y_desc("device held-out accuracy (%)")
        .label_style(("sans-serif", 14))
        .draw()?;
    let goal = (chance + 0.05) * 100.0;
    let dashed = |from: (f64, f64), to: (f64, f64)| {
        DashedPathElement::new(vec![from, to], 6, 4, ShapeStyle::from(&BLACK.mix(0.5)).stroke_width(1))
    };
    chart.draw_series([dashed((goal, 0.0), (goal, 100.0)), dashed((0.0, 93.0), (100.0, 93.0))])?;
    chart.draw_series([Text::new(
        format!("goal: attack ≤ {goal:.1}%, accuracy ≥ 93%"),
        (goal + 0.5, 95.5),
        ("sans-serif", 13),
    )])?;
    let series: [(&str, RGBColor); 4] = [
        ("none", RED),
        ("randomized response", BLUE),
        ("decoy tasks", RGBColor(230, 140, 0)),
        ("label head on the device", RGBColor(0, 140, 0)),
    ];
    for (defence, colour) in series {
        let mut xy: Vec<&Point> = points.iter().filter(|p| p.defence == defence).collect();
        xy.sort_by(|a, b| a.label_attack.total_cmp(&b.label_attack));
        let at = |p: &Point| (p.label_attack * 100.0, p.device_acc * 100.0);
        chart
            .draw_series(LineSeries::new(xy.iter().map(|p| at(p)), colour.stroke_width(2)))?
            .label(defence)
            .legend(move |(x, y)| Circle::new((x + 10, y), 5, colour.filled()));
        chart.draw_series(xy.iter().map(|p| Circle::new(at(p), 6, colour.filled())))?;
        // The dial's setting beside each point of a defence that has one.
        let dialled = |p: &&&Point| matches!(p.defence, "randomized response" | "decoy tasks");
        chart.draw_series(
            xy.iter()
                .filter(dialled)
                .map(|p| Text::new(p.setting.replace(' ', ""), (at(p).0 + 0.6, at(p).1 + 0.6), ("sans-serif", 13))),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The generated frontier table in docs/privacy.md: UCI's, or `task`'s between its own markers, showing `image`.png.
fn write_table(result: &Value, points: &[Point], image: &str, task: Option<&str>) -> Result<()> {
    let tag = task.map_or(String::new(), |t| format!(" --task {t}"));
    let (start, end) =
        (format!("<!-- cargo xtask frontier{tag}: start -->"), format!("<!-- cargo xtask frontier{tag}: end -->"));
    let pct = |x: f64| if x.is_finite() { format!("{:.1}%", x * 100.0) } else { "–".into() };
    let rows: String = points
        .iter()
        .map(|p| {
            format!(
                "| {} | {} | {} | {} ({}) | {} | {} |\n",
                p.defence,
                p.setting,
                pct(p.device_acc),
                pct(p.label_attack),
                p.best_attack.replace('_', " "),
                pct(p.label_attack_without_public_data),
                p.dp_bound.map_or("–".into(), pct),
            )
        })
        .collect();
    let section = format!(
        "{start}\n![accuracy against the best label attack]({image}.png)\n\n`{cmd}` on {machine}, {date}: \
{train} training examples per fine-tune, {held} held out (also the attacker's public data), one fine-tune with \
fresh secrets per row. Chance (the majority label) {chance}; goal: label attack ≤ {goal}, accuracy ≥ 93%.\n\n\
| defence | setting | held-out accuracy | best label attack (which) | without public data | label-DP bound |\n\
|---|---|---:|---:|---:|---:|\n{rows}{end}",
        cmd = result["command"].as_str().unwrap_or(""),
        machine = result["machine"].as_str().unwrap_or(""),
        date = result["date"].as_str().unwrap_or(""),
        train = result["data"]["train"],
        held = result["data"]["held_out"],
        chance = pct(result["chance"].as_f64().unwrap_or(f64::NAN)),
        goal = pct(result["goal_label_attack"].as_f64().unwrap_or(f64::NAN)),
    );
    report::replace_generated(&paths::root().join("docs").join("privacy.md"), &start, &end, &section)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plot_is_a_png_of_the_frontier() {
        let point = |defence, epsilon: Option<f64>, acc, attack| Point {
            defence,
            setting: String::new(),
            epsilon,
            device_acc: acc,
            label_attack: attack,
            best_attack: "targets_clustered".into(),
            label_attack_without_public_data: attack,
            dp_bound: None,
        };
        let points = [
            point("none", None, 0.93, 0.999),
            point("randomized response", Some(1.0), 0.85, 0.75),
            point("randomized response", Some(4.0), 0.91, 0.97),
            point("decoy tasks", None, 0.92, 0.9),
            point("label head on the device", None, 0.925, 0.53),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("frontier.png");
        plot(&points, 0.509, &path).unwrap();
        let png = std::fs::read(&path).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
        // IHDR: width and height, big-endian, after the 8-byte signature and the chunk's length and type.
        let dims = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
        assert_eq!((dims(16), dims(20)), (900, 600));
        // Drawn, not blank: a white 900×600 image compresses to almost nothing.
        assert!(png.len() > 20_000, "{} bytes", png.len());
    }
}
