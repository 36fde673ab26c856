//! Confirmed, mandatory publishing to a queue through the default exchange.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::Mutex;
use tokio::time::timeout;

use crate::error::Error;
use crate::message::short;

/// Publishes on a confirm-mode channel of one connection, opening a new channel when
/// the last one was closed (a refused publish closes it).
pub(crate) struct Publisher {
    connection: Arc<Connection>,
    channel: Mutex<Option<Channel>>,
    confirm_timeout: Duration,
}

impl Publisher {
    pub(crate) fn new(connection: Arc<Connection>, confirm_timeout: Duration) -> Self {
        Self { connection, channel: Mutex::new(None), confirm_timeout }
    }

    pub(crate) fn connection(&self) -> &Connection {
        &self.connection
    }

    async fn channel(&self) -> Result<Channel, Error> {
        let mut slot = self.channel.lock().await;
        if let Some(channel) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(channel.clone());
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
        *slot = Some(channel.clone());
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
    /// Not cancel safe: a cancelled publish may or may not have reached the queue.
    pub(crate) async fn publish(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), Error> {
        let routing_key = short("queue name", queue)?;
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
        let confirmation =
            timeout(self.confirm_timeout, published).await.map_err(|_| Error::Timeout {
                what: format!("waiting for the confirm of a publish to queue {queue}"),
                after: self.confirm_timeout,
            })??;
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
