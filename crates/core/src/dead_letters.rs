//! Looking into dead-letter queues and sending their messages back: what an operator
//! needs once the cause of a dead letter is fixed, the same on every transport.
//!
//! [`DeadLetterQueues`] is the trait a transport implements. Its promises:
//!
//! - [`peek`](DeadLetterQueues::peek) loses and reorders nothing: after it the
//!   dead-letter queue holds the same messages in the same order. Where the broker has
//!   no true peek (RabbitMQ's get-and-requeue, Service Bus REST's peek-lock and unlock)
//!   a peek counts as a delivery of each message it reads, so the delivery counts in the
//!   dead-letter queue may rise ([`DeadLetterQueues::peek_counts_as_delivery`]). Peek
//!   when an operator asks, never on a timer.
//! - [`redrive`](DeadLetterQueues::redrive) sends messages back to their queue with
//!   their body, ids and properties, a fresh delivery count and the property
//!   [`REDRIVEN_PROPERTY`] counting how often they were redriven, and removes them from
//!   the dead-letter queue. Concurrent redrives of the same messages never send one
//!   twice while both run normally: each message is held by one of them at a time.
//! - [`purge`](DeadLetterQueues::purge) removes chosen messages for good.

use std::collections::BTreeSet;

use async_trait::async_trait;

use crate::transport::{
    DEAD_LETTER_DESCRIPTION_HEADER, DEAD_LETTER_DESCRIPTION_PROPERTY, DEAD_LETTER_REASON_HEADER,
    DEAD_LETTER_REASON_PROPERTY, DELIVERY_COUNT_PROPERTY,
};
use crate::{DeadLetter, Message, OutgoingMessage, TransportError};

/// The property a redriven message carries: how often it was redriven, `1` the first
/// time.
pub const REDRIVEN_PROPERTY: &str = "x-steward-redriven";

/// Which dead letters a [`redrive`](DeadLetterQueues::redrive) sends back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redrive {
    /// Every message in the dead-letter queue.
    All,
    /// The messages with these ids (ids not found are ignored).
    Ids(BTreeSet<String>),
}

impl Redrive {
    /// Whether a message with this id is chosen.
    #[must_use]
    pub fn selects(&self, id: &str) -> bool {
        match self {
            Self::All => true,
            Self::Ids(ids) => ids.contains(id),
        }
    }

    /// Whether nothing can be chosen (an empty id list).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        matches!(self, Self::Ids(ids) if ids.is_empty())
    }
}

/// A queue and how many messages its dead-letter queue holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterCount {
    /// The queue whose dead letters these are.
    pub queue: String,
    /// How many messages its dead-letter queue holds (on transports that count by
    /// reading, at most what one read takes; see the transport's docs).
    pub count: u64,
}

/// The dead-letter queues of a transport, for operators: count, peek, redrive, purge.
///
/// Every method takes the name of the queue whose dead letters it works on (`jobs`, not
/// the transport's name of the dead-letter queue). See the [module docs](self) for the
/// promises.
#[async_trait]
pub trait DeadLetterQueues: Send + Sync + 'static {
    /// Whether [`peek`](Self::peek) (and, where the transport counts by reading,
    /// [`count`](Self::count)) counts as a delivery of the messages it reads, raising
    /// their delivery counts in the dead-letter queue.
    fn peek_counts_as_delivery(&self) -> bool;

    /// How many messages `queue`'s dead-letter queue holds.
    ///
    /// # Errors
    ///
    /// [`TransportError::NotFound`] when the dead-letter queue does not exist;
    /// connection errors.
    async fn count(&self, queue: &str) -> Result<u64, TransportError>;

    /// The first `limit` messages of `queue`'s dead-letter queue, oldest first, with why
    /// they are there; the queue keeps them, in the same order.
    ///
    /// # Errors
    ///
    /// [`TransportError::NotFound`] when the dead-letter queue does not exist;
    /// connection errors.
    async fn peek(&self, queue: &str, limit: usize) -> Result<Vec<DeadLetter>, TransportError>;

    /// Sends the chosen messages of `queue`'s dead-letter queue back to `queue` (see
    /// [`redriven`]) and removes them from the dead-letter queue; returns how many.
    ///
    /// # Errors
    ///
    /// [`TransportError::NotFound`] when a queue does not exist; connection errors. The
    /// messages redriven before an error are gone from the dead-letter queue; the
    /// others stay.
    async fn redrive(&self, queue: &str, which: &Redrive) -> Result<usize, TransportError>;

    /// Removes the messages with these ids from `queue`'s dead-letter queue for good;
    /// returns how many.
    ///
    /// # Errors
    ///
    /// [`TransportError::NotFound`] when the dead-letter queue does not exist;
    /// connection errors.
    async fn purge(&self, queue: &str, ids: &BTreeSet<String>) -> Result<usize, TransportError>;

    /// [`count`](Self::count) of each of `queues`, in their order.
    ///
    /// # Errors
    ///
    /// The first error of a count.
    async fn counts(&self, queues: &[String]) -> Result<Vec<DeadLetterCount>, TransportError> {
        let mut counts = Vec::with_capacity(queues.len());
        for queue in queues {
            counts.push(DeadLetterCount { queue: queue.clone(), count: self.count(queue).await? });
        }
        Ok(counts)
    }
}

