//! [`RabbitMqSource`]: a consumer on its own connection, and the settlement of its
//! deliveries.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, Consumer};
use steward_core::{
    Capabilities, ConsumerRole, Delivery, MessageSource, Settle, TransportError, error_chain,
};
use tokio::sync::Mutex;
use tokio::time::{Instant, timeout};
use tracing::{debug, info};

use crate::acks::Acks;
use crate::error::{Error, is_closed, is_resource_locked};
use crate::message::{
    DEAD_LETTER_DESCRIPTION_HEADER, DEAD_LETTER_REASON_HEADER, republish_properties, short,
    to_message,
};
use crate::publish::Publisher;
use crate::topology::{dead_letter_queue, delay_queue};
use crate::{CAPABILITIES, RabbitMq, connect};

/// Requeuing at least this many buffered messages at once is a burst after which
/// `stop_receiving` waits for the queue to take them back (see there).
const REQUEUE_BURST: usize = 16;

/// How long `stop_receiving` waits at most for requeued messages to be counted back
/// (other consumers may take them first, so the count need not get there).
const REQUEUE_WAIT: Duration = Duration::from_secs(2);

/// How often a consumer of a queue with a single active consumer that has not received
/// yet checks the queue for messages it does not get (see [`Role`]).
const ROLE_CHECK_EVERY: Duration = Duration::from_secs(2);

/// How long such a check may take: it runs within `receive`, after its wait.
const ROLE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// A consumer of one queue, on a connection of its own (named after the queue).
///
/// - `receive` hands out what the broker pushed ahead (up to the prefetch); messages
///   stay with this consumer until settled or until its connection closes.
/// - `stop_receiving` cancels the consumer (`basic.cancel`) and puts the messages it
///   had buffered but not handed out back on the queue (`basic.nack` with requeue);
///   after requeuing 16 or more it waits (at most 2 s) until the queue counts them
///   back, so that settlements right after it are not lost (rabbitmq-server#10327).
/// - On a queue with a single active consumer, `stop_receiving` instead keeps the
///   consumer until every delivery handed out is settled (a requeue without delay is
///   left to the close), then closes the consumer's channel: the broker puts what is
///   unacknowledged back at the head of the queue, in order, before the next consumer
///   becomes active.
/// - When the connection or channel closes, `receive` fails with a retryable
///   [`TransportError::Connection`] at once (a silent network failure is noticed by
///   the heartbeat within about two heartbeat intervals); the deliveries it handed out
///   settle with [`TransportError::LockLost`], and the broker redelivers them. The
///   source does not reconnect: the updater opens a new one.
/// - When the queue is deleted, the broker cancels the consumer and `receive` fails
///   with [`TransportError::NotFound`].
/// - Completed deliveries are acked in batches (`multiple = true` over the completed
///   prefix of the channel's delivery tags, within 1 to 5 ms, see the crate docs); a
///   delivery's `complete` returns once the ack covering it was written to the channel.
///
/// Dropping the source (and every delivery it handed out) closes its connection.
pub struct RabbitMqSource {
    shared: Arc<Shared>,
}

struct Shared {
    queue: String,
    connection: Arc<Connection>,
    channel: Channel,
    consumer_tag: ShortString,
    intake: Mutex<Intake>,
    /// The settlement frames of `channel`: coalesced acks, requeues.
    acks: Acks,
    publisher: Publisher,
    /// `stop_receiving` was called: the end of the stream is expected.
    stopped: AtomicBool,
    /// The broker confirmed the consumer's cancellation.
    cancelled: AtomicBool,
    confirm_timeout: Duration,
    /// The consumer's role, on a queue with a single active consumer.
    role: Option<Role>,
    /// On a queue with a single active consumer: the delivery tags handed out and not
    /// yet settled. Once stopped, the last one settled closes the consumer's channel
    /// (see `stop_receiving`).
    handed_out: std::sync::Mutex<HashSet<u64>>,
    /// The consumer's channel is closed (or being closed) to end a stop.
    closing: AtomicBool,
}

