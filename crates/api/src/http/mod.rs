//! The HTTP API: [`router`] builds it from an [`AppState`].
//!
//! Every failure, extractor rejections included, answers `{"error", "detail"}` (the
//! `ErrorBody` schema of [`openapi`]). Requests are traced, bounded by a 30 s timeout and a 1 MiB
//! body, and, when `STEWARD_API_TOKEN` is set, every mutating request needs
//! `Authorization: Bearer <token>`.

mod airlock;
mod error;
mod extract;
mod health;
mod openapi;
mod resources;
mod state;
mod templates;

use std::sync::LazyLock;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use error::ApiError;
pub use state::{ApiSettings, AppState};

use error::LoggedCause;

/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// How long a request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Every route, each declared once: its method and path are its handler's
/// `#[utoipa::path]`, which also documents it. The crate's `clippy.toml` forbids adding
/// a route any other way (`Router::route`, `nest`, `merge`…), which would serve it
/// undocumented.
fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(health::health))
        .routes(routes!(health::api_health))
        .routes(routes!(health::livez))
        .routes(routes!(health::readyz))
        .routes(routes!(health::metrics))
        .routes(routes!(health::workers))
        .routes(routes!(templates::list))
        .routes(routes!(openapi::document))
        .routes(routes!(resources::list, resources::create))
        .routes(routes!(resources::get, resources::update, resources::delete))
        .routes(routes!(resources::operations))
        .routes(routes!(resources::action))
        .routes(routes!(resources::operation))
        .routes(routes!(airlock::list, airlock::create))
        .routes(routes!(airlock::get))
        .routes(routes!(airlock::submit))
        .routes(routes!(airlock::review))
        .routes(routes!(airlock::cancel))
}

/// The OpenAPI document of every route, as `GET /api/openapi.json` serves it.
#[must_use]
pub fn openapi() -> utoipa::openapi::OpenApi {
    static DOCUMENT: LazyLock<utoipa::openapi::OpenApi> = LazyLock::new(|| routes().into_openapi());
    DOCUMENT.clone()
}

/// Builds the router: every route, with tracing, the timeout, the body limit, the token
/// check and JSON errors for unknown routes and methods.
pub fn router(state: AppState) -> Router {
    let (router, _) = routes().split_for_parts();
    router
        .method_not_allowed_fallback(|| async { method_not_allowed() })
        .fallback(|| async { ApiError::not_found("no such route").into_response() })
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(timeout_and_log))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

fn method_not_allowed() -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
    .into_response()
}

fn is_mutating(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Compares without leaking, through timing, how much of the token matched.
fn same_token(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = given.len() ^ expected.len();
    for (i, byte) in expected.iter().enumerate() {
        diff |= usize::from(byte ^ given.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

/// When `STEWARD_API_TOKEN` is set, mutating requests need `Authorization: Bearer <it>`.
async fn authorize(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(token) = &state.settings.api_token {
        if is_mutating(request.method()) {
            let given = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or_default();
            if !same_token(given.trim().as_bytes(), token.as_bytes()) {
                return ApiError::unauthorized().into_response();
            }
        }
    }
    next.run(request).await
}

/// Bounds each request by [`REQUEST_TIMEOUT`] and logs the cause of every 5xx once,
/// inside the request's span.
async fn timeout_and_log(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            format!("the request took longer than {REQUEST_TIMEOUT:?}"),
        )
        .into_response(),
    };
    if let Some(LoggedCause(cause)) = response.extensions().get::<LoggedCause>() {
        tracing::error!(%method, %path, status = response.status().as_u16(), error = %cause, "request failed");
    }
    response
}