#[async_trait]
impl<D: DeadLetterQueues + ?Sized> DeadLetterQueues for std::sync::Arc<D> {
    fn peek_counts_as_delivery(&self) -> bool {
        (**self).peek_counts_as_delivery()
    }

    async fn count(&self, queue: &str) -> Result<u64, TransportError> {
        (**self).count(queue).await
    }

    async fn peek(&self, queue: &str, limit: usize) -> Result<Vec<DeadLetter>, TransportError> {
        (**self).peek(queue, limit).await
    }

    async fn redrive(&self, queue: &str, which: &Redrive) -> Result<usize, TransportError> {
        (**self).redrive(queue, which).await
    }

    async fn purge(&self, queue: &str, ids: &BTreeSet<String>) -> Result<usize, TransportError> {
        (**self).purge(queue, ids).await
    }
}

/// Properties a transport keeps on a message in a dead-letter queue for its own
/// bookkeeping, which a redriven message leaves behind.
const BOOKKEEPING: [&str; 5] = [
    DELIVERY_COUNT_PROPERTY,
    DEAD_LETTER_REASON_PROPERTY,
    DEAD_LETTER_DESCRIPTION_PROPERTY,
    DEAD_LETTER_REASON_HEADER,
    DEAD_LETTER_DESCRIPTION_HEADER,
];

/// How often `message` was redriven before: its [`REDRIVEN_PROPERTY`], 0 when absent
/// or not a number.
#[must_use]
pub fn times_redriven(message: &Message) -> u32 {
    message
        .properties
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(REDRIVEN_PROPERTY))
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0)
}

/// The message a redrive sends for `message`, read from a dead-letter queue: the same
/// body, message id, session id, correlation id, content type and properties, less the
/// transports' bookkeeping (delivery counts, dead-letter reasons, in any case), so the
/// queue counts its deliveries afresh; plus [`REDRIVEN_PROPERTY`] one higher.
///
/// # Examples
///
/// ```
/// use steward_core::Message;
/// use steward_core::dead_letters::{REDRIVEN_PROPERTY, redriven};
///
/// let mut dead = Message::new("m-1", "body").with_delivery_count(7);
/// dead.properties.insert("origin".into(), "test".into());
/// dead.properties.insert("DeadLetterReason".into(), "Invalid".into());
/// let again = redriven(&dead);
/// assert_eq!(again.message_id.as_deref(), Some("m-1"));
/// assert_eq!(again.properties.get("origin").map(String::as_str), Some("test"));
/// assert_eq!(again.properties.get(REDRIVEN_PROPERTY).map(String::as_str), Some("1"));
/// assert!(!again.properties.contains_key("DeadLetterReason"));
/// ```
#[must_use]
pub fn redriven(message: &Message) -> OutgoingMessage {
    let times = times_redriven(message).saturating_add(1);
    let mut properties = message.properties.clone();
    properties.retain(|name, _| {
        !BOOKKEEPING.iter().any(|own| own.eq_ignore_ascii_case(name))
            && !name.eq_ignore_ascii_case(REDRIVEN_PROPERTY)
    });
    properties.insert(REDRIVEN_PROPERTY.to_owned(), times.to_string());
    OutgoingMessage {
        body: message.body.clone(),
        message_id: Some(message.id.clone()),
        session_id: message.session_id.clone(),
        correlation_id: message.correlation_id.clone(),
        content_type: message.content_type.clone(),
        properties,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redriven_counts_up_and_drops_bookkeeping_in_any_case() {
        let mut dead = Message::new("m", "b").with_session_id("s").with_correlation_id("c");
        dead.properties.insert(REDRIVEN_PROPERTY.to_owned(), "2".to_owned());
        dead.properties.insert("deadletterreason".to_owned(), "x".to_owned());
        dead.properties.insert(DELIVERY_COUNT_PROPERTY.to_owned(), "9".to_owned());
        dead.properties.insert("keep".to_owned(), "me".to_owned());
        let again = redriven(&dead);
        assert_eq!(again.session_id.as_deref(), Some("s"));
        assert_eq!(again.correlation_id.as_deref(), Some("c"));
        assert_eq!(
            again.properties.into_iter().collect::<Vec<_>>(),
            vec![
                ("keep".to_owned(), "me".to_owned()),
                (REDRIVEN_PROPERTY.to_owned(), "3".to_owned())
            ]
        );
    }

    #[test]
    fn a_garbled_redriven_count_starts_again() {
        let mut dead = Message::new("m", "b");
        dead.properties.insert(REDRIVEN_PROPERTY.to_owned(), "many".to_owned());
        assert_eq!(times_redriven(&dead), 0);
        assert_eq!(
            redriven(&dead).properties.get(REDRIVEN_PROPERTY).map(String::as_str),
            Some("1")
        );
    }

    #[test]
    fn selections_choose_by_id() {
        let some = Redrive::Ids(["a".to_owned()].into());
        assert!(some.selects("a") && !some.selects("b") && !some.is_empty());
        assert!(Redrive::All.selects("b") && !Redrive::All.is_empty());
        assert!(Redrive::Ids(BTreeSet::new()).is_empty());
    }
}
