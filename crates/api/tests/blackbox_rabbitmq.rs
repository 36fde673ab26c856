//! Black-box tests of the `steward-api` binary on RabbitMQ: the binary runs with
//! `STEWARD_TRANSPORT=rabbitmq` on the local broker (`STEWARD_RABBITMQ_URL`, else
//! `amqp://guest:guest@127.0.0.1:5672/%2f`) and a temporary SQLite database; the test
//! plays TRE's resource processor with a plain AMQP client (it takes the resource
//! requests off the resource-request queue and publishes deployment statuses as the
//! publisher contract in `docs/rabbitmq.md` says) and talks to the service over HTTP
//! and with signals.
//!
//! Every test uses queues of its own, named uniquely, and deletes them (with their
//! `.dlq` and `.delay.<ms>` queues) when it ends, also when it fails. Without a
//! reachable broker each test prints one `skipped` line and passes, except with
//! `CI=true`, where it fails.

#![cfg(feature = "rabbitmq")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod process;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use process::{Api, QueueNames, assert_all_handled, handled_messages};
use serde_json::{Value, json};
use steward_rabbitmq::{RabbitMq, RabbitMqBuilder};

/// The broker the tests use: `STEWARD_RABBITMQ_URL`, else the local default.
fn broker_url() -> String {
    std::env::var("STEWARD_RABBITMQ_URL")
        .unwrap_or_else(|_| steward_rabbitmq::DEFAULT_URL.to_owned())
}

/// `host:port` of the broker of [`broker_url`].
fn broker_address() -> String {
    let url = broker_url();
    let authority = url.split("://").nth(1).unwrap_or("").split('/').next().unwrap_or("");
    let host_port = authority.rsplit('@').next().unwrap_or("127.0.0.1:5672");
    if host_port.contains(':') { host_port.to_owned() } else { format!("{host_port}:5672") }
}

/// Whether the broker accepts TCP connections (see [`process::reachable`]).
async fn broker_available(test: &str) -> bool {
    process::reachable(test, "RabbitMQ", &broker_address()).await
}

/// The five queues of one test, uniquely named; dropping this deletes them from the
/// broker with their `.dlq` and delay queues (also when the test panics: every quorum
/// queue holds file handles on the shared broker).
struct Queues {
    names: QueueNames,
    /// The same topology the service declares, for reading dead letters and deleting.
    rabbit: RabbitMq,
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
        // What the service declares with STEWARD_SIMULATE_PROCESSORS=false.
        let rabbit = RabbitMqBuilder::new()
            .with_url(broker_url())
            .with_connection_name("steward-test")
            .with_queue(&names.deployment_status)
            .with_queue(&names.step_result)
            .with_publish_queue(&names.resource_request)
            .with_publish_queue(&names.airlock_status_changed)
            .with_publish_queue(&names.airlock_notification)
            .build()
            .unwrap();
        Queues { names, rabbit }
    }

    /// The environment that puts the service on RabbitMQ and these queues.
    fn env(&self) -> Vec<(&'static str, String)> {
        self.names.env(&[
            ("STEWARD_TRANSPORT", "rabbitmq".to_owned()),
            ("STEWARD_RABBITMQ_URL", broker_url()),
            ("STEWARD_SIMULATE_PROCESSORS", "false".to_owned()),
        ])
    }
}

impl Drop for Queues {
    fn drop(&mut self) {
        let rabbit = self.rabbit.clone();
        process::clean_up("queue cleanup", async move { rabbit.delete_topology().await });
    }
}

/// A resource request as the resource processor receives it.
#[derive(Debug)]
struct Request {
    body: Value,
    correlation_id: Option<String>,
    session_id: Option<String>,
}

impl Request {
    fn operation_id(&self) -> &str {
        self.body["operationId"].as_str().unwrap()
    }

    fn resource_id(&self) -> &str {
        self.body["id"].as_str().unwrap()
    }
}

/// TRE's resource processor, played with a plain AMQP client: no steward code between
/// the test and the broker.
struct Processor {
    connection: Connection,
    channel: Channel,
}

