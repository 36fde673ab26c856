//! The database's pools and session settings: the sizes are settings that reach the
//! pools, HTTP requests and the workers draw on pools of their own, every PostgreSQL
//! connection carries its timeouts, and a full pool, a deadlock or a lock timeout is a
//! busy database (retryable), not an unavailable one: `/readyz` stays 200.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use clap::Parser;
use http_body_util::BodyExt;
use serde_json::Value;
use sqlx::{AnyConnection, Connection, Executor};
use steward_api::domain::{Status, WorkspaceRole};
use steward_api::http::auth::Authentication;
use steward_api::http::{ApiSettings, AppState, router};
use steward_api::service::Config;
use steward_api::storage::{
    Database, OutboxMessage, SessionSettings, Store, StoreError, StoreOptions,
};
use steward_api::templates::TemplateRegistry;
use steward_api::workers::DeploymentStatusHandler;
use steward_core::{
    Handler, Outcome, RetryCause, Supervisor, SupervisorConfig, Worker, WorkerContext, WorkerError,
};
use tower::ServiceExt;

/// Parses the service's command line.
fn config(args: &[&str]) -> Config {
    Config::try_parse_from(std::iter::once("steward-api").chain(args.iter().copied())).unwrap()
}

/// The session flags of [`session_settings_reach_every_postgres_connection`], and what
/// PostgreSQL shows for each.
const SESSION_FLAGS: [(&str, &str, &str, &str); 6] = [
    ("--database-statement-timeout", "12s", "statement_timeout", "12s"),
    ("--database-lock-timeout", "3s", "lock_timeout", "3s"),
    ("--database-idle-in-transaction-timeout", "45s", "idle_in_transaction_session_timeout", "45s"),
    ("--database-tcp-keepalives-idle", "75s", "tcp_keepalives_idle", "75"),
    ("--database-tcp-keepalives-interval", "7s", "tcp_keepalives_interval", "7"),
    ("--database-tcp-keepalives-count", "4", "tcp_keepalives_count", "4"),
];

/// Ensures that the pool sizes are settings with sane defaults, that a pool of no
/// connections is refused, and that the sizes given reach the HTTP and the workers'
/// pools of the store the service opens.
#[tokio::test]
async fn pool_sizes_are_settings_that_reach_the_pools() {
    let defaults = config(&[]);
    assert_eq!(defaults.database.database_max_connections, 10);
    assert_eq!(defaults.database.database_worker_connections, 10);
    assert_eq!(defaults.database.database_acquire_timeout, Duration::from_secs(5));
    let session = SessionSettings::default();
    assert_eq!(defaults.database.database_statement_timeout, session.statement_timeout);
    assert_eq!(defaults.database.database_lock_timeout, session.lock_timeout);
    assert_eq!(
        defaults.database.database_idle_in_transaction_timeout,
        session.idle_in_transaction_timeout
    );
    assert_eq!(defaults.database.database_tcp_keepalives_count, session.tcp_keepalives_count);

    for flag in ["--database-max-connections", "--database-worker-connections"] {
        let error = Config::try_parse_from(["steward-api", flag, "0"]).unwrap_err();
        assert_eq!(error.kind(), clap::error::ErrorKind::ValueValidation, "{flag}: {error}");
    }

    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("steward.db").display());
    let config = config(&[
        "--database-url",
        &url,
        "--database-max-connections",
        "7",
        "--database-worker-connections",
        "3",
    ]);
    let store = Store::connect_lazy(config.store_options()).unwrap();
    assert_eq!(store.max_connections(), 7);
    assert_eq!(store.for_workers().max_connections(), 3);
    store.ping().await.unwrap();
    store.close().await;
}

/// Ensures that the session settings given on the command line are what every pooled
/// PostgreSQL connection shows (`current_setting`, as `SHOW` prints it), on the HTTP
/// and the workers' pools alike, also after the migration ran on the workers' side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_settings_reach_every_postgres_connection() {
    let mut args = Vec::new();
    for (flag, value, _, _) in SESSION_FLAGS {
        args.extend([flag, value]);
    }
    let config = config(&args);
    let test = "session_settings_reach_every_postgres_connection";
    let Some(db) =
        support::TestDb::postgres_with(test, |url| config.database.store_options(&url)).await
    else {
        return;
    };
    for store in [db.store.clone(), db.store.for_workers()] {
        for (_, _, name, shown) in SESSION_FLAGS {
            let value = store.postgres_setting(name).await.unwrap();
            assert_eq!(value.as_deref(), Some(shown), "{name} on {store:?}");
        }
    }
    db.finish().await;
}

