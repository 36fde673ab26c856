//! Operations and their steps (reference §5.2–5.3).

use serde::{Deserialize, Serialize};

use super::resource::ResourceType;
use super::resource::User;
use super::status::Status;

/// The `templateStepId` of the step that acts on the operation's own resource.
pub const MAIN_STEP_ID: &str = "main";

/// One step of an operation: one action on one resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperationStep {
    /// The step id (a UUIDv4 string); resource requests and status updates carry it.
    pub id: String,
    /// [`MAIN_STEP_ID`] for the primary resource, otherwise the pipeline's `stepId`.
    pub template_step_id: String,
    /// A title for people.
    #[serde(default)]
    pub step_title: Option<String>,
    /// The resource this step acts on.
    #[serde(default)]
    pub resource_id: Option<String>,
    /// The template of the resource this step acts on.
    #[serde(default)]
    pub resource_template_name: Option<String>,
    /// The type of the resource this step acts on.
    #[serde(default)]
    pub resource_type: Option<ResourceType>,
    /// The action this step runs (`install`, `upgrade`, `uninstall` or a custom action).
    #[serde(default)]
    pub resource_action: Option<String>,
    /// The step's status.
    #[serde(default)]
    pub status: Option<Status>,
    /// The last message about the step.
    #[serde(default)]
    pub message: Option<String>,
    /// When the step last changed, in POSIX seconds.
    #[serde(default)]
    pub updated_when: Option<f64>,
    /// The resource whose template defined this step (the primary resource).
    #[serde(default)]
    pub source_template_resource_id: Option<String>,
    /// The message id (outbox row id) of the resource request written for this step, once
    /// it was written. Not part of TRE's model: it lets a replayed status update see that
    /// the next step was already dispatched (DESIGN §5). Omitted while `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_request_message_id: Option<String>,
}

impl OperationStep {
    /// Whether the step succeeded.
    #[must_use]
    pub fn is_success(&self) -> bool {
        self.status.is_some_and(Status::is_success)
    }

    /// Whether the step failed.
    #[must_use]
    pub fn is_failure(&self) -> bool {
        self.status.is_some_and(Status::is_failure)
    }

    /// Whether the step runs a custom action.
    #[must_use]
    pub fn is_action(&self) -> bool {
        self.status.is_some_and(Status::is_action)
    }

    /// Whether this is the step acting on the operation's own resource.
    #[must_use]
    pub fn is_main(&self) -> bool {
        self.template_step_id == MAIN_STEP_ID
    }

    /// Whether the step's resource request was written to the outbox.
    #[must_use]
    pub fn is_requested(&self) -> bool {
        self.resource_request_message_id.is_some()
    }
}

/// An action on a resource, carried out as one or more steps (container `Operations`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// The operation id (a UUIDv4 string); the correlation id of its resource requests.
    pub id: String,
    /// The primary resource.
    pub resource_id: String,
    /// The primary resource's path.
    pub resource_path: String,
    /// The primary resource's version when the operation was created.
    #[serde(default)]
    pub resource_version: i64,
    /// The overall status.
    #[serde(default = "default_status")]
    pub status: Status,
    /// The action (`install`, `upgrade`, `uninstall` or a custom action).
    pub action: String,
    /// The last message about the operation.
    #[serde(default)]
    pub message: String,
    /// When the operation was created, in POSIX seconds.
    #[serde(default)]
    pub created_when: f64,
    /// When the operation last changed, in POSIX seconds.
    #[serde(default)]
    pub updated_when: f64,
    /// Who asked for the operation.
    #[serde(default)]
    pub user: User,
    /// The steps, in order.
    #[serde(default)]
    pub steps: Option<Vec<OperationStep>>,
    /// The optimistic-concurrency tag of the stored operation (not part of TRE's model;
    /// omitted when empty).
    #[serde(rename = "_etag", alias = "etag", default, skip_serializing_if = "String::is_empty")]
    pub etag: String,
}

fn default_status() -> Status {
    Status::AwaitingDeployment
}

impl Operation {
    /// The steps, or an empty slice.
    #[must_use]
    pub fn steps(&self) -> &[OperationStep] {
        self.steps.as_deref().unwrap_or_default()
    }

    /// The index of the step with this id acting on this resource (the last one, as TRE
    /// finds it).
    #[must_use]
    pub fn step_index(&self, step_id: &str, resource_id: &str) -> Option<usize> {
        self.steps().iter().rposition(|step| {
            step.id == step_id && step.resource_id.as_deref() == Some(resource_id)
        })
    }
}
