//! Black-box tests of the `steward-api` binary on Azure Service Bus: the standalone
//! `steward-sb-emulator` binary stands in for the namespace, the test plays TRE's
//! resource processor over the emulator's REST API with plain HTTP, and talks to the
//! service only over HTTP and with signals.
//!
//! The emulator binary belongs to another package, so cargo gives no
//! `CARGO_BIN_EXE_steward-sb-emulator` here: it is taken from next to `steward-api` in
//! the same target directory, where a workspace build with `--all-features` (as CI runs
//! `cargo nextest run --workspace --all-features`) puts it, or from the path in
//! `STEWARD_SB_EMULATOR_BIN`.

#![cfg(feature = "servicebus")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod process;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use process::{
    Api, LIMIT, collect_lines, command as api_command, sigterm, status_update, wait_for_exit,
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::Sha256;

const KEY_NAME: &str = "RootManageSharedAccessKey";
const KEY: &str = "YmxhY2tib3gtc2VydmljZWJ1cw==";
/// The queues of a TRE namespace prepared as docs/servicebus.md says: the consumed
/// queues without sessions and with their `.dlq` queues.
const QUEUES: [&str; 7] = [
    "deploymentstatus",
    "deploymentstatus.dlq",
    "airlock-step-result",
    "airlock-step-result.dlq",
    "workspacequeue",
    "airlock-status-changed",
    "airlock-notification",
];

/// The emulator binary: `STEWARD_SB_EMULATOR_BIN`, else next to `steward-api`.
fn emulator_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("STEWARD_SB_EMULATOR_BIN") {
        return PathBuf::from(path);
    }
    let name = format!("steward-sb-emulator{}", std::env::consts::EXE_SUFFIX);
    let path = Path::new(env!("CARGO_BIN_EXE_steward-api")).with_file_name(name);
    assert!(
        path.is_file(),
        "{} does not exist: build the whole workspace with --all-features first \
         (`cargo nextest run --workspace --all-features`, as CI does, or \
         `cargo build -p steward-servicebus --features emulator --bin steward-sb-emulator` \
         with the same target directory), or set STEWARD_SB_EMULATOR_BIN",
        path.display()
    );
    path
}

/// A running `steward-sb-emulator` that requires shared access signatures.
struct Emulator {
    child: Child,
    endpoint: String,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Emulator {
    /// Starts the emulator on a free port with `args` added.
    fn start(args: &[&str]) -> Emulator {
        let mut child = Command::new(emulator_binary())
            .args(["--listen", "127.0.0.1:0", "--sas-key-name", KEY_NAME, "--sas-key", KEY])
            .args(args)
            .env_clear()
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start steward-sb-emulator");
        let logs: Arc<Mutex<Vec<String>>> = Arc::default();
        let (found, listening) = std::sync::mpsc::channel();
        collect_lines(child.stderr.take().unwrap(), logs.clone(), "listening", found);
        let Ok(line) = listening.recv_timeout(LIMIT) else {
            let _ = child.kill();
            panic!("steward-sb-emulator did not start: {:#?}", logs.lock().unwrap());
        };
        let addr = line.split("addr=").nth(1).unwrap().split_whitespace().next().unwrap();
        Emulator { child, endpoint: format!("http://{addr}"), logs }
    }

    /// Starts the emulator with only the queues of a prepared TRE namespace, `extra`
    /// added: other queues do not exist (410), as on a real namespace.
    fn with_queues(extra: &[&str]) -> Emulator {
        let mut args = vec!["--no-auto-create"];
        for queue in QUEUES {
            args.extend(["--queue", queue]);
        }
        args.extend(extra);
        Emulator::start(&args)
    }

    /// The environment that points `steward-api` at this emulator.
    fn api_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("STEWARD_TRANSPORT", "servicebus".to_owned()),
            ("STEWARD_SERVICEBUS_ENDPOINT", self.endpoint.clone()),
            ("SERVICE_BUS_SAS_KEY_NAME", KEY_NAME.to_owned()),
            ("SERVICE_BUS_SAS_KEY", KEY.to_owned()),
            ("STEWARD_SIMULATE_PROCESSORS", "false".to_owned()),
        ]
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A message peek-locked over REST.
#[derive(Debug)]
struct Locked {
    /// The `BrokerProperties` header.
    props: Value,
    /// Custom properties (lower case), their values JSON-decoded.
    properties: serde_json::Map<String, Value>,
    body: String,
    /// The lock URI, to complete or unlock.
    location: String,
}

/// A plain HTTP client of the emulator's REST API, signing as a namespace's shared
/// access policy does: what TRE's resource processor would do over REST.
struct Rest {
    endpoint: String,
    http: reqwest::Client,
}

impl Rest {
    fn new(emulator: &Emulator) -> Rest {
        Rest { endpoint: emulator.endpoint.clone(), http: reqwest::Client::new() }
    }

