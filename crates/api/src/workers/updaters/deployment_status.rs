//! The deployment status updater (reference §6.3–6.5, DESIGN §5–6): the resource
//! processor's status reports change a step, its operation and its resource, and a
//! successful step of a pipeline queues the next step's resource request.

use std::sync::Arc;

use async_trait::async_trait;
use steward_core::{BoxError, Handler, Message, Outcome, error_chain};

use super::{
    CONFLICT_ATTEMPTS, MessageFormatError, correlation_id, parse_json, parse_message, reason, tre,
};
use crate::domain::queues;
use crate::domain::{
    DeploymentStatusUpdate, Operation, OperationStep, OutputError, Properties, Status,
    outputs_to_properties,
};
use crate::rules::operations::OperationError;
use crate::rules::pipelines::{StepUpdate, resource_request_message, update_resource_for_step};
use crate::storage::{StatusWrite, Store, StoreError, Tx, millis};
use crate::templates::TemplateRegistry;

/// The savepoint around preparing a pipeline's next step, so a failure there undoes only
/// that part.
const NEXT_STEP_SAVEPOINT: &str = "steward_next_step";

/// Parses a deployment status body (reference §4.2): JSON, `operationId` and `id` version-4
/// UUIDs, `status` one of TRE's statuses, outputs with string, list, object or `null`
/// values; unknown fields are ignored.
///
/// # Errors
///
/// The body is not UTF-8 JSON fitting that schema; the handler dead-letters such a
/// message with reason `MessageFormatIncorrect`.
pub fn parse_deployment_status(body: &[u8]) -> Result<DeploymentStatusUpdate, MessageFormatError> {
    parse_json(body)
}

/// Handles the resource processor's status reports (queue `deploymentstatus`).
///
/// For each message, in one transaction (reference §6.3–6.5):
/// - the step with the message's step id *and* resource id gets the status and message;
/// - the operation mirrors a single step; a multi-step operation is `pipeline_running`,
///   the action's failure status when any step fails (and then so is the main step's
///   resource), or its success status when the last step succeeds — also when the last
///   step is the one that failed (TRE reports success there; DESIGN §6);
/// - the step's resource gets the status as `deploymentStatus`, and on a success the
///   outputs merged into its properties (reference §6.5);
/// - after a successful step that is not the last, the next step's resource is patched
///   ([`update_resource_for_step`]) and its resource request written to the outbox
///   (correlation id = operation id, session id = resource id); if that fails, the next
///   step is `updating_failed` and the operation failed.
///
/// Settlement (DESIGN §6): a malformed message is dead-lettered with reason
/// `MessageFormatIncorrect`, a step the operation lacks with `UnknownStep`; a missing
/// operation or resource completes with TRE's log line; a database outage retries with
/// [`RetryCause::Dependency`](steward_core::RetryCause::Dependency) and
/// [`probe`](Handler::probe) pings the database.
///
/// Replays are no-ops (DESIGN §5): a status the step already has (for a success, when
/// the next step's request was already written) completes without writes, and an
/// in-progress status for a step that is already final is logged and not applied.
#[derive(Debug, Clone)]
pub struct DeploymentStatusHandler {
    store: Store,
    templates: Arc<TemplateRegistry>,
    queue: String,
    resource_request_queue: String,
}

/// What handling one status update came to.
#[derive(Debug)]
enum Handled {
    /// Written and committed.
    Applied { next: Option<NextStep> },
    /// The step already has this status (and the pipeline moved on): nothing written.
    Replay,
    /// A non-final status for a step that is already final: not applied.
    Stale { current: Status },
    /// The operation does not exist.
    OperationNotFound,
    /// A resource the update must change does not exist.
    ResourceNotFound,
    /// The operation has no step with this id acting on this resource.
    UnknownStep,
    /// A `boolean` output holds a list or an object.
    BadOutputs(OutputError),
}

