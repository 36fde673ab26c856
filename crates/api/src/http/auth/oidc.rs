//! OIDC bearer tokens: the issuer's discovery document, its key set (cached, refetched
//! on an unknown `kid` at most once per interval), and the checks of each token.
//!
//! Accepted: RS256 with an RSA key and ES256 with a P-256 key of the issuer's key set,
//! chosen by the token's `kid`. Refused before any key is looked at: `none`, HMAC and
//! every other algorithm. Checked: the signature, `iss`, `aud`, `exp` and `nbf`, the
//! times with [`LEEWAY`].

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::domain::User;

/// How far `exp` and `nbf` may be off, for clocks that differ a little.
pub const LEEWAY: Duration = Duration::from_secs(60);

/// How long fetched keys are used before they are fetched again on the next token.
pub const KEYS_MAX_AGE: Duration = Duration::from_secs(3600);

/// The default shortest time between two fetches of the key set after one succeeded,
/// however many unknown `kid`s arrive meanwhile.
pub const REFETCH_INTERVAL: Duration = Duration::from_secs(60);

/// The shortest time between two fetches after one failed.
const RETRY_INTERVAL: Duration = Duration::from_secs(5);

/// How long one fetch of the discovery document or the key set may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// How long connecting to the issuer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The global roles of TRE, as the `roles` claim names them.
pub const GLOBAL_ROLES: [&str; 2] = ["TREAdmin", "TREUser"];

/// Where the tokens come from and whom they are for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcConfig {
    /// The issuer, as the tokens' `iss` names it; discovery is at
    /// `<issuer>/.well-known/openid-configuration`.
    pub issuer: String,
    /// The audience the tokens must name in `aud`.
    pub audience: String,
    /// The key set, instead of the discovery document's `jwks_uri`.
    pub jwks_url: Option<String>,
}

/// Why a token was refused, or could not be checked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not three base64url parts with a JSON header.
    #[error("the token is malformed")]
    Malformed,
    /// An algorithm other than RS256 and ES256 (`none` and HMAC included).
    #[error("the token's algorithm {0:?} is not accepted (RS256 and ES256 are)")]
    Algorithm(String),
    /// No `kid` in the header.
    #[error("the token names no key (kid)")]
    MissingKeyId,
    /// A `kid` the issuer's key set does not have.
    #[error("the token's key {0:?} is not one of the issuer's")]
    UnknownKey(String),
    /// The algorithm does not fit the key the `kid` names.
    #[error("the token's algorithm does not fit its key {0:?}")]
    KeyMismatch(String),
    /// The signature does not verify.
    #[error("the token's signature is invalid")]
    Signature,
    /// Past `exp`.
    #[error("the token has expired")]
    Expired,
    /// Before `nbf`.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// `aud` does not name this service.
    #[error("the token is for another audience")]
    Audience,
    /// `iss` is another issuer.
    #[error("the token is from another issuer")]
    Issuer,
    /// Neither `oid` nor `sub`.
    #[error("the token names no user (oid or sub)")]
    NoSubject,
    /// Another check failed (a required claim missing or of the wrong type).
    #[error("the token is invalid")]
    Invalid(#[source] jsonwebtoken::errors::Error),
    /// The issuer's keys could not be fetched, so the token could not be checked.
    #[error("the issuer's keys are unavailable")]
    KeysUnavailable(#[source] KeySetError),
}

impl TokenError {
    /// What was wrong, in a fixed text that repeats nothing of the token: for the
    /// `WWW-Authenticate` challenge and the answer, where the token's `kid` or `alg`
    /// (chosen by whoever made it) must not be echoed.
    #[must_use]
    pub fn summary(&self) -> &'static str {
        match self {
            TokenError::Malformed => "the token is malformed",
            TokenError::Algorithm(_) => {
                "the token's algorithm is not accepted (RS256 and ES256 are)"
            }
            TokenError::MissingKeyId => "the token names no key (kid)",
            TokenError::UnknownKey(_) => "the token's key is not one of the issuer's",
            TokenError::KeyMismatch(_) => "the token's algorithm does not fit its key",
            TokenError::Signature => "the token's signature is invalid",
            TokenError::Expired => "the token has expired",
            TokenError::NotYetValid => "the token is not valid yet",
            TokenError::Audience => "the token is for another audience",
            TokenError::Issuer => "the token is from another issuer",
            TokenError::NoSubject => "the token names no user (oid or sub)",
            TokenError::Invalid(_) => "the token is invalid",
            TokenError::KeysUnavailable(_) => "the issuer's keys are unavailable",
        }
    }

    /// Whether the failure is the service's (the keys could not be fetched), not the
    /// token's.
    #[must_use]
    pub fn is_unavailable(&self) -> bool {
        matches!(self, TokenError::KeysUnavailable(_))
    }
}

