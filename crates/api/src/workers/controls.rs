//! Operator pauses, stored in the database so that they outlive a restart and every
//! replica follows them: [`PauseGate`] holds a pausable worker back at start while the
//! database says it is paused, and [`PauseFollower`] applies the stored pauses to this
//! process's supervisor every [`FOLLOW_INTERVAL`].

use std::time::Duration;

use async_trait::async_trait;
use steward_core::{ControlError, Worker, WorkerContext, WorkerControls, WorkerError};

use super::names;
use crate::storage::{Database, StoreError};

/// The workers an operator may pause: the status updaters and the outbox. Pausing the
/// watchers would hide the health of what they watch.
pub const PAUSABLE: [&str; 3] = [names::DEPLOYMENT_STATUS, names::AIRLOCK_STATUS, names::OUTBOX];

/// How often [`PauseFollower`] reads the stored pauses: a pause or resume made on any
/// replica reaches every other within it, plus one read.
pub const FOLLOW_INTERVAL: Duration = Duration::from_secs(2);

fn database_error(error: StoreError) -> WorkerError {
    if error.is_unavailable() {
        WorkerError::dependency("the database is unavailable", error)
    } else {
        WorkerError::Fatal {
            message: "the stored worker pauses cannot be read".to_owned(),
            source: Some(error.into()),
        }
    }
}

/// Waits until `db` is ready (the worker `backing_off` meanwhile); `false` when
/// cancelled first.
async fn database_ready(db: &Database, ctx: &WorkerContext) -> Result<bool, WorkerError> {
    if !db.is_migrated() {
        ctx.set_backing_off("waiting for the database".to_owned());
    }
    tokio::select! {
        ready = db.ready() => { ready.map_err(database_error)?; Ok(true) }
        () = ctx.cancelled() => Ok(false),
    }
}

/// A pausable worker held back until the database answers, and not started while the
/// database says it is paused: it then pauses itself through the supervisor's
/// [`WorkerControls`] and waits to be stopped, so no message is taken before the
/// stored pause applies.
#[derive(Debug)]
pub struct PauseGate<W> {
    db: Database,
    controls: WorkerControls,
    inner: W,
}

impl<W> PauseGate<W> {
    /// `inner`, held back by `db`'s pauses, pausing through `controls`.
    #[must_use]
    pub fn new(db: Database, controls: WorkerControls, inner: W) -> Self {
        Self { db, controls, inner }
    }
}

#[async_trait]
impl<W: Worker> Worker for PauseGate<W> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn stall_timeout(&self) -> Option<Duration> {
        self.inner.stall_timeout()
    }

    async fn run(&self, ctx: WorkerContext) -> Result<(), WorkerError> {
        if !database_ready(&self.db, &ctx).await? {
            return Ok(());
        }
        let store = self.db.ready().await.map_err(database_error)?;
        let name = self.inner.name();
        if store.paused_workers().await.map_err(database_error)?.contains(name) {
            match self.controls.pause(name) {
                Ok(()) => {
                    // The supervisor stops this run now and keeps the worker paused.
                    ctx.cancelled().await;
                    return Ok(());
                }
                Err(error) => {
                    tracing::warn!(worker = name, error = %error, "cannot apply the stored pause")
                }
            }
        }
        self.inner.run(ctx).await
    }
}

/// Applies the stored pauses to this process's workers every [`FOLLOW_INTERVAL`].
#[derive(Debug)]
pub struct PauseFollower {
    db: Database,
    controls: WorkerControls,
}

impl PauseFollower {
    /// A follower of `db`'s pauses, applying them through `controls`.
    #[must_use]
    pub fn new(db: Database, controls: WorkerControls) -> Self {
        Self { db, controls }
    }
}

#[async_trait]
impl Worker for PauseFollower {
    fn name(&self) -> &str {
        names::WORKER_CONTROLS
    }

    fn stall_timeout(&self) -> Option<Duration> {
        Some(FOLLOW_INTERVAL * 30)
    }

    async fn run(&self, ctx: WorkerContext) -> Result<(), WorkerError> {
        if !database_ready(&self.db, &ctx).await? {
            return Ok(());
        }
        let store = self.db.ready().await.map_err(database_error)?;
        ctx.set_running();
        loop {
            let paused = store.paused_workers().await.map_err(database_error)?;
            for name in PAUSABLE {
                match self.controls.set_paused(name, paused.contains(name)) {
                    // Not run by this process, or no longer supervised: nothing to follow.
                    Ok(()) | Err(ControlError::Unknown(_) | ControlError::NotSupervised(_)) => {}
                    Err(error) => {
                        tracing::warn!(worker = name, error = %error, "cannot apply the stored pause");
                    }
                }
            }
            ctx.progress();
            tokio::select! {
                () = tokio::time::sleep(FOLLOW_INTERVAL) => {}
                () = ctx.cancelled() => return Ok(()),
            }
        }
    }
}
