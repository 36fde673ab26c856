//! The HTTP router driven with `oneshot`: routes and OpenAPI, error shapes, the token,
//! body limits, paging and the probes.

#![allow(clippy::unwrap_used)]

mod idp;
mod support;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use steward_api::http::auth::Authentication;
use steward_api::http::{ApiSettings, AppState, LoadLimit};
use steward_api::http::{openapi, router};
use steward_api::storage::Database;
use steward_api::templates::TemplateRegistry;
use steward_core::{Supervisor, SupervisorConfig, Worker, WorkerContext, WorkerError};
use tower::ServiceExt;

/// A worker that runs until cancelled, or fails at once.
struct Stub {
    name: &'static str,
    fail: bool,
}

#[async_trait]
impl Worker for Stub {
    fn name(&self) -> &str {
        self.name
    }

    fn stall_timeout(&self) -> Option<Duration> {
        None
    }

    async fn run(&self, ctx: WorkerContext) -> Result<(), WorkerError> {
        if self.fail {
            return Err(WorkerError::fatal("broken on purpose"));
        }
        ctx.set_running();
        ctx.cancelled().await;
        Ok(())
    }
}

struct App {
    router: Router,
    _supervisor: Supervisor,
    _db: support::TestDb,
}

async fn app(token: Option<&str>, failing: Option<&'static str>) -> App {
    let auth =
        token.map_or_else(Authentication::none, |t| Authentication::none().with_api_token(t));
    build(auth, false, failing, true).await
}

/// The router over a fresh database, its migration marked done when `migrated`.
async fn build(
    auth: Authentication,
    metrics_open: bool,
    failing: Option<&'static str>,
    migrated: bool,
) -> App {
    build_with_load(auth, metrics_open, failing, migrated, LoadLimit::default()).await
}

/// [`build`] with this load limit.
async fn build_with_load(
    auth: Authentication,
    metrics_open: bool,
    failing: Option<&'static str>,
    migrated: bool,
    load: LoadLimit,
) -> App {
    let db = support::TestDb::sqlite().await;
    build_on(db, auth, metrics_open, failing, migrated, load).await
}

/// [`build_with_load`] over `db`.
async fn build_on(
    db: support::TestDb,
    auth: Authentication,
    metrics_open: bool,
    failing: Option<&'static str>,
    migrated: bool,
    load: LoadLimit,
) -> App {
    let supervisor = Supervisor::new(SupervisorConfig::default().with_intensity(
        steward_core::RestartIntensity { max_restarts: 0, within: Duration::from_secs(600) },
    ));
    for name in ["database", "transport", "deployment-status", "airlock-status"] {
        supervisor.spawn(Stub { name, fail: Some(name) == failing });
    }
    let state = AppState {
        db: if migrated {
            Database::migrated(db.store.clone())
        } else {
            Database::new(db.store.clone())
        },
        templates: Arc::new(TemplateRegistry::builtin().unwrap()),
        health: supervisor.health(),
        settings: Arc::new(ApiSettings {
            resource_request_queue: "workspacequeue".to_owned(),
            auth,
            metrics_open,
            transport: "inmem".to_owned(),
            load,
            ..ApiSettings::default()
        }),
        metrics: None,
    };
    // Let the stub workers start.
    for _ in 0..100 {
        let snapshot = state.health.snapshot();
        let settled = snapshot.workers.iter().all(|w| {
            matches!(
                w.state,
                steward_core::WorkerState::Running | steward_core::WorkerState::Failed
            )
        });
        if settled && snapshot.workers.len() == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    App { router: router(state), _supervisor: supervisor, _db: db }
}

async fn call(app: &Router, request: Request<Body>) -> (StatusCode, Value) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, body)
}

fn request(method: &str, uri: &str, body: Option<Value>) -> Request<Body> {
    let builder = Request::builder().method(method).uri(uri);
    match body {
        Some(body) => builder
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap(),
        None => builder.body(Body::empty()).unwrap(),
    }
}

/// Every route the service serves: (method, path), as a client sees them.
const ROUTES: &[(&str, &str)] = &[
    ("GET", "/health"),
    ("GET", "/api/health"),
    ("GET", "/livez"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/api/workers"),
    ("GET", "/api/templates"),
    ("GET", "/api/openapi.json"),
    ("POST", "/api/resources"),
    ("GET", "/api/resources"),
    ("GET", "/api/resources/{id}"),
    ("PATCH", "/api/resources/{id}"),
    ("DELETE", "/api/resources/{id}"),
    ("GET", "/api/resources/{id}/operations"),
    ("POST", "/api/resources/{id}/actions/{action}"),
    ("GET", "/api/operations/{id}"),
    ("POST", "/api/airlock-requests"),
    ("GET", "/api/airlock-requests"),
    ("GET", "/api/airlock-requests/{id}"),
    ("POST", "/api/airlock-requests/{id}/submit"),
    ("POST", "/api/airlock-requests/{id}/review"),
    ("POST", "/api/airlock-requests/{id}/cancel"),
    ("GET", "/api/workspaces/{workspaceId}/roles/{userId}"),
    ("PUT", "/api/workspaces/{workspaceId}/roles/{userId}"),
    ("GET", "/api/dead-letters"),
    ("GET", "/api/dead-letters/{queue}"),
    ("POST", "/api/dead-letters/{queue}/redrive"),
    ("DELETE", "/api/dead-letters/{queue}/messages/{id}"),
    ("POST", "/api/workers/{name}/pause"),
    ("POST", "/api/workers/{name}/resume"),
    ("POST", "/api/workers/{name}/restart"),
    ("GET", "/api/outbox/parked"),
    ("POST", "/api/outbox/parked/{id}/retry"),
];

/// The methods a route may take.
const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE"];

fn concrete(path: &str) -> String {
    path.replace("{id}", "00000000-0000-4000-8000-000000000000")
        .replace("{action}", "start")
        .replace("{workspaceId}", "00000000-0000-4000-8000-000000000000")
        .replace("{userId}", "u-1")
        .replace("{queue}", "deploymentstatus")
        .replace("{name}", "deployment-status")
}

fn assert_error_shape(body: &Value) {
    assert!(body["error"].is_string(), "no error code in {body}");
    assert!(body["detail"].is_string(), "no detail in {body}");
    assert_eq!(body.as_object().map(|o| o.len()), Some(2), "extra fields in {body}");
}

/// Ensures that every route the router serves is documented in `/api/openapi.json`
/// with its method, and that the router really serves each listed pair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_is_served_and_in_openapi() {
    let app = app(None, None).await;
    let (status, doc) = call(&app.router, request("GET", "/api/openapi.json", None)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc, serde_json::to_value(openapi()).unwrap());
    for (method, path) in ROUTES {
        let documented = &doc["paths"][path][method.to_lowercase()];
        assert!(documented.is_object(), "{method} {path} is not in the OpenAPI document");
        let (status, body) = call(&app.router, request(method, &concrete(path), None)).await;
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}: {body}");
        let unrouted = status == StatusCode::NOT_FOUND && body["detail"] == "no such route";
        assert!(!unrouted, "{method} {path} is not routed");
    }
    let documented: usize =
        doc["paths"].as_object().unwrap().values().map(|p| p.as_object().unwrap().len()).sum();
    assert_eq!(documented, ROUTES.len(), "the document lists routes the router does not serve");
}

/// Ensures that `GET /api/openapi.json` lists exactly the served routes: each
/// documented (method, path) is served, and every other method of a documented path
/// answers 405, so the router serves nothing on those paths the document leaves out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_lists_exactly_the_served_routes() {
    let app = app(None, None).await;
    let (status, doc) = call(&app.router, request("GET", "/api/openapi.json", None)).await;
    assert_eq!(status, StatusCode::OK);
    let paths = doc["paths"].as_object().unwrap();
    let mut listed = Vec::new();
    for (path, operations) in paths {
        for method in METHODS {
            let documented = operations.get(method.to_lowercase()).is_some();
            let (status, body) = call(&app.router, request(method, &concrete(path), None)).await;
            let unrouted = status == StatusCode::NOT_FOUND && body["detail"] == "no such route";
            assert!(!unrouted, "{method} {path} is documented but its path is not routed");
            if documented {
                assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}: {body}");
                listed.push((method.to_string(), path.clone()));
            } else {
                assert_eq!(
                    status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path} is served but not documented: {body}"
                );
                assert_error_shape(&body);
            }
        }
    }
    let mut served: Vec<(String, String)> =
        ROUTES.iter().map(|(method, path)| ((*method).to_owned(), (*path).to_owned())).collect();
    listed.sort();
    served.sort();
    assert_eq!(listed, served, "the document and the served routes differ");
    // A path outside the document is not served.
    let (status, body) = call(&app.router, request("GET", "/api/unlisted", None)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["detail"], "no such route");
}

