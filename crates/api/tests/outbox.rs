//! The outbox worker on SQLite and PostgreSQL (`*_postgres`): retries, order per
//! aggregate, leases across workers, crash safety.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use steward_api::storage::{LeaseClock, OutboxMessage, Store};
use steward_api::workers::{OutboxConfig, OutboxWorker};
use steward_core::{
    Backoff, ErrorKind, Jitter, MessageSink, OutgoingMessage, Supervisor, SupervisorConfig,
    TransportError,
};
use steward_inmem::InMemoryBroker;
use tokio::time::{Instant, sleep};

fn fast() -> OutboxConfig {
    OutboxConfig::default().with_poll_interval(Duration::from_millis(20)).with_retry_backoff(
        Backoff::new(Duration::ZERO, Duration::ZERO).with_jitter(Jitter::none()),
    )
}

async fn write(store: &Store, aggregate: &str, n: usize) {
    for i in 0..n {
        let mut tx = store.begin().await.unwrap();
        let message = OutboxMessage::json(
            "out",
            &serde_json::json!({"aggregate": aggregate, "n": i}),
            aggregate,
        )
        .unwrap()
        .with_session_id(aggregate);
        tx.insert_outbox(message).await.unwrap();
        tx.commit().await.unwrap();
    }
}

async fn wait_for_empty_outbox(store: &Store) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.outbox_backlog().await.unwrap() > 0 {
        assert!(Instant::now() < deadline, "timed out waiting for the outbox to empty");
        sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(10)).await;
    }
}

fn bodies_by_aggregate(broker: &InMemoryBroker) -> BTreeMap<String, Vec<u64>> {
    let mut by = BTreeMap::<String, Vec<u64>>::new();
    for message in broker.peek("out") {
        let body: serde_json::Value = serde_json::from_slice(&message.body).unwrap();
        by.entry(body["aggregate"].as_str().unwrap().to_owned())
            .or_default()
            .push(body["n"].as_u64().unwrap());
    }
    by
}

/// Ensures that with a sink failing its first sends, every message is still delivered
/// exactly once, in order per aggregate, and every row is removed.
async fn failing_sink_then_working_delivers_each_once_in_order(store: &Store) {
    write(store, "a", 5).await;
    write(store, "b", 5).await;
    let broker = InMemoryBroker::new();
    broker.faults("out").fail_sends(7, ErrorKind::Connection);
    let supervisor = Supervisor::new(SupervisorConfig::default());
    supervisor
        .spawn(OutboxWorker::new(store.clone(), Arc::new(broker.clone())).with_config(fast()));
    wait_for("every message", || broker.message_count("out") == 10).await;
    wait_for_empty_outbox(store).await;
    let by = bodies_by_aggregate(&broker);
    assert_eq!(by["a"], [0, 1, 2, 3, 4], "order within aggregate a");
    assert_eq!(by["b"], [0, 1, 2, 3, 4], "order within aggregate b");
    let ids: HashSet<_> = broker.peek("out").into_iter().map(|m| m.id).collect();
    assert_eq!(ids.len(), 10, "each message once, with its row id as message id");
    let report = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
    assert!(report.is_clean(), "{report:?}");
}

db_test!(
    failing_sink_then_working_delivers_each_once_in_order_sqlite,
    failing_sink_then_working_delivers_each_once_in_order_postgres,
    failing_sink_then_working_delivers_each_once_in_order
);

