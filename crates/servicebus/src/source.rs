//! [`ServiceBusSource`]: sequential peek-locks, and the lock handle that settles them.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use azure_messaging_servicebus::service_bus::PeekLockResponse;
use steward_core::{Capabilities, Delivery, Message, MessageSource, Settle, TransportError};
use tokio::time::Instant;

use crate::client::{Locked, PeekLock, Shared};
use crate::error::{Error, Op};
use crate::message::{
    DEAD_LETTER_DESCRIPTION_PROPERTY, DEAD_LETTER_REASON_PROPERTY,
    MAX_DEAD_LETTER_DESCRIPTION_CHARS, MESSAGE_ID_PROPERTY, Outgoing,
};
use crate::{CAPABILITIES, dead_letter_queue};

/// A consumer of one queue: each `receive` is a series of REST peek-locks.
///
/// - `receive(max, wait)`: the first peek-lock asks the service to wait `wait`, rounded
///   up to whole seconds; the next ones (up to `max` in all) wait 0 and stop at the first
///   empty answer. Nothing is prefetched or buffered.
/// - Statuses are checked by hand: 201 is a message, 204 nothing; 401/403 are
///   [`TransportError::Auth`]; 404/410 [`TransportError::NotFound`]; 405 (a
///   session-enabled queue) [`TransportError::Protocol`]; 408, 429 and 5xx retryable
///   [`TransportError::Connection`]. An error after some messages were locked ends the
///   batch: the messages are returned and the error is logged; the next call meets it.
/// - A message that cannot be read (no usable `BrokerProperties`, a body that is not
///   UTF-8) is logged and skipped; it stays locked until its lock expires and, after
///   the queue's maximum delivery count, lands in the native `$DeadLetterQueue`.
/// - Settlement through the delivery: complete = delete, abandon = unlock, renew =
///   renew-lock on the lock URI; abandon with a delay and dead-letter send a copy, then
///   delete (see the crate docs). 404 on the lock URI is [`TransportError::LockLost`].
/// - After [`stop_receiving`](MessageSource::stop_receiving) there is nothing to
///   release; `receive` then waits out its `wait` and returns nothing.
///
/// Sources share their transport's HTTP connection pool; creating one does no I/O.
pub struct ServiceBusSource {
    shared: Arc<Shared>,
    queue: String,
    stopped: AtomicBool,
}

impl fmt::Debug for ServiceBusSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceBusSource")
            .field("queue", &self.queue)
            .field("namespace", &self.shared.namespace)
            .field("stopped", &self.stopped.load(Ordering::Relaxed))
            .finish()
    }
}

impl ServiceBusSource {
    pub(crate) fn new(shared: Arc<Shared>, queue: String) -> Self {
        Self { shared, queue, stopped: AtomicBool::new(false) }
    }

    fn delivery(&self, locked: Locked) -> Delivery {
        let Locked { response, received } = locked;
        let lock = ServiceBusLock {
            shared: self.shared.clone(),
            queue: self.queue.clone(),
            message: received.message.clone(),
            response,
            lock_duration: received.lock_duration,
            locked_until: Mutex::new(received.locked_until),
        };
        Delivery::new(received.message, lock)
    }
}

/// `wait` in whole seconds, rounded up: the REST `timeout` parameter.
fn whole_seconds(wait: Duration) -> Duration {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    Duration::from_secs(secs)
}

#[async_trait]
impl MessageSource for ServiceBusSource {
    fn queue(&self) -> &str {
        &self.queue
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    /// Up to `max` messages by sequential peek-locks, the first waiting about `wait`.
    ///
    /// # Errors
    ///
    /// [`TransportError::Auth`] (401/403), [`TransportError::NotFound`] (404/410),
    /// [`TransportError::Protocol`] (a session-enabled queue, other refusals),
    /// retryable [`TransportError::Connection`] and [`TransportError::Timeout`].
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: a message locked by a request whose answer is dropped is delivered
    /// again once its lock expires.
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, TransportError> {
        if self.stopped.load(Ordering::Acquire) {
            tokio::time::sleep(wait).await;
            return Ok(Vec::new());
        }
        let mut deliveries = Vec::new();
        for attempt in 0..max {
            let timeout = if attempt == 0 { whole_seconds(wait) } else { Duration::ZERO };
            match self.shared.peek_lock(&self.queue, timeout).await {
                Ok(PeekLock::Message(locked)) => deliveries.push(self.delivery(*locked)),
                Ok(PeekLock::Empty) => break,
                Ok(PeekLock::Unreadable(error)) => {
                    let error = TransportError::from(error);
                    tracing::error!(
                        queue = self.queue,
                        error = %steward_core::error_chain(&error),
                        "skipped a message that cannot be read; it is delivered again when its lock expires"
                    );
                }
                Err(error) if deliveries.is_empty() => return Err(error.into()),
                Err(error) => {
                    let error = TransportError::from(error);
                    tracing::warn!(
                        queue = self.queue,
                        received = deliveries.len(),
                        error = %steward_core::error_chain(&error),
                        "peek-lock failed part-way through a batch; returning what was received"
                    );
                    break;
                }
            }
        }
        Ok(deliveries)
    }

    /// Stops intake; nothing is buffered, so nothing needs releasing.
    ///
    /// # Errors
    ///
    /// None.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    async fn stop_receiving(&self) -> Result<(), TransportError> {
        self.stopped.store(true, Ordering::Release);
        Ok(())
    }
}

