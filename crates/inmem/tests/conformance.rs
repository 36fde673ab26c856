//! The steward transport conformance suite on the in-memory broker, under paused time
//! (the suite's default runtime). A `harness = false` test target: one test per case,
//! named `conformance::<case>`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use steward_core::testkit::{FaultHooks, Suite, TransportFactory, unique_name};
use steward_core::{
    Capabilities, DeadLetter, DeadLetterQueues, ErrorKind, MessageSink, MessageSource,
    TransportError,
};
use steward_inmem::{InMemoryBroker, QueueOptions};

const LOCK: Duration = Duration::from_secs(30);

struct Factory {
    broker: InMemoryBroker,
}

impl Factory {
    fn new() -> Self {
        Self { broker: InMemoryBroker::builder().with_strict(true).build() }
    }
}

#[async_trait]
impl TransportFactory for Factory {
    fn name(&self) -> &str {
        "inmem"
    }

    fn capabilities(&self) -> Capabilities {
        self.broker.capabilities()
    }

    fn lock_duration(&self) -> Option<Duration> {
        Some(LOCK)
    }

    async fn create_queue(&self, prefix: &str) -> Result<String, TransportError> {
        let name = unique_name(prefix);
        self.broker.declare_queue(&name, QueueOptions::default().with_lock_duration(LOCK));
        Ok(name)
    }

    async fn source(&self, queue: &str) -> Result<Box<dyn MessageSource>, TransportError> {
        Ok(Box::new(self.broker.source(queue)?))
    }

    async fn sink(&self) -> Result<Arc<dyn MessageSink>, TransportError> {
        Ok(Arc::new(self.broker.clone()))
    }

    async fn dead_letters(&self, queue: &str) -> Result<Vec<DeadLetter>, TransportError> {
        Ok(self.broker.dead_letters(queue))
    }

    fn faults(&self) -> Option<&dyn FaultHooks> {
        Some(self)
    }

    fn dead_letter_queues(&self) -> Option<Arc<dyn DeadLetterQueues>> {
        Some(Arc::new(self.broker.dead_letter_queues()))
    }
}

#[async_trait]
impl FaultHooks for Factory {
    async fn break_receive(&self, queue: &str) -> Result<(), TransportError> {
        self.broker.faults(queue).fail_receives(1, ErrorKind::Connection);
        Ok(())
    }

    /// The next disposition fails, leaving the message locked until its lock expires.
    async fn break_dead_letter(&self, queue: &str) -> Result<(), TransportError> {
        self.broker.faults(queue).fail_dispositions(1, ErrorKind::Connection);
        Ok(())
    }
}

fn main() -> ExitCode {
    Suite::new(|| async { Some(Factory::new()) }).run()
}
