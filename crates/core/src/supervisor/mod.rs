//! The supervisor: owns named workers, restarts them, watches for stalls, reports
//! health and shuts them down by a deadline.

mod backoff;
mod control;
mod health;
mod worker;

use std::any::Any;
use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::task::{AbortHandle, JoinError, JoinHandle};
use tokio::time::{Instant, sleep, sleep_until, timeout, timeout_at};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use backoff::{Backoff, Jitter};
pub use control::{ControlError, WorkerControls};
pub use health::{HealthHandle, HealthSnapshot, OutcomeCounts, WorkerHealth, WorkerState};
pub use worker::{AbortedHandler, Settled, Worker, WorkerContext, WorkerError};

use crate::Deadlines;
use control::Control;
use health::{Registry, WorkerRecord};

/// How long a paused worker's running handlers have to finish before they are aborted
/// (and their messages abandoned).
pub const PAUSE_DRAIN: Duration = Duration::from_secs(60);

/// How many restarts a worker may need before it is declared `failed`.
///
/// Panics, non-retryable errors and stalls count; retryable errors (the broker or the
/// database is unreachable) never do. The window is measured in the worker's running
/// time: time spent waiting out a backoff does not count, so a growing backoff cannot
/// spread failures thin enough to escape the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartIntensity {
    /// The number of restarts allowed within the window; one more failure is fatal.
    pub max_restarts: u32,
    /// The window.
    pub within: Duration,
}

impl Default for RestartIntensity {
    /// 10 restarts within 10 minutes.
    fn default() -> Self {
        Self { max_restarts: 10, within: Duration::from_secs(600) }
    }
}

/// How a [`Supervisor`] restarts its workers.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SupervisorConfig {
    /// The delay before each restart: by default 1 s doubling to 5 min, with jitter.
    pub backoff: Backoff,
    /// A worker that ran this long before failing starts its backoff afresh. Default 60 s.
    pub healthy_reset: Duration,
    /// When a worker gives up for good.
    pub intensity: RestartIntensity,
    /// How long a stalled worker gets to stop after its cancellation before it is
    /// aborted. Default 5 s.
    pub stall_grace: Duration,
    /// A worker whose starts stall this many times in a row, each *fruitless*, is
    /// stuck: it is `failed` (not live), whatever the restart intensity says. A start is
    /// fruitless unless it settled a message or kept making progress for
    /// `healthy_reset` (a poll or two before a hang is not enough). Attempts that end in
    /// a retryable error neither count nor break the run; a productive attempt ends it.
    /// Default 3 (at least 1).
    pub stalls_before_failed: u32,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            backoff: Backoff::default(),
            healthy_reset: Duration::from_secs(60),
            intensity: RestartIntensity::default(),
            stall_grace: Duration::from_secs(5),
            stalls_before_failed: 3,
        }
    }
}

impl SupervisorConfig {
    /// Replaces the backoff.
    #[must_use]
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Replaces the restart intensity.
    #[must_use]
    pub fn with_intensity(mut self, intensity: RestartIntensity) -> Self {
        self.intensity = intensity;
        self
    }

    /// Sets how many stalls in a row without progress make a worker `failed` (at least 1).
    #[must_use]
    pub fn with_stalls_before_failed(mut self, stalls: u32) -> Self {
        self.stalls_before_failed = stalls.max(1);
        self
    }

    /// The longest a worker that stalls on every start, without any progress, can take
    /// to be declared `failed`, for a worker with this stall timeout: each stalled start
    /// lasts at most `stall_timeout + stall_grace`, and between starts comes one backoff
    /// delay (at most the backoff's longest).
    ///
    /// From a fresh start the backoffs are the first ones instead: with the defaults
    /// (stall timeout 85 s) 3 × (85 s + 5 s) + 1 s + 2 s = 273 s.
    #[must_use]
    pub fn stuck_bound(&self, stall_timeout: Duration) -> Duration {
        let stalls = self.stalls_before_failed.max(1);
        stall_timeout
            .saturating_add(self.stall_grace)
            .saturating_mul(stalls)
            .saturating_add(self.backoff.max().saturating_mul(stalls - 1))
    }

