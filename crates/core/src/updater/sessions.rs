//! The session gate: which session may start its next message.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::deadlines::saturating_add;

/// A session held back until one of its messages comes back from the broker.
#[derive(Debug)]
struct Blocked {
    message_id: String,
    /// Its place in the session: the message that held the session when it went back
    /// ranks 0 (every other message of the session was behind it); others rank by the
    /// key of the delivery that went back (arrival order).
    rank: u64,
    until: Instant,
}

/// Keeps each session's messages one after another, in order.
///
/// A session is *active* while one of its messages runs, is held for a local delayed
/// retry, or is being settled: that message is its *occupant*, and only the occupant's
/// own settlement frees it (another delivery of the session settling, a follower's lost
/// lock, or a message dead-lettered for its delivery count leave it occupied). On a
/// transport without sessions a session is also *blocked* while one of its messages is
/// back at the broker (a retry, a lost lock, a failed settlement): only that message may
/// start it again, so later ones cannot overtake it. When several went back, the
/// session waits for the earliest: the occupant, else the first to arrive. A block ends
/// when the message comes back and starts, when it is settled for good, or, if another
/// consumer evidently took it, at a bound: `6 × delay + 2 × wait` after the moment it
/// was due back (transports round delays up: RabbitMQ's buckets turn 5.1 s into 30 s).
#[derive(Debug)]
pub(super) struct SessionGate {
    /// The broker keeps session order itself: nothing is blocked here.
    broker_sessions: bool,
    wait: Duration,
    /// The occupant of each active session: the key of its delivery.
    active: BTreeMap<String, u64>,
    blocked: BTreeMap<String, Blocked>,
}

/// The sessions still waiting for a message when a run ended, handed to the next run
/// of the same updater so a restart does not let followers overtake a delayed head;
/// with the next delivery key, so ranks stay comparable across runs.
#[derive(Debug, Default)]
pub(super) struct Waiting {
    blocked: BTreeMap<String, Blocked>,
    pub(super) next_key: u64,
}

impl SessionGate {
    /// A gate for a new run, keeping the blocks of the last one. Their bounds start
    /// afresh (see [`Self::resume`]): the time between runs, not receiving, is no
    /// evidence that another consumer took a message.
    pub(super) fn new(broker_sessions: bool, wait: Duration, waiting: Waiting) -> Self {
        let mut gate =
            Self { broker_sessions, wait, active: BTreeMap::new(), blocked: waiting.blocked };
        gate.resume(Instant::now());
        gate
    }

    /// Receiving resumes at `now` (a new run, or the circuit breaker closing): every
    /// block lasts at least `2 × wait` more, so a message due back while nothing was
    /// received can still be received before its followers run.
    pub(super) fn resume(&mut self, now: Instant) {
        let until = saturating_add(now, self.wait.saturating_mul(2));
        for blocked in self.blocked.values_mut() {
            blocked.until = blocked.until.max(until);
        }
    }

    /// The sessions that wait for a message back at the broker, for the next run, whose
    /// delivery keys start at `next_key`.
    pub(super) fn into_waiting(self, next_key: u64) -> Waiting {
        Waiting { blocked: self.blocked, next_key }
    }

    /// Whether `message_id` of `session`, at `rank` in its session's order, may start
    /// now: the session is free, and it is the message the session waits for, or ahead
    /// of it.
    pub(super) fn may_start(&self, session: &str, message_id: &str, rank: u64) -> bool {
        !self.active.contains_key(session)
            && self.blocked.get(session).is_none_or(|b| b.message_id == message_id || rank < b.rank)
    }

    /// The rank of the message `session` waits for, if it waits for `message_id`.
    pub(super) fn awaited_rank(&self, session: &str, message_id: &str) -> Option<u64> {
        self.blocked.get(session).filter(|b| b.message_id == message_id).map(|b| b.rank)
    }

    /// Whether `message_id` is the one its session waits for.
    pub(super) fn is_awaited(&self, session: &str, message_id: &str) -> bool {
        self.blocked.get(session).is_some_and(|b| b.message_id == message_id)
    }

    /// The delivery `key` of `session` starts (or is held for a local delayed retry):
    /// it occupies the session.
    pub(super) fn occupy(&mut self, session: &str, key: u64) {
        self.blocked.remove(session);
        self.active.insert(session.to_owned(), key);
    }

    /// Whether delivery `key` occupies `session`.
    fn is_occupant(&self, session: &str, key: u64) -> bool {
        self.active.get(session) == Some(&key)
    }

