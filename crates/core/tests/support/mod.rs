//! Shared helpers for the Updater and Supervisor tests.

#![allow(dead_code, clippy::unwrap_used, unreachable_pub)]

use std::future::Future;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use steward_core::handler_fn;
use steward_core::{
    Backoff, Capabilities, Delivery, Handler, HealthHandle, Jitter, Message, MessageSink,
    MessageSource, Outcome, OutgoingMessage, Supervisor, SupervisorConfig, TransportError,
    UpdaterConfig, Worker, WorkerHealth,
};
use steward_inmem::{InMemoryBroker, QueueOptions};
use tokio::time::Instant;

pub const QUEUE: &str = "jobs";

/// A strict broker with `QUEUE` declared with this lock duration.
pub fn broker(lock: Duration) -> InMemoryBroker {
    let broker = InMemoryBroker::builder().with_strict(true).build();
    broker.declare_queue(QUEUE, QueueOptions::default().with_lock_duration(lock));
    broker
}

pub async fn send(broker: &InMemoryBroker, id: &str, session: Option<&str>) {
    let mut message = OutgoingMessage::new(id.to_owned()).with_message_id(id);
    message.session_id = session.map(str::to_owned);
    broker.send(QUEUE, message).await.unwrap();
}

/// Small, fast settings for tests: 1 s waits, no retry jitter.
pub fn config() -> UpdaterConfig {
    UpdaterConfig::default()
        .with_wait(Duration::from_secs(1))
        .with_retry_backoff(
            Backoff::new(Duration::from_secs(1), Duration::from_secs(60))
                .with_jitter(Jitter::none()),
        )
        .with_probe_backoff(
            Backoff::new(Duration::from_secs(1), Duration::from_secs(8))
                .with_jitter(Jitter::none()),
        )
}

/// A supervisor whose restart backoff has no jitter.
pub fn supervisor() -> Supervisor {
    Supervisor::new(SupervisorConfig::default().with_backoff(
        Backoff::new(Duration::from_secs(1), Duration::from_secs(300)).with_jitter(Jitter::none()),
    ))
}

/// A [`supervisor`] running `worker`, and its health.
pub fn supervise(worker: impl Worker) -> (Supervisor, HealthHandle) {
    let supervisor = supervisor();
    supervisor.spawn(worker);
    let health = supervisor.health();
    (supervisor, health)
}

pub fn worker(health: &HealthHandle, name: &str) -> WorkerHealth {
    health.snapshot().worker(name).cloned().unwrap()
}

