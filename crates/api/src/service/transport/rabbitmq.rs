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
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("rabbitmq_url", &steward_core::transport::redact_url(&self.rabbitmq_url))
            .finish()
    }
}

// The transport, `Rabbit`: its check declares the queues with their dead-letter and
// delay queues; its dead-letter queues are `<queue>.dlq`.
broker_transport!(Rabbit(RabbitMq), |settings| {
    steward_rabbitmq::RabbitMqBuilder::new().with_url(settings.rabbitmq_url.clone())
}, dead_letters: |rabbit| rabbit.dead_letter_queues());
