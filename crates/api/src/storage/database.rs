//! The store behind a readiness gate: the service starts with the database possibly
//! down, and every worker and request waits for the one-time migration.

use std::sync::Arc;

use tokio::sync::OnceCell;

use super::{Store, StoreError};

/// The store, and the one-time migration every user of it waits for.
///
/// The service starts with the database possibly down: [`ready`](Self::ready) runs the
/// migrations the first time the database answers, and every worker and request waits
/// for that before touching a table.
#[derive(Clone, Debug)]
pub struct Database {
    store: Store,
    migrated: Arc<OnceCell<()>>,
}

impl Database {
    /// A gate over `store`, not yet migrated.
    #[must_use]
    pub fn new(store: Store) -> Self {
        Database { store, migrated: Arc::new(OnceCell::new()) }
    }

    /// A gate over a store that is already migrated.
    #[must_use]
    pub fn migrated(store: Store) -> Self {
        Database { store, migrated: Arc::new(OnceCell::new_with(Some(()))) }
    }

    /// The store, once its schema is up to date.
    ///
    /// # Errors
    ///
    /// The database cannot be reached or a migration failed; the next call tries again.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: a cancelled migration is rolled back and tried again by the next call.
    pub async fn ready(&self) -> Result<&Store, StoreError> {
        self.migrated.get_or_try_init(|| self.store.migrate()).await?;
        Ok(&self.store)
    }

    /// The store for serving a request: at once, without waiting for a database that is
    /// still being connected to and migrated (the workers do that).
    ///
    /// # Errors
    ///
    /// [`NotReady`] until the migrations ran.
    pub fn serving(&self) -> Result<&Store, NotReady> {
        if self.is_migrated() { Ok(&self.store) } else { Err(NotReady) }
    }

    /// Whether the migrations ran.
    #[must_use]
    pub fn is_migrated(&self) -> bool {
        self.migrated.initialized()
    }

    /// The store, migrated or not (for closing it).
    #[must_use]
    pub fn store(&self) -> &Store {
        &self.store
    }
}

/// The database has not been reached and migrated yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the database is not ready yet")]
pub struct NotReady;
