//! The session gate: which session may start its next message.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::deadlines::saturating_add;

/// A session held back until one of its messages comes back from the broker.
#[derive(Debug)]
struct Blocked {
    message_id: String,
    until: Instant,
}

/// Keeps each session's messages one after another, in order.
///
/// A session is *active* while one of its messages runs or is being settled. On a
/// transport without sessions a session is also *blocked* while one of its messages is
/// back at the broker (a retry, a lost lock, a failed settlement): only that message may
/// start it again, so later ones cannot overtake it. A block ends when the message
/// comes back and starts, or, if another consumer evidently took it, at a bound:
/// `6 × delay + 2 × wait` after the moment it was due back (transports round delays up:
/// RabbitMQ's buckets turn 5.1 s into 30 s).
#[derive(Debug)]
pub(super) struct SessionGate {
    /// The broker keeps session order itself: nothing is blocked here.
    broker_sessions: bool,
    wait: Duration,
    active: BTreeSet<String>,
    blocked: BTreeMap<String, Blocked>,
}

/// The sessions still waiting for a message when a run ended, handed to the next run
/// of the same updater so a restart does not let followers overtake a delayed head.
#[derive(Debug, Default)]
pub(super) struct Waiting(BTreeMap<String, Blocked>);

impl SessionGate {
    pub(super) fn new(broker_sessions: bool, wait: Duration, waiting: Waiting) -> Self {
        Self { broker_sessions, wait, active: BTreeSet::new(), blocked: waiting.0 }
    }

    /// The sessions that wait for a message back at the broker, for the next run.
    pub(super) fn into_waiting(self) -> Waiting {
        Waiting(self.blocked)
    }

    /// Whether `message_id` of `session` may start now.
    pub(super) fn may_start(&self, session: &str, message_id: &str) -> bool {
        !self.active.contains(session)
            && self.blocked.get(session).is_none_or(|b| b.message_id == message_id)
    }

    /// Whether `message_id` is the one its session waits for.
    pub(super) fn is_awaited(&self, session: &str, message_id: &str) -> bool {
        self.blocked.get(session).is_some_and(|b| b.message_id == message_id)
    }

    /// A message of `session` starts (or is held for a local delayed retry).
    pub(super) fn occupy(&mut self, session: &str) {
        self.blocked.remove(session);
        self.active.insert(session.to_owned());
    }

    /// The session's message was settled for good: the next one may start.
    pub(super) fn release(&mut self, session: &str) {
        self.active.remove(session);
    }

    /// The session's message `message_id` went back to the broker, due back at `due`
    /// after a retry delay of `delay`: only it may start the session again.
    pub(super) fn release_awaiting(
        &mut self,
        session: &str,
        message_id: &str,
        due: Instant,
        delay: Duration,
    ) {
        self.active.remove(session);
        if self.broker_sessions {
            return;
        }
        // A session already waiting for an earlier message keeps waiting for that one:
        // it is ahead of this one.
        if self.blocked.get(session).is_some_and(|b| b.message_id != message_id) {
            return;
        }
        let bound = delay.saturating_mul(6).saturating_add(self.wait.saturating_mul(2));
        let until = saturating_add(due.max(Instant::now()), bound);
        self.blocked
            .insert(session.to_owned(), Blocked { message_id: message_id.to_owned(), until });
    }

    /// Ends the blocks whose bound passed.
    pub(super) fn expire(&mut self, now: Instant) {
        self.blocked.retain(|_, blocked| blocked.until > now);
    }

    /// When the next block ends.
    pub(super) fn next_expiry(&self) -> Option<Instant> {
        self.blocked.values().map(|b| b.until).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_active_session_admits_nothing_until_released() {
        let mut gate = SessionGate::new(false, Duration::from_secs(1), Waiting::default());
        assert!(gate.may_start("s", "a"));
        gate.occupy("s");
        assert!(!gate.may_start("s", "b"));
        assert!(gate.may_start("t", "c"), "other sessions are free");
        gate.release("s");
        assert!(gate.may_start("s", "b"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_back_at_the_broker_is_awaited_until_it_returns_or_the_bound() {
        let mut gate = SessionGate::new(false, Duration::from_secs(1), Waiting::default());
        let now = Instant::now();
        gate.occupy("s");
        gate.release_awaiting("s", "a", now + Duration::from_secs(10), Duration::from_secs(5));
        assert!(!gate.may_start("s", "b"), "b must not overtake a");
        assert!(gate.may_start("s", "a"));
        assert!(gate.is_awaited("s", "a"));
        // Due back at 10 s, then 6 × 5 s + 2 × 1 s.
        assert_eq!(gate.next_expiry(), Some(now + Duration::from_secs(42)));
        gate.expire(now + Duration::from_secs(41));
        assert!(!gate.may_start("s", "b"));
        gate.expire(now + Duration::from_secs(42));
        assert!(gate.may_start("s", "b"), "another consumer took a: b goes on");
    }

    #[tokio::test(start_paused = true)]
    async fn the_returning_message_clears_the_block_when_it_starts() {
        let mut gate = SessionGate::new(false, Duration::from_secs(1), Waiting::default());
        gate.release_awaiting("s", "a", Instant::now(), Duration::ZERO);
        gate.occupy("s");
        assert!(!gate.is_awaited("s", "a"));
        gate.release("s");
        assert!(gate.may_start("s", "b"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_gate_keeps_the_waiting_sessions_of_the_last() {
        let mut gate = SessionGate::new(false, Duration::from_secs(1), Waiting::default());
        gate.occupy("s");
        gate.release_awaiting("s", "a", Instant::now(), Duration::from_secs(5));
        let next = SessionGate::new(false, Duration::from_secs(1), gate.into_waiting());
        assert!(!next.may_start("s", "b"));
        assert!(next.may_start("s", "a"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_keeps_waiting_for_its_earliest_message() {
        let mut gate = SessionGate::new(false, Duration::from_secs(1), Waiting::default());
        gate.release_awaiting("s", "head", Instant::now(), Duration::from_secs(20));
        gate.release_awaiting("s", "follower", Instant::now(), Duration::ZERO);
        assert!(gate.may_start("s", "head"));
        assert!(!gate.may_start("s", "follower"), "the follower went back too, behind the head");
    }

    #[tokio::test(start_paused = true)]
    async fn broker_sessions_are_never_blocked_here() {
        let mut gate = SessionGate::new(true, Duration::from_secs(1), Waiting::default());
        gate.occupy("s");
        gate.release_awaiting("s", "a", Instant::now(), Duration::from_secs(5));
        assert!(gate.may_start("s", "b"));
        assert_eq!(gate.next_expiry(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn an_absurd_delay_saturates() {
        let mut gate = SessionGate::new(false, Duration::MAX, Waiting::default());
        gate.release_awaiting("s", "a", Instant::now(), Duration::MAX);
        assert!(gate.next_expiry().is_some());
    }
}
