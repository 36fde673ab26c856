//! The stall watchdog.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use steward_core::{
    Capabilities, Delivery, MessageSource, Outcome, TransportError, Updater, WorkerState,
    handler_fn,
};
use support::{QUEUE, broker, config, eventually, send, supervisor, worker};
use tokio::time::Instant;

/// Ensures that a worker whose `receive` never returns is detected as `stalled` exactly
/// its stall timeout after each start, cancelled and restarted after the backoff
/// (counted as a restart), and works again once the source answers.
#[tokio::test(start_paused = true)]
async fn hung_receive_is_detected_as_stalled_and_restarted() {
    let broker = broker(Duration::from_secs(30));
    broker.faults(QUEUE).hang_receives(true);
    let supervisor = supervisor();
    let stall = Duration::from_secs(30);
    let updater = Updater::with_source(
        "stuck",
        broker.source(QUEUE).unwrap(),
        handler_fn(|_| async { Outcome::Complete }),
    )
    .with_config(config().with_stall_timeout(stall));
    let started = Instant::now();
    supervisor.spawn(updater);
    let health = supervisor.health();
    let states: Arc<Mutex<Vec<(WorkerState, Instant)>>> = Arc::default();
    let mut changes = health.subscribe();
    let recorder = {
        let states = states.clone();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let state = changes.borrow_and_update().worker("stuck").map(|w| w.state);
                if let Some(state) = state {
                    states.lock().unwrap().push((state, Instant::now()));
                }
            }
        })
    };

    eventually("two restarts", Duration::from_secs(120), || worker(&health, "stuck").restarts >= 2)
        .await;
    // Each start stalls its stall timeout after it began: at 30 s, then (after a 1 s
    // backoff) at 61 s.
    let stalled_at: Vec<Duration> = states
        .lock()
        .unwrap()
        .iter()
        .filter(|(state, _)| *state == WorkerState::Stalled)
        .map(|(_, at)| *at - started)
        .collect();
    assert_eq!(stalled_at, [stall, stall * 2 + Duration::from_secs(1)], "stall instants");
    let snapshot = worker(&health, "stuck");
    assert!(snapshot.last_error.unwrap().contains("stalled"));

    broker.faults(QUEUE).clear();
    send(&broker, "unstuck", None).await;
    eventually("handled after the restart", Duration::from_secs(600), || {
        worker(&health, "stuck").outcomes.completed == 1
    })
    .await;
    let snapshot = worker(&health, "stuck");
    assert_eq!(snapshot.state, WorkerState::Running);
    assert_eq!(snapshot.restarts, 2, "{snapshot:?}");
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
    recorder.abort();
}

