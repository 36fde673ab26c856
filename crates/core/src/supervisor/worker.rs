//! What a supervised worker implements, and what it gets from its supervisor.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::health::WorkerRecord;
use crate::{BoxError, Deadlines, TransportError, WorkerState};

/// A long-running job owned by a [`Supervisor`](crate::Supervisor).
///
/// # Contract
///
/// - [`run`](Self::run) runs until its context is cancelled, then drains and returns
///   `Ok(())`; it returns an error when it cannot go on. It is called again (after a
///   backoff) for every restart, so it sets everything up anew: connections included.
/// - It calls [`WorkerContext::set_running`] once it is up, and
///   [`WorkerContext::progress`] at least once per [`stall_timeout`](Self::stall_timeout)
///   while healthy, or the supervisor deems it stalled and restarts it.
/// - It spawns tasks only through [`WorkerContext::track`], so nothing outlives a
///   shutdown unnoticed.
/// - It does not log the error it returns: the supervisor logs it once, with its chain.
#[async_trait]
pub trait Worker: Send + Sync + 'static {
    /// The worker's name: in logs (field `worker`), metrics and health.
    fn name(&self) -> &str;

    /// How long the worker may go without progress before it is deemed stalled,
    /// cancelled and restarted; `None` disables the watchdog.
    fn stall_timeout(&self) -> Option<Duration>;

    /// Runs the worker until `ctx` is cancelled.
    ///
    /// # Errors
    ///
    /// Whatever stops it; [`WorkerError::is_retryable`] decides between backing off
    /// forever and counting toward the restart limit.
    ///
    /// # Cancellation safety
    ///
    /// The supervisor cancels through `ctx` and waits for the future; it drops the
    /// future only when a shutdown deadline passes.
    async fn run(&self, ctx: WorkerContext) -> Result<(), WorkerError>;
}

/// Why a worker stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// The transport failed; retried forever when [`TransportError::is_retryable`].
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A dependency (database, downstream service) is unavailable: retried forever.
    #[error("{message}")]
    Dependency {
        /// What failed.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
    /// Something that needs a human: counts toward the restart limit.
    #[error("{message}")]
    Fatal {
        /// What failed.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
}

impl WorkerError {
    /// A [`WorkerError::Dependency`] with a source.
    #[must_use]
    pub fn dependency(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Dependency { message: message.into(), source: Some(source.into()) }
    }

    /// A [`WorkerError::Fatal`] without a source.
    #[must_use]
    pub fn fatal(message: impl Into<String>) -> Self {
        Self::Fatal { message: message.into(), source: None }
    }

    /// Whether the supervisor retries without limit (backing off) rather than counting
    /// the error toward the worker's restart limit.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Transport(error) => error.is_retryable(),
            Self::Dependency { .. } => true,
            Self::Fatal { .. } => false,
        }
    }
}

/// What a running worker gets from its supervisor: cancellation, progress and health
/// reporting, deadlines and task tracking. Cheap to clone.
#[derive(Clone)]
pub struct WorkerContext {
    pub(crate) record: Arc<WorkerRecord>,
    pub(crate) cancel: CancellationToken,
    pub(crate) shared: Arc<Shared>,
    /// The deadlines of this run's stop when an operator paused the worker.
    pub(crate) paused_stop: Arc<std::sync::Mutex<Option<Deadlines>>>,
}

impl fmt::Debug for WorkerContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerContext")
            .field("worker", &self.record.name)
            .field("cancelled", &self.cancel.is_cancelled())
            .finish_non_exhaustive()
    }
}

/// A handler the drain deadline cut short, for the [`ShutdownReport`](crate::ShutdownReport).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbortedHandler {
    /// The worker that ran it.
    pub worker: String,
    /// The message it was handling.
    pub message_id: String,
    /// The task did not end even when aborted: it blocks a thread, and keeps running.
    pub blocked: bool,
    /// The message was abandoned for redelivery (the broker answered in time);
    /// otherwise it returns when its lock expires.
    pub abandoned: bool,
}

impl WorkerContext {
    /// A context outside any supervisor, for unit tests of workers.
    #[cfg(test)]
    pub(crate) fn for_tests(name: &str) -> Self {
        let (registry, _changes) = super::health::Registry::new();
        Self {
            record: registry.add(name),
            cancel: CancellationToken::new(),
            shared: Shared::for_tests(),
            paused_stop: Arc::default(),
        }
    }