    /// A shared access signature for the whole namespace, as Microsoft documents it:
    /// the base64 HMAC-SHA256 of the form-encoded resource URI, a newline and the expiry.
    fn token() -> String {
        fn encode(text: &str) -> String {
            text.bytes()
                .map(|b| match b {
                    b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                        char::from(b).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect()
        }
        let sr = encode("https://sb-blackbox.servicebus.windows.net/");
        let se = (SystemTime::now() + Duration::from_secs(3600))
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut mac = Hmac::<Sha256>::new_from_slice(KEY.as_bytes()).unwrap();
        mac.update(format!("{sr}\n{se}").as_bytes());
        let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        format!("SharedAccessSignature sr={sr}&sig={}&se={se}&skn={KEY_NAME}", encode(&sig))
    }

    /// Sends a JSON `body` to `queue` with `broker_properties`.
    async fn send(&self, queue: &str, broker_properties: Value, body: &str) {
        let response = self
            .http
            .post(format!("{}/{queue}/messages", self.endpoint))
            .header("Authorization", Self::token())
            .header("Content-Type", "application/json")
            .header("BrokerProperties", broker_properties.to_string())
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED, "send to {queue}");
    }

    /// Peek-locks the first message of `queue`, waiting up to `wait_secs`.
    async fn peek_lock(&self, queue: &str, wait_secs: u64) -> Option<Locked> {
        let response = self
            .http
            .post(format!("{}/{queue}/messages/head?timeout={wait_secs}", self.endpoint))
            .header("Authorization", Self::token())
            .send()
            .await
            .unwrap();
        match response.status() {
            StatusCode::NO_CONTENT => None,
            StatusCode::CREATED => {
                let headers = response.headers().clone();
                let text = |name: &str| headers[name].to_str().unwrap().to_owned();
                let props: Value = serde_json::from_str(&text("brokerproperties")).unwrap();
                let properties = headers
                    .iter()
                    .filter_map(|(name, value)| {
                        let value = serde_json::from_str(value.to_str().ok()?).ok()?;
                        Some((name.as_str().to_owned(), value))
                    })
                    .filter(|(name, _)| name.starts_with("deadletter") || name.starts_with("x-"))
                    .collect();
                let location = text("location");
                Some(Locked { props, properties, body: response.text().await.unwrap(), location })
            }
            status => panic!("peek-lock on {queue}: {status} {}", response.text().await.unwrap()),
        }
    }

    /// Waits until `queue` has a message, and peek-locks it.
    async fn next(&self, queue: &str) -> Locked {
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some(locked) = self.peek_lock(queue, 5).await {
                return locked;
            }
            assert!(Instant::now() < deadline, "nothing arrived on {queue}");
        }
    }

    /// Completes (`DELETE`) or unlocks (`PUT`) a locked message.
    async fn settle(&self, locked: &Locked, method: reqwest::Method) {
        let response = self
            .http
            .request(method.clone(), &locked.location)
            .header("Authorization", Self::token())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{method} {}", locked.location);
    }
}

/// Ensures that `steward-api` built with `servicebus` runs on the standalone emulator
/// with a namespace prepared as the docs say: a workspace created over HTTP is sent to
/// the resource processor on `workspacequeue` (played here over REST), the processor's
/// status updates (session id = operation id, correlation id = resource id) take it to
/// `deployed` with its outputs merged; a malformed status update ends in
/// `deploymentstatus.dlq` with reason `MessageFormatIncorrect`, and nothing in the
/// service locks it again there; SIGTERM ends the service with exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_reaches_deployed_over_the_emulator_and_malformed_updates_are_dead_lettered() {
    let emulator = Emulator::with_queues(&[]);
    let bus = Rest::new(&emulator);
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(dir.path(), &emulator.api_env());
    assert_eq!(api.listening["transport"], "servicebus", "{}", api.listening);
    api.answers_ok("/readyz").await;

