//! Lock renewal: when each held lock is renewed next.

use std::time::Duration;

use tokio::time::Instant;

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

#[cfg(test)]
mod tests {
    use super::*;

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
