//! RabbitMQ transport for steward, on [lapin](https://docs.rs/lapin).
//!
//! [`RabbitMqBuilder`] configures it (`from_env`, `with_*`, `build`); the resulting
//! [`RabbitMq`] opens [`RabbitMqSource`]s (one connection each, one per worker start)
//! and a [`RabbitMqSink`], which implement steward's `MessageSource` and
//! `MessageSink`.
//!
//! # Examples
//!
//! ```no_run
//! use std::time::Duration;
//! use steward_core::{MessageSink, MessageSource, OutgoingMessage, TransportError};
//! use steward_rabbitmq::RabbitMqBuilder;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let rabbit = RabbitMqBuilder::from_env() // STEWARD_RABBITMQ_URL, STEWARD_MAX_DELIVERIES
//!     .with_queue("deploymentstatus")
//!     .with_publish_queue("workspacequeue")
//!     .build()?;
//! // Once at start: a queue that exists with other arguments fails here, by name.
//! rabbit.declare_topology().await?;
//!
//! let sink = rabbit.sink();
//! sink.send("deploymentstatus", OutgoingMessage::json(r#"{"id":"1"}"#)).await?;
//!
//! let source = rabbit.source("deploymentstatus").await?;
//! for delivery in source.receive(10, Duration::from_secs(5)).await? {
//!     delivery.complete().await?;
//! }
//! source.stop_receiving().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Under a steward `Updater`, each (re)start opens a new source:
//! `Updater::new("deployment-status", move || { let rabbit = rabbit.clone(); async move
//! { rabbit.source("deploymentstatus").await } }, handler)`.
//!
//! # The publisher contract
//!
//! Anything that publishes to a queue steward consumes (a TRE resource processor, a
//! script) follows these rules:
//!
//! - publish to the **default exchange** (`""`) with **routing key = the queue name**;
//! - **persistent** (`delivery_mode = 2`), ideally with publisher confirms and
//!   `mandatory`, so a missing queue is an error instead of a lost message;
//! - the body is **JSON** (UTF-8), `content_type = application/json`;
//! - set **`message_id`** (consumers de-duplicate on it; without one the transport
//!   assigns a random id on each delivery);
//! - optional **`correlation_id`** (property);
//! - optional header **`x-session-id`** (long string): the ordering key; messages with
//!   the same value are handled one after another, in order, within one steward process;
//! - other headers with scalar values arrive as string properties; table and array
//!   headers are not passed to handlers.
//!
//! Do not set `x-steward-delivery-count`: the transport uses it to count deliveries
//! through delays.
//!
//! # Topology
//!
//! Needs RabbitMQ 3.10 or later (quorum queues with message TTLs, at-least-once
//! dead-lettering). Declared idempotently by [`RabbitMq::declare_topology`], or by the first source or
//! sink of a [`RabbitMq`]:
//!
//! | queue | arguments |
//! |---|---|
//! | `<queue>` (each [`with_queue`](RabbitMqBuilder::with_queue) and [`with_publish_queue`](RabbitMqBuilder::with_publish_queue)) | quorum, `x-delivery-limit` (default 2 × `STEWARD_MAX_DELIVERIES`), dead-letters to `<queue>.dlq` at least once |
//! | `<queue>.dlq` | quorum; dead letters wait here for an operator |
//! | `<queue>.delay.<ms>`, for 1 s, 5 s, 30 s, 2 min, 10 min (consumed queues; a publish queue's once a source of it opens) | quorum, `x-message-ttl` = the bucket, dead-letters back to `<queue>` at least once |
//!
//! A queue that already exists with other arguments (a classic queue of the same name,
//! another delivery limit) stops the start with a [`TransportError::Protocol`] naming
//! the queue and the argument ("inequivalent arg"). Delays use a queue per bucket with
//! a queue-wide TTL because per-message TTLs expire only at the head of a queue: a 10
//! minute message would hold back a 1 second one behind it.
//!
//! # Settlement
//!
//! - complete: `basic.ack`;
//! - abandon: `basic.nack` with requeue;
//! - abandon with a delay: a copy goes to the delay bucket (the delay rounded up to a
//!   bucket, at most 10 min), and once the broker confirmed it, the original is acked;
//! - dead-letter: a copy with the original properties and headers plus
//!   `x-steward-dead-letter-reason` and `x-steward-dead-letter-description` goes to
//!   `<queue>.dlq`, confirmed, then the original is acked;
//! - both copies drop the per-message TTL (`expiration`), so a dead letter does not
//!   expire and a delay copy does not come back before its bucket's time.
//!
//! Every publish is `mandatory` and waits for its publisher confirm; lapin reports a
//! message returned as unroutable as `Ack(Some(returned))`, which is a
//! [`TransportError::NotFound`], never a success. lapin does not tie a returned message
//! to its publish (it hands it to whichever confirm it resolves next), so each channel has
//! at most one publish waiting for its confirm: a connection publishes on up to 8 confirm
//! channels at once, and a channel whose confirm timed out (or whose publish was
//! cancelled) is closed, never reused. If the copy cannot be published, the
//! original is requeued and the error returned. If the ack after a confirmed copy fails
//! (the connection dropped in between), both the copy and the original exist: delivery
//! is at least once.
//!
//! A delivery's `delivery_count` is the transport's own header `x-steward-delivery-count`
//! (the deliveries before the copy was made) + the broker's count of earlier deliveries
//! of this copy (`x-acquired-count` on RabbitMQ 4.1+, else `x-delivery-count`; absent on
//! a first delivery) + 1. It grows through requeues, delays and consumers that crash or
//! lose their connection.
//!
//! # Faults
//!
//! - A closed connection or channel fails `receive` at once with a retryable
//!   [`TransportError::Connection`] (a network that goes silent is noticed by the
//!   heartbeat, 5 s by default, within about two intervals); the deliveries of that
//!   channel settle with [`TransportError::LockLost`], and the broker redelivers them.
//!   The source does not reconnect itself: the updater opens a new one after the
//!   supervisor's backoff.
//! - Wrong credentials are [`TransportError::Auth`] (not retryable: they count toward
//!   the supervisor's restart limit).
//! - A deleted queue is [`TransportError::NotFound`], whether consuming, publishing or
//!   while a consumer runs (the broker cancels it). The topology is declared once per
//!   [`RabbitMq`], so a queue deleted while the service runs is not silently recreated
//!   empty by a reconnecting worker.
//! - Publishes and cancels wait at most the confirm timeout (30 s), connects at most the
//!   connect timeout (10 s): nothing hangs.
//! - RabbitMQ's `consumer_timeout` (30 min by default) closes the channel of a delivery
//!   held longer than that without an ack (`406 PRECONDITION_FAILED`): like any closed
//!   consumer channel, `receive` fails with a retryable [`TransportError::Connection`]
//!   (only a refusal, `Auth`, or a missing queue, `NotFound`, is not), and a handler that
//!   runs longer loses its delivery (`LockLost`); the message is redelivered. Raise
//!   `consumer_timeout` on the broker for longer handlers.
//!
//! # Capabilities and conformance
//!
//! [`RabbitMq::capabilities`]: `delayed_abandon` (delay buckets), `delivery_count`,
//! `binary_body`; the body size limit is the broker's `max_message_size` (128 MiB on
//! RabbitMQ 3.x, 16 MiB on 4.x), not known to the client. Not claimed, so the
//! conformance suite skips the cases that need them:
//!
//! - `sessions`: RabbitMQ has no broker-side sessions; the updater orders messages with
//!   the same `x-session-id` within one process
//!   (`sessions_deliver_in_order_one_lock_per_session`).
//! - `lock_renewal`: AMQP 0-9-1 has no timed locks; a delivery stays with its consumer
//!   until it is settled or the channel closes, so there is no lock to expire or renew
//!   (`lock_expiry_redelivers`, `renew_lock_keeps_message_invisible`,
//!   `settle_after_lock_loss_returns_lock_lost`,
//!   `stale_delivery_returns_lock_lost_and_spares_new_holder`). The lost-lock contract
//!   still holds where it applies: deliveries of a closed channel settle with
//!   `LockLost`.
//! - `native_dead_letter`: `<queue>.dlq` with the reason headers is this transport's own
//!   dead-letter queue, not a broker feature (RabbitMQ's dead-lettering carries no
//!   reason text). The conformance case for dead-lettering runs all the same.

