//! How steward messages map onto NATS messages: the headers, both ways.

use std::collections::BTreeMap;
use std::time::SystemTime;

use async_nats::HeaderMap;
use async_nats::header::HeaderName;
use bytes::Bytes;
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use steward_core::transport::{
    DEAD_LETTER_DESCRIPTION_PROPERTY, DEAD_LETTER_REASON_PROPERTY, DELIVERY_COUNT_PROPERTY,
};
use steward_core::{Message, OutgoingMessage};

use crate::error::Error;

/// The header holding the message id; JetStream de-duplicates on it within the stream's
/// duplicate window.
pub const MESSAGE_ID_HEADER: &str = "Nats-Msg-Id";

/// The header holding the session id (ordering key), as the RabbitMQ transport names it.
pub const SESSION_ID_HEADER: &str = "x-session-id";

/// The header holding the correlation id.
pub const CORRELATION_ID_HEADER: &str = "x-correlation-id";

/// The header holding the content type.
pub const CONTENT_TYPE_HEADER: &str = "content-type";

/// The header of a dead letter holding the reason given to `dead_letter`.
pub const DEAD_LETTER_REASON_HEADER: &str = DEAD_LETTER_REASON_PROPERTY;

/// The header of a dead letter holding the description given to `dead_letter`.
pub const DEAD_LETTER_DESCRIPTION_HEADER: &str = DEAD_LETTER_DESCRIPTION_PROPERTY;

/// The header of a dead letter holding the id of the message it copies: the copy's own
/// `Nats-Msg-Id` is `dlq-<stream>-<sequence>-<published>`, so the dead-letter stream does
/// not drop it as a duplicate of an earlier dead letter that shares the message id.
pub const DEAD_LETTER_MESSAGE_ID_HEADER: &str = "x-steward-message-id";

/// The header of a dead letter holding the delivery count the message had when it was
/// dead-lettered.
pub const DELIVERY_COUNT_HEADER: &str = DELIVERY_COUNT_PROPERTY;

/// What [`encode`] escapes: control characters (line breaks cannot travel in a NATS
/// header), `%`, and (by `utf8_percent_encode` itself) every non-ASCII byte.
const ESCAPED: &AsciiSet = &CONTROLS.add(b'%');

/// A header value for any text: percent-encoded where NATS headers cannot carry it.
pub(crate) fn encode(text: &str) -> String {
    utf8_percent_encode(text, ESCAPED).to_string()
}

/// The text of a value made by [`encode`].
pub(crate) fn decode(value: &str) -> String {
    percent_decode_str(value).decode_utf8_lossy().into_owned()
}

/// Headers this transport sets itself: never application properties.
const RESERVED: [&str; 4] =
    [MESSAGE_ID_HEADER, SESSION_ID_HEADER, CORRELATION_ID_HEADER, CONTENT_TYPE_HEADER];

