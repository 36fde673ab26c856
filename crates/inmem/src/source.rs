//! [`MessageSource`] and settlement handles over the broker.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use steward_core::{Capabilities, Delivery, MessageSource, Settle, TransportError};
use tokio::time::{Instant, sleep};

use crate::InMemoryBroker;
use crate::broker::LockRef;

/// A consumer of one queue of an [`InMemoryBroker`].
///
/// Each source is one "connection": [`Faults::disconnect`](crate::Faults::disconnect)
/// breaks the sources that exist at that moment, as a dropped AMQP connection would.
/// The broker hands messages out on `receive` and buffers nothing, so
/// [`stop_receiving`](MessageSource::stop_receiving) has nothing to release; after it,
/// `receive` waits out its `wait` and returns nothing.
#[derive(Debug)]
pub struct InMemorySource {
    broker: InMemoryBroker,
    queue: String,
    generation: u64,
    stopped: AtomicBool,
}

impl InMemorySource {
    pub(crate) fn new(broker: InMemoryBroker, queue: String, generation: u64) -> Self {
        Self { broker, queue, generation, stopped: AtomicBool::new(false) }
    }
}

#[async_trait]
impl MessageSource for InMemorySource {
    fn queue(&self) -> &str {
        &self.queue
    }

    fn capabilities(&self) -> Capabilities {
        self.broker.capabilities()
    }

    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, TransportError> {
        if self.stopped.load(Ordering::Acquire) {
            sleep(wait).await;
            return Ok(Vec::new());
        }
        let locked = self.broker.receive_as(&self.queue, max, wait, Some(self.generation)).await?;
        Ok(locked
            .into_iter()
            .map(|locked| {
                let lock = InMemoryLock {
                    broker: self.broker.clone(),
                    queue: self.queue.clone(),
                    message_id: locked.message.id.clone(),
                    lock: LockRef { sequence: locked.sequence, token: locked.lock_token },
                    locked_until: Mutex::new(locked.locked_until),
                };
                Delivery::new(locked.message, lock)
            })
            .collect())
    }

    async fn stop_receiving(&self) -> Result<(), TransportError> {
        self.stopped.store(true, Ordering::Release);
        Ok(())
    }
}

/// The settlement handle of a message received from an [`InMemorySource`].
#[derive(Debug)]
struct InMemoryLock {
    broker: InMemoryBroker,
    queue: String,
    message_id: String,
    lock: LockRef,
    locked_until: Mutex<Instant>,
}

impl InMemoryLock {
    /// Names the message in a lost-lock error instead of its sequence number.
    fn name_message(&self, error: TransportError) -> TransportError {
        if error.is_lock_lost() {
            TransportError::lock_lost(self.message_id.clone()).with_source(error)
        } else {
            error
        }
    }
}

#[async_trait]
impl Settle for InMemoryLock {
    fn locked_until(&self) -> Option<Instant> {
        Some(*self.locked_until.lock().unwrap_or_else(PoisonError::into_inner))
    }

    async fn renew_lock(&self) -> Result<Option<Instant>, TransportError> {
        let until = self
            .broker
            .renew_lock(&self.queue, self.lock)
            .await
            .map_err(|e| self.name_message(e))?;
        *self.locked_until.lock().unwrap_or_else(PoisonError::into_inner) = until;
        Ok(Some(until))
    }

    async fn complete(&self) -> Result<(), TransportError> {
        self.broker.complete(&self.queue, self.lock).await.map_err(|e| self.name_message(e))
    }

    async fn abandon(&self, delay: Option<Duration>) -> Result<(), TransportError> {
        self.broker.abandon(&self.queue, self.lock, delay).await.map_err(|e| self.name_message(e))
    }

    async fn dead_letter(&self, reason: &str, description: &str) -> Result<(), TransportError> {
        self.broker
            .dead_letter(&self.queue, self.lock, reason, description)
            .await
            .map_err(|e| self.name_message(e))
    }
}
