//! The transport's own errors, and how they map into [`TransportError`].

use std::time::Duration;

use lapin::ErrorKind as LapinKind;
use steward_core::{ErrorKind, TransportError};

/// Reply codes of AMQP 0-9-1 (and RabbitMQ) that decide what the caller does next.
mod reply {
    pub(super) const CONNECTION_FORCED: u16 = 320;
    pub(super) const ACCESS_REFUSED: u16 = 403;
    pub(super) const NOT_FOUND: u16 = 404;
    pub(super) const RESOURCE_LOCKED: u16 = 405;
    pub(super) const CHANNEL_ERROR: u16 = 504;
    pub(super) const RESOURCE_ERROR: u16 = 506;
    pub(super) const NOT_ALLOWED: u16 = 530;
    pub(super) const INTERNAL_ERROR: u16 = 541;
}

/// Everything that can go wrong in this crate, before it becomes a [`TransportError`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// lapin failed doing `context`.
    #[error("{context}")]
    Lapin {
        context: String,
        #[source]
        source: Box<lapin::Error>,
    },
    /// The consumer's own channel or connection ended with `source`: closed by the
    /// broker (say, over `consumer_timeout`), by an operator or by the network.
    #[error("{context}")]
    ConsumerEnded {
        context: String,
        #[source]
        source: Box<lapin::Error>,
    },
    /// A declare met an existing queue with other arguments.
    #[error(
        "queue {queue} exists with a different {argument} (inequivalent arg); delete the \
         queue or change the configuration to match it"
    )]
    InequivalentArgument {
        queue: String,
        argument: String,
        #[source]
        source: Box<lapin::Error>,
    },
    /// A mandatory publish came back: no queue of that name.
    #[error("queue {queue} (the message was returned unroutable: {reply_text})")]
    Unroutable { queue: String, reply_text: String },
    /// The broker refused to take a published message.
    #[error("the broker refused (nacked) a message published to queue {queue}")]
    Nacked { queue: String },
    /// The broker did not answer in time.
    #[error("no answer within {after:?} while {what}")]
    Timeout { what: String, after: Duration },
    /// A value does not fit the AMQP field it goes into.
    #[error("{what} is {len} bytes long; AMQP allows at most 255")]
    TooLong { what: String, len: usize },
    /// A source was asked for a queue this transport was not configured with, so its
    /// dead-letter queue and delay buckets were never declared.
    #[error(
        "queue {queue} is not configured on this transport: add it with \
         RabbitMqBuilder::with_queue, which declares it with its dead-letter queue and \
         delay buckets"
    )]
    NotConfigured { queue: String },
    /// The source's consumer was cancelled by the broker.
    #[error("the broker cancelled the consumer of queue {queue}")]
    ConsumerCancelled { queue: String },
    /// A delivery came from a channel that is gone.
    #[error("the channel of message {message_id} is closed")]
    ChannelGone { message_id: String },
}

impl Error {
    /// A lapin error while doing `context`; recognises "inequivalent arg" answers to
    /// a queue declare.
    pub(crate) fn lapin(context: impl Into<String>, source: lapin::Error) -> Self {
        Self::Lapin { context: context.into(), source: Box::new(source) }
    }

    /// The consumer's channel or connection ended with `source` while doing `context`.
    pub(crate) fn consumer_ended(context: impl Into<String>, source: lapin::Error) -> Self {
        Self::ConsumerEnded { context: context.into(), source: Box::new(source) }
    }

    /// The kind of [`TransportError`] this error becomes.
    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            Self::Lapin { source, .. } => lapin_kind(source),
            // Whatever the reply code (a consumer_timeout is 406 PRECONDITION_FAILED), a
            // closed channel is fixed by a new consumer, unless it was refused or is gone.
            Self::ConsumerEnded { source, .. } => match lapin_kind(source) {
                kind @ (ErrorKind::Auth | ErrorKind::NotFound) => kind,
                _ => ErrorKind::Connection,
            },
            Self::InequivalentArgument { .. } | Self::TooLong { .. } => ErrorKind::Protocol,
            Self::Unroutable { .. } | Self::NotConfigured { .. } => ErrorKind::NotFound,
            Self::Nacked { .. } | Self::ConsumerCancelled { .. } => ErrorKind::Connection,
            Self::Timeout { .. } => ErrorKind::Timeout,
            Self::ChannelGone { .. } => ErrorKind::LockLost,
        }
    }
}

