//! Airlock requests: create, read, list, submit, review, cancel.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::access::Access;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use super::paging::{Bounds, MAX_PAGE_BYTES, Page};
use crate::domain::{AirlockRequest, AirlockRequestType, AirlockReviewDecision};
use crate::http::AppState;
use crate::rules::airlock::{self, NewAirlockRequest};
use crate::storage::AirlockRequestFilter;

/// The body of `POST /api/airlock-requests`.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(example = json!({
    "workspaceId": "1b6f5c2e-8f0a-4b6e-9a57-3c1f0e2d4a11",
    "type": "import",
    "title": "Sequencing run 42",
    "businessJustification": "Raw reads for the variant calling study"
}))]
pub(super) struct CreateAirlockRequest {
    /// The workspace; it must exist.
    pub workspace_id: String,
    /// `import` or `export`.
    #[serde(rename = "type")]
    #[schema(value_type = String, example = "import")]
    pub request_type: AirlockRequestType,
    /// A title (default `Airlock Request`).
    #[serde(default)]
    pub title: Option<String>,
    /// Why (default `Business Justification`).
    #[serde(default)]
    pub business_justification: Option<String>,
}

/// A reviewer's decision on a request in review.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub(super) enum ReviewDecision {
    /// Approve: the request moves to `approval_in_progress`.
    Approved,
    /// Reject: the request moves to `rejection_in_progress`.
    Rejected,
}

/// The body of `POST /api/airlock-requests/{id}/review`.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(example = json!({"reviewDecision": "approved", "decisionExplanation": "No identifiable data"}))]
pub(super) struct ReviewBody {
    /// `approved` or `rejected`.
    pub review_decision: ReviewDecision,
    /// Why.
    pub decision_explanation: String,
}

/// An airlock request.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct AirlockRequestResponse {
    /// The request (TRE's `AirlockRequest`).
    #[schema(value_type = Object)]
    pub airlock_request: AirlockRequest,
}

/// A page of airlock requests.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct AirlockRequestList {
    /// The requests, oldest first: at most `limit`, and fewer when they are large.
    #[schema(value_type = Vec<Object>)]
    pub airlock_requests: Vec<AirlockRequest>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

fn answer(status: StatusCode, airlock_request: AirlockRequest) -> Response {
    (status, Json(AirlockRequestResponse { airlock_request })).into_response()
}

/// Creates a draft airlock request in a workspace.
#[utoipa::path(post, path = "/api/airlock-requests", tag = "airlock", request_body = CreateAirlockRequest,
    responses((status = 201, body = AirlockRequestResponse), (status = 400, body = ErrorBody), (status = 404, description = "The workspace is not one the caller holds a role in", body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn create(
    State(state): State<AppState>,
    Caller(user): Caller,
    ApiJson(body): ApiJson<CreateAirlockRequest>,
) -> Result<Response, ApiError> {
    let store = state.db.serving()?;
    Access::new(&state, store, &user).author_airlock(&body.workspace_id).await?;
    let mut tx = store.begin().await?;
    tx.limit_message_size(state.settings.max_message_bytes);
    let new = NewAirlockRequest {
        workspace_id: body.workspace_id,
        request_type: body.request_type,
        title: body.title,
        business_justification: body.business_justification,
    };
    let request = airlock::create_request(&mut tx, new, &user).await?;
    tx.commit().await?;
    tracing::info!(request_id = %request.id, workspace_id = %request.workspace_id, "airlock request created");
    let location = format!("/api/airlock-requests/{}", request.id);
    let mut response = answer(StatusCode::CREATED, request);
    if let Ok(value) = location.parse() {
        response.headers_mut().insert(header::LOCATION, value);
    }
    Ok(response)
}

/// Lists airlock requests, paged.
#[utoipa::path(get, path = "/api/airlock-requests", tag = "airlock", params(Page),
    responses((status = 200, body = AirlockRequestList), (status = 400, body = ErrorBody), (status = 503, body = ErrorBody, description = "busy (`overloaded`) or the database is unavailable; retry after `Retry-After`")))]
pub(super) async fn list(
    State(state): State<AppState>,
    Caller(user): Caller,
    ApiQuery(page): ApiQuery<Page>,
) -> Result<Json<AirlockRequestList>, ApiError> {
    let bounds = page.bounds()?;
    let store = state.db.serving()?;
    let visible_workspaces = Access::new(&state, store, &user).visible_workspaces().await?;
    let filter = AirlockRequestFilter {
        after: bounds.after,
        limit: Some(bounds.limit),
        max_bytes: Some(MAX_PAGE_BYTES),
        visible_workspaces,
        ..Default::default()
    };
    let page = store.read().airlock_requests_page(&filter).await?;
    let next_cursor = Bounds::next_cursor(page.last.as_ref(), page.more);
    Ok(Json(AirlockRequestList { airlock_requests: page.items, next_cursor }))
}

