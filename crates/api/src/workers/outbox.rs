//! The outbox worker: publishes the messages that transactions wrote to the outbox, and
//! deletes each row only once the broker accepted it.
//!
//! A crash between a commit and the send loses nothing: the row is still there, and a
//! worker (this one after a restart, or another replica's) sends it. Consumers see each
//! message at least once, with the row's message id (the row id and a random key
//! written with the row, so no other database's row has it) so they can drop
//! duplicates.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use steward_core::{
    Backoff, ErrorKind, HealthHandle, HealthSnapshot, Jitter, MessageSink, OutgoingMessage, Worker,
    WorkerContext, WorkerError, WorkerState, error_chain,
};
use tokio::time::{Instant, sleep, timeout};

use crate::storage::{LeaseClock, OutboxRecord, Store, StoreError};

/// The metric with the number of outbox rows not yet published.
pub(super) const BACKLOG_METRIC: &str = "steward_outbox_backlog";

/// The metric with the number of parked outbox rows, labelled with the worker's name.
pub const PARKED_METRIC: &str = "steward_outbox_parked";

/// The metric with the age of the oldest parked outbox row in seconds (0 when none),
/// labelled with the worker's name.
pub const PARKED_OLDEST_AGE_METRIC: &str = "steward_outbox_parked_oldest_age_seconds";

/// How an [`OutboxWorker`] publishes.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OutboxConfig {
    /// Rows claimed at a time. Default 32.
    pub batch_size: usize,
    /// Sends in flight at once (rows of different aggregates). Default 8.
    pub concurrency: usize,
    /// How long a claim lasts; a worker that dies holding rows gives them up after it.
    /// Default 60 s.
    pub lease: Duration,
    /// How long one send may take before it counts as failed. Default 20 s.
    pub send_timeout: Duration,
    /// How often to look for rows when no commit woke the worker. Default 1 s.
    pub poll_interval: Duration,
    /// The delay before a failed row is tried again, by attempts so far: by default
    /// 1 s doubling to 5 min.
    pub retry_backoff: Backoff,
    /// After how many failed sends a row is parked, counting only failures with a
    /// send to the transport succeeding since the row's previous failure (so an outage
    /// of the broker parks nothing). Default 10. A send error of the message's own
    /// (see [`is_message_fault`]) parks the row at once.
    pub park_after: u32,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            batch_size: 32,
            concurrency: 8,
            lease: Duration::from_secs(60),
            send_timeout: Duration::from_secs(20),
            poll_interval: Duration::from_secs(1),
            retry_backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(300))
                .with_jitter(Jitter::none()),
            park_after: 10,
        }
    }
}

impl OutboxConfig {
    /// Sets the lease.
    #[must_use]
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Sets the retry backoff.
    #[must_use]
    pub fn with_retry_backoff(mut self, retry_backoff: Backoff) -> Self {
        self.retry_backoff = retry_backoff;
        self
    }

    /// Sets the poll interval.
    #[must_use]
    pub fn with_poll_interval(mut self, poll_interval: Duration) -> Self {
        self.poll_interval = poll_interval;
        self
    }

    /// Sets after how many failed sends (with the transport otherwise working) a row
    /// is parked.
    #[must_use]
    pub fn with_park_after(mut self, park_after: u32) -> Self {
        self.park_after = park_after;
        self
    }

    /// Sets the send timeout.
    #[must_use]
    pub fn with_send_timeout(mut self, send_timeout: Duration) -> Self {
        self.send_timeout = send_timeout;
        self
    }
}

