//! Configuration: [`RabbitMqBuilder`] from the environment and `with_*` setters.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use lapin::uri::AMQPUri;
use steward_core::transport::BrokerUrl;

use crate::RabbitMq;

/// The URL used when neither `STEWARD_RABBITMQ_URL` nor [`RabbitMqBuilder::with_url`]
/// gives one.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The default of `STEWARD_MAX_DELIVERIES`.
pub const DEFAULT_MAX_DELIVERIES: u32 = 10;
/// The smallest prefetch a consumer gets by default, whatever the concurrency.
pub const MIN_DEFAULT_PREFETCH: u16 = 256;
/// The default prefetch per handler: a consumer gets `max(PREFETCH_PER_HANDLER ×
/// concurrency, MIN_DEFAULT_PREFETCH)` unless a prefetch is set.
pub const PREFETCH_PER_HANDLER: usize = 4;
/// The default prefix of connection names.
pub const DEFAULT_CONNECTION_NAME: &str = "steward";
/// The default AMQP heartbeat.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// How long opening a connection may take by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a publish waits for the broker's confirm by default.
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// A configuration value that cannot work.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The broker URL does not parse (the text never includes the password).
    #[error("invalid RabbitMQ URL {url}: {reason}")]
    InvalidUrl {
        /// The URL with its password replaced by `***`.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A number does not parse or is out of range.
    #[error("invalid {name} {value:?}: {reason}")]
    InvalidNumber {
        /// The setting or environment variable.
        name: &'static str,
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A queue name is empty or too long for AMQP once suffixed with `.dlq` or
    /// `.delay.<ms>`.
    #[error("invalid queue name {name:?}: {reason}")]
    InvalidQueueName {
        /// The queue name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A queue given a single active consumer is not consumed by this transport.
    #[error(
        "queue {queue} has a single active consumer but is not consumed: add it with \
         RabbitMqBuilder::with_queue"
    )]
    SingleActiveNotConsumed {
        /// The queue.
        queue: String,
    },
    /// The broker-side delivery limit is not above the updater's `max_deliveries`, so
    /// the broker would dead-letter messages before the updater can.
    #[error(
        "x-delivery-limit {delivery_limit} must be above max_deliveries {max_deliveries}, \
         or the broker dead-letters messages before the updater does"
    )]
    DeliveryLimitTooLow {
        /// The broker's limit.
        delivery_limit: u32,
        /// The updater's limit.
        max_deliveries: u32,
    },
}

/// Builds a [`RabbitMq`] transport: the broker URL, the queues, and the knobs of the
/// consumers.
///
/// [`from_env`](Self::from_env) reads `STEWARD_RABBITMQ_URL` (default
/// [`DEFAULT_URL`]) and `STEWARD_MAX_DELIVERIES` (default [`DEFAULT_MAX_DELIVERIES`]);
/// `with_*` setters
/// override them. Nothing is checked or contacted until [`build`](Self::build), and
/// `build` does not connect: the first source or sink does.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use steward_rabbitmq::RabbitMqBuilder;
///
/// let rabbit = RabbitMqBuilder::from_env()
///     .with_url("amqp://guest:guest@127.0.0.1:5672/%2f")
///     .with_queue("deploymentstatus")
///     .with_publish_queue("workspacequeue")
///     .with_concurrency(8)
///     .with_heartbeat(Duration::from_secs(5))
///     .build()?;
/// assert_eq!(rabbit.prefetch(), 256);
/// # Ok::<_, steward_rabbitmq::ConfigError>(())
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct RabbitMqBuilder {
    url: BrokerUrl,
    connection_name: String,
    queues: Vec<String>,
    publish_queues: Vec<String>,
    single_active: Vec<String>,
    max_deliveries: Setting<u32>,
    delivery_limit: Option<u32>,
    concurrency: usize,
    prefetch: Option<u16>,
    heartbeat: Duration,
    connect_timeout: Duration,
    confirm_timeout: Duration,
    queue_expiry: Option<Duration>,
}

