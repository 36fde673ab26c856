//! What operators change: the workers they paused (`worker_controls`), which every
//! replica follows, and parked outbox rows they send again.

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
            .fetch_all(&mut *self.read_connection().await?)
            .await?;
        rows.iter().map(|row| Ok(row.try_get::<String, _>("worker")?)).collect()
    }
}

impl Store {
    /// Moves parked row `id` back into the outbox, due now with no failed attempts, and
    /// wakes the outbox worker; the row keeps its id and message key, so the message
    /// keeps its id. `false` when no row `id` is parked.
    ///
    /// # Errors
    ///
    /// The database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: the move is one transaction, rolled back if dropped.
    pub async fn retry_parked_outbox(&self, id: i64) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        // Due now by the database's clock, the one the outbox's leases and due times
        // are read by, not this replica's.
        let copied = sqlx::query(&format!(
            "INSERT INTO outbox (id, message_key, queue, aggregate_id, body, session_id, correlation_id, \
             content_type, subject, properties, created_at, available_at, attempts) \
             SELECT id, message_key, queue, aggregate_id, body, session_id, correlation_id, content_type, \
             subject, properties, created_at, {}, 0 FROM outbox_parked WHERE id = $1",
            super::outbox::database_now(self.backend())
        ))
        .bind(id)
        .execute(tx.conn())
        .await?
        .rows_affected();
        if copied != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query("DELETE FROM outbox_parked WHERE id = $1").bind(id).execute(tx.conn()).await?;
        tx.wrote_outbox = true;
        tx.commit().await?;
        Ok(true)
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
