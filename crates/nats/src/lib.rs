#![doc = include_str!("../../../docs/nats.md")]

mod builder;
mod error;
mod message;
mod sink;
mod source;
mod topology;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::{self, Context};
use async_nats::{Client, ConnectOptions, Event};
use futures::StreamExt;
use steward_core::{Capabilities, DeadLetter, TransportError};
use tokio::sync::OnceCell;
use tokio::time::timeout;

pub use builder::{
    CONSUMER_NAME, ConfigError, Credentials, DEFAULT_ACK_WAIT, DEFAULT_MAX_DELIVERIES,
    DEFAULT_REQUEST_TIMEOUT, DEFAULT_STREAM_PREFIX, DEFAULT_URL, NatsBuilder,
};
pub use message::{
    CONTENT_TYPE_HEADER, CORRELATION_ID_HEADER, DEAD_LETTER_DESCRIPTION_HEADER,
    DEAD_LETTER_MESSAGE_ID_HEADER, DEAD_LETTER_REASON_HEADER, DELIVERY_COUNT_HEADER,
    MESSAGE_ID_HEADER, SESSION_ID_HEADER,
};
pub use sink::NatsSink;
pub use source::NatsSource;

/// `url` (one NATS server, or several separated by commas) with its credentials hidden,
/// for logs and `Debug` output: a password becomes `***`, and a user part without a
/// password (a token) becomes `***` whole. The rule every transport shares; see
/// [`steward_core::transport::redact_url`].
///
/// ```
/// assert_eq!(steward_nats::redact_url("nats://u:pw@h:4222"), "nats://u:***@h:4222");
/// ```
pub use steward_core::transport::redact_url;

/// Whether a nats-server of version `server_version` (as its `INFO` reports it, say
/// `2.9.10`) may reset a message's delivery count. Before the fix of nats-server PR
/// #5305 (2024, in the 2.10 series), a redelivery that the server took for a pull request
/// that had just expired was delivered again later as a new message, with delivery
/// count 1: 2.9.x does so. The oldest release known to be fixed is 2.10.25; earlier 2.10
/// releases are counted as affected. A version that does not parse is not known to be
/// affected.
///
/// ```
/// assert!(steward_nats::server_resets_delivery_counts("2.9.10"));
/// assert!(!steward_nats::server_resets_delivery_counts("2.15.1"));
/// ```
#[must_use]
pub fn server_resets_delivery_counts(server_version: &str) -> bool {
    let release = server_version.trim_start_matches('v');
    let release = release.split(['-', '+']).next().unwrap_or(release);
    let mut parts = release.split('.').map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor), patch) => (major, minor, patch.unwrap_or(0)) < (2, 10, 25),
        _ => false,
    }
}

use builder::Config;
use error::Error;

/// What this transport supports; see the crate docs for what is missing and why.
pub(crate) const CAPABILITIES: Capabilities = Capabilities {
    sessions: false,
    native_dead_letter: false,
    lock_renewal: true,
    delayed_abandon: true,
    delivery_count: true,
    binary_body: true,
    max_body_bytes: None,
};

/// Room left in a NATS message for the headers, below the server's `max_payload`.
const HEADER_ROOM: usize = 8 * 1024;

/// A configured NATS JetStream transport: opens sources and sinks, declares the
/// topology.
///
/// Cheap to clone; clones share the configuration, the publishing connection and the
/// "topology declared" state. Build one with [`NatsBuilder`].
#[derive(Clone)]
pub struct Nats {
    config: Arc<Config>,
    /// The shared connection's JetStream context, built once on first use.
    shared: Arc<OnceCell<Context>>,
    topology: Arc<OnceCell<()>>,
}

/// The configuration (credentials hidden) and whether the shared connection and the
/// topology are set up; not the client's internals.
impl std::fmt::Debug for Nats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nats")
            .field("config", &self.config)
            .field("connected", &self.shared.initialized())
            .field("topology_declared", &self.topology.initialized())
            .finish()
    }
}

