//! What application code implements: one message in, one decision out.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::{BoxError, Message};

/// Handles one message and decides what happens to it.
///
/// Handlers never settle messages themselves: they return an [`Outcome`] and the updater
/// settles. Delivery is at least once, so a handler must be idempotent: handling the same
/// message twice must leave the same state as handling it once.
///
/// A handler that panics is treated as [`Outcome::Retry`]; the panic is logged with the
/// message id.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handles `message` and says what to do with it.
    ///
    /// # Cancellation safety
    ///
    /// Handlers may be cancelled (aborted) when a shutdown drain deadline passes; the
    /// message is then abandoned and redelivered, so work must be transactional or
    /// idempotent.
    async fn handle(&self, message: Arc<Message>) -> Outcome;

    /// Checks whether the handler's dependencies answer again, after it returned a
    /// [`Outcome::Retry`] with [`RetryCause::Dependency`]: until a probe succeeds, the
    /// worker receives nothing, so an outage does not burn delivery counts. A database
    /// handler runs `SELECT 1` here.
    ///
    /// The default has no dependency to check and succeeds: the worker then resumes
    /// after the breaker's first pause and lets the next message tell.
    ///
    /// # Errors
    ///
    /// The dependency is still failing.
    ///
    /// # Cancellation safety
    ///
    /// Should be cancel safe: it is dropped when the worker shuts down.
    async fn probe(&self) -> Result<(), BoxError> {
        Ok(())
    }
}

/// Why a message is retried, which decides whether the worker pauses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryCause {
    /// Something about this message: it arrived out of order, or a related record is not
    /// there yet. Other messages go on.
    Message,
    /// A dependency (database, downstream service) is failing. The worker pauses
    /// receiving until a probe succeeds, so an outage does not burn delivery counts.
    Dependency,
}

impl RetryCause {
    /// The lowercase name, as used in logs and metric labels.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Message => "message",
            Self::Dependency => "dependency",
        }
    }
}

/// What a [`Handler`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done: remove the message from the queue.
    Complete,
    /// Try again later: abandon the message, optionally with a delay before redelivery.
    Retry {
        /// How long to keep the message hidden; `None` uses the updater's retry backoff.
        after: Option<Duration>,
        /// Why, for the logs.
        reason: String,
        /// Whether the message or a dependency is at fault.
        cause: RetryCause,
    },
    /// Never going to work: move the message to the dead-letter queue.
    DeadLetter {
        /// A short machine-readable reason, e.g. `MessageFormatIncorrect`.
        reason: String,
        /// A human-readable description.
        description: String,
    },
}

impl Outcome {
    /// A retry because of the message itself, after the updater's backoff.
    #[must_use]
    pub fn retry(reason: impl Into<String>) -> Self {
        Self::Retry { after: None, reason: reason.into(), cause: RetryCause::Message }
    }

    /// A retry because of the message itself, after `after`.
    #[must_use]
    pub fn retry_after(after: Duration, reason: impl Into<String>) -> Self {
        Self::Retry { after: Some(after), reason: reason.into(), cause: RetryCause::Message }
    }

    /// A retry because a dependency failed; the worker pauses until a probe succeeds.
    #[must_use]
    pub fn dependency_failed(reason: impl Into<String>) -> Self {
        Self::Retry { after: None, reason: reason.into(), cause: RetryCause::Dependency }
    }

    /// A dead-letter with this reason and description.
    #[must_use]
    pub fn dead_letter(reason: impl Into<String>, description: impl Into<String>) -> Self {
        Self::DeadLetter { reason: reason.into(), description: description.into() }
    }

    /// The lowercase name of the outcome (`complete`, `retry`, `dead_letter`), as used in
    /// logs and metric labels.
    #[must_use]
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Complete => "complete",
            Self::Retry { .. } => "retry",
            Self::DeadLetter { .. } => "dead_letter",
        }
    }
}

/// A [`Handler`] made from an async closure; see [`handler_fn`].
pub struct HandlerFn<F> {
    f: F,
}

impl<F> fmt::Debug for HandlerFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerFn").finish_non_exhaustive()
    }
}

/// Makes a [`Handler`] from an async closure.
///
/// # Examples
///
/// ```
/// use steward_core::{handler_fn, Outcome};
///
/// let handler = handler_fn(|message| async move {
///     if message.body.is_empty() {
///         Outcome::dead_letter("Empty", "the body is empty")
///     } else {
///         Outcome::Complete
///     }
/// });
/// # let _ = handler;
/// ```
#[must_use]
pub fn handler_fn<F, Fut>(f: F) -> HandlerFn<F>
where
    F: Fn(Arc<Message>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    HandlerFn { f }
}

#[async_trait]
impl<F, Fut> Handler for HandlerFn<F>
where
    F: Fn(Arc<Message>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    async fn handle(&self, message: Arc<Message>) -> Outcome {
        (self.f)(message).await
    }
}

#[async_trait]
impl<H: Handler + ?Sized> Handler for Arc<H> {
    async fn handle(&self, message: Arc<Message>) -> Outcome {
        (**self).handle(message).await
    }

    async fn probe(&self) -> Result<(), BoxError> {
        (**self).probe().await
    }
}
