//! The queues steward declares, their names and their arguments.

use std::time::Duration;

use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection};
use tracing::{debug, info};

use crate::builder::Config;
use steward_core::ErrorKind;

use crate::error::{Error, inequivalent_argument, lapin_kind};

/// The delay buckets: an abandon with a delay waits in the smallest bucket at least as
/// long as the delay (at most the last one, 10 min).
pub const DELAY_BUCKETS: [Duration; 5] = [
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(30),
    Duration::from_secs(120),
    Duration::from_secs(600),
];

pub use steward_core::transport::dead_letter_queue;

/// The delay queue a message abandoned from `queue` with `delay` waits in:
/// `<queue>.delay.<ms>`, for the bucket [`delay_bucket`] picks.
#[must_use]
pub fn delay_queue(queue: &str, delay: Duration) -> String {
    format!("{queue}.delay.{}", delay_bucket(delay).as_millis())
}

/// The bucket a delay goes to: the smallest of [`DELAY_BUCKETS`] at least as long
/// (a delay is rounded up), or the longest for delays beyond it.
#[must_use]
pub fn delay_bucket(delay: Duration) -> Duration {
    DELAY_BUCKETS.iter().copied().find(|bucket| *bucket >= delay).unwrap_or(DELAY_BUCKETS[4])
}

fn short(text: &str) -> ShortString {
    // Argument names and queue types are constants well under 255 bytes.
    ShortString::from(text)
}

fn millis(duration: Duration) -> AMQPValue {
    AMQPValue::LongInt(i32::try_from(duration.as_millis()).unwrap_or(i32::MAX))
}

fn quorum(config: &Config) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(short("x-queue-type"), AMQPValue::LongString("quorum".into()));
    if let Some(expiry) = config.queue_expiry {
        args.insert(short("x-expires"), millis(expiry));
    }
    args
}

/// Dead-letters to `target` through the default exchange, at least once (quorum queues
/// keep a message until the target confirms it, which needs `reject-publish`).
fn dead_letter_to(args: &mut FieldTable, target: &str) {
    args.insert(short("x-dead-letter-exchange"), AMQPValue::LongString("".into()));
    args.insert(short("x-dead-letter-routing-key"), AMQPValue::LongString(target.into()));
    args.insert(short("x-dead-letter-strategy"), AMQPValue::LongString("at-least-once".into()));
    args.insert(short("x-overflow"), AMQPValue::LongString("reject-publish".into()));
}

/// The argument that gives a queue a single active consumer.
pub(crate) const SINGLE_ACTIVE_CONSUMER: &str = "x-single-active-consumer";

/// The arguments of a consumed (or published-to) queue: quorum, the broker-side
/// delivery limit, overflow to `<queue>.dlq`, and a single active consumer when
/// configured.
pub(crate) fn queue_arguments(config: &Config, queue: &str) -> FieldTable {
    let mut args = quorum(config);
    args.insert(
        short("x-delivery-limit"),
        AMQPValue::LongInt(i32::try_from(config.delivery_limit).unwrap_or(i32::MAX)),
    );
    dead_letter_to(&mut args, &dead_letter_queue(queue));
    if config.single_active.iter().any(|single| single == queue) {
        args.insert(short(SINGLE_ACTIVE_CONSUMER), AMQPValue::Boolean(true));
    }
    args
}

/// The arguments of a dead-letter queue: quorum, and a delivery limit so high it never
/// applies (RabbitMQ 4 gives quorum queues a default limit of 20, which reading the
/// dead letters back would use up).
pub(crate) fn dead_letter_arguments(config: &Config) -> FieldTable {
    let mut args = quorum(config);
    args.insert(short("x-delivery-limit"), AMQPValue::LongInt(i32::MAX));
    args
}

/// The arguments of a delay bucket: quorum, a queue-wide TTL (per-message TTLs would
/// wait behind the head of the queue), expired messages routed back to `queue`.
pub(crate) fn delay_arguments(config: &Config, queue: &str, bucket: Duration) -> FieldTable {
    let mut args = quorum(config);
    args.insert(short("x-message-ttl"), millis(bucket));
    dead_letter_to(&mut args, queue);
    args
}

