//! Who the caller is: an OIDC bearer token, the development token, or the headers of an
//! authenticating proxy; with nothing configured, every caller is the development admin.
//!
//! The identity is a [`User`] whose `roles` are its global roles (`TREAdmin`,
//! `TREUser`). Which routes need which role is `docs/security.md`.

mod oidc;

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue, header};

pub use oidc::{
    Clock, GLOBAL_ROLES, KEYS_MAX_AGE, KeySetError, LEEWAY, OidcConfig, OidcVerifier,
    REFETCH_INTERVAL, TokenError,
};

use crate::domain::User;

/// The id of the development admin: the caller of the `STEWARD_API_TOKEN`, and every
/// caller when no authentication is configured.
pub const DEVELOPMENT_ADMIN: &str = "steward-admin";

/// TRE's global administrator role.
pub const TRE_ADMIN: &str = "TREAdmin";

/// TRE's global user role.
pub const TRE_USER: &str = "TREUser";

/// The development admin: id `steward-admin`, role `TREAdmin`.
#[must_use]
pub fn development_admin() -> User {
    let mut user = User::new(DEVELOPMENT_ADMIN, "Steward Admin", "");
    user.roles = vec![TRE_ADMIN.to_owned()];
    user
}

/// Whether `user` holds the global role `TREAdmin`.
#[must_use]
pub fn is_admin(user: &User) -> bool {
    user.roles.iter().any(|role| role == TRE_ADMIN)
}

/// Whether `user` holds `TREUser` or `TREAdmin`, as every API call needs (TRE's
/// `get_current_tre_user_or_tre_admin`).
#[must_use]
pub fn is_tre_user_or_admin(user: &User) -> bool {
    user.roles.iter().any(|role| role == TRE_USER || role == TRE_ADMIN)
}

/// Whether `id` is the development admin's id, which no token or proxy may claim.
fn is_reserved(id: &str) -> bool {
    id.trim().eq_ignore_ascii_case(DEVELOPMENT_ADMIN)
}

/// How callers are identified. The default, nothing configured, makes every caller
/// the development admin; the service allows that only on a loopback address, or
/// with `--insecure-no-auth`.
#[derive(Clone, Default)]
pub struct Authentication {
    api_token: Option<Arc<str>>,
    oidc: Option<Arc<OidcVerifier>>,
    trust_proxy_headers: bool,
    /// The proxy's callers that hold `TREAdmin`, by user id.
    proxy_admins: Arc<[String]>,
    /// When set, the proxy's headers count only with `X-Proxy-Secret` equal to it.
    proxy_secret: Option<Arc<str>>,
}

impl std::fmt::Debug for Authentication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authentication")
            .field("api_token", &self.api_token.as_ref().map(|_| "REDACTED"))
            .field("oidc", &self.oidc.as_ref().map(|oidc| oidc.config()))
            .field("trust_proxy_headers", &self.trust_proxy_headers)
            .field("proxy_admins", &self.proxy_admins)
            .field("proxy_secret", &self.proxy_secret.as_ref().map(|_| "REDACTED"))
            .finish()
    }
}

/// Why a caller is not identified.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No credentials: 401 with `WWW-Authenticate: Bearer`.
    #[error("this request needs the header Authorization: Bearer <token>")]
    Missing,
    /// A bearer token that is not the development token and no OIDC is configured.
    #[error("the bearer token is not valid here")]
    UnknownToken,
    /// An OIDC token that was refused: 401 with `error="invalid_token"`.
    #[error(transparent)]
    InvalidToken(TokenError),
    /// A token or a proxy names the development admin's id, which only the development
    /// token and the development mode may be: 401.
    #[error("the user id {DEVELOPMENT_ADMIN:?} is reserved for the development admin")]
    ReservedIdentity,
    /// The token could not be checked now (the issuer's keys are unavailable): 503.
    #[error(transparent)]
    Unavailable(TokenError),
}

impl Authentication {
    /// Nothing configured: every caller is the development admin.
    #[must_use]
    pub fn none() -> Self {
        Self::default()
    }

    /// The development token: its bearer is the development admin.
    #[must_use]
    pub fn with_api_token(mut self, token: impl Into<String>) -> Self {
        self.api_token = Some(Arc::from(token.into()));
        self
    }

    /// OIDC bearer tokens, checked by `verifier`.
    #[must_use]
    pub fn with_oidc(mut self, verifier: Arc<OidcVerifier>) -> Self {
        self.oidc = Some(verifier);
        self
    }

