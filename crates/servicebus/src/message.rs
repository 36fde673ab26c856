//! How steward's messages travel over REST: the `BrokerProperties` header, custom
//! properties as headers with JSON-encoded values, RFC 1123 dates, and the transport's
//! own properties for copies (delays and dead letters).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use azure_core::headers::Headers;
use azure_messaging_servicebus::service_bus::{SendMessageOptions, SettableBrokerProperties};
use bytes::Bytes;
use serde::Deserialize;
use steward_core::{Message, OutgoingMessage};
use time::OffsetDateTime;
use time::format_description::well_known::{Rfc2822, Rfc3339};
use tokio::time::Instant;

/// Property carrying the deliveries a message had before the transport re-sent it (an
/// abandon with delay, a dead letter); added to the broker's `DeliveryCount`.
pub const DELIVERY_COUNT_PROPERTY: &str = steward_core::transport::DELIVERY_COUNT_PROPERTY;
/// Property carrying the original message id on a delayed copy, which goes out under a
/// new `MessageId` so a queue with duplicate detection does not drop it.
pub const MESSAGE_ID_PROPERTY: &str = "x-steward-message-id";
/// Property of a message in `<queue>.dlq`: why it was dead-lettered (the name Service
/// Bus uses on its own dead-letter queue).
pub const DEAD_LETTER_REASON_PROPERTY: &str = steward_core::transport::DEAD_LETTER_REASON_PROPERTY;
/// Property of a message in `<queue>.dlq`: the description given when it was
/// dead-lettered.
pub const DEAD_LETTER_DESCRIPTION_PROPERTY: &str =
    steward_core::transport::DEAD_LETTER_DESCRIPTION_PROPERTY;
/// The longest dead-letter description kept, in characters (Service Bus's own limit
/// for `DeadLetterErrorDescription`).
pub const MAX_DEAD_LETTER_DESCRIPTION_CHARS: usize = 4096;

/// The `Content-Type` Service Bus reports for a message sent without one.
const DEFAULT_CONTENT_TYPE: &str = "application/atom+xml;type=entry;charset=utf-8";

/// Header names that belong to HTTP or to the REST protocol, in either direction, and
/// so are never custom properties: the one list the client and the emulator share.
///
/// The client refuses to send a property named like one of these (or starting with one
/// of [`PROTOCOL_HEADER_PREFIXES`]), with an error naming it; a receiver skips these
/// headers when it reads an answer's properties; the emulator does not read them from a
/// request as properties and never writes a property over them. Every other name is
/// delivered unchanged: W3C trace context (`traceparent`, `tracestate`) in particular is
/// an ordinary message property, as the Service Bus SDKs use it.
pub const PROTOCOL_HEADERS: &[&str] = &[
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "authorization",
    "brokerproperties",
    "cache-control",
    "connection",
    "content-encoding",
    "content-length",
    "content-type",
    "cookie",
    "date",
    "etag",
    "expect",
    "expires",
    "host",
    "keep-alive",
    "location",
    "pragma",
    "server",
    "strict-transport-security",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "vary",
    "via",
    "x-content-type-options",
    "x-frame-options",
    "x-powered-by",
];
/// Prefixes of header names that belong to HTTP, to proxies or to the protocol; see
/// [`PROTOCOL_HEADERS`].
pub const PROTOCOL_HEADER_PREFIXES: &[&str] =
    &["access-control-", "proxy-", "sec-", "x-forwarded-", "x-ms-"];

/// Whether the header `name` (in lower case) belongs to HTTP or to the protocol rather
/// than being a custom property; see [`PROTOCOL_HEADERS`].
pub(crate) fn is_protocol_header(name: &str) -> bool {
    PROTOCOL_HEADERS.contains(&name) || PROTOCOL_HEADER_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// The parts of the received `BrokerProperties` header the transport reads. The Azure
/// crate's own struct lacks the correlation id, session id and content type.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ReceivedProperties {
    message_id: Option<String>,
    correlation_id: Option<String>,
    session_id: Option<String>,
    content_type: Option<String>,
    delivery_count: Option<u32>,
    enqueued_time_utc: Option<String>,
    locked_until_utc: Option<String>,
}

/// A peek-locked message as the transport reads it.
#[derive(Debug)]
pub(crate) struct Received {
    pub(crate) message: Message,
    /// When the lock expires, on the tokio clock.
    pub(crate) locked_until: Instant,
    /// How long a lock on this queue lasts, as far as this answer tells: the renewal
    /// assumes the same.
    pub(crate) lock_duration: Duration,
    /// The deliveries the message had when the transport re-sent it (a delayed abandon,
    /// a dead letter), from [`DELIVERY_COUNT_PROPERTY`]; `None` for an original.
    pub(crate) earlier_deliveries: Option<u32>,
}

