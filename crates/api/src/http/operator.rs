//! The operator's routes, `TREAdmin` only: pausing, resuming and restarting workers,
//! the dead-letter queues of the consumed queues (count, peek, redrive, purge), and the
//! parked outbox rows (list, retry).
//!
//! Every action that changes something is logged with the caller's identity. Peeking
//! happens only when a caller asks: on some transports it counts as a delivery of each
//! message read (see [`DeadLetterQueues`]).

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRequestParts, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::{Deserialize, Serialize};
use steward_core::{
    ControlError, DeadLetter, DeadLetterQueues, Redrive, TransportError, WorkerControls,
};

use super::auth;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use crate::domain::User;
use crate::http::AppState;
use crate::workers::PAUSABLE;

/// What the operator routes work on, set by the service at start.
#[derive(Clone, Default)]
pub struct OperatorSettings {
    /// The transport's dead-letter queues, where it has them.
    pub dead_letters: Option<Arc<dyn DeadLetterQueues>>,
    /// The queues the service consumes: the only ones whose dead letters the routes
    /// show.
    pub consumed_queues: Vec<String>,
    /// Pauses, resumes and restarts this process's workers.
    pub controls: WorkerControls,
}

impl fmt::Debug for OperatorSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OperatorSettings")
            .field("dead_letters", &self.dead_letters.is_some())
            .field("consumed_queues", &self.consumed_queues)
            .field("controls", &self.controls)
            .finish()
    }
}

/// The caller of an operator route: a `TREAdmin`, or 403.
#[derive(Debug, Clone)]
pub(super) struct Admin(pub User);

impl<S: Send + Sync> FromRequestParts<S> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Caller(user) = Caller::from_request_parts(parts, state).await?;
        if auth::is_admin(&user) {
            Ok(Admin(user))
        } else {
            Err(ApiError::forbidden(format!(
                "{} needs the role {}",
                parts.uri.path(),
                auth::TRE_ADMIN
            )))
        }
    }
}

/// Who did it, for the log: the user's name and id.
fn who(user: &User) -> String {
    if user.name.is_empty() { user.id.clone() } else { format!("{} ({})", user.name, user.id) }
}

/// The answer for a transport error: 404 for a missing queue, 503 while the broker is
/// unreachable, 502 when it refuses.
fn broker_error(what: &str, error: &TransportError) -> ApiError {
    if error.is_not_found() {
        ApiError::not_found(format!("{what}: {error}"))
    } else if error.is_retryable() {
        ApiError::unavailable("the message broker", error)
    } else {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "broker_error",
            format!("{what}: {}", steward_core::error_chain(error)),
        )
    }
}

/// The dead-letter queues, and `queue` if given, checked to be one the service consumes.
fn dead_letters<'s>(
    state: &'s AppState,
    queue: Option<&str>,
) -> Result<&'s Arc<dyn DeadLetterQueues>, ApiError> {
    let operator = &state.settings.operator;
    if let Some(queue) = queue {
        if !operator.consumed_queues.iter().any(|consumed| consumed == queue) {
            return Err(ApiError::not_found(format!(
                "queue {queue} is not one this service consumes"
            )));
        }
    }
    operator.dead_letters.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "not_supported",
            format!(
                "the {} transport has no dead-letter administration; use the broker's own tools",
                state.settings.transport
            ),
        )
    })
}

/// One consumed queue and its dead letters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct DeadLetterQueueCount {
    /// The queue.
    pub queue: String,
    /// How many messages its dead-letter queue holds.
    pub count: u64,
}

/// The body of `GET /api/dead-letters`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct DeadLetterQueueList {
    /// The transport.
    pub transport: String,
    /// Whether reading a dead letter (a peek, and on some transports a count) counts as
    /// a delivery of it, raising its delivery count.
    pub peek_counts_as_delivery: bool,
    /// Each consumed queue, in the service's order.
    pub queues: Vec<DeadLetterQueueCount>,
}

