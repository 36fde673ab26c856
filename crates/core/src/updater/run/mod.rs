//! One run of an updater: the receive loop and the drain, coordinating the parts.
//!
//! `Run` holds the messages and decides what happens next; each concern is its own
//! part: the [`SessionGate`] (order within a session), the [`Breaker`] (pauses intake
//! while a dependency fails), the [`Handlers`] (tasks and timeouts), the [`Renewals`]
//! and [`Settlements`] (broker calls, each its own task bounded by `broker_timeout`,
//! so one slow call never holds up the others or the loop), the [`DelayedRetries`],
//! and the drain ([`drain`]).

mod drain;

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep_until, timeout};
use tracing::Instrument;

use super::UpdaterConfig;
use super::breaker::Breaker;
use super::delayed::DelayedRetries;
use super::handlers::{Ended, Handlers, Running};
use super::held::Held;
use super::renewal::{self, Renewals, Renewed};
use super::sessions::{SessionGate, Waiting};
use super::settlement::{SessionStep, Settlement, Settlements, Settling};
use crate::deadlines::saturating_add;
use crate::{
    Capabilities, Delivery, Handler, MessageSource, Outcome, RetryCause, Settled, TransportError,
    WorkerContext, error_chain,
};

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

pub(super) struct Run<'a> {
    ctx: &'a WorkerContext,
    source: &'a dyn MessageSource,
    handler: &'a Arc<dyn Handler>,
    config: &'a UpdaterConfig,
    caps: Capabilities,
    next_key: u64,
    /// Received messages that have not started, in arrival order.
    pending: VecDeque<Held>,
    handlers: Handlers,
    delayed: DelayedRetries,
    gate: SessionGate,
    breaker: Breaker,
    settlements: Settlements,
    renewals: Renewals,
    next_heartbeat: Instant,
    /// When the receive under way began, and how many messages it asked for.
    receive_began: Option<Instant>,
    receive_max: usize,
    /// Set once the drain began: retries are abandoned at once, not held.
    draining: bool,
    /// Handlers the drain cut short whose abandon is under way, by key: their message
    /// id and whether the task blocks a thread.
    aborting: BTreeMap<u64, (String, bool)>,
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
            handlers: Handlers::new(config.handler_timeout),
            delayed: DelayedRetries::default(),
            gate: SessionGate::new(caps.sessions, config.wait, waiting),
            breaker: Breaker::new(config.probe_backoff.clone()),
            settlements: Settlements::new(config.broker_timeout),
            renewals: Renewals::new(config.broker_timeout),
            next_heartbeat: saturating_add(Instant::now(), config.wait),
            receive_began: None,
            receive_max: 0,
            draining: false,
            aborting: BTreeMap::new(),
        }
    }

    /// Every message held: for health.
    fn in_flight(&self) -> usize {
        self.handlers.len() + self.pending.len() + self.delayed.len()
    }

    fn max_in_flight(&self) -> usize {
        self.config.concurrency.saturating_add(self.config.batch_size)
    }

    fn max_parked(&self) -> usize {
        self.max_in_flight().saturating_mul(PARKED_PER_SLOT)
    }

    /// Whether a waiting message cannot start now because its session is busy or waits
    /// for another message of it: it is *parked*.
    fn is_parked(&self, held: &Held) -> bool {
        held.session().is_some_and(|session| !self.gate.may_start(session, held.key, held.id()))
    }

    /// Messages that count toward intake: running, and waiting ones that could start.
    /// Parked messages and retries held locally for their delay do not: counting them
    /// let a session's followers fill the intake while its head was away, so the head
    /// was never received again.
    fn intake(&self) -> usize {
        self.handlers.len() + self.pending.iter().filter(|held| !self.is_parked(held)).count()
    }

    /// Parked messages and retries held locally: each holds a lock the loop renews, so
    /// they have their own bound, [`PARKED_PER_SLOT`] × `(concurrency + batch_size)`.
    fn parked(&self) -> usize {
        self.pending.iter().filter(|held| self.is_parked(held)).count() + self.delayed.len()
    }

    /// Whether to receive now, and at most how many messages.
    ///
    /// Past the parked bound the loop still receives, one message at a time and up to
    /// twice the bound, while a session waits for a message that is back at the broker
    /// and nothing of it runs: only a receive brings that message back, and stopping
    /// would leave the session, and with it the worker, stuck until the stall watchdog
    /// restarts it (on a transport without delayed abandon, where [`Self::make_room`]
    /// cannot send parked messages back).
    fn receive_max(&self, now: Instant) -> Option<usize> {
        if self.breaker.is_open()
            || self.handlers.len() >= self.config.concurrency
            || self.intake() >= self.max_in_flight()
        {
            return None;
        }
        let parked = self.parked();
        if parked < self.max_parked() {
            return Some(self.config.batch_size.min(self.max_in_flight() - self.intake()).max(1));
        }
        let overflow = parked < self.max_parked().saturating_mul(2);
        (overflow && self.gate.awaits_one_due(now)).then_some(1)
    }

    /// Makes room under the parked bound while a session waits for a message back at
    /// the broker with nothing of it running: that message can only come back through
    /// intake, which the bound would stop. The newest parked messages of such sessions
    /// go back to the broker, delayed until the awaited message is due (once that
    /// passed, until the wait for it ends; at least `wait`), and their session waits
    /// for them in turn, so they keep their order.
    /// Each costs its message a delivery. Only on transports with delayed abandon: an
    /// undelayed one would come straight back.
    fn make_room(&mut self, now: Instant) {
        if !self.caps.delayed_abandon || self.draining {
            return;
        }
        while self.parked() >= self.max_parked() {
            // The newest parked message of such a session; one it does not wait for
            // yet before one it already waits for (that one keeps its place).
            let candidates = self.pending.iter().enumerate().rev().filter_map(|(at, held)| {
                let session = held.session()?;
                let (first, back) = self.gate.first_awaited(session, now)?;
                let sendable = held.id() != first
                    && !self.pending.iter().any(|p| p.id() == first)
                    && self.is_parked(held);
                let awaited = self.gate.awaited(session, held.id()).is_some();
                sendable.then_some((awaited, at, back))
            });
            let newest = candidates.min_by_key(|(awaited, _, _)| *awaited);
            let Some((_, at, back)) = newest else { return };
            let Some(held) = self.pending.remove(at) else { return };
            let delay = back.saturating_duration_since(now).max(self.config.wait);
            tracing::info!(
                message_id = %held.id(),
                retry_in = ?delay,
                "too many messages wait for their sessions; sending one back until its session's first message returns"
            );
            self.settlements.start(held, Settlement::Abandon(Some(delay)), None, None);
        }
    }

    fn report(&self) {
        self.ctx.set_in_flight(self.in_flight());
        self.ctx.set_overdue_handlers(self.handlers.overdue());
    }

    /// Receives and handles messages until the worker is cancelled (`None`) or a receive
    /// fails (the error).
    pub(super) async fn receive_loop(&mut self) -> Option<TransportError> {
        let source = self.source;
        let handler = self.handler;
        let mut receiving: Option<Receiving<'a>> = None;
        let mut probing: Option<Probing<'a>> = None;
        // Since when the updater has not been receiving, by its own choice.
        let mut intake_stopped: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if let Some(since) = intake_stopped.take() {
                // A message due back could not be received meanwhile: the sessions
                // waiting for one wait that much longer.
                self.gate.postpone(now.saturating_duration_since(since));
            }
            self.dispatch();
            self.make_room(now);
            self.report();
            // A receive under way when the breaker opened is left to finish: dropping it
            // could cost its messages a delivery for nothing.
            if let Some(max) = self.receive_max(now).filter(|_| receiving.is_none()) {
                receiving = Some(source.receive(max, self.config.wait));
                self.receive_began = Some(now);
                self.receive_max = max;
            }
            if receiving.is_none() {
                intake_stopped = Some(now);
            }
            if probing.is_none() && self.breaker.probe_at().is_some_and(|at| now >= at) {
                probing = Some(Box::pin(timeout(self.probe_limit(), handler.probe())));
            }
            let timer = self.next_timer(receiving.is_some(), probing.is_some());
            tokio::select! {
                biased;
                () = self.ctx.cancelled() => return None,
                (running, ended) = self.handlers.next() => self.finish(running, ended),
                (settling, result) = self.settlements.next() => self.settled(settling, result),
                (key, answer) = self.renewals.next() => self.renewed(key, answer),
                result = maybe(receiving.as_mut()), if receiving.is_some() => {
                    receiving = None;
                    let began = self.receive_began.take().unwrap_or(now);
                    match result {
                        Ok(batch) => {
                            // A poll that answered, empty or not, is progress; a failed
                            // one is not.
                            self.ctx.progress();
                            self.ctx.set_role(source.role());
                            // A session's wait for a message ends at its bound only when
                            // a receive that began after the bound answered without it
                            // and without filling its batch: evidence that another
                            // consumer took it. A hung receive is no such evidence.
                            let short = batch.len() < self.receive_max;
                            self.accept(batch);
                            if short {
                                self.gate.expire(began);
                            }
                        }
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

    /// The next moment something timed is due: a renewal, a delayed retry, a handler
    /// timeout, a probe, or a heartbeat while not receiving.
    fn next_timer(&self, receiving: bool, probing: bool) -> Instant {
        let renewals = self.held().filter_map(|held| held.renew_at);
        let probe = self.breaker.probe_at().filter(|_| !probing);
        let heartbeat = (!receiving).then_some(self.next_heartbeat);
        renewals
            .chain(self.delayed.next_due())
            .chain(self.handlers.next_timeout())
            .chain(probe)
            .chain(heartbeat)
            .min()
            .unwrap_or_else(|| {
                saturating_add(Instant::now(), self.config.wait.max(Duration::from_secs(1)))
            })
    }

    /// Whether not receiving is still progress: while the breaker holds the worker back
    /// (its probes are answered), or while every slot (at least one) is busy with
    /// handlers whose locks are renewed and none failing (DESIGN §3). Failed renewal
    /// rounds are not progress: an unreachable namespace must end in a stall. On a
    /// transport without timed locks (RabbitMQ) there is nothing to renew: a running
    /// handler is progress, and a hung one is found by `handler_timeout` instead.
    fn is_busy_and_healthy(&self) -> bool {
        if self.breaker.is_open() {
            return true;
        }
        !self.handlers.is_empty()
            && self.handlers.len() >= self.config.concurrency
            && (!self.caps.lock_renewal || self.handlers.iter().all(|r| r.held.has_healthy_lock()))
    }

    /// Whether a receive has gone unanswered for `wait + broker_timeout`: intake is
    /// stuck, and renewed locks (a handler that hangs) are no longer progress, so a hung
    /// receive ends in a stall.
    fn is_intake_stuck(&self, now: Instant) -> bool {
        let limit = self.config.wait.saturating_add(self.config.broker_timeout);
        self.receive_began.is_some_and(|began| now.saturating_duration_since(began) > limit)
    }

    fn held(&self) -> impl Iterator<Item = &Held> {
        self.handlers.iter().map(|r| &r.held).chain(self.pending.iter()).chain(self.delayed.iter())
    }

    fn held_mut(&mut self) -> impl Iterator<Item = &mut Held> {
        self.handlers.held_mut().chain(self.pending.iter_mut()).chain(self.delayed.iter_mut())
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
        for held in self.delayed.take_due(now) {
            self.settlements.start(held, Settlement::Abandon(None), None, None);
        }
        for message_id in self.handlers.time_out(now) {
            tracing::warn!(
                message_id = %message_id,
                handler_timeout = ?self.config.handler_timeout,
                "handler ran past its timeout; aborting it and retrying the message"
            );
        }
        self.renew_due(now);
    }

    /// Starts a renewal of every lock that is due.
    fn renew_due(&mut self, now: Instant) {
        let Self { handlers, pending, delayed, renewals, .. } = self;
        let held = handlers.held_mut().chain(pending.iter_mut()).chain(delayed.iter_mut());
        for held in held.filter(|held| held.is_renewal_due(now)) {
            renewals.start(held);
        }
    }

    /// Takes the answer of one renewal.
    fn renewed(&mut self, key: u64, answer: Result<Option<Instant>, TransportError>) {
        let margin = self.config.renew_margin;
        let now = Instant::now();
        // Only the lock of a running handler is progress when renewed: a renewed lock
        // of a message that merely waits (parked, or held for a delayed retry) shows
        // nothing moving, and must not keep a worker whose receive hangs from stalling.
        let running = self.handlers.iter().any(|r| r.held.key == key);
        let Some(held) = self.held_mut().find(|held| held.key == key) else { return };
        let id = held.id().to_owned();
        match renewal::apply(held, answer, now, margin) {
            Renewed::Kept if running && !self.is_intake_stuck(now) => self.ctx.progress(),
            Renewed::Kept => {}
            Renewed::Lost(error) => {
                tracing::warn!(
                    message_id = %id,
                    error = %error_chain(&error),
                    "lock lost; the message will not be settled here"
                );
                self.ctx.record_settled(Settled::LeaseLost, None);
                self.drop_lost_waiting();
            }
            Renewed::Failed(error) => tracing::warn!(
                message_id = %id,
                error = %error_chain(&error),
                "lock renewal failed; retrying"
            ),
        }
    }

    /// Messages not yet started whose lock is gone belong to the broker again. Their
    /// session waits for them, so later messages cannot overtake them.
    fn drop_lost_waiting(&mut self) {
        let (lost, kept): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.pending).into_iter().partition(|held| held.lost);
        self.pending = kept.into();
        for held in lost.into_iter().chain(self.delayed.take_lost()) {
            if let Some(session) = held.session() {
                let now = Instant::now();
                self.await_return(session, held.key, held.id(), now, Duration::ZERO);
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
            let held = Held::new(self.next_key, delivery, now, self.config.renew_margin);
            if message.delivery_count > self.config.max_deliveries {
                let description = format!(
                    "delivered {} times, more than the limit of {}",
                    message.delivery_count, self.config.max_deliveries
                );
                tracing::warn!(
                    queue = self.source.queue(),
                    message_id = %message.id,
                    delivery_count = message.delivery_count,
                    reason = crate::transport::MAX_DELIVERY_COUNT_EXCEEDED,
                    "dead-lettering a message delivered too often"
                );
                let settlement = Settlement::DeadLetter {
                    reason: crate::transport::MAX_DELIVERY_COUNT_EXCEEDED.to_owned(),
                    description,
                };
                // Until the broker took it, the message is not gone: a dead-letter that
                // fails, or is given up, brings it back. Its session waits for it (in
                // the place where it arrived, if it did not already), and the wait
                // does not run out meanwhile.
                if let Some(session) = message.session_id.as_deref() {
                    if self.gate.awaited(session, &message.id).is_none() {
                        self.gate.release_awaiting(
                            session,
                            held.key,
                            &message.id,
                            now,
                            Duration::ZERO,
                        );
                    }
                    self.gate.returned(session, &message.id);
                }
                self.settlements.start(held, settlement, Some(Settled::DeadLettered), None);
                continue;
            }
            // A redelivery of a message still waiting here means the broker took that
            // copy's lock back: it must neither run nor be settled. Its session waits
            // for the message in that copy's place, which the new copy takes. Only a
            // timed lock can be taken back (a transport without one redelivers nothing
            // its consumer holds), and a redelivery keeps its session and enqueue
            // time: another message that merely has the same id (a producer's retried
            // send) is no redelivery, and the waiting one must still run.
            let stale = self.pending.iter_mut().filter(|p| {
                let copy = p.delivery.message();
                copy.id == message.id
                    && copy.delivery_count < message.delivery_count
                    && copy.session_id == message.session_id
                    && (copy.enqueued_at.is_none()
                        || message.enqueued_at.is_none()
                        || copy.enqueued_at == message.enqueued_at)
                    && p.delivery.locked_until().is_some()
            });
            let mut lost = 0;
            for copy in stale {
                copy.lost = true;
                lost += 1;
            }
            if lost > 0 {
                tracing::warn!(
                    message_id = %message.id,
                    delivery_count = message.delivery_count,
                    "redelivered while an earlier delivery waited here: that delivery's lock is lost"
                );
                for _ in 0..lost {
                    self.ctx.record_settled(Settled::LeaseLost, None);
                }
                self.drop_lost_waiting();
            }
            // A message its session waits for goes in its place (see
            // [`SessionGate::place`]): before every held message of the session, or, if
            // it never started, before those that arrived after it, returned copies
            // among them standing where they first arrived.
            let session = message.session_id.as_deref();
            let awaited = session.filter(|s| self.gate.awaited(s, &message.id).is_some());
            if let Some(session) = awaited {
                self.gate.returned(session, &message.id);
                let place = self.gate.place(session, held.key, held.id());
                let at = self.pending.iter().position(|p| {
                    p.session() == Some(session) && self.gate.place(session, p.key, p.id()) > place
                });
                self.pending.insert(at.unwrap_or(self.pending.len()), held);
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
        while i < self.pending.len() && self.handlers.len() < self.config.concurrency {
            if self.is_parked(&self.pending[i]) {
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
            self.gate.occupy(session, held.key, held.id());
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
        self.handlers.start(held, task);
    }

    /// Settles the message of a handler task that ended. Its session stays occupied
    /// until the settlement ends.
    fn finish(&mut self, running: Running, ended: Ended) {
        self.ctx.progress();
        let elapsed = running.started.elapsed();
        let held = running.held;
        match ended {
            Ended::Returned(outcome, elapsed) => self.settle(held, outcome, Some(elapsed), false),
            Ended::Panicked(payload) => {
                tracing::error!(
                    queue = self.source.queue(),
                    message_id = %held.id(),
                    panic = %payload,
                    "handler panicked; retrying the message"
                );
                let outcome = Outcome::retry(format!("handler panicked: {payload}"));
                self.settle(held, outcome, Some(elapsed), true);
            }
            Ended::Aborted if running.timed_out => {
                let outcome = Outcome::retry("handler ran past its timeout");
                self.settle(held, outcome, Some(elapsed), false);
            }
            Ended::Aborted => {
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
                let now = Instant::now();
                self.await_return(session, held.key, held.id(), now, Duration::ZERO);
            }
            return;
        }
        match outcome {
            Outcome::Complete => {
                let record = Some(Settled::Completed);
                self.settlements.start(held, Settlement::Complete, record, elapsed);
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
                self.settlements.start(held, settlement, Some(Settled::DeadLettered), elapsed);
            }
        }
    }

    fn retry(&mut self, held: Held, delay: Duration, settled: Settled, elapsed: Option<Duration>) {
        let delay = delay.min(MAX_RETRY_DELAY);
        if self.draining {
            // Shutting down: release it now rather than hold it past the drain.
            let delay = Some(delay).filter(|d| !d.is_zero() && self.caps.delayed_abandon);
            self.settlements.start(held, Settlement::Abandon(delay), Some(settled), elapsed);
            return;
        }
        if delay.is_zero() || self.caps.delayed_abandon {
            let delay = Some(delay).filter(|d| !d.is_zero());
            self.settlements.start(held, Settlement::Abandon(delay), Some(settled), elapsed);
        } else {
            // No delayed abandon: hold the message (its lock renewed) and its session
            // until the delay ends, then abandon it.
            if let Some(handler_time) = elapsed {
                crate::metrics::handler_duration(self.ctx.name(), handler_time);
            }
            self.ctx.record_settled(settled, None);
            self.delayed.hold(held, saturating_add(Instant::now(), delay));
        }
    }

    /// Takes the result of one settlement: counts it, and frees its session, or, when
    /// the message is back at the broker, makes the session wait for it.
    fn settled(&mut self, settling: Settling, result: Result<(), TransportError>) {
        let now = Instant::now();
        if let Some((id, blocked)) = self.aborting.remove(&settling.key) {
            self.report_aborted(&id, blocked, result.is_ok());
        }
        match &result {
            Ok(()) => {
                tracing::debug!(message_id = %settling.id, operation = settling.operation, "message settled");
                if let Some(settled) = settling.record {
                    self.ctx.record_settled(settled, settling.elapsed);
                }
                if let Some(reason) = &settling.dead_letter_reason {
                    self.ctx.record_dead_letter_reason(reason);
                }
                self.ctx.progress();
            }
            Err(error) => self.settle_failed(&settling.id, settling.operation, error),
        }
        if let Some(session) = &settling.session {
            match settling.session_step(&result, now) {
                SessionStep::Release => self.gate.release(session, settling.key, &settling.id),
                SessionStep::AwaitReturn { due, delay } => {
                    self.await_return(session, settling.key, &settling.id, due, delay);
                }
            }
        }
    }

    /// Message `message_id` of `session`, held under `key`, is back at the broker: the
    /// session waits for it (see [`SessionGate::release_awaiting`]). If a copy of it is
    /// held here already (the broker redelivered it before this one was found lost),
    /// that copy has returned. A message that never started waits in the place where
    /// its earliest copy held here arrived.
    fn await_return(
        &mut self,
        session: &str,
        key: u64,
        message_id: &str,
        due: Instant,
        delay: Duration,
    ) {
        // Copies of it held here (not this one: a lost copy has left `pending`).
        let copies: Vec<u64> = self
            .pending
            .iter()
            .filter(|held| held.key != key && held.id() == message_id)
            .map(|held| held.key)
            .collect();
        let rank = match copies.iter().min() {
            Some(&earlier) if earlier < key && !self.gate.is_occupant(session, key) => earlier,
            _ => key,
        };
        self.gate.release_awaiting(session, rank, message_id, due, delay);
        // A copy held here, or one being settled (a redelivery dead-lettered on
        // arrival holds its session until answered), keeps the message from being
        // back at the broker: the wait must not run out meanwhile.
        if !copies.is_empty() || self.settlements.settles_copy(message_id, key) {
            self.gate.returned(session, message_id);
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
                self.gate.resume(Instant::now());
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

    /// The sessions still waiting for a message, for the next run of the updater.
    pub(super) fn take_waiting(&mut self) -> Waiting {
        let fresh = SessionGate::new(self.caps.sessions, self.config.wait, Waiting::default());
        std::mem::replace(&mut self.gate, fresh).into_waiting()
    }
}