/// What became of the next step of a pipeline.
#[derive(Debug)]
enum NextStep {
    /// Its resource request is in the outbox.
    Requested { template_step_id: String, action: String, message_id: String },
    /// Preparing it failed; it is `updating_failed` and the operation failed.
    Failed { template_step_id: String, error: OperationError },
}

/// Why a transaction stopped early.
enum Stop {
    /// With a decision; nothing is committed.
    Handled(Handled),
    /// With a database error; nothing is committed.
    Store(StoreError),
}

impl From<StoreError> for Stop {
    fn from(error: StoreError) -> Self {
        Stop::Store(error)
    }
}

impl DeploymentStatusHandler {
    /// A handler on `store`, reading templates from `templates`, logging queue
    /// [`queues::DEPLOYMENT_STATUS`] and writing next-step requests for queue
    /// [`queues::RESOURCE_REQUEST`].
    #[must_use]
    pub fn new(store: Store, templates: Arc<TemplateRegistry>) -> Self {
        DeploymentStatusHandler {
            store,
            templates,
            queue: queues::DEPLOYMENT_STATUS.to_owned(),
            resource_request_queue: queues::RESOURCE_REQUEST.to_owned(),
        }
    }

    /// The queue this handler consumes, for the `queue` field of its log lines.
    #[must_use]
    pub fn with_queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// The queue next-step resource requests are written for
    /// (`SERVICE_BUS_RESOURCE_REQUEST_QUEUE`).
    #[must_use]
    pub fn with_resource_request_queue(mut self, queue: impl Into<String>) -> Self {
        self.resource_request_queue = queue.into();
        self
    }

    /// Runs one update in a transaction of its own.
    async fn apply(&self, update: &DeploymentStatusUpdate) -> Result<Handled, StoreError> {
        match self.try_apply(update).await {
            Ok(handled) | Err(Stop::Handled(handled)) => Ok(handled),
            Err(Stop::Store(error)) => Err(error),
        }
    }

    async fn try_apply(&self, update: &DeploymentStatusUpdate) -> Result<Handled, Stop> {
        let operation_id = update.operation_id.to_string();
        let resource_id = update.id.to_string();
        let mut tx = self.store.begin().await?;
        let mut operation = match tx.read().operation(&operation_id).await {
            Err(error) if error.is_not_found() => return Ok(Handled::OperationNotFound),
            other => other?,
        };
        let Some(index) = operation.step_index(&update.step_id, &resource_id) else {
            return Ok(Handled::UnknownStep);
        };
        let steps = operation.steps();
        let is_last = index + 1 == steps.len();
        let current = steps[index].status;
        if current == Some(update.status)
            && (!update.status.is_success() || is_last || is_dispatched(&steps[index + 1]))
        {
            return Ok(Handled::Replay);
        }
        if let Some(current) = current
            && current.is_terminal()
            && !update.status.is_terminal()
        {
            return Ok(Handled::Stale { current });
        }
        // Outputs become properties only on success (reference §6.5).
        let outputs = if update.status.is_success() {
            match outputs_to_properties(&update.outputs) {
                Ok(properties) => Some(properties),
                Err(error) => return Ok(Handled::BadOutputs(error)),
            }
        } else {
            None
        };

        let now = tx.now();
        if let Some(step) = step_mut(&mut operation, index) {
            step.status = Some(update.status);
            step.message = Some(update.message.clone());
            step.updated_when = Some(now);
        }
        if let Some((main_id, status)) = update_overall_status(&mut operation, index, is_last, now)
        {
            set_resource_status(&mut tx, &operation, &main_id, status, None).await?;
        }
        set_resource_status(&mut tx, &operation, &resource_id, update.status, outputs.as_ref())
            .await?;
        let next = if update.status.is_success() && !is_last {
            Some(self.advance(&mut tx, &mut operation, index + 1, now).await?)
        } else {
            None
        };
        tx.replace_operation(&operation).await?;
        tx.commit().await?;
        Ok(Handled::Applied { next })
    }

