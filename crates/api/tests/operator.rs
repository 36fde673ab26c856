//! The operator's routes, driven with `oneshot`: pausing, resuming and restarting
//! workers (the pause stored in SQLite or PostgreSQL, followed by every replica and kept
//! across restarts), and the dead-letter routes over the in-memory broker (`TREAdmin`
//! only, counts, peeks, redrives and purges, and their errors).

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use steward_api::http::auth::Authentication;
use steward_api::http::{ApiSettings, AppState, OperatorSettings, openapi, router};
use steward_api::storage::Database;
use steward_api::templates::TemplateRegistry;
use steward_api::workers::{PauseFollower, PauseGate, names};
use steward_core::dead_letters::REDRIVEN_PROPERTY;
use steward_core::{
    DeadLetterQueues, MessageSink, MessageSource, OutgoingMessage, Supervisor, SupervisorConfig,
    Worker, WorkerContext, WorkerError, WorkerState,
};
use steward_inmem::{InMemoryBroker, QueueOptions};
use tower::ServiceExt;

const QUEUE: &str = "deploymentstatus";

struct App {
    router: Router,
    broker: InMemoryBroker,
    _supervisor: Supervisor,
    _db: support::TestDb,
}

/// The router behind a proxy whose user `admin` holds `TREAdmin`, consuming `QUEUE`
/// and `other` on an in-memory broker, with dead-letter administration when `admin`.
async fn app(dead_letters: bool) -> App {
    let db = support::TestDb::sqlite().await;
    let supervisor = Supervisor::new(SupervisorConfig::default());
    let broker = InMemoryBroker::builder().with_strict(true).build();
    for queue in [QUEUE, "other"] {
        broker.declare_queue(queue, QueueOptions::default());
    }
    let dlqs: Option<Arc<dyn DeadLetterQueues>> =
        dead_letters.then(|| Arc::new(broker.dead_letter_queues()) as _);
    let state = AppState {
        db: Database::migrated(db.store.clone()),
        templates: Arc::new(TemplateRegistry::builtin().unwrap()),
        health: supervisor.health(),
        settings: Arc::new(ApiSettings {
            auth: Authentication::none().with_proxy_headers(true).with_proxy_admins(["admin"]),
            transport: "inmem".to_owned(),
            operator: OperatorSettings {
                dead_letters: dlqs,
                consumed_queues: vec![QUEUE.to_owned(), "other".to_owned()],
                controls: supervisor.controls(),
            },
            ..ApiSettings::default()
        }),
        metrics: None,
    };
    App { router: router(state), broker, _supervisor: supervisor, _db: db }
}