/// Reads a 201 peek-lock answer: `body`, its headers, and when the request was sent.
///
/// # Errors
///
/// A description of what is unreadable (no usable `BrokerProperties`).
pub(crate) fn read_received(
    body: String,
    headers: &Headers,
    requested_at: Instant,
) -> Result<Received, String> {
    let raw = header(headers, "brokerproperties")
        .ok_or_else(|| "the answer has no BrokerProperties header".to_owned())?;
    let props: ReceivedProperties = serde_json::from_str(raw)
        .map_err(|e| format!("the BrokerProperties header is not valid: {e}"))?;

    let mut properties = BTreeMap::new();
    for (name, value) in headers.iter() {
        let name = name.as_str();
        if is_protocol_header(name) {
            continue;
        }
        properties.insert(name.to_owned(), decode_property(value.as_str()));
    }
    let earlier_deliveries = properties
        .remove(DELIVERY_COUNT_PROPERTY)
        .and_then(|count| count.trim().parse::<u32>().ok());
    let original_id = properties.remove(MESSAGE_ID_PROPERTY).filter(|id| !id.is_empty());
    let id = original_id
        .or(props.message_id)
        .ok_or_else(|| "the BrokerProperties header has no MessageId".to_owned())?;

    // Service Bus puts the content type in the Content-Type header, and reports its own
    // Atom default for messages sent without one.
    let content_type = match header(headers, "content-type") {
        Some(value) if is_default_content_type(value) => None,
        Some(value) => Some(value.to_owned()),
        None => props.content_type,
    };

    let locked_until_utc =
        props.locked_until_utc.as_deref().and_then(parse_date).ok_or_else(|| {
            "the BrokerProperties header has no readable LockedUntilUtc".to_owned()
        })?;
    // The service's own clock (the Date header) avoids any skew with ours. Both are
    // whole seconds, and a cached Date may be a second old: count one second less.
    let server_now = header(headers, "date").and_then(parse_date).unwrap_or_else(SystemTime::now);
    let lock_duration = locked_until_utc
        .duration_since(server_now)
        .unwrap_or(Duration::ZERO)
        .saturating_sub(Duration::from_secs(1));

    let message = Message {
        id,
        body: Bytes::from(body),
        session_id: props.session_id,
        correlation_id: props.correlation_id,
        content_type,
        properties,
        delivery_count: props
            .delivery_count
            .unwrap_or(1)
            .max(1)
            .saturating_add(earlier_deliveries.unwrap_or(0)),
        enqueued_at: props.enqueued_time_utc.as_deref().and_then(parse_date),
    };
    Ok(Received {
        message,
        locked_until: requested_at + lock_duration,
        lock_duration,
        earlier_deliveries,
    })
}

fn header<'a>(headers: &'a Headers, name: &'static str) -> Option<&'a str> {
    headers.get_optional_str(&azure_core::headers::HeaderName::from_static(name))
}

fn is_default_content_type(value: &str) -> bool {
    let normalised: String =
        value.chars().filter(|c| !c.is_whitespace()).collect::<String>().to_ascii_lowercase();
    normalised == DEFAULT_CONTENT_TYPE
}

/// A custom property's value: JSON strings are unquoted; numbers, booleans and anything
/// that is not JSON stay as they are.
fn decode_property(raw: &str) -> String {
    let trimmed = raw.trim();
    if trimmed.starts_with('"') {
        if let Ok(text) = serde_json::from_str::<String>(trimmed) {
            return text;
        }
    }
    trimmed.to_owned()
}

/// A string property value as the service expects it: a JSON string, with everything
/// outside printable ASCII escaped so it fits in an HTTP header.
pub(crate) fn encode_property(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.push('"');
    out
}

/// Parses an RFC 1123 date (`Wed, 02 Jul 2014 01:32:27 GMT`), or RFC 3339.
pub(crate) fn parse_date(text: &str) -> Option<SystemTime> {
    let text = text.trim();
    OffsetDateTime::parse(text, &Rfc2822)
        .or_else(|_| OffsetDateTime::parse(text, &Rfc3339))
        .ok()
        .map(SystemTime::from)
}

