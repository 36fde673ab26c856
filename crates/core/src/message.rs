//! Messages as handlers see them, and messages as sinks send them.

use std::collections::BTreeMap;
use std::time::SystemTime;

use bytes::Bytes;

/// A received message, as a [`Handler`](crate::Handler) sees it.
///
/// Handlers get it as `Arc<Message>`; the means to settle it stay with the
/// [`Delivery`](crate::Delivery), which the updater keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The broker's message id.
    pub id: String,
    /// The payload, byte for byte as sent.
    pub body: Bytes,
    /// The ordering key: messages with the same session id are handled one after another.
    pub session_id: Option<String>,
    /// The correlation id set by the sender.
    pub correlation_id: Option<String>,
    /// The content type set by the sender.
    pub content_type: Option<String>,
    /// Application properties (headers) set by the sender.
    pub properties: BTreeMap<String, String>,
    /// How many times this message has been delivered, 1 on the first delivery.
    pub delivery_count: u32,
    /// When the broker accepted the message, where it says so. Informational only.
    pub enqueued_at: Option<SystemTime>,
}

impl Message {
    /// A message with this id and body, delivered for the first time, with no properties.
    ///
    /// Transports fill in the rest of the fields; tests use it with the `with_*` setters.
    #[must_use]
    pub fn new(id: impl Into<String>, body: impl Into<Bytes>) -> Self {
        Self {
            id: id.into(),
            body: body.into(),
            session_id: None,
            correlation_id: None,
            content_type: None,
            properties: BTreeMap::new(),
            delivery_count: 1,
            enqueued_at: None,
        }
    }

    /// Sets the session id.
    #[must_use]
    pub fn with_session_id(mut self, session_id: impl Into<String>) -> Self {
        self.session_id = Some(session_id.into());
        self
    }

    /// Sets the correlation id.
    #[must_use]
    pub fn with_correlation_id(mut self, correlation_id: impl Into<String>) -> Self {
        self.correlation_id = Some(correlation_id.into());
        self
    }

    /// Sets the delivery count.
    #[must_use]
    pub fn with_delivery_count(mut self, delivery_count: u32) -> Self {
        self.delivery_count = delivery_count;
        self
    }

    /// The body as UTF-8 text, if it is valid UTF-8.
    #[must_use]
    pub fn body_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.body).ok()
    }
}

/// A message to send through a [`MessageSink`](crate::MessageSink).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OutgoingMessage {
    /// The payload.
    pub body: Bytes,
    /// The message id; the transport generates one when `None`. Consumers de-duplicate on it.
    pub message_id: Option<String>,
    /// The ordering key.
    pub session_id: Option<String>,
    /// The correlation id.
    pub correlation_id: Option<String>,
    /// The content type, e.g. `application/json`.
    pub content_type: Option<String>,
    /// Application properties (headers).
    pub properties: BTreeMap<String, String>,
}

impl OutgoingMessage {
    /// The size of the whole message as transports count it against their limit
    /// ([`Capabilities::max_body_bytes`](crate::Capabilities::max_body_bytes)): the
    /// body, the ids, the content type and every property's name and value, in bytes.
    #[must_use]
    pub fn size_bytes(&self) -> usize {
        let text = |value: &Option<String>| value.as_ref().map_or(0, String::len);
        self.body.len()
            + text(&self.message_id)
            + text(&self.session_id)
            + text(&self.correlation_id)
            + text(&self.content_type)
            + self.properties.iter().map(|(name, value)| name.len() + value.len()).sum::<usize>()
    }

    /// A message with this body and nothing else set.
    #[must_use]
    pub fn new(body: impl Into<Bytes>) -> Self {
        Self { body: body.into(), ..Self::default() }
    }

    /// A JSON message: the body as given and content type `application/json`.
    #[must_use]
    pub fn json(body: impl Into<Bytes>) -> Self {
        Self::new(body).with_content_type("application/json")
    }

    /// Sets the message id.
    #[must_use]
    pub fn with_message_id(mut self, message_id: impl Into<String>) -> Self {
        self.message_id = Some(message_id.into());
        self
    }

    /// Sets the session id (ordering key).
    #[must_use]
    pub fn with_session_id(mut self, session_id: impl Into<String>) -> Self {
        self.session_id = Some(session_id.into());
        self
    }

    /// Sets the correlation id.
    #[must_use]
    pub fn with_correlation_id(mut self, correlation_id: impl Into<String>) -> Self {
        self.correlation_id = Some(correlation_id.into());
        self
    }

    /// Sets the content type.
    #[must_use]
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// Adds an application property.
    #[must_use]
    pub fn with_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(key.into(), value.into());
        self
    }
}
