//! Settlements under way: each its own task bounded by `broker_timeout`, and what its
//! result means for the message's session.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};

use super::held::Held;
use crate::deadlines::saturating_add;
use crate::{Delivery, Settled, TransportError};

/// How a message is settled.
pub(super) enum Settlement {
    Complete,
    Abandon(Option<Duration>),
    DeadLetter { reason: String, description: String },
}

/// A settlement under way, and what to do when it ends.
pub(super) struct Settling {
    /// The held message's key within the run.
    pub(super) key: u64,
    pub(super) id: String,
    pub(super) session: Option<String>,
    pub(super) operation: &'static str,
    /// What to count once the broker took it.
    pub(super) record: Option<Settled>,
    pub(super) elapsed: Option<Duration>,
    pub(super) dead_letter_reason: Option<String>,
    /// For an abandon: the retry delay after which the message is due back.
    returns_after: Option<Duration>,
    /// When the lock runs out (a failed settlement leaves the message locked till then),
    /// as the transport reported it once the call ended.
    locked_until: Option<Instant>,
}

/// What a finished settlement means for its session.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum SessionStep {
    /// Settled for good: the session's next message may start.
    Release,
    /// The message is back at the broker, due at `due` after a retry delay of `delay`:
    /// the session waits for it.
    AwaitReturn { due: Instant, delay: Duration },
}

impl Settling {
    /// What `result` means for the session: a completed or dead-lettered message frees
    /// it; an abandoned one, or one whose settlement failed (it returns when its lock
    /// runs out, at once if lost), makes it wait for the message. An abandon with a
    /// delay whose outcome is unknown (it failed or timed out, but the broker may have
    /// applied it) may bring the message back only after that delay: the session waits
    /// until the later of the lock's end and the delay, plus the delay's bound.
    pub(super) fn session_step(
        &self,
        result: &Result<(), TransportError>,
        now: Instant,
    ) -> SessionStep {
        match result {
            Ok(()) => match self.returns_after {
                Some(delay) => SessionStep::AwaitReturn { due: now, delay },
                None => SessionStep::Release,
            },
            Err(error) if error.is_lock_lost() => {
                SessionStep::AwaitReturn { due: now, delay: Duration::ZERO }
            }
            Err(_) => unanswered(self.returns_after, self.locked_until, now),
        }
    }
}

/// A settlement that failed, or was given up, with the message's lock held until
/// `locked_until`: the message returns when the lock runs out, and an abandon with a
/// delay (`returns_after`) the broker may have applied brings it back no sooner than
/// that delay.
fn unanswered(
    returns_after: Option<Duration>,
    locked_until: Option<Instant>,
    now: Instant,
) -> SessionStep {
    let delay = returns_after.unwrap_or_default();
    let locked = locked_until.unwrap_or(now).max(now);
    SessionStep::AwaitReturn { due: locked.max(saturating_add(now, delay)), delay }
}

type Finished = (Settling, Result<(), TransportError>);

/// A settlement under way that was given up: its message returns to the broker when
/// its lock runs out.
pub(super) struct Unsettled {
    pub(super) id: String,
    pub(super) key: u64,
    pub(super) session: Option<String>,
    returns_after: Option<Duration>,
    delivery: Arc<Delivery>,
}

impl Unsettled {
    /// What giving it up at `now` means for its session: it waits for the message until
    /// its lock runs out (the transport's current account of it), and past an abandon's
    /// delay, as for a failed settlement.
    pub(super) fn session_step(&self, now: Instant) -> SessionStep {
        unanswered(self.returns_after, self.delivery.locked_until(), now)
    }
}

/// The settlements under way.
pub(super) struct Settlements {
    tasks: JoinSet<Finished>,
    /// Each settlement under way by its delivery's key, for when they are given up.
    under_way: BTreeMap<u64, Unsettled>,
    limit: Duration,
}

impl Settlements {
    pub(super) fn new(limit: Duration) -> Self {
        Self { tasks: JoinSet::new(), under_way: BTreeMap::new(), limit }
    }

