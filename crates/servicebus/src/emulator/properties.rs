//! How the REST protocol carries a message's metadata: the `BrokerProperties` JSON
//! header, custom properties as headers with JSON-encoded values, and RFC 1123 dates.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::{Rfc2822, Rfc3339};
use time::macros::format_description;

/// The property under which the emulator keeps, inside a stored message, the broker
/// properties that steward's [`Message`](steward_core::Message) has no field for
/// (`Label`, `TimeToLive`, `ScheduledEnqueueTimeUtc`, …), the types of typed custom
/// properties, and the `SessionId` of a message on a queue without sessions.
///
/// Its name contains a `:`, which no HTTP header name can, so it never collides with a
/// custom property. It is never sent to clients; it shows only when the broker is
/// inspected directly ([`InMemoryBroker::peek`](steward_inmem::InMemoryBroker::peek)).
pub const META_PROPERTY: &str = "sb-emulator:meta";

/// `TimeSpan.MaxValue` in seconds: the `TimeToLive` Service Bus reports for a message
/// sent without one.
const DEFAULT_TIME_TO_LIVE_SECS: f64 = 922_337_203_685.477_5;

/// The type of a custom property whose value is not a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum PropertyType {
    Number,
    Boolean,
}

/// The settable broker properties a client may send in the `BrokerProperties` header.
/// Others (`State`, `SequenceNumber`, …) are ignored, as the service ignores them.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct SentBrokerProperties {
    pub(crate) correlation_id: Option<String>,
    pub(crate) session_id: Option<String>,
    pub(crate) message_id: Option<String>,
    pub(crate) content_type: Option<String>,
    pub(crate) label: Option<String>,
    pub(crate) reply_to: Option<String>,
    pub(crate) to: Option<String>,
    pub(crate) reply_to_session_id: Option<String>,
    pub(crate) partition_key: Option<String>,
    pub(crate) via_partition_key: Option<String>,
    pub(crate) time_to_live: Option<f64>,
    pub(crate) scheduled_enqueue_time_utc: Option<String>,
}

impl SentBrokerProperties {
    /// Parses the `BrokerProperties` header.
    pub(crate) fn parse(header: &str) -> Result<Self, String> {
        let parsed: Self = serde_json::from_str(header)
            .map_err(|e| format!("The BrokerProperties header is not valid: {e}"))?;
        parsed.validate()?;
        Ok(parsed)
    }

    /// Checks what serde cannot: a positive time to live and a readable schedule.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if let Some(ttl) = self.time_to_live {
            if !ttl.is_finite() || ttl <= 0.0 {
                return Err(format!("TimeToLive must be a positive number of seconds, not {ttl}."));
            }
        }
        self.scheduled_enqueue_time().map(drop)
    }

    /// When the message should become visible, if it is scheduled.
    pub(crate) fn scheduled_enqueue_time(&self) -> Result<Option<SystemTime>, String> {
        self.scheduled_enqueue_time_utc
            .as_deref()
            .map(|text| {
                parse_date(text).ok_or_else(|| {
                    format!("ScheduledEnqueueTimeUtc {text:?} is not an RFC 1123 date.")
                })
            })
            .transpose()
    }
}

/// What the emulator keeps about a message beyond steward's `Message` fields; stored
/// as JSON under [`META_PROPERTY`].
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Meta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reply_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reply_to_session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) partition_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) via_partition_key: Option<String>,
    /// The session id on a queue without sessions: there it is only a property, and
    /// the broker must not deliver its messages one at a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) time_to_live: Option<f64>,
    /// Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) scheduled_enqueue_time: Option<i64>,
    /// Custom properties that are numbers or booleans (the rest are strings).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) types: BTreeMap<String, PropertyType>,
}

impl Meta {
    /// Reads the meta property of a stored message; a message sent straight to the
    /// broker has none.
    pub(crate) fn from_properties(properties: &BTreeMap<String, String>) -> Self {
        properties
            .get(META_PROPERTY)
            .and_then(|json| serde_json::from_str(json).ok())
            .unwrap_or_default()
    }

    /// The JSON stored under [`META_PROPERTY`], or `None` when there is nothing to keep.
    pub(crate) fn to_property(&self) -> Option<String> {
        if *self == Self::default() {
            return None;
        }
        serde_json::to_string(self).ok()
    }

    /// When the message expires, if it has a time to live.
    pub(crate) fn expires_at(&self, enqueued: SystemTime) -> Option<SystemTime> {
        let ttl = Duration::try_from_secs_f64(self.time_to_live?).ok()?;
        enqueued.checked_add(ttl)
    }
}

