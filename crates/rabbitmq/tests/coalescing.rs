//! Ack coalescing and publish pipelining against the local RabbitMQ broker: completed
//! messages are acked exactly once whatever the mix of outcomes, acks not yet written
//! when a connection is lost cost only their own messages a redelivery, and many
//! publishes in flight each get their own result.
//!
//! Without a reachable broker each test prints one skip line and passes, unless
//! `CI=true`, where it fails.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use steward_core::{
    Delivery, ErrorKind, MessageSink, MessageSource, Outcome, OutgoingMessage, Supervisor,
    SupervisorConfig, Updater, UpdaterConfig, WorkerState, handler_fn,
};
use support::{PROMPTLY, receive_n, require_broker};
use tokio::time::{Instant, sleep, timeout};

/// Per message: the delivery counts it was handled with, and what the handler did.
type Seen = BTreeMap<usize, Vec<(u32, &'static str)>>;

/// What the handler of the mixed-outcomes test does with message `n`.
fn planned(n: usize) -> &'static str {
    match n % 6 {
        0 | 1 => "complete",
        2 => "slow",
        3 => "retry",
        4 => "dead-letter",
        _ => "panic",
    }
}

/// Ensures that an `Updater` (concurrency 8) whose handler mixes outcomes — quick
/// completes, slow completes of varying length that finish out of order, retries
/// (requeued at once, completed when they come back), dead letters and panics (retried
/// by the updater) — gets every message settled exactly once with coalesced acks:
/// each completed message is completed once and never delivered again, each dead
/// letter is in the dead-letter queue once, the queue ends empty, and the consumer's
/// channel never fails (an ack of an unknown or already settled tag would close it:
/// the worker would restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updater_with_mixed_outcomes_acks_every_completed_message_exactly_once() {
    require_broker!("updater_with_mixed_outcomes_acks_every_completed_message_exactly_once");
    const TOTAL: usize = 360;
    let test_queue = support::TestQueue::declare("steward-acks-mixed", |b| b).await;
    let (queue, rabbit) = (test_queue.name.clone(), test_queue.rabbit.clone());
    let sink = rabbit.sink();
    for n in 0..TOTAL {
        let message = OutgoingMessage::json(format!("{{\"n\":{n}}}"))
            .with_message_id(format!("m-{n}"))
            .with_property("n", n.to_string());
        sink.send(&queue, message).await.unwrap();
    }

    let seen: Arc<Mutex<Seen>> = Arc::default();
    let handler = {
        let seen = seen.clone();
        handler_fn(move |message| {
            let seen = seen.clone();
            async move {
                let n: usize = message.properties["n"].parse().unwrap();
                let first = message.delivery_count == 1;
                let action = match planned(n) {
                    "retry" | "panic" if !first => "complete",
                    action => action,
                };
                seen.lock().unwrap().entry(n).or_default().push((message.delivery_count, action));
                match action {
                    "slow" => {
                        // 5 to 40 ms: later messages often finish first.
                        sleep(Duration::from_millis(5 + (n * 7 % 36) as u64)).await;
                        Outcome::Complete
                    }
                    "retry" => Outcome::retry_after(Duration::ZERO, "first delivery"),
                    "dead-letter" => Outcome::DeadLetter {
                        reason: "Planned".into(),
                        description: format!("message {n}"),
                    },
                    "panic" => panic!("planned panic of message {n}"),
                    _ => Outcome::Complete,
                }
            }
        })
    };
    let connect = support::connector(&rabbit, &queue);
    let updater = Updater::new("acks-mixed", connect, handler).with_config(
        UpdaterConfig::default()
            .with_concurrency(8)
            .with_batch_size(32)
            .with_wait(Duration::from_millis(500)),
    );
    let supervisor = Supervisor::new(SupervisorConfig::default());
    supervisor.spawn(updater);
    let health = supervisor.health();

    let expected_final: usize = (0..TOTAL).filter(|n| planned(*n) != "dead-letter").count();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let finals = seen
            .lock()
            .unwrap()
            .values()
            .flatten()
            .filter(|(_, action)| matches!(*action, "complete" | "slow"))
            .count();
        let outcomes = health.snapshot().worker("acks-mixed").unwrap().outcomes;
        if finals >= expected_final && outcomes.completed >= expected_final as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "only {finals} of {expected_final} completed");
        sleep(Duration::from_millis(50)).await;
    }
    // Whatever was acked is gone; anything else would come back meanwhile.
    assert_eq!(support::wait_until_empty(&queue, PROMPTLY).await, Some(0));
    sleep(Duration::from_millis(500)).await;
    let worker = health.snapshot().worker("acks-mixed").unwrap().clone();
    let report = supervisor.shutdown(Instant::now() + Duration::from_secs(10)).await;
    assert_eq!(report.stopped, ["acks-mixed"]);

    assert_eq!(worker.restarts, 0, "the consumer's channel failed: {worker:?}");
    assert_ne!(worker.state, WorkerState::Failed, "{worker:?}");
    assert_eq!(worker.outcomes.lease_lost, 0, "{worker:?}");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), TOTAL, "every message was handled");
    for (n, handled) in &seen {
        let expected: Vec<(u32, &str)> = match planned(*n) {
            "retry" | "panic" => vec![(1, planned(*n)), (2, "complete")],
            action => vec![(1, action)],
        };
        assert_eq!(handled, &expected, "message {n}");
    }
    assert_eq!(worker.outcomes.completed, expected_final as u64, "{worker:?}");
    let dead: Vec<String> =
        rabbit.dead_letters(&queue).await.unwrap().into_iter().map(|d| d.message.id).collect();
    let expected_dead: Vec<String> =
        (0..TOTAL).filter(|n| planned(*n) == "dead-letter").map(|n| format!("m-{n}")).collect();
    assert_eq!(dead.len(), expected_dead.len(), "{dead:?}");
    assert_eq!(dead.iter().collect::<BTreeSet<_>>(), expected_dead.iter().collect::<BTreeSet<_>>());
}

