//! The message transport the service runs on, chosen by `STEWARD_TRANSPORT` among the
//! ones compiled in (cargo features `inmem`, `rabbitmq`, `servicebus`).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use steward_core::{Connect, MessageSink, MessageSource, TransportError};

use crate::service::{Config, TransportKind};

type Opened = Pin<Box<dyn Future<Output = Result<Arc<dyn MessageSource>, TransportError>> + Send>>;
type Opener = Arc<dyn Fn(String) -> Opened + Send + Sync>;
type Checker =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), TransportError>> + Send>> + Send + Sync>;

/// Why the transport cannot be set up: bad configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportConfigError {
    /// The transport was not compiled into this build.
    #[error(
        "transport {kind} is not compiled in: rebuild with `--features {feature}` (this build has: {available})"
    )]
    NotCompiledIn {
        /// The transport asked for.
        kind: TransportKind,
        /// The cargo feature it needs.
        feature: &'static str,
        /// The transports this build has.
        available: String,
    },
    /// The transport's own settings are wrong.
    #[error("invalid {kind} settings")]
    Invalid {
        /// The transport.
        kind: TransportKind,
        /// What is wrong.
        #[source]
        source: steward_core::BoxError,
    },
}

/// The transport: a sink shared by the service, and sources opened per worker start.
#[derive(Clone)]
pub struct Transport {
    kind: TransportKind,
    sink: Arc<dyn MessageSink>,
    open: Opener,
    check: Checker,
    #[cfg(feature = "inmem")]
    broker: Option<steward_inmem::InMemoryBroker>,
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transport").field("kind", &self.kind).finish_non_exhaustive()
    }
}

impl Transport {
    /// Builds the transport `config` asks for.
    ///
    /// # Errors
    ///
    /// The transport is not compiled in, or its settings are invalid. An unreachable
    /// broker is not an error here: the workers find out, and back off.
    pub fn from_config(config: &Config) -> Result<Transport, TransportConfigError> {
        let kind = config.transport.unwrap_or_else(TransportKind::default_for_build);
        if !kind.is_compiled_in() {
            let available =
                TransportKind::compiled_in().iter().map(ToString::to_string).collect::<Vec<_>>();
            return Err(TransportConfigError::NotCompiledIn {
                kind,
                feature: kind.feature(),
                available: available.join(", "),
            });
        }
        match kind {
            #[cfg(feature = "inmem")]
            TransportKind::Inmem => Ok(Transport::inmem(steward_inmem::InMemoryBroker::new())),
            #[cfg(feature = "rabbitmq")]
            TransportKind::Rabbitmq => rabbitmq(config),
            #[cfg(feature = "servicebus")]
            TransportKind::Servicebus => servicebus(config),
            #[allow(unreachable_patterns)]
            _ => Err(TransportConfigError::NotCompiledIn {
                kind,
                feature: kind.feature(),
                available: String::new(),
            }),
        }
    }

    /// A transport over an in-process broker.
    #[cfg(feature = "inmem")]
    #[must_use]
    pub fn inmem(broker: steward_inmem::InMemoryBroker) -> Transport {
        let opener = broker.clone();
        Transport {
            kind: TransportKind::Inmem,
            sink: Arc::new(broker.clone()),
            open: Arc::new(move |queue: String| {
                let broker = opener.clone();
                Box::pin(async move {
                    let source: Arc<dyn MessageSource> = Arc::new(broker.source(&queue)?);
                    Ok(source)
                })
            }),
            check: Arc::new(|| Box::pin(async { Ok(()) })),
            broker: Some(broker),
        }
    }

    /// Which transport this is.
    #[must_use]
    pub fn kind(&self) -> TransportKind {
        self.kind
    }

    /// The sink every outbound message goes through.
    #[must_use]
    pub fn sink(&self) -> Arc<dyn MessageSink> {
        self.sink.clone()
    }

    /// A [`Connect`] opening a new source of `queue` on every worker (re)start.
    #[must_use]
    pub fn connect(&self, queue: &str) -> impl Connect + use<> {
        let open = self.open.clone();
        let queue = queue.to_owned();
        move || {
            let open = open.clone();
            let queue = queue.clone();
            async move { Ok::<_, TransportError>(SharedSource(open(queue).await?)) }
        }
    }

    /// Checks that the broker answers and the topology is right (declares it where the
    /// transport can). On Service Bus the queues are probed until one check passes, and
    /// later checks do nothing: a probe counts as a delivery of each queue's first
    /// message.
    ///
    /// # Errors
    ///
    /// Retryable errors while the broker is unreachable; others (credentials, a queue
    /// with other settings, a session-enabled Service Bus queue) need a human.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub async fn check(&self) -> Result<(), TransportError> {
        (self.check)().await
    }

    /// The in-process broker, when the transport is `inmem`.
    #[cfg(feature = "inmem")]
    #[must_use]
    pub fn inmem_broker(&self) -> Option<&steward_inmem::InMemoryBroker> {
        self.broker.as_ref()
    }
}

