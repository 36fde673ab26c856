//! Creating operations (reference §5.3 "How steps are built", §8) and advancing
//! multi-step pipelines (§6.6).
//!
//! Every function here works inside the caller's [`Tx`]: the resource change, the
//! operation, the history items and the first resource request (written to the outbox)
//! commit together or not at all.

use crate::domain::{
    MAIN_STEP_ID, Operation, OperationStep, Properties, Resource, ResourceKind, ResourcePatch,
    ResourceType, Status, User, action,
};
use crate::domain::{new_id, queues};
use crate::rules::{SubstitutionError, substitute_properties};
use crate::storage::{OutboxMessage, StoreError, Tx};
use crate::templates::{PipelineStep, PropertyError, REDACTED, Template, TemplateRegistry};

/// How many times [`update_resource_for_step`] retries a patch that lost an etag race
/// (TRE's `num_retries=3`: four attempts in all).
pub const STEP_UPDATE_RETRIES: u32 = 3;

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

fn template<'t>(
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
                return Err(OperationError::InvalidParent {
                    message: format!(
                        "workspace service {} is not in workspace {}",
                        service.id, workspace.id
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

/// The parent a new resource names: it must exist, have the right type and not be
/// deleted.
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
    match tx.read().find_resource(id).await? {
        Some(found) if found.resource_type() == expected && !found.is_deleted() => Ok(found),
        _ => Err(OperationError::InvalidParent {
            message: format!("{field} {id} is not an existing {expected}"),
        }),
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
/// # Errors
///
/// [`OperationError::ResourceDeleted`], or as [`create_operation`].
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
    let message_id = tx.insert_outbox(message).await?;
    // The operation is stored after its first request, so the step records the request's
    // message id without a second write (the replay marker of DESIGN §5).
    if let Some(first) = operation.steps.as_mut().and_then(|steps| steps.first_mut()) {
        first.resource_request_message_id = Some(message_id.to_string());
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

/// The outbox message asking the resource processor to run `step` of `operation` on
/// `resource`: the [`ResourceRequest`](crate::domain::ResourceRequest) as JSON, with
/// correlation id = operation id and session id = aggregate id = the resource id (so
/// requests for one resource go out, and are processed, in order).
///
/// # Errors
///
/// The request cannot be serialized.
pub fn resource_request_message(
    queue: &str,
    resource: &Resource,
    operation: &Operation,
    step: &OperationStep,
) -> Result<OutboxMessage, OperationError> {
    let step_action = step.resource_action.as_deref().unwrap_or(&operation.action);
    let request = resource.resource_request(&operation.id, &step.id, step_action);
    Ok(OutboxMessage::json(queue, &request, &resource.id)
        .map_err(OperationError::Encode)?
        .with_session_id(&resource.id)
        .with_correlation_id(&operation.id))
}

/// The steps of an operation: for each resource, the steps of its template's pipeline
/// for `action` (targets resolved), or a single main step.
async fn build_steps(
    tx: &mut Tx,
    templates: &TemplateRegistry,
    resources: &[Resource],
    operation_action: &str,
    now: f64,
) -> Result<Vec<OperationStep>, OperationError> {
    let mut steps = Vec::new();
    for resource in resources {
        let template = template(templates, &resource.template_name)?;
        let pipeline = template.pipeline_for(operation_action).filter(|steps| !steps.is_empty());
        let Some(pipeline) = pipeline else {
            steps.push(main_step(resource, operation_action, now));
            continue;
        };
        for pipeline_step in pipeline {
            if pipeline_step.is_main() {
                steps.push(main_step(resource, operation_action, now));
                continue;
            }
            let target =
                step_target(tx, template, resource, pipeline_step, operation_action).await?;
            let step_action = pipeline_step
                .resource_action
                .clone()
                .unwrap_or_else(|| operation_action.to_owned());
            steps.push(OperationStep {
                id: new_id(),
                template_step_id: pipeline_step.step_id.clone(),
                step_title: pipeline_step.step_title.clone(),
                resource_id: Some(target.id.clone()),
                resource_template_name: Some(target.template_name.clone()),
                resource_type: Some(target.resource_type()),
                status: Some(Status::awaiting(&step_action)),
                message: Some(Status::awaiting_message(&step_action).to_owned()),
                resource_action: Some(step_action),
                updated_when: Some(now),
                source_template_resource_id: Some(resource.id.clone()),
                resource_request_message_id: None,
            });
        }
    }
    Ok(steps)
}

fn main_step(resource: &Resource, operation_action: &str, now: f64) -> OperationStep {
    OperationStep {
        id: new_id(),
        template_step_id: MAIN_STEP_ID.to_owned(),
        step_title: Some(format!("Main step for {}", resource.id)),
        resource_id: Some(resource.id.clone()),
        resource_template_name: Some(resource.template_name.clone()),
        resource_type: Some(resource.resource_type()),
        resource_action: Some(operation_action.to_owned()),
        status: Some(Status::awaiting(operation_action)),
        message: Some(Status::awaiting_message(operation_action).to_owned()),
        updated_when: Some(now),
        source_template_resource_id: Some(resource.id.clone()),
        resource_request_message_id: None,
    }
}

/// The resource a non-main pipeline step acts on: a shared service by template name,
/// the parent workspace, or the parent workspace service.
async fn step_target(
    tx: &mut Tx,
    template: &Template,
    resource: &Resource,
    step: &PipelineStep,
    operation_action: &str,
) -> Result<Resource, OperationError> {
    let wanted = step.resource_template_name.as_deref().unwrap_or_default();
    let missing = |what: String| OperationError::MissingPrerequisite {
        message: format!(
            "step {} of the {operation_action} pipeline of template {} needs {what}",
            step.step_id, template.name
        ),
    };
    let target = match step.resource_type {
        Some(ResourceType::SharedService) => tx.read().active_shared_service(wanted).await?,
        Some(ResourceType::Workspace) => match resource.workspace_id() {
            Some(id) => tx.read().find_resource(id).await?,
            None => None,
        },
        Some(ResourceType::WorkspaceService) => match resource.parent_workspace_service_id() {
            Some(id) => tx.read().find_resource(id).await?,
            None => None,
        },
        Some(ResourceType::UserResource) | None => None,
    };
    let kind = step.resource_type.map_or("resource", ResourceType::as_str);
    match target {
        Some(target) if target.template_name == wanted && !target.is_deleted() => Ok(target),
        Some(target) if step.resource_type != Some(ResourceType::SharedService) => {
            Err(missing(format!(
                "its parent {kind} to be a {wanted}, but {} is a {}",
                target.id, target.template_name
            )))
        }
        _ if step.resource_type == Some(ResourceType::SharedService) => {
            Err(missing(format!("a deployed shared service {wanted}, and there is none")))
        }
        _ => Err(missing(format!("its parent {kind} ({wanted}), which does not exist"))),
    }
}

/// What [`update_resource_for_step`] works on.
#[derive(Debug, Clone, Copy)]
pub struct StepUpdate<'a> {
    /// The operation step to prepare.
    pub step: &'a OperationStep,
    /// The resource as the user submitted it (real sensitive values); first step only.
    pub root_resource: Option<&'a Resource>,
    /// The resource whose template defines the pipeline, if the caller has it.
    pub step_resource: Option<&'a Resource>,
    /// The resource the step acts on.
    pub resource_to_update_id: &'a str,
    /// The operation's action.
    pub primary_action: &'a str,
    /// Who asked for the operation.
    pub user: &'a User,
}

/// TRE's `update_resource_for_step` (reference §6.6): before a pipeline step's resource
/// request is sent, patches the resource the step acts on with the step's substituted
/// properties (history item, `resourceVersion + 1`, etag compare-and-swap with
/// [`STEP_UPDATE_RETRIES`] retries) and returns it; returns the pipeline's resource
/// unchanged when its template has no pipeline for the action (or only a bare main
/// step).
///
/// # Errors
///
/// [`OperationError::StepNotFound`], [`OperationError::TemplateNotFound`], a
/// substitution or validation error, or a store error (including the last
/// [`StoreError::EtagMismatch`]).
///
/// # Cancellation safety
///
/// Cancel safe: nothing is committed; a dropped transaction rolls back.
pub async fn update_resource_for_step(
    tx: &mut Tx,
    templates: &TemplateRegistry,
    update: StepUpdate<'_>,
) -> Result<Resource, OperationError> {
    let step = update.step;
    let step_resource = match (update.step_resource, update.root_resource) {
        (Some(resource), _) => resource.clone(),
        (None, root) => {
            let source_id = step.source_template_resource_id.as_deref().ok_or_else(|| {
                OperationError::IncompleteStep {
                    step_id: step.id.clone(),
                    field: "sourceTemplateResourceId",
                }
            })?;
            match root {
                Some(root) if root.id == source_id => root.clone(),
                _ => tx.read().resource(source_id).await?,
            }
        }
    };
    let (parent_workspace, parent_service) = match &step_resource.kind {
        ResourceKind::UserResource { workspace_id, parent_workspace_service_id, .. } => (
            Some(tx.read().resource(workspace_id).await?),
            Some(tx.read().resource(parent_workspace_service_id).await?),
        ),
        ResourceKind::WorkspaceService { workspace_id } => {
            (Some(tx.read().resource(workspace_id).await?), None)
        }
        ResourceKind::Workspace { .. } | ResourceKind::SharedService => (None, None),
    };
    let pipeline_template = template(templates, &step_resource.template_name)?;
    let Some(pipeline) = pipeline_template.pipeline_for(update.primary_action) else {
        return Ok(step_resource);
    };
    let bare_main = pipeline.len() == 1
        && pipeline[0].is_main()
        && pipeline[0].properties.as_ref().is_none_or(Vec::is_empty);
    if pipeline.is_empty() || bare_main {
        return Ok(step_resource);
    }
    let template_step =
        pipeline.iter().find(|s| s.step_id == step.template_step_id).ok_or_else(|| {
            OperationError::StepNotFound {
                template: pipeline_template.name.clone(),
                step_id: step.template_step_id.clone(),
                action: update.primary_action.to_owned(),
            }
        })?;
    let step_action = template_step
        .resource_action
        .as_deref()
        .or(step.resource_action.as_deref())
        .unwrap_or(update.primary_action);
    tx.patch_resource_with_retries(
        update.resource_to_update_id,
        STEP_UPDATE_RETRIES,
        update.user,
        |current| {
            let properties = substitute_properties(
                template_step,
                &step_resource,
                parent_workspace.as_ref(),
                parent_service.as_ref(),
                current,
            )?;
            template(templates, &current.template_name)?
                .validate_patch(&properties, step_action)?;
            Ok::<_, OperationError>(ResourcePatch::properties(properties))
        },
    )
    .await
}
