//! Fault tests against the local RabbitMQ broker: delay buckets, delivery counts
//! through delays, refused credentials, and connections closed mid-run (through
//! `rabbitmqctl close_connection`, only for connections named after the test's own
//! queue). Each asserts that nothing is lost.
//!
//! Without a reachable broker each test prints one skip line and passes, unless
//! `CI=true`, where it fails.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use steward_core::{
    Backoff, Delivery, ErrorKind, Jitter, MessageSink, MessageSource, Outcome, OutgoingMessage,
    RestartIntensity, Supervisor, SupervisorConfig, TransportError, Updater, UpdaterConfig,
    WorkerState, handler_fn,
};
use steward_rabbitmq::RabbitMqSource;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, timeout};

use support::{PROMPTLY, receive_n, require_broker};

async fn receive_one(source: &RabbitMqSource, within: Duration) -> Delivery {
    let mut got = receive_n(source, 1, within).await;
    assert_eq!(got.len(), 1, "expected a message within {within:?}");
    got.remove(0)
}

/// `url` with its password replaced.
fn with_password(url: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host = authority.rsplit('@').next().unwrap();
    let user = authority
        .rsplit_once('@')
        .map_or("guest", |(userinfo, _)| userinfo.split(':').next().unwrap_or("guest"));
    format!("{scheme}://{user}:{password}@{host}/{path}")
}

/// Ensures that delay buckets do not hold each other up: a message abandoned with a
/// 5 s delay before another is abandoned with a 1 s delay comes back after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shorter_delay_returns_first_even_when_abandoned_after_a_longer_one() {
    require_broker!("shorter_delay_returns_first_even_when_abandoned_after_a_longer_one");
    let test_queue = support::TestQueue::declare("steward-fault-delay", |b| b).await;
    let (queue, rabbit) = (test_queue.name.clone(), test_queue.rabbit.clone());
    let sink = rabbit.sink();
    for id in ["slow", "fast"] {
        sink.send(&queue, OutgoingMessage::new(id).with_message_id(id)).await.unwrap();
    }
    let source = rabbit.source(&queue).await.unwrap();
    let mut got = receive_n(&source, 2, PROMPTLY).await;
    assert_eq!(got.len(), 2);
    got.sort_by(|a, b| b.message().id.cmp(&a.message().id));
    let (slow, fast) = (got.remove(0), got.remove(0));
    assert_eq!((slow.message().id.as_str(), fast.message().id.as_str()), ("slow", "fast"));

    let abandoned_at = Instant::now();
    slow.abandon(Some(Duration::from_secs(5))).await.unwrap();
    fast.abandon(Some(Duration::from_secs(1))).await.unwrap();

    let first = receive_one(&source, PROMPTLY).await;
    let first_after = abandoned_at.elapsed();
    let second = receive_one(&source, PROMPTLY).await;
    let second_after = abandoned_at.elapsed();
    assert_eq!(first.message().id, "fast", "the 1 s delay returns first");
    assert_eq!(second.message().id, "slow");
    assert!(first_after >= Duration::from_secs(1), "fast returned after {first_after:?}");
    assert!(second_after >= Duration::from_secs(5), "slow returned after {second_after:?}");
    assert_eq!(first.message().delivery_count, 2);
    assert_eq!(second.message().delivery_count, 2);
    first.complete().await.unwrap();
    second.complete().await.unwrap();
    drop(source);
    assert_eq!(support::wait_until_empty(&queue, PROMPTLY).await, Some(0));
}

