//! Creating operations (reference §5.3 "How steps are built", §8); their pipelines are
//! in [`pipelines`](super::pipelines).
//!
//! Every function here works inside the caller's [`Tx`]: the resource change, the
//! operation, the history items and the first resource request (written to the outbox)
//! commit together or not at all.

use crate::domain::{
    Operation, Properties, Resource, ResourceKind, ResourcePatch, ResourceType, Status, User,
    action,
};
use crate::domain::{new_id, queues};
use crate::rules::SubstitutionError;
use crate::rules::pipelines::{
    StepUpdate, build_steps, resource_request_message, update_resource_for_step,
};
use crate::storage::{StoreError, Tx};
use crate::templates::{PropertyError, REDACTED, Template, TemplateRegistry};

/// What operation creation needs besides the transaction.
#[derive(Debug, Clone, Copy)]
pub struct OperationContext<'a> {
    /// The templates.
    pub templates: &'a TemplateRegistry,
    /// The queue resource requests are sent to (`SERVICE_BUS_RESOURCE_REQUEST_QUEUE`).
    pub resource_request_queue: &'a str,
}

impl<'a> OperationContext<'a> {
    /// A context sending resource requests to [`queues::RESOURCE_REQUEST`].
    #[must_use]
    pub fn new(templates: &'a TemplateRegistry) -> Self {
        OperationContext { templates, resource_request_queue: queues::RESOURCE_REQUEST }
    }
}

