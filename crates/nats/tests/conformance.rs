//! The steward transport conformance suite against the local NATS server.
//!
//! A `harness = false` test target: one test per case, named `conformance::<case>`.
//! Every test declares its own uniquely named queues (streams) and deletes them when its
//! factory is dropped. Without a reachable server each test prints one skip line and
//! passes, unless `CI=true`, where it fails.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use steward_core::testkit::{FaultHooks, Suite, TransportFactory};
use steward_core::{Capabilities, DeadLetter, MessageSink, MessageSource, TransportError};
use steward_nats::{Nats, NatsBuilder};
use tokio::runtime::Builder;

struct Factory {
    url: String,
    sink: Nats,
    queues: Mutex<HashMap<String, Nats>>,
}

impl Factory {
    /// The factory, or `None` (after printing why) when the server is unreachable.
    async fn connect(test: &str) -> Option<Self> {
        if !support::server_available(test).await {
            return None;
        }
        let url = support::server_url();
        let sink =
            NatsBuilder::new().with_url(&url).with_connection_name("steward-test").build().unwrap();
        // Connects the sink, so capabilities() knows the server's largest payload.
        sink.declare_topology().await.unwrap();
        Some(Self { url, sink, queues: Mutex::new(HashMap::new()) })
    }

    fn nats(&self, queue: &str) -> Result<Nats, TransportError> {
        self.queues.lock().unwrap().get(queue).cloned().ok_or_else(|| {
            TransportError::not_found(format!("queue {queue} (not made by this factory)"))
        })
    }
}

impl Drop for Factory {
    fn drop(&mut self) {
        let made =
            self.queues.lock().map(|mut q| q.drain().map(|(_, n)| n).collect()).unwrap_or_default();
        support::delete_topologies(made);
    }
}

#[async_trait]
impl TransportFactory for Factory {
    fn name(&self) -> &str {
        "nats"
    }

    fn capabilities(&self) -> Capabilities {
        self.sink.capabilities()
    }

    fn lock_duration(&self) -> Option<Duration> {
        Some(support::ACK_WAIT)
    }

    async fn create_queue(&self, prefix: &str) -> Result<String, TransportError> {
        let (queue, builder) = support::unique_queue(&self.url, prefix);
        let nats = builder.build().map_err(|e| TransportError::other("config").with_source(e))?;
        nats.declare_topology().await?;
        self.queues.lock().unwrap().insert(queue.clone(), nats);
        Ok(queue)
    }

    async fn source(&self, queue: &str) -> Result<Box<dyn MessageSource>, TransportError> {
        Ok(Box::new(self.nats(queue)?.source(queue).await?))
    }

    async fn sink(&self) -> Result<Arc<dyn MessageSink>, TransportError> {
        Ok(Arc::new(self.sink.sink()))
    }

    async fn dead_letters(&self, queue: &str) -> Result<Vec<DeadLetter>, TransportError> {
        self.nats(queue)?.dead_letters(queue).await
    }

    fn faults(&self) -> Option<&dyn FaultHooks> {
        Some(self)
    }
}

#[async_trait]
impl FaultHooks for Factory {
    /// Deletes the queue's durable consumer behind the sources' backs: their next
    /// receive fails with `NotFound`, and a new source declares the consumer again.
    async fn break_receive(&self, queue: &str) -> Result<(), TransportError> {
        support::delete_consumer(&self.url, &self.nats(queue)?, queue).await;
        Ok(())
    }

    /// Deletes the dead-letter stream of `queue`: the copy to `<queue>.dlq` is refused.
    async fn break_dead_letter(&self, queue: &str) -> Result<(), TransportError> {
        support::delete_dead_letter_stream(&self.url, &self.nats(queue)?, queue).await;
        Ok(())
    }
}

fn main() -> ExitCode {
    Suite::new(|| Factory::connect("conformance"))
        .with_runtime(|| Builder::new_multi_thread().worker_threads(2).enable_all().build())
        .with_skip(
            "sessions_deliver_in_order_one_lock_per_session",
            "JetStream has no sessions; the updater orders by x-session-id within one process",
        )
        .with_skip(
            "session_stays_locked_across_consumers_through_a_delayed_abandon",
            "JetStream has no sessions; the updater holds a session back while its head waits out a delay",
        )
        .with_skip(
            "session_head_whose_lock_expired_comes_before_its_followers",
            "JetStream has no sessions; the updater orders by x-session-id within one process",
        )
        .run()
}