/// Ensures that the request examples of the OpenAPI document are valid against the
/// shipped templates: the resource example installs, and the update example is accepted
/// once the install has finished; while it runs, the update is refused with 409 naming
/// the running operation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_examples_are_valid_requests() {
    let app = app(None, None).await;
    let doc = serde_json::to_value(openapi()).unwrap();
    let schemas = &doc["components"]["schemas"];
    let create = schemas["CreateResource"]["example"].clone();
    assert!(create.is_object(), "CreateResource has an example");
    let (status, body) = call(&app.router, request("POST", "/api/resources", Some(create))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id = body["operation"]["resourceId"].as_str().unwrap().to_owned();
    for name in ["UpdateResource", "CreateAirlockRequest", "ReviewBody"] {
        assert!(schemas[name]["example"].is_object(), "{name} has an example");
    }
    let update = schemas["UpdateResource"]["example"].clone();
    let patch = || request("PATCH", &format!("/api/resources/{id}"), Some(update.clone()));
    // The install is still in progress: a second operation waits for it.
    let install_id = body["operation"]["id"].as_str().unwrap().to_owned();
    let (status, refused) = call(&app.router, patch()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert_eq!(refused["error"], "operation_in_progress");
    assert!(refused["detail"].as_str().unwrap().contains(&install_id), "{refused}");
    support::set_status(&app._db.store, &id, steward_api::domain::Status::Deployed).await;
    let (status, body) = call(&app.router, patch()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
}

/// Ensures that the OpenAPI document lists the statuses the routes answer: every route
/// but the probes documents 401, 403 and 503, every route with a body 400, 413, 415
/// and 422, every route that starts an operation 409 and 413; and each status these
/// requests get (409 for an operation in progress, 413 for a large body, 401, 403,
/// 404, 415, 422…) is documented for its route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_status_a_route_answers_is_documented() {
    let doc = serde_json::to_value(openapi()).unwrap();
    let statuses = |method: &str, path: &str| -> Vec<String> {
        let responses = &doc["paths"][path][method.to_lowercase()]["responses"];
        responses.as_object().unwrap().keys().cloned().collect()
    };
    for (method, path) in ROUTES {
        let listed = statuses(method, path);
        let operation = &doc["paths"][path][method.to_lowercase()];
        let mut needed = Vec::new();
        if !steward_api::http::OPEN_ROUTES.contains(path) {
            needed.extend(["401", "403", "503"]);
        }
        if operation.get("requestBody").is_some() {
            needed.extend(["400", "413", "415", "422"]);
        }
        if listed.iter().any(|status| status == "202") {
            needed.extend(["404", "409", "413"]);
        }
        for status in needed {
            assert!(
                listed.iter().any(|s| s == status),
                "{method} {path} does not document {status}: {listed:?}"
            );
        }
        for (status, answer) in operation["responses"].as_object().unwrap() {
            if status.starts_with('4') || status.starts_with('5') {
                let schema = &answer["content"]["application/json"]["schema"]["$ref"];
                let probe = *path == "/livez" || *path == "/readyz";
                assert!(
                    probe || schema == "#/components/schemas/ErrorBody",
                    "{method} {path} {status}: {answer}"
                );
            }
        }
    }

    // What the routes answer.
    let served = build(proxy(), false, None, true).await;
    let router = &served.router;
    let mut seen: Vec<(&str, String, StatusCode)> = Vec::new();
    let mut answer =
        async |user: &str, method: &'static str, path: &str, uri: String, body: Option<Value>| {
            let (status, reply) = call(router, as_user(user, "", method, &uri, body)).await;
            seen.push((method, path.to_owned(), status));
            (status, reply)
        };
    let workspace = json!({"templateName": "tre-workspace-base", "resourceType": "workspace",
        "properties": {"display_name": "Genomics", "description": "Sequencing data"}});
    let (status, body) =
        answer("admin", "POST", "/api/resources", "/api/resources".into(), Some(workspace)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let ws = body["operation"]["resourceId"].as_str().unwrap().to_owned();
    let firewall =
        json!({"templateName": "tre-shared-service-firewall", "resourceType": "shared-service"});
    answer("admin", "POST", "/api/resources", "/api/resources".into(), Some(firewall)).await;
    let roles = "/api/workspaces/{workspaceId}/roles/{userId}";
    for (user, role) in [("owner", "WorkspaceOwner"), ("ada", "WorkspaceResearcher")] {
        let uri = format!("/api/workspaces/{ws}/roles/{user}");
        let (status, _) = answer("admin", "PUT", roles, uri, Some(json!({"roles": [role]}))).await;
        assert_eq!(status, StatusCode::OK);
    }
    let service = json!({"templateName": "tre-service-guacamole", "resourceType": "workspace-service",
        "workspaceId": ws, "properties": {"display_name": "Desktops"}});
    let (_, body) =
        answer("owner", "POST", "/api/resources", "/api/resources".into(), Some(service)).await;
    let svc = body["operation"]["resourceId"].as_str().unwrap().to_owned();
    let vm = json!({"templateName": "tre-user-resource-linuxvm", "resourceType": "user-resource",
        "workspaceId": ws, "parentWorkspaceServiceId": svc,
        "properties": {"display_name": "VM", "os_image": "Ubuntu 22.04 LTS"}});
    let (_, body) =
        answer("ada", "POST", "/api/resources", "/api/resources".into(), Some(vm.clone())).await;
    let vm_id = body["operation"]["resourceId"].as_str().unwrap().to_owned();
    // Their installs run: every other operation on them waits (409).
    let one = "/api/resources/{id}";
    let patch = Some(json!({"properties": {"display_name": "VM 2"}}));
    let (status, _) = answer("ada", "PATCH", one, format!("/api/resources/{vm_id}"), patch).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _) = answer("ada", "DELETE", one, format!("/api/resources/{vm_id}"), None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let action = "/api/resources/{id}/actions/{action}";
    let (status, _) =
        answer("ada", "POST", action, format!("/api/resources/{vm_id}/actions/stop"), None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _) = answer("admin", "DELETE", one, format!("/api/resources/{ws}"), None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    // Bodies too large, not JSON, or with unknown fields; callers without the role or
    // any role.
    let large = Some(json!({"properties": {"display_name": "x".repeat(2 << 20)}}));
    let (status, _) =
        answer("admin", "PATCH", one, format!("/api/resources/{ws}"), large.clone()).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let (status, _) =
        answer("admin", "POST", "/api/resources", "/api/resources".into(), large).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let (status, _) = answer(
        "admin",
        "POST",
        "/api/resources",
        "/api/resources".into(),
        Some(json!({"bogus": 1})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = answer(
        "ada",
        "PATCH",
        one,
        format!("/api/resources/{ws}"),
        Some(json!({"properties": {}})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = answer("mallory", "GET", one, format!("/api/resources/{ws}"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = answer("ada", "GET", "/api/workers", "/api/workers".into(), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, reply) = call(router, {
        let mut request = as_user("admin", "", "POST", "/api/resources", None);
        *request.body_mut() = Body::from("{}");
        request
    })
    .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{reply}");
    seen.push(("POST", "/api/resources".to_owned(), status));
    // Without credentials, where a token is needed.
    let guarded = app(Some("secret"), None).await;
    for (method, path) in ROUTES {
        let (status, _) = call(&guarded.router, request(method, &concrete(path), None)).await;
        seen.push((method, (*path).to_owned(), status));
    }
    for (method, path, status) in seen {
        let listed = statuses(method, &path);
        assert!(
            listed.iter().any(|s| s == status.as_str()),
            "{method} {path} answered {status}, which it does not document: {listed:?}"
        );
    }
}

/// Ensures that with `STEWARD_API_TOKEN` set every route but the probes answers 401
/// with `WWW-Authenticate: Bearer` without the token, reads included, and with
/// `error="invalid_token"` for a wrong one; the probes stay open; spoofed `X-User-*`
/// headers are no credential; the right token passes as the development admin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_guards_every_route_but_the_probes() {
    let app = app(Some("s3cret-token"), None).await;
    for (method, path) in ROUTES {
        let open = steward_api::http::OPEN_ROUTES.contains(path);
        let mut spoofed = request(method, &concrete(path), Some(json!({})));
        spoofed.headers_mut().insert("x-user-id", "steward-admin".parse().unwrap());
        spoofed.headers_mut().insert("x-user-roles", "TREAdmin".parse().unwrap());
        let response = app.router.clone().oneshot(spoofed).await.unwrap();
        if open {
            assert_ne!(response.status(), StatusCode::UNAUTHORIZED, "{method} {path}");
            continue;
        }
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{method} {path}");
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer", "{method} {path}");
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        assert_error_shape(&serde_json::from_slice(&bytes).unwrap());

        let mut wrong = request(method, &concrete(path), Some(json!({})));
        wrong.headers_mut().insert(header::AUTHORIZATION, "Bearer s3cret-tokeN".parse().unwrap());
        let response = app.router.clone().oneshot(wrong).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{method} {path} wrong token");
        let challenge = response.headers()[header::WWW_AUTHENTICATE].to_str().unwrap();
        assert!(challenge.starts_with("Bearer error=\"invalid_token\""), "{challenge}");
    }
    let mut right = request("GET", "/api/workers", None);
    right.headers_mut().insert(header::AUTHORIZATION, "Bearer s3cret-token".parse().unwrap());
    let (status, body) = call(&app.router, right).await;
    assert_eq!(status, StatusCode::OK, "the development admin is an operator: {body}");
    let mut right = request(
        "POST",
        "/api/resources",
        Some(
            json!({"templateName": "tre-shared-service-firewall", "resourceType": "shared-service"}),
        ),
    );
    right.headers_mut().insert(header::AUTHORIZATION, "Bearer s3cret-token".parse().unwrap());
    let (status, body) = call(&app.router, right).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["operation"]["user"]["id"], "steward-admin", "{body}");
}

/// The authentication of a service behind an authenticating proxy whose user `admin`
/// holds `TREAdmin`.
fn proxy() -> Authentication {
    Authentication::none().with_proxy_headers(true).with_proxy_admins(["admin"])
}

/// Ensures that the operator routes answer 403 to a known caller without `TREAdmin`,
/// and that `STEWARD_METRICS_OPEN` opens `/metrics` to anyone, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_routes_need_tre_admin() {
    let proxy = proxy();
    let as_user = |path: &str, id: &str| {
        let mut request = request("GET", path, None);
        request.headers_mut().insert("x-user-id", id.parse().unwrap());
        request
    };
    let app = build(proxy.clone(), false, None, true).await;
    for path in steward_api::http::OPERATOR_ROUTES {
        let (status, body) = call(&app.router, as_user(path, "u-1")).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {body}");
        assert_error_shape(&body);
        let (status, _) = call(&app.router, as_user(path, "admin")).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        let (status, _) = call(&app.router, request("GET", path, None)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
    }
    let open = build(proxy, true, None, true).await;
    let (status, _) = call(&open.router, request("GET", "/metrics", None)).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(&open.router, request("GET", "/api/workers", None)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

/// Ensures that behind a proxy, `X-User-Roles` (not one of TRE's headers) makes nobody
/// an admin: a caller who names itself `TREAdmin` is refused what needs the role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_headers_give_no_roles() {
    let app = build(proxy(), false, None, true).await;
    let workspace = json!({"templateName": "tre-workspace-base", "resourceType": "workspace",
        "properties": {"display_name": "Genomics", "description": "Sequencing data"}});
    for (method, path, body) in
        [("GET", "/api/workers", None), ("POST", "/api/resources", Some(workspace.clone()))]
    {
        let (status, body) =
            call(&app.router, as_user("mallory", "TREAdmin", method, path, body)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {body}");
    }
    let (status, body) =
        call(&app.router, as_user("admin", "", "POST", "/api/resources", Some(workspace))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "a configured admin is one: {body}");
}

/// Ensures that every call needs `TREUser` or `TREAdmin`: a valid token without either
/// (an application's token, say) is refused with 403, reads included; and that a token
/// whose `oid` or `sub` is `steward-admin` is refused (401).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_needs_tre_user_or_tre_admin() {
    use steward_api::http::auth::{OidcConfig, OidcVerifier};
    let idp = idp::Idp::start().await;
    let verifier = OidcVerifier::new(OidcConfig {
        issuer: idp.issuer.clone(),
        audience: idp::AUDIENCE.to_owned(),
        jwks_url: None,
    })
    .unwrap();
    let app = build(Authentication::none().with_oidc(Arc::new(verifier)), false, None, true).await;
    let with_token = |token: &str, path: &str| {
        let mut request = request("GET", path, None);
        request
            .headers_mut()
            .insert(header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
        request
    };
    let app_only = idp.token("daemon-app", &[]);
    let other_roles = idp.token("someone", &["Reader"]);
    for path in ["/api/templates", "/api/resources", "/api/airlock-requests"] {
        for token in [&app_only, &other_roles] {
            let (status, body) = call(&app.router, with_token(token, path)).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {body}");
            assert!(body["detail"].as_str().unwrap().contains("TREUser"), "{body}");
        }
        let (status, body) =
            call(&app.router, with_token(&idp.token("user", &["TREUser"]), path)).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
    // A token naming the development admin's id does not alias it.
    let mut claims = idp.claims("ignored", &["TREAdmin"]);
    claims.as_object_mut().unwrap().remove("oid");
    claims["sub"] = "steward-admin".into();
    for token in [idp.token("steward-admin", &["TREAdmin"]), idp.rsa.sign(&claims)] {
        let (status, body) = call(&app.router, with_token(&token, "/api/resources")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    }
}

/// Ensures that a token that cannot be checked because the issuer's keys cannot be
/// fetched is 503 with `Retry-After` (the service's fault), and a malformed or
/// HMAC token 401 `invalid_token` (the caller's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_that_cannot_be_checked_are_503_and_bad_ones_401() {
    use base64::Engine as _;
    use steward_api::http::auth::{OidcConfig, OidcVerifier};
    // Nothing listens on port 9 of the loopback address.
    let verifier = OidcVerifier::new(OidcConfig {
        issuer: "http://127.0.0.1:9".to_owned(),
        audience: "api://steward".to_owned(),
        jwks_url: None,
    })
    .unwrap();
    let app = build(Authentication::none().with_oidc(Arc::new(verifier)), false, None, true).await;
    let part = |value: Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string().as_bytes())
    };
    let claims = part(json!({"sub": "u", "iss": "http://127.0.0.1:9", "aud": "api://steward"}));
    for (alg, status) in
        [("RS256", StatusCode::SERVICE_UNAVAILABLE), ("HS256", StatusCode::UNAUTHORIZED)]
    {
        let token = format!("{}.{claims}.c2ln", part(json!({"alg": alg, "kid": "k1"})));
        let mut request = request("GET", "/api/resources", None);
        request
            .headers_mut()
            .insert(header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
        let response = app.router.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), status, "{alg}");
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert!(response.headers().contains_key(header::RETRY_AFTER));
        } else {
            let challenge = response.headers()[header::WWW_AUTHENTICATE].to_str().unwrap();
            assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
            assert!(challenge.contains("algorithm"), "{challenge}");
        }
    }
}

/// Ensures that a refused token's `kid` is not echoed into `WWW-Authenticate` (nor the
/// answer): whatever characters it has, the challenge is there, in a fixed text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_tokens_kid_is_not_echoed() {
    use steward_api::http::auth::{OidcConfig, OidcVerifier};
    let idp = idp::Idp::start().await;
    let verifier = OidcVerifier::new(OidcConfig {
        issuer: idp.issuer.clone(),
        audience: idp::AUDIENCE.to_owned(),
        jwks_url: None,
    })
    .unwrap();
    let app = build(Authentication::none().with_oidc(Arc::new(verifier)), false, None, true).await;
    for kid in ["clé-inconnue", "evil\u{1}kid", "x\", plain-kid"] {
        let token = idp::RsaKey::generate(kid).sign(&idp.claims("u", &["TREUser"]));
        let mut request = request("GET", "/api/resources", None);
        request
            .headers_mut()
            .insert(header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
        let response = app.router.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{kid:?}");
        let challenge = response
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .unwrap_or_else(|| panic!("no challenge for {kid:?}"))
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            challenge,
            "Bearer error=\"invalid_token\", error_description=\"the token's key is not one of the issuer's\""
        );
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        assert!(!String::from_utf8_lossy(&bytes).contains("kid"), "{kid:?}");
    }
}

/// A request as the user `id` with these global roles, through trusted proxy headers.
fn as_user(id: &str, roles: &str, method: &str, uri: &str, body: Option<Value>) -> Request<Body> {
    let mut request = request(method, uri, body);
    request.headers_mut().insert("x-user-id", id.parse().unwrap());
    request.headers_mut().insert("x-user-roles", roles.parse().unwrap());
    request
}

/// Ensures that only `TREAdmin` or the workspace's `WorkspaceOwner` sets a user's roles
/// in a workspace, and only `TREAdmin` grants `AirlockManager`; that the user, the owner and the admin read them and nobody else;
/// and that unknown roles and unknown workspaces are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_roles_are_set_by_admins_and_owners() {
    let app = build(proxy(), false, None, true).await;
    let create = json!({"templateName": "tre-workspace-base", "resourceType": "workspace",
        "properties": {"display_name": "Genomics", "description": "Sequencing data"}});
    let (status, body) =
        call(&app.router, as_user("admin", "TREAdmin", "POST", "/api/resources", Some(create)))
            .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let ws = body["operation"]["resourceId"].as_str().unwrap().to_owned();
    let roles = |user: &str| format!("/api/workspaces/{ws}/roles/{user}");
    let set = |role: &str| Some(json!({"roles": [role]}));

    let (status, body) = call(
        &app.router,
        as_user("admin", "TREAdmin", "PUT", &roles("owner"), set("WorkspaceOwner")),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"workspaceId": ws, "userId": "owner", "roles": ["WorkspaceOwner"]}));

    let (status, body) = call(
        &app.router,
        as_user("mallory", "TREUser", "PUT", &roles("mallory"), set("AirlockManager")),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "a stranger is not told it exists: {body}");
    assert_error_shape(&body);

    // Only the admin grants AirlockManager: an owner could make a second identity of
    // their own the reviewer of their own exports.
    let (status, body) =
        call(&app.router, as_user("owner", "TREUser", "PUT", &roles("am"), set("AirlockManager")))
            .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("AirlockManager"), "{body}");
    let (status, body) =
        call(&app.router, as_user("admin", "TREAdmin", "PUT", &roles("am"), set("AirlockManager")))
            .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The owner manages the other roles, and keeps or removes the manager's.
    let both = Some(json!({"roles": ["AirlockManager", "WorkspaceResearcher"]}));
    let (status, body) =
        call(&app.router, as_user("owner", "TREUser", "PUT", &roles("am"), both)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) =
        call(&app.router, as_user("owner", "TREUser", "PUT", &roles("am"), set("AirlockManager")))
            .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    for (reader, expected) in
        [("am", StatusCode::OK), ("owner", StatusCode::OK), ("mallory", StatusCode::NOT_FOUND)]
    {
        let (status, body) =
            call(&app.router, as_user(reader, "", "GET", &roles("am"), None)).await;
        assert_eq!(status, expected, "{reader}: {body}");
        if status == StatusCode::OK {
            assert_eq!(body["roles"], json!(["AirlockManager"]), "{reader}");
        }
    }
    let (status, _) =
        call(&app.router, as_user("admin", "TREAdmin", "GET", &roles("am"), None)).await;
    assert_eq!(status, StatusCode::OK);

    let (status, body) =
        call(&app.router, as_user("admin", "TREAdmin", "PUT", &roles("x"), set("Superuser"))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let missing = "/api/workspaces/00000000-0000-4000-8000-000000000000/roles/x";
    let (status, body) =
        call(&app.router, as_user("admin", "TREAdmin", "PUT", missing, set("AirlockManager")))
            .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _) = call(&app.router, request("GET", &roles("am"), None)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // An empty set removes the user's roles.
    let (status, body) =
        call(&app.router, as_user("owner", "", "PUT", &roles("am"), Some(json!({"roles": []}))))
            .await;
    assert_eq!((status, body["roles"].clone()), (StatusCode::OK, json!([])));
}

/// Ensures that a caller with no role in a workspace cannot tell it, or anything in
/// it, from one that does not exist: the same 404 as for a missing id, while a member
/// without the needed role gets 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_caller_cannot_see_answers_404_as_if_missing() {
    let app = build(proxy(), false, None, true).await;
    let router = &app.router;
    let workspace = json!({"templateName": "tre-workspace-base", "resourceType": "workspace",
        "properties": {"display_name": "Genomics", "description": "Sequencing data"}});
    let (_, body) =
        call(router, as_user("admin", "", "POST", "/api/resources", Some(workspace))).await;
    let ws = body["operation"]["resourceId"].as_str().unwrap().to_owned();
    let operation = body["operation"]["id"].as_str().unwrap().to_owned();
    for (user, role) in [("researcher", "WorkspaceResearcher"), ("manager", "AirlockManager")] {
        let uri = format!("/api/workspaces/{ws}/roles/{user}");
        let (status, _) =
            call(router, as_user("admin", "", "PUT", &uri, Some(json!({"roles": [role]})))).await;
        assert_eq!(status, StatusCode::OK);
    }
    let (status, body) = call(
        router,
        as_user(
            "researcher",
            "",
            "POST",
            "/api/airlock-requests",
            Some(json!({"workspaceId": ws, "type": "export"})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let request = body["airlockRequest"]["id"].as_str().unwrap().to_owned();

    let missing = "00000000-0000-4000-8000-000000000000";
    let swap = |text: &str, id: &str| text.replace(id, missing);
    for (method, path, body, id) in [
        ("GET", format!("/api/resources/{ws}"), None, ws.as_str()),
        ("GET", format!("/api/resources/{ws}/operations"), None, ws.as_str()),
        ("DELETE", format!("/api/resources/{ws}"), None, ws.as_str()),
        ("GET", format!("/api/operations/{operation}"), None, operation.as_str()),
        ("GET", format!("/api/airlock-requests/{request}"), None, request.as_str()),
        ("POST", format!("/api/airlock-requests/{request}/submit"), None, request.as_str()),
        ("GET", format!("/api/workspaces/{ws}/roles/outsider"), None, ws.as_str()),
        (
            "POST",
            "/api/airlock-requests".to_owned(),
            Some(json!({"workspaceId": ws, "type": "export"})),
            ws.as_str(),
        ),
    ] {
        let (status, hidden) =
            call(router, as_user("outsider", "", method, &path, body.clone())).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {hidden}");
        let body = body.map(|b| serde_json::from_str(&swap(&b.to_string(), id)).unwrap());
        let (status, absent) =
            call(router, as_user("outsider", "", method, &swap(&path, id), body)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {absent}");
        assert_eq!(swap(&hidden.to_string(), id), absent.to_string(), "{method} {path}");
    }
    // A member without the role is told no, and why.
    let (status, _) = call(
        router,
        as_user("manager", "", "POST", &format!("/api/airlock-requests/{request}/submit"), None),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

/// Ensures that the last `WorkspaceOwner` of a workspace cannot be removed (409), by
/// the admin or by themselves, while one of two can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_workspace_owner_cannot_be_removed() {
    let app = build(proxy(), false, None, true).await;
    let workspace = json!({"templateName": "tre-workspace-base", "resourceType": "workspace",
        "properties": {"display_name": "Genomics", "description": "Sequencing data"}});
    let (_, body) =
        call(&app.router, as_user("admin", "", "POST", "/api/resources", Some(workspace))).await;
    let ws = body["operation"]["resourceId"].as_str().unwrap().to_owned();
    let roles = |user: &str| format!("/api/workspaces/{ws}/roles/{user}");
    let owner = || Some(json!({"roles": ["WorkspaceOwner"]}));
    let researcher = || Some(json!({"roles": ["WorkspaceResearcher"]}));
    let (status, _) = call(&app.router, as_user("admin", "", "PUT", &roles("o1"), owner())).await;
    assert_eq!(status, StatusCode::OK);
    for (caller, body) in [("admin", researcher()), ("o1", Some(json!({"roles": []})))] {
        let (status, answer) =
            call(&app.router, as_user(caller, "", "PUT", &roles("o1"), body)).await;
        assert_eq!(status, StatusCode::CONFLICT, "{caller}: {answer}");
        assert_error_shape(&answer);
    }
    let (_, answer) = call(&app.router, as_user("o1", "", "GET", &roles("o1"), None)).await;
    assert_eq!(answer["roles"], json!(["WorkspaceOwner"]));
    let (status, _) = call(&app.router, as_user("o1", "", "PUT", &roles("o2"), owner())).await;
    assert_eq!(status, StatusCode::OK);
    let (status, answer) =
        call(&app.router, as_user("o2", "", "PUT", &roles("o1"), researcher())).await;
    assert_eq!(status, StatusCode::OK, "one of two owners steps down: {answer}");
}

/// Asks for resource `body` as `user`, a `TREUser`, who is refused (`why`), then as a
/// `TREAdmin`, who is answered; returns the new resource's id.
async fn create_as_admin_only(router: &Router, user: &str, body: Value, why: &str) -> String {
    let (status, _) =
        call(router, as_user(user, "TREUser", "POST", "/api/resources", Some(body.clone()))).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{why}");
    let (status, body) =
        call(router, as_user("admin", "TREAdmin", "POST", "/api/resources", Some(body))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    body["operation"]["resourceId"].as_str().unwrap().to_owned()
}

/// Ensures that each route class checks its roles: workspaces and shared services need
/// `TREAdmin`; workspace services the workspace's owner; user resources its owner or a
/// researcher; reads any role in the workspace (shared services anyone); lists show
/// only what the caller may see; airlock requests are written by researchers and
/// owners and reviewed by the airlock manager, never by their creator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_class_checks_its_roles() {
    let app = build(proxy(), false, None, true).await;
    let router = &app.router;
    let workspace = json!({"templateName": "tre-workspace-base", "resourceType": "workspace",
        "properties": {"display_name": "Genomics", "description": "Sequencing data"}});
    let firewall =
        json!({"templateName": "tre-shared-service-firewall", "resourceType": "shared-service"});
    let ws =
        create_as_admin_only(router, "outsider", workspace, "a workspace needs TREAdmin").await;
    let fw =
        create_as_admin_only(router, "owner", firewall, "a shared service needs TREAdmin").await;
    for (user, roles) in [
        ("owner", json!(["WorkspaceOwner"])),
        ("researcher", json!(["WorkspaceResearcher"])),
        ("manager", json!(["AirlockManager"])),
        ("both", json!(["WorkspaceResearcher", "AirlockManager"])),
    ] {
        let uri = format!("/api/workspaces/{ws}/roles/{user}");
        let (status, body) =
            call(router, as_user("admin", "TREAdmin", "PUT", &uri, Some(json!({"roles": roles}))))
                .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    // A workspace service: the owner only.
    let service = json!({"templateName": "tre-service-guacamole", "resourceType": "workspace-service",
        "workspaceId": ws, "properties": {"display_name": "Desktops"}});
    let (status, _) =
        call(router, as_user("researcher", "", "POST", "/api/resources", Some(service.clone())))
            .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) =
        call(router, as_user("owner", "", "POST", "/api/resources", Some(service))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let svc = body["operation"]["resourceId"].as_str().unwrap().to_owned();

    // A user resource: the owner or a researcher.
    let mut vms = Vec::new();
    let vm = json!({"templateName": "tre-user-resource-linuxvm", "resourceType": "user-resource",
        "workspaceId": ws, "parentWorkspaceServiceId": svc,
        "properties": {"display_name": "VM 1", "os_image": "Ubuntu 22.04 LTS"}});
    for (user, expected) in [
        ("manager", StatusCode::FORBIDDEN),
        ("outsider", StatusCode::NOT_FOUND),
        ("researcher", StatusCode::ACCEPTED),
        ("owner", StatusCode::ACCEPTED),
    ] {
        let (status, body) =
            call(router, as_user(user, "", "POST", "/api/resources", Some(vm.clone()))).await;
        assert_eq!(status, expected, "{user} creates a user resource: {body}");
        if status == StatusCode::ACCEPTED {
            vms.push(body["operation"]["resourceId"].as_str().unwrap().to_owned());
        }
    }

    // Reads: any role in the workspace; shared services anyone.
    let ws_uri = format!("/api/resources/{ws}");
    for (user, expected) in [
        ("outsider", StatusCode::NOT_FOUND),
        ("manager", StatusCode::OK),
        ("researcher", StatusCode::OK),
    ] {
        let (status, _) = call(router, as_user(user, "", "GET", &ws_uri, None)).await;
        assert_eq!(status, expected, "{user} reads the workspace");
        let (status, _) =
            call(router, as_user(user, "", "GET", &format!("{ws_uri}/operations"), None)).await;
        assert_eq!(status, expected, "{user} reads its operations");
    }
    let (status, _) =
        call(router, as_user("outsider", "", "GET", &format!("/api/resources/{fw}"), None)).await;
    assert_eq!(status, StatusCode::OK);
    let ids = |body: &Value| -> Vec<String> {
        body["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, body) = call(router, as_user("outsider", "", "GET", "/api/resources", None)).await;
    assert_eq!(ids(&body), vec![fw.clone()], "an outsider lists the shared services only");
    // Of the user resources, a researcher lists their own; the owner every one.
    let (_, body) = call(router, as_user("researcher", "", "GET", "/api/resources", None)).await;
    assert_eq!(ids(&body), vec![ws.clone(), fw.clone(), svc.clone(), vms[0].clone()]);
    let (_, body) = call(router, as_user("owner", "", "GET", "/api/resources", None)).await;
    let mut expected = vec![ws.clone(), fw.clone(), svc.clone()];
    expected.extend(vms);
    assert_eq!(ids(&body), expected);

    // Changing a workspace needs TREAdmin, even for its owner.
    let patch = Some(json!({"properties": {"display_name": "Genomics 2"}}));
    let (status, _) = call(router, as_user("owner", "", "PATCH", &ws_uri, patch.clone())).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = call(router, as_user("owner", "", "DELETE", &ws_uri, None)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Airlock: researchers and owners write, the airlock manager reviews.
    let new_request = Some(json!({"workspaceId": ws, "type": "export"}));
    let (status, _) =
        call(router, as_user("manager", "", "POST", "/api/airlock-requests", new_request.clone()))
            .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = call(
        router,
        as_user("researcher", "", "POST", "/api/airlock-requests", new_request.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let request_id = body["airlockRequest"]["id"].as_str().unwrap().to_owned();
    let (status, body) =
        call(router, as_user("both", "", "POST", "/api/airlock-requests", new_request)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let own_request = body["airlockRequest"]["id"].as_str().unwrap().to_owned();
    let review = Some(json!({"reviewDecision": "approved", "decisionExplanation": "fine"}));
    let review_uri = |id: &str| format!("/api/airlock-requests/{id}/review");
    let (status, _) =
        call(router, as_user("researcher", "", "POST", &review_uri(&request_id), review.clone()))
            .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "a researcher cannot review");
    let (status, body) =
        call(router, as_user("both", "", "POST", &review_uri(&own_request), review.clone())).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "nobody reviews their own request");
    assert!(body["detail"].as_str().unwrap().contains("creator"), "{body}");
    // The manager passes authorization; the draft is not in review, so the rules refuse.
    let (status, body) =
        call(router, as_user("manager", "", "POST", &review_uri(&request_id), review)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("illegal_status_change")),
        "{body}"
    );
    let (status, _) = call(
        router,
        as_user("manager", "", "POST", &format!("/api/airlock-requests/{request_id}/submit"), None),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "an airlock manager does not submit");
    let (status, _) = call(
        router,
        as_user("outsider", "", "GET", &format!("/api/airlock-requests/{request_id}"), None),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, body) =
        call(router, as_user("outsider", "", "GET", "/api/airlock-requests", None)).await;
    assert_eq!(body["airlockRequests"], json!([]), "an outsider lists no airlock requests");
    let (_, body) =
        call(router, as_user("manager", "", "GET", "/api/airlock-requests", None)).await;
    assert_eq!(body["airlockRequests"].as_array().unwrap().len(), 2);
}

/// Ensures that a shared service shows a caller without `TREAdmin` only TRE's
/// restricted view (the firewall's rule collections list every workspace's machines),
/// in reads and lists alike, and its operations not at all; the admin sees everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_services_show_non_admins_the_restricted_view() {
    let app = build(proxy(), false, None, true).await;
    let router = &app.router;
    let firewall = json!({"templateName": "tre-shared-service-firewall", "resourceType": "shared-service",
        "properties": {"display_name": "Firewall", "description": "Central firewall",
            "rule_collections": [{"name": "arc_linuxvm_1", "rules": [{"source_addresses": ["10.1.0.4"]}]}]}});
    let (status, body) =
        call(router, as_user("admin", "", "POST", "/api/resources", Some(firewall))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let fw = body["operation"]["resourceId"].as_str().unwrap().to_owned();
    let operation = format!("/api/operations/{}", body["operation"]["id"].as_str().unwrap());
    let uri = format!("/api/resources/{fw}");

    let (status, body) = call(router, as_user("researcher", "", "GET", &uri, None)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let properties = body["resource"]["properties"].as_object().unwrap();
    let mut names: Vec<&str> = properties.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["description", "display_name"], "{body}");
    assert_eq!(body["resource"]["templateName"], "tre-shared-service-firewall");
    let (_, body) = call(router, as_user("researcher", "", "GET", "/api/resources", None)).await;
    let listed = &body["resources"][0]["properties"];
    assert!(listed.get("rule_collections").is_none(), "{body}");
    assert!(listed.get("network_rule_collections").is_none(), "{body}");
    for path in [format!("{uri}/operations"), operation.clone()] {
        let (status, body) = call(router, as_user("researcher", "", "GET", &path, None)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {body}");
    }

    let (_, body) = call(router, as_user("admin", "", "GET", &uri, None)).await;
    assert_eq!(body["resource"]["properties"]["rule_collections"][0]["name"], "arc_linuxvm_1");
    let (_, body) = call(router, as_user("admin", "", "GET", "/api/resources", None)).await;
    assert!(body["resources"][0]["properties"].get("rule_collections").is_some(), "{body}");
    for path in [format!("{uri}/operations"), operation] {
        let (status, body) = call(router, as_user("admin", "", "GET", &path, None)).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
}

/// Ensures that a researcher changes and deletes only their own user resources, while
/// the workspace's owner manages every one of them (TRE's rule).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn researchers_change_only_their_own_user_resources() {
    let app = build(proxy(), false, None, true).await;
    let router = &app.router;
    let workspace = json!({"templateName": "tre-workspace-base", "resourceType": "workspace",
        "properties": {"display_name": "Genomics", "description": "Sequencing data"}});
    let (_, body) =
        call(router, as_user("admin", "", "POST", "/api/resources", Some(workspace))).await;
    let ws = body["operation"]["resourceId"].as_str().unwrap().to_owned();
    let firewall =
        json!({"templateName": "tre-shared-service-firewall", "resourceType": "shared-service"});
    let (status, body) =
        call(router, as_user("admin", "", "POST", "/api/resources", Some(firewall))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    for (user, role) in [
        ("owner", "WorkspaceOwner"),
        ("ada", "WorkspaceResearcher"),
        ("bob", "WorkspaceResearcher"),
    ] {
        let uri = format!("/api/workspaces/{ws}/roles/{user}");
        let (status, body) =
            call(router, as_user("admin", "", "PUT", &uri, Some(json!({"roles": [role]})))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let service = json!({"templateName": "tre-service-guacamole", "resourceType": "workspace-service",
        "workspaceId": ws, "properties": {"display_name": "Desktops"}});
    let (_, body) =
        call(router, as_user("owner", "", "POST", "/api/resources", Some(service))).await;
    let svc = body["operation"]["resourceId"].as_str().unwrap().to_owned();
    let vm = json!({"templateName": "tre-user-resource-linuxvm", "resourceType": "user-resource",
        "workspaceId": ws, "parentWorkspaceServiceId": svc,
        "properties": {"display_name": "Ada's VM", "os_image": "Ubuntu 22.04 LTS"}});
    let (status, body) = call(router, as_user("ada", "", "POST", "/api/resources", Some(vm))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let uri = format!("/api/resources/{}", body["operation"]["resourceId"].as_str().unwrap());

    let patch = Some(json!({"properties": {"display_name": "Bob's now"}}));
    for (method, path, body) in [
        ("PATCH", uri.clone(), patch.clone()),
        ("POST", format!("{uri}/actions/stop"), None),
        ("DELETE", uri.clone(), None),
    ] {
        let (status, answer) = call(router, as_user("bob", "", method, &path, body)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "bob {method} {path}: {answer}");
    }
    let (status, body) = call(router, as_user("owner", "", "GET", &uri, None)).await;
    assert_eq!(body["resource"]["properties"]["display_name"], "Ada's VM", "{status} {body}");
    // Its owner and the workspace's owner may; each change waits for the one before.
    let (status, body) = call(router, as_user("ada", "", "PATCH", &uri, patch)).await;
    assert_ne!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = call(router, as_user("owner", "", "DELETE", &uri, None)).await;
    assert_ne!(status, StatusCode::FORBIDDEN, "{body}");
}

/// Ensures that bad bodies get the JSON error shape: malformed JSON 400, unknown or
/// wrong fields 422, a 2 MiB body 413, a missing content type 415.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_get_json_errors() {
    let app = app(None, None).await;
    let malformed = Request::builder()
        .method("POST")
        .uri("/api/resources")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{\"templateName\": "))
        .unwrap();
    let (status, body) = call(&app.router, malformed).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error_shape(&body);
    assert_eq!(body["error"], "malformed_json");

    let unknown = json!({"templateName": "tre-shared-service-firewall", "resourceType": "shared-service", "colour": "red"});
    let (status, body) = call(&app.router, request("POST", "/api/resources", Some(unknown))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_error_shape(&body);
    assert!(body["detail"].as_str().unwrap().contains("colour"), "{body}");

    let wrong_type =
        json!({"templateName": "tre-shared-service-firewall", "resourceType": "spaceship"});
    let (status, body) =
        call(&app.router, request("POST", "/api/resources", Some(wrong_type))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_error_shape(&body);

    let huge = "x".repeat(2 << 20);
    let big = Request::builder()
        .method("POST")
        .uri("/api/resources")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(format!("{{\"templateName\": \"{huge}\"}}")))
        .unwrap();
    let (status, body) = call(&app.router, big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_error_shape(&body);

    let no_type =
        Request::builder().method("POST").uri("/api/resources").body(Body::from("{}")).unwrap();
    let (status, body) = call(&app.router, no_type).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_error_shape(&body);

    let missing_template = json!({"templateName": "tre-nothing", "resourceType": "workspace"});
    let (status, body) =
        call(&app.router, request("POST", "/api/resources", Some(missing_template))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error_shape(&body);
}

/// Ensures that unknown routes, unknown records and wrong methods get the JSON error
/// shape too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_records_and_methods_get_json_errors() {
    let app = app(None, None).await;
    let (status, body) = call(&app.router, request("GET", "/api/nothing", None)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error_shape(&body);
    let (status, body) =
        call(&app.router, request("GET", "/api/resources/does-not-exist", None)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error_shape(&body);
    let (status, body) = call(&app.router, request("PUT", "/api/resources", None)).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_error_shape(&body);
    let (status, body) = call(&app.router, request("GET", "/api/resources?limit=abc", None)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error_shape(&body);
    let (status, body) = call(&app.router, request("GET", "/api/resources?cursor=zzz", None)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error_shape(&body);
}

/// Ensures that approving a draft airlock request is refused with TRE's message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approving_a_draft_is_illegal() {
    let app = app(None, None).await;
    let workspace = json!({"templateName": "tre-workspace-base", "resourceType": "workspace",
        "properties": {"display_name": "W", "description": "D"}});
    let (_, body) = call(&app.router, request("POST", "/api/resources", Some(workspace))).await;
    let workspace_id = body["operation"]["resourceId"].as_str().unwrap().to_owned();
    let (status, body) = call(
        &app.router,
        request(
            "POST",
            "/api/airlock-requests",
            Some(json!({"workspaceId": workspace_id, "type": "import"})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["airlockRequest"]["id"].as_str().unwrap().to_owned();
    let review = json!({"reviewDecision": "approved", "decisionExplanation": "fine"});
    let (status, body) = call(
        &app.router,
        request("POST", &format!("/api/airlock-requests/{id}/review"), Some(review)),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error_shape(&body);
    assert_eq!(body["detail"], "Airlock request status change was illegal");
}

/// Ensures that list routes are paged with `limit` and an opaque `cursor`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_are_paged() {
    let app = app(None, None).await;
    for name in ["A", "B", "C"] {
        let body = json!({"templateName": "tre-workspace-base", "resourceType": "workspace",
            "properties": {"display_name": name, "description": "D"}});
        let (status, _) = call(&app.router, request("POST", "/api/resources", Some(body))).await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    let (_, first) = call(&app.router, request("GET", "/api/resources?limit=2", None)).await;
    assert_eq!(first["resources"].as_array().unwrap().len(), 2);
    let cursor = first["nextCursor"].as_str().unwrap();
    let (_, second) =
        call(&app.router, request("GET", &format!("/api/resources?limit=2&cursor={cursor}"), None))
            .await;
    assert_eq!(second["resources"].as_array().unwrap().len(), 1);
    assert!(second.get("nextCursor").is_none(), "{second}");
    let names: Vec<_> = first["resources"]
        .as_array()
        .unwrap()
        .iter()
        .chain(second["resources"].as_array().unwrap())
        .map(|r| r["properties"]["display_name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["A", "B", "C"]);
    let (_, filtered) =
        call(&app.router, request("GET", "/api/resources?resourceType=shared-service", None)).await;
    assert!(filtered["resources"].as_array().unwrap().is_empty());
}

/// Ensures that the probes follow the workers: all running → 200 and `/health` all
/// OK; a failed updater → `/livez` and `/readyz` 503 and `/health` naming it Not OK,
/// with its error, still answering 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_follow_worker_health() {
    let healthy = app(None, None).await;
    for path in ["/livez", "/readyz", "/health", "/api/health", "/api/workers"] {
        let (status, body) = call(&healthy.router, request("GET", path, None)).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
    let (_, health) = call(&healthy.router, request("GET", "/health", None)).await;
    let services: Vec<_> = health["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (s["service"].as_str().unwrap().to_owned(), s["status"].as_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(
        services,
        [
            ("Database".to_owned(), "OK".to_owned()),
            ("Message Transport".to_owned(), "OK".to_owned()),
            ("Deployment Status Updater".to_owned(), "OK".to_owned()),
            ("Airlock Status Updater".to_owned(), "OK".to_owned()),
            ("Outbox".to_owned(), "OK".to_owned()),
        ]
    );

    let broken = app(None, Some("deployment-status")).await;
    let (status, body) = call(&broken.router, request("GET", "/livez", None)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["reason"].as_str().unwrap().contains("deployment-status"));
    let (status, _) = call(&broken.router, request("GET", "/readyz", None)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, health) = call(&broken.router, request("GET", "/health", None)).await;
    assert_eq!(status, StatusCode::OK);
    let updater = &health["services"][2];
    assert_eq!(updater["service"], "Deployment Status Updater");
    assert_eq!(updater["status"], "Not OK");
    assert!(updater["message"].as_str().unwrap().contains("broken on purpose"), "{updater}");
    let (_, workers) = call(&broken.router, request("GET", "/api/workers", None)).await;
    assert_eq!(workers["live"], false);
    assert_eq!(workers["workers"][2]["state"], "failed");
}

/// Ensures that the probes stay open but show their details (error chains, with host
/// and queue names) only to `TREAdmin`: anonymous and `TREUser` callers get the status
/// alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_show_details_only_to_admins() {
    let broken = build(proxy(), false, Some("deployment-status"), true).await;
    let as_id = |id: Option<&str>, path: &str| {
        let mut request = request("GET", path, None);
        if let Some(id) = id {
            request.headers_mut().insert("x-user-id", id.parse().unwrap());
        }
        request
    };
    for caller in [None, Some("researcher")] {
        for path in ["/health", "/api/health", "/livez", "/readyz"] {
            let (status, body) = call(&broken.router, as_id(caller, path)).await;
            assert_ne!(status, StatusCode::UNAUTHORIZED, "{path} stays open");
            let text = body.to_string();
            assert!(!text.contains("broken on purpose"), "{caller:?} {path}: {text}");
            assert!(!text.contains("deployment-status"), "{caller:?} {path}: {text}");
        }
        let (_, health) = call(&broken.router, as_id(caller, "/health")).await;
        assert_eq!(health["services"][2]["status"], "Not OK", "the status is shown");
        let (status, body) = call(&broken.router, as_id(caller, "/livez")).await;
        assert_eq!((status, body), (StatusCode::SERVICE_UNAVAILABLE, json!({"status": "failed"})));
    }
    let (_, health) = call(&broken.router, as_id(Some("admin"), "/health")).await;
    assert!(health["services"][2]["message"].as_str().unwrap().contains("broken on purpose"));
    let (_, body) = call(&broken.router, as_id(Some("admin"), "/readyz")).await;
    assert!(body["reason"].as_str().unwrap().contains("deployment-status"), "{body}");
}

/// Ensures that until the database is migrated, the routes that need it answer 503
/// `unavailable` in the JSON error shape with a `Retry-After`, while `/livez` answers
/// 200 and `/readyz` 503 naming the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmigrated_database_answers_503_with_retry_after() {
    let app = build(Authentication::none(), false, None, false).await;
    for (method, path) in [
        ("GET", "/api/resources"),
        ("GET", "/api/operations/00000000-0000-4000-8000-000000000000"),
        ("POST", "/api/airlock-requests/00000000-0000-4000-8000-000000000000/submit"),
    ] {
        let response = app.router.clone().oneshot(request(method, path, None)).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "{method} {path}");
        let retry_after = response.headers().get(header::RETRY_AFTER).cloned();
        assert_eq!(
            retry_after.as_ref().and_then(|v| v.to_str().ok()),
            Some("1"),
            "{method} {path}"
        );
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        assert_error_shape(&body);
        assert_eq!(body["error"], "unavailable", "{body}");
        assert!(body["detail"].as_str().unwrap().contains("not ready"), "{body}");
    }
    let (status, body) = call(&app.router, request("GET", "/livez", None)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = call(&app.router, request("GET", "/readyz", None)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["reason"].as_str().unwrap().contains("database"), "{body}");
}

/// Ensures the method names of [`ROUTES`] are real HTTP methods.
#[test]
fn route_table_uses_http_methods() {
    for (method, _) in ROUTES {
        assert!(method.parse::<Method>().is_ok(), "{method}");
    }
}

/// Ensures that the operator routes cannot be reached by another spelling of their
/// path (percent-encoded, a trailing or doubled slash, other letter case) by a caller
/// without `TREAdmin`: the role check and the router agree on what the path is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_routes_have_no_other_spelling() {
    let app = build(proxy(), false, None, true).await;
    for path in [
        "/api/worker%73",
        "/api/%77orkers",
        "/metric%73",
        "/api/workers/",
        "//api/workers",
        "/api//workers",
        "/API/workers",
        "/Metrics",
        "/api/./workers",
        "/api/x/../workers",
    ] {
        let (status, body) = call(&app.router, as_user("u-1", "", "GET", path, None)).await;
        assert!(
            status == StatusCode::FORBIDDEN || status == StatusCode::NOT_FOUND,
            "{path}: {status} {body}"
        );
        assert!(body.get("workers").is_none(), "{path}: {body}");
    }
}

/// Ensures that a user resource naming, as its parent, a workspace service of a
/// workspace the caller cannot see answers exactly as one naming a service that does
/// not exist: the error must not tell the two apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_in_an_unseen_workspace_looks_missing() {
    let app = build(proxy(), false, None, true).await;
    let router = &app.router;
    let mut workspaces = Vec::new();
    for name in ["Mine", "Theirs"] {
        let workspace = json!({"templateName": "tre-workspace-base", "resourceType": "workspace",
            "properties": {"display_name": name, "description": "d"}});
        let (status, body) =
            call(router, as_user("admin", "", "POST", "/api/resources", Some(workspace))).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        workspaces.push(body["operation"]["resourceId"].as_str().unwrap().to_owned());
    }
    let (mine, theirs) = (&workspaces[0], &workspaces[1]);
    let uri = format!("/api/workspaces/{mine}/roles/ada");
    let (status, _) = call(
        router,
        as_user("admin", "", "PUT", &uri, Some(json!({"roles": ["WorkspaceResearcher"]}))),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let service = json!({"templateName": "tre-service-guacamole", "resourceType": "workspace-service",
        "workspaceId": theirs, "properties": {"display_name": "Desktops"}});
    let (status, body) =
        call(router, as_user("admin", "", "POST", "/api/resources", Some(service))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let secret_service = body["operation"]["resourceId"].as_str().unwrap().to_owned();

    let missing = "00000000-0000-4000-8000-000000000000";
    let vm = |parent: &str| {
        json!({"templateName": "tre-user-resource-linuxvm", "resourceType": "user-resource",
            "workspaceId": mine, "parentWorkspaceServiceId": parent,
            "properties": {"display_name": "VM", "os_image": "Ubuntu 22.04 LTS"}})
    };
    let (status, hidden) =
        call(router, as_user("ada", "", "POST", "/api/resources", Some(vm(&secret_service)))).await;
    assert!(status.is_client_error(), "{status} {hidden}");
    let (absent_status, absent) =
        call(router, as_user("ada", "", "POST", "/api/resources", Some(vm(missing)))).await;
    assert_eq!(status, absent_status, "{hidden} vs {absent}");
    assert_eq!(
        hidden.to_string().replace(&secret_service, missing),
        absent.to_string(),
        "a service of another workspace is told apart from a missing one"
    );
}

/// A request to create a workspace whose body holds it in the handler until `release`
/// is sent: the handler waits for the body, holding its turn of the load limit
/// meanwhile. The receiver hears when the handler started reading the body, that is,
/// when the request holds its turn.
fn held_create(
    release: tokio::sync::oneshot::Receiver<()>,
) -> (Request<Body>, tokio::sync::oneshot::Receiver<()>) {
    let body = json!({"templateName": "tre-workspace-base", "resourceType": "workspace",
        "properties": {"display_name": "Held", "description": "D"}})
    .to_string();
    let (started, started_rx) = tokio::sync::oneshot::channel();
    let chunks = futures::stream::once(async move {
        let _ = started.send(());
        let _ = release.await;
        Ok::<_, std::convert::Infallible>(body)
    });
    let request = Request::builder()
        .method("POST")
        .uri("/api/resources")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(chunks))
        .unwrap();
    (request, started_rx)
}

/// Ensures that a request that finds every turn taken, and no turn free within the queue
/// timeout, is shed with 503 `overloaded`, `Retry-After` and the error shape, while the
/// probes and `/metrics` answer at once; and that the API serves again once the turn
/// is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_api_sheds_requests_but_never_the_probes() {
    let load = LoadLimit { max_concurrency: 1, queue_timeout: Duration::ZERO };
    let app = build_with_load(Authentication::none(), false, None, true, load).await;
    let (release, released) = tokio::sync::oneshot::channel();
    let (held, holds_its_turn) = held_create(released);
    let held = tokio::spawn(app.router.clone().oneshot(held));
    holds_its_turn.await.unwrap();
    let shed = app.router.clone().oneshot(request("GET", "/api/templates", None)).await.unwrap();
    assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(shed.headers()[header::RETRY_AFTER], "1");
    let bytes = shed.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    assert_error_shape(&body);
    assert_eq!(body["error"], "overloaded");
    for (method, path) in [("GET", "/api/resources"), ("POST", "/api/airlock-requests")] {
        let (status, body) = call(&app.router, request(method, path, None)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{method} {path}: {body}");
    }
    for path in ["/livez", "/readyz", "/health", "/api/health", "/metrics"] {
        let (status, body) = call(&app.router, request("GET", path, None)).await;
        assert_eq!(status, StatusCode::OK, "{path} while the API is busy: {body}");
    }
    release.send(()).unwrap();
    let created = held.await.unwrap().unwrap();
    assert_eq!(created.status(), StatusCode::ACCEPTED);
    let (status, body) = call(&app.router, request("GET", "/api/resources", None)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["resources"].as_array().unwrap().len(), 1);
}

/// Ensures that `/health`, which anyone may call and which is never shed, does not draw
/// on the HTTP pool outside the load limit: with every turn taken (and, here, every
/// connection of the HTTP pool too), it answers 200 without queuing for a connection,
/// its outbox entry saying that it was not counted. Otherwise a flood of `/health`
/// calls would hold the connections that the requests holding turns wait for, and the
/// pool, not the limit, would be what requests queue for. Once a turn is free, it
/// counts again. On PostgreSQL, where a transaction holds the pool's one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_does_not_queue_for_the_pool_behind_a_busy_api() {
    let Some(db) = support::TestDb::postgres_with("health_outside_the_limit", |url| {
        support::options(url).with_max_connections(1).with_acquire_timeout(Duration::from_secs(2))
    })
    .await
    else {
        return;
    };
    let store = db.store.clone();
    let load = LoadLimit { max_concurrency: 1, queue_timeout: Duration::ZERO };
    let app = build_on(db, Authentication::none(), false, None, true, load).await;
    let outbox_entry = |body: &Value| {
        body["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|service| service["service"] == "Outbox")
            .cloned()
            .unwrap()
    };
    let (release, released) = tokio::sync::oneshot::channel();
    let (held, holds_its_turn) = held_garbage(released);
    let held = tokio::spawn(app.router.clone().oneshot(held));
    holds_its_turn.await.unwrap();
    let connection = store.begin().await.unwrap();
    for path in ["/health", "/api/health"] {
        let (status, body) = call(&app.router, request("GET", path, None)).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        let outbox = outbox_entry(&body);
        let message = outbox["message"].as_str().unwrap();
        assert_eq!(outbox["status"], "Not OK", "{path}: {body}");
        assert!(!message.contains("database busy"), "{path} queued for the pool: {message}");
        assert!(message.contains("not counted"), "{path}: {message}");
    }
    drop(connection);
    release.send(()).unwrap();
    assert_eq!(held.await.unwrap().unwrap().status(), StatusCode::BAD_REQUEST);
    let (status, body) = call(&app.router, request("GET", "/health", None)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(outbox_entry(&body)["status"], "OK", "{body}");
}

/// Ensures that a request whose client goes away (or that times out) keeps its turn of
/// the load limit until its handler has finished with the database. Dropping a request
/// that waits in PostgreSQL (here for a row lock) does not free its connection: the pool
/// takes it back only once the statement has ended. A turn freed at the drop would let
/// the next request in to wait for that connection, in the pool, up to the acquire
/// timeout, and fail as `busy`: turns would no longer bound connections. With the turn
/// kept, the next request is shed at once (`overloaded`), and served once the lock is
/// gone and the first request has finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_request_keeps_its_turn_until_its_handler_ends() {
    use sqlx::{AnyConnection, Connection, Executor, Row};
    let Some(db) = support::TestDb::postgres_with("dropped_request_keeps_its_turn", |url| {
        support::options(url).with_max_connections(1).with_acquire_timeout(Duration::from_secs(2))
    })
    .await
    else {
        return;
    };
    let url = db.url();
    let registry = support::templates();
    let workspace = support::workspace(&db.store, &registry).await;
    let load = LoadLimit { max_concurrency: 1, queue_timeout: Duration::ZERO };
    let app = build_on(db, Authentication::none(), false, None, true, load).await;
    // Lock the workspace's row, as a worker's transaction would.
    let mut locker = AnyConnection::connect(&url).await.unwrap();
    locker.execute("BEGIN").await.unwrap();
    sqlx::query("SELECT id FROM resources WHERE id = $1 FOR UPDATE")
        .bind(workspace.id.clone())
        .fetch_one(&mut locker)
        .await
        .unwrap();
    let upgrade = request(
        "PATCH",
        &format!("/api/resources/{}", workspace.id),
        Some(json!({"properties": {}})),
    );
    let waiting = tokio::spawn(app.router.clone().oneshot(upgrade));
    // Until the upgrade waits for the lock.
    let mut blocked = 0;
    for _ in 0..500 {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM pg_stat_activity WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))",
        )
        .fetch_one(&mut locker)
        .await
        .unwrap();
        blocked = row.try_get::<i64, _>("n").unwrap();
        if blocked > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(blocked, 1, "the upgrade waits for the row lock");
    // Its client goes away.
    waiting.abort();
    assert!(waiting.await.unwrap_err().is_cancelled());
    let (status, body) = call(&app.router, request("GET", "/api/resources", None)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "overloaded", "a freed turn sent the request to wait in the pool");
    locker.execute("ROLLBACK").await.unwrap();
    let mut served = None;
    for _ in 0..500 {
        let (status, body) = call(&app.router, request("GET", "/api/resources", None)).await;
        if status == StatusCode::OK {
            served = Some(body);
            break;
        }
        assert_eq!(body["error"], "overloaded", "{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served.is_some(), "served again once the dropped request has finished");
}

/// A request whose body holds it in the handler until `release` is sent, and is then
/// not JSON: it holds its turn of the load limit meanwhile and touches no database.
/// The receiver hears when it holds its turn.
fn held_garbage(
    release: tokio::sync::oneshot::Receiver<()>,
) -> (Request<Body>, tokio::sync::oneshot::Receiver<()>) {
    let (started, started_rx) = tokio::sync::oneshot::channel();
    let chunks = futures::stream::once(async move {
        let _ = started.send(());
        let _ = release.await;
        Ok::<_, std::convert::Infallible>("not json")
    });
    let request = Request::builder()
        .method("POST")
        .uri("/api/resources")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(chunks))
        .unwrap();
    (request, started_rx)
}

/// Ensures that a request that finds every turn taken waits for one up to the queue
/// timeout: served when the turn comes free in time, shed with 503 and `Retry-After`
/// when it does not. Paused time; the routes involved touch no database.
#[tokio::test]
async fn a_request_waits_for_a_turn_up_to_the_queue_timeout() {
    let load = LoadLimit { max_concurrency: 1, queue_timeout: Duration::from_secs(1) };
    let app = build_with_load(Authentication::none(), false, None, true, load).await;
    tokio::time::pause();
    let templates = || {
        let router = app.router.clone();
        tokio::spawn(async move { call(&router, request("GET", "/api/templates", None)).await })
    };

    let (release, released) = tokio::sync::oneshot::channel();
    let (held, holds_its_turn) = held_garbage(released);
    let held = tokio::spawn(app.router.clone().oneshot(held));
    holds_its_turn.await.unwrap();
    let waiting = templates();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "answered while the only turn was taken");
    release.send(()).unwrap();
    assert_eq!(held.await.unwrap().unwrap().status(), StatusCode::BAD_REQUEST);
    let (status, body) = waiting.await.unwrap();
    assert_eq!(status, StatusCode::OK, "served once the turn came free: {body}");

    let (release, released) = tokio::sync::oneshot::channel();
    let (held, holds_its_turn) = held_garbage(released);
    let held = tokio::spawn(app.router.clone().oneshot(held));
    holds_its_turn.await.unwrap();
    let (status, body) = templates().await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "overloaded");
    release.send(()).unwrap();
    assert_eq!(held.await.unwrap().unwrap().status(), StatusCode::BAD_REQUEST);
}

/// Ensures that a resource's operations and the templates are paged like the other
/// lists: `limit`, `nextCursor`, the same cursor errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_and_templates_are_paged() {
    let app = app(None, None).await;
    let workspace = json!({"templateName": "tre-workspace-base", "resourceType": "workspace",
        "properties": {"display_name": "W", "description": "D"}});
    let (_, body) = call(&app.router, request("POST", "/api/resources", Some(workspace))).await;
    let id = body["operation"]["resourceId"].as_str().unwrap().to_owned();
    let mut operation_ids = vec![body["operation"]["id"].as_str().unwrap().to_owned()];
    for name in ["W2", "W3"] {
        support::set_status(&app._db.store, &id, steward_api::domain::Status::Deployed).await;
        let patch = json!({"properties": {"display_name": name}});
        let (status, body) =
            call(&app.router, request("PATCH", &format!("/api/resources/{id}"), Some(patch))).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        operation_ids.push(body["operation"]["id"].as_str().unwrap().to_owned());
    }
    let mut listed = Vec::new();
    let mut uri = format!("/api/resources/{id}/operations?limit=2");
    loop {
        let (status, page) = call(&app.router, request("GET", &uri, None)).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let operations = page["operations"].as_array().unwrap();
        assert!(operations.len() <= 2, "{page}");
        listed.extend(operations.iter().map(|op| op["id"].as_str().unwrap().to_owned()));
        match page["nextCursor"].as_str() {
            Some(cursor) => uri = format!("/api/resources/{id}/operations?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(listed, operation_ids, "every operation once, oldest first");
    let (status, body) = call(
        &app.router,
        request("GET", &format!("/api/resources/{id}/operations?cursor=x"), None),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error_shape(&body);

    let (_, all) = call(&app.router, request("GET", "/api/templates", None)).await;
    let all: Vec<_> =
        all["templates"].as_array().unwrap().iter().map(|t| t["name"].clone()).collect();
    assert!(all.len() > 2, "{all:?}");
    let (_, first) = call(&app.router, request("GET", "/api/templates?limit=2", None)).await;
    let cursor = first["nextCursor"].as_str().unwrap();
    let (_, rest) = call(
        &app.router,
        request("GET", &format!("/api/templates?limit=500&cursor={cursor}"), None),
    )
    .await;
    assert!(rest.get("nextCursor").is_none(), "{rest}");
    let paged: Vec<_> = first["templates"]
        .as_array()
        .unwrap()
        .iter()
        .chain(rest["templates"].as_array().unwrap())
        .map(|t| t["name"].clone())
        .collect();
    assert_eq!(paged, all);
    let (status, body) = call(&app.router, request("GET", "/api/templates?limit=0", None)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error_shape(&body);
}

/// Ensures that every list route documents the paging parameters in the OpenAPI
/// document.
#[test]
fn every_list_route_documents_its_paging() {
    let document = serde_json::to_value(openapi()).unwrap();
    for path in [
        "/api/resources",
        "/api/resources/{id}/operations",
        "/api/airlock-requests",
        "/api/templates",
    ] {
        let parameters = document["paths"][path]["get"]["parameters"].as_array().unwrap();
        let names: Vec<_> = parameters.iter().map(|p| p["name"].as_str().unwrap()).collect();
        assert!(names.contains(&"limit") && names.contains(&"cursor"), "{path}: {names:?}");
    }
}

/// Ensures that a probe's 503 is not logged as an error, and that repeated 503s of one
/// probe are logged once, not once per call: an orchestrator probes every few seconds.
#[tokio::test]
async fn probe_503s_are_logged_once_per_change_and_not_as_errors() {
    let logs = support::Logs::default();
    let _guard = logs.install();
    let app = app(None, Some("deployment-status")).await;
    for _ in 0..3 {
        for path in ["/livez", "/readyz"] {
            let (status, body) = call(&app.router, request("GET", path, None)).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}: {body}");
        }
    }
    let events = logs.all_events();
    let errors: Vec<_> = events
        .iter()
        .filter(|e| e.level == tracing::Level::ERROR && e.target != "steward_core::supervisor")
        .collect();
    assert!(errors.is_empty(), "a probe's 503 logged as an error: {errors:#?}");
    for probe in ["livez", "readyz"] {
        let logged: Vec<_> =
            events.iter().filter(|e| e.fields.get("probe").is_some_and(|p| p == probe)).collect();
        assert_eq!(logged.len(), 1, "{probe}: {logged:#?}");
        assert!(logged[0].message.contains("503"), "{logged:#?}");
        assert_ne!(logged[0].level, tracing::Level::ERROR, "{logged:#?}");
    }
}
