//! The state every HTTP handler gets: the database, the templates, the queue names,
//! and the supervisor's health.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use steward_core::HealthHandle;

use super::auth::Authentication;
use crate::rules::AirlockQueues;
use crate::storage::Database;
use crate::templates::TemplateRegistry;

/// Settings the HTTP layer needs.
#[derive(Clone, Debug, Default)]
pub struct ApiSettings {
    /// Where resource requests go.
    pub resource_request_queue: String,
    /// Where airlock events go.
    pub airlock_queues: AirlockQueues,
    /// How callers are identified; the default makes every caller the development
    /// admin.
    pub auth: Authentication,
    /// Whether `/metrics` answers without authentication (`STEWARD_METRICS_OPEN`).
    pub metrics_open: bool,
    /// The transport's name, for health messages.
    pub transport: String,
    /// The largest message the transport accepts, whole (see
    /// [`Capabilities::max_body_bytes`](steward_core::Capabilities::max_body_bytes)):
    /// a request whose messages would be larger is refused with 413 before anything is
    /// committed. `None`: no limit.
    pub max_message_bytes: Option<usize>,
    /// How many API requests run at once, and how long one waits for its turn.
    pub load: LoadLimit,
    /// What the operator routes work on: dead letters.
    pub operator: super::OperatorSettings,
}

/// How many API requests (every route but the probes and `/metrics`) run at once, and
/// how long one waits for its turn before it is refused with 503 and `Retry-After`.
/// Each request uses at most one database connection at a time, so with no more
/// requests than connections, the pool never makes a request wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadLimit {
    /// API requests served at once (at least 1).
    pub max_concurrency: usize,
    /// How long a request waits for one of them before a 503.
    pub queue_timeout: Duration,
}

impl LoadLimit {
    /// The default wait for a turn: short, since a client told `Retry-After` does
    /// better than one whose request times out in a queue.
    pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(1);

    /// As many requests at once as the pool that serves them has connections, each
    /// waiting [`DEFAULT_QUEUE_TIMEOUT`](Self::DEFAULT_QUEUE_TIMEOUT) at most.
    #[must_use]
    pub fn for_pool(connections: u32) -> Self {
        LoadLimit {
            max_concurrency: usize::try_from(connections.max(1)).unwrap_or(usize::MAX),
            queue_timeout: Self::DEFAULT_QUEUE_TIMEOUT,
        }
    }
}

impl Default for LoadLimit {
    /// [`for_pool`](Self::for_pool) of the store's default pool of 5 connections.
    fn default() -> Self {
        Self::for_pool(5)
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
    /// Queue names, authentication, the transport name.
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