    /// Whether `X-User-Id`, `X-User-Name` and `X-User-Email` (TRE's three) name the
    /// caller of a request without a bearer token: only behind an authenticating
    /// proxy that strips them from clients. They give the identity only: such a
    /// caller holds `TREUser`, and `TREAdmin` only when listed by
    /// [`with_proxy_admins`](Self::with_proxy_admins). No header sets a role.
    #[must_use]
    pub fn with_proxy_headers(mut self, trust: bool) -> Self {
        self.trust_proxy_headers = trust;
        self
    }

    /// The user ids that hold `TREAdmin` when a trusted proxy names them
    /// (`STEWARD_PROXY_ADMINS`).
    #[must_use]
    pub fn with_proxy_admins<I, S>(mut self, ids: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.proxy_admins = ids.into_iter().map(Into::into).collect();
        self
    }

    /// A secret the proxy sends as `X-Proxy-Secret` (`STEWARD_PROXY_SECRET`): without
    /// it, or with another value, the `X-User-*` headers name nobody.
    #[must_use]
    pub fn with_proxy_secret(mut self, secret: impl Into<String>) -> Self {
        self.proxy_secret = Some(Arc::from(secret.into()));
        self
    }

    /// Whether the proxy must show a shared secret.
    #[must_use]
    pub fn has_proxy_secret(&self) -> bool {
        self.proxy_secret.is_some()
    }

    /// Whether `X-User-*` headers are trusted.
    #[must_use]
    pub fn trusts_proxy_headers(&self) -> bool {
        self.trust_proxy_headers
    }

    /// Whether a credential (a bearer token, or a trusted proxy's user header) is
    /// present: the probes identify such a caller to show it details.
    #[must_use]
    pub fn has_credentials(&self, headers: &HeaderMap) -> bool {
        headers.contains_key(header::AUTHORIZATION)
            || (self.trust_proxy_headers && headers.contains_key("x-user-id"))
    }

    /// Whether any way of authenticating is configured.
    #[must_use]
    pub fn is_configured(&self) -> bool {
        self.api_token.is_some() || self.oidc.is_some() || self.trust_proxy_headers
    }

    /// What is configured, for the start-up log.
    #[must_use]
    pub fn describe(&self) -> String {
        let mut ways = Vec::new();
        if let Some(oidc) = &self.oidc {
            ways.push(format!(
                "OIDC bearer tokens from {} for {}",
                oidc.config().issuer,
                oidc.config().audience
            ));
        }
        if self.api_token.is_some() {
            ways.push(format!(
                "the development token STEWARD_API_TOKEN as {DEVELOPMENT_ADMIN} ({TRE_ADMIN})"
            ));
        }
        if self.trust_proxy_headers {
            ways.push(format!(
                "X-User-* headers from an authenticating proxy ({TRE_USER}; {TRE_ADMIN}: {})",
                if self.proxy_admins.is_empty() {
                    "nobody".to_owned()
                } else {
                    self.proxy_admins.join(", ")
                }
            ));
        }
        if ways.is_empty() {
            format!("none: every caller is the development admin {DEVELOPMENT_ADMIN} ({TRE_ADMIN})")
        } else {
            ways.join("; ")
        }
    }

    /// The caller of a request with these headers.
    ///
    /// A bearer token is the development token or an OIDC token; without one, the
    /// proxy's headers when trusted; with nothing configured, the development admin.
    ///
    /// # Errors
    ///
    /// [`AuthError`]: no credentials, a refused token, or keys that cannot be fetched.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<User, AuthError> {
        if !self.is_configured() {
            return Ok(development_admin());
        }
        if let Some(token) = bearer(headers)? {
            if let Some(expected) = &self.api_token {
                if same_token(token.as_bytes(), expected.as_bytes()) {
                    return Ok(development_admin());
                }
            }
            let user = match &self.oidc {
                Some(oidc) => oidc.verify(token).await.map_err(|error| {
                    if error.is_unavailable() {
                        AuthError::Unavailable(error)
                    } else {
                        AuthError::InvalidToken(error)
                    }
                })?,
                None => return Err(AuthError::UnknownToken),
            };
            return not_reserved(user);
        }
        if self.trust_proxy_headers && self.shows_proxy_secret(headers) {
            if let Some(user) = proxy_user(headers, &self.proxy_admins) {
                return not_reserved(user);
            }
        }
        Err(AuthError::Missing)
    }
}

