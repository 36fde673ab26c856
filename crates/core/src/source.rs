//! Where messages come from.

use std::time::Duration;

use async_trait::async_trait;

use crate::{Capabilities, Delivery, TransportError};

/// Whether a consumer of a queue that delivers to one consumer at a time (RabbitMQ's
/// single active consumer) is the one receiving, or waits to take over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConsumerRole {
    /// The broker delivers to this consumer.
    Active,
    /// Another consumer receives; this one waits as a hot standby and takes over when
    /// that one goes away. Waiting is healthy: nothing to receive is expected.
    Standby,
}

impl ConsumerRole {
    /// The snake_case name, as in logs and JSON.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Standby => "standby",
        }
    }
}

impl std::fmt::Display for ConsumerRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A queue to receive messages from: the minimum a transport implements.
///
/// # Contract
///
/// - `receive(max, wait)` returns at most `max` deliveries. On an empty queue it waits
///   about `wait` for a message, then returns an empty `Vec`. Once it has a message it
///   returns promptly with what is available, not waiting for `max` (each held message
///   spends its lock). It never busy-spins.
/// - A message is held by at most one consumer at a time.
/// - `receive` is cancel safe: dropping its future loses no message (at worst the
///   message is received again once its lock expires).
/// - After [`stop_receiving`](Self::stop_receiving), messages the source prefetched are
///   back on the queue for other consumers; deliveries already returned can still be
///   settled.
/// - Errors are [`TransportError`]s whose kind says whether retrying makes sense.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait MessageSource: Send + Sync + 'static {
    /// The name of the queue this source reads.
    fn queue(&self) -> &str;

    /// What the transport supports.
    fn capabilities(&self) -> Capabilities;

    /// Receives up to `max` messages, waiting at most about `wait` on an empty queue.
    ///
    /// # Errors
    ///
    /// Connection, authorisation and missing-queue errors as [`TransportError`].
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: a cancelled call loses no message (at worst it is received again
    /// after its lock expires).
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, TransportError>;

    /// Stops intake and releases prefetched or buffered messages, so other consumers get
    /// them at once. The first step of a graceful shutdown.
    ///
    /// # Errors
    ///
    /// Errors releasing the buffered messages; they are then redelivered when the
    /// connection closes or their locks expire.
    ///
    /// # Cancellation safety
    ///
    /// Not cancel safe: a cancelled call may leave some buffered messages unreleased
    /// until their locks expire.
    async fn stop_receiving(&self) -> Result<(), TransportError>;

    /// The role of this consumer when the queue delivers to one consumer at a time,
    /// as best the transport knows it now; `None` (the default) when every consumer of
    /// the queue receives. Cheap: read after every receive.
    fn role(&self) -> Option<ConsumerRole> {
        None
    }
}

/// Implements [`MessageSource`] for a smart pointer to one, by forwarding every call.
macro_rules! forward_source {
    ($($pointer:ident)::+) => {
        #[async_trait]
        impl<S: MessageSource + ?Sized> MessageSource for $($pointer)::+<S> {
            fn queue(&self) -> &str {
                (**self).queue()
            }

            fn capabilities(&self) -> Capabilities {
                (**self).capabilities()
            }

            async fn receive(
                &self,
                max: usize,
                wait: Duration,
            ) -> Result<Vec<Delivery>, TransportError> {
                (**self).receive(max, wait).await
            }

            async fn stop_receiving(&self) -> Result<(), TransportError> {
                (**self).stop_receiving().await
            }

            fn role(&self) -> Option<ConsumerRole> {
                (**self).role()
            }
        }
    };
}

forward_source!(std::sync::Arc);
forward_source!(Box);
