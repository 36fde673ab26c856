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

/// The sizes of a run.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    operations: usize,
    /// Messages handled before the RSS "after" is read.
    memory_messages: usize,
}

/// The figures of one database, with their units, in report order.
fn keys(database: Database, sizes: Sizes) -> Vec<(String, &'static str)> {
    let db = database.key();
    let mut keys = vec![
        (format!("e2e.{db}.rate"), "msg/s"),
        (format!("e2e.{db}.cpu"), "CPU µs/msg"),
        (format!("e2e.{db}.cores"), "cores busy"),
    ];
    if database == Database::Sqlite {
        let after = format!("memory.after-{}k", sizes.memory_messages / 1000);
        for stage in ["memory.idle".to_owned(), after] {
            for part in ["rss", "rss-anon", "rss-file"] {
                keys.push((format!("{stage}.{part}"), "MB"));
            }
        }
    }
    keys
}

/// The end-to-end and memory figures.
pub(super) fn bench(bench: &super::Bench, report: &mut super::Report) {
    let sizes = if bench.quick {
        Sizes { operations: 500, memory_messages: 20_000 }
    } else {
        Sizes { operations: 2_000, memory_messages: 100_000 }
    };
    report.meta("end-to-end operations per round", sizes.operations.to_string());
    let databases = [Database::Sqlite, Database::Postgres];
    let exe = match super::service::build(bench) {
        Ok(exe) => exe,
        Err(error) => {
            let reason = format!("building steward-api: {error:#}");
            for (key, unit) in databases.into_iter().flat_map(|db| keys(db, sizes)) {
                report.missing(&key, unit, reason.clone());
            }
            return;
        }
    };
    let mut measured: Vec<(String, f64)> = Vec::new();
    let mut failures: [Option<String>; 2] = Default::default();
    for round in 0..super::ROUNDS {
        for (index, database) in databases.into_iter().enumerate() {
            println!("end to end: round {} on {}", round + 1, database.key());
            if let Err(error) = run(bench, &exe, database, sizes, &mut measured) {
                eprintln!("end to end on {}: {error:#}", database.key());
                failures[index] = Some(format!("{error:#}"));
            }
        }
    }
    for (index, database) in databases.into_iter().enumerate() {
        for (key, unit) in keys(database, sizes) {
            let rounds: Vec<f64> =
                measured.iter().filter(|(k, _)| *k == key).map(|(_, v)| *v).collect();
            if rounds.is_empty() {
                report.missing(&key, unit, failures[index].clone().unwrap_or_default());
            } else {
                report.figure(&key, unit, rounds);
            }
        }
    }
    report.ratio("e2e.postgres.rate", "e2e.sqlite.rate");
}

/// One service run on `database`, adding what it measured to `measured`; on SQLite
/// also the memory figures.
fn run(
    bench: &super::Bench,
    exe: &std::path::Path,
    database: Database,
    sizes: Sizes,
    measured: &mut Vec<(String, f64)>,
) -> Result<()> {
    let memory = database == Database::Sqlite;
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
    let db = database.key();
    let result = (|| {
        let service = Service::start(exe, &queues, &url)?;
        let rss = |stage: &str, measured: &mut Vec<(String, f64)>| -> Result<()> {
            let rss = service.rss_mb()?;
            measured.push((format!("memory.{stage}.rss"), rss.total));
            measured.push((format!("memory.{stage}.rss-anon"), rss.anon));
            measured.push((format!("memory.{stage}.rss-file"), rss.file));
            println!("    RSS {stage}: {:.1} MB", rss.total);
            Ok(())
        };
        if memory {
            std::thread::sleep(Duration::from_secs(2));
            service.drain_lines();
            rss("idle", measured)?;
        }
        let operations = create(&service, sizes.operations)?;
        wait_for_requests(&queues, &service, sizes.operations)?;
        let consumed = consume(&service, &queues, &operations)?;
        println!(
            "    {:.0} msg/s, {:.0} CPU µs/msg, {:.2} cores busy",
            consumed.rate, consumed.cpu_us, consumed.cores
        );
        measured.push((format!("e2e.{db}.rate"), consumed.rate));
        measured.push((format!("e2e.{db}.cpu"), consumed.cpu_us));
        measured.push((format!("e2e.{db}.cores"), consumed.cores));
        if memory {
            replay(&service, &queues, &operations, sizes.memory_messages)?;
            rss(&format!("after-{}k", sizes.memory_messages / 1000), measured)?;
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

/// What the measured consumption came to.
#[derive(Debug)]
struct Consumed {
    rate: f64,
    /// The service's CPU time per message.
    cpu_us: f64,
    /// The service's CPU time over the wall time: how many cores it kept busy.
    cores: f64,
}

/// Publishes an in-progress and a success status per operation, and measures from the
/// first publish until every operation reads back as `deployed`.
fn consume(service: &Service, queues: &Queues, operations: &[Operation]) -> Result<Consumed> {
    let messages: Vec<(Vec<u8>, &Operation)> = operations
        .iter()
        .flat_map(|op| [(op.status("deploying"), op), (op.status("deployed"), op)])
        .collect();
    let mut http = service.http()?;
    let cpu = service.cpu_secs()?;
    let started = Instant::now();
    super::rabbitmq::block_on(statuses::publish(&queues.deployment_status, &messages))?;
    let limit = Duration::from_secs(300);
    service.wait_completed(&mut http, messages.len() as u64, limit)?;
    wait_deployed(service, &mut http, operations, limit.saturating_sub(started.elapsed()))?;
    let secs = started.elapsed().as_secs_f64();
    let cpu = service.cpu_secs()? - cpu;
    check_operations(&mut http, operations)?;
    let count = messages.len() as f64;
    Ok(Consumed { rate: count / secs, cpu_us: cpu * 1e6 / count, cores: cpu / secs })
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
