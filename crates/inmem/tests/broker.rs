//! The broker's rules, one test each, under paused time.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use steward_core::transport::MAX_DELIVERY_COUNT_EXCEEDED;
use steward_core::{ErrorKind, MessageSink, MessageSource, OutgoingMessage, TransportError};
use steward_inmem::{InMemoryBroker, QueueOptions};
use tokio::time::{Instant, timeout};

const WAIT: Duration = Duration::from_secs(1);

fn broker_with(queue: &str, options: QueueOptions) -> InMemoryBroker {
    let broker = InMemoryBroker::builder().with_strict(true).build();
    broker.declare_queue(queue, options);
    broker
}

async fn send(broker: &InMemoryBroker, queue: &str, id: &str) {
    broker.send(queue, OutgoingMessage::new(id.to_owned()).with_message_id(id)).await.unwrap();
}

/// Ensures that a held message comes back exactly when its lock expires, not before.
#[tokio::test(start_paused = true)]
async fn lock_expiry_redelivers_exactly_at_lock_duration() {
    let lock = Duration::from_secs(30);
    let broker = broker_with("q", QueueOptions::default().with_lock_duration(lock));
    send(&broker, "q", "m").await;
    let source = broker.source("q").unwrap();
    let started = Instant::now();
    let held = source.receive(1, WAIT).await.unwrap();
    assert_eq!(held[0].locked_until(), Some(started + lock));

    let again = source.receive(1, Duration::from_secs(60)).await.unwrap();
    assert_eq!(started.elapsed(), lock, "woken exactly when the lock expired");
    assert_eq!(again[0].message().id, "m");
    assert_eq!(again[0].message().delivery_count, 2);
    assert!(held.into_iter().next().unwrap().complete().await.unwrap_err().is_lock_lost());
}

/// Ensures that an abandon with delay hides the message for exactly the delay.
#[tokio::test(start_paused = true)]
async fn abandon_with_delay_redelivers_after_delay() {
    let broker = broker_with("q", QueueOptions::default());
    send(&broker, "q", "m").await;
    let source = broker.source("q").unwrap();
    let delivery = source.receive(1, WAIT).await.unwrap().pop().unwrap();
    let abandoned = Instant::now();
    delivery.abandon(Some(Duration::from_secs(45))).await.unwrap();
    assert!(source.receive(1, Duration::from_secs(44)).await.unwrap().is_empty());
    let again = source.receive(1, Duration::from_secs(10)).await.unwrap();
    assert_eq!(abandoned.elapsed(), Duration::from_secs(45));
    assert_eq!(again[0].message().delivery_count, 2);
}

/// Ensures that a scheduled message is invisible until its time.
#[tokio::test(start_paused = true)]
async fn scheduled_message_is_invisible_until_its_time() {
    let broker = broker_with("q", QueueOptions::default());
    let at = Instant::now() + Duration::from_secs(20);
    broker.enqueue("q", OutgoingMessage::new("later"), Some(at)).await.unwrap();
    let source = broker.source("q").unwrap();
    assert!(source.receive(1, Duration::from_secs(19)).await.unwrap().is_empty());
    let got = source.receive(1, Duration::from_secs(5)).await.unwrap();
    assert_eq!(Instant::now(), at);
    assert_eq!(got[0].message().body, "later");
}

/// Ensures that a session hands out one locked message at a time, in order, while
/// other sessions and session-less messages flow.
#[tokio::test(start_paused = true)]
async fn session_lock_allows_one_message_per_session() {
    let broker = broker_with("q", QueueOptions::default());
    for (id, session) in [("a1", Some("a")), ("a2", Some("a")), ("b1", Some("b")), ("x", None)] {
        let mut message = OutgoingMessage::new(id).with_message_id(id);
        message.session_id = session.map(str::to_owned);
        broker.send("q", message).await.unwrap();
    }
    let source = broker.source("q").unwrap();
    let first = source.receive(10, WAIT).await.unwrap();
    let ids: Vec<_> = first.iter().map(|d| d.message().id.as_str()).collect();
    assert_eq!(ids, ["a1", "b1", "x"]);
    let other = broker.source("q").unwrap();
    assert!(other.receive(10, WAIT).await.unwrap().is_empty(), "a2 waits for a1");
    for delivery in first {
        delivery.complete().await.unwrap();
    }
    let next = other.receive(10, WAIT).await.unwrap();
    assert_eq!(next[0].message().id, "a2");
}