impl Authentication {
    /// Whether the request shows the proxy's secret, when one is configured.
    fn shows_proxy_secret(&self, headers: &HeaderMap) -> bool {
        let Some(secret) = &self.proxy_secret else { return true };
        single(headers, "x-proxy-secret")
            .is_ok_and(|given| given.is_some_and(|v| same_token(v.as_bytes(), secret.as_bytes())))
    }
}

/// The token of `Authorization: Bearer <token>`; none without the header.
fn bearer(headers: &HeaderMap) -> Result<Option<&str>, AuthError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else { return Ok(None) };
    let value = value.to_str().map_err(|_| AuthError::Missing)?;
    let (scheme, token) = value.trim().split_once(' ').ok_or(AuthError::Missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(AuthError::Missing);
    }
    Ok(Some(token.trim()))
}

/// Refuses a token's or a proxy's user who claims the development admin's id, so that
/// nobody aliases it (its workspace roles, its operations and history).
fn not_reserved(user: User) -> Result<User, AuthError> {
    if is_reserved(&user.id) { Err(AuthError::ReservedIdentity) } else { Ok(user) }
}

/// The one value of the header `name`: none without it, an error when it is given more
/// than once (which of them would the proxy have meant?).
fn single<'h>(headers: &'h HeaderMap, name: &str) -> Result<Option<&'h HeaderValue>, ()> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(());
    }
    Ok(first)
}

/// The user the proxy names, when it names one: `TREUser`, and `TREAdmin` when listed
/// in `admins`. `X-User-Roles` and any other header are ignored. Nobody when one of
/// TRE's three headers is given twice: a proxy that appends its own value rather than
/// replacing the client's would otherwise let the client's, which comes first, count.
fn proxy_user(headers: &HeaderMap, admins: &[String]) -> Option<User> {
    let mut given = [None; 3];
    for (value, name) in given.iter_mut().zip(["x-user-id", "x-user-name", "x-user-email"]) {
        *value = single(headers, name)
            .ok()?
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty());
    }
    let [id, name, email] = given;
    let id = id?;
    let mut user = User::new(id, name.unwrap_or(id), email.unwrap_or_default());
    user.roles = vec![TRE_USER.to_owned()];
    if admins.iter().any(|admin| admin == id) {
        user.roles.push(TRE_ADMIN.to_owned());
    }
    Some(user)
}

