//! The measured side of the benchmark: `xtask bench-worker <kind> <args…>`, run by
//! [`super::run`] as a child process of the release build, one process per measured
//! consumer or publisher. It prints one JSON line: how many messages it moved, over how
//! many seconds, and the CPU time the process used over that window.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::cpu::process_cpu;
use super::{inmem, rabbitmq, resilience};

/// What one worker measured.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    /// Messages moved.
    pub(crate) count: usize,
    /// Wall time from the first message to the last.
    pub(crate) secs: f64,
    /// CPU time of the worker process over the same window.
    pub(crate) cpu_secs: f64,
}

impl Sample {
    /// Messages per second.
    pub(crate) fn rate(&self) -> f64 {
        self.count as f64 / self.secs
    }

    /// CPU microseconds per message.
    pub(crate) fn cpu_us(&self) -> f64 {
        self.cpu_secs * 1e6 / self.count as f64
    }

    pub(crate) fn to_json(self) -> String {
        serde_json::json!({ "count": self.count, "secs": self.secs, "cpu_secs": self.cpu_secs })
            .to_string()
    }

    pub(crate) fn from_json(line: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("a worker printed {line:?}, not a sample"))?;
        let count = value["count"].as_u64().context("sample without count")? as usize;
        let secs = value["secs"].as_f64().context("sample without secs")?;
        let cpu_secs = value["cpu_secs"].as_f64().context("sample without cpu_secs")?;
        if count == 0 || secs <= 0.0 {
            bail!("a worker measured nothing: {line}");
        }
        Ok(Self { count, secs, cpu_secs })
    }
}

/// A running measurement window: wall clock and process CPU at its start.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    wall: Instant,
    cpu: Duration,
}

impl Window {
    pub(crate) fn start() -> Self {
        Self { wall: Instant::now(), cpu: process_cpu() }
    }

    pub(crate) fn finish(self, count: usize) -> Sample {
        Sample {
            count,
            secs: self.wall.elapsed().as_secs_f64(),
            cpu_secs: (process_cpu() - self.cpu).as_secs_f64(),
        }
    }
}

fn arg<T: std::str::FromStr>(args: &[String], index: usize, what: &str) -> Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    args.get(index)
        .with_context(|| format!("bench-worker: missing {what}"))?
        .parse()
        .with_context(|| format!("bench-worker: bad {what}"))
}

/// Runs one worker and prints its sample.
pub(crate) fn main(args: &[String]) -> Result<()> {
    let kind = args.first().context("bench-worker: missing kind")?.as_str();
    let threads = std::thread::available_parallelism().map_or(2, usize::from);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("could not start the tokio runtime")?;
    if let Some(transport) = kind.strip_suffix("-latency") {
        let rate: f64 = arg(args, 1, "rate")?;
        let count = arg(args, 2, "count")?;
        let queue: String = arg(args, 3, "queue").unwrap_or_default();
        let (p50, p99) =
            runtime.block_on(super::latency::measure(transport, &queue, rate, count))?;
        println!("{}", serde_json::json!({ "p50_us": p50, "p99_us": p99 }));
        return Ok(());
    }
    if kind == "rabbitmq-reconnect" {
        let queue: String = arg(args, 1, "queue")?;
        return runtime.block_on(resilience::reconnect(&queue));
    }
    if kind == "rabbitmq-sigterm" {
        let queue: String = arg(args, 1, "queue")?;
        return runtime.block_on(resilience::sigterm(&queue));
    }
    let sample = runtime.block_on(async {
        match kind {
            "inmem-updater" => {
                inmem::updater(arg(args, 1, "count")?, arg(args, 2, "concurrency")?).await
            }
            "inmem-mpsc" => inmem::mpsc(arg(args, 1, "count")?, arg(args, 2, "concurrency")?).await,
            "rabbitmq-publish-raw" => {
                let window = arg(args, 3, "window").unwrap_or(rabbitmq::PUBLISH_WINDOW);
                rabbitmq::publish_raw(
                    &arg::<String>(args, 1, "queue")?,
                    arg(args, 2, "count")?,
                    window,
                )
                .await
            }
            "rabbitmq-publish-sink" => {
                rabbitmq::publish_sink(&arg::<String>(args, 1, "queue")?, arg(args, 2, "count")?)
                    .await
            }
            "rabbitmq-consume-raw" => {
                rabbitmq::consume_raw(
                    &arg::<String>(args, 1, "queue")?,
                    arg(args, 2, "count")?,
                    arg(args, 3, "ack-every")?,
                )
                .await
            }
            "rabbitmq-consume-updater" => {
                rabbitmq::consume_updater(&arg::<String>(args, 1, "queue")?, arg(args, 2, "count")?)
                    .await
            }
            other => bail!("bench-worker: unknown kind {other:?}"),
        }
    })?;
    println!("{}", sample.to_json());
    Ok(())
}
