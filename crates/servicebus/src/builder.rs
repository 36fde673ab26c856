//! Configuration: [`ServiceBusBuilder`] from the environment and `with_*` setters.

use std::sync::Arc;
use std::time::Duration;

use azure_core::{HttpClient, Url};

use crate::ServiceBusTransport;
use crate::auth::{BearerTokenClient, ManagedIdentityCredential, SasClient, Secret, TokenProvider};
use crate::client::Shared;
use crate::http::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, NamespaceClient, PooledHttpClient,
};

/// The DNS suffix of Service Bus namespaces in Azure's public cloud.
pub const NAMESPACE_SUFFIX: &str = ".servicebus.windows.net";

/// The namespace name used when only an endpoint is configured (an emulator).
const EMULATOR_NAMESPACE: &str = "steward-emulator";

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Neither a namespace nor an endpoint is configured.
    #[error(
        "no Service Bus namespace: set SERVICE_BUS_FULLY_QUALIFIED_NAMESPACE (or \
         STEWARD_SERVICEBUS_ENDPOINT for an emulator)"
    )]
    MissingNamespace,
    /// The namespace is not a fully qualified namespace or a namespace name.
    #[error("invalid Service Bus namespace {namespace:?}: {reason}")]
    InvalidNamespace {
        /// The value given.
        namespace: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The endpoint is not an `http` or `https` URL with a host.
    #[error("invalid STEWARD_SERVICEBUS_ENDPOINT {endpoint:?}: {reason}")]
    InvalidEndpoint {
        /// The value given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Only one of the shared access key name and key is set.
    #[error("SERVICE_BUS_SAS_KEY_NAME and SERVICE_BUS_SAS_KEY must be set together")]
    IncompleteSasKey,
    /// No way to authenticate to a real namespace.
    #[error(
        "no Service Bus credentials: set SERVICE_BUS_SAS_KEY_NAME and SERVICE_BUS_SAS_KEY, or \
         MANAGED_IDENTITY_CLIENT_ID, or configure a token provider"
    )]
    NoCredentials,
    /// The HTTP client could not be built (its TLS backend failed to initialise).
    #[error("cannot build the HTTP client")]
    HttpClient(#[source] reqwest::Error),
}

/// How a transport authenticates its requests.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthMethod {
    /// A shared access signature made with this key name, for each request.
    SharedAccessKey {
        /// The shared access policy's name.
        key_name: String,
    },
    /// Entra ID tokens from the managed identity (`None`: the system-assigned one).
    ManagedIdentity {
        /// `MANAGED_IDENTITY_CLIENT_ID`.
        client_id: Option<String>,
    },
    /// Entra ID tokens from a caller's [`TokenProvider`].
    TokenProvider,
    /// No credentials (only for an emulator started without keys).
    Anonymous,
}

/// Builds a [`ServiceBusTransport`]: the namespace, the credentials, the HTTP client.
///
/// [`from_env`](Self::from_env) reads:
///
/// | variable | meaning |
/// |---|---|
/// | `SERVICE_BUS_FULLY_QUALIFIED_NAMESPACE` | `<name>.servicebus.windows.net` (a bare name works too; another cloud's FQDN becomes the endpoint) |
/// | `STEWARD_SERVICEBUS_ENDPOINT` | a base URL the namespace's requests go to instead (an emulator, a proxy) |
/// | `SERVICE_BUS_SAS_KEY_NAME`, `SERVICE_BUS_SAS_KEY` | a shared access policy and its key |
/// | `MANAGED_IDENTITY_CLIENT_ID` | use this user-assigned managed identity |
/// | `IDENTITY_ENDPOINT`, `IDENTITY_HEADER` | set by App Service and Container Apps: their managed identity protocol |
///
/// Credentials, first match: a [`with_token_provider`](Self::with_token_provider); a
/// shared access key; a managed identity (`MANAGED_IDENTITY_CLIENT_ID`, or
/// [`with_managed_identity`](Self::with_managed_identity)); none, which only an
/// endpoint allows (an emulator without keys). Nothing is contacted until the first
/// request.
///
/// # Examples
///
/// ```
/// use steward_servicebus::{AuthMethod, ServiceBusBuilder};
///
/// let transport = ServiceBusBuilder::new()
///     .with_namespace("mytre.servicebus.windows.net")
///     .with_sas_key("RootManageSharedAccessKey", "c2VjcmV0")
///     .build()?;
/// assert_eq!(transport.namespace(), "mytre");
/// assert_eq!(
///     transport.auth_method(),
///     &AuthMethod::SharedAccessKey { key_name: "RootManageSharedAccessKey".into() }
/// );
/// assert!(!format!("{transport:?}").contains("c2VjcmV0"));
/// # Ok::<_, steward_servicebus::ConfigError>(())
/// ```
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct ServiceBusBuilder {
    namespace: Option<String>,
    endpoint: Option<String>,
    sas_key_name: Option<String>,
    sas_key: Option<Secret>,
    managed_identity: bool,
    managed_identity_client_id: Option<String>,
    managed_identity_endpoint: Option<String>,
    identity_endpoint: Option<String>,
    identity_header: Option<Secret>,
    token_provider: Option<Arc<dyn TokenProvider>>,
    http_client: Option<Arc<dyn HttpClient>>,
    connect_timeout: Option<Duration>,
    request_timeout: Option<Duration>,
}

