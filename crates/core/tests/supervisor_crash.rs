//! Restarts: backoff sequences, the restart intensity limit, panicking workers.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use steward_core::{
    Backoff, ErrorKind, Jitter, Outcome, RestartIntensity, Supervisor, SupervisorConfig, Updater,
    Worker, WorkerContext, WorkerError, WorkerState, handler_fn,
};
use support::{LogCapture, QUEUE, Timed, broker, config, eventually, send, worker};
use tokio::time::{Instant, sleep};

fn seeded_backoff() -> Backoff {
    Backoff::new(Duration::from_secs(1), Duration::from_secs(300))
        .with_jitter(Jitter::seeded(0.5, 7))
}

/// Ensures that a source failing with retryable errors makes the worker back off with
/// exactly the configured sequence (jitter seeded), stay `backing_off` and never become
/// `failed`, however many times it fails, then run again once the broker is back.
#[tokio::test(start_paused = true)]
async fn retryable_errors_back_off_in_sequence_and_never_fail() {
    const FAILURES: usize = 15;
    let broker = broker(Duration::from_secs(30));
    broker.faults(QUEUE).fail_receives(FAILURES as u32, ErrorKind::Connection);
    send(&broker, "after-the-outage", None).await;
    let calls: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let source = Timed { inner: broker.source(QUEUE).unwrap(), calls: calls.clone() };
    let supervisor = Supervisor::new(SupervisorConfig::default().with_backoff(seeded_backoff()));
    let updater =
        Updater::with_source("flaky", source, handler_fn(|_| async { Outcome::Complete }))
            .with_config(config());
    supervisor.spawn(updater);
    let health = supervisor.health();

    eventually("the outage to end", Duration::from_secs(3 * 3600), || {
        worker(&health, "flaky").outcomes.completed == 1
    })
    .await;
    let calls = calls.lock().unwrap().clone();
    assert!(calls.len() > FAILURES, "{} receives", calls.len());
    let expected_backoff = seeded_backoff();
    for n in 0..FAILURES {
        let gap = calls[n + 1] - calls[n];
        assert_eq!(gap, expected_backoff.delay(n as u32), "delay before attempt {}", n + 2);
    }
    let snapshot = worker(&health, "flaky");
    assert_eq!(snapshot.state, WorkerState::Running);
    assert_eq!(snapshot.restarts, FAILURES as u64);
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Ensures that a source failing with `Auth` errors makes the worker `failed` once the
/// restart limit is used up (and `/livez` unhealthy), with no further attempts: not a
/// hot loop.
#[tokio::test(start_paused = true)]
async fn auth_errors_fail_the_worker_after_the_intensity_limit() {
    let broker = broker(Duration::from_secs(30));
    broker.faults(QUEUE).fail_receives(1000, ErrorKind::Auth);
    let calls: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let source = Timed { inner: broker.source(QUEUE).unwrap(), calls: calls.clone() };
    let supervisor = Supervisor::new(SupervisorConfig::default().with_backoff(seeded_backoff()));
    supervisor.spawn(
        Updater::with_source("denied", source, handler_fn(|_| async { Outcome::Complete }))
            .with_config(config()),
    );
    let health = supervisor.health();
    eventually("failed", Duration::from_secs(3 * 3600), || {
        worker(&health, "denied").state == WorkerState::Failed
    })
    .await;
    let attempts = calls.lock().unwrap().len();
    assert_eq!(attempts, 11, "10 restarts allowed, the 11th failure is fatal");
    let snapshot = worker(&health, "denied");
    assert_eq!(snapshot.restarts, 10);
    assert!(snapshot.last_error.unwrap().contains("not authorised"));
    assert!(!health.snapshot().is_live());

    sleep(Duration::from_secs(24 * 3600)).await;
    assert_eq!(calls.lock().unwrap().len(), 11, "no attempts after failing");
    let report = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
    assert_eq!(report.stopped, ["denied"]);
    assert_eq!(worker(&health, "denied").state, WorkerState::Failed, "failed stays failed");
}

/// A worker whose loop panics `panics` times, then runs until cancelled.
struct Panicky {
    panics: usize,
    runs: AtomicUsize,
}

#[async_trait]
impl Worker for Panicky {
    fn name(&self) -> &str {
        "panicky"
    }

    fn stall_timeout(&self) -> Option<Duration> {
        None
    }

    async fn run(&self, ctx: WorkerContext) -> Result<(), WorkerError> {
        let run = self.runs.fetch_add(1, Ordering::SeqCst);
        if run < self.panics {
            panic!("worker loop bug #{run}");
        }
        ctx.set_running();
        ctx.cancelled().await;
        Ok(())
    }
}

/// A supervisor restarting after 1 s, 2 s, 4 s (no jitter), failing a worker after three
/// restarts within ten minutes.
fn three_restarts_in_ten_minutes() -> Supervisor {
    Supervisor::new(
        SupervisorConfig::default()
            .with_backoff(
                Backoff::new(Duration::from_secs(1), Duration::from_secs(4))
                    .with_jitter(Jitter::none()),
            )
            .with_intensity(RestartIntensity { max_restarts: 3, within: Duration::from_secs(600) }),
    )
}

/// Ensures that an unrelated worker panicking does not disturb a healthy one, that the
/// panicking worker is restarted with its panic logged once with the worker name, and
/// that the panics count toward its restart limit.
#[tokio::test(start_paused = true)]
async fn panicking_worker_is_restarted_and_counted() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let broker = broker(Duration::from_secs(30));
    for i in 0..20 {
        send(&broker, &format!("m{i}"), None).await;
    }
    let supervisor = three_restarts_in_ten_minutes();
    supervisor.spawn(Panicky { panics: 2, runs: AtomicUsize::new(0) });
    supervisor.spawn(
        Updater::with_source(
            "healthy",
            broker.source(QUEUE).unwrap(),
            handler_fn(|_| async { Outcome::Complete }),
        )
        .with_config(config()),
    );
    let health = supervisor.health();
    eventually("panicky running", Duration::from_secs(60), || {
        worker(&health, "panicky").state == WorkerState::Running
    })
    .await;
    eventually("healthy done", Duration::from_secs(60), || {
        worker(&health, "healthy").outcomes.completed == 20
    })
    .await;
    assert_eq!(worker(&health, "panicky").restarts, 2);
    assert_eq!(worker(&health, "healthy").restarts, 0);
    let text = logs.text();
    let panics: Vec<_> =
        text.lines().filter(|l| l.contains("worker panicked: worker loop bug")).collect();
    assert_eq!(panics.len(), 2, "each panic logged once: {panics:?}");
    assert!(panics.iter().all(|l| l.contains("worker=panicky")), "{panics:?}");

    // Past the limit it fails.
    let supervisor2 = three_restarts_in_ten_minutes();
    supervisor2.spawn(Panicky { panics: 100, runs: AtomicUsize::new(0) });
    let health2 = supervisor2.health();
    eventually("failed", Duration::from_secs(600), || {
        worker(&health2, "panicky").state == WorkerState::Failed
    })
    .await;
    assert_eq!(worker(&health2, "panicky").restarts, 3);

    let report = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
    assert!(report.is_clean(), "{report:?}");
    let _ = supervisor2.shutdown(Instant::now() + Duration::from_secs(5)).await;
}
