#![doc = include_str!("../README.md")]

mod acks;
mod builder;
mod dead_letters;
mod error;
mod message;
mod publish;
mod sink;
mod source;
mod topology;

use std::sync::Arc;

use bytes::Bytes;
use lapin::options::{BasicGetOptions, BasicNackOptions};
use lapin::{Connection, ConnectionProperties};
use steward_core::{Capabilities, DeadLetter, TransportError};
use tokio::sync::OnceCell;
use tokio::time::timeout;

pub use builder::{
    ConfigError, DEFAULT_CONFIRM_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_CONNECTION_NAME,
    DEFAULT_HEARTBEAT, DEFAULT_MAX_DELIVERIES, DEFAULT_URL, MIN_DEFAULT_PREFETCH,
    PREFETCH_PER_HANDLER, RabbitMqBuilder,
};
pub use dead_letters::RabbitMqDeadLetters;
pub use message::{
    DEAD_LETTER_DESCRIPTION_HEADER, DEAD_LETTER_REASON_HEADER, DELIVERY_COUNT_HEADER,
    SESSION_ID_HEADER,
};
pub use sink::RabbitMqSink;
pub use source::RabbitMqSource;
pub use topology::{DELAY_BUCKETS, dead_letter_queue, delay_bucket, delay_queue};

use builder::Config;
use error::Error;

/// What this transport supports; see the crate docs for what is missing and why.
pub(crate) const CAPABILITIES: Capabilities = Capabilities {
    sessions: false,
    native_dead_letter: false,
    lock_renewal: false,
    delayed_abandon: true,
    delivery_count: true,
    binary_body: true,
    max_body_bytes: None,
};

/// A configured RabbitMQ transport: opens sources and sinks, declares the topology.
///
/// Cheap to clone; clones share the configuration and the "topology declared" state.
/// Build one with [`RabbitMqBuilder`].
#[derive(Debug, Clone)]
pub struct RabbitMq {
    config: Arc<Config>,
    topology: Arc<OnceCell<()>>,
}