    /// Settles `held` in its own task; counts it as `record` once the broker took it.
    pub(super) fn start(
        &mut self,
        held: Held,
        settlement: Settlement,
        record: Option<Settled>,
        elapsed: Option<Duration>,
    ) {
        let (operation, returns_after, dead_letter_reason) = match &settlement {
            Settlement::Complete => ("complete", None, None),
            Settlement::Abandon(delay) => ("abandon", Some(delay.unwrap_or_default()), None),
            Settlement::DeadLetter { reason, .. } => ("dead-letter", None, Some(reason.clone())),
        };
        let settling = Settling {
            key: held.key,
            id: held.id().to_owned(),
            session: held.session().map(str::to_owned),
            operation,
            record,
            elapsed,
            dead_letter_reason,
            returns_after,
            locked_until: held.delivery.locked_until(),
        };
        let unsettled = Unsettled {
            id: settling.id.clone(),
            key: settling.key,
            session: settling.session.clone(),
            returns_after,
            delivery: held.delivery.clone(),
        };
        self.under_way.insert(settling.key, unsettled);
        let limit = self.limit;
        self.tasks.spawn(async move {
            let mut settling = settling;
            let result = match timeout(limit, call(&held.delivery, &settlement)).await {
                Ok(result) => result,
                Err(_) => Err(TransportError::timeout(format!(
                    "{operation} did not answer within {limit:?}"
                ))),
            };
            // A renewal that answered meanwhile may have moved the lock on.
            settling.locked_until = held.delivery.locked_until();
            (settling, result)
        });
    }