    /// The worker's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.record.name
    }

    /// The token cancelled when the worker must stop (a shutdown, or a stall restart).
    #[must_use]
    pub fn cancellation_token(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Waits until the worker must stop.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await;
    }

    /// Whether the worker must stop.
    #[must_use]
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Whether the whole supervisor is shutting down (rather than this worker being
    /// restarted). Only then should a worker release buffered messages for good.
    #[must_use]
    pub fn is_shutting_down(&self) -> bool {
        self.shared.root.is_cancelled()
    }

    /// Records progress for the stall watchdog: call on every poll (empty ones too),
    /// every completed message and every lock renewal.
    pub fn progress(&self) {
        self.record.progress();
    }

    /// Marks the worker `running` (it connected, or its circuit breaker closed).
    pub fn set_running(&self) {
        if !self.is_cancelled() {
            self.record.set_state(WorkerState::Running);
        }
    }

    /// Marks the worker `backing_off` while it pauses itself (an open circuit breaker),
    /// with the reason as its last error.
    pub fn set_backing_off(&self, reason: String) {
        if !self.is_cancelled() {
            self.record.set_state(WorkerState::BackingOff);
            self.record.set_error(Some(reason));
        }
    }

    /// The deadlines of the worker's stop: the shutdown's; when an operator paused the
    /// worker, a drain long enough for its handlers to finish; when the worker is being
    /// restarted, [`Deadlines::restart`] (handlers aborted now, 1 s of grace).
    #[must_use]
    pub fn deadlines(&self) -> Deadlines {
        let paused = || *self.paused_stop.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.shared.deadlines().or_else(paused).unwrap_or_else(Deadlines::restart)
    }

    /// When in-flight work must be finished: [`Deadlines::drain`] of
    /// [`deadlines`](Self::deadlines).
    #[must_use]
    pub fn drain_deadline(&self) -> Instant {
        self.deadlines().drain()
    }

    /// When everything must have stopped, aborted work abandoned included:
    /// [`Deadlines::hard`] of [`deadlines`](Self::deadlines).
    #[must_use]
    pub fn hard_deadline(&self) -> Instant {
        self.deadlines().hard()
    }

    /// Wraps a future so the supervisor's task tracker counts it; spawn the result.
    /// A shutdown reports tasks still running at its deadline.
    pub fn track<F: Future>(&self, future: F) -> impl Future<Output = F::Output> + use<F> {
        self.shared.tracker.track_future(future)
    }

    /// Records that `n` messages were received.
    pub fn record_received(&self, n: usize) {
        self.record.message_received(n);
    }

    /// Records how many messages the worker holds right now.
    pub fn set_in_flight(&self, n: usize) {
        self.record.set_in_flight(n);
    }

    /// Records the role of the worker's consumer (see
    /// [`MessageSource::role`](crate::MessageSource::role)): whether it receives or
    /// stands by; `None` when the queue has no such roles or the worker is not
    /// connected. A standby is healthy: it stays `running`, ready and live.
    pub fn set_role(&self, role: Option<crate::ConsumerRole>) {
        self.record.set_role(role);
    }

    /// Records how many handlers were aborted for their timeout and have not ended yet
    /// (they block a thread).
    pub fn set_overdue_handlers(&self, n: usize) {
        self.record.set_overdue_handlers(n);
    }

    /// Records one settled message.
    pub fn record_settled(&self, settled: Settled, handler_time: Option<Duration>) {
        let name = &self.record.name;
        if let Some(elapsed) = handler_time {
            crate::metrics::handler_duration(name, elapsed);
        }
        crate::metrics::message(name, settled.as_str());
        self.record.count(settled != Settled::LeaseLost, |counts| match settled {
            Settled::Completed => counts.completed += 1,
            Settled::Retried => counts.retried += 1,
            Settled::DeadLettered => counts.dead_lettered += 1,
            Settled::Panicked => {
                counts.panicked += 1;
                counts.retried += 1;
            }
            Settled::LeaseLost => counts.lease_lost += 1,
        });
        if settled == Settled::LeaseLost {
            crate::metrics::lease_lost(name);
        }
    }

    /// Records a dead-letter reason for the `steward_dead_lettered_total` metric.
    pub fn record_dead_letter_reason(&self, reason: &str) {
        crate::metrics::dead_lettered(&self.record.name, reason);
    }

    /// Records a handler cut short by the drain deadline, and whether its message was
    /// abandoned.
    pub fn record_aborted(&self, message_id: &str, blocked: bool, abandoned: bool) {
        self.shared.record_aborted(AbortedHandler {
            worker: self.record.name.to_string(),
            message_id: message_id.to_owned(),
            blocked,
            abandoned,
        });
    }
}

/// What became of one message, for health counters and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Settled {
    /// Completed.
    Completed,
    /// Abandoned for redelivery.
    Retried,
    /// Dead-lettered.
    DeadLettered,
    /// The handler panicked; the message was retried.
    Panicked,
    /// The lock was lost; the message was left to the broker.
    LeaseLost,
}

impl Settled {
    /// The metric label.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "complete",
            Self::Retried => "retry",
            Self::DeadLettered => "dead_letter",
            Self::Panicked => "panic",
            Self::LeaseLost => "lease_lost",
        }
    }
}
