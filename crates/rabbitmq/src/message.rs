//! How steward messages map to AMQP properties and headers, both ways.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use steward_core::{Message, OutgoingMessage};

use crate::error::Error;

/// The header carrying the ordering key ([`Message::session_id`]).
pub const SESSION_ID_HEADER: &str = "x-session-id";
/// The header where the transport keeps the deliveries a message had before it was
/// republished (through a delay bucket).
pub const DELIVERY_COUNT_HEADER: &str = steward_core::transport::DELIVERY_COUNT_PROPERTY;
/// The header of a dead-lettered message holding the reason.
pub const DEAD_LETTER_REASON_HEADER: &str = "x-steward-dead-letter-reason";
/// The header of a dead-lettered message holding the description.
pub const DEAD_LETTER_DESCRIPTION_HEADER: &str = "x-steward-dead-letter-description";

/// Headers the broker sets: how often a quorum queue delivered the message before.
/// RabbitMQ 4.1+ sets `x-acquired-count` for every earlier delivery; older brokers
/// set `x-delivery-count`, which 4.x keeps for failed deliveries only.
const BROKER_COUNT_HEADERS: [&str; 2] = ["x-acquired-count", "x-delivery-count"];

/// AMQP persistent delivery mode.
const PERSISTENT: u8 = 2;

/// Headers that are transport bookkeeping, not application properties.
fn is_bookkeeping(key: &str) -> bool {
    key == SESSION_ID_HEADER || key == DELIVERY_COUNT_HEADER || BROKER_COUNT_HEADERS.contains(&key)
}

pub(crate) fn short(what: &str, value: &str) -> Result<ShortString, Error> {
    ShortString::try_new(value)
        .map_err(|_| Error::TooLong { what: what.to_owned(), len: value.len() })
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The AMQP properties of a message sent through the sink: persistent, a message id
/// (generated if absent), a timestamp, the session id as `x-session-id`, the
/// application properties as string headers.
///
/// # Errors
///
/// [`Error::TooLong`] when the message id, correlation id, content type or a property
/// name does not fit AMQP's 255 bytes.
pub(crate) fn outgoing_properties(message: &OutgoingMessage) -> Result<BasicProperties, Error> {
    let id = message.message_id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mut headers = FieldTable::default();
    for (key, value) in &message.properties {
        if is_bookkeeping(key) {
            continue;
        }
        headers.insert(short("property name", key)?, AMQPValue::LongString(value.as_str().into()));
    }
    if let Some(session) = &message.session_id {
        headers.insert(
            short("header", SESSION_ID_HEADER)?,
            AMQPValue::LongString(session.as_str().into()),
        );
    }
    let mut properties = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_message_id(short("message id", &id)?)
        .with_timestamp(now_secs())
        .with_headers(headers);
    if let Some(correlation) = &message.correlation_id {
        properties = properties.with_correlation_id(short("correlation id", correlation)?);
    }
    if let Some(content_type) = &message.content_type {
        properties = properties.with_content_type(short("content type", content_type)?);
    }
    Ok(properties)
}

/// A header value as text, for the scalar types; `None` for tables, arrays and bytes.
fn header_text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(text) => String::from_utf8_lossy(text.as_bytes()).into_owned(),
        AMQPValue::ShortString(text) => text.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        _ => return None,
    })
}

/// A header value as a count: integers, or text holding one.
fn header_count(value: &AMQPValue) -> Option<u32> {
    let n: i64 = match value {
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => *n,
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok()?,
        other => header_text(other)?.trim().parse().ok()?,
    };
    u32::try_from(n.max(0)).ok()
}

fn header<'a>(headers: Option<&'a FieldTable>, key: &str) -> Option<&'a AMQPValue> {
    headers?.inner().get(key)
}

/// The delivery count of a received message: the transport's own header (deliveries
/// before a republish), plus the broker's count of earlier deliveries of this copy
/// (absent on its first delivery), plus this delivery.
pub(crate) fn delivery_count(properties: &BasicProperties) -> u32 {
    let headers = properties.headers().as_ref();
    let own = header(headers, DELIVERY_COUNT_HEADER).and_then(header_count).unwrap_or(0);
    let broker = BROKER_COUNT_HEADERS
        .iter()
        .find_map(|key| header(headers, key).and_then(header_count))
        .unwrap_or(0);
    own.saturating_add(broker).saturating_add(1)
}