/// Ensures that, with the default configurations, a worker whose `receive` hangs on every
/// start ends `failed` (and the snapshot not live) within the documented bound:
/// `stalls_before_failed × (stall timeout + stall grace)` plus the backoffs between them,
/// 3 × (85 s + 5 s) + 1 s + 2 s = 273 s, and not before its third stall.
#[tokio::test(start_paused = true)]
async fn permanently_hung_receive_ends_failed_within_the_documented_bound() {
    let broker = broker(Duration::from_secs(30));
    broker.faults(QUEUE).hang_receives(true);
    let supervisor = steward_core::Supervisor::new(steward_core::SupervisorConfig::default());
    let updater = Updater::with_source(
        "stuck",
        broker.source(QUEUE).unwrap(),
        handler_fn(|_| async { Outcome::Complete }),
    );
    let stall = updater.config().effective_stall_timeout();
    assert_eq!(stall, Duration::from_secs(85), "the default stall timeout");
    let started = Instant::now();
    supervisor.spawn(updater);
    let health = supervisor.health();
    let bound = Duration::from_secs(3 * (85 + 5) + 1 + 2);
    while worker(&health, "stuck").state != WorkerState::Failed {
        assert!(
            started.elapsed() <= bound,
            "still {:?} after {:?}: {:?}",
            worker(&health, "stuck").state,
            started.elapsed(),
            worker(&health, "stuck")
        );
        assert!(health.snapshot().is_live(), "not live before it failed");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        started.elapsed() >= stall * 3,
        "failed before its third stall: {:?}",
        started.elapsed()
    );
    assert!(!health.snapshot().is_live());
    let failed = worker(&health, "stuck");
    assert!(failed.last_error.as_deref().unwrap_or("").contains("stalled"), "{failed:?}");
    // It stays failed: no further restart.
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(worker(&health, "stuck").state, WorkerState::Failed);
    assert_eq!(worker(&health, "stuck").restarts, failed.restarts);
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Ensures that a broker refusing connections keeps the worker backing off for hours,
/// live (`/livez` 200) but not ready, with the cause named in the readiness reason.
#[tokio::test(start_paused = true)]
async fn refused_connections_back_off_forever_and_stay_live() {
    let supervisor = steward_core::Supervisor::new(steward_core::SupervisorConfig::default());
    let connect = || async {
        Err::<steward_inmem::InMemorySource, _>(steward_core::TransportError::connection(
            "connection refused by the broker",
        ))
    };
    supervisor.spawn(Updater::new("refused", connect, handler_fn(|_| async { Outcome::Complete })));
    let health = supervisor.health();
    for _ in 0..360 {
        tokio::time::sleep(Duration::from_secs(60)).await;
        let snapshot = health.snapshot();
        assert!(snapshot.is_live(), "{snapshot:?}");
        assert!(!snapshot.is_ready());
        let reason = snapshot.not_ready_reason().unwrap();
        assert!(reason.contains("connection refused by the broker"), "{reason}");
    }
    assert!(worker(&health, "refused").restarts >= 60, "kept restarting");
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Ensures that a worker whose receive hangs now and then, but which handles messages
/// between the outages, is restarted after each stall and never declared `failed`.
#[tokio::test(start_paused = true)]
async fn stalls_separated_by_progress_never_fail_the_worker() {
    let broker = broker(Duration::from_secs(30));
    let supervisor = steward_core::Supervisor::new(steward_core::SupervisorConfig::default());
    supervisor.spawn(Updater::with_source(
        "flaky",
        broker.source(QUEUE).unwrap(),
        handler_fn(|_| async { Outcome::Complete }),
    ));
    let health = supervisor.health();
    for round in 0..6u64 {
        broker.faults(QUEUE).hang_receives(true);
        let restarts = worker(&health, "flaky").restarts;
        eventually("a stall restart", Duration::from_secs(600), || {
            worker(&health, "flaky").restarts > restarts
        })
        .await;
        broker.faults(QUEUE).hang_receives(false);
        send(&broker, &format!("m{round}"), None).await;
        eventually("the message handled", Duration::from_secs(900), || {
            worker(&health, "flaky").outcomes.completed == round + 1
        })
        .await;
        assert_ne!(worker(&health, "flaky").state, WorkerState::Failed);
        assert!(health.snapshot().is_live());
    }
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Receives scripted per call, round and round: `true` hangs, `false` fails at once
/// with a retryable error.
struct Scripted {
    calls: AtomicUsize,
    hang: Vec<bool>,
}

#[async_trait]
impl MessageSource for Scripted {
    fn queue(&self) -> &str {
        "scripted"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::all()
    }

    async fn receive(&self, _max: usize, _wait: Duration) -> Result<Vec<Delivery>, TransportError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        if self.hang[n % self.hang.len()] {
            std::future::pending().await
        } else {
            Err(TransportError::connection("connection reset (scripted)"))
        }
    }

    async fn stop_receiving(&self) -> Result<(), TransportError> {
        Ok(())
    }
}

/// Ensures that a failed receive is not progress: a worker that never receives anything
/// (two hung starts, then a start whose receive fails with a retryable error, over and
/// over) ends `failed`, the failing start neither counting nor ending its run of
/// fruitless stalls.
#[tokio::test(start_paused = true)]
async fn failed_receives_do_not_end_a_run_of_fruitless_stalls() {
    let source = Scripted { calls: AtomicUsize::new(0), hang: vec![true, true, false] };
    let supervisor = supervisor();
    supervisor.spawn(Updater::with_source(
        "never-receives",
        source,
        handler_fn(|_| async { Outcome::Complete }),
    ));
    let health = supervisor.health();
    tokio::time::sleep(Duration::from_secs(6 * 3600)).await;
    let w = worker(&health, "never-receives");
    assert_eq!(w.state, WorkerState::Failed, "never received anything: {w:?}");
    assert!(!health.snapshot().is_live());
}

/// Per connection: the first receive is an empty poll after `wait`, every later one
/// hangs (a consumer whose channel dies silently after its first poll).
struct OnePollThenHang {
    polls: AtomicUsize,
}

#[async_trait]
impl MessageSource for OnePollThenHang {
    fn queue(&self) -> &str {
        "one-poll"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::all()
    }

    async fn receive(&self, _max: usize, wait: Duration) -> Result<Vec<Delivery>, TransportError> {
        if self.polls.fetch_add(1, Ordering::SeqCst) == 0 {
            tokio::time::sleep(wait).await;
            Ok(Vec::new())
        } else {
            std::future::pending().await
        }
    }

    async fn stop_receiving(&self) -> Result<(), TransportError> {
        Ok(())
    }
}

/// Ensures that a worker that makes one empty poll on every start and then hangs ends
/// `failed`, and not live, within the documented bound (default configs): a poll or
/// two is not a productive start.
#[tokio::test(start_paused = true)]
async fn one_empty_poll_per_start_then_a_hang_ends_failed() {
    let config = steward_core::SupervisorConfig::default();
    let updater = Updater::new(
        "one-poll",
        || async { Ok::<_, TransportError>(OnePollThenHang { polls: AtomicUsize::new(0) }) },
        handler_fn(|_| async { Outcome::Complete }),
    );
    let bound = config.stuck_bound(updater.config().effective_stall_timeout());
    let supervisor = steward_core::Supervisor::new(config);
    supervisor.spawn(updater);
    let health = supervisor.health();
    let started = Instant::now();
    eventually("the worker failed", bound + Duration::from_secs(1), || {
        !health.snapshot().is_live()
    })
    .await;
    let w = worker(&health, "one-poll");
    assert_eq!(w.state, WorkerState::Failed, "{w:?}");
    assert!(started.elapsed() <= bound, "failed after {:?}, bound {bound:?}", started.elapsed());
}
