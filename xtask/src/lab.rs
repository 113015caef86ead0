//! The research commands are thin wrappers: `cargo xtask audit …` runs `mobillm-lab audit …`, so the chores above
//! never compile the research crate's dependencies.

use std::path::PathBuf;

use anyhow::Result;
use xtask::paths;

/// Builds the `mobillm-lab` binary (release) and returns its path.
fn build() -> Result<PathBuf> {
    eprintln!("building mobillm-lab (release)…");
    paths::run(paths::cargo().args(["build", "--release", "--quiet", "-p", "mobillm-lab"]), "building mobillm-lab")?;
    Ok(paths::bin_dir()?.join("mobillm-lab"))
}

/// Runs `mobillm-lab <command> <args>` with our stdio; its failure is ours.
pub fn run(command: &str, args: &[String]) -> Result<()> {
    let lab = build()?;
    paths::run(std::process::Command::new(lab).arg(command).args(args), &format!("mobillm-lab {command}"))
}

/// Runs `mobillm-lab <command> <args>` and parses the JSON line it prints last (its stderr is ours).
pub fn run_json(command: &str, args: &[&str]) -> Result<serde_json::Value> {
    let lab = build()?;
    let out =
        std::process::Command::new(lab).arg(command).args(args).stderr(std::process::Stdio::inherit()).output()?;
    anyhow::ensure!(out.status.success(), "mobillm-lab {command} failed ({})", out.status);
    let text = String::from_utf8(out.stdout)?;
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).map_err(|e| anyhow::anyhow!("mobillm-lab {command} printed {last:?}: {e}"))
}
