//! The simulated world around the Updater: an event log, and recording wrappers for the
//! connection, the source, each delivery's settlement and the handler.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use steward_core::{
    BoxError, Capabilities, Connect, Delivery, ErrorKind, Handler, Message, MessageSource, Outcome,
    Settle, TransportError, WorkerState,
};
use steward_inmem::InMemoryBroker;
use tokio::sync::Notify;
use tokio::time::{Instant, sleep};

use crate::scenario::Step;

/// The queue every scenario uses.
pub(crate) const QUEUE: &str = "jobs";

/// The most events one seed may log; more means the schedule spins without time
/// passing (a livelock), and the seed stops there.
pub(crate) const MAX_EVENTS: usize = 200_000;

/// A delivery: a message id and its delivery count (unique per delivery on inmem).
pub(crate) type Key = (String, u32);

/// A broker call on a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// `renew_lock`.
    Renew,
    /// `complete`.
    Complete,
    /// `abandon`.
    Abandon,
    /// `dead_letter`.
    DeadLetter,
}

/// How a handler run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// It returned `Complete`.
    Complete,
    /// It returned a retry for the message.
    Retry,
    /// It returned a retry for a failing dependency.
    Dependency,
    /// It returned `DeadLetter`.
    DeadLetter,
    /// It panicked.
    Panicked,
    /// Its task was dropped before it returned (aborted).
    Dropped,
}

/// What happened, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// The scenario sent a message.
    Sent { id: String, session: Option<String> },
    /// The Updater (re)connected: attempt `attempt`, refused or not.
    Connect { attempt: u32, refused: bool },
    /// A receive returned these deliveries.
    Received { keys: Vec<Key>, until: Vec<Option<Instant>> },
    /// A receive failed.
    ReceiveFailed { error: String },
    /// A handler started on a delivery.
    Start { key: Key, step: String },
    /// A handler run ended.
    Finish { key: Key, end: End },
    /// A broker call on a delivery began.
    Call { call: u64, key: Key, op: Op, detail: String },
    /// It answered; for a renewal, `until` is the new lock expiry.
    Answer { call: u64, error: Option<ErrorKind>, until: Option<Instant> },
    /// It was dropped before answering.
    CallDropped { call: u64 },
    /// A fault was switched on (or a moment's fault happened).
    FaultOn { fault: String, releases_locks: bool },
    /// A fault window ended.
    FaultOff { fault: String },
    /// The worker's state changed.
    State { state: WorkerState },
    /// The shutdown began, to end by `deadline`.
    ShutdownStart { deadline: Instant },
    /// The shutdown returned.
    ShutdownEnd { report: String },
    /// A probe of the dependency answered.
    Probe { ok: bool },
}

/// The event log of one seed, in order, each with the moment it happened.
#[derive(Clone)]
pub(crate) struct Log {
    inner: Arc<Mutex<LogInner>>,
    overflow: Arc<Notify>,
    start: Instant,
}

struct LogInner {
    events: Vec<(Instant, Event)>,
    next_call: u64,
}

impl fmt::Debug for Log {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Log").finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Log {
    /// An empty log; times are measured from now.
    #[must_use]
    pub(crate) fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(LogInner { events: Vec::new(), next_call: 0 })),
            overflow: Arc::new(Notify::new()),
            start: Instant::now(),
        }
    }

    /// When the log began.
    #[must_use]
    pub(crate) fn start(&self) -> Instant {
        self.start
    }

    /// Appends an event at the current moment.
    pub(crate) fn push(&self, event: Event) {
        let mut inner = lock(&self.inner);
        if inner.events.len() < MAX_EVENTS {
            inner.events.push((Instant::now(), event));
        }
        if inner.events.len() == MAX_EVENTS {
            self.overflow.notify_one();
        }
    }

    /// Waits until the log is full.
    pub(crate) async fn overflowed(&self) {
        self.overflow.notified().await;
    }

    fn next_call(&self) -> u64 {
        let mut inner = lock(&self.inner);
        inner.next_call += 1;
        inner.next_call
    }

    /// The events so far.
    #[must_use]
    pub(crate) fn events(&self) -> Vec<(Instant, Event)> {
        lock(&self.inner).events.clone()
    }
}

