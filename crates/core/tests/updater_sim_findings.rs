//! Regression tests for what the deterministic simulation (`cargo xtask sim`) found in
//! the Updater; each names the seed that failed before its fix.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use steward_core::{
    Backoff, BoxError, Handler, Jitter, Message, MessageSource, Outcome, SupervisorConfig, Updater,
    WorkerState, handler_fn,
};
use support::{
    Faulty, LocalSessions, QUEUE, SettleFaults, broker, broker_holding_local_sessions, config,
    eventually, send, send_local_session, supervisor, worker,
};
use tokio::time::{Instant, sleep};

/// When each handler call began and ended: `(message id, delivery count, start, end)`.
type Calls = Arc<Mutex<Vec<(String, u32, Instant, Instant)>>>;

/// A handler that records its calls, works `work(id)` long, then completes.
fn recording(calls: &Calls, work: fn(&str) -> Duration) -> impl Handler + use<> {
    let calls = calls.clone();
    handler_fn(move |message: Arc<Message>| {
        let calls = calls.clone();
        async move {
            let started = Instant::now();
            sleep(work(&message.id)).await;
            calls.lock().unwrap().push((
                message.id.clone(),
                message.delivery_count,
                started,
                Instant::now(),
            ));
            Outcome::Complete
        }
    })
}

