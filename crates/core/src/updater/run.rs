//! One run of an updater: the receive loop and the drain, with every message it holds.
//!
//! `Run` coordinates the parts: the [`SessionGate`] (order within a session), the
//! [`Breaker`] (pauses intake while a dependency fails), lock renewals (scheduled by
//! [`renew_at`](super::renewal::renew_at)), local delayed retries, and the drain. Every
//! broker call (a settlement, a dead-letter, a renewal) runs as its own task, bounded by
//! `broker_timeout`, so one slow call never holds up the others or the loop.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::{AbortHandle, Id, JoinError, JoinSet};
use tokio::time::{Instant, sleep_until, timeout, timeout_at};
use tracing::Instrument;

use super::UpdaterConfig;
use super::breaker::Breaker;
use super::renewal::{RENEW_RETRY, renew_at};
use super::sessions::{SessionGate, Waiting};
use crate::deadlines::saturating_add;
use crate::supervisor::panic_message;
use crate::{
    Capabilities, Deadlines, Delivery, Handler, MessageSource, Outcome, RetryCause, Settled,
    TransportError, WorkerContext, error_chain,
};

/// The reason given to messages delivered too often.
pub(crate) const MAX_DELIVERY_COUNT_EXCEEDED: &str = "MaxDeliveryCountExceeded";

/// How many parked messages (waiting for their session) an updater holds beyond its
/// intake, per message of `concurrency + batch_size`.
const PARKED_PER_SLOT: usize = 4;

/// The longest retry delay passed to a transport; a handler asking for more gets this.
pub(crate) const MAX_RETRY_DELAY: Duration = Duration::from_secs(24 * 60 * 60);

type Probing<'a> = Pin<
    Box<
        dyn Future<Output = Result<Result<(), crate::BoxError>, tokio::time::error::Elapsed>>
            + Send
            + 'a,
    >,
>;

type Receiving<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<Delivery>, TransportError>> + Send + 'a>>;

/// A received message the updater holds, with its lock bookkeeping.
struct Held {
    /// Unique within the run (a message id can be held twice after a lost lock).
    key: u64,
    delivery: Arc<Delivery>,
    /// When to renew the lock; `None` for transports without timed locks, or while a
    /// renewal is under way.
    renew_at: Option<Instant>,
    /// The last renewal failed (the lock may lapse).
    renew_failing: bool,
    /// The lock was lost: never settle this delivery.
    lost: bool,
}

impl Held {
    fn id(&self) -> &str {
        &self.delivery.message().id
    }

    fn session(&self) -> Option<&str> {
        self.delivery.message().session_id.as_deref()
    }
}

struct Running {
    held: Held,
    started: Instant,
    abort: AbortHandle,
    /// When `handler_timeout` aborts it.
    due: Option<Instant>,
    /// Aborted for running past `handler_timeout`.
    timed_out: bool,
}

/// A retried message kept here until its delay ends (transports without delayed abandon).
struct Delayed {
    due: Instant,
    held: Held,
}

/// A settlement under way, and what to do when it ends.
struct Settling {
    id: String,
    session: Option<String>,
    operation: &'static str,
    /// What to count once the broker took it.
    record: Option<Settled>,
    elapsed: Option<Duration>,
    dead_letter_reason: Option<String>,
    /// For an abandon: the retry delay after which the message is due back.
    returns_after: Option<Duration>,
    /// When the lock ran out (a failed settlement leaves the message locked till then).
    locked_until: Option<Instant>,
}

enum Settlement {
    Complete,
    Abandon(Option<Duration>),
    DeadLetter { reason: String, description: String },
}

pub(super) struct Run<'a> {
    ctx: &'a WorkerContext,
    source: &'a dyn MessageSource,
    handler: &'a Arc<dyn Handler>,
    config: &'a UpdaterConfig,
    caps: Capabilities,
    next_key: u64,
    pending: VecDeque<Held>,
    running: HashMap<Id, Running>,
    tasks: JoinSet<(Outcome, Duration)>,
    delayed: Vec<Delayed>,
    gate: SessionGate,
    breaker: Breaker,
    settling: JoinSet<(Settling, Result<(), TransportError>)>,
    renewing: JoinSet<(u64, Result<Option<Instant>, TransportError>)>,
    next_heartbeat: Instant,
    /// Set once the drain began: retries are abandoned at once, not held.
    draining: bool,
}