impl Default for Log {
    fn default() -> Self {
        Self::new()
    }
}

/// Connects a new recording source on every (re)start; refuses connects on demand.
pub(crate) struct SimConnect {
    /// The broker.
    pub(crate) broker: InMemoryBroker,
    /// The log.
    pub(crate) log: Log,
    /// How many more connects fail with a retryable error.
    pub(crate) refuse: Arc<AtomicU32>,
    /// Until this moment every connect fails with a retryable error.
    pub(crate) refuse_until: Option<Instant>,
    /// Every connect fails with a non-retryable error.
    pub(crate) fatal: bool,
    /// Connects so far.
    pub(crate) attempts: AtomicU32,
    /// A deliberately broken transport, to show the checks catch it.
    pub(crate) sabotage: Option<Sabotage>,
    /// The sources claim no delayed abandon.
    pub(crate) local_delays: bool,
    /// The sources report lock expiries this much too early.
    pub(crate) lock_clock_skew: Option<Duration>,
}

/// A deliberately broken piece, to prove the checks catch what it breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sabotage {
    /// The source completes the first message it receives at the broker and never hands
    /// it over: a lost message.
    LoseFirstMessage,
    /// The source expires every lock once, unrecorded, right after the first receive
    /// that returned messages: unexplained redeliveries and lost locks.
    ExpireLocksSilently,
    /// The source expires every lock right after every receive that returned messages:
    /// the Updater receives the same messages again and again without time passing.
    ExpireLocksAlways,
}

#[async_trait]
impl Connect for SimConnect {
    async fn connect(&self) -> Result<Arc<dyn MessageSource>, TransportError> {
        let attempt = self.attempts.fetch_add(1, Ordering::Relaxed) + 1;
        let refused = self.fatal
            || self.refuse_until.is_some_and(|until| Instant::now() < until)
            || self
                .refuse
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok();
        self.log.push(Event::Connect { attempt, refused });
        if self.fatal {
            return Err(TransportError::auth("simulated: credentials refused"));
        }
        if refused {
            return Err(TransportError::connection("simulated: connection refused"));
        }
        let inner = self.broker.source(QUEUE)?;
        Ok(Arc::new(SimSource {
            inner,
            broker: self.broker.clone(),
            log: self.log.clone(),
            sabotage: self.sabotage,
            sabotaged: AtomicU32::new(0),
            local_delays: self.local_delays,
            lock_clock_skew: self.lock_clock_skew,
        }))
    }
}

/// A source that records what it hands out and wraps each delivery's settlement.
struct SimSource {
    inner: steward_inmem::InMemorySource,
    broker: InMemoryBroker,
    log: Log,
    sabotage: Option<Sabotage>,
    sabotaged: AtomicU32,
    local_delays: bool,
    lock_clock_skew: Option<Duration>,
}

#[async_trait]
impl MessageSource for SimSource {
    fn queue(&self) -> &str {
        self.inner.queue()
    }

