//! Multi-step pipelines (reference §5.3 "How steps are built", §6.6): the steps of a
//! new operation, the resource request of each step, and the patch that prepares the
//! resource a step acts on before its request is sent.

use crate::domain::{
    MAIN_STEP_ID, Operation, OperationStep, Resource, ResourceKind, ResourcePatch, ResourceType,
    Status, User, new_id,
};
use crate::rules::operations::{OperationError, template};
use crate::rules::substitute_properties;
use crate::storage::{OutboxMessage, Tx};
use crate::templates::{PipelineStep, Template, TemplateRegistry};

/// How many times [`update_resource_for_step`] retries a patch that lost an etag race
/// (TRE's `num_retries=3`: four attempts in all).
pub const STEP_UPDATE_RETRIES: u32 = 3;

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
pub(super) async fn build_steps(
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
/// [`StoreError::EtagMismatch`](crate::storage::StoreError::EtagMismatch)).
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