/// Compares without leaking, through timing, how much of the token matched.
fn same_token(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = given.len() ^ expected.len();
    for (i, byte) in expected.iter().enumerate() {
        diff |= usize::from(byte ^ given.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(
                axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    #[tokio::test]
    async fn with_nothing_configured_every_caller_is_the_development_admin() {
        let auth = Authentication::none();
        let user = auth.authenticate(&headers(&[("x-user-id", "mallory")])).await.unwrap();
        assert_eq!(user.id, DEVELOPMENT_ADMIN);
        assert_eq!(user.roles, [TRE_ADMIN]);
    }

    #[tokio::test]
    async fn the_development_token_is_the_admin_and_nothing_else_passes() {
        let auth = Authentication::none().with_api_token("s3cret");
        let user = auth.authenticate(&headers(&[("authorization", "Bearer s3cret")])).await;
        assert_eq!(user.unwrap().id, DEVELOPMENT_ADMIN);
        let wrong = auth.authenticate(&headers(&[("authorization", "Bearer s3creT")])).await;
        assert!(matches!(wrong, Err(AuthError::UnknownToken)), "{wrong:?}");
        let prefix = auth.authenticate(&headers(&[("authorization", "Bearer s3c")])).await;
        assert!(matches!(prefix, Err(AuthError::UnknownToken)), "{prefix:?}");
        let basic = auth.authenticate(&headers(&[("authorization", "Basic s3cret")])).await;
        assert!(matches!(basic, Err(AuthError::Missing)), "{basic:?}");
        let none = auth.authenticate(&headers(&[("x-user-id", "admin")])).await;
        assert!(matches!(none, Err(AuthError::Missing)), "spoofed headers ignored: {none:?}");
    }

    #[tokio::test]
    async fn proxy_headers_name_the_caller_only_when_trusted() {
        let spoofed = headers(&[
            ("x-user-id", "u-42"),
            ("x-user-name", "Ada"),
            ("x-user-email", "ada@example.com"),
            ("x-user-roles", "TREUser, Superuser"),
        ]);
        let trusted = Authentication::none().with_proxy_headers(true);
        let user = trusted.authenticate(&spoofed).await.unwrap();
        assert_eq!((user.id.as_str(), user.name.as_str()), ("u-42", "Ada"));
        assert_eq!(user.email, "ada@example.com");
        assert_eq!(user.roles, [TRE_USER], "unknown roles are dropped");
        let anonymous = trusted.authenticate(&HeaderMap::new()).await;
        assert!(matches!(anonymous, Err(AuthError::Missing)), "{anonymous:?}");

        let untrusted = Authentication::none().with_api_token("t");
        let refused = untrusted.authenticate(&spoofed).await;
        assert!(matches!(refused, Err(AuthError::Missing)), "{refused:?}");
    }

    #[tokio::test]
    async fn proxy_headers_give_identity_only_never_roles() {
        let trusted = Authentication::none().with_proxy_headers(true).with_proxy_admins(["ops-1"]);
        let spoofed = headers(&[("x-user-id", "mallory"), ("x-user-roles", "TREAdmin")]);
        let user = trusted.authenticate(&spoofed).await.unwrap();
        assert_eq!(user.id, "mallory");
        assert_eq!(user.roles, [TRE_USER], "X-User-Roles makes nobody an admin");
        let admin = trusted.authenticate(&headers(&[("x-user-id", "ops-1")])).await.unwrap();
        assert_eq!(admin.roles, [TRE_USER, TRE_ADMIN], "the configured admins are");
    }

    #[tokio::test]
    async fn nobody_but_the_development_token_is_the_development_admin() {
        let trusted = Authentication::none().with_proxy_headers(true).with_api_token("t");
        for id in [DEVELOPMENT_ADMIN, "Steward-Admin", " steward-admin "] {
            let refused = trusted.authenticate(&headers(&[("x-user-id", id)])).await;
            assert!(matches!(refused, Err(AuthError::ReservedIdentity)), "{id}: {refused:?}");
        }
        let user = trusted.authenticate(&headers(&[("authorization", "Bearer t")])).await;
        assert_eq!(user.unwrap().id, DEVELOPMENT_ADMIN);
    }

    #[tokio::test]
    async fn with_a_proxy_secret_only_the_proxy_names_callers() {
        let auth = Authentication::none().with_proxy_headers(true).with_proxy_secret("p-s3cret");
        for secret in [None, Some("wrong"), Some("p-s3cre")] {
            let mut pairs = vec![("x-user-id", "u-1")];
            pairs.extend(secret.map(|s| ("x-proxy-secret", s)));
            let refused = auth.authenticate(&headers(&pairs)).await;
            assert!(matches!(refused, Err(AuthError::Missing)), "{secret:?}: {refused:?}");
        }
        let pairs = [("x-user-id", "u-1"), ("x-proxy-secret", "p-s3cret")];
        assert_eq!(auth.authenticate(&headers(&pairs)).await.unwrap().id, "u-1");
        assert!(!format!("{auth:?}").contains("p-s3cret"));
    }

    #[tokio::test]
    async fn a_proxy_header_given_twice_names_nobody() {
        // A proxy that appends its X-User-Id rather than replacing the client's would
        // otherwise let the client's own value, which comes first, name the caller.
        let auth = Authentication::none().with_proxy_headers(true).with_proxy_secret("p");
        for name in ["x-user-id", "x-user-name", "x-user-email", "x-proxy-secret"] {
            let mut map = headers(&[("x-user-id", "u-1"), ("x-proxy-secret", "p")]);
            let spoofed = if name == "x-proxy-secret" { "p" } else { "victim" };
            map.insert(axum::http::HeaderName::from_static(name), spoofed.parse().unwrap());
            map.append(
                axum::http::HeaderName::from_static(name),
                if name == "x-user-id" || name == "x-proxy-secret" { "u-1" } else { "x" }
                    .parse()
                    .unwrap(),
            );
            let refused = auth.authenticate(&map).await;
            assert!(matches!(refused, Err(AuthError::Missing)), "{name}: {refused:?}");
        }
    }

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let auth = Authentication::none().with_api_token("s3cret-value");
        let text = format!("{auth:?}");
        assert!(!text.contains("s3cret-value"), "{text}");
        assert!(text.contains("REDACTED"), "{text}");
    }
}
