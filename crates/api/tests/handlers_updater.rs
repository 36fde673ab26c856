//! The handlers driven through the core `Updater` under a `Supervisor` on the in-memory
//! broker, with real messages: what ends up on the broker (dead-lettered messages with
//! their reasons, retried messages coming back, completed ones gone) and in the
//! database. The tests run on real time (the database does real I/O) with generous
//! upper bounds only; store-touching cases run on SQLite and PostgreSQL.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use steward_api::domain::{AirlockRequestStatus as S, Status};
use steward_api::rules::airlock::{self, AirlockQueues};
use steward_api::storage::{Store, StoreOptions};
use steward_api::workers::{AirlockStatusHandler, DeploymentStatusHandler, StaticRecipients};
use steward_core::{
    Backoff, BoxError, Handler, HealthHandle, Jitter, Message, MessageSink, Outcome,
    OutgoingMessage, Supervisor, SupervisorConfig, Updater, UpdaterConfig, WorkerHealth,
    WorkerState,
};
use steward_inmem::{InMemoryBroker, InMemorySource, QueueOptions};
use support::{
    TestDb, airlock_request, outbox_for, status_body, status_message, step_result_body, templates,
    user, workspace, workspace_installing,
};
use tokio::time::Instant;

/// Every handled message: id, delivery count and outcome.
type Seen = Arc<Mutex<Vec<(String, u32, Outcome)>>>;

/// Wraps a handler to record what it decided for each delivery.
struct Recording<H> {
    inner: H,
    seen: Seen,
}

#[async_trait]
impl<H: Handler> Handler for Recording<H> {
    async fn handle(&self, message: Arc<Message>) -> Outcome {
        let outcome = self.inner.handle(message.clone()).await;
        self.seen.lock().unwrap().push((
            message.id.clone(),
            message.delivery_count,
            outcome.clone(),
        ));
        outcome
    }

    async fn probe(&self) -> Result<(), BoxError> {
        self.inner.probe().await
    }
}

fn broker(queue: &str) -> InMemoryBroker {
    let broker = InMemoryBroker::builder().with_strict(true).build();
    broker
        .declare_queue(queue, QueueOptions::default().with_lock_duration(Duration::from_secs(30)));
    broker
}

/// A supervisor running updater `name` over `source` with `config`, its handler `inner`
/// recording what it sees.
fn recorded(
    name: &str,
    inner: impl Handler,
    source: InMemorySource,
    config: UpdaterConfig,
) -> (Supervisor, Seen) {
    let seen = Seen::default();
    let handler = Recording { inner, seen: seen.clone() };
    let supervisor = Supervisor::new(SupervisorConfig::default());
    supervisor.spawn(Updater::with_source(name, source, handler).with_config(config));
    (supervisor, seen)
}

fn config(max_deliveries: u32) -> UpdaterConfig {
    UpdaterConfig::default()
        .with_wait(Duration::from_millis(100))
        .with_max_deliveries(max_deliveries)
        .with_retry_backoff(
            Backoff::new(Duration::from_millis(100), Duration::from_millis(400))
                .with_jitter(Jitter::none()),
        )
        .with_probe_backoff(
            Backoff::new(Duration::from_millis(200), Duration::from_secs(1))
                .with_jitter(Jitter::none()),
        )
}

async fn send(broker: &InMemoryBroker, queue: &str, id: &str, body: String, session: Option<&str>) {
    let mut message = OutgoingMessage::json(body).with_message_id(id).with_correlation_id("c1");
    message.session_id = session.map(str::to_owned);
    broker.send(queue, message).await.unwrap();
}

fn worker(health: &HealthHandle, name: &str) -> WorkerHealth {
    health.snapshot().worker(name).cloned().unwrap()
}

/// Polls `condition` every 20 ms until it holds, or panics after a generous bound.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn shut_down(supervisor: Supervisor) {
    let report = supervisor.shutdown(Instant::now() + Duration::from_secs(10)).await;
    assert!(report.is_clean(), "{report:?}");
}

