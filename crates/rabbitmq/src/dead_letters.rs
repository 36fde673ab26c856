//! [`DeadLetterQueues`] on RabbitMQ: `<queue>.dlq`, read with `basic.get` and put back
//! with `basic.nack(requeue)`.

use std::collections::BTreeSet;

use async_trait::async_trait;
use bytes::Bytes;
use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use steward_core::dead_letters::redriven;
use steward_core::transport::MAX_DELIVERY_COUNT_EXCEEDED;
use steward_core::{DeadLetter, DeadLetterQueues, Redrive, TransportError};
use tokio::time::timeout;

use crate::builder::Config;
use crate::error::Error;
use crate::message::{self, DEAD_LETTER_DESCRIPTION_HEADER, DEAD_LETTER_REASON_HEADER};
use crate::publish::Publisher;
use crate::{RabbitMq, connect, dead_letter_queue};

/// The dead-letter queues (`<queue>.dlq`) of a RabbitMQ broker, for operators
/// ([`RabbitMq::dead_letter_queues`]). Each call opens a connection of its own and
/// closes it at the end.
///
/// Its limits, from AMQP 0-9-1 having no peek:
///
/// - A peek takes messages with `basic.get` and returns them with `basic.nack`
///   (requeue), in the order it took them. A quorum queue serves returned messages
///   first, in the order returned, so the queue keeps its order; but each peek counts
///   as a delivery of each message read, and the delivery count in the dead-letter
///   queue rises (`<queue>.dlq` has no delivery limit, so nothing is lost).
/// - Messages a concurrent peek, redrive or purge holds at that moment are not seen:
///   a peek may show fewer, and a redrive or purge may miss them (never duplicate
///   them). A message dead-lettered while a peek holds others lands behind them.
/// - The count is the broker's count of ready messages.
/// - A redrive publishes a copy (confirmed) and then acknowledges the dead letter: a
///   connection lost between the two leaves the message in both queues. A redrive or
///   purge reads at most the messages that were ready when it began.
#[derive(Debug, Clone)]
pub struct RabbitMqDeadLetters {
    rabbit: RabbitMq,
}

impl RabbitMq {
    /// The broker's dead-letter queues, for operators; no I/O until used.
    #[must_use]
    pub fn dead_letter_queues(&self) -> RabbitMqDeadLetters {
        RabbitMqDeadLetters { rabbit: self.clone() }
    }
}

/// Headers the broker sets on a message it dead-letters, which a redriven copy leaves
/// behind: its deaths are history once an operator sent it back.
fn is_death_header(name: &str) -> bool {
    name == "x-death" || name.starts_with("x-first-death-") || name.starts_with("x-last-death-")
}

/// The [`DeadLetter`] of a message read from a dead-letter queue: the reason and
/// description the transport put in its headers, or the broker's own reason for a
/// message it moved ([`MAX_DELIVERY_COUNT_EXCEEDED`] for its delivery limit). A message
/// the transport dead-lettered has the delivery count it had then (reading it back is
/// no delivery of it); one the broker moved has the broker's count.
pub(crate) fn to_dead_letter(properties: &BasicProperties, body: Bytes) -> DeadLetter {
    let own_reason = message::header_string(properties, DEAD_LETTER_REASON_HEADER);
    let reason = own_reason
        .clone()
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
    let description =
        message::header_string(properties, DEAD_LETTER_DESCRIPTION_HEADER).unwrap_or_default();
    let mut message = message::to_message(properties, body);
    if let Some(count) = own_reason.and(message::republished_count(properties)) {
        message.delivery_count = count;
    }
    message.properties.remove(DEAD_LETTER_REASON_HEADER);
    message.properties.remove(DEAD_LETTER_DESCRIPTION_HEADER);
    message.properties.retain(|name, _| !is_death_header(name));
    DeadLetter { message, reason, description }
}

/// One connection and channel reading `<queue>.dlq`, and the messages it holds.
struct Reader {
    queue: String,
    dlq: String,
    connection: Connection,
    channel: Channel,
    confirm_timeout: std::time::Duration,
    held: Vec<BasicGetMessage>,
}