/// Ensures that a transaction that waits for every connection of a full pool fails as
/// busy (retryable), not as an unavailable database, on SQLite's one writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sqlite_writer_is_busy_not_unavailable() {
    let db = support::TestDb::sqlite_with(|url| {
        support::options(url).with_acquire_timeout(Duration::from_millis(300))
    })
    .await;
    let held = db.begin().await.unwrap();
    for store in [db.store.clone(), db.store.for_workers()] {
        let error = store.begin().await.unwrap_err();
        assert!(error.is_busy() && error.is_retryable(), "{error:?}");
        assert!(!error.is_unavailable(), "{error:?}");
    }
    // Reads have pools of their own.
    assert!(db.read().resource("nothing").await.unwrap_err().is_not_found());
    held.rollback().await.unwrap();
    db.begin().await.unwrap().commit().await.unwrap();
    db.finish().await;
}

/// Ensures that with every connection of the HTTP pool held, a transaction or a read on
/// it fails as busy, not unavailable, while the workers' pool still serves both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_postgres_pool_is_busy_and_the_workers_have_their_own() {
    let test = "a_full_postgres_pool_is_busy_and_the_workers_have_their_own";
    let Some(db) = support::TestDb::postgres_with(test, |url| {
        support::options(url)
            .with_max_connections(2)
            .with_acquire_timeout(Duration::from_millis(300))
    })
    .await
    else {
        return;
    };
    let held = [db.begin().await.unwrap(), db.begin().await.unwrap()];
    let error = db.begin().await.unwrap_err();
    assert!(error.is_busy() && !error.is_unavailable(), "{error:?}");
    let error = db.read().resource("nothing").await.unwrap_err();
    assert!(error.is_busy() && !error.is_unavailable(), "{error:?}");

    let workers = db.for_workers();
    let mut tx = workers.begin().await.unwrap();
    let message =
        OutboxMessage::json("workspacequeue", &serde_json::json!({"a": 1}), "r-1").unwrap();
    tx.insert_outbox(message).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(workers.outbox_backlog().await.unwrap(), 1);
    drop(held);
    db.finish().await;
}

/// Ensures that a database that refuses connections is still unavailable, not busy:
/// a pool timeout counts as busy only when the pool was full.
#[tokio::test]
async fn a_refused_connection_is_unavailable_not_busy() {
    let options = StoreOptions::new("postgres://postgres@127.0.0.1:1/test")
        .with_acquire_timeout(Duration::from_millis(500));
    let store = Store::connect_lazy(options).unwrap();
    for store in [store.clone(), store.for_workers()] {
        let error = store.begin().await.unwrap_err();
        assert!(error.is_unavailable() && !error.is_busy(), "{error:?}");
        let error = store.read().resource("nothing").await.unwrap_err();
        assert!(error.is_unavailable() && !error.is_busy(), "{error:?}");
    }
    let error = store.ping().await.unwrap_err();
    assert!(error.is_unavailable() && !error.is_busy(), "{error:?}");
}

/// Two plain connections to the test server, or `None` when it is unreachable.
async fn two_connections(test: &str) -> Option<(AnyConnection, AnyConnection)> {
    let db = support::TestDb::postgres(test).await?;
    db.finish().await;
    let url = support::postgres_url();
    Some((AnyConnection::connect(&url).await.unwrap(), AnyConnection::connect(&url).await.unwrap()))
}

/// Ensures that a real PostgreSQL deadlock (SQLSTATE 40P01) is a busy database
/// (retryable), not an unavailable one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadlock_is_busy_not_unavailable() {
    let Some((mut first, mut second)) = two_connections("a_deadlock_is_busy_not_unavailable").await
    else {
        return;
    };
    // Advisory locks of keys of this test only: other tests cannot take part.
    let key = i64::from(rand_key());
    let (a, b) = (key, key + 1);
    first.execute("BEGIN").await.unwrap();
    second.execute("BEGIN").await.unwrap();
    first.execute(format!("SELECT pg_advisory_xact_lock({a})").as_str()).await.unwrap();
    second.execute(format!("SELECT pg_advisory_xact_lock({b})").as_str()).await.unwrap();
    let lock_b = format!("SELECT pg_advisory_xact_lock({b})");
    let lock_a = format!("SELECT pg_advisory_xact_lock({a})");
    let (one, two) = tokio::join!(first.execute(lock_b.as_str()), second.execute(lock_a.as_str()));
    // PostgreSQL breaks the cycle by failing exactly one of them.
    let error = match (one, two) {
        (Err(error), Ok(_)) | (Ok(_), Err(error)) => error,
        other => panic!("expected one deadlock: {other:?}"),
    };
    let code = error.as_database_error().and_then(|db| db.code()).map(|code| code.into_owned());
    assert_eq!(code.as_deref(), Some("40P01"), "{error:?}");
    let error = StoreError::from(error);
    assert!(error.is_busy() && error.is_retryable(), "{error:?}");
    assert!(!error.is_unavailable(), "{error:?}");
    let _ = first.close().await;
    let _ = second.close().await;
}

