//! The production [`HttpClient`]: one pooled `reqwest` client with timeouts, and the
//! namespace wrapper that rewrites the endpoint and keeps credentials on known hosts.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use azure_core::error::ErrorKind as AzureKind;
use azure_core::headers::{HeaderName, HeaderValue, Headers};
use azure_core::{Body, HttpClient, Request, Response, StatusCode, Url};

/// How long connecting may take unless configured.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request may take unless configured, on top of the `timeout` a peek-lock
/// asks the service to wait.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an idle pooled connection is kept. Azure's load balancers drop idle
/// connections after about four minutes; a minute stays well clear of that.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A pooled, keep-alive `reqwest` client implementing azure_core's [`HttpClient`].
///
/// azure_core's own reqwest client sets `pool_max_idle_per_host(0)` (a workaround for
/// hyper issue 2312), so it opens a TCP connection, and against Azure a TLS session, per
/// request. This one keeps connections alive (idle ones for a minute), connects within
/// the connect timeout, and bounds every request: a peek-lock by the wait it asks the
/// service for (its `timeout` query parameter) plus the request timeout, every other
/// request by the request timeout.
#[derive(Clone)]
pub struct PooledHttpClient {
    client: reqwest::Client,
    request_timeout: Duration,
}

impl fmt::Debug for PooledHttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledHttpClient")
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

impl PooledHttpClient {
    /// A client with these timeouts.
    ///
    /// # Errors
    ///
    /// When the TLS backend cannot be initialised.
    pub fn new(
        connect_timeout: Duration,
        request_timeout: Duration,
    ) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .tcp_keepalive(Duration::from_secs(30))
            .tcp_nodelay(true)
            .user_agent(concat!("steward-servicebus/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { client, request_timeout })
    }

    /// The time limit of `request`: the request timeout, plus the wait of a receive.
    fn timeout_of(&self, request: &Request) -> Duration {
        let url = request.url();
        let wait = if url.path().ends_with("/messages/head") {
            url.query_pairs()
                .find(|(name, _)| name.eq_ignore_ascii_case("timeout"))
                .and_then(|(_, value)| value.parse::<u64>().ok())
                .map_or(Duration::ZERO, Duration::from_secs)
        } else {
            Duration::ZERO
        };
        self.request_timeout + wait
    }
}

#[async_trait]
impl HttpClient for PooledHttpClient {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<Response> {
        let method = reqwest::Method::from_bytes(request.method().as_ref().as_bytes())
            .map_err(|e| azure_core::Error::full(AzureKind::Other, e, "HTTP method"))?;
        let mut builder = self
            .client
            .request(method.clone(), request.url().as_str())
            .timeout(self.timeout_of(request));
        for (name, value) in request.headers().iter() {
            // reqwest sets these from the URL and the body; sending the crate's copies
            // too would duplicate them.
            if matches!(name.as_str(), "content-length" | "host") {
                continue;
            }
            builder = builder.header(name.as_str(), value.as_str());
        }
        let Body::Bytes(body) = request.body() else {
            return Err(azure_core::Error::message(
                AzureKind::Other,
                "streaming request bodies are not supported",
            ));
        };
        let started = Instant::now();
        let path = request.url().path().to_owned();
        let response = builder.body(body.clone()).send().await.map_err(|e| {
            // A header that cannot be sent is bad input, not a network failure.
            // (DataConversion is kept for answers that cannot be read: see `peek_lock`.)
            let kind = if e.is_builder() { AzureKind::Other } else { AzureKind::Io };
            azure_core::Error::full(kind, e, format!("{method} {path} failed"))
        })?;
        let status = response.status().as_u16();
        let headers = convert_headers(response.headers());
        let bytes = response.bytes().await.map_err(|e| {
            azure_core::Error::full(
                AzureKind::Io,
                e,
                format!("reading the answer to {method} {path}"),
            )
        })?;
        tracing::trace!(%method, path, status, elapsed = ?started.elapsed(), "service bus request");
        // A status azure_core has no name for (a proxy's 520, say) is a broken hop on the
        // way, worth retrying like any network failure.
        let status = StatusCode::try_from(status).map_err(|_| {
            azure_core::Error::with_message(AzureKind::Io, || {
                format!("{method} {path}: unknown HTTP status {status}")
            })
        })?;
        let body = Box::pin(futures::stream::iter(std::iter::once(Ok(bytes))));
        Ok(Response::new(status, headers, body))
    }
}

fn convert_headers(map: &reqwest::header::HeaderMap) -> Headers {
    let mut headers = Headers::new();
    for (name, value) in map {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers.insert(HeaderName::from(name.as_str().to_owned()), HeaderValue::from(value));
    }
    headers
}

/// Sends the Azure crate's requests for `https://<namespace>.servicebus.windows.net` to
/// the configured endpoint, refuses requests to any other host (a lock URI pointing
/// elsewhere must not get our credentials), and drops the crate's own `Authorization`
/// header: the credential layer underneath signs for the URL really used.
pub(crate) struct NamespaceClient {
    inner: Arc<dyn HttpClient>,
    /// `https://<namespace>.servicebus.windows.net/`.
    namespace_url: Url,
    /// Where the namespace's requests go instead, if anywhere.
    endpoint: Option<Url>,
}

impl fmt::Debug for NamespaceClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NamespaceClient")
            .field("namespace_url", &self.namespace_url.as_str())
            .field("endpoint", &self.endpoint.as_ref().map(Url::as_str))
            .field("inner", &self.inner)
            .finish()
    }
}