    /// The longest a worker whose every start fails at once with an error that counts
    /// (non-retryable, or a panic) can take to be declared `failed`: one backoff delay
    /// before each of its `max_restarts` restarts, the next failure being fatal. With the
    /// defaults 1 + 2 + 4 + … + 256 + 300 s = 811 s (jitter only shortens delays).
    #[must_use]
    pub fn fatal_bound(&self) -> Duration {
        (0..self.intensity.max_restarts).fold(Duration::ZERO, |sum, n| {
            let factor = 2u32.saturating_pow(n.min(31));
            let delay = self.backoff.initial().saturating_mul(factor).min(self.backoff.max());
            sum.saturating_add(delay)
        })
    }

    /// Replaces the healthy-run reset.
    #[must_use]
    pub fn with_healthy_reset(mut self, healthy_reset: Duration) -> Self {
        self.healthy_reset = healthy_reset;
        self
    }
}

/// What a [`Supervisor::shutdown`] achieved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use]
pub struct ShutdownReport {
    /// Workers that stopped by the deadline.
    pub stopped: Vec<String>,
    /// Workers that were still running at the deadline and were aborted.
    pub overran: Vec<String>,
    /// Handlers the drain deadline cut short; their messages were abandoned.
    pub aborted_handlers: Vec<AbortedHandler>,
    /// Tracked tasks still running when `shutdown` returned: tasks that block a thread
    /// and cannot be aborted.
    pub tasks_left: usize,
}

impl ShutdownReport {
    /// Whether every worker and task stopped in time, with no handler cut short.
    #[must_use]
    pub fn is_clean(&self) -> bool {
        self.overran.is_empty() && self.aborted_handlers.is_empty() && self.tasks_left == 0
    }
}

impl Drop for Supervisor {
    /// A supervisor dropped without [`shutdown`](Supervisor::shutdown) still stops its
    /// workers: it cancels them (they drain on their own, unobserved).
    fn drop(&mut self) {
        self.shared.root.cancel();
    }
}

/// State shared by the supervisor, its supervision tasks and the workers' contexts.
pub(crate) struct Shared {
    pub(crate) tracker: TaskTracker,
    pub(crate) root: CancellationToken,
    config: SupervisorConfig,
    /// The shutdown's deadlines, set by `shutdown`.
    deadlines: Mutex<Option<Deadlines>>,
    aborted: Mutex<Vec<AbortedHandler>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Shared state of a supervisor that never runs, for unit tests of workers.
    #[cfg(test)]
    pub(crate) fn for_tests() -> Arc<Self> {
        Arc::new(Self {
            tracker: TaskTracker::new(),
            root: CancellationToken::new(),
            config: SupervisorConfig::default(),
            deadlines: Mutex::new(None),
            aborted: Mutex::new(Vec::new()),
        })
    }

    pub(crate) fn deadlines(&self) -> Option<Deadlines> {
        *lock(&self.deadlines)
    }

    pub(crate) fn record_aborted(&self, aborted: AbortedHandler) {
        lock(&self.aborted).push(aborted);
    }
}

struct Entry {
    record: Arc<WorkerRecord>,
    supervision: AbortHandle,
    attempt: Arc<Mutex<Option<AbortHandle>>>,
}

/// Owns named [`Worker`]s: starts them, restarts them after errors with exponential
/// backoff, watches them for stalls, reports their health and shuts them down by a
/// deadline.
///
/// - Every task runs on one `TaskTracker` with one `CancellationToken`; each worker has
///   a child token, so one worker can be restarted alone. Nothing is detached.
/// - Retryable errors (see [`WorkerError::is_retryable`]) back off forever: the worker
///   is `backing_off`. Panics, non-retryable errors and stalls count toward the
///   [`RestartIntensity`]; past it the worker is `failed` and stays so.
/// - A worker that makes no progress for its [`Worker::stall_timeout`] is `stalled`,
///   cancelled and restarted.
/// - Every error is logged once, here, with its whole chain and the worker name as the
///   `worker` field.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use steward_core::{handler_fn, Outcome, Supervisor, SupervisorConfig, Updater, WorkerState};
/// use steward_inmem::InMemoryBroker;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let broker = InMemoryBroker::new();
/// let source = broker.source("orders").unwrap();
/// let supervisor = Supervisor::new(SupervisorConfig::default());
/// supervisor.spawn(Updater::with_source("orders", source, handler_fn(|_| async { Outcome::Complete })));
///
/// let health = supervisor.health();
/// tokio::time::sleep(Duration::from_millis(10)).await;
/// assert_eq!(health.snapshot().worker("orders").unwrap().state, WorkerState::Running);
///
/// let report = supervisor.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)).await;
/// assert_eq!(report.stopped, ["orders"]);
/// # }
/// ```
pub struct Supervisor {
    shared: Arc<Shared>,
    registry: Arc<Registry>,
    health: HealthHandle,
    controls: WorkerControls,
    entries: Mutex<Vec<Entry>>,
}

