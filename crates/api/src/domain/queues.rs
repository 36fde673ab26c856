//! TRE's queue names: the defaults of the service's settings, and of the handlers and
//! rules when nothing else is configured. Declared here once.

/// Deployment status updates from the resource processor
/// (`SERVICE_BUS_DEPLOYMENT_STATUS_UPDATE_QUEUE`).
pub const DEPLOYMENT_STATUS: &str = "deploymentstatus";

/// Airlock step results from the airlock processor (`SERVICE_BUS_STEP_RESULT_QUEUE`).
pub const STEP_RESULT: &str = "airlock-step-result";

/// Resource requests to the resource processor (`SERVICE_BUS_RESOURCE_REQUEST_QUEUE`).
pub const RESOURCE_REQUEST: &str = "workspacequeue";

/// Airlock `statusChanged` events (`STEWARD_AIRLOCK_STATUS_CHANGED_QUEUE`).
pub const AIRLOCK_STATUS_CHANGED: &str = "airlock-status-changed";

/// `airlockNotification` events (`STEWARD_AIRLOCK_NOTIFICATION_QUEUE`).
pub const AIRLOCK_NOTIFICATION: &str = "airlock-notification";