/// Each consumed queue with its dead-letter count.
#[utoipa::path(get, path = "/api/dead-letters", tag = "operator",
    responses((status = 200, body = DeadLetterQueueList), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 501, body = ErrorBody), (status = 502, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn list_dead_letters(
    State(state): State<AppState>,
    Admin(_): Admin,
) -> Result<Json<DeadLetterQueueList>, ApiError> {
    let dlqs = dead_letters(&state, None)?;
    let counts = dlqs
        .counts(&state.settings.operator.consumed_queues)
        .await
        .map_err(|e| broker_error("counting dead letters", &e))?;
    Ok(Json(DeadLetterQueueList {
        transport: state.settings.transport.clone(),
        peek_counts_as_delivery: dlqs.peek_counts_as_delivery(),
        queues: counts
            .into_iter()
            .map(|c| DeadLetterQueueCount { queue: c.queue, count: c.count })
            .collect(),
    }))
}

/// `?limit=` of a peek.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct PeekQuery {
    /// At most this many messages, oldest first (default 20, at most 100).
    pub limit: Option<usize>,
}

/// The default number of messages a peek shows.
pub(super) const DEFAULT_PEEK: usize = 20;
/// The most messages one peek shows.
pub(super) const MAX_PEEK: usize = 100;
/// How much of a body a peek shows.
pub(super) const BODY_PREVIEW_BYTES: usize = 1024;

/// A dead letter as a peek shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct PeekedMessage {
    /// The message id.
    pub id: String,
    /// Why it was dead-lettered.
    pub reason: String,
    /// The description given with the reason.
    pub description: String,
    /// Its delivery count (see `peekCountsAsDelivery`).
    pub delivery_count: u32,
    /// When the broker took it into the dead-letter queue, where it says so (RFC 3339).
    pub enqueued_at: Option<String>,
    /// The session id.
    pub session_id: Option<String>,
    /// The correlation id.
    pub correlation_id: Option<String>,
    /// The content type.
    pub content_type: Option<String>,
    /// Its application properties.
    pub properties: std::collections::BTreeMap<String, String>,
    /// The start of the body, as text (invalid UTF-8 replaced).
    pub body_preview: String,
    /// The body's size in bytes.
    pub body_bytes: usize,
    /// Whether the preview is shorter than the body.
    pub body_truncated: bool,
}

impl From<DeadLetter> for PeekedMessage {
    fn from(dead: DeadLetter) -> Self {
        let message = dead.message;
        let shown = &message.body[..message.body.len().min(BODY_PREVIEW_BYTES)];
        PeekedMessage {
            id: message.id,
            reason: dead.reason,
            description: dead.description,
            delivery_count: message.delivery_count,
            enqueued_at: message.enqueued_at.map(|at| {
                let seconds =
                    at.duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
                crate::domain::rfc3339_utc(seconds)
            }),
            session_id: message.session_id,
            correlation_id: message.correlation_id,
            content_type: message.content_type,
            properties: message.properties,
            body_preview: String::from_utf8_lossy(shown).into_owned(),
            body_bytes: message.body.len(),
            body_truncated: shown.len() < message.body.len(),
        }
    }
}

/// The body of `GET /api/dead-letters/{queue}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct PeekedMessages {
    /// The queue whose dead letters these are.
    pub queue: String,
    /// Whether this peek counted as a delivery of each message shown.
    pub peek_counts_as_delivery: bool,
    /// The first messages of its dead-letter queue, oldest first.
    pub messages: Vec<PeekedMessage>,
}

