//! The session gate: which session may start its next message.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::deadlines::saturating_add;
use crate::delivery::LOCK_REPORT_SLACK;

/// A message its session waits for: it is back at the broker.
#[derive(Debug)]
struct Awaited {
    message_id: String,
    /// For a message that never started in this run: its arrival rank (the held key),
    /// so earlier messages of the session are not held back by it. `None` for one that
    /// ran (it was the session's head), or one handed over from the last run: it goes
    /// before every message held now.
    rank: Option<u64>,
    /// When it is due back at the broker (at the end of its delay).
    due: Instant,
    until: Instant,
    /// A copy of it is held here again (redelivered): the wait for it never expires,
    /// it only ends when that copy starts or is settled.
    returned: bool,
}

/// Keeps each session's messages one after another, in order.
///
/// A session is *active* while one of its messages runs, is held for a local delayed
/// retry, or is being settled; only that message (its *occupant*) frees it. On a
/// transport without sessions a session also *waits* while messages of it are back at
/// the broker (a retry, a lost lock, a failed settlement), in their order: the first
/// of them must start before any later message of the session. A message that never
/// started (it lost its lock while parked) holds back only the messages that arrived
/// after it. A wait ends when the message comes back and starts, when it is settled
/// for good, or, if another consumer evidently took it, at a bound:
/// `6 × delay + 2 × wait + LOCK_REPORT_SLACK` after the moment it was due back
/// (transports round delays up: RabbitMQ's buckets turn 5.1 s into 30 s; a failed
/// settlement is due back at the lock expiry the transport reported, which may be up
/// to `2 × wait + LOCK_REPORT_SLACK` early, see [`crate::LOCK_REPORT_SLACK`]), checked when a poll answers without
/// it ([`expire`](Self::expire)). The bound's clock stops while the updater itself stops
/// receiving ([`postpone`](Self::postpone)); a wait whose message is held here again
/// never ends at the bound.
#[derive(Debug)]
pub(super) struct SessionGate {
    /// The broker keeps session order itself: nothing waits here.
    broker_sessions: bool,
    wait: Duration,
    /// Each active session and the key of its occupant.
    active: BTreeMap<String, u64>,
    /// Each waiting session and its messages back at the broker, earliest first.
    blocked: BTreeMap<String, VecDeque<Awaited>>,
}

/// The sessions still waiting for messages when a run ended, handed to the next run
/// of the same updater so a restart does not let followers overtake a delayed head.
#[derive(Debug, Default)]
pub(super) struct Waiting(BTreeMap<String, VecDeque<Awaited>>);

impl SessionGate {
    /// A gate for a new run, keeping the waits of the last one. Their bounds start
    /// afresh (see [`Self::resume`]): the time between runs, not receiving, is no
    /// evidence that another consumer took a message.
    pub(super) fn new(broker_sessions: bool, wait: Duration, waiting: Waiting) -> Self {
        let mut gate = Self { broker_sessions, wait, active: BTreeMap::new(), blocked: waiting.0 };
        gate.resume(Instant::now());
        gate
    }

    /// Receiving resumes at `now` (a new run, or the circuit breaker closing): every
    /// wait lasts at least `2 × wait` more, so a message due back while nothing was
    /// received can still be received before its followers run.
    pub(super) fn resume(&mut self, now: Instant) {
        let until = saturating_add(now, self.wait.saturating_mul(2));
        for awaited in self.blocked.values_mut().flatten() {
            awaited.until = awaited.until.max(until);
        }
    }

    /// The sessions that wait for messages back at the broker, for the next run. Their
    /// order is kept; every one of them goes before whatever the next run receives.
    pub(super) fn into_waiting(mut self) -> Waiting {
        for awaited in self.blocked.values_mut().flatten() {
            awaited.rank = None;
            awaited.returned = false;
        }
        Waiting(self.blocked)
    }

    /// Whether the message held under `key` occupies `session`.
    pub(super) fn is_occupant(&self, session: &str, key: u64) -> bool {
        self.active.get(session) == Some(&key)
    }

    /// Whether message `message_id` of `session`, held under `key`, may start now.
    pub(super) fn may_start(&self, session: &str, key: u64, message_id: &str) -> bool {
        !self.active.contains_key(session)
            && self.blocked.get(session).and_then(VecDeque::front).is_none_or(|first| {
                first.message_id == message_id || first.rank.is_some_and(|rank| key < rank)
            })
    }

