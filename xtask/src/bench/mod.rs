//! `cargo xtask bench [--quick]`: steward against the bare clients, in release.
//!
//! The orchestrator (this module) builds the release binaries, then runs every measured
//! consumer or publisher in its own child process — this xtask re-invoked as
//! `xtask bench-worker <kind> …` ([`worker`]), or a Python peer — which reports its
//! messages, wall time and CPU time (its own `getrusage`) over the measured window. Each
//! figure is the median of [`ROUNDS`] rounds; comparisons run in the same invocation on
//! the same messages and queue. The report goes to `target/bench/report.json` and
//! `report.md` ([`report`]) and is printed.

mod cpu;
mod e2e;
mod http;
mod inmem;
mod latency;
mod postgres;
mod python;
mod rabbitmq;
mod report;
mod resilience;
mod service;
mod signal;
mod statuses;
pub(crate) mod worker;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use report::Report;
use worker::Sample;

/// Rounds per figure; the report holds their median.
const ROUNDS: usize = 3;

/// What every part of the benchmark shares.
#[derive(Debug)]
struct Bench {
    /// The release build of this xtask, which runs the workers.
    exe: PathBuf,
    root: PathBuf,
    quick: bool,
}

impl Bench {
    /// `target/bench`.
    fn dir(&self) -> PathBuf {
        self.root.join("target").join("bench")
    }

    /// Runs worker `args` in a child process, killing it after `limit`.
    fn worker(&self, args: &[&str], limit: Duration) -> Result<Sample> {
        let mut command = Command::new(&self.exe);
        command.arg("bench-worker").args(args);
        run_sample(command, limit).with_context(|| format!("worker {}", args.join(" ")))
    }
}

/// Runs `command`, expecting one sample line on its stdout within `limit`.
fn run_sample(command: Command, limit: Duration) -> Result<Sample> {
    Sample::from_json(&run_line(command, limit)?)
}

/// Runs `command`, returning the last line it printed on stdout within `limit`.
fn run_line(mut command: Command, limit: Duration) -> Result<String> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("could not start the worker")?;
    let started = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if started.elapsed() > limit {
            child.kill()?;
            let _ = child.wait();
            bail!("did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!("failed: {}", output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    Ok(stdout.lines().last().context("printed nothing")?.to_owned())
}

fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    println!("==> cargo {}", args.join(" "));
    let started = Instant::now();
    let status = Command::new(&cargo).args(args).current_dir(root).status()?;
    println!("<== {:.0?}", started.elapsed());
    if !status.success() {
        bail!("cargo {} failed: {status}", args.join(" "));
    }
    Ok(())
}

/// The machine's load averages, from `/proc/loadavg`: the benchmark shares the machine
/// with whatever else runs, and this says how busy it was.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |error| format!("unknown ({error})"),
        |text| text.split_whitespace().take(3).collect::<Vec<_>>().join(", "),
    )
}

/// The broker's version, from `rabbitmqctl version`.
fn broker_version() -> String {
    Command::new("rabbitmqctl")
        .arg("version")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "unknown (rabbitmqctl version failed)".to_owned())
}

/// The parts of the benchmark, in the order they run.
const PARTS: [&str; 5] = ["inmem", "rabbitmq", "latency", "resilience", "e2e"];

/// `cargo xtask bench [--quick] [--only <part>,…]`.
pub(crate) fn run(args: &[String]) -> Result<()> {
    let mut quick = false;
    let mut only: Option<Vec<String>> = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--only" => {
                let parts = args.next().context("--only needs a list of parts")?;
                let parts: Vec<String> = parts.split(',').map(str::to_owned).collect();
                if let Some(bad) = parts.iter().find(|p| !PARTS.contains(&p.as_str())) {
                    bail!("unknown part {bad:?}; the parts are {}", PARTS.join(", "));
                }
                only = Some(parts);
            }
            other => bail!("unknown bench option {other:?}; the options are --quick and --only"),
        }
    }
    let runs = |part: &str| only.as_ref().is_none_or(|parts| parts.iter().any(|p| p == part));
    let started = Instant::now();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask lives inside the workspace")?
        .to_owned();
    cargo(&root, &["build", "--quiet", "--release", "-p", "xtask"])?;
    let bench = Bench { exe: root.join("target/release/xtask"), root, quick };
    let mut report = Report::default();
    report.meta("mode", if quick { "quick" } else { "full" });
    report.meta(
        "cores",
        std::thread::available_parallelism().map_or("unknown".to_owned(), |n| n.to_string()),
    );
    report.meta("broker", format!("RabbitMQ {}", broker_version()));
    report.meta("queue type", "quorum (declared by steward-rabbitmq), persistent messages");
    report.meta("rounds per figure", ROUNDS.to_string());
    report.meta("load average at the start (1, 5, 15 min)", load_average());
    if let Some(parts) = &only {
        report.meta("parts (--only)", parts.join(", "));
    }

    if runs("inmem") {
        inmem::bench(&bench, &mut report);
    }
    if runs("rabbitmq") {
        let peers = python::Peers::prepare(&bench);
        rabbitmq::bench(&bench, &peers, &mut report);
    }
    if runs("latency") {
        latency::bench(&bench, &mut report);
    }
    if runs("resilience") {
        resilience::bench(&bench, &mut report);
    }
    if runs("e2e") {
        e2e::bench(&bench, &mut report);
    }
    goals(&mut report);

    report.meta("load average at the end (1, 5, 15 min)", load_average());
    report.meta("wall time", format!("{:.0?}", started.elapsed()));
    let dir = bench.dir();
    report.write(&dir)?;
    println!("\n{}\nwritten to {}", report.to_markdown(), dir.display());
    Ok(())
}

/// The goals, from the figures measured.
fn goals(report: &mut Report) {
    let consume =
        report.ratio_of("rabbitmq.consume.updater.rate", "rabbitmq.consume.raw-ack32.rate");
    let consume_cpu =
        report.ratio_of("rabbitmq.consume.updater.cpu", "rabbitmq.consume.raw-ack32.cpu");
    let peer = report.ratio_of("rabbitmq.consume.updater.rate", "rabbitmq.consume.aio-pika.rate");
    let publish = report.ratio_of("rabbitmq.publish.sink.rate", "rabbitmq.publish.raw.rate");
    let inmem8 = report.value("inmem.updater.c8.rate");
    let inmem_ratio = report.ratio_of("inmem.updater.c8.rate", "inmem.mpsc.c8.rate");
    report.goal("RabbitMQ consume ≥ 0.9× raw ack-every-32 (msg/s ratio)", consume, true, 0.9);
    report.goal("… at ≤ 1.5× its CPU per message (CPU ratio)", consume_cpu, false, 1.5);
    report.goal("≥ 8× aio-pika's msg/s (ratio)", peer, true, 8.0);
    report.goal("Publish ≥ 0.9× raw lapin with confirms (ratio)", publish, true, 0.9);
    report.goal("inmem Updater ≥ 500k msg/s at concurrency 8", inmem8, true, 500_000.0);
    report.goal("inmem Updater ≥ 0.5× the mpsc baseline at concurrency 8", inmem_ratio, true, 0.5);
    let e2e = report.value("e2e.sqlite.rate");
    report.goal("End to end ≥ 5k msg/s on SQLite", e2e, true, 5_000.0);
    let reconnect = report.value("resilience.reconnect.max");
    report.goal("Reconnect ≤ 2 s (max of 5, ms)", reconnect, false, 2_000.0);
    let rss = report.value("memory.idle.rss");
    report.goal("Idle RSS ≤ 30 MB (steward-api, MB)", rss, false, 30.0);
}
