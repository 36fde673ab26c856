//! `steward-sim`: runs seeds of the deterministic simulation and reports failures.
//!
//! ```text
//! steward-sim [--seeds N] [--from N] [--trace]
//! STEWARD_SIM_SEED=<n> steward-sim          replays one seed, printing its whole trace
//! ```
//!
//! Built by `cargo xtask sim` (release, with tokio's RNG seeded from each seed).

use std::env;
use std::process::ExitCode;
use std::time::Instant;

use steward_sim::{Invariant, quiet_scripted_panics, run_seed};

/// Writes to stdout; a closed stdout (the reader went away) ends the process quietly
/// instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if write!(std::io::stdout(), $($arg)*).is_err() {
            std::process::exit(0);
        }
    }};
}

/// [`out!`] with a newline.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout(), $($arg)*).is_err() {
            std::process::exit(0);
        }
    }};
}

const USAGE: &str = "usage: steward-sim [--seeds N] [--from N] [--trace] [--twice]\n       STEWARD_SIM_SEED=<n> steward-sim\n\n  --twice  run each seed twice and fail if the traces differ in any byte";

struct Args {
    seeds: u64,
    from: u64,
    trace: bool,
    twice: bool,
    replay: Option<u64>,
}

fn parse() -> Result<Args, String> {
    let mut args = Args { seeds: 500, from: 0, trace: false, twice: false, replay: None };
    let mut it = env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut number = |name: &str| -> Result<u64, String> {
            let value = it.next().ok_or_else(|| format!("{name} needs a number"))?;
            value.parse().map_err(|_| format!("{name}: not a number: {value:?}"))
        };
        match arg.as_str() {
            "--seeds" => args.seeds = number("--seeds")?,
            "--from" => args.from = number("--from")?,
            "--trace" => args.trace = true,
            "--twice" => args.twice = true,
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if let Ok(seed) = env::var("STEWARD_SIM_SEED") {
        let seed =
            seed.trim().parse().map_err(|_| format!("STEWARD_SIM_SEED: not a number: {seed:?}"))?;
        args.replay = Some(seed);
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    quiet_scripted_panics();
    if let Some(seed) = args.replay {
        let report = run_seed(seed);
        outln!("{}", report.scenario.describe());
        for line in &report.trace {
            outln!("{line}");
        }
        if report.passed() {
            outln!("seed {seed}: every invariant held");
            return ExitCode::SUCCESS;
        }
        out!("{}", report.summary(60));
        return ExitCode::FAILURE;
    }
    let started = Instant::now();
    let mut failed: Vec<(u64, Vec<Invariant>)> = Vec::new();
    let mut diverged: Vec<u64> = Vec::new();
    let mut last_progress = Instant::now();
    let end = args.from.saturating_add(args.seeds);
    for seed in args.from..end {
        let report = run_seed(seed);
        if args.twice {
            let again = run_seed(seed);
            if let Some(at) = first_difference(&report.trace, &again.trace) {
                outln!("seed {seed}: the replay diverged at trace line {at}:");
                outln!("  first:  {}", report.trace.get(at).map_or("(end)", String::as_str));
                outln!("  replay: {}", again.trace.get(at).map_or("(end)", String::as_str));
                diverged.push(seed);
            }
        }
        if !report.passed() {
            out!("{}", report.summary(if args.trace { usize::MAX } else { 40 }));
            let mut kinds: Vec<Invariant> = report.violations.iter().map(|v| v.invariant).collect();
            kinds.sort_unstable();
            kinds.dedup();
            failed.push((seed, kinds));
        }
        let done = seed - args.from + 1;
        if last_progress.elapsed().as_secs() >= 10 {
            eprintln!(
                "sim: {done}/{} seeds in {:.1?}, {} failed",
                args.seeds,
                started.elapsed(),
                failed.len()
            );
            last_progress = Instant::now();
        }
    }
    let elapsed = started.elapsed();
    let per_seed = elapsed.as_secs_f64() * 1000.0 / args.seeds.max(1) as f64;
    outln!(
        "sim: {} seeds from {} in {elapsed:.1?} ({per_seed:.2} ms per seed), {} failed",
        args.seeds,
        args.from,
        failed.len()
    );
    if args.twice {
        outln!("sim: {} of {} seeds diverged on replay", diverged.len(), args.seeds);
    }
    if failed.is_empty() && diverged.is_empty() {
        return ExitCode::SUCCESS;
    }
    let mut by_invariant: std::collections::BTreeMap<Invariant, Vec<u64>> = Default::default();
    for (seed, kinds) in &failed {
        for kind in kinds {
            by_invariant.entry(*kind).or_default().push(*seed);
        }
    }
    for (invariant, seeds) in by_invariant {
        let shown: Vec<String> = seeds.iter().take(10).map(u64::to_string).collect();
        outln!("  {invariant}: {} seeds, e.g. {}", seeds.len(), shown.join(" "));
    }
    ExitCode::FAILURE
}

/// The first line where two traces differ, if they do.
fn first_difference(a: &[String], b: &[String]) -> Option<usize> {
    (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i))
}