/// Ensures that the delivery count grows through requeues and a delay bucket: a
/// message abandoned three times, once with a delay, is on its fourth delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_abandoned_three_times_once_through_a_delay_counts_four_deliveries() {
    require_broker!("message_abandoned_three_times_once_through_a_delay_counts_four_deliveries");
    let test_queue = support::TestQueue::declare("steward-fault-count", |b| b).await;
    let (queue, rabbit) = (test_queue.name.clone(), test_queue.rabbit.clone());
    rabbit.sink().send(&queue, OutgoingMessage::new("counted").with_message_id("c")).await.unwrap();
    let source = rabbit.source(&queue).await.unwrap();

    let mut counts = Vec::new();
    for delay in [None, Some(Duration::from_secs(1)), None] {
        let delivery = receive_one(&source, PROMPTLY).await;
        counts.push(delivery.message().delivery_count);
        delivery.abandon(delay).await.unwrap();
    }
    let fourth = receive_one(&source, PROMPTLY).await;
    counts.push(fourth.message().delivery_count);
    assert_eq!(counts, [1, 2, 3, 4]);
    assert_eq!(fourth.message().id, "c");
    assert_eq!(fourth.message().body, "counted");
    fourth.complete().await.unwrap();
    drop(source);
    assert_eq!(support::wait_until_empty(&queue, PROMPTLY).await, Some(0));
}

/// Ensures that refused credentials are an `Auth` error (not retryable) for the
/// topology, a source and a sink, and that none of them hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_an_auth_error_everywhere() {
    require_broker!("wrong_password_is_an_auth_error_everywhere");
    let (queue, builder) = support::unique_queue("steward-fault-auth");
    let rabbit = builder
        .with_url(with_password(&support::broker_url(), "not-the-password"))
        .build()
        .unwrap();

    let declared = timeout(PROMPTLY, rabbit.declare_topology()).await.unwrap();
    let err = declared.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{}", steward_core::error_chain(&err));
    assert!(!err.is_retryable());

    let source = timeout(PROMPTLY, rabbit.source(&queue)).await.unwrap();
    assert_eq!(source.unwrap_err().kind(), ErrorKind::Auth);

    let sent = timeout(PROMPTLY, rabbit.sink().send(&queue, OutgoingMessage::new("x"))).await;
    assert_eq!(sent.unwrap().unwrap_err().kind(), ErrorKind::Auth);
}

/// Ensures that a network that goes silent (no close, no reset) is noticed by the
/// heartbeat within seconds: receive fails with a retryable error instead of hanging,
/// the held delivery answers `LockLost`, and the message is delivered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_network_is_noticed_by_the_heartbeat() {
    require_broker!("silent_network_is_noticed_by_the_heartbeat");
    let test_queue = support::TestQueue::declare("steward-fault-silent", |b| b).await;
    let queue = test_queue.name.clone();
    let proxy = support::SilentProxy::start().await;
    let through_proxy = support::builder()
        .with_url(proxy.url())
        .with_queue(&queue)
        .with_heartbeat(Duration::from_secs(1))
        .build()
        .unwrap();
    test_queue
        .rabbit
        .sink()
        .send(&queue, OutgoingMessage::new("held").with_message_id("held"))
        .await
        .unwrap();
    let source = through_proxy.source(&queue).await.unwrap();
    let held = receive_one(&source, PROMPTLY).await;

    proxy.freeze();
    let frozen_at = Instant::now();
    let error = loop {
        match timeout(PROMPTLY, source.receive(10, Duration::from_secs(1))).await {
            Err(_) => panic!("receive hung on a silent connection"),
            Ok(Err(error)) => break error,
            Ok(Ok(batch)) => assert!(batch.is_empty()),
        }
        assert!(frozen_at.elapsed() < PROMPTLY, "the silent connection was never noticed");
    };
    let noticed_after = frozen_at.elapsed();
    assert!(error.is_retryable(), "{}", steward_core::error_chain(&error));
    assert!(
        noticed_after >= Duration::from_secs(1),
        "noticed after {noticed_after:?}, before a heartbeat could be missed"
    );
    let settled = held.complete().await;
    assert!(matches!(settled, Err(TransportError::LockLost { .. })), "{settled:?}");

    // The broker misses the heartbeats too, closes its side and requeues the message.
    let fresh = test_queue.rabbit.source(&queue).await.unwrap();
    let again = receive_one(&fresh, PROMPTLY).await;
    assert_eq!(again.message().id, "held");
    assert_eq!(again.message().delivery_count, 2);
    again.complete().await.unwrap();
}

