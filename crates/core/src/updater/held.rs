//! A received message the Updater holds, with its lock bookkeeping.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::renewal::renew_at;
use crate::Delivery;

/// A received message the Updater holds: waiting, running, held for a local delayed
/// retry, or being settled. The delivery is shared so a renewal or a settlement can
/// run beside the loop.
pub(super) struct Held {
    /// Unique within the run (a message id can be held twice after a lost lock).
    pub(super) key: u64,
    /// Its place in its session's order: the arrival order (its key), or, for a
    /// message that must go ahead of those waiting (awaited by its session, or a
    /// redelivery of one held here), the place it takes.
    pub(super) rank: u64,
    pub(super) delivery: Arc<Delivery>,
    /// When to renew the lock; `None` for transports without timed locks, or while a
    /// renewal is under way.
    pub(super) renew_at: Option<Instant>,
    /// The last renewal failed (the lock may lapse).
    pub(super) renew_failing: bool,
    /// The lock was lost: never settle this delivery.
    pub(super) lost: bool,
}

impl Held {
    /// A delivery received now, its first renewal `margin` before its lock runs out.
    pub(super) fn new(key: u64, delivery: Delivery, now: Instant, margin: Duration) -> Self {
        Self {
            key,
            rank: key,
            renew_at: renew_at(delivery.locked_until(), now, margin),
            delivery: Arc::new(delivery),
            renew_failing: false,
            lost: false,
        }
    }

    pub(super) fn id(&self) -> &str {
        &self.delivery.message().id
    }

    pub(super) fn session(&self) -> Option<&str> {
        self.delivery.message().session_id.as_deref()
    }

    /// Whether its lock is due for renewal at `now`.
    pub(super) fn is_renewal_due(&self, now: Instant) -> bool {
        !self.lost && self.renew_at.is_some_and(|at| at <= now)
    }

    /// Whether its lock is held and renewed without failure.
    pub(super) fn has_healthy_lock(&self) -> bool {
        !self.lost && !self.renew_failing
    }
}
