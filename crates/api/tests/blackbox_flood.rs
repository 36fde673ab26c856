//! A black-box test of the `steward-api` binary under an HTTP flood, on PostgreSQL
//! (`STEWARD_TEST_POSTGRES_URL`, a schema of its own) with the in-process transport and
//! its simulated processors, like the other PostgreSQL black-box tests: while 200
//! clients list without pause, the status updaters keep handling the simulated
//! processor's deployment-status messages, `/readyz` stays 200, and every request
//! answers, 200 or 503 `overloaded` with `Retry-After`.
//!
//! Skipped, with one line, when PostgreSQL is unreachable and `CI` is not `true`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod process;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use process::Api;
use serde_json::{Value, json};

/// Concurrent listing clients.
const CLIENTS: usize = 200;

/// Rounds each client makes at least, however soon the operations finish.
const MIN_ROUNDS: u64 = 5;

/// Workspaces installed before the flood, so that the lists have something to list.
const BEFORE: usize = 10;

/// Workspaces installed during the flood: their deployment-status messages are
/// delivered and handled while it lasts.
const DURING: usize = 10;

/// How long one request may take before the test calls it hanging: far more than any
/// answer needs, shed or served.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The bound of each phase: the installs before the flood, the operations during it,
/// the end of the flood. Generous: the phases take seconds.
const PHASE_LIMIT: Duration = Duration::from_secs(90);

/// The list routes the clients call in turn.
const LISTS: [&str; 4] = [
    "/api/resources?limit=500",
    "/api/airlock-requests?limit=500",
    "/api/templates?limit=500",
    "/api/resources?limit=50&resourceType=workspace",
];

/// What a flood client saw.
#[derive(Default)]
struct Tally {
    served: AtomicU64,
    shed: AtomicU64,
}

