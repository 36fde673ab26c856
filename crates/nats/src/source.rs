//! Receiving from a durable pull consumer, and settling with acks.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_nats::connection::State;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::Batch;
use async_nats::jetstream::message::{AckKind, Acker};
use async_nats::{Client, HeaderMap};
use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use steward_core::transport::{dead_letter_queue, later};
use steward_core::{Capabilities, Delivery, MessageSource, Settle, TransportError};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::error::Error;
use crate::{CAPABILITIES, Nats, message, sink, topology};

/// The part of the ack wait kept as a margin: the local lock ends this much before the
/// server's, so a settlement sent before it reaches the server in time.
const LOCK_MARGIN: Duration = Duration::from_millis(500);

/// How long before a message arrived the server may have sent it (and started its ack
/// wait), at most: transit and this process's scheduling.
const ARRIVAL_SLACK: Duration = Duration::from_millis(250);

/// How long after its `wait` a pull is given up on when the server did not end it.
const PULL_GRACE: Duration = Duration::from_secs(2);

/// A consumer of one queue: a durable pull consumer, on a connection of its own.
///
/// - `receive(max, wait)` pulls one message, waiting up to `wait` on the server, then
///   up to `max - 1` more that are there already, without waiting: it returns as soon
///   as it has something. A receive dropped while its pull is open leaves the pull to
///   the next receive, which takes what the server sent it; `stop_receiving` stops
///   intake and sends back (`-NAK`) what such a pull holds.
/// - Each delivery is locked for the consumer's `ack_wait`; renewing sends `+WPI`.
/// - When the connection drops, `receive` fails with a retryable
///   [`TransportError::Connection`]; the client reconnects underneath, and unsettled
///   deliveries come back when their `ack_wait` runs out.
/// - When the consumer was deleted, `receive` fails with [`TransportError::NotFound`];
///   reopening the source declares it again.
pub struct NatsSource {
    queue: String,
    nats: Nats,
    client: Client,
    consumer: PullConsumer,
    disconnects: Arc<AtomicU64>,
    stopped: AtomicBool,
    /// One pull at a time (concurrent pulls would only compete for the same messages),
    /// kept here while the server may still send it messages, also when the receive that
    /// asked for it was dropped.
    pulling: Mutex<Option<OpenPull>>,
    capabilities: Capabilities,
}

