//! What the api tests share: test databases, [`db_test!`], users, properties and
//! templates, and the handler fixtures of [`fixtures`].
//!
//! A test database is a SQLite file in a temporary directory, or a fresh schema on the
//! local PostgreSQL (`STEWARD_TEST_POSTGRES_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`), dropped afterwards, and can be broken on
//! purpose through [`TestDb::execute`]. When PostgreSQL is unreachable, a `*_postgres`
//! test prints a skip line and returns; with `CI=true` it fails instead.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    dead_code,
    unused_imports,
    unreachable_pub,
    missing_debug_implementations
)]

mod fixtures;

pub use fixtures::*;

use std::time::Duration;

use serde_json::{Value, json};
use sqlx::{AnyConnection, Connection, Executor};
use steward_api::Clock;
use steward_api::domain::{Properties, User};
use steward_api::storage::{Store, StoreOptions};
use steward_api::templates::TemplateRegistry;

/// When every test store's clock starts.
pub const NOW: f64 = 1_755_424_800.0;

/// A clock starting at [`NOW`] that moves 1 ms forward at each reading, so records
/// created one after the other sort in creation order.
pub fn ticking_clock() -> Clock {
    let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    Clock::from_fn(move || {
        let tick = ticks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        NOW + tick as f64 / 1000.0
    })
}

/// Runs one case on SQLite (`$sqlite`) and on PostgreSQL (`$postgres`). The case
/// takes a `&TestDb`, or a `&Store` (a `TestDb` derefs to its store).
#[macro_export]
macro_rules! db_test {
    ($(#[$meta:meta])* $sqlite:ident, $postgres:ident, $case:path) => {
        $(#[$meta])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $sqlite() {
            let db = support::TestDb::sqlite().await;
            $case(&db).await;
            db.finish().await;
        }

        $(#[$meta])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $postgres() {
            let Some(db) = support::TestDb::postgres(stringify!($postgres)).await else { return };
            $case(&db).await;
            db.finish().await;
        }
    };
}

enum Kind {
    Sqlite { url: String, _dir: tempfile::TempDir },
    Postgres { admin_url: String, schema: String },
}

/// A migrated store of its own, removed by [`TestDb::finish`].
pub struct TestDb {
    pub store: Store,
    kind: Kind,
}

pub fn postgres_url() -> String {
    std::env::var("STEWARD_TEST_POSTGRES_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// The store options of every test database: small pools, the ticking clock.
pub fn options(url: String) -> StoreOptions {
    StoreOptions::new(url)
        .with_max_connections(4)
        .with_worker_connections(2)
        .with_clock(ticking_clock())
}

impl TestDb {
    pub async fn sqlite() -> TestDb {
        Self::sqlite_with(options).await
    }

    /// [`sqlite`](Self::sqlite) with the store options `make` builds from the URL.
    pub async fn sqlite_with(make: impl FnOnce(String) -> StoreOptions) -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("steward.db").display());
        let store = Store::connect_with(make(url.clone())).await.unwrap();
        TestDb { store, kind: Kind::Sqlite { url, _dir: dir } }
    }

    /// A store in a new schema, or `None` (after a skip line) when PostgreSQL is
    /// unreachable and `CI` is not `true`.
    pub async fn postgres(test: &str) -> Option<TestDb> {
        Self::postgres_with(test, options).await
    }

    /// [`postgres`](Self::postgres) with the store options `make` builds from the URL.
    pub async fn postgres_with(
        test: &str,
        make: impl FnOnce(String) -> StoreOptions,
    ) -> Option<TestDb> {
        sqlx::any::install_default_drivers();
        let admin_url = postgres_url();
        let connected =
            tokio::time::timeout(Duration::from_secs(10), AnyConnection::connect(&admin_url)).await;
        let mut admin = match connected {
            Ok(Ok(conn)) => conn,
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
        let schema = format!("steward_test_{}", uuid::Uuid::new_v4().simple());
        admin.execute(format!("CREATE SCHEMA {schema}").as_str()).await.unwrap();
        admin.close().await.unwrap();
        let separator = if admin_url.contains('?') { '&' } else { '?' };
        let url = format!("{admin_url}{separator}options[search_path]={schema}");
        let store = Store::connect_with(make(url)).await.unwrap();
        Some(TestDb { store, kind: Kind::Postgres { admin_url, schema } })
    }

    /// The database URL (on PostgreSQL, with the test's schema as its `search_path`),
    /// e.g. for a `steward-api` process of the test's own.
    pub fn url(&self) -> String {
        match &self.kind {
            Kind::Sqlite { url, .. } => url.clone(),
            Kind::Postgres { admin_url, schema } => {
                let separator = if admin_url.contains('?') { '&' } else { '?' };
                format!("{admin_url}{separator}options[search_path]={schema}")
            }
        }
    }

    /// Runs `sql` on a connection of its own, outside the store's pools (in the test's
    /// schema on PostgreSQL): a side door for breaking the database on purpose.
    pub async fn execute(&self, sql: &str) {
        match &self.kind {
            Kind::Sqlite { url, .. } => {
                let mut conn = AnyConnection::connect(url).await.unwrap();
                conn.execute("PRAGMA busy_timeout = 5000").await.unwrap();
                conn.execute(sql).await.unwrap();
                conn.close().await.unwrap();
            }
            Kind::Postgres { admin_url, schema } => {
                let mut admin = AnyConnection::connect(admin_url).await.unwrap();
                admin.execute(format!("SET search_path TO {schema}").as_str()).await.unwrap();
                admin.execute(sql).await.unwrap();
                admin.close().await.unwrap();
            }
        }
    }

    /// Another store on the same database (schema), with `clock` as its clock: a
    /// second replica of the service, say. Close it before [`TestDb::finish`].
    pub async fn replica(&self, clock: Clock) -> Store {
        let url = match &self.kind {
            Kind::Sqlite { url, .. } => url.clone(),
            Kind::Postgres { admin_url, schema } => {
                let separator = if admin_url.contains('?') { '&' } else { '?' };
                format!("{admin_url}{separator}options[search_path]={schema}")
            }
        };
        Store::connect_with(options(url).with_clock(clock)).await.unwrap()
    }

    /// A second store on the same database (its own pools) with the system clock, as
    /// another replica of the service would have: see [`TestDb::replica`].
    pub async fn another_store(&self) -> Store {
        self.replica(Clock::system()).await
    }

    /// Closes the store; dropping the `TestDb` then removes the schema.
    pub async fn finish(self) {
        self.store.close().await;
    }
}

impl std::ops::Deref for TestDb {
    type Target = Store;

    fn deref(&self) -> &Store {
        &self.store
    }
}

impl Drop for TestDb {
    /// Drops the PostgreSQL schema, also when the test panicked, on a thread of its own
    /// (a `Drop` cannot await).
    fn drop(&mut self) {
        let Kind::Postgres { admin_url, schema } = &self.kind else { return };
        let (admin_url, schema) = (admin_url.clone(), schema.clone());
        let name = schema.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let mut admin = AnyConnection::connect(&admin_url).await?;
                admin.execute("SET lock_timeout = '10s'").await?;
                admin.execute(format!("DROP SCHEMA {schema} CASCADE").as_str()).await?;
                admin.close().await
            })
        });
        if let Ok(Err(error)) = cleanup.join() {
            eprintln!("could not drop test schema {name}: {error}");
        }
    }
}

