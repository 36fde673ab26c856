//! The template registry.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};

use crate::http::AppState;

/// One template, summarised.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct TemplateSummary {
    /// The template name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// The resource type it deploys.
    pub resource_type: String,
    /// A title.
    pub title: String,
    /// A description.
    pub description: String,
    /// Properties that must be given on install.
    pub required: Vec<String>,
    /// The properties, as the template declares them.
    #[schema(value_type = Object)]
    pub properties: serde_json::Value,
    /// Custom actions.
    pub custom_actions: Vec<String>,
    /// Pipelines by action: the step ids in order.
    #[schema(value_type = Object)]
    pub pipelines: serde_json::Value,
}

/// The body of `GET /api/templates`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub(super) struct TemplateList {
    /// Every template, by name.
    pub templates: Vec<TemplateSummary>,
}

/// Lists the templates: the shipped samples and those of `STEWARD_TEMPLATES_DIR`.
#[utoipa::path(get, path = "/api/templates", tag = "templates", responses((status = 200, body = TemplateList)))]
pub(super) async fn list(State(state): State<AppState>) -> Json<TemplateList> {
    let mut templates: Vec<TemplateSummary> = state
        .templates
        .iter()
        .map(|t| {
            let pipelines = t
                .pipeline
                .as_ref()
                .map(|p| {
                    p.actions()
                        .map(|(action, steps)| {
                            (action.to_owned(), serde_json::to_value(steps).unwrap_or_default())
                        })
                        .collect::<serde_json::Map<_, _>>()
                })
                .unwrap_or_default();
            TemplateSummary {
                name: t.name.clone(),
                version: t.version.clone(),
                resource_type: t.resource_type.as_str().to_owned(),
                title: t.title.clone(),
                description: t.description.clone(),
                required: t.required.clone(),
                properties: serde_json::to_value(&t.properties).unwrap_or_default(),
                custom_actions: t.custom_actions.iter().map(|a| a.name.clone()).collect(),
                pipelines: serde_json::Value::Object(pipelines),
            }
        })
        .collect();
    templates.sort_by(|a, b| a.name.cmp(&b.name));
    Json(TemplateList { templates })
}
