//! The transport's RabbitMQ specifics against the local broker: the declared topology,
//! "inequivalent arg" at start, named connections with heartbeats, the prefetch, the
//! broker-side delivery limit and the sink's reconnection.
//!
//! Without a reachable broker each test prints one skip line and passes, unless
//! `CI=true`, where it fails.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use steward_core::{ErrorKind, MessageSink, MessageSource, OutgoingMessage};
use steward_rabbitmq::{dead_letter_queue, delay_queue};
use tokio::time::{Instant, sleep};

use support::{PROMPTLY, receive_n, require_broker};

/// `rabbitmqctl list_queues name type` for the queues whose name starts with `prefix`.
fn queues_named(prefix: &str) -> Vec<(String, String)> {
    let output = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "--no-table-headers", "name", "type"])
        .output()
        .unwrap();
    let mut queues: Vec<_> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .filter(|(name, _)| name.starts_with(prefix))
        .map(|(name, kind)| (name.to_owned(), kind.trim().to_owned()))
        .collect();
    queues.sort();
    queues
}

/// Ensures that the topology is declared idempotently: every queue of DESIGN §4, all
/// quorum queues, and declaring again changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_declares_queue_dlq_and_delay_buckets_idempotently() {
    require_broker!("topology_declares_queue_dlq_and_delay_buckets_idempotently");
    let queue = support::TestQueue::declare("steward-topology", |b| b).await;
    queue.rabbit.declare_topology().await.unwrap();
    let mut expected: Vec<_> = [
        queue.name.clone(),
        dead_letter_queue(&queue.name),
        delay_queue(&queue.name, Duration::from_secs(1)),
        delay_queue(&queue.name, Duration::from_secs(5)),
        delay_queue(&queue.name, Duration::from_secs(30)),
        delay_queue(&queue.name, Duration::from_secs(120)),
        delay_queue(&queue.name, Duration::from_secs(600)),
    ]
    .into_iter()
    .map(|name| (name, "quorum".to_owned()))
    .collect();
    expected.sort();
    assert_eq!(queues_named(&queue.name), expected);
}

/// Ensures that a queue the service only publishes to is declared with its dead-letter
/// queue (and no delay buckets), so a first send finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_queue_is_declared_with_its_dead_letter_queue() {
    require_broker!("publish_queue_is_declared_with_its_dead_letter_queue");
    let target = steward_core::testkit::unique_name("steward-publish-only");
    let queue =
        support::TestQueue::declare("steward-topology-pub", |b| b.with_publish_queue(&target))
            .await;
    queue.rabbit.sink().send(&target, OutgoingMessage::json("{}")).await.unwrap();
    let declared: Vec<_> = queues_named(&target).into_iter().map(|(name, _)| name).collect();
    assert_eq!(declared, [target.clone(), dead_letter_queue(&target)]);
    assert_eq!(support::wait_until_depth(&target, 1, PROMPTLY).await, Some(1));
}

/// Ensures that a queue that exists with other arguments stops the start with an error
/// naming the queue and the argument: another delivery limit, or a classic queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_with_other_arguments_is_an_error_naming_queue_and_argument() {
    require_broker!("queue_with_other_arguments_is_an_error_naming_queue_and_argument");
    let queue = support::TestQueue::declare("steward-inequivalent", |b| b).await;
    let other = support::builder()
        .with_queue(&queue.name)
        .with_delivery_limit(queue.rabbit.delivery_limit() + 5)
        .build()
        .unwrap();
    let err = other.declare_topology().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Protocol);
    assert!(!err.is_retryable());
    let text = err.to_string();
    assert!(text.contains(&queue.name) && text.contains("x-delivery-limit"), "{text}");
    // A source of that transport does not start either.
    assert_eq!(other.source(&queue.name).await.unwrap_err().kind(), ErrorKind::Protocol);
    support::delete_topologies(vec![other]);

    // A classic queue of the same name (made by something else).
    let (classic, builder) = support::unique_queue("steward-classic");
    let connection =
        Connection::connect(&support::broker_url(), ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let options = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), lapin::types::AMQPValue::LongInt(600_000));
    channel.queue_declare(classic.as_str().into(), options, args).await.unwrap();
    let rabbit = builder.build().unwrap();
    let err = rabbit.declare_topology().await.unwrap_err();
    let text = err.to_string();
    // The broker names the first argument it finds different.
    let differing = ["x-queue-type", "x-dead-letter-exchange", "x-dead-letter-routing-key"];
    assert!(text.contains(&classic), "{text}");
    assert!(differing.iter().any(|arg| text.contains(&format!("different {arg} "))), "{text}");
    support::delete_topologies(vec![rabbit]);
    connection.close(200, "done".into()).await.unwrap();
}