impl ServiceBusBuilder {
    /// Nothing configured.
    pub fn new() -> Self {
        Self::default()
    }

    /// The variables in the type docs, where set (empty counts as unset). Values are
    /// checked by [`build`](Self::build).
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`from_env`](Self::from_env) over any source of variables (tests, config files).
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Self {
        let set = |name: &str| var(name).filter(|value| !value.trim().is_empty());
        let mut builder = Self::new();
        builder.namespace = set("SERVICE_BUS_FULLY_QUALIFIED_NAMESPACE");
        builder.endpoint = set("STEWARD_SERVICEBUS_ENDPOINT");
        builder.sas_key_name = set("SERVICE_BUS_SAS_KEY_NAME");
        builder.sas_key = set("SERVICE_BUS_SAS_KEY").map(Secret::from);
        builder.managed_identity_client_id = set("MANAGED_IDENTITY_CLIENT_ID");
        builder.managed_identity = builder.managed_identity_client_id.is_some();
        builder.identity_endpoint = set("IDENTITY_ENDPOINT");
        builder.identity_header = set("IDENTITY_HEADER").map(Secret::from);
        builder
    }

    /// The namespace: `<name>.servicebus.windows.net`, or just `<name>`. The fully
    /// qualified name of another cloud (`<name>.servicebus.usgovcloudapi.net`) is used
    /// as the endpoint unless [`with_endpoint`](Self::with_endpoint) sets one.
    pub fn with_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// A base URL (`http://127.0.0.1:5300`) that every request for the namespace goes
    /// to instead of `https://<name>.servicebus.windows.net`.
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// A shared access policy and its key (the key's text as the portal shows it).
    pub fn with_sas_key(mut self, key_name: impl Into<String>, key: impl Into<Secret>) -> Self {
        self.sas_key_name = Some(key_name.into());
        self.sas_key = Some(key.into());
        self
    }

    /// Entra ID tokens from the managed identity: the user-assigned one with this client
    /// id, or the system-assigned one (`None`).
    pub fn with_managed_identity(mut self, client_id: Option<String>) -> Self {
        self.managed_identity = true;
        self.managed_identity_client_id = client_id;
        self
    }

    /// Sends managed identity token requests (Instance Metadata Service protocol) to
    /// this URL instead of the metadata service: for tests and IMDS proxies.
    pub fn with_managed_identity_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.managed_identity_endpoint = Some(endpoint.into());
        self
    }

    /// Entra ID tokens from `provider`.
    pub fn with_token_provider(mut self, provider: Arc<dyn TokenProvider>) -> Self {
        self.token_provider = Some(provider);
        self
    }

    /// The HTTP client underneath (default: a [`PooledHttpClient`] with the timeouts
    /// below). Credentials and the endpoint rewrite are applied on top of it.
    pub fn with_http_client(mut self, client: Arc<dyn HttpClient>) -> Self {
        self.http_client = Some(client);
        self
    }

    /// How long connecting may take (default 10 s).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// How long a request may take, on top of a receive's wait (default 30 s).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = Some(timeout);
        self
    }

    /// Checks the configuration and builds the transport. Does not connect.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming what is missing or malformed.
    pub fn build(self) -> Result<ServiceBusTransport, ConfigError> {
        let mut endpoint = self.endpoint.as_deref().map(parse_endpoint).transpose()?;
        let namespace = match self.namespace.as_deref() {
            Some(text) => {
                let (name, host) = parse_namespace(text)?;
                if endpoint.is_none() && !host.ends_with(NAMESPACE_SUFFIX) {
                    endpoint = Some(parse_endpoint(&format!("https://{host}"))?);
                }
                name
            }
            None if endpoint.is_some() => EMULATOR_NAMESPACE.to_owned(),
            None => return Err(ConfigError::MissingNamespace),
        };
        let namespace_url = Url::parse(&format!("https://{namespace}{NAMESPACE_SUFFIX}/"))
            .map_err(|e| ConfigError::InvalidNamespace {
                namespace: namespace.clone(),
                reason: e.to_string(),
            })?;

        let base: Arc<dyn HttpClient> = match self.http_client {
            Some(client) => client,
            None => Arc::new(
                PooledHttpClient::new(
                    self.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
                    self.request_timeout.unwrap_or(DEFAULT_REQUEST_TIMEOUT),
                )
                .map_err(ConfigError::HttpClient)?,
            ),
        };

        let sas = match (self.sas_key_name, self.sas_key) {
            (Some(name), Some(key)) => Some((name, key)),
            (None, None) => None,
            _ => return Err(ConfigError::IncompleteSasKey),
        };
        let (auth, authenticated): (AuthMethod, Arc<dyn HttpClient>) =
            if let Some(provider) = self.token_provider {
                (AuthMethod::TokenProvider, Arc::new(BearerTokenClient::new(base, provider)))
            } else if let Some((key_name, key)) = sas {
                let method = AuthMethod::SharedAccessKey { key_name: key_name.clone() };
                (method, Arc::new(SasClient::new(base, key_name, key)))
            } else if self.managed_identity {
                let client_id = self.managed_identity_client_id;
                let credential = match (
                    self.managed_identity_endpoint,
                    self.identity_endpoint,
                    self.identity_header,
                ) {
                    (Some(imds), _, _) => {
                        ManagedIdentityCredential::imds(base.clone(), client_id.clone())
                            .with_endpoint(imds)
                    }
                    (None, Some(endpoint), Some(header)) => ManagedIdentityCredential::app_service(
                        base.clone(),
                        endpoint,
                        header,
                        client_id.clone(),
                    ),
                    _ => ManagedIdentityCredential::imds(base.clone(), client_id.clone()),
                };
                let method = AuthMethod::ManagedIdentity { client_id };
                (method, Arc::new(BearerTokenClient::new(base, Arc::new(credential))))
            } else if endpoint.is_some() {
                (AuthMethod::Anonymous, base)
            } else {
                return Err(ConfigError::NoCredentials);
            };

        let endpoint_text =
            endpoint.as_ref().map(|url| url.as_str().trim_end_matches('/').to_owned());
        let http = Arc::new(NamespaceClient::new(authenticated, namespace_url, endpoint));
        tracing::debug!(namespace, endpoint = ?endpoint_text, auth = ?auth, "service bus transport configured");
        Ok(ServiceBusTransport::new(Shared { namespace, http, auth }))
    }
}