impl From<Error> for TransportError {
    fn from(error: Error) -> Self {
        let kind = error.kind();
        let message = error.to_string();
        match error {
            // NotFound and LockLost display the entity and message id themselves.
            Error::Unroutable { ref queue, .. } => {
                TransportError::not_found(format!("queue {queue}")).with_source(error)
            }
            Error::NotConfigured { ref queue } => {
                TransportError::not_found(format!("queue {queue} (not configured)"))
                    .with_source(error)
            }
            Error::ChannelGone { ref message_id } => {
                TransportError::lock_lost(message_id.clone()).with_source(error)
            }
            Error::Lapin { context, source } | Error::ConsumerEnded { context, source }
                if kind == ErrorKind::NotFound =>
            {
                let text = reply_text(&source).unwrap_or_default();
                let entity = quoted_after(&text, "queue '")
                    .map_or(context, |queue| format!("queue {queue}"));
                TransportError::not_found(entity).with_source(source)
            }
            Error::Lapin { context, source } | Error::ConsumerEnded { context, source } => {
                TransportError::new(kind, context).with_source(source)
            }
            Error::InequivalentArgument { source, .. } => {
                TransportError::new(kind, message).with_source(source)
            }
            _ => TransportError::new(kind, message),
        }
    }
}

/// Whether `error` means the connection or channel is gone (as opposed to a refusal).
pub(crate) fn is_closed(error: &lapin::Error) -> bool {
    lapin_kind(error) == ErrorKind::Connection
}

/// Whether `error` is the broker's `RESOURCE_LOCKED`: an exclusive queue of another
/// connection.
pub(crate) fn is_resource_locked(error: &lapin::Error) -> bool {
    matches!(error.kind(), LapinKind::ProtocolError(amqp) if amqp.get_id() == reply::RESOURCE_LOCKED)
}

/// What the caller does next after a lapin error.
pub(crate) fn lapin_kind(error: &lapin::Error) -> ErrorKind {
    match error.kind() {
        LapinKind::ProtocolError(amqp) => match amqp.get_id() {
            reply::ACCESS_REFUSED | reply::NOT_ALLOWED => ErrorKind::Auth,
            reply::NOT_FOUND => ErrorKind::NotFound,
            reply::CONNECTION_FORCED
            | reply::RESOURCE_LOCKED
            | reply::CHANNEL_ERROR
            | reply::RESOURCE_ERROR
            | reply::INTERNAL_ERROR => ErrorKind::Connection,
            _ => ErrorKind::Protocol,
        },
        LapinKind::AuthProviderError(_) => ErrorKind::Auth,
        LapinKind::IOError(_)
        | LapinKind::RuntimeShutdownError(_)
        | LapinKind::MissingHeartbeatError
        | LapinKind::InvalidChannel(_)
        | LapinKind::InvalidChannelState(..)
        | LapinKind::InvalidConnectionState(_)
        | LapinKind::ChannelsLimitReached => ErrorKind::Connection,
        LapinKind::InvalidProtocolVersion(_)
        | LapinKind::ParsingError(_)
        | LapinKind::SerialisationError(_) => ErrorKind::Protocol,
        _ => ErrorKind::Other,
    }
}

/// The broker's reply text, for protocol errors.
pub(crate) fn reply_text(error: &lapin::Error) -> Option<String> {
    match error.kind() {
        LapinKind::ProtocolError(amqp) => Some(amqp.get_message().to_string()),
        _ => None,
    }
}

/// The argument named in a `PRECONDITION_FAILED - inequivalent arg '<argument>' ...`
/// reply, if `error` is one.
pub(crate) fn inequivalent_argument(error: &lapin::Error) -> Option<String> {
    quoted_after(&reply_text(error)?, "inequivalent arg '")
}

/// The text between `marker` and the next `'`.
fn quoted_after(text: &str, marker: &str) -> Option<String> {
    let start = text.find(marker)? + marker.len();
    let len = text[start..].find('\'')?;
    Some(text[start..start + len].to_owned())
}

