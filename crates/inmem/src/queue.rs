//! One queue (or dead-letter sub-queue): messages in sequence order and the rules for
//! handing them out. Everything here takes `now` explicitly and never blocks.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use steward_core::Message;
use steward_core::transport::later;
use tokio::sync::Notify;
use tokio::time::Instant;
use uuid::Uuid;

/// Settings of one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueOptions {
    /// How long a received message stays locked to its consumer.
    pub lock_duration: Duration,
    /// After this many deliveries, the next abandon or lock expiry moves the message to
    /// the dead-letter queue with reason `MaxDeliveryCountExceeded`. `None`: no limit.
    pub max_delivery_count: Option<u32>,
}

impl Default for QueueOptions {
    /// A 60 s lock (Service Bus's default) and no delivery limit.
    fn default() -> Self {
        Self { lock_duration: Duration::from_secs(60), max_delivery_count: None }
    }
}

impl QueueOptions {
    /// Sets the lock duration.
    #[must_use]
    pub fn with_lock_duration(mut self, lock_duration: Duration) -> Self {
        self.lock_duration = lock_duration;
        self
    }

    /// Sets the maximum delivery count.
    #[must_use]
    pub fn with_max_delivery_count(mut self, max: u32) -> Self {
        self.max_delivery_count = Some(max);
        self
    }
}

/// Why a message is in a dead-letter queue: its reason and description.
pub(crate) type DeadLetterCause = (String, String);

/// A message as stored, with its broker-side state.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub(crate) message: Message,
    pub(crate) sequence: u64,
    pub(crate) visible_at: Instant,
    pub(crate) lock: Option<Lock>,
    pub(crate) dead_letter: Option<DeadLetterCause>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Lock {
    pub(crate) token: Uuid,
    pub(crate) until: Instant,
    /// The connection generation that took the lock; a disconnect invalidates it.
    pub(crate) generation: u64,
}

/// A message handed out under a lock.
#[derive(Debug, Clone)]
pub struct LockedMessage {
    /// The message, with its delivery count already incremented.
    pub message: Message,
    /// The queue's sequence number of the message.
    pub sequence: u64,
    /// The lock token; settlements must present it.
    pub lock_token: Uuid,
    /// When the lock expires.
    pub locked_until: Instant,
}

/// A settlement was refused because the lock is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LockGone;

#[derive(Debug)]
pub(crate) struct Entity {
    pub(crate) options: QueueOptions,
    messages: BTreeMap<u64, Stored>,
    /// Messages that may be available now, in sequence order. A superset: entries are
    /// checked (and dropped when stale) as `take` meets them, so no operation has to
    /// walk the whole queue.
    ready: BTreeSet<u64>,
    /// When a message may next become available (its delay ending or its lock
    /// expiring), by time and sequence; stale entries are dropped as they come due.
    timers: BTreeSet<(Instant, u64)>,
    /// The sequences of each session's messages, so a session's head is found at once.
    session_index: BTreeMap<String, BTreeSet<u64>>,
    /// The message holding each lock token.
    tokens: HashMap<Uuid, u64>,
    next_sequence: u64,
    pub(crate) generation: u64,
    pub(crate) notify: Arc<Notify>,
    /// Whether messages with a session id go out one at a time per session.
    sessions: bool,
}

impl Entity {
    pub(crate) fn new(options: QueueOptions) -> Self {
        Self {
            options,
            messages: BTreeMap::new(),
            ready: BTreeSet::new(),
            timers: BTreeSet::new(),
            session_index: BTreeMap::new(),
            tokens: HashMap::new(),
            next_sequence: 1,
            generation: 0,
            notify: Arc::new(Notify::new()),
            sessions: true,
        }
    }

    /// Sets whether session ids order delivery (they do by default).
    pub(crate) fn with_sessions(mut self, sessions: bool) -> Self {
        self.sessions = sessions;
        self
    }