/// What a consumer of a queue with a single active consumer infers of its role.
///
/// RabbitMQ (3.10 and later) does not tell a consumer over AMQP 0-9-1 that it waits,
/// and a passive declare counts the active consumer only, not the waiting ones; so the
/// role is inferred from what the consumer sees:
/// - Before subscribing, a passive declare counts the queue's (active) consumers: with
///   none, the new consumer becomes the active one; with one, it waits behind it. The
///   count and the subscription are one step among the queue's sources (a
///   [`SubscribeLock`]), so two sources starting together do not both count none.
/// - A delivery makes it active, for good: a waiting consumer receives nothing, and
///   the broker never moves a live active consumer's place to another.
/// - Until its first delivery, a passive declare every [`ROLE_CHECK_EVERY`] (after an
///   empty receive) that finds messages ready twice in a row, with no delivery
///   between, shows that another consumer receives: it stands by.
///
/// The limits: a standby promoted while the queue is empty reports `standby` until its
/// first delivery (at once when a message comes); a consumer that subscribed without
/// the lock (not taken within [`SUBSCRIBE_LOCK_WAIT`], or refused by the broker) at the
/// same moment as another and found none reports `active` until two checks find
/// messages it does not get (at most about `2 × ROLE_CHECK_EVERY` + the receive wait
/// once messages wait). Messages only wait while the active consumer is behind (its
/// prefetch full): as long as it keeps up, the queue has none ready at a check, and
/// the waiting consumer keeps reporting `active` however many messages pass (without
/// the lock, two sources opened together ended up both `active` about four times in
/// ten on RabbitMQ 3.10).
struct Role {
    /// [`ROLE_ACTIVE`] or [`ROLE_STANDBY`].
    current: AtomicU8,
    /// The consumer received a delivery: it is active for good.
    received: AtomicBool,
    /// When the queue was last checked, and whether messages were ready then.
    checked: std::sync::Mutex<(Instant, bool)>,
}

const ROLE_ACTIVE: u8 = 1;
const ROLE_STANDBY: u8 = 2;

impl Role {
    /// The role of a consumer that subscribes while the queue has `consumers` active.
    fn new(consumers: u32) -> Self {
        let current = if consumers == 0 { ROLE_ACTIVE } else { ROLE_STANDBY };
        Self {
            current: AtomicU8::new(current),
            received: AtomicBool::new(false),
            checked: std::sync::Mutex::new((Instant::now(), false)),
        }
    }

    fn get(&self) -> ConsumerRole {
        if self.current.load(Ordering::Acquire) == ROLE_ACTIVE {
            ConsumerRole::Active
        } else {
            ConsumerRole::Standby
        }
    }

    /// A delivery came: the consumer is active; whether it was standing by.
    fn received(&self) -> bool {
        self.received.store(true, Ordering::Release);
        self.current.swap(ROLE_ACTIVE, Ordering::AcqRel) == ROLE_STANDBY
    }

    /// Whether a consumer without deliveries is due to check the queue again; restarts
    /// the period when it is (a failed check waits for the next period too).
    fn check_due(&self) -> bool {
        if self.received.load(Ordering::Acquire) {
            return false;
        }
        let mut checked = self.checked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        if now.saturating_duration_since(checked.0) < ROLE_CHECK_EVERY {
            return false;
        }
        checked.0 = now;
        true
    }

    /// A check found `ready` messages; whether the consumer now stands by (it did
    /// not before).
    fn checked(&self, ready: u32) -> bool {
        let mut checked = self.checked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let waited_before = std::mem::replace(&mut checked.1, ready > 0);
        if ready > 0 && waited_before && !self.received.load(Ordering::Acquire) {
            return self.current.swap(ROLE_STANDBY, Ordering::AcqRel) == ROLE_ACTIVE;
        }
        false
    }
}

struct Intake {
    consumer: Consumer,
    ended: Option<Ended>,
}

/// Why the consumer's stream ended.
enum Ended {
    /// `stop_receiving` cancelled it.
    Stopped,
    /// The channel or connection failed.
    Failed(lapin::Error),
    /// The broker cancelled the consumer (the queue was deleted, or the node went away).
    Cancelled,
}

impl fmt::Debug for RabbitMqSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitMqSource")
            .field("queue", &self.shared.queue)
            .field("consumer_tag", &self.shared.consumer_tag.as_str())
            .field("connected", &self.shared.connection.status().connected())
            .field("stopped", &self.shared.stopped.load(Ordering::Relaxed))
            .finish()
    }
}