/// Why an operation could not be created or advanced.
///
/// [`is_client_error`](Self::is_client_error) tells the HTTP layer to answer 400 (or
/// 404, see [`is_not_found`](Self::is_not_found)); [`is_unavailable`](Self::is_unavailable)
/// that the database is down, so a handler retries.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OperationError {
    /// No template with this name.
    #[error("template {name:?} does not exist")]
    TemplateNotFound {
        /// The template name.
        name: String,
    },
    /// The template deploys another kind of resource.
    #[error("template {name} is a {actual} template, not a {expected} one")]
    WrongResourceType {
        /// The template name.
        name: String,
        /// The resource type asked for.
        expected: ResourceType,
        /// The template's resource type.
        actual: ResourceType,
    },
    /// The properties do not fit the template.
    #[error("the properties do not fit the template")]
    InvalidProperties(#[source] PropertyError),
    /// A field the resource type needs is missing (`workspaceId`, …).
    #[error("{field} is required for a {resource_type}")]
    MissingField {
        /// The field.
        field: &'static str,
        /// The resource type.
        resource_type: ResourceType,
    },
    /// The parent named in the request does not exist, is deleted, or does not fit.
    #[error("{message}")]
    InvalidParent {
        /// What is wrong, naming the parent.
        message: String,
    },
    /// Something a pipeline step acts on is missing, e.g. a linuxvm needs a deployed
    /// firewall shared service.
    #[error("{message}")]
    MissingPrerequisite {
        /// What is missing.
        message: String,
    },
    /// The resource is deleted.
    #[error("resource {id} is deleted")]
    ResourceDeleted {
        /// The resource id.
        id: String,
    },
    /// Another operation on the same resource (or, for an uninstall, on a resource under
    /// it) is not finished yet.
    #[error(
        "resource {resource_id} has an operation in progress: {operation_id} ({action}, {status}); \
         try again when it has finished"
    )]
    OperationInProgress {
        /// The resource id.
        resource_id: String,
        /// The running operation.
        operation_id: String,
        /// Its action.
        action: String,
        /// Its status.
        status: Status,
    },
    /// The template has no such custom action.
    #[error("template {template} has no action {action:?}")]
    ActionNotAvailable {
        /// The template.
        template: String,
        /// The action.
        action: String,
    },
    /// The template's pipeline has no step with the operation step's `templateStepId`.
    #[error("template {template} has no pipeline step {step_id:?} for {action}")]
    StepNotFound {
        /// The template.
        template: String,
        /// The step id.
        step_id: String,
        /// The action.
        action: String,
    },
    /// An operation step does not name the resources it needs.
    #[error("operation step {step_id} has no {field}")]
    IncompleteStep {
        /// The step id.
        step_id: String,
        /// The missing field.
        field: &'static str,
    },
    /// Property substitution failed.
    #[error("property substitution failed")]
    Substitution(#[source] SubstitutionError),
    /// A resource request could not be serialized.
    #[error("cannot serialize the resource request")]
    Encode(#[source] serde_json::Error),
    /// The database failed, or a record is missing or changed.
    #[error("storage failed")]
    Store(#[from] StoreError),
}

impl OperationError {
    /// Whether the request was wrong (HTTP 400, or 404 for [`is_not_found`](Self::is_not_found)).
    #[must_use]
    pub fn is_client_error(&self) -> bool {
        match self {
            OperationError::TemplateNotFound { .. }
            | OperationError::WrongResourceType { .. }
            | OperationError::InvalidProperties(_)
            | OperationError::MissingField { .. }
            | OperationError::InvalidParent { .. }
            | OperationError::MissingPrerequisite { .. }
            | OperationError::ResourceDeleted { .. }
            | OperationError::OperationInProgress { .. }
            | OperationError::ActionNotAvailable { .. } => true,
            OperationError::Store(error) => error.is_not_found() || error.is_etag_mismatch(),
            _ => false,
        }
    }

    /// Whether a record the request names does not exist.
    #[must_use]
    pub fn is_not_found(&self) -> bool {
        matches!(self, OperationError::Store(error) if error.is_not_found())
    }

    /// Whether the database is unreachable, so the same request may succeed later.
    #[must_use]
    pub fn is_unavailable(&self) -> bool {
        matches!(self, OperationError::Store(error) if error.is_unavailable())
    }
}

impl From<PropertyError> for OperationError {
    fn from(error: PropertyError) -> Self {
        OperationError::InvalidProperties(error)
    }
}

impl From<SubstitutionError> for OperationError {
    fn from(error: SubstitutionError) -> Self {
        OperationError::Substitution(error)
    }
}

/// Refuses a new operation on `resource_id` while another operation whose own resource
/// it is has not finished. Pipeline steps of other operations that act on it (a user
/// resource's steps on the shared firewall) do not count: their operations belong to
/// other resources.
async fn ensure_no_operation_in_progress(
    tx: &mut Tx,
    resource_id: &str,
) -> Result<(), OperationError> {
    match tx.operation_in_progress(resource_id).await? {
        Some(running) => Err(OperationError::OperationInProgress {
            resource_id: resource_id.to_owned(),
            operation_id: running.id,
            action: running.action,
            status: running.status,
        }),
        None => Ok(()),
    }
}

pub(super) fn template<'t>(
    templates: &'t TemplateRegistry,
    name: &str,
) -> Result<&'t Template, OperationError> {
    templates.get(name).ok_or_else(|| OperationError::TemplateNotFound { name: name.to_owned() })
}

/// A resource to install (the body of `POST /api/resources`).
#[derive(Debug, Clone, PartialEq)]
pub struct NewResource {
    /// The template.
    pub template_name: String,
    /// The resource type; must match the template's.
    pub resource_type: ResourceType,
    /// The properties, with real values for sensitive ones.
    pub properties: Properties,
    /// The workspace (workspace services and user resources).
    pub workspace_id: Option<String>,
    /// The workspace service (user resources).
    pub parent_workspace_service_id: Option<String>,
}

/// A resource just created and the operation deploying it.
#[derive(Debug, Clone, PartialEq)]
pub struct Created {
    /// The resource as stored (sensitive values `"REDACTED"`).
    pub resource: Resource,
    /// The install operation.
    pub operation: Operation,
}