/// Sends `ids` to `QUEUE` and dead-letters them, in that order, as bad formats.
async fn dead_letter(broker: &InMemoryBroker, ids: &[&str]) {
    for id in ids {
        let message = OutgoingMessage::json(format!(r#"{{"id":"{id}"}}"#))
            .with_message_id(*id)
            .with_property("origin", "test");
        broker.send(QUEUE, message).await.unwrap();
    }
    let source = broker.source(QUEUE).unwrap();
    for id in ids {
        let delivery = source.receive(1, Duration::from_secs(1)).await.unwrap().remove(0);
        assert_eq!(delivery.message().id, *id);
        delivery
            .dead_letter("MessageFormatIncorrect", &format!("{id} is not a status"))
            .await
            .unwrap();
    }
}

async fn call(
    app: &Router,
    user: Option<&str>,
    method: &str,
    uri: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut builder = Request::builder().method(method).uri(uri);
    if let Some(user) = user {
        builder = builder.header("x-user-id", user);
    }
    let request = match body {
        Some(body) => builder
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap(),
        None => builder.body(Body::empty()).unwrap(),
    };
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, body)
}

/// The operator routes, as (method, path, body).
fn routes() -> Vec<(&'static str, String, Option<Value>)> {
    vec![
        ("GET", "/api/dead-letters".to_owned(), None),
        ("GET", format!("/api/dead-letters/{QUEUE}?limit=5"), None),
        ("POST", format!("/api/dead-letters/{QUEUE}/redrive"), Some(json!({"all": true}))),
        ("DELETE", format!("/api/dead-letters/{QUEUE}/messages/m-0"), None),
    ]
}

/// Ensures that the dead-letter routes answer only `TREAdmin`: 401 without a caller,
/// 403 for another user, before anything is read or changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_routes_need_tre_admin() {
    let app = app(true).await;
    dead_letter(&app.broker, &["m-0"]).await;
    for (method, path, body) in routes() {
        let (status, _) = call(&app.router, None, method, &path, body.clone()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
        let (status, answer) = call(&app.router, Some("u-1"), method, &path, body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {answer}");
        assert!(answer["detail"].as_str().unwrap().contains("TREAdmin"), "{answer}");
    }
    assert_eq!(app.broker.dead_letter_count(QUEUE), 1, "nothing was redriven or purged");
    let doc = serde_json::to_value(openapi()).unwrap();
    for (method, path) in [
        ("get", "/api/dead-letters"),
        ("get", "/api/dead-letters/{queue}"),
        ("post", "/api/dead-letters/{queue}/redrive"),
        ("delete", "/api/dead-letters/{queue}/messages/{id}"),
    ] {
        let operation = &doc["paths"][path][method];
        assert_eq!(operation["tags"], json!(["operator"]), "{method} {path} in the document");
    }
}

/// Ensures that an admin sees each consumed queue's dead-letter count, peeks a queue's
/// dead letters with their reason without taking them, redrives chosen ones (which
/// come back with a redriven count) and purges one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_counts_peeks_redrives_and_purges() {
    let app = app(true).await;
    let ids = ["m-0", "m-1", "m-2", "m-3", "m-4"];
    dead_letter(&app.broker, &ids).await;
    let admin = Some("admin");

    let (status, list) = call(&app.router, admin, "GET", "/api/dead-letters", None).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(
        list,
        json!({"transport": "inmem", "peekCountsAsDelivery": false, "queues": [
            {"queue": QUEUE, "count": 5}, {"queue": "other", "count": 0}]})
    );

    let peek = format!("/api/dead-letters/{QUEUE}?limit=3");
    let (status, peeked) = call(&app.router, admin, "GET", &peek, None).await;
    assert_eq!(status, StatusCode::OK, "{peeked}");
    let messages = peeked["messages"].as_array().unwrap();
    let shown: Vec<&str> = messages.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(shown, ["m-0", "m-1", "m-2"]);
    assert_eq!(messages[0]["reason"], "MessageFormatIncorrect");
    assert_eq!(messages[0]["description"], "m-0 is not a status");
    assert_eq!(messages[0]["bodyPreview"], r#"{"id":"m-0"}"#);
    assert_eq!(messages[0]["bodyTruncated"], false);
    assert_eq!(messages[0]["properties"], json!({"origin": "test"}));
    assert_eq!(messages[0]["contentType"], "application/json");
    assert_eq!(app.broker.dead_letter_count(QUEUE), 5, "a peek takes nothing");

    let redrive = format!("/api/dead-letters/{QUEUE}/redrive");
    let chosen = json!({"ids": ["m-1", "m-3", "gone"]});
    let (status, answer) = call(&app.router, admin, "POST", &redrive, Some(chosen)).await;
    assert_eq!((status, answer), (StatusCode::OK, json!({"redriven": 2})));
    let back = app.broker.peek(QUEUE);
    let back: Vec<(&str, Option<&str>)> = back
        .iter()
        .map(|m| (m.id.as_str(), m.properties.get(REDRIVEN_PROPERTY).map(String::as_str)))
        .collect();
    assert_eq!(back, [("m-1", Some("1")), ("m-3", Some("1"))]);

    let purge = format!("/api/dead-letters/{QUEUE}/messages/m-2");
    let (status, answer) = call(&app.router, admin, "DELETE", &purge, None).await;
    assert_eq!((status, answer), (StatusCode::OK, json!({"purged": 1})));
    let (status, answer) = call(&app.router, admin, "DELETE", &purge, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");

    let (status, answer) =
        call(&app.router, admin, "POST", &redrive, Some(json!({"all": true}))).await;
    assert_eq!((status, answer), (StatusCode::OK, json!({"redriven": 2})));
    let (_, list) = call(&app.router, admin, "GET", "/api/dead-letters", None).await;
    assert_eq!(list["queues"][0]["count"], 0, "{list}");
    assert_eq!(app.broker.message_count(QUEUE), 4, "m-0, m-1, m-3, m-4 are back; m-2 is gone");
}

/// Ensures that bad requests are refused with the reason, and nothing changes: a queue
/// the service does not consume, a limit out of range, a redrive naming both or neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_operator_requests_are_refused() {
    let app = app(true).await;
    dead_letter(&app.broker, &["m-0"]).await;
    let admin = Some("admin");
    let redrive = format!("/api/dead-letters/{QUEUE}/redrive");
    for (method, path, body, expected) in [
        ("GET", "/api/dead-letters/elsewhere".to_owned(), None, StatusCode::NOT_FOUND),
        (
            "POST",
            "/api/dead-letters/elsewhere/redrive".to_owned(),
            Some(json!({"all": true})),
            StatusCode::NOT_FOUND,
        ),
        ("GET", format!("/api/dead-letters/{QUEUE}?limit=0"), None, StatusCode::BAD_REQUEST),
        ("GET", format!("/api/dead-letters/{QUEUE}?limit=101"), None, StatusCode::BAD_REQUEST),
        ("GET", format!("/api/dead-letters/{QUEUE}?count=1"), None, StatusCode::BAD_REQUEST),
        ("POST", redrive.clone(), Some(json!({})), StatusCode::BAD_REQUEST),
        ("POST", redrive.clone(), Some(json!({"ids": []})), StatusCode::BAD_REQUEST),
        (
            "POST",
            redrive.clone(),
            Some(json!({"ids": ["m-0"], "all": true})),
            StatusCode::BAD_REQUEST,
        ),
        ("POST", redrive.clone(), Some(json!({"all": false})), StatusCode::BAD_REQUEST),
        ("POST", redrive.clone(), Some(json!({"every": true})), StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        let (status, answer) = call(&app.router, admin, method, &path, body).await;
        assert_eq!(status, expected, "{method} {path}: {answer}");
        assert!(answer["detail"].is_string(), "{answer}");
    }
    assert_eq!(app.broker.dead_letter_count(QUEUE), 1, "nothing was redriven");
}

/// Ensures that a transport without dead-letter administration answers 501 naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transport_without_dead_letter_administration_says_so() {
    let app = app(false).await;
    for (method, path, body) in routes() {
        let (status, answer) = call(&app.router, Some("admin"), method, &path, body).await;
        assert_eq!(status, StatusCode::NOT_IMPLEMENTED, "{method} {path}: {answer}");
        assert!(answer["detail"].as_str().unwrap().contains("inmem"), "{answer}");
    }
}

/// A worker that counts its runs, and runs until cancelled.
struct Counted {
    name: &'static str,
    runs: Arc<AtomicUsize>,
}

#[async_trait]
impl Worker for Counted {
    fn name(&self) -> &str {
        self.name
    }

    fn stall_timeout(&self) -> Option<Duration> {
        None
    }

    async fn run(&self, ctx: WorkerContext) -> Result<(), WorkerError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        ctx.set_running();
        ctx.cancelled().await;
        Ok(())
    }
}

/// One replica: the router over `store`, a supervisor running the database-gated
/// workers `deployment-status` and `outbox`, the ungated `database`, and the pause
/// follower; how often `deployment-status` started.
struct Replica {
    router: Router,
    supervisor: Supervisor,
    runs: Arc<AtomicUsize>,
}

fn replica(store: &steward_api::storage::Store) -> Replica {
    let db = Database::migrated(store.clone());
    let supervisor = Supervisor::new(SupervisorConfig::default());
    let controls = supervisor.controls();
    let runs = Arc::new(AtomicUsize::new(0));
    supervisor.spawn(PauseGate::new(
        db.clone(),
        controls.clone(),
        Counted { name: names::DEPLOYMENT_STATUS, runs: runs.clone() },
    ));
    let outbox_runs = Arc::new(AtomicUsize::new(0));
    supervisor.spawn(PauseGate::new(
        db.clone(),
        controls.clone(),
        Counted { name: names::OUTBOX, runs: outbox_runs },
    ));
    supervisor.spawn(Counted { name: names::DATABASE, runs: Arc::new(AtomicUsize::new(0)) });
    supervisor.spawn(PauseFollower::new(db.clone(), controls.clone()));
    let state = AppState {
        db,
        templates: Arc::new(TemplateRegistry::builtin().unwrap()),
        health: supervisor.health(),
        settings: Arc::new(ApiSettings {
            auth: Authentication::none().with_proxy_headers(true).with_proxy_admins(["admin"]),
            transport: "inmem".to_owned(),
            operator: OperatorSettings { controls, ..OperatorSettings::default() },
            ..ApiSettings::default()
        }),
        metrics: None,
    };
    Replica { router: router(state), supervisor, runs }
}

/// The state of `name` on `/api/workers`, and its `paused` field.
async fn worker_state(router: &Router, name: &str) -> (String, bool) {
    let (status, workers) = call(router, Some("admin"), "GET", "/api/workers", None).await;
    assert_eq!(status, StatusCode::OK, "{workers}");
    let worker = workers["workers"].as_array().unwrap().iter().find(|w| w["name"] == name).unwrap();
    (worker["state"].as_str().unwrap().to_owned(), worker["paused"].as_bool().unwrap())
}

/// Waits (real time, polling) until `name` reads `state` on `router`, for at most 10 s.
async fn wait_for_state(router: &Router, name: &str, state: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (now, _) = worker_state(router, name).await;
        if now == state {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{name} is {now}, not {state}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Pauses `deployment-status` on one replica, and checks what every replica and a
/// restart see: the pause stored, followed by the other replica, kept across a
/// restart without the worker starting, and undone by a resume.
async fn pause_is_shared_and_survives_a_restart(store: &steward_api::storage::Store) {
    let first = replica(store);
    let second = replica(store);
    let name = names::DEPLOYMENT_STATUS;
    wait_for_state(&first.router, name, "running").await;
    wait_for_state(&second.router, name, "running").await;

    let pause = format!("/api/workers/{name}/pause");
    let (status, answer) = call(&first.router, Some("u-1"), "POST", &pause, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    let (status, answer) = call(&first.router, Some("admin"), "POST", &pause, None).await;
    assert_eq!((status, answer), (StatusCode::OK, json!({"worker": name, "paused": true})));
    wait_for_state(&first.router, name, "paused").await;
    assert_eq!(worker_state(&first.router, name).await, ("paused".to_owned(), true));
    // The other replica follows the stored pause.
    wait_for_state(&second.router, name, "paused").await;
    assert_eq!(store.paused_workers().await.unwrap().into_iter().collect::<Vec<_>>(), [name]);
    let (status, readyz) = call(&first.router, Some("admin"), "GET", "/readyz", None).await;
    assert_eq!(status, StatusCode::OK, "paused on purpose is ready: {readyz}");
    let (_, health) = call(&first.router, Some("admin"), "GET", "/health", None).await;
    let updater = health["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == "Deployment Status Updater")
        .unwrap();
    assert_eq!(updater["status"], "OK", "{health}");
    assert!(updater["message"].as_str().unwrap().contains("paused"), "{health}");

    // A restart: the stored pause holds, and the worker never starts.
    for old in [first, second] {
        let report =
            old.supervisor.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)).await;
        assert!(report.is_clean(), "{report:?}");
    }
    let restarted = replica(store);
    wait_for_state(&restarted.router, name, "paused").await;
    assert_eq!(restarted.runs.load(Ordering::SeqCst), 0, "the gate paused it before it started");
    wait_for_state(&restarted.router, names::OUTBOX, "running").await;

    let resume = format!("/api/workers/{name}/resume");
    let (status, answer) = call(&restarted.router, Some("admin"), "POST", &resume, None).await;
    assert_eq!((status, answer), (StatusCode::OK, json!({"worker": name, "paused": false})));
    wait_for_state(&restarted.router, name, "running").await;
    assert!(store.paused_workers().await.unwrap().is_empty());
    let report =
        restarted.supervisor.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)).await;
    assert!(report.is_clean(), "{report:?}");
}

/// Ensures on SQLite that a pause is stored, followed by another replica, kept across
/// a restart, and undone by a resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_is_shared_and_survives_a_restart_on_sqlite() {
    let db = support::TestDb::sqlite().await;
    pause_is_shared_and_survives_a_restart(&db.store).await;
    db.finish().await;
}