    /// Delivery `key` of `message_id` was settled for good: if it occupied the session,
    /// the next message may start; if the session waited for it, it waits no more.
    pub(super) fn release(&mut self, session: &str, key: u64, message_id: &str) {
        if self.is_occupant(session, key) {
            self.active.remove(session);
        }
        if self.is_awaited(session, message_id) {
            self.blocked.remove(session);
        }
    }

    /// Delivery `key` of `message_id`, at `rank` in its session's order, went back to
    /// the broker, due back at `due` after a retry delay of `delay`: if it is the
    /// earliest of its session back there, no message behind it may start until it does.
    pub(super) fn release_awaiting(
        &mut self,
        session: &str,
        (key, rank): (u64, u64),
        message_id: &str,
        due: Instant,
        delay: Duration,
    ) {
        let occupant = self.is_occupant(session, key);
        if occupant {
            self.active.remove(session);
        }
        if self.broker_sessions {
            return;
        }
        let rank = if occupant { 0 } else { rank };
        // A session already waiting for an earlier message keeps waiting for that one.
        if self.blocked.get(session).is_some_and(|b| b.message_id != message_id && b.rank <= rank) {
            return;
        }
        let bound = delay.saturating_mul(6).saturating_add(self.wait.saturating_mul(2));
        let until = saturating_add(due.max(Instant::now()), bound);
        self.blocked
            .insert(session.to_owned(), Blocked { message_id: message_id.to_owned(), rank, until });
    }

    /// Ends the blocks whose bound passed.
    pub(super) fn expire(&mut self, now: Instant) {
        self.blocked.retain(|_, blocked| blocked.until > now);
    }

