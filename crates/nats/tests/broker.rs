//! Behaviour beyond the conformance suite, against the local NATS server: many sends in
//! flight, messages from plain NATS publishers, and the declared consumer's settings.
//! Each test uses streams of its own and deletes them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;
use std::time::Duration;

use steward_core::{MessageSink, MessageSource, OutgoingMessage};
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_sends_in_flight_are_each_acked_and_stored_once() {
    let Some(support::Declared { queue, nats, _cleanup, .. }) =
        support::declared("many_sends_in_flight", "inflight").await
    else {
        return;
    };
    let sink = nats.sink();
    let sends = (0..200).map(|i| {
        let sink = sink.clone();
        let queue = queue.clone();
        async move {
            sink.send(&queue, OutgoingMessage::new("b").with_message_id(format!("m{i}"))).await
        }
    });
    for sent in futures::future::join_all(sends).await {
        sent.unwrap();
    }
    // A repeated id within the duplicate window is stored once: a resend after a lost
    // publish ack must not store the message twice (see the duplicate test below).
    sink.send(&queue, OutgoingMessage::new("again").with_message_id("m0")).await.unwrap();

    let source = nats.source(&queue).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut ids = HashSet::new();
    while ids.len() < 200 && Instant::now() < deadline {
        for delivery in source.receive(100, Duration::from_millis(500)).await.unwrap() {
            assert!(ids.insert(delivery.message().id.clone()), "{:?} twice", delivery.message().id);
            delivery.complete().await.unwrap();
        }
    }
    assert_eq!(ids.len(), 200);
    let rest = source.receive(10, Duration::from_secs(1)).await.unwrap();
    assert!(rest.is_empty(), "the duplicate was stored: {rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_without_an_id_keeps_the_one_handlers_saw_into_the_dead_letter_queue() {
    let Some(support::Declared { url, queue, nats, _cleanup }) =
        support::declared("message_without_an_id", "noid").await
    else {
        return;
    };
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    js.publish(queue.clone(), "plain".into()).await.unwrap().await.unwrap();

    let source = nats.source(&queue).await.unwrap();
    let delivery = source.receive(1, Duration::from_secs(5)).await.unwrap().pop().unwrap();
    let id = delivery.message().id.clone();
    assert_eq!(id, format!("{queue}-1"), "queue and stream sequence");
    assert_eq!(delivery.message().session_id, None);
    assert!(delivery.message().properties.is_empty(), "{:?}", delivery.message());
    delivery.dead_letter("Poison: ünïcode", "line one\r\nline two, 100%").await.unwrap();

    let dead = nats.dead_letters(&queue).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message.id, id);
    assert_eq!(dead[0].message.body, "plain");
    assert_eq!(dead[0].reason, "Poison: ünïcode");
    assert_eq!(dead[0].description, "line one\r\nline two, 100%", "percent-encoded in the header");
    assert_eq!(dead[0].message.delivery_count, 1, "the count when dead-lettered");
    assert!(dead[0].message.properties.is_empty(), "no bookkeeping as properties: {:?}", dead[0]);
}

