//! Black-box test of three `steward-api` replicas on one RabbitMQ and one PostgreSQL
//! (a schema of its own), simulators off: the test plays TRE's resource processor with
//! a plain AMQP client (it takes the resource requests off the request queue and
//! publishes each operation's statuses in order, `deploying` then `deployed` with
//! outputs, keyed by operation id), creates 300 operations over HTTP spread across the
//! replicas, and SIGKILLs the replica whose deployment-status consumer is active twice,
//! restarting it each time. It asserts that every operation ends `deployed` with its
//! outputs merged, that no replica applied an operation's statuses out of order, that
//! the queues and the dead-letter queue end empty, and that after each kill another
//! replica handled the next status within 5 s (both times printed).
//!
//! The queues are named uniquely and deleted at the end, also when the test fails.
//! Without a reachable broker or PostgreSQL (`STEWARD_TEST_POSTGRES_URL`) the test
//! prints one `skipped` line and passes, except with `CI=true`, where it fails.

#![cfg(feature = "rabbitmq")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod process;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use process::{Api, QueueNames};
use serde_json::{Value, json};
use steward_rabbitmq::{RabbitMq, RabbitMqBuilder};
use tokio::sync::{RwLock, watch};

/// Operations created over HTTP.
const OPERATIONS: usize = 300;
/// Before creating operation 100 and 200, the test kills the active replica.
const KILL_AT: [usize; 2] = [100, 200];
/// The whole test, from the first start to the last assertion.
const TEST_LIMIT: Duration = Duration::from_secs(180);
/// The longest failover allowed.
const FAILOVER_LIMIT: Duration = Duration::from_secs(5);

fn broker_url() -> String {
    std::env::var("STEWARD_RABBITMQ_URL")
        .unwrap_or_else(|_| steward_rabbitmq::DEFAULT_URL.to_owned())
}

fn broker_address() -> String {
    let url = broker_url();
    let authority = url.split("://").nth(1).unwrap_or("").split('/').next().unwrap_or("");
    let host_port = authority.rsplit('@').next().unwrap_or("127.0.0.1:5672");
    if host_port.contains(':') { host_port.to_owned() } else { format!("{host_port}:5672") }
}

fn postgres_url() -> String {
    std::env::var("STEWARD_TEST_POSTGRES_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A schema of the test's own on PostgreSQL, dropped when this is dropped; `None` after
/// a skip line when PostgreSQL is unreachable (a failure with `CI=true`).
struct Schema {
    admin_url: String,
    name: String,
}

impl Schema {
    async fn create(test: &str) -> Option<Schema> {
        use sqlx::{Connection, Executor};
        sqlx::any::install_default_drivers();
        let admin_url = postgres_url();
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
                    panic!(
                        "{test}: PostgreSQL at {admin_url} is unreachable with CI=true: {reason}"
                    );
                }
                eprintln!("skipped {test}: PostgreSQL at {admin_url} is unreachable ({reason})");
                return None;
            }
        };
        let name = format!("steward_replicas_{}", uuid::Uuid::new_v4().simple());
        admin.execute(format!("CREATE SCHEMA {name}").as_str()).await.unwrap();
        admin.close().await.unwrap();
        Some(Schema { admin_url, name })
    }

    /// The database URL the replicas use: the test's schema first on the search path.
    fn url(&self) -> String {
        let separator = if self.admin_url.contains('?') { '&' } else { '?' };
        format!("{}{separator}options[search_path]={}", self.admin_url, self.name)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let (url, schema) = (self.admin_url.clone(), self.name.clone());
        process::clean_up("schema cleanup", async move {
            use sqlx::{Connection, Executor};
            let mut admin = sqlx::AnyConnection::connect(&url).await?;
            admin.execute(format!("DROP SCHEMA {schema} CASCADE").as_str()).await?;
            admin.close().await
        });
    }
}

/// The test's queues; dropping this deletes them (with their `.dlq` and delay queues).
struct Queues {
    names: QueueNames,
    rabbit: RabbitMq,
}

