//! Workspace roles: `PUT` and `GET /api/workspaces/{workspaceId}/roles/{userId}`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::auth;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, Caller};
use crate::domain::{ResourceType, User, WorkspaceRole};
use crate::http::AppState;
use crate::storage::Store;

/// The body of `PUT /api/workspaces/{workspaceId}/roles/{userId}`.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"roles": ["AirlockManager"]}))]
pub(super) struct SetRoles {
    /// The user's roles in the workspace, replacing those it had: any of
    /// `WorkspaceOwner`, `WorkspaceResearcher`, `AirlockManager`; none removes them all.
    #[schema(value_type = Vec<String>)]
    pub roles: Vec<WorkspaceRole>,
}

/// A user's roles in a workspace.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct WorkspaceRoles {
    /// The workspace.
    pub workspace_id: String,
    /// The user.
    pub user_id: String,
    /// Its roles there, in a fixed order.
    #[schema(value_type = Vec<String>)]
    pub roles: Vec<WorkspaceRole>,
}

/// Answers 404 unless `workspace_id` is a workspace that `caller` may see (holds a
/// role in, or is `TREAdmin`): to others, one that exists looks like one that does not.
async fn workspace_exists(
    store: &Store,
    caller: &User,
    workspace_id: &str,
) -> Result<(), ApiError> {
    let not_found = || ApiError::not_found(format!("workspace {workspace_id} not found"));
    match store.read().find_resource(workspace_id).await? {
        Some(resource) if resource.resource_type() == ResourceType::Workspace => {
            if super::access::sees_workspace(store, caller, workspace_id).await? {
                Ok(())
            } else {
                Err(not_found())
            }
        }
        _ => Err(not_found()),
    }
}

/// Whether `user` is `TREAdmin` or an owner of `workspace_id`.
async fn may_manage(store: &Store, user: &User, workspace_id: &str) -> Result<bool, ApiError> {
    if auth::is_admin(user) {
        return Ok(true);
    }
    let roles = store.read().workspace_roles(workspace_id, &user.id).await?;
    Ok(roles.contains(&WorkspaceRole::WorkspaceOwner))
}

/// Sets a user's roles in a workspace; only `TREAdmin` or an owner of the workspace, and
/// only `TREAdmin` grants `AirlockManager`. The last `WorkspaceOwner` stays one (409).
#[utoipa::path(put, path = "/api/workspaces/{workspaceId}/roles/{userId}", tag = "roles", request_body = SetRoles,
    params(("workspaceId" = String, Path, description = "The workspace id"), ("userId" = String, Path, description = "The user id (the token's oid or sub)")),
    responses((status = 200, body = WorkspaceRoles), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, description = "It would remove the workspace's last `WorkspaceOwner` (`conflict`)", body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn set(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiPath((workspace_id, user_id)): ApiPath<(String, String)>,
    ApiJson(body): ApiJson<SetRoles>,
) -> Result<Json<WorkspaceRoles>, ApiError> {
    let store = state.db.serving()?;
    workspace_exists(store, &caller, &workspace_id).await?;
    if !may_manage(store, &caller, &workspace_id).await? {
        return Err(ApiError::forbidden(format!(
            "changing roles in workspace {workspace_id} needs {} or its {}",
            auth::TRE_ADMIN,
            WorkspaceRole::WorkspaceOwner
        )));
    }
    let mut tx = store.begin().await?;
    tx.limit_message_size(state.settings.max_message_bytes);
    let before = tx.read().workspace_roles(&workspace_id, &user_id).await?;
    let grants_manager = body.roles.contains(&WorkspaceRole::AirlockManager)
        && !before.contains(&WorkspaceRole::AirlockManager);
    if grants_manager && !auth::is_admin(&caller) {
        // An owner could otherwise make a second identity of their own the reviewer of
        // their own exports.
        return Err(ApiError::forbidden(format!(
            "granting {} needs {}",
            WorkspaceRole::AirlockManager,
            auth::TRE_ADMIN
        )));
    }
    let removes_owner = before.contains(&WorkspaceRole::WorkspaceOwner)
        && !body.roles.contains(&WorkspaceRole::WorkspaceOwner);
    if removes_owner {
        let members = tx.read().workspace_members(&workspace_id).await?;
        let other_owner = members.iter().any(|(member, roles)| {
            *member != user_id && roles.contains(&WorkspaceRole::WorkspaceOwner)
        });
        if !other_owner {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!(
                    "{user_id} is the last {} of workspace {workspace_id}; make someone else one first",
                    WorkspaceRole::WorkspaceOwner
                ),
            ));
        }
    }
    tx.set_workspace_roles(&workspace_id, &user_id, &body.roles, &caller.id).await?;
    let roles = tx.read().workspace_roles(&workspace_id, &user_id).await?;
    tx.commit().await?;
    tracing::info!(workspace_id = %workspace_id, user_id = %user_id, roles = ?roles, by = %caller.id, "workspace roles set");
    Ok(Json(WorkspaceRoles { workspace_id, user_id, roles }))
}

/// A user's roles in a workspace: for `TREAdmin`, an owner of the workspace, and the
/// user themselves.
#[utoipa::path(get, path = "/api/workspaces/{workspaceId}/roles/{userId}", tag = "roles",
    params(("workspaceId" = String, Path, description = "The workspace id"), ("userId" = String, Path, description = "The user id (the token's oid or sub)")),
    responses((status = 200, body = WorkspaceRoles), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn get(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiPath((workspace_id, user_id)): ApiPath<(String, String)>,
) -> Result<Json<WorkspaceRoles>, ApiError> {
    let store = state.db.serving()?;
    workspace_exists(store, &caller, &workspace_id).await?;
    if caller.id != user_id && !may_manage(store, &caller, &workspace_id).await? {
        return Err(ApiError::forbidden(format!(
            "reading another user's roles in workspace {workspace_id} needs {} or its {}",
            auth::TRE_ADMIN,
            WorkspaceRole::WorkspaceOwner
        )));
    }
    let roles = store.read().workspace_roles(&workspace_id, &user_id).await?;
    Ok(Json(WorkspaceRoles { workspace_id, user_id, roles }))
}
