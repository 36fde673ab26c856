//! The Updater: one named worker that receives from a queue and runs a handler per
//! message, settling each by its outcome.

mod breaker;
mod delayed;
mod handlers;
mod held;
mod renewal;
mod run;
mod sessions;
mod settlement;
#[cfg(test)]
mod testing;

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;

use crate::{
    Backoff, Deadlines, Handler, MessageSource, TransportError, Worker, WorkerContext, WorkerError,
};

/// The largest batch one receive asks for; a larger `batch_size` is capped to it.
pub const MAX_BATCH_SIZE: usize = 1024;

/// The shortest `handler_timeout`; a shorter one is raised to it (a handler aborted
/// before it could finish any await would send every message to the dead-letter queue).
pub const MIN_HANDLER_TIMEOUT: Duration = Duration::from_secs(1);

/// How an [`Updater`] receives and handles messages.
///
/// [`Updater::with_config`] bounds the values set directly on the fields as the setters
/// do: `batch_size` to 1..=[`MAX_BATCH_SIZE`], `concurrency` to at least 1, and
/// `handler_timeout` to at least [`MIN_HANDLER_TIMEOUT`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct UpdaterConfig {
    /// The most messages one receive asks for. Default 16, at most [`MAX_BATCH_SIZE`].
    pub batch_size: usize,
    /// The most handlers running at once. Default 8, at least 1.
    pub concurrency: usize,
    /// How long one receive waits on an empty queue. Default 5 s.
    pub wait: Duration,
    /// Renew a lock this long before it expires (at most half the lock). Default 10 s.
    pub renew_margin: Duration,
    /// A message delivered more often than this is dead-lettered with reason
    /// `MaxDeliveryCountExceeded`, without calling the handler. Default 10.
    pub max_deliveries: u32,
    /// The redelivery delay of a retry without `after`, by delivery count: by default
    /// 1 s doubling to 2 min.
    pub retry_backoff: Backoff,
    /// The pauses between dependency probes while the circuit breaker is open: by default
    /// 1 s doubling to 30 s.
    pub probe_backoff: Backoff,
    /// No progress for this long means the worker is stalled. `None`: 5 × `wait` + 60 s.
    pub stall_timeout: Option<Duration>,
    /// After a receive error, how long running handlers may finish before the worker
    /// aborts them and restarts. Default 10 s.
    pub error_drain: Duration,
    /// The longest one broker call (a settlement, a dead-letter, a lock renewal) may
    /// take; each runs beside the loop, so a slow one holds up nothing else. A call past
    /// it counts as failed: the message returns when its lock expires. Default 30 s.
    pub broker_timeout: Duration,
    /// A handler running longer is aborted and its message abandoned for a retry; at
    /// least [`MIN_HANDLER_TIMEOUT`].
    /// `None` (the default): handlers may run as long as their locks can be renewed
    /// (on a transport without timed locks, as long as they like: set it there to find
    /// hung handlers).
    /// A handler that blocks a thread cannot be aborted: it keeps its session (order
    /// before speed) and its slot until it returns.
    pub handler_timeout: Option<Duration>,
    /// At a shutdown, how long before its hard deadline the handlers still running are
    /// aborted, so that their messages can still be abandoned over a slow broker: at
    /// most a fifth of the time left, and never less than the shutdown's own grace.
    /// Default 5 s.
    pub shutdown_grace: Duration,
}

impl Default for UpdaterConfig {
    fn default() -> Self {
        Self {
            batch_size: 16,
            concurrency: 8,
            wait: Duration::from_secs(5),
            renew_margin: Duration::from_secs(10),
            max_deliveries: 10,
            retry_backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(120)),
            probe_backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(30)),
            stall_timeout: None,
            error_drain: Duration::from_secs(10),
            broker_timeout: Duration::from_secs(30),
            handler_timeout: None,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

impl UpdaterConfig {
    /// Sets the batch size (1 to [`MAX_BATCH_SIZE`]).
    #[must_use]
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.clamp(1, MAX_BATCH_SIZE);
        self
    }

    /// Sets the concurrency (at least 1).
    #[must_use]
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// Sets the receive wait.
    #[must_use]
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Sets the lock renewal margin.
    #[must_use]
    pub fn with_renew_margin(mut self, renew_margin: Duration) -> Self {
        self.renew_margin = renew_margin;
        self
    }

    /// Sets the delivery limit.
    #[must_use]
    pub fn with_max_deliveries(mut self, max_deliveries: u32) -> Self {
        self.max_deliveries = max_deliveries;
        self
    }

