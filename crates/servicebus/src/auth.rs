//! Credentials: shared access signatures, and Entra ID bearer tokens from a
//! [`TokenProvider`] (managed identity in production).
//!
//! Both are applied by [`HttpClient`] wrappers, so every request the Azure crate makes
//! (sends, peek-locks and settlements through lock URIs) carries credentials for the URL
//! it really goes to, including a rewritten endpoint.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use azure_core::error::ErrorKind as AzureKind;
use azure_core::headers::{AUTHORIZATION, HeaderName};
use azure_core::{HttpClient, Method, Request, Response, StatusCode, Url};
use serde::Deserialize;
use steward_core::ErrorKind;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// The audience of Service Bus tokens: the resource of a managed identity request
/// (the scope `https://servicebus.azure.net/.default` without `/.default`).
pub const SERVICE_BUS_RESOURCE: &str = "https://servicebus.azure.net";

/// The Azure Instance Metadata Service token endpoint, where virtual machines and AKS
/// pods get managed identity tokens.
pub const IMDS_TOKEN_ENDPOINT: &str = "http://169.254.169.254/metadata/identity/oauth2/token";

/// How long a shared access signature made for one request stays valid.
const SAS_TTL: Duration = Duration::from_secs(60 * 60);

/// A secret string (a key or a token) whose `Debug` output is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    #[must_use]
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself; never log it.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl From<String> for Secret {
    fn from(secret: String) -> Self {
        Self(secret)
    }
}

impl From<&str> for Secret {
    fn from(secret: &str) -> Self {
        Self(secret.to_owned())
    }
}

// ---- shared access signatures ----------------------------------------------------------

/// A shared access signature for `resource` (a URL without query) valid until `expiry`:
/// `SharedAccessSignature sr=<url-encoded resource>&sig=<HMAC-SHA256>&se=<expiry>&skn=<key name>`.
fn sas_token(
    resource: &str,
    key_name: &str,
    key: &Secret,
    expiry: SystemTime,
) -> azure_core::Result<String> {
    let sr: String = url::form_urlencoded::byte_serialize(resource.as_bytes()).collect();
    let se = expiry.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    // azure_core's HMAC takes a base64 key; Service Bus signs with the key's text bytes.
    let key = azure_core::auth::Secret::new(azure_core::base64::encode(key.expose()));
    let signature = azure_core::hmac::hmac_sha256(&format!("{sr}\n{se}"), &key)?;
    let sig: String = url::form_urlencoded::byte_serialize(signature.as_bytes()).collect();
    Ok(format!("SharedAccessSignature sr={sr}&sig={sig}&se={se}&skn={key_name}"))
}

/// The resource a request's signature covers: its URL without query or fragment.
fn resource_of(url: &Url) -> String {
    let mut resource = url.clone();
    resource.set_query(None);
    resource.set_fragment(None);
    resource.to_string()
}

/// Signs every request with a shared access signature for its own URL.
#[derive(Debug)]
pub(crate) struct SasClient {
    inner: Arc<dyn HttpClient>,
    key_name: String,
    key: Secret,
}

impl SasClient {
    pub(crate) fn new(inner: Arc<dyn HttpClient>, key_name: String, key: Secret) -> Self {
        Self { inner, key_name, key }
    }
}

#[async_trait]
impl HttpClient for SasClient {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<Response> {
        let token = sas_token(
            &resource_of(request.url()),
            &self.key_name,
            &self.key,
            SystemTime::now() + SAS_TTL,
        )?;
        let mut request = request.clone();
        request.insert_header(AUTHORIZATION, token);
        self.inner.execute_request(&request).await
    }
}

// ---- bearer tokens ---------------------------------------------------------------------

/// Why a [`TokenProvider`] has no token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The token endpoint is unreachable or answered with a server error: retry later.
    #[error("no token for Service Bus (retryable): {message}")]
    Unavailable {
        /// What went wrong.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The token endpoint refused: no such identity, no permission, a bad answer. Fix the
    /// configuration.
    #[error("no token for Service Bus: {message}")]
    Refused {
        /// What went wrong.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl TokenError {
    /// A [`TokenError::Unavailable`] without a source.
    #[must_use]
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::Unavailable { message: message.into(), source: None }
    }

    /// A [`TokenError::Refused`] without a source.
    #[must_use]
    pub fn refused(message: impl Into<String>) -> Self {
        Self::Refused { message: message.into(), source: None }
    }

    /// The [`TransportError`](steward_core::TransportError) kind this error becomes:
    /// `Connection` (retryable) or `Auth`.
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Unavailable { .. } => ErrorKind::Connection,
            Self::Refused { .. } => ErrorKind::Auth,
        }
    }
}