    /// Prepares and queues step `index` (TRE's next-step block of §6.3); a failure marks
    /// the step `updating_failed` and the operation failed, undoing whatever the attempt
    /// wrote.
    async fn advance(
        &self,
        tx: &mut Tx,
        operation: &mut Operation,
        index: usize,
        now: f64,
    ) -> Result<NextStep, Stop> {
        let (template_step_id, action) = {
            let step = &operation.steps()[index];
            let action = step.resource_action.clone().unwrap_or_else(|| operation.action.clone());
            (step.template_step_id.clone(), action)
        };
        tx.savepoint(NEXT_STEP_SAVEPOINT).await?;
        match self.request_step(tx, operation, index).await {
            Ok(message_id) => {
                tx.release_savepoint(NEXT_STEP_SAVEPOINT).await?;
                if let Some(step) = step_mut(operation, index) {
                    step.resource_request_message_id = Some(message_id.clone());
                }
                Ok(NextStep::Requested { template_step_id, action, message_id })
            }
            // The database failing is not the step's fault: retry the whole message.
            Err(OperationError::Store(error))
                if !(error.is_not_found() || error.is_etag_mismatch()) =>
            {
                Err(Stop::Store(error))
            }
            Err(error) => {
                tx.rollback_to_savepoint(NEXT_STEP_SAVEPOINT).await?;
                if let Some(step) = step_mut(operation, index) {
                    step.message = Some(error_chain(&error));
                    step.status = Some(Status::UpdatingFailed);
                    step.updated_when = Some(now);
                }
                if let Some((main_id, status)) = update_overall_status(operation, index, false, now)
                {
                    set_resource_status(tx, operation, &main_id, status, None).await?;
                }
                Ok(NextStep::Failed { template_step_id, error })
            }
        }
    }

    /// Patches step `index`'s resource for the step and writes its resource request to
    /// the outbox; returns the request's message id.
    async fn request_step(
        &self,
        tx: &mut Tx,
        operation: &Operation,
        index: usize,
    ) -> Result<String, OperationError> {
        let step = &operation.steps()[index];
        let incomplete = |field| OperationError::IncompleteStep { step_id: step.id.clone(), field };
        let source_id = step
            .source_template_resource_id
            .as_deref()
            .ok_or(incomplete("sourceTemplateResourceId"))?;
        let target_id = step.resource_id.as_deref().ok_or(incomplete("resourceId"))?;
        let parent = tx.read().resource(source_id).await?;
        let to_send = update_resource_for_step(
            tx,
            &self.templates,
            StepUpdate {
                step,
                root_resource: None,
                step_resource: Some(&parent),
                resource_to_update_id: target_id,
                primary_action: &operation.action,
                user: &operation.user,
            },
        )
        .await?;
        let message =
            resource_request_message(&self.resource_request_queue, &to_send, operation, step)?;
        Ok(tx.insert_outbox_message(message).await?)
    }