/// Ensures that a message delivered the maximum number of times goes to the
/// dead-letter queue with `MaxDeliveryCountExceeded`, through abandons or lock expiry.
#[tokio::test(start_paused = true)]
async fn delivery_limit_moves_message_to_dead_letter_queue() {
    let lock = Duration::from_secs(10);
    let options = QueueOptions::default().with_lock_duration(lock).with_max_delivery_count(3);
    let broker = broker_with("q", options);
    send(&broker, "q", "abandoned").await;
    send(&broker, "q", "expired").await;
    let source = broker.source("q").unwrap();
    for round in 1..=3 {
        let got = source.receive(10, WAIT).await.unwrap();
        for delivery in got {
            assert_eq!(delivery.message().delivery_count, round);
            if delivery.message().id == "abandoned" {
                delivery.abandon(None).await.unwrap();
            }
        }
        tokio::time::advance(lock).await;
    }
    assert!(source.receive(10, WAIT).await.unwrap().is_empty());
    assert_eq!(broker.message_count("q"), 0);
    let dead = broker.dead_letters("q");
    let ids: Vec<_> = dead.iter().map(|d| d.message.id.as_str()).collect();
    assert_eq!(ids, ["abandoned", "expired"]);
    assert!(dead.iter().all(|d| d.reason == MAX_DELIVERY_COUNT_EXCEEDED));
    assert!(dead.iter().all(|d| d.message.properties.is_empty()), "{dead:?}");
    assert_eq!(broker.dead_letter_count("q"), 2);

    let dlq = broker.dead_letter_source("q").unwrap();
    let got = dlq.receive(10, WAIT).await.unwrap();
    assert_eq!(got.len(), 2);
    let reason = got[0].message().properties.get("DeadLetterReason").map(String::as_str);
    assert_eq!(reason, Some(MAX_DELIVERY_COUNT_EXCEEDED));
}

/// Ensures that a strict broker refuses undeclared queues everywhere, and a default
/// broker creates them on first use.
#[tokio::test(start_paused = true)]
async fn strict_mode_refuses_undeclared_queues() {
    let strict = InMemoryBroker::builder().with_strict(true).build();
    let error = strict.send("nope", OutgoingMessage::new("x")).await.unwrap_err();
    assert!(matches!(&error, TransportError::NotFound { entity, .. } if entity.contains("nope")));
    assert!(strict.source("nope").unwrap_err().is_not_found());
    assert!(!strict.has_queue("nope"));

    strict.declare_queue("yes", QueueOptions::default());
    strict.send("yes", OutgoingMessage::new("x")).await.unwrap();
    let source = strict.source("yes").unwrap();
    strict.delete_queue("yes");
    assert!(source.receive(1, WAIT).await.unwrap_err().is_not_found());

    let lenient = InMemoryBroker::new();
    lenient.send("auto", OutgoingMessage::new("x")).await.unwrap();
    assert!(lenient.has_queue("auto"));
    assert_eq!(lenient.message_count("auto"), 1);
}

/// Ensures that armed receive failures fail exactly that many receives, with the kind
/// asked for, and lose nothing.
#[tokio::test(start_paused = true)]
async fn fault_fail_receives_fails_next_n_receives() {
    let broker = broker_with("q", QueueOptions::default());
    send(&broker, "q", "m").await;
    broker.faults("q").fail_receives(2, ErrorKind::Auth);
    let source = broker.source("q").unwrap();
    for _ in 0..2 {
        let error = source.receive(1, WAIT).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Auth);
        assert!(!error.is_retryable());
    }
    assert_eq!(source.receive(1, WAIT).await.unwrap()[0].message().id, "m");
}