    fn capabilities(&self) -> Capabilities {
        let caps = self.inner.capabilities();
        Capabilities { delayed_abandon: caps.delayed_abandon && !self.local_delays, ..caps }
    }

    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, TransportError> {
        let batch = match self.inner.receive(max, wait).await {
            Ok(batch) => batch,
            Err(error) => {
                self.log.push(Event::ReceiveFailed { error: error.to_string() });
                return Err(error);
            }
        };
        let mut out = Vec::with_capacity(batch.len());
        for delivery in batch {
            if self.sabotage == Some(Sabotage::LoseFirstMessage)
                && self.sabotaged.fetch_add(1, Ordering::Relaxed) == 0
            {
                // Completed behind the Updater's back, and never logged as received.
                let _ = delivery.complete().await;
                continue;
            }
            out.push(delivery);
        }
        if out.is_empty() {
            return Ok(out);
        }
        let keys = out.iter().map(|d| key(d.message())).collect();
        let until = out.iter().map(Delivery::locked_until).collect();
        self.log.push(Event::Received { keys, until });
        let expire = match self.sabotage {
            Some(Sabotage::ExpireLocksSilently) => {
                self.sabotaged.fetch_add(1, Ordering::Relaxed) == 0
            }
            Some(Sabotage::ExpireLocksAlways) => true,
            _ => false,
        };
        if expire {
            self.broker.faults(QUEUE).expire_locks();
        }
        Ok(out
            .into_iter()
            .map(|delivery| {
                let message = (**delivery.message()).clone();
                let settle = SimSettle {
                    key: key(&message),
                    until: Mutex::new(delivery.locked_until()),
                    skew: self.lock_clock_skew,
                    inner: tokio::sync::Mutex::new(Some(delivery)),
                    log: self.log.clone(),
                };
                Delivery::new(message, settle)
            })
            .collect())
    }

    async fn stop_receiving(&self) -> Result<(), TransportError> {
        self.inner.stop_receiving().await
    }
}

fn key(message: &Message) -> Key {
    (message.id.clone(), message.delivery_count)
}

/// Logs an event if dropped before it is disarmed: a call that never answered, a run
/// whose handler never returned.
struct LogOnDrop {
    log: Log,
    event: Option<Event>,
}

impl LogOnDrop {
    fn new(log: &Log, event: Event) -> Self {
        Self { log: log.clone(), event: Some(event) }
    }

    fn disarm(&mut self) {
        self.event = None;
    }
}

impl Drop for LogOnDrop {
    fn drop(&mut self) {
        if let Some(event) = self.event.take() {
            self.log.push(event);
        }
    }
}

/// A delivery's settlement handle that records every call and its answer.
struct SimSettle {
    key: Key,
    /// The broker's real lock expiry; the event log records this one.
    until: Mutex<Option<Instant>>,
    /// How much earlier than the real expiry the Updater is told.
    skew: Option<Duration>,
    inner: tokio::sync::Mutex<Option<Delivery>>,
    log: Log,
}

impl SimSettle {
    /// Logs the call; the guard logs its drop if it never answers.
    fn begin(&self, op: Op, detail: String) -> (u64, LogOnDrop) {
        let call = self.log.next_call();
        self.log.push(Event::Call { call, key: self.key.clone(), op, detail });
        (call, LogOnDrop::new(&self.log, Event::CallDropped { call }))
    }

    fn answer<T>(
        &self,
        (call, mut guard): (u64, LogOnDrop),
        result: &Result<T, TransportError>,
        until: Option<Instant>,
    ) {
        guard.disarm();
        let error = result.as_ref().err().map(TransportError::kind);
        self.log.push(Event::Answer { call, error, until });
    }

    /// What the Updater is told of an expiry: the real one, less any clock skew.
    fn reported(&self, until: Instant) -> Instant {
        self.skew.and_then(|skew| until.checked_sub(skew)).unwrap_or(until)
    }

    async fn take(&self) -> Result<Delivery, TransportError> {
        self.inner
            .lock()
            .await
            .take()
            .ok_or_else(|| TransportError::other("simulated: delivery settled twice"))
    }
}

#[async_trait]
impl Settle for SimSettle {
    fn locked_until(&self) -> Option<Instant> {
        lock(&self.until).map(|until| self.reported(until))
    }

    async fn renew_lock(&self) -> Result<Option<Instant>, TransportError> {
        let guard = self.begin(Op::Renew, String::new());
        let result = {
            let inner = self.inner.lock().await;
            match inner.as_ref() {
                Some(delivery) => delivery.renew_lock().await,
                None => Err(TransportError::other("simulated: renewal after settlement")),
            }
        };
        let until = result.as_ref().ok().copied().flatten();
        if let Some(until) = until {
            *lock(&self.until) = Some(until);
        }
        self.answer(guard, &result, until);
        result.map(|until| until.map(|until| self.reported(until)))
    }