/// A supervised worker that publishes outbox rows through a [`MessageSink`].
///
/// - Woken when a transaction that wrote to the outbox commits, and polling every
///   `poll_interval` otherwise (rows due for a retry, rows other replicas wrote).
/// - Claims rows with a lease; at most one row per aggregate is in flight, so messages
///   about one resource or airlock request leave in the order they were written.
/// - Times leases, retries and parking by the database's clock
///   ([`LeaseClock::Database`]), which every replica shares: a replica whose own clock
///   runs ahead cannot take over a row whose lease another still holds.
/// - Deletes a row only after the send succeeded; a failed send is retried with
///   backoff, with its error kept on the row.
/// - Parks a row that cannot be sent: moves it to the parked rows, with its error and
///   attempts, so the later rows of its aggregate go on (leaving a gap in that
///   aggregate's order). A send error of the message's own ([`is_message_fault`])
///   parks it at once; other errors park it after
///   [`park_after`](OutboxConfig::park_after) failures, counting only those with a
///   send succeeding in between, so a broker outage parks nothing.
/// - Reports the backlog as the gauge `steward_outbox_backlog`, and the parked rows as
///   `steward_outbox_parked` and `steward_outbox_parked_oldest_age_seconds`.
/// - On shutdown it keeps publishing until the drain deadline or an empty outbox, then
///   gives up its leases. Given the supervisor's health
///   ([`with_producers`](Self::with_producers)), an empty outbox ends the flush only
///   once every other worker has stopped, so rows that draining handlers commit go out
///   before the process exits.
/// - The database being down is a retryable error: the supervisor backs off.
pub struct OutboxWorker {
    name: String,
    store: Store,
    sink: Arc<dyn MessageSink>,
    config: OutboxConfig,
    owner: String,
    clock: LeaseClock,
    producers: Option<HealthHandle>,
    /// Sends that succeeded, so far.
    successes: AtomicU64,
    /// Per failing row: its failures counted toward `park_after`, and `successes` at
    /// its last failure. In memory: a restart or another replica starts counting anew.
    strikes: Mutex<HashMap<i64, (u32, u64)>>,
}

impl std::fmt::Debug for OutboxWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxWorker")
            .field("name", &self.name)
            .field("owner", &self.owner)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What one pass over the outbox did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Pass {
    claimed: usize,
    sent: usize,
}

/// A reading of the lease clock, taken when a pass claims its rows: the worker tells
/// the time from it for the rest of the pass.
#[derive(Debug, Clone, Copy)]
struct Reading {
    /// The lease clock's time, in milliseconds since the epoch.
    now_ms: i64,
    /// When, by this process's monotonic clock, the reading was asked for (before the
    /// query: so the time told from it is never behind the database's).
    at: Instant,
}

/// What became of one claimed row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Published {
    /// Sent and deleted.
    Sent,
    /// The send failed; the row waits for its retry.
    Failed,
    /// Not tried: too little of the lease was left for a whole send.
    Skipped,
    /// It could not be sent; it was moved to the parked rows.
    Parked,
}

/// Whether a send error is the message's own fault, so retrying it cannot help: a
/// protocol error (the broker refused the message: too large, malformed) or an
/// unclassified one. Connection errors and timeouts are the broker's, and a refused
/// credential or a missing queue hits every message alike: those count toward
/// [`OutboxConfig::park_after`] instead.
#[must_use]
pub fn is_message_fault(kind: ErrorKind) -> bool {
    !kind.is_retryable() && matches!(kind, ErrorKind::Protocol | ErrorKind::Other)
}

/// Whether a worker error came from a busy database ([`StoreError::is_busy`]).
fn database_busy(error: &WorkerError) -> bool {
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<StoreError>())
        .is_some_and(StoreError::is_busy)
}

fn unavailable(error: StoreError) -> WorkerError {
    if error.is_unavailable() {
        WorkerError::dependency("the database is unavailable", error)
    } else if error.is_busy() {
        WorkerError::dependency("the database is busy", error)
    } else {
        WorkerError::Fatal { message: "outbox query failed".to_owned(), source: Some(error.into()) }
    }
}

impl OutboxWorker {
    /// A worker named `outbox` publishing from `store` through `sink`.
    #[must_use]
    pub fn new(store: Store, sink: Arc<dyn MessageSink>) -> Self {
        OutboxWorker {
            name: "outbox".to_owned(),
            store,
            sink,
            config: OutboxConfig::default(),
            owner: format!("outbox-{}", uuid::Uuid::new_v4().simple()),
            clock: LeaseClock::Database,
            producers: None,
            successes: AtomicU64::new(0),
            strikes: Mutex::new(HashMap::new()),
        }
    }

    /// The health of the supervisor this worker runs under: on shutdown, the flush
    /// waits for every other worker there to stop (they may still commit rows while
    /// they drain) before its last pass, within the drain deadline.
    #[must_use]
    pub fn with_producers(mut self, health: HealthHandle) -> Self {
        self.producers = Some(health);
        self
    }