impl RabbitMqSource {
    /// Connects, sets the prefetch and starts consuming `queue`.
    pub(crate) async fn open(rabbit: &RabbitMq, queue: &str) -> Result<Self, TransportError> {
        let config = rabbit.config();
        let queue_name = short("queue name", queue)?;
        let connection = Arc::new(connect(config, &format!("source {queue}")).await?);
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| Error::lapin(format!("open a channel to consume from {queue}"), e))?;
        channel
            .basic_qos(config.prefetch, BasicQosOptions { global: false })
            .await
            .map_err(|e| Error::lapin(format!("set the prefetch for {queue}"), e))?;
        let single_active = config.single_active.iter().any(|single| single == queue);
        // Counting the active consumers and subscribing are one step among the sources
        // of the queue, in any process: two that counted none before either subscribed
        // would both take themselves for the active one.
        let lock = if single_active {
            SubscribeLock::take(&connection, queue, config.confirm_timeout).await
        } else {
            None
        };
        let consumer_tag = format!("steward-{}", uuid::Uuid::new_v4().simple());
        let subscribed = async {
            let role = if single_active {
                let (consumers, _) =
                    queue_counts(&connection, queue, config.confirm_timeout).await?;
                Some(Role::new(consumers))
            } else {
                None
            };
            let consumer = channel
                .basic_consume(
                    queue_name,
                    consumer_tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| Error::lapin(format!("consume from queue {queue}"), e))?;
            Ok::<_, Error>((role, consumer))
        }
        .await;
        if let Some(lock) = lock {
            lock.release(config.confirm_timeout).await;
        }
        let (role, consumer) = subscribed?;
        if let Some(role) = &role {
            info!(queue, role = %role.get(), "consuming a queue with a single active consumer");
        }
        if !config.queues.iter().any(|consumed| consumed == queue) {
            // Configured for publishing only: it has no delay buckets yet. Declared once
            // the consumer started, so a deleted queue is reported, not half recreated.
            crate::topology::declare_delay_buckets(&connection, config, queue).await?;
        }
        debug!(queue, consumer_tag, prefetch = config.prefetch, "rabbitmq consumer started");
        let publisher = Publisher::new(connection.clone(), config.confirm_timeout);
        let acks = Acks::new(channel.clone(), config.prefetch);
        Ok(Self {
            shared: Arc::new(Shared {
                queue: queue.to_owned(),
                connection,
                channel,
                consumer_tag: consumer_tag.into(),
                intake: Mutex::new(Intake { consumer, ended: None }),
                acks,
                publisher,
                stopped: AtomicBool::new(false),
                cancelled: AtomicBool::new(false),
                confirm_timeout: config.confirm_timeout,
                role,
                handed_out: std::sync::Mutex::new(HashSet::new()),
                closing: AtomicBool::new(false),
            }),
        })
    }

    /// A consumer without deliveries checks the queue, at most every
    /// [`ROLE_CHECK_EVERY`] (see [`Role`]). A failed check changes nothing: the next
    /// receive tells of a broken connection.
    async fn check_role(&self) {
        let Some(role) = &self.shared.role else { return };
        if !role.check_due() {
            return;
        }
        let shared = &self.shared;
        let within = shared.confirm_timeout.min(ROLE_CHECK_TIMEOUT);
        match queue_counts(&shared.connection, &shared.queue, within).await {
            Ok((_, ready)) => {
                if role.checked(ready) {
                    info!(
                        queue = %shared.queue,
                        ready,
                        "messages wait but none come: another consumer is the active one, this one stands by"
                    );
                }
            }
            Err(error) => {
                let error = error_chain(&error);
                debug!(queue = %shared.queue, error, "cannot check the queue");
            }
        }
    }

    /// The consumer is active: logs the change once.
    fn activated(&self) {
        if self.shared.role.as_ref().is_some_and(Role::received) {
            info!(queue = %self.shared.queue, "this consumer is now the single active consumer");
        }
    }

    fn delivery(&self, delivery: lapin::message::Delivery) -> Delivery {
        let body = Bytes::from(delivery.data);
        let message = to_message(&delivery.properties, body.clone());
        self.shared.acks.track(delivery.delivery_tag);
        if self.shared.role.is_some() {
            self.shared.handed_out().insert(delivery.delivery_tag);
        }
        let settle = RabbitMqSettle {
            shared: self.shared.clone(),
            tag: delivery.delivery_tag,
            acker: delivery.acker,
            properties: delivery.properties,
            body,
            message_id: message.id.clone(),
            delivery_count: message.delivery_count,
        };
        Delivery::new(message, settle)
    }

    /// The error `receive` returns once the stream ended for `ended`.
    async fn ended_error(&self, ended: &Ended) -> TransportError {
        let queue = &self.shared.queue;
        match ended {
            Ended::Failed(error) => {
                Error::consumer_ended(format!("receive from queue {queue}"), error.clone()).into()
            }
            Ended::Cancelled | Ended::Stopped => match self.check_queue().await {
                Err(error) => error,
                Ok(()) => Error::ConsumerCancelled { queue: queue.clone() }.into(),
            },
        }
    }

    /// Whether the queue still exists (a passive declare on a throw-away channel).
    async fn check_queue(&self) -> Result<(), TransportError> {
        let channel = self.shared.throwaway_channel("check").await?;
        let result = self.shared.ready_messages(&channel).await.map(drop);
        if channel.status().connected() {
            let _ = channel.close(200, "checked".into()).await;
        }
        result
    }
}

