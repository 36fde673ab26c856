//! The transactional outbox: messages written with the state change that caused them,
//! published later by the outbox worker.

use serde::Serialize;
use sqlx::Row;
use sqlx::any::AnyRow;
use steward_core::OutgoingMessage;

use super::error::{Entity, StoreError};
use super::{Backend, Store, Tx};
use crate::domain::Clock;
use crate::storage::millis;

/// Where the outbox's lease and retry times come from.
///
/// Replicas whose own clocks disagree by minutes must still agree on when a lease
/// ends, or one would take over a row another is still sending. So the service reads
/// these times from the database's clock ([`LeaseClock::Database`]), which every
/// replica shares; [`LeaseClock::Local`] is an explicit clock, for tests.
#[derive(Debug, Clone, Default)]
pub enum LeaseClock {
    /// The database's clock: `clock_timestamp()` on PostgreSQL, `julianday('now')` on
    /// SQLite.
    #[default]
    Database,
    /// This clock (tests): leases and retries are timed by it, while rows still
    /// become due by the database's clock when written.
    Local(Clock),
}

/// The database's current time in milliseconds since the epoch, as an SQL expression.
pub(super) fn database_now(backend: Backend) -> &'static str {
    match backend {
        // `julianday('now')` has millisecond precision; `CURRENT_TIMESTAMP` only seconds.
        Backend::Sqlite => "CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER)",
        // The time of the statement, not of the transaction's start (`now()`).
        Backend::Postgres => "CAST(FLOOR(EXTRACT(EPOCH FROM clock_timestamp()) * 1000) AS BIGINT)",
    }
}

/// A message to publish once the transaction that wrote it commits: the broker message
/// and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxMessage {
    /// The queue (or topic) to send to.
    pub queue: String,
    /// The record the message is about. Messages of one aggregate are published one at
    /// a time, in the order they were written.
    pub aggregate_id: String,
    /// The subject (label), if any: sent as the `subject` property.
    pub subject: Option<String>,
    /// The message: its body (text), session id, correlation id, content type and
    /// properties. Its message id is not kept: the row gets one of its own (see
    /// [`OutboxRecord::message_id`]).
    pub outgoing: OutgoingMessage,
}

impl OutboxMessage {
    /// `outgoing`, for `queue`, about `aggregate_id`.
    #[must_use]
    pub fn new(
        queue: impl Into<String>,
        outgoing: OutgoingMessage,
        aggregate_id: impl Into<String>,
    ) -> Self {
        OutboxMessage {
            queue: queue.into(),
            aggregate_id: aggregate_id.into(),
            subject: None,
            outgoing,
        }
    }

    /// A JSON message for `queue` about `aggregate_id`, with content type
    /// `application/json`.
    ///
    /// # Errors
    ///
    /// `body` cannot be serialized.
    pub fn json<T: Serialize + ?Sized>(
        queue: impl Into<String>,
        body: &T,
        aggregate_id: impl Into<String>,
    ) -> Result<Self, serde_json::Error> {
        let body = serde_json::to_string(body)?;
        Ok(OutboxMessage::new(queue, OutgoingMessage::json(body), aggregate_id))
    }

    /// Sets the session id.
    #[must_use]
    pub fn with_session_id(mut self, session_id: impl Into<String>) -> Self {
        self.outgoing = self.outgoing.with_session_id(session_id);
        self
    }

    /// Sets the correlation id.
    #[must_use]
    pub fn with_correlation_id(mut self, correlation_id: impl Into<String>) -> Self {
        self.outgoing.correlation_id = Some(correlation_id.into());
        self
    }

    /// Sets the subject.
    #[must_use]
    pub fn with_subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }
}

/// An outbox row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRecord {
    /// The row id; the start of the broker message id.
    pub id: i64,
    /// The random key written with the row, the end of the broker message id; `None`
    /// for rows written before keys were.
    pub message_key: Option<String>,
    /// The message.
    pub message: OutboxMessage,
    /// When it was written, in milliseconds since the epoch.
    pub created_at: i64,
    /// How many times publishing was tried.
    pub attempts: i64,
    /// The worker holding the lease, if any.
    pub lease_owner: Option<String>,
    /// When the lease ends, in milliseconds since the epoch.
    pub lease_until: Option<i64>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
}

impl OutboxRecord {
    /// The broker message id, `<id>-<message_key>`: the same on every send of this
    /// row, so a broker or consumer drops a resend, and unlike any other database's
    /// (row ids alone repeat across databases: a fresh or restored one numbers from
    /// where it starts, and a broker de-duplicating by id would drop its messages). A
    /// row written before keys were has its row id alone.
    #[must_use]
    pub fn message_id(&self) -> String {
        message_id(self.id, self.message_key.as_deref())
    }
}

