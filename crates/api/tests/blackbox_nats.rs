//! Black-box tests of the `steward-api` binary on NATS JetStream: the binary runs with
//! `STEWARD_TRANSPORT=nats` on the local server (`STEWARD_NATS_URL`, else
//! `nats://127.0.0.1:4222`) and a temporary SQLite database; the test publishes with a
//! plain async-nats client, as the publisher contract in `docs/nats.md` says, and talks
//! to the service over HTTP and with signals.
//!
//! Every test uses queues (streams) of its own, named uniquely, and deletes them when it
//! ends, also when it fails. Without a reachable server each test prints one `skipped`
//! line and passes, except with `CI=true`, where it fails.

#![cfg(feature = "nats")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod process;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{AckPolicy, pull};
use futures::StreamExt;
use process::{Api, QueueNames, assert_all_handled, handled_messages};
use serde_json::{Value, json};
use steward_nats::{Nats, NatsBuilder};

/// The server the tests use: `STEWARD_NATS_URL`, else the local default.
fn server_url() -> String {
    std::env::var("STEWARD_NATS_URL").unwrap_or_else(|_| steward_nats::DEFAULT_URL.to_owned())
}

/// Whether the server accepts TCP connections (see [`process::reachable`]).
async fn server_available(test: &str) -> bool {
    let url = server_url();
    let address = url.split("://").nth(1).unwrap_or(&url).rsplit('@').next().unwrap_or("");
    process::reachable(test, "NATS", address).await
}

/// The five queues of one test, uniquely named; dropping this deletes their streams.
struct Queues {
    names: QueueNames,
    /// For reading dead letters and deleting the streams (it declares nothing).
    nats: Nats,
}

impl std::ops::Deref for Queues {
    type Target = QueueNames;

    fn deref(&self) -> &QueueNames {
        &self.names
    }
}

impl Queues {
    fn new(test: &str) -> Queues {
        let names = QueueNames::new(test);
        let nats = NatsBuilder::new()
            .with_url(server_url())
            .with_connection_name("steward-test")
            .with_publish_queue(&names.deployment_status)
            .with_publish_queue(&names.step_result)
            .with_publish_queue(&names.resource_request)
            .with_publish_queue(&names.airlock_status_changed)
            .with_publish_queue(&names.airlock_notification)
            .build()
            .unwrap();
        Queues { names, nats }
    }

    /// The environment that puts the service on NATS and these queues.
    fn env(&self, simulate: bool) -> Vec<(&'static str, String)> {
        self.names.env(&[
            ("STEWARD_TRANSPORT", "nats".to_owned()),
            ("STEWARD_NATS_URL", server_url()),
            ("STEWARD_SIMULATE_PROCESSORS", simulate.to_string()),
        ])
    }
}

impl Drop for Queues {
    fn drop(&mut self) {
        let nats = self.nats.clone();
        process::clean_up("stream cleanup", async move { nats.delete_topology().await });
    }
}

/// A publisher with a plain async-nats client: no steward code between the test and
/// the server.
struct Publisher {
    jetstream: async_nats::jetstream::Context,
}

impl Publisher {
    async fn connect() -> Publisher {
        let client = async_nats::connect(server_url()).await.unwrap();
        Publisher { jetstream: async_nats::jetstream::new(client) }
    }