impl Shared {
    fn handed_out(&self) -> std::sync::MutexGuard<'_, HashSet<u64>> {
        self.handed_out.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a requeue of a delivery handed out is left to the closing of the
    /// channel: the consumer of a queue with a single active consumer stopped receiving.
    fn requeues_on_close(&self) -> bool {
        self.role.is_some() && self.stopped.load(Ordering::Acquire)
    }

    /// The delivery `tag` handed out is settled (or left to the close); whether it was
    /// the last one of a consumer that stopped receiving, whose channel is now to close.
    fn handed_back(&self, tag: u64) -> bool {
        if self.role.is_none() {
            return false;
        }
        let mut handed_out = self.handed_out();
        handed_out.remove(&tag);
        handed_out.is_empty()
            && self.stopped.load(Ordering::Acquire)
            && !self.closing.load(Ordering::Acquire)
    }

    /// Ends the stop of a consumer of a queue with a single active consumer once no
    /// delivery it handed out is unsettled: acks what completed, then closes the
    /// consumer's channel, so the broker puts every message still unacknowledged (those
    /// left to the close, and those buffered) back at the head of the queue, in order,
    /// before it makes the next consumer active. Closes once; errors are logged only
    /// (a channel already gone gave the messages back too).
    async fn close_consumer(&self) {
        if self.closing.swap(true, Ordering::AcqRel) {
            return;
        }
        self.acks.flush().await;
        let queue = &self.queue;
        if !self.channel.status().connected() {
            debug!(queue = %queue, "consumer already gone with its channel");
            return;
        }
        let closed = self.channel.close(200, "stopped receiving".into());
        match timeout(self.confirm_timeout, closed).await {
            Ok(Ok(())) => debug!(queue = %queue, "rabbitmq consumer stopped, its channel closed"),
            Ok(Err(error)) => {
                let error = error_chain(&error);
                debug!(queue = %queue, error, "closing the consumer's channel failed");
            }
            Err(_) => debug!(queue = %queue, "closing the consumer's channel timed out"),
        }
    }

    /// A channel of the source's connection for a passive declare (a refused one
    /// closes its channel, so never the consumer's).
    async fn throwaway_channel(&self, what: &str) -> Result<Channel, TransportError> {
        let queue = &self.queue;
        Ok(self
            .connection
            .create_channel()
            .await
            .map_err(|e| Error::lapin(format!("open a channel to {what} queue {queue}"), e))?)
    }

    /// The messages ready in the queue (a passive declare on `channel`).
    async fn ready_messages(&self, channel: &Channel) -> Result<u32, TransportError> {
        let queue = &self.queue;
        let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let declared =
            channel.queue_declare(short("queue name", queue)?, options, FieldTable::default());
        Ok(timeout(self.confirm_timeout, declared)
            .await
            .map_err(|_| Error::Timeout {
                what: format!("checking queue {queue}"),
                after: self.confirm_timeout,
            })?
            .map(|declared| declared.message_count())
            .map_err(|e| Error::lapin(format!("check queue {queue}"), e))?)
    }

    /// The ready messages now, when `released` requeues are a burst (see
    /// [`REQUEUE_BURST`]); `None` otherwise or when the count cannot be read.
    async fn ready_before_burst(&self, released: usize) -> Option<(Channel, u32)> {
        if released < REQUEUE_BURST {
            return None;
        }
        let channel = self.throwaway_channel("count").await.ok()?;
        match self.ready_messages(&channel).await {
            Ok(ready) => Some((channel, ready)),
            Err(error) => {
                let error = error_chain(&error);
                debug!(queue = %self.queue, error, "cannot count ready messages");
                None
            }
        }
    }

