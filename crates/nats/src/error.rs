//! This crate's own failures, mapped into [`TransportError`] by what the caller does next.

use std::time::Duration;

use steward_core::{BoxError, TransportError};

/// A failure of this transport, before it is mapped into a [`TransportError`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// Connecting failed, or the connection broke.
    #[error("{what}")]
    Connection { what: String, source: Option<BoxError> },
    /// The server refused the credentials or a permission.
    #[error("{what}")]
    Auth { what: String, source: Option<BoxError> },
    /// The server did not answer in time.
    #[error("{what} did not finish within {after:?}")]
    Timeout { what: String, after: Duration },
    /// A JetStream request timed out.
    #[error("{what}: JetStream did not answer in time")]
    TimedOut { what: String, source: Option<BoxError> },
    /// A stream, consumer or subject does not exist.
    #[error("{entity}")]
    NotFound { entity: String, source: Option<BoxError> },
    /// The queue is not configured on this transport.
    #[error(
        "queue {queue} (not configured: add it with NatsBuilder::with_queue or with_publish_queue)"
    )]
    NotConfigured { queue: String },
    /// A stream or consumer exists with other settings than this transport declares.
    #[error(
        "{entity} exists with {setting} = {actual}, but steward declares {setting} = {expected}"
    )]
    Mismatch { entity: String, setting: &'static str, expected: String, actual: String },
    /// The lock expired before the settlement: another consumer may hold the message.
    #[error("the lock of message {message_id} expired")]
    LockExpired { message_id: String },
    /// The server answered with an error or something unexpected.
    #[error("{what}")]
    JetStream { what: String, source: Option<BoxError> },
    /// A message that cannot be sent as NATS headers.
    #[error("{what}")]
    BadMessage { what: String },
}

impl Error {
    pub(crate) fn connection(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Connection { what: what.into(), source: Some(source.into()) }
    }

    /// A failed JetStream request: retryable when JetStream timed out or is unavailable
    /// (no responders, JetStream unavailable: an outage, a restart, a leader election),
    /// else [`Error::JetStream`].
    pub(crate) fn jetstream(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        let (what, source) = (what.into(), source.into());
        match unavailable(&*source) {
            Some(Unavailable::TimedOut) => Self::TimedOut { what, source: Some(source) },
            Some(Unavailable::Down) => Self::Connection { what, source: Some(source) },
            None => Self::JetStream { what, source: Some(source) },
        }
    }

    /// Maps a failed `connect` by its kind: refused credentials are `Auth`, a wrong URL
    /// is a configuration error, everything else is worth retrying.
    pub(crate) fn connect(url: &str, error: async_nats::ConnectError) -> Self {
        use async_nats::ConnectErrorKind as Kind;
        let what = format!("connect to {url}");
        match error.kind() {
            Kind::Authentication | Kind::AuthorizationViolation => {
                Self::Auth { what, source: Some(error.into()) }
            }
            Kind::ServerParse => Self::JetStream { what, source: Some(error.into()) },
            Kind::TimedOut | Kind::Dns | Kind::Io | Kind::Tls | Kind::MaxReconnects => {
                Self::Connection { what, source: Some(error.into()) }
            }
        }
    }
}

/// Why JetStream did not serve a request, when that is worth retrying.
enum Unavailable {
    TimedOut,
    Down,
}

/// Reads the error chain: async-nats has one error type per request, each with its own
/// kinds, but they all say the same words for these cases.
fn unavailable(error: &(dyn std::error::Error + 'static)) -> Option<Unavailable> {
    let mut next = Some(error);
    while let Some(error) = next {
        let text = error.to_string().to_ascii_lowercase();
        if text.contains("timed out") || text.contains("timeout") {
            return Some(Unavailable::TimedOut);
        }
        // "requested JetStream resource does not exist" is how async-nats shows a request
        // with no responders: nothing serves the JetStream API (a missing stream or
        // consumer is an API error answered by the server, not this).
        let down = [
            "no responders",
            "requested jetstream resource does not exist",
            "jetstream unavailable",
            "jetstream not enabled",
            "temporarily unavailable",
            // Statuses ending a pull: the server shuts down, the consumer's leader moved.
            "server shutdown",
            "leadership change",
        ];
        if down.iter().any(|words| text.contains(words)) {
            return Some(Unavailable::Down);
        }
        next = error.source();
    }
    None
}

impl From<Error> for TransportError {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        match error {
            Error::Connection { source, .. } => with(TransportError::connection(message), source),
            Error::Auth { source, .. } => with(TransportError::auth(message), source),
            Error::Timeout { .. } => TransportError::timeout(message),
            Error::TimedOut { source, .. } => with(TransportError::timeout(message), source),
            Error::NotFound { entity, source } => with(TransportError::not_found(entity), source),
            Error::NotConfigured { .. } => TransportError::not_found(message),
            Error::Mismatch { .. } | Error::BadMessage { .. } => TransportError::protocol(message),
            Error::LockExpired { message_id } => TransportError::lock_lost(message_id),
            Error::JetStream { source, .. } => with(TransportError::protocol(message), source),
        }
    }
}

