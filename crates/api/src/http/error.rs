//! One JSON error shape for every failure: `{"error": "<code>", "detail": "<text>"}`.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::auth::AuthError;
use crate::rules::airlock::{AirlockError, ILLEGAL_STATUS_CHANGE};
use crate::rules::operations::OperationError;
use crate::storage::StoreError;

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub(super) struct ErrorBody {
    /// A short machine-readable code, e.g. `not_found` or `invalid_body`.
    pub error: String,
    /// What went wrong, for people.
    pub detail: String,
}

/// An HTTP error answer. Client mistakes show their message; internal failures a generic
/// one (the cause is logged once, by the error-logging middleware).
#[derive(Debug)]
pub(super) struct ApiError {
    status: StatusCode,
    code: &'static str,
    detail: String,
    /// The full cause of a server-side failure, for the log only.
    cause: Option<String>,
    /// The `WWW-Authenticate` challenge of a 401.
    challenge: Option<String>,
}

/// The cause of a 5xx answer, left in the response extensions for the logging
/// middleware (`into_response` itself has no side effects).
#[derive(Debug, Clone)]
pub(crate) struct LoggedCause(pub(crate) String);

impl ApiError {
    /// An error with this status, code and detail.
    #[must_use]
    pub(super) fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        ApiError { status, code, detail: detail.into(), cause: None, challenge: None }
    }

    /// The status of the answer.
    #[must_use]
    pub(super) fn status(&self) -> StatusCode {
        self.status
    }

    /// 400 with code `bad_request`.
    #[must_use]
    pub(super) fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", detail)
    }

    /// 404 with code `not_found`.
    #[must_use]
    pub(super) fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", detail)
    }

    /// 403 with code `forbidden`: a known caller without the role.
    #[must_use]
    pub(super) fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }

    /// 503 with code `unavailable`, the cause logged.
    #[must_use]
    pub(super) fn unavailable(what: &str, cause: &(dyn std::error::Error + 'static)) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "unavailable",
            detail: format!("{what} is unavailable; try again later"),
            cause: Some(steward_core::error_chain(cause)),
            challenge: None,
        }
    }

    /// 503 with code `overloaded`: the service serves as many requests as it can and
    /// this one found no turn in time. Nothing is logged per request (a flood would
    /// flood the log); the load shedder counts them.
    #[must_use]
    pub(super) fn overloaded() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "the service is busy; try again after the Retry-After delay",
        )
    }

    /// 500 with code `internal`, the cause logged and not shown.
    #[must_use]
    pub(super) fn internal(cause: &(dyn std::error::Error + 'static)) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            detail: "an internal error occurred".to_owned(),
            cause: Some(steward_core::error_chain(cause)),
            challenge: None,
        }
    }
}

/// The `Retry-After` of every 503 answer, in seconds: what is missing (the database, a
/// migration) usually comes back within moments, and clients should not hammer it.
pub(super) const RETRY_AFTER_SECONDS: u32 = 1;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: self.code.to_owned(), detail: self.detail };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        if let Some(challenge) = self.challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, challenge);
        }
        if let Some(cause) = self.cause {
            response.extensions_mut().insert(LoggedCause(cause));
        }
        response
    }
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        let (code, challenge) = match &error {
            AuthError::Unavailable(cause) => {
                return ApiError::unavailable("the token issuer", cause);
            }
            AuthError::Missing => ("unauthorized", "Bearer".to_owned()),
            // A fixed text: the token's `kid` and `alg` are the caller's to choose, and
            // are neither echoed nor able to spoil the header.
            AuthError::ReservedIdentity | AuthError::UnknownToken | AuthError::InvalidToken(_) => (
                "invalid_token",
                format!(
                    "Bearer error=\"invalid_token\", error_description=\"{}\"",
                    summary(&error)
                ),
            ),
        };
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            code,
            detail: summary(&error).to_owned(),
            cause: None,
            challenge: Some(challenge),
        }
    }
}

/// The fixed text of an authentication failure, without anything the caller sent.
fn summary(error: &AuthError) -> &'static str {
    match error {
        AuthError::Missing => "this request needs the header Authorization: Bearer <token>",
        AuthError::UnknownToken => "the bearer token is not valid here",
        AuthError::InvalidToken(token) | AuthError::Unavailable(token) => token.summary(),
        AuthError::ReservedIdentity => "the user id is reserved",
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        if error.is_not_found() {
            ApiError::not_found(error.to_string())
        } else if error.is_message_too_large() {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", error.to_string())
        } else if error.is_etag_mismatch() {
            ApiError::new(StatusCode::CONFLICT, "conflict", error.to_string())
        } else if error.is_unavailable() {
            ApiError::unavailable("the database", &error)
        } else if error.is_busy() {
            // Retryable, not an outage: 503 with Retry-After, code `busy`.
            let mut busy = ApiError::unavailable("the database", &error);
            busy.code = "busy";
            busy.detail = "the database is busy; try again later".to_owned();
            busy
        } else {
            ApiError::internal(&error)
        }
    }
}

impl From<crate::storage::NotReady> for ApiError {
    fn from(error: crate::storage::NotReady) -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("{error}; try again later"),
        )
    }
}

impl From<OperationError> for ApiError {
    fn from(error: OperationError) -> Self {
        match error {
            OperationError::Store(store) => store.into(),
            in_progress @ OperationError::OperationInProgress { .. } => ApiError::new(
                StatusCode::CONFLICT,
                "operation_in_progress",
                in_progress.to_string(),
            ),
            other if other.is_client_error() => {
                ApiError::bad_request(steward_core::error_chain(&other))
            }
            other => ApiError::internal(&other),
        }
    }
}

impl From<AirlockError> for ApiError {
    fn from(error: AirlockError) -> Self {
        match error {
            AirlockError::Store(store) => store.into(),
            AirlockError::IllegalStatusChange { .. } => ApiError::new(
                StatusCode::BAD_REQUEST,
                "illegal_status_change",
                ILLEGAL_STATUS_CHANGE,
            ),
            other if other.is_client_error() => ApiError::bad_request(other.to_string()),
            other => ApiError::internal(&other),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let (status, code) = match &rejection {
            JsonRejection::JsonDataError(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
            JsonRejection::JsonSyntaxError(_) => (StatusCode::BAD_REQUEST, "malformed_json"),
            JsonRejection::MissingJsonContentType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            JsonRejection::BytesRejection(_)
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            _ => (rejection.status(), "bad_request"),
        };
        ApiError::new(status, code, rejection.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::new(rejection.status(), "bad_path", rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_query", rejection.body_text())
    }
}
