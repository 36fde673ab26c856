//! Azure Service Bus through steward-servicebus (cargo feature `servicebus`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use steward_core::{DeadLetterQueues, MessageSink, MessageSource, TransportError};
use steward_servicebus::{ServiceBusBuilder, ServiceBusTransport};

use super::{OpenTransport, Topology, Transport};

/// The Service Bus settings. The variables the flags do not cover (a managed identity's
/// `IDENTITY_ENDPOINT` and `IDENTITY_HEADER` on App Service) come from the environment.
/// `Debug` hides the shared access key.
#[derive(Clone, clap::Args)]
#[group(skip)]
pub(super) struct Settings {
    /// The Service Bus namespace, e.g. `sb-mytre.servicebus.windows.net` (transport `servicebus`).
    #[arg(long, env = "SERVICE_BUS_FULLY_QUALIFIED_NAMESPACE")]
    service_bus_namespace: Option<String>,

    /// The shared access key name (Service Bus SAS auth).
    #[arg(long, env = "SERVICE_BUS_SAS_KEY_NAME")]
    service_bus_sas_key_name: Option<String>,

    /// The shared access key (Service Bus SAS auth). Never logged.
    #[arg(long, env = "SERVICE_BUS_SAS_KEY", hide_env_values = true)]
    service_bus_sas_key: Option<String>,

    /// The client id of the managed identity for Service Bus (Entra ID auth).
    #[arg(long, env = "MANAGED_IDENTITY_CLIENT_ID")]
    managed_identity_client_id: Option<String>,

    /// A Service Bus REST endpoint to use instead of `https://<namespace>` (another cloud, or the emulator).
    #[arg(long, env = "STEWARD_SERVICEBUS_ENDPOINT")]
    servicebus_endpoint: Option<String>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("service_bus_namespace", &self.service_bus_namespace)
            .field("service_bus_sas_key_name", &self.service_bus_sas_key_name)
            .field("service_bus_sas_key", &self.service_bus_sas_key.as_ref().map(|_| "REDACTED"))
            .field("managed_identity_client_id", &self.managed_identity_client_id)
            .field("servicebus_endpoint", &self.servicebus_endpoint)
            .finish()
    }
}

impl Settings {
    /// The value of variable `name`: from the flags for the variables they cover, from
    /// the environment for the others, so each is read once.
    fn var(&self, name: &str) -> Option<String> {
        match name {
            "SERVICE_BUS_FULLY_QUALIFIED_NAMESPACE" => self.service_bus_namespace.clone(),
            "SERVICE_BUS_SAS_KEY_NAME" => self.service_bus_sas_key_name.clone(),
            "SERVICE_BUS_SAS_KEY" => self.service_bus_sas_key.clone(),
            "MANAGED_IDENTITY_CLIENT_ID" => self.managed_identity_client_id.clone(),
            "STEWARD_SERVICEBUS_ENDPOINT" => self.servicebus_endpoint.clone(),
            other => std::env::var(other).ok(),
        }
    }
}

impl OpenTransport for Settings {
    fn open(&self, topology: &Topology) -> Result<Arc<dyn Transport>, steward_core::BoxError> {
        let bus = ServiceBusBuilder::from_lookup(|name| self.var(name)).build()?;
        let probed = topology.consumed.clone();
        Ok(Arc::new(Bus { bus, probed, probed_once: AtomicBool::new(false) }))
    }
}

/// A namespace, and whether its queues were probed yet.
#[derive(Debug)]
struct Bus {
    bus: ServiceBusTransport,
    /// The queues the check probes.
    probed: Vec<String>,
    probed_once: AtomicBool,
}

#[async_trait]
impl Transport for Bus {
    async fn source(&self, queue: &str) -> Result<Arc<dyn MessageSource>, TransportError> {
        Ok(Arc::new(self.bus.source(queue)))
    }

    fn sink(&self) -> Arc<dyn MessageSink> {
        Arc::new(self.bus.sink())
    }

    fn max_message_bytes(&self) -> Option<usize> {
        Some(steward_servicebus::MAX_BODY_BYTES)
    }

    fn dead_letter_queues(&self) -> Option<Arc<dyn DeadLetterQueues>> {
        Some(Arc::new(self.bus.dead_letter_queues()))
    }

    /// Probes the consumed queues until one probe passes, and not again.
    ///
    /// A probe peek-locks each queue's first message, which counts as a delivery of
    /// it. Probing every time the watcher looks would push the delivery counts of
    /// messages that wait (in `<queue>.dlq`, or in a queue while the updaters wait for
    /// the database) towards MaxDeliveryCount. A broker outage after that shows in the
    /// updaters' health.
    async fn check(&self) -> Result<(), TransportError> {
        if !self.probed_once.load(Ordering::Acquire) {
            self.bus.probe_queues(&self.probed).await?;
            self.probed_once.store(true, Ordering::Release);
        }
        Ok(())
    }
}
