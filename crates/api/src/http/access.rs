//! Who may do what: the route → role table of `docs/security.md`, modelled on TRE.
//!
//! With no authentication configured, every caller is the development admin and
//! nothing here refuses anything, self-review included, so a local walk-through works
//! with one identity.

use crate::domain::{AirlockRequest, Resource, ResourceType, User, WorkspaceRole};
use crate::storage::{Entity, Store, StoreError, UserResourceScope};

use super::AppState;
use super::auth::{self, TRE_ADMIN};
use super::error::ApiError;

use WorkspaceRole::{AirlockManager, WorkspaceOwner, WorkspaceResearcher};

/// The properties of a shared service that callers without `TREAdmin` see: those of
/// TRE's `RestrictedProperties`.
pub(super) const RESTRICTED_PROPERTIES: [&str; 5] =
    ["display_name", "description", "overview", "connection_uri", "is_exposed_externally"];

/// Every workspace role: any of them lets a caller see the workspace.
const ANY_ROLE: [WorkspaceRole; 3] = [WorkspaceOwner, WorkspaceResearcher, AirlockManager];

/// The caller's rights, checked against the store's workspace roles.
pub(super) struct Access<'a> {
    store: &'a Store,
    user: &'a User,
    enforced: bool,
}

fn names(roles: &[WorkspaceRole]) -> String {
    roles.iter().map(|role| role.as_str()).collect::<Vec<_>>().join(" or ")
}

impl<'a> Access<'a> {
    /// The rights of `user` in this request.
    pub(super) fn new(state: &AppState, store: &'a Store, user: &'a User) -> Self {
        Access { store, user, enforced: state.settings.auth.is_configured() }
    }

    fn is_admin(&self) -> bool {
        !self.enforced || auth::is_admin(self.user)
    }

    /// Passes when the caller holds one of `roles` in `workspace_id`, or is `TREAdmin`
    /// and `admin` allows it.
    ///
    /// A caller who holds no role at all in the workspace, and is not `TREAdmin`, gets
    /// the 404 that `subject` would get if it did not exist: 403 would tell them that
    /// it does.
    async fn require(
        &self,
        workspace_id: Option<&str>,
        roles: &[WorkspaceRole],
        admin: bool,
        what: &str,
        subject: Subject<'_>,
    ) -> Result<(), ApiError> {
        if !self.enforced || (admin && self.is_admin()) {
            return Ok(());
        }
        if let Some(workspace_id) = workspace_id {
            let held = self.store.read().workspace_roles(workspace_id, &self.user.id).await?;
            if held.iter().any(|role| roles.contains(role)) {
                return Ok(());
            }
            if held.is_empty() && !auth::is_admin(self.user) {
                return Err(hidden(subject));
            }
        }
        let needed = match (admin, roles.is_empty()) {
            (true, true) => TRE_ADMIN.to_owned(),
            (true, false) => format!("{TRE_ADMIN}, or {} of the workspace", names(roles)),
            (false, _) => format!("{} of the workspace", names(roles)),
        };
        Err(ApiError::forbidden(format!("{what} needs {needed}")))
    }

    /// The workspaces whose resources and airlock requests the caller may list;
    /// `None` for all of them.
    pub(super) async fn visible_workspaces(&self) -> Result<Option<Vec<String>>, ApiError> {
        if self.is_admin() {
            return Ok(None);
        }
        let roles = self.store.read().roles_of_user(&self.user.id).await?;
        Ok(Some(roles.into_iter().map(|(workspace_id, _)| workspace_id).collect()))
    }