/// A key for advisory locks that other tests do not use.
fn rand_key() -> i32 {
    let bytes = *uuid::Uuid::new_v4().as_bytes();
    i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3] & 0x3f])
}

/// Ensures that the store's `lock_timeout` holds on its connections and that running
/// out of it (SQLSTATE 55P03) is a busy database, not an unavailable one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_timeout_is_busy_not_unavailable() {
    let test = "a_lock_timeout_is_busy_not_unavailable";
    let session =
        SessionSettings { lock_timeout: Duration::from_millis(200), ..SessionSettings::default() };
    let Some(db) =
        support::TestDb::postgres_with(test, |url| support::options(url).with_session(session))
            .await
    else {
        return;
    };
    let roles = [WorkspaceRole::AirlockManager];
    let mut first = db.begin().await.unwrap();
    first.set_workspace_roles("ws-1", "u-1", &roles, "admin").await.unwrap();
    let mut second = db.for_workers().begin().await.unwrap();
    let error = second.set_workspace_roles("ws-1", "u-1", &roles, "admin").await.unwrap_err();
    assert!(error.is_busy() && !error.is_unavailable(), "{error:?}");
    drop(second);
    first.commit().await.unwrap();
    db.finish().await;
}

/// A worker that is `running` until cancelled.
struct Running(&'static str);

#[async_trait]
impl Worker for Running {
    fn name(&self) -> &str {
        self.0
    }

    fn stall_timeout(&self) -> Option<Duration> {
        None
    }

    async fn run(&self, ctx: WorkerContext) -> Result<(), WorkerError> {
        ctx.set_running();
        ctx.cancelled().await;
        Ok(())
    }
}

async fn call(app: &axum::Router, path: &str) -> (StatusCode, Option<String>, Value) {
    let request = Request::builder().uri(path).body(Body::empty()).unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let retry_after = response
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, retry_after, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// Ensures that with every connection of the HTTP pool held, `/readyz` still answers
/// 200 (its check has a connection of its own), a request that needs the database
/// answers 503 `busy` with `Retry-After` without flipping readiness, and a worker still
/// gets a connection of its pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_and_the_workers_do_not_queue_behind_http_requests() {
    let test = "readyz_and_the_workers_do_not_queue_behind_http_requests";
    let Some(db) = support::TestDb::postgres_with(test, |url| {
        support::options(url)
            .with_max_connections(2)
            .with_acquire_timeout(Duration::from_millis(500))
    })
    .await
    else {
        return;
    };
    let supervisor = Supervisor::new(SupervisorConfig::default());
    for name in ["database", "transport", "deployment-status", "airlock-status"] {
        supervisor.spawn(Running(name));
    }
    let state = AppState {
        db: Database::migrated(db.store.clone()),
        templates: Arc::new(TemplateRegistry::builtin().unwrap()),
        health: supervisor.health(),
        settings: Arc::new(ApiSettings {
            resource_request_queue: "workspacequeue".to_owned(),
            auth: Authentication::none(),
            transport: "inmem".to_owned(),
            ..ApiSettings::default()
        }),
        metrics: None,
    };
    let health = state.health.clone();
    for _ in 0..200 {
        if health.snapshot().is_ready() && health.snapshot().workers.len() == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let app = router(state);
    let (status, _, body) = call(&app, "/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let held = [db.begin().await.unwrap(), db.begin().await.unwrap()];
    let (status, retry_after, body) = call(&app, "/api/resources").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "busy", "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    let (status, _, body) = call(&app, "/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let workers = db.for_workers();
    let mut tx = workers.begin().await.unwrap();
    let message =
        OutboxMessage::json("workspacequeue", &serde_json::json!({"a": 1}), "r-1").unwrap();
    tx.insert_outbox(message).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(workers.outbox_backlog().await.unwrap(), 1);

    drop(held);
    let (status, _, body) = call(&app, "/api/resources").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    db.finish().await;
}

/// Ensures that a deployment status update that meets a busy database (every
/// connection of the workers' writer held) is retried as a message (`Retry` with cause
/// `Message`), not answered `Retry { cause: Dependency }`, which would open the
/// updater's circuit breaker and turn `/readyz` 503.
async fn a_busy_database_retries_the_message_without_opening_the_breaker(
    db: &support::TestDb,
    held_connections: usize,
) {
    let templates = support::templates();
    let (_, operation) = support::workspace_installing(db, &templates).await;
    let workers = db.for_workers();
    let mut held = Vec::new();
    for _ in 0..held_connections {
        held.push(workers.begin().await.unwrap());
    }
    let handler = DeploymentStatusHandler::new(workers.clone(), templates);
    let message = support::status_message(&operation, 0, Status::Deploying, "deploying");
    let outcome = handler.handle(Arc::new(message.clone())).await;
    assert!(matches!(outcome, Outcome::Retry { cause: RetryCause::Message, .. }), "{outcome:?}");
    drop(held);
    let outcome = handler.handle(Arc::new(message)).await;
    assert_eq!(outcome, Outcome::Complete);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_sqlite_database_retries_the_message_without_opening_the_breaker() {
    let db = support::TestDb::sqlite_with(|url| {
        support::options(url).with_acquire_timeout(Duration::from_millis(300))
    })
    .await;
    // SQLite's one writer.
    a_busy_database_retries_the_message_without_opening_the_breaker(&db, 1).await;
    db.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_postgres_database_retries_the_message_without_opening_the_breaker() {
    let test = "a_busy_postgres_database_retries_the_message_without_opening_the_breaker";
    let Some(db) = support::TestDb::postgres_with(test, |url| {
        support::options(url)
            .with_worker_connections(2)
            .with_acquire_timeout(Duration::from_millis(300))
    })
    .await
    else {
        return;
    };
    a_busy_database_retries_the_message_without_opening_the_breaker(&db, 2).await;
    db.finish().await;
}

/// A TCP proxy to PostgreSQL that forwards until `silence` is set, then forwards
/// nothing more, either way, while keeping every connection open: a database behind a
/// network that drops its packets, as a partition looks to the client.
async fn silenceable_proxy(
    target: String,
) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let silence = Arc::new(AtomicBool::new(false));
    let silenced = silence.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&target).await else { continue };
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            for (mut from, mut to) in [(client_read, server_write), (server_read, client_write)] {
                let silenced = silenced.clone();
                tokio::spawn(async move {
                    let mut buffer = vec![0u8; 16 * 1024];
                    loop {
                        let n = match from.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if silenced.load(Ordering::SeqCst) {
                            // Swallowed; hold both ends open.
                            std::future::pending::<()>().await;
                        }
                        if to.write_all(&buffer[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    (address, silence)
}

/// Ensures that a ping that finds the probe connection stuck (a ping before it was given
/// up after a timeout, as `/readyz` gives up after 2 s, on a database that no longer
/// answers) is "unavailable", not "busy". The probe pool is the ping's alone and a ping
/// takes a moment, so a full probe pool means a database that does not answer: counted
/// busy, the database watcher would keep `/health`'s `Database` `OK` through a network
/// partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_probe_connection_is_unavailable_not_busy() {
    let test = "a_stuck_probe_connection_is_unavailable_not_busy";
    let Some(db) = support::TestDb::postgres(test).await else { return };
    let url = db.url();
    // The host and port of the URL, `scheme://[user@]host:port/...`.
    let authority_start = url.find("://").unwrap() + 3;
    let authority_end = url[authority_start..].find('/').unwrap() + authority_start;
    let host_start = url[authority_start..authority_end]
        .rfind('@')
        .map_or(authority_start, |at| authority_start + at + 1);
    let target = url[host_start..authority_end].to_owned();
    let (proxy, silence) = silenceable_proxy(target).await;
    let proxied = format!("{}{proxy}{}", &url[..host_start], &url[authority_end..]);
    let store = Store::connect_with(
        support::options(proxied).with_acquire_timeout(Duration::from_millis(500)),
    )
    .await
    .unwrap();
    store.ping().await.unwrap();
    silence.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), store.ping()).await.is_err(),
        "the silenced database does not answer"
    );
    let error = store.ping().await.unwrap_err();
    assert!(error.is_unavailable(), "{error:?}");
    assert!(!error.is_busy(), "{error:?}");
    db.finish().await;
}
