//! Retries, the delivery limit, panics and the circuit breaker of the Updater.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use steward_core::{BoxError, Handler, Message, Outcome, Updater, WorkerState, handler_fn};
use support::{
    LogCapture, QUEUE, broker, broker_holding, config, eventually, send, supervise, supervisor,
    worker,
};
use tokio::time::{Instant, sleep};

/// Ensures that a message delivered more than `max_deliveries` times goes to the
/// dead-letter queue with reason `MaxDeliveryCountExceeded`, and the handler is not
/// called for that delivery.
#[tokio::test(start_paused = true)]
async fn over_max_deliveries_is_dead_lettered_without_calling_handler() {
    let broker = broker(Duration::from_secs(30));
    send(&broker, "doomed", None).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = calls.clone();
        handler_fn(move |_| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Outcome::retry_after(Duration::ZERO, "always failing") }
        })
    };
    let supervisor = supervisor();
    let updater = Updater::with_source("limited", broker.source(QUEUE).unwrap(), handler)
        .with_config(config().with_max_deliveries(3));
    supervisor.spawn(updater);
    let health = supervisor.health();
    eventually("dead-lettered", Duration::from_secs(60), || broker.dead_letter_count(QUEUE) == 1)
        .await;

    assert_eq!(calls.load(Ordering::SeqCst), 3, "the handler saw deliveries 1 to 3 only");
    let dead = broker.dead_letters(QUEUE);
    assert_eq!(dead[0].reason, "MaxDeliveryCountExceeded");
    assert_eq!(dead[0].message.delivery_count, 4);
    assert!(dead[0].description.contains("more than the limit of 3"));
    let counts = worker(&health, "limited").outcomes;
    assert_eq!((counts.retried, counts.dead_lettered), (3, 1));
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Ensures that a panicking handler does not stop the worker: the panic payload is
/// logged with the message id, the message is retried and then completes.
#[tokio::test(start_paused = true)]
async fn panicking_handler_is_retried_and_logged() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let broker = broker_holding(Duration::from_secs(30), &["fragile", "sturdy"]).await;
    let handler = handler_fn(|message| async move {
        if message.id == "fragile" && message.delivery_count == 1 {
            panic!("boom at delivery {}", message.delivery_count);
        }
        Outcome::Complete
    });
    let (supervisor, health) = supervise(
        Updater::with_source("brave", broker.source(QUEUE).unwrap(), handler).with_config(config()),
    );
    eventually("both completed", Duration::from_secs(60), || {
        worker(&health, "brave").outcomes.completed == 2
    })
    .await;

    let snapshot = worker(&health, "brave");
    assert_eq!(snapshot.state, WorkerState::Running);
    assert_eq!(snapshot.restarts, 0);
    assert_eq!(snapshot.outcomes.panicked, 1);
    let text = logs.text();
    let line = text.lines().find(|l| l.contains("handler panicked")).expect("panic logged");
    assert!(line.contains("boom at delivery 1"), "payload in {line}");
    assert!(line.contains("fragile"), "message id in {line}");
    assert!(line.contains("worker=brave") || text.contains("worker{worker=brave}"), "{line}");
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Ensures that `Retry { after }` is not redelivered before `after`.
#[tokio::test(start_paused = true)]
async fn retry_after_is_not_redelivered_before_after() {
    let broker = broker(Duration::from_secs(30));
    send(&broker, "later", None).await;
    let seen: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let handler = {
        let seen = seen.clone();
        handler_fn(move |message| {
            seen.lock().unwrap().push(Instant::now());
            async move {
                if message.delivery_count == 1 {
                    Outcome::retry_after(Duration::from_secs(45), "come back later")
                } else {
                    Outcome::Complete
                }
            }
        })
    };
    let (supervisor, health) = supervise(
        Updater::with_source("patient", broker.source(QUEUE).unwrap(), handler)
            .with_config(config()),
    );
    eventually("completed", Duration::from_secs(120), || {
        worker(&health, "patient").outcomes.completed == 1
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1] - seen[0], Duration::from_secs(45));
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// A handler whose database can be switched off.
struct Database {
    up: AtomicBool,
    handled: Mutex<Vec<(String, u32)>>,
    probes: AtomicUsize,
    /// When each probe ran, and when the handler last saw the database down.
    probed_at: Mutex<Vec<Instant>>,
    failed_at: Mutex<Option<Instant>>,
}

#[async_trait]
impl Handler for Database {
    async fn handle(&self, message: Arc<Message>) -> Outcome {
        if !self.up.load(Ordering::SeqCst) {
            *self.failed_at.lock().unwrap() = Some(Instant::now());
            return Outcome::dependency_failed("database unavailable");
        }
        self.handled.lock().unwrap().push((message.id.clone(), message.delivery_count));
        Outcome::Complete
    }

    async fn probe(&self) -> Result<(), BoxError> {
        self.probes.fetch_add(1, Ordering::SeqCst);
        self.probed_at.lock().unwrap().push(Instant::now());
        if self.up.load(Ordering::SeqCst) { Ok(()) } else { Err("connection refused".into()) }
    }
}

/// Ensures that a `Dependency` retry opens the worker's circuit breaker: it stops
/// receiving (no receive starts during the outage) and reports `backing_off` (so
/// `/readyz` is 503) until a probe succeeds; the probes follow the probe backoff
/// exactly (1 s doubling to 8 s); and the outage does not burn delivery counts.
#[tokio::test(start_paused = true)]
async fn dependency_retry_pauses_receiving_until_probe_succeeds() {
    let broker = broker(Duration::from_secs(30));
    for i in 0..5 {
        send(&broker, &format!("m{i}"), None).await;
    }
    let database = Arc::new(Database {
        up: AtomicBool::new(false),
        handled: Mutex::default(),
        probes: AtomicUsize::new(0),
        probed_at: Mutex::default(),
        failed_at: Mutex::default(),
    });
    let receives: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let source = support::Timed { inner: broker.source(QUEUE).unwrap(), calls: receives.clone() };
    let supervisor = supervisor();
    let updater = Updater::with_source("db", source, database.clone())
        .with_config(config().with_concurrency(1).with_batch_size(1));
    supervisor.spawn(updater);
    let health = supervisor.health();
    eventually("breaker open", Duration::from_secs(10), || {
        worker(&health, "db").state == WorkerState::BackingOff
    })
    .await;
    assert!(!health.snapshot().is_ready());
    assert!(worker(&health, "db").last_error.unwrap().contains("database unavailable"));
    let opened = database.failed_at.lock().unwrap().unwrap();

    // A long outage: the probes back off, and no message is received meanwhile.
    sleep(Duration::from_secs(120)).await;
    assert_eq!(worker(&health, "db").state, WorkerState::BackingOff);
    let probes: Vec<u64> =
        database.probed_at.lock().unwrap().iter().map(|at| (*at - opened).as_secs()).collect();
    let mut expected = vec![1, 3, 7];
    expected.extend((15..=119).step_by(8));
    assert_eq!(probes, expected, "probes 1 s, 2 s, 4 s, then 8 s apart");
    let retried = worker(&health, "db").outcomes.retried;
    assert_eq!(retried, 1, "{retried} messages burned during the outage");

    database.up.store(true, Ordering::SeqCst);
    let up = Instant::now();
    eventually("resumed", Duration::from_secs(30), || {
        worker(&health, "db").state == WorkerState::Running
    })
    .await;
    let paused: Vec<_> =
        receives.lock().unwrap().iter().filter(|at| **at > opened && **at < up).copied().collect();
    assert!(paused.is_empty(), "received while the breaker was open: {paused:?}");
    eventually("all handled", Duration::from_secs(60), || {
        worker(&health, "db").outcomes.completed == 5
    })
    .await;
    let handled = database.handled.lock().unwrap().clone();
    assert!(handled.iter().all(|(_, count)| *count <= 2), "delivery counts burned: {handled:?}");
    assert!(health.snapshot().is_ready());
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Ensures that retries held locally for their delay (a transport without delayed
/// abandon) do not take up intake: with room for two messages, two held retries do not
/// stop a third message from being received and handled at once.
#[tokio::test(start_paused = true)]
async fn retries_held_locally_do_not_block_intake() {
    let broker = broker_holding(Duration::from_secs(30), &["r1", "r2", "c"]).await;
    let handled: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let handler = {
        let handled = handled.clone();
        handler_fn(move |message| {
            handled.lock().unwrap().push((message.id.clone(), Instant::now()));
            async move {
                if message.id.starts_with('r') && message.delivery_count == 1 {
                    Outcome::retry_after(Duration::from_secs(60), "later")
                } else {
                    Outcome::Complete
                }
            }
        })
    };
    let started = Instant::now();
    let supervisor = supervisor();
    let source = support::WithoutDelayedAbandon(broker.source(QUEUE).unwrap());
    supervisor.spawn(
        Updater::with_source("held", source, handler)
            .with_config(config().with_concurrency(1).with_batch_size(1)),
    );
    let health = supervisor.health();
    eventually("c completed", Duration::from_secs(120), || {
        worker(&health, "held").outcomes.completed >= 1
    })
    .await;
    let handled = handled.lock().unwrap().clone();
    let c = handled.iter().find(|(id, _)| id == "c").unwrap().1 - started;
    assert!(c < Duration::from_secs(5), "c waited {c:?} behind the held retries");
    eventually("all completed", Duration::from_secs(300), || {
        worker(&health, "held").outcomes.completed == 3
    })
    .await;
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}
