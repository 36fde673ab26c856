//! The circuit breaker: pauses intake while a dependency fails.

use std::time::Duration;

use tokio::time::Instant;

use crate::Backoff;
use crate::deadlines::saturating_add;

/// Opened by a retry with cause `Dependency`; while open, nothing new is received or
/// started, and the handler's probe runs on a backoff until it succeeds.
#[derive(Debug)]
pub(super) struct Breaker {
    backoff: Backoff,
    open: bool,
    failures: u32,
    probe_at: Instant,
}

impl Breaker {
    pub(super) fn new(backoff: Backoff) -> Self {
        Self { backoff, open: false, failures: 0, probe_at: Instant::now() }
    }

    pub(super) fn is_open(&self) -> bool {
        self.open
    }

    /// Opens the breaker; the pause before the first probe, or `None` if already open.
    pub(super) fn open(&mut self, now: Instant) -> Option<Duration> {
        if self.open {
            return None;
        }
        self.open = true;
        self.failures = 0;
        let pause = self.backoff.delay(0);
        self.probe_at = saturating_add(now, pause);
        Some(pause)
    }

    /// When to probe next, while open.
    pub(super) fn probe_at(&self) -> Option<Instant> {
        self.open.then_some(self.probe_at)
    }

    /// A probe succeeded: closes the breaker.
    pub(super) fn succeeded(&mut self) {
        self.open = false;
    }

    /// A probe failed: the pause before the next one.
    pub(super) fn failed(&mut self, now: Instant) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let pause = self.backoff.delay(self.failures);
        self.probe_at = saturating_add(now, pause);
        pause
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Jitter;

    #[tokio::test(start_paused = true)]
    async fn probes_back_off_until_one_succeeds() {
        let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(4))
            .with_jitter(Jitter::none());
        let mut breaker = Breaker::new(backoff);
        let now = Instant::now();
        assert_eq!(breaker.probe_at(), None);
        assert_eq!(breaker.open(now), Some(Duration::from_secs(1)));
        assert_eq!(breaker.open(now), None, "opening twice keeps the first pause");
        assert_eq!(breaker.probe_at(), Some(now + Duration::from_secs(1)));
        let pauses: Vec<_> = (0..3).map(|_| breaker.failed(now).as_secs()).collect();
        assert_eq!(pauses, [2, 4, 4]);
        assert!(breaker.is_open());
        breaker.succeeded();
        assert!(!breaker.is_open());
        assert_eq!(breaker.open(now), Some(Duration::from_secs(1)), "a new opening starts afresh");
    }
}
