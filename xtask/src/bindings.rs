//! The Swift and Kotlin SDK: library-mode UniFFI generation (`cargo xtask bindings [--check]`), the Kotlin tests
//! on a real JVM (`cargo xtask kotlin-test`), the Swift static checks (`cargo xtask swift-check`), and the mobile
//! builds for machines with the NDK or Xcode (`cargo xtask android`, `cargo xtask ios`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use camino::Utf8PathBuf;

use xtask::paths::{cargo, root, run, walk};
use xtask::{fetch, processes};

/// Builds `mobillm-ffi` (release) for this machine and returns the path of its shared library.
pub fn build_ffi() -> Result<PathBuf> {
    eprintln!("bindings: building mobillm-ffi (release)…");
    run(cargo().args(["build", "--release", "--quiet", "-p", "mobillm-ffi"]), "cargo build -p mobillm-ffi")?;
    let dir = xtask::paths::bin_dir()?;
    let name = if cfg!(target_os = "macos") { "libmobillm_ffi.dylib" } else { "libmobillm_ffi.so" };
    let lib = dir.join(name);
    ensure!(lib.exists(), "{} was not built", lib.display());
    Ok(lib)
}

/// Where generated files go under a bindings root.
struct Layout {
    kotlin: PathBuf,
    swift_sources: PathBuf,
    swift_ffi: PathBuf,
}

impl Layout {
    fn under(root: &Path) -> Self {
        Self {
            kotlin: root.join("kotlin/src/main/kotlin"),
            swift_sources: root.join("swift/Sources/MobiLLM"),
            swift_ffi: root.join("swift/Sources/MobiLLMFFI/include"),
        }
    }
}

fn utf8(p: &Path) -> Result<Utf8PathBuf> {
    Utf8PathBuf::from_path_buf(p.to_path_buf()).map_err(|p| anyhow::anyhow!("{} is not UTF-8", p.display()))
}

/// Generates the Kotlin package and the Swift module (sources, C header, modulemap) from the built library.
fn generate(lib: &Path, out_root: &Path) -> Result<()> {
    let layout = Layout::under(out_root);
    for dir in [&layout.kotlin, &layout.swift_sources, &layout.swift_ffi] {
        std::fs::create_dir_all(dir)?;
    }
    uniffi::generate(uniffi::GenerateOptions {
        languages: vec![uniffi::TargetLanguage::Kotlin],
        out_dir: utf8(&layout.kotlin)?,
        source: utf8(lib)?,
        config_override: None,
        crate_filter: Some("mobillm_ffi".into()),
        metadata_no_deps: false,
        // Formatting would need ktlint/swiftformat; the output is deterministic without them.
        format: false,
    })?;
    let swift = |sources: bool, headers: bool, modulemap: bool, out: &Path| -> Result<()> {
        uniffi::generate_swift_bindings(uniffi::SwiftBindingsOptions {
            generate_swift_sources: sources,
            generate_headers: headers,
            generate_modulemap: modulemap,
            source: utf8(lib)?,
            out_dir: utf8(out)?,
            xcframework: false,
            module_name: Some("MobiLLMFFI".into()),
            modulemap_filename: Some("module.modulemap".into()),
            metadata_no_deps: false,
            link_frameworks: vec![],
            config: None,
        })
    };
    swift(true, false, false, &layout.swift_sources)?;
    swift(false, true, true, &layout.swift_ffi)?;
    Ok(())
}

/// Every generated file under `root`, relative, sorted.
fn generated_files(root: &Path) -> Result<Vec<PathBuf>> {
    let layout = Layout::under(root);
    let mut out = Vec::new();
    for dir in [&layout.kotlin, &layout.swift_sources, &layout.swift_ffi] {
        if !dir.exists() {
            continue;
        }
        for entry in walk(dir)? {
            out.push(entry.strip_prefix(root)?.to_path_buf());
        }
    }
    out.sort();
    Ok(out)
}

