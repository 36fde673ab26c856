//! The service's configuration: every setting a flag and an environment variable.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use steward_core::UpdaterConfig;
use steward_core::transport::redact_url;

use crate::domain::queues;
use crate::http::LoadLimit;
use crate::http::auth::{Authentication, KeySetError, OidcConfig, OidcVerifier};
use crate::storage::{SessionSettings, StoreOptions};
use crate::workers::OutboxConfig;

use super::transport::{KNOWN, Topology, TransportConfigError, TransportOptions};

/// The longest pause between restarts of a worker that keeps failing
/// (`STEWARD_RESTART_BACKOFF` doubles up to it).
pub(crate) const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// The window in which `STEWARD_RESTART_LIMIT` counts a worker's restarts.
pub(crate) const RESTART_WINDOW: Duration = Duration::from_secs(600);

/// The log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The service's settings. Every flag can also be set by its environment variable.
///
/// Its `Debug` output hides the development token and the database URL's password.
#[derive(Clone, Parser)]
#[command(
    name = "steward-api",
    version,
    about = "A TRE-style control-plane API whose queue consumers run under a supervisor"
)]
pub struct Config {
    /// The message transport. Defaults to the only one compiled in, else the in-process one.
    #[arg(long, env = "STEWARD_TRANSPORT", value_parser = clap::builder::PossibleValuesParser::new(KNOWN))]
    pub transport: Option<String>,

    /// The HTTP listen address.
    #[arg(long, env = "STEWARD_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,

