//! Azure Service Bus for steward, over the REST protocol with
//! [`azure_messaging_servicebus`] 0.21.
//!
//! [`ServiceBusBuilder`] configures it (`from_env`, `with_*`, `build`); the resulting
//! [`ServiceBusTransport`] probes queues at start and opens [`ServiceBusSource`]s and
//! [`ServiceBusSink`]s, which implement steward's `MessageSource` and `MessageSink`.
//! Both are cheap (no I/O) and share one pooled HTTP client: create them again on every
//! worker restart.
//!
//! Feature `emulator` adds the module `emulator`: a Service Bus REST emulator on the steward
//! in-memory broker, for tests (in-process, over real loopback HTTP) and as the
//! standalone binary `steward-sb-emulator`.
//!
//! # Examples
//!
//! ```no_run
//! use std::time::Duration;
//! use steward_core::{MessageSink, MessageSource, OutgoingMessage};
//! use steward_servicebus::ServiceBusBuilder;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // SERVICE_BUS_FULLY_QUALIFIED_NAMESPACE, MANAGED_IDENTITY_CLIENT_ID or
//! // SERVICE_BUS_SAS_KEY_NAME/_KEY, STEWARD_SERVICEBUS_ENDPOINT for an emulator.
//! let transport = ServiceBusBuilder::from_env().build()?;
//! // Once at start: a session-enabled queue or a missing `<queue>.dlq` stops here.
//! transport.probe_queues(["deploymentstatus"]).await?;
//!
//! let sink = transport.sink();
//! sink.send("deploymentstatus", OutgoingMessage::json(r#"{"id":"1"}"#)).await?;
//!
//! let source = transport.source("deploymentstatus");
//! for delivery in source.receive(10, Duration::from_secs(5)).await? {
//!     delivery.complete().await?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Against the in-process emulator (feature `emulator`), as the tests run it:
//!
//! ```
//! # #[cfg(feature = "emulator")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use steward_core::{MessageSink, MessageSource, OutgoingMessage};
//! use steward_servicebus::ServiceBusBuilder;
//! use steward_servicebus::emulator::Emulator;
//!
//! let emulator = Emulator::builder().with_sas_key("RootManageSharedAccessKey", "a2V5").start().await?;
//! let transport = ServiceBusBuilder::new()
//!     .with_namespace("mytre.servicebus.windows.net")
//!     .with_endpoint(emulator.endpoint())
//!     .with_sas_key("RootManageSharedAccessKey", "a2V5")
//!     .build()?;
//! transport.sink().send("jobs", OutgoingMessage::new("hello").with_message_id("m-1")).await?;
//! let got = transport.source("jobs").receive(10, Duration::from_secs(1)).await?;
//! assert_eq!(got[0].message().id, "m-1");
//! emulator.shutdown().await;
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "emulator"))]
//! # fn main() {}
//! ```
//!
//! # Queues: no sessions, and a `.dlq` each
//!
//! The REST protocol cannot receive from session-enabled queues, and TRE creates
//! `deploymentstatus` and `workspacequeue` with sessions. This transport needs queues
//! with sessions **off**; [`ServiceBusTransport::probe_queues`] stops the start with one
//! error naming such a queue. Messages keep their `SessionId`, and the steward updater
//! orders messages of one session within its process.
//!
//! REST has no dead-letter call, so a dead-lettered message is copied to the queue
//! `<queue>.dlq` (see [`dead_letter_queue`]) and deleted. REST cannot create queues:
//! `<queue>.dlq` must exist, and the probe stops the start with one error naming it when
//! it does not. Messages that exceed the queue's `MaxDeliveryCount` still go to the native
//! `$DeadLetterQueue`; set it above `STEWARD_MAX_DELIVERIES`.
//!
//! # The wire
//!
//! - **Receive**: sequential peek-locks (`POST /{queue}/messages/head?timeout=N`), the
//!   first waiting the receive's wait in whole seconds rounded up, the rest `timeout=0`.
//!   The status is checked by hand (the crate's `peek_lock_message2` returns `Ok` for
//!   every status): 201 a message, 204 none, 401/403 `Auth`, 404/410 `NotFound`, 405 a
//!   session-enabled queue (`Protocol`), 408/429/5xx retryable `Connection`.
//! - **Message fields** come from the raw `BrokerProperties` header (the crate's struct
//!   lacks correlation id, session id and content type): `MessageId`, `CorrelationId`,
//!   `SessionId`, `DeliveryCount`, `EnqueuedTimeUtc`, `LockedUntilUtc`. The content type
//!   is the `Content-Type` header; Service Bus's default for messages sent without one
//!   (`application/atom+xml;type=entry;charset=utf-8`) reads as `None`. Every header
//!   not on [`PROTOCOL_HEADERS`] (nor with one of [`PROTOCOL_HEADER_PREFIXES`]) is a
//!   custom property, its JSON string value unquoted; names arrive in lower case (use
//!   lower-case property names). A send refuses a property named like a listed header,
//!   so a property is never silently lost; `traceparent` and `tracestate` are ordinary
//!   properties.
//! - **Lock expiry**: `LockedUntilUtc` minus the answer's `Date` header (the service's own
//!   clock, so a skewed local clock does not matter), less one second for the whole-second
//!   precision of both, added to the tokio instant the request was sent. That span is the
//!   lock duration the transport assumes for renewals: renew-lock answers are not
//!   documented to carry the new expiry (the emulator sends one; Azure's is not relied
//!   on), so a renewal's expiry is the renewal request's instant plus that span.
//! - **Settlement** goes through the lock URI of the crate's `PeekLockResponse`, kept
//!   as the handle: complete = `DELETE`, abandon = `PUT` (unlock), renew = `POST`. On the
//!   lock URI 404 (the lock expired, or the message is gone) is `LockLost`, 410 (the
//!   queue is gone) `NotFound`.
//! - **Abandon with a delay**: renew the lock (proving it is still held), send a copy
//!   with `ScheduledEnqueueTimeUtc` = now + delay rounded up to the second, the property
//!   [`DELIVERY_COUNT_PROPERTY`] (deliveries so far) and the original id in
//!   [`MESSAGE_ID_PROPERTY`] under a fresh `MessageId` (so duplicate detection cannot drop
//!   the copy), then delete the original. The receiving side restores the id and adds
//!   the count to the broker's `DeliveryCount`.
//! - **Dead-letter**: renew the lock, send a copy to `<queue>.dlq` with the properties
//!   [`DEAD_LETTER_REASON_PROPERTY`] and [`DEAD_LETTER_DESCRIPTION_PROPERTY`] (at most
//!   4096 characters) and the delivery count, then delete the original. If the delete
//!   fails after the copy was sent, both exist: delivery is at least once.
//! - **Send**: `POST /{queue}/messages` with the body as text, `BrokerProperties`
//!   (`MessageId`, `SessionId`, `CorrelationId`) and custom-property headers.
//!
//! # HTTP and credentials
//!
//! Requests go through an injected `azure_core::HttpClient`: by default a
//! [`PooledHttpClient`] (keep-alive pool, connect timeout, every request bounded by the
//! request timeout plus its receive wait; azure_core's own client opens a connection
//! per request). On top of it, requests for `https://<name>.servicebus.windows.net` go
//! to `STEWARD_SERVICEBUS_ENDPOINT` when set, requests to other hosts are refused, and
//! each request is authenticated for the URL it really goes to: a shared access
//! signature made with `SERVICE_BUS_SAS_KEY_NAME`/`SERVICE_BUS_SAS_KEY`, or a bearer
//! token from a [`TokenProvider`] through [`BearerTokenClient`]
//! ([`ManagedIdentityCredential`] when `MANAGED_IDENTITY_CLIENT_ID` is set). Keys and
//! tokens are [`Secret`]s: they never appear in `Debug` output or logs.
//!
//! # Capabilities and conformance
//!
//! [`ServiceBusTransport::capabilities`]: `lock_renewal`, `delayed_abandon` (scheduled
//! copies), `delivery_count`, `max_body_bytes` = 256 KiB (the Standard tier's limit).
//! Not claimed, so the conformance suite skips the cases that need them:
//!
//! - `sessions`: the REST protocol has no session receivers; the updater orders messages
//!   by `SessionId` within one process (`sessions_deliver_in_order_one_lock_per_session`).
//! - `binary_body`: the crate sends and receives bodies as `String`; a body that is not
//!   UTF-8 is refused before sending (`send_binary_body_round_trips`).
//! - `native_dead_letter`: `<queue>.dlq` is this transport's own dead-letter queue, not
//!   Service Bus's `$DeadLetterQueue` (REST cannot dead-letter). The dead-letter
//!   conformance case runs all the same.
//!
//! # Limits
//!
//! - A probe, and [`ServiceBusTransport::dead_letters`], peek-lock and unlock: REST
//!   cannot look at a message without locking it, so each counts as a delivery.
//! - A message whose answer cannot be read (a body that is not UTF-8, or
//!   `BrokerProperties` the crate cannot parse, such as an `EnqueuedSequenceNumber`
//!   beyond the `i32` it reads it into) is logged and skipped; it stays locked until
//!   its lock expires and ends in `$DeadLetterQueue` after `MaxDeliveryCount`
//!   deliveries. The transport is not tested with partitioned queues (TRE's are not).