/// A queue (prefetch [`TOTAL`]) holding [`TOTAL`] messages `m-0`… with bodies `0`…,
/// and a source of it.
async fn holding_ten(name: &str) -> (support::TestQueue, steward_rabbitmq::RabbitMqSource) {
    let test_queue = support::TestQueue::declare(name, |b| b.with_prefetch(TOTAL as u16)).await;
    let (queue, rabbit) = (&test_queue.name, &test_queue.rabbit);
    let sink = rabbit.sink();
    for n in 0..TOTAL {
        sink.send(queue, OutgoingMessage::new(format!("{n}")).with_message_id(format!("m-{n}")))
            .await
            .unwrap();
    }
    let source = rabbit.source(queue).await.unwrap();
    (test_queue, source)
}

/// How many messages [`holding_ten`] sends.
const TOTAL: usize = 10;

/// Ensures that a connection lost while completions wait for their coalesced ack
/// redelivers only those messages: of ten deliveries, the first stays held (so it
/// holds the completed prefix back), four are completed and their acks written (one
/// by one, once they waited the flush interval), five are completed with their wait
/// cancelled before any interval passed, so their acks are never written. After the
/// connection is closed, a new consumer gets exactly the held one and the five
/// unflushed ones, each on its second delivery; the four acked ones never come back.
///
/// A cancelled `complete` may or may not have written its ack: once its delivery
/// waited the flush interval, the ack is written even if the caller stops waiting. So
/// the five are completed with the clock paused, each polled once: no interval can
/// pass, however late the thread runs (a runtime of one thread, which alone drives
/// the timers).
#[tokio::test(flavor = "current_thread")]
async fn lost_connection_redelivers_only_the_messages_whose_acks_were_not_written() {
    require_broker!("lost_connection_redelivers_only_the_messages_whose_acks_were_not_written");
    let (test_queue, source) = holding_ten("steward-acks-lost").await;
    let (queue, rabbit) = (test_queue.name.clone(), test_queue.rabbit.clone());
    let mut deliveries = receive_n(&source, TOTAL, PROMPTLY).await;
    assert_eq!(deliveries.len(), TOTAL);
    let ids: Vec<String> = deliveries.iter().map(|d| d.message().id.clone()).collect();
    let expected_ids: Vec<String> = (0..TOTAL).map(|n| format!("m-{n}")).collect();
    assert_eq!(ids, expected_ids, "delivered in order");

    let held = deliveries.remove(0);
    let unflushed: Vec<Delivery> = deliveries.drain(..5).collect();
    let acked = deliveries;
    // Behind the held first delivery, these are acked one by one after the interval.
    let acked_ids: BTreeSet<String> = acked.iter().map(|d| d.message().id.clone()).collect();
    for result in futures::future::join_all(acked.into_iter().map(Delivery::complete)).await {
        result.unwrap();
    }
    // Completed, but the wait for the ack is dropped before it was written: nothing
    // writes it any more (no other completion follows). With the clock paused, none of
    // them waited an interval, so none is written on its own either.
    let unflushed_ids: BTreeSet<String> =
        unflushed.iter().map(|d| d.message().id.clone()).collect();
    tokio::time::pause();
    for delivery in unflushed {
        let waited = delivery.complete().now_or_never();
        assert!(waited.is_none(), "the ack was written at once: {waited:?}");
    }
    tokio::time::resume();
    // The broker counts the four acked messages gone before the connection is closed.
    let left = (TOTAL - acked_ids.len()) as u64;
    assert_eq!(support::wait_until_depth(&queue, left, PROMPTLY).await, Some(left));
    assert!(support::close_connections_containing(&queue).await >= 1);
    let failed = timeout(PROMPTLY, async {
        loop {
            match source.receive(1, Duration::from_secs(1)).await {
                Err(error) => return error,
                Ok(got) => assert!(got.is_empty(), "a delivery after the close: {got:?}"),
            }
        }
    })
    .await
    .expect("receive did not notice the closed connection");
    assert_eq!(failed.kind(), ErrorKind::Connection, "{}", steward_core::error_chain(&failed));
    assert!(held.complete().await.unwrap_err().is_lock_lost());
    drop(source);

    let again = rabbit.source(&queue).await.unwrap();
    let redelivered = receive_n(&again, TOTAL, Duration::from_secs(5)).await;
    let mut expected: BTreeSet<String> = unflushed_ids;
    expected.insert("m-0".to_owned());
    let counts: HashMap<String, u32> =
        redelivered.iter().map(|d| (d.message().id.clone(), d.message().delivery_count)).collect();
    assert_eq!(counts.keys().cloned().collect::<BTreeSet<_>>(), expected);
    assert!(counts.values().all(|count| *count == 2), "{counts:?}");
    assert!(counts.keys().all(|id| !acked_ids.contains(id)));
    for result in futures::future::join_all(redelivered.into_iter().map(Delivery::complete)).await {
        result.unwrap();
    }
    assert_eq!(support::wait_until_empty(&queue, PROMPTLY).await, Some(0));
    again.stop_receiving().await.unwrap();
}

