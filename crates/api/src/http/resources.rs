//! Resources and their operations: install, read, list, upgrade, uninstall, custom
//! actions.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::access::Access;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use super::paging::{Bounds, MAX_PAGE_BYTES, Page};
use crate::domain::{Operation, Properties, Resource, ResourceType, Status};
use crate::http::AppState;
use crate::rules::operations::{self, NewResource, OperationContext};
use crate::storage::{Entity, OperationPage, ResourceFilter, StoreError};

/// The body of `POST /api/resources`.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(example = json!({
    "templateName": "tre-workspace-base",
    "resourceType": "workspace",
    "properties": {"display_name": "Genomics", "description": "Sequencing data"}
}))]
pub(super) struct CreateResource {
    /// The template, e.g. `tre-workspace-base`.
    pub template_name: String,
    /// `workspace`, `workspace-service`, `user-resource` or `shared-service`; must match the template.
    #[schema(value_type = String, example = "workspace")]
    pub resource_type: ResourceType,
    /// Properties, validated against the template (`required` ones must be given).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub properties: Properties,
    /// The workspace (workspace services and user resources).
    #[serde(default)]
    pub workspace_id: Option<String>,
    /// The workspace service (user resources).
    #[serde(default)]
    pub parent_workspace_service_id: Option<String>,
}

/// The body of `PATCH /api/resources/{id}`.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(example = json!({"properties": {"display_name": "Genomics (2026)"}}))]
pub(super) struct UpdateResource {
    /// Properties to change; only those the template marks `updateable`.
    #[schema(value_type = Object)]
    pub properties: Properties,
}

/// An operation, as answered by every route that starts one (202).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub(super) struct OperationResponse {
    /// The operation, with its steps (TRE's `Operation`).
    #[schema(value_type = Object)]
    pub operation: Operation,
}

/// A resource.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub(super) struct ResourceResponse {
    /// The resource (TRE's `Resource`; sensitive properties are `"REDACTED"`).
    #[schema(value_type = Object)]
    pub resource: Resource,
}

/// A page of resources.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct ResourceList {
    /// The resources, oldest first: at most `limit`, and fewer when they are large.
    #[schema(value_type = Vec<Object>)]
    pub resources: Vec<Resource>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// A page of a resource's operations.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct OperationList {
    /// The operations, oldest first: at most `limit`, and fewer when they are large.
    #[schema(value_type = Vec<Object>)]
    pub operations: Vec<Operation>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// Filters of `GET /api/resources`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct ResourceQuery {
    /// Only resources of this type.
    #[param(value_type = Option<String>)]
    pub resource_type: Option<ResourceType>,
    /// Only resources in this deployment status.
    #[param(value_type = Option<String>)]
    pub status: Option<Status>,
    /// At most this many items (default 50, at most 500; a larger limit is lowered to
    /// 500). A page may hold fewer, and still have a `nextCursor`, when its items are
    /// large (4 MiB per page).
    pub limit: Option<u64>,
    /// Where to continue: the `nextCursor` of the previous page, as it was given.
    pub cursor: Option<String>,
}

fn accepted(operation: Operation) -> Response {
    let location = format!("/api/operations/{}", operation.id);
    (StatusCode::ACCEPTED, [(header::LOCATION, location)], Json(OperationResponse { operation }))
        .into_response()
}

fn context(state: &AppState) -> OperationContext<'_> {
    OperationContext {
        templates: &state.templates,
        resource_request_queue: &state.settings.resource_request_queue,
    }
}