/// The broker message id of row `id` with key `key`.
fn message_id(id: i64, key: Option<&str>) -> String {
    match key {
        Some(key) => format!("{id}-{key}"),
        None => id.to_string(),
    }
}

/// The message of an outbox row (or a parked one: both tables have its columns).
fn message_from_row(id: i64, row: &AnyRow) -> Result<OutboxMessage, StoreError> {
    let properties: String = row.try_get("properties")?;
    let properties = serde_json::from_str(&properties)
        .map_err(|error| StoreError::corrupt(Entity::OutboxMessage, &id.to_string(), error))?;
    Ok(OutboxMessage {
        queue: row.try_get("queue")?,
        aggregate_id: row.try_get("aggregate_id")?,
        subject: row.try_get("subject")?,
        outgoing: OutgoingMessage {
            session_id: row.try_get("session_id")?,
            correlation_id: row.try_get("correlation_id")?,
            content_type: row.try_get("content_type")?,
            properties,
            ..OutgoingMessage::new(row.try_get::<String, _>("body")?)
        },
    })
}

fn from_row(row: &AnyRow) -> Result<OutboxRecord, StoreError> {
    let id: i64 = row.try_get("id")?;
    Ok(OutboxRecord {
        id,
        message_key: row.try_get("message_key")?,
        message: message_from_row(id, row)?,
        created_at: row.try_get("created_at")?,
        attempts: row.try_get("attempts")?,
        lease_owner: row.try_get("lease_owner")?,
        lease_until: row.try_get("lease_until")?,
        last_error: row.try_get("last_error")?,
    })
}

/// Room kept for the message id the row id becomes: an `i64` as text.
const MESSAGE_ID_ROOM: usize = 20;

impl Tx {
    /// Refuses, from now on in this transaction, outbox messages larger than `limit`
    /// bytes (the transport's, see [`Capabilities::max_body_bytes`]); `None` for no
    /// limit. A message over it fails [`insert_outbox`](Self::insert_outbox) with
    /// [`StoreError::MessageTooLarge`], so nothing is committed.
    ///
    /// [`Capabilities::max_body_bytes`]: steward_core::Capabilities::max_body_bytes
    pub fn limit_message_size(&mut self, limit: Option<usize>) {
        self.max_message_bytes = limit;
    }

    /// Writes a message to the outbox; it is published after this transaction commits
    /// (and never if it rolls back). Returns the row id; the message id is
    /// [`insert_outbox_message`](Self::insert_outbox_message)'s.
    ///
    /// # Errors
    ///
    /// [`StoreError::MessageTooLarge`] over the [limit](Self::limit_message_size); the
    /// database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: the transaction is rolled back when dropped.
    pub async fn insert_outbox(&mut self, message: OutboxMessage) -> Result<i64, StoreError> {
        Ok(self.insert_outbox_row(message).await?.0)
    }

    /// Like [`insert_outbox`](Self::insert_outbox), returning the broker message id
    /// the message will be sent with ([`OutboxRecord::message_id`]).
    ///
    /// # Errors
    ///
    /// The database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: the transaction is rolled back when dropped.
    pub async fn insert_outbox_message(
        &mut self,
        message: OutboxMessage,
    ) -> Result<String, StoreError> {
        let (id, key) = self.insert_outbox_row(message).await?;
        Ok(message_id(id, Some(&key)))
    }

    async fn insert_outbox_row(
        &mut self,
        message: OutboxMessage,
    ) -> Result<(i64, String), StoreError> {
        let OutboxMessage { queue, aggregate_id, subject, outgoing: message } = message;
        if let Some(limit) = self.max_message_bytes {
            let size = message.size_bytes()
                + subject.as_ref().map_or(0, |subject| "subject".len() + subject.len())
                + MESSAGE_ID_ROOM;
            if size > limit {
                return Err(StoreError::MessageTooLarge { queue, size, limit });
            }
        }
        let properties = serde_json::to_string(&message.properties)
            .map_err(|error| StoreError::corrupt(Entity::OutboxMessage, &aggregate_id, error))?;
        let now = millis(self.now());
        let key = uuid::Uuid::new_v4().simple().to_string();
        // Due from now by the database's clock, the one leases are timed by: a replica
        // whose clock runs ahead would otherwise hold its rows back for as long.
        let row = sqlx::query(&format!(
            "INSERT INTO outbox (queue, aggregate_id, body, session_id, correlation_id, content_type, subject, \
             properties, created_at, available_at, attempts, message_key) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, {}, 0, $10) RETURNING id",
            database_now(self.store().backend())
        ))
        .bind(queue)
        .bind(aggregate_id)
        .bind(String::from_utf8_lossy(&message.body).into_owned())
        .bind(message.session_id)
        .bind(message.correlation_id)
        .bind(message.content_type)
        .bind(subject)
        .bind(properties)
        .bind(now)
        .bind(&key)
        .fetch_one(self.conn())
        .await?;
        self.wrote_outbox = true;
        Ok((row.try_get("id")?, key))
    }
}

