//! The workers an operator paused (`worker_controls`), which every replica follows.

use std::collections::BTreeSet;

use sqlx::Row;

use super::{Store, StoreError, Tx, millis};

impl Store {
    /// The names of the workers paused now.
    ///
    /// # Errors
    ///
    /// The database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub async fn paused_workers(&self) -> Result<BTreeSet<String>, StoreError> {
        let rows = sqlx::query("SELECT worker FROM worker_controls WHERE paused = 1")
            .fetch_all(self.reader())
            .await?;
        rows.iter().map(|row| Ok(row.try_get::<String, _>("worker")?)).collect()
    }
}

impl Tx {
    /// Records that `worker` is paused (`true`) or not, by the operator `by`.
    ///
    /// # Errors
    ///
    /// The database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: nothing is written until the transaction commits.
    pub async fn set_worker_paused(
        &mut self,
        worker: &str,
        paused: bool,
        by: &str,
    ) -> Result<(), StoreError> {
        let now = millis(self.store().clock().now());
        sqlx::query(
            "INSERT INTO worker_controls (worker, paused, updated_at, updated_by) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (worker) DO UPDATE SET paused = excluded.paused, updated_at = excluded.updated_at, updated_by = excluded.updated_by",
        )
        .bind(worker.to_owned())
        .bind(i64::from(paused))
        .bind(now)
        .bind(by.to_owned())
        .execute(self.conn())
        .await?;
        Ok(())
    }
}