pub fn templates() -> std::sync::Arc<TemplateRegistry> {
    std::sync::Arc::new(TemplateRegistry::builtin().unwrap())
}

pub fn user() -> User {
    User {
        id: "u1".to_owned(),
        name: "Jane".to_owned(),
        email: "jane@example.com".to_owned(),
        roles: vec!["WorkspaceOwner".to_owned()],
        role_assignments: Vec::new(),
    }
}

pub fn props(value: Value) -> Properties {
    value.as_object().cloned().expect("an object")
}

pub fn workspace_props() -> Properties {
    props(json!({"display_name": "Genomics", "description": "Sequencing data"}))
}

/// The airlock step result example of reference §4.3.
pub fn step_result_example() -> Value {
    json!({
        "id": "2d1f4a6e-0c3b-4a55-9a51-0d6f3a1c9e21",
        "topic": "/subscriptions/<sub>/resourceGroups/rg-mytre/providers/Microsoft.EventGrid/topics/evgt-airlock-step-result-v2-mytre",
        "subject": "5dbc15ae-40e1-49a5-834b-595f59d626b7",
        "eventType": "Airlock.StepResult",
        "eventTime": "2026-08-17T10:00:00.123456Z",
        "data": {
            "completed_step": "submitted",
            "new_status": "in_review",
            "request_id": "5dbc15ae-40e1-49a5-834b-595f59d626b7",
            "request_files": [{"name": "data.csv", "size": 1024}],
            "status_message": null
        },
        "dataVersion": "1.0",
        "metadataVersion": "1"
    })
}

/// The deployment status update example of reference §4.2.
pub fn status_update_example() -> Value {
    json!({
        "operationId": "0000c8e7-5c42-4fcb-a7fd-294cfc27aa76",
        "stepId": "7d96130f-b323-4b95-8351-a05e943d51a2",
        "id": "59b5c8e7-5c42-4fcb-a7fd-294cfc27aa76",
        "status": "deployed",
        "message": "59b5c8e7-5c42-4fcb-a7fd-294cfc27aa76: install action completed successfully.",
        "outputs": [
            {"name": "workspace_address_space", "value": "10.1.4.0/24", "type": "string"},
            {"name": "is_exposed_externally", "value": "true", "type": "boolean"},
            {"name": "fqdns", "value": ["a.example", "b.example"], "type": "string"},
            {"name": "unset_output", "value": null, "type": "string"}
        ]
    })
}

/// Outputs as TRE's resource processor reports them (reference §10.1.6, capitalised
/// keys), and the properties they become.
pub fn tre_outputs_example() -> (Vec<Value>, Properties) {
    let outputs = vec![
        json!({"Name": "string1", "Value": "value1", "Type": "string"}),
        json!({"Name": "string2", "Value": "\"value2\"", "Type": "string"}),
        json!({"Name": "boolean1", "Value": "True", "Type": "boolean"}),
        json!({"Name": "boolean2", "Value": "true", "Type": "boolean"}),
        json!({"Name": "boolean3", "Value": "\"true\"", "Type": "boolean"}),
        json!({"Name": "list1", "Value": "['one', 'two']", "Type": "string"}),
        json!({"Name": "list2", "Value": ["one", "two"], "Type": "string"}),
    ];
    let properties = props(json!({
        "string1": "value1", "string2": "value2", "boolean1": true, "boolean2": true,
        "boolean3": true, "list1": "['one', 'two']", "list2": ["one", "two"],
    }));
    (outputs, properties)
}