/// A request's answer: its status, its `Retry-After`, its body.
async fn send(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<&Value>,
) -> (u16, Option<String>, Value) {
    let mut request = client.request(method.clone(), url).timeout(REQUEST_TIMEOUT);
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = match request.send().await {
        Ok(response) => response,
        Err(error) => panic!("{method} {url} got no answer: {error}"),
    };
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .map(|value| value.to_str().unwrap().to_owned());
    let text = response.text().await.expect("body");
    (status, retry_after, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Asserts that a 503 is the load shedder's: `overloaded`, the error shape, and a
/// `Retry-After` in whole seconds.
fn assert_shed(what: &str, retry_after: Option<&str>, body: &Value) {
    assert_eq!(body["error"], "overloaded", "{what}: {body}");
    assert!(body["detail"].is_string(), "{what}: {body}");
    let seconds: u64 = retry_after
        .unwrap_or_else(|| panic!("{what}: a 503 without Retry-After: {body}"))
        .parse()
        .unwrap();
    assert!(seconds >= 1, "{what}: Retry-After {seconds}");
}

/// Sends a request until it is served, honouring `Retry-After` when it is shed, as a
/// well-behaved client does; returns the status and body of the first answer that is
/// not a shed.
async fn until_served(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    loop {
        let (status, retry_after, answer) = send(client, method.clone(), url, body).await;
        if status != 503 {
            return (status, answer);
        }
        assert_shed(url, retry_after.as_deref(), &answer);
        let seconds = retry_after.unwrap().parse().unwrap();
        tokio::time::sleep(Duration::from_secs(seconds)).await;
    }
}

/// Asks for workspace `name`; returns its install operation's id.
async fn install(api: &Api, client: &reqwest::Client, name: &str) -> String {
    let body = json!({"templateName": "tre-workspace-base", "resourceType": "workspace",
        "properties": {"display_name": name, "description": "Sequencing data"}});
    let url = format!("{}/api/resources", api.base);
    let (status, created) = until_served(client, reqwest::Method::POST, &url, Some(&body)).await;
    assert_eq!(status, 202, "install {name}: {created}");
    created["operation"]["id"].as_str().unwrap().to_owned()
}

/// Waits until operation `id` is `deployed`, reading it as a client (shed reads are
/// retried after their `Retry-After`).
async fn deployed(api: &Api, client: &reqwest::Client, id: &str) {
    let url = format!("{}/api/operations/{id}", api.base);
    loop {
        let (status, body) = until_served(client, reqwest::Method::GET, &url, None).await;
        assert_eq!(status, 200, "operation {id}: {body}");
        match body["operation"]["status"].as_str() {
            Some("deployed") => return,
            Some("deployment_failed") => panic!("operation {id} failed: {body}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A fresh schema on the test PostgreSQL and its URL, or `None` after a skip line when
/// PostgreSQL is unreachable and `CI` is not `true`. The schema is dropped with the
/// guard.
async fn schema(test: &str) -> Option<(String, DropSchema)> {
    use sqlx::{Connection, Executor};
    sqlx::any::install_default_drivers();
    let admin_url = std::env::var("STEWARD_TEST_POSTGRES_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let connected =
        tokio::time::timeout(Duration::from_secs(10), sqlx::AnyConnection::connect(&admin_url))
            .await;
    let mut admin = match connected {
        Ok(Ok(admin)) => admin,
        failed => {
            let reason = match failed {
                Ok(Err(error)) => error.to_string(),
                _ => "timed out".to_owned(),
            };
            if std::env::var("CI").is_ok_and(|ci| ci == "true") {
                panic!("{test}: PostgreSQL at {admin_url} is unreachable with CI=true: {reason}");
            }
            eprintln!("skipped {test}: PostgreSQL at {admin_url} is unreachable ({reason})");
            return None;
        }
    };
    let schema = format!("steward_flood_{}", uuid::Uuid::new_v4().simple());
    admin.execute(format!("CREATE SCHEMA {schema}").as_str()).await.unwrap();
    admin.close().await.unwrap();
    let separator = if admin_url.contains('?') { '&' } else { '?' };
    let url = format!("{admin_url}{separator}options[search_path]={schema}");
    Some((url, DropSchema { admin_url, schema }))
}

/// Ensures that under a sustained flood of 200 concurrent list requests on PostgreSQL,
/// the deployment-status updater keeps handling the messages of operations started
/// during it (each reaches `deployed` while the flood goes on), `/readyz` answers 200
/// on every probe, and every request is answered, served or shed with 503
/// `overloaded` and `Retry-After`, never left hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn list_flood_neither_starves_the_updaters_nor_fails_readiness() {
    let test = "list_flood_neither_starves_the_updaters_nor_fails_readiness";
    let Some((url, _schema)) = schema(test).await else { return };
    let dir = tempfile::tempdir().unwrap();
    // The default number of turns (the pool's connections) and a short wait for one:
    // 200 clients that never pause cannot all be served within it, so some are shed.
    let api = Arc::new(Api::start(
        dir.path(),
        &[("STEWARD_DATABASE_URL", url.as_str()), ("STEWARD_HTTP_QUEUE_TIMEOUT", "100ms")],
    ));
    api.ready().await;
    let client = reqwest::Client::new();
    let installed = tokio::time::timeout(PHASE_LIMIT, async {
        let mut before = Vec::new();
        for n in 0..BEFORE {
            before.push(install(&api, &client, &format!("Before{n}")).await);
        }
        for id in &before {
            deployed(&api, &client, id).await;
        }
    })
    .await;
    assert!(installed.is_ok(), "the workspaces before the flood: {:#?}", api.logs());

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let flood: Vec<_> = (0..CLIENTS)
        .map(|n| {
            let (api, stop, tally) = (api.clone(), stop.clone(), tally.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut rounds = 0u64;
                while rounds < MIN_ROUNDS || !stop.load(Ordering::Acquire) {
                    let path = LISTS[(n + rounds as usize) % LISTS.len()];
                    let url = format!("{}{path}", api.base);
                    let (status, retry_after, body) =
                        send(&client, reqwest::Method::GET, &url, None).await;
                    match status {
                        200 => tally.served.fetch_add(1, Ordering::Relaxed),
                        503 => {
                            assert_shed(path, retry_after.as_deref(), &body);
                            tally.shed.fetch_add(1, Ordering::Relaxed)
                        }
                        other => panic!("GET {path}: {other} {body}"),
                    };
                    rounds += 1;
                }
                rounds
            })
        })
        .collect();
    let probes = tokio::spawn({
        let (api, stop) = (api.clone(), stop.clone());
        async move {
            let client = reqwest::Client::new();
            let url = format!("{}/readyz", api.base);
            let mut answers = 0u64;
            let mut not_ready = Vec::new();
            loop {
                let (status, _, body) = send(&client, reqwest::Method::GET, &url, None).await;
                if status != 200 {
                    not_ready.push((status, body));
                }
                answers += 1;
                if stop.load(Ordering::Acquire) {
                    break;
                }
            }
            (answers, not_ready)
        }
    });

    // While the flood lasts: new operations, whose deployment-status messages the
    // simulated resource processor delivers, and the updater must handle.
    let during = tokio::time::timeout(PHASE_LIMIT, async {
        // Each installed and followed on its own, as independent clients would.
        let operations = (0..DURING).map(|n| {
            let (api, client) = (&api, &client);
            async move {
                let id = install(api, client, &format!("During{n}")).await;
                deployed(api, client, &id).await;
                id
            }
        });
        futures::future::join_all(operations).await
    })
    .await;
    let flood_was_on = flood.iter().all(|client| !client.is_finished());
    stop.store(true, Ordering::Release);
    let mut rounds = Vec::new();
    for client in flood {
        rounds.push(tokio::time::timeout(PHASE_LIMIT, client).await.unwrap().unwrap());
    }
    let (answers, not_ready) = tokio::time::timeout(PHASE_LIMIT, probes).await.unwrap().unwrap();
    let logs = api.logs();
    let during = during.unwrap_or_else(|_| {
        panic!("operations did not finish during the flood within {PHASE_LIMIT:?}: {logs:#?}")
    });
    assert_eq!(during.len(), DURING);
    assert!(flood_was_on, "a flood client stopped before the operations finished");
    assert!(rounds.iter().all(|&n| n >= MIN_ROUNDS), "{rounds:?}");
    assert!(not_ready.is_empty(), "/readyz not 200 during the flood: {not_ready:#?}");
    assert!(answers > 0, "/readyz was never probed");
    let (served, shed) = (tally.served.load(Ordering::Relaxed), tally.shed.load(Ordering::Relaxed));
    assert!(served > 0, "no list was served during the flood");
    assert!(shed > 0, "{CLIENTS} clients that never pause, yet nothing was shed");
    eprintln!("{test}: {served} lists served, {shed} shed, {answers} /readyz answers, all 200");
    let api = Arc::into_inner(api).expect("the flood is over");
    api.stop(Duration::from_secs(60));
}

/// Drops a test schema when the test ends, passed or failed.
struct DropSchema {
    admin_url: String,
    schema: String,
}

impl Drop for DropSchema {
    fn drop(&mut self) {
        use sqlx::{Connection, Executor};
        let (url, schema) = (self.admin_url.clone(), self.schema.clone());
        process::clean_up("dropping the test schema", async move {
            let mut admin = sqlx::AnyConnection::connect(&url).await?;
            admin.execute(format!("DROP SCHEMA {schema} CASCADE").as_str()).await?;
            admin.close().await
        });
    }
}