/// The deliveries a message had when the transport republished it (to a delay bucket
/// or the dead-letter queue), from [`DELIVERY_COUNT_HEADER`]; `None` for a message the
/// transport never republished.
pub(crate) fn republished_count(properties: &BasicProperties) -> Option<u32> {
    header(properties.headers().as_ref(), DELIVERY_COUNT_HEADER).and_then(header_count)
}

/// The [`Message`] a handler sees for a delivery. A message published without a
/// message id gets a generated one (`amqp-<uuid>`).
pub(crate) fn to_message(properties: &BasicProperties, body: Bytes) -> Message {
    let headers = properties.headers().as_ref();
    let id = properties
        .message_id()
        .as_ref()
        .map_or_else(|| format!("amqp-{}", uuid::Uuid::new_v4()), |id| id.as_str().to_owned());
    let mut message = Message::new(id, body);
    message.session_id = header(headers, SESSION_ID_HEADER).and_then(header_text);
    message.correlation_id = properties.correlation_id().as_ref().map(|c| c.as_str().to_owned());
    message.content_type = properties.content_type().as_ref().map(|c| c.as_str().to_owned());
    message.properties = headers
        .map(|table| {
            table
                .inner()
                .iter()
                .filter(|(key, _)| !is_bookkeeping(key.as_str()))
                .filter_map(|(key, value)| Some((key.as_str().to_owned(), header_text(value)?)))
                .collect::<BTreeMap<_, _>>()
        })
        .unwrap_or_default();
    message.delivery_count = delivery_count(properties);
    message.enqueued_at = properties.timestamp().map(|secs| UNIX_EPOCH + Duration::from_secs(secs));
    message
}

/// `properties` without the per-message TTL (`expiration`), every other field kept.
fn without_expiration(properties: &BasicProperties) -> BasicProperties {
    let mut copy = BasicProperties::default();
    macro_rules! keep {
        ($($get:ident => $set:ident),* $(,)?) => {$(
            if let Some(value) = properties.$get() {
                copy = copy.$set(value.clone());
            }
        )*};
    }
    keep!(
        content_type => with_content_type,
        content_encoding => with_content_encoding,
        headers => with_headers,
        delivery_mode => with_delivery_mode,
        priority => with_priority,
        correlation_id => with_correlation_id,
        reply_to => with_reply_to,
        message_id => with_message_id,
        timestamp => with_timestamp,
        kind => with_type,
        user_id => with_user_id,
        app_id => with_app_id,
        cluster_id => with_cluster_id,
    );
    copy
}

/// The properties of a copy of a received message, republished by the transport (to a
/// delay bucket or the dead-letter queue): the original properties and headers, the
/// message id made explicit, the broker's counters dropped, the deliveries so far in
/// [`DELIVERY_COUNT_HEADER`], and `extra` headers on top. The per-message TTL
/// (`expiration`) is dropped: a dead letter must wait for an operator, not expire, and a
/// delay copy must wait its bucket's time, not come back early.
pub(crate) fn republish_properties(
    original: &BasicProperties,
    message_id: &str,
    delivery_count: u32,
    extra: &[(&str, &str)],
) -> Result<BasicProperties, Error> {
    let mut headers = original.headers().clone().unwrap_or_default();
    let kept: BTreeMap<ShortString, AMQPValue> = headers
        .inner()
        .iter()
        .filter(|(key, _)| !BROKER_COUNT_HEADERS.contains(&key.as_str()))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    headers = FieldTable::from(kept);
    headers.insert(
        short("header", DELIVERY_COUNT_HEADER)?,
        AMQPValue::LongLongInt(i64::from(delivery_count)),
    );
    for (key, value) in extra {
        headers.insert(short("header", key)?, AMQPValue::LongString(LongString::from(*value)));
    }
    Ok(without_expiration(original)
        .with_delivery_mode(PERSISTENT)
        .with_message_id(short("message id", message_id)?)
        .with_headers(headers))
}

/// A header of a received message as text.
pub(crate) fn header_string(properties: &BasicProperties, key: &str) -> Option<String> {
    header(properties.headers().as_ref(), key).and_then(header_text)
}

