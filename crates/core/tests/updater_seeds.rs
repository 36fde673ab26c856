//! Regression tests for Updater defects the deterministic simulation (`cargo xtask sim`)
//! found; each names the seed that failed before its fix and the defect. All run on a
//! transport without broker sessions, where the Updater keeps each session's order.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use steward_core::{
    ErrorKind, Handler, Message, MessageSource, Outcome, Updater, UpdaterConfig, WorkerState,
};
use steward_inmem::InMemoryBroker;
use support::{
    Faulty, LocalSessions, QUEUE, SettleFaults, WithoutDelayedAbandon, broker, config, eventually,
    send_local_session, supervisor, worker,
};
use tokio::time::{Instant, sleep};

/// What a handler does on one handling of a message.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Works this long, then completes.
    Complete(Duration),
    /// Works this long, then asks for a retry after the delay.
    RetryAfter(Duration, Duration),
    /// Never returns.
    Hang,
}

/// One handling: message id, delivery count, start, and end if it returned.
#[derive(Debug, Clone)]
struct Call {
    id: String,
    delivery: u32,
    start: Instant,
    end: Option<Instant>,
}

/// A handler that plays each message's script, one step per handling (then completes
/// at once), and records every handling.
#[derive(Clone, Default)]
struct Scripted {
    scripts: Arc<Mutex<BTreeMap<String, Vec<Step>>>>,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl Scripted {
    fn new(scripts: &[(&str, &[Step])]) -> Self {
        let scripts =
            scripts.iter().map(|(id, steps)| ((*id).to_owned(), steps.to_vec())).collect();
        Self { scripts: Arc::new(Mutex::new(scripts)), calls: Arc::default() }
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// The handlings so far as `id#delivery`, in the order they started.
    fn started(&self) -> Vec<String> {
        self.calls().iter().map(|c| format!("{}#{}", c.id, c.delivery)).collect()
    }

    /// How many handlings of `id` returned.
    fn ended(&self, id: &str) -> usize {
        self.calls().iter().filter(|c| c.id == id && c.end.is_some()).count()
    }
}

#[async_trait]
impl Handler for Scripted {
    async fn handle(&self, message: Arc<Message>) -> Outcome {
        let step = {
            let mut scripts = self.scripts.lock().unwrap();
            let steps = scripts.entry(message.id.clone()).or_default();
            if steps.is_empty() { Step::Complete(Duration::ZERO) } else { steps.remove(0) }
        };
        let at = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(Call {
                id: message.id.clone(),
                delivery: message.delivery_count,
                start: Instant::now(),
                end: None,
            });
            calls.len() - 1
        };
        let outcome = match step {
            Step::Complete(work) => {
                sleep(work).await;
                Outcome::Complete
            }
            Step::RetryAfter(work, delay) => {
                sleep(work).await;
                Outcome::retry_after(delay, "scripted retry")
            }
            Step::Hang => std::future::pending().await,
        };
        self.calls.lock().unwrap()[at].end = Some(Instant::now());
        outcome
    }
}

/// Asserts that every handling of `later` started after the last handling of `earlier`
/// ended.
fn assert_after(calls: &[Call], earlier: &str, later: &str) {
    let ended = calls.iter().filter(|c| c.id == earlier).filter_map(|c| c.end).max().unwrap();
    for call in calls.iter().filter(|c| c.id == later) {
        assert!(
            call.start >= ended,
            "{later}#{} started at {:?}, before {earlier} ended at {ended:?}",
            call.delivery,
            call.start
        );
    }
}

/// A config with the error drain shortened to `drain`.
fn with_error_drain(config: UpdaterConfig, drain: Duration) -> UpdaterConfig {
    let mut config = config;
    config.error_drain = drain;
    config
}

async fn send_all(broker: &InMemoryBroker, ids: &[&str]) {
    for id in ids {
        send_local_session(broker, id, "s").await;
    }
}

/// Ensures that a settlement given up at the end of a run's drain makes its session
/// wait, in the next run, until the message's lock runs out: the message comes back
/// only then, not when the settlement was given up (simulation seed 3326, and 6060,
/// 7846, 10038, 14745, 15408, 18554: the wait began at the moment it was given up and
/// lasted 2 × `wait`, so a follower released by the drain ran first).
#[tokio::test(start_paused = true)]
async fn a_settlement_given_up_at_the_drain_waits_for_its_lock_in_the_next_run() {
    let broker = broker(Duration::from_secs(30));
    send_all(&broker, &["a", "b"]).await;
    let faults = Arc::new(SettleFaults::default());
    SettleFaults::arm(&faults.hang_complete, "a", 1);
    let handler = Scripted::new(&[("a", &[Step::Complete(Duration::from_secs(1))])]);
    let source = Faulty { inner: LocalSessions(broker.source(QUEUE).unwrap()), faults };
    let supervisor = supervisor();
    let config = with_error_drain(config().with_concurrency(2), Duration::from_secs(1));
    supervisor.spawn(Updater::with_source("given-up", source, handler.clone()).with_config(config));
    let health = supervisor.health();
    eventually("a handled", Duration::from_secs(5), || handler.ended("a") == 1).await;
    // The next receive fails: the run drains, its completion of a still hanging.
    broker.faults(QUEUE).fail_receives(1, ErrorKind::Connection);
    eventually("a and b completed", Duration::from_secs(120), || {
        worker(&health, "given-up").outcomes.completed == 2
    })
    .await;
    assert_eq!(handler.started(), ["a#1", "a#2", "b#2"]);
    let calls = handler.calls();
    assert!(calls[1].start >= calls[0].start + Duration::from_secs(30), "a#2 after its lock");
    assert_after(&calls, "a", "b");
    assert_eq!(worker(&health, "given-up").restarts, 1);
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Ensures that a message found lost while parked, and received again in one batch
/// right behind its session's returning head, goes where its first copy arrived:
/// after a follower that arrived before it (simulation seed 9926, and 6480, 6674, 7790,
/// 12942, 14083, 18312: its place was taken by comparing its rank with the new key of
/// the head's copy, so it went ahead of the head's copy and of that follower, and ran
/// before the follower).
#[tokio::test(start_paused = true)]
async fn a_returned_copy_stands_where_it_first_arrived_behind_a_returning_head() {
    let broker = broker(Duration::from_secs(10));
    send_all(&broker, &["a", "b", "c"]).await;
    let faults = Arc::new(SettleFaults::default());
    // c's first renewal (at 5 s) reports its lock lost; the broker keeps it until 10 s,
    // when a's delayed retry is due too, and the session still waits for c (2 × 5 s).
    SettleFaults::arm(&faults.lose_renewal, "c", 1);
    let retry = Step::RetryAfter(Duration::ZERO, Duration::from_secs(10));
    let handler = Scripted::new(&[("a", &[retry])]);
    let source = Faulty { inner: LocalSessions(broker.source(QUEUE).unwrap()), faults };
    let supervisor = supervisor();
    let config = config().with_concurrency(1).with_batch_size(3).with_wait(Duration::from_secs(5));
    supervisor.spawn(Updater::with_source("placed", source, handler.clone()).with_config(config));
    let health = supervisor.health();
    eventually("all completed", Duration::from_secs(60), || {
        worker(&health, "placed").outcomes.completed == 3
    })
    .await;
    assert_eq!(handler.started(), ["a#1", "a#2", "b#1", "c#2"]);
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Ensures that on a transport without delayed abandon, a session's head that comes
/// back from its local delayed retry while parked followers fill their bound is still
/// received: intake goes on, one message at a time, and the worker never stalls
/// (simulation seeds 7987, 10225, 10241, 15080: intake stopped at the parked bound, the
/// head stayed at the broker, and the stall watchdog restarted the worker).
#[tokio::test(start_paused = true)]
async fn a_head_back_from_its_local_delay_is_received_past_the_parked_bound() {
    let broker = broker(Duration::from_secs(30));
    let ids = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"];
    send_all(&broker, &ids).await;
    let retry = Step::RetryAfter(Duration::ZERO, Duration::from_secs(5));
    let handler = Scripted::new(&[("a", &[retry])]);
    let source = WithoutDelayedAbandon(LocalSessions(broker.source(QUEUE).unwrap()));
    let supervisor = supervisor();
    // Parked bound: 4 × (1 + 1) = 8, which b..i fill.
    let config = config().with_concurrency(1).with_batch_size(1);
    supervisor.spawn(Updater::with_source("overflow", source, handler.clone()).with_config(config));
    let health = supervisor.health();
    eventually("all completed within 30 s", Duration::from_secs(30), || {
        worker(&health, "overflow").outcomes.completed == 10
    })
    .await;
    let order: Vec<String> = handler.calls().iter().map(|c| c.id.clone()).collect();
    let mut expected = vec!["a".to_owned()];
    expected.extend(ids.iter().map(|id| (*id).to_owned()));
    assert_eq!(order, expected);
    let state = worker(&health, "overflow");
    assert_eq!((state.restarts, state.state), (0, WorkerState::Running), "never stalled");
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Ensures that a copy of a message waiting here whose lock was taken back, and that
/// the broker redelivers, never runs: the redelivery replaces it (simulation seed
/// 10878: x's first copy was found lost and x came back; that copy's lock expired too
/// and x came back again; the stale copy ran after the head, so x was handled twice).
#[tokio::test(start_paused = true)]
async fn a_stale_copy_replaced_by_a_redelivery_never_runs() {
    let broker = broker(Duration::from_secs(10));
    send_all(&broker, &["a", "x"]).await;
    let faults = Arc::new(SettleFaults::default());
    // x's first renewal (at 5 s) reports the lock lost; the broker redelivers x at 10 s.
    SettleFaults::arm(&faults.lose_renewal, "x", 1);
    // a comes back at 13 s: after x's second copy lost its lock (12 s), before that
    // copy's first renewal (15 s) could find out.
    let retry = Step::RetryAfter(Duration::ZERO, Duration::from_secs(13));
    let handler = Scripted::new(&[("a", &[retry])]);
    let source = Faulty { inner: LocalSessions(broker.source(QUEUE).unwrap()), faults };
    let supervisor = supervisor();
    supervisor.spawn(Updater::with_source("stale", source, handler.clone()).with_config(config()));
    let health = supervisor.health();
    sleep(Duration::from_secs(12)).await;
    broker.faults(QUEUE).expire_locks();
    eventually("a and x completed", Duration::from_secs(60), || {
        worker(&health, "stale").outcomes.completed == 2
    })
    .await;
    assert_eq!(handler.started(), ["a#1", "a#2", "x#3"]);
    assert_eq!(worker(&health, "stale").outcomes.lease_lost, 2, "both stale copies");
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Ensures that a running message whose lock was lost, cut short at the drain
/// deadline, makes its session wait for it in the next run (simulation seed 6: it did
/// not, so the follower the drain released ran first).
#[tokio::test(start_paused = true)]
async fn a_lost_running_message_aborted_by_the_drain_is_waited_for_next_run() {
    let broker = broker(Duration::from_secs(30));
    send_all(&broker, &["a", "b"]).await;
    let faults = Arc::new(SettleFaults::default());
    // a's first renewal (at 15 s) reports its lock lost; the broker keeps it until 30 s.
    SettleFaults::arm(&faults.lose_renewal, "a", 1);
    let handler = Scripted::new(&[("a", &[Step::Hang])]);
    let source = Faulty { inner: LocalSessions(broker.source(QUEUE).unwrap()), faults };
    let supervisor = supervisor();
    let config = with_error_drain(
        config().with_concurrency(2).with_wait(Duration::from_secs(5)),
        Duration::from_secs(1),
    );
    supervisor.spawn(Updater::with_source("lost", source, handler.clone()).with_config(config));
    let health = supervisor.health();
    sleep(Duration::from_secs(22)).await;
    assert_eq!(worker(&health, "lost").outcomes.lease_lost, 1);
    // The run ends: a still hangs, and is aborted at the error drain's deadline.
    broker.faults(QUEUE).fail_receives(1, ErrorKind::Connection);
    eventually("a and b completed", Duration::from_secs(60), || {
        worker(&health, "lost").outcomes.completed == 2
    })
    .await;
    assert_eq!(handler.started(), ["a#1", "a#2", "b#2"]);
    assert_after(&handler.calls(), "a", "b");
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Ensures that a session's wait for its head does not run out while no receive can
/// happen because every slot is busy: the head, long due back, is received first once
/// a slot frees (simulation seed 31: the wait ended by the clock, and the follower ran
/// before the head).
#[tokio::test(start_paused = true)]
async fn a_wait_does_not_run_out_while_every_slot_is_busy() {
    let broker = broker(Duration::from_secs(30));
    send_all(&broker, &["a", "b"]).await;
    for id in ["x", "y"] {
        support::send(&broker, id, None).await;
    }
    let busy = Step::Complete(Duration::from_secs(60));
    let retry = Step::RetryAfter(Duration::ZERO, Duration::from_secs(2));
    let handler = Scripted::new(&[("a", &[retry]), ("x", &[busy]), ("y", &[busy])]);
    let source = LocalSessions(broker.source(QUEUE).unwrap());
    let supervisor = supervisor();
    let config = config().with_concurrency(2).with_batch_size(4);
    supervisor.spawn(Updater::with_source("busy", source, handler.clone()).with_config(config));
    let health = supervisor.health();
    eventually("all completed", Duration::from_secs(120), || {
        worker(&health, "busy").outcomes.completed == 4
    })
    .await;
    let started = handler.started();
    let a2 = started.iter().position(|c| c == "a#2").unwrap();
    let b = started.iter().position(|c| c.starts_with("b#")).unwrap();
    assert!(a2 < b, "the follower ran before its head: {started:?}");
    // a was due back at 2 s, its wait's bound 6 × 2 s + 2 × 1 s + 5 s later; the slots were
    // busy until 60 s.
    let calls = handler.calls();
    let busy_until = calls.iter().filter(|c| c.id == "x").find_map(|c| c.end).unwrap();
    assert!(calls[a2].start >= busy_until);
    assert_after(&calls, "a", "b");
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Ensures that redeliveries of messages still waiting here (their locks taken back)
/// take their old deliveries' places: after the head, in arrival order, and the old
/// copies never run (simulation seed 61: a redelivery went to the back of the queue,
/// behind its own followers).
#[tokio::test(start_paused = true)]
async fn redeliveries_of_waiting_messages_take_their_places() {
    let broker = broker(Duration::from_secs(30));
    send_all(&broker, &["a", "x", "y"]).await;
    let retry = Step::RetryAfter(Duration::ZERO, Duration::from_secs(12));
    let handler = Scripted::new(&[("a", &[retry])]);
    let source = LocalSessions(broker.source(QUEUE).unwrap());
    let supervisor = supervisor();
    let config = config().with_concurrency(2).with_batch_size(4);
    supervisor.spawn(Updater::with_source("placed", source, handler.clone()).with_config(config));
    let health = supervisor.health();
    sleep(Duration::from_secs(2)).await;
    // x and y wait for a (back at 12 s); the broker takes their locks back and
    // redelivers both at once.
    broker.faults(QUEUE).expire_locks();
    eventually("all completed", Duration::from_secs(60), || {
        worker(&health, "placed").outcomes.completed == 3
    })
    .await;
    assert_eq!(handler.started(), ["a#1", "a#2", "x#2", "y#2"]);
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Ensures that a follower whose lock is lost while it waits holds back only the
/// messages that arrived after it, not those ahead of it (simulation seed 151: it
/// blocked the whole session until it came back, and then ran first).
#[tokio::test(start_paused = true)]
async fn a_follower_losing_its_lock_holds_back_only_those_behind_it() {
    let broker = broker(Duration::from_secs(10));
    send_all(&broker, &["h", "x", "y", "z"]).await;
    let faults = Arc::new(SettleFaults::default());
    // y's first renewal (at 5 s) reports its lock lost; the broker redelivers it when
    // the lock runs out (10 s), within the wait's bound (2 × 5 s), while h still runs.
    SettleFaults::arm(&faults.lose_renewal, "y", 1);
    let handler = Scripted::new(&[("h", &[Step::Complete(Duration::from_secs(20))])]);
    let source = Faulty { inner: LocalSessions(broker.source(QUEUE).unwrap()), faults };
    let supervisor = supervisor();
    let config = config().with_concurrency(2).with_batch_size(4).with_wait(Duration::from_secs(5));
    supervisor.spawn(Updater::with_source("ranked", source, handler.clone()).with_config(config));
    let health = supervisor.health();
    eventually("all completed", Duration::from_secs(120), || {
        worker(&health, "ranked").outcomes.completed == 4
    })
    .await;
    assert_eq!(handler.started(), ["h#1", "x#1", "y#2", "z#1"]);
    let calls = handler.calls();
    assert_eq!(calls[1].start, calls[0].end.unwrap(), "x ran as soon as h was done");
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Ensures that a completion still hanging when a run's drain ends makes the session
/// wait for its message in the next run (simulation seed 413: the next run let the
/// follower go first).
#[tokio::test(start_paused = true)]
async fn a_completion_hanging_past_the_drain_holds_the_session_next_run() {
    let broker = broker(Duration::from_secs(10));
    send_all(&broker, &["a", "b"]).await;
    let faults = Arc::new(SettleFaults::default());
    SettleFaults::arm(&faults.hang_complete, "a", 1);
    let handler = Scripted::new(&[]);
    let source = Faulty { inner: LocalSessions(broker.source(QUEUE).unwrap()), faults };
    let supervisor = supervisor();
    let config = with_error_drain(
        config().with_concurrency(2).with_wait(Duration::from_secs(5)),
        Duration::from_secs(1),
    );
    supervisor.spawn(Updater::with_source("hung", source, handler.clone()).with_config(config));
    let health = supervisor.health();
    eventually("a handled", Duration::from_secs(5), || handler.ended("a") == 1).await;
    broker.faults(QUEUE).fail_receives(1, ErrorKind::Connection);
    eventually("a and b completed", Duration::from_secs(60), || {
        worker(&health, "hung").outcomes.completed == 2
    })
    .await;
    assert_eq!(handler.started(), ["a#1", "a#2", "b#2"]);
    assert_after(&handler.calls(), "a", "b");
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Ensures that a message dead-lettered on arrival (over its delivery limit) holds its
/// session's later messages until the dead-letter is answered: one that fails or is
/// given up brings the message back (simulation seed 26189: the session's wait for the
/// message ran out while its dead-letter hung, and the follower ran first).
#[tokio::test(start_paused = true)]
async fn a_dead_letter_on_arrival_holds_its_session_until_answered() {
    let broker = broker(Duration::from_secs(30));
    send_all(&broker, &["a", "b"]).await;
    // One delivery of a already spent: the Updater sees it a second time, over its limit.
    let direct = broker.source(QUEUE).unwrap();
    let first = direct.receive(1, Duration::from_secs(1)).await.unwrap();
    first.into_iter().next().unwrap().abandon(None).await.unwrap();
    broker.faults(QUEUE).hang_dispositions(true);
    let handler = Scripted::new(&[]);
    let source = LocalSessions(broker.source(QUEUE).unwrap());
    let supervisor = supervisor();
    let config = config().with_max_deliveries(1).with_concurrency(2);
    supervisor.spawn(Updater::with_source("limit", source, handler.clone()).with_config(config));
    let health = supervisor.health();
    sleep(Duration::from_secs(10)).await;
    assert_eq!(handler.started(), Vec::<String>::new(), "b ran while a's dead-letter hung");
    let released = Instant::now();
    broker.faults(QUEUE).hang_dispositions(false);
    eventually("b completed", Duration::from_secs(120), || {
        worker(&health, "limit").outcomes.completed == 1
    })
    .await;
    assert_eq!(handler.started(), ["b#1"]);
    assert!(handler.calls()[0].start >= released);
    assert_eq!(broker.dead_letters(QUEUE).len(), 1, "a was dead-lettered");
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Ensures that a message waiting here is not taken for a stale copy of another
/// message that only shares its id (producers that retry a send, or reuse ids, make
/// such messages; found by review, not by a seed): `d` of session `t` is retried and
/// comes back with delivery count 2 while the other `d`, of session `s`, waits behind
/// its head. That one's lock is not lost, so it must run, long before its lock (an
/// hour here; never, on a transport without timed locks such as RabbitMQ) runs out.
#[tokio::test(start_paused = true)]
async fn a_waiting_message_is_not_replaced_by_another_with_the_same_id() {
    let broker = broker(Duration::from_secs(3600));
    send_local_session(&broker, "h", "s").await;
    send_local_session(&broker, "d", "t").await;
    send_local_session(&broker, "d", "s").await;
    let retry = Step::RetryAfter(Duration::ZERO, Duration::ZERO);
    let handler =
        Scripted::new(&[("h", &[Step::Complete(Duration::from_secs(10))]), ("d", &[retry])]);
    let source = LocalSessions(broker.source(QUEUE).unwrap());
    let supervisor = supervisor();
    let config = config().with_concurrency(2).with_batch_size(4);
    supervisor.spawn(Updater::with_source("same-id", source, handler.clone()).with_config(config));
    let health = supervisor.health();
    sleep(Duration::from_secs(30)).await;
    assert_eq!(worker(&health, "same-id").outcomes.lease_lost, 0, "no lock was lost");
    eventually("h and both d completed", Duration::from_secs(300), || {
        worker(&health, "same-id").outcomes.completed == 3
    })
    .await;
    assert_eq!(handler.started(), ["h#1", "d#1", "d#2", "d#1"]);
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

/// Ensures that after a failed settlement a session waits for its head past the
/// reported lock expiry by more than 2 × `wait` when `wait` is short: a transport may
/// report its lock up to `LOCK_REPORT_SLACK` more than that early (Service Bus REST
/// counts the lock from the start of a long poll, NATS keeps a margin and an arrival
/// slack), and the follower must not start before the head is back (with a 200 ms
/// `wait` and a lock reported 1 s early, the wait ended 0.4 s after the reported
/// expiry, 0.6 s before the head came back, and the follower ran first).
#[tokio::test(start_paused = true)]
async fn a_short_wait_still_waits_for_a_head_whose_lock_was_reported_early() {
    let broker = broker(Duration::from_secs(5));
    send_all(&broker, &["a", "b"]).await;
    let faults = Arc::new(SettleFaults::default());
    *faults.reports_early.lock().unwrap() = Duration::from_secs(1);
    SettleFaults::arm(&faults.fail_complete, "a", 1);
    let handler = Scripted::new(&[]);
    let source = Faulty { inner: LocalSessions(broker.source(QUEUE).unwrap()), faults };
    let supervisor = supervisor();
    let config = config().with_wait(Duration::from_millis(200)).with_concurrency(2);
    supervisor.spawn(Updater::with_source("early", source, handler.clone()).with_config(config));
    let health = supervisor.health();
    eventually("a and b completed", Duration::from_secs(60), || {
        worker(&health, "early").outcomes.completed == 2
    })
    .await;
    assert_eq!(handler.started(), ["a#1", "a#2", "b#1"]);
    let calls = handler.calls();
    assert!(calls[1].start >= calls[0].start + Duration::from_secs(5), "a#2 after its lock");
    assert_after(&calls, "a", "b");
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}