impl fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Supervisor")
            .field("workers", &lock(&self.entries).len())
            .field("tasks", &self.shared.tracker.len())
            .finish_non_exhaustive()
    }
}

impl Supervisor {
    /// A supervisor with no workers yet.
    #[must_use]
    pub fn new(config: SupervisorConfig) -> Self {
        let (registry, changes) = Registry::new();
        let shared = Arc::new(Shared {
            tracker: TaskTracker::new(),
            root: CancellationToken::new(),
            config,
            deadlines: Mutex::new(None),
            aborted: Mutex::new(Vec::new()),
        });
        let health = HealthHandle { registry: registry.clone(), changes };
        Self {
            shared,
            registry,
            health,
            controls: WorkerControls::default(),
            entries: Mutex::new(Vec::new()),
        }
    }

    /// Starts supervising `worker` at once.
    ///
    /// # Panics
    ///
    /// Must be called within a tokio runtime.
    pub fn spawn(&self, worker: impl Worker) {
        self.spawn_arc(Arc::new(worker));
    }

    /// Starts supervising a shared `worker` at once.
    ///
    /// # Panics
    ///
    /// Must be called within a tokio runtime.
    pub fn spawn_arc(&self, worker: Arc<dyn Worker>) {
        let record = self.registry.add(worker.name());
        crate::metrics::worker_state(worker.name(), WorkerState::Starting);
        let attempt = Arc::new(Mutex::new(None));
        let control = self.controls.add(worker.name());
        let supervision = Supervision {
            worker,
            control,
            record: record.clone(),
            shared: self.shared.clone(),
            token: self.shared.root.child_token(),
            attempt: attempt.clone(),
        };
        let handle = self.shared.tracker.spawn(supervision.run());
        lock(&self.entries).push(Entry { record, supervision: handle.abort_handle(), attempt });
    }

    /// A handle to pause, resume and restart single workers; cheap to clone.
    #[must_use]
    pub fn controls(&self) -> WorkerControls {
        self.controls.clone()
    }

    /// A handle to read the workers' health; cheap to clone.
    #[must_use]
    pub fn health(&self) -> HealthHandle {
        self.health.clone()
    }

    /// How many tracked tasks (supervision, worker and handler tasks) are running.
    #[must_use]
    pub fn task_count(&self) -> usize {
        self.shared.tracker.len()
    }

