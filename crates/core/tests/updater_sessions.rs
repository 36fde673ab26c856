//! Ordering, concurrency and lock renewal of the Updater on the in-memory broker.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use steward_core::{
    Capabilities, Delivery, ErrorKind, Message, MessageSource, Outcome, Settle, TransportError,
    Updater, WorkerState, handler_fn,
};
use support::{
    Faulty, LocalSessions, QUEUE, SettleFaults, WithoutDelayedAbandon, broker,
    broker_holding_local_sessions, config, eventually, recorded, send, send_local_session,
    supervisor, worker,
};
use tokio::time::{Instant, sleep};

/// 1,000 messages over 10 sessions at concurrency 8, on a broker that keeps session
/// order itself or (`local`) through a source without sessions, where only the Updater
/// keeps it.
async fn sessions_keep_order(local: bool) {
    let broker = broker(Duration::from_secs(30));
    for i in 0..1000 {
        let (id, session) = (format!("{}-{:04}", i % 10, i / 10), format!("s{}", i % 10));
        if local {
            send_local_session(&broker, &id, &session).await;
        } else {
            send(&broker, &id, Some(&session)).await;
        }
    }
    let seen: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
    let busy: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
    let overlaps = Arc::new(AtomicUsize::new(0));
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (seen, busy, overlaps) = (seen.clone(), busy.clone(), overlaps.clone());
        let (running, peak) = (running.clone(), peak.clone());
        handler_fn(move |message| {
            let (seen, busy, overlaps) = (seen.clone(), busy.clone(), overlaps.clone());
            let (running, peak) = (running.clone(), peak.clone());
            async move {
                let session = message.session_id.clone().unwrap();
                if !busy.lock().unwrap().insert(session.clone()) {
                    overlaps.fetch_add(1, Ordering::SeqCst);
                }
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                // Uneven handler times interleave the sessions.
                let n: u64 = message.id[2..].parse().unwrap();
                sleep(Duration::from_millis(5 + (n * 37) % 50)).await;
                seen.lock().unwrap().entry(session.clone()).or_default().push(message.id.clone());
                running.fetch_sub(1, Ordering::SeqCst);
                busy.lock().unwrap().remove(&session);
                Outcome::Complete
            }
        })
    };
    let supervisor = supervisor();
    let config = config().with_concurrency(8).with_batch_size(16);
    if local {
        let source = LocalSessions(broker.source(QUEUE).unwrap());
        supervisor.spawn(Updater::with_source("ordered", source, handler).with_config(config));
    } else {
        let source = broker.source(QUEUE).unwrap();
        supervisor.spawn(Updater::with_source("ordered", source, handler).with_config(config));
    }
    let health = supervisor.health();
    eventually("all messages completed", Duration::from_secs(3600), || {
        worker(&health, "ordered").outcomes.completed == 1000
    })
    .await;

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 10);
    for (session, ids) in seen.iter() {
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, &sorted, "order within {session} (local: {local})");
        assert_eq!(ids.len(), 100, "each message of {session} handled once");
    }
    assert_eq!(overlaps.load(Ordering::SeqCst), 0, "two handlers of one session overlapped");
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak <= 8, "{peak} handlers ran at once, more than 8");
    assert!(peak >= 4, "only {peak} handlers at once: the sessions did not run in parallel");
    assert_eq!(broker.message_count(QUEUE), 0);
    let report = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
    assert!(report.is_clean(), "{report:?}");
}

/// Ensures that 1,000 messages over 10 sessions at concurrency 8 are each handled once,
/// in order within each session and never two of a session at once, with at most 8
/// handlers at once: on a broker with sessions, and on a source without them, where
/// the Updater alone keeps the order.
#[tokio::test(start_paused = true)]
async fn sessions_keep_order_and_concurrency_stays_within_limit() {
    sessions_keep_order(false).await;
    sessions_keep_order(true).await;
}

