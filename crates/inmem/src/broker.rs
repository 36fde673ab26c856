//! The broker: named queues, each with a dead-letter sub-queue, behind one mutex.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use steward_core::transport::{
    DEAD_LETTER_DESCRIPTION_PROPERTY, DEAD_LETTER_REASON_PROPERTY, MAX_DELIVERY_COUNT_EXCEEDED,
    later,
};
use steward_core::{
    Capabilities, DeadLetter, Message, MessageSink, OutgoingMessage, TransportError,
};
use tokio::time::{Instant, sleep, sleep_until};
use uuid::Uuid;

use crate::fault::{Faults, Operation, QueueFaults};
use crate::queue::{Entity, LockGone, LockedMessage, QueueOptions, Stored};
use crate::source::InMemorySource;

/// The suffix that names a queue's dead-letter sub-queue, as Service Bus spells it.
pub const DEAD_LETTER_SUFFIX: &str = "/$DeadLetterQueue";

/// An in-process message broker with the semantics of a peek-lock broker.
///
/// - Queues are created on first use, or, in strict mode ([`InMemoryBrokerBuilder::with_strict`]),
///   only by [`declare_queue`](Self::declare_queue); using an undeclared queue is then
///   [`TransportError::NotFound`].
/// - A received message is locked for the queue's lock duration; it can be completed,
///   abandoned (at once or after a delay), dead-lettered or have its lock renewed. An
///   expired lock makes it available again, with its delivery count one higher.
/// - Messages with a session id are delivered one at a time per session, in order; a
///   message waiting out an abandon delay blocks its session.
/// - Past the queue's maximum delivery count, a message goes to the queue's dead-letter
///   sub-queue (`<queue>/$DeadLetterQueue`) with reason `MaxDeliveryCountExceeded`.
/// - Time is tokio time, so tests under `tokio::time::pause()` run instantly.
/// - [`faults`](Self::faults) injects failures, hangs, disconnects and latency.
///
/// Cloning is cheap and shares the broker. It is a [`MessageSink`]; [`source`](Self::source)
/// makes [`MessageSource`](steward_core::MessageSource)s.
///
/// Everything is in memory: the process going away loses every message.
#[derive(Clone)]
pub struct InMemoryBroker {
    inner: Arc<Inner>,
}

struct Inner {
    strict: bool,
    sessions: bool,
    default_options: QueueOptions,
    max_body_bytes: Option<usize>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    entities: HashMap<String, Entity>,
    faults: HashMap<String, QueueFaults>,
}

impl State {
    /// The queue, or [`TransportError::NotFound`].
    fn entity(&mut self, queue: &str) -> Result<&mut Entity, TransportError> {
        self.entities
            .get_mut(queue)
            .ok_or_else(|| TransportError::not_found(format!("queue {queue}")))
    }
}

/// The error of a settlement whose lock is gone.
fn lock_lost(queue: &str, lock: LockRef) -> TransportError {
    TransportError::lock_lost(format!("sequence {} in queue {queue}", lock.sequence))
}

impl fmt::Debug for InMemoryBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InMemoryBroker")
            .field("strict", &self.inner.strict)
            .field("default_options", &self.inner.default_options)
            .finish_non_exhaustive()
    }
}

impl Default for InMemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

/// Builds an [`InMemoryBroker`].
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct InMemoryBrokerBuilder {
    strict: bool,
    default_options: QueueOptions,
    max_body_bytes: Option<usize>,
    without_sessions: bool,
}