    /// Whether the session waits for `message_id`: `Some(rank)` if so (see
    /// [`Awaited::rank`]), to place it among the held messages of its session.
    pub(super) fn awaited(&self, session: &str, message_id: &str) -> Option<Option<u64>> {
        self.blocked
            .get(session)?
            .iter()
            .find(|awaited| awaited.message_id == message_id)
            .map(|awaited| awaited.rank)
    }

    /// Where message `message_id` of `session`, held under `key`, stands in its
    /// session's order, for placing it among the messages held: one the session waits
    /// for that ran (or was handed over from the last run) before all others, in the
    /// order they are waited for; one it waits for that never started where its earliest
    /// copy arrived (its rank); any other where it arrived (its key). A copy received
    /// again has a new key, so its key alone would put it behind messages that arrived
    /// after its first copy.
    pub(super) fn place(&self, session: &str, key: u64, message_id: &str) -> (u64, u64) {
        let awaited = self.blocked.get(session).and_then(|queue| {
            queue.iter().enumerate().find(|(_, awaited)| awaited.message_id == message_id)
        });
        match awaited {
            Some((at, Awaited { rank: None, .. })) => (0, u64::try_from(at).unwrap_or(u64::MAX)),
            Some((_, Awaited { rank: Some(rank), .. })) => (1, rank.saturating_mul(2)),
            None => (1, key.saturating_mul(2).saturating_add(1)),
        }
    }

    /// Message `message_id`, held under `key`, occupies `session`: it starts, or is held
    /// for a local delayed retry.
    pub(super) fn occupy(&mut self, session: &str, key: u64, message_id: &str) {
        self.forget(session, message_id);
        self.active.insert(session.to_owned(), key);
    }

    /// Message `message_id`, held under `key`, was settled for good: if it occupied
    /// its session the next message may start, and the session no longer waits for it.
    /// A message that never occupied its session (one dead-lettered on arrival while
    /// another runs) frees nothing.
    pub(super) fn release(&mut self, session: &str, key: u64, message_id: &str) {
        if self.active.get(session) == Some(&key) {
            self.active.remove(session);
        }
        self.forget(session, message_id);
    }

    /// Message `message_id` of `session`, held under `key`, went back to the broker,
    /// due back at `due` after a retry delay of `delay`: the session waits for it. If
    /// it occupied the session it goes first; one that never started goes in its
    /// arrival order, and never frees the session from the message that occupies it.
    pub(super) fn release_awaiting(
        &mut self,
        session: &str,
        key: u64,
        message_id: &str,
        due: Instant,
        delay: Duration,
    ) {
        let occupant = self.active.get(session) == Some(&key);
        if occupant {
            self.active.remove(session);
        }
        if self.broker_sessions {
            return;
        }
        let bound = delay
            .saturating_mul(6)
            .saturating_add(self.wait.saturating_mul(2))
            .saturating_add(LOCK_REPORT_SLACK);
        let due = due.max(Instant::now());
        let until = saturating_add(due, bound);
        let due = saturating_add(due, delay);
        let queue = self.blocked.entry(session.to_owned()).or_default();
        if let Some(at) = queue.iter().position(|a| a.message_id == message_id) {
            // Back again before it started: it keeps its place, or, if this copy
            // occupied the session (another copy was already waited for), goes first.
            if let Some(mut awaited) = queue.remove(at) {
                awaited.due = awaited.due.max(due);
                awaited.until = awaited.until.max(until);
                awaited.returned = false;
                if occupant {
                    awaited.rank = None;
                    queue.push_front(awaited);
                } else if awaited.rank.is_some_and(|rank| key < rank) {
                    // An earlier copy of it: it goes where that one arrived.
                    awaited.rank = Some(key);
                    let at = queue.iter().position(|a| a.rank.is_some_and(|rank| rank > key));
                    queue.insert(at.unwrap_or(queue.len()), awaited);
                } else {
                    queue.insert(at, awaited);
                }
            }
            return;
        }
        if occupant {
            let id = message_id.to_owned();
            queue.push_front(Awaited { message_id: id, rank: None, due, until, returned: false });
        } else {
            let at = queue.iter().position(|a| a.rank.is_some_and(|rank| rank > key));
            let id = message_id.to_owned();
            let awaited = Awaited { message_id: id, rank: Some(key), due, until, returned: false };
            queue.insert(at.unwrap_or(queue.len()), awaited);
        }
    }

