//! The airlock status updater (reference §7.3, DESIGN §5–6): the airlock processor's
//! step results move a request on, or update its files, and announce status changes
//! through the outbox.

use std::sync::Arc;

use async_trait::async_trait;
use steward_core::{BoxError, Handler, Message, Outcome, error_chain};

use super::recipients::{RecipientError, RecipientProvider, RecipientsByRole};
use super::{CONFLICT_ATTEMPTS, MessageFormatError, parse_json, parse_message, reason, tre};
use crate::domain::{AirlockRequest, AirlockRequestStatus, StepResultEvent, queues};
use crate::opaque::Opaque;
use crate::rules::airlock::{self, AirlockError, AirlockQueues, AirlockUpdate};
use crate::storage::{Store, StoreError};

/// A parsed airlock step result: the event and its statuses.
#[derive(Debug, Clone, PartialEq)]
pub struct StepResult {
    /// The event as received.
    pub event: StepResultEvent,
    /// The status the request must be in (`data.completed_step`).
    pub completed_step: AirlockRequestStatus,
    /// The status to move to (`data.new_status`); `None` for a files-only result.
    pub new_status: Option<AirlockRequestStatus>,
}

impl StepResult {
    /// The airlock request the result is about (`data.request_id`).
    #[must_use]
    pub fn request_id(&self) -> &str {
        &self.event.data.request_id
    }
}

/// Parses an airlock step result body (reference §4.3): an Event Grid event with `id`
/// a version-4 UUID, `subject`, `eventType`, `eventTime`, `topic` and `data` whose
/// `completed_step` (and `new_status`, when present and not empty) are airlock request
/// statuses; unknown fields are ignored.
///
/// # Errors
///
/// The body is not UTF-8 JSON fitting that schema; the handler dead-letters such a
/// message with reason `MessageFormatIncorrect`.
pub fn parse_step_result(body: &[u8]) -> Result<StepResult, MessageFormatError> {
    let event: StepResultEvent = parse_json(body)?;
    let completed_step = event.data.completed_status().map_err(|source| {
        MessageFormatError::InvalidField { field: "data.completed_step", source }
    })?;
    let new_status = event
        .data
        .new_status()
        .map_err(|source| MessageFormatError::InvalidField { field: "data.new_status", source })?;
    Ok(StepResult { event, completed_step, new_status })
}

/// Handles the airlock processor's step results (queue `airlock-step-result`).
///
/// A result applies when the request is in `completed_step` (reference §7.3): the
/// status moves to `new_status` (checked against the transition table), files and
/// status message are replaced when given, a history item is added, and — when the
/// status changed — `statusChanged` v2.0 and `airlockNotification` v4.0 are written to
/// the outbox in the same transaction. The notification's workspace comes from the
/// workspace resource, its recipients from the [`RecipientProvider`].
///
/// Settlement (DESIGN §5–6):
/// - malformed → dead-letter `MessageFormatIncorrect`; an illegal transition →
///   dead-letter `IllegalStatusTransition`; a missing request → complete with TRE's log
///   line;
/// - the request already moved from `completed_step` to `new_status` → a replay:
///   complete, no new event; a files-only result that changes nothing → complete;
/// - a files-only result applies when `completed_step` is the current status or one
///   the request had before (so it survives racing the `in_review` result);
/// - otherwise a status mismatch is an ordering race: retry with backoff (dead-lettered
///   after the worker's delivery limit);
/// - a database or directory outage → retry with
///   [`RetryCause::Dependency`](steward_core::RetryCause::Dependency); [`probe`](Handler::probe)
///   pings the database and the recipient provider.
#[derive(Clone, Debug)]
pub struct AirlockStatusHandler {
    store: Store,
    queues: AirlockQueues,
    recipients: Opaque<Arc<dyn RecipientProvider>>,
    queue: String,
}

/// What a step result means for a request in its current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    /// Apply it.
    Apply,
    /// Already applied (or changes nothing): complete without writing.
    Replay,
    /// The transition table forbids it.
    Illegal,
    /// The request is not (and never was) where the result expects it: an ordering race.
    Mismatch,
}

/// What handling one step result came to.
#[derive(Debug)]
enum Handled {
    Applied { previous: AirlockRequestStatus, updated: Box<AirlockRequest> },
    Decided { decision: Decision, current: AirlockRequestStatus },
    NotFound,
}

/// Why handling a step result failed.
#[derive(Debug)]
enum Failure {
    Store(StoreError),
    Airlock(AirlockError),
    Recipients(RecipientError),
    WorkspaceNotFound { id: String },
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Self {
        Failure::Store(error)
    }
}

