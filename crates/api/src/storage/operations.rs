//! Operations (with their steps, stored in the operation's document).

use sqlx::{Any, Executor};

use super::document::{Listed, Listing, PageKey, Window, fetch, from_row, with_new_etag};
use super::error::{Entity, StoreError, inserted};
use super::{Reader, Store, Tx};
use crate::domain::{Operation, Status};
use crate::storage::millis;

/// Which page of a resource's operations to list.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OperationPage<'a> {
    /// Only operations after this one (in creation order).
    pub after: Option<&'a PageKey>,
    /// Skip this many (in creation order, after `after`).
    pub skip: u64,
    /// Return at most this many; `None` for all.
    pub limit: Option<u64>,
    /// Stop before the documents pass this many bytes (the first is always returned);
    /// `None` for no limit.
    pub max_bytes: Option<usize>,
}

async fn for_resource<'c, E: Executor<'c, Database = Any>>(
    executor: E,
    resource_id: &str,
    page: OperationPage<'_>,
) -> Result<Listed<Operation>, StoreError> {
    let mut listing = Listing::of::<Operation>();
    listing.equal("resource_id", Some(resource_id));
    let window =
        Window { after: page.after, skip: page.skip, limit: page.limit, max_bytes: page.max_bytes };
    listing.page(executor, window).await
}

impl Store {}

impl Tx {
    /// The oldest operation whose own resource is `resource_id` and that is not finished
    /// (its status is neither a success nor a failure), if there is one.
    ///
    /// On PostgreSQL the resource's row is locked first (`FOR UPDATE`) until the
    /// transaction ends, so two transactions that check and then create an operation on
    /// the same resource run one after the other; SQLite's transactions are serialised
    /// already.
    ///
    /// # Errors
    ///
    /// The database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: the transaction is rolled back when dropped.
    pub async fn operation_in_progress(
        &mut self,
        resource_id: &str,
    ) -> Result<Option<Operation>, StoreError> {
        if self.store().backend() == super::Backend::Postgres {
            sqlx::query("SELECT id FROM resources WHERE id = $1 FOR UPDATE")
                .bind(resource_id.to_owned())
                .fetch_optional(self.conn())
                .await?;
        }
        let finished = Status::ALL
            .into_iter()
            .filter(|status| status.is_terminal())
            .map(|status| format!("'{}'", status.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        let row = sqlx::query(&format!(
            "SELECT id, etag, doc FROM operations WHERE resource_id = $1 AND status NOT IN ({finished}) \
             ORDER BY created_at, id LIMIT 1"
        ))
        .bind(resource_id.to_owned())
        .fetch_optional(self.conn())
        .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// Inserts a new operation with a fresh etag and returns it as stored.
    ///
    /// # Errors
    ///
    /// [`StoreError::AlreadyExists`] if the id is taken, or the database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: the transaction is rolled back when dropped.
    pub async fn insert_operation(
        &mut self,
        operation: &Operation,
    ) -> Result<Operation, StoreError> {
        let (stored, doc) = with_new_etag(operation)?;
        let result = sqlx::query(
            "INSERT INTO operations (id, resource_id, action, status, etag, created_at, updated_at, doc) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING",
        )
        .bind(stored.id.clone())
        .bind(stored.resource_id.clone())
        .bind(stored.action.clone())
        .bind(stored.status.as_str())
        .bind(stored.etag.clone())
        .bind(millis(stored.created_when))
        .bind(millis(stored.updated_when))
        .bind(doc)
        .execute(self.conn())
        .await?;
        inserted(&result, Entity::Operation, &stored.id)?;
        Ok(stored)
    }

    /// Replaces an operation if its stored etag still equals `operation.etag`; returns
    /// it with its new etag.
    ///
    /// # Errors
    ///
    /// [`StoreError::EtagMismatch`], [`StoreError::NotFound`], or the database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: the transaction is rolled back when dropped.
    pub async fn replace_operation(
        &mut self,
        operation: &Operation,
    ) -> Result<Operation, StoreError> {
        self.replace_document(operation, operation.status.as_str(), operation.updated_when).await
    }
}

impl Reader<'_> {
    /// The operation with this id.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`], or the database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub async fn operation(self, id: &str) -> Result<Operation, StoreError> {
        fetch(&mut *self.connection().await?, id)
            .await?
            .ok_or_else(|| StoreError::not_found(Entity::Operation, id))
    }

    /// The operations whose primary resource is `resource_id`, oldest first.
    ///
    /// # Errors
    ///
    /// The database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub async fn operations_for_resource(
        self,
        resource_id: &str,
    ) -> Result<Vec<Operation>, StoreError> {
        Ok(self.operations_page(resource_id, OperationPage::default()).await?.items)
    }

    /// One page of the operations whose primary resource is `resource_id`, oldest
    /// first, and whether more follow.
    ///
    /// # Errors
    ///
    /// The database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub async fn operations_page(
        self,
        resource_id: &str,
        page: OperationPage<'_>,
    ) -> Result<Listed<Operation>, StoreError> {
        for_resource(&mut *self.connection().await?, resource_id, page).await
    }
}
