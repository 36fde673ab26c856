//! Everything that runs under the supervisor: the status updaters (core
//! [`Handler`](steward_core::Handler)s), the outbox publisher, the simulated
//! processors, and the database and transport watchers.

mod controls;
mod outbox;
mod simulators;
mod updaters;
mod watchers;

pub use controls::{FOLLOW_INTERVAL, PAUSABLE, PauseFollower, PauseGate};
pub use outbox::{
    OutboxConfig, OutboxWorker, PARKED_METRIC, PARKED_OLDEST_AGE_METRIC, is_message_fault,
};
pub(crate) use simulators::{AirlockProcessor, Notifier};
pub use simulators::{FailurePolicy, ResourceProcessor};
pub use updaters::{
    AirlockStatusHandler, DeploymentStatusHandler, MessageFormatError, RecipientError,
    RecipientProvider, RecipientSpecError, RecipientsByRole, StaticRecipients, StepResult,
    parse_deployment_status, parse_step_result, reason, tre,
};
pub(crate) use watchers::{AfterDatabase, DatabaseWatcher, TransportWatcher};

/// The names of the service's workers, as `/api/workers`, logs, metrics and
/// `STEWARD_FAULTS=fail_worker=…` use them.
pub mod names {
    /// Watches the database (health service `Database`).
    pub const DATABASE: &str = "database";
    /// Watches the broker (health service `Message Transport`).
    pub const TRANSPORT: &str = "transport";
    /// Consumes deployment status updates.
    pub const DEPLOYMENT_STATUS: &str = "deployment-status";
    /// Consumes airlock step results.
    pub const AIRLOCK_STATUS: &str = "airlock-status";
    /// Publishes the outbox.
    pub const OUTBOX: &str = "outbox";
    /// The simulated resource processor.
    pub const RESOURCE_PROCESSOR: &str = "resource-processor-simulator";
    /// The simulated airlock processor.
    pub const AIRLOCK_PROCESSOR: &str = "airlock-processor-simulator";
    /// The simulated airlock notifier.
    pub const AIRLOCK_NOTIFIER: &str = "airlock-notifier-simulator";
    /// Applies the operators' stored pauses to this process's workers.
    pub const WORKER_CONTROLS: &str = "worker-controls";
}