/// The first messages of a queue's dead-letter queue, oldest first, left where they
/// are and in their order. Peek when needed: on RabbitMQ and Service Bus a peek counts
/// as a delivery of each message read.
#[utoipa::path(get, path = "/api/dead-letters/{queue}", tag = "operator", params(("queue" = String, Path, description = "A consumed queue"), PeekQuery),
    responses((status = 200, body = PeekedMessages), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 501, body = ErrorBody), (status = 502, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn peek_dead_letters(
    State(state): State<AppState>,
    Admin(_): Admin,
    ApiPath(queue): ApiPath<String>,
    ApiQuery(query): ApiQuery<PeekQuery>,
) -> Result<Json<PeekedMessages>, ApiError> {
    let limit = query.limit.unwrap_or(DEFAULT_PEEK);
    if limit == 0 || limit > MAX_PEEK {
        return Err(ApiError::bad_request(format!("limit must be between 1 and {MAX_PEEK}")));
    }
    let dlqs = dead_letters(&state, Some(&queue))?;
    let dead = dlqs
        .peek(&queue, limit)
        .await
        .map_err(|e| broker_error(&format!("peeking the dead letters of {queue}"), &e))?;
    Ok(Json(PeekedMessages {
        queue,
        peek_counts_as_delivery: dlqs.peek_counts_as_delivery(),
        messages: dead.into_iter().map(PeekedMessage::from).collect(),
    }))
}

/// The body of `POST /api/dead-letters/{queue}/redrive`: `{"ids": [...]}` or
/// `{"all": true}`.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"ids": ["3f2a9c"]}))]
pub(super) struct RedriveBody {
    /// The ids of the messages to send back.
    pub ids: Option<Vec<String>>,
    /// `true`: send back every message.
    pub all: Option<bool>,
}

impl RedriveBody {
    fn selection(self) -> Result<Redrive, ApiError> {
        match (self.ids, self.all) {
            (Some(ids), None | Some(false)) if !ids.is_empty() => {
                Ok(Redrive::Ids(ids.into_iter().collect()))
            }
            (None, Some(true)) => Ok(Redrive::All),
            _ => Err(ApiError::bad_request(
                "give either a non-empty \"ids\" list or \"all\": true, not both",
            )),
        }
    }
}

/// The answer of a redrive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub(super) struct Redriven {
    /// How many messages went back to their queue.
    pub redriven: usize,
}

/// Sends chosen dead letters, or all of them, back to their queue: same body and
/// properties, a fresh delivery count, and the property `x-steward-redriven` counting
/// the redrives. Ids not found are ignored.
#[utoipa::path(post, path = "/api/dead-letters/{queue}/redrive", tag = "operator", request_body = RedriveBody,
    params(("queue" = String, Path, description = "A consumed queue")),
    responses((status = 200, body = Redriven), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 501, body = ErrorBody), (status = 502, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn redrive_dead_letters(
    State(state): State<AppState>,
    Admin(caller): Admin,
    ApiPath(queue): ApiPath<String>,
    ApiJson(body): ApiJson<RedriveBody>,
) -> Result<Json<Redriven>, ApiError> {
    let selection = body.selection()?;
    let dlqs = dead_letters(&state, Some(&queue))?;
    let result = dlqs.redrive(&queue, &selection).await;
    let chosen = match &selection {
        Redrive::All => "all".to_owned(),
        Redrive::Ids(ids) => ids.len().to_string(),
    };
    match result {
        Ok(redriven) => {
            tracing::info!(queue = %queue, chosen = %chosen, redriven, by = %who(&caller), "dead letters redriven");
            Ok(Json(Redriven { redriven }))
        }
        Err(error) => {
            tracing::warn!(queue = %queue, chosen = %chosen, by = %who(&caller), error = %steward_core::error_chain(&error), "redrive failed");
            Err(broker_error(&format!("redriving the dead letters of {queue}"), &error))
        }
    }
}

/// The answer of a purge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub(super) struct Purged {
    /// How many messages were removed.
    pub purged: usize,
}

/// Removes one dead letter for good; 404 when the dead-letter queue holds no message
/// with that id (or another consumer holds it at the moment).
#[utoipa::path(delete, path = "/api/dead-letters/{queue}/messages/{id}", tag = "operator",
    params(("queue" = String, Path, description = "A consumed queue"), ("id" = String, Path, description = "The message id")),
    responses((status = 200, body = Purged), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 501, body = ErrorBody), (status = 502, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn purge_dead_letter(
    State(state): State<AppState>,
    Admin(caller): Admin,
    ApiPath((queue, id)): ApiPath<(String, String)>,
) -> Result<Json<Purged>, ApiError> {
    let dlqs = dead_letters(&state, Some(&queue))?;
    let ids = BTreeSet::from([id.clone()]);
    let purged = dlqs
        .purge(&queue, &ids)
        .await
        .map_err(|e| broker_error(&format!("purging a dead letter of {queue}"), &e))?;
    if purged == 0 {
        return Err(ApiError::not_found(format!(
            "the dead-letter queue of {queue} holds no message {id}"
        )));
    }
    tracing::info!(queue = %queue, message_id = %id, by = %who(&caller), "dead letter purged");
    Ok(Json(Purged { purged }))
}

/// The answer of a pause, resume or restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub(super) struct WorkerControl {
    /// The worker.
    pub worker: String,
    /// Whether it is paused (or pausing) now.
    pub paused: bool,
}

