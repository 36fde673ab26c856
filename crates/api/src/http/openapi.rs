//! `GET /api/openapi.json`: the OpenAPI 3 document. Its paths come from the routes
//! (each handler's `#[utoipa::path]`); this module adds the title, the schemas and the
//! tags.

use axum::Json;
use utoipa::OpenApi;

use super::{airlock, error, health, resources, roles, templates};

#[derive(OpenApi)]
#[openapi(
    info(title = "steward API", description = "A TRE-style control plane whose queue consumers run under a supervisor.\n\n\
Lists are paged: `limit` (default 50, at most 500; larger is lowered to 500) and `cursor`, the previous page's `nextCursor` as given; \
an answer has `nextCursor` while more follow, and a page also stops early, with a `nextCursor`, once its items pass 4 MiB (its first item is always answered).\n\n\
Load is bounded: an API request that finds no turn free within the queue timeout answers 503 `overloaded` with `Retry-After`; \
the probes and `/metrics` are never limited."),
    components(schemas(
        error::ErrorBody,
        health::HealthCheck, health::ServiceStatus, health::ServiceStatusValue, health::Probe,
        health::Workers, health::WorkerStatus,
        templates::TemplateList, templates::TemplateSummary,
        resources::CreateResource, resources::UpdateResource, resources::OperationResponse,
        resources::ResourceResponse, resources::ResourceList, resources::OperationList,
        airlock::CreateAirlockRequest, airlock::ReviewBody, airlock::ReviewDecision,
        airlock::AirlockRequestResponse, airlock::AirlockRequestList,
        roles::SetRoles, roles::WorkspaceRoles,
    )),
    tags(
        (name = "health", description = "Probes and worker health"),
        (name = "templates", description = "The template registry"),
        (name = "resources", description = "Resources and operations"),
        (name = "airlock", description = "Airlock requests"),
        (name = "roles", description = "Workspace roles"),
    )
)]
pub(super) struct ApiDoc;

/// This document.
#[utoipa::path(get, path = "/api/openapi.json", tag = "health", responses((status = 200, description = "OpenAPI 3 document", content_type = "application/json")))]
pub(super) async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(super::openapi())
}
