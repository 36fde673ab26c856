//! The transport's message size limit on the HTTP path, on SQLite and PostgreSQL
//! (`*_postgres`): a request whose message would be too large is refused with 413
//! before anything is committed.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use steward_api::http::auth::Authentication;
use steward_api::http::{ApiSettings, AppState, router};
use steward_api::storage::{Database, ResourceFilter, Store};
use steward_api::templates::TemplateRegistry;
use steward_core::{Supervisor, SupervisorConfig};
use steward_inmem::InMemoryBroker;
use tower::ServiceExt;

/// Service Bus's limit, which inmem is given here.
const LIMIT: usize = 256 * 1024;

async fn post(store: &Store, supervisor: &Supervisor, body: &Value) -> (StatusCode, Value) {
    let broker = InMemoryBroker::builder().with_max_body_bytes(LIMIT).build();
    let state = AppState {
        db: Database::migrated(store.clone()),
        templates: Arc::new(TemplateRegistry::builtin().unwrap()),
        health: supervisor.health(),
        settings: Arc::new(ApiSettings {
            resource_request_queue: "workspacequeue".to_owned(),
            auth: Authentication::none(),
            transport: "inmem".to_owned(),
            max_message_bytes: broker.capabilities().max_body_bytes,
            ..ApiSettings::default()
        }),
        metrics: None,
    };
    let request = Request::builder()
        .method("POST")
        .uri("/api/resources")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = router(state).oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

async fn resource_count(store: &Store) -> usize {
    let filter = ResourceFilter { include_deleted: true, ..ResourceFilter::default() };
    store.read().resources(&filter).await.unwrap().len()
}

/// Ensures that a resource whose 300 KB property would make its resource request larger
/// than the transport accepts is refused with 413 in the JSON error shape, and that
/// nothing is committed: no resource, no operation, no outbox row. A small one passes.
async fn oversized_message_is_refused_with_413_before_any_commit(store: &Store) {
    let supervisor = Supervisor::new(SupervisorConfig::default());
    let big = json!({
        "templateName": "tre-shared-service-firewall",
        "resourceType": "shared-service",
        "properties": {"rule_collections": [{"name": "x".repeat(300 * 1024)}]},
    });
    let (status, body) = post(store, &supervisor, &big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["error"], "payload_too_large", "{body}");
    assert!(body["detail"].as_str().unwrap().contains("over the transport's limit"), "{body}");
    assert_eq!(resource_count(store).await, 0, "no resource was committed");
    assert_eq!(store.outbox_backlog().await.unwrap(), 0, "no message was committed");

    let small = json!({
        "templateName": "tre-shared-service-firewall",
        "resourceType": "shared-service",
        "properties": {"rule_collections": [{"name": "allow-packages"}]},
    });
    let (status, body) = post(store, &supervisor, &small).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(resource_count(store).await, 1);
    assert_eq!(store.outbox_backlog().await.unwrap(), 1);
}

db_test!(
    oversized_message_is_refused_with_413_before_any_commit_sqlite,
    oversized_message_is_refused_with_413_before_any_commit_postgres,
    oversized_message_is_refused_with_413_before_any_commit
);

/// Ensures that a string over its template's `maxLength` is a validation error with the
/// same status and code as a value of the wrong type, and commits nothing; a string of
/// exactly `maxLength` characters passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_length_violation_is_a_validation_error() {
    let db = support::TestDb::sqlite().await;
    let supervisor = Supervisor::new(SupervisorConfig::default());
    let firewall = |display_name: Value| {
        json!({
            "templateName": "tre-shared-service-firewall",
            "resourceType": "shared-service",
            "properties": {"display_name": display_name},
        })
    };
    let (wrong_type, wrong_body) = post(&db, &supervisor, &firewall(json!(5))).await;
    assert_eq!(wrong_type, StatusCode::BAD_REQUEST, "{wrong_body}");
    let (too_long, body) = post(&db, &supervisor, &firewall(json!("é".repeat(257)))).await;
    assert_eq!(too_long, wrong_type, "{body}");
    assert_eq!(body["error"], wrong_body["error"], "{body}");
    assert!(body["detail"].as_str().unwrap().contains("longer than 256 characters"), "{body}");
    assert_eq!(resource_count(&db).await, 0);
    assert_eq!(db.outbox_backlog().await.unwrap(), 0);
    let (status, body) = post(&db, &supervisor, &firewall(json!("é".repeat(256)))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    db.finish().await;
}
