//! The stall watchdog.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use steward_core::{Outcome, Updater, WorkerState, handler_fn};
use support::{QUEUE, broker, config, eventually, send, supervisor, worker};
use tokio::time::Instant;

/// Ensures that a worker whose `receive` never returns is detected as `stalled` after its
/// stall timeout, cancelled and restarted (counted as a restart), and works again once
/// the source answers.
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

    eventually("a restart", Duration::from_secs(120), || worker(&health, "stuck").restarts >= 1)
        .await;
    let stalled_at = states
        .lock()
        .unwrap()
        .iter()
        .find(|(state, _)| *state == WorkerState::Stalled)
        .map(|(_, at)| *at)
        .expect("the worker was reported stalled");
    assert_eq!(stalled_at - started, stall, "stalled exactly after the stall timeout");
    let snapshot = worker(&health, "stuck");
    assert!(snapshot.last_error.unwrap().contains("stalled"));

    broker.faults(QUEUE).clear();
    send(&broker, "unstuck", None).await;
    eventually("handled after the restart", Duration::from_secs(600), || {
        worker(&health, "stuck").outcomes.completed == 1
    })
    .await;
    assert_eq!(worker(&health, "stuck").state, WorkerState::Running);
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
    recorder.abort();
}
