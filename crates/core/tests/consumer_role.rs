//! The role a source reports (active or standby) reaches the worker's health, and a
//! standby that receives nothing for many stall timeouts stays running and ready.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use steward_core::{
    Capabilities, ConsumerRole, Delivery, MessageSource, Outcome, TransportError, Updater,
    WorkerState, handler_fn,
};
use steward_inmem::InMemorySource;
use support::{QUEUE, broker, config, eventually, send, supervise, worker};

/// 0: no role, 1: active, 2: standby.
#[derive(Clone, Default)]
struct RoleSwitch(Arc<AtomicU8>);

impl RoleSwitch {
    fn set(&self, role: Option<ConsumerRole>) {
        let value = match role {
            None => 0,
            Some(ConsumerRole::Active) => 1,
            Some(_) => 2,
        };
        self.0.store(value, Ordering::SeqCst);
    }

    fn get(&self) -> Option<ConsumerRole> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            1 => Some(ConsumerRole::Active),
            _ => Some(ConsumerRole::Standby),
        }
    }
}

/// An in-memory source whose reported role the test switches.
struct WithRole {
    inner: InMemorySource,
    role: RoleSwitch,
}

#[async_trait]
impl MessageSource for WithRole {
    fn queue(&self) -> &str {
        self.inner.queue()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, TransportError> {
        self.inner.receive(max, wait).await
    }

    async fn stop_receiving(&self) -> Result<(), TransportError> {
        self.inner.stop_receiving().await
    }

    fn role(&self) -> Option<ConsumerRole> {
        self.role.get()
    }
}

#[tokio::test(start_paused = true)]
async fn the_sources_role_shows_in_health_and_a_standby_stays_running_past_its_stall_timeout() {
    let broker = broker(Duration::from_secs(30));
    let role = RoleSwitch::default();
    role.set(Some(ConsumerRole::Standby));
    let source = WithRole { inner: broker.source(QUEUE).unwrap(), role: role.clone() };
    let stall = Duration::from_secs(3);
    let updater =
        Updater::with_source("orders", source, handler_fn(|_| async { Outcome::Complete }))
            .with_config(config().with_stall_timeout(stall));
    let (supervisor, health) = supervise(updater);

    eventually("the standby role", Duration::from_secs(5), || {
        worker(&health, "orders").role == Some(ConsumerRole::Standby)
    })
    .await;
    // Ten stall timeouts of waiting with nothing to receive.
    tokio::time::sleep(stall * 10).await;
    let standby = worker(&health, "orders");
    assert_eq!(standby.state, WorkerState::Running, "{standby:?}");
    assert_eq!(standby.restarts, 0, "{standby:?}");
    assert_eq!(standby.role, Some(ConsumerRole::Standby));
    assert!(health.snapshot().is_ready() && health.snapshot().is_live());

    // It takes over: the next receive reports it.
    role.set(Some(ConsumerRole::Active));
    send(&broker, "m1", None).await;
    eventually("the active role", Duration::from_secs(5), || {
        worker(&health, "orders").role == Some(ConsumerRole::Active)
    })
    .await;
    eventually("m1 completed", Duration::from_secs(5), || {
        worker(&health, "orders").outcomes.completed == 1
    })
    .await;

    // Stopped: no consumer, no role.
    let report = supervisor.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)).await;
    assert!(report.overran.is_empty(), "{report:?}");
    assert_eq!(worker(&health, "orders").role, None);
}

#[tokio::test(start_paused = true)]
async fn a_source_without_roles_reports_none() {
    let broker = broker(Duration::from_secs(30));
    let updater = Updater::with_source(
        "orders",
        broker.source(QUEUE).unwrap(),
        handler_fn(|_| async { Outcome::Complete }),
    )
    .with_config(config());
    let (supervisor, health) = supervise(updater);
    send(&broker, "m1", None).await;
    eventually("m1 completed", Duration::from_secs(5), || {
        worker(&health, "orders").outcomes.completed == 1
    })
    .await;
    assert_eq!(worker(&health, "orders").role, None);
    let _report = supervisor.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)).await;
}
