//! Latency: publish → handler start, p50 and p99, with messages sent at a steady pace of
//! half the measured maximum rate, through the Updater on the in-memory broker and on
//! RabbitMQ. Publisher and Updater share the worker process, so both read one clock.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use steward_core::{
    MessageSink, Outcome, OutgoingMessage, Supervisor, SupervisorConfig, Updater, UpdaterConfig,
    handler_fn,
};
use steward_inmem::InMemoryBroker;

use super::rabbitmq;

/// Microseconds since `origin`, as the message body.
fn stamp(origin: Instant) -> Vec<u8> {
    origin.elapsed().as_micros().to_string().into_bytes()
}

/// Measures `count` messages at `rate` msg/s on `transport` (`inmem` or `rabbitmq`, the
/// latter on `queue`); returns p50 and p99 in µs.
pub(crate) async fn measure(
    transport: &str,
    queue: &str,
    rate: f64,
    count: usize,
) -> Result<(f64, f64)> {
    if !(rate.is_finite() && rate > 0.0) {
        bail!("latency: bad rate {rate}");
    }
    let origin = Instant::now();
    let latencies: Arc<Mutex<Vec<u64>>> = Arc::default();
    let handler = {
        let latencies = latencies.clone();
        handler_fn(move |message| {
            let now = origin.elapsed().as_micros() as u64;
            let sent: u64 =
                std::str::from_utf8(&message.body).ok().and_then(|s| s.parse().ok()).unwrap_or(now);
            if let Ok(mut latencies) = latencies.lock() {
                latencies.push(now.saturating_sub(sent));
            }
            async { Outcome::Complete }
        })
    };
    let config = UpdaterConfig::default().with_concurrency(8).with_batch_size(64);
    let supervisor = Supervisor::new(SupervisorConfig::default());
    // Sends message `i` no earlier than `i / rate` seconds after the start.
    let pace = |i: usize| origin + Duration::from_secs_f64(1.0 + i as f64 / rate);
    match transport {
        "inmem" => {
            let broker = InMemoryBroker::new();
            let source = broker.source("q").context("in-memory source")?;
            supervisor.spawn(Updater::with_source("bench", source, handler).with_config(config));
            for i in 0..count {
                tokio::time::sleep_until(pace(i).into()).await;
                broker.send("q", OutgoingMessage::new(stamp(origin))).await?;
            }
        }
        "rabbitmq" => {
            let rabbit = rabbitmq::transport(queue)?;
            let connect = {
                let (rabbit, queue) = (rabbit.clone(), queue.to_owned());
                move || {
                    let (rabbit, queue) = (rabbit.clone(), queue.clone());
                    async move { rabbit.source(&queue).await }
                }
            };
            supervisor.spawn(Updater::new("bench", connect, handler).with_config(config));
            let connection = lapin::Connection::connect(
                &rabbitmq::url(),
                lapin::ConnectionProperties::default(),
            )
            .await?;
            let channel = connection.create_channel().await?;
            for i in 0..count {
                tokio::time::sleep_until(pace(i).into()).await;
                // Without confirms: the publisher must not wait while keeping the pace.
                channel
                    .basic_publish(
                        "".into(),
                        queue.into(),
                        BasicPublishOptions::default(),
                        &stamp(origin),
                        BasicProperties::default()
                            .with_delivery_mode(2)
                            .with_message_id(super::rabbitmq::message_id(i).into()),
                    )
                    .await?;
            }
        }
        other => bail!("latency: unknown transport {other:?}"),
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut values = loop {
        let done = latencies.lock().map(|l| l.len() >= count).unwrap_or(true);
        if done {
            break latencies.lock().map(|l| l.clone()).unwrap_or_default();
        }
        if Instant::now() > deadline {
            bail!("latency: not every message was handled within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let _ = supervisor.shutdown(tokio::time::Instant::now() + Duration::from_secs(10)).await;
    values.sort_unstable();
    let at = |q: f64| values[((values.len() - 1) as f64 * q) as usize] as f64;
    Ok((at(0.5), at(0.99)))
}

/// The latency figures, at half the maximum rate measured earlier in this run (for
/// RabbitMQ, half the lower of the Updater's consume and the raw publisher's rate).
pub(super) fn bench(bench: &super::Bench, report: &mut super::Report) {
    let limit = Duration::from_secs(180);
    let inmem = report.value("inmem.updater.c8.rate").map(|r| r / 2.0);
    let rabbit = match (
        report.value("rabbitmq.consume.updater.rate"),
        report.value("rabbitmq.publish.raw.rate"),
    ) {
        (Some(consume), Some(publish)) => Some(consume.min(publish) / 2.0),
        _ => None,
    };
    for (transport, rate) in [("inmem", inmem), ("rabbitmq", rabbit)] {
        let keys = [format!("latency.{transport}.p50"), format!("latency.{transport}.p99")];
        let Some(rate) = rate else {
            for key in &keys {
                report.missing(key, "µs", "no maximum rate was measured to take half of");
            }
            continue;
        };
        // Two seconds' worth of messages, at least 2,000.
        let count = ((rate * 2.0) as usize).max(2_000);
        let queue = rabbitmq::unique_queue("latency");
        let declared = if transport == "rabbitmq" { rabbitmq::declare(&queue) } else { Ok(()) };
        let (mut p50, mut p99, mut failure) = (Vec::new(), Vec::new(), None);
        if let Err(error) = declared {
            failure = Some(format!("{error:#}"));
        } else {
            // A failed round is retried, twice at most, and counted in the report.
            let mut failed = 0;
            while p50.len() < super::ROUNDS && failed <= 2 {
                println!("latency {transport}: round {}, {rate:.0} msg/s", p50.len() + 1);
                if transport == "rabbitmq"
                    && let Err(error) = rabbitmq::purge_queue(&queue)
                {
                    failure = Some(format!("{error:#}"));
                    failed += 1;
                    continue;
                }
                let mut command = std::process::Command::new(&bench.exe);
                command.args([
                    "bench-worker",
                    &format!("{transport}-latency"),
                    &format!("{rate:.0}"),
                    &count.to_string(),
                    &queue,
                ]);
                let result = super::run_line(command, limit).and_then(|line| {
                    let value: serde_json::Value = serde_json::from_str(&line)?;
                    Ok((
                        value["p50_us"].as_f64().context("no p50_us")?,
                        value["p99_us"].as_f64().context("no p99_us")?,
                    ))
                });
                match result {
                    Ok((a, b)) => {
                        p50.push(a);
                        p99.push(b);
                    }
                    Err(error) => {
                        failure = Some(format!("{error:#}"));
                        failed += 1;
                    }
                }
            }
            report.meta(&format!("latency {transport} failed rounds"), failed.to_string());
            if transport == "rabbitmq" {
                rabbitmq::delete(&queue);
            }
        }
        for (key, rounds) in keys.iter().zip([p50, p99]) {
            if rounds.is_empty() {
                report.missing(key, "µs", failure.clone().unwrap_or_default());
            } else {
                report.figure(key, "µs", rounds);
            }
        }
        report.meta(&format!("latency rate {transport}"), format!("{rate:.0} msg/s"));
    }
}