    /// The database: `sqlite://steward.db?mode=rwc` or `postgres://user@host/db`.
    #[arg(
        long,
        env = "STEWARD_DATABASE_URL",
        default_value = "sqlite://steward.db?mode=rwc",
        hide_env_values = true
    )]
    pub database_url: String,

    /// The database pools and PostgreSQL session settings.
    #[command(flatten)]
    pub database: DatabaseSettings,

    /// The settings of each compiled-in transport.
    #[command(flatten)]
    pub transports: TransportOptions,

    /// The queue of deployment status updates from the resource processor.
    #[arg(
        long,
        env = "SERVICE_BUS_DEPLOYMENT_STATUS_UPDATE_QUEUE",
        default_value = queues::DEPLOYMENT_STATUS
    )]
    pub deployment_status_queue: String,

    /// The queue of airlock step results.
    #[arg(long, env = "SERVICE_BUS_STEP_RESULT_QUEUE", default_value = queues::STEP_RESULT)]
    pub step_result_queue: String,

    /// The queue of resource requests to the resource processor.
    #[arg(long, env = "SERVICE_BUS_RESOURCE_REQUEST_QUEUE", default_value = queues::RESOURCE_REQUEST)]
    pub resource_request_queue: String,

    /// The queue of airlock `statusChanged` events.
    #[arg(
        long,
        env = "STEWARD_AIRLOCK_STATUS_CHANGED_QUEUE",
        default_value = queues::AIRLOCK_STATUS_CHANGED
    )]
    pub airlock_status_changed_queue: String,

    /// The queue of `airlockNotification` events.
    #[arg(
        long,
        env = "STEWARD_AIRLOCK_NOTIFICATION_QUEUE",
        default_value = queues::AIRLOCK_NOTIFICATION
    )]
    pub airlock_notification_queue: String,

    /// Run built-in simulators of the resource processor and airlock processor. Default: on for `inmem`, off otherwise.
    #[arg(long, env = "STEWARD_SIMULATE_PROCESSORS")]
    pub simulate_processors: Option<bool>,

    /// A directory of extra `*.json` templates, added to the shipped samples.
    #[arg(long, env = "STEWARD_TEMPLATES_DIR")]
    pub templates_dir: Option<PathBuf>,

    /// Deliveries after which a message is dead-lettered.
    #[arg(long, env = "STEWARD_MAX_DELIVERIES", default_value_t = UpdaterConfig::default().max_deliveries, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_deliveries: u32,

    /// Failed sends after which an outbox message is parked, counting only failures
    /// with other sends to the transport succeeding in between (a broker outage parks
    /// nothing). A send error of the message's own parks it at once.
    #[arg(long, env = "STEWARD_OUTBOX_PARK_AFTER", default_value_t = OutboxConfig::default().park_after, value_parser = clap::value_parser!(u32).range(1..))]
    pub outbox_park_after: u32,

    /// How long a shutdown waits for in-flight work, e.g. `25s` or `2m`.
    #[arg(long, env = "STEWARD_DRAIN_TIMEOUT", default_value = "25s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// The first pause before restarting a worker that stopped with an error; it doubles
    /// up to 5 min.
    #[arg(long, env = "STEWARD_RESTART_BACKOFF", default_value = "1s", value_parser = parse_duration)]
    pub restart_backoff: Duration,

    /// Restarts a worker may need within 10 minutes of running (after panics, fatal
    /// errors or stalls; never for an unreachable broker or database) before it is
    /// declared failed and `/livez` answers 503.
    #[arg(long, env = "STEWARD_RESTART_LIMIT", default_value_t = 10)]
    pub restart_limit: u32,

    // HTTP load.
    /// API requests served at once (every route but the probes and `/metrics`); more
    /// wait up to `STEWARD_HTTP_QUEUE_TIMEOUT`, then get 503 with `Retry-After`.
    /// Default: the connections of the database pool that serves them, so requests
    /// never queue for a connection.
    #[arg(long, env = "STEWARD_HTTP_MAX_CONCURRENCY", value_parser = clap::value_parser!(u32).range(1..))]
    pub http_max_concurrency: Option<u32>,

    /// How long an API request waits for its turn before 503, e.g. `1s` or `200ms`;
    /// `0s` refuses at once.
    #[arg(long, env = "STEWARD_HTTP_QUEUE_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub http_queue_timeout: Duration,

    /// Development only: a static bearer token whose caller is the admin `steward-admin`
    /// (role `TREAdmin`). Must not be empty. Never logged.
    #[arg(long, env = "STEWARD_API_TOKEN", hide_env_values = true, value_parser = parse_api_token)]
    pub api_token: Option<String>,

    /// The OIDC issuer of bearer tokens (their `iss`); its discovery document is at
    /// `<issuer>/.well-known/openid-configuration`. Needs `STEWARD_AUTH_AUDIENCE`.
    #[arg(long, env = "STEWARD_AUTH_ISSUER", requires = "auth_audience")]
    pub auth_issuer: Option<String>,

    /// The audience bearer tokens must name (their `aud`), e.g. the API's client id.
    #[arg(long, env = "STEWARD_AUTH_AUDIENCE", requires = "auth_issuer")]
    pub auth_audience: Option<String>,

    /// The issuer's key set (JWKS), instead of the discovery document's `jwks_uri`.
    #[arg(long, env = "STEWARD_AUTH_JWKS_URL", requires = "auth_issuer")]
    pub auth_jwks_url: Option<String>,

    /// Take the caller from `X-User-Id`, `X-User-Name` and `X-User-Email` on requests
    /// without a bearer token. Only behind an authenticating proxy that strips these
    /// headers from clients. They give the identity only: the caller holds `TREUser`,
    /// and `TREAdmin` when listed in `STEWARD_PROXY_ADMINS`.
    #[arg(long, env = "STEWARD_TRUST_PROXY_HEADERS", default_value_t = false, action = clap::ArgAction::Set)]
    pub trust_proxy_headers: bool,

    /// The user ids (comma-separated) that hold `TREAdmin` when the trusted proxy names
    /// them.
    #[arg(
        long,
        env = "STEWARD_PROXY_ADMINS",
        value_delimiter = ',',
        requires = "trust_proxy_headers"
    )]
    pub proxy_admins: Vec<String>,

    /// A secret the authenticating proxy sends as `X-Proxy-Secret`: the `X-User-*`
    /// headers then count only with it. Never logged.
    #[arg(long, env = "STEWARD_PROXY_SECRET", hide_env_values = true, value_parser = parse_secret, requires = "trust_proxy_headers")]
    pub proxy_secret: Option<String>,

    /// Trust the proxy's headers on a non-loopback listen address: only when nothing
    /// but the authenticating proxy can reach that address.
    #[arg(long, env = "STEWARD_PROXY_ONLY_INGRESS", default_value_t = false, action = clap::ArgAction::Set)]
    pub proxy_only_ingress: bool,

    /// Serve `/metrics` without authentication (for a scraper on a private network);
    /// otherwise it needs `TREAdmin`.
    #[arg(long, env = "STEWARD_METRICS_OPEN", default_value_t = false, action = clap::ArgAction::Set)]
    pub metrics_open: bool,

    /// Listen on a non-loopback address with no authentication configured, every caller
    /// the admin. Never in production.
    #[arg(long)]
    pub insecure_no_auth: bool,

    /// Email recipients of airlock notifications by role, as JSON:
    /// `{"workspace_owner": ["a@example.com"], "airlock_manager": [...]}`.
    #[arg(long, env = "STEWARD_AIRLOCK_RECIPIENTS", value_parser = parse_recipients)]
    pub airlock_recipients: Option<BTreeMap<String, Vec<String>>>,

    /// Injected faults (builds with feature `fault-injection` only), e.g.
    /// `panic=0.01,db_error=0.05,fail_worker=deployment-status`.
    #[arg(long, env = "STEWARD_FAULTS")]
    pub faults: Option<String>,

    /// The log format; the level comes from `RUST_LOG`.
    #[arg(long, env = "STEWARD_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("transport", &self.transport)
            .field("listen", &self.listen)
            .field("database_url", &redact_url(&self.database_url))
            .field("database", &self.database)
            .field("transports", &self.transports)
            .field("deployment_status_queue", &self.deployment_status_queue)
            .field("step_result_queue", &self.step_result_queue)
            .field("resource_request_queue", &self.resource_request_queue)
            .field("airlock_status_changed_queue", &self.airlock_status_changed_queue)
            .field("airlock_notification_queue", &self.airlock_notification_queue)
            .field("simulate_processors", &self.simulate_processors)
            .field("templates_dir", &self.templates_dir)
            .field("max_deliveries", &self.max_deliveries)
            .field("outbox_park_after", &self.outbox_park_after)
            .field("drain_timeout", &self.drain_timeout)
            .field("restart_backoff", &self.restart_backoff)
            .field("restart_limit", &self.restart_limit)
            .field("http_max_concurrency", &self.http_max_concurrency)
            .field("http_queue_timeout", &self.http_queue_timeout)
            .field("api_token", &self.api_token.as_ref().map(|_| "REDACTED"))
            .field("auth_issuer", &self.auth_issuer)
            .field("auth_audience", &self.auth_audience)
            .field("auth_jwks_url", &self.auth_jwks_url)
            .field("trust_proxy_headers", &self.trust_proxy_headers)
            .field("proxy_admins", &self.proxy_admins)
            .field("proxy_secret", &self.proxy_secret.as_ref().map(|_| "REDACTED"))
            .field("proxy_only_ingress", &self.proxy_only_ingress)
            .field("metrics_open", &self.metrics_open)
            .field("insecure_no_auth", &self.insecure_no_auth)
            .field("airlock_recipients", &self.airlock_recipients)
            .field("faults", &self.faults)
            .field("log_format", &self.log_format)
            .finish()
    }
}

