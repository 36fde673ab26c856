//! Black-box tests of the `steward-api` binary: it is started on a free port with a
//! temporary SQLite database, and talked to only over HTTP and with signals.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod process;

use std::process::Command;
use std::time::{Duration, Instant};

use process::{Api, NO_ENV};
use serde_json::{Value, json};

fn firewall() -> Value {
    json!({"templateName": "tre-shared-service-firewall", "resourceType": "shared-service"})
}

fn workspace(name: &str) -> Value {
    json!({"templateName": "tre-workspace-base", "resourceType": "workspace",
        "properties": {"display_name": name, "description": "Sequencing data", "client_secret": "hunter2"}})
}

/// Ensures that the README walk-through works against the real binary: a firewall, a
/// workspace, a Guacamole service and a Linux VM whose three-step install reaches
/// `deployed`, with outputs merged; upgrade, custom action and uninstall reach their
/// final statuses; an airlock request goes from draft to approved with its history;
/// approving a draft is refused; and the probes are green throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walkthrough_reaches_final_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(dir.path(), NO_ENV);
    api.ready().await;

    let (firewall_id, op) = api.install(firewall()).await;
    api.operation_reaches(&op, "deployed").await;
    let (workspace_id, op) = api.install(workspace("Genomics")).await;
    api.operation_reaches(&op, "deployed").await;
    let ws = api.get(&format!("/api/resources/{workspace_id}")).await["resource"].clone();
    assert_eq!(ws["deploymentStatus"], "deployed");
    assert_eq!(ws["properties"]["address_spaces"], json!(["10.1.0.0/24"]), "outputs merged: {ws}");
    assert_eq!(ws["properties"]["client_secret"], "REDACTED");

    let (service_id, op) = api
        .install(
            json!({"templateName": "tre-service-guacamole", "resourceType": "workspace-service",
            "workspaceId": workspace_id, "properties": {"display_name": "Desktops"}}),
        )
        .await;
    api.operation_reaches(&op, "deployed").await;

    let (vm_id, op) = api
        .install(json!({"templateName": "tre-user-resource-linuxvm", "resourceType": "user-resource",
            "workspaceId": workspace_id, "parentWorkspaceServiceId": service_id,
            "properties": {"display_name": "VM 1", "os_image": "Ubuntu 22.04 LTS", "admin_password": "pa55word!"}}))
        .await;
    let done = api.operation_reaches(&op, "deployed").await;
    let steps = done["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 3, "{done:#}");
    let statuses: Vec<_> = steps.iter().map(|s| s["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["updated", "deployed", "updated"]);
    assert_eq!(steps[0]["resourceId"], firewall_id.as_str());
    assert_eq!(steps[1]["resourceId"], vm_id.as_str());
    assert_eq!(done["message"], "Multi step pipeline completed successfully");
    let vm = api.get(&format!("/api/resources/{vm_id}")).await["resource"].clone();
    assert_eq!(vm["deploymentStatus"], "deployed");
    assert_eq!(vm["properties"]["ip_address"], "10.1.0.4", "outputs merged: {vm}");
    assert_eq!(vm["properties"]["admin_password"], "REDACTED");
    let fw = api.get(&format!("/api/resources/{firewall_id}")).await["resource"].clone();
    assert_eq!(fw["resourceVersion"], 2, "the pipeline patched the firewall twice: {fw}");
    let rules = fw["properties"]["rule_collections"].as_array().unwrap();
    assert!(rules.iter().any(|r| r["name"] == format!("arc_linuxvm_{vm_id}")), "{fw}");

    // Upgrade, custom action, uninstall.
    let (status, upgrade) = api
        .call(
            reqwest::Method::PATCH,
            &format!("/api/resources/{workspace_id}"),
            Some(json!({"properties": {"display_name": "Genomics 2"}})),
        )
        .await;
    assert_eq!(status, 202, "{upgrade}");
    api.operation_reaches(upgrade["operation"]["id"].as_str().unwrap(), "updated").await;
    let ws = api.get(&format!("/api/resources/{workspace_id}")).await["resource"].clone();
    assert_eq!(ws["properties"]["display_name"], "Genomics 2");
    let started = api.post(&format!("/api/resources/{vm_id}/actions/start"), json!(null)).await;
    api.operation_reaches(started["operation"]["id"].as_str().unwrap(), "action_succeeded").await;
    let (status, removed) =
        api.call(reqwest::Method::DELETE, &format!("/api/resources/{vm_id}"), None).await;
    assert_eq!(status, 202, "{removed}");
    api.operation_reaches(removed["operation"]["id"].as_str().unwrap(), "deleted").await;
    let ops = api.get(&format!("/api/resources/{vm_id}/operations")).await;
    let actions: Vec<_> = ops["operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["action"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(actions, ["install", "start", "uninstall"]);

    // Airlock: draft → submitted → in_review → approval_in_progress → approved.
    let created = api
        .post(
            "/api/airlock-requests",
            json!({"workspaceId": workspace_id, "type": "import", "title": "Run 42"}),
        )
        .await;
    let id = created["airlockRequest"]["id"].as_str().unwrap().to_owned();
    let (status, refused) = api
        .call(
            reqwest::Method::POST,
            &format!("/api/airlock-requests/{id}/review"),
            Some(json!({"reviewDecision": "approved", "decisionExplanation": "too early"})),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        refused,
        json!({"error": "illegal_status_change", "detail": "Airlock request status change was illegal"})
    );
    api.post(&format!("/api/airlock-requests/{id}/submit"), json!(null)).await;
    let in_review = api.airlock_reaches(&id, "in_review").await;
    let files = in_review["files"].as_array().unwrap();
    assert_eq!(files.len(), 1, "{in_review:#}");
    assert_eq!(files[0]["name"], "data.csv");
    assert_eq!(files[0]["size"].as_f64(), Some(1024.0));
    api.post(
        &format!("/api/airlock-requests/{id}/review"),
        json!({"reviewDecision": "approved", "decisionExplanation": "No identifiable data"}),
    )
    .await;
    let approved = api.airlock_reaches(&id, "approved").await;
    let previous: Vec<_> = approved["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["properties"]["previousStatus"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        previous,
        ["draft", "submitted", "submitted", "in_review", "approval_in_progress"],
        "{approved:#}"
    );
    assert_eq!(approved["reviews"][0]["reviewDecision"], "approved");

    for probe in ["/livez", "/readyz"] {
        let (status, body) = api.call(reqwest::Method::GET, probe, None).await;
        assert_eq!(status, 200, "{probe}: {body}");
    }
    let health = api.get("/health").await;
    assert!(health["services"].as_array().unwrap().iter().all(|s| s["status"] == "OK"), "{health}");
    let (elapsed, _) = api.stop(Duration::from_secs(30));
    assert!(elapsed < Duration::from_secs(30));
}

/// Ensures that `/metrics` is valid Prometheus text and that its processed-message
/// counter equals the messages the deployment-status updater handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_handled_messages() {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(dir.path(), NO_ENV);
    api.serving().await;
    let (_, first) = api.install(firewall()).await;
    let (_, second) = api.install(workspace("Metrics")).await;
    api.operation_reaches(&first, "deployed").await;
    api.operation_reaches(&second, "deployed").await;
    // Each single-step operation gets two status messages: in progress, then final.
    let expected = 4.0;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = api
            .client
            .get(format!("{}/metrics", api.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
        let counter = scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == "steward_messages_total"
                    && s.labels.get("worker") == Some("deployment-status")
                    && s.labels.get("outcome") == Some("complete")
            })
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            });
        let workers = api.get("/api/workers").await;
        let handled = workers["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["name"] == "deployment-status")
            .unwrap()["completed"]
            .as_f64()
            .unwrap();
        if counter == Some(expected) && handled == expected {
            assert!(
                scrape
                    .samples
                    .iter()
                    .any(|s| s.metric.starts_with("steward_handler_duration_seconds"))
            );
            assert!(scrape.samples.iter().any(|s| s.metric == "steward_outbox_backlog"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "counter {counter:?}, handled {handled}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Ensures that SIGTERM with more than 50 operations in flight exits 0 within the drain
/// timeout + 5 s, and that after restarts on the same database every operation reaches
/// its final status.
///
/// The first run has no processor, so the signal is sure to find every resource request
/// still queued in the in-process broker. The second run has the processors. It gets
/// the signal as soon as the first status is handled, while the rest are on their way.
/// The third run finishes them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_operations_in_flight_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let drain = Duration::from_secs(5);
    let api = Api::start(
        dir.path(),
        &[("STEWARD_DRAIN_TIMEOUT", "5s"), ("STEWARD_SIMULATE_PROCESSORS", "false")],
    );
    api.serving().await;
    let mut operations = Vec::new();
    let (_, op) = api.install(firewall()).await;
    operations.push(op);
    for i in 0..60 {
        let (_, op) = api.install(workspace(&format!("W{i}"))).await;
        operations.push(op);
    }
    for op in &operations {
        let operation = api.get(&format!("/api/operations/{op}")).await["operation"].clone();
        assert_ne!(operation["status"], "deployed", "deployed without a processor: {operation:#}");
    }
    let (elapsed, _) = api.stop(drain + Duration::from_secs(5));
    assert!(elapsed <= drain + Duration::from_secs(5), "took {elapsed:?}");

    let api = Api::start(dir.path(), &[("STEWARD_DRAIN_TIMEOUT", "5s")]);
    api.worker_counts("deployment-status", "completed", 1).await;
    let (elapsed, _) = api.stop(drain + Duration::from_secs(5));
    assert!(elapsed <= drain + Duration::from_secs(5), "took {elapsed:?}");

    let api = Api::start(dir.path(), NO_ENV);
    api.serving().await;
    for op in &operations {
        api.operation_reaches(op, "deployed").await;
    }
    api.stop(Duration::from_secs(30));
}

/// Ensures that a SIGTERM sent the moment the service says it listens starts a graceful
/// shutdown (exit 0, "SIGTERM received" logged) rather than meeting the default action,
/// which kills the process: the signal handlers are registered before the service starts.
/// (The window this closes, between the line and the first poll of the signal future,
/// is too narrow to hit on demand; the test checks the behaviour at the earliest moment
/// a client can know the service is up.)
#[test]
fn sigterm_at_the_listening_line_shuts_down_gracefully() {
    use std::os::unix::process::ExitStatusExt;
    for _ in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        let api = Api::start(dir.path(), NO_ENV);
        let (status, _, logs) = api.terminate(Duration::from_secs(30));
        assert_eq!((status.code(), status.signal()), (Some(0), None), "{logs:#?}");
        assert!(logs.iter().any(|line| line.contains("SIGTERM received")), "{logs:#?}");
    }
}

/// Ensures that bad configuration exits with code 2 and one line on stderr, without a
/// backtrace.
#[test]
fn bad_configuration_exits_2_with_one_line() {
    for (key, value, says) in [
        ("STEWARD_TRANSPORT", "carrier-pigeon", "carrier-pigeon"),
        ("STEWARD_DRAIN_TIMEOUT", "forever", "forever"),
        ("STEWARD_DATABASE_URL", "mysql://localhost/tre", "scheme"),
        ("STEWARD_LISTEN", "not-an-address", "not-an-address"),
        ("STEWARD_MAX_DELIVERIES", "0", "0"),
        ("STEWARD_FAULTS", "explode=1", "explode"),
        ("STEWARD_TEMPLATES_DIR", "/nonexistent/templates", "nonexistent"),
        ("STEWARD_API_TOKEN", "", "must not be empty"),
        ("STEWARD_AUTH_ISSUER", "https://login.example/tenant", "--auth-audience"),
        // A non-loopback address with no authentication configured.
        ("STEWARD_LISTEN", "0.0.0.0:0", "--insecure-no-auth"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_steward-api"))
            .env_clear()
            .env(key, value)
            .env("STEWARD_LISTEN", if key == "STEWARD_LISTEN" { value } else { "127.0.0.1:0" })
            .env("RUST_BACKTRACE", "1")
            .output()
            .expect("run steward-api");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{key}={value}: {stderr}");
        let lines: Vec<_> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{key}={value}: {stderr}");
        assert!(lines[0].starts_with("steward-api: "), "{key}={value}: {stderr}");
        assert!(lines[0].contains(says), "{key}={value}: {stderr}");
        assert!(!stderr.contains("backtrace") && !stderr.contains("panicked"), "{stderr}");
    }
}

/// Ensures that with `STEWARD_FAULTS=fail_worker=deployment-status` the worker ends
/// `failed`: `/livez` and `/readyz` answer 503 and `/health` shows the updater Not OK
/// with its error, while still answering 200.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_worker_failure_turns_probes_red() {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(
        dir.path(),
        &[
            ("STEWARD_FAULTS", "fail_worker=deployment-status"),
            ("STEWARD_RESTART_BACKOFF", "10ms"),
            ("STEWARD_RESTART_LIMIT", "2"),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = api.call(reqwest::Method::GET, "/livez", None).await;
        if status == 503 {
            assert!(body["reason"].as_str().unwrap().contains("deployment-status"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "/livez stayed {status}: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = api.call(reqwest::Method::GET, "/readyz", None).await;
    assert_eq!(status, 503);
    let (status, health) = api.call(reqwest::Method::GET, "/health", None).await;
    assert_eq!(status, 200);
    let updater = health["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == "Deployment Status Updater")
        .unwrap()
        .clone();
    assert_eq!(updater["status"], "Not OK");
    assert!(updater["message"].as_str().unwrap().contains("injected failure"), "{updater}");
    let airlock = health["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == "Airlock Status Updater")
        .unwrap()
        .clone();
    assert_eq!(airlock["status"], "OK", "the other updater is unaffected: {health}");
}

/// Forwards every connection accepted on `listener` to `target`.
async fn proxy(listener: tokio::net::TcpListener, target: String) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else { return };
        let target = target.clone();
        tokio::spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

/// Ensures that a database unreachable at start leaves the service up (live) and
/// unready, its workers `backing_off`, and that once the database answers the
/// service migrates it, becomes ready and works, with no restart of the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_database_at_start_recovers_when_it_answers() {
    use sqlx::{Connection, Executor};
    sqlx::any::install_default_drivers();
    let admin_url = std::env::var("STEWARD_TEST_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let mut admin = match sqlx::AnyConnection::connect(&admin_url).await {
        Ok(admin) => admin,
        Err(error) if std::env::var("CI").is_ok_and(|ci| ci == "true") => {
            panic!("PostgreSQL at {admin_url} is unreachable with CI=true: {error}")
        }
        Err(error) => {
            eprintln!("skipped unreachable_database_at_start_recovers_when_it_answers: {error}");
            return;
        }
    };
    let schema = format!("steward_blackbox_{}", uuid::Uuid::new_v4().simple());
    admin.execute(format!("CREATE SCHEMA {schema}").as_str()).await.unwrap();
    let _cleanup = DropSchema { admin_url: admin_url.clone(), schema: schema.clone() };
    // A port with nothing behind it yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/test?options[search_path]={schema}");
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(
        dir.path(),
        &[("STEWARD_DATABASE_URL", url.as_str()), ("STEWARD_RESTART_BACKOFF", "100ms")],
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let workers = api.get("/api/workers").await;
        let state = |name: &str| {
            workers["workers"].as_array().unwrap().iter().find(|w| w["name"] == name).unwrap()["state"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        if state("database") == "backing_off" && state("deployment-status") == "backing_off" {
            break;
        }
        assert!(Instant::now() < deadline, "workers never backed off: {workers}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = api.call(reqwest::Method::GET, "/livez", None).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = api.call(reqwest::Method::GET, "/readyz", None).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["reason"].as_str().unwrap().contains("database"), "{body}");
    let health = api.get("/health").await;
    assert_eq!(health["services"][0]["service"], "Database");
    assert_eq!(health["services"][0]["status"], "Not OK");
    let (status, body) = api.call(reqwest::Method::POST, "/api/resources", Some(firewall())).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "unavailable");

    // The database comes up.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let forwarding = tokio::spawn(proxy(listener, "127.0.0.1:5432".to_owned()));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = api.call(reqwest::Method::GET, "/readyz", None).await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never ready: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, op) = api.install(firewall()).await;
    api.operation_reaches(&op, "deployed").await;
    api.stop(Duration::from_secs(30));
    forwarding.abort();
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
        // A Drop cannot await: a thread with a runtime of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime
                .block_on(async {
                    let mut admin = sqlx::AnyConnection::connect(&url).await?;
                    admin.execute(format!("DROP SCHEMA {schema} CASCADE").as_str()).await?;
                    admin.close().await?;
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
                })
                .map_err(|e| std::io::Error::other(e.to_string()))
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test schema {}", self.schema);
        }
    }
}