/// The namespace name and host of `text`: an FQDN, a bare name, or either with an
/// `sb://` or `https://` scheme and a trailing `/`.
fn parse_namespace(text: &str) -> Result<(String, String), ConfigError> {
    let invalid = |reason: &str| ConfigError::InvalidNamespace {
        namespace: text.to_owned(),
        reason: reason.to_owned(),
    };
    let trimmed = text.trim();
    let without_scheme = ["sb://", "https://"]
        .iter()
        .find_map(|scheme| trimmed.strip_prefix(scheme))
        .unwrap_or(trimmed)
        .trim_end_matches('/')
        .to_ascii_lowercase();
    let (name, host) = match without_scheme.split_once('.') {
        Some((name, _)) => (name.to_owned(), without_scheme.clone()),
        None => (without_scheme.clone(), format!("{without_scheme}{NAMESPACE_SUFFIX}")),
    };
    if name.is_empty() {
        return Err(invalid("the namespace name is empty"));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(invalid("a namespace name has only letters, digits and hyphens"));
    }
    if host.contains(['/', ':', '@', '?', '#', ' ']) {
        return Err(invalid("expected <name>.servicebus.windows.net"));
    }
    Ok((name, host))
}

fn parse_endpoint(text: &str) -> Result<Url, ConfigError> {
    let invalid =
        |reason: String| ConfigError::InvalidEndpoint { endpoint: text.to_owned(), reason };
    let url = Url::parse(text.trim()).map_err(|e| invalid(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("the scheme must be http or https".to_owned()));
    }
    if url.host_str().is_none() {
        return Err(invalid("no host".to_owned()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid("credentials do not go in the URL; use the SAS variables".to_owned()));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("a base URL has no query or fragment".to_owned()));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn from(vars: &[(&str, &str)]) -> ServiceBusBuilder {
        let vars: HashMap<String, String> =
            vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        ServiceBusBuilder::from_lookup(move |name| vars.get(name).cloned())
    }

    #[test]
    fn the_fqdn_loses_its_suffix_and_other_forms_are_accepted() {
        for text in [
            "mytre.servicebus.windows.net",
            "mytre",
            "sb://mytre.servicebus.windows.net/",
            "https://MyTre.servicebus.windows.net",
        ] {
            let (name, host) = parse_namespace(text).unwrap();
            assert_eq!(name, "mytre", "{text}");
            assert_eq!(host, "mytre.servicebus.windows.net", "{text}");
        }
        for bad in ["", ".servicebus.windows.net", "my tre", "a_b.servicebus.windows.net", "x.y/z"]
        {
            assert!(parse_namespace(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn another_clouds_fqdn_becomes_the_endpoint() {
        let transport = ServiceBusBuilder::new()
            .with_namespace("tre.servicebus.usgovcloudapi.net")
            .with_sas_key("k", "v")
            .build()
            .unwrap();
        assert_eq!(transport.namespace(), "tre");
        let debug = format!("{transport:?}");
        assert!(debug.contains("https://tre.servicebus.usgovcloudapi.net"), "{debug}");
    }

    #[test]
    fn managed_identity_client_id_selects_the_managed_identity() {
        let transport = from(&[
            ("SERVICE_BUS_FULLY_QUALIFIED_NAMESPACE", "mytre.servicebus.windows.net"),
            ("MANAGED_IDENTITY_CLIENT_ID", "0000-1111"),
        ])
        .build()
        .unwrap();
        assert_eq!(
            transport.auth_method(),
            &AuthMethod::ManagedIdentity { client_id: Some("0000-1111".into()) }
        );
    }

    #[test]
    fn a_shared_access_key_wins_over_the_managed_identity() {
        let transport = from(&[
            ("SERVICE_BUS_FULLY_QUALIFIED_NAMESPACE", "mytre"),
            ("MANAGED_IDENTITY_CLIENT_ID", "0000-1111"),
            ("SERVICE_BUS_SAS_KEY_NAME", "RootManageSharedAccessKey"),
            ("SERVICE_BUS_SAS_KEY", "s3cr3t-key"),
        ])
        .build()
        .unwrap();
        assert_eq!(
            transport.auth_method(),
            &AuthMethod::SharedAccessKey { key_name: "RootManageSharedAccessKey".into() }
        );
    }

    #[test]
    fn missing_or_half_configuration_is_refused() {
        assert!(matches!(from(&[]).build(), Err(ConfigError::MissingNamespace)));
        assert!(matches!(
            from(&[("SERVICE_BUS_FULLY_QUALIFIED_NAMESPACE", "mytre")]).build(),
            Err(ConfigError::NoCredentials)
        ));
        assert!(matches!(
            from(&[
                ("SERVICE_BUS_FULLY_QUALIFIED_NAMESPACE", "mytre"),
                ("SERVICE_BUS_SAS_KEY", "k")
            ])
            .build(),
            Err(ConfigError::IncompleteSasKey)
        ));
        for endpoint in ["ftp://x", "http://user:pw@127.0.0.1:5300", "http://x/?a=b", "not a url"] {
            assert!(
                matches!(
                    from(&[("STEWARD_SERVICEBUS_ENDPOINT", endpoint)]).build(),
                    Err(ConfigError::InvalidEndpoint { .. })
                ),
                "{endpoint}"
            );
        }
        assert!(matches!(
            from(&[
                ("SERVICE_BUS_FULLY_QUALIFIED_NAMESPACE", "my tre"),
                ("SERVICE_BUS_SAS_KEY_NAME", "n"),
                ("SERVICE_BUS_SAS_KEY", "k")
            ])
            .build(),
            Err(ConfigError::InvalidNamespace { .. })
        ));
    }

    #[test]
    fn an_endpoint_alone_is_an_anonymous_emulator() {
        let transport =
            from(&[("STEWARD_SERVICEBUS_ENDPOINT", "http://127.0.0.1:5300")]).build().unwrap();
        assert_eq!(transport.auth_method(), &AuthMethod::Anonymous);
        assert_eq!(transport.namespace(), EMULATOR_NAMESPACE);
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let builder = from(&[
            ("SERVICE_BUS_FULLY_QUALIFIED_NAMESPACE", "mytre"),
            ("SERVICE_BUS_SAS_KEY_NAME", "RootManageSharedAccessKey"),
            ("SERVICE_BUS_SAS_KEY", "s3cr3t-key"),
            ("IDENTITY_HEADER", "h3ader-secret"),
        ]);
        let debug = format!("{builder:?}");
        assert!(!debug.contains("s3cr3t-key") && !debug.contains("h3ader-secret"), "{debug}");
        assert!(debug.contains("RootManageSharedAccessKey"), "{debug}");
        let transport = builder.build().unwrap();
        let debug = format!("{transport:?} {:?} {:?}", transport.source("q"), transport.sink());
        assert!(!debug.contains("s3cr3t-key"), "{debug}");
    }
}
