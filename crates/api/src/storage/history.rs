//! Resource history: one snapshot per patch.

use sqlx::any::AnyRow;
use sqlx::{Any, Executor, Row};

use super::document::fetch_all;
use super::error::{Entity, StoreError, inserted};
use super::{Reader, Tx};
use crate::domain::ResourceHistoryItem;
use crate::storage::millis;

fn from_row(row: &AnyRow) -> Result<ResourceHistoryItem, StoreError> {
    let id: String = row.try_get("id")?;
    let doc: String = row.try_get("doc")?;
    serde_json::from_str(&doc)
        .map_err(|error| StoreError::corrupt(Entity::ResourceHistory, &id, error))
}

async fn list<'c, E: Executor<'c, Database = Any>>(
    executor: E,
    resource_id: &str,
) -> Result<Vec<ResourceHistoryItem>, StoreError> {
    let sql = "SELECT id, doc FROM resource_history WHERE resource_id = $1 \
               ORDER BY resource_version, updated_at, id";
    fetch_all(executor, sql, resource_id, from_row).await
}

impl Tx {
    /// Records a history item.
    ///
    /// # Errors
    ///
    /// [`StoreError::AlreadyExists`] if its id is taken, or the database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: the transaction is rolled back when dropped.
    pub async fn insert_history(&mut self, item: &ResourceHistoryItem) -> Result<(), StoreError> {
        let doc = serde_json::to_string(item)
            .map_err(|error| StoreError::corrupt(Entity::ResourceHistory, &item.id, error))?;
        let result = sqlx::query(
            "INSERT INTO resource_history (id, resource_id, resource_version, updated_at, doc) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING",
        )
        .bind(item.id.clone())
        .bind(item.resource_id.clone())
        .bind(item.resource_version)
        .bind(millis(item.updated_when))
        .bind(doc)
        .execute(self.conn())
        .await?;
        inserted(&result, Entity::ResourceHistory, &item.id)?;
        Ok(())
    }
}

impl Reader<'_> {
    /// The history of a resource, oldest first.
    ///
    /// # Errors
    ///
    /// The database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub async fn resource_history(
        self,
        resource_id: &str,
    ) -> Result<Vec<ResourceHistoryItem>, StoreError> {
        list(&mut *self.connection().await?, resource_id).await
    }
}