/// Ensures that a failed publish is recorded on the row and retried after the backoff.
async fn failed_publish_is_recorded_and_backed_off(store: &Store) {
    write(store, "a", 1).await;
    let broker = InMemoryBroker::new();
    broker.faults("out").fail_sends(1, ErrorKind::NotFound);
    let config = fast().with_retry_backoff(
        Backoff::new(Duration::from_secs(3600), Duration::from_secs(3600))
            .with_jitter(Jitter::none()),
    );
    let supervisor = Supervisor::new(SupervisorConfig::default());
    supervisor
        .spawn(OutboxWorker::new(store.clone(), Arc::new(broker.clone())).with_config(config));
    let mut row = None;
    for _ in 0..500 {
        let rows = store.outbox_messages(10).await.unwrap();
        if rows[0].attempts == 1 {
            row = Some(rows[0].clone());
            break;
        }
        sleep(Duration::from_millis(10)).await;
    }
    let row = row.expect("the failure was recorded");
    assert!(row.last_error.as_deref().unwrap().contains("not found"), "{row:?}");
    assert_eq!(row.lease_owner, None, "the lease was given up");
    sleep(Duration::from_millis(300)).await;
    assert_eq!(broker.message_count("out"), 0, "not retried before the backoff");
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

db_test!(
    failed_publish_is_recorded_and_backed_off_sqlite,
    failed_publish_is_recorded_and_backed_off_postgres,
    failed_publish_is_recorded_and_backed_off
);

/// A sink that records, per message id, how many sends are in flight, and fails the
/// test's expectations if two overlap.
#[derive(Default)]
struct Watching {
    in_flight: Mutex<HashSet<String>>,
    overlaps: Mutex<Vec<String>>,
    sent: Mutex<Vec<String>>,
}

#[async_trait]
impl MessageSink for Watching {
    async fn send(&self, _queue: &str, message: OutgoingMessage) -> Result<(), TransportError> {
        let id = message.message_id.clone().unwrap();
        if !self.in_flight.lock().unwrap().insert(id.clone()) {
            self.overlaps.lock().unwrap().push(id.clone());
        }
        sleep(Duration::from_millis(5)).await;
        self.in_flight.lock().unwrap().remove(&id);
        self.sent.lock().unwrap().push(id);
        Ok(())
    }
}

/// Ensures that two outbox workers on one database never send the same row at the same
/// time, and between them send every row.
async fn two_workers_never_send_the_same_row_concurrently(store: &Store) {
    for aggregate in 0..20 {
        write(store, &format!("agg-{aggregate}"), 5).await;
    }
    let sink = Arc::new(Watching::default());
    let supervisor = Supervisor::new(SupervisorConfig::default());
    supervisor.spawn(
        OutboxWorker::new(store.clone(), sink.clone()).with_name("outbox-1").with_config(fast()),
    );
    supervisor.spawn(
        OutboxWorker::new(store.clone(), sink.clone()).with_name("outbox-2").with_config(fast()),
    );
    wait_for("every row sent", || sink.sent.lock().unwrap().len() >= 100).await;
    wait_for_empty_outbox(store).await;
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
    assert!(sink.overlaps.lock().unwrap().is_empty(), "overlapping sends: {:?}", sink.overlaps);
    let sent = sink.sent.lock().unwrap().clone();
    let unique: HashSet<_> = sent.iter().collect();
    assert_eq!(unique.len(), 100, "every row sent");
    assert_eq!(sent.len(), 100, "no row sent twice");
    assert_eq!(store.outbox_backlog().await.unwrap(), 0);
}

db_test!(
    two_workers_never_send_the_same_row_concurrently_sqlite,
    two_workers_never_send_the_same_row_concurrently_postgres,
    two_workers_never_send_the_same_row_concurrently
);

/// A sink whose first send crashes the worker (a panic in the middle of publishing,
/// holding the lease), and which works afterwards.
#[derive(Default)]
struct CrashOnce {
    crashed: std::sync::atomic::AtomicBool,
    inner: InMemoryBroker,
}

#[async_trait]
impl MessageSink for CrashOnce {
    async fn send(&self, queue: &str, message: OutgoingMessage) -> Result<(), TransportError> {
        if !self.crashed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            panic!("worker crashed while publishing");
        }
        self.inner.send(queue, message).await
    }
}