fn with(error: TransportError, source: Option<BoxError>) -> TransportError {
    match source {
        Some(source) => error.with_source(source),
        None => error,
    }
}

#[cfg(test)]
mod tests {
    use steward_core::ErrorKind;

    use super::*;

    #[test]
    fn kinds_follow_what_the_caller_does_next() {
        let cases = [
            (Error::connection("receive", std::io::Error::other("reset")), ErrorKind::Connection),
            (Error::Auth { what: "connect".into(), source: None }, ErrorKind::Auth),
            (
                Error::Timeout { what: "ack".into(), after: Duration::from_secs(1) },
                ErrorKind::Timeout,
            ),
            (Error::NotFound { entity: "stream S".into(), source: None }, ErrorKind::NotFound),
            (Error::NotConfigured { queue: "q".into() }, ErrorKind::NotFound),
            (
                Error::Mismatch {
                    entity: "stream S".into(),
                    setting: "retention",
                    expected: "WorkQueue".into(),
                    actual: "Limits".into(),
                },
                ErrorKind::Protocol,
            ),
            (Error::LockExpired { message_id: "m".into() }, ErrorKind::LockLost),
            (Error::jetstream("create", std::io::Error::other("bad")), ErrorKind::Protocol),
        ];
        for (error, kind) in cases {
            assert_eq!(TransportError::from(error).kind(), kind);
        }
    }

    /// Ensures that JetStream being slow or unavailable (a request that timed out, no
    /// responders, JetStream unavailable) is retryable, so a NATS outage makes workers
    /// back off instead of failing, while other server errors stay `Protocol`.
    #[test]
    fn jetstream_timeouts_and_unavailability_are_retryable() {
        use async_nats::jetstream::context::{
            CreateStreamError, CreateStreamErrorKind, RequestError, RequestErrorKind,
        };
        let cases = [
            (
                Error::jetstream("read", RequestError::new(RequestErrorKind::TimedOut)),
                ErrorKind::Timeout,
            ),
            (
                Error::jetstream("read", RequestError::new(RequestErrorKind::NoResponders)),
                ErrorKind::Connection,
            ),
            (
                Error::jetstream(
                    "declare",
                    CreateStreamError::new(CreateStreamErrorKind::JetStreamUnavailable),
                ),
                ErrorKind::Connection,
            ),
            (
                Error::jetstream(
                    "declare",
                    CreateStreamError::new(CreateStreamErrorKind::TimedOut),
                ),
                ErrorKind::Timeout,
            ),
            (
                Error::jetstream("declare", RequestError::new(RequestErrorKind::Other)),
                ErrorKind::Protocol,
            ),
        ];
        for (error, kind) in cases {
            let shown = format!("{error:?}");
            let error = TransportError::from(error);
            assert_eq!(error.kind(), kind, "{shown}");
            assert!(std::error::Error::source(&error).is_some(), "the cause is kept: {shown}");
        }
    }

    /// Ensures that a pull the server ends because it is shutting down or because the
    /// consumer's leader changed (a status async-nats reports as a plain I/O error with
    /// the status text) is retryable: both are the server's outage, not a bad request.
    #[test]
    fn pull_statuses_of_a_server_shutdown_or_leader_change_are_retryable() {
        for status in ["Server Shutdown", "Leadership Change"] {
            let source = std::io::Error::other(format!(
                "error while processing messages from the stream: 409, Some({status:?})"
            ));
            let error = TransportError::from(Error::jetstream("pull from q", source));
            assert_eq!(error.kind(), ErrorKind::Connection, "{status}");
        }
    }

    #[test]
    fn a_mismatch_names_the_entity_and_the_setting() {
        let error = TransportError::from(Error::Mismatch {
            entity: "stream STEWARD_jobs".into(),
            setting: "retention",
            expected: "WorkQueue".into(),
            actual: "Limits".into(),
        });
        assert_eq!(
            error.to_string(),
            "protocol error: stream STEWARD_jobs exists with retention = Limits, but steward \
             declares retention = WorkQueue"
        );
    }
}
