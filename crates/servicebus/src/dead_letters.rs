//! [`DeadLetterQueues`] on Service Bus over REST: `<queue>.dlq`, read with peek-lock and
//! put back with unlock.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use azure_messaging_servicebus::service_bus::PeekLockResponse;
use steward_core::dead_letters::redriven;
use steward_core::{DeadLetter, DeadLetterQueues, Redrive, TransportError};

use crate::client::{Locked, MAX_DEAD_LETTERS_READ, PeekLock, Shared};
use crate::error::{Error, Op};
use crate::message::{
    DEAD_LETTER_DESCRIPTION_PROPERTY, DEAD_LETTER_REASON_PROPERTY, MESSAGE_ID_PROPERTY, Outgoing,
};
use crate::{ServiceBusTransport, dead_letter_queue};

/// The dead-letter queues (`<queue>.dlq`) of a Service Bus namespace, for operators
/// ([`ServiceBusTransport::dead_letter_queues`]).
///
/// Its limits, from REST having no way to look without locking:
///
/// - A peek, and a count, peek-lock each message they read and unlock it again at the
///   end, in the order read. The message keeps its place (its sequence number), but each
///   reading counts as a delivery, and `<queue>.dlq` has a maximum delivery count of
///   its own: a message peeked that often moves on to `<queue>.dlq`'s own dead-letter
///   queue. Peek when asked, never on a timer.
/// - A count reads at most [`MAX_DEAD_LETTERS_READ`] messages.
/// - Messages a concurrent peek, redrive or purge holds are not seen: a peek may show
///   fewer, and a redrive or purge may miss them (never duplicate them).
/// - A redrive sends a copy and then deletes the dead letter: a lock lost between the
///   two leaves the message in both queues. The copy has a new `MessageId` (so a queue
///   with duplicate detection does not drop it as a repeat) and carries the original in
///   `x-steward-message-id`, which the transport's sources restore.
#[derive(Debug, Clone)]
pub struct ServiceBusDeadLetters {
    shared: Arc<Shared>,
}

impl ServiceBusTransport {
    /// The namespace's dead-letter queues (`<queue>.dlq`), for operators; no I/O until
    /// used.
    #[must_use]
    pub fn dead_letter_queues(&self) -> ServiceBusDeadLetters {
        ServiceBusDeadLetters { shared: self.shared().clone() }
    }
}

/// A dead letter read under lock: what it is, and its lock.
struct Held {
    dead: DeadLetter,
    response: PeekLockResponse,
}

/// The [`DeadLetter`] of a message peek-locked from a dead-letter queue: the reason and
/// description out of its properties, and the delivery count it had when it was
/// dead-lettered (this reading is no delivery of it).
pub(crate) fn to_dead_letter(locked: &Locked) -> DeadLetter {
    let mut message = locked.received.message.clone();
    if let Some(count) = locked.received.earlier_deliveries {
        message.delivery_count = count;
    }
    let mut take =
        |name: &str| message.properties.remove(&name.to_ascii_lowercase()).unwrap_or_default();
    let reason = take(DEAD_LETTER_REASON_PROPERTY);
    let description = take(DEAD_LETTER_DESCRIPTION_PROPERTY);
    DeadLetter { message, reason, description }
}

impl ServiceBusDeadLetters {
    /// The next message of `dlq` under lock, skipping unreadable ones (they stay locked
    /// until their locks expire); `None` when none is left.
    async fn next(&self, dlq: &str) -> Result<Option<Held>, Error> {
        loop {
            match self.shared.peek_lock(dlq, Duration::ZERO).await? {
                PeekLock::Message(locked) => {
                    let dead = to_dead_letter(&locked);
                    return Ok(Some(Held { dead, response: locked.response }));
                }
                PeekLock::Empty => return Ok(None),
                PeekLock::Unreadable(error) => tracing::warn!(
                    queue = dlq,
                    error = %steward_core::error_chain(&TransportError::from(error)),
                    "skipped an unreadable dead letter"
                ),
            }
        }
    }

    /// Unlocks `held`, in order. A failed unlock leaves its message locked until the
    /// lock expires; it keeps its place.
    async fn unlock(dlq: &str, held: Vec<Held>) {
        for held in held {
            if let Err(error) = held.response.unlock_message().await {
                let error = Error::azure(Op::Unlock, dlq, Some(&held.dead.message.id), error);
                tracing::warn!(
                    queue = dlq,
                    message_id = held.dead.message.id,
                    error = %steward_core::error_chain(&TransportError::from(error)),
                    "could not unlock a dead letter; it is readable again when its lock expires"
                );
            }
        }
    }