impl InMemoryBrokerBuilder {
    /// In strict mode, only declared queues exist. Default: queues are created on first use.
    pub fn with_strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }

    /// The options of queues created on first use (and the default lock duration).
    pub fn with_default_queue_options(mut self, options: QueueOptions) -> Self {
        self.default_options = options;
        self
    }

    /// Refuses messages larger than `max` bytes, counting the whole message as
    /// [`OutgoingMessage::size_bytes`] does (body, ids, content type, properties).
    /// Default: no limit.
    pub fn with_max_body_bytes(mut self, max: usize) -> Self {
        self.max_body_bytes = Some(max);
        self
    }

    /// Whether the broker keeps sessions. Default: true. Without sessions, session ids
    /// are plain properties, as on RabbitMQ: messages of one session are handed out
    /// concurrently and in any order, a delayed message holds nothing back, and sources
    /// claim no [`sessions`](Capabilities::sessions) capability, so ordering is left to
    /// the consumer.
    pub fn with_sessions(mut self, sessions: bool) -> Self {
        self.without_sessions = !sessions;
        self
    }

    /// Builds the broker.
    #[must_use]
    pub fn build(self) -> InMemoryBroker {
        InMemoryBroker {
            inner: Arc::new(Inner {
                strict: self.strict,
                sessions: !self.without_sessions,
                default_options: self.default_options,
                max_body_bytes: self.max_body_bytes,
                state: Mutex::new(State::default()),
            }),
        }
    }
}

/// Where a locked message is: its sequence number and lock token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LockRef {
    /// The message's sequence number in its queue.
    pub sequence: u64,
    /// The token of the lock.
    pub token: Uuid,
}

/// What [`InMemoryBroker::enqueue`] stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueued {
    /// The message id (given, or generated).
    pub message_id: String,
    /// The sequence number in the queue.
    pub sequence: u64,
}

impl InMemoryBroker {
    /// A broker that creates queues on first use with [`QueueOptions::default`].
    #[must_use]
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// Starts building a broker.
    pub fn builder() -> InMemoryBrokerBuilder {
        InMemoryBrokerBuilder::default()
    }

    /// The name of `queue`'s dead-letter sub-queue.
    #[must_use]
    pub fn dead_letter_queue_name(queue: &str) -> String {
        format!("{queue}{DEAD_LETTER_SUFFIX}")
    }

