//! RabbitMQ: steward's Updater and `MessageSink` against raw lapin on the same quorum
//! queue (the one steward-rabbitmq declares), with the same persistent JSON
//! deployment-status messages.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use steward_core::{
    Handler, MessageSink, Outcome, OutgoingMessage, Supervisor, SupervisorConfig, Updater,
    UpdaterConfig, handler_fn,
};
use steward_rabbitmq::{RabbitMq, RabbitMqBuilder};
use tokio::sync::Notify;

use super::worker::{Sample, Window};

/// The broker the benchmark uses: `STEWARD_BENCH_AMQP_URL`, else the local default.
pub(crate) fn url() -> String {
    std::env::var("STEWARD_BENCH_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// Messages each side keeps in flight: the consumers' prefetch and the publishers'
/// confirm window.
pub(crate) const PREFETCH: u16 = 256;
pub(crate) const PUBLISH_WINDOW: usize = 1024;

/// A deployment-status message of about 300 bytes, as the resource processor sends.
pub(crate) fn body(n: usize) -> Vec<u8> {
    format!(
        "{{\"operationId\":\"{n:08}-aaaa-bbbb-cccc-dddddddddddd\",\"stepId\":\"main\",\"id\":\"res-{n}\",\"status\":\"deployed\",\"message\":\"install action completed successfully for resource {n}\",\"outputs\":[{{\"name\":\"address\",\"value\":\"10.0.0.1\",\"type\":\"string\"}}]}}"
    )
    .into_bytes()
}

/// The message id of message `n`, UUID-shaped. Every publisher sets it, as TRE's
/// publisher contract asks: a message without one would cost the steward consumer a
/// random UUID (a `getrandom` system call) that the raw consumers never pay.
pub(crate) fn message_id(n: usize) -> String {
    format!("{n:08x}-0000-4000-8000-000000000000")
}

/// The steward transport for `queue`: its quorum queue and topology, expiring if the
/// benchmark dies before it deletes them.
pub(crate) fn transport(queue: &str) -> Result<RabbitMq> {
    transport_named(queue, "steward-bench", 8)
}

/// [`transport`] with connections named after `name`, for an Updater of `concurrency`.
pub(crate) fn transport_named(queue: &str, name: &str, concurrency: usize) -> Result<RabbitMq> {
    RabbitMqBuilder::new()
        .with_url(url())
        .with_connection_name(name)
        .with_queue(queue)
        .with_concurrency(concurrency)
        .with_prefetch(PREFETCH)
        .with_queue_expiry(Duration::from_secs(900))
        .build()
        .context("configuring the RabbitMQ transport")
}

fn parse(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| v.is_object())
}

async fn connect() -> Result<Connection> {
    Connection::connect(
        &url(),
        ConnectionProperties::default().with_connection_name("steward-bench-raw".into()),
    )
    .await
    .context("connecting to RabbitMQ")
}

/// How many sends steward-rabbitmq's sink has waiting for confirms at most (one per
/// confirm channel, `PUBLISH_CHANNELS` there): the window of the raw baseline that shows
/// what that limit costs.
pub(crate) const SINK_IN_FLIGHT: usize = 128;

/// Raw lapin publishing `count` persistent messages with confirms, `window` in flight.
pub(crate) async fn publish_raw(queue: &str, count: usize, in_flight: usize) -> Result<Sample> {
    let connection = connect().await?;
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let bodies: Vec<Vec<u8>> = (0..count).map(body).collect();
    let window = Window::start();
    let mut pending = FuturesUnordered::new();
    for (n, body) in bodies.iter().enumerate() {
        if pending.len() >= in_flight {
            check_confirm(pending.next().await)?;
        }
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions { mandatory: true, immediate: false },
                body,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into())
                    .with_message_id(message_id(n).into()),
            )
            .await?;
        pending.push(confirm);
    }
    while let Some(result) = pending.next().await {
        check_confirm(Some(result))?;
    }
    let sample = window.finish(count);
    let _ = connection.close(200, "done".into()).await;
    Ok(sample)
}

fn check_confirm(result: Option<lapin::Result<lapin::Confirmation>>) -> Result<()> {
    match result {
        Some(Ok(lapin::Confirmation::Ack(None))) => Ok(()),
        Some(Ok(confirmation)) => bail!("a publish was not confirmed: {confirmation:?}"),
        Some(Err(error)) => Err(error.into()),
        None => bail!("no confirm pending"),
    }
}

