//! The service's configuration: every setting a flag and an environment variable.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// A message transport the service can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum)]
pub enum TransportKind {
    /// The in-process broker: nothing to install, nothing kept across restarts.
    Inmem,
    /// RabbitMQ (cargo feature `rabbitmq`).
    Rabbitmq,
    /// Azure Service Bus over REST (cargo feature `servicebus`).
    Servicebus,
}

impl TransportKind {
    /// The cargo feature that compiles the transport in.
    #[must_use]
    pub const fn feature(self) -> &'static str {
        match self {
            Self::Inmem => "inmem",
            Self::Rabbitmq => "rabbitmq",
            Self::Servicebus => "servicebus",
        }
    }

    /// Whether this build has the transport.
    #[must_use]
    pub const fn is_compiled_in(self) -> bool {
        match self {
            Self::Inmem => cfg!(feature = "inmem"),
            Self::Rabbitmq => cfg!(feature = "rabbitmq"),
            Self::Servicebus => cfg!(feature = "servicebus"),
        }
    }

    /// The transports this build has.
    #[must_use]
    pub fn compiled_in() -> Vec<Self> {
        [Self::Inmem, Self::Rabbitmq, Self::Servicebus]
            .into_iter()
            .filter(|t| t.is_compiled_in())
            .collect()
    }

    /// The default: the only compiled-in transport, else `inmem`.
    #[must_use]
    pub fn default_for_build() -> Self {
        match Self::compiled_in().as_slice() {
            [only] => *only,
            _ => Self::Inmem,
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.feature())
    }
}

/// The log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The service's settings. Every flag can also be set by its environment variable.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "steward-api",
    version,
    about = "A TRE-style control-plane API whose queue consumers run under a supervisor"
)]
pub struct Config {
    /// The message transport. Defaults to the only one compiled in, else `inmem`.
    #[arg(long, env = "STEWARD_TRANSPORT", value_enum)]
    pub transport: Option<TransportKind>,

    /// The HTTP listen address.
    #[arg(long, env = "STEWARD_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,

    /// The database: `sqlite://steward.db?mode=rwc` or `postgres://user@host/db`.
    #[arg(long, env = "STEWARD_DATABASE_URL", default_value = "sqlite://steward.db?mode=rwc")]
    pub database_url: String,

    /// The RabbitMQ URL (transport `rabbitmq`).
    #[arg(
        long,
        env = "STEWARD_RABBITMQ_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub rabbitmq_url: String,

    /// The Service Bus namespace, e.g. `sb-mytre.servicebus.windows.net` (transport `servicebus`).
    #[arg(long, env = "SERVICE_BUS_FULLY_QUALIFIED_NAMESPACE")]
    pub service_bus_namespace: Option<String>,

    /// The shared access key name (Service Bus SAS auth).
    #[arg(long, env = "SERVICE_BUS_SAS_KEY_NAME")]
    pub service_bus_sas_key_name: Option<String>,

    /// The shared access key (Service Bus SAS auth). Never logged.
    #[arg(long, env = "SERVICE_BUS_SAS_KEY", hide_env_values = true)]
    pub service_bus_sas_key: Option<String>,

    /// The client id of the managed identity for Service Bus (Entra ID auth).
    #[arg(long, env = "MANAGED_IDENTITY_CLIENT_ID")]
    pub managed_identity_client_id: Option<String>,

    /// A Service Bus REST endpoint to use instead of `https://<namespace>` (another cloud, or the emulator).
    #[arg(long, env = "STEWARD_SERVICEBUS_ENDPOINT")]
    pub servicebus_endpoint: Option<String>,

    /// The queue of deployment status updates from the resource processor.
    #[arg(
        long,
        env = "SERVICE_BUS_DEPLOYMENT_STATUS_UPDATE_QUEUE",
        default_value = "deploymentstatus"
    )]
    pub deployment_status_queue: String,

    /// The queue of airlock step results.
    #[arg(long, env = "SERVICE_BUS_STEP_RESULT_QUEUE", default_value = "airlock-step-result")]
    pub step_result_queue: String,

    /// The queue of resource requests to the resource processor.
    #[arg(long, env = "SERVICE_BUS_RESOURCE_REQUEST_QUEUE", default_value = "workspacequeue")]
    pub resource_request_queue: String,

    /// The queue of airlock `statusChanged` events.
    #[arg(
        long,
        env = "STEWARD_AIRLOCK_STATUS_CHANGED_QUEUE",
        default_value = "airlock-status-changed"
    )]
    pub airlock_status_changed_queue: String,

    /// The queue of `airlockNotification` events.
    #[arg(
        long,
        env = "STEWARD_AIRLOCK_NOTIFICATION_QUEUE",
        default_value = "airlock-notification"
    )]
    pub airlock_notification_queue: String,

    /// Run built-in simulators of the resource processor and airlock processor. Default: on for `inmem`, off otherwise.
    #[arg(long, env = "STEWARD_SIMULATE_PROCESSORS")]
    pub simulate_processors: Option<bool>,

    /// A directory of extra `*.json` templates, added to the shipped samples.
    #[arg(long, env = "STEWARD_TEMPLATES_DIR")]
    pub templates_dir: Option<PathBuf>,

    /// Deliveries after which a message is dead-lettered.
    #[arg(long, env = "STEWARD_MAX_DELIVERIES", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_deliveries: u32,

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

    /// When set, every mutating request needs `Authorization: Bearer <token>`. Never logged.
    #[arg(long, env = "STEWARD_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,

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

/// Parses `25s`, `2m`, `1h 30m`, `500ms`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (try 25s, 2m or 500ms)"))
}

fn parse_recipients(text: &str) -> Result<BTreeMap<String, Vec<String>>, String> {
    serde_json::from_str(text)
        .map_err(|e| format!("expected a JSON object of role to email list: {e}"))
}

impl Config {
    /// The transport in effect: the one asked for, or the build's default.
    #[must_use]
    pub fn transport_kind(&self) -> TransportKind {
        self.transport.unwrap_or_else(TransportKind::default_for_build)
    }

    /// Whether to run the simulated processors: as asked, else only on `inmem`.
    #[must_use]
    pub fn simulate_processors(&self) -> bool {
        self.simulate_processors.unwrap_or(self.transport_kind() == TransportKind::Inmem)
    }

    /// The database URL with any password hidden, for logs.
    #[must_use]
    pub fn database_for_log(&self) -> String {
        redact_url(&self.database_url)
    }
}

/// `scheme://user:secret@host/…` → `scheme://user:***@host/…`.
#[must_use]
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let (authority, path) = rest.split_once('/').map_or((rest, None), |(a, p)| (a, Some(p)));
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_owned(),
    };
    match path {
        Some(path) => format!("{scheme}://{authority}/{path}"),
        None => format!("{scheme}://{authority}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn durations_read_like_people_write_them() {
        assert_eq!(parse_duration("25s"), Ok(Duration::from_secs(25)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
    }
}
