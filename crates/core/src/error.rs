//! The error every transport returns.

use std::error::Error as StdError;
use std::fmt;

/// A boxed error kept as the `source()` of a [`TransportError`].
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// What went wrong talking to a broker, named for what the caller does next.
///
/// Transports keep their own private error type and map it into this one, keeping the
/// original error as [`source()`](StdError::source) so the whole chain can be logged once
/// where it is handled. The `Display` text never repeats the source.
///
/// [`is_retryable`](Self::is_retryable) tells a supervisor whether to back off and try
/// again forever (the broker is temporarily unreachable) or to count the error toward
/// its restart limit (the configuration is wrong).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The connection to the broker failed, was refused, reset or closed. Retry later.
    #[error("connection failed: {message}")]
    Connection {
        /// What was being done and with which queue.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
    /// The broker refused the credentials or the permissions. Fix the configuration.
    #[error("not authorised: {message}")]
    Auth {
        /// What was refused.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
    /// The queue (or another entity) does not exist. Fix the configuration or topology.
    #[error("not found: {entity}")]
    NotFound {
        /// The missing queue or entity.
        entity: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
    /// The lock on a delivery was lost: it expired, its channel closed, or the message
    /// went to another consumer. The message must not be settled again; the broker
    /// redelivers it.
    #[error("lock lost for message {message_id}")]
    LockLost {
        /// The broker message id of the delivery.
        message_id: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
    /// The broker did not answer in time. Retry later.
    #[error("timed out: {message}")]
    Timeout {
        /// What was being waited for.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
    /// The broker answered something this transport does not understand, or refused a
    /// request as malformed. Usually a bug or an incompatible broker setting.
    #[error("protocol error: {message}")]
    Protocol {
        /// What was unexpected.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
    /// Anything else.
    #[error("{message}")]
    Other {
        /// What happened.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
}

/// The kind of a [`TransportError`], without its details.
///
/// Useful as a metric label, for matching, and for building errors of a given kind
/// (fault injection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// See [`TransportError::Connection`].
    Connection,
    /// See [`TransportError::Auth`].
    Auth,
    /// See [`TransportError::NotFound`].
    NotFound,
    /// See [`TransportError::LockLost`].
    LockLost,
    /// See [`TransportError::Timeout`].
    Timeout,
    /// See [`TransportError::Protocol`].
    Protocol,
    /// See [`TransportError::Other`].
    Other,
}

impl ErrorKind {
    /// The lowercase name of the kind, as used in logs and metric labels.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Connection => "connection",
            Self::Auth => "auth",
            Self::NotFound => "not_found",
            Self::LockLost => "lock_lost",
            Self::Timeout => "timeout",
            Self::Protocol => "protocol",
            Self::Other => "other",
        }
    }

    /// Whether errors of this kind are worth retrying without limit
    /// (see [`TransportError::is_retryable`]).
    #[must_use]
    pub const fn is_retryable(self) -> bool {
        matches!(self, Self::Connection | Self::Timeout)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TransportError {
    /// Builds an error of `kind` with a message and no source.
    ///
    /// For [`ErrorKind::NotFound`] the message is the missing entity, for
    /// [`ErrorKind::LockLost`] the message id.
    #[must_use]
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        let message = message.into();
        match kind {
            ErrorKind::Connection => Self::Connection { message, source: None },
            ErrorKind::Auth => Self::Auth { message, source: None },
            ErrorKind::NotFound => Self::NotFound { entity: message, source: None },
            ErrorKind::LockLost => Self::LockLost { message_id: message, source: None },
            ErrorKind::Timeout => Self::Timeout { message, source: None },
            ErrorKind::Protocol => Self::Protocol { message, source: None },
            ErrorKind::Other => Self::Other { message, source: None },
        }
    }

    /// A [`TransportError::Connection`] without a source.
    #[must_use]
    pub fn connection(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Connection, message)
    }

    /// A [`TransportError::Auth`] without a source.
    #[must_use]
    pub fn auth(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Auth, message)
    }

    /// A [`TransportError::NotFound`] naming the missing entity.
    #[must_use]
    pub fn not_found(entity: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, entity)
    }

    /// A [`TransportError::LockLost`] for the message with this id.
    #[must_use]
    pub fn lock_lost(message_id: impl Into<String>) -> Self {
        Self::new(ErrorKind::LockLost, message_id)
    }

    /// A [`TransportError::Timeout`] without a source.
    #[must_use]
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Timeout, message)
    }

    /// A [`TransportError::Protocol`] without a source.
    #[must_use]
    pub fn protocol(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Protocol, message)
    }

    /// A [`TransportError::Other`] without a source.
    #[must_use]
    pub fn other(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Other, message)
    }

    /// Sets the underlying error, replacing any earlier one.
    #[must_use]
    pub fn with_source(mut self, error: impl Into<BoxError>) -> Self {
        let slot = match &mut self {
            Self::Connection { source, .. }
            | Self::Auth { source, .. }
            | Self::NotFound { source, .. }
            | Self::LockLost { source, .. }
            | Self::Timeout { source, .. }
            | Self::Protocol { source, .. }
            | Self::Other { source, .. } => source,
        };
        *slot = Some(error.into());
        self
    }

    /// The kind of this error.
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Connection { .. } => ErrorKind::Connection,
            Self::Auth { .. } => ErrorKind::Auth,
            Self::NotFound { .. } => ErrorKind::NotFound,
            Self::LockLost { .. } => ErrorKind::LockLost,
            Self::Timeout { .. } => ErrorKind::Timeout,
            Self::Protocol { .. } => ErrorKind::Protocol,
            Self::Other { .. } => ErrorKind::Other,
        }
    }

    /// Whether the error is transient: the broker is unreachable, reset the connection,
    /// answered with a server error or did not answer in time.
    ///
    /// A supervisor backs off and retries these forever. Every other kind (credentials,
    /// a missing queue, a protocol mismatch, anything unknown) needs a human and counts
    /// toward the restart limit.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }

    /// Whether this is a [`TransportError::LockLost`].
    #[must_use]
    pub fn is_lock_lost(&self) -> bool {
        self.kind() == ErrorKind::LockLost
    }

    /// Whether this is a [`TransportError::NotFound`].
    #[must_use]
    pub fn is_not_found(&self) -> bool {
        self.kind() == ErrorKind::NotFound
    }
}