/// 404 for a worker this process does not run.
fn known_worker(state: &AppState, name: &str) -> Result<(), ApiError> {
    if state.health.snapshot().worker(name).is_some() {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("no worker is named {name}")))
    }
}

fn control_error(error: &ControlError) -> ApiError {
    match error {
        ControlError::Unknown(_) => ApiError::not_found(error.to_string()),
        _ => ApiError::new(StatusCode::CONFLICT, "conflict", error.to_string()),
    }
}

/// Stores the pause (or resume) of a pausable worker, so every replica and every
/// restart follows it, and applies it here at once.
async fn set_paused(
    state: &AppState,
    caller: &User,
    name: &str,
    paused: bool,
) -> Result<Json<WorkerControl>, ApiError> {
    known_worker(state, name)?;
    if !PAUSABLE.contains(&name) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_pausable",
            format!("{name} cannot be paused; only {} can", PAUSABLE.join(", ")),
        ));
    }
    let store = state.db.serving()?;
    let mut tx = store.begin().await?;
    tx.set_worker_paused(name, paused, &caller.id).await?;
    tx.commit().await?;
    // The follower applies it within its interval anyway; here it applies at once.
    if let Err(error) = state.settings.operator.controls.set_paused(name, paused) {
        tracing::warn!(worker = name, error = %error, "stored the pause but cannot apply it here");
    }
    let action = if paused { "worker paused" } else { "worker resumed" };
    tracing::info!(worker = name, by = %who(caller), "{action}");
    Ok(Json(WorkerControl { worker: name.to_owned(), paused }))
}