    // A malformed update: dead-lettered to `<queue>.dlq`, with the reason.
    bus.send("deploymentstatus", json!({"MessageId": "malformed-1"}), "{not json").await;
    let dead = bus.next("deploymentstatus.dlq").await;
    assert_eq!(dead.props["MessageId"], "malformed-1", "{dead:?}");
    assert_eq!(dead.props["DeliveryCount"], 1, "{dead:?}");
    assert_eq!(dead.body, "{not json");
    assert_eq!(dead.properties["deadletterreason"], "MessageFormatIncorrect", "{dead:?}");
    let description = dead.properties["deadlettererrordescription"].as_str().unwrap();
    assert!(description.contains("not formatted correctly"), "{description}");
    bus.settle(&dead, reqwest::Method::PUT).await;
    let unlocked = Instant::now();
    assert!(
        bus.peek_lock("deploymentstatus", 0).await.is_none(),
        "the malformed message is not delivered again"
    );

    // A workspace, with the test as its resource processor.
    let (status, created) = api
        .call(
            reqwest::Method::POST,
            "/api/resources",
            Some(json!({"templateName": "tre-workspace-base", "resourceType": "workspace",
                "properties": {"display_name": "Genomics", "description": "Sequencing data"}})),
        )
        .await;
    assert_eq!(status, 202, "{created}");
    let operation_id = created["operation"]["id"].as_str().unwrap().to_owned();
    let resource_id = created["operation"]["resourceId"].as_str().unwrap().to_owned();

    let request = bus.next("workspacequeue").await;
    assert_eq!(request.props["SessionId"], resource_id.as_str(), "{request:?}");
    assert_eq!(request.props["CorrelationId"], operation_id.as_str(), "{request:?}");
    let body: Value = serde_json::from_str(&request.body).unwrap();
    assert_eq!(body["operationId"], operation_id.as_str(), "{body}");
    assert_eq!(body["id"], resource_id.as_str(), "{body}");
    assert_eq!(body["action"], "install", "{body}");
    assert_eq!(body["name"], "tre-workspace-base", "{body}");
    assert_eq!(body["parameters"]["display_name"], "Genomics", "{body}");

    let update_properties = |n: u32| {
        json!({"SessionId": operation_id, "CorrelationId": resource_id,
            "MessageId": format!("{operation_id}-{n}")})
    };
    bus.send(
        "deploymentstatus",
        update_properties(1),
        &status_update(&body, "deploying", "deploying", json!([])),
    )
    .await;
    api.operation_reaches(&operation_id, "deploying").await;
    let outputs = json!([
        {"name": "address_spaces", "value": ["10.2.0.0/24"], "type": "string"},
        {"name": "workspace_url", "value": "'https://genomics.example'", "type": "string"},
    ]);
    bus.send(
        "deploymentstatus",
        update_properties(2),
        &status_update(&body, "deployed", "deployed", outputs),
    )
    .await;
    bus.settle(&request, reqwest::Method::DELETE).await;
    let done = api.operation_reaches(&operation_id, "deployed").await;
    assert_eq!(done["steps"][0]["status"], "deployed", "{done:#}");
    let resource = api.get(&format!("/api/resources/{resource_id}")).await["resource"].clone();
    assert_eq!(resource["deploymentStatus"], "deployed", "{resource:#}");
    assert_eq!(resource["properties"]["address_spaces"], json!(["10.2.0.0/24"]), "{resource:#}");
    assert_eq!(resource["properties"]["workspace_url"], "https://genomics.example", "{resource:#}");
    assert!(bus.peek_lock("deploymentstatus", 0).await.is_none(), "every update was completed");
    assert!(bus.peek_lock("workspacequeue", 0).await.is_none(), "one request for one step");