/// Ensures that a source's connection is named after its queue (so operators and fault
/// tests can find it) and negotiates the configured heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_connection_is_named_after_its_queue_with_the_heartbeat() {
    require_broker!("source_connection_is_named_after_its_queue_with_the_heartbeat");
    let queue =
        support::TestQueue::declare("steward-named", |b| b.with_heartbeat(Duration::from_secs(3)))
            .await;
    let source = queue.rabbit.source(&queue.name).await.unwrap();
    let output = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "--no-table-headers", "timeout", "client_properties"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let ours: Vec<_> = stdout.lines().filter(|line| line.contains(&queue.name)).collect();
    assert_eq!(ours.len(), 1, "{stdout}");
    assert!(ours[0].starts_with("3\t"), "heartbeat timeout: {}", ours[0]);
    assert!(ours[0].contains(&format!("steward-test source {}", queue.name)), "{}", ours[0]);
    drop(source);
}

/// Ensures that the prefetch caps how many unsettled messages one consumer holds, so
/// a second consumer gets the next ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_caps_what_one_consumer_holds() {
    require_broker!("prefetch_caps_what_one_consumer_holds");
    let queue = support::TestQueue::declare("steward-prefetch", |b| b.with_prefetch(16)).await;
    let sink = queue.rabbit.sink();
    for i in 0..64 {
        sink.send(&queue.name, OutgoingMessage::new("x").with_message_id(format!("p-{i}")))
            .await
            .unwrap();
    }
    let first = queue.rabbit.source(&queue.name).await.unwrap();
    let held = receive_n(&first, 64, Duration::from_secs(3)).await;
    assert_eq!(held.len(), 16, "one consumer holds at most the prefetch");
    let second = queue.rabbit.source(&queue.name).await.unwrap();
    let more = receive_n(&second, 64, Duration::from_secs(3)).await;
    assert_eq!(more.len(), 16);
    for delivery in held.into_iter().chain(more) {
        delivery.complete().await.unwrap();
    }
    assert_eq!(support::wait_until_depth(&queue.name, 32, PROMPTLY).await, Some(32));
}

/// Ensures that a message requeued past the broker's `x-delivery-limit` lands in
/// `<queue>.dlq`, read back with reason `MaxDeliveryCountExceeded`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_dead_letters_past_the_delivery_limit() {
    require_broker!("broker_dead_letters_past_the_delivery_limit");
    let queue = support::TestQueue::declare("steward-limit", |b| {
        b.with_max_deliveries(1).with_delivery_limit(2)
    })
    .await;
    queue
        .rabbit
        .sink()
        .send(&queue.name, OutgoingMessage::new("poison").with_message_id("p"))
        .await
        .unwrap();
    let source = queue.rabbit.source(&queue.name).await.unwrap();
    let mut deliveries = 0;
    let deadline = Instant::now() + PROMPTLY;
    while Instant::now() < deadline {
        let batch = source.receive(1, Duration::from_secs(1)).await.unwrap();
        if batch.is_empty() && deliveries > 0 {
            break;
        }
        for delivery in batch {
            deliveries += 1;
            delivery.abandon(None).await.unwrap();
        }
    }
    assert_eq!(deliveries, 3, "delivered until the count passed the limit of 2");
    let dead = queue.rabbit.dead_letters(&queue.name).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, steward_core::transport::MAX_DELIVERY_COUNT_EXCEEDED);
    assert_eq!(dead[0].message.id, "p");
    assert_eq!(dead[0].message.body, "poison");
    // Reading the dead letters leaves them where they are.
    assert_eq!(queue.rabbit.dead_letters(&queue.name).await.unwrap().len(), 1);
}

