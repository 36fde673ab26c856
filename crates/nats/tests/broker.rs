//! Behaviour beyond the conformance suite, against the local NATS server: many sends in
//! flight, messages from plain NATS publishers, and the declared consumer's settings.
//! Each test uses streams of its own and deletes them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;
use std::time::Duration;

use steward_core::{MessageSink, MessageSource, OutgoingMessage};
use steward_nats::Nats;
use tokio::time::Instant;

/// Deletes the streams of a test's transport when dropped, also when the test fails.
struct Cleanup(Nats);

impl Drop for Cleanup {
    fn drop(&mut self) {
        support::delete_topologies(vec![self.0.clone()]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_sends_in_flight_are_each_acked_and_stored_once() {
    if !support::server_available("many_sends_in_flight").await {
        return;
    }
    let (queue, builder) = support::unique_queue(&support::server_url(), "inflight");
    let nats = builder.build().unwrap();
    let _cleanup = Cleanup(nats.clone());
    nats.declare_topology().await.unwrap();
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
    // A repeated id within the duplicate window is stored once.
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
    if !support::server_available("message_without_an_id").await {
        return;
    }
    let url = support::server_url();
    let (queue, builder) = support::unique_queue(&url, "noid");
    let nats = builder.build().unwrap();
    let _cleanup = Cleanup(nats.clone());
    nats.declare_topology().await.unwrap();
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
    if !support::server_available("server_control_headers").await {
        return;
    }
    let url = support::server_url();
    let (queue, builder) = support::unique_queue(&url, "ctl");
    let nats = builder.build().unwrap();
    let _cleanup = Cleanup(nats.clone());
    nats.declare_topology().await.unwrap();
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
    let _cleanup = Cleanup(nats.clone());
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
