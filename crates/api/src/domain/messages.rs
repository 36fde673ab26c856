//! Messages on the wire between the API and the processors (reference §4.1–4.3).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use super::airlock::{AirlockFile, AirlockRequestStatus};
use super::resource::Properties;
use super::status::{Status, UnknownValue};

/// A resource request: what the API asks the resource processor to do
/// (queue `workspacequeue`, correlation id = operation id, session id = resource id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceRequest {
    /// The operation.
    pub operation_id: String,
    /// The step of the operation.
    pub step_id: String,
    /// `install`, `upgrade`, `uninstall` or a custom action.
    pub action: String,
    /// The resource id (also the porter installation id).
    pub id: String,
    /// The template (bundle) name.
    pub name: String,
    /// The template version.
    pub version: String,
    /// The resource properties.
    pub parameters: Properties,
    /// The workspace, for workspace services and user resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_id: Option<String>,
    /// The owner, for user resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_id: Option<String>,
    /// The parent workspace service, for user resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_workspace_service_id: Option<String>,
}

/// A version-4 UUID as pydantic's `UUID4` accepts it: any case, with or without
/// hyphens, normalised to lowercase hyphenated form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Uuid4(uuid::Uuid);

/// A string that is not a version-4 UUID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a version 4 UUID")]
pub struct NotUuid4 {
    /// The string that was given.
    pub value: String,
}

impl Uuid4 {
    /// A new random id.
    #[must_use]
    pub fn new_v4() -> Self {
        Uuid4(uuid::Uuid::new_v4())
    }

    /// The UUID.
    #[must_use]
    pub fn as_uuid(&self) -> &uuid::Uuid {
        &self.0
    }
}

impl FromStr for Uuid4 {
    type Err = NotUuid4;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match uuid::Uuid::try_parse(s) {
            Ok(id) if id.get_version_num() == 4 => Ok(Uuid4(id)),
            _ => Err(NotUuid4 { value: s.to_owned() }),
        }
    }
}

impl fmt::Display for Uuid4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl Serialize for Uuid4 {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Uuid4 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One output of a porter bundle in a [`DeploymentStatusUpdate`].
///
/// Keys are read as `name`/`Name`, `value`/`Value`, `type`/`Type`. The `value` key is
/// required but may be `null`; a boolean or numeric value is rejected, as TRE rejects it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Output {
    /// The output name.
    #[serde(alias = "Name")]
    pub name: String,
    /// A string, a list or an object; `None` for `null`.
    #[serde(alias = "Value", deserialize_with = "output_value")]
    pub value: Option<Value>,
    /// The porter type (`string`, `boolean`, …).
    #[serde(rename = "type", alias = "Type")]
    pub output_type: String,
}

fn output_value<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    match Value::deserialize(deserializer)? {
        Value::Null => Ok(None),
        value @ (Value::String(_) | Value::Array(_) | Value::Object(_)) => Ok(Some(value)),
        other => Err(serde::de::Error::custom(format!(
            "output value must be a string, a list, an object or null, not {other}"
        ))),
    }
}

/// A status report from the resource processor (queue `deploymentstatus`, session id =
/// operation id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentStatusUpdate {
    /// The operation.
    pub operation_id: Uuid4,
    /// The step of the operation.
    pub step_id: String,
    /// The resource.
    pub id: Uuid4,
    /// The new status of the step.
    pub status: Status,
    /// What happened, `"<resource id>: <text>"`.
    pub message: String,
    /// The bundle's outputs, merged into the resource's properties on success.
    #[serde(default)]
    pub outputs: Vec<Output>,
}

/// An output that cannot become a property.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("output {name:?} of type boolean has a list or object value")]
pub struct OutputError {
    /// The output name.
    pub name: String,
}

/// Turns outputs into properties as TRE's `convert_outputs_to_dict` does: `null` values
/// are skipped, strings of type `string` lose surrounding `'` then `"`, values of type
/// `boolean` become `true` when they read `true` in any case, and everything else is
/// kept as given.
///
/// # Errors
///
/// A `boolean` output whose value is a list or an object.
pub fn outputs_to_properties(outputs: &[Output]) -> Result<Properties, OutputError> {
    let mut properties = Properties::new();
    for output in outputs {
        let Some(value) = &output.value else { continue };
        let converted = match (output.output_type.as_str(), value) {
            ("string", Value::String(text)) => Value::String(strip_quotes(text).to_owned()),
            ("boolean", Value::String(text)) => {
                Value::Bool(strip_quotes(text).eq_ignore_ascii_case("true"))
            }
            ("boolean", _) => return Err(OutputError { name: output.name.clone() }),
            (_, other) => other.clone(),
        };
        properties.insert(output.name.clone(), converted);
    }
    Ok(properties)
}

/// Python's `value.strip("'").strip('"')`.
fn strip_quotes(text: &str) -> &str {
    text.trim_matches('\'').trim_matches('"')
}

/// The `data` of an airlock step result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepResultData {
    /// The status the request must currently be in.
    pub completed_step: String,
    /// The status to move to; `None` for a files-only update.
    #[serde(default)]
    pub new_status: Option<String>,
    /// The airlock request.
    pub request_id: String,
    /// The files of the request, when the processor reports them.
    #[serde(default)]
    pub request_files: Option<Vec<AirlockFile>>,
    /// A message about the step (a scan verdict, a failure reason).
    #[serde(default)]
    pub status_message: Option<String>,
}

impl StepResultData {
    /// The status the request must currently be in, parsed.
    ///
    /// # Errors
    ///
    /// `completed_step` is not an airlock request status.
    pub fn completed_status(&self) -> Result<AirlockRequestStatus, UnknownValue> {
        self.completed_step.parse()
    }

    /// The status to move to, parsed; `None` for a files-only update.
    ///
    /// # Errors
    ///
    /// `new_status` is not an airlock request status.
    pub fn new_status(&self) -> Result<Option<AirlockRequestStatus>, UnknownValue> {
        self.new_status.as_deref().filter(|s| !s.is_empty()).map(str::parse).transpose()
    }
}

/// An airlock step result: one Event Grid event (queue `airlock-step-result`).
///
/// `dataVersion` and `metadataVersion` are kept when present but not checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepResultEvent {
    /// The event id.
    pub id: Uuid4,
    /// The request id.
    pub subject: String,
    /// What happened.
    pub data: StepResultData,
    /// `Airlock.StepResult` (not checked).
    pub event_type: String,
    /// When (not parsed).
    pub event_time: String,
    /// The topic (Event Grid fills it in).
    pub topic: String,
    /// The data version (ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_version: Option<String>,
    /// The metadata version (ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata_version: Option<String>,
}
