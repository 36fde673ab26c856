//! Project automation.
//!
//! - `cargo xtask ci`: formatting, lints, every test (nextest when installed, else
//!   `cargo test`), doc tests, 500 seeds of the deterministic simulation, and the
//!   runnable example (bounded by its `--run-for` flag and a hard time limit): what CI
//!   runs.
//! - `cargo xtask bench`: the benchmarks, built in release. Each reports a value and a
//!   baseline measured in the same process run, and their ratio, so results compare
//!   across noisy machines. Writes `target/bench/report.json` and `report.md`.
//! - `cargo xtask sim [--seeds N] [--from N]`: the deterministic simulation
//!   (`crates/sim`), built in release with tokio's RNG seeded per seed;
//!   `STEWARD_SIM_SEED=<n>` replays one seed with its whole trace.

use std::env;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("bench") => bench(),
        Some("sim") => sim(&args[1..]),
        Some("help" | "--help" | "-h") | None => {
            println!(
                "usage: cargo xtask <command>\n\ncommands:\n  ci     fmt, clippy, tests, doc tests, 500 simulation seeds, examples\n  sim    deterministic simulation, built in release: [--seeds N] [--from N]; STEWARD_SIM_SEED=<n> replays one seed"
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
    for feature in ["inmem", "rabbitmq", "servicebus"] {
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

fn ci() -> Result<()> {
    let started = Instant::now();
    cargo(&["fmt", "--all", "--check"])?;
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
        cargo(&["test", "--workspace", "--all-features", "--lib", "--bins", "--tests"])?;
    }
    cargo(&["test", "--workspace", "--all-features", "--doc"])?;
    sim(&["--seeds".to_owned(), CI_SIM_SEEDS.to_owned()])?;
    example("steward-core", "supervised", &["--run-for", "6"], Duration::from_secs(300))?;
    feature_builds()?;
    println!("\nci passed in {:.0?}", started.elapsed());
    Ok(())
}

/// The benchmark targets: (package, bench name).
const BENCHES: &[(&str, &str)] = &[("steward-core", "updater")];

fn bench() -> Result<()> {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut results = Vec::new();
    for (package, name) in BENCHES {
        println!("==> cargo bench -p {package} --bench {name}");
        let output = Command::new(&cargo)
            .args(["bench", "--quiet", "-p", package, "--bench", name])
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("could not run {cargo}"))?;
        if !output.status.success() {
            bail!("benchmark {package}/{name} failed: {}", output.status);
        }
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            match serde_json::from_str::<serde_json::Value>(line) {
                Ok(value) if value.get("ratio").is_some() => {
                    println!("{line}");
                    results.push(value);
                }
                _ => println!("{line}"),
            }
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask lives inside the workspace")?;
    let dir = root.join("target").join("bench");
    std::fs::create_dir_all(&dir)?;
    let json = serde_json::to_string_pretty(&serde_json::json!({ "results": results }))?;
    std::fs::write(dir.join("report.json"), json)?;
    let mut table = String::from("| benchmark | value | baseline | ratio |\n|---|---|---|---|\n");
    for r in &results {
        let unit = r["unit"].as_str().unwrap_or("");
        table.push_str(&format!(
            "| {} | {} {unit} | {} {unit} | {} |\n",
            r["name"].as_str().unwrap_or("?"),
            r["value"],
            r["baseline"],
            r["ratio"]
        ));
    }
    std::fs::write(dir.join("report.md"), &table)?;
    println!("\n{table}\nwritten to {}", dir.display());
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
