//! The transport's own errors, and how they map into [`TransportError`].

use std::error::Error as StdError;
use std::fmt;

use azure_core::error::ErrorKind as AzureKind;
use steward_core::{ErrorKind, TransportError};

use crate::auth::TokenError;

/// A REST operation, as errors name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// `POST /{queue}/messages`.
    Send,
    /// `POST /{queue}/messages/head`.
    PeekLock,
    /// `DELETE` on the lock URI.
    Complete,
    /// `PUT` on the lock URI.
    Unlock,
    /// `POST` on the lock URI.
    RenewLock,
}

impl Op {
    const fn as_str(self) -> &'static str {
        match self {
            Self::Send => "send",
            Self::PeekLock => "peek-lock",
            Self::Complete => "complete (delete)",
            Self::Unlock => "abandon (unlock)",
            Self::RenewLock => "renew-lock",
        }
    }

    /// Whether the operation works on one locked message, where 404 means the lock is
    /// gone (as opposed to the queue).
    const fn is_settlement(self) -> bool {
        matches!(self, Self::Complete | Self::Unlock | Self::RenewLock)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The REST protocol's limit that a session-enabled queue runs into.
pub(crate) const SESSION_LIMIT: &str = "the Service Bus REST protocol cannot receive from \
     session-enabled queues; create the queue with sessions off (ordering then comes from the \
     updater within one process)";

/// Everything that can go wrong in this crate, before it becomes a [`TransportError`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// Service Bus answered with an error status.
    #[error("{op} on queue {queue}: Service Bus answered {status}{}", detail_suffix(.detail))]
    Status {
        op: Op,
        queue: String,
        message_id: Option<String>,
        status: u16,
        detail: Option<String>,
    },
    /// The request failed before an answer arrived (connection, timeout, credentials).
    #[error("{op} on queue {queue}")]
    Request {
        op: Op,
        queue: String,
        message_id: Option<String>,
        #[source]
        source: azure_core::Error,
    },
    /// The queue requires sessions, which REST receives cannot serve.
    #[error("queue {queue} requires sessions: {SESSION_LIMIT}")]
    SessionsRequired { queue: String },
    /// The queue `<queue>.dlq` that dead-lettered messages go to does not exist.
    #[error(
        "queue {dead_letter_queue}, the dead-letter queue of {queue} (REST cannot create queues; \
         create it in the namespace)"
    )]
    MissingDeadLetterQueue { queue: String, dead_letter_queue: String },
    /// A message cannot be sent as it is.
    #[error("message {message_id} cannot be sent to queue {queue}: {reason}")]
    Unsendable { queue: String, message_id: String, reason: String },
    /// A received message could not be read; it stays locked until its lock expires.
    #[error("a message received from queue {queue} cannot be read: {reason}")]
    Unreadable { queue: String, reason: String },
}

fn detail_suffix(detail: &Option<String>) -> String {
    detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default()
}

impl Error {
    /// An error status answered to `op`.
    pub(crate) fn status(
        op: Op,
        queue: &str,
        message_id: Option<&str>,
        status: u16,
        detail: Option<String>,
    ) -> Self {
        Self::Status {
            op,
            queue: queue.to_owned(),
            message_id: message_id.map(str::to_owned),
            status,
            detail,
        }
    }

    /// An error from the Azure crate while doing `op`: an error status (from its
    /// status-checking calls) becomes [`Error::Status`].
    pub(crate) fn azure(
        op: Op,
        queue: &str,
        message_id: Option<&str>,
        source: azure_core::Error,
    ) -> Self {
        if let AzureKind::HttpResponse { status, error_code } = source.kind() {
            return Self::status(op, queue, message_id, u16::from(*status), error_code.clone());
        }
        Self::Request {
            op,
            queue: queue.to_owned(),
            message_id: message_id.map(str::to_owned),
            source,
        }
    }

    /// The kind of [`TransportError`] this error becomes.
    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            Self::Status { op, status, .. } => status_kind(*op, *status),
            Self::Request { source, .. } => request_kind(source),
            Self::SessionsRequired { .. } | Self::Unsendable { .. } | Self::Unreadable { .. } => {
                ErrorKind::Protocol
            }
            Self::MissingDeadLetterQueue { .. } => ErrorKind::NotFound,
        }
    }
}

/// What the caller does next after an error status.
fn status_kind(op: Op, status: u16) -> ErrorKind {
    match status {
        401 | 403 => ErrorKind::Auth,
        // On a lock URI, 404 is "no such lock": it expired, or the message is gone.
        404 if op.is_settlement() => ErrorKind::LockLost,
        404 | 410 => ErrorKind::NotFound,
        // 408 and 429 (throttling) and every server error are worth retrying.
        408 | 429 | 500..=599 => ErrorKind::Connection,
        _ => ErrorKind::Protocol,
    }
}

/// What the caller does next after a request that got no answer.
fn request_kind(error: &azure_core::Error) -> ErrorKind {
    let mut next: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(cause) = next {
        if let Some(token) = cause.downcast_ref::<TokenError>() {
            return token.kind();
        }
        if let Some(http) = cause.downcast_ref::<reqwest::Error>() {
            if http.is_timeout() {
                return ErrorKind::Timeout;
            }
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return ErrorKind::Timeout;
            }
        }
        next = cause.source();
    }
    match error.kind() {
        AzureKind::Io => ErrorKind::Connection,
        AzureKind::Credential => ErrorKind::Auth,
        AzureKind::DataConversion => ErrorKind::Protocol,
        _ => ErrorKind::Other,
    }
}