mod auth;
mod builder;
mod client;
mod error;
mod http;
mod message;
mod sink;
mod source;

#[cfg(feature = "emulator")]
pub mod emulator;

use steward_core::Capabilities;

pub use auth::{
    AccessToken, BearerTokenClient, IMDS_TOKEN_ENDPOINT, ManagedIdentityCredential,
    SERVICE_BUS_RESOURCE, Secret, StaticToken, TokenError, TokenProvider,
};
pub use builder::{AuthMethod, ConfigError, NAMESPACE_SUFFIX, ServiceBusBuilder};
pub use client::{MAX_DEAD_LETTERS_READ, ServiceBusTransport};
pub use http::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, PooledHttpClient};
pub use message::{
    DEAD_LETTER_DESCRIPTION_PROPERTY, DEAD_LETTER_REASON_PROPERTY, DELIVERY_COUNT_PROPERTY,
    MAX_DEAD_LETTER_DESCRIPTION_CHARS, MESSAGE_ID_PROPERTY, PROTOCOL_HEADER_PREFIXES,
    PROTOCOL_HEADERS,
};
pub use sink::ServiceBusSink;
pub use source::ServiceBusSource;

/// The largest body this transport claims to carry: the Standard tier's 256 KB.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// What this transport supports; see the crate docs for what is missing and why.
pub(crate) const CAPABILITIES: Capabilities = Capabilities {
    sessions: false,
    native_dead_letter: false,
    lock_renewal: true,
    delayed_abandon: true,
    delivery_count: true,
    binary_body: false,
    max_body_bytes: Some(MAX_BODY_BYTES),
};

/// The queue dead-lettered messages of `queue` are copied to: `<queue>.dlq`.
pub use steward_core::transport::dead_letter_queue;
