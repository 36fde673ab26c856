//! The template registry: the shipped templates plus those of `STEWARD_TEMPLATES_DIR`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::model::{ArraySubstitutionAction, PipelineStep, Template};
use crate::domain::{ResourceType, action};

/// The templates shipped with steward, embedded in the binary.
const BUILTIN: &[(&str, &str)] = &[
    ("tre-workspace-base.json", include_str!("../../templates/tre-workspace-base.json")),
    (
        "tre-shared-service-firewall.json",
        include_str!("../../templates/tre-shared-service-firewall.json"),
    ),
    ("tre-service-guacamole.json", include_str!("../../templates/tre-service-guacamole.json")),
    (
        "tre-user-resource-linuxvm.json",
        include_str!("../../templates/tre-user-resource-linuxvm.json"),
    ),
];

/// A template that could not be loaded. Each variant names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    /// The file or directory could not be read.
    #[error("cannot read template {file}")]
    Read {
        /// The file or directory.
        file: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid JSON, or a field has the wrong shape.
    #[error("template {file}: field `{field}` is invalid")]
    Parse {
        /// The file.
        file: String,
        /// The path of the field, e.g. `pipeline.install[0].stepId` (`.` for the top).
        field: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A field breaks a rule that the JSON shape cannot express.
    #[error("template {file}: field `{field}`: {message}")]
    Invalid {
        /// The file.
        file: String,
        /// The path of the field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// Two templates in the same directory have the same name.
    #[error("template {file}: name {name:?} is already used by {other_file}")]
    Duplicate {
        /// The template name.
        name: String,
        /// The second file.
        file: String,
        /// The first file.
        other_file: String,
    },
}

/// The templates a service knows, by name.
///
/// # Examples
///
/// ```
/// use steward_api::templates::TemplateRegistry;
///
/// let registry = TemplateRegistry::builtin()?;
/// let linuxvm = registry.get("tre-user-resource-linuxvm").expect("shipped");
/// assert_eq!(linuxvm.pipeline_for("install").map(<[_]>::len), Some(3));
/// # Ok::<(), steward_api::templates::TemplateError>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct TemplateRegistry {
    templates: BTreeMap<String, Template>,
    files: BTreeMap<String, String>,
}

impl TemplateRegistry {
    /// The shipped sample templates: `tre-workspace-base`, `tre-shared-service-firewall`,
    /// `tre-service-guacamole` and `tre-user-resource-linuxvm`.
    ///
    /// # Errors
    ///
    /// A shipped template is invalid (a build defect, caught by the crate's tests).
    pub fn builtin() -> Result<Self, TemplateError> {
        let mut registry = TemplateRegistry::default();
        for (file, text) in BUILTIN {
            registry.add(&format!("builtin:{file}"), text, false)?;
        }
        registry.validate_references()?;
        Ok(registry)
    }

    /// The shipped templates plus every `*.json` file in `dir` (when given). A template
    /// in `dir` with the name of a shipped one replaces it.
    ///
    /// # Errors
    ///
    /// The directory cannot be read, or a file in it is not a valid template; the error
    /// names the file and the field.
    pub fn load(dir: Option<&Path>) -> Result<Self, TemplateError> {
        let mut registry = TemplateRegistry::default();
        for (file, text) in BUILTIN {
            registry.add(&format!("builtin:{file}"), text, false)?;
        }
        if let Some(dir) = dir {
            let read_error =
                |source| TemplateError::Read { file: dir.display().to_string(), source };
            let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(read_error)?
                .map(|entry| entry.map(|entry| entry.path()))
                .collect::<Result<_, _>>()
                .map_err(read_error)?;
            paths
                .retain(|path| path.extension().is_some_and(|ext| ext == "json") && path.is_file());
            paths.sort();
            let mut from_dir = BTreeSet::new();
            for path in paths {
                let file = path.display().to_string();
                let text = std::fs::read_to_string(&path)
                    .map_err(|source| TemplateError::Read { file: file.clone(), source })?;
                let name = registry.add(&file, &text, true)?;
                if !from_dir.insert(name.clone()) {
                    let other_file = registry.files.get(&name).cloned().unwrap_or_default();
                    return Err(TemplateError::Duplicate { name, file, other_file });
                }
            }
        }
        registry.validate_references()?;
        Ok(registry)
    }

    /// Parses one template file and checks the rules that need no other template.
    ///
    /// # Errors
    ///
    /// The text is not a valid template; the error names `file` and the field.
    pub fn parse(file: &str, text: &str) -> Result<Template, TemplateError> {
        let deserializer = &mut serde_json::Deserializer::from_str(text);
        let template: Template =
            serde_path_to_error::deserialize(deserializer).map_err(|error| {
                TemplateError::Parse {
                    file: file.to_owned(),
                    field: error.path().to_string(),
                    source: error.into_inner(),
                }
            })?;
        check_template(file, &template)?;
        Ok(template)
    }

    fn add(&mut self, file: &str, text: &str, replace: bool) -> Result<String, TemplateError> {
        let template = Self::parse(file, text)?;
        let name = template.name.clone();
        if !replace && let Some(other_file) = self.files.get(&name) {
            return Err(TemplateError::Duplicate {
                name,
                file: file.to_owned(),
                other_file: other_file.clone(),
            });
        }
        if let Some(previous) = self.files.insert(name.clone(), file.to_owned()) {
            tracing::info!(template = %name, file, replaced = %previous, "template replaces a shipped one");
        }
        self.templates.insert(name.clone(), template);
        Ok(name)
    }

    /// The rules that involve more than one template: pipeline targets and parents exist
    /// with the declared type, and the properties a step sets exist on the target and,
    /// for actions other than install, are `updateable`.
    fn validate_references(&self) -> Result<(), TemplateError> {
        for (name, template) in &self.templates {
            let file = self.files.get(name).map_or("", String::as_str);
            let invalid = |field: String, message: String| TemplateError::Invalid {
                file: file.to_owned(),
                field,
                message,
            };
            if let Some(parent) = &template.parent_workspace_service {
                match self.templates.get(parent) {
                    Some(found) if found.resource_type == ResourceType::WorkspaceService => {}
                    _ => {
                        return Err(invalid(
                            "parentWorkspaceService".to_owned(),
                            format!(
                                "{parent:?} is not a workspace-service template in the registry"
                            ),
                        ));
                    }
                }
            }
            let Some(pipeline) = &template.pipeline else { continue };
            for (action_name, steps) in pipeline.actions() {
                for (index, step) in steps.iter().enumerate().filter(|(_, step)| !step.is_main()) {
                    let at = format!("pipeline.{action_name}[{index}]");
                    let target_name = step.resource_template_name.as_deref().unwrap_or_default();
                    let target = match self.templates.get(target_name) {
                        Some(target) if Some(target.resource_type) == step.resource_type => target,
                        _ => {
                            return Err(invalid(
                                format!("{at}.resourceTemplateName"),
                                format!(
                                    "no {} template named {target_name:?} in the registry",
                                    step.resource_type.map_or("", ResourceType::as_str)
                                ),
                            ));
                        }
                    };
                    let step_action = step.resource_action.as_deref().unwrap_or(action::INSTALL);
                    for (p, property) in step.properties.iter().flatten().enumerate() {
                        let message = match target.properties.get(&property.name) {
                            None => {
                                format!("{:?} is not a property of {target_name}", property.name)
                            }
                            Some(found) if step_action != action::INSTALL && !found.updateable => {
                                format!(
                                    "{:?} is not an updateable property of {target_name}",
                                    property.name
                                )
                            }
                            Some(_) => continue,
                        };
                        return Err(invalid(format!("{at}.properties[{p}].name"), message));
                    }
                }
            }
        }
        Ok(())
    }

    /// The template with this name.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&Template> {
        self.templates.get(name)
    }

    /// Every template, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Template> {
        self.templates.values()
    }

    /// The number of templates.
    #[must_use]
    pub fn len(&self) -> usize {
        self.templates.len()
    }

    /// Whether there are no templates.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.templates.is_empty()
    }

    /// The file a template came from (`builtin:<file>` for shipped ones).
    #[must_use]
    pub fn file_of(&self, name: &str) -> Option<&str> {
        self.files.get(name).map(String::as_str)
    }
}