/// `cargo xtask bindings`: regenerates `bindings/`; with `check`, generates into a temporary directory and fails
/// if the committed copy differs.
pub fn bindings(check: bool) -> Result<()> {
    let lib = build_ffi()?;
    let committed = root().join("bindings");
    if !check {
        for dir in [Layout::under(&committed).kotlin, Layout::under(&committed).swift_sources] {
            let _ = std::fs::remove_dir_all(&dir);
        }
        generate(&lib, &committed)?;
        eprintln!("bindings: written to {}", committed.display());
        return Ok(());
    }
    let fresh = tempfile::tempdir()?;
    generate(&lib, fresh.path())?;
    let (want, have) = (generated_files(fresh.path())?, generated_files(&committed)?);
    ensure!(want == have, "bindings/ lists {have:?}, generation gives {want:?}: run `cargo xtask bindings`");
    for rel in &want {
        let (a, b) = (std::fs::read(fresh.path().join(rel))?, std::fs::read(committed.join(rel))?);
        ensure!(a == b, "bindings/{} is stale: run `cargo xtask bindings` and commit", rel.display());
    }
    eprintln!("bindings: the committed bindings equal freshly generated ones ({} files)", want.len());
    Ok(())
}

/// kotlinc from npm `kotlin-compiler` (pinned in package.json, integrity-checked by package-lock.json).
fn kotlin_home() -> Result<PathBuf> {
    let home = root().join("node_modules/kotlin-compiler");
    if !home.join("bin/kotlinc").exists() {
        eprintln!("kotlin-test: installing kotlinc (npm ci)…");
        run(
            Command::new("npm").args(["ci", "--ignore-scripts", "--no-audit", "--no-fund"]).current_dir(root()),
            "npm ci",
        )?;
    }
    ensure!(home.join("bin/kotlinc").exists(), "npm ci did not install kotlin-compiler");
    Ok(home)
}

const JNA: &str = "/usr/share/java/jna.jar";

