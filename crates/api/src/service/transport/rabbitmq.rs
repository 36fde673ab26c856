//! RabbitMQ through steward-rabbitmq (cargo feature `rabbitmq`).

use std::sync::Arc;

use steward_rabbitmq::RabbitMq;

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

    /// Gives the two status queues (deployment status and airlock step results) a
    /// single active consumer (`x-single-active-consumer`), so that of several replicas
    /// one handles them, in order, and the others stand by to take over. Part of the
    /// queues' identity: changing it on existing queues needs a migration (see the
    /// RabbitMQ docs).
    #[arg(
        long,
        env = "STEWARD_RABBITMQ_SINGLE_ACTIVE_CONSUMER",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    rabbitmq_single_active_consumer: bool,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("rabbitmq_url", &steward_core::transport::redact_url(&self.rabbitmq_url))
            .field("rabbitmq_single_active_consumer", &self.rabbitmq_single_active_consumer)
            .finish()
    }
}

// The transport, `Rabbit`: its check declares the queues with their dead-letter and
// delay queues; the status queues with a single active consumer unless turned off; its
// dead-letter queues are `<queue>.dlq`.
broker_transport!(Rabbit(RabbitMq), |settings, topology| {
    let builder = steward_rabbitmq::RabbitMqBuilder::new().with_url(settings.rabbitmq_url.clone());
    let single_active = topology
        .ordered
        .iter()
        .filter(|_| settings.rabbitmq_single_active_consumer)
        .filter(|queue| topology.consumed.contains(queue));
    single_active.fold(builder, |builder, queue| builder.with_single_active_consumer(queue))
}, dead_letters: |rabbit| rabbit.dead_letter_queues());
