//! What the HTTP layer and the workers share: the database behind a readiness gate, the
//! templates, the queue names, and the supervisor's health.

use std::fmt;
use std::sync::Arc;

use steward_core::HealthHandle;
use tokio::sync::OnceCell;

use crate::airlock::AirlockQueues;
use crate::db::{Store, StoreError};
use crate::templates::TemplateRegistry;

/// The store, and the one-time migration every user of it waits for.
///
/// The service starts with the database possibly down: [`ready`](Self::ready) runs the
/// migrations the first time the database answers, and every worker and request waits
/// for that before touching a table.
#[derive(Clone)]
pub struct Database {
    store: Store,
    migrated: Arc<OnceCell<()>>,
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Database")
            .field("store", &self.store)
            .field("migrated", &self.migrated.initialized())
            .finish()
    }
}

impl Database {
    /// A gate over `store`, not yet migrated.
    #[must_use]
    pub fn new(store: Store) -> Self {
        Database { store, migrated: Arc::new(OnceCell::new()) }
    }

    /// A gate over a store that is already migrated.
    #[must_use]
    pub fn migrated(store: Store) -> Self {
        Database { store, migrated: Arc::new(OnceCell::new_with(Some(()))) }
    }

    /// The store, once its schema is up to date.
    ///
    /// # Errors
    ///
    /// The database cannot be reached or a migration failed; the next call tries again.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: a cancelled migration is rolled back and tried again by the next call.
    pub async fn ready(&self) -> Result<&Store, StoreError> {
        self.migrated.get_or_try_init(|| self.store.migrate()).await?;
        Ok(&self.store)
    }

    /// The store for serving a request: at once, without waiting for a database that is
    /// still being connected to and migrated (the workers do that).
    ///
    /// # Errors
    ///
    /// [`NotReady`] until the migrations ran.
    pub fn serving(&self) -> Result<&Store, NotReady> {
        if self.is_migrated() { Ok(&self.store) } else { Err(NotReady) }
    }

    /// Whether the migrations ran.
    #[must_use]
    pub fn is_migrated(&self) -> bool {
        self.migrated.initialized()
    }

    /// The store, migrated or not (for closing it).
    #[must_use]
    pub fn store(&self) -> &Store {
        &self.store
    }
}

/// The database has not been reached and migrated yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the database is not ready yet")]
pub struct NotReady;

/// Settings the HTTP layer needs.
#[derive(Clone, Default)]
pub struct ApiSettings {
    /// Where resource requests go.
    pub resource_request_queue: String,
    /// Where airlock events go.
    pub airlock_queues: AirlockQueues,
    /// The bearer token mutating requests need, when set.
    pub api_token: Option<String>,
    /// The transport's name, for health messages.
    pub transport: String,
}

impl fmt::Debug for ApiSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiSettings")
            .field("resource_request_queue", &self.resource_request_queue)
            .field("airlock_queues", &self.airlock_queues)
            .field("api_token", &self.api_token.as_ref().map(|_| "REDACTED"))
            .field("transport", &self.transport)
            .finish()
    }
}

/// The state every HTTP handler gets: cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// The database.
    pub db: Database,
    /// The templates.
    pub templates: Arc<TemplateRegistry>,
    /// The workers' health.
    pub health: HealthHandle,
    /// Queue names, the API token, the transport name.
    pub settings: Arc<ApiSettings>,
    /// Renders `/metrics`, when a Prometheus recorder is installed.
    pub metrics: Option<Arc<dyn Fn() -> String + Send + Sync>>,
}

impl fmt::Debug for AppState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppState")
            .field("db", &self.db)
            .field("templates", &self.templates.len())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}