/// A value set in code, read from the environment (still unparsed), or the default.
#[derive(Clone, Debug)]
enum Setting<T> {
    Default,
    Env(&'static str, String),
    Set(T),
}

impl Default for RabbitMqBuilder {
    fn default() -> Self {
        Self {
            url: BrokerUrl::new(DEFAULT_URL),
            connection_name: DEFAULT_CONNECTION_NAME.to_owned(),
            queues: Vec::new(),
            publish_queues: Vec::new(),
            single_active: Vec::new(),
            max_deliveries: Setting::Default,
            delivery_limit: None,
            concurrency: 1,
            prefetch: None,
            heartbeat: DEFAULT_HEARTBEAT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            confirm_timeout: DEFAULT_CONFIRM_TIMEOUT,
            queue_expiry: None,
        }
    }
}

impl RabbitMqBuilder {
    /// Defaults everywhere: [`DEFAULT_URL`], no queues, [`DEFAULT_MAX_DELIVERIES`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Defaults, then `STEWARD_RABBITMQ_URL` and `STEWARD_MAX_DELIVERIES` where set.
    /// Values are checked by [`build`](Self::build).
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`from_env`](Self::from_env) over any source of variables.
    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let mut builder = Self::default();
        if let Some(url) = var("STEWARD_RABBITMQ_URL") {
            builder.url = BrokerUrl::new(url);
        }
        if let Some(value) = var("STEWARD_MAX_DELIVERIES") {
            builder.max_deliveries = Setting::Env("STEWARD_MAX_DELIVERIES", value);
        }
        builder
    }

    /// The broker URL, `amqp://user:password@host:port/vhost` (or `amqps://`); the
    /// vhost is URL-encoded (`%2f` for `/`). A `heartbeat` query parameter in the URL
    /// wins over [`with_heartbeat`](Self::with_heartbeat).
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.url = BrokerUrl::new(url);
        self
    }

    /// The prefix of every connection name (default [`DEFAULT_CONNECTION_NAME`]).
    /// Connections are named
    /// `<prefix> source <queue> <id>` and `<prefix> sink <id>`.
    pub fn with_connection_name(mut self, prefix: impl Into<String>) -> Self {
        self.connection_name = prefix.into();
        self
    }

    /// A queue this service consumes: it gets the whole topology (the quorum queue,
    /// `<queue>.dlq` and the delay buckets `<queue>.delay.<ms>`).
    pub fn with_queue(mut self, queue: impl Into<String>) -> Self {
        self.queues.push(queue.into());
        self
    }

    /// A queue this service only publishes to: it is declared (the quorum queue and
    /// `<queue>.dlq`, no delay buckets), so a first publish does not find it missing. A
    /// source of it (a simulator consuming what the service publishes) declares its delay
    /// buckets when it opens.
    pub fn with_publish_queue(mut self, queue: impl Into<String>) -> Self {
        self.publish_queues.push(queue.into());
        self
    }

    /// Gives consumed `queue` a single active consumer (`x-single-active-consumer`):
    /// of all the consumers of the queue, in any process, the broker delivers to one
    /// only, the first to subscribe; the others wait as hot standbys, and the next one
    /// takes over (with the messages the active one held unsettled) once the active
    /// one's connection closes or its consumer is cancelled. Order then holds across
    /// several replicas of a service. `queue` must also be given to
    /// [`with_queue`](Self::with_queue). A source of such a queue reports whether it
    /// is [active or standing by](steward_core::ConsumerRole) (see the crate docs for
    /// how it infers that).
    ///
    /// The argument is part of the queue's identity: a queue that exists without it
    /// stops [`declare_topology`](RabbitMq::declare_topology) with an error naming the
    /// queue and `x-single-active-consumer`; drain and delete it, then start again.
    pub fn with_single_active_consumer(mut self, queue: impl Into<String>) -> Self {
        self.single_active.push(queue.into());
        self
    }

    /// The updater's delivery limit (`STEWARD_MAX_DELIVERIES`); the broker's
    /// `x-delivery-limit` is set above it.
    pub fn with_max_deliveries(mut self, max_deliveries: u32) -> Self {
        self.max_deliveries = Setting::Set(max_deliveries);
        self
    }

    /// The broker-side `x-delivery-limit` of the quorum queues (default twice
    /// `max_deliveries`). It only catches messages that crash their consumers before
    /// the updater can count them; it must be above `max_deliveries`.
    pub fn with_delivery_limit(mut self, delivery_limit: u32) -> Self {
        self.delivery_limit = Some(delivery_limit);
        self
    }

    /// How many handlers the updater runs at once; sets the default prefetch (see
    /// [`PREFETCH_PER_HANDLER`]).
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// How many unacknowledged messages the broker hands each consumer ahead
    /// (`basic.qos`), overriding the default (see [`PREFETCH_PER_HANDLER`]).
    pub fn with_prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = Some(prefetch);
        self
    }

    /// The AMQP heartbeat (default [`DEFAULT_HEARTBEAT`], whole seconds, at least 1 s):
    /// a connection that
    /// goes silent is noticed within about twice this.
    pub fn with_heartbeat(mut self, heartbeat: Duration) -> Self {
        self.heartbeat = heartbeat;
        self
    }

    /// How long opening a connection may take (default [`DEFAULT_CONNECT_TIMEOUT`]).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long a publish waits for the broker's confirm (default
    /// [`DEFAULT_CONFIRM_TIMEOUT`]).
    pub fn with_confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// Declares every queue with `x-expires`, so the broker deletes it, with its
    /// messages, once nobody consumed or declared it for this long. For tests and
    /// throw-away environments only: an idle production queue would vanish.
    pub fn with_queue_expiry(mut self, expiry: Duration) -> Self {
        self.queue_expiry = Some(expiry);
        self
    }

    /// Checks the configuration and returns the transport. Does not connect.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the bad setting: an unparsable URL, a bad number in
    /// `STEWARD_MAX_DELIVERIES`, an empty or over-long queue name, a delivery limit
    /// not above `max_deliveries`, or a zero concurrency or prefetch.
    pub fn build(self) -> Result<RabbitMq, ConfigError> {
        let uri = AMQPUri::from_str(self.url.as_str())
            .map_err(|reason| ConfigError::InvalidUrl { url: self.url.redacted(), reason })?;
        let max_deliveries = match self.max_deliveries {
            Setting::Default => DEFAULT_MAX_DELIVERIES,
            Setting::Set(value) => value,
            Setting::Env(name, value) => {
                value.trim().parse().map_err(|e: std::num::ParseIntError| {
                    ConfigError::InvalidNumber { name, value: value.clone(), reason: e.to_string() }
                })?
            }
        };
        if max_deliveries == 0 {
            return Err(number("max_deliveries", 0, "must be at least 1"));
        }
        let delivery_limit = self.delivery_limit.unwrap_or(max_deliveries.saturating_mul(2));
        if delivery_limit <= max_deliveries {
            return Err(ConfigError::DeliveryLimitTooLow { delivery_limit, max_deliveries });
        }
        if self.concurrency == 0 {
            return Err(number("concurrency", 0, "must be at least 1"));
        }
        let prefetch = match self.prefetch {
            Some(0) => return Err(number("prefetch", 0, "must be at least 1")),
            Some(prefetch) => prefetch,
            None => {
                let wanted = self.concurrency.saturating_mul(PREFETCH_PER_HANDLER);
                u16::try_from(wanted).unwrap_or(u16::MAX).max(MIN_DEFAULT_PREFETCH)
            }
        };
        // Without a heartbeat a connection that goes silent is never noticed.
        let heartbeat = match u16::try_from(self.heartbeat.as_secs()) {
            Ok(0) => return Err(number("heartbeat", "0 s", "must be at least 1 s")),
            Ok(secs) => secs,
            Err(_) => return Err(number("heartbeat", self.heartbeat.as_secs(), "at most 65535 s")),
        };
        for queue in self.queues.iter().chain(&self.publish_queues) {
            check_queue_name(queue)?;
        }
        let mut publish_queues = self.publish_queues;
        publish_queues.retain(|queue| !self.queues.contains(queue));
        publish_queues.dedup();
        let mut queues = self.queues;
        queues.dedup();
        if let Some(queue) = self.single_active.iter().find(|queue| !queues.contains(queue)) {
            return Err(ConfigError::SingleActiveNotConsumed { queue: queue.clone() });
        }
        let mut single_active = self.single_active;
        single_active.dedup();
        Ok(RabbitMq::new(Config {
            uri,
            connection_name: self.connection_name,
            queues,
            publish_queues,
            single_active,
            max_deliveries,
            delivery_limit,
            prefetch,
            heartbeat,
            connect_timeout: self.connect_timeout,
            confirm_timeout: self.confirm_timeout,
            queue_expiry: self.queue_expiry,
        }))
    }
}