/// One airlock request.
#[utoipa::path(get, path = "/api/airlock-requests/{id}", tag = "airlock",
    params(("id" = String, Path, description = "The airlock request id")),
    responses((status = 200, body = AirlockRequestResponse), (status = 404, body = ErrorBody)))]
pub(super) async fn get(
    State(state): State<AppState>,
    Caller(user): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let store = state.db.serving()?;
    let request = store.read().airlock_request(&id).await?;
    Access::new(&state, store, &user).read_airlock(&request).await?;
    Ok(answer(StatusCode::OK, request))
}

/// Submits a draft request; publishes `statusChanged`.
#[utoipa::path(post, path = "/api/airlock-requests/{id}/submit", tag = "airlock",
    params(("id" = String, Path, description = "The airlock request id")),
    responses((status = 200, body = AirlockRequestResponse), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, description = "The request changed meanwhile, again on the retry (`conflict`)", body = ErrorBody), (status = 413, description = "The airlock event is larger than the transport accepts (`payload_too_large`); nothing is changed", body = ErrorBody)))]
pub(super) async fn submit(
    State(state): State<AppState>,
    Caller(user): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let store = state.db.serving()?;
    let existing = store.read().airlock_request(&id).await?;
    Access::new(&state, store, &user).author_airlock_request(&existing).await?;
    let mut tx = store.begin().await?;
    tx.limit_message_size(state.settings.max_message_bytes);
    let request = airlock::submit(&mut tx, &state.settings.airlock_queues, &id, &user).await?;
    tx.commit().await?;
    tracing::info!(request_id = %id, "airlock request submitted");
    Ok(answer(StatusCode::OK, request))
}

/// Reviews a request in review; publishes `statusChanged`.
#[utoipa::path(post, path = "/api/airlock-requests/{id}/review", tag = "airlock", request_body = ReviewBody,
    params(("id" = String, Path, description = "The airlock request id")),
    responses((status = 200, body = AirlockRequestResponse), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, description = "The request changed meanwhile, again on the retry (`conflict`)", body = ErrorBody), (status = 413, description = "The body is larger than 1 MiB, or the airlock event larger than the transport accepts (`payload_too_large`); nothing is changed", body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn review(
    State(state): State<AppState>,
    Caller(user): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<ReviewBody>,
) -> Result<Response, ApiError> {
    let decision = match body.review_decision {
        ReviewDecision::Approved => AirlockReviewDecision::Approved,
        ReviewDecision::Rejected => AirlockReviewDecision::Rejected,
    };
    let store = state.db.serving()?;
    let existing = store.read().airlock_request(&id).await?;
    Access::new(&state, store, &user).review_airlock(&existing).await?;
    let mut tx = store.begin().await?;
    tx.limit_message_size(state.settings.max_message_bytes);
    let request = airlock::review(
        &mut tx,
        &state.settings.airlock_queues,
        &id,
        &user,
        decision,
        &body.decision_explanation,
    )
    .await?;
    tx.commit().await?;
    tracing::info!(request_id = %id, decision = ?body.review_decision, "airlock request reviewed");
    Ok(answer(StatusCode::OK, request))
}

/// Cancels a request.
#[utoipa::path(post, path = "/api/airlock-requests/{id}/cancel", tag = "airlock",
    params(("id" = String, Path, description = "The airlock request id")),
    responses((status = 200, body = AirlockRequestResponse), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, description = "The request changed meanwhile, again on the retry (`conflict`)", body = ErrorBody), (status = 413, description = "The airlock event is larger than the transport accepts (`payload_too_large`); nothing is changed", body = ErrorBody)))]
pub(super) async fn cancel(
    State(state): State<AppState>,
    Caller(user): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let store = state.db.serving()?;
    let existing = store.read().airlock_request(&id).await?;
    Access::new(&state, store, &user).author_airlock_request(&existing).await?;
    let mut tx = store.begin().await?;
    tx.limit_message_size(state.settings.max_message_bytes);
    let request = airlock::cancel(&mut tx, &state.settings.airlock_queues, &id, &user).await?;
    tx.commit().await?;
    tracing::info!(request_id = %id, "airlock request cancelled");
    Ok(answer(StatusCode::OK, request))
}
