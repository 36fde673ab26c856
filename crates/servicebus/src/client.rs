//! The transport itself: [`ServiceBusTransport`], and the REST calls its sources and sinks
//! share (peek-lock with its status checked by hand, send, the startup probe).

use std::sync::Arc;
use std::time::Duration;

use azure_core::HttpClient;
use azure_core::StatusCode;
use azure_core::error::ErrorKind as AzureKind;
use azure_core::headers::Headers;
use azure_messaging_servicebus::service_bus::{PeekLockResponse, QueueClient};
use steward_core::{Capabilities, DeadLetter, TransportError};
use tokio::time::Instant;

use crate::error::{Error, Op};
use crate::message::{Outgoing, Received, read_received};
use crate::{AuthMethod, CAPABILITIES, ServiceBusSink, ServiceBusSource, dead_letter_queue};

/// The policy name and key handed to the Azure crate, which signs every request with
/// them. Its signature is never sent: the namespace client drops it and the credential
/// layer signs for the URL really used (see [`crate::http`]).
const UNUSED_POLICY: &str = "steward-unused";
const UNUSED_KEY: &str = "unused";

/// The most messages [`ServiceBusTransport::dead_letters`] reads.
pub const MAX_DEAD_LETTERS_READ: usize = 1000;

/// What the sources, locks and sinks of one transport share.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The namespace name the Azure crate builds `https://<name>.servicebus.windows.net` from.
    pub(crate) namespace: String,
    /// The namespace client: endpoint rewrite, credentials, the pooled client.
    pub(crate) http: Arc<dyn HttpClient>,
    pub(crate) auth: AuthMethod,
}

/// A peek-locked message: the crate's response (the settlement handle) and what the
/// transport read from it.
pub(crate) struct Locked {
    pub(crate) response: PeekLockResponse,
    pub(crate) received: Received,
}

/// What one peek-lock gave.
pub(crate) enum PeekLock {
    /// 201: a locked message.
    Message(Box<Locked>),
    /// 204: nothing within the wait.
    Empty,
    /// A message was locked but cannot be read; it stays locked until its lock expires,
    /// is delivered again, and ends in the native dead-letter queue once it exceeds the
    /// queue's maximum delivery count.
    Unreadable(Error),
}

impl Shared {
    /// The Azure crate's client for `queue` (cheap: a few strings and an `Arc`).
    pub(crate) fn queue_client(&self, queue: &str, op: Op) -> Result<QueueClient, Error> {
        QueueClient::new(
            self.http.clone(),
            self.namespace.clone(),
            queue.to_owned(),
            UNUSED_POLICY,
            UNUSED_KEY.to_owned(),
        )
        .map_err(|e| Error::azure(op, queue, None, e))
    }

    /// One peek-lock on `queue`, waiting `wait` (whole seconds) on an empty queue, with
    /// its status checked: `peek_lock_message2` returns `Ok` whatever the status.
    pub(crate) async fn peek_lock(&self, queue: &str, wait: Duration) -> Result<PeekLock, Error> {
        let client = self.queue_client(queue, Op::PeekLock)?;
        let requested_at = Instant::now();
        let response = match client.peek_lock_message2(Some(wait)).await {
            Ok(response) => response,
            // The request worked but the crate could not read the answer: a body that
            // is not UTF-8, or BrokerProperties it cannot parse.
            Err(error) if matches!(error.kind(), AzureKind::DataConversion) => {
                let reason = steward_core::error_chain(&error);
                return Ok(PeekLock::Unreadable(Error::Unreadable {
                    queue: queue.to_owned(),
                    reason,
                }));
            }
            Err(error) => return Err(Error::azure(Op::PeekLock, queue, None, error)),
        };
        match *response.status() {
            StatusCode::Created => {
                let headers: Headers = match response.custom_properties() {
                    Ok(headers) => headers,
                    Err(never) => match never {},
                };
                match read_received(response.body(), &headers, requested_at) {
                    Ok(received) => Ok(PeekLock::Message(Box::new(Locked { response, received }))),
                    Err(reason) => Ok(PeekLock::Unreadable(Error::Unreadable {
                        queue: queue.to_owned(),
                        reason,
                    })),
                }
            }
            StatusCode::NoContent => Ok(PeekLock::Empty),
            // The service's answer to a non-session receive on a session-enabled queue.
            StatusCode::MethodNotAllowed => {
                Err(Error::SessionsRequired { queue: queue.to_owned() })
            }
            status => Err(Error::status(
                Op::PeekLock,
                queue,
                None,
                u16::from(status),
                error_detail(&response.body()),
            )),
        }
    }

    /// Sends `body` to `queue`.
    pub(crate) async fn send(
        &self,
        queue: &str,
        body: &str,
        outgoing: Outgoing,
    ) -> Result<(), Error> {
        let message_id = outgoing.message_id.clone();
        let client = self.queue_client(queue, Op::Send)?;
        client
            .send_message(body, Some(outgoing.into_options()))
            .await
            .map_err(|e| Error::azure(Op::Send, queue, Some(&message_id), e))
    }
}

/// The `<Detail>` text of the service's XML error body, shortened.
fn error_detail(body: &str) -> Option<String> {
    let start = body.find("<Detail>")? + "<Detail>".len();
    let len = body[start..].find("</Detail>")?;
    let detail: String = body[start..start + len].chars().take(300).collect();
    Some(detail)
}

/// An Azure Service Bus transport over the REST protocol: opens [`ServiceBusSource`]s and
/// [`ServiceBusSink`]s, probes queues at start, reads dead letters.
///
/// Cheap to clone; clones share the HTTP connection pool and the credentials. Build one
/// with [`ServiceBusBuilder`](crate::ServiceBusBuilder).
#[derive(Debug, Clone)]
pub struct ServiceBusTransport {
    shared: Arc<Shared>,
}

