//! A black-box test of the `steward-api` binary on PostgreSQL under an HTTP flood: the
//! workers have database connections of their own and `/readyz` a probe connection, so
//! neither queues behind the requests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod process;
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use process::{Api, LIMIT};
use serde_json::{Value, json};

/// Requests in flight at once.
const FLOOD: usize = 200;

/// `call` until it answers something but 503 (which the flood may cause), within
/// [`LIMIT`].
async fn through_the_flood(
    api: &Api,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let deadline = Instant::now() + LIMIT;
    loop {
        let (status, answer) = api.call(method.clone(), path, body.clone()).await;
        if status != 503 {
            return (status, answer);
        }
        assert!(
            Instant::now() < deadline,
            "{method} {path} answered 503 until the deadline: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Ensures that under a flood of 200 concurrent list requests on PostgreSQL, with an
/// HTTP pool of one connection and an acquire timeout of 100 ms (so the flood exhausts
/// it: most of its requests answer 503 `busy`), the status updaters keep handling
/// messages (a workspace asked for during the flood reaches `deployed` through the
/// simulated resource processor's status updates) and every `/readyz` answers 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_an_http_flood_the_updaters_work_and_readyz_stays_200() {
    let test = "under_an_http_flood_the_updaters_work_and_readyz_stays_200";
    let Some(db) = support::TestDb::postgres(test).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let url = db.url();
    let env = [
        ("STEWARD_DATABASE_URL", url.as_str()),
        ("STEWARD_DATABASE_MAX_CONNECTIONS", "1"),
        ("STEWARD_DATABASE_WORKER_CONNECTIONS", "4"),
        ("STEWARD_DATABASE_ACQUIRE_TIMEOUT", "100ms"),
    ];
    let api = Arc::new(Api::start(dir.path(), &env));
    api.ready().await;

    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let client = reqwest::Client::builder().pool_max_idle_per_host(FLOOD).build().unwrap();
    let flood: Vec<_> = (0..FLOOD)
        .map(|_| {
            let (stop, client) = (stop.clone(), client.clone());
            let (answered, refused) = (answered.clone(), refused.clone());
            let url = format!("{}/api/resources", api.base);
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(response) = client.get(&url).send().await {
                        answered.fetch_add(1, Ordering::SeqCst);
                        if response.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE {
                            refused.fetch_add(1, Ordering::SeqCst);
                        }
                        let _ = response.bytes().await;
                    }
                }
            })
        })
        .collect();
    let probes = {
        let (stop, api) = (stop.clone(), api.clone());
        tokio::spawn(async move {
            let mut answers = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                answers.push(api.call(reqwest::Method::GET, "/readyz", None).await);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            answers
        })
    };

    // The flood is on: wait until it has answered as many requests as it holds.
    let deadline = Instant::now() + LIMIT;
    while answered.load(Ordering::SeqCst) < FLOOD as u64 {
        assert!(Instant::now() < deadline, "the flood never got going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let workspace = json!({"templateName": "tre-workspace-base", "resourceType": "workspace",
        "properties": {"display_name": "Flooded", "description": "Sequencing data"}});
    let (status, created) =
        through_the_flood(&api, reqwest::Method::POST, "/api/resources", Some(workspace)).await;
    assert_eq!(status, 202, "{created}");
    let operation_id = created["operation"]["id"].as_str().unwrap().to_owned();
    let path = format!("/api/operations/{operation_id}");
    let deadline = Instant::now() + LIMIT;
    loop {
        let (status, body) = through_the_flood(&api, reqwest::Method::GET, &path, None).await;
        assert_eq!(status, 200, "{body}");
        if body["operation"]["status"] == "deployed" {
            break;
        }
        assert!(Instant::now() < deadline, "the operation is stuck under the flood: {body:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    stop.store(true, Ordering::SeqCst);
    let probes = probes.await.unwrap();
    for task in flood {
        task.await.unwrap();
    }
    assert!(!probes.is_empty());
    let (answered, refused) = (answered.load(Ordering::SeqCst), refused.load(Ordering::SeqCst));
    for (status, body) in &probes {
        assert_eq!(
            *status, 200,
            "/readyz under the flood ({refused} of {answered} flood requests answered 503): {body}"
        );
    }
    let deployment = api.worker("deployment-status").await;
    assert!(deployment["completed"].as_u64().unwrap() >= 1, "{deployment}");
    drop(api);
    db.finish().await;
}
