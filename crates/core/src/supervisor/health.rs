//! Worker health: states, counters and snapshots a web layer can serve.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;

use crate::ConsumerRole;

/// The life-cycle state of a supervised worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WorkerState {
    /// Starting (connecting) or restarting.
    Starting,
    /// Running and making progress.
    Running,
    /// Waiting before a restart after an error, or paused by its circuit breaker.
    BackingOff,
    /// Made no progress for its stall timeout; being cancelled and restarted.
    Stalled,
    /// Shutting down: draining in-flight messages.
    Stopping,
    /// Stopped by a shutdown.
    Stopped,
    /// Gave up: too many restarts within the intensity window. Needs a process restart.
    Failed,
    /// Paused by an operator ([`WorkerControls::pause`](crate::WorkerControls::pause)):
    /// its intake stopped, its handlers finished, what it had not started released.
    /// Intentional, so it counts as ready.
    Paused,
}

impl WorkerState {
    /// Every state, in life-cycle order.
    pub const ALL: [Self; 8] = [
        Self::Starting,
        Self::Running,
        Self::BackingOff,
        Self::Stalled,
        Self::Stopping,
        Self::Stopped,
        Self::Failed,
        Self::Paused,
    ];

    /// The snake_case name, as in logs, metrics and JSON.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::BackingOff => "backing_off",
            Self::Stalled => "stalled",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
            Self::Paused => "paused",
        }
    }
}

impl fmt::Display for WorkerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Messages handled by a worker, by what became of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutcomeCounts {
    /// Completed.
    pub completed: u64,
    /// Retried (abandoned for redelivery), panics included.
    pub retried: u64,
    /// Dead-lettered, by the handler or for too many deliveries.
    pub dead_lettered: u64,
    /// Handlers that panicked.
    pub panicked: u64,
    /// Locks lost before settlement (the message was left to the broker).
    pub lease_lost: u64,
}

/// One worker's health at a moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerHealth {
    /// The worker's name.
    pub name: String,
    /// Its state.
    pub state: WorkerState,
    /// How many times it was restarted (after errors, panics and stalls).
    pub restarts: u64,
    /// The last error, with its chain; kept after the worker recovers, for operators.
    pub last_error: Option<String>,
    /// When it last made progress (a poll, a handler completion or a lock renewal).
    pub last_progress: Option<SystemTime>,
    /// How long ago that was.
    pub since_progress: Option<Duration>,
    /// When it last received a message.
    pub last_message_at: Option<SystemTime>,
    /// Counts per outcome since the process started.
    pub outcomes: OutcomeCounts,
    /// Messages held right now: running handlers and messages waiting their turn.
    pub in_flight: usize,
    /// Handlers aborted for running past their timeout that have not ended: they block
    /// a thread, and keep their slot and their session until they return.
    pub overdue_handlers: usize,
    /// Whether the worker's consumer receives or waits as a standby, when its queue
    /// delivers to one consumer at a time; `None` otherwise, and while not connected.
    pub role: Option<ConsumerRole>,
}

/// Every worker's health at a moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthSnapshot {
    /// One entry per worker, in the order they were added.
    pub workers: Vec<WorkerHealth>,
}

impl HealthSnapshot {
    /// The worker named `name`.
    #[must_use]
    pub fn worker(&self, name: &str) -> Option<&WorkerHealth> {
        self.workers.iter().find(|w| w.name == name)
    }

    /// Live: no worker has `failed`. A `/livez` probe answers 503 otherwise, so the
    /// orchestrator restarts the process.
    #[must_use]
    pub fn is_live(&self) -> bool {
        self.workers.iter().all(|w| w.state != WorkerState::Failed)
    }