/// `cargo xtask kotlin-test`: compiles the freshly generated Kotlin and the tests in `bindings/kotlin/src/test`
/// with kotlinc, and runs them on the JVM against the real library, a tiny generated model and a real server.
pub fn kotlin_test() -> Result<()> {
    ensure_test_packages()?;
    let kotlin = kotlin_home()?;
    let lib = build_ffi()?;
    let bin_dir = processes::build_binaries()?;
    let work = tempfile::tempdir()?;
    generate(&lib, work.path())?;

    let (model, other) = (work.path().join("tiny.gguf"), work.path().join("other.gguf"));
    for (seed, path) in [("21", &model), ("22", &other)] {
        run(
            cargo()
                .args(["run", "--release", "--quiet", "-p", "mobillm-core", "--features", "testkit"])
                .args(["--example", "tiny_model", "--", seed])
                .arg(path),
            "writing a tiny test model",
        )?;
    }
    let key = format!("kotlin-{}", std::process::id());
    let log = work.path().join("server.log");
    let server = processes::start_server(&bin_dir, &work.path().join("data"), &key, &log)?;
    let url = &server.url;

    let libs = kotlin.join("lib");
    let classpath = |extra: &[PathBuf]| -> String {
        let mut parts: Vec<String> = vec![JNA.into()];
        parts.extend(
            ["kotlinx-coroutines-core-jvm.jar", "kotlin-test.jar"].iter().map(|j| libs.join(j).display().to_string()),
        );
        parts.extend(extra.iter().map(|p| p.display().to_string()));
        parts.join(":")
    };
    let mut sources = walk(&Layout::under(work.path()).kotlin)?;
    sources.extend(walk(&root().join("bindings/kotlin/src/test/kotlin"))?);
    let jar = work.path().join("tests.jar");
    eprintln!("kotlin-test: compiling {} Kotlin files…", sources.len());
    run(
        Command::new(kotlin.join("bin/kotlinc"))
            .args(["-nowarn", "-cp", &classpath(&[])])
            .args(&sources)
            .arg("-d")
            .arg(&jar),
        "kotlinc",
    )?;
    let tmp = work.path().join("tmp");
    std::fs::create_dir_all(&tmp)?;
    eprintln!("kotlin-test: running against {url}");
    let out = Command::new("java")
        .arg(format!("-Djna.library.path={}", lib.parent().context("library dir")?.display()))
        .args(["-cp", &classpath(&[jar, libs.join("kotlin-stdlib.jar")]), "dev.mobillm.MobiLlmTestKt"])
        .env("MOBILLM_TEST_MODEL", &model)
        .env("MOBILLM_TEST_OTHER_MODEL", &other)
        .env("MOBILLM_TEST_SERVER", url)
        .env("MOBILLM_TEST_KEY", &key)
        .env("MOBILLM_TEST_ADMIN_URL", &server.admin_url)
        .env("MOBILLM_TEST_ADMIN_TOKEN", &server.admin_token)
        .env("MOBILLM_TEST_TMP", &tmp)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    let summary =
        stdout.lines().rev().find(|l| l.ends_with(" failed")).context("the Kotlin runner printed no summary")?;
    let counts: Vec<usize> = summary.split(|c: char| !c.is_ascii_digit()).filter_map(|s| s.parse().ok()).collect();
    ensure!(out.status.success() && counts.get(1) == Some(&0), "Kotlin tests failed: {summary}");
    ensure!(counts.first().is_some_and(|&n| n >= 10), "only {summary}: at least 10 Kotlin tests must run");
    Ok(())
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// Debian packages the tests need: a JVM and JNA (Kotlin tests), a font (the frontier plot), PostgreSQL and nginx
/// (the cluster store's tests and `cargo xtask cluster`).
const TEST_PACKAGES: [&str; 5] = ["default-jdk-headless", "libjna-java", "fonts-dejavu-core", "postgresql", "nginx"];
const PLOT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn test_packages_installed() -> bool {
    on_path("java")
        && Path::new(JNA).exists()
        && Path::new(PLOT_FONT).exists()
        && xtask::services::postgres_installed()
        && Path::new("/usr/sbin/nginx").exists()
}

/// Makes sure the [`TEST_PACKAGES`] are installed: as root it installs them through apt-get (as `.ci/run` does);
/// otherwise it names the one command to run.
pub fn ensure_test_packages() -> Result<()> {
    if test_packages_installed() {
        return Ok(());
    }
    ensure!(
        xtask::services::is_root() && on_path("apt-get"),
        "the tests need a JVM, JNA, a font, PostgreSQL and nginx; install them with: sudo apt-get install -y {}",
        TEST_PACKAGES.join(" ")
    );
    eprintln!("test: installing {} (apt-get)…", TEST_PACKAGES.join(" "));
    run(Command::new("apt-get").args(["update", "-q"]), "apt-get update")?;
    run(Command::new("apt-get").args(["install", "-y", "-q"]).args(TEST_PACKAGES), "apt-get install")?;
    ensure!(test_packages_installed(), "apt-get did not install java, {JNA}, {PLOT_FONT}, PostgreSQL and nginx");
    Ok(())
}

/// `cargo xtask swift-check`: no Swift toolchain exists here, so the Swift side gets static checks: the generated
/// Swift, the XCTest tests and the example app parse (tree-sitter-swift); the C header compiles; every C function
/// the header declares and the Swift calls is exported by the library.
pub fn swift_check() -> Result<()> {
    let lib = build_ffi()?;
    let swift_root = root().join("bindings/swift");
    let header = swift_root.join("Sources/MobiLLMFFI/include/mobillm_ffiFFI.h");
    ensure!(header.exists(), "{} is missing: run `cargo xtask bindings`", header.display());

    // 1. Syntax, with pinned tree-sitter wheels installed into the cache.
    let deps = fetch::cache_dir()?.join("python/swift-check");
    if !deps.join("tree_sitter_swift").exists() {
        eprintln!("swift-check: installing tree-sitter-swift (pip, hash-checked)…");
        run(
            Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--require-hashes", "--only-binary=:all:", "--target"])
                .arg(&deps)
                .arg("-r")
                .arg(root().join("xtask/swift/requirements.txt")),
            "pip install tree-sitter-swift",
        )?;
    }
    let mut swift_files = walk(&swift_root.join("Sources"))?;
    swift_files.extend(walk(&swift_root.join("Tests"))?);
    swift_files.extend(walk(&root().join("examples-ios"))?);
    swift_files.retain(|p| p.extension().is_some_and(|e| e == "swift"));
    swift_files.push(swift_root.join("Package.swift"));
    run(
        Command::new("python3")
            .arg(root().join("xtask/swift/syntax_check.py"))
            .args(&swift_files)
            .env("PYTHONPATH", &deps),
        "Swift syntax check",
    )?;

    // 2. The header compiles as C, included from a translation unit as Swift's clang importer would. Its
    //    nullability qualifiers are clang extensions: for gcc (the C compiler here) they are defined away.
    let unit = tempfile::Builder::new().suffix(".c").tempfile()?;
    std::fs::write(unit.path(), "#include \"mobillm_ffiFFI.h\"\nint main(void) { return 0; }\n")?;
    run(
        Command::new("cc")
            .args(["-fsyntax-only", "-std=c11", "-Wall", "-Wextra", "-Werror"])
            .args(["-D_Nonnull=", "-D_Nullable=", "-D_Null_unspecified="])
            .arg("-I")
            .arg(header.parent().context("header dir")?)
            .arg(unit.path()),
        "cc header",
    )?;
    eprintln!("swift-check: the C header compiles");

    // 3. Symbols: declared in the header, used by the Swift, exported by the library.
    let declared = ffi_symbols(&std::fs::read_to_string(&header)?);
    let mut used = std::collections::BTreeSet::new();
    for f in walk(&swift_root.join("Sources/MobiLLM"))? {
        used.extend(ffi_symbols(&std::fs::read_to_string(f)?));
    }
    let nm = Command::new("nm").args(["-D", "--defined-only"]).arg(&lib).output().context("running nm")?;
    ensure!(nm.status.success(), "nm failed");
    let exported: std::collections::BTreeSet<String> = String::from_utf8_lossy(&nm.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .map(String::from)
        .collect();
    let missing: Vec<_> = declared.iter().filter(|s| !exported.contains(*s)).collect();
    ensure!(missing.is_empty(), "declared in the header but not exported: {missing:?}");
    let undeclared: Vec<_> = used.iter().filter(|s| !declared.contains(*s)).collect();
    ensure!(undeclared.is_empty(), "called from Swift but not in the header: {undeclared:?}");
    ensure!(declared.len() > 20 && !used.is_empty(), "suspiciously few FFI symbols ({})", declared.len());
    eprintln!(
        "swift-check: {} Swift files parse; {} header functions all exported; {} used by the Swift all declared",
        swift_files.len(),
        declared.len(),
        used.len()
    );
    Ok(())
}

/// Names of our UniFFI C functions mentioned in `text`.
fn ffi_symbols(text: &str) -> std::collections::BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("uniffi_mobillm_ffi_") || w.starts_with("ffi_mobillm_ffi_"))
        .map(String::from)
        .collect()
}

