//! The in-process broker (cargo feature `inmem`): nothing to install, nothing kept
//! across restarts but what the shutdown saves to the outbox.

use std::sync::Arc;

use async_trait::async_trait;
use steward_core::{DeadLetterQueues, Message, MessageSink, MessageSource, TransportError};
use steward_inmem::InMemoryBroker;

use super::{OpenTransport, Topology, Transport};

/// The in-process broker has no settings.
#[derive(Debug, Clone, Default, clap::Args)]
#[group(skip)]
pub(super) struct Settings {}

impl OpenTransport for Settings {
    const IN_PROCESS: bool = true;

    fn open(&self, topology: &Topology) -> Result<Arc<dyn Transport>, steward_core::BoxError> {
        Ok(Arc::new(Inmem { broker: InMemoryBroker::new(), queues: topology.queues() }))
    }
}

/// A broker living as long as the process.
#[derive(Debug)]
struct Inmem {
    broker: InMemoryBroker,
    /// The queues whose messages the shutdown hands back.
    queues: Vec<String>,
}

#[async_trait]
impl Transport for Inmem {
    async fn source(&self, queue: &str) -> Result<Arc<dyn MessageSource>, TransportError> {
        Ok(Arc::new(self.broker.source(queue)?))
    }

    fn sink(&self) -> Arc<dyn MessageSink> {
        Arc::new(self.broker.clone())
    }

    fn max_message_bytes(&self) -> Option<usize> {
        self.broker.capabilities().max_body_bytes
    }

    async fn check(&self) -> Result<(), TransportError> {
        Ok(())
    }

    fn dead_letter_queues(&self) -> Option<Arc<dyn DeadLetterQueues>> {
        Some(Arc::new(self.broker.dead_letter_queues()))
    }

    /// Every message still queued: a graceful restart loses nothing.
    fn take_queued(&self) -> Vec<(String, Message)> {
        self.queues
            .iter()
            .flat_map(|queue| {
                self.broker.take_all(queue).into_iter().map(|message| (queue.clone(), message))
            })
            .collect()
    }
}