fn number(name: &'static str, value: impl ToString, reason: &str) -> ConfigError {
    ConfigError::InvalidNumber { name, value: value.to_string(), reason: reason.to_owned() }
}

/// The longest suffix the topology adds to a queue name: `.delay.600000`.
const LONGEST_SUFFIX: usize = ".delay.600000".len();

fn check_queue_name(queue: &str) -> Result<(), ConfigError> {
    let invalid = |reason: &str| ConfigError::InvalidQueueName {
        name: queue.to_owned(),
        reason: reason.to_owned(),
    };
    if queue.is_empty() {
        return Err(invalid("empty"));
    }
    if queue.starts_with("amq.") {
        return Err(invalid("names starting with amq. are reserved by the broker"));
    }
    if queue.len() + LONGEST_SUFFIX > 255 {
        return Err(invalid(
            "longer than 242 bytes; with the .delay.<ms> suffix it would not fit AMQP's 255",
        ));
    }
    Ok(())
}

/// The checked configuration shared by every connection of a [`RabbitMq`].
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) uri: AMQPUri,
    pub(crate) connection_name: String,
    pub(crate) queues: Vec<String>,
    pub(crate) publish_queues: Vec<String>,
    /// Consumed queues declared with `x-single-active-consumer`.
    pub(crate) single_active: Vec<String>,
    pub(crate) max_deliveries: u32,
    pub(crate) delivery_limit: u32,
    pub(crate) prefetch: u16,
    pub(crate) heartbeat: u16,
    pub(crate) connect_timeout: Duration,
    pub(crate) confirm_timeout: Duration,
    pub(crate) queue_expiry: Option<Duration>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let authority = &self.uri.authority;
        f.debug_struct("Config")
            .field("user", &authority.userinfo.username)
            .field("host", &authority.host)
            .field("port", &authority.port)
            .field("vhost", &self.uri.vhost)
            .field("connection_name", &self.connection_name)
            .field("queues", &self.queues)
            .field("publish_queues", &self.publish_queues)
            .field("single_active", &self.single_active)
            .field("max_deliveries", &self.max_deliveries)
            .field("delivery_limit", &self.delivery_limit)
            .field("prefetch", &self.prefetch)
            .field("heartbeat", &self.heartbeat)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_defaults_to_four_times_concurrency_but_at_least_256() {
        let small = RabbitMqBuilder::new().with_concurrency(8).build().unwrap();
        assert_eq!(small.prefetch(), 256);
        let large = RabbitMqBuilder::new().with_concurrency(100).build().unwrap();
        assert_eq!(large.prefetch(), 400);
        let set = RabbitMqBuilder::new().with_concurrency(100).with_prefetch(16).build().unwrap();
        assert_eq!(set.prefetch(), 16);
    }

    #[test]
    fn delivery_limit_defaults_above_max_deliveries_and_must_stay_above() {
        let rabbit = RabbitMqBuilder::new().with_max_deliveries(7).build().unwrap();
        assert_eq!(rabbit.delivery_limit(), 14);
        let err = RabbitMqBuilder::new()
            .with_max_deliveries(10)
            .with_delivery_limit(10)
            .build()
            .unwrap_err();
        assert!(matches!(err, ConfigError::DeliveryLimitTooLow { .. }), "{err}");
    }

    #[test]
    fn bad_url_is_an_error_without_the_password() {
        let err = RabbitMqBuilder::new().with_url("amqp://user:secret@host:notaport/").build();
        let text = err.unwrap_err().to_string();
        assert!(text.contains("invalid RabbitMQ URL"), "{text}");
        assert!(!text.contains("secret"), "{text}");
    }

    #[test]
    fn debug_output_never_shows_the_password() {
        let builder = RabbitMqBuilder::new().with_url("amqp://user:secret@host:5672/%2f");
        let text = format!("{builder:?}");
        assert!(text.contains("user:***@host"), "{text}");
        assert!(!text.contains("secret"), "{text}");
        let rabbit = builder.build().unwrap();
        assert!(!format!("{rabbit:?}").contains("secret"));
    }

    #[test]
    fn queue_names_must_leave_room_for_the_topology_suffixes() {
        let err = RabbitMqBuilder::new().with_queue("").build().unwrap_err();
        assert!(matches!(err, ConfigError::InvalidQueueName { .. }));
        let err = RabbitMqBuilder::new().with_queue("q".repeat(243)).build().unwrap_err();
        assert!(matches!(err, ConfigError::InvalidQueueName { .. }));
        assert!(RabbitMqBuilder::new().with_queue("q".repeat(242)).build().is_ok());
        let err = RabbitMqBuilder::new().with_publish_queue("amq.x").build().unwrap_err();
        assert!(matches!(err, ConfigError::InvalidQueueName { .. }));
    }

    #[test]
    fn single_active_consumer_needs_a_consumed_queue() {
        let err = RabbitMqBuilder::new()
            .with_publish_queue("out")
            .with_single_active_consumer("out")
            .build()
            .unwrap_err();
        assert!(matches!(&err, ConfigError::SingleActiveNotConsumed { queue } if queue == "out"));
        let rabbit = RabbitMqBuilder::new()
            .with_queue("in")
            .with_single_active_consumer("in")
            .with_single_active_consumer("in")
            .build()
            .unwrap();
        assert_eq!(rabbit.config().single_active, ["in"]);
    }

    #[test]
    fn zero_concurrency_prefetch_and_heartbeat_are_refused() {
        assert!(RabbitMqBuilder::new().with_heartbeat(Duration::from_millis(500)).build().is_err());
        assert!(RabbitMqBuilder::new().with_concurrency(0).build().is_err());
        assert!(RabbitMqBuilder::new().with_prefetch(0).build().is_err());
        assert!(RabbitMqBuilder::new().with_max_deliveries(0).build().is_err());
    }

    #[test]
    fn environment_sets_url_and_max_deliveries_and_bad_numbers_are_named() {
        let vars = |name: &str| match name {
            "STEWARD_RABBITMQ_URL" => Some("amqp://u:p@broker:5673/v".to_owned()),
            "STEWARD_MAX_DELIVERIES" => Some("4".to_owned()),
            _ => None,
        };
        let rabbit = RabbitMqBuilder::from_vars(vars).build().unwrap();
        assert_eq!(rabbit.max_deliveries(), 4);
        assert_eq!(rabbit.delivery_limit(), 8);
        let text = format!("{rabbit:?}");
        assert!(text.contains("broker") && text.contains("5673"), "{text}");

        let bad = |name: &str| (name == "STEWARD_MAX_DELIVERIES").then(|| "ten".to_owned());
        let err = RabbitMqBuilder::from_vars(bad).build().unwrap_err();
        assert!(err.to_string().contains("STEWARD_MAX_DELIVERIES"), "{err}");
        // Set in code wins over the environment.
        let rabbit = RabbitMqBuilder::from_vars(bad).with_max_deliveries(3).build().unwrap();
        assert_eq!(rabbit.max_deliveries(), 3);
    }

    #[test]
    fn redact_hides_only_the_password() {
        use steward_core::transport::redact_url;
        assert_eq!(redact_url("amqp://u:p@h:1/%2f"), "amqp://u:***@h:1/%2f");
        assert_eq!(redact_url("amqp://h:1/%2f"), "amqp://h:1/%2f");
        assert_eq!(redact_url("amqp://u@h/"), "amqp://u@h/");
    }
}