    /// Reads up to `limit` messages of `<queue>.dlq` under lock and unlocks them again.
    async fn read(&self, queue: &str, limit: usize) -> Result<Vec<DeadLetter>, TransportError> {
        let dlq = dead_letter_queue(queue);
        let mut held = Vec::new();
        let mut failure = None;
        while held.len() < limit {
            match self.next(&dlq).await {
                Ok(Some(one)) => held.push(one),
                Ok(None) => break,
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            }
        }
        let read = held.iter().map(|h| h.dead.clone()).collect();
        Self::unlock(&dlq, held).await;
        match failure {
            Some(error) => Err(error.into()),
            None => Ok(read),
        }
    }

    /// Reads `<queue>.dlq` under lock, at most [`MAX_DEAD_LETTERS_READ`] messages; hands
    /// each chosen one to `act` and deletes it once `act` succeeded; unlocks the others
    /// at the end. Returns how many were chosen and deleted.
    async fn take_chosen<F, Fut>(
        &self,
        queue: &str,
        chosen: impl Fn(&str) -> bool,
        act: F,
    ) -> Result<usize, TransportError>
    where
        F: Fn(DeadLetter) -> Fut,
        Fut: Future<Output = Result<(), Error>>,
    {
        let dlq = dead_letter_queue(queue);
        let mut kept = Vec::new();
        let outcome = async {
            let mut done = 0;
            for _ in 0..MAX_DEAD_LETTERS_READ {
                let Some(held) = self.next(&dlq).await? else { break };
                if !chosen(&held.dead.message.id) {
                    kept.push(held);
                    continue;
                }
                let id = held.dead.message.id.clone();
                if let Err(error) = act(held.dead.clone()).await {
                    kept.push(held);
                    return Err(error);
                }
                held.response
                    .delete_message()
                    .await
                    .map_err(|e| Error::azure(Op::Complete, &dlq, Some(&id), e))?;
                done += 1;
            }
            Ok(done)
        }
        .await;
        Self::unlock(&dlq, kept).await;
        Ok(outcome?)
    }
}

#[async_trait]
impl DeadLetterQueues for ServiceBusDeadLetters {
    fn peek_counts_as_delivery(&self) -> bool {
        true
    }

    async fn count(&self, queue: &str) -> Result<u64, TransportError> {
        Ok(self.read(queue, MAX_DEAD_LETTERS_READ).await?.len() as u64)
    }

    async fn peek(&self, queue: &str, limit: usize) -> Result<Vec<DeadLetter>, TransportError> {
        self.read(queue, limit).await
    }

    async fn redrive(&self, queue: &str, which: &Redrive) -> Result<usize, TransportError> {
        if which.is_empty() {
            return Ok(0);
        }
        let shared = &self.shared;
        self.take_chosen(
            queue,
            |id| which.selects(id),
            |dead| async move {
                let again = redriven(&dead.message);
                let body = std::str::from_utf8(&again.body).map_err(|_| Error::Unsendable {
                    queue: queue.to_owned(),
                    message_id: dead.message.id.clone(),
                    reason: "the body is not UTF-8".to_owned(),
                })?;
                // Built directly, not checked as a caller's message: the properties came
                // through the transport, and the redriven count is its own.
                let mut properties = again.properties;
                properties.insert(MESSAGE_ID_PROPERTY.to_owned(), dead.message.id.clone());
                let outgoing = Outgoing {
                    message_id: uuid::Uuid::new_v4().simple().to_string(),
                    session_id: again.session_id,
                    correlation_id: again.correlation_id,
                    content_type: again.content_type,
                    properties,
                    scheduled_at: None,
                };
                shared.send(queue, body, outgoing).await?;
                tracing::info!(queue, message_id = dead.message.id, "dead letter redriven");
                Ok(())
            },
        )
        .await
    }

    async fn purge(&self, queue: &str, ids: &BTreeSet<String>) -> Result<usize, TransportError> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.take_chosen(
            queue,
            |id| ids.contains(id),
            |dead| async move {
                tracing::info!(queue, message_id = dead.message.id, "dead letter purged");
                Ok(())
            },
        )
        .await
    }
}