mod builder;
mod error;
mod message;
mod publish;
mod sink;
mod source;
mod topology;

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use lapin::options::{BasicGetOptions, BasicNackOptions};
use lapin::{Connection, ConnectionProperties};
use steward_core::transport::MAX_DELIVERY_COUNT_EXCEEDED;
use steward_core::{Capabilities, DeadLetter, TransportError};
use tokio::sync::OnceCell;
use tokio::time::timeout;

pub use builder::{
    ConfigError, DEFAULT_CONFIRM_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_CONNECTION_NAME,
    DEFAULT_HEARTBEAT, DEFAULT_MAX_DELIVERIES, DEFAULT_URL, MIN_DEFAULT_PREFETCH,
    PREFETCH_PER_HANDLER, RabbitMqBuilder,
};
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
#[derive(Clone)]
pub struct RabbitMq {
    config: Arc<Config>,
    topology: Arc<OnceCell<()>>,
}

impl fmt::Debug for RabbitMq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitMq")
            .field("config", &self.config)
            .field("topology_declared", &self.topology.initialized())
            .finish()
    }
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
    /// tests and tools.
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
            let properties = &delivery.properties;
            let reason = message::header_string(properties, DEAD_LETTER_REASON_HEADER)
                .or_else(|| {
                    message::broker_death_reason(properties).map(|reason| {
                        if reason == "delivery_limit" {
                            MAX_DELIVERY_COUNT_EXCEEDED.to_owned()
                        } else {
                            reason
                        }
                    })
                })
                .unwrap_or_default();
            let description = message::header_string(properties, DEAD_LETTER_DESCRIPTION_HEADER)
                .unwrap_or_default();
            let message = message::to_message(properties, Bytes::from(delivery.data));
            read.push(DeadLetter { message, reason, description });
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