    /// The outcome of a handled update, logged.
    fn settle(
        &self,
        message: &Message,
        update: &DeploymentStatusUpdate,
        handled: Handled,
    ) -> Outcome {
        let operation_id = update.operation_id.to_string();
        let resource_id = update.id.to_string();
        let span = tracing::info_span!(
            "deployment_status",
            queue = %self.queue,
            message_id = %message.id,
            operation_id = %operation_id,
            step_id = %update.step_id,
            resource_id = %resource_id,
            status = %update.status,
        );
        let _entered = span.enter();
        let (result, outcome) = match handled {
            Handled::Applied { next } => {
                match next {
                    Some(NextStep::Requested { template_step_id, action, message_id }) => {
                        // TRE log string: verbatim
                        tracing::info!(
                            next_step_message_id = %message_id,
                            "{}",
                            tre::sending_next_step(&template_step_id, &action)
                        );
                    }
                    Some(NextStep::Failed { template_step_id, error }) => {
                        // TRE log string: verbatim
                        tracing::error!(
                            next_step = %template_step_id,
                            error = %error_chain(&error),
                            "{}",
                            tre::UNABLE_TO_SEND_PIPELINE_STEP
                        );
                    }
                    None => {}
                }
                // TRE log string: verbatim
                tracing::info!(
                    "{}",
                    tre::update_status_in_db(&operation_id, update.status.as_str())
                );
                ("applied", Outcome::Complete)
            }
            Handled::Replay => {
                tracing::info!("the step already has this status; nothing to do (replay)");
                ("replay", Outcome::Complete)
            }
            Handled::Stale { current } => {
                tracing::warn!(
                    current_status = %current,
                    "a non-final status for a step that is already final; not applied"
                );
                ("stale", Outcome::Complete)
            }
            Handled::OperationNotFound | Handled::ResourceNotFound => {
                let missing = if matches!(handled, Handled::OperationNotFound) {
                    "operation"
                } else {
                    "resource"
                };
                // TRE log string: verbatim
                tracing::error!(missing, "{}", tre::deployment_status_id_not_found(&resource_id));
                ("not_found", Outcome::Complete)
            }
            Handled::UnknownStep => {
                let description = format!(
                    "operation {operation_id} has no step {} acting on resource {resource_id}",
                    update.step_id
                );
                // TRE log string: verbatim
                tracing::error!(
                    reason = reason::UNKNOWN_STEP,
                    error = %description,
                    "{}",
                    tre::FAILED_TO_UPDATE_STATUS
                );
                ("unknown_step", Outcome::dead_letter(reason::UNKNOWN_STEP, description))
            }
            Handled::BadOutputs(error) => {
                let description = error_chain(&error);
                // TRE log string: verbatim
                tracing::error!(
                    reason = reason::MESSAGE_FORMAT_INCORRECT,
                    error = %description,
                    "{}",
                    tre::FAILED_TO_UPDATE_STATUS
                );
                (
                    "bad_outputs",
                    Outcome::dead_letter(
                        reason::MESSAGE_FORMAT_INCORRECT,
                        format!("{}: {description}", tre::FAILED_TO_UPDATE_STATUS),
                    ),
                )
            }
        };
        metrics::counter!("steward_status_updates_total", "handler" => "deployment_status", "result" => result)
            .increment(1);
        outcome
    }

    /// The outcome of a database failure, logged.
    fn failed(
        &self,
        message: &Message,
        update: &DeploymentStatusUpdate,
        error: &StoreError,
    ) -> Outcome {
        let chain = error_chain(error);
        // TRE log string: verbatim
        tracing::error!(
            queue = %self.queue,
            message_id = %message.id,
            operation_id = %update.operation_id,
            step_id = %update.step_id,
            resource_id = %update.id,
            error = %chain,
            "{}",
            tre::FAILED_TO_UPDATE_STATUS
        );
        if error.is_unavailable() {
            // DESIGN §6: no hot loop; the worker pauses until the database answers.
            Outcome::dependency_failed(chain)
        } else {
            Outcome::retry(chain)
        }
    }
}

#[async_trait]
impl Handler for DeploymentStatusHandler {
    async fn handle(&self, message: Arc<Message>) -> Outcome {
        let update = match parse_message(
            &self.queue,
            &message,
            tre::DEPLOYMENT_STATUS_MESSAGE_FORMAT_INCORRECT,
            parse_deployment_status,
        ) {
            Ok(update) => update,
            Err(dead_letter) => return dead_letter,
        };
        // TRE log string: verbatim
        tracing::info!(
            queue = %self.queue,
            message_id = %message.id,
            operation_id = %update.operation_id,
            "{}",
            tre::received_and_parsed(correlation_id(&message))
        );
        let mut attempt = 1;
        loop {
            match self.apply(&update).await {
                Ok(handled) => return self.settle(&message, &update, handled),
                Err(error) if is_conflict(&error) && attempt < CONFLICT_ATTEMPTS => {
                    attempt += 1;
                    tracing::debug!(
                        queue = %self.queue,
                        message_id = %message.id,
                        operation_id = %update.operation_id,
                        attempt,
                        error = %error_chain(&error),
                        "the operation changed meanwhile; handling the update again"
                    );
                }
                Err(error) => return self.failed(&message, &update, &error),
            }
        }
    }