fn dead_letter_reasons(broker: &InMemoryBroker, queue: &str) -> BTreeSet<(String, String)> {
    broker.dead_letters(queue).into_iter().map(|dead| (dead.message.id, dead.reason)).collect()
}

mod cases {
    use super::*;

    /// Ensures that, under the Updater, a malformed status and one for an unknown step
    /// land in the dead-letter queue with reasons `MessageFormatIncorrect` and
    /// `UnknownStep`, while a good status and its duplicate are completed (gone from
    /// the queue) with one state change.
    pub(super) async fn deployment_status_settles_on_the_broker(db: &TestDb) {
        const QUEUE: &str = "deploymentstatus";
        let registry = templates();
        let (ws, op) = workspace_installing(&db.store, &registry).await;
        let broker = broker(QUEUE);
        let good = status_message(&op, 0, Status::Deployed, "done");
        let good_body = String::from_utf8(good.body.to_vec()).unwrap();
        send(&broker, QUEUE, "malformed", "bad".to_owned(), Some("s")).await;
        let unknown = status_body(&op.id, "no-such-step", &ws.id, "deployed", "x", json!([]));
        send(&broker, QUEUE, "unknown-step", unknown.to_string(), Some(&op.id)).await;
        send(&broker, QUEUE, "good", good_body.clone(), Some(&op.id)).await;
        send(&broker, QUEUE, "good-again", good_body, Some(&op.id)).await;

        let (supervisor, seen) = recorded(
            "deployment-status",
            DeploymentStatusHandler::new(db.store.clone(), registry.clone()),
            broker.source(QUEUE).unwrap(),
            config(10),
        );
        let health = supervisor.health();
        eventually("all four settled", || {
            let outcomes = worker(&health, "deployment-status").outcomes;
            outcomes.completed + outcomes.dead_lettered == 4
        })
        .await;

        assert_eq!(broker.message_count(QUEUE), 0, "completed messages are gone");
        assert_eq!(
            dead_letter_reasons(&broker, QUEUE),
            BTreeSet::from([
                ("malformed".to_owned(), "MessageFormatIncorrect".to_owned()),
                ("unknown-step".to_owned(), "UnknownStep".to_owned()),
            ])
        );
        let dead = broker.dead_letters(QUEUE);
        let malformed = dead.iter().find(|d| d.message.id == "malformed").unwrap();
        assert!(
            malformed.description.starts_with("Service bus message is not formatted correctly")
        );
        assert_eq!(malformed.message.body.as_ref(), b"bad", "the message is kept as sent");
        let stored = db.store.read().operation(&op.id).await.unwrap();
        assert_eq!(stored.status, Status::Deployed);
        assert_eq!(seen.lock().unwrap().len(), 4, "every message handled once");
        assert_eq!(worker(&health, "deployment-status").state, WorkerState::Running);
        shut_down(supervisor).await;
    }