    /// Stops every worker by `deadline`: cancels them, lets them drain until shortly
    /// before it, aborts whatever is still running at it, and reports.
    ///
    /// `deadline` is the hard deadline, or the whole [`Deadlines`] of the shutdown:
    /// workers have until its drain deadline for their in-flight handlers, abandon what
    /// they had to abort by its abandon-by instant, and workers still running at its
    /// abort-at instant are aborted (what they held is abandoned). `shutdown` returns by
    /// the hard deadline even if a worker ignores cancellation; the report names it.
    ///
    /// # Cancellation safety
    ///
    /// Not cancel safe: a cancelled shutdown leaves the workers cancelled but not waited
    /// for.
    pub async fn shutdown(self, deadline: impl Into<Deadlines>) -> ShutdownReport {
        let now = Instant::now();
        let deadlines: Deadlines = deadline.into();
        let deadline = deadlines.hard();
        *lock(&self.shared.deadlines) = Some(deadlines);
        let entries = std::mem::take(&mut *lock(&self.entries));
        for entry in &entries {
            if entry.record.state() != WorkerState::Failed {
                entry.record.set_state(WorkerState::Stopping);
            }
        }
        tracing::info!(workers = entries.len(), within = ?deadline.saturating_duration_since(now), "shutting down workers");
        self.shared.tracker.close();
        self.shared.root.cancel();

        let mut report = ShutdownReport::default();
        if timeout_at(deadlines.abort_at(), self.shared.tracker.wait()).await.is_err() {
            for entry in &entries {
                if !entry.supervision.is_finished() {
                    tracing::error!(worker = %entry.record.name, "worker did not stop by the shutdown deadline; aborting it");
                    report.overran.push(entry.record.name.to_string());
                    entry.supervision.abort();
                    if let Some(attempt) = lock(&entry.attempt).as_ref() {
                        attempt.abort();
                    }
                }
            }
            let _ = timeout_at(deadline, self.shared.tracker.wait()).await;
        }
        for entry in &entries {
            if !report.overran.iter().any(|name| **name == *entry.record.name) {
                report.stopped.push(entry.record.name.to_string());
            }
            if entry.record.state() != WorkerState::Failed {
                entry.record.set_state(WorkerState::Stopped);
            }
        }
        report.aborted_handlers = std::mem::take(&mut *lock(&self.shared.aborted));
        report.tasks_left = self.shared.tracker.len();
        if report.tasks_left > 0 {
            tracing::error!(
                tasks = report.tasks_left,
                "tasks still running after the shutdown deadline (blocking a thread?)"
            );
        }
        report
    }
}

/// How one attempt of a worker ended.
enum Exit {
    /// Returned `Ok(())`.
    Returned,
    Failed(WorkerError),
    Panicked(String),
    Stalled(Duration),
    /// Stopped because an operator paused it.
    Paused,
    /// Stopped because an operator asked for a restart.
    Restarted,
}

/// The supervision loop of one worker.
struct Supervision {
    worker: Arc<dyn Worker>,
    control: Arc<Control>,
    record: Arc<WorkerRecord>,
    shared: Arc<Shared>,
    token: CancellationToken,
    attempt: Arc<Mutex<Option<AbortHandle>>>,
}

impl Supervision {
    async fn run(self) {
        self.supervise().await;
        self.control.supervised.store(false, std::sync::atomic::Ordering::Release);
    }

    /// Waits while the worker is paused; `false` when the supervisor shuts down first.
    async fn wait_while_paused(&self) -> bool {
        let mut paused = self.control.paused.subscribe();
        if !*paused.borrow_and_update() {
            return true;
        }
        self.record.set_state(WorkerState::Paused);
        tracing::info!(worker = %self.record.name, "worker paused");
        tokio::select! {
            resumed = async { paused.wait_for(|paused| !*paused).await.is_ok() } => resumed,
            () = self.token.cancelled() => false,
        }
    }