/// Decodes a custom property header value. JSON strings, numbers and booleans keep
/// their type; anything else (the documentation's own example sends `Priority: High`)
/// is taken as a string, as the service does.
pub(crate) fn decode_custom_property(raw: &str) -> (String, Option<PropertyType>) {
    let trimmed = raw.trim();
    match serde_json::from_str::<Value>(trimmed) {
        Ok(Value::String(text)) => (text, None),
        Ok(Value::Number(_)) => (trimmed.to_owned(), Some(PropertyType::Number)),
        Ok(Value::Bool(_)) => (trimmed.to_owned(), Some(PropertyType::Boolean)),
        _ => (raw.to_owned(), None),
    }
}

/// Encodes a custom property for a response header: strings (and dates) quoted as
/// JSON, numbers and booleans bare.
pub(crate) fn encode_custom_property(value: &str, kind: Option<PropertyType>) -> String {
    match kind {
        Some(PropertyType::Number | PropertyType::Boolean) => value.to_owned(),
        None => Value::String(value.to_owned()).to_string(),
    }
}

/// The broker properties of a received message, as the response header carries them.
#[derive(Debug)]
pub(crate) struct ReceivedBrokerProperties<'a> {
    pub(crate) message_id: &'a str,
    pub(crate) sequence_number: u64,
    pub(crate) delivery_count: u32,
    pub(crate) enqueued_time: Option<SystemTime>,
    pub(crate) lock: Option<(uuid::Uuid, SystemTime)>,
    pub(crate) correlation_id: Option<&'a str>,
    pub(crate) session_id: Option<&'a str>,
    pub(crate) content_type: Option<&'a str>,
    pub(crate) meta: &'a Meta,
}

impl ReceivedBrokerProperties<'_> {
    /// The JSON object, keys in alphabetical order as the service sends them.
    pub(crate) fn to_json(&self) -> String {
        let mut map = Map::new();
        let meta = self.meta;
        map.insert("DeliveryCount".into(), self.delivery_count.into());
        map.insert("EnqueuedSequenceNumber".into(), 0.into());
        let scheduled = meta
            .scheduled_enqueue_time
            .and_then(|secs| OffsetDateTime::from_unix_timestamp(secs).ok())
            .map(SystemTime::from);
        // A scheduled message is enqueued, as far as receivers can tell, when it
        // becomes visible.
        let enqueued = match (self.enqueued_time, scheduled) {
            (Some(at), Some(scheduled)) => Some(at.max(scheduled)),
            (at, None) => at,
            (None, scheduled) => scheduled,
        };
        if let Some(at) = enqueued {
            map.insert("EnqueuedTimeUtc".into(), format_date(at).into());
        }
        if let Some((token, until)) = self.lock {
            map.insert("LockToken".into(), token.to_string().into());
            map.insert("LockedUntilUtc".into(), format_date(until).into());
        }
        map.insert("MessageId".into(), self.message_id.into());
        map.insert("SequenceNumber".into(), self.sequence_number.into());
        map.insert("State".into(), "Active".into());
        let ttl = meta.time_to_live.unwrap_or(DEFAULT_TIME_TO_LIVE_SECS);
        map.insert("TimeToLive".into(), ttl.into());
        let optional = [
            ("CorrelationId", self.correlation_id),
            ("SessionId", self.session_id.or(meta.session_id.as_deref())),
            ("ContentType", self.content_type),
            ("Label", meta.label.as_deref()),
            ("ReplyTo", meta.reply_to.as_deref()),
            ("To", meta.to.as_deref()),
            ("ReplyToSessionId", meta.reply_to_session_id.as_deref()),
            ("PartitionKey", meta.partition_key.as_deref()),
            ("ViaPartitionKey", meta.via_partition_key.as_deref()),
        ];
        for (key, value) in optional {
            if let Some(value) = value {
                map.insert(key.into(), value.into());
            }
        }
        if let Some(at) = scheduled {
            map.insert("ScheduledEnqueueTimeUtc".into(), format_date(at).into());
        }
        Value::Object(map).to_string()
    }
}

/// The JSON of the `BrokerProperties` header of a renew-lock response.
pub(crate) fn renewed_lock_json(sequence: u64, token: uuid::Uuid, until: SystemTime) -> String {
    let mut map = Map::new();
    map.insert("LockToken".into(), token.to_string().into());
    map.insert("LockedUntilUtc".into(), format_date(until).into());
    map.insert("SequenceNumber".into(), sequence.into());
    Value::Object(map).to_string()
}

