//! [`DeadLetterQueues`] on the in-memory broker: a true peek, and redrives and purges
//! that are one step under the broker's lock.

use std::collections::BTreeSet;

use async_trait::async_trait;
use steward_core::dead_letters::redriven;
use steward_core::{DeadLetter, DeadLetterQueues, Message, Redrive, TransportError};
use tokio::time::Instant;

use crate::InMemoryBroker;
use crate::queue::Stored;

/// The dead-letter sub-queues of an [`InMemoryBroker`], for operators
/// ([`InMemoryBroker::dead_letter_queues`]).
///
/// Its limits: none beyond the broker's. A peek reads without locking, so delivery
/// counts never rise; a message a consumer of the dead-letter sub-queue holds under
/// lock is peeked but neither redriven nor purged.
#[derive(Debug, Clone)]
pub struct InMemoryDeadLetters {
    broker: InMemoryBroker,
}

impl InMemoryBroker {
    /// The broker's dead-letter sub-queues, for operators.
    #[must_use]
    pub fn dead_letter_queues(&self) -> InMemoryDeadLetters {
        InMemoryDeadLetters { broker: self.clone() }
    }
}

impl InMemoryDeadLetters {
    /// Removes the unlocked messages of `queue`'s dead-letter sub-queue that `chosen`
    /// picks, after checking that `queue` exists (in a broker that is not strict, a
    /// queue never used has no dead letters).
    fn remove(
        &self,
        queue: &str,
        then: impl FnOnce(&mut Vec<Stored>, &mut crate::queue::Entity),
        chosen: impl FnMut(&Stored) -> bool,
    ) -> Result<usize, TransportError> {
        let dlq = InMemoryBroker::dead_letter_queue_name(queue);
        let now = Instant::now();
        self.broker.with_entities(|entities, strict| {
            if !entities.contains_key(queue) || !entities.contains_key(&dlq) {
                return if strict {
                    Err(TransportError::not_found(format!("queue {queue}")))
                } else {
                    Ok(0)
                };
            }
            let mut taken = entities
                .get_mut(&dlq)
                .map(|entity| entity.remove_unlocked(now, chosen))
                .unwrap_or_default();
            let count = taken.len();
            if let Some(target) = entities.get_mut(queue) {
                then(&mut taken, target);
            }
            Ok(count)
        })
    }
}

/// The message a redrive puts back: [`redriven`], as the broker stores a sent one.
fn stored_again(message: &Message) -> Message {
    let outgoing = redriven(message);
    Message {
        id: message.id.clone(),
        body: outgoing.body,
        session_id: outgoing.session_id,
        correlation_id: outgoing.correlation_id,
        content_type: outgoing.content_type,
        properties: outgoing.properties,
        delivery_count: 0,
        enqueued_at: None,
    }
}

#[async_trait]
impl DeadLetterQueues for InMemoryDeadLetters {
    fn peek_counts_as_delivery(&self) -> bool {
        false
    }

    async fn count(&self, queue: &str) -> Result<u64, TransportError> {
        // Removes nothing: checks that the queue exists.
        self.remove(queue, |_, _| {}, |_| false)?;
        Ok(self.broker.dead_letter_count(queue) as u64)
    }

    async fn peek(&self, queue: &str, limit: usize) -> Result<Vec<DeadLetter>, TransportError> {
        // Removes nothing: checks that the queue exists.
        self.remove(queue, |_, _| {}, |_| false)?;
        let mut dead = self.broker.dead_letters(queue);
        dead.truncate(limit);
        Ok(dead)
    }

    async fn redrive(&self, queue: &str, which: &Redrive) -> Result<usize, TransportError> {
        let count = self.remove(
            queue,
            |taken, target| {
                let now = Instant::now();
                for stored in taken.drain(..) {
                    let message = stored_again(&stored.message);
                    tracing::info!(queue, message_id = %message.id, "dead letter redriven");
                    target.push(message, now, None);
                }
            },
            |stored| which.selects(&stored.message.id),
        )?;
        Ok(count)
    }

    async fn purge(&self, queue: &str, ids: &BTreeSet<String>) -> Result<usize, TransportError> {
        self.remove(
            queue,
            |taken, _| {
                for stored in taken.iter() {
                    tracing::info!(queue, message_id = %stored.message.id, "dead letter purged");
                }
            },
            |stored| ids.contains(&stored.message.id),
        )
    }
}

#[cfg(test)]
mod tests {
    use steward_core::transport::{DEAD_LETTER_DESCRIPTION_PROPERTY, DEAD_LETTER_REASON_PROPERTY};

    use super::*;

    #[test]
    fn a_stored_redrive_counts_from_zero_and_drops_the_reason() {
        let mut dead = Message::new("m", "b").with_delivery_count(4);
        dead.properties.insert(DEAD_LETTER_REASON_PROPERTY.to_owned(), "r".to_owned());
        dead.properties.insert(DEAD_LETTER_DESCRIPTION_PROPERTY.to_owned(), "d".to_owned());
        let again = stored_again(&dead);
        assert_eq!(again.delivery_count, 0);
        assert_eq!(again.enqueued_at, None);
        assert_eq!(
            again.properties.keys().collect::<Vec<_>>(),
            [steward_core::dead_letters::REDRIVEN_PROPERTY]
        );
    }
}