/// An access token and when it expires.
#[derive(Debug, Clone)]
pub struct AccessToken {
    token: Secret,
    expires_on: SystemTime,
}

impl AccessToken {
    /// A token valid until `expires_on`.
    #[must_use]
    pub fn new(token: impl Into<Secret>, expires_on: SystemTime) -> Self {
        Self { token: token.into(), expires_on }
    }

    /// The token; never log it.
    #[must_use]
    pub fn secret(&self) -> &Secret {
        &self.token
    }

    /// When the token expires.
    #[must_use]
    pub fn expires_on(&self) -> SystemTime {
        self.expires_on
    }
}

/// Where Entra ID bearer tokens for Service Bus (audience [`SERVICE_BUS_RESOURCE`]) come
/// from. [`BearerTokenClient`] caches them and asks for a new one before the old one
/// expires.
#[async_trait]
pub trait TokenProvider: Send + Sync + fmt::Debug + 'static {
    /// Fetches a new token.
    ///
    /// # Errors
    ///
    /// [`TokenError::Unavailable`] when it may work later, [`TokenError::Refused`] when
    /// the configuration is wrong.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe as long as fetching has no side effects.
    async fn fetch_token(&self) -> Result<AccessToken, TokenError>;
}

/// A fixed token (for tests and for tokens managed outside the process).
#[derive(Debug, Clone)]
pub struct StaticToken(AccessToken);

impl StaticToken {
    /// Always hands out `token`.
    #[must_use]
    pub fn new(token: AccessToken) -> Self {
        Self(token)
    }
}

#[async_trait]
impl TokenProvider for StaticToken {
    async fn fetch_token(&self) -> Result<AccessToken, TokenError> {
        Ok(self.0.clone())
    }
}

/// A cached token: used until `refresh_at`, valid until `expires_at` (tokio time, so
/// paused-time tests can age it).
#[derive(Debug)]
struct Cached {
    token: Secret,
    refresh_at: Instant,
    expires_at: Instant,
}

/// How long before its expiry a token is replaced: five minutes, or half its lifetime
/// for shorter-lived tokens.
const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);

/// Wraps an [`HttpClient`] and sends every request with `Authorization: Bearer <token>`
/// from a [`TokenProvider`].
///
/// The token is fetched on first use, cached, and replaced once it is within five
/// minutes of expiring (or half-way through its life, for short-lived tokens). Only one
/// fetch runs at a time. When a refresh fails while the cached token is still valid, the
/// cached one is used (and the failure logged); once it has expired, requests fail with
/// the [`TokenError`] (as their source), which the transport maps to `Auth` or, for
/// [`TokenError::Unavailable`], a retryable `Connection` error.
#[derive(Debug)]
pub struct BearerTokenClient {
    inner: Arc<dyn HttpClient>,
    provider: Arc<dyn TokenProvider>,
    cache: Mutex<Option<Cached>>,
}

impl BearerTokenClient {
    /// Sends through `inner` with tokens from `provider`.
    #[must_use]
    pub fn new(inner: Arc<dyn HttpClient>, provider: Arc<dyn TokenProvider>) -> Self {
        Self { inner, provider, cache: Mutex::new(None) }
    }

    /// The current token, fetching a new one when needed.
    async fn token(&self) -> azure_core::Result<Secret> {
        let mut cache = self.cache.lock().await;
        let now = Instant::now();
        if let Some(cached) = cache.as_ref().filter(|c| now < c.refresh_at) {
            return Ok(cached.token.clone());
        }
        match self.provider.fetch_token().await {
            Ok(fresh) => {
                let lifetime =
                    fresh.expires_on.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
                let expires_at = now + lifetime;
                let refresh_at = expires_at - REFRESH_MARGIN.min(lifetime / 2);
                tracing::debug!(valid_for = ?lifetime, "fetched a Service Bus token");
                let token = fresh.token.clone();
                *cache = Some(Cached { token: fresh.token, refresh_at, expires_at });
                Ok(token)
            }
            Err(error) => match cache.as_ref().filter(|c| now < c.expires_at) {
                Some(cached) => {
                    tracing::warn!(
                        error = %steward_core::error_chain(&error),
                        "refreshing the Service Bus token failed; using the current one until it expires"
                    );
                    Ok(cached.token.clone())
                }
                None => Err(azure_core::Error::full(
                    AzureKind::Credential,
                    error,
                    "no bearer token for Service Bus",
                )),
            },
        }
    }
}