/// Formats an error and its whole `source()` chain on one line, `outer: inner: innermost`.
///
/// This is how steward logs an error: once, where it is handled, with everything that
/// caused it.
///
/// # Examples
///
/// ```
/// use steward_core::{error_chain, TransportError};
///
/// let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
/// let err = TransportError::connection("receive from orders").with_source(io);
/// assert_eq!(error_chain(&err), "connection failed: receive from orders: refused");
/// ```
#[must_use]
pub fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut out = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        // Some libraries repeat their source in their own message; don't print it twice.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_new() {
        for kind in [
            ErrorKind::Connection,
            ErrorKind::Auth,
            ErrorKind::NotFound,
            ErrorKind::LockLost,
            ErrorKind::Timeout,
            ErrorKind::Protocol,
            ErrorKind::Other,
        ] {
            assert_eq!(TransportError::new(kind, "x").kind(), kind);
        }
    }

    #[test]
    fn only_connection_and_timeout_are_retryable() {
        assert!(TransportError::connection("x").is_retryable());
        assert!(TransportError::timeout("x").is_retryable());
        assert!(!TransportError::auth("x").is_retryable());
        assert!(!TransportError::not_found("q").is_retryable());
        assert!(!TransportError::protocol("x").is_retryable());
        assert!(!TransportError::lock_lost("m").is_retryable());
        assert!(!TransportError::other("x").is_retryable());
    }

    #[test]
    fn source_is_kept_and_chained() {
        let inner = std::io::Error::other("socket closed");
        let err = TransportError::connection("receive from q1").with_source(inner);
        let source = StdError::source(&err).map(ToString::to_string);
        assert_eq!(source.as_deref(), Some("socket closed"));
        assert_eq!(error_chain(&err), "connection failed: receive from q1: socket closed");
    }

    #[test]
    fn display_names_the_entity_and_message_id() {
        assert_eq!(
            TransportError::not_found("queue orders").to_string(),
            "not found: queue orders"
        );
        assert_eq!(TransportError::lock_lost("m-1").to_string(), "lock lost for message m-1");
    }
}