/// A source opened through the transport, shared (the `Updater` takes `impl MessageSource`).
struct SharedSource(Arc<dyn MessageSource>);

#[async_trait::async_trait]
impl MessageSource for SharedSource {
    fn queue(&self) -> &str {
        self.0.queue()
    }

    fn capabilities(&self) -> steward_core::Capabilities {
        self.0.capabilities()
    }

    async fn receive(
        &self,
        max: usize,
        wait: std::time::Duration,
    ) -> Result<Vec<steward_core::Delivery>, TransportError> {
        self.0.receive(max, wait).await
    }

    async fn stop_receiving(&self) -> Result<(), TransportError> {
        self.0.stop_receiving().await
    }
}

#[cfg(feature = "rabbitmq")]
fn rabbitmq(config: &Config) -> Result<Transport, TransportConfigError> {
    let invalid = |error: steward_rabbitmq::ConfigError| TransportConfigError::Invalid {
        kind: TransportKind::Rabbitmq,
        source: Box::new(error),
    };
    let rabbit = steward_rabbitmq::RabbitMqBuilder::new()
        .with_url(config.rabbitmq_url.clone())
        .with_connection_name("steward-api")
        .with_max_deliveries(config.max_deliveries)
        .with_queue(config.deployment_status_queue.clone())
        .with_queue(config.step_result_queue.clone())
        .with_publish_queue(config.resource_request_queue.clone())
        .with_publish_queue(config.airlock_status_changed_queue.clone())
        .with_publish_queue(config.airlock_notification_queue.clone());
    // The simulators consume what the service publishes.
    let rabbit = if config.simulate_processors() {
        rabbit
            .with_queue(config.resource_request_queue.clone())
            .with_queue(config.airlock_status_changed_queue.clone())
    } else {
        rabbit
    };
    let rabbit = rabbit.build().map_err(invalid)?;
    let opener = rabbit.clone();
    let checker = rabbit.clone();
    Ok(Transport {
        kind: TransportKind::Rabbitmq,
        sink: Arc::new(rabbit.sink()),
        open: Arc::new(move |queue: String| {
            let rabbit = opener.clone();
            Box::pin(async move {
                let source: Arc<dyn MessageSource> = Arc::new(rabbit.source(&queue).await?);
                Ok(source)
            })
        }),
        check: Arc::new(move || {
            let rabbit = checker.clone();
            Box::pin(async move { rabbit.declare_topology().await })
        }),
        #[cfg(feature = "inmem")]
        broker: None,
    })
}

#[cfg(feature = "servicebus")]
fn servicebus(config: &Config) -> Result<Transport, TransportConfigError> {
    // From the environment first, for what the service has no flag of (a managed
    // identity's IDENTITY_ENDPOINT on App Service); flags and variables on top.
    let mut builder = steward_servicebus::ServiceBusBuilder::from_env();
    if let Some(namespace) = &config.service_bus_namespace {
        builder = builder.with_namespace(namespace.clone());
    }
    if let Some(endpoint) = &config.servicebus_endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    if let (Some(name), Some(key)) = (&config.service_bus_sas_key_name, &config.service_bus_sas_key)
    {
        builder = builder.with_sas_key(name.clone(), key.clone());
    } else if config.managed_identity_client_id.is_some() {
        builder = builder.with_managed_identity(config.managed_identity_client_id.clone());
    }
    let bus = builder.build().map_err(|error| TransportConfigError::Invalid {
        kind: TransportKind::Servicebus,
        source: Box::new(error),
    })?;
    let opener = bus.clone();
    let checker = bus.clone();
    // A probe peek-locks each queue's first message, which counts as a delivery of it.
    // Probing every time the watcher looks would push the delivery counts of messages
    // that wait (in `<queue>.dlq`, or in a queue while the updaters wait for the
    // database) towards MaxDeliveryCount: so the queues are probed until one probe passes,
    // and not again. A broker outage after that shows in the updaters' health.
    let probed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut queues = vec![config.deployment_status_queue.clone(), config.step_result_queue.clone()];
    if config.simulate_processors() {
        queues.push(config.resource_request_queue.clone());
        queues.push(config.airlock_status_changed_queue.clone());
    }
    Ok(Transport {
        kind: TransportKind::Servicebus,
        sink: Arc::new(bus.sink()),
        open: Arc::new(move |queue: String| {
            let bus = opener.clone();
            Box::pin(async move {
                let source: Arc<dyn MessageSource> = Arc::new(bus.source(queue));
                Ok(source)
            })
        }),
        check: Arc::new(move || {
            let bus = checker.clone();
            let queues = queues.clone();
            let probed = probed.clone();
            Box::pin(async move {
                if !probed.load(std::sync::atomic::Ordering::Acquire) {
                    bus.probe_queues(queues).await?;
                    probed.store(true, std::sync::atomic::Ordering::Release);
                }
                Ok(())
            })
        }),
        #[cfg(feature = "inmem")]
        broker: None,
    })
}
