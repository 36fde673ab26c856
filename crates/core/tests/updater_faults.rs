//! The Updater against a transport whose settlements and renewals hang, fail or lose
//! their locks.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use steward_core::{Message, MessageSource, Outcome, Updater, handler_fn};
use support::{
    Faulty, LocalSessions, QUEUE, SettleFaults, broker, broker_holding,
    broker_holding_local_sessions, config, eventually, recorded, send, supervise, supervisor,
    worker,
};
use tokio::time::{Instant, sleep};

type Calls = Arc<Mutex<Vec<(String, u32)>>>;

/// What the tests record of a call: `(id, delivery count)`.
fn record(message: &Message) -> (String, u32) {
    (message.id.clone(), message.delivery_count)
}

/// A handler recording `(id, delivery count)`; messages named `slow*` take 60 s.
fn recording(calls: &Calls) -> impl steward_core::Handler {
    recorded(calls, record, |message| async move {
        if message.id.starts_with("slow") {
            sleep(Duration::from_secs(60)).await;
        }
        Outcome::Complete
    })
}

/// Ensures that one settlement that never returns does not stop the renewals of the
/// other running handlers: the slow handler keeps its lock for its whole minute and its
/// message is handled once, with no restart.
#[tokio::test(start_paused = true)]
async fn hung_settlement_does_not_stop_other_renewals() {
    let broker = broker_holding(Duration::from_secs(10), &["slow", "quick"]).await;
    let faults = Arc::new(SettleFaults::default());
    SettleFaults::arm(&faults.hang_complete, "quick", 1);
    let calls: Calls = Arc::default();
    let supervisor = supervisor();
    let source = Faulty { inner: broker.source(QUEUE).unwrap(), faults };
    supervisor.spawn(
        Updater::with_source("renewing", source, recording(&calls))
            .with_config(config().with_concurrency(2)),
    );
    let health = supervisor.health();
    sleep(Duration::from_secs(70)).await;
    let slow: Vec<_> =
        calls.lock().unwrap().iter().filter(|(id, _)| id == "slow").cloned().collect();
    assert_eq!(slow, [("slow".to_owned(), 1)], "slow handled once, on its first delivery");
    let snapshot = worker(&health, "renewing");
    assert_eq!(snapshot.restarts, 0, "{snapshot:?}");
    assert_eq!(snapshot.outcomes.lease_lost, 0, "{snapshot:?}");
    assert!(snapshot.outcomes.completed >= 1, "slow completed: {snapshot:?}");
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Without broker sessions: a running message whose lock is lost, or whose completion
/// fails, keeps its session until the broker redelivers it, so the next message of the
/// session cannot overtake the redelivery.
async fn unsettled_message_holds_its_session(fault: fn(&SettleFaults)) {
    let broker =
        broker_holding_local_sessions(Duration::from_secs(10), &[("slow-a", "s"), ("b", "s")])
            .await;
    let faults = Arc::new(SettleFaults::default());
    fault(&faults);
    let calls: Calls = Arc::default();
    let supervisor = supervisor();
    let source = LocalSessions(Faulty { inner: broker.source(QUEUE).unwrap(), faults });
    supervisor
        .spawn(Updater::with_source("ordered", source, recording(&calls)).with_config(config()));
    let health = supervisor.health();
    eventually("both completed", Duration::from_secs(600), || {
        worker(&health, "ordered").outcomes.completed >= 2
    })
    .await;
    let calls = calls.lock().unwrap().clone();
    let order: Vec<&str> = calls.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(order, ["slow-a", "slow-a", "b"], "the redelivery ran before b: {calls:?}");
    assert_eq!(calls[1].1, 2, "the second run of slow-a is its redelivery");
    assert_eq!(broker.message_count(QUEUE), 0);
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Ensures that a running message that lost its lock holds its session until it is back.
#[tokio::test(start_paused = true)]
async fn lost_lock_holds_the_session_until_the_redelivery() {
    unsettled_message_holds_its_session(|faults| {
        SettleFaults::arm(&faults.lose_renewal, "slow-a", 1);
    })
    .await;
}

/// Ensures that a message whose completion failed holds its session until it is back.
#[tokio::test(start_paused = true)]
async fn failed_completion_holds_the_session_until_the_redelivery() {
    unsettled_message_holds_its_session(|faults| {
        SettleFaults::arm(&faults.fail_complete, "slow-a", 1);
    })
    .await;
}

/// Ensures that the drain honours its deadlines when a settlement hangs: the handler
/// still running at the drain deadline is aborted and its message abandoned (another
/// consumer gets it at once), and the worker stops in time (it is not aborted itself).
#[tokio::test(start_paused = true)]
async fn drain_meets_its_deadlines_when_a_settlement_hangs() {
    let broker = broker_holding(Duration::from_secs(60), &["quick", "stubborn"]).await;
    let faults = Arc::new(SettleFaults::default());
    SettleFaults::arm(&faults.hang_complete, "quick", 1);
    let handler = handler_fn(|message| async move {
        if message.id == "stubborn" {
            sleep(Duration::from_secs(3600)).await;
        } else {
            sleep(Duration::from_secs(2)).await;
        }
        Outcome::Complete
    });
    let supervisor = supervisor();
    let source = Faulty { inner: broker.source(QUEUE).unwrap(), faults };
    supervisor.spawn(
        Updater::with_source("draining", source, handler).with_config(config().with_concurrency(2)),
    );
    let health = supervisor.health();
    eventually("two running", Duration::from_secs(5), || {
        worker(&health, "draining").in_flight == 2
    })
    .await;

    let deadline = Instant::now() + Duration::from_secs(10);
    let report = supervisor.shutdown(deadline).await;
    assert!(Instant::now() <= deadline, "shutdown overran its deadline");
    assert!(report.overran.is_empty(), "the worker had to be aborted: {report:?}");
    let aborted: Vec<_> = report.aborted_handlers.iter().map(|a| a.message_id.as_str()).collect();
    assert_eq!(aborted, ["stubborn"], "{report:?}");
    let fresh = broker.source(QUEUE).unwrap();
    let got = fresh.receive(10, Duration::ZERO).await.unwrap();
    let ids: Vec<_> = got.iter().map(|d| d.message().id.clone()).collect();
    assert_eq!(ids, ["stubborn"], "the aborted handler's message was abandoned");
}

/// Ensures that failed renewal rounds are not progress: a handler that hangs while
/// every renewal of its lock fails leaves the worker without progress, so the watchdog
/// restarts it after the stall timeout.
#[tokio::test(start_paused = true)]
async fn failing_renewals_are_not_progress() {
    let broker = broker(Duration::from_secs(10));
    send(&broker, "hung", None).await;
    let faults = Arc::new(SettleFaults::default());
    SettleFaults::arm(&faults.fail_renewal, "hung", u32::MAX);
    let handler = handler_fn(|_| async {
        sleep(Duration::from_secs(3600)).await;
        Outcome::Complete
    });
    let supervisor = supervisor();
    let source = Faulty { inner: broker.source(QUEUE).unwrap(), faults: faults.clone() };
    supervisor.spawn(
        Updater::with_source("unreachable", source, handler)
            .with_config(config().with_concurrency(1).with_stall_timeout(Duration::from_secs(30))),
    );
    let health = supervisor.health();
    sleep(Duration::from_secs(45)).await;
    let snapshot = worker(&health, "unreachable");
    assert!(snapshot.restarts >= 1, "never stalled: {snapshot:?}");
    assert!(snapshot.last_error.unwrap_or_default().contains("stalled"));
    assert!(faults.renewals.load(std::sync::atomic::Ordering::SeqCst) >= 5, "renewals were tried");
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Ensures that a lock whose renewal answers with an expiry that is not in the future
/// is renewed at most once a second, not back-to-back.
#[tokio::test(start_paused = true)]
async fn stale_lock_expiry_is_not_renewed_back_to_back() {
    let broker = broker(Duration::from_secs(10));
    send(&broker, "slow", None).await;
    let faults = Arc::new(SettleFaults::default());
    // Enough to spin for ever at one instant; the count below catches it first.
    SettleFaults::arm(&faults.stale_renewal, "slow", 10_000);
    let calls: Calls = Arc::default();
    let supervisor = supervisor();
    let source = Faulty { inner: broker.source(QUEUE).unwrap(), faults: faults.clone() };
    supervisor
        .spawn(Updater::with_source("skewed", source, recording(&calls)).with_config(config()));
    sleep(Duration::from_secs(20)).await;
    let renewals = faults.renewals.load(std::sync::atomic::Ordering::SeqCst);
    // At most one a second (back-to-back renewals would use up all 10,000 at once).
    assert!((10..=21).contains(&renewals), "{renewals} renewals in 20 s");
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Ensures that a handler running past `handler_timeout` is aborted and its message
/// retried, and that its session's next message waits for the retry.
#[tokio::test(start_paused = true)]
async fn handler_past_its_timeout_is_aborted_and_retried() {
    let broker =
        broker_holding_local_sessions(Duration::from_secs(30), &[("hangs", "s"), ("next", "s")])
            .await;
    let calls: Calls = Arc::default();
    let handler = recorded(&calls, record, |message| async move {
        if message.id == "hangs" && message.delivery_count == 1 {
            std::future::pending::<()>().await;
        }
        Outcome::Complete
    });
    let supervisor = supervisor();
    let source = LocalSessions(broker.source(QUEUE).unwrap());
    supervisor.spawn(
        Updater::with_source("bounded", source, handler)
            .with_config(config().with_handler_timeout(Duration::from_secs(5))),
    );
    let health = supervisor.health();
    eventually("both completed", Duration::from_secs(120), || {
        worker(&health, "bounded").outcomes.completed == 2
    })
    .await;
    let calls = calls.lock().unwrap().clone();
    assert_eq!(
        calls,
        [("hangs".to_owned(), 1), ("hangs".to_owned(), 2), ("next".to_owned(), 1)],
        "aborted, retried, and only then the next message"
    );
    let snapshot = worker(&health, "bounded");
    assert_eq!((snapshot.outcomes.retried, snapshot.restarts), (1, 0), "{snapshot:?}");
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Ensures that an endless error drain saturates instead of panicking the worker: after
/// a receive error the worker backs off and recovers.
#[tokio::test(start_paused = true)]
async fn endless_error_drain_is_not_a_panic() {
    let broker = broker(Duration::from_secs(30));
    broker.faults(QUEUE).fail_receives(1, steward_core::ErrorKind::Connection);
    let mut config = config();
    config.error_drain = Duration::MAX;
    let (supervisor, health) = supervise(
        Updater::with_source(
            "endless",
            broker.source(QUEUE).unwrap(),
            handler_fn(|_| async { Outcome::Complete }),
        )
        .with_config(config),
    );
    eventually("a restart", Duration::from_secs(30), || worker(&health, "endless").restarts >= 1)
        .await;
    let error = worker(&health, "endless").last_error.unwrap_or_default();
    assert!(!error.contains("panicked"), "{error}");
    send(&broker, "after", None).await;
    eventually("handled after the restart", Duration::from_secs(30), || {
        worker(&health, "endless").outcomes.completed == 1
    })
    .await;
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Ensures that an endless receive wait saturates instead of panicking the worker: it
/// handles messages and stops cleanly.
#[tokio::test(start_paused = true)]
async fn endless_wait_is_not_a_panic() {
    let broker = broker(Duration::from_secs(30));
    send(&broker, "first", None).await;
    let (supervisor, health) = supervise(
        Updater::with_source(
            "endless",
            broker.source(QUEUE).unwrap(),
            handler_fn(|_| async { Outcome::Complete }),
        )
        .with_config(config().with_wait(Duration::MAX)),
    );
    eventually("handled", Duration::from_secs(30), || {
        worker(&health, "endless").outcomes.completed == 1
    })
    .await;
    let snapshot = worker(&health, "endless");
    assert_eq!(snapshot.restarts, 0, "{snapshot:?}");
    let report = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
    assert!(report.is_clean(), "{report:?}");
}