/// steward's `MessageSink::send`, `PUBLISH_WINDOW` sends in flight.
pub(crate) async fn publish_sink(queue: &str, count: usize) -> Result<Sample> {
    let rabbit = transport(queue)?;
    let sink = rabbit.sink();
    let messages: Vec<OutgoingMessage> =
        (0..count).map(|n| OutgoingMessage::json(body(n)).with_message_id(message_id(n))).collect();
    // The first send opens the connection and channels; it is not measured, as the raw
    // client's connect is not.
    let first = OutgoingMessage::json(body(count)).with_message_id(message_id(count));
    sink.send(queue, first).await.context("first send")?;
    let window = Window::start();
    let results: Vec<_> = futures::stream::iter(messages)
        .map(|message| {
            let sink = &sink;
            async move { sink.send(queue, message).await }
        })
        .buffer_unordered(PUBLISH_WINDOW)
        .collect()
        .await;
    let sample = window.finish(count);
    for result in results {
        result.context("a send failed")?;
    }
    Ok(sample)
}

/// Raw lapin consuming `count` messages, parsing each, acking every `ack_every`th with
/// `multiple` (1: each on its own).
pub(crate) async fn consume_raw(queue: &str, count: usize, ack_every: u64) -> Result<Sample> {
    let connection = connect().await?;
    let channel = connection.create_channel().await?;
    channel.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "steward-bench-raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut window = None;
    let mut got = 0;
    while got < count {
        let delivery = consumer.next().await.context("the consumer ended")??;
        window.get_or_insert_with(Window::start);
        if !parse(&delivery.data) {
            bail!("a message is not a JSON object");
        }
        got += 1;
        if delivery.delivery_tag % ack_every == 0 || got == count {
            channel
                .basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: ack_every > 1 })
                .await?;
        }
    }
    let sample = window.context("no message")?.finish(count);
    let _ = connection.close(200, "done".into()).await;
    Ok(sample)
}

/// steward's Updater (concurrency 8, batch 64) with a JSON-parsing handler.
pub(crate) async fn consume_updater(queue: &str, count: usize) -> Result<Sample> {
    let rabbit = transport(queue)?;
    let handled = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(Notify::new());
    let first: Arc<OnceLock<Window>> = Arc::default();
    let handler = {
        let (handled, finished, first) = (handled.clone(), finished.clone(), first.clone());
        handler_fn(move |message| {
            first.get_or_init(Window::start);
            let outcome = if parse(&message.body) {
                Outcome::Complete
            } else {
                Outcome::DeadLetter {
                    reason: "MessageFormatIncorrect".into(),
                    description: "not a JSON object".into(),
                }
            };
            if handled.fetch_add(1, Ordering::Relaxed) + 1 == count {
                finished.notify_one();
            }
            async move { outcome }
        })
    };
    let supervisor = spawn_updater(&rabbit, queue, handler, 8);
    finished.notified().await;
    let sample = first.get().copied().context("no message")?.finish(count);
    let _ = supervisor.shutdown(tokio::time::Instant::now() + Duration::from_secs(10)).await;
    Ok(sample)
}

/// A supervisor running the benchmark's Updater (`concurrency`, batches of 64) with
/// `handler` on `queue`.
pub(crate) fn spawn_updater(
    rabbit: &RabbitMq,
    queue: &str,
    handler: impl Handler,
    concurrency: usize,
) -> Supervisor {
    spawn_supervised(SupervisorConfig::default(), rabbit, queue, handler, concurrency)
}

/// [`spawn_updater`] under a supervisor of `config`.
pub(crate) fn spawn_supervised(
    config: SupervisorConfig,
    rabbit: &RabbitMq,
    queue: &str,
    handler: impl Handler,
    concurrency: usize,
) -> Supervisor {
    let connect = {
        let (rabbit, queue) = (rabbit.clone(), queue.to_owned());
        move || {
            let (rabbit, queue) = (rabbit.clone(), queue.clone());
            async move { rabbit.source(&queue).await }
        }
    };
    let supervisor = Supervisor::new(config);
    supervisor.spawn(
        Updater::new("bench", connect, handler).with_config(
            UpdaterConfig::default().with_concurrency(concurrency).with_batch_size(64),
        ),
    );
    supervisor
}

/// Runs `f` on a small runtime of the orchestrator (declaring and deleting topology,
/// publishing).
pub(crate) fn block_on<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("could not start a tokio runtime")?
        .block_on(f)
}

/// Empties `queue`.
async fn purge(queue: &str) -> Result<()> {
    let connection = connect().await?;
    let channel = connection.create_channel().await?;
    channel.queue_purge(queue.into(), lapin::options::QueuePurgeOptions::default()).await?;
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

/// A queue name of this run alone.
pub(crate) fn unique_queue(what: &str) -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("steward-bench-{what}-{}-{millis}", std::process::id())
}