/// Why the broker last dead-lettered a message it moved itself (`delivery_limit`,
/// `expired`, `rejected`, `maxlen`): `x-last-death-reason`, else the reason of the most
/// recent `x-death` entry (the first), else `x-first-death-reason`. A message can die
/// more than once (expired in a delay bucket earlier, over the delivery limit now); the
/// last death is why it is in the dead-letter queue.
pub(crate) fn broker_death_reason(properties: &BasicProperties) -> Option<String> {
    let headers = properties.headers().as_ref();
    let latest_death = || {
        let AMQPValue::FieldArray(deaths) = header(headers, "x-death")? else { return None };
        match deaths.as_slice().first()? {
            AMQPValue::FieldTable(table) => table.inner().get("reason").and_then(header_text),
            _ => None,
        }
    };
    header(headers, "x-last-death-reason")
        .and_then(header_text)
        .or_else(latest_death)
        .or_else(|| header(headers, "x-first-death-reason").and_then(header_text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_headers(pairs: &[(&str, AMQPValue)]) -> BasicProperties {
        let mut headers = FieldTable::default();
        for (key, value) in pairs {
            headers.insert((*key).into(), value.clone());
        }
        BasicProperties::default().with_headers(headers)
    }

    #[test]
    fn first_delivery_counts_one() {
        assert_eq!(delivery_count(&BasicProperties::default()), 1);
    }

    #[test]
    fn delivery_count_adds_own_header_broker_count_and_this_delivery() {
        let props = with_headers(&[
            (DELIVERY_COUNT_HEADER, AMQPValue::LongLongInt(2)),
            ("x-delivery-count", AMQPValue::LongLongInt(1)),
        ]);
        assert_eq!(delivery_count(&props), 4);
        // x-acquired-count (RabbitMQ 4.1+) wins over x-delivery-count.
        let props = with_headers(&[
            ("x-acquired-count", AMQPValue::LongInt(3)),
            ("x-delivery-count", AMQPValue::LongInt(1)),
        ]);
        assert_eq!(delivery_count(&props), 4);
        // A count sent as text by some other client still counts.
        let props = with_headers(&[(DELIVERY_COUNT_HEADER, AMQPValue::LongString("5".into()))]);
        assert_eq!(delivery_count(&props), 6);
    }

    #[test]
    fn outgoing_message_round_trips_through_properties() {
        let sent = OutgoingMessage::json("{}")
            .with_message_id("m-1")
            .with_session_id("s-1")
            .with_correlation_id("c-1")
            .with_property("origin", "test");
        let props = outgoing_properties(&sent).unwrap();
        assert_eq!(props.delivery_mode(), &Some(PERSISTENT));
        let got = to_message(&props, Bytes::from_static(b"{}"));
        assert_eq!(got.id, "m-1");
        assert_eq!(got.session_id.as_deref(), Some("s-1"));
        assert_eq!(got.correlation_id.as_deref(), Some("c-1"));
        assert_eq!(got.content_type.as_deref(), Some("application/json"));
        assert_eq!(got.properties, BTreeMap::from([("origin".to_owned(), "test".to_owned())]));
        assert_eq!(got.delivery_count, 1);
        assert!(got.enqueued_at.is_some());
    }

    #[test]
    fn message_without_id_gets_one_and_scalar_headers_become_text() {
        let props = with_headers(&[
            ("n", AMQPValue::LongInt(7)),
            ("flag", AMQPValue::Boolean(true)),
            ("table", AMQPValue::FieldTable(FieldTable::default())),
            ("x-delivery-count", AMQPValue::LongLongInt(1)),
        ]);
        let got = to_message(&props, Bytes::new());
        assert!(got.id.starts_with("amqp-"), "{}", got.id);
        assert_eq!(got.properties.get("n").map(String::as_str), Some("7"));
        assert_eq!(got.properties.get("flag").map(String::as_str), Some("true"));
        assert!(!got.properties.contains_key("table"));
        assert!(!got.properties.contains_key("x-delivery-count"));
        assert_eq!(got.delivery_count, 2);
    }

    #[test]
    fn republished_copy_keeps_headers_and_carries_the_count() {
        let original = with_headers(&[
            ("origin", AMQPValue::LongString("test".into())),
            ("x-delivery-count", AMQPValue::LongLongInt(1)),
        ]);
        let message = to_message(&original, Bytes::new());
        assert_eq!(message.delivery_count, 2);
        let copy = republish_properties(
            &original,
            &message.id,
            message.delivery_count,
            &[(DEAD_LETTER_REASON_HEADER, "Bad")],
        )
        .unwrap();
        assert_eq!(header_string(&copy, "origin").as_deref(), Some("test"));
        assert_eq!(header_string(&copy, DEAD_LETTER_REASON_HEADER).as_deref(), Some("Bad"));
        assert_eq!(header_string(&copy, "x-delivery-count"), None);
        assert_eq!(copy.message_id().as_ref().map(ShortString::as_str), Some(message.id.as_str()));
        // Delivered again from the queue for the first time: 2 before, plus this one.
        assert_eq!(delivery_count(&copy), 3);
        assert_eq!(republished_count(&copy), Some(2));
        assert_eq!(republished_count(&original), None);
    }

    #[test]
    fn republished_copy_drops_the_expiration_and_keeps_every_other_field() {
        let all_but_expiration = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("identity".into())
            .with_headers(FieldTable::default())
            .with_delivery_mode(1)
            .with_priority(3)
            .with_correlation_id("c-1".into())
            .with_reply_to("replies".into())
            .with_message_id("m-1".into())
            .with_timestamp(1_700_000_000)
            .with_type("event".into())
            .with_user_id("guest".into())
            .with_app_id("app".into())
            .with_cluster_id("cluster".into());
        let original = all_but_expiration.clone().with_expiration("60000".into());
        assert_eq!(without_expiration(&original), all_but_expiration);

        let copy = republish_properties(&original, "m-1", 2, &[]).unwrap();
        assert_eq!(copy.expiration(), &None);
        assert_eq!(copy.reply_to().as_ref().map(ShortString::as_str), Some("replies"));
        assert_eq!(copy.priority(), &Some(3));
        assert_eq!(copy.timestamp(), &Some(1_700_000_000));
        assert_eq!(copy.app_id().as_ref().map(ShortString::as_str), Some("app"));
        assert_eq!(copy.delivery_mode(), &Some(PERSISTENT));
        assert_eq!(delivery_count(&copy), 3);
    }

    #[test]
    fn over_long_ids_are_errors_not_panics() {
        let sent = OutgoingMessage::new("x").with_message_id("m".repeat(300));
        let err = outgoing_properties(&sent).unwrap_err();
        assert!(err.to_string().contains("message id is 300 bytes"), "{err}");
        let sent = OutgoingMessage::new("x").with_property("k".repeat(256), "v");
        assert!(outgoing_properties(&sent).is_err());
    }

    #[test]
    fn broker_death_reason_reads_x_death() {
        let mut death = FieldTable::default();
        death.insert("reason".into(), AMQPValue::LongString("delivery_limit".into()));
        let props = with_headers(&[(
            "x-death",
            AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
        )]);
        assert_eq!(broker_death_reason(&props).as_deref(), Some("delivery_limit"));
        assert_eq!(broker_death_reason(&BasicProperties::default()), None);
    }

    #[test]
    fn broker_death_reason_prefers_the_last_death() {
        let death = |reason: &str| {
            let mut table = FieldTable::default();
            table.insert("reason".into(), AMQPValue::LongString(reason.into()));
            AMQPValue::FieldTable(table)
        };
        // Most recent first: over the delivery limit now, expired in a delay bucket before.
        let deaths = AMQPValue::FieldArray(vec![death("delivery_limit"), death("expired")].into());
        let first = ("x-first-death-reason", AMQPValue::LongString("expired".into()));
        let last = ("x-last-death-reason", AMQPValue::LongString("delivery_limit".into()));

        let all = with_headers(&[first.clone(), last.clone(), ("x-death", deaths.clone())]);
        assert_eq!(broker_death_reason(&all).as_deref(), Some("delivery_limit"));
        let last_only = with_headers(&[first.clone(), last]);
        assert_eq!(broker_death_reason(&last_only).as_deref(), Some("delivery_limit"));
        let without_last = with_headers(&[first.clone(), ("x-death", deaths)]);
        assert_eq!(broker_death_reason(&without_last).as_deref(), Some("delivery_limit"));
        let first_only = with_headers(&[first]);
        assert_eq!(broker_death_reason(&first_only).as_deref(), Some("expired"));
    }
}