    fn forget(&mut self, session: &str, message_id: &str) {
        if let Some(queue) = self.blocked.get_mut(session) {
            queue.retain(|awaited| awaited.message_id != message_id);
            if queue.is_empty() {
                self.blocked.remove(session);
            }
        }
    }

    /// A copy of `message_id`, which `session` waits for, is held here again: the wait
    /// for it no longer expires (the copy keeps its place until it starts or is
    /// settled).
    pub(super) fn returned(&mut self, session: &str, message_id: &str) {
        let queue = self.blocked.get_mut(session).into_iter().flatten();
        for awaited in queue.filter(|a| a.message_id == message_id) {
            awaited.returned = true;
        }
    }

    /// Ends the waits whose bound passed.
    pub(super) fn expire(&mut self, now: Instant) {
        self.blocked.retain(|_, queue| {
            queue.retain(|awaited| awaited.returned || awaited.until > now);
            !queue.is_empty()
        });
    }

    /// Moves every bound `by` later: the updater did not receive meanwhile (its own
    /// intake was stopped), so a message due back could not come back.
    pub(super) fn postpone(&mut self, by: Duration) {
        for awaited in self.blocked.values_mut().flatten() {
            awaited.until = saturating_add(awaited.until, by);
        }
    }

    /// When the next wait ends.
    #[cfg(test)]
    pub(super) fn next_expiry(&self) -> Option<Instant> {
        self.blocked.values().flatten().filter(|a| !a.returned).map(|a| a.until).min()
    }

    /// Whether a session with nothing of it here waits first for a message that is
    /// back at the broker by `now`: only a receive can bring that message back.
    pub(super) fn awaits_one_due(&self, now: Instant) -> bool {
        self.blocked.iter().any(|(session, queue)| {
            !self.active.contains_key(session)
                && queue.front().is_some_and(|first| !first.returned && first.due <= now)
        })
    }

