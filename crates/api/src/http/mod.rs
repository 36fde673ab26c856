//! The HTTP API: [`router`] builds it from an [`AppState`].
//!
//! Every failure, extractor rejections included, answers `{"error", "detail"}` (the
//! `ErrorBody` schema of [`openapi`]). Requests are traced and bounded by a 30 s timeout
//! and a 1 MiB body. Every route but the probes ([`OPEN_ROUTES`]) needs an identified
//! caller ([`auth`]): 401 with `WWW-Authenticate: Bearer` otherwise.
//!
//! Load is bounded ([`LoadLimit`]): at most `max_concurrency` API requests run at once;
//! one that finds no turn within `queue_timeout` answers 503 with `Retry-After`, so the
//! database pool is never what requests queue for. The probes and `/metrics`
//! ([`UNLIMITED_ROUTES`]) are never shed nor queued behind API requests; `/health`
//! counts the parked outbox messages on the HTTP pool only when it gets a turn, and
//! answers without that count otherwise. Lists are
//! paged ([`MAX_PAGE_SIZE`] items and [`MAX_PAGE_BYTES`] at most).

mod access;
mod airlock;
pub mod auth;
mod error;
mod extract;
mod health;
mod openapi;
mod operator;
mod paging;
mod resources;
mod roles;
mod state;
mod templates;

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument as _;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use error::ApiError;
pub use operator::OperatorSettings;
pub use paging::{MAX_PAGE_BYTES, MAX_PAGE_SIZE};
pub use state::{ApiSettings, AppState, LoadLimit};

use error::LoggedCause;
use extract::Caller;

/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// How long a request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The routes that answer without authentication: the probes, for orchestrators and
/// load balancers. `/metrics` joins them with `STEWARD_METRICS_OPEN`.
pub const OPEN_ROUTES: [&str; 4] = ["/livez", "/readyz", "/health", "/api/health"];

/// The routes the load limit leaves alone: the probes, which an orchestrator must get
/// an answer from however busy the API is, and `/metrics`, which shows how busy.
pub const UNLIMITED_ROUTES: [&str; 5] = ["/livez", "/readyz", "/health", "/api/health", "/metrics"];

/// The unlimited routes that read the database on the HTTP pool (the parked outbox
/// messages of `/health`): they do so only with a turn of the load limit, and answer
/// without that read when none comes free in time.
const COUNTED_HEALTH_ROUTES: [&str; 2] = ["/health", "/api/health"];

/// The metric counting API requests refused with 503 because none of the
/// [`LoadLimit`]'s turns came free in time.
pub const SHED_METRIC: &str = "steward_http_requests_shed_total";

/// The operator routes: only `TREAdmin` may call them (`/metrics` not when
/// `STEWARD_METRICS_OPEN` opens it).
pub const OPERATOR_ROUTES: [&str; 2] = ["/api/workers", "/metrics"];

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
        .routes(routes!(roles::get, roles::set))
        .routes(routes!(operator::list_dead_letters))
        .routes(routes!(operator::peek_dead_letters))
        .routes(routes!(operator::redrive_dead_letters))
        .routes(routes!(operator::purge_dead_letter))
        .routes(routes!(operator::pause_worker))
        .routes(routes!(operator::resume_worker))
        .routes(routes!(operator::restart_worker))
        .routes(routes!(operator::parked_outbox))
        .routes(routes!(operator::retry_parked))
}

/// The OpenAPI document of every route, as `GET /api/openapi.json` serves it.
#[must_use]
pub fn openapi() -> utoipa::openapi::OpenApi {
    static DOCUMENT: LazyLock<utoipa::openapi::OpenApi> =
        LazyLock::new(|| openapi::with_common_answers(routes().into_openapi()));
    DOCUMENT.clone()
}

/// Builds the router: every route, with tracing, the timeout, the body limit,
/// authentication and JSON errors for unknown routes and methods.
pub fn router(state: AppState) -> Router {
    let (router, _) = routes().split_for_parts();
    router
        .method_not_allowed_fallback(|| async { method_not_allowed() })
        .fallback(|| async { ApiError::not_found("no such route").into_response() })
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn_with_state(Limiter::new(state.settings.load), limit_load))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(timeout_and_log))
        .layer(axum::Extension(health::ProbeLog::default()))
        .layer(
            // A 5xx's cause is logged once, at ERROR, by `timeout_and_log`; an expected
            // one (a probe's 503, a shed request) is not an error at all.
            tower_http::trace::TraceLayer::new_for_http().on_failure(
                tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG),
            ),
        )
        .with_state(state)
}

/// The turns of a [`LoadLimit`], shared by every request of one router.
#[derive(Clone, Debug)]
struct Limiter {
    turns: Arc<tokio::sync::Semaphore>,
    queue_timeout: Duration,
}

