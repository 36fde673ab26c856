//! Pausing, resuming and restarting one worker: `WorkerControls` on an updater.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use steward_core::{ControlError, Outcome, Updater, WorkerState, handler_fn};
use steward_inmem::InMemoryBroker;
use support::{QUEUE, broker, config, eventually, send, supervise, worker};
use tokio::sync::Semaphore;

/// An updater of `QUEUE` that opens a new source on every start.
fn updater(broker: &InMemoryBroker, handler: impl steward_core::Handler) -> Updater {
    let broker = broker.clone();
    Updater::new("status", move || std::future::ready(broker.source(QUEUE)), handler)
        .with_config(config().with_concurrency(1).with_batch_size(5))
}

/// Ensures that a paused updater lets its running handler finish, releases what it had
/// not started, takes nothing while paused (its state `paused`, which counts as ready)
/// and handles everything once resumed.
#[tokio::test(start_paused = true)]
async fn a_paused_updater_finishes_its_handler_takes_nothing_and_resumes() {
    let broker = broker(Duration::from_secs(30));
    let gate = Arc::new(Semaphore::new(0));
    let handled = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (gate, handled) = (gate.clone(), handled.clone());
        handler_fn(move |_| {
            let (gate, handled) = (gate.clone(), handled.clone());
            async move {
                gate.acquire().await.unwrap().forget();
                handled.fetch_add(1, Ordering::SeqCst);
                Outcome::Complete
            }
        })
    };
    for i in 0..3 {
        send(&broker, &format!("m{i}"), None).await;
    }
    let (supervisor, health) = supervise(updater(&broker, handler));
    let controls = supervisor.controls();
    eventually("a handler runs", Duration::from_secs(5), || {
        !broker.locked_message_ids(QUEUE).is_empty()
    })
    .await;

    controls.pause("status").unwrap();
    assert_eq!(controls.is_paused("status"), Some(true));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(worker(&health, "status").state, WorkerState::Stopping, "draining its handler");
    gate.add_permits(1);
    eventually("paused", Duration::from_secs(30), || {
        worker(&health, "status").state == WorkerState::Paused
    })
    .await;
    assert_eq!(handled.load(Ordering::SeqCst), 1, "the running handler finished");
    assert!(broker.locked_message_ids(QUEUE).is_empty(), "nothing unstarted is held");
    assert_eq!(broker.message_count(QUEUE), 2);

    gate.add_permits(100);
    for i in 3..23 {
        send(&broker, &format!("m{i}"), None).await;
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(broker.message_count(QUEUE), 22, "a paused worker takes nothing");
    let snapshot = health.snapshot();
    assert!(snapshot.is_ready(), "paused on purpose is ready: {:?}", snapshot.not_ready_reason());
    assert_eq!(worker(&health, "status").restarts, 0, "a pause is no restart");

    controls.resume("status").unwrap();
    eventually("all handled", Duration::from_secs(60), || broker.message_count(QUEUE) == 0).await;
    assert_eq!(handled.load(Ordering::SeqCst), 23);
    assert_eq!(worker(&health, "status").state, WorkerState::Running);
    let report = supervisor.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)).await;
    assert!(report.is_clean(), "{report:?}");
}

/// Ensures that a restart request starts the worker again at once, counted as a restart
/// but not toward its restart intensity, and that unknown workers are refused.
#[tokio::test(start_paused = true)]
async fn a_restart_request_starts_the_worker_again_now() {
    let broker = broker(Duration::from_secs(30));
    let (supervisor, health) =
        supervise(updater(&broker, handler_fn(|_| async { Outcome::Complete })));
    let controls = supervisor.controls();
    eventually("running", Duration::from_secs(5), || {
        worker(&health, "status").state == WorkerState::Running
    })
    .await;
    for round in 1..=5 {
        controls.restart("status").unwrap();
        eventually("restarted", Duration::from_secs(30), || {
            let status = worker(&health, "status");
            status.restarts == round && status.state == WorkerState::Running
        })
        .await;
    }
    send(&broker, "after", None).await;
    eventually("handled", Duration::from_secs(30), || broker.message_count(QUEUE) == 0).await;
    assert_eq!(worker(&health, "status").last_error, None, "restarts on request are no errors");
    assert_eq!(
        controls.restart("nobody"),
        Err(ControlError::Unknown("nobody".to_owned())),
        "unknown workers are refused"
    );
    assert_eq!(controls.is_paused("nobody"), None);
    let report = supervisor.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)).await;
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(
        controls.pause("status"),
        Err(ControlError::NotSupervised("status".to_owned())),
        "a worker shut down cannot be paused"
    );
}
