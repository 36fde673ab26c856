//! The `steward-api` binary with OIDC bearer tokens from a local issuer: no token is
//! 401 on reads and writes, spoofed `X-User-*` headers are ignored, a researcher
//! cannot review an airlock request, the workspace's airlock manager can, and nobody
//! reviews their own request.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod idp;
mod process;

use std::time::{Duration, Instant};

use idp::{AUDIENCE, Idp};
use process::{Api, LIMIT};
use reqwest::Method;
use serde_json::{Value, json};

/// A request as the bearer of `token` (none: anonymous), with extra headers.
async fn call(
    api: &Api,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (u16, Option<String>, Value) {
    let mut request = api.client.request(method, format!("{}{path}", api.base));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let challenge =
        response.headers().get("www-authenticate").map(|value| value.to_str().unwrap().to_owned());
    let text = response.text().await.expect("body");
    (status, challenge, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Waits until `path` (read with `token`) has `field` equal to `value`.
async fn reaches(api: &Api, token: &str, path: &str, field: &str, value: &str) -> Value {
    let deadline = Instant::now() + LIMIT;
    loop {
        let (status, _, body) = call(api, Some(token), Method::GET, path, None, &[]).await;
        if status == 200 && body.pointer(field).and_then(Value::as_str) == Some(value) {
            return body;
        }
        assert!(Instant::now() < deadline, "{path} never had {field} = {value}: {status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Creates an export request in `ws` as the bearer of `token`, submits it, and waits
/// until it is in review; returns its id.
async fn request_in_review(api: &Api, token: &str, ws: &str) -> String {
    let body = json!({"workspaceId": ws, "type": "export", "title": "Results"});
    let (status, _, body) =
        call(api, Some(token), Method::POST, "/api/airlock-requests", Some(body), &[]).await;
    assert_eq!(status, 201, "{body}");
    let id = body["airlockRequest"]["id"].as_str().unwrap().to_owned();
    let submit = format!("/api/airlock-requests/{id}/submit");
    let (status, _, body) = call(api, Some(token), Method::POST, &submit, None, &[]).await;
    assert_eq!(status, 200, "{body}");
    reaches(
        api,
        token,
        &format!("/api/airlock-requests/{id}"),
        "/airlockRequest/status",
        "in_review",
    )
    .await;
    id
}

/// Ensures the acceptance of the identity and roles work, end to end through the
/// binary: no token is 401 on reads and writes, spoofed headers are ignored, a
/// researcher cannot review (403), the creator cannot review their own request (403),
/// and the workspace's airlock manager approves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_callers_get_exactly_their_roles() {
    let idp = Idp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(
        dir.path(),
        &[("STEWARD_AUTH_ISSUER", idp.issuer.as_str()), ("STEWARD_AUTH_AUDIENCE", AUDIENCE)],
    );
    let admin = idp.token("admin-oid", &["TREAdmin"]);
    let researcher = idp.token("researcher-oid", &["TREUser"]);
    let manager = idp.token("manager-oid", &["TREUser"]);
    let both = idp.token("both-oid", &["TREUser"]);
    api.answers_ok("/livez").await;
    reaches(&api, &admin, "/readyz", "/status", "ok").await;
    assert!(
        api.logs()
            .iter()
            .any(|line| line.contains("callers are authenticated") && line.contains(&idp.issuer)),
        "{:#?}",
        api.logs()
    );

    // No token: 401 on reads and writes, with the Bearer challenge.
    let workspace = json!({"templateName": "tre-workspace-base", "resourceType": "workspace",
        "properties": {"display_name": "Genomics", "description": "Sequencing data"}});
    for (method, path, body) in [
        (Method::GET, "/api/resources", None),
        (Method::GET, "/api/airlock-requests", None),
        (Method::GET, "/api/workers", None),
        (Method::POST, "/api/resources", Some(workspace.clone())),
    ] {
        let (status, challenge, body) = call(&api, None, method.clone(), path, body, &[]).await;
        assert_eq!(status, 401, "{method} {path}: {body}");
        assert_eq!(challenge.as_deref(), Some("Bearer"), "{method} {path}");
        assert_eq!(body["error"], "unauthorized", "{body}");
    }
    // Spoofed headers alone are no credential, and do not change a token's caller.
    let spoofed = [("x-user-id", "admin-oid"), ("x-user-roles", "TREAdmin")];
    let (status, _, _) =
        call(&api, None, Method::POST, "/api/resources", Some(workspace.clone()), &spoofed).await;
    assert_eq!(status, 401);
    let (status, _, body) = call(
        &api,
        Some(&researcher),
        Method::POST,
        "/api/resources",
        Some(workspace.clone()),
        &spoofed,
    )
    .await;
    assert_eq!(status, 403, "the researcher stays a researcher: {body}");
    // A token of another issuer's key: 401 invalid_token.
    let forged = idp::RsaKey::generate("rsa-1").sign(&idp.claims("admin-oid", &["TREAdmin"]));
    let (status, challenge, _) =
        call(&api, Some(&forged), Method::GET, "/api/resources", None, &[]).await;
    assert_eq!(status, 401);
    assert!(challenge.unwrap().starts_with("Bearer error=\"invalid_token\""));

    // The admin creates a workspace and hands out its roles.
    let (status, _, body) =
        call(&api, Some(&admin), Method::POST, "/api/resources", Some(workspace), &[]).await;
    assert_eq!(status, 202, "{body}");
    let ws = body["operation"]["resourceId"].as_str().unwrap().to_owned();
    let operation = format!("/api/operations/{}", body["operation"]["id"].as_str().unwrap());
    reaches(&api, &admin, &operation, "/operation/status", "deployed").await;
    for (user, roles) in [
        ("researcher-oid", json!(["WorkspaceResearcher"])),
        ("manager-oid", json!(["AirlockManager"])),
        ("both-oid", json!(["WorkspaceResearcher", "AirlockManager"])),
    ] {
        let path = format!("/api/workspaces/{ws}/roles/{user}");
        let (status, _, body) =
            call(&api, Some(&admin), Method::PUT, &path, Some(json!({"roles": roles})), &[]).await;
        assert_eq!(status, 200, "{body}");
    }

    // A researcher's request: the researcher cannot review it, the manager approves it.
    let request = request_in_review(&api, &researcher, &ws).await;
    let path = format!("/api/airlock-requests/{request}");
    let (_, _, body) = call(&api, Some(&researcher), Method::GET, &path, None, &[]).await;
    assert_eq!(body["airlockRequest"]["createdBy"]["id"], "researcher-oid", "{body}");
    let review =
        json!({"reviewDecision": "approved", "decisionExplanation": "No identifiable data"});
    let review_path = format!("{path}/review");
    let (status, _, body) =
        call(&api, Some(&researcher), Method::POST, &review_path, Some(review.clone()), &[]).await;
    assert_eq!(status, 403, "a researcher cannot review: {body}");
    let (status, _, body) = call(
        &api,
        Some(&researcher),
        Method::POST,
        &review_path,
        Some(review.clone()),
        &[("x-user-id", "manager-oid"), ("x-user-roles", "TREAdmin")],
    )
    .await;
    assert_eq!(status, 403, "spoofed headers make nobody a manager: {body}");
    let (status, _, body) =
        call(&api, Some(&manager), Method::POST, &review_path, Some(review.clone()), &[]).await;
    assert_eq!(status, 200, "the airlock manager reviews: {body}");
    reaches(&api, &manager, &path, "/airlockRequest/status", "approved").await;

    // A request of someone who is also an airlock manager: not reviewed by themselves.
    let own = request_in_review(&api, &both, &ws).await;
    let own_review = format!("/api/airlock-requests/{own}/review");
    let (status, _, body) =
        call(&api, Some(&both), Method::POST, &own_review, Some(review.clone()), &[]).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("creator"), "{body}");
    let (status, _, body) =
        call(&api, Some(&manager), Method::POST, &own_review, Some(review), &[]).await;
    assert_eq!(status, 200, "{body}");

    api.stop(Duration::from_secs(30));
}

/// Starts the binary with `args` and `env`, waits until `/livez` answers, stops it,
/// and returns its log.
async fn start_and_stop(args: &[&str], env: &[(&str, &str)]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let mut child = process::command(dir.path(), env).args(args).spawn().expect("start");
    let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (found, listening) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let reader = process::collect_lines(stderr, logs.clone(), "steward-api listening", found);
    let line = listening.recv_timeout(LIMIT).unwrap_or_else(|_| {
        let _ = child.kill();
        panic!("did not start: {:#?}", logs.lock().unwrap())
    });
    let line: Value = serde_json::from_str(&line).unwrap();
    // A wildcard address is reached through the loopback one.
    let base = line["address"].as_str().unwrap().replace("0.0.0.0", "127.0.0.1");
    let deadline = Instant::now() + LIMIT;
    loop {
        match reqwest::get(format!("{base}/livez")).await {
            Ok(response) if response.status() == 200 => break,
            _ => assert!(Instant::now() < deadline, "no /livez: {:#?}", logs.lock().unwrap()),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    process::sigterm(&child);
    let status = process::wait_for_exit(&mut child, Duration::from_secs(30), &logs);
    reader.join().unwrap();
    let logs = logs.lock().unwrap().clone();
    assert!(status.success(), "{status:?}: {logs:#?}");
    logs
}

/// Ensures that with nothing configured on a loopback address the start-up log says
/// every caller is the development admin, that `STEWARD_API_TOKEN` is logged as the
/// development admin's token (never its value), and that `--insecure-no-auth` lets a
/// non-loopback address start without authentication.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_up_log_names_the_authentication_in_effect() {
    let logs = start_and_stop(&[], &[]).await;
    assert!(
        logs.iter().any(|line| line.contains("every caller is the development admin")
            && line.contains("\"WARN\"")),
        "{logs:#?}"
    );

    let logs = start_and_stop(&[], &[("STEWARD_API_TOKEN", "dev-s3cret")]).await;
    assert!(
        logs.iter().any(|line| line.contains("callers are authenticated")
            && line.contains("STEWARD_API_TOKEN as steward-admin (TREAdmin)")),
        "{logs:#?}"
    );
    assert!(!logs.iter().any(|line| line.contains("dev-s3cret")), "{logs:#?}");

    let logs = start_and_stop(&["--insecure-no-auth"], &[("STEWARD_LISTEN", "0.0.0.0:0")]).await;
    assert!(
        logs.iter().any(|line| line.contains("every caller is the development admin")),
        "{logs:#?}"
    );
}

/// Runs the binary with `env` and expects it to refuse to start: exit code 2 and one
/// line on stderr that contains `says`.
fn refuses_to_start(env: &[(&str, &str)], says: &str) {
    let dir = tempfile::tempdir().unwrap();
    let output = process::command(dir.path(), env).output().expect("run steward-api");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{env:?}: {stderr}");
    let lines: Vec<_> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{env:?}: {stderr}");
    assert!(lines[0].contains(says), "{env:?}: {stderr}");
}

/// Ensures that trusting proxy headers is not "authentication" on a non-loopback
/// address: without `STEWARD_PROXY_ONLY_INGRESS` the service refuses to start, with it
/// it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_headers_on_a_public_address_need_an_explicit_opt_in() {
    let public = [("STEWARD_LISTEN", "0.0.0.0:0"), ("STEWARD_TRUST_PROXY_HEADERS", "true")];
    refuses_to_start(&public, "STEWARD_PROXY_ONLY_INGRESS");
    // Another way of authenticating does not make the headers safe either.
    let with_token = [public[0], public[1], ("STEWARD_API_TOKEN", "dev-s3cret")];
    refuses_to_start(&with_token, "STEWARD_PROXY_ONLY_INGRESS");

    // A shared secret the proxy sends is an opt-in too, and is never logged.
    let logs =
        start_and_stop(&[], &[public[0], public[1], ("STEWARD_PROXY_SECRET", "p-s3cret")]).await;
    assert!(!logs.iter().any(|line| line.contains("p-s3cret")), "{logs:#?}");
    let logs =
        start_and_stop(&[], &[public[0], public[1], ("STEWARD_PROXY_ONLY_INGRESS", "true")]).await;
    assert!(
        logs.iter().any(|line| line.contains("callers are authenticated")
            && line.contains("authenticating proxy")),
        "{logs:#?}"
    );
}
