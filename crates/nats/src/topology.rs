//! The streams and consumers of each queue: declared, and checked when they exist.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PriorityPolicy, pull};
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, Context};
use steward_core::transport::dead_letter_queue;

use crate::builder::{CONSUMER_NAME, Config};
use crate::error::Error;

/// How long a stream remembers message ids to drop a second publish of one: the
/// server's default, declared so that a stream with another window is noticed.
pub(crate) const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// The stream holding `queue`: `<prefix>_<queue>`, dots made underscores.
pub(crate) fn stream_name(config: &Config, queue: &str) -> String {
    format!("{}_{}", config.stream_prefix, queue.replace('.', "_"))
}

/// The stream holding the dead letters of `queue`: `<prefix>_<queue>_DLQ`.
pub(crate) fn dead_letter_stream_name(config: &Config, queue: &str) -> String {
    format!("{}_DLQ", stream_name(config, queue))
}

/// The work-queue stream of `queue`.
fn queue_stream(config: &Config, queue: &str) -> stream::Config {
    stream::Config {
        name: stream_name(config, queue),
        subjects: vec![queue.to_owned()],
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        num_replicas: 1,
        discard: DiscardPolicy::Old,
        duplicate_window: DUPLICATE_WINDOW,
        ..Default::default()
    }
}

/// The stream of `<queue>.dlq`: kept until an operator removes the messages.
fn dead_letter_stream(config: &Config, queue: &str) -> stream::Config {
    stream::Config {
        name: dead_letter_stream_name(config, queue),
        subjects: vec![dead_letter_queue(queue)],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        num_replicas: 1,
        discard: DiscardPolicy::Old,
        duplicate_window: DUPLICATE_WINDOW,
        ..Default::default()
    }
}

/// The durable pull consumer of `queue`.
pub(crate) fn consumer(config: &Config, queue: &str) -> pull::Config {
    pull::Config {
        durable_name: Some(CONSUMER_NAME.to_owned()),
        filter_subject: queue.to_owned(),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: config.ack_wait,
        max_deliver: i64::from(config.max_deliver),
        max_ack_pending: config.max_ack_pending,
        ..Default::default()
    }
}

/// Declares the two streams of every configured queue and the consumer of every
/// consumed queue, checking those that exist.
pub(crate) async fn declare(js: &Context, config: &Config) -> Result<(), Error> {
    for queue in config.queues.iter().chain(&config.publish_queues) {
        declare_streams(js, config, queue).await?;
    }
    for queue in &config.queues {
        declare_consumer(js, config, queue).await?;
    }
    Ok(())
}

/// Declares (or checks) the queue stream and the dead-letter stream of `queue`.
pub(crate) async fn declare_streams(
    js: &Context,
    config: &Config,
    queue: &str,
) -> Result<(), Error> {
    for wanted in [queue_stream(config, queue), dead_letter_stream(config, queue)] {
        let name = wanted.name.clone();
        let mut stream = js
            .get_or_create_stream(wanted.clone())
            .await
            .map_err(|e| Error::jetstream(format!("declare stream {name}"), e))?;
        let info =
            stream.info().await.map_err(|e| Error::jetstream(format!("read stream {name}"), e))?;
        check_stream(&wanted, &info.config)?;
    }
    Ok(())
}

/// Declares (or checks) the durable consumer of `queue`, whose stream must exist.
pub(crate) async fn declare_consumer(
    js: &Context,
    config: &Config,
    queue: &str,
) -> Result<jetstream::consumer::PullConsumer, Error> {
    let stream_name = stream_name(config, queue);
    let stream = js
        .get_stream_no_info(&stream_name)
        .await
        .map_err(|e| Error::jetstream(format!("open stream {stream_name}"), e))?;
    let wanted = consumer(config, queue);
    let mut consumer = stream
        .get_or_create_consumer(CONSUMER_NAME, wanted.clone())
        .await
        .map_err(|e| not_found_or(e, &format!("stream {stream_name}"), "declare consumer"))?;
    let info = consumer.info().await.map_err(|e| {
        Error::jetstream(format!("read consumer {CONSUMER_NAME} of {stream_name}"), e)
    })?;
    check_consumer(
        &format!("consumer {CONSUMER_NAME} of stream {stream_name}"),
        &wanted,
        &info.config,
    )?;
    Ok(consumer)
}

/// `NotFound` when the error says the stream does not exist, else a JetStream error.
fn not_found_or(
    error: impl std::error::Error + Send + Sync + 'static,
    entity: &str,
    what: &str,
) -> Error {
    let text = error.to_string();
    if text.contains("stream not found") || text.contains("10059") {
        Error::NotFound { entity: entity.to_owned(), source: Some(error.into()) }
    } else {
        Error::jetstream(format!("{what} of {entity}"), error)
    }
}

/// Deletes the two streams of every configured queue (and so their consumers).
pub(crate) async fn delete(js: &Context, config: &Config) -> Result<(), Error> {
    for queue in config.queues.iter().chain(&config.publish_queues) {
        for name in [stream_name(config, queue), dead_letter_stream_name(config, queue)] {
            match js.delete_stream(&name).await {
                Ok(_) => {}
                Err(e) if e.to_string().contains("stream not found") => {}
                Err(e) => return Err(Error::jetstream(format!("delete stream {name}"), e)),
            }
        }
    }
    Ok(())
}

fn mismatch(entity: &str, setting: &'static str, expected: String, actual: String) -> Error {
    Error::Mismatch { entity: entity.to_owned(), setting, expected, actual }
}

