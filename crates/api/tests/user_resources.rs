//! Who sees which user resources, as in TRE: a `WorkspaceResearcher` only those they
//! own, the workspace's `WorkspaceOwner` and `TREAdmin` every one. On SQLite and on
//! PostgreSQL (`*_postgres`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use steward_api::http::auth::Authentication;
use steward_api::http::{ApiSettings, AppState, router};
use steward_api::storage::Database;
use steward_api::templates::TemplateRegistry;
use steward_core::{Supervisor, SupervisorConfig};
use support::TestDb;
use tower::ServiceExt;

/// The router over `db`, behind a trusted proxy whose user `admin` holds `TREAdmin`.
fn app(db: &TestDb) -> (Router, Supervisor) {
    let supervisor = Supervisor::new(SupervisorConfig::default());
    let state = AppState {
        db: Database::migrated(db.store.clone()),
        templates: Arc::new(TemplateRegistry::builtin().unwrap()),
        health: supervisor.health(),
        settings: Arc::new(ApiSettings {
            resource_request_queue: "workspacequeue".to_owned(),
            auth: Authentication::none().with_proxy_headers(true).with_proxy_admins(["admin"]),
            transport: "inmem".to_owned(),
            ..ApiSettings::default()
        }),
        metrics: None,
    };
    (router(state), supervisor)
}