impl Nats {
    pub(crate) fn new(config: Config) -> Self {
        Self { config: Arc::new(config), shared: Arc::default(), topology: Arc::default() }
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// What the sources of this transport support, with the largest body the server
    /// takes once this transport has connected.
    #[must_use]
    pub fn capabilities(&self) -> Capabilities {
        let max_body_bytes = self
            .shared
            .get()
            .map(|js| js.client().server_info().max_payload.saturating_sub(HEADER_ROOM));
        Capabilities { max_body_bytes, ..CAPABILITIES }
    }

    /// The stream holding `queue`: `<prefix>_<queue>`, dots made underscores.
    #[must_use]
    pub fn stream_name(&self, queue: &str) -> String {
        topology::stream_name(&self.config, queue)
    }

    /// The stream holding the dead letters of `queue` (subject `<queue>.dlq`).
    #[must_use]
    pub fn dead_letter_stream_name(&self, queue: &str) -> String {
        topology::dead_letter_stream_name(&self.config, queue)
    }

    /// The connection shared by sinks and topology requests, opened on first use, with
    /// its JetStream context (a cheap clone).
    pub(crate) async fn shared(&self) -> Result<Context, Error> {
        let js = self
            .shared
            .get_or_try_init(|| async {
                Ok::<_, Error>(self.context(connect(&self.config, "shared", None).await?))
            })
            .await?;
        Ok(js.clone())
    }

    pub(crate) fn context(&self, client: Client) -> Context {
        let mut js = jetstream::new(client);
        js.set_timeout(self.config.request_timeout);
        js
    }

    /// Connects (if not yet) and declares every configured queue's streams and
    /// consumer (see the crate docs), idempotently; remembers that it did, so sources
    /// do not declare again.
    ///
    /// # Errors
    ///
    /// [`TransportError::Protocol`] naming the stream or consumer and the setting when
    /// one exists with other settings; [`TransportError::Auth`] for refused
    /// credentials; retryable connection errors.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: declaring is idempotent, a cancelled call can be repeated.
    pub async fn declare_topology(&self) -> Result<(), TransportError> {
        self.declare().await?;
        let _ = self.topology.set(());
        Ok(())
    }

    async fn declare(&self) -> Result<(), Error> {
        let js = self.shared().await?;
        topology::declare(&js, &self.config).await
    }

    pub(crate) async fn ensure_topology(&self) -> Result<(), TransportError> {
        Ok(self.topology.get_or_try_init(|| self.declare()).await.map(drop)?)
    }

    /// Deletes the streams of every configured queue, with their messages and
    /// consumers: for tests and throw-away environments. Streams already gone are
    /// skipped.
    ///
    /// # Errors
    ///
    /// [`TransportError::Auth`] for refused credentials; connection errors.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: deleting is idempotent.
    pub async fn delete_topology(&self) -> Result<(), TransportError> {
        let js = self.shared().await?;
        Ok(topology::delete(&js, &self.config).await?)
    }

    /// A new consumer of `queue` on a connection of its own. Declares the topology
    /// first if this transport has not yet, and the queue's durable consumer if it is
    /// missing (a consumer deleted by hand comes back when the updater reopens its
    /// source).
    ///
    /// # Errors
    ///
    /// [`TransportError::NotFound`] when the queue is not configured on this transport
    /// or its stream does not exist; [`TransportError::Protocol`] when its consumer
    /// exists with other settings; [`TransportError::Auth`]; retryable connection
    /// errors.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: a cancelled call drops the connection it opened.
    pub async fn source(&self, queue: &str) -> Result<NatsSource, TransportError> {
        let config = &self.config;
        if !config.queues.iter().chain(&config.publish_queues).any(|known| known == queue) {
            return Err(Error::NotConfigured { queue: queue.to_owned() }.into());
        }
        self.ensure_topology().await?;
        Ok(NatsSource::open(self, queue).await?)
    }

    /// A sink; it connects on its first send.
    #[must_use]
    pub fn sink(&self) -> NatsSink {
        NatsSink::new(self.clone())
    }

    /// Reads every message in `<queue>.dlq`, oldest first, without removing any: for
    /// tests and tools.
    ///
    /// # Errors
    ///
    /// [`TransportError::NotFound`] when the dead-letter stream does not exist;
    /// connection errors.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: reading changes nothing; the reader's consumer is ephemeral.
    pub async fn dead_letters(&self, queue: &str) -> Result<Vec<DeadLetter>, TransportError> {
        Ok(self.read_dead_letters(queue).await?)
    }

    async fn read_dead_letters(&self, queue: &str) -> Result<Vec<DeadLetter>, Error> {
        let js = self.shared().await?;
        let name = self.dead_letter_stream_name(queue);
        let mut stream = js.get_stream(&name).await.map_err(|e| {
            if e.to_string().contains("stream not found") {
                Error::NotFound { entity: format!("stream {name}"), source: Some(e.into()) }
            } else {
                Error::jetstream(format!("open stream {name}"), e)
            }
        })?;
        let count = stream
            .info()
            .await
            .map_err(|e| Error::jetstream(format!("read stream {name}"), e))?
            .state
            .messages;
        if count == 0 {
            return Ok(Vec::new());
        }
        let reader = stream
            .create_consumer(pull::Config {
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::None,
                inactive_threshold: std::time::Duration::from_secs(60),
                ..Default::default()
            })
            .await
            .map_err(|e| Error::jetstream(format!("read stream {name}"), e))?;
        let wanted = usize::try_from(count).unwrap_or(usize::MAX);
        let mut read = Vec::new();
        let limit = self.config.request_timeout;
        let collect = async {
            while read.len() < wanted {
                let mut batch = reader
                    .batch()
                    .max_messages(wanted - read.len())
                    .expires(limit)
                    .messages()
                    .await
                    .map_err(|e| Error::jetstream(format!("read stream {name}"), e))?;
                let before = read.len();
                while let Some(got) = batch.next().await {
                    let got =
                        got.map_err(|e| Error::jetstream(format!("read stream {name}"), e))?;
                    read.push(dead_letter(&got));
                }
                if read.len() == before {
                    break;
                }
            }
            Ok::<_, Error>(())
        };
        let collected = timeout(limit * 3, collect).await;
        let _ = stream.delete_consumer(&reader.cached_info().name).await;
        collected
            .map_err(|_| Error::Timeout { what: format!("reading {name}"), after: limit * 3 })??;
        Ok(read)
    }
}

/// A dead letter as stored in `<queue>.dlq`.
fn dead_letter(got: &jetstream::Message) -> DeadLetter {
    let headers = got.headers.as_ref();
    let info = got.info().ok();
    let sequence = info.as_ref().map_or(0, |i| i.stream_sequence);
    let enqueued_at = info.map(|i| SystemTime::from(i.published));
    let delivery_count = message::header(headers, DELIVERY_COUNT_HEADER)
        .and_then(|count| count.parse().ok())
        .unwrap_or(1);
    let mut message = message::to_message(
        headers,
        got.payload.clone(),
        || format!("dlq-{sequence}"),
        delivery_count,
        enqueued_at,
        &[
            DEAD_LETTER_REASON_HEADER,
            DEAD_LETTER_DESCRIPTION_HEADER,
            DELIVERY_COUNT_HEADER,
            DEAD_LETTER_MESSAGE_ID_HEADER,
        ],
    );
    if let Some(original) = message::header(headers, DEAD_LETTER_MESSAGE_ID_HEADER) {
        message.id = original;
    }
    let text =
        |name| message::header(headers, name).map(|v| message::decode(&v)).unwrap_or_default();
    DeadLetter {
        message,
        reason: text(DEAD_LETTER_REASON_HEADER),
        description: text(DEAD_LETTER_DESCRIPTION_HEADER),
    }
}

/// Opens a connection named `<name> <role> <id>`, in at most the request timeout.
///
/// `disconnects`, when given, counts the times the connection was lost.
pub(crate) async fn connect(
    config: &Config,
    role: &str,
    disconnects: Option<Arc<AtomicU64>>,
) -> Result<Client, Error> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let name = format!("{} {role} {}", config.connection_name, &id[..8]);
    let mut options = ConnectOptions::new()
        .name(&name)
        .connection_timeout(config.request_timeout)
        .request_timeout(Some(config.request_timeout));
    if let Some(disconnects) = disconnects {
        options = options.event_callback(move |event| {
            let disconnects = disconnects.clone();
            async move {
                if matches!(event, Event::Disconnected) {
                    disconnects.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
    }
    options = match &config.credentials {
        Credentials::None => options,
        Credentials::UserPassword { user, password } => {
            options.user_and_password(user.clone(), password.clone())
        }
        Credentials::Token(token) => options.token(token.clone()),
        Credentials::CredsFile(path) => {
            options.credentials_file(path).await.map_err(|e| Error::Auth {
                what: format!("read credentials file {}", path.display()),
                source: Some(e.into()),
            })?
        }
    };
    let connect = options.connect(config.url.as_str());
    match timeout(config.request_timeout * 2, connect).await {
        Err(_) => Err(Error::Timeout {
            what: format!("connecting to {}", config.url.redacted()),
            after: config.request_timeout * 2,
        }),
        Ok(Err(e)) => Err(Error::connect(&config.url.redacted(), e)),
        Ok(Ok(client)) => {
            let version = client.server_info().version;
            tracing::debug!(connection = %name, server_version = %version, "nats connection opened");
            if server_resets_delivery_counts(&version) {
                tracing::warn!(
                    connection = %name,
                    server_version = %version,
                    "this nats-server can reset a redelivered message's delivery count to 1, \
                     so a message that keeps failing may never reach the dead-letter limit; \
                     use nats-server 2.10.25 or later"
                );
            }
            Ok(client)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::server_resets_delivery_counts as resets;

    #[test]
    fn servers_before_2_10_25_may_reset_delivery_counts() {
        for old in ["2.9.10", "v2.9.25", "2.2.0", "1.4.1", "2.10.0", "2.10.24", "2.9"] {
            assert!(resets(old), "{old}");
        }
        for good in ["2.10.25", "2.10.26", "2.15.1", "v2.11.0-beta.1", "2.12.0+build", "3.0.0"] {
            assert!(!resets(good), "{good}");
        }
        for unknown in ["", "2", "dev", "x.y.z"] {
            assert!(!resets(unknown), "{unknown:?}");
        }
    }
}