/// Ensures that concurrent settlements that publish copies each get their own result
/// when the broker coalesces its publisher confirms (a proxy acks every batch with one
/// `multiple = true` ack): with `<queue>.dlq` deleted, every dead-letter fails with
/// `NotFound` and puts its message back, every delayed abandon succeeds, and every
/// message comes back. Were the copies to share a confirm channel, a dead-letter copy
/// could be confirmed as sent (and its message lost) while a delay copy failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_dead_letters_and_delays_each_get_their_own_result() {
    require_broker!("concurrent_dead_letters_and_delays_each_get_their_own_result");
    const TOTAL: usize = 32;
    let test_queue = support::TestQueue::declare("steward-fault-mixed", |b| b).await;
    let queue = test_queue.name.clone();
    let sink = test_queue.rabbit.sink();
    for i in 0..TOTAL {
        sink.send(&queue, OutgoingMessage::new("x").with_message_id(format!("m-{i}")))
            .await
            .unwrap();
    }
    let proxy = support::CoalescingProxy::start().await;
    let rabbit = support::builder().with_url(proxy.url()).with_queue(&queue).build().unwrap();
    let source = rabbit.source(&queue).await.unwrap();
    let deliveries = receive_n(&source, TOTAL, PROMPTLY).await;
    assert_eq!(deliveries.len(), TOTAL);
    support::delete_queue(&steward_rabbitmq::dead_letter_queue(&queue)).await;

    let settled = deliveries.into_iter().enumerate().map(|(i, delivery)| async move {
        let id = delivery.message().id.clone();
        let dead_letter = i % 2 == 0;
        let result = if dead_letter {
            delivery.dead_letter("Bad", "the dead-letter queue is gone").await
        } else {
            delivery.abandon(Some(Duration::from_secs(1))).await
        };
        (id, dead_letter, result)
    });
    for (id, dead_letter, result) in futures::future::join_all(settled).await {
        if dead_letter {
            let error = result.expect_err("a dead-letter to a missing queue succeeded");
            assert_eq!(
                error.kind(),
                ErrorKind::NotFound,
                "{id}: {}",
                steward_core::error_chain(&error)
            );
        } else {
            result.unwrap_or_else(|e| {
                panic!("{id}: delay failed: {}", steward_core::error_chain(&e))
            });
        }
    }

    // The dead-lettered messages were requeued, the delayed ones come back: all of them.
    let again = receive_n(&source, TOTAL, PROMPTLY).await;
    let ids: HashSet<_> = again.iter().map(|d| d.message().id.clone()).collect();
    assert_eq!(ids, (0..TOTAL).map(|i| format!("m-{i}")).collect::<HashSet<_>>());
    for delivery in again {
        delivery.complete().await.unwrap();
    }
    drop(source);
    assert_eq!(support::wait_until_empty(&queue, PROMPTLY).await, Some(0));
}

/// Ensures that a queue deleted under a running consumer surfaces as `NotFound`, as do
/// a new consumer and a send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_queue_is_not_found() {
    require_broker!("deleted_queue_is_not_found");
    let test_queue = support::TestQueue::declare("steward-fault-deleted", |b| b).await;
    let (queue, rabbit) = (test_queue.name.clone(), test_queue.rabbit.clone());
    let source = rabbit.source(&queue).await.unwrap();
    support::delete_queue(&queue).await;

    let started = Instant::now();
    let error = loop {
        match timeout(PROMPTLY, source.receive(10, Duration::from_secs(1))).await.unwrap() {
            Err(error) => break error,
            Ok(batch) => assert!(batch.is_empty(), "a deleted queue delivered"),
        }
        assert!(started.elapsed() < PROMPTLY, "the deleted queue never surfaced");
    };
    assert_eq!(error.kind(), ErrorKind::NotFound, "{}", steward_core::error_chain(&error));
    assert_eq!(rabbit.source(&queue).await.unwrap_err().kind(), ErrorKind::NotFound);
    let sent = rabbit.sink().send(&queue, OutgoingMessage::new("x")).await;
    assert!(matches!(sent, Err(TransportError::NotFound { .. })), "{sent:?}");
}

