//! Edge cases of the Updater: lost locks of held messages, absurd delays and stall
//! timeouts, slow probes, thread-blocking handlers, shutdown during an error drain.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use steward_core::{
    BoxError, Capabilities, Delivery, ErrorKind, Handler, Message, MessageSource, Outcome, Settle,
    TransportError, Updater, WorkerState, handler_fn,
};
use support::{
    Faulty, LocalSessions, QUEUE, SettleFaults, broker, broker_holding,
    broker_holding_local_sessions, config, eventually, send, supervise, supervisor, worker,
};
use tokio::time::{Instant, sleep};

/// What happened to the scripted deliveries, in order.
type Log = Arc<Mutex<Vec<String>>>;

/// A settle handle that records what the updater did, whose renewals report the lock
/// lost when `renewal_lost` is set.
struct Scripted {
    id: String,
    log: Log,
    until: Mutex<Instant>,
    renewal_lost: bool,
}

#[async_trait]
impl Settle for Scripted {
    fn locked_until(&self) -> Option<Instant> {
        Some(*self.until.lock().unwrap())
    }

    async fn renew_lock(&self) -> Result<Option<Instant>, TransportError> {
        if self.renewal_lost {
            self.log.lock().unwrap().push(format!("lost {}", self.id));
            return Err(TransportError::lock_lost(self.id.clone()));
        }
        let until = Instant::now() + Duration::from_secs(10);
        *self.until.lock().unwrap() = until;
        Ok(Some(until))
    }

    async fn complete(&self) -> Result<(), TransportError> {
        self.log.lock().unwrap().push(format!("complete {}", self.id));
        Ok(())
    }

    async fn abandon(&self, delay: Option<Duration>) -> Result<(), TransportError> {
        self.log.lock().unwrap().push(format!("abandon {} {delay:?}", self.id));
        Ok(())
    }

    async fn dead_letter(&self, _: &str, _: &str) -> Result<(), TransportError> {
        self.log.lock().unwrap().push(format!("dead-letter {}", self.id));
        Ok(())
    }
}

/// A source without sessions or delayed abandon handing out scripted batches, then
/// nothing (waiting out `wait`).
struct ScriptedSource {
    batches: Mutex<VecDeque<Vec<(String, u32, bool)>>>,
    log: Log,
}

#[async_trait]
impl MessageSource for ScriptedSource {
    fn queue(&self) -> &str {
        "scripted"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { lock_renewal: true, delivery_count: true, ..Capabilities::default() }
    }

    async fn receive(&self, _max: usize, wait: Duration) -> Result<Vec<Delivery>, TransportError> {
        let next = self.batches.lock().unwrap().pop_front();
        let Some(batch) = next else {
            sleep(wait).await;
            return Ok(Vec::new());
        };
        Ok(batch
            .into_iter()
            .map(|(id, count, renewal_lost)| {
                let message = Message::new(id.clone(), id.clone())
                    .with_session_id("s")
                    .with_delivery_count(count);
                let settle = Scripted {
                    id: format!("{id}#{count}"),
                    log: self.log.clone(),
                    until: Mutex::new(Instant::now() + Duration::from_secs(10)),
                    renewal_lost,
                };
                Delivery::new(message, settle)
            })
            .collect())
    }

    async fn stop_receiving(&self) -> Result<(), TransportError> {
        Ok(())
    }
}