/// Creates a resource and its install operation; the resource request goes to the
/// resource processor through the outbox.
#[utoipa::path(post, path = "/api/resources", tag = "resources", request_body = CreateResource,
    responses((status = 202, body = OperationResponse), (status = 400, body = ErrorBody), (status = 404, description = "The workspace is not one the caller holds a role in", body = ErrorBody), (status = 409, description = "A resource a pipeline step changes changed meanwhile (`conflict`)", body = ErrorBody), (status = 413, description = "The body is larger than 1 MiB, or the resource request larger than the transport accepts (`payload_too_large`); nothing is created", body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn create(
    State(state): State<AppState>,
    Caller(user): Caller,
    ApiJson(body): ApiJson<CreateResource>,
) -> Result<Response, ApiError> {
    let store = state.db.serving()?;
    Access::new(&state, store, &user)
        .create_resource(body.resource_type, body.workspace_id.as_deref())
        .await?;
    let mut tx = store.begin().await?;
    tx.limit_message_size(state.settings.max_message_bytes);
    let new = NewResource {
        template_name: body.template_name,
        resource_type: body.resource_type,
        properties: body.properties,
        workspace_id: body.workspace_id,
        parent_workspace_service_id: body.parent_workspace_service_id,
    };
    let created = operations::install_resource(&mut tx, context(&state), new, &user).await?;
    tx.commit().await?;
    tracing::info!(resource_id = %created.resource.id, operation_id = %created.operation.id, template = %created.resource.template_name, "resource install requested");
    Ok(accepted(created.operation))
}

/// Lists resources, paged.
#[utoipa::path(get, path = "/api/resources", tag = "resources", params(ResourceQuery),
    responses((status = 200, body = ResourceList), (status = 400, body = ErrorBody), (status = 503, body = ErrorBody, description = "busy (`overloaded`) or the database is unavailable; retry after `Retry-After`")))]
pub(super) async fn list(
    State(state): State<AppState>,
    Caller(user): Caller,
    ApiQuery(query): ApiQuery<ResourceQuery>,
) -> Result<Json<ResourceList>, ApiError> {
    let bounds = Page { limit: query.limit, cursor: query.cursor }.bounds()?;
    let store = state.db.serving()?;
    let (visible_workspaces, user_resources) =
        Access::new(&state, store, &user).visible_resources().await?;
    let filter = ResourceFilter {
        visible_workspaces,
        user_resources,
        resource_type: query.resource_type,
        status: query.status,
        after: bounds.after,
        limit: Some(bounds.limit),
        max_bytes: Some(MAX_PAGE_BYTES),
        ..ResourceFilter::default()
    };
    let page = store.read().resources_page(&filter).await?;
    let next_cursor = Bounds::next_cursor(page.last.as_ref(), page.more);
    let access = Access::new(&state, store, &user);
    let resources = page.items.into_iter().map(|resource| access.shown(resource)).collect();
    Ok(Json(ResourceList { resources, next_cursor }))
}

/// One resource.
#[utoipa::path(get, path = "/api/resources/{id}", tag = "resources",
    params(("id" = String, Path, description = "The resource id")),
    responses((status = 200, body = ResourceResponse), (status = 404, body = ErrorBody)))]
pub(super) async fn get(
    State(state): State<AppState>,
    Caller(user): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ResourceResponse>, ApiError> {
    let store = state.db.serving()?;
    let resource = store.read().resource(&id).await?;
    let access = Access::new(&state, store, &user);
    access.read_resource(&resource).await?;
    Ok(Json(ResourceResponse { resource: access.shown(resource) }))
}

/// A resource's operations, oldest first, paged.
#[utoipa::path(get, path = "/api/resources/{id}/operations", tag = "resources",
    params(("id" = String, Path, description = "The resource id"), Page),
    responses((status = 200, body = OperationList), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody, description = "busy (`overloaded`) or the database is unavailable; retry after `Retry-After`")))]
pub(super) async fn operations(
    State(state): State<AppState>,
    Caller(user): Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(page): ApiQuery<Page>,
) -> Result<Json<OperationList>, ApiError> {
    let bounds = page.bounds()?;
    let store = state.db.serving()?;
    let resource = store.read().resource(&id).await?;
    Access::new(&state, store, &user).read_operations(&resource).await?;
    let page = OperationPage {
        after: bounds.after.as_ref(),
        skip: 0,
        limit: Some(bounds.limit),
        max_bytes: Some(MAX_PAGE_BYTES),
    };
    let page = store.read().operations_page(&id, page).await?;
    let next_cursor = Bounds::next_cursor(page.last.as_ref(), page.more);
    Ok(Json(OperationList { operations: page.items, next_cursor }))
}

/// One operation.
#[utoipa::path(get, path = "/api/operations/{id}", tag = "resources",
    params(("id" = String, Path, description = "The operation id")),
    responses((status = 200, body = OperationResponse), (status = 404, body = ErrorBody)))]