    /// The clock leases, retry and parking times are read from: the database's by
    /// default ([`LeaseClock::Database`]), so workers of replicas whose own clocks
    /// disagree still agree on when a lease ends.
    #[must_use]
    pub fn with_clock(mut self, clock: LeaseClock) -> Self {
        self.clock = clock;
        self
    }

    /// Replaces the configuration.
    #[must_use]
    pub fn with_config(mut self, config: OutboxConfig) -> Self {
        self.config = config;
        self
    }

    /// Renames the worker (several in one process, in tests).
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Reads the lease clock.
    async fn read_clock(&self) -> Result<Reading, StoreError> {
        let at = Instant::now();
        let now_ms = self.store.lease_now(&self.clock).await?;
        Ok(Reading { now_ms, at })
    }

    /// The lease clock's time now: a local clock read again; the database's told from
    /// `reading` and the time passed since, without a query per row.
    fn now_ms(&self, reading: Reading) -> i64 {
        match &self.clock {
            LeaseClock::Local(clock) => crate::storage::millis(clock.now()),
            LeaseClock::Database => {
                let passed = i64::try_from(reading.at.elapsed().as_millis()).unwrap_or(i64::MAX);
                reading.now_ms.saturating_add(passed)
            }
        }
    }

    /// Claims a batch and publishes it, each send bounded by [`send_limit`](Self::send_limit).
    /// A pass is never cut between a successful send and the delete of its row.
    async fn pass(&self, ctx: &WorkerContext) -> Result<Pass, WorkerError> {
        let reading = self.read_clock().await.map_err(unavailable)?;
        let now = reading.now_ms;
        let lease_until = now + i64::try_from(self.config.lease.as_millis()).unwrap_or(i64::MAX);
        let claimed = self
            .store
            .claim_outbox(&self.owner, self.config.batch_size, now, lease_until)
            .await
            .map_err(unavailable)?;
        let mut pass = Pass { claimed: claimed.len(), sent: 0 };
        if claimed.is_empty() {
            return Ok(pass);
        }
        ctx.set_in_flight(claimed.len());
        let results: Vec<Result<Published, WorkerError>> = futures::stream::iter(claimed)
            .map(|record| async {
                let published = self.publish(ctx, record, reading, lease_until).await;
                ctx.progress();
                published
            })
            .buffer_unordered(self.config.concurrency.max(1))
            .collect()
            .await;
        ctx.set_in_flight(0);
        let mut skipped = false;
        for result in results {
            match result? {
                Published::Sent => pass.sent += 1,
                Published::Failed | Published::Parked => {}
                Published::Skipped => skipped = true,
            }
        }
        if skipped {
            // Hand the rows left over to whichever worker claims next, at once.
            self.store.release_outbox(&self.owner).await.map_err(unavailable)?;
        }
        ctx.progress();
        Ok(pass)
    }

    /// How long a send may take when it starts now: the send timeout, cut to the drain
    /// deadline once the service is shutting down, and to what is left of the lease
    /// minus a safety margin, so that no other worker can claim the row while this
    /// send may still reach the broker. `None` when too little of the lease is left.
    fn send_limit(
        &self,
        ctx: &WorkerContext,
        reading: Reading,
        lease_until: i64,
    ) -> Option<Duration> {
        let mut limit = self.config.send_timeout;
        if ctx.is_shutting_down() {
            limit = limit.min(ctx.drain_deadline().saturating_duration_since(Instant::now()));
        }
        let margin = i64::try_from((self.config.lease / 6).as_millis()).unwrap_or(i64::MAX);
        let lease_left = lease_until.saturating_sub(self.now_ms(reading)).saturating_sub(margin);
        let lease_left = Duration::from_millis(u64::try_from(lease_left).ok()?);
        (!lease_left.is_zero()).then(|| limit.min(lease_left))
    }

