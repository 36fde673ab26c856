//! Resources, their history and the user who acted on them (reference §5.4–5.5).

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use super::messages::ResourceRequest;
use super::status::Status;

/// JSON properties of a resource: TRE's `dict`.
pub type Properties = Map<String, Value>;

/// The user behind a change (TRE's `User` dumped as a dict).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    /// Object id of the user.
    #[serde(default)]
    pub id: String,
    /// Display name.
    #[serde(default)]
    pub name: String,
    /// E-mail address.
    #[serde(default)]
    pub email: String,
    /// Application roles (`TREAdmin`, `WorkspaceResearcher`, …).
    #[serde(default)]
    pub roles: Vec<String>,
    /// Role assignments, kept as given.
    #[serde(default)]
    pub role_assignments: Vec<Value>,
}

impl User {
    /// A user with an id, a name and an e-mail address and no roles.
    #[must_use]
    pub fn new(id: impl Into<String>, name: impl Into<String>, email: impl Into<String>) -> Self {
        User { id: id.into(), name: name.into(), email: email.into(), ..User::default() }
    }
}

/// What differs between the four resource types, tagged by `resourceType`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "resourceType")]
pub enum ResourceKind {
    /// A workspace.
    #[serde(rename = "workspace")]
    Workspace {
        /// The workspace's web address, once deployed.
        #[serde(rename = "workspaceURL", default)]
        workspace_url: String,
    },
    /// A service inside a workspace.
    #[serde(rename = "workspace-service")]
    WorkspaceService {
        /// The parent workspace.
        #[serde(rename = "workspaceId", default)]
        workspace_id: String,
    },
    /// A resource one user owns inside a workspace service.
    #[serde(rename = "user-resource")]
    UserResource {
        /// The workspace.
        #[serde(rename = "workspaceId", default)]
        workspace_id: String,
        /// The user who owns it.
        #[serde(rename = "ownerId", default)]
        owner_id: String,
        /// The parent workspace service.
        #[serde(rename = "parentWorkspaceServiceId", default)]
        parent_workspace_service_id: String,
        /// Azure power state and the like, as reported.
        #[serde(rename = "azureStatus", default)]
        azure_status: Properties,
    },
    /// A service shared by every workspace.
    #[serde(rename = "shared-service")]
    SharedService,
}

impl ResourceKind {
    /// The resource type this kind belongs to.
    #[must_use]
    pub fn resource_type(&self) -> ResourceType {
        match self {
            ResourceKind::Workspace { .. } => ResourceType::Workspace,
            ResourceKind::WorkspaceService { .. } => ResourceType::WorkspaceService,
            ResourceKind::UserResource { .. } => ResourceType::UserResource,
            ResourceKind::SharedService => ResourceType::SharedService,
        }
    }
}

fn default_true() -> bool {
    true
}

/// Reads an etag, dropping the escaped quotes Cosmos puts around it.
fn etag_without_quotes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let raw = Option::<String>::deserialize(deserializer)?.unwrap_or_default();
    Ok(raw.trim_matches('"').to_owned())
}

/// A TRE resource: a workspace, a workspace service, a user resource or a shared service.
///
/// Serialized with TRE's camelCase names; the etag is written as `_etag` (as TRE's API
/// answers) and read from `_etag` or `etag`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resource {
    /// The resource id (a UUIDv4 string), also the porter installation id.
    pub id: String,
    /// The template (bundle) name.
    pub template_name: String,
    /// The template version.
    pub template_version: String,
    /// The template properties. Sensitive values are stored as `"REDACTED"`.
    #[serde(default)]
    pub properties: Properties,
    /// Newer template versions, when known.
    #[serde(default)]
    pub available_upgrades: Option<Vec<Value>>,
    /// Whether the resource is enabled.
    #[serde(default = "default_true")]
    pub is_enabled: bool,
    /// The resource type and its type-specific fields.
    #[serde(flatten)]
    pub kind: ResourceKind,
    /// The status of the last deployment step that acted on this resource.
    #[serde(default)]
    pub deployment_status: Option<Status>,
    /// The optimistic-concurrency tag; changes on every write.
    #[serde(rename = "_etag", alias = "etag", default, deserialize_with = "etag_without_quotes")]
    pub etag: String,
    /// Where the resource sits, e.g. `/workspaces/{id}/workspace-services/{id}`.
    #[serde(default)]
    pub resource_path: String,
    /// Incremented by every patch.
    #[serde(default)]
    pub resource_version: i64,
    /// The user who made the last change.
    #[serde(default)]
    pub user: User,
    /// When the last change was made, in POSIX seconds.
    #[serde(default)]
    pub updated_when: f64,
}

impl Resource {
    /// The resource type.
    #[must_use]
    pub fn resource_type(&self) -> ResourceType {
        self.kind.resource_type()
    }