    /// Waits, at most [`REQUEUE_WAIT`], until the queue holds `target` ready messages:
    /// the requeued ones are back (or other consumers took them meanwhile).
    async fn wait_until_ready(&self, channel: &Channel, target: u64) {
        let deadline = Instant::now() + REQUEUE_WAIT;
        loop {
            match self.ready_messages(channel).await {
                Ok(ready) if u64::from(ready) >= target => break,
                Ok(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok(ready) => {
                    debug!(queue = %self.queue, ready, target, "requeued messages not all counted back");
                    break;
                }
                Err(error) => {
                    let error = error_chain(&error);
                    debug!(queue = %self.queue, error, "cannot count ready messages");
                    break;
                }
            }
        }
        if channel.status().connected() {
            let _ = channel.close(200, "counted".into()).await;
        }
    }
}

#[async_trait]
impl MessageSource for RabbitMqSource {
    fn queue(&self) -> &str {
        &self.shared.queue
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    /// Up to `max` of the messages the broker pushed to this consumer, waiting at most
    /// `wait` for the first.
    ///
    /// # Errors
    ///
    /// [`TransportError::Connection`] once the channel or connection closed (retryable:
    /// open a new source); [`TransportError::NotFound`] once the queue was deleted.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: messages are taken from the consumer's buffer only after the last
    /// await point, so a cancelled call leaves them there for the next.
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, TransportError> {
        let deadline = Instant::now() + wait;
        let mut intake = self.shared.intake.lock().await;
        if max == 0 {
            return Ok(Vec::new());
        }
        if let Some(ended) = &intake.ended {
            if matches!(ended, Ended::Stopped) && self.shared.stopped.load(Ordering::Acquire) {
                // Stopped on purpose: nothing more comes. Wait like an empty queue would,
                // so a caller that keeps polling does not spin.
                drop(intake);
                tokio::time::sleep_until(deadline).await;
                return Ok(Vec::new());
            }
            return Err(self.ended_error(ended).await);
        }
        let Ok(first) = tokio::time::timeout_at(deadline, intake.consumer.next()).await else {
            drop(intake);
            self.check_role().await;
            return Ok(Vec::new());
        };
        // No await from here on: whatever is taken from the buffer is returned.
        let mut deliveries = Vec::new();
        let mut next = Some(first);
        while let Some(item) = next {
            match item {
                // The channel died after the broker pushed this one: the broker has
                // requeued it already, and settling it could only fail.
                Some(Ok(delivery)) if delivery.acker.poisoned() => {
                    self.shared.acks.skip(delivery.delivery_tag);
                }
                Some(Ok(delivery)) => deliveries.push(self.delivery(delivery)),
                Some(Err(error)) => {
                    intake.ended = Some(Ended::Failed(error));
                    break;
                }
                None => {
                    let stopped = self.shared.stopped.load(Ordering::Acquire);
                    intake.ended = Some(if stopped { Ended::Stopped } else { Ended::Cancelled });
                    break;
                }
            }
            if deliveries.len() >= max {
                break;
            }
            next = intake.consumer.next().now_or_never();
        }
        if deliveries.is_empty() {
            if let Some(ended) = &intake.ended {
                if matches!(ended, Ended::Stopped) {
                    return Ok(Vec::new());
                }
                debug!(queue = %self.shared.queue, "rabbitmq consumer ended");
                return Err(self.ended_error(ended).await);
            }
        }
        if !deliveries.is_empty() {
            self.activated();
        }
        Ok(deliveries)
    }

    /// Cancels the consumer (`basic.cancel`) and requeues what it had buffered; after
    /// requeuing 16 or more, waits (at most 2 s) until the queue counts them back.
    /// On a queue with a single active consumer, hands out nothing more and closes the
    /// consumer's channel once every delivery handed out is settled (see the type's
    /// docs).
    ///
    /// # Errors
    ///
    /// Errors cancelling the consumer other than a closed channel (which already gave
    /// every unacknowledged message back to the queue).
    ///
    /// # Cancellation safety
    ///
    /// Not cancel safe: a cancelled call may leave buffered messages with this
    /// consumer until its connection closes.
    /// `Some` on a queue with a single active consumer: see [`with_single_active_consumer`]
    /// for how the role is inferred, and its limits.
    ///
    /// [`with_single_active_consumer`]: crate::RabbitMqBuilder::with_single_active_consumer
    fn role(&self) -> Option<ConsumerRole> {
        self.shared.role.as_ref().map(Role::get)
    }

    async fn stop_receiving(&self) -> Result<(), TransportError> {
        let shared = &self.shared;
        shared.stopped.store(true, Ordering::Release);
        if shared.role.is_some() {
            return self.stop_single_active().await;
        }
        // Completed deliveries are acked now, not only once their wait is up.
        shared.acks.flush().await;
        if shared.cancelled.load(Ordering::Acquire) {
            return Ok(());
        }
        let queue = &shared.queue;
        let cancel =
            shared.channel.basic_cancel(shared.consumer_tag.clone(), BasicCancelOptions::default());
        match timeout(shared.confirm_timeout, cancel).await {
            Err(_) => {
                return Err(Error::Timeout {
                    what: format!("cancelling the consumer of queue {queue}"),
                    after: shared.confirm_timeout,
                }
                .into());
            }
            Ok(Err(error)) if is_closed(&error) || !shared.channel.status().connected() => {
                debug!(queue = %queue, "consumer already gone with its channel");
                return Ok(());
            }
            Ok(Err(error)) => {
                return Err(
                    Error::lapin(format!("cancel the consumer of queue {queue}"), error).into()
                );
            }
            Ok(Ok(())) => shared.cancelled.store(true, Ordering::Release),
        }
        // The broker sent every delivery before its cancel-ok, so the buffer now ends
        // with the end of the stream.
        let mut intake = shared.intake.lock().await;
        let mut buffered = Vec::new();
        while intake.ended.is_none() {
            match intake.consumer.next().now_or_never() {
                Some(Some(Ok(delivery))) => {
                    shared.acks.track(delivery.delivery_tag);
                    buffered.push(delivery.delivery_tag);
                }
                Some(Some(Err(error))) => intake.ended = Some(Ended::Failed(error)),
                Some(None) | None => intake.ended = Some(Ended::Stopped),
            }
        }
        drop(intake);
        let released = buffered.len();
        let before = shared.ready_before_burst(released).await;
        // Acks every completed delivery first, then requeues the buffered ones.
        for result in shared.acks.requeue(&buffered).await {
            if let Err(error) = result {
                // The channel closed: the broker requeues everything it had sent anyway.
                let error = error_chain(&error);
                debug!(queue = %queue, error, "requeue of a buffered message failed");
            }
        }
        // A quorum queue's channel holds back settlements while more than 32 of its
        // commands are not yet applied, and drops them when the channel closes first
        // (rabbitmq-server#10327). Requeuing a full buffer is such a burst: were the
        // running handlers to settle now and the connection close right after (a
        // graceful shutdown), their acks would be lost and the messages redelivered.
        // So wait until the queue has the requeued messages back.
        if let Some((channel, ready)) = before {
            let target = u64::from(ready) + u64::try_from(released).unwrap_or(u64::MAX);
            shared.wait_until_ready(&channel, target).await;
        }
        debug!(queue = %queue, released, "rabbitmq consumer stopped");
        Ok(())
    }
}

impl RabbitMqSource {
    /// `stop_receiving` on a queue with a single active consumer: hands out nothing
    /// more, but keeps the consumer (a `basic.cancel` would make the broker activate the
    /// next consumer at once, which would then receive later messages while this one
    /// still handles earlier ones). The channel closes once every delivery handed out is
    /// settled: at once when none is, else when the last one is (see
    /// [`Shared::close_consumer`]). Until then a requeue of a delivery handed out
    /// (`abandon` without delay) is left to that close, since a `basic.nack` would have
    /// the broker deliver it straight back to this consumer.
    async fn stop_single_active(&self) -> Result<(), TransportError> {
        let shared = &self.shared;
        {
            // Taken after `stopped` is set: no receive hands out anything from here on.
            let mut intake = shared.intake.lock().await;
            if intake.ended.is_none() {
                intake.ended = Some(Ended::Stopped);
            }
        }
        let idle = shared.handed_out().is_empty();
        if idle {
            shared.close_consumer().await;
        } else {
            let in_flight = shared.handed_out().len();
            debug!(queue = %shared.queue, in_flight, "rabbitmq consumer stops once its deliveries are settled");
        }
        Ok(())
    }
}

/// How long a source waits at most for another source of the same queue to finish
/// subscribing (see [`SubscribeLock`]); past it, it subscribes anyway.
const SUBSCRIBE_LOCK_WAIT: Duration = Duration::from_secs(5);

/// How often a source retries taking a [`SubscribeLock`] another one holds.
const SUBSCRIBE_LOCK_RETRY: Duration = Duration::from_millis(10);

/// An exclusive queue `<queue>.subscribing`, held while a source of
/// a queue with a single active consumer counts its active consumers and subscribes:
/// the broker lets one connection at a time declare it (the others get
/// `RESOURCE_LOCKED`), and deletes it with that connection, so a process that dies
/// holding it frees it. Without it, two sources subscribing at the same moment would
/// both count none and both report `active` for as long as the active one keeps up.
/// Best effort: a lock that cannot be taken within [`SUBSCRIBE_LOCK_WAIT`] (or a broker
/// that refuses the queue) only costs the role's precision, never the start.
struct SubscribeLock {
    channel: Channel,
    name: String,
}

impl SubscribeLock {
    async fn take(connection: &Connection, queue: &str, within: Duration) -> Option<Self> {
        let name = format!("{queue}.subscribing");
        let short_name = short("queue name", &name).ok()?;
        let deadline = Instant::now() + within.min(SUBSCRIBE_LOCK_WAIT);
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), lapin::types::AMQPValue::LongString("classic".into()));
        loop {
            let channel = match connection.create_channel().await {
                Ok(channel) => channel,
                Err(error) => {
                    debug!(queue, error = %error_chain(&error), "cannot open a channel to lock subscribing");
                    return None;
                }
            };
            let options = QueueDeclareOptions { exclusive: true, ..QueueDeclareOptions::default() };
            let declared = channel.queue_declare(short_name.clone(), options, args.clone());
            match tokio::time::timeout_at(deadline, declared).await {
                Ok(Ok(_)) => return Some(Self { channel, name }),
                Ok(Err(error)) if is_resource_locked(&error) && Instant::now() < deadline => {
                    // Another source subscribes now; the refusal closed this channel.
                    tokio::time::sleep(SUBSCRIBE_LOCK_RETRY).await;
                }
                Ok(Err(error)) => {
                    debug!(queue, error = %error_chain(&error), "subscribing without the lock");
                    close_quietly(&channel, "not locked").await;
                    return None;
                }
                Err(_) => {
                    // The broker is slow to answer: should the declare still succeed,
                    // the delete behind it on the channel frees the lock again.
                    debug!(queue, "subscribing without the lock: declaring it timed out");
                    Self { channel, name }.release(within.min(SUBSCRIBE_LOCK_WAIT)).await;
                    return None;
                }
            }
        }
    }

