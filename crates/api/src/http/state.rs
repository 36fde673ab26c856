//! The state every HTTP handler gets: the database, the templates, the queue names,
//! and the supervisor's health.

use std::fmt;
use std::sync::Arc;

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
    /// What the operator routes work on: dead letters.
    pub operator: super::OperatorSettings,
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
