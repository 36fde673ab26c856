//! Two replicas of the service draining one outbox: each with its own store (its own
//! connection pools) on one database, its own outbox worker and its own sink. They
//! never send an aggregate's messages out of order or two at once (a claim is leased,
//! and only the oldest row of an aggregate can be claimed), and never send one row twice
//! while both run normally. Runs on SQLite and on PostgreSQL (`*_postgres`, skipped
//! without `STEWARD_TEST_POSTGRES_URL`'s server).

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use steward_api::storage::{OutboxMessage, Store};
use steward_api::workers::{OutboxConfig, OutboxWorker};
use steward_core::{
    Backoff, Jitter, MessageSink, OutgoingMessage, Supervisor, SupervisorConfig, TransportError,
};
use support::TestDb;
use tokio::time::{Instant, sleep};

const AGGREGATES: usize = 20;
const PER_AGGREGATE: u64 = 8;

/// What both replicas sent, as the broker would see it.
#[derive(Default)]
struct Sent {
    /// The `n` of each aggregate's messages from each writer, in the order they were
    /// sent.
    by_aggregate: Mutex<BTreeMap<String, Vec<u64>>>,
    /// Every message id sent, and by which replica.
    ids: Mutex<Vec<(String, &'static str)>>,
    /// Aggregates with a send under way.
    in_flight: Mutex<HashSet<String>>,
    /// Aggregates that had two sends under way at once.
    overlaps: Mutex<Vec<String>>,
}

/// One replica's sink.
struct ReplicaSink {
    replica: &'static str,
    sent: Arc<Sent>,
}

#[async_trait]
impl MessageSink for ReplicaSink {
    async fn send(&self, _queue: &str, message: OutgoingMessage) -> Result<(), TransportError> {
        let body: serde_json::Value = serde_json::from_slice(&message.body).unwrap();
        let aggregate = body["aggregate"].as_str().unwrap().to_owned();
        if !self.sent.in_flight.lock().unwrap().insert(aggregate.clone()) {
            self.sent.overlaps.lock().unwrap().push(aggregate.clone());
        }
        // Long enough for the other replica to try the aggregate meanwhile.
        sleep(Duration::from_millis(3)).await;
        let writer = body["writer"].as_str().unwrap();
        self.sent
            .by_aggregate
            .lock()
            .unwrap()
            .entry(format!("{aggregate} from {writer}"))
            .or_default()
            .push(body["n"].as_u64().unwrap());
        self.sent.ids.lock().unwrap().push((message.message_id.clone().unwrap(), self.replica));
        self.sent.in_flight.lock().unwrap().remove(&aggregate);
        Ok(())
    }
}

fn fast() -> OutboxConfig {
    OutboxConfig::default().with_poll_interval(Duration::from_millis(10)).with_retry_backoff(
        Backoff::new(Duration::ZERO, Duration::ZERO).with_jitter(Jitter::none()),
    )
}

/// Writes every aggregate's messages as `writer`, interleaved across aggregates, each
/// in a transaction of its own, on `store`.
async fn write_all(store: &Store, writer: &str) {
    for n in 0..PER_AGGREGATE {
        for aggregate in 0..AGGREGATES {
            let aggregate = format!("agg-{aggregate}");
            let body = serde_json::json!({"aggregate": aggregate, "writer": writer, "n": n});
            let message =
                OutboxMessage::json("out", &body, &aggregate).unwrap().with_session_id(&aggregate);
            let mut tx = store.begin().await.unwrap();
            tx.insert_outbox(message).await.unwrap();
            tx.commit().await.unwrap();
        }
    }
}

/// Ensures that two replicas draining one outbox send each aggregate's messages in
/// order, one at a time, and each row once.
async fn two_replicas_drain_one_outbox_in_order_and_once(db: &TestDb) {
    let sent = Arc::new(Sent::default());
    let other = db.another_store().await;
    let mut replicas = Vec::new();
    for (replica, store) in [("replica-1", db.store.clone()), ("replica-2", other.clone())] {
        let supervisor = Supervisor::new(SupervisorConfig::default());
        let sink = Arc::new(ReplicaSink { replica, sent: sent.clone() });
        supervisor.spawn(OutboxWorker::new(store, sink).with_name(replica).with_config(fast()));
        replicas.push(supervisor);
    }
    // Rows are committed through both stores while both replicas drain.
    let (first, second) = tokio::join!(write_all(&db.store, "a"), write_all(&other, "b"));
    let ((), ()) = (first, second);
    let total = AGGREGATES * usize::try_from(PER_AGGREGATE).unwrap() * 2;
    let deadline = Instant::now() + Duration::from_secs(60);
    while sent.ids.lock().unwrap().len() < total || db.store.outbox_backlog().await.unwrap() > 0 {
        assert!(Instant::now() < deadline, "only {} sent", sent.ids.lock().unwrap().len());
        sleep(Duration::from_millis(10)).await;
    }
    for supervisor in replicas {
        let report = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
        assert!(report.overran.is_empty(), "{report:?}");
    }
    other.close().await;

    let overlaps = sent.overlaps.lock().unwrap().clone();
    assert!(overlaps.is_empty(), "two sends of one aggregate at once: {overlaps:?}");
    let ids = sent.ids.lock().unwrap().clone();
    let unique: HashSet<_> = ids.iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), total, "no row sent twice");
    assert_eq!(unique.len(), total);
    // Each writer committed an aggregate's messages one after another: they went out
    // in that order.
    let by_aggregate = sent.by_aggregate.lock().unwrap().clone();
    assert_eq!(by_aggregate.len(), AGGREGATES * 2);
    let expected: Vec<u64> = (0..PER_AGGREGATE).collect();
    for (aggregate, order) in &by_aggregate {
        assert_eq!(order, &expected, "{aggregate} out of order");
    }
    let by_replica = |replica: &str| ids.iter().filter(|(_, r)| *r == replica).count();
    println!(
        "sent by replica-1: {}, by replica-2: {}",
        by_replica("replica-1"),
        by_replica("replica-2")
    );
}

db_test!(
    two_replicas_drain_one_outbox_in_order_and_once_sqlite,
    two_replicas_drain_one_outbox_in_order_and_once_postgres,
    two_replicas_drain_one_outbox_in_order_and_once
);