/// Ensures that a failed settlement leaves the message as it was: still locked by the
/// same delivery, which can settle it afterwards.
#[tokio::test(start_paused = true)]
async fn fault_fail_settlements_leaves_message_untouched() {
    let broker = broker_with("q", QueueOptions::default());
    send(&broker, "q", "a").await;
    send(&broker, "q", "b").await;
    let source = broker.source("q").unwrap();
    let mut got = source.receive(2, WAIT).await.unwrap();
    broker.faults("q").fail_settlements(1, ErrorKind::Connection);
    let b = got.pop().unwrap();
    let a = got.pop().unwrap();
    let error = a.complete().await.unwrap_err();
    assert!(error.is_retryable());
    assert_eq!(broker.message_count("q"), 2, "the failed complete removed nothing");
    b.complete().await.unwrap();
    assert_eq!(broker.message_count("q"), 1);
}

/// Ensures that armed send failures refuse the message without storing it.
#[tokio::test(start_paused = true)]
async fn fault_fail_sends_stores_nothing() {
    let broker = broker_with("q", QueueOptions::default());
    broker.faults("q").fail_sends(1, ErrorKind::Timeout);
    let error = broker.send("q", OutgoingMessage::new("x")).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Timeout);
    assert_eq!(broker.message_count("q"), 0);
    broker.send("q", OutgoingMessage::new("x")).await.unwrap();
    assert_eq!(broker.message_count("q"), 1);
}

/// Ensures that a hanging receive never returns until the fault is cleared, and that
/// cancelling it loses nothing.
#[tokio::test(start_paused = true)]
async fn fault_hang_receives_blocks_until_cleared() {
    let broker = broker_with("q", QueueOptions::default());
    send(&broker, "q", "m").await;
    broker.faults("q").hang_receives(true);
    let source = broker.source("q").unwrap();
    let hung = timeout(Duration::from_secs(3600), source.receive(1, WAIT)).await;
    assert!(hung.is_err(), "the receive hung for an hour");
    broker.faults("q").clear();
    assert_eq!(source.receive(1, WAIT).await.unwrap()[0].message().id, "m");
}

/// Ensures that added latency delays every operation by exactly that much.
#[tokio::test(start_paused = true)]
async fn fault_latency_delays_each_operation() {
    let broker = broker_with("q", QueueOptions::default());
    broker.faults("q").set_latency(Duration::from_millis(250));
    let started = Instant::now();
    send(&broker, "q", "m").await;
    assert_eq!(started.elapsed(), Duration::from_millis(250));
    let source = broker.source("q").unwrap();
    let delivery = source.receive(1, WAIT).await.unwrap().pop().unwrap();
    assert_eq!(started.elapsed(), Duration::from_millis(500));
    delivery.complete().await.unwrap();
    assert_eq!(started.elapsed(), Duration::from_millis(750));
}

/// Ensures that a disconnect breaks the existing consumers: their receives fail, their
/// locks are gone (LockLost) and the messages go to a new consumer at once.
#[tokio::test(start_paused = true)]
async fn fault_disconnect_releases_locks_and_breaks_old_sources() {
    let broker = broker_with("q", QueueOptions::default());
    send(&broker, "q", "m").await;
    let old = broker.source("q").unwrap();
    let held = old.receive(1, WAIT).await.unwrap().pop().unwrap();
    broker.faults("q").disconnect();

    let error = old.receive(1, WAIT).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Connection);
    let new = broker.source("q").unwrap();
    let started = Instant::now();
    let again = new.receive(1, WAIT).await.unwrap().pop().unwrap();
    assert_eq!(started.elapsed(), Duration::ZERO, "released at once");
    assert_eq!(again.message().delivery_count, 2);
    let error = held.complete().await.unwrap_err();
    assert!(matches!(&error, TransportError::LockLost { message_id, .. } if message_id == "m"));
    again.complete().await.unwrap();
}

