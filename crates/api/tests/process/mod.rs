//! Runs the `steward-api` binary for black-box tests: started on a free port with a
//! SQLite database in a temporary directory, talked to over HTTP, stopped with SIGTERM.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// No extra environment.
pub const NO_ENV: &[(&str, &str)] = &[];

/// How long the tests wait for something that should happen soon.
pub const LIMIT: Duration = Duration::from_secs(60);

/// The `steward-api` command: a free port, a SQLite database in `dir`, JSON logs at
/// info, nothing else from the test's environment but `PATH`, then `env`.
pub fn command<K: AsRef<OsStr>, V: AsRef<OsStr>>(dir: &Path, env: &[(K, V)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_steward-api"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("STEWARD_LISTEN", "127.0.0.1:0")
        .env(
            "STEWARD_DATABASE_URL",
            format!("sqlite://{}?mode=rwc", dir.join("steward.db").display()),
        )
        .env("STEWARD_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    command
}

/// Keeps every line of `stderr` in `logs` on a thread of its own, sending the first line
/// containing `marker` through `found`; the thread ends with the process.
pub fn collect_lines(
    stderr: ChildStderr,
    logs: Arc<Mutex<Vec<String>>>,
    marker: &'static str,
    found: std::sync::mpsc::Sender<String>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(marker) {
                let _ = found.send(line.clone());
            }
            logs.lock().unwrap().push(line);
        }
    })
}

/// Sends SIGTERM to `child`.
pub fn sigterm(child: &Child) {
    let sent =
        Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(sent.success(), "kill -TERM failed");
}

/// Waits for `child` to exit, at most `within`; kills it and panics with its logs after.
pub fn wait_for_exit(child: &mut Child, within: Duration, logs: &Mutex<Vec<String>>) -> ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if started.elapsed() > within {
            let _ = child.kill();
            panic!("the process did not exit within {within:?}: {:#?}", logs.lock().unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `broker` accepts TCP connections at `address`. With `CI=true` an unreachable
/// broker fails the test; otherwise the test prints one skip line and returns.
pub async fn reachable(test: &str, broker: &str, address: &str) -> bool {
    let connect = tokio::net::TcpStream::connect(address.to_owned());
    let reachable =
        matches!(tokio::time::timeout(Duration::from_secs(3), connect).await, Ok(Ok(_)));
    if !reachable {
        if std::env::var("CI").is_ok_and(|ci| ci == "true") {
            panic!("{test}: {broker} is not reachable at {address} and CI=true");
        }
        eprintln!("skipped {test}: {broker} is not reachable at {address}");
    }
    reachable
}

/// The five queues of one test, uniquely named after it.
pub struct QueueNames {
    pub deployment_status: String,
    pub step_result: String,
    pub resource_request: String,
    pub airlock_status_changed: String,
    pub airlock_notification: String,
}

impl QueueNames {
    pub fn new(test: &str) -> QueueNames {
        let prefix = steward_core::testkit::unique_name(&format!("steward-api-{test}"));
        let name = |queue: &str| format!("{prefix}-{queue}");
        QueueNames {
            deployment_status: name("deploymentstatus"),
            step_result: name("airlock-step-result"),
            resource_request: name("workspacequeue"),
            airlock_status_changed: name("airlock-status-changed"),
            airlock_notification: name("airlock-notification"),
        }
    }

    /// The environment that puts the service on these queues, after `transport`'s.
    pub fn env(&self, transport: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
        let mut env = transport.to_vec();
        env.extend([
            ("SERVICE_BUS_DEPLOYMENT_STATUS_UPDATE_QUEUE", self.deployment_status.clone()),
            ("SERVICE_BUS_STEP_RESULT_QUEUE", self.step_result.clone()),
            ("SERVICE_BUS_RESOURCE_REQUEST_QUEUE", self.resource_request.clone()),
            ("STEWARD_AIRLOCK_STATUS_CHANGED_QUEUE", self.airlock_status_changed.clone()),
            ("STEWARD_AIRLOCK_NOTIFICATION_QUEUE", self.airlock_notification.clone()),
        ]);
        env
    }
}

/// Runs `cleanup` to its end on a thread and runtime of its own (a `Drop` cannot await,
/// and may run inside the test's runtime); a failure prints `<what> failed: <error>`.
pub fn clean_up<E>(what: &str, cleanup: impl Future<Output = Result<(), E>> + Send + 'static)
where
    E: std::error::Error + 'static,
{
    let deleting = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(cleanup).map_err(|error| steward_core::error_chain(&error))
    });
    if let Ok(Err(error)) = deleting.join() {
        eprintln!("{what} failed: {error}");
    }
}

/// The ids of the messages from `queue` the deployment-status handler parsed, from the
/// service's JSON log lines (TRE's "Received and parsed JSON for" line).
pub fn handled_messages(logs: &[String], queue: &str) -> BTreeSet<String> {
    logs.iter()
        .filter(|line| line.contains("Received and parsed JSON for"))
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["queue"] == queue)
        .filter_map(|line| line["message_id"].as_str().map(str::to_owned))
        .collect()
}

