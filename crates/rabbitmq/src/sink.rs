//! [`RabbitMqSink`]: confirmed publishing on a connection of its own.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use steward_core::{ErrorKind, MessageSink, OutgoingMessage, TransportError};
use tokio::sync::Mutex;
use tracing::debug;

use crate::message::outgoing_properties;
use crate::publish::Publisher;
use crate::{RabbitMq, connect};

/// Sends messages to queues: default exchange, routing key = queue name, persistent,
/// `mandatory`, and `Ok` only after the broker's publisher confirm.
///
/// The sink connects on its first send (declaring the configured topology first, once
/// per [`RabbitMq`]) and again on the first send after its connection was lost, so one
/// sink serves a whole process. Clones share the connection.
#[derive(Clone)]
pub struct RabbitMqSink {
    inner: Arc<Inner>,
}

struct Inner {
    rabbit: RabbitMq,
    publisher: Mutex<Option<Arc<Publisher>>>,
}

impl fmt::Debug for RabbitMqSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let connected = self
            .inner
            .publisher
            .try_lock()
            .ok()
            .map(|slot| slot.as_ref().is_some_and(|p| p.connection().status().connected()));
        f.debug_struct("RabbitMqSink").field("connected", &connected).finish()
    }
}

impl RabbitMqSink {
    pub(crate) fn new(rabbit: RabbitMq) -> Self {
        Self { inner: Arc::new(Inner { rabbit, publisher: Mutex::new(None) }) }
    }

    /// The publisher of the current connection, connecting if there is none.
    async fn publisher(&self) -> Result<Arc<Publisher>, TransportError> {
        let mut slot = self.inner.publisher.lock().await;
        if let Some(publisher) = slot.as_ref().filter(|p| p.connection().status().connected()) {
            return Ok(publisher.clone());
        }
        let rabbit = &self.inner.rabbit;
        rabbit.ensure_topology().await?;
        let config = rabbit.config();
        let connection = connect(config, "sink").await?;
        let publisher = Arc::new(Publisher::new(Arc::new(connection), config.confirm_timeout));
        *slot = Some(publisher.clone());
        Ok(publisher)
    }
}

#[async_trait]
impl MessageSink for RabbitMqSink {
    /// Publishes `message` to `queue` and waits for the broker's confirm.
    ///
    /// # Errors
    ///
    /// [`TransportError::NotFound`] when no queue of that name exists (the broker
    /// returns the mandatory message); [`TransportError::Protocol`] when an id or
    /// property name is longer than AMQP allows, or the broker refuses the message
    /// (say, over its `max_message_size`); retryable connection and timeout errors.
    ///
    /// # Cancellation safety
    ///
    /// Not cancel safe: a cancelled send may or may not have reached the queue.
    async fn send(&self, queue: &str, message: OutgoingMessage) -> Result<(), TransportError> {
        let properties = outgoing_properties(&message)?;
        let publisher = self.publisher().await?;
        match publisher.publish(queue, &message.body, properties).await {
            Ok(()) => Ok(()),
            Err(error) => {
                if matches!(error.kind(), ErrorKind::Connection | ErrorKind::Timeout) {
                    // Open a new connection on the next send rather than wait on this one.
                    let mut slot = self.inner.publisher.lock().await;
                    if slot.as_ref().is_some_and(|current| Arc::ptr_eq(current, &publisher)) {
                        *slot = None;
                        debug!(queue, "sink connection dropped after a failed send");
                    }
                }
                Err(error.into())
            }
        }
    }
}
