//! Validating, defaulting and redacting resource properties against a template.

use serde_json::Value;

use super::model::{PropertyType, Template};
use crate::domain::{Properties, action};

/// What sensitive property values are replaced with when stored or returned.
pub const REDACTED: &str = "REDACTED";

/// Properties that do not fit a template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PropertyError {
    /// A required property is missing.
    #[error("property {property:?} is required by template {template}")]
    Required {
        /// The template.
        template: String,
        /// The property.
        property: String,
    },
    /// The template does not define the property.
    #[error("property {property:?} is not defined by template {template}")]
    Unknown {
        /// The template.
        template: String,
        /// The property.
        property: String,
    },
    /// An upgrade tried to change a property that is not `updateable`.
    #[error("property {property:?} of template {template} cannot be updated")]
    NotUpdateable {
        /// The template.
        template: String,
        /// The property.
        property: String,
    },
    /// The value has the wrong JSON type.
    #[error("property {property:?} of template {template} must be of type {expected}")]
    WrongType {
        /// The template.
        template: String,
        /// The property.
        property: String,
        /// The type the template wants.
        expected: PropertyType,
    },
    /// A string value is longer than the template's `maxLength`.
    #[error("property {property:?} of template {template} is longer than {max_length} characters")]
    TooLong {
        /// The template.
        template: String,
        /// The property.
        property: String,
        /// The template's `maxLength`.
        max_length: usize,
    },
    /// The value is not one of the allowed values.
    #[error("property {property:?} of template {template} has a value that is not allowed")]
    NotAllowed {
        /// The template.
        template: String,
        /// The property.
        property: String,
    },
}

impl Template {
    /// Adds the template's defaults for properties that `properties` lacks.
    pub fn apply_defaults(&self, properties: &mut Properties) {
        for (name, property) in &self.properties {
            if let Some(default) = &property.default {
                properties.entry(name.clone()).or_insert_with(|| default.clone());
            }
        }
    }

    /// Checks the properties of a new resource: every required property is there, and
    /// every property is defined by the template, of the right type and allowed.
    ///
    /// # Errors
    ///
    /// The first property that does not fit.
    pub fn validate_install(&self, properties: &Properties) -> Result<(), PropertyError> {
        for required in &self.required {
            if properties.get(required).is_none_or(Value::is_null) {
                return Err(PropertyError::Required {
                    template: self.name.clone(),
                    property: required.clone(),
                });
            }
        }
        self.validate_values(properties, false)
    }

    /// Checks a patch of properties for `action`: on `install` every template property
    /// may be set; otherwise only `updateable` ones (TRE `validate_patch`).
    ///
    /// # Errors
    ///
    /// The first property that does not fit.
    pub fn validate_patch(
        &self,
        properties: &Properties,
        resource_action: &str,
    ) -> Result<(), PropertyError> {
        self.validate_values(properties, resource_action != action::INSTALL)
    }

    fn validate_values(
        &self,
        properties: &Properties,
        updateable_only: bool,
    ) -> Result<(), PropertyError> {
        for (name, value) in properties {
            let error =
                |make: fn(String, String) -> PropertyError| make(self.name.clone(), name.clone());
            let Some(property) = self.properties.get(name) else {
                return Err(error(|template, property| PropertyError::Unknown {
                    template,
                    property,
                }));
            };
            if updateable_only && !property.updateable {
                return Err(error(|template, property| PropertyError::NotUpdateable {
                    template,
                    property,
                }));
            }
            if value.is_null() {
                continue;
            }
            let fits =
                property.property_type.matches(value) || (property.sensitive && is_redacted(value));
            if !fits {
                return Err(PropertyError::WrongType {
                    template: self.name.clone(),
                    property: name.clone(),
                    expected: property.property_type,
                });
            }
            if let (Some(max_length), Some(text)) = (property.max_length, value.as_str())
                && text.chars().count() > max_length
                && !(property.sensitive && is_redacted(value))
            {
                return Err(PropertyError::TooLong {
                    template: self.name.clone(),
                    property: name.clone(),
                    max_length,
                });
            }
            if let Some(allowed) = &property.allowed
                && !allowed.contains(value)
            {
                return Err(error(|template, property| PropertyError::NotAllowed {
                    template,
                    property,
                }));
            }
        }
        Ok(())
    }

    /// A copy of `properties` with every sensitive value replaced by [`REDACTED`].
    #[must_use]
    pub fn redact(&self, properties: &Properties) -> Properties {
        let mut redacted = properties.clone();
        for name in self.sensitive_properties() {
            if let Some(value) = redacted.get_mut(name)
                && !value.is_null()
            {
                *value = Value::String(REDACTED.to_owned());
            }
        }
        redacted
    }
}

fn is_redacted(value: &Value) -> bool {
    value.as_str() == Some(REDACTED)
}