    /// Publishes as the contract says and waits for the stream's ack; returns the id.
    async fn publish(
        &self,
        subject: &str,
        body: &[u8],
        session: &str,
        correlation: &str,
    ) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.as_str());
        headers.insert("x-session-id", session);
        headers.insert("x-correlation-id", correlation);
        headers.insert("content-type", "application/json");
        let ack = self
            .jetstream
            .publish_with_headers(subject.to_owned(), headers, body.to_vec().into())
            .await
            .unwrap();
        let ack = ack.await.unwrap();
        assert!(!ack.duplicate, "a fresh id");
        id
    }

    /// Takes the resource requests off `subject` (through a consumer of the test's
    /// own), acking them, until `n` arrived; waits up to 60 s.
    async fn take_requests(&self, stream: &str, subject: &str, n: usize) -> Vec<Value> {
        let stream = self.jetstream.get_stream(stream).await.unwrap();
        let consumer = stream
            .get_or_create_consumer(
                "steward",
                pull::Config {
                    durable_name: Some("steward".to_owned()),
                    filter_subject: subject.to_owned(),
                    ack_policy: AckPolicy::Explicit,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut got = Vec::new();
        while got.len() < n {
            assert!(Instant::now() < deadline, "only {} requests on {subject} in 60 s", got.len());
            let mut batch = consumer
                .batch()
                .max_messages(n - got.len())
                .expires(Duration::from_secs(1))
                .messages()
                .await
                .unwrap();
            while let Some(message) = batch.next().await {
                let message = message.unwrap();
                got.push(serde_json::from_slice(&message.payload).expect("a JSON request"));
                message.double_ack().await.unwrap();
            }
        }
        got
    }

    /// The messages still in `stream`.
    async fn depth(&self, stream: &str) -> u64 {
        let mut stream = self.jetstream.get_stream(stream).await.unwrap();
        stream.info().await.unwrap().state.messages
    }

    /// Waits up to 30 s until `stream` holds no message.
    async fn wait_drained(&self, stream: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.depth(stream).await > 0 {
            assert!(Instant::now() < deadline, "{stream} not drained");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A TRE deployment-status body answering `request`, with an address space unique
/// to `n`.
fn status_body(request: &Value, status: &str, n: usize) -> Vec<u8> {
    let space = format!("10.{}.{}.0/24", 100 + n / 250, n % 250);
    let outputs = json!([{"name": "address_spaces", "value": [space], "type": "string"}]);
    process::status_update(request, status, status, outputs).into_bytes()
}

/// Ensures that on NATS a resource created over HTTP reaches `deployed` through the
/// built-in simulated processors, with every queue drained and nothing dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_reaches_deployed_through_the_simulators() {
    if !server_available("resource_reaches_deployed_through_the_simulators").await {
        return;
    }
    let queues = Queues::new("simulated");
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(dir.path(), &queues.env(true));
    api.ready().await;

    let (resource_id, operation_id) = api.install_workspace("Genomics").await;
    let deployed = api.operation_reaches(&operation_id, "deployed").await;
    assert_eq!(deployed["steps"][0]["status"], "deployed", "{deployed:#}");
    let resource = api.get(&format!("/api/resources/{resource_id}")).await["resource"].clone();
    assert_eq!(resource["deploymentStatus"], "deployed", "{resource:#}");
    let worker = api.worker_counts("deployment-status", "completed", 2).await;
    assert_eq!(worker["deadLettered"], 0, "{worker}");
    let publisher = Publisher::connect().await;
    for queue in [&queues.deployment_status, &queues.resource_request] {
        publisher.wait_drained(&queues.nats.stream_name(queue)).await;
    }
    assert!(queues.nats.dead_letters(&queues.deployment_status).await.unwrap().is_empty());

    api.stop(Duration::from_secs(30));
}

/// Ensures that a malformed deployment status published with a plain NATS client ends
/// in `<deployment-status queue>.dlq` with reason `MessageFormatIncorrect`, body and
/// headers intact, and leaves the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_status_ends_in_dlq_with_message_format_incorrect() {
    if !server_available("malformed_status_ends_in_dlq_with_message_format_incorrect").await {
        return;
    }
    let queues = Queues::new("malformed");
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(dir.path(), &queues.env(false));
    api.ready().await;
    let publisher = Publisher::connect().await;
    let queue = &queues.deployment_status;

    let not_json: &[u8] = b"Job starting, but this is not JSON";
    let id = publisher.publish(queue, not_json, "session-1", "resource-1").await;

    let deadline = Instant::now() + Duration::from_secs(60);
    let dead = loop {
        let dead = queues.nats.dead_letters(queue).await.unwrap();
        if !dead.is_empty() {
            break dead;
        }
        assert!(Instant::now() < deadline, "nothing in {queue}.dlq");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(dead.len(), 1, "{dead:#?}");
    let letter = &dead[0];
    assert_eq!(letter.reason, "MessageFormatIncorrect", "{letter:#?}");
    assert!(!letter.description.is_empty(), "{letter:#?}");
    assert_eq!(letter.message.id, id);
    assert_eq!(letter.message.body.as_ref(), not_json);
    assert_eq!(letter.message.session_id.as_deref(), Some("session-1"));
    assert_eq!(letter.message.correlation_id.as_deref(), Some("resource-1"));
    let worker = api.worker_counts("deployment-status", "deadLettered", 1).await;
    assert_eq!(worker["state"], "running", "{worker}");
    assert_eq!(publisher.depth(&queues.nats.stream_name(queue)).await, 0, "left the queue");

    api.stop(Duration::from_secs(30));
}

/// Ensures that SIGTERM while a backlog of deployment statuses is being handled exits
/// 0 within the drain timeout + 5 s, and that after a restart every status was handled
/// and every operation reaches `deployed`: nothing lost, nothing dead-lettered.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_statuses_in_flight_loses_nothing() {
    if !server_available("sigterm_with_statuses_in_flight_loses_nothing").await {
        return;
    }
    const RESOURCES: usize = 60;
    let queues = Queues::new("sigterm");
    let dir = tempfile::tempdir().unwrap();
    let drain = Duration::from_secs(5);
    let mut env = queues.env(false);
    env.push(("STEWARD_DRAIN_TIMEOUT", "5s".to_owned()));
    // Each status takes at least 200 ms, so the backlog outlasts the moment between the
    // first completion and the signal on any machine, however fast.
    env.push(("STEWARD_FAULTS", "delay=200ms".to_owned()));
    let api = Api::start(dir.path(), &env);
    api.ready().await;
    let publisher = Publisher::connect().await;
    let queue = &queues.deployment_status;

    let created = api.install_workspaces(RESOURCES).await;
    let request_stream = queues.nats.stream_name(&queues.resource_request);
    let requests =
        publisher.take_requests(&request_stream, &queues.resource_request, RESOURCES).await;
    for request in &requests {
        let operation = request["operationId"].as_str().unwrap();
        assert_eq!(created.get(operation).map(String::as_str), request["id"].as_str());
    }
    // A backlog the service cannot get through before the signal.
    let (status, _, _) = api.terminate(Duration::from_secs(30));
    assert!(status.success(), "exit {status:?} with nothing in flight");
    let mut published = BTreeSet::new();
    for (n, request) in requests.iter().enumerate() {
        let (op, resource) =
            (request["operationId"].as_str().unwrap(), request["id"].as_str().unwrap());
        for status in ["deploying", "deployed"] {
            published.insert(
                publisher.publish(queue, &status_body(request, status, n), op, resource).await,
            );
        }
    }
    let before = Api::interrupted(dir.path(), &env, drain, queue).await;
    assert!(
        before.len() < published.len(),
        "the shutdown came too late to interrupt anything: {} of {} handled",
        before.len(),
        published.len()
    );

    let api = Api::start(dir.path(), &env);
    api.serving().await;
    for request in &requests {
        api.operation_reaches(request["operationId"].as_str().unwrap(), "deployed").await;
    }
    publisher.wait_drained(&queues.nats.stream_name(queue)).await;
    let dead = queues.nats.dead_letters(queue).await.unwrap();
    assert!(dead.is_empty(), "nothing dead-lettered: {dead:#?}");
    let (_, logs) = api.stop(Duration::from_secs(30));
    assert_all_handled(&published, &before, &handled_messages(&logs, queue));
}