impl Queues {
    fn new() -> Queues {
        let names = QueueNames::new("replicas");
        let rabbit = RabbitMqBuilder::new()
            .with_url(broker_url())
            .with_connection_name("steward-test")
            .with_queue(&names.deployment_status)
            .with_queue(&names.step_result)
            .with_single_active_consumer(&names.deployment_status)
            .with_single_active_consumer(&names.step_result)
            .with_publish_queue(&names.resource_request)
            .with_publish_queue(&names.airlock_status_changed)
            .with_publish_queue(&names.airlock_notification)
            .build()
            .unwrap();
        Queues { names, rabbit }
    }
}

impl Drop for Queues {
    fn drop(&mut self) {
        let rabbit = self.rabbit.clone();
        process::clean_up("queue cleanup", async move { rabbit.delete_topology().await });
    }
}

/// TRE's resource processor: takes every resource request off the request queue and
/// publishes `deploying`, then `deployed` with outputs, for its operation (keyed by the
/// operation id), waiting for the broker's confirms. Records each operation's index.
struct Processor {
    connection: Connection,
    /// The index of each operation it answered (its outputs depend on it), by id.
    answered: Arc<Mutex<HashMap<String, usize>>>,
}

impl Processor {
    async fn start(requests: String, statuses: String) -> Processor {
        let properties =
            ConnectionProperties::default().with_connection_name("steward-test processor".into());
        let connection = Connection::connect(&broker_url(), properties).await.unwrap();
        let consuming = connection.create_channel().await.unwrap();
        let publishing = connection.create_channel().await.unwrap();
        publishing.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        let mut consumer = consuming
            .basic_consume(
                requests.as_str().into(),
                "processor".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let answered: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let record = answered.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let request: Value = serde_json::from_slice(&delivery.data).unwrap();
                let operation = request["operationId"].as_str().unwrap().to_owned();
                let n = {
                    let mut answered = record.lock().unwrap();
                    let n = answered.len();
                    answered.entry(operation.clone()).or_insert(n);
                    answered[&operation]
                };
                let deploying =
                    process::status_update(&request, "deploying", "Job starting", json!([]));
                let deployed = process::status_update(
                    &request,
                    "deployed",
                    "install action completed successfully.",
                    outputs(&request, n),
                );
                for body in [deploying, deployed] {
                    publish(&publishing, &statuses, body.as_bytes(), &operation).await;
                }
                delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
            }
        });
        Processor { connection, answered }
    }

    /// The messages ready in `queue`.
    async fn depth(&self, queue: &str) -> u32 {
        let channel = self.connection.create_channel().await.unwrap();
        let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let declared =
            channel.queue_declare(queue.into(), options, FieldTable::default()).await.unwrap();
        let _ = channel.close(200, "depth read".into()).await;
        declared.message_count()
    }
}

/// Publishes `body` to `queue` as the publisher contract says (persistent, JSON, a
/// message id, the ordering key in `x-session-id`) and waits for the confirm.
async fn publish(channel: &Channel, queue: &str, body: &[u8], operation: &str) {
    let mut headers = FieldTable::default();
    headers.insert("x-session-id".into(), AMQPValue::LongString(operation.into()));
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(uuid::Uuid::new_v4().to_string().into())
        .with_correlation_id(operation.into())
        .with_headers(headers);
    let options = BasicPublishOptions { mandatory: true, immediate: false };
    let confirm = channel
        .basic_publish("".into(), queue.into(), options, body, properties)
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(confirm, Confirmation::Ack(None), "publish to {queue}");
}

/// The outputs of operation `n`: an address space unique to it.
fn outputs(request: &Value, n: usize) -> Value {
    json!([
        {"name": "address_spaces", "value": [address_space(n)], "type": "string"},
        {"name": "workspace_url", "value": format!("https://{}.tre.example", request["id"].as_str().unwrap()), "type": "string"},
    ])
}

fn address_space(n: usize) -> String {
    format!("10.{}.{}.0/24", 100 + n / 250, n % 250)
}