#[async_trait]
impl HttpClient for BearerTokenClient {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<Response> {
        let token = self.token().await?;
        let mut request = request.clone();
        request.insert_header(AUTHORIZATION, format!("Bearer {}", token.expose()));
        self.inner.execute_request(&request).await
    }
}

// ---- managed identity ------------------------------------------------------------------

/// Which managed identity protocol to speak.
#[derive(Debug, Clone)]
enum Flavour {
    /// The Instance Metadata Service (VMs, AKS): `Metadata: true`, api-version 2018-02-01.
    Imds,
    /// App Service and Container Apps: `X-IDENTITY-HEADER`, api-version 2019-08-01.
    AppService { header: Secret },
}

/// Tokens for Service Bus from an Azure managed identity, as TRE's API gets them
/// (`MANAGED_IDENTITY_CLIENT_ID` names a user-assigned identity).
///
/// [`from_env`](Self::from_env) speaks the App Service / Container Apps protocol when
/// `IDENTITY_ENDPOINT` and `IDENTITY_HEADER` are set (as those platforms set them), and
/// otherwise asks the Instance Metadata Service ([`IMDS_TOKEN_ENDPOINT`]).
#[derive(Debug, Clone)]
pub struct ManagedIdentityCredential {
    http: Arc<dyn HttpClient>,
    endpoint: String,
    flavour: Flavour,
    client_id: Option<String>,
}

/// A token endpoint's answer (both protocols). `expires_in` and `expires_on` are strings
/// on some platforms and numbers on others.
#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<NumberOrText>,
    #[serde(default)]
    expires_on: Option<NumberOrText>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrText {
    Number(u64),
    Text(String),
}

impl NumberOrText {
    fn seconds(&self) -> Option<u64> {
        match self {
            Self::Number(n) => Some(*n),
            Self::Text(text) => text.trim().parse().ok(),
        }
    }
}

impl ManagedIdentityCredential {
    /// The Instance Metadata Service protocol at [`IMDS_TOKEN_ENDPOINT`], for the
    /// user-assigned identity `client_id` (or the system-assigned one).
    #[must_use]
    pub fn imds(http: Arc<dyn HttpClient>, client_id: Option<String>) -> Self {
        Self { http, endpoint: IMDS_TOKEN_ENDPOINT.to_owned(), flavour: Flavour::Imds, client_id }
    }

    /// The App Service / Container Apps protocol: `endpoint` is `IDENTITY_ENDPOINT`,
    /// `header` is `IDENTITY_HEADER`.
    #[must_use]
    pub fn app_service(
        http: Arc<dyn HttpClient>,
        endpoint: impl Into<String>,
        header: impl Into<Secret>,
        client_id: Option<String>,
    ) -> Self {
        Self {
            http,
            endpoint: endpoint.into(),
            flavour: Flavour::AppService { header: header.into() },
            client_id,
        }
    }

    /// [`app_service`](Self::app_service) when `IDENTITY_ENDPOINT` and `IDENTITY_HEADER`
    /// are set, else [`imds`](Self::imds).
    #[must_use]
    pub fn from_env(http: Arc<dyn HttpClient>, client_id: Option<String>) -> Self {
        Self::from_lookup(http, client_id, |name| std::env::var(name).ok())
    }

    /// [`from_env`](Self::from_env) over any source of variables.
    #[must_use]
    pub fn from_lookup(
        http: Arc<dyn HttpClient>,
        client_id: Option<String>,
        var: impl Fn(&str) -> Option<String>,
    ) -> Self {
        let set = |name| var(name).filter(|v: &String| !v.trim().is_empty());
        match (set("IDENTITY_ENDPOINT"), set("IDENTITY_HEADER")) {
            (Some(endpoint), Some(header)) => Self::app_service(http, endpoint, header, client_id),
            _ => Self::imds(http, client_id),
        }
    }

    /// Sends token requests to `endpoint` instead (a test double, or an IMDS proxy).
    #[must_use]
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = endpoint.into();
        self
    }

    fn request(&self) -> Result<Request, TokenError> {
        let mut url = Url::parse(&self.endpoint).map_err(|e| TokenError::Refused {
            message: format!("invalid managed identity endpoint {:?}", self.endpoint),
            source: Some(Box::new(e)),
        })?;
        let api_version = match self.flavour {
            Flavour::Imds => "2018-02-01",
            Flavour::AppService { .. } => "2019-08-01",
        };
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("api-version", api_version);
            query.append_pair("resource", SERVICE_BUS_RESOURCE);
            if let Some(client_id) = &self.client_id {
                query.append_pair("client_id", client_id);
            }
        }
        let mut request = Request::new(url, Method::Get);
        match &self.flavour {
            Flavour::Imds => request.insert_header(HeaderName::from_static("metadata"), "true"),
            Flavour::AppService { header } => request.insert_header(
                HeaderName::from_static("x-identity-header"),
                header.expose().to_owned(),
            ),
        }
        Ok(request)
    }
}