    // The service watches the transport every 10 s; that must not lock the dead letter
    // (each lock counts a delivery, and enough of them move it on to `$DeadLetterQueue`).
    let watched = Duration::from_secs(12);
    tokio::time::sleep(watched.saturating_sub(unlocked.elapsed())).await;
    let again = bus.next("deploymentstatus.dlq").await;
    assert_eq!(again.props["MessageId"], "malformed-1");
    assert_eq!(again.props["DeliveryCount"], 2, "only this test's two reads: {again:?}");
    bus.settle(&again, reqwest::Method::PUT).await;

    let (status, health) = api.call(reqwest::Method::GET, "/health", None).await;
    assert_eq!(status, 200);
    assert!(health["services"].as_array().unwrap().iter().all(|s| s["status"] == "OK"), "{health}");
    let (status, _, logs) = api.terminate(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{logs:#?}");
    let mut emulator = emulator;
    sigterm(&emulator.child);
    let status = wait_for_exit(&mut emulator.child, Duration::from_secs(30), &emulator.logs);
    assert_eq!(status.code(), Some(0), "the emulator: {:#?}", emulator.logs.lock().unwrap());
}

/// Ensures that a namespace steward cannot consume from stops the start with exit 2 and
/// one line naming the queue: `deploymentstatus` still session-enabled as TRE creates
/// it, or `airlock-step-result.dlq` missing.
#[test]
fn unprepared_namespace_stops_the_start_with_the_queue_named() {
    let cases: [(&[&str], &str, &[&str]); 2] = [
        (
            &["--session-queue", "deploymentstatus"],
            "session",
            &[
                "--queue",
                "deploymentstatus.dlq",
                "--queue",
                "airlock-step-result",
                "--queue",
                "airlock-step-result.dlq",
            ],
        ),
        (
            &[],
            "airlock-step-result.dlq",
            &[
                "--queue",
                "deploymentstatus",
                "--queue",
                "deploymentstatus.dlq",
                "--queue",
                "airlock-step-result",
            ],
        ),
    ];
    for (extra, says, queues) in cases {
        let mut args = vec!["--no-auto-create"];
        args.extend(extra);
        args.extend(queues);
        let emulator = Emulator::start(&args);
        let dir = tempfile::tempdir().unwrap();
        let mut command = api_command(dir.path(), &emulator.api_env());
        command.env("RUST_LOG", "off");
        let mut child = command.spawn().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
            let _ = tx.send(text);
        });
        let Ok(stderr) = rx.recv_timeout(LIMIT) else {
            let _ = child.kill();
            panic!("steward-api did not stop on {args:?}");
        };
        let status = wait_for_exit(&mut child, LIMIT, &Mutex::new(vec![stderr.clone()]));
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(status.code(), Some(2), "{args:?}: {lines:#?}");
        assert_eq!(lines.len(), 1, "{args:?}: {lines:#?}");
        assert!(lines[0].starts_with("steward-api: "), "{lines:#?}");
        assert!(lines[0].contains(says), "{args:?}: {lines:#?}");
        let queue = if says == "session" { "deploymentstatus" } else { says };
        assert!(lines[0].contains(queue), "{args:?}: {lines:#?}");
    }
}

/// A schema of the test's own on PostgreSQL (`STEWARD_TEST_POSTGRES_URL`), dropped when
/// this is dropped; `None` after a skip line when PostgreSQL is unreachable (a failure
/// with `CI=true`).
struct Schema {
    admin_url: String,
    name: String,
}

impl Schema {
    async fn create(test: &str) -> Option<Schema> {
        use sqlx::{Connection, Executor};
        sqlx::any::install_default_drivers();
        let admin_url = std::env::var("STEWARD_TEST_POSTGRES_URL")
            .ok()
            .filter(|url| !url.is_empty())
            .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let connect = sqlx::AnyConnection::connect(&admin_url);
        let mut admin = match tokio::time::timeout(Duration::from_secs(10), connect).await {
            Ok(Ok(admin)) => admin,
            failed => {
                let reason = match failed {
                    Ok(Err(error)) => error.to_string(),
                    _ => "timed out".to_owned(),
                };
                assert!(
                    !std::env::var("CI").is_ok_and(|ci| ci == "true"),
                    "{test}: PostgreSQL at {admin_url} is unreachable with CI=true: {reason}"
                );
                eprintln!("skipped {test}: PostgreSQL at {admin_url} is unreachable ({reason})");
                return None;
            }
        };
        let name = format!("steward_sb_replicas_{}", uuid::Uuid::new_v4().simple());
        admin.execute(format!("CREATE SCHEMA {name}").as_str()).await.unwrap();
        admin.close().await.unwrap();
        Some(Schema { admin_url, name })
    }