/// `method uri` as the user `id`, through the proxy headers; its status and body.
async fn call(
    app: &Router,
    id: &str,
    method: &str,
    uri: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let builder = Request::builder().method(method).uri(uri).header("x-user-id", id);
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
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// Creates a resource as `user`; returns its id and its install operation's.
async fn create(app: &Router, user: &str, body: Value) -> (String, String) {
    let (status, answer) = call(app, user, "POST", "/api/resources", Some(body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{user}: {answer}");
    let operation = &answer["operation"];
    (
        operation["resourceId"].as_str().unwrap().to_owned(),
        operation["id"].as_str().unwrap().to_owned(),
    )
}

/// The ids `user` lists, walking every page of `limit`: no page is empty.
async fn listed(app: &Router, user: &str, limit: u32) -> Vec<String> {
    let mut ids = Vec::new();
    let mut uri = format!("/api/resources?limit={limit}");
    loop {
        let (status, page) = call(app, user, "GET", &uri, None).await;
        assert_eq!(status, StatusCode::OK, "{user}: {page}");
        let resources = page["resources"].as_array().unwrap();
        assert!(!resources.is_empty(), "{user}: an empty page before the last: {page}");
        ids.extend(resources.iter().map(|r| r["id"].as_str().unwrap().to_owned()));
        match page["nextCursor"].as_str() {
            Some(cursor) => uri = format!("/api/resources?limit={limit}&cursor={cursor}"),
            None => return ids,
        }
    }
}

/// Ensures that a researcher lists and reads only the user resources they own, page by
/// page, and is refused (403) another's and its operations; that the workspace's owner
/// and the admin see every one; that an airlock manager sees none; and that a caller
/// with no role in the workspace is told it does not exist (404).
async fn researchers_see_only_their_own_user_resources(db: &TestDb) {
    let (app, _supervisor) = app(db);
    let app = &app;
    let (ws, _) = create(
        app,
        "admin",
        json!({"templateName": "tre-workspace-base", "resourceType": "workspace",
        "properties": {"display_name": "Genomics", "description": "Sequencing data"}}),
    )
    .await;
    let (firewall, _) = create(
        app,
        "admin",
        json!({"templateName": "tre-shared-service-firewall", "resourceType": "shared-service"}),
    )
    .await;
    for (user, role) in [
        ("owner", "WorkspaceOwner"),
        ("ada", "WorkspaceResearcher"),
        ("bob", "WorkspaceResearcher"),
        ("am", "AirlockManager"),
    ] {
        let uri = format!("/api/workspaces/{ws}/roles/{user}");
        let (status, body) = call(app, "admin", "PUT", &uri, Some(json!({"roles": [role]}))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (svc, _) = create(
        app,
        "owner",
        json!({"templateName": "tre-service-guacamole",
        "resourceType": "workspace-service", "workspaceId": ws,
        "properties": {"display_name": "Desktops"}}),
    )
    .await;
    let vm = |name: &str| {
        json!({"templateName": "tre-user-resource-linuxvm", "resourceType": "user-resource",
        "workspaceId": ws, "parentWorkspaceServiceId": svc,
        "properties": {"display_name": name, "os_image": "Ubuntu 22.04 LTS"}})
    };
    let (ada_vm, _) = create(app, "ada", vm("Ada's VM")).await;
    let (bob_vm, bob_op) = create(app, "bob", vm("Bob's VM")).await;
    let (owner_vm, _) = create(app, "owner", vm("The owner's VM")).await;
    let everything = [&ws, &firewall, &svc, &ada_vm, &bob_vm, &owner_vm].map(String::clone);

    for (user, expected) in [
        ("admin", everything.to_vec()),
        ("owner", everything.to_vec()),
        ("ada", vec![ws.clone(), firewall.clone(), svc.clone(), ada_vm.clone()]),
        ("bob", vec![ws.clone(), firewall.clone(), svc.clone(), bob_vm.clone()]),
        ("am", vec![ws.clone(), firewall.clone(), svc.clone()]),
        ("mallory", vec![firewall.clone()]),
    ] {
        for limit in [1, 50] {
            assert_eq!(listed(app, user, limit).await, expected, "{user} (limit {limit})");
        }
    }
    let (_, filtered) =
        call(app, "ada", "GET", "/api/resources?resourceType=user-resource", None).await;
    let ids: Vec<_> =
        filtered["resources"].as_array().unwrap().iter().map(|r| r["id"].clone()).collect();
    assert_eq!(ids, [json!(ada_vm)], "{filtered}");

    let reads = [
        format!("/api/resources/{bob_vm}"),
        format!("/api/resources/{bob_vm}/operations"),
        format!("/api/operations/{bob_op}"),
    ];
    for uri in &reads {
        for (user, expected) in [
            ("admin", StatusCode::OK),
            ("owner", StatusCode::OK),
            ("bob", StatusCode::OK),
            ("ada", StatusCode::FORBIDDEN),
            ("am", StatusCode::FORBIDDEN),
            ("mallory", StatusCode::NOT_FOUND),
        ] {
            let (status, body) = call(app, user, "GET", uri, None).await;
            assert_eq!(status, expected, "{user} GET {uri}: {body}");
            if status == StatusCode::FORBIDDEN {
                assert_eq!(body["error"], "forbidden", "{body}");
            }
        }
    }
    let own = format!("/api/resources/{ada_vm}");
    let (status, body) = call(app, "ada", "GET", &own, None).await;
    assert_eq!((status, &body["resource"]["ownerId"]), (StatusCode::OK, &json!("ada")), "{body}");
    for (method, uri) in [
        ("PATCH", format!("/api/resources/{bob_vm}")),
        ("DELETE", format!("/api/resources/{bob_vm}")),
    ] {
        let patch =
            (method == "PATCH").then(|| json!({"properties": {"display_name": "Ada's now"}}));
        let (status, body) = call(app, "ada", method, &uri, patch).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "ada {method} {uri}: {body}");
    }
}

db_test!(
    researchers_see_only_their_own_user_resources_sqlite,
    researchers_see_only_their_own_user_resources_postgres,
    researchers_see_only_their_own_user_resources
);

/// Ensures that migration 0006 gives user resources stored before it their owner
/// column from their documents: its backfill, run over rows without one, makes a
/// researcher's list show their own user resource again.
async fn the_migration_fills_in_the_owner_of_older_user_resources(db: &TestDb) {
    use steward_api::storage::{ResourceFilter, UserResourceScope};
    let registry = support::templates();
    let pipeline = support::linuxvm_pipeline(&db.store, &registry).await;
    let mine = ResourceFilter {
        user_resources: Some(UserResourceScope {
            owner_id: support::user().id,
            all_in_workspaces: Vec::new(),
        }),
        resource_type: Some(steward_api::domain::ResourceType::UserResource),
        ..ResourceFilter::default()
    };
    let ids = |resources: Vec<steward_api::domain::Resource>| -> Vec<String> {
        resources.into_iter().map(|resource| resource.id).collect()
    };
    assert_eq!(
        ids(db.store.read().resources(&mine).await.unwrap()),
        std::slice::from_ref(&pipeline.vm.id)
    );
    // As a row written before the column existed.
    db.execute("UPDATE resources SET owner_id = NULL").await;
    assert!(db.store.read().resources(&mine).await.unwrap().is_empty());
    let migration = match db.store.backend() {
        steward_api::storage::Backend::Sqlite => {
            include_str!("../migrations/sqlite/0006_user_resource_owner.sql")
        }
        steward_api::storage::Backend::Postgres => {
            include_str!("../migrations/postgres/0006_user_resource_owner.sql")
        }
    };
    let backfill = migration
        .split(';')
        .map(|statement| {
            statement.lines().filter(|line| !line.starts_with("--")).collect::<Vec<_>>().join("\n")
        })
        .find(|statement| statement.trim_start().starts_with("UPDATE resources"))
        .expect("the migration fills in the column");
    db.execute(&backfill).await;
    assert_eq!(
        ids(db.store.read().resources(&mine).await.unwrap()),
        std::slice::from_ref(&pipeline.vm.id)
    );
    let others = ResourceFilter {
        user_resources: Some(UserResourceScope {
            owner_id: "someone-else".to_owned(),
            all_in_workspaces: Vec::new(),
        }),
        ..mine.clone()
    };
    assert!(db.store.read().resources(&others).await.unwrap().is_empty());
}

db_test!(
    the_migration_fills_in_the_owner_of_older_user_resources_sqlite,
    the_migration_fills_in_the_owner_of_older_user_resources_postgres,
    the_migration_fills_in_the_owner_of_older_user_resources
);