/// A TRE deployment-status body (reference §4.2) answering resource request `request`,
/// with the message `<resource id>: <message>`.
pub fn status_update(request: &Value, status: &str, message: &str, outputs: Value) -> String {
    json!({
        "operationId": request["operationId"],
        "stepId": request["stepId"],
        "id": request["id"],
        "status": status,
        "message": format!("{}: {message}", request["id"].as_str().unwrap()),
        "outputs": outputs,
    })
    .to_string()
}

/// Asserts that every message in `published` was handled, before or after a shutdown.
pub fn assert_all_handled(
    published: &BTreeSet<String>,
    before: &BTreeSet<String>,
    after: &BTreeSet<String>,
) {
    let handled: BTreeSet<_> = before.union(after).cloned().collect();
    let missing: Vec<_> = published.difference(&handled).collect();
    assert!(missing.is_empty(), "statuses never handled: {missing:?}");
}

/// A running `steward-api` process, killed when dropped.
pub struct Api {
    pub child: Child,
    pub base: String,
    pub logs: Arc<Mutex<Vec<String>>>,
    /// The `steward-api listening` log line.
    pub listening: Value,
    pub client: reqwest::Client,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Api {
    /// Starts the binary with the database in `dir` and `env`; waits until it listens.
    pub fn start<K: AsRef<OsStr>, V: AsRef<OsStr>>(dir: &Path, env: &[(K, V)]) -> Api {
        let mut child = command(dir, env).spawn().expect("start steward-api");
        let logs: Arc<Mutex<Vec<String>>> = Arc::default();
        let (found, listening) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        let reader = collect_lines(stderr, logs.clone(), "steward-api listening", found);
        let Ok(line) = listening.recv_timeout(LIMIT) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("steward-api did not start: {:#?}", logs.lock().unwrap());
        };
        let listening: Value = serde_json::from_str(&line).expect("JSON log line");
        let base = listening["address"].as_str().expect("address").to_owned();
        Api { child, base, logs, listening, client: reqwest::Client::new(), reader: Some(reader) }
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn get(&self, path: &str) -> Value {
        let (status, body) = self.call(reqwest::Method::GET, path, None).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    pub async fn post(&self, path: &str, body: Value) -> Value {
        let (status, body) = self.call(reqwest::Method::POST, path, Some(body)).await;
        assert!((200..300).contains(&status), "POST {path}: {status} {body}");
        body
    }

    /// Waits until `path` answers 200.
    pub async fn answers_ok(&self, path: &str) {
        let deadline = Instant::now() + LIMIT;
        loop {
            let (status, body) = self.call(reqwest::Method::GET, path, None).await;
            if status == 200 {
                return;
            }
            assert!(Instant::now() < deadline, "{path}: {status} {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the routes that read and write the database are served: until the
    /// database has been reached and migrated, they answer 503 `unavailable`.
    pub async fn serving(&self) {
        self.answers_ok("/api/resources").await;
    }

    /// Waits until `/livez` and `/readyz` answer 200: the workers reached the broker and
    /// the database.
    pub async fn ready(&self) {
        self.answers_ok("/livez").await;
        self.answers_ok("/readyz").await;
    }

    /// Asks for a resource; returns its id and its operation's id.
    pub async fn install(&self, body: Value) -> (String, String) {
        let created = self.post("/api/resources", body).await;
        let operation = &created["operation"];
        (
            operation["resourceId"].as_str().unwrap().to_owned(),
            operation["id"].as_str().unwrap().to_owned(),
        )
    }

    /// Asks for a new workspace named `name`.
    pub async fn install_workspace(&self, name: &str) -> (String, String) {
        self.install(json!({"templateName": "tre-workspace-base", "resourceType": "workspace",
            "properties": {"display_name": name, "description": "Sequencing data"}}))
            .await
    }

    /// Asks for `n` workspaces `W0`, `W1`, …; returns their resource ids by operation id.
    pub async fn install_workspaces(&self, n: usize) -> BTreeMap<String, String> {
        let mut created = BTreeMap::new();
        for n in 0..n {
            let (resource_id, operation_id) = self.install_workspace(&format!("W{n}")).await;
            created.insert(operation_id, resource_id);
        }
        created
    }

    /// Waits until operation `id` has `status`, or panics naming where it is.
    pub async fn operation_reaches(&self, id: &str, status: &str) -> Value {
        let deadline = Instant::now() + LIMIT;
        loop {
            let operation = self.get(&format!("/api/operations/{id}")).await["operation"].clone();
            if operation["status"] == status {
                return operation;
            }
            assert!(
                Instant::now() < deadline,
                "operation {id} stuck: {operation:#}\n{:#?}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until airlock request `id` has `status`.
    pub async fn airlock_reaches(&self, id: &str, status: &str) -> Value {
        let deadline = Instant::now() + LIMIT;
        loop {
            let request =
                self.get(&format!("/api/airlock-requests/{id}")).await["airlockRequest"].clone();
            if request["status"] == status {
                return request;
            }
            assert!(Instant::now() < deadline, "airlock request {id} stuck: {request:#}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Worker `name` as `/api/workers` shows it.
    pub async fn worker(&self, name: &str) -> Value {
        let workers = self.get("/api/workers").await;
        workers["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["name"] == name)
            .unwrap_or_else(|| panic!("no worker {name}: {workers}"))
            .clone()
    }

    /// Waits until counter `counter` of worker `name` is at least `at_least` (counters
    /// move just after the broker settled a message), and returns the worker.
    pub async fn worker_counts(&self, name: &str, counter: &str, at_least: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let worker = self.worker(name).await;
            if worker[counter].as_u64().is_some_and(|n| n >= at_least) {
                return worker;
            }
            assert!(Instant::now() < deadline, "{name} {counter} stays below {at_least}: {worker}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Sends SIGTERM and waits for the exit, at most `within`; returns the exit status,
    /// how long it took, and every log line the process wrote.
    pub fn terminate(mut self, within: Duration) -> (ExitStatus, Duration, Vec<String>) {
        let started = Instant::now();
        sigterm(&self.child);
        let status = wait_for_exit(&mut self.child, within, &self.logs);
        let elapsed = started.elapsed();
        // The process is gone: its stderr ends, and the reader with it.
        if let Some(reader) = self.reader.take() {
            reader.join().expect("log reader");
        }
        (status, elapsed, self.logs())
    }
}

/// What [`Api::stop`] returns: how long the exit took, and every log line.
pub type Stopped = (Duration, Vec<String>);

impl Api {
    /// Sends SIGTERM and asserts the process exits successfully within `within`.
    pub fn stop(self, within: Duration) -> Stopped {
        let (status, elapsed, logs) = self.terminate(within);
        assert!(status.success(), "exit {status:?}");
        (elapsed, logs)
    }

    /// Restarts on `dir` and `env` and sends SIGTERM as soon as the deployment-status
    /// updater completed a message; asserts an exit 0 within `drain` + 5 s, and returns
    /// the messages from `queue` handled before it (at least one).
    pub async fn interrupted(
        dir: &Path,
        env: &[(&'static str, String)],
        drain: Duration,
        queue: &str,
    ) -> BTreeSet<String> {
        let api = Api::start(dir, env);
        api.worker_counts("deployment-status", "completed", 1).await;
        let (elapsed, logs) = api.stop(drain + Duration::from_secs(5));
        assert!(elapsed <= drain + Duration::from_secs(5), "took {elapsed:?}");
        let before = handled_messages(&logs, queue);
        assert!(!before.is_empty(), "nothing was handled before the shutdown");
        before
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