/// `cargo xtask android`: the shared library per Android ABI into `examples-android/app/src/main/jniLibs`, with
/// cargo-ndk (needs the Android NDK: `ANDROID_NDK_HOME`).
pub fn android() -> Result<()> {
    let ndk = std::env::var_os("ANDROID_NDK_HOME").or_else(|| std::env::var_os("ANDROID_NDK_ROOT"));
    if ndk.is_none() {
        bail!(
            "the Android NDK is needed: install it (Android Studio → SDK Manager → NDK), set ANDROID_NDK_HOME, \
             `cargo install cargo-ndk` and `rustup target add aarch64-linux-android armv7-linux-androideabi \
             x86_64-linux-android`; then run this again"
        );
    }
    let out = root().join("examples-android/app/src/main/jniLibs");
    run(
        cargo().args(["ndk", "-t", "arm64-v8a", "-t", "armeabi-v7a", "-t", "x86_64", "-o"]).arg(&out).args([
            "build",
            "--release",
            "-p",
            "mobillm-ffi",
        ]),
        "cargo ndk (is cargo-ndk installed? `cargo install cargo-ndk`)",
    )?;
    eprintln!("android: libraries in {}", out.display());
    Ok(())
}

/// `cargo xtask ios`: static libraries for device and simulator, packed with the generated header into
/// `bindings/swift/MobiLLMFFI.xcframework` (needs macOS with Xcode).
pub fn ios() -> Result<()> {
    if !cfg!(target_os = "macos") {
        bail!("building for iOS needs macOS with Xcode (xcodebuild and the iOS SDKs); this machine is not a Mac");
    }
    let targets = ["aarch64-apple-ios", "aarch64-apple-ios-sim"];
    run(Command::new("rustup").arg("target").arg("add").args(targets), "rustup target add")?;
    for t in targets {
        run(
            cargo().args(["build", "--release", "-p", "mobillm-ffi", "--target", t]),
            &format!("cargo build --target {t}"),
        )?;
    }
    let target_dir = root().join("target");
    let out = root().join("bindings/swift/MobiLLMFFI.xcframework");
    let _ = std::fs::remove_dir_all(&out);
    let headers = root().join("bindings/swift/Sources/MobiLLMFFI/include");
    let mut cmd = Command::new("xcodebuild");
    cmd.arg("-create-xcframework");
    for t in targets {
        cmd.arg("-library").arg(target_dir.join(t).join("release/libmobillm_ffi.a")).arg("-headers").arg(&headers);
    }
    run(cmd.arg("-output").arg(&out), "xcodebuild -create-xcframework")?;
    eprintln!("ios: {}", out.display());
    Ok(())
}