    /// What the caller may list of the resources: the workspaces they see (as
    /// [`visible_workspaces`](Self::visible_workspaces)), and of the user resources in
    /// them, their own and every one of the workspaces they own; `None`s for all.
    pub(super) async fn visible_resources(
        &self,
    ) -> Result<(Option<Vec<String>>, Option<UserResourceScope>), ApiError> {
        if self.is_admin() {
            return Ok((None, None));
        }
        let roles = self.store.read().roles_of_user(&self.user.id).await?;
        let owned = roles
            .iter()
            .filter(|(_, held)| held.contains(&WorkspaceOwner))
            .map(|(workspace_id, _)| workspace_id.clone())
            .collect();
        let workspaces = roles.into_iter().map(|(workspace_id, _)| workspace_id).collect();
        let scope = UserResourceScope { owner_id: self.user.id.clone(), all_in_workspaces: owned };
        Ok((Some(workspaces), Some(scope)))
    }

    /// Passes for a user resource the caller owns, or one in a workspace where they are
    /// `WorkspaceOwner` (TRE's `validate_user_has_valid_role_for_user_resource`), and
    /// for any other resource; 403 for `what` otherwise. The caller's role in the
    /// workspace has been checked before.
    async fn own_user_resource(&self, resource: &Resource, what: &str) -> Result<(), ApiError> {
        if resource.resource_type() != ResourceType::UserResource || self.is_admin() {
            return Ok(());
        }
        if resource.owner_id() == Some(self.user.id.as_str()) {
            return Ok(());
        }
        let Some(workspace_id) = workspace_of(resource) else { return Ok(()) };
        let held = self.store.read().workspace_roles(workspace_id, &self.user.id).await?;
        if held.contains(&WorkspaceOwner) {
            return Ok(());
        }
        Err(ApiError::forbidden(format!(
            "{what} needs {WorkspaceOwner} of the workspace, or to be its owner"
        )))
    }

    /// Creating a resource of this type (in this workspace): workspaces and shared
    /// services need `TREAdmin`; a workspace service the workspace's owner; a user
    /// resource its owner or a researcher.
    pub(super) async fn create_resource(
        &self,
        resource_type: ResourceType,
        workspace_id: Option<&str>,
    ) -> Result<(), ApiError> {
        let what = format!("creating a {}", resource_type.as_str());
        let subject = (Entity::Resource, workspace_id.unwrap_or_default());
        self.require(workspace_id, change_roles(resource_type), true, &what, subject).await
    }

    /// Upgrading, uninstalling or acting on `resource`: as creating one of its type,
    /// except that a researcher changes only their own user resources (as in TRE; the
    /// workspace's owner changes all of them).
    pub(super) async fn change_resource(&self, resource: &Resource) -> Result<(), ApiError> {
        let what = format!("changing the {} {}", resource.resource_type().as_str(), resource.id);
        let resource_type = resource.resource_type();
        let subject = (Entity::Resource, resource.id.as_str());
        self.require(workspace_of(resource), change_roles(resource_type), true, &what, subject)
            .await?;
        self.own_user_resource(resource, &what).await
    }

    /// Reading `resource`: shared services anyone (in the view of [`Access::shown`]);
    /// the rest any role in its workspace, except that a user resource only its owner
    /// and the workspace's owner (as in TRE: a researcher sees only their own).
    pub(super) async fn read_resource(&self, resource: &Resource) -> Result<(), ApiError> {
        if resource.resource_type() == ResourceType::SharedService {
            return Ok(());
        }
        let what = format!("reading the {} {}", resource.resource_type().as_str(), resource.id);
        let subject = (Entity::Resource, resource.id.as_str());
        self.require(workspace_of(resource), &ANY_ROLE, true, &what, subject).await?;
        self.own_user_resource(resource, &what).await
    }

    /// Reading the operations of `resource`: as reading it, but a shared service's
    /// need `TREAdmin` (as in TRE), since their steps name every workspace's changes.
    pub(super) async fn read_operations(&self, resource: &Resource) -> Result<(), ApiError> {
        if resource.resource_type() == ResourceType::SharedService && !self.is_admin() {
            return Err(ApiError::forbidden(format!(
                "reading the operations of the shared service {} needs {TRE_ADMIN}",
                resource.id
            )));
        }
        self.read_resource(resource).await
    }