    /// Ends the blocks whose bound passed by `now` and whose message is not `present`
    /// (received and waiting to start).
    pub(super) fn expire_absent(&mut self, now: Instant, present: impl Fn(&str) -> bool) {
        self.blocked.retain(|_, blocked| blocked.until > now || present(&blocked.message_id));
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
        assert!(gate.may_start("s", "a", u64::MAX));
        gate.occupy("s", 1);
        assert!(!gate.may_start("s", "b", u64::MAX));
        assert!(gate.may_start("t", "c", u64::MAX), "other sessions are free");
        gate.release("s", 1, "a");
        assert!(gate.may_start("s", "b", u64::MAX));
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_back_at_the_broker_is_awaited_until_it_returns_or_the_bound() {
        let mut gate = SessionGate::new(false, Duration::from_secs(1), Waiting::default());
        let now = Instant::now();
        gate.occupy("s", 1);
        gate.release_awaiting(
            "s",
            (1, 1),
            "a",
            now + Duration::from_secs(10),
            Duration::from_secs(5),
        );
        assert!(!gate.may_start("s", "b", u64::MAX), "b must not overtake a");
        assert!(gate.may_start("s", "a", u64::MAX));
        assert!(gate.is_awaited("s", "a"));
        // Due back at 10 s, then 6 × 5 s + 2 × 1 s.
        assert_eq!(gate.next_expiry(), Some(now + Duration::from_secs(42)));
        gate.expire(now + Duration::from_secs(41));
        assert!(!gate.may_start("s", "b", u64::MAX));
        gate.expire(now + Duration::from_secs(42));
        assert!(gate.may_start("s", "b", u64::MAX), "another consumer took a: b goes on");
    }

    #[tokio::test(start_paused = true)]
    async fn the_returning_message_clears_the_block_when_it_starts() {
        let mut gate = SessionGate::new(false, Duration::from_secs(1), Waiting::default());
        gate.release_awaiting("s", (1, 1), "a", Instant::now(), Duration::ZERO);
        gate.occupy("s", 2);
        assert!(!gate.is_awaited("s", "a"));
        gate.release("s", 2, "a");
        assert!(gate.may_start("s", "b", u64::MAX));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_gate_keeps_the_waiting_sessions_of_the_last() {
        let mut gate = SessionGate::new(false, Duration::from_secs(1), Waiting::default());
        gate.occupy("s", 1);
        gate.release_awaiting("s", (1, 1), "a", Instant::now(), Duration::from_secs(5));
        let next = SessionGate::new(false, Duration::from_secs(1), gate.into_waiting(2));
        assert!(!next.may_start("s", "b", u64::MAX));
        assert!(next.may_start("s", "a", u64::MAX));
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_keeps_waiting_for_its_earliest_message() {
        let mut gate = SessionGate::new(false, Duration::from_secs(1), Waiting::default());
        gate.release_awaiting("s", (1, 1), "head", Instant::now(), Duration::from_secs(20));
        gate.release_awaiting("s", (2, 2), "follower", Instant::now(), Duration::ZERO);
        assert!(gate.may_start("s", "head", u64::MAX));
        assert!(
            !gate.may_start("s", "follower", u64::MAX),
            "the follower went back too, behind the head"
        );
    }

    /// Ensures that only the occupant's own settlement frees a session: a follower whose
    /// lock is lost, another delivery of the session, or a message dead-lettered for its
    /// delivery count do not let a third message run beside the occupant.
    #[tokio::test(start_paused = true)]
    async fn only_the_occupant_frees_its_session() {
        let mut gate = SessionGate::new(false, Duration::from_secs(1), Waiting::default());
        gate.occupy("s", 1);
        gate.release("s", 7, "too-often");
        assert!(!gate.may_start("s", "b", u64::MAX), "a dead-letter of another message freed it");
        gate.release_awaiting("s", (3, 3), "follower", Instant::now(), Duration::ZERO);
        assert!(!gate.may_start("s", "follower", u64::MAX), "the occupant still runs");
        gate.release("s", 1, "head");
        assert!(gate.may_start("s", "follower", u64::MAX));
        assert!(!gate.may_start("s", "later", u64::MAX), "the follower went back: it goes first");
    }

    /// Ensures that when the occupant and a follower both go back, the session waits
    /// for the occupant, whichever settles first.
    #[tokio::test(start_paused = true)]
    async fn the_occupant_goes_back_ahead_of_its_followers() {
        let mut gate = SessionGate::new(false, Duration::from_secs(1), Waiting::default());
        gate.occupy("s", 5);
        gate.release_awaiting("s", (6, 6), "follower", Instant::now(), Duration::ZERO);
        gate.release_awaiting("s", (5, 5), "head", Instant::now(), Duration::ZERO);
        assert!(gate.may_start("s", "head", u64::MAX));
        assert!(!gate.may_start("s", "follower", u64::MAX));
        // Followers going back in any order: the earliest arrival is awaited.
        let mut gate = SessionGate::new(false, Duration::from_secs(1), Waiting::default());
        gate.release_awaiting("s", (9, 9), "second", Instant::now(), Duration::ZERO);
        gate.release_awaiting("s", (8, 8), "first", Instant::now(), Duration::ZERO);
        assert!(gate.may_start("s", "first", u64::MAX));
        assert!(!gate.may_start("s", "second", u64::MAX));
    }

    /// Ensures that a message the session waits for, settled for good (dead-lettered
    /// for its delivery count), ends the wait.
    #[tokio::test(start_paused = true)]
    async fn an_awaited_message_settled_for_good_ends_the_wait() {
        let mut gate = SessionGate::new(false, Duration::from_secs(1), Waiting::default());
        gate.release_awaiting("s", (1, 1), "head", Instant::now(), Duration::from_secs(5));
        gate.release("s", 2, "head");
        assert!(gate.may_start("s", "follower", u64::MAX));
    }

    /// Ensures that time spent not receiving (between runs, or with the breaker open)
    /// does not end a block: its bound restarts when receiving resumes.
    #[tokio::test(start_paused = true)]
    async fn a_block_outlasts_a_pause_in_receiving() {
        let wait = Duration::from_secs(1);
        let mut gate = SessionGate::new(false, wait, Waiting::default());
        let start = Instant::now();
        gate.occupy("s", 1);
        gate.release_awaiting("s", (1, 1), "head", start, Duration::ZERO);
        assert_eq!(gate.next_expiry(), Some(start + 2 * wait));
        tokio::time::advance(Duration::from_secs(30)).await;
        let next = SessionGate::new(false, wait, gate.into_waiting(2));
        assert_eq!(next.next_expiry(), Some(Instant::now() + 2 * wait));
        assert!(!next.may_start("s", "follower", u64::MAX));
        let mut next = next;
        tokio::time::advance(Duration::from_secs(30)).await;
        next.resume(Instant::now());
        next.expire(Instant::now());
        assert!(!next.may_start("s", "follower", u64::MAX));
    }

    #[tokio::test(start_paused = true)]
    async fn broker_sessions_are_never_blocked_here() {
        let mut gate = SessionGate::new(true, Duration::from_secs(1), Waiting::default());
        gate.occupy("s", 1);
        gate.release_awaiting("s", (1, 1), "a", Instant::now(), Duration::from_secs(5));
        assert!(gate.may_start("s", "b", u64::MAX));
        assert_eq!(gate.next_expiry(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn an_absurd_delay_saturates() {
        let mut gate = SessionGate::new(false, Duration::MAX, Waiting::default());
        gate.release_awaiting("s", (1, 1), "a", Instant::now(), Duration::MAX);
        assert!(gate.next_expiry().is_some());
    }
}