    /// The first message an idle `session` waits for, and when it is due back at the
    /// broker, or, once that passed, when the wait for it ends; `None` while a message
    /// of the session occupies it, or it waits for none.
    pub(super) fn first_awaited(&self, session: &str, now: Instant) -> Option<(&str, Instant)> {
        if self.active.contains_key(session) {
            return None;
        }
        let first = self.blocked.get(session)?.front()?;
        let back = if first.due > now { first.due } else { first.until };
        Some((&first.message_id, back))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> SessionGate {
        SessionGate::new(false, Duration::from_secs(1), Waiting::default())
    }

    #[tokio::test(start_paused = true)]
    async fn an_active_session_admits_nothing_until_released() {
        let mut gate = gate();
        assert!(gate.may_start("s", 1, "a"));
        gate.occupy("s", 1, "a");
        assert!(!gate.may_start("s", 2, "b"));
        assert!(gate.may_start("t", 3, "c"), "other sessions are free");
        gate.release("s", 1, "a");
        assert!(gate.may_start("s", 2, "b"));
    }

    /// Ensures that only the message occupying a session frees it: a message of the
    /// session settled without having started (dead-lettered on arrival) frees nothing.
    #[tokio::test(start_paused = true)]
    async fn only_the_occupant_frees_its_session() {
        let mut gate = gate();
        gate.occupy("s", 1, "running");
        gate.release("s", 2, "poison");
        assert!(!gate.may_start("s", 3, "next"), "the running message still holds s");
        gate.release("s", 1, "running");
        assert!(gate.may_start("s", 3, "next"));
    }

    /// Ensures that a message that never started and went back to the broker (its lock
    /// was lost while parked) neither frees the session from its running head nor goes
    /// before it, and holds back only the messages that arrived after it.
    #[tokio::test(start_paused = true)]
    async fn a_lost_parked_message_waits_behind_its_running_head() {
        let mut gate = gate();
        let now = Instant::now();
        gate.occupy("s", 1, "head");
        gate.release_awaiting("s", 3, "lost", now, Duration::ZERO);
        assert!(!gate.may_start("s", 2, "earlier"), "the head still runs");
        gate.release("s", 1, "head");
        assert!(gate.may_start("s", 2, "earlier"), "arrived before the lost one");
        assert!(!gate.may_start("s", 4, "later"), "arrived after the lost one");
        assert!(gate.may_start("s", 9, "lost"), "the lost one, back with a new key");
    }

    /// Ensures that a head held for a local delayed retry and sent back after a
    /// follower lost its lock goes before that follower.
    #[tokio::test(start_paused = true)]
    async fn a_returning_occupant_goes_before_a_lost_follower() {
        let mut gate = gate();
        let now = Instant::now();
        gate.occupy("s", 1, "head");
        gate.release_awaiting("s", 2, "follower", now, Duration::ZERO);
        gate.release_awaiting("s", 1, "head", now, Duration::from_secs(5));
        assert!(gate.may_start("s", 7, "head"));
        assert!(!gate.may_start("s", 8, "follower"));
        gate.occupy("s", 7, "head");
        gate.release("s", 7, "head");
        assert!(gate.may_start("s", 8, "follower"), "next in line");
        assert!(!gate.may_start("s", 9, "other"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_back_at_the_broker_is_awaited_until_it_returns_or_the_bound() {
        let mut gate = gate();
        let now = Instant::now();
        gate.occupy("s", 1, "a");
        gate.release_awaiting("s", 1, "a", now + Duration::from_secs(10), Duration::from_secs(5));
        assert!(!gate.may_start("s", 2, "b"), "b must not overtake a");
        assert!(gate.may_start("s", 3, "a"));
        assert_eq!(gate.awaited("s", "a"), Some(None));
        assert_eq!(gate.first_awaited("s", now), Some(("a", now + Duration::from_secs(15))));
        let late = now + Duration::from_secs(20);
        assert_eq!(gate.first_awaited("s", late), Some(("a", now + Duration::from_secs(47))));
        // Due back at 10 s, then 6 × 5 s + 2 × 1 s + 5 s (`LOCK_REPORT_SLACK`).
        assert_eq!(gate.next_expiry(), Some(now + Duration::from_secs(47)));
        gate.expire(now + Duration::from_secs(46));
        assert!(!gate.may_start("s", 2, "b"));
        gate.expire(now + Duration::from_secs(47));
        assert!(gate.may_start("s", 2, "b"), "another consumer took a: b goes on");
    }

    /// Ensures that a message that occupied its session goes first when it goes back to
    /// the broker, even if the session already waited for another copy of it behind
    /// other messages.
    #[tokio::test(start_paused = true)]
    async fn an_occupant_goes_first_even_when_a_copy_of_it_was_waited_for() {
        let mut gate = gate();
        let now = Instant::now();
        gate.occupy("s", 1, "m3");
        gate.release_awaiting("s", 2, "m5", now, Duration::ZERO);
        gate.release_awaiting("s", 4, "m3", now, Duration::ZERO);
        gate.release_awaiting("s", 1, "m3", now, Duration::ZERO);
        assert!(gate.may_start("s", 9, "m3"));
        assert!(!gate.may_start("s", 8, "m5"), "m5 comes after m3");
    }

    /// Ensures that a message waited for goes where its earliest copy arrived, when an
    /// earlier copy of it turns out to be back at the broker too.
    #[tokio::test(start_paused = true)]
    async fn a_wait_moves_to_the_arrival_of_the_earliest_copy() {
        let mut gate = gate();
        let now = Instant::now();
        gate.release_awaiting("s", 5, "m23", now, Duration::ZERO);
        gate.release_awaiting("s", 7, "m10", now, Duration::ZERO);
        assert!(gate.may_start("s", 9, "m23"));
        gate.release_awaiting("s", 2, "m10", now, Duration::ZERO);
        assert!(gate.may_start("s", 9, "m10"));
        assert!(!gate.may_start("s", 9, "m23"), "m10 arrived first");
    }

    /// Ensures that the wait for a message whose copy is held here again never expires,
    /// so later messages of the session cannot overtake that copy.
    #[tokio::test(start_paused = true)]
    async fn a_returned_message_keeps_its_place_past_the_bound() {
        let mut gate = gate();
        let now = Instant::now();
        gate.release_awaiting("s", 2, "m2", now, Duration::ZERO);
        gate.release_awaiting("s", 3, "m3", now, Duration::ZERO);
        gate.returned("s", "m2");
        assert_eq!(gate.next_expiry(), Some(now + Duration::from_secs(7)), "m3's bound only");
        gate.expire(now + Duration::from_secs(60));
        assert!(gate.may_start("s", 9, "m2"));
        assert!(!gate.may_start("s", 8, "m3"), "m3 comes after m2");
    }

    /// Ensures that the bound of a wait moves while the updater stops its own intake.
    #[tokio::test(start_paused = true)]
    async fn postponing_moves_the_bound() {
        let mut gate = gate();
        let now = Instant::now();
        gate.occupy("s", 1, "a");
        gate.release_awaiting("s", 1, "a", now, Duration::ZERO);
        gate.postpone(Duration::from_secs(10));
        assert_eq!(gate.next_expiry(), Some(now + Duration::from_secs(17)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_returning_message_clears_the_wait_when_it_starts() {
        let mut gate = gate();
        gate.occupy("s", 1, "a");
        gate.release_awaiting("s", 1, "a", Instant::now(), Duration::ZERO);
        gate.occupy("s", 2, "a");
        assert_eq!(gate.awaited("s", "a"), None);
        gate.release("s", 2, "a");
        assert!(gate.may_start("s", 3, "b"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_gate_keeps_the_waiting_sessions_of_the_last_in_order() {
        let mut gate = gate();
        gate.occupy("s", 1, "a");
        gate.release_awaiting("s", 2, "b", Instant::now(), Duration::ZERO);
        gate.release_awaiting("s", 1, "a", Instant::now(), Duration::from_secs(5));
        let next = SessionGate::new(false, Duration::from_secs(1), gate.into_waiting());
        assert!(!next.may_start("s", 1, "c"), "every waiting message goes first");
        assert!(!next.may_start("s", 1, "b"));
        assert!(next.may_start("s", 1, "a"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_keeps_waiting_for_its_earliest_message() {
        let mut gate = gate();
        gate.occupy("s", 1, "head");
        gate.release_awaiting("s", 1, "head", Instant::now(), Duration::from_secs(20));
        gate.release_awaiting("s", 2, "follower", Instant::now(), Duration::ZERO);
        assert!(gate.may_start("s", 3, "head"));
        assert!(!gate.may_start("s", 4, "follower"), "the follower went back too, behind the head");
    }

    /// Ensures that a message waited for stands in its session's order where it should
    /// go, whatever key its new copy has: one that ran before all, one that never
    /// started at its first copy's arrival, anything else at its own arrival.
    #[tokio::test(start_paused = true)]
    async fn a_waited_for_copy_is_placed_by_its_first_arrival_not_its_new_key() {
        let mut gate = gate();
        let now = Instant::now();
        gate.occupy("s", 1, "head");
        gate.release_awaiting("s", 1, "head", now, Duration::from_secs(5));
        gate.release_awaiting("s", 4, "lost", now, Duration::ZERO);
        let head = gate.place("s", 20, "head");
        let lost = gate.place("s", 21, "lost");
        let between = gate.place("s", 3, "between");
        let after = gate.place("s", 5, "after");
        assert!(
            head < between && between < lost && lost < after,
            "{head:?} {between:?} {lost:?} {after:?}"
        );
    }

    /// Ensures that a session whose first awaited message is back at the broker, with
    /// nothing of it here, counts as waiting for one that only a receive brings back;
    /// not before it is due, nor once a copy of it is held again.
    #[tokio::test(start_paused = true)]
    async fn a_session_waits_for_a_due_message_until_a_copy_is_held() {
        let mut gate = gate();
        let now = Instant::now();
        gate.occupy("s", 1, "head");
        gate.release_awaiting("s", 1, "head", now, Duration::from_secs(5));
        assert!(!gate.awaits_one_due(now), "not due back yet");
        let due = now + Duration::from_secs(5);
        assert!(gate.awaits_one_due(due));
        gate.returned("s", "head");
        assert!(!gate.awaits_one_due(due), "a copy is held again");
    }

    #[tokio::test(start_paused = true)]
    async fn broker_sessions_are_never_blocked_here() {
        let mut gate = SessionGate::new(true, Duration::from_secs(1), Waiting::default());
        gate.occupy("s", 1, "a");
        gate.release_awaiting("s", 1, "a", Instant::now(), Duration::from_secs(5));
        assert!(gate.may_start("s", 2, "b"));
        assert_eq!(gate.next_expiry(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn an_absurd_delay_saturates() {
        let mut gate = SessionGate::new(false, Duration::MAX, Waiting::default());
        gate.release_awaiting("s", 1, "a", Instant::now(), Duration::MAX);
        assert!(gate.next_expiry().is_some());
    }
}
