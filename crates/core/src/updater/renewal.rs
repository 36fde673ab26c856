//! Lock renewal: when each held lock is renewed next, and the renewals under way, each
//! its own task bounded by `broker_timeout`.

use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};

use super::held::Held;
use crate::TransportError;
use crate::deadlines::saturating_add;

/// The shortest time between two renewals of one lock, so a lock whose expiry is not in
/// the future (a transport's clock skew, a lock shorter than this) is not renewed
/// back-to-back.
pub(super) const MIN_RENEW_INTERVAL: Duration = Duration::from_secs(1);

/// How soon a failed renewal (not a lost lock) is tried again.
pub(super) const RENEW_RETRY: Duration = Duration::from_secs(1);

/// When to renew a lock expiring at `until`: `margin` before, but at most half-way, and
/// never sooner than [`MIN_RENEW_INTERVAL`] from `now`. `None` for transports without
/// timed locks.
pub(super) fn renew_at(until: Option<Instant>, now: Instant, margin: Duration) -> Option<Instant> {
    until.map(|until| {
        let span = until.saturating_duration_since(now);
        let at = until.checked_sub(margin.min(span / 2)).unwrap_or(now);
        at.max(saturating_add(now, MIN_RENEW_INTERVAL))
    })
}

/// What a renewal's answer did to its held message.
#[derive(Debug)]
pub(super) enum Renewed {
    /// The lock is held for longer; the next renewal is scheduled.
    Kept,
    /// The lock is gone: the message must not be settled here.
    Lost(TransportError),
    /// The renewal failed (not a lost lock): it is tried again in [`RENEW_RETRY`].
    Failed(TransportError),
}

/// Takes a renewal's answer into `held`.
pub(super) fn apply(
    held: &mut Held,
    answer: Result<Option<Instant>, TransportError>,
    now: Instant,
    margin: Duration,
) -> Renewed {
    match answer {
        Ok(until) => {
            held.renew_at = renew_at(until, now, margin);
            held.renew_failing = false;
            Renewed::Kept
        }
        Err(error) if error.is_lock_lost() => {
            held.lost = true;
            held.renew_at = None;
            Renewed::Lost(error)
        }
        Err(error) => {
            held.renew_at = Some(saturating_add(now, RENEW_RETRY));
            held.renew_failing = true;
            Renewed::Failed(error)
        }
    }
}

type Answer = (u64, Result<Option<Instant>, TransportError>);

/// The renewals under way, each its own task bounded by `limit`, so a slow one holds up
/// neither the loop nor the others.
pub(super) struct Renewals {
    tasks: JoinSet<Answer>,
    limit: Duration,
}

impl Renewals {
    pub(super) fn new(limit: Duration) -> Self {
        Self { tasks: JoinSet::new(), limit }
    }

    /// Starts renewing `held`'s lock; no other renewal of it starts until the answer.
    pub(super) fn start(&mut self, held: &mut Held) {
        held.renew_at = None;
        let (key, delivery, limit) = (held.key, held.delivery.clone(), self.limit);
        self.tasks.spawn(async move {
            let answer = match timeout(limit, delivery.settle_handle().renew_lock()).await {
                Ok(answer) => answer,
                Err(_) => Err(TransportError::timeout(format!(
                    "lock renewal did not answer within {limit:?}"
                ))),
            };
            (key, answer)
        });
    }

    /// The next answer: the key of the held message and what the transport said.
    /// Pends while no renewal is under way.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub(super) async fn next(&mut self) -> Answer {
        loop {
            if self.tasks.is_empty() {
                std::future::pending::<()>().await;
            }
            match self.tasks.join_next().await {
                Some(Ok(answer)) => return answer,
                Some(Err(error)) if error.is_panic() => {
                    let payload = crate::supervisor::panic_message(error.into_panic());
                    tracing::error!(panic = %payload, "lock renewal panicked");
                }
                _ => {}
            }
        }
    }

    pub(super) fn abort_all(&mut self) {
        self.tasks.abort_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::updater::testing::{TestSettle, held_with};

    #[tokio::test(start_paused = true)]
    async fn a_hung_renewal_times_out_without_holding_up_another() {
        let mut renewals = Renewals::new(Duration::from_secs(30));
        let mut hung =
            held_with(1, "hung", None, TestSettle { hang: true, ..TestSettle::default() });
        let mut quick = held_with(2, "quick", None, TestSettle::default());
        let started = Instant::now();
        renewals.start(&mut hung);
        renewals.start(&mut quick);
        assert_eq!((hung.renew_at, quick.renew_at), (None, None), "one renewal at a time");
        let (key, answer) = renewals.next().await;
        assert_eq!(key, 2);
        assert_eq!(started.elapsed(), Duration::ZERO, "the quick one answered at once");
        assert!(matches!(
            apply(&mut quick, answer, Instant::now(), Duration::from_secs(2)),
            Renewed::Kept
        ));
        let (key, answer) = renewals.next().await;
        assert_eq!((key, started.elapsed()), (1, Duration::from_secs(30)));
        let now = Instant::now();
        assert!(matches!(
            apply(&mut hung, answer, now, Duration::from_secs(2)),
            Renewed::Failed(_)
        ));
        assert!(hung.renew_failing);
        assert_eq!(hung.renew_at, Some(now + RENEW_RETRY));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_lock_is_marked_and_never_renewed_again() {
        let mut renewals = Renewals::new(Duration::from_secs(30));
        let mut lost =
            held_with(1, "lost", None, TestSettle { lost: true, ..TestSettle::default() });
        renewals.start(&mut lost);
        let (_, answer) = renewals.next().await;
        assert!(matches!(
            apply(&mut lost, answer, Instant::now(), Duration::ZERO),
            Renewed::Lost(_)
        ));
        assert!(lost.lost && lost.renew_at.is_none());
        assert!(!lost.is_renewal_due(Instant::now() + Duration::from_secs(3600)));
    }

    #[tokio::test(start_paused = true)]
    async fn renews_a_margin_before_expiry_but_at_most_half_way() {
        let now = Instant::now();
        let margin = Duration::from_secs(10);
        let at = |lock: u64| renew_at(Some(now + Duration::from_secs(lock)), now, margin);
        assert_eq!(at(60), Some(now + Duration::from_secs(50)));
        assert_eq!(at(10), Some(now + Duration::from_secs(5)));
        assert_eq!(renew_at(None, now, margin), None);
    }

    #[tokio::test(start_paused = true)]
    async fn an_expiry_not_in_the_future_waits_the_minimum_interval() {
        let now = Instant::now();
        let margin = Duration::from_secs(10);
        assert_eq!(renew_at(Some(now), now, margin), Some(now + MIN_RENEW_INTERVAL));
        let past = now.checked_sub(Duration::from_secs(5)).unwrap_or(now);
        assert_eq!(renew_at(Some(past), now, margin), Some(now + MIN_RENEW_INTERVAL));
    }
}