    /// Sends one row; deletes it on success, records the failure otherwise.
    async fn publish(
        &self,
        ctx: &WorkerContext,
        record: OutboxRecord,
        reading: Reading,
        lease_until: i64,
    ) -> Result<Published, WorkerError> {
        let id = record.id;
        let message_id = record.message_id();
        let queue = record.message.queue.clone();
        let Some(limit) = self.send_limit(ctx, reading, lease_until) else {
            tracing::debug!(queue = %queue, message_id = %message_id, "lease nearly over; leaving the row for the next claim");
            return Ok(Published::Skipped);
        };
        let message = outgoing(&record);
        let successes_before = self.successes.load(Ordering::SeqCst);
        let sent = match timeout(limit, self.sink.send(&queue, message)).await {
            Ok(result) => result.map_err(|error| (error.kind(), error_chain(&error))),
            Err(_) => Err((ErrorKind::Timeout, format!("send timed out after {limit:?}"))),
        };
        match sent {
            Ok(()) => {
                tracing::debug!(queue = %queue, message_id = %message_id, aggregate = %record.message.aggregate_id, "published");
                self.successes.fetch_add(1, Ordering::SeqCst);
                self.forget_strikes(id);
                if !self.store.delete_outbox(id, &self.owner).await.map_err(unavailable)? {
                    tracing::warn!(queue = %queue, message_id = %message_id, "the lease passed to another worker during the send; it sends the row again");
                }
                Ok(Published::Sent)
            }
            Err((kind, error)) => {
                let attempts = u32::try_from(record.attempts).unwrap_or(u32::MAX);
                let strikes = self.strike(id, successes_before);
                if is_message_fault(kind) || strikes >= self.config.park_after.max(1) {
                    let parked = self
                        .store
                        .park_outbox(id, &self.owner, &error, self.now_ms(reading))
                        .await
                        .map_err(unavailable)?;
                    self.forget_strikes(id);
                    if parked {
                        tracing::error!(
                            queue = %queue,
                            message_id = %message_id,
                            aggregate = %record.message.aggregate_id,
                            attempts = attempts + 1,
                            error = %error,
                            "an outbox message cannot be sent; parked it, and its aggregate goes on without it"
                        );
                        return Ok(Published::Parked);
                    }
                    return Ok(Published::Failed);
                }
                let delay = self.config.retry_backoff.delay(attempts);
                tracing::warn!(
                    queue = %queue,
                    message_id = %message_id,
                    attempts = attempts + 1,
                    retry_in = ?delay,
                    error = %error,
                    "publishing an outbox message failed; retrying later"
                );
                let retry_at = self
                    .now_ms(reading)
                    .saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
                self.store
                    .fail_outbox(id, &self.owner, &error, retry_at)
                    .await
                    .map_err(unavailable)?;
                Ok(Published::Failed)
            }
        }
    }

    /// Counts a failure of row `id` toward parking it when a send to the transport
    /// succeeded since its previous failure (or, for its first, since its send began),
    /// and returns its count.
    fn strike(&self, id: i64, successes_before: u64) -> u32 {
        let successes = self.successes.load(Ordering::SeqCst);
        let mut strikes = self.strikes.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = strikes.entry(id).or_insert((0, successes_before));
        if successes > entry.1 {
            entry.0 = entry.0.saturating_add(1);
        }
        entry.1 = successes;
        entry.0
    }

    fn forget_strikes(&self, id: i64) {
        self.strikes.lock().unwrap_or_else(PoisonError::into_inner).remove(&id);
    }

    async fn report_backlog(&self) {
        match self.store.outbox_backlog().await {
            Ok(backlog) => metrics::gauge!(BACKLOG_METRIC).set(backlog as f64),
            Err(error) => {
                tracing::debug!(error = %error_chain(&error), "could not count the outbox backlog");
            }
        }
        let parked = async {
            let parked = self.store.parked_outbox().await?;
            let now = match parked.oldest_parked_at {
                Some(_) => self.store.lease_now(&self.clock).await?,
                None => 0,
            };
            Ok::<_, StoreError>((parked, now))
        };
        match parked.await {
            Ok((parked, now)) => {
                let age = parked
                    .oldest_parked_at
                    .map_or(0.0, |at| (now.saturating_sub(at)).max(0) as f64 / 1000.0);
                let worker = self.name.clone();
                metrics::gauge!(PARKED_METRIC, "worker" => worker.clone()).set(parked.count as f64);
                metrics::gauge!(PARKED_OLDEST_AGE_METRIC, "worker" => worker).set(age);
            }
            Err(error) => {
                tracing::debug!(error = %error_chain(&error), "could not count the parked outbox rows");
            }
        }
    }

    /// Whether every worker but this one has stopped, so none can commit rows any more.
    fn others_stopped(&self, snapshot: &HealthSnapshot) -> bool {
        snapshot
            .workers
            .iter()
            .filter(|worker| worker.name != self.name)
            .all(|worker| matches!(worker.state, WorkerState::Stopped | WorkerState::Failed))
    }