/// Pauses a status updater or the outbox on every replica, until resumed (restarts
/// included): its intake stops, its running handlers finish, what it had not started
/// goes back to the queue. It then reads `paused`; `/readyz` stays 200. Other workers
/// answer 409.
#[utoipa::path(post, path = "/api/workers/{name}/pause", tag = "operator",
    params(("name" = String, Path, description = "The worker, e.g. deployment-status")),
    responses((status = 200, body = WorkerControl), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn pause_worker(
    State(state): State<AppState>,
    Admin(caller): Admin,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<WorkerControl>, ApiError> {
    set_paused(&state, &caller, &name, true).await
}

/// Resumes a paused worker on every replica: its intake starts again.
#[utoipa::path(post, path = "/api/workers/{name}/resume", tag = "operator",
    params(("name" = String, Path, description = "The worker, e.g. deployment-status")),
    responses((status = 200, body = WorkerControl), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn resume_worker(
    State(state): State<AppState>,
    Admin(caller): Admin,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<WorkerControl>, ApiError> {
    set_paused(&state, &caller, &name, false).await
}

/// Asks this process's supervisor to restart a worker now: its current run stops as
/// in a pause (handlers finish) and it starts again at once; not counted as a failure.
/// 409 for a worker that `failed` (only a process restart brings it back).
#[utoipa::path(post, path = "/api/workers/{name}/restart", tag = "operator",
    params(("name" = String, Path, description = "The worker, e.g. deployment-status")),
    responses((status = 200, body = WorkerControl), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn restart_worker(
    State(state): State<AppState>,
    Admin(caller): Admin,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<WorkerControl>, ApiError> {
    known_worker(&state, &name)?;
    let controls = &state.settings.operator.controls;
    controls.restart(&name).map_err(|e| control_error(&e))?;
    tracing::info!(worker = %name, by = %who(&caller), "worker restart requested");
    let paused = controls.is_paused(&name).unwrap_or(false);
    Ok(Json(WorkerControl { worker: name, paused }))
}

/// `?limit=` of the parked outbox rows.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct ParkedQuery {
    /// At most this many rows, oldest first (default 50, at most 500).
    pub limit: Option<u64>,
}

/// One parked outbox row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct ParkedRow {
    /// The row id, for the retry route.
    pub id: i64,
    /// The message id it is sent with.
    pub message_id: String,
    /// Where it goes.
    pub queue: String,
    /// The record it is about.
    pub aggregate_id: String,
    /// How many sends failed.
    pub attempts: i64,
    /// Why the last one failed.
    pub error: String,
    /// When it was written (RFC 3339).
    pub created_at: String,
    /// When it was parked (RFC 3339).
    pub parked_at: String,
    /// The start of the body.
    pub body_preview: String,
}

/// The body of `GET /api/outbox/parked`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct ParkedRows {
    /// How many rows are parked in all.
    pub count: i64,
    /// The oldest rows.
    pub rows: Vec<ParkedRow>,
}

fn millis_rfc3339(ms: i64) -> String {
    crate::domain::rfc3339_utc(ms as f64 / 1000.0)
}

/// The outbox rows that could not be sent and wait for an operator, oldest first.
#[utoipa::path(get, path = "/api/outbox/parked", tag = "operator", params(ParkedQuery),
    responses((status = 200, body = ParkedRows), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn parked_outbox(
    State(state): State<AppState>,
    Admin(_): Admin,
    ApiQuery(query): ApiQuery<ParkedQuery>,
) -> Result<Json<ParkedRows>, ApiError> {
    let limit = query.limit.unwrap_or(50);
    if limit == 0 || limit > 500 {
        return Err(ApiError::bad_request("limit must be between 1 and 500"));
    }
    let store = state.db.serving()?;
    let count = store.parked_outbox().await?.count;
    let rows = store.parked_outbox_messages(limit).await?;
    let rows = rows
        .into_iter()
        .map(|row| {
            let message_id = row.message_id();
            let body = &row.message.outgoing.body;
            let shown = &body[..body.len().min(BODY_PREVIEW_BYTES)];
            ParkedRow {
                id: row.id,
                message_id,
                queue: row.message.queue,
                aggregate_id: row.message.aggregate_id,
                attempts: row.attempts,
                error: row.error,
                created_at: millis_rfc3339(row.created_at),
                parked_at: millis_rfc3339(row.parked_at),
                body_preview: String::from_utf8_lossy(shown).into_owned(),
            }
        })
        .collect();
    Ok(Json(ParkedRows { count, rows }))
}

/// The answer of a retry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub(super) struct Retried {
    /// The row, back in the outbox.
    pub retried: i64,
}

/// Puts a parked row back into the outbox, due now: the outbox worker sends it again
/// (with the same message id). 404 when no such row is parked.
#[utoipa::path(post, path = "/api/outbox/parked/{id}/retry", tag = "operator",
    params(("id" = i64, Path, description = "The parked row's id")),
    responses((status = 200, body = Retried), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn retry_parked(
    State(state): State<AppState>,
    Admin(caller): Admin,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<Retried>, ApiError> {
    let store = state.db.serving()?;
    if !store.retry_parked_outbox(id).await? {
        return Err(ApiError::not_found(format!("no outbox row {id} is parked")));
    }
    tracing::info!(row = id, by = %who(&caller), "parked outbox row retried");
    Ok(Json(Retried { retried: id }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redrive_names_ids_or_all_but_not_both_nor_nothing() {
        let body = |ids: Option<&[&str]>, all| RedriveBody {
            ids: ids.map(|ids| ids.iter().map(|s| (*s).to_owned()).collect()),
            all,
        };
        assert_eq!(
            body(Some(&["a"]), None).selection().ok(),
            Some(Redrive::Ids(["a".to_owned()].into()))
        );
        assert_eq!(body(None, Some(true)).selection().ok(), Some(Redrive::All));
        for wrong in [
            body(None, None),
            body(Some(&[]), None),
            body(None, Some(false)),
            body(Some(&["a"]), Some(true)),
        ] {
            assert!(wrong.selection().is_err());
        }
    }

    #[test]
    fn a_peek_shows_the_start_of_a_long_body() {
        let body = "é".repeat(BODY_PREVIEW_BYTES);
        let dead = DeadLetter {
            message: steward_core::Message::new("m", body.clone()),
            reason: "Invalid".to_owned(),
            description: "bad".to_owned(),
        };
        let peeked = PeekedMessage::from(dead);
        assert_eq!(peeked.body_bytes, body.len());
        assert!(peeked.body_truncated);
        assert_eq!(peeked.body_preview, "é".repeat(BODY_PREVIEW_BYTES / 2));
    }
}