/// Ensures the same on PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_is_shared_and_survives_a_restart_on_postgres() {
    let Some(db) =
        support::TestDb::postgres("a_pause_is_shared_and_survives_a_restart_on_postgres").await
    else {
        return;
    };
    pause_is_shared_and_survives_a_restart(&db.store).await;
    db.finish().await;
}

/// Ensures that only the status updaters and the outbox can be paused (409 otherwise),
/// that unknown workers are 404, and that a restart starts a worker again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_pausable_workers_pause_and_any_worker_restarts() {
    let db = support::TestDb::sqlite().await;
    let replica = replica(&db.store);
    let admin = Some("admin");
    wait_for_state(&replica.router, names::DATABASE, "running").await;
    let (status, answer) =
        call(&replica.router, admin, "POST", "/api/workers/database/pause", None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert_eq!(answer["error"], "not_pausable");
    for action in ["pause", "resume", "restart"] {
        let path = format!("/api/workers/nobody/{action}");
        let (status, answer) = call(&replica.router, admin, "POST", &path, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{action}: {answer}");
    }
    assert!(db.store.paused_workers().await.unwrap().is_empty(), "nothing was stored");

    wait_for_state(&replica.router, names::DEPLOYMENT_STATUS, "running").await;
    let restart = format!("/api/workers/{}/restart", names::DEPLOYMENT_STATUS);
    let (status, answer) = call(&replica.router, Some("u-1"), "POST", &restart, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    assert_eq!(replica.runs.load(Ordering::SeqCst), 1, "a refused restart restarts nothing");
    let (status, answer) = call(&replica.router, admin, "POST", &restart, None).await;
    assert_eq!(
        (status, answer),
        (StatusCode::OK, json!({"worker": names::DEPLOYMENT_STATUS, "paused": false}))
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while replica.runs.load(Ordering::SeqCst) < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the worker did not start again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_for_state(&replica.router, names::DEPLOYMENT_STATUS, "running").await;
    let health = replica.supervisor.health().snapshot();
    let worker = health.worker(names::DEPLOYMENT_STATUS).unwrap();
    assert_eq!((worker.restarts, worker.state), (1, WorkerState::Running));
    let report =
        replica.supervisor.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)).await;
    assert!(report.is_clean(), "{report:?}");
    db.finish().await;
}

/// Ensures that an admin lists the parked outbox rows and retries one: it goes back to
/// the outbox, due now, with its message id, and is no longer parked; a row not parked
/// is 404, and other users are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_outbox_rows_are_listed_and_retried() {
    let app = app(true).await;
    let store = &app._db.store;
    let mut tx = store.begin().await.unwrap();
    for n in 0..2 {
        let message = steward_api::storage::OutboxMessage::new(
            "workspacequeue",
            OutgoingMessage::json(format!(r#"{{"n":{n}}}"#)),
            format!("resource-{n}"),
        );
        tx.insert_outbox(message).await.unwrap();
    }
    tx.commit().await.unwrap();
    // The outbox's due times and leases are read by the database's clock.
    let now_ms = store.lease_now(&steward_api::storage::LeaseClock::Database).await.unwrap();
    let claimed = store.claim_outbox("test", 10, now_ms, now_ms + 60_000).await.unwrap();
    assert_eq!(claimed.len(), 2);
    for row in &claimed {
        assert!(store.park_outbox(row.id, "test", "refused: too large", now_ms).await.unwrap());
    }
    let (first, second) = (claimed[0].id, claimed[1].id);

    let (status, _) = call(&app.router, Some("u-1"), "GET", "/api/outbox/parked", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, parked) =
        call(&app.router, Some("admin"), "GET", "/api/outbox/parked", None).await;
    assert_eq!(status, StatusCode::OK, "{parked}");
    assert_eq!(parked["count"], 2, "{parked}");
    let rows = parked["rows"].as_array().unwrap();
    assert_eq!(rows[0]["id"], first);
    assert_eq!(rows[0]["messageId"], claimed[0].message_id());
    assert_eq!(rows[0]["error"], "refused: too large");
    assert_eq!(rows[0]["bodyPreview"], r#"{"n":0}"#);

    let retry = format!("/api/outbox/parked/{first}/retry");
    let (status, _) = call(&app.router, Some("u-1"), "POST", &retry, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, answer) = call(&app.router, Some("admin"), "POST", &retry, None).await;
    assert_eq!((status, answer), (StatusCode::OK, json!({"retried": first})));
    let (status, answer) = call(&app.router, Some("admin"), "POST", &retry, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    let pending = store.outbox_messages(10).await.unwrap();
    let pending: Vec<(i64, String, i64)> =
        pending.iter().map(|r| (r.id, r.message_id(), r.attempts)).collect();
    assert_eq!(pending, [(first, claimed[0].message_id(), 0)], "back in the outbox, afresh");
    let (_, parked) = call(&app.router, Some("admin"), "GET", "/api/outbox/parked", None).await;
    assert_eq!(parked["count"], 1, "{parked}");
    assert_eq!(parked["rows"][0]["id"], second);
}