    /// The next finished settlement; pends while none is under way.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub(super) async fn next(&mut self) -> Finished {
        loop {
            if self.tasks.is_empty() {
                std::future::pending::<()>().await;
            }
            match self.tasks.join_next().await {
                Some(Ok(finished)) => {
                    self.under_way.remove(&finished.0.key);
                    return finished;
                }
                Some(Err(error)) if error.is_panic() => {
                    let payload = crate::supervisor::panic_message(error.into_panic());
                    tracing::error!(panic = %payload, "settlement panicked; the message returns when its lock expires");
                }
                _ => {}
            }
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Whether a copy of message `message_id` other than the one held under `key` is
    /// being settled (say, a redelivery dead-lettered on arrival while an earlier
    /// copy's settlement hung): until it is answered, the message is not back at the
    /// broker.
    pub(super) fn settles_copy(&self, message_id: &str, key: u64) -> bool {
        self.under_way.values().any(|unsettled| unsettled.key != key && unsettled.id == message_id)
    }

    pub(super) fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Gives up every settlement under way, returning their messages.
    pub(super) fn abort_all(&mut self) -> Vec<Unsettled> {
        self.tasks.abort_all();
        std::mem::take(&mut self.under_way).into_values().collect()
    }

    /// Waits for every settlement under way to end (a run dropped early lets them
    /// finish in a task of their own).
    pub(super) async fn wait_all(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

async fn call(delivery: &Arc<Delivery>, settlement: &Settlement) -> Result<(), TransportError> {
    let settle = delivery.settle_handle();
    match settlement {
        Settlement::Complete => settle.complete().await,
        Settlement::Abandon(delay) => settle.abandon(*delay).await,
        Settlement::DeadLetter { reason, description } => {
            settle.dead_letter(reason, description).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::updater::testing::{TestSettle, held_with};

    #[tokio::test(start_paused = true)]
    async fn a_hung_settlement_times_out_and_the_others_finish_first() {
        let mut settlements = Settlements::new(Duration::from_secs(30));
        let hung =
            held_with(1, "hung", Some("s"), TestSettle { hang: true, ..TestSettle::default() });
        settlements.start(hung, Settlement::Complete, Some(Settled::Completed), None);
        let quick = held_with(2, "quick", Some("t"), TestSettle::default());
        settlements.start(quick, Settlement::Complete, Some(Settled::Completed), None);
        let started = Instant::now();
        let (settling, result) = settlements.next().await;
        assert_eq!((settling.id.as_str(), started.elapsed()), ("quick", Duration::ZERO));
        assert_eq!(settling.session_step(&result, Instant::now()), SessionStep::Release);
        let (settling, result) = settlements.next().await;
        assert_eq!((settling.id.as_str(), started.elapsed()), ("hung", Duration::from_secs(30)));
        assert!(result.as_ref().is_err_and(|e| !e.is_lock_lost()), "{result:?}");
        // Failed: the message returns when its lock (10 s from receipt) runs out; that
        // is past, so the session waits from now.
        let now = Instant::now();
        assert_eq!(
            settling.session_step(&result, now),
            SessionStep::AwaitReturn { due: now, delay: Duration::ZERO }
        );
        assert!(settlements.is_empty());
    }

    /// Ensures that a copy of a message being settled is found under another key, not
    /// under its own, and no longer once its settlement ended.
    #[tokio::test(start_paused = true)]
    async fn a_copy_being_settled_is_found_by_the_other_copies() {
        let mut settlements = Settlements::new(Duration::from_secs(5));
        let hung = held_with(2, "m", Some("s"), TestSettle { hang: true, ..TestSettle::default() });
        let reason = crate::transport::MAX_DELIVERY_COUNT_EXCEEDED.to_owned();
        let dead_letter = Settlement::DeadLetter { reason, description: String::new() };
        settlements.start(hung, dead_letter, Some(Settled::DeadLettered), None);
        assert!(settlements.settles_copy("m", 1), "the earlier copy finds the later one");
        assert!(!settlements.settles_copy("m", 2), "not itself");
        assert!(!settlements.settles_copy("other", 1));
        let (settling, result) = settlements.next().await;
        assert_eq!(settling.key, 2);
        assert!(result.is_err());
        assert!(!settlements.settles_copy("m", 1), "answered: no longer under way");
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandon_makes_the_session_wait_for_its_delay() {
        let mut settlements = Settlements::new(Duration::from_secs(30));
        let retried = held_with(1, "retried", Some("s"), TestSettle::default());
        let delay = Duration::from_secs(20);
        settlements.start(retried, Settlement::Abandon(Some(delay)), Some(Settled::Retried), None);
        let (settling, result) = settlements.next().await;
        let now = Instant::now();
        assert_eq!(
            settling.session_step(&result, now),
            SessionStep::AwaitReturn { due: now, delay }
        );
    }

    /// Ensures that a delayed abandon whose answer never came (the broker may have
    /// applied it) makes the session wait past the delay, not only past the lock.
    #[tokio::test(start_paused = true)]
    async fn an_unanswered_delayed_abandon_waits_for_its_delay() {
        let mut settlements = Settlements::new(Duration::from_secs(5));
        let hung =
            held_with(1, "hung", Some("s"), TestSettle { hang: true, ..TestSettle::default() });
        let delay = Duration::from_secs(120);
        settlements.start(hung, Settlement::Abandon(Some(delay)), None, None);
        let (settling, result) = settlements.next().await;
        assert!(result.is_err());
        let now = Instant::now();
        assert_eq!(
            settling.session_step(&result, now),
            SessionStep::AwaitReturn { due: now + delay, delay }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_settlement_waits_for_the_lock_to_run_out() {
        let mut settlements = Settlements::new(Duration::from_secs(30));
        let failed = held_with(1, "failed", Some("s"), TestSettle::default());
        let locked_until = failed.delivery.locked_until().unwrap();
        settlements.start(failed, Settlement::Complete, None, None);
        let (settling, _) = settlements.next().await;
        let error = Err(TransportError::connection("refused"));
        assert_eq!(
            settling.session_step(&error, Instant::now()),
            SessionStep::AwaitReturn { due: locked_until, delay: Duration::ZERO }
        );
        let lost = Err(TransportError::lock_lost("failed"));
        let now = Instant::now();
        assert_eq!(
            settling.session_step(&lost, now),
            SessionStep::AwaitReturn { due: now, delay: Duration::ZERO }
        );
    }
}
