//! `GET /api/openapi.json`: the OpenAPI 3 document. Its paths come from the routes
//! (each handler's `#[utoipa::path]`); this module adds the title, the schemas and the
//! tags.

use axum::Json;
use utoipa::OpenApi;

use super::{airlock, error, health, operator, resources, roles, templates};

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

/// Adds to every operation of `doc` the answers that the layers around the handlers
/// give, each with the `ErrorBody` shape, where its handler does not document them
/// itself:
///
/// - every route but the probes: 401 (no or a refused credential) and 403 (neither
///   `TREUser` nor `TREAdmin`, or not the route's role);
/// - every route: 503 (a request over the timeout; the database, its migration or the
///   token issuer unavailable);
/// - every route with a JSON body: 400 (malformed JSON), 413 (over
///   [`MAX_BODY_BYTES`](super::MAX_BODY_BYTES)), 415 (not `application/json`) and 422
///   (a field missing, unknown or of the wrong type);
/// - every route on records of the database: 500 (an internal failure, logged).
pub(super) fn with_common_answers(mut doc: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    for (path, item) in &mut doc.paths.paths {
        let open = super::OPEN_ROUTES.contains(&path.as_str());
        let records =
            ["/api/resources", "/api/operations", "/api/airlock-requests", "/api/workspaces"]
                .iter()
                .any(|prefix| path.starts_with(prefix));
        let operations =
            [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch];
        for operation in operations.into_iter().flatten() {
            let mut answers = Vec::new();
            if !open {
                answers.push((
                    "401",
                    "No credential, or a refused one (`unauthorized`, `invalid_token`), with `WWW-Authenticate: Bearer`",
                ));
                answers.push((
                    "403",
                    "The caller holds neither `TREUser` nor `TREAdmin`, or not the role this route needs (`forbidden`)",
                ));
            }
            answers.push((
                "503",
                "The database (or its migration) or the token issuer is unavailable, or the request took too long; with `Retry-After`",
            ));
            if operation.request_body.is_some() {
                answers.push((
                    "400",
                    "The body is not JSON (`malformed_json`), or a value is not valid",
                ));
                answers.push(("413", "The body is larger than 1 MiB (`payload_too_large`)"));
                answers
                    .push(("415", "The body is not `application/json` (`unsupported_media_type`)"));
                answers.push((
                    "422",
                    "A field is missing, unknown or of the wrong type (`invalid_body`)",
                ));
            }
            if records {
                answers.push(("500", "An internal failure (`internal`), logged with its cause"));
            }
            for (status, description) in answers {
                operation
                    .responses
                    .responses
                    .entry(status.to_owned())
                    .or_insert_with(|| error_answer(description).into());
            }
        }
    }
    doc
}

/// An answer with `description` and an `ErrorBody`.
fn error_answer(description: &str) -> utoipa::openapi::Response {
    utoipa::openapi::ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            utoipa::openapi::Content::new(Some(utoipa::openapi::Ref::from_schema_name(
                "ErrorBody",
            ))),
        )
        .build()
}