/// Ensures that closing the consumer's connection mid-run (prefetch 16, 64 messages,
/// 200 ms handlers) loses nothing: receive fails with a retryable error, the deliveries
/// of the dead channel settle with `LockLost`, a new consumer gets them again, every
/// message is handled, the queue ends empty, and no delivery tag is acked twice (the
/// broker would close the channel over an unknown tag: the only failure is the one the
/// test caused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_closed_mid_run_loses_nothing_and_acks_no_tag_twice() {
    require_broker!("connection_closed_mid_run_loses_nothing_and_acks_no_tag_twice");
    const TOTAL: usize = 64;
    const PREFETCH: usize = 16;
    let test_queue =
        support::TestQueue::declare("steward-fault-close", |b| b.with_prefetch(PREFETCH as u16))
            .await;
    let (queue, rabbit) = (test_queue.name.clone(), test_queue.rabbit.clone());
    let sink = rabbit.sink();
    for i in 0..TOTAL {
        sink.send(&queue, OutgoingMessage::new(format!("{i}")).with_message_id(format!("m-{i}")))
            .await
            .unwrap();
    }

    let completed: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let lock_lost = Arc::new(AtomicUsize::new(0));
    let other_errors: Arc<Mutex<Vec<String>>> = Arc::default();
    // Handlers that finish after the close was requested wait until it happened, so
    // some deliveries are surely in flight on the channel that dies.
    let close_requested = Arc::new(AtomicBool::new(false));
    let (closed_tx, closed_rx) = watch::channel(false);
    let mut closer = None;
    let mut receive_failures = Vec::new();
    let mut sources = 0;
    let deadline = Instant::now() + Duration::from_secs(120);

    while completed.lock().unwrap().len() < TOTAL {
        assert!(Instant::now() < deadline, "not all messages handled in time");
        let source = rabbit.source(&queue).await.unwrap();
        sources += 1;
        let mut handlers = JoinSet::new();
        loop {
            if completed.lock().unwrap().len() >= TOTAL {
                break;
            }
            assert!(Instant::now() < deadline, "not all messages handled in time");
            if !close_requested.load(Ordering::SeqCst)
                && completed.lock().unwrap().len() >= 20
                && !handlers.is_empty()
            {
                close_requested.store(true, Ordering::SeqCst);
                let queue = queue.clone();
                let closed_tx = closed_tx.clone();
                closer = Some(tokio::spawn(async move {
                    let closed = support::close_connections_containing(&queue).await;
                    let _ = closed_tx.send(true);
                    closed
                }));
            }
            let room = PREFETCH - handlers.len();
            if room == 0 {
                handlers.join_next().await;
                continue;
            }
            let received = timeout(PROMPTLY, source.receive(room, Duration::from_millis(200)))
                .await
                .expect("receive hung after the connection closed");
            match received {
                Ok(batch) => {
                    for delivery in batch {
                        let completed = completed.clone();
                        let lock_lost = lock_lost.clone();
                        let other_errors = other_errors.clone();
                        let close_requested = close_requested.clone();
                        let mut closed_rx = closed_rx.clone();
                        handlers.spawn(async move {
                            sleep(Duration::from_millis(200)).await;
                            if close_requested.load(Ordering::SeqCst) {
                                let _ = closed_rx.wait_for(|closed| *closed).await;
                            }
                            let id = delivery.message().id.clone();
                            match delivery.complete().await {
                                Ok(()) => *completed.lock().unwrap().entry(id).or_default() += 1,
                                Err(TransportError::LockLost { .. }) => {
                                    lock_lost.fetch_add(1, Ordering::SeqCst);
                                }
                                Err(error) => other_errors
                                    .lock()
                                    .unwrap()
                                    .push(steward_core::error_chain(&error)),
                            }
                        });
                    }
                }
                Err(error) => {
                    assert!(error.is_retryable(), "{}", steward_core::error_chain(&error));
                    receive_failures.push(steward_core::error_chain(&error));
                    break;
                }
            }
        }
        // The handlers of a dead source finish (with LockLost) before reconnecting.
        while handlers.join_next().await.is_some() {}
    }

    let closed = closer.expect("the connection was closed mid-run").await.unwrap();
    assert!(closed >= 1, "no connection named after {queue} to close");
    let completed = completed.lock().unwrap().clone();
    let missing: Vec<_> =
        (0..TOTAL).map(|i| format!("m-{i}")).filter(|id| !completed.contains_key(id)).collect();
    assert!(missing.is_empty(), "never handled: {missing:?}");
    assert!(other_errors.lock().unwrap().is_empty(), "{:?}", other_errors.lock().unwrap());
    assert!(lock_lost.load(Ordering::SeqCst) >= 1, "no delivery of the dead channel was settled");
    assert_eq!(
        receive_failures.len(),
        1,
        "failures besides the closed connection: {receive_failures:?}"
    );
    assert_eq!(sources, 2, "one reconnect after the closed connection");
    assert_eq!(support::wait_until_empty(&queue, PROMPTLY).await, Some(0));
}