/// Creates a resource and its install operation: checks the template, the parents and
/// the properties (defaults added), stores the resource with sensitive values
/// `"REDACTED"`, and creates the operation with its first resource request (carrying the
/// real values) in the outbox.
///
/// # Errors
///
/// A client error (see [`OperationError::is_client_error`]) when the request does not fit
/// the templates or the parents, or a store error.
///
/// # Cancellation safety
///
/// Cancel safe: nothing is committed; a dropped transaction rolls back.
pub async fn install_resource(
    tx: &mut Tx,
    context: OperationContext<'_>,
    new: NewResource,
    user: &User,
) -> Result<Created, OperationError> {
    let template = template(context.templates, &new.template_name)?;
    if template.resource_type != new.resource_type {
        return Err(OperationError::WrongResourceType {
            name: template.name.clone(),
            expected: new.resource_type,
            actual: template.resource_type,
        });
    }
    let mut properties = new.properties;
    template.apply_defaults(&mut properties);
    template.validate_install(&properties)?;

    let id = new_id();
    let (kind, resource_path) = match new.resource_type {
        ResourceType::Workspace => {
            (ResourceKind::Workspace { workspace_url: String::new() }, format!("/workspaces/{id}"))
        }
        ResourceType::SharedService => {
            (ResourceKind::SharedService, format!("/shared-services/{id}"))
        }
        ResourceType::WorkspaceService => {
            let workspace = parent(
                tx,
                new.workspace_id.as_deref(),
                "workspaceId",
                ResourceType::Workspace,
                new.resource_type,
            )
            .await?;
            (
                ResourceKind::WorkspaceService { workspace_id: workspace.id.clone() },
                format!("{}/workspace-services/{id}", workspace.resource_path),
            )
        }
        ResourceType::UserResource => {
            let workspace = parent(
                tx,
                new.workspace_id.as_deref(),
                "workspaceId",
                ResourceType::Workspace,
                new.resource_type,
            )
            .await?;
            let service = parent(
                tx,
                new.parent_workspace_service_id.as_deref(),
                "parentWorkspaceServiceId",
                ResourceType::WorkspaceService,
                new.resource_type,
            )
            .await?;
            if service.workspace_id() != Some(workspace.id.as_str()) {
                // Worded as for a service that does not exist: the caller may hold no
                // role in the service's workspace, which must not be told it exists.
                return Err(OperationError::InvalidParent {
                    message: format!(
                        "parentWorkspaceServiceId {} is not an existing {}",
                        service.id,
                        ResourceType::WorkspaceService
                    ),
                });
            }
            if let Some(expected) = &template.parent_workspace_service
                && *expected != service.template_name
            {
                return Err(OperationError::InvalidParent {
                    message: format!(
                        "template {} belongs under a {expected} workspace service, not {} ({})",
                        template.name, service.template_name, service.id
                    ),
                });
            }
            (
                ResourceKind::UserResource {
                    workspace_id: workspace.id.clone(),
                    owner_id: user.id.clone(),
                    parent_workspace_service_id: service.id.clone(),
                    azure_status: Properties::new(),
                },
                format!("{}/user-resources/{id}", service.resource_path),
            )
        }
    };
    let mut root = Resource {
        id,
        template_name: template.name.clone(),
        template_version: template.version.clone(),
        properties,
        available_upgrades: None,
        is_enabled: true,
        kind,
        deployment_status: Some(Status::awaiting(action::INSTALL)),
        etag: String::new(),
        resource_path,
        resource_version: 0,
        user: user.clone(),
        updated_when: tx.now(),
    };
    let redacted = Resource { properties: template.redact(&root.properties), ..root.clone() };
    let resource = tx.insert_resource(&redacted).await?;
    root.etag = resource.etag.clone();
    let operation = create_operation(tx, context, &root, action::INSTALL, user, false).await?;
    Ok(Created { resource, operation })
}

/// The parent a new resource names: it must exist, have the right type, not be
/// deleted, and not be being uninstalled (refused as
/// [`OperationError::OperationInProgress`], naming the uninstall), or the new resource
/// would be deployed into what is being torn down.
///
/// On PostgreSQL the check locks the parent's row until the transaction ends, as an
/// uninstall locks it before it looks for operations under it: an install and an
/// uninstall of its parent run one after the other, whichever comes second sees the
/// other's operation. Parents are taken workspace first, the order uninstalls take.
async fn parent(
    tx: &mut Tx,
    id: Option<&str>,
    field: &'static str,
    expected: ResourceType,
    resource_type: ResourceType,
) -> Result<Resource, OperationError> {
    let id = id
        .filter(|id| !id.is_empty())
        .ok_or(OperationError::MissingField { field, resource_type })?;
    let found = match tx.read().find_resource(id).await? {
        Some(found) if found.resource_type() == expected && !found.is_deleted() => found,
        _ => {
            return Err(OperationError::InvalidParent {
                message: format!("{field} {id} is not an existing {expected}"),
            });
        }
    };
    match tx.operation_in_progress(id).await? {
        Some(running) if running.action == action::UNINSTALL => {
            Err(OperationError::OperationInProgress {
                resource_id: id.to_owned(),
                operation_id: running.id,
                action: running.action,
                status: running.status,
            })
        }
        _ => Ok(found),
    }
}