/// The database's pools and the settings of every PostgreSQL connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct DatabaseSettings {
    /// The most database connections HTTP requests hold at once (per replica).
    #[arg(long, env = "STEWARD_DATABASE_MAX_CONNECTIONS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub database_max_connections: u32,

    /// The most database connections the workers (status updaters, outbox, watchers)
    /// hold at once, in a pool of their own so HTTP load cannot starve them. On SQLite
    /// their reads only: the one writer is shared.
    #[arg(long, env = "STEWARD_DATABASE_WORKER_CONNECTIONS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub database_worker_connections: u32,

    /// How long a request or worker waits for a free connection before its call fails
    /// as busy (retryable; readiness unchanged).
    #[arg(long, env = "STEWARD_DATABASE_ACQUIRE_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub database_acquire_timeout: Duration,

    /// PostgreSQL `statement_timeout` of every connection (`0s`: none).
    #[arg(long, env = "STEWARD_DATABASE_STATEMENT_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub database_statement_timeout: Duration,

    /// PostgreSQL `lock_timeout` of every connection (`0s`: none).
    #[arg(long, env = "STEWARD_DATABASE_LOCK_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub database_lock_timeout: Duration,

    /// PostgreSQL `idle_in_transaction_session_timeout` of every connection (`0s`: none).
    #[arg(long, env = "STEWARD_DATABASE_IDLE_IN_TRANSACTION_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub database_idle_in_transaction_timeout: Duration,

    /// PostgreSQL `tcp_keepalives_idle` of every connection: the server's idle time
    /// before its first keepalive probe (`0s`: the OS default).
    #[arg(long, env = "STEWARD_DATABASE_TCP_KEEPALIVES_IDLE", default_value = "60s", value_parser = parse_duration)]
    pub database_tcp_keepalives_idle: Duration,

    /// PostgreSQL `tcp_keepalives_interval`: between unanswered probes (`0s`: the OS
    /// default).
    #[arg(long, env = "STEWARD_DATABASE_TCP_KEEPALIVES_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub database_tcp_keepalives_interval: Duration,

    /// PostgreSQL `tcp_keepalives_count`: unanswered probes before the server drops the
    /// connection (`0`: the OS default).
    #[arg(long, env = "STEWARD_DATABASE_TCP_KEEPALIVES_COUNT", default_value_t = 6)]
    pub database_tcp_keepalives_count: u32,
}

