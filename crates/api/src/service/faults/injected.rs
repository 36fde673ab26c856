//! The faults of `STEWARD_FAULTS`, in builds with cargo feature `fault-injection`, to
//! watch the supervisor and the probes at work.
//!
//! `panic=P` makes the status handlers panic with probability P, `db_error=P` makes them
//! answer as if the database failed, `delay=D` (for example `250ms`) makes each of them
//! take at least D, `fail_worker=NAME` makes that worker fail at every start (so it ends
//! `failed`). Entries are separated by commas; unknown keys are an error.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use steward_core::{
    BoxError, Handler, Message, Outcome, Supervisor, Worker, WorkerContext, WorkerError,
};

use super::FaultPlan;

/// Parsed `STEWARD_FAULTS`.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Faults {
    /// Probability that a status handler panics.
    pub panic: f64,
    /// Probability that a status handler reports a database error.
    pub db_error: f64,
    /// How long each status handler waits before it handles its message.
    pub delay: Duration,
    /// Workers that fail at every start.
    pub fail_workers: Vec<String>,
}

/// A `STEWARD_FAULTS` value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid STEWARD_FAULTS: {0}")]
pub(super) struct FaultsError(String);

impl Faults {
    /// Parses `panic=0.01,db_error=0.05,delay=250ms,fail_worker=deployment-status`.
    ///
    /// # Errors
    ///
    /// An unknown key, a probability outside 0–1, or an entry without `=`.
    pub(super) fn parse(text: &str) -> Result<Faults, FaultsError> {
        let mut faults = Faults::default();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (key, value) = entry
                .split_once('=')
                .ok_or_else(|| FaultsError(format!("{entry:?} is not key=value")))?;
            let probability = || {
                value.trim().parse::<f64>().ok().filter(|p| (0.0..=1.0).contains(p)).ok_or_else(
                    || {
                        FaultsError(format!(
                            "{key} must be a probability from 0 to 1, not {value:?}"
                        ))
                    },
                )
            };
            match key.trim() {
                "panic" => faults.panic = probability()?,
                "db_error" => faults.db_error = probability()?,
                "delay" => {
                    faults.delay = humantime::parse_duration(value.trim()).map_err(|error| {
                        FaultsError(format!("delay must be a duration like 250ms: {error}"))
                    })?;
                }
                "fail_worker" => faults.fail_workers.push(value.trim().to_owned()),
                other => {
                    return Err(FaultsError(format!(
                        "unknown key {other:?} (known: panic, db_error, delay, fail_worker)"
                    )));
                }
            }
        }
        Ok(faults)
    }

    /// Whether worker `name` must fail.
    #[must_use]
    pub(super) fn fails(&self, name: &str) -> bool {
        self.fail_workers.iter().any(|w| w == name)
    }
}

/// The plan of `STEWARD_FAULTS` (`spec`).
///
/// # Errors
///
/// `spec` cannot be parsed.
pub(in crate::service) fn plan(spec: Option<&str>) -> Result<impl FaultPlan + use<>, String> {
    Faults::parse(spec.unwrap_or_default()).map_err(|error| error.to_string())
}

impl FaultPlan for Faults {
    fn spawn(&self, supervisor: &Supervisor, worker: impl Worker) {
        if self.fails(worker.name()) {
            tracing::warn!(worker = worker.name(), "STEWARD_FAULTS: this worker will fail");
            supervisor.spawn(FailingWorker::new(worker.name()));
        } else {
            supervisor.spawn(worker);
        }
    }

    fn wrap(&self, handler: impl Handler) -> impl Handler {
        FaultyHandler::new(handler, self)
    }
}

/// A number in `[0, 1)`, different each call.
fn draw() -> f64 {
    let bits = uuid::Uuid::new_v4().as_u128() >> 75;
    bits as f64 / (1u64 << 53) as f64
}

/// A handler with injected panics, database errors and delays.
#[derive(Debug)]
pub(super) struct FaultyHandler<H> {
    inner: H,
    panic: f64,
    db_error: f64,
    delay: Duration,
}

impl<H> FaultyHandler<H> {
    /// `inner` with the handler faults of `faults`.
    #[must_use]
    pub(super) fn new(inner: H, faults: &Faults) -> Self {
        FaultyHandler { inner, panic: faults.panic, db_error: faults.db_error, delay: faults.delay }
    }
}

#[async_trait]
impl<H: Handler> Handler for FaultyHandler<H> {
    async fn handle(&self, message: Arc<Message>) -> Outcome {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let roll = draw();
        if roll < self.panic {
            panic!("injected handler panic (STEWARD_FAULTS) for message {}", message.id);
        }
        if roll < self.panic + self.db_error {
            return Outcome::dependency_failed("injected database error (STEWARD_FAULTS)");
        }
        self.inner.handle(message).await
    }

    async fn probe(&self) -> Result<(), BoxError> {
        self.inner.probe().await
    }
}

/// A worker that fails at every start, with the name of the one it replaces.
#[derive(Debug)]
pub(super) struct FailingWorker {
    name: String,
}

impl FailingWorker {
    /// Fails in place of worker `name`.
    #[must_use]
    pub(super) fn new(name: impl Into<String>) -> Self {
        FailingWorker { name: name.into() }
    }
}

#[async_trait]
impl Worker for FailingWorker {
    fn name(&self) -> &str {
        &self.name
    }

    fn stall_timeout(&self) -> Option<Duration> {
        None
    }

    async fn run(&self, _ctx: WorkerContext) -> Result<(), WorkerError> {
        Err(WorkerError::fatal("injected failure (STEWARD_FAULTS fail_worker)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key_and_refuses_unknown_ones() {
        let faults =
            Faults::parse("panic=0.01, db_error=0.5,delay=250ms,fail_worker=deployment-status")
                .unwrap_or_default();
        assert_eq!(faults.panic, 0.01);
        assert_eq!(faults.db_error, 0.5);
        assert_eq!(faults.delay, Duration::from_millis(250));
        assert!(Faults::parse("delay=soon").unwrap_err().to_string().contains("delay"));
        assert!(faults.fails("deployment-status"));
        assert!(!faults.fails("outbox"));
        assert!(
            Faults::parse("explode=1").unwrap_err().to_string().contains("unknown key \"explode\"")
        );
        assert!(Faults::parse("panic=2").is_err());
        assert!(Faults::parse("panic").is_err());
        assert_eq!(Faults::parse(""), Ok(Faults::default()));
    }

    #[test]
    fn draws_stay_in_the_unit_interval() {
        for _ in 0..1000 {
            let x = draw();
            assert!((0.0..1.0).contains(&x), "{x}");
        }
    }
}