    async fn supervise(&self) {
        let name = self.record.name.clone();
        let config = self.shared.config.clone();
        let mut consecutive: u32 = 0;
        // Stalled starts in a row that recorded no progress at all.
        let mut fruitless_stalls: u32 = 0;
        // Running time of the worker, and when (in running time) counted failures happened.
        let mut running_time = Duration::ZERO;
        let mut failures: VecDeque<Duration> = VecDeque::new();
        loop {
            if self.token.is_cancelled() || !self.wait_while_paused().await {
                break;
            }
            self.record.set_state(WorkerState::Starting);
            self.record.start_attempt();
            let attempt_token = self.token.child_token();
            let paused_stop = Arc::new(Mutex::new(None));
            let ctx = WorkerContext {
                record: self.record.clone(),
                cancel: attempt_token.clone(),
                shared: self.shared.clone(),
                paused_stop: paused_stop.clone(),
            };
            let started = Instant::now();
            let worker = self.worker.clone();
            let span = tracing::info_span!("worker", worker = %name);
            let handle =
                self.shared.tracker.spawn(async move { worker.run(ctx).await }.instrument(span));
            *lock(&self.attempt) = Some(handle.abort_handle());
            let exit = self.watch(handle, &attempt_token, &paused_stop).await;
            *lock(&self.attempt) = None;
            let ran = started.elapsed();
            running_time += ran;

            if self.token.is_cancelled() {
                // Shutting down: whatever ended the attempt, it is the last one.
                match exit {
                    Exit::Returned => {}
                    Exit::Failed(error) => {
                        let chain = crate::error_chain(&error);
                        tracing::error!(worker = %name, error = %chain, "worker failed while stopping");
                    }
                    Exit::Panicked(payload) => {
                        tracing::error!(worker = %name, panic = %payload, "worker panicked while stopping");
                    }
                    Exit::Stalled(_) | Exit::Paused | Exit::Restarted => {}
                }
                break;
            }
            match exit {
                Exit::Paused => continue,
                Exit::Restarted => {
                    self.record.add_restart();
                    tracing::info!(worker = %name, "worker restarted on request");
                    continue;
                }
                _ => {}
            }

            // Only time spent making progress counts as healthy: a start that hung for
            // its stall timeout was not healthy, however long it ran.
            let healthy = self
                .record
                .attempt_progressed_for()
                .is_some_and(|healthy| healthy >= config.healthy_reset);
            if healthy {
                consecutive = 0;
            }
            // An attempt was productive if it settled a message or kept making progress
            // for `healthy_reset`; a poll or two before a hang is not enough, or a
            // worker that polls once per start and then hangs would never fail.
            let productive = healthy || self.record.attempt_settled();
            match (&exit, productive) {
                (_, true) => fruitless_stalls = 0,
                (Exit::Stalled(_), false) => fruitless_stalls = fruitless_stalls.saturating_add(1),
                (_, false) => {}
            }
            let (counts, description) = match &exit {
                Exit::Returned => (true, "worker returned without being cancelled".to_owned()),
                Exit::Failed(error) => (!error.is_retryable(), crate::error_chain(error)),
                Exit::Panicked(payload) => (true, format!("worker panicked: {payload}")),
                Exit::Stalled(idle) => (true, format!("worker stalled: no progress for {idle:?}")),
                Exit::Paused | Exit::Restarted => (false, String::new()),
            };
            self.record.set_error(Some(description.clone()));
            if fruitless_stalls >= config.stalls_before_failed.max(1) {
                tracing::error!(
                    worker = %name,
                    error = %description,
                    stalls = fruitless_stalls,
                    "worker failed: it stalled on every start without progress; not restarting"
                );
                self.record.set_error(Some(format!(
                    "{description} (stalled on {fruitless_stalls} starts in a row without progress)"
                )));
                self.record.set_state(WorkerState::Failed);
                return;
            }
            if counts {
                failures.push_back(running_time);
                while failures
                    .front()
                    .is_some_and(|at| running_time.saturating_sub(*at) > config.intensity.within)
                {
                    failures.pop_front();
                }
                if failures.len() > config.intensity.max_restarts as usize {
                    tracing::error!(
                        worker = %name,
                        error = %description,
                        restarts = config.intensity.max_restarts,
                        within = ?config.intensity.within,
                        "worker failed: restart limit reached; not restarting"
                    );
                    self.record.set_state(WorkerState::Failed);
                    return;
                }
            }
            let delay = config.backoff.delay(consecutive);
            consecutive = consecutive.saturating_add(1);
            self.record.add_restart();
            tracing::error!(
                worker = %name,
                error = %description,
                retryable = !counts,
                restart_in = ?delay,
                "worker stopped; restarting"
            );
            self.record.set_state(WorkerState::BackingOff);
            let (mut paused, mut restarts) =
                (self.control.paused.subscribe(), self.control.restarts.subscribe());
            tokio::select! {
                () = sleep(delay) => {}
                // A pause or a restart request ends the backoff: the loop's top waits
                // out the pause, or starts the worker again now.
                _ = until_paused(&mut paused) => {}
                _ = restarts.changed() => {}
                () = self.token.cancelled() => break,
            }
        }
        if self.record.state() != WorkerState::Failed {
            self.record.set_state(WorkerState::Stopped);
        }
    }

