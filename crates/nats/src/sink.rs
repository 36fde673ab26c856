//! Publishing with JetStream publish acks.

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_trait::async_trait;
use steward_core::{MessageSink, OutgoingMessage, TransportError};
use tokio::time::timeout;

use crate::error::Error;
use crate::{Nats, message};

/// Sends messages to queue subjects, each confirmed by the stream's publish ack.
///
/// Sends from many tasks share one connection and are in flight together; each `send`
/// returns once its own ack arrived. A subject no stream captures is
/// [`TransportError::NotFound`].
///
/// The message id travels as `Nats-Msg-Id`, and the stream drops a message whose id it
/// holds from within its duplicate window (two minutes). Such a send still succeeds,
/// as the resend of a message whose ack was lost must, and is logged as a warning with
/// the message id: message ids must be unique beyond one publisher's restarts, or a
/// reused id loses its message.
#[derive(Debug, Clone)]
pub struct NatsSink {
    nats: Nats,
}

impl NatsSink {
    pub(crate) fn new(nats: Nats) -> Self {
        Self { nats }
    }
}

#[async_trait]
impl MessageSink for NatsSink {
    async fn send(&self, queue: &str, message: OutgoingMessage) -> Result<(), TransportError> {
        Ok(publish(&self.nats, queue, &message).await?)
    }
}

/// Publishes `message` to subject `queue` with its id as `Nats-Msg-Id` and waits for
/// the stream's ack.
pub(crate) async fn publish(
    nats: &Nats,
    queue: &str,
    message: &OutgoingMessage,
) -> Result<(), Error> {
    let id = message::message_id(message);
    let headers = message::headers(&id, message)?;
    publish_with(nats, queue, &id, headers, message.body.clone()).await
}

pub(crate) async fn publish_with(
    nats: &Nats,
    subject: &str,
    id: &str,
    headers: async_nats::HeaderMap,
    body: bytes::Bytes,
) -> Result<(), Error> {
    let js = nats.shared().await?;
    let what = || format!("publish message {id} to {subject}");
    let publish = PublishMessage::build().payload(body).headers(headers);
    let timeout_after = nats.config().request_timeout;
    let ack = js
        .send_publish(subject.to_owned(), publish)
        .await
        .map_err(|e| publish_error(&what(), subject, timeout_after, e))?;
    let after = nats.config().request_timeout * 2;
    match timeout(after, ack).await {
        Err(_) => Err(Error::Timeout { what: what(), after }),
        Ok(Err(e)) => Err(publish_error(&what(), subject, timeout_after, e)),
        Ok(Ok(ack)) if ack.duplicate => {
            // Not an error: the ack cannot tell a resend after a lost ack (which must
            // succeed, or the publisher retries forever) from an id its publisher
            // reused (whose message is lost). Only the latter is a publisher's bug.
            tracing::warn!(
                queue = subject,
                message_id = id,
                stream = %ack.stream,
                sequence = ack.sequence,
                "publish acked as a duplicate: the stream already holds a message with this id \
                 from within its duplicate window and kept that one; harmless for a resend, \
                 a lost message if the publisher reused the id"
            );
            Ok(())
        }
        Ok(Ok(ack)) => {
            tracing::trace!(queue = subject, message_id = id, stream = %ack.stream, sequence = ack.sequence, "published");
            Ok(())
        }
    }
}

fn publish_error(
    what: &str,
    subject: &str,
    after: std::time::Duration,
    error: async_nats::jetstream::context::PublishError,
) -> Error {
    match error.kind() {
        PublishErrorKind::StreamNotFound => Error::NotFound {
            entity: format!("queue {subject} (no stream captures the subject)"),
            source: Some(error.into()),
        },
        PublishErrorKind::TimedOut => Error::Timeout { what: what.to_owned(), after },
        PublishErrorKind::BrokenPipe => Error::connection(what, error),
        _ => Error::jetstream(what, error),
    }
}
