//! Events the API publishes about airlock requests (reference §4.4): `statusChanged`
//! v2.0 for the airlock processor and `airlockNotification` v4.0 for the notifier.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::airlock::{AirlockFile, AirlockRequest, AirlockRequestStatus, AirlockRequestType};
use super::resource::{Resource, User};

/// An Event Grid event (EventGridSchema) with typed `data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventGridEvent<D> {
    /// The event id (a UUIDv4 string).
    pub id: String,
    /// `{request_id}/statusChanged` or `{request_id}/airlockNotification`.
    pub subject: String,
    /// The payload.
    pub data: D,
    /// `statusChanged` or `airlockNotification`.
    pub event_type: String,
    /// When, as an RFC 3339 UTC timestamp.
    pub event_time: String,
    /// `2.0` or `4.0`.
    pub data_version: String,
    /// The topic, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// The metadata version, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata_version: Option<String>,
}

/// The `data` of a `statusChanged` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusChangedData {
    /// The airlock request.
    pub request_id: String,
    /// Its new status.
    pub new_status: AirlockRequestStatus,
    /// Its status before the change.
    pub previous_status: Option<AirlockRequestStatus>,
    /// Import or export.
    #[serde(rename = "type")]
    pub request_type: Option<AirlockRequestType>,
    /// The last four characters of the workspace id.
    pub workspace_id: String,
}

/// A `statusChanged` event (data version 2.0).
pub type StatusChangedEvent = EventGridEvent<StatusChangedData>;

/// A name and an e-mail address, as the notifier wants them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationUser {
    /// Display name.
    pub name: String,
    /// E-mail address.
    pub email: String,
}

impl From<&User> for NotificationUser {
    fn from(user: &User) -> Self {
        NotificationUser { name: user.name.clone(), email: user.email.clone() }
    }
}

/// The request part of an `airlockNotification` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotificationRequest {
    /// The request id.
    pub id: String,
    /// When it was created, in POSIX seconds.
    pub created_when: Option<f64>,
    /// Who created it.
    pub created_by: NotificationUser,
    /// When it was changed last, in POSIX seconds.
    pub updated_when: f64,
    /// Who changed it last.
    pub updated_by: NotificationUser,
    /// Import or export.
    pub request_type: Option<AirlockRequestType>,
    /// The files.
    pub files: Vec<AirlockFile>,
    /// The status.
    pub status: AirlockRequestStatus,
    /// Why the data must move.
    pub business_justification: String,
}

/// The workspace part of an `airlockNotification` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationWorkspace {
    /// The workspace id.
    pub id: String,
    /// `properties.display_name` of the workspace.
    pub display_name: String,
    /// `properties.description` of the workspace.
    pub description: String,
}

/// The `data` of an `airlockNotification` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AirlockNotificationData {
    /// Always `status_changed`.
    pub event_type: String,
    /// E-mail addresses by snake_case role name (`workspace_researcher`, …).
    pub recipient_emails_by_role: BTreeMap<String, Vec<String>>,
    /// The request.
    pub request: NotificationRequest,
    /// The workspace.
    pub workspace: NotificationWorkspace,
}

/// An `airlockNotification` event (data version 4.0).
pub type AirlockNotificationEvent = EventGridEvent<AirlockNotificationData>;

/// The `statusChanged` event for `request`, which has just moved from `previous_status`.
#[must_use]
pub fn status_changed_event(
    request: &AirlockRequest,
    previous_status: Option<AirlockRequestStatus>,
    event_id: String,
    now: f64,
) -> StatusChangedEvent {
    let short_workspace_id: String = {
        let chars: Vec<char> = request.workspace_id.chars().collect();
        chars[chars.len().saturating_sub(4)..].iter().collect()
    };
    EventGridEvent {
        id: event_id,
        subject: format!("{}/statusChanged", request.id),
        data: StatusChangedData {
            request_id: request.id.clone(),
            new_status: request.status,
            previous_status,
            request_type: request.request_type,
            workspace_id: short_workspace_id,
        },
        event_type: "statusChanged".to_owned(),
        event_time: rfc3339_utc(now),
        data_version: "2.0".to_owned(),
        topic: None,
        metadata_version: None,
    }
}

/// The `airlockNotification` event for `request` in `workspace`.
#[must_use]
pub fn airlock_notification_event(
    request: &AirlockRequest,
    workspace: &Resource,
    recipient_emails_by_role: BTreeMap<String, Vec<String>>,
    event_id: String,
    now: f64,
) -> AirlockNotificationEvent {
    let text = |key: &str| {
        workspace
            .properties
            .get(key)
            .and_then(|value| value.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    EventGridEvent {
        id: event_id,
        subject: format!("{}/airlockNotification", request.id),
        data: AirlockNotificationData {
            event_type: "status_changed".to_owned(),
            recipient_emails_by_role,
            request: NotificationRequest {
                id: request.id.clone(),
                created_when: request.created_when,
                created_by: (&request.created_by).into(),
                updated_when: request.updated_when,
                updated_by: (&request.updated_by).into(),
                request_type: request.request_type,
                files: request.files.clone(),
                status: request.status,
                business_justification: request.business_justification.clone(),
            },
            workspace: NotificationWorkspace {
                id: workspace.id.clone(),
                display_name: text("display_name"),
                description: text("description"),
            },
        },
        event_type: "airlockNotification".to_owned(),
        event_time: rfc3339_utc(now),
        data_version: "4.0".to_owned(),
        topic: None,
        metadata_version: None,
    }
}

/// Formats POSIX seconds as `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
#[must_use]
pub fn rfc3339_utc(seconds: f64) -> String {
    // Microseconds fit an i64 for any date this service will see; out-of-range values
    // saturate, which is good enough for a timestamp in an event.
    #[allow(clippy::cast_possible_truncation)]
    let micros = (seconds * 1_000_000.0).round() as i64;
    let secs = micros.div_euclid(1_000_000);
    let fraction = micros.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{fraction:06}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (year, month, day).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339_utc(0.0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339_utc(1_755_424_800.123_456), "2025-08-17T10:00:00.123456Z");
        assert_eq!(rfc3339_utc(951_782_400.0), "2000-02-29T00:00:00.000000Z");
        assert_eq!(rfc3339_utc(-1.0), "1969-12-31T23:59:59.000000Z");
    }
}
