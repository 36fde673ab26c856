//! Parking outbox rows that cannot be sent, on SQLite and PostgreSQL (`*_postgres`):
//! the aggregate goes on without them, the metric and `/health` show them, and a broker
//! outage parks nothing.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use steward_api::http::auth::Authentication;
use steward_api::http::{ApiSettings, AppState, router};
use steward_api::storage::{Database, OutboxMessage, Store};
use steward_api::templates::TemplateRegistry;
use steward_api::workers::{OutboxConfig, OutboxWorker, PARKED_METRIC};
use steward_core::{
    Backoff, ErrorKind, Jitter, MessageSink, OutgoingMessage, Supervisor, SupervisorConfig,
    TransportError,
};
use steward_inmem::InMemoryBroker;
use tokio::time::{Instant, sleep};
use tower::ServiceExt;

fn fast() -> OutboxConfig {
    OutboxConfig::default().with_poll_interval(Duration::from_millis(20)).with_retry_backoff(
        Backoff::new(Duration::ZERO, Duration::ZERO).with_jitter(Jitter::none()),
    )
}

/// Writes one row of `aggregate` numbered `n`, its body padded with `padding` bytes.
async fn write_one(store: &Store, aggregate: &str, n: usize, padding: usize) {
    let mut tx = store.begin().await.unwrap();
    let body = serde_json::json!({"aggregate": aggregate, "n": n, "pad": "x".repeat(padding)});
    let message = OutboxMessage::json("out", &body, aggregate).unwrap().with_session_id(aggregate);
    tx.insert_outbox(message).await.unwrap();
    tx.commit().await.unwrap();
}

async fn wait_until<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(10)).await;
    }
}

fn sent_by_aggregate(broker: &InMemoryBroker) -> BTreeMap<String, Vec<u64>> {
    let mut by = BTreeMap::<String, Vec<u64>>::new();
    for message in broker.peek("out") {
        let body: serde_json::Value = serde_json::from_slice(&message.body).unwrap();
        by.entry(body["aggregate"].as_str().unwrap().to_owned())
            .or_default()
            .push(body["n"].as_u64().unwrap());
    }
    by
}

/// The process's Prometheus recorder, installed once for this test binary.
fn prometheus() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder().unwrap()
    })
}

