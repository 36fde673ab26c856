//! `STEWARD_FAULTS`: faults injected on purpose, in builds with cargo feature
//! `fault-injection` (see `injected.rs`), and how they shape the workers. A build
//! without the feature injects nothing and refuses a non-empty `STEWARD_FAULTS`.

#[cfg(feature = "fault-injection")]
mod injected;

use steward_core::{Connect, Handler, Supervisor, Updater, UpdaterConfig, Worker};

use crate::storage::Database;
use crate::workers::{AfterDatabase, PauseGate};

#[cfg(feature = "fault-injection")]
pub(super) use injected::plan;

/// How faults (or their absence) shape the workers.
pub(super) trait FaultPlan {
    /// Spawns `worker`, or a stand-in that fails in its place.
    fn spawn(&self, supervisor: &Supervisor, worker: impl Worker);

    /// `handler`, with whatever faults the plan injects into handlers.
    fn wrap(&self, handler: impl Handler) -> impl Handler;

    /// Spawns an updater over `connect` and the wrapped `handler`, held back until the
    /// database is migrated.
    fn spawn_updater(
        &self,
        supervisor: &Supervisor,
        db: &Database,
        name: &str,
        connect: impl Connect,
        handler: impl Handler,
        config: UpdaterConfig,
    ) {
        let updater = Updater::new(name, connect, self.wrap(handler)).with_config(config);
        let gated = PauseGate::new(db.clone(), supervisor.controls(), updater);
        self.spawn(supervisor, AfterDatabase::new(db.clone(), gated));
    }
}

/// No faults: what a build without `fault-injection` runs with.
#[cfg(not(feature = "fault-injection"))]
#[derive(Debug, Clone, Copy)]
struct NoFaults;

/// The plan of `STEWARD_FAULTS` (`spec`): none, in this build.
///
/// # Errors
///
/// `spec` asks for faults, which need a build with `--features fault-injection`.
#[cfg(not(feature = "fault-injection"))]
pub(super) fn plan(spec: Option<&str>) -> Result<impl FaultPlan + use<>, String> {
    match spec.map(str::trim) {
        Some(faults) if !faults.is_empty() => {
            Err("STEWARD_FAULTS needs a build with `--features fault-injection`".to_owned())
        }
        _ => Ok(NoFaults),
    }
}

#[cfg(not(feature = "fault-injection"))]
impl FaultPlan for NoFaults {
    fn spawn(&self, supervisor: &Supervisor, worker: impl Worker) {
        supervisor.spawn(worker);
    }

    fn wrap(&self, handler: impl Handler) -> impl Handler {
        handler
    }
}