/// Ensures that rows committed while no worker ran are sent once one starts, and that a
/// row claimed by a worker that crashed before sending it is sent after its lease runs
/// out, with nothing lost or reordered.
async fn rows_survive_a_worker_that_crashed_before_sending(store: &Store) {
    write(store, "early", 3).await;
    let sink = Arc::new(CrashOnce::default());
    let config = fast().with_lease(Duration::from_millis(500));
    let supervisor = Supervisor::new(
        SupervisorConfig::default().with_backoff(
            Backoff::new(Duration::from_millis(100), Duration::from_millis(100))
                .with_jitter(Jitter::none()),
        ),
    );
    supervisor.spawn(OutboxWorker::new(store.clone(), sink.clone()).with_config(config));
    let health = supervisor.health();
    wait_for("the crash", || health.snapshot().worker("outbox").is_some_and(|w| w.restarts == 1))
        .await;
    wait_for("every row sent", || sink.inner.message_count("out") == 3).await;
    wait_for_empty_outbox(store).await;
    assert_eq!(bodies_by_aggregate(&sink.inner)["early"], [0, 1, 2], "in order, none twice");
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
    assert_eq!(store.outbox_backlog().await.unwrap(), 0);
}

db_test!(
    rows_survive_a_worker_that_crashed_before_sending_sqlite,
    rows_survive_a_worker_that_crashed_before_sending_postgres,
    rows_survive_a_worker_that_crashed_before_sending
);

/// Ensures that a state transaction that fails (rolls back) leaves no outbox row.
async fn rolled_back_transaction_writes_no_outbox_row(store: &Store) {
    let mut tx = store.begin().await.unwrap();
    tx.insert_outbox(OutboxMessage::json("out", &serde_json::json!({}), "x").unwrap())
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let mut tx = store.begin().await.unwrap();
    tx.insert_outbox(OutboxMessage::json("out", &serde_json::json!({}), "y").unwrap())
        .await
        .unwrap();
    drop(tx);
    assert_eq!(store.outbox_backlog().await.unwrap(), 0);
}

db_test!(
    rolled_back_transaction_writes_no_outbox_row_sqlite,
    rolled_back_transaction_writes_no_outbox_row_postgres,
    rolled_back_transaction_writes_no_outbox_row
);

