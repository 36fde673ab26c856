//! RabbitMQ through steward-rabbitmq (cargo feature `rabbitmq`).

use std::sync::Arc;

use async_trait::async_trait;
use steward_core::{MessageSink, MessageSource, TransportError};
use steward_rabbitmq::RabbitMq;

use super::{OpenTransport, Topology, Transport};

/// The RabbitMQ settings. `Debug` hides the URL's password.
#[derive(Clone, clap::Args)]
#[group(skip)]
pub(super) struct Settings {
    /// The RabbitMQ URL (transport `rabbitmq`).
    #[arg(
        long,
        env = "STEWARD_RABBITMQ_URL",
        default_value = steward_rabbitmq::DEFAULT_URL,
        hide_env_values = true
    )]
    rabbitmq_url: String,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("rabbitmq_url", &crate::service::config::redact_url(&self.rabbitmq_url))
            .finish()
    }
}

impl OpenTransport for Settings {
    fn open(&self, topology: &Topology) -> Result<Arc<dyn Transport>, steward_core::BoxError> {
        let mut builder = steward_rabbitmq::RabbitMqBuilder::new()
            .with_url(self.rabbitmq_url.clone())
            .with_connection_name("steward-api")
            .with_max_deliveries(topology.max_deliveries);
        for queue in &topology.consumed {
            builder = builder.with_queue(queue.clone());
        }
        for queue in &topology.published {
            builder = builder.with_publish_queue(queue.clone());
        }
        Ok(Arc::new(Rabbit(builder.build()?)))
    }
}

#[derive(Debug)]
struct Rabbit(RabbitMq);

#[async_trait]
impl Transport for Rabbit {
    async fn source(&self, queue: &str) -> Result<Arc<dyn MessageSource>, TransportError> {
        Ok(Arc::new(self.0.source(queue).await?))
    }

    fn sink(&self) -> Arc<dyn MessageSink> {
        Arc::new(self.0.sink())
    }

    /// Declares the topology.
    async fn check(&self) -> Result<(), TransportError> {
        self.0.declare_topology().await
    }
}