/// The rules one template must follow on its own.
fn check_template(file: &str, template: &Template) -> Result<(), TemplateError> {
    let invalid = |field: String, message: &str| TemplateError::Invalid {
        file: file.to_owned(),
        field,
        message: message.to_owned(),
    };
    if template.name.trim().is_empty() {
        return Err(invalid("name".to_owned(), "must not be empty"));
    }
    if template.version.trim().is_empty() {
        return Err(invalid("version".to_owned(), "must not be empty"));
    }
    for (index, required) in template.required.iter().enumerate() {
        if !template.properties.contains_key(required) {
            return Err(invalid(
                format!("required[{index}]"),
                "names a property that is not defined",
            ));
        }
    }
    for (name, property) in &template.properties {
        if let Some(default) = &property.default {
            if !default.is_null() && !property.property_type.matches(default) {
                return Err(invalid(
                    format!("properties.{name}.default"),
                    "does not match the property type",
                ));
            }
            if let Some(allowed) = &property.allowed
                && !allowed.contains(default)
            {
                return Err(invalid(
                    format!("properties.{name}.default"),
                    "is not one of the allowed values",
                ));
            }
        }
    }
    if template.parent_workspace_service.is_some()
        && template.resource_type != ResourceType::UserResource
    {
        return Err(invalid(
            "parentWorkspaceService".to_owned(),
            "is only allowed on user-resource templates",
        ));
    }
    for (index, custom) in template.custom_actions.iter().enumerate() {
        if [action::INSTALL, action::UPGRADE, action::UNINSTALL].contains(&custom.name.as_str())
            || custom.name.is_empty()
        {
            return Err(invalid(
                format!("customActions[{index}].name"),
                "must be a new, non-empty action name",
            ));
        }
    }
    let Some(pipeline) = &template.pipeline else { return Ok(()) };
    for (action_name, steps) in pipeline.actions() {
        check_pipeline(file, template, action_name, steps)?;
    }
    Ok(())
}

