//! The storage error, named for what the caller does next.

named_enum! {
    /// The kind of record an error is about.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    #[non_exhaustive]
    pub enum Entity {
        /// A resource.
        Resource => "resource",
        /// An operation.
        Operation => "operation",
        /// A resource history item.
        ResourceHistory => "resource history item",
        /// An airlock request.
        AirlockRequest => "airlock request",
        /// An outbox message.
        OutboxMessage => "outbox message",
        /// A user's roles in a workspace.
        WorkspaceRoles => "workspace roles",
    }
}

/// What went wrong reading or writing the database.
///
/// - [`Unavailable`](Self::Unavailable): the database cannot be reached or is shutting
///   down; retry later (a handler answers `Retry { cause: Dependency }`, which pauses
///   its worker, and the HTTP layer 503).
/// - [`Busy`](Self::Busy): the database answers but could not run this now (no pooled
///   connection free in time, a deadlock, a serialization failure, a lock or statement
///   timeout); retry the whole transaction. The database is not down: nothing pauses,
///   and readiness does not change.
/// - [`NotFound`](Self::NotFound), [`AlreadyExists`](Self::AlreadyExists),
///   [`EtagMismatch`](Self::EtagMismatch): about this record; re-read, or tell the
///   client.
/// - [`Database`](Self::Database), [`Corrupt`](Self::Corrupt), [`Migrate`](Self::Migrate),
///   [`InvalidUrl`](Self::InvalidUrl): a defect or bad configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The record does not exist.
    #[error("{entity} {id} does not exist")]
    NotFound {
        /// What kind of record.
        entity: Entity,
        /// Its id.
        id: String,
    },
    /// A record with this id exists already.
    #[error("{entity} {id} already exists")]
    AlreadyExists {
        /// What kind of record.
        entity: Entity,
        /// Its id.
        id: String,
    },
    /// The record changed since it was read (its etag no longer matches).
    #[error("{entity} {id} was changed by someone else (etag mismatch)")]
    EtagMismatch {
        /// What kind of record.
        entity: Entity,
        /// Its id.
        id: String,
    },
    /// The database cannot be reached or is shutting down. Retry later.
    #[error("database unavailable")]
    Unavailable {
        /// The driver error.
        #[source]
        source: sqlx::Error,
    },
    /// The database answers, but this could not run now: every pooled connection stayed
    /// in use for the acquire timeout, or the transaction deadlocked (PostgreSQL 40P01),
    /// failed to serialise (40001), waited out `lock_timeout` (55P03) or
    /// `statement_timeout` (57014), was ended by `idle_in_transaction_session_timeout`
    /// (25P03), or SQLite stayed busy or locked. Retry the whole transaction.
    #[error("database busy")]
    Busy {
        /// The driver error.
        #[source]
        source: sqlx::Error,
    },
    /// The database refused a statement (a defect, not an outage).
    #[error("database error")]
    Database {
        /// The driver error.
        #[source]
        source: sqlx::Error,
    },
    /// A stored document cannot be read or a record cannot be written as JSON.
    #[error("{entity} {id} is not valid JSON for its type")]
    Corrupt {
        /// What kind of record.
        entity: Entity,
        /// Its id.
        id: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// An earlier statement of the transaction failed, so PostgreSQL aborted it; nothing
    /// was committed. Retry the whole transaction.
    #[error("the transaction was aborted by an earlier error; nothing was committed")]
    Aborted {
        /// The driver error reported at commit.
        #[source]
        source: sqlx::Error,
    },
    /// The schema migrations failed.
    #[error("database migration failed")]
    Migrate {
        /// The migration error.
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    /// A message written to the outbox is larger than the transport accepts, so it
    /// could never be sent; nothing of the transaction is committed.
    #[error("a message to {queue} of {size} bytes is over the transport's limit of {limit} bytes")]
    MessageTooLarge {
        /// Where it was going.
        queue: String,
        /// Its size, as [`OutgoingMessage::size_bytes`](steward_core::OutgoingMessage::size_bytes)
        /// counts it, with room for the message id and the subject.
        size: usize,
        /// The transport's limit.
        limit: usize,
    },
    /// The database URL is not one steward supports.
    #[error("invalid database url: {message}")]
    InvalidUrl {
        /// What is wrong with it.
        message: String,
    },
}

impl StoreError {
    /// Whether the database is unreachable or shutting down, so the same request may
    /// succeed later and the caller should pause until it answers again. A busy
    /// database is not unavailable: see [`is_busy`](Self::is_busy).
    #[must_use]
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Unavailable { .. } => true,
            StoreError::Migrate { source } => matches!(
                source,
                sqlx::migrate::MigrateError::Execute(error) if is_unavailable(error)
            ),
            _ => false,
        }
    }

    /// Whether the database answers but could not run this now ([`StoreError::Busy`]):
    /// retry the transaction soon, without pausing and without counting the database as
    /// down.
    #[must_use]
    pub fn is_busy(&self) -> bool {
        match self {
            StoreError::Busy { .. } => true,
            StoreError::Migrate { source } => matches!(
                source,
                sqlx::migrate::MigrateError::Execute(error) if is_busy(error)
            ),
            _ => false,
        }
    }

    /// Whether the same call may succeed later: the database is
    /// [unavailable](Self::is_unavailable) or [busy](Self::is_busy).
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        self.is_unavailable() || self.is_busy()
    }

    /// Classifies an error of acquiring a connection from `pool`. A pool timeout means
    /// [`Busy`](StoreError::Busy) when every connection the pool may open was open (all
    /// in use), and [`Unavailable`](StoreError::Unavailable) when it was not: sqlx
    /// retries a refused connection until the acquire timeout, so a database that is
    /// down shows as a pool timeout too.
    pub(crate) fn from_acquire(pool: &sqlx::AnyPool, source: sqlx::Error) -> Self {
        match source {
            sqlx::Error::PoolTimedOut if pool.size() >= pool.options().get_max_connections() => {
                StoreError::Busy { source }
            }
            sqlx::Error::PoolTimedOut => StoreError::Unavailable { source },
            source => source.into(),
        }
    }

    /// Whether a message was over the transport's limit.
    #[must_use]
    pub fn is_message_too_large(&self) -> bool {
        matches!(self, StoreError::MessageTooLarge { .. })
    }

    /// Whether the record does not exist.
    #[must_use]
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }

    /// Whether the write lost an optimistic-concurrency race.
    #[must_use]
    pub fn is_etag_mismatch(&self) -> bool {
        matches!(self, StoreError::EtagMismatch { .. })
    }

    pub(crate) fn not_found(entity: Entity, id: &str) -> Self {
        StoreError::NotFound { entity, id: id.to_owned() }
    }

    pub(crate) fn corrupt(entity: Entity, id: &str, source: serde_json::Error) -> Self {
        StoreError::Corrupt { entity, id: id.to_owned(), source }
    }
}