impl From<Error> for TransportError {
    fn from(error: Error) -> Self {
        let kind = error.kind();
        match error {
            // NotFound and LockLost display the entity and message id themselves.
            Error::MissingDeadLetterQueue { .. } => TransportError::not_found(error.to_string()),
            Error::Status { ref queue, .. } | Error::Request { ref queue, .. }
                if kind == ErrorKind::NotFound =>
            {
                TransportError::not_found(format!("queue {queue}")).with_source(error)
            }
            Error::Status { ref message_id, .. } | Error::Request { ref message_id, .. }
                if kind == ErrorKind::LockLost =>
            {
                let id = message_id.clone().unwrap_or_default();
                TransportError::lock_lost(id).with_source(error)
            }
            Error::Request { op, queue, source, .. } => {
                TransportError::new(kind, format!("{op} on queue {queue}")).with_source(source)
            }
            other => TransportError::new(kind, other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use azure_core::StatusCode;

    use super::*;

    fn status(op: Op, code: u16) -> TransportError {
        Error::status(op, "jobs", Some("m-1"), code, None).into()
    }

    #[test]
    fn receive_statuses_map_to_what_the_caller_does_next() {
        assert_eq!(status(Op::PeekLock, 401).kind(), ErrorKind::Auth);
        assert_eq!(status(Op::PeekLock, 403).kind(), ErrorKind::Auth);
        assert_eq!(status(Op::PeekLock, 404).to_string(), "not found: queue jobs");
        assert_eq!(status(Op::PeekLock, 410).to_string(), "not found: queue jobs");
        for code in [500, 503, 429, 408] {
            assert!(status(Op::PeekLock, code).is_retryable(), "{code}");
        }
        assert_eq!(status(Op::PeekLock, 400).kind(), ErrorKind::Protocol);
        assert_eq!(status(Op::Send, 413).kind(), ErrorKind::Protocol);
    }

    #[test]
    fn settlement_404_is_lock_lost_and_410_is_not_found() {
        for op in [Op::Complete, Op::Unlock, Op::RenewLock] {
            let lost = status(op, 404);
            assert!(lost.is_lock_lost(), "{op}");
            assert_eq!(lost.to_string(), "lock lost for message m-1");
            assert!(status(op, 410).is_not_found(), "{op}");
        }
    }

    #[test]
    fn azure_status_errors_become_status_errors() {
        let azure =
            azure_core::error::ErrorKind::http_response(StatusCode::Gone, None).into_error();
        let error = Error::azure(Op::Complete, "jobs", Some("m-1"), azure);
        assert!(matches!(error, Error::Status { status: 410, .. }));
        assert!(TransportError::from(error).is_not_found());
    }

    #[test]
    fn io_errors_are_retryable_and_timeouts_are_timeouts() {
        let io = azure_core::Error::new(
            azure_core::error::ErrorKind::Io,
            std::io::Error::from(std::io::ErrorKind::ConnectionReset),
        );
        let err = TransportError::from(Error::azure(Op::PeekLock, "jobs", None, io));
        assert_eq!(err.kind(), ErrorKind::Connection);
        assert_eq!(
            steward_core::error_chain(&err),
            "connection failed: peek-lock on queue jobs: connection reset"
        );
        let timed_out = azure_core::Error::new(
            azure_core::error::ErrorKind::Io,
            std::io::Error::from(std::io::ErrorKind::TimedOut),
        );
        let err = TransportError::from(Error::azure(Op::Send, "jobs", None, timed_out));
        assert_eq!(err.kind(), ErrorKind::Timeout);
    }

    #[test]
    fn token_errors_keep_their_kind() {
        let refused = azure_core::Error::new(
            azure_core::error::ErrorKind::Credential,
            TokenError::refused("identity not found"),
        );
        let err = TransportError::from(Error::azure(Op::PeekLock, "jobs", None, refused));
        assert_eq!(err.kind(), ErrorKind::Auth);
        let unavailable = azure_core::Error::new(
            azure_core::error::ErrorKind::Credential,
            TokenError::unavailable("token endpoint answered 503"),
        );
        let err = TransportError::from(Error::azure(Op::PeekLock, "jobs", None, unavailable));
        assert!(err.is_retryable());
    }

    #[test]
    fn session_and_dead_letter_queue_errors_name_the_queue() {
        let err =
            TransportError::from(Error::SessionsRequired { queue: "deploymentstatus".into() });
        assert_eq!(err.kind(), ErrorKind::Protocol);
        let text = err.to_string();
        assert!(text.contains("queue deploymentstatus requires sessions"), "{text}");
        assert!(
            text.contains("REST protocol cannot receive from session-enabled queues"),
            "{text}"
        );
        let err = TransportError::from(Error::MissingDeadLetterQueue {
            queue: "jobs".into(),
            dead_letter_queue: "jobs.dlq".into(),
        });
        assert!(err.is_not_found());
        assert!(
            err.to_string().starts_with("not found: queue jobs.dlq, the dead-letter queue of jobs")
        );
    }
}