fn check_pipeline(
    file: &str,
    template: &Template,
    action_name: &str,
    steps: &[PipelineStep],
) -> Result<(), TemplateError> {
    let invalid = |field: String, message: &str| TemplateError::Invalid {
        file: file.to_owned(),
        field,
        message: message.to_owned(),
    };
    if steps.is_empty() {
        return Ok(());
    }
    let mains = steps.iter().filter(|step| step.is_main()).count();
    if mains != 1 {
        return Err(invalid(
            format!("pipeline.{action_name}"),
            "must have exactly one step with stepId \"main\"",
        ));
    }
    let mut ids = BTreeSet::new();
    for (index, step) in steps.iter().enumerate() {
        let at = format!("pipeline.{action_name}[{index}]");
        if step.step_id.trim().is_empty() || !ids.insert(step.step_id.as_str()) {
            return Err(invalid(
                format!("{at}.stepId"),
                "must be non-empty and unique in the pipeline",
            ));
        }
        if !step.is_main() {
            if step.resource_template_name.as_deref().is_none_or(str::is_empty) {
                return Err(invalid(
                    format!("{at}.resourceTemplateName"),
                    "is required for a step other than main",
                ));
            }
            let Some(target_type) = step.resource_type else {
                return Err(invalid(
                    format!("{at}.resourceType"),
                    "is required for a step other than main",
                ));
            };
            if step.resource_action.as_deref().is_none_or(str::is_empty) {
                return Err(invalid(
                    format!("{at}.resourceAction"),
                    "is required for a step other than main",
                ));
            }
            let reachable = match target_type {
                ResourceType::SharedService => true,
                ResourceType::Workspace => {
                    matches!(
                        template.resource_type,
                        ResourceType::WorkspaceService | ResourceType::UserResource
                    )
                }
                ResourceType::WorkspaceService => {
                    template.resource_type == ResourceType::UserResource
                }
                ResourceType::UserResource => false,
            };
            if !reachable {
                return Err(invalid(
                    format!("{at}.resourceType"),
                    "names a resource a step of this template cannot reach (shared services, the parent workspace, or the parent workspace service)",
                ));
            }
        }
        for (p, property) in step.properties.iter().flatten().enumerate() {
            let at = format!("{at}.properties[{p}]");
            if property.name.trim().is_empty() {
                return Err(invalid(format!("{at}.name"), "must not be empty"));
            }
            let needs_match = matches!(
                property.array_substitution_action,
                ArraySubstitutionAction::Replace | ArraySubstitutionAction::Remove
            );
            if property.property_type == "array" && property.value.is_object() && needs_match {
                if property.array_match_field.is_empty() {
                    return Err(invalid(
                        format!("{at}.arrayMatchField"),
                        "is required for replace and remove",
                    ));
                }
                if property.value.get(&property.array_match_field).is_none_or(Value::is_null) {
                    return Err(invalid(format!("{at}.value"), "must contain the arrayMatchField"));
                }
            }
        }
    }
    Ok(())
}