/// Upgrades a resource: checks that only `updateable` properties change, patches it
/// (history item, `resourceVersion + 1`, sensitive values `"REDACTED"`), and creates
/// the upgrade operation whose first request carries the real values. With
/// `expected_etag`, the resource must not have changed since the caller read it.
///
/// # Errors
///
/// [`OperationError::InvalidProperties`], [`OperationError::ResourceDeleted`],
/// [`StoreError::EtagMismatch`] (as [`OperationError::Store`]), or a store error.
///
/// # Cancellation safety
///
/// Cancel safe: nothing is committed; a dropped transaction rolls back.
pub async fn upgrade_resource(
    tx: &mut Tx,
    context: OperationContext<'_>,
    id: &str,
    properties: Properties,
    expected_etag: Option<&str>,
    user: &User,
) -> Result<Created, OperationError> {
    let current = tx.read().resource(id).await?;
    if current.is_deleted() {
        return Err(OperationError::ResourceDeleted { id: id.to_owned() });
    }
    ensure_no_operation_in_progress(tx, id).await?;
    if let Some(expected) = expected_etag
        && expected != current.etag
    {
        return Err(StoreError::EtagMismatch {
            entity: crate::storage::Entity::Resource,
            id: id.to_owned(),
        }
        .into());
    }
    let template = template(context.templates, &current.template_name)?;
    template.validate_patch(&properties, action::UPGRADE)?;
    let resource = tx
        .patch_resource(&current, &ResourcePatch::properties(template.redact(&properties)), user)
        .await?;
    let mut root = resource.clone();
    root.properties.extend(properties);
    let operation = create_operation(tx, context, &root, action::UPGRADE, user, false).await?;
    Ok(Created { resource, operation })
}

/// Creates the uninstall operation of a resource; with `cascade`, of everything under
/// it too, deepest first.
///
/// Refused while an operation runs on the resource or on anything under it (a
/// workspace's services and user resources, a service's user resources), cascading or
/// not: [`OperationError::OperationInProgress`] names the first running one found,
/// parents first.
///
/// # Errors
///
/// [`OperationError::ResourceDeleted`], [`OperationError::OperationInProgress`], or as
/// [`create_operation`].
///
/// # Cancellation safety
///
/// Cancel safe: nothing is committed; a dropped transaction rolls back.
pub async fn uninstall_resource(
    tx: &mut Tx,
    context: OperationContext<'_>,
    id: &str,
    user: &User,
    cascade: bool,
) -> Result<Operation, OperationError> {
    let current = tx.read().resource(id).await?;
    if current.is_deleted() {
        return Err(OperationError::ResourceDeleted { id: id.to_owned() });
    }
    ensure_no_operation_in_progress(tx, id).await?;
    // Nor while anything under it is being changed: an install still running under a
    // workspace being torn down would deploy into what is gone. Checked (and, on
    // PostgreSQL, locked) parents first, the order every uninstall takes, so two
    // uninstalls of a parent and its child never wait for each other in a circle.
    let mut descendants = tx.read().resource_dependency_list(&current).await?;
    descendants.retain(|resource| resource.id != current.id);
    descendants.sort_by(|a, b| {
        let depth = |r: &Resource| r.resource_path.matches('/').count();
        depth(a).cmp(&depth(b)).then_with(|| a.resource_path.cmp(&b.resource_path))
    });
    for descendant in &descendants {
        ensure_no_operation_in_progress(tx, &descendant.id).await?;
    }
    create_operation(tx, context, &current, action::UNINSTALL, user, cascade).await
}