impl DatabaseSettings {
    /// The store options for `url` with these pools and session settings.
    #[must_use]
    pub fn store_options(&self, url: &str) -> StoreOptions {
        StoreOptions::new(url)
            .with_max_connections(self.database_max_connections)
            .with_worker_connections(self.database_worker_connections)
            .with_acquire_timeout(self.database_acquire_timeout)
            .with_session(SessionSettings {
                statement_timeout: self.database_statement_timeout,
                lock_timeout: self.database_lock_timeout,
                idle_in_transaction_timeout: self.database_idle_in_transaction_timeout,
                tcp_keepalives_idle: self.database_tcp_keepalives_idle,
                tcp_keepalives_interval: self.database_tcp_keepalives_interval,
                tcp_keepalives_count: self.database_tcp_keepalives_count,
            })
    }
}

/// Parses `25s`, `2m`, `1h 30m`, `500ms`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (try 25s, 2m or 500ms)"))
}

/// An empty secret would be guessed at once: refuse it.
fn parse_secret(text: &str) -> Result<String, String> {
    if text.trim().is_empty() { Err("must not be empty".to_owned()) } else { Ok(text.to_owned()) }
}

/// An empty token would silently turn authentication off: refuse it.
fn parse_api_token(text: &str) -> Result<String, String> {
    if text.trim().is_empty() {
        Err("must not be empty (unset STEWARD_API_TOKEN to run without it)".to_owned())
    } else {
        Ok(text.to_owned())
    }
}

fn parse_recipients(text: &str) -> Result<BTreeMap<String, Vec<String>>, String> {
    serde_json::from_str(text)
        .map_err(|e| format!("expected a JSON object of role to email list: {e}"))
}

