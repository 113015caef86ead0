//! `cargo xtask api-check`: schemathesis (PyPI, pinned) against the release server's `/v1/openapi.json`, as a new
//! user's tooling would see the API: a short, seeded, bounded run of every phase (examples, coverage, fuzzing,
//! and stateful runs that follow the document's links from a created session). Fails on any failed check. The
//! checks' settings and why are in `mobillm-server/schemathesis.toml`.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use xtask::paths::{self, root};
use xtask::{fetch, processes};

const SCHEMATHESIS: &str = "schemathesis==4.32.5";
/// Examples per operation and phase, and the seed: the same requests every run.
const EXAMPLES: &str = "25";
const SEED: &str = "42";
const LIMIT: Duration = Duration::from_secs(600);

/// Installs schemathesis once into the cache (`pip install --target`, no virtualenv needed).
fn install() -> Result<std::path::PathBuf> {
    let dir = fetch::cache_dir()?.join(SCHEMATHESIS.replace("==", "-"));
    if !dir.join("schemathesis").exists() {
        eprintln!("api-check: installing {SCHEMATHESIS} from PyPI into {}", dir.display());
        paths::run(
            Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target"])
                .arg(&dir)
                .arg(SCHEMATHESIS),
            &format!("pip install {SCHEMATHESIS}"),
        )?;
    }
    Ok(dir)
}

pub fn run() -> Result<()> {
    let site = install()?;
    let bin_dir = processes::build_binaries()?;
    let work = tempfile::tempdir()?;
    let key = format!("api-check-{}", std::process::id());
    let log = work.path().join("server.log");
    let server = processes::start_server(&bin_dir, &work.path().join("data"), &key, &log)?;
    eprintln!("api-check: schemathesis against {}/v1/openapi.json", server.url);
    let mut child = Command::new("python3")
        .args(["-m", "schemathesis.cli", "--config-file"])
        .arg(root().join("mobillm-server/schemathesis.toml"))
        .arg("run")
        .arg(format!("{}/v1/openapi.json", server.url))
        .args(["--phases", "examples,coverage,fuzzing,stateful", "--max-examples", EXAMPLES, "--seed", SEED])
        .args(["--workers", "1", "--request-timeout", "30", "--generation-database", "none", "--no-color"])
        .env("PYTHONPATH", &site)
        .env("API_KEY", &key)
        .current_dir(work.path())
        .spawn()
        .context("starting schemathesis")?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            anyhow::bail!("schemathesis ran past {} s", LIMIT.as_secs());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    ensure!(status.success(), "schemathesis found failures ({status}); server log: {}", log.display());
    eprintln!("api-check: passed");
    Ok(())
}
