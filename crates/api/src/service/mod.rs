//! The whole service: configuration checked, workers under one supervisor, HTTP, and
//! the graceful shutdown.
//!
//! Start-up fails only on bad configuration ([`StartError`]); an unreachable database or
//! broker leaves the service up and unready, its workers `backing_off`, until they
//! connect. On the shutdown signal: stop accepting HTTP requests, drain the updaters,
//! flush the outbox, save what the in-process broker still holds, close the database.

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use steward_core::{
    Backoff, OutgoingMessage, RestartIntensity, Supervisor, SupervisorConfig, Updater,
    UpdaterConfig, error_chain,
};
use tokio::net::TcpListener;
use tokio::time::Instant;

mod config;
mod faults;
mod metrics;
mod transport;

pub use config::{Config, DatabaseSettings, LogFormat};
pub(crate) use transport::TransportHandle;
pub use transport::{TransportConfigError, TransportOptions};

use faults::FaultPlan;

use crate::http::{ApiSettings, AppState, OperatorSettings};
use crate::rules::airlock::AirlockQueues;
use crate::storage::{Database, OutboxMessage, Store};
use crate::templates::TemplateRegistry;
use crate::workers::{
    AfterDatabase, AirlockProcessor, AirlockStatusHandler, DatabaseWatcher,
    DeploymentStatusHandler, OutboxConfig, OutboxWorker, PauseFollower, PauseGate,
    ResourceProcessor, StaticRecipients, TransportWatcher, names,
};

/// Why the service did not start: bad configuration (exit code 2).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The transport is not compiled in or badly configured.
    #[error(transparent)]
    Transport(#[from] TransportConfigError),
    /// The broker refused the configuration (credentials, a queue with other settings).
    #[error("the {transport} broker refused the configuration")]
    Broker {
        /// The transport.
        transport: String,
        /// Why.
        #[source]
        source: steward_core::TransportError,
    },
    /// A template file is invalid.
    #[error(transparent)]
    Templates(#[from] crate::templates::TemplateError),
    /// The database URL is invalid.
    #[error("invalid STEWARD_DATABASE_URL")]
    Database(#[source] crate::storage::StoreError),
    /// `STEWARD_FAULTS` is invalid or not available in this build.
    #[error("{0}")]
    Faults(String),
    /// A non-loopback listen address with no authentication configured.
    #[error(
        "refusing to listen on {addr} with no authentication: set STEWARD_AUTH_ISSUER and STEWARD_AUTH_AUDIENCE (or STEWARD_API_TOKEN, or STEWARD_TRUST_PROXY_HEADERS=true behind an authenticating proxy), listen on a loopback address, or pass --insecure-no-auth"
    )]
    NoAuthentication {
        /// The address.
        addr: std::net::SocketAddr,
    },
    /// Proxy headers trusted on a non-loopback listen address without the opt-in.
    #[error(
        "refusing to trust X-User-* headers on {addr}: any client that reaches it directly could name itself anyone; listen on a loopback address, have the proxy send STEWARD_PROXY_SECRET as X-Proxy-Secret, or set STEWARD_PROXY_ONLY_INGRESS=true if only the authenticating proxy can reach it"
    )]
    ProxyHeadersExposed {
        /// The address.
        addr: std::net::SocketAddr,
    },
    /// The OIDC settings cannot be used.
    #[error("invalid OIDC settings")]
    Auth(#[source] crate::http::auth::KeySetError),
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// How the service ended after the shutdown signal.
#[derive(Debug)]
pub struct Stopped {
    /// The supervisor's report.
    pub report: steward_core::ShutdownReport,
    /// Messages saved from the in-process broker to the outbox.
    pub saved_messages: usize,
}

/// Everything the service runs, before it serves.
pub struct Service {
    config: Config,
    db: Database,
    transport: TransportHandle,
    supervisor: Supervisor,
    state: AppState,
    listener: TcpListener,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("listen", &self.listener.local_addr().ok())
            .field("transport", &self.transport.name())
            .finish_non_exhaustive()
    }
}

