//! RabbitMQ through steward-rabbitmq (cargo feature `rabbitmq`).

use std::sync::Arc;

use steward_rabbitmq::RabbitMq;

use super::{OpenTransport, Topology, Transport};

/// The RabbitMQ settings.
#[derive(Debug, Clone, clap::Args)]
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

impl OpenTransport for Settings {
    fn open(&self, topology: &Topology) -> Result<Arc<dyn Transport>, steward_core::BoxError> {
        let builder = steward_rabbitmq::RabbitMqBuilder::new()
            .with_url(self.rabbitmq_url.clone())
            .with_connection_name("steward-api")
            .with_max_deliveries(topology.max_deliveries);
        let builder = topology.add_queues(
            builder,
            |builder, queue| builder.with_queue(queue),
            |builder, queue| builder.with_publish_queue(queue),
        );
        Ok(Arc::new(Rabbit(builder.build()?)))
    }
}

// Its topology: the queues with their dead-letter and delay queues.
broker_transport!(Rabbit(RabbitMq));