/// Polls `condition` every 10 ms (of tokio time) until it holds, or panics after `within`.
pub async fn eventually(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Implements `MessageSource` for `$wrapper<S>`, a wrapper of the source at
/// `self.$inner`: `queue` and `stop_receiving` pass through, and so do `capabilities`
/// and `receive` unless given: `capabilities: c => <expr of the inner's c>` changes what
/// the source claims, a `receive` item replaces the inner's.
macro_rules! wrap_source {
    ($wrapper:ident . $inner:tt, capabilities: $c:ident => $caps:expr) => {
        $crate::support::wrap_source!(@impl $wrapper . $inner, [$c => $caps],
            async fn receive(
                &self,
                max: usize,
                wait: Duration,
            ) -> Result<Vec<Delivery>, TransportError> {
                self.$inner.receive(max, wait).await
            }
        );
    };
    ($wrapper:ident . $inner:tt, capabilities: $c:ident => $caps:expr, $receive:item) => {
        $crate::support::wrap_source!(@impl $wrapper . $inner, [$c => $caps], $receive);
    };
    ($wrapper:ident . $inner:tt, $receive:item) => {
        $crate::support::wrap_source!(@impl $wrapper . $inner, [c => c], $receive);
    };
    (@impl $wrapper:ident . $inner:tt, [$c:ident => $caps:expr], $receive:item) => {
        #[async_trait::async_trait]
        impl<S: MessageSource> MessageSource for $wrapper<S> {
            fn queue(&self) -> &str {
                self.$inner.queue()
            }

            fn capabilities(&self) -> Capabilities {
                let $c = self.$inner.capabilities();
                $caps
            }

            $receive

            async fn stop_receiving(&self) -> Result<(), TransportError> {
                self.$inner.stop_receiving().await
            }
        }
    };
}
pub(crate) use wrap_source;

/// Wraps a source to hide the broker's sessions: messages carry their ordering key in
/// property `session` and the source claims no session support, so ordering is the
/// updater's job, as on a transport without sessions.
pub struct LocalSessions<S>(pub S);

wrap_source!(
    LocalSessions.0,
    capabilities: c => Capabilities { sessions: false, ..c },
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, TransportError> {
        let batch = self.0.receive(max, wait).await?;
        Ok(map_messages(batch, |message| {
            message.session_id = message.properties.get("session").cloned();
        }))
    }
);

/// A [`broker`] with this lock duration, holding the messages `ids` (sent in order,
/// without sessions).
pub async fn broker_holding(lock: Duration, ids: &[&str]) -> InMemoryBroker {
    let broker = broker(lock);
    for id in ids {
        send(&broker, id, None).await;
    }
    broker
}

/// A [`broker`] with this lock duration, holding the `(id, session)` messages sent in
/// order with [`send_local_session`].
pub async fn broker_holding_local_sessions(
    lock: Duration,
    messages: &[(&str, &str)],
) -> InMemoryBroker {
    let broker = broker(lock);
    for (id, session) in messages {
        send_local_session(&broker, id, session).await;
    }
    broker
}

/// A handler that records each call, as `record` describes it, in `calls`, and then
/// answers as `then` does.
pub fn recorded<T, R, F, Fut>(calls: &Arc<Mutex<Vec<T>>>, record: R, then: F) -> impl Handler
where
    T: Send + 'static,
    R: Fn(&Message) -> T + Send + Sync + 'static,
    F: Fn(Arc<Message>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let calls = calls.clone();
    handler_fn(move |message| {
        calls.lock().unwrap().push(record(&message));
        then(message)
    })
}

/// `batch` with `change` applied to each message, keeping the settlement handles.
pub fn map_messages(batch: Vec<Delivery>, change: impl Fn(&mut Message)) -> Vec<Delivery> {
    batch
        .into_iter()
        .map(|delivery| {
            delivery.map_message(|mut message| {
                change(&mut message);
                message
            })
        })
        .collect()
}

pub async fn send_local_session(broker: &InMemoryBroker, id: &str, session: &str) {
    let message =
        OutgoingMessage::new(id.to_owned()).with_message_id(id).with_property("session", session);
    broker.send(QUEUE, message).await.unwrap();
}

/// Wraps a source to record when each receive was called.
pub struct Timed<S> {
    pub inner: S,
    pub calls: Arc<Mutex<Vec<Instant>>>,
}

wrap_source!(
    Timed.inner,
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, TransportError> {
        self.calls.lock().unwrap().push(Instant::now());
        self.inner.receive(max, wait).await
    }
);

/// Makes a source that returns at once honour `wait` when it has nothing, as the
/// `MessageSource` contract demands (for mocks).
pub struct Paced<S>(pub S);

wrap_source!(
    Paced.0,
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, TransportError> {
        let batch = self.0.receive(max, wait).await?;
        if batch.is_empty() {
            tokio::time::sleep(wait).await;
        }
        Ok(batch)
    }
);

/// Captures the log lines a test's thread writes, for asserting on them.
///
/// Tests share one process under `cargo test`, and tracing caches per call site, for the
/// whole process, whether anyone listens; a subscriber scoped to one test's thread then
/// misses events whose call site another test reached first. So one process-wide
/// subscriber takes every event, and writes it to the capture installed on the thread
/// that emitted it (with the paused, current-thread runtime of these tests, the test's
/// own tasks), or nowhere.
#[derive(Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

thread_local! {
    static THREAD_CAPTURE: std::cell::RefCell<Option<LogCapture>> =
        const { std::cell::RefCell::new(None) };
}

/// Removes the thread's capture when dropped.
pub struct CaptureGuard(std::marker::PhantomData<*const ()>);

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        THREAD_CAPTURE.with(|capture| capture.borrow_mut().take());
    }
}

/// The process-wide subscriber's writer: the emitting thread's capture, if any.
struct ThreadWriter(Option<LogCapture>);

