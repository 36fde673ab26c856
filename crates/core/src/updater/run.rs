//! One run of an updater: the receive loop and the drain, with every message it holds.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::{Id, JoinError, JoinSet};
use tokio::time::{Instant, sleep_until, timeout, timeout_at};
use tracing::Instrument;

use super::UpdaterConfig;
use crate::supervisor::panic_message;
use crate::{
    Capabilities, Delivery, Handler, MessageSource, Outcome, RetryCause, Settled, TransportError,
    WorkerContext, error_chain,
};

/// The reason given to messages delivered too often.
pub(crate) const MAX_DELIVERY_COUNT_EXCEEDED: &str = "MaxDeliveryCountExceeded";

/// The longest retry delay passed to a transport; a handler asking for more gets this.
pub(crate) const MAX_RETRY_DELAY: Duration = Duration::from_secs(24 * 60 * 60);

/// `now + duration`, or a moment decades away when that does not fit.
fn later(now: Instant, duration: Duration) -> Instant {
    now.checked_add(duration).unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 24 * 60 * 60))
}

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
    delivery: Delivery,
    /// When to renew the lock; `None` for transports without timed locks.
    renew_at: Option<Instant>,
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
}

/// A retried message kept here until its delay ends (transports without delayed abandon).
struct Delayed {
    due: Instant,
    held: Held,
}

/// A session held back locally until a retried message returns.
struct Blocked {
    message_id: String,
    until: Instant,
}

struct Breaker {
    open: bool,
    failures: u32,
    probe_at: Instant,
}

pub(super) struct Run<'a> {
    ctx: &'a WorkerContext,
    source: &'a dyn MessageSource,
    handler: &'a Arc<dyn Handler>,
    config: &'a UpdaterConfig,
    caps: Capabilities,
    pending: VecDeque<Held>,
    running: HashMap<Id, Running>,
    tasks: JoinSet<(Outcome, Duration)>,
    delayed: Vec<Delayed>,
    active_sessions: HashSet<String>,
    blocked: HashMap<String, Blocked>,
    breaker: Breaker,
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

impl<'a> Run<'a> {
    pub(super) fn new(
        ctx: &'a WorkerContext,
        source: &'a dyn MessageSource,
        handler: &'a Arc<dyn Handler>,
        config: &'a UpdaterConfig,
    ) -> Self {
        Self {
            ctx,
            source,
            handler,
            config,
            caps: source.capabilities(),
            pending: VecDeque::new(),
            running: HashMap::new(),
            tasks: JoinSet::new(),
            delayed: Vec::new(),
            active_sessions: HashSet::new(),
            blocked: HashMap::new(),
            breaker: Breaker { open: false, failures: 0, probe_at: Instant::now() },
            next_heartbeat: Instant::now() + config.wait,
            draining: false,
        }
    }

    fn in_flight(&self) -> usize {
        self.running.len() + self.pending.len() + self.delayed.len()
    }

    fn max_in_flight(&self) -> usize {
        self.config.concurrency + self.config.batch_size
    }

