//! `cargo xtask fuzz [--runs N] [--target T]...`: the structure-aware fuzz targets,
//! built in release and run with `STEWARD_FUZZ_RUNS=N`, one target at a time, with a
//! table of the counts each reports.
//!
//! The targets are ordinary tests (`crates/api/tests/fuzz.rs`,
//! `crates/servicebus/tests/fuzz_emulator.rs`) that replay their corpus in
//! `tests/corpus/<target>/` and then run generated cases; `cargo test` runs them with a
//! few cases. A failing case is saved to the corpus as `regression-<hash>`.

use std::env;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// One fuzz target: its name (and corpus directory), the package, features and test
/// binary that hold it, and the test function.
struct Target {
    name: &'static str,
    package: &'static str,
    features: &'static [&'static str],
    test: &'static str,
    function: &'static str,
}

const TARGETS: &[Target] = &[
    Target {
        name: "deployment-status",
        package: "steward-api",
        features: &[],
        test: "fuzz",
        function: "fuzz_deployment_status",
    },
    Target {
        name: "step-result",
        package: "steward-api",
        features: &[],
        test: "fuzz",
        function: "fuzz_step_result",
    },
    Target {
        name: "resource-request",
        package: "steward-api",
        features: &[],
        test: "fuzz",
        function: "fuzz_resource_request",
    },
    Target {
        name: "substitution",
        package: "steward-api",
        features: &[],
        test: "fuzz",
        function: "fuzz_substitution",
    },
    Target {
        name: "http",
        package: "steward-api",
        features: &[],
        test: "fuzz",
        function: "fuzz_http",
    },
    Target {
        name: "servicebus-emulator",
        package: "steward-servicebus",
        features: &["emulator"],
        test: "fuzz_emulator",
        function: "fuzz_emulator",
    },
];

/// The runs when `--runs` is not given.
const DEFAULT_RUNS: u64 = 10_000;

/// What one target reported.
struct Report {
    target: &'static str,
    summary: Option<String>,
    elapsed: Duration,
    passed: bool,
}

/// Entry point of `cargo xtask fuzz`.
pub(crate) fn run(args: &[String]) -> Result<()> {
    let mut runs = DEFAULT_RUNS;
    let mut chosen: Vec<&'static Target> = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => {
                runs = args
                    .next()
                    .context("--runs needs a number")?
                    .parse()
                    .context("--runs needs a whole number")?;
            }
            "--target" => {
                let name = args.next().context("--target needs a name")?;
                for name in name.split(',') {
                    let target = TARGETS.iter().find(|t| t.name == name).with_context(|| {
                        format!("no fuzz target {name:?}; the targets are {}", names())
                    })?;
                    chosen.push(target);
                }
            }
            other => bail!(
                "unknown argument {other:?}; usage: cargo xtask fuzz [--runs N] [--target T]... (targets: {})",
                names()
            ),
        }
    }
    if chosen.is_empty() {
        chosen = TARGETS.iter().collect();
    }

    let mut reports = Vec::new();
    for target in chosen {
        reports.push(run_target(target, runs)?);
    }

    println!("\nfuzz summary ({runs} generated cases per target, in release):");
    println!("| target | result | counts | time |");
    println!("|---|---|---|---|");
    for report in &reports {
        println!(
            "| {} | {} | {} | {:.0?} |",
            report.target,
            if report.passed { "pass" } else { "FAIL" },
            report.summary.as_deref().unwrap_or("-"),
            report.elapsed,
        );
    }
    let failed: Vec<&str> = reports.iter().filter(|r| !r.passed).map(|r| r.target).collect();
    if !failed.is_empty() {
        bail!(
            "fuzz targets failed: {}; each failing input was saved under tests/corpus/<target>/",
            failed.join(", ")
        );
    }
    Ok(())
}

fn names() -> String {
    TARGETS.iter().map(|t| t.name).collect::<Vec<_>>().join(", ")
}

/// Builds and runs one target's test in release, echoing its output and keeping its
/// `FUZZ …` summary line.
fn run_target(target: &'static Target, runs: u64) -> Result<Report> {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut args: Vec<&str> = vec!["test", "--release", "-p", target.package];
    let features = target.features.join(",");
    if !features.is_empty() {
        args.extend(["--features", &features]);
    }
    args.extend(["--test", target.test, "--", "--exact", target.function, "--nocapture"]);
    println!("\n==> fuzz {} ({runs} cases): cargo {}", target.name, args.join(" "));
    let started = Instant::now();
    let mut child = Command::new(&cargo)
        .args(&args)
        .env("STEWARD_FUZZ_RUNS", runs.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not run {cargo}"))?;
    let stdout = child.stdout.take().context("the child's stdout")?;
    let mut summary = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading the test's output")?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("FUZZ ") {
            summary = Some(rest.to_owned());
        }
    }
    let status = child.wait().context("waiting for the fuzz test")?;
    let elapsed = started.elapsed();
    println!("<== fuzz {} ({elapsed:.0?}, {status})", target.name);
    let passed = status.success() && summary.is_some();
    Ok(Report { target: target.name, summary, elapsed, passed })
}