impl Store {
    /// The time by `clock`, in milliseconds since the epoch: for
    /// [`LeaseClock::Database`], the database's clock, read with one query.
    ///
    /// # Errors
    ///
    /// The database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub async fn lease_now(&self, clock: &LeaseClock) -> Result<i64, StoreError> {
        match clock {
            LeaseClock::Local(clock) => Ok(millis(clock.now())),
            LeaseClock::Database => {
                let sql = format!("SELECT {} AS now_ms", database_now(self.backend()));
                let row = sqlx::query(&sql).fetch_one(&mut *self.read_connection().await?).await?;
                Ok(row.try_get("now_ms")?)
            }
        }
    }

    /// Up to `limit` outbox rows, oldest first.
    ///
    /// # Errors
    ///
    /// The database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub async fn outbox_messages(&self, limit: u64) -> Result<Vec<OutboxRecord>, StoreError> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM outbox ORDER BY id LIMIT $1"))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&mut *self.read_connection().await?)
            .await?;
        rows.iter().map(from_row).collect()
    }

    /// The number of outbox rows not yet published.
    ///
    /// # Errors
    ///
    /// The database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub async fn outbox_backlog(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM outbox")
            .fetch_one(&mut *self.read_connection().await?)
            .await?;
        Ok(row.try_get("n")?)
    }
}

/// The columns of an outbox row, in the order [`from_row`] reads them.
const COLUMNS: &str = "id, queue, aggregate_id, body, session_id, correlation_id, content_type, subject, \
                       properties, created_at, attempts, lease_owner, lease_until, last_error, message_key";

impl Store {
    /// Claims up to `limit` outbox rows for `owner` until `lease_until_ms`: rows due by
    /// `now_ms`, not leased (or whose lease ran out), and each the oldest row of its
    /// aggregate, so an aggregate's messages go out one at a time, in order. Returns
    /// them oldest first.
    ///
    /// Every worker must take `now_ms` from one clock, the database's
    /// ([`lease_now`](Self::lease_now) with [`LeaseClock::Database`]): a worker whose
    /// clock ran ahead would take over rows whose lease is still live.
    ///
    /// On PostgreSQL the rows are picked with `FOR UPDATE SKIP LOCKED`, so concurrent
    /// workers (several replicas) never claim the same row; on SQLite the single writer
    /// connection serialises claims.
    ///
    /// # Errors
    ///
    /// The database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: the claim is one transaction, rolled back if dropped.
    pub async fn claim_outbox(
        &self,
        owner: &str,
        limit: usize,
        now_ms: i64,
        lease_until_ms: i64,
    ) -> Result<Vec<OutboxRecord>, StoreError> {
        let lock = match self.backend() {
            super::Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            super::Backend::Sqlite => "",
        };
        let sql = format!(
            "UPDATE outbox SET lease_owner = $1, lease_until = $2 WHERE id IN (\
             SELECT o.id FROM outbox o \
             WHERE o.available_at <= $3 AND (o.lease_until IS NULL OR o.lease_until <= $3) \
             AND NOT EXISTS (SELECT 1 FROM outbox e WHERE e.aggregate_id = o.aggregate_id AND e.id < o.id) \
             ORDER BY o.id LIMIT $4{lock}) \
             RETURNING {COLUMNS}"
        );
        let mut tx = self.begin().await?;
        let rows = sqlx::query(&sql)
            .bind(owner)
            .bind(lease_until_ms)
            .bind(now_ms)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(tx.conn())
            .await?;
        let mut claimed = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
        tx.commit().await?;
        claimed.sort_by_key(|record| record.id);
        Ok(claimed)
    }

    /// Deletes a published outbox row that `owner` holds. Returns whether it did: not
    /// when the lease has passed to another worker meanwhile, whose claim stands (it
    /// sends the row again; consumers drop the duplicate by its message id).
    ///
    /// # Errors
    ///
    /// The database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: a cancelled delete leaves the row, which is then published again
    /// (consumers drop the duplicate by its message id).
    pub async fn delete_outbox(&self, id: i64, owner: &str) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let done = sqlx::query("DELETE FROM outbox WHERE id = $1 AND lease_owner = $2")
            .bind(id)
            .bind(owner)
            .execute(tx.conn())
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() > 0)
    }

    /// Records a failed publish of a row `owner` holds: one more attempt, the error, the
    /// lease given up, and not due again before `retry_at_ms`. Does nothing when the
    /// lease has passed to another worker meanwhile, so that worker's claim stands.
    ///
    /// # Errors
    ///
    /// The database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: a cancelled call leaves the lease, which runs out.
    pub async fn fail_outbox(
        &self,
        id: i64,
        owner: &str,
        error: &str,
        retry_at_ms: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "UPDATE outbox SET attempts = attempts + 1, last_error = $2, available_at = $3, \
             lease_owner = NULL, lease_until = NULL WHERE id = $1 AND lease_owner = $4",
        )
        .bind(id)
        .bind(error)
        .bind(retry_at_ms)
        .bind(owner)
        .execute(tx.conn())
        .await?;
        tx.commit().await
    }

    /// Gives up every lease `owner` holds, so other workers can publish those rows at
    /// once (a worker shutting down).
    ///
    /// # Errors
    ///
    /// The database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: leases not released run out.
    pub async fn release_outbox(&self, owner: &str) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE outbox SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1",
        )
        .bind(owner)
        .execute(tx.conn())
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }
}