    /// The database URL of the replicas: the test's schema first on the search path.
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

/// Ensures that with two replicas consuming one queue without sessions (both on the
/// emulator and one PostgreSQL database), an operation's `deployed` sent before its
/// `deploying` ends `deployed` with its outputs merged: whichever replica handles
/// which, and in whichever order, the late `deploying` is not applied over the final
/// status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_end_a_reordered_deploying_deployed_pair_deployed() {
    const TEST: &str = "two_replicas_end_a_reordered_deploying_deployed_pair_deployed";
    let Some(schema) = Schema::create(TEST).await else { return };
    let emulator = Emulator::with_queues(&[]);
    let bus = Rest::new(&emulator);
    let mut env = emulator.api_env();
    env.push(("STEWARD_DATABASE_URL", schema.url()));
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    // One after the other: the first migrates the schema.
    let first = Api::start(dirs[0].path(), &env);
    first.ready().await;
    let second = Api::start(dirs[1].path(), &env);
    second.ready().await;

    let mut operations = Vec::new();
    for (n, api) in [&first, &second, &first, &second].into_iter().enumerate() {
        let (resource_id, operation_id) = api.install_workspace(&format!("W{n}")).await;
        let request = bus.next("workspacequeue").await;
        bus.settle(&request, reqwest::Method::DELETE).await;
        let body: Value = serde_json::from_str(&request.body).unwrap();
        assert_eq!(body["operationId"], operation_id.as_str(), "{body}");
        operations.push((n, resource_id, operation_id, body));
    }
    // Each operation's pair, reordered: `deployed` first.
    for (n, resource_id, operation_id, body) in &operations {
        let outputs = json!([{"name": "address_spaces", "value": [format!("10.3.{n}.0/24")], "type": "string"}]);
        let statuses = [("deployed", outputs), ("deploying", json!([]))];
        for (k, (status, outputs)) in statuses.into_iter().enumerate() {
            let properties = json!({"SessionId": operation_id, "CorrelationId": resource_id,
                "MessageId": format!("{operation_id}-{k}")});
            bus.send("deploymentstatus", properties, &status_update(body, status, status, outputs))
                .await;
        }
    }
    // Both replicas handled all eight reports between them.
    let deadline = Instant::now() + LIMIT;
    loop {
        let mut completed = 0;
        for api in [&first, &second] {
            completed += api.worker("deployment-status").await["completed"].as_u64().unwrap();
        }
        if completed >= 8 {
            break;
        }
        assert!(Instant::now() < deadline, "{completed} of 8 reports handled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (n, resource_id, operation_id, _) in &operations {
        let operation =
            first.get(&format!("/api/operations/{operation_id}")).await["operation"].clone();
        assert_eq!(operation["status"], "deployed", "{operation:#}");
        assert_eq!(operation["steps"][0]["status"], "deployed", "{operation:#}");
        let resource =
            second.get(&format!("/api/resources/{resource_id}")).await["resource"].clone();
        assert_eq!(resource["deploymentStatus"], "deployed", "{resource:#}");
        let address = json!([format!("10.3.{n}.0/24")]);
        assert_eq!(resource["properties"]["address_spaces"], address, "{resource:#}");
    }
    assert!(bus.peek_lock("deploymentstatus", 0).await.is_none(), "every report completed");
    assert!(bus.peek_lock("deploymentstatus.dlq", 0).await.is_none(), "nothing dead-lettered");
    for (name, api) in [("first", first), ("second", second)] {
        let completed = api.worker("deployment-status").await["completed"].clone();
        let (status, _, logs) = api.terminate(Duration::from_secs(30));
        assert_eq!(status.code(), Some(0), "{logs:#?}");
        let stale = logs.iter().filter(|line| line.contains("already final; not applied")).count();
        println!("{name} replica: {completed} reports handled, {stale} stale ones not applied");
    }
}