    /// The parent workspace of a workspace service or user resource.
    #[must_use]
    pub fn workspace_id(&self) -> Option<&str> {
        match &self.kind {
            ResourceKind::WorkspaceService { workspace_id }
            | ResourceKind::UserResource { workspace_id, .. } => {
                Some(workspace_id.as_str()).filter(|id| !id.is_empty())
            }
            _ => None,
        }
    }

    /// The parent workspace service of a user resource.
    #[must_use]
    pub fn parent_workspace_service_id(&self) -> Option<&str> {
        match &self.kind {
            ResourceKind::UserResource { parent_workspace_service_id, .. } => {
                Some(parent_workspace_service_id.as_str()).filter(|id| !id.is_empty())
            }
            _ => None,
        }
    }

    /// The owner of a user resource.
    #[must_use]
    pub fn owner_id(&self) -> Option<&str> {
        match &self.kind {
            ResourceKind::UserResource { owner_id, .. } => {
                Some(owner_id.as_str()).filter(|id| !id.is_empty())
            }
            _ => None,
        }
    }

    /// Whether the resource is gone (`deploymentStatus` is `deleted`).
    #[must_use]
    pub fn is_deleted(&self) -> bool {
        self.deployment_status == Some(Status::Deleted)
    }

    /// The resource request that asks the resource processor to run `action` on this
    /// resource (TRE `get_resource_request_message_payload`).
    #[must_use]
    pub fn resource_request(
        &self,
        operation_id: &str,
        step_id: &str,
        action: &str,
    ) -> ResourceRequest {
        let (workspace_id, owner_id, parent_workspace_service_id) = match &self.kind {
            ResourceKind::WorkspaceService { workspace_id } => {
                (Some(workspace_id.clone()), None, None)
            }
            ResourceKind::UserResource {
                workspace_id,
                owner_id,
                parent_workspace_service_id,
                ..
            } => (
                Some(workspace_id.clone()),
                Some(owner_id.clone()),
                Some(parent_workspace_service_id.clone()),
            ),
            ResourceKind::Workspace { .. } | ResourceKind::SharedService => (None, None, None),
        };
        ResourceRequest {
            operation_id: operation_id.to_owned(),
            step_id: step_id.to_owned(),
            action: action.to_owned(),
            id: self.id.clone(),
            name: self.template_name.clone(),
            version: self.template_version.clone(),
            parameters: self.properties.clone(),
            workspace_id,
            owner_id,
            parent_workspace_service_id,
        }
    }

    /// The history item that records this resource as it is now, before a patch.
    #[must_use]
    pub fn history_item(&self, id: impl Into<String>) -> ResourceHistoryItem {
        ResourceHistoryItem {
            id: id.into(),
            resource_id: self.id.clone(),
            properties: self.properties.clone(),
            is_enabled: self.is_enabled,
            resource_version: self.resource_version,
            updated_when: self.updated_when,
            user: self.user.clone(),
            template_version: Some(self.template_version.clone()),
        }
    }
}

/// A change to a resource (TRE `ResourcePatch`): merged into the stored properties.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourcePatch {
    /// Enable or disable the resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_enabled: Option<bool>,
    /// Properties to set; other properties are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<Properties>,
}

impl ResourcePatch {
    /// A patch that sets `properties`.
    #[must_use]
    pub fn properties(properties: Properties) -> Self {
        ResourcePatch { is_enabled: None, properties: Some(properties) }
    }
}

/// A snapshot of a resource taken before each patch (container `ResourceHistory`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceHistoryItem {
    /// The history item id (a new UUIDv4).
    pub id: String,
    /// The resource the snapshot belongs to.
    pub resource_id: String,
    /// The properties before the patch.
    #[serde(default)]
    pub properties: Properties,
    /// Whether the resource was enabled.
    #[serde(default = "default_true")]
    pub is_enabled: bool,
    /// The version before the patch.
    #[serde(default)]
    pub resource_version: i64,
    /// When the snapshotted version was written.
    #[serde(default)]
    pub updated_when: f64,
    /// Who wrote the snapshotted version.
    #[serde(default)]
    pub user: User,
    /// The template version of the snapshotted version.
    #[serde(default)]
    pub template_version: Option<String>,
}

named_enum! {
    /// The four kinds of resource a TRE manages.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
    pub enum ResourceType: "resource type" {
        /// A workspace (`workspace`).
        #[serde(rename = "workspace")]
        Workspace => "workspace",
        /// A service inside a workspace (`workspace-service`).
        #[serde(rename = "workspace-service")]
        WorkspaceService => "workspace-service",
        /// A resource a user owns inside a workspace service (`user-resource`).
        #[serde(rename = "user-resource")]
        UserResource => "user-resource",
        /// A service shared by all workspaces (`shared-service`).
        #[serde(rename = "shared-service")]
        SharedService => "shared-service",
    }
}