/// An outbox row that could not be sent, moved aside so its aggregate goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedRecord {
    /// The outbox row id.
    pub id: i64,
    /// The row's message key (see [`OutboxRecord::message_key`]).
    pub message_key: Option<String>,
    /// The message.
    pub message: OutboxMessage,
    /// When it was written, in milliseconds since the epoch.
    pub created_at: i64,
    /// When it was parked, in milliseconds since the epoch.
    pub parked_at: i64,
    /// How many sends failed.
    pub attempts: i64,
    /// Why the last send failed.
    pub error: String,
}

impl ParkedRecord {
    /// The broker message id the row was sent with, as
    /// [`OutboxRecord::message_id`] gives it.
    #[must_use]
    pub fn message_id(&self) -> String {
        message_id(self.id, self.message_key.as_deref())
    }
}

/// How many outbox rows are parked, and since when the oldest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParkedOutbox {
    /// The number of parked rows.
    pub count: i64,
    /// When the oldest one was parked, in milliseconds since the epoch; `None` when
    /// none is.
    pub oldest_parked_at: Option<i64>,
}

impl Store {
    /// Moves the outbox row `id` that `owner` holds to the parked rows, with one more
    /// failed attempt and its `error`, so the later rows of its aggregate go on. Returns
    /// whether it moved: not when the lease has passed to another worker meanwhile.
    ///
    /// # Errors
    ///
    /// The database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: the move is one transaction, rolled back if dropped.
    pub async fn park_outbox(
        &self,
        id: i64,
        owner: &str,
        error: &str,
        parked_at_ms: i64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        // Copied as stored (the message key too, so the message keeps its id), then
        // removed; both only while `owner` holds the lease.
        let copied = sqlx::query(
            "INSERT INTO outbox_parked (id, message_key, queue, aggregate_id, body, session_id, \
             correlation_id, content_type, subject, properties, created_at, parked_at, attempts, error) \
             SELECT id, message_key, queue, aggregate_id, body, session_id, correlation_id, content_type, \
             subject, properties, created_at, $3, attempts + 1, $4 FROM outbox \
             WHERE id = $1 AND lease_owner = $2",
        )
        .bind(id)
        .bind(owner)
        .bind(parked_at_ms)
        .bind(error)
        .execute(tx.conn())
        .await?
        .rows_affected();
        let removed = sqlx::query("DELETE FROM outbox WHERE id = $1 AND lease_owner = $2")
            .bind(id)
            .bind(owner)
            .execute(tx.conn())
            .await?
            .rows_affected();
        if copied != 1 || removed != 1 {
            // The lease passed to another worker: leave the row to it.
            tx.rollback().await?;
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Up to `limit` parked rows, oldest first.
    ///
    /// # Errors
    ///
    /// The database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub async fn parked_outbox_messages(
        &self,
        limit: u64,
    ) -> Result<Vec<ParkedRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, message_key, queue, aggregate_id, body, session_id, correlation_id, content_type, subject, \
             properties, created_at, parked_at, attempts, error FROM outbox_parked ORDER BY id LIMIT $1",
        )
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *self.read_connection().await?)
        .await?;
        rows.iter()
            .map(|row| {
                let id: i64 = row.try_get("id")?;
                Ok(ParkedRecord {
                    id,
                    message_key: row.try_get("message_key")?,
                    message: message_from_row(id, row)?,
                    created_at: row.try_get("created_at")?,
                    parked_at: row.try_get("parked_at")?,
                    attempts: row.try_get("attempts")?,
                    error: row.try_get("error")?,
                })
            })
            .collect()
    }

    /// How many rows are parked, and when the oldest was.
    ///
    /// # Errors
    ///
    /// The database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub async fn parked_outbox(&self) -> Result<ParkedOutbox, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) AS n, MIN(parked_at) AS oldest FROM outbox_parked")
            .fetch_one(&mut *self.read_connection().await?)
            .await?;
        Ok(ParkedOutbox { count: row.try_get("n")?, oldest_parked_at: row.try_get("oldest")? })
    }
}