/// Ensures that with many publishes in flight at once through one sink, the one to a
/// queue that does not exist is `NotFound` and every other one succeeds and arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_publishes_in_flight_one_unroutable_only_it_is_not_found() {
    require_broker!("many_publishes_in_flight_one_unroutable_only_it_is_not_found");
    const SENDS: usize = 400;
    const UNROUTABLE: usize = 257;
    let queue = support::TestQueue::declare("steward-pipelined", |b| b).await;
    let missing = steward_core::testkit::unique_name("steward-pipelined-missing");
    let sink = queue.rabbit.sink();
    let sends = (0..SENDS).map(|n| {
        let target = if n == UNROUTABLE { &missing } else { &queue.name };
        let message = OutgoingMessage::new(format!("{n}")).with_message_id(format!("p-{n}"));
        let sink = &sink;
        async move { (n, sink.send(target, message).await) }
    });
    for (n, result) in futures::future::join_all(sends).await {
        if n == UNROUTABLE {
            let error = result.expect_err("the send to the missing queue succeeded");
            assert_eq!(error.kind(), ErrorKind::NotFound, "{}", steward_core::error_chain(&error));
        } else {
            result.unwrap_or_else(|e| panic!("send {n} failed: {}", steward_core::error_chain(&e)));
        }
    }
    let expected = (SENDS - 1) as u64;
    assert_eq!(support::wait_until_depth(&queue.name, expected, PROMPTLY).await, Some(expected));
    let source = queue.rabbit.source(&queue.name).await.unwrap();
    let mut ids = BTreeSet::new();
    let deadline = Instant::now() + PROMPTLY;
    while ids.len() < SENDS - 1 && Instant::now() < deadline {
        let got = source.receive(64, Duration::from_secs(1)).await.unwrap();
        ids.extend(got.iter().map(|d| d.message().id.clone()));
        for result in futures::future::join_all(got.into_iter().map(Delivery::complete)).await {
            result.unwrap();
        }
    }
    let wanted: BTreeSet<String> =
        (0..SENDS).filter(|n| *n != UNROUTABLE).map(|n| format!("p-{n}")).collect();
    assert_eq!(ids, wanted);
    source.stop_receiving().await.unwrap();
}

/// Ensures that settlements after `stop_receiving` requeued the buffered deliveries
/// neither settle those again nor close the channel: of ten messages pushed to a
/// consumer (prefetch 10), three are handed out and the rest requeued by
/// `stop_receiving`; then the
/// second is requeued, and the third and first are completed at once (a multiple ack
/// over the first three passes over the requeued one). Exactly the eight not completed
/// come back, so no settlement was lost to a closed channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlements_after_stop_receiving_ack_only_their_own_messages() {
    require_broker!("settlements_after_stop_receiving_ack_only_their_own_messages");
    let (test_queue, source) = holding_ten("steward-acks-stop").await;
    let (queue, rabbit) = (test_queue.name.clone(), test_queue.rabbit.clone());
    let mut handed = receive_n(&source, 3, PROMPTLY).await;
    assert_eq!(handed.len(), 3);
    source.stop_receiving().await.unwrap();
    let third = handed.pop().unwrap();
    let second = handed.pop().unwrap();
    let first = handed.pop().unwrap();
    assert_eq!(second.message().id, "m-1");
    second.abandon(None).await.unwrap();
    let (third, first) = futures::future::join(third.complete(), first.complete()).await;
    third.unwrap();
    first.unwrap();
    let left = (TOTAL - 2) as u64;
    assert_eq!(support::wait_until_depth(&queue, left, PROMPTLY).await, Some(left));
    drop(source);

    let again = rabbit.source(&queue).await.unwrap();
    let back = receive_n(&again, TOTAL, Duration::from_secs(5)).await;
    let ids: BTreeSet<String> = back.iter().map(|d| d.message().id.clone()).collect();
    let expected: BTreeSet<String> =
        (1..TOTAL).filter(|n| *n != 2).map(|n| format!("m-{n}")).collect();
    assert_eq!(ids, expected);
    for result in futures::future::join_all(back.into_iter().map(Delivery::complete)).await {
        result.unwrap();
    }
    assert_eq!(support::wait_until_empty(&queue, PROMPTLY).await, Some(0));
    again.stop_receiving().await.unwrap();
}