#[async_trait]
impl TokenProvider for ManagedIdentityCredential {
    async fn fetch_token(&self) -> Result<AccessToken, TokenError> {
        let request = self.request()?;
        let response =
            self.http.execute_request(&request).await.map_err(|e| TokenError::Unavailable {
                message: format!("managed identity endpoint {} unreachable", self.endpoint),
                source: Some(Box::new(e)),
            })?;
        let status = response.status();
        let body = response.into_body().collect().await.map_err(|e| TokenError::Unavailable {
            message: "reading the managed identity answer".to_owned(),
            source: Some(Box::new(e)),
        })?;
        if status != StatusCode::Ok {
            let text = String::from_utf8_lossy(&body);
            let text: String = text.chars().take(300).collect();
            let message = format!("managed identity endpoint answered {status}: {text}");
            let code = u16::from(status);
            // IMDS answers 404/410 while it starts, 429 when throttled, 5xx when down.
            return Err(if matches!(code, 404 | 408 | 410 | 429 | 500..=599) {
                TokenError::unavailable(message)
            } else {
                TokenError::refused(message)
            });
        }
        let parsed: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| TokenError::Refused {
                message: "the managed identity answer is not a token".to_owned(),
                source: Some(Box::new(e)),
            })?;
        let expires_on = if let Some(seconds) =
            parsed.expires_in.as_ref().and_then(NumberOrText::seconds)
        {
            SystemTime::now() + Duration::from_secs(seconds)
        } else if let Some(seconds) = parsed.expires_on.as_ref().and_then(NumberOrText::seconds) {
            SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
        } else {
            return Err(TokenError::refused("the managed identity answer has no expiry"));
        };
        Ok(AccessToken::new(parsed.access_token, expires_on))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;
    use std::sync::atomic::{AtomicU32, Ordering};

    use azure_core::headers::Headers;

    use super::*;

    /// An inner client that records the `Authorization` header of each request.
    #[derive(Debug, Default)]
    struct Recorder {
        seen: StdMutex<Vec<String>>,
    }

    #[async_trait]
    impl HttpClient for Recorder {
        async fn execute_request(&self, request: &Request) -> azure_core::Result<Response> {
            let auth = request.headers().get_optional_string(&AUTHORIZATION).unwrap_or_default();
            self.seen.lock().unwrap().push(auth);
            let body = Box::pin(futures::stream::iter(std::iter::once(Ok(bytes::Bytes::new()))));
            Ok(Response::new(StatusCode::Ok, Headers::new(), body))
        }
    }

    /// Hands out `<prefix>-1`, `<prefix>-2`, … valid for `lifetime`, or fails when told to.
    #[derive(Debug)]
    struct Counting {
        prefix: &'static str,
        lifetime: Duration,
        fetches: AtomicU32,
        fail: std::sync::atomic::AtomicBool,
    }

    impl Counting {
        fn new(prefix: &'static str, lifetime: Duration) -> Self {
            Self { prefix, lifetime, fetches: AtomicU32::new(0), fail: false.into() }
        }
    }

    impl Default for Counting {
        /// `token-1`, `token-2`, … valid for ten minutes.
        fn default() -> Self {
            Self::new("token", Duration::from_secs(600))
        }
    }