/// Ensures that a handler running three times the lock duration keeps its message, and
/// the message waiting behind it in its session keeps its lock too: neither is
/// redelivered, both are handled once, in order.
#[tokio::test(start_paused = true)]
async fn long_handler_and_waiting_message_keep_their_locks() {
    let lock = Duration::from_secs(10);
    let broker = broker_holding_local_sessions(lock, &[("first", "s"), ("second", "s")]).await;
    let calls: Arc<Mutex<Vec<(String, u32, Instant)>>> = Arc::default();
    let record = |message: &Message| (message.id.clone(), message.delivery_count, Instant::now());
    let handler = recorded(&calls, record, move |message| async move {
        if message.id == "first" {
            sleep(lock * 3).await;
        }
        Outcome::Complete
    });
    let started = Instant::now();
    let supervisor = supervisor();
    let source = LocalSessions(broker.source(QUEUE).unwrap());
    supervisor.spawn(Updater::with_source("long", source, handler).with_config(config()));
    let health = supervisor.health();
    eventually("both completed", Duration::from_secs(600), || {
        worker(&health, "long").outcomes.completed == 2
    })
    .await;

    let calls = calls.lock().unwrap().clone();
    let ids: Vec<_> = calls.iter().map(|(id, count, _)| (id.as_str(), *count)).collect();
    assert_eq!(ids, [("first", 1), ("second", 1)], "each handled once, in order, first delivery");
    assert!(calls[1].2 - started >= lock * 3, "second waited for first");
    let snapshot = worker(&health, "long");
    assert_eq!(snapshot.outcomes.lease_lost, 0);
    assert_eq!(snapshot.restarts, 0);
    assert_eq!(broker.message_count(QUEUE), 0);
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

async fn delayed_retry_blocks_session(local: bool) {
    let broker = broker(Duration::from_secs(30));
    if local {
        send_local_session(&broker, "s-1", "s").await;
        send_local_session(&broker, "s-2", "s").await;
        send_local_session(&broker, "other", "t").await;
    } else {
        send(&broker, "s-1", Some("s")).await;
        send(&broker, "s-2", Some("s")).await;
        send(&broker, "other", Some("t")).await;
    }
    let calls: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let record = |message: &Message| (message.id.clone(), Instant::now());
    let handler = recorded(&calls, record, |message| async move {
        if message.id == "s-1" && message.delivery_count == 1 {
            Outcome::retry_after(Duration::from_secs(20), "not yet")
        } else {
            Outcome::Complete
        }
    });
    let started = Instant::now();
    let supervisor = supervisor();
    if local {
        let source = LocalSessions(broker.source(QUEUE).unwrap());
        supervisor.spawn(Updater::with_source("retry", source, handler).with_config(config()));
    } else {
        let source = broker.source(QUEUE).unwrap();
        supervisor.spawn(Updater::with_source("retry", source, handler).with_config(config()));
    }
    let health = supervisor.health();
    eventually("all completed", Duration::from_secs(600), || {
        worker(&health, "retry").outcomes.completed == 3
    })
    .await;
    let calls = calls.lock().unwrap().clone();
    let order: Vec<_> = calls.iter().map(|(id, _)| id.as_str()).collect();
    let at = |id: &str| {
        calls.iter().filter(|(i, _)| i == id).map(|(_, t)| *t - started).collect::<Vec<_>>()
    };
    assert_eq!(at("s-1").len(), 2, "s-1 handled twice: {order:?}");
    assert_eq!(at("s-1")[1], Duration::from_secs(20), "s-1 came back after its delay");
    assert!(at("s-2")[0] >= at("s-1")[1], "s-2 ran before the retried s-1: {order:?}");
    assert!(at("other")[0] < Duration::from_secs(1), "another session was not held up: {order:?}");
    assert_eq!(broker.message_count(QUEUE), 0);
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Ensures that a message retried with a delay holds back the later messages of its
/// session until it returns and is settled, on a broker with sessions.
#[tokio::test(start_paused = true)]
async fn delayed_retry_blocks_its_session_with_broker_sessions() {
    delayed_retry_blocks_session(false).await;
}

/// Ensures the same on a transport without sessions, where the updater holds the
/// session back itself.
#[tokio::test(start_paused = true)]
async fn delayed_retry_blocks_its_session_without_broker_sessions() {
    delayed_retry_blocks_session(true).await;
}

/// Ensures that progress advances on an idle queue (so an idle worker is never deemed
/// stalled), and that a worker whose every slot is busy with long, lock-renewed
/// handlers is not deemed stalled either.
#[tokio::test(start_paused = true)]
async fn progress_advances_when_idle_and_when_all_slots_are_busy() {
    let broker = broker(Duration::from_secs(30));
    let supervisor = supervisor();
    let idle = Updater::with_source(
        "idle",
        broker.source(QUEUE).unwrap(),
        handler_fn(|_| async { Outcome::Complete }),
    )
    .with_config(config().with_stall_timeout(Duration::from_secs(10)));
    supervisor.spawn(idle);

    broker.declare_queue("busy", Default::default());
    for i in 0..2 {
        broker
            .enqueue("busy", steward_core::OutgoingMessage::new(format!("{i}")), None)
            .await
            .unwrap();
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let busy_handler = {
        let calls = calls.clone();
        handler_fn(move |_| {
            calls.fetch_add(1, Ordering::SeqCst);
            async {
                sleep(Duration::from_secs(600)).await;
                Outcome::Complete
            }
        })
    };
    let busy = Updater::with_source("busy", broker.source("busy").unwrap(), busy_handler)
        .with_config(config().with_concurrency(2).with_stall_timeout(Duration::from_secs(30)));
    supervisor.spawn(busy);
    let health = supervisor.health();

    for _ in 0..30 {
        sleep(Duration::from_secs(10)).await;
        let idle = worker(&health, "idle");
        assert_eq!(idle.state, WorkerState::Running);
        assert!(idle.since_progress.unwrap() <= Duration::from_secs(1), "{idle:?}");
        let busy = worker(&health, "busy");
        assert_eq!(busy.state, WorkerState::Running, "{busy:?}");
        assert!(busy.since_progress.unwrap() < Duration::from_secs(30), "{busy:?}");
    }
    assert_eq!(worker(&health, "idle").restarts, 0);
    assert_eq!(worker(&health, "busy").restarts, 0);
    assert_eq!(worker(&health, "busy").in_flight, 2);
    assert_eq!(calls.load(Ordering::SeqCst), 2, "no redelivery while the handlers ran");
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Ensures that, without broker sessions, a session whose delayed head is away keeps its
/// order even when its waiting followers alone would fill `concurrency + batch_size`
/// several times over (within the parked bound of 4 × that): the head is still received
/// when it returns, and runs before all 20 followers, while another session flows
/// meanwhile.
#[tokio::test(start_paused = true)]
async fn delayed_head_keeps_order_when_its_followers_fill_capacity() {
    let broker = broker(Duration::from_secs(30));
    send_local_session(&broker, "s-00", "s").await;
    for i in 1..=20 {
        send_local_session(&broker, &format!("s-{i:02}"), "s").await;
    }
    send_local_session(&broker, "other", "t").await;
    let calls: Arc<Mutex<Vec<(String, u32, Instant)>>> = Arc::default();
    let record = |message: &Message| (message.id.clone(), message.delivery_count, Instant::now());
    let handler = recorded(&calls, record, |message| async move {
        if message.id == "s-00" && message.delivery_count == 1 {
            Outcome::retry_after(Duration::from_secs(20), "not yet")
        } else {
            Outcome::Complete
        }
    });
    let started = Instant::now();
    let supervisor = supervisor();
    let source = LocalSessions(broker.source(QUEUE).unwrap());
    // Capacity 2 + 4 = 6 held messages: the followers alone fill it three times over.
    supervisor.spawn(
        Updater::with_source("full", source, handler)
            .with_config(config().with_concurrency(2).with_batch_size(4)),
    );
    let health = supervisor.health();
    eventually("all completed", Duration::from_secs(600), || {
        worker(&health, "full").outcomes.completed == 22
    })
    .await;
    let calls = calls.lock().unwrap().clone();
    let session: Vec<(String, u32)> = calls
        .iter()
        .filter(|(id, ..)| id.starts_with("s-"))
        .map(|(id, n, _)| (id.clone(), *n))
        .collect();
    let mut expected = vec![("s-00".to_owned(), 1), ("s-00".to_owned(), 2)];
    expected.extend((1..=20).map(|i| (format!("s-{i:02}"), 1)));
    assert_eq!(session, expected, "session s out of order");
    let other = calls.iter().find(|(id, ..)| id == "other").unwrap().2 - started;
    assert!(other < Duration::from_secs(20), "the other session waited for s: {other:?}");
    assert_eq!(worker(&health, "full").restarts, 0);
    assert_eq!(broker.message_count(QUEUE), 0);
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Ensures that, without broker sessions, a restart does not forget that a session waits
/// for its delayed head: the follower released by the restart still runs after the head.
#[tokio::test(start_paused = true)]
async fn restart_keeps_a_session_waiting_for_its_delayed_head() {
    let broker =
        broker_holding_local_sessions(Duration::from_secs(30), &[("s-1", "s"), ("s-2", "s")]).await;
    let calls: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let record = |message: &Message| (message.id.clone(), message.delivery_count);
    let handler = recorded(&calls, record, |message| async move {
        if message.id == "s-1" && message.delivery_count == 1 {
            Outcome::retry_after(Duration::from_secs(20), "not yet")
        } else {
            Outcome::Complete
        }
    });
    let supervisor = supervisor();
    let source = LocalSessions(broker.source(QUEUE).unwrap());
    supervisor.spawn(Updater::with_source("restarted", source, handler).with_config(config()));
    let health = supervisor.health();
    eventually("s-1 retried", Duration::from_secs(5), || {
        worker(&health, "restarted").outcomes.retried == 1
    })
    .await;
    broker.faults(QUEUE).fail_receives(1, steward_core::ErrorKind::Connection);
    eventually("a restart", Duration::from_secs(10), || worker(&health, "restarted").restarts == 1)
        .await;
    eventually("both completed", Duration::from_secs(600), || {
        worker(&health, "restarted").outcomes.completed == 2
    })
    .await;
    let calls = calls.lock().unwrap().clone();
    let order: Vec<_> = calls.iter().map(|(id, n)| format!("{id}#{n}")).collect();
    assert_eq!(order, ["s-1#1", "s-1#2", "s-2#2"], "s-2 overtook s-1 after the restart");
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Handling starts (`(id, delivery count)`, in order) and overlaps within a session.
#[derive(Default)]
struct Log {
    starts: Mutex<Vec<(String, u32)>>,
    busy: Mutex<HashSet<String>>,
    overlaps: Mutex<Vec<String>>,
}

impl Log {
    fn order(&self) -> Vec<String> {
        self.starts.lock().unwrap().iter().map(|(id, _)| id.clone()).collect()
    }

    fn overlaps(&self) -> Vec<String> {
        self.overlaps.lock().unwrap().clone()
    }
}

/// Records starts and overlaps into `log`; message `long` runs 60 s; message `head`
/// asks for a retry after `head_delay` on its first delivery.
fn recording(log: &Arc<Log>, head_delay: Duration) -> impl steward_core::Handler {
    let log = log.clone();
    handler_fn(move |message| {
        let log = log.clone();
        async move {
            let session = message.session_id.clone().unwrap_or_default();
            log.starts.lock().unwrap().push((message.id.clone(), message.delivery_count));
            if !log.busy.lock().unwrap().insert(session.clone()) {
                log.overlaps.lock().unwrap().push(message.id.clone());
            }
            if message.id == "long" {
                sleep(Duration::from_secs(60)).await;
            }
            log.busy.lock().unwrap().remove(&session);
            if message.id == "head" && message.delivery_count == 1 {
                return Outcome::retry_after(head_delay, "later");
            }
            Outcome::Complete
        }
    })
}

/// Ensures that a message parked behind its session's running head that loses its lock
/// does not free the session: its redelivery waits until the head is done, and the two
/// never overlap.
#[tokio::test(start_paused = true)]
async fn parked_message_losing_its_lock_does_not_free_a_running_session() {
    let broker =
        broker_holding_local_sessions(Duration::from_secs(30), &[("long", "s"), ("next", "s")])
            .await;
    let faults = Arc::new(SettleFaults::default());
    SettleFaults::arm(&faults.lose_renewal, "next", 1);
    let log = Arc::new(Log::default());
    let supervisor = supervisor();
    let source = Faulty { inner: LocalSessions(broker.source(QUEUE).unwrap()), faults };
    supervisor.spawn(
        Updater::with_source("lost-parked", source, recording(&log, Duration::ZERO))
            .with_config(config().with_concurrency(2)),
    );
    sleep(Duration::from_secs(120)).await;
    assert_eq!(log.order(), ["long", "next"]);
    assert_eq!(log.overlaps(), Vec::<String>::new(), "session s overlapped");
}

/// Marks messages named `poison*` as delivered 99 times.
struct Poisoned<S>(S);

support::wrap_source!(
    Poisoned.0,
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, TransportError> {
        let batch = self.0.receive(max, wait).await?;
        Ok(support::map_messages(batch, |message| {
            if message.id.starts_with("poison") {
                message.delivery_count = 99;
            }
        }))
    }
);

/// Ensures that a message dead-lettered on arrival (over `max_deliveries`) does not
/// free its session while another message of it runs.
#[tokio::test(start_paused = true)]
async fn message_dead_lettered_on_arrival_does_not_free_a_running_session() {
    let broker = broker_holding_local_sessions(
        Duration::from_secs(30),
        &[("long", "s"), ("poison", "s"), ("next", "s")],
    )
    .await;
    let log = Arc::new(Log::default());
    let supervisor = supervisor();
    let source = Poisoned(LocalSessions(broker.source(QUEUE).unwrap()));
    supervisor.spawn(
        Updater::with_source("poisoned", source, recording(&log, Duration::ZERO))
            .with_config(config().with_concurrency(2)),
    );
    sleep(Duration::from_secs(120)).await;
    assert_eq!(log.order(), ["long", "next"]);
    assert_eq!(log.overlaps(), Vec::<String>::new(), "session s overlapped");
    assert_eq!(broker.dead_letter_count(QUEUE), 1);
}

/// Ensures that a restart hands the next run a session waiting for its head first:
/// the error drain releases the parked follower before the running head, yet after the
/// restart the head runs before the follower.
#[tokio::test(start_paused = true)]
async fn restart_keeps_the_running_head_ahead_of_its_released_follower() {
    let broker =
        broker_holding_local_sessions(Duration::from_secs(30), &[("long", "s"), ("next", "s")])
            .await;
    let log = Arc::new(Log::default());
    let supervisor = supervisor();
    let source = LocalSessions(broker.source(QUEUE).unwrap());
    supervisor.spawn(
        Updater::with_source("restarted", source, recording(&log, Duration::ZERO)).with_config({
            let mut config = config().with_concurrency(2).with_wait(Duration::from_secs(5));
            config.error_drain = Duration::from_secs(1);
            config
        }),
    );
    sleep(Duration::from_millis(100)).await;
    broker.faults(QUEUE).fail_receives(1, ErrorKind::Connection);
    sleep(Duration::from_secs(300)).await;
    let starts = log.order();
    assert_eq!(starts[1..3], ["long", "next"], "{starts:?}");
}

/// Ensures that when the followers of a session whose head is back at the broker for
/// its delay fill the parked bound, the head is still received and runs first: the
/// newest followers go back to the broker until the head is due, instead of intake
/// stopping until the session's wait runs out.
#[tokio::test(start_paused = true)]
async fn full_parked_bound_does_not_let_a_follower_overtake_its_head() {
    let broker = broker(Duration::from_secs(30));
    send_local_session(&broker, "head", "s").await;
    for i in 0..12 {
        send_local_session(&broker, &format!("f{i:02}"), "s").await;
    }
    let log = Arc::new(Log::default());
    let supervisor = supervisor();
    let source = LocalSessions(broker.source(QUEUE).unwrap());
    supervisor.spawn(
        Updater::with_source("parked-full", source, recording(&log, Duration::from_secs(10)))
            .with_config(config().with_concurrency(1).with_batch_size(1)),
    );
    sleep(Duration::from_secs(300)).await;
    let expected: Vec<String> = ["head", "head"]
        .into_iter()
        .map(str::to_owned)
        .chain((0..12).map(|i| format!("f{i:02}")))
        .collect();
    assert_eq!(log.order(), expected, "session s in send order");
    assert_eq!(broker.dead_letter_count(QUEUE), 0);
}

/// Abandons take effect at the broker, but their answer never arrives (a lost response).
struct LostAbandonAnswer<S>(S);

struct LostAnswerSettle {
    inner: tokio::sync::Mutex<Option<Delivery>>,
    until: Option<Instant>,
}

impl LostAnswerSettle {
    async fn take(&self) -> Result<Delivery, TransportError> {
        self.inner.lock().await.take().ok_or_else(|| TransportError::lock_lost("settled"))
    }
}

#[async_trait]
impl Settle for LostAnswerSettle {
    fn locked_until(&self) -> Option<Instant> {
        self.until
    }

    async fn renew_lock(&self) -> Result<Option<Instant>, TransportError> {
        match self.inner.lock().await.as_ref() {
            Some(delivery) => delivery.renew_lock().await,
            None => Err(TransportError::lock_lost("settled")),
        }
    }

    async fn complete(&self) -> Result<(), TransportError> {
        self.take().await?.complete().await
    }

    async fn abandon(&self, delay: Option<Duration>) -> Result<(), TransportError> {
        self.take().await?.abandon(delay).await?;
        std::future::pending().await
    }

    async fn dead_letter(&self, reason: &str, description: &str) -> Result<(), TransportError> {
        self.take().await?.dead_letter(reason, description).await
    }
}

support::wrap_source!(
    LostAbandonAnswer.0,
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, TransportError> {
        let batch = self.0.receive(max, wait).await?;
        Ok(batch
            .into_iter()
            .map(|delivery| {
                let message = (**delivery.message()).clone();
                let until = delivery.locked_until();
                let inner = tokio::sync::Mutex::new(Some(delivery));
                Delivery::new(message, LostAnswerSettle { inner, until })
            })
            .collect())
    }
);

/// Ensures that a delayed abandon the broker applied but whose answer timed out keeps
/// its session waiting past the delay (not only until the lock would have run out), so
/// the follower does not overtake the retried head.
#[tokio::test(start_paused = true)]
async fn unanswered_delayed_abandon_keeps_the_follower_behind_its_head() {
    let broker =
        broker_holding_local_sessions(Duration::from_secs(30), &[("head", "s"), ("next", "s")])
            .await;
    let log = Arc::new(Log::default());
    let supervisor = supervisor();
    let source = LostAbandonAnswer(LocalSessions(broker.source(QUEUE).unwrap()));
    supervisor.spawn(
        Updater::with_source("lost-answer", source, recording(&log, Duration::from_secs(120)))
            .with_config(config().with_concurrency(2).with_broker_timeout(Duration::from_secs(5))),
    );
    sleep(Duration::from_secs(600)).await;
    assert_eq!(log.order(), ["head", "head", "next"]);
}

/// Ensures that a head held here for its delayed retry, whose parked follower loses its
/// lock meanwhile, still goes before that follower: the session waits for the head
/// first, then for the follower.
#[tokio::test(start_paused = true)]
async fn locally_held_head_stays_ahead_of_a_follower_that_lost_its_lock() {
    let broker =
        broker_holding_local_sessions(Duration::from_secs(30), &[("head", "s"), ("next", "s")])
            .await;
    let faults = Arc::new(SettleFaults::default());
    SettleFaults::arm(&faults.lose_renewal, "next", 1);
    let log = Arc::new(Log::default());
    let supervisor = supervisor();
    let inner = WithoutDelayedAbandon(LocalSessions(broker.source(QUEUE).unwrap()));
    supervisor.spawn(
        Updater::with_source(
            "held-head",
            Faulty { inner, faults },
            recording(&log, Duration::from_secs(25)),
        )
        .with_config(config().with_concurrency(2).with_wait(Duration::from_secs(10))),
    );
    sleep(Duration::from_secs(300)).await;
    assert_eq!(log.order(), ["head", "head", "next"]);
    assert_eq!(log.overlaps(), Vec::<String>::new(), "session s overlapped");
}

/// Ensures that a receive that hangs is no evidence that another consumer took the
/// message a session waits for: the follower does not start when the wait's bound
/// passes without a poll answering, the waiting follower's renewed lock does not count
/// as progress (the hung worker stalls and is restarted), and once receives answer
/// again the head runs first.
#[tokio::test(start_paused = true)]
async fn hung_receive_is_no_evidence_that_a_waited_for_head_was_taken() {
    let broker =
        broker_holding_local_sessions(Duration::from_secs(30), &[("head", "s"), ("next", "s")])
            .await;
    let log = Arc::new(Log::default());
    let supervisor = supervisor();
    let source = LocalSessions(broker.source(QUEUE).unwrap());
    supervisor.spawn(
        Updater::with_source("hung-wait", source, recording(&log, Duration::from_secs(5)))
            .with_config(config().with_concurrency(2)),
    );
    let health = supervisor.health();
    sleep(Duration::from_millis(100)).await;
    broker.faults(QUEUE).hang_receives(true);
    sleep(Duration::from_secs(100)).await;
    assert_eq!(log.order(), ["head"], "the follower overtook its head");
    assert!(worker(&health, "hung-wait").restarts >= 1, "a hung worker must stall");
    broker.faults(QUEUE).hang_receives(false);
    sleep(Duration::from_secs(200)).await;
    assert_eq!(log.order(), ["head", "head", "next"]);
}