impl Reader {
    async fn open(config: &Config, queue: &str, role: &str) -> Result<Self, Error> {
        let dlq = dead_letter_queue(queue);
        message::short("queue name", &dlq)?;
        let connection = connect(config, &format!("dead letters {role} {queue}")).await?;
        let channel = match connection.create_channel().await {
            Ok(channel) => channel,
            Err(source) => {
                let _ = connection.close(200, "no channel".into()).await;
                return Err(Error::lapin(format!("open a channel to read {dlq}"), source));
            }
        };
        Ok(Self {
            queue: queue.to_owned(),
            dlq,
            connection,
            channel,
            confirm_timeout: config.confirm_timeout,
            held: Vec::new(),
        })
    }

    /// The messages ready in `<queue>.dlq` (a passive declare).
    async fn ready(&self) -> Result<u64, Error> {
        let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let declare = self.channel.queue_declare(
            message::short("queue name", &self.dlq)?,
            options,
            FieldTable::default(),
        );
        let queue = timeout(self.confirm_timeout, declare)
            .await
            .map_err(|_| Error::Timeout {
                what: format!("counting {}", self.dlq),
                after: self.confirm_timeout,
            })?
            .map_err(|e| Error::lapin(format!("count queue {}", self.dlq), e))?;
        Ok(u64::from(queue.message_count()))
    }

    /// The next message of `<queue>.dlq`, unacknowledged, or `None` when none is ready.
    async fn get(&self) -> Result<Option<BasicGetMessage>, Error> {
        let got = self
            .channel
            .basic_get(message::short("queue name", &self.dlq)?, BasicGetOptions { no_ack: false });
        timeout(self.confirm_timeout, got)
            .await
            .map_err(|_| Error::Timeout {
                what: format!("reading {}", self.dlq),
                after: self.confirm_timeout,
            })?
            .map_err(|e| Error::lapin(format!("read queue {}", self.dlq), e))
    }

    /// Returns every held message to the queue, in the order taken, and closes the
    /// connection (which returns whatever a failed return left unacknowledged).
    async fn close(self) {
        for got in self.held {
            let requeue = BasicNackOptions { multiple: false, requeue: true };
            if let Err(error) = got.delivery.acker.nack(requeue).await {
                tracing::warn!(queue = self.dlq, error = %error, "could not return a dead letter; it returns when the connection closes");
                break;
            }
        }
        let _ = self.connection.close(200, "dead letters done".into()).await;
    }

    /// Reads up to the messages ready now; acts on the chosen ones with `act` and
    /// acknowledges them; returns the others at the end. Returns how many were chosen.
    async fn take_chosen<F, Fut>(
        mut self,
        mut chosen: impl FnMut(&str) -> bool,
        mut act: F,
    ) -> Result<usize, TransportError>
    where
        F: FnMut(DeadLetter) -> Fut,
        Fut: Future<Output = Result<(), Error>>,
    {
        let outcome = async {
            let mut budget = self.ready().await?;
            let mut done = 0;
            while budget > 0 {
                let Some(got) = self.get().await? else { break };
                budget -= 1;
                let properties = got.delivery.properties.clone();
                let dead = to_dead_letter(&properties, Bytes::from(got.delivery.data.clone()));
                if !chosen(&dead.message.id) {
                    self.held.push(got);
                    continue;
                }
                let id = dead.message.id.clone();
                if let Err(error) = act(dead).await {
                    self.held.push(got);
                    return Err(error);
                }
                got.delivery
                    .acker
                    .ack(BasicAckOptions { multiple: false })
                    .await
                    .map_err(|e| Error::lapin(format!("remove {id} from {}", self.dlq), e))?;
                done += 1;
            }
            Ok::<_, Error>(done)
        }
        .await;
        self.close().await;
        Ok(outcome?)
    }
}

#[async_trait]
impl DeadLetterQueues for RabbitMqDeadLetters {
    fn peek_counts_as_delivery(&self) -> bool {
        true
    }

