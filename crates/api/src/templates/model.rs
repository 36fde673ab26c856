//! Template types: properties and pipelines (reference §5.7).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::domain::{MAIN_STEP_ID, ResourceType, action};

/// A resource template: what a resource of this kind may hold and how it is deployed.
///
/// The JSON follows TRE's template schema (`name`, `version`, `resourceType`,
/// `required`, `properties`, `pipeline`, `customActions`); other keys (`$schema`,
/// `uiSchema`, …) are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Template {
    /// The template (bundle) name, unique in a registry.
    pub name: String,
    /// The template version.
    pub version: String,
    /// The kind of resource this template deploys.
    pub resource_type: ResourceType,
    /// A title for people.
    #[serde(default)]
    pub title: String,
    /// A description for people.
    #[serde(default)]
    pub description: String,
    /// Properties that must be given on install.
    #[serde(default)]
    pub required: Vec<String>,
    /// The properties a resource of this template may have.
    #[serde(default)]
    pub properties: BTreeMap<String, TemplateProperty>,
    /// Multi-step pipelines, by action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<Pipeline>,
    /// Custom actions a resource of this template supports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub custom_actions: Vec<CustomAction>,
    /// For a user-resource template: the workspace service template it belongs under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_workspace_service: Option<String>,
}

impl Template {
    /// The pipeline steps for `action`, if the template has a pipeline for it.
    #[must_use]
    pub fn pipeline_for(&self, action: &str) -> Option<&[PipelineStep]> {
        self.pipeline.as_ref().and_then(|pipeline| pipeline.for_action(action))
    }

    /// Whether `action` is a custom action of this template.
    #[must_use]
    pub fn has_custom_action(&self, name: &str) -> bool {
        self.custom_actions.iter().any(|custom| custom.name == name)
    }

    /// The names of the properties marked `sensitive`.
    pub fn sensitive_properties(&self) -> impl Iterator<Item = &str> {
        self.properties.iter().filter(|(_, p)| p.sensitive).map(|(name, _)| name.as_str())
    }
}

named_enum! {
    /// The JSON type of a template property.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum PropertyType {
        /// A string.
        String => "string",
        /// `true` or `false`.
        Boolean => "boolean",
        /// A whole number.
        Integer => "integer",
        /// Any number.
        Number => "number",
        /// A list.
        Array => "array",
        /// An object.
        Object => "object",
    }
}

impl PropertyType {
    /// Whether `value` has this type.
    #[must_use]
    pub fn matches(self, value: &Value) -> bool {
        match self {
            PropertyType::String => value.is_string(),
            PropertyType::Boolean => value.is_boolean(),
            PropertyType::Integer => value.is_i64() || value.is_u64(),
            PropertyType::Number => value.is_number(),
            PropertyType::Array => value.is_array(),
            PropertyType::Object => value.is_object(),
        }
    }
}

/// One property of a template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateProperty {
    /// The JSON type.
    #[serde(rename = "type")]
    pub property_type: PropertyType,
    /// A title for people.
    #[serde(default)]
    pub title: String,
    /// A description for people.
    #[serde(default)]
    pub description: String,
    /// The value used when an install does not give one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
    /// The allowed values, if limited.
    #[serde(rename = "enum", default, skip_serializing_if = "Option::is_none")]
    pub allowed: Option<Vec<Value>>,
    /// Whether an upgrade may change it.
    #[serde(default)]
    pub updateable: bool,
    /// Whether it is a secret: stored and returned as `"REDACTED"`.
    #[serde(default)]
    pub sensitive: bool,
    /// The longest string value allowed, in characters (JSON Schema `maxLength`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
}

/// A custom action of a template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomAction {
    /// The action name (e.g. `start`).
    pub name: String,
    /// A description for people.
    #[serde(default)]
    pub description: String,
}

/// Pipelines by action (TRE `Pipeline`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// Steps of an install.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install: Option<Vec<PipelineStep>>,
    /// Steps of an upgrade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<Vec<PipelineStep>>,
    /// Steps of an uninstall.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uninstall: Option<Vec<PipelineStep>>,
}

impl Pipeline {
    /// The steps for `action`; custom actions have no pipeline.
    #[must_use]
    pub fn for_action(&self, name: &str) -> Option<&[PipelineStep]> {
        match name {
            action::INSTALL => self.install.as_deref(),
            action::UPGRADE => self.upgrade.as_deref(),
            action::UNINSTALL => self.uninstall.as_deref(),
            _ => None,
        }
    }

    /// Every action with its steps.
    pub fn actions(&self) -> impl Iterator<Item = (&'static str, &[PipelineStep])> {
        [
            (action::INSTALL, self.install.as_deref()),
            (action::UPGRADE, self.upgrade.as_deref()),
            (action::UNINSTALL, self.uninstall.as_deref()),
        ]
        .into_iter()
        .filter_map(|(name, steps)| steps.map(|steps| (name, steps)))
    }
}

/// One step of a pipeline (TRE `PipelineStep`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PipelineStep {
    /// `main` for the resource itself, otherwise an id unique in the pipeline.
    pub step_id: String,
    /// A title for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_title: Option<String>,
    /// The template of the resource the step acts on (non-main steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_template_name: Option<String>,
    /// The type of the resource the step acts on (non-main steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_type: Option<ResourceType>,
    /// The action the step runs on that resource (non-main steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_action: Option<String>,
    /// Properties to set on that resource, with substitution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<Vec<PipelineStepProperty>>,
}

impl PipelineStep {
    /// Whether this is the step for the resource itself.
    #[must_use]
    pub fn is_main(&self) -> bool {
        self.step_id == MAIN_STEP_ID
    }
}

/// How a pipeline step changes an array property.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArraySubstitutionAction {
    /// Keep the array as it is (TRE's `""`).
    #[default]
    #[serde(rename = "")]
    None,
    /// Replace the whole array with `[value]`.
    Overwrite,
    /// Append the value.
    Append,
    /// Replace the element whose match field equals the value's, or append.
    Replace,
    /// Remove the first element whose match field equals the value's.
    Remove,
}

/// A property a pipeline step sets (TRE `PipelineStepProperty`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PipelineStepProperty {
    /// The property name on the resource the step acts on.
    pub name: String,
    /// The property type (`string`, `array`, …).
    #[serde(rename = "type")]
    pub property_type: String,
    /// The value, with `{{ resource.… }}` tokens.
    #[serde(default)]
    pub value: Value,
    /// For `array` properties whose value is an object: how to change the array.
    #[serde(default)]
    pub array_substitution_action: ArraySubstitutionAction,
    /// For `replace` and `remove`: the field that identifies an element.
    #[serde(default)]
    pub array_match_field: String,
}