/// Why the discovery document or the key set could not be fetched.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeySetError {
    /// The request failed or answered an error status.
    #[error("fetching {url} failed")]
    Fetch {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// The answer is not the JSON expected.
    #[error("{url} did not answer the expected JSON")]
    Parse {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The discovery document names another issuer.
    #[error("the discovery document names the issuer {found:?}, not {expected:?}")]
    IssuerMismatch {
        /// The configured issuer.
        expected: String,
        /// The document's.
        found: String,
    },
    /// The HTTP client could not be built.
    #[error("the HTTP client cannot be built")]
    Client(#[source] reqwest::Error),
    /// No usable key has been fetched (the last fetch failed, and the next is not due
    /// yet; or the set has no RS256 or ES256 key).
    #[error("no signing key of the issuer is at hand; the last fetch failed or found none")]
    NoKeys,
    /// The issuer, the key set or the discovery document's `jwks_uri` is not an https
    /// URL (plain http is allowed for a loopback host only).
    #[error("{url:?} must be an https URL (http only on a loopback host)")]
    InsecureUrl {
        /// The URL.
        url: String,
    },
    /// The answer was not a success: a redirect (never followed) or an error status.
    #[error("{url} answered {status}")]
    Status {
        /// The URL.
        url: String,
        /// The status.
        status: reqwest::StatusCode,
    },
}

/// Refuses a URL that is not https, unless its host is a loopback one (a local test
/// issuer): keys fetched over plain http could be swapped on the way.
fn require_https(url: &str) -> Result<(), KeySetError> {
    let insecure = || KeySetError::InsecureUrl { url: url.to_owned() };
    let parsed = reqwest::Url::parse(url).map_err(|_| insecure())?;
    let host = parsed.host_str().ok_or_else(insecure)?;
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err(insecure()),
    }
}

/// One key of the set, with the one algorithm it verifies.
#[derive(Clone)]
struct VerifyingKey {
    algorithm: Algorithm,
    key: DecodingKey,
}

/// The keys by `kid`.
#[derive(Default)]
struct KeySet {
    keys: HashMap<String, VerifyingKey>,
    fetched_at: Option<Instant>,
}

/// The last fetch: when, and whether it worked.
#[derive(Debug, Clone, Copy)]
struct LastFetch {
    at: Instant,
    succeeded: bool,
}

/// The claims read from a token.
#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    oid: Option<String>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    preferred_username: Option<String>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
}

/// Checks OIDC bearer tokens against an issuer's keys.
pub struct OidcVerifier {
    config: OidcConfig,
    client: reqwest::Client,
    keys: RwLock<Arc<KeySet>>,
    /// Held while fetching, so concurrent requests fetch once.
    last_fetch: tokio::sync::Mutex<Option<LastFetch>>,
    refetch_interval: Duration,
    clock: Clock,
}

/// Whether a request that would fetch the keys waits for a fetch in progress.
#[derive(Debug, Clone, Copy)]
enum Wait {
    /// Wait: the request needs the fetch's keys (none yet, or an unknown `kid`).
    Yes,
    /// Go on with the keys there are.
    No,
}

/// Reads the time that the refetch interval and the keys' age are measured in.
pub type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

impl std::fmt::Debug for OidcVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcVerifier")
            .field("config", &self.config)
            .field("refetch_interval", &self.refetch_interval)
            .finish_non_exhaustive()
    }
}

impl OidcVerifier {
    /// A verifier for `config`; nothing is fetched until the first token.
    ///
    /// The issuer and the key set must be https URLs (plain http only on a loopback
    /// host), and redirects are never followed: the keys decide who may call.
    ///
    /// # Errors
    ///
    /// An issuer or key set URL that is not https, or the HTTP client cannot be built
    /// (no TLS backend).
    pub fn new(config: OidcConfig) -> Result<Self, KeySetError> {
        require_https(&config.issuer)?;
        if let Some(url) = &config.jwks_url {
            require_https(url)?;
        }
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(KeySetError::Client)?;
        Ok(OidcVerifier {
            config,
            client,
            keys: RwLock::new(Arc::new(KeySet::default())),
            last_fetch: tokio::sync::Mutex::new(None),
            refetch_interval: REFETCH_INTERVAL,
            clock: Arc::new(Instant::now),
        })
    }

    /// Sets the shortest time between two fetches of the key set (default
    /// [`REFETCH_INTERVAL`]): an unknown `kid` within it is refused without a fetch.
    #[must_use]
    pub fn with_refetch_interval(mut self, interval: Duration) -> Self {
        self.refetch_interval = interval;
        self
    }

