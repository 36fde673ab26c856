//! Project automation.
//!
//! - `cargo xtask ci`: formatting, lints, every test (nextest when installed, else
//!   `cargo test`, with the tests of real-broker and black-box binaries one at a time),
//!   doc tests, 500 seeds of the deterministic simulation, and the runnable example
//!   (bounded by its `--run-for` flag and a hard time limit): what CI runs.
//! - `cargo xtask bench [--quick]`: steward against the bare clients (in memory,
//!   RabbitMQ, Python peers), built in release, each measured consumer in its own child
//!   process; writes `target/bench/report.json` and `report.md` (see `BENCHMARKS.md`).
//! - `cargo xtask sim [--seeds N] [--from N]`: the deterministic simulation
//!   (`crates/sim`), built in release with tokio's RNG seeded per seed;
//!   `STEWARD_SIM_SEED=<n>` replays one seed with its whole trace.
//! - `cargo xtask fuzz [--runs N] [--target T]`: the structure-aware fuzz targets
//!   (messages, substitution, HTTP, the Service Bus emulator), built in release, each
//!   seeded from its corpus in `tests/corpus/<target>/` (see `docs/reliability.md`).

use std::env;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

mod bench;
mod fuzz;

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("bench") => bench::run(&args[1..]),
        // Hidden: one measured consumer or publisher, run by `bench` in a child process.
        Some("bench-worker") => bench::worker::main(&args[1..]),
        Some("sim") => sim(&args[1..]),
        Some("fuzz") => fuzz::run(&args[1..]),
        Some("help" | "--help" | "-h") | None => {
            println!(
                "usage: cargo xtask <command>\n\ncommands:\n  ci     fmt, clippy, tests, doc tests, 500 simulation seeds, examples\n  bench  benchmarks against the bare clients, in release: [--quick] [--only inmem,rabbitmq,latency,resilience,e2e]\n  sim    deterministic simulation, built in release: [--seeds N] [--from N]; STEWARD_SIM_SEED=<n> replays one seed\n  fuzz   structure-aware fuzzing, built in release: [--runs N] [--target T]"
            );
            Ok(())
        }
        Some(other) => Err(anyhow::anyhow!("unknown command {other:?}; try `cargo xtask help`")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `cargo <args>`, printing the command and how long it took.
fn cargo(args: &[&str]) -> Result<()> {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    println!("\n==> cargo {}", args.join(" "));
    let started = Instant::now();
    let status = Command::new(&cargo)
        .args(args)
        .status()
        .with_context(|| format!("could not run {cargo}"))?;
    println!("<== cargo {} ({:.0?}, {status})", args[0], started.elapsed());
    if !status.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    Ok(())
}

/// Runs an example to completion, killing it if it outlives `limit`.
fn example(package: &str, name: &str, args: &[&str], limit: Duration) -> Result<()> {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    println!("\n==> cargo run -p {package} --example {name} -- {}", args.join(" "));
    let started = Instant::now();
    let mut child = Command::new(&cargo)
        .args(["run", "--quiet", "-p", package, "--example", name, "--"])
        .args(args)
        .spawn()
        .with_context(|| format!("could not run {cargo}"))?;
    loop {
        if let Some(status) = child.try_wait()? {
            println!("<== example {name} ({:.0?}, {status})", started.elapsed());
            if !status.success() {
                bail!("example {name} failed: {status}");
            }
            return Ok(());
        }
        if started.elapsed() > limit {
            child.kill()?;
            bail!("example {name} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The service's transport features: without one the build stops with a clear
/// message; each alone builds; a transport left out is a configuration error naming its
/// feature.
fn feature_builds() -> Result<()> {
    let cargo_bin = env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    println!("\n==> cargo build -p steward-api --no-default-features (must fail)");
    let output = Command::new(&cargo_bin)
        .args(["build", "--quiet", "-p", "steward-api", "--no-default-features"])
        .output()
        .context("could not run cargo")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.success() || !stderr.contains("steward-api needs a message transport") {
        bail!(
            "a build without transports must stop with the compile_error! message; got:\n{stderr}"
        );
    }
    println!("<== refused as expected");
    for feature in ["inmem", "nats", "rabbitmq", "servicebus"] {
        cargo(&[
            "clippy",
            "--quiet",
            "-p",
            "steward-api",
            "--no-default-features",
            "--features",
            feature,
            "--",
            "-D",
            "warnings",
        ])?;
    }
    cargo(&[
        "build",
        "--quiet",
        "-p",
        "steward-api",
        "--no-default-features",
        "--features",
        "servicebus",
    ])?;
    // The last build is servicebus-only: asking it for inmem is a configuration error.
    let binary = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask lives inside the workspace")?
        .join("target/debug/steward-api");
    let output = Command::new(&binary)
        .env("STEWARD_TRANSPORT", "inmem")
        .output()
        .with_context(|| format!("could not run {}", binary.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.code() != Some(2)
        || stderr.lines().count() != 1
        || !stderr.contains("--features inmem")
    {
        bail!(
            "a transport not compiled in must exit 2 with one line naming its feature; got {:?}: {stderr}",
            output.status
        );
    }
    println!("<== transport not compiled in: {}", stderr.trim());
    Ok(())
}

fn has_nextest() -> bool {
    Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|out| out.status.success())
}

/// How many simulation seeds CI runs (`cargo xtask sim --seeds 500`), after the tests.
const CI_SIM_SEEDS: &str = "500";

/// Whether a test binary shares machine-wide services or ports with others, so its tests
/// run one at a time: the RabbitMQ and NATS crates' tests and every black-box test, as
/// the nextest `serial` group in `.config/nextest.toml` has them.
fn is_serial(package: &str, test: &str) -> bool {
    matches!(package, "steward-rabbitmq" | "steward-nats") || test.starts_with("blackbox")
}

/// Every test without nextest: builds the test binaries of the workspace once, then runs
/// each from its package's directory, as `cargo test` does; the tests of a
/// [serial](is_serial) binary one at a time, all others in parallel.
fn cargo_test() -> Result<()> {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let args = ["test", "--workspace", "--all-features", "--lib", "--bins", "--tests"];
    println!("\n==> cargo {} --no-run", args.join(" "));
    let output = Command::new(&cargo)
        .args(args)
        .args(["--no-run", "--message-format", "json-render-diagnostics"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("could not run {cargo}"))?;
    if !output.status.success() {
        bail!("building the tests failed");
    }
    let mut failed = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let Some(executable) = message["executable"].as_str() else { continue };
        if message["reason"] != "compiler-artifact" || message["profile"]["test"] != true {
            continue;
        }
        // `path+file:///…/crates/api#steward-api@0.1.0`, or `…/xtask#0.1.0` when the
        // package is named like its directory.
        let id = message["package_id"].as_str().unwrap_or_default();
        let (path, fragment) = id.rsplit_once('#').unwrap_or((id, ""));
        let package = match fragment.split_once('@') {
            Some((name, _)) => name,
            None => path.rsplit('/').next().unwrap_or(path),
        };
        let target = message["target"]["name"].as_str().unwrap_or_default();
        let is_test_binary =
            message["target"]["kind"].as_array().is_some_and(|kind| kind.contains(&"test".into()));
        let manifest = std::path::Path::new(message["manifest_path"].as_str().unwrap_or_default());
        let dir = manifest.parent().context("a package without a directory")?;
        let serial = is_test_binary && is_serial(package, target);
        let threads: &[&str] = if serial { &["--test-threads=1"] } else { &[] };
        println!("\n==> {package} {target}{}", if serial { " (one test at a time)" } else { "" });
        let status = Command::new(executable)
            .args(threads)
            .current_dir(dir)
            .env("CARGO_MANIFEST_DIR", dir)
            .status()
            .with_context(|| format!("could not run {executable}"))?;
        if !status.success() {
            failed.push(format!("{package} {target}"));
        }
    }
    if !failed.is_empty() {
        bail!("tests failed in: {}", failed.join(", "));
    }
    Ok(())
}

/// Checks the formatting of the service's transport files. Their `mod` lines are
/// generated by the api crate's build script, so `cargo fmt` does not reach them.
fn fmt_transport_files() -> Result<()> {
    let folder = std::path::Path::new("crates/api/src/service/transport");
    let mut files: Vec<_> = std::fs::read_dir(folder)
        .with_context(|| format!("could not read {}", folder.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "rs"))
        .filter(|path| path.file_stem().is_some_and(|stem| stem != "mod"))
        .collect();
    files.sort();
    println!("\n==> rustfmt --check {} transport files", files.len());
    let status = Command::new("rustfmt")
        .args(["--check", "--edition", "2024"])
        .args(&files)
        .status()
        .context("could not run rustfmt")?;
    if !status.success() {
        bail!(
            "the transport files are not formatted: run `rustfmt --edition 2024 crates/api/src/service/transport/*.rs`"
        );
    }
    Ok(())
}

fn ci() -> Result<()> {
    let started = Instant::now();
    cargo(&["fmt", "--all", "--check"])?;
    fmt_transport_files()?;
    cargo(&["clippy", "--workspace", "--all-targets", "--all-features", "--", "-D", "warnings"])?;
    if has_nextest() {
        let profile = if env::var_os("CI").is_some() { "ci" } else { "default" };
        cargo(&[
            "nextest",
            "run",
            "--workspace",
            "--all-features",
            "--profile",
            profile,
            "--no-tests=warn",
        ])?;
    } else {
        println!("cargo-nextest is not installed; falling back to cargo test");
        cargo_test()?;
    }
    cargo(&["test", "--workspace", "--all-features", "--doc"])?;
    sim(&["--seeds".to_owned(), CI_SIM_SEEDS.to_owned()])?;
    example("steward-core", "supervised", &["--run-for", "6"], Duration::from_secs(300))?;
    feature_builds()?;
    println!("\nci passed in {:.0?}", started.elapsed());
    Ok(())
}

/// Builds the simulation in release and runs it with `args`.
///
/// It is built with `--cfg tokio_unstable`, which lets each seed also seed tokio's own
/// RNG (the order `select!` polls its branches in), into its own target directory so the
/// flag does not invalidate the workspace's other builds.
fn sim(args: &[String]) -> Result<()> {
    let cargo_bin = env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask lives inside the workspace")?;
    let target = root.join("target").join("sim");
    let rustflags = match env::var("RUSTFLAGS") {
        Ok(flags) if !flags.trim().is_empty() => format!("{flags} --cfg tokio_unstable"),
        _ => "--cfg tokio_unstable".to_owned(),
    };
    println!("==> cargo build --release -p steward-sim (RUSTFLAGS={rustflags:?})");
    let started = Instant::now();
    let status = Command::new(&cargo_bin)
        .args(["build", "--quiet", "--release", "-p", "steward-sim"])
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("RUSTFLAGS", &rustflags)
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .with_context(|| format!("could not run {cargo_bin}"))?;
    if !status.success() {
        bail!("building the simulation failed: {status}");
    }
    println!("<== built in {:.0?}", started.elapsed());
    let binary = target.join("release").join("steward-sim");
    let status = Command::new(&binary)
        .args(args)
        .status()
        .with_context(|| format!("could not run {}", binary.display()))?;
    if !status.success() {
        bail!("the simulation failed ({status}); each failing seed is printed above");
    }
    Ok(())
}
