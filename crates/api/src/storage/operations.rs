//! Operations (with their steps, stored in the operation's document).

use sqlx::any::AnyRow;
use sqlx::{Any, Executor, Row};

use super::error::{Entity, StoreError, inserted};
use super::{Reader, Store, Tx};
use crate::domain::Operation;
use crate::domain::new_id;
use crate::storage::millis;

fn from_row(row: &AnyRow) -> Result<Operation, StoreError> {
    let id: String = row.try_get("id")?;
    let etag: String = row.try_get("etag")?;
    let doc: String = row.try_get("doc")?;
    let mut operation: Operation = serde_json::from_str(&doc)
        .map_err(|error| StoreError::corrupt(Entity::Operation, &id, error))?;
    operation.etag = etag;
    Ok(operation)
}

fn to_doc(operation: &Operation) -> Result<String, StoreError> {
    serde_json::to_string(operation)
        .map_err(|error| StoreError::corrupt(Entity::Operation, &operation.id, error))
}

async fn fetch<'c, E: Executor<'c, Database = Any>>(
    executor: E,
    id: &str,
) -> Result<Option<Operation>, StoreError> {
    let row = sqlx::query("SELECT id, etag, doc FROM operations WHERE id = $1")
        .bind(id.to_owned())
        .fetch_optional(executor)
        .await?;
    row.as_ref().map(from_row).transpose()
}

async fn for_resource<'c, E: Executor<'c, Database = Any>>(
    executor: E,
    resource_id: &str,
) -> Result<Vec<Operation>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, etag, doc FROM operations WHERE resource_id = $1 ORDER BY created_at, id",
    )
    .bind(resource_id.to_owned())
    .fetch_all(executor)
    .await?;
    rows.iter().map(from_row).collect()
}

impl Store {}

impl Tx {
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
        let mut stored = operation.clone();
        stored.etag = new_id();
        let doc = to_doc(&stored)?;
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
        let mut stored = operation.clone();
        stored.etag = new_id();
        let doc = to_doc(&stored)?;
        let result = sqlx::query(
            "UPDATE operations SET status = $1, etag = $2, updated_at = $3, doc = $4 WHERE id = $5 AND etag = $6",
        )
        .bind(stored.status.as_str())
        .bind(stored.etag.clone())
        .bind(millis(stored.updated_when))
        .bind(doc)
        .bind(stored.id.clone())
        .bind(operation.etag.clone())
        .execute(self.conn())
        .await?;
        if result.rows_affected() == 1 {
            return Ok(stored);
        }
        Err(self.missing_or_changed(Entity::Operation, "operations", &operation.id).await)
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
        for_resource(&mut *self.connection().await?, resource_id).await
    }
}