/// Why a property name cannot be sent, if it cannot.
pub(crate) fn check_property_name(name: &str) -> Result<(), String> {
    let is_token_char = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(is_token_char) {
        return Err(format!(
            "property name {name:?} is not an HTTP header name (letters, digits, !#$%&'*+-.^_`|~)"
        ));
    }
    let lower = name.to_ascii_lowercase();
    // A header of HTTP or of the protocol would be read as part of the request or the
    // answer, not come back as a property.
    if is_protocol_header(&lower) {
        return Err(format!(
            "property name {name:?} is reserved: it is an HTTP or Service Bus header"
        ));
    }
    if lower.starts_with("x-steward-") {
        return Err(format!("property name {name:?} is reserved for the transport's own use"));
    }
    Ok(())
}

/// What a send puts on the wire besides the body.
#[derive(Debug, Default)]
pub(crate) struct Outgoing {
    pub(crate) message_id: String,
    pub(crate) session_id: Option<String>,
    pub(crate) correlation_id: Option<String>,
    pub(crate) content_type: Option<String>,
    /// Custom properties, values unencoded.
    pub(crate) properties: BTreeMap<String, String>,
    pub(crate) scheduled_at: Option<SystemTime>,
}

impl Outgoing {
    /// From a caller's message, checking its property names.
    pub(crate) fn from_message(message: OutgoingMessage) -> Result<(Self, Bytes), String> {
        for name in message.properties.keys() {
            check_property_name(name)?;
        }
        let outgoing = Self {
            message_id: message
                .message_id
                .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()),
            session_id: message.session_id,
            correlation_id: message.correlation_id,
            content_type: message.content_type,
            properties: message.properties,
            scheduled_at: None,
        };
        Ok((outgoing, message.body))
    }

    /// A copy of a received message, with its properties and ids, counting the
    /// deliveries it has had so far.
    pub(crate) fn copy_of(message: &Message) -> Self {
        let mut properties = message.properties.clone();
        properties.insert(DELIVERY_COUNT_PROPERTY.to_owned(), message.delivery_count.to_string());
        Self {
            message_id: message.id.clone(),
            session_id: message.session_id.clone(),
            correlation_id: message.correlation_id.clone(),
            content_type: message.content_type.clone(),
            properties,
            scheduled_at: None,
        }
    }

    /// The crate's send options.
    pub(crate) fn into_options(self) -> SendMessageOptions {
        let scheduled = self.scheduled_at.map(|at| OffsetDateTime::from(round_up_to_second(at)));
        let custom: HashMap<String, String> = self
            .properties
            .iter()
            .map(|(name, value)| (name.clone(), encode_property(value)))
            .collect();
        SendMessageOptions {
            content_type: self.content_type,
            broker_properties: Some(SettableBrokerProperties {
                message_id: Some(self.message_id),
                session_id: self.session_id,
                correlation_id: self.correlation_id,
                scheduled_enqueue_time_utc: scheduled,
                ..SettableBrokerProperties::default()
            }),
            custom_properties: (!custom.is_empty()).then_some(custom),
        }
    }
}

/// `at`, or the next whole second after it: dates on the wire have whole seconds, and a
/// message must not show up before its time.
fn round_up_to_second(at: SystemTime) -> SystemTime {
    match at.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(since) if since.subsec_nanos() > 0 => {
            SystemTime::UNIX_EPOCH + Duration::from_secs(since.as_secs() + 1)
        }
        _ => at,
    }
}

#[cfg(test)]
mod tests {
    use azure_core::headers::{HeaderName, HeaderValue};

    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> Headers {
        let mut headers = Headers::new();
        for (name, value) in pairs {
            headers.insert(
                HeaderName::from((*name).to_owned()),
                HeaderValue::from((*value).to_owned()),
            );
        }
        headers
    }

    const PROPS: &str = r#"{"DeliveryCount":2,"EnqueuedSequenceNumber":0,"EnqueuedTimeUtc":"Wed, 02 Jul 2014 01:32:27 GMT","Label":"M1","LockToken":"7da9cfd5-40d5-4bb1-8d64-ec5a52e1c547","LockedUntilUtc":"Wed, 02 Jul 2014 01:33:27 GMT","MessageId":"m-1","SequenceNumber":31907572164743169,"State":"Active","TimeToLive":10,"CorrelationId":"c-1","SessionId":"s-1"}"#;