/// Awaits the future if there is one; pends forever otherwise.
async fn maybe<F: Future + Unpin>(future: Option<&mut F>) -> F::Output {
    match future {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

/// Awaits the next of `set`, or pends forever when it is empty.
async fn next_of<T: 'static>(set: &mut JoinSet<T>) -> Option<Result<T, JoinError>> {
    if set.is_empty() { std::future::pending().await } else { set.join_next().await }
}

impl<'a> Run<'a> {
    pub(super) fn new(
        ctx: &'a WorkerContext,
        source: &'a dyn MessageSource,
        handler: &'a Arc<dyn Handler>,
        config: &'a UpdaterConfig,
        waiting: Waiting,
    ) -> Self {
        let caps = source.capabilities();
        Self {
            ctx,
            source,
            handler,
            config,
            caps,
            next_key: 0,
            pending: VecDeque::new(),
            running: HashMap::new(),
            tasks: JoinSet::new(),
            delayed: Vec::new(),
            gate: SessionGate::new(caps.sessions, config.wait, waiting),
            breaker: Breaker::new(config.probe_backoff.clone()),
            settling: JoinSet::new(),
            renewing: JoinSet::new(),
            next_heartbeat: saturating_add(Instant::now(), config.wait),
            draining: false,
        }
    }

    /// Every message held: for health.
    fn in_flight(&self) -> usize {
        self.running.len() + self.pending.len() + self.delayed.len()
    }

    fn max_in_flight(&self) -> usize {
        self.config.concurrency + self.config.batch_size
    }

    /// Whether a waiting message cannot start now because its session is busy or waits
    /// for another message of it: it is *parked*.
    fn is_parked(&self, held: &Held) -> bool {
        held.session().is_some_and(|session| !self.gate.may_start(session, held.id()))
    }

    /// Messages that count toward intake: running, and waiting ones that could start.
    /// Parked messages and retries held locally for their delay do not: counting them
    /// let a session's followers fill the intake while its head was away, so the head
    /// was never received again.
    fn intake(&self) -> usize {
        self.running.len() + self.pending.iter().filter(|held| !self.is_parked(held)).count()
    }

    /// Parked messages and retries held locally: each holds a lock the loop renews, so
    /// they have their own bound, [`PARKED_PER_SLOT`] × `(concurrency + batch_size)`.
    fn parked(&self) -> usize {
        self.pending.iter().filter(|held| self.is_parked(held)).count() + self.delayed.len()
    }

    fn can_receive(&self) -> bool {
        !self.breaker.is_open()
            && self.running.len() < self.config.concurrency
            && self.intake() < self.max_in_flight()
            && self.parked() < self.max_in_flight().saturating_mul(PARKED_PER_SLOT)
    }

    /// Receives and handles messages until the worker is cancelled (`None`) or a receive
    /// fails (the error).
    pub(super) async fn receive_loop(&mut self) -> Option<TransportError> {
        let source = self.source;
        let handler = self.handler;
        let mut receiving: Option<Receiving<'a>> = None;
        let mut probing: Option<Probing<'a>> = None;
        loop {
            let now = Instant::now();
            self.gate.expire(now);
            self.dispatch();
            self.ctx.set_in_flight(self.in_flight());
            self.ctx.set_overdue_handlers(self.running.values().filter(|r| r.timed_out).count());
            // A receive under way when the breaker opened is left to finish: dropping it
            // could cost its messages a delivery for nothing.
            if receiving.is_none() && self.can_receive() {
                let max = self.config.batch_size.min(self.max_in_flight() - self.intake());
                receiving = Some(source.receive(max.max(1), self.config.wait));
            }
            if probing.is_none() && self.breaker.probe_at().is_some_and(|at| now >= at) {
                probing = Some(Box::pin(timeout(self.probe_limit(), handler.probe())));
            }
            let timer = self.next_timer(receiving.is_some(), probing.is_some());
            tokio::select! {
                biased;
                () = self.ctx.cancelled() => return None,
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.finish(joined);
                }
                Some(settled) = next_of(&mut self.settling) => self.settled(settled),
                Some(renewed) = next_of(&mut self.renewing) => self.renewed(renewed),
                result = maybe(receiving.as_mut()), if receiving.is_some() => {
                    receiving = None;
                    self.ctx.progress();
                    match result {
                        Ok(batch) => self.accept(batch),
                        Err(error) => return Some(error),
                    }
                }
                result = maybe(probing.as_mut()), if probing.is_some() => {
                    probing = None;
                    self.probed(result);
                }
                () = sleep_until(timer) => self.on_timer(receiving.is_some()),
            }
        }
    }

    fn probe_limit(&self) -> Duration {
        self.config.wait.max(Duration::from_secs(5))
    }

    /// The next moment something timed is due: a renewal, a delayed retry, a session
    /// block ending, a handler timeout, a probe, or a heartbeat while not receiving.
    fn next_timer(&self, receiving: bool, probing: bool) -> Instant {
        let renewals = self.held().filter_map(|held| held.renew_at);
        let delays = self.delayed.iter().map(|d| d.due);
        let handler_timeouts = self.running.values().filter(|r| !r.timed_out).filter_map(|r| r.due);
        let probe = self.breaker.probe_at().filter(|_| !probing);
        let heartbeat = (!receiving).then_some(self.next_heartbeat);
        renewals
            .chain(delays)
            .chain(handler_timeouts)
            .chain(self.gate.next_expiry())
            .chain(probe)
            .chain(heartbeat)
            .min()
            .unwrap_or_else(|| {
                saturating_add(Instant::now(), self.config.wait.max(Duration::from_secs(1)))
            })
    }

    /// Whether not receiving is still progress: while the breaker holds the worker back
    /// (its probes are answered), or while every slot is busy with handlers whose locks
    /// are renewed and none failing (DESIGN §3). Failed renewal rounds, and slots that
    /// are merely full, are not progress: a hung handler on a transport without timed
    /// locks, or an unreachable namespace, must end in a stall.
    fn is_busy_and_healthy(&self) -> bool {
        if self.breaker.is_open() {
            return true;
        }
        self.caps.lock_renewal
            && self.running.len() >= self.config.concurrency
            && self.running.values().all(|r| !r.held.lost && !r.held.renew_failing)
    }

    fn held(&self) -> impl Iterator<Item = &Held> {
        self.running
            .values()
            .map(|r| &r.held)
            .chain(self.pending.iter())
            .chain(self.delayed.iter().map(|d| &d.held))
    }

    fn on_timer(&mut self, receiving: bool) {
        let now = Instant::now();
        if !receiving && now >= self.next_heartbeat {
            if self.is_busy_and_healthy() {
                self.ctx.progress();
            }
            self.next_heartbeat = saturating_add(now, self.config.wait);
        }
        if receiving {
            self.next_heartbeat = saturating_add(now, self.config.wait);
        }
        let due: Vec<Delayed> = {
            let (due, later) =
                std::mem::take(&mut self.delayed).into_iter().partition(|d| d.due <= now);
            self.delayed = later;
            due
        };
        for delayed in due {
            self.spawn_settlement(delayed.held, Settlement::Abandon(None), None, None);
        }
        self.time_out_handlers(now);
        self.renew_due(now);
    }

    /// Aborts the handlers running past `handler_timeout`; their messages are abandoned
    /// for a retry once their tasks end.
    fn time_out_handlers(&mut self, now: Instant) {
        for running in self.running.values_mut() {
            if !running.timed_out && running.due.is_some_and(|due| due <= now) {
                running.timed_out = true;
                tracing::warn!(
                    message_id = %running.held.id(),
                    handler_timeout = ?self.config.handler_timeout,
                    "handler ran past its timeout; aborting it and retrying the message"
                );
                running.abort.abort();
            }
        }
    }

    /// Starts a renewal of every lock that is due, each as its own bounded task.
    fn renew_due(&mut self, now: Instant) {
        let limit = self.config.broker_timeout;
        let due: Vec<&mut Held> = self
            .running
            .values_mut()
            .map(|r| &mut r.held)
            .chain(self.pending.iter_mut())
            .chain(self.delayed.iter_mut().map(|d| &mut d.held))
            .filter(|held| !held.lost && held.renew_at.is_some_and(|at| at <= now))
            .collect();
        for held in due {
            held.renew_at = None;
            let (key, delivery) = (held.key, held.delivery.clone());
            self.renewing.spawn(async move {
                let result = match timeout(limit, delivery.settle_handle().renew_lock()).await {
                    Ok(result) => result,
                    Err(_) => Err(TransportError::timeout(format!(
                        "lock renewal did not answer within {limit:?}"
                    ))),
                };
                (key, result)
            });
        }
    }

    fn held_mut(&mut self, key: u64) -> Option<&mut Held> {
        self.running
            .values_mut()
            .map(|r| &mut r.held)
            .chain(self.pending.iter_mut())
            .chain(self.delayed.iter_mut().map(|d| &mut d.held))
            .find(|held| held.key == key)
    }

    /// Takes the answer of one renewal.
    fn renewed(
        &mut self,
        joined: Result<(u64, Result<Option<Instant>, TransportError>), JoinError>,
    ) {
        let Ok((key, result)) = joined else { return };
        let margin = self.config.renew_margin;
        let ctx = self.ctx;
        let Some(held) = self.held_mut(key) else { return };
        let now = Instant::now();
        match result {
            Ok(until) => {
                held.renew_at = renew_at(until, now, margin);
                held.renew_failing = false;
                ctx.progress();
            }
            Err(error) if error.is_lock_lost() => {
                held.lost = true;
                tracing::warn!(
                    message_id = %held.id(),
                    error = %error_chain(&error),
                    "lock lost; the message will not be settled here"
                );
                ctx.record_settled(Settled::LeaseLost, None);
                self.drop_lost_waiting();
            }
            Err(error) => {
                // Try again soon, well before the lock runs out.
                held.renew_at = Some(saturating_add(now, RENEW_RETRY));
                held.renew_failing = true;
                tracing::warn!(
                    message_id = %held.id(),
                    error = %error_chain(&error),
                    "lock renewal failed; retrying"
                );
            }
        }
    }

    /// Messages not yet started whose lock is gone belong to the broker again. Their
    /// session waits for them, so later messages cannot overtake them.
    fn drop_lost_waiting(&mut self) {
        let lost: Vec<Held> = {
            let (lost, kept): (Vec<_>, Vec<_>) =
                std::mem::take(&mut self.pending).into_iter().partition(|held| held.lost);
            self.pending = kept.into();
            let (lost_delayed, kept_delayed): (Vec<_>, Vec<_>) =
                std::mem::take(&mut self.delayed).into_iter().partition(|d| d.held.lost);
            self.delayed = kept_delayed;
            lost.into_iter().chain(lost_delayed.into_iter().map(|d| d.held)).collect()
        };
        for held in lost {
            if let Some(session) = held.session() {
                self.gate.release_awaiting(session, held.id(), Instant::now(), Duration::ZERO);
            }
        }
    }

    /// Takes in a received batch: dead-letters messages over the delivery limit, queues
    /// the rest in arrival order.
    fn accept(&mut self, batch: Vec<Delivery>) {
        self.ctx.record_received(batch.len());
        let now = Instant::now();
        for delivery in batch {
            let message = delivery.message().clone();
            self.next_key += 1;
            let held = Held {
                key: self.next_key,
                renew_at: renew_at(delivery.locked_until(), now, self.config.renew_margin),
                delivery: Arc::new(delivery),
                renew_failing: false,
                lost: false,
            };
            if message.delivery_count > self.config.max_deliveries {
                let description = format!(
                    "delivered {} times, more than the limit of {}",
                    message.delivery_count, self.config.max_deliveries
                );
                tracing::warn!(
                    queue = self.source.queue(),
                    message_id = %message.id,
                    delivery_count = message.delivery_count,
                    reason = MAX_DELIVERY_COUNT_EXCEEDED,
                    "dead-lettering a message delivered too often"
                );
                let settlement = Settlement::DeadLetter {
                    reason: MAX_DELIVERY_COUNT_EXCEEDED.to_owned(),
                    description,
                };
                self.spawn_settlement(held, settlement, Some(Settled::DeadLettered), None);
                continue;
            }
            // A message its session waits for goes first.
            let session = message.session_id.as_deref();
            if let Some(session) = session.filter(|s| self.gate.is_awaited(s, &message.id)) {
                let first = self.pending.iter().position(|p| p.session() == Some(session));
                self.pending.insert(first.unwrap_or(self.pending.len()), held);
            } else {
                self.pending.push_back(held);
            }
        }
    }

    /// Starts pending messages whose session is free, in arrival order, while slots last.
    fn dispatch(&mut self) {
        if self.breaker.is_open() {
            return;
        }
        let mut i = 0;
        while i < self.pending.len() && self.running.len() < self.config.concurrency {
            let held = &self.pending[i];
            let free = held.session().is_none_or(|session| self.gate.may_start(session, held.id()));
            if !free {
                i += 1;
                continue;
            }
            if let Some(held) = self.pending.remove(i) {
                self.start(held);
            }
        }
    }

    fn start(&mut self, held: Held) {
        if let Some(session) = held.session() {
            self.gate.occupy(session);
        }
        let message = held.delivery.message().clone();
        let span = tracing::info_span!(
            "handle",
            queue = self.source.queue(),
            message_id = %message.id,
            delivery_count = message.delivery_count,
        );
        let handler = self.handler.clone();
        let task = self.ctx.track(
            async move {
                let started = Instant::now();
                let outcome = handler.handle(message).await;
                (outcome, started.elapsed())
            }
            .instrument(span),
        );
        let abort = self.tasks.spawn(task);
        let now = Instant::now();
        let due = self.config.handler_timeout.map(|limit| saturating_add(now, limit));
        let id = abort.id();
        self.running.insert(id, Running { held, started: now, abort, due, timed_out: false });
    }

    /// Settles the message of a handler task that ended. Its session stays occupied
    /// until the settlement ends.
    fn finish(&mut self, joined: Result<(Id, (Outcome, Duration)), JoinError>) {
        let (id, result) = match joined {
            Ok((id, result)) => (id, Ok(result)),
            Err(error) => (error.id(), Err(error)),
        };
        let Some(running) = self.running.remove(&id) else { return };
        self.ctx.progress();
        let held = running.held;
        match result {
            Ok((outcome, elapsed)) => self.settle(held, outcome, Some(elapsed), false),
            Err(error) if error.is_panic() => {
                let payload = panic_message(error.into_panic());
                tracing::error!(
                    queue = self.source.queue(),
                    message_id = %held.id(),
                    panic = %payload,
                    "handler panicked; retrying the message"
                );
                let outcome = Outcome::retry(format!("handler panicked: {payload}"));
                self.settle(held, outcome, Some(running.started.elapsed()), true);
            }
            Err(_) if running.timed_out => {
                let outcome = Outcome::retry("handler ran past its timeout");
                self.settle(held, outcome, Some(running.started.elapsed()), false);
            }
            Err(_) => {
                // Aborted by the drain, which abandons the message itself.
                tracing::debug!(message_id = %held.id(), "handler task aborted");
            }
        }
    }

    fn settle(&mut self, held: Held, outcome: Outcome, elapsed: Option<Duration>, panicked: bool) {
        if held.lost {
            tracing::info!(
                message_id = %held.id(),
                outcome = outcome.as_str(),
                "handler finished after the lock was lost; leaving the message to the broker"
            );
            // The broker redelivers it: its session waits for it.
            if let Some(session) = held.session() {
                self.gate.release_awaiting(session, held.id(), Instant::now(), Duration::ZERO);
            }
            return;
        }
        match outcome {
            Outcome::Complete => {
                self.spawn_settlement(
                    held,
                    Settlement::Complete,
                    Some(Settled::Completed),
                    elapsed,
                );
            }
            Outcome::Retry { after, reason, cause } => {
                let count = held.delivery.message().delivery_count;
                let delay = after
                    .unwrap_or_else(|| self.config.retry_backoff.delay(count.saturating_sub(1)));
                tracing::warn!(
                    message_id = %held.id(),
                    outcome = "retry",
                    cause = cause.as_str(),
                    reason = %reason,
                    delivery_count = count,
                    retry_in = ?delay,
                    "message will be retried"
                );
                if cause == RetryCause::Dependency {
                    self.open_breaker(&reason);
                }
                let settled = if panicked { Settled::Panicked } else { Settled::Retried };
                self.retry(held, delay, settled, elapsed);
            }
            Outcome::DeadLetter { reason, description } => {
                tracing::warn!(
                    message_id = %held.id(),
                    outcome = "dead_letter",
                    reason = %reason,
                    description = %description,
                    "message dead-lettered"
                );
                let settlement = Settlement::DeadLetter { reason, description };
                self.spawn_settlement(held, settlement, Some(Settled::DeadLettered), elapsed);
            }
        }
    }

    fn retry(&mut self, held: Held, delay: Duration, settled: Settled, elapsed: Option<Duration>) {
        let delay = delay.min(MAX_RETRY_DELAY);
        if self.draining {
            // Shutting down: release it now rather than hold it past the drain.
            let delay = Some(delay).filter(|d| !d.is_zero() && self.caps.delayed_abandon);
            self.spawn_settlement(held, Settlement::Abandon(delay), Some(settled), elapsed);
            return;
        }
        if delay.is_zero() || self.caps.delayed_abandon {
            let delay = Some(delay).filter(|d| !d.is_zero());
            self.spawn_settlement(held, Settlement::Abandon(delay), Some(settled), elapsed);
        } else {
            // No delayed abandon: hold the message (its lock renewed) and its session
            // until the delay ends, then abandon it.
            if let Some(handler_time) = elapsed {
                crate::metrics::handler_duration(self.ctx.name(), handler_time);
            }
            self.ctx.record_settled(settled, None);
            self.delayed.push(Delayed { due: saturating_add(Instant::now(), delay), held });
        }
    }

    /// Settles `held` in its own task, bounded by `broker_timeout`; counts it as `record`
    /// once the broker took it.
    fn spawn_settlement(
        &mut self,
        held: Held,
        settlement: Settlement,
        record: Option<Settled>,
        elapsed: Option<Duration>,
    ) {
        let limit = self.config.broker_timeout;
        let (operation, returns_after, dead_letter_reason) = match &settlement {
            Settlement::Complete => ("complete", None, None),
            Settlement::Abandon(delay) => ("abandon", Some(delay.unwrap_or_default()), None),
            Settlement::DeadLetter { reason, .. } => ("dead-letter", None, Some(reason.clone())),
        };
        let settling = Settling {
            id: held.id().to_owned(),
            session: held.session().map(str::to_owned),
            operation,
            record,
            elapsed,
            dead_letter_reason,
            returns_after,
            locked_until: held.delivery.locked_until(),
        };
        let delivery = held.delivery;
        self.settling.spawn(async move {
            let settle = delivery.settle_handle();
            let call = async {
                match &settlement {
                    Settlement::Complete => settle.complete().await,
                    Settlement::Abandon(delay) => settle.abandon(*delay).await,
                    Settlement::DeadLetter { reason, description } => {
                        settle.dead_letter(reason, description).await
                    }
                }
            };
            let result = match timeout(limit, call).await {
                Ok(result) => result,
                Err(_) => Err(TransportError::timeout(format!(
                    "{operation} did not answer within {limit:?}"
                ))),
            };
            (settling, result)
        });
    }

    /// Takes the result of one settlement: counts it, and frees its session, or, when
    /// the message is back at the broker, makes the session wait for it.
    fn settled(&mut self, joined: Result<(Settling, Result<(), TransportError>), JoinError>) {
        let Ok((settling, result)) = joined else { return };
        let now = Instant::now();
        match result {
            Ok(()) => {
                tracing::debug!(message_id = %settling.id, operation = settling.operation, "message settled");
                if let Some(settled) = settling.record {
                    self.ctx.record_settled(settled, settling.elapsed);
                }
                if let Some(reason) = &settling.dead_letter_reason {
                    self.ctx.record_dead_letter_reason(reason);
                }
                self.ctx.progress();
                if let Some(session) = &settling.session {
                    match settling.returns_after {
                        Some(delay) => {
                            self.gate.release_awaiting(session, &settling.id, now, delay);
                        }
                        None => self.gate.release(session),
                    }
                }
            }
            Err(error) => {
                self.settle_failed(&settling.id, settling.operation, &error);
                if let Some(session) = &settling.session {
                    // The message comes back when its lock runs out (at once if lost).
                    let due = if error.is_lock_lost() {
                        now
                    } else {
                        settling.locked_until.unwrap_or(now)
                    };
                    self.gate.release_awaiting(session, &settling.id, due, Duration::ZERO);
                }
            }
        }
    }

    fn settle_failed(&self, message_id: &str, operation: &str, error: &TransportError) {
        if error.is_lock_lost() {
            tracing::warn!(
                message_id = %message_id,
                operation,
                error = %error_chain(error),
                "lock lost before settlement; the broker redelivers the message"
            );
            self.ctx.record_settled(Settled::LeaseLost, None);
        } else {
            tracing::error!(
                message_id = %message_id,
                operation,
                error = %error_chain(error),
                "settlement failed; the message returns when its lock expires"
            );
        }
    }

    fn open_breaker(&mut self, reason: &str) {
        if let Some(pause) = self.breaker.open(Instant::now()) {
            tracing::warn!(reason = %reason, probe_in = ?pause, "dependency failing; pausing receives");
            self.ctx.set_backing_off(format!("dependency failing: {reason}"));
        }
    }

    /// Takes the answer of a dependency probe: closes the breaker, or pauses again.
    fn probed(&mut self, answer: Result<Result<(), crate::BoxError>, tokio::time::error::Elapsed>) {
        let limit = self.probe_limit();
        let result =
            answer.unwrap_or_else(|_| Err(format!("probe did not answer within {limit:?}").into()));
        match result {
            Ok(()) => {
                self.breaker.succeeded();
                tracing::info!("dependency answers again; resuming");
                self.ctx.set_running();
            }
            Err(error) => {
                let pause = self.breaker.failed(Instant::now());
                tracing::warn!(error = %error_chain(error.as_ref()), probe_in = ?pause, "dependency still failing");
            }
        }
        self.ctx.progress();
    }

    /// Stops, by `deadlines` (see [`Deadlines`]): stops intake and releases what has not
    /// started by the drain deadline, lets running handlers finish and settles them
    /// (locks still renewed) until it, then aborts the rest, waits for their tasks until
    /// `aborted_by` and abandons their messages by `abandon_by`. A shutdown that begins
    /// meanwhile (during the drain after a receive error) brings the deadlines forward.
    pub(super) async fn drain(&mut self, shutting_down: bool, mut deadlines: Deadlines) {
        self.draining = true;
        let mut tightened = shutting_down;
        if shutting_down {
            match timeout_at(deadlines.drain(), self.source.stop_receiving()).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::warn!(
                    error = %error_chain(&error),
                    "stop_receiving failed; buffered messages return when their locks expire"
                ),
                Err(_) => tracing::warn!("stop_receiving did not finish by the drain deadline"),
            }
        }
        let unstarted: Vec<Held> = self
            .pending
            .drain(..)
            .chain(std::mem::take(&mut self.delayed).into_iter().map(|d| d.held))
            .filter(|held| !held.lost)
            .collect();
        for held in unstarted {
            self.spawn_settlement(held, Settlement::Abandon(None), None, None);
        }
        self.ctx.set_in_flight(self.running.len());
        while !self.tasks.is_empty() || !self.settling.is_empty() {
            let renewal = self.running.values().filter_map(|r| r.held.renew_at).min();
            let timer = renewal.map_or(deadlines.drain(), |at| at.min(deadlines.drain()));
            tokio::select! {
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.finish(joined);
                }
                Some(settled) = next_of(&mut self.settling) => self.settled(settled),
                Some(renewed) = next_of(&mut self.renewing) => self.renewed(renewed),
                () = self.ctx.cancelled(), if !tightened => {
                    tightened = true;
                    if self.ctx.is_shutting_down() {
                        deadlines = deadlines.min(self.ctx.deadlines());
                    }
                }
                () = sleep_until(timer) => {
                    let now = Instant::now();
                    if now >= deadlines.drain() {
                        break;
                    }
                    self.renew_due(now);
                }
            }
            self.ctx.set_in_flight(self.running.len());
        }
        self.abort_running(deadlines).await;
        self.wait_settlements(deadlines.abandon_by()).await;
        self.renewing.abort_all();
        self.ctx.set_in_flight(0);
        self.ctx.set_overdue_handlers(0);
    }

    /// The sessions still waiting for a message, for the next run of the updater.
    pub(super) fn take_waiting(&mut self) -> Waiting {
        let fresh = SessionGate::new(self.caps.sessions, self.config.wait, Waiting::default());
        std::mem::replace(&mut self.gate, fresh).into_waiting()
    }

    /// Aborts the handlers still running at the drain deadline and abandons their
    /// messages. Their tasks get until `aborted_by` to end first, so no handler is still
    /// at work on a message another consumer already has; a task that does not end
    /// blocks a thread, and its message goes back anyway.
    async fn abort_running(&mut self, deadlines: Deadlines) {
        if self.running.is_empty() {
            return;
        }
        self.tasks.abort_all();
        let mut stopped = HashSet::new();
        let mut ended = Vec::new();
        let _ = timeout_at(deadlines.aborted_by(), async {
            while let Some(joined) = self.tasks.join_next_with_id().await {
                match joined {
                    Err(error) if error.is_cancelled() => {
                        stopped.insert(error.id());
                    }
                    other => ended.push(other),
                }
            }
        })
        .await;
        for joined in ended {
            self.finish(joined);
        }
        for (id, running) in std::mem::take(&mut self.running) {
            let blocked = !stopped.contains(&id);
            tracing::warn!(
                message_id = %running.held.id(),
                blocked,
                "handler did not finish by the drain deadline; abandoning its message"
            );
            if self.ctx.is_shutting_down() {
                self.ctx.record_aborted(running.held.id(), blocked);
            }
            if !running.held.lost {
                self.spawn_settlement(
                    running.held,
                    Settlement::Abandon(None),
                    Some(Settled::Retried),
                    None,
                );
            }
        }
    }

    /// Takes the results of the settlements under way until `by`; what is left then
    /// returns to the broker when its lock expires.
    async fn wait_settlements(&mut self, by: Instant) {
        let finished = timeout_at(by, async {
            while let Some(settled) = self.settling.join_next().await {
                self.settled(settled);
            }
        })
        .await;
        if finished.is_err() {
            tracing::error!(
                unsettled = self.settling.len(),
                "settlements did not finish by the deadline; those messages return when their locks expire"
            );
            self.settling.abort_all();
        }
    }
}

impl Drop for Run<'_> {
    /// A run dropped before its drain ended (the supervisor aborted the worker at its
    /// abort-at deadline) abandons every message it still holds, in a tracked task
    /// bounded by the hard deadline, rather than leave them to lock expiry. Its handler
    /// tasks are aborted with their `JoinSet`.
    fn drop(&mut self) {
        let held: Vec<Arc<Delivery>> = std::mem::take(&mut self.running)
            .into_values()
            .map(|r| r.held)
            .chain(self.pending.drain(..))
            .chain(std::mem::take(&mut self.delayed).into_iter().map(|d| d.held))
            .filter(|held| !held.lost)
            .map(|held| held.delivery)
            .collect();
        if held.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        self.tasks.abort_all();
        let hard = self.ctx.deadlines().hard();
        tracing::warn!(
            messages = held.len(),
            "worker stopped before its drain ended; abandoning what it held"
        );
        let abandons = futures::future::join_all(held.into_iter().map(|delivery| async move {
            let _ = delivery.settle_handle().abandon(None).await;
        }));
        runtime.spawn(self.ctx.track(async move {
            let _ = timeout_at(hard, abandons).await;
        }));
    }
}
