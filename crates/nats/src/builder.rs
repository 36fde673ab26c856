//! Configuration of the NATS transport.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use steward_core::transport::BrokerUrl;

use crate::Nats;

/// The server the transport connects to unless told otherwise.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

/// The updater's delivery limit unless told otherwise (as for the other transports).
pub const DEFAULT_MAX_DELIVERIES: u32 = 10;

/// How long a delivery stays locked (the consumer's `ack_wait`) unless told otherwise.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);

/// The prefix of the stream names unless told otherwise.
pub const DEFAULT_STREAM_PREFIX: &str = "STEWARD";

/// The name of the durable consumer of each queue.
pub const CONSUMER_NAME: &str = "steward";

/// How long connecting, a JetStream request and a publish ack may take unless told
/// otherwise.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How the transport authenticates.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// No credentials.
    None,
    /// A user name and a password.
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
    /// A token.
    Token(String),
    /// A `.creds` file (a user JWT and its NKey seed).
    CredsFile(PathBuf),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::UserPassword { user, .. } => write!(f, "UserPassword({user}, <hidden>)"),
            Self::Token(_) => f.write_str("Token(<hidden>)"),
            Self::CredsFile(path) => write!(f, "CredsFile({})", path.display()),
        }
    }
}

/// A setting [`NatsBuilder::build`] refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A queue name that is not a valid NATS subject without wildcards.
    #[error(
        "queue name {0:?} is not a NATS subject: use letters, digits, '-', '_' and '.' between non-empty tokens"
    )]
    InvalidQueue(String),
    /// The broker-side `max_deliver` is not above the updater's `max_deliveries`.
    #[error(
        "max_deliver {max_deliver} must be above max_deliveries {max_deliveries}, or the broker stops delivering before the updater dead-letters"
    )]
    MaxDeliverTooLow {
        /// The broker's limit.
        max_deliver: u32,
        /// The updater's limit.
        max_deliveries: u32,
    },
    /// A zero ack wait.
    #[error("ack_wait must be at least one second")]
    AckWaitTooShort,
    /// A stream prefix that is not a valid stream name.
    #[error("stream prefix {0:?} must be non-empty letters, digits, '-' and '_'")]
    InvalidStreamPrefix(String),
}

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) url: BrokerUrl,
    pub(crate) credentials: Credentials,
    pub(crate) connection_name: String,
    pub(crate) queues: Vec<String>,
    pub(crate) publish_queues: Vec<String>,
    pub(crate) max_deliveries: u32,
    pub(crate) max_deliver: u32,
    pub(crate) ack_wait: Duration,
    pub(crate) stream_prefix: String,
    pub(crate) request_timeout: Duration,
    pub(crate) max_ack_pending: i64,
}

/// Builds a [`Nats`] transport.
///
/// ```
/// use steward_nats::NatsBuilder;
///
/// let nats = NatsBuilder::new()
///     .with_url("nats://127.0.0.1:4222")
///     .with_queue("jobs")
///     .with_publish_queue("results")
///     .build()
///     .unwrap();
/// assert_eq!(nats.stream_name("jobs"), "STEWARD_jobs");
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct NatsBuilder {
    config: Config,
    max_deliver: Option<u32>,
}

impl Default for NatsBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl NatsBuilder {
    /// Defaults everywhere: [`DEFAULT_URL`], no credentials, no queues.
    pub fn new() -> Self {
        Self {
            config: Config {
                url: BrokerUrl::new(DEFAULT_URL),
                credentials: Credentials::None,
                connection_name: "steward".to_owned(),
                queues: Vec::new(),
                publish_queues: Vec::new(),
                max_deliveries: DEFAULT_MAX_DELIVERIES,
                max_deliver: 0,
                ack_wait: DEFAULT_ACK_WAIT,
                stream_prefix: DEFAULT_STREAM_PREFIX.to_owned(),
                request_timeout: DEFAULT_REQUEST_TIMEOUT,
                max_ack_pending: 1000,
            },
            max_deliver: None,
        }
    }