    /// Ensures that, under the Updater, a step result that arrives before the request
    /// reached `completed_step` is retried and comes back (delivery counts 1, 2, …) until
    /// the request catches up, then is applied once, while illegal and malformed
    /// results are dead-lettered with their reasons.
    pub(super) async fn airlock_result_is_retried_until_the_request_catches_up(db: &TestDb) {
        const QUEUE: &str = "airlock-step-result";
        let ws = workspace(&db.store, &templates()).await;
        let request = airlock_request(&db.store, &ws, S::Draft).await;
        let broker = broker(QUEUE);
        let early = step_result_body(&request.id, "submitted", Some("in_review"), None, None);
        send(&broker, QUEUE, "early", early.to_string(), None).await;
        let illegal =
            step_result_body(&request.id, "in_review", Some("blocked_by_scan"), None, None);
        send(&broker, QUEUE, "illegal", illegal.to_string(), None).await;
        send(&broker, QUEUE, "malformed", r#"{"data": {}}"#.to_owned(), None).await;

        let (supervisor, seen) = recorded(
            "airlock-status",
            AirlockStatusHandler::new(db.store.clone(), Arc::new(StaticRecipients::none())),
            broker.source(QUEUE).unwrap(),
            config(100),
        );
        let health = supervisor.health();
        let deliveries_of_early =
            || seen.lock().unwrap().iter().filter(|(id, ..)| id == "early").count();
        eventually("the early result came back", || deliveries_of_early() >= 2).await;
        assert_eq!(db.store.read().airlock_request(&request.id).await.unwrap(), request);

        let mut tx = db.store.begin().await.unwrap();
        airlock::submit(&mut tx, &AirlockQueues::default(), &request.id, &user()).await.unwrap();
        tx.commit().await.unwrap();
        // Wait for the settlement, not for the handler's answer: `seen` records the
        // outcome when the handler returns, before the updater completes the message on
        // the broker, while the worker's counts move only once the broker took it.
        eventually("the early result applied and settled", || {
            let outcomes = worker(&health, "airlock-status").outcomes;
            outcomes.completed >= 1 && outcomes.dead_lettered >= 2
        })
        .await;

        let early: Vec<_> =
            seen.lock().unwrap().iter().filter(|(id, ..)| id == "early").cloned().collect();
        assert_eq!(early.last().map(|(_, _, outcome)| outcome), Some(&Outcome::Complete));
        let counts: Vec<u32> = early.iter().map(|(_, count, _)| *count).collect();
        assert_eq!(
            counts,
            (1..=u32::try_from(counts.len()).unwrap()).collect::<Vec<_>>(),
            "{early:?}"
        );
        assert!(
            early[..early.len() - 1]
                .iter()
                .all(|(_, _, outcome)| matches!(outcome, Outcome::Retry { .. }))
        );
        assert_eq!(broker.message_count(QUEUE), 0);
        assert_eq!(
            dead_letter_reasons(&broker, QUEUE),
            BTreeSet::from([
                ("illegal".to_owned(), "IllegalStatusTransition".to_owned()),
                ("malformed".to_owned(), "MessageFormatIncorrect".to_owned()),
            ])
        );
        let stored = db.store.read().airlock_request(&request.id).await.unwrap();
        assert_eq!(stored.status, S::InReview);
        assert_eq!(
            outbox_for(&db.store, &request.id).await.len(),
            4,
            "submit's and the result's events"
        );
        let outcomes = worker(&health, "airlock-status").outcomes;
        assert_eq!((outcomes.completed, outcomes.dead_lettered), (1, 2));
        assert!(outcomes.retried >= 1);
        shut_down(supervisor).await;
    }

    /// Ensures that (DESIGN §6: "current status ≠ completed_step … DLQ after max
    /// deliveries") a result whose request never gets there ends in the dead-letter
    /// queue with `MaxDeliveryCountExceeded` once the worker's delivery limit is used up,
    /// and changes nothing.
    pub(super) async fn mismatch_that_never_resolves_is_dead_lettered_after_max_deliveries(
        db: &TestDb,
    ) {
        const QUEUE: &str = "airlock-step-result";
        let ws = workspace(&db.store, &templates()).await;
        let request = airlock_request(&db.store, &ws, S::Draft).await;
        let broker = broker(QUEUE);
        let body =
            step_result_body(&request.id, "approval_in_progress", Some("approved"), None, None);
        send(&broker, QUEUE, "stuck", body.to_string(), None).await;
        let (supervisor, seen) = recorded(
            "airlock-status",
            AirlockStatusHandler::new(db.store.clone(), Arc::new(StaticRecipients::none())),
            broker.source(QUEUE).unwrap(),
            config(3),
        );
        eventually("dead-lettered", || broker.dead_letter_count(QUEUE) == 1).await;
        assert_eq!(
            dead_letter_reasons(&broker, QUEUE),
            BTreeSet::from([("stuck".to_owned(), "MaxDeliveryCountExceeded".to_owned())])
        );
        assert_eq!(seen.lock().unwrap().len(), 3, "the handler saw deliveries 1 to 3");
        assert_eq!(db.store.read().airlock_request(&request.id).await.unwrap(), request);
        shut_down(supervisor).await;
    }
}

db_test!(
    deployment_status_settles_on_the_broker,
    deployment_status_settles_on_the_broker_postgres,
    cases::deployment_status_settles_on_the_broker
);
db_test!(
    airlock_result_is_retried_until_the_request_catches_up,
    airlock_result_is_retried_until_the_request_catches_up_postgres,
    cases::airlock_result_is_retried_until_the_request_catches_up
);
db_test!(
    mismatch_that_never_resolves_is_dead_lettered_after_max_deliveries,
    mismatch_that_never_resolves_is_dead_lettered_after_max_deliveries_postgres,
    cases::mismatch_that_never_resolves_is_dead_lettered_after_max_deliveries
);

/// Ensures that (DESIGN §6: "DB failure: abandon at once, hot loop") with the database
/// unreachable, both workers answer `Retry { cause: Dependency }`: their circuit breakers
/// open (state `backing_off`), the failing probes keep them from receiving, so the
/// messages wait in the queue without burning delivery counts or reaching the
/// dead-letter queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_pauses_both_workers_without_burning_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    // A database file in a directory that does not exist: every connection attempt
    // fails with SQLITE_CANTOPEN, an outage.
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("missing").join("s.db").display());
    let store =
        Store::connect_lazy(StoreOptions::new(url).with_acquire_timeout(Duration::from_secs(1)))
            .unwrap();
    let broker = InMemoryBroker::builder().with_strict(true).build();
    for queue in ["deploymentstatus", "airlock-step-result"] {
        broker.declare_queue(
            queue,
            QueueOptions::default().with_lock_duration(Duration::from_secs(30)),
        );
    }
    let op_id = uuid::Uuid::new_v4().to_string();
    let body =
        status_body(&op_id, "s1", &uuid::Uuid::new_v4().to_string(), "deploying", "x", json!([]));
    send(&broker, "deploymentstatus", "status", body.to_string(), Some(&op_id)).await;
    let body = step_result_body(
        &uuid::Uuid::new_v4().to_string(),
        "submitted",
        Some("in_review"),
        None,
        None,
    );
    send(&broker, "airlock-step-result", "result", body.to_string(), None).await;

    let seen = Seen::default();
    let supervisor = Supervisor::new(SupervisorConfig::default());
    supervisor.spawn(
        Updater::with_source(
            "deployment-status",
            broker.source("deploymentstatus").unwrap(),
            Recording {
                inner: DeploymentStatusHandler::new(store.clone(), templates()),
                seen: seen.clone(),
            },
        )
        .with_config(config(3)),
    );
    supervisor.spawn(
        Updater::with_source(
            "airlock-status",
            broker.source("airlock-step-result").unwrap(),
            Recording {
                inner: AirlockStatusHandler::new(store.clone(), Arc::new(StaticRecipients::none())),
                seen: seen.clone(),
            },
        )
        .with_config(config(3)),
    );
    let health = supervisor.health();
    // The breaker opens when the handler answers, the retry is counted once the broker
    // took it back: wait for both.
    eventually("both workers backing off", || {
        ["deployment-status", "airlock-status"].iter().all(|name| {
            let worker = worker(&health, name);
            worker.state == WorkerState::BackingOff && worker.outcomes.retried >= 1
        })
    })
    .await;
    // Probes fail every 0.2–1 s; give them several rounds to (wrongly) resume.
    tokio::time::sleep(Duration::from_secs(3)).await;

    for name in ["deployment-status", "airlock-status"] {
        let worker = worker(&health, name);
        assert_eq!(worker.state, WorkerState::BackingOff, "{name}");
        assert_eq!((worker.outcomes.retried, worker.outcomes.dead_lettered), (1, 0), "{name}");
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "each message handled once: {seen:?}");
    assert!(seen.iter().all(|(_, count, outcome)| *count == 1
        && matches!(outcome, Outcome::Retry { cause: steward_core::RetryCause::Dependency, .. })));
    assert_eq!(
        (broker.message_count("deploymentstatus"), broker.message_count("airlock-step-result")),
        (1, 1)
    );
    assert_eq!(
        broker.dead_letter_count("deploymentstatus")
            + broker.dead_letter_count("airlock-step-result"),
        0
    );
    shut_down(supervisor).await;
}