/// A driver error met outside an acquire (a pool timeout there cannot tell a full pool
/// from a database that refuses connections, and counts as unavailable; the store
/// classifies its own acquires with the pool at hand).
impl From<sqlx::Error> for StoreError {
    fn from(source: sqlx::Error) -> Self {
        if is_busy(&source) {
            StoreError::Busy { source }
        } else if is_unavailable(&source) {
            StoreError::Unavailable { source }
        } else {
            StoreError::Database { source }
        }
    }
}

/// Checks an `INSERT … ON CONFLICT (id) DO NOTHING`: no row inserted means the id is
/// taken. (A unique-violation error would abort a PostgreSQL transaction; a skipped
/// insert does not.)
pub(crate) fn inserted(
    result: &sqlx::any::AnyQueryResult,
    entity: Entity,
    id: &str,
) -> Result<(), StoreError> {
    if result.rows_affected() == 0 {
        Err(StoreError::AlreadyExists { entity, id: id.to_owned() })
    } else {
        Ok(())
    }
}

/// Whether a driver error means the database is unreachable or shutting down rather than
/// that the statement is wrong or lost a race.
fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) if !is_busy(error) => {
            // PostgreSQL SQLSTATE classes: 08 connection exception, 53 insufficient
            // resources, 57 operator intervention (shutdown; 57014, a cancelled
            // statement, is busy), 58 system error.
            let postgres = postgres_code(db.as_ref()).is_some_and(|code| {
                ["08", "53", "57", "58"].iter().any(|class| code.starts_with(class))
            });
            // SQLite (extended) result codes: IOERR 10, FULL 13, CANTOPEN 14.
            let sqlite =
                sqlite_code(db.as_ref()).is_some_and(|code| matches!(code & 0xff, 10 | 13 | 14));
            postgres || sqlite
        }
        _ => false,
    }
}

/// The PostgreSQL SQLSTATEs of a statement that lost to others or ran out of time:
/// serialization failure, deadlock, lock timeout, statement timeout (query cancelled),
/// idle-in-transaction timeout.
const BUSY_SQLSTATES: [&str; 5] = ["40001", "40P01", "55P03", "57014", "25P03"];

/// Whether a driver error means the database answers but could not run the statement
/// now. A pool timeout is not among them here: only the pool can tell
/// ([`StoreError::from_acquire`]).
fn is_busy(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = error else { return false };
    // SQLite (extended) result codes: BUSY 5 (+ 261, 517), LOCKED 6 (+ 262).
    postgres_code(db.as_ref()).is_some_and(|code| BUSY_SQLSTATES.contains(&code))
        || sqlite_code(db.as_ref()).is_some_and(|code| matches!(code & 0xff, 5 | 6))
}

/// The SQLSTATE of a PostgreSQL error.
fn postgres_code(db: &dyn sqlx::error::DatabaseError) -> Option<&str> {
    db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>().map(|error| error.code())
}

/// The (extended) result code of a SQLite error.
fn sqlite_code(db: &dyn sqlx::error::DatabaseError) -> Option<i64> {
    let error: &dyn sqlx::error::DatabaseError =
        db.try_downcast_ref::<sqlx::sqlite::SqliteError>()?;
    error.code()?.parse().ok()
}