    /// Deletes the lock queue (were that to fail, it goes with the connection).
    async fn release(self, within: Duration) {
        let deleted = self
            .channel
            .queue_delete(self.name.as_str().into(), lapin::options::QueueDeleteOptions::default());
        match timeout(within, deleted).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                debug!(queue = %self.name, error = %error_chain(&error), "cannot delete the subscribe lock");
            }
            Err(_) => debug!(queue = %self.name, "deleting the subscribe lock timed out"),
        }
        close_quietly(&self.channel, "subscribed").await;
    }
}

/// Closes `channel` if it is still open, ignoring the outcome.
async fn close_quietly(channel: &Channel, why: &str) {
    if channel.status().connected() {
        let _ = channel.close(200, why.into()).await;
    }
}

/// The active consumers of `queue` (a waiting one is not counted) and its ready
/// messages: a passive declare on a channel of its own (a refused one closes its
/// channel).
async fn queue_counts(
    connection: &Connection,
    queue: &str,
    within: Duration,
) -> Result<(u32, u32), Error> {
    let channel = connection.create_channel().await.map_err(|e| {
        Error::lapin(format!("open a channel to count the consumers of {queue}"), e)
    })?;
    let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let declared = channel.queue_declare(queue.into(), options, FieldTable::default());
    let result = match timeout(within, declared).await {
        Err(_) => Err(Error::Timeout {
            what: format!("counting the consumers of {queue}"),
            after: within,
        }),
        Ok(Err(error)) => Err(Error::lapin(format!("count the consumers of {queue}"), error)),
        Ok(Ok(declared)) => Ok((declared.consumer_count(), declared.message_count())),
    };
    if channel.status().connected() {
        let _ = channel.close(200, "counted".into()).await;
    }
    result
}

