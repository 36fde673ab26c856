//! Graceful shutdown: draining, deadlines, aborting and abandoning.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use steward_core::{
    Capabilities, Deadlines, Delivery, MessageSource, Outcome, TransportError, Updater,
    WorkerState, handler_fn,
};
use support::{
    QUEUE, broker, broker_holding, config, eventually, send, supervise, supervisor, worker,
};
use tokio::time::{Instant, sleep};

/// Ensures that handlers in flight at shutdown finish and are settled within the drain
/// deadline, their locks renewed meanwhile (they run longer than the lock), that the
/// message that had not started is released at once, and that the shutdown returns as
/// soon as they are settled, with nothing left running.
#[tokio::test(start_paused = true)]
async fn in_flight_handlers_finish_within_drain_deadline() {
    let broker = broker(Duration::from_secs(5));
    for i in 0..5 {
        send(&broker, &format!("m{i}"), None).await;
    }
    let started = Arc::new(AtomicUsize::new(0));
    let handler = {
        let started = started.clone();
        handler_fn(move |_| {
            started.fetch_add(1, Ordering::SeqCst);
            async {
                sleep(Duration::from_secs(8)).await;
                Outcome::Complete
            }
        })
    };
    let (supervisor, health) = supervise(
        Updater::with_source("drainer", broker.source(QUEUE).unwrap(), handler)
            .with_config(config().with_concurrency(4)),
    );
    eventually("all started", Duration::from_secs(5), || started.load(Ordering::SeqCst) == 4).await;
    let begun = Instant::now();

    let deadlines = Deadlines::until(begun + Duration::from_secs(10));
    let report = supervisor.shutdown(deadlines).await;
    assert!(Instant::now() < deadlines.drain(), "waited past the handlers");
    assert!(Instant::now() - begun <= Duration::from_secs(8), "returned when they were done");
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.stopped, ["drainer"]);
    let snapshot = worker(&health, "drainer");
    assert_eq!(snapshot.outcomes.completed, 4, "{snapshot:?}");
    assert_eq!(snapshot.outcomes.lease_lost, 0, "{snapshot:?}");
    assert_eq!(snapshot.state, WorkerState::Stopped);
    assert_eq!(started.load(Ordering::SeqCst), 4, "the fifth never started");
    // Only the fifth is left, available at once to another consumer.
    assert_eq!(broker.message_count(QUEUE), 1);
    let fresh = broker.source(QUEUE).unwrap();
    let got = fresh.receive(10, Duration::ZERO).await.unwrap();
    let ids: Vec<_> = got.iter().map(|d| d.message().id.clone()).collect();
    assert_eq!(ids, ["m4"]);
}

/// Ensures that past the drain deadline, handlers that ignore cancellation are aborted
/// and their messages abandoned (another consumer gets them at once), that `shutdown`
/// returns by its deadline naming them, and that no tracked task is left.
#[tokio::test(start_paused = true)]
async fn handlers_past_drain_deadline_are_aborted_and_abandoned() {
    let broker =
        broker_holding(Duration::from_secs(60), &["quick", "stubborn", "never-started"]).await;
    let handler = handler_fn(|message| async move {
        if message.id == "stubborn" {
            // Ignores cancellation: would run for an hour.
            sleep(Duration::from_secs(3600)).await;
        } else {
            sleep(Duration::from_secs(1)).await;
        }
        Outcome::Complete
    });
    let (supervisor, health) = supervise(
        Updater::with_source("stubborn", broker.source(QUEUE).unwrap(), handler)
            .with_config(config().with_concurrency(2)),
    );
    eventually("two running", Duration::from_secs(5), || {
        worker(&health, "stubborn").in_flight >= 2
    })
    .await;

    let deadline = Instant::now() + Duration::from_secs(10);
    let report = supervisor.shutdown(deadline).await;
    assert!(Instant::now() <= deadline, "shutdown overran its deadline");
    let aborted: Vec<_> = report.aborted_handlers.iter().map(|a| a.message_id.as_str()).collect();
    assert_eq!(aborted, ["stubborn"], "{report:?}");
    assert!(!report.aborted_handlers[0].blocked);
    assert_eq!(report.aborted_handlers[0].worker, "stubborn");
    assert!(report.overran.is_empty(), "{report:?}");
    assert_eq!(report.tasks_left, 0, "no tracked task outlived the shutdown");

    // Both unfinished messages are available to a new consumer at once.
    let fresh = broker.source(QUEUE).unwrap();
    let got = fresh.receive(10, Duration::ZERO).await.unwrap();
    let mut ids: Vec<_> = got.iter().map(|d| d.message().id.clone()).collect();
    ids.sort();
    assert_eq!(ids, ["never-started", "stubborn"]);
    assert_eq!(worker(&health, "stubborn").outcomes.completed, 1, "quick completed");
}

