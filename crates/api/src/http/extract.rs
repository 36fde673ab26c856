//! Extractors that answer with the service's JSON error shape, and the caller's identity.

use axum::extract::{FromRequest, FromRequestParts};
use axum::http::request::Parts;
use serde::Deserialize;

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

/// `?limit=&cursor=` on list routes.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct Page {
    /// At most this many items (default 50, at most 500).
    pub limit: Option<u64>,
    /// Where to continue: the `nextCursor` of the previous page.
    pub cursor: Option<String>,
}

impl Page {
    /// The default page size.
    pub(super) const DEFAULT_LIMIT: u64 = 50;
    /// The largest page size.
    pub(super) const MAX_LIMIT: u64 = 500;

    /// (offset, limit) of this page.
    ///
    /// # Errors
    ///
    /// A cursor this service did not hand out, or a zero limit.
    pub(super) fn bounds(&self) -> Result<(u64, u64), ApiError> {
        let limit = self.limit.unwrap_or(Self::DEFAULT_LIMIT);
        if limit == 0 {
            return Err(ApiError::bad_request("limit must be at least 1"));
        }
        let offset = match &self.cursor {
            None => 0,
            Some(cursor) => cursor
                .strip_prefix("o")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| ApiError::bad_request(format!("invalid cursor {cursor:?}")))?,
        };
        Ok((offset, limit.min(Self::MAX_LIMIT)))
    }

    /// Cuts `items` (fetched with `limit + 1`) down to the page, and returns the cursor
    /// of the next page when there is one.
    pub(super) fn truncate<T>(items: &mut Vec<T>, offset: u64, limit: u64) -> Option<String> {
        let page = usize::try_from(limit).unwrap_or(usize::MAX);
        let more = items.len() > page;
        items.truncate(page);
        more.then(|| format!("o{}", offset + limit))
    }
}