    pub(crate) fn len(&self) -> usize {
        self.messages.len()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Stored> {
        self.messages.values()
    }

    /// The session that gates `message`'s delivery, if sessions are kept.
    fn gating_session<'m>(&self, message: &'m Message) -> Option<&'m str> {
        message.session_id.as_deref().filter(|_| self.sessions)
    }

    /// Appends a message, visible from `visible_at`; returns its sequence number.
    pub(crate) fn push(
        &mut self,
        mut message: Message,
        visible_at: Instant,
        dead_letter: Option<DeadLetterCause>,
    ) -> u64 {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        if message.enqueued_at.is_none() {
            message.enqueued_at = Some(SystemTime::now());
        }
        if let Some(session) = self.gating_session(&message) {
            self.session_index.entry(session.to_owned()).or_default().insert(sequence);
        }
        self.messages
            .insert(sequence, Stored { message, sequence, visible_at, lock: None, dead_letter });
        self.ready.insert(sequence);
        self.timers.insert((visible_at, sequence));
        self.notify.notify_waiters();
        sequence
    }

    /// Removes a message and its index entries; the next message of its session, if
    /// any, becomes a candidate for delivery.
    fn remove(&mut self, sequence: u64) -> Option<Stored> {
        let stored = self.messages.remove(&sequence)?;
        self.ready.remove(&sequence);
        self.timers.remove(&(stored.visible_at, sequence));
        if let Some(lock) = stored.lock {
            self.tokens.remove(&lock.token);
            self.timers.remove(&(lock.until, sequence));
        }
        if let Some(session) = stored.message.session_id.as_deref().filter(|_| self.sessions) {
            if let Some(members) = self.session_index.get_mut(session) {
                members.remove(&sequence);
                match members.first() {
                    Some(&head) => {
                        self.ready.insert(head);
                    }
                    None => {
                        self.session_index.remove(session);
                    }
                }
            }
        }
        Some(stored)
    }

    fn lock_is_held(&self, lock: &Lock, now: Instant) -> bool {
        lock.until > now && lock.generation == self.generation
    }

    /// Whether the stored message is its session's oldest (always, without a session).
    fn is_head(&self, stored: &Stored) -> bool {
        match self.gating_session(&stored.message) {
            Some(session) => self
                .session_index
                .get(session)
                .and_then(BTreeSet::first)
                .is_none_or(|&head| head == stored.sequence),
            None => true,
        }
    }

    /// Locks up to `max` available messages for `generation`. Messages due for the
    /// dead-letter queue because of their delivery count are returned in the second
    /// `Vec` instead.
    ///
    /// A message is available when it is visible, not locked, and — if it has a session —
    /// the oldest message of its session, so a session delivers one message at a time,
    /// in order, and a message waiting out a delay blocks its session.
    pub(crate) fn take(
        &mut self,
        max: usize,
        now: Instant,
        generation: u64,
    ) -> (Vec<LockedMessage>, Vec<Stored>) {
        // Whatever came due is a candidate again.
        while let Some(&(at, sequence)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            if self.messages.contains_key(&sequence) {
                self.ready.insert(sequence);
            }
        }
        let mut taken = Vec::new();
        let mut expired_overflow = Vec::new();
        let mut cursor = 0;
        while taken.len() < max {
            let Some(&sequence) = self.ready.range(cursor..).next() else { break };
            cursor = sequence + 1;
            let Some(stored) = self.messages.get(&sequence) else {
                self.ready.remove(&sequence);
                continue;
            };
            let held = stored.lock.is_some_and(|lock| self.lock_is_held(&lock, now));
            // Not available now: a due timer, or a session head change, brings it back.
            if held || stored.visible_at > now || !self.is_head(stored) {
                self.ready.remove(&sequence);
                continue;
            }
            if self
                .options
                .max_delivery_count
                .is_some_and(|max_count| stored.message.delivery_count >= max_count)
            {
                // Delivered too often: off to the dead-letter queue, and the next
                // message of the session (if any) becomes its head next time.
                expired_overflow.push(sequence);
                continue;
            }
            let lock = Lock {
                token: Uuid::new_v4(),
                until: later(now, self.options.lock_duration),
                generation,
            };
            let Some(stored) = self.messages.get_mut(&sequence) else { continue };
            stored.message.delivery_count += 1;
            if let Some(old) = stored.lock.replace(lock) {
                self.tokens.remove(&old.token);
            }
            taken.push(LockedMessage {
                message: stored.message.clone(),
                sequence,
                lock_token: lock.token,
                locked_until: lock.until,
            });
            self.tokens.insert(lock.token, sequence);
            self.ready.remove(&sequence);
            self.timers.insert((lock.until, sequence));
        }
        let overflow: Vec<Stored> =
            expired_overflow.into_iter().filter_map(|sequence| self.remove(sequence)).collect();
        if !overflow.is_empty() {
            self.notify.notify_waiters();
        }
        (taken, overflow)
    }

    /// The earliest future moment at which a message may become available: a delay
    /// ending or a lock expiring. It may be early (a renewed lock, a settled message),
    /// never late.
    pub(crate) fn next_change(&self, now: Instant) -> Option<Instant> {
        self.timers
            .range((Bound::Excluded((now, u64::MAX)), Bound::Unbounded))
            .next()
            .map(|&(at, _)| at)
    }

    fn held_mut(
        &mut self,
        sequence: u64,
        token: Uuid,
        now: Instant,
    ) -> Result<&mut Stored, LockGone> {
        let generation = self.generation;
        let stored = self.messages.get_mut(&sequence).ok_or(LockGone)?;
        match stored.lock {
            Some(lock)
                if lock.token == token && lock.until > now && lock.generation == generation =>
            {
                Ok(stored)
            }
            _ => Err(LockGone),
        }
    }

    /// The sequence number of the message with `message_id`, if it is held with `token`.
    pub(crate) fn sequence_of(&self, message_id: &str, token: Uuid) -> Option<u64> {
        let sequence = *self.tokens.get(&token)?;
        let stored = self.messages.get(&sequence)?;
        (stored.message.id == message_id && stored.lock.is_some_and(|l| l.token == token))
            .then_some(sequence)
    }

    pub(crate) fn complete(
        &mut self,
        sequence: u64,
        token: Uuid,
        now: Instant,
    ) -> Result<Stored, LockGone> {
        self.held_mut(sequence, token, now)?;
        let stored = self.remove(sequence).ok_or(LockGone)?;
        self.notify.notify_waiters();
        Ok(stored)
    }

    /// Releases the lock, making the message visible again after `delay`. Returns the
    /// message instead when it has used up its deliveries and must be dead-lettered.
    pub(crate) fn abandon(
        &mut self,
        sequence: u64,
        token: Uuid,
        delay: Option<Duration>,
        now: Instant,
    ) -> Result<Option<Stored>, LockGone> {
        let max = self.options.max_delivery_count;
        let stored = self.held_mut(sequence, token, now)?;
        if max.is_some_and(|max| stored.message.delivery_count >= max) {
            let removed = self.remove(sequence);
            self.notify.notify_waiters();
            return Ok(removed);
        }
        let released = stored.lock.take();
        let visible_at = later(now, delay.unwrap_or_default());
        stored.visible_at = visible_at;
        if let Some(lock) = released {
            self.timers.remove(&(lock.until, sequence));
        }
        self.tokens.remove(&token);
        self.ready.insert(sequence);
        self.timers.insert((visible_at, sequence));
        self.notify.notify_waiters();
        Ok(None)
    }

    pub(crate) fn renew(
        &mut self,
        sequence: u64,
        token: Uuid,
        now: Instant,
    ) -> Result<Instant, LockGone> {
        let duration = self.options.lock_duration;
        let stored = self.held_mut(sequence, token, now)?;
        let until = later(now, duration);
        let previous = stored.lock.as_mut().map(|lock| std::mem::replace(&mut lock.until, until));
        if let Some(previous) = previous {
            self.timers.remove(&(previous, sequence));
        }
        self.timers.insert((until, sequence));
        Ok(until)
    }

    /// Removes every message, in sequence order.
    pub(crate) fn take_all(&mut self) -> Vec<Stored> {
        let taken = std::mem::take(&mut self.messages).into_values().collect();
        self.ready.clear();
        self.timers.clear();
        self.session_index.clear();
        self.tokens.clear();
        self.notify.notify_waiters();
        taken
    }

    /// Drops every lock; each message is a candidate for delivery again.
    fn release_all_locks(&mut self) {
        for stored in self.messages.values_mut() {
            if stored.lock.take().is_some() {
                self.ready.insert(stored.sequence);
            }
        }
        self.tokens.clear();
        self.notify.notify_waiters();
    }

    /// Invalidates every lock and every source of the current connection generation.
    pub(crate) fn disconnect(&mut self) {
        self.generation += 1;
        self.release_all_locks();
    }

    /// Ends every lock now, as if each had expired.
    pub(crate) fn expire_locks(&mut self) {
        self.release_all_locks();
    }

    /// The ids of the messages locked at `now`, in sequence order.
    pub(crate) fn locked_ids(&self, now: Instant) -> Vec<String> {
        let mut locked: Vec<(u64, String)> = self
            .tokens
            .values()
            .filter_map(|sequence| self.messages.get(sequence))
            .filter(|s| s.lock.is_some_and(|lock| self.lock_is_held(&lock, now)))
            .map(|s| (s.sequence, s.message.id.clone()))
            .collect();
        locked.sort_unstable_by_key(|(sequence, _)| *sequence);
        locked.into_iter().map(|(_, id)| id).collect()
    }

    /// Removes the messages not locked at `now` that `chosen` picks, in sequence order.
    pub(crate) fn remove_unlocked(
        &mut self,
        now: Instant,
        mut chosen: impl FnMut(&Stored) -> bool,
    ) -> Vec<Stored> {
        let picked: Vec<u64> = self
            .messages
            .values()
            .filter(|s| !s.lock.is_some_and(|lock| self.lock_is_held(&lock, now)))
            .filter(|s| chosen(s))
            .map(|s| s.sequence)
            .collect();
        picked.into_iter().filter_map(|sequence| self.remove(sequence)).collect()
    }

    /// Removes a held message for dead-lettering.
    pub(crate) fn remove_held(
        &mut self,
        sequence: u64,
        token: Uuid,
        now: Instant,
    ) -> Result<Stored, LockGone> {
        self.complete(sequence, token, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: &str, session: Option<&str>) -> Message {
        let mut message = Message::new(id, id.to_owned()).with_delivery_count(0);
        message.session_id = session.map(str::to_owned);
        message
    }

    fn ids(locked: &[LockedMessage]) -> Vec<&str> {
        locked.iter().map(|l| l.message.id.as_str()).collect()
    }

    /// An entity with default options holding `(id, session)` messages pushed at `now`.
    fn entity_with(messages: &[(&str, &str)], now: Instant) -> Entity {
        let mut entity = Entity::new(QueueOptions::default());
        for (id, session) in messages {
            entity.push(message(id, Some(session)), now, None);
        }
        entity
    }

    #[tokio::test(start_paused = true)]
    async fn session_head_blocks_later_messages_until_settled() {
        let now = Instant::now();
        let mut entity = entity_with(&[("a1", "a"), ("a2", "a"), ("b1", "b")], now);
        let (first, _) = entity.take(10, now, 0);
        assert_eq!(ids(&first), ["a1", "b1"]);
        let (none, _) = entity.take(10, now, 0);
        assert!(none.is_empty(), "both sessions are locked");
        entity.complete(first[0].sequence, first[0].lock_token, now).unwrap();
        let (next, _) = entity.take(10, now, 0);
        assert_eq!(ids(&next), ["a2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn delayed_message_keeps_its_session_blocked() {
        let now = Instant::now();
        let mut entity = entity_with(&[("a1", "a"), ("a2", "a")], now);
        let (first, _) = entity.take(10, now, 0);
        let delay = Duration::from_secs(30);
        entity.abandon(first[0].sequence, first[0].lock_token, Some(delay), now).unwrap();
        let (blocked, _) = entity.take(10, now + Duration::from_secs(29), 0);
        assert!(blocked.is_empty(), "a2 must wait for the delayed a1");
        assert_eq!(entity.next_change(now), Some(now + delay));
        let (again, _) = entity.take(10, now + delay, 0);
        assert_eq!(ids(&again), ["a1"]);
        assert_eq!(again[0].message.delivery_count, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn expired_lock_makes_message_available_and_refuses_old_token() {
        let now = Instant::now();
        let lock = Duration::from_secs(5);
        let mut entity = Entity::new(QueueOptions::default().with_lock_duration(lock));
        entity.push(message("m", None), now, None);
        let (first, _) = entity.take(1, now, 0);
        assert_eq!(first[0].locked_until, now + lock);
        assert!(entity.take(1, now + lock - Duration::from_millis(1), 0).0.is_empty());
        let (second, _) = entity.take(1, now + lock, 0);
        assert_eq!(second[0].message.delivery_count, 2);
        let stale = entity.complete(first[0].sequence, first[0].lock_token, now + lock);
        assert_eq!(stale.err(), Some(LockGone));
        assert!(entity.renew(second[0].sequence, second[0].lock_token, now + lock).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn over_delivery_limit_moves_out_instead_of_delivering() {
        let now = Instant::now();
        let options = QueueOptions::default().with_max_delivery_count(2);
        let mut entity = Entity::new(options);
        entity.push(message("m", None), now, None);
        for _ in 0..2 {
            let (got, _) = entity.take(1, now, 0);
            entity.abandon(got[0].sequence, got[0].lock_token, None, now).ok();
        }
        assert_eq!(entity.len(), 0, "the second abandon hit the limit");
    }

    #[tokio::test(start_paused = true)]
    async fn lock_expiry_past_delivery_limit_overflows_on_next_take() {
        let now = Instant::now();
        let lock = Duration::from_secs(1);
        let options = QueueOptions::default().with_lock_duration(lock).with_max_delivery_count(1);
        let mut entity = Entity::new(options);
        entity.push(message("m", None), now, None);
        let (got, _) = entity.take(1, now, 0);
        assert_eq!(got.len(), 1);
        let (again, overflow) = entity.take(1, now + lock, 0);
        assert!(again.is_empty());
        assert_eq!(overflow.len(), 1);
        assert_eq!(overflow[0].message.id, "m");
    }

    #[tokio::test(start_paused = true)]
    async fn next_head_of_a_session_follows_an_overflowed_head() {
        let now = Instant::now();
        let lock = Duration::from_secs(1);
        let options = QueueOptions::default().with_lock_duration(lock).with_max_delivery_count(1);
        let mut entity = Entity::new(options);
        for (id, session) in [("a1", "a"), ("a2", "a")] {
            entity.push(message(id, Some(session)), now, None);
        }
        assert_eq!(ids(&entity.take(10, now, 0).0), ["a1"]);
        let (none, overflow) = entity.take(10, now + lock, 0);
        assert!(none.is_empty(), "a2 becomes the head only on the next take");
        assert_eq!(overflow[0].message.id, "a1");
        assert_eq!(ids(&entity.take(10, now + lock, 0).0), ["a2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn renewed_lock_outlasts_its_first_expiry_and_settled_messages_leave_no_wakeups() {
        let now = Instant::now();
        let lock = Duration::from_secs(10);
        let mut entity = Entity::new(QueueOptions::default().with_lock_duration(lock));
        entity.push(message("m", None), now, None);
        entity.push(message("n", None), now, None);
        let (got, _) = entity.take(2, now, 0);
        let renewed_at = now + Duration::from_secs(5);
        let until = entity.renew(got[0].sequence, got[0].lock_token, renewed_at).unwrap();
        assert_eq!(entity.next_change(renewed_at), Some(now + lock), "n's lock ends first");
        entity.complete(got[1].sequence, got[1].lock_token, renewed_at).unwrap();
        assert_eq!(entity.next_change(renewed_at), Some(until), "only m's renewed lock is left");
        assert!(entity.take(2, now + lock, 0).0.is_empty(), "m is still held");
        assert_eq!(ids(&entity.take(2, until, 0).0), ["m"]);
    }

    #[tokio::test(start_paused = true)]
    async fn message_found_by_id_only_with_its_current_token() {
        let now = Instant::now();
        let lock = Duration::from_secs(1);
        let mut entity = Entity::new(QueueOptions::default().with_lock_duration(lock));
        entity.push(message("m", None), now, None);
        let (first, _) = entity.take(1, now, 0);
        assert_eq!(entity.sequence_of("m", first[0].lock_token), Some(first[0].sequence));
        assert_eq!(entity.sequence_of("other", first[0].lock_token), None);
        let (second, _) = entity.take(1, now + lock, 0);
        assert_eq!(entity.sequence_of("m", first[0].lock_token), None, "relocked");
        assert_eq!(entity.sequence_of("m", second[0].lock_token), Some(second[0].sequence));
        assert_eq!(entity.locked_ids(now + lock), ["m"]);
    }

    #[tokio::test(start_paused = true)]
    async fn without_sessions_one_session_is_handed_out_at_once() {
        let now = Instant::now();
        let mut entity = Entity::new(QueueOptions::default()).with_sessions(false);
        for id in ["a1", "a2", "a3"] {
            entity.push(message(id, Some("a")), now, None);
        }
        assert_eq!(ids(&entity.take(10, now, 0).0), ["a1", "a2", "a3"]);
    }

    #[tokio::test(start_paused = true)]
    async fn disconnect_releases_locks_and_refuses_old_generation() {
        let now = Instant::now();
        let mut entity = Entity::new(QueueOptions::default());
        entity.push(message("m", None), now, None);
        let (got, _) = entity.take(1, now, 0);
        entity.disconnect();
        assert_eq!(entity.complete(got[0].sequence, got[0].lock_token, now).err(), Some(LockGone));
        let (again, _) = entity.take(1, now, entity.generation);
        assert_eq!(ids(&again), ["m"]);
    }
}
