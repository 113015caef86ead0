//! The audit's report: results by name, docs/privacy-audit.json and the generated section of docs/privacy.md.

use anyhow::Result;
use serde_json::{json, Value};
use xtask::{paths, report};

use super::CONDITIONS;

/// The most successful of several attacks.
pub fn best(values: &[(&str, f64)]) -> f64 {
    values.iter().map(|(_, v)| *v).fold(0.0, f64::max)
}

/// Attack results as a JSON object by name.
pub fn named(values: &[(&str, f64)]) -> Value {
    Value::Object(values.iter().map(|(k, v)| (k.to_string(), json!(v))).collect())
}

const START: &str = "<!-- cargo xtask audit: start -->";
const END: &str = "<!-- cargo xtask audit: end -->";

/// Writes docs/privacy-audit.json and the generated results section of docs/privacy.md.
pub fn write_docs(r: &Value) -> Result<()> {
    let docs = paths::root().join("docs");
    std::fs::write(docs.join("privacy-audit.json"), serde_json::to_string_pretty(r)? + "\n")?;
    let pct = |v: Option<&Value>| v.and_then(Value::as_f64).map_or("–".to_string(), |x| format!("{:.1}%", x * 100.0));
    let on = &r["secrets_on"];
    let chance = r["chance"].as_f64().unwrap_or(0.5);
    let conditions = CONDITIONS.map(|(key, _)| key);
    let mut rows = String::new();
    let mut row = |what: &str, pointer: &str, goal: &str| {
        let cells: Vec<String> = conditions.iter().map(|c| pct(r[*c].pointer(pointer))).collect();
        rows.push_str(&format!("| {what} | {} | {goal} |\n", cells.join(" | ")));
    };
    let keys = |pointer: &str| -> Vec<String> {
        on.pointer(pointer).and_then(Value::as_object).map_or(Vec::new(), |m| m.keys().cloned().collect())
    };
    let label_goal = format!("≤ {:.1}%", (chance + 0.05) * 100.0);
    row("**label attack** (best)", "/label_attack_acc", &label_goal);
    for key in keys("/details/labels/attacks") {
        row(&format!("· {}", key.replace('_', " ")), &format!("/details/labels/attacks/{key}"), "");
    }
    row(
        "· target clusters named by the aligned probe (no labels used)",
        "/details/labels/target_clusters_named_by_aligned_probe",
        "",
    );
    row("**re-identification** among 100 (best)", "/reidentification", "≤ 5% (chance 1%)");
    for key in keys("/details/reidentification/attacks") {
        row(&format!("· {}", key.replace('_', " ")), &format!("/details/reidentification/attacks/{key}"), "");
    }
    let mut anchors = keys("/details/reidentification/known_plaintext_anchors");
    anchors.sort_by_key(|a| a.parse::<usize>().unwrap_or(0));
    for key in anchors {
        row(
            &format!("· known plaintext, {key} anchor(s)"),
            &format!("/details/reidentification/known_plaintext_anchors/{key}"),
            "",
        );
    }
    row("**token recovery** (best)", "/text_recovery", "≤ 5%");
    for key in keys("/details/text/attacks") {
        row(&format!("· {}", key.replace('_', " ")), &format!("/details/text/attacks/{key}"), "");
    }
    row("**stolen adapter** alone, best offset per label", "/stolen_adapter_acc", &label_goal);
    row("· stolen adapter + public backbone logits, best offset", "/stolen_adapter_with_backbone_acc", "");
    row("· public backbone alone, best offset (calibrated zero-shot)", "/details/model/zero_shot", "");
    row("· stolen adapter alone, as it is", "/details/model/uncalibrated/adapter_alone", "");
    row(
        "· stolen adapter + public backbone logits, as they are",
        "/details/model/uncalibrated/with_public_backbone",
        "",
    );
    row("· public backbone alone (zero-shot)", "/details/model/uncalibrated/zero_shot", "");
    row("the device's own fine-tuned accuracy", "/details/device_finetuned_acc", "");
    let section = format!(
        "{START}\n## Measured\n\n`{cmd}` on {machine}, {date}: {train} training sentences fine-tuned through the real \
server, {public} public look-alike sentences for the attacker, {attacked} stored samples attacked for texts. \
Chance (the majority label) {chance}; token-recovery chance {text_chance}.\n\n\
| attack | {titles} | goal (default) |\n\
|---|{align}---|\n{rows}{END}",
        titles = CONDITIONS.map(|(_, title)| title).join(" | "),
        align = "---:|".repeat(CONDITIONS.len()),
        cmd = r["command"].as_str().unwrap_or(""),
        machine = r["machine"].as_str().unwrap_or(""),
        date = r["date"].as_str().unwrap_or(""),
        train = r["data"]["train"],
        public = r["data"]["public"],
        attacked = r["data"]["attacked"],
        chance = pct(r.get("chance")),
        text_chance = on["details"]["text"]["chance"].as_f64().map_or("–".into(), |x| format!("{:.3}%", x * 100.0)),
    );
    report::replace_generated(&docs.join("privacy.md"), START, END, &section)
}
