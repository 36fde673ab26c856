//! End to end: the `steward-api` binary on RabbitMQ, with SQLite and then PostgreSQL,
//! consuming the deployment statuses of single-step operations it created over HTTP;
//! and, on the SQLite runs, the binary's resident set size idle and after many messages.
//!
//! Per round and database: a fresh service (its own queues, a new database), idle RSS
//! 2 s after it is ready, `OPERATIONS` workspace installs over HTTP (each a single-step
//! operation whose resource request goes out through the outbox), then, measured, an
//! in-progress and a success status for each, published at once, until every
//! operation reads back over HTTP as `deployed`. The SQLite run then gets replays of
//! the same statuses (no-ops for the service) up to the memory figure's count.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;

use super::http::Http;
use super::service::{Queues, Service};
use super::statuses::{self, Operation};

/// The database a run uses.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Database {
    Sqlite,
    Postgres,
}

impl Database {
    fn key(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

/// What one round on one database measured.
#[derive(Debug, Default)]
struct Round {
    rate: Option<f64>,
    idle_mb: Option<f64>,
    after_mb: Option<f64>,
}

/// The sizes of a run.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    operations: usize,
    /// Messages handled before the RSS "after" is read.
    memory_messages: usize,
}

/// The end-to-end and memory figures.
pub(super) fn bench(bench: &super::Bench, report: &mut super::Report) {
    let sizes = if bench.quick {
        Sizes { operations: 500, memory_messages: 20_000 }
    } else {
        Sizes { operations: 2_000, memory_messages: 100_000 }
    };
    let after_key = format!("memory.after-{}k.rss", sizes.memory_messages / 1000);
    report.meta("end-to-end operations per round", sizes.operations.to_string());
    let exe = match super::service::build(bench) {
        Ok(exe) => exe,
        Err(error) => {
            let reason = format!("building steward-api: {error:#}");
            for key in ["e2e.sqlite.rate", "e2e.postgres.rate"] {
                report.missing(key, "msg/s", reason.clone());
            }
            report.missing("memory.idle.rss", "MB", reason.clone());
            report.missing(&after_key, "MB", reason);
            return;
        }
    };
    let mut rates = [Vec::new(), Vec::new()];
    let (mut idle, mut after) = (Vec::new(), Vec::new());
    let mut failures: [Option<String>; 3] = Default::default();
    for round in 0..super::ROUNDS {
        for (index, database) in [Database::Sqlite, Database::Postgres].into_iter().enumerate() {
            println!("end to end: round {} on {}", round + 1, database.key());
            let memory = database == Database::Sqlite;
            let mut measured = Round::default();
            let result = run(bench, &exe, database, sizes, memory, &mut measured);
            if let Err(error) = &result {
                eprintln!("end to end on {}: {error:#}", database.key());
                failures[index] = Some(format!("{error:#}"));
                if memory && measured.after_mb.is_none() {
                    failures[2] = Some(format!("{error:#}"));
                }
            }
            rates[index].extend(measured.rate);
            idle.extend(measured.idle_mb);
            after.extend(measured.after_mb);
        }
    }
    for (index, database) in [Database::Sqlite, Database::Postgres].into_iter().enumerate() {
        let key = format!("e2e.{}.rate", database.key());
        let rounds = std::mem::take(&mut rates[index]);
        if rounds.is_empty() {
            report.missing(&key, "msg/s", failures[index].clone().unwrap_or_default());
        } else {
            report.figure(&key, "msg/s", rounds);
        }
    }
    report.ratio("e2e.postgres.rate", "e2e.sqlite.rate");
    for (key, rounds) in [("memory.idle.rss", idle), (after_key.as_str(), after)] {
        if rounds.is_empty() {
            report.missing(key, "MB", failures[2].clone().unwrap_or_default());
        } else {
            report.figure(key, "MB", rounds);
        }
    }
}

/// One service run on `database`, filling `measured` as it goes.
fn run(
    bench: &super::Bench,
    exe: &std::path::Path,
    database: Database,
    sizes: Sizes,
    memory: bool,
    measured: &mut Round,
) -> Result<()> {
    let queues = Queues::new(&format!("e2e-{}", database.key()));
    let dir = bench.dir().join(format!("e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let scratch = match database {
        Database::Sqlite => None,
        Database::Postgres => Some(super::postgres::Scratch::create()?),
    };
    let url = match &scratch {
        Some(scratch) => scratch.url.clone(),
        None => format!("sqlite://{}?mode=rwc", dir.join("steward.db").display()),
    };
    let result = (|| {
        let service = Service::start(exe, &queues, &url)?;
        if memory {
            std::thread::sleep(Duration::from_secs(2));
            service.drain_lines();
            measured.idle_mb = Some(service.rss_mb()?);
        }
        let operations = create(&service, sizes.operations)?;
        wait_for_requests(&queues, &service, sizes.operations)?;
        let rate = consume(&service, &queues, &operations)?;
        println!("    {rate:.0} msg/s");
        measured.rate = Some(rate);
        if memory {
            replay(&service, &queues, &operations, sizes.memory_messages)?;
            measured.after_mb = Some(service.rss_mb()?);
        }
        service.stop()
    })();
    drop(scratch);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Creates `count` workspaces over HTTP, four clients at a time; returns their
/// operations.
fn create(service: &Service, count: usize) -> Result<Vec<Operation>> {
    const CLIENTS: usize = 4;
    println!("    creating {count} operations over HTTP");
    let started = Instant::now();
    let base = service.base.as_str();
    let created: Vec<Result<Vec<Operation>>> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..CLIENTS)
            .map(|client| {
                scope.spawn(move || -> Result<Vec<Operation>> {
                    let mut http = Http::new(base)?;
                    let mut operations = Vec::new();
                    for n in (client..count).step_by(CLIENTS) {
                        let body = json!({
                            "templateName": "tre-workspace-base",
                            "resourceType": "workspace",
                            "properties": {"display_name": format!("W{n}"), "description": "benchmark"},
                        });
                        let (status, answer) = http.post("/api/resources", &body)?;
                        if status != 202 {
                            bail!("POST /api/resources: {status} {answer}");
                        }
                        operations.push(Operation::from_answer(&answer)?);
                    }
                    Ok(operations)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a client panicked"))))
            .collect()
    });
    let mut operations = Vec::with_capacity(count);
    for part in created {
        operations.extend(part?);
    }
    service.drain_lines();
    println!("    created in {:.1?}", started.elapsed());
    Ok(operations)
}

/// Waits until the outbox sent every resource request, so it does not compete with the
/// measured consumption.
fn wait_for_requests(queues: &Queues, service: &Service, count: usize) -> Result<()> {
    let started = Instant::now();
    loop {
        service.drain_lines();
        let depth = super::rabbitmq::depth(&queues.resource_request)?;
        if depth as usize >= count {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("{depth} of {count} resource requests sent within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Publishes an in-progress and a success status per operation, and measures from the
/// first publish until every operation reads back as `deployed`; returns msg/s.
fn consume(service: &Service, queues: &Queues, operations: &[Operation]) -> Result<f64> {
    let messages: Vec<(Vec<u8>, &Operation)> = operations
        .iter()
        .flat_map(|op| [(op.status("deploying"), op), (op.status("deployed"), op)])
        .collect();
    let mut http = service.http()?;
    let started = Instant::now();
    super::rabbitmq::block_on(statuses::publish(&queues.deployment_status, &messages))?;
    let limit = Duration::from_secs(300);
    service.wait_completed(&mut http, messages.len() as u64, limit)?;
    wait_deployed(service, &mut http, operations, limit.saturating_sub(started.elapsed()))?;
    let secs = started.elapsed().as_secs_f64();
    check_operations(&mut http, operations)?;
    Ok(messages.len() as f64 / secs)
}

/// Waits until every resource of `operations` lists as `deployed`.
fn wait_deployed(
    service: &Service,
    http: &mut Http,
    operations: &[Operation],
    limit: Duration,
) -> Result<()> {
    let ours: std::collections::HashSet<&str> =
        operations.iter().map(|op| op.resource_id.as_str()).collect();
    let started = Instant::now();
    loop {
        let mut deployed = 0;
        let mut cursor: Option<String> = None;
        loop {
            service.drain_lines();
            let path = match &cursor {
                Some(cursor) => format!("/api/resources?status=deployed&limit=500&cursor={cursor}"),
                None => "/api/resources?status=deployed&limit=500".to_owned(),
            };
            let (status, page) = http.get(&path)?;
            if status != 200 {
                bail!("GET {path}: {status} {page}");
            }
            let resources = page["resources"].as_array().context("no resources")?;
            deployed += resources
                .iter()
                .filter(|r| r["id"].as_str().is_some_and(|id| ours.contains(id)))
                .count();
            cursor = page["nextCursor"].as_str().map(str::to_owned);
            if cursor.is_none() {
                break;
            }
        }
        if deployed == operations.len() {
            return Ok(());
        }
        if started.elapsed() > limit {
            bail!("{deployed} of {} resources deployed within {limit:?}", operations.len());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads every operation back: each must be `deployed` (not timed).
fn check_operations(http: &mut Http, operations: &[Operation]) -> Result<()> {
    for operation in operations {
        let path = format!("/api/operations/{}", operation.id);
        let (status, answer) = http.get(&path)?;
        if status != 200 || answer["operation"]["status"] != "deployed" {
            bail!("operation {} not final after the run: {status} {answer}", operation.id);
        }
    }
    Ok(())
}

/// Publishes replays of the statuses until the service has handled `total` messages
/// in all; waits until it has.
fn replay(
    service: &Service,
    queues: &Queues,
    operations: &[Operation],
    total: usize,
) -> Result<()> {
    let mut http = service.http()?;
    let done = service.completed(&mut http)? as usize;
    let more = total.saturating_sub(done);
    println!("    {more} more messages for the memory figure");
    let bodies: Vec<(Vec<u8>, &Operation)> = operations
        .iter()
        .flat_map(|op| [(op.status("deploying"), op), (op.status("deployed"), op)])
        .collect();
    let messages: Vec<(Vec<u8>, &Operation)> =
        bodies.iter().cycle().take(more).map(|(body, op)| (body.clone(), *op)).collect();
    for chunk in messages.chunks(10_000) {
        super::rabbitmq::block_on(statuses::publish(&queues.deployment_status, chunk))?;
        service.drain_lines();
    }
    service.wait_completed(&mut http, total as u64, Duration::from_secs(600))
}