fn fast_restarts() -> SupervisorConfig {
    SupervisorConfig::default()
        .with_backoff(
            Backoff::new(Duration::from_millis(100), Duration::from_millis(400))
                .with_jitter(Jitter::none()),
        )
        .with_intensity(RestartIntensity { max_restarts: 3, within: Duration::from_secs(600) })
}

/// Ensures that 1,000 messages go through an `Updater` while the test closes the
/// consumer's connection three times: the worker reconnects after each, every message
/// is handled at least once, and the queue ends empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updater_handles_every_message_while_its_connection_is_closed_three_times() {
    require_broker!("updater_handles_every_message_while_its_connection_is_closed_three_times");
    const TOTAL: usize = 1000;
    /// After this many handler starts, the test closes the connection (once each).
    const CLOSE_AT: [usize; 3] = [150, 450, 750];
    let test_queue =
        support::TestQueue::declare("steward-fault-updater", |b| b.with_concurrency(8)).await;
    let (queue, rabbit) = (test_queue.name.clone(), test_queue.rabbit.clone());
    let sink = rabbit.sink();
    for i in 0..TOTAL {
        sink.send(
            &queue,
            OutgoingMessage::json(format!("{{\"n\":{i}}}")).with_message_id(format!("u-{i}")),
        )
        .await
        .unwrap();
    }

    let handled: Arc<Mutex<HashSet<String>>> = Arc::default();
    let started = Arc::new(AtomicUsize::new(0));
    // The handler that reaches a threshold asks for a close; from then on every handler
    // waits at its end until the close happened, so the close hits the consumer with
    // handlers in flight and nothing races ahead while `rabbitmqctl` runs.
    let requested = Arc::new(AtomicUsize::new(0));
    let (close_tx, mut close_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let (closes_tx, closes_rx) = watch::channel(0usize);
    let handler = {
        let handled = handled.clone();
        let started = started.clone();
        let requested = requested.clone();
        handler_fn(move |message| {
            let handled = handled.clone();
            let requested = requested.clone();
            let n = started.fetch_add(1, Ordering::SeqCst);
            if let Some(k) = CLOSE_AT.iter().position(|at| *at == n) {
                requested.fetch_max(k + 1, Ordering::SeqCst);
                let _ = close_tx.send(k);
            }
            let mut closes_rx = closes_rx.clone();
            async move {
                sleep(Duration::from_millis(2)).await;
                let wanted = requested.load(Ordering::SeqCst);
                let _ = timeout(PROMPTLY, closes_rx.wait_for(|done| *done >= wanted)).await;
                handled.lock().unwrap().insert(message.id.clone());
                Outcome::Complete
            }
        })
    };
    let connect = support::connector(&rabbit, &queue);
    let updater = Updater::new("fault-updater", connect, handler).with_config(
        UpdaterConfig::default()
            .with_concurrency(8)
            .with_batch_size(16)
            .with_wait(Duration::from_secs(1)),
    );
    let supervisor = Supervisor::new(fast_restarts());
    supervisor.spawn(updater);
    let health = supervisor.health();

    let deadline = Instant::now() + Duration::from_secs(180);
    let mut closed = Vec::new();
    while handled.lock().unwrap().len() < TOTAL {
        assert!(Instant::now() < deadline, "only {} handled", handled.lock().unwrap().len());
        if let Ok(k) = close_rx.try_recv() {
            closed.push(support::close_connections_containing(&queue).await);
            let _ = closes_tx.send(k + 1);
        }
        sleep(Duration::from_millis(20)).await;
    }
    let snapshot = health.snapshot();
    let worker = snapshot.worker("fault-updater").unwrap().clone();
    let report = supervisor.shutdown(Instant::now() + Duration::from_secs(10)).await;

    assert_eq!(closed.len(), 3, "the three closes happened");
    assert!(
        closed.iter().all(|n| *n >= 1),
        "each close found the consumer's connection: {closed:?}"
    );
    assert!(worker.restarts >= 3, "the worker reconnected after each close: {worker:?}");
    assert_ne!(worker.state, WorkerState::Failed, "{worker:?}");
    assert!(worker.outcomes.lease_lost >= 3, "in-flight deliveries of dead channels: {worker:?}");
    assert_eq!(report.stopped, ["fault-updater"]);
    assert_eq!(handled.lock().unwrap().len(), TOTAL);
    assert_eq!(support::wait_until_empty(&queue, PROMPTLY).await, Some(0));
}