/// Ensures that receive-and-delete removes what it returns.
#[tokio::test(start_paused = true)]
async fn receive_and_delete_removes_messages() {
    let broker = broker_with("q", QueueOptions::default());
    send(&broker, "q", "a").await;
    send(&broker, "q", "b").await;
    let got = broker.receive_and_delete("q", 1, WAIT).await.unwrap();
    assert_eq!(got[0].message.id, "a");
    assert_eq!(broker.peek("q").len(), 1);
}

/// Ensures that a locked message can be found by its id and lock token, as protocols
/// that address locks by message id need.
#[tokio::test(start_paused = true)]
async fn lock_by_message_id_finds_only_the_holder() {
    let broker = broker_with("q", QueueOptions::default());
    send(&broker, "q", "a").await;
    let locked = broker.receive("q", 1, WAIT).await.unwrap().pop().unwrap();
    let found = broker.lock_by_message_id("q", "a", locked.lock_token).unwrap();
    assert_eq!(found.sequence, locked.sequence);
    assert!(broker.lock_by_message_id("q", "a", uuid::Uuid::new_v4()).is_none());
    broker.renew_lock("q", found).await.unwrap();
    broker.complete("q", found).await.unwrap();
    assert_eq!(broker.message_count("q"), 0);
}

/// Ensures that a message over the broker's limit is refused with a protocol error,
/// its properties counted with its body.
#[tokio::test(start_paused = true)]
async fn body_over_limit_is_refused() {
    let broker = InMemoryBroker::builder().with_max_body_bytes(8).build();
    assert_eq!(broker.capabilities().max_body_bytes, Some(8));
    let error = broker.send("q", OutgoingMessage::new("123456789")).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Protocol);
    broker.send("q", OutgoingMessage::new("12345678")).await.unwrap();
    let mut with_property = OutgoingMessage::new("1234");
    with_property.properties.insert("ab".to_owned(), "cde".to_owned());
    let error = broker.send("q", with_property).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Protocol, "4 + 2 + 3 bytes are over 8");
}

/// Ensures that a source stopped with `stop_receiving` takes no more messages but its
/// deliveries can still be settled.
#[tokio::test(start_paused = true)]
async fn stop_receiving_stops_intake_but_allows_settlement() {
    let broker = broker_with("q", QueueOptions::default());
    send(&broker, "q", "a").await;
    send(&broker, "q", "b").await;
    let source = broker.source("q").unwrap();
    let a = source.receive(1, WAIT).await.unwrap().pop().unwrap();
    source.stop_receiving().await.unwrap();
    let started = Instant::now();
    assert!(source.receive(1, WAIT).await.unwrap().is_empty());
    assert_eq!(started.elapsed(), WAIT, "waits out the wait instead of spinning");
    a.complete().await.unwrap();
    assert_eq!(broker.peek("q")[0].id, "b");
}

/// Ensures that `take_all` empties a queue of available, locked and delayed messages,
/// oldest first, and that the old locks are then lost.
#[tokio::test(start_paused = true)]
async fn take_all_removes_messages_in_every_state() {
    let broker = broker_with("q", QueueOptions::default());
    send(&broker, "q", "locked").await;
    send(&broker, "q", "available").await;
    let later = Instant::now() + Duration::from_secs(60);
    broker
        .enqueue("q", OutgoingMessage::new("d").with_message_id("delayed"), Some(later))
        .await
        .unwrap();
    let source = broker.source("q").unwrap();
    let held = source.receive(1, WAIT).await.unwrap().pop().unwrap();
    let ids: Vec<_> = broker.take_all("q").into_iter().map(|m| m.id).collect();
    assert_eq!(ids, ["locked", "available", "delayed"]);
    assert_eq!(broker.message_count("q"), 0);
    assert!(held.complete().await.unwrap_err().is_lock_lost());
}
