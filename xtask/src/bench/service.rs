//! The `steward-api` binary under measurement: built in release with the `rabbitmq`
//! feature into a target directory of its own (so it never replaces the binaries other
//! steps build), started on RabbitMQ with queues of its own, watched through its JSON
//! log lines, `/api/workers` and `/proc/<pid>/status`, stopped with SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use steward_rabbitmq::{RabbitMq, RabbitMqBuilder};

use super::http::Http;

/// Where the benchmark's build of the binary goes, under `target/bench`.
const TARGET_DIR: &str = "api-build";

/// Builds the binary; returns its path.
pub(crate) fn build(bench: &super::Bench) -> Result<PathBuf> {
    let target = bench.dir().join(TARGET_DIR);
    let target_arg = target.to_string_lossy().into_owned();
    super::cargo(
        &bench.root,
        &[
            "build",
            "--quiet",
            "--release",
            "-p",
            "steward-api",
            "--features",
            "rabbitmq",
            "--target-dir",
            &target_arg,
        ],
    )?;
    Ok(target.join("release").join("steward-api"))
}

/// The five queues of one service run, uniquely named, and the topology to delete them.
#[derive(Debug)]
pub(crate) struct Queues {
    pub(crate) deployment_status: String,
    step_result: String,
    pub(crate) resource_request: String,
    airlock_status_changed: String,
    airlock_notification: String,
}

impl Queues {
    pub(crate) fn new(what: &str) -> Self {
        let prefix = super::rabbitmq::unique_queue(what);
        let name = |queue: &str| format!("{prefix}-{queue}");
        Self {
            deployment_status: name("deploymentstatus"),
            step_result: name("airlock-step-result"),
            resource_request: name("workspacequeue"),
            airlock_status_changed: name("airlock-status-changed"),
            airlock_notification: name("airlock-notification"),
        }
    }

