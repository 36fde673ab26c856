//! Local delayed retries: for transports without delayed abandon, a retried message is
//! held (its lock renewed, its session occupied) until its delay ends, then abandoned.

use tokio::time::Instant;

use super::held::Held;

struct Delayed {
    due: Instant,
    held: Held,
}

/// The retries held here until their delay ends.
#[derive(Default)]
pub(super) struct DelayedRetries {
    items: Vec<Delayed>,
}

impl DelayedRetries {
    /// Holds `held` until `due`.
    pub(super) fn hold(&mut self, held: Held, due: Instant) {
        self.items.push(Delayed { due, held });
    }

    /// Takes the retries whose delay ended by `now`, earliest first.
    pub(super) fn take_due(&mut self, now: Instant) -> Vec<Held> {
        let (mut due, later): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.items).into_iter().partition(|d| d.due <= now);
        self.items = later;
        due.sort_by_key(|d| d.due);
        due.into_iter().map(|d| d.held).collect()
    }

    /// Takes the retries whose lock was lost: they belong to the broker again.
    pub(super) fn take_lost(&mut self) -> Vec<Held> {
        let (lost, kept): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.items).into_iter().partition(|d| d.held.lost);
        self.items = kept;
        lost.into_iter().map(|d| d.held).collect()
    }

    /// Takes every retry (the drain releases them at once).
    pub(super) fn take_all(&mut self) -> Vec<Held> {
        std::mem::take(&mut self.items).into_iter().map(|d| d.held).collect()
    }

    /// When the next delay ends.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.items.iter().map(|d| d.due).min()
    }

    pub(super) fn len(&self) -> usize {
        self.items.len()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Held> {
        self.items.iter().map(|d| &d.held)
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Held> {
        self.items.iter_mut().map(|d| &mut d.held)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::updater::testing::held;

    #[tokio::test(start_paused = true)]
    async fn only_due_retries_are_taken_earliest_first() {
        let now = Instant::now();
        let mut retries = DelayedRetries::default();
        retries.hold(held(1, "late"), now + Duration::from_secs(20));
        retries.hold(held(2, "second"), now + Duration::from_secs(10));
        retries.hold(held(3, "first"), now + Duration::from_secs(5));
        assert_eq!(retries.next_due(), Some(now + Duration::from_secs(5)));
        let due: Vec<_> = retries
            .take_due(now + Duration::from_secs(10))
            .iter()
            .map(|h| h.id().to_owned())
            .collect();
        assert_eq!(due, ["first", "second"]);
        assert_eq!(retries.len(), 1);
        assert_eq!(retries.next_due(), Some(now + Duration::from_secs(20)));
    }

    #[tokio::test(start_paused = true)]
    async fn lost_retries_are_taken_out_and_the_rest_kept() {
        let now = Instant::now();
        let mut retries = DelayedRetries::default();
        retries.hold(held(1, "kept"), now);
        let mut lost = held(2, "lost");
        lost.lost = true;
        retries.hold(lost, now);
        let taken: Vec<_> = retries.take_lost().iter().map(|h| h.id().to_owned()).collect();
        assert_eq!(taken, ["lost"]);
        let rest: Vec<_> = retries.take_all().iter().map(|h| h.id().to_owned()).collect();
        assert_eq!(rest, ["kept"]);
        assert_eq!(retries.len(), 0);
    }
}