    fn can_receive(&self) -> bool {
        !self.breaker.open
            && self.running.len() < self.config.concurrency
            && self.in_flight() < self.max_in_flight()
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
            self.blocked.retain(|_, blocked| blocked.until > now);
            self.dispatch();
            self.ctx.set_in_flight(self.in_flight());
            // A receive under way when the breaker opened is left to finish: dropping it
            // could cost its messages a delivery for nothing.
            if receiving.is_none() && self.can_receive() {
                let max = self.config.batch_size.min(self.max_in_flight() - self.in_flight());
                receiving = Some(source.receive(max.max(1), self.config.wait));
            }
            if self.breaker.open && probing.is_none() && now >= self.breaker.probe_at {
                let limit = self.config.wait.max(Duration::from_secs(5));
                probing = Some(Box::pin(timeout(limit, handler.probe())));
            }
            let timer = self.next_timer(receiving.is_some(), probing.is_some());
            tokio::select! {
                biased;
                () = self.ctx.cancelled() => return None,
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.finish(joined).await;
                }
                result = maybe(receiving.as_mut()), if receiving.is_some() => {
                    receiving = None;
                    self.ctx.progress();
                    match result {
                        Ok(batch) => self.accept(batch).await,
                        Err(error) => return Some(error),
                    }
                }
                result = maybe(probing.as_mut()), if probing.is_some() => {
                    probing = None;
                    self.probed(result);
                }
                () = sleep_until(timer) => self.on_timer(receiving.is_some()).await,
            }
        }
    }

    /// The next moment something timed is due: a renewal, a delayed retry, a session
    /// block ending, a probe, or a heartbeat while not receiving.
    fn next_timer(&self, receiving: bool, probing: bool) -> Instant {
        let renewals = self.held().filter_map(|held| held.renew_at);
        let delays = self.delayed.iter().map(|d| d.due);
        let blocks = self.blocked.values().map(|b| b.until);
        let probe = (self.breaker.open && !probing).then_some(self.breaker.probe_at);
        let heartbeat = (!receiving && self.heartbeats()).then_some(self.next_heartbeat);
        renewals
            .chain(delays)
            .chain(blocks)
            .chain(probe)
            .chain(heartbeat)
            .min()
            .unwrap_or_else(|| later(Instant::now(), self.config.wait.max(Duration::from_secs(1))))
    }

    /// Whether not receiving still counts as progress: while the breaker holds the
    /// worker back, or while every slot is busy with handlers whose locks are renewed
    /// (DESIGN §3). On a transport without timed locks, handlers that never finish leave
    /// the worker without progress, so the stall watchdog finds them.
    fn heartbeats(&self) -> bool {
        self.breaker.open || self.caps.lock_renewal
    }

    fn held(&self) -> impl Iterator<Item = &Held> {
        self.running
            .values()
            .map(|r| &r.held)
            .chain(self.pending.iter())
            .chain(self.delayed.iter().map(|d| &d.held))
    }

    async fn on_timer(&mut self, receiving: bool) {
        let now = Instant::now();
        if !receiving && self.heartbeats() && now >= self.next_heartbeat {
            self.ctx.progress();
            self.next_heartbeat = later(now, self.config.wait);
        }
        if receiving || !self.heartbeats() {
            self.next_heartbeat = later(now, self.config.wait);
        }
        let due: Vec<Delayed> = {
            let (due, later) =
                std::mem::take(&mut self.delayed).into_iter().partition(|d| d.due <= now);
            self.delayed = later;
            due
        };
        for delayed in due {
            let held = delayed.held;
            if let Some(session) = held.session() {
                let session = session.to_owned();
                self.active_sessions.remove(&session);
                self.block_session(&session, held.id().to_owned(), Duration::ZERO);
            }
            self.abandon(held, None, None).await;
        }
        self.renew_due(now).await;
    }

    /// Renews every lock that is due, concurrently.
    async fn renew_due(&mut self, now: Instant) {
        let margin = self.config.renew_margin;
        let due: Vec<&mut Held> = self
            .running
            .values_mut()
            .map(|r| &mut r.held)
            .chain(self.pending.iter_mut())
            .chain(self.delayed.iter_mut().map(|d| &mut d.held))
            .filter(|held| !held.lost && held.renew_at.is_some_and(|at| at <= now))
            .collect();
        if due.is_empty() {
            return;
        }
        let ctx = self.ctx;
        let results = futures::future::join_all(due.into_iter().map(|held| async move {
            let result = held.delivery.renew_lock().await;
            let now = Instant::now();
            match result {
                Ok(until) => held.renew_at = renew_at(until, now, margin),
                Err(error) if error.is_lock_lost() => {
                    held.lost = true;
                    held.renew_at = None;
                    tracing::warn!(
                        message_id = %held.id(),
                        error = %error_chain(&error),
                        "lock lost; the message will not be settled here"
                    );
                    ctx.record_settled(Settled::LeaseLost, None);
                }
                Err(error) => {
                    // Try again soon, well before the lock runs out.
                    held.renew_at = Some(now + Duration::from_secs(1));
                    tracing::warn!(
                        message_id = %held.id(),
                        error = %error_chain(&error),
                        "lock renewal failed; retrying"
                    );
                }
            }
        }))
        .await;
        drop(results);
        self.ctx.progress();
        // Messages not yet started whose lock is gone belong to the broker again. Their
        // session stays held back until they return, so later messages cannot overtake
        // them; a held-back retry frees the session it occupied.
        let lost: Vec<(Option<String>, String, bool)> =
            self.pending
                .iter()
                .filter(|held| held.lost)
                .map(|held| (held.session().map(str::to_owned), held.id().to_owned(), false))
                .chain(
                    self.delayed.iter().filter(|d| d.held.lost).map(|d| {
                        (d.held.session().map(str::to_owned), d.held.id().to_owned(), true)
                    }),
                )
                .collect();
        self.pending.retain(|held| !held.lost);
        self.delayed.retain(|d| !d.held.lost);
        for (session, message_id, was_delayed) in lost {
            let Some(session) = session else { continue };
            if was_delayed {
                self.active_sessions.remove(&session);
            }
            self.block_session(&session, message_id, Duration::ZERO);
        }
    }

    /// Takes in a received batch: dead-letters messages over the delivery limit, queues
    /// the rest in arrival order.
    async fn accept(&mut self, batch: Vec<Delivery>) {
        self.ctx.record_received(batch.len());
        let now = Instant::now();
        for delivery in batch {
            let message = delivery.message().clone();
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
                let held = Held { delivery, renew_at: None, lost: false };
                self.dead_letter(held, MAX_DELIVERY_COUNT_EXCEEDED, &description, None).await;
                continue;
            }
            let held = Held {
                renew_at: renew_at(delivery.locked_until(), now, self.config.renew_margin),
                delivery,
                lost: false,
            };
            // A retried message returning to its locally blocked session goes first.
            let returning = held
                .session()
                .and_then(|s| self.blocked.get(s))
                .is_some_and(|b| b.message_id == message.id);
            if let (true, Some(session)) = (returning, message.session_id.as_deref()) {
                self.blocked.remove(session);
                let first = self.pending.iter().position(|p| p.session() == Some(session));
                self.pending.insert(first.unwrap_or(self.pending.len()), held);
            } else {
                self.pending.push_back(held);
            }
        }
    }

    /// Starts pending messages whose session is free, in arrival order, while slots last.
    fn dispatch(&mut self) {
        if self.breaker.open {
            return;
        }
        let mut i = 0;
        while i < self.pending.len() && self.running.len() < self.config.concurrency {
            // A session held back for a retried message stays so until that message
            // itself comes back; it then goes first.
            let held = &self.pending[i];
            let busy = held.session().is_some_and(|session| {
                self.active_sessions.contains(session)
                    || self.blocked.get(session).is_some_and(|b| b.message_id != held.id())
            });
            if busy {
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
            self.blocked.remove(session);
            self.active_sessions.insert(session.to_owned());
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
        self.running.insert(abort.id(), Running { held, started: Instant::now() });
    }

    /// Settles the message of a handler task that ended.
    async fn finish(&mut self, joined: Result<(Id, (Outcome, Duration)), JoinError>) {
        let (id, result) = match joined {
            Ok((id, result)) => (id, Ok(result)),
            Err(error) => (error.id(), Err(error)),
        };
        let Some(running) = self.running.remove(&id) else { return };
        if let Some(session) = running.held.session() {
            self.active_sessions.remove(session);
        }
        self.ctx.progress();
        let held = running.held;
        match result {
            Ok((outcome, elapsed)) => self.settle(held, outcome, Some(elapsed), false).await,
            Err(error) if error.is_panic() => {
                let payload = panic_message(error.into_panic());
                tracing::error!(
                    queue = self.source.queue(),
                    message_id = %held.id(),
                    panic = %payload,
                    "handler panicked; retrying the message"
                );
                let outcome = Outcome::retry(format!("handler panicked: {payload}"));
                self.settle(held, outcome, Some(running.started.elapsed()), true).await;
            }
            Err(_) => {
                // Aborted: only the drain aborts, and it abandons the message itself.
                tracing::debug!(message_id = %held.id(), "handler task aborted");
            }
        }
    }

    async fn settle(
        &mut self,
        held: Held,
        outcome: Outcome,
        elapsed: Option<Duration>,
        panicked: bool,
    ) {
        if held.lost {
            tracing::info!(
                message_id = %held.id(),
                outcome = outcome.as_str(),
                "handler finished after the lock was lost; leaving the message to the broker"
            );
            return;
        }
        match outcome {
            Outcome::Complete => {
                let id = held.id().to_owned();
                match held.delivery.complete().await {
                    Ok(()) => {
                        tracing::debug!(message_id = %id, outcome = "complete", "message completed");
                        self.ctx.record_settled(Settled::Completed, elapsed);
                    }
                    Err(error) => self.settle_failed(&id, "complete", &error),
                }
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
                self.retry(held, delay, settled, elapsed).await;
            }
            Outcome::DeadLetter { reason, description } => {
                tracing::warn!(
                    message_id = %held.id(),
                    outcome = "dead_letter",
                    reason = %reason,
                    description = %description,
                    "message dead-lettered"
                );
                self.dead_letter(held, &reason, &description, elapsed).await;
            }
        }
    }

    async fn retry(
        &mut self,
        held: Held,
        delay: Duration,
        settled: Settled,
        elapsed: Option<Duration>,
    ) {
        if let Some(handler_time) = elapsed {
            crate::metrics::handler_duration(self.ctx.name(), handler_time);
        }
        let delay = delay.min(MAX_RETRY_DELAY);
        if self.draining {
            // Shutting down: release it now rather than hold it past the drain.
            let delay = Some(delay).filter(|d| !d.is_zero() && self.caps.delayed_abandon);
            self.abandon(held, delay, Some(settled)).await;
            return;
        }
        if delay.is_zero() || self.caps.delayed_abandon {
            if let Some(session) = held.session() {
                let session = session.to_owned();
                self.block_session(&session, held.id().to_owned(), delay);
            }
            self.abandon(held, Some(delay).filter(|d| !d.is_zero()), Some(settled)).await;
        } else {
            // No delayed abandon: hold the message (its lock renewed) and its session
            // until the delay ends, then abandon it.
            if let Some(session) = held.session() {
                self.active_sessions.insert(session.to_owned());
            }
            self.ctx.record_settled(settled, None);
            self.delayed.push(Delayed { due: later(Instant::now(), delay), held });
        }
    }

    /// On transports without sessions, holds back a session's later messages until the
    /// retried one comes back, or, if another consumer evidently took it, for six times
    /// its delay plus twice the wait (transports may round a delay up: RabbitMQ's delay
    /// buckets turn 5.1 s into 30 s).
    fn block_session(&mut self, session: &str, message_id: String, delay: Duration) {
        if self.caps.sessions {
            return;
        }
        let bound = delay.saturating_mul(6).saturating_add(self.config.wait.saturating_mul(2));
        let until = later(Instant::now(), bound);
        self.blocked.insert(session.to_owned(), Blocked { message_id, until });
    }

    /// Abandons a held message; counts it as `record` once the broker took it back.
    async fn abandon(&mut self, held: Held, delay: Option<Duration>, record: Option<Settled>) {
        let id = held.id().to_owned();
        match held.delivery.abandon(delay).await {
            Ok(()) => {
                if let Some(settled) = record {
                    self.ctx.record_settled(settled, None);
                }
            }
            Err(error) => self.settle_failed(&id, "abandon", &error),
        }
    }

    async fn dead_letter(
        &mut self,
        held: Held,
        reason: &str,
        description: &str,
        elapsed: Option<Duration>,
    ) {
        let id = held.id().to_owned();
        match held.delivery.dead_letter(reason, description).await {
            Ok(()) => {
                self.ctx.record_settled(Settled::DeadLettered, elapsed);
                self.ctx.record_dead_letter_reason(reason);
            }
            Err(error) => self.settle_failed(&id, "dead-letter", &error),
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
        if self.breaker.open {
            return;
        }
        self.breaker.open = true;
        self.breaker.failures = 0;
        let pause = self.config.probe_backoff.delay(0);
        self.breaker.probe_at = later(Instant::now(), pause);
        tracing::warn!(reason = %reason, probe_in = ?pause, "dependency failing; pausing receives");
        self.ctx.set_backing_off(format!("dependency failing: {reason}"));
    }

    /// Takes the answer of a dependency probe: closes the breaker, or pauses again.
    fn probed(&mut self, answer: Result<Result<(), crate::BoxError>, tokio::time::error::Elapsed>) {
        let limit = self.config.wait.max(Duration::from_secs(5));
        let result =
            answer.unwrap_or_else(|_| Err(format!("probe did not answer within {limit:?}").into()));
        match result {
            Ok(()) => {
                self.breaker.open = false;
                tracing::info!("dependency answers again; resuming");
                self.ctx.set_running();
            }
            Err(error) => {
                self.breaker.failures = self.breaker.failures.saturating_add(1);
                let pause = self.config.probe_backoff.delay(self.breaker.failures);
                self.breaker.probe_at = later(Instant::now(), pause);
                tracing::warn!(error = %error_chain(error.as_ref()), probe_in = ?pause, "dependency still failing");
            }
        }
        self.ctx.progress();
    }

    /// Stops: releases what has not started, lets running handlers finish until
    /// `deadline`, then aborts them and abandons their messages by `hard_deadline`. A
    /// shutdown that begins meanwhile (during the drain after a receive error) brings
    /// both deadlines forward to its own.
    pub(super) async fn drain(
        &mut self,
        shutting_down: bool,
        mut deadline: Instant,
        mut hard_deadline: Instant,
    ) {
        self.draining = true;
        let mut tightened = shutting_down;
        if shutting_down {
            match timeout_at(hard_deadline, self.source.stop_receiving()).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::warn!(
                    error = %error_chain(&error),
                    "stop_receiving failed; buffered messages return when their locks expire"
                ),
                Err(_) => tracing::warn!("stop_receiving did not finish by the deadline"),
            }
        }
        let unstarted: Vec<Held> = self
            .pending
            .drain(..)
            .chain(std::mem::take(&mut self.delayed).into_iter().map(|d| d.held))
            .filter(|held| !held.lost)
            .collect();
        self.release(unstarted, hard_deadline, None).await;
        self.ctx.set_in_flight(self.running.len());
        while !self.tasks.is_empty() {
            let renewal = self.running.values().filter_map(|r| r.held.renew_at).min();
            let timer = renewal.map_or(deadline, |at| at.min(deadline));
            tokio::select! {
                Some(joined) = self.tasks.join_next_with_id() => self.finish(joined).await,
                () = self.ctx.cancelled(), if !tightened => {
                    tightened = true;
                    if self.ctx.is_shutting_down() {
                        deadline = deadline.min(self.ctx.drain_deadline());
                        hard_deadline = hard_deadline.min(self.ctx.hard_deadline());
                    }
                }
                () = sleep_until(timer) => {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    self.renew_due(now).await;
                }
            }
            self.ctx.set_in_flight(self.running.len());
        }
        if self.running.is_empty() {
            return;
        }
        self.tasks.abort_all();
        // Let the aborted tasks end before their messages go back, so no handler is
        // still at work on a message another consumer already has; a task that does not
        // end blocks a thread, and its message goes back anyway.
        let now = Instant::now();
        let span = hard_deadline.saturating_duration_since(now);
        let settle_by = now + span / 4;
        let mut stopped = HashSet::new();
        let _ = timeout_at(settle_by, async {
            while let Some(joined) = self.tasks.join_next_with_id().await {
                match joined {
                    Err(error) if error.is_cancelled() => {
                        stopped.insert(error.id());
                    }
                    other => self.finish(other).await,
                }
            }
        })
        .await;
        let mut aborted = Vec::new();
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
                aborted.push(running.held);
            }
        }
        self.release(aborted, now + span * 5 / 8, Some(Settled::Retried)).await;
        self.ctx.set_in_flight(0);
    }

    /// Abandons `held` at once, concurrently, giving up at `by`.
    async fn release(&self, held: Vec<Held>, by: Instant, record: Option<Settled>) {
        let abandons = held.into_iter().map(|held| async move {
            let id = held.id().to_owned();
            (id, held.delivery.abandon(None).await)
        });
        match timeout_at(by, futures::future::join_all(abandons)).await {
            Ok(results) => {
                for (id, result) in results {
                    match result {
                        Ok(()) => {
                            if let Some(settled) = record {
                                self.ctx.record_settled(settled, None);
                            }
                        }
                        Err(error) => self.settle_failed(&id, "abandon", &error),
                    }
                }
            }
            Err(_) => tracing::error!(
                "abandoning messages did not finish by the deadline; they return when their locks expire"
            ),
        }
    }
}

/// When to renew a lock expiring at `until`: `margin` before, but at most half-way.
fn renew_at(until: Option<Instant>, now: Instant, margin: Duration) -> Option<Instant> {
    until.map(|until| {
        let span = until.saturating_duration_since(now);
        until.checked_sub(margin.min(span / 2)).unwrap_or(now)
    })
}