/// The settlement handle of one delivery: its channel's acker (which tells whether the
/// channel is gone) and delivery tag, plus what it takes to republish the message to a
/// delay bucket or the dead-letter queue.
struct RabbitMqSettle {
    shared: Arc<Shared>,
    tag: u64,
    acker: lapin::Acker,
    properties: BasicProperties,
    body: Bytes,
    message_id: String,
    delivery_count: u32,
}

impl RabbitMqSettle {
    fn gone(&self) -> Error {
        Error::ChannelGone { message_id: self.message_id.clone() }
    }

    /// Maps the result of writing an ack or nack: errors of a closed or closing channel
    /// mean the lock is lost.
    fn settled(&self, what: &str, result: Result<(), lapin::Error>) -> Result<(), Error> {
        match result {
            Ok(()) => Ok(()),
            Err(_) if self.acker.poisoned() => Err(self.gone()),
            Err(error) if is_closed(&error) => Err(self.gone()),
            Err(error) => Err(Error::lapin(format!("{what} message {}", self.message_id), error)),
        }
    }

    /// Acks the delivery, coalesced with other completions of its channel; returns once
    /// the ack covering it was written to the channel.
    async fn ack(&self) -> Result<(), Error> {
        if !self.acker.usable() {
            return Err(self.gone());
        }
        let result = self.shared.acks.complete(self.tag).await;
        self.settled("ack", result)
    }

    async fn requeue(&self) -> Result<(), Error> {
        if !self.acker.usable() {
            return Err(self.gone());
        }
        if self.shared.requeues_on_close() {
            // Back at the head of the queue when the channel closes (see
            // `stop_receiving`), which a nack would not be.
            return Ok(());
        }
        match self.shared.acks.requeue(&[self.tag]).await.pop() {
            Some(result) => self.settled("requeue", result),
            None => Err(self.gone()),
        }
    }