/// Ensures that a message published with headers the server acts on (here an expected
/// stream, which names the queue's own stream) still reaches the dead-letter queue: the
/// copy leaves them out, or the server would refuse it every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_copy_leaves_out_the_headers_the_server_acts_on() {
    let Some(support::Declared { url, queue, nats, _cleanup }) =
        support::declared("server_control_headers", "ctl").await
    else {
        return;
    };
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Expected-Stream", nats.stream_name(&queue).as_str());
    headers.insert("custom", "kept");
    js.publish_with_headers(queue.clone(), headers, "body".into()).await.unwrap().await.unwrap();

    let source = nats.source(&queue).await.unwrap();
    let delivery = source.receive(1, Duration::from_secs(5)).await.unwrap().pop().unwrap();
    delivery.dead_letter("Poison", "refused").await.unwrap();

    let dead = nats.dead_letters(&queue).await.unwrap();
    assert_eq!(dead.len(), 1, "the copy was stored");
    assert_eq!(dead[0].reason, "Poison");
    assert_eq!(dead[0].message.properties.get("custom").map(String::as_str), Some("kept"));
    assert!(
        !dead[0].message.properties.keys().any(|k| k.eq_ignore_ascii_case("nats-expected-stream")),
        "{:?}",
        dead[0].message.properties
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_stops_delivering_only_above_the_updaters_limit() {
    if !support::server_available("consumer_limit").await {
        return;
    }
    let url = support::server_url();
    let (queue, builder) = support::unique_queue(&url, "limit");
    let nats = builder.with_max_deliveries(3).build().unwrap();
    let _cleanup = support::Cleanup(nats.clone());
    nats.declare_topology().await.unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let stream = js.get_stream(nats.stream_name(&queue)).await.unwrap();
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer(steward_nats::CONSUMER_NAME).await.unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(info.config.max_deliver, 13, "max_deliveries + 10");
    assert_eq!(info.config.ack_wait, support::ACK_WAIT);

    nats.sink().send(&queue, OutgoingMessage::new("b").with_message_id("counted")).await.unwrap();
    let source = nats.source(&queue).await.unwrap();
    for expected in 1..=4 {
        let delivery = source.receive(1, Duration::from_secs(5)).await.unwrap().pop().unwrap();
        assert_eq!(delivery.message().delivery_count, expected);
        if expected < 4 {
            delivery.abandon(None).await.unwrap();
        } else {
            delivery.complete().await.unwrap();
        }
    }
}

/// What a test logs on its own thread, as text.
#[derive(Clone, Default)]
struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Ensures that a send the stream acks as a duplicate (a message id it holds within its
/// duplicate window) succeeds, since a resend after a lost ack must, but is logged as a
/// warning with the message id: when a publisher reused the id, that message is lost,
/// and the warning is the only trace of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_acked_as_a_duplicate_succeeds_with_a_warning_naming_the_message_id() {
    let Some(support::Declared { queue, nats, _cleanup, .. }) =
        support::declared("duplicate_warning", "dup").await
    else {
        return;
    };
    let sink = nats.sink();
    sink.send(&queue, OutgoingMessage::new("first").with_message_id("reused-7")).await.unwrap();

    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    sink.send(&queue, OutgoingMessage::new("second").with_message_id("reused-7")).await.unwrap();
    sink.send(&queue, OutgoingMessage::new("other").with_message_id("fresh-8")).await.unwrap();
    drop(guard);

    let text = logs.text();
    assert_eq!(text.lines().count(), 1, "one warning, for the duplicate alone: {text}");
    assert!(text.contains("WARN") && text.contains("message_id=\"reused-7\""), "{text}");
    assert!(text.contains("duplicate"), "{text}");
    let source = nats.source(&queue).await.unwrap();
    let got = source.receive(10, Duration::from_secs(2)).await.unwrap();
    let bodies: Vec<_> = got.iter().map(|d| d.message().body.clone()).collect();
    assert_eq!(bodies, ["first", "other"], "the stream kept the first of the two");
}

/// Ensures that two messages with the same message id, both dead-lettered within the
/// duplicate window, are both kept in the dead-letter queue: the copy is de-duplicated
/// on an id of its own, not on the message id it carries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_sharing_a_message_id_are_each_kept() {
    let Some(support::Declared { url, queue, nats, _cleanup }) =
        support::declared("dead_letters_sharing_an_id", "dlqid").await
    else {
        return;
    };
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    for body in ["first", "second"] {
        // A new queue stream (and so a fresh duplicate window) for the second message:
        // the id is reused, the dead-letter stream stays.
        js.delete_stream(nats.stream_name(&queue)).await.ok();
        nats.declare_topology().await.unwrap();
        nats.sink().send(&queue, OutgoingMessage::new(body).with_message_id("same")).await.unwrap();
        let source = nats.source(&queue).await.unwrap();
        let delivery = source.receive(1, Duration::from_secs(5)).await.unwrap().pop().unwrap();
        assert_eq!(delivery.message().body, body);
        delivery.dead_letter("Poison", body).await.unwrap();
    }
    let dead = nats.dead_letters(&queue).await.unwrap();
    let kept: Vec<_> =
        dead.iter().map(|d| (d.message.id.as_str(), d.description.as_str())).collect();
    assert_eq!(kept, [("same", "first"), ("same", "second")]);
    assert!(dead[0].message.properties.is_empty(), "{:?}", dead[0].message.properties);
}

/// Ensures that the server's last delivery of a message (its `max_deliver`-th) is
/// logged as a warning with the message id: the server never delivers it again, so if
/// it is not settled now (say dead-lettering fails) it stays in the stream until an
/// operator removes it, and the warning is how the operator learns of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_last_delivery_of_a_message_is_logged_as_a_warning() {
    if !support::server_available("last_delivery_warning").await {
        return;
    }
    let (queue, builder) = support::unique_queue(&support::server_url(), "last");
    let nats = builder.with_max_deliveries(1).with_max_deliver(2).build().unwrap();
    let _cleanup = support::Cleanup(nats.clone());
    nats.declare_topology().await.unwrap();
    nats.sink()
        .send(&queue, OutgoingMessage::new("b").with_message_id("stranded-1"))
        .await
        .unwrap();
    let source = nats.source(&queue).await.unwrap();

    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    let first = source.receive(1, Duration::from_secs(5)).await.unwrap().pop().unwrap();
    assert!(logs.text().is_empty(), "nothing to say on delivery 1 of 2: {}", logs.text());
    first.abandon(None).await.unwrap();
    let last = source.receive(1, Duration::from_secs(5)).await.unwrap().pop().unwrap();
    drop(guard);
    assert_eq!(last.message().delivery_count, 2);
    let text = logs.text();
    assert!(text.contains("WARN") && text.contains("message_id=stranded-1"), "{text}");
    assert!(text.contains("max_deliver=2"), "{text}");
    last.complete().await.unwrap();
}