    /// Ready: every worker is `running`, or `paused` on purpose. A `/readyz` probe
    /// answers 503 otherwise.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.workers.iter().all(|w| is_ready(w.state))
    }

    /// Why the snapshot is not ready: the workers that are not running, with their state
    /// and last error; `None` when ready.
    #[must_use]
    pub fn not_ready_reason(&self) -> Option<String> {
        let reasons: Vec<String> = self
            .workers
            .iter()
            .filter(|w| !is_ready(w.state))
            .map(|w| match &w.last_error {
                Some(error) => format!("{} is {}: {error}", w.name, w.state),
                None => format!("{} is {}", w.name, w.state),
            })
            .collect();
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }
}

/// Whether a worker in `state` counts as ready: running, or paused by an operator.
fn is_ready(state: WorkerState) -> bool {
    matches!(state, WorkerState::Running | WorkerState::Paused)
}

/// Reads the health of a supervisor's workers; cheap to clone, for a web layer's state.
#[derive(Clone)]
pub struct HealthHandle {
    pub(crate) registry: Arc<Registry>,
    pub(crate) changes: watch::Receiver<HealthSnapshot>,
}

impl fmt::Debug for HealthHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthHandle").finish_non_exhaustive()
    }
}

impl HealthHandle {
    /// The current health of every worker, counters included.
    #[must_use]
    pub fn snapshot(&self) -> HealthSnapshot {
        self.registry.snapshot()
    }

    /// A receiver that sees a new snapshot whenever a worker changes state or records
    /// an error (not on every message: read [`snapshot`](Self::snapshot) for counters).
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<HealthSnapshot> {
        self.changes.clone()
    }
}

/// All workers' shared health records, and the channel announcing state changes.
pub(crate) struct Registry {
    workers: Mutex<Vec<Arc<WorkerRecord>>>,
    changes: watch::Sender<HealthSnapshot>,
}

impl Registry {
    pub(crate) fn new() -> (Arc<Self>, watch::Receiver<HealthSnapshot>) {
        let (changes, rx) = watch::channel(HealthSnapshot::default());
        (Arc::new(Self { workers: Mutex::new(Vec::new()), changes }), rx)
    }

    pub(crate) fn add(self: &Arc<Self>, name: &str) -> Arc<WorkerRecord> {
        let record = Arc::new(WorkerRecord {
            name: name.into(),
            registry: Arc::downgrade(self),
            status: Mutex::new(Status::new()),
        });
        lock(&self.workers).push(record.clone());
        self.announce();
        record
    }

    pub(crate) fn snapshot(&self) -> HealthSnapshot {
        let workers = lock(&self.workers).iter().map(|w| w.health()).collect();
        HealthSnapshot { workers }
    }

