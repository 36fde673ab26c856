//! What every transport means the same way: the dead-letter type, the reason a transport
//! gives when it dead-letters a message itself, and the names transports give their
//! dead-letter queues and bookkeeping properties.
//!
//! A transport crate uses these instead of defining its own, so a dead letter read from
//! RabbitMQ, Service Bus or the in-memory broker looks the same to tests and tools.

use std::time::Duration;

use tokio::time::Instant;

use crate::Message;

/// The reason a message carries into the dead-letter queue when it was delivered more
/// often than allowed, by the broker's limit or the Updater's `max_deliveries`. Service
/// Bus uses the same name on its own dead-letter queue.
pub const MAX_DELIVERY_COUNT_EXCEEDED: &str = "MaxDeliveryCountExceeded";

/// The suffix of the dead-letter queue a transport keeps itself, beside each queue.
pub const DEAD_LETTER_QUEUE_SUFFIX: &str = ".dlq";

/// The property (or header) where a transport keeps the deliveries a message had before
/// the transport re-sent it (an abandon with delay, a dead letter), to be added to the
/// broker's own count.
pub const DELIVERY_COUNT_PROPERTY: &str = "x-steward-delivery-count";

/// The property of a dead-lettered message holding the reason (the name Service Bus
/// uses on its own dead-letter queue).
pub const DEAD_LETTER_REASON_PROPERTY: &str = "DeadLetterReason";

/// The property of a dead-lettered message holding the description (the name Service
/// Bus uses on its own dead-letter queue).
pub const DEAD_LETTER_DESCRIPTION_PROPERTY: &str = "DeadLetterErrorDescription";

/// The dead-letter queue a transport keeps beside `queue`: `<queue>.dlq`.
///
/// # Examples
///
/// ```
/// assert_eq!(steward_core::transport::dead_letter_queue("jobs"), "jobs.dlq");
/// ```
#[must_use]
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}{DEAD_LETTER_QUEUE_SUFFIX}")
}

/// `now + duration`, or a moment decades away when that does not fit the clock: for
/// deadlines and visibility times computed from durations a caller chose.
#[must_use]
pub fn later(now: Instant, duration: Duration) -> Instant {
    now.checked_add(duration).unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 24 * 60 * 60))
}

/// A message in a dead-letter queue, with why it is there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The message as it sits in the dead-letter queue, with its original ids and
    /// properties (less the transport's own bookkeeping).
    pub message: Message,
    /// The reason given to `dead_letter`, or the transport's or broker's own
    /// ([`MAX_DELIVERY_COUNT_EXCEEDED`] for a delivery limit); empty when unknown.
    pub reason: String,
    /// The description given to `dead_letter`; empty for messages the broker moved.
    pub description: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_saturates_instead_of_overflowing() {
        let now = Instant::now();
        assert_eq!(later(now, Duration::from_secs(5)), now + Duration::from_secs(5));
        assert!(later(now, Duration::MAX) > now + Duration::from_secs(365 * 24 * 60 * 60));
    }

    #[test]
    fn dead_letter_queue_appends_the_suffix() {
        assert_eq!(dead_letter_queue("q"), "q.dlq");
    }
}
