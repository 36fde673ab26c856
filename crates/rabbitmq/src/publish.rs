//! Confirmed, mandatory publishing to a queue through the default exchange.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::Semaphore;
use tokio::time::timeout;
use tracing::debug;

use crate::error::Error;
use crate::message::short;

/// How many publishes of one connection wait for their confirms at once, at most: one
/// per confirm channel, opened as publishes need them.
///
/// A channel has at most one publish in flight because lapin does not tie a
/// `basic.return` to its publish: it hands the oldest returned message to whichever
/// confirm it resolves next, and an ack with `multiple = true` resolves the pending
/// confirms in no particular order. With two publishes waiting on one channel, an
/// unroutable one could be confirmed as a success and a routable one reported
/// unroutable. Many publishes in flight therefore take many channels: a confirm of a
/// quorum queue takes a Raft commit, so throughput grows with the publishes in flight.
pub(crate) const PUBLISH_CHANNELS: usize = 128;

/// Publishes on the confirm-mode channels of one connection, one publish per channel at
/// a time, opening a channel when no idle one is left (up to [`PUBLISH_CHANNELS`]).
///
/// A channel goes back to the idle ones only after its publish got its confirm. After
/// a timeout, an error or a cancelled publish, the channel is dropped, which closes it:
/// its confirm is still pending in lapin, and a late ack or return on it would be
/// given to the next publish.
pub(crate) struct Publisher {
    connection: Arc<Connection>,
    /// Open confirm channels with no publish in flight.
    idle: Mutex<Vec<Channel>>,
    /// One permit per publish in flight.
    in_flight: Semaphore,
    confirm_timeout: Duration,
}

impl Publisher {
    pub(crate) fn new(connection: Arc<Connection>, confirm_timeout: Duration) -> Self {
        Self {
            connection,
            idle: Mutex::new(Vec::new()),
            in_flight: Semaphore::new(PUBLISH_CHANNELS),
            confirm_timeout,
        }
    }

    pub(crate) fn connection(&self) -> &Connection {
        &self.connection
    }

    /// An idle channel that is still open, or a new confirm-mode channel.
    async fn channel(&self) -> Result<Channel, Error> {
        loop {
            let idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
            match idle {
                Some(channel) if channel.status().connected() => return Ok(channel),
                Some(_) => continue,
                None => break,
            }
        }
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(|source| Error::lapin("open a publishing channel", source))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|source| Error::lapin("enable publisher confirms", source))?;
        Ok(channel)
    }

    /// Publishes `body` to `queue` (default exchange, routing key = queue name),
    /// `mandatory`, and waits for the broker's confirm.
    ///
    /// # Errors
    ///
    /// [`Error::Unroutable`] when the queue does not exist (lapin reports the returned
    /// message as `Ack(Some(returned))`); [`Error::Nacked`]; [`Error::Timeout`] when no
    /// confirm comes within the confirm timeout; lapin errors.
    ///
    /// # Cancellation safety
    ///
    /// Not cancel safe: a cancelled publish may or may not have reached the queue (its
    /// channel is closed, so it does not confuse later publishes).
    pub(crate) async fn publish(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), Error> {
        let routing_key = short("queue name", queue)?;
        // The semaphore is never closed.
        let _permit = self.in_flight.acquire().await.map_err(|_| Error::Timeout {
            what: format!("waiting to publish to queue {queue}"),
            after: Duration::ZERO,
        })?;
        // Back to the idle ones once its confirm came: dropped (and so closed) otherwise.
        let channel = self.channel().await?;
        let options = BasicPublishOptions { mandatory: true, immediate: false };
        let published = async {
            channel
                .basic_publish("".into(), routing_key, options, body, properties)
                .await
                .map_err(|source| Error::lapin(format!("publish to queue {queue}"), source))?
                .await
                .map_err(|source| {
                    Error::lapin(format!("confirm of a publish to queue {queue}"), source)
                })
        };
        let confirmation = match timeout(self.confirm_timeout, published).await {
            Ok(confirmation) => confirmation?,
            Err(_) => {
                debug!(queue, channel = channel.id(), "closing a channel whose confirm timed out");
                return Err(Error::Timeout {
                    what: format!("waiting for the confirm of a publish to queue {queue}"),
                    after: self.confirm_timeout,
                });
            }
        };
        // The confirm came: nothing of this publish is pending on the channel any more.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner).push(channel);
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(Error::Unroutable {
                queue: queue.to_owned(),
                reply_text: returned.reply_text.to_string(),
            }),
            Confirmation::Nack(_) => Err(Error::Nacked { queue: queue.to_owned() }),
            // confirm_select succeeded on this channel, so this cannot happen; treat it as
            // a refusal rather than a silent success.
            Confirmation::NotRequested => Err(Error::Nacked { queue: queue.to_owned() }),
        }
    }
}