    fn env(&self) -> [(&'static str, &str); 5] {
        [
            ("SERVICE_BUS_DEPLOYMENT_STATUS_UPDATE_QUEUE", &self.deployment_status),
            ("SERVICE_BUS_STEP_RESULT_QUEUE", &self.step_result),
            ("SERVICE_BUS_RESOURCE_REQUEST_QUEUE", &self.resource_request),
            ("STEWARD_AIRLOCK_STATUS_CHANGED_QUEUE", &self.airlock_status_changed),
            ("STEWARD_AIRLOCK_NOTIFICATION_QUEUE", &self.airlock_notification),
        ]
    }

    /// The topology the service declares for these queues.
    fn topology(&self) -> Result<RabbitMq> {
        RabbitMqBuilder::new()
            .with_url(super::rabbitmq::url())
            .with_connection_name("steward-bench-cleanup")
            .with_queue(&self.deployment_status)
            .with_queue(&self.step_result)
            .with_publish_queue(&self.resource_request)
            .with_publish_queue(&self.airlock_status_changed)
            .with_publish_queue(&self.airlock_notification)
            .build()
            .context("configuring the RabbitMQ transport")
    }

    /// Deletes the queues (with their dead-letter and delay queues).
    pub(crate) fn delete(&self) {
        let deleted = self.topology().and_then(|rabbit| {
            super::rabbitmq::block_on(async move { Ok(rabbit.delete_topology().await?) })
        });
        if let Err(error) = deleted {
            eprintln!("could not delete the service's queues: {error:#}");
        }
    }
}

impl Drop for Queues {
    fn drop(&mut self) {
        self.delete();
    }
}

/// A running `steward-api`, killed when dropped.
#[derive(Debug)]
pub(crate) struct Service {
    child: Child,
    /// `http://host:port`.
    pub(crate) base: String,
    /// Every JSON log line after the `listening` one, as the reader thread gets it.
    lines: Receiver<String>,
}

impl Service {
    /// Starts `exe` on RabbitMQ with `queues` and the database at `database_url`, and
    /// waits until `/readyz` answers 200 (workers on the broker and the database).
    pub(crate) fn start(exe: &Path, queues: &Queues, database_url: &str) -> Result<Self> {
        let mut command = Command::new(exe);
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("STEWARD_TRANSPORT", "rabbitmq")
            .env("STEWARD_RABBITMQ_URL", super::rabbitmq::url())
            .env("STEWARD_SIMULATE_PROCESSORS", "false")
            .env("STEWARD_LISTEN", "127.0.0.1:0")
            .env("STEWARD_DATABASE_URL", database_url)
            .env("STEWARD_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .envs(queues.env())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().with_context(|| format!("starting {}", exe.display()))?;
        let stderr = child.stderr.take().context("no stderr")?;
        let (send, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        let mut service = Self { child, base: String::new(), lines };
        let started = Instant::now();
        let limit = Duration::from_secs(60);
        loop {
            let line = service
                .lines
                .recv_timeout(limit.saturating_sub(started.elapsed()))
                .context("steward-api did not log `listening` within 60 s")?;
            if line.contains("steward-api listening") {
                let value: Value = serde_json::from_str(&line)?;
                service.base = value["address"].as_str().context("no address")?.to_owned();
                break;
            }
        }
        service.wait_ready(limit)?;
        Ok(service)
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let mut http = self.http()?;
        let started = Instant::now();
        loop {
            self.drain_lines();
            if http.get("/readyz").is_ok_and(|(status, _)| status == 200) {
                return Ok(());
            }
            if started.elapsed() > limit {
                bail!("steward-api not ready within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A client of this service.
    pub(crate) fn http(&self) -> Result<Http> {
        Http::new(&self.base)
    }

    /// Drops the log lines read so far (the pipe must not fill up).
    pub(crate) fn drain_lines(&self) {
        while self.lines.try_recv().is_ok() {}
    }

    /// The deployment-status worker's `completed` counter.
    pub(crate) fn completed(&self, http: &mut Http) -> Result<u64> {
        self.drain_lines();
        let (status, workers) = http.get("/api/workers")?;
        if status != 200 {
            bail!("/api/workers: {status} {workers}");
        }
        workers["workers"]
            .as_array()
            .and_then(|all| all.iter().find(|w| w["name"] == "deployment-status"))
            .and_then(|worker| worker["completed"].as_u64())
            .with_context(|| format!("no deployment-status worker in {workers}"))
    }

    /// Waits until the deployment-status worker completed `count` messages.
    pub(crate) fn wait_completed(
        &self,
        http: &mut Http,
        count: u64,
        limit: Duration,
    ) -> Result<()> {
        let started = Instant::now();
        let mut last = Instant::now();
        loop {
            let completed = self.completed(http)?;
            if completed >= count {
                return Ok(());
            }
            if started.elapsed() > limit {
                bail!("{completed} of {count} messages completed within {limit:?}");
            }
            if last.elapsed() > Duration::from_secs(10) {
                println!("    … {completed} of {count} messages completed");
                last = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The process's resident set size in MB: all of it, its anonymous part (heap,
    /// stacks) and its file-backed part (the mapped binary and libraries).
    pub(crate) fn rss_mb(&self) -> Result<Rss> {
        let path = format!("/proc/{}/status", self.child.id());
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let field = |name: &str| -> Result<f64> {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .map(|kb| kb / 1024.0)
                .with_context(|| format!("no {name} in {path}"))
        };
        Ok(Rss { total: field("VmRSS:")?, anon: field("RssAnon:")?, file: field("RssFile:")? })
    }

    /// The CPU time (user + system) the process has used so far, from
    /// `/proc/<pid>/stat`.
    pub(crate) fn cpu_secs(&self) -> Result<f64> {
        let path = format!("/proc/{}/stat", self.child.id());
        let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        // After the command name in parentheses: state is field 3, utime 14, stime 15.
        let fields: Vec<&str> =
            stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("").split_whitespace().collect();
        let ticks = |n: usize| -> Result<f64> {
            fields
                .get(n - 3)
                .and_then(|f| f.parse::<f64>().ok())
                .with_context(|| format!("bad {path}"))
        };
        Ok((ticks(14)? + ticks(15)?) / clock_ticks())
    }

    /// Sends SIGTERM and waits for a successful exit.
    pub(crate) fn stop(mut self) -> Result<()> {
        super::signal::terminate(self.child.id())?;
        let started = Instant::now();
        loop {
            self.drain_lines();
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("steward-api exited with {status}");
                }
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(40) {
                bail!("steward-api did not exit within 40 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A resident set size in MB.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rss {
    pub(crate) total: f64,
    pub(crate) anon: f64,
    pub(crate) file: f64,
}

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`, else 100).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}