/// Ensures that a commit wakes the worker at once, well before its poll interval.
async fn commit_wakes_the_worker(store: &Store) {
    let broker = InMemoryBroker::new();
    let config = fast().with_poll_interval(Duration::from_secs(3600));
    let supervisor = Supervisor::new(SupervisorConfig::default());
    supervisor
        .spawn(OutboxWorker::new(store.clone(), Arc::new(broker.clone())).with_config(config));
    let health = supervisor.health();
    wait_for("worker running", || health.snapshot().is_ready()).await;
    sleep(Duration::from_millis(100)).await;
    write(store, "woken", 1).await;
    wait_for("sent without polling", || broker.message_count("out") == 1).await;
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

db_test!(commit_wakes_the_worker_sqlite, commit_wakes_the_worker_postgres, commit_wakes_the_worker);

/// Ensures that the messages of one aggregate follow each other at once, one after the
/// other, without waiting for the poll interval between them.
async fn successive_messages_of_an_aggregate_go_out_without_polling(store: &Store) {
    let broker = InMemoryBroker::new();
    let config = fast().with_poll_interval(Duration::from_secs(3600));
    let supervisor = Supervisor::new(SupervisorConfig::default());
    supervisor
        .spawn(OutboxWorker::new(store.clone(), Arc::new(broker.clone())).with_config(config));
    let health = supervisor.health();
    wait_for("worker running", || health.snapshot().is_ready()).await;
    write(store, "chain", 5).await;
    wait_for("the whole chain", || broker.message_count("out") == 5).await;
    assert_eq!(bodies_by_aggregate(&broker)["chain"], [0, 1, 2, 3, 4]);
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

db_test!(
    successive_messages_of_an_aggregate_go_out_without_polling_sqlite,
    successive_messages_of_an_aggregate_go_out_without_polling_postgres,
    successive_messages_of_an_aggregate_go_out_without_polling
);

/// Milliseconds since the Unix epoch, by the system clock.
fn epoch_ms() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    i64::try_from(since.as_millis()).unwrap()
}

/// A sink that checks each row is sent under a live lease, then moves the clock on by
/// `step`, as a send that took that long would.
struct LeaseChecker {
    store: Store,
    now_ms: Arc<std::sync::atomic::AtomicU64>,
    step_ms: u64,
    broker: InMemoryBroker,
    violations: Mutex<Vec<String>>,
}

#[async_trait]
impl MessageSink for LeaseChecker {
    async fn send(&self, queue: &str, message: OutgoingMessage) -> Result<(), TransportError> {
        use std::sync::atomic::Ordering;
        let now = i64::try_from(self.now_ms.load(Ordering::SeqCst)).unwrap();
        let message_id = message.message_id.as_deref().unwrap();
        let id: i64 = message_id.split('-').next().unwrap().parse().unwrap();
        let rows = self.store.outbox_messages(100).await.unwrap();
        let row = rows.iter().find(|r| r.id == id).unwrap();
        if row.lease_until.is_none_or(|until| until <= now) {
            self.violations
                .lock()
                .unwrap()
                .push(format!("row {id} sent at {now} ms with lease until {:?}", row.lease_until));
        }
        self.now_ms.fetch_add(self.step_ms, Ordering::SeqCst);
        self.broker.send(queue, message).await
    }
}

/// Ensures that a row whose lease is nearly over by the time its turn comes in a pass is
/// not sent on it: it is left for the next claim, so no send happens under a lease
/// another worker could already have taken, and every row still goes out once.
async fn rows_are_never_sent_on_a_spent_lease(store: &Store) {
    use std::sync::atomic::AtomicU64;
    for aggregate in ["a", "b", "c", "d"] {
        write(store, aggregate, 1).await;
    }
    // Rows are available from their commit on, by the system clock.
    let now_ms = Arc::new(AtomicU64::new(u64::try_from(epoch_ms() + 1_000).unwrap()));
    let clock = {
        let now_ms = now_ms.clone();
        steward_api::Clock::from_fn(move || {
            now_ms.load(std::sync::atomic::Ordering::SeqCst) as f64 / 1000.0
        })
    };
    let sink = Arc::new(LeaseChecker {
        store: store.clone(),
        now_ms,
        step_ms: 40_000,
        broker: InMemoryBroker::new(),
        violations: Mutex::default(),
    });
    let mut config = fast().with_lease(Duration::from_secs(60));
    config.concurrency = 1;
    let supervisor = Supervisor::new(SupervisorConfig::default());
    supervisor.spawn(
        OutboxWorker::new(store.clone(), sink.clone())
            .with_clock(LeaseClock::Local(clock))
            .with_config(config),
    );
    wait_for("every row sent", || sink.broker.message_count("out") == 4).await;
    wait_for_empty_outbox(store).await;
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
    assert_eq!(*sink.violations.lock().unwrap(), Vec::<String>::new());
    let sent = bodies_by_aggregate(&sink.broker);
    assert_eq!(sent.values().map(Vec::len).sum::<usize>(), 4, "each row once: {sent:?}");
}

db_test!(
    rows_are_never_sent_on_a_spent_lease_sqlite,
    rows_are_never_sent_on_a_spent_lease_postgres,
    rows_are_never_sent_on_a_spent_lease
);

/// A sink shared by two replicas' workers: it records every send of a message id that
/// starts while another send of that id is still in flight, and holds the first send
/// of aggregate `held` until the test lets it go.
struct Holding {
    held: &'static str,
    holding: tokio::sync::Notify,
    release: tokio::sync::Semaphore,
    first: std::sync::atomic::AtomicBool,
    in_flight: Mutex<HashSet<String>>,
    overlaps: Mutex<Vec<String>>,
    broker: InMemoryBroker,
}

#[async_trait]
impl MessageSink for Holding {
    async fn send(&self, queue: &str, message: OutgoingMessage) -> Result<(), TransportError> {
        let id = message.message_id.clone().unwrap();
        if !self.in_flight.lock().unwrap().insert(id.clone()) {
            self.overlaps.lock().unwrap().push(id.clone());
        }
        let body: serde_json::Value = serde_json::from_slice(&message.body).unwrap();
        if body["aggregate"] == self.held
            && !self.first.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            self.holding.notify_one();
            self.release.acquire().await.unwrap().forget();
        }
        self.in_flight.lock().unwrap().remove(&id);
        self.broker.send(queue, message).await
    }
}