/// The RabbitMQ figures: per round, raw lapin publishes, then each consumer drains the
/// same `count` messages from the same quorum queue in its own process; the sink's
/// publish fills the queue for one of them.
pub(super) fn bench(
    bench: &super::Bench,
    peers: &super::python::Peers,
    report: &mut super::Report,
) {
    let count = if bench.quick { 20_000 } else { 100_000 };
    let n = count.to_string();
    let limit = Duration::from_secs(if bench.quick { 120 } else { 600 });
    let queue = unique_queue("consume");
    let keys = [
        "publish.raw",
        "publish.sink",
        "consume.raw-ack1",
        "consume.raw-ack32",
        "consume.updater",
        "consume.aio-pika",
        "consume.faststream",
        "publish.raw-window128",
    ];
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); keys.len()];
    let mut failures: Vec<Option<String>> = vec![None; keys.len()];
    if let Err(error) = block_on(async { Ok(transport(&queue)?.declare_topology().await?) }) {
        for key in keys {
            report.missing(&format!("rabbitmq.{key}.rate"), "msg/s", format!("{error:#}"));
        }
        return;
    }
    let mut record = |index: usize, result: Result<Sample>| match result {
        Ok(sample) => samples[index].push(sample),
        Err(error) => {
            eprintln!("rabbitmq {}: {error:#}", keys[index]);
            failures[index] = Some(format!("{error:#}"));
        }
    };
    for round in 0..super::ROUNDS {
        println!("rabbitmq: round {} of {count} messages", round + 1);
        // Each consumer starts on a full queue of the same messages; a failed fill skips it.
        let fill = |bench: &super::Bench| {
            // A message a consumer left unacked would otherwise reach the next one.
            block_on(purge(&queue))?;
            bench.worker(&["rabbitmq-publish-raw", &queue, &n], limit)
        };
        let filled = fill(bench);
        let ok = filled.is_ok();
        record(0, filled);
        if ok {
            record(2, bench.worker(&["rabbitmq-consume-raw", &queue, &n, "1"], limit));
        }
        let filled = block_on(purge(&queue))
            .and_then(|()| bench.worker(&["rabbitmq-publish-sink", &queue, &n], limit));
        let ok = filled.is_ok();
        record(1, filled);
        if ok {
            record(3, bench.worker(&["rabbitmq-consume-raw", &queue, &n, "32"], limit));
        }
        let filled = fill(bench);
        let ok = filled.is_ok();
        record(0, filled);
        if ok {
            record(4, bench.worker(&["rabbitmq-consume-updater", &queue, &n], limit));
        }
        // Raw lapin with the sink's limit of sends in flight.
        let window = SINK_IN_FLIGHT.to_string();
        let published = block_on(purge(&queue))
            .and_then(|()| bench.worker(&["rabbitmq-publish-raw", &queue, &n, &window], limit));
        record(7, published);
        for (index, peer) in [(5, "aio-pika"), (6, "faststream")] {
            if peers.available().is_err() {
                continue;
            }
            let filled = fill(bench);
            let ok = filled.is_ok();
            record(0, filled);
            if ok {
                record(index, peers.consume(peer, &url(), &queue, count, limit));
            }
        }
    }
    if let Err(error) = block_on(async { Ok(transport(&queue)?.delete_topology().await?) }) {
        eprintln!("could not delete the benchmark's queue {queue}: {error:#}");
    }
    for (index, key) in keys.iter().enumerate() {
        let key = format!("rabbitmq.{key}");
        if !samples[index].is_empty() {
            report.samples(&key, &samples[index]);
        } else if (5..=6).contains(&index)
            && let Err(reason) = peers.available()
        {
            report.missing(&format!("{key}.rate"), "msg/s", reason);
        } else {
            let reason = failures[index].clone().unwrap_or_else(|| "not run".to_owned());
            report.missing(&format!("{key}.rate"), "msg/s", reason);
        }
    }
    report.ratio("rabbitmq.publish.sink.rate", "rabbitmq.publish.raw.rate");
    report.ratio("rabbitmq.publish.sink.rate", "rabbitmq.publish.raw-window128.rate");
    for other in ["raw-ack1", "raw-ack32", "aio-pika", "faststream"] {
        report.ratio("rabbitmq.consume.updater.rate", &format!("rabbitmq.consume.{other}.rate"));
        report.ratio("rabbitmq.consume.updater.cpu", &format!("rabbitmq.consume.{other}.cpu"));
    }
}

/// Empties `queue`, from the orchestrator.
pub(crate) fn purge_queue(queue: &str) -> Result<()> {
    block_on(purge(queue))
}

/// Declares the steward topology of `queue`.
pub(crate) fn declare(queue: &str) -> Result<()> {
    block_on(async { Ok(transport(queue)?.declare_topology().await?) })
}

/// Deletes the steward topology of `queue`, reporting a failure on stderr.
pub(crate) fn delete(queue: &str) {
    if let Err(error) = block_on(async { Ok(transport(queue)?.delete_topology().await?) }) {
        eprintln!("could not delete the benchmark's queue {queue}: {error:#}");
    }
}

/// The messages ready in `queue` (a passive declare).
pub(crate) fn depth(queue: &str) -> Result<u32> {
    block_on(async {
        let connection = connect().await?;
        let channel = connection.create_channel().await?;
        let options = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
        let declared = channel.queue_declare(queue.into(), options, FieldTable::default()).await?;
        let _ = connection.close(200, "done".into()).await;
        Ok(declared.message_count())
    })
}