/// Adds the service's workers to `supervisor`.
fn spawn_workers<F>(
    config: &Config,
    supervisor: &Supervisor,
    db: &Database,
    transport: &TransportHandle,
    templates: &Arc<TemplateRegistry>,
    faults: &F,
) where
    F: FaultPlan,
{
    // The workers' own pools: HTTP load cannot take their connections.
    let store = db.store().for_workers();
    let updater_config = UpdaterConfig::default().with_max_deliveries(config.max_deliveries);
    let airlock_queues = AirlockQueues {
        status_changed: config.airlock_status_changed_queue.clone(),
        notification: config.airlock_notification_queue.clone(),
    };
    let recipients =
        Arc::new(StaticRecipients::new(config.airlock_recipients.clone().unwrap_or_default()));

    supervisor.spawn(DatabaseWatcher::new(db.clone()));
    supervisor.spawn(TransportWatcher::new(transport.clone()));
    supervisor.spawn(PauseFollower::new(db.clone(), supervisor.controls()));

    let deployment = DeploymentStatusHandler::new(store.clone(), templates.clone())
        .with_queue(config.deployment_status_queue.clone())
        .with_resource_request_queue(config.resource_request_queue.clone());
    faults.spawn_updater(
        supervisor,
        db,
        names::DEPLOYMENT_STATUS,
        transport.connect(&config.deployment_status_queue),
        deployment,
        updater_config.clone(),
    );
    let airlock = AirlockStatusHandler::new(store.clone(), recipients)
        .with_queue(config.step_result_queue.clone())
        .with_airlock_queues(airlock_queues);
    faults.spawn_updater(
        supervisor,
        db,
        names::AIRLOCK_STATUS,
        transport.connect(&config.step_result_queue),
        airlock,
        updater_config.clone(),
    );
    faults.spawn(
        supervisor,
        AfterDatabase::new(
            db.clone(),
            PauseGate::new(
                db.clone(),
                supervisor.controls(),
                OutboxWorker::new(store, transport.sink())
                    .with_config(OutboxConfig::default().with_park_after(config.outbox_park_after))
                    .with_producers(supervisor.health()),
            ),
        ),
    );

    if config.simulate_processors() {
        let sink = transport.sink();
        let simulator_config = UpdaterConfig::default().with_wait(Duration::from_secs(1));
        let simulators = [
            Updater::new(
                names::RESOURCE_PROCESSOR,
                transport.connect(&config.resource_request_queue),
                ResourceProcessor::new(sink.clone(), config.deployment_status_queue.clone()),
            ),
            Updater::new(
                names::AIRLOCK_PROCESSOR,
                transport.connect(&config.airlock_status_changed_queue),
                AirlockProcessor::new(sink, config.step_result_queue.clone()),
            ),
            Updater::new(
                names::AIRLOCK_NOTIFIER,
                transport.connect(&config.airlock_notification_queue),
                crate::workers::Notifier,
            ),
        ];
        for simulator in simulators {
            faults.spawn(supervisor, simulator.with_config(simulator_config.clone()));
        }
    }
}

impl Service {
    /// Checks the configuration, builds the transport and the store, starts every
    /// worker and binds the listen address. Nothing is served yet.
    ///
    /// # Errors
    ///
    /// Bad configuration, a broker that refuses the configuration outright, or an
    /// address that cannot be bound.
    pub async fn start(config: Config) -> Result<Service, StartError> {
        let faults = faults::plan(config.faults.as_deref()).map_err(StartError::Faults)?;
        let auth = config.authentication().map_err(StartError::Auth)?;
        let loopback = config.listen.ip().is_loopback();
        let proxy_opt_in = config.proxy_only_ingress || auth.has_proxy_secret();
        if auth.trusts_proxy_headers() && !loopback && !proxy_opt_in {
            return Err(StartError::ProxyHeadersExposed { addr: config.listen });
        }
        if !auth.is_configured() && !loopback && !config.insecure_no_auth {
            return Err(StartError::NoAuthentication { addr: config.listen });
        }
        let templates = Arc::new(TemplateRegistry::load(config.templates_dir.as_deref())?);
        let transport = config.transports.open(config.transport_name()?, &config.topology())?;
        let store_options = config.store_options();
        let load = config.load_limit(store_options.max_connections());
        let store = Store::connect_lazy(store_options).map_err(StartError::Database)?;
        let db = Database::new(store);
        check_broker(&transport).await?;

        let supervisor = Supervisor::new(
            SupervisorConfig::default()
                .with_backoff(Backoff::new(config.restart_backoff, config::RESTART_BACKOFF_MAX))
                .with_intensity(RestartIntensity {
                    max_restarts: config.restart_limit,
                    within: config::RESTART_WINDOW,
                }),
        );
        spawn_workers(&config, &supervisor, &db, &transport, &templates, &faults);

        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Listen { addr: config.listen, source })?;
        let settings = ApiSettings {
            resource_request_queue: config.resource_request_queue.clone(),
            airlock_queues: AirlockQueues {
                status_changed: config.airlock_status_changed_queue.clone(),
                notification: config.airlock_notification_queue.clone(),
            },
            auth,
            metrics_open: config.metrics_open,
            transport: transport.name().to_owned(),
            max_message_bytes: transport.max_message_bytes(),
            load,
            operator: OperatorSettings {
                dead_letters: transport.dead_letter_queues(),
                consumed_queues: config.topology().consumed,
                controls: supervisor.controls(),
            },
        };
        let state = AppState {
            db: db.clone(),
            templates,
            health: supervisor.health(),
            settings: Arc::new(settings),
            metrics: metrics::install(),
        };
        Ok(Service { config, db, transport, supervisor, state, listener })
    }

    /// The address the service listens on (useful with port 0).
    ///
    /// # Errors
    ///
    /// The socket has no local address.
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then shuts down within `STEWARD_DRAIN_TIMEOUT`.
    ///
    /// # Errors
    ///
    /// The HTTP server failed.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<Stopped> {
        let Service { config, db, transport, supervisor, state, listener } = self;
        let addr = listener.local_addr()?;
        tracing::info!(
            address = %format!("http://{addr}"),
            transport = transport.name(),
            database = %config.database_for_log(),
            simulators = config.simulate_processors(),
            "steward-api listening"
        );
        let auth = &state.settings.auth;
        if auth.is_configured() {
            tracing::info!(authentication = %auth.describe(), "callers are authenticated");
        } else {
            tracing::warn!(authentication = %auth.describe(), "no authentication configured: every caller is the development admin");
        }
        let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
        let server = axum::serve(listener, crate::http::router(state))
            .with_graceful_shutdown(async move {
                let _ = http_stopped.await;
            })
            .into_future();
        tokio::pin!(server);
        tokio::select! {
            result = &mut server => {
                result?;
                tracing::warn!("the HTTP server stopped on its own; shutting down");
            }
            () = shutdown => {}
        }
        let started = Instant::now();
        let deadlines = steward_core::Deadlines::until(started + config.drain_timeout);
        tracing::info!(drain_timeout = ?config.drain_timeout, "shutting down: no new requests, draining workers");
        let _ = stop_http.send(());
        // In-flight requests get a short grace; the workers' drain runs meanwhile.
        let (http, report) = tokio::join!(
            tokio::time::timeout_at(deadlines.requests_by(), &mut server),
            supervisor.shutdown(deadlines)
        );
        if let Ok(Err(error)) = http {
            tracing::warn!(error = %steward_core::error_chain(&error), "the HTTP server stopped with an error");
        }
        if report.is_clean() {
            tracing::info!(stopped = ?report.stopped, "workers stopped");
        } else {
            tracing::warn!(?report, "workers did not all stop cleanly");
        }
        // What follows must not keep the process past its close-by deadline: a request
        // still holding a connection, or a database that stopped answering.
        let last = deadlines.close_by();
        let saved = tokio::time::timeout_at(last, save_queued(&transport, &db));
        let saved_messages = saved.await.unwrap_or_else(|_| {
            tracing::error!(
                "saving the queued in-process messages did not finish by the shutdown deadline; they are lost"
            );
            0
        });
        if tokio::time::timeout_at(last, db.store().close()).await.is_err() {
            tracing::warn!(
                "database connections were still in use at the shutdown deadline; exiting without waiting for them"
            );
        }
        tracing::info!(elapsed = ?started.elapsed(), "steward-api stopped");
        Ok(Stopped { report, saved_messages })
    }
}