impl RabbitMq {
    pub(crate) fn new(config: Config) -> Self {
        Self { config: Arc::new(config), topology: Arc::new(OnceCell::new()) }
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// What the sources of this transport support.
    #[must_use]
    pub fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    /// The prefetch each consumer gets (`basic.qos`).
    #[must_use]
    pub fn prefetch(&self) -> u16 {
        self.config.prefetch
    }

    /// The updater's delivery limit this transport was configured with.
    #[must_use]
    pub fn max_deliveries(&self) -> u32 {
        self.config.max_deliveries
    }

    /// The broker-side `x-delivery-limit` of the declared queues.
    #[must_use]
    pub fn delivery_limit(&self) -> u32 {
        self.config.delivery_limit
    }

    /// Declares every configured queue (see the crate docs), idempotently, and
    /// remembers that it did so sources and sinks do not declare again.
    ///
    /// # Errors
    ///
    /// [`TransportError::Protocol`] naming the queue and argument when a queue exists
    /// with other arguments; [`TransportError::Auth`] for refused credentials;
    /// retryable connection errors.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: declaring is idempotent, a cancelled call can be repeated.
    pub async fn declare_topology(&self) -> Result<(), TransportError> {
        self.declare().await?;
        let _ = self.topology.set(());
        Ok(())
    }

    async fn declare(&self) -> Result<(), TransportError> {
        let connection = connect(&self.config, "topology").await?;
        let declared = topology::declare(&connection, &self.config).await;
        let _ = connection.close(200, "topology declared".into()).await;
        Ok(declared?)
    }

    /// Deletes every configured queue (see the crate docs), with the messages in them:
    /// for tests and for tearing down throw-away environments. Queues already gone are
    /// skipped. Sources and sinks of this transport fail afterwards with `NotFound`.
    ///
    /// # Errors
    ///
    /// [`TransportError::Auth`] for refused credentials; connection errors.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: deleting is idempotent, a cancelled call can be repeated.
    pub async fn delete_topology(&self) -> Result<(), TransportError> {
        let connection = connect(&self.config, "topology").await?;
        let deleted = topology::delete(&connection, &self.config).await;
        let _ = connection.close(200, "topology deleted".into()).await;
        Ok(deleted?)
    }

    /// Declares the topology unless this transport (or a clone) already did.
    pub(crate) async fn ensure_topology(&self) -> Result<(), TransportError> {
        if self.config.queues.is_empty() && self.config.publish_queues.is_empty() {
            return Ok(());
        }
        self.topology.get_or_try_init(|| self.declare()).await.map(drop)
    }

    /// A new consumer of `queue` on a connection of its own, named
    /// `<prefix> source <queue> <id>`. Declares the topology first if this transport
    /// has not yet. `queue` must be configured: with
    /// [`with_queue`](RabbitMqBuilder::with_queue), or with
    /// [`with_publish_queue`](RabbitMqBuilder::with_publish_queue), in which case the
    /// source declares its delay buckets once it consumes.
    ///
    /// # Errors
    ///
    /// [`TransportError::NotFound`] when the queue is not configured on this transport
    /// (before connecting: its delayed abandons and dead letters would have nowhere to
    /// go), or does not exist;
    /// [`TransportError::Auth`] for refused credentials; retryable connection errors.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: a cancelled call closes the connection it opened.
    pub async fn source(&self, queue: &str) -> Result<RabbitMqSource, TransportError> {
        let config = &self.config;
        if !config.queues.iter().chain(&config.publish_queues).any(|known| known == queue) {
            return Err(Error::NotConfigured { queue: queue.to_owned() }.into());
        }
        self.ensure_topology().await?;
        RabbitMqSource::open(self, queue).await
    }

    /// A sink; it connects on its first send.
    #[must_use]
    pub fn sink(&self) -> RabbitMqSink {
        RabbitMqSink::new(self.clone())
    }

    /// Reads every message in `<queue>.dlq` without removing any, oldest first: for
    /// tests and tools. A message the transport dead-lettered has the delivery count it
    /// had then (reading it back is not counted); one the broker moved over its delivery
    /// limit has the broker's count.
    ///
    /// # Errors
    ///
    /// [`TransportError::NotFound`] when the dead-letter queue does not exist;
    /// connection errors.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: the messages read go back to the queue when the reading connection
    /// closes.
    pub async fn dead_letters(&self, queue: &str) -> Result<Vec<DeadLetter>, TransportError> {
        let dlq = dead_letter_queue(queue);
        let dlq_name = message::short("queue name", &dlq)?;
        let connection = connect(&self.config, &format!("dead-letter reader {queue}")).await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| Error::lapin(format!("open a channel to read {dlq}"), e))?;
        let mut read = Vec::new();
        let mut held = Vec::new();
        loop {
            let got = channel.basic_get(dlq_name.clone(), BasicGetOptions { no_ack: false });
            let got = timeout(self.config.confirm_timeout, got)
                .await
                .map_err(|_| Error::Timeout {
                    what: format!("reading {dlq}"),
                    after: self.config.confirm_timeout,
                })?
                .map_err(|e| Error::lapin(format!("read queue {dlq}"), e))?;
            let Some(got) = got else { break };
            let delivery = got.delivery;
            read.push(dead_letters::to_dead_letter(
                &delivery.properties,
                Bytes::from(delivery.data),
            ));
            held.push(delivery.acker);
        }
        for acker in held {
            let _ = acker.nack(BasicNackOptions { multiple: false, requeue: true }).await;
        }
        let _ = connection.close(200, "dead letters read".into()).await;
        Ok(read)
    }
}

/// Opens a connection named `<prefix> <role> <id>`, with the configured heartbeat, in
/// at most the connect timeout.
pub(crate) async fn connect(config: &Config, role: &str) -> Result<Connection, Error> {
    let mut uri = config.uri.clone();
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(config.heartbeat);
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    let name = format!("{} {role} {}", config.connection_name, &id[..8]);
    let properties = ConnectionProperties::default().with_connection_name(name.as_str().into());
    let host = format!("{}:{}", uri.authority.host, uri.authority.port);
    match timeout(config.connect_timeout, Connection::connect_uri(uri, properties)).await {
        Err(_) => Err(Error::Timeout {
            what: format!("connecting to {host}"),
            after: config.connect_timeout,
        }),
        Ok(Err(source)) => Err(Error::lapin(format!("connect to {host} as {name:?}"), source)),
        Ok(Ok(connection)) => {
            tracing::debug!(connection = %name, "rabbitmq connection opened");
            Ok(connection)
        }
    }
}

#[cfg(test)]
mod tests {
    use steward_core::ErrorKind;

    use super::*;

    #[tokio::test]
    async fn source_of_an_unconfigured_queue_is_not_found_before_connecting() {
        // Nothing listens on port 1: an attempt to connect would be a Connection error.
        let rabbit = RabbitMqBuilder::new()
            .with_url("amqp://guest:guest@127.0.0.1:1/%2f")
            .with_queue("orders")
            .with_publish_queue("invoices")
            .build()
            .unwrap();
        let err = rabbit.source("payments").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert!(!err.is_retryable());
        assert_eq!(err.to_string(), "not found: queue payments (not configured)");
        let chain = steward_core::error_chain(&err);
        assert!(chain.contains("RabbitMqBuilder::with_queue"), "{chain}");
        // Configured queues, consumed or published to, get as far as connecting.
        for queue in ["orders", "invoices"] {
            let err = rabbit.source(queue).await.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Connection, "{}", steward_core::error_chain(&err));
        }
    }
}