    /// Publishes until the drain deadline passes or the outbox is empty (of due rows)
    /// with every producer stopped.
    async fn flush(&self, ctx: &WorkerContext) {
        let deadline = ctx.drain_deadline();
        let mut producers = self.producers.as_ref().map(HealthHandle::subscribe);
        let mut last_pass = producers.is_none();
        while Instant::now() < deadline {
            match self.pass(ctx).await {
                Ok(pass) if pass.claimed > 0 => continue,
                Ok(_) if last_pass => break,
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "outbox flush stopped early");
                    break;
                }
            }
            let Some(watch) = producers.as_mut() else { break };
            if self.others_stopped(&watch.borrow_and_update()) {
                // One more pass for what they committed before they stopped.
                last_pass = true;
                continue;
            }
            tokio::select! {
                () = self.store.outbox_written() => {}
                changed = watch.changed() => last_pass = changed.is_err(),
                () = sleep(self.config.poll_interval) => {}
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        if let Err(error) = self.store.release_outbox(&self.owner).await {
            tracing::warn!(error = %error_chain(&error), "could not release outbox leases; they run out");
        }
        self.report_backlog().await;
    }
}

/// The broker message for an outbox row, with the row's message id.
fn outgoing(record: &OutboxRecord) -> OutgoingMessage {
    let mut outgoing = record.message.outgoing.clone().with_message_id(record.message_id());
    if let Some(subject) = &record.message.subject {
        outgoing.properties.insert("subject".to_owned(), subject.clone());
    }
    outgoing
}

#[async_trait]
impl Worker for OutboxWorker {
    fn name(&self) -> &str {
        &self.name
    }

    fn stall_timeout(&self) -> Option<Duration> {
        Some(
            self.config.send_timeout * 3 + self.config.poll_interval * 10 + Duration::from_secs(30),
        )
    }

    async fn run(&self, ctx: WorkerContext) -> Result<(), WorkerError> {
        self.store.ping().await.map_err(unavailable)?;
        ctx.set_running();
        ctx.progress();
        loop {
            if ctx.is_cancelled() {
                break;
            }
            // A pass is not interrupted by cancellation: once shutting down, each send
            // ends by the drain deadline, and a row sent is always deleted.
            let pass = match self.pass(&ctx).await {
                Ok(pass) => pass,
                // A busy database (no connection free, a deadlock) is not down: try
                // again at the next poll, staying `running`.
                Err(error) if database_busy(&error) => {
                    tracing::warn!(worker = %self.name, error = %error_chain(&error), "the database was busy; the outbox tries again at its next poll");
                    Pass { claimed: 0, sent: 0 }
                }
                Err(error) => return Err(error),
            };
            self.report_backlog().await;
            ctx.progress();
            if pass.sent > 0 {
                // Something went out: the next message of its aggregate may be due now,
                // and a full batch suggests more.
                continue;
            }
            tokio::select! {
                () = self.store.outbox_written() => {}
                () = sleep(self.config.poll_interval) => {}
                () = ctx.cancelled() => break,
            }
        }
        if ctx.is_shutting_down() {
            self.flush(&ctx).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::OutboxMessage;

    #[test]
    fn outgoing_message_carries_row_id_and_headers() {
        let record = OutboxRecord {
            id: 42,
            message_key: Some("k1".to_owned()),
            message: OutboxMessage::json("workspacequeue", &serde_json::json!({"a": 1}), "r-1")
                .expect("serializable")
                .with_session_id("r-1")
                .with_correlation_id("op-1")
                .with_subject("r-1/statusChanged"),
            created_at: 0,
            attempts: 0,
            lease_owner: None,
            lease_until: None,
            last_error: None,
        };
        let out = outgoing(&record);
        assert_eq!(out.message_id.as_deref(), Some("42-k1"));
        assert_eq!(out.session_id.as_deref(), Some("r-1"));
        assert_eq!(out.correlation_id.as_deref(), Some("op-1"));
        assert_eq!(out.content_type.as_deref(), Some("application/json"));
        assert_eq!(out.properties.get("subject").map(String::as_str), Some("r-1/statusChanged"));
        assert_eq!(out.body, r#"{"a":1}"#);
    }
}
