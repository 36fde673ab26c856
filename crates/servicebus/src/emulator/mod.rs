#![doc = include_str!("../../docs/emulator.md")]

mod faults;
mod properties;
mod rest;
mod sas;
mod server;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use axum::http::StatusCode;
use steward_inmem::{InMemoryBroker, QueueOptions};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use faults::{Faults, Operation};
pub use properties::{META_PROPERTY, format_date, parse_date};
pub use sas::sas_token;

/// The lock duration of queues unless configured: Service Bus's default.
pub const DEFAULT_LOCK_DURATION: Duration = Duration::from_secs(60);
/// The maximum delivery count of queues unless configured: Service Bus's default.
pub const DEFAULT_MAX_DELIVERY_COUNT: u32 = 10;
/// The largest message body accepted unless configured: the Standard tier's 256 KB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// How long a receive without a `timeout` parameter waits on an empty queue.
pub const DEFAULT_RECEIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest lock duration and receive wait the emulator takes (the service allows
/// locks of at most 5 minutes; longer ones are allowed here for experiments).
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// Why an emulator could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmulatorError {
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is not usable.
    #[error("invalid emulator configuration: {0}")]
    Config(String),
}

/// The entry point: [`Emulator::builder`].
#[derive(Debug, Clone, Copy)]
pub struct Emulator;

impl Emulator {
    /// Starts configuring an emulator that listens on `127.0.0.1` on a free port, without
    /// authentication, with Service Bus's default lock duration (60 s) and maximum
    /// delivery count (10), creating queues on first use.
    pub fn builder() -> EmulatorBuilder {
        EmulatorBuilder::default()
    }
}

/// Configures and starts an emulator; see [`Emulator::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct EmulatorBuilder {
    listen: SocketAddr,
    /// The accepted keys and tokens (its `Debug` shows key names only).
    auth: sas::Authenticator,
    lock_duration: Duration,
    max_delivery_count: u32,
    session_queues: BTreeSet<String>,
    queues: BTreeSet<String>,
    auto_create_queues: bool,
    max_message_bytes: usize,
    default_receive_timeout: Duration,
}

impl Default for EmulatorBuilder {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            auth: sas::Authenticator::default(),
            lock_duration: DEFAULT_LOCK_DURATION,
            max_delivery_count: DEFAULT_MAX_DELIVERY_COUNT,
            session_queues: BTreeSet::new(),
            queues: BTreeSet::new(),
            auto_create_queues: true,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            default_receive_timeout: DEFAULT_RECEIVE_TIMEOUT,
        }
    }
}