impl Failure {
    fn store_error(&self) -> Option<&StoreError> {
        match self {
            Failure::Store(error) | Failure::Airlock(AirlockError::Store(error)) => Some(error),
            _ => None,
        }
    }

    /// Whether running the whole transaction again may succeed: another writer changed
    /// the request between the decision and the write (so the decision must be made
    /// again: a duplicate delivery then turns out to be a replay), or PostgreSQL aborted
    /// the transaction.
    fn is_conflict(&self) -> bool {
        matches!(self, Failure::Airlock(AirlockError::IllegalStatusChange { .. }))
            || self.store_error().is_some_and(|error| {
                error.is_etag_mismatch() || matches!(error, StoreError::Aborted { .. })
            })
    }

    fn chain(&self) -> String {
        match self {
            Failure::Store(error) => error_chain(error),
            Failure::Airlock(error) => error_chain(error),
            Failure::Recipients(error) => error_chain(error),
            Failure::WorkspaceNotFound { id } => format!("workspace {id} does not exist"),
        }
    }
}

impl AirlockStatusHandler {
    /// A handler on `store`, taking notification recipients from `recipients`, logging
    /// queue [`queues::STEP_RESULT`] and writing events for the default [`AirlockQueues`].
    #[must_use]
    pub fn new(store: Store, recipients: Arc<dyn RecipientProvider>) -> Self {
        AirlockStatusHandler {
            store,
            queues: AirlockQueues::default(),
            recipients: Opaque(recipients),
            queue: queues::STEP_RESULT.to_owned(),
        }
    }

    /// The queue this handler consumes, for the `queue` field of its log lines.
    #[must_use]
    pub fn with_queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// Where `statusChanged` and `airlockNotification` events are written for.
    #[must_use]
    pub fn with_airlock_queues(mut self, queues: AirlockQueues) -> Self {
        self.queues = queues;
        self
    }

    async fn apply(&self, result: &StepResult) -> Result<Handled, Failure> {
        let request_id = result.request_id();
        // Decide on a read outside the transaction first, so the recipient lookup (a
        // remote call in a directory-backed provider) never holds the write transaction.
        let request = match self.store.read().airlock_request(request_id).await {
            Err(error) if error.is_not_found() => return Ok(Handled::NotFound),
            other => other?,
        };
        let decision = decide(&request, result);
        if decision != Decision::Apply {
            return Ok(Handled::Decided { decision, current: request.status });
        }
        let recipients = match result.new_status {
            Some(_) => self.recipients_of(&request.workspace_id).await?,
            None => RecipientsByRole::new(),
        };

        let mut tx = self.store.begin().await?;
        let request = match tx.read().airlock_request(request_id).await {
            Err(error) if error.is_not_found() => return Ok(Handled::NotFound),
            other => other?,
        };
        let decision = decide(&request, result);
        if decision != Decision::Apply {
            return Ok(Handled::Decided { decision, current: request.status });
        }
        let update = AirlockUpdate {
            new_status: result.new_status,
            request_files: result.event.data.request_files.clone(),
            status_message: result.event.data.status_message.clone(),
            ..AirlockUpdate::default()
        };
        // TRE keeps the last human actor: the updater passes the request's own updatedBy.
        let updated_by = request.updated_by.clone();
        let updated = airlock::update_and_publish(
            &mut tx,
            &self.queues,
            &request,
            &updated_by,
            update,
            recipients,
        )
        .await
        .map_err(Failure::Airlock)?;
        tx.commit().await?;
        Ok(Handled::Applied { previous: request.status, updated: Box::new(updated) })
    }

    async fn recipients_of(&self, workspace_id: &str) -> Result<RecipientsByRole, Failure> {
        let workspace = match self.store.read().resource(workspace_id).await {
            Err(error) if error.is_not_found() => {
                return Err(Failure::WorkspaceNotFound { id: workspace_id.to_owned() });
            }
            other => other?,
        };
        self.recipients.recipient_emails_by_role(&workspace).await.map_err(Failure::Recipients)
    }