    /// What the caller sees of `resource`: all of it, except that a shared service
    /// shows a caller without `TREAdmin` only TRE's restricted view, its properties cut
    /// down to [`RESTRICTED_PROPERTIES`] (the firewall's rule collections, say, list
    /// every workspace's machines).
    pub(super) fn shown(&self, mut resource: Resource) -> Resource {
        if resource.resource_type() == ResourceType::SharedService && !self.is_admin() {
            resource.properties.retain(|name, _| RESTRICTED_PROPERTIES.contains(&name.as_str()));
        }
        resource
    }

    /// Creating, submitting or cancelling an airlock request in `workspace_id`: a
    /// researcher or the owner of the workspace.
    pub(super) async fn author_airlock(&self, workspace_id: &str) -> Result<(), ApiError> {
        self.require(
            Some(workspace_id),
            &[WorkspaceResearcher, WorkspaceOwner],
            false,
            "an airlock request",
            (Entity::Resource, workspace_id),
        )
        .await
    }

    /// Submitting or cancelling `request`: as [`Access::author_airlock`] in its
    /// workspace.
    pub(super) async fn author_airlock_request(
        &self,
        request: &AirlockRequest,
    ) -> Result<(), ApiError> {
        self.require(
            Some(&request.workspace_id),
            &[WorkspaceResearcher, WorkspaceOwner],
            false,
            "an airlock request",
            (Entity::AirlockRequest, &request.id),
        )
        .await
    }

    /// Reading an airlock request: any role in its workspace, or `TREAdmin`.
    pub(super) async fn read_airlock(&self, request: &AirlockRequest) -> Result<(), ApiError> {
        self.require(
            Some(&request.workspace_id),
            &ANY_ROLE,
            true,
            "reading an airlock request",
            (Entity::AirlockRequest, &request.id),
        )
        .await
    }

    /// Reviewing `request`: the workspace's airlock manager, never its creator.
    pub(super) async fn review_airlock(&self, request: &AirlockRequest) -> Result<(), ApiError> {
        self.require(
            Some(&request.workspace_id),
            &[AirlockManager],
            false,
            "reviewing an airlock request",
            (Entity::AirlockRequest, &request.id),
        )
        .await?;
        if self.enforced && request.created_by.id == self.user.id {
            return Err(ApiError::forbidden("the creator of an airlock request cannot review it"));
        }
        Ok(())
    }
}

/// What a route is about, as its 404 names it: the kind of record and its id.
type Subject<'s> = (Entity, &'s str);

/// The answer for `subject` when it does not exist.
fn hidden((entity, id): Subject<'_>) -> ApiError {
    StoreError::not_found(entity, id).into()
}

/// Whether the caller holds any role in `workspace_id` (or is `TREAdmin`): others are
/// told it does not exist.
pub(super) async fn sees_workspace(
    store: &Store,
    user: &User,
    workspace_id: &str,
) -> Result<bool, ApiError> {
    if auth::is_admin(user) {
        return Ok(true);
    }
    Ok(!store.read().workspace_roles(workspace_id, &user.id).await?.is_empty())
}

/// The workspace a resource belongs to: a workspace's own id, else its parent's.
fn workspace_of(resource: &Resource) -> Option<&str> {
    match resource.resource_type() {
        ResourceType::Workspace => Some(resource.id.as_str()),
        _ => resource.workspace_id(),
    }
}

/// The workspace roles that may create or change a resource of this type, besides
/// `TREAdmin`.
fn change_roles(resource_type: ResourceType) -> &'static [WorkspaceRole] {
    match resource_type {
        ResourceType::Workspace | ResourceType::SharedService => &[],
        ResourceType::WorkspaceService => &[WorkspaceOwner],
        ResourceType::UserResource => &[WorkspaceOwner, WorkspaceResearcher],
    }
}