pub(super) async fn operation(
    State(state): State<AppState>,
    Caller(user): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<OperationResponse>, ApiError> {
    let store = state.db.serving()?;
    let operation = store.read().operation(&id).await?;
    let resource = store.read().resource(&operation.resource_id).await?;
    Access::new(&state, store, &user).read_operations(&resource).await.map_err(|error| {
        // Hidden as the operation itself, not its resource.
        if error.status() == StatusCode::NOT_FOUND {
            StoreError::not_found(Entity::Operation, &id).into()
        } else {
            error
        }
    })?;
    Ok(Json(OperationResponse { operation }))
}

/// Upgrades a resource: changes `updateable` properties and starts an upgrade operation.
#[utoipa::path(patch, path = "/api/resources/{id}", tag = "resources", request_body = UpdateResource,
    params(("id" = String, Path, description = "The resource id")),
    responses((status = 202, body = OperationResponse), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, description = "Another operation on the resource (or, for an uninstall, on one under it) is in progress (`operation_in_progress`, naming it), or the resource changed meanwhile (`conflict`)", body = ErrorBody), (status = 413, description = "The body is larger than 1 MiB, or the resource request larger than the transport accepts (`payload_too_large`); nothing is changed", body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn update(
    State(state): State<AppState>,
    Caller(user): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<UpdateResource>,
) -> Result<Response, ApiError> {
    let store = state.db.serving()?;
    let resource = store.read().resource(&id).await?;
    Access::new(&state, store, &user).change_resource(&resource).await?;
    let mut tx = store.begin().await?;
    tx.limit_message_size(state.settings.max_message_bytes);
    let created =
        operations::upgrade_resource(&mut tx, context(&state), &id, body.properties, None, &user)
            .await?;
    tx.commit().await?;
    tracing::info!(resource_id = %id, operation_id = %created.operation.id, "resource upgrade requested");
    Ok(accepted(created.operation))
}

/// Uninstalls a resource.
#[utoipa::path(delete, path = "/api/resources/{id}", tag = "resources",
    params(("id" = String, Path, description = "The resource id")),
    responses((status = 202, body = OperationResponse), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, description = "Another operation on the resource (or, for an uninstall, on one under it) is in progress (`operation_in_progress`, naming it), or the resource changed meanwhile (`conflict`)", body = ErrorBody), (status = 413, description = "The resource request is larger than the transport accepts (`payload_too_large`); nothing is changed", body = ErrorBody)))]
pub(super) async fn delete(
    State(state): State<AppState>,
    Caller(user): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let store = state.db.serving()?;
    let resource = store.read().resource(&id).await?;
    Access::new(&state, store, &user).change_resource(&resource).await?;
    let mut tx = store.begin().await?;
    tx.limit_message_size(state.settings.max_message_bytes);
    let operation =
        operations::uninstall_resource(&mut tx, context(&state), &id, &user, false).await?;
    tx.commit().await?;
    tracing::info!(resource_id = %id, operation_id = %operation.id, "resource uninstall requested");
    Ok(accepted(operation))
}

/// Invokes one of the template's custom actions (e.g. `start`, `stop`).
#[utoipa::path(post, path = "/api/resources/{id}/actions/{action}", tag = "resources",
    params(("id" = String, Path, description = "The resource id"), ("action" = String, Path, description = "A custom action of the template")),
    responses((status = 202, body = OperationResponse), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, description = "Another operation on the resource (or, for an uninstall, on one under it) is in progress (`operation_in_progress`, naming it), or the resource changed meanwhile (`conflict`)", body = ErrorBody), (status = 413, description = "The resource request is larger than the transport accepts (`payload_too_large`); nothing is changed", body = ErrorBody)))]
pub(super) async fn action(
    State(state): State<AppState>,
    Caller(user): Caller,
    ApiPath((id, action)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let store = state.db.serving()?;
    let resource = store.read().resource(&id).await?;
    Access::new(&state, store, &user).change_resource(&resource).await?;
    let mut tx = store.begin().await?;
    tx.limit_message_size(state.settings.max_message_bytes);
    let operation =
        operations::invoke_action(&mut tx, context(&state), &id, &action, &user).await?;
    tx.commit().await?;
    tracing::info!(resource_id = %id, operation_id = %operation.id, action = %action, "custom action requested");
    Ok(accepted(operation))
}