    /// Sets the retry backoff.
    #[must_use]
    pub fn with_retry_backoff(mut self, retry_backoff: Backoff) -> Self {
        self.retry_backoff = retry_backoff;
        self
    }

    /// Sets the probe backoff of the circuit breaker.
    #[must_use]
    pub fn with_probe_backoff(mut self, probe_backoff: Backoff) -> Self {
        self.probe_backoff = probe_backoff;
        self
    }

    /// Sets the stall timeout.
    #[must_use]
    pub fn with_stall_timeout(mut self, stall_timeout: Duration) -> Self {
        self.stall_timeout = Some(stall_timeout);
        self
    }

    /// Sets the bound of each broker call.
    #[must_use]
    pub fn with_broker_timeout(mut self, broker_timeout: Duration) -> Self {
        self.broker_timeout = broker_timeout;
        self
    }

    /// Sets the handler timeout (at least [`MIN_HANDLER_TIMEOUT`]).
    #[must_use]
    pub fn with_handler_timeout(mut self, handler_timeout: Duration) -> Self {
        self.handler_timeout = Some(handler_timeout.max(MIN_HANDLER_TIMEOUT));
        self
    }

    /// Sets how long before a shutdown's hard deadline running handlers are aborted.
    #[must_use]
    pub fn with_shutdown_grace(mut self, shutdown_grace: Duration) -> Self {
        self.shutdown_grace = shutdown_grace;
        self
    }

    /// The configuration with every value within its bounds (see the fields).
    fn bounded(mut self) -> Self {
        self.batch_size = self.batch_size.clamp(1, MAX_BATCH_SIZE);
        self.concurrency = self.concurrency.max(1);
        self.handler_timeout = self.handler_timeout.map(|t| t.max(MIN_HANDLER_TIMEOUT));
        self
    }

    /// The stall timeout in effect.
    #[must_use]
    pub fn effective_stall_timeout(&self) -> Duration {
        self.stall_timeout
            .unwrap_or_else(|| self.wait.saturating_mul(5).saturating_add(Duration::from_secs(60)))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Only bookkeeping of sessions: usable after a panic elsewhere.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Opens a [`MessageSource`], once per (re)start of an [`Updater`].
///
/// Implemented for async closures returning `Result<impl MessageSource, TransportError>`.
#[async_trait]
pub trait Connect: Send + Sync + 'static {
    /// Connects and returns a source.
    ///
    /// # Errors
    ///
    /// The transport's connection errors; retryable ones make the worker back off.
    ///
    /// # Cancellation safety
    ///
    /// Should be cancel safe: a shutdown drops it.
    async fn connect(&self) -> Result<Arc<dyn MessageSource>, TransportError>;
}

#[async_trait]
impl<F, Fut, S> Connect for F
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<S, TransportError>> + Send,
    S: MessageSource,
{
    async fn connect(&self) -> Result<Arc<dyn MessageSource>, TransportError> {
        Ok(Arc::new(self().await?))
    }
}

/// One source shared by every restart.
struct Fixed(Arc<dyn MessageSource>);

#[async_trait]
impl Connect for Fixed {
    async fn connect(&self) -> Result<Arc<dyn MessageSource>, TransportError> {
        Ok(self.0.clone())
    }
}

/// A named worker that receives messages from a queue and hands each to a [`Handler`],
/// settling it by the [`Outcome`](crate::Outcome).
///
/// - Handlers run as tasks, up to `concurrency` at once; messages with the same
///   `session_id` run strictly one after another, in arrival order, and a message waiting
///   for its turn keeps its lock renewed; only the message occupying a session frees it.
///   On transports without sessions, a message retried with a delay, or one whose lock
///   was lost or whose settlement failed, also holds back its session's later messages
///   until it returns (or, if another consumer took it, until 6 × its delay + 2 × the
///   wait + [`LOCK_REPORT_SLACK`](crate::LOCK_REPORT_SLACK) after it was due back; that clock stops while the updater stops receiving).
///   Several such messages of one session are waited for in order. Sessions still
///   waiting when a run ends are remembered by the next run of the same updater. When
///   parked messages fill their bound while a session waits for its head, the newest go
///   back to the broker until the head is due (on transports with delayed abandon), or
///   intake goes on one message at a time up to twice the bound (on others), so the
///   head can still be received. A redelivery of a message still waiting here replaces
///   the old copy, whose lock the broker took back: that copy never runs. (A redelivery
///   has the old copy's session and enqueue time and a higher delivery count, and only
///   a timed lock can be taken back; another message that merely shares the id is no
///   redelivery.)
/// - An optional `handler_timeout` aborts a handler running longer and retries its
///   message; one that blocks a thread keeps its session and is counted in the health's
///   `overdue_handlers` until it returns.
/// - Locks are renewed before they expire while a handler runs. A lost lock is logged
///   and counted (`lease_lost`), and that message is never settled. Every broker call
///   runs beside the loop, bounded by `broker_timeout`.
/// - A message delivered more than `max_deliveries` times is dead-lettered with reason
///   `MaxDeliveryCountExceeded` without calling the handler.
/// - A handler panic is caught, logged with the message id and its payload, counted and
///   treated as a retry.
/// - A retry with [`RetryCause::Dependency`](crate::RetryCause::Dependency) opens the
///   worker's circuit breaker: it stops receiving (state `backing_off`) until
///   [`Handler::probe`] succeeds.
/// - Progress is recorded on every poll that answers, handler completion, settlement and
///   successful renewal of a running handler's lock, and while every slot is busy with handlers whose locks are
///   renewed (on a transport without timed locks, with running handlers).
/// - On shutdown it follows the [`Deadlines`](crate::Deadlines), its grace widened to
///   `shutdown_grace`: it calls `stop_receiving` (bounded by `broker_timeout`, beside
///   the loop) and then releases the messages that have not started, lets running
///   handlers finish until the drain deadline, then aborts the rest and abandons their
///   messages so another consumer gets them at once.
///
/// Run it under a [`Supervisor`](crate::Supervisor); see there for an example.
pub struct Updater {
    name: String,
    connect: Arc<dyn Connect>,
    handler: Arc<dyn Handler>,
    config: UpdaterConfig,
    /// Sessions waiting for a message back at the broker when the last run ended.
    waiting: Mutex<sessions::Waiting>,
}

impl fmt::Debug for Updater {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Updater")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Updater {
    /// An updater that connects a new source with `connect` on every (re)start.
    #[must_use]
    pub fn new(name: impl Into<String>, connect: impl Connect, handler: impl Handler) -> Self {
        Self {
            name: name.into(),
            connect: Arc::new(connect),
            handler: Arc::new(handler),
            config: UpdaterConfig::default(),
            waiting: Mutex::default(),
        }
    }