    async fn count(&self, queue: &str) -> Result<u64, TransportError> {
        let reader = Reader::open(self.rabbit.config(), queue, "count").await?;
        let ready = reader.ready().await;
        reader.close().await;
        Ok(ready?)
    }

    async fn peek(&self, queue: &str, limit: usize) -> Result<Vec<DeadLetter>, TransportError> {
        let mut reader = Reader::open(self.rabbit.config(), queue, "peek").await?;
        let mut read = Vec::new();
        let mut failure = None;
        while read.len() < limit {
            match reader.get().await {
                Ok(Some(got)) => {
                    let properties = &got.delivery.properties;
                    read.push(to_dead_letter(properties, Bytes::from(got.delivery.data.clone())));
                    reader.held.push(got);
                }
                Ok(None) => break,
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            }
        }
        reader.close().await;
        match failure {
            Some(error) => Err(error.into()),
            None => Ok(read),
        }
    }

    async fn redrive(&self, queue: &str, which: &Redrive) -> Result<usize, TransportError> {
        if which.is_empty() {
            return Ok(0);
        }
        let config = self.rabbit.config();
        let reader = Reader::open(config, queue, "redrive").await?;
        let publisher = Publisher::new(
            std::sync::Arc::new(connect(config, &format!("dead letters redrive {queue}")).await?),
            config.confirm_timeout,
        );
        let publisher = &publisher;
        let target = reader.queue.clone();
        let redriven_count = reader
            .take_chosen(
                |id| which.selects(id),
                |dead| {
                    let target = target.clone();
                    async move {
                        let again = redriven(&dead.message);
                        let properties = message::outgoing_properties(&again)?;
                        publisher.publish(&target, &again.body, properties).await?;
                        tracing::info!(
                            queue = target,
                            message_id = dead.message.id,
                            "dead letter redriven"
                        );
                        Ok(())
                    }
                },
            )
            .await;
        let _ = publisher.connection().close(200, "redrive done".into()).await;
        redriven_count
    }

    async fn purge(&self, queue: &str, ids: &BTreeSet<String>) -> Result<usize, TransportError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let reader = Reader::open(self.rabbit.config(), queue, "purge").await?;
        let target = reader.queue.clone();
        reader
            .take_chosen(
                |id| ids.contains(id),
                |dead| {
                    tracing::info!(
                        queue = target,
                        message_id = dead.message.id,
                        "dead letter purged"
                    );
                    std::future::ready(Ok(()))
                },
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use lapin::types::{AMQPValue, LongString, ShortString};

    use super::*;

    fn properties(headers: &[(&str, &str)]) -> BasicProperties {
        let mut table = FieldTable::default();
        for (key, value) in headers {
            table.insert(ShortString::from(*key), AMQPValue::LongString(LongString::from(*value)));
        }
        BasicProperties::default().with_message_id("m".into()).with_headers(table)
    }

    #[test]
    fn a_transport_dead_letter_keeps_its_reason_and_count_without_bookkeeping() {
        let dead = to_dead_letter(
            &properties(&[
                (DEAD_LETTER_REASON_HEADER, "Invalid"),
                (DEAD_LETTER_DESCRIPTION_HEADER, "bad"),
                (message::DELIVERY_COUNT_HEADER, "3"),
                ("x-first-death-reason", "rejected"),
                ("origin", "test"),
            ]),
            Bytes::from_static(b"body"),
        );
        assert_eq!((dead.reason.as_str(), dead.description.as_str()), ("Invalid", "bad"));
        assert_eq!(dead.message.delivery_count, 3);
        assert_eq!(dead.message.properties.keys().collect::<Vec<_>>(), ["origin"]);
    }

    #[test]
    fn a_broker_dead_letter_names_the_delivery_limit_as_every_transport_does() {
        let dead = to_dead_letter(
            &properties(&[("x-last-death-reason", "delivery_limit")]),
            Bytes::from_static(b"body"),
        );
        assert_eq!(dead.reason, MAX_DELIVERY_COUNT_EXCEEDED);
        assert_eq!(dead.description, "");
        assert!(dead.message.properties.is_empty());
    }
}