/// Checks the settings steward relies on; the first that differs stops the start.
fn check_stream(wanted: &stream::Config, actual: &stream::Config) -> Result<(), Error> {
    let entity = format!("stream {}", wanted.name);
    let mut wanted_subjects = wanted.subjects.clone();
    let mut actual_subjects = actual.subjects.clone();
    wanted_subjects.sort();
    actual_subjects.sort();
    if wanted_subjects != actual_subjects {
        return Err(mismatch(
            &entity,
            "subjects",
            format!("{wanted_subjects:?}"),
            format!("{actual_subjects:?}"),
        ));
    }
    if wanted.retention != actual.retention {
        return Err(mismatch(
            &entity,
            "retention",
            format!("{:?}", wanted.retention),
            format!("{:?}", actual.retention),
        ));
    }
    if wanted.storage != actual.storage {
        return Err(mismatch(
            &entity,
            "storage",
            format!("{:?}", wanted.storage),
            format!("{:?}", actual.storage),
        ));
    }
    if wanted.discard != actual.discard {
        return Err(mismatch(
            &entity,
            "discard",
            format!("{:?}", wanted.discard),
            format!("{:?}", actual.discard),
        ));
    }
    // Any limit makes the server drop stored messages (or refuse new ones) that no
    // consumer has settled, while their publishers were told they were stored.
    let limits = [
        (
            "max_msgs_per_subject",
            actual.max_messages_per_subject > 0,
            actual.max_messages_per_subject.to_string(),
        ),
        ("max_msgs", actual.max_messages > 0, actual.max_messages.to_string()),
        ("max_bytes", actual.max_bytes > 0, actual.max_bytes.to_string()),
        ("max_age", actual.max_age != Duration::ZERO, format!("{:?}", actual.max_age)),
    ];
    if let Some((setting, _, value)) = limits.into_iter().find(|(_, limited, _)| *limited) {
        return Err(mismatch(&entity, setting, "unlimited".to_owned(), value));
    }
    if actual.discard_new_per_subject {
        return Err(mismatch(
            &entity,
            "discard_new_per_subject",
            "false".to_owned(),
            "true".to_owned(),
        ));
    }
    // A longer window drops more reused ids; a shorter one stores a resend twice.
    if wanted.duplicate_window != actual.duplicate_window {
        return Err(mismatch(
            &entity,
            "duplicate_window",
            format!("{:?}", wanted.duplicate_window),
            format!("{:?}", actual.duplicate_window),
        ));
    }
    // Without publish acks every send times out, and is sent again.
    if actual.no_ack {
        return Err(mismatch(&entity, "no_ack", "false".to_owned(), "true".to_owned()));
    }
    // A transform stores messages under another subject, which the queue's consumer
    // (filtered on the queue) never delivers, while every publish is acked.
    if let Some(transform) = &actual.subject_transform {
        return Err(mismatch(
            &entity,
            "subject_transform",
            "none".to_owned(),
            format!("{} -> {}", transform.source, transform.destination),
        ));
    }
    Ok(())
}

fn check_consumer(
    entity: &str,
    wanted: &pull::Config,
    actual: &jetstream::consumer::Config,
) -> Result<(), Error> {
    // Headers only: every delivery comes without its body.
    if actual.headers_only {
        return Err(mismatch(entity, "headers_only", "false".to_owned(), "true".to_owned()));
    }
    // A backoff replaces `ack_wait` between redeliveries (and the server reports its
    // first step as `ack_wait`): the lock is no longer the one the sources count.
    if !actual.backoff.is_empty() {
        return Err(mismatch(
            entity,
            "backoff",
            "none".to_owned(),
            format!("{:?}", actual.backoff),
        ));
    }
    // Paused: nothing is delivered until then, while messages wait.
    if let Some(until) = actual.pause_until {
        return Err(mismatch(entity, "pause_until", "none".to_owned(), until.to_string()));
    }
    // Priority groups: every pull without one (as steward's are) is refused.
    if actual.priority_policy != PriorityPolicy::None || !actual.priority_groups.is_empty() {
        return Err(mismatch(
            entity,
            "priority_policy",
            format!("{:?}", PriorityPolicy::None),
            format!("{:?} {:?}", actual.priority_policy, actual.priority_groups),
        ));
    }
    // A limit on how long a pull may wait: every receive waiting longer is refused.
    if actual.max_expires != Duration::ZERO {
        return Err(mismatch(
            entity,
            "max_expires",
            "unlimited".to_owned(),
            format!("{:?}", actual.max_expires),
        ));
    }
    if wanted.filter_subject != actual.filter_subject {
        return Err(mismatch(
            entity,
            "filter_subject",
            wanted.filter_subject.clone(),
            actual.filter_subject.clone(),
        ));
    }
    if wanted.ack_policy != actual.ack_policy {
        return Err(mismatch(
            entity,
            "ack_policy",
            format!("{:?}", wanted.ack_policy),
            format!("{:?}", actual.ack_policy),
        ));
    }
    if wanted.ack_wait != actual.ack_wait {
        return Err(mismatch(
            entity,
            "ack_wait",
            format!("{:?}", wanted.ack_wait),
            format!("{:?}", actual.ack_wait),
        ));
    }
    if wanted.max_deliver != actual.max_deliver {
        return Err(mismatch(
            entity,
            "max_deliver",
            wanted.max_deliver.to_string(),
            actual.max_deliver.to_string(),
        ));
    }
    if wanted.deliver_policy != actual.deliver_policy {
        return Err(mismatch(
            entity,
            "deliver_policy",
            format!("{:?}", wanted.deliver_policy),
            format!("{:?}", actual.deliver_policy),
        ));
    }
    Ok(())
}