/// Every queue the configuration needs, with its arguments, in declaration order
/// (targets before the queues that dead-letter into them).
pub(crate) fn plan(config: &Config) -> Vec<(String, FieldTable)> {
    let mut plan = Vec::new();
    for queue in config.queues.iter().chain(&config.publish_queues) {
        plan.push((dead_letter_queue(queue), dead_letter_arguments(config)));
        plan.push((queue.clone(), queue_arguments(config, queue)));
    }
    for queue in &config.queues {
        plan.extend(delay_plan(config, queue));
    }
    plan
}

/// The delay buckets of `queue`, with their arguments.
fn delay_plan(config: &Config, queue: &str) -> Vec<(String, FieldTable)> {
    DELAY_BUCKETS
        .into_iter()
        .map(|bucket| (delay_queue(queue, bucket), delay_arguments(config, queue, bucket)))
        .collect()
}

/// Declares the delay buckets of `queue`, idempotently: for a queue configured only for
/// publishing, once a source consumes it.
///
/// # Errors
///
/// [`Error::InequivalentArgument`] naming the queue and argument when a bucket exists
/// with other arguments; connection errors.
pub(crate) async fn declare_delay_buckets(
    connection: &Connection,
    config: &Config,
    queue: &str,
) -> Result<(), Error> {
    let channel = connection.create_channel().await.map_err(|source| {
        Error::lapin(format!("open a channel to declare the delay buckets of {queue}"), source)
    })?;
    for (bucket, args) in delay_plan(config, queue) {
        declare_one(&channel, &bucket, args).await?;
    }
    debug!(queue, "delay buckets declared for a queue consumed but configured for publishing");
    let _ = channel.close(200, "delay buckets declared".into()).await;
    Ok(())
}

/// Declares every queue of the configuration, idempotently, on a connection of its own.
///
/// # Errors
///
/// [`Error::InequivalentArgument`] naming the queue and argument when a queue exists
/// with other arguments; connection errors.
pub(crate) async fn declare(connection: &Connection, config: &Config) -> Result<(), Error> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|source| Error::lapin("open a channel to declare the topology", source))?;
    for (queue, args) in plan(config) {
        declare_one(&channel, &queue, args).await?;
    }
    info!(
        queues = ?config.queues,
        publish_queues = ?config.publish_queues,
        "rabbitmq topology declared"
    );
    let _ = channel.close(200, "topology declared".into()).await;
    Ok(())
}

/// Deletes every queue of the configuration, with its messages, and the delay buckets a
/// source declared for a publish queue; queues already gone are skipped.
///
/// # Errors
///
/// Connection errors; refusals other than a missing queue.
pub(crate) async fn delete(connection: &Connection, config: &Config) -> Result<(), Error> {
    let mut channel = None;
    let mut queues = plan(config);
    for queue in &config.publish_queues {
        queues.extend(delay_plan(config, queue));
    }
    for (queue, _) in queues.into_iter().rev() {
        let open = match channel.take() {
            Some(open) => open,
            None => connection
                .create_channel()
                .await
                .map_err(|source| Error::lapin("open a channel to delete the topology", source))?,
        };
        match open.queue_delete(short(&queue), QueueDeleteOptions::default()).await {
            Ok(_) => {
                debug!(queue, "queue deleted");
                channel = Some(open);
            }
            // A refused delete closes the channel; the next queue gets a new one.
            Err(source) if lapin_kind(&source) == ErrorKind::NotFound => {}
            Err(source) => return Err(Error::lapin(format!("delete queue {queue}"), source)),
        }
    }
    if let Some(open) = channel {
        let _ = open.close(200, "topology deleted".into()).await;
    }
    Ok(())
}