/// Ensures that two replicas whose own clocks disagree by minutes cannot both hold the
/// lease of one row: the one whose clock runs ahead does not take over a row the other
/// is still sending, since leases are timed by the database's clock.
async fn replicas_with_skewed_clocks_never_both_hold_a_lease(db: &support::TestDb) {
    let system = steward_api::Clock::system();
    let behind = {
        let system = system.clone();
        steward_api::Clock::from_fn(move || system.now() - 300.0)
    };
    let ahead = steward_api::Clock::from_fn(move || system.now() + 300.0);
    let replica_behind = db.replica(behind.clone()).await;
    let replica_ahead = db.replica(ahead.clone()).await;
    write(&replica_behind, "held", 1).await;
    let sink = Arc::new(Holding {
        held: "held",
        holding: tokio::sync::Notify::new(),
        release: tokio::sync::Semaphore::new(0),
        first: std::sync::atomic::AtomicBool::new(false),
        in_flight: Mutex::default(),
        overlaps: Mutex::default(),
        broker: InMemoryBroker::new(),
    });
    let config = fast().with_lease(Duration::from_secs(60));
    let supervisor = Supervisor::new(SupervisorConfig::default());
    // The replica whose clock is behind claims the row and sends it, slowly.
    supervisor.spawn(
        OutboxWorker::new(replica_behind.clone(), sink.clone())
            .with_name("outbox-behind")
            .with_config(config.clone()),
    );
    tokio::time::timeout(Duration::from_secs(30), sink.holding.notified())
        .await
        .expect("the first replica sends the row");
    // The replica whose clock is 10 minutes ahead, where the first one's 60 s lease has
    // long run out, polls meanwhile. A row of another aggregate written now goes out
    // through it alone (the first replica is stuck in its send), so by then it has
    // claimed with the held row in view.
    supervisor.spawn(
        OutboxWorker::new(replica_ahead.clone(), sink.clone())
            .with_name("outbox-ahead")
            .with_config(config),
    );
    write(&replica_ahead, "other", 1).await;
    wait_for("the other row", || sink.broker.message_count("out") == 1).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while db.outbox_backlog().await.unwrap() > 1 {
        assert!(Instant::now() < deadline, "timed out waiting for the other row's delete");
        sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        bodies_by_aggregate(&sink.broker).get("held"),
        None,
        "the held row is not sent twice"
    );
    let rows = db.outbox_messages(10).await.unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(rows[0].lease_owner.is_some(), "the first replica still holds the held row");
    sink.release.add_permits(1);
    wait_for("the held row", || sink.broker.message_count("out") == 2).await;
    wait_for_empty_outbox(db).await;
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
    assert_eq!(*sink.overlaps.lock().unwrap(), Vec::<String>::new(), "no row sent by both");
    let sent = bodies_by_aggregate(&sink.broker);
    assert_eq!(sent["held"], [0], "the held row once");
    assert_eq!(sent["other"], [0], "the other row once");
    replica_behind.close().await;
    replica_ahead.close().await;
}

db_test!(
    replicas_with_skewed_clocks_never_both_hold_a_lease_sqlite,
    replicas_with_skewed_clocks_never_both_hold_a_lease_postgres,
    replicas_with_skewed_clocks_never_both_hold_a_lease
);

