//! Property substitution for pipeline steps (reference §6.7, TRE
//! `service_bus/substitutions.py`).
//!
//! A pipeline step sets properties on the resource it acts on; string values may hold
//! `{{ resource.<path> }}` tokens that read the primary resource (the one whose template
//! defines the pipeline) or, with `resource.parent` / `resource.parent.parent`, its
//! parent workspace service and workspace:
//!
//! | primary resource | `parent` | `parent.parent` | deeper |
//! |---|---|---|---|
//! | user resource | workspace service | workspace | error |
//! | workspace service | workspace | error | error |
//! | workspace, shared service | error | error | error |
//!
//! The rules, as TRE applies them:
//! - one space after `{{` and before `}}` is ignored (steward ignores any whitespace
//!   there);
//! - a path that does not exist makes the whole value `""` (TRE keeps this for backward
//!   compatibility);
//! - a value that is exactly one token keeps the looked-up type (bool, number, list,
//!   object);
//! - a list or object looked up inside longer text replaces the whole value, dropping
//!   the text;
//! - otherwise each token is replaced by the value as Python's `str()` writes it
//!   (`True`, `False`, `None`, `42`), so tokens concatenate with text;
//! - objects and lists in a step value are substituted recursively;
//! - an `array` property whose value is an object changes the target's existing array:
//!   `overwrite` → `[value]`, `append`, `replace` (the element whose `arrayMatchField`
//!   matches, or append) or `remove` (the first such element; nothing if none).
//!
//! Where steward differs, on purpose: a token whose root is not `resource` is left as
//! written (TRE resolves it as if it were `resource`); only leading `parent` segments
//! count as parent levels (TRE also counts a property named `parent` at positions 2–3);
//! numbers, booleans and `null` inside step values are kept (TRE raises `TypeError`).

use serde_json::{Map, Value};

use crate::domain::{Properties, Resource, ResourceType};
use crate::templates::{ArraySubstitutionAction, PipelineStep};

/// A value that cannot be substituted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubstitutionError {
    /// There is no primary resource to read tokens from (TRE: `Exception`).
    #[error("a primary resource is needed to substitute {value:?}")]
    MissingPrimary {
        /// The value with tokens.
        value: String,
    },
    /// The primary resource has no known `resourceType`.
    #[error("the primary resource has no known resourceType")]
    UnknownResourceType,
    /// More parent levels than the primary resource has (TRE: `ValueError`).
    #[error("{token:?}: a {resource_type} has fewer than {levels} parent levels")]
    TooManyParents {
        /// The token.
        token: String,
        /// The primary resource's type.
        resource_type: ResourceType,
        /// The levels asked for.
        levels: usize,
    },
    /// The parent a token names was not provided.
    #[error("{token:?}: the parent {parent} was not provided")]
    MissingParent {
        /// The token.
        token: String,
        /// `workspace` or `workspace service`.
        parent: &'static str,
    },
    /// A `replace` or `remove` value lacks its `arrayMatchField` (TRE: `KeyError`).
    #[error("property {property:?}: the value has no field {field:?} to match array elements on")]
    MissingMatchField {
        /// The property.
        property: String,
        /// The match field.
        field: String,
    },
    /// The target's existing value of an `array` property is not a list.
    #[error("property {property:?} of the resource being updated is not a list")]
    NotAList {
        /// The property.
        property: String,
    },
    /// A resource could not be turned into JSON.
    #[error("cannot read the resource as JSON")]
    Json(#[source] serde_json::Error),
}

/// Substitutes the tokens of one string value (TRE `substitute_value`), reading the
/// serialized primary resource and its parents.
///
/// # Errors
///
/// See [`SubstitutionError`]. A value without `{{` is returned unchanged even without a
/// primary resource.
pub fn substitute_value(
    value: &str,
    primary: Option<&Value>,
    parent_workspace: Option<&Value>,
    parent_workspace_service: Option<&Value>,
) -> Result<Value, SubstitutionError> {
    if !value.contains("{{") {
        return Ok(Value::String(value.to_owned()));
    }
    let primary =
        primary.ok_or_else(|| SubstitutionError::MissingPrimary { value: value.to_owned() })?;
    let primary_type: ResourceType = primary
        .get("resourceType")
        .and_then(Value::as_str)
        .and_then(|kind| kind.parse().ok())
        .ok_or(SubstitutionError::UnknownResourceType)?;

    let pieces = split_tokens(value);
    let only_token = pieces.len() == 1 && matches!(pieces[0], Piece::Token { .. });
    let mut output = String::new();
    for piece in &pieces {
        let (raw, path) = match piece {
            Piece::Text(text) => {
                output.push_str(text);
                continue;
            }
            Piece::Token { raw, path } => (raw, path),
        };
        let segments: Vec<&str> = path.split('.').collect();
        if segments.first() != Some(&"resource") {
            output.push_str(raw);
            continue;
        }
        let levels = segments[1..].iter().take_while(|segment| **segment == "parent").count();
        let max_levels = match primary_type {
            ResourceType::UserResource => 2,
            ResourceType::WorkspaceService => 1,
            ResourceType::Workspace | ResourceType::SharedService => 0,
        };
        if levels > max_levels {
            return Err(SubstitutionError::TooManyParents {
                token: (*path).to_owned(),
                resource_type: primary_type,
                levels,
            });
        }
        let missing_parent =
            |parent| SubstitutionError::MissingParent { token: (*path).to_owned(), parent };
        let source = match (levels, primary_type) {
            (0, _) => primary,
            (1, ResourceType::UserResource) => {
                parent_workspace_service.ok_or_else(|| missing_parent("workspace service"))?
            }
            _ => parent_workspace.ok_or_else(|| missing_parent("workspace"))?,
        };
        let mut found = source;
        for segment in &segments[1 + levels..] {
            match found.get(segment) {
                Some(next) if found.is_object() => found = next,
                // TRE: a missing key gives "" for the whole value (backward compatibility).
                _ => return Ok(Value::String(String::new())),
            }
        }
        if found.is_object() || found.is_array() || only_token {
            return Ok(found.clone());
        }
        output.push_str(&python_str(found));
    }
    Ok(Value::String(output))
}

