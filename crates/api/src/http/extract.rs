//! Extractors that answer with the service's JSON error shape, and the caller's identity.

use axum::extract::{FromRequest, FromRequestParts};
use axum::http::request::Parts;

use super::auth::AuthError;
use super::error::ApiError;
use crate::domain::User;

/// `Json<T>` whose rejections are [`ApiError`]s.
#[derive(Debug, Clone, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub(super) struct ApiJson<T>(pub T);

/// `Path<T>` whose rejections are [`ApiError`]s.
#[derive(Debug, Clone, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub(super) struct ApiPath<T>(pub T);

/// `Query<T>` whose rejections are [`ApiError`]s.
#[derive(Debug, Clone, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub(super) struct ApiQuery<T>(pub T);

/// Who makes the request, as the authentication middleware identified them (an OIDC
/// token, the development token, a trusted proxy's headers, or the development admin).
/// Recorded on operations, history and airlock requests.
#[derive(Debug, Clone)]
pub(super) struct Caller(pub User);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        // Only an open route lacks it, and open routes do not ask for a caller.
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| AuthError::Missing.into())
    }
}

/// Whether the caller of an open route (a probe) may see details, error chains with
/// host and queue names: only an identified `TREAdmin` (the development admin
/// included, so with nothing configured everyone on the loopback address).
#[derive(Debug, Clone, Copy)]
pub(super) struct ShowDetails(pub bool);

impl<S: Send + Sync> FromRequestParts<S> for ShowDetails {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let caller = parts.extensions.get::<Caller>();
        Ok(ShowDetails(caller.is_some_and(|Caller(user)| super::auth::is_admin(user))))
    }
}