/// The three replicas: their processes (`None` while killed), the base URLs requests
/// may go to, and what every process logged, killed ones included.
struct Replicas {
    env: Vec<(&'static str, String)>,
    dirs: Vec<tempfile::TempDir>,
    running: Vec<Option<Api>>,
    /// Where new operations may be created: a replica leaves before it is killed, so no
    /// request is cut off mid-way, and comes back once it serves again.
    bases: Arc<RwLock<Vec<String>>>,
    logs: Vec<Arc<Mutex<Vec<String>>>>,
}

impl Replicas {
    async fn start(env: Vec<(&'static str, String)>) -> Replicas {
        let mut replicas = Replicas {
            env,
            dirs: Vec::new(),
            running: Vec::new(),
            bases: Arc::default(),
            logs: Vec::new(),
        };
        for index in 0..3 {
            replicas.dirs.push(tempfile::tempdir().unwrap());
            replicas.running.push(None);
            // One after the other: the first migrates the schema, and becomes the
            // active consumer.
            replicas.restart(index).await;
        }
        replicas
    }

    async fn restart(&mut self, index: usize) {
        let dir: PathBuf = self.dirs[index].path().to_owned();
        let api = Api::start(&dir, &self.env);
        api.ready().await;
        self.logs.push(api.logs.clone());
        self.bases.write().await.push(api.base.clone());
        self.running[index] = Some(api);
    }

    /// The role of the deployment-status updater of each running replica.
    async fn roles(&self) -> Vec<(usize, Value)> {
        let mut roles = Vec::new();
        for (index, api) in self.running.iter().enumerate() {
            if let Some(api) = api {
                roles.push((index, api.worker("deployment-status").await));
            }
        }
        roles
    }

    /// Waits until exactly one running replica reports its deployment-status consumer
    /// active and the others standby; returns the active one.
    async fn active(&self) -> usize {
        let deadline = Instant::now() + process::LIMIT;
        loop {
            let roles = self.roles().await;
            let active: Vec<usize> =
                roles.iter().filter(|(_, w)| w["role"] == "active").map(|(i, _)| *i).collect();
            let standby = roles.iter().filter(|(_, w)| w["role"] == "standby").count();
            if active.len() == 1 && standby == roles.len() - 1 {
                return active[0];
            }
            assert!(Instant::now() < deadline, "no single active replica: {roles:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILLs the active replica and measures how long until another one handled a
    /// status; returns the time, then restarts the killed one.
    async fn kill_active(&mut self) -> Duration {
        let victim = self.active().await;
        let before: BTreeMap<usize, u64> = self
            .roles()
            .await
            .into_iter()
            .filter(|(index, _)| *index != victim)
            .map(|(index, worker)| (index, worker["completed"].as_u64().unwrap()))
            .collect();
        let mut api = self.running[victim].take().unwrap();
        self.bases.write().await.retain(|base| *base != api.base);
        api.child.kill().unwrap();
        let killed_at = Instant::now();
        api.child.wait().unwrap();
        let failover = loop {
            let mut took_over = false;
            for (index, worker) in self.roles().await {
                took_over |= worker["completed"].as_u64().unwrap() > before[&index];
            }
            if took_over {
                break killed_at.elapsed();
            }
            assert!(killed_at.elapsed() < process::LIMIT, "no replica took over");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        drop(api);
        self.restart(victim).await;
        failover
    }

    /// Every line every replica logged.
    fn all_logs(&self) -> Vec<Value> {
        self.logs
            .iter()
            .flat_map(|logs| logs.lock().unwrap().clone())
            .filter_map(|line| serde_json::from_str(&line).ok())
            .collect()
    }

    fn any(&self) -> &Api {
        self.running.iter().flatten().next().unwrap()
    }
}

/// Creates `OPERATIONS` workspaces, round robin over the replicas that serve; before
/// operation `KILL_AT[k]` it waits until kill `k` happened. Returns the operation and
/// resource ids.
async fn create_operations(
    bases: Arc<RwLock<Vec<String>>>,
    mut kills: watch::Receiver<usize>,
) -> Vec<(String, String)> {
    let client = reqwest::Client::new();
    let mut created = Vec::new();
    for n in 0..OPERATIONS {
        if let Some(k) = KILL_AT.iter().position(|at| *at == n) {
            kills.wait_for(|done| *done > k).await.unwrap();
        }
        let bases = bases.read().await;
        let base = &bases[n % bases.len()];
        let body = json!({"templateName": "tre-workspace-base", "resourceType": "workspace",
            "properties": {"display_name": format!("W{n}"), "description": "Sequencing data"}});
        let response = client.post(format!("{base}/api/resources")).json(&body).send().await;
        let response = response.expect("create an operation");
        let status = response.status();
        let created_body: Value = response.json().await.unwrap();
        assert!(status.is_success(), "POST /api/resources on {base}: {status} {created_body}");
        let operation = &created_body["operation"];
        created.push((
            operation["id"].as_str().unwrap().to_owned(),
            operation["resourceId"].as_str().unwrap().to_owned(),
        ));
    }
    created
}

/// Ensures that three replicas on one broker and one database handle 300 operations,
/// in order, while the active replica is killed twice; see the module docs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_handle_every_operation_in_order_across_two_kills() {
    const TEST: &str = "three_replicas_handle_every_operation_in_order_across_two_kills";
    if !process::reachable(TEST, "RabbitMQ", &broker_address()).await {
        return;
    }
    let Some(schema) = Schema::create(TEST).await else { return };
    let queues = Queues::new();
    tokio::time::timeout(TEST_LIMIT, run(&schema, &queues))
        .await
        .unwrap_or_else(|_| panic!("the test took more than {TEST_LIMIT:?}"));
}

async fn run(schema: &Schema, queues: &Queues) {
    let names = &queues.names;
    let env = names.env(&[
        ("STEWARD_TRANSPORT", "rabbitmq".to_owned()),
        ("STEWARD_RABBITMQ_URL", broker_url()),
        ("STEWARD_SIMULATE_PROCESSORS", "false".to_owned()),
        ("STEWARD_DATABASE_URL", schema.url()),
    ]);
    let began = Instant::now();
    let mut replicas = Replicas::start(env).await;
    println!("three replicas ready after {:?}", began.elapsed());
    let processor =
        Processor::start(names.resource_request.clone(), names.deployment_status.clone()).await;

    let (kills_tx, kills_rx) = watch::channel(0usize);
    let creating = tokio::spawn(create_operations(replicas.bases.clone(), kills_rx));
    let mut failovers = Vec::new();
    for (k, at) in KILL_AT.into_iter().enumerate() {
        // The creator waits at the kill point: every operation before it was created.
        while processor.answered.lock().unwrap().len() < at {
            assert!(!creating.is_finished(), "the creator stopped early");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The kill goes out while the statuses of the last operations are in flight,
        // and the creator goes on right away, so a next status always comes.
        let _ = kills_tx.send(k + 1);
        failovers.push(replicas.kill_active().await);
    }
    let created = creating.await.unwrap();
    assert_eq!(created.len(), OPERATIONS);
    println!("{OPERATIONS} operations created, two kills done, after {:?}", began.elapsed());

    // Every operation deployed, its outputs merged.
    let api = replicas.any();
    for (operation_id, resource_id) in &created {
        let operation = api.operation_reaches(operation_id, "deployed").await;
        assert_eq!(operation["steps"][0]["status"], "deployed", "{operation:#}");
        let n = processor.answered.lock().unwrap()[operation_id];
        let resource = api.get(&format!("/api/resources/{resource_id}")).await["resource"].clone();
        assert_eq!(resource["deploymentStatus"], "deployed", "{resource:#}");
        assert_eq!(
            resource["properties"]["address_spaces"],
            json!([address_space(n)]),
            "{resource:#}"
        );
    }
    assert_eq!(processor.answered.lock().unwrap().len(), OPERATIONS, "one request per operation");
    println!("every operation deployed after {:?}", began.elapsed());

    // No replica applied an operation's statuses out of order: across every replica's
    // log, in time order, no `deploying` was applied after its `deployed`.
    // The step guard refuses a `deploying` that comes after `deployed` (logged as stale,
    // not as applied), so the applied lines alone would look ordered even if statuses
    // were handled out of order: every stale status must be a redelivered copy of one
    // applied before it (a killed replica's unacknowledged messages), never a status
    // handled for the first time after a later one.
    let mut applied: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut stale = Vec::new();
    for line in replicas.all_logs() {
        let message = line["message"].as_str().unwrap_or_default();
        let at = line["timestamp"].as_str().unwrap_or_default().to_owned();
        if let Some(rest) = message.strip_prefix("Update status in DB for ") {
            let (operation, status) = rest.split_once(" - ").unwrap();
            applied.entry(operation.to_owned()).or_default().push((at, status.to_owned()));
        } else if message.starts_with("a non-final status for a step that is already final") {
            let span = &line["span"];
            let field = |name: &str| span[name].as_str().unwrap_or_default().to_owned();
            stale.push((at, field("operation_id"), field("status")));
        }
    }
    for (at, operation, status) in &stale {
        let before = applied.get(operation).is_some_and(|statuses| {
            statuses.iter().any(|(applied_at, applied)| applied == status && applied_at < at)
        });
        assert!(
            before,
            "{operation}: {status} handled after a later status without being applied first \
             (applied: {:?}; stale: {stale:?})",
            applied.get(operation)
        );
    }
    println!("{} stale statuses, each a redelivery of one applied before", stale.len());
    for (operation, statuses) in &mut applied {
        statuses.sort();
        let order: Vec<&str> = statuses.iter().map(|(_, status)| status.as_str()).collect();
        let first_deployed = order.iter().position(|s| *s == "deployed");
        let last_deploying = order.iter().rposition(|s| *s == "deploying");
        if let (Some(deployed), Some(deploying)) = (first_deployed, last_deploying) {
            assert!(deploying < deployed, "{operation} applied out of order: {order:?}");
        }
    }
    // A replica killed right after a commit never logged it (the redelivery is then a
    // replay, not logged as applied): each kill can hide at most the few operations its
    // handlers had in flight.
    assert!(applied.len() >= OPERATIONS - 2, "statuses applied for {} operations", applied.len());

    // Nothing left in the queues, nothing dead-lettered.
    let deadline = Instant::now() + process::LIMIT;
    while processor.depth(&names.deployment_status).await > 0 {
        assert!(Instant::now() < deadline, "statuses left in the queue");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(processor.depth(&names.resource_request).await, 0);
    for queue in [&names.deployment_status, &names.step_result] {
        let dead = queues.rabbit.dead_letters(queue).await.unwrap();
        assert!(dead.is_empty(), "dead letters in {queue}: {dead:?}");
    }

    for (k, failover) in failovers.iter().enumerate() {
        println!("failover after SIGKILL {} of the active replica: {failover:?}", k + 1);
        assert!(*failover <= FAILOVER_LIMIT, "failover {} took {failover:?}", k + 1);
    }
    // Each replica shows its role in /api/workers and /health; standbys are ready.
    let roles = replicas.roles().await;
    let standbys = roles.iter().filter(|(_, w)| w["role"] == "standby").count();
    assert_eq!(standbys, 2, "{roles:?}");
    for (index, worker) in &roles {
        let api = replicas.running[*index].as_ref().unwrap();
        assert_eq!(worker["state"], "running", "{worker}");
        api.answers_ok("/readyz").await;
        let health = api.get("/health").await;
        let line = health["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["service"] == "Deployment Status Updater")
            .unwrap()
            .clone();
        assert_eq!((&line["status"], &line["role"]), (&json!("OK"), &worker["role"]), "{health}");
    }
    for api in replicas.running.iter_mut().filter_map(Option::take) {
        api.stop(Duration::from_secs(30));
    }
}