/// Formats a time as RFC 1123 (`Wed, 02 Jul 2014 01:32:27 GMT`), as Service Bus does.
#[must_use]
pub fn format_date(at: SystemTime) -> String {
    let format = format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    OffsetDateTime::from(at).format(&format).unwrap_or_else(|_| {
        // Only years beyond 9999 cannot be formatted; clamp rather than fail.
        "Fri, 31 Dec 9999 23:59:59 GMT".to_owned()
    })
}

/// Parses an RFC 1123 / RFC 2822 date (`GMT` or a numeric offset), or RFC 3339.
#[must_use]
pub fn parse_date(text: &str) -> Option<SystemTime> {
    let text = text.trim();
    OffsetDateTime::parse(text, &Rfc2822)
        .or_else(|_| OffsetDateTime::parse(text, &Rfc3339))
        .ok()
        .map(SystemTime::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_property_types_follow_json_and_fall_back_to_string() {
        assert_eq!(decode_custom_property("\"High\""), ("High".into(), None));
        assert_eq!(decode_custom_property("High"), ("High".into(), None));
        assert_eq!(decode_custom_property("12345,ABC"), ("12345,ABC".into(), None));
        assert_eq!(decode_custom_property("12"), ("12".into(), Some(PropertyType::Number)));
        assert_eq!(decode_custom_property("-1.5"), ("-1.5".into(), Some(PropertyType::Number)));
        assert_eq!(decode_custom_property("true"), ("true".into(), Some(PropertyType::Boolean)));
        assert_eq!(decode_custom_property("\"12\""), ("12".into(), None));
        assert_eq!(decode_custom_property("null"), ("null".into(), None));
    }

    #[test]
    fn custom_property_encoding_quotes_strings_only() {
        assert_eq!(encode_custom_property("High", None), "\"High\"");
        assert_eq!(encode_custom_property("say \"hi\"", None), r#""say \"hi\"""#);
        assert_eq!(encode_custom_property("12", Some(PropertyType::Number)), "12");
        assert_eq!(encode_custom_property("false", Some(PropertyType::Boolean)), "false");
    }

    #[test]
    fn dates_format_as_rfc_1123_and_parse_back() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_404_264_747);
        assert_eq!(format_date(at), "Wed, 02 Jul 2014 01:32:27 GMT");
        assert_eq!(parse_date("Wed, 02 Jul 2014 01:32:27 GMT"), Some(at));
        assert_eq!(parse_date(" Wed, 02 Jul 2014 01:32:27 +0000"), Some(at));
        assert_eq!(parse_date("2014-07-02T01:32:27Z"), Some(at));
        assert_eq!(parse_date("yesterday"), None);
    }

    #[test]
    fn meta_round_trips_through_its_property_and_is_absent_when_empty() {
        assert_eq!(Meta::default().to_property(), None);
        let meta = Meta {
            label: Some("M1".into()),
            time_to_live: Some(10.0),
            types: [("n".to_owned(), PropertyType::Number)].into(),
            ..Meta::default()
        };
        let mut properties = BTreeMap::new();
        properties.insert(META_PROPERTY.to_owned(), meta.to_property().unwrap());
        assert_eq!(Meta::from_properties(&properties), meta);
        assert_eq!(Meta::from_properties(&BTreeMap::new()), Meta::default());
    }

    #[test]
    fn received_broker_properties_carry_lock_and_sent_fields() {
        let meta = Meta { label: Some("M1".into()), ..Meta::default() };
        let token = uuid::Uuid::new_v4();
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_404_264_747);
        let json = ReceivedBrokerProperties {
            message_id: "m-1",
            sequence_number: 2,
            delivery_count: 1,
            enqueued_time: Some(at),
            lock: Some((token, at + Duration::from_secs(60))),
            correlation_id: Some("c"),
            session_id: None,
            content_type: Some("application/json"),
            meta: &meta,
        }
        .to_json();
        let value: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["MessageId"], "m-1");
        assert_eq!(value["SequenceNumber"], 2);
        assert_eq!(value["DeliveryCount"], 1);
        assert_eq!(value["LockToken"], token.to_string());
        assert_eq!(value["LockedUntilUtc"], "Wed, 02 Jul 2014 01:33:27 GMT");
        assert_eq!(value["EnqueuedTimeUtc"], "Wed, 02 Jul 2014 01:32:27 GMT");
        assert_eq!(value["CorrelationId"], "c");
        assert_eq!(value["ContentType"], "application/json");
        assert_eq!(value["Label"], "M1");
        assert_eq!(value["State"], "Active");
        assert!(value["TimeToLive"].as_f64().unwrap() > 9.0e11);
        assert!(value.get("SessionId").is_none());
    }
}