    #[test]
    fn a_received_message_has_its_broker_and_custom_properties() {
        let now = Instant::now();
        let h = headers(&[
            ("brokerproperties", PROPS),
            ("date", "Wed, 02 Jul 2014 01:32:27 GMT"),
            ("content-type", "application/json"),
            ("location", "https://ns.servicebus.windows.net/q/messages/1/x"),
            ("server", "Microsoft-HTTPAPI/2.0"),
            ("priority", "\"High\""),
            ("customer", "\"12345,ABC\""),
            ("attempt", "3"),
            ("x-ms-request-id", "abc"),
        ]);
        let received = read_received("hello".into(), &h, now).unwrap();
        let m = &received.message;
        assert_eq!(m.id, "m-1");
        assert_eq!(m.body, "hello");
        assert_eq!(m.delivery_count, 2);
        assert_eq!(m.correlation_id.as_deref(), Some("c-1"));
        assert_eq!(m.session_id.as_deref(), Some("s-1"));
        assert_eq!(m.content_type.as_deref(), Some("application/json"));
        assert_eq!(
            m.properties,
            BTreeMap::from([
                ("attempt".to_owned(), "3".to_owned()),
                ("customer".to_owned(), "12345,ABC".to_owned()),
                ("priority".to_owned(), "High".to_owned()),
            ])
        );
        assert_eq!(m.enqueued_at, parse_date("Wed, 02 Jul 2014 01:32:27 GMT"));
        // A 60 s lock by the service's clock, counted one second short.
        assert_eq!(received.lock_duration, Duration::from_secs(59));
        assert_eq!(received.locked_until, now + Duration::from_secs(59));
    }

    #[test]
    fn the_default_content_type_means_none_and_transport_properties_are_consumed() {
        let h = headers(&[
            ("brokerproperties", PROPS),
            ("content-type", "application/atom+xml;type=entry;charset=utf-8"),
            (DELIVERY_COUNT_PROPERTY, "\"4\""),
            (MESSAGE_ID_PROPERTY, "\"original\""),
        ]);
        let received = read_received(String::new(), &h, Instant::now()).unwrap();
        assert_eq!(received.earlier_deliveries, Some(4));
        let m = received.message;
        assert_eq!(m.content_type, None);
        assert_eq!(m.id, "original");
        assert_eq!(m.delivery_count, 6, "4 earlier deliveries + the broker's 2");
        assert!(m.properties.is_empty(), "{:?}", m.properties);
    }

    #[test]
    fn answers_without_usable_broker_properties_are_unreadable() {
        assert!(read_received(String::new(), &headers(&[]), Instant::now()).is_err());
        let bad = headers(&[("brokerproperties", "{not json")]);
        assert!(read_received(String::new(), &bad, Instant::now()).is_err());
        let no_lock = headers(&[("brokerproperties", r#"{"MessageId":"m"}"#)]);
        assert!(read_received(String::new(), &no_lock, Instant::now()).is_err());
    }

    #[test]
    fn property_values_round_trip_through_json_in_ascii() {
        for value in
            ["plain", "two words, one comma", "quote \" and \\", "naïve ☃ 𝄞", "line\nbreak"]
        {
            let encoded = encode_property(value);
            assert!(encoded.chars().all(|c| (' '..='~').contains(&c)), "{encoded}");
            assert_eq!(decode_property(&encoded), value);
        }
        assert_eq!(decode_property("12"), "12");
        assert_eq!(decode_property("High"), "High");
    }

    #[test]
    fn property_names_must_be_header_names_and_not_reserved() {
        assert!(check_property_name("origin").is_ok());
        assert!(check_property_name("spaced-out").is_ok());
        for bad in [
            "",
            "two words",
            "naïve",
            "content-type",
            "Authorization",
            "x-ms-id",
            "x-steward-delivery-count",
            "accept-language",
            "X-Forwarded-For",
        ] {
            assert!(check_property_name(bad).is_err(), "{bad}");
        }
        for trace in ["traceparent", "tracestate"] {
            assert!(check_property_name(trace).is_ok(), "{trace}");
        }
    }

    #[test]
    fn scheduled_times_round_up_to_whole_seconds() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(10_001);
        assert_eq!(round_up_to_second(at), SystemTime::UNIX_EPOCH + Duration::from_secs(11));
        let whole = SystemTime::UNIX_EPOCH + Duration::from_secs(10);
        assert_eq!(round_up_to_second(whole), whole);
    }

    #[test]
    fn copies_carry_ids_properties_and_the_delivery_count() {
        let message = Message::new("m-1", "body")
            .with_correlation_id("c")
            .with_session_id("s")
            .with_delivery_count(3);
        let copy = Outgoing::copy_of(&message);
        assert_eq!(copy.message_id, "m-1");
        assert_eq!(copy.properties.get(DELIVERY_COUNT_PROPERTY).map(String::as_str), Some("3"));
        let options = copy.into_options();
        let props = options.broker_properties.unwrap();
        assert_eq!(props.correlation_id.as_deref(), Some("c"));
        assert_eq!(props.session_id.as_deref(), Some("s"));
        assert_eq!(
            options.custom_properties.unwrap().get(DELIVERY_COUNT_PROPERTY).map(String::as_str),
            Some("\"3\"")
        );
    }
}