    /// Measures the refetch interval and the keys' age with `clock` instead of the
    /// system's monotonic clock (for tests).
    #[must_use]
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    fn elapsed_since(&self, at: Instant) -> Duration {
        (self.clock)().saturating_duration_since(at)
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &OidcConfig {
        &self.config
    }

    /// Checks `token` and returns its user: id from `oid`, else `sub`; name from
    /// `name`; e-mail from `preferred_username`, else `email`; the global roles of
    /// `roles` that TRE knows ([`GLOBAL_ROLES`]).
    ///
    /// # Errors
    ///
    /// The token is refused ([`TokenError`]), or the keys cannot be fetched
    /// ([`TokenError::KeysUnavailable`]).
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: a fetch cut short leaves the cached keys as they were.
    pub async fn verify(&self, token: &str) -> Result<User, TokenError> {
        let (algorithm, kid) = read_header(token)?;
        let current = self.current();
        match current.fetched_at {
            // No keys yet: nothing to check with but what this fetch brings.
            None => self.refetch(Wait::Yes).await?,
            // Old keys: fetch new ones, unless another request is at it; meanwhile the
            // old ones serve, so an issuer that hangs stalls one request, not all.
            Some(at) if self.elapsed_since(at) >= KEYS_MAX_AGE => {
                self.refetch(Wait::No).await?;
            }
            Some(_) => {}
        }
        if self.current().keys.is_empty() {
            // Not the token's fault: no token could be checked now.
            return Err(TokenError::KeysUnavailable(KeySetError::NoKeys));
        }
        let key = match self.current().keys.get(&kid).cloned() {
            Some(key) => key,
            None => {
                self.refetch(Wait::Yes).await?;
                self.current().keys.get(&kid).cloned().ok_or(TokenError::UnknownKey(kid.clone()))?
            }
        };
        if key.algorithm != algorithm {
            return Err(TokenError::KeyMismatch(kid));
        }
        let mut validation = Validation::new(algorithm);
        validation.leeway = LEEWAY.as_secs();
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let claims = jsonwebtoken::decode::<Claims>(token, &key.key, &validation)
            .map_err(token_error)?
            .claims;
        user(claims)
    }

    fn current(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Fetches the key set unless the last fetch is too recent, or, with [`Wait::No`],
    /// another request is fetching it now. A failed fetch keeps the keys there are;
    /// with none, the token cannot be checked. Each fetch is bounded by
    /// [`FETCH_TIMEOUT`] per document.
    async fn refetch(&self, wait: Wait) -> Result<(), TokenError> {
        let mut last = match wait {
            Wait::Yes => self.last_fetch.lock().await,
            Wait::No => match self.last_fetch.try_lock() {
                Ok(last) => last,
                Err(_) => return Ok(()),
            },
        };
        let due = match *last {
            None => true,
            Some(LastFetch { at, succeeded: true }) => {
                self.elapsed_since(at) >= self.refetch_interval
            }
            Some(LastFetch { at, succeeded: false }) => self.elapsed_since(at) >= RETRY_INTERVAL,
        };
        if !due {
            return Ok(());
        }
        let fetched = self.fetch().await;
        *last = Some(LastFetch { at: (self.clock)(), succeeded: fetched.is_ok() });
        match fetched {
            Ok(keys) => {
                tracing::info!(issuer = %self.config.issuer, keys = keys.keys.len(), "fetched the issuer's signing keys");
                *self.keys.write().unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Arc::new(keys);
                Ok(())
            }
            Err(error) if self.current().keys.is_empty() => {
                tracing::error!(issuer = %self.config.issuer, error = %steward_core::error_chain(&error), "cannot fetch the issuer's signing keys");
                Err(TokenError::KeysUnavailable(error))
            }
            Err(error) => {
                tracing::warn!(issuer = %self.config.issuer, error = %steward_core::error_chain(&error), "cannot fetch the issuer's signing keys; using those fetched before");
                Ok(())
            }
        }
    }

    async fn fetch(&self) -> Result<KeySet, KeySetError> {
        let jwks_url = match &self.config.jwks_url {
            Some(url) => url.clone(),
            None => {
                let url = format!(
                    "{}/.well-known/openid-configuration",
                    self.config.issuer.trim_end_matches('/')
                );
                let discovery: Discovery = self.get_json(&url).await?;
                if discovery.issuer != self.config.issuer {
                    return Err(KeySetError::IssuerMismatch {
                        expected: self.config.issuer.clone(),
                        found: discovery.issuer,
                    });
                }
                require_https(&discovery.jwks_uri)?;
                discovery.jwks_uri
            }
        };
        let set: JwkSet = self.get_json(&jwks_url).await?;
        let jwks: Vec<Jwk> =
            set.keys.into_iter().filter_map(|value| serde_json::from_value(value).ok()).collect();
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for kid in jwks.iter().filter_map(|jwk| jwk.kid.as_deref()) {
            *seen.entry(kid).or_default() += 1;
        }
        let mut keys = HashMap::new();
        for jwk in &jwks {
            let Some(kid) = jwk.kid.as_deref() else { continue };
            if seen.get(kid).is_some_and(|count| *count > 1) {
                // Which key would a token naming it mean? Neither: refuse both.
                tracing::warn!(issuer = %self.config.issuer, kid, "the key set names this kid more than once; no token signed under it is accepted");
                continue;
            }
            match jwk.verifying_key() {
                Some(key) => {
                    keys.insert(kid.to_owned(), key);
                }
                None => {
                    tracing::debug!(kid, kty = %jwk.kty, "skipping a key that cannot verify RS256 or ES256");
                }
            }
        }
        Ok(KeySet { keys, fetched_at: Some((self.clock)()) })
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, KeySetError> {
        let fetch_error = |source| KeySetError::Fetch { url: url.to_owned(), source };
        let response = self.client.get(url).send().await.map_err(fetch_error)?;
        if !response.status().is_success() {
            return Err(KeySetError::Status { url: url.to_owned(), status: response.status() });
        }
        let bytes = response.bytes().await.map_err(fetch_error)?;
        serde_json::from_slice(&bytes)
            .map_err(|source| KeySetError::Parse { url: url.to_owned(), source })
    }
}

/// The part of the discovery document used.
#[derive(Debug, Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

/// A key set; each key is read on its own, so one this service cannot use does not
/// spoil the others.
#[derive(Debug, Deserialize)]
struct JwkSet {
    keys: Vec<serde_json::Value>,
}

/// The fields of a JSON Web Key used here.
#[derive(Debug, Deserialize)]
struct Jwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default, rename = "use")]
    usage: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

impl Jwk {
    /// The key and its algorithm: an RSA key verifies RS256, a P-256 key ES256; a key
    /// for encryption, or one whose `alg` says otherwise, verifies nothing.
    fn verifying_key(&self) -> Option<VerifyingKey> {
        if self.usage.as_deref().is_some_and(|usage| usage != "sig") {
            return None;
        }
        let (algorithm, key) = match (self.kty.as_str(), self.crv.as_deref()) {
            ("RSA", _) => (
                Algorithm::RS256,
                DecodingKey::from_rsa_components(self.n.as_deref()?, self.e.as_deref()?).ok()?,
            ),
            ("EC", Some("P-256")) => (
                Algorithm::ES256,
                DecodingKey::from_ec_components(self.x.as_deref()?, self.y.as_deref()?).ok()?,
            ),
            _ => return None,
        };
        let named = match algorithm {
            Algorithm::RS256 => "RS256",
            _ => "ES256",
        };
        if self.alg.as_deref().is_some_and(|alg| alg != named) {
            return None;
        }
        Some(VerifyingKey { algorithm, key })
    }
}

/// The token's algorithm and `kid`, read before any key is chosen, so that `none`,
/// HMAC and every other algorithm are refused by name.
fn read_header(token: &str) -> Result<(Algorithm, String), TokenError> {
    #[derive(Deserialize)]
    struct Header {
        alg: String,
        #[serde(default)]
        kid: Option<String>,
    }
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| TokenError::Malformed)?;
    let header: Header = serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)?;
    let algorithm = match header.alg.as_str() {
        "RS256" => Algorithm::RS256,
        "ES256" => Algorithm::ES256,
        _ => return Err(TokenError::Algorithm(header.alg)),
    };
    let kid = header.kid.filter(|kid| !kid.is_empty()).ok_or(TokenError::MissingKeyId)?;
    Ok((algorithm, kid))
}

fn token_error(error: jsonwebtoken::errors::Error) -> TokenError {
    use jsonwebtoken::errors::ErrorKind;
    match error.kind() {
        ErrorKind::InvalidSignature => TokenError::Signature,
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidAudience => TokenError::Audience,
        ErrorKind::InvalidIssuer => TokenError::Issuer,
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => TokenError::Malformed,
        _ => TokenError::Invalid(error),
    }
}

fn user(claims: Claims) -> Result<User, TokenError> {
    let non_empty = |value: Option<String>| value.filter(|v| !v.trim().is_empty());
    let id = non_empty(claims.oid).or(non_empty(claims.sub)).ok_or(TokenError::NoSubject)?;
    let name = non_empty(claims.name).unwrap_or_else(|| id.clone());
    let email =
        non_empty(claims.preferred_username).or(non_empty(claims.email)).unwrap_or_default();
    let mut user = User::new(id, name, email);
    user.roles =
        claims.roles.into_iter().filter(|role| GLOBAL_ROLES.contains(&role.as_str())).collect();
    Ok(user)
}