impl Write for ThreadWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.0 {
            Some(capture) => capture.write(buf),
            None => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    /// Routes what this thread logs (at debug and above) here, until the guard drops.
    ///
    /// # Panics
    ///
    /// When another global subscriber is already installed.
    pub fn install(&self) -> CaptureGuard {
        static GLOBAL: std::sync::Once = std::sync::Once::new();
        GLOBAL.call_once(|| {
            let subscriber = tracing_subscriber::fmt()
                .with_writer(|| ThreadWriter(THREAD_CAPTURE.with(|c| c.borrow().clone())))
                .with_ansi(false)
                .with_max_level(tracing::Level::DEBUG)
                .finish();
            tracing::subscriber::set_global_default(subscriber)
                .expect("no other global subscriber in the test process");
        });
        THREAD_CAPTURE.with(|capture| *capture.borrow_mut() = Some(self.clone()));
        CaptureGuard(std::marker::PhantomData)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Settlement and renewal faults for [`Faulty`], each armed for a number of calls on
/// one message id (every delivery of it).
#[derive(Default)]
pub struct SettleFaults {
    /// `(message id, calls)`: `complete` never returns.
    pub hang_complete: Mutex<Vec<(String, u32)>>,
    /// `(message id, calls)`: `complete` fails with a connection error, leaving the
    /// message locked.
    pub fail_complete: Mutex<Vec<(String, u32)>>,
    /// `(message id, calls)`: `renew_lock` reports the lock lost.
    pub lose_renewal: Mutex<Vec<(String, u32)>>,
    /// `(message id, calls)`: `renew_lock` never returns.
    pub hang_renewal: Mutex<Vec<(String, u32)>>,
    /// `(message id, calls)`: `renew_lock` fails with a connection error.
    pub fail_renewal: Mutex<Vec<(String, u32)>>,
    /// `(message id, calls)`: `renew_lock` answers with an expiry that is not in the
    /// future (a skewed clock).
    pub stale_renewal: Mutex<Vec<(String, u32)>>,
    /// How many times `renew_lock` was called, faults included.
    pub renewals: std::sync::atomic::AtomicUsize,
    /// Every `abandon`: the message id and the delay asked for.
    pub abandons: Mutex<Vec<(String, Option<Duration>)>>,
    /// Every lock expiry is reported this much before the broker's real one (as a
    /// transport counting its lock from the start of a long poll does).
    pub reports_early: Mutex<Duration>,
}

impl SettleFaults {
    pub fn arm(list: &Mutex<Vec<(String, u32)>>, id: &str, calls: u32) {
        list.lock().unwrap().push((id.to_owned(), calls));
    }

    /// `until` as reported: [`Self::reports_early`] before it.
    fn early(&self, until: Instant) -> Instant {
        let early = *self.reports_early.lock().unwrap();
        until.checked_sub(early).unwrap_or(until)
    }

    /// Whether a fault of `list` fires for `id` now (using up one call).
    fn fires(list: &Mutex<Vec<(String, u32)>>, id: &str) -> bool {
        let mut list = list.lock().unwrap();
        match list.iter_mut().find(|(i, n)| i == id && *n > 0) {
            Some((_, n)) => {
                *n -= 1;
                true
            }
            None => false,
        }
    }
}

/// Wraps a source so that settlements and renewals of its deliveries obey `faults`;
/// everything else goes to the real delivery.
pub struct Faulty<S> {
    pub inner: S,
    pub faults: Arc<SettleFaults>,
}

struct FaultySettle {
    id: String,
    inner: tokio::sync::Mutex<Option<Delivery>>,
    until: Mutex<Option<Instant>>,
    faults: Arc<SettleFaults>,
}

#[async_trait]
impl steward_core::Settle for FaultySettle {
    fn locked_until(&self) -> Option<Instant> {
        *self.until.lock().unwrap()
    }

    async fn renew_lock(&self) -> Result<Option<Instant>, TransportError> {
        self.faults.renewals.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if SettleFaults::fires(&self.faults.stale_renewal, &self.id) {
            return Ok(Some(Instant::now()));
        }
        if SettleFaults::fires(&self.faults.fail_renewal, &self.id) {
            return Err(TransportError::connection("renewal failed (injected)"));
        }
        if SettleFaults::fires(&self.faults.hang_renewal, &self.id) {
            std::future::pending::<()>().await;
        }
        if SettleFaults::fires(&self.faults.lose_renewal, &self.id) {
            return Err(TransportError::lock_lost(self.id.clone()));
        }
        let inner = self.inner.lock().await;
        let Some(delivery) = inner.as_ref() else {
            return Err(TransportError::lock_lost(self.id.clone()));
        };
        let until = delivery.renew_lock().await?.map(|until| self.faults.early(until));
        *self.until.lock().unwrap() = until;
        Ok(until)
    }

    async fn complete(&self) -> Result<(), TransportError> {
        if SettleFaults::fires(&self.faults.hang_complete, &self.id) {
            std::future::pending::<()>().await;
        }
        if SettleFaults::fires(&self.faults.fail_complete, &self.id) {
            return Err(TransportError::connection("complete failed (injected)"));
        }
        match self.inner.lock().await.take() {
            Some(delivery) => delivery.complete().await,
            None => Err(TransportError::lock_lost(self.id.clone())),
        }
    }

    async fn abandon(&self, delay: Option<Duration>) -> Result<(), TransportError> {
        self.faults.abandons.lock().unwrap().push((self.id.clone(), delay));
        match self.inner.lock().await.take() {
            Some(delivery) => delivery.abandon(delay).await,
            None => Err(TransportError::lock_lost(self.id.clone())),
        }
    }

    async fn dead_letter(&self, reason: &str, description: &str) -> Result<(), TransportError> {
        match self.inner.lock().await.take() {
            Some(delivery) => delivery.dead_letter(reason, description).await,
            None => Err(TransportError::lock_lost(self.id.clone())),
        }
    }
}

wrap_source!(
    Faulty.inner,
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, TransportError> {
        let batch = self.inner.receive(max, wait).await?;
        Ok(batch
            .into_iter()
            .map(|delivery| {
                let message = (**delivery.message()).clone();
                let settle = FaultySettle {
                    id: message.id.clone(),
                    until: Mutex::new(delivery.locked_until().map(|u| self.faults.early(u))),
                    inner: tokio::sync::Mutex::new(Some(delivery)),
                    faults: self.faults.clone(),
                };
                Delivery::new(message, settle)
            })
            .collect())
    }
);

/// Wraps a source to claim no delayed abandon, so the updater holds delayed retries
/// itself.
pub struct WithoutDelayedAbandon<S>(pub S);

wrap_source!(
    WithoutDelayedAbandon.0,
    capabilities: c => Capabilities { delayed_abandon: false, ..c }
);