    #[async_trait]
    impl TokenProvider for Counting {
        async fn fetch_token(&self) -> Result<AccessToken, TokenError> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(TokenError::unavailable("token endpoint down"));
            }
            let n = self.fetches.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(AccessToken::new(format!("{}-{n}", self.prefix), SystemTime::now() + self.lifetime))
        }
    }

    fn request() -> Request {
        let url = Url::parse("https://tre.servicebus.windows.net/jobs/messages").unwrap();
        Request::new(url, Method::Post)
    }

    async fn send(client: &BearerTokenClient) -> azure_core::Result<()> {
        client.execute_request(&request()).await.map(drop)
    }

    /// Ensures that a token is reused while fresh and replaced five minutes before it
    /// expires, and that a failed refresh falls back to the still-valid token only.
    #[tokio::test(start_paused = true)]
    async fn bearer_token_is_cached_and_refreshed_before_it_expires() {
        let inner = Arc::new(Recorder::default());
        let provider = Arc::new(Counting::default());
        let client = BearerTokenClient::new(inner.clone(), provider.clone());

        send(&client).await.unwrap();
        tokio::time::advance(Duration::from_secs(4 * 60)).await;
        send(&client).await.unwrap();
        assert_eq!(provider.fetches.load(Ordering::SeqCst), 1, "fresh token reused");

        tokio::time::advance(Duration::from_secs(2 * 60)).await;
        send(&client).await.unwrap();
        assert_eq!(provider.fetches.load(Ordering::SeqCst), 2, "refreshed within 5 min of expiry");
        assert_eq!(
            *inner.seen.lock().unwrap(),
            ["Bearer token-1", "Bearer token-1", "Bearer token-2"]
        );

        // token-2 expires 10 min after it was fetched; from 5 min on it is refreshed.
        provider.fail.store(true, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(6 * 60)).await;
        send(&client).await.unwrap();
        assert_eq!(inner.seen.lock().unwrap().last().unwrap(), "Bearer token-2");

        tokio::time::advance(Duration::from_secs(5 * 60)).await;
        let error = send(&client).await.unwrap_err();
        assert!(matches!(error.kind(), AzureKind::Credential), "{error}");
        let token_error = error.downcast_ref::<TokenError>().expect("the TokenError is the source");
        assert_eq!(token_error.kind(), ErrorKind::Connection);
        assert_eq!(inner.seen.lock().unwrap().len(), 4, "no request without a token");
    }

    /// Ensures that a token living less than twice the five-minute margin is refreshed
    /// half-way through its life instead of at once.
    #[tokio::test(start_paused = true)]
    async fn short_lived_tokens_are_refreshed_half_way() {
        let inner = Arc::new(Recorder::default());
        // Four-minute tokens.
        let provider = Arc::new(Counting::new("short", Duration::from_secs(240)));
        let client = BearerTokenClient::new(inner.clone(), provider.clone());
        send(&client).await.unwrap();
        tokio::time::advance(Duration::from_secs(110)).await;
        send(&client).await.unwrap();
        assert_eq!(provider.fetches.load(Ordering::SeqCst), 1);
        tokio::time::advance(Duration::from_secs(20)).await;
        send(&client).await.unwrap();
        assert_eq!(provider.fetches.load(Ordering::SeqCst), 2);
        assert_eq!(inner.seen.lock().unwrap().last().unwrap(), "Bearer short-2");
    }

    #[test]
    fn token_answers_parse_with_string_or_number_expiries() {
        let imds: TokenResponse = serde_json::from_str(
            r#"{"access_token":"t","expires_in":"3599","expires_on":"1506484173","resource":"https://servicebus.azure.net","token_type":"Bearer"}"#,
        )
        .unwrap();
        assert_eq!(imds.expires_in.and_then(|e| e.seconds()), Some(3599));
        let app_service: TokenResponse =
            serde_json::from_str(r#"{"access_token":"t","expires_on":1506484173}"#).unwrap();
        assert_eq!(app_service.expires_on.and_then(|e| e.seconds()), Some(1_506_484_173));
    }

    #[test]
    fn secrets_and_tokens_are_redacted_in_debug() {
        let token = AccessToken::new("eyJ0eXAiOiJKV1Qi", SystemTime::UNIX_EPOCH);
        let debug = format!("{token:?} {:?}", StaticToken::new(token.clone()));
        assert!(!debug.contains("eyJ0eXAiOiJKV1Qi"), "{debug}");
        let inner: Arc<dyn HttpClient> = Arc::new(Recorder::default());
        let credential =
            ManagedIdentityCredential::app_service(inner.clone(), "http://x", "h3ader", None);
        let sas = SasClient::new(inner, "RootManageSharedAccessKey".into(), Secret::new("k3y"));
        let debug = format!("{credential:?} {sas:?}");
        assert!(!debug.contains("h3ader") && !debug.contains("k3y"), "{debug}");
    }

    #[test]
    fn shared_access_signatures_sign_the_resource_and_expiry() {
        let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let token = sas_token(
            "https://tre.servicebus.windows.net/jobs",
            "Root",
            &Secret::new("key"),
            expiry,
        )
        .unwrap();
        assert!(
            token.starts_with(
                "SharedAccessSignature sr=https%3A%2F%2Ftre.servicebus.windows.net%2Fjobs&sig="
            ),
            "{token}"
        );
        assert!(token.ends_with("&se=1700000000&skn=Root"), "{token}");
        let url = Url::parse("http://127.0.0.1:1/jobs/messages/head?timeout=5").unwrap();
        assert_eq!(resource_of(&url), "http://127.0.0.1:1/jobs/messages/head");
    }
}
