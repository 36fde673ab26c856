//! Metrics through the `metrics` facade. The application installs an exporter (the
//! service uses Prometheus); without one these calls cost almost nothing.
//!
//! | name | type | labels |
//! |---|---|---|
//! | `steward_messages_total` | counter | `worker`, `outcome` (`complete`, `retry`, `dead_letter`, `panic`, `lease_lost`) |
//! | `steward_handler_duration_seconds` | histogram | `worker` |
//! | `steward_worker_restarts_total` | counter | `worker` |
//! | `steward_worker_state` | gauge, 1 for the current state, 0 for the others | `worker`, `state` |
//! | `steward_in_flight` | gauge | `worker` |
//! | `steward_lease_lost_total` | counter | `worker` |
//! | `steward_dead_lettered_total` | counter | `worker`, `reason` |

use std::time::Duration;

use crate::WorkerState;

/// Metric names, for exporters and dashboards.
pub mod names {
    /// Messages handled, by worker and outcome.
    pub const MESSAGES: &str = "steward_messages_total";
    /// Handler run time in seconds, by worker.
    pub const HANDLER_DURATION: &str = "steward_handler_duration_seconds";
    /// Worker restarts, by worker.
    pub const RESTARTS: &str = "steward_worker_restarts_total";
    /// Worker state, by worker and state: 1 for the current one.
    pub const WORKER_STATE: &str = "steward_worker_state";
    /// Messages held by a worker right now.
    pub const IN_FLIGHT: &str = "steward_in_flight";
    /// Locks lost before settlement, by worker.
    pub const LEASE_LOST: &str = "steward_lease_lost_total";
    /// Messages dead-lettered, by worker and reason.
    pub const DEAD_LETTERED: &str = "steward_dead_lettered_total";
}

pub(crate) fn message(worker: &str, outcome: &'static str) {
    metrics::counter!(names::MESSAGES, "worker" => worker.to_owned(), "outcome" => outcome)
        .increment(1);
}

pub(crate) fn handler_duration(worker: &str, elapsed: Duration) {
    metrics::histogram!(names::HANDLER_DURATION, "worker" => worker.to_owned())
        .record(elapsed.as_secs_f64());
}

pub(crate) fn restart(worker: &str) {
    metrics::counter!(names::RESTARTS, "worker" => worker.to_owned()).increment(1);
}

pub(crate) fn worker_state(worker: &str, state: WorkerState) {
    for candidate in WorkerState::ALL {
        let value = if candidate == state { 1.0 } else { 0.0 };
        metrics::gauge!(names::WORKER_STATE, "worker" => worker.to_owned(), "state" => candidate.as_str())
            .set(value);
    }
}

pub(crate) fn in_flight(worker: &str, n: usize) {
    metrics::gauge!(names::IN_FLIGHT, "worker" => worker.to_owned()).set(n as f64);
}

pub(crate) fn lease_lost(worker: &str) {
    metrics::counter!(names::LEASE_LOST, "worker" => worker.to_owned()).increment(1);
}

pub(crate) fn dead_lettered(worker: &str, reason: &str) {
    metrics::counter!(names::DEAD_LETTERED, "worker" => worker.to_owned(), "reason" => reason.to_owned())
        .increment(1);
}