    /// An updater over one source, kept across restarts. Only for sources that never
    /// break for good (an in-memory source in tests); a source whose connection can drop
    /// needs [`Updater::new`] with a [`Connect`] that opens a new one.
    #[must_use]
    pub fn with_source(
        name: impl Into<String>,
        source: impl MessageSource,
        handler: impl Handler,
    ) -> Self {
        Self::new(name, Fixed(Arc::new(source)), handler)
    }

    /// Replaces the configuration, bounding its values (see [`UpdaterConfig`]).
    #[must_use]
    pub fn with_config(mut self, config: UpdaterConfig) -> Self {
        self.config = config.bounded();
        self
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &UpdaterConfig {
        &self.config
    }
}

#[async_trait]
impl Worker for Updater {
    fn name(&self) -> &str {
        &self.name
    }

    fn stall_timeout(&self) -> Option<Duration> {
        Some(self.config.effective_stall_timeout())
    }

    async fn run(&self, ctx: WorkerContext) -> Result<(), WorkerError> {
        let source = tokio::select! {
            source = self.connect.connect() => source?,
            () = ctx.cancelled() => return Ok(()),
        };
        // Connecting is not progress: a worker that connects and then never receives
        // is stuck, and the supervisor must see that.
        ctx.set_running();
        ctx.set_role(source.role());
        tracing::info!(queue = source.queue(), role = ?source.role(), "receiving");
        let waiting = std::mem::take(&mut *lock(&self.waiting));
        let mut run = run::Run::new(&ctx, source.as_ref(), &self.handler, &self.config, waiting);
        let failure = run.receive_loop().await;
        match &failure {
            None => run.drain(ctx.is_shutting_down(), ctx.deadlines()).await,
            Some(_) => {
                let drain = crate::deadlines::saturating_add(
                    tokio::time::Instant::now(),
                    self.config.error_drain,
                );
                run.drain(false, Deadlines::after_drain(drain, Duration::from_secs(1))).await;
            }
        }
        *lock(&self.waiting) = run.take_waiting();
        // Not connected any more: no role until the next source says.
        ctx.set_role(None);
        failure.map_or(Ok(()), |error| Err(error.into()))
    }
}