    /// Publishes a copy to `target`, waits for its confirm, then acks the original.
    /// If the copy cannot be published, the original goes back to the queue, so it is
    /// not stuck with this consumer, and the publish error is returned.
    async fn republish_then_ack(&self, target: &str, extra: &[(&str, &str)]) -> Result<(), Error> {
        if !self.acker.usable() {
            return Err(self.gone());
        }
        let published = match republish_properties(
            &self.properties,
            &self.message_id,
            self.delivery_count,
            extra,
        ) {
            Ok(properties) => self.shared.publisher.publish(target, &self.body, properties).await,
            Err(error) => Err(error),
        };
        match published {
            Ok(()) => self.ack().await,
            Err(_) if self.acker.poisoned() => Err(self.gone()),
            Err(error) => {
                if let Err(requeue) = self.requeue().await {
                    debug!(
                        queue = %self.shared.queue,
                        message_id = %self.message_id,
                        error = %error_chain(&requeue),
                        "requeue after a failed republish failed"
                    );
                }
                Err(error)
            }
        }
    }
}

impl RabbitMqSettle {
    /// The delivery is settled: the last one of a stopped consumer of a queue with a
    /// single active consumer closes its channel (see `stop_receiving`).
    async fn handed_back(&self) {
        if self.shared.handed_back(self.tag) {
            self.shared.close_consumer().await;
        }
    }
}

impl Drop for RabbitMqSettle {
    /// A delivery dropped unsettled no longer holds back the close of a stopped
    /// consumer's channel (the broker requeues it with the others).
    fn drop(&mut self) {
        if self.shared.handed_back(self.tag) {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let shared = self.shared.clone();
                runtime.spawn(async move { shared.close_consumer().await });
            }
        }
    }
}

#[async_trait]
impl Settle for RabbitMqSettle {
    fn locked_until(&self) -> Option<Instant> {
        None
    }

    async fn renew_lock(&self) -> Result<Option<Instant>, TransportError> {
        // A delivery stays with its consumer until settled or disconnected: no timed
        // lock to renew. A lost channel shows when settling.
        Ok(None)
    }

    async fn complete(&self) -> Result<(), TransportError> {
        let result = self.ack().await;
        self.handed_back().await;
        Ok(result?)
    }

    async fn abandon(&self, delay: Option<Duration>) -> Result<(), TransportError> {
        let result = match delay.filter(|delay| !delay.is_zero()) {
            None => self.requeue().await,
            Some(delay) => {
                let bucket = delay_queue(&self.shared.queue, delay);
                self.republish_then_ack(&bucket, &[]).await
            }
        };
        self.handed_back().await;
        Ok(result?)
    }

    async fn dead_letter(&self, reason: &str, description: &str) -> Result<(), TransportError> {
        let dlq = dead_letter_queue(&self.shared.queue);
        let headers =
            [(DEAD_LETTER_REASON_HEADER, reason), (DEAD_LETTER_DESCRIPTION_HEADER, description)];
        let result = self.republish_then_ack(&dlq, &headers).await;
        self.handed_back().await;
        Ok(result?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn role_starts_from_the_active_consumers_and_follows_what_the_consumer_sees() {
        // Another consumer was active: it waits, and a delivery promotes it for good.
        let waiting = Role::new(1);
        assert_eq!(waiting.get(), ConsumerRole::Standby);
        assert!(!waiting.check_due(), "not before the check period");
        tokio::time::advance(ROLE_CHECK_EVERY).await;
        assert!(waiting.check_due());
        assert!(!waiting.checked(3), "already standing by");
        assert!(waiting.received(), "promoted");
        assert_eq!(waiting.get(), ConsumerRole::Active);
        tokio::time::advance(ROLE_CHECK_EVERY).await;
        assert!(!waiting.check_due(), "a consumer that received checks no more");
        assert!(!waiting.checked(5) && !waiting.checked(5));
        assert_eq!(waiting.get(), ConsumerRole::Active);

        // Nobody was active, but another consumer won the race: messages wait at two
        // checks in a row and none come, so it stands by.
        let raced = Role::new(0);
        assert_eq!(raced.get(), ConsumerRole::Active);
        assert!(!raced.checked(0));
        assert!(!raced.checked(4), "one check with messages ready is not enough");
        assert!(!raced.checked(0), "the messages went: an empty queue says nothing");
        assert!(!raced.checked(2));
        assert_eq!(raced.get(), ConsumerRole::Active);
        assert!(raced.checked(2), "ready twice in a row, nothing received");
        assert_eq!(raced.get(), ConsumerRole::Standby);
        assert!(raced.received());
        assert_eq!(raced.get(), ConsumerRole::Active);
    }
}