/// Substitutes every string inside `value`, recursing into objects and lists.
///
/// # Errors
///
/// As [`substitute_value`].
pub fn substitute_recursively(
    value: &Value,
    primary: Option<&Value>,
    parent_workspace: Option<&Value>,
    parent_workspace_service: Option<&Value>,
) -> Result<Value, SubstitutionError> {
    Ok(match value {
        Value::String(text) => {
            substitute_value(text, primary, parent_workspace, parent_workspace_service)?
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|item| {
                    substitute_recursively(
                        item,
                        primary,
                        parent_workspace,
                        parent_workspace_service,
                    )
                })
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(key, item)| {
                    substitute_recursively(
                        item,
                        primary,
                        parent_workspace,
                        parent_workspace_service,
                    )
                    .map(|item| (key.clone(), item))
                })
                .collect::<Result<Map<_, _>, _>>()?,
        ),
        other => other.clone(),
    })
}

/// The properties a pipeline step sets on `resource_to_update` (TRE
/// `substitute_properties`): tokens resolved against the primary resource and its
/// parents, and array properties merged into the target's current arrays.
///
/// # Errors
///
/// See [`SubstitutionError`].
pub fn substitute_properties(
    step: &PipelineStep,
    primary: &Resource,
    parent_workspace: Option<&Resource>,
    parent_workspace_service: Option<&Resource>,
    resource_to_update: &Resource,
) -> Result<Properties, SubstitutionError> {
    let mut properties = Properties::new();
    let Some(step_properties) = &step.properties else { return Ok(properties) };
    let to_json =
        |resource: &Resource| serde_json::to_value(resource).map_err(SubstitutionError::Json);
    let primary = to_json(primary)?;
    let parent_workspace = parent_workspace.map(to_json).transpose()?;
    let parent_workspace_service = parent_workspace_service.map(to_json).transpose()?;
    let sources = (Some(&primary), parent_workspace.as_ref(), parent_workspace_service.as_ref());

    for property in step_properties {
        let value = substitute_recursively(&property.value, sources.0, sources.1, sources.2)?;
        let is_array_change = property.value.is_object() && property.property_type == "array";
        if !is_array_change {
            properties.insert(property.name.clone(), value);
            continue;
        }
        let mut array = match resource_to_update.properties.get(&property.name) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items.clone(),
            Some(_) if property.array_substitution_action == ArraySubstitutionAction::Overwrite => {
                Vec::new()
            }
            Some(_) => return Err(SubstitutionError::NotAList { property: property.name.clone() }),
        };
        let position = |array: &[Value]| -> Result<Option<usize>, SubstitutionError> {
            let field = &property.array_match_field;
            let wanted = value.get(field).ok_or_else(|| SubstitutionError::MissingMatchField {
                property: property.name.clone(),
                field: field.clone(),
            })?;
            Ok(array.iter().position(|item| item.get(field) == Some(wanted)))
        };
        match property.array_substitution_action {
            ArraySubstitutionAction::None => {}
            ArraySubstitutionAction::Overwrite => array = vec![value],
            ArraySubstitutionAction::Append => array.push(value),
            ArraySubstitutionAction::Remove => {
                if let Some(index) = position(&array)? {
                    array.remove(index);
                }
            }
            ArraySubstitutionAction::Replace => match position(&array)? {
                Some(index) => array[index] = value,
                None => array.push(value),
            },
        }
        properties.insert(property.name.clone(), Value::Array(array));
    }
    Ok(properties)
}

enum Piece<'a> {
    Text(&'a str),
    /// `raw` is the whole `{{ … }}`; `path` the trimmed inside.
    Token {
        raw: &'a str,
        path: &'a str,
    },
}

/// Splits text into literal pieces and `{{ … }}` tokens. An opening `{{` without a
/// closing `}}` stays text.
fn split_tokens(value: &str) -> Vec<Piece<'_>> {
    let mut pieces = Vec::new();
    let mut rest = value;
    while let Some(start) = rest.find("{{") {
        let Some(length) = rest[start + 2..].find("}}") else { break };
        let end = start + 2 + length + 2;
        if start > 0 {
            pieces.push(Piece::Text(&rest[..start]));
        }
        pieces.push(Piece::Token { raw: &rest[start..end], path: rest[start + 2..end - 2].trim() });
        rest = &rest[end..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest));
    }
    pieces
}

/// A scalar as Python's `str()` writes it.
fn python_str(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Bool(true) => "True".to_owned(),
        Value::Bool(false) => "False".to_owned(),
        Value::Null => "None".to_owned(),
        other => other.to_string(),
    }
}