/// Ensures that on a transport without delayed abandon, a retried message held back
/// for its delay whose lock is then lost frees its session: its redelivered copy goes
/// first, and the session's next message follows instead of waiting forever.
#[tokio::test(start_paused = true)]
async fn held_retry_that_loses_its_lock_frees_its_session() {
    let log: Log = Arc::default();
    let source = ScriptedSource {
        batches: Mutex::new(VecDeque::from([
            vec![("s-1".to_owned(), 1, true), ("s-2".to_owned(), 1, false)],
            vec![("s-1".to_owned(), 2, false)],
        ])),
        log: log.clone(),
    };
    let handled: Log = Arc::default();
    let handler = {
        let handled = handled.clone();
        handler_fn(move |message| {
            handled.lock().unwrap().push(format!("{}#{}", message.id, message.delivery_count));
            async move {
                if message.id == "s-1" && message.delivery_count == 1 {
                    Outcome::retry_after(Duration::from_secs(60), "later")
                } else {
                    Outcome::Complete
                }
            }
        })
    };
    let (supervisor, health) =
        supervise(Updater::with_source("held", source, handler).with_config(config()));
    eventually("both completed", Duration::from_secs(300), || {
        worker(&health, "held").outcomes.completed == 2
    })
    .await;
    let handled = handled.lock().unwrap().clone();
    assert_eq!(handled, ["s-1#1", "s-1#2", "s-2#1"], "the redelivered s-1 went before s-2");
    let log = log.lock().unwrap().clone();
    assert!(log.contains(&"lost s-1#1".to_owned()), "{log:?}");
    assert!(
        !log.iter().any(|l| l.starts_with("abandon s-1#1")),
        "a lost lock is not settled: {log:?}"
    );
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Ensures that a handler asking for an absurd retry delay does not bring the worker
/// down: the transport is asked for the cap, 24 h, other messages flow, and the message
/// comes back after the cap.
#[tokio::test(start_paused = true)]
async fn absurd_retry_delay_is_capped_not_a_panic() {
    let broker =
        broker_holding_local_sessions(Duration::from_secs(30), &[("forever", "s"), ("other", "t")])
            .await;
    let handler = handler_fn(|message| async move {
        if message.id == "forever" && message.delivery_count == 1 {
            Outcome::retry_after(Duration::MAX, "never")
        } else {
            Outcome::Complete
        }
    });
    let faults = Arc::new(SettleFaults::default());
    let supervisor = supervisor();
    let source =
        LocalSessions(Faulty { inner: broker.source(QUEUE).unwrap(), faults: faults.clone() });
    supervisor.spawn(Updater::with_source("absurd", source, handler).with_config(config()));
    let health = supervisor.health();
    eventually("the other message", Duration::from_secs(60), || {
        worker(&health, "absurd").outcomes.completed == 1
    })
    .await;
    eventually("the retry", Duration::from_secs(60), || {
        worker(&health, "absurd").outcomes.retried == 1
    })
    .await;
    let cap = Duration::from_secs(24 * 60 * 60);
    assert_eq!(*faults.abandons.lock().unwrap(), [("forever".to_owned(), Some(cap))]);
    let snapshot = worker(&health, "absurd");
    assert_eq!(snapshot.restarts, 0, "{snapshot:?}");
    assert_eq!(snapshot.state, WorkerState::Running);
    sleep(cap - Duration::from_secs(60)).await;
    assert_eq!(worker(&health, "absurd").outcomes.completed, 1, "back before the cap");
    eventually("back after the cap", Duration::from_secs(120), || {
        worker(&health, "absurd").outcomes.completed == 2
    })
    .await;
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Ensures that a stall timeout too long for the clock means no watchdog, rather than
/// a supervision task that dies and leaves the worker unobserved.
#[tokio::test(start_paused = true)]
async fn endless_stall_timeout_disables_the_watchdog() {
    let broker = broker(Duration::from_secs(30));
    broker.faults(QUEUE).hang_receives(true);
    let supervisor = supervisor();
    let updater = Updater::with_source(
        "patient",
        broker.source(QUEUE).unwrap(),
        handler_fn(|_| async { Outcome::Complete }),
    )
    .with_config(config().with_stall_timeout(Duration::MAX));
    supervisor.spawn(updater);
    let health = supervisor.health();
    sleep(Duration::from_secs(24 * 3600)).await;
    let snapshot = worker(&health, "patient");
    assert_eq!(snapshot.restarts, 0);
    assert_eq!(snapshot.state, WorkerState::Running);
    assert!(supervisor.task_count() > 0, "the worker is still supervised");
    let report = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
    assert_eq!(report.stopped, ["patient"], "{report:?}");
}

/// A handler whose dependency answers its probes slowly, then not at all, then again.
struct SlowDependency {
    down: AtomicBool,
    probes: AtomicUsize,
    handled: Mutex<Vec<(String, u32)>>,
}

#[async_trait]
impl Handler for SlowDependency {
    async fn handle(&self, message: Arc<Message>) -> Outcome {
        self.handled.lock().unwrap().push((message.id.clone(), message.delivery_count));
        if self.down.load(Ordering::SeqCst) {
            Outcome::dependency_failed("database unavailable")
        } else {
            Outcome::Complete
        }
    }

    async fn probe(&self) -> Result<(), BoxError> {
        if self.probes.fetch_add(1, Ordering::SeqCst) == 0 {
            // The first probe hangs until it times out.
            std::future::pending::<()>().await;
        }
        self.down.store(false, Ordering::SeqCst);
        Ok(())
    }
}

/// Ensures that a hanging dependency probe does not stop lock renewals: a message
/// waiting while the breaker is open keeps its lock and is handled once, on its first
/// delivery, when the dependency is back.
#[tokio::test(start_paused = true)]
async fn hanging_probe_does_not_stop_lock_renewals() {
    let broker = broker_holding(Duration::from_secs(20), &["m1", "m2"]).await;
    let dependency = Arc::new(SlowDependency {
        down: AtomicBool::new(true),
        probes: AtomicUsize::new(0),
        handled: Mutex::default(),
    });
    let supervisor = supervisor();
    let updater = Updater::with_source("slow", broker.source(QUEUE).unwrap(), dependency.clone())
        .with_config(
            config().with_concurrency(1).with_batch_size(2).with_wait(Duration::from_secs(30)),
        );
    supervisor.spawn(updater);
    let health = supervisor.health();
    eventually("both handled", Duration::from_secs(600), || {
        worker(&health, "slow").outcomes.completed == 2
    })
    .await;
    let snapshot = worker(&health, "slow");
    assert_eq!(snapshot.outcomes.lease_lost, 0, "{snapshot:?}");
    assert_eq!(snapshot.outcomes.retried, 1, "only m1's dependency failure: {snapshot:?}");
    assert!(dependency.probes.load(Ordering::SeqCst) >= 2);
    // m1 failed once (its retry is its second delivery); m2 waited out the outage on
    // its first delivery, its lock renewed.
    let handled = dependency.handled.lock().unwrap().clone();
    assert_eq!(
        handled,
        [("m1".to_owned(), 1), ("m2".to_owned(), 1), ("m1".to_owned(), 2)],
        "deliveries burned while the breaker was open"
    );
    assert_eq!(broker.message_count(QUEUE), 0);
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Ensures that a shutdown beginning while the worker drains after a receive error is
/// met: the running handler is cut short at the shutdown's drain deadline and its
/// message abandoned, not held for the longer error drain.
#[tokio::test(start_paused = true)]
async fn shutdown_during_error_drain_meets_its_deadline() {
    let broker = broker(Duration::from_secs(60));
    send(&broker, "slow", None).await;
    let handler = handler_fn(|_| async {
        sleep(Duration::from_secs(3600)).await;
        Outcome::Complete
    });
    let (supervisor, health) = supervise(
        Updater::with_source("erring", broker.source(QUEUE).unwrap(), handler)
            .with_config(config()),
    );
    eventually("handler running", Duration::from_secs(5), || {
        worker(&health, "erring").in_flight == 1
    })
    .await;
    broker.faults(QUEUE).fail_receives(1, ErrorKind::Connection);
    sleep(Duration::from_secs(2)).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    let report = supervisor.shutdown(deadline).await;
    assert!(Instant::now() <= deadline);
    assert!(report.overran.is_empty(), "{report:?}");
    let aborted: Vec<_> = report.aborted_handlers.iter().map(|a| a.message_id.as_str()).collect();
    assert_eq!(aborted, ["slow"], "{report:?}");
    let fresh = broker.source(QUEUE).unwrap();
    assert_eq!(fresh.receive(1, Duration::ZERO).await.unwrap()[0].message().id, "slow");
}

/// Ensures that a handler blocking its thread past the drain deadline does not keep
/// its message: the shutdown returns while the handler is still blocked (it blocks until
/// the test releases it, so nothing here depends on how fast the machine is), the
/// message is abandoned for another consumer, the report names the handler as blocked
/// and counts its task as left running, and the handler's late result does not disturb
/// the message's new holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_blocking_handler_message_is_released_by_the_deadline() {
    let broker = broker(Duration::from_secs(60));
    send(&broker, "stuck", None).await;
    let started = Arc::new(AtomicBool::new(false));
    let returned = Arc::new(AtomicBool::new(false));
    let (release, blocked_on) = std::sync::mpsc::channel::<()>();
    let blocked_on = Arc::new(Mutex::new(blocked_on));
    let handler = {
        let (started, returned) = (started.clone(), returned.clone());
        handler_fn(move |_| {
            started.store(true, Ordering::SeqCst);
            let (returned, blocked_on) = (returned.clone(), blocked_on.clone());
            async move {
                // Blocks its runtime thread until released: cannot be aborted. The long
                // timeout only keeps a broken build from hanging the test run.
                let _ = blocked_on.lock().unwrap().recv_timeout(Duration::from_secs(60));
                returned.store(true, Ordering::SeqCst);
                Outcome::Complete
            }
        })
    };
    let supervisor = supervisor();
    supervisor.spawn(
        Updater::with_source("blocking", broker.source(QUEUE).unwrap(), handler)
            .with_config(config()),
    );
    while !started.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let report = supervisor.shutdown(Instant::now() + Duration::from_secs(2)).await;
    assert!(!returned.load(Ordering::SeqCst), "shutdown waited for the blocked handler");
    assert_eq!(report.aborted_handlers.len(), 1, "{report:?}");
    assert!(report.aborted_handlers[0].blocked, "{report:?}");
    assert_eq!(report.aborted_handlers[0].message_id, "stuck");
    assert_eq!(report.tasks_left, 1, "the blocked task is reported as still running");
    let fresh = broker.source(QUEUE).unwrap();
    let got = fresh.receive(1, Duration::ZERO).await.unwrap();
    assert_eq!(got.len(), 1, "the message was released for another consumer");
    assert_eq!(got[0].message().id, "stuck");

    release.send(()).unwrap();
    while !returned.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let delivery = got.into_iter().next().unwrap();
    delivery.complete().await.expect("the new holder's lock was left alone");
    assert_eq!(broker.message_count(QUEUE), 0);
}

/// Ensures that a handler that blocks its thread past `handler_timeout` keeps its
/// session (order before speed) and is reported in the worker's health as overdue; once
/// it returns, its outcome stands (the abort never took effect) and only then does the
/// session's next message run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_blocking_handler_past_its_timeout_keeps_its_session_and_is_reported() {
    let broker =
        broker_holding_local_sessions(Duration::from_secs(60), &[("blocks", "s"), ("next", "s")])
            .await;
    let handled: Log = Arc::default();
    let (release, blocked_on) = std::sync::mpsc::channel::<()>();
    let blocked_on = Arc::new(Mutex::new(blocked_on));
    let handler = {
        let handled = handled.clone();
        handler_fn(move |message| {
            handled.lock().unwrap().push(format!("{}#{}", message.id, message.delivery_count));
            let blocked_on = blocked_on.clone();
            async move {
                if message.id == "blocks" && message.delivery_count == 1 {
                    // Blocks its thread until released; the timeout only keeps a
                    // broken build from hanging the test run.
                    let _ = blocked_on.lock().unwrap().recv_timeout(Duration::from_secs(60));
                }
                Outcome::Complete
            }
        })
    };
    let supervisor = supervisor();
    let source = LocalSessions(broker.source(QUEUE).unwrap());
    supervisor.spawn(
        Updater::with_source("overdue", source, handler)
            .with_config(config().with_handler_timeout(Duration::from_millis(100))),
    );
    let health = supervisor.health();
    eventually("reported overdue", Duration::from_secs(30), || {
        worker(&health, "overdue").overdue_handlers == 1
    })
    .await;
    assert_eq!(*handled.lock().unwrap(), ["blocks#1"], "next ran while blocks held its session");
    release.send(()).unwrap();
    eventually("both completed", Duration::from_secs(30), || {
        worker(&health, "overdue").outcomes.completed == 2
    })
    .await;
    assert_eq!(*handled.lock().unwrap(), ["blocks#1", "next#1"]);
    let snapshot = worker(&health, "overdue");
    assert_eq!((snapshot.overdue_handlers, snapshot.outcomes.retried), (0, 0), "{snapshot:?}");
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Ensures that a concurrency of 0 set directly on the public field is raised to 1
/// rather than leaving a worker that reports itself running while it handles nothing.
#[tokio::test(start_paused = true)]
async fn zero_concurrency_is_raised_to_one() {
    let broker = broker(Duration::from_secs(30));
    send(&broker, "a", None).await;
    let mut config = config();
    config.concurrency = 0;
    let updater = Updater::with_source(
        "zero",
        broker.source(QUEUE).unwrap(),
        handler_fn(|_| async { Outcome::Complete }),
    )
    .with_config(config);
    assert_eq!(updater.config().concurrency, 1);
    let supervisor = steward_core::Supervisor::new(steward_core::SupervisorConfig::default());
    supervisor.spawn(updater);
    let health = supervisor.health();
    sleep(Duration::from_secs(60)).await;
    let w = worker(&health, "zero");
    assert_eq!((broker.message_count(QUEUE), w.outcomes.completed), (0, 1), "{w:?}");
}

/// Ensures that an absurd batch size is capped, not an overflow that panics the worker
/// on every start.
#[tokio::test(start_paused = true)]
async fn huge_batch_size_is_capped_not_a_panic() {
    let broker = broker(Duration::from_secs(30));
    send(&broker, "a", None).await;
    let config = config().with_batch_size(usize::MAX);
    assert_eq!(config.batch_size, steward_core::MAX_BATCH_SIZE);
    let mut direct = config.clone();
    direct.batch_size = usize::MAX;
    let (_supervisor, health) = supervise(
        Updater::with_source(
            "huge-batch",
            broker.source(QUEUE).unwrap(),
            handler_fn(|_| async { Outcome::Complete }),
        )
        .with_config(direct),
    );
    sleep(Duration::from_secs(60)).await;
    let w = worker(&health, "huge-batch");
    assert_eq!((w.outcomes.completed, w.outcomes.panicked, w.restarts), (1, 0, 0), "{w:?}");
}

/// Ensures that a zero handler timeout is raised to the minimum rather than aborting
/// every handler before it can finish and dead-lettering every message.
#[tokio::test(start_paused = true)]
async fn zero_handler_timeout_is_raised_to_the_minimum() {
    let broker = broker(Duration::from_secs(30));
    send(&broker, "a", None).await;
    let config = config().with_handler_timeout(Duration::ZERO);
    assert_eq!(config.handler_timeout, Some(steward_core::MIN_HANDLER_TIMEOUT));
    let (_supervisor, health) = supervise(
        Updater::with_source(
            "zero-timeout",
            broker.source(QUEUE).unwrap(),
            handler_fn(|_| async {
                sleep(Duration::from_millis(1)).await;
                Outcome::Complete
            }),
        )
        .with_config(config),
    );
    sleep(Duration::from_secs(3600)).await;
    let w = worker(&health, "zero-timeout");
    assert_eq!((w.outcomes.completed, broker.dead_letter_count(QUEUE)), (1, 0), "{w:?}");
}

/// Claims no timed locks (as RabbitMQ).
struct NoTimedLocks<S>(S);

support::wrap_source!(
    NoTimedLocks.0,
    capabilities: c => Capabilities { lock_renewal: false, ..c }
);

/// Ensures that on a transport without timed locks a legitimate handler longer than
/// the stall timeout (2 minutes, at concurrency 1, default configs otherwise) is not
/// stalled and restarted over and over: it completes, once.
#[tokio::test(start_paused = true)]
async fn slow_handler_without_timed_locks_is_not_a_stall() {
    let broker = broker(Duration::from_secs(24 * 3600));
    send(&broker, "slow", None).await;
    let supervisor = steward_core::Supervisor::new(steward_core::SupervisorConfig::default());
    supervisor.spawn(
        Updater::with_source(
            "no-timed-locks",
            NoTimedLocks(broker.source(QUEUE).unwrap()),
            handler_fn(|_| async {
                sleep(Duration::from_secs(120)).await;
                Outcome::Complete
            }),
        )
        .with_config(steward_core::UpdaterConfig::default().with_concurrency(1)),
    );
    let health = supervisor.health();
    sleep(Duration::from_secs(4 * 3600)).await;
    let w = worker(&health, "no-timed-locks");
    assert_eq!((w.outcomes.completed, w.restarts, w.outcomes.dead_lettered), (1, 0, 0), "{w:?}");
}