/// The message id of `message`, generated when the sender gave none.
pub(crate) fn message_id(message: &OutgoingMessage) -> String {
    message.message_id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// The headers of an outgoing message with id `id`.
///
/// # Errors
///
/// [`Error::BadMessage`] for a property name that is not a valid NATS header name
/// (printable ASCII without `:`), for a value with a line break, or for a property that
/// uses one of the names this transport keeps for itself.
pub(crate) fn headers(id: &str, message: &OutgoingMessage) -> Result<HeaderMap, Error> {
    let mut headers = HeaderMap::new();
    insert(&mut headers, MESSAGE_ID_HEADER, id)?;
    if let Some(session) = &message.session_id {
        insert(&mut headers, SESSION_ID_HEADER, session)?;
    }
    if let Some(correlation) = &message.correlation_id {
        insert(&mut headers, CORRELATION_ID_HEADER, correlation)?;
    }
    if let Some(content_type) = &message.content_type {
        insert(&mut headers, CONTENT_TYPE_HEADER, content_type)?;
    }
    for (key, value) in &message.properties {
        if RESERVED.iter().any(|reserved| reserved.eq_ignore_ascii_case(key)) {
            return Err(Error::BadMessage {
                what: format!("property {key:?} is a header this transport sets itself"),
            });
        }
        insert(&mut headers, key, value)?;
    }
    Ok(headers)
}

/// Headers the server acts on when a message is published: expectations on the stream
/// and its sequences, rollups and per-message TTLs. A dead-letter copy must not carry
/// them, or the server refuses the copy (an expected stream or sequence) or alters what
/// the dead-letter stream keeps (a rollup).
const SERVER_CONTROL_HEADERS: &[&str] = &["Nats-Expected-", "Nats-Rollup", "Nats-TTL"];

/// `headers` less the [`SERVER_CONTROL_HEADERS`] (compared without regard to case).
pub(crate) fn without_server_controls(headers: &HeaderMap) -> HeaderMap {
    let is_control = |name: &str| {
        SERVER_CONTROL_HEADERS.iter().any(|prefix| {
            name.get(..prefix.len()).is_some_and(|start| start.eq_ignore_ascii_case(prefix))
        })
    };
    let mut copy = HeaderMap::new();
    for (name, values) in headers.iter() {
        if is_control(name.as_ref()) {
            continue;
        }
        for value in values {
            copy.append(name.clone(), value.clone());
        }
    }
    copy
}

/// Adds one header after checking that NATS can carry it.
pub(crate) fn insert(headers: &mut HeaderMap, name: &str, value: &str) -> Result<(), Error> {
    let name_ok = !name.is_empty() && name.bytes().all(|b| (33..=126).contains(&b) && b != b':');
    if !name_ok {
        return Err(Error::BadMessage {
            what: format!("{name:?} is not a valid NATS header name"),
        });
    }
    if value.contains(['\r', '\n']) {
        return Err(Error::BadMessage { what: format!("header {name} has a line break") });
    }
    let name: HeaderName = name.parse().map_err(|_| Error::BadMessage {
        what: format!("{name:?} is not a valid NATS header name"),
    })?;
    headers.insert(name, value);
    Ok(())
}

/// The first value of header `name`.
pub(crate) fn header(headers: Option<&HeaderMap>, name: &str) -> Option<String> {
    // Parsed, so that a standard name (`Nats-Msg-Id`) matches how the client stores it.
    let name: HeaderName = name.parse().ok()?;
    headers?.get(name).map(|value| value.as_str().to_owned())
}

/// A received message: id and fields from the headers, every other header a property
/// (less `skip`, the bookkeeping of dead letters).
pub(crate) fn to_message(
    headers: Option<&HeaderMap>,
    body: Bytes,
    fallback_id: impl FnOnce() -> String,
    delivery_count: u32,
    enqueued_at: Option<SystemTime>,
    skip: &[&str],
) -> Message {
    let mut properties = BTreeMap::new();
    if let Some(headers) = headers {
        for (name, values) in headers.iter() {
            let name: &str = name.as_ref();
            if RESERVED.contains(&name) || skip.contains(&name) {
                continue;
            }
            if let Some(value) = values.first() {
                properties.insert(name.to_owned(), value.as_str().to_owned());
            }
        }
    }
    Message {
        id: header(headers, MESSAGE_ID_HEADER).unwrap_or_else(fallback_id),
        body,
        session_id: header(headers, SESSION_ID_HEADER),
        correlation_id: header(headers, CORRELATION_ID_HEADER),
        content_type: header(headers, CONTENT_TYPE_HEADER),
        properties,
        delivery_count,
        enqueued_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_control_headers_are_left_out_of_a_copy() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("Nats-Expected-Stream", "S"),
            ("nats-expected-last-sequence", "7"),
            ("Nats-Rollup", "sub"),
            ("Nats-TTL", "1s"),
            ("Nats-Msg-Id", "id-1"),
            ("custom", "kept"),
        ] {
            insert(&mut headers, name, value).unwrap();
        }
        let copy = without_server_controls(&headers);
        let names: Vec<String> = copy.iter().map(|(name, _)| name.to_string()).collect();
        assert_eq!(copy.len(), 2, "{names:?}");
        assert_eq!(header(Some(&copy), "Nats-Msg-Id").as_deref(), Some("id-1"));
        assert_eq!(header(Some(&copy), "custom").as_deref(), Some("kept"));
    }

    #[test]
    fn fields_and_properties_round_trip_through_headers() {
        let sent = OutgoingMessage::json("{}")
            .with_session_id("s")
            .with_correlation_id("c")
            .with_property("custom", "two words, one comma");
        let headers = headers("id-1", &sent).unwrap();
        let got = to_message(Some(&headers), sent.body.clone(), || "x".into(), 2, None, &[]);
        assert_eq!(got.id, "id-1");
        assert_eq!(got.session_id.as_deref(), Some("s"));
        assert_eq!(got.correlation_id.as_deref(), Some("c"));
        assert_eq!(got.content_type.as_deref(), Some("application/json"));
        assert_eq!(
            got.properties,
            BTreeMap::from([("custom".into(), "two words, one comma".into())])
        );
        assert_eq!(got.delivery_count, 2);
    }

    #[test]
    fn headers_nats_cannot_carry_are_refused_not_sent() {
        for (key, value) in [("has space", "v"), ("colon:", "v"), ("", "v"), ("ok", "line\nbreak")]
        {
            let message = OutgoingMessage::new("b").with_property(key, value);
            assert!(matches!(headers("id", &message), Err(Error::BadMessage { .. })), "{key:?}");
        }
        let reserved = OutgoingMessage::new("b").with_property("x-session-id", "s");
        assert!(matches!(headers("id", &reserved), Err(Error::BadMessage { .. })));
    }

    #[test]
    fn any_text_survives_encoding_and_the_encoding_fits_a_header() {
        let text = "Zürich → ☃ 𝄞 \"q\" back\\slash 100%\r\n\ttab\n";
        let encoded = encode(text);
        assert!(encoded.bytes().all(|b| (32..127).contains(&b)), "{encoded}");
        assert_eq!(decode(&encoded), text);
        assert_eq!(encode("plain: text"), "plain: text", "readable where it can be");
    }

    #[test]
    fn a_message_without_an_id_header_gets_the_fallback() {
        let got = to_message(None, Bytes::from_static(b"b"), || "seq-7".into(), 1, None, &[]);
        assert_eq!(got.id, "seq-7");
        assert!(got.properties.is_empty());
    }
}