/// The lock on one peek-locked message: the Azure crate's [`PeekLockResponse`], which
/// settles through the lock URI, and what copies of the message need.
struct ServiceBusLock {
    shared: Arc<Shared>,
    queue: String,
    message: Message,
    response: PeekLockResponse,
    /// The lock duration observed on receipt; a renewal extends the lock by as much.
    lock_duration: Duration,
    locked_until: Mutex<Instant>,
}

impl ServiceBusLock {
    fn error(&self, op: Op, error: azure_core::Error) -> TransportError {
        Error::azure(op, &self.queue, Some(&self.message.id), error).into()
    }

    /// Renews the lock: before a copy is made, it proves the lock is still held (a stale
    /// delivery must not copy a message another consumer holds) and gives the copy a
    /// whole lock duration to be sent in.
    async fn renew(&self) -> Result<Instant, TransportError> {
        let requested_at = Instant::now();
        self.response.renew_message_lock().await.map_err(|e| self.error(Op::RenewLock, e))?;
        // The renewal's answer is not documented to carry the new expiry, and the crate
        // drops it anyway: the lock lasts one lock duration from the request.
        let renewed = requested_at + self.lock_duration;
        let mut until = self.locked_until.lock().unwrap_or_else(PoisonError::into_inner);
        *until = (*until).max(renewed);
        Ok(*until)
    }

    fn body(&self) -> Result<&str, TransportError> {
        std::str::from_utf8(&self.message.body).map_err(|_| {
            Error::Unsendable {
                queue: self.queue.clone(),
                message_id: self.message.id.clone(),
                reason: "the body is not UTF-8".to_owned(),
            }
            .into()
        })
    }

    /// Sends `copy` to `queue`, then deletes the original.
    async fn replace_with(&self, queue: &str, copy: Outgoing) -> Result<(), TransportError> {
        let body = self.body()?;
        self.shared.send(queue, body, copy).await.map_err(|error| match error {
            Error::Status { status: 404 | 410, .. } if queue != self.queue => {
                TransportError::from(Error::MissingDeadLetterQueue {
                    queue: self.queue.clone(),
                    dead_letter_queue: queue.to_owned(),
                })
            }
            other => other.into(),
        })?;
        if let Err(error) = self.response.delete_message().await {
            // The caller logs the error; this only records that a copy already exists,
            // so the message will be delivered twice.
            tracing::debug!(
                queue = self.queue,
                message_id = self.message.id,
                copy_queue = queue,
                "the copy was sent but the original could not be deleted"
            );
            return Err(self.error(Op::Complete, error));
        }
        Ok(())
    }
}

#[async_trait]
impl Settle for ServiceBusLock {
    fn locked_until(&self) -> Option<Instant> {
        Some(*self.locked_until.lock().unwrap_or_else(PoisonError::into_inner))
    }

    async fn renew_lock(&self) -> Result<Option<Instant>, TransportError> {
        self.renew().await.map(Some)
    }

    async fn complete(&self) -> Result<(), TransportError> {
        self.response.delete_message().await.map_err(|e| self.error(Op::Complete, e))?;
        Ok(())
    }

    async fn abandon(&self, delay: Option<Duration>) -> Result<(), TransportError> {
        let Some(delay) = delay.filter(|d| !d.is_zero()) else {
            return self.response.unlock_message().await.map_err(|e| self.error(Op::Unlock, e));
        };
        self.renew().await?;
        let mut copy = Outgoing::copy_of(&self.message);
        // A new MessageId, so duplicate detection cannot drop the copy as a repeat of the
        // original; the receiving side restores the original id from the property.
        copy.properties.insert(MESSAGE_ID_PROPERTY.to_owned(), self.message.id.clone());
        copy.message_id = uuid::Uuid::new_v4().simple().to_string();
        copy.scheduled_at = Some(SystemTime::now() + delay);
        self.replace_with(&self.queue, copy).await
    }

    async fn dead_letter(&self, reason: &str, description: &str) -> Result<(), TransportError> {
        self.renew().await?;
        let mut copy = Outgoing::copy_of(&self.message);
        copy.properties.insert(DEAD_LETTER_REASON_PROPERTY.to_owned(), reason.to_owned());
        let description: String =
            description.chars().take(MAX_DEAD_LETTER_DESCRIPTION_CHARS).collect();
        copy.properties.insert(DEAD_LETTER_DESCRIPTION_PROPERTY.to_owned(), description);
        self.replace_with(&dead_letter_queue(&self.queue), copy).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_round_up_to_whole_seconds() {
        assert_eq!(whole_seconds(Duration::ZERO), Duration::ZERO);
        assert_eq!(whole_seconds(Duration::from_millis(1)), Duration::from_secs(1));
        assert_eq!(whole_seconds(Duration::from_millis(1500)), Duration::from_secs(2));
        assert_eq!(whole_seconds(Duration::from_secs(5)), Duration::from_secs(5));
    }
}