    fn settle(&self, result: &StepResult, handled: Handled) -> Outcome {
        let request_id = result.request_id();
        let completed = result.completed_step.as_str();
        let new_status = result.new_status.map_or("None", AirlockRequestStatus::as_str);
        let (label, outcome) = match handled {
            Handled::Applied { previous, updated } => {
                tracing::info!(
                    previous_status = %previous,
                    status = %updated.status,
                    files = updated.files.len(),
                    "airlock step result applied"
                );
                ("applied", Outcome::Complete)
            }
            Handled::NotFound => {
                // TRE log string: verbatim
                tracing::error!("{}", tre::step_result_id_not_found(request_id));
                ("not_found", Outcome::Complete)
            }
            Handled::Decided { decision: Decision::Replay, current } => {
                tracing::info!(
                    current_status = %current,
                    "the request already reflects this step result; nothing to do (replay)"
                );
                ("replay", Outcome::Complete)
            }
            Handled::Decided { decision: Decision::Illegal, .. } => {
                let text = tre::step_result_invalid_status(request_id, completed, new_status);
                // TRE log string: verbatim
                tracing::error!(reason = reason::ILLEGAL_STATUS_TRANSITION, "{text}");
                ("illegal", Outcome::dead_letter(reason::ILLEGAL_STATUS_TRANSITION, text))
            }
            Handled::Decided { decision: Decision::Mismatch | Decision::Apply, current } => {
                let text =
                    tre::step_result_status_does_not_match(request_id, completed, current.as_str());
                // TRE log string: verbatim
                tracing::error!("{text}");
                // DESIGN §6: an ordering race, retried with backoff (TRE abandons at once).
                ("mismatch", Outcome::retry(text))
            }
        };
        metrics::counter!("steward_status_updates_total", "handler" => "airlock_status", "result" => label)
            .increment(1);
        outcome
    }

    fn failed(&self, result: &StepResult, failure: &Failure) -> Outcome {
        let chain = failure.chain();
        match failure {
            Failure::Airlock(AirlockError::IllegalStatusChange { .. }) => {
                // Lost every race between the decision and the write.
                let new_status = result.new_status.map_or("None", AirlockRequestStatus::as_str);
                let text = tre::step_result_invalid_status(
                    result.request_id(),
                    result.completed_step.as_str(),
                    new_status,
                );
                // TRE log string: verbatim
                tracing::error!(reason = reason::ILLEGAL_STATUS_TRANSITION, error = %chain, "{text}");
                Outcome::dead_letter(reason::ILLEGAL_STATUS_TRANSITION, text)
            }
            Failure::Airlock(error) if error.is_not_found() => {
                // TRE log string: verbatim
                tracing::error!("{}", tre::step_result_id_not_found(result.request_id()));
                Outcome::Complete
            }
            Failure::Recipients(_) => {
                // TRE answers a directory failure with a 503, logged as this string.
                // TRE log string: verbatim
                tracing::error!(error = %chain, "{}", tre::STATE_STORE_ENDPOINT_NOT_RESPONDING);
                Outcome::dependency_failed(chain)
            }
            _ if failure.store_error().is_some_and(StoreError::is_unavailable) => {
                // TRE log string: verbatim
                tracing::error!(error = %chain, "{}", tre::STATE_STORE_ENDPOINT_NOT_RESPONDING);
                Outcome::dependency_failed(chain)
            }
            _ => {
                // TRE log string: verbatim
                tracing::error!(error = %chain, "{}", tre::FAILED_UPDATING_REQUEST_STATUS);
                Outcome::retry(chain)
            }
        }
    }
}

#[async_trait]
impl Handler for AirlockStatusHandler {
    async fn handle(&self, message: Arc<Message>) -> Outcome {
        let result = match parse_message(
            &self.queue,
            &message,
            tre::STEP_RESULT_MESSAGE_FORMAT_INCORRECT,
            parse_step_result,
        ) {
            Ok(result) => result,
            Err(dead_letter) => return dead_letter,
        };
        let span = tracing::info_span!(
            "airlock_status",
            queue = %self.queue,
            message_id = %message.id,
            airlock_request_id = %result.request_id(),
            event_id = %result.event.id,
            completed_step = %result.completed_step,
            new_status = result.new_status.map(AirlockRequestStatus::as_str),
        );
        let mut attempt = 1;
        loop {
            let applied = tracing::Instrument::instrument(self.apply(&result), span.clone()).await;
            let _entered = span.enter();
            match applied {
                Ok(handled) => return self.settle(&result, handled),
                Err(failure) if failure.is_conflict() && attempt < CONFLICT_ATTEMPTS => {
                    attempt += 1;
                    tracing::debug!(
                        attempt,
                        error = %failure.chain(),
                        "the request changed meanwhile; handling the result again"
                    );
                }
                Err(failure) => return self.failed(&result, &failure),
            }
        }
    }

    async fn probe(&self) -> Result<(), BoxError> {
        self.store.ping().await?;
        self.recipients.probe().await
    }
}

/// What `result` means for `request` (DESIGN §5–6).
fn decide(request: &AirlockRequest, result: &StepResult) -> Decision {
    let completed = result.completed_step;
    match result.new_status {
        Some(new_status) => {
            if request.status == completed {
                if completed.can_change_to(new_status) {
                    Decision::Apply
                } else {
                    Decision::Illegal
                }
            } else if has_moved(request, completed, new_status) {
                Decision::Replay
            } else if !completed.can_change_to(new_status) {
                // It could never apply, whatever the request's status becomes.
                Decision::Illegal
            } else {
                Decision::Mismatch
            }
        }
        None => {
            if request.status != completed && !was_in(request, completed) {
                Decision::Mismatch
            } else if changes_nothing(request, result) {
                Decision::Replay
            } else {
                Decision::Apply
            }
        }
    }
}