async fn declare_one(channel: &Channel, queue: &str, args: FieldTable) -> Result<(), Error> {
    let options = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    match channel.queue_declare(short(queue), options, args).await {
        Ok(_) => {
            debug!(queue, "queue declared");
            Ok(())
        }
        Err(source) => match inequivalent_argument(&source) {
            Some(argument) => Err(Error::InequivalentArgument {
                queue: queue.to_owned(),
                argument,
                source: Box::new(source),
            }),
            None => Err(Error::lapin(format!("declare queue {queue}"), source)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RabbitMqBuilder;

    #[test]
    fn delays_round_up_to_the_next_bucket_and_cap_at_ten_minutes() {
        assert_eq!(delay_bucket(Duration::from_millis(1)), Duration::from_secs(1));
        assert_eq!(delay_bucket(Duration::from_secs(1)), Duration::from_secs(1));
        assert_eq!(delay_bucket(Duration::from_millis(1001)), Duration::from_secs(5));
        assert_eq!(delay_bucket(Duration::from_secs(3)), Duration::from_secs(5));
        assert_eq!(delay_bucket(Duration::from_secs(31)), Duration::from_secs(120));
        assert_eq!(delay_bucket(Duration::from_secs(3600)), Duration::from_secs(600));
        assert_eq!(delay_queue("q", Duration::from_secs(4)), "q.delay.5000");
        assert_eq!(dead_letter_queue("q"), "q.dlq");
    }

    #[test]
    fn plan_declares_dlq_before_queue_and_buckets_only_for_consumed_queues() {
        let config = RabbitMqBuilder::new()
            .with_queue("in")
            .with_publish_queue("out")
            .build()
            .unwrap()
            .config()
            .clone();
        let names: Vec<_> = plan(&config).into_iter().map(|(name, _)| name).collect();
        assert_eq!(
            names,
            [
                "in.dlq",
                "in",
                "out.dlq",
                "out",
                "in.delay.1000",
                "in.delay.5000",
                "in.delay.30000",
                "in.delay.120000",
                "in.delay.600000"
            ]
        );
    }

    #[test]
    fn queue_arguments_are_quorum_with_delivery_limit_and_dlq_route() {
        let config =
            RabbitMqBuilder::new().with_max_deliveries(10).build().unwrap().config().clone();
        let args = queue_arguments(&config, "orders");
        let get = |key: &str| args.inner().get(key).cloned();
        assert_eq!(get("x-queue-type"), Some(AMQPValue::LongString("quorum".into())));
        assert_eq!(get("x-delivery-limit"), Some(AMQPValue::LongInt(20)));
        assert_eq!(
            get("x-dead-letter-routing-key"),
            Some(AMQPValue::LongString("orders.dlq".into()))
        );
        assert_eq!(get("x-expires"), None);
        assert_eq!(get(SINGLE_ACTIVE_CONSUMER), None);
        let single = RabbitMqBuilder::new()
            .with_queue("orders")
            .with_queue("other")
            .with_single_active_consumer("orders")
            .build()
            .unwrap()
            .config()
            .clone();
        let args = queue_arguments(&single, "orders");
        assert_eq!(args.inner().get(SINGLE_ACTIVE_CONSUMER), Some(&AMQPValue::Boolean(true)));
        let other = queue_arguments(&single, "other");
        assert_eq!(other.inner().get(SINGLE_ACTIVE_CONSUMER), None);
        // Its dead-letter queue and delay buckets are consumed by nobody but tools and
        // the broker: no single active consumer there.
        for (name, args) in plan(&single).into_iter().filter(|(name, _)| name != "orders") {
            assert_eq!(args.inner().get(SINGLE_ACTIVE_CONSUMER), None, "{name}");
        }

        let delay = delay_arguments(&config, "orders", Duration::from_secs(30));
        let get = |key: &str| delay.inner().get(key).cloned();
        assert_eq!(get("x-message-ttl"), Some(AMQPValue::LongInt(30_000)));
        assert_eq!(get("x-dead-letter-routing-key"), Some(AMQPValue::LongString("orders".into())));
        assert_eq!(get("x-delivery-limit"), None);
    }
}