impl fmt::Debug for NatsSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsSource")
            .field("queue", &self.queue)
            .field("stream", &self.nats.stream_name(&self.queue))
            .field("stopped", &self.stopped.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl NatsSource {
    pub(crate) async fn open(nats: &Nats, queue: &str) -> Result<Self, Error> {
        let config = nats.config();
        let disconnects = Arc::new(AtomicU64::new(0));
        let counter = disconnects.clone();
        let client = crate::connect(config, &format!("source {queue}"), Some(counter)).await?;
        let js = nats.context(client.clone());
        topology::declare_streams(&js, config, queue).await?;
        let consumer = topology::declare_consumer(&js, config, queue).await?;
        let max_payload = client.server_info().max_payload;
        let capabilities = Capabilities {
            max_body_bytes: Some(max_payload.saturating_sub(crate::HEADER_ROOM)),
            ..CAPABILITIES
        };
        Ok(Self {
            queue: queue.to_owned(),
            nats: nats.clone(),
            client,
            consumer,
            disconnects,
            stopped: AtomicBool::new(false),
            pulling: Mutex::new(None),
            capabilities,
        })
    }

    /// Whether the connection is down (or was, since `since`).
    fn broken(&self, since: u64) -> bool {
        self.disconnects.load(Ordering::SeqCst) != since
            || self.client.connection_state() != State::Connected
    }

    async fn pull(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, Error> {
        let mut open = self.pulling.lock().await;
        let since = self.disconnects.load(Ordering::SeqCst);
        if self.broken(since) {
            *open = None;
            return Err(self.connection_lost());
        }
        let started = Instant::now();
        // The server ends the pull at `wait`; a server that does not answer (the pull
        // went nowhere) is given up on a little later. A message arriving after that
        // stays locked until its ack wait runs out, then comes again.
        let until = later(started, wait);
        let mut got = Vec::new();
        // A pull that a dropped receive left open: the server still sends it what it
        // asked for, so its messages are this receive's (or they would stay locked in a
        // pull nobody reads until their ack wait ran out).
        if let Some(left) = open.as_mut() {
            left.resumed = true;
        }
        let mut failed = self.collect(&mut open, max, until, &mut got).await;
        // First a pull for one message, waiting up to `wait` on the server; then, once
        // one came, a pull that takes only what is there already (`no_wait`). One pull
        // for `max` would hold what arrived until `max` did or `wait` ran out, each
        // message spending its lock meanwhile.
        if failed.is_none() && got.is_empty() && open.is_none() {
            let asked_at = Instant::now();
            let expires = until.saturating_duration_since(asked_at).max(Duration::from_millis(10));
            let first = self
                .consumer
                .batch()
                .max_messages(1)
                .expires(expires)
                .messages()
                .await
                .map_err(|e| self.pull_error(since, e))?;
            *open = Some(OpenPull::new(first, asked_at, later(asked_at, expires + PULL_GRACE)));
            failed = self.collect(&mut open, max, later(until, PULL_GRACE), &mut got).await;
        }
        if failed.is_none() && !got.is_empty() && got.len() < max && open.is_none() {
            let asked_at = Instant::now();
            match self.consumer.fetch().max_messages(max - got.len()).messages().await {
                Ok(rest) => {
                    let give_up = later(asked_at, PULL_GRACE);
                    *open = Some(OpenPull::new(rest, asked_at, give_up));
                    failed = self.collect(&mut open, max, give_up, &mut got).await;
                }
                Err(e) => failed = Some(e.into()),
            }
        }
        drop(open);
        if let Some(error) = failed {
            if got.is_empty() {
                return Err(self.check(since, error).await);
            }
            tracing::debug!(queue = %self.queue, error = %error, "pull ended early; returning what arrived");
        }
        if got.is_empty() {
            if self.broken(since) {
                return Err(self.connection_lost());
            }
            self.check_consumer().await?;
            // The server's expiry may come a moment before the caller's clock says so.
            tokio::time::sleep_until(until).await;
        }
        Ok(got)
    }

    /// Adds the messages of the open pull to `got` until it has `max`, the pull ends
    /// (and is closed), or `until` (the pull stays open for the next receive); the
    /// error that ended the pull, if one did.
    ///
    /// Each message's lock is counted from when the server can have sent it at the
    /// earliest: not before the pull was asked for, nor more than [`ARRIVAL_SLACK`]
    /// before it arrived (a message that came late in a long pull has its whole lock).
    /// A message of a pull a dropped receive left open may have waited unread since
    /// any time after the pull was asked for: its lock counts from then.
    ///
    /// Cancel safe: the pull stays in `open` until it ends, with what it did not hand
    /// over yet.
    async fn collect(
        &self,
        open: &mut Option<OpenPull>,
        max: usize,
        until: Instant,
        got: &mut Vec<Delivery>,
    ) -> Option<steward_core::BoxError> {
        let lock = self.nats.config().ack_wait.saturating_sub(LOCK_MARGIN);
        while got.len() < max {
            let pull = open.as_mut()?;
            match tokio::time::timeout_at(pull.give_up.min(until), pull.batch.next()).await {
                Err(_) if Instant::now() < pull.give_up => return None,
                Err(_) | Ok(None) => {
                    *open = None;
                    return None;
                }
                Ok(Some(Ok(message))) => {
                    let sent = if pull.resumed {
                        pull.asked_at
                    } else {
                        let now = Instant::now();
                        now.checked_sub(ARRIVAL_SLACK).unwrap_or(now).max(pull.asked_at)
                    };
                    got.push(self.delivery(message, later(sent, lock)));
                }
                Ok(Some(Err(e))) => {
                    *open = None;
                    return Some(e);
                }
            }
        }
        None
    }

    fn connection_lost(&self) -> Error {
        Error::Connection {
            what: format!("connection of the consumer of {} lost", self.queue),
            source: None,
        }
    }

    fn pull_error(&self, since: u64, error: impl Into<steward_core::BoxError>) -> Error {
        if self.broken(since) {
            Error::Connection {
                what: format!("pull from {}", self.queue),
                source: Some(error.into()),
            }
        } else {
            Error::jetstream(format!("pull from {}", self.queue), error)
        }
    }

    /// Classifies a failed pull: connection lost, consumer gone, or a server error.
    async fn check(&self, since: u64, error: impl Into<steward_core::BoxError>) -> Error {
        if self.broken(since) {
            return self.pull_error(since, error);
        }
        match self.check_consumer().await {
            Err(gone) => gone,
            Ok(()) => self.pull_error(since, error),
        }
    }

    /// `NotFound` when the consumer (or its stream) no longer exists.
    async fn check_consumer(&self) -> Result<(), Error> {
        let mut consumer = self.consumer.clone();
        match consumer.info().await {
            Ok(_) => Ok(()),
            Err(e) => {
                let text = e.to_string();
                let stream = self.nats.stream_name(&self.queue);
                if text.contains("consumer not found") || text.contains("stream not found") {
                    Err(Error::NotFound {
                        entity: format!("consumer {} of stream {stream}", crate::CONSUMER_NAME),
                        source: Some(e.into()),
                    })
                } else if self.client.connection_state() != State::Connected {
                    Err(Error::connection(format!("check the consumer of {}", self.queue), e))
                } else {
                    Err(Error::jetstream(format!("check the consumer of {}", self.queue), e))
                }
            }
        }
    }

    fn delivery(&self, got: async_nats::jetstream::Message, locked_until: Instant) -> Delivery {
        let info = got.info().ok();
        let delivered = info.as_ref().map_or(1, |i| u32::try_from(i.delivered).unwrap_or(u32::MAX));
        let sequence = info.as_ref().map_or(0, |i| i.stream_sequence);
        let copy_id = info.as_ref().map_or_else(
            || format!("dlq-{}", uuid::Uuid::new_v4().simple()),
            |i| format!("dlq-{}-{sequence}-{}", i.stream, i.published.unix_timestamp_nanos()),
        );
        let enqueued_at = info.map(|i| SystemTime::from(i.published));
        let (raw, acker) = got.split();
        let message = message::to_message(
            raw.headers.as_ref(),
            raw.payload.clone(),
            || format!("{}-{sequence}", self.queue),
            delivered,
            enqueued_at,
            &[],
        );
        let max_deliver = self.nats.config().max_deliver;
        if delivered >= max_deliver {
            // The updater dead-letters a message delivered more than its own, lower,
            // limit; it reaches this one only when that kept failing (or the process
            // kept dying before it settled). The server delivers it no more: unless
            // it is settled now, it stays in the stream until an operator removes it.
            tracing::warn!(
                queue = %self.queue,
                message_id = %message.id,
                sequence,
                delivery_count = delivered,
                max_deliver,
                "the server's last delivery of this message: if it is not settled now, it \
                 stays in the stream, never delivered again, until an operator removes it"
            );
        }
        let handle = NatsSettle {
            acker,
            nats: self.nats.clone(),
            queue: self.queue.clone(),
            message_id: message.id.clone(),
            copy_id,
            delivery_count: delivered,
            sequence,
            headers: raw.headers,
            body: raw.payload,
            ack_wait: self.nats.config().ack_wait,
            locked_until: std::sync::Mutex::new(locked_until),
        };
        Delivery::new(message, handle)
    }
}

#[async_trait]
impl MessageSource for NatsSource {
    fn queue(&self) -> &str {
        &self.queue
    }

    fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, TransportError> {
        if max == 0 || self.stopped.load(Ordering::SeqCst) {
            tokio::time::sleep(wait).await;
            return Ok(Vec::new());
        }
        Ok(self.pull(max, wait).await?)
    }

    async fn stop_receiving(&self) -> Result<(), TransportError> {
        self.stopped.store(true, Ordering::SeqCst);
        // A pull a dropped receive left open: what it already holds goes back now, not
        // when its lock runs out; closing it unsubscribes.
        let Some(mut left) = self.pulling.lock().await.take() else { return Ok(()) };
        while let Some(Some(Ok(message))) = left.batch.next().now_or_never() {
            if let Err(error) = message.ack_with(AckKind::Nak(None)).await {
                tracing::debug!(queue = %self.queue, error = %error, "could not send back a message of a pull left open; it comes again when its lock runs out");
            }
        }
        Ok(())
    }
}

/// A pull the server may still send messages to.
struct OpenPull {
    batch: Batch,
    /// When it was asked for: the server sent nothing for it before.
    asked_at: Instant,
    /// When it is given up on, if the server did not end it.
    give_up: Instant,
    /// Whether a receive that asked for it was dropped: its messages may have waited.
    resumed: bool,
}

impl OpenPull {
    fn new(batch: Batch, asked_at: Instant, give_up: Instant) -> Self {
        Self { batch, asked_at, give_up, resumed: false }
    }
}

/// The lock on one delivery: its ack subject, and a local copy of the lock's expiry.
struct NatsSettle {
    acker: Acker,
    nats: Nats,
    queue: String,
    message_id: String,
    /// The dead-letter copy's own `Nats-Msg-Id`: the same for every delivery of this
    /// stored message, and no other message's.
    copy_id: String,
    delivery_count: u32,
    sequence: u64,
    headers: Option<HeaderMap>,
    body: bytes::Bytes,
    ack_wait: Duration,
    locked_until: std::sync::Mutex<Instant>,
}

impl NatsSettle {
    fn deadline(&self) -> Instant {
        *self.locked_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `LockLost` once the lock ran out: the server may have given the message to
    /// another consumer, whose lock a settlement from here must not touch.
    fn check_lock(&self) -> Result<(), Error> {
        if Instant::now() >= self.deadline() {
            return Err(Error::LockExpired { message_id: self.message_id.clone() });
        }
        Ok(())
    }

    /// Sends `kind` and waits (up to the request timeout) for the server's
    /// confirmation. The server confirms every ack it receives, also for a delivery it
    /// no longer holds (whose `+WPI` then extends nothing): the confirmation proves that
    /// the server got the ack, and the local lock, checked first, that the delivery was
    /// still ours when it was sent. Without a confirmation the outcome is unknown:
    /// `LockLost` once the local lock ran out meanwhile, else a retryable `Timeout` or
    /// `Connection` error.
    async fn send(&self, kind: AckKind, what: &str) -> Result<(), Error> {
        self.check_lock()?;
        self.acker.double_ack_with(kind).await.map_err(|e| {
            let what = format!("{what} message {} of {}", self.message_id, self.queue);
            if Instant::now() >= self.deadline() {
                Error::LockExpired { message_id: self.message_id.clone() }
            } else if e
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
            {
                Error::Timeout { what, after: self.nats.config().request_timeout }
            } else {
                Error::Connection { what, source: Some(e) }
            }
        })
    }
}

#[async_trait]
impl Settle for NatsSettle {
    fn locked_until(&self) -> Option<Instant> {
        Some(self.deadline())
    }

    async fn renew_lock(&self) -> Result<Option<Instant>, TransportError> {
        let sent = Instant::now();
        self.send(AckKind::Progress, "renew the lock of").await?;
        let until = later(sent, self.ack_wait.saturating_sub(LOCK_MARGIN));
        let mut locked =
            self.locked_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *locked = (*locked).max(until);
        Ok(Some(*locked))
    }

    async fn complete(&self) -> Result<(), TransportError> {
        Ok(self.send(AckKind::Ack, "complete").await?)
    }

    async fn abandon(&self, delay: Option<Duration>) -> Result<(), TransportError> {
        Ok(self.send(AckKind::Nak(delay), "abandon").await?)
    }

    async fn dead_letter(&self, reason: &str, description: &str) -> Result<(), TransportError> {
        self.check_lock()?;
        let mut headers =
            self.headers.as_ref().map(message::without_server_controls).unwrap_or_default();
        // The dead letter keeps the id handlers saw (also when the message was
        // published without one), and is de-duplicated on an id of its own.
        message::insert(&mut headers, crate::DEAD_LETTER_MESSAGE_ID_HEADER, &self.message_id)?;
        message::insert(&mut headers, crate::MESSAGE_ID_HEADER, &self.copy_id)?;
        message::insert(&mut headers, crate::DEAD_LETTER_REASON_HEADER, &message::encode(reason))?;
        let description = message::encode(description);
        message::insert(&mut headers, crate::DEAD_LETTER_DESCRIPTION_HEADER, &description)?;
        let count = self.delivery_count.to_string();
        message::insert(&mut headers, message::DELIVERY_COUNT_HEADER, &count)?;
        let dlq = dead_letter_queue(&self.queue);
        sink::publish_with(&self.nats, &dlq, &self.copy_id, headers, self.body.clone()).await?;
        tracing::debug!(queue = %self.queue, message_id = %self.message_id, sequence = self.sequence, reason, "dead-lettered");
        Ok(self.send(AckKind::Term, "terminate").await?)
    }
}