    async fn probe(&self) -> Result<(), BoxError> {
        self.store.ping().await.map_err(Into::into)
    }
}

/// A compare-and-swap lost to another writer, or a transaction aborted by an earlier
/// error: running the whole transaction again may succeed.
fn is_conflict(error: &StoreError) -> bool {
    error.is_etag_mismatch() || matches!(error, StoreError::Aborted { .. })
}

/// Whether the next step of a pipeline was already dispatched: its request is in the
/// outbox (or was published), or it moved past its queued status.
fn is_dispatched(next: &OperationStep) -> bool {
    next.is_requested() || next.status.is_some_and(|status| !status.is_awaiting())
}

fn step_mut(operation: &mut Operation, index: usize) -> Option<&mut OperationStep> {
    operation.steps.as_mut().and_then(|steps| steps.get_mut(index))
}

/// TRE's `update_overall_operation_status` (reference §6.4) with the last-step bug
/// fixed (DESIGN §6): the operation's status and message after step `index` changed.
/// Returns the main step's resource and the status it must get when a step failed.
fn update_overall_status(
    operation: &mut Operation,
    index: usize,
    is_last: bool,
    now: f64,
) -> Option<(String, Status)> {
    operation.updated_when = now;
    let steps = operation.steps();
    let step = steps.get(index)?;
    if steps.len() == 1 {
        let (status, message) = (step.status, step.message.clone().unwrap_or_default());
        if let Some(status) = status {
            operation.status = status;
        }
        operation.message = message;
        return None;
    }
    let (failed, succeeded) = (step.is_failure(), step.is_success());
    let template_step_id = step.template_step_id.clone();
    let main_resource = steps.iter().find(|s| s.is_main()).and_then(|s| s.resource_id.clone());
    if failed {
        operation.status = Status::failed(&operation.action);
        operation.message = tre::pipeline_failed(&template_step_id);
        return main_resource.map(|id| (id, operation.status));
    }
    if succeeded && is_last {
        operation.status = Status::succeeded(&operation.action);
        operation.message = tre::PIPELINE_COMPLETED.to_owned();
    } else {
        operation.status = Status::PipelineRunning;
        operation.message = tre::PIPELINE_RUNNING.to_owned();
    }
    None
}

