//! An in-process message broker for steward.
//!
//! Not a channel: a broker with the semantics of a peek-lock queue, so that code tested
//! on it behaves the same on Azure Service Bus or RabbitMQ. [`InMemoryBroker`] has named
//! queues (created on first use, or only when declared in strict mode), locks with a
//! duration and expiry, renewal, delivery counts, abandon with delay, a dead-letter
//! sub-queue per queue with reason and description, sessions (one locked message per
//! session at a time, in order), scheduled messages and fault injection ([`Faults`]).
//! It runs on tokio time, so tests under `tokio::time::pause()` are instant and exact.
//!
//! It is the default transport of the steward service and the transport every core and
//! service test runs on. Everything is lost when the process exits.
//!
//! # Examples
//!
//! ```
//! use std::time::Duration;
//! use steward_core::{MessageSink, MessageSource, OutgoingMessage};
//! use steward_inmem::{InMemoryBroker, QueueOptions};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), steward_core::TransportError> {
//! let broker = InMemoryBroker::builder().with_strict(true).build();
//! broker.declare_queue("jobs", QueueOptions::default().with_lock_duration(Duration::from_secs(30)));
//! broker.send("jobs", OutgoingMessage::new("{}").with_session_id("a")).await?;
//!
//! let source = broker.source("jobs")?;
//! let deliveries = source.receive(10, Duration::from_secs(1)).await?;
//! assert_eq!(deliveries[0].message().delivery_count, 1);
//! deliveries.into_iter().next().unwrap().dead_letter("Invalid", "not a job").await?;
//!
//! assert_eq!(broker.dead_letters("jobs")[0].reason, "Invalid");
//! assert!(broker.send("nowhere", OutgoingMessage::new("x")).await.unwrap_err().is_not_found());
//! # Ok(())
//! # }
//! ```

mod broker;
mod dead_letters;
mod fault;
mod queue;
mod source;

pub use broker::{DEAD_LETTER_SUFFIX, Enqueued, InMemoryBroker, InMemoryBrokerBuilder, LockRef};
pub use dead_letters::InMemoryDeadLetters;
pub use fault::Faults;
pub use queue::{LockedMessage, QueueOptions};
pub use source::InMemorySource;