/// Ensures that a message dead-lettered for its delivery count, in the same batch as a
/// message of its session that starts, does not free that session: the next message
/// waits for the running one (simulation seed 5).
#[tokio::test(start_paused = true)]
async fn a_dead_letter_for_the_delivery_count_does_not_free_a_running_session() {
    let broker = broker(Duration::from_secs(30));
    send_local_session(&broker, "old", "s").await;
    // One delivery of "old" already spent: the Updater sees it a second time.
    let direct = broker.source(QUEUE).unwrap();
    let first = direct.receive(1, Duration::from_secs(1)).await.unwrap();
    first.into_iter().next().unwrap().abandon(None).await.unwrap();
    send_local_session(&broker, "a", "s").await;
    send_local_session(&broker, "b", "s").await;
    let calls: Calls = Arc::default();
    let handler =
        recording(&calls, |id| if id == "a" { Duration::from_secs(10) } else { Duration::ZERO });
    let supervisor = supervisor();
    let source = LocalSessions(broker.source(QUEUE).unwrap());
    let config = config().with_max_deliveries(1).with_concurrency(4).with_batch_size(8);
    supervisor.spawn(Updater::with_source("limited", source, handler).with_config(config));
    let health = supervisor.health();
    eventually("a and b completed", Duration::from_secs(60), || {
        worker(&health, "limited").outcomes.completed == 2
    })
    .await;
    assert_eq!(broker.dead_letters(QUEUE).len(), 1, "old went to the dead-letter queue");
    let calls = calls.lock().unwrap().clone();
    let (a, b) = (&calls[0], &calls[1]);
    assert_eq!((a.0.as_str(), b.0.as_str()), ("a", "b"));
    assert!(b.2 >= a.3, "b started at {:?}, while a ran until {:?}", b.2, a.3);
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Ensures that a waiting message whose lock is lost does not free its session while
/// the message ahead of it still runs: its redelivery waits for the running one
/// (simulation seed 2).
#[tokio::test(start_paused = true)]
async fn a_follower_losing_its_lock_does_not_free_a_running_session() {
    let broker =
        broker_holding_local_sessions(Duration::from_secs(10), &[("a", "s"), ("b", "s")]).await;
    let faults = Arc::new(SettleFaults::default());
    SettleFaults::arm(&faults.lose_renewal, "b", 1);
    let calls: Calls = Arc::default();
    let handler =
        recording(&calls, |id| if id == "a" { Duration::from_secs(25) } else { Duration::ZERO });
    let supervisor = supervisor();
    let source = Faulty { inner: LocalSessions(broker.source(QUEUE).unwrap()), faults };
    let config = config().with_concurrency(4).with_batch_size(4);
    supervisor.spawn(Updater::with_source("lost", source, handler).with_config(config));
    let health = supervisor.health();
    eventually("a and b completed", Duration::from_secs(120), || {
        worker(&health, "lost").outcomes.completed == 2
    })
    .await;
    let calls = calls.lock().unwrap().clone();
    let (a, b) = (&calls[0], &calls[1]);
    assert_eq!((a.0.as_str(), b.0.as_str(), b.1), ("a", "b", 2), "b was redelivered");
    assert!(b.2 >= a.3, "b started at {:?}, while a ran until {:?}", b.2, a.3);
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// A handler whose dependency is down until switched on; records the order of calls.
struct Dependent {
    up: AtomicBool,
    calls: Mutex<Vec<(String, u32)>>,
}

#[async_trait]
impl Handler for Dependent {
    async fn handle(&self, message: Arc<Message>) -> Outcome {
        self.calls.lock().unwrap().push((message.id.clone(), message.delivery_count));
        if self.up.load(Ordering::SeqCst) {
            Outcome::Complete
        } else {
            Outcome::dependency_failed("database unavailable")
        }
    }

    async fn probe(&self) -> Result<(), BoxError> {
        if self.up.load(Ordering::SeqCst) { Ok(()) } else { Err("connection refused".into()) }
    }
}

/// Ensures that, without broker sessions, a session waiting for its head keeps waiting
/// while the circuit breaker is open: nothing is received meanwhile, so the wait's
/// bound does not run out, and when the dependency answers again the head is received
/// and runs before its follower (simulation seed 3).
#[tokio::test(start_paused = true)]
async fn a_session_waits_for_its_head_across_an_open_breaker() {
    let broker =
        broker_holding_local_sessions(Duration::from_secs(30), &[("head", "s"), ("follower", "s")])
            .await;
    let handler = Arc::new(Dependent { up: AtomicBool::new(false), calls: Mutex::default() });
    // The head is due back after 5 s: later than the receive under way returns.
    let retry =
        Backoff::new(Duration::from_secs(5), Duration::from_secs(60)).with_jitter(Jitter::none());
    let supervisor = supervisor();
    let source = LocalSessions(broker.source(QUEUE).unwrap());
    supervisor.spawn(
        Updater::with_source("paused", source, SharedHandler(handler.clone()))
            .with_config(config().with_concurrency(2).with_retry_backoff(retry)),
    );
    let health = supervisor.health();
    eventually("the breaker open", Duration::from_secs(5), || {
        worker(&health, "paused").state == WorkerState::BackingOff
    })
    .await;
    // Far past the wait's bound (5 s + 6 × 5 s delay + 2 × 1 s wait + 5 s slack).
    sleep(Duration::from_secs(60)).await;
    handler.up.store(true, Ordering::SeqCst);
    eventually("both completed", Duration::from_secs(60), || {
        worker(&health, "paused").outcomes.completed == 2
    })
    .await;
    let calls = handler.calls.lock().unwrap().clone();
    let order: Vec<_> = calls.iter().map(|(id, n)| format!("{id}#{n}")).collect();
    assert_eq!(order, ["head#1", "head#2", "follower#1"], "the follower overtook its head");
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Forwards to a shared handler, so the test can switch its dependency.
struct SharedHandler(Arc<Dependent>);

#[async_trait]
impl Handler for SharedHandler {
    async fn handle(&self, message: Arc<Message>) -> Outcome {
        self.0.handle(message).await
    }

    async fn probe(&self) -> Result<(), BoxError> {
        self.0.probe().await
    }
}

/// Ensures that a worker whose receive hangs for good ends `failed`, and not live, even
/// while a handler hangs beside it with its lock renewed: once a receive has gone
/// unanswered for `wait + broker_timeout`, renewals are no longer progress (simulation
/// seed 17). The bound: that, the stall under way, one backoff, then the stuck bound.
#[tokio::test(start_paused = true)]
async fn a_hung_receive_fails_the_worker_even_beside_a_renewed_hung_handler() {
    let broker = broker(Duration::from_secs(10));
    send(&broker, "hang", None).await;
    let started = Arc::new(AtomicBool::new(false));
    let handler = {
        let started = started.clone();
        handler_fn(move |_| {
            let started = started.clone();
            async move {
                started.store(true, Ordering::SeqCst);
                std::future::pending::<()>().await;
                Outcome::Complete
            }
        })
    };
    let supervisor = supervisor();
    let updater_config = config().with_concurrency(2);
    let stall = updater_config.effective_stall_timeout();
    let slack = updater_config.wait * 2 + updater_config.broker_timeout;
    supervisor.spawn(
        Updater::with_source("stuck", broker.source(QUEUE).unwrap(), handler)
            .with_config(updater_config),
    );
    let health = supervisor.health();
    eventually("the handler hangs", Duration::from_secs(5), || started.load(Ordering::SeqCst))
        .await;
    broker.faults(QUEUE).hang_receives(true);
    let hung_at = Instant::now();
    let defaults = SupervisorConfig::default();
    let bound =
        slack + stall + defaults.stall_grace + defaults.backoff.max() + defaults.stuck_bound(stall);
    eventually("the worker failed", bound, || {
        worker(&health, "stuck").state == WorkerState::Failed
    })
    .await;
    assert!(!health.snapshot().is_live());
    assert!(hung_at.elapsed() <= bound);
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}