/// Scheme, host and port of a URL.
fn origin(url: &Url) -> (String, Option<String>, Option<u16>) {
    (url.scheme().to_owned(), url.host_str().map(str::to_owned), url.port_or_known_default())
}

impl NamespaceClient {
    pub(crate) fn new(
        inner: Arc<dyn HttpClient>,
        namespace_url: Url,
        endpoint: Option<Url>,
    ) -> Self {
        Self { inner, namespace_url, endpoint }
    }

    /// Where `url` really goes, or `None` when it is on no host of ours.
    fn route(&self, url: &Url) -> Option<Url> {
        let namespace = origin(&self.namespace_url);
        match &self.endpoint {
            Some(endpoint) if origin(url) == namespace => {
                let mut routed = endpoint.clone();
                let base = endpoint.path().trim_end_matches('/');
                routed.set_path(&format!("{base}{}", url.path()));
                routed.set_query(url.query());
                Some(routed)
            }
            Some(endpoint) if origin(url) == origin(endpoint) => Some(url.clone()),
            None if origin(url) == namespace => Some(url.clone()),
            _ => None,
        }
    }
}

#[async_trait]
impl HttpClient for NamespaceClient {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<Response> {
        let Some(url) = self.route(request.url()) else {
            return Err(azure_core::Error::with_message(AzureKind::Other, || {
                format!(
                    "refusing to send credentials to {}: not the namespace or its endpoint",
                    request.url().origin().ascii_serialization()
                )
            }));
        };
        let mut routed = Request::new(url, *request.method());
        for (name, value) in request.headers().iter() {
            if name.as_str() != "authorization" {
                routed.insert_header(name.clone(), value.clone());
            }
        }
        routed.set_body(request.body().clone());
        self.inner.execute_request(&routed).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(endpoint: Option<&str>) -> NamespaceClient {
        let inner: Arc<dyn HttpClient> = Arc::new(
            PooledHttpClient::new(DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT).unwrap(),
        );
        NamespaceClient::new(
            inner,
            Url::parse("https://tre.servicebus.windows.net/").unwrap(),
            endpoint.map(|e| Url::parse(e).unwrap()),
        )
    }

    fn route(client: &NamespaceClient, url: &str) -> Option<String> {
        client.route(&Url::parse(url).unwrap()).map(|u| u.to_string())
    }

    #[test]
    fn namespace_urls_go_to_the_endpoint_with_path_and_query() {
        let c = client(Some("http://127.0.0.1:5300"));
        assert_eq!(
            route(&c, "https://tre.servicebus.windows.net/jobs/messages/head?timeout=5").as_deref(),
            Some("http://127.0.0.1:5300/jobs/messages/head?timeout=5")
        );
        // Lock URIs the emulator built on the endpoint's host stay as they are.
        assert_eq!(
            route(&c, "http://127.0.0.1:5300/jobs/messages/7/abc").as_deref(),
            Some("http://127.0.0.1:5300/jobs/messages/7/abc")
        );
        let prefixed = client(Some("https://proxy.example/sb/"));
        assert_eq!(
            route(&prefixed, "https://tre.servicebus.windows.net/jobs/messages").as_deref(),
            Some("https://proxy.example/sb/jobs/messages")
        );
    }

    #[test]
    fn other_hosts_get_no_request() {
        let c = client(None);
        assert!(route(&c, "https://tre.servicebus.windows.net/jobs/messages").is_some());
        assert!(route(&c, "https://evil.example/jobs/messages/1/x").is_none());
        assert!(route(&c, "http://tre.servicebus.windows.net/jobs/messages").is_none());
        let c = client(Some("http://127.0.0.1:5300"));
        assert!(route(&c, "http://127.0.0.1:5301/jobs/messages").is_none());
    }

    #[test]
    fn receive_requests_get_their_wait_on_top_of_the_timeout() {
        let c = PooledHttpClient::new(DEFAULT_CONNECT_TIMEOUT, Duration::from_secs(30)).unwrap();
        let request = |url: &str| Request::new(Url::parse(url).unwrap(), azure_core::Method::Post);
        let head = request("https://tre.servicebus.windows.net/jobs/messages/head?timeout=20");
        assert_eq!(c.timeout_of(&head), Duration::from_secs(50));
        let send = request("https://tre.servicebus.windows.net/jobs/messages");
        assert_eq!(c.timeout_of(&send), Duration::from_secs(30));
    }
}
