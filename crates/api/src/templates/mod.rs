//! Resource templates: the properties a resource may have and the pipelines that
//! deploy it (reference §5.7), and the registry that holds them.

mod model;
mod properties;
mod registry;

pub use model::{
    ArraySubstitutionAction, CustomAction, Pipeline, PipelineStep, PipelineStepProperty,
    PropertyType, Template, TemplateProperty,
};
pub use properties::{PropertyError, REDACTED};
pub use registry::{TemplateError, TemplateRegistry};