#[cfg(test)]
mod tests {
    use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPHardError, AMQPSoftError};

    use super::*;

    fn protocol(kind: AMQPErrorKind, text: &str) -> lapin::Error {
        LapinKind::ProtocolError(AMQPError::new(kind, text.into())).into()
    }

    #[test]
    fn refused_credentials_and_vhost_map_to_auth() {
        let refused = protocol(
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED),
            "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN",
        );
        assert_eq!(lapin_kind(&refused), ErrorKind::Auth);
        let vhost = protocol(
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED),
            "NOT_ALLOWED - access to vhost 'x' refused for user 'guest'",
        );
        assert_eq!(lapin_kind(&vhost), ErrorKind::Auth);
        let err = TransportError::from(Error::lapin("connect", refused));
        assert_eq!(err.kind(), ErrorKind::Auth);
        assert!(!err.is_retryable());
    }

    #[test]
    fn missing_queue_maps_to_not_found_naming_the_queue() {
        let missing = protocol(
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND),
            "NOT_FOUND - no queue 'orders' in vhost '/'",
        );
        let err = TransportError::from(Error::lapin("consume from orders", missing));
        assert_eq!(err.to_string(), "not found: queue orders");
    }

    #[test]
    fn closed_connections_and_timeouts_are_retryable() {
        let forced = protocol(
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED),
            "CONNECTION_FORCED - closed via management plugin",
        );
        assert!(TransportError::from(Error::lapin("receive", forced)).is_retryable());
        let io: lapin::Error = std::io::Error::from(std::io::ErrorKind::ConnectionReset).into();
        assert!(is_closed(&io));
        assert!(TransportError::from(Error::lapin("receive", io)).is_retryable());
        let heartbeat: lapin::Error = LapinKind::MissingHeartbeatError.into();
        assert!(TransportError::from(Error::lapin("receive", heartbeat)).is_retryable());
        let timeout = Error::Timeout { what: "waiting".into(), after: Duration::from_secs(1) };
        assert_eq!(TransportError::from(timeout).kind(), ErrorKind::Timeout);
    }

    #[test]
    fn a_consumer_channel_closed_by_the_broker_is_retryable_unless_refused_or_gone() {
        let timed_out = || {
            protocol(
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
                "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out. \
                 Timeout value used: 1800000 ms",
            )
        };
        let err = TransportError::from(Error::consumer_ended("receive from queue q", timed_out()));
        assert_eq!(err.kind(), ErrorKind::Connection);
        assert!(err.is_retryable());
        let chain = steward_core::error_chain(&err);
        assert!(chain.contains("receive from queue q") && chain.contains("timed out"), "{chain}");
        // The same reply to anything but the consumer's own channel is a refusal.
        assert_eq!(
            TransportError::from(Error::lapin("declare", timed_out())).kind(),
            ErrorKind::Protocol
        );

        let unexpected = protocol(
            AMQPErrorKind::Hard(AMQPHardError::UNEXPECTEDFRAME),
            "UNEXPECTED_FRAME - expected content header",
        );
        let err = TransportError::from(Error::consumer_ended("receive from queue q", unexpected));
        assert_eq!(err.kind(), ErrorKind::Connection);
        let io: lapin::Error = std::io::Error::from(std::io::ErrorKind::ConnectionReset).into();
        let err = TransportError::from(Error::consumer_ended("receive from queue q", io));
        assert_eq!(err.kind(), ErrorKind::Connection);

        let refused = protocol(
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED),
            "ACCESS_REFUSED - access to queue 'q' in vhost '/' refused for user 'u'",
        );
        let err = TransportError::from(Error::consumer_ended("receive from queue q", refused));
        assert_eq!(err.kind(), ErrorKind::Auth);
        assert!(!err.is_retryable());
        let missing = protocol(
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND),
            "NOT_FOUND - no queue 'q' in vhost '/'",
        );
        let err = TransportError::from(Error::consumer_ended("receive from queue q", missing));
        assert_eq!(err.to_string(), "not found: queue q");
        assert!(!err.is_retryable());
    }

    #[test]
    fn inequivalent_arg_names_the_argument() {
        let error = protocol(
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
            "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost '/': \
             received the value 'quorum' of type 'longstr' but current is none",
        );
        assert_eq!(inequivalent_argument(&error).as_deref(), Some("x-queue-type"));
        let err = TransportError::from(Error::InequivalentArgument {
            queue: "q".into(),
            argument: "x-queue-type".into(),
            source: Box::new(error),
        });
        assert_eq!(err.kind(), ErrorKind::Protocol);
        let text = err.to_string();
        assert!(text.contains("queue q") && text.contains("x-queue-type"), "{text}");
    }

    #[test]
    fn unroutable_is_not_found_and_gone_channel_is_lock_lost() {
        let err = TransportError::from(Error::Unroutable {
            queue: "nowhere".into(),
            reply_text: "NO_ROUTE".into(),
        });
        assert_eq!(err.to_string(), "not found: queue nowhere");
        let err = TransportError::from(Error::ChannelGone { message_id: "m-1".into() });
        assert!(err.is_lock_lost());
        assert_eq!(err.to_string(), "lock lost for message m-1");
    }
}