impl Limiter {
    fn new(limit: LoadLimit) -> Self {
        Limiter {
            turns: Arc::new(tokio::sync::Semaphore::new(limit.max_concurrency.max(1))),
            queue_timeout: limit.queue_timeout,
        }
    }
}

/// Runs an API request once it has a turn, waiting at most the queue timeout for one,
/// and answers 503 `overloaded` with `Retry-After` otherwise. The [`UNLIMITED_ROUTES`]
/// run at once.
async fn limit_load(State(limiter): State<Limiter>, mut request: Request, next: Next) -> Response {
    if COUNTED_HEALTH_ROUTES.contains(&request.uri().path()) {
        // Never shed, but its database read takes a turn like any API request, or a
        // flood of these open routes would hold the connections that requests holding
        // turns wait for. Without a turn in time it answers without that read.
        let turn = limiter.turns.clone().acquire_owned();
        let Ok(Ok(turn)) = tokio::time::timeout(limiter.queue_timeout, turn).await else {
            return next.run(request).await;
        };
        request.extensions_mut().insert(health::DatabaseTurn);
        return run_holding(turn, request, next).await;
    }
    if UNLIMITED_ROUTES.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let turn = limiter.turns.clone().acquire_owned();
    // A free turn is taken at once, even with a zero timeout: `timeout` polls it first.
    match tokio::time::timeout(limiter.queue_timeout, turn).await {
        Ok(Ok(turn)) => run_holding(turn, request, next).await,
        // The semaphore is never closed; a closed one sheds like a busy one.
        Ok(Err(_)) | Err(_) => {
            metrics::counter!(SHED_METRIC).increment(1);
            tracing::debug!(path = %request.uri().path(), "request shed: no turn free in time");
            ApiError::overloaded().into_response()
        }
    }
}

/// Runs the rest of a request in a task of its own that holds `turn` until the handler
/// ends, even when the request is dropped first (its client went away, or it timed
/// out): a dropped handler does not give its database connection back at once (the pool
/// takes it back once its statement has ended, which may be a lock or statement timeout
/// later), so a turn freed at the drop would let the next request wait for that
/// connection in the pool. The handler's own bounds (the session's statement and lock
/// timeouts) bound how long the turn stays taken. A panic goes on unwinding here.
async fn run_holding(turn: OwnedSemaphorePermit, request: Request, next: Next) -> Response {
    let handler = async move {
        let response = next.run(request).await;
        drop(turn);
        response
    };
    match tokio::spawn(handler.instrument(tracing::Span::current())).await {
        Ok(response) => response,
        Err(error) => match error.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // Only a runtime shutting down cancels the task.
            Err(cancelled) => ApiError::unavailable("the service", &cancelled).into_response(),
        },
    }
}

fn method_not_allowed() -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
    .into_response()
}

/// Identifies the caller of every route but the open ones, refuses (403) callers with
/// neither `TREUser` nor `TREAdmin` (an application's token without roles, say) and the
/// operator routes to callers without `TREAdmin`, and leaves the caller in the request's
/// extensions for the [`Caller`] extractor. Finer rules are the handlers' (`access`).
async fn authenticate(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    let path = path.as_str();
    if OPEN_ROUTES.contains(&path) || (state.settings.metrics_open && path == "/metrics") {
        // Open to anyone; a caller who shows credentials is identified anyway, so that
        // the probes show their details to an admin (and only to one).
        let auth = &state.settings.auth;
        if !auth.is_configured() || auth.has_credentials(request.headers()) {
            if let Ok(user) = auth.authenticate(request.headers()).await {
                request.extensions_mut().insert(Caller(user));
            }
        }
        return next.run(request).await;
    }
    match state.settings.auth.authenticate(request.headers()).await {
        Ok(user) if !auth::is_tre_user_or_admin(&user) => ApiError::forbidden(format!(
            "every call needs the role {} or {}",
            auth::TRE_USER,
            auth::TRE_ADMIN
        ))
        .into_response(),
        Ok(user) if OPERATOR_ROUTES.contains(&path) && !auth::is_admin(&user) => {
            ApiError::forbidden(format!("{path} needs the role {}", auth::TRE_ADMIN))
                .into_response()
        }
        Ok(user) => {
            request.extensions_mut().insert(Caller(user));
            next.run(request).await
        }
        Err(error) => {
            tracing::debug!(path = %request.uri().path(), error = %error, "request not authenticated");
            ApiError::from(error).into_response()
        }
    }
}

/// Bounds each request by [`REQUEST_TIMEOUT`] and logs the cause of every 5xx once,
/// inside the request's span.
async fn timeout_and_log(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(%method, %path, timeout = ?REQUEST_TIMEOUT, "request timed out");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                format!("the request took longer than {REQUEST_TIMEOUT:?}"),
            )
            .into_response()
        }
    };
    if let Some(LoggedCause(cause)) = response.extensions().get::<LoggedCause>() {
        tracing::error!(%method, %path, status = response.status().as_u16(), error = %cause, "request failed");
    }
    response
}