/// `/health` of a router over `store`, as the development admin (details shown).
async fn health(store: &Store, supervisor: &Supervisor) -> serde_json::Value {
    let state = AppState {
        db: Database::migrated(store.clone()),
        templates: Arc::new(TemplateRegistry::builtin().unwrap()),
        health: supervisor.health(),
        settings: Arc::new(ApiSettings {
            auth: Authentication::none(),
            transport: "inmem".to_owned(),
            ..ApiSettings::default()
        }),
        metrics: None,
    };
    let request = Request::builder().uri("/health").body(Body::empty()).unwrap();
    let response = router(state).oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

/// Ensures that a row the broker refuses for good (too large for the transport: a
/// protocol error) is parked with its error and attempts, while the later rows of its
/// aggregate go out in order; and that the parked-row metric and `/health` show it.
async fn unsendable_row_is_parked_and_its_aggregate_goes_on(store: &Store, worker: &str) {
    write_one(store, "a", 0, 0).await;
    write_one(store, "a", 1, 4096).await;
    write_one(store, "a", 2, 0).await;
    write_one(store, "a", 3, 0).await;
    let handle = prometheus();
    let broker = InMemoryBroker::builder().with_max_body_bytes(1024).build();
    let supervisor = Supervisor::new(SupervisorConfig::default());
    supervisor.spawn(
        OutboxWorker::new(store.clone(), Arc::new(broker.clone()))
            .with_config(fast())
            .with_name(worker),
    );
    wait_until("the rest of the aggregate", || async {
        broker.message_count("out") == 3 && store.outbox_backlog().await.unwrap() == 0
    })
    .await;
    assert_eq!(sent_by_aggregate(&broker)["a"], [0, 2, 3], "the aggregate went on, in order");
    let parked = store.parked_outbox_messages(10).await.unwrap();
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(parked[0].message.aggregate_id, "a");
    assert_eq!(parked[0].attempts, 1, "parked at the first non-retryable failure");
    let key = parked[0].message_key.as_deref().expect("the row's message key is kept");
    assert_eq!(parked[0].message_id(), format!("{}-{key}", parked[0].id), "its message id too");
    assert!(parked[0].error.contains("exceeds the limit"), "{}", parked[0].error);
    let body: serde_json::Value =
        serde_json::from_str(std::str::from_utf8(&parked[0].message.outgoing.body).unwrap())
            .unwrap();
    assert_eq!(body["n"], 1, "the oversized row is the one parked");
    let stats = store.parked_outbox().await.unwrap();
    assert_eq!(stats.count, 1);
    assert_eq!(stats.oldest_parked_at, Some(parked[0].parked_at));

    let line = format!("{PARKED_METRIC}{{worker=\"{worker}\"}} 1");
    wait_until("the parked metric", || {
        let found = handle.render().lines().any(|l| l == line);
        async move { found }
    })
    .await;
    let text = handle.render();
    assert!(
        text.contains(&format!("steward_outbox_parked_oldest_age_seconds{{worker=\"{worker}\"}}")),
        "{text}"
    );

    let health = health(store, &supervisor).await;
    let outbox = health["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == "Outbox")
        .unwrap()
        .clone();
    assert_eq!(outbox["status"], "Not OK", "{health}");
    assert!(outbox["message"].as_str().unwrap().contains("1 outbox message(s) parked"), "{outbox}");
    let report = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
    assert!(report.is_clean(), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsendable_row_is_parked_and_its_aggregate_goes_on_sqlite() {
    let db = support::TestDb::sqlite().await;
    unsendable_row_is_parked_and_its_aggregate_goes_on(&db, "outbox-park-sqlite").await;
    db.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsendable_row_is_parked_and_its_aggregate_goes_on_postgres() {
    let Some(db) =
        support::TestDb::postgres("unsendable_row_is_parked_and_its_aggregate_goes_on_postgres")
            .await
    else {
        return;
    };
    unsendable_row_is_parked_and_its_aggregate_goes_on(&db, "outbox-park-postgres").await;
    db.finish().await;
}

/// Ensures that `/health` shows the outbox OK while nothing is parked.
async fn health_shows_the_outbox_ok_with_nothing_parked(store: &Store) {
    let supervisor = Supervisor::new(SupervisorConfig::default());
    let health = health(store, &supervisor).await;
    let outbox =
        health["services"].as_array().unwrap().iter().find(|s| s["service"] == "Outbox").unwrap();
    assert_eq!(outbox["status"], "OK", "{health}");
    assert_eq!(outbox["message"], "");
}

db_test!(
    health_shows_the_outbox_ok_with_nothing_parked_sqlite,
    health_shows_the_outbox_ok_with_nothing_parked_postgres,
    health_shows_the_outbox_ok_with_nothing_parked
);

/// A sink that fails every message whose body names aggregate `poison` with a
/// retryable connection error, and sends the rest to the broker.
struct Poisoned {
    broker: InMemoryBroker,
}

#[async_trait]
impl MessageSink for Poisoned {
    async fn send(&self, queue: &str, message: OutgoingMessage) -> Result<(), TransportError> {
        if String::from_utf8_lossy(&message.body).contains("\"poison\"") {
            return Err(TransportError::connection("refused this one"));
        }
        self.broker.send(queue, message).await
    }
}

/// Ensures that a row failing with a retryable error is parked after `park_after`
/// failures while other sends to the transport succeed, and the later rows of its
/// aggregate then go out.
async fn row_failing_while_others_succeed_is_parked_after_n(store: &Store) {
    let mut tx = store.begin().await.unwrap();
    let poison =
        OutboxMessage::json("out", &serde_json::json!({"aggregate": "poison", "n": 0}), "a")
            .unwrap();
    tx.insert_outbox(poison).await.unwrap();
    tx.commit().await.unwrap();
    write_one(store, "a", 1, 0).await;
    let broker = InMemoryBroker::new();
    let sink = Arc::new(Poisoned { broker: broker.clone() });
    let supervisor = Supervisor::new(SupervisorConfig::default());
    supervisor.spawn(OutboxWorker::new(store.clone(), sink).with_config(fast().with_park_after(3)));
    // Other traffic keeps succeeding meanwhile.
    let mut n = 0;
    wait_until("the poison row parked", || {
        n += 1;
        let n = n;
        async move {
            write_one(store, "other", n, 0).await;
            !store.parked_outbox_messages(10).await.unwrap().is_empty()
        }
    })
    .await;
    let parked = store.parked_outbox_messages(10).await.unwrap();
    assert_eq!(parked.len(), 1);
    assert!(parked[0].attempts >= 3, "{parked:?}");
    assert!(parked[0].error.contains("refused this one"), "{parked:?}");
    wait_until("the rest of aggregate a", || async {
        sent_by_aggregate(&broker).get("a").is_some_and(|a| a == &[1])
    })
    .await;
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

db_test!(
    row_failing_while_others_succeed_is_parked_after_n_sqlite,
    row_failing_while_others_succeed_is_parked_after_n_postgres,
    row_failing_while_others_succeed_is_parked_after_n
);

/// Ensures that a broker outage (every send failing retryably, after sends had
/// succeeded) parks nothing, however often each row fails, and that every row goes out
/// in order once the broker is back.
async fn broker_outage_parks_nothing(store: &Store) {
    let broker = InMemoryBroker::new();
    let supervisor = Supervisor::new(SupervisorConfig::default());
    supervisor.spawn(
        OutboxWorker::new(store.clone(), Arc::new(broker.clone()))
            .with_config(fast().with_park_after(2)),
    );
    write_one(store, "warm", 0, 0).await;
    wait_until("a first send", || async { broker.message_count("out") == 1 }).await;
    broker.faults("out").fail_sends(60, ErrorKind::Connection);
    for n in 0..3 {
        write_one(store, "a", n, 0).await;
        write_one(store, "b", n, 0).await;
    }
    wait_until("every row", || async {
        broker.message_count("out") == 7 && store.outbox_backlog().await.unwrap() == 0
    })
    .await;
    assert_eq!(store.parked_outbox().await.unwrap().count, 0, "an outage parks nothing");
    let by = sent_by_aggregate(&broker);
    assert_eq!(by["a"], [0, 1, 2]);
    assert_eq!(by["b"], [0, 1, 2]);
    let report = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
    assert!(report.is_clean(), "{report:?}");
}

db_test!(
    broker_outage_parks_nothing_sqlite,
    broker_outage_parks_nothing_postgres,
    broker_outage_parks_nothing
);

fn epoch_ms() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    i64::try_from(since.as_millis()).unwrap()
}

/// Ensures that a worker whose lease ran out cannot delete the row another worker has
/// claimed since; the owner's own delete removes it.
async fn a_delete_checks_the_lease_owner(store: &Store) {
    write_one(store, "x", 0, 0).await;
    let now = epoch_ms() + 1_000;
    let first = store.claim_outbox("first", 10, now, now + 1_000).await.unwrap();
    assert_eq!(first.len(), 1);
    let second = store.claim_outbox("second", 10, now + 2_000, now + 60_000).await.unwrap();
    assert_eq!(second.len(), 1, "the lease of `first` ran out");
    let id = second[0].id;
    assert!(!store.delete_outbox(id, "first").await.unwrap(), "not the owner any more");
    let rows = store.outbox_messages(10).await.unwrap();
    assert_eq!(rows.len(), 1, "the row stays for its owner");
    assert_eq!(rows[0].lease_owner.as_deref(), Some("second"));
    assert!(store.delete_outbox(id, "second").await.unwrap());
    assert_eq!(store.outbox_backlog().await.unwrap(), 0);
}

db_test!(
    a_delete_checks_the_lease_owner_sqlite,
    a_delete_checks_the_lease_owner_postgres,
    a_delete_checks_the_lease_owner
);
