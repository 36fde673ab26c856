//! The template registry.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ErrorBody};
use super::extract::ApiQuery;
use super::paging::Page;
use crate::http::AppState;
use crate::storage::PageKey;

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

/// The body of `GET /api/templates`: a page of the templates.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct TemplateList {
    /// The templates, by name: at most `limit`, and fewer when they are large.
    pub templates: Vec<TemplateSummary>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// Lists the templates, paged: the shipped samples and those of
/// `STEWARD_TEMPLATES_DIR`.
#[utoipa::path(get, path = "/api/templates", tag = "templates", params(Page),
    responses((status = 200, body = TemplateList), (status = 400, body = ErrorBody), (status = 503, body = ErrorBody, description = "busy (`overloaded`) or the database is unavailable; retry after `Retry-After`")))]
pub(super) async fn list(
    State(state): State<AppState>,
    ApiQuery(page): ApiQuery<Page>,
) -> Result<Json<TemplateList>, ApiError> {
    let bounds = page.bounds()?;
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
    // Ordered by name: a template's key is its name.
    let key = |t: &TemplateSummary| PageKey { created_at: 0, id: t.name.clone() };
    let (templates, next_cursor) = bounds.cut(templates, key);
    Ok(Json(TemplateList { templates, next_cursor }))
}