/// Ensures that a worker whose credentials are refused is `failed` once the restart
/// limit is reached, after a bounded number of attempts with backoff between them, and
/// does not try again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updater_with_wrong_password_fails_after_the_restart_limit() {
    require_broker!("updater_with_wrong_password_fails_after_the_restart_limit");
    let (queue, builder) = support::unique_queue("steward-fault-auth-worker");
    let rabbit = builder
        .with_url(with_password(&support::broker_url(), "not-the-password"))
        .build()
        .unwrap();
    let attempts = Arc::new(AtomicUsize::new(0));
    let connect = {
        let attempts = attempts.clone();
        move || {
            let rabbit = rabbit.clone();
            let queue = queue.clone();
            attempts.fetch_add(1, Ordering::SeqCst);
            async move { rabbit.source(&queue).await }
        }
    };
    let handler = handler_fn(|_| async { Outcome::Complete });
    let supervisor = Supervisor::new(fast_restarts());
    supervisor.spawn(Updater::new("auth-worker", connect, handler));
    let health = supervisor.health();

    let started = Instant::now();
    let worker = loop {
        let worker = health.snapshot().worker("auth-worker").unwrap().clone();
        if worker.state == WorkerState::Failed {
            break worker;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "never failed: {worker:?}");
        sleep(Duration::from_millis(50)).await;
    };
    let took = started.elapsed();
    // Three restarts are allowed; the fourth refusal is fatal.
    assert_eq!(attempts.load(Ordering::SeqCst), 4);
    // Backoff between attempts: 100 + 200 + 400 ms at least.
    assert!(took >= Duration::from_millis(700), "failed after only {took:?}");
    let error = worker.last_error.unwrap_or_default();
    assert!(error.contains("not authorised"), "{error}");
    sleep(Duration::from_secs(1)).await;
    assert_eq!(attempts.load(Ordering::SeqCst), 4, "a failed worker is not restarted");
    assert_eq!(health.snapshot().worker("auth-worker").unwrap().state, WorkerState::Failed);
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}