/// Tries the broker once at start: a refusal that needs a human stops the start; an
/// unreachable broker does not (the workers back off until it answers).
async fn check_broker(transport: &TransportHandle) -> Result<(), StartError> {
    match tokio::time::timeout(Duration::from_secs(10), transport.check()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) if !error.is_retryable() => {
            Err(StartError::Broker { transport: transport.name().to_owned(), source: error })
        }
        Ok(Err(error)) => {
            tracing::warn!(transport = transport.name(), error = %error_chain(&error), "the broker is not reachable yet; workers will retry");
            Ok(())
        }
        Err(_) => {
            tracing::warn!(
                transport = transport.name(),
                "the broker did not answer within 10 s; workers will retry"
            );
            Ok(())
        }
    }
}

/// Moves every message the transport still holds (only an in-process broker has any)
/// into the outbox, so the next start sends them again: a graceful restart loses nothing.
async fn save_queued(transport: &TransportHandle, db: &Database) -> usize {
    let messages = transport.take_queued();
    if messages.is_empty() {
        return 0;
    }
    let saved = async {
        let store = db.ready().await?;
        let mut tx = store.begin().await?;
        for (queue, message) in &messages {
            let mut outgoing = OutgoingMessage::new(message.body.clone());
            outgoing.session_id.clone_from(&message.session_id);
            outgoing.correlation_id.clone_from(&message.correlation_id);
            outgoing.content_type.clone_from(&message.content_type);
            outgoing.properties.clone_from(&message.properties);
            let aggregate_id = message.session_id.clone().unwrap_or_else(|| message.id.clone());
            let outbox = OutboxMessage::new(queue.clone(), outgoing, aggregate_id);
            tx.insert_outbox(outbox).await?;
        }
        tx.commit().await
    };
    match tokio::time::timeout(Duration::from_secs(5), saved).await {
        Ok(Ok(())) => {
            tracing::info!(
                messages = messages.len(),
                "saved queued in-process messages to the outbox for the next start"
            );
            messages.len()
        }
        Ok(Err(error)) => {
            tracing::error!(messages = messages.len(), error = %error_chain(&error), "could not save queued in-process messages; they are lost");
            0
        }
        Err(_) => {
            tracing::error!(
                messages = messages.len(),
                "saving queued in-process messages timed out; they are lost"
            );
            0
        }
    }
}