    async fn complete(&self) -> Result<(), TransportError> {
        let guard = self.begin(Op::Complete, String::new());
        let result = match self.take().await {
            Ok(delivery) => delivery.complete().await,
            Err(error) => Err(error),
        };
        self.answer(guard, &result, None);
        result
    }

    async fn abandon(&self, delay: Option<Duration>) -> Result<(), TransportError> {
        let detail = delay.map(|d| format!("delay {}ms", d.as_millis())).unwrap_or_default();
        let guard = self.begin(Op::Abandon, detail);
        let result = match self.take().await {
            Ok(delivery) => delivery.abandon(delay).await,
            Err(error) => Err(error),
        };
        self.answer(guard, &result, None);
        result
    }

    async fn dead_letter(&self, reason: &str, description: &str) -> Result<(), TransportError> {
        let guard = self.begin(Op::DeadLetter, reason.to_owned());
        let result = match self.take().await {
            Ok(delivery) => delivery.dead_letter(reason, description).await,
            Err(error) => Err(error),
        };
        self.answer(guard, &result, None);
        result
    }
}

/// The handler: plays each message's script, one step per handling.
pub(crate) struct SimHandler {
    /// Each message's script.
    pub(crate) scripts: BTreeMap<String, Vec<Step>>,
    /// Handlings so far, per message.
    pub(crate) handled: Mutex<BTreeMap<String, usize>>,
    /// The log.
    pub(crate) log: Log,
    /// Until when the dependency is down.
    pub(crate) dependency_down_until: Mutex<Option<Instant>>,
    /// How long a dependency failure keeps it down.
    pub(crate) dependency_outage: Duration,
}

/// The text of the scripted panics, which the quiet panic hook leaves out.
pub(crate) const PANIC_TEXT: &str = "sim: scripted handler panic";

#[async_trait]
impl Handler for SimHandler {
    async fn handle(&self, message: Arc<Message>) -> Outcome {
        let step = {
            let mut handled = lock(&self.handled);
            let n = handled.entry(message.id.clone()).or_insert(0);
            let step = self.scripts.get(&message.id).and_then(|s| s.get(*n)).cloned();
            *n += 1;
            step.unwrap_or(Step::Complete(Duration::ZERO))
        };
        let key = key(&message);
        self.log.push(Event::Start { key: key.clone(), step: step.to_string() });
        // Logs the run's end as `Dropped` if the handler never returns.
        let mut guard =
            LogOnDrop::new(&self.log, Event::Finish { key: key.clone(), end: End::Dropped });
        let (outcome, end) = match step {
            Step::Complete(work) | Step::Slow(work) => {
                sleep(work).await;
                (Outcome::Complete, End::Complete)
            }
            Step::Retry(work) => {
                sleep(work).await;
                (Outcome::retry("simulated retry"), End::Retry)
            }
            Step::RetryAfter(work, delay) => {
                sleep(work).await;
                (Outcome::retry_after(delay, "simulated delayed retry"), End::Retry)
            }
            Step::Dependency(work) => {
                sleep(work).await;
                *lock(&self.dependency_down_until) = Some(Instant::now() + self.dependency_outage);
                (Outcome::dependency_failed("simulated dependency outage"), End::Dependency)
            }
            Step::DeadLetter(work) => {
                sleep(work).await;
                (Outcome::dead_letter("SimulatedInvalid", "scripted dead letter"), End::DeadLetter)
            }
            Step::Panic(work) => {
                sleep(work).await;
                guard.disarm();
                self.log.push(Event::Finish { key, end: End::Panicked });
                std::panic::panic_any(PANIC_TEXT);
            }
            Step::Hang => std::future::pending().await,
        };
        guard.disarm();
        self.log.push(Event::Finish { key, end });
        outcome
    }

    async fn probe(&self) -> Result<(), BoxError> {
        let down = lock(&self.dependency_down_until).is_some_and(|until| Instant::now() < until);
        self.log.push(Event::Probe { ok: !down });
        if down { Err("simulated dependency still down".into()) } else { Ok(()) }
    }
}