/// Ensures that a sink whose connection was closed reports a retryable error at most
/// once, without hanging, and sends again on a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_reconnects_after_its_connection_is_closed() {
    require_broker!("sink_reconnects_after_its_connection_is_closed");
    let queue = support::TestQueue::declare("steward-sink", |b| b).await;
    // The sink's connection name carries the queue name, so the test can find it.
    let rabbit = support::builder()
        .with_connection_name(format!("steward-test {}", queue.name))
        .build()
        .unwrap();
    let sink = rabbit.sink();
    sink.send(&queue.name, OutgoingMessage::new("before").with_message_id("before")).await.unwrap();
    assert_eq!(support::close_connections_containing(&queue.name).await, 1);
    sleep(Duration::from_millis(200)).await;

    let first = tokio::time::timeout(
        PROMPTLY,
        sink.send(&queue.name, OutgoingMessage::new("a").with_message_id("a")),
    )
    .await
    .expect("a send on a closed connection hung");
    if let Err(error) = &first {
        assert!(error.is_retryable(), "{}", steward_core::error_chain(error));
    }
    sink.send(&queue.name, OutgoingMessage::new("b").with_message_id("b")).await.unwrap();
    let expected = if first.is_ok() { 3 } else { 2 };
    let source = queue.rabbit.source(&queue.name).await.unwrap();
    let got = receive_n(&source, expected, PROMPTLY).await;
    let ids: Vec<_> = got.iter().map(|d| d.message().id.clone()).collect();
    assert_eq!(ids.len(), expected, "{ids:?}");
    assert_eq!(ids.first().map(String::as_str), Some("before"));
    assert_eq!(ids.last().map(String::as_str), Some("b"));
}

/// Ensures that concurrent sends through one sink, half of them to a queue that does
/// not exist, each get their own result, even when the broker coalesces its publisher
/// confirms (a proxy acks every batch with one `multiple = true` ack): every send to
/// the missing queue is `NotFound`, every other one succeeds and arrives. lapin hands a
/// returned message to whichever confirm it resolves next, so publishes waiting on one
/// confirm channel together would swap results.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_sends_to_existing_and_missing_queues_each_get_their_own_result() {
    require_broker!("concurrent_sends_to_existing_and_missing_queues_each_get_their_own_result");
    const ROUNDS: usize = 10;
    const SENDS: usize = 32;
    let queue = support::TestQueue::declare("steward-mixed", |b| b).await;
    let missing = steward_core::testkit::unique_name("steward-mixed-missing");
    let proxy = support::CoalescingProxy::start().await;
    let rabbit = support::builder().with_url(proxy.url()).build().unwrap();
    let sink = rabbit.sink();
    let mut delivered = 0;
    for round in 0..ROUNDS {
        let sends = (0..SENDS).map(|i| {
            let target = if i % 2 == 0 { &queue.name } else { &missing };
            let message = OutgoingMessage::new("x").with_message_id(format!("m-{round}-{i}"));
            let sink = &sink;
            async move { (target, sink.send(target, message).await) }
        });
        for (target, result) in futures::future::join_all(sends).await {
            if *target == missing {
                let error = result.expect_err("a send to the missing queue succeeded");
                assert_eq!(
                    error.kind(),
                    ErrorKind::NotFound,
                    "{}",
                    steward_core::error_chain(&error)
                );
            } else {
                result.unwrap_or_else(|e| {
                    panic!("a send to an existing queue failed: {}", steward_core::error_chain(&e))
                });
                delivered += 1;
            }
        }
    }
    assert_eq!(delivered, ROUNDS * SENDS / 2);
    let expected = u64::try_from(delivered).unwrap();
    assert_eq!(support::wait_until_depth(&queue.name, expected, PROMPTLY).await, Some(expected));
}