/// Ensures that a worker whose lease ran out cannot record a failure over the claim of
/// the worker that took the row next; the owner's own failure is recorded.
async fn a_late_failure_does_not_undo_another_workers_claim(store: &Store) {
    write(store, "x", 1).await;
    let now = epoch_ms() + 1_000;
    let first = store.claim_outbox("first", 10, now, now + 1_000).await.unwrap();
    assert_eq!(first.len(), 1);
    let second = store.claim_outbox("second", 10, now + 2_000, now + 60_000).await.unwrap();
    assert_eq!(second.len(), 1, "the lease of `first` ran out");
    let id = second[0].id;
    store.fail_outbox(id, "first", "late failure", 0).await.unwrap();
    let row = store.outbox_messages(10).await.unwrap().remove(0);
    assert_eq!(row.lease_owner.as_deref(), Some("second"));
    assert_eq!(row.attempts, 0);
    assert_eq!(row.last_error, None);
    store.fail_outbox(id, "second", "broker down", 0).await.unwrap();
    let row = store.outbox_messages(10).await.unwrap().remove(0);
    assert_eq!(row.lease_owner, None);
    assert_eq!(row.attempts, 1);
    assert_eq!(row.last_error.as_deref(), Some("broker down"));
}

db_test!(
    a_late_failure_does_not_undo_another_workers_claim_sqlite,
    a_late_failure_does_not_undo_another_workers_claim_postgres,
    a_late_failure_does_not_undo_another_workers_claim
);

/// A worker that, asked to stop, takes a moment to drain and commits one more outbox
/// row before it returns, as a status handler finishing its message would.
struct LateProducer {
    store: Store,
}

#[async_trait]
impl steward_core::Worker for LateProducer {
    fn name(&self) -> &str {
        "late-producer"
    }

    fn stall_timeout(&self) -> Option<Duration> {
        None
    }

    async fn run(&self, ctx: steward_core::WorkerContext) -> Result<(), steward_core::WorkerError> {
        ctx.set_running();
        ctx.cancelled().await;
        sleep(Duration::from_millis(300)).await;
        write(&self.store, "late", 1).await;
        Ok(())
    }
}

/// Ensures that on shutdown the outbox worker, given the supervisor's health, keeps
/// flushing until the other workers have stopped, so a row they commit while draining
/// is published before the shutdown returns.
async fn rows_committed_while_draining_go_out_before_the_exit(store: &Store) {
    let broker = InMemoryBroker::new();
    let supervisor = Supervisor::new(SupervisorConfig::default());
    supervisor.spawn(
        OutboxWorker::new(store.clone(), Arc::new(broker.clone()))
            .with_config(fast())
            .with_producers(supervisor.health()),
    );
    supervisor.spawn(LateProducer { store: store.clone() });
    let health = supervisor.health();
    wait_for("workers running", || health.snapshot().is_ready()).await;
    let report = supervisor.shutdown(Instant::now() + Duration::from_secs(10)).await;
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(broker.message_count("out"), 1, "the late row was published");
    assert_eq!(store.outbox_backlog().await.unwrap(), 0);
}

db_test!(
    rows_committed_while_draining_go_out_before_the_exit_sqlite,
    rows_committed_while_draining_go_out_before_the_exit_postgres,
    rows_committed_while_draining_go_out_before_the_exit
);

/// Ensures that the first message of a fresh database does not reuse the message id of
/// another database's first message: brokers that drop a repeated id within a window
/// (JetStream, Service Bus duplicate detection) would drop it, with the send reported
/// as a success. A retry of one row keeps its id, so a genuine resend is still dropped.
async fn message_ids_are_unique_beyond_one_database(store: &Store) {
    let other = support::TestDb::sqlite().await;
    write(store, "a", 1).await;
    write(&other.store, "a", 1).await;
    let ours = store.outbox_messages(1).await.unwrap().remove(0);
    let theirs = other.store.outbox_messages(1).await.unwrap().remove(0);
    assert_eq!(ours.id, theirs.id, "both databases numbered their first row alike");
    assert_ne!(ours.message_id(), theirs.message_id(), "the message ids differ");
    assert!(ours.message_id().starts_with(&format!("{}-", ours.id)), "{}", ours.message_id());
    let again = store.outbox_messages(1).await.unwrap().remove(0);
    assert_eq!(again.message_id(), ours.message_id(), "a row keeps its message id");
    other.finish().await;
}

db_test!(
    message_ids_are_unique_beyond_one_database_sqlite,
    message_ids_are_unique_beyond_one_database_postgres,
    message_ids_are_unique_beyond_one_database
);