impl Config {
    /// The transport in effect: the one asked for, or the build's default.
    ///
    /// # Errors
    ///
    /// The transport asked for is not compiled in, or there is no default.
    pub fn transport_name(&self) -> Result<&'static str, TransportConfigError> {
        self.transports.resolve(self.transport.as_deref())
    }

    /// Whether to run the simulated processors: as asked, else only when the broker
    /// runs in process (nothing else would answer).
    #[must_use]
    pub fn simulate_processors(&self) -> bool {
        self.simulate_processors.unwrap_or_else(|| {
            self.transport_name().is_ok_and(|name| self.transports.in_process(name))
        })
    }

    /// The queues the workers consume and the service publishes to.
    pub(crate) fn topology(&self) -> Topology {
        let mut consumed =
            vec![self.deployment_status_queue.clone(), self.step_result_queue.clone()];
        // The simulators consume what the service publishes.
        if self.simulate_processors() {
            consumed.push(self.resource_request_queue.clone());
            consumed.push(self.airlock_status_changed_queue.clone());
        }
        Topology {
            consumed,
            published: vec![
                self.resource_request_queue.clone(),
                self.airlock_status_changed_queue.clone(),
                self.airlock_notification_queue.clone(),
            ],
            max_deliveries: self.max_deliveries,
            ordered: vec![self.deployment_status_queue.clone(), self.step_result_queue.clone()],
        }
    }

    /// How callers are identified, from the authentication settings.
    ///
    /// # Errors
    ///
    /// The HTTP client that fetches the issuer's keys cannot be built.
    pub fn authentication(&self) -> Result<Authentication, KeySetError> {
        let admins = self.proxy_admins.iter().map(|id| id.trim()).filter(|id| !id.is_empty());
        let mut auth = Authentication::none()
            .with_proxy_headers(self.trust_proxy_headers)
            .with_proxy_admins(admins);
        if let Some(token) = &self.api_token {
            auth = auth.with_api_token(token.clone());
        }
        if let Some(secret) = &self.proxy_secret {
            auth = auth.with_proxy_secret(secret.clone());
        }
        if let (Some(issuer), Some(audience)) = (&self.auth_issuer, &self.auth_audience) {
            let verifier = OidcVerifier::new(OidcConfig {
                issuer: issuer.clone(),
                audience: audience.clone(),
                jwks_url: self.auth_jwks_url.clone(),
            })?;
            auth = auth.with_oidc(std::sync::Arc::new(verifier));
        }
        Ok(auth)
    }

    /// How to open the store: the URL, the pools and the session settings.
    #[must_use]
    pub fn store_options(&self) -> StoreOptions {
        self.database.store_options(&self.database_url)
    }

    /// The HTTP load limit, for API requests served by a database pool of
    /// `pool_connections`.
    #[must_use]
    pub fn load_limit(&self, pool_connections: u32) -> LoadLimit {
        let mut limit = LoadLimit::for_pool(self.http_max_concurrency.unwrap_or(pool_connections));
        limit.queue_timeout = self.http_queue_timeout;
        limit
    }

    /// The database URL with any password hidden, for logs.
    #[must_use]
    pub fn database_for_log(&self) -> String {
        redact_url(&self.database_url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that secrets in a URL's query are hidden too, whatever the parameter's
    /// case, and that other parameters stay readable.
    #[test]
    fn query_secrets_are_hidden_in_logged_urls() {
        let cases = [
            (
                "postgres://db/tre?user=app&password=s3cret&sslmode=require",
                "postgres://db/tre?user=app&password=***&sslmode=require",
            ),
            ("postgres://db/tre?sslpassword=k3y", "postgres://db/tre?sslpassword=***"),
            (
                "amqps://host/vh?token=t0k&SharedAccessKey=abc=&sig=x%2By",
                "amqps://host/vh?token=***&SharedAccessKey=***&sig=***",
            ),
            (
                "https://idp/x?client_secret=c&apiKey=a",
                "https://idp/x?client_secret=***&apiKey=***",
            ),
            ("postgres://app:pw@db/tre?Password=p", "postgres://app:***@db/tre?Password=***"),
            ("sqlite://steward.db?mode=rwc", "sqlite://steward.db?mode=rwc"),
        ];
        for (url, expected) in cases {
            assert_eq!(redact_url(url), expected, "{url}");
            assert!(
                !format!(
                    "{:?}",
                    Config::try_parse_from(["steward-api", "--database-url", url]).unwrap()
                )
                .contains("s3cret")
            );
        }
    }

    /// Ensures that `--help` never prints the environment's value of a secret setting:
    /// every argument that may hold a password, token or key hides its env value.
    #[test]
    fn help_hides_the_env_values_of_secrets() {
        use clap::CommandFactory;
        let command = Config::command();
        let mut secret_ids = vec!["database_url", "api_token", "proxy_secret"];
        #[cfg(feature = "rabbitmq")]
        secret_ids.push("rabbitmq_url");
        #[cfg(feature = "nats")]
        secret_ids.extend(["nats_url", "nats_password", "nats_token"]);
        #[cfg(feature = "servicebus")]
        secret_ids.push("service_bus_sas_key");
        for id in secret_ids {
            let arg = command
                .get_arguments()
                .find(|arg| arg.get_id() == id)
                .unwrap_or_else(|| panic!("no argument {id}"));
            assert!(arg.is_hide_env_values_set(), "{id} shows its env value in --help");
        }
    }

    #[test]
    fn passwords_are_hidden_in_logged_urls() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/tre"),
            "postgres://app:***@db:5432/tre"
        );
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("sqlite://steward.db?mode=rwc"), "sqlite://steward.db?mode=rwc");
        assert_eq!(redact_url("postgres://app@db/tre"), "postgres://app@db/tre");
    }

    #[test]
    fn the_command_line_of_every_transport_fits_together() {
        use clap::CommandFactory;
        Config::command().debug_assert();
    }

    #[test]
    fn an_empty_api_token_is_a_configuration_error() {
        let error = Config::try_parse_from(["steward-api", "--api-token", ""]).unwrap_err();
        assert!(error.to_string().contains("must not be empty"), "{error}");
        let error = Config::try_parse_from(["steward-api", "--api-token", "  "]).unwrap_err();
        assert!(error.to_string().contains("must not be empty"), "{error}");
        let config = Config::try_parse_from(["steward-api", "--api-token", "t"]).unwrap();
        assert!(config.authentication().unwrap().is_configured());
    }

    #[test]
    fn an_issuer_needs_an_audience() {
        let error = Config::try_parse_from(["steward-api", "--auth-issuer", "https://idp.example"])
            .unwrap_err();
        assert_eq!(error.kind(), clap::error::ErrorKind::MissingRequiredArgument, "{error}");
        let config = Config::try_parse_from([
            "steward-api",
            "--auth-issuer",
            "https://idp.example",
            "--auth-audience",
            "api://steward",
        ])
        .unwrap();
        let auth = config.authentication().unwrap();
        assert!(auth.is_configured());
        assert!(auth.describe().contains("https://idp.example"), "{}", auth.describe());
    }

    #[test]
    fn with_nothing_set_no_authentication_is_configured() {
        let config = Config::try_parse_from(["steward-api"]).unwrap();
        assert!(!config.authentication().unwrap().is_configured());
        assert!(!config.insecure_no_auth);
    }

    #[test]
    fn debug_output_hides_the_token_and_the_database_password() {
        let config = Config::try_parse_from([
            "steward-api",
            "--api-token",
            "dev-s3cret-token",
            "--database-url",
            "postgres://app:db-s3cret@db/tre",
        ])
        .unwrap();
        let text = format!("{config:?}");
        assert!(!text.contains("dev-s3cret-token"), "{text}");
        assert!(!text.contains("db-s3cret"), "{text}");
        assert!(text.contains("REDACTED") && text.contains("postgres://app:***@db/tre"), "{text}");
    }

    #[cfg(all(feature = "servicebus", feature = "rabbitmq"))]
    #[test]
    fn debug_output_hides_the_transports_secrets() {
        let config = Config::try_parse_from([
            "steward-api",
            "--service-bus-sas-key",
            "sas-s3cret",
            "--rabbitmq-url",
            "amqp://app:mq-s3cret@mq/%2f",
        ])
        .unwrap();
        let text = format!("{config:?}");
        assert!(!text.contains("sas-s3cret") && !text.contains("mq-s3cret"), "{text}");
        assert!(text.contains("amqp://app:***@mq/%2f"), "{text}");
    }

    #[test]
    fn http_concurrency_defaults_to_the_pool_and_can_be_set() {
        let config = Config::try_parse_from(["steward-api"]).unwrap();
        let limit = config.load_limit(7);
        assert_eq!(limit.max_concurrency, 7);
        assert_eq!(limit.queue_timeout, Duration::from_secs(1));
        let config = Config::try_parse_from([
            "steward-api",
            "--http-max-concurrency",
            "3",
            "--http-queue-timeout",
            "0s",
        ])
        .unwrap();
        assert_eq!(
            config.load_limit(7),
            LoadLimit { max_concurrency: 3, queue_timeout: Duration::ZERO }
        );
        assert!(Config::try_parse_from(["steward-api", "--http-max-concurrency", "0"]).is_err());
    }

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(parse_duration("25s"), Ok(Duration::from_secs(25)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
    }
}