    /// Waits for the attempt to end, cancelling and aborting it if it stalls.
    async fn watch(
        &self,
        mut handle: JoinHandle<Result<(), WorkerError>>,
        attempt_token: &CancellationToken,
        paused_stop: &Mutex<Option<Deadlines>>,
    ) -> Exit {
        let stall_timeout = self.worker.stall_timeout();
        let mut paused = self.control.paused.subscribe();
        let mut restarts = self.control.restarts.subscribe();
        loop {
            // A stall timeout too long to add to the clock means no watchdog.
            let check = stall_timeout.filter(|_| !self.token.is_cancelled()).and_then(|limit| {
                let idle = self.record.since_progress();
                Instant::now().checked_add(limit.saturating_sub(idle))
            });
            tokio::select! {
                joined = &mut handle => return exit_of(joined),
                true = until_paused(&mut paused) => {
                    // Its handlers may finish; the stall watchdog no longer applies.
                    *lock(paused_stop) = Some(Deadlines::until(Instant::now() + PAUSE_DRAIN));
                    return self.stop_for(handle, attempt_token, Exit::Paused).await;
                }
                Ok(()) = restarts.changed() => {
                    return self.stop_for(handle, attempt_token, Exit::Restarted).await;
                }
                () = sleep_until(check.unwrap_or_else(Instant::now)), if check.is_some() => {
                    let idle = self.record.since_progress();
                    if stall_timeout.is_some_and(|limit| idle >= limit) && !self.token.is_cancelled() {
                        self.record.set_state(WorkerState::Stalled);
                        // The restart below logs the error; this notes the state change.
                        tracing::warn!(worker = %self.record.name, idle = ?idle, "worker stalled; cancelling it");
                        attempt_token.cancel();
                        if timeout(self.shared.config.stall_grace, &mut handle).await.is_err() {
                            handle.abort();
                        }
                        return Exit::Stalled(idle);
                    }
                }
            }
        }
    }
}

impl Supervision {
    /// Cancels the attempt for a pause or a restart and waits for it to drain (as on a
    /// restart after an error: its handlers finish, unstarted messages are released).
    /// An error or panic while draining is logged; the attempt ends as `why`.
    async fn stop_for(
        &self,
        mut handle: JoinHandle<Result<(), WorkerError>>,
        attempt_token: &CancellationToken,
        why: Exit,
    ) -> Exit {
        if !matches!(why, Exit::Restarted) {
            self.record.set_state(WorkerState::Stopping);
        }
        attempt_token.cancel();
        let name = &self.record.name;
        match exit_of((&mut handle).await) {
            Exit::Failed(error) => {
                let chain = crate::error_chain(&error);
                tracing::error!(worker = %name, error = %chain, "worker failed while stopping on request");
            }
            Exit::Panicked(payload) => {
                tracing::error!(worker = %name, panic = %payload, "worker panicked while stopping on request");
            }
            _ => {}
        }
        why
    }
}

/// Waits until `paused` says so; `false` when its sender is gone.
async fn until_paused(paused: &mut tokio::sync::watch::Receiver<bool>) -> bool {
    paused.wait_for(|paused| *paused).await.is_ok()
}

fn exit_of(joined: Result<Result<(), WorkerError>, JoinError>) -> Exit {
    match joined {
        Ok(Ok(())) => Exit::Returned,
        Ok(Err(error)) => Exit::Failed(error),
        Err(error) if error.is_panic() => Exit::Panicked(panic_message(error.into_panic())),
        Err(_) => Exit::Panicked("worker task was aborted".to_owned()),
    }
}

/// The text of a panic payload.
pub(crate) fn panic_message(payload: Box<dyn Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(text) => *text,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(text) => (*text).to_owned(),
            Err(_) => "non-text panic payload".to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stuck_bound_adds_every_stalled_start_and_the_longest_backoffs_between() {
        let config = SupervisorConfig::default();
        let stall = Duration::from_secs(85);
        // 3 × (85 s + 5 s) + 2 × 300 s.
        assert_eq!(config.stuck_bound(stall), Duration::from_secs(870));
        let once = SupervisorConfig::default().with_stalls_before_failed(0);
        assert_eq!(once.stalls_before_failed, 1, "at least one stall");
        assert_eq!(once.stuck_bound(stall), Duration::from_secs(90));
        assert_eq!(config.stuck_bound(Duration::MAX), Duration::MAX, "saturates");
    }

    #[test]
    fn fatal_bound_adds_the_backoff_before_each_allowed_restart() {
        assert_eq!(SupervisorConfig::default().fatal_bound(), Duration::from_secs(811));
        let few = SupervisorConfig::default()
            .with_intensity(RestartIntensity { max_restarts: 3, within: Duration::from_secs(60) });
        assert_eq!(few.fatal_bound(), Duration::from_secs(7));
    }
}