    /// What the broker's sources support: everything, up to the body limit, and
    /// sessions only if the broker keeps them ([`InMemoryBrokerBuilder::with_sessions`]).
    #[must_use]
    pub fn capabilities(&self) -> Capabilities {
        Capabilities {
            sessions: self.inner.sessions,
            max_body_bytes: self.inner.max_body_bytes,
            ..Capabilities::all()
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave an entity half-updated in a way
        // that matters more than losing the broker, so keep going with the data.
        self.inner.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Declares `queue` (and its dead-letter sub-queue) with `options`; a queue that
    /// already exists gets the new options.
    pub fn declare_queue(&self, queue: &str, options: QueueOptions) {
        let mut state = self.state();
        let dlq_options = QueueOptions { max_delivery_count: None, ..options.clone() };
        let sessions = self.inner.sessions;
        match state.entities.get_mut(queue) {
            Some(entity) => entity.options = options,
            None => {
                state
                    .entities
                    .insert(queue.to_owned(), Entity::new(options).with_sessions(sessions));
            }
        }
        state
            .entities
            .entry(Self::dead_letter_queue_name(queue))
            .or_insert_with(|| Entity::new(dlq_options).with_sessions(sessions));
    }

    /// Deletes `queue` and its dead-letter sub-queue with every message in them.
    pub fn delete_queue(&self, queue: &str) {
        let mut state = self.state();
        for name in [queue.to_owned(), Self::dead_letter_queue_name(queue)] {
            if let Some(entity) = state.entities.remove(&name) {
                entity.notify.notify_waiters();
            }
        }
    }

    /// Whether `queue` exists.
    #[must_use]
    pub fn has_queue(&self, queue: &str) -> bool {
        self.state().entities.contains_key(queue)
    }

    /// The options of `queue`, if it exists.
    #[must_use]
    pub fn queue_options(&self, queue: &str) -> Option<QueueOptions> {
        self.state().entities.get(queue).map(|e| e.options.clone())
    }

    /// Runs `f` on the entity, creating it unless the broker is strict.
    fn with_entity<T>(
        &self,
        name: &str,
        f: impl FnOnce(&mut Entity) -> T,
    ) -> Result<T, TransportError> {
        let mut state = self.state();
        if !state.entities.contains_key(name) {
            if self.inner.strict {
                return Err(TransportError::not_found(format!("queue {name}")));
            }
            let queue = name.strip_suffix(DEAD_LETTER_SUFFIX).unwrap_or(name);
            drop(state);
            self.declare_queue(queue, self.inner.default_options.clone());
            state = self.state();
        }
        let entity = state
            .entities
            .get_mut(name)
            .ok_or_else(|| TransportError::not_found(format!("queue {name}")))?;
        Ok(f(entity))
    }

    /// Runs `f` on every queue under the broker's lock, and whether the broker is
    /// strict: for the dead-letter administration, whose steps must be atomic.
    pub(crate) fn with_entities<T>(
        &self,
        f: impl FnOnce(&mut HashMap<String, Entity>, bool) -> T,
    ) -> T {
        f(&mut self.state().entities, self.inner.strict)
    }

    pub(crate) fn with_faults(&self, queue: &str, f: impl FnOnce(&mut QueueFaults)) {
        f(self.state().faults.entry(queue.to_owned()).or_default());
    }

    /// Arms faults on `queue` (which need not exist yet).
    ///
    /// # Examples
    ///
    /// ```
    /// use steward_core::{ErrorKind, MessageSource};
    /// use steward_inmem::InMemoryBroker;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let broker = InMemoryBroker::new();
    /// broker.faults("orders").fail_receives(2, ErrorKind::Connection);
    /// let source = broker.source("orders").unwrap();
    /// let wait = std::time::Duration::from_secs(1);
    /// assert!(source.receive(1, wait).await.is_err());
    /// assert!(source.receive(1, wait).await.is_err());
    /// assert!(source.receive(1, wait).await.unwrap().is_empty());
    /// # }
    /// ```
    pub fn faults(&self, queue: &str) -> Faults {
        Faults { broker: self.clone(), queue: queue.to_owned() }
    }

    pub(crate) fn disconnect(&self, queue: &str) {
        if let Some(entity) = self.state().entities.get_mut(queue) {
            entity.disconnect();
        }
    }

    pub(crate) fn expire_locks(&self, queue: &str) {
        if let Some(entity) = self.state().entities.get_mut(queue) {
            entity.expire_locks();
        }
    }

    /// Applies latency, hangs and armed failures for one operation on `queue`.
    async fn before(&self, op: Operation, queue: &str) -> Result<(), TransportError> {
        // Every call would otherwise complete without yielding; take part in tokio's
        // cooperative scheduling so a tight consumer loop cannot starve other tasks.
        tokio::task::consume_budget().await;
        let (latency, hang, failure) = {
            let mut state = self.state();
            match state.faults.get_mut(queue) {
                None => return Ok(()),
                Some(faults) => (
                    faults.latency,
                    matches!(op, Operation::Receive) && faults.hang_receives,
                    faults.take_failure(op, queue),
                ),
            }
        };
        if !latency.is_zero() {
            sleep(latency).await;
        }
        if hang {
            std::future::pending::<()>().await;
        }
        self.wait_while_held(op, queue).await;
        failure.map_or(Ok(()), Err)
    }

    /// Waits while a hang is armed for `op` on `queue`.
    async fn wait_while_held(&self, op: Operation, queue: &str) {
        loop {
            let changed = {
                let state = self.state();
                match state.faults.get(queue) {
                    Some(faults) if faults.is_held(op) => faults.changed.clone(),
                    _ => return,
                }
            };
            let notified = changed.notified();
            tokio::pin!(notified);
            // Registered before looking again, so a change in between wakes us.
            notified.as_mut().enable();
            let still_held = self.state().faults.get(queue).is_some_and(|f| f.is_held(op));
            if !still_held {
                return;
            }
            notified.await;
        }
    }

    /// A consumer of `queue`.
    ///
    /// # Errors
    ///
    /// [`TransportError::NotFound`] in strict mode when the queue was not declared.
    pub fn source(&self, queue: &str) -> Result<InMemorySource, TransportError> {
        let generation = self.with_entity(queue, |entity| entity.generation)?;
        Ok(InMemorySource::new(self.clone(), queue.to_owned(), generation))
    }

    /// A consumer of `queue`'s dead-letter sub-queue. Its messages carry the reason and
    /// description as properties `DeadLetterReason` and `DeadLetterErrorDescription`.
    ///
    /// # Errors
    ///
    /// [`TransportError::NotFound`] in strict mode when the queue was not declared.
    pub fn dead_letter_source(&self, queue: &str) -> Result<InMemorySource, TransportError> {
        self.source(&Self::dead_letter_queue_name(queue))
    }

    /// Stores a message in `queue`, visible from `visible_at` (a scheduled message) or at
    /// once when `None`.
    ///
    /// # Errors
    ///
    /// [`TransportError::NotFound`] in strict mode for an undeclared queue;
    /// [`TransportError::Protocol`] for a body over the broker's limit; injected faults.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: the message is stored in one step after any injected latency.
    pub async fn enqueue(
        &self,
        queue: &str,
        message: OutgoingMessage,
        visible_at: Option<Instant>,
    ) -> Result<Enqueued, TransportError> {
        self.before(Operation::Send, queue).await?;
        if let Some(max) = self.inner.max_body_bytes {
            if message.size_bytes() > max {
                return Err(TransportError::protocol(format!(
                    "message of {} bytes to queue {queue} exceeds the limit of {max} bytes",
                    message.size_bytes()
                )));
            }
        }
        let message_id = message.message_id.unwrap_or_else(|| Uuid::new_v4().simple().to_string());
        let stored = Message {
            id: message_id.clone(),
            body: message.body,
            session_id: message.session_id,
            correlation_id: message.correlation_id,
            content_type: message.content_type,
            properties: message.properties,
            delivery_count: 0,
            enqueued_at: None,
        };
        let now = Instant::now();
        let sequence =
            self.with_entity(queue, |entity| entity.push(stored, visible_at.unwrap_or(now), None))?;
        Ok(Enqueued { message_id, sequence })
    }

    /// Receives up to `max` messages from the entity `queue` (a queue, or a
    /// `<queue>/$DeadLetterQueue`) under lock, waiting at most `wait` on an empty queue.
    ///
    /// This is the low-level call behind [`InMemorySource`]; protocol front ends (the
    /// Service Bus emulator) use it with [`complete`](Self::complete) and friends.
    ///
    /// # Errors
    ///
    /// [`TransportError::NotFound`] in strict mode; injected faults.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: messages are locked and returned in one step, with no await between.
    pub async fn receive(
        &self,
        queue: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<LockedMessage>, TransportError> {
        self.receive_as(queue, max, wait, None).await
    }

    pub(crate) async fn receive_as(
        &self,
        queue: &str,
        max: usize,
        wait: Duration,
        generation: Option<u64>,
    ) -> Result<Vec<LockedMessage>, TransportError> {
        self.before(Operation::Receive, queue).await?;
        let deadline = later(Instant::now(), wait);
        let notify = self.with_entity(queue, |entity| entity.notify.clone())?;
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            // Registered before looking, so a message arriving in between wakes us.
            notified.as_mut().enable();
            let now = Instant::now();
            let (taken, next_change) = self.take(queue, max, now, generation)?;
            if !taken.is_empty() || now >= deadline || max == 0 {
                return Ok(taken);
            }
            let wake = next_change.map_or(deadline, |at| at.min(deadline));
            tokio::select! {
                () = &mut notified => {}
                () = sleep_until(wake) => {}
            }
        }
    }

    fn take(
        &self,
        queue: &str,
        max: usize,
        now: Instant,
        generation: Option<u64>,
    ) -> Result<(Vec<LockedMessage>, Option<Instant>), TransportError> {
        let mut state = self.state();
        let entity = state.entity(queue)?;
        if generation.is_some_and(|g| g != entity.generation) {
            return Err(TransportError::connection(format!(
                "connection to queue {queue} was closed (injected disconnect)"
            )));
        }
        let generation = generation.unwrap_or(entity.generation);
        let (taken, overflow) = entity.take(max, now, generation);
        let next_change = entity.next_change(now);
        let max_count = entity.options.max_delivery_count.unwrap_or_default();
        for stored in overflow {
            Self::push_over_limit(&mut state, queue, stored, max_count, now);
        }
        Ok((taken, next_change))
    }

    /// Dead-letters a message that used up the queue's `max_count` deliveries.
    fn push_over_limit(
        state: &mut State,
        queue: &str,
        stored: Stored,
        max_count: u32,
        now: Instant,
    ) {
        let description =
            format!("message could not be consumed after {max_count} delivery attempts");
        Self::push_dead_letter(
            state,
            queue,
            stored,
            MAX_DELIVERY_COUNT_EXCEEDED,
            &description,
            now,
        );
    }

    fn push_dead_letter(
        state: &mut State,
        queue: &str,
        stored: Stored,
        reason: &str,
        description: &str,
        now: Instant,
    ) {
        tracing::debug!(queue, message_id = %stored.message.id, reason, "dead-lettered");
        let name = Self::dead_letter_queue_name(queue);
        let options = state.entities.get(queue).map(|e| e.options.clone()).unwrap_or_default();
        let dlq = state
            .entities
            .entry(name)
            .or_insert_with(|| Entity::new(QueueOptions { max_delivery_count: None, ..options }));
        let mut message = stored.message;
        message.properties.insert(DEAD_LETTER_REASON_PROPERTY.to_owned(), reason.to_owned());
        message
            .properties
            .insert(DEAD_LETTER_DESCRIPTION_PROPERTY.to_owned(), description.to_owned());
        dlq.push(message, now, Some((reason.to_owned(), description.to_owned())));
    }

    async fn settle<T>(
        &self,
        queue: &str,
        op: Operation,
        f: impl FnOnce(&mut Entity, Instant) -> Result<T, LockGone>,
        lock: LockRef,
    ) -> Result<T, TransportError> {
        self.before(op, queue).await?;
        let now = Instant::now();
        let mut state = self.state();
        let entity = state.entity(queue)?;
        f(entity, now).map_err(|LockGone| lock_lost(queue, lock))
    }

    /// Completes (removes) a locked message.
    ///
    /// # Errors
    ///
    /// [`TransportError::LockLost`] when the lock expired, was lost to a disconnect or
    /// belongs to another receive; [`TransportError::NotFound`] when the queue is gone.
    ///
    /// # Cancellation safety
    ///
    /// Not cancel safe once past any injected latency.
    pub async fn complete(&self, queue: &str, lock: LockRef) -> Result<(), TransportError> {
        let complete = |e: &mut Entity, now| e.complete(lock.sequence, lock.token, now).map(drop);
        self.settle(queue, Operation::Disposition, complete, lock).await
    }

    /// Releases a locked message, visible again at once or after `delay`. A message that
    /// has used up the queue's deliveries goes to the dead-letter queue instead.
    ///
    /// # Errors
    ///
    /// As for [`complete`](Self::complete).
    ///
    /// # Cancellation safety
    ///
    /// Not cancel safe once past any injected latency.
    pub async fn abandon(
        &self,
        queue: &str,
        lock: LockRef,
        delay: Option<Duration>,
    ) -> Result<(), TransportError> {
        self.before(Operation::Disposition, queue).await?;
        let now = Instant::now();
        let mut state = self.state();
        let entity = state.entity(queue)?;
        let max_count = entity.options.max_delivery_count.unwrap_or_default();
        match entity.abandon(lock.sequence, lock.token, delay, now) {
            Ok(None) => Ok(()),
            Ok(Some(stored)) => {
                Self::push_over_limit(&mut state, queue, stored, max_count, now);
                Ok(())
            }
            Err(LockGone) => Err(lock_lost(queue, lock)),
        }
    }

    /// Moves a locked message to the queue's dead-letter sub-queue.
    ///
    /// # Errors
    ///
    /// As for [`complete`](Self::complete).
    ///
    /// # Cancellation safety
    ///
    /// Not cancel safe once past any injected latency.
    pub async fn dead_letter(
        &self,
        queue: &str,
        lock: LockRef,
        reason: &str,
        description: &str,
    ) -> Result<(), TransportError> {
        self.before(Operation::Disposition, queue).await?;
        let now = Instant::now();
        let mut state = self.state();
        let entity = state.entity(queue)?;
        let stored = entity
            .remove_held(lock.sequence, lock.token, now)
            .map_err(|LockGone| lock_lost(queue, lock))?;
        Self::push_dead_letter(&mut state, queue, stored, reason, description, now);
        Ok(())
    }

    /// Renews the lock on a message; returns the new expiry.
    ///
    /// # Errors
    ///
    /// As for [`complete`](Self::complete).
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub async fn renew_lock(&self, queue: &str, lock: LockRef) -> Result<Instant, TransportError> {
        let renew = |e: &mut Entity, now| e.renew(lock.sequence, lock.token, now);
        self.settle(queue, Operation::Renew, renew, lock).await
    }

    /// Receives and removes up to `max` messages without locking them, waiting at most
    /// `wait` on an empty queue.
    ///
    /// # Errors
    ///
    /// [`TransportError::NotFound`] in strict mode; injected faults.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub async fn receive_and_delete(
        &self,
        queue: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<LockedMessage>, TransportError> {
        let locked = self.receive(queue, max, wait).await?;
        let now = Instant::now();
        let mut state = self.state();
        let entity = state.entity(queue)?;
        Ok(locked
            .into_iter()
            .filter(|m| entity.complete(m.sequence, m.lock_token, now).is_ok())
            .collect())
    }

    /// Finds a message held with `token` by its message id, for protocols that address
    /// locked messages by id.
    #[must_use]
    pub fn lock_by_message_id(
        &self,
        queue: &str,
        message_id: &str,
        token: Uuid,
    ) -> Option<LockRef> {
        let state = self.state();
        let sequence = state.entities.get(queue)?.sequence_of(message_id, token)?;
        Some(LockRef { sequence, token })
    }

    /// Removes and returns every message of `queue`, whatever its state (available,
    /// locked or delayed), oldest first: for saving what is left in an in-process broker
    /// before the process exits. Locks on them are lost.
    pub fn take_all(&self, queue: &str) -> Vec<Message> {
        let mut state = self.state();
        let Some(entity) = state.entities.get_mut(queue) else { return Vec::new() };
        entity.take_all().into_iter().map(|stored| stored.message).collect()
    }

    /// The ids of the messages of `queue` that are locked right now, oldest first: for
    /// checking that a consumer released what it held.
    #[must_use]
    pub fn locked_message_ids(&self, queue: &str) -> Vec<String> {
        let now = Instant::now();
        self.state().entities.get(queue).map(|e| e.locked_ids(now)).unwrap_or_default()
    }

    /// How many messages `queue` holds: available, locked and delayed.
    #[must_use]
    pub fn message_count(&self, queue: &str) -> usize {
        self.state().entities.get(queue).map_or(0, Entity::len)
    }

    /// How many messages `queue`'s dead-letter sub-queue holds.
    #[must_use]
    pub fn dead_letter_count(&self, queue: &str) -> usize {
        self.message_count(&Self::dead_letter_queue_name(queue))
    }

    /// The messages in `queue`, oldest first, without locking them.
    #[must_use]
    pub fn peek(&self, queue: &str) -> Vec<Message> {
        self.state()
            .entities
            .get(queue)
            .map(|e| e.iter().map(|s| s.message.clone()).collect())
            .unwrap_or_default()
    }

    /// The messages in `queue`'s dead-letter sub-queue, oldest first, without locking them.
    /// Each reason and description is a field of the [`DeadLetter`], not left among the
    /// message's properties, as with every transport.
    #[must_use]
    pub fn dead_letters(&self, queue: &str) -> Vec<DeadLetter> {
        let state = self.state();
        let Some(dlq) = state.entities.get(&Self::dead_letter_queue_name(queue)) else {
            return Vec::new();
        };
        dlq.iter()
            .filter_map(|stored| {
                let (reason, description) = stored.dead_letter.clone()?;
                // The reason and description are the dead letter's fields; like the other
                // transports, leave the bookkeeping properties that carry them out.
                let mut message = stored.message.clone();
                message.properties.remove(DEAD_LETTER_REASON_PROPERTY);
                message.properties.remove(DEAD_LETTER_DESCRIPTION_PROPERTY);
                Some(DeadLetter { message, reason, description })
            })
            .collect()
    }
}

#[async_trait]
impl MessageSink for InMemoryBroker {
    async fn send(&self, queue: &str, message: OutgoingMessage) -> Result<(), TransportError> {
        self.enqueue(queue, message, None).await.map(drop)
    }
}
