//! Where messages go.

use async_trait::async_trait;

use crate::{OutgoingMessage, TransportError};

/// Sends messages to named queues.
///
/// # Contract
///
/// - `send` returns `Ok` only once the broker has accepted the message durably (a
///   publisher confirm, a 201, a committed in-memory queue).
/// - Sending to a queue that does not exist is [`TransportError::NotFound`] where the
///   broker does not create queues on first use; it is never a silent success.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait MessageSink: Send + Sync + 'static {
    /// Sends one message to `queue`.
    ///
    /// # Errors
    ///
    /// [`TransportError::NotFound`] for a missing queue; connection errors as the
    /// transport reports them.
    ///
    /// # Cancellation safety
    ///
    /// Not cancel safe: a cancelled send may or may not have been accepted, so callers
    /// that must not lose a message retry it (consumers de-duplicate on the message id).
    async fn send(&self, queue: &str, message: OutgoingMessage) -> Result<(), TransportError>;
}

#[async_trait]
impl<S: MessageSink + ?Sized> MessageSink for std::sync::Arc<S> {
    async fn send(&self, queue: &str, message: OutgoingMessage) -> Result<(), TransportError> {
        (**self).send(queue, message).await
    }
}

#[async_trait]
impl<S: MessageSink + ?Sized> MessageSink for Box<S> {
    async fn send(&self, queue: &str, message: OutgoingMessage) -> Result<(), TransportError> {
        (**self).send(queue, message).await
    }
}