/// Sets a resource's `deploymentStatus` for `operation` and merges `outputs` into its
/// properties, unless a newer operation already wrote its status
/// ([`Tx::set_resource_status`]); that is logged and the update goes on without it.
async fn set_resource_status(
    tx: &mut Tx,
    operation: &Operation,
    id: &str,
    status: Status,
    outputs: Option<&Properties>,
) -> Result<(), Stop> {
    match tx.set_resource_status(id, status, outputs, millis(operation.created_when)).await {
        Ok(StatusWrite::Written) => Ok(()),
        Ok(StatusWrite::Superseded { by_operation_created_at }) => {
            tracing::warn!(
                resource_id = id,
                operation_id = %operation.id,
                status = %status,
                newer_operation_created_at = by_operation_created_at,
                "a newer operation wrote this resource's status; not overwritten"
            );
            Ok(())
        }
        Err(error) if error.is_not_found() => Err(Stop::Handled(Handled::ResourceNotFound)),
        Err(error) => Err(error.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::MAIN_STEP_ID;

    fn step(template_step_id: &str, resource: &str, status: Status) -> OperationStep {
        OperationStep {
            id: format!("id-{template_step_id}"),
            template_step_id: template_step_id.to_owned(),
            step_title: None,
            resource_id: Some(resource.to_owned()),
            resource_template_name: None,
            resource_type: None,
            resource_action: None,
            status: Some(status),
            message: Some(format!("{template_step_id} message")),
            updated_when: None,
            source_template_resource_id: None,
            resource_request_message_id: None,
        }
    }

    fn operation(action: &str, steps: Vec<OperationStep>) -> Operation {
        Operation {
            id: "op".to_owned(),
            resource_id: "main".to_owned(),
            resource_path: "/p".to_owned(),
            resource_version: 0,
            status: Status::awaiting(action),
            action: action.to_owned(),
            message: String::new(),
            created_when: 0.0,
            updated_when: 0.0,
            user: crate::domain::User::default(),
            steps: Some(steps),
            etag: String::new(),
        }
    }

    /// Ensures that the overall status follows reference §6.4 for every kind of step
    /// result, with the last-step failure reported as a failure (DESIGN §6).
    #[test]
    fn overall_status_follows_tre_with_the_last_step_bug_fixed() {
        let single = |status| {
            let mut op = operation("install", vec![step(MAIN_STEP_ID, "main", status)]);
            let main = update_overall_status(&mut op, 0, true, 5.0);
            (op, main)
        };
        let (op, main) = single(Status::Deploying);
        assert_eq!(
            (op.status, op.message.as_str(), op.updated_when),
            (Status::Deploying, "main message", 5.0)
        );
        assert_eq!(main, None);
        let (op, _) = single(Status::DeploymentFailed);
        assert_eq!(op.status, Status::DeploymentFailed);

        let pipeline = |statuses: [Status; 3], index: usize, action: &str| {
            let mut op = operation(
                action,
                vec![
                    step("pre-step-1", "fw", statuses[0]),
                    step(MAIN_STEP_ID, "main", statuses[1]),
                    step("post-step-1", "fw", statuses[2]),
                ],
            );
            let main = update_overall_status(&mut op, index, index == 2, 1.0);
            (op, main)
        };
        use Status::*;
        let (op, main) = pipeline([Updated, AwaitingDeployment, AwaitingUpdate], 0, "install");
        assert_eq!((op.status, op.message.as_str()), (PipelineRunning, tre::PIPELINE_RUNNING));
        assert_eq!(main, None);
        let (op, _) = pipeline([Updated, Deployed, Updated], 2, "install");
        assert_eq!((op.status, op.message.as_str()), (Deployed, tre::PIPELINE_COMPLETED));
        let (op, main) = pipeline([Updated, Deployed, UpdatingFailed], 2, "install");
        assert_eq!(op.status, DeploymentFailed, "a failing last step fails the operation");
        assert_eq!(op.message, "Multi step pipeline failed on step post-step-1");
        assert_eq!(main, Some(("main".to_owned(), DeploymentFailed)));
        let (op, main) =
            pipeline([UpdatingFailed, AwaitingDeletion, AwaitingUpdate], 0, "uninstall");
        assert_eq!(op.status, DeletingFailed);
        assert_eq!(main, Some(("main".to_owned(), DeletingFailed)));
        let (op, _) = pipeline([Updated, ActionSucceeded, Updated], 2, "start");
        assert_eq!(op.status, ActionSucceeded);
    }

    #[test]
    fn a_next_step_counts_as_dispatched_once_requested_or_moved_on() {
        let mut next = step("post-step-1", "fw", Status::AwaitingUpdate);
        assert!(!is_dispatched(&next));
        next.resource_request_message_id = Some("7".to_owned());
        assert!(is_dispatched(&next));
        next.resource_request_message_id = None;
        next.status = Some(Status::UpdatingFailed);
        assert!(is_dispatched(&next));
        next.status = None;
        assert!(!is_dispatched(&next));
    }
}
