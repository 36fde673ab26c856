//! The steward transport conformance suite against the local RabbitMQ broker.
//!
//! A `harness = false` test target: one test per case, named `conformance::<case>`.
//! Every test declares its own uniquely named queues (they expire ten minutes after
//! their last use). Without a reachable broker each test prints one skip line and
//! passes, unless `CI=true`, where it fails.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use steward_core::testkit::{FaultHooks, Suite, TransportFactory, unique_name};
use steward_core::{
    Capabilities, DeadLetter, DeadLetterQueues, MessageSink, MessageSource, TransportError,
};
use steward_rabbitmq::{RabbitMq, RabbitMqBuilder};
use tokio::runtime::Builder;

/// The prefetch of the suite's consumers: the most messages any case holds unsettled
/// in one consumer.
const CASE_PREFETCH: u16 = 10;

struct Factory {
    sink: RabbitMq,
    queues: Mutex<HashMap<String, RabbitMq>>,
}

impl Factory {
    /// The factory, or `None` (after printing why) when the broker is unreachable.
    async fn connect(test: &str) -> Option<Self> {
        if !support::broker_available(test).await {
            return None;
        }
        let sink = RabbitMqBuilder::new()
            .with_url(support::broker_url())
            .with_connection_name("steward-test")
            .build()
            .unwrap();
        Some(Self { sink, queues: Mutex::new(HashMap::new()) })
    }

    fn rabbit(&self, queue: &str) -> Result<RabbitMq, TransportError> {
        self.queues.lock().unwrap().get(queue).cloned().ok_or_else(|| {
            TransportError::not_found(format!("queue {queue} (not made by this factory)"))
        })
    }
}

impl Drop for Factory {
    fn drop(&mut self) {
        let rabbits =
            self.queues.lock().map(|mut q| q.drain().map(|(_, r)| r).collect()).unwrap_or_default();
        support::delete_topologies(rabbits);
    }
}

#[async_trait]
impl TransportFactory for Factory {
    fn name(&self) -> &str {
        "rabbitmq"
    }

    fn capabilities(&self) -> Capabilities {
        self.sink.capabilities()
    }

    fn lock_duration(&self) -> Option<Duration> {
        None
    }

    async fn create_queue(&self, prefix: &str) -> Result<String, TransportError> {
        let (queue, builder) = support::unique_queue(prefix);
        // RabbitMQ pushes up to the prefetch to a consumer, which holds those messages
        // until it settles them or disconnects. The concurrent-consumers case has two
        // consumers hold 10 unsettled messages each; with a larger prefetch the first
        // consumer would be pushed all 20 and the second would get none.
        let rabbit = builder
            .with_prefetch(CASE_PREFETCH)
            .build()
            .map_err(|e| TransportError::other("config").with_source(e))?;
        rabbit.declare_topology().await?;
        self.queues.lock().unwrap().insert(queue.clone(), rabbit);
        Ok(queue)
    }

    async fn source(&self, queue: &str) -> Result<Box<dyn MessageSource>, TransportError> {
        Ok(Box::new(self.rabbit(queue)?.source(queue).await?))
    }

    async fn sink(&self) -> Result<Arc<dyn MessageSink>, TransportError> {
        Ok(Arc::new(self.sink.sink()))
    }

    async fn dead_letters(&self, queue: &str) -> Result<Vec<DeadLetter>, TransportError> {
        self.sink.dead_letters(queue).await
    }

    fn missing_queue(&self) -> Option<String> {
        Some(unique_name("steward-missing"))
    }

    fn faults(&self) -> Option<&dyn FaultHooks> {
        Some(self)
    }

    fn dead_letter_queues(&self) -> Option<Arc<dyn DeadLetterQueues>> {
        Some(Arc::new(self.sink.dead_letter_queues()))
    }
}

#[async_trait]
impl FaultHooks for Factory {
    /// Closes, through `rabbitmqctl`, the connections named after `queue`: its sources'.
    async fn break_receive(&self, queue: &str) -> Result<(), TransportError> {
        let closed = support::close_connections_containing(queue).await;
        if closed == 0 {
            return Err(TransportError::other(format!("no connection of queue {queue} to close")));
        }
        Ok(())
    }

    /// Deletes, through `rabbitmqctl`, `<queue>.dlq`: the dead-letter copy is unroutable.
    async fn break_dead_letter(&self, queue: &str) -> Result<(), TransportError> {
        support::delete_queue(&steward_rabbitmq::dead_letter_queue(queue)).await;
        Ok(())
    }
}

fn main() -> ExitCode {
    Suite::new(|| Factory::connect("conformance"))
        .with_runtime(|| Builder::new_multi_thread().worker_threads(2).enable_all().build())
        .with_skip(
            "lock_expiry_redelivers",
            "AMQP 0-9-1 has no timed locks: a delivery stays with its consumer until settled or disconnected",
        )
        .with_skip("renew_lock_keeps_message_invisible", "AMQP 0-9-1 has no timed locks to renew")
        .with_skip(
            "settle_after_lock_loss_returns_lock_lost",
            "AMQP 0-9-1 has no timed locks to lose by waiting; a closed channel gives LockLost (fault tests)",
        )
        .with_skip(
            "stale_delivery_returns_lock_lost_and_spares_new_holder",
            "AMQP 0-9-1 has no timed locks, so a message never moves to another consumer while its channel is open",
        )
        .with_skip(
            "renew_after_lock_expiry_returns_lock_lost",
            "AMQP 0-9-1 has no timed locks: nothing expires, and renew_lock is a no-op",
        )
        .with_skip(
            "locked_until_lies_within_the_lock_duration",
            "AMQP 0-9-1 has no timed locks: locked_until is None",
        )
        .with_skip(
            "sessions_deliver_in_order_one_lock_per_session",
            "RabbitMQ has no broker-side sessions; the updater orders by x-session-id within one process",
        )
        .with_skip(
            "session_stays_locked_across_consumers_through_a_delayed_abandon",
            "RabbitMQ has no broker-side sessions; the updater holds a session back while its head waits out a delay",
        )
        .with_skip(
            "session_head_whose_lock_expired_comes_before_its_followers",
            "RabbitMQ has neither broker-side sessions nor timed locks",
        )
        .run()
}