/// Creates the operation for a custom action the resource's template declares.
///
/// # Errors
///
/// [`OperationError::ActionNotAvailable`], [`OperationError::ResourceDeleted`], or as
/// [`create_operation`].
///
/// # Cancellation safety
///
/// Cancel safe: nothing is committed; a dropped transaction rolls back.
pub async fn invoke_action(
    tx: &mut Tx,
    context: OperationContext<'_>,
    id: &str,
    custom_action: &str,
    user: &User,
) -> Result<Operation, OperationError> {
    let current = tx.read().resource(id).await?;
    if current.is_deleted() {
        return Err(OperationError::ResourceDeleted { id: id.to_owned() });
    }
    let template = template(context.templates, &current.template_name)?;
    if !template.has_custom_action(custom_action) {
        return Err(OperationError::ActionNotAvailable {
            template: template.name.clone(),
            action: custom_action.to_owned(),
        });
    }
    ensure_no_operation_in_progress(tx, id).await?;
    create_operation(tx, context, &current, custom_action, user, false).await
}

/// TRE's `send_resource_request_message`: builds and stores the operation for `action`
/// on `root` (the resource as the caller has it, with real sensitive values), advances
/// its first step with [`update_resource_for_step`], and writes the first resource
/// request to the outbox: correlation id = operation id, session id = the first step's
/// resource id.
///
/// # Errors
///
/// [`OperationError::MissingPrerequisite`] when a pipeline step's target is missing,
/// [`OperationError::TemplateNotFound`], a substitution or validation error from the
/// first step, or a store error.
///
/// # Cancellation safety
///
/// Cancel safe: nothing is committed; a dropped transaction rolls back.
pub async fn create_operation(
    tx: &mut Tx,
    context: OperationContext<'_>,
    root: &Resource,
    operation_action: &str,
    user: &User,
    cascade: bool,
) -> Result<Operation, OperationError> {
    let resources = if cascade {
        let mut list = tx.read().resource_dependency_list(root).await?;
        for resource in &mut list {
            if resource.id == root.id {
                *resource = root.clone();
            }
        }
        list
    } else {
        vec![root.clone()]
    };
    let now = tx.now();
    let steps = build_steps(tx, context.templates, &resources, operation_action, now).await?;
    let mut operation = Operation {
        id: new_id(),
        resource_id: root.id.clone(),
        resource_path: root.resource_path.clone(),
        resource_version: root.resource_version,
        status: Status::awaiting(operation_action),
        action: operation_action.to_owned(),
        message: Status::awaiting_message(operation_action).to_owned(),
        created_when: now,
        updated_when: now,
        user: user.clone(),
        steps: Some(steps),
        etag: String::new(),
    };
    let first = operation.steps().first().ok_or_else(|| OperationError::IncompleteStep {
        step_id: operation.id.clone(),
        field: "steps",
    })?;
    let resource_id = first.resource_id.clone().ok_or_else(|| OperationError::IncompleteStep {
        step_id: first.id.clone(),
        field: "resourceId",
    })?;
    let mut to_send = update_resource_for_step(
        tx,
        context.templates,
        StepUpdate {
            step: first,
            root_resource: Some(root),
            step_resource: None,
            resource_to_update_id: &resource_id,
            primary_action: operation_action,
            user,
        },
    )
    .await?;
    if to_send.id == root.id {
        // The root's real values go in the first request, even if a pipeline patch of
        // the root read back the stored "REDACTED" ones.
        for (name, value) in &root.properties {
            if to_send.properties.get(name).and_then(|v| v.as_str()) == Some(REDACTED) {
                to_send.properties.insert(name.clone(), value.clone());
            }
        }
    }
    let message =
        resource_request_message(context.resource_request_queue, &to_send, &operation, first)?;
    let message_id = tx.insert_outbox_message(message).await?;
    // The operation is stored after its first request, so the step records the request's
    // message id without a second write (the replay marker of DESIGN §5).
    if let Some(first) = operation.steps.as_mut().and_then(|steps| steps.first_mut()) {
        first.resource_request_message_id = Some(message_id);
    }
    let operation = tx.insert_operation(&operation).await?;
    tracing::info!(
        operation_id = %operation.id,
        resource_id = %root.id,
        action = operation_action,
        steps = operation.steps().len(),
        "operation created"
    );
    Ok(operation)
}