impl ServiceBusTransport {
    pub(crate) fn new(shared: Shared) -> Self {
        Self { shared: Arc::new(shared) }
    }

    /// What the transport's sources, sinks and dead-letter queues share.
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// What the sources of this transport support; see the crate docs.
    #[must_use]
    pub fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    /// How requests are authenticated.
    #[must_use]
    pub fn auth_method(&self) -> &AuthMethod {
        &self.shared.auth
    }

    /// The namespace name (without `.servicebus.windows.net`).
    #[must_use]
    pub fn namespace(&self) -> &str {
        &self.shared.namespace
    }

    /// A consumer of `queue`. Cheap, does no I/O: create one per worker (re)start.
    #[must_use]
    pub fn source(&self, queue: impl Into<String>) -> ServiceBusSource {
        ServiceBusSource::new(self.shared.clone(), queue.into())
    }

    /// A sink. Cheap, does no I/O.
    #[must_use]
    pub fn sink(&self) -> ServiceBusSink {
        ServiceBusSink::new(self.shared.clone())
    }

    /// Checks, once at start, that each of `queues` can be consumed by this transport:
    /// it exists, does not require sessions, and has its dead-letter queue `<queue>.dlq`.
    ///
    /// Each queue (and its `.dlq`) gets one peek-lock with timeout 0. If that locks a
    /// message, it is unlocked at once, which counts as one delivery of it (REST has no
    /// way to look without locking).
    ///
    /// # Errors
    ///
    /// The first problem, as one error naming the queue: [`TransportError::Protocol`]
    /// for a session-enabled queue (with the REST limit), [`TransportError::NotFound`]
    /// for a missing queue or a missing `<queue>.dlq`; [`TransportError::Auth`] for
    /// refused credentials; retryable connection errors.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe as far as messages go: a message locked by a cancelled probe is
    /// delivered again when its lock expires.
    pub async fn probe_queues<I, Q>(&self, queues: I) -> Result<(), TransportError>
    where
        I: IntoIterator<Item = Q>,
        Q: AsRef<str>,
    {
        for queue in queues {
            let queue = queue.as_ref();
            self.probe(queue).await?;
            let dlq = dead_letter_queue(queue);
            match self.probe(&dlq).await {
                Err(error) if error.is_not_found() => {
                    return Err(Error::MissingDeadLetterQueue {
                        queue: queue.to_owned(),
                        dead_letter_queue: dlq,
                    }
                    .into());
                }
                other => other?,
            }
            tracing::debug!(queue, "service bus queue probed");
        }
        Ok(())
    }

    async fn probe(&self, queue: &str) -> Result<(), TransportError> {
        match self.shared.peek_lock(queue, Duration::ZERO).await? {
            PeekLock::Empty | PeekLock::Unreadable(_) => Ok(()),
            PeekLock::Message(locked) => {
                let unlocked = locked.response.unlock_message().await;
                if let Err(error) = unlocked {
                    let error = TransportError::from(Error::azure(
                        Op::Unlock,
                        queue,
                        Some(&locked.received.message.id),
                        error,
                    ));
                    tracing::warn!(
                        queue,
                        message_id = locked.received.message.id,
                        error = %steward_core::error_chain(&error),
                        "could not unlock the message the probe locked; it is delivered again when its lock expires"
                    );
                }
                Ok(())
            }
        }
    }

    /// Reads the messages in `<queue>.dlq`, at most [`MAX_DEAD_LETTERS_READ`], oldest
    /// first, and leaves them there: for tests and tools.
    ///
    /// REST cannot look without locking, so each message is peek-locked and unlocked
    /// again at the end, which the broker counts as a delivery of it; the delivery
    /// count of a returned message is its count when it was dead-lettered, without
    /// these readings.
    ///
    /// # Errors
    ///
    /// [`TransportError::NotFound`] when `<queue>.dlq` does not exist;
    /// [`TransportError::Auth`]; connection errors.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe as far as messages go: messages locked by a cancelled call are
    /// delivered again when their locks expire.
    pub async fn dead_letters(&self, queue: &str) -> Result<Vec<DeadLetter>, TransportError> {
        let dlq = dead_letter_queue(queue);
        let mut held = Vec::new();
        let mut read = Vec::new();
        let mut failure = None;
        while read.len() < MAX_DEAD_LETTERS_READ {
            match self.shared.peek_lock(&dlq, Duration::ZERO).await {
                Ok(PeekLock::Message(locked)) => {
                    read.push(crate::dead_letters::to_dead_letter(&locked));
                    held.push(locked.response);
                }
                Ok(PeekLock::Empty) => break,
                Ok(PeekLock::Unreadable(error)) => {
                    tracing::warn!(
                        queue = dlq,
                        error = %steward_core::error_chain(&TransportError::from(error)),
                        "skipped an unreadable dead letter"
                    );
                }
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            }
        }
        for response in held {
            // An unlock that fails leaves the message locked until its lock expires.
            let _ = response.unlock_message().await;
        }
        match failure {
            Some(error) => Err(error.into()),
            None => Ok(read),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_details_come_from_the_service_xml() {
        let body = "<Error><Code>401</Code><Detail>InvalidSignature: the token is bad. TrackingId:1</Detail></Error>";
        assert_eq!(
            error_detail(body).as_deref(),
            Some("InvalidSignature: the token is bad. TrackingId:1")
        );
        assert_eq!(error_detail("no xml"), None);
    }
}