/// A source whose `stop_receiving` never answers.
struct StopHangs<S>(S);

#[async_trait]
impl<S: MessageSource> MessageSource for StopHangs<S> {
    fn queue(&self) -> &str {
        self.0.queue()
    }

    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }

    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, TransportError> {
        self.0.receive(max, wait).await
    }

    async fn stop_receiving(&self) -> Result<(), TransportError> {
        std::future::pending().await
    }
}

/// Ensures that a `stop_receiving` that never answers holds up neither the handlers'
/// results nor their lock renewals during the drain: a handler running longer than its
/// lock finishes within the drain and its message is completed, not lost.
#[tokio::test(start_paused = true)]
async fn hung_stop_receiving_does_not_stop_renewals_during_the_drain() {
    let broker = broker(Duration::from_secs(20));
    send(&broker, "twenty", None).await;
    let supervisor = supervisor();
    supervisor.spawn(Updater::with_source(
        "stop-hangs",
        StopHangs(broker.source(QUEUE).unwrap()),
        handler_fn(|_| async {
            sleep(Duration::from_secs(20)).await;
            Outcome::Complete
        }),
    ));
    let health = supervisor.health();
    sleep(Duration::from_secs(1)).await;
    let report = supervisor.shutdown(Instant::now() + Duration::from_secs(60)).await;
    let w = worker(&health, "stop-hangs");
    assert!(report.aborted_handlers.is_empty(), "{report:?}");
    assert_eq!((w.outcomes.completed, w.outcomes.lease_lost), (1, 0), "{w:?}");
    assert_eq!(broker.message_count(QUEUE), 0);
}

/// Shuts down, 25 s ahead, a worker whose one handler never ends, over a broker that
/// answers every call `latency` late; returns the report's one aborted handler and the
/// messages still locked 2 s after the shutdown returned.
async fn shutdown_over_a_slow_broker(
    latency: Duration,
) -> (steward_core::AbortedHandler, Vec<String>) {
    let broker = broker(Duration::from_secs(300));
    send(&broker, "forever", None).await;
    let supervisor = supervisor();
    supervisor.spawn(Updater::with_source(
        "slow-broker",
        broker.source(QUEUE).unwrap(),
        handler_fn(|_| async {
            std::future::pending::<()>().await;
            Outcome::Complete
        }),
    ));
    sleep(Duration::from_secs(1)).await;
    broker.faults(QUEUE).set_latency(latency);
    let report = supervisor.shutdown(Instant::now() + Duration::from_secs(25)).await;
    assert_eq!(report.aborted_handlers.len(), 1, "{report:?}");
    sleep(Duration::from_secs(2)).await;
    (report.aborted_handlers[0].clone(), broker.locked_message_ids(QUEUE))
}

/// Ensures that a shutdown leaves a real budget for abandoning the messages of aborted
/// handlers: over a broker answering in 700 ms the message is abandoned, not left to
/// lock expiry, and the report says so.
#[tokio::test(start_paused = true)]
async fn aborted_handlers_messages_are_abandoned_over_a_slow_broker() {
    let (aborted, locked) = shutdown_over_a_slow_broker(Duration::from_millis(700)).await;
    assert_eq!(locked, Vec::<String>::new(), "left locked");
    assert_eq!(
        (aborted.message_id.as_str(), aborted.blocked, aborted.abandoned),
        ("forever", false, true)
    );
}

/// Ensures that the shutdown report does not claim an abandon the broker did not answer
/// by the deadline.
#[tokio::test(start_paused = true)]
async fn an_abandon_unanswered_by_the_deadline_is_reported_as_not_abandoned() {
    let (aborted, _) = shutdown_over_a_slow_broker(Duration::from_secs(10)).await;
    assert_eq!((aborted.message_id.as_str(), aborted.abandoned), ("forever", false));
}