impl Processor {
    async fn connect() -> Processor {
        let properties =
            ConnectionProperties::default().with_connection_name("steward-test processor".into());
        let connection = Connection::connect(&broker_url(), properties).await.unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        Processor { connection, channel }
    }

    /// Takes the next resource request off `queue` (acking it), waiting up to 60 s.
    async fn next_request(&self, queue: &str) -> Request {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let got =
                self.channel.basic_get(queue.into(), BasicGetOptions::default()).await.unwrap();
            if let Some(got) = got {
                let delivery = got.delivery;
                let properties = &delivery.properties;
                let request = Request {
                    body: serde_json::from_slice(&delivery.data).expect("a JSON resource request"),
                    correlation_id: properties.correlation_id().as_ref().map(|c| c.to_string()),
                    session_id: properties
                        .headers()
                        .as_ref()
                        .and_then(|h| h.inner().get("x-session-id").cloned())
                        .and_then(|v| match v {
                            AMQPValue::LongString(s) => Some(s.to_string()),
                            _ => None,
                        }),
                };
                delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
                return request;
            }
            assert!(Instant::now() < deadline, "no resource request on {queue} within 60 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Publishes `body` to `queue` as the publisher contract says: default exchange,
    /// routing key = queue, persistent, JSON, a message id, `correlation_id`, the
    /// ordering key in `x-session-id`, `mandatory`. Returns the message id and the
    /// confirm still to wait for.
    async fn publish(
        &self,
        queue: &str,
        body: &[u8],
        session_id: &str,
        correlation_id: &str,
    ) -> (String, lapin::PublisherConfirm) {
        let message_id = uuid::Uuid::new_v4().to_string();
        let mut headers = FieldTable::default();
        headers.insert("x-session-id".into(), AMQPValue::LongString(session_id.into()));
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(message_id.as_str().into())
            .with_correlation_id(correlation_id.into())
            .with_headers(headers);
        let options = BasicPublishOptions { mandatory: true, immediate: false };
        let confirm = self
            .channel
            .basic_publish("".into(), queue.into(), options, body, properties)
            .await
            .unwrap();
        (message_id, confirm)
    }

    /// Publishes and waits for the broker's confirm; the message must have been routed.
    async fn publish_confirmed(
        &self,
        queue: &str,
        body: &[u8],
        session_id: &str,
        correlation_id: &str,
    ) -> String {
        let (message_id, confirm) = self.publish(queue, body, session_id, correlation_id).await;
        assert_eq!(confirm.await.unwrap(), Confirmation::Ack(None), "publish to {queue}");
        message_id
    }

    /// The messages ready in `queue` (a passive declare, on a channel of its own: a
    /// refused one closes its channel).
    async fn depth(&self, queue: &str) -> u32 {
        let channel = self.connection.create_channel().await.unwrap();
        let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let declared =
            channel.queue_declare(queue.into(), options, FieldTable::default()).await.unwrap();
        let _ = channel.close(200, "depth read".into()).await;
        declared.message_count()
    }

    /// Waits until `queue` has no ready message, and returns the last count.
    async fn wait_until_empty(&self, queue: &str) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let depth = self.depth(queue).await;
            if depth == 0 || Instant::now() >= deadline {
                return depth;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A TRE deployment-status body (reference §4.2).
fn status_body(request: &Request, status: &str, message: &str, outputs: Value) -> Vec<u8> {
    process::status_update(&request.body, status, message, outputs).into_bytes()
}

/// The outputs a workspace install reports: an address space unique to `n`.
fn workspace_outputs(request: &Request, n: usize) -> Value {
    json!([
        {"name": "address_spaces", "value": [format!("10.{}.{}.0/24", 100 + n / 250, n % 250)], "type": "string"},
        {"name": "workspace_url", "value": format!("https://{}.tre.example", request.resource_id()), "type": "string"},
    ])
}

/// Publishes the statuses a resource processor sends for one install: `deploying`
/// (no outputs), then `deployed` with outputs; both keyed by operation id and
/// correlated with the resource id.
async fn report_install(
    processor: &Processor,
    queue: &str,
    request: &Request,
    n: usize,
) -> Vec<(String, lapin::PublisherConfirm)> {
    let (op, resource) = (request.operation_id(), request.resource_id());
    let starting = status_body(request, "deploying", "Job starting", json!([]));
    let done = status_body(
        request,
        "deployed",
        "install action completed successfully.",
        workspace_outputs(request, n),
    );
    let first = processor.publish(queue, &starting, op, resource).await;
    let second = processor.publish(queue, &done, op, resource).await;
    vec![first, second]
}

/// Ensures that on RabbitMQ the service sends the resource request to the
/// resource-request queue (correlation id = operation id, ordering key = resource id),
/// and that the deployment statuses an external processor publishes bring the
/// operation and the resource to `deployed`, with the outputs merged into the
/// resource's properties and nothing left in the queues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processor_statuses_bring_resource_to_deployed_with_outputs() {
    if !broker_available("processor_statuses_bring_resource_to_deployed_with_outputs").await {
        return;
    }
    let queues = Queues::new("deployed");
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(dir.path(), &queues.env());
    api.ready().await;
    let processor = Processor::connect().await;

    let (resource_id, operation_id) = api.install_workspace("Genomics").await;
    let request = processor.next_request(&queues.resource_request).await;
    assert_eq!(request.operation_id(), operation_id, "{request:?}");
    assert_eq!(request.resource_id(), resource_id, "{request:?}");
    assert_eq!(request.body["action"], "install");
    assert_eq!(request.body["name"], "tre-workspace-base");
    assert_eq!(request.body["parameters"]["display_name"], "Genomics");
    assert_eq!(request.correlation_id.as_deref(), Some(operation_id.as_str()));
    assert_eq!(request.session_id.as_deref(), Some(resource_id.as_str()));

    let starting = status_body(&request, "deploying", "Job starting", json!([]));
    processor
        .publish_confirmed(&queues.deployment_status, &starting, &operation_id, &resource_id)
        .await;
    let deploying = api.operation_reaches(&operation_id, "deploying").await;
    assert_eq!(deploying["message"], format!("{resource_id}: Job starting"));

    let done = status_body(
        &request,
        "deployed",
        "install action completed successfully.",
        workspace_outputs(&request, 7),
    );
    processor
        .publish_confirmed(&queues.deployment_status, &done, &operation_id, &resource_id)
        .await;
    let deployed = api.operation_reaches(&operation_id, "deployed").await;
    assert_eq!(deployed["steps"][0]["status"], "deployed", "{deployed:#}");
    let resource = api.get(&format!("/api/resources/{resource_id}")).await["resource"].clone();
    assert_eq!(resource["deploymentStatus"], "deployed", "{resource:#}");
    let properties = &resource["properties"];
    assert_eq!(
        properties["address_spaces"],
        json!(["10.100.7.0/24"]),
        "outputs merged: {resource:#}"
    );
    assert_eq!(properties["workspace_url"], format!("https://{resource_id}.tre.example"));
    assert_eq!(properties["display_name"], "Genomics", "inputs kept: {resource:#}");

    let worker = api.worker_counts("deployment-status", "completed", 2).await;
    assert_eq!(worker["completed"], 2, "{worker}");
    assert_eq!(worker["deadLettered"], 0, "{worker}");
    assert_eq!(processor.wait_until_empty(&queues.deployment_status).await, 0);
    assert_eq!(processor.depth(&queues.resource_request).await, 0);
    assert!(queues.rabbit.dead_letters(&queues.deployment_status).await.unwrap().is_empty());
    let health = api.get("/health").await;
    assert!(health["services"].as_array().unwrap().iter().all(|s| s["status"] == "OK"), "{health}");

    api.stop(Duration::from_secs(30));
}

/// Ensures that malformed deployment statuses (a body that is not JSON, and JSON that
/// does not fit the schema) end in `<deployment-status queue>.dlq` with reason
/// `MessageFormatIncorrect`, body and properties intact, that nothing of them stays
/// in the queue, and that the updater goes on handling good messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_status_ends_in_dlq_with_message_format_incorrect() {
    if !broker_available("malformed_status_ends_in_dlq_with_message_format_incorrect").await {
        return;
    }
    let queues = Queues::new("malformed");
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(dir.path(), &queues.env());
    api.ready().await;
    let processor = Processor::connect().await;
    let queue = &queues.deployment_status;

    let not_json: &[u8] = b"Job starting, but this is not JSON";
    let wrong_schema = json!({"operationId": "not-a-uuid", "status": "deployed"}).to_string();
    let first = processor.publish_confirmed(queue, not_json, "session-1", "resource-1").await;
    let second = processor
        .publish_confirmed(queue, wrong_schema.as_bytes(), "session-2", "resource-2")
        .await;

    let deadline = Instant::now() + Duration::from_secs(60);
    let dead = loop {
        let dead = queues.rabbit.dead_letters(queue).await.unwrap();
        if dead.len() >= 2 {
            break dead;
        }
        assert!(Instant::now() < deadline, "dead letters of {queue}: {dead:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(dead.len(), 2, "{dead:#?}");
    let by_id: BTreeMap<_, _> = dead.iter().map(|d| (d.message.id.clone(), d)).collect();
    for (id, body, session, correlation) in [
        (&first, not_json, "session-1", "resource-1"),
        (&second, wrong_schema.as_bytes(), "session-2", "resource-2"),
    ] {
        let letter = by_id.get(id).unwrap_or_else(|| panic!("{id} not in the DLQ: {dead:#?}"));
        assert_eq!(letter.reason, "MessageFormatIncorrect", "{letter:#?}");
        assert!(
            letter.description.starts_with("Service bus message is not formatted correctly"),
            "{letter:#?}"
        );
        assert_eq!(letter.message.body.as_ref(), body);
        assert_eq!(letter.message.session_id.as_deref(), Some(session));
        assert_eq!(letter.message.correlation_id.as_deref(), Some(correlation));
        assert_eq!(letter.message.content_type.as_deref(), Some("application/json"));
    }
    assert_eq!(processor.wait_until_empty(queue).await, 0, "nothing requeued");
    let worker = api.worker_counts("deployment-status", "deadLettered", 2).await;
    assert_eq!(worker["deadLettered"], 2, "{worker}");
    assert_eq!(worker["state"], "running", "{worker}");

    // The updater still handles good messages.
    let (resource_id, operation_id) = api.install_workspace("After the bad ones").await;
    let request = processor.next_request(&queues.resource_request).await;
    assert_eq!(request.operation_id(), operation_id);
    let done = status_body(&request, "deployed", "done", workspace_outputs(&request, 1));
    processor.publish_confirmed(queue, &done, &operation_id, &resource_id).await;
    api.operation_reaches(&operation_id, "deployed").await;
    let worker = api.worker_counts("deployment-status", "completed", 1).await;
    assert_eq!(worker["deadLettered"], 2, "no new dead letter: {worker}");
    assert_eq!(queues.rabbit.dead_letters(queue).await.unwrap().len(), 2, "no new dead letter");

    api.stop(Duration::from_secs(30));
}

/// Ensures that SIGTERM while a backlog of deployment statuses is being handled exits 0
/// within the drain timeout + 5 s, and that after a restart on the same database and
/// queues every status was handled and every operation reaches `deployed` with its own
/// outputs: nothing lost, nothing left in the queue, nothing dead-lettered.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_statuses_in_flight_loses_nothing() {
    if !broker_available("sigterm_with_statuses_in_flight_loses_nothing").await {
        return;
    }
    const RESOURCES: usize = 60;
    let queues = Queues::new("sigterm");
    let dir = tempfile::tempdir().unwrap();
    let drain = Duration::from_secs(5);
    let mut env = queues.env();
    env.push(("STEWARD_DRAIN_TIMEOUT", "5s".to_owned()));
    // Each status takes at least 200 ms, so the backlog outlasts the moment between the
    // first completion and the signal on any machine, however fast.
    env.push(("STEWARD_FAULTS", "delay=200ms".to_owned()));
    let api = Api::start(dir.path(), &env);
    api.ready().await;
    let processor = Processor::connect().await;
    let queue = &queues.deployment_status;

    let created = api.install_workspaces(RESOURCES).await;
    let mut requests = Vec::new();
    for _ in 0..RESOURCES {
        let request = processor.next_request(&queues.resource_request).await;
        assert_eq!(
            created.get(request.operation_id()).map(String::as_str),
            Some(request.resource_id()),
            "{request:?}"
        );
        requests.push(request);
    }
    // A backlog the service cannot get through before the signal: the statuses wait
    // in the queue while the service is down.
    let (status, _, _) = api.terminate(Duration::from_secs(30));
    assert!(status.success(), "exit {status:?} with nothing in flight");
    let mut published = BTreeSet::new();
    let mut confirms = Vec::new();
    for (n, request) in requests.iter().enumerate() {
        for (message_id, confirm) in report_install(&processor, queue, request, n).await {
            published.insert(message_id);
            confirms.push(confirm);
        }
    }
    for confirm in confirms {
        assert_eq!(confirm.await.unwrap(), Confirmation::Ack(None));
    }
    // SIGTERM as soon as the service is handling them.
    let before = Api::interrupted(dir.path(), &env, drain, queue).await;
    assert!(
        before.len() < published.len(),
        "the shutdown came too late to interrupt anything: {} of {} handled",
        before.len(),
        published.len()
    );

    let api = Api::start(dir.path(), &env);
    api.serving().await;
    for (n, request) in requests.iter().enumerate() {
        api.operation_reaches(request.operation_id(), "deployed").await;
        let resource =
            api.get(&format!("/api/resources/{}", request.resource_id())).await["resource"].clone();
        assert_eq!(resource["deploymentStatus"], "deployed", "{resource:#}");
        assert_eq!(
            resource["properties"]["address_spaces"],
            workspace_outputs(request, n)[0]["value"],
            "outputs merged: {resource:#}"
        );
    }
    assert_eq!(processor.wait_until_empty(queue).await, 0);
    let dead = queues.rabbit.dead_letters(queue).await.unwrap();
    assert!(dead.is_empty(), "nothing dead-lettered: {dead:#?}");
    let (_, logs) = api.stop(Duration::from_secs(30));
    let after = handled_messages(&logs, queue);
    assert_all_handled(&published, &before, &after);
    // Delivery is at least once: a message handled by both processes is legal (the
    // handler is idempotent), so it is reported, not asserted.
    let twice = before.intersection(&after).count();
    eprintln!(
        "{} statuses: {} handled before the shutdown, {} after, {twice} twice",
        published.len(),
        before.len(),
        after.len()
    );
}

/// Waits until `/api/workers` shows `name` in `state`.
async fn worker_reaches(api: &Api, name: &str, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let worker = api.worker(name).await;
        if worker["state"] == state {
            return worker;
        }
        assert!(Instant::now() < deadline, "{name} never reached {state}: {worker}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Ensures the operator's story on RabbitMQ: with `deployment-status` paused, 20
/// published statuses stay in the queue while the worker reads `paused`; after resume
/// they are handled. Five statuses dead-lettered for a bad format are listed with their
/// reason by `GET /api/dead-letters/{queue}`; purged one by one, and valid statuses
/// planted in the dead-letter queue, a redrive of all empties it and they are handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_statuses_wait_and_redriven_dead_letters_are_handled() {
    if !broker_available("paused_statuses_wait_and_redriven_dead_letters_are_handled").await {
        return;
    }
    let queues = Queues::new("operator");
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(dir.path(), &queues.env());
    api.ready().await;
    let processor = Processor::connect().await;
    let queue = queues.deployment_status.clone();

    let paused = api.post("/api/workers/deployment-status/pause", json!({})).await;
    assert_eq!(paused, json!({"worker": "deployment-status", "paused": true}));
    worker_reaches(&api, "deployment-status", "paused").await;
    let installs = api.install_workspaces(20).await;
    let mut requests = Vec::new();
    for _ in 0..20 {
        requests.push(processor.next_request(&queues.resource_request).await);
    }
    for (n, request) in requests.iter().enumerate() {
        let done = status_body(request, "deployed", "done", workspace_outputs(request, n));
        processor
            .publish_confirmed(&queue, &done, request.operation_id(), request.resource_id())
            .await;
    }
    // Paused: the statuses wait in the queue (longer than the follower's interval).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(processor.depth(&queue).await, 20, "a paused updater takes nothing");
    let worker = api.worker("deployment-status").await;
    assert_eq!((worker["state"].clone(), worker["paused"].clone()), (json!("paused"), json!(true)));
    api.answers_ok("/readyz").await;

    api.post("/api/workers/deployment-status/resume", json!({})).await;
    for operation_id in installs.keys() {
        api.operation_reaches(operation_id, "deployed").await;
    }
    assert_eq!(processor.wait_until_empty(&queue).await, 0);
    worker_reaches(&api, "deployment-status", "running").await;

    let mut bad = Vec::new();
    for n in 0..5 {
        let body = format!("not JSON, number {n}");
        let session = format!("bad-session-{n}");
        bad.push(processor.publish_confirmed(&queue, body.as_bytes(), &session, "bad").await);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let listed = loop {
        let list = api.get("/api/dead-letters").await;
        let count =
            list["queues"].as_array().unwrap().iter().find(|q| q["queue"] == queue.as_str());
        if count.is_some_and(|q| q["count"] == 5) {
            break api.get(&format!("/api/dead-letters/{queue}?limit=50")).await;
        }
        assert!(Instant::now() < deadline, "five dead letters never listed: {list}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let messages = listed["messages"].as_array().unwrap();
    let ids: BTreeSet<&str> = messages.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, bad.iter().map(String::as_str).collect(), "{listed}");
    for message in messages {
        assert_eq!(message["reason"], "MessageFormatIncorrect", "{message}");
        assert!(message["bodyPreview"].as_str().unwrap().starts_with("not JSON"), "{message}");
    }
    assert_eq!(listed["peekCountsAsDelivery"], true);

    // The cause is gone: the malformed ones are purged, and valid statuses planted in
    // the dead-letter queue are redriven.
    for id in &bad {
        let path = format!("/api/dead-letters/{queue}/messages/{id}");
        let (status, body) = api.call(reqwest::Method::DELETE, &path, None).await;
        assert_eq!((status, body), (200, json!({"purged": 1})));
    }
    let planted_installs = api.install_workspaces(3).await;
    let dlq = steward_rabbitmq::dead_letter_queue(&queue);
    for n in 0..3 {
        let request = processor.next_request(&queues.resource_request).await;
        let done = status_body(&request, "deployed", "done", workspace_outputs(&request, 100 + n));
        processor
            .publish_confirmed(&dlq, &done, request.operation_id(), request.resource_id())
            .await;
    }
    let redriven =
        api.post(&format!("/api/dead-letters/{queue}/redrive"), json!({"all": true})).await;
    assert_eq!(redriven, json!({"redriven": 3}));
    for operation_id in planted_installs.keys() {
        api.operation_reaches(operation_id, "deployed").await;
    }
    assert_eq!(processor.wait_until_empty(&dlq).await, 0, "the dead-letter queue is empty");
    assert_eq!(processor.wait_until_empty(&queue).await, 0);
    let (_, logs) = api.stop(Duration::from_secs(30));
    let logs = logs.join("\n");
    for action in ["worker paused", "worker resumed", "dead letters redriven", "dead letter purged"]
    {
        assert!(logs.contains(action), "{action} is logged: {logs}");
    }
}