    /// The server URL, `nats://host:port` (several, comma-separated, for a cluster).
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.config.url = BrokerUrl::new(url);
        self
    }

    /// How to authenticate.
    pub fn with_credentials(mut self, credentials: Credentials) -> Self {
        self.config.credentials = credentials;
        self
    }

    /// The connection name the server shows; sources append their role and queue.
    pub fn with_connection_name(mut self, name: impl Into<String>) -> Self {
        self.config.connection_name = name.into();
        self
    }

    /// A queue this transport consumes: its streams and its consumer are declared.
    pub fn with_queue(mut self, queue: impl Into<String>) -> Self {
        self.config.queues.push(queue.into());
        self
    }

    /// A queue this transport publishes to: its streams are declared, and a source of
    /// it declares the consumer when it opens.
    pub fn with_publish_queue(mut self, queue: impl Into<String>) -> Self {
        self.config.publish_queues.push(queue.into());
        self
    }

    /// The updater's delivery limit ([`DEFAULT_MAX_DELIVERIES`]); the consumer's
    /// `max_deliver` is set above it.
    pub fn with_max_deliveries(mut self, max_deliveries: u32) -> Self {
        self.config.max_deliveries = max_deliveries;
        self
    }

    /// The consumer's `max_deliver` (default: `max_deliveries` + 10). It only stops
    /// messages that crash their consumers before the updater can count them; it must
    /// be above `max_deliveries`.
    pub fn with_max_deliver(mut self, max_deliver: u32) -> Self {
        self.max_deliver = Some(max_deliver);
        self
    }

    /// The lock duration: the consumer's `ack_wait` ([`DEFAULT_ACK_WAIT`]).
    pub fn with_ack_wait(mut self, ack_wait: Duration) -> Self {
        self.config.ack_wait = ack_wait;
        self
    }

    /// The prefix of stream names ([`DEFAULT_STREAM_PREFIX`]).
    pub fn with_stream_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.stream_prefix = prefix.into();
        self
    }

    /// How long connecting, one JetStream request or one publish ack may take
    /// ([`DEFAULT_REQUEST_TIMEOUT`]).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.config.request_timeout = timeout;
        self
    }

    /// The transport.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] for a queue name that is not a subject, a `max_deliver` not above
    /// `max_deliveries`, an ack wait under a second, or a bad stream prefix.
    pub fn build(self) -> Result<Nats, ConfigError> {
        let mut config = self.config;
        for queue in config.queues.iter().chain(&config.publish_queues) {
            if !valid_subject(queue) {
                return Err(ConfigError::InvalidQueue(queue.clone()));
            }
        }
        let prefix_ok = !config.stream_prefix.is_empty()
            && config
                .stream_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !prefix_ok {
            return Err(ConfigError::InvalidStreamPrefix(config.stream_prefix));
        }
        if config.ack_wait < Duration::from_secs(1) {
            return Err(ConfigError::AckWaitTooShort);
        }
        config.max_deliver =
            self.max_deliver.unwrap_or_else(|| config.max_deliveries.saturating_add(10));
        if config.max_deliver <= config.max_deliveries {
            return Err(ConfigError::MaxDeliverTooLow {
                max_deliver: config.max_deliver,
                max_deliveries: config.max_deliveries,
            });
        }
        Ok(Nats::new(config))
    }
}

/// Whether `queue` is a subject without wildcards whose tokens are plain names.
pub(crate) fn valid_subject(queue: &str) -> bool {
    !queue.is_empty()
        && queue.split('.').all(|token| {
            !token.is_empty()
                && token.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls_are_logged_without_their_credentials() {
        use steward_core::transport::redact_url as redact;
        assert_eq!(redact("nats://u:secret@h:4222"), "nats://u:***@h:4222");
        assert_eq!(redact("nats://s3cr3t-token@h:4222"), "nats://***@h:4222");
        assert_eq!(redact("nats://h:4222"), "nats://h:4222");
        assert_eq!(redact("u:p@h:4222,nats://h2"), "u:***@h:4222,nats://h2");
        let config = super::NatsBuilder::new().with_url("nats://u:secret@h:4222");
        assert!(!format!("{config:?}").contains("secret"), "{config:?}");
    }

    use super::*;

    #[test]
    fn refuses_what_jetstream_would_refuse_later() {
        let bad = |b: NatsBuilder| b.build().unwrap_err();
        assert_eq!(
            bad(NatsBuilder::new().with_queue("a b")),
            ConfigError::InvalidQueue("a b".into())
        );
        assert_eq!(
            bad(NatsBuilder::new().with_queue("a.>")),
            ConfigError::InvalidQueue("a.>".into())
        );
        assert_eq!(
            bad(NatsBuilder::new().with_publish_queue("a..b")),
            ConfigError::InvalidQueue("a..b".into())
        );
        assert_eq!(
            bad(NatsBuilder::new().with_max_deliveries(5).with_max_deliver(5)),
            ConfigError::MaxDeliverTooLow { max_deliver: 5, max_deliveries: 5 }
        );
        assert_eq!(
            bad(NatsBuilder::new().with_ack_wait(Duration::ZERO)),
            ConfigError::AckWaitTooShort
        );
        assert_eq!(
            bad(NatsBuilder::new().with_stream_prefix("A.B")),
            ConfigError::InvalidStreamPrefix("A.B".into())
        );
    }

    #[test]
    fn credentials_are_not_printed() {
        let shown = format!(
            "{:?}",
            NatsBuilder::new().with_credentials(Credentials::UserPassword {
                user: "u".into(),
                password: "secret".into()
            })
        );
        assert!(!shown.contains("secret"), "{shown}");
        assert!(!format!("{:?}", Credentials::Token("secret".into())).contains("secret"));
    }
}