impl EmulatorBuilder {
    /// The address to listen on. Default `127.0.0.1:0` (a free port).
    pub fn with_listen_addr(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Accepts shared access signatures made with the key `key` named `name` (a
    /// namespace's "shared access policy"). Can be given several times. Once any key or
    /// bearer token is configured, requests without valid credentials get 401.
    pub fn with_sas_key(mut self, name: impl Into<String>, key: impl Into<String>) -> Self {
        self.auth.add_key(name.into(), key.into());
        self
    }

    /// Accepts `Authorization: Bearer <token>` with exactly this token (a stand-in for
    /// Entra ID tokens, whose signatures the emulator does not check).
    pub fn with_bearer_token(mut self, token: impl Into<String>) -> Self {
        self.auth.add_bearer_token(token.into());
        self
    }

    /// How long a peek-lock holds a message, for every queue. Default 60 s.
    pub fn with_lock_duration(mut self, lock_duration: Duration) -> Self {
        self.lock_duration = lock_duration;
        self
    }

    /// After this many deliveries, a message whose lock expires or is released goes to
    /// the dead-letter queue with reason `MaxDeliveryCountExceeded`. Default 10; at
    /// least 1.
    pub fn with_max_delivery_count(mut self, max: u32) -> Self {
        self.max_delivery_count = max;
        self
    }

    /// Creates `queue` as a session-enabled queue.
    pub fn with_session_queue(mut self, queue: impl Into<String>) -> Self {
        self.session_queues.insert(queue.into());
        self
    }

    /// Creates `queue` at start (needed when queues are not created on first use).
    pub fn with_queue(mut self, queue: impl Into<String>) -> Self {
        self.queues.insert(queue.into());
        self
    }

    /// Whether queues are created on first use (the default). When off, only queues
    /// given to [`with_queue`](Self::with_queue) or [`with_session_queue`](Self::with_session_queue) exist
    /// and others answer 410 Gone, as a namespace does.
    pub fn with_auto_create_queues(mut self, auto_create: bool) -> Self {
        self.auto_create_queues = auto_create;
        self
    }

    /// The largest message body accepted; larger ones get 413. Default 256 KB.
    pub fn with_max_message_bytes(mut self, max: usize) -> Self {
        self.max_message_bytes = max;
        self
    }

    /// How long a receive without a `timeout` parameter waits. Default 60 s; at most
    /// [`MAX_DURATION`].
    pub fn with_default_receive_timeout(mut self, timeout: Duration) -> Self {
        self.default_receive_timeout = timeout;
        self
    }

    /// Binds the listening socket and starts serving in the background on the current
    /// tokio runtime.
    ///
    /// # Errors
    ///
    /// [`EmulatorError::Bind`] when the address cannot be bound;
    /// [`EmulatorError::Config`] for a maximum delivery count of 0, a lock duration of
    /// zero or over [`MAX_DURATION`], or a queue name that cannot be one.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: nothing runs until the socket is bound.
    pub async fn start(self) -> Result<EmulatorHandle, EmulatorError> {
        if self.max_delivery_count == 0 {
            return Err(EmulatorError::Config(
                "the maximum delivery count must be at least 1".into(),
            ));
        }
        if self.lock_duration.is_zero() || self.lock_duration > MAX_DURATION {
            return Err(EmulatorError::Config(format!(
                "the lock duration must be more than zero and at most {MAX_DURATION:?}"
            )));
        }
        for queue in self.queues.iter().chain(&self.session_queues) {
            if queue.is_empty()
                || queue.starts_with('/')
                || queue.ends_with('/')
                || queue.contains('$')
            {
                return Err(EmulatorError::Config(format!("{queue:?} is not a queue name")));
            }
        }
        let options = QueueOptions::default()
            .with_lock_duration(self.lock_duration)
            .with_max_delivery_count(self.max_delivery_count);
        let broker = InMemoryBroker::builder()
            .with_strict(!self.auto_create_queues)
            .with_default_queue_options(options.clone())
            .build();
        for queue in self.queues.iter().chain(&self.session_queues) {
            broker.declare_queue(queue, options.clone());
        }

        let listener = TcpListener::bind(self.listen)
            .await
            .map_err(|source| EmulatorError::Bind { addr: self.listen, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| EmulatorError::Bind { addr: self.listen, source })?;

        let auth = self.auth;
        let faults = Faults::default();
        let shutdown = CancellationToken::new();
        let shared = Arc::new(rest::Shared {
            broker: broker.clone(),
            auth,
            faults: faults.clone(),
            session_queues: self.session_queues.into_iter().collect(),
            max_message_bytes: self.max_message_bytes,
            default_receive_timeout: self.default_receive_timeout.min(MAX_DURATION),
            local_addr: addr,
            shutdown: shutdown.clone(),
        });
        let connections = Arc::new(AtomicU64::new(0));
        let server = tokio::spawn(server::serve(
            listener,
            rest::router(shared),
            connections.clone(),
            shutdown.clone(),
        ));
        tracing::debug!(%addr, "service bus emulator started");
        Ok(EmulatorHandle { addr, broker, faults, connections, shutdown, server: Some(server) })
    }
}

/// A running emulator. Dropping it stops the emulator (without waiting);
/// [`shutdown`](Self::shutdown) stops it and waits.
#[must_use = "the emulator stops when its handle is dropped"]
#[derive(Debug)]
pub struct EmulatorHandle {
    addr: SocketAddr,
    broker: InMemoryBroker,
    faults: Faults,
    connections: Arc<AtomicU64>,
    shutdown: CancellationToken,
    server: Option<JoinHandle<()>>,
}

impl EmulatorHandle {
    /// The address the emulator listens on.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL to give clients in place of `https://<namespace>.servicebus.windows.net`:
    /// `http://<addr>`.
    #[must_use]
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The broker behind the emulator, for setting up and inspecting queues directly.
    #[must_use]
    pub fn broker(&self) -> &InMemoryBroker {
        &self.broker
    }

    /// Fault injection at the HTTP level.
    #[must_use]
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// How many TCP connections the emulator has accepted since it started.
    #[must_use]
    pub fn connection_count(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Stops accepting connections, ends waiting receives, lets requests in flight
    /// finish (for at most a few seconds) and waits until the server has stopped.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: the emulator stops either way; only the wait is cut short.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            if let Err(error) = server.await {
                tracing::warn!(%error, "the emulator's server task failed");
            }
        }
        tracing::debug!(addr = %self.addr, "service bus emulator stopped");
    }
}

impl Drop for EmulatorHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::Emulator;

    #[test]
    fn builder_debug_shows_key_names_but_no_keys_or_tokens() {
        let builder = Emulator::builder()
            .with_sas_key("RootManageSharedAccessKey", "k3y")
            .with_bearer_token("t0ken");
        let debug = format!("{builder:?}");
        assert!(debug.contains("RootManageSharedAccessKey"), "{debug}");
        assert!(!debug.contains("k3y") && !debug.contains("t0ken"), "{debug}");
    }
}
