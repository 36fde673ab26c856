//! [`ServiceBusSink`]: REST sends.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use steward_core::{MessageSink, OutgoingMessage, TransportError};

use crate::client::Shared;
use crate::error::Error;
use crate::message::Outgoing;

/// The longest message or session id Service Bus takes.
const MAX_ID_CHARS: usize = 128;

/// Sends messages to any queue of the namespace with `POST /{queue}/messages`.
///
/// - The body must be UTF-8 (the REST client sends text); the message id, session id,
///   correlation id and content type must be printable ASCII (they travel in headers),
///   ids at most 128 characters; property names must be HTTP header names and not
///   reserved (`content-type`, `x-ms-*`, `x-steward-*`, …). A message breaking these
///   rules is refused with [`TransportError::Protocol`] before anything is sent.
/// - A message without an id gets a random one.
/// - Properties go as custom-property headers with JSON string values; their names
///   arrive in lower case.
/// - A send succeeds on the service's 201. A missing queue (404/410) is
///   [`TransportError::NotFound`], a body over the tier's limit (413)
///   [`TransportError::Protocol`], throttling and server errors retryable.
///
/// Cheap to create and to clone; shares the transport's HTTP connection pool.
#[derive(Clone)]
pub struct ServiceBusSink {
    shared: Arc<Shared>,
}

impl fmt::Debug for ServiceBusSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceBusSink").field("namespace", &self.shared.namespace).finish()
    }
}

impl ServiceBusSink {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

/// Why a header value cannot be sent, if it cannot.
fn check_header_text(what: &str, value: &str, max_chars: Option<usize>) -> Result<(), String> {
    if !value.chars().all(|c| (' '..='~').contains(&c)) {
        return Err(format!("the {what} {value:?} is not printable ASCII"));
    }
    if let Some(max) = max_chars {
        if value.len() > max {
            return Err(format!("the {what} is {} characters long; at most {max}", value.len()));
        }
    }
    Ok(())
}

fn check(outgoing: &Outgoing) -> Result<(), String> {
    check_header_text("message id", &outgoing.message_id, Some(MAX_ID_CHARS))?;
    if let Some(session) = &outgoing.session_id {
        check_header_text("session id", session, Some(MAX_ID_CHARS))?;
    }
    if let Some(correlation) = &outgoing.correlation_id {
        check_header_text("correlation id", correlation, None)?;
    }
    if let Some(content_type) = &outgoing.content_type {
        check_header_text("content type", content_type, None)?;
    }
    Ok(())
}

#[async_trait]
impl MessageSink for ServiceBusSink {
    /// Sends one message to `queue`.
    ///
    /// # Errors
    ///
    /// [`TransportError::NotFound`] for a missing queue; [`TransportError::Protocol`]
    /// for a message that cannot be sent over REST (see the type docs) or is too large;
    /// [`TransportError::Auth`]; retryable connection errors.
    ///
    /// # Cancellation safety
    ///
    /// Not cancel safe: a cancelled send may or may not have been accepted.
    async fn send(&self, queue: &str, message: OutgoingMessage) -> Result<(), TransportError> {
        let id_for_errors = message.message_id.clone().unwrap_or_default();
        let unsendable = |reason: String| Error::Unsendable {
            queue: queue.to_owned(),
            message_id: id_for_errors.clone(),
            reason,
        };
        let (outgoing, body) = Outgoing::from_message(message).map_err(unsendable)?;
        check(&outgoing).map_err(unsendable)?;
        let body = std::str::from_utf8(&body).map_err(|_| {
            unsendable("the body is not UTF-8, and Service Bus REST bodies are text".to_owned())
        })?;
        let message_id = outgoing.message_id.clone();
        self.shared.send(queue, body, outgoing).await?;
        tracing::debug!(queue, message_id, "sent to service bus");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_content_types_must_be_short_printable_ascii() {
        let ok = Outgoing { message_id: "m-1".into(), ..Outgoing::default() };
        assert!(check(&ok).is_ok());
        let long = Outgoing { message_id: "x".repeat(129), ..Outgoing::default() };
        assert!(check(&long).is_err());
        let unicode = Outgoing { message_id: "naïve".into(), ..Outgoing::default() };
        assert!(check(&unicode).is_err());
        let newline = Outgoing {
            message_id: "m".into(),
            correlation_id: Some("a\nb".into()),
            ..Outgoing::default()
        };
        assert!(check(&newline).is_err());
    }
}
