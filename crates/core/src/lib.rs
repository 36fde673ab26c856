//! Contracts for supervised background message consumers.
//!
//! steward runs long-lived workers that consume a broker queue and update a database.
//! This crate holds what every part agrees on:
//!
//! - [`Message`], what a handler sees, and [`Delivery`], a message plus the settlement
//!   handle that stays with the worker;
//! - [`MessageSource`] and [`MessageSink`], the minimum a transport implements (each
//!   transport is its own crate: in-memory, RabbitMQ, Azure Service Bus);
//! - [`TransportError`], named for what the caller does next, with
//!   [`is_retryable`](TransportError::is_retryable);
//! - [`Handler`] and [`Outcome`], what application code implements;
//! - [`Capabilities`], what a transport supports;
//! - [`transport`]: what every transport means the same way ([`DeadLetter`], the
//!   reason and naming constants);
//! - [`DeadLetterQueues`] ([`dead_letters`]): count, peek, redrive and purge dead
//!   letters, for operators.
//!
//! Feature `testkit` adds the conformance suite every transport must pass
//! ([`testkit`], not semver-stable); feature `mock` adds `mockall` mocks of the traits
//! (`MockMessageSource`, `MockMessageSink`, `MockHandler`, `MockSettle`).
//!
//! # Examples
//!
//! A handler, and one message through the in-memory transport by hand:
//!
//! ```
//! use std::time::Duration;
//! use steward_core::{handler_fn, Handler, MessageSink, MessageSource, Outcome, OutgoingMessage};
//! use steward_inmem::InMemoryBroker;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), steward_core::TransportError> {
//! let handler = handler_fn(|message| async move {
//!     match message.body_str() {
//!         Some(text) if !text.is_empty() => Outcome::Complete,
//!         _ => Outcome::dead_letter("MessageFormatIncorrect", "the body is not text"),
//!     }
//! });
//!
//! let broker = InMemoryBroker::new();
//! broker.send("orders", OutgoingMessage::new("hello").with_session_id("order-1")).await?;
//!
//! let source = broker.source("orders")?;
//! for delivery in source.receive(10, Duration::from_secs(1)).await? {
//!     match handler.handle(delivery.message().clone()).await {
//!         Outcome::Complete => delivery.complete().await?,
//!         Outcome::Retry { after, .. } => delivery.abandon(after).await?,
//!         Outcome::DeadLetter { reason, description } => {
//!             delivery.dead_letter(&reason, &description).await?
//!         }
//!     }
//! }
//! assert_eq!(broker.message_count("orders"), 0);
//! # Ok(())
//! # }
//! ```

mod capabilities;
pub mod dead_letters;
mod deadlines;
mod delivery;
mod error;
mod handler;
mod message;
pub mod metrics;
mod sink;
mod source;
mod supervisor;
pub mod transport;
mod updater;

#[cfg(feature = "testkit")]
pub mod testkit;

pub use capabilities::{Capabilities, Capability};
pub use dead_letters::{DeadLetterCount, DeadLetterQueues, Redrive};
pub use deadlines::Deadlines;
pub use delivery::{Delivery, LOCK_REPORT_SLACK, Settle};
pub use error::{BoxError, ErrorKind, TransportError, error_chain};
pub use handler::{Handler, HandlerFn, Outcome, RetryCause, handler_fn};
pub use message::{Message, OutgoingMessage};
pub use sink::MessageSink;
pub use source::{ConsumerRole, MessageSource};
pub use supervisor::{
    AbortedHandler, Backoff, ControlError, HealthHandle, HealthSnapshot, Jitter, OutcomeCounts,
    PAUSE_DRAIN, RestartIntensity, Settled, ShutdownReport, Supervisor, SupervisorConfig, Worker,
    WorkerContext, WorkerControls, WorkerError, WorkerHealth, WorkerState,
};
pub use transport::DeadLetter;
pub use updater::{Connect, MAX_BATCH_SIZE, MIN_HANDLER_TIMEOUT, Updater, UpdaterConfig};

#[cfg(feature = "mock")]
pub use delivery::MockSettle;
#[cfg(feature = "mock")]
pub use handler::MockHandler;
#[cfg(feature = "mock")]
pub use sink::MockMessageSink;
#[cfg(feature = "mock")]
pub use source::MockMessageSource;
