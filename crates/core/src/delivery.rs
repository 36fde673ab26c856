//! A received message together with the means to settle it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::{Message, TransportError};

/// How much earlier than the broker's real lock expiry a transport may report it, on
/// top of twice the Updater's `wait` (see [`Settle`]'s contract).
///
/// After a settlement fails or is given up, a session on a transport without sessions
/// waits for the message until its reported expiry plus `2 × wait` plus this (and past
/// any retry delay). `2 × wait` alone covers a transport's earliness only when `wait`
/// is long: a transport never sees the Updater's `wait`, and its own margins do not
/// shrink with it. Service Bus REST counts the lock from the start of a long poll
/// (up to `wait`, rounded up to seconds) and a second or two short for whole-second
/// clocks, plus the round trip; NATS ends its lock 500 ms early and counts it from up
/// to 250 ms before a message arrived. Both stay well within `2 × wait` plus 5 s for
/// any `wait`; the cost is that a session whose message another consumer took waits
/// 5 s longer before a later message goes first.
pub const LOCK_REPORT_SLACK: Duration = Duration::from_secs(5);

/// How a transport settles one delivery: the half of a [`Delivery`] a handler never sees.
///
/// Transport crates implement this for their lock handle (a lock token, a channel and
/// delivery tag, an HTTP lock URI) and wrap it with [`Delivery::new`].
///
/// # Contract
///
/// - [`Delivery`] calls at most one of `complete`, `abandon` and `dead_letter`, once; it
///   may call `renew_lock` any number of times before that.
/// - Settling after the lock was lost (it expired, the channel closed, or the message
///   went to another consumer) returns [`TransportError::LockLost`] and leaves the
///   current holder's lock untouched.
/// - `locked_until` is a `tokio::time::Instant`, so paused-time tests work; a wall-clock
///   lock time from the broker is converted once, on receipt.
/// - `locked_until` (and each expiry `renew_lock` returns) is never later than the
///   broker's real expiry, as renewals are timed by it, and earlier by less than twice
///   the Updater's `wait` plus [`LOCK_REPORT_SLACK`]: a session's order after a failed
///   settlement waits for the message until then (see `docs/transports.md`).
/// - Dropping an unsettled handle must not lose the message: the broker redelivers it at
///   the latest when its lock expires or its connection closes.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait Settle: Send + Sync + 'static {
    /// When the lock on the message expires, if the transport locks messages for a
    /// limited time.
    fn locked_until(&self) -> Option<Instant>;

    /// Extends the lock and returns its new expiry.
    ///
    /// Transports without timed locks return `Ok(None)`.
    async fn renew_lock(&self) -> Result<Option<Instant>, TransportError>;

    /// Removes the message from the queue.
    ///
    /// A transport may batch removals (RabbitMQ acks several deliveries with one
    /// frame); `Ok` means this message's removal was handed to the broker, not that the
    /// broker applied it: a connection lost right after can still bring the message
    /// back (delivery is at least once).
    async fn complete(&self) -> Result<(), TransportError>;

    /// Releases the message for redelivery, at once or after `delay`.
    async fn abandon(&self, delay: Option<Duration>) -> Result<(), TransportError>;

    /// Moves the message to the dead-letter queue with a reason and a description.
    async fn dead_letter(&self, reason: &str, description: &str) -> Result<(), TransportError>;
}

/// A received message and its settlement handle.
///
/// The message is shared with the handler as `Arc<Message>`; the settlement handle
/// stays here, with the updater. Settling consumes the delivery, so a message is
/// settled at most once.
pub struct Delivery {
    message: Arc<Message>,
    settle: Box<dyn Settle>,
}

impl Delivery {
    /// Wraps a received message and the transport's settlement handle.
    #[must_use]
    pub fn new(message: Message, settle: impl Settle) -> Self {
        Self { message: Arc::new(message), settle: Box::new(settle) }
    }

    /// Replaces the message, keeping the settlement handle: for wrappers that map what a
    /// transport delivers (say, an ordering key read from a custom header).
    #[must_use]
    pub fn map_message(self, f: impl FnOnce(Message) -> Message) -> Self {
        let message = Arc::try_unwrap(self.message).unwrap_or_else(|shared| (*shared).clone());
        Self { message: Arc::new(f(message)), settle: self.settle }
    }

    /// The message, shared.
    #[must_use]
    pub fn message(&self) -> &Arc<Message> {
        &self.message
    }

    /// When the lock on the message expires, if the transport uses timed locks.
    #[must_use]
    pub fn locked_until(&self) -> Option<Instant> {
        self.settle.locked_until()
    }

    /// Extends the lock; returns the new expiry (`None` for transports without timed locks).
    ///
    /// # Errors
    ///
    /// [`TransportError::LockLost`] when the lock already expired or the message went to
    /// another consumer; connection errors as the transport reports them.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: a cancelled renewal leaves the lock as it was or renewed.
    pub async fn renew_lock(&self) -> Result<Option<Instant>, TransportError> {
        self.settle.renew_lock().await
    }

    /// Removes the message from the queue.
    ///
    /// # Errors
    ///
    /// [`TransportError::LockLost`] when the lock was lost; the broker will redeliver.
    ///
    /// # Cancellation safety
    ///
    /// Not cancel safe: a cancelled call may or may not have completed the message.
    pub async fn complete(self) -> Result<(), TransportError> {
        self.settle.complete().await
    }

    /// Releases the message for redelivery, at once (`None`) or after `delay`.
    ///
    /// The delivery count is kept, and grows by one on the next delivery.
    ///
    /// # Errors
    ///
    /// [`TransportError::LockLost`] when the lock was lost; the broker will redeliver.
    ///
    /// # Cancellation safety
    ///
    /// Not cancel safe: a cancelled call may or may not have released the message.
    pub async fn abandon(self, delay: Option<Duration>) -> Result<(), TransportError> {
        self.settle.abandon(delay).await
    }

    /// Moves the message to the dead-letter queue with a reason and a description.
    ///
    /// # Errors
    ///
    /// [`TransportError::LockLost`] when the lock was lost; the broker will redeliver.
    ///
    /// # Cancellation safety
    ///
    /// Not cancel safe: a cancelled call may or may not have moved the message.
    pub async fn dead_letter(self, reason: &str, description: &str) -> Result<(), TransportError> {
        self.settle.dead_letter(reason, description).await
    }
}

impl Delivery {
    /// The settlement handle, for settling through a shared delivery (the Updater
    /// renews and settles off its event loop).
    pub(crate) fn settle_handle(&self) -> &dyn Settle {
        self.settle.as_ref()
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("message_id", &self.message.id)
            .field("session_id", &self.message.session_id)
            .field("delivery_count", &self.message.delivery_count)
            .field("locked_until", &self.locked_until())
            .finish_non_exhaustive()
    }
}