/// Ensures that the dead-letter copy of a message published with a per-message TTL
/// (`expiration`) does not keep it, so it cannot expire out of `<queue>.dlq`, and keeps
/// the other properties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_copy_drops_the_message_ttl() {
    require_broker!("dead_letter_copy_drops_the_message_ttl");
    let queue = support::TestQueue::declare("steward-ttl", |b| b).await;
    let connection =
        Connection::connect(&support::broker_url(), ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let properties = BasicProperties::default()
        .with_message_id("ttl".into())
        .with_reply_to("replies".into())
        .with_expiration("600000".into());
    let options = BasicPublishOptions { mandatory: true, immediate: false };
    let confirm = channel
        .basic_publish("".into(), queue.name.as_str().into(), options, b"x", properties)
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(confirm, lapin::Confirmation::Ack(None));

    let source = queue.rabbit.source(&queue.name).await.unwrap();
    let delivery = receive_n(&source, 1, PROMPTLY).await.pop().expect("the message arrives");
    delivery.dead_letter("Expiring", "must stay").await.unwrap();
    let dlq = dead_letter_queue(&queue.name);
    let got = channel
        .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the confirmed copy is in the dead-letter queue");
    let copy = &got.delivery.properties;
    assert_eq!(copy.expiration(), &None);
    assert_eq!(copy.message_id().as_ref().map(|id| id.as_str()), Some("ttl"));
    assert_eq!(copy.reply_to().as_ref().map(|to| to.as_str()), Some("replies"));
    connection.close(200, "done".into()).await.unwrap();
}

/// Ensures that a source of a queue configured only for publishing (as a simulator
/// consuming what the service publishes) declares that queue's delay buckets, so a
/// delayed abandon works, and that deleting the topology removes them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_of_a_publish_queue_declares_its_delay_buckets() {
    require_broker!("source_of_a_publish_queue_declares_its_delay_buckets");
    let target = steward_core::testkit::unique_name("steward-publish-consumed");
    let queue =
        support::TestQueue::declare("steward-topology-pc", |b| b.with_publish_queue(&target)).await;
    let declared: Vec<_> = queues_named(&target).into_iter().map(|(name, _)| name).collect();
    assert_eq!(declared, [target.clone(), dead_letter_queue(&target)]);

    let source = queue.rabbit.source(&target).await.unwrap();
    let mut expected: Vec<_> = [1, 5, 30, 120, 600]
        .into_iter()
        .map(|secs| delay_queue(&target, Duration::from_secs(secs)))
        .chain([target.clone(), dead_letter_queue(&target)])
        .map(|name| (name, "quorum".to_owned()))
        .collect();
    expected.sort();
    assert_eq!(queues_named(&target), expected);

    queue
        .rabbit
        .sink()
        .send(&target, OutgoingMessage::new("x").with_message_id("d"))
        .await
        .unwrap();
    let first = receive_n(&source, 1, PROMPTLY).await.pop().expect("the message arrives");
    first.abandon(Some(Duration::from_secs(1))).await.unwrap();
    let again = receive_n(&source, 1, PROMPTLY).await.pop().expect("the delayed message returns");
    assert_eq!((again.message().id.as_str(), again.message().delivery_count), ("d", 2));
    again.complete().await.unwrap();
    drop(source);

    queue.rabbit.delete_topology().await.unwrap();
    assert_eq!(queues_named(&target), []);
}