/// The statuses the request went through, oldest first, ending with the current one
/// (`None` where a history item has no readable `previousStatus`).
fn status_trail(request: &AirlockRequest) -> Vec<Option<AirlockRequestStatus>> {
    let mut trail: Vec<Option<AirlockRequestStatus>> = request
        .history
        .iter()
        .map(|item| {
            item.properties
                .get("previousStatus")
                .and_then(|status| status.as_str())
                .and_then(|status| status.parse().ok())
        })
        .collect();
    trail.push(Some(request.status));
    trail
}

/// Whether the request once moved from `from` straight to `to`.
fn has_moved(
    request: &AirlockRequest,
    from: AirlockRequestStatus,
    to: AirlockRequestStatus,
) -> bool {
    status_trail(request).windows(2).any(|pair| pair[0] == Some(from) && pair[1] == Some(to))
}

/// Whether the request is, or once was, in `status`.
fn was_in(request: &AirlockRequest, status: AirlockRequestStatus) -> bool {
    status_trail(request).contains(&Some(status))
}

/// Whether a files-only result would leave the request as it is.
fn changes_nothing(request: &AirlockRequest, result: &StepResult) -> bool {
    let data = &result.event.data;
    data.request_files.as_ref().is_none_or(|files| *files == request.files)
        && data
            .status_message
            .as_ref()
            .is_none_or(|message| request.status_message.as_ref() == Some(message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(status: &str, trail: &[&str]) -> AirlockRequest {
        let history: Vec<_> = trail
            .iter()
            .enumerate()
            .map(|(version, previous)| {
                json!({"resourceVersion": version, "updatedWhen": 1.0, "properties": {"previousStatus": previous}})
            })
            .collect();
        serde_json::from_value(json!({
            "id": "r1", "status": status, "history": history,
            "files": [{"name": "a.csv", "size": 1}], "statusMessage": "scanned"
        }))
        .unwrap()
    }

    fn result(
        completed: &str,
        new_status: Option<&str>,
        files: Option<serde_json::Value>,
    ) -> StepResult {
        let mut data = json!({"completed_step": completed, "request_id": "r1"});
        if let Some(new_status) = new_status {
            data["new_status"] = json!(new_status);
        }
        if let Some(files) = files {
            data["request_files"] = files;
        }
        let body = json!({
            "id": "2d1f4a6e-0c3b-4a55-9a51-0d6f3a1c9e21", "subject": "r1", "eventType": "Airlock.StepResult",
            "eventTime": "t", "topic": "", "data": data
        });
        parse_step_result(body.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn decisions_follow_design_5_and_6() {
        use Decision::*;
        let submitted = request("submitted", &["draft"]);
        assert_eq!(decide(&submitted, &result("submitted", Some("in_review"), None)), Apply);
        assert_eq!(decide(&submitted, &result("submitted", Some("approved"), None)), Illegal);
        assert_eq!(decide(&submitted, &result("submitted", Some("submitted"), None)), Illegal);
        assert_eq!(
            decide(&submitted, &result("in_review", Some("approval_in_progress"), None)),
            Mismatch
        );
        assert_eq!(decide(&submitted, &result("in_review", Some("approved"), None)), Illegal);
        assert_eq!(decide(&submitted, &result("draft", Some("submitted"), None)), Replay);

        let in_review = request("in_review", &["draft", "submitted"]);
        assert_eq!(decide(&in_review, &result("submitted", Some("in_review"), None)), Replay);
        assert_eq!(
            decide(&in_review, &result("submitted", Some("blocking_in_progress"), None)),
            Mismatch
        );
        let new_files = Some(json!([{"name": "b.csv", "size": 2}]));
        assert_eq!(
            decide(&in_review, &result("submitted", None, new_files.clone())),
            Apply,
            "files after in_review"
        );
        assert_eq!(
            decide(
                &in_review,
                &result("submitted", None, Some(json!([{"name": "a.csv", "size": 1}])))
            ),
            Replay
        );
        assert_eq!(decide(&in_review, &result("approval_in_progress", None, new_files)), Mismatch);

        // A files-only update leaves a history item whose previous status is unchanged.
        let after_files = request("in_review", &["draft", "submitted", "submitted"]);
        assert_eq!(decide(&after_files, &result("submitted", Some("in_review"), None)), Replay);
    }
}