    pub(crate) fn announce(&self) {
        self.changes.send_replace(self.snapshot());
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Health data stays usable after a panic elsewhere: it is only counters and labels.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One worker's live health record.
pub(crate) struct WorkerRecord {
    pub(crate) name: Arc<str>,
    registry: std::sync::Weak<Registry>,
    status: Mutex<Status>,
}

struct Status {
    state: WorkerState,
    restarts: u64,
    last_error: Option<String>,
    last_progress: Instant,
    has_progressed: bool,
    /// When the current attempt started, and when it last recorded progress.
    attempt_started: Instant,
    attempt_progress: Option<Instant>,
    /// The current attempt settled a message (handled it, for good or for a retry).
    attempt_settled: bool,
    last_message_at: Option<Instant>,
    outcomes: OutcomeCounts,
    in_flight: usize,
    overdue_handlers: usize,
    role: Option<ConsumerRole>,
}

impl Status {
    fn new() -> Self {
        Self {
            state: WorkerState::Starting,
            restarts: 0,
            last_error: None,
            last_progress: Instant::now(),
            has_progressed: false,
            attempt_started: Instant::now(),
            attempt_progress: None,
            attempt_settled: false,
            last_message_at: None,
            outcomes: OutcomeCounts::default(),
            in_flight: 0,
            overdue_handlers: 0,
            role: None,
        }
    }
}

/// Converts a tokio instant in the past to wall-clock time.
fn wall_clock(at: Instant) -> SystemTime {
    let ago = Instant::now().saturating_duration_since(at);
    SystemTime::now().checked_sub(ago).unwrap_or(SystemTime::UNIX_EPOCH)
}

impl WorkerRecord {
    fn health(&self) -> WorkerHealth {
        let status = lock(&self.status);
        WorkerHealth {
            name: self.name.to_string(),
            state: status.state,
            restarts: status.restarts,
            last_error: status.last_error.clone(),
            last_progress: status.has_progressed.then(|| wall_clock(status.last_progress)),
            since_progress: status
                .has_progressed
                .then(|| Instant::now().saturating_duration_since(status.last_progress)),
            last_message_at: status.last_message_at.map(wall_clock),
            outcomes: status.outcomes,
            in_flight: status.in_flight,
            overdue_handlers: status.overdue_handlers,
            role: status.role,
        }
    }

    fn announce(&self) {
        if let Some(registry) = self.registry.upgrade() {
            registry.announce();
        }
    }

    pub(crate) fn state(&self) -> WorkerState {
        lock(&self.status).state
    }

    /// Sets the state; announces and updates the state gauge when it changed.
    pub(crate) fn set_state(&self, state: WorkerState) {
        let previous = {
            let mut status = lock(&self.status);
            std::mem::replace(&mut status.state, state)
        };
        if previous != state {
            crate::metrics::worker_state(&self.name, state);
            self.announce();
        }
    }

    pub(crate) fn set_error(&self, error: Option<String>) {
        lock(&self.status).last_error = error;
        self.announce();
    }

    pub(crate) fn add_restart(&self) {
        lock(&self.status).restarts += 1;
        crate::metrics::restart(&self.name);
    }

    pub(crate) fn progress(&self) {
        let mut status = lock(&self.status);
        let now = Instant::now();
        status.last_progress = now;
        status.has_progressed = true;
        status.attempt_progress = Some(now);
    }

    /// A new attempt starts: restarts the stall clock without counting as progress.
    pub(crate) fn start_attempt(&self) {
        let mut status = lock(&self.status);
        let now = Instant::now();
        status.last_progress = now;
        status.attempt_started = now;
        status.attempt_progress = None;
        status.attempt_settled = false;
    }

    /// Whether the current attempt settled a message.
    pub(crate) fn attempt_settled(&self) -> bool {
        lock(&self.status).attempt_settled
    }

    /// How long the current attempt kept making progress: from its start to its last
    /// progress; `None` when it recorded none.
    pub(crate) fn attempt_progressed_for(&self) -> Option<Duration> {
        let status = lock(&self.status);
        status.attempt_progress.map(|at| at.saturating_duration_since(status.attempt_started))
    }

    pub(crate) fn since_progress(&self) -> Duration {
        Instant::now().saturating_duration_since(lock(&self.status).last_progress)
    }

    pub(crate) fn message_received(&self, n: usize) {
        if n > 0 {
            lock(&self.status).last_message_at = Some(Instant::now());
        }
    }

    pub(crate) fn set_in_flight(&self, in_flight: usize) {
        lock(&self.status).in_flight = in_flight;
        crate::metrics::in_flight(&self.name, in_flight);
    }

    /// Sets the consumer role; announces when it changed.
    pub(crate) fn set_role(&self, role: Option<ConsumerRole>) {
        let changed = {
            let mut status = lock(&self.status);
            std::mem::replace(&mut status.role, role) != role
        };
        if changed {
            self.announce();
        }
    }

    pub(crate) fn set_overdue_handlers(&self, overdue: usize) {
        let changed = {
            let mut status = lock(&self.status);
            std::mem::replace(&mut status.overdue_handlers, overdue) != overdue
        };
        if changed {
            self.announce();
        }
    }

    /// Counts an outcome; `settled`: the message was handled and settled (not left
    /// to the broker after a lost lock), which makes the attempt productive.
    pub(crate) fn count(&self, settled: bool, f: impl FnOnce(&mut OutcomeCounts)) {
        let mut status = lock(&self.status);
        f(&mut status.outcomes);
        status.attempt_settled |= settled;
    }
}
