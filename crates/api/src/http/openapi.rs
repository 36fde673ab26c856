//! `GET /api/openapi.json`: the OpenAPI 3 document. Its paths come from the routes
//! (each handler's `#[utoipa::path]`); this module adds the title, the schemas and the
//! tags.

use axum::Json;
use utoipa::OpenApi;

use super::{airlock, error, health, operator, resources, roles, templates};

#[derive(OpenApi)]
#[openapi(
    info(title = "steward API", description = "A TRE-style control plane whose queue consumers run under a supervisor"),
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
        operator::DeadLetterQueueList, operator::DeadLetterQueueCount, operator::PeekedMessages,
        operator::PeekedMessage, operator::RedriveBody, operator::Redriven, operator::Purged,
        operator::WorkerControl, operator::ParkedRows, operator::ParkedRow, operator::Retried,
    )),
    tags(
        (name = "health", description = "Probes and worker health"),
        (name = "templates", description = "The template registry"),
        (name = "resources", description = "Resources and operations"),
        (name = "airlock", description = "Airlock requests"),
        (name = "roles", description = "Workspace roles"),
        (name = "operator", description = "Operator actions, TREAdmin only: pausing and restarting workers, dead letters, parked outbox rows"),
    )
)]
pub(super) struct ApiDoc;

/// This document.
#[utoipa::path(get, path = "/api/openapi.json", tag = "health", responses((status = 200, description = "OpenAPI 3 document", content_type = "application/json")))]
pub(super) async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(super::openapi())
}
