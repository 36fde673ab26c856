//! The database and transport watchers, and a wrapper that holds a worker back until
//! the database is migrated.

use std::time::Duration;

use async_trait::async_trait;
use steward_core::{Worker, WorkerContext, WorkerError};

use crate::service::TransportHandle;
use crate::storage::Database;

use super::names;

/// How often the watchers look again.
const WATCH_INTERVAL: Duration = Duration::from_secs(10);

fn database_down(error: crate::storage::StoreError) -> WorkerError {
    if error.is_unavailable() {
        WorkerError::dependency("the database is unavailable", error)
    } else if error.is_busy() {
        WorkerError::dependency("the database is busy", error)
    } else {
        WorkerError::Fatal {
            message: "the database cannot be used".to_owned(),
            source: Some(error.into()),
        }
    }
}

/// Runs the migrations once the database answers, then pings it every 10 s: its state
/// is the `Database` service of `/health`.
#[derive(Debug, Clone)]
pub(crate) struct DatabaseWatcher {
    db: Database,
}

impl DatabaseWatcher {
    /// A watcher of `db`.
    #[must_use]
    pub(crate) fn new(db: Database) -> Self {
        DatabaseWatcher { db }
    }
}

#[async_trait]
impl Worker for DatabaseWatcher {
    fn name(&self) -> &str {
        names::DATABASE
    }

    fn stall_timeout(&self) -> Option<Duration> {
        Some(WATCH_INTERVAL * 6)
    }

    async fn run(&self, ctx: WorkerContext) -> Result<(), WorkerError> {
        if !self.db.is_migrated() {
            ctx.set_backing_off("connecting to the database".to_owned());
        }
        let store = self.db.ready().await.map_err(database_down)?;
        ctx.set_running();
        loop {
            match store.ping().await {
                Ok(()) => ctx.progress(),
                // Busy is not down: the database answers; look again next time.
                Err(error) if error.is_busy() => {
                    tracing::warn!(worker = names::DATABASE, error = %steward_core::error_chain(&error), "the database was too busy to answer the ping");
                }
                Err(error) => return Err(database_down(error)),
            }
            tokio::select! {
                () = tokio::time::sleep(WATCH_INTERVAL) => {}
                () = ctx.cancelled() => return Ok(()),
            }
        }
    }
}

/// Checks the broker (declaring the topology where the transport can) when it starts
/// and every 10 s: its state is the `Message Transport` service of `/health`.
#[derive(Debug, Clone)]
pub(crate) struct TransportWatcher {
    transport: TransportHandle,
}

impl TransportWatcher {
    /// A watcher of `transport`.
    #[must_use]
    pub(crate) fn new(transport: TransportHandle) -> Self {
        TransportWatcher { transport }
    }
}

#[async_trait]
impl Worker for TransportWatcher {
    fn name(&self) -> &str {
        names::TRANSPORT
    }

    fn stall_timeout(&self) -> Option<Duration> {
        Some(WATCH_INTERVAL * 6)
    }

    async fn run(&self, ctx: WorkerContext) -> Result<(), WorkerError> {
        loop {
            self.transport.check().await?;
            ctx.set_running();
            ctx.progress();
            tokio::select! {
                () = tokio::time::sleep(WATCH_INTERVAL) => {}
                () = ctx.cancelled() => return Ok(()),
            }
        }
    }
}

/// Runs `inner` only once the database is migrated, so no handler ever meets a missing
/// table; until then the worker is `backing_off` with the database's error.
#[derive(Debug)]
pub(crate) struct AfterDatabase<W> {
    db: Database,
    inner: W,
}

impl<W> AfterDatabase<W> {
    /// `inner`, held back until `db` is ready.
    #[must_use]
    pub(crate) fn new(db: Database, inner: W) -> Self {
        AfterDatabase { db, inner }
    }
}

#[async_trait]
impl<W: Worker> Worker for AfterDatabase<W> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn stall_timeout(&self) -> Option<Duration> {
        self.inner.stall_timeout()
    }

    async fn run(&self, ctx: WorkerContext) -> Result<(), WorkerError> {
        if !self.db.is_migrated() {
            ctx.set_backing_off("waiting for the database".to_owned());
            tokio::select! {
                ready = self.db.ready() => { ready.map_err(database_down)?; }
                () = ctx.cancelled() => return Ok(()),
            }
        }
        self.inner.run(ctx).await
    }
}
